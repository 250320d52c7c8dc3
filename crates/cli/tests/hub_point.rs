//! Hub and points with real processes on loopback: `strata hub run` as the hub,
//! `strata point run` as the agent, and (where faults are needed) the
//! `strata-netfault` proxy between point and hub. Contents are checked with
//! qemu-img compare against exports of the hub's store; transfer sizes with the
//! `--json` reports and the proxy's byte counters.

mod common;
use common::hub::{fails, json, make_raw, ok, qemu_io_ok, wait_local, Agent, Env, Hub, MIB};
use common::{bin, identical, p, run_tool as run, Rng};

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use strata_netfault::Proxy;

#[test]
fn ungranted_image_is_403_and_revoked_point_is_401() {
    let env = Env::new();
    let hub = Hub::start(&env.hub_dir(), 0);
    let img = env.path("gold.raw");
    make_raw(&img, 8 * MIB, &[(0, 2 * MIB)], 1);
    env.publish(&img, "gold");
    let a = env.point("alpha", &hub.url());
    let b = env.point("beta", &hub.url());
    env.admin(&["grant", "alpha", "gold"]);

    let r = json(Some(&a), &["point", "pull", "gold"]);
    assert_eq!(r["image"], "gold");
    let err = fails(Some(&b), &["point", "pull", "gold"]);
    assert!(
        err.contains("not allowed") && err.contains("may not read image \"gold\""),
        "beta should get a clear 403: {err}"
    );
    // A wrong credential is a 401.
    std::fs::write(b.join("point.credential"), "strata-point-forged\n").unwrap();
    let err = fails(Some(&b), &["point", "pull", "gold"]);
    assert!(err.contains("refused the credential"), "{err}");

    // Withdrawing the grant gives 403; revoking the point 401.
    env.admin(&["revoke", "alpha", "gold"]);
    let err = fails(Some(&a), &["point", "pull", "gold"]);
    assert!(err.contains("not allowed"), "{err}");
    env.admin(&["grant", "alpha", "gold"]);
    json(Some(&a), &["point", "pull", "gold"]);
    env.admin(&["revoke", "alpha"]);
    let err = fails(Some(&a), &["point", "pull", "gold"]);
    assert!(err.contains("refused the credential"), "{err}");

    let points: Value = serde_json::from_str(&ok(
        None,
        &["--json", "hub", "points", "--dir", p(&env.hub_dir())],
    ))
    .unwrap();
    let alpha = points
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "alpha")
        .unwrap();
    assert_eq!(alpha["revoked"], true);
    let audit = env.admin(&["audit"]);
    assert!(
        audit.contains("grant") && audit.contains("revoke"),
        "{audit}"
    );
}

#[test]
fn attached_session_serves_the_hubs_version() {
    let env = Env::new();
    let hub = Hub::start(&env.hub_dir(), 0);
    let img = env.path("gold.raw");
    make_raw(
        &img,
        32 * MIB,
        &[(0, 3 * MIB), (9 * MIB, MIB + 4096), (31 * MIB, MIB)],
        2,
    );
    env.publish(&img, "gold");
    let pt = env.point("laptop", &hub.url());
    env.admin(&["grant", "laptop", "gold"]);
    let r = json(
        Some(&pt),
        &["point", "attach", "gold@main", "--session", "vm1"],
    );
    assert_eq!(r["session"], "vm1");
    assert!(r["streaming"].is_object(), "attach streams the base: {r}");
    let agent = Agent::start(&pt, &env.path("nbd.sock"));
    let hub_copy = env.hub_export("gold@main", "hub-gold.raw");
    assert!(identical(&agent.uri("vm1"), "raw", p(&hub_copy), "raw"));
    // Once prefetched, the base is the local image vm1's main, served read-only too.
    let st = wait_local(&pt);
    assert!(identical(&agent.uri("vm1@main"), "raw", p(&img), "raw"));
    assert_eq!(st["sessions"][0]["session"], "vm1");
    assert_eq!(
        st["sessions"][0]["origin_version"], r["base"],
        "status: {st}"
    );
}

