//! The object store under a repository, with the few operations the format needs: put (optionally
//! create-only), get, range get, list, head and delete. No rename, no append, no listing that must be
//! instantly consistent.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path as ObjPath;
use object_store::{GetOptions, GetRange, ObjectStore, PutMode, PutOptions, PutPayload};

use crate::{Error, Result};

#[derive(Clone)]
pub struct Storage {
    store: Arc<dyn ObjectStore>,
    /// Shown to users; never contains credentials.
    location: String,
    /// For a local directory: where objects live, so puts can be made durable with fsync.
    local_root: Option<PathBuf>,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Storage({})", self.location)
    }
}

impl Storage {
    /// Opens a repository location: a directory path, `file:///path`, or `memory://` (tests).
    /// With `create`, a missing local directory is created.
    pub fn open(location: &str, create: bool) -> Result<Self> {
        if location == "memory://" || location.starts_with("memory://") {
            return Ok(Self::from_store(Arc::new(InMemory::new()), location));
        }
        if location.contains("://") && !location.starts_with("file://") {
            return Err(Error::Invalid(format!(
                "repository location '{location}': unsupported scheme (use a directory path)"
            )));
        }
        let path = PathBuf::from(location.strip_prefix("file://").unwrap_or(location));
        if create {
            std::fs::create_dir_all(&path).map_err(|source| Error::Io {
                path: path.clone(),
                source,
            })?;
        } else if !path.is_dir() {
            return Err(Error::NotFound {
                location: path.display().to_string(),
                detail: "directory does not exist".into(),
            });
        }
        let root = path.canonicalize().map_err(|source| Error::Io {
            path: path.clone(),
            source,
        })?;
        let fs = LocalFileSystem::new_with_prefix(&root)
            .map_err(|e| Error::store(root.display().to_string(), e))?;
        Ok(Self {
            store: Arc::new(fs),
            location: root.display().to_string(),
            local_root: Some(root),
        })
    }

    pub fn from_store(store: Arc<dyn ObjectStore>, location: impl Into<String>) -> Self {
        Self {
            store,
            location: location.into(),
            local_root: None,
        }
    }

    pub fn location(&self) -> &str {
        &self.location
    }

    pub fn inner(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Stores an object. `create_only` fails with `AlreadyExists` when the name is taken. For a
    /// local directory the file and its directory are fsynced before this returns, so a completed
    /// put survives power loss.
    pub async fn put(&self, name: &str, bytes: Bytes, create_only: bool) -> Result<()> {
        let opts = PutOptions {
            mode: if create_only {
                PutMode::Create
            } else {
                PutMode::Overwrite
            },
            ..Default::default()
        };
        self.store
            .put_opts(&ObjPath::from(name), PutPayload::from_bytes(bytes), opts)
            .await
            .map_err(|e| Error::store(name, e))?;
        if let Some(root) = &self.local_root {
            let path = root.join(name);
            tokio::task::spawn_blocking(move || fsync_file_and_dir(&path))
                .await
                .map_err(|e| Error::Invalid(format!("fsync task: {e}")))??;
        }
        Ok(())
    }

    pub async fn get(&self, name: &str) -> Result<Bytes> {
        let r = self
            .store
            .get(&ObjPath::from(name))
            .await
            .map_err(|e| Error::store(name, e))?;
        r.bytes().await.map_err(|e| Error::store(name, e))
    }

    pub async fn get_range(&self, name: &str, range: Range<u64>) -> Result<Bytes> {
        let want = range.end - range.start;
        let b = self
            .store
            .get_range(&ObjPath::from(name), range.clone())
            .await
            .map_err(|e| Error::store(name, e))?;
        if b.len() as u64 != want {
            return Err(Error::malformed(
                name,
                format!(
                    "range {}..{} returned {} bytes (object truncated?)",
                    range.start,
                    range.end,
                    b.len()
                ),
            ));
        }
        Ok(b)
    }

    /// The last `n` bytes of an object (fewer if it is shorter) and the object's size.
    pub async fn get_suffix(&self, name: &str, n: u64) -> Result<(Bytes, u64)> {
        let opts = GetOptions {
            range: Some(GetRange::Suffix(n)),
            ..Default::default()
        };
        let r = self
            .store
            .get_opts(&ObjPath::from(name), opts)
            .await
            .map_err(|e| Error::store(name, e))?;
        let size = r.meta.size;
        let bytes = r.bytes().await.map_err(|e| Error::store(name, e))?;
        Ok((bytes, size))
    }

    /// Names (relative to the repository root) and sizes of the objects under `prefix`.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, u64)>> {
        let p = ObjPath::from(prefix);
        self.store
            .list(Some(&p))
            .map_ok(|m| (m.location.to_string(), m.size))
            .try_collect()
            .await
            .map_err(|e| Error::store(prefix, e))
    }

    pub async fn head(&self, name: &str) -> Result<Option<u64>> {
        match self.store.head(&ObjPath::from(name)).await {
            Ok(m) => Ok(Some(m.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(Error::store(name, e)),
        }
    }

    pub async fn delete(&self, name: &str) -> Result<()> {
        match self.store.delete(&ObjPath::from(name)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(Error::store(name, e)),
        }
    }
}

fn fsync_file_and_dir(path: &Path) -> Result<()> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(io)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)
            .and_then(|f| f.sync_all())
            .map_err(io)?;
    }
    Ok(())
}
