//! The node-to-node channel of a fleet: opaque messages (at most [`MAX_MSG`] bytes) from one
//! supernode to another over TCP, encrypted and authenticated with Noise
//! `NNpsk0_25519_ChaChaPoly_BLAKE2s` keyed by a PSK derived from the fleet secret.
//!
//! Each node sends only on connections it opened and receives only on connections it
//! accepted, so a pair of nodes may hold one connection in each direction and no
//! tie-breaking is needed. Outbound connections are opened lazily by [`FleetLink::send`],
//! closed after an idle period, and reopened with backoff after a failure. Byte layout:
//! `docs/protocol.md`, "Node-to-node channel".
//!
//! Everything is bounded: one queue of [`FleetLinkLimits::queue_len`] messages per peer,
//! a bounded channel of [`Incoming`] messages (a slow receiver stops the TCP readers, and
//! TCP flow control pushes back to the senders' queues), a cap on handshakes in progress
//! (in total and per source address) and on established inbound connections, and
//! deadlines on handshakes and on the rest of a frame once it has started.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use peerline_wire::stream::{write_frame, FrameError, FrameReader};
use snow::params::NoiseParams;
use snow::resolvers::{DefaultResolver, FallbackResolver, RingResolver};
use snow::TransportState;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::AbortHandle;

/// The Noise protocol name of the channel.
pub const NOISE_PATTERN: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// Prologue mixed into every handshake: binds the channel and its version.
pub const PROLOGUE: &[u8] = b"peerline-fleet/1";
/// Largest message the channel carries.
pub const MAX_MSG: usize = 8192;
/// Noise authentication tag length.
const TAG: usize = 16;
/// Largest frame body on an established connection: one sealed message.
pub const MAX_FRAME: usize = MAX_MSG + TAG;
/// Version byte that starts both handshake payloads.
pub const HELLO_VERSION: u8 = 1;
/// Handshake payload: version u8, node id u32, epoch u64 (big-endian).
const HELLO_LEN: usize = 1 + 4 + 8;
/// Both handshake messages are exactly an ephemeral key and a sealed payload.
pub const HANDSHAKE_FRAME: usize = 32 + HELLO_LEN + TAG;
/// Bytes of sealed messages gathered into one write.
const BATCH_BYTES: usize = 64 * 1024;

/// Where a link listens and who it is.
#[derive(Clone)]
pub struct FleetLinkConfig {
    /// TCP address to accept other nodes' connections on.
    pub listen: SocketAddr,
    /// Pre-shared key, derived by the caller from the fleet secret.
    pub psk: [u8; 32],
    /// This node's id in the fleet.
    pub node_id: u32,
    /// This node's epoch (changes at every restart).
    pub epoch: u64,
}

impl std::fmt::Debug for FleetLinkConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key.
        f.debug_struct("FleetLinkConfig")
            .field("listen", &self.listen)
            .field("node_id", &self.node_id)
            .field("epoch", &self.epoch)
            .finish_non_exhaustive()
    }
}

/// Bounds and deadlines of a link; the defaults suit a fleet of thousands of nodes.
#[derive(Debug, Clone)]
pub struct FleetLinkLimits {
    /// Messages queued per peer before [`FleetLink::send`] refuses more.
    pub queue_len: usize,
    /// Received messages buffered for the caller before the readers stop reading.
    pub incoming_len: usize,
    /// Peers with a queue at once.
    pub max_peers: usize,
    /// Established inbound connections at once.
    pub max_inbound: usize,
    /// Inbound handshakes in progress at once.
    pub max_handshakes: usize,
    /// Inbound handshakes in progress from one IP address.
    pub max_handshakes_per_ip: usize,
    /// Deadline for TCP connect plus handshake (outbound) or for the handshake (inbound).
    pub handshake_timeout: Duration,
    /// Deadline for the rest of a frame once its first byte arrived.
    pub frame_timeout: Duration,
    /// An outbound connection with nothing to send for this long is closed.
    pub idle_timeout: Duration,
    /// An inbound connection that receives nothing for this long is closed.
    pub inbound_idle_timeout: Duration,
    /// A write the peer does not take within this long ends the connection.
    pub write_timeout: Duration,
    /// Outbound connections: sent data unacknowledged by the peer's TCP for this long, or
    /// keepalive probes unanswered for this long, abort the connection
    /// (`TCP_USER_TIMEOUT`), so a peer host that vanished is noticed in seconds, not
    /// after the kernel's retransmission limit (about 15 minutes).
    pub unacked_timeout: Duration,
    /// A queued message older than this is dropped instead of sent (callers time out).
    pub max_queue_age: Duration,
    /// First wait before reconnecting after a failed connect; doubles per failure.
    pub backoff_min: Duration,
    /// Longest wait between reconnection attempts.
    pub backoff_max: Duration,
}

