//! VHDX (MS-VHDX v8.0): a read-only reader with in-memory log replay and
//! parent-chain resolution, a streaming writer of dynamic VHDX files, and a
//! builder for test images (`docs/vhdx.md`); and the Hyper-V changed-ranges
//! document ([`rct`], `docs/changed-ranges.md`).
//!
//! A crate of its own that depends on no other blockvault crate, so its fuzz
//! targets link neither RocksDB nor the S3 client.

// The workspace's rust-version (1.85) predates `u64::is_multiple_of` (1.87).
#![allow(clippy::manual_is_multiple_of)]

mod error;
mod format;
mod guid;
mod log;
mod parent;
mod ranges;
pub mod rct;
mod reader;
mod source;
pub mod staged;
pub mod testing;
mod writer;

pub use error::Error;
pub use format::{
    Header, PAYLOAD_BLOCK_FULLY_PRESENT, PAYLOAD_BLOCK_NOT_PRESENT,
    PAYLOAD_BLOCK_PARTIALLY_PRESENT, PAYLOAD_BLOCK_UNDEFINED, PAYLOAD_BLOCK_UNMAPPED,
    PAYLOAD_BLOCK_ZERO, SB_BLOCK_NOT_PRESENT, SB_BLOCK_PRESENT,
};
pub use guid::Guid;
pub use rct::{parse_changes, ChangedRanges, RctError};
pub use reader::{BatStats, LogInfo, RegionInfo, VhdxDisk, VhdxInfo, VhdxOpenOptions};
pub use source::ReadAt;
pub use writer::VhdxWriter;

/// Opens arbitrary bytes as a VHDX file and, when that succeeds, reads every
/// byte of the virtual disk (bounded). The entry point of the fuzz target and
/// of the corpus test; it must never panic.
pub fn fuzz_open_bytes(data: &[u8]) {
    let src: std::sync::Arc<dyn ReadAt> = std::sync::Arc::new(data.to_vec());
    let Ok(disk) = VhdxDisk::open_source(src, "fuzz-input", &VhdxOpenOptions::default()) else {
        return;
    };
    let _ = disk.info();
    let _ = serde_json::to_string(&disk.info());
    let ranges = disk.allocated_ranges();
    let size = disk.virtual_size();
    let mut buf = vec![0u8; 64 * 1024];
    let mut budget: u64 = 4 * 1024 * 1024;
    for r in ranges {
        let mut p = r.start;
        while p < r.end && budget > 0 {
            let n = (r.end - p).min(buf.len() as u64);
            let _ = disk.read_at(p, &mut buf[..n as usize]);
            p += n;
            budget = budget.saturating_sub(n);
        }
    }
    let _ = disk.read_at(size.saturating_sub(1), &mut buf[..1]);
    let _ = disk.read_at(size, &mut buf[..1]);
}

/// The fuzz target's entry point: input starting with `vhdxfile` is a raw
/// file, anything else a sparse image description
/// ([`testing::decode_sparse`]). Never panics.
pub fn fuzz_vhdx_input(data: &[u8]) {
    if data.starts_with(b"vhdxfile") {
        fuzz_open_bytes(data);
    } else {
        fuzz_open_bytes(&testing::decode_sparse(data));
    }
}
