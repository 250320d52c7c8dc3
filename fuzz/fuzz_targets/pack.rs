//! A pack read back from disk or an object store is untrusted: parsing it and decoding
//! every entry it lists must fail cleanly, never panic or over-allocate.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_store::pack::fuzz_pack(data);
});
