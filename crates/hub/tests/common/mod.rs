//! Shared scaffolding: a hub on loopback, points enrolled through the API, versions
//! written through the store API, and a fault-injecting TCP proxy.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use strata_hub::{HubConfig, RunningHub};
use strata_store::tree::{walk, Span};
use strata_store::{BlockInput, CommitTarget, Entry, Store, VersionId, WriteSession};
use strata_sync::{ClientConfig, HubClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub const BS: u32 = 4096;

pub struct Env {
    pub dir: tempfile::TempDir,
    pub hub: Option<RunningHub>,
    pub admin_token: String,
    pub url: String,
}

impl Env {
    pub async fn new() -> Env {
        Env::with(|_| {}).await
    }

    /// A hub whose configuration `f` adjusts first.
    pub async fn with(f: impl FnOnce(&mut HubConfig)) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let init = strata_hub::init(&dir.path().join("hub")).unwrap();
        let mut cfg = HubConfig::new(&dir.path().join("hub"), "127.0.0.1:0".parse().unwrap());
        f(&mut cfg);
        let hub = strata_hub::start(cfg).await.unwrap();
        let url = hub.url();
        Env {
            dir,
            hub: Some(hub),
            admin_token: init.admin_token,
            url,
        }
    }

    pub fn hub_store(&self) -> Store {
        Store::open(&self.dir.path().join("hub/store")).unwrap()
    }

    pub fn admin(&self) -> HubClient {
        HubClient::new(&ClientConfig::new(&self.url).credential(&self.admin_token)).unwrap()
    }

    pub fn client(&self, credential: Option<&str>) -> HubClient {
        self.client_at(&self.url, credential)
    }

    pub fn client_at(&self, url: &str, credential: Option<&str>) -> HubClient {
        let mut c = ClientConfig::new(url);
        c.credential = credential.map(str::to_string);
        HubClient::new(&c).unwrap()
    }

    /// Enrol a point through the API; returns its credential.
    pub async fn enroll(&self, name: &str) -> String {
        let token = self.admin().create_enrollment(name).await.unwrap();
        let r = self.client(None).enroll(&token.token).await.unwrap();
        assert_eq!(r.point, name);
        r.credential
    }

    /// A fresh local store for a point.
    pub fn point_store(&self, name: &str) -> Store {
        Store::init(&self.dir.path().join(format!("points/{name}"))).unwrap()
    }

    pub fn path(&self, p: &str) -> PathBuf {
        self.dir.path().join(p)
    }
}

/// A block: half pseudo-random, half a phrase, so zstd has work to do.
pub fn block(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut b = Vec::with_capacity(BS as usize);
    while b.len() < BS as usize / 2 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.extend_from_slice(&x.to_le_bytes());
    }
    let phrase = format!("block {seed} of a test image; ");
    while b.len() < BS as usize {
        b.extend_from_slice(phrase.as_bytes());
    }
    b.truncate(BS as usize);
    b
}

/// Commit `blocks` (empty = never written) as a new version on `image:main`.
pub fn commit(
    store: &Store,
    image: &str,
    blocks: &[Vec<u8>],
    parent: Option<VersionId>,
) -> VersionId {
    commit_with(store, image, blocks, parent, BS)
}

/// [`commit`] with blocks of `bs` bytes.
pub fn commit_with(
    store: &Store,
    image: &str,
    blocks: &[Vec<u8>],
    parent: Option<VersionId>,
    bs: u32,
) -> VersionId {
    let mut s = WriteSession::begin(store, "test").unwrap();
    let mut d = s.new_version(blocks.len() as u64 * bs as u64, bs).unwrap();
    s.add_blocks(
        &mut d,
        blocks
            .iter()
            .map(|b| {
                if b.is_empty() {
                    BlockInput::Unwritten
                } else {
                    BlockInput::Data(b.clone())
                }
            })
            .collect(),
    )
    .unwrap();
    let (vid, _, _) = s
        .commit(
            d,
            &CommitTarget {
                image: image.into(),
                branch: "main".into(),
                expected: parent,
                create_image: true,
                parents: parent.into_iter().collect(),
                author: "test".into(),
                message: String::new(),
            },
        )
        .unwrap();
    vid
}

