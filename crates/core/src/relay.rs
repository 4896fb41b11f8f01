//! A TURN relay (RFC 8656) for UDP, as a sans-IO state machine.
//!
//! Two clients with no direct path send their end-to-end encrypted datagrams through a
//! relay allocation: the relay sees only ciphertext. This core decides everything (who
//! may allocate, which peer may send to which allocation, when things expire); the tokio
//! glue in `peerline-net` owns the sockets.
//!
//! # Driving it
//!
//! - [`Relay::handle_client`]: a datagram that arrived on the relay's listening port (STUN
//!   requests and indications, ChannelData).
//! - [`Relay::handle_peer`]: a datagram that arrived on allocation `id`'s relayed socket.
//! - [`Relay::handle_timeout`]: at or after [`Relay::poll_timeout`].
//! - [`Relay::poll_transmit`]: datagrams to send, each naming its socket
//!   ([`RelaySocket::Listen`] or the relayed socket of an allocation).
//! - [`Relay::poll_event`]: [`RelayEvent::AllocationCreated`] asks the glue to open a UDP
//!   socket for the new allocation and report its address with [`Relay::relayed_bound`]
//!   (or [`Relay::relay_bind_failed`]); only then does the client get its Allocate success
//!   response with XOR-RELAYED-ADDRESS. [`RelayEvent::AllocationExpired`] asks the glue to
//!   close that socket.
//!
//! Drain `poll_transmit` and `poll_event` after every `handle_*` call; both queues hold
//! only what one call produced.
//!
//! # Credentials
//!
//! Time-limited credentials in the style of coturn's `use-auth-secret` ("TURN REST API"):
//! the username is `"<expiry unix seconds>:<peerline username>"` and the password is
//! `base64(HMAC-SHA1(secret, username))`. Whoever holds the secret (the supernode) issues
//! them with [`turn_credentials`]; the relay keeps no account list. Expired usernames get
//! 401 on every request, so an allocation cannot be refreshed past its credentials'
//! expiry: issue credentials that outlive the expected call.
//!
//! Authentication is the long-term mechanism of RFC 8489 section 9.2 with
//! MESSAGE-INTEGRITY (HMAC-SHA1): a request without it gets 401 with REALM and NONCE.
//! Nonces are stateless (a MAC over their expiry and the client's address, keyed from the
//! seed), so unauthenticated traffic costs no memory.
//!
//! # Bounds
//!
//! Allocations in total and per user, allocations waiting for their socket, permissions
//! and channels per allocation, and the output queue are all limited by
//! [`RelayConfig`]. Peer addresses on loopback or private ranges are refused by default
//! (an open relay into the operator's own network is a classic TURN hole).
//!
//! What is not done: TCP allocations (RFC 6062), EVEN-PORT, RESERVATION-TOKEN,
//! DONT-FRAGMENT (all answered with 420), dual-stack allocations (ADDITIONAL-ADDRESS-FAMILY
//! is ignored: one relayed address per allocation), and MESSAGE-INTEGRITY-SHA256.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::{Duration, Instant};

use base64::Engine;
use hmac::{Hmac, Mac};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;
use sha1::Sha1;
use stun_types::attribute::{
    Attribute, AttributeStaticType, AttributeType, ErrorCode, Fingerprint, MessageIntegrity, Nonce,
    Realm, Software, UnknownAttributes, Username, XorMappedAddress,
};
use stun_types::message::{
    IntegrityAlgorithm, IntegrityKey, LongTermKeyCredentials, Message, MessageClass, MessageType,
    MessageWrite, MessageWriteExt, MessageWriteVec, Method, TransactionId, BINDING,
};
use turn_types::attribute::{
    ChannelNumber, Data, Lifetime, RequestedAddressFamily, RequestedTransport, XorPeerAddress,
    XorRelayedAddress,
};
use turn_types::channel::ChannelData;
use turn_types::message::{ALLOCATE, CHANNEL_BIND, CREATE_PERMISSION, DATA, REFRESH, SEND};
use turn_types::AddressFamily;

type HmacSha1 = Hmac<Sha1>;

/// Default allocation lifetime (RFC 8656 section 3.2: 10 minutes).
pub const DEFAULT_ALLOCATION_LIFETIME: Duration = Duration::from_secs(600);
/// Default longest allocation lifetime a client may ask for (RFC 8656 section 7.2: 1 hour).
pub const MAX_ALLOCATION_LIFETIME: Duration = Duration::from_secs(3600);
/// Permission lifetime (RFC 8656 section 9: 300 seconds, not configurable by the client).
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// Channel binding lifetime (RFC 8656 section 12: 10 minutes).
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// After a channel expires, its number and peer stay reserved this long (RFC 8656
/// section 12), so late packets are not delivered to a new binding.
pub const CHANNEL_QUARANTINE: Duration = Duration::from_secs(300);
/// Lowest and highest channel numbers (RFC 8656 section 12).
pub const CHANNEL_NUMBERS: std::ops::RangeInclusive<u16> = 0x4000..=0x4FFF;
/// Largest payload relayed in one datagram (a Data indication must still fit the 16-bit
/// STUN length; ChannelData its 16-bit length).
pub const MAX_RELAY_PAYLOAD: usize = 65_000;

/// Bounds and timings of a relay.
#[derive(Debug, Clone)]
pub struct RelayConfig {
    /// The REALM sent in challenges and used in the long-term key.
    pub realm: String,
    /// SOFTWARE attribute on responses (none when empty).
    pub software: String,
    /// Most allocations at once (further Allocates get 508 Insufficient Capacity).
    pub max_allocations: usize,
    /// Most allocations per Peerline user (further Allocates get 486 Allocation Quota
    /// Reached).
    pub max_allocations_per_user: usize,
    /// Most allocations waiting for the glue to bind their socket.
    pub max_pending_binds: usize,
    /// How long the glue may take to bind a relayed socket before the attempt is dropped.
    pub bind_timeout: Duration,
    /// Most permissions (peer IPs) per allocation (beyond: 508).
    pub max_permissions: usize,
    /// Most channels per allocation (beyond: 508).
    pub max_channels: usize,
    /// Lifetime given when the client asks for none or less.
    pub default_lifetime: Duration,
    /// Longest lifetime granted.
    pub max_lifetime: Duration,
    /// Permission lifetime.
    pub permission_lifetime: Duration,
    /// Channel lifetime.
    pub channel_lifetime: Duration,
    /// How long a NONCE stays valid (then 438 Stale Nonce and a new one).
    pub nonce_lifetime: Duration,
    /// Most datagrams queued for the glue (beyond: dropped and counted).
    pub max_queued_transmits: usize,
    /// Allow peers on loopback addresses (tests only).
    pub allow_loopback_peers: bool,
    /// Allow peers on private, shared (CGNAT), link-local and unique-local addresses.
    /// Off by default: a relay should not reach into the operator's own network.
    pub allow_private_peers: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        RelayConfig {
            realm: "peerline".into(),
            software: String::new(),
            max_allocations: 10_000,
            max_allocations_per_user: 8,
            max_pending_binds: 256,
            bind_timeout: Duration::from_secs(5),
            max_permissions: 32,
            max_channels: 32,
            default_lifetime: DEFAULT_ALLOCATION_LIFETIME,
            max_lifetime: MAX_ALLOCATION_LIFETIME,
            permission_lifetime: PERMISSION_LIFETIME,
            channel_lifetime: CHANNEL_LIFETIME,
            nonce_lifetime: Duration::from_secs(3600),
            max_queued_transmits: 4096,
            allow_loopback_peers: false,
            allow_private_peers: false,
        }
    }
}

