//! Commits of a three-level tree: a few changed blocks cost a few new nodes (untouched
//! subtrees are reused whole, unread), and the result is exactly the version a full
//! import of the same content makes.

mod common;

use std::collections::HashMap;

use common::*;
use strata_block::{Disk, SessionDisk, VersionDisk};
use strata_store::{BlockInput, Entry, Store, Version, VersionId, WriteSession};

const BS: usize = 4096;
const BLOCKS: u64 = 70_000; // 256 * 256 < 70,000: three levels
const TAIL: usize = 1000; // the last block is short

/// A large disk held sparsely: kinds per block, contents of data blocks.
struct Sparse {
    kinds: Vec<Kind>,
    data: HashMap<u64, Vec<u8>>,
}

impl Sparse {
    fn size(&self) -> u64 {
        (BLOCKS - 1) * BS as u64 + TAIL as u64
    }

    fn block_len(&self, b: u64) -> usize {
        if b == BLOCKS - 1 {
            TAIL
        } else {
            BS
        }
    }

    fn block(&self, b: u64) -> Vec<u8> {
        self.data
            .get(&b)
            .cloned()
            .unwrap_or_else(|| vec![0; self.block_len(b)])
    }

    fn write(&mut self, off: u64, bytes: &[u8]) {
        let mut pos = 0;
        while pos < bytes.len() {
            let at = off + pos as u64;
            let b = at / BS as u64;
            let o = (at % BS as u64) as usize;
            let n = (self.block_len(b) - o).min(bytes.len() - pos);
            let mut blk = self.block(b);
            blk[o..o + n].copy_from_slice(&bytes[pos..pos + n]);
            self.data.insert(b, blk);
            self.kinds[b as usize] = Kind::Data;
            pos += n;
        }
    }

    fn zero_blocks(&mut self, from: u64, to: u64) {
        for b in from..to {
            self.data.remove(&b);
            self.kinds[b as usize] = Kind::Zero;
        }
    }

    fn import(&self, store: &Store, image: &str) -> (VersionId, Version) {
        let mut s = WriteSession::begin(store, "test import").unwrap();
        let mut d = s.new_version(self.size(), BS as u32).unwrap();
        let inputs: Vec<BlockInput> = (0..BLOCKS)
            .map(|b| match self.kinds[b as usize] {
                Kind::Unwritten => BlockInput::Unwritten,
                Kind::Zero => BlockInput::Zero,
                Kind::Data => BlockInput::Data(self.block(b)),
            })
            .collect();
        s.add_blocks(&mut d, inputs).unwrap();
        let (id, v, _) = s.commit(d, &target(image, None)).unwrap();
        (id, v)
    }
}

