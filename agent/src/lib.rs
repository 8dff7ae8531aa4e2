//! blockvault agent: disk sources (VHDX or raw, by content), incremental planning from
//! changed-ranges files, VHDX export, the NBD mount device and mount sessions. The VHDX format library and the
//! changed-ranges parser live in the `blockvault-vhdx` crate, re-exported here.

pub mod export_vhdx;
pub mod mount;
pub mod mount_session;
pub mod plan;
pub mod source;

pub use blockvault_vhdx as vhdx;
pub use blockvault_vhdx::rct;
pub use rct::{parse_changes, ChangedRanges, RctError};
pub use vhdx::{VhdxDisk, VhdxInfo, VhdxOpenOptions, VhdxWriter};

pub mod error;
pub mod vm_backup;

pub use error::{Error, Result};
pub mod private_socket;
pub mod service;
pub mod sessions;