/// Identifies one allocation for the life of a [`Relay`] (never reused).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AllocationId(u64);

impl AllocationId {
    /// The number behind the id (for logs and metrics).
    pub fn get(self) -> u64 {
        self.0
    }
}

impl fmt::Display for AllocationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "a{}", self.0)
    }
}

/// Address family of a relayed address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayFamily {
    /// IPv4.
    V4,
    /// IPv6.
    V6,
}

impl RelayFamily {
    /// The family of `addr`.
    pub fn of(addr: &SocketAddr) -> RelayFamily {
        if addr.is_ipv4() {
            RelayFamily::V4
        } else {
            RelayFamily::V6
        }
    }
}

/// Which socket a [`RelayTransmit`] leaves from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelaySocket {
    /// The relay's listening socket (towards clients).
    Listen,
    /// The relayed socket of this allocation (towards its peers).
    Relayed(AllocationId),
}

/// A datagram to send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayTransmit {
    /// The socket to send it from.
    pub socket: RelaySocket,
    /// Destination.
    pub dst: SocketAddr,
    /// Payload.
    pub payload: Vec<u8>,
}

/// What the glue must act on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RelayEvent {
    /// Open a UDP socket for this allocation (same IP as the listening socket, any port,
    /// of `family`), then call [`Relay::relayed_bound`] or [`Relay::relay_bind_failed`].
    AllocationCreated {
        /// The allocation.
        id: AllocationId,
        /// The client's address (redact in logs).
        client: SocketAddr,
        /// The family the client asked for.
        family: RelayFamily,
    },
    /// Close this allocation's socket, if one was opened (expired, deleted, or failed).
    AllocationExpired {
        /// The allocation.
        id: AllocationId,
    },
}

/// Why the glue could not open a relayed socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RelayBindFailure {
    /// The relay has no address of the requested family (the client gets 440).
    AddressFamily,
    /// Binding failed, e.g. out of ports or descriptors (the client gets 508).
    Unavailable,
}

/// Counters for metrics.
#[derive(Debug, Clone, Default)]
pub struct RelayStats {
    /// Datagrams from clients.
    pub client_datagrams: u64,
    /// Datagrams from peers.
    pub peer_datagrams: u64,
    /// Requests answered (any result).
    pub requests: u64,
    /// Requests refused for missing, stale or wrong credentials.
    pub auth_failures: u64,
    /// Allocations created (successful Allocate responses).
    pub allocations_created: u64,
    /// Datagrams relayed from clients to peers.
    pub relayed_to_peers: u64,
    /// Datagrams relayed from peers to clients.
    pub relayed_to_clients: u64,
    /// Payload bytes relayed (both directions).
    pub relayed_bytes: u64,
    /// Datagrams dropped: malformed, unknown, no permission, or the output queue full.
    pub dropped: u64,
}

/// The time-limited TURN credentials for `user`, valid until `expires_unix` (seconds):
/// `("<expires_unix>:<user>", base64(HMAC-SHA1(secret, username)))`, as coturn's
/// `use-auth-secret` expects, so the same secret also works with coturn.
pub fn turn_credentials(secret: &[u8; 32], user: &str, expires_unix: u64) -> (String, String) {
    let username = format!("{expires_unix}:{user}");
    let password = password_for(secret, &username);
    (username, password)
}

