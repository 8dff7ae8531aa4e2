//! Which packs a verification run reads: a pure function of the packs in the repository, what
//! earlier runs recorded about them, and what the user asked for.
//!
//! **Rotation (`--read-data-subset P%`).** Runs that read data are numbered (the records carry the
//! number). Every pack has a *base*: the number of the last run that read it whole, or, if none
//! did, of the last run that finished before the pack was stored. A rotation of `n = ceil(100/P)`
//! runs must read every pack by run `base + n`: packs whose deadline has come are always taken.
//! Beyond them the run reads the packs with the oldest base first until it has read `P %` of the
//! repository's bytes. Because new packs get the newest base and a read moves a pack to the back,
//! backups cannot starve old packs, and prune removing packs only shortens the queue: every pack is
//! read within `n` runs of its base, whatever happens between runs (see the property test).
//!
//! **Slice (`n/t`)**: the packs whose id's first byte is `n - 1` modulo `t`, like restic's
//! `--read-data-subset n/t`: fixed, no state.
//!
//! **Re-verify (`--reverify-after D`)**: packs never read, or last read longer than `D` ago,
//! oldest first.
//!
//! **Runs for some points (`--point`, `--vm`)** read single blobs and are not numbered, so they
//! have no deadlines: a pack is judged by the oldest latest read (whole or of the blob alone) of
//! the blobs it is wanted for, or its store time for a blob never read. A rotation then reads the
//! longest-waiting packs until `P %` of the points' bytes, and a re-verify skips packs whose
//! wanted blobs were all read within `D`. Judged by whole reads only, every such run saw the same
//! history and read the same packs again.
//!
//! `--max-bytes` caps any of them (whole packs; at least one). Under a cap every selection but a
//! rotation reads the longest-waiting packs first (last read, else stored): in id order, the cap
//! took the same prefix every run and the other packs were never read. What a cap leaves out of
//! what the selection asked for (of a rotation: the packs whose deadline has come) is reported as
//! overdue.

use std::collections::HashSet;

use blockvault_repo::PackId;

/// What the user asked to read.
#[derive(Clone, Debug, PartialEq)]
pub enum Selection {
    /// No data: check references only.
    None,
    /// Every pack.
    All,
    /// A rotating share, in percent (0 < p <= 100).
    Rotation { percent: f64 },
    /// Slice `n` of `t` (1-based).
    Slice { n: u32, t: u32 },
    /// Packs not verified within this many seconds.
    ReverifyAfter { secs: i64 },
    /// Exactly these packs (what some points need).
    Packs(HashSet<PackId>),
}

impl Selection {
    /// Parses `--read-data-subset`: `P%` (rotation) or `n/t` (slice).
    pub fn parse_subset(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "--read-data-subset '{text}': expected a percentage such as 5% (0 < P <= 100) \
                 or a slice n/t such as 3/7 (1 <= n <= t)"
            )
        };
        if let Some(p) = text.strip_suffix('%') {
            let p: f64 = p.trim().parse().map_err(|_| bad())?;
            if !(p > 0.0 && p <= 100.0) {
                return Err(bad());
            }
            return Ok(Selection::Rotation { percent: p });
        }
        let (n, t) = text.split_once('/').ok_or_else(bad)?;
        let (n, t): (u32, u32) = (
            n.trim().parse().map_err(|_| bad())?,
            t.trim().parse().map_err(|_| bad())?,
        );
        if n == 0 || t == 0 || n > t || t > 256 {
            return Err(bad());
        }
        Ok(Selection::Slice { n, t })
    }

    /// Runs in which a rotation reads everything.
    pub fn rotation_runs(percent: f64) -> u64 {
        (100.0 / percent).ceil().max(1.0) as u64
    }

    pub fn describe(&self) -> String {
        match self {
            Selection::None => "metadata".into(),
            Selection::All => "all".into(),
            Selection::Rotation { percent } => format!("{percent}%"),
            Selection::Slice { n, t } => format!("{n}/{t}"),
            Selection::ReverifyAfter { secs } => format!("reverify-after {secs}s"),
            Selection::Packs(p) => format!("{} packs of the chosen points", p.len()),
        }
    }
}

/// What the selection knows of one pack.
#[derive(Clone, Debug)]
pub struct PackState {
    pub id: PackId,
    pub size: u64,
    /// Last data run that read the whole pack, else the last run finished before it was stored.
    pub base: u64,
    /// When it was last read whole (unix seconds), if ever. For a run for some points: the oldest
    /// latest read of the blobs it is wanted for, `None` if one was never read.
    pub last_read: Option<i64>,
    /// Since when it has waited to be read: `last_read`, else its store time (for a run for some
    /// points, the oldest of that over its wanted blobs). Caps and unnumbered rotations take the
    /// longest-waiting first, so new packs queue behind old ones instead of starving them.
    pub since: i64,
}

