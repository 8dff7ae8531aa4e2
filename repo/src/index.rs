//! The local index: a RocksDB cache of where every chunk lives, which packs and index segments it
//! has absorbed, and which repository it belongs to. It is never the truth: deleting it loses nothing
//! (`Repository::rebuild_index` reads it all back from the repository).
//!
//! RocksDB admits one writing process per database. A second process that finds it locked (two
//! backups at once on one host) opens it as a secondary instance — reads follow the primary — and
//! keeps what it learns in memory; its packs reach other processes through the index segment it
//! writes to the repository.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rocksdb::{BlockBasedOptions, Direction, IteratorMode, Options, WriteBatch, DB};

use crate::verify_record::DamagedAt;
use crate::{BlobKind, ChunkId, Error, PackEntry, PackId, Result, SegmentId};

/// "2" added the `b` keys: an index of schema 1 is rebuilt once, so it learns the other copies.
const SCHEMA_VERSION: &[u8] = b"2";
const K_REPO: &[u8] = b"meta/repo";
const K_SCHEMA: &[u8] = b"meta/schema";
const P_CHUNK: u8 = b'c';
/// `b<chunk id><pack id>`: another copy of a chunk than the one its `c` key names (two hosts
/// stored it at once, a repack copied it, a backup stored it again over a damaged copy). Kept so
/// that when the indexed copy turns out damaged, or its pack goes, a good copy takes its place
/// without a rebuild.
const P_SPARE: u8 = b'b';
const P_PACK: u8 = b'p';
const P_SEGMENT: u8 = b's';
/// `v<record name>`: a verify record whose damaged blobs are in the `d` keys.
const P_VERIFY: u8 = b'v';
/// `d<pack id><offset u32 BE>`: a blob location verification found damaged.
const P_DAMAGED: u8 = b'd';
/// `x<pack id>`: a pack gone from the repository though no plan deleted it, with the blobs the
/// index held in it (chunk id, offset, length: 40 bytes each), until a verify record names it.
const P_LOST: u8 = b'x';
/// Bytes of one blob in a `x` value.
const LOST_BLOB_LEN: usize = 32 + 4 + 4;

/// Where a blob is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Location {
    pub pack: PackId,
    pub offset: u32,
    pub len: u32,
    pub raw_len: u32,
    pub kind: BlobKind,
}

impl Location {
    fn encode(&self) -> [u8; 29] {
        let mut v = [0u8; 29];
        v[..16].copy_from_slice(&self.pack.0);
        v[16..20].copy_from_slice(&self.offset.to_le_bytes());
        v[20..24].copy_from_slice(&self.len.to_le_bytes());
        v[24..28].copy_from_slice(&self.raw_len.to_le_bytes());
        v[28] = self.kind.code();
        v
    }

    fn decode(v: &[u8]) -> Option<Self> {
        if v.len() != 29 {
            return None;
        }
        let u = |o: usize| u32::from_le_bytes(v[o..o + 4].try_into().expect("4 bytes"));
        Some(Self {
            pack: PackId(v[..16].try_into().ok()?),
            offset: u(16),
            len: u(20),
            raw_len: u(24),
            kind: BlobKind::from_code(v[28])?,
        })
    }

    pub(crate) fn of(pack: PackId, e: &PackEntry) -> Self {
        Self {
            pack,
            offset: e.offset,
            len: e.len,
            raw_len: e.raw_len,
            kind: e.kind,
        }
    }
}

fn key(prefix: u8, id: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + id.len());
    k.push(prefix);
    k.extend_from_slice(id);
    k
}

/// A pack gone from the repository though no plan deleted it, and the blobs (chunk id, offset,
/// length) the index held in it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LostPack {
    pub pack: PackId,
    pub blobs: Vec<(ChunkId, u32, u32)>,
}

/// Counts for `repo index` reports.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct IndexStats {
    pub chunks: u64,
    pub packs: u64,
    pub segments: u64,
}

#[derive(Default)]
struct Overlay {
    chunks: HashMap<ChunkId, Location>,
    packs: HashSet<PackId>,
    segments: HashSet<SegmentId>,
    verify_records: HashSet<String>,
}

