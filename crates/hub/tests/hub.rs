//! A hub on loopback with points' stores: enrolment, pull, push, access control,
//! forged objects, ref conflicts, cut connections, and gc racing uploads.

mod common;

use common::*;
use strata_store::{ChunkId, ObjectKind, RefKind};
use strata_sync::transfer::Expect;
use strata_sync::{PullOptions, PushOptions, SyncError, UploadObject};

const BLOCKS: usize = 600; // 3 leaves under a root at 4 KiB blocks

fn gold_blocks() -> Vec<Vec<u8>> {
    (0..BLOCKS as u64)
        .map(|i| if i % 10 == 9 { Vec::new() } else { block(i) })
        .collect()
}

fn data_blocks(blocks: &[Vec<u8>]) -> u64 {
    blocks.iter().filter(|b| !b.is_empty()).count() as u64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_into_empty_store_then_only_changed_blocks() {
    let env = Env::new().await;
    let hub_store = env.hub_store();
    let mut blocks = gold_blocks();
    let v1 = commit(&hub_store, "gold", &blocks, None);
    let cred = env.enroll("p1").await;
    env.admin().grant("p1", "gold").await.unwrap();
    let p1 = env.client(Some(&cred));
    let local = env.point_store("p1");

    let st = strata_sync::pull(&local, &p1, "gold", "main", &PullOptions::default())
        .await
        .unwrap();
    assert_eq!(st.version, v1.to_hex());
    assert_eq!(st.data_objects, data_blocks(&blocks));
    assert_eq!(st.tree_objects, 4, "three leaves and a root");
    assert_eq!(st.version_objects, 1);
    assert_eq!(
        local.get_ref("gold", RefKind::Branch, "main").unwrap(),
        Some(v1)
    );
    assert!(version_bytes(&local, &v1) == version_bytes(&hub_store, &v1));
    verify_clean(&local);
    // One zstd stream per batch: well under the raw size (half of each block is text).
    assert!(
        st.wire_received < st.logical_bytes * 3 / 4,
        "{} on the wire for {} bytes",
        st.wire_received,
        st.logical_bytes
    );

    // v2 edits 5 blocks of the first leaf a little: only they, that leaf and the root
    // travel, as deltas against v1's blocks at the same places.
    for i in [3usize, 7, 100, 101, 200] {
        blocks[i][..16].copy_from_slice(b"edited in v2....");
    }
    let v2 = commit(&hub_store, "gold", &blocks, Some(v1));
    let st = strata_sync::pull(&local, &p1, "gold", "main", &PullOptions::default())
        .await
        .unwrap();
    assert_eq!(st.version, v2.to_hex());
    assert_eq!(st.previous, Some(v1.to_hex()));
    assert_eq!(
        (st.data_objects, st.tree_objects, st.version_objects),
        (5, 2, 1)
    );
    assert_eq!(st.deltas, 7, "5 blocks, a leaf and the root as deltas");
    assert!(
        st.wire_received < 3000,
        "{} bytes on the wire for 5 small edits",
        st.wire_received
    );
    assert!(version_bytes(&local, &v2) == version_bytes(&hub_store, &v2));
    verify_clean(&local);

    // Nothing new: nothing moves.
    let st = strata_sync::pull(&local, &p1, "gold", "main", &PullOptions::default())
        .await
        .unwrap();
    assert_eq!(st.objects(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn push_sends_only_new_objects() {
    let env = Env::new().await;
    let cred = env.enroll("p1").await;
    let p1 = env.client(Some(&cred));
    let local = env.point_store("p1");
    let mut blocks = gold_blocks();
    let v1 = commit(&local, "p1-disk", &blocks, None);

    let st = strata_sync::push(&local, &p1, "p1-disk", "main", &v1, &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(st.data_objects, data_blocks(&blocks));
    assert_eq!((st.tree_objects, st.version_objects), (4, 1));
    let hub_store = env.hub_store();
    assert_eq!(
        hub_store
            .get_ref("p1-disk", RefKind::Branch, "main")
            .unwrap(),
        Some(v1)
    );
    assert!(version_bytes(&hub_store, &v1) == version_bytes(&local, &v1));

    // A child version changing 3 blocks in the last leaf and writing 2 new ones.
    for i in [520usize, 530, 598] {
        blocks[i][100..110].copy_from_slice(b"0123456789");
    }
    blocks[9] = block(10_000);
    blocks[19] = block(10_001);
    let v2 = commit(&local, "p1-disk", &blocks, Some(v1));
    let st = strata_sync::push(&local, &p1, "p1-disk", "main", &v2, &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (st.data_objects, st.tree_objects, st.version_objects),
        (5, 3, 1),
        "5 blocks, the first and last leaves, the root, the record"
    );
    assert_eq!(st.previous, Some(v1.to_hex()));
    assert!(st.wire_sent < 4 * BS as u64, "{} bytes sent", st.wire_sent);
    assert_eq!(
        hub_store
            .get_ref("p1-disk", RefKind::Branch, "main")
            .unwrap(),
        Some(v2)
    );
    assert!(version_bytes(&hub_store, &v2) == version_bytes(&local, &v2));
    verify_clean(&hub_store);

    // The hub knows who owns it and recorded who changed it.
    let images = p1.images().await.unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].owner.as_deref(), Some("p1"));
    let audit = env.admin().audit(10).await.unwrap();
    assert!(audit
        .iter()
        .any(|a| a.actor == "point:p1" && a.action == "push" && a.detail.ends_with(&v2.to_hex())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_and_grants() {
    let env = Env::new().await;
    let hub_store = env.hub_store();
    commit(&hub_store, "gold", &gold_blocks()[..10], None);
    let c1 = env.enroll("p1").await;
    let c2 = env.enroll("p2").await;
    let local = env.point_store("p1");

    // 401: none, wrong, revoked; and an enrolment token works once only.
    assert!(unauth(env.client(None).images().await));
    assert!(unauth(env.client(Some("strata-point-00")).images().await));
    let tok = env.admin().create_enrollment("p3").await.unwrap();
    let c3 = env
        .client(None)
        .enroll(&tok.token)
        .await
        .unwrap()
        .credential;
    assert!(unauth(env.client(None).enroll(&tok.token).await.map(drop)));
    assert!(env.client(Some(&c3)).images().await.is_ok());
    env.admin().revoke_point("p3").await.unwrap();
    assert!(unauth(env.client(Some(&c3)).images().await));
    // Enrolled again under its name, a point's old credential no longer holds
    // (the hub had it cached from the request before).
    let old = env.enroll("p4").await;
    assert!(env.client(Some(&old)).images().await.is_ok());
    let new = env.enroll("p4").await;
    assert!(unauth(env.client(Some(&old)).images().await));
    assert!(env.client(Some(&new)).images().await.is_ok());

    // 403: not granted, and after the grant is revoked.
    let p1 = env.client(Some(&c1));
    assert!(forbidden(
        strata_sync::pull(&local, &p1, "gold", "main", &PullOptions::default()).await
    ));
    assert!(p1.images().await.unwrap().is_empty());
    env.admin().grant("p1", "gold").await.unwrap();
    strata_sync::pull(&local, &p1, "gold", "main", &PullOptions::default())
        .await
        .unwrap();
    env.admin().revoke_grant("p1", "gold").await.unwrap();
    assert!(forbidden(p1.get_version("gold", "main").await.map(drop)));

    // 403: writing the operators' image, or another point's.
    assert!(forbidden(p1.begin_upload("gold").await));
    let v = commit(&local, "p1-disk", &gold_blocks()[..10], None);
    strata_sync::push(&local, &p1, "p1-disk", "main", &v, &PushOptions::default())
        .await
        .unwrap();
    let p2 = env.client(Some(&c2));
    assert!(forbidden(p2.begin_upload("p1-disk").await));
    assert!(forbidden(
        p2.cas_ref("p1-disk", "main", Some(&v), &v).await.map(drop)
    ));
    assert!(forbidden(p2.get_version("p1-disk", "main").await.map(drop)));
    // A point cannot act as an operator.
    assert!(forbidden(p1.points().await));
    let points = env.admin().points().await.unwrap();
    assert_eq!(
        points
            .iter()
            .map(|p| (p.name.as_str(), p.revoked))
            .collect::<Vec<_>>(),
        vec![("p1", false), ("p2", false), ("p3", true), ("p4", false)]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_objects_are_refused_and_not_stored() {
    let env = Env::new().await;
    let cred = env.enroll("p1").await;
    let p1 = env.client(Some(&cred));
    let up = p1.begin_upload("p1-disk").await.unwrap();
    let hub_store = env.hub_store();

    // Content that does not hash to its id.
    let real = block(1);
    let claimed = ChunkId::of(&block(2));
    let r = p1
        .upload(
            "p1-disk",
            &up,
            vec![UploadObject {
                kind: ObjectKind::Data,
                id: claimed,
                raw: real.clone(),
                base: None,
            }],
        )
        .await;
    assert!(
        matches!(&r, Err(SyncError::Hub { status: 422, code, .. }) if code == "bad_object"),
        "{r:?}"
    );
    assert!(hub_store.locate(&claimed).unwrap().is_none());
    assert!(hub_store.locate(&ChunkId::of(&real)).unwrap().is_none());

    // A data block passed off as a tree node (right bytes, wrong domain).
    let r = p1
        .upload(
            "p1-disk",
            &up,
            vec![UploadObject {
                kind: ObjectKind::Tree,
                id: ChunkId::of(&real),
                raw: real.clone(),
                base: None,
            }],
        )
        .await;
    assert!(
        matches!(&r, Err(SyncError::Hub { status: 422, .. })),
        "{r:?}"
    );

    // A tree node whose children the hub does not hold.
    let node = strata_store::tree::Node {
        level: 0,
        entries: vec![strata_store::Entry::Present(ChunkId::of(&real))],
    }
    .encode();
    let nid = ChunkId::for_object(ObjectKind::Tree, &node);
    let r = p1
        .upload(
            "p1-disk",
            &up,
            vec![UploadObject {
                kind: ObjectKind::Tree,
                id: nid,
                raw: node,
                base: None,
            }],
        )
        .await;
    assert!(
        matches!(&r, Err(SyncError::Hub { status: 409, code, .. }) if code == "missing_object"),
        "{r:?}"
    );
    assert!(hub_store.locate(&nid).unwrap().is_none());
    assert_eq!(
        p1.missing("p1-disk", &up, &[nid, claimed]).await.unwrap(),
        vec![nid, claimed]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ref_compare_and_swap_conflicts() {
    let env = Env::new().await;
    let cred = env.enroll("p1").await;
    let p1 = env.client(Some(&cred));
    let local = env.point_store("p1");
    let blocks = gold_blocks();
    let v1 = commit(&local, "img", &blocks[..20], None);
    let v2 = commit(&local, "img", &blocks[20..40], Some(v1));
    strata_sync::push(&local, &p1, "img", "main", &v1, &PushOptions::default())
        .await
        .unwrap();
    // Pushing v2 as if the hub's branch did not exist yet: conflict, nothing moves.
    let opts = PushOptions {
        expected: Expect::Value(None),
        ..Default::default()
    };
    let r = strata_sync::push(&local, &p1, "img", "main", &v2, &opts).await;
    assert!(matches!(r, Err(SyncError::Conflict(_))), "{r:?}");
    let hub_store = env.hub_store();
    assert_eq!(
        hub_store.get_ref("img", RefKind::Branch, "main").unwrap(),
        Some(v1)
    );
    // The objects of the refused push are there; a correct push sends only the record.
    let st = strata_sync::push(&local, &p1, "img", "main", &v2, &PushOptions::default())
        .await
        .unwrap();
    assert_eq!(
        (st.data_objects, st.tree_objects, st.version_objects),
        (0, 0, 0)
    );
    assert_eq!(
        hub_store.get_ref("img", RefKind::Branch, "main").unwrap(),
        Some(v2)
    );
    // A plain ref move with a stale expectation.
    let r = p1.cas_ref("img", "main", Some(&v1), &v1).await;
    assert!(matches!(r, Err(SyncError::Conflict(_))), "{r:?}");
    p1.cas_ref("img", "main", Some(&v2), &v1).await.unwrap();
    p1.cas_ref("img", "stable", None, &v2).await.unwrap();
    assert_eq!(
        hub_store.get_ref("img", RefKind::Branch, "stable").unwrap(),
        Some(v2)
    );
}

/// An image of incompressible blocks, big enough for several batches.
fn unauth<T>(r: Result<T, SyncError>) -> bool {
    matches!(r, Err(SyncError::Unauthorized(_)))
}

fn forbidden<T>(r: Result<T, SyncError>) -> bool {
    matches!(r, Err(SyncError::Forbidden(_)))
}

fn big_blocks(n: usize, salt: u64) -> Vec<Vec<u8>> {
    (0..n as u64)
        .map(|i| {
            let mut b = block(i + salt);
            let tail = block(i + salt + 1_000_000);
            b[BS as usize / 2..].copy_from_slice(&tail[..BS as usize / 2]);
            b
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cut_transfers_resume_and_resend_little() {
    let env = Env::new().await;
    let hub_store = env.hub_store();
    let blocks = big_blocks(2000, 0); // 8 MB, 8 leaves
    let v1 = commit(&hub_store, "gold", &blocks, None);
    let cred = env.enroll("p1").await;
    env.admin().grant("p1", "gold").await.unwrap();
    let proxy = CutProxy::start(env.hub.as_ref().unwrap().addr()).await;
    let mut opts = PullOptions::default();
    opts.transfer.batch_bytes = 256 << 10; // 64 blocks a request

    // Reference: an uncut pull.
    let reference = env.point_store("ref");
    let full = strata_sync::pull(&reference, &env.client(Some(&cred)), "gold", "main", &opts)
        .await
        .unwrap();
    let window = 4 * (256 << 10) + (256 << 10); // streams × batch, plus slack

    // A pull cut halfway with no retries fails; the next run resumes.
    let local = env.point_store("p1");
    let p1 = env.client_at(&proxy.url(), Some(&cred));
    let mut no_retry = opts.clone();
    no_retry.transfer.retries = 0;
    proxy.arm(full.wire_received / 2);
    let r = strata_sync::pull(&local, &p1, "gold", "main", &no_retry).await;
    assert!(matches!(&r, Err(e) if e.is_transient()), "{r:?}");
    assert_eq!(proxy.cuts.load(std::sync::atomic::Ordering::SeqCst), 1);
    let first = p1.wire().received;
    let st = strata_sync::pull(&local, &p1, "gold", "main", &opts)
        .await
        .unwrap();
    assert!(
        st.data_objects < full.data_objects,
        "the second run resumed"
    );
    assert!(
        first + st.wire_received <= full.wire_received + window,
        "resent too much: {first} + {} against {}",
        st.wire_received,
        full.wire_received
    );
    assert!(version_bytes(&local, &v1) == blocks.concat());
    verify_clean(&local);

    // A push cut in the middle retries within the run and completes.
    let mine = big_blocks(1500, 1 << 40);
    let pv = commit(&local, "p1-disk", &mine, None);
    let mut popts = PushOptions::default();
    popts.transfer.batch_bytes = 256 << 10;
    let before = proxy.passed.load(std::sync::atomic::Ordering::SeqCst);
    proxy.arm(3 << 20);
    let st = strata_sync::push(&local, &p1, "p1-disk", "main", &pv, &popts)
        .await
        .unwrap();
    assert_eq!(proxy.cuts.load(std::sync::atomic::Ordering::SeqCst), 2);
    assert!(st.retries >= 1);
    let total = proxy.passed.load(std::sync::atomic::Ordering::SeqCst) - before;
    assert!(
        total <= 1500 * BS as u64 + window + (1 << 20),
        "push moved {total} bytes for a 6 MB image"
    );
    assert!(version_bytes(&hub_store, &pv) == mine.concat());
    verify_clean(&hub_store);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hub_gc_never_takes_an_upload_in_progress() {
    let env = Env::new().await;
    let cred = env.enroll("p1").await;
    let p1 = env.client(Some(&cred));
    let local = env.point_store("p1");
    let hub_store = env.hub_store();
    let blocks = gold_blocks();
    let v1 = commit(&local, "img", &blocks, None);

    // Step by step: the data of the first leaf, then gc, then the rest.
    let up = p1.begin_upload("img").await.unwrap();
    let ver = local.load_version(&v1).unwrap();
    let root = local
        .load_node(&ver.root_entry().unwrap().id().unwrap())
        .unwrap();
    let leaf_id = root.entries[0].id().unwrap();
    let leaf = local.load_node(&leaf_id).unwrap();
    let data: Vec<ChunkId> = leaf.entries.iter().filter_map(|e| e.id()).collect();
    let objs = local.read_chunks(&data).unwrap();
    p1.upload(
        "img",
        &up,
        data.iter()
            .zip(objs)
            .map(|(id, raw)| UploadObject {
                kind: ObjectKind::Data,
                id: *id,
                raw,
                base: None,
            })
            .collect(),
    )
    .await
    .unwrap();
    let report = tokio::task::spawn_blocking(move || {
        let s = strata_store::Store::open(&env_store_path(&hub_store)).unwrap();
        strata_store::gc::gc(&s, &mut |_| {}).unwrap()
    })
    .await
    .unwrap();
    assert_eq!(report.deleted_objects, 0, "{report:?}");
    // A completed request's objects stay in the upload's own pack until the upload
    // ends (a pack per push, not per request); the upload finds them there.
    assert!(p1.missing("img", &up, &data).await.unwrap().is_empty());
    // Objects left by an abandoned upload are unprotected, but once a "missing"
    // answer says the hub has them they are pinned for this upload.
    let orphan_up = p1.begin_upload("img").await.unwrap();
    let leaf2 = local.load_node(&root.entries[1].id().unwrap()).unwrap();
    let data2: Vec<ChunkId> = leaf2.entries.iter().filter_map(|e| e.id()).collect();
    let objs2 = local.read_chunks(&data2).unwrap();
    p1.upload(
        "img",
        &orphan_up,
        data2
            .iter()
            .zip(objs2)
            .map(|(id, raw)| UploadObject {
                kind: ObjectKind::Data,
                id: *id,
                raw,
                base: None,
            })
            .collect(),
    )
    .await
    .unwrap();
    p1.abort_upload("img", &orphan_up).await.unwrap();
    assert!(p1.missing("img", &up, &data2).await.unwrap().is_empty());
    let s2 = env.hub_store();
    let report =
        tokio::task::spawn_blocking(move || strata_store::gc::gc(&s2, &mut |_| {}).unwrap())
            .await
            .unwrap();
    assert_eq!(report.deleted_objects, 0, "{report:?}");

    // The rest of the push goes through the same upload's protection; then gc races
    // whole pushes.
    p1.abort_upload("img", &up).await.unwrap();
    // Ended, the upload indexed what it received: nothing was lost to gc.
    let hub_store = env.hub_store();
    for id in &data {
        assert!(hub_store.locate(id).unwrap().is_some(), "gc took {id}");
    }
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let gc_path = env.path("hub/store");
    let stop2 = stop.clone();
    let racer = std::thread::spawn(move || {
        let s = strata_store::Store::open(&gc_path).unwrap();
        let mut runs = 0;
        while !stop2.load(std::sync::atomic::Ordering::SeqCst) || runs == 0 {
            match strata_store::gc::gc(&s, &mut |_| {}) {
                Ok(_) | Err(strata_store::StoreError::GcBusy) => runs += 1,
                Err(e) => panic!("gc failed: {e}"),
            }
        }
        runs
    });
    let mut parent = v1;
    let mut mine = blocks.clone();
    strata_sync::push(&local, &p1, "img", "main", &v1, &PushOptions::default())
        .await
        .unwrap();
    for round in 0..3u64 {
        for i in 0..40 {
            mine[(i * 13 + round as usize) % BLOCKS] = block(50_000 + round * 100 + i as u64);
        }
        let v = commit(&local, "img", &mine, Some(parent));
        strata_sync::push(&local, &p1, "img", "main", &v, &PushOptions::default())
            .await
            .unwrap();
        parent = v;
    }
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    assert!(racer.join().unwrap() >= 1);
    let hub_store = env.hub_store();
    strata_store::gc::gc(&hub_store, &mut |_| {}).unwrap();
    assert!(version_bytes(&hub_store, &parent) == version_bytes(&local, &parent));
    verify_clean(&hub_store);
}

fn env_store_path(s: &strata_store::Store) -> std::path::PathBuf {
    s.root().to_path_buf()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_the_plain_http_guard() {
    let dir = tempfile::tempdir().unwrap();
    let hub_dir = dir.path().join("hub");
    let init = strata_hub::init(&hub_dir).unwrap();
    let mode = std::fs::metadata(&init.admin_token_path)
        .unwrap()
        .permissions();
    assert_eq!(
        std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
        0o600
    );

    let refused = strata_hub::start(strata_hub::HubConfig::new(
        &hub_dir,
        "0.0.0.0:0".parse().unwrap(),
    ))
    .await;
    assert!(refused.is_err());

    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    std::fs::write(dir.path().join("cert.pem"), cert.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), cert.key_pair.serialize_pem()).unwrap();
    let mut cfg = strata_hub::HubConfig::new(&hub_dir, "127.0.0.1:0".parse().unwrap());
    cfg.tls = Some((dir.path().join("cert.pem"), dir.path().join("key.pem")));
    let hub = strata_hub::start(cfg).await.unwrap();
    let url = format!("https://localhost:{}", hub.addr().port());
    let mut c = strata_sync::ClientConfig::new(&url).credential(&init.admin_token);
    c.ca_pem = Some(cert.cert.pem().into_bytes());
    let admin = strata_sync::HubClient::new(&c).unwrap();
    assert!(admin.images().await.unwrap().is_empty());
    admin.create_enrollment("p1").await.unwrap();
    // Without trusting the certificate, nothing works.
    let untrusted = strata_sync::HubClient::new(
        &strata_sync::ClientConfig::new(&url).credential(&init.admin_token),
    )
    .unwrap();
    // ... and it is not mistaken for a link failure worth retrying.
    let err = untrusted.images().await.unwrap_err();
    assert!(
        matches!(&err, SyncError::Invalid(m) if m.contains("TLS")) && !err.is_transient(),
        "{err}"
    );
    hub.stop();
}
