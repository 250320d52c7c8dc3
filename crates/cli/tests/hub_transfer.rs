//! Transfers between a hub and its points end to end, with real `strata`
//! processes: big pulls and pushes while a `strata-netfault` proxy cuts every live
//! connection at random moments, the `--max-rate` cap, a hub over TLS, and hub and
//! point on two hosts (network namespaces joined by a veth pair).
//!
//! What is checked is what an operator relies on: the transfer completes, both
//! stores verify clean, the version is byte-identical on both sides (qemu-img
//! compare), and a cut costs at most what was in flight when it came (the `--json`
//! reports' body bytes, and the proxy's counts, against a clean transfer of the
//! same version).

mod common;
use common::hub::{
    fails, fails_in, json, json_in, make_mixed, make_raw, ok, ok_in, strata, wait_local, Agent,
    Env, Hub, HubOpts, MIB,
};
use common::{identical, make_pki, p, run_tool, Rng};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde_json::Value;
use strata_netfault::Proxy;

const GIB: u64 = 1 << 30;
/// Cuts each of the big transfers must survive.
const CUTS: u32 = 20;

/// What a cut can cost: the objects of the requests in flight. A transfer keeps
/// `streams` requests of `batch_bytes` (uncompressed) in flight — 4 × 8 MiB = 32 MiB
/// with the defaults the CLI uses (`ClientConfig::new`, `TransferOptions::default`).
/// Within a run, a request cut mid-stream keeps the objects that arrived whole and
/// asks for the rest; only when a request runs out of retries does the run fail
/// and drop its in-flight batches, which the next run fetches again. A push is
/// cheaper still (the hub keeps whatever arrived whole even of a cut body), but the
/// client counts as sent what it wrote to its sockets, and a cut discards what sat
/// in the socket buffers then.
fn in_flight_window() -> u64 {
    let streams = strata_sync::ClientConfig::new("http://127.0.0.1:1").streams as u64;
    let batch = strata_sync::TransferOptions::default().batch_bytes as u64;
    assert_eq!(
        (streams, batch),
        (4, 8 * MIB),
        "the defaults changed: update the comment"
    );
    streams * batch
}