/// Longest-waiting first; of two waiting since the same second, one with a blob never read first.
fn waiting(p: &PackState) -> (i64, bool, PackId) {
    (p.since, p.last_read.is_some(), p.id)
}

/// The packs chosen, in reading order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Chosen {
    pub packs: Vec<PackId>,
    pub bytes: u64,
    /// Packs the selection asked for but `--max-bytes` left out (of a rotation, only those whose
    /// deadline has come: the rest were only filling its share).
    pub overdue: Vec<PackId>,
}

/// Chooses the packs run number `run` reads (`None`: a run for some points, not numbered). Pure:
/// same inputs, same answer.
pub fn select(
    packs: &[PackState],
    selection: &Selection,
    run: Option<u64>,
    now: i64,
    max_bytes: Option<u64>,
) -> Chosen {
    let mut order: Vec<&PackState> = match selection {
        Selection::None => Vec::new(),
        Selection::All => packs.iter().collect(),
        Selection::Slice { n, t } => packs
            .iter()
            .filter(|p| p.id.0[0] as u32 % t == n - 1)
            .collect(),
        Selection::Packs(set) => packs.iter().filter(|p| set.contains(&p.id)).collect(),
        Selection::ReverifyAfter { secs } => {
            let mut v: Vec<&PackState> = packs
                .iter()
                .filter(|p| p.last_read.is_none_or(|t| t <= now - secs))
                .collect();
            v.sort_by_key(|p| (p.last_read.unwrap_or(i64::MIN), p.base, p.id));
            v
        }
        Selection::Rotation { percent } => {
            let n = Selection::rotation_runs(*percent);
            let total: u64 = packs.iter().map(|p| p.size).sum();
            let budget = ((total as f64) * percent / 100.0).ceil() as u64;
            let mut v: Vec<&PackState> = packs.iter().collect();
            match run {
                Some(_) => v.sort_by_key(|p| (p.base, p.id)),
                None => v.sort_by_key(|p| waiting(p)),
            }
            let mut out = Vec::new();
            let mut bytes = 0u64;
            for p in v {
                let due = run.is_some_and(|run| p.base + n <= run);
                if due || bytes < budget {
                    bytes += p.size;
                    out.push(p);
                }
            }
            out
        }
    };
    if matches!(
        selection,
        Selection::All | Selection::Slice { .. } | Selection::Packs(_)
    ) {
        match max_bytes {
            Some(_) => order.sort_by_key(|p| waiting(p)),
            None => order.sort_by_key(|p| p.id),
        }
    }
    let mut chosen = Chosen::default();
    // Whether the selection needs `p` this run, rather than only taking it to fill a share.
    let required = |p: &PackState| match selection {
        Selection::Rotation { percent } => {
            let n = Selection::rotation_runs(*percent);
            run.is_some_and(|run| p.base + n <= run)
        }
        _ => true,
    };
    for p in order {
        if max_bytes.is_some_and(|m| chosen.bytes + p.size > m && !chosen.packs.is_empty())
            || max_bytes == Some(0)
        {
            if required(p) {
                chosen.overdue.push(p.id);
            }
            continue;
        }
        chosen.bytes += p.size;
        chosen.packs.push(p.id);
    }
    chosen
}

