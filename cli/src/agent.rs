//! `blockvault agent ...` and `blockvault runs ...`: the agent service is in the agent crate; this
//! module only starts it, talks to it, and prints what it recorded.

use anyhow::{anyhow, bail, Result};
use blockvault_agent::service::config::{self, Loaded};
use blockvault_agent::service::daemon::{self, Request, RunOptions};
use blockvault_agent::service::state::{RunRecord, State, VmRunRecord};
use chrono::Utc;
use serde_json::json;

use crate::commands::{lift, print_json};
use crate::exit::InputError;
use crate::size::human;
use crate::{AgentCmd, Global, RunsCmd};

fn load(path: &std::path::Path) -> Result<Loaded> {
    config::load(path).map_err(|e| anyhow!(InputError(e.to_string())))
}

pub async fn agent(g: &Global, cmd: AgentCmd) -> Result<()> {
    match cmd {
        AgentCmd::Run(c) => {
            let loaded = load(&c.config)?;
            daemon::run(loaded, RunOptions::default())
                .await
                .map_err(lift)
        }
        AgentCmd::CheckConfig(c) => check_config(g, &load(&c.config)?),
        AgentCmd::Status(c) => {
            let l = load(&c.config)?;
            let v = daemon::request(&l.config.socket, &Request::Status)
                .await
                .map_err(lift)?;
            reply(g, v, print_status)
        }
        AgentCmd::RunNow { config, job } => {
            let l = load(&config.config)?;
            let v = daemon::request(&l.config.socket, &Request::RunNow { job })
                .await
                .map_err(lift)?;
            reply(g, v, |v| {
                println!(
                    "job {} started as run {}",
                    v["job"].as_str().unwrap_or(""),
                    v["run"]
                )
            })
        }
        AgentCmd::Cancel { config, run } => {
            let l = load(&config.config)?;
            let v = daemon::request(&l.config.socket, &Request::Cancel { run })
                .await
                .map_err(lift)?;
            reply(g, v, |v| {
                println!(
                    "run {} of job {} is being cancelled",
                    v["run"],
                    v["job"].as_str().unwrap_or("")
                )
            })
        }
    }
}

fn reply(g: &Global, v: serde_json::Value, text: impl Fn(&serde_json::Value)) -> Result<()> {
    if v["ok"].as_bool() != Some(true) {
        bail!(InputError(
            v["error"]
                .as_str()
                .unwrap_or("the agent refused")
                .to_string()
        ));
    }
    if g.json {
        print_json(&v);
    } else {
        text(&v);
    }
    Ok(())
}

fn print_status(v: &serde_json::Value) {
    println!(
        "agent pid {} since {}; {} run(s) active; {} webhook deliveries pending",
        v["pid"],
        v["started"].as_str().unwrap_or(""),
        v["running_runs"],
        v["webhook_pending"]
    );
    for j in v["jobs"].as_array().into_iter().flatten() {
        let active = match &j["active"] {
            serde_json::Value::Null => String::new(),
            a => format!(
                "  [{} run {}]",
                a["status"].as_str().unwrap_or(""),
                a["run"]
            ),
        };
        println!(
            "{:<20} next {}  last {}  ({} {}){active}",
            j["job"].as_str().unwrap_or(""),
            j["next_run"].as_str().unwrap_or("-"),
            j["last_run"].as_str().unwrap_or("-"),
            j["schedule"].as_str().unwrap_or(""),
            j["timezone"].as_str().unwrap_or(""),
        );
    }
}

