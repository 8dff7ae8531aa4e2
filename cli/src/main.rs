//! `blockvault`: back up VM disks into an encrypted, deduplicating repository and restore them.

mod agent;
mod commands;
mod disk;
mod exit;
mod files;
mod maintenance;
mod mount;
mod password;
mod progress;
mod restore_vm;
mod size;
mod store_opts;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "blockvault",
    version,
    about = "Block-level backup of virtual machine disks"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Repository location: a directory path or s3://BUCKET/PREFIX (credentials from AWS_*).
    #[arg(long, env = "BLOCKVAULT_REPO", global = true)]
    pub repo: Option<String>,
    /// Read the repository password from this file (else BLOCKVAULT_PASSWORD, else a prompt).
    #[arg(long, global = true)]
    pub password_file: Option<PathBuf>,
    /// Where local indexes are kept (a cache; safe to delete).
    #[arg(long, env = "BLOCKVAULT_CACHE_DIR", global = true)]
    pub cache_dir: Option<PathBuf>,
    /// Print machine-readable JSON on stdout.
    #[arg(long, global = true)]
    pub json: bool,
    /// More log output (repeat for more).
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    /// No progress bars.
    #[arg(short, long, global = true)]
    pub quiet: bool,
    /// Endpoint of an S3-compatible service, e.g. http://127.0.0.1:9000 (else AWS_ENDPOINT_URL or AWS).
    #[arg(long, env = "BLOCKVAULT_S3_ENDPOINT", global = true)]
    pub s3_endpoint: Option<String>,
    /// Allow a plain-HTTP S3 endpoint.
    #[arg(long, global = true)]
    pub s3_allow_http: bool,
    /// Object-store requests in flight at once (default 16).
    #[arg(long, global = true)]
    pub s3_concurrency: Option<usize>,
    /// Upload bandwidth limit, e.g. 50MiB/s.
    #[arg(long, global = true, value_name = "RATE")]
    pub limit_upload: Option<String>,
    /// Download bandwidth limit, e.g. 50MiB/s.
    #[arg(long, global = true, value_name = "RATE")]
    pub limit_download: Option<String>,
    /// zstd level for the data this run writes (1 to 19; higher stores less and costs more CPU).
    #[arg(
        long,
        env = "BLOCKVAULT_COMPRESSION_LEVEL",
        global = true,
        default_value_t = 1
    )]
    pub compression_level: i32,
    /// Bound of the on-disk cache of blobs read from a remote repository (default 1GiB; 0 disables).
    #[arg(long, global = true, value_name = "SIZE")]
    pub cache_size: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Create and maintain repositories.
    #[command(subcommand)]
    Repo(RepoCmd),
    /// Take a restore point of a VM.
    Backup(BackupArgs),
    /// List and inspect restore points.
    #[command(subcommand)]
    Points(PointsCmd),
    /// Get data back out of a restore point.
    #[command(subcommand)]
    Restore(RestoreCmd),
    /// Check that every restore point is complete and (with --read-data) intact.
    Verify(VerifyArgs),
    /// Inspect disk images (VHDX or raw).
    #[command(subcommand)]
    Disk(DiskCmd),
    /// Reclaim the space of data no restore point needs (two phases, a grace period apart).
    Prune(PruneArgs),
    /// Remove restore points (their data is reclaimed later by prune).
    Forget(ForgetArgs),
    /// The backup agent: scheduled jobs with history, webhooks and metrics (docs/AGENT.md).
    #[command(subcommand)]
    Agent(AgentCmd),
    /// The agent's run history.
    #[command(subcommand)]
    Runs(RunsCmd),
}

