//! Keeping the local index in step with the repository: index segments, pack tables of contents,
//! packs that are gone.

use std::collections::HashSet;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;

use super::{blocking, Repository, SyncReport, SYNC_PARALLELISM, TOC_PROBE};
use crate::format::PACK_TRAILER_LEN;
use crate::objects::{ObjectKind, ObjectName};
use crate::segment::{self, PackRecord};
use crate::storage::Write;
use crate::{Error, IndexStats, PackEntry, PackId, Result, SegmentId};

impl Repository {
    /// Writes an index segment listing `packs` (already stored).
    pub async fn write_segment(&self, packs: &[PackRecord]) -> Result<SegmentId> {
        let id = SegmentId::random();
        let sealed = segment::seal(&self.keys, &id, packs);
        self.put_object(
            ObjectName::Segment(id),
            Bytes::from(sealed),
            Write::CreateUnique,
        )
        .await?;
        let index = self.index.clone();
        blocking(move || index.insert_segment(id)).await??;
        Ok(id)
    }

    /// lists every pack, reads the tables of contents of packs no segment covered (a backup killed
    /// before writing its segment) and forgets packs that are gone.
    pub async fn sync_index(&self, full: bool) -> Result<SyncReport> {
        let _guard = self.sync_lock.lock().await;
        let index = self.index.clone();
        blocking(move || index.catch_up()).await?;
        let mut report = SyncReport::default();

        let mut unseen = Vec::new();
        for l in self.list_objects(ObjectKind::Segment).await? {
            let ObjectName::Segment(id) = l.name else {
                continue;
            };
            if !self.index.has_segment(&id)? {
                unseen.push((id, l.modified_ms));
            }
        }
        // Oldest first, so that of two copies of a chunk the one written last is kept; absorbed
        // as they arrive, so memory holds a few segments, not every one a new host reads.
        unseen.sort_by_key(|(id, modified_ms)| (*modified_ms, *id));
        let (deleted, condemned) = {
            let m = self.maint.read().expect("maintenance state lock");
            (Arc::new(m.deleted.clone()), Arc::new(m.condemned.clone()))
        };
        let mut segments = futures::stream::iter(unseen)
            .map(|(id, _)| async move { (id, self.read_segment_if_any(&id).await) })
            .buffered(SYNC_PARALLELISM);
        while let Some((id, read)) = segments.next().await {
            match read {
                Ok(Some(packs)) => {
                    self.absorb_segment(id, packs, deleted.clone(), condemned.clone())
                        .await?;
                    report.segments_loaded += 1;
                }
                // A segment a prune retired or merged since the listing: every pack it named is
                // deleted or listed in the merged segment.
                Ok(None) => {}
                Err(e) if e.is_transient() => return Err(e),
                // Segments only spare reading pack tables: the packs of one that cannot be read
                // are indexed from their own tables (below), and every command goes on. Left
                // unmarked, it is tried again next time; verify reports it.
                Err(e) => {
                    tracing::warn!(segment = %id, error = %e, "index segment unreadable");
                    report
                        .unreadable_segments
                        .push(format!("index segment {id}: {e}"));
                }
            }
        }
        drop(segments);
        let full = full || !report.unreadable_segments.is_empty();

        if full {
            // What the index knew before the listing: a pack this process stores while the
            // listing runs is missing from it but must not be forgotten.
            let index = self.index.clone();
            let known = blocking(move || index.packs()).await??;
            let listed = self.list_packs().await?;
            let listed_ids: HashSet<PackId> = listed.iter().map(|(id, _)| *id).collect();
            // A pack a plan recorded deleted may still be listed (its prune stopped between
            // the plan and the deletion): its copies must not displace the ones the plan named.
            let missing: Vec<(PackId, u64)> = listed
                .into_iter()
                .filter(|(id, _)| !known.contains(id) && !deleted.contains(id))
                .collect();
            let results: Vec<(PackId, Result<Vec<PackEntry>>, u64)> =
                futures::stream::iter(missing)
                    .map(|(id, size)| async move { (id, self.read_toc(&id).await, size) })
                    .buffer_unordered(SYNC_PARALLELISM)
                    .collect()
                    .await;
            for (id, r, size) in results {
                match r {
                    Ok(entries) => {
                        let index = self.index.clone();
                        let condemned = condemned.clone();
                        blocking(move || index.insert_pack(id, size, &entries, &condemned))
                            .await??;
                        report.packs_read += 1;
                    }
                    // A store that failed after its retries says nothing about the pack: the
                    // command fails rather than go on as if its chunks did not exist.
                    Err(e) if e.is_transient() => return Err(e),
                    Err(e) => {
                        tracing::warn!(pack = %id, error = %e, "pack table of contents unreadable");
                        report.unreadable_packs.push(format!("pack {id}: {e}"));
                    }
                }
            }
            let gone: HashSet<PackId> = known.difference(&listed_ids).copied().collect();
            report.packs_forgotten = gone.len() as u64;
            let lost = self.unexplained(&gone, &deleted, &condemned).await?;
            let index = self.index.clone();
            let gone = Arc::new(gone);
            let g = gone.clone();
            report.lost_packs = blocking(move || index.mark_lost(&lost)).await??;
            for l in &report.lost_packs {
                tracing::error!(
                    pack = %l.pack,
                    blobs = l.blobs.len(),
                    "pack gone from the repository though no prune deleted it; its chunks are \
                     treated as damaged (run verify)"
                );
            }
            let index = self.index.clone();
            blocking(move || index.remove_packs(&g)).await??;
        }
        Ok(report)
    }