impl Default for FleetLinkLimits {
    fn default() -> Self {
        FleetLinkLimits {
            queue_len: 1024,
            incoming_len: 1024,
            max_peers: 16_384,
            max_inbound: 1024,
            max_handshakes: 64,
            max_handshakes_per_ip: 8,
            handshake_timeout: Duration::from_secs(5),
            frame_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            inbound_idle_timeout: Duration::from_secs(180),
            write_timeout: Duration::from_secs(30),
            unacked_timeout: Duration::from_secs(10),
            max_queue_age: Duration::from_secs(10),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
        }
    }
}

/// A message received from another node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Incoming {
    /// The sender's node id (from its authenticated handshake).
    pub node: u32,
    /// The sender's epoch.
    pub epoch: u64,
    /// The message.
    pub msg: Vec<u8>,
}

/// Why [`FleetLink::send`] refused a message (which is then dropped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkSendError {
    /// The peer's queue is full (it is slow, unreachable or restarting).
    #[error("queue to node {0} is full")]
    QueueFull(u32),
    /// The message is longer than [`MAX_MSG`].
    #[error("message of {0} bytes is over the {MAX_MSG}-byte limit")]
    TooLarge(usize),
    /// [`FleetLinkLimits::max_peers`] peers already have a queue.
    #[error("too many peers")]
    TooManyPeers,
}

/// Counters since the link was bound.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FleetLinkStats {
    /// Messages written to a connection.
    pub sent: u64,
    /// Messages received and handed to the caller.
    pub received: u64,
    /// Messages refused because a peer's queue was full.
    pub dropped: u64,
    /// Queued messages dropped because they waited longer than `max_queue_age`.
    pub expired: u64,
    /// Messages taken from a queue whose connection failed before they were written.
    pub lost: u64,
    /// Outbound connections established (handshake complete).
    pub connects: u64,
    /// Outbound TCP connects that failed (refused, unreachable, timed out).
    pub connect_failures: u64,
    /// Inbound connections established (handshake complete).
    pub accepts: u64,
    /// Handshakes that failed, in either direction (wrong key, garbage, timeout, wrong node).
    pub handshake_failures: u64,
    /// Inbound connections refused over a cap.
    pub rejected: u64,
    /// Established connections closed for a bad frame, a failed decryption or a stall.
    pub protocol_errors: u64,
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    received: AtomicU64,
    dropped: AtomicU64,
    expired: AtomicU64,
    lost: AtomicU64,
    connects: AtomicU64,
    connect_failures: AtomicU64,
    accepts: AtomicU64,
    handshake_failures: AtomicU64,
    rejected: AtomicU64,
    protocol_errors: AtomicU64,
}

