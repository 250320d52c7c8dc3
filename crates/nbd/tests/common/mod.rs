//! Shared by the integration tests: a server on an ephemeral TCP port and a Unix
//! socket in a temp dir, run on its own tokio runtime; a raw protocol client; helpers
//! to run external tools with a time bound.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use strata_block::Disk;
use strata_nbd::mem::MemDisk;
use strata_nbd::proto::*;
use strata_nbd::{Server, ServerConfig, StaticExports};
use tempfile::TempDir;
use tokio::runtime::Runtime;

/// The longest any single external command or socket wait may take before the test
/// fails (a safety net against hangs, not a performance threshold).
pub const LIMIT: Duration = Duration::from_secs(120);

pub struct TestServer {
    rt: Option<Runtime>,
    pub server: Server,
    pub port: u16,
    pub socket: PathBuf,
    pub dir: TempDir,
}

impl TestServer {
    pub fn start(exports: StaticExports, config: ServerConfig) -> TestServer {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("nbd.sock");
        let server = Server::new(Arc::new(exports), config).unwrap();
        let (port, tcp, unix) = rt.block_on(async {
            let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let unix = tokio::net::UnixListener::bind(&socket).unwrap();
            (tcp.local_addr().unwrap().port(), tcp, unix)
        });
        let s = server.clone();
        rt.spawn(async move { s.serve_all(vec![tcp.into(), unix.into()]).await });
        TestServer {
            rt: Some(rt),
            server,
            port,
            socket,
            dir,
        }
    }

    pub fn tcp_uri(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, name)
    }

    pub fn unix_uri(&self, name: &str) -> String {
        format!("nbd+unix:///{}?socket={}", name, self.socket.display())
    }

    pub fn runtime(&self) -> &Runtime {
        self.rt.as_ref().unwrap()
    }

    /// Wait (bounded) until no connection is served any more.
    pub fn wait_idle(&self) {
        let s = self.server.clone();
        self.runtime()
            .block_on(async { tokio::time::timeout(LIMIT, s.wait_idle()).await })
            .expect("connections did not close");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.server.shutdown();
        if let Some(rt) = self.rt.take() {
            let s = self.server.clone();
            let _ = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(10), s.wait_idle()).await
            });
            rt.shutdown_timeout(Duration::from_secs(5));
        }
    }
}

/// Deterministic pseudo-random bytes.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// An 8 MiB disk in 64 KiB granules with data in a few places and holes elsewhere.
pub fn sample_disk() -> Arc<MemDisk> {
    let d = MemDisk::new(8 << 20, 64 * 1024);
    d.fill(&pattern(256 * 1024, 1), 0);
    d.fill(&pattern(64 * 1024, 2), 1 << 20);
    d.fill(&pattern(100_000, 3), 3 << 20);
    d.fill(&pattern(64 * 1024, 4), (8 << 20) - 64 * 1024);
    Arc::new(d)
}

pub fn exports_of(list: &[(&str, Arc<MemDisk>)]) -> StaticExports {
    let mut e = StaticExports::new();
    for (name, disk) in list {
        e.add(
            *name,
            disk.clone() as Arc<dyn Disk>,
            format!("test disk {name}"),
        );
    }
    e
}

pub fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Fail clearly when a tool the test needs is missing.
#[macro_export]
macro_rules! require {
    ($tool:expr) => {
        // scripts/test installs every tool; a missing one is a failure, not a skip.
        assert!(
            common::have($tool),
            "{} is not installed (scripts/test installs it)",
            $tool
        );
    };
}

/// Run a command with a time bound; its output is collected.
pub fn run(program: &str, args: &[&str]) -> Output {
    run_in(program, args, None)
}

pub fn run_in(program: &str, args: &[&str], dir: Option<&Path>) -> Output {
    let mut cmd = Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    if let Some(d) = dir {
        cmd.current_dir(d);
    }
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let t_out = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let t_err = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} {args:?} did not finish in {LIMIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    Output {
        status,
        stdout: t_out.join().unwrap(),
        stderr: t_err.join().unwrap(),
    }
}

