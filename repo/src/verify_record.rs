//! Verify records: what a verification run read and what it found, stored in the repository as
//! sealed objects under `verify/` so that every host sees the same verify state (which packs were
//! read when, which blobs are damaged, each restore point's state). A record is written once, with
//! a create-only put, and never modified; a verification run writes nothing else. A run killed
//! before its record is written leaves the repository exactly as it was.
//!
//! The name starts with the run's finishing time (`verify/<YYYYMMDDTHHMMSSmmmZ>-<16 hex digits>`), so
//! the newest record is the last name of a listing and readers that want only the latest point
//! states fetch one object. Layout in `docs/FORMAT.md`.
//!
//! Records would otherwise pile up one per run, and every run reads them all: a run that finds
//! many records stores a summary of them (a record of its own, `summary` set) and then deletes
//! the records it merges. Readers merge by read time, so a summary and the records it replaces
//! read together (a run killed between the two steps, or a reader listing in between) give the
//! same state as either alone.

use std::collections::HashSet;

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use serde::{Deserialize, Serialize};

use crate::crypto::{aad, Keys};
use crate::storage::Write;
use crate::{ChunkIdHex, Error, PackId, PointId, Repository, Result};

/// Directory of verify records.
pub const VERIFY_DIR: &str = "verify";
/// Associated-data label of a verify record.
pub const AAD_VERIFY: &[u8] = b"blockvault/v1/verify-record";
pub const VERIFY_RECORD_VERSION: u32 = 1;
/// Version of a summary record. Distinct, so that a reader that knows no summaries refuses one
/// (and reports it) instead of taking every read it holds as made at the summary's time.
pub const VERIFY_SUMMARY_VERSION: u32 = 2;
/// Largest plaintext accepted when opening a record (a hostile object cannot demand more memory).
const MAX_RECORD_JSON: usize = 1 << 30;

/// Name of one verify record: finishing time and 8 random bytes.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordName(String);

impl RecordName {
    /// A fresh name for a run finishing at `t` (millisecond resolution, so that runs in one
    /// second still sort by time).
    pub fn new(t: time::OffsetDateTime) -> Self {
        let fmt = time::macros::format_description!(
            "[year][month][day]T[hour][minute][second][subsecond digits:3]Z"
        );
        let stamp = t.format(&fmt).unwrap_or_default();
        let mut r = [0u8; 8];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut r);
        Self(format!("{stamp}-{}", hex::encode(r)))
    }

    /// Parses the leaf of an object name; `None` for anything that is not a record name.
    pub fn parse(leaf: &str) -> Option<Self> {
        let (stamp, rand) = leaf.split_once('-')?;
        let ok = stamp.len() == 19
            && stamp.as_bytes()[8] == b'T'
            && stamp.ends_with('Z')
            && stamp[..8].bytes().all(|b| b.is_ascii_digit())
            && stamp[9..18].bytes().all(|b| b.is_ascii_digit())
            && rand.len() == 16
            && rand.bytes().all(|b| b.is_ascii_hexdigit());
        ok.then(|| Self(leaf.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// A fresh name with the same time as `other` that sorts after every name of that time but
    /// one in four billion (a summary is named for the newest record it merges: a record stored
    /// later still sorts after it, and it sorts after the records it merges, so that where two
    /// of them read alike in the same second, readers apply it, which holds the later read, last).
    pub fn beside(other: &RecordName) -> Self {
        let stamp = other.0.split_once('-').map_or(other.0.as_str(), |(s, _)| s);
        let mut r = [0u8; 4];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut r);
        Self(format!("{stamp}-ffffffff{}", hex::encode(r)))
    }

    fn path(&self) -> String {
        format!("{VERIFY_DIR}/{}", self.0)
    }
}

impl std::fmt::Display for RecordName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What reading a pack found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PackOutcome {
    /// Every blob decrypted, decompressed and hashed to its id; the table matched.
    Ok,
    /// The pack was read; some blobs (listed) or its table are damaged.
    Damaged,
    /// The pack is gone from the repository.
    Missing,
}

/// One blob that failed verification, by its place in the pack.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DamagedBlob {
    pub chunk: ChunkIdHex,
    pub offset: u32,
    pub len: u32,
    pub detail: String,
}

