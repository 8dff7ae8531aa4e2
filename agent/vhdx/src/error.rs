use std::io;
use std::path::PathBuf;

/// Everything that can go wrong reading or writing a VHDX file. Messages name
/// the file, the structure and its file offset.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The operating system failed a read or write.
    #[error("{file}: I/O error on {structure} at offset {offset}: {source}")]
    Io {
        file: String,
        structure: String,
        offset: u64,
        #[source]
        source: io::Error,
    },
    /// A structure on disk breaks the format.
    #[error("{file}: {structure} at offset {offset}: {reason}")]
    Corrupt {
        file: String,
        structure: String,
        offset: u64,
        reason: String,
    },
    /// A valid file that uses something this reader does not implement.
    #[error("{file}: {structure} at offset {offset}: unsupported: {reason}")]
    Unsupported {
        file: String,
        structure: String,
        offset: u64,
        reason: String,
    },
    /// No parent file could be located for a differencing disk.
    #[error("{child}: parent disk not found (parent_linkage {linkage}); tried: {}", fmt_paths(.tried))]
    ParentNotFound {
        child: String,
        linkage: String,
        tried: Vec<PathBuf>,
    },
    /// The file found as parent is not the parent this child was created on.
    #[error("{child}: parent {} has DataWriteGuid {found}, but the child's parent_linkage is {expected}; the parent was modified or replaced after the child was created", .parent.display())]
    ParentMismatch {
        child: String,
        parent: PathBuf,
        expected: String,
        found: String,
    },
    /// The chain of parents loops or is too deep, or a parent does not fit its child.
    #[error("{child}: parent chain: {reason}")]
    ParentChain { child: String, reason: String },
    /// A read or write outside the virtual disk.
    #[error("{file}: access at offset {offset} length {len} is outside the virtual disk of {size} bytes")]
    OutOfRange {
        file: String,
        offset: u64,
        len: u64,
        size: u64,
    },
    /// A caller passed an invalid argument (writer parameters).
    #[error("{0}")]
    InvalidArgument(String),
}

fn fmt_paths(p: &[PathBuf]) -> String {
    if p.is_empty() {
        return "nothing (no usable path in the parent locator)".into();
    }
    p.iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

impl Error {
    /// Whether retrying the same operation might succeed (only I/O errors).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() != io::ErrorKind::UnexpectedEof)
    }

    pub(crate) fn corrupt(
        file: &str,
        structure: impl Into<String>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Error {
        Error::Corrupt {
            file: file.to_string(),
            structure: structure.into(),
            offset,
            reason: reason.into(),
        }
    }

    pub(crate) fn unsupported(
        file: &str,
        structure: impl Into<String>,
        offset: u64,
        reason: impl Into<String>,
    ) -> Error {
        Error::Unsupported {
            file: file.to_string(),
            structure: structure.into(),
            offset,
            reason: reason.into(),
        }
    }

    pub fn io(file: &str, structure: impl Into<String>, offset: u64, source: io::Error) -> Error {
        Error::Io {
            file: file.to_string(),
            structure: structure.into(),
            offset,
            source,
        }
    }
}
