//! `prune`, `forget`, `points protect/unprotect`: render the engine's maintenance reports.

use anyhow::{anyhow, Result};
use blockvault_engine::{
    forget as run_forget, prune as run_prune, ForgetOptions, ForgetReport, ForgetTarget,
    PruneOptions, PruneReport,
};

use crate::commands::{open_repo, print_json};
use crate::exit::InputError;
use crate::size::{human, parse_size};
use crate::{ForgetArgs, Global, PruneArgs};

/// Parses `90s`, `30m`, `24h`, `7d`, `1w` (or a plain number of seconds; fractions allowed).
pub(crate) fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("'{s}' is not a duration (examples: 24h, 90m, 2s, 7d)"))?;
    let secs = match unit {
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        "w" => 7.0 * 86400.0,
        u => return Err(format!("'{s}': unknown unit '{u}' (use s, m, h, d or w)")),
    };
    let v = n * secs;
    if !v.is_finite() || !(0.0..=100.0 * 365.0 * 86400.0).contains(&v) {
        return Err(format!("'{s}' is out of range"));
    }
    Ok(std::time::Duration::from_secs_f64(v))
}

/// Parses `5%`, `0%`, `12.5%` or `unlimited` into a share (1.0 for unlimited).
pub(crate) fn parse_share(s: &str) -> Result<f64, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("unlimited") {
        return Ok(1.0);
    }
    let n: f64 = t
        .strip_suffix('%')
        .ok_or_else(|| format!("'{s}' is not a percentage (examples: 5%, 0%, unlimited)"))?
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a percentage (examples: 5%, 0%, unlimited)"))?;
    if !(0.0..=100.0).contains(&n) {
        return Err(format!("'{s}' is not between 0% and 100%"));
    }
    Ok(n / 100.0)
}

pub async fn prune(g: &Global, a: PruneArgs) -> Result<()> {
    let grace =
        parse_duration(&a.grace).map_err(|e| anyhow!(InputError(format!("--grace {e}"))))?;
    let max_unused =
        parse_share(&a.max_unused).map_err(|e| anyhow!(InputError(format!("--max-unused {e}"))))?;
    let max_repack = match &a.max_repack {
        Some(s) => parse_size(s).map_err(|e| anyhow!(InputError(format!("--max-repack {e}"))))?,
        None => u64::MAX,
    };
    let repo = open_repo(g).await?;
    let report = run_prune(
        repo,
        PruneOptions {
            grace,
            dry_run: a.dry_run,
            max_unused,
            max_repack,
            ..Default::default()
        },
    )
    .await?;
    if g.json {
        print_json(&serde_json::to_value(&report)?);
    } else {
        print_prune(&report);
    }
    Ok(())
}

fn print_prune(r: &PruneReport) {
    let head = if r.dry_run {
        "prune (dry run, nothing changed)".to_string()
    } else {
        format!("prune epoch {}", r.epoch)
    };
    println!(
        "{head}: {} restore points, {} live chunks, {} packs ({})",
        r.points,
        r.live_chunks,
        r.packs_listed.packs,
        human(r.packs_listed.bytes)
    );
    let verb = if r.dry_run { "would delete" } else { "deleted" };
    println!(
        "  {verb}        {} packs ({})",
        r.deleted.packs,
        human(r.deleted.bytes)
    );
    if r.recovered.packs > 0 {
        println!(
            "  taken back     {} packs ({}): a restore point needs them again",
            r.recovered.packs,
            human(r.recovered.bytes)
        );
    }
    let verb = if r.dry_run {
        "would condemn"
    } else {
        "condemned"
    };
    println!(
        "  {verb}      {} packs ({})",
        r.condemned.packs,
        human(r.condemned.bytes)
    );
    match &r.pending_deletable_at {
        Some(at) if r.pending.packs > 0 => println!(
            "  pending        {} packs ({}), deletable by a prune from {at}",
            r.pending.packs,
            human(r.pending.bytes)
        ),
        _ if r.pending.packs > 0 => println!(
            "  pending        {} packs ({})",
            r.pending.packs,
            human(r.pending.bytes)
        ),
        _ => println!("  pending        nothing"),
    }
    if r.held_by_leases.packs > 0 {
        println!(
            "  held           {} packs ({}) until older backups, mounts or verifies end",
            r.held_by_leases.packs,
            human(r.held_by_leases.bytes)
        );
    }
    if r.repacked.packs > 0 || !r.repack_skipped.is_empty() {
        let verb = if r.dry_run {
            "would repack"
        } else {
            "repacked"
        };
        println!(
            "  {verb}       {} packs ({}) into {} new packs ({}); unused in kept packs {} -> {}",
            r.repacked.packs,
            human(r.repacked.bytes),
            r.repack_written.packs,
            human(r.repack_written.bytes),
            human(r.unused_before),
            human(r.unused_after)
        );
    }
    for s in &r.repack_skipped {
        println!("  not repacked   {s}");
    }
    if r.segments_retired > 0 {
        println!("  index segments retired: {}", r.segments_retired);
    }
    println!(
        "  {} S3/storage requests, {:.1}s",
        r.storage.requests,
        r.duration_ms as f64 / 1000.0
    );
}

