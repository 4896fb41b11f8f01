//! `peerline-load`: simulated Peerline clients in bulk against a supernode, reference
//! servers, and capacity reports.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use clap::{Args, Parser, Subcommand};
use peerline_load::refserv::{self, Mode};
use peerline_load::scenario::{self, Report, RunConfig, Scenario};
use peerline_load::users::{self, DataDir};

#[derive(Parser)]
#[command(
    name = "peerline-load",
    version,
    about = "Load generator and reference servers for Peerline supernodes"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Test mode, needs the operator's authority key: issue N users' certificates with the
    /// data dir's authority.key and write their accounts, devices and contact pairs into
    /// the supernode's store. Run it with the supernode stopped.
    Provision {
        /// Supernode data dir.
        #[arg(long)]
        data: PathBuf,
        /// Users to create.
        #[arg(long)]
        users: usize,
        /// Threads issuing certificates.
        #[arg(long, default_value_t = 2)]
        threads: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Log N users in at the highest rate the supernode accepts.
    Ramp(RunArgs),
    /// Log N users in, then hold them with keepalives and a request mix for --duration.
    Steady(RunArgs),
    /// Log N users in, then all drop their sessions and log in again at once.
    Storm(RunArgs),
    /// STUN Binding requests against any STUN server.
    Stun {
        /// The server.
        #[arg(long)]
        target: String,
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// The server's pid, to report answers per server core-second.
        #[arg(long)]
        pid: Option<u32>,
        /// Sockets (distinct loopback sources when the target is on loopback).
        #[arg(long, default_value_t = 32)]
        sockets: usize,
        /// Requests in flight per socket.
        #[arg(long, default_value_t = 16)]
        window: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run a reference server (bare batched UDP echo, or minimal batched STUN responder)
    /// until interrupted.
    Serve {
        /// What to answer.
        #[arg(value_enum)]
        mode: Mode,
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:0")]
        listen: SocketAddr,
    },
    /// Measure a bare batched echo server with the closed-loop client (requests per
    /// core-second of its thread).
    Echo {
        /// Seconds to run.
        #[arg(long, default_value_t = 10.0)]
        duration: f64,
        /// Sockets.
        #[arg(long, default_value_t = 32)]
        sockets: usize,
        /// Requests in flight per socket.
        #[arg(long, default_value_t = 16)]
        window: usize,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
struct RunArgs {
    /// Supernode data dir (bootstrap entry, pid file, provisioned users).
    #[arg(long)]
    data: PathBuf,
    /// Simulated users.
    #[arg(long)]
    users: usize,
    /// Seconds of the measured phase (steady: the mix; storm: the longest wait).
    #[arg(long, default_value_t = 30.0)]
    duration: f64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
    /// Sockets the clients share (each on its own 127.0.0.0/8 address).
    #[arg(long, default_value_t = 64)]
    sockets: usize,
    /// Handshakes in flight at most while logging in.
    #[arg(long, default_value_t = 256)]
    inflight: usize,
    /// Keepalive interval in seconds.
    #[arg(long, default_value_t = 25.0)]
    keepalive: f64,
    /// Presence changes per second (all users together); default users / 1000.
    #[arg(long)]
    presence_rate: Option<f64>,
    /// Contact lookups (searches) per second; default users / 1000.
    #[arg(long)]
    lookup_rate: Option<f64>,
    /// Connection setups per second; default users / 10000.
    #[arg(long)]
    connect_rate: Option<f64>,
    /// Longest wait for all users to log in, seconds; default 60 + users / 500.
    #[arg(long)]
    login_timeout: Option<f64>,
    /// Seconds of the echo baseline run before the load (0: skip).
    #[arg(long, default_value_t = 5.0)]
    echo_seconds: f64,
    /// Logins timed by the crypto micro-benchmark (0: skip).
    #[arg(long, default_value_t = 2000)]
    crypto_iterations: usize,
    /// Where to write the SVG plot; default DATA/load-SCENARIO.svg.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Generator threads.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Hide the progress bar.
    #[arg(long)]
    quiet: bool,
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("peerline-load: {e:#}");
        std::process::exit(1);
    }
}

fn runtime(threads: usize) -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()
        .context("cannot start the async runtime")
}

fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.cmd {
        Cmd::Provision {
            data,
            users,
            threads,
            json,
        } => {
            let dd = DataDir::open(&data)?;
            let r = users::provision(&dd, users, threads)?;
            if json {
                print_json(&r)?;
            } else {
                println!(
                    "provisioned {} users ({} contact pairs) in {}: certificates {:.1} s, store {:.1} s",
                    r.users,
                    r.contact_pairs,
                    data.display(),
                    r.issue_s,
                    r.store_s
                );
            }
            Ok(())
        }
        Cmd::Ramp(a) => scenario_cmd(Scenario::Ramp, a),
        Cmd::Steady(a) => scenario_cmd(Scenario::Steady, a),
        Cmd::Storm(a) => scenario_cmd(Scenario::Storm, a),
        Cmd::Stun {
            target,
            duration,
            pid,
            sockets,
            window,
            json,
        } => {
            let addr: SocketAddr = std::net::ToSocketAddrs::to_socket_addrs(&target)
                .ok()
                .and_then(|mut a| a.next())
                .with_context(|| format!("cannot resolve {target}: give HOST:PORT"))?;
            let cpu = move || {
                pid.and_then(peerline_load::procstat::sample)
                    .map(|s| s.cpu_s)
            };
            let r = runtime(2)?.block_on(refserv::blast(
                addr,
                Mode::Stun,
                sockets,
                window,
                Duration::from_secs_f64(duration.max(0.1)),
                &cpu,
            ))?;
            if r.answered == 0 {
                bail!("no STUN Binding answer from {addr} in {duration} s: is a STUN server listening there?");
            }
            if json {
                print_json(&r)
            } else {
                print_blast(&r);
                Ok(())
            }
        }
        Cmd::Echo {
            duration,
            sockets,
            window,
            json,
        } => {
            let rt = runtime(2)?;
            let r = rt.block_on(async {
                let srv = refserv::RefServer::start("127.0.0.1:0".parse()?, Mode::Echo)?;
                let cpu = || Some(srv.cpu_s());
                anyhow::Ok(
                    refserv::blast(
                        srv.addr,
                        Mode::Echo,
                        sockets,
                        window,
                        Duration::from_secs_f64(duration.max(0.1)),
                        &cpu,
                    )
                    .await?,
                )
            })?;
            if json {
                print_json(&r)
            } else {
                print_blast(&r);
                Ok(())
            }
        }
        Cmd::Serve { mode, listen } => {
            let srv = refserv::RefServer::start(listen, mode)
                .with_context(|| format!("cannot listen on {listen}"))?;
            println!(
                "{} {} pid {}",
                format!("{mode:?}").to_lowercase(),
                srv.addr,
                std::process::id()
            );
            loop {
                std::thread::sleep(Duration::from_secs(3600));
            }
        }
    }
}

