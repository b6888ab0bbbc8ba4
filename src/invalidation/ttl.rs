//! How long caches may keep a REST read: a fixed `max-age`, or one estimated per URL from how
//! often its result changes (`auto`).
//!
//! # The estimate
//! livegrid watches every cached result while copies of it may live, so it knows how long it
//! watched a result (`observed`) and how often the result changed meanwhile (`changes`). It
//! takes the mean time between changes as `(observed + prior) / (changes + 1)`, with a prior of
//! ten minimum TTLs (a result never watched gets the minimum), and serves a tenth of it, within
//! the configured bounds: if changes come at random at that rate, a copy is then still fresh
//! when it expires about nine times in ten. A result that has not changed for an hour caches
//! for six minutes; one that changes every second gets the minimum.
//!
//! What was learnt about a URL outlives its tracking for a while (a bounded table), so that a
//! URL read again after its copies expired does not start from nothing.

use std::str::FromStr;
use std::time::Duration;

/// How long HTTP caches may keep a REST read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MaxAge {
    /// The same number of seconds for every read (0: caches revalidate every time).
    Fixed(u32),
    /// Estimated per URL from its change rate, within `[min, max]` seconds.
    Auto {
        /// The shortest TTL served.
        min: u32,
        /// The longest TTL served.
        max: u32,
    },
}

impl Default for MaxAge {
    fn default() -> Self {
        MaxAge::Fixed(0)
    }
}

/// The bounds of `auto` when none are given.
pub const AUTO_BOUNDS: (u32, u32) = (1, 3600);

/// The longest TTL allowed: a year.
const LONGEST: u32 = 31_536_000;

impl FromStr for MaxAge {
    type Err = String;

    /// `N` (seconds), `auto`, or `auto:MIN-MAX`.
    fn from_str(text: &str) -> Result<Self, String> {
        let bad = || format!("a max-age is seconds, `auto` or `auto:MIN-MAX` (e.g. auto:1-3600), found {text:?}");
        let seconds = |s: &str| s.trim().parse::<u32>().map_err(|_| bad());
        let age = match text.trim() {
            "auto" => MaxAge::Auto { min: AUTO_BOUNDS.0, max: AUTO_BOUNDS.1 },
            t if t.starts_with("auto:") => {
                let (min, max) = t["auto:".len()..].split_once('-').ok_or_else(bad)?;
                MaxAge::Auto { min: seconds(min)?, max: seconds(max)? }
            }
            t => MaxAge::Fixed(seconds(t)?),
        };
        match age {
            MaxAge::Fixed(n) if n > LONGEST => Err(format!("a max-age is at most {LONGEST} seconds, found {n}")),
            MaxAge::Auto { min, max } if min == 0 || min > max || max > LONGEST => {
                Err(format!("auto bounds need 1 <= MIN <= MAX <= {LONGEST}, found {min}-{max}"))
            }
            age => Ok(age),
        }
    }
}

impl std::fmt::Display for MaxAge {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MaxAge::Fixed(n) => write!(f, "{n}"),
            MaxAge::Auto { min, max } => write!(f, "auto:{min}-{max}"),
        }
    }
}

impl MaxAge {
    /// Whether reads are cacheable at all (and so worth tracking).
    pub fn caches(&self) -> bool {
        !matches!(self, MaxAge::Fixed(0))
    }

    /// The TTL to serve for a result with this history.
    pub fn ttl(&self, history: &History) -> u32 {
        match *self {
            MaxAge::Fixed(n) => n,
            MaxAge::Auto { min, max } => {
                let prior = 10.0 * f64::from(min);
                let interval = (history.observed.as_secs_f64() + prior) / (f64::from(history.changes) + 1.0);
                (interval / 10.0).clamp(f64::from(min), f64::from(max)) as u32
            }
        }
    }
}

/// What is known of how often a result changes.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct History {
    /// How long the result was watched.
    pub observed: Duration,
    /// How often it changed meanwhile.
    pub changes: u32,
}

impl History {
    /// This history followed by `other`.
    pub fn then(self, other: History) -> History {
        History { observed: self.observed + other.observed, changes: self.changes.saturating_add(other.changes) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_shows() {
        assert_eq!("60".parse::<MaxAge>().unwrap(), MaxAge::Fixed(60));
        assert_eq!("auto".parse::<MaxAge>().unwrap(), MaxAge::Auto { min: 1, max: 3600 });
        assert_eq!("auto:5-600".parse::<MaxAge>().unwrap(), MaxAge::Auto { min: 5, max: 600 });
        for bad in ["", "-1", "auto:0-5", "auto:9-5", "auto:5", "soon"] {
            assert!(bad.parse::<MaxAge>().is_err(), "{bad}");
        }
        assert_eq!(MaxAge::Auto { min: 5, max: 600 }.to_string(), "auto:5-600");
    }

    #[test]
    fn quiet_results_cache_long_and_busy_ones_short() {
        let auto = MaxAge::Auto { min: 1, max: 3600 };
        let seen = |secs, changes| History { observed: Duration::from_secs(secs), changes };
        assert_eq!(auto.ttl(&History::default()), 1);
        assert_eq!(auto.ttl(&seen(3600, 0)), 361);
        assert_eq!(auto.ttl(&seen(3600, 3600)), 1);
        assert_eq!(auto.ttl(&seen(1_000_000, 0)), 3600);
        assert_eq!(MaxAge::Fixed(30).ttl(&seen(3600, 3600)), 30);
    }
}
