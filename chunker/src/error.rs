/// Errors of the chunker crate: only invalid parameters, since nothing here touches I/O.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum Error {
    #[error("chunk size {0} is not a power of two between 64 KiB and 8 MiB")]
    BadChunkSize(u64),
    #[error("'{0}' is not a 64-character hexadecimal chunk id")]
    BadChunkId(String),
}
