//! An open repository: storage, keys, configuration and local index, with the operations the
//! engine builds on (encode and store blobs in packs, read blobs back, manage restore points, keep
//! the local index in step with the repository).

mod catalog;
mod index;
mod maintenance;
mod objects;

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;
use zeroize::Zeroizing;

use crate::blob::{self, MAX_BLOB_RAW_LEN};
use crate::config::RepoConfig;
use crate::crypto::{random_master_key, Keys};
use crate::format::CONFIG_PATH;
use crate::index::LocalIndex;
use crate::objects::ObjectName;
use crate::plan::MaintState;
use crate::storage::Write;
use crate::{
    BlobCacheStats, BlobKind, ChunkId, ChunkMapPage, EncodedBlob, Error, KdfParams, Location,
    PackBuilder, PackEntry, PackId, PointId, Result, SealedPack, Storage,
};

pub use maintenance::PruneClaim;

/// How much of a pack's tail to fetch at once when reading its table of contents: one request
/// covers the whole table for packs of up to ~1,400 blobs.
const TOC_PROBE: u64 = 64 * 1024;
/// Objects fetched at once while syncing the index or listing points.
const SYNC_PARALLELISM: usize = 16;

#[derive(Clone, Debug)]
pub struct OpenOptions {
    /// Directory holding local indexes, one per repository id.
    pub cache_dir: PathBuf,
    /// zstd level for new blobs.
    pub zstd_level: i32,
}

/// What an index sync found.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct SyncReport {
    pub segments_loaded: u64,
    pub packs_read: u64,
    pub packs_forgotten: u64,
    pub unreadable_packs: Vec<String>,
    /// Index segments that could not be read (their packs were indexed from their tables).
    pub unreadable_segments: Vec<String>,
    /// Packs found gone though no plan deleted them (their blobs now count as damaged; logged,
    /// and reported by verify).
    #[serde(skip)]
    pub lost_packs: Vec<crate::LostPack>,
}

pub struct Repository {
    pub(crate) storage: Storage,
    config: RepoConfig,
    pub(crate) keys: Keys,
    index: Arc<LocalIndex>,
    /// `<cache dir>/<repository id>`: the local index, catalog, cached plans.
    cache_root: PathBuf,
    /// What the applied maintenance plans say (condemned and deleted packs).
    maint: std::sync::RwLock<MaintState>,
    plan_lock: tokio::sync::Mutex<()>,
    zstd_level: i32,
    sync_lock: tokio::sync::Mutex<()>,
    /// Blob bytes fetched from a remote store, kept on local disk for the next cold read.
    blob_cache: Option<crate::blob_cache::BlobCache>,
    /// Remote reads by pack window (used with the blob cache, which keeps the neighbours).
    windows: crate::pack_window::PackWindows,
    /// Buffers of whole-pack reads, kept for the next read.
    pub(crate) recycled: Arc<crate::recycle::Recycled>,
}

impl std::fmt::Debug for Repository {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Repository({} at {})",
            self.config.id,
            self.storage.location()
        )
    }
}

/// Checked blobs of one pack, ready to be copied into another (see [`Repository::copy_out`]).
pub struct CopiedBlobs {
    pack: Vec<u8>,
    entries: Vec<PackEntry>,
    recycled: Arc<crate::recycle::Recycled>,
}

impl CopiedBlobs {
    /// Each blob's entry in its pack and its stored (sealed) bytes.
    pub fn blobs(&self) -> impl Iterator<Item = (&PackEntry, &[u8])> {
        self.entries.iter().map(|e| {
            let at = e.offset as usize;
            (e, &self.pack[at..at + e.len as usize])
        })
    }
}

impl Drop for CopiedBlobs {
    fn drop(&mut self) {
        self.recycled
            .return_pack_buffer(std::mem::take(&mut self.pack));
    }
}

/// Names a blob in errors: its chunk, pack and offset.
fn blob_what(id: &ChunkId, loc: &Location) -> String {
    format!(
        "chunk {} in pack {} at offset {}",
        id.short(),
        loc.pack,
        loc.offset
    )
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Invalid(format!("background task failed: {e}")))
}

/// Largest blob decoded on the calling task when its bytes are in the page cache (a default
/// chunk is 256 KiB): decoding more would hold an async worker for milliseconds.
const DECODE_HERE_MAX: u32 = 1 << 20;

