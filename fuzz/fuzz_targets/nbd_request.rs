//! NBD request headers arrive from any client that completed a handshake; the
//! verdict on them and the reply planners (block status, structured reads) must hold
//! their invariants whatever the header and the disk's extents say.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    strata_nbd::proto::fuzz_request(data);
});