/// A seed that differs from run to run, printed so that a failure can be replayed
/// (`STRATA_TEST_SEED=N`).
fn seed() -> u64 {
    let s = std::env::var("STRATA_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("cut seed {s} (replay with STRATA_TEST_SEED={s})");
    s
}

/// Cut every live connection of `proxy` `n` times at random moments of the
/// transfer, until `done`: each cut comes a random pause in `gap` (ms) after bytes
/// were last seen to resume moving, and only while they still move (a cut between
/// transfers, or while the client waits to retry, would test nothing). Returns when
/// the cuts were made (since the start).
fn cut_repeatedly(
    proxy: &Proxy,
    rng: &mut Rng,
    n: u32,
    gap: (u64, u64),
    done: &AtomicBool,
) -> Vec<Duration> {
    let t0 = Instant::now();
    let mut cuts = Vec::new();
    let moved = || proxy.bytes_to_client() + proxy.bytes_to_upstream();
    // Wait until bytes move (false: the transfer is over).
    let moving = || loop {
        if done.load(Ordering::SeqCst) {
            return false;
        }
        let before = moved();
        std::thread::sleep(Duration::from_millis(10));
        if moved() > before && proxy.live_connections() > 0 {
            return true;
        }
    };
    while cuts.len() < n as usize {
        if !moving() {
            break;
        }
        std::thread::sleep(Duration::from_millis(gap.0 + rng.below(gap.1 - gap.0 + 1)));
        if !moving() {
            break;
        }
        proxy.cut();
        cuts.push(t0.elapsed());
    }
    cuts
}

/// Random pauses between cuts so that `CUTS` of them spread over about
/// `active_secs` of transfer: uniform in [0.5, 1.5] × the mean gap.
fn gaps_for(active_secs: f64) -> (u64, u64) {
    let mean = (active_secs * 1000.0 / (CUTS as f64 + 1.0)).max(40.0) as u64;
    (mean / 2, mean * 3 / 2)
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

fn verify_clean(store: &Path) {
    let v = json(Some(store), &["verify"]);
    assert_eq!(v["ok"], true, "{} does not verify: {v:#}", store.display());
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / MIB as f64)
}

#[test]
fn pull_of_1gib_survives_20_cuts_resending_at_most_the_window_per_cut() {
    let t0 = Instant::now();
    let env = Env::new();
    let img = env.path("gold.raw");
    let (random, text) = make_mixed(&img, 0, GIB, 11);
    env.seed_hub(&img, "gold");
    std::fs::remove_file(&img).unwrap();
    let hub = Hub::start(&env.hub_dir(), 0);
    let hub_id = json(Some(&env.hub_store()), &["show", "gold@main"])["id"].clone();
    let proxy = Proxy::start(hub.addr()).unwrap();
    let url = format!("http://{}", proxy.addr());
    eprintln!(
        "setup {:?}: 1 GiB image, {} random, {} text",
        t0.elapsed(),
        mib(random),
        mib(text)
    );

    // A clean pull of the same version through the same proxy: the payload.
    let clean = env.point("clean", &url);
    env.admin(&["grant", "clean", "gold"]);
    let (down0, t1) = (proxy.bytes_to_client(), Instant::now());
    let base = json(Some(&clean), &["point", "pull", "gold"]);
    let clean_secs = t1.elapsed().as_secs_f64();
    let clean_proxy = proxy.bytes_to_client() - down0;
    let clean_wire = u(&base["wire_received"]);
    assert_eq!(base["attempts"], 1, "{base}");
    assert!(clean_wire >= random, "{base}");
    eprintln!(
        "clean pull in {clean_secs:.1} s: {} bodies, {} through the proxy",
        mib(clean_wire),
        mib(clean_proxy)
    );
    std::fs::remove_dir_all(&clean).unwrap();

    // The same pull while the link is cut 20 times. The proxy's cap stretches it to
    // at least 7 s of transfer, over which the cuts are spread (on a slower machine
    // the pull takes longer and the cuts come in its first part).
    let rate = 48 * MIB;
    let gap = gaps_for(clean_wire as f64 / rate as f64);
    proxy.set_rate(rate);
    let pt = env.point("flaky", &url);
    env.admin(&["grant", "flaky", "gold"]);
    let mut rng = Rng::new(seed());
    let down1 = proxy.bytes_to_client();
    let t2 = Instant::now();
    let child = common::hub::command_in(None)
        .arg("--store")
        .arg(&pt)
        .args(["--json", "point", "pull", "gold", "--attempts", "30"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let done = AtomicBool::new(false);
    let (out, cuts) = std::thread::scope(|s| {
        let cutter = s.spawn(|| cut_repeatedly(&proxy, &mut rng, CUTS, gap, &done));
        let out = child.wait_with_output().unwrap();
        done.store(true, Ordering::SeqCst);
        (out, cutter.join().unwrap())
    });
    let flaky_proxy = proxy.bytes_to_client() - down1;
    assert!(
        out.status.success(),
        "pull after {} cuts: {}",
        cuts.len(),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!(
        "pull with cuts at {cuts:?} (gaps {gap:?} ms) took {:?}: {} attempts, {} retries",
        t2.elapsed(),
        r["attempts"],
        r["retries"]
    );
    assert_eq!(
        cuts.len(),
        CUTS as usize,
        "the pull ended after {} cuts",
        cuts.len()
    );
    assert_eq!(r["version"], hub_id, "{r}");

    let wire = u(&r["wire_received"]);
    let window = in_flight_window();
    let (resent_wire, resent_proxy) = (
        wire.saturating_sub(clean_wire),
        flaky_proxy.saturating_sub(clean_proxy),
    );
    eprintln!(
        "resent over {CUTS} cuts: {} of bodies ({} through the proxy); bound {CUTS} × {} = {}",
        mib(resent_wire),
        mib(resent_proxy),
        mib(window),
        mib(CUTS as u64 * window)
    );
    assert!(resent_wire <= CUTS as u64 * window, "{r}");
    assert!(resent_proxy <= CUTS as u64 * window);

    verify_clean(&pt);
    let copy = env.path("pulled.raw");
    ok(Some(&pt), &["export", "gold@main", p(&copy)]);
    let hub_copy = env.hub_export("gold@main", "hub-gold.raw");
    assert!(identical(p(&copy), "raw", p(&hub_copy), "raw"));
    eprintln!("total {:?}", t0.elapsed());
}

/// `strata --json point sync` (through the agent); its report, whatever the exit.
fn sync_round(pt: &Path) -> Value {
    let out = strata(Some(pt), &["--json", "point", "sync"]);
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "point sync printed no report ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

#[test]
fn push_of_a_1gib_session_survives_20_cuts() {
    let t0 = Instant::now();
    let env = Env::new();
    // Gold: 1 GiB with 128 MiB of data at the start.
    let gold = env.path("gold.raw");
    make_mixed(&gold, 0, 128 * MIB, 21);
    std::fs::File::options()
        .write(true)
        .open(&gold)
        .unwrap()
        .set_len(GIB)
        .unwrap();
    env.seed_hub(&gold, "gold");
    let hub = Hub::start(&env.hub_dir(), 0);
    let proxy = Proxy::start(hub.addr()).unwrap();
    let pt = env.point("laptop", &format!("http://{}", proxy.addr()));
    env.admin(&["grant", "laptop", "gold"]);
    let att = json(
        Some(&pt),
        &["point", "attach", "gold@main", "--session", "vm1"],
    );
    let base = att["base"].as_str().unwrap().to_string();
    // No rounds of its own: this test drives them with `point sync`.
    let agent = Agent::spawn(None, &pt, &env.path("nbd.sock"), "1h", &[]);
    wait_local(&pt);

    // The VM writes 384 MiB of mixed data at 512 MiB; a reference copy gets the same.
    let changes = env.path("changes.bin");
    let (random, text) = make_mixed(&changes, 0, 384 * MIB, 22);
    run_tool(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            &format!("write -s {} 512M 384M", changes.display()),
            &agent.uri("vm1"),
        ],
    );
    std::fs::remove_file(&changes).unwrap();
    let reference = env.path("reference.raw");
    std::fs::rename(&gold, &reference).unwrap();
    make_mixed(&reference, 512 * MIB, 384 * MIB, 22);

    // Commit locally with the link down (commits come first; the push fails).
    // (Down refuses new connections; the cut ends the agent's pooled ones.)
    proxy.set_down(true);
    proxy.cut();
    let r = sync_round(&pt);
    assert_eq!(r["ok"], false, "{r}");
    let s = &r["sessions"][0];
    assert!(s["committed"].is_string(), "{r}");
    assert!(s["error"].is_string(), "{r}");
    proxy.set_down(false);
    eprintln!(
        "setup {:?}: {} random and {} text written, committed",
        t0.elapsed(),
        mib(random),
        mib(text)
    );

    // The payload: the same push over a clean link to a second hub holding exactly
    // what the first one holds (gold's version, pushed from the point's store).
    let clean_wire = {
        let hub2_dir = env.path("hub2");
        ok(None, &["hub", "init", p(&hub2_dir)]);
        let _hub2 = Hub::start(&hub2_dir, 0);
        ok(
            Some(&pt),
            &["branch", "add", &format!("vm1@{base}"), "goldbase"],
        );
        let push = |target: &str| {
            json(
                None,
                &[
                    "hub",
                    "push",
                    target,
                    "--from-store",
                    p(&pt),
                    "--dir",
                    p(&hub2_dir),
                ],
            )
        };
        push("vm1:goldbase");
        let t = Instant::now();
        let st = push("vm1:main");
        eprintln!("clean push in {:?}: {st}", t.elapsed());
        u(&st["wire_sent"])
    };
    assert!(clean_wire >= random, "{clean_wire}");

    // The push, cut 20 times; `point sync` again after a failed round.
    let rate = 16 * MIB;
    let gap = gaps_for(clean_wire as f64 / rate as f64);
    proxy.set_rate(rate);
    let mut rng = Rng::new(seed());
    let up0 = proxy.bytes_to_upstream();
    let t1 = Instant::now();
    let done = AtomicBool::new(false);
    let (rounds, cuts) = std::thread::scope(|s| {
        let cutter = s.spawn(|| cut_repeatedly(&proxy, &mut rng, CUTS, gap, &done));
        let mut rounds = Vec::new();
        loop {
            let r = sync_round(&pt);
            let finished = r["ok"] == true;
            rounds.push(r);
            if finished || rounds.len() >= 40 {
                break;
            }
        }
        done.store(true, Ordering::SeqCst);
        (rounds, cutter.join().unwrap())
    });
    let sent_proxy = proxy.bytes_to_upstream() - up0;
    let last = rounds.last().unwrap();
    assert_eq!(last["ok"], true, "no round succeeded: {rounds:#?}");
    eprintln!(
        "push with cuts at {cuts:?} (gaps {gap:?} ms) took {:?} in {} rounds; errors: {:?}",
        t1.elapsed(),
        rounds.len(),
        rounds
            .iter()
            .filter_map(|r| r["sessions"][0]["error"].as_str())
            .collect::<Vec<_>>()
    );
    assert_eq!(cuts.len(), CUTS as usize, "the push ended first");
    let hub_tip = last["sessions"][0]["hub_tip"].clone();
    let local = json(Some(&pt), &["show", "vm1@main"])["id"].clone();
    assert_eq!(hub_tip, local, "{last}");

    let sent: u64 = rounds.iter().map(|r| u(&r["wire_sent"])).sum();
    let window = in_flight_window();
    let resent = sent.saturating_sub(clean_wire);
    eprintln!(
        "sent {} in bodies ({} through the proxy) for a payload of {}: resent {}; bound {CUTS} × {} = {}",
        mib(sent),
        mib(sent_proxy),
        mib(clean_wire),
        mib(resent),
        mib(window),
        mib(CUTS as u64 * window)
    );
    assert!(resent <= CUTS as u64 * window);
    assert!(sent_proxy.saturating_sub(clean_wire) <= CUTS as u64 * window);

    verify_clean(&env.hub_store());
    let hub_copy = env.hub_export("vm1@main", "hub-vm1.raw");
    assert!(identical(p(&hub_copy), "raw", p(&reference), "raw"));
    drop(agent);
    eprintln!("total {:?}", t0.elapsed());
}

#[test]
fn max_rate_caps_a_pull_end_to_end() {
    let env = Env::new();
    let hub = Hub::start(&env.hub_dir(), 0);
    let proxy = Proxy::start(hub.addr()).unwrap();
    let img = env.path("gold.raw");
    make_raw(&img, 16 * MIB, &[(0, 8 * MIB)], 31);
    env.publish(&img, "gold");
    let rate = 2 * MIB;
    let pt = env.point_with(
        "slow",
        &format!("http://{}", proxy.addr()),
        &["--max-rate", "2M"],
    );
    env.admin(&["grant", "slow", "gold"]);
    assert_eq!(u(&json(Some(&pt), &["point", "status"])["max_rate"]), rate);

    let down0 = proxy.bytes_to_client();
    let t = Instant::now();
    let r = json(Some(&pt), &["point", "pull", "gold"]);
    let wall = t.elapsed().as_secs_f64();
    let seen = proxy.bytes_to_client() - down0;
    let wire = u(&r["wire_received"]);
    let secs = r["seconds"].as_f64().unwrap();
    eprintln!("{wire} bytes of bodies ({seen} through the proxy) in {secs:.2} s ({wall:.2} s wall) at a cap of {rate} B/s");
    // 8 MiB of random data crossed the proxy; beyond the bodies only HTTP headers.
    assert!(wire >= 8 * MIB, "{r}");
    assert!(seen >= wire && seen < wire + 64 * 1024, "{seen} vs {wire}");
    // A lower bound only (a check of the cap, not of speed): the limiter lets a
    // quarter of a second's worth through at once (its burst), the rest at the rate.
    let burst = rate as f64 / 4.0;
    let min = (wire as f64 - burst) / rate as f64;
    assert!(
        secs >= min,
        "{secs:.3} s < {min:.3} s: the cap let more through"
    );
    assert!(wall >= min);
    let copy = env.path("pulled.raw");
    ok(Some(&pt), &["export", "gold@main", p(&copy)]);
    assert!(identical(p(&copy), "raw", p(&img), "raw"));
}

#[test]
fn tls_hub_serves_pull_attach_and_sync_and_plain_http_is_refused() {
    let mut env = Env::new();
    let pki = make_pki(&env.path("pki"), &["127.0.0.1"]);
    let hub = Hub::start_opts(
        &env.hub_dir(),
        HubOpts {
            extra: &["--tls-cert", p(&pki.cert), "--tls-key", p(&pki.key)],
            ..HubOpts::default()
        },
    );
    assert!(hub.url().starts_with("https://127.0.0.1:"), "{}", hub.url());
    env.ca = Some(pki.ca.clone());
    let gold = env.path("gold.raw");
    make_raw(&gold, 16 * MIB, &[(0, 4 * MIB), (12 * MIB, 2 * MIB)], 41);
    env.publish(&gold, "gold");
    let tools = env.path("tools.raw");
    make_raw(&tools, 16 * MIB, &[(MIB, 6 * MIB)], 42);
    env.publish(&tools, "tools");

    // A point that does not trust the hub's CA: refused, nothing left behind.
    let token = env.admin(&["enroll", "stranger"]);
    let stranger = env.path("stranger");
    let err = fails(
        Some(&stranger),
        &["point", "enroll", &hub.url(), token.trim()],
    );
    assert!(err.contains("certificate"), "{err}");
    assert!(!stranger.join("point.json").exists());
    // Plain HTTP to the TLS port: a clear error, not a hang.
    let plain = hub.url().replace("https://", "http://");
    let err = fails(
        Some(&stranger),
        &["point", "enroll", &plain, token.trim(), "--ca", p(&pki.ca)],
    );
    assert!(err.contains("speaks HTTPS only"), "{err}");
    assert!(!stranger.join("point.json").exists());

    let pt = env.point("laptop", &hub.url());
    let cfg: Value =
        serde_json::from_slice(&std::fs::read(pt.join("point.json")).unwrap()).unwrap();
    assert!(cfg["ca_file"].as_str().unwrap().starts_with('/'), "{cfg}");
    env.admin(&["grant", "laptop", "gold"]);
    env.admin(&["grant", "laptop", "tools"]);

    // Pull over TLS.
    let r = json(Some(&pt), &["point", "pull", "tools"]);
    assert!(u(&r["wire_received"]) >= 6 * MIB, "{r}");
    let copy = env.path("tools-pulled.raw");
    ok(Some(&pt), &["export", "tools@main", p(&copy)]);
    assert!(identical(p(&copy), "raw", p(&tools), "raw"));

    // Attach: the base streams over TLS while the session is read.
    let a = json(
        Some(&pt),
        &["point", "attach", "gold@main", "--session", "vm1"],
    );
    assert!(a["streaming"].is_object(), "{a}");
    let agent = Agent::start(&pt, &env.path("nbd.sock"));
    let uri = agent.uri("vm1");
    assert!(identical(&uri, "raw", p(&gold), "raw"));
    wait_local(&pt);

    // Sync over TLS: the hub ends up with what the VM wrote.
    let reference = env.path("reference.raw");
    std::fs::copy(&gold, &reference).unwrap();
    let writes = ["write -P 0x7e 2M 1M", "write -z 13M 512k"];
    for w in writes {
        run_tool("qemu-io", &["-f", "raw", "-c", w, &uri]);
        run_tool("qemu-io", &["-f", "raw", "-c", w, p(&reference)]);
    }
    let r = json(Some(&pt), &["point", "sync"]);
    assert_eq!(r["ok"], true, "{r}");
    let hub_vm1 = env.hub_export("vm1@main", "hub-vm1.raw");
    assert!(identical(p(&hub_vm1), "raw", p(&reference), "raw"));
    drop(agent);
}

#[test]
fn hub_refuses_plain_http_on_a_non_loopback_address() {
    let env = Env::new();
    for listen in ["0.0.0.0:0", "[::]:0"] {
        let err = fails(None, &["hub", "run", p(&env.hub_dir()), "--listen", listen]);
        assert!(
            err.contains("refusing to serve plain HTTP") && err.contains("not a loopback"),
            "{listen}: {err}"
        );
        assert!(err.contains("insecure"), "says how to insist: {err}");
    }
    // Nothing was written: no URL for operators to find.
    assert!(!env.hub_dir().join("hub.url").exists());
}

/// Two network namespaces joined by a veth pair: the hub's host (10.77.0.1) and
/// the point's (10.77.0.2). Removed when dropped, whatever happened.
struct Netns {
    hub: String,
    point: String,
    veth: String,
}

const HUB_IP: &str = "10.77.0.1";
const POINT_IP: &str = "10.77.0.2";

impl Netns {
    fn new() -> Netns {
        let id = std::process::id();
        // The guard exists before anything is made, so a failure half-way is undone.
        let ns = Netns {
            hub: format!("strata-hub-{id}"),
            point: format!("strata-point-{id}"),
            veth: format!("sth{id}"),
        };
        let peer = format!("stp{id}");
        let ip = |args: &[&str]| {
            let out = Command::new("ip")
                .args(args)
                .output()
                .unwrap_or_else(|e| panic!("cannot run ip (scripts/test installs iproute2): {e}"));
            assert!(
                out.status.success(),
                "ip {args:?} (the tests run as root): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        };
        ip(&["netns", "add", &ns.hub]);
        ip(&["netns", "add", &ns.point]);
        ip(&[
            "link", "add", &ns.veth, "type", "veth", "peer", "name", &peer,
        ]);
        ip(&["link", "set", &ns.veth, "netns", &ns.hub]);
        ip(&["link", "set", &peer, "netns", &ns.point]);
        for (n, dev, addr) in [(&ns.hub, &ns.veth, HUB_IP), (&ns.point, &peer, POINT_IP)] {
            ip(&["-n", n, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", n, "link", "set", dev, "up"]);
            ip(&["-n", n, "link", "set", "lo", "up"]);
        }
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end in it, and with it the pair.
        for n in [&self.hub, &self.point] {
            let _ = Command::new("ip").args(["netns", "del", n]).output();
        }
        // Still in this namespace if setup failed before moving it.
        let _ = Command::new("ip")
            .args(["link", "del", &self.veth])
            .stderr(Stdio::null())
            .output();
    }
}

#[test]
fn hub_and_point_on_two_hosts_pull_and_sync_across_a_veth_link() {
    // First, so it is dropped last: after the processes in the namespaces.
    let ns = Netns::new();
    let mut env = Env::new();
    env.hub_ns = Some(ns.hub.clone());
    env.point_ns = Some(ns.point.clone());
    let (hub_ns, point_ns) = (Some(ns.hub.as_str()), Some(ns.point.as_str()));
    let gold = env.path("gold.raw");
    make_mixed(&gold, 0, 32 * MIB, 51);
    env.seed_hub(&gold, "gold");

    // Plain HTTP on the host's address only when the operator insists.
    let listen = format!("{HUB_IP}:0");
    let err = fails_in(
        hub_ns,
        None,
        &["hub", "run", p(&env.hub_dir()), "--listen", &listen],
    );
    assert!(err.contains("refusing to serve plain HTTP"), "{err}");
    let hub = Hub::start_opts(
        &env.hub_dir(),
        HubOpts {
            netns: hub_ns,
            listen: Some(&listen),
            extra: &["--insecure"],
        },
    );
    assert_eq!(hub.url(), format!("http://{HUB_IP}:{}", hub.port));

    let pt = env.point("branch-office", &hub.url());
    env.admin(&["grant", "branch-office", "gold"]);
    let r = json_in(point_ns, Some(&pt), &["point", "pull", "gold"]);
    assert!(u(&r["wire_received"]) > 4 * MIB, "{r}");
    let copy = env.path("pulled.raw");
    ok(Some(&pt), &["export", "gold@main", p(&copy)]);
    assert!(identical(p(&copy), "raw", p(&gold), "raw"));

    // A session over the pulled version, served by the agent on the point's host.
    json_in(
        point_ns,
        Some(&pt),
        &["point", "attach", "gold@main", "--session", "vm1"],
    );
    let agent = Agent::spawn(point_ns, &pt, &env.path("nbd.sock"), "1h", &[]);
    let uri = agent.uri("vm1");
    let reference = env.path("reference.raw");
    std::fs::copy(&gold, &reference).unwrap();
    for w in [
        "write -P 0x42 1M 3M",
        "write -z 20M 1M",
        "write -P 7 31M 64k",
    ] {
        run_tool("qemu-io", &["-f", "raw", "-c", w, &uri]);
        run_tool("qemu-io", &["-f", "raw", "-c", w, p(&reference)]);
    }
    let r = json_in(point_ns, Some(&pt), &["point", "sync"]);
    assert_eq!(r["ok"], true, "{r}");
    assert!(r["sessions"][0]["pushed"].is_object(), "{r}");
    let st = json_in(point_ns, Some(&pt), &["point", "status"]);
    assert_eq!(st["hub_reachable"], true, "{st}");
    assert_eq!(st["sessions"][0]["pending_versions"], 0, "{st}");
    let hub_vm1 = env.hub_export("vm1@main", "hub-vm1.raw");
    assert!(identical(p(&hub_vm1), "raw", p(&reference), "raw"));
    // The audit log names the point's upload, made from the other host.
    let audit = ok_in(hub_ns, None, &["hub", "audit", "--dir", p(&env.hub_dir())]);
    assert!(audit.contains("branch-office"), "{audit}");
    drop(agent);
    drop(hub);
}

/// A self-signed certificate as one `openssl req -x509` command makes it: marked
/// CA:TRUE, its own issuer.
fn self_signed(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}-key.pem")),
    );
    run_tool(
        "openssl",
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            p(&key),
            "-out",
            p(&cert),
            "-days",
            "2",
            "-subj",
            "/CN=hub",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
        ],
    );
    (cert, key)
}

#[test]
fn a_self_signed_hub_certificate_is_trusted_when_it_is_the_one_named() {
    let mut env = Env::new();
    let (cert, key) = self_signed(&env.path("pki"), "hub");
    let hub = Hub::start_opts(
        &env.hub_dir(),
        HubOpts {
            extra: &["--tls-cert", p(&cert), "--tls-key", p(&key)],
            ..HubOpts::default()
        },
    );
    env.ca = Some(cert.clone());
    let gold = env.path("gold.raw");
    make_raw(&gold, 8 * MIB, &[(0, 3 * MIB)], 43);
    env.publish(&gold, "gold");

    // Another certificate of the same name and form is not this one: refused.
    let (other, _) = self_signed(&env.path("pki"), "other");
    let token = env.admin(&["enroll", "stranger"]);
    let stranger = env.path("stranger");
    let err = fails(
        Some(&stranger),
        &[
            "point",
            "enroll",
            &hub.url(),
            token.trim(),
            "--ca",
            p(&other),
        ],
    );
    assert!(err.contains("certificate"), "{err}");
    assert!(!stranger.join("point.json").exists());

    // The hub's own certificate is trusted: enrol and pull over TLS.
    let pt = env.point("laptop", &hub.url());
    env.admin(&["grant", "laptop", "gold"]);
    json(Some(&pt), &["point", "pull", "gold"]);
    let copy = env.path("pulled.raw");
    ok(Some(&pt), &["export", "gold@main", p(&copy)]);
    assert!(identical(p(&copy), "raw", p(&gold), "raw"));
}

#[test]
fn hub_gc_runs_beside_a_running_hub_and_drops_indexes_of_removed_versions() {
    let env = Env::new();
    let hub = Hub::start_opts(&env.hub_dir(), HubOpts::default());
    let gold = env.path("gold.raw");
    make_raw(&gold, 8 * MIB, &[(0, 3 * MIB)], 44);
    env.publish(&gold, "gold");
    let pt = env.point("laptop", &hub.url());
    env.admin(&["grant", "laptop", "gold"]);
    // An index file of a version the hub does not have, and one of a version it has.
    let v = json(Some(&pt), &["point", "pull", "gold"])["version"]
        .as_str()
        .unwrap()
        .to_string();
    let index_dir = env.hub_dir().join("page-index");
    std::fs::create_dir_all(&index_dir).unwrap();
    let (gone, kept) = (
        index_dir.join(format!("{}.idx", "ab".repeat(32))),
        index_dir.join(format!("{v}.idx")),
    );
    std::fs::write(&gone, b"x").unwrap();
    std::fs::write(&kept, b"x").unwrap();

    let r = json_in(None, None, &["hub", "gc", p(&env.hub_dir())]);
    assert_eq!(r["page_indexes_removed"], 1, "{r}");
    assert_eq!(r["deleted_versions"], 0, "{r}");
    assert!(!gone.exists() && kept.exists());
    // The hub serves on, its data intact.
    ok(Some(&pt), &["point", "pull", "gold"]);
    ok_in(None, Some(&env.hub_store()), &["verify"]);
    let text = ok_in(None, None, &["hub", "gc", p(&env.hub_dir())]);
    assert!(
        text.contains("0 page indexes of removed versions dropped"),
        "{text}"
    );
    // Not a hub directory: a clear error.
    let err = fails(None, &["hub", "gc", p(&env.path("nowhere"))]);
    assert!(err.contains("not a hub directory"), "{err}");
}
