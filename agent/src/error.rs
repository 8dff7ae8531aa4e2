//! The agent crate's one error type.

use std::path::PathBuf;

/// What can go wrong in a library operation or in the agent service.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// Bad input from the user's side: an unreadable image, a malformed value.
    #[error("{0}")]
    Input(String),
    /// The agent's configuration file is invalid: names the file, the line and the key.
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Repo(#[from] blockvault_repo::Error),
    #[error(transparent)]
    Engine(#[from] blockvault_engine::Error),
    /// The NBD server of a mount.
    #[error(transparent)]
    Nbd(#[from] blockvault_nbd::Error),
    /// The agent's state database.
    #[error("agent state {path}: {detail}")]
    State { path: PathBuf, detail: String },
    /// Talking to the running agent over its control socket.
    #[error("agent control socket {path}: {detail}")]
    Control { path: PathBuf, detail: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A capture or release step of a VM source failed.
    #[error("{0}")]
    Source(String),
    /// The run was cancelled (agent cancel, or SIGTERM).
    #[error("cancelled")]
    Cancelled,
    /// The agent stopped before its cancelled runs had finished.
    #[error("{0}")]
    StoppedEarly(String),
}

impl Error {
    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
