//! Fixtures for hub and point tests with real processes (`hub_point.rs`,
//! `hub_transfer.rs`): one copy of how to start `strata hub run` and
//! `strata point run`, enrol points, publish images, and make test content and TLS
//! certificates.
//!
//! * [`strata`], [`ok`], [`json`], [`fails`]: run the binary with an optional
//!   `--store`, outside any network namespace; the `*_in` forms take a namespace
//!   (`ip netns exec NS strata ...`), for the tests that put hub and point on two
//!   hosts joined by a veth pair.
//! * [`Hub`], [`Agent`]: the long-running processes, killed when dropped.
//! * [`Env`]: a hub directory, an operator's store and room for points, with the
//!   operator's commands (`publish`, `admin`, `point`, `hub_export`).
//! * [`make_raw`], [`make_mixed`]: image content (a CA and server certificate for
//!   an https hub: [`super::make_pki`]).

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::{bin, describe, p, spawn_announcing, text_bytes, Rng};

pub const MIB: u64 = 1 << 20;

/// A `strata` command, inside network namespace `ns` when given. No store or hub
/// comes from the environment of whoever runs the tests.
pub fn command_in(ns: Option<&str>) -> Command {
    let mut c = match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns, bin()]);
            c
        }
        None => Command::new(bin()),
    };
    c.env_remove("STRATA_STORE")
        .env_remove("STRATA_HUB")
        .env_remove("STRATA_HUB_DIR")
        .env_remove("STRATA_LOG");
    c
}

/// `strata [--store STORE] ARGS` in namespace `ns`.
pub fn strata_in(ns: Option<&str>, store: Option<&Path>, args: &[&str]) -> Output {
    let mut c = command_in(ns);
    if let Some(s) = store {
        c.arg("--store").arg(s);
    }
    c.args(args).output().unwrap()
}

pub fn ok_in(ns: Option<&str>, store: Option<&Path>, args: &[&str]) -> String {
    let out = strata_in(ns, store, args);
    assert!(out.status.success(), "{}", describe("strata", args, &out));
    String::from_utf8(out.stdout).unwrap()
}

pub fn json_in(ns: Option<&str>, store: Option<&Path>, args: &[&str]) -> Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let s = ok_in(ns, store, &full);
    serde_json::from_str(&s).unwrap_or_else(|e| panic!("{full:?}: bad JSON ({e}): {s}"))
}