fn hmac_sha1(key: &[u8], parts: &[&[u8]]) -> [u8; 20] {
    // HMAC accepts keys of any length, so this cannot fail.
    let mut mac = HmacSha1::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn password_for(secret: &[u8; 32], username: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(hmac_sha1(secret, &[username.as_bytes()]))
}

/// Splits `"<expiry>:<user>"`; `None` when malformed.
fn parse_username(username: &str) -> Option<(u64, &str)> {
    let (expiry, user) = username.split_once(':')?;
    if expiry.is_empty() || expiry.len() > 20 || !expiry.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    if user.is_empty() || user.len() > 128 {
        return None;
    }
    Some((expiry.parse().ok()?, user))
}

/// Attribute types this relay understands (anything else comprehension-required gets 420).
const KNOWN_ATTRIBUTES: [AttributeType; 11] = [
    Username::TYPE,
    Realm::TYPE,
    Nonce::TYPE,
    MessageIntegrity::TYPE,
    Fingerprint::TYPE,
    RequestedTransport::TYPE,
    Lifetime::TYPE,
    XorPeerAddress::TYPE,
    ChannelNumber::TYPE,
    RequestedAddressFamily::TYPE,
    Data::TYPE,
];

/// Most XOR-PEER-ADDRESS attributes read from one CreatePermission.
const MAX_PEERS_PER_REQUEST: usize = 16;

#[derive(Debug)]
struct Permission {
    ip: IpAddr,
    expires_at: Instant,
}

#[derive(Debug)]
struct Channel {
    number: u16,
    peer: SocketAddr,
    expires_at: Instant,
}

#[derive(Debug)]
enum AllocState {
    /// Waiting for the glue's socket; the Allocate success goes out once it is bound.
    Pending {
        lifetime: Duration,
        fingerprint: bool,
    },
    Bound(SocketAddr),
}

#[derive(Debug)]
struct Allocation {
    client: SocketAddr,
    /// The Peerline user (the quota key).
    user: Box<str>,
    /// The full STUN USERNAME; later requests must carry the same one (else 441).
    username: Box<str>,
    key: IntegrityKey,
    family: RelayFamily,
    /// The Allocate's transaction, so a retransmission gets the same answer.
    alloc_txid: TransactionId,
    state: AllocState,
    expires_at: Instant,
    /// This allocation's entry in `Relay::deadlines`.
    deadline: Instant,
    permissions: Vec<Permission>,
    channels: Vec<Channel>,
}

impl Allocation {
    fn relayed(&self) -> Option<SocketAddr> {
        match self.state {
            AllocState::Bound(a) => Some(a),
            AllocState::Pending { .. } => None,
        }
    }

    fn permitted(&self, now: Instant, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        self.permissions
            .iter()
            .any(|p| p.ip == ip && p.expires_at > now)
    }

    fn channel_by_number(&self, now: Instant, number: u16) -> Option<&Channel> {
        self.channels
            .iter()
            .find(|c| c.number == number && c.expires_at > now)
    }

    fn channel_by_peer(&self, now: Instant, peer: SocketAddr) -> Option<&Channel> {
        self.channels
            .iter()
            .find(|c| c.peer == peer && c.expires_at > now)
    }
}

/// A verified request's credentials.
struct Auth {
    key: IntegrityKey,
    username: String,
    user: String,
}

/// Why a request was not authenticated.
enum AuthFailure {
    /// 400: integrity present but USERNAME, REALM or NONCE missing.
    BadRequest,
    /// 401 with REALM and a NONCE.
    Unauthorized,
    /// 438 with REALM and a new NONCE.
    StaleNonce,
}

/// The sans-IO TURN relay. See the [module docs](self).
pub struct Relay {
    config: RelayConfig,
    secret: [u8; 32],
    nonce_key: [u8; 32],
    rng: ChaCha20Rng,
    start: Instant,
    unix_at_start: u64,
    next_id: u64,
    allocations: HashMap<AllocationId, Allocation>,
    by_client: HashMap<SocketAddr, AllocationId>,
    per_user: HashMap<Box<str>, usize>,
    pending_binds: usize,
    /// One entry per allocation: its bind deadline while pending, else its expiry.
    deadlines: BTreeSet<(Instant, AllocationId)>,
    transmits: VecDeque<RelayTransmit>,
    events: VecDeque<RelayEvent>,
    stats: RelayStats,
}

impl fmt::Debug for Relay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Relay")
            .field("allocations", &self.allocations.len())
            .field("pending_binds", &self.pending_binds)
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// A relay that checks credentials against `secret` (see [`turn_credentials`]) and
    /// draws its nonce key and indication transaction ids from `seed`. `unix_s_at_now` is
    /// the wall clock (unix seconds) at `now`, for credential and nonce expiry.
    pub fn new(
        config: RelayConfig,
        secret: [u8; 32],
        seed: [u8; 32],
        now: Instant,
        unix_s_at_now: u64,
    ) -> Relay {
        let mut rng = ChaCha20Rng::from_seed(seed);
        let mut nonce_key = [0u8; 32];
        rng.fill_bytes(&mut nonce_key);
        Relay {
            config,
            secret,
            nonce_key,
            rng,
            start: now,
            unix_at_start: unix_s_at_now,
            next_id: 1,
            allocations: HashMap::new(),
            by_client: HashMap::new(),
            per_user: HashMap::new(),
            pending_binds: 0,
            deadlines: BTreeSet::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            stats: RelayStats::default(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &RelayConfig {
        &self.config
    }

    /// Counters.
    pub fn stats(&self) -> &RelayStats {
        &self.stats
    }

    /// Allocations alive (including those waiting for their socket).
    pub fn allocation_count(&self) -> usize {
        self.allocations.len()
    }

    /// The relayed address of allocation `id`, once bound.
    pub fn relayed_addr(&self, id: AllocationId) -> Option<SocketAddr> {
        self.allocations.get(&id).and_then(Allocation::relayed)
    }

    /// The next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<RelayTransmit> {
        self.transmits.pop_front()
    }

    /// The next event for the glue.
    pub fn poll_event(&mut self) -> Option<RelayEvent> {
        self.events.pop_front()
    }

    /// When [`Relay::handle_timeout`] should next be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.deadlines.first().map(|(at, _)| *at)
    }

    /// Expires allocations whose lifetime (or bind deadline) has passed. Permissions and
    /// channels expire by their timestamps and are purged when their slot is needed.
    pub fn handle_timeout(&mut self, now: Instant) {
        while let Some(&(at, id)) = self.deadlines.first() {
            if at > now {
                break;
            }
            self.deadlines.pop_first();
            let Some(a) = self.allocations.get_mut(&id) else {
                continue;
            };
            match a.state {
                AllocState::Pending { .. } => {
                    // The glue never answered: give up; the client retransmits or retries.
                    tracing::debug!(%id, "relayed socket not bound in time");
                    self.remove(id);
                }
                AllocState::Bound(_) if a.expires_at <= now => {
                    tracing::debug!(%id, "allocation expired");
                    self.remove(id);
                }
                AllocState::Bound(_) => {
                    a.deadline = a.expires_at;
                    self.deadlines.insert((a.expires_at, id));
                }
            }
        }
    }

    /// The glue opened allocation `id`'s socket at `addr` (the address peers will see):
    /// the client gets its Allocate success response.
    pub fn relayed_bound(&mut self, now: Instant, id: AllocationId, addr: SocketAddr) {
        let Some(a) = self.allocations.get_mut(&id) else {
            return;
        };
        let AllocState::Pending {
            lifetime,
            fingerprint,
        } = a.state
        else {
            return;
        };
        if RelayFamily::of(&addr) != a.family {
            self.relay_bind_failed(now, id, RelayBindFailure::AddressFamily);
            return;
        }
        self.pending_binds = self.pending_binds.saturating_sub(1);
        a.state = AllocState::Bound(addr);
        a.expires_at = now + lifetime;
        self.deadlines.remove(&(a.deadline, id));
        a.deadline = a.expires_at;
        self.deadlines.insert((a.deadline, id));
        self.stats.allocations_created += 1;
        tracing::debug!(%id, "allocation bound");
        let client = a.client;
        let txid = a.alloc_txid;
        let reply = allocate_success(
            &self.config.software,
            txid,
            addr,
            client,
            lifetime,
            &a.key,
            fingerprint,
        );
        if let Some(reply) = reply {
            self.transmit(RelaySocket::Listen, client, reply);
        }
    }

    /// The glue could not open allocation `id`'s socket: the client gets 440 or 508 and
    /// the allocation is dropped (an [`RelayEvent::AllocationExpired`] follows).
    pub fn relay_bind_failed(&mut self, _now: Instant, id: AllocationId, why: RelayBindFailure) {
        let Some(a) = self.allocations.get(&id) else {
            return;
        };
        let AllocState::Pending { fingerprint, .. } = a.state else {
            return;
        };
        let code = match why {
            RelayBindFailure::AddressFamily => ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED,
            RelayBindFailure::Unavailable => ErrorCode::INSUFFICIENT_CAPACITY,
        };
        let head = header(MessageClass::Error, ALLOCATE, a.alloc_txid);
        let reply = self.error_reply(head, code, Some(&a.key), fingerprint);
        let client = a.client;
        if let Some(reply) = reply {
            self.transmit(RelaySocket::Listen, client, reply);
        }
        self.remove(id);
    }

    /// A datagram from `from` on the relay's listening port.
    pub fn handle_client(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.stats.client_datagrams += 1;
        self.reap(now, from);
        match bytes.first() {
            // ChannelData: the first two bits are 01 (RFC 8656 section 12.4).
            Some(b) if b & 0xC0 == 0x40 => self.client_channel_data(now, from, bytes),
            // STUN: the first two bits are 00.
            Some(b) if b & 0xC0 == 0 => match Message::from_bytes(bytes) {
                Ok(msg) => self.client_stun(now, from, &msg),
                Err(_) => self.stats.dropped += 1,
            },
            _ => self.stats.dropped += 1,
        }
    }

    /// A datagram from `from` on allocation `id`'s relayed socket.
    pub fn handle_peer(&mut self, now: Instant, id: AllocationId, from: SocketAddr, bytes: &[u8]) {
        self.stats.peer_datagrams += 1;
        let Some(a) = self.allocations.get(&id) else {
            self.stats.dropped += 1;
            return;
        };
        if a.expires_at <= now || a.relayed().is_none() || bytes.len() > MAX_RELAY_PAYLOAD {
            self.stats.dropped += 1;
            return;
        }
        let from = SocketAddr::new(from.ip().to_canonical(), from.port());
        if !a.permitted(now, from.ip()) {
            // RFC 8656 section 10.3: no permission, silently discard.
            self.stats.dropped += 1;
            return;
        }
        let client = a.client;
        let payload = if let Some(ch) = a.channel_by_peer(now, from) {
            let mut out = Vec::with_capacity(4 + bytes.len());
            out.extend_from_slice(&ch.number.to_be_bytes());
            // MAX_RELAY_PAYLOAD < 65536, so the length fits.
            out.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            out.extend_from_slice(bytes);
            Some(out)
        } else {
            let txid = self.random_txid();
            data_indication(txid, from, bytes)
        };
        match payload {
            Some(p) => {
                self.stats.relayed_to_clients += 1;
                self.stats.relayed_bytes += bytes.len() as u64;
                self.transmit(RelaySocket::Listen, client, p);
            }
            None => self.stats.dropped += 1,
        }
    }

    // ----- client side -----

    fn client_channel_data(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        let Ok(cd) = ChannelData::parse(bytes) else {
            self.stats.dropped += 1;
            return;
        };
        let target = self
            .by_client
            .get(&from)
            .and_then(|id| self.allocations.get(id).map(|a| (*id, a)))
            .and_then(|(id, a)| {
                let ch = a.channel_by_number(now, cd.id())?;
                a.permitted(now, ch.peer.ip()).then_some((id, ch.peer))
            });
        match target {
            Some((id, peer)) => self.relay_to_peer(id, peer, cd.data()),
            None => self.stats.dropped += 1,
        }
    }

    fn client_stun(&mut self, now: Instant, from: SocketAddr, msg: &Message<'_>) {
        match msg.class() {
            MessageClass::Request => self.request(now, from, msg),
            MessageClass::Indication if msg.has_method(SEND) => {
                self.send_indication(now, from, msg)
            }
            // Responses and other indications: nothing to do (and never answer them).
            _ => self.stats.dropped += 1,
        }
    }

    fn send_indication(&mut self, now: Instant, from: SocketAddr, msg: &Message<'_>) {
        let target = self.by_client.get(&from).copied().and_then(|id| {
            let a = self.allocations.get(&id)?;
            a.relayed()?;
            let peer = msg.attribute::<XorPeerAddress>().ok()?;
            let peer = peer.addr(msg.transaction_id());
            let peer = SocketAddr::new(peer.ip().to_canonical(), peer.port());
            a.permitted(now, peer.ip()).then_some((id, peer))
        });
        let Some((id, peer)) = target else {
            self.stats.dropped += 1;
            return;
        };
        match msg.attribute::<Data>() {
            Ok(data) => self.relay_to_peer(id, peer, data.data()),
            Err(_) => self.stats.dropped += 1,
        }
    }

    fn relay_to_peer(&mut self, id: AllocationId, peer: SocketAddr, data: &[u8]) {
        self.stats.relayed_to_peers += 1;
        self.stats.relayed_bytes += data.len() as u64;
        self.transmit(RelaySocket::Relayed(id), peer, data.to_vec());
    }

    fn request(&mut self, now: Instant, from: SocketAddr, msg: &Message<'_>) {
        self.stats.requests += 1;
        let method = msg.method();
        let fingerprint = msg.has_attribute(Fingerprint::TYPE);
        let head = header(MessageClass::Error, method, msg.transaction_id());
        if method == BINDING {
            // A plain STUN Binding, as on the supernode's port; no credentials needed.
            if let Some(r) = crate::stun::answer(msg.as_bytes(), from) {
                self.transmit(RelaySocket::Listen, from, r);
            }
            return;
        }
        if ![ALLOCATE, REFRESH, CREATE_PERMISSION, CHANNEL_BIND].contains(&method) {
            let r = self.error_reply(head, ErrorCode::BAD_REQUEST, None, fingerprint);
            self.reply(from, r);
            return;
        }
        let auth = match self.authenticate(now, from, msg) {
            Ok(a) => a,
            Err(failure) => {
                self.stats.auth_failures += 1;
                let r = match failure {
                    AuthFailure::BadRequest => {
                        self.error_reply(head, ErrorCode::BAD_REQUEST, None, fingerprint)
                    }
                    AuthFailure::Unauthorized => {
                        self.challenge(now, from, head, ErrorCode::UNAUTHORIZED, fingerprint)
                    }
                    AuthFailure::StaleNonce => {
                        self.challenge(now, from, head, ErrorCode::STALE_NONCE, fingerprint)
                    }
                };
                self.reply(from, r);
                return;
            }
        };
        let unknown: Vec<AttributeType> = msg
            .iter_attributes()
            .map(|(_, a)| a.get_type())
            .filter(|t| t.comprehension_required() && !KNOWN_ATTRIBUTES.contains(t))
            .take(16)
            .collect();
        if !unknown.is_empty() {
            let r = self.unknown_attributes_reply(head, &unknown, &auth.key, fingerprint);
            self.reply(from, r);
            return;
        }
        if method == ALLOCATE {
            self.allocate(now, from, msg, auth, fingerprint);
            return;
        }
        let result = if method == REFRESH {
            self.refresh(now, from, msg, &auth)
        } else if method == CREATE_PERMISSION {
            self.create_permission(now, from, msg, &auth)
        } else {
            self.channel_bind(now, from, msg, &auth)
        };
        let r = match result {
            Ok(attrs) => {
                let head = header(MessageClass::Success, method, msg.transaction_id());
                self.success_reply(head, &attrs, &auth.key, fingerprint)
            }
            Err(code) => self.error_reply(head, code, Some(&auth.key), fingerprint),
        };
        self.reply(from, r);
    }

    /// Long-term credential check (RFC 8489 section 9.2.4) with REST-style usernames.
    fn authenticate(
        &self,
        now: Instant,
        from: SocketAddr,
        msg: &Message<'_>,
    ) -> Result<Auth, AuthFailure> {
        if !msg.has_attribute(MessageIntegrity::TYPE) {
            return Err(AuthFailure::Unauthorized);
        }
        let (Ok(username), Ok(realm), Ok(nonce)) = (
            msg.attribute::<Username>(),
            msg.attribute::<Realm>(),
            msg.attribute::<Nonce>(),
        ) else {
            return Err(AuthFailure::BadRequest);
        };
        if !self.nonce_valid(now, from, nonce.nonce()) {
            return Err(AuthFailure::StaleNonce);
        }
        if realm.realm() != self.config.realm {
            return Err(AuthFailure::Unauthorized);
        }
        let username = username.username();
        let Some((expiry, user)) = parse_username(username) else {
            return Err(AuthFailure::Unauthorized);
        };
        if expiry <= self.unix_now(now) {
            return Err(AuthFailure::Unauthorized);
        }
        // The allocation of this 5-tuple caches its key, so refreshes and permissions do
        // not recompute HMAC and MD5.
        let cached = self
            .by_client
            .get(&from)
            .and_then(|id| self.allocations.get(id))
            .filter(|a| &*a.username == username)
            .map(|a| a.key.clone());
        let key = cached.unwrap_or_else(|| {
            LongTermKeyCredentials::new(
                username.to_owned(),
                password_for(&self.secret, username),
                self.config.realm.clone(),
            )
            .make_key(IntegrityAlgorithm::Sha1)
        });
        match msg.validate_integrity_with_key(&key) {
            Ok(_) => Ok(Auth {
                key,
                username: username.to_owned(),
                user: user.to_owned(),
            }),
            Err(_) => Err(AuthFailure::Unauthorized),
        }
    }

    fn allocate(
        &mut self,
        now: Instant,
        from: SocketAddr,
        msg: &Message<'_>,
        auth: Auth,
        fingerprint: bool,
    ) {
        let txid = msg.transaction_id();
        let head = header(MessageClass::Error, ALLOCATE, txid);
        if let Some(id) = self.by_client.get(&from).copied() {
            let Some(a) = self.allocations.get(&id) else {
                return;
            };
            if a.alloc_txid != txid {
                let r = self.error_reply(
                    head,
                    ErrorCode::ALLOCATION_MISMATCH,
                    Some(&auth.key),
                    fingerprint,
                );
                self.reply(from, r);
            } else if let AllocState::Bound(relayed) = a.state {
                // A retransmission: the same success again (RFC 8656 section 7.2).
                let left = a.expires_at.saturating_duration_since(now);
                let r = allocate_success(
                    &self.config.software,
                    txid,
                    relayed,
                    from,
                    left,
                    &a.key,
                    fingerprint,
                );
                self.reply(from, r);
            }
            // Else still waiting for the socket: the answer is on its way.
            return;
        }
        let code = match msg.attribute::<RequestedTransport>() {
            Err(_) => Some(ErrorCode::BAD_REQUEST),
            Ok(t) if t.protocol() != RequestedTransport::UDP => {
                Some(ErrorCode::UNSUPPORTED_TRANSPORT_PROTOCOL)
            }
            Ok(_) => None,
        };
        let family = match msg.attribute::<RequestedAddressFamily>() {
            Ok(f) if f.family() == AddressFamily::IPV6 => Ok(RelayFamily::V6),
            Ok(_) => Ok(RelayFamily::V4),
            Err(stun_types::message::StunParseError::MissingAttribute(_)) => Ok(RelayFamily::V4),
            Err(_) => Err(ErrorCode::BAD_REQUEST),
        };
        let lifetime = match msg.attribute::<Lifetime>() {
            Ok(l) => self.grant(l.seconds()),
            Err(_) => self.config.default_lifetime,
        };
        let user_count = self.per_user.get(auth.user.as_str()).copied().unwrap_or(0);
        let capacity = if user_count >= self.config.max_allocations_per_user {
            Some(ErrorCode::ALLOCATION_QUOTA_REACHED)
        } else if self.allocations.len() >= self.config.max_allocations
            || self.pending_binds >= self.config.max_pending_binds
        {
            Some(ErrorCode::INSUFFICIENT_CAPACITY)
        } else {
            None
        };
        let code = code.or(family.err()).or(capacity);
        let family = match (code, family) {
            (None, Ok(f)) => f,
            (code, _) => {
                let code = code.unwrap_or(ErrorCode::BAD_REQUEST);
                let r = self.error_reply(head, code, Some(&auth.key), fingerprint);
                self.reply(from, r);
                return;
            }
        };
        let id = AllocationId(self.next_id);
        self.next_id += 1;
        let deadline = now + self.config.bind_timeout;
        let user: Box<str> = auth.user.into();
        *self.per_user.entry(user.clone()).or_insert(0) += 1;
        self.pending_binds += 1;
        self.allocations.insert(
            id,
            Allocation {
                client: from,
                user,
                username: auth.username.into(),
                key: auth.key,
                family,
                alloc_txid: txid,
                state: AllocState::Pending {
                    lifetime,
                    fingerprint,
                },
                expires_at: deadline,
                deadline,
                permissions: Vec::new(),
                channels: Vec::new(),
            },
        );
        self.by_client.insert(from, id);
        self.deadlines.insert((deadline, id));
        tracing::debug!(%id, "allocation requested");
        self.events.push_back(RelayEvent::AllocationCreated {
            id,
            client: from,
            family,
        });
    }

    /// The allocation of this 5-tuple for an authenticated request, or the error code.
    fn own_allocation(&self, from: SocketAddr, auth: &Auth) -> Result<AllocationId, u16> {
        let id = self
            .by_client
            .get(&from)
            .copied()
            .ok_or(ErrorCode::ALLOCATION_MISMATCH)?;
        let a = self
            .allocations
            .get(&id)
            .ok_or(ErrorCode::ALLOCATION_MISMATCH)?;
        if a.relayed().is_none() {
            return Err(ErrorCode::ALLOCATION_MISMATCH);
        }
        if *a.username != *auth.username {
            return Err(ErrorCode::WRONG_CREDENTIALS);
        }
        Ok(id)
    }

    fn refresh(
        &mut self,
        now: Instant,
        from: SocketAddr,
        msg: &Message<'_>,
        auth: &Auth,
    ) -> Result<Vec<Attr>, u16> {
        let id = self.own_allocation(from, auth)?;
        let requested = match msg.attribute::<Lifetime>() {
            Ok(l) => Some(l.seconds()),
            Err(_) => None,
        };
        let lifetime = match requested {
            Some(0) => Duration::ZERO,
            Some(s) => self.grant(s),
            None => self.config.default_lifetime,
        };
        let a = self
            .allocations
            .get_mut(&id)
            .ok_or(ErrorCode::ALLOCATION_MISMATCH)?;
        if let Ok(f) = msg.attribute::<RequestedAddressFamily>() {
            let f = if f.family() == AddressFamily::IPV6 {
                RelayFamily::V6
            } else {
                RelayFamily::V4
            };
            if f != a.family {
                return Err(ErrorCode::PEER_ADDRESS_FAMILY_MISMATCH);
            }
        }
        if lifetime.is_zero() {
            tracing::debug!(%id, "allocation deleted by the client");
            self.remove(id);
        } else {
            a.expires_at = now + lifetime;
            self.deadlines.remove(&(a.deadline, id));
            a.deadline = a.expires_at;
            self.deadlines.insert((a.deadline, id));
        }
        Ok(vec![Attr::Lifetime(secs(lifetime))])
    }

    /// The peer addresses of a request, checked against the allocation's family and the
    /// peer policy.
    fn peers(&self, msg: &Message<'_>, family: RelayFamily) -> Result<Vec<SocketAddr>, u16> {
        let txid = msg.transaction_id();
        let mut peers = Vec::new();
        for n in 0..MAX_PEERS_PER_REQUEST {
            match msg.nth_attribute::<XorPeerAddress>(n) {
                Ok(p) => {
                    let p = p.addr(txid);
                    peers.push(SocketAddr::new(p.ip().to_canonical(), p.port()));
                }
                Err(stun_types::message::StunParseError::MissingAttribute(_)) => break,
                Err(_) => return Err(ErrorCode::BAD_REQUEST),
            }
        }
        if peers.is_empty() {
            return Err(ErrorCode::BAD_REQUEST);
        }
        if peers.iter().any(|p| RelayFamily::of(p) != family) {
            return Err(ErrorCode::PEER_ADDRESS_FAMILY_MISMATCH);
        }
        if !peers.iter().all(|p| self.peer_allowed(p.ip())) {
            return Err(ErrorCode::FORBIDDEN);
        }
        Ok(peers)
    }

    fn create_permission(
        &mut self,
        now: Instant,
        from: SocketAddr,
        msg: &Message<'_>,
        auth: &Auth,
    ) -> Result<Vec<Attr>, u16> {
        let id = self.own_allocation(from, auth)?;
        let family = self
            .allocations
            .get(&id)
            .map(|a| a.family)
            .ok_or(ErrorCode::ALLOCATION_MISMATCH)?;
        let peers = self.peers(msg, family)?;
        let (max, life) = (self.config.max_permissions, self.config.permission_lifetime);
        let a = self
            .allocations
            .get_mut(&id)
            .ok_or(ErrorCode::ALLOCATION_MISMATCH)?;
        a.permissions.retain(|p| p.expires_at > now);
        let new = peers
            .iter()
            .filter(|p| !a.permissions.iter().any(|q| q.ip == p.ip()))
            .map(|p| p.ip())
            .collect::<BTreeSet<_>>();
        if a.permissions.len() + new.len() > max {
            return Err(ErrorCode::INSUFFICIENT_CAPACITY);
        }
        for p in &peers {
            install_permission(a, p.ip(), now + life);
        }
        Ok(Vec::new())
    }

    fn channel_bind(
        &mut self,
        now: Instant,
        from: SocketAddr,
        msg: &Message<'_>,
        auth: &Auth,
    ) -> Result<Vec<Attr>, u16> {
        let id = self.own_allocation(from, auth)?;
        let number = msg
            .attribute::<ChannelNumber>()
            .map_err(|_| ErrorCode::BAD_REQUEST)?
            .channel();
        if !CHANNEL_NUMBERS.contains(&number) {
            return Err(ErrorCode::BAD_REQUEST);
        }
        let family = self
            .allocations
            .get(&id)
            .map(|a| a.family)
            .ok_or(ErrorCode::ALLOCATION_MISMATCH)?;
        let peers = self.peers(msg, family)?;
        let [peer] = peers[..] else {
            return Err(ErrorCode::BAD_REQUEST);
        };
        let cfg = &self.config;
        let (max_ch, max_perm) = (cfg.max_channels, cfg.max_permissions);
        let (ch_life, perm_life) = (cfg.channel_lifetime, cfg.permission_lifetime);
        let a = self
            .allocations
            .get_mut(&id)
            .ok_or(ErrorCode::ALLOCATION_MISMATCH)?;
        // Channels stay reserved for CHANNEL_QUARANTINE after they expire.
        a.channels
            .retain(|c| c.expires_at + CHANNEL_QUARANTINE > now);
        a.permissions.retain(|p| p.expires_at > now);
        let by_number = a.channels.iter().position(|c| c.number == number);
        let by_peer = a.channels.iter().position(|c| c.peer == peer);
        let slot = match (by_number, by_peer) {
            (Some(i), Some(j)) if i == j => Some(i),
            // The number is bound to another peer, or the peer to another number.
            (Some(_), _) | (_, Some(_)) => return Err(ErrorCode::BAD_REQUEST),
            (None, None) => None,
        };
        let needs_permission = !a.permissions.iter().any(|p| p.ip == peer.ip());
        if (slot.is_none() && a.channels.len() >= max_ch)
            || (needs_permission && a.permissions.len() >= max_perm)
        {
            return Err(ErrorCode::INSUFFICIENT_CAPACITY);
        }
        match slot.and_then(|i| a.channels.get_mut(i)) {
            Some(c) => c.expires_at = now + ch_life,
            None => a.channels.push(Channel {
                number,
                peer,
                expires_at: now + ch_life,
            }),
        }
        install_permission(a, peer.ip(), now + perm_life);
        Ok(Vec::new())
    }

    // ----- helpers -----

    fn grant(&self, requested_s: u32) -> Duration {
        Duration::from_secs(u64::from(requested_s))
            .clamp(self.config.default_lifetime, self.config.max_lifetime)
    }

    fn unix_now(&self, now: Instant) -> u64 {
        self.unix_at_start
            .saturating_add(now.saturating_duration_since(self.start).as_secs())
    }

    fn peer_allowed(&self, ip: IpAddr) -> bool {
        match classify(ip) {
            PeerClass::Never => false,
            PeerClass::Loopback => self.config.allow_loopback_peers,
            PeerClass::Private => self.config.allow_private_peers,
            PeerClass::Public => true,
        }
    }

    /// A nonce: `<expiry unix seconds, hex>.<MAC over it and the client address, hex>`.
    fn make_nonce(&self, now: Instant, from: SocketAddr) -> String {
        let expiry = self
            .unix_now(now)
            .saturating_add(self.config.nonce_lifetime.as_secs().max(1));
        let mac = self.nonce_mac(expiry, from);
        format!("{expiry:x}.{}", hex::encode(&mac[..10]))
    }

    fn nonce_mac(&self, expiry: u64, from: SocketAddr) -> [u8; 20] {
        let ip = match from.ip().to_canonical() {
            IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
            IpAddr::V6(v6) => v6.octets(),
        };
        hmac_sha1(
            &self.nonce_key,
            &[
                b"peerline-turn-nonce",
                &expiry.to_be_bytes(),
                &ip,
                &from.port().to_be_bytes(),
            ],
        )
    }

    fn nonce_valid(&self, now: Instant, from: SocketAddr, nonce: &str) -> bool {
        let Some((expiry, mac)) = nonce.split_once('.') else {
            return false;
        };
        if expiry.is_empty() || expiry.len() > 16 || mac.len() != 20 {
            return false;
        }
        let Ok(expiry) = u64::from_str_radix(expiry, 16) else {
            return false;
        };
        let mut given = [0u8; 10];
        for (i, g) in given.iter_mut().enumerate() {
            let Some(Ok(b)) = mac.get(2 * i..2 * i + 2).map(|h| u8::from_str_radix(h, 16)) else {
                return false;
            };
            *g = b;
        }
        let want = self.nonce_mac(expiry, from);
        // Constant-time comparison of the truncated MAC.
        let diff = want[..10]
            .iter()
            .zip(given.iter())
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        diff == 0 && expiry > self.unix_now(now)
    }

    fn random_txid(&mut self) -> TransactionId {
        let mut b = [0u8; 16];
        self.rng.fill_bytes(&mut b);
        TransactionId::from(u128::from_be_bytes(b))
    }

    /// Removes an allocation expired at `now` that belongs to `from`, so a new Allocate
    /// from the same 5-tuple is not refused with 437 before the timer ran.
    fn reap(&mut self, now: Instant, from: SocketAddr) {
        let expired = self
            .by_client
            .get(&from)
            .and_then(|id| self.allocations.get(id).map(|a| (*id, a)))
            .filter(|(_, a)| a.expires_at <= now)
            .map(|(id, _)| id);
        if let Some(id) = expired {
            self.remove(id);
        }
    }

    fn remove(&mut self, id: AllocationId) {
        let Some(a) = self.allocations.remove(&id) else {
            return;
        };
        self.deadlines.remove(&(a.deadline, id));
        if self.by_client.get(&a.client) == Some(&id) {
            self.by_client.remove(&a.client);
        }
        if let AllocState::Pending { .. } = a.state {
            self.pending_binds = self.pending_binds.saturating_sub(1);
        }
        if let Some(n) = self.per_user.get_mut(&a.user) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.per_user.remove(&a.user);
            }
        }
        self.events.push_back(RelayEvent::AllocationExpired { id });
    }

    fn transmit(&mut self, socket: RelaySocket, dst: SocketAddr, payload: Vec<u8>) {
        if self.transmits.len() >= self.config.max_queued_transmits {
            self.stats.dropped += 1;
            return;
        }
        self.transmits.push_back(RelayTransmit {
            socket,
            dst,
            payload,
        });
    }

    fn reply(&mut self, to: SocketAddr, reply: Option<Vec<u8>>) {
        if let Some(r) = reply {
            self.transmit(RelaySocket::Listen, to, r);
        }
    }

    fn start_reply(&self, head: MessageType, txid: TransactionId) -> Option<MessageWriteVec> {
        let mut w = Message::builder(head, txid, MessageWriteVec::with_capacity(128));
        if !self.config.software.is_empty() {
            w.add_attribute(&Software::new(&self.config.software).ok()?)
                .ok()?;
        }
        Some(w)
    }

    /// An error response; signed when the request was authenticated (`key`).
    fn error_reply(
        &self,
        head: (MessageType, TransactionId),
        code: u16,
        key: Option<&IntegrityKey>,
        fingerprint: bool,
    ) -> Option<Vec<u8>> {
        let mut w = self.start_reply(head.0, head.1)?;
        w.add_attribute(&ErrorCode::builder(code).build().ok()?)
            .ok()?;
        finish(w, key, fingerprint)
    }

    /// 401 or 438 with REALM and a fresh NONCE (never signed).
    fn challenge(
        &self,
        now: Instant,
        from: SocketAddr,
        head: (MessageType, TransactionId),
        code: u16,
        fingerprint: bool,
    ) -> Option<Vec<u8>> {
        let mut w = self.start_reply(head.0, head.1)?;
        w.add_attribute(&ErrorCode::builder(code).build().ok()?)
            .ok()?;
        w.add_attribute(&Realm::new(&self.config.realm).ok()?)
            .ok()?;
        w.add_attribute(&Nonce::new(&self.make_nonce(now, from)).ok()?)
            .ok()?;
        finish(w, None, fingerprint)
    }

    fn unknown_attributes_reply(
        &self,
        head: (MessageType, TransactionId),
        unknown: &[AttributeType],
        key: &IntegrityKey,
        fingerprint: bool,
    ) -> Option<Vec<u8>> {
        let mut w = self.start_reply(head.0, head.1)?;
        w.add_attribute(
            &ErrorCode::builder(ErrorCode::UNKNOWN_ATTRIBUTE)
                .build()
                .ok()?,
        )
        .ok()?;
        w.add_attribute(&UnknownAttributes::new(unknown)).ok()?;
        finish(w, Some(key), fingerprint)
    }

    fn success_reply(
        &self,
        head: (MessageType, TransactionId),
        attrs: &[Attr],
        key: &IntegrityKey,
        fingerprint: bool,
    ) -> Option<Vec<u8>> {
        let mut w = self.start_reply(head.0, head.1)?;
        for a in attrs {
            match a {
                Attr::Lifetime(s) => w.add_attribute(&Lifetime::new(*s)).ok()?,
            }
        }
        finish(w, Some(key), fingerprint)
    }
}

