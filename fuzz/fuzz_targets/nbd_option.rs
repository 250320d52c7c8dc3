//! NBD options (and option headers) arrive from any client before it has proved
//! anything: four bytes of option code, then its payload.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_nbd::proto::fuzz_option(data);
});
