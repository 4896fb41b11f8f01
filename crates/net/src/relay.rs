//! Drives a [`Relay`] (the sans-IO TURN core) on UDP sockets.
//!
//! One socket listens for clients. For every allocation the core creates, this glue binds
//! one more UDP socket on the listening IP (port chosen by the OS), tells the core its
//! address with [`Relay::relayed_bound`], and runs a small task that reads that socket and
//! hands each datagram to the main loop. The main loop owns the core: it feeds it client
//! datagrams, peer datagrams and timeouts, sends what it asks, and opens or closes relayed
//! sockets on its events. Protocol decisions never live here.
//!
//! ```no_run
//! # async fn f() -> Result<(), peerline_net::relay::RelayError> {
//! use peerline_core::relay::RelayConfig;
//! use peerline_net::relay::{run_relay, RelayRuntime};
//! let rt = RelayRuntime {
//!     listen: "0.0.0.0:3478".parse().unwrap(),
//!     secret: [0u8; 32], // shared with whoever issues `turn_credentials`
//!     config: RelayConfig::default(),
//!     advertise_ip: Some("203.0.113.5".parse().unwrap()),
//! };
//! run_relay(rt, async { let _ = tokio::signal::ctrl_c().await; }).await
//! # }
//! ```

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peerline_core::relay::{
    AllocationId, Relay, RelayBindFailure, RelayConfig, RelayEvent, RelayFamily, RelaySocket,
};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Everything the relay driver needs.
#[derive(Debug, Clone)]
pub struct RelayRuntime {
    /// UDP address clients send to (IP and port). Relayed sockets are bound on its IP.
    pub listen: SocketAddr,
    /// The shared secret of the time-limited credentials (see
    /// [`peerline_core::relay::turn_credentials`]).
    pub secret: [u8; 32],
    /// Core configuration.
    pub config: RelayConfig,
    /// The IP peers should send to, put in XOR-RELAYED-ADDRESS (with each relayed
    /// socket's port). Needed when `listen` is a wildcard or behind a 1:1 NAT; `None`
    /// advertises the listening IP.
    pub advertise_ip: Option<IpAddr>,
}

fn render_metrics(relay: &Relay) -> String {
    let s = relay.stats();
    let mut out = String::new();
    let mut m = |name: &str, kind: &str, help: &str, v: u64| {
        out.push_str(&format!(
            "# HELP peerline_relay_{name} {help}\n# TYPE peerline_relay_{name} {kind}\npeerline_relay_{name} {v}\n"
        ));
    };
    m(
        "allocations",
        "gauge",
        "TURN allocations alive.",
        relay.allocation_count() as u64,
    );
    m(
        "allocations_created_total",
        "counter",
        "TURN allocations created.",
        s.allocations_created,
    );
    m(
        "requests_total",
        "counter",
        "TURN requests answered.",
        s.requests,
    );
    m(
        "auth_failures_total",
        "counter",
        "TURN requests refused for credentials.",
        s.auth_failures,
    );
    m(
        "relayed_to_peers_total",
        "counter",
        "Datagrams relayed from clients to peers.",
        s.relayed_to_peers,
    );
    m(
        "relayed_to_clients_total",
        "counter",
        "Datagrams relayed from peers to clients.",
        s.relayed_to_clients,
    );
    m(
        "relayed_bytes_total",
        "counter",
        "Payload bytes relayed.",
        s.relayed_bytes,
    );
    m(
        "dropped_total",
        "counter",
        "Datagrams dropped by the relay.",
        s.dropped,
    );
    out
}

/// A relay driver failure.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RelayError {
    /// Could not bind the listening UDP port.
    #[error("cannot listen for TURN on {addr}: {source} (is another relay using this port?)")]
    Bind {
        /// Address.
        addr: SocketAddr,
        /// OS error.
        source: io::Error,
    },
}

/// Datagrams from all relayed sockets waiting for the main loop at most; beyond it they
/// are dropped, as a congested link would.
const PEER_QUEUE: usize = 4096;

/// Largest datagram read (the UDP maximum); the core drops anything above
/// [`peerline_core::relay::MAX_RELAY_PAYLOAD`].
const MAX_DATAGRAM: usize = 65_536;

/// A datagram that arrived on a relayed socket.
struct PeerDatagram {
    id: AllocationId,
    from: SocketAddr,
    bytes: Vec<u8>,
}

/// An open relayed socket and the task reading it.
struct Relayed {
    socket: Arc<UdpSocket>,
    reader: JoinHandle<()>,
}

/// A relay with its listening socket bound, ready to [`run`](RelayServer::run).
#[derive(Debug)]
pub struct RelayServer {
    socket: UdpSocket,
    local: SocketAddr,
    rt: RelayRuntime,
    metrics: Option<crate::admin::MetricsText>,
}

impl RelayServer {
    /// Binds the listening socket.
    pub async fn bind(rt: RelayRuntime) -> Result<RelayServer, RelayError> {
        let socket = UdpSocket::bind(rt.listen)
            .await
            .map_err(|source| RelayError::Bind {
                addr: rt.listen,
                source,
            })?;
        let local = socket.local_addr().unwrap_or(rt.listen);
        Ok(RelayServer {
            socket,
            local,
            rt,
            metrics: None,
        })
    }

