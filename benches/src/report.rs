//! The results table: each blockvault figure beside the reference tool measured in the same run,
//! as a ratio against the target.

use crate::disk::Reference;
use crate::measure::Sample;

struct Target {
    work: &'static str,
    against: &'static str,
    max_ratio: f64,
}

const TARGETS: &[Target] = &[
    Target {
        work: "NBD nbdcopy whole disk",
        against: "qemu-nbd",
        max_ratio: 1.0,
    },
    Target {
        work: "full backup",
        against: "restic",
        max_ratio: 0.35,
    },
    Target {
        work: "full backup",
        against: "borg",
        max_ratio: 0.6,
    },
    Target {
        work: "restore to a stream",
        against: "restic",
        max_ratio: 0.5,
    },
    Target {
        work: "restore to a file",
        against: "restic",
        max_ratio: 0.5,
    },
];

fn find<'a>(s: &'a [Sample], work: &str, tool: &str) -> Option<&'a Sample> {
    s.iter().find(|x| x.work == work && x.tool == tool)
}

pub fn print(s: &[Sample], r: &Reference) {
    println!(
        "\nreference disk: {} MiB virtual, {} MiB of files (ext4, raw image)\n",
        r.size >> 20,
        r.data >> 20
    );
    println!(
        "{:<34} {:<11} {:>8} {:>10} {:>12}",
        "work", "tool", "wall s", "peak MiB", "repo MiB"
    );
    for x in s {
        println!(
            "{:<34} {:<11} {:>8.2} {:>10.0} {:>12}",
            x.work,
            x.tool,
            x.wall_s,
            x.peak_rss_mib,
            x.repo_bytes
                .map_or("-".into(), |b| format!("{:.0}", b as f64 / 1048576.0))
        );
    }
    println!(
        "\n{:<44} {:>7} {:>8}  verdict",
        "ratio (blockvault / reference)", "ratio", "target"
    );
    for t in TARGETS {
        if let (Some(b), Some(o)) = (
            find(s, t.work, "blockvault"),
            find(s, t.work, t.against).or_else(|| find(s, "restore to a stream", t.against)),
        ) {
            let ratio = b.wall_s / o.wall_s.max(1e-9);
            println!(
                "{:<44} {:>7.3} {:>8}  {}",
                format!("{} vs {} (wall)", t.work, t.against),
                ratio,
                format!("<= {}", t.max_ratio),
                if ratio <= t.max_ratio {
                    "met"
                } else {
                    "MISSED"
                }
            );
        }
    }
    if let (Some(b), Some(o)) = (
        find(s, "full backup", "blockvault"),
        find(s, "full backup", "restic"),
    ) {
        if let (Some(bs), Some(os)) = (b.repo_bytes, o.repo_bytes) {
            let ratio = bs as f64 / os as f64;
            println!(
                "{:<44} {:>7.3} {:>8}  {}",
                "stored size vs restic",
                ratio,
                "<= 1",
                if ratio <= 1.0 { "met" } else { "MISSED" }
            );
        }
    }
    for x in s
        .iter()
        .filter(|x| x.tool == "blockvault" && x.work.starts_with("full backup"))
    {
        println!(
            "{:<44} {:>7.0} {:>8}  {}",
            format!("peak memory MiB, {}", x.work),
            x.peak_rss_mib,
            "<= 256",
            if x.peak_rss_mib <= 256.0 {
                "met"
            } else {
                "MISSED"
            }
        );
    }
}

pub fn to_json(s: &[Sample], r: &Reference) -> serde_json::Value {
    serde_json::json!({"disk_size": r.size, "disk_data": r.data, "samples": s})
}
