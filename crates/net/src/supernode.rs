//! Drives a [`Supernode`] core on a UDP socket, with storage on its own thread.

use std::collections::VecDeque;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use peerline_core::clock::WallClock;
use peerline_core::directory::MemoryDirectory;
use peerline_core::ops::{execute, Op, OpResult};
use peerline_core::store::Store;
use peerline_core::supernode::{DropReason, Supernode, SupernodeConfig, SupernodeEvent};
use peerline_crypto::Authority;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;

use crate::admin::{Histogram, MetricsText, LATENCY_BUCKETS, STORE_BUCKETS};
use crate::batch::{RecvBatch, SendBatch};
use crate::fleet::{FleetHandle, FleetRuntime, FromFleet, ToFleet};

/// Everything the supernode driver needs.
pub struct SupernodeRuntime {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// TCP address for clients whose network blocks UDP (None: no TCP fallback).
    pub tcp_listen: Option<SocketAddr>,
    /// Noise static private key.
    pub node_private: [u8; 32],
    /// Authority signing key bytes.
    pub authority: [u8; 32],
    /// Core configuration.
    pub config: SupernodeConfig,
    /// Where to keep the session snapshot used to wake clients after a restart.
    pub snapshot_path: Option<PathBuf>,
    /// Metrics text for the admin endpoint.
    pub metrics: MetricsText,
    /// Devices the admin endpoint asks to check again (`peerlined revoke`).
    pub rechecks: crate::admin::Rechecks,
    /// Membership of a fleet (None: a single supernode).
    pub fleet: Option<FleetRuntime>,
    /// At shutdown, how long a fleet member waits for its users to move elsewhere.
    pub drain_timeout: Duration,
}

/// A driver failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetError {
    /// Could not bind the UDP port.
    #[error("cannot listen on {addr}: {source} (is another supernode running on this port?)")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
    /// The storage thread stopped.
    #[error("the storage thread stopped unexpectedly")]
    StoreGone,
    /// Could not bind the node-to-node port.
    #[error("cannot listen for other supernodes on {addr}: {source}")]
    FleetBind {
        /// Address.
        addr: SocketAddr,
        /// OS error.
        source: std::io::Error,
    },
}

/// Aborts a background task when dropped (the TCP acceptor ends with the supernode).
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// `recvmmsg` batches read after one wakeup, before timers and storage get their turn.
const BATCHES_PER_WAKEUP: usize = 8;
/// Storage results handled per wakeup at most (the results channel holds 1,024). A login's
/// result fans out presence to its contacts, so a full channel at once would hold the
/// socket unread for tens of milliseconds; other branches get their turn in between.
const RESULTS_PER_WAKEUP: usize = 128;
/// Longest run of loop turns without handing control back to the runtime. While the socket
/// always has datagrams (a storm), some branch is always ready and the loop would run
/// until tokio's cooperative budget ran out, a hundred turns of up to tens of milliseconds
/// each: the timers' driver went unpolled for seconds (core timers late, restart hints and
/// the metrics text stale).
const YIELD_EVERY: Duration = Duration::from_millis(5);

/// Socket buffers asked for: a few milliseconds without the CPU at tens of thousands of
/// datagrams per second overflow the system default (208 KiB), and every keepalive lost
/// that way is a session that may expire.
const SOCKET_BUFFER: usize = 8 << 20;

/// Hint pacing after a restart: this many reset hints per 10 ms tick.
const HINTS_PER_TICK: usize = 50;

fn read_snapshot(path: &PathBuf) -> VecDeque<(u32, SocketAddr)> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return VecDeque::new();
    };
    text.lines()
        .filter_map(|l| {
            let (i, a) = l.split_once(' ')?;
            Some((i.parse().ok()?, a.parse().ok()?))
        })
        .collect()
}

