//! Bandwidth limits: an [`ObjectStore`] wrapper that paces uploads and downloads with a token
//! bucket each, so a backup or restore does not saturate a shared uplink.

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::StreamExt;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, GetResultPayload, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

/// A token bucket: `rate` bytes per second with a burst of a quarter second's worth. Callers
/// reserve bytes and sleep until the reservation is covered, so concurrent requests share the rate.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    burst: Duration,
    /// The instant at which all bytes reserved so far will have been paid for.
    paid_until: Mutex<Instant>,
}

impl TokenBucket {
    pub fn new(rate_bytes_per_sec: u64) -> Self {
        Self {
            rate: rate_bytes_per_sec.max(1) as f64,
            burst: Duration::from_millis(250),
            paid_until: Mutex::new(Instant::now()),
        }
    }

    /// The rate in bytes per second.
    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Waits until `bytes` may pass.
    pub async fn take(&self, bytes: u64) {
        let wait = {
            let mut paid = self.paid_until.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            // Idle time earns at most one burst of credit.
            let start = (*paid).max(now.checked_sub(self.burst).unwrap_or(now));
            *paid = start + Duration::from_secs_f64(bytes as f64 / self.rate);
            paid.saturating_duration_since(now + self.burst)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

/// Paces the bytes of puts through `upload` and of get bodies through `download`.
pub struct ThrottledStore {
    inner: Arc<dyn ObjectStore>,
    upload: Option<Arc<TokenBucket>>,
    download: Option<Arc<TokenBucket>>,
}

impl ThrottledStore {
    pub fn new(inner: Arc<dyn ObjectStore>, upload: Option<u64>, download: Option<u64>) -> Self {
        Self {
            inner,
            upload: upload.map(|r| Arc::new(TokenBucket::new(r))),
            download: download.map(|r| Arc::new(TokenBucket::new(r))),
        }
    }
}

impl fmt::Debug for ThrottledStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Throttled({})", self.inner)
    }
}

impl fmt::Display for ThrottledStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Throttled({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for ThrottledStore {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        if let Some(b) = &self.upload {
            b.take(payload.content_length() as u64).await;
        }
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        // The repository writes every object with a single put; multipart uploads are not paced.
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let mut r = self.inner.get_opts(location, options).await?;
        let Some(bucket) = self.download.clone() else {
            return Ok(r);
        };
        r.payload = match r.payload {
            GetResultPayload::Stream(s) => GetResultPayload::Stream(
                s.then(move |item| {
                    let bucket = bucket.clone();
                    async move {
                        if let Ok(b) = &item {
                            bucket.take(b.len() as u64).await;
                        }
                        item
                    }
                })
                .boxed(),
            ),
            other => {
                bucket.take(r.range.end - r.range.start).await;
                other
            }
        };
        Ok(r)
    }

    async fn delete(&self, location: &Path) -> Result<()> {
        self.inner.delete(location).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(flavor = "current_thread")]
    async fn bucket_paces_to_its_rate() {
        let b = TokenBucket::new(100_000);
        let t0 = Instant::now();
        for _ in 0..10 {
            b.take(5_000).await;
        }
        // 50,000 bytes at 100,000 B/s is 0.5 s, less the quarter-second burst.
        let el = t0.elapsed();
        assert!(el >= Duration::from_millis(220), "{el:?}");
    }
}
