//! What earlier verification runs found, merged from the repository's verify records: per pack the
//! latest whole read (its run, time, damaged blobs, table damage), per blob the latest partial
//! read, and the run numbers rotations count by.

use std::collections::HashMap;

use blockvault_repo::{
    DiskDamage, Location, PackId, PackOutcome, PackResult, PointId, PointStatus, PointVerifyState,
    Repository,
};

use super::select::PackState;
use crate::Result;

#[derive(Clone, Debug)]
struct WholeRead {
    run: Option<u64>,
    time: i64,
    damaged: HashMap<u32, String>,
    table: Option<String>,
}

#[derive(Default)]
pub(crate) struct History {
    /// (store time of a record, highest run number up to it), by store time.
    runs: Vec<(i64, u64)>,
    max_run: u64,
    whole: HashMap<PackId, WholeRead>,
    /// (pack, offset) -> (time, damage) of the latest read of that one blob.
    partial: HashMap<(PackId, u32), (i64, Option<String>)>,
    /// Records that could not be read: (name, error).
    pub unreadable: Vec<(String, String)>,
}

fn parse_time(s: &str) -> Option<i64> {
    time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339)
        .ok()
        .map(|t| t.unix_timestamp())
}

impl History {
    pub async fn load(repo: &Repository) -> Result<Self> {
        let listing = repo.list_verify_records().await?;
        let names: Vec<_> = listing.iter().map(|l| l.name.clone()).collect();
        let stored: HashMap<_, _> = listing.iter().map(|l| (l.name.clone(), l.stored)).collect();
        let mut h = History::default();
        let mut runs = Vec::new();
        for (name, r) in repo.load_verify_records(&names).await {
            match r {
                Ok(rec) => {
                    let t = parse_time(&rec.finished).unwrap_or(stored[&name]);
                    if let Some(run) = rec.run {
                        runs.push((stored[&name], run));
                    }
                    h.apply_at(&rec.packs, t, rec.run);
                }
                Err(e) if e.is_transient() => return Err(e.into()),
                Err(e) => h.unreadable.push((name.to_string(), e.to_string())),
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

    fn apply_at(&mut self, results: &[PackResult], time: i64, run: Option<u64>) {
        for r in results {
            let Some(pack) = r.pack_id() else { continue };
            if r.outcome == PackOutcome::Missing {
                // The listing decides whether a pack exists now; nothing to remember.
                continue;
            }
            let damaged: HashMap<u32, String> = r
                .damaged
                .iter()
                .map(|d| (d.offset, d.detail.clone()))
                .collect();
            match &r.offsets {
                None => {
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
                        self.partial
                            .insert((pack, *o), (time, damaged.get(o).cloned()));
                    }
                }
            }
        }
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
        PackState {
            id,
            size,
            base: whole
                .and_then(|w| w.run)
                .unwrap_or_else(|| self.born_after(stored)),
            last_read: whole.map(|w| w.time),
        }
    }

    /// Why the blob at (pack, offset) is damaged, per the latest read of it.
    pub fn damaged(&self, pack: &PackId, offset: u32) -> Option<&str> {
        let whole = self.whole.get(pack);
        let partial = self.partial.get(&(*pack, offset));
        match (whole, partial) {
            (Some(w), Some((pt, pd))) if *pt > w.time => pd.as_deref(),
            (_, None) | (Some(_), Some(_)) => whole
                .and_then(|w| w.damaged.get(&offset))
                .map(String::as_str),
            (None, Some((_, pd))) => pd.as_deref(),
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