fn print_blast(r: &refserv::BlastReport) {
    println!(
        "{:?} {}: {:.0} answers/s over {:.1} s ({} sent, {} answered); latency p50 {} us, p99 {} us, p99.9 {} us",
        r.mode, r.target, r.per_second, r.seconds, r.sent, r.answered, r.latency_us.p50, r.latency_us.p99, r.latency_us.p999
    );
    match (r.server_cpu_s, r.per_core_second) {
        (Some(cpu), Some(pcs)) => {
            println!("server CPU {cpu:.2} s: {pcs:.0} answers per core-second")
        }
        _ => println!("server CPU unknown (give --pid)"),
    }
}

fn read_node_key(dir: &std::path::Path) -> Option<[u8; 32]> {
    let text = std::fs::read_to_string(dir.join("node.key")).ok()?;
    STANDARD.decode(text.trim()).ok()?.try_into().ok()
}

fn scenario_cmd(scenario: Scenario, a: RunArgs) -> anyhow::Result<()> {
    let dd = DataDir::open(&a.data)?;
    if a.users == 0 {
        bail!("--users must be at least 1");
    }
    let target = dd.bootstrap.addr()?;
    if dd.pid().is_none() {
        eprintln!(
            "warning: no running supernode pid in {}: memory and CPU figures will be missing",
            a.data.display()
        );
    }
    let users = Arc::new(users::load_users(&dd, a.users)?);
    let n = a.users as f64;
    let cfg = RunConfig {
        scenario,
        users: a.users,
        duration: Duration::from_secs_f64(a.duration.max(0.0)),
        engine: peerline_load::engine::EngineConfig {
            target,
            node_key: dd.bootstrap.node_key,
            shards: a.sockets,
            inflight: a.inflight,
            keepalive: Duration::from_secs_f64(a.keepalive.max(0.05)),
            presence_rate: a.presence_rate.unwrap_or(n / 1000.0),
            lookup_rate: a.lookup_rate.unwrap_or(n / 1000.0),
            connect_rate: a.connect_rate.unwrap_or(n / 10000.0),
            seed: rand::random(),
        },
        login_timeout: Duration::from_secs_f64(a.login_timeout.unwrap_or(60.0 + n / 500.0)),
        echo_seconds: a.echo_seconds,
        crypto_iterations: a.crypto_iterations,
        node_private: read_node_key(&a.data),
        progress: !a.quiet && !a.json,
    };
    let report = runtime(a.threads)?.block_on(scenario::run(&dd, users, cfg))?;
    let plot = a.plot.unwrap_or_else(|| {
        a.data.join(format!(
            "load-{}.svg",
            format!("{scenario:?}").to_lowercase()
        ))
    });
    let title = format!(
        "peerline-load {} --users {}: throughput and latency",
        format!("{scenario:?}").to_lowercase(),
        a.users
    );
    std::fs::write(&plot, peerline_load::plot::svg(&title, &report.timeline))
        .with_context(|| format!("cannot write the plot to {}", plot.display()))?;
    if a.json {
        print_json(&report)?;
    } else {
        print_report(&report);
        println!("plot: {}", plot.display());
    }
    if report.logged_in < report.users {
        bail!(
            "{} of {} users never logged in",
            report.users - report.logged_in,
            report.users
        );
    }
    Ok(())
}

