//! The upstream hook: a lazy VersionDisk over an empty store reads a version through
//! an in-memory upstream (a map of the objects of a version held by another store),
//! asks it only for what the store lacks, and refuses a damaged object with an
//! error instead of returning wrong bytes.

mod common;

use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use common::*;
use strata_block::{BlockCacheConfig, Disk, SessionDisk, Upstream, VersionDisks};
use strata_store::{ChunkId, Store};

/// Serves objects from a map; counts what it was asked for; may damage one object
/// or be "away" (every call fails).
struct FakeUpstream {
    objects: HashMap<ChunkId, Vec<u8>>,
    corrupt: Mutex<Option<ChunkId>>,
    away: std::sync::atomic::AtomicBool,
    chunks_asked: AtomicU64,
    nodes_asked: AtomicU64,
    missed: Mutex<Vec<u64>>,
}

impl FakeUpstream {
    /// Every object of every version in `src`.
    fn of(src: &Store) -> FakeUpstream {
        let mut objects = HashMap::new();
        for (_, v) in src.list_versions().unwrap() {
            let tree = v.tree();
            // Collect node ids and data ids by walking every level.
            let mut level_ids: Vec<ChunkId> = tree.root.id().into_iter().collect();
            for _ in 0..tree.depth {
                let mut next = Vec::new();
                for id in &level_ids {
                    let raw = src.read_objects(&[*id]).unwrap().pop().unwrap().unwrap().1;
                    objects.insert(*id, raw);
                    let node = src.load_node(id).unwrap();
                    next.extend(strata_store::tree::present_ids(&node.entries));
                }
                level_ids = next;
            }
            for (id, o) in level_ids.iter().zip(src.read_objects(&level_ids).unwrap()) {
                objects.insert(*id, o.unwrap().1);
            }
        }
        FakeUpstream {
            objects,
            corrupt: Mutex::new(None),
            away: false.into(),
            chunks_asked: AtomicU64::new(0),
            nodes_asked: AtomicU64::new(0),
            missed: Mutex::new(Vec::new()),
        }
    }

    fn get(&self, ids: &[ChunkId]) -> io::Result<Vec<Vec<u8>>> {
        if self.away.load(Ordering::SeqCst) {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "hub away"));
        }
        let bad = *self.corrupt.lock().unwrap();
        ids.iter()
            .map(|id| {
                let mut raw = self
                    .objects
                    .get(id)
                    .cloned()
                    .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no such object"))?;
                if Some(*id) == bad {
                    raw[0] ^= 1;
                }
                Ok(raw)
            })
            .collect()
    }
}

impl Upstream for FakeUpstream {
    fn nodes(&self, ids: &[ChunkId]) -> io::Result<Vec<Vec<u8>>> {
        self.nodes_asked
            .fetch_add(ids.len() as u64, Ordering::SeqCst);
        self.get(ids)
    }

    fn chunks(&self, ids: &[ChunkId]) -> io::Result<Vec<Vec<u8>>> {
        self.chunks_asked
            .fetch_add(ids.len() as u64, Ordering::SeqCst);
        self.get(ids)
    }

    fn missed(&self, blocks: &[u64]) {
        self.missed.lock().unwrap().extend_from_slice(blocks);
    }
}

/// `blocks` 4 KiB blocks of random data (every block present).
fn data_model(seed: u64, blocks: usize) -> Model {
    let mut rng = Prng::new(seed);
    Model {
        bs: 4096,
        bytes: rng.bytes(blocks * 4096),
        kinds: vec![Kind::Data; blocks],
    }
}

#[test]
fn lazy_disk_reads_through_the_upstream() {
    let tmp = tempfile::tempdir().unwrap();
    let src = new_store(&tmp.path().join("src"));
    let dst = new_store(&tmp.path().join("dst"));
    let model = random_model(&mut Prng::new(11), 4096, 700, 1234);
    let (id, version) = import(&src, "img", &model);
    let up = Arc::new(FakeUpstream::of(&src));
    let disks = VersionDisks::new(dst.clone());
    let disk = disks.get_lazy(id, version, up.clone());
    assert!(disk.is_lazy());
    // One block in the middle: only its chunk (and the nodes on its path) travel.
    let bs = 4096u64;
    let mut buf = vec![0u8; 100];
    disk.read_at(&mut buf, 300 * bs + 7).unwrap();
    assert_eq!(buf, &model.bytes[300 * 4096 + 7..300 * 4096 + 107]);
    let asked = up.chunks_asked.load(Ordering::SeqCst);
    assert!(asked <= 1, "asked for {asked} chunks for one block");
    assert!(up.nodes_asked.load(Ordering::SeqCst) <= 2);
    if asked == 1 {
        assert_eq!(*up.missed.lock().unwrap(), vec![300]);
    }
    // Everything, then again: the second pass is served without the upstream
    // (the block cache holds what was fetched).
    assert_eq!(read_all(&*disk), model.bytes);
    let after = up.chunks_asked.load(Ordering::SeqCst);
    up.away.store(true, Ordering::SeqCst);
    assert_eq!(read_all(&*disk), model.bytes);
    assert_eq!(up.chunks_asked.load(Ordering::SeqCst), after);
    // A session over the lazy base opens through the registry.
    let sdir = tmp.path().join("session");
    let s = SessionDisk::create_shared(&sdir, &disks, id).unwrap();
    assert_eq!(read_all(&s), model.bytes);
    s.write_at(&[9u8; 10], 5, false).unwrap();
    let mut b = [0u8; 20];
    s.read_at(&mut b, 0).unwrap();
    assert_eq!(&b[5..15], &[9u8; 10]);
    assert_eq!(&b[..5], &model.bytes[..5]);
    drop(s);
    let s = SessionDisk::open_shared(&sdir, &disks).unwrap();
    s.read_at(&mut b, 0).unwrap();
    assert_eq!(&b[5..15], &[9u8; 10]);
}

