//! Channels on a hub over loopback: publish, promote, rollback and log; concurrent
//! publishers through compare-and-swap; access; every change in the audit log; and
//! every version a channel pointed at survives the hub's gc.

mod common;

use common::*;
use strata_store::VersionId;
use strata_sync::api::{PromoteRequest, PublishRequest, RollbackRequest};
use strata_sync::SyncError;

fn publish(channel: &str, rev: &str, expected: Option<i64>) -> PublishRequest {
    PublishRequest {
        channel: channel.into(),
        image: "gold".into(),
        rev: rev.into(),
        expected_seq: expected,
    }
}

/// Three versions of gold on the hub, tagged v1..v3.
fn three_versions(env: &Env) -> Vec<VersionId> {
    let store = env.hub_store();
    let mut parent = None;
    let mut out = Vec::new();
    for n in 1..=3u64 {
        let blocks: Vec<Vec<u8>> = (0..40).map(|i| block(i * 10 + n)).collect();
        let v = commit(&store, "gold", &blocks, parent);
        store
            .create_ref("gold", strata_store::RefKind::Tag, &format!("v{n}"), &v)
            .unwrap();
        parent = Some(v);
        out.push(v);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_promote_rollback_and_log() {
    let env = Env::new().await;
    let v = three_versions(&env);
    let admin = env.admin();
    let dev = admin
        .publish(&publish("win11/dev", "v1", Some(0)))
        .await
        .unwrap();
    assert_eq!((dev.version.as_str(), dev.seq), (v[0].to_hex().as_str(), 1));
    admin
        .publish(&publish("win11/dev", "v2", None))
        .await
        .unwrap();
    let prod = admin
        .promote(&PromoteRequest {
            from: "win11/dev".into(),
            to: "win11/production".into(),
            expected_seq: Some(0),
        })
        .await
        .unwrap();
    assert_eq!(prod.version, v[1].to_hex());
    admin
        .publish(&publish("win11/production", "v3", None))
        .await
        .unwrap();
    // Two rollbacks walk back v3 -> v2, then refuse (v2 was the first).
    let rb = |ch: &str| RollbackRequest {
        channel: ch.into(),
        expected_seq: None,
    };
    let back = admin.rollback(&rb("win11/production")).await.unwrap();
    assert_eq!(back.version, v[1].to_hex());
    let err = admin.rollback(&rb("win11/production")).await.unwrap_err();
    assert!(
        matches!(&err, SyncError::Conflict(m) if m.contains("no earlier version")),
        "{err}"
    );
    let log = admin.channel_log("win11/production").await.unwrap();
    let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
    assert_eq!(actions, ["promote", "publish", "rollback"]);
    assert_eq!(log[1].previous.as_deref(), Some(v[1].to_hex().as_str()));
    assert_eq!(log[0].detail, "from win11/dev");
    // A stale expectation is refused and changes nothing.
    let err = admin
        .publish(&publish("win11/production", "v1", Some(1)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SyncError::Conflict(m) if m.contains("#3")),
        "{err}"
    );
    let list = admin.channels().await.unwrap();
    let names: Vec<&str> = list.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["win11/dev", "win11/production"]);
    assert_eq!(list[1].version, v[1].to_hex());
    // Every change is audited with who did it.
    let audit = admin.audit(100).await.unwrap();
    let channel_entries: Vec<_> = audit
        .iter()
        .filter(|a| a.action.starts_with("channel."))
        .collect();
    assert_eq!(channel_entries.len(), 5, "{audit:#?}");
    assert!(channel_entries.iter().all(|a| a.actor == "admin"));
    // Unknown channels, bad names, unknown revisions.
    let err = admin.channel_log("nope").await.unwrap_err();
    assert!(matches!(err, SyncError::Hub { status: 404, .. }), "{err}");
    let err = admin
        .publish(&publish("bad name", "v1", None))
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::Hub { status: 400, .. }), "{err}");
    let err = admin.publish(&publish("x", "v9", None)).await.unwrap_err();
    assert!(matches!(err, SyncError::Hub { status: 404, .. }), "{err}");

    // Points may not move channels, and see only channels of images they may read.
    let cred = env.enroll("p1").await;
    let p1 = env.client(Some(&cred));
    let err = p1
        .publish(&publish("win11/dev", "v3", None))
        .await
        .unwrap_err();
    assert!(matches!(err, SyncError::Forbidden(_)), "{err}");
    assert!(p1.channels().await.unwrap().is_empty());
    admin.grant("p1", "gold").await.unwrap();
    assert_eq!(p1.channels().await.unwrap().len(), 2);

    // Nothing a channel ever pointed at is collected, even with the image's own refs
    // gone: v1 and v3 are on no branch now.
    let store = env.hub_store();
    for t in ["v1", "v2", "v3"] {
        store
            .delete_ref("gold", strata_store::RefKind::Tag, t)
            .unwrap();
    }
    store
        .update_branch("gold", "main", Some(&v[2]), &v[0])
        .unwrap();
    strata_store::gc::gc(&store, &mut |_| {}).unwrap();
    for id in &v {
        assert!(store.load_version(id).is_ok(), "{id} was collected");
    }
    verify_clean(&store);
}

/// Eight operators publish to one channel at once, each naming the state it saw:
/// every round exactly one wins, the log has no gaps or duplicates, and its entries
/// chain (each `previous` is the entry before).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishers_are_serialised_by_compare_and_swap() {
    let env = Env::new().await;
    let v = three_versions(&env);
    let admin = env.admin();
    let mut wins = 0;
    for round in 0..6i64 {
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let c = env.admin();
                let rev = format!("v{}", (i % 3) + 1);
                tokio::spawn(
                    async move { c.publish(&publish("gold/stable", &rev, Some(round))).await },
                )
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(SyncError::Conflict(_)) => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(ok, 1, "round {round}: exactly one publisher wins");
        wins += ok;
    }
    // Without expectations, concurrent rollbacks and promotes all land, in some order.
    let tasks: Vec<_> = (0..6)
        .map(|i| {
            let c = env.admin();
            tokio::spawn(async move {
                if i % 2 == 0 {
                    c.publish(&publish("gold/stable", "v3", None)).await
                } else {
                    c.promote(&PromoteRequest {
                        from: "gold/stable".into(),
                        to: "gold/production".into(),
                        expected_seq: None,
                    })
                    .await
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let log = admin.channel_log("gold/stable").await.unwrap();
    assert_eq!(log.len(), wins + 3);
    for (i, e) in log.iter().enumerate() {
        assert_eq!(e.seq, i as i64 + 1);
        if i > 0 {
            assert_eq!(e.previous.as_ref(), Some(&log[i - 1].version));
        }
    }
    let ids: Vec<String> = v.iter().map(|x| x.to_hex()).collect();
    assert!(log.iter().all(|e| ids.contains(&e.version)));
    assert_eq!(admin.channel_log("gold/production").await.unwrap().len(), 3);
}