fn spare_key(id: &ChunkId, pack: &PackId) -> Vec<u8> {
    let mut k = key(P_SPARE, id.as_bytes());
    k.extend_from_slice(&pack.0);
    k
}

/// The chunk a `c` or `b` key (without its prefix byte) is about.
fn chunk_of(k: &[u8]) -> Option<ChunkId> {
    ChunkId::from_slice(k.get(..32)?)
}

fn damaged_key(pack: &PackId, offset: u32) -> Vec<u8> {
    let mut k = key(P_DAMAGED, &pack.0);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

pub(crate) struct LocalIndex {
    path: PathBuf,
    db: DB,
    secondary_dir: Option<PathBuf>,
    overlay: Mutex<Overlay>,
    /// Blob locations verification found damaged (all of the `d` keys, kept in memory: damage is
    /// rare and every dedup lookup consults it).
    damaged: std::sync::RwLock<HashSet<(PackId, u32)>>,
    /// When a secondary last followed the primary; guards catch-up against running concurrently.
    last_catch_up: Mutex<Instant>,
}

/// A secondary that misses a chunk follows the primary's newest writes at most this often, so a
/// backup running beside another on the same host deduplicates against what that one just stored.
const CATCH_UP_ON_MISS: Duration = Duration::from_millis(20);

fn db_options() -> Options {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    let mut block = BlockBasedOptions::default();
    // Most lookups during a first backup miss: a bloom filter answers those without disk reads.
    block.set_bloom_filter(10.0, false);
    opts.set_block_based_table_factory(&block);
    opts.set_max_open_files(256);
    opts.set_keep_log_file_num(2);
    opts
}

impl LocalIndex {
    /// Opens (or creates) the index at `path` for repository `repo_id`. Returns the index and
    /// whether it is empty and must be filled from the repository (new, or it belonged to another
    /// repository, or its schema is old).
    pub(crate) fn open(path: &Path, repo_id: &str) -> Result<(Self, bool)> {
        let err = |detail: String| Error::Index {
            path: path.to_path_buf(),
            detail,
        };
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| err(format!("creating directory: {e}")))?;
        }
        let opts = db_options();
        let (db, secondary_dir) = match DB::open(&opts, path) {
            Ok(db) => (db, None),
            Err(e) if is_lock_error(&e) => {
                let sec = path.with_extension(format!("secondary-{}", std::process::id()));
                let mut sopts = db_options();
                sopts.set_max_open_files(-1);
                let db = DB::open_as_secondary(&sopts, path, &sec)
                    .map_err(|e| err(format!("opening as secondary: {e}")))?;
                tracing::info!(index = %path.display(), "index is in use by another process; following it read-only");
                (db, Some(sec))
            }
            Err(e) => return Err(err(e.to_string())),
        };
        let idx = Self {
            path: path.to_path_buf(),
            db,
            secondary_dir,
            overlay: Mutex::new(Overlay::default()),
            damaged: Default::default(),
            last_catch_up: Mutex::new(Instant::now()),
        };
        let stored_repo = idx.db.get(K_REPO).map_err(|e| err(e.to_string()))?;
        let schema = idx.db.get(K_SCHEMA).map_err(|e| err(e.to_string()))?;
        let matches = stored_repo.as_deref() == Some(repo_id.as_bytes())
            && schema.as_deref() == Some(SCHEMA_VERSION);
        if matches {
            idx.load_damaged()?;
            return Ok((idx, false));
        }
        if stored_repo.is_some() {
            tracing::warn!(index = %path.display(), "local index belongs to another repository or an old schema; rebuilding it");
        }
        idx.clear(repo_id)?;
        Ok((idx, true))
    }

    pub(crate) fn is_secondary(&self) -> bool {
        self.secondary_dir.is_some()
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Index {
            path: self.path.clone(),
            detail: e.to_string(),
        }
    }

    /// Empties the index and stamps it with `repo_id`.
    pub(crate) fn clear(&self, repo_id: &str) -> Result<()> {
        *self.overlay.lock().expect("index overlay lock") = Overlay::default();
        self.damaged
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
        if self.is_secondary() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        batch.delete_range(&[0u8][..], &[0xffu8; 9][..]);
        batch.put(K_REPO, repo_id.as_bytes());
        batch.put(K_SCHEMA, SCHEMA_VERSION);
        self.db.write(batch).map_err(|e| self.err(e))?;
        Ok(())
    }

    /// Follows the primary's writes when this process opened the index as a secondary.
    pub(crate) fn catch_up(&self) {
        if self.is_secondary() {
            let mut last = self.last_catch_up.lock().expect("catch-up lock");
            if let Err(e) = self.db.try_catch_up_with_primary() {
                tracing::debug!(error = %e, "secondary index catch-up failed");
            }
            *last = Instant::now();
        }
    }

    pub(crate) fn get(&self, id: &ChunkId) -> Result<Option<Location>> {
        if let Some(l) = self
            .overlay
            .lock()
            .expect("index overlay lock")
            .chunks
            .get(id)
        {
            return Ok(Some(*l));
        }
        let found = self.get_stored(id)?;
        if found.is_some() || !self.is_secondary() {
            return Ok(found);
        }
        {
            let mut last = self.last_catch_up.lock().expect("catch-up lock");
            if last.elapsed() < CATCH_UP_ON_MISS {
                return Ok(None);
            }
            if let Err(e) = self.db.try_catch_up_with_primary() {
                tracing::debug!(error = %e, "secondary index catch-up failed");
            }
            *last = Instant::now();
        }
        self.get_stored(id)
    }

    fn get_stored(&self, id: &ChunkId) -> Result<Option<Location>> {
        match self
            .db
            .get_pinned(key(P_CHUNK, id.as_bytes()))
            .map_err(|e| self.err(e))?
        {
            Some(v) => Location::decode(&v)
                .map(Some)
                .ok_or_else(|| self.err(format!("entry for chunk {} is corrupt", id.short()))),
            None => Ok(None),
        }
    }

    pub(crate) fn has_segment(&self, id: &SegmentId) -> Result<bool> {
        if self
            .overlay
            .lock()
            .expect("index overlay lock")
            .segments
            .contains(id)
        {
            return Ok(true);
        }
        Ok(self
            .db
            .get_pinned(key(P_SEGMENT, &id.0))
            .map_err(|e| self.err(e))?
            .is_some())
    }

    /// Records a stored pack and all its entries. `stale` names packs a maintenance plan
    /// condemns: their copy of a chunk never replaces a copy in a pack that is not condemned.
    pub(crate) fn insert_pack(
        &self,
        pack: PackId,
        size: u64,
        entries: &[PackEntry],
        stale: &HashSet<PackId>,
    ) -> Result<()> {
        if self.is_secondary() {
            for e in entries {
                if self.keeps_existing(&pack, e, stale)? {
                    continue;
                }
                let mut o = self.overlay.lock().expect("index overlay lock");
                o.chunks.insert(e.id, Location::of(pack, e));
            }
            self.overlay
                .lock()
                .expect("index overlay lock")
                .packs
                .insert(pack);
            return Ok(());
        }
        let mut indexed = self.indexed_of(entries)?;
        let mut batch = WriteBatch::default();
        for e in entries {
            let new = Location::of(pack, e);
            if let Some(old) = indexed.get(&e.id).copied().filter(|o| o.pack != pack) {
                if self.prefers(&old, &new, stale) {
                    batch.put(spare_key(&e.id, &pack), new.encode());
                    continue;
                }
                batch.put(spare_key(&e.id, &old.pack), old.encode());
                batch.delete(spare_key(&e.id, &pack));
            }
            batch.put(key(P_CHUNK, e.id.as_bytes()), new.encode());
            indexed.insert(e.id, new);
        }
        batch.put(key(P_PACK, &pack.0), size.to_le_bytes());
        self.db.write(batch).map_err(|e| self.err(e))
    }

    /// The indexed copy of each of `entries`' chunks, in one read of the stored index.
    fn indexed_of(&self, entries: &[PackEntry]) -> Result<HashMap<ChunkId, Location>> {
        let keys = entries.iter().map(|e| key(P_CHUNK, e.id.as_bytes()));
        let mut out = HashMap::new();
        for (e, v) in entries.iter().zip(self.db.multi_get(keys)) {
            if let Some(l) = v
                .map_err(|e| self.err(e))?
                .as_deref()
                .and_then(Location::decode)
            {
                out.insert(e.id, l);
            }
        }
        Ok(out)
    }

    /// True when copy `old` should stay indexed rather than `new`: `new` is damaged or in a
    /// condemned pack and `old` is neither (a rebuild must not trade a good copy for a bad one,
    /// nor a repack's new copy for the old one it replaces, whatever order the segments are read
    /// in). Otherwise the newest copy is indexed.
    fn prefers(&self, old: &Location, new: &Location, stale: &HashSet<PackId>) -> bool {
        let bad = |l: &Location| self.is_damaged(&l.pack, l.offset) || stale.contains(&l.pack);
        bad(new) && !bad(old)
    }

    /// For a secondary, which keeps no other copies: whether the copy already indexed stays
    /// (see [`Self::prefers`]).
    fn keeps_existing(
        &self,
        pack: &PackId,
        e: &PackEntry,
        stale: &HashSet<PackId>,
    ) -> Result<bool> {
        let new = Location::of(*pack, e);
        Ok(self
            .get(&e.id)?
            .is_some_and(|old| old.pack != *pack && self.prefers(&old, &new, stale)))
    }

    /// True when verification found any blob damaged (per the records loaded).
    pub(crate) fn has_damage(&self) -> bool {
        !self
            .damaged
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .is_empty()
    }

    pub(crate) fn is_damaged(&self, pack: &PackId, offset: u32) -> bool {
        let d = self
            .damaged
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        !d.is_empty() && d.contains(&(*pack, offset))
    }

    fn load_damaged(&self) -> Result<()> {
        let mut set = HashSet::new();
        self.for_each_entry(P_DAMAGED, |k, _| {
            if k.len() == 16 + 4 {
                let pack = PackId(k[..16].try_into().expect("16 bytes"));
                let off = u32::from_be_bytes(k[16..20].try_into().expect("4 bytes"));
                set.insert((pack, off));
            }
        })?;
        *self
            .damaged
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = set;
        Ok(())
    }

    /// Names of the verify records whose damage this index holds.
    pub(crate) fn verify_records_seen(&self) -> Result<HashSet<String>> {
        let mut out = self
            .overlay
            .lock()
            .expect("index overlay lock")
            .verify_records
            .clone();
        self.for_each_entry(P_VERIFY, |k, _| {
            out.insert(String::from_utf8_lossy(k).into_owned());
        })?;
        Ok(out)
    }

    /// Calls `f` with every entry under `prefix`: the key without its prefix byte, and the value.
    fn for_each_entry(&self, prefix: u8, mut f: impl FnMut(&[u8], &[u8])) -> Result<()> {
        for item in self
            .db
            .iterator(IteratorMode::From(&[prefix], Direction::Forward))
        {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if k.first() != Some(&prefix) {
                break;
            }
            f(&k[1..], &v);
        }
        Ok(())
    }

    /// Records a verify record as absorbed, with the damaged blob locations it names.
    pub(crate) fn insert_verify_record(&self, name: &str, damaged: &[DamagedAt]) -> Result<()> {
        {
            let mut d = self
                .damaged
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            d.extend(damaged.iter().map(|(_, p, o)| (*p, *o)));
        }
        if self.is_secondary() {
            self.overlay
                .lock()
                .expect("index overlay lock")
                .verify_records
                .insert(name.to_string());
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for (_, p, o) in damaged {
            batch.put(damaged_key(p, *o), []);
        }
        batch.put(key(P_VERIFY, name.as_bytes()), []);
        self.db.write(batch).map_err(|e| self.err(e))?;
        self.prefer_good_copies(damaged)
    }

    /// The other copies of chunk `id` (its `b` keys), besides the one `get` answers.
    pub(crate) fn spares_of(&self, id: &ChunkId) -> Result<Vec<Location>> {
        let prefix = key(P_SPARE, id.as_bytes());
        let mut out = Vec::new();
        for item in self
            .db
            .iterator(IteratorMode::From(&prefix, Direction::Forward))
        {
            let (k, v) = item.map_err(|e| self.err(e))?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.extend(Location::decode(&v));
        }
        Ok(out)
    }

    /// Where the copy read of a chunk in `damaged` is that damaged blob, indexes another copy
    /// that is not damaged instead, if the index knows one: reads and deduplication use it at
    /// once, with no backup needed to store the chunk again. The damaged copy is kept as an
    /// other copy until its pack goes.
    fn prefer_good_copies(&self, damaged: &[DamagedAt]) -> Result<()> {
        let mut batch = WriteBatch::default();
        for (id, pack, offset) in damaged {
            let Some(bad) = self.get_stored(id)? else {
                continue;
            };
            if (bad.pack, bad.offset) != (*pack, *offset) {
                continue;
            }
            let spares = self.spares_of(id)?;
            let Some(to) = spares.iter().find(|l| !self.is_damaged(&l.pack, l.offset)) else {
                continue;
            };
            tracing::warn!(
                "chunk {}: its copy in pack {} is damaged; its copy in pack {} is read from now on",
                id.short(),
                bad.pack,
                to.pack
            );
            batch.put(spare_key(id, &bad.pack), bad.encode());
            batch.delete(spare_key(id, &to.pack));
            batch.put(key(P_CHUNK, id.as_bytes()), to.encode());
        }
        self.db.write(batch).map_err(|e| self.err(e))
    }

    /// Every (chunk, location) the index holds in `pack` (a scan of the whole index: used only
    /// for packs whose own table cannot be read).
    pub(crate) fn entries_of(&self, pack: &PackId) -> Result<Vec<(ChunkId, Location)>> {
        let mut all = self.entries_in(&HashSet::from([*pack]))?;
        Ok(all.remove(pack).unwrap_or_default())
    }

    /// Every (chunk, location) the index holds in each of `packs`, in pack order, from one scan
    /// of the whole index.
    fn entries_in(
        &self,
        packs: &HashSet<PackId>,
    ) -> Result<HashMap<PackId, Vec<(ChunkId, Location)>>> {
        let mut out: HashMap<PackId, Vec<(ChunkId, Location)>> = HashMap::new();
        for (id, l) in self
            .overlay
            .lock()
            .expect("index overlay lock")
            .chunks
            .iter()
        {
            if packs.contains(&l.pack) {
                out.entry(l.pack).or_default().push((*id, *l));
            }
        }
        for prefix in [P_CHUNK, P_SPARE] {
            self.for_each_entry(prefix, |k, v| {
                let id = chunk_of(k);
                if let (Some(l), Some(id)) = (Location::decode(v), id) {
                    if packs.contains(&l.pack) {
                        out.entry(l.pack).or_default().push((id, l));
                    }
                }
            })?;
        }
        for v in out.values_mut() {
            v.sort_by_key(|(_, l)| l.offset);
        }
        Ok(out)
    }

    pub(crate) fn insert_segment(&self, id: SegmentId) -> Result<()> {
        if self.is_secondary() {
            self.overlay
                .lock()
                .expect("index overlay lock")
                .segments
                .insert(id);
            return Ok(());
        }
        self.db
            .put(key(P_SEGMENT, &id.0), [])
            .map_err(|e| self.err(e))
    }

    /// Records packs that are gone though no plan deleted them (lost: removed by hand, a failed
    /// disk, a lifecycle rule), before [`Self::remove_packs`] forgets them: each blob the index
    /// held there counts as damaged from now on, here at once and, once a verify record names
    /// the pack, on every host, so no backup deduplicates against it and incrementals read its
    /// ranges from their source again. Returns the blobs recorded per pack.
    pub(crate) fn mark_lost(&self, lost: &HashSet<PackId>) -> Result<Vec<LostPack>> {
        if lost.is_empty() || self.is_secondary() {
            return Ok(Vec::new());
        }
        let mut entries = self.entries_in(lost)?;
        let mut batch = WriteBatch::default();
        let mut out = Vec::new();
        for pack in lost {
            let b: Vec<(ChunkId, u32, u32)> = entries
                .remove(pack)
                .unwrap_or_default()
                .into_iter()
                .map(|(id, l)| (id, l.offset, l.len))
                .collect();
            let mut v = Vec::with_capacity(b.len() * LOST_BLOB_LEN);
            for (id, offset, len) in &b {
                v.extend_from_slice(id.as_bytes());
                v.extend_from_slice(&offset.to_le_bytes());
                v.extend_from_slice(&len.to_le_bytes());
                batch.put(damaged_key(pack, *offset), []);
            }
            batch.put(key(P_LOST, &pack.0), v);
            out.push(LostPack {
                pack: *pack,
                blobs: b,
            });
        }
        self.db.write(batch).map_err(|e| self.err(e))?;
        let mut d = self
            .damaged
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for l in &out {
            d.extend(l.blobs.iter().map(|(_, o, _)| (l.pack, *o)));
        }
        Ok(out)
    }

    /// Lost packs (see [`Self::mark_lost`]) that no verify record names yet.
    pub(crate) fn lost_packs(&self) -> Result<Vec<LostPack>> {
        let mut out = Vec::new();
        self.for_each_entry(P_LOST, |k, v| {
            let Ok(pack) = <[u8; 16]>::try_from(k) else {
                return;
            };
            let blobs = v
                .chunks_exact(LOST_BLOB_LEN)
                .filter_map(|b| {
                    let id = ChunkId::from_slice(&b[..32])?;
                    let u = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
                    Some((id, u(32), u(36)))
                })
                .collect();
            out.push(LostPack {
                pack: PackId(pack),
                blobs,
            });
        })?;
        Ok(out)
    }

    /// Drops lost packs from [`Self::lost_packs`] once a verify record names them (their blobs
    /// stay damaged).
    pub(crate) fn forget_lost(&self, packs: &[PackId]) -> Result<()> {
        if packs.is_empty() || self.is_secondary() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        for p in packs {
            batch.delete(key(P_LOST, &p.0));
        }
        self.db.write(batch).map_err(|e| self.err(e))
    }

    /// Forgets packs that no longer exist in the repository, and their chunks.
    pub(crate) fn remove_packs(&self, gone: &HashSet<PackId>) -> Result<()> {
        if gone.is_empty() || self.is_secondary() {
            return Ok(());
        }
        let mut batch = WriteBatch::default();
        // Other copies, outside the gone packs: the best takes the place of an indexed copy that
        // goes.
        let mut others: HashMap<ChunkId, Location> = HashMap::new();
        self.for_each_entry(P_SPARE, |k, v| {
            let Some(l) = Location::decode(v) else { return };
            if gone.contains(&l.pack) {
                batch.delete(key(P_SPARE, k));
                return;
            }
            let Some(id) = chunk_of(k) else { return };
            let damaged = |l: &Location| self.is_damaged(&l.pack, l.offset);
            if others.get(&id).is_none_or(|o| damaged(o) && !damaged(&l)) {
                others.insert(id, l);
            }
        })?;
        self.for_each_entry(P_CHUNK, |k, v| {
            if !Location::decode(v).is_some_and(|l| gone.contains(&l.pack)) {
                return;
            }
            match chunk_of(k).and_then(|id| Some((id, others.get(&id)?))) {
                Some((id, other)) => {
                    batch.put(key(P_CHUNK, k), other.encode());
                    batch.delete(spare_key(&id, &other.pack));
                }
                None => batch.delete(key(P_CHUNK, k)),
            }
        })?;
        for p in gone {
            batch.delete(key(P_PACK, &p.0));
        }
        self.db.write(batch).map_err(|e| self.err(e))
    }

    /// Packs this index knows, from RocksDB and the in-memory overlay.
    pub(crate) fn packs(&self) -> Result<HashSet<PackId>> {
        let mut out: HashSet<PackId> = self
            .overlay
            .lock()
            .expect("index overlay lock")
            .packs
            .clone();
        self.for_each_entry(P_PACK, |k, _| {
            if let Ok(id) = k.try_into() {
                out.insert(PackId(id));
            }
        })?;
        Ok(out)
    }

    pub(crate) fn stats(&self) -> Result<IndexStats> {
        let mut s = IndexStats::default();
        for item in self.db.iterator(IteratorMode::Start) {
            let (k, _) = item.map_err(|e| self.err(e))?;
            match k.first() {
                Some(&P_CHUNK) => s.chunks += 1,
                Some(&P_PACK) => s.packs += 1,
                Some(&P_SEGMENT) => s.segments += 1,
                _ => {}
            }
        }
        let o = self.overlay.lock().expect("index overlay lock");
        s.chunks += o.chunks.len() as u64;
        s.packs += o.packs.len() as u64;
        s.segments += o.segments.len() as u64;
        Ok(s)
    }

    pub(crate) fn path(&self) -> &Path {
        &self.path
    }
}

