//! Which restore points a retention policy keeps: a pure function of the policy, the points' facts
//! and the current time, so `forget` (and the agent's schedule) can show and test every decision
//! before anything is deleted.
//!
//! The rules follow restic's `forget` (documented in docs/OPERATIONS.md, "Retention rules"):
//! - rules are ORed: a point is kept when any rule keeps it, and every rule sees every point, so
//!   one point may be counted by several rules (Proxmox Backup Server instead lets a later rule
//!   skip periods an earlier rule already covered; we do not, see the docs);
//! - `keep-last N` keeps the N newest points;
//! - `keep-hourly/daily/weekly/monthly/yearly N` keep the newest point of each of the N most recent
//!   periods that hold a point; periods are calendar periods in the given time zone, weeks are ISO
//!   weeks (Monday to Sunday, numbered by ISO year);
//! - a period rule whose count is not used up by the history also keeps the oldest point, so the
//!   history kept is as long as possible ("oldest daily");
//! - `keep-within D` keeps every point less than D older than the newest point (not than now: a
//!   VM whose backups stopped keeps its last D of history);
//! - `keep-tag T` keeps every point with tag T (`a,b`: with both tags; an empty entry: untagged);
//! - a protected point is always kept;
//! - a point stamped after `now` is kept, said so, and counted by no rule, so a skewed clock or a
//!   forged timestamp cannot push real points out of `keep-last` or a period;
//! - an empty policy (no rule, or only zero counts) is refused rather than removing everything.
//!
//! Points of different VMs are decided separately, each VM's history on its own.

use std::collections::{BTreeMap, HashSet};
use std::fmt;
use std::str::FromStr;

use blockvault_repo::PointId;
use serde::{Deserialize, Serialize};
use time::{Date, Month, OffsetDateTime, UtcOffset};

use crate::{Error, Result};

/// A calendar span for `keep-within`: years, months, weeks, days and hours, written like `30d`,
/// `12h`, `2w`, `1y2m` (`m` is months, as in restic; there are no minutes).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Span {
    pub years: u32,
    pub months: u32,
    pub weeks: u32,
    pub days: u32,
    pub hours: u32,
}

impl Span {
    pub fn is_zero(&self) -> bool {
        *self == Span::default()
    }

    /// `at` minus this span, calendar-wise in `at`'s offset: years and months first (the day
    /// clamped to the end of a shorter month: 31 March minus 1m is 28 or 29 February), then
    /// weeks, days and hours. `None` when the result is before the representable range.
    fn before(&self, at: OffsetDateTime) -> Option<OffsetDateTime> {
        let months_back = i64::from(self.years) * 12 + i64::from(self.months);
        let total = i64::from(at.year()) * 12 + i64::from(at.month() as u8 - 1) - months_back;
        let year = i32::try_from(total.div_euclid(12)).ok()?;
        let month = Month::try_from((total.rem_euclid(12) + 1) as u8).ok()?;
        let day = at.day().min(month.length(year));
        let date = Date::from_calendar_date(year, month, day).ok()?;
        let shifted = at.replace_date(date);
        let back = time::Duration::days(i64::from(self.weeks) * 7 + i64::from(self.days))
            + time::Duration::hours(i64::from(self.hours));
        shifted.checked_sub(back)
    }
}

impl fmt::Display for Span {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_zero() {
            return f.write_str("0h");
        }
        for (n, unit) in [
            (self.years, 'y'),
            (self.months, 'm'),
            (self.weeks, 'w'),
            (self.days, 'd'),
            (self.hours, 'h'),
        ] {
            if n > 0 {
                write!(f, "{n}{unit}")?;
            }
        }
        Ok(())
    }
}

const SPAN_EXAMPLES: &str = "examples: 30d, 12h, 2w, 1y2m; units y, m (months), w, d, h";