/// Run `strata ARGS` in `ns`, expect a clean failure (not a panic), return stderr.
pub fn fails_in(ns: Option<&str>, store: Option<&Path>, args: &[&str]) -> String {
    let out = strata_in(ns, store, args);
    assert!(
        !out.status.success() && out.status.code() != Some(101),
        "expected a clean failure: {}",
        describe("strata", args, &out)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `strata [--store STORE] ARGS`.
pub fn strata(store: Option<&Path>, args: &[&str]) -> Output {
    strata_in(None, store, args)
}

pub fn ok(store: Option<&Path>, args: &[&str]) -> String {
    ok_in(None, store, args)
}

pub fn json(store: Option<&Path>, args: &[&str]) -> Value {
    json_in(None, store, args)
}

pub fn fails(store: Option<&Path>, args: &[&str]) -> String {
    fails_in(None, store, args)
}

/// A raw image of `size` bytes: random data in `ranges` (offset, len), holes
/// elsewhere.
pub fn make_raw(path: &Path, size: u64, ranges: &[(u64, u64)], seed: u64) {
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut rng = Rng::new(seed);
    for &(off, len) in ranges {
        let mut buf = vec![0u8; len as usize];
        rng.fill(&mut buf);
        f.write_all_at(&buf, off).unwrap();
    }
}

/// Block size of the content [`make_mixed`] writes (the stores' default block size).
pub const MIXED_BLOCK: u64 = 64 << 10;

/// Write disk-like content into `[offset, offset + len)` of `path` (created if
/// missing, never truncated; holes stay holes): per 64 KiB block, 30 % random
/// (incompressible), 30 % zeros (left as they are), 20 % copies of one of 16 random
/// blocks (deduplicated), 20 % text (compresses about 4:1, unique per block). Real
/// disks mix these; all-random data would only make the tests slower without
/// exercising anything more. Returns the bytes of random and text blocks written.
pub fn make_mixed(path: &Path, offset: u64, len: u64, seed: u64) -> (u64, u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap();
    if f.metadata().unwrap().len() < offset + len {
        f.set_len(offset + len).unwrap();
    }
    let bs = MIXED_BLOCK as usize;
    let mut rng = Rng::new(seed);
    let repeated: Vec<Vec<u8>> = (0..16)
        .map(|_| {
            let mut b = vec![0u8; bs];
            rng.fill(&mut b);
            b
        })
        .collect();
    let mut buf = vec![0u8; bs];
    let (mut random, mut text) = (0, 0);
    for i in 0..len / MIXED_BLOCK {
        let at = offset + i * MIXED_BLOCK;
        match rng.below(10) {
            0..=2 => {
                rng.fill(&mut buf);
                f.write_all_at(&buf, at).unwrap();
                random += MIXED_BLOCK;
            }
            3..=5 => {}
            6 | 7 => {
                let b = &repeated[rng.below(16) as usize];
                f.write_all_at(b, at).unwrap();
            }
            _ => {
                f.write_all_at(&text_bytes(bs, rng.next_u64()), at).unwrap();
                text += MIXED_BLOCK;
            }
        }
    }
    (random, text)
}

/// A running `strata hub run`; killed (SIGKILL) when dropped.
pub struct Hub {
    child: Child,
    /// The port it listens on.
    pub port: u16,
    /// Its URL as it printed it (`http://…` or `https://…`).
    url: String,
    listen: String,
}

/// How to start a [`Hub`].
#[derive(Default)]
pub struct HubOpts<'a> {
    /// Network namespace to run it in.
    pub netns: Option<&'a str>,
    /// Address to listen on (default 127.0.0.1:0).
    pub listen: Option<&'a str>,
    /// More arguments of `hub run` (`--tls-cert`, `--insecure`, ...).
    pub extra: &'a [&'a str],
}

impl Hub {
    /// Start the hub in `dir` on 127.0.0.1:`port` (0: any free port).
    pub fn start(dir: &Path, port: u16) -> Hub {
        let listen = format!("127.0.0.1:{port}");
        Hub::start_opts(
            dir,
            HubOpts {
                listen: Some(&listen),
                ..HubOpts::default()
            },
        )
    }

    pub fn start_opts(dir: &Path, opts: HubOpts) -> Hub {
        let listen = opts.listen.unwrap_or("127.0.0.1:0");
        let (child, mut lines) = spawn_announcing(
            command_in(opts.netns)
                .args(["--json", "hub", "run", p(dir), "--listen", listen])
                .args(opts.extra),
            1,
        );
        let line = lines.remove(0);
        let v: Value =
            serde_json::from_str(&line).unwrap_or_else(|e| panic!("hub run printed {line:?}: {e}"));
        let listen = v["listen"].as_str().unwrap().to_string();
        let port = listen
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap();
        Hub {
            child,
            port,
            url: v["url"].as_str().unwrap().to_string(),
            listen,
        }
    }

    pub fn url(&self) -> String {
        self.url.clone()
    }

    pub fn addr(&self) -> std::net::SocketAddr {
        self.listen.parse().unwrap()
    }

