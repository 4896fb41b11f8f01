//! The scenarios (`ramp`, `steady`, `storm`), each measured together with its references
//! (the login's crypto cost, a bare batched echo server) in the same run.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{phase, Engine, EngineConfig, OPS, OP_NAMES};
use crate::procstat::{self, ProcSample};
use crate::refserv::{self, Mode, Percentiles};
use crate::users::{DataDir, Users};

/// Which scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Scenario {
    /// Log N users in as fast as the supernode accepts them.
    Ramp,
    /// Log N users in, then hold them with keepalives and a request mix.
    Steady,
    /// Log N users in, then all drop their sessions and log in again at once.
    Storm,
}

/// Settings of a run.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The scenario.
    pub scenario: Scenario,
    /// Simulated users.
    pub users: usize,
    /// Length of the measured phase (steady: the mix; storm: the longest wait for all
    /// users to be back).
    pub duration: Duration,
    /// Engine settings (target and rates).
    pub engine: EngineConfig,
    /// Longest wait for the login phase.
    pub login_timeout: Duration,
    /// Seconds the echo baseline runs (0: skip).
    pub echo_seconds: f64,
    /// Logins timed by the crypto micro-benchmark (0: skip).
    pub crypto_iterations: usize,
    /// Supernode's Noise private key, for the crypto micro-benchmark (from the data dir).
    pub node_private: Option<[u8; 32]>,
    /// Show a progress bar.
    pub progress: bool,
}

/// One second of the run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Sample {
    /// Seconds since the start.
    pub t: u32,
    /// Phase name.
    pub phase: &'static str,
    /// Logins completed in this second.
    pub logins: u64,
    /// Answers (keepalive echoes and responses) in this second.
    pub answers: u64,
    /// Clients online at its end.
    pub online: i64,
    /// p99 latency of keepalives and requests in this second, microseconds.
    pub p99_us: u64,
    /// Supernode RSS, bytes.
    pub rss_bytes: u64,
    /// Supernode CPU seconds used in this second.
    pub cpu_s: f64,
    /// The load generator's own CPU seconds in this second (it shares the box).
    pub load_cpu_s: f64,
}

/// Latency of one operation in one phase.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OpLatency {
    /// Operation.
    pub op: &'static str,
    /// Percentiles in microseconds.
    pub latency_us: Percentiles,
}

/// The supernode's resources.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct SupernodeUse {
    /// Its pid.
    pub pid: Option<u32>,
    /// RSS before the run, bytes.
    pub rss_before: u64,
    /// RSS with all users logged in, bytes.
    pub rss_loaded: u64,
    /// RSS at the end, bytes.
    pub rss_end: u64,
    /// (rss_loaded - rss_before) / users.
    pub bytes_per_user: f64,
    /// CPU seconds during the login phase.
    pub login_cpu_s: f64,
    /// Logins per supernode core-second (logins / CPU seconds during the login phase).
    pub logins_per_core_second: f64,
    /// CPU seconds during the measured phase (steady or storm).
    pub phase_cpu_s: f64,
}

/// The measured phase's figures.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PhaseFigures {
    /// Seconds.
    pub seconds: f64,
    /// Requests sent (first transmissions).
    pub requests: u64,
    /// Responses received (ok and error).
    pub responses: u64,
    /// Of which errors.
    pub errors: u64,
    /// Keepalives sent.
    pub keepalives: u64,
    /// Keepalive echoes received.
    pub echoes: u64,
    /// Supernode pushes answered.
    pub pushes: u64,
    /// Authenticated requests per second: keepalives echoed, responses, and pushes answered.
    pub requests_per_s: f64,
    /// The same per supernode core-second.
    pub requests_per_core_second: f64,
    /// Retransmissions.
    pub retransmissions: u64,
    /// Requests that ran out of transmissions.
    pub failed: u64,
}

