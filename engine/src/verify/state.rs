//! What earlier verification runs found, merged from the repository's verify records: per pack the
//! latest whole read (its run, time, damaged blobs, table damage), per blob the latest partial
//! read, and the run numbers rotations count by.

use std::collections::{BTreeMap, HashMap};

use blockvault_repo::{
    DamagedBlob, DiskDamage, Error as RepoError, Location, PackId, PackOutcome, PackResult,
    PointId, PointStatus, PointVerifyState, RecordListing, RecordName, RecordSummary, Repository,
    VerifyRecord, VERIFY_SUMMARY_VERSION,
};

use super::select::PackState;
use crate::Result;

/// A run that finds this many readable records merges them into one summary (so a repository
/// holds at most about this many, and every run reads no more than that).
pub(crate) const SUMMARIZE_AT: usize = 16;

/// How long before the oldest listed pack a summary still keeps the runs made (seconds): a
/// margin for a store clock that steps back, or a pack listed late.
const RUNS_KEPT_BEFORE_OLDEST: i64 = 7 * 24 * 3600;

#[derive(Clone, Debug)]
struct WholeRead {
    run: Option<u64>,
    time: i64,
    damaged: HashMap<u32, DamagedBlob>,
    table: Option<String>,
}

#[derive(Default)]
pub(crate) struct History {
    /// (store time of a record, highest run number up to it), by store time.
    runs: Vec<(i64, u64)>,
    max_run: u64,
    whole: HashMap<PackId, WholeRead>,
    /// (pack, offset) -> (time, damage) of the latest read of that one blob.
    partial: HashMap<(PackId, u32), (i64, Option<DamagedBlob>)>,
    /// Packs a record named lost (gone though no prune deleted them), with the blobs they held.
    pub lost: HashMap<PackId, Vec<DamagedBlob>>,
    /// Records that could not be read: (name, error).
    pub unreadable: Vec<(String, String)>,
    /// The readable records merged here, oldest first.
    merged: Vec<RecordName>,
    /// The newest of them, without its pack results (a summary keeps its point states).
    newest: Option<VerifyRecord>,
}

/// What a record says of a lost pack: missing, with the blobs it held, each damaged.
pub(crate) fn lost_result(pack: PackId, damaged: Vec<DamagedBlob>) -> PackResult {
    PackResult {
        pack: pack.to_hex(),
        size: 0,
        outcome: PackOutcome::Missing,
        detail: Some(LOST.into()),
        table: None,
        damaged,
        offsets: None,
        read: None,
        run: None,
    }
}

/// Why a lost pack's blobs cannot be read.
pub(crate) const LOST: &str = "gone from the repository though no prune deleted it";

