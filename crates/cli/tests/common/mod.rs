//! Shared harness for the `strata` integration tests.
//!
//! * [`Store`]: a fresh store in a temporary directory (removed on drop), with helpers
//!   that run the real `strata` binary against it (`STRATA_STORE` set) and check the
//!   outcome: [`Store::run`], [`Store::ok`], [`Store::json`], [`Store::fails`].
//! * [`qemu_img`], [`qemu_io`], [`images_identical`], [`qemu_map`]: the machine's
//!   qemu tools, the ground truth images are checked against.
//! * [`Rng`], [`write_random`], [`write_text`]: deterministic content.
//! * [`pack_files`], [`pack_entries`]: find objects inside pack files (to damage them).
//! * [`hub`]: hub and point processes, operators' commands, mixed image content, TLS
//!   certificates (for the hub and point tests).
//!
//! Every test file includes this module with `mod common;` and uses a part of it.

#![allow(dead_code)]

pub mod hub;

use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;
use tempfile::TempDir;

/// Path of the `strata` binary under test.
pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_strata")
}

/// A path as a `&str` argument.
pub fn p(path: &Path) -> &str {
    path.to_str().expect("test paths are UTF-8")
}

/// What `program ARGS` did: its exit status and both outputs, for a failure message.
pub fn describe(program: &str, args: &[&str], out: &Output) -> String {
    format!(
        "{program} {args:?}: {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Run `strata ARGS` with no store configured: `STRATA_STORE` removed and
/// `XDG_DATA_HOME`/`HOME` pointed at `sandbox`, so the default store of whoever runs
/// the tests is never touched. For `init PATH`, `quickstart DIR` and `--store`.
pub fn strata_without_store(sandbox: &Path, args: &[&str]) -> Output {
    Command::new(bin())
        .args(args)
        .env_remove("STRATA_STORE")
        .env("XDG_DATA_HOME", sandbox)
        .env("HOME", sandbox)
        .env_remove("STRATA_LOG")
        .output()
        .expect("the strata binary runs")
}

/// Assert that `out` is a clean failure: a non-zero exit code (not a panic, not a
/// signal) and an `error: ...` line on stderr. Returns stderr.
pub fn assert_clean_failure(args: &[&str], out: &Output) -> String {
    let code = out.status.code();
    assert!(
        code.is_some() && code != Some(0),
        "expected a failure: {}",
        describe("strata", args, out)
    );
    assert_ne!(
        code,
        Some(101),
        "strata panicked instead of reporting an error: {}",
        describe("strata", args, out)
    );
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        stderr.contains("error:"),
        "no `error:` message: {}",
        describe("strata", args, out)
    );
    assert!(
        !stderr.contains("panicked"),
        "strata panicked: {}",
        describe("strata", args, out)
    );
    stderr
}

/// A store in a temporary directory, with a scratch area beside it.
pub struct Store {
    dir: TempDir,
    path: PathBuf,
}

impl Default for Store {
    fn default() -> Self {
        Store::new()
    }
}

impl Store {
    /// A new, initialised store at `TMP/store`; scratch files go in `TMP`.
    pub fn new() -> Store {
        let dir = tempfile::Builder::new()
            .prefix("strata-test-")
            .tempdir()
            .expect("create a temporary directory");
        let path = dir.path().join("store");
        let s = Store { dir, path };
        s.ok(&["init", p(&s.path)]);
        s
    }

    /// A new, initialised store at `path` (which must be missing or empty), with its
    /// own temporary scratch directory. The caller cleans up `path`.
    pub fn at(path: &Path) -> Store {
        let dir = tempfile::Builder::new()
            .prefix("strata-test-")
            .tempdir()
            .expect("create a temporary directory");
        let s = Store {
            dir,
            path: path.to_path_buf(),
        };
        s.ok(&["init", p(path)]);
        s
    }

    /// A `Store` handle for an existing path that is not initialised (to test how
    /// strata treats it); scratch files still go in a temporary directory.
    pub fn uninitialised(path: &Path) -> Store {
        let dir = tempfile::Builder::new()
            .prefix("strata-test-")
            .tempdir()
            .expect("create a temporary directory");
        Store {
            dir,
            path: path.to_path_buf(),
        }
    }

    /// The store directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The scratch directory (not inside the store).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `name` in the scratch directory.
    pub fn file(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// A `strata` command with `STRATA_STORE` set to this store.
    pub fn command(&self) -> Command {
        let mut c = Command::new(bin());
        c.env("STRATA_STORE", &self.path)
            .env("XDG_DATA_HOME", self.dir.path())
            .env("HOME", self.dir.path())
            .env_remove("STRATA_LOG");
        c
    }

    /// Run `strata ARGS` and return what happened.
    pub fn run(&self, args: &[&str]) -> Output {
        self.command()
            .args(args)
            .output()
            .expect("the strata binary runs")
    }

    /// Run `strata ARGS`, assert it succeeds, return its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(out.status.success(), "{}", describe("strata", args, &out));
        String::from_utf8(out.stdout).expect("stdout is UTF-8")
    }

    /// Run `strata --json ARGS`, assert it succeeds and prints exactly one JSON
    /// document on stdout, and return it.
    pub fn json(&self, args: &[&str]) -> Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let stdout = self.ok(&full);
        serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("strata {full:?} printed invalid JSON ({e}):\n{stdout}"))
    }

    /// Run `strata ARGS`, assert it fails cleanly (non-zero exit, `error:` on stderr,
    /// no panic) and return stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert_clean_failure(args, &out)
    }

    /// `strata import FILE TARGET [EXTRA...]` with `--json`; returns the report.
    pub fn import(&self, file: &Path, target: &str, extra: &[&str]) -> Value {
        let mut args = vec!["import", p(file), target];
        args.extend_from_slice(extra);
        self.json(&args)
    }

    /// `strata export SPEC FILE --format FMT --force`.
    pub fn export(&self, spec: &str, file: &Path, format: &str) -> Value {
        self.json(&["export", spec, p(file), "--format", format, "--force"])
    }

    /// Export `spec` as `format` into the scratch dir and check it against `original`
    /// with `qemu-img compare`.
    pub fn assert_exports_as(&self, spec: &str, format: &str, original: &Path) {
        let out = self.file(&format!(
            "export-{}.{format}",
            spec.replace(['/', '@', ':', '~'], "_")
        ));
        self.export(spec, &out, format);
        assert!(
            images_identical(original, &out),
            "{spec} exported as {format} differs from {}",
            original.display()
        );
        std::fs::remove_file(&out).unwrap();
    }

    /// The full id of `spec` (IMAGE@REV) according to `strata show`.
    pub fn version_id(&self, spec: &str) -> String {
        self.json(&["show", spec])["id"]
            .as_str()
            .expect("show prints an id")
            .to_string()
    }

    /// `strata stats --json`.
    pub fn stats(&self) -> Value {
        self.json(&["stats"])
    }

    /// Assert `strata verify` exits 0 and reports the store OK.
    pub fn verify_ok(&self) {
        let v = self.json(&["verify"]);
        assert_eq!(v["ok"], Value::Bool(true), "verify: {v:#}");
    }

    /// What a failed command must not change: images and refs, stats, the pack files
    /// present, and leftovers in `tmp/` and `sessions/`.
    pub fn snapshot(&self) -> Snapshot {
        let mut packs: Vec<String> = pack_files(&self.path)
            .iter()
            .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        packs.sort();
        Snapshot {
            images: self.json(&["images"]),
            stats: self.json(&["stats"]),
            packs,
            tmp_files: list_dir(&self.path.join("tmp")),
            session_files: list_dir(&self.path.join("sessions")),
        }
    }

    /// Assert the store is as it was at `before` and verifies clean.
    pub fn assert_unchanged(&self, before: &Snapshot) {
        let now = self.snapshot();
        assert_eq!(before.images, now.images, "images changed");
        assert_eq!(before.stats, now.stats, "stats changed");
        assert_eq!(before.packs, now.packs, "pack files changed");
        assert_eq!(now.tmp_files, Vec::<String>::new(), "left files in tmp/");
        assert_eq!(
            now.session_files,
            Vec::<String>::new(),
            "left session files"
        );
        self.verify_ok();
    }
}

