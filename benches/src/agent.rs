//! Agent overhead (docs/BENCHMARKS.md, "Agent"): one job of 10 small VMs run by the agent beside
//! the same 10 backups run as plain CLI commands, each into a fresh repository, in the same run;
//! then the idle agent's memory and CPU over a minute.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::disk::{run, Reference};
use crate::measure::{timed, Sample, PASSWORD};

/// VMs in the job, and the size of each one's disk (a slice of the reference disk).
pub const VMS: u64 = 10;
const VM_DISK: u64 = 128 << 20;

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct AgentFigures {
    pub idle_seconds: f64,
    /// CPU time the idle agent used, as a share of one core.
    pub idle_cpu_share: f64,
    pub idle_rss_mib: f64,
}

/// Kills the agent when the part ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The 10 disks: consecutive slices of the reference disk's data (different data, real files).
fn vm_disks(work: &Path, r: &Reference) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for i in 0..VMS {
        let p = work.join(format!("agent-vm{i}.raw"));
        run(Command::new("dd")
            .arg(format!("if={}", r.raw.display()))
            .arg(format!("of={}", p.display()))
            .args(["bs=1M", "conv=sparse", "status=none"])
            .arg(format!("skip={}", (i * VM_DISK % r.size.max(1)) >> 20))
            .arg(format!("count={}", VM_DISK >> 20)))?;
        out.push(p);
    }
    Ok(out)
}

fn proc_field(pid: u32, key: &str) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with(key))
        .with_context(|| format!("{key} in /proc/{pid}/status"))?;
    let kib: f64 = line
        .split_whitespace()
        .nth(1)
        .context("a number")?
        .parse()?;
    Ok(kib / 1024.0)
}

/// User plus system CPU seconds the process has used.
fn cpu_seconds(pid: u32) -> Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &s[s.rfind(')').context("stat")? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>()? + f[12].parse::<f64>()?;
    let hz = String::from_utf8(Command::new("getconf").arg("CLK_TCK").output()?.stdout)?
        .trim()
        .parse::<f64>()
        .unwrap_or(100.0);
    Ok(ticks / hz)
}

pub fn run_all(
    blockvault: &Path,
    work: &Path,
    r: &Reference,
    idle: Duration,
) -> Result<(Vec<Sample>, AgentFigures)> {
    let disks = vm_disks(work, r)?;
    let fresh = |name: &str| -> PathBuf {
        let p = work.join(name);
        let _ = std::fs::remove_dir_all(&p);
        p
    };

    // The CLI: ten backups, one after another, as a script would run them.
    let (repo, cache) = (fresh("agent-cli-repo"), fresh("agent-cli-cache"));
    let bv = || {
        let mut c = Command::new(blockvault);
        c.env("BLOCKVAULT_REPO", &repo)
            .env("BLOCKVAULT_CACHE_DIR", &cache)
            .env("BLOCKVAULT_PASSWORD", PASSWORD)
            .arg("--quiet");
        c
    };
    run(bv().args(["repo", "init"]))?;
    let mut script = String::from("set -e\n");
    for (i, d) in disks.iter().enumerate() {
        script.push_str(&format!(
            "'{}' --quiet backup --vm vm{i} --disk 'd={}'\n",
            blockvault.display(),
            d.display()
        ));
    }
    let mut c = Command::new("sh");
    c.arg("-c")
        .arg(&script)
        .env("BLOCKVAULT_REPO", &repo)
        .env("BLOCKVAULT_CACHE_DIR", &cache)
        .env("BLOCKVAULT_PASSWORD", PASSWORD);
    let mut out = vec![timed("10 VM backups", "blockvault CLI", c, None, None)?];

    // The agent: one job of the same ten VMs, started by run-now, timed until its run ends.
    let (repo, cache) = (fresh("agent-repo"), fresh("agent-cache"));
    let mut c = Command::new(blockvault);
    c.env("BLOCKVAULT_REPO", &repo)
        .env("BLOCKVAULT_CACHE_DIR", &cache)
        .env("BLOCKVAULT_PASSWORD", PASSWORD)
        .args(["--quiet", "repo", "init"]);
    run(&mut c)?;
    let pw = work.join("agent-password");
    std::fs::write(&pw, PASSWORD)?;
    let state = work.join("agent-state.db");
    let _ = std::fs::remove_file(&state);
    let sock = work.join("agent.sock");
    let mut toml = format!(
        "state = \"{}\"\nsocket = \"{}\"\n[repository]\nlocation = \"{}\"\npassword_file = \"{}\"\n\
         cache_dir = \"{}\"\n[[jobs]]\nname = \"bench\"\nschedule = \"0 0 1 1 *\"\n\
         source = \"files\"\n",
        state.display(),
        sock.display(),
        repo.display(),
        pw.display(),
        cache.display()
    );
    for (i, d) in disks.iter().enumerate() {
        toml.push_str(&format!(
            "[[jobs.vms]]\nname = \"vm{i}\"\ndisks = {{ d = \"{}\" }}\n",
            d.display()
        ));
    }
    let config = work.join("agent.toml");
    std::fs::write(&config, toml)?;
    let cli = |args: &[&str]| -> Result<serde_json::Value> {
        let o = Command::new(blockvault)
            .args(args)
            .arg("--config")
            .arg(&config)
            .arg("--json")
            .stdin(Stdio::null())
            .output()?;
        if !o.status.success() {
            bail!("{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Ok(serde_json::from_slice(&o.stdout)?)
    };
    let agent = Running(
        Command::new(blockvault)
            .args(["agent", "run", "--config"])
            .arg(&config)
            .env_remove("BLOCKVAULT_PASSWORD")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(work.join("agent.log"))?)
            .spawn()
            .context("starting the agent")?,
    );
    let pid = agent.0.id();
    let deadline = Instant::now() + Duration::from_secs(30);
    while cli(&["agent", "status"]).is_err() {
        if Instant::now() > deadline {
            bail!(
                "the agent did not start; see {}",
                work.join("agent.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("running 10 VM backups: blockvault agent");
    let t0 = Instant::now();
    let now = cli(&["agent", "run-now", "bench"])?;
    let id = now["run"].as_i64().context("run-now gave no run id")?;
    let status = loop {
        let r = cli(&["runs", "show", &id.to_string()])?;
        let s = r["status"].as_str().unwrap_or("").to_string();
        if s != "running" && s != "queued" {
            break s;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let wall = t0.elapsed().as_secs_f64();
    if status != "success" {
        bail!("the agent's run ended {status}");
    }
    out.push(Sample {
        work: "10 VM backups".into(),
        tool: "blockvault agent".into(),
        wall_s: wall,
        peak_rss_mib: proc_field(pid, "VmHWM")?,
        repo_bytes: None,
    });

    // Idle: nothing scheduled for a year; what does waiting cost?
    let cpu0 = cpu_seconds(pid)?;
    let t0 = Instant::now();
    std::thread::sleep(idle);
    let secs = t0.elapsed().as_secs_f64();
    let fig = AgentFigures {
        idle_seconds: secs,
        idle_cpu_share: (cpu_seconds(pid)? - cpu0) / secs,
        idle_rss_mib: proc_field(pid, "VmRSS")?,
    };
    drop(agent);
    for d in disks {
        std::fs::remove_file(d)?;
    }
    for d in [
        "agent-cli-repo",
        "agent-cli-cache",
        "agent-repo",
        "agent-cache",
    ] {
        let _ = std::fs::remove_dir_all(work.join(d));
    }
    Ok((out, fig))
}
