//! Files of the local cache directory (plans, manifests, the maintenance state, cached blobs):
//! written under a temporary name (a dot-file beside it) and renamed, so a crash or a full disk leaves the old file or none, never a
//! torn one that a later run would take for the real thing.

use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

/// Writes `bytes` to `path` whole or not at all, creating its directory.
pub(crate) fn write_whole(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let leaf = path.file_name().unwrap_or_default().to_string_lossy();
    // Two writers of one process, or two processes, never share a temporary name.
    let tmp = dir.join(format!(
        ".{leaf}.tmp-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(dir)?;
    let mut f = create_new(&tmp)?;
    let r = f
        .write_all(bytes)
        .and_then(|()| std::fs::rename(&tmp, path));
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// Creates `path` as a new file, refusing any name that already exists, a symbolic link
/// included: whoever can write to the cache directory could otherwise plant a link at the
/// temporary name and have this process write through it into a file of their choosing.
fn create_new(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_the_file_and_leaves_no_temporary() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("sub").join("f");
        write_whole(&p, b"one").unwrap();
        write_whole(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap()).unwrap().collect();
        assert_eq!(names.len(), 1);
    }

    #[test]
    fn a_planted_link_at_the_temporary_name_is_not_written_through() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let tmp = d.path().join(".f.tmp-planted");
        std::os::unix::fs::symlink(&victim, &tmp).unwrap();
        let e = create_new(&tmp).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::AlreadyExists, "{e}");
        // A link to a name that does not exist yet is not followed to create it either.
        let absent = d.path().join("absent");
        let dangling = d.path().join(".g.tmp-planted");
        std::os::unix::fs::symlink(&absent, &dangling).unwrap();
        assert!(create_new(&dangling).is_err());
        assert!(!absent.exists());
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    }
}
