//! Index segments: the table-of-contents entries of a batch of packs in one object, so a new
//! machine can index a repository without reading every pack's tail.
//!
//! Plaintext: `version u8 | packs u32 | { pack id 16 | pack size u64 | entries u32 | entry* }*`,
//! zstd-compressed is not worth it (ids are random), sealed under the metadata key with the segment
//! id as associated data.

use crate::crypto::{aad, Keys};
use crate::format::{AAD_SEGMENT, SEGMENT_VERSION, TOC_ENTRY_LEN};
use crate::pack::{decode_entries, encode_entry};
use crate::{Error, PackEntry, PackId, Result, SegmentId};

/// One pack as recorded in a segment: its name, size and table of contents.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PackRecord {
    pub id: PackId,
    pub size: u64,
    pub entries: Vec<PackEntry>,
}

pub(crate) fn seal(keys: &Keys, id: &SegmentId, packs: &[PackRecord]) -> Vec<u8> {
    let n: usize = packs
        .iter()
        .map(|p| 28 + p.entries.len() * TOC_ENTRY_LEN)
        .sum();
    let mut v = Vec::with_capacity(5 + n);
    v.push(SEGMENT_VERSION);
    v.extend_from_slice(&(packs.len() as u32).to_le_bytes());
    for p in packs {
        v.extend_from_slice(&p.id.0);
        v.extend_from_slice(&p.size.to_le_bytes());
        v.extend_from_slice(&(p.entries.len() as u32).to_le_bytes());
        for e in &p.entries {
            encode_entry(e, &mut v);
        }
    }
    keys.meta.seal(&aad(AAD_SEGMENT, &[&id.0]), &v)
}

pub(crate) fn open(keys: &Keys, id: &SegmentId, sealed: &[u8]) -> Result<Vec<PackRecord>> {
    let what = || format!("index segment {id}");
    let v = keys
        .meta
        .open(&aad(AAD_SEGMENT, &[&id.0]), sealed)
        .ok_or_else(|| Error::tampered(what(), "authentication failed"))?;
    if v.len() < 5 || v[0] != SEGMENT_VERSION {
        return Err(Error::malformed(what(), "bad version or length"));
    }
    let count = u32::from_le_bytes(v[1..5].try_into().expect("4 bytes")) as usize;
    let mut pos = 5;
    let mut packs = Vec::with_capacity(count.min(1 << 16));
    for _ in 0..count {
        let head = v
            .get(pos..pos + 28)
            .ok_or_else(|| Error::malformed(what(), "truncated pack record"))?;
        let id = PackId(head[..16].try_into().expect("16 bytes"));
        let size = u64::from_le_bytes(head[16..24].try_into().expect("8 bytes"));
        let n = u32::from_le_bytes(head[24..28].try_into().expect("4 bytes")) as usize;
        pos += 28;
        let body = v
            .get(pos..pos.saturating_add(n.saturating_mul(TOC_ENTRY_LEN)))
            .ok_or_else(|| Error::malformed(what(), format!("pack {id}: truncated entries")))?;
        let entries = decode_entries(body, n, size, &what)?;
        pos += body.len();
        packs.push(PackRecord { id, size, entries });
    }
    if pos != v.len() {
        return Err(Error::malformed(what(), "trailing bytes"));
    }
    Ok(packs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crypto::random_master_key;
    use crate::BlobKind;

    #[test]
    fn round_trip_and_binding() {
        let keys = Keys::derive(&random_master_key());
        let packs = vec![PackRecord {
            id: PackId::random(),
            size: 1000,
            entries: vec![PackEntry {
                id: keys.hasher.id(b"a"),
                kind: BlobKind::Data,
                offset: 24,
                len: 100,
                raw_len: 300,
            }],
        }];
        let id = SegmentId::random();
        let sealed = seal(&keys, &id, &packs);
        assert_eq!(open(&keys, &id, &sealed).unwrap(), packs);
        assert!(open(&keys, &SegmentId::random(), &sealed).is_err());
    }
}