fn write_snapshot(path: &PathBuf, entries: &[(u32, SocketAddr)]) {
    let mut text = String::with_capacity(entries.len() * 28);
    for (i, a) in entries {
        text.push_str(&format!("{i} {a}\n"));
    }
    let tmp = path.with_extension("tmp");
    if std::fs::write(&tmp, text)
        .and_then(|_| std::fs::rename(&tmp, path))
        .is_err()
    {
        tracing::warn!(path = %path.display(), "could not write the session snapshot");
    }
}

/// Runs one step of the core. A panic is a bug, never a reaction to input; should one
/// happen anyway, it costs the input being handled, not the process and every other
/// user's session. Counted in `peerline_panics_caught_total`.
fn guarded(panics: &mut u64, what: &'static str, f: impl FnOnce()) {
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).is_err() {
        *panics += 1;
        tracing::error!(
            what,
            "bug: handling one input panicked; it was dropped, the supernode goes on"
        );
    }
}

/// Latencies the driver measures.
struct Timings {
    /// Core time per datagram (decrypt, handle, encrypt the answers).
    datagram: Histogram,
    /// From handing a storage operation to the storage thread to its result.
    store: Histogram,
    /// Start times of storage operations in flight, by token.
    in_flight: std::collections::HashMap<u64, Instant>,
    /// Datagrams dropped because the socket could not take them at once.
    send_dropped: u64,
}

fn render_metrics(
    sn: &Supernode,
    panics: u64,
    fleet: Option<&FleetHandle>,
    timings: &Timings,
) -> String {
    let s = sn.stats();
    let mut out = String::new();
    out.push_str(&timings.datagram.render(
        "peerline_datagram_handling_seconds",
        "Supernode core time per received datagram (decrypt, handle, encrypt the answers).",
    ));
    out.push_str(&timings.store.render(
        "peerline_store_op_seconds",
        "Time from queueing a storage operation to its result.",
    ));
    out.push_str(
        "# HELP peerline_requests_by_kind_total Requests from clients, by kind.\n\
         # TYPE peerline_requests_by_kind_total counter\n",
    );
    for (kind, n) in peerline_wire::msg::REQUEST_KINDS
        .iter()
        .zip(s.requests_by_kind.iter())
    {
        if *n > 0 {
            out.push_str(&format!(
                "peerline_requests_by_kind_total{{kind=\"{kind}\"}} {n}\n"
            ));
        }
    }
    if let Some(f) = fleet {
        out.push_str(&crate::fleet::render_metrics(f, s.node_msgs));
    }
    out.push_str(
        "# HELP peerline_dropped_by_reason_total Datagrams and handshakes dropped, by reason.\n\
         # TYPE peerline_dropped_by_reason_total counter\n",
    );
    for r in DropReason::ALL {
        out.push_str(&format!(
            "peerline_dropped_by_reason_total{{reason=\"{}\"}} {}\n",
            r.name(),
            s.drops_for(r)
        ));
    }
    let mut m = |name: &str, kind: &str, help: &str, v: u64| {
        out.push_str(&format!(
            "# HELP peerline_{name} {help}\n# TYPE peerline_{name} {kind}\npeerline_{name} {v}\n"
        ));
    };
    m(
        "sessions",
        "gauge",
        "Open client sessions.",
        sn.session_count() as u64,
    );
    m(
        "online_users",
        "gauge",
        "Users online.",
        sn.online_count() as u64,
    );
    m(
        "datagrams_in_total",
        "counter",
        "Datagrams received.",
        s.datagrams_in,
    );
    m(
        "datagrams_out_total",
        "counter",
        "Datagrams sent.",
        s.datagrams_out,
    );
    m(
        "dropped_total",
        "counter",
        "Datagrams dropped (malformed, forged, replayed, unknown).",
        s.dropped,
    );
    m(
        "handshakes_total",
        "counter",
        "Completed handshakes.",
        s.handshakes,
    );
    m("logins_total", "counter", "Authenticated logins.", s.logins);
    m("requests_total", "counter", "Requests handled.", s.requests);
    m(
        "messages_queued_total",
        "counter",
        "Offline messages accepted.",
        s.messages_queued,
    );
    m(
        "messages_delivered_total",
        "counter",
        "Offline messages delivered and acknowledged.",
        s.messages_delivered,
    );
    m("stun_total", "counter", "STUN messages received.", s.stun);
    m(
        "calls_rung_total",
        "counter",
        "Calls whose callee's device rang.",
        s.calls_rung,
    );
    m(
        "cookies_sent_total",
        "counter",
        "Cookie replies sent: handshakes answered under load without Diffie-Hellman work.",
        s.cookies_sent,
    );
    m(
        "rejects_sent_total",
        "counter",
        "Handshake rejections sent (version, stale, rate limited, revoked, busy).",
        s.rejects_sent,
    );
    m(
        "busy_sent_total",
        "counter",
        "Handshakes shed under overload with a Busy reject and a retry-after (no Diffie-Hellman).",
        s.busy_sent,
    );
    m(
        "pushes_dropped_total",
        "counter",
        "Pushes to clients neither sent nor queued (a session with 4,096 waiting); settled as unanswered.",
        s.pushes_dropped,
    );
    m(
        "handshake_queue",
        "gauge",
        "Handshake initiations waiting for their Diffie-Hellman work.",
        sn.handshake_queue_len() as u64,
    );
    m(
        "handshake_rate",
        "gauge",
        "Handshakes per second the supernode is estimated to serve (measured under backlog).",
        sn.handshake_rate() as u64,
    );
    m(
        "rate_limited_total",
        "counter",
        "Requests refused by a rate limit (searches, contact requests, messages, enrolments).",
        s.rate_limited,
    );
    m(
        "half_open_sessions",
        "gauge",
        "Sessions whose client has not yet sent an authenticated packet.",
        sn.half_open_count() as u64,
    );
    m(
        "send_dropped_total",
        "counter",
        "Datagrams dropped because the socket's send buffer was full (clients retransmit).",
        timings.send_dropped,
    );
    m(
        "panics_caught_total",
        "counter",
        "Panics while handling one input, caught (each a bug; the input was dropped).",
        panics,
    );
    out
}