#[test]
fn offline_after_prefetch_then_sync_makes_the_hub_equal() {
    let env = Env::new();
    let hub = Hub::start(&env.hub_dir(), 0);
    let port = hub.port;
    let proxy = Proxy::start(hub.addr()).unwrap();
    let img = env.path("gold.raw");
    make_raw(&img, 48 * MIB, &[(0, 16 * MIB), (40 * MIB, 8 * MIB)], 3);
    env.publish(&img, "gold");
    let pt = env.point("laptop", &format!("http://{}", proxy.addr()));
    env.admin(&["grant", "laptop", "gold"]);
    json(
        Some(&pt),
        &["point", "attach", "gold@main", "--session", "vm1"],
    );
    let agent = Agent::start(&pt, &env.path("nbd.sock"));
    // The base streams in; then the first rounds push vm1 (the hub already holds its
    // blocks).
    wait_local(&pt);
    ok(Some(&pt), &["point", "sync"]);

    hub.kill9();
    // A reference copy gets the same writes as the session.
    let reference = env.path("reference.raw");
    std::fs::copy(&img, &reference).unwrap();
    let rnd = env.path("rnd.bin");
    make_raw(&rnd, 3 * MIB, &[(0, 3 * MIB)], 4);
    let writes = [
        "write -P 0x3c 30M 1M".to_string(),
        format!("write -s {} 8M 3M", rnd.display()),
        "write -z 1M 512k".to_string(),
    ];
    for w in &writes {
        run("qemu-io", &["-f", "raw", "-c", w, p(&reference)]);
    }
    let uri = agent.uri("vm1");
    for w in &writes {
        run("qemu-io", &["-f", "raw", "-c", w, &uri]);
        // Reads while the hub is away: written data, and gold data from the cache.
        run(
            "qemu-io",
            &[
                "-f",
                "raw",
                "-c",
                "read -P 0x3c 30M 1M",
                "-c",
                "read 0 16M",
                "-c",
                "read 40M 8M",
                &uri,
            ],
        );
        // Let the agent commit (and fail to push) in between.
        std::thread::sleep(Duration::from_millis(1200));
    }
    assert!(identical(&uri, "raw", p(&reference), "raw"));
    let st = json(Some(&pt), &["point", "status"]);
    assert_eq!(st["hub_reachable"], false, "{st}");
    assert!(
        st["sessions"][0]["pending_versions"].as_u64().unwrap() >= 1,
        "commits are local while the hub is away: {st}"
    );
    assert!(st["last_error"].is_string(), "{st}");

    // Back: the hub on the same port; the next sync sends what was written.
    let hub = Hub::start(&env.hub_dir(), port);
    let up0 = proxy.bytes_to_upstream();
    let r = json(Some(&pt), &["point", "sync"]);
    assert_eq!(r["ok"], true, "{r}");
    let sent = proxy.bytes_to_upstream() - up0;
    let tip = json(Some(&pt), &["point", "status"]);
    let s = &tip["sessions"][0];
    assert_eq!(s["pending_versions"], 0, "{tip}");
    assert_eq!(s["hub_tip"], s["local_tip"], "{tip}");
    let hub_copy = env.hub_export("vm1@main", "hub-vm1.raw");
    assert!(identical(p(&hub_copy), "raw", p(&reference), "raw"));
    assert!(identical(&uri, "raw", p(&hub_copy), "raw"));
    // 3 MiB of random data (the 1 MiB pattern and the zeros compress to nothing),
    // not the 24 MiB of the image's data.
    eprintln!("pushed after the outage: {sent} bytes through the proxy");
    assert!(sent >= 3 * MIB, "{sent}");
    assert!(sent < 3 * MIB + 512 * 1024, "{sent}");
    drop(hub);
}

