//! The supernode core: sessions, authentication, presence, contacts, search, rendezvous and
//! offline messages, as a sans-IO state machine.
//!
//! Drive it with [`Supernode::handle_datagram`], [`Supernode::handle_timeout`] and
//! [`Supernode::handle_op_result`]; drain [`Supernode::poll_transmit`] (datagrams),
//! [`Supernode::poll_op`] (storage operations to run, see [`crate::ops`]),
//! [`Supernode::poll_event`] and [`Supernode::poll_timeout`].
//!
//! Privacy: a user's addresses leave the supernode only inside a connection setup between
//! mutually accepted contacts, and only the callee's own client decides to answer one.
//! Search results, presence and contact events never carry addresses.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet, VecDeque};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use peerline_crypto::cert::CertRequest;
use peerline_crypto::cookie::{self, MacKeys};
use peerline_crypto::noise::Responder;
use peerline_crypto::{Authority, CertError, Certificate, ReplayWindow};
use peerline_wire::msg::{
    CallSignal, ContactEntry, ContactState, ErrorCode, Hello, Presence, Request, Response, Welcome,
    CONTACTS_PAGE, MAX_CANDIDATES, MAX_SEARCH_RESULTS,
};
use peerline_wire::packet::{Packet, RejectReason, TYPE_HANDSHAKE_INIT};
use peerline_wire::{Username, PROTOCOL_VERSION};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::calls::{CallKey, CallRefusal, Calls};
use crate::clock::WallClock;
use crate::directory::{Directory, Location};
use crate::limit::{source_key, Backoff, Limiter, Rate};
use crate::link::{Link, LinkConfig, LinkEvent, Transmit};
use crate::ops::{Notice, Op, OpError, OpResult};
use crate::store::{NewMessage, QueueOutcome, StoredMessage};

mod admission;
mod contacts;
mod fleet;

use admission::{Admission, Queued, Shed};
use contacts::ContactSet;
pub use fleet::{NodeDest, NodeTransmit};
use fleet::{RemoteSeen, RemoteWait};
use peerline_wire::node::NodeMsg;

/// Bounds and timings of a supernode.
#[derive(Debug, Clone)]
pub struct SupernodeConfig {
    /// This supernode's id in a fleet (0 alone).
    pub node_id: u32,
    /// Part of a fleet: users not online here may be online on another supernode, so
    /// signalling for them is forwarded (see [`Supernode::poll_node_msg`]).
    pub fleet: bool,
    /// How long a forwarded connection setup or call waits for the other supernode.
    pub remote_timeout: Duration,
    /// Validity of issued device certificates.
    pub cert_lifetime: Duration,
    /// Most sessions (authenticated or not) at once.
    pub max_sessions: usize,
    /// Most offline messages waiting per recipient.
    pub mailbox_quota: usize,
    /// Offline messages pushed per batch.
    pub delivery_batch: usize,
    /// Reset hints sent per second at most (answers to unknown session indexes).
    pub resets_per_second: u32,
    /// Storage operations waiting at once; beyond it requests get `Unavailable`.
    pub max_pending_ops: usize,
    /// The operator's TURN relay, if any: clients get time-limited credentials for it.
    pub relay: Option<RelayOffer>,
    /// Load thresholds, caps and rate limits against floods and abuse.
    pub limits: Limits,
    /// Expiries (session timers and half-open sessions) one
    /// [`Supernode::handle_timeout`] call handles at most: the rest wait for the next
    /// call, so a mass expiry never keeps the driver from reading its socket.
    pub timer_budget: usize,
    /// Queued handshake initiations one serving pass does at most (each costs a login's
    /// crypto, about 250 us): see [`Supernode::end_batch`]. Eight keep the socket read
    /// every 2 ms while logins queue (16 let keepalives of a storm wait 60 to 85 ms at
    /// p99, 8 about 30 ms, at the same login rate).
    pub handshake_budget: usize,
}

/// Load thresholds, caps and rate limits. Every per-key table is bounded by
/// `max_tracked_keys`; a [`Rate`] with `burst` 0 is no limit.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Handshake initiations per second beyond which the supernode is under load: it then
    /// answers initiations without a valid mac2 with a cookie reply, and does no
    /// Diffie-Hellman work for them.
    pub load_handshakes_per_second: u32,
    /// Half-open sessions (no authenticated packet from the client yet) at which the
    /// supernode is under load.
    pub load_half_open: usize,
    /// Most half-open sessions at once; further initiations are dropped.
    pub max_half_open: usize,
    /// A session that has sent no authenticated packet by then is dropped.
    pub half_open_ttl: Duration,
    /// Largest difference between a `Hello`'s clock and ours; beyond it the handshake is
    /// rejected as stale (a replay, or a wrong clock).
    pub max_clock_skew: Duration,
    /// Per source address, handshake initiations while under load (with a valid cookie).
    pub handshakes_per_source: Rate,
    /// Per source address, cookie replies while under load. A source over it gets no
    /// answer, which saves a send per datagram against a flood from few sources; when
    /// more sources flood than the table tracks, everyone gets cookies again.
    pub cookies_per_source: Rate,
    /// Per account, logins.
    pub logins_per_account: Rate,
    /// Per source address, registrations and enrolments (each costs an Argon2id hash).
    pub enrolments_per_source: Rate,
    /// Per account, searches (against enumerating usernames).
    pub searches_per_account: Rate,
    /// Per account, contact requests.
    pub contact_requests_per_account: Rate,
    /// Per account, offline messages.
    pub messages_per_account: Rate,
    /// Per account, connection setups.
    pub connects_per_account: Rate,
    /// Wrong passwords allowed, per account and per source, before each further one
    /// doubles the wait (1 s, 2 s, 4 s, ...).
    pub free_password_failures: u32,
    /// Longest wait after wrong passwords.
    pub max_password_backoff: Duration,
    /// Keys each limiter tracks at most.
    pub max_tracked_keys: usize,
    /// Handshake initiations waiting for their Diffie-Hellman work at most; beyond it,
    /// or when one would wait longer than `max_handshake_wait`, the initiation is
    /// answered at once with a `Busy` reject and a retry-after.
    pub max_queued_handshakes: usize,
    /// Longest an initiation may expect to wait in the queue (its position over the
    /// measured handshake rate); one that has waited twice this (at most 800 ms, as its
    /// client retries after 1 s) is shed when its turn comes.
    pub max_handshake_wait: Duration,
    /// `Busy` rejects sent per second at most (beyond it, shed initiations get no answer).
    pub busy_per_second: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            load_handshakes_per_second: 2_000,
            load_half_open: 2_000,
            max_half_open: 50_000,
            half_open_ttl: Duration::from_secs(10),
            max_clock_skew: Duration::from_secs(300),
            handshakes_per_source: Rate::new(20, 5.0),
            cookies_per_source: Rate::new(10, 2.0),
            logins_per_account: Rate::new(10, 0.2),
            enrolments_per_source: Rate::new(5, 0.2),
            searches_per_account: Rate::new(20, 0.5),
            contact_requests_per_account: Rate::new(20, 1.0 / 30.0),
            messages_per_account: Rate::new(200, 20.0),
            connects_per_account: Rate::new(50, 5.0),
            free_password_failures: 5,
            max_password_backoff: Duration::from_secs(15 * 60),
            max_tracked_keys: 100_000,
            max_queued_handshakes: 4096,
            max_handshake_wait: Duration::from_millis(250),
            busy_per_second: 50_000,
        }
    }
}

impl Limits {
    /// No rate limits and no cookies (for benchmarks that log in many users from one
    /// address); caps and the half-open expiry stay.
    pub fn off() -> Self {
        Limits {
            load_handshakes_per_second: u32::MAX,
            load_half_open: usize::MAX,
            handshakes_per_source: Rate::OFF,
            cookies_per_source: Rate::OFF,
            logins_per_account: Rate::OFF,
            enrolments_per_source: Rate::OFF,
            searches_per_account: Rate::OFF,
            contact_requests_per_account: Rate::OFF,
            messages_per_account: Rate::OFF,
            connects_per_account: Rate::OFF,
            free_password_failures: u32::MAX,
            ..Limits::default()
        }
    }
}

/// A relay the supernode hands out credentials for.
#[derive(Debug, Clone)]
pub struct RelayOffer {
    /// The relay's public address.
    pub server: SocketAddr,
    /// Secret shared with the relay (coturn's `static-auth-secret` style).
    pub secret: [u8; 32],
    /// Validity of issued credentials.
    pub lifetime: Duration,
}

impl Default for SupernodeConfig {
    fn default() -> Self {
        SupernodeConfig {
            node_id: 0,
            fleet: false,
            remote_timeout: Duration::from_secs(10),
            cert_lifetime: Duration::from_secs(24 * 3600),
            max_sessions: 1_000_000,
            mailbox_quota: 1000,
            delivery_batch: 32,
            resets_per_second: 2000,
            max_pending_ops: 10_000,
            relay: None,
            limits: Limits::default(),
            timer_budget: 2048,
            handshake_budget: 8,
        }
    }
}

/// Counters for metrics.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Pushes to clients that could be neither sent nor queued (settled as unanswered).
    pub pushes_dropped: u64,
    /// Datagrams received.
    pub datagrams_in: u64,
    /// Datagrams sent.
    pub datagrams_out: u64,
    /// Datagrams dropped as malformed, forged, replayed or unknown.
    pub dropped: u64,
    /// Completed handshakes.
    pub handshakes: u64,
    /// Logins (authenticated sessions).
    pub logins: u64,
    /// Requests handled.
    pub requests: u64,
    /// Offline messages accepted.
    pub messages_queued: u64,
    /// Offline messages delivered and acknowledged.
    pub messages_delivered: u64,
    /// STUN messages seen (Binding requests are answered).
    pub stun: u64,
    /// Calls rung (the callee's device answered the invite).
    pub calls_rung: u64,
    /// Messages received from other supernodes of the fleet.
    pub node_msgs: u64,
    /// Requests from clients by kind, indexed like [`peerline_wire::msg::REQUEST_KINDS`].
    pub requests_by_kind: [u64; peerline_wire::msg::REQUEST_KINDS.len()],
    /// Drops by reason, indexed by [`DropReason::index`]; they add up to `dropped`.
    pub drops: [u64; DropReason::ALL.len()],
    /// Cookie replies sent (initiations answered without Diffie-Hellman work under load).
    pub cookies_sent: u64,
    /// Reject packets sent (wrong version, stale, rate-limited, revoked, busy).
    pub rejects_sent: u64,
    /// `Busy` rejects sent: initiations shed with a retry-after, without Diffie-Hellman.
    pub busy_sent: u64,
    /// Noise messages read by the responder: each one a login's Diffie-Hellman work.
    pub noise_reads: u64,
    /// Requests refused with `RateLimited` (searches, contact requests, messages, ...).
    pub rate_limited: u64,
}

impl Stats {
    /// Drops for one reason.
    pub fn drops_for(&self, r: DropReason) -> u64 {
        self.drops[r.index()]
    }
}

