//! Pipelines over a blockvault repository: back up disk sources into restore points, read restore
//! points back (export, random access), and verify what is stored.

mod backup;
mod buffers;
mod cache;
mod commit;
mod compact;
mod direct_write;
mod error;
mod exclusive;
mod export;
pub mod forget;
pub mod gc;
mod hydrate;
mod mounted;
mod overlay;
pub mod points;
mod progress;
mod prune;
mod random_read;
mod reader;
pub mod retention;
mod source;
mod verify;

pub use backup::{backup, BackupOptions, BackupOutcome, DiskJob, ReadPlan};
pub use cache::CacheStats;
pub use error::{format_ranges, Error, Result};
pub use exclusive::rename_no_replace;
pub use export::{export_raw, export_raw_with, ExportTarget};
pub use forget::{forget, ForgetDecision, ForgetOptions, ForgetReport, ForgetTarget};
pub use hydrate::{start_hydration, Hydration, HydrationStatus};
pub use mounted::{MountedDisk, StatusRun};
pub use overlay::{BlockState, Overlay, OVERLAY_BLOCK};
pub use progress::Progress;
pub use prune::{mark, prune, rfc3339_ms, PackCount, PruneOptions, PruneReport};
pub use random_read::{
    MapRun, PrefetchReport, RandomReadOptions, RandomReader, Recording, Segment,
};
pub use reader::{DiskReader, ReaderOptions};
pub use source::{DiskSource, RawFile};
pub use verify::{
    describe_state, parse_duration, verify, PointDamage, Problem, Selection, Verdict,
    VerifyOptions, VerifyReport,
};