/// Attributes of a success response built by a method handler.
enum Attr {
    Lifetime(u32),
}

fn header(
    class: MessageClass,
    method: Method,
    txid: TransactionId,
) -> (MessageType, TransactionId) {
    (MessageType::from_class_method(class, method), txid)
}

fn secs(d: Duration) -> u32 {
    u32::try_from(d.as_secs()).unwrap_or(u32::MAX)
}

fn finish(
    mut w: MessageWriteVec,
    key: Option<&IntegrityKey>,
    fingerprint: bool,
) -> Option<Vec<u8>> {
    if let Some(key) = key {
        w.add_message_integrity_with_key(key, IntegrityAlgorithm::Sha1)
            .ok()?;
    }
    if fingerprint {
        w.add_fingerprint().ok()?;
    }
    Some(w.finish())
}

fn allocate_success(
    software: &str,
    txid: TransactionId,
    relayed: SocketAddr,
    client: SocketAddr,
    lifetime: Duration,
    key: &IntegrityKey,
    fingerprint: bool,
) -> Option<Vec<u8>> {
    let head = MessageType::from_class_method(MessageClass::Success, ALLOCATE);
    let mut w = Message::builder(head, txid, MessageWriteVec::with_capacity(128));
    if !software.is_empty() {
        w.add_attribute(&Software::new(software).ok()?).ok()?;
    }
    w.add_attribute(&XorRelayedAddress::new(relayed, txid))
        .ok()?;
    w.add_attribute(&Lifetime::new(secs(lifetime))).ok()?;
    w.add_attribute(&XorMappedAddress::new(client, txid)).ok()?;
    finish(w, Some(key), fingerprint)
}

