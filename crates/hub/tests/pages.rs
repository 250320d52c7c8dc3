//! Page references: a pull of v2 by a point holding v1 sends content v1 already
//! holds at other places (4 KiB aligned) as references, not bytes (and so does a
//! bundle made `--since` v1); a base the
//! caller may not read is ignored; a point that lacks a referenced page refuses the
//! object (and a pull then asks for it whole).

mod common;

use common::*;
use strata_store::{RefKind, Store, VersionId};
use strata_sync::api::Want;
use strata_sync::client::NoBases;
use strata_sync::PullOptions;

const BLOCK: usize = 64 << 10;
const PAGE: usize = 4096;

/// Incompressible page number `n`.
fn page(n: u64) -> Vec<u8> {
    let mut x = n.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut p = Vec::with_capacity(PAGE);
    while p.len() < PAGE {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        p.extend_from_slice(&x.to_le_bytes());
    }
    p
}

fn commit64(store: &Store, image: &str, bytes: &[u8], parent: Option<VersionId>) -> VersionId {
    let blocks: Vec<Vec<u8>> = bytes.chunks(BLOCK).map(<[u8]>::to_vec).collect();
    commit_with(store, image, &blocks, parent, BLOCK as u32)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moved_pages_travel_as_references() {
    let env = Env::new().await;
    let hub = env.hub_store();
    // v1: 64 blocks of 16 distinct incompressible pages. v2: 3 new pages, then v1's
    // blocks in reverse order (so every block of v2 straddles two old blocks, neither
    // of them the one at its place).
    let v1_bytes: Vec<u8> = (0..64 * 16).flat_map(page).collect();
    let mut v2_bytes: Vec<u8> = (100_000..100_003).flat_map(page).collect();
    for b in v1_bytes.chunks(BLOCK).rev() {
        v2_bytes.extend_from_slice(b);
    }
    v2_bytes.truncate(v1_bytes.len());
    let v1 = commit64(&hub, "gold", &v1_bytes, None);
    let v2 = commit64(&hub, "gold", &v2_bytes, Some(v1));
    let cred = env.enroll("p1").await;
    env.admin().grant("p1", "gold").await.unwrap();
    env.admin().grant("p1", "other").await.ok();
    let p1 = env.client(Some(&cred));

    let pull_v2 = |pages: bool, store: Store| {
        let p1 = &p1;
        async move {
            let mut opts = PullOptions::default();
            strata_sync::pull(&store, p1, "gold", &v1.to_hex(), &opts)
                .await
                .unwrap();
            opts.transfer.pages = pages;
            let st = strata_sync::pull(&store, p1, "gold", "main", &opts)
                .await
                .unwrap();
            (st, store)
        }
    };
    let (with, local) = pull_v2(true, env.point_store("p1")).await;
    let (without, plain) = pull_v2(false, env.point_store("p1b")).await;
    assert_eq!(with.version, v2.to_hex());
    assert_eq!(with.data_objects, 64);
    assert_eq!(without.data_objects, 64);
    assert_eq!(without.paged, 0);
    assert!(
        with.paged >= 63,
        "{} of 64 blocks came with page references",
        with.paged
    );
    // Without references every byte of v2 travels (incompressible); with them, the
    // 3 new pages and the references.
    assert!(
        without.wire_received > v2_bytes.len() as u64 * 9 / 10,
        "{} bytes without references",
        without.wire_received
    );
    assert!(
        with.wire_received * 20 < without.wire_received,
        "{} bytes with references vs {} without",
        with.wire_received,
        without.wire_received
    );
    for s in [&local, &plain] {
        assert!(version_bytes(s, &v2) == v2_bytes);
        assert_eq!(
            s.get_ref("gold", RefKind::Branch, "main").unwrap(),
            Some(v2)
        );
        verify_clean(s);
    }
    // The hub kept the index for the next point.
    let idx = env.path("hub").join("page-index");
    assert!(idx.join(format!("{}.idx", v1.to_hex())).exists());

    // A bundle `--since` v1 references v1's pages the same way, and imports where
    // v1 is held.
    let bundle = |pages: bool| {
        let mut out = Vec::new();
        let opts = strata_sync::bundle::ExportOptions {
            since: Some(v1),
            pages,
            ..Default::default()
        };
        strata_sync::bundle::export(&hub, "gold", &v2, &opts, &mut out, &|_| {}).unwrap();
        out
    };
    let (small, big) = (bundle(true), bundle(false));
    assert!(
        small.len() * 20 < big.len(),
        "bundle of {} bytes with page references, {} without",
        small.len(),
        big.len()
    );
    let fresh = env.point_store("bundled");
    strata_sync::pull(&fresh, &p1, "gold", &v1.to_hex(), &PullOptions::default())
        .await
        .unwrap();
    let iopts = strata_sync::bundle::ImportOptions {
        image: None,
        branch: "v2".into(),
        force: false,
    };
    strata_sync::bundle::import(&fresh, small.as_slice(), &iopts, &|_| {}).unwrap();
    assert!(version_bytes(&fresh, &v2) == v2_bytes);
    verify_clean(&fresh);

    // A base from an image the caller may not name is ignored: objects come whole
    // or as same-place deltas, never referencing it.
    let other = commit64(&hub, "other", &v1_bytes, None);
    let tree_ids: Vec<Want> = leaf_ids(&hub, &v2)
        .into_iter()
        .map(|id| Want { id, base: None })
        .collect();
    let d = p1
        .download_with("gold", &tree_ids, &NoBases, Some(other))
        .await;
    assert!(d.error.is_none(), "{:?}", d.error);
    assert_eq!(d.paged, 0, "a version of another image was used");
    assert_eq!(d.objects.len(), 64);

    // A receiver that lacks the referenced pages refuses the objects (it checks
    // every object against its id; nothing wrong is ever accepted).
    let d = p1
        .download_with("gold", &tree_ids, &NoBases, Some(v1))
        .await;
    assert!(d.error.is_none(), "{:?}", d.error);
    assert!(d.objects.len() <= 1, "{} accepted", d.objects.len());
    assert!(d.corrupt.len() >= 63);
    assert!(d.corrupt.iter().all(|(_, why)| why.contains("not here")));
    // A junk version id is a clear 400, not a crash.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let raw = reqwest::Client::new()
        .post(format!("{}/v1/images/gold/download?pages_of=zz", env.url))
        .bearer_auth(&cred)
        .body(vec![0u8; 64])
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 400);
}

/// The data chunk ids of a version, in block order.
fn leaf_ids(store: &Store, v: &VersionId) -> Vec<strata_store::ChunkId> {
    let ver = store.load_version(v).unwrap();
    let t = ver.tree();
    let mut out = Vec::new();
    let mut load = |id: &strata_store::ChunkId| store.load_node(id);
    strata_store::tree::walk(&mut load, t.root, t.depth, 0, ver.blocks(), &mut |span| {
        if let strata_store::tree::Span::Blocks { entries, .. } = span {
            out.extend(strata_store::tree::present_ids(entries));
        }
        Ok::<(), strata_store::StoreError>(())
    })
    .unwrap();
    out
}
