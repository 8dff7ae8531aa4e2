//! Job schedules: a cron expression (5 fields, or 6 with seconds first) or a systemd calendar
//! event (`daily`, `Mon..Fri 02:30`, `*-*-* *:0/15:00`), read in a time zone. Calendar events are
//! translated into the equivalent cron pattern, so one evaluator (the `croner` crate) computes every
//! next run.

use chrono::{DateTime, LocalResult, TimeZone, Utc};
use chrono_tz::Tz;
use croner::Cron;

/// A parsed schedule.
#[derive(Clone, Debug)]
pub struct Schedule {
    pub text: String,
    pub tz: Tz,
    cron: Cron,
}

impl Schedule {
    pub fn parse(text: &str, tz: Tz) -> Result<Self, String> {
        let t = text.trim();
        let calendar = !looks_like_cron(t);
        let pattern = if calendar {
            calendar_to_cron(t)?
        } else {
            t.to_string()
        };
        let mut cron = Cron::new(&pattern);
        cron.with_seconds_optional();
        if calendar {
            // A calendar event's weekday and date must both match (`Mon *-*-1..7` is the first
            // Monday of a month); cron's own rule, kept for cron text, fires when either does.
            cron.with_dom_and_dow();
        }
        let cron = cron
            .parse()
            .map_err(|e| format!("'{text}' is not a valid schedule: {e}"))?;
        let s = Self {
            text: text.to_string(),
            tz,
            cron,
        };
        // A pattern that can never fire (Feb 30) is refused rather than silently never running.
        s.next_after(Utc::now())
            .ok_or_else(|| format!("'{text}' never occurs"))?;
        Ok(s)
    }

    /// The first time strictly after `t` the schedule fires.
    ///
    /// croner searches wall-clock time and answers a wall time that occurs twice (the hour
    /// repeated when clocks go back) with its first instant, which lies before `t` when `t` is
    /// in the second pass (02:30 asked for at 02:10 the second time round is 02:30 the first
    /// time round, an hour ago). Such an answer is replaced by its later instant when that is
    /// after `t`, else the search goes on from it. Each wall time thus fires once: the first
    /// time round, or the second when the search starts inside the repeated hour.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let mut from = t.with_timezone(&self.tz);
        for _ in 0..MAX_SEARCHES {
            let next = self.cron.find_next_occurrence(&from, false).ok()?;
            let instants = match self.tz.from_local_datetime(&next.naive_local()) {
                LocalResult::Ambiguous(a, b) => [a, b],
                // A time in a gap (moved on by croner) or an unambiguous one.
                _ => [next, next],
            };
            if let Some(at) = instants.into_iter().find(|i| *i > t) {
                return Some(at.with_timezone(&Utc));
            }
            from = next;
        }
        None
    }
}

/// Searches of croner for one next run. Each moves the wall time on by at least a second, and
/// only answers inside a repeated hour (at most two hours anywhere) can lie at or before `t`.
const MAX_SEARCHES: usize = 2 * 3600 + 2;

/// Cron patterns are five or six fields of digits and cron punctuation (names allowed), never a
/// `:` (which every calendar-event time has) and never a calendar shortcut.
fn looks_like_cron(t: &str) -> bool {
    if t.starts_with('@') {
        return true;
    }
    let fields: Vec<&str> = t.split_whitespace().collect();
    (fields.len() == 5 || fields.len() == 6) && !t.contains(':') && !t.contains("..")
}

const DAYS: [&str; 7] = [
    "sunday",
    "monday",
    "tuesday",
    "wednesday",
    "thursday",
    "friday",
    "saturday",
];

/// A weekday by its three-letter or full English name, in any case; anything else (`Mon-Fri`,
/// `Mond`) is refused rather than read as the day it starts with.
fn day_number(s: &str) -> Result<u32, String> {
    let l = s.to_ascii_lowercase();
    DAYS.iter()
        .position(|d| l == *d || l == d[..3])
        .map(|i| i as u32)
        .ok_or_else(|| {
            format!("'{s}' is not a weekday (Mon, Tue, ... Sun, or full names; ranges as Mon..Fri)")
        })
}

/// `Mon..Fri,Sun` to the cron weekday field `1-5,0`.
fn weekdays(s: &str) -> Result<String, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        match part.split_once("..") {
            Some((a, b)) => out.push(format!("{}-{}", day_number(a)?, day_number(b)?)),
            None => out.push(day_number(part)?.to_string()),
        }
    }
    Ok(out.join(","))
}

