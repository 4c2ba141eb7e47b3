//! Giving freed heap memory back to the kernel (docs/benchmarks.md, "P6: which allocator").
//!
//! The archive codec moves 1 MiB chunk buffers between Tokio's workers and its blocking codec
//! threads. With glibc's defaults the first free of such a buffer raises the mmap threshold to
//! its size, so every later chunk is carved from the per-thread arenas, which keep what is freed:
//! the agent held 38–79 MiB ten seconds after a base backup or a WAL drain, against 18 MiB idle.
//! A fixed mmap threshold gave it back at once but cost 30–40 % more CPU per backup (every chunk a
//! fresh mapping to fault in); jemalloc with its default 10 s decay stayed at 25–37 MiB, mimalloc
//! at 146–428 MiB. So the arenas keep reusing memory while the agent works, and a thread of the
//! `run` command trims them every [`TRIM_PERIOD`]: freed pages, also inside the heaps, go back.

use std::time::Duration;

/// How often freed heap memory is returned. A trim during work only costs the page faults of
/// re-touching what was free at that instant.
const TRIM_PERIOD: Duration = Duration::from_secs(2);

/// Starts the thread that trims the heap every [`TRIM_PERIOD`] for the rest of the process. If
/// it cannot start, the memory is only kept longer, so that is logged, not fatal.
pub fn trim_periodically() {
    let started = std::thread::Builder::new()
        .name("malloc-trim".into())
        .spawn(|| {
            loop {
                std::thread::sleep(TRIM_PERIOD);
                trim();
            }
        });
    if let Err(e) = started {
        tracing::warn!(error = %e, "cannot start the heap trimming thread; freed memory stays mapped");
    }
}

#[allow(unsafe_code)]
fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes malloc's own locks and only releases memory that is free; it
    // has no precondition on the caller.
    unsafe {
        nix::libc::malloc_trim(0);
    }
}
