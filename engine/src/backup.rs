//! The backup pipeline: ranges to read -> chunks -> zero check, keyed hash, dedup -> zstd + AES-GCM
//! -> packs -> object store -> chunk-map pages -> manifest.
//!
//! Threads, not tasks, do the CPU work: one reader (sequential preads keep the source's readahead
//! effective), `workers` hashing/compressing threads, and one collector that owns the open pack and
//! the chunk-map pages. Uploads run on the tokio runtime, at most `uploads_in_flight` at once. Every
//! queue is bounded, so memory stays flat whatever the disk size:
//! about `(2 + uploads_in_flight) * pack_size + 4 * workers * chunk_size`.
//!
//! Crash consistency comes from ordering: a pack is stored (create-only, fsynced) before its chunks
//! enter the local index; all packs are stored before the index segment; the manifest is written
//! last. A backup killed anywhere leaves at most unreferenced packs, which the next backup reuses
//! through the index.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use blockvault_chunker::{is_zero, ChunkLayout, RangeSet};
use blockvault_repo::{
    page_slots, BackupKind, BlobKind, ChunkId, ChunkIdHex, ChunkMapPage, DiskManifest, DiskStats,
    EncodedBlob, LeaseKind, PackBuilder, PackId, PackRecord, PointId, PointManifest, Repository,
    SLOTS_PER_PAGE,
};
use crossbeam_channel::{bounded, Receiver, Sender};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;

use crate::progress::Progress;
use crate::{DiskSource, Error, Result};

/// Tuning of one backup run. Defaults suit a local repository on a 2-core machine.
#[derive(Clone, Debug)]
pub struct BackupOptions {
    pub vm: String,
    pub tags: Vec<String>,
    pub host: String,
    /// Threads hashing, compressing and encrypting chunks.
    pub workers: usize,
    /// Target size of a pack object.
    pub pack_size: usize,
    /// Packs being uploaded at once.
    pub uploads_in_flight: usize,
    /// Packs per index segment.
    pub packs_per_segment: usize,
    /// VM configuration files to keep in the point: (name, contents).
    pub configs: Vec<(String, Vec<u8>)>,
    /// Cancelling stops the backup before its restore point is written: its threads stop
    /// reading, the uploads in flight land, and `backup` returns [`Error::Cancelled`] once
    /// nothing of it runs any more (a caller may then release its snapshots).
    pub cancel: CancellationToken,
}

impl BackupOptions {
    pub fn new(vm: impl Into<String>) -> Self {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        Self {
            vm: vm.into(),
            tags: Vec::new(),
            host: String::new(),
            workers: cores.max(1),
            pack_size: 16 << 20,
            uploads_in_flight: 2,
            packs_per_segment: 64,
            configs: Vec::new(),
            cancel: CancellationToken::new(),
        }
    }
}

/// Stops the pipeline's threads when `backup`'s future is dropped before it ends: a caller that
/// gave up must not leave them reading disks and uploading packs behind its back.
struct StopWhenDropped {
    abort: Arc<Abort>,
    watcher: tokio::task::AbortHandle,
}

impl Drop for StopWhenDropped {
    fn drop(&mut self) {
        self.abort.fail(Error::Cancelled);
        self.watcher.abort();
    }
}

/// What to read from one disk.
#[derive(Clone, Debug)]
pub enum ReadPlan {
    /// Read every allocated range. `reason` says why, when an incremental was asked for.
    Full { reason: Option<String> },
    /// Read only `changed` (rounded outward to chunks); every other chunk comes from the parent's
    /// chunk map.
    Incremental {
        parent: PointId,
        parent_pages: Vec<Option<ChunkId>>,
        changed: RangeSet,
    },
}

/// One disk of a restore point.
pub struct DiskJob {
    pub name: String,
    pub source: Arc<dyn DiskSource>,
    pub plan: ReadPlan,
    pub rct_id: Option<String>,
    pub consistency: Option<String>,
}

/// The finished point.
#[derive(Debug, Clone)]
pub struct BackupOutcome {
    pub manifest: PointManifest,
}

struct Work {
    disk: usize,
    slot: u64,
    data: Vec<u8>,
}

enum Outcome {
    Zero,
    Known(ChunkId),
    New(EncodedBlob),
}

struct Done {
    disk: usize,
    slot: u64,
    len: u32,
    outcome: Outcome,
}

