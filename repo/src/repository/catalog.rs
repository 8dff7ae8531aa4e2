//! Restore points: manifests in the store, and a local catalog so each manifest is fetched once
//! per machine. The catalog keeps the sealed bytes of every manifest it has read under
//! `<cache>/<repo id>/catalog/<point id>`; manifests never change once written, so a cached copy
//! is always right while the point is listed. Listing `points/` stays the truth of which points
//! exist: a point removed elsewhere leaves the catalog at the next listing. The cached bytes stay
//! sealed (opening one costs microseconds) so the cache reveals no more than the bucket does.

use std::collections::HashSet;
use std::path::PathBuf;

use bytes::Bytes;
use futures::StreamExt;
use serde::{Deserialize, Serialize};

use super::{blocking, Repository, SYNC_PARALLELISM};
use crate::objects::{ObjectKind, ObjectName};
use crate::storage::Write;
use crate::{Error, PointId, PointManifest, Result};

/// The sealed body of `protected/<point id>`.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProtectRecord {
    point: PointId,
    /// Local clock of the host that protected the point, for people.
    created: String,
}

/// A catalog file name: the point id and a hash of the entity tag (tags may hold any
/// character).
fn catalog_leaf(id: &PointId, tag: &str) -> String {
    format!("{id}-{}", &blake3::hash(tag.as_bytes()).to_hex()[..16])
}

impl Repository {
    fn catalog_dir(&self) -> PathBuf {
        self.cache_root.join("catalog")
    }

    /// Stores a restore point's manifest; the point exists from this moment on.
    pub async fn save_point(&self, manifest: &PointManifest) -> Result<()> {
        let sealed = Bytes::from(manifest.seal(&self.keys));
        self.put_object(
            ObjectName::Point(manifest.id),
            sealed.clone(),
            Write::CreateUnique,
        )
        .await?;
        Ok(())
    }

    /// Caches a manifest under its id and the store's entity tag: a manifest changed in the
    /// store (damage, tampering) has another tag and is fetched again.
    fn catalog_put(&self, id: &PointId, tag: &str, sealed: &[u8]) {
        let path = self.catalog_dir().join(catalog_leaf(id, tag));
        if let Err(e) = crate::cache_file::write_whole(&path, sealed) {
            tracing::debug!(error = %e, "could not cache manifest {id}");
        }
    }

    fn catalog_get(&self, id: &PointId, tag: &str) -> Option<Bytes> {
        std::fs::read(self.catalog_dir().join(catalog_leaf(id, tag)))
            .ok()
            .map(Bytes::from)
    }

    async fn open_manifest(&self, id: PointId, bytes: Bytes) -> Result<PointManifest> {
        let keys = self.keys.clone();
        blocking(move || PointManifest::open(&keys, &id, &bytes)).await?
    }

    /// A restore point's manifest, read from the store.
    pub async fn load_point(&self, id: &PointId) -> Result<PointManifest> {
        let bytes = self
            .get_object(ObjectName::Point(*id))
            .await?
            .ok_or_else(|| Error::PointNotFound(id.to_hex()))?;
        self.open_manifest(*id, bytes).await
    }

    /// A listed manifest: from the local catalog when cached there under the same entity tag
    /// (and `cached` allows it), else from the store (and then cached).
    async fn load_listed(
        &self,
        id: PointId,
        tag: Option<String>,
        cached: bool,
    ) -> Result<PointManifest> {
        if let (Some(tag), true) = (&tag, cached) {
            if let Some(b) = self.catalog_get(&id, tag) {
                if let Ok(m) = self.open_manifest(id, b).await {
                    return Ok(m);
                }
            }
        }
        let bytes = self
            .get_object(ObjectName::Point(id))
            .await?
            .ok_or_else(|| Error::PointNotFound(id.to_hex()))?;
        let m = self.open_manifest(id, bytes.clone()).await?;
        if let Some(tag) = &tag {
            self.catalog_put(&id, tag, &bytes);
        }
        Ok(m)
    }

    /// Removes a restore point (its manifest). Its data stays until a prune reclaims it.
    pub async fn delete_point(&self, id: &PointId) -> Result<()> {
        self.delete_object(ObjectName::Point(*id)).await?;
        self.catalog_prune_point(id);
        Ok(())
    }

    pub async fn list_point_ids(&self) -> Result<Vec<PointId>> {
        Ok(self
            .list_objects(ObjectKind::Point)
            .await?
            .into_iter()
            .filter_map(|l| match l.name {
                ObjectName::Point(id) => Some(id),
                _ => None,
            })
            .collect())
    }