/// See [`Store::snapshot`].
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    pub images: Value,
    pub stats: Value,
    pub packs: Vec<String>,
    pub tmp_files: Vec<String>,
    pub session_files: Vec<String>,
}

fn list_dir(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

/// Start `cmd` with stdout piped (stderr inherited) and read the first `n` lines it
/// prints — what a server announces once it listens — leaving it running.
pub fn spawn_announcing(cmd: &mut Command, n: usize) -> (Child, Vec<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the program starts");
    let mut out = BufReader::new(child.stdout.as_mut().expect("stdout is piped"));
    let lines = (0..n)
        .map(|_| {
            let mut line = String::new();
            out.read_line(&mut line).expect("reading its output");
            line
        })
        .collect();
    (child, lines)
}

// ---- qemu ----------------------------------------------------------------------------

/// Run `program ARGS`, panicking with its output on failure; returns stdout.
pub fn run_tool(program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program} (scripts/test installs it): {e}"));
    assert!(out.status.success(), "{}", describe(program, args, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Run `qemu-img ARGS`, panicking with its output on failure; returns stdout.
pub fn qemu_img(args: &[&str]) -> String {
    run_tool("qemu-img", args)
}

/// How many clusters of a qcow2 image are compressed, as `qemu-img check` counts them
/// (`qemu-img map` reports compression only from qemu 8 on).
pub fn compressed_clusters(file: &Path) -> u64 {
    let out = qemu_img(&["check", "--output=json", p(file)]);
    let v: Value = serde_json::from_str(&out).expect("qemu-img check prints JSON");
    v["compressed-clusters"].as_u64().unwrap_or(0)
}

/// Run one qemu-io command (`-c CMD`) on `file` opened as `fmt`, panicking on failure.
pub fn qemu_io(fmt: &str, file: &Path, cmd: &str) {
    let args = ["-f", fmt, "-c", cmd, p(file)];
    let out = Command::new("qemu-io")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run qemu-io (install qemu-utils): {e}"));
    // qemu-io may exit 0 even when its command failed; it says so in its output.
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && !text.contains("failed") && !text.contains("rror"),
        "qemu-io {args:?}: {text}"
    );
}

/// `qemu-img compare A B` (formats probed): true if the guest-visible contents are
/// identical, false if they differ; panics if qemu-img cannot compare them.
pub fn images_identical(a: &Path, b: &Path) -> bool {
    let args = ["compare", p(a), p(b)];
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .expect("cannot run qemu-img (install qemu-utils)");
    match out.status.code() {
        Some(0) => true,
        Some(1) => false,
        _ => panic!("{}", describe("qemu-img", &args, &out)),
    }
}

/// `qemu-img compare -f FA -F FB A B` of two files or NBD URIs: true if their
/// guest-visible contents are identical; false otherwise (qemu-img's report on
/// stderr of the test).
pub fn identical(a: &str, fa: &str, b: &str, fb: &str) -> bool {
    let out = Command::new("qemu-img")
        .args(["compare", "-f", fa, "-F", fb, a, b])
        .output()
        .expect("cannot run qemu-img (scripts/test installs it)");
    if !out.status.success() {
        eprintln!(
            "qemu-img compare {a} {b}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out.status.success()
}

/// `qemu-img map --output=json FILE`: the extents qemu reports.
pub fn qemu_map(file: &Path) -> Vec<Value> {
    let out = qemu_img(&["map", "--output=json", p(file)]);
    match serde_json::from_str(&out).expect("qemu-img map prints JSON") {
        Value::Array(a) => a,
        other => panic!("qemu-img map: not a list: {other}"),
    }
}

/// What qemu says a block of an image is, from its map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapKind {
    /// Some of the block holds data.
    Data,
    /// Allocated, reads as zeros (a zero cluster, or a raw file's written range of
    /// zeros).
    Zero,
    /// Not allocated in any layer: a hole.
    Hole,
}

/// Classify every `block_size` block of `[0, size)` from a `qemu-img map` output.
pub fn map_kinds(map: &[Value], block_size: u64, size: u64) -> Vec<MapKind> {
    let blocks = size.div_ceil(block_size);
    let mut kinds = vec![MapKind::Hole; blocks as usize];
    for e in map {
        let start = e["start"].as_u64().unwrap();
        let len = e["length"].as_u64().unwrap();
        let data = e["data"].as_bool().unwrap();
        // Older qemu has no "present"; there, a non-data extent counts as a hole.
        let present = e["present"].as_bool().unwrap_or(data);
        let kind = if data {
            MapKind::Data
        } else if present {
            MapKind::Zero
        } else {
            continue;
        };
        if len == 0 {
            continue;
        }
        for b in start / block_size..=(start + len - 1) / block_size {
            let k = &mut kinds[b as usize];
            if kind == MapKind::Data || *k == MapKind::Hole {
                *k = kind;
            }
        }
    }
    kinds
}

/// The virtual size of an image according to `qemu-img info`.
pub fn virtual_size(file: &Path) -> u64 {
    let info: Value = serde_json::from_str(&qemu_img(&["info", "--output=json", p(file)]))
        .expect("qemu-img info prints JSON");
    info["virtual-size"].as_u64().expect("virtual-size")
}

// ---- content -------------------------------------------------------------------------

/// A small deterministic generator (SplitMix64): same seed, same bytes, every run.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, n)`.
    pub fn below(&mut self, n: u64) -> u64 {
        assert!(n > 0);
        self.next_u64() % n
    }

    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}

/// `len` pseudo-random (incompressible) bytes from `seed`.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    Rng::new(seed).fill(&mut buf);
    buf
}

/// `len` bytes of text-like, compressible content from `seed`.
pub fn text_bytes(len: usize, seed: u64) -> Vec<u8> {
    const WORDS: [&str; 16] = [
        "strata ", "block ", "version ", "disk ", "image ", "kernel ", "config ", "user\n",
        "data ", "delta ", "tree ", "qcow2 ", "backing ", "cluster ", "zero ", "hole\n",
    ];
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 16);
    while out.len() < len {
        out.extend_from_slice(WORDS[rng.below(16) as usize].as_bytes());
    }
    out.truncate(len);
    out
}

