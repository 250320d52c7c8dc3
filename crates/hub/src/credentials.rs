//! Point credentials known to be good, kept in memory so that a request costs no
//! database lookup and no thread hop to check its bearer credential. Under the
//! scale benchmark that check, run on every request, took 11% of the hub's CPU.
//!
//! Only valid (enrolled, not revoked) credentials are kept, one entry per
//! credential, so the map is bounded by the number of points. The hub process is
//! the only writer of its database, and every change to a point's credential
//! (revocation, enrolment again under the same name) goes through it. Each such
//! change writes the database first and then [forgets](CredentialCache::forget_point)
//! the point. A lookup that read the database before the change cannot put the old
//! answer back afterwards, because remembering needs the generation read before
//! the lookup, and forgetting moves it on.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::db::SecretHash;

/// How often a point's last contact is written (`touch_point` skips smaller steps
/// anyway).
const TOUCH_EVERY: Duration = Duration::from_secs(60);

#[derive(Default)]
pub(crate) struct CredentialCache {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    generation: u64,
    known: HashMap<SecretHash, Known>,
}

struct Known {
    point: String,
    touched: Instant,
}

impl CredentialCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// To pass to [`remember`](Self::remember) after a database lookup.
    pub fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// The point holding credential `h`, and whether its last contact is due to be
    /// written (then it counts as written from now).
    pub fn lookup(&self, h: &SecretHash) -> Option<(String, bool)> {
        let mut inner = self.lock();
        let k = inner.known.get_mut(h)?;
        let due = k.touched.elapsed() >= TOUCH_EVERY;
        if due {
            k.touched = Instant::now();
        }
        Some((k.point.clone(), due))
    }

    /// `h` is `point`'s valid credential, as the database said at `generation`
    /// (ignored if a credential changed since), and its last contact was just written.
    pub fn remember(&self, h: SecretHash, point: &str, generation: u64) {
        let mut inner = self.lock();
        if inner.generation == generation {
            inner.known.insert(
                h,
                Known {
                    point: point.to_string(),
                    touched: Instant::now(),
                },
            );
        }
    }

    /// `point`'s credential changed (revoked, or replaced by a new enrolment).
    pub fn forget_point(&self, point: &str) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.known.retain(|_, k| k.point != point);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lookup_from_before_a_change_is_not_remembered() {
        let c = CredentialCache::default();
        let (a, b) = ([1u8; 32], [2u8; 32]);
        let g = c.generation();
        c.remember(a, "p1", g);
        assert_eq!(c.lookup(&a), Some(("p1".to_string(), false)));
        // A lookup started, then p2's credential changed, then it finished.
        let g = c.generation();
        c.forget_point("p2");
        c.remember(b, "p2", g);
        assert_eq!(c.lookup(&b), None);
        // Revoking p1 forgets its credential; others stay.
        let g = c.generation();
        c.remember(b, "p2", g);
        c.forget_point("p1");
        assert_eq!(c.lookup(&a), None);
        assert_eq!(c.lookup(&b).map(|x| x.0), Some("p2".to_string()));
    }
}