    /// The packs of `gone` that no plan deleted or condemned (those a prune deletes are in a plan
    /// before they go) and that are really absent, not just missing from a listing that lags.
    async fn unexplained(
        &self,
        gone: &HashSet<PackId>,
        deleted: &HashSet<PackId>,
        condemned: &HashSet<PackId>,
    ) -> Result<HashSet<PackId>> {
        // Owned ids: a stream of borrowed ones makes the future not `Send`.
        let suspects: Vec<PackId> = gone
            .iter()
            .filter(|id| !deleted.contains(*id) && !condemned.contains(*id) && !self.is_deleted(id))
            .copied()
            .collect();
        let storage = &self.storage;
        let heads: Vec<(PackId, Result<bool>)> = futures::stream::iter(suspects)
            .map(|id| async move {
                let head = storage.head(&ObjectName::Pack(id).path()).await;
                (id, head.map(|h| h.is_none()))
            })
            .buffer_unordered(SYNC_PARALLELISM)
            .collect()
            .await;
        let mut out = HashSet::new();
        for (id, absent) in heads {
            if absent? {
                out.insert(id);
            }
        }
        Ok(out)
    }

    /// Puts one segment's packs into the local index. A pack a plan recorded as deleted stays
    /// out, whatever an old or replayed segment says; a condemned pack's copy of a chunk never
    /// replaces a copy elsewhere.
    pub(crate) async fn absorb_segment(
        &self,
        id: SegmentId,
        packs: Vec<PackRecord>,
        deleted: Arc<HashSet<PackId>>,
        condemned: Arc<HashSet<PackId>>,
    ) -> Result<()> {
        let index = self.index.clone();
        blocking(move || -> Result<()> {
            for p in &packs {
                if !deleted.contains(&p.id) {
                    index.insert_pack(p.id, p.size, &p.entries, &condemned)?;
                }
            }
            index.insert_segment(id)
        })
        .await?
    }

    /// Packs this host found gone though no plan deleted them, not yet named by a verify record
    /// (see `LocalIndex::mark_lost`).
    pub async fn lost_packs(&self) -> Result<Vec<crate::LostPack>> {
        let index = self.index.clone();
        blocking(move || index.lost_packs()).await?
    }

    /// Called once a verify record names `packs` as lost: every host learns it from the record.
    pub async fn forget_lost_packs(&self, packs: Vec<PackId>) -> Result<()> {
        let index = self.index.clone();
        blocking(move || index.forget_lost(&packs)).await?
    }

    /// Throws the local index away and reads it back from the repository.
    pub async fn rebuild_index(&self) -> Result<SyncReport> {
        {
            let _guard = self.sync_lock.lock().await;
            let index = self.index.clone();
            let id = self.config.id.clone();
            blocking(move || index.clear(&id)).await??;
        }
        self.sync_verify_records().await?;
        self.sync_index(true).await
    }

    pub async fn index_stats(&self) -> Result<IndexStats> {
        let index = self.index.clone();
        blocking(move || index.stats()).await?
    }

    /// Every pack in the repository with its size.
    pub async fn list_packs(&self) -> Result<Vec<(PackId, u64)>> {
        Ok(self
            .list_objects(ObjectKind::Pack)
            .await?
            .into_iter()
            .filter_map(|l| match l.name {
                ObjectName::Pack(id) => Some((id, l.size)),
                _ => None,
            })
            .collect())
    }

    /// Reads a pack's table of contents from its tail.
    pub async fn read_toc(&self, id: &PackId) -> Result<Vec<PackEntry>> {
        let path = ObjectName::Pack(*id).path();
        let (tail, size) = self.storage.get_suffix(&path, TOC_PROBE).await?;
        if (tail.len() as u64) < (PACK_TRAILER_LEN as u64).min(size)
            || tail.len() < PACK_TRAILER_LEN
        {
            return Err(Error::malformed(
                format!("pack {id}"),
                format!("{size} bytes is too short"),
            ));
        }
        let toc_len =
            crate::pack::parse_trailer(id, size, &tail[tail.len() - PACK_TRAILER_LEN..])? as u64;
        let need = toc_len + PACK_TRAILER_LEN as u64;
        let sealed = if need <= tail.len() as u64 {
            tail.slice(tail.len() - need as usize..tail.len() - PACK_TRAILER_LEN)
        } else {
            let end = size - PACK_TRAILER_LEN as u64;
            self.storage.get_range(&path, end - toc_len..end).await?
        };
        let keys = self.keys.clone();
        let id = *id;
        blocking(move || crate::pack::open_toc(&keys, &id, size, &sealed)).await?
    }
}

impl Repository {
    /// Reads one index segment: the packs it lists with their full tables of contents.
    pub async fn read_segment(&self, id: &SegmentId) -> Result<Vec<PackRecord>> {
        self.read_segment_if_any(id).await?.ok_or_else(|| {
            Error::malformed(ObjectName::Segment(*id).to_string(), "listed but gone")
        })
    }

    /// Reads one index segment; `None` when it does not exist.
    pub(crate) async fn read_segment_if_any(
        &self,
        id: &SegmentId,
    ) -> Result<Option<Vec<PackRecord>>> {
        let Some(bytes) = self.get_object(ObjectName::Segment(*id)).await? else {
            return Ok(None);
        };
        let keys = self.keys.clone();
        let id = *id;
        blocking(move || segment::open(&keys, &id, &bytes))
            .await?
            .map(Some)
    }

    /// Every index segment's id.
    pub async fn list_segments(&self) -> Result<Vec<SegmentId>> {
        Ok(self
            .list_objects(ObjectKind::Segment)
            .await?
            .into_iter()
            .filter_map(|l| match l.name {
                ObjectName::Segment(id) => Some(id),
                _ => None,
            })
            .collect())
    }
}
