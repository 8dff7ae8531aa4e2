//! Verify records: what a verification run read and what it found, stored in the repository as
//! sealed objects under `verify/` so that every host sees the same verify state (which packs were
//! read when, which blobs are damaged, each restore point's state). A record is written once, with
//! a create-only put, and never modified; a verification run writes nothing else. A run killed
//! before its record is written leaves the repository exactly as it was.
//!
//! The name starts with the run's finishing time (`verify/<YYYYMMDDTHHMMSSmmmZ>-<16 hex digits>`), so
//! the newest record is the last name of a listing and readers that want only the latest point
//! states fetch one object. Layout in `docs/FORMAT.md`.

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
        if r.version != VERIFY_RECORD_VERSION {
            return Err(Error::UnsupportedVersion {
                found: r.version,
                supported: VERIFY_RECORD_VERSION,
            });
        }
        Ok(r)
    }

    /// Damaged blob locations this record names: (pack, offset).
    pub fn damaged_locations(&self) -> impl Iterator<Item = (PackId, u32)> + '_ {
        self.packs.iter().flat_map(|p| {
            let id = p.pack_id();
            p.damaged
                .iter()
                .filter_map(move |d| id.map(|id| (id, d.offset)))
        })
    }
}

/// A record's name and the time the store gives its object (unix seconds).
#[derive(Clone, Debug)]
pub struct RecordListing {
    pub name: RecordName,
    pub stored: i64,
}

/// Objects fetched at once while loading records.
const LOAD_PARALLELISM: usize = 8;

impl Repository {
    /// Stores a verify record under a fresh name (create-only). Returns the name.
    pub async fn save_verify_record(&self, record: &VerifyRecord) -> Result<RecordName> {
        let name = RecordName::new(time::OffsetDateTime::now_utc());
        let sealed = record.seal(self.keys(), &name);
        self.storage()
            .put(&name.path(), Bytes::from(sealed), Write::CreateUnique)
            .await?;
        let index = self.local_index();
        let (n, locs): (RecordName, Vec<(PackId, u32)>) =
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

    /// The newest readable verify record, if any (for `points list` and `points show`).
    pub async fn latest_verify_record(&self) -> Result<Option<(RecordName, VerifyRecord)>> {
        let listing = self.list_verify_records().await?;
        for l in listing.iter().rev() {
            match self.load_verify_record(&l.name).await {
                Ok(r) => return Ok(Some((l.name.clone(), r))),
                Err(e) => tracing::warn!(record = %l.name, error = %e, "unreadable verify record"),
            }
        }
        Ok(None)
    }

    /// Brings the local index's set of damaged blob locations up to date with the verify records
    /// in the repository: a blob any host found damaged is never used for deduplication, and a
    /// good copy of the same chunk is preferred for reads.
    pub async fn sync_verify_records(&self) -> Result<()> {
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
        let loaded: Vec<(RecordName, Vec<(PackId, u32)>)> = futures::stream::iter(unseen)
            .map(|n| async move {
                match self.load_verify_record(&n).await {
                    Ok(r) => Ok(Some((n, r.damaged_locations().collect()))),
                    // A damaged record must not stop backups; verify reports it.
                    Err(e) if !e.is_transient() => {
                        tracing::warn!(record = %n, error = %e, "unreadable verify record");
                        Ok(None)
                    }
                    Err(e) => Err(e),
                }
            })
            .buffer_unordered(LOAD_PARALLELISM)
            .try_filter_map(|x| async move { Ok(x) })
            .try_collect()
            .await?;
        for (name, locs) in loaded {
            let index = index.clone();
            tokio::task::spawn_blocking(move || index.insert_verify_record(name.as_str(), &locs))
                .await
                .map_err(|e| Error::Invalid(format!("background task failed: {e}")))??;
        }
        Ok(())
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
