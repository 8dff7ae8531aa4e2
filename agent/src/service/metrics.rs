//! Prometheus text metrics on `/metrics` (loopback by default). Run counts, last successes and
//! byte totals come from the state database, so they survive restarts; the rest are gauges the
//! agent keeps in memory. No label or value ever carries a secret: labels are job and VM names.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::state::{parse_ts, State};

#[derive(Default)]
pub struct Gauges {
    pub running_runs: AtomicU64,
    /// Bytes of packs in the repository, as of the last run (0 until then).
    pub repository_bytes: AtomicU64,
    /// Last finished run's duration per job, seconds.
    pub durations: Mutex<BTreeMap<String, f64>>,
    /// Verify outcomes per (job, outcome).
    pub verify: Mutex<BTreeMap<(String, String), u64>>,
    /// Where `restore mount` sessions are listed.
    pub sessions_dir: Mutex<Option<std::path::PathBuf>>,
}

/// Escapes a label value (backslash, quote, newline).
fn esc(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// The whole metrics page.
pub fn render(state: &State, g: &Gauges) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "# HELP blockvault_agent_runs_total Ended job runs by job and final status."
    );
    let _ = writeln!(o, "# TYPE blockvault_agent_runs_total counter");
    for (job, status, n) in state.run_counts().unwrap_or_default() {
        let _ = writeln!(
            o,
            "blockvault_agent_runs_total{{job=\"{}\",status=\"{}\"}} {n}",
            esc(&job),
            esc(&status)
        );
    }
    let _ = writeln!(o, "# HELP blockvault_agent_last_success_timestamp_seconds End of the VM's last successful backup (Unix time).");
    let _ = writeln!(
        o,
        "# TYPE blockvault_agent_last_success_timestamp_seconds gauge"
    );
    for (vm, t) in state.last_success_per_vm().unwrap_or_default() {
        if let Some(t) = parse_ts(&t) {
            let _ = writeln!(
                o,
                "blockvault_agent_last_success_timestamp_seconds{{vm=\"{}\"}} {}",
                esc(&vm),
                t.timestamp()
            );
        }
    }
    let sums = state.byte_sums().unwrap_or_default();
    for (name, help, idx) in [
        (
            "bytes_read",
            "Bytes read from VM disks by successful backups.",
            0,
        ),
        ("bytes_new", "Bytes of new (not deduplicated) chunks.", 1),
        ("bytes_stored", "Bytes stored after compression.", 2),
    ] {
        let _ = writeln!(o, "# HELP blockvault_agent_{name}_total {help}");
        let _ = writeln!(o, "# TYPE blockvault_agent_{name}_total counter");
        for (job, vm, v) in &sums {
            let _ = writeln!(
                o,
                "blockvault_agent_{name}_total{{job=\"{}\",vm=\"{}\"}} {}",
                esc(job),
                esc(vm),
                v[idx]
            );
        }
    }
    let _ = writeln!(
        o,
        "# HELP blockvault_agent_run_duration_seconds Duration of the job's last finished run."
    );
    let _ = writeln!(o, "# TYPE blockvault_agent_run_duration_seconds gauge");
    for (job, d) in g.durations.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(
            o,
            "blockvault_agent_run_duration_seconds{{job=\"{}\"}} {d:.3}",
            esc(job)
        );
    }
    let _ = writeln!(
        o,
        "# HELP blockvault_agent_running_runs Job runs in progress."
    );
    let _ = writeln!(o, "# TYPE blockvault_agent_running_runs gauge");
    let _ = writeln!(
        o,
        "blockvault_agent_running_runs {}",
        g.running_runs.load(Ordering::Relaxed)
    );
    let _ = writeln!(o, "# HELP blockvault_repository_size_bytes Bytes of packs in the repository (as of the last run).");
    let _ = writeln!(o, "# TYPE blockvault_repository_size_bytes gauge");
    let _ = writeln!(
        o,
        "blockvault_repository_size_bytes {}",
        g.repository_bytes.load(Ordering::Relaxed)
    );
    let _ = writeln!(
        o,
        "# HELP blockvault_agent_verify_total Verify runs by job and outcome (ok, damaged, incomplete, error)."
    );
    let _ = writeln!(o, "# TYPE blockvault_agent_verify_total counter");
    for ((job, outcome), n) in g.verify.lock().unwrap_or_else(|p| p.into_inner()).iter() {
        let _ = writeln!(
            o,
            "blockvault_agent_verify_total{{job=\"{}\",outcome=\"{}\"}} {n}",
            esc(job),
            esc(outcome)
        );
    }
    let sessions = g
        .sessions_dir
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .as_ref()
        .map(|d| crate::sessions::live_sessions(d).len())
        .unwrap_or(0);
    let _ = writeln!(
        o,
        "# HELP blockvault_mount_sessions Running restore mount sessions on this host."
    );
    let _ = writeln!(o, "# TYPE blockvault_mount_sessions gauge");
    let _ = writeln!(o, "blockvault_mount_sessions {sessions}");
    let _ = writeln!(
        o,
        "# HELP blockvault_agent_webhook_pending Webhook deliveries waiting."
    );
    let _ = writeln!(o, "# TYPE blockvault_agent_webhook_pending gauge");
    let _ = writeln!(
        o,
        "blockvault_agent_webhook_pending {}",
        state.pending_deliveries().unwrap_or(0)
    );
    o
}

/// Serves `GET /metrics` (HTTP/1.0 style: one request per connection) until `stop`.
pub async fn serve(
    listener: TcpListener,
    state: Arc<State>,
    gauges: Arc<Gauges>,
    stop: CancellationToken,
) {
    loop {
        let (mut sock, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("metrics: accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let (state, gauges) = (state.clone(), gauges.clone());
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut got = 0;
            // Read the request head (bounded); only the request line matters.
            let read = tokio::time::timeout(std::time::Duration::from_secs(5), async {
                while got < buf.len() {
                    match sock.read(&mut buf[got..]).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            got += n;
                            if buf[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                                break;
                            }
                        }
                    }
                }
            })
            .await;
            if read.is_err() {
                return;
            }
            let head = String::from_utf8_lossy(&buf[..got]);
            let line = head.lines().next().unwrap_or("");
            let mut parts = line.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (status, ctype, body) =
                if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
                    let body = tokio::task::spawn_blocking(move || render(&state, &gauges))
                        .await
                        .unwrap_or_default();
                    ("200 OK", "text/plain; version=0.0.4; charset=utf-8", body)
                } else {
                    (
                        "404 Not Found",
                        "text/plain",
                        "not found: try /metrics\n".into(),
                    )
                };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}
