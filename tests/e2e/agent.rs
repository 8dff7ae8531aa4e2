//! The agent as a user runs it: the real binary with schedules every few seconds, hooks that fail,
//! a VM whose disk is missing, a webhook receiver and a metrics scrape on 127.0.0.1, SIGTERM,
//! `kill -9` and an S3 outage.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::common::*;

const WEBHOOK_SECRET: &str = "whsec-Zq81-never-in-any-output";

/// One delivered webhook: event header, signature header, body.
#[derive(Clone, Debug)]
struct Delivery {
    event: String,
    signature: String,
    body: String,
}

/// An HTTP server on 127.0.0.1 that records every POST and answers 200 (or 500 while `fail`).
struct Receiver {
    port: u16,
    got: Arc<Mutex<Vec<Delivery>>>,
}

impl Receiver {
    fn start() -> Self {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        let got: Arc<Mutex<Vec<Delivery>>> = Arc::default();
        let g = got.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(mut c) = c else { continue };
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut headers = Vec::new();
                loop {
                    let mut line = String::new();
                    if r.read_line(&mut line).unwrap_or(0) == 0 {
                        break;
                    }
                    let line = line.trim_end().to_string();
                    if line.is_empty() {
                        break;
                    }
                    headers.push(line);
                }
                let h = |name: &str| {
                    headers
                        .iter()
                        .find_map(|l| {
                            let (k, v) = l.split_once(':')?;
                            k.eq_ignore_ascii_case(name).then(|| v.trim().to_string())
                        })
                        .unwrap_or_default()
                };
                let len: usize = h("content-length").parse().unwrap_or(0);
                let mut body = vec![0u8; len];
                if r.read_exact(&mut body).is_err() {
                    continue;
                }
                g.lock().unwrap().push(Delivery {
                    event: h("x-blockvault-event"),
                    signature: h("x-blockvault-signature"),
                    body: String::from_utf8_lossy(&body).into_owned(),
                });
                let _ = c.write_all(
                    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        Self { port, got }
    }

    fn events(&self) -> Vec<Delivery> {
        self.got.lock().unwrap().clone()
    }

    fn wait_for(
        &self,
        event: &str,
        pred: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            for d in self.events() {
                if d.event == event {
                    let v: serde_json::Value = serde_json::from_str(&d.body).unwrap();
                    if pred(&v) {
                        return v;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {event} webhook; got {:?}",
                self.events()
                    .iter()
                    .map(|d| d.event.clone())
                    .collect::<Vec<_>>()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// HMAC-SHA256 by openssl, an implementation independent of the agent's.
fn openssl_hmac(key: &str, body: &str) -> String {
    let mut c = Command::new("openssl")
        .args(["dgst", "-sha256", "-hmac", key, "-r"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("openssl is needed for the signature check (scripts/install-deps.sh)");
    c.stdin.take().unwrap().write_all(body.as_bytes()).unwrap();
    let out = c.wait_with_output().unwrap();
    let s = String::from_utf8(out.stdout).unwrap();
    format!("sha256={}", s.split_whitespace().next().unwrap())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out
}

struct Agent {
    child: Child,
    config: PathBuf,
    log: PathBuf,
}

impl Agent {
    fn start(config: &Path, log: &Path, env: &[(&str, &str)]) -> Self {
        let f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let mut c = Command::new(BIN);
        c.args(["agent", "run", "--config"])
            .arg(config)
            .env_remove("BLOCKVAULT_PASSWORD")
            .stdin(Stdio::null())
            .stdout(f.try_clone().unwrap())
            .stderr(f);
        for (k, v) in env {
            c.env(k, v);
        }
        let child = c.spawn().unwrap();
        let a = Self {
            child,
            config: config.to_path_buf(),
            log: log.to_path_buf(),
        };
        // Up when the control socket answers.
        let deadline = Instant::now() + Duration::from_secs(30);
        while a.cli(&["agent", "status"]).status.code() != Some(0) {
            assert!(
                Instant::now() < deadline,
                "agent did not start: {}",
                a.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        a
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut a = args.to_vec();
        a.push("--json");
        let out = self.cli(&a);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(st.success());
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `runs list` has a row for which `pred` holds.
    fn wait_row(&self, what: &str, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(90);
        loop {
            let rows = self.json(&["runs", "list"]);
            if let Some(r) = rows.as_array().unwrap().iter().find(|r| pred(r)) {
                return r.clone();
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; rows {rows:#}; log {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn toml_str(p: &Path) -> String {
    format!("\"{}\"", p.display())
}

/// The head of an agent.toml on the world's local repository: state, socket and repository.
fn local_head(w: &World) -> String {
    format!(
        "state = {}\nsocket = {}\n[repository]\nlocation = {}\npassword_file = {}\ncache_dir = {}\n",
        toml_str(&w.path("agent.db")),
        toml_str(&w.path("agent.sock")),
        toml_str(&w.repo),
        toml_str(&w.password_file),
        toml_str(&w.cache),
    )
}

/// The main flow: scheduled runs, hooks, a retried capture, a missing disk, webhooks, metrics,
/// status, run-now, history, and no secret anywhere.
#[test]
fn agent_runs_jobs_on_schedule_with_history_webhooks_and_metrics() {
    let w = World::with_repo("64KiB");
    let recv = Receiver::start();
    // An endpoint that takes connections and never answers (each attempt waits out the
    // 10 s timeout), listed first: it must not hold back the live endpoint's deliveries.
    let dead = TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_port = dead.local_addr().unwrap().port();
    let secret = w.path("hook.secret");
    std::fs::write(&secret, format!("{WEBHOOK_SECRET}\n")).unwrap();
    let good = w.path("good.raw");
    make_image(&good, 4 << 20, 1, 6);
    let flaky = w.path("flaky.raw");
    make_image(&flaky, 4 << 20, 2, 6);
    let counter = w.path("flaky.count");
    let released = w.path("released.txt");
    let metrics = free_port();
    let config = w.path("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"state = {state}
socket = {sock}
metrics_listen = "127.0.0.1:{metrics}"

[repository]
location = {repo}
password_file = {pw}
cache_dir = {cache}

[limits]
max_concurrent_runs = 2

[alerts]
no_good_backup_hours = 0.0008

[[webhooks]]
url = "http://127.0.0.1:{dead_port}/hook"
secret_file = {secret}

[[webhooks]]
url = "http://127.0.0.1:{port}/hook"
secret_file = {secret}

[[jobs]]
name = "frequent"
schedule = "*/3 * * * * *"
source = "files"
concurrency = 3
tags = ["agent"]
[jobs.retries]
attempts = 2
backoff_secs = 0.2

[[jobs.vms]]
name = "good"
disks = {{ disk0 = {good} }}
release = "echo \"$BLOCKVAULT_VM $BLOCKVAULT_STATUS $BLOCKVAULT_POINT\" >> {released}"

[[jobs.vms]]
name = "flaky"
disks = {{ disk0 = {flaky} }}
capture = "n=$(cat {counter} 2>/dev/null || echo 0); echo $((n+1)) > {counter}; if [ $n -eq 0 ]; then echo snapshot failed >&2; exit 4; fi"

[[jobs.vms]]
name = "gone"
disks = {{ disk0 = {missing} }}
release = "echo \"$BLOCKVAULT_VM $BLOCKVAULT_STATUS\" >> {released}"
"#,
            state = toml_str(&w.path("state/agent.db")),
            sock = toml_str(&w.path("agent.sock")),
            repo = toml_str(&w.repo),
            pw = toml_str(&w.password_file),
            cache = toml_str(&w.cache),
            port = recv.port,
            dead_port = dead_port,
            secret = toml_str(&secret),
            good = toml_str(&good),
            flaky = toml_str(&flaky),
            missing = toml_str(&w.path("no-such-disk.raw")),
            counter = counter.display(),
            released = released.display(),
        ),
    )
    .unwrap();

    let check = Command::new(BIN)
        .args(["agent", "check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", stderr(&check));
    let text = String::from_utf8_lossy(&check.stdout);
    assert!(
        text.contains("frequent") && text.contains("next run 20"),
        "{text}"
    );

    let started = Instant::now();
    let mut agent = Agent::start(&config, &w.path("agent.log"), &[]);
    // The first event reaches the live endpoint before the dead one's first attempt times out.
    recv.wait_for("run.started", |_| true);
    assert!(
        started.elapsed() < Duration::from_secs(9),
        "the live endpoint waited {:?} behind the dead one",
        started.elapsed()
    );
    // The socket is the owner's only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(w.path("agent.sock"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o077, 0, "socket mode {mode:o}");

    // Run 1 is the first: its "gone" VM ends last (two attempts).
    agent.wait_row("the first run's failing VM", |r| {
        r["run"] == 1 && r["vm"] == "gone" && r["status"] == "failed"
    });
    let run = 1;
    let deadline = Instant::now() + Duration::from_secs(30);
    let shown = loop {
        let s = agent.json(&["runs", "show", "1"]);
        if s["status"] != "running" {
            break s;
        }
        assert!(Instant::now() < deadline, "run 1 did not end: {s:#}");
        std::thread::sleep(Duration::from_millis(100));
    };
    let vms = shown["vms"].as_array().unwrap();
    let by = |n: &str| vms.iter().find(|v| v["vm"] == n).unwrap().clone();
    let (g, f, x) = (by("good"), by("flaky"), by("gone"));
    assert_eq!(shown["status"], "partial", "{shown:#}");
    assert_eq!(g["attempts"], 1);
    assert!(g["point"].as_str().unwrap().len() == 16);
    assert!(g["bytes_read"].as_u64().unwrap() > 0);
    // The capture hook failed once; the retry succeeded.
    assert_eq!(f["status"], "success", "{f:#}");
    assert_eq!(f["attempts"], 2);
    assert!(
        f["log_tail"].as_str().unwrap().contains("snapshot failed"),
        "{f:#}"
    );
    // The missing disk fails its VM after every attempt, naming the disk; the others went on.
    assert_eq!(x["status"], "failed");
    assert_eq!(x["attempts"], 2);
    assert!(
        x["error"].as_str().unwrap().contains("no-such-disk.raw"),
        "{x:#}"
    );
    // Release ran for both, with the outcome.
    let rel = std::fs::read_to_string(&released).unwrap();
    assert!(
        rel.contains(&format!("good success {}", g["point"].as_str().unwrap())),
        "{rel}"
    );
    assert!(rel.contains("gone failed"), "{rel}");
    // The repository holds the point, as the CLI sees it.
    let points = w.json(&["points", "list", "--vm", "good"]);
    assert!(points
        .as_array()
        .unwrap()
        .iter()
        .any(|p| p["id"] == g["point"]));

    // Webhooks: started, vm.failed, finished; signed with the secret (checked by openssl).
    recv.wait_for("run.started", |v| v["run"] == run);
    let failed = recv.wait_for("vm.failed", |v| v["vm"] == "gone");
    assert_eq!(failed["job"], "frequent");
    recv.wait_for("run.finished", |v| {
        v["run"] == run && v["status"] == "partial"
    });
    recv.wait_for("vm.no_good_backup", |v| v["vm"] == "gone");
    for d in recv.events() {
        assert_eq!(d.signature, openssl_hmac(WEBHOOK_SECRET, &d.body), "{d:?}");
    }

    // run-now on a job that is idle or busy: either a new run id or the refusal saying why.
    let out = agent.cli(&["agent", "run-now", "frequent", "--json"]);
    let text = String::from_utf8_lossy(&out.stdout).to_string() + &stderr(&out);
    assert!(
        out.status.success() || text.contains("never overlaps itself"),
        "{text}"
    );
    let st = agent.json(&["agent", "status"]);
    assert_eq!(st["jobs"][0]["job"], "frequent");
    assert!(st["jobs"][0]["next_run"].as_str().is_some());

    // Metrics.
    let m = scrape(metrics);
    assert!(
        m.contains("blockvault_agent_runs_total{job=\"frequent\",status=\"partial\"}"),
        "{m}"
    );
    assert!(
        m.contains("blockvault_agent_last_success_timestamp_seconds{vm=\"good\"}"),
        "{m}"
    );
    assert!(
        !m.contains("last_success_timestamp_seconds{vm=\"gone\"}"),
        "{m}"
    );
    assert!(
        m.contains("blockvault_agent_bytes_read_total{job=\"frequent\",vm=\"good\"}"),
        "{m}"
    );
    assert!(m.contains("blockvault_repository_size_bytes "), "{m}");
    assert!(m.contains("blockvault_mount_sessions 0"), "{m}");

    // A later scheduled run: the job ran again without overlapping itself.
    agent.wait_row("a second run", |r| {
        r["vm"] == "good" && r["run"].as_i64().unwrap() > run
    });

    agent.signal("-TERM");
    let st = agent.wait_exit(Duration::from_secs(60));
    assert!(st.success(), "{st:?}: {}", agent.log_text());

    // No secret in the log, the history, the webhooks or the metrics.
    let pw = std::fs::read_to_string(&w.password_file).unwrap();
    let pw = pw.trim();
    let db = std::fs::read(w.path("state/agent.db")).unwrap();
    let db = String::from_utf8_lossy(&db);
    for (what, s) in [
        ("log", agent.log_text()),
        ("state", db.to_string()),
        ("metrics", m),
        (
            "webhooks",
            recv.events()
                .iter()
                .map(|d| d.body.clone())
                .collect::<Vec<_>>()
                .join("\n"),
        ),
    ] {
        assert!(!s.contains(WEBHOOK_SECRET), "webhook secret in the {what}");
        assert!(!s.contains(pw), "repository password in the {what}");
    }
}

/// A bad configuration is refused with the file, line and key, and the agent does not start.
#[test]
fn agent_refuses_a_bad_config_naming_file_line_and_key() {
    let w = World::new();
    let config = w.path("agent.toml");
    std::fs::write(
        &config,
        format!(
            "state = {}\nsocket = {}\n[repository]\nlocation = {}\npassword_file = {}\n\n[[jobs]]\nname = \"j\"\nschedule = \"daily\"\nsource = \"files\"\nretention_days = 3\n[[jobs.vms]]\nname = \"v\"\ndisks = {{ d = \"/x\" }}\n",
            toml_str(&w.path("s.db")),
            toml_str(&w.path("sock")),
            toml_str(&w.repo),
            toml_str(&w.password_file)
        ),
    )
    .unwrap();
    for cmd in ["run", "check-config"] {
        let out = Command::new(BIN)
            .args(["agent", cmd, "--config"])
            .arg(&config)
            .output()
            .unwrap();
        assert_eq!(code(&out), 5, "{cmd}: {}", stderr(&out));
        let e = stderr(&out);
        assert!(
            e.contains("agent.toml:11:") && e.contains("retention_days"),
            "{e}"
        );
    }
    assert!(!w.path("sock").exists() && !w.path("s.db").exists());
    let bad_schedule = std::fs::read_to_string(&config)
        .unwrap()
        .replace("retention_days = 3\n", "")
        .replace("\"daily\"", "\"Mon..Fri 25:00\"");
    std::fs::write(&config, bad_schedule).unwrap();
    let out = Command::new(BIN)
        .args(["agent", "check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let e = stderr(&out);
    assert_eq!(code(&out), 5, "{e}");
    assert!(
        e.contains("agent.toml:9:") && e.contains("jobs.schedule") && e.contains("hour 25"),
        "{e}"
    );
}

fn slow_job_config(w: &World, schedule: &str, flag: &Path, released: &Path) -> PathBuf {
    let disk = w.path("vm.raw");
    if !disk.exists() {
        make_image(&disk, 4 << 20, 7, 6);
    }
    let config = w.path("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"{head}[[jobs]]
name = "slow"
schedule = "{schedule}"
source = "files"
[[jobs.vms]]
name = "vm"
disks = {{ disk0 = {disk} }}
capture = "if [ -e {flag} ]; then sleep 20; fi"
release = "echo released $BLOCKVAULT_STATUS >> {released}"
"#,
            head = local_head(w),
            disk = toml_str(&disk),
            flag = flag.display(),
            released = released.display(),
        ),
    )
    .unwrap();
    config
}

/// kill -9 mid-run: the run is recorded as interrupted at the next start, the missed run runs
/// once at start, the repository stays consistent; SIGTERM cancels a run cleanly and records it.
#[test]
fn agent_survives_kill_9_runs_missed_runs_and_cancels_on_sigterm() {
    let w = World::with_repo("64KiB");
    let flag = w.path("slow.flag");
    let released = w.path("released.txt");
    std::fs::write(&flag, "").unwrap();
    let config = slow_job_config(&w, "*/2 * * * * *", &flag, &released);
    let log = w.path("agent.log");
    let mut a = Agent::start(&config, &log, &[]);
    let row = a.wait_row("a running VM", |r| r["status"] == "running");
    let first = row["run"].as_i64().unwrap();
    a.signal("-KILL");
    a.wait_exit(Duration::from_secs(10));
    drop(a);
    // Past the stored next run while the agent is down.
    std::fs::remove_file(&flag).unwrap();
    std::thread::sleep(Duration::from_secs(3));
    // Restart on a schedule that will not fire during the test: only the missed run can run.
    let config = slow_job_config(&w, "0 0 1 1 *", &flag, &released);
    let mut a = Agent::start(&config, &log, &[]);
    let shown = a.json(&["runs", "show", &first.to_string()]);
    assert_eq!(shown["status"], "interrupted", "{shown:#}");
    assert_eq!(shown["vms"][0]["status"], "interrupted");
    let ok = a.wait_row("the missed run", |r| {
        r["status"] == "success" && r["run"].as_i64().unwrap() > first
    });
    let missed = a.json(&["runs", "show", &ok["run"].to_string()]);
    assert_eq!(missed["trigger"], "missed", "{missed:#}");
    // Exactly one catch-up run.
    let runs = a.json(&["runs", "list"]);
    assert_eq!(runs.as_array().unwrap().len(), 2, "{runs:#}");
    // The repository is consistent after the kill.
    w.ok(&["verify"]);

    // SIGTERM during a run: cancelled, release ran, recorded.
    std::fs::write(&flag, "").unwrap();
    let now = a.json(&["agent", "run-now", "slow"]);
    let run = now["run"].as_i64().unwrap();
    a.wait_row("the manual run", |r| {
        r["run"] == run && r["status"] == "running"
    });
    std::thread::sleep(Duration::from_millis(300));
    a.signal("-TERM");
    let st = a.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "{st:?}: {}", a.log_text());
    let rows = Command::new(BIN)
        .args(["runs", "show", &run.to_string(), "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let shown: serde_json::Value = serde_json::from_slice(&rows.stdout).unwrap();
    assert_eq!(shown["status"], "cancelled", "{shown:#}");
    assert_eq!(shown["vms"][0]["status"], "cancelled");
    assert!(std::fs::read_to_string(&released)
        .unwrap()
        .contains("released failed"));
}

/// An S3 outage in the middle of a run fails that run (recorded, and reported by webhook), never
/// the agent; the next run succeeds once the store is back, and the repository is consistent.
#[test]
fn agent_records_an_s3_outage_mid_run_and_recovers() {
    use crate::s3_support::{FaultProxy, Mode, S3Server, S3World, ACCESS_KEY, SECRET_KEY};
    let server = S3Server::start();
    let proxy = FaultProxy::start(server.port);
    let s3 = S3World::new(&proxy.endpoint(), "agent");
    s3.init();
    let recv = Receiver::start();
    let secret = s3.path("hook.secret");
    std::fs::write(&secret, WEBHOOK_SECRET).unwrap();
    let disk = s3.path("vm.raw");
    make_image(&disk, 6 << 20, 11, 8);
    let started = s3.path("capture.started");
    let config = s3.path("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"state = {state}
socket = {sock}
[repository]
location = "{location}"
password_file = {pw}
cache_dir = {cache}
s3_endpoint = "{endpoint}"
s3_allow_http = true
[[webhooks]]
url = "http://127.0.0.1:{port}/"
secret_file = {secret}
[[jobs]]
name = "offsite"
schedule = "0 0 1 1 *"
source = "files"
[jobs.retries]
attempts = 1
[[jobs.vms]]
name = "vm"
disks = {{ disk0 = {disk} }}
capture = "touch {started}; sleep 1"
"#,
            state = toml_str(&s3.path("agent.db")),
            sock = toml_str(&s3.path("agent.sock")),
            location = s3.location,
            pw = toml_str(&s3.password_file),
            cache = toml_str(&s3.path("agent-cache")),
            endpoint = proxy.endpoint(),
            port = recv.port,
            secret = toml_str(&secret),
            disk = toml_str(&disk),
            started = started.display(),
        ),
    )
    .unwrap();
    let env = [
        ("AWS_ACCESS_KEY_ID", ACCESS_KEY),
        ("AWS_SECRET_ACCESS_KEY", SECRET_KEY),
        ("AWS_REGION", "us-east-1"),
        ("BLOCKVAULT_S3_RETRY_TIMEOUT_SECS", "3"),
        ("BLOCKVAULT_S3_REQUEST_TIMEOUT_SECS", "5"),
    ];
    let mut a = Agent::start(&config, &s3.path("agent.log"), &env);
    let first = a.json(&["agent", "run-now", "offsite"])["run"]
        .as_i64()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !started.exists() {
        assert!(
            Instant::now() < deadline,
            "capture never ran: {}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.set(Mode::Down);
    let failed = recv.wait_for("run.failed", |v| v["run"] == first);
    assert!(failed["error"].as_str().is_some(), "{failed:#}");
    let shown = a.json(&["runs", "show", &first.to_string()]);
    assert_eq!(shown["status"], "failed", "{shown:#}");
    assert_eq!(shown["vms"][0]["status"], "failed");
    assert!(!shown["vms"][0]["error"].as_str().unwrap().is_empty());
    // The store is back: the next run succeeds.
    proxy.set(Mode::Pass);
    let second = a.json(&["agent", "run-now", "offsite"])["run"]
        .as_i64()
        .unwrap();
    let done = recv.wait_for("run.finished", |v| v["run"] == second);
    assert_eq!(done["status"], "success", "{done:#}");
    a.signal("-TERM");
    assert!(a.wait_exit(Duration::from_secs(30)).success());
    assert!(
        !a.log_text().contains(SECRET_KEY),
        "S3 secret in the agent log"
    );
    s3.ok(&["verify"]);
    let points = s3.json(&["points", "list"]);
    assert_eq!(points.as_array().unwrap().len(), 1, "{points:#}");
}

/// Writes `agent.toml` for the local repository with one job `name` that runs only when asked
/// (`extra`: its further keys and sub-tables) and one VM, `vm`, whose disk is `vm.raw`.
fn one_vm_job(w: &World, name: &str, extra: &str) -> (PathBuf, PathBuf) {
    let disk = w.path("vm.raw");
    let config = w.path("agent.toml");
    std::fs::write(
        &config,
        format!(
            r#"{head}[[jobs]]
name = "{name}"
schedule = "0 0 1 1 *"
source = "files"
{extra}[[jobs.vms]]
name = "vm"
disks = {{ disk0 = {disk} }}
"#,
            head = local_head(w),
            disk = toml_str(&disk),
        ),
    )
    .unwrap();
    (config, disk)
}

/// Damage found by the verify after a job's backups makes the run `partial`, with the reason in
/// its error (not `success` with a log line only).
#[test]
fn agent_run_whose_verify_finds_damage_is_partial() {
    let w = World::with_repo("64KiB");
    let (config, disk) = one_vm_job(&w, "checked", "[jobs.verify]\nread_data = true\n");
    let a = Agent::start(&config, &w.path("agent.log"), &[]);
    // The whole run (its VM rows end before its verify does).
    let run_once = || {
        let now = a.json(&["agent", "run-now", "checked"]);
        let run = now["run"].as_i64().unwrap().to_string();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = a.json(&["runs", "show", &run]);
            if s["status"] != "running" && s["status"] != "queued" {
                break s;
            }
            assert!(Instant::now() < deadline, "run {run} did not end: {s:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    make_image(&disk, 2 << 20, 7, 6);
    let shown = run_once();
    assert_eq!(
        shown["status"],
        "success",
        "{shown:#}; log {}",
        a.log_text()
    );
    // Flip a byte in the middle of every pack, then back up new data so the run verifies.
    let packs = w.repo.join("packs");
    for dir in std::fs::read_dir(&packs).unwrap().flatten() {
        for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
            let mut b = std::fs::read(f.path()).unwrap();
            let mid = b.len() / 2;
            b[mid] ^= 0xff;
            std::fs::write(f.path(), &b).unwrap();
        }
    }
    make_image(&disk, 2 << 20, 8, 6);
    let shown = run_once();
    assert_eq!(
        shown["status"],
        "partial",
        "{shown:#}; log {}",
        a.log_text()
    );
    let error = shown["error"].as_str().unwrap_or_default();
    assert!(error.contains("verify found"), "{shown:#}");
}

/// Retention, prune and sampled verify as the agent runs them after a job's backups: four runs
/// of a VM whose disk changes every time, keep-last 2, prune with no grace: two points are left,
/// the forgotten points' packs are condemned and then deleted by later runs, every run's verify
/// reads its share of packs and records it, and what is left verifies and restores exactly.
#[test]
fn agent_applies_retention_prunes_and_verifies_a_sampled_share() {
    let w = World::with_repo("64KiB");
    let (config, disk) = one_vm_job(
        &w,
        "kept",
        "prune = true\nprune_grace_hours = 0\n[jobs.retention]\nkeep-last = 2\n\
         [jobs.verify]\nsubset_percent = 100\n",
    );
    let log = w.path("agent.log");
    let a = Agent::start(&config, &log, &[]);
    for seed in 1..=4u64 {
        // New contents each time: the forgotten points' data is referenced by nothing.
        make_image(&disk, 4 << 20, 100 + seed, 6);
        let now = a.json(&["agent", "run-now", "kept"]);
        let run = now["run"].as_i64().unwrap();
        let row = a.wait_row("the run to end", |r| {
            r["run"] == run && r["status"] != "running" && r["status"] != "queued"
        });
        assert_eq!(row["status"], "success", "{row:#}; log {}", a.log_text());
        // Store times are compared with a second of slack: the next run's prune sees this
        // run's condemnations as old enough.
        std::thread::sleep(Duration::from_millis(2200));
    }
    let points = w.json(&["points", "list"]);
    let points = points.as_array().unwrap();
    assert_eq!(
        points.len(),
        2,
        "keep-last 2 leaves two points: {points:#?}"
    );
    // Every run's verify read the whole (100 %) share and recorded it for the point it saw.
    assert_eq!(points[1]["verify"]["state"], "verified", "{points:#?}");
    let info = w.json(&["repo", "info"]);
    let last = &info["maintenance"]["last_prune"];
    assert_eq!(last["epoch"], 4, "one prune per run: {info:#}");
    let text = a.log_text();
    let deleted: u64 = text
        .lines()
        .filter_map(|l| l.split("prune deleted ").nth(1))
        .filter_map(|l| l.split(' ').next()?.parse::<u64>().ok())
        .sum();
    assert!(
        deleted > 0,
        "a later run deletes what an earlier one condemned: {text}"
    );
    assert!(
        text.contains("retention kept 2 point(s) and removed 1"),
        "{text}"
    );
    w.ok(&["verify", "--read-data"]);
    let newest = points[1]["id"].as_str().unwrap();
    let out = w.path("restored.raw");
    w.ok(&[
        "restore",
        "export",
        newest,
        "--disk",
        "disk0",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&disk).unwrap());
}

/// Polls `runs show RUN` until `pred` holds.
fn wait_run(a: &Agent, run: i64, pred: impl Fn(&serde_json::Value) -> bool) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = a.json(&["runs", "show", &run.to_string()]);
        if pred(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "run {run}: {s:#}; log {}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A run cancelled while it waits for a slot never started: it is recorded as cancelled, and
/// none of its hooks run (no `after` or `on_error` for work no `before` prepared).
#[test]
fn agent_cancel_of_a_queued_run_runs_none_of_its_hooks() {
    let w = World::with_repo("64KiB");
    let flag = w.path("slow.flag");
    std::fs::write(&flag, "").unwrap();
    let config = slow_job_config(&w, "0 0 1 1 *", &flag, &w.path("released.txt"));
    let hooks = w.path("hooks.txt");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        r#"[[jobs]]
name = "waiting"
schedule = "0 0 1 1 *"
source = "files"
[jobs.hooks]
before = "echo before >> {hooks}"
after = "echo after >> {hooks}"
on_error = "echo on_error >> {hooks}"
[[jobs.vms]]
name = "other"
disks = {{ disk0 = {disk} }}
"#,
        hooks = hooks.display(),
        disk = toml_str(&w.path("vm.raw")),
    ));
    std::fs::write(&config, text).unwrap();
    let mut a = Agent::start(&config, &w.path("agent.log"), &[]);
    // The only slot is taken by the slow job.
    a.json(&["agent", "run-now", "slow"]);
    a.wait_row("the slow run", |r| r["status"] == "running");
    let run = a.json(&["agent", "run-now", "waiting"])["run"]
        .as_i64()
        .unwrap();
    let st = a.json(&["agent", "status"]);
    assert_eq!(st["jobs"][1]["active"]["status"], "queued", "{st:#}");
    a.json(&["agent", "cancel", &run.to_string()]);
    let shown = wait_run(&a, run, |s| s["status"] != "running");
    assert_eq!(shown["status"], "cancelled", "{shown:#}");
    assert!(
        shown["error"].as_str().unwrap_or("").contains("queued"),
        "{shown:#}"
    );
    a.signal("-TERM");
    assert!(a.wait_exit(Duration::from_secs(30)).success());
    assert!(
        !hooks.exists(),
        "hooks of the cancelled queued run ran: {}",
        std::fs::read_to_string(&hooks).unwrap_or_default()
    );
}

/// Two agents whose configurations name the same state file (with different sockets): the
/// second refuses to start, naming the lock, and leaves the first one's running run alone.
#[test]
fn agent_refuses_a_state_file_another_agent_uses() {
    let w = World::with_repo("64KiB");
    let flag = w.path("slow.flag");
    std::fs::write(&flag, "").unwrap();
    let config = slow_job_config(&w, "0 0 1 1 *", &flag, &w.path("released.txt"));
    let mut a = Agent::start(&config, &w.path("agent.log"), &[]);
    let run = a.json(&["agent", "run-now", "slow"])["run"]
        .as_i64()
        .unwrap();
    a.wait_row("the slow run", |r| r["status"] == "running");

    let second = w.path("second.toml");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("agent.sock", "second.sock");
    std::fs::write(&second, text).unwrap();
    let mut b = Command::new(BIN)
        .args(["agent", "run", "--config"])
        .arg(&second)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = b.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = b.kill();
            let _ = b.wait();
            panic!("a second agent started on the same state file");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut err = String::new();
    b.stderr.take().unwrap().read_to_string(&mut err).unwrap();
    assert!(!status.success(), "{err}");
    assert!(
        err.contains("agent.db.lock") && err.contains("another agent is using"),
        "{err}"
    );
    let shown = a.json(&["runs", "show", &run.to_string()]);
    assert_eq!(shown["status"], "running", "{shown:#}");
    a.signal("-TERM");
    assert!(a.wait_exit(Duration::from_secs(30)).success());
}

/// A run cut short by `kill -9` is ended for webhook receivers at the next start (`run.failed`,
/// status `interrupted`), and SIGHUP stops the agent as SIGTERM does (its run cancelled).
#[test]
fn agent_reports_interrupted_runs_at_start_and_stops_on_sighup() {
    let w = World::with_repo("64KiB");
    let recv = Receiver::start();
    let secret = w.path("hook.secret");
    std::fs::write(&secret, WEBHOOK_SECRET).unwrap();
    let flag = w.path("slow.flag");
    std::fs::write(&flag, "").unwrap();
    let config = slow_job_config(&w, "0 0 1 1 *", &flag, &w.path("released.txt"));
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(&format!(
        "[[webhooks]]\nurl = \"http://127.0.0.1:{}/hook\"\nsecret_file = {}\n",
        recv.port,
        toml_str(&secret)
    ));
    std::fs::write(&config, text).unwrap();
    let log = w.path("agent.log");

    let mut a = Agent::start(&config, &log, &[]);
    let killed = a.json(&["agent", "run-now", "slow"])["run"]
        .as_i64()
        .unwrap();
    a.wait_row("the run to be killed", |r| r["status"] == "running");
    recv.wait_for("run.started", |v| v["run"] == killed);
    a.signal("-KILL");
    a.wait_exit(Duration::from_secs(10));
    drop(a);

    let mut a = Agent::start(&config, &log, &[]);
    let ended = recv.wait_for("run.failed", |v| v["run"] == killed);
    assert_eq!(ended["status"], "interrupted", "{ended:#}");
    assert_eq!(ended["job"], "slow");
    assert!(ended["error"].as_str().unwrap().contains("agent stopped"));

    let run = a.json(&["agent", "run-now", "slow"])["run"]
        .as_i64()
        .unwrap();
    a.wait_row("the run to be stopped", |r| {
        r["run"] == run && r["status"] == "running"
    });
    a.signal("-HUP");
    let st = a.wait_exit(Duration::from_secs(30));
    assert!(st.success(), "{st:?}: {}", a.log_text());
    let shown = a.json(&["runs", "show", &run.to_string()]);
    assert_eq!(shown["status"], "cancelled", "{shown:#}");
    recv.wait_for("run.cancelled", |v| v["run"] == run);
}

/// The password file is read for every run: after `repo passwd` and an update of the file, the
/// next run opens the repository without a restart of the agent.
#[test]
fn agent_uses_a_changed_password_file_from_the_next_run_on() {
    let w = World::with_repo("64KiB");
    let (config, disk) = one_vm_job(&w, "pw", "");
    make_image(&disk, 2 << 20, 5, 6);
    let mut a = Agent::start(&config, &w.path("agent.log"), &[]);
    let run_once = |a: &Agent| {
        let run = a.json(&["agent", "run-now", "pw"])["run"].as_i64().unwrap();
        wait_run(a, run, |s| s["status"] != "running")
    };
    let shown = run_once(&a);
    assert_eq!(shown["status"], "success", "{shown:#}");
    let newpw = w.path("newpw");
    std::fs::write(&newpw, "a new password for the agent\n").unwrap();
    w.ok(&[
        "repo",
        "passwd",
        "--new-password-file",
        newpw.to_str().unwrap(),
    ]);
    std::fs::copy(&newpw, &w.password_file).unwrap();
    let shown = run_once(&a);
    assert_eq!(shown["status"], "success", "{shown:#}; {}", a.log_text());
    a.signal("-TERM");
    assert!(a.wait_exit(Duration::from_secs(30)).success());
    assert!(!a.log_text().contains("a new password"));
}

/// Hooks do not inherit the agent's secrets (the repository password, S3 keys) from its
/// environment; they still get the rest of it and the run's own variables.
#[test]
fn agent_hooks_get_no_secret_from_the_agents_environment() {
    let w = World::with_repo("64KiB");
    let seen = w.path("hook.env");
    let (config, disk) = one_vm_job(
        &w,
        "envjob",
        &format!("[jobs.hooks]\nbefore = \"env > {}\"\n", seen.display()),
    );
    make_image(&disk, 2 << 20, 9, 6);
    let env = [
        ("AWS_SECRET_ACCESS_KEY", "aws-secret-Kq7-never-in-a-hook"),
        ("AWS_SESSION_TOKEN", "aws-token-Kq7-never-in-a-hook"),
        ("BLOCKVAULT_PASSWORD", "password-Kq7-never-in-a-hook"),
        ("BLOCKVAULT_TEST_PLAIN", "plain-Kq7"),
    ];
    let mut a = Agent::start(&config, &w.path("agent.log"), &env);
    let run = a.json(&["agent", "run-now", "envjob"])["run"]
        .as_i64()
        .unwrap();
    let shown = wait_run(&a, run, |s| s["status"] != "running");
    assert_eq!(shown["status"], "success", "{shown:#}");
    a.signal("-TERM");
    assert!(a.wait_exit(Duration::from_secs(30)).success());
    let text = std::fs::read_to_string(&seen).unwrap();
    assert!(text.contains("BLOCKVAULT_TEST_PLAIN=plain-Kq7"), "{text}");
    assert!(text.contains("BLOCKVAULT_JOB=envjob"), "{text}");
    assert!(!text.contains("never-in-a-hook"), "{text}");
}