#[test]
fn cut_links_during_a_pull_resend_only_what_was_in_flight() {
    let env = Env::new();
    let hub = Hub::start(&env.hub_dir(), 0);
    let img = env.path("big.raw");
    let size = 80 * MIB;
    make_raw(&img, size, &[(0, size)], 5);
    env.publish(&img, "big");
    // A baseline over a clean link.
    let clean = env.point("clean", &hub.url());
    env.admin(&["grant", "clean", "big"]);
    let base = json(Some(&clean), &["point", "pull", "big"]);
    let baseline = base["wire_received"].as_u64().unwrap();

    let proxy = Proxy::start(hub.addr()).unwrap();
    // About 2.5 s for the whole pull, so the cuts land in the middle of it.
    proxy.set_rate(32 * MIB);
    let pt = env.point("flaky", &format!("http://{}", proxy.addr()));
    env.admin(&["grant", "flaky", "big"]);
    let mut child = Command::new(bin())
        .arg("--store")
        .arg(&pt)
        .args(["--json", "point", "pull", "big", "--attempts", "10"])
        .env_remove("STRATA_LOG")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64;
    eprintln!("cut seed {seed}");
    let mut rng = Rng::new(seed);
    let mut cuts = 0u64;
    let t0 = Instant::now();
    while cuts < 4 && child.try_wait().unwrap().is_none() {
        std::thread::sleep(Duration::from_millis(150 + rng.below(450)));
        if child.try_wait().unwrap().is_none() {
            proxy.cut();
            cuts += 1;
        }
    }
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "pull after {cuts} cuts: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    let got = r["wire_received"].as_u64().unwrap();
    eprintln!(
        "{cuts} cuts in {:?}: {got} bytes received vs {baseline} on a clean link; attempts {}, retries {}",
        t0.elapsed(),
        r["attempts"],
        r["retries"]
    );
    assert!(cuts >= 2, "the pull ended before the link could be cut");
    // At most what was in flight when each cut came: 4 streams of 8 MiB batches.
    let window = 4 * 8 * MIB;
    assert!(
        got <= baseline + cuts * window,
        "resent {} bytes over {cuts} cuts",
        got - baseline
    );
    let copy = env.path("pulled.raw");
    ok(Some(&pt), &["export", "big@main", p(&copy)]);
    assert!(identical(p(&copy), "raw", p(&img), "raw"));
    let v = ok(Some(&pt), &["verify"]);
    assert!(!v.contains("damaged"), "{v}");
}

#[test]
fn pulling_a_new_version_sends_only_the_changed_blocks() {
    let env = Env::new();
    let hub = Hub::start(&env.hub_dir(), 0);
    let img = env.path("gold.raw");
    make_raw(&img, 32 * MIB, &[(0, 32 * MIB)], 6);
    env.publish(&img, "gold");
    let pt = env.point("laptop", &hub.url());
    env.admin(&["grant", "laptop", "gold"]);
    let v1 = json(Some(&pt), &["point", "pull", "gold"]);
    assert!(v1["wire_received"].as_u64().unwrap() >= 32 * MIB);

    // v2: 1 MiB of new random data (16 blocks of 64 KiB) at two places.
    let (r1, r2) = (env.path("rnd1.bin"), env.path("rnd2.bin"));
    make_raw(&r1, MIB / 2, &[(0, MIB / 2)], 70);
    make_raw(&r2, MIB / 2, &[(0, MIB / 2)], 80);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -s {} 4M 512k", r1.display()),
            "-c",
            &format!("write -s {} 20M 512k", r2.display()),
            p(&img),
        ],
    );
    env.publish(&img, "gold");
    let v2 = json(Some(&pt), &["point", "pull", "gold"]);
    let wire = v2["wire_received"].as_u64().unwrap();
    eprintln!("v1 -> v2: {wire} bytes on the wire for 1 MiB of changed blocks");
    assert_eq!(v2["transfer"]["data_objects"], 16, "{v2}");
    assert!(wire >= MIB, "{wire}");
    assert!(wire < MIB + 128 * 1024, "{wire}");
    let copy = env.path("v2.raw");
    ok(Some(&pt), &["export", "gold@main", p(&copy)]);
    assert!(identical(p(&copy), "raw", p(&img), "raw"));
}

