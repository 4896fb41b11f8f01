//! An established encrypted session with reliable request/response on top of datagrams.
//!
//! A [`Link`] owns the Noise transport of one session (client to supernode, or peer to
//! peer), its two receiver indexes, and the reliability layer:
//!
//! * every request carries an id; it is retransmitted with exponential backoff until the
//!   response arrives or [`LinkConfig::max_attempts`] is reached;
//! * the receiver answers each id once and keeps recent answers (at most
//!   [`LinkConfig::answer_cache`], each for [`ANSWER_TTL`]), so a retransmitted request
//!   gets the cached answer again instead of being executed twice; a request older than
//!   every expired answer is not executed again either;
//! * keepalives are sent when nothing else went out for [`LinkConfig::keepalive`], and the
//!   link reports itself dead when nothing came in for [`LinkConfig::idle_timeout`].
//!
//! Sans-IO: [`Link::handle_transport`] and [`Link::handle_timeout`] take `now`; output is
//! drained with [`Link::poll_transmit`], timers with [`Link::poll_timeout`].
//!
//! Memory: a supernode holds one link per online user, so an idle link owns no heap: the
//! request bookkeeping lives in a box allocated while requests are in flight or answers
//! are cached, the queues give their buffers back once drained, and links of one kind
//! share their [`LinkConfig`].

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peerline_crypto::noise::NoiseError;
use peerline_crypto::Transport;
use peerline_wire::msg::{Frame, Request, Response};
use peerline_wire::packet::Packet;

/// Timing and bounds of a link.
#[derive(Debug, Clone)]
pub struct LinkConfig {
    /// Send a keepalive after this long without sending anything (None: never).
    pub keepalive: Option<Duration>,
    /// Declare the link dead after this long without receiving anything.
    pub idle_timeout: Duration,
    /// First retransmission timeout of a request.
    pub initial_rto: Duration,
    /// Largest retransmission timeout.
    pub max_rto: Duration,
    /// Transmissions of one request before it fails.
    pub max_attempts: u32,
    /// Requests in flight at once (further ones are refused with `LinkError::Busy`).
    pub max_in_flight: usize,
    /// Answers remembered for deduplication.
    pub answer_cache: usize,
    /// Answer each keepalive with one (lets a client notice a vanished supernode).
    pub echo_keepalive: bool,
    /// Declare the link dead when nothing comes back this long after a keepalive (the
    /// other side must echo keepalives). None: only `idle_timeout` applies.
    pub keepalive_timeout: Option<Duration>,
    /// While a keepalive awaits its echo, send another one this often (a lost datagram
    /// is not taken for a dead supernode).
    pub keepalive_retry: Duration,
}

impl LinkConfig {
    /// A client's session to its supernode: keepalive every 25 s.
    pub fn client() -> Self {
        LinkConfig {
            keepalive: Some(KEEPALIVE),
            idle_timeout: Duration::from_secs(80),
            initial_rto: Duration::from_millis(400),
            max_rto: Duration::from_secs(3),
            max_attempts: 6,
            max_in_flight: 64,
            answer_cache: 64,
            echo_keepalive: false,
            keepalive_timeout: None,
            keepalive_retry: Duration::from_secs(1),
        }
    }

    /// A client's session to a supernode of a fleet, where another supernode can take it
    /// at once: keepalive every 8 s ([`FLEET_KEEPALIVE`]), resent every second while
    /// unanswered, and the link is dead when none is echoed within 3 s
    /// ([`FLEET_KEEPALIVE_TIMEOUT`]). A vanished supernode is noticed within 11 s.
    pub fn fleet_client() -> Self {
        LinkConfig {
            keepalive: Some(FLEET_KEEPALIVE),
            keepalive_timeout: Some(FLEET_KEEPALIVE_TIMEOUT),
            keepalive_retry: Duration::from_secs(1),
            ..Self::client()
        }
    }

    /// A supernode's side: never sends keepalives itself, expires silent clients.
    pub fn server() -> Self {
        LinkConfig {
            keepalive: None,
            idle_timeout: Duration::from_secs(90),
            echo_keepalive: true,
            ..Self::client()
        }
    }

    /// A direct peer session: both sides keep it alive.
    pub fn peer() -> Self {
        LinkConfig {
            idle_timeout: Duration::from_secs(75),
            ..Self::client()
        }
    }
}

