//! The object store under a repository, with the few operations the format needs: put (optionally
//! create-only), get, range get, list, head and delete. No rename, no append, no listing that must be
//! instantly consistent.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::limit::LimitStore;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{GetOptions, GetRange, ObjectStore, PutMode, PutOptions, PutPayload};

use crate::retry::{is_already_exists, RetryPolicy};
use crate::s3::{open_s3, S3Location, StoreOptions};
use crate::throttle::ThrottledStore;
use crate::{Error, Result};

/// Requests made and bytes moved through one [`Storage`] (all its clones), for reports and
/// benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StorageStats {
    pub requests: u64,
    pub bytes_uploaded: u64,
    pub bytes_downloaded: u64,
}

#[derive(Debug, Default)]
struct Counters {
    requests: AtomicU64,
    up: AtomicU64,
    down: AtomicU64,
}

/// How a put treats an object that already has the name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// Replace it.
    Overwrite,
    /// Fail with `AlreadyExists`. On a remote store the object is then read back, because some
    /// S3-compatible services accept `If-None-Match` and ignore it: for names that several
    /// writers may pick at once (the repository config).
    CreateChecked,
    /// Fail with `AlreadyExists`, without the read-back: for fresh random names (packs, index
    /// segments, restore points) that no other writer can pick, where a service ignoring the
    /// condition changes nothing and reading back would double the traffic.
    CreateUnique,
}

#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    /// Shown to users; never contains credentials.
    location: String,
    /// For a local directory: where objects live, so puts can be made durable with fsync.
    local_root: Option<PathBuf>,
    /// Whole-operation retries (none for local directories).
    retry: RetryPolicy,
    /// For a remote store: the bound of the on-disk blob cache (0: no cache).
    remote_cache_size: Option<u64>,
    counters: Arc<Counters>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Storage({})", self.location)
    }
}

impl Storage {
    /// Opens a repository location: a directory path, `file:///path`, `s3://BUCKET/PREFIX`, or
    /// `memory://` (tests). With `create`, a missing local directory is created.
    pub fn open(location: &str, create: bool) -> Result<Self> {
        Self::open_with(location, create, &StoreOptions::default())
    }

