//! Receiving objects from another store (what push and pull do): verification,
//! children before parents, gc safety until the commit, shallow history.

use strata_store::tree::Node;
use strata_store::{
    BlockInput, BranchUpdate, ChunkId, CommitTarget, Entry, ObjectKind, RefKind, Store, StoreError,
    WriteSession,
};

const BS: u32 = 4096;

fn block(i: u32) -> Vec<u8> {
    let mut b = vec![0u8; BS as usize];
    b[..4].copy_from_slice(&i.to_le_bytes());
    b[4..12].copy_from_slice(b"received");
    b
}

/// A source store with `n` blocks on img:main, parented on a version it lacks.
fn source(dir: &std::path::Path, n: u32, parent: Option<ChunkId>) -> (Store, ChunkId) {
    let s = Store::init(dir).unwrap();
    let mut w = WriteSession::begin(&s, "t").unwrap();
    let mut d = w.new_version(n as u64 * BS as u64, BS).unwrap();
    w.add_blocks(&mut d, (0..n).map(|i| BlockInput::Data(block(i))).collect())
        .unwrap();
    let (v, _, _) = w
        .commit(
            d,
            &CommitTarget {
                image: "img".into(),
                branch: "main".into(),
                expected: None,
                create_image: true,
                parents: parent.into_iter().collect(),
                author: "t".into(),
                message: String::new(),
            },
        )
        .unwrap();
    (s, v)
}

/// Every object of version `v`, children before parents.
fn objects(s: &Store, v: &ChunkId) -> Vec<(ObjectKind, ChunkId, Vec<u8>)> {
    fn node(s: &Store, id: ChunkId, out: &mut Vec<(ObjectKind, ChunkId, Vec<u8>)>) {
        let n = s.load_node(&id).unwrap();
        for c in n.entries.iter().filter_map(Entry::id) {
            if n.level == 0 {
                out.push((ObjectKind::Data, c, s.read_chunks(&[c]).unwrap().remove(0)));
            } else {
                node(s, c, out);
            }
        }
        out.push((
            ObjectKind::Tree,
            id,
            s.read_object(&id, ObjectKind::Tree).unwrap(),
        ));
    }
    let ver = s.load_version(v).unwrap();
    let mut out = Vec::new();
    node(s, ver.root_entry().unwrap().id().unwrap(), &mut out);
    out.push((
        ObjectKind::Version,
        *v,
        s.read_object(v, ObjectKind::Version).unwrap(),
    ));
    out
}

fn refs(o: &[(ObjectKind, ChunkId, Vec<u8>)]) -> Vec<(ObjectKind, ChunkId, &[u8])> {
    o.iter().map(|(k, i, r)| (*k, *i, r.as_slice())).collect()
}

#[test]
fn receive_verify_order_gc_and_commit() {
    let dir = tempfile::tempdir().unwrap();
    let (src, v) = source(&dir.path().join("src"), 600, Some(ChunkId([9; 32])));
    let objs = objects(&src, &v);
    let dst = Store::init(&dir.path().join("dst")).unwrap();
    let mut w = WriteSession::begin(&dst, "receive").unwrap();
    let ids: Vec<ChunkId> = objs.iter().map(|o| o.1).collect();
    assert_eq!(w.lacking(&ids).unwrap(), ids);

    // A forged object and a parent before its children are refused, storing nothing.
    let mut forged = objs[0].clone();
    forged.2[100] ^= 1;
    assert!(matches!(
        w.add_received(&refs(&[forged])),
        Err(StoreError::Corrupt { .. })
    ));
    let leaf = objs
        .iter()
        .find(|o| o.0 == ObjectKind::Tree)
        .unwrap()
        .clone();
    assert!(matches!(
        w.add_received(&refs(&[leaf])),
        Err(StoreError::MissingObject { .. })
    ));
    assert_eq!(w.lacking(&ids).unwrap().len(), ids.len());

    // Half the data, then a gc: the session protects it.
    let data: Vec<_> = objs
        .iter()
        .filter(|o| o.0 == ObjectKind::Data)
        .cloned()
        .collect();
    let (first, rest) = data.split_at(300);
    assert_eq!(w.add_received(&refs(first)).unwrap(), 300);
    w.flush().unwrap();
    let report = strata_store::gc::gc(&dst, &mut |_| {}).unwrap();
    assert_eq!(report.deleted_objects, 0);
    assert_eq!(w.lacking(&ids).unwrap().len(), ids.len() - 300);
    let others: Vec<_> = objs
        .iter()
        .filter(|o| o.0 != ObjectKind::Data)
        .cloned()
        .collect();
    let mut all = rest.to_vec();
    all.extend(others);
    w.add_received(&refs(&all)).unwrap();
    assert!(w.lacking(&ids).unwrap().is_empty());
    let target = BranchUpdate {
        image: "img".into(),
        branch: "main".into(),
        expected: None,
        create_image: true,
    };
    w.commit_received(&v, &target).unwrap();
    assert_eq!(
        dst.get_ref("img", RefKind::Branch, "main").unwrap(),
        Some(v)
    );

    // The parent is absent (shallow history): gc and verify are fine with that.
    strata_store::gc::gc(&dst, &mut |_| {}).unwrap();
    assert!(strata_store::verify::verify(&dst, &|_| {}).unwrap().ok());
    assert_eq!(dst.read_objects(&[v, ChunkId([1; 32])]).unwrap()[1], None);

    // A second commit against a stale expectation conflicts and changes nothing.
    let w = WriteSession::begin(&dst, "again").unwrap();
    assert!(matches!(
        w.commit_received(&v, &target),
        Err(StoreError::RefConflict { .. })
    ));
}

#[test]
fn a_node_from_another_domain_is_not_a_node() {
    let dir = tempfile::tempdir().unwrap();
    let dst = Store::init(dir.path()).unwrap();
    let mut w = WriteSession::begin(&dst, "t").unwrap();
    let node = Node {
        level: 0,
        entries: vec![Entry::Zero],
    }
    .encode();
    // Right bytes, id computed in the data domain: refused.
    assert!(w
        .add_received(&[(ObjectKind::Tree, ChunkId::of(&node), &node)])
        .is_err());
    let id = ChunkId::for_object(ObjectKind::Tree, &node);
    assert_eq!(w.add_received(&[(ObjectKind::Tree, id, &node)]).unwrap(), 1);
}
