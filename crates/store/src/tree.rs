//! Block maps as Merkle trees.
//!
//! A version's content is a map from block index to [`Entry`]: never written, all
//! zero, or a data chunk. The map is stored as a fixed-shape radix tree of fan-out
//! [`FANOUT`]: a leaf node (level 0) holds the entries of `FANOUT` consecutive blocks,
//! a node at level `l` holds references to `FANOUT` nodes of level `l - 1`. Nodes are
//! objects like any other, named by the hash of their bytes, so:
//!
//! * two versions that share a range of blocks share the nodes over it, and writing a
//!   version that changed a few blocks writes only the nodes on their paths;
//! * comparing two versions skips every subtree whose ids are equal, so a diff costs
//!   time in proportion to what changed, not to the image size;
//! * a subtree that is entirely unwritten or entirely zero is not stored at all: its
//!   parent records it as [`Entry::Unwritten`] or [`Entry::Zero`], so an empty 100 GiB
//!   image is one small node.
//!
//! The shape depends only on the number of blocks, and a node is always stored in its
//! canonical form, so equal content always yields equal ids.
//!
//! ```text
//! node := 'N' format:u8(=1) level:u8 reserved:u8 count:u16 reserved:u16
//!         tag:u8 * count          (0 unwritten, 1 zero, 2 present)
//!         id:[32] * (number of tags that are 2)
//! ```

use crate::id::ChunkId;

/// Entries per node. 256 entries of 64 KiB blocks make a leaf cover 16 MiB; a 100 GiB
/// image needs 6,400 leaves (about 53 MB of ids) and a tree three levels deep.
pub const FANOUT: usize = 256;
const NODE_HEADER: usize = 8;

/// One slot of the block map, or a reference to a subtree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Entry {
    /// Never written: reads as zeros, and a layer above may supply content instead.
    Unwritten,
    /// Explicitly zero.
    Zero,
    /// In a leaf: a data chunk. In an interior node: the id of a child node.
    Present(ChunkId),
}

impl Entry {
    pub fn is_uniform(&self) -> bool {
        !matches!(self, Entry::Present(_))
    }

    /// The chunk or node id, if the entry has one.
    pub fn id(&self) -> Option<ChunkId> {
        match self {
            Entry::Present(id) => Some(*id),
            _ => None,
        }
    }

    fn tag(&self) -> u8 {
        match self {
            Entry::Unwritten => 0,
            Entry::Zero => 1,
            Entry::Present(_) => 2,
        }
    }
}

/// The ids of the present entries, in order.
pub fn present_ids(entries: &[Entry]) -> Vec<ChunkId> {
    entries.iter().filter_map(Entry::id).collect()
}

/// A decoded tree node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    pub level: u8,
    pub entries: Vec<Entry>,
}

impl Node {
    pub fn encode(&self) -> Vec<u8> {
        let present = self
            .entries
            .iter()
            .filter(|e| matches!(e, Entry::Present(_)))
            .count();
        let mut b = Vec::with_capacity(NODE_HEADER + self.entries.len() + present * 32);
        b.extend_from_slice(&[b'N', 1, self.level, 0]);
        b.extend_from_slice(&(self.entries.len() as u16).to_le_bytes());
        b.extend_from_slice(&[0, 0]);
        b.extend(self.entries.iter().map(|e| e.tag()));
        for e in &self.entries {
            if let Entry::Present(id) = e {
                b.extend_from_slice(&id.0);
            }
        }
        b
    }