fn open_rw(path: &Path) -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()))
}

/// Write `data` at `offset` of `path` (created if missing, never truncated).
pub fn write_at(path: &Path, offset: u64, data: &[u8]) {
    open_rw(path)
        .write_all_at(data, offset)
        .unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
}

/// Write `len` pseudo-random bytes from `seed` at `offset` of `path` (created if
/// missing, never truncated). Returns the bytes written.
pub fn write_random(path: &Path, offset: u64, len: usize, seed: u64) -> Vec<u8> {
    let data = random_bytes(len, seed);
    write_at(path, offset, &data);
    data
}

/// Like [`write_random`] with compressible text-like content.
pub fn write_text(path: &Path, offset: u64, len: usize, seed: u64) -> Vec<u8> {
    let data = text_bytes(len, seed);
    write_at(path, offset, &data);
    data
}

/// Create (or truncate) a sparse raw file of `size` bytes: all holes.
pub fn sparse_file(path: &Path, size: u64) {
    let f = File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    f.set_len(size).unwrap();
}

// ---- packs ---------------------------------------------------------------------------

/// Every pack file of the store at `store` (`STORE/packs/xx/<32hex>.pack`), sorted.
pub fn pack_files(store: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(fans) = std::fs::read_dir(store.join("packs")) else {
        return out;
    };
    for fan in fans {
        let fan = fan.unwrap().path();
        if !fan.is_dir() {
            continue;
        }
        for f in std::fs::read_dir(&fan).unwrap() {
            let f = f.unwrap().path();
            if f.extension().is_some_and(|e| e == "pack") {
                out.push(f);
            }
        }
    }
    out.sort();
    out
}