/// Why a datagram or handshake was dropped (metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropReason {
    /// Not a valid packet (decoder error).
    Malformed,
    /// A packet type the supernode does not take (responses, resets, probes, cookies).
    Unexpected,
    /// Transport packet for no session.
    UnknownSession,
    /// Transport packet that failed authentication, replay check or frame decoding.
    BadTransport,
    /// Handshake initiation with a wrong mac1.
    BadMac,
    /// Initiation under load without a valid cookie (a cookie reply was sent).
    CookieRequired,
    /// Over a rate limit.
    RateLimited,
    /// Session table or half-open table full.
    Capacity,
    /// A repeat of a recent initiation.
    Duplicate,
    /// Noise, `Hello` or certificate did not check out.
    BadHandshake,
    /// Another protocol version.
    Version,
    /// `Hello` clock too far from ours.
    Stale,
    /// A login not newer than the user's live session.
    OutdatedLogin,
    /// A login with a revoked device.
    Revoked,
    /// A half-open session that sent nothing in time.
    HalfOpenExpired,
    /// Initiation shed under overload: the handshake queue was full or too slow (a
    /// `Busy` reject was sent unless over its budget).
    Busy,
}

impl DropReason {
    /// Every reason, in index order.
    pub const ALL: [DropReason; 16] = [
        DropReason::Malformed,
        DropReason::Unexpected,
        DropReason::UnknownSession,
        DropReason::BadTransport,
        DropReason::BadMac,
        DropReason::CookieRequired,
        DropReason::RateLimited,
        DropReason::Capacity,
        DropReason::Duplicate,
        DropReason::BadHandshake,
        DropReason::Version,
        DropReason::Stale,
        DropReason::OutdatedLogin,
        DropReason::Revoked,
        DropReason::HalfOpenExpired,
        DropReason::Busy,
    ];

    /// Position in [`Stats::drops`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Metrics label.
    pub fn name(self) -> &'static str {
        match self {
            DropReason::Malformed => "malformed",
            DropReason::Unexpected => "unexpected",
            DropReason::UnknownSession => "unknown_session",
            DropReason::BadTransport => "bad_transport",
            DropReason::BadMac => "bad_mac",
            DropReason::CookieRequired => "cookie_required",
            DropReason::RateLimited => "rate_limited",
            DropReason::Capacity => "capacity",
            DropReason::Duplicate => "duplicate",
            DropReason::BadHandshake => "bad_handshake",
            DropReason::Version => "version",
            DropReason::Stale => "stale",
            DropReason::OutdatedLogin => "outdated_login",
            DropReason::Revoked => "revoked",
            DropReason::HalfOpenExpired => "half_open_expired",
            DropReason::Busy => "busy",
        }
    }
}

/// Something the driver may log or count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SupernodeEvent {
    /// A user came online.
    Login(Username),
    /// A user went offline.
    Logout(Username),
    /// A new account was created.
    Registered(Username),
}

#[derive(Debug)]
enum Auth {
    Anonymous,
    Expired,
    User(Box<Certificate>),
}

#[derive(Debug)]
struct Session {
    link: Link,
    auth: Auth,
    presence: Presence,
    /// Mutually accepted contacts (presence fan-out index).
    contacts: ContactSet,
    /// Store ids of offline messages pushed and not yet acknowledged.
    delivering: HashSet<u64>,
    /// Relay-only mode: never ring this user, nor ring anyone for them, for a direct
    /// session (that would reveal their address); contacts use the mailbox (and, once it
    /// exists, the relay).
    relay_only: bool,
    /// Strangers may ring this user, not only contacts.
    anyone_can_call: bool,
    /// Whether the last delivery batch was full (more may be waiting).
    more_waiting: bool,
    /// A delivery went unanswered: fetch the mailbox again once the client shows life.
    redeliver: bool,
    /// The client's clock in its hello: a login replaces an existing session of the same
    /// user only with a strictly newer hello, so a replayed handshake cannot evict it.
    hello_ms: u64,
    scheduled: Option<Instant>,
}

impl Session {
    fn user(&self) -> Option<&Username> {
        match &self.auth {
            Auth::User(c) => Some(c.username()),
            _ => None,
        }
    }
}

/// What to do when a storage operation completes.
#[derive(Debug)]
enum Waiting {
    /// Answer request `req` on `session` from the result.
    Reply { session: u32, req: u64 },
    /// A login's revocation check, contacts and mailbox.
    Login { session: u32 },
    /// An operator asked to check a logged-in device again (it may have been revoked).
    Recheck { session: u32 },
    /// Certificate issuance (register, enrol, renew).
    Certify {
        session: u32,
        req: u64,
        registered: bool,
        /// For an enrolment: the account and source whose wrong passwords are counted.
        password: Option<(Username, IpAddr)>,
    },
    /// Contact change: answer, then push notices.
    Contact { session: u32, req: u64 },
    /// Connection setup: after the contact check, ring the callee.
    Connect {
        session: u32,
        req: u64,
        to: Username,
        candidates: Vec<SocketAddr>,
        hard_nat: bool,
    },
    /// Call invite: after the callability check, ring the callee.
    Call {
        session: u32,
        req: u64,
        to: Username,
        call_id: u64,
    },
    /// Offline message queued: answer, then deliver if the recipient is online.
    Queue {
        session: u32,
        req: u64,
        msg: NewMessage,
    },
    /// Contact list page for `session`.
    List { session: u32, req: u64 },
    /// Waiting messages for `session`.
    Pending { session: u32 },
    /// Nothing to do (deletes).
    Nothing,
}

/// A push (supernode-initiated request) awaiting the client's answer.
#[derive(Debug)]
enum Push {
    Connect {
        caller: u32,
        req: u64,
        /// The session is for an answered call between strangers.
        call_only: bool,
    },
    /// `IncomingCall`: answer the caller's invite from the callee's answer.
    Ring {
        caller: u32,
        req: u64,
        key: CallKey,
    },
    Deliver {
        id: u64,
    },
    Info,
    /// `IncomingConnect` for a caller homed on supernode `node`.
    RemoteConnect {
        node: u32,
        token: u64,
        call_only: bool,
    },
    /// `IncomingCall` for a caller homed on supernode `node`.
    RemoteRing {
        node: u32,
        token: u64,
        key: CallKey,
    },
}

/// Calls known at once, in all (each costs about 100 bytes).
const MAX_CALLS: usize = 100_000;
/// Calls one user may have ringing or running at once.
const MAX_CALLS_PER_USER: usize = 4;

/// The supernode state machine.
pub struct Supernode {
    cfg: SupernodeConfig,
    static_private: [u8; 32],
    authority: Authority,
    authority_public: [u8; 32],
    clock: WallClock,
    rng: ChaCha20Rng,
    /// Boxed: a session is a few hundred bytes and the map keeps up to half its slots
    /// empty, which inline would cost more than the sessions themselves.
    sessions: HashMap<u32, Box<Session>>,
    /// The link configuration every client session shares.
    server_link: Arc<LinkConfig>,
    directory: Box<dyn Directory>,
    timers: BinaryHeap<Reverse<(Instant, u32)>>,
    ops: VecDeque<(u64, Op)>,
    next_token: u64,
    waiting: HashMap<u64, Waiting>,
    /// Pushes awaiting an answer, by (session, request id): ordered, so a session's own
    /// are found without scanning everyone's (logout used to scan them all).
    pushes: BTreeMap<(u32, u64), Push>,
    /// Pushes waiting for room on their session's link, by session (rarely any).
    queued_pushes: HashMap<u32, VecDeque<(Request, Push)>>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<SupernodeEvent>,
    reset_window: (Instant, u32),
    recent_inits: HashSet<[u8; 32]>,
    recent_order: VecDeque<[u8; 32]>,
    calls: Calls,
    stats: Stats,
    mac_keys: MacKeys,
    cookie_secret: [u8; 32],
    previous_secret: [u8; 32],
    secret_born: Instant,
    init_window: (Instant, u32),
    half_open: usize,
    half_open_queue: VecDeque<(Instant, u32)>,
    limiters: Limiters,
    last_prune: Instant,
    /// Messages for other supernodes of the fleet.
    node_out: VecDeque<NodeTransmit>,
    /// Forwarded setups and calls awaiting the other supernode's answer, by token.
    remote_waits: HashMap<u64, RemoteWait>,
    /// Their deadlines, in order (all share one timeout).
    remote_order: VecDeque<(Instant, u64)>,
    /// Presence of contacts homed on other supernodes, as last told.
    remote_seen: HashMap<Username, RemoteSeen>,
    /// Other supernodes of the fleet, least loaded first (for clients' host caches).
    hosts: Vec<SocketAddr>,
    /// Sessions still to be told about a changed host list.
    hosts_queue: VecDeque<u32>,
    /// Shutting down: logins are refused and users are sent elsewhere.
    draining: bool,
    /// Initiations waiting for their Diffie-Hellman work, and the Busy answers.
    admission: Admission,
    /// Inside [`Supernode::begin_batch`]: initiations wait for [`Supernode::end_batch`].
    in_batch: bool,
}

struct Limiters {
    handshakes: Limiter<IpAddr>,
    cookies: Limiter<IpAddr>,
    logins: Limiter<Username>,
    enrolments: Limiter<IpAddr>,
    searches: Limiter<Username>,
    contact_requests: Limiter<Username>,
    messages: Limiter<Username>,
    connects: Limiter<Username>,
    password_accounts: Backoff<Username>,
    password_sources: Backoff<IpAddr>,
}

impl Limiters {
    fn new(l: &Limits) -> Self {
        let k = l.max_tracked_keys;
        fn backoff<K: std::hash::Hash + Eq + Clone>(l: &Limits) -> Backoff<K> {
            Backoff::new(
                l.free_password_failures,
                l.max_password_backoff,
                Duration::from_secs(3600),
                l.max_tracked_keys,
            )
        }
        Limiters {
            handshakes: Limiter::new(l.handshakes_per_source, k),
            cookies: Limiter::new(l.cookies_per_source, k),
            logins: Limiter::new(l.logins_per_account, k),
            enrolments: Limiter::new(l.enrolments_per_source, k),
            searches: Limiter::new(l.searches_per_account, k),
            contact_requests: Limiter::new(l.contact_requests_per_account, k),
            messages: Limiter::new(l.messages_per_account, k),
            connects: Limiter::new(l.connects_per_account, k),
            password_accounts: backoff(l),
            password_sources: backoff(l),
        }
    }

    fn prune(&mut self, now: Instant) {
        self.handshakes.prune(now);
        self.cookies.prune(now);
        self.logins.prune(now);
        self.enrolments.prune(now);
        self.searches.prune(now);
        self.contact_requests.prune(now);
        self.messages.prune(now);
        self.connects.prune(now);
        self.password_accounts.prune(now);
        self.password_sources.prune(now);
    }
}

/// How often the rate-limit tables drop keys that carry no information any more.
const PRUNE_EVERY: Duration = Duration::from_secs(10);

/// Transmissions of an `IncomingConnect` push (400 + 800 + 1,600 ms: under 3 s).
const CONNECT_PUSH_ATTEMPTS: u32 = 3;