/// Runs the supernode until `shutdown` resolves.
pub async fn run_supernode(
    rt: SupernodeRuntime,
    mut store: Box<dyn Store>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NetError> {
    let socket = UdpSocket::bind(rt.listen)
        .await
        .map_err(|source| NetError::Bind {
            addr: rt.listen,
            source,
        })?;
    let local = socket.local_addr().unwrap_or(rt.listen);
    let (rcvbuf, sndbuf) = crate::batch::set_buffers(&socket, SOCKET_BUFFER);
    tracing::info!(listen = %local, rcvbuf, sndbuf, "supernode listening");
    let tcp_peers = crate::tcp::TcpPeers::default();
    let (tcp_tx, mut tcp_rx) = mpsc::channel::<(SocketAddr, Vec<u8>)>(4096);
    let _tcp_task = match rt.tcp_listen {
        Some(addr) => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| NetError::Bind { addr, source })?;
            tracing::info!(listen = %addr, "TCP fallback listening");
            let max = rt.config.max_sessions;
            Some(AbortOnDrop(tokio::spawn(crate::tcp::serve(
                listener,
                tcp_peers.clone(),
                tcp_tx,
                max,
            ))))
        }
        None => None,
    };

    // Storage runs on its own thread: SQLite blocks, and an offline message is
    // acknowledged only after its transaction committed there. The queue is bounded by
    // the core's `max_pending_ops`.
    let (op_tx, op_rx) = std::sync::mpsc::channel::<(u64, Op)>();
    let (res_tx, mut res_rx) = mpsc::channel::<(u64, OpResult)>(1024);
    let storage = std::thread::Builder::new()
        .name("peerline-store".into())
        .spawn(move || {
            let mut rng = rand_core::OsRng;
            while let Ok((token, op)) = op_rx.recv() {
                let r = execute(store.as_mut(), op, &mut rng);
                if res_tx.blocking_send((token, r)).is_err() {
                    break;
                }
            }
        })
        .map_err(|_| NetError::StoreGone)?;

    let mut config = rt.config;
    let mut fleet = match rt.fleet {
        Some(f) => {
            let addr = f.listen;
            config.fleet = true;
            config.node_id = f.node_id;
            Some(
                FleetHandle::start(f)
                    .await
                    .map_err(|source| NetError::FleetBind { addr, source })?,
            )
        }
        None => None,
    };
    let start = Instant::now();
    let mut sn = Supernode::new(
        config,
        rt.node_private,
        Authority::from_bytes(&rt.authority),
        crate::os_seed(),
        Box::new(MemoryDirectory::new()),
        WallClock::new(start, crate::unix_ms_now()),
        start,
    );

    let mut hints = rt
        .snapshot_path
        .as_ref()
        .map(read_snapshot)
        .unwrap_or_default();
    if !hints.is_empty() {
        tracing::info!(clients = hints.len(), "waking the previous run's clients");
    }
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut last_snapshot = Instant::now();
    let mut snapshot_dirty = true;
    let mut last_write = Instant::now();
    let mut rx = RecvBatch::new();
    let mut tx = SendBatch::new();
    let mut panics = 0u64;
    let mut timings = Timings {
        datagram: Histogram::new(LATENCY_BUCKETS),
        store: Histogram::new(STORE_BUCKETS),
        in_flight: std::collections::HashMap::new(),
        send_dropped: 0,
    };
    // One timer future, moved when the core's next deadline moves.
    let sleep = tokio::time::sleep_until(Instant::now().into());
    tokio::pin!(sleep);
    // Set once shutdown began: a fleet member drains its users until then.
    let mut stopping: Option<Instant> = None;
    tokio::pin!(shutdown);

    let mut last_yield = Instant::now();
    loop {
        if last_yield.elapsed() >= YIELD_EVERY {
            tokio::task::yield_now().await;
            last_yield = Instant::now();
        }
        // Perform everything the core asked for.
        send_all(&mut sn, &socket, &mut tx, &tcp_peers, &mut timings);
        while let Some(op) = sn.poll_op() {
            timings.in_flight.insert(op.0, Instant::now());
            if op_tx.send(op).is_err() {
                return Err(NetError::StoreGone);
            }
        }
        while let Some(e) = sn.poll_event() {
            snapshot_dirty = true;
            match e {
                SupernodeEvent::Registered(u) => tracing::info!(user = %u, "account registered"),
                SupernodeEvent::Login(u) => {
                    if let Some(f) = &fleet {
                        f.send(ToFleet::Login(u));
                    }
                }
                SupernodeEvent::Logout(u) => {
                    if let Some(f) = &fleet {
                        f.send(ToFleet::Logout(u));
                    }
                }
            }
        }
        while let Some(t) = sn.poll_node_msg() {
            if let Some(f) = &fleet {
                f.send(ToFleet::Out(t));
            }
        }
        let deadline: tokio::time::Instant = sn
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
            .into();
        if sleep.deadline() != deadline {
            sleep.as_mut().reset(deadline);
        }
        tokio::select! {
            r = socket.readable() => {
                if r.is_ok() {
                    // Under a flood, read what is already queued before going back to the
                    // select: one wakeup per datagram would cost more than the datagram.
                    for _ in 0..BATCHES_PER_WAKEUP {
                        let full = match socket.try_io(tokio::io::Interest::READABLE, || rx.recv(&socket, false)) {
                            Ok(n) => n == crate::batch::BATCH,
                            Err(e) => {
                                if e.kind() != std::io::ErrorKind::WouldBlock {
                                    tracing::debug!(error = %e, "receive failed");
                                }
                                break;
                            }
                        };
                        // Transport packets first: the batch's keepalives and requests are
                        // answered and sent before its handshakes (a login's crypto is
                        // worth about 60 keepalives) get their bounded turn.
                        sn.begin_batch();
                        handle_batch(&mut sn, &rx, &mut tx, &socket, &mut panics, &mut timings);
                        send_all(&mut sn, &socket, &mut tx, &tcp_peers, &mut timings);
                        // A full batch means more are waiting: few handshakes now, so that
                        // reading keeps up and nothing is lost silently in the kernel.
                        guarded(&mut panics, "handshakes", || {
                            if full {
                                sn.end_batch_backlogged(Instant::now())
                            } else {
                                sn.end_batch(Instant::now())
                            }
                        });
                        send_all(&mut sn, &socket, &mut tx, &tcp_peers, &mut timings);
                    }
                }
            }
            r = res_rx.recv() => {
                let Some(first) = r else {
                    return Err(NetError::StoreGone);
                };
                // Take every result already waiting, not one per wakeup: under a login
                // burst the socket branch is always ready too, and one result per turn
                // let the results back up, the storage thread block on their full channel
                // and the operations pile up behind it (memory and login latency).
                let mut next = Some(first);
                let mut taken = 0;
                while let Some((token, result)) = next.take() {
                    let started = timings.in_flight.remove(&token);
                    peerline_core::mem::shrink_map(&mut timings.in_flight);
                    if let Some(t) = started {
                        timings.store.observe(t.elapsed().as_secs_f64());
                    }
                    guarded(&mut panics, "storage result", || {
                        sn.handle_op_result(Instant::now(), token, result)
                    });
                    taken += 1;
                    if taken < RESULTS_PER_WAKEUP {
                        next = res_rx.try_recv().ok();
                    }
                }
            }
            Some(m) = recv_fleet(&mut fleet) => {
                guarded(&mut panics, "fleet message", || {
                    let now = Instant::now();
                    match m {
                        FromFleet::Msg { from, msg } => sn.handle_node_msg(now, from, msg),
                        FromFleet::Unreachable(msg) => sn.node_unreachable(now, msg),
                        FromFleet::NodeDown(n) => sn.node_down(now, n),
                        FromFleet::Hosts(h) => sn.set_hosts(now, h),
                        FromFleet::Kick(u) => sn.kick(now, &u),
                    }
                })
            }
            Some((from, b)) = tcp_rx.recv() => {
                guarded(&mut panics, "datagram", || sn.handle_datagram(Instant::now(), from, &b))
            }
            _ = &mut sleep => {
                // Bounded by the core's timer budget; when more are due, the deadline
                // stays in the past and the select serves the socket in between.
                guarded(&mut panics, "timer", || sn.handle_timeout(Instant::now()))
            }
            _ = tick.tick() => {
                for (user, key) in rt.rechecks.take() {
                    let mut online = false;
                    guarded(&mut panics, "recheck", || online = sn.recheck_device(&user, &key));
                    tracing::info!(user = %user, online_here = online, "device check asked by the operator");
                }
                for _ in 0..HINTS_PER_TICK {
                    let Some((i, a)) = hints.pop_front() else { break };
                    sn.send_reset_hint(i, a);
                }
                if let Some(since) = stopping {
                    if sn.online_count() == 0 || since.elapsed() >= rt.drain_timeout {
                        tracing::info!(left = sn.online_count(), "drained");
                        break;
                    }
                }
                if last_snapshot.elapsed() >= Duration::from_secs(1) {
                    last_snapshot = Instant::now();
                    if let Some(f) = &fleet {
                        f.send(ToFleet::Load {
                            online: sn.online_count() as u32,
                            draining: sn.is_draining(),
                        });
                    }
                    rt.metrics.set(render_metrics(&sn, panics, fleet.as_ref(), &timings));
                    // Rewritten in full: less often the more sessions there are, and
                    // formatted and written off the loop.
                    let every = Duration::from_secs(1 + sn.session_count() as u64 / 100_000);
                    if snapshot_dirty && hints.is_empty() && last_write.elapsed() >= every {
                        snapshot_dirty = false;
                        last_write = Instant::now();
                        if let Some(p) = &rt.snapshot_path {
                            let (p, entries) = (p.clone(), sn.snapshot());
                            tokio::task::spawn_blocking(move || write_snapshot(&p, &entries));
                        }
                    }
                }
            }
            _ = &mut shutdown, if stopping.is_none() => {
                if fleet.is_none() {
                    break;
                }
                // A fleet member sends its users to the others before it goes.
                let asked = sn.drain(Instant::now());
                if let Some(f) = &fleet {
                    f.send(ToFleet::Load { online: sn.online_count() as u32, draining: true });
                }
                tracing::info!(users = asked, "draining: users are asked to move to other supernodes");
                stopping = Some(Instant::now());
            }
        }
    }
    tracing::info!("supernode stopping");
    if let Some(f) = fleet.take() {
        f.leave().await;
    }
    if let Some(p) = &rt.snapshot_path {
        write_snapshot(p, &sn.snapshot());
    }
    drop(op_tx);
    drop(res_rx);
    let _ = storage.join();
    Ok(())
}

