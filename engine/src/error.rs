use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    #[error(transparent)]
    Repo(#[from] blockvault_repo::Error),
    #[error("disk '{disk}': reading the source at offset {offset}: {source}")]
    Source {
        disk: String,
        offset: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}: {source}")]
    Output {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("restore point {point} has no disk named '{disk}' (it has: {available})")]
    NoSuchDisk {
        point: String,
        disk: String,
        available: String,
    },
    #[error("disk '{disk}' of restore point {point}: chunk {slot} (offset {offset})")]
    Chunk {
        disk: String,
        point: String,
        slot: u64,
        offset: u64,
        #[source]
        // Boxed: the repository error is large and this variant would make every `Result` of
        // the crate carry it inline.
        source: Box<blockvault_repo::Error>,
    },
    #[error("disk '{disk}': {detail}")]
    Disk { disk: String, detail: String },
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("cancelled")]
    Cancelled,
    /// A blocking task panicked or was cancelled: an internal failure, not a bad request.
    #[error("background task failed: {0}")]
    Task(String),
    #[error(
        "prune epoch {epoch} condemned data this backup relies on (it was paused/ran longer than \
         the grace period?); run the backup again"
    )]
    PruneConflict { epoch: u64 },
    #[error(
        "restore point {point} disk '{disk}': data lost at bytes {} (damaged or missing in the \
         repository; first: {first}); 'blockvault verify' names the objects, and \
         --allow-damaged writes zeros there instead", format_ranges(.ranges)
    )]
    Lost {
        point: String,
        disk: String,
        ranges: Vec<(u64, u64)>,
        first: String,
    },
}

impl Error {
    pub fn task(e: tokio::task::JoinError) -> Self {
        Error::Task(e.to_string())
    }
}

/// `a-b, c-d` (end exclusive), at most 20 shown.
pub fn format_ranges(ranges: &[(u64, u64)]) -> String {
    let mut parts: Vec<String> = ranges
        .iter()
        .take(20)
        .map(|(a, b)| format!("{a}-{b}"))
        .collect();
    if ranges.len() > 20 {
        parts.push(format!("and {} more", ranges.len() - 20));
    }
    parts.join(", ")
}