/// Parses a duration such as `30d`, `12h`, `90m`, `3600s` (or plain seconds).
pub fn parse_duration(text: &str) -> Result<i64, String> {
    let t = text.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'd')) => (&t[..i], 86_400),
        Some((i, 'h')) => (&t[..i], 3_600),
        Some((i, 'm')) => (&t[..i], 60),
        Some((i, 's')) => (&t[..i], 1),
        _ => (t, 1),
    };
    match num.trim().parse::<i64>() {
        Ok(n) if n >= 0 => Ok(n * mult),
        _ => Err(format!(
            "'{text}': expected a duration such as 30d, 12h, 90m or 3600s"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::HashMap;

    fn pid(i: u64) -> PackId {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&i.to_le_bytes());
        b[8..].copy_from_slice(&i.wrapping_mul(0x9e37_79b9_7f4a_7c15).to_le_bytes());
        PackId(b)
    }

    #[test]
    fn parsing() {
        assert_eq!(
            Selection::parse_subset("5%").unwrap(),
            Selection::Rotation { percent: 5.0 }
        );
        assert_eq!(
            Selection::parse_subset("3/7").unwrap(),
            Selection::Slice { n: 3, t: 7 }
        );
        for bad in ["0%", "101%", "x%", "0/3", "4/3", "3", "a/b", ""] {
            assert!(Selection::parse_subset(bad).is_err(), "{bad}");
        }
        assert_eq!(Selection::rotation_runs(5.0), 20);
        assert_eq!(Selection::rotation_runs(30.0), 4);
        assert_eq!(parse_duration("30d").unwrap(), 30 * 86_400);
        assert_eq!(parse_duration("90m").unwrap(), 5_400);
        assert!(parse_duration("soon").is_err());
    }

    #[test]
    fn slices_partition_the_packs() {
        let packs: Vec<PackState> = (0..500)
            .map(|i| PackState {
                id: pid(i),
                size: 10,
                base: 0,
                last_read: None,
                since: 0,
            })
            .collect();
        let mut seen = HashSet::new();
        for n in 1..=7 {
            let c = select(&packs, &Selection::Slice { n, t: 7 }, Some(1), 0, None);
            assert!(!c.packs.is_empty());
            for p in c.packs {
                assert!(seen.insert(p), "pack in two slices");
            }
        }
        assert_eq!(seen.len(), packs.len());
    }

    #[test]
    fn reverify_reads_only_old_and_unread_packs_oldest_first_within_the_cap() {
        let now = 1_000_000;
        let packs = vec![
            PackState {
                id: pid(1),
                size: 10,
                base: 0,
                last_read: Some(now - 10),
                since: now - 10,
            },
            PackState {
                id: pid(2),
                size: 10,
                base: 0,
                last_read: Some(now - 100),
                since: now - 100,
            },
            PackState {
                id: pid(3),
                size: 10,
                base: 0,
                last_read: None,
                since: 0,
            },
            PackState {
                id: pid(4),
                size: 10,
                base: 0,
                last_read: Some(now - 50),
                since: now - 50,
            },
        ];
        let c = select(
            &packs,
            &Selection::ReverifyAfter { secs: 40 },
            Some(1),
            now,
            None,
        );
        assert_eq!(c.packs, vec![pid(3), pid(2), pid(4)]);
        let c = select(
            &packs,
            &Selection::ReverifyAfter { secs: 40 },
            Some(1),
            now,
            Some(25),
        );
        assert_eq!(c.packs, vec![pid(3), pid(2)]);
        assert_eq!(c.bytes, 20);
    }

    /// One simulated repository history: between runs, packs are added (backups) and removed
    /// (prune); each run records what it read. Checks the rotation's promise for every pack.
    fn simulate(
        percent: f64,
        initial: Vec<u64>,
        steps: Vec<(Vec<u64>, Vec<usize>)>,
    ) -> Result<(), TestCaseError> {
        let n = Selection::rotation_runs(percent);
        let mut next_id = 0u64;
        // pack -> (size, base, last run read or run born after)
        let mut live: HashMap<PackId, (u64, u64)> = HashMap::new();
        for s in initial {
            live.insert(pid(next_id), (s, 0));
            next_id += 1;
        }
        // Since when each pack has waited: the run after which it was stored or last read.
        let mut waiting_since: HashMap<PackId, u64> = live.keys().map(|p| (*p, 0)).collect();
        let mut bytes_read = 0u64;
        let mut max_total = 0u64;
        let runs = steps.len() as u64;
        for (run0, (added, removed)) in steps.into_iter().enumerate() {
            let run = run0 as u64 + 1;
            // Prune between runs.
            let mut ids: Vec<PackId> = live.keys().copied().collect();
            ids.sort();
            for r in removed {
                if !ids.is_empty() {
                    let victim = ids.remove(r % ids.len());
                    live.remove(&victim);
                    waiting_since.remove(&victim);
                }
            }
            // Backups between runs: born after run - 1.
            for s in added {
                let id = pid(next_id);
                next_id += 1;
                live.insert(id, (s, run - 1));
                waiting_since.insert(id, run - 1);
            }
            let states: Vec<PackState> = live
                .iter()
                .map(|(id, (size, base))| PackState {
                    id: *id,
                    size: *size,
                    base: *base,
                    last_read: None,
                    since: 0,
                })
                .collect();
            max_total = max_total.max(states.iter().map(|p| p.size).sum());
            let chosen = select(
                &states,
                &Selection::Rotation { percent },
                Some(run),
                0,
                None,
            );
            prop_assert!(chosen.overdue.is_empty());
            for id in &chosen.packs {
                bytes_read += live[id].0;
                live.get_mut(id).unwrap().1 = run;
                waiting_since.insert(*id, run);
            }
            // The promise: no live pack has waited n runs without being read.
            for (id, since) in &waiting_since {
                prop_assert!(
                    run < since + n,
                    "pack {id} waiting since run {since} not read by run {run} (n = {n})"
                );
            }
        }
        // And the rotation reads about its share, not everything every time.
        let bound =
            (runs / n + 2) * max_total + runs * 2 * max_total * (percent.ceil() as u64) / 100;
        prop_assert!(
            bytes_read <= bound.max(1),
            "read {bytes_read} bytes in {runs} runs; bound {bound}"
        );
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(300))]
        #[test]
        fn rotation_reads_every_pack_within_its_runs(
            percent in prop_oneof![Just(5.0), Just(10.0), Just(25.0), Just(33.0), 1.0f64..100.0],
            initial in prop::collection::vec(1u64..1_000, 0..60),
            steps in prop::collection::vec(
                (prop::collection::vec(1u64..1_000, 0..8), prop::collection::vec(0usize..1000, 0..5)),
                1..70,
            ),
        ) {
            simulate(percent, initial, steps)?;
        }
    }

    #[test]
    fn a_static_repository_is_read_once_per_rotation() {
        let mut packs: Vec<PackState> = (0..100)
            .map(|i| PackState {
                id: pid(i),
                size: 100,
                base: 0,
                last_read: None,
                since: 0,
            })
            .collect();
        let mut count: HashMap<PackId, u32> = HashMap::new();
        for run in 1..=20 {
            let c = select(
                &packs,
                &Selection::Rotation { percent: 5.0 },
                Some(run),
                0,
                None,
            );
            assert_eq!(c.bytes, 500, "run {run} reads 5 %");
            for p in &mut packs {
                if c.packs.contains(&p.id) {
                    p.base = run;
                    *count.entry(p.id).or_default() += 1;
                }
            }
        }
        assert_eq!(count.len(), 100);
        assert!(count.values().all(|c| *c == 1));
    }

    #[test]
    fn a_cap_reports_what_is_overdue() {
        let packs: Vec<PackState> = (0..10)
            .map(|i| PackState {
                id: pid(i),
                size: 100,
                base: 0,
                last_read: None,
                since: 0,
            })
            .collect();
        let c = select(
            &packs,
            &Selection::Rotation { percent: 50.0 },
            Some(2),
            0,
            Some(300),
        );
        assert_eq!(c.packs.len(), 3);
        assert_eq!(c.overdue.len(), 7);
    }

    /// Ten packs never read, stored over ten seconds, a cap of three: each run must read packs
    /// the earlier ones did not, and name the packs it left out.
    fn capped_runs_move_on(selection: Selection) {
        let mut packs: Vec<PackState> = (0..10)
            .map(|i| PackState {
                id: pid(i),
                size: 100,
                base: 0,
                last_read: None,
                since: 1_000 + i as i64,
            })
            .collect();
        let mut read = HashSet::new();
        for run in 1..=3u64 {
            let now = 2_000 + run as i64;
            let c = select(&packs, &selection, Some(run), now, Some(300));
            assert_eq!(c.packs.len(), 3, "run {run}: {selection:?}");
            assert_eq!(c.overdue.len(), 7, "run {run}: the packs the cap left out");
            for id in &c.packs {
                assert!(read.insert(*id), "run {run} read {id} again: {selection:?}");
                assert!(!c.overdue.contains(id));
            }
            // What the next run's history says of the packs this one read.
            for p in &mut packs {
                if c.packs.contains(&p.id) {
                    (p.base, p.last_read, p.since) = (run, Some(now), now);
                }
            }
        }
        // The one pack left is first in the fourth run, then those read longest ago.
        let c = select(&packs, &selection, Some(4), 2_004, Some(300));
        assert!(!read.contains(&c.packs[0]), "{c:?}");
    }

    #[test]
    fn capped_reads_of_everything_or_a_slice_take_the_longest_unread_packs_first() {
        capped_runs_move_on(Selection::All);
        capped_runs_move_on(Selection::Slice { n: 1, t: 1 });
    }

    /// A run for some points is not numbered: its rotation goes by when the wanted blobs were
    /// read, so two such runs of 50 % read different packs, and a re-verify right after reads none.
    #[test]
    fn unnumbered_runs_go_by_read_times() {
        let mut packs: Vec<PackState> = (0..4)
            .map(|i| PackState {
                id: pid(i),
                size: 100,
                base: 0,
                last_read: None,
                since: 1_000,
            })
            .collect();
        let half = Selection::Rotation { percent: 50.0 };
        let first = select(&packs, &half, None, 2_000, None);
        assert_eq!(first.packs.len(), 2);
        for p in &mut packs {
            if first.packs.contains(&p.id) {
                (p.last_read, p.since) = (Some(2_000), 2_000);
            }
        }
        let second = select(&packs, &half, None, 2_000, None);
        assert_eq!(second.packs.len(), 2);
        assert!(second.packs.iter().all(|p| !first.packs.contains(p)));
        for p in &mut packs {
            if second.packs.contains(&p.id) {
                (p.last_read, p.since) = (Some(2_000), 2_000);
            }
        }
        let again = Selection::ReverifyAfter { secs: 30 * 86_400 };
        assert!(select(&packs, &again, None, 2_001, None).packs.is_empty());
    }
}
