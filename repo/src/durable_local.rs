//! A local-directory object store whose puts are durable before they are visible.
//!
//! `object_store`'s `LocalFileSystem` writes an object to a staging file `<name>#<n>` and links
//! (create-only) or renames (overwrite) it into place without fsyncing it first. On a file system
//! with delayed allocation (ext4, XFS) the link can reach the journal before the data does: after a
//! power loss the name exists with zero or partial bytes, and a torn manifest, pack, lease or index
//! segment blocks restores, prunes and index syncs. Here the staging file is fsynced before the
//! link or rename, and the directory after it (and each directory created for it, in its parent).
//! Everything but puts is the inner store's; staging files keep its naming, so its listings skip
//! them.

use std::fmt;
use std::io::{ErrorKind, Write as _};
use std::path::{Path as FsPath, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMode,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, Result,
};

const STORE: &str = "LocalFileSystem";

pub(crate) struct DurableLocal {
    inner: Arc<dyn ObjectStore>,
    root: PathBuf,
}

impl DurableLocal {
    /// `inner` must be a `LocalFileSystem` rooted at `root`.
    pub(crate) fn new(inner: Arc<dyn ObjectStore>, root: PathBuf) -> Self {
        Self { inner, root }
    }
}

impl fmt::Debug for DurableLocal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Durable({})", self.inner)
    }
}

impl fmt::Display for DurableLocal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Durable({})", self.inner)
    }
}

fn generic(e: impl std::error::Error + Send + Sync + 'static) -> object_store::Error {
    object_store::Error::Generic {
        store: STORE,
        source: Box::new(e),
    }
}

#[async_trait]
impl ObjectStore for DurableLocal {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        let create = match opts.mode {
            PutMode::Create => true,
            PutMode::Overwrite => false,
            // Compare-and-swap on a local directory is `Storage::update`'s own (a lock and a
            // byte comparison), never a put through the store.
            PutMode::Update(_) => return Err(object_store::Error::NotImplemented),
        };
        let path = self.root.join(location.as_ref());
        let name = location.to_string();
        tokio::task::spawn_blocking(move || durable_put(&path, &payload, create))
            .await
            .map_err(generic)?
            .map_err(|source| match source.kind() {
                ErrorKind::AlreadyExists => object_store::Error::AlreadyExists {
                    path: name,
                    source: Box::new(source),
                },
                _ => generic(source),
            })?;
        Ok(PutResult {
            e_tag: None,
            version: None,
        })
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        // The repository writes every object with a single put.
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    async fn delete(&self, location: &Path) -> Result<()> {
        self.inner.delete(location).await
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        self.inner.list(prefix)
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.copy(from, to).await
    }

    async fn copy_if_not_exists(&self, from: &Path, to: &Path) -> Result<()> {
        self.inner.copy_if_not_exists(from, to).await
    }
}

/// Writes `payload` to `path`: staged, fsynced, linked (`create`: fails with `AlreadyExists` if
/// the name exists) or renamed into place, the directory fsynced.
fn durable_put(path: &FsPath, payload: &PutPayload, create: bool) -> std::io::Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidInput, "object at the root"))?;
    let (mut file, staging) = staging_file(path, dir)?;
    let placed = (|| {
        for part in payload.iter() {
            file.write_all(part)?;
        }
        file.sync_all()?;
        drop(file);
        if create {
            std::fs::hard_link(&staging, path)?;
            std::fs::remove_file(&staging)?;
        } else {
            std::fs::rename(&staging, path)?;
        }
        sync_dir(dir)
    })();
    if placed.is_err() {
        let _ = std::fs::remove_file(&staging);
    }
    placed
}

/// A new staging file `<path>#<n>` (the lowest free `n`), creating its directory if needed.
fn staging_file(path: &FsPath, dir: &FsPath) -> std::io::Result<(std::fs::File, PathBuf)> {
    let mut n = 1u32;
    loop {
        let mut staging = path.as_os_str().to_owned();
        staging.push(format!("#{n}"));
        let staging = PathBuf::from(staging);
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&staging)
        {
            Ok(f) => return Ok((f, staging)),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => n += 1,
            Err(e) if e.kind() == ErrorKind::NotFound => create_dirs(dir)?,
            Err(e) => return Err(e),
        }
    }
}

/// Creates `dir` and its missing ancestors, each fsynced into its parent, so that an object
/// whose directory is new survives power loss too.
fn create_dirs(dir: &FsPath) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    if dir.is_dir() {
        return Ok(());
    }
    let parent = dir
        .parent()
        .ok_or_else(|| std::io::Error::new(ErrorKind::NotFound, "no existing ancestor"))?;
    create_dirs(parent)?;
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => sync_dir(parent),
        // Another writer made it meanwhile (and syncs it into its parent).
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e),
    }
}

fn sync_dir(dir: &FsPath) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::local::LocalFileSystem;

    fn store(root: &FsPath) -> DurableLocal {
        let inner = Arc::new(LocalFileSystem::new_with_prefix(root).unwrap());
        DurableLocal::new(inner, root.to_path_buf())
    }

    #[tokio::test]
    async fn puts_create_directories_refuse_existing_names_and_leave_no_staging_files() {
        let dir = tempfile::tempdir().unwrap();
        let s = store(dir.path());
        let name = Path::from("packs/ab/cdef");
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        s.put_opts(&name, PutPayload::from_static(b"one"), create.clone())
            .await
            .unwrap();
        let again = s
            .put_opts(&name, PutPayload::from_static(b"two"), create)
            .await;
        assert!(
            matches!(again, Err(object_store::Error::AlreadyExists { .. })),
            "{again:?}"
        );
        assert_eq!(s.get(&name).await.unwrap().bytes().await.unwrap(), "one");
        s.put_opts(
            &name,
            PutPayload::from_static(b"three"),
            PutOptions::default(),
        )
        .await
        .unwrap();
        assert_eq!(s.get(&name).await.unwrap().bytes().await.unwrap(), "three");
        let left: Vec<_> = std::fs::read_dir(dir.path().join("packs/ab"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left, vec![std::ffi::OsString::from("cdef")]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("packs"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
    }
}
