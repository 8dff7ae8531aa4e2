//! The blockvault repository: its format on an object store, its keys, and the local index that
//! caches where every chunk lives.
//!
//! Byte-level layouts are specified in `docs/FORMAT.md`; the constants live in
//! [`format`](mod@format). The repository in the object store is the only truth: the RocksDB
//! index can be deleted at any time and is rebuilt from pack tables of contents and index
//! segments.

mod blob;
mod blob_cache;
mod boot_trace;
mod cache_file;
mod config;
mod crypto;
pub mod direct_read;
mod durable_local;
mod error;
pub mod format;
mod ids;
mod index;
mod lease;
mod manifest;
mod objects;
mod paced_http;
mod pack;
mod pack_check;
mod pack_window;
mod page;
mod plan;
mod recycle;
mod repository;
mod retry;
mod s3;
mod segment;
mod storage;
mod test_hooks;
pub use test_hooks::hold as test_hold;
mod throttle;
mod verify_record;

pub use blob::{BlobKind, EncodedBlob};
pub use blob_cache::BlobCacheStats;
pub use blockvault_chunker::{ChunkHasher, ChunkId};
pub use boot_trace::{BootTrace, DiskTrace, MAX_TRACE_SLOTS};
pub use config::{KdfParams, RepoConfig};
pub use error::{Error, RemoteProblem, Result};
pub use ids::{PackId, PointId, SegmentId};
pub use index::{IndexStats, Location, LostPack};
pub use lease::{
    is_live, refresh_interval, Lease, LeaseKind, LeaseRecord, LeaseState, DEFAULT_REFRESH,
    STALE_AFTER_INTERVALS,
};
pub use manifest::{
    BackupKind, ChunkIdHex, ConfigFile, DiskManifest, DiskStats, PointManifest, SourceInfo,
};
pub use objects::{Epoch, LeaseId, Listed, ObjectKind, ObjectName};
pub use pack::{PackBuilder, PackEntry, SealedPack};
pub use pack_check::{FetchedPack, Unchecked};
pub use page::{page_slots, ChunkMapPage, SLOTS_PER_PAGE};
pub use plan::{ClaimRecord, Condemned, Plan, PublishedPlan};
pub use repository::{CopiedBlobs, OpenOptions, PruneClaim, Repository, SyncReport};
pub use s3::{S3Location, StoreOptions};
pub use segment::PackRecord;
pub use storage::{ObjectInfo, ObjectVersion, Storage, StorageStats, Write};
pub use verify_record::{
    ByteRange, DamagedBlob, DiskDamage, PackOutcome, PackResult, PointStatus, PointVerifyState,
    RecordListing, RecordName, RecordSummary, VerifyRecord, VERIFY_DIR, VERIFY_RECORD_VERSION,
    VERIFY_SUMMARY_VERSION,
};