    pub fn kill9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Hub {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A running `strata point run` serving on a Unix socket; killed when dropped.
pub struct Agent {
    child: Child,
    sock: PathBuf,
}

impl Agent {
    pub fn start(store: &Path, sock: &Path) -> Agent {
        Agent::start_with(store, sock, &[])
    }

    /// With a sync round every second, and `extra` arguments of `point run`.
    pub fn start_with(store: &Path, sock: &Path, extra: &[&str]) -> Agent {
        Agent::spawn(None, store, sock, "1s", extra)
    }

    /// In namespace `ns`, with sync rounds every `interval`.
    pub fn spawn(
        ns: Option<&str>,
        store: &Path,
        sock: &Path,
        interval: &str,
        extra: &[&str],
    ) -> Agent {
        let (child, lines) = spawn_announcing(
            command_in(ns)
                .arg("--store")
                .arg(store)
                .args(["point", "run", "--sync-interval", interval])
                .args(["--socket", p(sock)])
                .args(extra),
            1,
        );
        assert!(lines[0].contains("serving"), "point run printed {lines:?}");
        Agent {
            child,
            sock: sock.to_path_buf(),
        }
    }

    pub fn uri(&self, export: &str) -> String {
        format!("nbd+unix:///{export}?socket={}", self.sock.display())
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Wait until the streamed base of the point's first session is local (status
/// shows no prefetch any more). Gives up after two minutes (a hang, not a slow run).
pub fn wait_local(pt: &Path) -> Value {
    wait_local_in(None, pt)
}

pub fn wait_local_in(ns: Option<&str>, pt: &Path) -> Value {
    wait_status(ns, pt, |st| st["sessions"][0]["prefetch"].is_null())
}

/// Wait until no session of the point is still streaming its base.
pub fn wait_all_local(pt: &Path) -> Value {
    wait_status(None, pt, |st| {
        st["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["prefetch"].is_null())
    })
}

/// `point status` once `done` holds of it (the prefetch is asynchronous; the
/// two-minute deadline only turns a hang into a failure).
fn wait_status(ns: Option<&str>, pt: &Path, done: impl Fn(&Value) -> bool) -> Value {
    let t0 = Instant::now();
    loop {
        let st = json_in(ns, Some(pt), &["point", "status"]);
        if done(&st) {
            return st;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "prefetch never ended: {st}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Run qemu-io with `cmds` on `uri`; true if every command succeeded.
pub fn qemu_io_ok(uri: &str, cmds: &[&str]) -> (bool, String) {
    let mut args = vec!["-f", "raw"];
    for c in cmds {
        args.extend_from_slice(&["-c", c]);
    }
    args.push(uri);
    let out = Command::new("qemu-io").args(&args).output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success() && !text.contains("failed"), text)
}

/// qemu-io with `cmds` on `uri` must succeed.
pub fn qemu_io_assert(uri: &str, cmds: &[&str]) {
    let (ok, out) = qemu_io_ok(uri, cmds);
    assert!(ok, "qemu-io {cmds:?} on {uri}: {out}");
}

/// `point desktop start NAME` on the point whose store is `pt`, serving on `sock`.
pub fn desktop_start(pt: &Path, name: &str, sock: &Path) -> Value {
    json(
        Some(pt),
        &["point", "desktop", "start", name, "--socket", p(sock)],
    )
}

/// A hub directory, a source store for the operator, and room for points.
pub struct Env {
    dir: tempfile::TempDir,
    /// The CA certificate operators and points trust (for an https hub).
    pub ca: Option<PathBuf>,
    /// Namespaces the hub (and its operator) and the points run in.
    pub hub_ns: Option<String>,
    pub point_ns: Option<String>,
}

impl Default for Env {
    fn default() -> Self {
        Env::new()
    }
}

impl Env {
    pub fn new() -> Env {
        let env = Env {
            dir: tempfile::Builder::new()
                .prefix("strata-hub-point-")
                .tempdir()
                .unwrap(),
            ca: None,
            hub_ns: None,
            point_ns: None,
        };
        ok(None, &["hub", "init", p(&env.hub_dir())]);
        ok(None, &["init", p(&env.src())]);
        env
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn hub_dir(&self) -> PathBuf {
        self.path("hub")
    }

    pub fn hub_store(&self) -> PathBuf {
        self.hub_dir().join("store")
    }

    pub fn src(&self) -> PathBuf {
        self.path("src")
    }

    /// Import `file` straight into the hub's store as `image` (only while no hub
    /// runs): what an operator does before starting a hub, and much cheaper for
    /// big images than an upload.
    pub fn seed_hub(&self, file: &Path, image: &str) {
        ok(Some(&self.hub_store()), &["import", p(file), image]);
    }

    /// Import `file` into the operator's store and push it to the running hub.
    pub fn publish(&self, file: &Path, image: &str) -> Value {
        ok(Some(&self.src()), &["import", p(file), image]);
        let src = self.src();
        self.admin_json(&["push", image, "--from-store", p(&src)])
    }

    fn admin_args<'a>(&'a self, args: &[&'a str], d: &'a Path) -> Vec<&'a str> {
        let mut full: Vec<&str> = vec!["hub"];
        full.extend_from_slice(&self.operator_args(args, d));
        full
    }

    /// `args --dir HUB_DIR [--ca CA]`: an operator command outside `strata hub`
    /// (`channel`, `desktop`).
    fn operator_args<'a>(&'a self, args: &[&'a str], d: &'a Path) -> Vec<&'a str> {
        let mut full: Vec<&str> = args.to_vec();
        full.extend_from_slice(&["--dir", p(d)]);
        if let Some(ca) = &self.ca {
            full.extend_from_slice(&["--ca", p(ca)]);
        }
        full
    }

    /// Operator command against the running hub.
    pub fn admin(&self, args: &[&str]) -> String {
        let d = self.hub_dir();
        ok_in(self.hub_ns.as_deref(), None, &self.admin_args(args, &d))
    }

    /// Operator command with `--json`.
    pub fn admin_json(&self, args: &[&str]) -> Value {
        let d = self.hub_dir();
        json_in(self.hub_ns.as_deref(), None, &self.admin_args(args, &d))
    }

    /// `strata channel ...` / `strata desktop ...` against the hub.
    pub fn operator(&self, args: &[&str]) -> String {
        let d = self.hub_dir();
        ok_in(self.hub_ns.as_deref(), None, &self.operator_args(args, &d))
    }

    /// The same with `--json`.
    pub fn operator_json(&self, args: &[&str]) -> Value {
        let d = self.hub_dir();
        json_in(self.hub_ns.as_deref(), None, &self.operator_args(args, &d))
    }

    /// `strata desktop create NAME --channel CHANNEL --size SIZE` (an empty user disk).
    pub fn create_desktop(&self, name: &str, channel: &str, size: &str) -> Value {
        self.operator_json(&[
            "desktop",
            "create",
            name,
            "--channel",
            channel,
            "--size",
            size,
        ])
    }

    /// Enrol a point called `name` whose store is `DIR/name`, talking to `url`.
    pub fn point(&self, name: &str, url: &str) -> PathBuf {
        self.point_with(name, url, &[])
    }

    /// Like [`Env::point`] with more `point enroll` arguments (`--max-rate`, ...).
    pub fn point_with(&self, name: &str, url: &str, extra: &[&str]) -> PathBuf {
        let token = self.admin(&["enroll", name]);
        let store = self.path(name);
        let mut args = vec![
            "point",
            "enroll",
            url,
            token.trim(),
            "--sync-interval",
            "1s",
        ];
        if let Some(ca) = &self.ca {
            args.extend_from_slice(&["--ca", p(ca)]);
        }
        args.extend_from_slice(extra);
        ok_in(self.point_ns.as_deref(), Some(&store), &args);
        store
    }

    /// Export `spec` from the hub's own store to a raw file.
    pub fn hub_export(&self, spec: &str, out: &str) -> PathBuf {
        let f = self.path(out);
        ok(Some(&self.hub_store()), &["export", spec, p(&f), "--force"]);
        f
    }
}
