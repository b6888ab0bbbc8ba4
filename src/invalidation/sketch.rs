//! The cache sketch: an expiring Bloom filter of the URLs that may be stale in some cache.
//!
//! A URL enters when its result changes while a copy served earlier may still live in a cache
//! (a browser, a service worker), and leaves when the last such copy has expired. A client
//! that fetches the sketch (`GET /v1/cache-sketch`) revalidates the URLs it contains and may
//! take every other URL from its cache: a Bloom filter has no false negatives, so a client
//! never reads a stale copy that the sketch it holds knows about.
//!
//! # Hash scheme
//! The filter has `m` bits and `k` hash functions. For a URL (its request target: path and
//! query, as requested, e.g. `/v1/db/app/todos?filter=%7B%22done%22%3Afalse%7D`):
//! 1. `h` = 64-bit FNV-1a of the URL's UTF-8 bytes (offset basis `0xcbf29ce484222325`, prime
//!    `0x100000001b3`, arithmetic modulo 2^64);
//! 2. `h1` = the low 32 bits of `h`, `h2` = the high 32 bits;
//! 3. bit `i` for `i` in `0..k` is `(h1 + i * h2) mod m` (exact integer arithmetic: the sum is
//!    below 2^53 whenever `k` < 2^20, so JavaScript numbers hold it).
//!
//! The URL is in the sketch when all `k` bits are set. Bit `j` is bit `j % 8` (least
//! significant first) of byte `j / 8` of the bit array, sent as standard base64 with padding.
//!
//! # Expiry
//! Every bit has a counter, so that a URL can leave without taking other URLs' bits with it
//! (a counting Bloom filter); a counter that would overflow stays saturated, which can only add
//! false positives. Members leave in expiry order from a heap holding one item per member.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::hash::Hasher;
use std::time::Instant;

use base64::Engine as _;

/// The bits of `url` in a filter of `m` bits with `k` hashes (see the module docs).
pub fn bits(url: &str, m: u64, k: u32) -> impl Iterator<Item = u64> {
    let mut hasher = fnv::FnvHasher::default();
    hasher.write(url.as_bytes());
    let h = hasher.finish();
    let (h1, h2) = (h & 0xffff_ffff, h >> 32);
    (0..u64::from(k)).map(move |i| (h1 + i * h2) % m)
}

/// An expiring counting Bloom filter of URLs.
pub struct Sketch {
    m: u64,
    k: u32,
    counters: Vec<u16>,
    /// The bit array, kept up to date with the counters (so that encoding is a copy).
    bytes: Vec<u8>,
    /// Members and until when each stays.
    members: HashMap<String, Instant>,
    /// One item per member: its expiry when pushed (a later expiry is found when popped).
    expiries: BinaryHeap<Reverse<(Instant, String)>>,
}

/// The sketch as clients fetch it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Encoded {
    /// Bits.
    pub m: u64,
    /// Hash functions.
    pub k: u32,
    /// The bit array, base64.
    pub b: String,
    /// URLs in the filter.
    pub entries: usize,
}

impl Sketch {
    /// An empty filter of `m` bits with `k` hashes.
    pub fn new(m: u64, k: u32) -> Self {
        let m = m.max(8);
        Sketch {
            m,
            k: k.max(1),
            counters: vec![0; usize::try_from(m).expect("sketch size fits memory")],
            bytes: vec![0; usize::try_from(m.div_ceil(8)).expect("sketch size fits memory")],
            members: HashMap::new(),
            expiries: BinaryHeap::new(),
        }
    }

    /// Adds `url` until `until` (or keeps it longer, if it already stays longer).
    pub fn add(&mut self, url: &str, until: Instant) {
        if let Some(current) = self.members.get_mut(url) {
            *current = (*current).max(until);
            return;
        }
        for bit in bits(url, self.m, self.k) {
            let counter = &mut self.counters[bit as usize];
            *counter = counter.saturating_add(1);
            self.bytes[bit as usize / 8] |= 1 << (bit % 8);
        }
        self.members.insert(url.to_string(), until);
        self.expiries.push(Reverse((until, url.to_string())));
    }

    /// Removes the members whose time is up.
    pub fn expire(&mut self, now: Instant) {
        while let Some(Reverse((at, _))) = self.expiries.peek()
            && *at <= now
        {
            let Reverse((_, url)) = self.expiries.pop().expect("peeked");
            let until = self.members[&url];
            if until > now {
                // Extended since it was pushed: wait for the later time.
                self.expiries.push(Reverse((until, url)));
                continue;
            }
            self.members.remove(&url);
            for bit in bits(&url, self.m, self.k) {
                let counter = &mut self.counters[bit as usize];
                if *counter != u16::MAX {
                    *counter -= 1;
                    if *counter == 0 {
                        self.bytes[bit as usize / 8] &= !(1 << (bit % 8));
                    }
                }
            }
        }
    }