    /// [`Storage::open`] with explicit endpoint, concurrency, bandwidth and cache settings.
    pub fn open_with(location: &str, create: bool, opts: &StoreOptions) -> Result<Self> {
        if location.starts_with("s3://") {
            let loc = S3Location::parse(location)?;
            let store = open_s3(&loc, opts)?;
            let mut s = Self::from_store(Self::wrap(store, opts), loc.display());
            s.retry = RetryPolicy::REMOTE;
            s.remote_cache_size = Some(opts.cache_size);
            return Ok(s);
        }
        if location == "memory://" || location.starts_with("memory://") {
            let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
            return Ok(Self::from_store(Self::wrap(store, opts), location));
        }
        if location.contains("://") && !location.starts_with("file://") {
            return Err(Error::Invalid(format!(
                "repository location '{location}': unsupported scheme (use a directory path or \
                 s3://BUCKET/PREFIX)"
            )));
        }
        let path = PathBuf::from(location.strip_prefix("file://").unwrap_or(location));
        if create {
            std::fs::create_dir_all(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
        } else if !path.is_dir() {
            return Err(Error::NotFound {
                location: path.display().to_string(),
                detail: "directory does not exist".into(),
            });
        }
        let root = path.canonicalize().map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let fs = LocalFileSystem::new_with_prefix(&root)
            .map_err(|e| Error::store(root.display().to_string(), e))?;
        let mut s = Self::from_store(Self::wrap(Arc::new(fs), opts), root.display().to_string());
        s.local_root = Some(root);
        Ok(s)
    }

    /// Bandwidth limits inside, the concurrency bound outside, so a request waiting for its
    /// bandwidth share holds its slot and the number of connections stays bounded.
    fn wrap(store: Arc<dyn ObjectStore>, opts: &StoreOptions) -> Arc<dyn ObjectStore> {
        let store: Arc<dyn ObjectStore> =
            if opts.limit_upload.is_some() || opts.limit_download.is_some() {
                Arc::new(ThrottledStore::new(
                    store,
                    opts.limit_upload,
                    opts.limit_download,
                ))
            } else {
                store
            };
        Arc::new(LimitStore::new(store, opts.concurrency.max(1)))
    }

    pub fn from_store(store: Arc<dyn ObjectStore>, location: impl Into<String>) -> Self {
        Self {
            store,
            location: location.into(),
            local_root: None,
            retry: RetryPolicy::NONE,
            remote_cache_size: None,
            counters: Arc::default(),
        }
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    /// For a remote store (S3), the configured bound of the on-disk blob cache; `None` for local
    /// directories and memory, which need no cache.
    pub fn remote_cache_size(&self) -> Option<u64> {
        self.remote_cache_size
    }

    pub fn stats(&self) -> StorageStats {
        StorageStats {
            requests: self.counters.requests.load(Ordering::Relaxed),
            bytes_uploaded: self.counters.up.load(Ordering::Relaxed),
            bytes_downloaded: self.counters.down.load(Ordering::Relaxed),
        }
    }

    /// An error naming the object in full (`s3://bucket/prefix/name` for remote stores).
    fn err(&self, name: &str, e: object_store::Error) -> Error {
        if self.local_root.is_some() {
            Error::store(name, e)
        } else {
            Error::store(format!("{}/{name}", self.location), e)
        }
    }

    fn count(&self, up: u64, down: u64) {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.counters.up.fetch_add(up, Ordering::Relaxed);
        self.counters.down.fetch_add(down, Ordering::Relaxed);
    }

    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Stores an object (see [`Write`] for an existing name). For a local directory the file and
    /// its directory are fsynced before this returns, so a completed put survives power loss.
    pub async fn put(&self, name: &str, bytes: Bytes, write: Write) -> Result<()> {
        let create_only = write != Write::Overwrite;
        let path = ObjPath::from(name);
        let r = self
            .retry
            .run(name, |attempt| {
                let (path, bytes) = (path.clone(), bytes.clone());
                async move {
                    let opts = PutOptions {
                        mode: if create_only {
                            PutMode::Create
                        } else {
                            PutMode::Overwrite
                        },
                        ..Default::default()
                    };
                    let len = bytes.len() as u64;
                    self.count(len, 0);
                    match self
                        .store
                        .put_opts(&path, PutPayload::from_bytes(bytes.clone()), opts)
                        .await
                    {
                        Ok(_) => Ok(()),
                        // A create-only put that failed in transit may have reached the store:
                        // finding our own bytes there means it did.
                        Err(e) if attempt > 0 && create_only => {
                            let e = self.err(name, e);
                            if is_already_exists(&e) && self.holds(name, &bytes).await? {
                                Ok(())
                            } else {
                                Err(e)
                            }
                        }
                        Err(e) => Err(self.err(name, e)),
                    }
                }
            })
            .await;
        match r {
            Err(Error::Store {
                source:
                    object_store::Error::NotImplemented | object_store::Error::NotSupported { .. },
                ..
            }) if create_only => {
                // A service without conditional writes: fall back to check-then-put; the
                // read-back below still detects a concurrent writer that won.
                if self.head(name).await?.is_some() {
                    return Err(self.err(
                        name,
                        object_store::Error::AlreadyExists {
                            path: name.into(),
                            source: "object exists".into(),
                        },
                    ));
                }
                Box::pin(self.put(name, bytes.clone(), Write::Overwrite)).await?;
            }
            r => r?,
        }
        if write == Write::CreateChecked && self.local_root.is_none() {
            // Some S3-compatible services accept If-None-Match and ignore it. Reading back what
            // was written catches a concurrent creator that overwrote us (or that we overwrote).
            if !self.holds(name, &bytes).await? {
                return Err(self.err(
                    name,
                    object_store::Error::AlreadyExists {
                        path: name.into(),
                        source: "another writer created this object at the same time".into(),
                    },
                ));
            }
        }
        if let Some(root) = &self.local_root {
            let path = root.join(name);
            tokio::task::spawn_blocking(move || fsync_file_and_dir(&path))
                .await
                .map_err(|e| Error::Invalid(format!("fsync task: {e}")))??;
        }
        Ok(())
    }

    /// True when the object exists with exactly these bytes.
    async fn holds(&self, name: &str, bytes: &Bytes) -> Result<bool> {
        match self.get(name).await {
            Ok(b) => Ok(b == *bytes),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub async fn get(&self, name: &str) -> Result<Bytes> {
        let path = ObjPath::from(name);
        self.retry
            .run(name, |_| async {
                let r = self.store.get(&path).await.map_err(|e| self.err(name, e))?;
                let b = r.bytes().await.map_err(|e| self.err(name, e))?;
                self.count(0, b.len() as u64);
                Ok(b)
            })
            .await
    }

    pub async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes> {
        let want = range.end - range.start;
        let path = ObjPath::from(name);
        let b = self
            .retry
            .run(name, |_| async {
                let b = self
                    .store
                    .get_range(&path, range.clone())
                    .await
                    .map_err(|e| self.err(name, e))?;
                self.count(0, b.len() as u64);
                Ok(b)
            })
            .await?;
        if b.len() as u64 != want {
            return Err(Error::malformed(
                name,
                format!(
                    "range {}..{} returned {} bytes (object truncated?)",
                    range.start,
                    range.end,
                    b.len()
                ),
            ));
        }
        Ok(b)
    }

    /// The last `n` bytes of an object (fewer if it is shorter) and the object's size.
    pub async fn get_suffix(&self, name: &str, n: u64) -> Result<(Bytes, u64)> {
        let path = ObjPath::from(name);
        self.retry
            .run(name, |_| async {
                let opts = GetOptions {
                    range: Some(GetRange::Suffix(n)),
                    ..Default::default()
                };
                let r = self
                    .store
                    .get_opts(&path, opts)
                    .await
                    .map_err(|e| self.err(name, e))?;
                let size = r.meta.size;
                let bytes = r.bytes().await.map_err(|e| self.err(name, e))?;
                self.count(0, bytes.len() as u64);
                Ok((bytes, size))
            })
            .await
    }

    /// Names (relative to the repository root) and sizes of the objects under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let p = ObjPath::from(prefix);
        self.retry
            .run(prefix, |_| async {
                self.count(0, 0);
                self.store
                    .list(Some(&p))
                    .map_ok(|m| (m.location.to_string(), m.size))
                    .try_collect()
                    .await
                    .map_err(|e| self.err(prefix, e))
            })
            .await
    }

    /// Like [`Storage::list`], with each object's last-modified time from the store (unix
    /// seconds): the store's clock, the same for every host.
    pub async fn list_with_times(&self, prefix: &str) -> Result<Vec<(String, u64, i64)>> {
        let p = ObjPath::from(prefix);
        self.retry
            .run(prefix, |_| async {
                self.count(0, 0);
                self.store
                    .list(Some(&p))
                    .map_ok(|m| (m.location.to_string(), m.size, m.last_modified.timestamp()))
                    .try_collect()
                    .await
                    .map_err(|e| self.err(prefix, e))
            })
            .await
    }

    pub async fn head(&self, name: &str) -> Result<Option<u64>> {
        let path = ObjPath::from(name);
        self.retry
            .run(name, |_| async {
                self.count(0, 0);
                match self.store.head(&path).await {
                    Ok(m) => Ok(Some(m.size)),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(self.err(name, e)),
                }
            })
            .await
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        let path = ObjPath::from(name);
        self.retry
            .run(name, |_| async {
                self.count(0, 0);
                match self.store.delete(&path).await {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(e) => Err(self.err(name, e)),
                }
            })
            .await
    }
}

fn fsync_file_and_dir(path: &Path) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
    }
    Ok(())
}
