//! blockvault agent and library operations: disk sources (VHDX or raw, by content), incremental
//! planning from changed-ranges files, backup of a VM (`vm_backup`), exports to VHDX and qcow2,
//! restores of configuration files and whole VMs (`vm_restore`), restore mounts over NBD
//! (`mount_session`, `sessions`), and the scheduled service (`service`). The CLI and the service
//! both call these and render their typed reports. The VHDX format library and the
//! changed-ranges parser live in the `blockvault-vhdx` crate, re-exported here.

mod chunk_feed;
pub mod error;
pub mod export_qcow2;
pub mod export_vhdx;
pub mod mount;
pub mod mount_session;
pub mod plan;
pub mod private_socket;
pub mod service;
pub mod sessions;
pub mod source;
pub mod vm_backup;
pub mod vm_restore;

pub use blockvault_vhdx as vhdx;
pub use blockvault_vhdx::rct;
pub use error::{Error, Result};
pub use rct::{parse_changes, ChangedRanges, RctError};
pub use vhdx::{VhdxDisk, VhdxInfo, VhdxOpenOptions, VhdxWriter};