    /// Decode a node; every malformation is an error, never a panic.
    pub fn decode(b: &[u8]) -> Result<Node, String> {
        if b.len() < NODE_HEADER || b[0] != b'N' {
            return Err("not a tree node".into());
        }
        if b[1] != 1 {
            return Err(format!("unsupported tree node format {}", b[1]));
        }
        if b[3] != 0 || b[6] != 0 || b[7] != 0 {
            // Reserved bytes must be zero, or one node would have many encodings (ids).
            return Err("reserved bytes of tree node are not zero".into());
        }
        let level = b[2];
        let count = u16::from_le_bytes([b[4], b[5]]) as usize;
        if count == 0 || count > FANOUT {
            return Err(format!("tree node with {count} entries"));
        }
        let tags = b
            .get(NODE_HEADER..NODE_HEADER + count)
            .ok_or("tree node truncated in its tags")?;
        let mut ids = b[NODE_HEADER + count..].chunks_exact(32);
        let mut entries = Vec::with_capacity(count);
        for &t in tags {
            entries.push(match t {
                0 => Entry::Unwritten,
                1 => Entry::Zero,
                2 => Entry::Present(
                    ChunkId::from_slice(ids.next().ok_or("tree node truncated in its ids")?)
                        .expect("chunks_exact yields 32 bytes"),
                ),
                t => return Err(format!("unknown entry tag {t}")),
            });
        }
        if ids.next().is_some() || !ids.remainder().is_empty() {
            return Err("trailing bytes after tree node".into());
        }
        Ok(Node { level, entries })
    }
}

/// Levels of nodes needed for `blocks` blocks (at least one).
pub fn depth_for(blocks: u64) -> u8 {
    let mut depth = 1u8;
    let mut cover = FANOUT as u64;
    while cover < blocks {
        depth += 1;
        cover = cover.saturating_mul(FANOUT as u64);
    }
    depth
}

/// Blocks covered by one entry of a node at `level`.
pub fn entry_span(level: u8) -> u64 {
    (FANOUT as u64).saturating_pow(level as u32)
}

/// The reference a parent stores for a node with these entries: uniform subtrees are
/// not stored, so their canonical form is the uniform entry itself.
fn canonical(entries: &[Entry]) -> Option<Entry> {
    if entries.iter().all(|e| *e == Entry::Unwritten) {
        Some(Entry::Unwritten)
    } else if entries.iter().all(|e| *e == Entry::Zero) {
        Some(Entry::Zero)
    } else {
        None
    }
}

/// Builds a tree from block entries pushed in order, emitting finished nodes as it
/// goes. Memory: at most one partial node per level.
pub struct TreeBuilder {
    total_blocks: u64,
    depth: u8,
    pushed: u64,
    levels: Vec<Vec<Entry>>,
}

impl TreeBuilder {
    pub fn new(total_blocks: u64) -> TreeBuilder {
        let depth = depth_for(total_blocks);
        TreeBuilder {
            total_blocks,
            depth,
            pushed: 0,
            levels: (0..depth).map(|_| Vec::with_capacity(FANOUT)).collect(),
        }
    }

    pub fn depth(&self) -> u8 {
        self.depth
    }

    pub fn pushed(&self) -> u64 {
        self.pushed
    }

