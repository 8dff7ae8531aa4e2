//! blockvault agent: disk sources (VHDX reader and writer) and the RCT
//! changed-ranges input.

// The workspace's rust-version (1.85) predates `u64::is_multiple_of` (1.87).
#![allow(clippy::manual_is_multiple_of)]

pub mod export_vhdx;
pub mod mount;
pub mod plan;
pub mod rct;
pub mod source;
pub mod vhdx;

pub use rct::{parse_changes, ChangedRanges, RctError};
pub use vhdx::{VhdxDisk, VhdxInfo, VhdxOpenOptions, VhdxWriter};
