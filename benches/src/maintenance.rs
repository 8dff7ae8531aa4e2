//! Retention and reclaiming space (docs/BENCHMARKS.md, "Maintenance"): a history of restore
//! points of the reference disk, the 2 % change of the incremental recipe applied between each,
//! backed up by blockvault (RCT-driven incrementals) and by restic (`backup --stdin` of the whole
//! image). Then `forget` to the newest 7 points and `prune`, beside `restic forget --keep-last 7
//! --prune`. What the removed points alone held is measured, not estimated: the 7 kept states are
//! also backed up into a repository of their own, whose size is what a perfect prune would leave.
//! The same history in an S3 server gives the requests per GiB reclaimed.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};

use crate::disk::{run, Reference};
use crate::measure::{dir_bytes, timed, Sample, PASSWORD};
use crate::s3::{Server, ServerKind};
use crate::vhdx::{rct_doc, WRITES, WRITE_LEN};

/// Points kept by the retention rule.
pub const KEEP: usize = 7;

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct MaintFigures {
    pub points: usize,
    pub kept: usize,
    /// blockvault's repository before forget and after the prunes.
    pub before: u64,
    pub after: u64,
    /// A repository holding only the kept states: what a perfect prune leaves.
    pub ideal: u64,
    pub restic_before: u64,
    pub restic_after: u64,
    /// The S3 history: requests the forget and prunes made, and the bytes they deleted.
    pub s3_requests: u64,
    pub s3_deleted: u64,
    pub s3_server: String,
}

/// Applies change number `step` to `raw`: the recipe's 640 scattered 256 KiB writes, each a
/// one-byte pattern, at offsets drawn from a seed of their own. Returns the ranges written.
fn apply_change(raw: &Path, size: u64, step: u64) -> Result<Vec<(u64, u64)>> {
    let f = OpenOptions::new().write(true).open(raw)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed_0000 + step);
    let mut ranges: Vec<(u64, u64)> = Vec::new();
    while (ranges.len() as u64) < WRITES {
        let off = rng.gen_range(0..(size - WRITE_LEN) / 4096) * 4096;
        if ranges
            .iter()
            .all(|&(o, l)| off + WRITE_LEN <= o || o + l <= off)
        {
            ranges.push((off, WRITE_LEN));
        }
    }
    ranges.sort_unstable();
    for (i, &(off, len)) in ranges.iter().enumerate() {
        let byte = 1 + ((step as usize * 7 + i) % 255) as u8;
        f.write_all_at(&vec![byte; len as usize], off)?;
    }
    f.sync_all()?;
    Ok(ranges)
}

fn rct_id(step: u64) -> String {
    format!("rctX:hist:{step:08}")
}

/// `blockvault backup` of the history disk at `step`, incremental from the previous step's RCT
/// id (a full backup at step 0).
fn backup(
    mut c: Command,
    work: &Path,
    raw: &Path,
    size: u64,
    step: u64,
    ranges: &[(u64, u64)],
) -> Result<()> {
    let doc = work.join(format!("hist-{step}.json"));
    let limit = (step > 0).then(|| rct_id(step - 1));
    std::fs::write(
        &doc,
        rct_doc(size, limit.as_deref(), &rct_id(step), ranges).to_string(),
    )?;
    c.args(["backup", "--vm", "hist", "--disk"])
        .arg(format!("d={}", raw.display()))
        .arg("--changes")
        .arg(format!("d={}", doc.display()));
    run(&mut c)?;
    std::fs::remove_file(&doc)?;
    Ok(())
}

