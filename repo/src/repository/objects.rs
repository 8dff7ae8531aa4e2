//! Typed object I/O: the only place the repository turns [`ObjectName`]s into store requests.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{blocking, Repository};
use crate::objects::{Listed, ObjectKind, ObjectName};
use crate::storage::Write;
use crate::Result;

impl Repository {
    /// Stores an object's bytes.
    pub(crate) async fn put_object(
        &self,
        name: ObjectName,
        bytes: Bytes,
        write: Write,
    ) -> Result<()> {
        crate::test_hooks::step(&name, "write");
        self.storage.put(&name.path(), bytes, write).await
    }

    /// An object's bytes; `Ok(None)` when it does not exist.
    pub(crate) async fn get_object(&self, name: ObjectName) -> Result<Option<Bytes>> {
        match self.storage.get(&name.path()).await {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Seals `value` as `name`'s body (see [`ObjectName::seal_json`]) and stores it.
    pub(crate) async fn put_sealed<T: Serialize>(
        &self,
        name: ObjectName,
        value: &T,
        write: Write,
    ) -> Result<()> {
        let sealed = name.seal_json(&self.keys, value);
        self.put_object(name, Bytes::from(sealed), write).await
    }

    /// Reads and opens a sealed body; `Ok(None)` when the object does not exist.
    pub(crate) async fn get_sealed<T: DeserializeOwned + Send + 'static>(
        &self,
        name: ObjectName,
    ) -> Result<Option<T>> {
        let Some(bytes) = self.get_object(name).await? else {
            return Ok(None);
        };
        let keys = self.keys.clone();
        blocking(move || name.open_json(&keys, &bytes))
            .await?
            .map(Some)
    }

    /// Every object of `kind`, with sizes and store timestamps. Objects whose names do not parse
    /// as that kind are reported in the log and left out, never misread.
    pub async fn list_objects(&self, kind: ObjectKind) -> Result<Vec<Listed>> {
        let mut out = Vec::new();
        for o in self.storage.list_meta(kind.dir()).await? {
            match ObjectName::parse(kind, &o.name) {
                Some(name) => out.push(Listed {
                    name,
                    size: o.size,
                    modified_ms: o.modified_ms,
                    e_tag: o.e_tag,
                }),
                None => {
                    tracing::warn!(object = %o.name, "ignoring a stray object among {}s", kind.noun())
                }
            }
        }
        out.sort_by_key(|a| a.name);
        Ok(out)
    }

    /// An object's size and store timestamp, or `None` when it does not exist.
    pub async fn head_object(&self, name: ObjectName) -> Result<Option<Listed>> {
        Ok(self.storage.head_meta(&name.path()).await?.map(|o| Listed {
            name,
            size: o.size,
            modified_ms: o.modified_ms,
            e_tag: o.e_tag,
        }))
    }

    /// Deletes one object (already gone counts as deleted).
    pub(crate) async fn delete_object(&self, name: ObjectName) -> Result<()> {
        crate::test_hooks::step(&name, "delete");
        self.storage.delete(&name.path()).await
    }

    /// Deletes many objects, by multi-delete where the store has it. The test hook counts each
    /// object, so a kill can land between any two.
    pub(crate) async fn delete_objects(&self, names: &[ObjectName]) -> Result<()> {
        if crate::test_hooks::active() {
            for n in names {
                self.delete_object(*n).await?;
            }
            return Ok(());
        }
        let paths: Vec<String> = names.iter().map(ObjectName::path).collect();
        self.storage.delete_many(&paths).await
    }
}
