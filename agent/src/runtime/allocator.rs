//! Keeping the C library's allocator from holding memory the agent no longer uses.
//!
//! Measured with `scripts/bench-agent-rss.sh` (docs/PERFORMANCE.md, "Whole agent RSS"), glibc's
//! malloc costs the agent two ways with its defaults:
//!
//! - every thread that allocates gets an arena of its own (up to 8 per core), and memory freed
//!   into one arena is kept for that arena. The exporter's requests, the pipeline's batches and
//!   the enrichment thread's events are allocated and freed on different threads, so several
//!   arenas grow to the working set each: ~60 MiB of heap for ~20 MiB of live data under churn;
//! - loading the probe parses the kernel's BTF (several MB, twice: once for the field offsets,
//!   once by aya for the fexit program). That is freed right after, but stays resident in the
//!   main heap, under later allocations, until something trims it: ~18 MiB at idle.
//!
//! So, on glibc: at most two arenas, a fixed trim threshold (the default one grows with the
//! largest freed block, and the exporter frees 100 KiB+ requests), a fixed 1 MiB mmap
//! threshold, and one explicit trim after the probe is loaded. An operator's own
//! `MALLOC_ARENA_MAX`, `MALLOC_TRIM_THRESHOLD_`, `MALLOC_MMAP_THRESHOLD_` or `GLIBC_TUNABLES`
//! wins: then nothing is changed. On other C libraries (the static musl build)
//! both functions do nothing; musl's allocator returns freed memory on its own.

/// Arenas at most. One would serialise every allocation of the tokio workers and the
/// enrichment thread on one lock; two keep the heap within the budget (measured).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const ARENA_MAX: libc::c_int = 2;

/// Free memory at the top of an arena beyond which `free` gives it back to the kernel.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_THRESHOLD: libc::c_int = 128 << 10;

/// Allocations from this size up get a mapping of their own. Fixing the trim threshold turns
/// off glibc's sliding mmap threshold, and its 128 KiB default would then map and unmap every
/// encoded export request (100-200 KiB): 15% of the pipeline's throughput (measured). Requests
/// come from the heap instead, and the trim threshold still returns what they leave.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const MMAP_THRESHOLD: libc::c_int = 1 << 20;

/// Bounds glibc's malloc arenas and fixes its trim and mmap thresholds (see the module's doc). Call it
/// first thing in `main`, before any thread starts: a thread's arena is chosen at its first
/// allocation. Does nothing when the environment already tunes malloc, or on other C libraries.
pub fn tune() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tuned_by_env = [
            "MALLOC_ARENA_MAX",
            "MALLOC_TRIM_THRESHOLD_",
            "GLIBC_TUNABLES",
        ]
        .iter()
        .any(|name| std::env::var_os(name).is_some());
        if tuned_by_env {
            return;
        }
        #[allow(unsafe_code)]
        // SAFETY: mallopt only sets allocator parameters; glibc takes its own lock and these
        // values are in range for each. No memory is passed or returned.
        unsafe {
            libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX);
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD);
            libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD);
        }
    }
}

/// Gives the kernel back the free pages of every malloc arena (not only at the top of each).
/// Costs a walk of the heap (a millisecond or so): call it after a burst of short-lived
/// allocations, like loading the probe, not on a hot path.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        #[allow(unsafe_code)]
        // SAFETY: malloc_trim takes the arenas' locks itself and only releases pages that hold
        // no allocation; it touches no memory the program owns.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