fn data_indication(txid: TransactionId, peer: SocketAddr, data: &[u8]) -> Option<Vec<u8>> {
    if data.len() > MAX_RELAY_PAYLOAD {
        return None;
    }
    let head = MessageType::from_class_method(MessageClass::Indication, DATA);
    let mut w = Message::builder(head, txid, MessageWriteVec::with_capacity(48 + data.len()));
    w.add_attribute(&XorPeerAddress::new(peer, txid)).ok()?;
    // Data::new panics above 65535 bytes; MAX_RELAY_PAYLOAD keeps it below.
    w.add_attribute(&Data::new(data)).ok()?;
    Some(w.finish())
}

fn install_permission(a: &mut Allocation, ip: IpAddr, expires_at: Instant) {
    let ip = ip.to_canonical();
    match a.permissions.iter_mut().find(|p| p.ip == ip) {
        Some(p) => p.expires_at = expires_at,
        None => a.permissions.push(Permission { ip, expires_at }),
    }
}

enum PeerClass {
    Never,
    Loopback,
    Private,
    Public,
}

fn classify(ip: IpAddr) -> PeerClass {
    match ip.to_canonical() {
        IpAddr::V4(v4) => classify_v4(v4),
        IpAddr::V6(v6) => classify_v6(v6),
    }
}

