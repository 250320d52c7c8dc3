//! Desktops on a hub over loopback: creation, one writer at a time, what the holder
//! may read and write, forced transfer with the old holder's recovery branch, and
//! the audit trail.

mod common;

use common::*;
use strata_store::RefKind;
use strata_sync::api::{CreateDesktopRequest, PublishRequest};
use strata_sync::transfer::Expect;
use strata_sync::{PullOptions, PushOptions, SyncError};

const USER: &str = "desktops/d1/user";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_writer_per_desktop_and_recovery_after_a_forced_transfer() {
    let env = Env::new().await;
    let hub_store = env.hub_store();
    let gold: Vec<Vec<u8>> = (0..40).map(block).collect();
    commit(&hub_store, "gold", &gold, None);
    let admin = env.admin();
    admin
        .publish(&PublishRequest {
            channel: "gold/production".into(),
            image: "gold".into(),
            rev: "main".into(),
            expected_seq: None,
        })
        .await
        .unwrap();
    let create = |name: &str, size: Option<u64>, template: Option<&str>| CreateDesktopRequest {
        name: name.into(),
        channel: "gold/production".into(),
        size,
        template: template.map(str::to_string),
        block_size: Some(BS),
    };
    let d = admin
        .create_desktop(&create("d1", Some(40 * BS as u64), None))
        .await
        .unwrap();
    assert_eq!(d.user_image, USER);
    assert_eq!(d.holder, None);
    assert!(d.os_version.is_some() && d.user_version.is_some());
    // A template shares its blocks; a taken name, a missing channel and a desktop
    // without a disk are refused.
    let t = admin
        .create_desktop(&create("d2", None, Some("gold@main")))
        .await
        .unwrap();
    assert_eq!(t.user_version, d.os_version);
    for (req, status) in [
        (create("d1", Some(4096), None), 409),
        (create("d3", None, None), 400),
        (
            CreateDesktopRequest {
                channel: "nope".into(),
                ..create("d4", Some(4096), None)
            },
            404,
        ),
    ] {
        let err = admin.create_desktop(&req).await.unwrap_err();
        let got = match &err {
            SyncError::Conflict(_) => 409,
            SyncError::Hub { status, .. } => *status,
            _ => 0,
        };
        assert_eq!(got, status, "{err}");
    }

    let (c1, c2) = (env.enroll("p1").await, env.enroll("p2").await);
    let (p1, p2) = (env.client(Some(&c1)), env.client(Some(&c2)));
    // Not checked out: no access to the user disk.
    let err = p1.image(USER).await.unwrap_err();
    assert!(matches!(err, SyncError::Forbidden(_)), "{err}");
    let got = p1.check_out("d1").await.unwrap();
    assert_eq!(got.holder.as_deref(), Some("p1"));
    assert_eq!(
        p1.check_out("d1").await.unwrap().epoch,
        got.epoch,
        "idempotent"
    );
    let err = p2.check_out("d1").await.unwrap_err();
    assert!(
        matches!(&err, SyncError::Conflict(m) if m.contains("checked out to point p1") && m.contains("last contact")),
        "{err}"
    );
    assert_eq!(p1.desktops().await.unwrap().len(), 1);
    assert!(p2.desktops().await.unwrap().is_empty());

    // The holder reads the OS image and the user disk, and writes the user disk.
    let s1 = env.point_store("p1");
    strata_sync::pull(&s1, &p1, "gold", "main", &PullOptions::default())
        .await
        .unwrap();
    strata_sync::pull(&s1, &p1, USER, "main", &PullOptions::default())
        .await
        .unwrap();
    let base = s1.get_ref(USER, RefKind::Branch, "main").unwrap().unwrap();
    let mut user: Vec<Vec<u8>> = (0..40).map(|_| Vec::new()).collect();
    user[3] = block(1003);
    let synced = commit(&s1, USER, &user, Some(base));
    strata_sync::push(&s1, &p1, USER, "main", &synced, &PushOptions::default())
        .await
        .unwrap();
    // p2 may not read it, nor write what it does not hold.
    let err = p2.image(USER).await.unwrap_err();
    assert!(matches!(err, SyncError::Forbidden(_)), "{err}");
    let s2 = env.point_store("p2");
    let err = strata_sync::pull(&s2, &p2, "gold", "main", &PullOptions::default())
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::Forbidden(_)), "{err}");

    // p1 keeps working without syncing; then the laptop is lost: forced transfer.
    user[5] = block(1005);
    let unsynced = commit(&s1, USER, &user, Some(synced));
    let err = admin.transfer_desktop("d1", "p2", false).await.unwrap_err();
    assert!(
        matches!(&err, SyncError::Conflict(m) if m.contains("--force")),
        "{err}"
    );
    let moved = admin.transfer_desktop("d1", "p2", true).await.unwrap();
    assert_eq!(moved.holder.as_deref(), Some("p2"));
    assert!(moved.epoch > got.epoch);
    // p2 sees p1's last synced state.
    strata_sync::pull(&s2, &p2, USER, "main", &PullOptions::default())
        .await
        .unwrap();
    assert_eq!(
        s2.get_ref(USER, RefKind::Branch, "main").unwrap(),
        Some(synced)
    );
    assert_eq!(version_bytes(&s2, &synced), version_bytes(&s1, &synced));
    // p1 can no longer read the user disk (a lost laptop must not see new data) nor
    // move main, but keeps its tail as a recovery version.
    let err = p1.image(USER).await.unwrap_err();
    assert!(matches!(err, SyncError::Forbidden(_)), "{err}");
    let onto_main = PushOptions {
        expected: Expect::Value(Some(synced)),
        ..PushOptions::default()
    };
    let err = strata_sync::push(&s1, &p1, USER, "main", &unsynced, &onto_main)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SyncError::Forbidden(m) if m.contains("recovery/")),
        "{err}"
    );
    let push = PushOptions {
        expected: Expect::Value(None),
        ..PushOptions::default()
    };
    strata_sync::push(&s1, &p1, USER, "recovery/p1", &unsynced, &push)
        .await
        .unwrap();
    let hub_user = admin.image(USER).await.unwrap();
    let rec = hub_user
        .branches
        .iter()
        .find(|b| b.name == "recovery/p1")
        .unwrap();
    assert_eq!(rec.version, unsynced.to_hex());
    assert_eq!(
        hub_user
            .branches
            .iter()
            .find(|b| b.name == "main")
            .unwrap()
            .version,
        synced.to_hex(),
        "the recovery push left main alone"
    );
    // Check-in releases; then p1 may check out again.
    let err = p1.check_in("d1").await.unwrap_err();
    assert!(matches!(err, SyncError::Forbidden(_)), "{err}");
    p2.check_in("d1").await.unwrap();
    p1.check_out("d1").await.unwrap();

    let audit = admin.audit(100).await.unwrap();
    let actions: Vec<&str> = audit.iter().rev().map(|a| a.action.as_str()).collect();
    for a in [
        "desktop.create",
        "desktop.checkout",
        "desktop.transfer",
        "desktop.checkin",
    ] {
        assert!(actions.contains(&a), "{a} not in {actions:?}");
    }
    admin.remove_desktop("d2").await.unwrap();
    assert_eq!(admin.desktops().await.unwrap().len(), 1);
    verify_clean(&hub_store);
}