#[test]
fn local_objects_are_not_fetched_and_cache_hints_fetch() {
    let tmp = tempfile::tempdir().unwrap();
    let src = new_store(&tmp.path().join("src"));
    let model = data_model(12, 300);
    let (id, version) = import(&src, "img", &model);
    let up = Arc::new(FakeUpstream::of(&src));
    // The destination is the source itself: every object is local.
    let disks = VersionDisks::new(src.clone());
    drop(disks.get(id).unwrap());
    let disk = disks.get_lazy(id, version.clone(), up.clone());
    assert_eq!(read_all(&*disk), model.bytes);
    assert_eq!(up.chunks_asked.load(Ordering::SeqCst), 0);
    assert_eq!(up.nodes_asked.load(Ordering::SeqCst), 0);
    drop(disk);
    // An empty store: a CACHE hint fetches the range into the block cache (this
    // upstream does not store what it fetches), later reads need no upstream. The
    // cache must fill however full this machine's disk is.
    let dst = new_store(&tmp.path().join("dst"));
    let disks = VersionDisks::with_config(
        dst,
        BlockCacheConfig {
            enabled: true,
            min_free_bytes: Some(0),
        },
    );
    let disk = disks.get_lazy(id, version, up.clone());
    disk.cache(0, 64 * 4096).unwrap();
    assert!(up.chunks_asked.load(Ordering::SeqCst) > 0);
    up.away.store(true, Ordering::SeqCst);
    let mut buf = vec![0u8; 64 * 4096];
    disk.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, &model.bytes[..64 * 4096]);
    // Past the hinted range the upstream is needed, and its absence is an error.
    let b = (64..300u64)
        .find(|&b| matches!(disk.entry(b).unwrap(), strata_store::Entry::Present(_)))
        .unwrap();
    let e = disk.read_at(&mut buf[..4096], b * 4096).unwrap_err();
    assert_ne!(e.kind(), io::ErrorKind::InvalidInput);
}

#[test]
fn a_corrupt_object_is_an_error_never_wrong_bytes() {
    let tmp = tempfile::tempdir().unwrap();
    let src = new_store(&tmp.path().join("src"));
    let dst = new_store(&tmp.path().join("dst"));
    let model = data_model(13, 50);
    let (id, version) = import(&src, "img", &model);
    let up = Arc::new(FakeUpstream::of(&src));
    let disks = VersionDisks::new(dst);
    let disk = disks.get_lazy(id, version, up.clone());
    // A data block whose chunk the upstream damages.
    let b = (0..50u64)
        .find(|&b| matches!(disk.entry(b).unwrap(), strata_store::Entry::Present(_)))
        .unwrap();
    let cid = disk.entry(b).unwrap().id().unwrap();
    *up.corrupt.lock().unwrap() = Some(cid);
    let mut buf = vec![0u8; 4096];
    assert!(disk.read_at(&mut buf, b * 4096).is_err());
    // Nothing wrong was cached: once the upstream is healthy, the block reads right.
    *up.corrupt.lock().unwrap() = None;
    disk.read_at(&mut buf, b * 4096).unwrap();
    assert_eq!(
        buf,
        &model.bytes[b as usize * 4096..(b as usize + 1) * 4096]
    );

    // A damaged tree node: the root of a fresh lazy disk.
    let dst2 = new_store(&tmp.path().join("dst2"));
    let disks2 = VersionDisks::new(dst2);
    let v = disk.version().clone();
    let root = disk.root().id().unwrap();
    drop(disk);
    *up.corrupt.lock().unwrap() = Some(root);
    let disk2 = disks2.get_lazy(id, v, up.clone());
    assert!(disk2.read_at(&mut buf, 0).is_err());
    *up.corrupt.lock().unwrap() = None;
    disk2.read_at(&mut buf, 0).unwrap();
    assert_eq!(buf, &model.bytes[..4096]);
}