impl FromStr for Span {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |why: String| Error::Invalid(format!("duration '{s}': {why} ({SPAN_EXAMPLES})"));
        let t = s.trim();
        if t.is_empty() {
            return Err(bad("empty".into()));
        }
        let mut span = Span::default();
        let mut seen = HashSet::new();
        let mut digits = String::new();
        for c in t.chars() {
            if c.is_ascii_digit() {
                digits.push(c);
                continue;
            }
            if digits.is_empty() {
                return Err(bad(format!("'{c}' is not preceded by a number")));
            }
            let n: u32 = digits
                .parse()
                .map_err(|_| bad(format!("{digits} is too large")))?;
            let slot = match c {
                'y' => &mut span.years,
                'm' => &mut span.months,
                'w' => &mut span.weeks,
                'd' => &mut span.days,
                'h' => &mut span.hours,
                other => return Err(bad(format!("unknown unit '{other}'"))),
            };
            if !seen.insert(c) {
                return Err(bad(format!("unit '{c}' given twice")));
            }
            *slot = n;
            digits.clear();
        }
        if !digits.is_empty() {
            return Err(bad(format!("{digits} has no unit")));
        }
        Ok(span)
    }
}

impl Serialize for Span {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// A retention policy: what `forget` keeps. Every field is optional; see the module docs for the
/// meaning of each rule.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, rename_all = "kebab-case", deny_unknown_fields)]
pub struct Policy {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_last: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_hourly: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_daily: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_weekly: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_monthly: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_yearly: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keep_within: Option<Span>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub keep_tags: Vec<String>,
}

impl Policy {
    /// True when the policy keeps nothing by itself (no rule, or only zero counts and a zero
    /// span): applying it would remove every point, so it is refused.
    pub fn is_empty(&self) -> bool {
        self.counts().iter().all(|(_, n)| *n == 0)
            && self.keep_within.is_none_or(|s| s.is_zero())
            && self.keep_tags.is_empty()
    }

    fn counts(&self) -> [(Period, u32); 6] {
        [
            (Period::Last, self.keep_last.unwrap_or(0)),
            (Period::Hourly, self.keep_hourly.unwrap_or(0)),
            (Period::Daily, self.keep_daily.unwrap_or(0)),
            (Period::Weekly, self.keep_weekly.unwrap_or(0)),
            (Period::Monthly, self.keep_monthly.unwrap_or(0)),
            (Period::Yearly, self.keep_yearly.unwrap_or(0)),
        ]
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        for (p, n) in self.counts() {
            if n > 0 {
                parts.push(format!("{} {n}", p.name()));
            }
        }
        if let Some(s) = self.keep_within.filter(|s| !s.is_zero()) {
            parts.push(format!("within {s}"));
        }
        for t in &self.keep_tags {
            parts.push(format!("tag '{t}'"));
        }
        if parts.is_empty() {
            f.write_str("keep nothing (empty policy)")
        } else {
            write!(f, "keep {}", parts.join(", "))
        }
    }
}

/// What the policy needs to know about one restore point.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointFacts {
    pub id: PointId,
    pub vm: String,
    pub created: OffsetDateTime,
    pub tags: Vec<String>,
    pub protected: bool,
}

/// The verdict on one point: kept (and by which rules) or removed.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Decision {
    pub id: PointId,
    pub vm: String,
    pub keep: bool,
    /// Every rule that keeps the point, e.g. `last 3`, `daily 2026-11-20`, `weekly 2026-W47`,
    /// `within 30d`, `tag nightly`, `protected`, `future timestamp`; empty when removed.
    pub reasons: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Period {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Period {
    fn name(self) -> &'static str {
        match self {
            Period::Last => "last",
            Period::Hourly => "hourly",
            Period::Daily => "daily",
            Period::Weekly => "weekly",
            Period::Monthly => "monthly",
            Period::Yearly => "yearly",
        }
    }

    /// The period holding `t` (already in the policy's time zone), as it is shown in reasons.
    fn label(self, t: OffsetDateTime, id: &PointId) -> String {
        match self {
            Period::Last => id.to_hex(),
            Period::Hourly => format!(
                "{:04}-{:02}-{:02}T{:02}",
                t.year(),
                t.month() as u8,
                t.day(),
                t.hour()
            ),
            Period::Daily => format!("{:04}-{:02}-{:02}", t.year(), t.month() as u8, t.day()),
            Period::Weekly => {
                let (y, w, _) = t.to_iso_week_date();
                format!("{y:04}-W{w:02}")
            }
            Period::Monthly => format!("{:04}-{:02}", t.year(), t.month() as u8),
            Period::Yearly => format!("{:04}", t.year()),
        }
    }
}