fn bump(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

/// A handshake or connection failure (internal; surfaces as counters and debug logs).
#[derive(Debug, thiserror::Error)]
enum LinkError {
    #[error("connect: {0}")]
    Connect(std::io::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed")]
    Eof,
    #[error("timed out")]
    Timeout,
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    #[error("noise: {0}")]
    Noise(#[from] snow::Error),
    #[error("malformed handshake")]
    Malformed,
    #[error("expected node {expected}, reached node {got}")]
    WrongNode { expected: u32, got: u32 },
}

/// The Noise builder: prologue, PSK, and ring's ChaChaPoly (much faster than the
/// default backend); X25519 and BLAKE2s come from the default resolver.
fn builder(psk: &[u8; 32]) -> Result<snow::Builder<'_>, snow::Error> {
    let params: NoiseParams = NOISE_PATTERN.parse()?;
    let resolver = FallbackResolver::new(Box::new(RingResolver), Box::new(DefaultResolver));
    snow::Builder::with_resolver(params, Box::new(resolver))
        .prologue(PROLOGUE)?
        .psk(0, psk)
}

fn hello(node: u32, epoch: u64) -> [u8; HELLO_LEN] {
    let mut b = [0u8; HELLO_LEN];
    b[0] = HELLO_VERSION;
    b[1..5].copy_from_slice(&node.to_be_bytes());
    b[5..].copy_from_slice(&epoch.to_be_bytes());
    b
}

fn parse_hello(b: &[u8]) -> Result<(u32, u64), LinkError> {
    match b {
        [HELLO_VERSION, n @ .., e0, e1, e2, e3, e4, e5, e6, e7] if n.len() == 4 => {
            let node = u32::from_be_bytes([n[0], n[1], n[2], n[3]]);
            Ok((
                node,
                u64::from_be_bytes([*e0, *e1, *e2, *e3, *e4, *e5, *e6, *e7]),
            ))
        }
        _ => Err(LinkError::Malformed),
    }
}

/// Reads until `r` holds a whole frame and returns a copy of it.
async fn read_frame<R: AsyncRead + Unpin>(
    s: &mut R,
    r: &mut FrameReader,
) -> Result<Vec<u8>, LinkError> {
    loop {
        if let Some(f) = r.next_frame()? {
            return Ok(f.to_vec());
        }
        let n = s.read(r.spare()).await?;
        if n == 0 {
            return Err(LinkError::Eof);
        }
        r.filled(n);
    }
}

/// Seals `msg` (at most [`MAX_MSG`] bytes) as one frame appended to `out`, in place.
fn seal_frame(ts: &mut TransportState, msg: &[u8], out: &mut Vec<u8>) -> Result<(), LinkError> {
    let at = out.len();
    let n = msg.len() + TAG;
    let len = u16::try_from(n)
        .ok()
        .filter(|_| n <= MAX_FRAME)
        .ok_or(LinkError::Malformed)?;
    out.extend_from_slice(&len.to_be_bytes());
    out.resize(at + 2 + n, 0);
    match ts.write_message(msg, &mut out[at + 2..]) {
        Ok(w) if w == n => Ok(()),
        other => {
            out.truncate(at);
            Err(other.err().map_or(LinkError::Malformed, LinkError::from))
        }
    }
}

/// The initiator's side of the handshake on a connected stream: message 1 (our hello),
/// message 2 (the responder's hello), then an empty transport message that proves to the
/// responder the handshake is live (message 1 alone could be a replay). Returns the
/// transport and the responder's node id and epoch.
async fn initiate(
    s: &mut TcpStream,
    psk: &[u8; 32],
    node: u32,
    epoch: u64,
) -> Result<(TransportState, u32, u64), LinkError> {
    let mut hs = builder(psk)?.build_initiator()?;
    let mut buf = [0u8; HANDSHAKE_FRAME];
    let n = hs.write_message(&hello(node, epoch), &mut buf)?;
    let mut out = Vec::with_capacity(2 * (2 + HANDSHAKE_FRAME));
    write_frame(&mut out, &buf[..n], HANDSHAKE_FRAME)?;
    s.write_all(&out).await?;

    let mut r = FrameReader::new(HANDSHAKE_FRAME);
    let msg2 = read_frame(s, &mut r).await?;
    // The responder sends nothing after message 2.
    if msg2.len() != HANDSHAKE_FRAME || r.is_partial() {
        return Err(LinkError::Malformed);
    }
    let mut payload = [0u8; HANDSHAKE_FRAME];
    let n = hs.read_message(&msg2, &mut payload)?;
    let (peer, peer_epoch) = parse_hello(&payload[..n])?;
    let mut ts = hs.into_transport_mode()?;
    let n = ts.write_message(&[], &mut buf)?;
    out.clear();
    write_frame(&mut out, &buf[..n], MAX_FRAME)?;
    s.write_all(&out).await?;
    Ok((ts, peer, peer_epoch))
}

/// The responder's side: reads message 1, answers with message 2 and waits for the
/// initiator's empty confirmation. Returns the transport, the initiator's node id and
/// epoch, and the reader (which may already hold the first messages).
async fn respond(
    s: &mut TcpStream,
    psk: &[u8; 32],
    node: u32,
    epoch: u64,
) -> Result<(TransportState, u32, u64, FrameReader), LinkError> {
    let mut r = FrameReader::new(HANDSHAKE_FRAME);
    let msg1 = read_frame(s, &mut r).await?;
    // An honest initiator sends nothing more before message 2.
    if msg1.len() != HANDSHAKE_FRAME || r.is_partial() {
        return Err(LinkError::Malformed);
    }
    let mut hs = builder(psk)?.build_responder()?;
    let mut payload = [0u8; HANDSHAKE_FRAME];
    let n = hs.read_message(&msg1, &mut payload)?;
    let (peer, peer_epoch) = parse_hello(&payload[..n])?;
    let mut buf = [0u8; HANDSHAKE_FRAME];
    let n = hs.write_message(&hello(node, epoch), &mut buf)?;
    let mut out = Vec::with_capacity(2 + HANDSHAKE_FRAME);
    write_frame(&mut out, &buf[..n], HANDSHAKE_FRAME)?;
    s.write_all(&out).await?;
    let mut ts = hs.into_transport_mode()?;

    let mut r = FrameReader::new(MAX_FRAME);
    let confirm = read_frame(s, &mut r).await?;
    let mut pt = [0u8; TAG];
    let n = ts.read_message(&confirm, &mut pt)?;
    if n != 0 {
        return Err(LinkError::Malformed);
    }
    Ok((ts, peer, peer_epoch, r))
}

struct Queued {
    msg: Vec<u8>,
    at: Instant,
}

struct Peer {
    tx: mpsc::Sender<Queued>,
    addr: watch::Sender<SocketAddr>,
    task: AbortHandle,
}

struct InboundConn {
    ip: IpAddr,
    /// Set once the handshake completed.
    node: Option<u32>,
    task: Option<AbortHandle>,
}

#[derive(Default)]
struct InboundTable {
    conns: HashMap<u64, InboundConn>,
    next_id: u64,
}

struct Shared {
    psk: [u8; 32],
    node_id: u32,
    epoch: u64,
    limits: FleetLinkLimits,
    counters: Counters,
    peers: Mutex<HashMap<u32, Peer>>,
    inbound: Mutex<InboundTable>,
    incoming: mpsc::Sender<Incoming>,
}

/// Locks a map; a poisoned lock (a panic elsewhere) still holds consistent data here,
/// since every critical section is a single insert, remove or scan.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Shared {
    /// Registers an inbound connection in handshake, or None over a cap.
    fn admit(&self, ip: IpAddr) -> Option<u64> {
        let mut t = lock(&self.inbound);
        let (mut pending, mut from_ip) = (0, 0);
        for c in t.conns.values().filter(|c| c.node.is_none()) {
            pending += 1;
            from_ip += usize::from(c.ip == ip);
        }
        let established = t.conns.len() - pending;
        // Refusing before the handshake when full makes the sender back off, rather than
        // handshake again for every message.
        if pending >= self.limits.max_handshakes
            || from_ip >= self.limits.max_handshakes_per_ip
            || established >= self.limits.max_inbound
        {
            return None;
        }
        let id = t.next_id;
        t.next_id += 1;
        t.conns.insert(
            id,
            InboundConn {
                ip,
                node: None,
                task: None,
            },
        );
        Some(id)
    }

    /// Marks connection `id` established from `node`. Returns the older connections from
    /// the same node (to close: the peer has reconnected, so they are dead or dying),
    /// or None when the established cap is reached.
    fn promote(&self, id: u64, node: u32) -> Option<Vec<AbortHandle>> {
        let mut t = lock(&self.inbound);
        let established = t.conns.values().filter(|c| c.node.is_some()).count();
        if established >= self.limits.max_inbound {
            return None;
        }
        let older: Vec<u64> = t
            .conns
            .iter()
            .filter(|(k, c)| **k != id && c.node == Some(node))
            .map(|(k, _)| *k)
            .collect();
        let mut aborts = Vec::new();
        for k in older {
            if let Some(task) = t.conns.remove(&k).and_then(|c| c.task) {
                aborts.push(task);
            }
        }
        if let Some(c) = t.conns.get_mut(&id) {
            c.node = Some(node);
        }
        Some(aborts)
    }
}

/// Removes an inbound connection's entry when its task ends or is aborted.
struct ConnGuard {
    sh: Arc<Shared>,
    id: u64,
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        lock(&self.sh.inbound).conns.remove(&self.id);
    }
}

