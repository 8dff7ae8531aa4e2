use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The disk could not be read (the restore point's reader failed, or a read ran past its end).
    #[error("reading the disk at byte {offset}: {source}")]
    Read {
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    /// A partition table or file system that does not make sense.
    #[error("{what} is damaged: {detail}")]
    Corrupt { what: String, detail: String },
    /// A partition or whole disk holding something this reader does not read.
    #[error("{what} holds {found}, which file restore cannot read; serve the disk with `blockvault restore mount` and attach it to a machine that can")]
    Unsupported { what: String, found: String },
    #[error("no partition {wanted} on this disk (it has: {available})")]
    NoSuchPartition { wanted: String, available: String },
    #[error("{0}: no such file or directory")]
    NotFound(String),
    #[error("{0}: not a directory")]
    NotADirectory(String),
    #[error("{0}: not a regular file")]
    NotAFile(String),
    #[error("writing {path}: {source}")]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} already exists; pass --overwrite to replace it")]
    Exists { path: PathBuf },
    #[error("{0}")]
    Limit(String),
    #[error("{0}")]
    Invalid(String),
}

pub(crate) type BoxedError = Box<dyn std::error::Error + Send + Sync + 'static>;
