//! Desktops end to end with real processes: a hub, two points with their agents,
//! qemu-io writing through NBD, and the operator's `channel`/`desktop` commands.
//!
//! The story: gold v1 published to production; point A checks out a desktop and
//! writes its user disk; the hub dies and A keeps writing; the hub comes back and A
//! syncs; v2 is published and A's next start runs it with the user disk intact,
//! having fetched about the changed blocks only; B's check-out is refused; a forced
//! transfer hands the desktop to B, which sees A's last synced data; A's unsynced
//! tail becomes a recovery version on the hub.

mod common;
use common::hub::{
    desktop_start, fails, json, make_raw, ok, qemu_io_assert, qemu_io_ok, wait_all_local, Agent,
    Env, Hub, HubOpts, MIB,
};
use common::{identical, p};

use std::time::Duration;

use serde_json::Value;
use strata_netfault::Proxy;

#[test]
fn desktop_story_offline_update_transfer_and_recovery() {
    let env = Env::new();
    let hub = Hub::start(&env.hub_dir(), 0);
    let port = hub.port;
    let gold = env.path("gold.raw");
    make_raw(&gold, 32 * MIB, &[(0, 12 * MIB), (20 * MIB, 4 * MIB)], 1);
    env.publish(&gold, "gold");
    env.operator_json(&["channel", "publish", "gold@main", "win/production"]);
    let d = env.create_desktop("d1", "win/production", "16M");
    assert_eq!(d["user_image"], "desktops/d1/user");

    // Point A, through a proxy that counts its bytes: agent with a long sync
    // interval (syncs happen when the test says).
    let proxy = Proxy::start(hub.addr()).unwrap();
    let a = env.point("a", &format!("http://{}", proxy.addr()));
    let sock_a = env.path("a.sock");
    let agent_a = Agent::spawn(None, &a, &sock_a, "1h", &[]);
    let s = desktop_start(&a, "d1", &sock_a);
    assert_eq!(s["os"]["session"], "desktops/d1/os");
    let qemu = s["qemu"].as_array().unwrap();
    assert_eq!(qemu[0], "qemu-system-x86_64");
    assert!(qemu
        .iter()
        .any(|a| a.as_str().unwrap().contains("desktops/d1/user")));
    let os = agent_a.uri("desktops/d1/os");
    let user = agent_a.uri("desktops/d1/user");
    // The OS disk is the channel's version, before it is even local.
    assert!(identical(&gold.display().to_string(), "raw", &os, "raw"));
    qemu_io_assert(&user, &["write -P 0x11 0 1M", "write -P 0x12 8M 64k"]);
    qemu_io_assert(&os, &["write -P 0x66 1M 64k"]);
    // A session is committed and pushed once its base is local.
    wait_all_local(&a);
    let r = json(Some(&a), &["point", "sync"]);
    assert_eq!(r["ok"], true, "{r:#}");
    assert!(
        r["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|s| !s["pushed"].is_null()),
        "nothing pushed: {r:#}"
    );

    // The hub dies; A keeps working; the hub returns and A syncs what it wrote.
    hub.kill9();
    qemu_io_assert(&user, &["write -P 0x13 2M 1M", "read -P 0x11 0 1M"]);
    let out = common::hub::strata(Some(&a), &["point", "sync"]);
    assert!(!out.status.success(), "sync with the hub away must fail");
    let hub = Hub::start(&env.hub_dir(), port);
    assert_eq!(json(Some(&a), &["point", "sync"])["ok"], true);
    wait_all_local(&a);

    // v2 changes 2 MiB of gold; production moves to it.
    let gold2 = env.path("gold2.raw");
    std::fs::copy(&gold, &gold2).unwrap();
    make_raw(&env.path("patch.raw"), 2 * MIB, &[(0, 2 * MIB)], 2);
    let patch = std::fs::read(env.path("patch.raw")).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&gold2)
            .unwrap();
        f.write_all_at(&patch, 4 * MIB).unwrap();
    }
    env.publish(&gold2, "gold");
    env.operator_json(&["channel", "publish", "gold@main", "win/production"]);

    // A's next sync round fetches v2 ahead of the next start (only what it lacks);
    // the start then switches without streaming.
    let before = proxy.bytes_to_client();
    let r = json(Some(&a), &["point", "sync"]);
    assert_eq!(r["prefetched"].as_array().map(Vec::len), Some(1), "{r:#}");
    let before_start = proxy.bytes_to_client();
    let s2 = desktop_start(&a, "d1", &sock_a);
    let at_start = proxy.bytes_to_client() - before_start;
    assert!(s2["os"]["streaming_blocks"].is_null(), "{s2:#}");
    assert!(
        at_start < 256 << 10,
        "{at_start} bytes at start after the prefetch"
    );
    assert_eq!(s2["os"]["switched_from"], s["os"]["version"]);
    let st = wait_all_local(&a);
    assert!(identical(&gold2.display().to_string(), "raw", &os, "raw"));
    qemu_io_assert(
        &user,
        &[
            "read -P 0x11 0 1M",
            "read -P 0x13 2M 1M",
            "read -P 0x12 8M 64k",
        ],
    );
    let _ = st;
    // Bytes A downloaded for v2: the 2 MiB that changed (random: incompressible) and
    // the tree, not the 16 MiB of data in the image.
    let fetched = proxy.bytes_to_client() - before;
    assert!(
        fetched > 2 * MIB && fetched < 2 * MIB + 2 * MIB / 5,
        "{fetched} bytes fetched for a 2 MiB change"
    );

    // B is refused while A holds it; a forced transfer hands it over.
    let b = env.point("b", &hub.url());
    let sock_b = env.path("b.sock");
    let agent_b = Agent::spawn(None, &b, &sock_b, "1h", &[]);
    let err = fails(
        Some(&b),
        &["point", "desktop", "start", "d1", "--socket", p(&sock_b)],
    );
    assert!(err.contains("checked out to point a"), "{err}");
    // A writes more and does not sync before the laptop is lost.
    qemu_io_assert(&user, &["write -P 0x14 4M 64k"]);
    env.operator_json(&["desktop", "transfer", "d1", "b", "--force"]);
    desktop_start(&b, "d1", &sock_b);
    let user_b = agent_b.uri("desktops/d1/user");
    qemu_io_assert(
        &user_b,
        &[
            "read -P 0x11 0 1M",
            "read -P 0x13 2M 1M",
            "read -P 0 4M 64k",
        ],
    );
    // A's next contact: its tail goes to a recovery branch, and it stops serving.
    let r = json(Some(&a), &["point", "sync"]);
    let rec = r["sessions"]
        .as_array()
        .unwrap()
        .iter()
        .find_map(|s| s["recovered"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("no recovery in {r:#}"));
    assert!(rec.starts_with("recovery/a-"), "{rec}");
    let (ok_after, _) = qemu_io_ok(&user, &["read 0 4k"]);
    assert!(!ok_after, "A still serves a desktop it lost");
    let spec = format!("desktops/d1/user:{rec}");
    let tail = env.hub_export(&spec.replace(':', "@"), "tail.raw");
    let tail_uri = format!("{}", tail.display());
    qemu_io_assert(&tail_uri, &["read -P 0x14 4M 64k", "read -P 0x13 2M 1M"]);
    let show = env.operator_json(&["desktop", "show", "d1"]);
    assert_eq!(show["holder"], "b");
    let audit = env.admin_json(&["audit"]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for a in [
        "channel.publish",
        "desktop.create",
        "desktop.checkout",
        "desktop.transfer",
    ] {
        assert!(actions.contains(&a), "{a} missing from {actions:?}");
    }
    // Run it anywhere: the hub serves the desktop's synced disks itself.
    let sock_dc = env.path("dc.sock");
    // It prints the two exports, then that it serves.
    let (mut dc, lines) = common::spawn_announcing(
        std::process::Command::new(common::bin())
            .args(["--json", "hub", "desktop", "serve", "d1", "--dir"])
            .arg(env.hub_dir())
            .arg("--socket")
            .arg(&sock_dc),
        2,
    );
    let exports: Value = serde_json::from_str(&lines[0]).unwrap();
    let uri = |e: &Value| format!("nbd+unix:///{}?socket={}", e.as_str().unwrap(), p(&sock_dc));
    assert!(identical(
        &gold2.display().to_string(),
        "raw",
        &uri(&exports["os"]),
        "raw"
    ));
    // Read-only: qemu-io -r.
    let out = std::process::Command::new("qemu-io")
        .args(["-r", "-f", "raw"])
        .args(["-c", "read -P 0x11 0 1M", "-c", "read -P 0x13 2M 1M"])
        .args(["-c", "read -P 0 4M 64k"])
        .arg(uri(&exports["user"]))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && !text.contains("fail"),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = dc.kill();
    let _ = dc.wait();
    drop(agent_a);
    drop(agent_b);
    ok(Some(&env.hub_store()), &["verify"]);
}

/// The operator's commands end to end: channel promote, rollback and log; desktop
/// restore to a restore point and its undo, seen by the point's next start (which
/// keeps the point's own unsynced changes as a recovery branch).
#[test]
fn operator_commands_channels_and_restore() {
    let env = Env::new();
    // The default policy keeps the newest restore point of each hour; this test
    // makes three in a few seconds and wants them all.
    let hub = Hub::start_opts(
        &env.hub_dir(),
        HubOpts {
            extra: &["--retention", "last=10"],
            ..HubOpts::default()
        },
    );
    let gold = env.path("gold.raw");
    make_raw(&gold, 8 * MIB, &[(0, 4 * MIB)], 5);
    env.publish(&gold, "gold");
    env.operator_json(&["channel", "publish", "gold@main", "win/dev"]);
    let prod = env.operator_json(&["channel", "promote", "win/dev", "win/production"]);
    assert_eq!(prod["seq"], 1);
    make_raw(&gold, 8 * MIB, &[(0, 4 * MIB)], 6);
    env.publish(&gold, "gold");
    env.operator_json(&["channel", "publish", "gold@main", "win/production"]);
    let back = env.operator_json(&["channel", "rollback", "win/production"]);
    assert_eq!(back["version"], prod["version"]);
    let log = env.operator_json(&["channel", "log", "win/production"]);
    let actions: Vec<&str> = log
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, ["rollback", "publish", "promote"], "newest first");
    let err = fails(
        None,
        &[
            "channel",
            "rollback",
            "win/production",
            "--expect-seq",
            "1",
            "--dir",
            p(&env.hub_dir()),
        ],
    );
    assert!(err.contains("#3"), "{err}");

    env.create_desktop("d1", "win/production", "4M");
    let a = env.point("a", &hub.url());
    let sock = env.path("a.sock");
    let agent = Agent::spawn(None, &a, &sock, "1h", &[]);
    desktop_start(&a, "d1", &sock);
    wait_all_local(&a);
    let user = agent.uri("desktops/d1/user");
    qemu_io_assert(&user, &["write -P 0x21 0 64k"]);
    assert_eq!(json(Some(&a), &["point", "sync"])["ok"], true);
    // Restore points are named by their versions' times (seconds): next second.
    std::thread::sleep(Duration::from_millis(1100));
    qemu_io_assert(&user, &["write -P 0x22 0 64k"]);
    assert_eq!(json(Some(&a), &["point", "sync"])["ok"], true);
    let rps = env.operator_json(&["desktop", "restore-points", "d1"]);
    assert_eq!(
        rps.as_array().unwrap().len(),
        3,
        "empty, 0x21, 0x22: {rps:#}"
    );
    let first_write = rps[1]["version"].as_str().unwrap().to_string();
    let r = env.operator_json(&["desktop", "restore", "d1", "--to", &first_write]);
    assert_eq!(r["restored_from"], first_write.as_str());
    // The point wrote more meanwhile; its next start keeps that as a recovery
    // branch and continues from the restored state.
    qemu_io_assert(&user, &["write -P 0x23 64k 64k"]);
    let s = desktop_start(&a, "d1", &sock);
    let rec = s["user"]["recovery"]
        .as_str()
        .unwrap_or_else(|| panic!("{s:#}"))
        .to_string();
    wait_all_local(&a);
    qemu_io_assert(&user, &["read -P 0x21 0 64k", "read -P 0 64k 64k"]);
    let tail = env.hub_export(&format!("desktops/d1/user@{rec}"), "rec.raw");
    qemu_io_assert(p(&tail), &["read -P 0x23 64k 64k"]);
    // Undo the restore from the operator's side too: back to 0x22.
    let undo = env.operator_json(&[
        "desktop",
        "restore",
        "d1",
        "--to",
        r["previous"].as_str().unwrap(),
    ]);
    let state = env.hub_export(
        &format!("desktops/d1/user@{}", undo["version"].as_str().unwrap()),
        "undo.raw",
    );
    qemu_io_assert(p(&state), &["read -P 0x22 0 64k"]);
    drop(agent);
}