/// Owns the tasks: when the last [`FleetLink`] handle goes, they all stop.
struct Owner {
    sh: Arc<Shared>,
    local: SocketAddr,
    rt: tokio::runtime::Handle,
    accept: AbortHandle,
}

impl Drop for Owner {
    fn drop(&mut self) {
        self.accept.abort();
        // Collect first, abort after unlocking: an aborted task's guard takes the lock.
        let peers: Vec<AbortHandle> = lock(&self.sh.peers).drain().map(|(_, p)| p.task).collect();
        let conns: Vec<AbortHandle> = lock(&self.sh.inbound)
            .conns
            .values_mut()
            .filter_map(|c| c.task.take())
            .collect();
        for t in peers.into_iter().chain(conns) {
            t.abort();
        }
    }
}

/// A handle to a node's fleet channel; clones share it. Dropping the last handle closes
/// the listener and every connection.
#[derive(Clone)]
pub struct FleetLink {
    owner: Arc<Owner>,
}

impl std::fmt::Debug for FleetLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetLink")
            .field("local", &self.owner.local)
            .field("node_id", &self.owner.sh.node_id)
            .finish_non_exhaustive()
    }
}

impl FleetLink {
    /// Binds the listener with default limits. Must be called inside a tokio runtime.
    pub async fn bind(
        cfg: FleetLinkConfig,
    ) -> std::io::Result<(FleetLink, mpsc::Receiver<Incoming>)> {
        FleetLink::bind_with(cfg, FleetLinkLimits::default()).await
    }

