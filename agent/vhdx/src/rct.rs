//! The changed-ranges file (docs/changed-ranges.md): one JSON document per disk mirroring
//! `Msvm_ImageManagementService.GetVirtualDiskChanges` output.

use std::ops::Range;

use crate::ranges::merge;

use serde::{Deserialize, Deserializer, Serialize};

pub const FORMAT: &str = "hyperv-rct-changes";
pub const VERSION: u64 = 1;

/// Why a changed-ranges document was refused. Each variant is one rule of
/// docs/changed-ranges.md; the job falls back to a full backup on any of them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RctError {
    #[error("rule malformed-json: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("rule format: \"format\" is {0:?}, expected \"hyperv-rct-changes\"")]
    WrongFormat(String),
    #[error("rule version: \"version\" is {0}, only 1 is supported")]
    WrongVersion(u64),
    #[error("rule disk-size: disk.virtual_size must be greater than 0")]
    ZeroVirtualSize,
    #[error("rule new-rct-id: \"new_rct_id\" is empty")]
    EmptyNewRctId,
    #[error("rule limit-id: \"limit_id\" is an empty string (use null for a full backup)")]
    EmptyLimitId,
    #[error("rule arrays-equal-length: query {query}: {offsets} changed_byte_offsets but {lengths} changed_byte_lengths")]
    ArrayLengthMismatch {
        query: usize,
        offsets: usize,
        lengths: usize,
    },
    #[error("rule range-inside-disk: query {query} range {index}: [{offset}, {offset}+{length}) is outside the virtual disk of {virtual_size} bytes")]
    RangeOutsideDisk {
        query: usize,
        index: usize,
        offset: u64,
        length: u64,
        virtual_size: u64,
    },
    #[error("rule processed-within-query: query {query}: processed_byte_length {processed} exceeds byte_length {length}")]
    ProcessedExceedsQuery {
        query: usize,
        processed: u64,
        length: u64,
    },
    #[error("rule processed-tiles-disk: query {query} starts at {found}, expected {expected} (the processed spans must follow each other without gap or overlap)")]
    ProcessedGapOrOverlap {
        query: usize,
        expected: u64,
        found: u64,
    },
    #[error("rule processed-tiles-disk: the queries processed [0, {covered}), not the whole disk [0, {virtual_size})")]
    ProcessedIncomplete { covered: u64, virtual_size: u64 },
    #[error("rule chain: limit_id {found:?} does not match the new_rct_id {expected:?} recorded with the parent restore point")]
    ChainBroken { expected: String, found: String },
    #[error("rule chain: an incremental (limit_id {found:?}) needs a parent restore point with a recorded RCT id")]
    NoParentReference { found: String },
    #[error(
        "rule disk-size: the document's virtual_size {document} differs from the disk's {disk}"
    )]
    SizeMismatch { document: u64, disk: u64 },
}

impl RctError {
    /// Short name of the violated rule.
    pub fn rule(&self) -> &'static str {
        match self {
            RctError::Malformed(_) => "malformed-json",
            RctError::WrongFormat(_) => "format",
            RctError::WrongVersion(_) => "version",
            RctError::ZeroVirtualSize | RctError::SizeMismatch { .. } => "disk-size",
            RctError::EmptyNewRctId => "new-rct-id",
            RctError::EmptyLimitId => "limit-id",
            RctError::ArrayLengthMismatch { .. } => "arrays-equal-length",
            RctError::RangeOutsideDisk { .. } => "range-inside-disk",
            RctError::ProcessedExceedsQuery { .. } => "processed-within-query",
            RctError::ProcessedGapOrOverlap { .. } | RctError::ProcessedIncomplete { .. } => {
                "processed-tiles-disk"
            }
            RctError::ChainBroken { .. } | RctError::NoParentReference { .. } => "chain",
        }
    }
}

/// The disk the document describes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RctDisk {
    pub path: String,
    #[serde(default)]
    pub virtual_disk_id: Option<String>,
    pub virtual_size: u64,
    #[serde(default)]
    pub logical_sector_size: Option<u32>,
}

/// One `GetVirtualDiskChanges` call.
#[derive(Clone, Debug, Deserialize)]
struct Query {
    byte_offset: u64,
    byte_length: u64,
    processed_byte_length: u64,
    changed_byte_offsets: Vec<u64>,
    changed_byte_lengths: Vec<u64>,
}

fn present_or_null<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

#[derive(Debug, Deserialize)]
struct RawDoc {
    format: String,
    version: u64,
    vm_id: String,
    disk: RctDisk,
    #[serde(default, deserialize_with = "present_or_null")]
    limit_id: Option<Option<String>>,
    new_rct_id: String,
    #[serde(default)]
    full: bool,
    #[serde(default)]
    queries: Vec<Query>,
}

