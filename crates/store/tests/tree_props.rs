//! Property tests of the block-map tree: what goes in comes out, diffs are exact, and
//! a new version shares every node its change did not touch.

use std::collections::{BTreeSet, HashMap};

use proptest::prelude::*;
use strata_store::tree::{self, depth_for, Node, Span, TreeBuilder, TreeRef, FANOUT};
use strata_store::{ChunkId, Entry};

type Nodes = HashMap<ChunkId, Vec<u8>>;

fn entry_of(code: u8) -> Entry {
    match code {
        0 => Entry::Unwritten,
        1 => Entry::Zero,
        n => Entry::Present(ChunkId::of(&[n])),
    }
}

/// Build a tree over `map`; returns the root and the ids of the nodes it emitted.
fn build(map: &[Entry], nodes: &mut Nodes) -> (TreeRef, BTreeSet<ChunkId>) {
    let mut b = TreeBuilder::new(map.len() as u64);
    let depth = b.depth();
    let mut emitted = BTreeSet::new();
    let mut emit = |id: ChunkId, bytes: Vec<u8>| -> Result<(), String> {
        assert_eq!(
            ChunkId::for_object(strata_store::ObjectKind::Tree, &bytes),
            id
        );
        emitted.insert(id);
        nodes.insert(id, bytes);
        Ok(())
    };
    for e in map {
        b.push(*e, &mut emit).unwrap();
    }
    let root = b.finish(&mut emit).unwrap();
    (TreeRef { root, depth }, emitted)
}

fn loader(nodes: &Nodes) -> impl FnMut(&ChunkId) -> Result<Node, String> + '_ {
    move |id| Node::decode(nodes.get(id).ok_or("missing node")?)
}

/// All nodes reachable from a root.
fn reachable(nodes: &Nodes, r: Entry, out: &mut BTreeSet<ChunkId>) {
    if let Entry::Present(id) = r {
        if out.insert(id) {
            let n = Node::decode(&nodes[&id]).unwrap();
            if n.level > 0 {
                for e in n.entries {
                    reachable(nodes, e, out);
                }
            }
        }
    }
}

fn read_all(nodes: &Nodes, t: TreeRef, blocks: u64) -> Vec<Entry> {
    let mut out = Vec::new();
    tree::walk(&mut loader(nodes), t.root, t.depth, 0, blocks, &mut |s| {
        match s {
            Span::Uniform { count, entry, .. } => {
                out.extend(std::iter::repeat_n(entry, count as usize))
            }
            Span::Blocks { entries, .. } => out.extend_from_slice(entries),
        }
        Ok::<(), String>(())
    })
    .unwrap();
    out
}

fn same_content(a: Entry, b: Entry) -> bool {
    a == b || (a.is_uniform() && b.is_uniform())
}