/// Per-disk state the collector keeps.
struct DiskState {
    name: String,
    layout: ChunkLayout,
    to_read: RangeSet,
    kind: BackupKind,
    full_reason: Option<String>,
    parent: Option<PointId>,
    /// Final page ids; pages still being assembled hold their parent's id until finalised.
    pages: Vec<Option<ChunkId>>,
    /// Chunks still expected per page being assembled.
    remaining: HashMap<u64, u32>,
    open: HashMap<u64, ChunkMapPage>,
    stats: DiskStats,
}

/// First error wins; everyone else stops at the next check.
#[derive(Default)]
struct Abort {
    flag: AtomicBool,
    error: Mutex<Option<Error>>,
}

impl Abort {
    fn fail(&self, e: Error) {
        let mut slot = self.error.lock().expect("abort lock");
        if slot.is_none() {
            *slot = Some(e);
        }
        self.flag.store(true, Ordering::SeqCst);
    }

    fn is_set(&self) -> bool {
        self.flag.load(Ordering::Relaxed)
    }

    fn take(&self) -> Option<Error> {
        self.error.lock().expect("abort lock").take()
    }
}

/// Chunks stored during this run whose pack is not yet in the index: dedup within a run.
type InFlight = Arc<Mutex<HashSet<ChunkId>>>;

/// Packs this run relies on: its own new packs and the packs of every chunk it deduplicated
/// against. Checked against newer maintenance plans before the manifest is written.
type Relied = Arc<Mutex<HashSet<PackId>>>;

/// True when `id` is already stored or being stored; otherwise claims it for this caller. A
/// chunk found stored records its pack as relied on; packs a maintenance plan condemns are not
/// used (the chunk is stored again).
fn claim(repo: &Repository, inflight: &InFlight, relied: &Relied, id: ChunkId) -> Result<bool> {
    if let Some(loc) = repo.lookup_for_dedup(&id)? {
        relied.lock().expect("relied lock").insert(loc.pack);
        return Ok(false);
    }
    Ok(inflight.lock().expect("in-flight lock").insert(id))
}

fn plan_disk(repo: &Repository, job: &DiskJob) -> Result<DiskState> {
    let size = job.source.size();
    let layout = ChunkLayout::new(repo.chunk_size(), size).map_err(|e| Error::Disk {
        disk: job.name.clone(),
        detail: e.to_string(),
    })?;
    let page_count = layout.chunk_count().div_ceil(SLOTS_PER_PAGE as u64) as usize;
    let chunk = repo.chunk_size() as u64;
    let (kind, full_reason, parent, base, to_read) = match &job.plan {
        ReadPlan::Incremental {
            parent,
            parent_pages,
            changed,
        } if parent_pages.len() == page_count => (
            BackupKind::Incremental,
            None,
            Some(*parent),
            parent_pages.clone(),
            changed.round_out(chunk, size),
        ),
        ReadPlan::Incremental { parent_pages, .. } => {
            let reason = format!(
                "parent chunk map has {} pages, the disk now needs {page_count} (size changed)",
                parent_pages.len()
            );
            full_plan(job, size, chunk, page_count, Some(reason))?
        }
        ReadPlan::Full { reason } => full_plan(job, size, chunk, page_count, reason.clone())?,
    };
    let mut remaining: HashMap<u64, u32> = HashMap::new();
    for r in to_read.ranges() {
        let slots = layout.chunks_of(r.clone());
        let mut s = slots.start;
        while s < slots.end {
            let page = s / SLOTS_PER_PAGE as u64;
            let page_end = ((page + 1) * SLOTS_PER_PAGE as u64).min(slots.end);
            *remaining.entry(page).or_default() += (page_end - s) as u32;
            s = page_end;
        }
    }
    Ok(DiskState {
        name: job.name.clone(),
        layout,
        to_read,
        kind,
        full_reason,
        parent,
        pages: base,
        remaining,
        open: HashMap::new(),
        stats: DiskStats::default(),
    })
}

type Plan = (
    BackupKind,
    Option<String>,
    Option<PointId>,
    Vec<Option<ChunkId>>,
    RangeSet,
);

fn full_plan(
    job: &DiskJob,
    size: u64,
    chunk: u64,
    pages: usize,
    reason: Option<String>,
) -> Result<Plan> {
    let allocated = job.source.allocated().map_err(|source| Error::Source {
        disk: job.name.clone(),
        offset: 0,
        source,
    })?;
    Ok((
        BackupKind::Full,
        reason,
        None,
        vec![None; pages],
        allocated.round_out(chunk, size),
    ))
}