    /// Binds the listener with the given limits.
    pub async fn bind_with(
        cfg: FleetLinkConfig,
        limits: FleetLinkLimits,
    ) -> std::io::Result<(FleetLink, mpsc::Receiver<Incoming>)> {
        let listener = TcpListener::bind(cfg.listen).await?;
        let local = listener.local_addr()?;
        let (tx, rx) = mpsc::channel(limits.incoming_len.max(1));
        let sh = Arc::new(Shared {
            psk: cfg.psk,
            node_id: cfg.node_id,
            epoch: cfg.epoch,
            limits,
            counters: Counters::default(),
            peers: Mutex::new(HashMap::new()),
            inbound: Mutex::new(InboundTable::default()),
            incoming: tx,
        });
        let rt = tokio::runtime::Handle::current();
        let accept = rt.spawn(accept_loop(sh.clone(), listener)).abort_handle();
        let owner = Owner {
            sh,
            local,
            rt,
            accept,
        };
        Ok((
            FleetLink {
                owner: Arc::new(owner),
            },
            rx,
        ))
    }

    /// The address the listener is bound to.
    pub fn local_addr(&self) -> SocketAddr {
        self.owner.local
    }

    /// This node's id.
    pub fn node_id(&self) -> u32 {
        self.owner.sh.node_id
    }

