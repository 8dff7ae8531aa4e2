use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong with a repository. Each variant names the object involved.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error("wrong password for repository {repo} (or its key in 'config' was altered)")]
    WrongPassword { repo: String },
    #[error("no blockvault repository at {location}: {detail}")]
    NotFound { location: String, detail: String },
    #[error("{location} is not a blockvault repository: {detail}")]
    Foreign { location: String, detail: String },
    #[error("a repository already exists at {location}")]
    AlreadyExists { location: String },
    #[error(
        "repository format version {found} is not supported (this build reads version {supported})"
    )]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("tampering or corruption detected in {object}: {detail}")]
    Tampered { object: String, detail: String },
    #[error("{object} is malformed: {detail}")]
    Malformed { object: String, detail: String },
    #[error("chunk {chunk} is referenced but not stored in any pack")]
    ChunkMissing { chunk: String },
    #[error("restore point {0} not found")]
    PointNotFound(String),
    #[error("restore point prefix {0} is ambiguous")]
    AmbiguousPoint(String),
    #[error("object store error on {object}: {source}")]
    Store {
        object: String,
        #[source]
        source: object_store::Error,
    },
    /// The object store refused the request for a reason that retrying cannot fix (plain HTTP
    /// not allowed, bad credentials, a missing bucket, access denied). One line: what is wrong and
    /// what to change; the service's own error document is not repeated.
    #[error("{location}: {problem}; {fix}")]
    Remote {
        location: String,
        kind: RemoteProblem,
        problem: String,
        fix: String,
    },
    /// A compare-and-swap lost: another writer replaced the object since it was read. Nothing
    /// was written; running the operation again starts from the new version.
    #[error("{object} was changed by another writer meanwhile ({detail}); nothing was written, run the command again")]
    Conflict { object: String, detail: String },
    #[error("local index at {path}: {detail}")]
    Index { path: PathBuf, detail: String },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid argument: {0}")]
    Invalid(String),
    /// Kept apart from `Malformed` so a reader can tell "gone" (sync and retry) from "damaged".
    #[error("pack {pack} is malformed: missing from the repository (deleted or never uploaded)")]
    PackMissing { pack: String },
    #[error(
        "prune already running (epoch {epoch}, host {host}, since {since}); wait for it to \
         finish (a prune that died is taken over once it has not refreshed its claim for three \
         intervals)"
    )]
    PruneRunning {
        epoch: u64,
        host: String,
        since: String,
    },
    #[error(
        "this prune (epoch {epoch}) was taken over by epoch {by} after it stopped refreshing its \
         claim; it stopped without deleting anything more"
    )]
    PruneSuperseded { epoch: u64, by: u64 },
}

/// Why an object store refused a request for good (see [`Error::Remote`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteProblem {
    /// A plain `http://` endpoint without `--s3-allow-http`.
    PlainHttp,
    /// Unknown access key, wrong secret, expired session token, skewed clock.
    Credentials,
    /// The credentials are valid but may not do this.
    AccessDenied,
    /// The bucket does not exist.
    NoBucket,
}

impl Error {
    pub(crate) fn store(object: impl Into<String>, source: object_store::Error) -> Self {
        Error::Store {
            object: object.into(),
            source,
        }
    }

    pub(crate) fn tampered(object: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Tampered {
            object: object.into(),
            detail: detail.into(),
        }
    }

    pub(crate) fn malformed(object: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Malformed {
            object: object.into(),
            detail: detail.into(),
        }
    }

    /// True when repeating the operation may succeed (a network or server hiccup), false when the
    /// data or the request itself is wrong.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Store { source, .. } => {
                !matches!(
                    source,
                    object_store::Error::NotFound { .. }
                        | object_store::Error::AlreadyExists { .. }
                        | object_store::Error::Precondition { .. }
                        | object_store::Error::NotSupported { .. }
                        | object_store::Error::NotImplemented
                        | object_store::Error::PermissionDenied { .. }
                        | object_store::Error::Unauthenticated { .. }
                ) && !http_status(source).is_some_and(refused_for_good)
            }
            _ => false,
        }
    }

    /// True when a conditional update failed because the object is no longer the version it
    /// was read as (another writer replaced it).
    pub fn is_precondition_failed(&self) -> bool {
        matches!(
            self,
            Error::Store {
                source: object_store::Error::Precondition { .. },
                ..
            }
        )
    }

    /// True when the store said the object does not exist.
    pub fn is_not_found(&self) -> bool {
        matches!(
            self,
            Error::Store {
                source: object_store::Error::NotFound { .. },
                ..
            }
        )
    }
}

/// A 4xx answer says the request itself is wrong, and sending it again gets the same answer;
/// except a request timeout (408), a conflict with a write still in progress (409) and
/// throttling (429), which pass.
fn refused_for_good(status: u16) -> bool {
    (400..500).contains(&status) && !matches!(status, 408 | 409 | 429)
}

/// The HTTP status of the answer behind an object-store error, when the store's client reported
/// one it had no variant for. object_store keeps it private (its request error shows as
/// `Server returned non-2xx status code: 416 Range Not Satisfiable: ...`), so it is read from
/// there; an error whose own text merely quotes such a line is not one.
pub(crate) fn http_status(e: &object_store::Error) -> Option<u16> {
    const SHOWN: &str = "Server returned non-2xx status code: ";
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(rest) = s.to_string().strip_prefix(SHOWN) {
            return rest.get(..3)?.parse().ok();
        }
        src = s.source();
    }
    None
}
