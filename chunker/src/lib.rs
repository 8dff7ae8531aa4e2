//! Pure, synchronous building blocks of the backup pipeline: fixed-size chunk layout aligned to disk
//! offsets, zero-chunk detection, keyed BLAKE3 chunk ids and byte-range algebra.
//!
//! Nothing here does I/O; everything is deterministic and cheap to property-test.

mod error;
mod id;
mod layout;
mod ranges;
mod zero;

pub use error::Error;
pub use id::{ChunkHasher, ChunkId};
pub use layout::{check_chunk_size, ChunkLayout, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
pub use ranges::RangeSet;
pub use zero::is_zero;