    /// Queues `msg` for `node` at `addr` without waiting. Connects lazily and reconnects
    /// with backoff after a failure; a new `addr` for a known node ends an idle connection
    /// to the old one, and queued messages go to the new one. Messages to one node arrive in order while a connection lives; across
    /// a reconnect some may be lost, none duplicated. Err (and the message is dropped)
    /// when the node's queue is full, the message is too long, or too many nodes have
    /// queues.
    pub fn send(&self, node: u32, addr: SocketAddr, msg: Vec<u8>) -> Result<(), LinkSendError> {
        if msg.len() > MAX_MSG {
            return Err(LinkSendError::TooLarge(msg.len()));
        }
        let sh = &self.owner.sh;
        let mut peers = lock(&sh.peers);
        if !peers.contains_key(&node) && peers.len() >= sh.limits.max_peers {
            return Err(LinkSendError::TooManyPeers);
        }
        let peer = peers.entry(node).or_insert_with(|| {
            let (tx, rx) = mpsc::channel(sh.limits.queue_len.max(1));
            let (addr_tx, addr_rx) = watch::channel(addr);
            let task = self
                .owner
                .rt
                .spawn(run_peer(sh.clone(), node, addr_rx, rx))
                .abort_handle();
            Peer {
                tx,
                addr: addr_tx,
                task,
            }
        });
        peer.addr.send_if_modified(|a| {
            let changed = *a != addr;
            *a = addr;
            changed
        });
        match peer.tx.try_send(Queued {
            msg,
            at: Instant::now(),
        }) {
            Ok(()) => Ok(()),
            // Closed cannot happen while the entry exists (the task owns the receiver
            // until aborted); treat it as full either way.
            Err(_) => {
                bump(&sh.counters.dropped, 1);
                Err(LinkSendError::QueueFull(node))
            }
        }
    }

    /// `node` left the fleet: drops its queue and closes its connections, both ways.
    pub fn forget(&self, node: u32) {
        let sh = &self.owner.sh;
        let peer = lock(&sh.peers).remove(&node);
        let conns: Vec<AbortHandle> = {
            let mut t = lock(&sh.inbound);
            let ids: Vec<u64> = t
                .conns
                .iter()
                .filter(|(_, c)| c.node == Some(node))
                .map(|(k, _)| *k)
                .collect();
            ids.into_iter()
                .filter_map(|k| t.conns.remove(&k).and_then(|c| c.task))
                .collect()
        };
        if let Some(p) = peer {
            p.task.abort();
        }
        for t in conns {
            t.abort();
        }
    }

    /// The counters.
    pub fn stats(&self) -> FleetLinkStats {
        let c = &self.owner.sh.counters;
        let g = |a: &AtomicU64| a.load(Ordering::Relaxed);
        FleetLinkStats {
            sent: g(&c.sent),
            received: g(&c.received),
            dropped: g(&c.dropped),
            expired: g(&c.expired),
            lost: g(&c.lost),
            connects: g(&c.connects),
            connect_failures: g(&c.connect_failures),
            accepts: g(&c.accepts),
            handshake_failures: g(&c.handshake_failures),
            rejected: g(&c.rejected),
            protocol_errors: g(&c.protocol_errors),
        }
    }

    /// Established inbound connections and handshakes in progress.
    pub fn inbound_counts(&self) -> (usize, usize) {
        let t = lock(&self.owner.sh.inbound);
        let est = t.conns.values().filter(|c| c.node.is_some()).count();
        (est, t.conns.len() - est)
    }
}

async fn accept_loop(sh: Arc<Shared>, listener: TcpListener) {
    loop {
        let (stream, from) = match listener.accept().await {
            Ok(x) => x,
            Err(e) => {
                // Out of file descriptors and the like: pause rather than spin.
                tracing::warn!(error = %e, "fleet link: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let Some(id) = sh.admit(from.ip()) else {
            bump(&sh.counters.rejected, 1);
            continue;
        };
        let guard = ConnGuard { sh: sh.clone(), id };
        let task = tokio::spawn(serve_inbound(guard, stream)).abort_handle();
        if let Some(c) = lock(&sh.inbound).conns.get_mut(&id) {
            c.task = Some(task);
        }
    }
}

/// One accepted connection: handshake, then messages to the caller until it ends.
async fn serve_inbound(guard: ConnGuard, mut s: TcpStream) {
    let sh = guard.sh.clone();
    let lim = &sh.limits;
    let _ = s.set_nodelay(true);
    let hs = tokio::time::timeout(
        lim.handshake_timeout,
        respond(&mut s, &sh.psk, sh.node_id, sh.epoch),
    )
    .await;
    let (mut ts, node, epoch, mut r) = match hs {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "fleet link: inbound handshake failed");
            bump(&sh.counters.handshake_failures, 1);
            return;
        }
        Err(_) => {
            tracing::debug!("fleet link: inbound handshake timed out");
            bump(&sh.counters.handshake_failures, 1);
            return;
        }
    };
    let Some(older) = sh.promote(guard.id, node) else {
        bump(&sh.counters.rejected, 1);
        return;
    };
    for t in older {
        t.abort();
    }
    bump(&sh.counters.accepts, 1);
    tracing::debug!(node, epoch, "fleet link: inbound connection established");
    match receive(&sh, &mut s, &mut ts, &mut r, node, epoch).await {
        Ok(()) => tracing::debug!(node, "fleet link: inbound connection closed"),
        Err(e) => {
            tracing::debug!(node, error = %e, "fleet link: inbound connection dropped");
            bump(&sh.counters.protocol_errors, 1);
        }
    }
}