/// Restore to a time, undo the restore; retention keeps exactly the restore points
/// the policy names, and the hub's own gc (every second here, running on through the
/// restores) removes the versions of the others (and only those), although every
/// version's record still names its parent, and the page indexes of removed versions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restore_undo_and_retention() {
    let env = Env::with(|cfg| {
        cfg.retention = "last=3".parse().unwrap();
        cfg.gc_interval = Some(std::time::Duration::from_secs(1));
    })
    .await;
    let (hub_store, admin) = gold_desktop(&env, &[block(1)], 8).await;
    let cred = env.enroll("p1").await;
    let p1 = env.client(Some(&cred));
    p1.check_out("d1").await.unwrap();
    let s1 = env.point_store("p1");
    strata_sync::pull(&s1, &p1, USER, "main", &PullOptions::default())
        .await
        .unwrap();
    // Five syncs, a second apart (restore points are named by their version's time).
    let mut tip = s1.get_ref(USER, RefKind::Branch, "main").unwrap().unwrap();
    let mut versions = vec![tip];
    for n in 0..5u64 {
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let mut user: Vec<Vec<u8>> = (0..8).map(|_| Vec::new()).collect();
        user[n as usize] = block(500 + n);
        let v = commit(&s1, USER, &user, Some(tip));
        let push = PushOptions {
            expected: Expect::Value(Some(tip)),
            ..PushOptions::default()
        };
        strata_sync::push(&s1, &p1, USER, "main", &v, &push)
            .await
            .unwrap();
        tip = v;
        versions.push(v);
    }
    // last=3: exactly the three newest are restore points now.
    let rps = admin.restore_points("d1").await.unwrap();
    let kept: Vec<String> = rps.iter().map(|r| r.version.clone()).collect();
    let want: Vec<String> = versions.iter().rev().take(3).map(|v| v.to_hex()).collect();
    assert_eq!(kept, want);
    // Index files (the names are what counts) of a pruned and of a kept version.
    let index_dir = env.dir.path().join("hub/page-index");
    std::fs::create_dir_all(&index_dir).unwrap();
    let (pruned_idx, kept_idx) = (
        index_dir.join(format!("{}.idx", versions[0].to_hex())),
        index_dir.join(format!("{}.idx", tip.to_hex())),
    );
    std::fs::write(&pruned_idx, b"x").unwrap();
    std::fs::write(&kept_idx, b"x").unwrap();
    let t0 = std::time::Instant::now();
    while hub_store.load_version(&versions[0]).is_ok() || pruned_idx.exists() {
        assert!(t0.elapsed().as_secs() < 60, "the hub never ran gc");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    for (i, v) in versions.iter().enumerate() {
        let present = hub_store.load_version(v).is_ok();
        assert_eq!(present, i >= 3, "version {i}: present {present}");
    }
    assert!(kept_idx.exists());
    verify_clean(&hub_store);

    // Restore to the time of the middle kept point, then undo it.
    let middle = &rps[1];
    let r = admin
        .restore_desktop("d1", &middle.time.to_string())
        .await
        .unwrap();
    assert_eq!(r.restored_from, middle.version);
    assert_eq!(r.previous, tip.to_hex());
    let restored = strata_store::VersionId::from_hex(&r.version).unwrap();
    assert_eq!(
        version_bytes(&hub_store, &restored),
        version_bytes(
            &hub_store,
            &strata_store::VersionId::from_hex(&middle.version).unwrap()
        )
    );
    // The holder's next push, made against the old tip, is refused (no silent undo).
    let mut user: Vec<Vec<u8>> = (0..8).map(|_| Vec::new()).collect();
    user[7] = block(999);
    let late = commit(&s1, USER, &user, Some(tip));
    let push = PushOptions {
        expected: Expect::Value(Some(tip)),
        ..PushOptions::default()
    };
    let err = strata_sync::push(&s1, &p1, USER, "main", &late, &push)
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::Conflict(_)), "{err}");
    let undo = admin.restore_desktop("d1", &r.previous).await.unwrap();
    assert_eq!(
        version_bytes(
            &hub_store,
            &strata_store::VersionId::from_hex(&undo.version).unwrap()
        ),
        version_bytes(&hub_store, &tip)
    );
    let err = admin.restore_desktop("d1", "12").await.unwrap_err();
    assert!(matches!(err, SyncError::Hub { status: 404, .. }), "{err}");
    let audit = admin.audit(50).await.unwrap();
    assert_eq!(
        audit
            .iter()
            .filter(|a| a.action == "desktop.restore")
            .count(),
        2
    );
}