/// What a read that would wait for a device gives back: the output buffer and the open pack file.
type NotCached = (Vec<u8>, std::fs::File);

/// A blob read straight from its local pack file, whose location the index gave: one range
/// read, then decoding.
struct LocalBlobRead {
    keys: Keys,
    recycled: Arc<crate::recycle::Recycled>,
    storage: Storage,
    id: ChunkId,
    kind: Option<BlobKind>,
    loc: Location,
    name: String,
    path: PathBuf,
}

impl LocalBlobRead {
    /// The pack file, `None` when it is gone (deleted by a prune since the index was read).
    fn open(&self) -> Result<Option<std::fs::File>> {
        match std::fs::File::open(&self.path) {
            Ok(f) => Ok(Some(f)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Io {
                path: self.path.clone(),
                source,
            }),
        }
    }

    fn range(&self) -> (u64, u64) {
        (self.loc.offset as u64, self.loc.len as u64)
    }

    /// Decodes the blob into `out` if the page cache holds all of its bytes, without waiting for
    /// a device; else gives `out` and `file` back.
    fn decode_cached(
        &self,
        file: std::fs::File,
        out: Vec<u8>,
    ) -> Result<std::result::Result<Vec<u8>, NotCached>> {
        let (start, len) = self.range();
        let mut sealed = self.recycled.blob_buffer();
        if !crate::storage::read_cached_range(&file, start, len, &mut sealed) {
            self.recycled.return_blob_buffer(sealed);
            return Ok(Err((out, file)));
        }
        self.decode(sealed, out).map(Ok)
    }

    /// Reads the blob's bytes from `file`, waiting for the device as long as it takes, and
    /// decodes them into `out`.
    fn read_and_decode(&self, file: std::fs::File, out: Vec<u8>) -> Result<Vec<u8>> {
        let (start, len) = self.range();
        let sealed = crate::storage::read_file_range(file, start, len, self.recycled.blob_buffer())
            .map_err(|source| Error::Io {
                path: self.path.clone(),
                source,
            })?;
        self.decode(sealed, out)
    }

    fn decode(&self, mut sealed: Vec<u8>, mut out: Vec<u8>) -> Result<Vec<u8>> {
        let (start, len) = self.range();
        self.storage.count_read(sealed.len() as u64);
        if sealed.len() as u64 != len {
            return Err(crate::storage::truncated(
                &self.name,
                &(start..start + len),
                sealed.len(),
            ));
        }
        let what = || blob_what(&self.id, &self.loc);
        let decoded = blob::decode_into(
            &self.keys,
            &self.id,
            self.kind,
            self.loc.raw_len,
            &mut sealed,
            &mut out,
            &what,
        );
        self.recycled.return_blob_buffer(sealed);
        decoded.map(|()| out)
    }
}

impl Repository {
    /// Creates a repository. Fails if one (or anything else) is already there.
    pub async fn init(
        storage: &Storage,
        password: &[u8],
        chunk_size: u32,
        kdf: KdfParams,
    ) -> Result<RepoConfig> {
        if storage.head(CONFIG_PATH).await?.is_some() {
            return Err(Error::AlreadyExists {
                location: storage.location().into(),
            });
        }
        if let Some((name, _)) = storage.list("").await?.into_iter().next() {
            return Err(Error::Foreign {
                location: storage.location().into(),
                detail: format!("not empty (holds '{name}'); a repository needs an empty place"),
            });
        }
        let password = password.to_vec();
        let cfg = blocking(move || {
            let master = random_master_key();
            RepoConfig::create(&password, chunk_size, kdf, &master)
        })
        .await??;
        let json = serde_json::to_vec_pretty(&cfg).expect("config serialises");
        match storage
            .put(CONFIG_PATH, Bytes::from(json), Write::CreateChecked)
            .await
        {
            Err(e)
                if matches!(
                    &e,
                    Error::Store {
                        source: object_store::Error::AlreadyExists { .. },
                        ..
                    }
                ) =>
            {
                Err(Error::AlreadyExists {
                    location: storage.location().into(),
                })
            }
            r => r.map(|_| cfg),
        }
    }