/// Takes one restore point of a VM from `jobs` (one per disk).
pub async fn backup(
    repo: Arc<Repository>,
    jobs: Vec<DiskJob>,
    opts: BackupOptions,
    progress: Arc<Progress>,
) -> Result<BackupOutcome> {
    if jobs.is_empty() {
        return Err(Error::Invalid("a backup needs at least one disk".into()));
    }
    let mut names = HashSet::new();
    for j in &jobs {
        if !names.insert(j.name.clone()) {
            return Err(Error::Invalid(format!(
                "disk name '{}' given twice",
                j.name
            )));
        }
    }
    let started = Instant::now();
    let created = time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default();
    // The lease first, then the plans: any plan published after this point is newer than the
    // start epoch and is checked before the manifest is written.
    let lease = repo.take_lease(LeaseKind::Backup).await?;
    repo.refresh_plans().await?;
    let start_epoch = repo.maintenance_epoch();
    let mut jobs = jobs;
    for job in &mut jobs {
        crate::commit::revalidate_parent(&repo, job).await?;
    }
    let handle = Handle::current();
    let relied: Relied = Arc::default();
    let abort = Arc::new(Abort::default());
    let watcher = {
        let (cancel, abort) = (opts.cancel.clone(), abort.clone());
        tokio::spawn(async move {
            cancel.cancelled().await;
            abort.fail(Error::Cancelled);
        })
    };
    let _stop = StopWhenDropped {
        abort: abort.clone(),
        watcher: watcher.abort_handle(),
    };
    let (r2, o2, rel2) = (repo.clone(), opts.clone(), relied.clone());
    let (disks, configs) = tokio::task::spawn_blocking(move || {
        run_pipeline(r2, jobs, &o2, progress, handle, rel2, abort)
    })
    .await
    .map_err(Error::task)??;
    if opts.cancel.is_cancelled() {
        return Err(Error::Cancelled);
    }
    let manifest = PointManifest {
        version: 1,
        id: PointId::random(),
        vm: opts.vm.clone(),
        host: opts.host.clone(),
        created,
        tags: opts.tags.clone(),
        chunk_size: repo.chunk_size(),
        slots_per_page: SLOTS_PER_PAGE,
        disks,
        configs,
        duration_ms: started.elapsed().as_millis() as u64,
    };
    blockvault_repo::test_hold("backup-before-commit").await;
    let relied = std::mem::take(&mut *relied.lock().expect("relied lock"));
    crate::commit::commit(&repo, &manifest, start_epoch, relied).await?;
    if let Err(e) = lease.release().await {
        tracing::warn!(error = %e, "could not delete the backup's lease (it expires by itself)");
    }
    Ok(BackupOutcome { manifest })
}

/// The collector's handle on packs and uploads.
struct Packer {
    repo: Arc<Repository>,
    handle: Handle,
    pack: PackBuilder,
    pack_size: usize,
    uploads: Vec<tokio::task::JoinHandle<Result<()>>>,
    permits: Arc<tokio::sync::Semaphore>,
    segment_tx: Option<tokio::sync::mpsc::UnboundedSender<PackRecord>>,
    inflight: InFlight,
    relied: Relied,
    abort: Arc<Abort>,
    progress: Arc<Progress>,
    last_sync: Instant,
    syncing: Arc<AtomicBool>,
}

/// How often a running backup looks for what concurrent writers stored (one listing of `index/`),
/// so it can deduplicate against them.
const SYNC_INTERVAL: std::time::Duration = std::time::Duration::from_millis(250);

impl Packer {
    /// Starts a background index sync (new segments, the primary's writes) when one is due.
    fn maybe_sync(&mut self) {
        if self.last_sync.elapsed() < SYNC_INTERVAL || self.syncing.swap(true, Ordering::SeqCst) {
            return;
        }
        self.last_sync = Instant::now();
        let (repo, syncing) = (self.repo.clone(), self.syncing.clone());
        self.handle.spawn(async move {
            if let Err(e) = repo.sync_index(false).await {
                tracing::debug!(error = %e, "background index sync failed");
            }
            syncing.store(false, Ordering::SeqCst);
        });
    }

    /// Appends a blob, first sending the open pack off when the blob would overflow it.
    fn add(&mut self, blob: &EncodedBlob) {
        if !self.pack.has_room(blob.bytes.len(), self.pack_size) {
            self.flush();
        }
        self.pack.add(blob);
        Progress::add(&self.progress.bytes_stored, blob.bytes.len() as u64);
    }

