//! blockvault agent: disk sources (VHDX or raw, by content), incremental planning from
//! changed-ranges files, VHDX export and the NBD mount device. The VHDX format library and the
//! changed-ranges parser live in the `blockvault-vhdx` crate, re-exported here.

pub mod export_vhdx;
pub mod mount;
pub mod plan;
pub mod source;

pub use blockvault_vhdx as vhdx;
pub use blockvault_vhdx::rct;
pub use rct::{parse_changes, ChangedRanges, RctError};
pub use vhdx::{VhdxDisk, VhdxInfo, VhdxOpenOptions, VhdxWriter};

pub mod error;
pub mod vm_backup;

pub use error::{Error, Result};
pub mod service;
pub mod sessions;