#[test]
fn stream_start_fetches_only_what_is_read() {
    let env = Env::new();
    let hub = Hub::start(&env.hub_dir(), 0);
    let proxy = Proxy::start(hub.addr()).unwrap();
    let img = env.path("gold.raw");
    let size = 64 * MIB;
    make_raw(&img, size, &[(0, size)], 6);
    env.publish(&img, "gold");
    let pt = env.point("laptop", &format!("http://{}", proxy.addr()));
    env.admin(&["grant", "laptop", "gold"]);
    let down0 = proxy.bytes_to_client();
    let r = json(
        Some(&pt),
        &["point", "attach", "gold@main", "--session", "vm1"],
    );
    let attach_bytes = proxy.bytes_to_client() - down0;
    eprintln!("attach: {attach_bytes} bytes from the hub");
    assert!(
        attach_bytes < MIB,
        "attach fetches the tree only: {attach_bytes}"
    );
    assert_eq!(r["streaming"]["blocks_total"], 1024, "{r}");
    let agent = Agent::start_with(&pt, &env.path("nbd.sock"), &["--no-prefetch"]);
    let uri = agent.uri("vm1");
    // Reading the first MiB fetches about that, not the image.
    let down1 = proxy.bytes_to_client();
    run("qemu-io", &["-f", "raw", "-c", "read 0 1M", &uri]);
    let read_bytes = proxy.bytes_to_client() - down1;
    eprintln!("reading 1 MiB: {read_bytes} bytes from the hub");
    assert!(read_bytes >= MIB, "{read_bytes}");
    assert!(read_bytes < 8 * MIB, "{read_bytes}");
    // The whole session equals the hub's version while the base is not local yet.
    let hub_copy = env.hub_export("gold@main", "hub-gold.raw");
    assert!(identical(&uri, "raw", p(&hub_copy), "raw"));
    let st = json(Some(&pt), &["point", "status"]);
    assert!(st["sessions"][0]["prefetch"].is_object(), "{st}");
    // A sync round leaves it alone (no commit over a partial base).
    let sr = json(Some(&pt), &["point", "sync"]);
    assert!(sr["sessions"][0]["prefetching"].is_number(), "{sr}");
    assert!(sr["sessions"][0]["committed"].is_null(), "{sr}");
    // The streaming session is not in the catalog yet, but its name is taken.
    let err = fails(Some(&pt), &["session", "create", "vm1", "--from", "gold"]);
    assert!(err.contains("streaming"), "{err}");

    // Writes while streaming stay in the delta; once prefetch has made the base
    // local, the next sync commits them and the hub ends up equal to the point.
    let reference = env.path("reference.raw");
    std::fs::copy(&hub_copy, &reference).unwrap();
    let writes = [
        "write -P 0x5c 3M 1M",
        "write -z 10M 2M",
        "write -P 0x11 60M 64k",
    ];
    let mut args = vec!["-f", "raw"];
    for w in writes {
        args.extend(["-c", w]);
    }
    let mut session_args = args.clone();
    session_args.push(&uri);
    run("qemu-io", &session_args);
    args.push(p(&reference));
    run("qemu-io", &args);
    drop(agent);
    let agent = Agent::start(&pt, &env.path("nbd.sock"));
    wait_local(&pt);
    let r = json(Some(&pt), &["point", "sync"]);
    assert_eq!(r["ok"], true, "{r}");
    let uri = agent.uri("vm1");
    assert!(identical(&uri, "raw", p(&reference), "raw"));
    let hub_vm1 = env.hub_export("vm1@main", "hub-vm1.raw");
    assert!(identical(p(&hub_vm1), "raw", p(&reference), "raw"));
    drop(agent);
}

#[test]
fn hub_away_before_prefetch_fails_missing_reads_then_recovers() {
    let env = Env::new();
    let hub = Hub::start(&env.hub_dir(), 0);
    let port = hub.port;
    let img = env.path("gold.raw");
    make_raw(&img, 16 * MIB, &[(0, 16 * MIB)], 7);
    env.publish(&img, "gold");
    let hub_copy = env.hub_export("gold@main", "hub-gold.raw");
    let pt = env.point("laptop", &hub.url());
    env.admin(&["grant", "laptop", "gold"]);
    json(
        Some(&pt),
        &["point", "attach", "gold@main", "--session", "vm1"],
    );
    let agent = Agent::start_with(
        &pt,
        &env.path("nbd.sock"),
        &["--no-prefetch", "--fetch-timeout", "2s"],
    );
    let uri = agent.uri("vm1");
    let (good, out) = qemu_io_ok(&uri, &["read 0 1M"]);
    assert!(good, "{out}");
    hub.kill9();
    // Fetched blocks read; a missing one fails with an I/O error (after the timeout).
    let (good, out) = qemu_io_ok(&uri, &["read 0 1M"]);
    assert!(good, "{out}");
    let (good, out) = qemu_io_ok(&uri, &["read 8M 64k"]);
    assert!(
        !good,
        "a block that is not local cannot be read without the hub: {out}"
    );
    assert!(out.contains("Input/output error"), "{out}");
    // The hub is back: the same read succeeds, and the whole session is right.
    let hub = Hub::start(&env.hub_dir(), port);
    let (good, out) = qemu_io_ok(&uri, &["read 8M 64k"]);
    assert!(good, "{out}");
    assert!(identical(&uri, "raw", p(&hub_copy), "raw"));
    drop(agent);
    drop(hub);
}

