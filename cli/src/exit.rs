//! Exit codes: scripts and the agent's scheduler tell failures apart by these, so they are part of
//! the command's interface (documented in docs/OPERATIONS.md).

use blockvault_engine::Error as EngineError;
use blockvault_repo::Error as RepoError;

pub const OK: u8 = 0;
pub const FAILURE: u8 = 1;
pub const WRONG_PASSWORD: u8 = 3;
pub const NO_REPOSITORY: u8 = 4;
pub const BAD_INPUT: u8 = 5;
pub const TAMPERED: u8 = 6;
pub const VERIFY_FAILED: u8 = 7;
pub const NOT_FOUND: u8 = 8;
/// Another prune holds the repository's maintenance claim.
pub const BUSY: u8 = 9;
/// Verify could not check everything it was asked to (an unreadable listing, a dead store).
pub const VERIFY_INCOMPLETE: u8 = 10;

/// A verify run that found damage: the report is printed, and this sets the exit code.
#[derive(Debug)]
pub struct VerifyFailed(pub usize);

impl std::fmt::Display for VerifyFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "verify found {} problem(s)", self.0)
    }
}

impl std::error::Error for VerifyFailed {}

/// A verify run that found no damage but could not check everything it was asked to.
#[derive(Debug)]
pub struct VerifyIncomplete(pub usize);

impl std::fmt::Display for VerifyIncomplete {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "verify could not check {} object(s)", self.0)
    }
}

impl std::error::Error for VerifyIncomplete {}

pub fn classify(err: &anyhow::Error) -> u8 {
    err.chain().find_map(code_of).unwrap_or(FAILURE)
}

/// The code one error of a chain gives, if it decides one.
fn code_of(cause: &(dyn std::error::Error + 'static)) -> Option<u8> {
    if cause.downcast_ref::<VerifyFailed>().is_some() {
        return Some(VERIFY_FAILED);
    }
    if cause.downcast_ref::<VerifyIncomplete>().is_some() {
        return Some(VERIFY_INCOMPLETE);
    }
    if let Some(code) = cause.downcast_ref::<EngineError>().and_then(engine_code) {
        return Some(code);
    }
    // A repository error on its own, or boxed.
    let repo = cause
        .downcast_ref::<RepoError>()
        .or_else(|| cause.downcast_ref::<Box<RepoError>>().map(|b| &**b));
    if let Some(e) = repo {
        return Some(repo_code(e));
    }
    if let Some(e) = cause.downcast_ref::<blockvault_restore::Error>() {
        use blockvault_restore::Error as R;
        if let Some(code) = read_failure_code(e) {
            return Some(code);
        }
        return Some(match e {
            R::NotFound(_) | R::NoSuchPartition { .. } => NOT_FOUND,
            R::Unsupported { .. }
            | R::Exists { .. }
            | R::Invalid(_)
            | R::Limit(_)
            | R::NotADirectory(_)
            | R::NotAFile(_) => BAD_INPUT,
            _ => FAILURE,
        });
    }
    if cause.downcast_ref::<InputError>().is_some() {
        return Some(BAD_INPUT);
    }
    None
}

/// The code of an engine error that has one of its own; `None` for the rest.
fn engine_code(e: &EngineError) -> Option<u8> {
    match e {
        EngineError::Source { .. } => Some(BAD_INPUT),
        EngineError::NoSuchDisk { .. } => Some(NOT_FOUND),
        EngineError::Lost { .. } => Some(TAMPERED),
        // A transparent wrapper: the chain goes on below the repository error, so it is judged
        // here.
        EngineError::Repo(e) => Some(repo_code(e)),
        _ => None,
    }
}

/// File restore reads the point's disk through `std::io`, so a repository failure under it (a
/// tampered or missing pack) arrives as the I/O error of a failed disk read. That error's
/// `source()` skips the error it carries, so it is taken out here and judged like the same
/// failure of any other command.
fn read_failure_code(e: &blockvault_restore::Error) -> Option<u8> {
    let blockvault_restore::Error::Read { source, .. } = e else {
        return None;
    };
    // The whole chain below it: a chunk read wraps the repository error in the engine's
    // `Chunk` error, whose own code is none.
    let inner: &(dyn std::error::Error + 'static) = source.get_ref()?;
    std::iter::successors(Some(inner), |e| e.source()).find_map(code_of)
}

fn repo_code(e: &RepoError) -> u8 {
    match e {
        RepoError::WrongPassword { .. } => WRONG_PASSWORD,
        RepoError::NotFound { .. }
        | RepoError::Foreign { .. }
        | RepoError::AlreadyExists { .. }
        | RepoError::UnsupportedVersion { .. } => NO_REPOSITORY,
        RepoError::Tampered { .. }
        | RepoError::Malformed { .. }
        | RepoError::PackMissing { .. }
        | RepoError::ChunkMissing { .. } => TAMPERED,
        RepoError::PruneRunning { .. } => BUSY,
        RepoError::PointNotFound(_) | RepoError::AmbiguousPoint(_) => NOT_FOUND,
        _ => FAILURE,
    }
}

/// Bad input from the user's side (an unreadable image, a malformed argument value).
#[derive(Debug)]
pub struct InputError(pub String);

impl std::fmt::Display for InputError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InputError {}

#[cfg(test)]
mod tests {
    use super::*;

    /// A repository error keeps its exit code whether the repository, the engine or a
    /// `with_context` layer hands it up.
    #[test]
    fn repository_errors_keep_their_code_through_the_engine() {
        let tampered = || RepoError::Tampered {
            object: "restore point 1234 manifest".into(),
            detail: "authentication failed".into(),
        };
        assert_eq!(classify(&anyhow::anyhow!(tampered())), TAMPERED);
        assert_eq!(
            classify(&anyhow::anyhow!(EngineError::Repo(tampered()))),
            TAMPERED
        );
        let wrapped =
            anyhow::Error::from(EngineError::Repo(RepoError::PointNotFound("abc".into())))
                .context("showing a point");
        assert_eq!(classify(&wrapped), NOT_FOUND);
        assert_eq!(classify(&anyhow::anyhow!("something else")), FAILURE);
    }

    /// `restore files` reads the disk through `std::io`: damage under it keeps its code.
    #[test]
    fn a_damaged_repository_under_a_file_restore_read_keeps_its_code() {
        let read = |source: std::io::Error| {
            anyhow::Error::from(blockvault_restore::Error::Read {
                offset: 4096,
                source,
            })
            .context("restoring /etc/hosts")
        };
        let tampered = EngineError::Repo(RepoError::Tampered {
            object: "pack 1234".into(),
            detail: "authentication failed".into(),
        });
        assert_eq!(classify(&read(std::io::Error::other(tampered))), TAMPERED);
        let missing = RepoError::PackMissing {
            pack: "5678".into(),
        };
        assert_eq!(classify(&read(std::io::Error::other(missing))), TAMPERED);
        // What a disk read really carries: the chunk that failed, around the repository error.
        let chunk = EngineError::Chunk {
            disk: "d0".into(),
            point: "93a740d1b6ed377b".into(),
            slot: 80,
            offset: 5 << 20,
            source: Box::new(RepoError::Tampered {
                object: "pack 7d4b".into(),
                detail: "authentication failed".into(),
            }),
        };
        assert_eq!(classify(&read(std::io::Error::other(chunk))), TAMPERED);
        // A read that failed for another reason stays a plain failure.
        let past_end = std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "past the end");
        assert_eq!(classify(&read(past_end)), FAILURE);
    }
}
