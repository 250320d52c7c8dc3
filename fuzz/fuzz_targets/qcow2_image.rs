//! Open a whole qcow2 file and read it: L1/L2 tables, compressed clusters, extents.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_disk::qcow2::fuzz_open_and_read(data);
});