/// Decrypts frames and hands them to the caller. Ok at a clean end (end of stream,
/// receiver gone, idle), Err for a protocol violation.
async fn receive(
    sh: &Shared,
    s: &mut TcpStream,
    ts: &mut TransportState,
    r: &mut FrameReader,
    node: u32,
    epoch: u64,
) -> Result<(), LinkError> {
    let lim = &sh.limits;
    loop {
        while let Some(f) = r.next_frame()? {
            // Decrypt straight into the message handed on (the plaintext is 16 bytes
            // shorter than the frame).
            let mut msg = vec![0u8; f.len()];
            let n = ts.read_message(f, &mut msg)?;
            msg.truncate(n);
            // Waiting here is the backpressure: no more reads until the caller keeps up.
            if sh
                .incoming
                .send(Incoming { node, epoch, msg })
                .await
                .is_err()
            {
                return Ok(());
            }
            bump(&sh.counters.received, 1);
        }
        let partial = r.is_partial();
        let deadline = if partial {
            lim.frame_timeout
        } else {
            lim.inbound_idle_timeout
        };
        match tokio::time::timeout(deadline, s.read(r.spare())).await {
            Ok(Ok(0)) if partial => return Err(LinkError::Eof),
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(n)) => r.filled(n),
            Ok(Err(e)) => return Err(e.into()),
            Err(_) if partial => return Err(LinkError::Timeout),
            Err(_) => return Ok(()),
        }
    }
}

/// How an outbound connection ended.
enum End {
    /// The queue is gone (never while the peer entry exists).
    Closed,
    /// Nothing to send for `idle_timeout`, or the address changed: reconnect on demand.
    Idle,
    /// The connection failed.
    Failed,
}

/// One peer's sender: waits for a message, connects, sends until the connection ends or
/// idles, and repeats. Runs until aborted by `forget` or the link's drop.
async fn run_peer(
    sh: Arc<Shared>,
    node: u32,
    mut addr: watch::Receiver<SocketAddr>,
    mut rx: mpsc::Receiver<Queued>,
) {
    let lim = &sh.limits;
    let mut backoff = lim.backoff_min;
    let mut held: Option<Queued> = None;
    loop {
        let first = match held.take() {
            Some(q) => q,
            None => match rx.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        if first.at.elapsed() > lim.max_queue_age {
            bump(&sh.counters.expired, 1);
            continue;
        }
        let to = *addr.borrow_and_update();
        match tokio::time::timeout(lim.handshake_timeout, connect(&sh, node, to)).await {
            Ok(Ok((s, ts))) => {
                backoff = lim.backoff_min;
                bump(&sh.counters.connects, 1);
                tracing::debug!(node, "fleet link: outbound connection established");
                match drive(&sh, s, ts, first, &mut rx, &mut addr).await {
                    End::Closed => return,
                    End::Idle | End::Failed => continue,
                }
            }
            result => {
                let counter = match result {
                    Ok(Err(LinkError::Connect(_))) => &sh.counters.connect_failures,
                    _ => &sh.counters.handshake_failures,
                };
                bump(counter, 1);
                tracing::debug!(node, "fleet link: connect failed, retrying");
                // Keep the message: it was never written, so retrying cannot duplicate it.
                held = Some(first);
                let wait = jitter(backoff);
                backoff = (backoff * 2).min(lim.backoff_max);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    // A new address is worth trying at once.
                    changed = addr.changed() => match changed {
                        Ok(()) => backoff = lim.backoff_min,
                        // The peer was forgotten; this task is being aborted.
                        Err(_) => return,
                    },
                }
            }
        }
    }
}