#[test]
fn commit_reuses_untouched_subtrees_of_a_deep_tree() {
    let tmp = tempfile::tempdir().unwrap();
    let store = new_store(tmp.path());
    let mut rng = Prng::new(5);
    let mut m = Sparse {
        kinds: vec![Kind::Unwritten; BLOCKS as usize],
        data: HashMap::new(),
    };
    for b in (0..BLOCKS).step_by(997) {
        m.write(b * BS as u64, &rng.bytes(m.block_len(b)));
    }
    m.write(65_400 * BS as u64, &rng.bytes(700 * BS)); // across the first level-1 boundary
    m.zero_blocks(30_000, 30_600);
    m.zero_blocks(1024, 1280); // one whole zero leaf
    let (base, base_rec) = m.import(&store, "img");
    assert_eq!(base_rec.depth, 3);

    let dir = tmp.path().join("s");
    let disk = SessionDisk::create(&dir, store.clone(), base).unwrap();
    let writes: Vec<(u64, Vec<u8>)> = vec![
        (5 * BS as u64 + 100, rng.bytes(50)),
        (40_000 * BS as u64 - 10, rng.bytes(BS + 20)),
        (65_540 * BS as u64, rng.bytes(BS)),
        (m.size() - 10, rng.bytes(10)),
    ];
    for (off, data) in &writes {
        disk.write_at(data, *off, false).unwrap();
        m.write(*off, data);
    }
    disk.write_zeroes(30_100 * BS as u64, 100 * BS as u64, true, false)
        .unwrap();
    m.zero_blocks(30_100, 30_200);
    disk.trim(1100 * BS as u64, BS as u64, false).unwrap(); // inside the zero leaf
    m.zero_blocks(1100, 1101);

    let r = disk.commit(&target("img", Some(base))).unwrap();
    let (_, reference) = m.import(&store, "reference");
    assert_eq!(r.record.root, reference.root);
    assert_eq!(r.record.data_blocks, reference.data_blocks);
    assert_eq!(r.record.zero_blocks, reference.zero_blocks);
    assert_eq!(r.record.data_bytes, reference.data_bytes);
    // Changed leaves: 0, 156, 256, 273 (leaf 117 was zero already; block 1100's leaf is still all zero, and
    // a uniform leaf is no node); their two level-1 parents; the root; and the version
    // record, which WriteStats counts among them.
    assert_eq!(r.stats.new_tree_nodes, 4 + 2 + 1 + 1);
    assert_eq!(r.stats.new_chunks, 6); // blocks 5, 39,999-40,001, 65,540, 69,999

    // The new version reads back, block by block where it matters.
    let v = VersionDisk::open(store.clone(), r.version).unwrap();
    for b in [
        0, 5, 997, 39_999, 40_000, 65_400, 65_540, 66_099, 69_999, 30_150, 1100,
    ] {
        let mut buf = vec![0u8; m.block_len(b)];
        v.read_at(&mut buf, b * BS as u64).unwrap();
        assert_eq!(buf, m.block(b), "block {b}");
        disk.read_at(&mut buf, b * BS as u64).unwrap();
        assert_eq!(buf, m.block(b), "block {b} through the session");
    }
    assert_eq!(v.entry(1100).unwrap(), Entry::Zero);
    assert_eq!(v.entry(12).unwrap(), Entry::Unwritten);

    // Nothing changed since: the next commit has the same tree and no new nodes.
    let r2 = disk.commit(&target("img", Some(r.version))).unwrap();
    assert_eq!(r2.record.root, r.record.root);
    // (WriteStats counts the version record among new tree objects.)
    assert_eq!(r2.stats.new_tree_nodes, 1);
    assert_eq!(r2.record.parents, vec![r.version.to_hex()]);
    assert_eq!(disk.stats().delta_blocks, 0);
}

#[test]
fn a_failed_commit_changes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let store = new_store(tmp.path());
    let mut rng = Prng::new(9);
    let model = random_model(&mut rng, BS, 300, 0);
    let (base, _) = import(&store, "img", &model);
    let dir = tmp.path().join("s");
    let disk = SessionDisk::create(&dir, store.clone(), base).unwrap();
    let mut expected = model.bytes.clone();
    let data = rng.bytes(3 * BS);
    disk.write_at(&data, 1000, false).unwrap();
    expected[1000..1000 + data.len()].copy_from_slice(&data);
    // The branch is not where the commit expects it.
    let e = disk.commit(&target("img", None)).unwrap_err();
    assert!(e.to_string().contains("moved"), "{e}");
    assert_eq!(disk.base(), base);
    assert_eq!(disk.stats().delta_blocks, 4);
    assert_eq!(read_all(&disk), expected);
    // Writes after the failed commit still go where they should, and a retry works.
    let more = rng.bytes(BS);
    disk.write_at(&more, 2 * BS as u64, false).unwrap();
    expected[2 * BS..3 * BS].copy_from_slice(&more);
    let r = disk.commit(&target("img", Some(base))).unwrap();
    assert_eq!(
        read_all(&VersionDisk::open(store.clone(), r.version).unwrap()),
        expected
    );
    drop(disk);
    let disk = SessionDisk::open(&dir, store).unwrap();
    assert_eq!(disk.base(), r.version);
    assert_eq!(read_all(&disk), expected);
}