fn mib(b: u64) -> f64 {
    b as f64 / 1048576.0
}

fn print_report(r: &Report) {
    println!(
        "{:?}: {} users on {} sockets, keepalive every {} s",
        r.scenario, r.users, r.sockets, r.keepalive_s
    );
    println!(
        "login: {} logged in, {:.1} s, {:.0} logins/s; handshake p50 {} us, p99 {} us, p99.9 {} us",
        r.logged_in,
        r.login_s,
        r.logins_per_s,
        r.login_latency_us.p50,
        r.login_latency_us.p99,
        r.login_latency_us.p999
    );
    if let Some(c) = &r.crypto {
        println!(
            "crypto bound: {:.0} us per login (responder read {:.0} + accept {:.0}, certificate {:.0}) = {:.0} logins per core-second; client side {:.0} us",
            c.login_us, c.responder_read_us, c.responder_accept_us, c.cert_verify_us, c.bound_per_core_second, c.initiator_us
        );
    }
    let s = &r.supernode;
    println!(
        "supernode: {:.0} logins per core-second{}{}",
        s.logins_per_core_second,
        r.login_vs_crypto_bound
            .map(|x| format!("; logins/s = {:.0} % of the crypto bound", x * 100.0))
            .unwrap_or_default(),
        r.login_per_core_vs_crypto_bound
            .map(|x| format!("; per core-second {:.0} % of it", x * 100.0))
            .unwrap_or_default()
    );
    println!(
        "memory: RSS {:.1} MiB before, {:.1} MiB loaded: {:.0} bytes per online user",
        mib(s.rss_before),
        mib(s.rss_loaded),
        s.bytes_per_user
    );
    let p = &r.phase;
    if p.seconds > 0.0 {
        println!(
            "{:.1} s measured: {:.0} answers/s ({} echoes, {} responses, {} errors, {} pushes); {:.0} per supernode core-second (CPU {:.2} s); {} retransmissions, {} failed",
            p.seconds, p.requests_per_s, p.echoes, p.responses, p.errors, p.pushes, p.requests_per_core_second, s.phase_cpu_s, p.retransmissions, p.failed
        );
        for l in &r.latency {
            if l.latency_us.count > 0 {
                println!(
                    "  {:<10} n={:<9} p50 {:>7} us  p99 {:>7} us  p99.9 {:>7} us",
                    l.op, l.latency_us.count, l.latency_us.p50, l.latency_us.p99, l.latency_us.p999
                );
            }
        }
    }
    if let Some(e) = &r.echo {
        println!(
            "echo baseline: {:.0} answers per core-second{}",
            e.echo.per_core_second.unwrap_or(0.0),
            r.requests_vs_echo
                .map(|x| format!(
                    "; supernode requests per core-second = {:.1} % of it",
                    x * 100.0
                ))
                .unwrap_or_default()
        );
    }
    if let Some(st) = &r.storm {
        println!(
            "storm: all back in {:.1} s (target {:.1} s), {} not back, max attempt {}, {} handshakes, {} timed out, {} told busy ({} initiations sent again unchanged), peak RSS {:.1} MiB",
            st.all_back_s, st.target_s, st.not_back, st.max_attempt, st.handshakes, st.handshake_timeouts, st.busy, st.resent, mib(st.peak_rss)
        );
    }
}