/// Seeding: a point with a stale local copy of the image (raw, then qcow2) takes the
/// blocks whose hashes match from it and fetches only the rest; a bundle carried to
/// another point leaves nothing to fetch.
#[test]
fn seeded_pulls_and_bundles_fetch_only_what_the_point_lacks() {
    let env = Env::new();
    let hub = Hub::start(&env.hub_dir(), 0);
    let proxy = Proxy::start(hub.addr()).unwrap();
    let img = env.path("gold.raw");
    make_raw(&img, 16 * MIB, &[(0, 12 * MIB)], 11);
    env.publish(&img, "gold");
    // The copy on the laptop is stale: 2 MiB differ from the hub's version.
    let stale = env.path("stale.raw");
    std::fs::copy(&img, &stale).unwrap();
    make_raw(&env.path("junk.raw"), 2 * MIB, &[(0, 2 * MIB)], 12);
    run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -s {} 4M 2M", p(&env.path("junk.raw"))),
            p(&stale),
        ],
    );
    let url = format!("http://{}", proxy.addr());
    let reference = env.hub_export("gold@main", "reference.raw");
    for (name, seed) in [
        ("raw-seeded", stale.clone()),
        ("qcow2-seeded", env.path("stale.qcow2")),
    ] {
        if name == "qcow2-seeded" {
            run(
                "qemu-img",
                &["convert", "-f", "raw", "-O", "qcow2", p(&stale), p(&seed)],
            );
        }
        let pt = env.point(name, &url);
        env.admin(&["grant", name, "gold"]);
        let before = proxy.bytes_to_client();
        let r = json(Some(&pt), &["point", "pull", "gold", "--seed", p(&seed)]);
        let fetched = proxy.bytes_to_client() - before;
        // 192 blocks of data, 32 of them changed: 160 from the seed.
        assert_eq!(r["transfer"]["seeded"], 160, "{r:#}");
        assert_eq!(r["transfer"]["data_objects"], 32, "{r:#}");
        assert!(
            fetched < 2 * MIB + MIB / 2,
            "{fetched} bytes for 2 MiB missing"
        );
        let out = env.path(&format!("{name}.raw"));
        ok(Some(&pt), &["export", "gold", p(&out), "--force"]);
        assert!(identical(p(&out), "raw", p(&reference), "raw"));
        ok(Some(&pt), &["verify"]);
    }
    // A seed of the wrong image costs reads, never a wrong block.
    let wrong = env.path("wrong.raw");
    make_raw(&wrong, 16 * MIB, &[(0, 16 * MIB)], 13);
    let pt = env.point("wrong-seed", &url);
    env.admin(&["grant", "wrong-seed", "gold"]);
    let r = json(Some(&pt), &["point", "pull", "gold", "--seed", p(&wrong)]);
    assert_eq!(r["transfer"]["seeded"], 0, "{r:#}");
    assert_eq!(r["transfer"]["data_objects"], 192, "{r:#}");

    // A bundle made on the hub side, imported on a point: the pull after it moves
    // no blocks.
    let bundle = env.path("gold.bundle");
    ok(
        Some(&env.hub_store()),
        &["bundle", "export", "gold", p(&bundle)],
    );
    let pt = env.point("dvd", &url);
    env.admin(&["grant", "dvd", "gold"]);
    ok(Some(&pt), &["bundle", "import", p(&bundle)]);
    let r = json(Some(&pt), &["point", "pull", "gold"]);
    assert_eq!(r["objects"], 0, "{r:#}");
    let out = env.path("dvd.raw");
    ok(Some(&pt), &["export", "gold", p(&out), "--force"]);
    assert!(identical(p(&out), "raw", p(&reference), "raw"));
}