pub async fn protect(g: &Global, text: &str, on: bool) -> Result<()> {
    let repo = open_repo(g).await?;
    let id = repo.resolve_point(text).await?;
    if on {
        repo.protect_point(&id).await?;
    } else {
        repo.unprotect_point(&id).await?;
    }
    if g.json {
        print_json(&serde_json::json!({"point": id, "protected": on}));
    } else if on {
        println!("restore point {id} is protected: no retention policy removes it");
    } else {
        println!("restore point {id} is no longer protected");
    }
    Ok(())
}

pub fn print_state(st: &blockvault_engine::points::MaintenanceState) {
    match &st.last_prune {
        Some(p) => println!(
            "last prune    epoch {} on {} at {} ({} packs deleted)",
            p.epoch, p.host, p.published, p.deleted_packs
        ),
        None => println!("last prune    never"),
    }
    println!(
        "pending       {} packs ({}) condemned, awaiting deletion",
        st.pending_packs,
        human(st.pending_bytes)
    );
    let live: Vec<&blockvault_engine::points::LeaseView> =
        st.leases.iter().filter(|l| l.live).collect();
    println!("leases        {} live", live.len());
    for l in &st.leases {
        println!(
            "  {} {:?} on {} pid {} since {}{}",
            &l.id[..8],
            l.kind,
            l.host,
            l.pid,
            l.started,
            if l.live { "" } else { " (stale)" }
        );
    }
}

pub async fn forget(g: &Global, a: ForgetArgs) -> Result<()> {
    let keep_within = match &a.keep_within {
        Some(s) => Some(
            s.parse::<blockvault_engine::retention::Span>()
                .map_err(|e| anyhow!(InputError(format!("--keep-within: {e}"))))?,
        ),
        None => None,
    };
    let policy = blockvault_engine::retention::Policy {
        keep_last: a.keep_last,
        keep_hourly: a.keep_hourly,
        keep_daily: a.keep_daily,
        keep_weekly: a.keep_weekly,
        keep_monthly: a.keep_monthly,
        keep_yearly: a.keep_yearly,
        keep_within,
        keep_tags: a.keep_tags.clone(),
    };
    let has_policy = policy != blockvault_engine::retention::Policy::default();
    if !a.points.is_empty() && (has_policy || a.vm.is_some()) {
        return Err(anyhow!(InputError(
            "forget takes either points to remove or a --keep-* policy, not both".into()
        )));
    }
    if a.points.is_empty() && policy.is_empty() {
        return Err(anyhow!(InputError(
            "forget needs points to remove or a --keep-* policy; an empty policy would remove \
             every restore point and is refused"
                .into()
        )));
    }
    let repo = open_repo(g).await?;
    let target = if a.points.is_empty() {
        ForgetTarget::Policy {
            vm: a.vm.clone(),
            policy,
        }
    } else {
        let mut ids = Vec::new();
        for p in &a.points {
            ids.push(repo.resolve_point(p).await?);
        }
        ForgetTarget::Points(ids)
    };
    let report = run_forget(
        repo,
        ForgetOptions {
            target,
            dry_run: a.dry_run,
            tz: local_offset(),
        },
    )
    .await?;
    if g.json {
        print_json(&serde_json::to_value(&report)?);
    } else {
        print_forget(&report);
    }
    Ok(())
}

/// The machine's UTC offset now (from `TZ` or the system's zone), used for the whole run so that
/// calendar periods are the operator's days, not UTC's (docs/OPERATIONS.md, "forget").
fn local_offset() -> time::UtcOffset {
    let secs = chrono::Local::now().offset().local_minus_utc();
    time::UtcOffset::from_whole_seconds(secs).unwrap_or(time::UtcOffset::UTC)
}

fn print_forget(r: &ForgetReport) {
    let mut vm = None;
    for d in &r.decisions {
        if vm != Some(&d.vm) {
            println!("VM {}", d.vm);
            vm = Some(&d.vm);
        }
        let verdict = match (d.keep, r.dry_run) {
            (true, _) => "keep  ",
            (false, true) => "would remove",
            (false, false) => "remove",
        };
        println!(
            "  {verdict}  {}  {}  {}",
            d.id,
            d.created.get(..19).unwrap_or(&d.created),
            d.reasons.join(", ")
        );
    }
    for id in &r.unreadable {
        println!("  unreadable {id} (left alone)");
    }
    println!(
        "{} kept, {} {}",
        r.kept,
        r.removed,
        if r.dry_run {
            "would be removed"
        } else {
            "removed"
        }
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_parse_and_bad_ones_are_named() {
        assert_eq!(parse_share("5%").unwrap(), 0.05);
        assert_eq!(parse_share(" 0% ").unwrap(), 0.0);
        assert_eq!(parse_share("12.5%").unwrap(), 0.125);
        assert_eq!(parse_share("unlimited").unwrap(), 1.0);
        assert!(parse_share("5").unwrap_err().contains("'5'"));
        assert!(parse_share("101%").unwrap_err().contains("between"));
        assert!(parse_share("-1%").is_err());
    }
}
