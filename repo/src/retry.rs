//! Whole-operation retries on top of the object store client's own per-request retries.
//!
//! The client retries a request that fails before its response headers arrive (server errors,
//! timeouts, resets). It does not retry an error while the response body is streaming, nor a
//! request whose retry budget ran out during a short outage; repeating the whole operation here
//! covers those. Permanent failures (not found, permission denied, bad credentials, failed
//! preconditions) are returned at once.

use std::future::Future;
use std::time::Duration;

use rand::Rng;

use crate::{Error, Result};

#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// Attempts after the first.
    pub retries: u32,
    pub initial: Duration,
    pub max: Duration,
}

impl RetryPolicy {
    /// No retries: for local directories, where an error is not a network hiccup.
    pub const NONE: Self = Self {
        retries: 0,
        initial: Duration::ZERO,
        max: Duration::ZERO,
    };

    pub const REMOTE: Self = Self {
        retries: 4,
        initial: Duration::from_millis(200),
        max: Duration::from_secs(5),
    };

    /// Runs `op` until it succeeds, fails permanently, or the retries are used up. Backoff
    /// doubles from `initial` up to `max`, with full jitter so many agents do not retry in step.
    pub async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T>
    where
        F: FnMut(u32) -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let mut attempt = 0u32;
        let mut cap = self.initial;
        loop {
            match op(attempt).await {
                Err(e) if attempt < self.retries && e.is_transient() => {
                    let sleep = rand::thread_rng().gen_range(cap / 2..=cap);
                    tracing::warn!(
                        "{what}: transient failure (attempt {}), retrying in {sleep:?}: {e}",
                        attempt + 1
                    );
                    tokio::time::sleep(sleep).await;
                    cap = (cap * 2).min(self.max);
                    attempt += 1;
                }
                r => return r,
            }
        }
    }
}

/// True when the store refused a create-only put because the object already exists.
pub fn is_already_exists(e: &Error) -> bool {
    matches!(
        e,
        Error::Store {
            source: object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ..
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn transient() -> Error {
        Error::Store {
            object: "x".into(),
            source: object_store::Error::Generic {
                store: "test",
                source: "connection reset".into(),
            },
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn retries_transient_then_succeeds() {
        let p = RetryPolicy {
            retries: 3,
            initial: Duration::from_millis(1),
            max: Duration::from_millis(2),
        };
        let n = AtomicU32::new(0);
        let r = p
            .run("op", |_| async {
                if n.fetch_add(1, Ordering::SeqCst) < 2 {
                    Err(transient())
                } else {
                    Ok(7)
                }
            })
            .await;
        assert_eq!(r.unwrap(), 7);
        assert_eq!(n.load(Ordering::SeqCst), 3);
    }

    #[tokio::test(flavor = "current_thread")]
    async fn permanent_fails_at_once_and_budget_is_bounded() {
        let p = RetryPolicy {
            retries: 2,
            initial: Duration::from_millis(1),
            max: Duration::from_millis(1),
        };
        let n = AtomicU32::new(0);
        let r: Result<()> = p
            .run("op", |_| async {
                n.fetch_add(1, Ordering::SeqCst);
                Err(Error::Store {
                    object: "x".into(),
                    source: object_store::Error::PermissionDenied {
                        path: "x".into(),
                        source: "403".into(),
                    },
                })
            })
            .await;
        assert!(r.is_err());
        assert_eq!(n.load(Ordering::SeqCst), 1);
        let m = AtomicU32::new(0);
        let r: Result<()> = p
            .run("op", |_| async {
                m.fetch_add(1, Ordering::SeqCst);
                Err(transient())
            })
            .await;
        assert!(r.is_err());
        assert_eq!(m.load(Ordering::SeqCst), 3);
    }
}