    /// Reads the configuration without unlocking it.
    pub async fn read_config(storage: &Storage) -> Result<RepoConfig> {
        let bytes = match storage.get(CONFIG_PATH).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => {
                return Err(Error::NotFound {
                    location: storage.location().into(),
                    detail: "no 'config' object (run 'blockvault repo init' first)".into(),
                })
            }
            Err(e) => return Err(e),
        };
        RepoConfig::parse(storage.location(), &bytes)
    }

    /// Opens and unlocks a repository and brings its local index up to date.
    pub async fn open(storage: Storage, password: &[u8], opts: &OpenOptions) -> Result<Arc<Self>> {
        let config = Self::read_config(&storage).await?;
        let (cfg2, pw) = (config.clone(), Zeroizing::new(password.to_vec()));
        let (_master, keys) = blocking(move || cfg2.unlock(&pw)).await??;
        let index_path = opts.cache_dir.join(&config.id).join("index");
        let repo_id = config.id.clone();
        let (index, fresh) = blocking(move || LocalIndex::open(&index_path, &repo_id)).await??;
        let blob_cache = match storage.remote_cache_size() {
            Some(bound) => {
                let dir = opts.cache_dir.join(&config.id).join("blobs");
                blocking(move || crate::blob_cache::BlobCache::open(dir, bound)).await?
            }
            None => None,
        };
        let cache_root = opts.cache_dir.join(&config.id);
        let maint = Self::load_maint_state(&cache_root);
        let repo = Arc::new(Self {
            storage,
            config,
            keys,
            index: Arc::new(index),
            cache_root,
            maint: std::sync::RwLock::new(maint),
            plan_lock: tokio::sync::Mutex::new(()),
            zstd_level: opts.zstd_level,
            sync_lock: tokio::sync::Mutex::new(()),
            blob_cache,
            windows: crate::pack_window::PackWindows::new(),
            recycled: Arc::new(crate::recycle::Recycled::new()),
        });
        if fresh {
            // A new local index knows nothing; plans are read again from the first.
            *repo.maint.write().expect("maintenance state lock") = MaintState::default();
        }
        repo.refresh_plans().await?;
        // Damage found by any host's verification first: it decides which copy of a chunk the
        // index keeps while segments are loaded.
        repo.sync_verify_records().await?;
        repo.sync_index(fresh).await?;
        Ok(repo)
    }

    pub fn id(&self) -> &str {
        &self.config.id
    }

    pub fn config(&self) -> &RepoConfig {
        &self.config
    }

    pub fn chunk_size(&self) -> u32 {
        self.config.chunk_size
    }

    pub fn storage(&self) -> &Storage {
        &self.storage
    }

    pub fn index_path(&self) -> PathBuf {
        self.index.path().to_path_buf()
    }

    /// The keyed id of a plaintext.
    pub fn chunk_id(&self, data: &[u8]) -> ChunkId {
        self.keys.hasher.id(data)
    }

    /// Compresses and encrypts a blob. CPU-bound: call from a blocking thread.
    pub fn encode_blob(&self, kind: BlobKind, id: ChunkId, data: &[u8]) -> EncodedBlob {
        blob::encode(&self.keys, kind, id, data, self.zstd_level)
    }

    /// Where a blob is stored, per the local index, for reading it. Packs a maintenance plan
    /// recorded as deleted are never answered, nor a copy verification found damaged (a backup
    /// then stores the chunk again instead of deduplicating against it). A quick RocksDB read:
    /// call from a blocking thread.
    pub fn lookup(&self, id: &ChunkId) -> Result<Option<Location>> {
        Ok(self
            .lookup_any(id)?
            .filter(|l| !self.index.is_damaged(&l.pack, l.offset)))
    }

    /// Where a blob is stored, damaged or not (verification reads and reports both); never a
    /// pack a maintenance plan recorded as deleted.
    pub fn lookup_any(&self, id: &ChunkId) -> Result<Option<Location>> {
        Ok(self.index.get(id)?.filter(|l| !self.is_deleted(&l.pack)))
    }

    /// The other copies of a blob the local index knows, besides the one [`Self::lookup_any`]
    /// answers (the same chunk stored by two hosts at once, or again over a damaged copy); never
    /// in a pack a maintenance plan recorded as deleted. Call from a blocking thread.
    pub fn other_copies(&self, id: &ChunkId) -> Result<Vec<Location>> {
        let mut v = self.index.spares_of(id)?;
        v.retain(|l| !self.is_deleted(&l.pack));
        Ok(v)
    }

    /// Where a blob is stored, for deduplication: also never a pack the newest applied plan
    /// condemns (its chunk is stored again instead). Call from a blocking thread.
    pub fn lookup_for_dedup(&self, id: &ChunkId) -> Result<Option<Location>> {
        Ok(self.lookup(id)?.filter(|l| !self.is_condemned(&l.pack)))
    }

    pub(crate) fn keys(&self) -> &Keys {
        &self.keys
    }

    pub(crate) fn local_index(&self) -> Arc<LocalIndex> {
        self.index.clone()
    }

    /// Closes a pack (appends its encrypted table of contents). CPU-bound but small.
    pub fn seal_pack(&self, builder: PackBuilder) -> SealedPack {
        builder.seal(&self.keys)
    }

    /// Uploads a sealed pack (create-only) and records its entries in the local index, in that
    /// order: the index never points at a pack that is not stored.
    pub async fn store_pack(&self, pack: &SealedPack) -> Result<()> {
        self.put_object(
            ObjectName::Pack(pack.id),
            pack.bytes.clone(),
            Write::CreateUnique,
        )
        .await?;
        let (index, id, size, entries) = (
            self.index.clone(),
            pack.id,
            pack.bytes.len() as u64,
            pack.entries.clone(),
        );
        // A pack just written is condemned by no plan.
        blocking(move || index.insert_pack(id, size, &entries, &Default::default())).await?
    }

    /// Reads a blob and returns its plaintext. A chunk missing from the local index triggers one
    /// refresh of the plans and one full index sync (another host may have written it, or a
    /// plan may name where its other copy is) before it is reported missing.
    /// A pack found missing (deleted by a prune this process has not heard of yet) also syncs
    /// once — plans, then the index — and the read is retried from the chunk's new location.
    pub async fn read_blob(&self, id: &ChunkId, kind: Option<BlobKind>) -> Result<Vec<u8>> {
        self.read_blob_into(id, kind, Vec::new()).await
    }

    /// Reads a blob into `out`, after the bytes `out` holds (a prefix the caller chose, such as
    /// padding that aligns the data), and gives it back: the decoding allocates nothing when `out`
    /// has room for the blob, so a reader that recycles its buffers decodes chunk after chunk
    /// without the allocator (see `blob::decode_into`). A retry after a failed first attempt
    /// decodes into a new buffer whose prefix, of the same length, is zeros.
    pub async fn read_blob_into(
        &self,
        id: &ChunkId,
        kind: Option<BlobKind>,
        out: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let out = match self.read_local_blob_into(id, kind, out).await? {
            Ok(plain) => return Ok(plain),
            Err(out) => out,
        };
        let loc = match self.locate(id).await? {
            Some(l) => l,
            None => {
                // A plan published since this process last looked may name the segment that
                // holds the chunk's other copy (its copy here was in a pack that plan deleted).
                self.refresh_plans().await?;
                self.sync_index(true).await?;
                self.locate(id)
                    .await?
                    .ok_or_else(|| Error::ChunkMissing { chunk: id.to_hex() })?
            }
        };
        let keep = out.len();
        match self.read_blob_at_into(id, kind, &loc, out).await {
            Err(Error::PackMissing { .. }) => {
                self.refresh_plans().await?;
                self.sync_index(true).await?;
                let again = self
                    .locate(id)
                    .await?
                    .ok_or_else(|| Error::ChunkMissing { chunk: id.to_hex() })?;
                self.read_blob_at_into(id, kind, &again, vec![0; keep])
                    .await
            }
            r => r,
        }
    }

    /// From a local directory, a blob is located and its pack opened on the calling task, then
    /// read and decoded, not through the object store: each of those was once a hop to the
    /// blocking pool, whose wake-ups cost a sequential export more than a third of its time.
    /// When the blob's bytes are in the page cache they are decoded right here too: a few
    /// hundred microseconds, where even one hop (two thread switches) cost a mount serving
    /// `nbdcopy` a tenth of its CPU (docs/BENCHMARKS.md). Otherwise the read and the decoding
    /// run on a blocking thread, so reads that wait for a device are still many at once. Gives
    /// `out` back when the blob must take the general path: a remote or paced store, a chunk
    /// the local index does not know, or a pack file that is gone.
    async fn read_local_blob_into(
        &self,
        id: &ChunkId,
        kind: Option<BlobKind>,
        out: Vec<u8>,
    ) -> Result<std::result::Result<Vec<u8>, Vec<u8>>> {
        if self.blob_cache.is_some() || !self.storage.reads_local_files() {
            return Ok(Err(out));
        }
        // The lookup and the file's opening are served from memory in the normal case.
        let Some(loc) = self.index.get(id)? else {
            return Ok(Err(out));
        };
        let name = ObjectName::Pack(loc.pack).path();
        let Some(path) = self.storage.local_file(&name) else {
            return Ok(Err(out));
        };
        let read = LocalBlobRead {
            keys: self.keys.clone(),
            recycled: self.recycled.clone(),
            storage: self.storage.clone(),
            id: *id,
            kind,
            loc,
            name,
            path,
        };
        let Some(file) = read.open()? else {
            return Ok(Err(out));
        };
        let (out, file) = if loc.raw_len.max(loc.len) <= DECODE_HERE_MAX {
            match read.decode_cached(file, out)? {
                Ok(plain) => return Ok(Ok(plain)),
                Err(back) => back,
            }
        } else {
            (out, file)
        };
        blocking(move || read.read_and_decode(file, out))
            .await?
            .map(Ok)
    }

    /// Decrypts fetched bytes where they lie (they are normally this reader's own buffer; a
    /// shared one, such as a slice of a pack window, is copied into a per-thread scratch buffer
    /// first) and decompresses them into `out`, on a blocking thread.
    async fn decode_blob_into(
        &self,
        id: &ChunkId,
        kind: Option<BlobKind>,
        loc: &Location,
        raw: Bytes,
        mut out: Vec<u8>,
    ) -> Result<Vec<u8>> {
        thread_local! {
            static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
        }
        let (keys, id, loc) = (self.keys.clone(), *id, *loc);
        let recycled = self.recycled.clone();
        blocking(move || {
            let what = || blob_what(&id, &loc);
            match raw.try_into_mut() {
                Ok(mut own) => {
                    let r =
                        blob::decode_into(&keys, &id, kind, loc.raw_len, &mut own, &mut out, &what);
                    recycled.return_blob_buffer(own.into());
                    r
                }
                Err(shared) => SCRATCH.with(|s| {
                    let mut s = s.borrow_mut();
                    s.clear();
                    s.extend_from_slice(&shared);
                    blob::decode_into(&keys, &id, kind, loc.raw_len, &mut s, &mut out, &what)
                }),
            }
            .map(|()| out)
        })
        .await?
    }

    async fn locate(&self, id: &ChunkId) -> Result<Option<Location>> {
        let (index, id) = (self.index.clone(), *id);
        let found = blocking(move || index.get(&id)).await??;
        Ok(found.filter(|l| !self.is_deleted(&l.pack)))
    }

    /// Reads a blob from a known location.
    pub async fn read_blob_at(
        &self,
        id: &ChunkId,
        kind: Option<BlobKind>,
        loc: &Location,
    ) -> Result<Vec<u8>> {
        self.read_blob_at_into(id, kind, loc, Vec::new()).await
    }

    /// Reads a blob from a known location into `out`.
    async fn read_blob_at_into(
        &self,
        id: &ChunkId,
        kind: Option<BlobKind>,
        loc: &Location,
        out: Vec<u8>,
    ) -> Result<Vec<u8>> {
        let keep = out.len();
        let raw = self.fetch_blob_bytes(loc).await?;
        match self.decode_blob_into(id, kind, loc, raw, out).await {
            Err(e) if self.blob_cache.is_some() => {
                // The copy may have been damaged on local disk, not in the repository: drop it
                // and judge the blob by what the store holds.
                if let Some(c) = &self.blob_cache {
                    c.remove(loc);
                }
                tracing::debug!(
                    "blob in pack {} failed to decode ({e}); refetching",
                    loc.pack
                );
                let raw = self.fetch_blob_bytes_uncached(loc).await?;
                self.decode_blob_into(id, kind, loc, raw, vec![0; keep])
                    .await
            }
            r => r,
        }
    }

    /// Hits and misses of the on-disk blob cache (remote stores only).
    pub fn blob_cache_stats(&self) -> Option<BlobCacheStats> {
        self.blob_cache.as_ref().map(|c| c.stats())
    }

    /// Fetches a blob's stored bytes: from the on-disk cache when the store is remote and the
    /// blob was read before, else with one range read of its pack (for a remote store, of the
    /// pack window around it; see `pack_window`).
    pub async fn fetch_blob_bytes(&self, loc: &Location) -> Result<Bytes> {
        let Some(cache) = &self.blob_cache else {
            return self.fetch_blob_bytes_uncached(loc).await;
        };
        if let Some(b) = cache.get(loc) {
            return Ok(b);
        }
        let _window = self
            .windows
            .window_locks
            .lock(&(loc.pack, loc.offset as u64 / crate::pack_window::WINDOW))
            .await;
        // Another reader may have fetched this window while we waited for it.
        if let Some(b) = cache.get(loc) {
            return Ok(b);
        }
        let members = match self.pack_toc(&loc.pack).await {
            Ok(toc) => crate::pack_window::window_of(&toc, loc),
            Err(e) => {
                // A damaged table must not hide the blob: read it alone and let its own
                // authentication judge it.
                tracing::debug!("pack {}: table of contents unreadable ({e})", loc.pack);
                None
            }
        };
        let Some(members) = members.filter(|m| m.len() > 1) else {
            let b = self.fetch_blob_bytes_uncached(loc).await?;
            cache.put(loc, &b);
            return Ok(b);
        };
        let (first, last) = (members[0], members[members.len() - 1]);
        let span = self
            .fetch_blob_bytes_uncached(&Location {
                len: last.offset - first.offset + last.len,
                ..first
            })
            .await?;
        let mut wanted = None;
        for m in &members {
            let at = (m.offset - first.offset) as usize;
            let b = span.slice(at..at + m.len as usize);
            cache.put(m, &b);
            if m.offset == loc.offset {
                wanted = Some(b);
            }
        }
        Ok(wanted.expect("window_of returns the requested blob among the members"))
    }

    /// A remote pack's table of contents, read once and kept in memory.
    async fn pack_toc(&self, pack: &PackId) -> Result<Arc<Vec<PackEntry>>> {
        if let Some(t) = self.windows.toc(pack) {
            return Ok(t);
        }
        let _one_reader = self.windows.toc_locks.lock(pack).await;
        if let Some(t) = self.windows.toc(pack) {
            return Ok(t);
        }
        let toc = Arc::new(self.read_toc(pack).await?);
        self.windows.keep_toc(*pack, toc.clone());
        Ok(toc)
    }

    async fn fetch_blob_bytes_uncached(&self, loc: &Location) -> Result<Bytes> {
        let path = ObjectName::Pack(loc.pack).path();
        let range = loc.offset as u64..loc.offset as u64 + loc.len as u64;
        match self
            .storage
            .read_into(&path, Some(range), self.recycled.blob_buffer())
            .await
        {
            Err(e) if e.is_not_found() => Err(Error::PackMissing {
                pack: loc.pack.to_hex(),
            }),
            r => r.map(Bytes::from),
        }
    }

    /// Decrypts a blob synchronously (for callers already on a blocking thread).
    pub fn decode_blob_sync(
        &self,
        id: &ChunkId,
        kind: Option<BlobKind>,
        loc: &Location,
        raw: &[u8],
    ) -> Result<Vec<u8>> {
        blob::decode(&self.keys, id, kind, loc.raw_len, raw, &|| {
            format!(
                "chunk {} in pack {} at offset {}",
                id.short(),
                loc.pack,
                loc.offset
            )
        })
    }

    /// Loads a chunk-map page.
    pub async fn load_page(&self, id: &ChunkId, slots: usize) -> Result<ChunkMapPage> {
        let plain = self
            .read_blob_into(id, None, self.recycled.blob_buffer())
            .await?;
        let page =
            ChunkMapPage::decode(&plain, slots, &|| format!("chunk-map page {}", id.short()));
        self.recycled.return_blob_buffer(plain);
        page
    }

    /// Stores the boot trace of `point` (create-only: the first boot's trace stays). Returns
    /// false when the point already has one.
    pub async fn save_boot_trace(&self, point: &PointId, trace: &crate::BootTrace) -> Result<bool> {
        let sealed = trace.seal(&self.keys, point);
        let path = crate::boot_trace::path(point);
        match self
            .storage
            .put(&path, Bytes::from(sealed), Write::CreateChecked)
            .await
        {
            Ok(_) => Ok(true),
            Err(Error::Store {
                source: object_store::Error::AlreadyExists { .. },
                ..
            }) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The boot trace of `point`, if it has one.
    pub async fn load_boot_trace(&self, point: &PointId) -> Result<Option<crate::BootTrace>> {
        let bytes = match self.storage.get(&crate::boot_trace::path(point)).await {
            Ok(b) => b,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let (keys, id) = (self.keys.clone(), *point);
        blocking(move || crate::BootTrace::open(&keys, &id, &bytes))
            .await?
            .map(Some)
    }

    /// Removes the boot trace of `point` (nothing if it has none). Only a forgotten point's trace
    /// is removed: a listed point's successors replay it.
    pub async fn delete_boot_trace(&self, point: &PointId) -> Result<()> {
        self.storage.delete(&crate::boot_trace::path(point)).await
    }

    /// The points that have a boot trace.
    pub async fn boot_trace_points(&self) -> Result<HashSet<PointId>> {
        Ok(self
            .storage
            .list(crate::format::BOOT_TRACES_DIR)
            .await?
            .into_iter()
            .filter_map(|(name, _)| crate::boot_trace::parse_path(&name))
            .collect())
    }

    /// Downloads a whole pack for a repack and returns the stored bytes of the blobs in
    /// `wanted` (first copy of each), every one checked first (decrypted, decompressed and
    /// re-hashed): a repack never copies damage. A wanted blob that is damaged or absent fails
    /// the call, naming it. The pack is read into a kept buffer, which goes back when the
    /// returned [`CopiedBlobs`] is dropped.
    pub async fn copy_out(&self, id: &PackId, wanted: HashSet<ChunkId>) -> Result<CopiedBlobs> {
        let buf = self.recycled.pack_buffer();
        let bytes = self
            .storage
            .read_into(&ObjectName::Pack(*id).path(), None, buf)
            .await?;
        let keys = self.keys.clone();
        let recycled = self.recycled.clone();
        let id = *id;
        blocking(move || {
            let entries = crate::pack::open_whole(&keys, &id, &bytes)?;
            let mut chosen = Vec::with_capacity(wanted.len());
            let mut found = HashSet::with_capacity(wanted.len());
            let mut scratch = recycled.scratch();
            for e in &entries {
                if !wanted.contains(&e.id) || !found.insert(e.id) {
                    continue;
                }
                let raw = &bytes[e.offset as usize..(e.offset + e.len) as usize];
                let what = || format!("chunk {} in pack {id} at offset {}", e.id.short(), e.offset);
                blob::check(&keys, &e.id, e.kind, e.raw_len, raw, &mut scratch, &what)?;
                chosen.push(*e);
            }
            recycled.return_scratch(scratch);
            if let Some(missing) = wanted.iter().find(|c| !found.contains(c)) {
                return Err(Error::malformed(
                    format!("pack {id}"),
                    format!("chunk {} is not in it", missing.short()),
                ));
            }
            Ok(CopiedBlobs {
                pack: bytes,
                entries: chosen,
                recycled,
            })
        })
        .await?
    }

    /// Re-wraps the master key under a new password.
    /// The update is a compare-and-swap of `config` against the version this call reads, which
    /// must still be the one the repository was opened with: of two concurrent changes (two
    /// hosts), one wins and the other fails with [`Error::Conflict`], never silently lost.
    pub async fn change_password(&self, old: &[u8], new: &[u8], kdf: KdfParams) -> Result<()> {
        let (bytes, version) = self.storage.get_versioned(CONFIG_PATH).await?;
        let current = RepoConfig::parse(self.storage.location(), &bytes)?;
        let conflict = |detail: &str| Error::Conflict {
            object: format!("{} config", self.storage.location()),
            detail: detail.into(),
        };
        if current.wrapped_key != self.config.wrapped_key || current.mac != self.config.mac {
            return Err(conflict(
                "its key was re-wrapped since this command opened it",
            ));
        }
        let (old, new) = (old.to_vec(), new.to_vec());
        let updated = blocking(move || {
            let (master, _) = current.unlock(&old)?;
            current.rewrap(&master, &new, kdf)
        })
        .await??;
        let json = serde_json::to_vec_pretty(&updated).expect("config serialises");
        match self
            .storage
            .update(CONFIG_PATH, Bytes::from(json), &version)
            .await
        {
            Err(e) if e.is_precondition_failed() => Err(conflict(
                "another password change was stored first; use the password now in force",
            )),
            r => r,
        }
    }

    /// Largest plaintext a blob may have.
    pub fn max_blob_len() -> u32 {
        MAX_BLOB_RAW_LEN
    }
}
