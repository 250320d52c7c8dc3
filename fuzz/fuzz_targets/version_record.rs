//! Version records arrive from packs and, later, from peers.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = strata_store::Version::decode(data) {
        let _ = v.tree();
        let _ = v.blocks();
    }
});