/// OS reset requests (counted, audited, handed to the holder at check-out), the
/// holder's reports (kept per desktop, refused from anyone else, hidden once the
/// desktop moved on), and the hub's own hold (`hub desktop serve --writable`): a
/// transfer to `hub` needs no enrolled point, shuts the former holder out of `main`
/// and its reports, and an operator's check-in releases it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn os_resets_point_reports_and_the_hubs_own_hold() {
    use strata_sync::api::{DesktopPointReport, HUB_HOLDER};

    let env = Env::new().await;
    let (hub_store, admin) = gold_desktop(&env, &[block(1), block(2)], 4).await;
    let fresh = admin.desktop_detail("d1").await.unwrap();
    assert_eq!((fresh.os_reset, fresh.point.as_ref()), (0, None));

    // Reset requests count up, name who asked, and are audited.
    assert_eq!(admin.reset_desktop_os("d1").await.unwrap().os_reset, 1);
    let d = admin.reset_desktop_os("d1").await.unwrap();
    assert_eq!(d.os_reset, 2);
    assert_eq!(d.os_reset_by.as_deref(), Some("admin"));
    assert!(d.os_reset_time.is_some());
    let err = admin.reset_desktop_os("nope").await.unwrap_err();
    assert!(matches!(err, SyncError::Hub { status: 404, .. }), "{err}");

    let (c1, c2) = (env.enroll("p1").await, env.enroll("p2").await);
    let (p1, p2) = (env.client(Some(&c1)), env.client(Some(&c2)));
    // A point may not request resets; the holder learns the count at check-out.
    assert!(matches!(
        p1.reset_desktop_os("d1").await.unwrap_err(),
        SyncError::Forbidden(_)
    ));
    let out = p1.check_out_detail("d1").await.unwrap();
    assert_eq!((out.info.holder.as_deref(), out.os_reset), (Some("p1"), 2));

    // The holder's report is kept and shown with the hub's view; nobody else may
    // report.
    let report = DesktopPointReport {
        time: 1234,
        os_version: d.info.os_version.clone(),
        os_reset: 2,
        user_version: Some("ab".repeat(32)),
        user_pushed: d.info.user_version.clone(),
        unpushed_bytes: 3 * BS as u64,
        uncommitted_bytes: BS as u64,
        pending_bytes: 4 * BS as u64,
        last_sync: Some(1200),
        ..DesktopPointReport::default()
    };
    p1.report_desktop("d1", &report).await.unwrap();
    let shown = admin.desktop_detail("d1").await.unwrap();
    let p = shown.point.expect("the holder's report");
    assert_eq!((p.point.as_str(), &p.report), ("p1", &report));
    assert!(p.received > 0);
    assert_eq!(
        admin.desktops_detail().await.unwrap()[0].point.as_ref(),
        Some(&p)
    );
    let err = p2.report_desktop("d1", &report).await.unwrap_err();
    assert!(matches!(err, SyncError::Forbidden(_)), "{err}");

    // The hub takes the desktop for itself: no enrolled point needed, the former
    // holder's report is no longer shown and its next report is refused (how it
    // learns it lost the desktop), and it may push only recovery branches.
    let err = admin
        .transfer_desktop("d1", HUB_HOLDER, false)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SyncError::Conflict(m) if m.contains("--force")),
        "{err}"
    );
    let held = admin
        .transfer_desktop("d1", HUB_HOLDER, true)
        .await
        .unwrap();
    assert_eq!(held.holder.as_deref(), Some(HUB_HOLDER));
    assert_eq!(admin.desktop_detail("d1").await.unwrap().point, None);
    let err = p1.report_desktop("d1", &report).await.unwrap_err();
    assert!(matches!(err, SyncError::Forbidden(_)), "{err}");
    let main = hub_store
        .get_ref(USER, RefKind::Branch, "main")
        .unwrap()
        .unwrap();
    let err = p1
        .cas_ref(USER, "main", Some(&main), &main)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SyncError::Forbidden(m) if m.contains("recovery/")),
        "{err}"
    );
    let err = p2.check_out("d1").await.unwrap_err();
    assert!(
        matches!(&err, SyncError::Conflict(m) if m.contains("served by the hub")),
        "{err}"
    );
    // A point enrolled under the reserved name gets nothing from the hub's hold.
    let c3 = env.enroll(HUB_HOLDER).await;
    let fake = env.client(Some(&c3));
    assert!(fake.desktops().await.unwrap().is_empty());
    assert!(matches!(
        fake.image(USER).await.unwrap_err(),
        SyncError::Forbidden(_)
    ));
    assert!(matches!(
        fake.report_desktop("d1", &report).await.unwrap_err(),
        SyncError::Forbidden(_)
    ));
    assert!(matches!(
        fake.check_in("d1").await.unwrap_err(),
        SyncError::Forbidden(_)
    ));

    // An operator's check-in releases the hub's hold (once); then anyone may check
    // out again.
    let released = admin.check_in("d1").await.unwrap();
    assert_eq!(released.holder, None);
    assert!(matches!(
        admin.check_in("d1").await.unwrap_err(),
        SyncError::Forbidden(_)
    ));
    p2.check_out("d1").await.unwrap();
    let audit = admin.audit(100).await.unwrap();
    let seen = |action: &str, actor: &str, detail: &str| {
        audit
            .iter()
            .any(|a| a.action == action && a.actor == actor && a.detail.contains(detail))
    };
    assert!(seen("desktop.reset-os", "admin", "#2"), "{audit:#?}");
    assert!(seen("desktop.transfer", "admin", "to hub, taken from p1"));
    assert!(seen("desktop.checkin", "admin", "from hub"));
}

/// Gold (`blocks`) published to channel `c`, and desktop `d1` on it with a user disk
/// of `size` blocks: the hub's store and an admin client.
async fn gold_desktop(
    env: &Env,
    blocks: &[Vec<u8>],
    size: u64,
) -> (strata_store::Store, strata_sync::HubClient) {
    let hub_store = env.hub_store();
    commit(&hub_store, "gold", blocks, None);
    let admin = env.admin();
    admin
        .publish(&PublishRequest {
            channel: "c".into(),
            image: "gold".into(),
            rev: "main".into(),
            expected_seq: None,
        })
        .await
        .unwrap();
    admin
        .create_desktop(&CreateDesktopRequest {
            name: "d1".into(),
            channel: "c".into(),
            size: Some(size * BS as u64),
            template: None,
            block_size: Some(BS),
        })
        .await
        .unwrap();
    (hub_store, admin)
}
