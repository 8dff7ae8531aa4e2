//! What prune rewrites of what it keeps: repacking partly dead packs (their live blobs copied,
//! still sealed, into new packs) and merging small index segments. Both write new objects only;
//! the old ones are condemned or retired by the plan that names the new ones (`prune.rs`), so a
//! run killed half-way leaves extra copies and nothing missing.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;

use blockvault_repo::{ChunkId, PackBuilder, PackId, PackRecord, Repository, SegmentId};

use crate::gc::PackUsage;
use crate::prune::{PruneOptions, PruneReport};
use crate::{Error, Result};

/// Packs a repack downloads and checks ahead of the one it is writing out.
const PREFETCH: usize = 3;

/// What a repack wrote: the packs it emptied (to condemn) and the segment listing the new ones.
pub(crate) struct Repacked {
    pub packs: Vec<PackUsage>,
    pub segment: Option<SegmentId>,
}

/// Copies the chunks in `to_copy` out of `packs` (each checked, moved still sealed) into new
/// packs, then writes one index segment for them. A pack whose wanted blobs cannot be read or
/// fail their check is left as it is and named in `report.repack_skipped`; the packs returned
/// are those whose every chunk in `to_copy` now has a new copy.
pub(crate) async fn copy_live(
    repo: &Arc<Repository>,
    packs: &[PackUsage],
    live_in: &HashMap<PackId, Vec<ChunkId>>,
    mut to_copy: HashSet<ChunkId>,
    opts: &PruneOptions,
    report: &mut PruneReport,
) -> Result<Repacked> {
    // Each chunk is copied from the first chosen pack that holds it. A pack that cannot be
    // copied is kept whole, so the chunks given to it keep a home that is not condemned.
    let mut jobs = Vec::with_capacity(packs.len());
    for p in packs {
        let mut wanted = HashSet::new();
        for id in &live_in[&p.id] {
            if to_copy.remove(id) {
                wanted.insert(*id);
            }
        }
        jobs.push((p.clone(), wanted));
    }
    // Packs are downloaded and checked ahead of the one being written out (in order, so the
    // writes are the same whatever the timing).
    let mut fetched = futures::stream::iter(jobs)
        .map(|(p, wanted)| {
            let repo = repo.clone();
            tokio::spawn(async move {
                let blobs = if wanted.is_empty() {
                    Ok(None)
                } else {
                    repo.copy_out(&p.id, wanted).await.map(Some)
                };
                (p, blobs)
            })
        })
        .buffered(PREFETCH);
    let mut emptied = Vec::new();
    let mut records = Vec::new();
    let mut builder = PackBuilder::new(opts.pack_size);
    while let Some(joined) = fetched.next().await {
        let (p, blobs) = joined.map_err(Error::task)?;
        let blobs = match blobs {
            Ok(b) => b,
            Err(e) => {
                tracing::warn!(pack = %p.id, error = %e, "not repacked");
                report.repack_skipped.push(format!("pack {}: {e}", p.id));
                continue;
            }
        };
        for (entry, bytes) in blobs.iter().flat_map(|b| b.blobs()) {
            if !builder.has_room(bytes.len(), opts.pack_size) {
                let full = std::mem::replace(&mut builder, PackBuilder::new(opts.pack_size));
                records.push(store(repo, full, report).await?);
            }
            builder.add_sealed(entry, bytes);
        }
        emptied.push(p);
    }
    if !builder.is_empty() {
        records.push(store(repo, builder, report).await?);
    }
    let segment = if records.is_empty() {
        None
    } else {
        Some(repo.write_segment(&records).await?)
    };
    blockvault_repo::test_hold("prune-after-repack").await;
    Ok(Repacked {
        packs: emptied,
        segment,
    })
}

async fn store(
    repo: &Arc<Repository>,
    builder: PackBuilder,
    report: &mut PruneReport,
) -> Result<PackRecord> {
    let sealed = repo.seal_pack(builder);
    repo.store_pack(&sealed).await?;
    report.repack_written.add(sealed.bytes.len() as u64);
    Ok(sealed.record())
}

/// Writes one merged segment per group: the records of every pack the group's segments name
/// that stays (`records`). Returns the new segments' ids.
pub(crate) async fn merge_segments(
    repo: &Arc<Repository>,
    groups: &[Vec<SegmentId>],
    named: &HashMap<SegmentId, Vec<PackId>>,
    records: &(dyn Fn(&PackId) -> Option<PackRecord> + Sync),
) -> Result<Vec<SegmentId>> {
    let mut written = Vec::new();
    for group in groups {
        let mut seen = HashSet::new();
        let merged: Vec<PackRecord> = group
            .iter()
            .flat_map(|s| named[s].iter())
            .filter(|p| seen.insert(**p))
            .filter_map(records)
            .collect();
        if !merged.is_empty() {
            written.push(repo.write_segment(&merged).await?);
        }
    }
    Ok(written)
}
