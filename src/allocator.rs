//! The allocator's settings. livegrid runs on mimalloc (documents are allocated on one thread
//! and freed on another all the time, which the system allocator handles poorly); this module
//! holds the one setting changed from mimalloc's defaults, applied first thing by the binary
//! and by the benchmarks that run the server.

/// mimalloc's `mi_option_arena_purge_mult` (its position in `mi_option_e`, mimalloc v3 as
/// built by the pinned `libmimalloc-sys`; `libmimalloc-sys` names only some options).
const ARENA_PURGE_MULT: libmimalloc_sys::mi_option_t = 24;

/// mimalloc's `mi_option_purge_delay`, in milliseconds.
const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// How many purge delays freed arena memory is kept for reuse before it goes back to the
/// operating system: 10 (10 s with the 1 s purge delay) instead of mimalloc's 1.
///
/// The grid hands buffers from thread to thread all the time. With memory given back one
/// second after it was freed, the next buffers land on pages the kernel must supply and zero
/// again (2 MiB at a time with transparent huge pages): at high fan-out that was a sixth of
/// the CPU. Kept for ten seconds, memory in steady use is reused, and memory a burst took
/// still returns to the system ten seconds after the burst.
pub const ARENA_PURGE_MULTIPLIER: i64 = 10;

/// Applies livegrid's allocator settings (idempotent; call before heavy allocation starts).
pub fn configure() {
    // SAFETY: `mi_option_set` only stores an integer in mimalloc's option table; both
    // arguments are plain values and the option index is checked by the test below.
    unsafe { libmimalloc_sys::mi_option_set(ARENA_PURGE_MULT, ARENA_PURGE_MULTIPLIER) };
}

/// The arena purge delay in effect, in milliseconds.
pub fn arena_purge_delay_ms() -> i64 {
    // SAFETY: reads integers from mimalloc's option table.
    let (delay, mult) =
        unsafe { (libmimalloc_sys::mi_option_get(PURGE_DELAY), libmimalloc_sys::mi_option_get(ARENA_PURGE_MULT)) };
    delay * mult
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn option_positions_match_the_built_mimalloc() {
        // The defaults of mimalloc v3 at these positions: 1,000 ms and 1. Were the positions
        // wrong (another mimalloc version), these would read other options' defaults.
        // SAFETY: reads integers from mimalloc's option table.
        let defaults =
            unsafe { (libmimalloc_sys::mi_option_get(PURGE_DELAY), libmimalloc_sys::mi_option_get(ARENA_PURGE_MULT)) };
        assert!(defaults == (1000, 1) || defaults == (1000, ARENA_PURGE_MULTIPLIER), "{defaults:?}");
        configure();
        assert_eq!(arena_purge_delay_ms(), 10_000);
    }
}