/// Object kinds as pack entries record them.
pub const KIND_DATA: u8 = 0;
pub const KIND_TREE: u8 = 1;
pub const KIND_VERSION: u8 = 2;

/// One object inside a pack file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackObject {
    /// Object id (hex).
    pub id: String,
    /// [`KIND_DATA`], [`KIND_TREE`] or [`KIND_VERSION`].
    pub kind: u8,
    /// Offset of the entry header in the pack.
    pub offset: u64,
    /// Offset and length of the stored (possibly compressed) payload.
    pub payload_offset: u64,
    pub payload_len: u64,
}

/// The objects of a pack, read front to back from its entry headers (layout: a
/// 32-byte header, then per object a 52-byte entry header — "SENT", kind, codec,
/// domain, reserved, raw_len u32 LE, stored_len u32 LE, id [32] — and its payload,
/// then the index and footer).
pub fn pack_entries(pack: &Path) -> Vec<PackObject> {
    const HEADER: usize = 32;
    const ENTRY_HEADER: usize = 52;
    let b = std::fs::read(pack).unwrap_or_else(|e| panic!("read {}: {e}", pack.display()));
    assert_eq!(&b[0..8], b"STRPACK\0", "{} is not a pack", pack.display());
    let mut out = Vec::new();
    let mut pos = HEADER;
    while pos + ENTRY_HEADER <= b.len() && &b[pos..pos + 4] == b"SENT" {
        let h = &b[pos..pos + ENTRY_HEADER];
        let stored = u32::from_le_bytes(h[12..16].try_into().unwrap()) as usize;
        let id: String = h[16..48].iter().map(|x| format!("{x:02x}")).collect();
        out.push(PackObject {
            id,
            kind: h[4],
            offset: pos as u64,
            payload_offset: (pos + ENTRY_HEADER) as u64,
            payload_len: stored as u64,
        });
        pos += ENTRY_HEADER + stored;
    }
    out
}

