//! A hidden hook for crash tests: with `BLOCKVAULT_TEST_KILL_AT_STEP=k` in its environment, the
//! process aborts (as abruptly as `kill -9`, no cleanup) just before its k-th object write or
//! delete through the typed object layer. Tests use it to stop forget and prune between any two
//! of their steps and prove the repository stays consistent.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

use crate::objects::ObjectName;

static STEPS: AtomicU64 = AtomicU64::new(0);

fn limit() -> Option<u64> {
    static LIMIT: OnceLock<Option<u64>> = OnceLock::new();
    *LIMIT.get_or_init(|| {
        std::env::var("BLOCKVAULT_TEST_KILL_AT_STEP")
            .ok()
            .and_then(|v| v.parse().ok())
    })
}

pub(crate) fn active() -> bool {
    limit().is_some()
}

pub(crate) fn step(name: &ObjectName, what: &str) {
    if let Some(k) = limit() {
        let n = STEPS.fetch_add(1, Ordering::SeqCst) + 1;
        if n >= k {
            eprintln!(
                "test hook: stopping before step {n} ({what} {})",
                name.path()
            );
            std::process::abort();
        }
    }
}

/// A hidden hook for concurrency tests: with `BLOCKVAULT_TEST_HOLD=<point>:<file>`, an operation
/// reaching `point` creates `<file>.reached` and waits while `<file>` exists. Tests use it to
/// stop a backup between its last upload and its manifest, or a prune right after its claim,
/// deterministically.
pub async fn hold(point: &str) {
    let Ok(spec) = std::env::var("BLOCKVAULT_TEST_HOLD") else {
        return;
    };
    let Some((at, file)) = spec.split_once(':') else {
        return;
    };
    if at != point {
        return;
    }
    let file = std::path::PathBuf::from(file);
    let mut reached = file.clone().into_os_string();
    reached.push(".reached");
    let _ = std::fs::write(&reached, b"");
    while file.exists() {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