/// Memtables larger than this are written out when the index closes.
const FLUSH_ON_CLOSE: u64 = 4 << 20;

impl Drop for LocalIndex {
    fn drop(&mut self) {
        // What a large backup or sync wrote sits in the write-ahead log; the next process to open
        // the index would replay it into memory (up to the 64 MiB write buffer) before its first
        // lookup. Writing it out now does the same work once, in the process that wrote it.
        if self.secondary_dir.is_none() {
            let size = self
                .db
                .property_int_value("rocksdb.cur-size-all-mem-tables")
                .ok()
                .flatten()
                .unwrap_or(0);
            if size > FLUSH_ON_CLOSE {
                if let Err(e) = self.db.flush() {
                    tracing::debug!(index = %self.path.display(), "flushing the index: {e}");
                }
            }
        }
        if let Some(dir) = &self.secondary_dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

fn is_lock_error(e: &rocksdb::Error) -> bool {
    let s = e.to_string();
    s.contains("lock") || s.contains("Resource temporarily unavailable")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(i: u8) -> PackEntry {
        PackEntry {
            id: ChunkId([i; 32]),
            kind: BlobKind::Data,
            offset: 24 + i as u32,
            len: 10,
            raw_len: 20,
        }
    }

    #[test]
    fn insert_get_and_foreign_repo_reset() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("idx");
        let pack = PackId::random();
        {
            let (idx, fresh) = LocalIndex::open(&p, "repo-a").unwrap();
            assert!(fresh);
            idx.insert_pack(pack, 100, &[entry(1), entry(2)], &HashSet::new())
                .unwrap();
            assert_eq!(idx.get(&ChunkId([1; 32])).unwrap().unwrap().pack, pack);
            assert!(idx.packs().unwrap().contains(&pack));
            assert!(idx.get(&ChunkId([3; 32])).unwrap().is_none());
        }
        {
            let (idx, fresh) = LocalIndex::open(&p, "repo-a").unwrap();
            assert!(!fresh);
            assert_eq!(idx.stats().unwrap().chunks, 2);
            // A second process-like open while the first is held falls back to a secondary.
            let (idx2, _) = LocalIndex::open(&p, "repo-a").unwrap();
            assert!(idx2.is_secondary());
            assert!(idx2.get(&ChunkId([2; 32])).unwrap().is_some());
            idx2.insert_pack(PackId::random(), 5, &[entry(9)], &HashSet::new())
                .unwrap();
            assert!(idx2.get(&ChunkId([9; 32])).unwrap().is_some());
            assert!(idx.get(&ChunkId([9; 32])).unwrap().is_none());
            idx.remove_packs(&[pack].into_iter().collect()).unwrap();
            assert!(idx.get(&ChunkId([1; 32])).unwrap().is_none());
        }
        let (idx, fresh) = LocalIndex::open(&p, "repo-b").unwrap();
        assert!(fresh, "an index of another repository is reset");
        assert_eq!(idx.stats().unwrap().chunks, 0);
    }

    #[test]
    fn a_condemned_copy_never_replaces_a_live_one_in_any_order() {
        let dir = tempfile::tempdir().unwrap();
        let (idx, _) = LocalIndex::open(&dir.path().join("idx"), "r").unwrap();
        let (old, new) = (PackId::random(), PackId::random());
        let stale: HashSet<PackId> = [old].into();
        let id = ChunkId([1; 32]);
        // The repack's copy first, the condemned original second: the copy stays.
        idx.insert_pack(new, 1, &[entry(1)], &stale).unwrap();
        idx.insert_pack(old, 1, &[entry(1)], &stale).unwrap();
        assert_eq!(idx.get(&id).unwrap().unwrap().pack, new);
        // The other order: the newest wins as always.
        idx.remove_packs(&[new].into()).unwrap();
        idx.insert_pack(old, 1, &[entry(1)], &stale).unwrap();
        idx.insert_pack(new, 1, &[entry(1)], &stale).unwrap();
        assert_eq!(idx.get(&id).unwrap().unwrap().pack, new);
        // With nothing condemned, the newest wins.
        idx.insert_pack(old, 1, &[entry(1)], &HashSet::new())
            .unwrap();
        assert_eq!(idx.get(&id).unwrap().unwrap().pack, old);
        // A condemned pack's copy is still indexed when it is the only one.
        let lone = ChunkId([2; 32]);
        idx.insert_pack(old, 1, &[entry(2)], &stale).unwrap();
        assert_eq!(idx.get(&lone).unwrap().unwrap().pack, old);
    }

    #[test]
    fn a_damaged_indexed_copy_gives_way_to_another_good_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (idx, _) = LocalIndex::open(&dir.path().join("idx"), "r").unwrap();
        let (a, b) = (PackId::random(), PackId::random());
        let id = ChunkId([1; 32]);
        let none = HashSet::new();
        idx.insert_pack(a, 1, &[entry(1), entry(2)], &none).unwrap();
        idx.insert_pack(b, 1, &[entry(1)], &none).unwrap();
        assert_eq!(
            idx.get(&id).unwrap().unwrap().pack,
            b,
            "the newest copy is read"
        );
        assert_eq!(
            idx.stats().unwrap().chunks,
            2,
            "a spare is not a chunk of its own"
        );
        // Damage elsewhere changes nothing.
        idx.insert_verify_record("r0", &[(id, PackId::random(), 5)])
            .unwrap();
        assert_eq!(idx.get(&id).unwrap().unwrap().pack, b);
        idx.insert_verify_record("r1", &[(id, b, entry(1).offset)])
            .unwrap();
        assert_eq!(
            idx.get(&id).unwrap().unwrap().pack,
            a,
            "the good copy is read"
        );
        // Both copies are still known: the damaged one is in its pack's entries.
        assert_eq!(idx.entries_of(&b).unwrap().len(), 1);
        assert_eq!(idx.entries_of(&a).unwrap().len(), 2);
        // A third copy stored over the damaged one is read, the good spare kept; once every copy
        // is damaged, the index still answers one (verification reads and reports it).
        let c = PackId::random();
        idx.insert_pack(c, 1, &[entry(1)], &none).unwrap();
        assert_eq!(idx.get(&id).unwrap().unwrap().pack, c);
        idx.insert_verify_record("r2", &[(id, a, entry(1).offset), (id, c, entry(1).offset)])
            .unwrap();
        assert!(idx.get(&id).unwrap().is_some());
        // The schema is stamped: reopening keeps everything.
        drop(idx);
        let (idx, fresh) = LocalIndex::open(&dir.path().join("idx"), "r").unwrap();
        assert!(!fresh);
        assert_eq!(idx.entries_of(&a).unwrap().len(), 2);
    }

