//! A whole NBD client byte stream, served by the real server over an in-memory pipe:
//! handshake, options, requests and payloads in any order and of any shape.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = strata_nbd::fuzz_session(data);
});