    /// Seals the open pack and starts its upload, waiting for a slot first so at most
    /// `uploads_in_flight` packs sit in memory.
    fn flush(&mut self) {
        if self.pack.is_empty() {
            return;
        }
        self.reap_uploads();
        let builder = std::mem::replace(&mut self.pack, PackBuilder::new(self.pack_size));
        let sealed = self.repo.seal_pack(builder);
        let permit = match self.handle.block_on(self.permits.clone().acquire_owned()) {
            Ok(p) => p,
            // The semaphore is never closed; if it were, the pack could not be stored.
            Err(_) => return self.abort.fail(Error::Cancelled),
        };
        let (repo, inflight, abort) =
            (self.repo.clone(), self.inflight.clone(), self.abort.clone());
        self.relied.lock().expect("relied lock").insert(sealed.id);
        let segment_tx = self.segment_tx.clone();
        self.uploads.push(self.handle.spawn(async move {
            let _permit = permit;
            if let Err(e) = repo.store_pack(&sealed).await {
                // The error names the pack object; the first failure is what the user sees.
                abort.fail(e.into());
                return Err(Error::Cancelled);
            }
            // Now in the index: later lookups find these chunks there.
            let mut set = inflight.lock().expect("in-flight lock");
            for e in &sealed.entries {
                set.remove(&e.id);
            }
            drop(set);
            if let Some(tx) = segment_tx {
                let _ = tx.send(sealed.record());
            }
            Ok(())
        }));
    }

    /// Joins the uploads that have finished, keeping their errors: a finished task keeps its
    /// allocation until joined, so holding every handle to the end made memory grow with the
    /// number of packs (hundreds of thousands in a multi-terabyte backup).
    fn reap_uploads(&mut self) {
        let mut i = 0;
        while i < self.uploads.len() {
            if !self.uploads[i].is_finished() {
                i += 1;
                continue;
            }
            match self.handle.block_on(self.uploads.swap_remove(i)) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => self.abort.fail(e),
                Err(e) => self.abort.fail(Error::task(e)),
            }
        }
    }

    /// Stores `data` as a blob of `kind` unless it is already stored; returns its id and whether
    /// it was new.
    fn store(&mut self, kind: BlobKind, data: &[u8]) -> Result<(ChunkId, bool)> {
        let id = self.repo.chunk_id(data);
        if !claim(&self.repo, &self.inflight, &self.relied, id)? {
            return Ok((id, false));
        }
        let blob = self.repo.encode_blob(kind, id, data);
        self.add(&blob);
        Ok((id, true))
    }
}