/// Handshakes served after a full receive batch (more datagrams waiting). Reading and
/// answering a batch of 64 datagrams costs about two handshakes; six still serve about
/// the crypto bound when every batch is full, and leave reading 2.5 times the headroom
/// of the full budget (measured in a 100,000-user storm: 2 starved the logins, 16 let
/// the socket overflow).
pub const BACKLOG_HANDSHAKE_BUDGET: usize = 6;

/// Pushes one session may have waiting for room on its link; more fail as unanswered.
const MAX_QUEUED_PUSHES: usize = 4096;

/// Transmissions of a push before it counts as unanswered. Ringing a callee must give up
/// well before the caller's own request does, so an unresponsive callee costs the caller
/// a mailbox fallback, not a reconnection.
fn push_attempts(kind: &Push) -> u32 {
    match kind {
        Push::Connect { .. }
        | Push::Ring { .. }
        | Push::RemoteConnect { .. }
        | Push::RemoteRing { .. } => CONNECT_PUSH_ATTEMPTS,
        _ => u32::MAX,
    }
}

/// Handshake initiations remembered to drop exact duplicates.
const RECENT_INITS: usize = 65_536;

impl std::fmt::Debug for Supernode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Supernode(sessions={})", self.sessions.len())
    }
}

fn err(code: ErrorCode, detail: impl Into<String>) -> Response {
    Response::error(code, detail)
}

fn op_err(e: OpError) -> Response {
    Response::error(e.code, e.detail)
}

fn limited(what: &str, wait: Duration) -> Response {
    let s = wait.as_secs_f64().ceil().max(1.0) as u64;
    err(
        ErrorCode::RateLimited,
        format!("too many {what}: try again in {s} s"),
    )
}

impl Supernode {
    /// A supernode with its Noise static key, the authority key it signs with, an
    /// injected RNG seed, a directory and a wall-clock anchor.
    pub fn new(
        cfg: SupernodeConfig,
        static_private: [u8; 32],
        authority: Authority,
        seed: [u8; 32],
        directory: Box<dyn Directory>,
        clock: WallClock,
        now: Instant,
    ) -> Self {
        let authority_public = authority.public();
        let mut rng = ChaCha20Rng::from_seed(seed);
        let mut cookie_secret = [0u8; 32];
        rng.fill_bytes(&mut cookie_secret);
        let mut previous_secret = [0u8; 32];
        rng.fill_bytes(&mut previous_secret);
        let limiters = Limiters::new(&cfg.limits);
        let admission = Admission::new(
            cfg.limits.max_queued_handshakes,
            cfg.limits.max_handshake_wait,
            cfg.limits.busy_per_second,
            now,
        );
        Supernode {
            admission,
            in_batch: false,
            mac_keys: MacKeys::for_private(&static_private),
            cookie_secret,
            previous_secret,
            secret_born: now,
            init_window: (now, 0),
            half_open: 0,
            half_open_queue: VecDeque::new(),
            limiters,
            last_prune: now,
            cfg,
            static_private,
            authority,
            authority_public,
            clock,
            rng,
            sessions: HashMap::new(),
            server_link: Arc::new(LinkConfig::server()),
            directory,
            timers: BinaryHeap::new(),
            ops: VecDeque::new(),
            next_token: 1,
            waiting: HashMap::new(),
            pushes: BTreeMap::new(),
            queued_pushes: HashMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            reset_window: (now, 0),
            recent_inits: HashSet::new(),
            recent_order: VecDeque::new(),
            calls: Calls::new(MAX_CALLS, MAX_CALLS_PER_USER),
            stats: Stats::default(),
            node_out: VecDeque::new(),
            remote_waits: HashMap::new(),
            remote_order: VecDeque::new(),
            remote_seen: HashMap::new(),
            hosts: Vec::new(),
            hosts_queue: VecDeque::new(),
            draining: false,
        }
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Half-open sessions (handshake done, nothing authenticated heard back yet).
    pub fn half_open_count(&self) -> usize {
        self.half_open
    }

    fn dropped(&mut self, r: DropReason) {
        self.stats.dropped += 1;
        self.stats.drops[r.index()] += 1;
    }

    /// Removes a session, keeping the half-open count right.
    fn remove_session(&mut self, index: u32) -> Option<Box<Session>> {
        let s = self.sessions.remove(&index)?;
        if !s.link.is_confirmed() {
            self.half_open = self.half_open.saturating_sub(1);
        }
        Some(s)
    }

    /// Drops sessions that completed no round trip within the half-open lifetime: a
    /// spoofed source never does, so a flood holds at most a lifetime's worth of them.
    /// Expires at most `budget` half-open sessions; returns how many queue entries it took.
    fn expire_half_open(&mut self, now: Instant, budget: usize) -> usize {
        let mut taken = 0;
        while let Some(&(deadline, index)) = self.half_open_queue.front() {
            if deadline > now || taken >= budget {
                break;
            }
            taken += 1;
            self.half_open_queue.pop_front();
            let stale = self
                .sessions
                .get(&index)
                .is_some_and(|s| !s.link.is_confirmed());
            if stale {
                self.dropped(DropReason::HalfOpenExpired);
                self.logout(now, index);
            }
        }
        taken
    }

    fn maybe_prune(&mut self, now: Instant) {
        if now.saturating_duration_since(self.last_prune) >= PRUNE_EVERY {
            self.last_prune = now;
            self.limiters.prune(now);
        }
    }

    /// Sends a Reject (rate-limited together with Resets: it is unauthenticated).
    fn reject(&mut self, now: Instant, to: SocketAddr, receiver: u32, reason: RejectReason) {
        if !self.reset_budget(now) {
            return;
        }
        let mut out = Vec::with_capacity(12);
        Packet::Reject {
            receiver,
            reason,
            version: PROTOCOL_VERSION,
        }
        .encode(&mut out);
        self.stats.rejects_sent += 1;
        self.push_transmit(Transmit {
            dst: to,
            payload: out,
        });
    }

    /// Whether the supernode is under load: handshakes must then carry a cookie.
    fn under_load(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.init_window.0) >= Duration::from_secs(1) {
            self.init_window = (now, 0);
        }
        self.init_window.1 = self.init_window.1.saturating_add(1);
        self.half_open >= self.cfg.limits.load_half_open
            || self.init_window.1 > self.cfg.limits.load_handshakes_per_second
    }

    fn cookie_ok(&mut self, now: Instant, from: SocketAddr, datagram: &[u8]) -> bool {
        if now.saturating_duration_since(self.secret_born)
            >= Duration::from_secs(cookie::SECRET_LIFETIME_S)
        {
            self.previous_secret = self.cookie_secret;
            self.rng.fill_bytes(&mut self.cookie_secret);
            self.secret_born = now;
        }
        cookie::mac2_ok(&cookie::cookie_for(&self.cookie_secret, &from), datagram)
            || cookie::mac2_ok(&cookie::cookie_for(&self.previous_secret, &from), datagram)
    }

    /// Answers an initiation with a cookie for its source address: no Diffie-Hellman
    /// work, and the reply (64 bytes) is smaller than the initiation.
    fn send_cookie(&mut self, from: SocketAddr, sender: u32, datagram: &[u8]) {
        let mut nonce = [0u8; peerline_wire::packet::COOKIE_NONCE_LEN];
        self.rng.fill_bytes(&mut nonce);
        let c = cookie::cookie_for(&self.cookie_secret, &from);
        let sealed = self
            .mac_keys
            .seal_cookie(&nonce, &c, &cookie::mac1_of(datagram));
        let mut out = Vec::with_capacity(peerline_wire::packet::COOKIE_REPLY_LEN);
        Packet::CookieReply {
            receiver: sender,
            nonce,
            cookie: sealed,
        }
        .encode(&mut out);
        self.stats.cookies_sent += 1;
        self.push_transmit(Transmit {
            dst: from,
            payload: out,
        });
    }

    /// Sessions open (authenticated or not).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// Users online.
    pub fn online_count(&self) -> usize {
        self.directory.len()
    }

    /// Index and address of every authenticated session, for a restart snapshot.
    pub fn snapshot(&self) -> Vec<(u32, SocketAddr)> {
        self.sessions
            .iter()
            .filter(|(_, s)| s.user().is_some())
            .map(|(i, s)| (*i, s.link.remote_addr()))
            .collect()
    }

    /// After a restart: tell the clients of a previous run's sessions to log in again now
    /// instead of waiting for their keepalive to fail. The driver paces the calls.
    pub fn send_reset_hint(&mut self, index: u32, addr: SocketAddr) {
        let mut out = Vec::with_capacity(8);
        Packet::Reset { receiver: index }.encode(&mut out);
        self.push_transmit(Transmit {
            dst: addr,
            payload: out,
        });
    }

    fn push_transmit(&mut self, t: Transmit) {
        self.stats.datagrams_out += 1;
        self.transmits.push_back(t);
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    /// Next storage operation to run; feed the result to [`Supernode::handle_op_result`].
    pub fn poll_op(&mut self) -> Option<(u64, Op)> {
        let op = self.ops.pop_front();
        if op.is_none() {
            crate::mem::shrink_queue(&mut self.ops);
        }
        op
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<SupernodeEvent> {
        self.events.pop_front()
    }

    /// When [`Supernode::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = self.timers.peek().map(|Reverse((t, _))| *t);
        let h = self.half_open_queue.front().map(|(t, _)| *t);
        let r = self.remote_order.front().map(|(t, _)| *t);
        // Queued initiations are work for now.
        let q = self.admission.next_due();
        [t, h, r, q].into_iter().flatten().min()
    }

    fn op(&mut self, op: Op, w: Waiting) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        self.ops.push_back((token, op));
        self.waiting.insert(token, w);
        token
    }

    fn overloaded(&self) -> bool {
        self.waiting.len() >= self.cfg.max_pending_ops
    }

    /// Moves a session's outgoing datagrams and events out, and reschedules its timer.
    fn flush(&mut self, now: Instant, index: u32) {
        let mut events = Vec::new();
        if let Some(s) = self.sessions.get_mut(&index) {
            while let Some(t) = s.link.poll_transmit() {
                self.stats.datagrams_out += 1;
                self.transmits.push_back(t);
            }
            while let Some(e) = s.link.poll_event() {
                events.push(e);
            }
            if let Some(t) = s.link.poll_timeout() {
                if s.scheduled.is_none_or(|old| t < old) {
                    s.scheduled = Some(t);
                    self.timers.push(Reverse((t, index)));
                }
            }
        }
        for e in events {
            self.on_link_event(now, index, e);
        }
    }

    /// Handles one datagram from `from`, like [`Supernode::handle_datagram`], except that
    /// an answer needing no session state (a STUN Binding response) is written into `out`
    /// (the driver's send buffer) and its length returned, instead of being queued as a
    /// [`Transmit`]: no allocation, no timer, no queue for the commonest unauthenticated
    /// request. `out` should hold [`crate::stun::ANSWER_MAX`] bytes.
    pub fn handle_datagram_into(
        &mut self,
        now: Instant,
        from: SocketAddr,
        bytes: &[u8],
        out: &mut [u8],
    ) -> Option<usize> {
        if bytes.len() > peerline_wire::MAX_DATAGRAM || !peerline_wire::packet::is_stun(bytes) {
            self.handle_datagram(now, from, bytes);
            return None;
        }
        self.stats.datagrams_in += 1;
        self.stats.stun += 1;
        let n = crate::stun::answer_into(bytes, from, out)?;
        self.stats.datagrams_out += 1;
        Some(n)
    }