#[derive(Args, Debug)]
pub struct ForgetArgs {
    /// Points to remove (ids or unique prefixes). Without them, a --keep-* policy is applied.
    pub points: Vec<String>,
    /// Apply the policy to this VM's points only (else to every VM's points, each on their own).
    #[arg(long)]
    pub vm: Option<String>,
    /// Keep the N newest points.
    #[arg(long, value_name = "N")]
    pub keep_last: Option<u32>,
    /// Keep the newest point of each of the N most recent hours that have one.
    #[arg(long, value_name = "N")]
    pub keep_hourly: Option<u32>,
    /// Keep the newest point of each of the N most recent days that have one.
    #[arg(long, value_name = "N")]
    pub keep_daily: Option<u32>,
    /// Keep the newest point of each of the N most recent ISO weeks that have one.
    #[arg(long, value_name = "N")]
    pub keep_weekly: Option<u32>,
    /// Keep the newest point of each of the N most recent months that have one.
    #[arg(long, value_name = "N")]
    pub keep_monthly: Option<u32>,
    /// Keep the newest point of each of the N most recent years that have one.
    #[arg(long, value_name = "N")]
    pub keep_yearly: Option<u32>,
    /// Keep every point less than this older than the VM's newest point, e.g. 30d, 2w, 1y2m.
    #[arg(long, value_name = "SPAN")]
    pub keep_within: Option<String>,
    /// Keep every point with this tag (repeatable; "a,b" needs both tags).
    #[arg(long = "keep-tag", value_name = "TAG")]
    pub keep_tags: Vec<String>,
    /// Show what would be kept and removed; remove nothing.
    #[arg(long)]
    pub dry_run: bool,
}

#[derive(Args, Debug)]
pub struct PruneArgs {
    /// Decide and report what would be condemned and deleted; change nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Time between condemning a pack and deleting it, e.g. 24h, 90m, 2s. Every backup, mount
    /// and verify that may need a condemned pack has this long to finish.
    #[arg(long, default_value = "24h", value_name = "DURATION")]
    pub grace: String,
    /// Repack partly dead packs until at most this share of the kept packs' bytes is unused
    /// (dead blobs inside packs still needed), e.g. 5%, 0%; "unlimited" never repacks.
    #[arg(long, default_value = "5%", value_name = "PERCENT")]
    pub max_unused: String,
    /// The most live data one prune copies while repacking, e.g. 10GiB (default: no limit).
    #[arg(long, value_name = "SIZE")]
    pub max_repack: Option<String>,
}

#[derive(Subcommand, Debug)]
pub enum AgentCmd {
    /// Run the agent in the foreground (under systemd: agent/systemd/blockvault-agent.service).
    Run(AgentConfigArg),
    /// Check a configuration and print the next run time of every job.
    CheckConfig(AgentConfigArg),
    /// Ask the running agent what it is doing.
    Status(AgentConfigArg),
    /// Start a run of a job now.
    RunNow {
        #[command(flatten)]
        config: AgentConfigArg,
        /// The job's name.
        job: String,
    },
    /// Cancel a queued or running run.
    Cancel {
        #[command(flatten)]
        config: AgentConfigArg,
        /// The run id (as `agent status` or `runs list` show it).
        run: i64,
    },
}