fn run_pipeline(
    repo: Arc<Repository>,
    jobs: Vec<DiskJob>,
    opts: &BackupOptions,
    progress: Arc<Progress>,
    handle: Handle,
    relied: Relied,
    abort: Arc<Abort>,
) -> Result<(Vec<DiskManifest>, Vec<blockvault_repo::ConfigFile>)> {
    let mut disks: Vec<DiskState> = jobs
        .iter()
        .map(|j| plan_disk(&repo, j))
        .collect::<Result<_>>()?;
    let total: u64 = disks.iter().map(|d| d.to_read.total_len()).sum();
    progress
        .bytes_total
        .store(total, std::sync::atomic::Ordering::Relaxed);

    let inflight: InFlight = Arc::default();
    let chunk_size = repo.chunk_size() as usize;
    let workers = opts.workers.max(1);
    let (work_tx, work_rx) = bounded::<Work>(workers * 2);
    let (done_tx, done_rx) = bounded::<Done>(workers * 2);
    let (pool_tx, pool_rx) = bounded::<Vec<u8>>(workers * 4 + 2);

    // Index segments are written by one task as packs land.
    let (segment_tx, mut segment_rx) = tokio::sync::mpsc::unbounded_channel::<PackRecord>();
    let seg_repo = repo.clone();
    let per_segment = opts.packs_per_segment.max(1);
    let segment_task = handle.spawn(async move {
        let mut batch = Vec::new();
        while let Some(rec) = segment_rx.recv().await {
            batch.push(rec);
            if batch.len() >= per_segment {
                seg_repo.write_segment(&batch).await?;
                batch.clear();
            }
        }
        if !batch.is_empty() {
            seg_repo.write_segment(&batch).await?;
        }
        Ok::<_, blockvault_repo::Error>(())
    });

    let sources: Vec<(String, Arc<dyn DiskSource>)> = jobs
        .iter()
        .map(|j| (j.name.clone(), j.source.clone()))
        .collect();
    let reads: Vec<(ChunkLayout, RangeSet)> = disks
        .iter()
        .map(|d| (d.layout, d.to_read.clone()))
        .collect();

    std::thread::scope(|scope| -> Result<_> {
        // Reader.
        {
            let (abort, progress, pool_rx) = (abort.clone(), progress.clone(), pool_rx.clone());
            scope.spawn(move || {
                read_all(
                    &sources, &reads, chunk_size, &work_tx, &pool_rx, &abort, &progress,
                );
            });
        }
        // Workers.
        for _ in 0..workers {
            let (repo, inflight, abort) = (repo.clone(), inflight.clone(), abort.clone());
            let relied = relied.clone();
            let (work_rx, done_tx, pool_tx) = (work_rx.clone(), done_tx.clone(), pool_tx.clone());
            let progress = progress.clone();
            scope.spawn(move || {
                process_chunks(
                    &repo, &inflight, &relied, &abort, &progress, &work_rx, &done_tx, &pool_tx,
                )
            });
        }
        drop(done_tx);
        drop(work_rx);

        let mut packer = Packer {
            repo: repo.clone(),
            handle: handle.clone(),
            pack: PackBuilder::new(opts.pack_size),
            pack_size: opts.pack_size,
            uploads: Vec::new(),
            permits: Arc::new(tokio::sync::Semaphore::new(opts.uploads_in_flight.max(1))),
            segment_tx: Some(segment_tx),
            inflight: inflight.clone(),
            relied: relied.clone(),
            abort: abort.clone(),
            progress: progress.clone(),
            last_sync: Instant::now(),
            syncing: Arc::default(),
        };

        let configs = store_configs(&mut packer, &opts.configs, chunk_size);
        if let Err(e) = &configs {
            abort.fail(Error::Invalid(e.to_string()));
        }
        for done in done_rx.iter() {
            if abort.is_set() {
                continue;
            }
            packer.maybe_sync();
            if let Err(e) = collect(&mut packer, &mut disks[done.disk], done) {
                abort.fail(e);
            }
        }
        if !abort.is_set() {
            for d in &disks {
                if let Err(e) = check_all_pages_done(d) {
                    abort.fail(e);
                    break;
                }
            }
        }
        if !abort.is_set() {
            packer.flush();
        }
        // Every upload must land before the segment and the manifest.
        let uploads = std::mem::take(&mut packer.uploads);
        for u in uploads {
            match handle.block_on(u) {
                Ok(Ok(())) => {}
                Ok(Err(e)) => abort.fail(e),
                Err(e) => abort.fail(Error::task(e)),
            }
        }
        packer.segment_tx = None;
        match handle.block_on(segment_task) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => abort.fail(e.into()),
            Err(e) => abort.fail(Error::task(e)),
        }
        if let Some(e) = abort.take() {
            return Err(e);
        }
        let configs = configs?;
        let manifests = disks
            .into_iter()
            .zip(jobs.iter())
            .map(|(d, job)| DiskManifest {
                name: d.name,
                size: d.layout.disk_size(),
                source: job.source.describe(),
                pages: d.pages.into_iter().map(|p| p.map(ChunkIdHex)).collect(),
                kind: d.kind,
                full_reason: d.full_reason,
                parent: d.parent,
                rct_id: job.rct_id.clone(),
                consistency: job.consistency.clone(),
                stats: d.stats,
            })
            .collect();
        Ok((manifests, configs))
    })
}

