//! A small least-recently-used cache bounded by a total weight (entries, or bytes).

use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;

pub(crate) struct Lru<K, V> {
    capacity: usize,
    weight: usize,
    tick: u64,
    map: HashMap<K, (V, usize, u64)>,
    order: BTreeMap<u64, K>,
}

impl<K: Hash + Eq + Clone, V: Clone> Lru<K, V> {
    /// A cache holding at most `capacity` units of weight (at least one entry).
    pub(crate) fn new(capacity: usize) -> Lru<K, V> {
        Lru {
            capacity,
            weight: 0,
            tick: 0,
            map: HashMap::new(),
            order: BTreeMap::new(),
        }
    }

    pub(crate) fn get(&mut self, k: &K) -> Option<V> {
        let (v, _, t) = self.map.get_mut(k)?;
        self.order.remove(t);
        self.tick += 1;
        *t = self.tick;
        self.order.insert(self.tick, k.clone());
        Some(v.clone())
    }

    pub(crate) fn insert(&mut self, k: K, v: V, weight: usize) {
        if let Some((_, w, t)) = self.map.remove(&k) {
            self.order.remove(&t);
            self.weight -= w;
        }
        while !self.map.is_empty() && self.weight + weight > self.capacity {
            let (_, old) = self.order.pop_first().expect("order mirrors map");
            let (_, w, _) = self.map.remove(&old).expect("order mirrors map");
            self.weight -= w;
        }
        self.tick += 1;
        self.weight += weight;
        self.order.insert(self.tick, k.clone());
        self.map.insert(k, (v, weight, self.tick));
    }
}

#[cfg(test)]
mod tests {
    use super::Lru;

    #[test]
    fn evicts_least_recently_used_by_weight() {
        let mut c = Lru::new(3);
        c.insert(1, "a", 1);
        c.insert(2, "b", 1);
        c.insert(3, "c", 1);
        assert_eq!(c.get(&1), Some("a"));
        c.insert(4, "d", 1);
        assert_eq!(c.get(&2), None);
        assert_eq!(c.get(&1), Some("a"));
        c.insert(5, "e", 2);
        assert_eq!(c.get(&3), None);
        assert_eq!(c.get(&4), None);
        assert_eq!(c.get(&1), Some("a"));
        assert_eq!(c.get(&5), Some("e"));
        // An entry heavier than the whole cache still fits, alone.
        c.insert(6, "f", 10);
        assert_eq!(c.get(&1), None);
        assert_eq!(c.get(&6), Some("f"));
    }
}
