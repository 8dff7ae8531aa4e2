//! The object store under a repository, with the few operations the format needs: put (optionally
//! create-only), get, range get, list, head and delete. No rename, no append, no listing that must be
//! instantly consistent.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use object_store::limit::LimitStore;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{GetOptions, GetRange, ObjectStore, PutMode, PutOptions, PutPayload};

use crate::retry::{is_already_exists, RetryPolicy};
use crate::s3::{open_s3, permanent_problem, S3Location, StoreOptions};
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
    /// Downloads are paced (`--limit-download`): every read goes through the object store.
    paced_download: bool,
    /// Whole-operation retries (none for local directories).
    retry: RetryPolicy,
    /// For a remote store: the bound of the on-disk blob cache (0: no cache).
    remote_cache_size: Option<u64>,
    /// For S3: the bucket, to name it when the service says it does not exist.
    bucket: Option<String>,
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
            // The S3 client paces uploads itself, as the bytes are sent.
            let wrapped = Self::wrap(store, None, opts.limit_download, opts.concurrency);
            let mut s = Self::from_store(wrapped, loc.display());
            s.retry = RetryPolicy::REMOTE;
            s.remote_cache_size = Some(opts.cache_size);
            s.bucket = Some(loc.bucket.clone());
            return Ok(s);
        }
        if location == "memory://" || location.starts_with("memory://") {
            let store: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
            let wrapped = Self::wrap(
                store,
                opts.limit_upload,
                opts.limit_download,
                opts.concurrency,
            );
            return Ok(Self::from_store(wrapped, location));
        }
        if let Some((scheme, _)) = location.split_once("://").filter(|(s, _)| *s != "file") {
            // The scheme only: the rest may carry credentials.
            return Err(Error::Invalid(format!(
                "repository location {scheme}://...: unsupported scheme (use a directory path or \
                 s3://BUCKET/PREFIX)"
            )));
        }
        let path = PathBuf::from(location.strip_prefix("file://").unwrap_or(location));
        if create {
            // A new repository directory is the owner's only: `config` holds the wrapped key and
            // its KDF parameters, which others could attack offline. An existing directory keeps
            // the permissions its owner gave it.
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&path)
                .map_err(|source| Error::Io {
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
        let fs = crate::durable_local::DurableLocal::new(Arc::new(fs), root.clone());
        let wrapped = Self::wrap(
            Arc::new(fs),
            opts.limit_upload,
            opts.limit_download,
            opts.concurrency,
        );
        let mut s = Self::from_store(wrapped, root.display().to_string());
        s.local_root = Some(root);
        s.paced_download = opts.limit_download.is_some();
        Ok(s)
    }

    /// Bandwidth limits inside, the concurrency bound outside, so a request waiting for its
    /// bandwidth share holds its slot and the number of connections stays bounded.
    fn wrap(
        store: Arc<dyn ObjectStore>,
        upload: Option<u64>,
        download: Option<u64>,
        concurrency: usize,
    ) -> Arc<dyn ObjectStore> {
        let store: Arc<dyn ObjectStore> = if upload.is_some() || download.is_some() {
            Arc::new(ThrottledStore::new(store, upload, download))
        } else {
            store
        };
        Arc::new(LimitStore::new(store, concurrency.max(1)))
    }

    pub fn from_store(store: Arc<dyn ObjectStore>, location: impl Into<String>) -> Self {
        Self {
            store,
            location: location.into(),
            local_root: None,
            paced_download: false,
            retry: RetryPolicy::NONE,
            remote_cache_size: None,
            bucket: None,
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

    /// An error naming the object in full (`s3://bucket/prefix/name` for remote stores). A
    /// refusal no retry can fix (credentials, access, a missing bucket) becomes one
    /// [`Error::Remote`] line with the cause and the fix.
    fn err(&self, name: &str, e: object_store::Error) -> Error {
        if self.local_root.is_some() {
            return Error::store(name, e);
        }
        let object = format!("{}/{name}", self.location);
        if let Some(bucket) = &self.bucket {
            if let Some(p) = permanent_problem(&self.location, bucket, &object, &e) {
                return p;
            }
        }
        Error::store(object, e)
    }

    /// [`Storage::err`] for a read of `range`: a range that starts past the object's end is
    /// refused by the service (416 Range Not Satisfiable), which is the object cut short, like a
    /// range it fills only in part.
    fn range_err(&self, name: &str, range: Option<&Range<u64>>, e: object_store::Error) -> Error {
        match range {
            Some(range) if crate::error::http_status(&e) == Some(416) => truncated(name, range, 0),
            _ => self.err(name, e),
        }
    }

    fn count(&self, up: u64, down: u64) {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        self.counters.up.fetch_add(up, Ordering::Relaxed);
        self.counters.down.fetch_add(down, Ordering::Relaxed);
    }

    /// True when objects may be read straight from their files (see [`Storage::local_file`]).
    pub(crate) fn reads_local_files(&self) -> bool {
        self.local_root.is_some() && !self.paced_download
    }

    /// The file of object `name` when the repository is a local directory whose reads are not
    /// paced, so a caller on a blocking thread may read it directly (and count the read with
    /// [`Storage::count_read`]) instead of going through the object store's own blocking hop.
    pub(crate) fn local_file(&self, name: &str) -> Option<PathBuf> {
        let root = self
            .local_root
            .as_ref()
            .filter(|_| self.reads_local_files())?;
        Some(root.join(name))
    }

    /// Counts a read made outside the object store (see [`Storage::local_file`]).
    pub(crate) fn count_read(&self, bytes: u64) {
        self.count(0, bytes);
    }

    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Stores an object (see [`Write`] for an existing name). On a local directory the object is
    /// fsynced before its name appears and its directory after (`durable_local`), so a name
    /// never stands for a torn object, and a completed put survives power loss.
    pub async fn put(&self, name: &str, bytes: Bytes, write: Write) -> Result<()> {
        let create_only = write != Write::Overwrite;
        let path = ObjPath::from(name);
        let r = self
            .retry
            .run(name, |_| {
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
                        // Not retried: the fallback below runs instead.
                        Err(e) if create_only && conditional_put_unsupported(&e) => {
                            Err(self.err(name, object_store::Error::NotImplemented))
                        }
                        // A create-only put whose earlier try reached the store (its answer
                        // lost in transit, then retried by us or by the client itself) is
                        // refused as existing: finding our own bytes there means it landed.
                        Err(e) if create_only => {
                            let e = self.err(name, e);
                            if !is_already_exists(&e) {
                                return Err(e);
                            }
                            match self.get(name).await {
                                Ok(there) if there == bytes => Ok(()),
                                Ok(_) => Err(e),
                                // Refused as existing, yet nothing is there: S3's 409
                                // ConditionalRequestConflict while an earlier try of this very
                                // put is still being processed. Tried again, like any hiccup.
                                Err(g) if g.is_not_found() => Err(self.err(
                                    name,
                                    object_store::Error::Generic {
                                        store: "S3",
                                        source: format!(
                                            "a create-only put was refused as conflicting but no \
                                             object is there yet ({e})"
                                        )
                                        .into(),
                                    },
                                )),
                                Err(g) => Err(g),
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
        Ok(())
    }

    /// Reads an object with what [`Storage::update`] needs to replace it only if nobody else has
    /// meanwhile.
    pub async fn get_versioned(&self, name: &str) -> Result<(Bytes, ObjectVersion)> {
        let path = ObjPath::from(name);
        self.retry
            .run(name, |_| async {
                let r = self.store.get(&path).await.map_err(|e| self.err(name, e))?;
                let (e_tag, version) = (r.meta.e_tag.clone(), r.meta.version.clone());
                let b = r.bytes().await.map_err(|e| self.err(name, e))?;
                self.count(0, b.len() as u64);
                let digest = *blake3::hash(&b).as_bytes();
                Ok((
                    b,
                    ObjectVersion {
                        e_tag,
                        version,
                        digest,
                    },
                ))
            })
            .await
    }

    /// Replaces an object only if it is still the version `expected` was read as (compare and
    /// swap): on S3 a conditional put (`If-Match` with the e-tag read); on a local directory the
    /// object is locked (`flock`), compared byte for byte and replaced by an fsynced rename. When
    /// another writer got there first, fails with an error for which
    /// [`Error::is_precondition_failed`] is true, and nothing is written.
    pub async fn update(&self, name: &str, bytes: Bytes, expected: &ObjectVersion) -> Result<()> {
        if let Some(root) = &self.local_root {
            let (path, digest, b) = (root.join(name), expected.digest, bytes.clone());
            self.count(bytes.len() as u64, 0);
            return tokio::task::spawn_blocking(move || local_update(&path, &b, &digest))
                .await
                .map_err(|e| Error::Invalid(format!("update task: {e}")))?;
        }
        let path = ObjPath::from(name);
        let version = object_store::UpdateVersion {
            e_tag: expected.e_tag.clone(),
            version: expected.version.clone(),
        };
        self.retry
            .run(name, |_| {
                let (path, bytes, version) = (path.clone(), bytes.clone(), version.clone());
                async move {
                    self.count(bytes.len() as u64, 0);
                    let opts = PutOptions {
                        mode: PutMode::Update(version),
                        ..Default::default()
                    };
                    match self
                        .store
                        .put_opts(&path, PutPayload::from_bytes(bytes.clone()), opts)
                        .await
                    {
                        Ok(_) => Ok(()),
                        Err(e) => {
                            let e = self.err(name, e);
                            // An earlier try that landed (its answer lost) makes the retry fail
                            // its condition: our own bytes there mean the update is done.
                            if e.is_precondition_failed() && self.holds(name, &bytes).await? {
                                Ok(())
                            } else {
                                Err(e)
                            }
                        }
                    }
                }
            })
            .await
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

    /// Reads an object, or the `range` of it, into `buf` (cleared first; it grows only when the
    /// object is larger than its capacity) and returns the buffer. A caller that keeps its
    /// buffers reads pack after pack without asking the allocator for a new 16 MiB each time,
    /// which is what kept freed pack buffers in glibc's per-thread arenas and made verify's peak
    /// grow with the threads that ever ran (docs/OPERATIONS.md, "Memory"). A local file is read
    /// straight into the buffer; a remote body is copied into it as it arrives. A range that the
    /// object does not fill is an error, as with [`Storage::get_range`].
    pub async fn read_into(
        &self,
        name: &str,
        range: Option<Range<u64>>,
        buf: Vec<u8>,
    ) -> Result<Vec<u8>> {
        use object_store::GetResultPayload;
        let path = ObjPath::from(name);
        // The buffer moves into each attempt; an attempt that fails drops it and a retry starts
        // from an empty one.
        let slot = std::sync::Mutex::new(Some(buf));
        let buf = self
            .retry
            .run(name, |_| async {
                let mut buf = slot
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .take()
                    .unwrap_or_default();
                buf.clear();
                let opts = GetOptions {
                    range: range.clone().map(GetRange::Bounded),
                    ..Default::default()
                };
                let r = self
                    .store
                    .get_opts(&path, opts)
                    .await
                    .map_err(|e| self.range_err(name, range.as_ref(), e))?;
                let (start, len) = (r.range.start, r.range.end - r.range.start);
                // The stored length sizes the buffer, up to a bound: a store that claims more
                // than it sends cannot make us reserve it.
                buf.reserve((len as usize).min(MAX_RESERVE));
                let buf = match r.payload {
                    GetResultPayload::File(file, local) => {
                        tokio::task::spawn_blocking(move || read_file_range(file, start, len, buf))
                            .await
                            .map_err(|e| Error::Invalid(format!("reading {name}: {e}")))?
                            .map_err(|source| Error::Io {
                                path: local,
                                source,
                            })?
                    }
                    GetResultPayload::Stream(mut body) => {
                        while let Some(piece) =
                            body.try_next().await.map_err(|e| self.err(name, e))?
                        {
                            buf.extend_from_slice(&piece);
                        }
                        buf
                    }
                };
                self.count(0, buf.len() as u64);
                Ok(buf)
            })
            .await?;
        if let Some(range) = range {
            if buf.len() as u64 != range.end - range.start {
                return Err(truncated(name, &range, buf.len()));
            }
        }
        Ok(buf)
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
                    .map_err(|e| self.range_err(name, Some(&range), e))?;
                self.count(0, b.len() as u64);
                Ok(b)
            })
            .await?;
        if b.len() as u64 != want {
            return Err(truncated(name, &range, b.len()));
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

    /// [`Storage::list`] with each object's store-assigned modification time (Unix ms): the only
    /// clock maintenance decisions use.
    pub async fn list_meta(&self, prefix: &str) -> Result<Vec<ObjectInfo>> {
        let p = ObjPath::from(prefix);
        self.retry
            .run(prefix, |_| async {
                self.count(0, 0);
                self.store
                    .list(Some(&p))
                    .map_ok(|m| ObjectInfo {
                        name: m.location.to_string(),
                        size: m.size,
                        modified_ms: m.last_modified.timestamp_millis(),
                        e_tag: m.e_tag,
                    })
                    .try_collect()
                    .await
                    .map_err(|e| self.err(prefix, e))
            })
            .await
    }

    /// Deletes many objects: S3 multi-delete (up to 1,000 keys a request) on remote stores, one
    /// delete each elsewhere. An object already gone counts as deleted. Every failure is returned,
    /// so a caller never mistakes a partial delete for a complete one.
    pub async fn delete_many(&self, names: &[String]) -> Result<()> {
        for batch in names.chunks(1000) {
            if self.local_root.is_some() || self.remote_cache_size.is_none() {
                for n in batch {
                    self.delete(n).await?;
                }
                continue;
            }
            let paths: Vec<ObjPath> = batch.iter().map(|n| ObjPath::from(n.as_str())).collect();
            let first = batch.first().map(String::as_str).unwrap_or_default();
            self.retry
                .run(first, |_| {
                    let paths: Vec<object_store::Result<ObjPath>> =
                        paths.iter().cloned().map(Ok).collect();
                    async move {
                        self.count(0, 0);
                        let results: Vec<object_store::Result<ObjPath>> = self
                            .store
                            .delete_stream(futures::stream::iter(paths).boxed())
                            .collect()
                            .await;
                        for r in results {
                            match r {
                                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                                Err(e) => return Err(self.err(first, e)),
                            }
                        }
                        Ok(())
                    }
                })
                .await?;
        }
        Ok(())
    }

    /// [`Storage::head`] with the store-assigned modification time (Unix ms).
    pub async fn head_meta(&self, name: &str) -> Result<Option<ObjectInfo>> {
        let path = ObjPath::from(name);
        self.retry
            .run(name, |_| async {
                self.count(0, 0);
                match self.store.head(&path).await {
                    Ok(m) => Ok(Some(ObjectInfo {
                        name: name.to_string(),
                        size: m.size,
                        modified_ms: m.last_modified.timestamp_millis(),
                        e_tag: m.e_tag,
                    })),
                    Err(object_store::Error::NotFound { .. }) => Ok(None),
                    Err(e) => Err(self.err(name, e)),
                }
            })
            .await
    }
}

/// An object as listed: name relative to the repository root, size, and the store's own
/// modification time in Unix milliseconds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectInfo {
    pub name: String,
    pub size: u64,
    pub modified_ms: i64,
    /// The store's entity tag, when it gives one: changes whenever the object does.
    pub e_tag: Option<String>,
}

/// An object's version as read by [`Storage::get_versioned`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ObjectVersion {
    pub e_tag: Option<String>,
    pub version: Option<String>,
    /// BLAKE3 of the bytes read: what a local directory compares.
    pub digest: [u8; 32],
}

/// Compare-and-swap of one file: every updater holds an exclusive `flock` on the file it
/// compares, and replaces it by renaming a synced temporary file over it. A waiter that then
/// gets the lock on the replaced file sees that the path names another file now, and starts
/// again on that one, whose bytes differ from what it expects.
fn local_update(path: &Path, bytes: &[u8], expected: &[u8; 32]) -> Result<()> {
    use std::io::{Read, Write as _};
    use std::os::unix::fs::MetadataExt;
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let changed = |detail: &str| Error::Store {
        object: path.display().to_string(),
        source: object_store::Error::Precondition {
            path: path.display().to_string(),
            source: detail.to_string().into(),
        },
    };
    loop {
        let mut f = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(changed("it was removed"))
            }
            Err(e) => return Err(io(e)),
        };
        rustix::fs::flock(&f, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io(e.into()))?;
        let (locked, now) = (f.metadata().map_err(io)?, std::fs::metadata(path));
        match now {
            Ok(m) if (m.dev(), m.ino()) == (locked.dev(), locked.ino()) => {}
            // Replaced (or removed) while we waited for the lock: look again.
            _ => continue,
        }
        let mut current = Vec::new();
        f.read_to_end(&mut current).map_err(io)?;
        if blake3::hash(&current).as_bytes() != expected {
            return Err(changed("another writer replaced it since it was read"));
        }
        let mut rnd = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut rnd);
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("object");
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", hex::encode(rnd)));
        let written = (|| {
            let mut t = std::fs::File::create_new(&tmp)?;
            t.write_all(bytes)?;
            t.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(io(e));
        }
        if let Some(dir) = path.parent() {
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
        }
        return Ok(());
    }
}

/// True when a create-only put failed because the service does not implement conditional
/// writes: its 501 answer (see `paced_http`), or a `NotImplemented` error code. Such a put is
/// reported as [`object_store::Error::NotImplemented`], which is not retried and makes
/// [`Storage::put`] fall back to check-then-put.
fn conditional_put_unsupported(e: &object_store::Error) -> bool {
    let mut text = e.to_string();
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if s.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::Unsupported)
        {
            return true;
        }
        text.push_str(&s.to_string());
        src = s.source();
    }
    text.contains("<Code>NotImplemented</Code>")
}

/// A range read that returned fewer bytes than asked for: the object was cut off.
pub(crate) fn truncated(name: &str, range: &Range<u64>, got: usize) -> Error {
    Error::malformed(
        name,
        format!(
            "range {}..{} returned {got} bytes (object truncated?)",
            range.start, range.end
        ),
    )
}

/// Largest buffer reservation made from a stored length before the bytes arrive.
const MAX_RESERVE: usize = 64 << 20;

/// `len` bytes of `file` from `start`, appended to `buf` (fewer when the file is shorter).
pub(crate) fn read_file_range(
    mut file: std::fs::File,
    start: u64,
    len: u64,
    mut buf: Vec<u8>,
) -> std::io::Result<Vec<u8>> {
    use std::io::{Read, Seek, SeekFrom};
    // Room for the whole range up front: no probing read, no growth on the way.
    buf.reserve((len as usize).min(MAX_RESERVE));
    file.seek(SeekFrom::Start(start))?;
    file.take(len).read_to_end(&mut buf)?;
    Ok(buf)
}

/// Appends `len` bytes of `file` from `start` to `buf` only if the page cache holds all of them
/// (`preadv2` with `RWF_NOWAIT`), so the caller may read on an async task without waiting for a
/// device. `false` (and `buf` as it was) when the read would wait, came up short, failed, or the
/// file system does not take the flag: the caller then reads on a blocking thread, which also
/// reports any error.
pub(crate) fn read_cached_range(
    file: &std::fs::File,
    start: u64,
    len: u64,
    buf: &mut Vec<u8>,
) -> bool {
    use rustix::io::{preadv2, ReadWriteFlags};
    let keep = buf.len();
    let Some(want) = usize::try_from(len).ok().filter(|n| *n <= MAX_RESERVE) else {
        return false;
    };
    buf.resize(keep + want, 0);
    let got = preadv2(
        file,
        &mut [std::io::IoSliceMut::new(&mut buf[keep..])],
        start,
        ReadWriteFlags::NOWAIT,
    );
    if got.is_ok_and(|n| n == want) {
        return true;
    }
    buf.truncate(keep);
    false
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write as _;

    fn file_of(bytes: &[u8]) -> (tempfile::TempDir, std::fs::File) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pack");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(bytes)
            .unwrap();
        (dir, std::fs::File::open(&path).unwrap())
    }

    /// Requests a fake service saw: each as its method, with `?` when it was conditional.
    type Seen = Arc<std::sync::Mutex<Vec<String>>>;

    /// A minimal S3 service on 127.0.0.1 without conditional writes: a create-only put gets
    /// 501, HEAD finds nothing, a plain put is stored, a GET is refused with `get` (the status
    /// line and headers of the answer).
    async fn fake_s3(get: &'static str) -> (u16, Seen) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = l.local_addr().unwrap().port();
        let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            while let Ok((mut c, _)) = l.accept().await {
                let mut head = Vec::new();
                let mut b = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && c.read(&mut b).await.unwrap_or(0) == 1 {
                    head.push(b[0]);
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                let len: usize = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .map_or(0, |v| v.trim().parse().unwrap());
                let mut body = vec![0u8; len];
                let _ = c.read_exact(&mut body).await;
                let method = head.split(' ').next().unwrap_or_default().to_uppercase();
                let conditional = head.contains("if-none-match:");
                let answer = match (method.as_str(), conditional) {
                    ("PUT", true) => "501 Not Implemented\r\nContent-Length: 0",
                    ("PUT", false) => "200 OK\r\nETag: \"1\"\r\nContent-Length: 0",
                    ("HEAD", _) => "404 Not Found\r\nContent-Length: 0",
                    ("GET", _) => get,
                    _ => "500 Internal Server Error\r\nContent-Length: 0",
                };
                log.lock()
                    .unwrap()
                    .push(format!("{method}{}", if conditional { "?" } else { "" }));
                let _ = c
                    .write_all(format!("HTTP/1.1 {answer}\r\nConnection: close\r\n\r\n").as_bytes())
                    .await;
            }
        });
        (port, seen)
    }

    /// Storage over the S3 client at `port`, with retries short enough that a failure shows at
    /// once.
    fn s3_storage(port: u16) -> Storage {
        use object_store::aws::AmazonS3Builder;
        let s3 = AmazonS3Builder::new()
            .with_bucket_name("b")
            .with_endpoint(format!("http://127.0.0.1:{port}"))
            .with_region("us-east-1")
            .with_access_key_id("AKIATEST")
            .with_secret_access_key("test")
            .with_allow_http(true)
            .with_retry(object_store::RetryConfig {
                backoff: object_store::BackoffConfig {
                    init_backoff: std::time::Duration::from_millis(1),
                    max_backoff: std::time::Duration::from_millis(1),
                    base: 2.0,
                },
                max_retries: 1,
                retry_timeout: std::time::Duration::from_secs(5),
            })
            .with_http_connector(crate::paced_http::PacedConnector {
                upload: None,
                idle: std::time::Duration::from_secs(5),
                connect: std::time::Duration::from_secs(2),
            })
            .build()
            .unwrap();
        let mut s = Storage::from_store(Arc::new(s3), "s3://b");
        s.retry = RetryPolicy {
            retries: 1,
            initial: std::time::Duration::from_millis(1),
            max: std::time::Duration::from_millis(1),
        };
        s.remote_cache_size = Some(0);
        s.bucket = Some("b".into());
        s
    }

    #[tokio::test]
    async fn a_service_without_conditional_writes_gets_check_then_put() {
        let (port, seen) = fake_s3("500 Internal Server Error\r\nContent-Length: 0").await;
        let s = s3_storage(port);
        s.put("packs/ab", Bytes::from_static(b"pack"), Write::CreateUnique)
            .await
            .unwrap();
        assert_eq!(*seen.lock().unwrap(), ["PUT?", "HEAD", "PUT"]);
    }

    /// A range starting past the object's end is refused with 416: the object is cut short, a
    /// damaged pack, and asking again cannot help.
    #[tokio::test]
    async fn a_range_past_the_end_is_a_truncated_object_not_retried() {
        let (port, seen) = fake_s3("416 Range Not Satisfiable\r\nContent-Length: 0").await;
        let s = s3_storage(port);
        let e = s.get_range("packs/ab", 100..200).await.unwrap_err();
        assert!(matches!(e, Error::Malformed { .. }), "{e:?}");
        assert!(e.to_string().contains("truncated"), "{e}");
        let e = s
            .read_into("packs/ab", Some(100..200), Vec::new())
            .await
            .unwrap_err();
        assert!(matches!(e, Error::Malformed { .. }), "{e:?}");
        assert_eq!(*seen.lock().unwrap(), ["GET", "GET"], "one request each");
    }

    #[test]
    fn a_client_error_is_not_transient_but_throttling_is() {
        let answered = |status: &str| Error::Store {
            object: "x".into(),
            source: object_store::Error::Generic {
                store: "S3",
                source: Box::new(std::io::Error::other(format!(
                    "Server returned non-2xx status code: {status}: <Error/>"
                ))),
            },
        };
        assert!(!answered("400 Bad Request").is_transient());
        assert!(!answered("416 Range Not Satisfiable").is_transient());
        for status in [
            "408 Request Timeout",
            "409 Conflict",
            "429 Too Many Requests",
        ] {
            assert!(answered(status).is_transient(), "{status}");
        }
        assert!(answered("503 Slow Down").is_transient());
        // A message that only quotes such an answer is judged as before.
        let quoted = Error::Store {
            object: "x".into(),
            source: object_store::Error::Generic {
                store: "S3",
                source: "refused (Server returned non-2xx status code: 412 ...)".into(),
            },
        };
        assert!(quoted.is_transient());
    }

    #[test]
    fn a_cached_range_is_appended_after_what_the_buffer_holds() {
        let data: Vec<u8> = (0..20_000u32).map(|i| (i % 251) as u8).collect();
        let (_dir, file) = file_of(&data);
        let mut buf = b"prefix".to_vec();
        assert!(read_cached_range(&file, 1000, 9000, &mut buf));
        assert_eq!(&buf[..6], b"prefix");
        assert_eq!(&buf[6..], &data[1000..10_000]);
    }

    #[test]
    fn a_range_past_the_end_leaves_the_buffer_as_it_was() {
        let (_dir, file) = file_of(&[7u8; 4096]);
        let mut buf = b"prefix".to_vec();
        assert!(!read_cached_range(&file, 4000, 200, &mut buf));
        assert_eq!(buf, b"prefix");
        // The blocking read gives what there is; the caller reports the short range.
        let got = read_file_range(file, 4000, 200, Vec::new()).unwrap();
        assert_eq!(got.len(), 96);
    }

    #[test]
    fn a_range_not_in_the_page_cache_is_left_to_a_blocking_read() {
        let data = vec![9u8; 1 << 20];
        let (_dir, file) = file_of(&data);
        file.sync_all().unwrap();
        // Clean pages of a disk-backed file are dropped on this advice (a temporary directory
        // on tmpfs has no disk behind it and keeps them: this test needs a disk-backed TMPDIR).
        rustix::fs::fadvise(&file, 0, None, rustix::fs::Advice::DontNeed).unwrap();
        let mut buf = Vec::new();
        assert!(
            !read_cached_range(&file, 0, data.len() as u64, &mut buf),
            "the range was read without waiting although its pages were dropped"
        );
        assert!(buf.is_empty());
        let got =
            read_file_range(file.try_clone().unwrap(), 0, data.len() as u64, Vec::new()).unwrap();
        assert_eq!(got, data);
        assert!(read_cached_range(&file, 0, data.len() as u64, &mut buf));
        assert_eq!(buf, data);
    }
}