fn check_config(g: &Global, l: &Loaded) -> Result<()> {
    let now = Utc::now();
    let jobs: Vec<serde_json::Value> = l
        .config
        .jobs
        .iter()
        .zip(&l.schedules)
        .map(|(j, s)| {
            json!({"job": j.name.get_ref(), "schedule": s.text, "timezone": s.tz.name(),
                   "next_run": s.next_after(now).map(|t| t.to_rfc3339()),
                   "next_run_local": s.next_after(now).map(|t| t.with_timezone(&s.tz).to_rfc3339()),
                   "vms": j.vms.iter().map(|v| v.name.get_ref().clone()).collect::<Vec<_>>()})
        })
        .collect();
    if g.json {
        print_json(&json!({"config": l.path, "ok": true, "jobs": jobs}));
        return Ok(());
    }
    println!("{}: configuration is valid", l.path.display());
    for j in &jobs {
        println!(
            "job {:<20} next run {} ({} in {}; schedule '{}'), VMs: {}",
            j["job"].as_str().unwrap_or(""),
            j["next_run"].as_str().unwrap_or("never"),
            j["next_run_local"].as_str().unwrap_or("never"),
            j["timezone"].as_str().unwrap_or(""),
            j["schedule"].as_str().unwrap_or(""),
            j["vms"]
                .as_array()
                .map(|a| a
                    .iter()
                    .filter_map(|v| v.as_str())
                    .collect::<Vec<_>>()
                    .join(", "))
                .unwrap_or_default()
        );
    }
    Ok(())
}

fn state_of(c: &std::path::Path) -> Result<State> {
    let l = load(c)?;
    State::open_existing(&l.config.state).map_err(lift)
}

pub fn runs(g: &Global, cmd: RunsCmd) -> Result<()> {
    match cmd {
        RunsCmd::List {
            config,
            job,
            vm,
            limit,
        } => {
            let st = state_of(&config.config)?;
            let rows = st
                .list_vm_runs(job.as_deref(), vm.as_deref(), limit)
                .map_err(lift)?;
            if g.json {
                print_json(&serde_json::to_value(&rows)?);
                return Ok(());
            }
            println!(
                "{:>6}  {:<16}  {:<16}  {:<24}  {:<11}  {:<16}  {:>10}  {:>10}",
                "run", "job", "vm", "started", "status", "point", "read", "stored"
            );
            for r in &rows {
                println!(
                    "{:>6}  {:<16}  {:<16}  {:<24}  {:<11}  {:<16}  {:>10}  {:>10}",
                    r.run,
                    r.job,
                    r.vm,
                    r.started,
                    r.status,
                    r.point.as_deref().unwrap_or("-"),
                    human(r.bytes_read),
                    human(r.bytes_stored)
                );
            }
            Ok(())
        }
        RunsCmd::Show { config, run } => {
            let st = state_of(&config.config)?;
            let Some(r) = st.run(run).map_err(lift)? else {
                bail!(InputError(format!("no run {run} in the agent's history")));
            };
            if g.json {
                print_json(&serde_json::to_value(&r)?);
            } else {
                print_run(&r);
            }
            Ok(())
        }
    }
}

fn print_run(r: &RunRecord) {
    println!("run       {}", r.id);
    println!("job       {}", r.job);
    println!("trigger   {}", r.trigger);
    println!("started   {}", r.started);
    println!("ended     {}", r.ended.as_deref().unwrap_or("-"));
    println!("status    {}", r.status);
    if let Some(e) = &r.error {
        println!("error     {e}");
    }
    for v in &r.vms {
        print_vm(v);
    }
}

fn print_vm(v: &VmRunRecord) {
    println!("vm {}: {} after {} attempt(s)", v.vm, v.status, v.attempts);
    println!("  started       {}", v.started);
    println!("  ended         {}", v.ended.as_deref().unwrap_or("-"));
    if let Some(p) = &v.point {
        println!("  point         {p}");
    }
    println!(
        "  bytes         read {}, new {}, stored {}",
        human(v.bytes_read),
        human(v.bytes_new),
        human(v.bytes_stored)
    );
    if let Some(c) = &v.consistency {
        println!("  consistency   {c}");
    }
    if let Some(f) = &v.full_reason {
        println!("  full because  {f}");
    }
    if let Some(e) = &v.error {
        println!("  error         {e}");
    }
    if !v.log_tail.is_empty() {
        println!("  log:");
        for l in v.log_tail.lines() {
            println!("    {l}");
        }
    }
}