/// Run a command that must succeed; its stdout.
pub fn run_ok(program: &str, args: &[&str]) -> String {
    let o = run(program, args);
    assert!(
        o.status.success(),
        "{program} {args:?} failed ({}):\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

// ---------------------------------------------------------------------------------------
// A raw client, for hostile and precise tests.

pub struct RawClient {
    pub s: TcpStream,
}

impl RawClient {
    /// Connect and read the greeting; nothing sent yet.
    pub fn connect(port: u16) -> RawClient {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(LIMIT)).unwrap();
        s.set_write_timeout(Some(LIMIT)).unwrap();
        let mut c = RawClient { s };
        let g = c.read_n(18);
        assert_eq!(&g[..8], b"NBDMAGIC");
        assert_eq!(&g[8..16], b"IHAVEOPT");
        assert_eq!(u16::from_be_bytes([g[16], g[17]]), 3);
        c
    }

    /// Connect and send the usual client flags.
    pub fn handshake(port: u16) -> RawClient {
        let mut c = RawClient::connect(port);
        c.send(&3u32.to_be_bytes());
        c
    }

    pub fn send(&mut self, b: &[u8]) {
        self.s.write_all(b).unwrap();
    }

    pub fn read_n(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0u8; n];
        self.s.read_exact(&mut v).unwrap();
        v
    }

    /// True when the server has closed the connection (EOF or reset), after reading
    /// and discarding whatever it still sent.
    pub fn is_closed(&mut self) -> bool {
        let mut buf = [0u8; 4096];
        loop {
            match self.s.read(&mut buf) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return false,
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => return false,
                Err(_) => return true,
            }
        }
    }

    pub fn option(&mut self, opt: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.send(&b);
    }

    /// One option reply: (option, type, data).
    pub fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(
            u64::from_be_bytes(h[0..8].try_into().unwrap()),
            OPT_REPLY_MAGIC
        );
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let ty = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let data = self.read_n(len as usize);
        (opt, ty, data)
    }

    /// Replies up to and including the final one (ACK or an error).
    pub fn replies(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let r = self.reply();
            let last = r.1 == REP_ACK || r.1 & 0x8000_0000 != 0;
            v.push(r);
            if last {
                return v;
            }
        }
    }

    pub fn go_payload(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(name.len() as u32).to_be_bytes());
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            b.extend_from_slice(&i.to_be_bytes());
        }
        b
    }

    pub fn meta_payload(name: &str, queries: &[&str]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&(name.len() as u32).to_be_bytes());
        b.extend_from_slice(name.as_bytes());
        b.extend_from_slice(&(queries.len() as u32).to_be_bytes());
        for q in queries {
            b.extend_from_slice(&(q.len() as u32).to_be_bytes());
            b.extend_from_slice(q.as_bytes());
        }
        b
    }

    /// Negotiate (optionally structured replies and base:allocation) and enter
    /// transmission on `name`; the export's (size, flags).
    pub fn go(&mut self, name: &str, structured: bool) -> (u64, u16) {
        if structured {
            self.option(OPT_STRUCTURED_REPLY, &[]);
            assert_eq!(self.reply().1, REP_ACK);
            self.option(
                OPT_SET_META_CONTEXT,
                &RawClient::meta_payload(name, &["base:allocation"]),
            );
            let r = self.replies();
            assert_eq!(r.len(), 2, "{r:?}");
            assert_eq!(r[0].1, REP_META_CONTEXT);
        }
        self.option(OPT_GO, &RawClient::go_payload(name, &[INFO_BLOCK_SIZE]));
        let mut size_flags = None;
        for (_, ty, data) in self.replies() {
            assert!(
                ty == REP_INFO || ty == REP_ACK,
                "GO failed: {ty:#x} {data:?}"
            );
            if ty == REP_INFO && u16::from_be_bytes([data[0], data[1]]) == INFO_EXPORT {
                let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                let flags = u16::from_be_bytes([data[10], data[11]]);
                size_flags = Some((size, flags));
            }
        }
        size_flags.expect("no NBD_INFO_EXPORT")
    }

    pub fn request(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) {
        self.send(&encode_request(flags, cmd, cookie, offset, len));
    }

    /// A simple reply: (cookie, error); `data_len` bytes of data follow on success.
    pub fn simple_reply(&mut self, data_len: usize) -> (u64, u32, Vec<u8>) {
        let h = self.read_n(16);
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            SIMPLE_REPLY_MAGIC
        );
        let err = u32::from_be_bytes(h[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let data = if err == 0 {
            self.read_n(data_len)
        } else {
            Vec::new()
        };
        (cookie, err, data)
    }

    /// Either kind of reply header for a non-read command: (cookie, error).
    pub fn any_reply(&mut self) -> (u64, u32) {
        let m = self.read_n(4);
        let magic = u32::from_be_bytes(m[..4].try_into().unwrap());
        if magic == SIMPLE_REPLY_MAGIC {
            let h = self.read_n(12);
            (
                u64::from_be_bytes(h[4..12].try_into().unwrap()),
                u32::from_be_bytes(h[0..4].try_into().unwrap()),
            )
        } else {
            assert_eq!(magic, STRUCTURED_REPLY_MAGIC);
            let h = self.read_n(16);
            let flags = u16::from_be_bytes([h[0], h[1]]);
            let ty = u16::from_be_bytes([h[2], h[3]]);
            let cookie = u64::from_be_bytes(h[4..12].try_into().unwrap());
            let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let data = self.read_n(len as usize);
            assert_ne!(
                flags & REPLY_FLAG_DONE,
                0,
                "multi-chunk reply where one expected"
            );
            let err = if ty & 0x8000 != 0 {
                u32::from_be_bytes(data[0..4].try_into().unwrap())
            } else {
                0
            };
            (cookie, err)
        }
    }

    /// One structured chunk: (flags, type, cookie, payload).
    pub fn chunk(&mut self) -> (u16, u16, u64, Vec<u8>) {
        let h = self.read_n(20);
        assert_eq!(
            u32::from_be_bytes(h[0..4].try_into().unwrap()),
            STRUCTURED_REPLY_MAGIC
        );
        let flags = u16::from_be_bytes([h[4], h[5]]);
        let ty = u16::from_be_bytes([h[6], h[7]]);
        let cookie = u64::from_be_bytes(h[8..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        (flags, ty, cookie, self.read_n(len as usize))
    }

    /// A whole structured read reply, reassembled: (cookie, error, data, chunk types).
    pub fn structured_read(&mut self, offset: u64, len: usize) -> (u64, u32, Vec<u8>, Vec<u16>) {
        let mut data = vec![0xeeu8; len];
        let mut types = Vec::new();
        let mut err = 0;
        let mut cookie = None;
        loop {
            let (flags, ty, c, payload) = self.chunk();
            assert!(cookie.is_none() || cookie == Some(c));
            cookie = Some(c);
            types.push(ty);
            match ty {
                REPLY_TYPE_OFFSET_DATA => {
                    let off = u64::from_be_bytes(payload[0..8].try_into().unwrap());
                    let start = (off - offset) as usize;
                    data[start..start + payload.len() - 8].copy_from_slice(&payload[8..]);
                }
                REPLY_TYPE_OFFSET_HOLE => {
                    let off = u64::from_be_bytes(payload[0..8].try_into().unwrap());
                    let n = u32::from_be_bytes(payload[8..12].try_into().unwrap()) as usize;
                    let start = (off - offset) as usize;
                    data[start..start + n].fill(0);
                }
                REPLY_TYPE_NONE => {}
                t if t & 0x8000 != 0 => {
                    err = u32::from_be_bytes(payload[0..4].try_into().unwrap());
                }
                t => panic!("unexpected chunk type {t}"),
            }
            if flags & REPLY_FLAG_DONE != 0 {
                return (c, err, data, types);
            }
        }
    }
}