fn json_of(c: Command) -> Result<serde_json::Value> {
    let mut c = c;
    let o = c.output()?;
    if !o.status.success() {
        bail!("{c:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    }
    serde_json::from_slice(&o.stdout).with_context(|| format!("JSON from {c:?}"))
}

fn num(v: &serde_json::Value, path: &[&str]) -> u64 {
    path.iter().fold(v, |v, p| &v[*p]).as_u64().unwrap_or(0)
}

/// Forget to the newest `KEEP` points, then prune twice with no grace (condemn, then, a little
/// over the store-time slack later, delete). Returns the samples, the S3 requests the three
/// commands reported, and the bytes they reclaimed (deleted less written by repacking).
fn forget_and_prune(bv: &dyn Fn() -> Command, tool: &str) -> Result<(Vec<Sample>, u64, u64)> {
    let mut out = Vec::new();
    let report = tempfile::NamedTempFile::new()?;
    let mut c = bv();
    c.args([
        "forget",
        "--vm",
        "hist",
        "--keep-last",
        &KEEP.to_string(),
        "--json",
    ]);
    out.push(timed("forget to 7", tool, c, None, Some(report.path()))?);
    let f: serde_json::Value = serde_json::from_slice(&std::fs::read(report.path())?)?;
    let mut requests = num(&f, &["storage", "requests"]);
    let mut deleted: i64 = 0;
    for phase in ["prune, condemn", "prune, delete"] {
        let mut c = bv();
        c.args(["prune", "--grace", "0s", "--json"]);
        out.push(timed(phase, tool, c, None, Some(report.path()))?);
        let p: serde_json::Value = serde_json::from_slice(&std::fs::read(report.path())?)?;
        requests += num(&p, &["storage", "requests"]);
        // Net: what the sweep deleted less the new packs a repack wrote.
        deleted += num(&p, &["deleted", "bytes"]) as i64;
        deleted -= num(&p, &["repack_written", "bytes"]) as i64;
        // Store times are compared with one second of slack (and S3 reports whole seconds).
        std::thread::sleep(Duration::from_millis(2200));
    }
    // The whole job, as restic's one command does it (the wait between the prunes left out).
    out.push(Sample {
        work: "forget to 7 and prune".into(),
        tool: tool.into(),
        wall_s: out.iter().map(|s| s.wall_s).sum(),
        peak_rss_mib: out.iter().map(|s| s.peak_rss_mib).fold(0.0, f64::max),
        repo_bytes: None,
    });
    Ok((out, requests, deleted.max(0) as u64))
}

/// The whole part. `bv(repo, cache)` makes a blockvault command on a local repository.
pub fn run_all(
    bv: impl Fn(&Path, &Path) -> Command,
    blockvault: &Path,
    work: &Path,
    r: &Reference,
    points: usize,
    restic: bool,
    s3: Option<ServerKind>,
) -> Result<(Vec<Sample>, MaintFigures)> {
    if points <= KEEP {
        bail!("a history of {points} points keeps them all; give more than {KEEP}");
    }
    let raw = work.join("hist.raw");
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(&r.raw)
        .arg(&raw))?;
    let (repo, cache) = (work.join("maint-repo"), work.join("maint-cache"));
    let (ideal, ideal_cache) = (work.join("maint-ideal"), work.join("maint-ideal-cache"));
    let rrepo = work.join("maint-restic");
    for d in [&repo, &cache, &ideal, &ideal_cache, &rrepo] {
        let _ = std::fs::remove_dir_all(d);
    }
    run(bv(&repo, &cache).args(["repo", "init"]))?;
    run(bv(&ideal, &ideal_cache).args(["repo", "init"]))?;
    let restic_cmd = |a: &[&str]| {
        let mut c = Command::new("restic");
        c.env("RESTIC_REPOSITORY", &rrepo)
            .env("RESTIC_PASSWORD", PASSWORD)
            .args(a)
            .arg("--quiet");
        c
    };
    if restic {
        run(&mut restic_cmd(&["init"]))?;
    }
    let server = s3.map(|k| Server::start(k, work)).transpose()?;
    let s3_cache = work.join("maint-s3-cache");
    let _ = std::fs::remove_dir_all(&s3_cache);
    let bv_s3 = || {
        let s = server.as_ref().expect("an S3 server");
        crate::s3::command(blockvault, s.port, &s3_cache, "maint")
    };
    if server.is_some() {
        run(bv_s3().args(["repo", "init"]))?;
    }

    let mut ranges = Vec::new();
    for step in 0..points as u64 {
        if step > 0 {
            ranges = apply_change(&raw, r.size, step)?;
        }
        eprintln!("history point {}/{points}", step + 1);
        backup(bv(&repo, &cache), work, &raw, r.size, step, &ranges)?;
        if server.is_some() {
            backup(bv_s3(), work, &raw, r.size, step, &ranges)?;
        }
        if step as usize >= points - KEEP {
            // The ideal repository holds only the states that are kept (its first is a full).
            let mut c = bv(&ideal, &ideal_cache);
            c.args(["backup", "--vm", "hist", "--disk"])
                .arg(format!("d={}", raw.display()));
            run(&mut c)?;
        }
        if restic {
            let mut c = restic_cmd(&["backup", "--stdin", "--stdin-filename", "disk.raw"]);
            c.stdin(std::fs::File::open(&raw)?);
            run(&mut c)?;
        }
    }

    let mut fig = MaintFigures {
        points,
        kept: KEEP,
        before: dir_bytes(&repo),
        ideal: dir_bytes(&ideal),
        ..Default::default()
    };
    let (mut out, _, _) = forget_and_prune(&|| bv(&repo, &cache), "blockvault")?;
    fig.after = dir_bytes(&repo);
    // The newest point still restores exactly (streamed into cmp: no second image on disk).
    let newest = json_of({
        let mut c = bv(&repo, &cache);
        c.args(["points", "list", "--json"]);
        c
    })?;
    let ids: Vec<&str> = newest
        .as_array()
        .context("points list")?
        .iter()
        .filter_map(|p| p["id"].as_str())
        .collect();
    if ids.len() != KEEP {
        bail!("forget kept {} points, not {KEEP}", ids.len());
    }
    let mut c = bv(&repo, &cache);
    c.args([
        "restore",
        "export",
        ids[KEEP - 1],
        "--disk",
        "d",
        "--out",
        "-",
    ])
    .stdout(std::process::Stdio::piped());
    let mut export = c.spawn()?;
    let st = Command::new("cmp")
        .arg("-s")
        .arg("-")
        .arg(&raw)
        .stdin(export.stdout.take().context("export's stdout")?)
        .status()?;
    if !export.wait()?.success() || !st.success() {
        bail!("the newest point after forget and prune does not restore the disk exactly");
    }
    let mut c = bv(&repo, &cache);
    c.args(["verify"]);
    run(&mut c)?;

    if let Some(s) = &server {
        let (samples, requests, deleted) =
            forget_and_prune(&bv_s3, &format!("blockvault, {}", s.name()))?;
        out.extend(samples);
        fig.s3_requests = requests;
        fig.s3_deleted = deleted;
        fig.s3_server = s.name().into();
    }
    if restic {
        fig.restic_before = dir_bytes(&rrepo);
        let c = restic_cmd(&["forget", "--keep-last", &KEEP.to_string(), "--prune"]);
        out.push(timed("forget to 7 and prune", "restic", c, None, None)?);
        fig.restic_after = dir_bytes(&rrepo);
    }
    for d in [&repo, &cache, &ideal, &ideal_cache, &rrepo, &s3_cache] {
        let _ = std::fs::remove_dir_all(d);
    }
    std::fs::remove_file(&raw)?;
    Ok((out, fig))
}