#[derive(Args, Debug)]
pub struct AgentConfigArg {
    /// The agent's configuration file.
    #[arg(
        long,
        default_value = "/etc/blockvault/agent.toml",
        env = "BLOCKVAULT_AGENT_CONFIG"
    )]
    pub config: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum RunsCmd {
    /// List VM backups of the agent's runs, newest first.
    List {
        #[command(flatten)]
        config: AgentConfigArg,
        /// Only runs of this job.
        #[arg(long)]
        job: Option<String>,
        /// Only this VM.
        #[arg(long)]
        vm: Option<String>,
        /// At most this many rows.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Show one run with each of its VMs.
    Show {
        #[command(flatten)]
        config: AgentConfigArg,
        /// The run id.
        run: i64,
    },
}

#[derive(Subcommand, Debug)]
pub enum DiskCmd {
    /// Show what the reader understood of an image: sizes, block size, sectors, BAT, parents, log.
    Info(DiskInfoArgs),
}

#[derive(Args, Debug)]
pub struct DiskInfoArgs {
    /// The image file.
    pub file: PathBuf,
    /// Look for parents recorded under FROM at TO instead (differencing disks moved from the host).
    #[arg(long = "parent-path-map", value_name = "FROM=TO")]
    pub parent_path_maps: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum RepoCmd {
    /// Create a new repository.
    Init(InitArgs),
    /// Show the repository's parameters and index state.
    Info,
    /// The local index (a cache of where chunks live).
    #[command(subcommand)]
    Index(IndexCmd),
    /// Change the repository password.
    Passwd(PasswdArgs),
}

#[derive(Args, Debug)]
pub struct InitArgs {
    /// Chunk size, a power of two from 64KiB to 8MiB; fixed for the repository's life.
    #[arg(long, default_value = "256KiB")]
    pub chunk_size: String,
    /// Argon2id memory cost in KiB (default 65536). Lower only for tests.
    #[arg(long, hide = true)]
    pub kdf_memory_kib: Option<u32>,
}

#[derive(Args, Debug)]
pub struct PasswdArgs {
    /// File holding the new password (else BLOCKVAULT_NEW_PASSWORD, else a prompt).
    #[arg(long)]
    pub new_password_file: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
pub enum IndexCmd {
    /// Throw the local index away and rebuild it from the repository.
    Rebuild,
}

#[derive(Args, Debug)]
pub struct BackupArgs {
    /// Name of the VM the point belongs to.
    #[arg(long)]
    pub vm: String,
    /// A disk as NAME=PATH (VHDX or raw image, recognised by content); repeat for each disk.
    #[arg(long = "disk", required = true, value_name = "NAME=PATH")]
    pub disks: Vec<String>,
    /// A label to attach to the point; repeatable.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Target pack size.
    #[arg(long, default_value = "16MiB", hide = true)]
    pub pack_size: String,
    /// Packs per index segment.
    #[arg(long, default_value_t = 64, hide = true)]
    pub packs_per_segment: usize,
    /// Hashing/compression threads (default: number of cores).
    #[arg(long)]
    pub workers: Option<usize>,
    /// An RCT changed-ranges file for a disk, as NAME=PATH; repeatable. Makes the disk an
    /// incremental on the VM's newest point when the file's limit_id matches it.
    #[arg(long = "changes", value_name = "NAME=PATH")]
    pub changes: Vec<String>,
    /// How the disks were captured: application (VSS / fsfreeze checkpoint) or crash.
    #[arg(long, value_parser = ["application", "crash"])]
    pub consistency: Option<String>,
    /// A VM configuration file to keep in the point; repeatable.
    #[arg(long = "config", value_name = "FILE")]
    pub configs: Vec<PathBuf>,
    /// Look for differencing-disk parents recorded under FROM at TO instead; repeatable.
    #[arg(long = "parent-path-map", value_name = "FROM=TO")]
    pub parent_path_maps: Vec<String>,
}

#[derive(Subcommand, Debug)]
pub enum PointsCmd {
    /// List restore points, oldest first.
    List {
        /// Only points of this VM.
        #[arg(long)]
        vm: Option<String>,
    },
    /// Show one restore point.
    Show {
        /// Point id or a unique prefix (at least 4 hex digits).
        point: String,
    },
    /// Mark a point protected: no retention policy (forget --keep-*) removes it.
    Protect {
        /// Point id or a unique prefix (at least 4 hex digits).
        point: String,
    },
    /// Remove a point's protection.
    Unprotect {
        /// Point id or a unique prefix (at least 4 hex digits).
        point: String,
    },
}

#[derive(Subcommand, Debug)]
pub enum RestoreCmd {
    /// Write a disk of a restore point out as a raw or VHDX image, or its configuration files.
    Export(ExportArgs),
    /// Serve disks of a restore point over NBD (boot a VM straight from the backup).
    Mount(MountArgs),
    /// List running mounts.
    Sessions,
    /// Stop a running mount.
    Unmount(UnmountArgs),
    /// List and extract files of a disk (NTFS, ext4; GPT, MBR or whole disk) without mounting it.
    Files(FilesArgs),
    /// Write every disk and configuration file of a point into a directory, ready to import.
    Vm(VmArgs),
}

#[derive(Args, Debug)]
pub struct FilesArgs {
    /// Point id or unique prefix.
    pub point: String,
    /// Which disk of the point.
    #[arg(long)]
    pub disk: String,
    #[command(subcommand)]
    pub action: FilesAction,
    /// Memory for decoded chunks.
    #[arg(long, default_value = "128MiB", value_name = "SIZE")]
    pub memory_cache: String,
    /// Chunks fetched at once.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// Chunks read ahead of a file being extracted.
    #[arg(long, default_value_t = 4)]
    pub readahead: u64,
}

#[derive(Subcommand, Debug)]
pub enum FilesAction {
    /// Without PATH: the partitions and their file systems. With PATH (`p2:/Users/ann`, or `/etc`
    /// on a disk with one file system): the directory's entries, or the file's own.
    Ls {
        path: Option<String>,
        /// Entries shown at most.
        #[arg(long, default_value_t = 10_000)]
        limit: usize,
    },
    /// Extract files and directory trees into --to DIR (times and permissions kept where the
    /// file system records them), or stream one file with --out -.
    Get {
        #[arg(required = true)]
        paths: Vec<String>,
        /// Directory to extract into (created if missing); existing files are never replaced.
        #[arg(long)]
        to: Option<PathBuf>,
        /// `-` to write one file to standard output.
        #[arg(long)]
        out: Option<String>,
    },
}

#[derive(Args, Debug)]
pub struct VmArgs {
    /// Point id or unique prefix.
    pub point: String,
    /// Directory to write the disks and configuration files into (created if missing).
    #[arg(long)]
    pub to: PathBuf,
    /// Image format of the disks.
    #[arg(long, default_value = "raw", value_parser = ["raw", "vhdx", "qcow2"])]
    pub format: String,
    /// Only these disks (default: all); repeatable.
    #[arg(long = "disk")]
    pub disks: Vec<String>,
    /// Replace files that already exist in --to.
    #[arg(long)]
    pub overwrite: bool,
    /// Block size of exported VHDX disks.
    #[arg(long, default_value = "32MiB")]
    pub vhdx_block_size: String,
    /// Chunks fetched at once.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
}

#[derive(Args, Debug)]
pub struct MountArgs {
    /// Point id or unique prefix.
    pub point: String,
    /// A disk of the point to serve; repeat for several (one export each).
    #[arg(long = "disk", required = true)]
    pub disks: Vec<String>,
    /// TCP address to listen on.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Listen on a unix socket instead of TCP (created readable and writable by the owner
    /// only).
    #[arg(long, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Require TLS with this X.509 directory (qemu's tls-creds-x509 layout): server-cert.pem,
    /// server-key.pem, and ca-cert.pem to require client certificates signed by that CA.
    #[arg(long, value_name = "DIR", conflicts_with = "tls_psk")]
    pub tls_certs: Option<PathBuf>,
    /// Require TLS with pre-shared keys from this psktool file (`identity:hexkey` lines, as
    /// qemu's tls-creds-psk keys.psk and libnbd's tls-psk-file).
    #[arg(long, value_name = "FILE")]
    pub tls_psk: Option<PathBuf>,
    /// Accept TCP clients only from this address or ADDR/PREFIX block; repeat for several.
    #[arg(long = "allow-from", value_name = "CIDR")]
    pub allow_from: Vec<String>,
    /// Clients served at once.
    #[arg(long, default_value_t = 32, value_name = "N")]
    pub max_connections: usize,
    /// Seconds a client gets to finish the NBD handshake (TLS included).
    #[arg(long, default_value_t = 10, value_name = "SECS")]
    pub handshake_timeout: u64,
    /// Seconds without requests after which a client may be disconnected, but only to make room
    /// for a new client when all --max-connections slots are taken.
    #[arg(long, default_value_t = 60, value_name = "SECS")]
    pub idle_timeout: u64,
    /// Disconnect any client that has had no request in flight for SECS, even with slots free
    /// (0, the default: never; a quiet guest would lose its disk).
    #[arg(long, default_value_t = 0, value_name = "SECS")]
    pub idle_disconnect: u64,
    /// Export name (single disk only; default: the disk name).
    #[arg(long)]
    pub export_name: Option<String>,
    /// Accept writes, kept in a copy-on-write overlay (the backup is never changed).
    #[arg(long)]
    pub writable: bool,
    /// Directory holding the overlay (`<disk>.data` + `<disk>.map`); reuse it to resume.
    #[arg(long, value_name = "DIR")]
    pub overlay: Option<PathBuf>,
    /// Copy the disk to this raw file in the background (a directory with several disks).
    #[arg(long, value_name = "FILE")]
    pub hydrate_to: Option<PathBuf>,
    /// Memory for decoded chunks, shared by all disks (the global `--cache-size` bounds the
    /// on-disk cache of a remote repository instead).
    #[arg(long, default_value = "256MiB", value_name = "SIZE")]
    pub memory_cache: String,
    /// Chunks fetched at once per disk.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// Chunks read ahead of a sequential reader.
    #[arg(long, default_value_t = 8)]
    pub readahead: u64,
    /// Fetch the chunks the point's first boot read (its boot trace, or that of the VM's newest
    /// earlier point that has one), in that order, from the start.
    #[arg(long)]
    pub prefetch_boot: bool,
}

#[derive(Args, Debug)]
pub struct UnmountArgs {
    /// Session id as listed by `restore sessions`.
    pub session: Option<String>,
    /// Stop every running mount.
    #[arg(long, conflicts_with = "session")]
    pub all: bool,
}

#[derive(Args, Debug)]
pub struct ExportArgs {
    /// Point id or unique prefix.
    pub point: String,
    /// Which disk of the point.
    #[arg(long, required_unless_present_any = ["config", "configs_to"])]
    pub disk: Option<String>,
    /// Output file, or - for standard output (raw only).
    #[arg(long, required_unless_present = "configs_to")]
    pub out: Option<String>,
    /// Image format of the exported disk.
    #[arg(long, default_value = "raw", value_parser = ["raw", "vhdx", "qcow2"])]
    pub format: String,
    /// Replace an existing output file (refused otherwise).
    #[arg(long)]
    pub overwrite: bool,
    /// Block size of an exported VHDX.
    #[arg(long, default_value = "32MiB")]
    pub vhdx_block_size: String,
    /// Export the stored VM configuration file of this name (to --out).
    #[arg(long, conflicts_with_all = ["disk", "configs_to"])]
    pub config: Option<String>,
    /// Export every stored VM configuration file into this directory.
    #[arg(long, conflicts_with_all = ["disk", "out"])]
    pub configs_to: Option<PathBuf>,
    /// Chunks fetched at once.
    #[arg(long, default_value_t = 8)]
    pub parallel: usize,
    /// Write zeros where data is damaged or missing (and say where) instead of failing (raw only).
    #[arg(long)]
    pub allow_damaged: bool,
}

#[derive(Args, Debug)]
pub struct VerifyArgs {
    /// Download every pack and check every chunk's content.
    #[arg(long, conflicts_with_all = ["read_data_subset", "reverify_after"])]
    pub read_data: bool,
    /// Read part of the data: P% (a different P % each run, everything within 100/P runs) or
    /// n/t (a fixed slice, the packs whose id's first byte is n-1 modulo t).
    #[arg(long, value_name = "P%|n/t", conflicts_with = "reverify_after")]
    pub read_data_subset: Option<String>,
    /// Read only what was not verified within this long (e.g. 30d), oldest first.
    #[arg(long, value_name = "DURATION")]
    pub reverify_after: Option<String>,
    /// Read only what this point needs (id or unique prefix); repeatable.
    #[arg(long = "point", value_name = "POINT")]
    pub points: Vec<String>,
    /// Read only what the points of this VM need; repeatable.
    #[arg(long = "vm", value_name = "VM")]
    pub vms: Vec<String>,
    /// Read at most this much in one run (e.g. 50GiB).
    #[arg(long, value_name = "SIZE")]
    pub max_bytes: Option<String>,
    /// Packs fetched ahead of the two being decoded (each on every core).
    #[arg(long, default_value_t = 2)]
    pub parallel: usize,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The agent logs what it does by default; commands stay quiet unless asked.
    let agent = matches!(&cli.command, Command::Agent(AgentCmd::Run(_)));
    init_tracing(cli.global.verbose + u8::from(agent));
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("blockvault: cannot start the runtime: {e}");
            return ExitCode::from(exit::FAILURE);
        }
    };
    let json = cli.global.json;
    match runtime.block_on(commands::run(cli)) {
        Ok(()) => ExitCode::from(exit::OK),
        Err(e) => {
            let code = exit::classify(&e);
            // A failed verify has already printed its report; everything else reports here.
            let reported = code == exit::VERIFY_FAILED || code == exit::VERIFY_INCOMPLETE;
            if json && !reported {
                let v = serde_json::json!({"error": format!("{e:#}"), "exit_code": code});
                println!("{v}");
            }
            if !reported || !json {
                eprintln!("blockvault: error: {e:#}");
            }
            ExitCode::from(code)
        }
    }
}

fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BLOCKVAULT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