/// Keepalive interval of a client session (keeps typical NAT UDP mappings open).
pub const KEEPALIVE: Duration = Duration::from_secs(25);
/// Keepalive interval of a client session in a fleet ([`LinkConfig::fleet_client`]).
pub const FLEET_KEEPALIVE: Duration = Duration::from_secs(8);
/// How long a fleet client waits for a keepalive's echo before it declares its supernode
/// gone ([`LinkConfig::fleet_client`]).
pub const FLEET_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why a link operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// Too many requests in flight.
    #[error("too many requests in flight")]
    Busy,
    /// The frame does not fit a datagram.
    #[error("message too large: {0}")]
    Encode(#[from] peerline_wire::Error),
    /// Crypto failure (bad packet, replay, exhausted session).
    #[error("{0}")]
    Noise(#[from] NoiseError),
}

/// Something the owner of a link must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A new request from the other side; answer it with [`Link::respond`].
    Request {
        /// Its id.
        id: u64,
        /// The request.
        body: Request,
    },
    /// The answer to one of our requests.
    Response {
        /// Id of our request.
        id: u64,
        /// The answer.
        body: Response,
    },
    /// One of our requests got no answer after every retransmission.
    RequestFailed {
        /// Id of our request.
        id: u64,
    },
    /// An unreliable datagram (call media) from the other side.
    Datagram(Vec<u8>),
    /// The other side closed the session.
    Closed,
    /// Nothing was received for the idle timeout.
    Dead,
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transmit {
    /// Destination.
    pub dst: SocketAddr,
    /// Bytes.
    pub payload: Vec<u8>,
}

/// Events a link holds before it drops incoming datagrams.
const MAX_QUEUED_DATAGRAMS: usize = 256;

/// How long an answer stays cached for a retransmitted request: well beyond a requester's
/// whole retransmission schedule (about 9 s with the defaults: 0.4 s doubling up to 3 s,
/// six attempts).
pub const ANSWER_TTL: Duration = Duration::from_secs(60);

#[derive(Debug)]
struct Pending {
    plaintext: Vec<u8>,
    attempts: u32,
    max_attempts: u32,
    rto: Duration,
    deadline: Instant,
}

/// Request state of a link: ours awaiting answers, theirs in progress or answered.
#[derive(Debug, Default)]
struct Requests {
    pending: BTreeMap<u64, Pending>,
    answered: HashMap<u64, Vec<u8>>,
    /// Answered ids, oldest first, with when they were answered.
    answered_order: VecDeque<(Instant, u64)>,
    in_progress: HashSet<u64>,
}

impl Requests {
    fn is_empty(&self) -> bool {
        self.pending.is_empty() && self.answered.is_empty() && self.in_progress.is_empty()
    }
}

/// An established session.
#[derive(Debug)]
pub struct Link {
    config: Arc<LinkConfig>,
    transport: Transport,
    local_index: u32,
    remote_index: u32,
    remote_addr: SocketAddr,
    next_id: u64,
    /// None while nothing is in flight and nothing is cached (most of a supernode's links).
    requests: Option<Box<Requests>>,
    /// Requests with ids up to this one were answered and their answers expired: never
    /// executed again (a duplicate delayed past [`ANSWER_TTL`]).
    expired_up_to: u64,
    last_recv: Instant,
    last_send: Instant,
    transmits: VecDeque<Transmit>,
    events: VecDeque<LinkEvent>,
    dead: bool,
    /// An authenticated transport packet came in: the other side completed the handshake
    /// and can receive at its address.
    confirmed: bool,
    /// When the first keepalive still awaiting an answer went out (nothing came in since).
    probing_since: Option<Instant>,
}

impl Link {
    /// Wraps a transport fresh out of a handshake. Links of one kind can share their
    /// configuration (pass an `Arc<LinkConfig>`).
    pub fn new(
        config: impl Into<Arc<LinkConfig>>,
        transport: Transport,
        local_index: u32,
        remote_index: u32,
        remote_addr: SocketAddr,
        now: Instant,
    ) -> Self {
        Link {
            config: config.into(),
            transport,
            local_index,
            remote_index,
            remote_addr,
            next_id: 1,
            requests: None,
            expired_up_to: 0,
            last_recv: now,
            last_send: now,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            dead: false,
            confirmed: false,
            probing_since: None,
        }
    }

    /// Changes timing and bounds of a live link (a client that learnt it is in a fleet).
    /// Requests in flight keep their current retransmission schedule.
    pub fn set_config(&mut self, config: LinkConfig) {
        if config.keepalive_timeout.is_none() {
            self.probing_since = None;
        }
        self.config = Arc::new(config);
    }

    /// The link's timing and bounds.
    pub fn config(&self) -> &LinkConfig {
        &self.config
    }

    /// Our receiver index for this session.
    pub fn local_index(&self) -> u32 {
        self.local_index
    }

    /// The other side's receiver index (what our packets carry).
    pub fn remote_index(&self) -> u32 {
        self.remote_index
    }

    /// The address the other side was last heard from (follows NAT rebinding).
    pub fn remote_addr(&self) -> SocketAddr {
        self.remote_addr
    }

    /// The other side's authenticated static key.
    pub fn remote_static(&self) -> &[u8; 32] {
        self.transport.remote_static()
    }

    /// Requests awaiting an answer.
    pub fn in_flight(&self) -> usize {
        self.requests.as_ref().map_or(0, |r| r.pending.len())
    }

    fn requests(&mut self) -> &mut Requests {
        self.requests.get_or_insert_with(Box::default)
    }

    /// Gives the request state's memory back once nothing is left in it.
    fn release_requests(&mut self) {
        if self.requests.as_ref().is_some_and(|r| r.is_empty()) {
            self.requests = None;
        }
    }

    /// Forgets answers older than [`ANSWER_TTL`].
    fn expire_answers(&mut self, now: Instant) {
        let Some(r) = self.requests.as_mut() else {
            return;
        };
        while let Some(&(at, id)) = r.answered_order.front() {
            if now < at + ANSWER_TTL {
                break;
            }
            r.answered_order.pop_front();
            r.answered.remove(&id);
            self.expired_up_to = self.expired_up_to.max(id);
        }
        self.release_requests();
    }

    /// Whether an authenticated transport packet has come in (a responder's session is
    /// half-open until then).
    pub fn is_confirmed(&self) -> bool {
        self.confirmed
    }

    /// Whether the link declared itself dead.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    fn seal(&mut self, now: Instant, plaintext: &[u8]) -> Result<(), LinkError> {
        let mut out = Vec::with_capacity(plaintext.len() + 32);
        out.extend_from_slice(&Packet::transport_header(self.remote_index, 0));
        let counter = self.transport.seal(plaintext, &mut out)?;
        out[8..16].copy_from_slice(&counter.to_le_bytes());
        self.transmits.push_back(Transmit {
            dst: self.remote_addr,
            payload: out,
        });
        self.last_send = now;
        Ok(())
    }

    /// Sends an unreliable datagram (call media): sealed like everything else, but never
    /// acknowledged or retransmitted.
    pub fn send_datagram(&mut self, now: Instant, bytes: Vec<u8>) -> Result<(), LinkError> {
        let plaintext = Frame::Datagram(bytes).encode()?;
        self.seal(now, &plaintext)
    }

    /// Sends a request; returns its id. The answer arrives as [`LinkEvent::Response`].
    pub fn send_request(&mut self, now: Instant, body: Request) -> Result<u64, LinkError> {
        self.send_request_limited(now, body, u32::MAX)
    }

    /// As [`Link::send_request`], giving up after at most `max_attempts` transmissions
    /// (and never more than the link's own limit).
    pub fn send_request_limited(
        &mut self,
        now: Instant,
        body: Request,
        max_attempts: u32,
    ) -> Result<u64, LinkError> {
        if self.in_flight() >= self.config.max_in_flight {
            return Err(LinkError::Busy);
        }
        let id = self.next_id;
        let plaintext = Frame::Request { id, body }.encode()?;
        self.next_id += 1;
        self.seal(now, &plaintext)?;
        let pending = Pending {
            plaintext,
            attempts: 1,
            max_attempts: max_attempts.clamp(1, self.config.max_attempts),
            rto: self.config.initial_rto,
            deadline: now + self.config.initial_rto,
        };
        self.requests().pending.insert(id, pending);
        Ok(id)
    }

    /// Answers request `id` (once; later retransmissions get this answer from the cache).
    pub fn respond(&mut self, now: Instant, id: u64, body: Response) -> Result<(), LinkError> {
        let plaintext = match (Frame::Response { id, body }).encode() {
            Ok(p) => p,
            Err(e) => {
                // An answer that cannot be encoded is a bug; answer with a generic error
                // rather than leaving the peer retransmitting forever.
                let fallback = Frame::Response {
                    id,
                    body: Response::error(
                        peerline_wire::msg::ErrorCode::Internal,
                        "answer too large",
                    ),
                };
                let p = fallback.encode()?;
                tracing::warn!(error = %e, "response did not encode");
                p
            }
        };
        let sealed = self.seal(now, &plaintext);
        let cache = self.config.answer_cache;
        let r = self.requests();
        r.in_progress.remove(&id);
        if sealed.is_ok() && cache > 0 && r.answered.insert(id, plaintext).is_none() {
            r.answered_order.push_back((now, id));
        }
        while r.answered_order.len() > cache {
            if let Some((_, old)) = r.answered_order.pop_front() {
                r.answered.remove(&old);
            }
        }
        self.expire_answers(now);
        sealed
    }

    /// Sends a `Close` frame (best effort, not retransmitted).
    pub fn close(&mut self, now: Instant) {
        if let Ok(p) = Frame::Close.encode() {
            let _ = self.seal(now, &p);
        }
        self.dead = true;
    }

    /// Handles a transport packet addressed to this link's index.
    ///
    /// Errors mean the packet was dropped (forged, replayed, malformed) and change nothing.
    pub fn handle_transport(
        &mut self,
        now: Instant,
        from: SocketAddr,
        counter: u64,
        ciphertext: &[u8],
    ) -> Result<(), LinkError> {
        let plaintext = self.transport.open(counter, ciphertext)?;
        // Authenticated: the peer may have moved (NAT rebinding); follow it.
        self.remote_addr = from;
        self.last_recv = now;
        self.confirmed = true;
        self.probing_since = None;
        let frame = Frame::decode(&plaintext)?;
        match frame {
            Frame::Keepalive => {
                if self.config.echo_keepalive {
                    let p = Frame::Keepalive.encode()?;
                    self.seal(now, &p)?;
                }
            }
            Frame::Close => {
                self.dead = true;
                self.events.push_back(LinkEvent::Closed);
            }
            Frame::Datagram(d) => {
                // Unreliable by contract: when the owner falls behind, drop rather than queue.
                if self.events.len() < MAX_QUEUED_DATAGRAMS {
                    self.events.push_back(LinkEvent::Datagram(d));
                }
            }
            Frame::Request { id, body } => {
                self.expire_answers(now);
                let limit = self.config.max_in_flight * 4;
                let cached = self
                    .requests
                    .as_ref()
                    .and_then(|r| r.answered.get(&id).cloned());
                if let Some(answer) = cached {
                    self.seal(now, &answer)?;
                } else if id > self.expired_up_to {
                    let r = self.requests();
                    if r.in_progress.len() < limit && r.in_progress.insert(id) {
                        self.events.push_back(LinkEvent::Request { id, body });
                    }
                    self.release_requests();
                }
                // else: still being worked on, too many, or answered long ago: the peer
                // retransmits what it still wants.
            }
            Frame::Response { id, body } => {
                let known = self
                    .requests
                    .as_mut()
                    .is_some_and(|r| r.pending.remove(&id).is_some());
                if known {
                    self.release_requests();
                    self.events.push_back(LinkEvent::Response { id, body });
                }
            }
        }
        Ok(())
    }

    /// Runs due timers: retransmissions, keepalive, idle expiry.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.dead {
            return;
        }
        if now >= self.last_recv + self.config.idle_timeout {
            self.dead = true;
            self.events.push_back(LinkEvent::Dead);
            return;
        }
        self.expire_answers(now);
        let due: Vec<u64> = self.requests.as_ref().map_or_else(Vec::new, |r| {
            r.pending
                .iter()
                .filter(|(_, p)| p.deadline <= now)
                .map(|(id, _)| *id)
                .collect()
        });
        let max_rto = self.config.max_rto;
        for id in due {
            let r = self.requests();
            let Some(p) = r.pending.get_mut(&id) else {
                continue;
            };
            if p.attempts >= p.max_attempts {
                r.pending.remove(&id);
                self.events.push_back(LinkEvent::RequestFailed { id });
                continue;
            }
            p.attempts += 1;
            p.rto = (p.rto * 2).min(max_rto);
            p.deadline = now + p.rto;
            let plaintext = p.plaintext.clone();
            let _ = self.seal(now, &plaintext);
        }
        self.release_requests();
        if let (Some(since), Some(limit)) = (self.probing_since, self.config.keepalive_timeout) {
            if now >= since + limit {
                self.dead = true;
                self.events.push_back(LinkEvent::Dead);
                return;
            }
        }
        if let Some(k) = self.config.keepalive {
            let due = match self.probing_since {
                // Unanswered so far: try again sooner, a datagram may have been lost.
                Some(_) => self.last_send + self.config.keepalive_retry.min(k),
                None => self.last_send + k,
            };
            if now >= due {
                if let Ok(p) = Frame::Keepalive.encode() {
                    let _ = self.seal(now, &p);
                }
                if self.config.keepalive_timeout.is_some() && self.probing_since.is_none() {
                    self.probing_since = Some(now);
                }
            }
        }
    }

    /// The earliest instant at which [`Link::handle_timeout`] has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        if self.dead {
            return None;
        }
        let mut t = self.last_recv + self.config.idle_timeout;
        if let Some(k) = self.config.keepalive {
            let next = match self.probing_since {
                Some(_) => self.last_send + self.config.keepalive_retry.min(k),
                None => self.last_send + k,
            };
            t = t.min(next);
        }
        if let (Some(since), Some(limit)) = (self.probing_since, self.config.keepalive_timeout) {
            t = t.min(since + limit);
        }
        if let Some(r) = &self.requests {
            if let Some(p) = r.pending.values().map(|p| p.deadline).min() {
                t = t.min(p);
            }
            // Cached answers are freed when they expire, not only at the next packet.
            if let Some(&(at, _)) = r.answered_order.front() {
                t = t.min(at + ANSWER_TTL);
            }
        }
        Some(t)
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let t = self.transmits.pop_front();
        if t.is_none() && self.transmits.capacity() > 0 {
            // Drained: give the buffer back (an idle link holds no heap).
            self.transmits = VecDeque::new();
        }
        t
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<LinkEvent> {
        let e = self.events.pop_front();
        if e.is_none() && self.events.capacity() > 0 {
            self.events = VecDeque::new();
        }
        e
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{link_pair, link_pair_cfg, Net};
    use peerline_wire::msg::Presence;

    fn drain(l: &mut Link) -> Vec<LinkEvent> {
        std::iter::from_fn(|| l.poll_event()).collect()
    }

    /// Delivers every datagram in flight from `a` to `b` through `net` (which may drop,
    /// duplicate and reorder).
    fn pump(net: &mut Net, now: Instant, a: &mut Link, b: &mut Link) {
        for _ in 0..8 {
            while let Some(t) = a.poll_transmit() {
                net.send(now, a_addr(), t);
            }
            while let Some(t) = b.poll_transmit() {
                net.send(now, b_addr(), t);
            }
            for (from, t) in net.deliver(now) {
                let dst = if t.dst == b_addr() { &mut *b } else { &mut *a };
                if let Ok(Packet::Transport {
                    counter,
                    ciphertext,
                    ..
                }) = Packet::decode(&t.payload)
                {
                    let _ = dst.handle_transport(now, from, counter, ciphertext);
                }
            }
        }
    }

    fn a_addr() -> SocketAddr {
        "10.0.0.1:1000".parse().unwrap()
    }
    fn b_addr() -> SocketAddr {
        "10.0.0.2:2000".parse().unwrap()
    }

    #[test]
    fn request_response_over_a_perfect_network() {
        let t0 = Instant::now();
        let (mut a, mut b) = link_pair(t0, a_addr(), b_addr());
        let mut net = Net::perfect(1);
        let id = a
            .send_request(t0, Request::SetPresence(Presence::Away))
            .unwrap();
        pump(&mut net, t0, &mut a, &mut b);
        let ev = drain(&mut b);
        assert_eq!(
            ev,
            vec![LinkEvent::Request {
                id,
                body: Request::SetPresence(Presence::Away)
            }]
        );
        b.respond(t0, id, Response::Ok).unwrap();
        pump(&mut net, t0, &mut a, &mut b);
        assert_eq!(
            drain(&mut a),
            vec![LinkEvent::Response {
                id,
                body: Response::Ok
            }]
        );
        assert_eq!(a.in_flight(), 0);
    }

    /// An idle link owns no heap beyond its struct: request state, queues and cached
    /// answers are given back (a supernode holds a million idle links).
    #[test]
    fn idle_link_gives_its_memory_back() {
        let t0 = Instant::now();
        let (mut a, mut b) = link_pair(t0, a_addr(), b_addr());
        let mut net = Net::perfect(1);
        let id = a
            .send_request(t0, Request::SetPresence(Presence::Away))
            .unwrap();
        pump(&mut net, t0, &mut a, &mut b);
        assert_eq!(drain(&mut b).len(), 1);
        b.respond(t0, id, Response::Ok).unwrap();
        pump(&mut net, t0, &mut a, &mut b);
        assert_eq!(drain(&mut a).len(), 1);
        // The requester keeps nothing once answered; the responder keeps the answer only.
        assert!(a.requests.is_none());
        assert_eq!(b.requests.as_ref().map(|r| r.answered.len()), Some(1));
        assert_eq!(a.transmits.capacity() + a.events.capacity(), 0);
        assert_eq!(b.transmits.capacity() + b.events.capacity(), 0);
        // The cached answer is dropped after its lifetime, and the timer says when.
        let due = b.poll_timeout().unwrap();
        assert!(due <= t0 + ANSWER_TTL);
        b.handle_timeout(t0 + ANSWER_TTL);
        assert!(b.requests.is_none());
    }

    /// Hands `a`'s next datagram to `b`, which must accept it.
    fn deliver_next(a: &mut Link, b: &mut Link, now: Instant) {
        let t = a.poll_transmit().unwrap();
        let Ok(Packet::Transport {
            counter,
            ciphertext,
            ..
        }) = Packet::decode(&t.payload)
        else {
            panic!("not a transport packet");
        };
        b.handle_transport(now, a_addr(), counter, ciphertext)
            .unwrap();
    }

    /// A duplicate of a request whose cached answer expired is not executed again.
    #[test]
    fn request_delayed_past_its_answer_is_not_executed_twice() {
        let t0 = Instant::now();
        let (mut a, mut b) = link_pair(t0, a_addr(), b_addr());
        let id = a
            .send_request(t0, Request::SetPresence(Presence::Away))
            .unwrap();
        deliver_next(&mut a, &mut b, t0);
        assert_eq!(drain(&mut b).len(), 1);
        b.respond(t0, id, Response::Ok).unwrap();
        assert!(b.poll_transmit().is_some());
        let later = t0 + ANSWER_TTL + Duration::from_secs(1);
        b.handle_timeout(later);
        assert!(b.requests.is_none());
        // The same request, freshly sealed by the peer (a retransmission that took a
        // minute), is neither executed nor answered.
        let late = Frame::Request {
            id,
            body: Request::SetPresence(Presence::Away),
        }
        .encode()
        .unwrap();
        a.seal(later, &late).unwrap();
        deliver_next(&mut a, &mut b, later);
        assert!(drain(&mut b).is_empty());
        assert!(b.poll_transmit().is_none());
    }

    /// Under heavy loss, duplication and reordering every request is executed exactly once
    /// and answered exactly once.
    #[test]
    fn lossy_network_each_request_once_each_answer_once() {
        for seed in 0..20 {
            let mut t = Instant::now();
            // Enough attempts that giving up is not what this test is about.
            let patient = LinkConfig {
                max_attempts: 30,
                ..LinkConfig::client()
            };
            let (mut a, mut b) =
                link_pair_cfg(t, a_addr(), b_addr(), patient, LinkConfig::server());
            let mut net = Net::lossy(seed, 0.3, 0.2, Duration::from_millis(80));
            let mut sent = Vec::new();
            for i in 0..10 {
                sent.push(
                    a.send_request(t, Request::ContactList { offset: i })
                        .unwrap(),
                );
            }
            let mut executed = Vec::new();
            let mut answered = Vec::new();
            for _ in 0..1200 {
                t += Duration::from_millis(50);
                a.handle_timeout(t);
                b.handle_timeout(t);
                pump(&mut net, t, &mut a, &mut b);
                for e in drain(&mut b) {
                    if let LinkEvent::Request { id, .. } = e {
                        executed.push(id);
                        b.respond(t, id, Response::Ok).unwrap();
                    }
                }
                for e in drain(&mut a) {
                    match e {
                        LinkEvent::Response { id, .. } => answered.push(id),
                        other => panic!("seed {seed}: unexpected {other:?}"),
                    }
                }
            }
            executed.sort();
            answered.sort();
            assert_eq!(executed, sent, "seed {seed}: each request executed once");
            assert_eq!(answered, sent, "seed {seed}: each answer delivered once");
        }
    }

    #[test]
    fn unanswered_request_fails_after_max_attempts() {
        let mut t = Instant::now();
        let (mut a, _b) = link_pair(t, a_addr(), b_addr());
        let id = a.send_request(t, Request::RenewCert).unwrap();
        let mut sends = 1;
        let mut failed = false;
        while !failed && t < Instant::now() + Duration::from_secs(60) {
            t += Duration::from_millis(100);
            a.handle_timeout(t);
            while a.poll_transmit().is_some() {
                sends += 1;
            }
            failed = drain(&mut a).contains(&LinkEvent::RequestFailed { id });
        }
        assert!(failed);
        // Retransmissions plus keepalives; at least max_attempts transmissions of the request.
        assert!(sends >= LinkConfig::client().max_attempts as usize);
    }

    #[test]
    fn keepalive_every_25s_and_idle_expiry() {
        let t0 = Instant::now();
        let (mut a, mut b) = link_pair(t0, a_addr(), b_addr());
        assert_eq!(a.poll_timeout(), Some(t0 + KEEPALIVE));
        a.handle_timeout(t0 + KEEPALIVE);
        let k = a.poll_transmit().expect("keepalive sent");
        let Ok(Packet::Transport {
            counter,
            ciphertext,
            ..
        }) = Packet::decode(&k.payload)
        else {
            panic!()
        };
        b.handle_transport(t0 + KEEPALIVE, a_addr(), counter, ciphertext)
            .unwrap();
        assert!(drain(&mut b).is_empty(), "keepalive raises no event");
        // The server echoes it, so the client knows its supernode is alive.
        let echo = b.poll_transmit().expect("keepalive echoed");
        let Ok(Packet::Transport {
            counter,
            ciphertext,
            ..
        }) = Packet::decode(&echo.payload)
        else {
            panic!()
        };
        a.handle_transport(t0 + KEEPALIVE, b_addr(), counter, ciphertext)
            .unwrap();
        assert!(a.poll_transmit().is_none(), "the client does not echo back");
        // The server side never sends keepalives; it expires after 90 s of silence.
        let idle = t0 + KEEPALIVE + LinkConfig::server().idle_timeout;
        b.handle_timeout(idle - Duration::from_millis(1));
        assert!(!b.is_dead());
        b.handle_timeout(idle);
        assert_eq!(drain(&mut b), vec![LinkEvent::Dead]);
    }

    /// Delivers everything `from` queued to `to` (no loss); returns how many datagrams.
    fn deliver_all(now: Instant, from: &mut Link, from_addr: SocketAddr, to: &mut Link) -> usize {
        let mut n = 0;
        while let Some(t) = from.poll_transmit() {
            n += 1;
            if let Ok(Packet::Transport {
                counter,
                ciphertext,
                ..
            }) = Packet::decode(&t.payload)
            {
                let _ = to.handle_transport(now, from_addr, counter, ciphertext);
            }
        }
        n
    }

    #[test]
    fn fleet_link_declares_a_silent_supernode_dead_3s_after_an_unanswered_keepalive() {
        let t0 = Instant::now();
        let (mut a, _b) = link_pair_cfg(
            t0,
            a_addr(),
            b_addr(),
            LinkConfig::fleet_client(),
            LinkConfig::server(),
        );
        assert_eq!(a.poll_timeout(), Some(t0 + FLEET_KEEPALIVE));
        let mut t = t0;
        let mut keepalives = Vec::new();
        while !a.is_dead() && t < t0 + Duration::from_secs(60) {
            t = a.poll_timeout().expect("a live link has a timer");
            a.handle_timeout(t);
            while a.poll_transmit().is_some() {
                keepalives.push(t - t0);
            }
        }
        assert_eq!(drain(&mut a), vec![LinkEvent::Dead]);
        // Dead 3 s after the first unanswered keepalive, long before the 80 s idle timeout.
        assert_eq!(t - t0, FLEET_KEEPALIVE + FLEET_KEEPALIVE_TIMEOUT);
        // The first keepalive after the fleet interval, then one per second while unanswered.
        let secs: Vec<u64> = keepalives.iter().map(|d| d.as_secs()).collect();
        let k = FLEET_KEEPALIVE.as_secs();
        assert_eq!(secs, vec![k, k + 1, k + 2]);
    }

    #[test]
    fn fleet_link_with_an_echoing_supernode_stays_up_on_its_keepalives() {
        let t0 = Instant::now();
        let (mut a, mut b) = link_pair_cfg(
            t0,
            a_addr(),
            b_addr(),
            LinkConfig::fleet_client(),
            LinkConfig::server(),
        );
        let mut t = t0;
        let mut sent = 0;
        while t < t0 + Duration::from_secs(100) {
            t += Duration::from_millis(100);
            a.handle_timeout(t);
            b.handle_timeout(t);
            sent += deliver_all(t, &mut a, a_addr(), &mut b);
            deliver_all(t, &mut b, b_addr(), &mut a);
        }
        assert!(!a.is_dead());
        assert!(drain(&mut a).is_empty());
        // One keepalive per interval, no retries when echoes come back.
        assert_eq!(sent as u64, 100 / FLEET_KEEPALIVE.as_secs());
    }

    #[test]
    fn a_lost_echo_is_retried_not_taken_for_a_dead_supernode() {
        let t0 = Instant::now();
        let (mut a, mut b) = link_pair_cfg(
            t0,
            a_addr(),
            b_addr(),
            LinkConfig::fleet_client(),
            LinkConfig::server(),
        );
        // The first keepalive is lost; the retry a second later is echoed.
        let t1 = t0 + FLEET_KEEPALIVE;
        a.handle_timeout(t1);
        assert!(a.poll_transmit().is_some());
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(a.poll_timeout(), Some(t2));
        a.handle_timeout(t2);
        assert_eq!(deliver_all(t2, &mut a, a_addr(), &mut b), 1);
        deliver_all(t2, &mut b, b_addr(), &mut a);
        a.handle_timeout(t2 + Duration::from_secs(5));
        assert!(!a.is_dead());
        // Back to the normal interval once answered.
        assert_eq!(a.poll_timeout(), Some(t2 + FLEET_KEEPALIVE));
    }

    #[test]
    fn set_config_switches_a_live_link_to_fleet_timing() {
        let t0 = Instant::now();
        let (mut a, _b) = link_pair(t0, a_addr(), b_addr());
        assert_eq!(a.poll_timeout(), Some(t0 + KEEPALIVE));
        a.set_config(LinkConfig::fleet_client());
        assert_eq!(a.config().keepalive, Some(FLEET_KEEPALIVE));
        assert_eq!(a.poll_timeout(), Some(t0 + FLEET_KEEPALIVE));
        // And back: a lone supernode again waits for the 80 s idle timeout.
        a.handle_timeout(t0 + FLEET_KEEPALIVE);
        a.set_config(LinkConfig::client());
        a.handle_timeout(t0 + Duration::from_secs(20));
        assert!(!a.is_dead());
        a.handle_timeout(t0 + LinkConfig::client().idle_timeout);
        assert!(a.is_dead());
    }

    #[test]
    fn replayed_packet_is_dropped() {
        let t0 = Instant::now();
        let (mut a, mut b) = link_pair(t0, a_addr(), b_addr());
        a.send_request(t0, Request::RenewCert).unwrap();
        let p = a.poll_transmit().unwrap();
        let Ok(Packet::Transport {
            counter,
            ciphertext,
            ..
        }) = Packet::decode(&p.payload)
        else {
            panic!()
        };
        b.handle_transport(t0, a_addr(), counter, ciphertext)
            .unwrap();
        assert!(matches!(
            b.handle_transport(t0, a_addr(), counter, ciphertext),
            Err(LinkError::Noise(NoiseError::Replay(_)))
        ));
        assert_eq!(drain(&mut b).len(), 1);
    }
}