/// XOR one byte of `file` at `offset` with `mask`.
pub fn flip_byte(file: &Path, offset: u64, mask: u8) {
    let f = open_rw(file);
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= mask;
    f.write_all_at(&b, offset).unwrap();
    f.sync_all().unwrap();
}

// ---- TLS ---------------------------------------------------------------------------

/// A CA and a server certificate signed by it, made with openssl.
pub struct Pki {
    /// The CA certificate (what clients trust).
    pub ca: PathBuf,
    /// The server's certificate and key (PEM).
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Make a CA and a server certificate for `localhost` and the IP addresses `ips`
/// under `root` (created).
pub fn make_pki(root: &Path, ips: &[&str]) -> Pki {
    std::fs::create_dir_all(root).unwrap();
    let ca_key = root.join("ca-key.pem");
    let ca = root.join("ca.pem");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend(["-keyout", p(&ca_key), "-out", p(&ca), "-days", "2"]);
    args.extend(["-subj", "/CN=strata test CA"]);
    args.extend(["-addext", "basicConstraints=critical,CA:TRUE"]);
    args.extend(["-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
    run_tool("openssl", &args);
    let csr = root.join("server.csr");
    let key = root.join("server-key.pem");
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend([
        "-keyout",
        p(&key),
        "-out",
        p(&csr),
        "-subj",
        "/CN=localhost",
    ]);
    run_tool("openssl", &args);
    let ext = root.join("ext.cnf");
    let mut san = String::from("subjectAltName=DNS:localhost");
    for ip in ips {
        san.push_str(&format!(",IP:{ip}"));
    }
    std::fs::write(&ext, format!("{san}\nextendedKeyUsage=serverAuth\n")).unwrap();
    let cert = root.join("server-cert.pem");
    run_tool(
        "openssl",
        &[
            "x509",
            "-req",
            "-in",
            p(&csr),
            "-CA",
            p(&ca),
            "-CAkey",
            p(&ca_key),
            "-CAcreateserial",
            "-out",
            p(&cert),
            "-days",
            "2",
            "-extfile",
            p(&ext),
        ],
    );
    Pki { ca, cert, key }
}