    /// Whether `url` may be in the filter (false positives at the filter's rate).
    pub fn may_contain(&self, url: &str) -> bool {
        bits(url, self.m, self.k).all(|bit| self.counters[bit as usize] > 0)
    }

    /// How many URLs are in it.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// Whether it holds no URL.
    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// A copy of the bit array (cheap: encode it outside any lock).
    pub fn bits(&self) -> Bits {
        Bits { m: self.m, k: self.k, bytes: self.bytes.clone(), entries: self.members.len() }
    }

    /// The bit array as clients read it.
    pub fn encode(&self) -> Encoded {
        self.bits().encode()
    }
}

/// A copy of a sketch's bits.
pub struct Bits {
    m: u64,
    k: u32,
    bytes: Vec<u8>,
    entries: usize,
}

impl Bits {
    /// The bits as clients read them.
    pub fn encode(self) -> Encoded {
        Encoded {
            m: self.m,
            k: self.k,
            b: base64::engine::general_purpose::STANDARD.encode(&self.bytes),
            entries: self.entries,
        }
    }
}

/// The false-positive rate of a filter of `m` bits and `k` hashes holding `n` URLs.
pub fn false_positive_rate(m: u64, k: u32, n: usize) -> f64 {
    (1.0 - (-(f64::from(k)) * n as f64 / m as f64).exp()).powi(k as i32)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn members_leave_when_their_copies_expire() {
        let now = Instant::now();
        let mut sketch = Sketch::new(1 << 12, 5);
        sketch.add("/a", now + Duration::from_secs(1));
        sketch.add("/b", now + Duration::from_secs(3));
        sketch.add("/a", now + Duration::from_secs(2));
        assert!(sketch.may_contain("/a") && sketch.may_contain("/b"));
        sketch.expire(now + Duration::from_secs(1));
        assert!(sketch.may_contain("/a"), "extended to 2 s");
        sketch.expire(now + Duration::from_secs(2));
        assert!(!sketch.may_contain("/a") && sketch.may_contain("/b"));
        sketch.expire(now + Duration::from_secs(3));
        assert!(sketch.is_empty() && sketch.counters.iter().all(|c| *c == 0) && sketch.bytes.iter().all(|b| *b == 0));
        assert_eq!(sketch.expiries.len(), 0);
    }

    #[test]
    fn bits_follow_the_documented_scheme() {
        // FNV-1a 64 of "a" is 0xaf63dc4c8601ec8c.
        let expected: Vec<u64> = (0..3u64).map(|i| (0x8601_ec8c + i * 0xaf63_dc4c) % 1000).collect();
        assert_eq!(bits("a", 1000, 3).collect::<Vec<_>>(), expected);
        let mut sketch = Sketch::new(16, 1);
        sketch.add("a", Instant::now() + Duration::from_secs(9));
        let bit = 0x8601_ec8c % 16;
        let mut bytes = [0u8; 2];
        bytes[bit / 8] |= 1 << (bit % 8);
        assert_eq!(sketch.encode().b, base64::engine::general_purpose::STANDARD.encode(bytes));
    }

    #[test]
    fn the_test_vectors_of_the_readme_hold() {
        let vectors: [(&str, [u64; 7]); 3] = [
            ("a", [126092, 116952, 107812, 98672, 89532, 80392, 71252]),
            ("/v1/db/app/todos?filter=%7B%22done%22%3Afalse%7D", [524, 45676, 90828, 135980, 181132, 226284, 9292]),
            ("/v1/db/app/todos/42", [256611, 41534, 88601, 135668, 182735, 229802, 14725]),
        ];
        for (url, expected) in vectors {
            assert_eq!(bits(url, 1 << 18, 7).collect::<Vec<_>>(), expected, "{url}");
        }
    }

    #[test]
    fn measured_false_positives_match_the_formula() {
        let (m, k, n) = (1 << 18, 7, 20_000);
        let mut sketch = Sketch::new(m, k);
        let until = Instant::now() + Duration::from_secs(60);
        for i in 0..n {
            sketch.add(&format!("/v1/db/app/items/{i}"), until);
        }
        let probes = 50_000;
        let hits = (0..probes).filter(|i| sketch.may_contain(&format!("/v1/db/app/other/{i}"))).count();
        let measured = hits as f64 / probes as f64;
        let expected = false_positive_rate(m, k, n as usize);
        assert!((measured - expected).abs() < 0.002 + expected / 2.0, "measured {measured}, formula {expected}");
    }
}
