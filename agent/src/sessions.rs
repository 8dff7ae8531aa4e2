//! Mount sessions: each running `restore mount` keeps a status file `<pid>.json` in the sessions
//! directory of the cache. `restore sessions`, `restore unmount` and the agent's metrics read them
//! here; the file of a process that is gone is removed.

use std::path::{Path, PathBuf};

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

/// Status of live mounts, ordered by pid; files of dead processes are removed.
pub fn live_sessions(dir: &Path) -> Vec<(PathBuf, serde_json::Value)> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let path = e.path();
        let Some(pid) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".json"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        if !alive(pid) {
            let _ = std::fs::remove_file(&path);
            continue;
        }
        if let Some(v) = std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        {
            out.push((path, v));
        }
    }
    out.sort_by_key(|(_, v)| v["pid"].as_u64());
    out
}