/// The result of reading one pack (all of it, or only the blobs in `offsets`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackResult {
    pub pack: String,
    pub size: u64,
    pub outcome: PackOutcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// Damage found in the pack's own structure (header, table of contents), blobs aside.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub damaged: Vec<DamagedBlob>,
    /// Offsets of the blobs that were read, when only some were (a point-scoped run); absent
    /// when the whole pack was read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offsets: Option<Vec<u32>>,
    /// When this read was made (RFC 3339; summaries only, as they hold reads of many runs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read: Option<String>,
    /// The run that made this read (summaries only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<u64>,
}

impl PackResult {
    pub fn pack_id(&self) -> Option<PackId> {
        self.pack.parse().ok()
    }
}

/// A byte range `[start, end)` of a disk.
pub type ByteRange = (u64, u64);

/// The damaged byte ranges of one disk of a point.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDamage {
    pub disk: String,
    pub ranges: Vec<ByteRange>,
}

/// A restore point's verify state as a run saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PointVerifyState {
    /// Every blob the point needs was read and found intact (at `verified` or later).
    Verified,
    /// Some of its blobs were read and found intact, the rest were never read.
    Partly,
    /// Some of its data is damaged or missing (see `damage`).
    Damaged,
    /// None of its blobs was ever read.
    Never,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PointStatus {
    pub point: PointId,
    pub state: PointVerifyState,
    /// The oldest verification among the blobs the point needs (RFC 3339), when all were read.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verified: Option<String>,
    /// Stored bytes the point needs, and how many of them were read and found intact.
    pub bytes: u64,
    pub bytes_verified: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub damage: Vec<DiskDamage>,
    /// Damage that cannot be placed on a disk range (an unreadable manifest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// One verification run's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyRecord {
    pub version: u32,
    pub host: String,
    /// RFC 3339 UTC.
    pub started: String,
    pub finished: String,
    /// Sequence number of a run that read data (one more than the highest seen); absent for a
    /// run that read metadata only. Rotations count runs by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run: Option<u64>,
    /// What the run was asked to read, as the user said it (`5%`, `3/7`, `all`, ...).
    pub selection: String,
    pub packs: Vec<PackResult>,
    /// The state of every restore point at the end of the run.
    pub points: Vec<PointStatus>,
    /// Set on a summary of earlier records (version `VERIFY_SUMMARY_VERSION`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub summary: Option<RecordSummary>,
}

/// What a summary record stands for besides the reads it holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecordSummary {
    /// The records it merges, deleted once it is stored.
    pub replaces: Vec<String>,
    /// Every merged data-reading run as (store time of its record, unix seconds; highest run
    /// number up to then), which rotations count by.
    pub runs: Vec<(i64, u64)>,
}

impl VerifyRecord {
    pub(crate) fn seal(&self, keys: &Keys, name: &RecordName) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("verify record serialises");
        let z = zstd::bulk::compress(&json, 3).expect("zstd on memory buffers");
        keys.meta
            .seal(&aad(AAD_VERIFY, &[name.as_str().as_bytes()]), &z)
    }

    pub(crate) fn open(keys: &Keys, name: &RecordName, sealed: &[u8]) -> Result<Self> {
        let what = || format!("verify record {name}");
        let z = keys
            .meta
            .open(&aad(AAD_VERIFY, &[name.as_str().as_bytes()]), sealed)
            .ok_or_else(|| Error::tampered(what(), "authentication failed"))?;
        let json = zstd::bulk::decompress(&z, MAX_RECORD_JSON)
            .map_err(|e| Error::malformed(what(), format!("zstd: {e}")))?;
        let r: Self =
            serde_json::from_slice(&json).map_err(|e| Error::malformed(what(), e.to_string()))?;
        let supported = match r.summary {
            None => VERIFY_RECORD_VERSION,
            Some(_) => VERIFY_SUMMARY_VERSION,
        };
        if r.version != supported {
            return Err(Error::UnsupportedVersion {
                found: r.version,
                supported,
            });
        }
        Ok(r)
    }

    /// Damaged blobs this record names: (chunk, pack, offset).
    pub fn damaged_locations(&self) -> impl Iterator<Item = DamagedAt> + '_ {
        self.packs.iter().flat_map(|p| {
            let id = p.pack_id();
            p.damaged
                .iter()
                .filter_map(move |d| id.map(|id| (d.chunk.0, id, d.offset)))
        })
    }
}

