//! Files a mount owns alone. An overlay map or a hydration's part file used by two processes at
//! once loses writes (each flushes its own view over the other's), so each is locked for as long
//! as it is open; and a finished file is renamed into place only if nothing took its name
//! meanwhile.

use std::fs::File;
use std::path::Path;

use crate::{Error, Result};

/// Takes an exclusive lock on `file` (at `path`), or fails at once naming `what` holds it.
pub(crate) fn lock(file: &File, path: &Path, what: &str) -> Result<()> {
    rustix::fs::flock(file, rustix::fs::FlockOperation::NonBlockingLockExclusive).map_err(|e| {
        if e == rustix::io::Errno::WOULDBLOCK {
            Error::Invalid(format!(
                "{} is in use by another process ({what}); stop it first",
                path.display()
            ))
        } else {
            Error::Output {
                path: path.to_owned(),
                source: e.into(),
            }
        }
    })
}

/// Renames `from` to `to` unless `to` exists (a file created there while a hydration or a
/// restore ran for hours is not replaced); then fails with `AlreadyExists` and `from` stays.
pub fn rename_no_replace(from: &Path, to: &Path) -> std::io::Result<()> {
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        from,
        rustix::fs::CWD,
        to,
        rustix::fs::RenameFlags::NOREPLACE,
    )
    .map_err(|e| {
        if e == rustix::io::Errno::EXIST {
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!(
                    "{} appeared meanwhile; not replaced (the finished copy stays at {})",
                    to.display(),
                    from.display()
                ),
            )
        } else {
            e.into()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_is_refused_and_a_taken_name_is_not_replaced() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("map");
        let a = File::create(&p).unwrap();
        lock(&a, &p, "a mount").unwrap();
        let b = File::open(&p).unwrap();
        let e = lock(&b, &p, "a mount").unwrap_err().to_string();
        assert!(e.contains("in use by another process"), "{e}");
        drop(a);
        lock(&b, &p, "a mount").unwrap();

        let (from, to) = (d.path().join("part"), d.path().join("file"));
        std::fs::write(&from, b"copy").unwrap();
        std::fs::write(&to, b"someone else's").unwrap();
        let e = rename_no_replace(&from, &to).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&to).unwrap(), b"someone else's");
        std::fs::remove_file(&to).unwrap();
        rename_no_replace(&from, &to).unwrap();
        assert_eq!(std::fs::read(&to).unwrap(), b"copy");
    }
}