fn classify_v4(ip: Ipv4Addr) -> PeerClass {
    let o = ip.octets();
    if ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast() || o[0] == 0 || o[0] >= 240 {
        PeerClass::Never
    } else if ip.is_loopback() {
        PeerClass::Loopback
    } else if ip.is_private() || ip.is_link_local() || (o[0] == 100 && (o[1] & 0xC0) == 64) {
        // RFC 1918, 169.254/16, and 100.64/10 (shared address space).
        PeerClass::Private
    } else {
        PeerClass::Public
    }
}

fn classify_v6(ip: Ipv6Addr) -> PeerClass {
    let s = ip.segments();
    if ip.is_unspecified() || ip.is_multicast() {
        PeerClass::Never
    } else if ip.is_loopback() {
        PeerClass::Loopback
    } else if (s[0] & 0xFE00) == 0xFC00 || (s[0] & 0xFFC0) == 0xFE80 {
        // Unique local fc00::/7 and link-local fe80::/10.
        PeerClass::Private
    } else {
        PeerClass::Public
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_match_coturn_rest_api() {
        // coturn: password = base64(hmac-sha1(secret, "<ts>:<user>")).
        let secret = [7u8; 32];
        let (u, p) = turn_credentials(&secret, "alice", 1_700_000_000);
        assert_eq!(u, "1700000000:alice");
        let mac = hmac_sha1(&secret, &[u.as_bytes()]);
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(&p)
                .expect("base64"),
            mac
        );
        assert_eq!(parse_username(&u), Some((1_700_000_000, "alice")));
        assert_eq!(parse_username("x:alice"), None);
        assert_eq!(parse_username("12:"), None);
        assert_eq!(parse_username("alice"), None);
    }

    #[test]
    fn peer_policy_classes() {
        let c = |s: &str| classify(s.parse().expect("ip"));
        assert!(matches!(c("0.0.0.0"), PeerClass::Never));
        assert!(matches!(c("224.0.0.1"), PeerClass::Never));
        assert!(matches!(c("255.255.255.255"), PeerClass::Never));
        assert!(matches!(c("127.0.0.1"), PeerClass::Loopback));
        assert!(matches!(c("::ffff:127.0.0.1"), PeerClass::Loopback));
        assert!(matches!(c("10.1.2.3"), PeerClass::Private));
        assert!(matches!(c("100.64.0.1"), PeerClass::Private));
        assert!(matches!(c("fd00::1"), PeerClass::Private));
        assert!(matches!(c("198.51.100.7"), PeerClass::Public));
        assert!(matches!(c("2001:db8::1"), PeerClass::Public));
    }

    #[test]
    fn nonces_are_bound_to_time_and_address() {
        let t0 = Instant::now();
        let r = Relay::new(RelayConfig::default(), [1; 32], [2; 32], t0, 1_000_000);
        let a: SocketAddr = "198.51.100.7:4000".parse().expect("addr");
        let b: SocketAddr = "198.51.100.7:4001".parse().expect("addr");
        let n = r.make_nonce(t0, a);
        assert!(r.nonce_valid(t0, a, &n));
        assert!(!r.nonce_valid(t0, b, &n));
        assert!(!r.nonce_valid(t0 + Duration::from_secs(3601), a, &n));
        assert!(!r.nonce_valid(t0, a, "garbage"));
        assert!(!r.nonce_valid(t0, a, "ffffffff.00000000000000000000"));
    }
}