#[test]
fn reset_inspect_and_remove() {
    let tmp = tempfile::tempdir().unwrap();
    let store = new_store(tmp.path());
    let mut rng = Prng::new(2);
    let model = random_model(&mut rng, BS, 50, 10);
    let (base, _) = import(&store, "img", &model);
    let dir = tmp.path().join("s");
    let disk = SessionDisk::create(&dir, store.clone(), base).unwrap();
    assert!(SessionDisk::create(&dir, store.clone(), base).is_err());
    let e = SessionDisk::open(&dir, store.clone())
        .err()
        .expect("in use");
    assert!(e.to_string().contains("in use"), "{e}");
    disk.write_at(&rng.bytes(10 * BS), 3, false).unwrap();
    disk.write_zeroes(20 * BS as u64, 5 * BS as u64, true, false)
        .unwrap();
    disk.flush().unwrap();
    let info = SessionDisk::inspect(&dir).unwrap();
    assert!(info.in_use);
    assert_eq!(info.base, base.to_hex());
    assert_eq!((info.delta_blocks, info.zero_blocks), (16, 5));
    let st = disk.stats();
    assert_eq!(
        (st.delta_blocks, st.data_blocks, st.zero_blocks),
        (16, 11, 5)
    );
    assert_eq!(st.data_bytes, 11 * BS as u64);
    assert_eq!(st.unflushed_changes, 0);
    assert!(SessionDisk::remove(&dir).is_err(), "removed while in use");

    disk.reset().unwrap();
    assert_eq!(read_all(&disk), model.bytes);
    assert_eq!(disk.stats().delta_blocks, 0);
    assert_eq!(std::fs::metadata(dir.join("data")).unwrap().len(), 0);
    drop(disk);
    let info = SessionDisk::inspect(&dir).unwrap();
    assert!(!info.in_use);
    assert_eq!(info.delta_blocks, 0);
    let disk = SessionDisk::open(&dir, store.clone()).unwrap();
    assert_eq!(read_all(&disk), model.bytes);
    drop(disk);
    SessionDisk::remove(&dir).unwrap();
    assert!(!dir.exists());
}

#[test]
fn gc_keeps_what_sessions_and_their_commits_use() {
    use strata_store::gc::gc;
    use strata_store::verify::verify;
    use strata_store::RefKind;

    let tmp = tempfile::tempdir().unwrap();
    let store = new_store(tmp.path());
    let mut rng = Prng::new(21);
    let model = random_model(&mut rng, BS, 700, 0);
    let (base, _) = import(&store, "img", &model);
    // What the CLI does: a ref on the session's base, whatever happens to the branch.
    store
        .create_ref("img", RefKind::Tag, "session-base", &base)
        .unwrap();
    let dir = tmp.path().join("s");
    let disk = SessionDisk::create(&dir, store.clone(), base).unwrap();
    let mut expected = model.bytes.clone();
    let data = rng.bytes(5 * BS + 17);
    disk.write_at(&data, 300 * BS as u64 - 9, false).unwrap();
    expected[300 * BS - 9..300 * BS - 9 + data.len()].copy_from_slice(&data);
    // The branch moves away and its old history goes: only the tag holds the base.
    let other = random_model(&mut rng, BS, 10, 0);
    store.delete_ref("img", RefKind::Branch, "main").unwrap();
    let (_, _) = import(&store, "other", &other);
    gc(&store, &mut |_| {}).unwrap();
    assert_eq!(read_all(&disk), expected);

    let mut t = target("img", None);
    t.branch = "work".into();
    let r = disk.commit(&t).unwrap();
    // The ref moves to the new base (which keeps the old one as its parent).
    store
        .delete_ref("img", RefKind::Tag, "session-base")
        .unwrap();
    store
        .create_ref("img", RefKind::Tag, "session-base", &r.version)
        .unwrap();
    store.delete_ref("img", RefKind::Branch, "work").unwrap();
    gc(&store, &mut |_| {}).unwrap();
    let v = verify(&store, &|_| {}).unwrap();
    assert!(v.ok(), "{v:#?}");
    assert_eq!(read_all(&disk), expected);
    assert_eq!(
        read_all(&VersionDisk::open(store.clone(), r.version).unwrap()),
        expected
    );
    drop(disk);
    assert_eq!(read_all(&SessionDisk::open(&dir, store).unwrap()), expected);
}