fn read_all(
    sources: &[(String, Arc<dyn DiskSource>)],
    reads: &[(ChunkLayout, RangeSet)],
    chunk_size: usize,
    work_tx: &Sender<Work>,
    pool_rx: &Receiver<Vec<u8>>,
    abort: &Abort,
    progress: &Progress,
) {
    for (disk, ((name, source), (layout, ranges))) in sources.iter().zip(reads).enumerate() {
        for r in ranges.ranges() {
            for slot in layout.chunks_of(r.clone()) {
                if abort.is_set() {
                    return;
                }
                let range = layout.chunk_range(slot);
                let mut data = pool_rx
                    .try_recv()
                    .unwrap_or_else(|_| Vec::with_capacity(chunk_size));
                data.resize((range.end - range.start) as usize, 0);
                if let Err(source) = source.read_at(range.start, &mut data) {
                    abort.fail(Error::Source {
                        disk: name.clone(),
                        offset: range.start,
                        source,
                    });
                    return;
                }
                Progress::add(&progress.bytes_done, data.len() as u64);
                if work_tx.send(Work { disk, slot, data }).is_err() {
                    return;
                }
            }
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn process_chunks(
    repo: &Repository,
    inflight: &InFlight,
    relied: &Relied,
    abort: &Abort,
    progress: &Progress,
    work_rx: &Receiver<Work>,
    done_tx: &Sender<Done>,
    pool_tx: &Sender<Vec<u8>>,
) {
    for w in work_rx.iter() {
        if abort.is_set() {
            continue;
        }
        let len = w.data.len() as u32;
        let outcome = if is_zero(&w.data) {
            Ok(Outcome::Zero)
        } else {
            let id = repo.chunk_id(&w.data);
            match claim(repo, inflight, relied, id) {
                Ok(false) => Ok(Outcome::Known(id)),
                Ok(true) => {
                    Progress::add(&progress.bytes_new, len as u64);
                    Ok(Outcome::New(repo.encode_blob(BlobKind::Data, id, &w.data)))
                }
                Err(e) => Err(e),
            }
        };
        let _ = pool_tx.try_send(w.data);
        match outcome {
            Ok(outcome) => {
                if done_tx
                    .send(Done {
                        disk: w.disk,
                        slot: w.slot,
                        len,
                        outcome,
                    })
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => abort.fail(e),
        }
    }
}

fn store_configs(
    packer: &mut Packer,
    configs: &[(String, Vec<u8>)],
    piece: usize,
) -> Result<Vec<blockvault_repo::ConfigFile>> {
    let mut out = Vec::new();
    for (name, data) in configs {
        let mut blobs = Vec::new();
        for part in data.chunks(piece) {
            blobs.push(ChunkIdHex(packer.store(BlobKind::File, part)?.0));
        }
        out.push(blockvault_repo::ConfigFile {
            name: name.clone(),
            size: data.len() as u64,
            blobs,
        });
    }
    Ok(out)
}

fn collect(packer: &mut Packer, d: &mut DiskState, done: Done) -> Result<()> {
    let page_no = done.slot / SLOTS_PER_PAGE as u64;
    if !d.open.contains_key(&page_no) {
        let slots = page_slots(d.layout.chunk_count(), page_no);
        let page = match d.pages[page_no as usize] {
            Some(id) if d.kind == BackupKind::Incremental => {
                packer.handle.block_on(packer.repo.load_page(&id, slots))?
            }
            _ => ChunkMapPage::zeros(slots),
        };
        d.open.insert(page_no, page);
    }
    let page = d.open.get_mut(&page_no).expect("page just opened");
    d.stats.bytes_read += done.len as u64;
    let entry = &mut page.slots[(done.slot % SLOTS_PER_PAGE as u64) as usize];
    match done.outcome {
        Outcome::Zero => {
            d.stats.zero_chunks += 1;
            *entry = None;
        }
        Outcome::Known(id) => {
            d.stats.dedup_chunks += 1;
            *entry = Some(id);
        }
        Outcome::New(blob) => {
            d.stats.new_chunks += 1;
            d.stats.bytes_new += done.len as u64;
            d.stats.bytes_stored += blob.bytes.len() as u64;
            *entry = Some(blob.id);
            packer.add(&blob);
        }
    }
    let left = d.remaining.get_mut(&page_no).expect("page was planned");
    *left -= 1;
    if *left == 0 {
        d.remaining.remove(&page_no);
        let page = d.open.remove(&page_no).expect("page is open");
        d.pages[page_no as usize] = finish_page(packer, &page)?;
    }
    Ok(())
}

/// Stores a completed page; an all-zero page is recorded as `None` and not stored.
fn finish_page(packer: &mut Packer, page: &ChunkMapPage) -> Result<Option<ChunkId>> {
    if page.is_all_zero() {
        return Ok(None);
    }
    Ok(Some(packer.store(BlobKind::Page, &page.encode())?.0))
}

/// After the last chunk, no page may still be waiting; if one is, a chunk went missing.
fn check_all_pages_done(d: &DiskState) -> Result<()> {
    if let Some((page, left)) = d.remaining.iter().next() {
        return Err(Error::Disk {
            disk: d.name.clone(),
            detail: format!("internal: page {page} still waits for {left} chunks"),
        });
    }
    Ok(())
}
