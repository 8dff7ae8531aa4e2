//! `restore mount`, `restore sessions`, `restore unmount`: the arguments and the rendering of
//! the agent library's mount sessions (`blockvault_agent::mount_session`, `::sessions`).

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use blockvault_agent::mount_session::{ListenOn, MountRequest, MountSession};
use blockvault_agent::sessions::{stop_session, SessionStatus};
use blockvault_nbd::{Cidr, Security, ServerConfig, TlsConfig, TlsKind};
use serde_json::json;

use crate::commands::{cache_dir, lift, open_repo, print_json};
use crate::exit::InputError;
use crate::size::{human, parse_size};
use crate::{Global, MountArgs, UnmountArgs};

fn input(msg: String) -> anyhow::Error {
    anyhow!(InputError(msg))
}

fn sessions_dir(g: &Global) -> Result<PathBuf> {
    Ok(blockvault_agent::sessions::sessions_dir(&cache_dir(g)?))
}

pub async fn mount(g: &Global, a: MountArgs) -> Result<()> {
    if a.overlay.is_some() && !a.writable {
        return Err(input("--overlay needs --writable".into()));
    }
    if a.writable && a.overlay.is_none() {
        return Err(input(
            "--writable needs --overlay DIR (where the guest's writes are kept)".into(),
        ));
    }
    let cache = parse_size(&a.memory_cache).map_err(|e| input(format!("--memory-cache: {e}")))?;
    let listen = match (&a.listen, &a.socket) {
        (Some(_), Some(_)) => return Err(input("give either --listen or --socket".into())),
        (_, Some(path)) => ListenOn::Unix(path.clone()),
        (listen, None) => ListenOn::Tcp(listen.clone().unwrap_or_else(|| "127.0.0.1:10809".into())),
    };
    let request = MountRequest {
        point: a.point.clone(),
        disks: a.disks.clone(),
        export_name: a.export_name.clone(),
        overlay: a.overlay.clone(),
        hydrate_to: a.hydrate_to.clone(),
        cache_bytes: cache,
        parallel: a.parallel,
        readahead: a.readahead,
        prefetch_boot: a.prefetch_boot,
        listen,
        server: ServerConfig {
            max_connections: a.max_connections,
            handshake_timeout_secs: a.handshake_timeout,
            idle_timeout_secs: a.idle_timeout,
            idle_close_secs: a.idle_disconnect,
            ..ServerConfig::default()
        },
        security: security(&a)?,
        sessions_dir: sessions_dir(g)?,
    };
    // Bad requests are refused before the repository is opened (and its password asked for).
    request.check().map_err(lift)?;
    let repo = open_repo(g).await?;
    let session = MountSession::start(repo, request).await.map_err(lift)?;
    for n in session.notices() {
        eprintln!("{n}");
    }
    if g.json {
        println!("{}", serde_json::to_string(&session.status())?);
    } else {
        for uri in session.uris() {
            println!("{uri}");
        }
        eprintln!(
            "serving {} disk(s) of restore point {} ({}, cache {}); stop with Ctrl-C or `blockvault restore unmount {}`",
            a.disks.len(),
            session.status().point,
            if a.writable { "writable" } else { "read-only" },
            human(cache),
            std::process::id()
        );
        match session.tls() {
            Some(TlsKind::X509 { client_ca: Some(_) }) => eprintln!(
                "TLS required (X.509); clients need a certificate signed by the CA in {}",
                a.tls_certs.as_deref().unwrap_or(Path::new("?")).display()
            ),
            Some(TlsKind::X509 { client_ca: None }) => {
                eprintln!("TLS required (X.509, no client certificates)")
            }
            Some(TlsKind::Psk { identities }) => {
                eprintln!("TLS required (PSK); identities: {}", identities.join(", "))
            }
            None => {}
        }
    }
    use std::io::Write;
    std::io::stdout().flush().ok();

    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    let shutdown = async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    };
    session.serve(shutdown).await.map_err(lift)
}

/// TLS credentials and `--allow-from` blocks, checked before anything else is opened.
fn security(a: &MountArgs) -> Result<Security> {
    let tls = match (&a.tls_certs, &a.tls_psk) {
        (Some(dir), None) => Some(TlsConfig::from_x509_dir(dir).map_err(|e| input(e.to_string()))?),
        (None, Some(file)) => {
            Some(TlsConfig::from_psk_file(file).map_err(|e| input(e.to_string()))?)
        }
        (None, None) => None,
        (Some(_), Some(_)) => return Err(input("give either --tls-certs or --tls-psk".into())),
    };
    let allow_from = a
        .allow_from
        .iter()
        .map(|s| {
            s.parse::<Cidr>()
                .map_err(|e| input(format!("--allow-from {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Security { tls, allow_from })
}

/// Status of live mounts; files of dead processes are removed.
fn live_sessions(g: &Global) -> Result<Vec<(PathBuf, SessionStatus)>> {
    Ok(blockvault_agent::sessions::live_sessions(&sessions_dir(g)?))
}

pub fn sessions(g: &Global) -> Result<()> {
    let list: Vec<SessionStatus> = live_sessions(g)?.into_iter().map(|(_, v)| v).collect();
    if g.json {
        print_json(&serde_json::to_value(&list)?);
        return Ok(());
    }
    if list.is_empty() {
        println!("no active mounts");
    }
    for v in list {
        println!(
            "session {}  point {}  connections {}  served {}",
            v.session,
            v.point,
            v.connections,
            human(v.bytes_served)
        );
        for d in &v.disks {
            let hyd = match &d.hydration {
                Some(h) => format!(
                    "  hydration {}/{}{}",
                    human(h.bytes_done),
                    human(h.bytes_total),
                    if h.complete { " (complete)" } else { "" }
                ),
                None => String::new(),
            };
            println!(
                "  {}  {}{}{}",
                d.name,
                d.uri,
                if d.writable { "  writable" } else { "" },
                hyd
            );
        }
    }
    Ok(())
}

pub async fn unmount(g: &Global, a: UnmountArgs) -> Result<()> {
    let list = live_sessions(g)?;
    let targets: Vec<_> = if a.all {
        list
    } else {
        let Some(s) = a.session.as_deref() else {
            return Err(input(
                "name a SESSION (see `restore sessions`) or pass --all".into(),
            ));
        };
        let found: Vec<_> = list.into_iter().filter(|(_, v)| v.session == s).collect();
        if found.is_empty() {
            return Err(input(format!("no active mount session '{s}'")));
        }
        found
    };
    for (path, v) in &targets {
        stop_session(path, v, Duration::from_secs(60))
            .await
            .map_err(lift)?;
        if !g.json {
            println!("stopped session {}", v.session);
        }
    }
    if g.json {
        print_json(
            &json!({"stopped": targets.iter().map(|(_, v)| &v.session).collect::<Vec<_>>()}),
        );
    }
    Ok(())
}