/// NBD CACHE from a client is a prefetch hint: with background prefetch off, the
/// hinted range is fetched, so it still reads after the hub is gone, while an
/// unhinted range fails with EIO after the fetch timeout. The streaming session is
/// listed by `session ls` with its progress.
#[test]
fn nbd_cache_requests_prefetch_the_hinted_range() {
    let env = Env::new();
    let hub = Hub::start(&env.hub_dir(), 0);
    let img = env.path("gold.raw");
    make_raw(&img, 16 * MIB, &[(0, 16 * MIB)], 21);
    env.publish(&img, "gold");
    let pt = env.point("laptop", &hub.url());
    env.admin(&["grant", "laptop", "gold"]);
    json(
        Some(&pt),
        &["point", "attach", "gold@main", "--session", "vm1"],
    );
    let ls = json(Some(&pt), &["session", "ls"]);
    let row = &ls.as_array().unwrap()[0];
    assert_eq!(row["name"], "vm1", "{ls:#}");
    assert_eq!(row["streaming"]["blocks_local"], 0, "{ls:#}");
    let agent = Agent::start_with(
        &pt,
        &env.path("nbd.sock"),
        &["--no-prefetch", "--fetch-timeout", "2s"],
    );
    let uri = agent.uri("vm1");
    // nbdsh runs `python3 -m nbd`: Debian's python has the module.
    let out = Command::new("nbdsh")
        .env(
            "PATH",
            format!("/usr/bin:{}", std::env::var("PATH").unwrap_or_default()),
        )
        .args([
            "-u",
            &uri,
            "-c",
            "h.cache(2 * 1024 * 1024, 4 * 1024 * 1024)",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "nbdsh: {out:?}");
    // The hint's fetch runs in the background: wait until the blocks are local.
    let t0 = Instant::now();
    loop {
        let st = json(Some(&pt), &["point", "status"]);
        let local = st["sessions"][0]["prefetch"]["blocks_local"]
            .as_u64()
            .unwrap_or(0);
        if local >= 32 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "the hint fetched nothing: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    hub.kill9();
    let reference = env.path("reference.raw");
    std::fs::copy(&img, &reference).unwrap();
    let (ok_hinted, out) = qemu_io_ok(&uri, &["read 4M 2M"]);
    assert!(ok_hinted, "hinted range: {out}");
    let (ok_other, _) = qemu_io_ok(&uri, &["read 12M 64k"]);
    assert!(!ok_other, "an unhinted block read without the hub");
    drop(agent);
}

/// A base that cannot be made local at first (here: an image of the session's name
/// already exists with another version) is tried again, not left streaming for
/// ever: once the obstacle is gone, the base becomes local and the session reads
/// as the hub's version.
#[test]
fn a_base_that_cannot_be_made_local_at_first_is_tried_again() {
    let env = Env::new();
    let hub = Hub::start(&env.hub_dir(), 0);
    let img = env.path("gold.raw");
    make_raw(&img, 8 * MIB, &[(0, 2 * MIB), (5 * MIB, MIB)], 61);
    env.publish(&img, "gold");
    let pt = env.point("laptop", &hub.url());
    env.admin(&["grant", "laptop", "gold"]);
    let r = json(
        Some(&pt),
        &["point", "attach", "gold@main", "--session", "vm1"],
    );
    assert!(r["streaming"].is_object(), "{r}");
    // The obstacle: vm1:main at a version that is not the session's base.
    let other = env.path("other.raw");
    make_raw(&other, 8 * MIB, &[(0, MIB)], 62);
    ok(Some(&pt), &["import", p(&other), "vm1"]);
    let agent = Agent::start(&pt, &env.path("nbd.sock"));
    // Every chunk arrives, but the base cannot become local while vm1:main is taken.
    std::thread::sleep(Duration::from_secs(3));
    let st = json(Some(&pt), &["point", "status"]);
    assert!(st["sessions"][0]["prefetch"].is_object(), "{st}");
    ok(Some(&pt), &["rm", "vm1"]);
    wait_local(&pt);
    assert!(identical(&agent.uri("vm1"), "raw", p(&img), "raw"));
    let st = json(Some(&pt), &["point", "status"]);
    assert!(st["sessions"][0]["prefetch"].is_null(), "{st}");
}