/// Between half and all of `d`, so restarted peers are not hit by every node at once.
fn jitter(d: Duration) -> Duration {
    use rand_core::RngCore;
    let f = 0.5 + f64::from(rand_core::OsRng.next_u32() % 1000) / 2000.0;
    d.mul_f64(f)
}

async fn connect(
    sh: &Shared,
    node: u32,
    addr: SocketAddr,
) -> Result<(TcpStream, TransportState), LinkError> {
    let mut s = TcpStream::connect(addr).await.map_err(LinkError::Connect)?;
    let _ = s.set_nodelay(true);
    if let Err(e) = detect_dead_peer(&s, sh.limits.unacked_timeout) {
        tracing::debug!(error = %e, "fleet link: TCP timeouts not set");
    }
    let (ts, peer, _epoch) = initiate(&mut s, &sh.psk, sh.node_id, sh.epoch).await?;
    // The address may now belong to another node (a stale membership entry).
    if peer != node {
        return Err(LinkError::WrongNode {
            expected: node,
            got: peer,
        });
    }
    Ok((s, ts))
}

/// Keepalive probes after `t` of silence, and an abort when data or probes stay
/// unacknowledged for `t`.
fn detect_dead_peer(s: &TcpStream, t: Duration) -> std::io::Result<()> {
    use rustix::net::sockopt;
    let ms = u32::try_from(t.as_millis()).unwrap_or(u32::MAX).max(1);
    sockopt::set_tcp_user_timeout(s, ms)?;
    sockopt::set_socket_keepalive(s, true)?;
    sockopt::set_tcp_keepidle(s, t.max(Duration::from_secs(1)))?;
    sockopt::set_tcp_keepintvl(s, (t / 3).max(Duration::from_secs(1)))?;
    Ok(())
}

/// Sends queued messages on an established connection, several per write when they are
/// waiting. The peer never writes on this connection: a readable socket means it closed
/// (or misbehaves), either way the connection is over.
async fn drive(
    sh: &Shared,
    s: TcpStream,
    mut ts: TransportState,
    first: Queued,
    rx: &mut mpsc::Receiver<Queued>,
    addr: &mut watch::Receiver<SocketAddr>,
) -> End {
    let lim = &sh.limits;
    let (mut rd, mut wr) = s.into_split();
    // Grows to what the traffic needs (at most a batch plus one frame); most peers of a
    // large fleet send little, and their connections close when idle.
    let mut out = Vec::new();
    let mut probe = [0u8; 1];
    let mut next = Some(first);
    loop {
        let q = match next.take() {
            Some(q) => q,
            None => tokio::select! {
                biased;
                _ = rd.read(&mut probe) => return End::Failed,
                changed = addr.changed() => {
                    return if changed.is_ok() { End::Idle } else { End::Closed };
                }
                q = rx.recv() => match q {
                    Some(q) => q,
                    None => return End::Closed,
                },
                _ = tokio::time::sleep(lim.idle_timeout) => return End::Idle,
            },
        };
        out.clear();
        let mut count = 0u64;
        let mut item = Some(q);
        while let Some(q) = item.take() {
            if q.at.elapsed() > lim.max_queue_age {
                bump(&sh.counters.expired, 1);
            } else if seal_frame(&mut ts, &q.msg, &mut out).is_ok() {
                count += 1;
            } else {
                // Only nonce exhaustion gets here: a new connection brings new keys.
                bump(&sh.counters.lost, count + 1);
                return End::Failed;
            }
            if out.len() < BATCH_BYTES {
                item = rx.try_recv().ok();
            }
        }
        if count == 0 {
            continue;
        }
        match tokio::time::timeout(lim.write_timeout, wr.write_all(&out)).await {
            Ok(Ok(())) => bump(&sh.counters.sent, count),
            _ => {
                bump(&sh.counters.lost, count);
                return End::Failed;
            }
        }
    }
}

#[cfg(test)]
mod tests;
