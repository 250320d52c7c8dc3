//! Tree nodes arrive from packs and, later, from peers.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(node) = strata_store::tree::Node::decode(data) {
        // Canonical: whatever decodes re-encodes to the same bytes.
        assert_eq!(node.encode(), data);
    }
});