    /// Add the entry of the next block. `emit` receives each finished node (its id and
    /// encoded bytes) to store.
    pub fn push<E>(
        &mut self,
        entry: Entry,
        emit: &mut impl FnMut(ChunkId, Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        assert!(
            self.pushed < self.total_blocks,
            "more blocks than the tree holds"
        );
        self.pushed += 1;
        self.levels[0].push(entry);
        let mut level = 0usize;
        while self.levels[level].len() == FANOUT && level + 1 < self.depth as usize {
            let r = self.close(level, emit)?;
            self.levels[level + 1].push(r);
            level += 1;
        }
        Ok(())
    }

    /// Add a whole subtree at once: `entry` is the reference a parent holds for the
    /// level-`level` node over the next `entry_span(level + 1)` blocks (or over all
    /// that remain, if fewer do) — a uniform entry or a node id. Returns how many blocks
    /// it covered.
    ///
    /// The builder must stand at a multiple of that span, and the tree must have a
    /// level above `level` (`level + 1 < depth`); a violation panics, like pushing too
    /// many blocks. The result is the tree that pushing the subtree's block entries one
    /// by one would have built, provided `entry` is their canonical reference — as it is
    /// when taken from the same place of a tree with the same number of blocks. This is
    /// how a version that changes a few blocks of another reuses every untouched
    /// subtree without reading it.
    pub fn push_subtree<E>(
        &mut self,
        level: u8,
        entry: Entry,
        emit: &mut impl FnMut(ChunkId, Vec<u8>) -> Result<(), E>,
    ) -> Result<u64, E> {
        let l = level as usize;
        assert!(l + 1 < self.depth as usize, "no level above the subtree");
        let span = entry_span(level + 1);
        assert!(
            self.pushed.is_multiple_of(span) && self.pushed < self.total_blocks,
            "subtree not at an aligned position inside the tree"
        );
        debug_assert!(self.levels[..=l].iter().all(Vec::is_empty));
        let n = span.min(self.total_blocks - self.pushed);
        self.pushed += n;
        self.levels[l + 1].push(entry);
        let mut level = l + 1;
        while self.levels[level].len() == FANOUT && level + 1 < self.depth as usize {
            let r = self.close(level, emit)?;
            self.levels[level + 1].push(r);
            level += 1;
        }
        Ok(n)
    }

    fn close<E>(
        &mut self,
        level: usize,
        emit: &mut impl FnMut(ChunkId, Vec<u8>) -> Result<(), E>,
    ) -> Result<Entry, E> {
        let entries = std::mem::replace(&mut self.levels[level], Vec::with_capacity(FANOUT));
        if let Some(u) = canonical(&entries) {
            return Ok(u);
        }
        let bytes = Node {
            level: level as u8,
            entries,
        }
        .encode();
        let id = ChunkId::for_object(crate::id::ObjectKind::Tree, &bytes);
        emit(id, bytes)?;
        Ok(Entry::Present(id))
    }

    /// Close every partial node and return the root reference. All blocks must have
    /// been pushed.
    pub fn finish<E>(
        mut self,
        emit: &mut impl FnMut(ChunkId, Vec<u8>) -> Result<(), E>,
    ) -> Result<Entry, E> {
        assert_eq!(self.pushed, self.total_blocks, "tree finished early");
        if self.total_blocks == 0 {
            return Ok(Entry::Unwritten);
        }
        let top = self.depth as usize - 1;
        for level in 0..top {
            if !self.levels[level].is_empty() {
                let r = self.close(level, emit)?;
                self.levels[level + 1].push(r);
            }
        }
        self.close(top, emit)
    }
}

/// What a tree walk visits, in block order.
#[derive(Debug)]
pub enum Span<'a> {
    /// `count` consecutive blocks with the same uniform entry.
    Uniform {
        start: u64,
        count: u64,
        entry: Entry,
    },
    /// The entries of consecutive blocks starting at `start` (from one leaf).
    Blocks { start: u64, entries: &'a [Entry] },
}

/// Walk the blocks of `[from, to)` of a tree in order. `load` fetches a node by id.
pub fn walk<E>(
    load: &mut impl FnMut(&ChunkId) -> Result<Node, E>,
    root: Entry,
    depth: u8,
    from: u64,
    to: u64,
    visit: &mut impl FnMut(Span) -> Result<(), E>,
) -> Result<(), E>
where
    E: From<String>,
{
    walk_rec(load, root, depth as i32 - 1, 0, from, to, visit)
}

fn walk_rec<E>(
    load: &mut impl FnMut(&ChunkId) -> Result<Node, E>,
    r: Entry,
    level: i32,
    base: u64,
    from: u64,
    to: u64,
    visit: &mut impl FnMut(Span) -> Result<(), E>,
) -> Result<(), E>
where
    E: From<String>,
{
    let cover = entry_span(level as u8 + 1);
    let (lo, hi) = (base.max(from), base.saturating_add(cover).min(to));
    if lo >= hi {
        return Ok(());
    }
    let id = match r {
        Entry::Present(id) => id,
        uniform => {
            return visit(Span::Uniform {
                start: lo,
                count: hi - lo,
                entry: uniform,
            })
        }
    };
    let node = load(&id)?;
    if node.level as i32 != level {
        return Err(E::from(format!(
            "tree node {id} has level {}, expected {level}",
            node.level
        )));
    }
    if level == 0 {
        let first = (lo - base) as usize;
        let last = ((hi - base) as usize).min(node.entries.len());
        if first < last {
            visit(Span::Blocks {
                start: lo,
                entries: &node.entries[first..last],
            })?;
        }
        if last < (hi - base) as usize {
            return Err(E::from(format!("tree node {id} is shorter than the image")));
        }
        return Ok(());
    }
    let span = entry_span(level as u8);
    for (i, child) in node.entries.iter().enumerate() {
        let cbase = base + i as u64 * span;
        if cbase >= hi {
            break;
        }
        walk_rec(load, *child, level - 1, cbase, from, to, visit)?;
    }
    Ok(())
}

/// Look up the entry of one block.
pub fn get<E>(
    load: &mut impl FnMut(&ChunkId) -> Result<Node, E>,
    root: Entry,
    depth: u8,
    block: u64,
) -> Result<Entry, E>
where
    E: From<String>,
{
    let mut out = Entry::Unwritten;
    walk(load, root, depth, block, block + 1, &mut |s| {
        out = match s {
            Span::Uniform { entry, .. } => entry,
            Span::Blocks { entries, .. } => entries[0],
        };
        Ok(())
    })?;
    Ok(out)
}

/// A side of a comparison: a tree root and its depth.
#[derive(Clone, Copy, Debug)]
pub struct TreeRef {
    pub root: Entry,
    pub depth: u8,
}

/// Report every block whose *content* differs between `a` and `b` (unwritten and zero
/// both read as zeros, so they are equal), as merged `(start, count)` runs in order.
/// Subtrees with equal ids are skipped without being loaded.
pub fn diff<E>(
    load: &mut impl FnMut(&ChunkId) -> Result<Node, E>,
    a: TreeRef,
    b: TreeRef,
    out: &mut impl FnMut(u64, u64) -> Result<(), E>,
) -> Result<(), E>
where
    E: From<String>,
{
    let mut pending: Option<(u64, u64)> = None;
    let mut emit = |start: u64, count: u64| -> Result<(), E> {
        match &mut pending {
            Some((s, c)) if *s + *c == start => *c += count,
            _ => {
                if let Some((s, c)) = pending.take() {
                    out(s, c)?;
                }
                pending = Some((start, count));
            }
        }
        Ok(())
    };
    diff_rec(
        load,
        a.root,
        a.depth as i32 - 1,
        b.root,
        b.depth as i32 - 1,
        0,
        &mut emit,
    )?;
    if let Some((s, c)) = pending {
        out(s, c)?;
    }
    Ok(())
}

fn children<E>(
    load: &mut impl FnMut(&ChunkId) -> Result<Node, E>,
    r: Entry,
    level: i32,
    at: i32,
) -> Result<Vec<Entry>, E>
where
    E: From<String>,
{
    // `r` sits at `level`; we need its view as `FANOUT` children at `at - 1`.
    if level < at {
        // A shallower tree occupies only the first child of a deeper one.
        let mut v = vec![Entry::Unwritten; FANOUT];
        v[0] = r;
        return Ok(v);
    }
    match r {
        Entry::Present(id) => {
            let node = load(&id)?;
            if node.level as i32 != level {
                return Err(E::from(format!(
                    "tree node {id} has level {}, expected {level}",
                    node.level
                )));
            }
            let mut v = node.entries;
            v.resize(FANOUT, Entry::Unwritten);
            Ok(v)
        }
        uniform => Ok(vec![uniform; FANOUT]),
    }
}

fn diff_rec<E>(
    load: &mut impl FnMut(&ChunkId) -> Result<Node, E>,
    a: Entry,
    la: i32,
    b: Entry,
    lb: i32,
    base: u64,
    emit: &mut impl FnMut(u64, u64) -> Result<(), E>,
) -> Result<(), E>
where
    E: From<String>,
{
    if a.is_uniform() && b.is_uniform() {
        return Ok(());
    }
    if la == lb && a == b {
        return Ok(());
    }
    let top = la.max(lb);
    if top < 0 {
        return emit(base, 1);
    }
    let ca = children(load, a, la, top)?;
    let cb = children(load, b, lb, top)?;
    // Children of a level-`top` node sit one level down; a shallower side keeps its
    // own level until the two meet.
    let (na, nb) = (
        if la == top { la - 1 } else { la },
        if lb == top { lb - 1 } else { lb },
    );
    let span = entry_span(top as u8);
    for i in 0..FANOUT {
        let (na_i, nb_i) = (
            if la < top && i > 0 { -1 } else { na },
            if lb < top && i > 0 { -1 } else { nb },
        );
        diff_rec(load, ca[i], na_i, cb[i], nb_i, base + i as u64 * span, emit)?;
    }
    Ok(())
}