/// A damaged blob: its chunk, and the pack and offset where it lies.
pub type DamagedAt = (crate::ChunkId, PackId, u32);

/// A record's name and the time the store gives its object (unix seconds).
#[derive(Clone, Debug)]
pub struct RecordListing {
    pub name: RecordName,
    pub stored: i64,
}

/// Objects fetched at once while loading records.
const LOAD_PARALLELISM: usize = 8;
/// Listings taken while summaries keep replacing the records listed, before giving up.
const LOAD_ATTEMPTS: usize = 4;

fn records_kept_changing() -> Error {
    Error::Conflict {
        object: VERIFY_DIR.into(),
        detail: "records were merged into summaries while being read".into(),
    }
}

/// What loading one unseen record gave `sync_verify_records`.
enum Absorbed {
    Damage(RecordName, Vec<DamagedAt>),
    /// Unreadable: reported by verify, tried again at the next sync.
    Unreadable,
    /// Deleted since the listing (merged into a summary).
    Gone,
}

impl Repository {
    /// Stores a verify record under a fresh name (create-only). Returns the name.
    pub async fn save_verify_record(&self, record: &VerifyRecord) -> Result<RecordName> {
        let name = RecordName::new(time::OffsetDateTime::now_utc());
        let sealed = record.seal(self.keys(), &name);
        self.storage()
            .put(&name.path(), Bytes::from(sealed), Write::CreateUnique)
            .await?;
        let index = self.local_index();
        let (n, locs): (RecordName, Vec<DamagedAt>) =
            (name.clone(), record.damaged_locations().collect());
        tokio::task::spawn_blocking(move || index.insert_verify_record(n.as_str(), &locs))
            .await
            .map_err(|e| Error::Invalid(format!("background task failed: {e}")))??;
        Ok(name)
    }

    /// Every verify record's name with its store timestamp, oldest name first.
    pub async fn list_verify_records(&self) -> Result<Vec<RecordListing>> {
        let mut out: Vec<RecordListing> = self
            .storage()
            .list_with_times(VERIFY_DIR)
            .await?
            .into_iter()
            .filter_map(|(name, _, stored)| {
                let leaf = name.rsplit('/').next().unwrap_or_default();
                match RecordName::parse(leaf) {
                    Some(name) => Some(RecordListing { name, stored }),
                    None => {
                        tracing::warn!(object = %name, "ignoring a stray object among verify records");
                        None
                    }
                }
            })
            .collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub async fn load_verify_record(&self, name: &RecordName) -> Result<VerifyRecord> {
        let bytes = self.storage().get(&name.path()).await?;
        let (keys, name) = (self.keys().clone(), name.clone());
        tokio::task::spawn_blocking(move || VerifyRecord::open(&keys, &name, &bytes))
            .await
            .map_err(|e| Error::Invalid(format!("background task failed: {e}")))?
    }

    /// Loads the given records, `LOAD_PARALLELISM` at a time, in the order given. Unreadable ones
    /// are returned as errors beside the others.
    pub async fn load_verify_records(
        &self,
        names: &[RecordName],
    ) -> Vec<(RecordName, Result<VerifyRecord>)> {
        futures::stream::iter(names.iter().cloned())
            .map(|n| async move {
                let r = self.load_verify_record(&n).await;
                (n, r)
            })
            .buffered(LOAD_PARALLELISM)
            .collect()
            .await
    }

    /// Every verify record listed, loaded (`LOAD_PARALLELISM` at a time, oldest name first).
    /// Unreadable ones are returned as errors beside the others. A record deleted between the
    /// listing and its load was merged into a summary stored before the deletion: the listing
    /// is taken again, so that the summary is read instead.
    pub async fn load_all_verify_records(
        &self,
    ) -> Result<Vec<(RecordListing, Result<VerifyRecord>)>> {
        for _ in 0..LOAD_ATTEMPTS {
            let listing = self.list_verify_records().await?;
            let names: Vec<RecordName> = listing.iter().map(|l| l.name.clone()).collect();
            let loaded = self.load_verify_records(&names).await;
            if loaded
                .iter()
                .any(|(_, r)| r.as_ref().is_err_and(Error::is_not_found))
            {
                continue;
            }
            return Ok(listing
                .into_iter()
                .zip(loaded)
                .map(|(l, (_, r))| (l, r))
                .collect());
        }
        Err(records_kept_changing())
    }

    /// The newest readable verify record, if any (for `points list` and `points show`).
    pub async fn latest_verify_record(&self) -> Result<Option<(RecordName, VerifyRecord)>> {
        'listing: for _ in 0..LOAD_ATTEMPTS {
            let listing = self.list_verify_records().await?;
            for l in listing.iter().rev() {
                match self.load_verify_record(&l.name).await {
                    Ok(r) => return Ok(Some((l.name.clone(), r))),
                    // Merged into a summary meanwhile: list again.
                    Err(e) if e.is_not_found() => continue 'listing,
                    Err(e) => {
                        tracing::warn!(record = %l.name, error = %e, "unreadable verify record")
                    }
                }
            }
            return Ok(None);
        }
        Err(records_kept_changing())
    }