    /// Handles one datagram from `from`.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.stats.datagrams_in += 1;
        self.maybe_prune(now);
        match Packet::decode(bytes) {
            Ok(Packet::HandshakeInit { sender, .. }) => {
                self.admit_handshake(now, from, sender, bytes);
                if !self.in_batch {
                    self.serve_handshakes(now, self.cfg.handshake_budget);
                }
            }
            Ok(Packet::Transport {
                receiver,
                counter,
                ciphertext,
            }) => {
                let (ok, confirmed) = match self.sessions.get_mut(&receiver) {
                    Some(s) => {
                        let was = s.link.is_confirmed();
                        let ok = s
                            .link
                            .handle_transport(now, from, counter, ciphertext)
                            .is_ok();
                        (ok, !was && s.link.is_confirmed())
                    }
                    None => {
                        self.dropped(DropReason::UnknownSession);
                        self.reset_unknown(now, from, receiver);
                        return;
                    }
                };
                if confirmed {
                    self.half_open = self.half_open.saturating_sub(1);
                }
                if !ok {
                    self.dropped(DropReason::BadTransport);
                }
                self.flush(now, receiver);
                if ok {
                    self.resume_delivery(receiver);
                }
            }
            Ok(Packet::Stun(msg)) => {
                self.stats.stun += 1;
                if let Some(payload) = crate::stun::answer(msg, from) {
                    self.push_transmit(Transmit { dst: from, payload });
                }
            }
            Ok(Packet::HandshakeResponse { .. })
            | Ok(Packet::Reset { .. })
            | Ok(Packet::Probe)
            | Ok(Packet::CookieReply { .. })
            | Ok(Packet::Reject { .. }) => self.dropped(DropReason::Unexpected),
            Err(peerline_wire::Error::Version(_)) => {
                self.dropped(DropReason::Version);
                // A handshake of another version gets a clear answer: which one we speak.
                if bytes.first() == Some(&TYPE_HANDSHAKE_INIT) && bytes.len() >= 8 {
                    let sender = u32::from_le_bytes([bytes[4], bytes[5], bytes[6], bytes[7]]);
                    self.reject(now, from, sender, RejectReason::Version);
                }
            }
            Err(_) => self.dropped(DropReason::Malformed),
        }
    }

    /// One global budget for unauthenticated answers (Resets and Rejects).
    fn reset_budget(&mut self, now: Instant) -> bool {
        if now.saturating_duration_since(self.reset_window.0) >= Duration::from_secs(1) {
            self.reset_window = (now, 0);
        }
        if self.reset_window.1 < self.cfg.resets_per_second {
            self.reset_window.1 += 1;
            true
        } else {
            false
        }
    }

    fn reset_unknown(&mut self, now: Instant, from: SocketAddr, receiver: u32) {
        if self.reset_budget(now) {
            self.send_reset_hint(receiver, from);
        }
    }

    fn fresh_index(&mut self) -> u32 {
        loop {
            let i = self.rng.next_u32();
            if i != 0 && !self.sessions.contains_key(&i) {
                return i;
            }
        }
    }

    /// Starts a batch of datagrams read together: until [`Supernode::end_batch`],
    /// handshake initiations only pass their cheap checks and wait in the queue (or are
    /// shed with a `Busy`), so that the batch's transport packets (keepalives and requests
    /// of users already in) are answered first.
    pub fn begin_batch(&mut self) {
        self.in_batch = true;
    }

    /// Ends a batch: serves queued handshake initiations, at most
    /// `SupernodeConfig::handshake_budget` of them. What remains is served by the next
    /// [`Supernode::end_batch`] or [`Supernode::handle_timeout`] (`poll_timeout` says now).
    pub fn end_batch(&mut self, now: Instant) {
        self.in_batch = false;
        self.serve_handshakes(now, self.cfg.handshake_budget);
    }

    /// As [`Supernode::end_batch`], when the socket has more datagrams waiting (the batch
    /// was full): at most [`BACKLOG_HANDSHAKE_BUDGET`] handshakes, so that reading keeps
    /// up. Initiations read in time are queued or told `Busy`; ones the kernel drops from
    /// a full socket buffer are lost silently, keepalives of users already in with them.
    pub fn end_batch_backlogged(&mut self, now: Instant) {
        self.in_batch = false;
        self.serve_handshakes(now, BACKLOG_HANDSHAKE_BUDGET.min(self.cfg.handshake_budget));
    }

    /// Initiations waiting for their Diffie-Hellman work.
    pub fn handshake_queue_len(&self) -> usize {
        self.admission.len()
    }

    /// Handshakes per second the supernode is estimated to serve (measured while
    /// initiations queue).
    pub fn handshake_rate(&self) -> f64 {
        self.admission.rate()
    }

    /// Serves queued initiations within the handshake budget; those whose client has
    /// given up on them by now are shed instead, at no cost to the budget.
    fn serve_handshakes(&mut self, now: Instant, budget: usize) {
        if self.admission.len() == 0 {
            return;
        }
        let mut served = 0u32;
        while (served as usize) < budget.max(1) {
            let Some((q, stale)) = self.admission.pop(now) else {
                break;
            };
            if stale {
                if let Ok(Packet::HandshakeInit { noise, .. }) = Packet::decode(&q.datagram) {
                    self.forget_init(noise);
                }
                self.shed_handshake(now, q.from, q.sender);
                continue;
            }
            served += 1;
            // Decoded when it arrived; read again rather than kept as borrowed parts.
            if let Ok(Packet::HandshakeInit { sender, noise, .. }) = Packet::decode(&q.datagram) {
                self.on_handshake(now, q.from, sender, noise);
            }
        }
        self.admission.served(now, served);
    }

    /// A shed initiation was never processed: its client may send the very same datagram
    /// again after the wait (no new handshake to compute), so it must not count as a
    /// duplicate then.
    fn forget_init(&mut self, noise: &[u8]) {
        self.recent_inits.remove(&crate::client::first_32(noise));
    }

    /// Answers an initiation that will not be served soon with a `Busy` and a
    /// retry-after: no Diffie-Hellman, no state, 12 bytes.
    fn shed_handshake(&mut self, now: Instant, from: SocketAddr, sender: u32) {
        self.dropped(DropReason::Busy);
        let Shed::Busy(wait) = self.admission.shed(now) else {
            return;
        };
        let retry_after_ms = wait.as_millis().min(u16::MAX as u128) as u16;
        let mut out = Vec::with_capacity(peerline_wire::packet::REJECT_LEN);
        Packet::Reject {
            receiver: sender,
            reason: RejectReason::Busy { retry_after_ms },
            version: PROTOCOL_VERSION,
        }
        .encode(&mut out);
        self.stats.rejects_sent += 1;
        self.stats.busy_sent += 1;
        self.push_transmit(Transmit {
            dst: from,
            payload: out,
        });
    }

    /// The cheap checks of an initiation (no Diffie-Hellman): then it is queued, shed
    /// with a `Busy`, or dropped.
    fn admit_handshake(&mut self, now: Instant, from: SocketAddr, sender: u32, datagram: &[u8]) {
        self.expire_half_open(now, self.cfg.timer_budget);
        let full = self.sessions.len() >= self.cfg.max_sessions;
        if full && self.hosts.is_empty() {
            self.dropped(DropReason::Capacity);
            return;
        }
        // Cheap checks first: a keyed hash, then (under load) the cookie. No Diffie-Hellman
        // work happens before both pass.
        if !self.mac_keys.mac1_ok(datagram) {
            self.dropped(DropReason::BadMac);
            return;
        }
        // In a fleet, a full or draining supernode sends the client on to another one.
        if full || self.draining {
            self.dropped(DropReason::Capacity);
            let reason = if self.draining {
                RejectReason::Draining
            } else {
                RejectReason::Full
            };
            self.reject(now, from, sender, reason);
            return;
        }
        if self.under_load(now) {
            if !self.cookie_ok(now, from, datagram) {
                let src = source_key(from.ip());
                if self.limiters.cookies.check_or_pass(now, &src).is_ok() {
                    self.send_cookie(from, sender, datagram);
                }
                self.dropped(DropReason::CookieRequired);
                return;
            }
            // The source proved it receives at its address: now limit it per address.
            if self
                .limiters
                .handshakes
                .check(now, &source_key(from.ip()))
                .is_err()
            {
                self.dropped(DropReason::RateLimited);
                return;
            }
        }
        if self.half_open >= self.cfg.limits.max_half_open {
            self.dropped(DropReason::Capacity);
            return;
        }
        // Shed, too, while storage is behind: every login queues storage operations,
        // and admitting logins the store cannot keep up with only grows that backlog
        // (memory, and the logins' own contact lists and mail arriving late).
        if !self.admission.admits() || self.overloaded() {
            self.shed_handshake(now, from, sender);
            return;
        }
        let Ok(Packet::HandshakeInit { noise, .. }) = Packet::decode(datagram) else {
            return;
        };
        // A duplicated initiation must not open a second session (which would replace the
        // first at login). Clients retry with a fresh handshake, so drop exact repeats.
        let ephemeral = crate::client::first_32(noise);
        if !self.recent_inits.insert(ephemeral) {
            self.dropped(DropReason::Duplicate);
            return;
        }
        self.recent_order.push_back(ephemeral);
        while self.recent_order.len() > RECENT_INITS {
            if let Some(old) = self.recent_order.pop_front() {
                self.recent_inits.remove(&old);
            }
        }
        self.admission.push(Queued {
            from,
            sender,
            datagram: datagram.to_vec(),
            arrived: now,
        });
    }

    /// The Diffie-Hellman part of a handshake, for an initiation taken from the queue.
    fn on_handshake(&mut self, now: Instant, from: SocketAddr, sender: u32, noise: &[u8]) {
        self.expire_half_open(now, self.cfg.timer_budget);
        // The session table or half-open table may have filled while it waited.
        let full = self.sessions.len() >= self.cfg.max_sessions;
        if full || self.half_open >= self.cfg.limits.max_half_open {
            self.dropped(DropReason::Capacity);
            if full && !self.hosts.is_empty() {
                self.reject(now, from, sender, RejectReason::Full);
            }
            return;
        }
        // Storage fell behind while it waited: shed it, before any Diffie-Hellman work.
        if self.overloaded() {
            self.forget_init(noise);
            self.shed_handshake(now, from, sender);
            return;
        }
        self.stats.noise_reads += 1;
        let mut seed = [0u8; 32];
        self.rng.fill_bytes(&mut seed);
        let Ok(responder) = Responder::read(&self.static_private, seed, noise) else {
            self.dropped(DropReason::BadHandshake);
            return;
        };
        let Ok(hello) = Hello::decode(&responder.payload) else {
            self.dropped(DropReason::BadHandshake);
            return;
        };
        if hello.version != PROTOCOL_VERSION {
            self.dropped(DropReason::Version);
            self.reject(now, from, sender, RejectReason::Version);
            return;
        }
        // Freshness: a captured initiation replayed later, or a client whose clock is
        // wrong, is refused with a reason the client can show.
        let ours = self.clock.unix_ms(now);
        if hello.unix_ms.abs_diff(ours) > self.cfg.limits.max_clock_skew.as_millis() as u64 {
            self.dropped(DropReason::Stale);
            self.reject(now, from, sender, RejectReason::Stale);
            return;
        }
        let unix = self.clock.unix_s(now);
        let auth = match &hello.cert {
            None => Auth::Anonymous,
            Some(bytes) => match Certificate::verify(bytes, &self.authority_public) {
                Ok(cert) => match cert.check_for(&responder.remote_static, unix) {
                    Ok(()) => Auth::User(Box::new(cert)),
                    Err(CertError::Expired { .. }) => Auth::Expired,
                    Err(_) => {
                        self.dropped(DropReason::BadHandshake);
                        return;
                    }
                },
                Err(_) => {
                    self.dropped(DropReason::BadHandshake);
                    return;
                }
            },
        };
        if let Auth::User(cert) = &auth {
            let stale = self
                .session_of(cert.username())
                .and_then(|i| self.sessions.get(&i))
                .is_some_and(|s| s.hello_ms >= hello.unix_ms);
            if stale {
                // Not newer than the live session's hello: a replay, or an old retry.
                self.dropped(DropReason::OutdatedLogin);
                return;
            }
            if self.limiters.logins.check(now, cert.username()).is_err() {
                self.dropped(DropReason::RateLimited);
                self.reject(now, from, sender, RejectReason::RateLimited);
                return;
            }
        }
        if hello.presence == Presence::Offline {
            self.dropped(DropReason::BadHandshake);
            return;
        }
        let welcome = Welcome {
            version: PROTOCOL_VERSION,
            unix_ms: self.clock.unix_ms(now),
            cert: None,
        };
        let Ok(payload) = welcome.encode() else {
            return;
        };
        // A client sends its supernode a few packets a minute: the small replay window.
        let Ok((transport, msg2)) = responder.accept_with(&payload, ReplayWindow::small()) else {
            self.dropped(DropReason::BadHandshake);
            return;
        };
        let index = self.fresh_index();
        let mut out = Vec::with_capacity(msg2.len() + 12);
        Packet::HandshakeResponse {
            sender: index,
            receiver: sender,
            noise: &msg2,
        }
        .encode(&mut out);
        self.push_transmit(Transmit {
            dst: from,
            payload: out,
        });
        self.stats.handshakes += 1;
        let link = Link::new(
            self.server_link.clone(),
            transport,
            index,
            sender,
            from,
            now,
        );
        let user = match &auth {
            Auth::User(c) => Some(c.username().clone()),
            _ => None,
        };
        self.sessions.insert(
            index,
            Box::new(Session {
                link,
                auth,
                presence: hello.presence,
                relay_only: hello.relay_only,
                anyone_can_call: false,
                contacts: ContactSet::default(),
                delivering: HashSet::new(),
                more_waiting: false,
                redeliver: false,
                hello_ms: hello.unix_ms,
                scheduled: None,
            }),
        );
        self.half_open += 1;
        self.half_open_queue
            .push_back((now + self.cfg.limits.half_open_ttl, index));
        if let Some(u) = user {
            self.login(now, index, u);
        }
        self.flush(now, index);
    }

    /// A session just authenticated as `user`.
    fn login(&mut self, now: Instant, index: u32, user: Username) {
        let loc = Location {
            node: self.cfg.node_id,
            session: index,
        };
        if let Some(old) = self.directory.insert(&user, loc) {
            // One session per user: the newer login wins.
            if old.session != index {
                if let Some(mut s) = self.remove_session(old.session) {
                    s.link.close(now);
                    while let Some(t) = s.link.poll_transmit() {
                        self.push_transmit(t);
                    }
                }
                self.orphan_pushes(now, old.session, &user);
            }
        }
        self.stats.logins += 1;
        // Online here now: what another supernode said about this user is stale.
        self.remote_seen.remove(&user);
        if !self.hosts.is_empty() {
            let body = Request::Hosts {
                hosts: self.hosts.clone(),
            };
            self.push(now, index, body, Push::Info);
        }
        tracing::debug!(user = %user, "login");
        self.events.push_back(SupernodeEvent::Login(user.clone()));
        // Revocation first: the store runs operations in order, so a revoked device is
        // logged out before its contacts hear of it.
        // One storage operation for the three lookups: a login storm is a million of them.
        if let Some(s) = self.sessions.get(&index) {
            let noise_key = *s.link.remote_static();
            self.op(
                Op::Login {
                    noise_key,
                    user,
                    limit: self.cfg.delivery_batch,
                },
                Waiting::Login { session: index },
            );
        }
    }

    /// An operator revoked a device of `user` (in the store, outside the supernode): if
    /// the user is logged in here with that device, check it again now instead of at its
    /// next login. A revoked device is then logged out (its contacts see it go offline)
    /// and told so, as at login. Anything else (another device, a device not revoked)
    /// changes nothing, so asking is harmless. In a fleet, a user not online here is
    /// asked after on their home supernode. Returns whether a check was started here.
    pub fn recheck_device(&mut self, user: &Username, noise_key: &[u8; 32]) -> bool {
        if self.cfg.fleet && self.session_of(user).is_none() {
            self.forward(NodeMsg::Recheck {
                user: user.clone(),
                key: *noise_key,
            });
            return false;
        }
        self.recheck_here(user, noise_key)
    }

    /// [`Supernode::recheck_device`] for a session on this supernode only (what a
    /// forwarded `Recheck` asks).
    fn recheck_here(&mut self, user: &Username, noise_key: &[u8; 32]) -> bool {
        let Some(index) = self.session_of(user) else {
            return false;
        };
        let same = self
            .sessions
            .get(&index)
            .is_some_and(|s| s.link.remote_static() == noise_key);
        if same {
            self.op(
                Op::CheckDevice {
                    noise_key: *noise_key,
                },
                Waiting::Recheck { session: index },
            );
        }
        same
    }

    /// The login's revocation check came back: only a revoked device is refused (a
    /// storage failure is not its fault). Returns whether the session was refused.
    fn on_revocation_check(&mut self, now: Instant, session: u32, r: Result<(), OpError>) -> bool {
        if !r.is_err_and(|e| e.code == ErrorCode::BadCertificate) {
            return false;
        }
        let Some(s) = self.sessions.get(&session) else {
            return true;
        };
        let (to, receiver) = (s.link.remote_addr(), s.link.remote_index());
        if let Some(u) = s.user() {
            tracing::info!(user = %u, "login refused: device revoked");
        }
        self.dropped(DropReason::Revoked);
        self.logout(now, session);
        self.reject(now, to, receiver, RejectReason::Revoked);
        true
    }

    /// The login's mutual contacts came back: index them and exchange presence.
    fn on_login_contacts(&mut self, now: Instant, session: u32, contacts: Vec<Username>) {
        let Some(s) = self.sessions.get_mut(&session) else {
            return;
        };
        let Some(me) = s.user().cloned() else { return };
        s.contacts = contacts.iter().cloned().collect();
        let mine = s.presence.as_seen();
        for c in contacts {
            if self.cfg.fleet && self.session_of(&c).is_none() {
                // Maybe online elsewhere: tell, and ask back, in one message.
                self.forward(NodeMsg::Presence {
                    to: c,
                    about: me.clone(),
                    presence: mine,
                    ask: true,
                });
                continue;
            }
            if mine != Presence::Offline {
                self.push_presence(now, &c, &me, mine);
            }
            let theirs = self.seen_presence(&c);
            if theirs != Presence::Offline {
                self.push_presence(now, &me, &c, theirs);
            }
        }
    }

    /// A page of offline messages for `session` came back: push them.
    fn on_pending(&mut self, now: Instant, session: u32, msgs: Vec<StoredMessage>) {
        let full = msgs.len() >= self.cfg.delivery_batch;
        if let Some(s) = self.sessions.get_mut(&session) {
            s.more_waiting = full;
        }
        for m in msgs {
            self.deliver(now, session, m);
        }
    }

    fn logout(&mut self, now: Instant, index: u32) {
        let Some(s) = self.remove_session(index) else {
            return;
        };
        let Some(user) = s.user().cloned() else {
            return;
        };
        let loc = Location {
            node: self.cfg.node_id,
            session: index,
        };
        if self.directory.remove_if(&user, loc) {
            tracing::debug!(user = %user, "logout");
            self.events.push_back(SupernodeEvent::Logout(user.clone()));
            if s.presence != Presence::Invisible {
                for c in &s.contacts {
                    self.push_presence(now, c, &user, Presence::Offline);
                }
            }
        }
        self.orphan_pushes(now, index, &user);
    }

    /// Forgets the pushes of session `index`, which is gone: callers waiting on it as
    /// callee get an answer (a displaced session's pushes would otherwise stay forever).
    fn orphan_pushes(&mut self, now: Instant, index: u32, user: &Username) {
        let keys: Vec<(u32, u64)> = self
            .pushes
            .range((index, 0)..=(index, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        let mut orphaned: Vec<Push> = keys
            .into_iter()
            .filter_map(|k| self.pushes.remove(&k))
            .collect();
        if let Some(q) = self.queued_pushes.remove(&index) {
            orphaned.extend(q.into_iter().map(|(_, kind)| kind));
        }
        for kind in orphaned {
            match Some(kind) {
                Some(Push::Connect { caller, req, .. }) => self.reply(
                    now,
                    caller,
                    req,
                    err(ErrorCode::Offline, format!("{user} went offline")),
                ),
                Some(Push::Ring { caller, req, key }) => {
                    self.calls.end(&key);
                    self.reply(
                        now,
                        caller,
                        req,
                        err(ErrorCode::Offline, format!("{user} went offline")),
                    );
                }
                Some(Push::RemoteConnect { node, token, .. }) => {
                    let answer = err(ErrorCode::Offline, format!("{user} went offline"));
                    self.send_node(node, NodeMsg::Answer { token, answer });
                }
                Some(Push::RemoteRing { node, token, key }) => {
                    self.calls.end(&key);
                    let answer = err(ErrorCode::Offline, format!("{user} went offline"));
                    self.send_node(node, NodeMsg::Answer { token, answer });
                }
                _ => {}
            }
        }
    }

    /// Runs due timers (retransmissions, idle expiry), at most
    /// [`SupernodeConfig::timer_budget`] of them: when more are due, [`Supernode::poll_timeout`]
    /// stays in the past and the driver calls again after serving its socket.
    pub fn handle_timeout(&mut self, now: Instant) {
        let mut budget = self.cfg.timer_budget.max(1);
        budget -= self.expire_half_open(now, budget);
        self.expire_remote(now);
        while let Some(Reverse((t, index))) = self.timers.peek().copied() {
            if t > now || budget == 0 {
                break;
            }
            budget -= 1;
            self.timers.pop();
            let Some(s) = self.sessions.get_mut(&index) else {
                continue;
            };
            if s.scheduled != Some(t) {
                continue; // stale entry; a newer one is in the heap
            }
            s.scheduled = None;
            s.link.handle_timeout(now);
            self.flush(now, index);
        }
        self.serve_handshakes(now, self.cfg.handshake_budget);
    }

    fn reply(&mut self, now: Instant, index: u32, req: u64, body: Response) {
        if let Some(s) = self.sessions.get_mut(&index) {
            let _ = s.link.respond(now, req, body);
            self.flush(now, index);
        }
    }

    /// Sends `body` to session `index`'s client, or queues it while the link has as many
    /// requests out as it allows (a login's presence exchange with hundreds of online
    /// contacts). A push that cannot be sent or queued is settled as unanswered.
    fn push(&mut self, now: Instant, index: u32, body: Request, kind: Push) {
        let Some(s) = self.sessions.get(&index) else {
            return;
        };
        let full = s.link.in_flight() >= s.link.config().max_in_flight;
        // A session's queue exists only while pushes wait in it; later ones wait behind
        // them, so they reach the client in order.
        if full || self.queued_pushes.contains_key(&index) {
            let q = self.queued_pushes.entry(index).or_default();
            if q.len() < MAX_QUEUED_PUSHES {
                q.push_back((body, kind));
            } else {
                self.stats.pushes_dropped += 1;
                self.settle_push(now, index, kind, None);
            }
            return;
        }
        self.send_push(now, index, body, kind);
        self.flush(now, index);
    }

    /// Sends a push on session `index`'s link, which has room; one that cannot be sent is
    /// settled as unanswered.
    fn send_push(&mut self, now: Instant, index: u32, body: Request, kind: Push) {
        let Some(s) = self.sessions.get_mut(&index) else {
            return;
        };
        match s.link.send_request_limited(now, body, push_attempts(&kind)) {
            Ok(id) => {
                self.pushes.insert((index, id), kind);
            }
            Err(_) => {
                self.stats.pushes_dropped += 1;
                self.settle_push(now, index, kind, None);
            }
        }
    }

    /// Moves queued pushes of session `index` onto its link as answers free room. (A
    /// session's removal settles its queue: `orphan_pushes`.)
    fn pump_pushes(&mut self, now: Instant, index: u32) {
        let mut sent = false;
        while self
            .sessions
            .get(&index)
            .is_some_and(|s| s.link.in_flight() < s.link.config().max_in_flight)
        {
            let Some(q) = self.queued_pushes.get_mut(&index) else {
                break;
            };
            let next = q.pop_front();
            if q.is_empty() {
                self.queued_pushes.remove(&index);
            }
            let Some((body, kind)) = next else {
                break;
            };
            self.send_push(now, index, body, kind);
            sent = true;
        }
        crate::mem::shrink_map(&mut self.queued_pushes);
        if sent {
            self.flush(now, index);
        }
    }

    fn session_of(&self, user: &Username) -> Option<u32> {
        self.directory
            .get(user)
            .filter(|l| l.node == self.cfg.node_id)
            .map(|l| l.session)
            .filter(|i| self.sessions.contains_key(i))
    }

    fn push_presence(&mut self, now: Instant, to: &Username, about: &Username, presence: Presence) {
        if let Some(i) = self.session_of(to) {
            let body = Request::PresenceEvent {
                user: about.clone(),
                presence,
            };
            self.push(now, i, body, Push::Info);
        } else if self.cfg.fleet {
            self.forward(NodeMsg::Presence {
                to: to.clone(),
                about: about.clone(),
                presence,
                ask: false,
            });
        }
    }

    /// Presence of `user` as their contacts see it.
    fn seen_presence(&self, user: &Username) -> Presence {
        match self.session_of(user).and_then(|i| self.sessions.get(&i)) {
            Some(s) => s.presence.as_seen(),
            None => self
                .remote_seen
                .get(user)
                .map_or(Presence::Offline, |r| r.presence),
        }
    }

    fn on_link_event(&mut self, now: Instant, index: u32, e: LinkEvent) {
        match e {
            LinkEvent::Request { id, body } => {
                self.stats.requests += 1;
                if let Some(n) = self.stats.requests_by_kind.get_mut(body.kind()) {
                    *n += 1;
                }
                self.on_request(now, index, id, body);
            }
            LinkEvent::Response { id, body } => self.on_push_answer(now, index, id, Some(body)),
            LinkEvent::RequestFailed { id } => self.on_push_answer(now, index, id, None),
            LinkEvent::Closed | LinkEvent::Dead => self.logout(now, index),
            // Media never goes through a supernode.
            LinkEvent::Datagram(_) => self.stats.dropped += 1,
        }
    }

    fn on_request(&mut self, now: Instant, index: u32, id: u64, body: Request) {
        let Some(s) = self.sessions.get(&index) else {
            return;
        };
        let noise_key = *s.link.remote_static();
        let remote = s.link.remote_addr();
        let user = s.user().cloned();
        if self.overloaded() {
            self.reply(
                now,
                index,
                id,
                err(ErrorCode::Unavailable, "supernode busy: try again shortly"),
            );
            return;
        }
        if let Some((what, wait)) = self.over_limit(now, &body, user.as_ref(), remote.ip()) {
            self.stats.rate_limited += 1;
            self.reply(now, index, id, limited(what, wait));
            return;
        }
        let Some(s) = self.sessions.get(&index) else {
            return;
        };
        let mut device_id = [0u8; 16];
        self.rng.fill_bytes(&mut device_id);
        let session = index;
        let req = id;
        match (body, user) {
            (
                Request::Register {
                    username,
                    password,
                    sign_key,
                },
                None,
            ) => {
                if !matches!(s.auth, Auth::Anonymous) {
                    return self.reply(
                        now,
                        index,
                        id,
                        err(ErrorCode::BadRequest, "this device is already enrolled"),
                    );
                }
                let unix = self.clock.unix_s(now);
                self.op(
                    Op::Register {
                        username,
                        password,
                        noise_key,
                        sign_key,
                        device_id,
                        now: unix,
                    },
                    Waiting::Certify {
                        session,
                        req,
                        registered: true,
                        password: None,
                    },
                );
            }
            (
                Request::Enroll {
                    username,
                    password,
                    sign_key,
                },
                None,
            ) => {
                let counted = Some((username.clone(), source_key(remote.ip())));
                self.op(
                    Op::Enroll {
                        username,
                        password,
                        noise_key,
                        sign_key,
                        device_id,
                    },
                    Waiting::Certify {
                        session,
                        req,
                        registered: false,
                        password: counted,
                    },
                );
            }
            (Request::RenewCert, _) => {
                if matches!(s.auth, Auth::Anonymous) {
                    return self.reply(
                        now,
                        index,
                        id,
                        err(
                            ErrorCode::NotAuthenticated,
                            "log in with a certificate first",
                        ),
                    );
                }
                self.op(
                    Op::Renew { noise_key },
                    Waiting::Certify {
                        session,
                        req,
                        registered: false,
                        password: None,
                    },
                );
            }
            (Request::Register { .. } | Request::Enroll { .. }, Some(_)) => {
                self.reply(
                    now,
                    index,
                    id,
                    err(ErrorCode::BadRequest, "already logged in"),
                );
            }
            (_, None) => {
                self.reply(
                    now,
                    index,
                    id,
                    err(
                        ErrorCode::NotAuthenticated,
                        "not logged in: register or renew the certificate first",
                    ),
                );
            }
            (Request::SetPresence(p), Some(me)) => {
                if p == Presence::Offline {
                    return self.reply(
                        now,
                        index,
                        id,
                        err(ErrorCode::BadRequest, "to go offline, disconnect"),
                    );
                }
                let contacts: Vec<Username> = match self.sessions.get_mut(&index) {
                    Some(s) => {
                        s.presence = p;
                        s.contacts.iter().cloned().collect()
                    }
                    None => return,
                };
                self.reply(now, index, id, Response::Ok);
                for c in contacts {
                    self.push_presence(now, &c, &me, p.as_seen());
                }
            }
            (Request::CallInvite { user: to, call_id }, Some(me)) => {
                match self.calls.check(now, &me, &to, call_id) {
                    Ok(()) => {}
                    Err(CallRefusal::DuplicateId) => {
                        return self.reply(
                            now,
                            index,
                            id,
                            err(ErrorCode::BadRequest, "that call id is in use"),
                        )
                    }
                    Err(CallRefusal::TooMany) => {
                        return self.reply(
                            now,
                            index,
                            id,
                            err(ErrorCode::RateLimited, "too many calls at once"),
                        )
                    }
                }
                self.op(
                    Op::CheckCall {
                        from: me,
                        to: to.clone(),
                    },
                    Waiting::Call {
                        session,
                        req,
                        to,
                        call_id,
                    },
                );
            }
            (
                Request::CallSignal {
                    user: other,
                    call_id,
                    signal,
                },
                Some(me),
            ) => {
                self.calls.prune(now);
                // The caller's id names the call: find it from either side.
                let Some((key, from_caller)) = self.calls.find(&me, &other, call_id) else {
                    return self.reply(now, index, id, err(ErrorCode::BadRequest, "no such call"));
                };
                let allowed = match signal {
                    CallSignal::Accept | CallSignal::Decline => !from_caller,
                    CallSignal::Cancel => from_caller,
                    CallSignal::HangUp => true,
                };
                if !allowed {
                    return self.reply(
                        now,
                        index,
                        id,
                        err(ErrorCode::BadRequest, "that side cannot send this signal"),
                    );
                }
                match signal {
                    CallSignal::Accept => self.calls.accept(now, &key),
                    _ => self.calls.end(&key),
                }
                match self.session_of(&other) {
                    Some(i) => {
                        self.reply(now, index, id, Response::Ok);
                        let body = Request::CallSignal {
                            user: me,
                            call_id,
                            signal,
                        };
                        self.push(now, i, body, Push::Info);
                    }
                    // The call exists, so the other side was reachable: it is elsewhere.
                    None if self.cfg.fleet => {
                        self.reply(now, index, id, Response::Ok);
                        self.forward(NodeMsg::Signal {
                            to: other,
                            from: me,
                            call_id,
                            signal,
                        });
                    }
                    None => self.reply(
                        now,
                        index,
                        id,
                        err(ErrorCode::Offline, format!("{other} is offline")),
                    ),
                }
            }
            (Request::SetCallPolicy { anyone }, Some(_)) => {
                if let Some(s) = self.sessions.get_mut(&index) {
                    s.anyone_can_call = anyone;
                }
                self.reply(now, index, id, Response::Ok);
            }
            (Request::RelayCredentials, Some(me)) => {
                let body = match &self.cfg.relay {
                    Some(r) => {
                        let expires = self.clock.unix_s(now) + r.lifetime.as_secs();
                        let (username, password) =
                            crate::relay::turn_credentials(&r.secret, me.as_str(), expires);
                        Response::RelayCredentials {
                            server: r.server,
                            username,
                            password,
                        }
                    }
                    None => err(ErrorCode::Unavailable, "this supernode offers no relay"),
                };
                self.reply(now, index, id, body);
            }
            (Request::ContactAdd { user, note }, Some(me)) => {
                self.op(
                    Op::ContactAdd {
                        from: me,
                        to: user,
                        note,
                    },
                    Waiting::Contact { session, req },
                );
            }
            (Request::ContactReply { user, action }, Some(me)) => {
                self.op(
                    Op::ContactReply {
                        owner: me,
                        peer: user,
                        action,
                    },
                    Waiting::Contact { session, req },
                );
            }
            (Request::ContactRemove { user }, Some(me)) => {
                if let Some(s) = self.sessions.get_mut(&index) {
                    s.contacts.remove(&user);
                }
                if let Some(other) = self.session_of(&user) {
                    if let Some(o) = self.sessions.get_mut(&other) {
                        o.contacts.remove(&me);
                    }
                }
                self.op(
                    Op::ContactRemove {
                        owner: me,
                        peer: user,
                    },
                    Waiting::Contact { session, req },
                );
            }
            (Request::ContactList { offset }, Some(me)) => {
                self.op(
                    Op::ContactList {
                        owner: me,
                        offset: offset as usize,
                        limit: CONTACTS_PAGE + 1,
                    },
                    Waiting::List { session, req },
                );
            }
            (Request::Search { prefix }, Some(_)) => {
                match peerline_wire::name::parse_prefix(&prefix) {
                    Ok(prefix) => {
                        self.op(
                            Op::Search {
                                prefix,
                                limit: MAX_SEARCH_RESULTS,
                            },
                            Waiting::Reply { session, req },
                        );
                    }
                    Err(e) => self.reply(now, index, id, err(ErrorCode::BadRequest, e.to_string())),
                }
            }
            (
                Request::Connect {
                    user,
                    mut candidates,
                    hard_nat,
                },
                Some(me),
            ) => {
                // The address we see is the caller's best candidate behind a NAT, unless the
                // caller is relay-only: then it is never given out.
                let relay_only = self.sessions.get(&index).is_some_and(|s| s.relay_only);
                if relay_only {
                    candidates.retain(|c| *c != remote);
                } else if !candidates.contains(&remote) {
                    candidates.insert(0, remote);
                    candidates.truncate(MAX_CANDIDATES);
                }
                self.op(
                    Op::CheckContact {
                        from: me,
                        to: user.clone(),
                    },
                    Waiting::Connect {
                        session,
                        req,
                        to: user,
                        candidates,
                        hard_nat,
                    },
                );
            }
            (
                Request::StoreMessage {
                    to,
                    msg_id,
                    sent_at,
                    text,
                },
                Some(me),
            ) => {
                let msg = NewMessage {
                    from: me,
                    to,
                    msg_id,
                    sent_at,
                    text,
                };
                self.op(
                    Op::Queue {
                        msg: msg.clone(),
                        quota: self.cfg.mailbox_quota,
                    },
                    Waiting::Queue { session, req, msg },
                );
            }
            (
                Request::ContactEvent { .. }
                | Request::PresenceEvent { .. }
                | Request::IncomingConnect { .. }
                | Request::IncomingCall { .. }
                | Request::Deliver { .. }
                | Request::Chat { .. }
                | Request::Hosts { .. }
                | Request::Redirect { .. },
                Some(_),
            ) => {
                self.reply(
                    now,
                    index,
                    id,
                    err(ErrorCode::BadRequest, "not a request a supernode accepts"),
                );
            }
        }
    }

    /// The rate limit a request runs into, if any: what to call it and how long to wait.
    fn over_limit(
        &mut self,
        now: Instant,
        body: &Request,
        user: Option<&Username>,
        ip: IpAddr,
    ) -> Option<(&'static str, Duration)> {
        let src = source_key(ip);
        let l = &mut self.limiters;
        let r = match (body, user) {
            (Request::Register { .. }, None) => l
                .enrolments
                .check(now, &src)
                .map_err(|w| ("registrations from this address", w)),
            (Request::Enroll { username, .. }, None) => l
                .password_accounts
                .check(now, username)
                .map_err(|w| ("wrong passwords for this account", w))
                .and_then(|()| {
                    l.password_sources
                        .check(now, &src)
                        .map_err(|w| ("wrong passwords from this address", w))
                })
                .and_then(|()| {
                    l.enrolments
                        .check(now, &src)
                        .map_err(|w| ("enrolments from this address", w))
                }),
            (Request::Search { .. }, Some(me)) => {
                l.searches.check(now, me).map_err(|w| ("searches", w))
            }
            (Request::ContactAdd { .. }, Some(me)) => l
                .contact_requests
                .check(now, me)
                .map_err(|w| ("contact requests", w)),
            (Request::StoreMessage { .. }, Some(me)) => {
                l.messages.check(now, me).map_err(|w| ("messages", w))
            }
            (Request::Connect { .. }, Some(me)) => l
                .connects
                .check(now, me)
                .map_err(|w| ("connection setups", w)),
            _ => Ok(()),
        };
        r.err()
    }

    fn on_push_answer(&mut self, now: Instant, index: u32, id: u64, body: Option<Response>) {
        let Some(kind) = self.pushes.remove(&(index, id)) else {
            return;
        };
        self.settle_push(now, index, kind, body);
        if self.queued_pushes.contains_key(&index) {
            self.pump_pushes(now, index);
        }
    }

    /// Acts on a push's answer (`None`: it got none).
    fn settle_push(&mut self, now: Instant, index: u32, kind: Push, body: Option<Response>) {
        match kind {
            Push::Info => {}
            Push::Ring { caller, req, key } => {
                let answer = self.ring_answer(body, &key);
                self.reply(now, caller, req, answer);
            }
            Push::RemoteRing { node, token, key } => {
                let answer = self.ring_answer(body, &key);
                self.send_node(node, NodeMsg::Answer { token, answer });
            }
            Push::Connect {
                caller,
                req,
                call_only,
            } => {
                let answer = self.connect_answer(index, body, call_only);
                self.reply(now, caller, req, answer);
            }
            Push::RemoteConnect {
                node,
                token,
                call_only,
            } => {
                let answer = self.connect_answer(index, body, call_only);
                self.send_node(node, NodeMsg::Answer { token, answer });
            }
            Push::Deliver { id: store_id } => {
                let Some(s) = self.sessions.get_mut(&index) else {
                    return;
                };
                s.delivering.remove(&store_id);
                if s.delivering.is_empty() {
                    // Give the table's memory back between deliveries.
                    s.delivering = HashSet::new();
                }
                let Some(user) = s.user().cloned() else {
                    return;
                };
                if body.is_none() {
                    // The client did not answer (stopped or gone): the message stays in the
                    // mailbox and goes out again when the client is heard from.
                    s.redeliver = true;
                }
                if matches!(body, Some(Response::Ok)) {
                    self.stats.messages_delivered += 1;
                    self.op(
                        Op::Delete {
                            to: user.clone(),
                            id: store_id,
                        },
                        Waiting::Nothing,
                    );
                }
                let s = self.sessions.get_mut(&index);
                if let Some(s) = s {
                    if s.delivering.is_empty() && s.more_waiting {
                        s.more_waiting = false;
                        self.op(
                            Op::Pending {
                                to: user,
                                limit: self.cfg.delivery_batch,
                            },
                            Waiting::Pending { session: index },
                        );
                    }
                }
            }
        }
    }

    /// The caller's answer from the callee's answer to `IncomingCall`.
    fn ring_answer(&mut self, body: Option<Response>, key: &CallKey) -> Response {
        match body {
            Some(Response::Ok) => {
                self.stats.calls_rung += 1;
                Response::Ok
            }
            Some(Response::Error {
                code: ErrorCode::Busy,
                ..
            }) => {
                self.calls.end(key);
                err(ErrorCode::Busy, format!("{} is in another call", key.0))
            }
            Some(_) => {
                self.calls.end(key);
                err(ErrorCode::Declined, "the call was refused")
            }
            None => {
                self.calls.end(key);
                err(ErrorCode::Offline, "the callee did not answer")
            }
        }
    }

    /// The caller's answer from the callee's (session `index`) answer to `IncomingConnect`.
    fn connect_answer(&self, index: u32, body: Option<Response>, call_only: bool) -> Response {
        match (body, self.sessions.get(&index)) {
            (
                Some(Response::ConnectAnswer {
                    mut candidates,
                    hard_nat,
                }),
                Some(s),
            ) => {
                let cert = match &s.auth {
                    Auth::User(c) => c.to_bytes(),
                    _ => Vec::new(),
                };
                let seen = s.link.remote_addr();
                if s.relay_only {
                    candidates.retain(|c| *c != seen);
                } else if !candidates.contains(&seen) {
                    candidates.insert(0, seen);
                    candidates.truncate(MAX_CANDIDATES);
                }
                Response::ConnectAccepted {
                    cert,
                    candidates,
                    hard_nat,
                    call_only,
                }
            }
            (Some(Response::Error { .. }), _) => {
                err(ErrorCode::Declined, "the contact declined the connection")
            }
            _ => err(ErrorCode::Offline, "the contact did not answer"),
        }
    }

    /// Asks the store for the next batch of `user`'s offline messages for session `index`.
    fn fetch_mail(&mut self, index: u32, user: Username) {
        self.op(
            Op::Pending {
                to: user,
                limit: self.cfg.delivery_batch,
            },
            Waiting::Pending { session: index },
        );
    }

    fn resume_delivery(&mut self, index: u32) {
        let Some(s) = self.sessions.get_mut(&index) else {
            return;
        };
        if !s.redeliver || !s.delivering.is_empty() {
            return;
        }
        s.redeliver = false;
        if let Some(user) = s.user().cloned() {
            self.op(
                Op::Pending {
                    to: user,
                    limit: self.cfg.delivery_batch,
                },
                Waiting::Pending { session: index },
            );
        }
    }

    fn deliver(&mut self, now: Instant, index: u32, m: StoredMessage) {
        let Some(s) = self.sessions.get_mut(&index) else {
            return;
        };
        if !s.delivering.insert(m.id) {
            return;
        }
        let body = Request::Deliver {
            id: m.id,
            from: m.msg.from,
            msg_id: m.msg.msg_id,
            sent_at: m.msg.sent_at,
            text: m.msg.text,
        };
        self.push(now, index, body, Push::Deliver { id: m.id });
    }

    fn notify(&mut self, now: Instant, n: Notice) {
        // Keep the fan-out index in step with accepted contacts.
        let accepted = n.state == ContactState::Accepted;
        for (who, other) in [(&n.to, &n.about), (&n.about, &n.to)] {
            if let Some(i) = self.session_of(who) {
                if let Some(s) = self.sessions.get_mut(&i) {
                    if accepted {
                        s.contacts.insert(other.clone());
                    } else if n.state == ContactState::None {
                        s.contacts.remove(other);
                    }
                }
            }
        }
        if let Some(i) = self.session_of(&n.to) {
            let body = Request::ContactEvent {
                user: n.about.clone(),
                state: n.state,
                note: n.note.clone(),
            };
            self.push(now, i, body, Push::Info);
        } else if self.cfg.fleet {
            // Its supernode updates its index, tells it, and (once accepted) answers with
            // its presence; ours follows on the same channel, after this.
            self.forward(NodeMsg::Contact {
                to: n.to.clone(),
                about: n.about.clone(),
                state: n.state,
                note: n.note.clone(),
            });
        }
        if accepted {
            let (a, b) = (self.seen_presence(&n.about), self.seen_presence(&n.to));
            if a != Presence::Offline {
                self.push_presence(now, &n.to, &n.about, a);
            }
            if b != Presence::Offline {
                self.push_presence(now, &n.about, &n.to, b);
            }
        }
    }

    /// Feeds back the result of a storage operation from [`Supernode::poll_op`].
    pub fn handle_op_result(&mut self, now: Instant, token: u64, result: OpResult) {
        let w = self.waiting.remove(&token);
        crate::mem::shrink_map(&mut self.waiting);
        let Some(w) = w else {
            return;
        };
        match (w, result) {
            (Waiting::Nothing, _) => {}
            (Waiting::Reply { session, req }, OpResult::Users(r)) => {
                let body = match r {
                    Ok(users) => Response::SearchResults { users },
                    Err(e) => op_err(e),
                };
                self.reply(now, session, req, body);
            }
            (
                Waiting::Certify {
                    session,
                    req,
                    registered,
                    password,
                },
                OpResult::Device(r),
            ) => match r {
                Ok((device, serial)) => {
                    if let Some((account, src)) = &password {
                        self.limiters.password_accounts.succeed(account);
                        self.limiters.password_sources.succeed(src);
                    }
                    let unix = self.clock.unix_s(now);
                    let cert = self.authority.issue(
                        &CertRequest {
                            username: device.username.clone(),
                            device_id: device.device_id,
                            noise_key: device.noise_key,
                            sign_key: device.sign_key,
                        },
                        serial,
                        unix,
                        self.cfg.cert_lifetime.as_secs(),
                    );
                    let bytes = cert.to_bytes();
                    let Some(s) = self.sessions.get_mut(&session) else {
                        return;
                    };
                    let was_user = s.user().is_some();
                    s.auth = Auth::User(Box::new(cert));
                    if registered {
                        self.events
                            .push_back(SupernodeEvent::Registered(device.username.clone()));
                    }
                    if !was_user {
                        self.login(now, session, device.username);
                    }
                    self.reply(now, session, req, Response::Certificate(bytes));
                }
                Err(e) => {
                    if let (Some((account, src)), ErrorCode::WrongPassword) = (&password, e.code) {
                        self.limiters.password_accounts.fail(now, account);
                        self.limiters.password_sources.fail(now, src);
                    }
                    self.reply(now, session, req, op_err(e))
                }
            },
            (Waiting::Contact { session, req }, OpResult::Contact(r)) => match r {
                Ok(notices) => {
                    self.reply(now, session, req, Response::Ok);
                    for n in notices {
                        self.notify(now, n);
                    }
                }
                Err(e) => self.reply(now, session, req, op_err(e)),
            },
            (Waiting::List { session, req }, OpResult::Contacts(r)) => {
                let body = match r {
                    Ok(mut rows) => {
                        let more = rows.len() > CONTACTS_PAGE;
                        rows.truncate(CONTACTS_PAGE);
                        let contacts = self
                            .sessions
                            .get(&session)
                            .map(|s| s.contacts.clone())
                            .unwrap_or_default();
                        let entries = rows
                            .into_iter()
                            .map(|r| ContactEntry {
                                presence: if contacts.contains(&r.peer) {
                                    self.seen_presence(&r.peer)
                                } else {
                                    Presence::Offline
                                },
                                user: r.peer,
                                state: r.state,
                            })
                            .collect();
                        Response::Contacts { entries, more }
                    }
                    Err(e) => op_err(e),
                };
                self.reply(now, session, req, body);
            }
            (
                Waiting::Connect {
                    session,
                    req,
                    to,
                    candidates,
                    hard_nat,
                },
                OpResult::Done(r),
            ) => {
                let Some(caller) = self.sessions.get(&session) else {
                    return;
                };
                let (Some(me), Auth::User(cert)) = (caller.user().cloned(), &caller.auth) else {
                    return;
                };
                // Strangers in an answered call (the callee takes calls from anyone) may
                // open the session its media needs, marked for the call only.
                let call_only = match r {
                    Ok(()) => false,
                    Err(_) if self.calls.in_accepted_call(&me, &to) => true,
                    Err(e) => return self.reply(now, session, req, op_err(e)),
                };
                let cert = cert.to_bytes();
                // An invisible user looks offline to contacts: messages go to the mailbox,
                // which delivers to them at once, and their address is not given out.
                // A relay-only user on either side is never given a direct path.
                let visible = self.session_of(&to).filter(|i| {
                    self.sessions
                        .get(i)
                        .is_some_and(|s| s.presence != Presence::Invisible)
                });
                match visible {
                    Some(callee) => {
                        let body = Request::IncomingConnect {
                            user: me,
                            cert,
                            candidates,
                            hard_nat,
                            call_only,
                        };
                        self.push(
                            now,
                            callee,
                            body,
                            Push::Connect {
                                caller: session,
                                req,
                                call_only,
                            },
                        );
                    }
                    None if self.cfg.fleet && self.session_of(&to).is_none() => {
                        let token = self.wait_remote(
                            now,
                            RemoteWait::Connect {
                                caller: session,
                                req,
                                to: to.clone(),
                            },
                        );
                        self.forward(NodeMsg::Connect {
                            token,
                            to,
                            from: me,
                            cert,
                            candidates,
                            hard_nat,
                            call_only,
                        });
                    }
                    None => self.reply(
                        now,
                        session,
                        req,
                        err(ErrorCode::Offline, format!("{to} is offline")),
                    ),
                }
            }
            (
                Waiting::Call {
                    session,
                    req,
                    to,
                    call_id,
                },
                OpResult::Callable(r),
            ) => {
                let Some(me) = self.sessions.get(&session).and_then(|s| s.user().cloned()) else {
                    return;
                };
                // Invisible users look offline; strangers may ring only a callee who takes
                // calls from anyone. Every refusal to a stranger reads the same, online or
                // not.
                let callee = self.session_of(&to).filter(|i| {
                    self.sessions
                        .get(i)
                        .is_some_and(|s| s.presence != Presence::Invisible)
                });
                let anyone = callee
                    .and_then(|i| self.sessions.get(&i))
                    .is_some_and(|s| s.anyone_can_call);
                let mutual = r.as_ref().ok().copied();
                if let (Some(m), None, true) = (mutual, callee, self.cfg.fleet) {
                    if self.session_of(&to).is_none() {
                        // The callee's own supernode applies the rules that depend on the
                        // callee (visible, takes calls from anyone).
                        let key: CallKey = (me.clone(), call_id);
                        if self.calls.ring(now, key.clone(), to.clone()).is_err() {
                            return self.reply(
                                now,
                                session,
                                req,
                                err(ErrorCode::RateLimited, "too many calls at once"),
                            );
                        }
                        let token = self.wait_remote(
                            now,
                            RemoteWait::Ring {
                                caller: session,
                                req,
                                key,
                                mutual: m,
                                to: to.clone(),
                            },
                        );
                        self.forward(NodeMsg::Ring {
                            token,
                            to,
                            from: me,
                            call_id,
                            mutual: m,
                        });
                        return;
                    }
                }
                match (mutual, callee) {
                    (Some(m), Some(i)) if m || anyone => {
                        let key: CallKey = (me.clone(), call_id);
                        if self.calls.ring(now, key.clone(), to).is_err() {
                            return self.reply(
                                now,
                                session,
                                req,
                                err(ErrorCode::RateLimited, "too many calls at once"),
                            );
                        }
                        let body = Request::IncomingCall { user: me, call_id };
                        self.push(
                            now,
                            i,
                            body,
                            Push::Ring {
                                caller: session,
                                req,
                                key,
                            },
                        );
                    }
                    (Some(true), None) => self.reply(
                        now,
                        session,
                        req,
                        err(ErrorCode::Offline, format!("{to} is offline")),
                    ),
                    _ => self.reply(now, session, req, fleet::not_contact(&to)),
                }
            }
            (Waiting::Queue { session, req, msg }, OpResult::Queued(r)) => match r {
                Ok(outcome @ (QueueOutcome::Queued(id) | QueueOutcome::Duplicate(id))) => {
                    if matches!(outcome, QueueOutcome::Queued(_)) {
                        self.stats.messages_queued += 1;
                    }
                    self.reply(now, session, req, Response::Ok);
                    if let Some(i) = self.session_of(&msg.to) {
                        self.deliver(now, i, StoredMessage { id, msg });
                    } else if self.cfg.fleet {
                        self.forward(NodeMsg::Mail { to: msg.to });
                    }
                }
                Ok(QueueOutcome::MailboxFull) => self.reply(
                    now,
                    session,
                    req,
                    err(
                        ErrorCode::MailboxFull,
                        format!("{}'s mailbox is full: try again later", msg.to),
                    ),
                ),
                Err(e) => self.reply(now, session, req, op_err(e)),
            },
            (Waiting::Pending { session }, OpResult::Messages(Ok(msgs))) => {
                self.on_pending(now, session, msgs);
            }
            (Waiting::Login { session }, OpResult::Login(r)) => {
                // In the order the separate operations had: a revoked device is logged
                // out before its contacts hear of it.
                if self.on_revocation_check(now, session, r.device) {
                    return;
                }
                match r.contacts {
                    Ok(contacts) => self.on_login_contacts(now, session, contacts),
                    Err(_) => tracing::warn!("login fan-out lookup failed"),
                }
                match r.pending {
                    Ok(msgs) => self.on_pending(now, session, msgs),
                    Err(_) => tracing::warn!("login mailbox lookup failed"),
                }
            }
            (Waiting::Recheck { session }, OpResult::Done(r)) => {
                self.on_revocation_check(now, session, r);
            }
            (Waiting::Pending { .. } | Waiting::Login { .. }, _) => {
                tracing::warn!("login fan-out lookup failed");
            }
            (w, _) => {
                // Log the kind only: results can hold message text and user names.
                let kind = match w {
                    Waiting::Reply { .. } => "reply",
                    Waiting::Certify { .. } => "certify",
                    Waiting::Login { .. } => "login",
                    Waiting::Recheck { .. } => "recheck",
                    Waiting::Contact { .. } => "contact",
                    Waiting::Connect { .. } => "connect",
                    Waiting::Call { .. } => "call",
                    Waiting::Queue { .. } => "queue",
                    Waiting::List { .. } => "list",
                    Waiting::Pending { .. } => "pending",
                    Waiting::Nothing => "nothing",
                };
                tracing::error!(kind, "storage result does not match its operation");
            }
        }
    }
}