    #[test]
    fn a_gone_pack_gives_way_to_another_copy() {
        let dir = tempfile::tempdir().unwrap();
        let (idx, _) = LocalIndex::open(&dir.path().join("idx"), "r").unwrap();
        let (a, b, c) = (PackId::random(), PackId::random(), PackId::random());
        let id = ChunkId([1; 32]);
        let none = HashSet::new();
        idx.insert_pack(a, 1, &[entry(1)], &none).unwrap();
        idx.insert_pack(b, 1, &[entry(1)], &none).unwrap();
        idx.insert_pack(c, 1, &[entry(1)], &none).unwrap();
        idx.insert_verify_record("r", &[(id, a, entry(1).offset)])
            .unwrap();
        assert_eq!(idx.get(&id).unwrap().unwrap().pack, c);
        // The good copy takes the place of the indexed one, not the damaged one.
        idx.remove_packs(&[c].into()).unwrap();
        assert_eq!(idx.get(&id).unwrap().unwrap().pack, b);
        assert!(
            idx.entries_of(&c).unwrap().is_empty(),
            "no spare in a gone pack"
        );
        idx.remove_packs(&[b].into()).unwrap();
        assert_eq!(
            idx.get(&id).unwrap().unwrap().pack,
            a,
            "a damaged copy beats none"
        );
        idx.remove_packs(&[a].into()).unwrap();
        assert!(idx.get(&id).unwrap().is_none());
        assert!(idx.entries_of(&a).unwrap().is_empty());
    }
}
