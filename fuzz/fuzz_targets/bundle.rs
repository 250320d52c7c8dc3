//! Bundles arrive on USB sticks and DVDs from anywhere: the header parser, the object
//! stream and the import's checks must refuse anything malformed cleanly, never
//! panic, and never leave a damaged store behind.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_sync::bundle::fuzz_import(data);
});