fn parse_time(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

impl History {
    pub async fn load(repo: &Repository) -> Result<Self> {
        Self::from_records(repo.load_all_verify_records().await?)
    }

    /// Merges records loaded in name order (unreadable ones are kept as such).
    fn from_records(
        loaded: Vec<(RecordListing, std::result::Result<VerifyRecord, RepoError>)>,
    ) -> Result<Self> {
        let mut h = History::default();
        let mut runs = Vec::new();
        for (listing, r) in loaded {
            match r {
                Ok(mut rec) => {
                    let t = parse_time(&rec.finished).unwrap_or(listing.stored);
                    if let Some(run) = rec.run {
                        runs.push((listing.stored, run));
                    }
                    if let Some(s) = &rec.summary {
                        runs.extend(s.runs.iter().copied());
                    }
                    h.apply_at(&rec.packs, t, rec.run);
                    rec.packs = Vec::new();
                    h.merged.push(listing.name);
                    h.newest = Some(rec);
                }
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => h.unreadable.push((listing.name.to_string(), e.to_string())),
            }
        }
        runs.sort();
        let mut best = 0;
        for (t, run) in runs {
            best = best.max(run);
            h.runs.push((t, best));
        }
        h.max_run = best;
        Ok(h)
    }

    /// The number of the next data-reading run.
    pub fn next_run(&self) -> u64 {
        self.max_run + 1
    }

    /// Adds this run's results.
    pub fn apply(&mut self, results: &[PackResult], finished: i64) {
        let run = self.next_run();
        self.apply_at(results, finished, Some(run));
    }

    /// Merges reads made at `time` by `run` (a summary's reads carry their own). The latest read
    /// of a pack or blob wins whatever the order records are applied in, so a summary and the
    /// records it merged, read together, say what either says alone.
    fn apply_at(&mut self, results: &[PackResult], time: i64, run: Option<u64>) {
        for r in results {
            let Some(pack) = r.pack_id() else { continue };
            if r.outcome == PackOutcome::Missing {
                // A pack deleted while a run read it says nothing (the listing decides whether a
                // pack exists now). A lost one names the blobs it held: every host keeps
                // treating them as damaged, and summaries keep saying so.
                if !r.damaged.is_empty() {
                    self.lost.insert(pack, r.damaged.clone());
                }
                continue;
            }
            let time = r.read.as_deref().and_then(parse_time).unwrap_or(time);
            let run = r.run.or(run);
            let damaged: HashMap<u32, DamagedBlob> =
                r.damaged.iter().map(|d| (d.offset, d.clone())).collect();
            match &r.offsets {
                None => {
                    if self.whole.get(&pack).is_some_and(|w| w.time > time) {
                        continue;
                    }
                    self.whole.insert(
                        pack,
                        WholeRead {
                            run,
                            time,
                            damaged,
                            table: r.table.clone(),
                        },
                    );
                }
                Some(offsets) => {
                    for o in offsets {
                        let key = (pack, *o);
                        if self.partial.get(&key).is_some_and(|(t, _)| *t > time) {
                            continue;
                        }
                        self.partial.insert(key, (time, damaged.get(o).cloned()));
                    }
                }
            }
        }
    }

    /// A summary of the records merged here, to store under the returned name, when there are
    /// at least `SUMMARIZE_AT` of them. It keeps, for the packs in `live` (every pack listed
    /// after the records were: a pack a record names that is not listed was deleted), the
    /// latest whole read and the blob reads made after it, the run numbers that packs stored
    /// since `oldest_pack` (the store time of the oldest pack listed) can be born after, and the
    /// newest record's point states.
    pub fn summary(
        &self,
        host: &str,
        live: &HashMap<PackId, u64>,
        oldest_pack: Option<i64>,
    ) -> Option<(RecordName, VerifyRecord)> {
        if self.merged.len() < SUMMARIZE_AT {
            return None;
        }
        let newest_name = self.merged.last()?;
        let newest = self.newest.as_ref()?;
        let outcome = |damaged: &[DamagedBlob], table: &Option<String>| {
            if damaged.is_empty() && table.is_none() {
                PackOutcome::Ok
            } else {
                PackOutcome::Damaged
            }
        };
        let mut packs = Vec::new();
        for (id, w) in &self.whole {
            let Some(size) = live.get(id) else { continue };
            let mut damaged: Vec<DamagedBlob> = w.damaged.values().cloned().collect();
            damaged.sort_by_key(|d| d.offset);
            packs.push(PackResult {
                pack: id.to_hex(),
                size: *size,
                outcome: outcome(&damaged, &w.table),
                detail: None,
                table: w.table.clone(),
                damaged,
                offsets: None,
                read: Some(super::rfc3339(w.time)),
                run: w.run,
            });
        }
        for (id, damaged) in &self.lost {
            // Listed again (put back by hand): its reads say what it holds now.
            if !live.contains_key(id) {
                packs.push(lost_result(*id, damaged.clone()));
            }
        }
        let mut blob_reads: BTreeMap<(PackId, i64), (Vec<u32>, Vec<DamagedBlob>)> = BTreeMap::new();
        for ((id, offset), (t, damage)) in &self.partial {
            // A blob read no later than its pack's whole read says nothing the whole read
            // does not (`damaged` and `verified_at` take the later one).
            if !live.contains_key(id) || self.whole.get(id).is_some_and(|w| w.time >= *t) {
                continue;
            }
            let group = blob_reads.entry((*id, *t)).or_default();
            group.0.push(*offset);
            group.1.extend(damage.clone());
        }
        for ((id, t), (mut offsets, mut damaged)) in blob_reads {
            offsets.sort_unstable();
            damaged.sort_by_key(|d| d.offset);
            packs.push(PackResult {
                pack: id.to_hex(),
                size: live[&id],
                outcome: outcome(&damaged, &None),
                detail: None,
                table: None,
                damaged,
                offsets: Some(offsets),
                read: Some(super::rfc3339(t)),
                run: None,
            });
        }
        packs.sort_by(|a, b| a.pack.cmp(&b.pack));
        let record = VerifyRecord {
            version: VERIFY_SUMMARY_VERSION,
            host: host.to_string(),
            started: newest.started.clone(),
            finished: newest.finished.clone(),
            run: None,
            selection: format!("summary of {} records", self.merged.len()),
            packs,
            points: newest.points.clone(),
            summary: Some(RecordSummary {
                replaces: self.merged.iter().map(|n| n.to_string()).collect(),
                runs: self.runs_since(oldest_pack).to_vec(),
            }),
        };
        Some((RecordName::beside(newest_name), record))
    }

    /// The runs a pack stored at `oldest` or later can be born after: those stored from
    /// `RUNS_KEPT_BEFORE_OLDEST` before it on, and the last one before that, which also carries
    /// the highest run number when no run is that recent. A summary keeps only these, so it grows
    /// with the packs kept and not with the runs made. A pack that turns up later stored still
    /// earlier (a skewed store clock) is taken as born before every kept run: it is read sooner,
    /// never later, than its rotation promises.
    fn runs_since(&self, oldest: Option<i64>) -> &[(i64, u64)] {
        let from = oldest.map_or(i64::MAX, |t| t.saturating_sub(RUNS_KEPT_BEFORE_OLDEST));
        let i = self.runs.partition_point(|(rt, _)| *rt < from);
        &self.runs[i.saturating_sub(1)..]
    }

    /// The last run finished before a pack stored at `t` (store clock) existed.
    fn born_after(&self, t: i64) -> u64 {
        match self.runs.partition_point(|(rt, _)| *rt < t) {
            0 => 0,
            i => self.runs[i - 1].1,
        }
    }

    pub fn pack_state(&self, id: PackId, size: u64, stored: i64) -> PackState {
        let whole = self.whole.get(&id);
        let last_read = whole.map(|w| w.time);
        PackState {
            id,
            size,
            base: whole
                .and_then(|w| w.run)
                .unwrap_or_else(|| self.born_after(stored)),
            last_read,
            since: last_read.unwrap_or(stored),
        }
    }

    /// A pack as a run for some points sees it: only `blobs` (its blobs those points need, all in
    /// this pack) are read, so it is as old as the least recently read of them, by whole or
    /// single-blob reads alike. Such runs record single-blob reads only: judged by whole reads,
    /// each would see the same history as the last and read the same packs again.
    pub fn scoped_state(
        &self,
        id: PackId,
        stored: i64,
        blobs: &[(blockvault_repo::ChunkId, Location)],
    ) -> PackState {
        let mut state = self.pack_state(id, 0, stored);
        state.size = blobs.iter().map(|(_, l)| l.len as u64).sum();
        let reads: Vec<Option<i64>> = blobs.iter().map(|(_, l)| self.read_at(l)).collect();
        state.last_read = reads
            .iter()
            .copied()
            .try_fold(i64::MAX, |oldest, t| t.map(|t| oldest.min(t)))
            .filter(|_| !reads.is_empty());
        state.since = reads
            .iter()
            .map(|t| t.unwrap_or(stored))
            .min()
            .unwrap_or(stored);
        state
    }

    /// When the blob at `loc` was last read, whole or alone, whatever was found.
    fn read_at(&self, loc: &Location) -> Option<i64> {
        let w = self.whole.get(&loc.pack).map(|w| w.time);
        let p = self.partial.get(&(loc.pack, loc.offset)).map(|(t, _)| *t);
        w.max(p)
    }

    /// Why the blob at (pack, offset) is damaged, per the latest read of it.
    pub fn damaged(&self, pack: &PackId, offset: u32) -> Option<&str> {
        let whole = self.whole.get(pack);
        let partial = self.partial.get(&(*pack, offset));
        match (whole, partial) {
            (Some(w), Some((pt, pd))) if *pt > w.time => pd.as_ref().map(|d| d.detail.as_str()),
            (_, None) | (Some(_), Some(_)) => whole
                .and_then(|w| w.damaged.get(&offset))
                .map(|d| d.detail.as_str()),
            (None, Some((_, pd))) => pd.as_ref().map(|d| d.detail.as_str()),
        }
    }

    /// When the blob at `loc` was last read and found intact.
    pub fn verified_at(&self, loc: &Location) -> Option<i64> {
        if self.damaged(&loc.pack, loc.offset).is_some() {
            return None;
        }
        let w = self.whole.get(&loc.pack).map(|w| w.time);
        let p = self
            .partial
            .get(&(loc.pack, loc.offset))
            .filter(|(_, d)| d.is_none())
            .map(|(t, _)| *t);
        w.max(p)
    }

    /// Packs whose latest whole read found the table of contents damaged.
    pub fn table_damage(&self) -> Vec<(PackId, String)> {
        let mut v: Vec<(PackId, String)> = self
            .whole
            .iter()
            .filter_map(|(p, w)| {
                w.table
                    .as_ref()
                    .map(|t| (*p, format!("table of contents: {t}; every blob is intact")))
            })
            .collect();
        v.sort();
        v
    }
}

/// Sums a point's blobs into its verify state.
#[derive(Default)]
pub(crate) struct PointTally {
    bytes: u64,
    bytes_verified: u64,
    oldest: Option<i64>,
    unverified: bool,
    pub damaged: bool,
}

impl PointTally {
    pub fn add(&mut self, bytes: u64, damaged: bool, verified_at: Option<i64>) {
        self.bytes += bytes;
        if damaged {
            self.damaged = true;
            return;
        }
        match verified_at {
            Some(t) => {
                self.bytes_verified += bytes;
                self.oldest = Some(self.oldest.map_or(t, |o| o.min(t)));
            }
            None => self.unverified = true,
        }
    }

    /// Adds another tally (of blobs not counted here yet).
    pub fn merge(&mut self, o: &PointTally) {
        self.bytes += o.bytes;
        self.bytes_verified += o.bytes_verified;
        self.oldest = match (self.oldest, o.oldest) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.unverified |= o.unverified;
        self.damaged |= o.damaged;
    }

    pub fn finish(
        self,
        point: PointId,
        damage: Vec<DiskDamage>,
        detail: Option<String>,
    ) -> PointStatus {
        let state = if self.damaged || detail.is_some() {
            PointVerifyState::Damaged
        } else if !self.unverified {
            PointVerifyState::Verified
        } else if self.bytes_verified > 0 {
            PointVerifyState::Partly
        } else {
            PointVerifyState::Never
        };
        PointStatus {
            point,
            state,
            verified: (state == PointVerifyState::Verified)
                .then(|| self.oldest.map(super::rfc3339))
                .flatten(),
            bytes: self.bytes,
            bytes_verified: self.bytes_verified,
            damage,
            detail,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blockvault_repo::{BlobKind, ChunkIdHex, VERIFY_RECORD_VERSION};
    use proptest::prelude::*;

    const PACKS: u8 = 4;
    const OFFSETS: [u32; 4] = [24, 1000, 2000, 3000];
    /// Pack 3 is gone when the summary is made; the others are live.
    const GONE: u8 = 3;

    fn pid(i: u8) -> PackId {
        PackId([i + 1; 16])
    }

    /// One pack read of a generated record: whole (`offsets` empty) or of the blobs at the
    /// offsets picked by the bits of `offsets`; damage at the offsets picked by `damage`.
    #[derive(Clone, Debug)]
    struct Read {
        pack: u8,
        offsets: u8,
        damage: u8,
        table: bool,
        missing: bool,
    }

    #[derive(Clone, Debug)]
    struct Rec {
        /// Seconds after the previous record (0: same second).
        gap: i64,
        /// Store clock minus the run's clock.
        skew: i64,
        numbered: bool,
        reads: Vec<Read>,
    }

    fn picked(bits: u8) -> impl Iterator<Item = u32> {
        OFFSETS
            .iter()
            .enumerate()
            .filter(move |(i, _)| bits & (1 << i) != 0)
            .map(|(_, o)| *o)
    }

    fn records(recs: &[Rec]) -> Vec<(RecordListing, std::result::Result<VerifyRecord, RepoError>)> {
        let mut t = 1_800_000_000;
        let mut run = 0;
        let mut out = Vec::new();
        for r in recs {
            t += r.gap;
            if r.numbered {
                run += 1;
            }
            let packs = r
                .reads
                .iter()
                .map(|read| {
                    let offsets: Option<Vec<u32>> =
                        (read.offsets != 0).then(|| picked(read.offsets).collect());
                    let damaged = picked(read.damage)
                        .filter(|o| offsets.as_ref().is_none_or(|v| v.contains(o)))
                        .map(|o| DamagedBlob {
                            chunk: ChunkIdHex(blockvault_chunker::ChunkId([o as u8; 32])),
                            offset: o,
                            len: 100,
                            detail: format!("flip in run at {t}"),
                        })
                        .collect();
                    PackResult {
                        pack: pid(read.pack).to_hex(),
                        size: 4096,
                        outcome: if read.missing {
                            PackOutcome::Missing
                        } else {
                            PackOutcome::Damaged
                        },
                        detail: None,
                        table: (read.table && offsets.is_none()).then(|| format!("table {t}")),
                        damaged,
                        offsets,
                        read: None,
                        run: None,
                    }
                })
                .collect();
            let at = time::OffsetDateTime::from_unix_timestamp(t).unwrap();
            let record = VerifyRecord {
                version: VERIFY_RECORD_VERSION,
                host: "h".into(),
                started: super::super::rfc3339(t - 1),
                finished: super::super::rfc3339(t),
                run: r.numbered.then_some(run),
                selection: "5%".into(),
                packs,
                points: Vec::new(),
                summary: None,
            };
            let listing = RecordListing {
                name: RecordName::new(at),
                stored: t + r.skew,
            };
            out.push((listing, Ok(record)));
        }
        // As listed: by name (records of one second in random order).
        out.sort_by(|a, b| a.0.name.cmp(&b.0.name));
        out
    }

    type Loaded = Vec<(RecordListing, std::result::Result<VerifyRecord, RepoError>)>;

    fn dup(loaded: &Loaded) -> Loaded {
        loaded
            .iter()
            .map(|(l, r)| (l.clone(), Ok(r.as_ref().unwrap().clone())))
            .collect()
    }

    /// Everything a run asks of its history, for the live packs.
    fn view(h: &History) -> Vec<String> {
        let mut v = vec![format!("next run {}", h.next_run())];
        for p in (0..PACKS).filter(|p| *p != GONE) {
            let id = pid(p);
            for stored in [1_799_999_000, 1_800_000_005, 1_800_000_040, 1_800_000_300] {
                let s = h.pack_state(id, 4096, stored);
                v.push(format!(
                    "{p} stored {stored}: base {} read {:?}",
                    s.base, s.last_read
                ));
            }
            for o in OFFSETS {
                let loc = Location {
                    pack: id,
                    offset: o,
                    len: 100,
                    raw_len: 100,
                    kind: BlobKind::Data,
                };
                v.push(format!(
                    "{p}@{o}: damaged {:?} verified {:?}",
                    h.damaged(&id, o),
                    h.verified_at(&loc)
                ));
            }
        }
        v.extend(
            h.table_damage()
                .into_iter()
                .filter(|(p, _)| *p != pid(GONE))
                .map(|(p, t)| format!("{p:?}: {t}")),
        );
        v
    }

    fn arb_read() -> impl Strategy<Value = Read> {
        (
            0..PACKS,
            0u8..16,
            0u8..16,
            any::<bool>(),
            prop::bool::weighted(0.1),
        )
            .prop_map(|(pack, offsets, damage, table, missing)| Read {
                pack,
                offsets,
                damage,
                table,
                missing,
            })
    }

    fn arb_rec() -> impl Strategy<Value = Rec> {
        (
            0i64..30,
            -5i64..5,
            any::<bool>(),
            prop::collection::vec(arb_read(), 0..5),
        )
            .prop_map(|(gap, skew, numbered, reads)| Rec {
                gap,
                skew,
                numbered,
                reads,
            })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// A summary says what the records it merges say, alone or read beside them (a run
        /// killed before deleting them, or a reader listing in between).
        #[test]
        fn a_summary_says_what_its_records_said(
            recs in prop::collection::vec(arb_rec(), SUMMARIZE_AT..SUMMARIZE_AT + 6)
        ) {
            let loaded = records(&recs);
            let original = History::from_records(dup(&loaded)).unwrap();
            let live: HashMap<PackId, u64> =
                (0..PACKS).filter(|p| *p != GONE).map(|p| (pid(p), 4096)).collect();
            let (name, summary) =
                original.summary("h", &live, Some(1_799_999_000)).expect("enough records");
            prop_assert_eq!(summary.summary.as_ref().unwrap().replaces.len(), recs.len());
            // Of a pack that is gone only a lost-pack result (missing, naming its blobs) stays.
            prop_assert!(summary.packs.iter().all(|p| p.pack_id() != Some(pid(GONE))
                || (p.outcome == PackOutcome::Missing && !p.damaged.is_empty())));
            let listing = RecordListing { name, stored: 1_900_000_000 };
            let alone = History::from_records(vec![(listing.clone(), Ok(summary.clone()))]).unwrap();
            prop_assert_eq!(view(&alone), view(&original));
            let mut both = dup(&loaded);
            both.push((listing, Ok(summary)));
            both.sort_by(|a, b| a.0.name.cmp(&b.0.name));
            // A summary whose name sorts first (another host's clock was behind): later reads
            // still win, where no two runs finished in the same second.
            let mut first = dup(&both);
            let at = first.iter().position(|(_, r)| r.as_ref().unwrap().summary.is_some()).unwrap();
            let summary_first = first.remove(at);
            first.insert(0, summary_first);
            let both = History::from_records(both).unwrap();
            prop_assert_eq!(view(&both), view(&original));
            if recs.iter().skip(1).all(|r| r.gap > 0) {
                let first = History::from_records(first).unwrap();
                prop_assert_eq!(view(&first), view(&original));
            }
        }
    }

    /// A summary keeps only the runs that packs still stored can be born after, so a nightly
    /// verify's summary does not grow with the runs made; every rotation it serves is unchanged.
    #[test]
    fn a_summary_drops_runs_older_than_every_pack() {
        const DAY: i64 = 86_400;
        let recs: Vec<Rec> = (0..60)
            .map(|_| Rec {
                gap: DAY,
                skew: 0,
                numbered: true,
                reads: Vec::new(),
            })
            .collect();
        let loaded = records(&recs);
        let first = loaded[0].0.stored;
        let original = History::from_records(dup(&loaded)).unwrap();
        let oldest = first + 40 * DAY + 5;
        let live: HashMap<PackId, u64> = [(pid(0), 4096)].into();
        let (name, summary) = original.summary("h", &live, Some(oldest)).unwrap();
        let kept = &summary.summary.as_ref().unwrap().runs;
        // The runs from 7 days before the oldest pack on (days 34 to 59), and the one before.
        assert_eq!(kept.len(), 27, "{kept:?}");
        assert_eq!(kept[0], (first + 33 * DAY, 34));
        let listing = RecordListing {
            name,
            stored: first + 61 * DAY,
        };
        let alone = History::from_records(vec![(listing, Ok(summary))]).unwrap();
        assert_eq!(alone.next_run(), original.next_run());
        for stored in [oldest, oldest - 7 * DAY, first + 50 * DAY, first + 70 * DAY] {
            assert_eq!(
                alone.pack_state(pid(0), 4096, stored).base,
                original.pack_state(pid(0), 4096, stored).base,
                "stored {stored}"
            );
        }
        // A pack that turns up stored before them is taken as older: read sooner, never later.
        for stored in [first - DAY, first + 5 * DAY, oldest - 9 * DAY] {
            assert!(
                alone.pack_state(pid(0), 4096, stored).base
                    <= original.pack_state(pid(0), 4096, stored).base
            );
        }
        // With no pack stored, the highest run number is still kept.
        let (_, empty) = original.summary("h", &HashMap::new(), None).unwrap();
        assert_eq!(empty.summary.unwrap().runs, vec![(first + 59 * DAY, 60)]);
    }

    #[test]
    fn few_records_are_not_summarised() {
        let recs: Vec<Rec> = (0..SUMMARIZE_AT - 1)
            .map(|_| Rec {
                gap: 1,
                skew: 0,
                numbered: true,
                reads: Vec::new(),
            })
            .collect();
        let h = History::from_records(records(&recs)).unwrap();
        assert!(h.summary("h", &HashMap::new(), None).is_none());
    }
}
