//! `peerlined`: the operator's daemon (supernode, authority and TURN relay).
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

/// mimalloc instead of the system allocator: a supernode's heap is a million small,
/// long-lived sessions interleaved with short-lived handshake and store buffers, and
/// mimalloc hands freed pages back where glibc's arenas keep them (measured in
/// docs/benchmarks.md, "Capacity").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};
use peerline_core::store::Store;
use peerline_net::admin::MetricsText;
use peerline_net::relay::RelayServer;
use peerline_net::supernode::{run_supernode, SupernodeRuntime};
use peerlined::{
    ensure_relay_secret, init_with_store, load, load_config, parse_device_key, read_relay_secret,
    StoreUrl, BOOTSTRAP_FILE, CONFIG_FILE, PID_FILE, RELAY_SECRET_FILE, SNAPSHOT_FILE,
};
use tokio::sync::watch;

/// Peerline supernode and authority.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Create keys, a commented config and the bootstrap entry in a new data dir.
    Init {
        /// Data directory (created with mode 0700).
        #[arg(long)]
        data: PathBuf,
        /// UDP address to listen on.
        #[arg(long, default_value = "127.0.0.1:7000")]
        listen: SocketAddr,
        /// HOST:PORT clients should use, if not the listen address (e.g. a public name).
        #[arg(long)]
        public: Option<String>,
        /// Admin HTTP address for metrics.
        #[arg(long, default_value = "127.0.0.1:7001")]
        admin: SocketAddr,
        /// Join the fleet of the supernode whose data dir this is (its keys are copied;
        /// needs --node-id and --directory).
        #[arg(long, requires_all = ["node_id", "directory"])]
        join: Option<PathBuf>,
        /// This supernode's id in a fleet (with --directory; without --join it starts a
        /// new fleet with fresh keys).
        #[arg(long, requires = "directory")]
        node_id: Option<u32>,
        /// The fleet's directory, e.g. redis://10.0.0.1:6379,10.0.0.2:6379.
        #[arg(long, requires = "node_id")]
        directory: Option<String>,
        /// Node-to-node TCP address (with --directory).
        #[arg(long, default_value = "127.0.0.1:7100")]
        fleet_listen: SocketAddr,
        /// Store URL written into the config: sqlite://PATH (default sqlite://store.sqlite,
        /// relative to the data dir) or postgres://USER@HOST:PORT/DATABASE.
        #[arg(long, value_name = "URL")]
        store_url: Option<String>,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run the supernode until SIGINT or SIGTERM.
    Run {
        /// Data directory made by `init`.
        #[arg(long)]
        data: PathBuf,
        /// Override the config's listen address.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Override the config's admin address.
        #[arg(long)]
        admin: Option<SocketAddr>,
        /// Override the config's TCP fallback address.
        #[arg(long)]
        tcp_listen: Option<SocketAddr>,
        /// Log format: text or json (overrides the config).
        #[arg(long)]
        log_format: Option<String>,
    },
    /// Run only the TURN relay (for a relay on another machine than the supernode), with
    /// the config and relay.secret of DIR, until SIGINT or SIGTERM.
    Relay {
        /// Directory holding relay.secret (copied from the supernode's) and peerlined.toml.
        #[arg(long)]
        data: PathBuf,
        /// Override the config's relay_listen address.
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Log format: text or json (overrides the config).
        #[arg(long)]
        log_format: Option<String>,
    },
    /// Print the bootstrap entry of a data dir.
    Bootstrap {
        /// Data directory.
        #[arg(long)]
        data: PathBuf,
    },
    /// List an account's devices (Noise key, device id, whether revoked) from the store
    /// of a data dir. Safe while the supernode runs.
    Devices {
        /// Data directory made by `init`.
        #[arg(long)]
        data: PathBuf,
        /// The account's username.
        user: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a device (a lost or stolen one): its logins are refused with "this device
    /// was revoked", and it can no longer renew its certificate. The running supernode is
    /// asked to log it out now (in a fleet, wherever it is online). Safe while the
    /// supernode runs.
    Revoke {
        /// Data directory made by `init`.
        #[arg(long)]
        data: PathBuf,
        /// The device's Noise key, as `peerlined devices` lists it (64 hex digits).
        device: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Asks the supernode behind admin address `admin` to check `user`'s device `key` again;
/// whether it took the request.
fn ask_recheck(admin: SocketAddr, user: &str, key: &[u8; 32]) -> bool {
    use std::io::{Read, Write};
    let mut to = admin;
    if to.ip().is_unspecified() {
        to.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
    }
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let req = format!(
        "POST {}?user={user}&key={} HTTP/1.0\r\n\r\n",
        peerline_net::admin::RECHECK_PATH,
        hex::encode(key)
    );
    let mut resp = String::new();
    s.write_all(req.as_bytes()).is_ok()
        && s.read_to_string(&mut resp).is_ok()
        && resp.starts_with("HTTP/1.1 202")
}

/// Opens the store a data dir's config names (before any async runtime: the PostgreSQL
/// client blocks).
fn open_store(data: &std::path::Path, url: &StoreUrl) -> anyhow::Result<Box<dyn Store>> {
    Ok(match url {
        // `join` keeps an absolute path as it is.
        StoreUrl::Sqlite(path) => Box::new(peerline_store::SqliteStore::open(&data.join(path))?),
        StoreUrl::Postgres(url) => Box::new(peerline_store_pg::PgStore::open(url)?),
    })
}

fn logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

/// A shutdown flag several tasks can wait for, raised by SIGINT/SIGTERM or by the caller.
fn shutdown_on_signals() -> (Arc<watch::Sender<bool>>, watch::Receiver<bool>) {
    let (tx, rx) = watch::channel(false);
    let tx = Arc::new(tx);
    let raise = Arc::clone(&tx);
    tokio::spawn(async move {
        signals().await;
        raise.send_replace(true);
    });
    (tx, rx)
}

/// Resolves once `rx` says stop (or its sender is gone).
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

async fn signals() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Init {
            data,
            listen,
            public,
            admin,
            join,
            node_id,
            directory,
            fleet_listen,
            store_url,
            json,
        } => {
            let r = match (join, node_id, directory) {
                (from, Some(node_id), Some(directory_url)) => {
                    let j = peerlined::Join {
                        from,
                        node_id,
                        directory_url,
                        fleet_listen,
                    };
                    peerlined::init_member(
                        &data,
                        listen,
                        public.as_deref(),
                        Some(admin),
                        store_url.as_deref(),
                        &j,
                    )?
                }
                _ => init_with_store(
                    &data,
                    listen,
                    public.as_deref(),
                    Some(admin),
                    store_url.as_deref(),
                )?,
            };
            if json {
                println!(
                    "{{\"data\":{:?},\"bootstrap\":{:?}}}",
                    r.data.display().to_string(),
                    r.bootstrap
                );
            } else {
                println!("initialised {}", r.data.display());
                println!("bootstrap entry (give it to users): {}", r.bootstrap);
                println!("start it with: peerlined run --data {}", r.data.display());
            }
            Ok(())
        }
        Cmd::Devices { data, user, json } => {
            let cfg = load_config(&data)?;
            let name = peerline_wire::name::Username::parse(&user)
                .map_err(|e| anyhow::anyhow!("{user:?} is not a username: {e}"))?;
            let mut store = open_store(&data, &cfg.store.url)?;
            if store.account(&name)?.is_none() {
                anyhow::bail!("there is no account {name} in this supernode's store");
            }
            let devices = store.devices_of(&name)?;
            if json {
                let list: Vec<_> = devices
                    .iter()
                    .map(|d| {
                        serde_json::json!({
                            "noise_key": hex::encode(d.noise_key),
                            "device_id": hex::encode(d.device_id),
                            "revoked": d.revoked,
                        })
                    })
                    .collect();
                println!(
                    "{}",
                    serde_json::json!({ "user": name.as_str(), "devices": list })
                );
            } else {
                println!("{:<64}  {:<32}  STATUS", "DEVICE (NOISE KEY)", "DEVICE ID");
                for d in &devices {
                    println!(
                        "{}  {}  {}",
                        hex::encode(d.noise_key),
                        hex::encode(d.device_id),
                        if d.revoked { "revoked" } else { "active" }
                    );
                }
            }
            Ok(())
        }
        Cmd::Revoke { data, device, json } => {
            let cfg = load_config(&data)?;
            let key = parse_device_key(&device)?;
            let mut store = open_store(&data, &cfg.store.url)?;
            let Some(found) = store.device_by_noise_key(&key)? else {
                anyhow::bail!(
                    "no device has the Noise key {}: list an account's devices with \
                     `peerlined devices --data {} USER`",
                    hex::encode(key),
                    data.display()
                );
            };
            let already = found.revoked;
            store.revoke_device(&key)?;
            // A session the device holds now: the running supernode checks it again and
            // logs it out (it acts only on what the store says, so the call is harmless).
            let asked = cfg
                .admin
                .is_some_and(|a| ask_recheck(a, found.username.as_str(), &key));
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "user": found.username.as_str(),
                        "noise_key": hex::encode(key),
                        "revoked": true,
                        "already_revoked": already,
                        "supernode_asked": asked,
                    })
                );
            } else {
                if already {
                    println!(
                        "device {} of {} was already revoked",
                        hex::encode(key),
                        found.username
                    );
                } else {
                    println!(
                        "revoked device {} of {}: its logins are refused",
                        hex::encode(key),
                        found.username
                    );
                }
                if asked {
                    println!("the running supernode logs it out now if it is online");
                } else {
                    println!(
                        "the supernode's admin endpoint did not answer (not running?): a \
                         session the device holds ends at its next login"
                    );
                }
            }
            Ok(())
        }
        Cmd::Bootstrap { data } => {
            let p = data.join(BOOTSTRAP_FILE);
            let b = std::fs::read_to_string(&p)
                .with_context(|| format!("cannot read {}: is this a data dir?", p.display()))?;
            println!("{}", b.trim());
            Ok(())
        }
        Cmd::Relay {
            data,
            listen,
            log_format,
        } => {
            let mut cfg = load_config(&data)?;
            if let Some(l) = listen {
                cfg.relay_listen = peerlined::RelayListen::At(l);
            }
            logging(log_format.as_deref().unwrap_or(&cfg.log_format));
            let secret = read_relay_secret(&data)?;
            let rt_cfg = cfg
                .relay_runtime(secret)
                .map_err(anyhow::Error::msg)?
                .with_context(|| {
                    format!(
                        "relay_listen is \"off\" in {}: set it to the address to listen on, \
                         or pass --listen",
                        data.join(CONFIG_FILE).display()
                    )
                })?;
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            rt.block_on(async {
                let server = RelayServer::bind(rt_cfg).await?;
                server.run(signals()).await
            })?;
            Ok(())
        }
        Cmd::Run {
            data,
            listen,
            admin,
            tcp_listen,
            log_format,
        } => {
            let loaded = load(&data)?;
            let mut cfg = loaded.config;
            if let Some(l) = listen {
                cfg.listen = l;
            }
            if admin.is_some() {
                cfg.admin = admin;
            }
            if let Some(t) = tcp_listen {
                cfg.tcp_listen = peerlined::TcpListen::At(t);
            }
            logging(log_format.as_deref().unwrap_or(&cfg.log_format));
            if rustix::process::geteuid().is_root() {
                // It faces the whole internet: a bug should not hand out root.
                tracing::warn!(
                    "running as root: run peerlined as an unprivileged user \
                     (dist/peerlined.service does)"
                );
            }
            let (relay_secret, created) = ensure_relay_secret(&data)?;
            if created {
                tracing::info!(
                    file = %data.join(RELAY_SECRET_FILE).display(),
                    "created the TURN relay secret (this data dir predates the relay)"
                );
            }
            let fleet_settings = cfg.fleet_settings()?;
            let drain_timeout = Duration::from_secs(cfg.fleet.drain_timeout_secs);
            let store = open_store(&data, &cfg.store.url)?;
            if let StoreUrl::Postgres(url) = &cfg.store.url {
                tracing::info!(store = %peerline_store_pg::redact(url), "store on PostgreSQL");
            }
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("cannot start the async runtime")?;
            let fleet = match &fleet_settings {
                None => None,
                Some(f) => {
                    let directory = rt
                        .block_on(peerline_fleet::RedisDirectory::connect_with(
                            &f.directory_url,
                            peerline_fleet::FleetConfig {
                                prefix: f.prefix.clone(),
                                ..Default::default()
                            },
                        ))
                        .with_context(|| {
                            format!(
                                "cannot reach the fleet directory at {} (is Redis Cluster up?)",
                                f.directory_url
                            )
                        })?;
                    tracing::info!(node = f.node_id, "joining the fleet");
                    Some(peerline_net::fleet::FleetRuntime {
                        directory: Arc::new(directory),
                        node_id: f.node_id,
                        listen: f.listen,
                        advertise: f.advertise,
                        client_addr: f.public,
                        psk: peerline_crypto::fleet_psk(&loaded.authority),
                        capacity: u32::try_from(cfg.max_sessions).unwrap_or(u32::MAX),
                    })
                }
            };
            let pid_path = data.join(PID_FILE);
            std::fs::write(&pid_path, format!("{}\n", std::process::id()))
                .with_context(|| format!("cannot write {}", pid_path.display()))?;
            let metrics = MetricsText::default();
            let rechecks = peerline_net::admin::Rechecks::default();
            let result = rt.block_on(async {
                let (raise_stop, stop) = shutdown_on_signals();
                if let Some(a) = cfg.admin {
                    let (m, r) = (metrics.clone(), rechecks.clone());
                    tokio::spawn(async move {
                        if let Err(e) = peerline_net::admin::serve(a, m, r).await {
                            tracing::warn!(error = %e, admin = %a, "admin endpoint failed");
                        }
                    });
                }
                // The relay is optional: a problem with it is logged and the supernode
                // runs without offering it.
                let mut relay_task = None;
                let mut bound = None;
                match cfg.relay_runtime(relay_secret) {
                    Ok(None) => {}
                    Ok(Some(r)) => match RelayServer::bind(r).await {
                        Ok(server) => {
                            let server = server.with_metrics(metrics.clone());
                            bound = Some(server.local_addr());
                            relay_task = Some(tokio::spawn(server.run(stopped(stop.clone()))));
                        }
                        Err(e) => tracing::warn!(error = %e, "TURN relay not started"),
                    },
                    Err(why) => tracing::warn!("TURN relay not started: {why}"),
                }
                let offer = match cfg.relay_offer(bound, relay_secret) {
                    Ok(Some(o)) => {
                        if bound.is_some() {
                            tracing::info!(relay = %o.server, "offering the TURN relay");
                        } else {
                            tracing::info!(
                                relay = %o.server,
                                "offering a TURN relay run elsewhere (relay_listen is off)"
                            );
                        }
                        Some(o)
                    }
                    Ok(None) => {
                        tracing::info!("no TURN relay offered");
                        None
                    }
                    Err(why) => {
                        tracing::warn!("TURN relay not offered to clients: {why}");
                        None
                    }
                };
                // The supernode loop gets a thread and a single-threaded runtime of its
                // own: run by `block_on` on the multi-threaded runtime it was woken across
                // threads on every readiness event, and as a task there its profile was
                // still mostly context switches (docs/benchmarks.md, "Second round").
                // The relay and the admin endpoint keep the shared runtime.
                let sn_runtime = SupernodeRuntime {
                    listen: cfg.listen,
                    tcp_listen: cfg.tcp_addr(),
                    node_private: loaded.node_private,
                    authority: loaded.authority,
                    config: cfg.supernode(offer),
                    snapshot_path: Some(data.join(SNAPSHOT_FILE)),
                    metrics,
                    rechecks,
                    fleet,
                    drain_timeout,
                };
                let shutdown = stopped(stop.clone());
                let (done_tx, done_rx) = tokio::sync::oneshot::channel();
                let spawned = std::thread::Builder::new()
                    .name("peerline-supernode".into())
                    .spawn(move || {
                        let r = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .context("cannot start the supernode's async runtime")
                            .and_then(|rt| {
                                rt.block_on(run_supernode(sn_runtime, store, shutdown))
                                    .map_err(anyhow::Error::from)
                            });
                        let _ = done_tx.send(r);
                    });
                let result = match spawned {
                    Ok(_) => done_rx.await.unwrap_or_else(|_| {
                        Err(anyhow::anyhow!("the supernode thread ended abnormally"))
                    }),
                    Err(e) => Err(anyhow::anyhow!("cannot start the supernode thread: {e}")),
                };
                // Stop the relay with the supernode, whichever way the supernode ended.
                raise_stop.send_replace(true);
                if let Some(task) = relay_task {
                    let abort = task.abort_handle();
                    if tokio::time::timeout(Duration::from_secs(2), task)
                        .await
                        .is_err()
                    {
                        abort.abort();
                    }
                }
                result
            });
            let _ = std::fs::remove_file(&pid_path);
            result?;
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    peerline_net::files::private_umask();
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("peerlined: {e:#}");
            ExitCode::FAILURE
        }
    }
}