    /// Every restore point's manifest, oldest first, from one listing of `points/` and the local
    /// catalog (only manifests not cached yet are fetched). Unreadable manifests are returned as
    /// errors beside the readable ones so one damaged point does not hide the others.
    pub async fn list_points(&self) -> Result<(Vec<PointManifest>, Vec<(PointId, Error)>)> {
        self.list_points_with(true).await
    }

    /// [`Self::list_points`] with every manifest read from the store, for verification: an entity
    /// tag does not change with what a disk does to a file's bytes (a local directory's tag is
    /// its inode, time and size), so a cached copy would hide a manifest damaged in place.
    pub async fn list_points_from_store(
        &self,
    ) -> Result<(Vec<PointManifest>, Vec<(PointId, Error)>)> {
        self.list_points_with(false).await
    }

    async fn list_points_with(
        &self,
        cached: bool,
    ) -> Result<(Vec<PointManifest>, Vec<(PointId, Error)>)> {
        let listed: Vec<(PointId, Option<String>)> = self
            .list_objects(ObjectKind::Point)
            .await?
            .into_iter()
            .filter_map(|l| match l.name {
                ObjectName::Point(id) => Some((id, l.e_tag)),
                _ => None,
            })
            .collect();
        self.catalog_prune(&listed);
        let results: Vec<(PointId, Result<PointManifest>)> = futures::stream::iter(listed)
            .map(|(id, tag)| async move { (id, self.load_listed(id, tag, cached).await) })
            .buffer_unordered(SYNC_PARALLELISM)
            .collect()
            .await;
        let mut ok = Vec::new();
        let mut bad = Vec::new();
        for (id, r) in results {
            match r {
                Ok(m) => ok.push(m),
                Err(e) => bad.push((id, e)),
            }
        }
        ok.sort_by(|a, b| a.created.cmp(&b.created).then(a.id.cmp(&b.id)));
        bad.sort_by_key(|(id, _)| *id);
        Ok((ok, bad))
    }

    /// Drops cached manifests of points no longer listed (or listed under another tag).
    fn catalog_prune(&self, listed: &[(PointId, Option<String>)]) {
        let keep: HashSet<String> = listed
            .iter()
            .filter_map(|(id, tag)| tag.as_ref().map(|t| catalog_leaf(id, t)))
            .collect();
        let Ok(dir) = std::fs::read_dir(self.catalog_dir()) else {
            return;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if !name.starts_with('.') && !keep.contains(&name) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    fn catalog_prune_point(&self, id: &PointId) {
        let prefix = format!("{id}-");
        let Ok(dir) = std::fs::read_dir(self.catalog_dir()) else {
            return;
        };
        for e in dir.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }

    /// Throws the local catalog away (it is rebuilt as points are read).
    pub fn clear_catalog(&self) {
        let _ = std::fs::remove_dir_all(self.catalog_dir());
    }

    /// Resolves a full id or a unique prefix of at least four hex digits.
    pub async fn resolve_point(&self, text: &str) -> Result<PointId> {
        if let Ok(id) = text.parse::<PointId>() {
            return Ok(id);
        }
        if text.len() < 4 || !text.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(Error::PointNotFound(text.into()));
        }
        let lower = text.to_ascii_lowercase();
        let matches: Vec<PointId> = self
            .list_point_ids()
            .await?
            .into_iter()
            .filter(|id| id.to_hex().starts_with(&lower))
            .collect();
        match matches.as_slice() {
            [one] => Ok(*one),
            [] => Err(Error::PointNotFound(text.into())),
            _ => Err(Error::AmbiguousPoint(text.into())),
        }
    }

    /// Marks a point protected: no retention policy removes it.
    pub async fn protect_point(&self, id: &PointId) -> Result<()> {
        if self.get_object(ObjectName::Point(*id)).await?.is_none() {
            return Err(Error::PointNotFound(id.to_hex()));
        }
        let rec = ProtectRecord {
            point: *id,
            created: crate::lease::now_rfc3339(),
        };
        self.put_sealed(ObjectName::Protected(*id), &rec, Write::Overwrite)
            .await
    }

    /// Removes a point's protection.
    pub async fn unprotect_point(&self, id: &PointId) -> Result<()> {
        self.delete_object(ObjectName::Protected(*id)).await
    }

    /// Points marked protected. A mark whose body does not authenticate is an error: it may
    /// stand for a point the user wants kept.
    pub async fn protected_points(&self) -> Result<HashSet<PointId>> {
        let mut out = HashSet::new();
        for l in self.list_objects(ObjectKind::Protected).await? {
            let ObjectName::Protected(id) = l.name else {
                continue;
            };
            if let Some(r) = self.get_sealed::<ProtectRecord>(l.name).await? {
                if r.point != id {
                    return Err(Error::tampered(l.name.to_string(), "names another point"));
                }
                out.insert(id);
            }
        }
        Ok(out)
    }
}