/// A validated changed-ranges document.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ChangedRanges {
    pub vm_id: String,
    pub disk: RctDisk,
    /// RCT id of the reference point the changes are relative to; `None` for a full.
    pub limit_id: Option<String>,
    /// RCT id to record with this restore point (the next run's limit_id).
    pub new_rct_id: String,
    /// A full backup: `full: true` or `limit_id: null`.
    pub full: bool,
    /// Changed byte ranges, sorted and merged; the whole disk when `full`.
    pub ranges: Vec<Range<u64>>,
}

/// Parses and validates a changed-ranges document against every rule of docs/changed-ranges.md.
pub fn parse_changes(json: &[u8]) -> Result<ChangedRanges, RctError> {
    // Windows PowerShell 5.1 writes UTF-8 with a byte-order mark (`Set-Content -Encoding UTF8`);
    // JSON forbids one, so it is skipped rather than failing every incremental.
    let json = json.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(json);
    let doc: RawDoc = serde_json::from_slice(json)?;
    if doc.format != FORMAT {
        return Err(RctError::WrongFormat(doc.format));
    }
    if doc.version != VERSION {
        return Err(RctError::WrongVersion(doc.version));
    }
    let size = doc.disk.virtual_size;
    if size == 0 {
        return Err(RctError::ZeroVirtualSize);
    }
    if doc.new_rct_id.is_empty() {
        return Err(RctError::EmptyNewRctId);
    }
    let limit_id = match doc.limit_id {
        // A missing key is read like null: nothing to be incremental against.
        None | Some(None) => None,
        Some(Some(s)) if s.is_empty() => return Err(RctError::EmptyLimitId),
        Some(Some(s)) => Some(s),
    };
    let full = doc.full || limit_id.is_none();
    let mut ranges = Vec::new();
    let mut next = 0u64;
    for (qi, q) in doc.queries.iter().enumerate() {
        if q.changed_byte_offsets.len() != q.changed_byte_lengths.len() {
            return Err(RctError::ArrayLengthMismatch {
                query: qi,
                offsets: q.changed_byte_offsets.len(),
                lengths: q.changed_byte_lengths.len(),
            });
        }
        for (i, (&o, &l)) in q
            .changed_byte_offsets
            .iter()
            .zip(&q.changed_byte_lengths)
            .enumerate()
        {
            if o.checked_add(l).is_none_or(|e| e > size) {
                return Err(RctError::RangeOutsideDisk {
                    query: qi,
                    index: i,
                    offset: o,
                    length: l,
                    virtual_size: size,
                });
            }
            ranges.push(o..o + l);
        }
        if q.processed_byte_length > q.byte_length {
            return Err(RctError::ProcessedExceedsQuery {
                query: qi,
                processed: q.processed_byte_length,
                length: q.byte_length,
            });
        }
        if !full {
            if q.byte_offset != next {
                return Err(RctError::ProcessedGapOrOverlap {
                    query: qi,
                    expected: next,
                    found: q.byte_offset,
                });
            }
            next = q.byte_offset.saturating_add(q.processed_byte_length);
        }
    }
    if !full && next != size {
        return Err(RctError::ProcessedIncomplete {
            covered: next,
            virtual_size: size,
        });
    }
    let ranges = if full {
        std::iter::once(0..size).collect()
    } else {
        merge(ranges)
    };
    Ok(ChangedRanges {
        vm_id: doc.vm_id,
        disk: doc.disk,
        limit_id,
        new_rct_id: doc.new_rct_id,
        full,
        ranges,
    })
}

impl ChangedRanges {
    /// Checks the document continues the parent restore point's chain:
    /// `limit_id` equals the parent's recorded `new_rct_id` (for an
    /// incremental) and the disk size is the size being backed up.
    pub fn check_against(
        &self,
        parent_rct_id: Option<&str>,
        virtual_size: u64,
    ) -> Result<(), RctError> {
        if self.disk.virtual_size != virtual_size {
            return Err(RctError::SizeMismatch {
                document: self.disk.virtual_size,
                disk: virtual_size,
            });
        }
        if self.full {
            return Ok(());
        }
        let found = self.limit_id.clone().unwrap_or_default();
        match parent_rct_id {
            None => Err(RctError::NoParentReference { found }),
            Some(p) if p != found => Err(RctError::ChainBroken {
                expected: p.to_string(),
                found,
            }),
            Some(_) => Ok(()),
        }
    }
}
