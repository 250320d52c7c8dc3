//! What a simulated user writes between two check-ins.
//!
//! Every block is a pure function of (point, generation, block index), so nothing
//! has to be kept in memory to know what a point wrote: a few blocks per check-in,
//! each a mix of random bytes (incompressible: documents, images) and text with
//! counters in it (compressible: logs, office files). The mix is what makes the
//! hub's work realistic: zstd has something to do, and a changed block at a place
//! that held data before can travel as a delta against it.

/// A small deterministic generator (splitmix64): schedules and block positions must
/// not cost a system call per number, and need no cryptographic quality.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    /// Seeded from the OS, for a run that should differ from the last.
    pub fn from_os() -> Rng {
        let mut b = [0u8; 8];
        getrandom::getrandom(&mut b).expect("the OS random source is available");
        Rng(u64::from_le_bytes(b))
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n) (n > 0; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            v.swap(i, j);
        }
    }
}

/// The shape of one check-in's writes.
#[derive(Clone, Debug)]
pub struct Writes {
    pub block_size: usize,
    /// Blocks of the user disk.
    pub blocks: u64,
    /// Blocks rewritten per check-in.
    pub changed: usize,
    /// Random bytes at the start of each rewritten block; the rest is text.
    pub random_bytes: usize,
}

impl Writes {
    /// The distinct block indices point `point` rewrites in its `generation`-th
    /// check-in, ascending.
    pub fn positions(&self, point: u64, generation: u64) -> Vec<u64> {
        let mut rng = Rng::new(
            point
                .wrapping_mul(0x2545_f491_4f6c_dd1d)
                .wrapping_add(generation.wrapping_mul(0x9e37_79b9)),
        );
        let want = (self.changed as u64).min(self.blocks) as usize;
        let mut out: Vec<u64> = Vec::with_capacity(want);
        while out.len() < want {
            let b = rng.below(self.blocks);
            if !out.contains(&b) {
                out.push(b);
            }
        }
        out.sort_unstable();
        out
    }

    /// The content of block `index` as point `point` writes it in its
    /// `generation`-th check-in.
    pub fn block(&self, point: u64, generation: u64, index: u64) -> Vec<u8> {
        let mut buf = vec![0u8; self.block_size];
        let r = self.random_bytes.min(self.block_size);
        let mut h = blake3::Hasher::new();
        h.update(b"strata-load block");
        h.update(&point.to_le_bytes());
        h.update(&generation.to_le_bytes());
        h.update(&index.to_le_bytes());
        h.finalize_xof().fill(&mut buf[..r]);
        let mut pos = r;
        let mut line = 0u64;
        while pos < buf.len() {
            let s = format!(
                "{generation:08} point {point} block {index} line {line}: autosaved Quarterly report.docx, 3 pages\n"
            );
            let n = s.len().min(buf.len() - pos);
            buf[pos..pos + n].copy_from_slice(&s.as_bytes()[..n]);
            pos += n;
            line += 1;
        }
        buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_deterministic_distinct_and_mixed() {
        let w = Writes {
            block_size: 64 << 10,
            blocks: 128,
            changed: 3,
            random_bytes: 8 << 10,
        };
        let p = w.positions(7, 2);
        assert_eq!(p, w.positions(7, 2));
        assert_eq!(p.len(), 3);
        assert!(p.windows(2).all(|x| x[0] < x[1]) && p.iter().all(|&b| b < 128));
        let a = w.block(7, 2, p[0]);
        assert_eq!(a, w.block(7, 2, p[0]));
        assert_ne!(a, w.block(7, 3, p[0]));
        assert_eq!(a.len(), 64 << 10);
        // The text part repeats itself enough to compress well, the random part not.
        assert!(a[8 << 10..].starts_with(b"00000002 point 7"));
    }

    #[test]
    fn shuffle_is_a_permutation() {
        let mut v: Vec<u32> = (0..1000).collect();
        Rng::new(1).shuffle(&mut v);
        let mut s = v.clone();
        s.sort_unstable();
        assert_eq!(s, (0..1000).collect::<Vec<_>>());
        assert_ne!(v, s);
    }
}