/// Decides, for every point, whether `policy` keeps it. Points are grouped by VM and each VM's
/// points are decided on their own. The decisions come sorted by VM name, then newest first
/// (points with the same timestamp: larger id first, so the result does not depend on the order
/// of `points`). `now` only tells which points are stamped in the future; `tz` is the time zone
/// whose calendar defines hours, days, weeks, months and years.
///
/// Errors: an empty policy (it would remove everything), or the same point given twice.
pub fn apply(
    policy: &Policy,
    points: &[PointFacts],
    now: OffsetDateTime,
    tz: UtcOffset,
) -> Result<Vec<Decision>> {
    if policy.is_empty() {
        return Err(Error::Invalid(
            "the retention policy is empty: it would remove every restore point; give at least \
             one --keep-* rule (to remove points by hand, name them)"
                .into(),
        ));
    }
    let mut seen = HashSet::new();
    let mut by_vm: BTreeMap<&str, Vec<&PointFacts>> = BTreeMap::new();
    for p in points {
        if !seen.insert(p.id) {
            return Err(Error::Invalid(format!(
                "restore point {} is listed twice",
                p.id
            )));
        }
        by_vm.entry(p.vm.as_str()).or_default().push(p);
    }
    let mut out = Vec::with_capacity(points.len());
    for (_, mut group) in by_vm {
        group.sort_by(|a, b| b.created.cmp(&a.created).then(b.id.cmp(&a.id)));
        out.extend(decide_group(policy, &group, now, tz));
    }
    Ok(out)
}

