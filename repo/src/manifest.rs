//! Restore-point manifests: JSON, zstd-compressed, sealed under the metadata key with the point id
//! as associated data, stored at `points/<id>`. A point exists exactly when its manifest does; the
//! manifest is written last, with a create-only put, so a killed backup leaves no half point.

use serde::{Deserialize, Serialize};

use crate::crypto::{aad, Keys};
use crate::format::{AAD_MANIFEST, MANIFEST_VERSION};
use crate::{ChunkId, Error, PointId, Result};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PointManifest {
    pub version: u32,
    pub id: PointId,
    pub vm: String,
    pub host: String,
    /// RFC 3339, UTC.
    pub created: String,
    pub tags: Vec<String>,
    pub chunk_size: u32,
    pub slots_per_page: u32,
    pub disks: Vec<DiskManifest>,
    #[serde(default)]
    pub configs: Vec<ConfigFile>,
    pub duration_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum BackupKind {
    Full,
    Incremental,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DiskManifest {
    pub name: String,
    pub size: u64,
    pub source: SourceInfo,
    /// One entry per page of the chunk map; `None` is a page of only zero chunks.
    pub pages: Vec<Option<ChunkIdHex>>,
    pub kind: BackupKind,
    /// Why a full backup was taken where an incremental was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub full_reason: Option<String>,
    /// The point whose chunk map the incremental started from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<PointId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rct_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consistency: Option<String>,
    pub stats: DiskStats,
}

/// Where the disk came from, as the user named it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SourceInfo {
    pub format: String,
    pub path: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logical_sector_size: Option<u32>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskStats {
    /// Bytes read from the source.
    pub bytes_read: u64,
    /// Chunks that were all zeros (not stored).
    pub zero_chunks: u64,
    /// Chunks already present in the repository.
    pub dedup_chunks: u64,
    /// New chunks, and their plaintext and stored (compressed, encrypted) sizes.
    pub new_chunks: u64,
    pub bytes_new: u64,
    pub bytes_stored: u64,
}

/// A VM configuration file kept in the point, stored as file blobs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    pub name: String,
    pub size: u64,
    pub blobs: Vec<ChunkIdHex>,
}

/// A chunk id serialised as 64 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ChunkIdHex(pub ChunkId);

impl Serialize for ChunkIdHex {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.serialize_str(&self.0.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChunkIdHex {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map(ChunkIdHex).map_err(serde::de::Error::custom)
    }
}

impl DiskManifest {
    /// How many slots page `page_no` of this disk's chunk map holds (the last page may be short).
    pub fn page_slots(&self, chunk_size: u32, page_no: usize) -> usize {
        crate::page_slots(self.size.div_ceil(chunk_size as u64), page_no as u64)
    }
}

impl PointManifest {
    pub fn disk(&self, name: &str) -> Option<&DiskManifest> {
        self.disks.iter().find(|d| d.name == name)
    }

    pub fn total_stats(&self) -> DiskStats {
        let mut t = DiskStats::default();
        for d in &self.disks {
            t.bytes_read += d.stats.bytes_read;
            t.zero_chunks += d.stats.zero_chunks;
            t.dedup_chunks += d.stats.dedup_chunks;
            t.new_chunks += d.stats.new_chunks;
            t.bytes_new += d.stats.bytes_new;
            t.bytes_stored += d.stats.bytes_stored;
        }
        t
    }

    pub(crate) fn seal(&self, keys: &Keys) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("manifest serialises");
        let z = zstd::bulk::compress(&json, 3).expect("zstd on memory buffers");
        keys.meta
            .seal(&aad(AAD_MANIFEST, &[self.id.to_hex().as_bytes()]), &z)
    }

    pub(crate) fn open(keys: &Keys, id: &PointId, sealed: &[u8]) -> Result<Self> {
        let what = || format!("restore point {id} manifest");
        let z = keys
            .meta
            .open(&aad(AAD_MANIFEST, &[id.to_hex().as_bytes()]), sealed)
            .ok_or_else(|| Error::tampered(what(), "authentication failed"))?;
        let json = zstd::bulk::decompress(&z, 256 << 20)
            .map_err(|e| Error::malformed(what(), format!("zstd: {e}")))?;
        let m: Self =
            serde_json::from_slice(&json).map_err(|e| Error::malformed(what(), e.to_string()))?;
        if m.version != MANIFEST_VERSION {
            return Err(Error::UnsupportedVersion {
                found: m.version,
                supported: MANIFEST_VERSION,
            });
        }
        if m.id != *id {
            return Err(Error::tampered(
                what(),
                format!("manifest names point {}", m.id),
            ));
        }
        Ok(m)
    }
}
