//! Hook commands (`capture`, `release`, job `before`/`after`/`on_error`): run through `sh -c` with
//! the job, run and VM in the environment, bounded by a timeout, killed on cancel, their output
//! kept in the VM's log tail.

use std::collections::VecDeque;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

use crate::error::{Error, Result};

/// Lines kept per VM run (and job run) for `runs show`.
pub const LOG_TAIL_LINES: usize = 40;

/// The last lines of a run's log. Cheap to clone; shared by the hooks, the source and the runner.
#[derive(Clone, Default)]
pub struct LogTail(Arc<Mutex<VecDeque<String>>>);

impl LogTail {
    pub fn push(&self, line: impl Into<String>) {
        let mut q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let line: String = line.into();
        // Keep a line short: a runaway hook must not fill the history.
        let line = if line.len() > 400 {
            let mut end = 400;
            while !line.is_char_boundary(end) {
                end -= 1;
            }
            format!("{}…", &line[..end])
        } else {
            line
        };
        q.push_back(format!("{} {line}", chrono::Utc::now().format("%H:%M:%S")));
        while q.len() > LOG_TAIL_LINES {
            q.pop_front();
        }
    }

    pub fn text(&self) -> String {
        let q = self.0.lock().unwrap_or_else(|p| p.into_inner());
        q.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

async fn pump<R: tokio::io::AsyncRead + Unpin>(r: Option<R>, log: LogTail, tag: &'static str) {
    if let Some(r) = r {
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            log.push(format!("{tag}{l}"));
        }
    }
}

/// Runs `cmd` through `sh -c`. A non-zero exit, a timeout or a cancel is an error naming the hook.
pub async fn run_hook(
    what: &str,
    cmd: &str,
    env: &[(&str, String)],
    timeout: Duration,
    log: &LogTail,
    cancel: &CancellationToken,
) -> Result<()> {
    log.push(format!("{what}: running"));
    let mut c = tokio::process::Command::new("sh");
    c.arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c
        .spawn()
        .map_err(|e| Error::Source(format!("{what}: cannot start sh: {e}")))?;
    let p1 = tokio::spawn(pump(child.stdout.take(), log.clone(), ""));
    let p2 = tokio::spawn(pump(child.stderr.take(), log.clone(), "stderr: "));
    let status = tokio::select! {
        s = child.wait() => s.map_err(|e| Error::Source(format!("{what}: {e}")))?,
        _ = tokio::time::sleep(timeout) => {
            let _ = child.kill().await;
            log.push(format!("{what}: killed after {}s", timeout.as_secs()));
            return Err(Error::Source(format!("{what} did not finish within {}s", timeout.as_secs())));
        }
        _ = cancel.cancelled() => {
            let _ = child.kill().await;
            log.push(format!("{what}: killed (cancelled)"));
            return Err(Error::Cancelled);
        }
    };
    let _ = p1.await;
    let _ = p2.await;
    if status.success() {
        log.push(format!("{what}: done"));
        Ok(())
    } else {
        let code = status
            .code()
            .map(|c| format!("exit status {c}"))
            .unwrap_or_else(|| "killed by a signal".into());
        log.push(format!("{what}: failed ({code})"));
        Err(Error::Source(format!("{what} failed ({code})")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hook_output_and_failure_are_recorded() {
        let log = LogTail::default();
        let c = CancellationToken::new();
        run_hook(
            "capture",
            "echo hello $BLOCKVAULT_VM; echo oops >&2",
            &[("BLOCKVAULT_VM", "web".into())],
            Duration::from_secs(10),
            &log,
            &c,
        )
        .await
        .unwrap();
        let t = log.text();
        assert!(t.contains("hello web") && t.contains("stderr: oops"), "{t}");
        let e = run_hook("release", "exit 3", &[], Duration::from_secs(10), &log, &c)
            .await
            .unwrap_err();
        assert!(
            e.to_string().contains("release failed (exit status 3)"),
            "{e}"
        );
        let e = run_hook(
            "capture",
            "sleep 5",
            &[],
            Duration::from_millis(200),
            &log,
            &c,
        )
        .await
        .unwrap_err();
        assert!(e.to_string().contains("did not finish"), "{e}");
    }
}
