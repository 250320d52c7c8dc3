//! The qcow2 header parser sees operators' files, which may be anything.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = strata_disk::qcow2::parse_header(data);
});
