//! Object streams arrive from the network (a hub's download, a point's upload): the
//! frame parser and the zstd layer under it must fail cleanly on anything, within
//! their memory limits, never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_sync::fuzz_frames(data);
});
