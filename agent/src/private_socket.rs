//! Unix sockets that only their owner can connect to.

use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;

use crate::{Error, Result};

/// Binds a unix socket at `path` that only the owner (and root) can connect to, with no moment
/// at which `path` exists with looser permissions: the socket is bound inside a fresh 0700
/// directory beside `path`, made 0600 there, then renamed into place, which fails instead of
/// replacing anything that appeared at `path` meanwhile.
pub fn bind_private(path: &Path) -> Result<tokio::net::UnixListener> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if path.file_name().is_none() {
        return Err(Error::Input(format!(
            "{} is not a socket file path",
            path.display()
        )));
    }
    let staging = parent.join(format!(".bv-sock-{}", std::process::id()));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .map_err(io(format!("creating {}", staging.display())))?;
    let inner = staging.join("s");
    let bound = bind_and_move(&inner, path);
    if bound.is_err() {
        let _ = std::fs::remove_file(&inner);
    }
    let _ = std::fs::remove_dir(&staging);
    bound
}

fn io(what: String) -> impl FnOnce(std::io::Error) -> Error {
    move |e| Error::io(what, e)
}

/// Binds at `inner` (inside the private staging directory), restricts the socket to its owner,
/// then moves it to `path` unless something is there.
fn bind_and_move(inner: &Path, path: &Path) -> Result<tokio::net::UnixListener> {
    let listener = std::os::unix::net::UnixListener::bind(inner)
        .map_err(io(format!("binding unix socket {}", path.display())))?;
    std::fs::set_permissions(inner, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("restricting {}", inner.display())))?;
    rustix::fs::renameat_with(
        rustix::fs::CWD,
        inner,
        rustix::fs::CWD,
        path,
        rustix::fs::RenameFlags::NOREPLACE,
    )
    .map_err(|e| Error::io(format!("moving the socket to {}", path.display()), e.into()))?;
    let what = || format!("listening on {}", path.display());
    listener.set_nonblocking(true).map_err(io(what()))?;
    tokio::net::UnixListener::from_std(listener).map_err(io(what()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileTypeExt;

    #[tokio::test]
    async fn socket_is_owner_only_and_never_replaces_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nbd.sock");
        let _l = bind_private(&path).unwrap();
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o777, 0o600);
        // Connecting through the final path reaches the listener.
        tokio::net::UnixStream::connect(&path).await.unwrap();
        // Nothing left behind in the directory but the socket.
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(names.len(), 1);
        // An existing file is not replaced.
        let taken = dir.path().join("taken");
        std::fs::write(&taken, b"keep").unwrap();
        assert!(bind_private(&taken).is_err());
        assert_eq!(std::fs::read(&taken).unwrap(), b"keep");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
    }
}