/// Every byte of a version, read through its tree (unwritten and zero blocks as
/// zeros).
pub fn version_bytes(store: &Store, v: &VersionId) -> Vec<u8> {
    let ver = store.load_version(v).unwrap();
    let bs = ver.block_size as usize;
    let mut out = vec![0u8; ver.virtual_size as usize];
    let mut load = |id: &strata_store::ChunkId| store.load_node(id);
    walk(
        &mut load,
        ver.root_entry().unwrap(),
        ver.depth,
        0,
        ver.blocks(),
        &mut |s| {
            if let Span::Blocks { start, entries } = s {
                let ids: Vec<_> = entries.iter().filter_map(Entry::id).collect();
                let mut data = store.read_chunks(&ids)?.into_iter();
                for (i, e) in entries.iter().enumerate() {
                    if e.id().is_some() {
                        let d = data.next().unwrap();
                        let at = (start as usize + i) * bs;
                        out[at..at + d.len()].copy_from_slice(&d);
                    }
                }
            }
            Ok(())
        },
    )
    .unwrap();
    out
}

pub fn verify_clean(store: &Store) {
    let r = strata_store::verify::verify(store, &|_| {}).unwrap();
    assert!(r.ok(), "verify found damage: {r:?}");
}

/// A TCP proxy that cuts every live connection, once, when `cut_after` bytes have
/// passed through it (both directions counted) since it was armed.
pub struct CutProxy {
    pub addr: SocketAddr,
    pub passed: Arc<AtomicU64>,
    pub armed: Arc<AtomicBool>,
    pub cut_after: Arc<AtomicU64>,
    pub cuts: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl CutProxy {
    pub async fn start(target: SocketAddr) -> CutProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let passed = Arc::new(AtomicU64::new(0));
        let armed = Arc::new(AtomicBool::new(false));
        let cut_after = Arc::new(AtomicU64::new(u64::MAX));
        let cuts = Arc::new(AtomicU64::new(0));
        let cut = Arc::new(tokio::sync::Notify::new());
        let (p, a, c, n) = (
            passed.clone(),
            armed.clone(),
            cut_after.clone(),
            cuts.clone(),
        );
        let task = tokio::spawn(async move {
            let mut conns = tokio::task::JoinSet::new();
            loop {
                let Ok((client, _)) = listener.accept().await else {
                    return;
                };
                let Ok(server) = TcpStream::connect(target).await else {
                    continue;
                };
                let (p, a, c, n, cut) = (p.clone(), a.clone(), c.clone(), n.clone(), cut.clone());
                conns.spawn(async move {
                    let (cr, cw) = client.into_split();
                    let (sr, sw) = server.into_split();
                    let cutters = (p, a, c, n, cut.clone());
                    let notified = cut.notified();
                    tokio::select! {
                        _ = pump(cr, sw, cutters.clone()) => {}
                        _ = pump(sr, cw, cutters) => {}
                        _ = notified => {}
                    }
                    // Dropping both sockets cuts the connection.
                });
            }
        });
        CutProxy {
            addr,
            passed,
            armed,
            cut_after,
            cuts,
            task,
        }
    }

    /// Cut every live connection once `bytes` more have passed.
    pub fn arm(&self, bytes: u64) {
        self.cut_after
            .store(self.passed.load(Ordering::SeqCst) + bytes, Ordering::SeqCst);
        self.armed.store(true, Ordering::SeqCst);
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

type Cutters = (
    Arc<AtomicU64>,
    Arc<AtomicBool>,
    Arc<AtomicU64>,
    Arc<AtomicU64>,
    Arc<tokio::sync::Notify>,
);

/// Copy one direction, counting bytes; the copy that crosses the armed threshold
/// cuts every connection instead of forwarding.
async fn pump(
    mut r: tokio::net::tcp::OwnedReadHalf,
    mut w: tokio::net::tcp::OwnedWriteHalf,
    (p, a, c, n, cut): Cutters,
) {
    let mut buf = vec![0u8; 16 << 10];
    loop {
        let k = match r.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(k) => k,
        };
        let total = p.fetch_add(k as u64, Ordering::SeqCst) + k as u64;
        if total >= c.load(Ordering::SeqCst)
            && a.compare_exchange(true, false, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        {
            n.fetch_add(1, Ordering::SeqCst);
            cut.notify_waiters();
            return;
        }
        if w.write_all(&buf[..k]).await.is_err() {
            return;
        }
    }
}

impl Drop for CutProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