/// One VM's points, newest first.
fn decide_group(
    policy: &Policy,
    group: &[&PointFacts],
    now: OffsetDateTime,
    tz: UtcOffset,
) -> Vec<Decision> {
    let mut reasons: Vec<Vec<String>> = vec![Vec::new(); group.len()];
    // Points in the future take part in no counting rule.
    let counted: Vec<usize> = (0..group.len())
        .filter(|&i| group[i].created <= now)
        .collect();
    let local = |t: OffsetDateTime| t.checked_to_offset(tz).unwrap_or(t);

    for (period, n) in policy.counts() {
        if n == 0 {
            continue;
        }
        let mut left = n;
        let mut last: Option<String> = None;
        for (k, &i) in counted.iter().enumerate() {
            if left == 0 {
                break;
            }
            let label = period.label(local(group[i].created), &group[i].id);
            if last.as_deref() != Some(&label) {
                reasons[i].push(match period {
                    Period::Last => format!("last {n}"),
                    _ => format!("{} {label}", period.name()),
                });
                last = Some(label);
                left -= 1;
            } else if k + 1 == counted.len() && period != Period::Last {
                // The history is shorter than the rule asks for: keep its beginning too.
                reasons[i].push(format!("oldest {}", period.name()));
            }
        }
    }

    if let (Some(span), Some(&newest)) =
        (policy.keep_within.filter(|s| !s.is_zero()), counted.first())
    {
        let cutoff = span.before(local(group[newest].created));
        for &i in &counted {
            if cutoff.is_none_or(|c| group[i].created > c) {
                reasons[i].push(format!("within {span}"));
            }
        }
    }

    for (i, p) in group.iter().enumerate() {
        for entry in &policy.keep_tags {
            let wanted: Vec<&str> = entry.split(',').filter(|t| !t.is_empty()).collect();
            let matches = if wanted.is_empty() {
                p.tags.is_empty()
            } else {
                wanted.iter().all(|w| p.tags.iter().any(|t| t == w))
            };
            if matches {
                reasons[i].push(if wanted.is_empty() {
                    "tag (untagged)".to_string()
                } else {
                    format!("tag {entry}")
                });
            }
        }
        if p.protected {
            reasons[i].push("protected".into());
        }
        if p.created > now {
            reasons[i].push("future timestamp".into());
        }
    }

    group
        .iter()
        .zip(reasons)
        .map(|(p, reasons)| Decision {
            id: p.id,
            vm: p.vm.clone(),
            keep: !reasons.is_empty(),
            reasons,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{datetime, offset};

    fn pid(n: u64) -> PointId {
        PointId(n.to_be_bytes())
    }

    fn pt(n: u64, created: OffsetDateTime) -> PointFacts {
        PointFacts {
            id: pid(n),
            vm: "vm1".into(),
            created,
            tags: Vec::new(),
            protected: false,
        }
    }

    const NOW: OffsetDateTime = datetime!(2026-11-29 17:00 UTC);

    fn run(policy: &Policy, points: &[PointFacts]) -> Vec<Decision> {
        apply(policy, points, NOW, UtcOffset::UTC).unwrap()
    }

    /// The ids kept, newest first.
    fn kept(d: &[Decision]) -> Vec<u64> {
        d.iter()
            .filter(|d| d.keep)
            .map(|d| u64::from_be_bytes(d.id.0))
            .collect()
    }

    fn reasons(d: &[Decision], n: u64) -> Vec<String> {
        d.iter().find(|d| d.id == pid(n)).unwrap().reasons.clone()
    }

    /// One point a day at 03:00 UTC for `days` days ending on `last` (ids 1.. oldest first).
    fn daily(last: Date, days: u64) -> Vec<PointFacts> {
        (0..days)
            .map(|i| {
                let d = last - time::Duration::days((days - 1 - i) as i64);
                pt(i + 1, d.with_hms(3, 0, 0).unwrap().assume_utc())
            })
            .collect()
    }

    fn policy(f: impl FnOnce(&mut Policy)) -> Policy {
        let mut p = Policy::default();
        f(&mut p);
        p
    }

    #[test]
    fn keep_last_keeps_the_newest_whatever_the_input_order() {
        let mut pts = daily(time::macros::date!(2026 - 11 - 28), 10);
        let p = policy(|p| p.keep_last = Some(3));
        let d = run(&p, &pts);
        assert_eq!(kept(&d), vec![10, 9, 8]);
        assert_eq!(reasons(&d, 10), vec!["last 3"]);
        assert!(reasons(&d, 7).is_empty());
        pts.reverse();
        assert_eq!(run(&p, &pts), d);
    }

    #[test]
    fn ties_are_broken_by_id_deterministically() {
        let t = datetime!(2026-11-20 10:00 UTC);
        let pts = vec![pt(5, t), pt(9, t), pt(7, t)];
        let d = run(&policy(|p| p.keep_last = Some(1)), &pts);
        assert_eq!(kept(&d), vec![9]);
        // Same period, same instant: the daily rule keeps the same one (and, its count not used
        // up, the oldest as well).
        let d = run(&policy(|p| p.keep_daily = Some(5)), &pts);
        assert_eq!(reasons(&d, 9), vec!["daily 2026-11-20"]);
        assert_eq!(reasons(&d, 5), vec!["oldest daily"]);
        assert!(!d.iter().find(|x| x.id == pid(7)).unwrap().keep);
    }

    #[test]
    fn one_point_matched_by_several_rules_names_them_all() {
        let pts = daily(time::macros::date!(2026 - 11 - 28), 40);
        let p = policy(|p| {
            p.keep_last = Some(1);
            p.keep_daily = Some(2);
            p.keep_weekly = Some(1);
            p.keep_monthly = Some(1);
            p.keep_yearly = Some(1);
            p.keep_within = Some("1d".parse().unwrap());
        });
        let d = run(&p, &pts);
        assert_eq!(
            reasons(&d, 40),
            vec![
                "last 1",
                "daily 2026-11-28",
                "weekly 2026-W48",
                "monthly 2026-11",
                "yearly 2026",
                "within 1d"
            ]
        );
        // Rules are ORed and counted independently (as restic): the newest point fills a slot of
        // every rule, so only one more day is kept.
        assert_eq!(kept(&d), vec![40, 39]);
        assert_eq!(reasons(&d, 39), vec!["daily 2026-11-27"]);
    }

    #[test]
    fn rules_count_independently_not_like_pbs() {
        // Three points a day for three days. keep-last 2 takes two of today's; keep-daily 2
        // counts today again (restic), where Proxmox would skip today and keep two older days.
        let mut pts = Vec::new();
        for (day, base) in [(26u8, 10u64), (27, 20), (28, 30)] {
            for h in 0..3u8 {
                let t = Date::from_calendar_date(2026, Month::November, day)
                    .unwrap()
                    .with_hms(8 + h * 4, 0, 0)
                    .unwrap()
                    .assume_utc();
                pts.push(pt(base + u64::from(h), t));
            }
        }
        let d = run(
            &policy(|p| {
                p.keep_last = Some(2);
                p.keep_daily = Some(2);
            }),
            &pts,
        );
        assert_eq!(kept(&d), vec![32, 31, 22]);
    }

    #[test]
    fn daily_keeps_the_newest_of_each_day_and_skips_empty_days() {
        let pts = vec![
            pt(1, datetime!(2026-11-20 08:00 UTC)),
            pt(2, datetime!(2026-11-20 20:00 UTC)),
            // no point on the 21st and 22nd
            pt(3, datetime!(2026-11-23 01:00 UTC)),
            pt(4, datetime!(2026-11-23 23:59:59 UTC)),
            pt(5, datetime!(2026-11-24 00:00 UTC)),
        ];
        let d = run(&policy(|p| p.keep_daily = Some(3)), &pts);
        assert_eq!(kept(&d), vec![5, 4, 2]);
        assert_eq!(reasons(&d, 2), vec!["daily 2026-11-20"]);
    }

    #[test]
    fn hourly_periods_are_clock_hours() {
        let pts = vec![
            pt(1, datetime!(2026-11-29 09:59:59 UTC)),
            pt(2, datetime!(2026-11-29 10:00 UTC)),
            pt(3, datetime!(2026-11-29 10:30 UTC)),
        ];
        let d = run(&policy(|p| p.keep_hourly = Some(2)), &pts);
        assert_eq!(kept(&d), vec![3, 1]);
        assert_eq!(reasons(&d, 1), vec!["hourly 2026-11-29T09"]);
    }

    #[test]
    fn month_and_year_boundaries() {
        let pts = vec![
            pt(1, datetime!(2025-12-31 23:59:59 UTC)),
            pt(2, datetime!(2026-01-01 00:00 UTC)),
            pt(3, datetime!(2026-01-31 23:00 UTC)),
            pt(4, datetime!(2026-02-01 01:00 UTC)),
            pt(5, datetime!(2026-02-28 12:00 UTC)),
        ];
        let d = run(&policy(|p| p.keep_monthly = Some(3)), &pts);
        assert_eq!(kept(&d), vec![5, 3, 1]);
        assert_eq!(reasons(&d, 1), vec!["monthly 2025-12"]);
        let d = run(&policy(|p| p.keep_yearly = Some(2)), &pts);
        assert_eq!(kept(&d), vec![5, 1]);
        assert_eq!(reasons(&d, 1), vec!["yearly 2025"]);
        // One year asked for, two present: only the newest of 2026 (the oldest rule is moot).
        let d = run(&policy(|p| p.keep_yearly = Some(1)), &pts);
        assert_eq!(kept(&d), vec![5]);
    }

    #[test]
    fn iso_weeks_across_year_ends() {
        // 2026 has 53 ISO weeks: Mon 28 Dec 2026 .. Sun 3 Jan 2027 is 2026-W53. Mon 30 Dec 2024
        // .. Sun 5 Jan 2025 is 2025-W01.
        let pts = vec![
            pt(1, datetime!(2024-12-29 12:00 UTC)), // Sunday, 2024-W52
            pt(2, datetime!(2024-12-30 12:00 UTC)), // Monday, 2025-W01
            pt(3, datetime!(2025-01-05 23:00 UTC)), // Sunday, 2025-W01
            pt(4, datetime!(2026-12-27 12:00 UTC)), // Sunday, 2026-W52
            pt(5, datetime!(2026-12-28 00:00 UTC)), // Monday, 2026-W53
            pt(6, datetime!(2027-01-03 23:59 UTC)), // Sunday, 2026-W53
        ];
        let now = datetime!(2027-02-01 00:00 UTC);
        let d = apply(
            &policy(|p| p.keep_weekly = Some(4)),
            &pts,
            now,
            UtcOffset::UTC,
        )
        .unwrap();
        assert_eq!(kept(&d), vec![6, 4, 3, 1]);
        assert_eq!(reasons(&d, 6), vec!["weekly 2026-W53"]);
        assert_eq!(reasons(&d, 3), vec!["weekly 2025-W01"]);
        assert_eq!(reasons(&d, 1), vec!["weekly 2024-W52"]);
    }

    #[test]
    fn periods_follow_the_given_time_zone() {
        let pts = vec![
            pt(1, datetime!(2026-11-19 12:00 UTC)),
            pt(2, datetime!(2026-11-20 23:30 UTC)), // 21st 01:30 at +02:00
            pt(3, datetime!(2026-11-21 00:30 UTC)), // 21st 02:30 at +02:00
        ];
        let p = policy(|p| p.keep_daily = Some(2));
        let utc = apply(&p, &pts, NOW, UtcOffset::UTC).unwrap();
        assert_eq!(kept(&utc), vec![3, 2]);
        let east = apply(&p, &pts, NOW, offset!(+2)).unwrap();
        assert_eq!(kept(&east), vec![3, 1]);
        assert_eq!(reasons(&east, 3), vec!["daily 2026-11-21"]);
        // West of UTC the two late points fall on the 20th instead, and the first on the 19th.
        let west = apply(&p, &pts, NOW, offset!(-5)).unwrap();
        assert_eq!(kept(&west), vec![3, 1]);
        assert_eq!(reasons(&west, 3), vec!["daily 2026-11-20"]);
        assert_eq!(reasons(&west, 1), vec!["daily 2026-11-19"]);
    }

    #[test]
    fn future_timestamps_are_kept_and_count_for_nothing() {
        let mut pts = daily(time::macros::date!(2026 - 11 - 28), 3);
        pts.push(pt(99, datetime!(2099-01-01 00:00 UTC)));
        let p = policy(|p| {
            p.keep_last = Some(1);
            p.keep_yearly = Some(1);
        });
        let d = run(&p, &pts);
        assert_eq!(kept(&d), vec![99, 3]);
        assert_eq!(reasons(&d, 99), vec!["future timestamp"]);
        assert_eq!(reasons(&d, 3), vec!["last 1", "yearly 2026"]);
        // keep-within is measured from the newest point that is not in the future.
        let d = run(
            &policy(|p| p.keep_within = Some("1d".parse().unwrap())),
            &pts,
        );
        assert_eq!(kept(&d), vec![99, 3]);
    }

    #[test]
    fn within_counts_back_from_the_newest_point_not_from_now() {
        // Backups stopped three months ago: within 30d still keeps the last 30 days of them.
        let pts = daily(time::macros::date!(2026 - 08 - 31), 40);
        let d = run(
            &policy(|p| p.keep_within = Some("30d".parse().unwrap())),
            &pts,
        );
        assert_eq!(kept(&d).len(), 30);
        assert_eq!(reasons(&d, 40), vec!["within 30d"]);
        // Exactly 30 days older than the newest is not within.
        assert!(!d.iter().find(|x| x.id == pid(10)).unwrap().keep);
    }

    #[test]
    fn within_months_clamp_to_the_end_of_a_shorter_month() {
        let s: Span = "1m".parse().unwrap();
        let at = datetime!(2026-03-31 10:00 UTC);
        assert_eq!(s.before(at), Some(datetime!(2026-02-28 10:00 UTC)));
        let s: Span = "1y2m1w1d1h".parse().unwrap();
        assert_eq!(
            s.before(datetime!(2024-02-29 10:00 UTC)),
            Some(datetime!(2022-12-21 09:00 UTC))
        );
        let s: Span = "12m".parse().unwrap();
        assert_eq!(
            s.before(datetime!(2026-01-15 00:00 UTC)),
            Some(datetime!(2025-01-15 00:00 UTC))
        );
        // Beyond the calendar's range: everything is within.
        let huge = Span {
            years: 4_000_000,
            ..Span::default()
        };
        assert_eq!(huge.before(at), None);
        let pts = daily(time::macros::date!(2026 - 11 - 28), 3);
        let d = run(&policy(|p| p.keep_within = Some(huge)), &pts);
        assert_eq!(kept(&d).len(), 3);
    }

    #[test]
    fn period_rule_longer_than_the_history_keeps_the_oldest_too() {
        let pts = vec![
            pt(1, datetime!(2026-11-01 01:00 UTC)),
            pt(2, datetime!(2026-11-01 05:00 UTC)),
            pt(3, datetime!(2026-11-20 05:00 UTC)),
        ];
        let d = run(&policy(|p| p.keep_monthly = Some(12)), &pts);
        assert_eq!(kept(&d), vec![3, 1]);
        assert_eq!(reasons(&d, 1), vec!["oldest monthly"]);
        // keep-last has no such rule: it keeps whole points, never periods.
        let d = run(&policy(|p| p.keep_last = Some(12)), &pts);
        assert_eq!(kept(&d), vec![3, 2, 1]);
    }

    #[test]
    fn tags_and_protection_keep_points_outside_the_counts() {
        let mut pts = daily(time::macros::date!(2026 - 11 - 28), 5);
        pts[0].tags = vec!["nightly".into(), "pre-upgrade".into()];
        pts[1].tags = vec!["nightly".into()];
        pts[2].protected = true;
        let p = policy(|p| {
            p.keep_last = Some(1);
            p.keep_tags = vec!["nightly,pre-upgrade".into()];
        });
        let d = run(&p, &pts);
        assert_eq!(kept(&d), vec![5, 3, 1]);
        assert_eq!(reasons(&d, 1), vec!["tag nightly,pre-upgrade"]);
        assert_eq!(reasons(&d, 3), vec!["protected"]);
        // An empty entry keeps untagged points.
        let d = run(&policy(|p| p.keep_tags = vec![String::new()]), &pts);
        assert_eq!(kept(&d), vec![5, 4, 3]);
        assert_eq!(reasons(&d, 4), vec!["tag (untagged)"]);
    }

    #[test]
    fn each_vm_is_decided_on_its_own() {
        let mut pts = daily(time::macros::date!(2026 - 11 - 28), 4);
        for p in pts.iter_mut().take(2) {
            p.vm = "db".into();
        }
        let d = run(&policy(|p| p.keep_last = Some(1)), &pts);
        assert_eq!(kept(&d), vec![2, 4]);
        assert_eq!(d[0].vm, "db");
        assert_eq!(d.len(), 4);
    }

    #[test]
    fn empty_policies_and_duplicate_points_are_refused() {
        let pts = daily(time::macros::date!(2026 - 11 - 28), 2);
        for p in [
            Policy::default(),
            policy(|p| p.keep_last = Some(0)),
            policy(|p| {
                p.keep_daily = Some(0);
                p.keep_within = Some(Span::default());
            }),
        ] {
            assert!(p.is_empty(), "{p:?}");
            let e = apply(&p, &pts, NOW, UtcOffset::UTC).unwrap_err();
            assert!(e.to_string().contains("empty"), "{e}");
        }
        assert!(!policy(|p| p.keep_tags = vec!["x".into()]).is_empty());
        let dup = vec![pts[0].clone(), pts[0].clone()];
        let e = apply(
            &policy(|p| p.keep_last = Some(1)),
            &dup,
            NOW,
            UtcOffset::UTC,
        )
        .unwrap_err();
        assert!(e.to_string().contains("twice"), "{e}");
        // No points at all is not an error.
        assert!(run(&policy(|p| p.keep_last = Some(1)), &[]).is_empty());
    }

    #[test]
    fn spans_parse_and_print() {
        for (s, want) in [
            ("30d", "30d"),
            ("12h", "12h"),
            ("2w", "2w"),
            ("1y2m", "1y2m"),
            (" 1h1y ", "1y1h"),
            ("0d", "0h"),
        ] {
            assert_eq!(s.parse::<Span>().unwrap().to_string(), want, "{s}");
        }
        for (s, says) in [
            ("", "empty"),
            ("30", "has no unit"),
            ("5x", "unknown unit 'x'"),
            ("d", "not preceded by a number"),
            ("1d2d", "given twice"),
            ("99999999999d", "too large"),
            ("-1d", "not preceded"),
        ] {
            let e = s.parse::<Span>().unwrap_err().to_string();
            assert!(e.contains(says) && e.contains("30d"), "{s}: {e}");
        }
    }

    #[test]
    fn policy_serde_is_kebab_case_and_strict() {
        let p: Policy =
            serde_json::from_str(r#"{"keep-daily": 7, "keep-within": "2w", "keep-tags": ["a"]}"#)
                .unwrap();
        assert_eq!(p.keep_daily, Some(7));
        assert_eq!(p.keep_within, Some("2w".parse().unwrap()));
        let back = serde_json::to_string(&p).unwrap();
        assert_eq!(
            back,
            r#"{"keep-daily":7,"keep-within":"2w","keep-tags":["a"]}"#
        );
        assert!(serde_json::from_str::<Policy>(r#"{"keep_daily": 7}"#).is_err());
        let e = serde_json::from_str::<Policy>(r#"{"keep-within": "3q"}"#).unwrap_err();
        assert!(e.to_string().contains("unknown unit"), "{e}");
        assert_eq!(p.to_string(), "keep daily 7, within 2w, tag 'a'");
    }
}
