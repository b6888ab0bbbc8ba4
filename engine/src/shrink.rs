//! Giving memory back: the engine's per-document tables shrink when they hold far fewer
//! entries than they have room for, so that memory follows what subscriptions hold and
//! returns once they end.

/// Shrinks a map that holds far fewer entries than it has room for, so that memory follows
/// what is held (amortised: a shrink to twice the size happens after many removals).
pub fn shrink_if_sparse<K: std::hash::Hash + Eq, V, S: std::hash::BuildHasher>(
    map: &mut std::collections::HashMap<K, V, S>,
) {
    if map.capacity() > 4096 && map.len() * 8 < map.capacity() {
        map.shrink_to(map.len() * 2);
    }
}
