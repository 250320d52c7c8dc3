//! The load tool against a real hub: 20 simulated points, two check-ins each. Every
//! check-in must succeed, and every desktop's user disk on the hub must have moved
//! exactly two versions past the template it was created from, each the parent of
//! the next (compare-and-swap pushes, no lost or doubled round).

use std::net::SocketAddr;
use std::process::Command;

use strata_store::{RefKind, Store};

#[test]
fn twenty_points_two_rounds_all_land_on_the_hub() {
    let dir = tempfile::tempdir().unwrap();
    let hub_dir = dir.path().join("hub");
    strata_hub::init(&hub_dir).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    // The hub serves from this runtime's worker threads while the tool runs as a
    // separate process.
    let hub = rt
        .block_on(strata_hub::start(strata_hub::HubConfig::new(
            &hub_dir, listen,
        )))
        .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_strata-load"))
        .arg("--hub")
        .arg(hub.url())
        .arg("--admin-token-file")
        .arg(hub_dir.join("admin.token"))
        .arg("--hub-dir")
        .arg(&hub_dir)
        .arg("--hub-pid")
        .arg(std::process::id().to_string())
        .arg("--local-store")
        .arg(dir.path().join("local"))
        .args([
            "--steps",
            "20",
            "--interval",
            "2",
            "--rounds",
            "2",
            "--json",
        ])
        // 8 MiB user disks of 128 blocks, 32 of them data in the template.
        .args([
            "--disk-size",
            "8M",
            "--user-fill",
            "0.25",
            "--changed-blocks",
            "3",
        ])
        .output()
        .expect("run strata-load");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "strata-load failed: {stderr}");
    let report: serde_json::Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("bad JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    let step = &report["steps"][0];
    assert_eq!(step["points"], 20, "{report}");
    assert_eq!(step["checkins"], 40, "{report}");
    assert_eq!(step["failures"], 0, "{report}");
    assert_eq!(step["channel_moved"], 0, "{report}");
    assert_eq!(step["setup"]["added"], 20, "{report}");
    assert_eq!(
        step["pass"].as_bool(),
        Some(step["latency_ms"]["p99"].as_f64().unwrap() < 1000.0)
    );
    // Each check-in sent the 3 new blocks, a leaf and a version record, some of
    // them as deltas against what the template held at the same place.
    assert_eq!(step["objects_per_checkin"].as_f64(), Some(5.0), "{report}");
    assert!(
        step["deltas_per_checkin"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(
        step["hub"]["cpu_ms_per_checkin"].as_f64().unwrap() > 0.0,
        "{report}"
    );
    assert!(step["store"]["packs"].as_u64().unwrap() > 0, "{report}");

    // What the hub holds, read from its store (a second handle, as `strata` would).
    let store = Store::open(&hub_dir.join("store")).unwrap();
    for i in 0..20 {
        let image = format!("desktops/load-{i:06}/user");
        let tip = store
            .get_ref(&image, RefKind::Branch, "main")
            .unwrap()
            .unwrap_or_else(|| panic!("{image} has no main"));
        let history = store.history(&tip, 100).unwrap();
        assert_eq!(
            history.len(),
            3,
            "{image}: the template and two check-ins, got {:?}",
            history.iter().map(|(_, v)| &v.message).collect::<Vec<_>>()
        );
        assert_eq!(history[0].1.message, "check-in 2");
        assert_eq!(history[1].1.message, "check-in 1");
        assert_eq!(history[0].1.author, format!("point:load-{i:06}"));
        assert_eq!(history[2].1.data_blocks, 32, "{image}: the template");
        // Three blocks rewritten per check-in, some where the template had data.
        let blocks = history[0].1.data_blocks;
        assert!((32..=38).contains(&blocks), "{image}: {blocks} data blocks");
    }
    hub.stop();
}