fn map_strategy(max: usize) -> impl Strategy<Value = Vec<Entry>> {
    // Mostly runs, as real disks are: long holes, zero areas and data regions; stretched
    // so that trees of depth 3 (over 65,536 blocks) occur too.
    (
        prop::collection::vec((0u8..6, 1usize..600), 1..12),
        1usize..40,
    )
        .prop_map(move |(runs, stretch)| {
            let mut v = Vec::new();
            for (code, len) in runs {
                for i in 0..len * stretch {
                    v.push(if code >= 2 {
                        entry_of(2 + ((code as usize * 31 + i) % 250) as u8)
                    } else {
                        entry_of(code)
                    });
                }
            }
            v.truncate(max);
            v
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn walk_returns_what_was_built(map in map_strategy(70_000)) {
        let mut nodes = Nodes::new();
        let (t, _) = build(&map, &mut nodes);
        prop_assert_eq!(t.depth, depth_for(map.len() as u64));
        prop_assert_eq!(read_all(&nodes, t, map.len() as u64), map.clone());
        for probe in [0, map.len() / 3, map.len() - 1] {
            let got = tree::get(&mut loader(&nodes), t.root, t.depth, probe as u64).unwrap();
            prop_assert_eq!(got, map[probe]);
        }
    }

    #[test]
    fn diff_is_exact_and_sharing_is_real(
        map in map_strategy(70_000),
        writes in prop::collection::vec((any::<prop::sample::Index>(), 0u8..8), 0..40),
    ) {
        let mut nodes = Nodes::new();
        let (ta, nodes_a) = build(&map, &mut nodes);
        let mut changed = map.clone();
        for (idx, code) in &writes {
            let i = idx.index(changed.len());
            changed[i] = entry_of(*code);
        }
        let (tb, _) = build(&changed, &mut nodes);

        // Diff equals the set of blocks whose content really changed.
        let expect: Vec<u64> = (0..map.len())
            .filter(|&i| !same_content(map[i], changed[i]))
            .map(|i| i as u64)
            .collect();
        let mut got = Vec::new();
        tree::diff(&mut loader(&nodes), ta, tb, &mut |s, c| {
            got.extend(s..s + c);
            Ok::<(), String>(())
        }).unwrap();
        prop_assert_eq!(&got, &expect);

        // Sharing: nodes of the new version that the old one lacks lie on the paths of
        // changed leaves only.
        let mut reach_a = BTreeSet::new();
        reachable(&nodes, ta.root, &mut reach_a);
        prop_assert!(nodes_a.is_superset(&reach_a));
        let mut reach_b = BTreeSet::new();
        reachable(&nodes, tb.root, &mut reach_b);
        let new_nodes = reach_b.difference(&reach_a).count();
        let touched_leaves: BTreeSet<usize> = (0..map.len())
            .filter(|&i| map[i] != changed[i])
            .map(|i| i / FANOUT)
            .collect();
        prop_assert!(new_nodes <= touched_leaves.len() * tb.depth as usize,
            "{} new nodes for {} touched leaves at depth {}", new_nodes, touched_leaves.len(), tb.depth);
        if touched_leaves.is_empty() {
            prop_assert_eq!(ta.root, tb.root);
        }
    }

    #[test]
    fn diff_across_sizes(a in map_strategy(3_000), b in map_strategy(80_000)) {
        let mut nodes = Nodes::new();
        let (ta, _) = build(&a, &mut nodes);
        let (tb, _) = build(&b, &mut nodes);
        let n = a.len().max(b.len());
        let at = |m: &Vec<Entry>, i: usize| m.get(i).copied().unwrap_or(Entry::Unwritten);
        let expect: Vec<u64> = (0..n)
            .filter(|&i| !same_content(at(&a, i), at(&b, i)))
            .map(|i| i as u64)
            .collect();
        for (x, y) in [(ta, tb), (tb, ta)] {
            let mut got = Vec::new();
            tree::diff(&mut loader(&nodes), x, y, &mut |s, c| {
                got.extend(s..s + c);
                Ok::<(), String>(())
            }).unwrap();
            prop_assert_eq!(&got, &expect);
        }
    }

    #[test]
    fn node_decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..600)) {
        let _ = Node::decode(&bytes);
    }
}

#[test]
fn empty_and_uniform_images_store_no_nodes() {
    let mut nodes = Nodes::new();
    let (t, emitted) = build(&vec![Entry::Unwritten; 1_600_000], &mut nodes);
    assert_eq!(t.root, Entry::Unwritten);
    assert!(emitted.is_empty());
    let (t, emitted) = build(&vec![Entry::Zero; 70_000], &mut nodes);
    assert_eq!(t.root, Entry::Zero);
    assert!(emitted.is_empty());
    let (t, _) = build(&[], &mut nodes);
    assert_eq!(t.root, Entry::Unwritten);
}

#[test]
fn one_changed_block_of_a_big_image_writes_one_path() {
    // 100 GiB of 64 KiB blocks, sparse except for data every 97 blocks.
    let n = 1_638_400usize;
    let mut map: Vec<Entry> = (0..n)
        .map(|i| {
            if i % 97 == 0 {
                Entry::Present(ChunkId::of(&(i as u64).to_le_bytes()))
            } else {
                Entry::Unwritten
            }
        })
        .collect();
    let mut nodes = Nodes::new();
    let (ta, _) = build(&map, &mut nodes);
    map[n / 2] = Entry::Present(ChunkId::of(b"changed"));
    let (tb, _) = build(&map, &mut nodes);
    let (mut ra, mut rb) = (BTreeSet::new(), BTreeSet::new());
    reachable(&nodes, ta.root, &mut ra);
    reachable(&nodes, tb.root, &mut rb);
    assert_eq!(rb.difference(&ra).count(), tb.depth as usize);
    let mut diffs = Vec::new();
    let mut loads = 0;
    let mut counting = |id: &ChunkId| {
        loads += 1;
        Node::decode(&nodes[id])
    };
    tree::diff(&mut counting, ta, tb, &mut |s, c| {
        diffs.push((s, c));
        Ok::<(), String>(())
    })
    .unwrap();
    assert_eq!(diffs, vec![(n as u64 / 2, 1)]);
    // The diff loads only the nodes on the changed path, on both sides.
    assert_eq!(loads, 2 * tb.depth as usize);
}
