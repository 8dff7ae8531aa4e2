//! Boot traces: which chunks a restore point's first boot read, in the order it read them, so a
//! later mount of the same point (or of a later point of the same VM) can fetch them ahead of the
//! guest from the first second. Stored as `boot-traces/<point id>`: JSON, zstd, sealed with
//! AES-256-GCM under the metadata key with the point id as associated data (docs/FORMAT.md).

use serde::{Deserialize, Serialize};

use crate::crypto::{aad, Keys};
use crate::format::{AAD_BOOT_TRACE, BOOT_TRACES_DIR, BOOT_TRACE_VERSION};
use crate::{Error, PointId, Result};

/// Entries a trace may hold per disk: bounds what a damaged or hostile trace can make a mount do.
pub const MAX_TRACE_SLOTS: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootTrace {
    pub version: u32,
    /// The point whose mount recorded it (also bound by the associated data).
    pub point: String,
    /// RFC 3339 time the recording ended.
    pub recorded: String,
    pub disks: Vec<DiskTrace>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskTrace {
    pub name: String,
    pub disk_size: u64,
    pub chunk_size: u32,
    /// Chunk slots in the order of their first read (each at most once).
    pub slots: Vec<u64>,
    /// Milliseconds from the first read to the last recorded one.
    pub span_ms: u64,
}

pub(crate) fn path(point: &PointId) -> String {
    format!("{BOOT_TRACES_DIR}/{point}")
}

/// The point id of a listed trace object, if the name is exactly one.
pub(crate) fn parse_path(name: &str) -> Option<PointId> {
    let leaf = name.strip_prefix(BOOT_TRACES_DIR)?.strip_prefix('/')?;
    (leaf.len() == 16).then(|| leaf.parse().ok()).flatten()
}

impl BootTrace {
    pub(crate) fn seal(&self, keys: &Keys, point: &PointId) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("a trace serialises");
        let z = zstd::bulk::compress(&json, 3).expect("zstd on memory buffers");
        keys.meta
            .seal(&aad(AAD_BOOT_TRACE, &[point.to_hex().as_bytes()]), &z)
    }

    pub(crate) fn open(keys: &Keys, point: &PointId, sealed: &[u8]) -> Result<Self> {
        let what = || format!("boot trace of point {point}");
        let z = keys
            .meta
            .open(&aad(AAD_BOOT_TRACE, &[point.to_hex().as_bytes()]), sealed)
            .ok_or_else(|| Error::tampered(what(), "authentication failed"))?;
        let json = zstd::bulk::decompress(&z, 64 << 20)
            .map_err(|e| Error::malformed(what(), format!("zstd: {e}")))?;
        let t: BootTrace =
            serde_json::from_slice(&json).map_err(|e| Error::malformed(what(), e.to_string()))?;
        if t.version != BOOT_TRACE_VERSION {
            return Err(Error::malformed(what(), format!("version {}", t.version)));
        }
        if t.point != point.to_hex() {
            return Err(Error::tampered(what(), format!("names point {}", t.point)));
        }
        for d in &t.disks {
            let chunks = d.disk_size.div_ceil(u64::from(d.chunk_size.max(1)));
            if d.slots.len() > MAX_TRACE_SLOTS || d.slots.iter().any(|s| *s >= chunks) {
                return Err(Error::malformed(
                    what(),
                    format!("disk {}: slots beyond the disk or too many", d.name),
                ));
            }
        }
        Ok(t)
    }

    pub fn disk(&self, name: &str) -> Option<&DiskTrace> {
        self.disks.iter().find(|d| d.name == name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trace_is_bound_to_its_point_and_checked() {
        let keys = Keys::derive(&crate::crypto::random_master_key());
        let (p, q) = (PointId::random(), PointId::random());
        let t = BootTrace {
            version: BOOT_TRACE_VERSION,
            point: p.to_hex(),
            recorded: "2026-11-29T17:00:00Z".into(),
            disks: vec![DiskTrace {
                name: "sys".into(),
                disk_size: 10 << 20,
                chunk_size: 1 << 20,
                slots: vec![0, 9, 3],
                span_ms: 1200,
            }],
        };
        let sealed = t.seal(&keys, &p);
        assert_eq!(BootTrace::open(&keys, &p, &sealed).unwrap(), t);
        assert!(matches!(
            BootTrace::open(&keys, &q, &sealed),
            Err(Error::Tampered { .. })
        ));
        let mut bad = t.clone();
        bad.disks[0].slots.push(10);
        let e = BootTrace::open(&keys, &p, &bad.seal(&keys, &p)).unwrap_err();
        assert!(e.to_string().contains("beyond the disk"), "{e}");
        assert_eq!(parse_path(&path(&p)), Some(p));
        assert_eq!(parse_path("boot-traces/xyz"), None);
    }
}