/// Handles one received batch. STUN Bindings are answered straight into the send
/// batch (no allocation, no queue, no clock read); everything else goes through the core
/// with its time measured.
fn handle_batch(
    sn: &mut Supernode,
    rx: &RecvBatch,
    tx: &mut SendBatch,
    socket: &UdpSocket,
    panics: &mut u64,
    timings: &mut Timings,
) {
    let mut now = None;
    for (bytes, from) in rx.iter() {
        if peerline_wire::packet::is_stun(bytes) {
            if tx.is_full() {
                timings.send_dropped += tx.flush(socket).dropped as u64;
            }
            let t = *now.get_or_insert_with(Instant::now);
            guarded(panics, "datagram", || {
                tx.push_with(from, |out| sn.handle_datagram_into(t, from, bytes, out));
            });
            continue;
        }
        let t = Instant::now();
        now = Some(t);
        guarded(panics, "datagram", || sn.handle_datagram(t, from, bytes));
        timings.datagram.observe(t.elapsed().as_secs_f64());
    }
}

/// Sends what the core queued: TCP clients through their connection, the rest with
/// `sendmmsg`, never waiting on a full socket (dropped and counted: clients retransmit).
fn send_all(
    sn: &mut Supernode,
    socket: &UdpSocket,
    tx: &mut SendBatch,
    tcp_peers: &crate::tcp::TcpPeers,
    timings: &mut Timings,
) {
    while let Some(t) = sn.poll_transmit() {
        if tcp_peers.send(t.dst, &t.payload) {
            continue;
        }
        if tx.is_full() {
            timings.send_dropped += tx.flush(socket).dropped as u64;
        }
        if !tx.push(t.dst, &t.payload) {
            // Longer than a batch slot (never for the core's datagrams): sent alone.
            if socket.try_send_to(&t.payload, t.dst).is_err() {
                timings.send_dropped += 1;
            }
        }
    }
    if !tx.is_empty() {
        timings.send_dropped += tx.flush(socket).dropped as u64;
    }
}

/// The next message from the fleet task, or never without a fleet.
async fn recv_fleet(fleet: &mut Option<FleetHandle>) -> Option<FromFleet> {
    match fleet {
        Some(f) => f.rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_one_step_is_caught_and_counted() {
        let mut panics = 0;
        let mut after = false;
        guarded(&mut panics, "test", || panic!("a bug"));
        guarded(&mut panics, "test", || after = true);
        assert_eq!(panics, 1);
        assert!(after, "the next input is handled");
    }
}
