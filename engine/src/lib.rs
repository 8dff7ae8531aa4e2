//! Pipelines over a blockvault repository: back up disk sources into restore points, read restore
//! points back (export, random access), and verify what is stored.

mod backup;
mod error;
mod export;
mod progress;
mod reader;
mod source;
mod verify;

pub use backup::{backup, BackupOptions, BackupOutcome, DiskJob, ReadPlan};
pub use error::{Error, Result};
pub use export::{export_raw, ExportTarget};
pub use progress::Progress;
pub use reader::{DiskReader, ReaderOptions};
pub use source::{DiskSource, RawFile};
pub use verify::{verify, VerifyOptions, VerifyReport};
