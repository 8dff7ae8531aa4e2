use std::sync::atomic::{AtomicU64, Ordering};

/// Live counters of a running job, read by progress bars and session listings.
#[derive(Debug, Default)]
pub struct Progress {
    /// Bytes the job intends to read (known once planning is done).
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    pub bytes_new: AtomicU64,
    pub bytes_stored: AtomicU64,
}

impl Progress {
    pub fn total(&self) -> u64 {
        self.bytes_total.load(Ordering::Relaxed)
    }

    pub fn done(&self) -> u64 {
        self.bytes_done.load(Ordering::Relaxed)
    }

    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