    /// Stores `summary` under `name`, then deletes the records it replaces. Killed in between,
    /// the records stay beside it and say nothing it does not (readers merge by read time); the
    /// next summary merges them all.
    pub async fn save_verify_summary(
        &self,
        summary: &VerifyRecord,
        name: &RecordName,
    ) -> Result<()> {
        let Some(s) = &summary.summary else {
            return Err(Error::Invalid("not a verify summary".into()));
        };
        let sealed = summary.seal(self.keys(), name);
        self.storage()
            .put(&name.path(), Bytes::from(sealed), Write::CreateUnique)
            .await?;
        let index = self.local_index();
        let (n, locs): (RecordName, Vec<DamagedAt>) =
            (name.clone(), summary.damaged_locations().collect());
        tokio::task::spawn_blocking(move || index.insert_verify_record(n.as_str(), &locs))
            .await
            .map_err(|e| Error::Invalid(format!("background task failed: {e}")))??;
        let replaced: Vec<String> = s
            .replaces
            .iter()
            .filter_map(|r| RecordName::parse(r))
            .map(|r| r.path())
            .collect();
        self.storage().delete_many(&replaced).await
    }

    /// Brings the local index's set of damaged blob locations up to date with the verify records
    /// in the repository: a blob any host found damaged is never used for deduplication, and a
    /// good copy of the same chunk is preferred for reads.
    pub async fn sync_verify_records(&self) -> Result<()> {
        for _ in 0..LOAD_ATTEMPTS {
            if self.sync_verify_records_once().await? {
                return Ok(());
            }
        }
        Err(records_kept_changing())
    }

