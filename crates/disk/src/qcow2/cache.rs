//! A small bounded LRU cache shared between reader threads.
//!
//! qcow2 reads need the L2 table of every cluster they touch (and compressed
//! clusters must be inflated whole even for a 4 KiB read). Re-reading an L2 table
//! per request would double the I/O, and keeping all of them would cost 1/8000th of
//! the virtual size in memory, so recently used tables are kept up to a fixed
//! number. Values are `Arc`s so a reader keeps using a table after it is evicted.
//! The lock is held only for map operations, never during I/O: two threads missing
//! on the same key both load it, which is harmless.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

struct Inner<V> {
    /// key -> (value, last-use tick)
    map: HashMap<u64, (Arc<V>, u64)>,
    /// last-use tick -> key, oldest first
    order: BTreeMap<u64, u64>,
    tick: u64,
}

pub(crate) struct Lru<V> {
    inner: Mutex<Inner<V>>,
    capacity: usize,
}

impl<V> Lru<V> {
    /// A cache holding at most `capacity` (at least 1) values.
    pub(crate) fn new(capacity: usize) -> Lru<V> {
        Lru {
            inner: Mutex::new(Inner {
                map: HashMap::new(),
                order: BTreeMap::new(),
                tick: 0,
            }),
            capacity: capacity.max(1),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<V>> {
        // A panic while holding the lock cannot leave the maps inconsistent in a way
        // that matters for a cache, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn get(&self, key: u64) -> Option<Arc<V>> {
        let mut g = self.lock();
        let inner = &mut *g;
        inner.tick += 1;
        let tick = inner.tick;
        let (value, last) = inner.map.get_mut(&key)?;
        inner.order.remove(last);
        *last = tick;
        inner.order.insert(tick, key);
        Some(Arc::clone(value))
    }

    pub(crate) fn insert(&self, key: u64, value: Arc<V>) {
        let mut g = self.lock();
        let inner = &mut *g;
        inner.tick += 1;
        let tick = inner.tick;
        if let Some((_, old)) = inner.map.insert(key, (value, tick)) {
            inner.order.remove(&old);
        }
        inner.order.insert(tick, key);
        while inner.map.len() > self.capacity {
            let Some((_, oldest)) = inner.order.pop_first() else {
                break;
            };
            inner.map.remove(&oldest);
        }
    }

    /// Return the cached value for `key`, or load, insert and return it.
    pub(crate) fn get_or_load<E>(
        &self,
        key: u64,
        load: impl FnOnce() -> Result<V, E>,
    ) -> Result<Arc<V>, E> {
        if let Some(v) = self.get(key) {
            return Ok(v);
        }
        let v = Arc::new(load()?);
        self.insert(key, Arc::clone(&v));
        Ok(v)
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.lock().map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn evicts_least_recently_used() {
        let lru = Lru::new(2);
        lru.insert(1, Arc::new("a"));
        lru.insert(2, Arc::new("b"));
        assert_eq!(lru.get(1).as_deref(), Some(&"a")); // 1 is now newer than 2
        lru.insert(3, Arc::new("c"));
        assert_eq!(lru.len(), 2);
        assert!(lru.get(2).is_none());
        assert_eq!(lru.get(1).as_deref(), Some(&"a"));
        assert_eq!(lru.get(3).as_deref(), Some(&"c"));
        let v: Result<_, ()> = lru.get_or_load(4, || Ok("d"));
        assert_eq!(*v.unwrap(), "d");
        assert!(lru.get(1).is_none());
    }
}
