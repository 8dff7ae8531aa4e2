//! Mount sessions: each running `restore mount` keeps a status file `<pid>.json` in the sessions
//! directory of the cache, rewritten every second and removed when it stops. `restore sessions`,
//! `restore unmount` and the agent's metrics read them here; the file of a process that is gone
//! is removed.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use blockvault_engine::{CacheStats, HydrationStatus, PrefetchReport};
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// What a running mount reports about itself (its status file, `restore mount --json`,
/// `restore sessions --json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionStatus {
    /// The session's name for `restore unmount`: the pid, as text.
    pub session: String,
    pub pid: u32,
    pub point: String,
    /// RFC 3339.
    pub started: String,
    pub connections: u64,
    pub total_connections: u64,
    pub bytes_served: u64,
    pub bytes_written: u64,
    /// `recording` (this mount records the point's boot trace) or `present`.
    pub boot_trace: String,
    pub disks: Vec<DiskStatus>,
}

/// One served disk of a mount session.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DiskStatus {
    pub name: String,
    pub export: String,
    pub uri: String,
    pub size: u64,
    pub writable: bool,
    /// Bytes the guest has written into the overlay (writable mounts).
    pub overlay_bytes: Option<u64>,
    /// The hydrated local file served in place of the repository, once an overlay was merged.
    pub local_file: Option<PathBuf>,
    pub cache: CacheStats,
    pub connections: usize,
    pub hydration: Option<HydrationStatus>,
    pub boot_prefetch: Option<PrefetchReport>,
}

/// The sessions directory under a cache directory.
pub fn sessions_dir(cache_dir: &Path) -> PathBuf {
    cache_dir.join("sessions")
}

/// Whether `pid` is a live process (a zombie counts as gone: it will serve nothing more).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => s
            .rsplit_once(')')
            .map(|(_, rest)| !rest.trim_start().starts_with('Z'))
            .unwrap_or(false),
        Err(_) => false,
    }
}

/// Writes a session's status file whole (a reader never sees half of it).
pub(crate) fn write_status(path: &Path, status: &SessionStatus) -> Result<()> {
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec_pretty(status).expect("a session status serializes");
    write_new(&tmp, &bytes).map_err(|e| Error::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(format!("renaming to {}", path.display()), e))
}

/// Writes `bytes` to `tmp` as a new file. A file left there by a mount that died is removed
/// first; whatever stands there then (a symbolic link someone planted, say) is refused, never
/// written through.
fn write_new(tmp: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    match std::fs::remove_file(tmp) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
        .open(tmp)?
        .write_all(bytes)
}

/// The pid a status file is named after (`<pid>.json`).
fn file_pid(path: &Path) -> Option<u32> {
    path.file_name()?
        .to_str()?
        .strip_suffix(".json")?
        .parse()
        .ok()
}

/// Status of live mounts, ordered by pid, each with its status file; files of dead processes
/// are removed, unreadable ones skipped.
pub fn live_sessions(dir: &Path) -> Vec<(PathBuf, SessionStatus)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let path = e.path();
        let Some(pid) = file_pid(&path) else {
            continue;
        };
        if !alive(pid) {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        if let Some(v) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<SessionStatus>(&b).ok())
        {
            out.push((path, v));
        }
    }
    out.sort_by_key(|(_, v)| v.pid);
    out
}

/// Stops a mount session: SIGTERM to its process, then waits until it has removed its status
/// file (the last thing a mount does, after flushing every writable disk) or is gone.
///
/// Only a file whose name is the pid it holds is acted on: the name is what was checked to be a
/// live process, and a file written by anyone else who can write to the sessions directory could
/// otherwise name any process to signal.
pub async fn stop_session(path: &Path, status: &SessionStatus, timeout: Duration) -> Result<()> {
    let pid = status.pid;
    if file_pid(path) != Some(pid) {
        return Err(Error::Input(format!(
            "mount session file {} does not belong to process {pid}; nothing was signalled",
            path.display()
        )));
    }
    let Some(p) = i32::try_from(pid)
        .ok()
        .and_then(rustix::process::Pid::from_raw)
    else {
        return Err(Error::Input(format!(
            "mount session {} names no valid process",
            status.session
        )));
    };
    rustix::process::kill_process(p, rustix::process::Signal::TERM)
        .map_err(|e| Error::io(format!("signalling mount process {pid}"), e.into()))?;
    let deadline = Instant::now() + timeout;
    while path.exists() && alive(pid) {
        if Instant::now() > deadline {
            return Err(Error::io(
                format!("waiting for mount process {pid} to stop"),
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("still running after {} s", timeout.as_secs()),
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(pid: u32) -> SessionStatus {
        SessionStatus {
            session: pid.to_string(),
            pid,
            point: "p".into(),
            started: "2026-01-01T00:00:00Z".into(),
            connections: 0,
            total_connections: 0,
            bytes_served: 0,
            bytes_written: 0,
            boot_trace: "present".into(),
            disks: Vec::new(),
        }
    }

    /// A status file named after one live process but naming another: the other is left alone.
    #[tokio::test]
    async fn a_file_naming_another_process_signals_nothing() {
        let mut bystander = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let d = tempfile::tempdir().unwrap();
        let path = d.path().join(format!("{}.json", std::process::id()));
        let planted = status(bystander.id());
        let r = stop_session(&path, &planted, Duration::from_millis(200)).await;
        let still_running = bystander.try_wait().unwrap().is_none();
        bystander.kill().unwrap();
        bystander.wait().unwrap();
        assert!(matches!(r, Err(Error::Input(_))), "{r:?}");
        assert!(
            still_running,
            "the process named inside the file was signalled"
        );
    }

    #[test]
    fn a_planted_link_at_the_temporary_name_is_not_written_through() {
        let d = tempfile::tempdir().unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"precious").unwrap();
        let path = d.path().join("42.json");
        std::os::unix::fs::symlink(&victim, path.with_extension("json.tmp")).unwrap();
        write_status(&path, &status(42)).unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        let back: SessionStatus = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(back.pid, 42);
    }
}