/// The storm's figures.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct StormFigures {
    /// Seconds until every user was back.
    pub all_back_s: f64,
    /// The target: users / login rate of the ramp x 1.25.
    pub target_s: f64,
    /// Users not back at the end.
    pub not_back: i64,
    /// Highest handshake attempt of any client.
    pub max_attempt: u64,
    /// Handshakes sent during the storm.
    pub handshakes: u64,
    /// Handshakes unanswered within 1 s.
    pub handshake_timeouts: u64,
    /// Handshakes the supernode shed with a `Busy` (retry-later) answer.
    pub busy: u64,
    /// Of the handshakes, initiations sent again unchanged after a `Busy`.
    pub resent: u64,
    /// Peak supernode RSS during the storm, bytes.
    pub peak_rss: u64,
}

/// The echo baseline measured in the same run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EchoBaseline {
    /// The blast against the bare batched echo server.
    pub echo: refserv::BlastReport,
}

/// A run's report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    /// Scenario.
    pub scenario: Scenario,
    /// Users.
    pub users: usize,
    /// Sockets used.
    pub sockets: usize,
    /// Keepalive interval, seconds.
    pub keepalive_s: f64,
    /// Request rates asked for (presence, lookup, connect per second).
    pub rates: [f64; 3],
    /// Seconds the login phase took.
    pub login_s: f64,
    /// Logins per second in the login phase.
    pub logins_per_s: f64,
    /// Users that logged in at least once.
    pub logged_in: usize,
    /// Users that got at least one answer.
    pub answered: usize,
    /// The login's crypto cost measured in this run.
    pub crypto: Option<crate::cryptobench::CryptoCost>,
    /// Logins per second / crypto bound (one core).
    pub login_vs_crypto_bound: Option<f64>,
    /// Logins per supernode core-second / crypto bound.
    pub login_per_core_vs_crypto_bound: Option<f64>,
    /// Login latency (successful handshake round trips) in the login phase.
    pub login_latency_us: Percentiles,
    /// The measured phase (steady: mix; storm: the storm).
    pub phase: PhaseFigures,
    /// Latency per operation in the measured phase.
    pub latency: Vec<OpLatency>,
    /// Storm figures.
    pub storm: Option<StormFigures>,
    /// Supernode resources.
    pub supernode: SupernodeUse,
    /// Echo baseline.
    pub echo: Option<EchoBaseline>,
    /// requests_per_core_second / echo's per core-second.
    pub requests_vs_echo: Option<f64>,
    /// Clients' counters at the end.
    pub counters: serde_json::Value,
    /// One sample per second.
    pub timeline: Vec<Sample>,
}

fn phase_name(p: u8) -> &'static str {
    match p {
        phase::LOGIN => "login",
        phase::HOLD => "hold",
        phase::MIX => "steady",
        phase::STORM => "storm",
        phase::PREPARE => "prepare",
        _ => "stop",
    }
}

struct Snapshot {
    at: Instant,
    proc_: Option<ProcSample>,
    responses: u64,
    echoes: u64,
    pushes: u64,
    requests: u64,
    errors: u64,
    keepalives: u64,
    retransmissions: u64,
    failed: u64,
    handshakes: u64,
    timeouts: u64,
    busy: u64,
    resent: u64,
}

fn snapshot(e: &Engine, pid: Option<u32>) -> Snapshot {
    let c = &e.shared.counters;
    let r = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    Snapshot {
        at: Instant::now(),
        proc_: pid.and_then(procstat::sample),
        responses: r(&c.answered_ok) + r(&c.answered_err),
        errors: r(&c.answered_err),
        echoes: r(&c.echoes),
        pushes: r(&c.pushes),
        requests: r(&c.requests),
        keepalives: r(&c.keepalives),
        retransmissions: r(&c.retransmissions),
        failed: r(&c.failed),
        handshakes: r(&c.handshakes),
        timeouts: r(&c.handshake_timeouts),
        busy: r(&c.busy),
        resent: r(&c.resent),
    }
}

fn cpu_between(a: &Snapshot, b: &Snapshot) -> f64 {
    cpu_delta(a.proc_, b.proc_)
}