    /// Publishes the relay's counters (section `relay`) for the admin endpoint.
    pub fn with_metrics(mut self, metrics: crate::admin::MetricsText) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// The address clients send to (useful when `listen` had port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Runs the relay until `shutdown` resolves; every relayed socket is closed on return.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RelayError> {
        let RelayServer {
            socket,
            local,
            rt,
            metrics,
        } = self;
        let mut metrics_tick = tokio::time::interval(Duration::from_secs(1));
        metrics_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        let bind_ip = local.ip();
        let advertise_ip = rt.advertise_ip.unwrap_or(bind_ip);
        if advertise_ip.is_unspecified() {
            tracing::warn!(
                "the relay listens on a wildcard address and has no advertise_ip: \
                 peers will not be able to reach relayed addresses"
            );
        }
        tracing::info!(listen = %local, "TURN relay listening");

        let start = Instant::now();
        let mut relay = Relay::new(
            rt.config,
            rt.secret,
            crate::os_seed(),
            start,
            crate::unix_ms_now() / 1000,
        );
        let (peer_tx, mut peer_rx) = mpsc::channel::<PeerDatagram>(PEER_QUEUE);
        let mut relayed: HashMap<AllocationId, Relayed> = HashMap::new();
        let mut buf = vec![0u8; MAX_DATAGRAM];
        tokio::pin!(shutdown);

        loop {
            // Perform everything the core asked for. Binding a socket makes the core
            // answer the Allocate, so loop until both queues are empty.
            loop {
                while let Some(t) = relay.poll_transmit() {
                    let out = match t.socket {
                        RelaySocket::Listen => Some(&socket),
                        RelaySocket::Relayed(id) => relayed.get(&id).map(|r| &*r.socket),
                    };
                    if let Some(out) = out {
                        if let Err(e) = out.send_to(&t.payload, t.dst).await {
                            tracing::debug!(error = %e, "relay send failed");
                        }
                    }
                }
                let Some(event) = relay.poll_event() else {
                    break;
                };
                match event {
                    RelayEvent::AllocationCreated { id, family, .. } => {
                        match open_relayed(bind_ip, family) {
                            Ok(sock) => {
                                let port = sock.local_addr().map(|a| a.port()).unwrap_or(0);
                                let sock = Arc::new(sock);
                                let reader = tokio::spawn(read_peers(
                                    id,
                                    Arc::clone(&sock),
                                    peer_tx.clone(),
                                ));
                                relayed.insert(
                                    id,
                                    Relayed {
                                        socket: sock,
                                        reader,
                                    },
                                );
                                tracing::debug!(%id, port, "relayed socket open");
                                relay.relayed_bound(
                                    Instant::now(),
                                    id,
                                    SocketAddr::new(advertise_ip, port),
                                );
                            }
                            Err(why) => {
                                tracing::warn!(%id, ?why, "cannot open a relayed socket");
                                relay.relay_bind_failed(Instant::now(), id, why);
                            }
                        }
                    }
                    RelayEvent::AllocationExpired { id } => {
                        if let Some(r) = relayed.remove(&id) {
                            r.reader.abort();
                            tracing::debug!(%id, "relayed socket closed");
                        }
                    }
                }
            }

            let deadline = relay
                .poll_timeout()
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                r = socket.recv_from(&mut buf) => {
                    if let Ok((n, from)) = r {
                        relay.handle_client(Instant::now(), from, &buf[..n]);
                    }
                }
                Some(d) = peer_rx.recv() => {
                    relay.handle_peer(Instant::now(), d.id, d.from, &d.bytes);
                }
                _ = tokio::time::sleep_until(deadline.into()) => {
                    relay.handle_timeout(Instant::now());
                }
                _ = metrics_tick.tick(), if metrics.is_some() => {
                    if let Some(m) = &metrics {
                        m.set_section("relay", render_metrics(&relay));
                    }
                }
                _ = &mut shutdown => break,
            }
        }
        tracing::info!(
            allocations = relay.allocation_count(),
            "TURN relay stopping"
        );
        for (_, r) in relayed.drain() {
            r.reader.abort();
        }
        Ok(())
    }
}

/// Binds and runs a relay until `shutdown` resolves.
pub async fn run_relay(
    rt: RelayRuntime,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RelayError> {
    RelayServer::bind(rt).await?.run(shutdown).await
}

/// A UDP socket for a new allocation on `ip`, any port.
fn open_relayed(ip: IpAddr, family: RelayFamily) -> Result<UdpSocket, RelayBindFailure> {
    if RelayFamily::of(&SocketAddr::new(ip, 0)) != family {
        return Err(RelayBindFailure::AddressFamily);
    }
    let std = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))
        .map_err(|_| RelayBindFailure::Unavailable)?;
    std.set_nonblocking(true)
        .map_err(|_| RelayBindFailure::Unavailable)?;
    UdpSocket::from_std(std).map_err(|_| RelayBindFailure::Unavailable)
}

/// Reads allocation `id`'s socket until the main loop goes away (or aborts this task).
async fn read_peers(id: AllocationId, socket: Arc<UdpSocket>, tx: mpsc::Sender<PeerDatagram>) {
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        // Drain whatever is ready; the buffer lives only during the read, so an idle
        // allocation holds no 64 KiB buffer.
        loop {
            match recv_now(&socket) {
                Ok((from, bytes)) => {
                    let d = PeerDatagram { id, from, bytes };
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(d) {
                        return;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                // ICMP-reported errors and the like: skip that datagram.
                Err(_) => continue,
            }
        }
    }
}

fn recv_now(socket: &UdpSocket) -> io::Result<(SocketAddr, Vec<u8>)> {
    let mut buf = [0u8; MAX_DATAGRAM];
    let (n, from) = socket.try_recv_from(&mut buf)?;
    Ok((from, buf[..n].to_vec()))
}