/// One calendar-event component (`*`, `5`, `0/15`, `1,3`, `8..17`) as a cron field of range
/// `[min, max]`.
fn component(s: &str, min: u32, max: u32, what: &str) -> Result<String, String> {
    if s == "*" {
        return Ok("*".into());
    }
    let num = |v: &str| -> Result<u32, String> {
        let n: u32 = v
            .parse()
            .map_err(|_| format!("'{v}' is not a number in the {what}"))?;
        if n < min || n > max {
            return Err(format!("{what} {n} is outside {min}..{max}"));
        }
        Ok(n)
    };
    let mut out = Vec::new();
    for part in s.split(',') {
        if let Some((start, step)) = part.split_once('/') {
            let start = if start == "*" { min } else { num(start)? };
            let step: u32 = step
                .parse()
                .ok()
                .filter(|n| *n > 0)
                .ok_or_else(|| format!("'{step}' is not a repetition in the {what}"))?;
            out.push(format!("{start}-{max}/{step}"));
        } else if let Some((a, b)) = part.split_once("..") {
            out.push(format!("{}-{}", num(a)?, num(b)?));
        } else {
            out.push(num(part)?.to_string());
        }
    }
    Ok(out.join(","))
}

/// A systemd calendar event (systemd.time(7)) in the subset blockvault reads:
/// `[WEEKDAYS] [YEAR-MONTH-DAY] [HOUR:MINUTE[:SECOND]]`, and the shortcuts minutely, hourly,
/// daily, weekly, monthly, quarterly, semiannually, yearly/annually.
pub fn calendar_to_cron(t: &str) -> Result<String, String> {
    let short = match t.to_ascii_lowercase().as_str() {
        "minutely" => Some("0 * * * * *"),
        "hourly" => Some("0 0 * * * *"),
        "daily" => Some("0 0 0 * * *"),
        "weekly" => Some("0 0 0 * * 1"),
        "monthly" => Some("0 0 0 1 * *"),
        "quarterly" => Some("0 0 0 1 1,4,7,10 *"),
        "semiannually" => Some("0 0 0 1 1,7 *"),
        "yearly" | "annually" => Some("0 0 0 1 1 *"),
        _ => None,
    };
    if let Some(s) = short {
        return Ok(s.into());
    }
    let mut dow = "*".to_string();
    let (mut dom, mut mon) = ("*".to_string(), "*".to_string());
    let (mut hour, mut min, mut sec) = ("0".to_string(), "0".to_string(), "0".to_string());
    let mut saw_time = false;
    for (i, tok) in t.split_whitespace().enumerate() {
        if tok.contains(':') {
            if saw_time {
                return Err(format!("'{t}': two times"));
            }
            saw_time = true;
            let parts: Vec<&str> = tok.split(':').collect();
            if parts.len() < 2 || parts.len() > 3 {
                return Err(format!("'{tok}' is not HOUR:MINUTE[:SECOND]"));
            }
            hour = component(parts[0], 0, 23, "hour")?;
            min = component(parts[1], 0, 59, "minute")?;
            sec = match parts.get(2) {
                Some(s) => component(s, 0, 59, "second")?,
                None => "0".into(),
            };
        } else if tok.contains('-')
            && tok
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_digit() || c == '*')
        {
            let parts: Vec<&str> = tok.split('-').collect();
            let (y, m, d) = match parts.as_slice() {
                [y, m, d] => (*y, *m, *d),
                [m, d] => ("*", *m, *d),
                _ => return Err(format!("'{tok}' is not YEAR-MONTH-DAY")),
            };
            if y != "*" {
                return Err(format!(
                    "'{tok}': a year other than * is not supported in schedules"
                ));
            }
            mon = component(m, 1, 12, "month")?;
            dom = component(d, 1, 31, "day")?;
        } else if i == 0 && tok.chars().next().is_some_and(|c| c.is_ascii_alphabetic()) {
            dow = weekdays(tok)?;
        } else {
            return Err(format!(
                "'{t}' is neither a cron expression nor a calendar event (e.g. 'Mon..Fri 02:30', '*-*-* 04:00:00', 'daily')"
            ));
        }
    }
    Ok(format!("{sec} {min} {hour} {dom} {mon} {dow}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn cron_and_calendar_events_agree() {
        let t = at("2026-11-27T10:00:00Z"); // a Friday
        let a = Schedule::parse("30 2 * * *", chrono_tz::UTC).unwrap();
        let b = Schedule::parse("*-*-* 02:30:00", chrono_tz::UTC).unwrap();
        assert_eq!(a.next_after(t), Some(at("2026-11-28T02:30:00Z")));
        assert_eq!(a.next_after(t), b.next_after(t));
        let w = Schedule::parse("Mon..Fri 02:30", chrono_tz::UTC).unwrap();
        assert_eq!(w.next_after(t), Some(at("2026-11-30T02:30:00Z")));
        let d = Schedule::parse("daily", chrono_tz::UTC).unwrap();
        assert_eq!(d.next_after(t), Some(at("2026-11-28T00:00:00Z")));
        let q = Schedule::parse("*:0/15", chrono_tz::UTC).unwrap();
        assert_eq!(q.next_after(t), Some(at("2026-11-27T10:15:00Z")));
        let s = Schedule::parse("*/3 * * * * *", chrono_tz::UTC).unwrap();
        assert_eq!(s.next_after(t), Some(at("2026-11-27T10:00:03Z")));
    }

    #[test]
    fn a_weekday_with_a_date_needs_both() {
        let t = at("2026-11-27T10:00:00Z"); // a Friday
                                            // The first Monday of a month: 7 December 2026, not the next Monday (30 November) nor
                                            // the 1st (a Tuesday).
        let first_monday = Schedule::parse("Mon *-*-1..7 02:00", chrono_tz::UTC).unwrap();
        assert_eq!(first_monday.next_after(t), Some(at("2026-12-07T02:00:00Z")));
        let full_name = Schedule::parse("Monday *-*-1..7 02:00", chrono_tz::UTC).unwrap();
        assert_eq!(full_name.next_after(t), first_monday.next_after(t));
        // Cron text keeps cron's rule: day 1 to 7 or any Monday.
        let cron = Schedule::parse("0 2 1-7 * 1", chrono_tz::UTC).unwrap();
        assert_eq!(cron.next_after(t), Some(at("2026-11-30T02:00:00Z")));
    }

    #[test]
    fn time_zone_is_applied() {
        let s = Schedule::parse("*-*-* 02:30:00", chrono_tz::Europe::Berlin).unwrap();
        // 02:30 in Berlin in winter is 01:30 UTC.
        let t = Utc.with_ymd_and_hms(2026, 11, 27, 10, 0, 0).unwrap();
        assert_eq!(s.next_after(t), Some(at("2026-11-28T01:30:00Z")));
    }

    /// 25 October 2026, Europe/Berlin: at 01:00 UTC the clocks go back from 03:00 to 02:00, so
    /// the wall times 02:00 to 02:59 occur twice (00:00 to 00:59 UTC, then 01:00 to 01:59 UTC).
    #[test]
    fn the_repeated_hour_never_yields_a_time_in_the_past() {
        let daily = Schedule::parse("*-*-* 02:30", chrono_tz::Europe::Berlin).unwrap();
        // 02:10 the second time round: 02:30 the first time round is in the past.
        let t = at("2026-10-25T01:10:00Z");
        assert_eq!(daily.next_after(t), Some(at("2026-10-25T01:30:00Z")));
        // Once run the first time round, 02:30 does not come again that night.
        let t = at("2026-10-25T00:30:00Z");
        assert_eq!(daily.next_after(t), Some(at("2026-10-26T01:30:00Z")));

        let quarter = Schedule::parse("*:0/15", chrono_tz::Europe::Berlin).unwrap();
        let mut t = at("2026-10-24T23:20:00Z");
        let mut seen = Vec::new();
        while t < at("2026-10-25T03:00:00Z") {
            let next = quarter.next_after(t).unwrap();
            assert!(next > t, "{next} after {t}: {seen:?}");
            assert!(next - t <= chrono::Duration::hours(1) + chrono::Duration::minutes(15));
            seen.push(next);
            t = next;
        }
        // Started inside the repeated hour, the next quarter is the next one on the clock.
        for start in ["2026-10-25T01:10:00Z", "2026-10-25T01:00:00Z"] {
            let t = at(start);
            let next = quarter.next_after(t).unwrap();
            assert!(
                next > t && next - t <= chrono::Duration::minutes(15),
                "{next} after {t}"
            );
        }
    }

    #[test]
    fn nonsense_is_refused_with_a_reason() {
        for bad in [
            "25:00",
            "Funday 02:00",
            "Mon-Fri 02:30",
            "Mond 02:30",
            "2027-01-01 00:00",
            "every day",
            "61 * * * *",
        ] {
            let e = Schedule::parse(bad, chrono_tz::UTC).unwrap_err();
            assert!(!e.is_empty(), "{bad}");
        }
    }
}