/// CPU seconds between two samples of one process (0 when either is missing).
fn cpu_delta(a: Option<ProcSample>, b: Option<ProcSample>) -> f64 {
    match (a, b) {
        (Some(x), Some(y)) => y.cpu_s - x.cpu_s,
        _ => 0.0,
    }
}

/// Samples one line per second until stopped; also drives the progress bar.
fn spawn_sampler(
    shared: Arc<crate::engine::Shared>,
    pid: Option<u32>,
    users: usize,
    progress: bool,
) -> (
    tokio::task::JoinHandle<Vec<Sample>>,
    Arc<std::sync::atomic::AtomicBool>,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let task = tokio::spawn(async move {
        let bar = if progress {
            let b = indicatif::ProgressBar::new(users as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:30}] {pos}/{len} online {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        let mut out = Vec::new();
        let c = &shared.counters;
        let me = std::process::id();
        let mut last = (0u64, 0u64, pid.and_then(procstat::sample));
        let mut last_me = procstat::sample(me);
        let mut t = 0u32;
        let mut iv = tokio::time::interval(Duration::from_secs(1));
        iv.tick().await;
        while !stop2.load(Ordering::Relaxed) {
            iv.tick().await;
            t += 1;
            let logins = c.logins.load(Ordering::Relaxed);
            let answers = c.echoes.load(Ordering::Relaxed)
                + c.answered_ok.load(Ordering::Relaxed)
                + c.answered_err.load(Ordering::Relaxed);
            let p = pid.and_then(procstat::sample);
            let sec = (shared.start.elapsed().as_secs() as u32).saturating_sub(1);
            let p99 = shared
                .timeline
                .lock()
                .ok()
                .and_then(|tl| tl.get(&sec).map(|h| h.value_at_quantile(0.99)))
                .unwrap_or(0);
            let online = c.online.load(Ordering::Relaxed);
            let cpu = cpu_delta(last.2, p);
            let p_me = procstat::sample(me);
            let load_cpu = cpu_delta(last_me, p_me);
            last_me = p_me;
            let s = Sample {
                t,
                phase: phase_name(shared.phase.load(Ordering::Relaxed)),
                logins: logins - last.0,
                answers: answers - last.1,
                online,
                p99_us: p99,
                rss_bytes: p.map_or(0, |p| p.rss_bytes),
                cpu_s: cpu,
                load_cpu_s: load_cpu,
            };
            bar.set_position(online.max(0) as u64);
            let prepared = match shared.phase.load(Ordering::Relaxed) {
                phase::PREPARE => format!(
                    " ({} initiations ready)",
                    c.prepared.load(Ordering::Relaxed)
                ),
                _ => String::new(),
            };
            bar.set_message(format!(
                "{}{prepared} | {} logins/s | {} answers/s | p99 {:.1} ms | supernode {:.0} MiB, {:.0}% CPU | generator {:.0}% CPU",
                s.phase,
                s.logins,
                s.answers,
                s.p99_us as f64 / 1000.0,
                s.rss_bytes as f64 / 1048576.0,
                cpu * 100.0,
                load_cpu * 100.0
            ));
            out.push(s);
            last = (logins, answers, p);
        }
        bar.finish_and_clear();
        out
    });
    (task, stop)
}

/// Waits until `online` reaches `n` or `timeout` passes; returns whether it did.
async fn wait_online(e: &Engine, n: usize, timeout: Duration) -> bool {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if e.online() >= n as i64 {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    e.online() >= n as i64
}

/// Runs a scenario against the supernode of `dd` with `users`.
pub async fn run(dd: &DataDir, users: Arc<Users>, cfg: RunConfig) -> anyhow::Result<Report> {
    let pid = dd.pid();
    let n = users.len();
    // References first, on a quiet box: the crypto cost and the echo ceiling.
    let crypto = match (cfg.node_private, cfg.crypto_iterations) {
        (Some(k), it) if it > 0 => Some(crate::cryptobench::measure(&users, &k, it)),
        _ => None,
    };
    let echo = if cfg.echo_seconds > 0.0 {
        let srv = refserv::RefServer::start("127.0.0.1:0".parse()?, Mode::Echo)?;
        let cpu = || Some(srv.cpu_s());
        let r = refserv::blast(
            srv.addr,
            Mode::Echo,
            cfg.engine.shards.clamp(1, 64),
            16,
            Duration::from_secs_f64(cfg.echo_seconds),
            &cpu,
        )
        .await?;
        Some(EchoBaseline { echo: r })
    } else {
        None
    };

    let before = pid.and_then(procstat::sample);
    let engine = Engine::start(cfg.engine.clone(), users.clone()).await?;
    let (sampler, sampler_stop) = spawn_sampler(engine.shared.clone(), pid, n, cfg.progress);

    // Login phase.
    let s0 = snapshot(&engine, pid);
    let all_in = wait_online(&engine, n, cfg.login_timeout).await;
    let s1 = snapshot(&engine, pid);
    let login_s = (s1.at - s0.at).as_secs_f64();
    let logins_per_s = engine.online().max(0) as f64 / login_s.max(1e-9);
    if !all_in {
        eprintln!(
            "warning: only {} of {n} users logged in within {:?}",
            engine.online(),
            cfg.login_timeout
        );
    }
    engine.set_phase(phase::HOLD).await;
    // Let retransmissions and login fan-out settle before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded = pid.and_then(procstat::sample);

    let mut storm = None;
    let (pa, pb) = match cfg.scenario {
        Scenario::Ramp => {
            let s = snapshot(&engine, pid);
            (s, snapshot(&engine, pid))
        }
        Scenario::Steady => {
            engine.set_phase(phase::MIX).await;
            let a = snapshot(&engine, pid);
            tokio::time::sleep(cfg.duration).await;
            let b = snapshot(&engine, pid);
            engine.set_phase(phase::HOLD).await;
            (a, b)
        }
        Scenario::Storm => {
            // Clients compute their next initiation before the storm: on a real network
            // each does so on its own machine, and here it would take the supernode's CPU.
            engine.set_phase(phase::PREPARE).await;
            let counted = &engine.shared.counters.prepared;
            let until = Instant::now() + Duration::from_secs(60) + Duration::from_millis(n as u64);
            while (counted.load(Ordering::Relaxed) as usize) < n && Instant::now() < until {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            engine.set_phase(phase::HOLD).await;
            let a = snapshot(&engine, pid);
            let t0 = Instant::now();
            engine.set_phase(phase::STORM).await;
            let mut peak = 0u64;
            let end = t0 + cfg.duration;
            let mut back = false;
            while Instant::now() < end {
                if let Some(p) = pid.and_then(procstat::sample) {
                    peak = peak.max(p.rss_bytes);
                }
                if engine.online() >= n as i64 {
                    back = true;
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let all_back_s = t0.elapsed().as_secs_f64();
            let b = snapshot(&engine, pid);
            storm = Some(StormFigures {
                all_back_s: if back { all_back_s } else { f64::NAN },
                target_s: n as f64 / logins_per_s.max(1e-9) * 1.25,
                not_back: n as i64 - engine.online(),
                max_attempt: engine.shared.counters.max_attempt.load(Ordering::Relaxed),
                handshakes: b.handshakes - a.handshakes,
                handshake_timeouts: b.timeouts - a.timeouts,
                busy: b.busy - a.busy,
                resent: b.resent - a.resent,
                peak_rss: peak,
            });
            (a, b)
        }
    };
    let end = pid.and_then(procstat::sample);
    let counters = counters_json(&engine);
    sampler_stop.store(true, Ordering::Relaxed);
    let result = engine.stop().await;
    let timeline = sampler.await.unwrap_or_default();

    let phase_cpu_s = cpu_between(&pa, &pb);
    let seconds = (pb.at - pa.at).as_secs_f64();
    let answers = (pb.responses - pa.responses) + (pb.echoes - pa.echoes) + (pb.pushes - pa.pushes);
    let phase = PhaseFigures {
        seconds,
        requests: pb.requests - pa.requests,
        responses: pb.responses - pa.responses,
        errors: pb.errors - pa.errors,
        keepalives: pb.keepalives - pa.keepalives,
        echoes: pb.echoes - pa.echoes,
        pushes: pb.pushes - pa.pushes,
        requests_per_s: if seconds > 0.0 {
            answers as f64 / seconds
        } else {
            0.0
        },
        requests_per_core_second: if phase_cpu_s > 0.0 {
            answers as f64 / phase_cpu_s
        } else {
            0.0
        },
        retransmissions: pb.retransmissions - pa.retransmissions,
        failed: pb.failed - pa.failed,
    };
    let measured_phase = match cfg.scenario {
        Scenario::Ramp => phase::LOGIN,
        Scenario::Steady => phase::MIX,
        Scenario::Storm => phase::STORM,
    } as usize;
    let latency = (0..OPS)
        .map(|o| OpLatency {
            op: OP_NAMES[o],
            latency_us: Percentiles::of(&result.hists[measured_phase][o]),
        })
        .collect();
    let login_cpu_s = cpu_between(&s0, &s1);
    let rss_before = before.map_or(0, |p| p.rss_bytes);
    let rss_loaded = loaded.map_or(0, |p| p.rss_bytes);
    let supernode = SupernodeUse {
        pid,
        rss_before,
        rss_loaded,
        rss_end: end.map_or(0, |p| p.rss_bytes),
        bytes_per_user: rss_loaded.saturating_sub(rss_before) as f64 / n.max(1) as f64,
        login_cpu_s,
        logins_per_core_second: if login_cpu_s > 0.0 {
            n as f64 / login_cpu_s
        } else {
            0.0
        },
        phase_cpu_s,
    };
    let bound = crypto.as_ref().map(|c| c.bound_per_core_second);
    let echo_pcs = echo.as_ref().and_then(|e| e.echo.per_core_second);
    Ok(Report {
        scenario: cfg.scenario,
        users: n,
        sockets: cfg.engine.shards.clamp(1, n.max(1)),
        keepalive_s: cfg.engine.keepalive.as_secs_f64(),
        rates: [
            cfg.engine.presence_rate,
            cfg.engine.lookup_rate,
            cfg.engine.connect_rate,
        ],
        login_s,
        logins_per_s,
        logged_in: result.ever_online,
        answered: result.answered,
        login_vs_crypto_bound: bound.map(|b| logins_per_s / b),
        login_per_core_vs_crypto_bound: bound
            .filter(|_| supernode.logins_per_core_second > 0.0)
            .map(|b| supernode.logins_per_core_second / b),
        crypto,
        login_latency_us: Percentiles::of(&result.hists[phase::LOGIN as usize][0]),
        requests_vs_echo: echo_pcs
            .filter(|_| phase.requests_per_core_second > 0.0)
            .map(|e| phase.requests_per_core_second / e),
        phase,
        latency,
        storm,
        supernode,
        echo,
        counters,
        timeline,
    })
}

fn counters_json(e: &Engine) -> serde_json::Value {
    let c = &e.shared.counters;
    let r = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    serde_json::json!({
        "logins": r(&c.logins),
        "handshakes": r(&c.handshakes),
        "handshake_timeouts": r(&c.handshake_timeouts),
        "busy": r(&c.busy),
        "resent": r(&c.resent),
        "prepared": r(&c.prepared),
        "rejected": r(&c.rejected),
        "keepalives": r(&c.keepalives),
        "echoes": r(&c.echoes),
        "requests": r(&c.requests),
        "retransmissions": r(&c.retransmissions),
        "answered_ok": r(&c.answered_ok),
        "answered_err": r(&c.answered_err),
        "failed": r(&c.failed),
        "pushes": r(&c.pushes),
        "resets": r(&c.resets),
        "closes": r(&c.closes),
        "expired": r(&c.expired),
        "skipped": r(&c.skipped),
        "stray": r(&c.stray),
        "max_attempt": r(&c.max_attempt),
    })
}
