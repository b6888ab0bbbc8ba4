//! Positions in a change stream: ordered, never reused, and able to carry a MongoDB cluster
//! time together with the order of an event inside its transaction.
//!
//! A position is a `time` and an `order` within it, compared in that order. The embedded
//! store's positions are its sequence numbers (`order` is always 0); a replay file without
//! cluster times numbers its lines; MongoDB events carry their cluster time (a BSON timestamp
//! `{t, i}`, as `t << 32 | i`) and the index of the event inside its transaction, so that all
//! events of one transaction share a `time` and a snapshot read at that cluster time can be
//! compared with them exactly.
//!
//! On the wire a position is a JSON number while JavaScript can hold it exactly (`order` 0 and
//! `time` at most 2^53 - 1, as for every store and replay position); otherwise it is a string,
//! `"time"` or `"time.order"` (MongoDB cluster times exceed 2^53). Both forms are read back.
//!
//! ```
//! use livegrid_protocol::Position;
//!
//! let store = Position::new(42);
//! assert_eq!(serde_json::to_string(&store).unwrap(), "42");
//! let mongo = Position::from_cluster_time(1_700_000_000, 3, 1);
//! assert!(mongo > Position::from_cluster_time(1_700_000_000, 3, 0));
//! assert_eq!(mongo.cluster_time(), (1_700_000_000, 3));
//! let text = serde_json::to_string(&mongo).unwrap();
//! assert_eq!(text, "\"7301444403200000003.1\"");
//! assert_eq!(serde_json::from_str::<Position>(&text).unwrap(), mongo);
//! ```

use std::fmt;
use std::str::FromStr;

use serde::de::{self, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The largest integer JavaScript numbers hold exactly.
const MAX_SAFE_INTEGER: u64 = (1 << 53) - 1;

/// A position in a change stream; it only grows. Compared by `time`, then `order`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    time: u64,
    order: u32,
}

impl Position {
    /// Before every event.
    pub const ZERO: Position = Position { time: 0, order: 0 };

    /// The position `time`, first in its time (a store sequence number, a line number).
    pub const fn new(time: u64) -> Self {
        Position { time, order: 0 }
    }

    /// The `order`-th event at `time`.
    pub const fn with_order(time: u64, order: u32) -> Self {
        Position { time, order }
    }

    /// The `order`-th event of the transaction at MongoDB cluster time `{t, i}`.
    pub const fn from_cluster_time(t: u32, i: u32, order: u32) -> Self {
        Position { time: (t as u64) << 32 | i as u64, order }
    }

    /// The time part.
    pub const fn time(self) -> u64 {
        self.time
    }

    /// The order inside the time.
    pub const fn order(self) -> u32 {
        self.order
    }

    /// The MongoDB cluster time `(t, i)` this position's time stands for.
    pub const fn cluster_time(self) -> (u32, u32) {
        ((self.time >> 32) as u32, self.time as u32)
    }

    /// The first position of the next time (the store's next sequence number).
    pub const fn next_time(self) -> Self {
        Position { time: self.time.saturating_add(1), order: 0 }
    }

    /// The next position in the same time (the next event of a transaction).
    pub const fn next_order(self) -> Self {
        Position { time: self.time, order: self.order.saturating_add(1) }
    }

    /// The position as JSON text (a number or a string, as its `Serialize` writes it),
    /// for writers that build JSON by hand.
    pub fn json(self) -> impl fmt::Display {
        struct Json(Position);
        impl fmt::Display for Json {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                if self.0.order == 0 && self.0.time <= MAX_SAFE_INTEGER {
                    write!(f, "{}", self.0.time)
                } else {
                    write!(f, "\"{}\"", self.0)
                }
            }
        }
        Json(self)
    }

    /// After every event (orders markers after all writes).
    pub const MAX: Position = Position { time: u64::MAX, order: u32::MAX };

    /// Whether this is [`Position::ZERO`].
    pub const fn is_zero(self) -> bool {
        self.time == 0 && self.order == 0
    }
}

impl From<u64> for Position {
    fn from(time: u64) -> Self {
        Position::new(time)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.order == 0 { write!(f, "{}", self.time) } else { write!(f, "{}.{}", self.time, self.order) }
    }
}

/// A position's text is not `time` or `time.order`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid position {0:?}: expected \"time\" or \"time.order\" with non-negative integers")]
pub struct PositionError(String);

impl FromStr for Position {
    type Err = PositionError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || PositionError(s.to_string());
        let (time, order) = match s.split_once('.') {
            Some((time, order)) => (time, order.parse::<u32>().map_err(|_| bad())?),
            None => (s, 0),
        };
        Ok(Position { time: time.parse().map_err(|_| bad())?, order })
    }
}

impl Serialize for Position {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if !serializer.is_human_readable() {
            // Binary formats (timely's bincode between processes): the two parts.
            return (self.time, self.order).serialize(serializer);
        }
        if self.order == 0 && self.time <= MAX_SAFE_INTEGER {
            serializer.serialize_u64(self.time)
        } else {
            serializer.collect_str(self)
        }
    }
}

impl<'de> Deserialize<'de> for Position {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        if !deserializer.is_human_readable() {
            let (time, order) = <(u64, u32)>::deserialize(deserializer)?;
            return Ok(Position { time, order });
        }
        struct PositionVisitor;
        impl Visitor<'_> for PositionVisitor {
            type Value = Position;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-negative integer or a \"time.order\" string")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Position, E> {
                Ok(Position::new(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Position, E> {
                u64::try_from(v).map(Position::new).map_err(|_| E::custom("a position is never negative"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Position, E> {
                v.parse().map_err(E::custom)
            }
        }
        deserializer.deserialize_any(PositionVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn orders_by_time_then_order() {
        let a = Position::from_cluster_time(10, 1, 5);
        let b = Position::from_cluster_time(10, 2, 0);
        assert!(a < b);
        assert!(a.next_order() > a);
        assert!(a.next_time() > a && a.next_time() < b.next_time());
        assert!(Position::ZERO < Position::new(1));
    }

    #[test]
    fn json_round_trips_in_both_forms() {
        for p in [
            Position::ZERO,
            Position::new(7),
            Position::new(MAX_SAFE_INTEGER),
            Position::new(MAX_SAFE_INTEGER + 1),
            Position::with_order(3, 2),
            Position::from_cluster_time(u32::MAX, u32::MAX, u32::MAX),
        ] {
            let text = serde_json::to_string(&p).unwrap();
            assert_eq!(serde_json::from_str::<Position>(&text).unwrap(), p, "{text}");
        }
        assert_eq!(serde_json::to_string(&Position::new(MAX_SAFE_INTEGER + 1)).unwrap(), "\"9007199254740992\"");
        assert_eq!(serde_json::to_string(&Position::with_order(3, 2)).unwrap(), "\"3.2\"");
        for p in [Position::new(5), Position::with_order(3, 2), Position::new(u64::MAX)] {
            assert_eq!(p.json().to_string(), serde_json::to_string(&p).unwrap());
        }
    }

    #[test]
    fn refuses_malformed_text() {
        for bad in ["", "-1", "1.", ".1", "1.2.3", "x", "1.-2", "18446744073709551616"] {
            assert!(bad.parse::<Position>().is_err(), "{bad}");
        }
        assert!(serde_json::from_str::<Position>("-3").is_err());
        assert!(serde_json::from_str::<Position>("1.5").is_err());
    }
}
