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

/// Variables of the agent's environment that hold secrets (the repository password, S3
/// credentials). The agent's own children (hooks, PowerShell) do not get them: a hook that prints
/// its environment would put them in the run history, and nothing a hook does needs the agent's
/// keys; a hook that needs credentials reads its own.
pub const SECRET_VARIABLES: &[&str] = &[
    "BLOCKVAULT_PASSWORD",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
];

/// Removes [`SECRET_VARIABLES`] from what `c` inherits.
pub fn without_secrets(c: &mut tokio::process::Command) -> &mut tokio::process::Command {
    for k in SECRET_VARIABLES {
        c.env_remove(k);
    }
    c
}

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

/// How long a finished hook's output is still read: a process it left in the background (`cmd &`)
/// may hold its output open for as long as it runs, and the run must not wait for it.
const OUTPUT_DRAIN: Duration = Duration::from_secs(2);

/// Kills the hook's whole process group: `sh` and everything it started, so a command it left
/// running can neither outlive a timeout or cancel nor keep the output pipes open.
fn kill_group(child: &tokio::process::Child) {
    if let Some(pid) = child
        .id()
        .and_then(|id| rustix::process::Pid::from_raw(id as i32))
    {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
}

/// Runs `cmd` through `sh -c`, in a process group of its own. A non-zero exit, a timeout or a
/// cancel is an error naming the hook; on a timeout or cancel the whole group is killed.
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
    without_secrets(&mut c)
        .arg("-c")
        .arg(cmd)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(true);
    for (k, v) in env {
        c.env(k, v);
    }
    let mut child = c
        .spawn()
        .map_err(|e| Error::Source(format!("{what}: cannot start sh: {e}")))?;
    let p1 = tokio::spawn(pump(child.stdout.take(), log.clone(), ""));
    let p2 = tokio::spawn(pump(child.stderr.take(), log.clone(), "stderr: "));
    let drain = |p1: tokio::task::JoinHandle<()>, p2: tokio::task::JoinHandle<()>| async move {
        let (a1, a2) = (p1.abort_handle(), p2.abort_handle());
        if tokio::time::timeout(OUTPUT_DRAIN, async {
            let _ = p1.await;
            let _ = p2.await;
        })
        .await
        .is_err()
        {
            a1.abort();
            a2.abort();
        }
    };
    let status = tokio::select! {
        s = child.wait() => s.map_err(|e| Error::Source(format!("{what}: {e}")))?,
        _ = tokio::time::sleep(timeout) => {
            kill_group(&child);
            let _ = child.kill().await;
            drain(p1, p2).await;
            log.push(format!("{what}: killed after {}s", timeout.as_secs()));
            return Err(Error::Source(format!("{what} did not finish within {}s", timeout.as_secs())));
        }
        _ = cancel.cancelled() => {
            kill_group(&child);
            let _ = child.kill().await;
            drain(p1, p2).await;
            log.push(format!("{what}: killed (cancelled)"));
            return Err(Error::Cancelled);
        }
    };
    drain(p1, p2).await;
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

    /// A hook that leaves a command running in the background, holding its output open, does
    /// not hold the run; a hook that times out takes what it started down with it.
    #[tokio::test]
    async fn background_commands_neither_hold_the_run_nor_outlive_a_timeout() {
        let log = LogTail::default();
        let c = CancellationToken::new();
        let started = std::time::Instant::now();
        run_hook(
            "capture",
            "echo frozen; (sleep 30; echo late) &",
            &[],
            Duration::from_secs(20),
            &log,
            &c,
        )
        .await
        .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert!(log.text().contains("frozen"), "{}", log.text());

        let d = tempfile::tempdir().unwrap();
        let pidfile = d.path().join("pid");
        let cmd = format!("sleep 60 & echo $! > {}; wait", pidfile.display());
        let started = std::time::Instant::now();
        let e = run_hook("release", &cmd, &[], Duration::from_millis(500), &log, &c)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("did not finish"), "{e}");
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // The background sleep was killed with the group (a zombie until reaped by init counts
        // as gone: its state is Z, or its /proc entry is already gone).
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let state = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| s.rsplit(')').next().map(|r| r.trim().chars().next()))
                .flatten();
            if state.is_none_or(|c| c == 'Z') {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "sleep {pid} still runs: {state:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
