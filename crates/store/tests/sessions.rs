//! Write sessions against gc, interleaved deterministically: every ordering of "a
//! writer reuses an object" and "gc decides the object is garbage" must end with the
//! writer's version complete.

use strata_store::gc::gc;
use strata_store::tree::{self, Span};
use strata_store::verify::verify;
use strata_store::{BlockInput, CommitTarget, Entry, Store, VersionId, WriteSession};

const BS: u32 = 4096;

fn block(seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
    (0..BS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn target(image: &str, expected: Option<VersionId>) -> CommitTarget {
    CommitTarget {
        image: image.into(),
        branch: "main".into(),
        expected,
        create_image: true,
        parents: expected.into_iter().collect(),
        author: "test".into(),
        message: String::new(),
    }
}

fn write_image(store: &Store, image: &str, seeds: &[u32]) -> VersionId {
    let mut s = WriteSession::begin(store, "test").unwrap();
    let tip = s.pin_branch(image, "main").unwrap();
    let mut d = s.new_version(seeds.len() as u64 * BS as u64, BS).unwrap();
    s.add_blocks(
        &mut d,
        seeds.iter().map(|&x| BlockInput::Data(block(x))).collect(),
    )
    .unwrap();
    s.commit(d, &target(image, tip)).unwrap().0
}

/// Read a version back as its list of blocks.
fn read_back(store: &Store, v: &VersionId) -> Vec<Vec<u8>> {
    let ver = store.load_version(v).unwrap();
    let t = ver.tree();
    let mut ids = Vec::new();
    let mut load = |id: &strata_store::ChunkId| store.load_node(id);
    tree::walk(&mut load, t.root, t.depth, 0, ver.blocks(), &mut |s| {
        match s {
            Span::Blocks { entries, .. } => {
                for e in entries {
                    match e {
                        Entry::Present(id) => ids.push(Some(*id)),
                        _ => ids.push(None),
                    }
                }
            }
            Span::Uniform { count, .. } => ids.extend(std::iter::repeat_n(None, count as usize)),
        }
        Ok::<(), strata_store::StoreError>(())
    })
    .unwrap();
    ids.into_iter()
        .map(|id| match id {
            Some(id) => store.read_chunks(&[id]).unwrap().remove(0),
            None => vec![0; BS as usize],
        })
        .collect()
}

fn assert_clean(store: &Store) {
    let r = verify(store, &|_| {}).unwrap();
    assert!(r.ok(), "verify: {r:#?}");
}

#[test]
fn gc_after_a_writer_pinned_keeps_what_it_reuses() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(&dir.path().join("s")).unwrap();
    let seeds: Vec<u32> = (0..600).collect();
    write_image(&store, "old", &seeds);

    // A writer reuses every block of "old"...
    let mut s = WriteSession::begin(&store, "test").unwrap();
    let mut d = s.new_version(seeds.len() as u64 * BS as u64, BS).unwrap();
    s.add_blocks(
        &mut d,
        seeds.iter().map(|&x| BlockInput::Data(block(x))).collect(),
    )
    .unwrap();
    assert_eq!(s.stats.new_chunks, 0, "everything was deduplicated");
    // ...then "old" goes away and gc runs before the writer commits.
    store.delete_image("old").unwrap();
    let r = gc(&store, &mut |_| {}).unwrap();
    // Garbage: old's version record, its root and its last (partial) leaf, which the
    // writer has not reached yet; every data block and both full leaves are pinned.
    assert_eq!(r.deleted_objects, 3, "{r:?}");
    assert_eq!(
        strata_store::stats::stats(&store).unwrap().unique_chunks,
        600
    );
    let v = s.commit(d, &target("new", None)).unwrap().0;
    assert_clean(&store);
    let back = read_back(&store, &v);
    for (i, b) in back.iter().enumerate() {
        assert_eq!(*b, block(i as u32));
    }
}

#[test]
fn gc_before_a_writer_looks_up_makes_it_write_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(&dir.path().join("s")).unwrap();
    let seeds: Vec<u32> = (0..300).collect();
    write_image(&store, "old", &seeds);
    let s = WriteSession::begin(&store, "test").unwrap();
    store.delete_image("old").unwrap();
    let r = gc(&store, &mut |_| {}).unwrap();
    assert!(r.deleted_objects >= 300);
    let mut s = s;
    let mut d = s.new_version(seeds.len() as u64 * BS as u64, BS).unwrap();
    s.add_blocks(
        &mut d,
        seeds.iter().map(|&x| BlockInput::Data(block(x))).collect(),
    )
    .unwrap();
    assert_eq!(s.stats.new_chunks, 300, "gone objects are written again");
    let v = s.commit(d, &target("new", None)).unwrap().0;
    assert_clean(&store);
    assert_eq!(read_back(&store, &v)[299], block(299));
}

