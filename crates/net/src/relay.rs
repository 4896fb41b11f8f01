//! Drives a [`Relay`] (the sans-IO TURN core) on UDP sockets, and on TCP between clients
//! and the relay.
//!
//! One socket listens for clients; with [`RelayRuntime::tcp`], a TCP listener on the same
//! address and port accepts clients too (RFC 8656 section 3.1). Each TCP connection is cut
//! into TURN messages (STUN messages and ChannelData) that are handed to the core with the
//! connection's remote address as source, exactly like datagrams: the core sees a TCP
//! client as one more client address. What the core sends to that address goes back on
//! the connection. The relayed transport stays UDP.
//!
//! A TCP client and a UDP client with the same IP and port (possible, the port spaces are
//! separate, but unlikely behind NATs) would be one client for the core; what it sends to
//! that address then goes to the TCP connection. For every allocation the core creates, this glue binds
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
//!     tcp: true,
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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Everything the relay driver needs.
#[derive(Debug, Clone)]
pub struct RelayRuntime {
    /// Address clients send to (IP and port), on UDP (and TCP with `tcp`). Relayed sockets
    /// are bound on its IP.
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
    /// Also accept TURN clients over TCP on `listen`'s address and (bound) port.
    pub tcp: bool,
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
    /// Could not bind the listening TCP port (the UDP one was free).
    #[error("cannot listen for TURN over TCP on {addr}: {source} (is another program using this TCP port?)")]
    BindTcp {
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

/// Most TCP clients connected at once; further connections are closed as accepted.
const MAX_TCP_CLIENTS: usize = 4096;

/// Messages from all TCP clients waiting for the main loop at most; beyond it the
/// connections' readers wait (TCP flow control pushes back on the clients).
const TCP_IN_QUEUE: usize = 4096;

/// Messages waiting to be written to one TCP client at most; beyond it they are dropped,
/// as a congested link would.
const TCP_OUT_QUEUE: usize = 256;

/// A TCP client must complete its first message within this time.
const TCP_FIRST_MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// A TCP client that cannot take a message within this time is disconnected.
const TCP_WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// A STUN message header.
const STUN_HEADER: usize = 20;

/// The STUN magic cookie (RFC 8489 section 5).
const MAGIC_COOKIE: [u8; 4] = [0x21, 0x12, 0xA4, 0x42];

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

/// What a TCP client's connection task tells the main loop.
enum TcpEvent {
    /// A complete TURN message (ChannelData without its TCP padding).
    Message { from: SocketAddr, bytes: Vec<u8> },
    /// The connection `conn` from `from` is gone.
    Closed { from: SocketAddr, conn: u64 },
}

/// A connected TCP client, as the main loop sees it.
struct TcpClient {
    conn: u64,
    out: mpsc::Sender<Vec<u8>>,
    task: JoinHandle<()>,
}

/// A relay with its listening socket bound, ready to [`run`](RelayServer::run).
#[derive(Debug)]
pub struct RelayServer {
    socket: UdpSocket,
    tcp: Option<TcpListener>,
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
        let tcp = if rt.tcp {
            // The port the UDP socket got, so `listen` with port 0 works too.
            let addr = SocketAddr::new(rt.listen.ip(), local.port());
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| RelayError::BindTcp { addr, source })?;
            Some(listener)
        } else {
            None
        };
        Ok(RelayServer {
            socket,
            tcp,
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

    /// The address clients send to (useful when `listen` had port 0); with TCP on, the
    /// TCP listener has the same address and port.
    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Runs the relay until `shutdown` resolves; every relayed socket is closed on return.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), RelayError> {
        let RelayServer {
            socket,
            tcp,
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
        tracing::info!(listen = %local, tcp = tcp.is_some(), "TURN relay listening");
        let tcp_idle = rt.config.max_lifetime + Duration::from_secs(60);

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
        let (tcp_tx, mut tcp_rx) = mpsc::channel::<TcpEvent>(TCP_IN_QUEUE);
        let mut tcp_clients: HashMap<SocketAddr, TcpClient> = HashMap::new();
        let mut next_conn: u64 = 0;
        tokio::pin!(shutdown);

        loop {
            // Perform everything the core asked for. Binding a socket makes the core
            // answer the Allocate, so loop until both queues are empty.
            loop {
                while let Some(t) = relay.poll_transmit() {
                    if t.socket == RelaySocket::Listen {
                        if let Some(c) = tcp_clients.get(&t.dst) {
                            if c.out.try_send(pad_for_tcp(t.payload)).is_err() {
                                tracing::debug!(dst = %t.dst, "TCP client queue full, message dropped");
                            }
                            continue;
                        }
                    }
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
                r = accept(tcp.as_ref()) => {
                    match r {
                        Ok((stream, from)) if tcp_clients.len() < MAX_TCP_CLIENTS => {
                            let from = SocketAddr::new(from.ip().to_canonical(), from.port());
                            let _ = stream.set_nodelay(true);
                            let conn = next_conn;
                            next_conn += 1;
                            let (out, out_rx) = mpsc::channel(TCP_OUT_QUEUE);
                            let task = tokio::spawn(serve_tcp(
                                stream,
                                from,
                                conn,
                                tcp_idle,
                                tcp_tx.clone(),
                                out_rx,
                            ));
                            tracing::debug!(%from, "TCP client connected");
                            if let Some(old) = tcp_clients.insert(from, TcpClient { conn, out, task }) {
                                old.task.abort();
                            }
                        }
                        Ok((_, from)) => {
                            tracing::debug!(%from, "too many TCP clients, connection refused");
                        }
                        Err(e) => {
                            tracing::debug!(error = %e, "TCP accept failed");
                            // E.g. out of file descriptors: do not spin.
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
                Some(ev) = tcp_rx.recv() => {
                    match ev {
                        TcpEvent::Message { from, bytes } => {
                            relay.handle_client(Instant::now(), from, &bytes);
                        }
                        TcpEvent::Closed { from, conn } => {
                            if tcp_clients.get(&from).is_some_and(|c| c.conn == conn) {
                                tcp_clients.remove(&from);
                                tracing::debug!(%from, "TCP client disconnected");
                            }
                        }
                    }
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
        for (_, c) in tcp_clients.drain() {
            c.task.abort();
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

/// The next TCP client, or never without a listener.
async fn accept(listener: Option<&TcpListener>) -> io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// `payload` as written on TCP: ChannelData padded to a multiple of 4 bytes (RFC 8656
/// section 12.5); STUN messages are already.
fn pad_for_tcp(mut payload: Vec<u8>) -> Vec<u8> {
    if payload.first().is_some_and(|b| b & 0xC0 == 0x40) {
        let padded = payload.len().next_multiple_of(4);
        payload.resize(padded, 0);
    }
    payload
}

/// Serves one TCP client until it closes, misbehaves or stalls; then tells the main loop.
async fn serve_tcp(
    stream: TcpStream,
    from: SocketAddr,
    conn: u64,
    idle: Duration,
    tx: mpsc::Sender<TcpEvent>,
    out: mpsc::Receiver<Vec<u8>>,
) {
    let (r, w) = stream.into_split();
    tokio::select! {
        why = read_tcp(r, from, idle, &tx) => {
            tracing::debug!(%from, why, "TCP client read side done");
        }
        why = write_tcp(w, out) => {
            tracing::debug!(%from, why, "TCP client write side done");
        }
    }
    let _ = tx.send(TcpEvent::Closed { from, conn }).await;
}

/// Reads TURN messages from a TCP client and hands them to the main loop; returns why it
/// stopped.
async fn read_tcp(
    mut r: OwnedReadHalf,
    from: SocketAddr,
    idle: Duration,
    tx: &mpsc::Sender<TcpEvent>,
) -> &'static str {
    let mut framer = TcpFramer::default();
    let mut timeout = TCP_FIRST_MESSAGE_TIMEOUT;
    loop {
        loop {
            match framer.next_message() {
                Ok(Some(bytes)) => {
                    timeout = idle;
                    if tx.send(TcpEvent::Message { from, bytes }).await.is_err() {
                        return "relay stopped";
                    }
                }
                Ok(None) => break,
                Err(why) => return why,
            }
        }
        framer.buf.reserve(4096);
        match tokio::time::timeout(timeout, r.read_buf(&mut framer.buf)).await {
            Err(_) => return "idle",
            Ok(Ok(0)) => return "closed by the client",
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return "read error",
        }
    }
}

/// Writes what the main loop queued for a TCP client; returns why it stopped.
async fn write_tcp(mut w: OwnedWriteHalf, mut out: mpsc::Receiver<Vec<u8>>) -> &'static str {
    while let Some(bytes) = out.recv().await {
        match tokio::time::timeout(TCP_WRITE_TIMEOUT, w.write_all(&bytes)).await {
            Err(_) => return "write stalled",
            Ok(Err(_)) => return "write error",
            Ok(Ok(())) => {}
        }
    }
    "relay stopped"
}

/// Cuts a TCP byte stream into TURN messages (RFC 8656 section 3.1): STUN messages (20-byte
/// header, length in bytes 2..4) and ChannelData (4-byte header, length in bytes 2..4,
/// padded to a multiple of 4 bytes). Clients that do not pad ChannelData are understood
/// too: after an unaligned ChannelData, the padding is skipped only when the next bytes do
/// not already start a message.
#[derive(Debug, Default)]
struct TcpFramer {
    buf: Vec<u8>,
    /// Padding that may follow the last ChannelData (0 to 3 bytes).
    pad: usize,
    /// A message was framed already. The first one must be STUN: channels belong to an
    /// allocation, which belongs to this connection, so none exists before a request.
    started: bool,
}

/// Largest ChannelData payload taken from a TCP client (what the core relays at most).
const MAX_TCP_CHANNEL_DATA: usize = peerline_core::relay::MAX_RELAY_PAYLOAD;

impl TcpFramer {
    /// The next complete message, `Ok(None)` when more bytes are needed, or why the
    /// stream is not TURN (the connection should be closed).
    fn next_message(&mut self) -> Result<Option<Vec<u8>>, &'static str> {
        if self.pad > 0 && !self.skip_padding()? {
            return Ok(None);
        }
        let Some(&first) = self.buf.first() else {
            return Ok(None);
        };
        let total = match first & 0xC0 {
            0x40 if !self.started => return Err("ChannelData before any request"),
            0x40 => {
                if self.buf.len() < 4 {
                    return Ok(None);
                }
                let number = u16::from_be_bytes([self.buf[0], self.buf[1]]);
                if !peerline_core::relay::CHANNEL_NUMBERS.contains(&number) {
                    return Err("reserved channel number");
                }
                let len = usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]]));
                if len > MAX_TCP_CHANNEL_DATA {
                    return Err("ChannelData too large");
                }
                4 + len
            }
            0x00 => {
                if self.buf.len() < 4 {
                    return Ok(None);
                }
                let len = usize::from(u16::from_be_bytes([self.buf[2], self.buf[3]]));
                if len % 4 != 0 {
                    return Err("STUN length not a multiple of 4");
                }
                if self.buf.len() >= 8 && self.buf[4..8] != MAGIC_COOKIE {
                    return Err("no STUN magic cookie");
                }
                STUN_HEADER + len
            }
            _ => return Err("neither STUN nor ChannelData"),
        };
        if self.buf.len() < total {
            return Ok(None);
        }
        let rest = self.buf.split_off(total);
        let msg = std::mem::replace(&mut self.buf, rest);
        self.started = true;
        if first & 0xC0 == 0x40 {
            self.pad = total.next_multiple_of(4) - total;
        }
        Ok(Some(msg))
    }

    /// Decides whether the `pad` bytes after an unaligned ChannelData are padding (and
    /// skips them) or the start of the next message: `Ok(false)` when more bytes are
    /// needed to tell.
    fn skip_padding(&mut self) -> Result<bool, &'static str> {
        let pad = self.pad;
        let b = &self.buf;
        let Some(&first) = b.first() else {
            return Ok(false);
        };
        let cookie_at = |at: usize| b.len() >= at + 8 && b[at + 4..at + 8] == MAGIC_COOKIE;
        let skip = match first & 0xC0 {
            // A ChannelData right away: the client does not pad.
            0x40 => false,
            // Zero padding, or a STUN message right away (both start with 00 bits). A STUN
            // message never starts with `pad` zero bytes followed by ChannelData bits (its
            // type would be 0 or outside the STUN methods), so that is padding.
            0x00 => {
                if b.len() > pad && b[..pad].iter().all(|&x| x == 0) && b[pad] & 0xC0 == 0x40 {
                    true
                } else if cookie_at(0) {
                    false
                } else if cookie_at(pad) {
                    true
                } else if b.len() >= pad + 8 {
                    return Err("neither STUN nor ChannelData after ChannelData");
                } else {
                    return Ok(false);
                }
            }
            // Non-zero padding (any value is allowed).
            _ => {
                if b.len() < pad {
                    return Ok(false);
                }
                true
            }
        };
        if skip {
            self.buf.drain(..pad);
        }
        self.pad = 0;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stun(len: u16) -> Vec<u8> {
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(&MAGIC_COOKIE);
        m.extend_from_slice(&[7; 12]);
        m.extend(std::iter::repeat_n(0xAB, usize::from(len)));
        m
    }

    fn channel(payload: &[u8]) -> Vec<u8> {
        let mut m = vec![0x40, 0x01];
        m.extend_from_slice(&(payload.len() as u16).to_be_bytes());
        m.extend_from_slice(payload);
        m
    }

    /// Feeds `stream` one byte at a time (worst case for the framer), then all at once,
    /// and returns the messages both ways (which must agree).
    fn split(stream: &[u8]) -> Result<Vec<Vec<u8>>, &'static str> {
        let mut bytewise = Vec::new();
        let mut f = TcpFramer::default();
        for &b in stream {
            f.buf.push(b);
            while let Some(m) = f.next_message()? {
                bytewise.push(m);
            }
        }
        let mut f = TcpFramer::default();
        f.buf.extend_from_slice(stream);
        let mut whole = Vec::new();
        while let Some(m) = f.next_message()? {
            whole.push(m);
        }
        assert_eq!(bytewise, whole);
        Ok(whole)
    }

    #[test]
    fn splits_padded_and_unpadded_channel_data_and_stun() {
        let a = stun(8);
        let c1 = channel(b"abcde"); // 9 bytes: 3 bytes of padding on TCP
        let c2 = channel(b"xy"); // 6 bytes: 2 of padding
        let c3 = channel(b"q"); // 5 bytes: 3 of padding
        let b = stun(0);
        for padded in [true, false] {
            let mut s = Vec::new();
            for m in [&a, &c1, &c2, &c3, &b, &c1, &c3, &c2] {
                s.extend_from_slice(m);
                if padded {
                    s.resize(s.len().next_multiple_of(4), 0);
                }
            }
            let got = split(&s).expect("valid stream");
            let want: Vec<Vec<u8>> = [&a, &c1, &c2, &c3, &b, &c1, &c3, &c2]
                .into_iter()
                .cloned()
                .collect();
            assert_eq!(got, want, "padded: {padded}");
        }
    }

    #[test]
    fn rejects_garbage() {
        assert!(split(b"GET / HTTP/1.1\r\n\r\n").is_err());
        assert!(split(&[0x00, 0x01, 0x00, 0x03, 0x21, 0x12, 0xA4, 0x42]).is_err());
        assert!(split(&[0x00, 0x01, 0x00, 0x04, 1, 2, 3, 4]).is_err());
        assert!(
            split(&[0x40, 0x00, 0x00, 0x00]).is_err(),
            "ChannelData first"
        );
        let mut s = stun(0);
        s.extend_from_slice(&[0x50, 0x00, 0x00, 0x04]);
        assert!(split(&s).is_err());
        let mut s = stun(0);
        s.extend_from_slice(&[0x40, 0x00, 0xFF, 0xFF]);
        assert!(split(&s).is_err());
        let mut s = stun(0);
        s.extend_from_slice(&channel(b"abcde"));
        s.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        assert!(split(&s).is_err());
    }

    #[test]
    fn pads_channel_data_for_tcp() {
        assert_eq!(pad_for_tcp(channel(b"abcde")).len(), 12);
        assert_eq!(pad_for_tcp(channel(b"abcd")).len(), 8);
        assert_eq!(pad_for_tcp(stun(4)).len(), 24);
    }
}