    /// One pass of `sync_verify_records`; false when a record listed was gone when fetched (a
    /// summary stored after the listing holds what it said).
    async fn sync_verify_records_once(&self) -> Result<bool> {
        let listing = self.list_verify_records().await?;
        let index = self.local_index();
        let seen: HashSet<String> = {
            let index = index.clone();
            tokio::task::spawn_blocking(move || index.verify_records_seen())
                .await
                .map_err(|e| Error::Invalid(format!("background task failed: {e}")))??
        };
        let unseen: Vec<RecordName> = listing
            .into_iter()
            .map(|l| l.name)
            .filter(|n| !seen.contains(n.as_str()))
            .collect();
        let loaded: Vec<Absorbed> = futures::stream::iter(unseen)
            .map(|n| async move {
                match self.load_verify_record(&n).await {
                    Ok(r) => {
                        let locs = r.damaged_locations().collect();
                        Ok(Absorbed::Damage(n, locs))
                    }
                    Err(e) if e.is_not_found() => Ok(Absorbed::Gone),
                    // A damaged record must not stop backups; verify reports it.
                    Err(e) if !e.is_transient() => {
                        tracing::warn!(record = %n, error = %e, "unreadable verify record");
                        Ok(Absorbed::Unreadable)
                    }
                    Err(e) => Err(e),
                }
            })
            .buffer_unordered(LOAD_PARALLELISM)
            .try_collect()
            .await?;
        let mut complete = true;
        for entry in loaded {
            let (name, locs) = match entry {
                Absorbed::Damage(name, locs) => (name, locs),
                Absorbed::Unreadable => continue,
                Absorbed::Gone => {
                    complete = false;
                    continue;
                }
            };
            let index = index.clone();
            tokio::task::spawn_blocking(move || index.insert_verify_record(name.as_str(), &locs))
                .await
                .map_err(|e| Error::Invalid(format!("background task failed: {e}")))??;
        }
        Ok(complete)
    }

    /// True when verification found the blob at `loc` damaged (per the verify records loaded).
    pub fn is_damaged(&self, loc: &crate::Location) -> bool {
        self.local_index().is_damaged(&loc.pack, loc.offset)
    }

    /// True when any host's verification found some blob damaged (per the records loaded).
    pub fn knows_damage(&self) -> bool {
        self.local_index().has_damage()
    }

    /// True when verification found the blob at `offset` of `pack` damaged.
    pub fn is_damaged_at(&self, pack: &PackId, offset: u32) -> bool {
        self.local_index().is_damaged(pack, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::random_master_key;

    fn record() -> VerifyRecord {
        VerifyRecord {
            version: 1,
            host: "h".into(),
            started: "2026-11-29T17:00:00Z".into(),
            finished: "2026-11-29T17:01:00Z".into(),
            run: Some(3),
            selection: "5%".into(),
            packs: vec![PackResult {
                pack: PackId::random().to_hex(),
                size: 100,
                outcome: PackOutcome::Damaged,
                detail: None,
                table: None,
                damaged: vec![DamagedBlob {
                    chunk: ChunkIdHex(blockvault_chunker::ChunkId([7; 32])),
                    offset: 24,
                    len: 50,
                    detail: "authentication failed".into(),
                }],
                offsets: None,
                read: None,
                run: None,
            }],
            points: vec![PointStatus {
                point: PointId([1; 8]),
                state: PointVerifyState::Damaged,
                verified: None,
                bytes: 10,
                bytes_verified: 5,
                damage: vec![DiskDamage {
                    disk: "d".into(),
                    ranges: vec![(0, 65536)],
                }],
                detail: None,
            }],
            summary: None,
        }
    }

    #[test]
    fn seal_open_and_bound_to_name() {
        let keys = Keys::derive(&random_master_key());
        let r = record();
        let t = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let name = RecordName::new(t);
        assert!(RecordName::parse(name.as_str()).is_some(), "{name}");
        let sealed = r.seal(&keys, &name);
        assert_eq!(VerifyRecord::open(&keys, &name, &sealed).unwrap(), r);
        let other = RecordName::new(t);
        assert!(matches!(
            VerifyRecord::open(&keys, &other, &sealed),
            Err(Error::Tampered { .. })
        ));
        let mut bad = sealed.clone();
        bad[20] ^= 1;
        assert!(VerifyRecord::open(&keys, &name, &bad).is_err());
        assert_eq!(r.damaged_locations().count(), 1);
    }

    #[test]
    fn names_sort_by_time() {
        let t = time::OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap();
        let a = RecordName::new(t);
        let b = RecordName::new(t + time::Duration::milliseconds(1));
        assert!(a < b);
        assert!(RecordName::parse(a.as_str()).is_some());
        assert!(RecordName::parse("20261129T170000Z-zz").is_none());
        assert!(RecordName::parse("x").is_none());
    }
}