#[test]
fn gc_keeps_packs_of_a_live_writer_and_reaps_a_dead_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(&dir.path().join("s")).unwrap();
    let mut s = WriteSession::begin(&store, "test").unwrap();
    let mut d = s.new_version(100 * BS as u64, BS).unwrap();
    s.add_blocks(
        &mut d,
        (0..50).map(|x| BlockInput::Data(block(x))).collect(),
    )
    .unwrap();
    s.flush().unwrap(); // indexed, but reachable from nothing yet
    gc(&store, &mut |_| {}).unwrap();
    s.add_blocks(
        &mut d,
        (50..100).map(|x| BlockInput::Data(block(x))).collect(),
    )
    .unwrap();
    let v = s.commit(d, &target("img", None)).unwrap().0;
    assert_clean(&store);
    assert_eq!(read_back(&store, &v)[10], block(10));

    // An abandoned writer's objects are garbage for the next gc.
    let before = strata_store::stats::stats(&store).unwrap().unique_chunks;
    {
        let mut s = WriteSession::begin(&store, "test").unwrap();
        let mut d = s.new_version(10 * BS as u64, BS).unwrap();
        s.add_blocks(
            &mut d,
            (1000..1010).map(|x| BlockInput::Data(block(x))).collect(),
        )
        .unwrap();
        s.flush().unwrap();
    }
    assert_eq!(
        strata_store::stats::stats(&store).unwrap().unique_chunks,
        before + 10
    );
    gc(&store, &mut |_| {}).unwrap();
    assert_eq!(
        strata_store::stats::stats(&store).unwrap().unique_chunks,
        before
    );
    assert_clean(&store);
}

#[test]
fn ref_updates_are_compare_and_swap() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(&dir.path().join("s")).unwrap();
    let v1 = write_image(&store, "img", &[1, 2, 3]);
    // Two writers start from v1; the second to commit loses, clearly.
    let mk = |seed| {
        let mut s = WriteSession::begin(&store, "test").unwrap();
        let tip = s.pin_branch("img", "main").unwrap();
        assert_eq!(tip, Some(v1));
        let mut d = s.new_version(BS as u64, BS).unwrap();
        s.add_blocks(&mut d, vec![BlockInput::Data(block(seed))])
            .unwrap();
        (s, d)
    };
    let (a, da) = mk(10);
    let (b, db) = mk(20);
    let va = a.commit(da, &target("img", Some(v1))).unwrap().0;
    let err = b.commit(db, &target("img", Some(v1))).unwrap_err();
    assert!(err.to_string().contains("moved while"), "{err}");
    assert_eq!(store.resolve("img", None).unwrap(), va);
    assert_eq!(store.resolve("img", Some("main~1")).unwrap(), v1);
    gc(&store, &mut |_| {}).unwrap();
    assert_clean(&store);
}

#[test]
fn gc_rewrites_partly_dead_packs_and_keeps_the_live_objects() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(&dir.path().join("s")).unwrap();
    // "mixed" puts the blocks of both sets into one pack; "keep" then reuses some.
    let keep: Vec<u32> = (0..400).collect();
    let drop_: Vec<u32> = (10_000..10_600).collect();
    let all: Vec<u32> = keep.iter().chain(drop_.iter()).copied().collect();
    write_image(&store, "mixed", &all);
    let vk = write_image(&store, "keep", &keep);
    store.delete_image("mixed").unwrap();
    let r = gc(&store, &mut |_| {}).unwrap();
    assert!(r.deleted_objects >= 600, "{r:?}");
    assert!(r.bytes_after < r.bytes_before);
    // The data pack, and the tree pack (keep shares mixed's first leaf).
    assert_eq!(r.packs_rewritten, 2, "{r:?}");
    assert_eq!(r.packs_deleted, 0, "{r:?}");
    assert_clean(&store);
    let back = read_back(&store, &vk);
    assert_eq!(back.len(), 400);
    for (i, b) in back.iter().enumerate() {
        assert_eq!(*b, block(i as u32));
    }
    // A second gc finds nothing more to do.
    let r2 = gc(&store, &mut |_| {}).unwrap();
    assert_eq!(r2.deleted_objects, 0);
    assert_eq!(r2.packs_rewritten, 0);
}

#[test]
fn gc_merges_many_small_packs_into_few() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::init(&dir.path().join("s")).unwrap();
    // Twenty small writes (a sync round each), every one leaving its own small packs.
    let versions: Vec<(VersionId, Vec<u32>)> = (0..20u32)
        .map(|i| {
            let seeds: Vec<u32> = (i * 10..i * 10 + 3).collect();
            (write_image(&store, &format!("img{i}"), &seeds), seeds)
        })
        .collect();
    let before = store.backend().list_packs().unwrap().len();
    assert!(before >= 40, "{before} packs");
    let r = gc(&store, &mut |_| {}).unwrap();
    assert_eq!(r.packs_merged as usize, before, "{r:?}");
    assert_eq!(r.deleted_objects, 0, "{r:?}");
    let after = store.backend().list_packs().unwrap().len();
    // One pack per object kind: data, tree nodes, version records.
    assert!(after <= 3, "{after} packs after merging {before}");
    assert_clean(&store);
    for (v, seeds) in &versions {
        let back = read_back(&store, v);
        assert_eq!(back.len(), seeds.len());
        for (b, s) in back.iter().zip(seeds) {
            assert_eq!(*b, block(*s));
        }
    }
    // Merged packs are no longer small in number: nothing more to do.
    let r2 = gc(&store, &mut |_| {}).unwrap();
    assert_eq!(r2.packs_merged, 0, "{r2:?}");
    assert_eq!(r2.packs_rewritten, 0, "{r2:?}");
}
