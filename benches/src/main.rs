//! Benchmark harness: builds the reference disk of `docs/BENCHMARKS.md` (size
//! configurable), then measures blockvault and the reference tools (restic, borg) on it in one run
//! and prints a table of ratios against targets. Machines here are noisy, so only ratios measured
//! side by side mean anything.

mod agent;
mod boot;
mod disk;
mod files;
mod maintenance;
mod measure;
mod nbd;
mod report;
mod s3;
mod scale;
mod sweep;
mod vhdx;

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Parser;

#[derive(Parser, Debug)]
#[command(about = "blockvault benchmarks against restic and borg")]
pub struct Args {
    /// The blockvault binary to measure (a release build).
    #[arg(long)]
    pub blockvault: PathBuf,
    /// Virtual size of the reference disk (e.g. 8GiB, or 2GiB for a quick run).
    #[arg(long, default_value = "8GiB")]
    pub size: String,
    /// Working directory (needs about 3x the disk's data free).
    #[arg(long, default_value = "/var/tmp/blockvault-bench")]
    pub workdir: PathBuf,
    /// Keep the reference disk between runs.
    #[arg(long)]
    pub keep_disk: bool,
    /// Also measure peak memory on a sparse disk this many times larger (0 to skip).
    #[arg(long, default_value_t = 8)]
    pub sparse_factor: u64,
    /// Skip the reference tools (blockvault figures only; no ratios).
    #[arg(long)]
    pub no_reference: bool,
    /// Also sweep chunk sizes and zstd levels (needs the vhdx part for its incremental).
    #[arg(long)]
    pub sweep: bool,
    /// S3-protocol servers to run the S3 part against (repeatable).
    #[arg(long, value_enum, default_values_t = [s3::ServerKind::Moto, s3::ServerKind::S3sFs])]
    pub s3_server: Vec<s3::ServerKind>,
    /// Restore points in the maintenance part's history (forgotten down to 7, then pruned).
    #[arg(long, default_value_t = 30)]
    pub history: usize,
    /// How long the agent part watches the idle agent, in seconds.
    #[arg(long, default_value_t = 60)]
    pub idle_secs: u64,
    /// Parts to leave out of this run (repeatable): nbd, vhdx, s3, boot, maintenance, agent,
    /// scale.
    #[arg(long, value_enum)]
    pub skip: Vec<Part>,
    /// Alignment of the incremental's 640 scattered 256 KiB writes (4096: file-system blocks;
    /// 262144: each write covers exactly one default-size chunk).
    #[arg(long, default_value_t = 4096)]
    pub change_align: u64,
    /// Write the results as JSON here too.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Runs of each step that leaves nothing behind (restores, exports, verification, NBD
    /// copies, extraction), for every tool alike; the fastest counts. Backups run once.
    #[arg(long, default_value_t = 2)]
    pub repeat: usize,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Nbd,
    Vhdx,
    S3,
    Boot,
    Maintenance,
    Agent,
    /// Verify's memory on two synthetic repositories, one with 16 times the chunks.
    Scale,
}

impl Args {
    pub fn runs(&self, p: Part) -> bool {
        !self.skip.contains(&p)
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    measure::set_repeat(args.repeat);
    let size = disk::parse_size(&args.size)?;
    std::fs::create_dir_all(&args.workdir)
        .with_context(|| format!("creating {}", args.workdir.display()))?;
    let reference = disk::reference_disk(&args.workdir, size, args.keep_disk)?;
    if !args.no_reference {
        measure::ensure_tools()?;
    }
    let results = measure::run_all(&args, &reference)?;
    report::print(&results, &reference);
    if let Some(p) = &args.json {
        std::fs::write(
            p,
            serde_json::to_vec_pretty(&report::to_json(&results, &reference))?,
        )?;
    }
    Ok(())
}
