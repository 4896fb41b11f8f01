//! The client core: one device's session to its supernode, its direct peer sessions, and
//! the commands a user gives, as a sans-IO state machine.
//!
//! Drive it with [`Client::handle_datagram`], [`Client::handle_timeout`] and
//! [`Client::command`]; drain [`Client::poll_transmit`], [`Client::poll_event`] and
//! [`Client::poll_timeout`]. Messages received arrive as [`ClientEvent::Message`] with a
//! token; the driver saves them and calls [`Client::message_saved`], and only then is the
//! sender (or the supernode's mailbox) told the message arrived.
//!
//! The client reconnects by itself when its supernode goes away (exponential backoff
//! with jitter) and renews its certificate while online.
//!
//! A fleet of supernodes shares one Noise key and authority, so the client keeps a host
//! cache: the bootstrap address first, then the supernodes the fleet told it about
//! (`Hosts`, `Redirect`). A lost link, an unreachable supernode or a `Full`/`Draining`
//! refusal moves the next login to the next host of the cache; a `Redirect` moves it at
//! once. Direct peer sessions never depend on the supernode link: they live on while the
//! client is offline or logs in elsewhere.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peerline_crypto::cookie::{self, MacKeys};
use peerline_crypto::noise::{Handshake, Responder};
use peerline_crypto::{Certificate, DeviceKeys};
use peerline_wire::msg::{
    CallSignal, ContactAction, ContactEntry, ContactState, ErrorCode, Hello, Presence, Request,
    Response, Welcome, MAX_CANDIDATES, MAX_HOSTS,
};
use peerline_wire::packet::{Packet, RejectReason};
use peerline_wire::{Username, PROTOCOL_VERSION};
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rand_chacha::ChaCha20Rng;

use crate::call::{Call, CallInfo, CallState, Direction, CONNECT_TIMEOUT};
use crate::clock::WallClock;
use crate::link::{Link, LinkConfig, LinkEvent, Transmit};
use crate::nat::{Birthday, BirthdayConfig, MappingProbe, Sends};

use turn_client_proto::api::{
    Transmit as TurnTransmit, TurnClientApi, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet,
};
use turn_client_proto::client::TurnClient;
use turn_client_proto::tcp::TurnClientTcp;
use turn_client_proto::types::{TransportType, TurnCredentials};
use turn_client_proto::udp::TurnClientUdp;

/// The clock type `turn-client-proto` takes.
type TurnInstant = turn_client_proto::stun::Instant;

/// Pause before allocating again after a relay allocation ended or failed.
const RELAY_RETRY: Duration = Duration::from_secs(30);

/// After this long without a direct path, a dial also tries through the relay.
pub const RELAY_AFTER: Duration = Duration::from_millis(800);
/// Longest the relay waits while a birthday attempt runs (plain punching 0.3 s, then the
/// probes about 0.75 s).
const RELAY_AFTER_BIRTHDAY: Duration = Duration::from_millis(1800);

/// Our allocation on the operator's TURN relay.
#[derive(Debug)]
struct RelayClient {
    server: SocketAddr,
    turn: TurnClient,
    /// The credentials, to allocate again over another transport.
    username: String,
    password: String,
    /// Our relayed address, once allocated.
    relayed: Option<SocketAddr>,
    /// The allocation failed or ended.
    closed: bool,
    /// When the TURN client next has work.
    wait: Option<Instant>,
}

/// How the client reaches its supernode and what it trusts.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Bootstrap supernode address (the first entry of the host cache).
    pub server: SocketAddr,
    /// Supernode Noise static key (from the bootstrap entry).
    pub server_key: [u8; 32],
    /// Authority Ed25519 key that signs certificates.
    pub authority: [u8; 32],
    /// Wait for a handshake response this long before retrying.
    pub handshake_timeout: Duration,
    /// Longest pause between reconnection attempts.
    pub max_backoff: Duration,
    /// Commands given while offline fail after this long.
    pub command_timeout: Duration,
    /// Give up on a direct path after this long and use the supernode's mailbox.
    pub dial_timeout: Duration,
    /// Relay-only mode: never reveal this device's addresses to peers (no direct
    /// sessions; messages go through the supernode until a relay exists).
    pub relay_only: bool,
    /// The birthday technique for pairs where one NAT has endpoint-dependent mapping.
    pub birthday: BirthdayConfig,
    /// The supernode link while only one supernode is known (default
    /// [`LinkConfig::client`]: keepalive every 25 s, dead after 80 s of silence).
    pub link: LinkConfig,
    /// The supernode link once other supernodes of a fleet are known (default
    /// [`LinkConfig::fleet_client`]: keepalive every 10 s, dead when one gets no echo
    /// within 3 s), so that users of a vanished supernode move within 15 s.
    pub fleet_link: LinkConfig,
}

impl ClientConfig {
    /// Defaults for a supernode at `server` with key `server_key` and `authority`.
    pub fn new(server: SocketAddr, server_key: [u8; 32], authority: [u8; 32]) -> Self {
        ClientConfig {
            server,
            server_key,
            authority,
            handshake_timeout: Duration::from_millis(1000),
            max_backoff: Duration::from_secs(8),
            command_timeout: Duration::from_secs(10),
            dial_timeout: Duration::from_secs(3),
            relay_only: false,
            birthday: BirthdayConfig::default(),
            link: LinkConfig::client(),
            fleet_link: LinkConfig::fleet_client(),
        }
    }
}

/// Identifies a command given to the client.
pub type CommandId = u64;

/// Something the user asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// Create an account with this device.
    Register {
        /// Name.
        username: Username,
        /// Password.
        password: String,
    },
    /// Enrol this device into an existing account.
    Enroll {
        /// Name.
        username: Username,
        /// Password.
        password: String,
    },
    /// Change presence.
    SetPresence(Presence),
    /// Send a contact request.
    ContactAdd {
        /// Whom.
        user: Username,
        /// Note.
        note: String,
    },
    /// Answer a contact request or block.
    ContactReply {
        /// Whom.
        user: Username,
        /// Answer.
        action: ContactAction,
    },
    /// Remove a contact.
    ContactRemove {
        /// Whom.
        user: Username,
    },
    /// The whole contact list.
    ContactList,
    /// Prefix search.
    Search {
        /// Prefix.
        prefix: String,
    },
    /// Send a chat message: directly if the contact is online, else to their mailbox.
    SendMessage {
        /// Recipient.
        to: Username,
        /// Text.
        text: String,
    },
    /// Ring a user. Done with [`CommandResult::Call`] once their device rings.
    CallStart {
        /// Callee.
        user: Username,
    },
    /// Answer an incoming call.
    CallAnswer {
        /// The call.
        call_id: u64,
        /// Accept (or decline).
        accept: bool,
    },
    /// Cancel, decline or hang up a call, whatever its state.
    CallHangUp {
        /// The call.
        call_id: u64,
    },
    /// Who may ring us: contacts only, or anyone.
    SetCallPolicy {
        /// Anyone.
        anyone: bool,
    },
}

/// How a message travelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Via {
    /// Over a direct peer session.
    Direct,
    /// Over a relayed peer session.
    Relay,
    /// Through the supernode's offline mailbox.
    Offline,
}

impl Via {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::Relay => "relay",
            Via::Offline => "offline",
        }
    }
}

/// Outcome of a command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CommandResult {
    /// Done.
    Ok,
    /// Contact list.
    Contacts(Vec<ContactEntry>),
    /// Search results.
    Users(Vec<Username>),
    /// Message delivered to the peer or durably queued.
    Sent {
        /// Path taken.
        via: Via,
        /// Message id.
        msg_id: u64,
        /// Time written (unix ms).
        sent_at: u64,
    },
    /// A call rings at the other side.
    Call {
        /// Its id.
        call_id: u64,
    },
    /// Failed.
    Error {
        /// Code.
        code: ErrorCode,
        /// One line for the user.
        detail: String,
    },
}

impl CommandResult {
    fn error(code: ErrorCode, detail: impl Into<String>) -> Self {
        CommandResult::Error {
            code,
            detail: detail.into(),
        }
    }
}

/// Something the driver must act on or show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientEvent {
    /// Logged in to the supernode.
    Online,
    /// Lost the supernode (reconnecting by itself).
    Offline {
        /// Why.
        reason: String,
    },
    /// A new certificate: save it.
    Certificate(Vec<u8>),
    /// The supernodes learnt from the fleet changed: save them and give them back with
    /// [`Client::add_hosts`] at the next start. The bootstrap address is not among them.
    Hosts(Vec<SocketAddr>),
    /// A command finished.
    CommandDone {
        /// Which.
        id: CommandId,
        /// How.
        result: CommandResult,
    },
    /// A message arrived: save it, then call [`Client::message_saved`] with `token`.
    Message {
        /// Acknowledgement token.
        token: u64,
        /// Sender.
        from: Username,
        /// Sender's id for it (deduplicate on `(from, msg_id)`).
        msg_id: u64,
        /// Sender's clock (unix ms).
        sent_at: u64,
        /// Text.
        text: String,
        /// Path.
        via: Via,
    },
    /// A contact relationship changed.
    Contact {
        /// Who.
        user: Username,
        /// New state.
        state: ContactState,
        /// Request note.
        note: String,
    },
    /// A contact's presence changed.
    Presence {
        /// Who.
        user: Username,
        /// Now.
        presence: Presence,
    },
    /// A call changed state (rings, was answered, became active, changed path, ended).
    Call(CallInfo),
    /// A media datagram of an active call arrived from the other side.
    CallMedia {
        /// The call.
        call_id: u64,
        /// The payload, as the other side's media engine sent it.
        bytes: Vec<u8>,
    },
}

/// How long a peer's handshake answer is kept for repeated initiations.
const ANSWERED_INIT_TTL: Duration = Duration::from_secs(10);

/// How long to wait after a `Busy` reject saying `retry_after_ms`: that, plus a uniform
/// jitter of 0 to 50 % of it drawn from `random`, so that clients told the same moment do
/// not all come back at once (protocol section 7.10).
pub fn busy_wait(retry_after_ms: u16, random: u32) -> Duration {
    let base = Duration::from_millis(retry_after_ms as u64);
    base + base.mul_f64(random as f64 / u32::MAX as f64 * 0.5)
}

/// The first 32 bytes of a Noise IK message 1: the initiator's ephemeral key, unique per
/// handshake (the packet decoder guarantees at least 96 bytes).
pub(crate) fn first_32(noise: &[u8]) -> [u8; 32] {
    let mut k = [0u8; 32];
    let n = noise.len().min(32);
    k[..n].copy_from_slice(&noise[..n]);
    k
}

/// The supernode's handshake MAC keys, and the cookie it gave us under load
/// (`peerline_crypto::cookie`).
#[derive(Debug)]
struct ServerCookie {
    keys: MacKeys,
    cookie: Option<([u8; cookie::COOKIE_LEN], Instant)>,
    /// mac1 of our latest initiation: a cookie reply's associated data.
    sent_mac1: [u8; 16],
    sent_with_cookie: bool,
}

impl ServerCookie {
    fn new(server_key: &[u8; 32]) -> Self {
        ServerCookie {
            keys: MacKeys::new(server_key),
            cookie: None,
            sent_mac1: [0; 16],
            sent_with_cookie: false,
        }
    }

    fn current(&self, now: Instant) -> Option<[u8; cookie::COOKIE_LEN]> {
        self.cookie
            .filter(|(_, at)| {
                now.saturating_duration_since(*at) < Duration::from_secs(cookie::COOKIE_USE_S)
            })
            .map(|(c, _)| c)
    }
}

/// Connection state towards the supernode.
#[derive(Debug)]
enum Server {
    Offline {
        retry_at: Instant,
        attempt: u32,
    },
    Handshaking {
        hs: Box<Handshake>,
        index: u32,
        deadline: Instant,
        attempt: u32,
    },
    Up {
        link: Box<Link>,
        authed: bool,
    },
    /// Replaced by a login elsewhere: no automatic reconnection.
    Stopped,
}

/// What a supernode request of ours was for.
#[derive(Debug)]
enum ServerReq {
    Command(CommandId, Command),
    CallInvite(CommandId, u64),
    /// A call signal; the command to finish with the answer, if any.
    CallSignal(Option<CommandId>, u64),
    ContactPage(CommandId),
    Connect(Username),
    Store(CommandId),
    Renew,
    Presence,
    Relay,
}

#[derive(Debug)]
struct Outgoing {
    id: CommandId,
    to: Username,
    msg_id: u64,
    sent_at: u64,
    text: String,
}

#[derive(Debug)]
struct Dial {
    user: Username,
    hs: Handshake,
    packet: Vec<u8>,
    candidates: Vec<SocketAddr>,
    /// Addresses learnt from probes that reached us through our relay.
    relay_candidates: Vec<SocketAddr>,
    /// From this instant the handshake also goes out through the relay.
    relay_from: Instant,
    /// An attempt to move a relayed session to a direct path: direct candidates only, and
    /// nothing waits on it (on expiry the relayed session simply stays).
    upgrade: bool,
    next_send: Instant,
    deadline: Instant,
}

/// A relayed session we keep trying to move to a direct path.
#[derive(Debug)]
struct Upgrade {
    /// The peer's Noise key (from the session).
    remote_static: [u8; 32],
    /// Its direct candidates.
    candidates: Vec<SocketAddr>,
    next_try: Instant,
}

/// Interval between attempts to move a relayed session to a direct path.
const UPGRADE_INTERVAL: Duration = Duration::from_secs(2);
/// Chat messages remembered per client to drop duplicates (a message re-sent after a
/// session moved to another path).
const RECENT_MESSAGES: usize = 4096;

/// Probes sent towards a caller's candidates while its handshake is expected.
#[derive(Debug)]
struct Punch {
    user: Username,
    candidates: Vec<SocketAddr>,
    next_send: Instant,
    until: Instant,
}

/// Interval between hole-punching probes and handshake retransmissions during setup.
const PROBE_INTERVAL: Duration = Duration::from_millis(200);
/// Most candidates one dial tries (offered plus learnt from probes).
const MAX_DIAL_CANDIDATES: usize = 16;

#[derive(Debug)]
struct Peer {
    user: Username,
    link: Link,
    /// The session runs through our TURN allocation.
    relayed: bool,
    /// The extra socket the session runs on (found by the birthday technique), or `None`
    /// for the main socket.
    socket: Option<usize>,
}

#[derive(Debug)]
enum Ack {
    Server(u64),
    Peer(u32, u64),
}

/// How long a supernode whose session died is skipped when choosing where to log in.
const SUSPECT_FOR: Duration = Duration::from_secs(30);

/// Whether an address from the fleet can be a supernode's (not a wildcard, not port 0).
fn usable_host(h: &SocketAddr) -> bool {
    !h.ip().is_unspecified() && h.port() != 0
}

/// A hole-punching probe datagram (it carries nothing but its type).
fn probe_packet() -> Vec<u8> {
    let mut b = Vec::with_capacity(8);
    Packet::Probe.encode(&mut b);
    b
}

/// The client state machine.
pub struct Client {
    cfg: ClientConfig,
    keys: DeviceKeys,
    cert: Option<Certificate>,
    clock: WallClock,
    rng: ChaCha20Rng,
    server: Server,
    /// The host cache: the bootstrap address first, then the supernodes learnt from the
    /// fleet (deduplicated, at most `MAX_HOSTS + 1`).
    hosts: Vec<SocketAddr>,
    /// The supernode the session is with, or the next login goes to.
    current: SocketAddr,
    /// Hosts whose session died lately, and until when they are skipped.
    suspects: Vec<(SocketAddr, Instant)>,
    /// Hosts moved to at once (Full/Draining, Redirect) since the last login: once every
    /// other host was tried, refusals wait out the normal backoff.
    hops: usize,
    presence: Presence,
    local_candidates: Vec<SocketAddr>,
    next_command: CommandId,
    /// Commands waiting for the session to be up, with their deadline.
    queued: VecDeque<(CommandId, Command, Instant)>,
    server_reqs: HashMap<u64, ServerReq>,
    contact_pages: HashMap<CommandId, Vec<ContactEntry>>,
    /// Messages waiting for a direct session (or the mailbox) per recipient.
    outbox: HashMap<Username, Vec<Outgoing>>,
    dials: HashMap<u32, Dial>,
    punches: Vec<Punch>,
    peers: HashMap<u32, Peer>,
    peer_by_user: HashMap<Username, u32>,
    peer_reqs: HashMap<(u32, u64), Outgoing>,
    /// Noise keys of contacts whose connection we agreed to, with expiry.
    expected: HashMap<[u8; 32], (Username, Instant)>,
    acks: HashMap<u64, Ack>,
    next_ack: u64,
    /// Mailbox submissions in flight: command -> (msg_id, sent_at).
    pending_store: HashMap<CommandId, Outgoing>,
    /// Messages to send again once back online, with their deadline.
    resend: Vec<(Outgoing, Instant)>,
    /// Peer initiations answered recently, by initiator ephemeral key.
    answered_inits: HashMap<[u8; 32], (Vec<u8>, Instant)>,
    /// Handshake MACs and the supernode's cookie.
    server_cookie: ServerCookie,
    /// mac1 keys for initiations to us (peers dialing us).
    own_macs: MacKeys,
    /// Our TURN allocation, when the supernode offers a relay.
    relay: Option<RelayClient>,
    /// Relayed sessions we try to move to a direct path, by peer.
    upgrades: HashMap<Username, Upgrade>,
    /// Recently received and saved chat messages `(from, msg_id)`, to answer duplicates
    /// silently.
    recent: HashSet<(Username, u64)>,
    /// Chat messages handed to the driver and not yet saved, by acknowledgement token.
    unsaved: HashMap<u64, (Username, u64)>,
    recent_order: VecDeque<(Username, u64)>,
    /// Peer addresses reached through our relay: datagrams to them are wrapped.
    relayed_peers: HashSet<SocketAddr>,
    /// Datagrams to send through the relay whatever their destination.
    relay_sends: VecDeque<Transmit>,
    /// Datagrams to send directly whatever their destination (attempts at a direct path
    /// to a peer currently reached through the relay).
    direct_sends: VecDeque<Transmit>,
    /// Calls by id (ended ones are dropped once reported).
    calls: HashMap<u64, Call>,
    /// Strangers whose session with us exists only for a call: no messages.
    call_only: HashSet<Username>,
    /// Strangers may ring us (sent again at every login).
    anyone_can_call: bool,
    /// Our reflexive address as the supernode and the relay see it.
    mapping: MappingProbe,
    /// Birthday attempts by peer.
    birthdays: HashMap<Username, Birthday>,
    /// Datagrams to send from an extra socket: `(socket, datagram)`.
    extra_transmits: VecDeque<(usize, Transmit)>,
    /// Anchor for the TURN client's clock.
    t0: Instant,
    /// Reach the relay over TCP (the driver found UDP blocked).
    relay_over_tcp: bool,
    /// When to ask for relay credentials again after the allocation ended.
    relay_retry: Option<Instant>,
    /// The latest `now` the driver gave us (for wrapping datagrams in `poll_transmit`).
    last_now: Instant,
    renew_after: Option<Instant>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<ClientEvent>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Client(online={})", self.is_online())
    }
}

fn err_result(body: &Response) -> Option<CommandResult> {
    match body {
        Response::Error { code, detail } => Some(CommandResult::error(*code, detail.clone())),
        _ => None,
    }
}

impl Client {
    /// A client with its device keys and (if enrolled) its certificate bytes.
    ///
    /// A certificate that does not verify against the configured authority is ignored
    /// (the device must enrol again).
    pub fn new(
        cfg: ClientConfig,
        keys: DeviceKeys,
        cert: Option<&[u8]>,
        seed: [u8; 32],
        clock: WallClock,
        now: Instant,
    ) -> Self {
        let cert = cert.and_then(|b| Certificate::verify(b, &cfg.authority).ok());
        let server_cookie = ServerCookie::new(&cfg.server_key);
        let own_macs = MacKeys::new(&keys.noise_public());
        let bootstrap = cfg.server;
        Client {
            server_cookie,
            own_macs,
            cfg,
            keys,
            cert,
            clock,
            rng: ChaCha20Rng::from_seed(seed),
            server: Server::Offline {
                retry_at: now,
                attempt: 0,
            },
            hosts: vec![bootstrap],
            current: bootstrap,
            suspects: Vec::new(),
            hops: 0,
            presence: Presence::Online,
            local_candidates: Vec::new(),
            next_command: 1,
            queued: VecDeque::new(),
            server_reqs: HashMap::new(),
            contact_pages: HashMap::new(),
            outbox: HashMap::new(),
            dials: HashMap::new(),
            punches: Vec::new(),
            peers: HashMap::new(),
            peer_by_user: HashMap::new(),
            peer_reqs: HashMap::new(),
            expected: HashMap::new(),
            acks: HashMap::new(),
            next_ack: 1,
            pending_store: HashMap::new(),
            resend: Vec::new(),
            answered_inits: HashMap::new(),
            relay: None,
            upgrades: HashMap::new(),
            recent: HashSet::new(),
            unsaved: HashMap::new(),
            recent_order: VecDeque::new(),
            relayed_peers: HashSet::new(),
            relay_sends: VecDeque::new(),
            direct_sends: VecDeque::new(),
            calls: HashMap::new(),
            call_only: HashSet::new(),
            anyone_can_call: false,
            mapping: MappingProbe::default(),
            birthdays: HashMap::new(),
            extra_transmits: VecDeque::new(),
            t0: now,
            relay_over_tcp: false,
            relay_retry: None,
            last_now: now,
            renew_after: None,
            transmits: VecDeque::new(),
            events: VecDeque::new(),
        }
    }

    /// Whether the session to the supernode is up and authenticated.
    pub fn is_online(&self) -> bool {
        matches!(self.server, Server::Up { authed: true, .. })
    }

    /// The supernode the session is with (or the next login goes to).
    pub fn supernode(&self) -> SocketAddr {
        self.current
    }

    /// The host cache: the bootstrap address first, then the supernodes learnt from the
    /// fleet.
    pub fn hosts(&self) -> &[SocketAddr] {
        &self.hosts
    }

    /// Whether other supernodes of a fleet are known (the supernode link then uses
    /// [`ClientConfig::fleet_link`]).
    pub fn in_fleet(&self) -> bool {
        self.hosts.len() > 1
    }

    /// Adds supernodes saved from an earlier run (see [`ClientEvent::Hosts`]) to the host
    /// cache, after the ones already known.
    pub fn add_hosts(&mut self, hosts: &[SocketAddr]) {
        for h in hosts {
            if self.hosts.len() > MAX_HOSTS {
                break;
            }
            if usable_host(h) && !self.hosts.contains(h) {
                self.hosts.push(*h);
            }
        }
        self.apply_link_config();
    }

    /// The supernodes learnt from the fleet (the cache without the bootstrap address).
    fn learnt_hosts(&self) -> Vec<SocketAddr> {
        self.hosts.iter().skip(1).copied().collect()
    }

    /// The fleet's list replaces what was learnt before (a supernode that left the fleet
    /// leaves the cache); the bootstrap address stays first.
    fn learn_hosts(&mut self, hosts: &[SocketAddr]) {
        let before = self.learnt_hosts();
        self.hosts.truncate(1);
        for h in hosts {
            if self.hosts.len() > MAX_HOSTS {
                break;
            }
            if usable_host(h) && !self.hosts.contains(h) {
                self.hosts.push(*h);
            }
        }
        let after = self.learnt_hosts();
        if after != before {
            tracing::info!(hosts = after.len(), "fleet hosts learnt");
            self.events.push_back(ClientEvent::Hosts(after));
        }
        self.apply_link_config();
    }

    /// Gives the supernode link the timing for a fleet or for a lone supernode.
    fn apply_link_config(&mut self) {
        let want = self.link_config();
        if let Server::Up { link, .. } = &mut self.server {
            link.set_config(want);
        }
    }

    fn link_config(&self) -> LinkConfig {
        if self.in_fleet() {
            self.cfg.fleet_link.clone()
        } else {
            self.cfg.link.clone()
        }
    }

    /// The current supernode's session died: leave it out of the rotation for a while, so
    /// that a lost handshake with its successor does not send the client back to it.
    fn suspect(&mut self, now: Instant) {
        self.suspects
            .retain(|(h, until)| *until > now && *h != self.current);
        if self.suspects.len() <= MAX_HOSTS {
            self.suspects.push((self.current, now + SUSPECT_FOR));
        }
    }

    /// Points the next login at the host after the current one in the cache (the first
    /// learnt one, least loaded, when the current one is no longer listed), skipping
    /// hosts whose session died lately unless no other is left.
    fn next_host(&mut self, now: Instant) {
        let n = self.hosts.len();
        let start = match self.hosts.iter().position(|h| *h == self.current) {
            Some(p) => p + 1,
            None => 1,
        };
        let order: Vec<SocketAddr> = (0..n).map(|k| self.hosts[(start + k) % n]).collect();
        let suspected = |h: &SocketAddr| {
            self.suspects
                .iter()
                .any(|(s, until)| s == h && *until > now)
        };
        let next = order
            .iter()
            .find(|h| !suspected(h))
            .or(order.first())
            .copied()
            .unwrap_or(self.current);
        self.move_to(next);
    }

    /// Points the next login at `host`.
    fn move_to(&mut self, host: SocketAddr) {
        if host == self.current {
            return;
        }
        tracing::info!(from = %self.current, to = %host, "changing supernode");
        // Its reflexive-address answer and cookie belong to the old supernode.
        self.mapping.forget(self.current);
        self.server_cookie.cookie = None;
        self.current = host;
    }

    /// The certified username, once enrolled.
    pub fn username(&self) -> Option<&Username> {
        self.cert.as_ref().map(|c| c.username())
    }

    /// The current certificate.
    pub fn certificate(&self) -> Option<&Certificate> {
        self.cert.as_ref()
    }

    /// The presence the user chose.
    pub fn presence(&self) -> Presence {
        self.presence
    }

    /// Sets the addresses this device can be reached at directly (for connection setup).
    pub fn set_local_candidates(&mut self, c: Vec<SocketAddr>) {
        self.local_candidates = c;
        self.local_candidates.truncate(MAX_CANDIDATES - 1);
    }

    /// Users with a direct session up.
    pub fn direct_peers(&self) -> Vec<Username> {
        self.peers.values().map(|p| p.user.clone()).collect()
    }

    fn unix_ms(&self, now: Instant) -> u64 {
        self.clock.unix_ms(now)
    }

    fn random_tid(&mut self) -> u128 {
        (u128::from(self.rng.next_u64()) << 64) | u128::from(self.rng.next_u64())
    }

    /// Whether our NAT's mapping depends on the destination (learnt from two STUN
    /// servers). Never claimed in relay-only mode, which reveals nothing about us.
    pub fn hard_nat(&self) -> bool {
        !self.cfg.relay_only && self.mapping.endpoint_dependent()
    }

    /// How many extra UDP sockets the driver should hold open: the birthday technique's,
    /// while an attempt on our side runs or a session found by one lives; else 0. Their
    /// datagrams go through [`Client::poll_extra_transmit`] and
    /// [`Client::handle_extra_datagram`], identified by index.
    pub fn extra_sockets(&self) -> usize {
        let hard_attempt = self
            .birthdays
            .values()
            .any(|b| matches!(b.role, crate::nat::Role::Hard { .. }));
        if hard_attempt || self.peers.values().any(|p| p.socket.is_some()) {
            self.cfg.birthday.sockets
        } else {
            0
        }
    }

    /// Next datagram to send from an extra socket, as `(socket index, datagram)`.
    pub fn poll_extra_transmit(&mut self) -> Option<(usize, Transmit)> {
        if self.extra_transmits.is_empty() {
            self.flush_links();
        }
        self.extra_transmits.pop_front()
    }

    /// Starts a birthday attempt with `user` when exactly one side's NAT is hard.
    fn start_birthday(
        &mut self,
        now: Instant,
        user: &Username,
        peer_candidates: &[SocketAddr],
        peer_hard: bool,
    ) {
        if self.cfg.relay_only || self.relay_over_tcp {
            return;
        }
        // The supernode puts the address it sees first: the peer's public one.
        let relay_ip = self.relay.as_ref().map(|r| r.server.ip());
        let Some(public) = peer_candidates
            .first()
            .copied()
            .filter(|c| Some(c.ip()) != relay_ip)
        else {
            return;
        };
        let Some(b) = Birthday::start(&self.cfg.birthday, now, self.hard_nat(), peer_hard, public)
        else {
            return;
        };
        tracing::debug!(peer = %user, role = ?b.role, "birthday attempt");
        // The relay waits while the attempt has its chance.
        let until = b.until.min(now + RELAY_AFTER_BIRTHDAY);
        for d in self.dials.values_mut().filter(|d| &d.user == user) {
            d.relay_from = d.relay_from.max(until);
        }
        self.birthdays.insert(user.clone(), b);
        self.birthday_tick(now);
    }

    /// Sends due birthday probes; ends attempts that are over or succeeded.
    fn birthday_tick(&mut self, now: Instant) {
        let cfg = self.cfg.birthday.clone();
        let peer_by_user = &self.peer_by_user;
        let peers = &self.peers;
        // Over, or a direct session is up (a relayed one does not stop the attempt).
        self.birthdays.retain(|u, b| {
            let direct = peer_by_user
                .get(u)
                .and_then(|i| peers.get(i))
                .is_some_and(|p| !p.relayed);
            !b.finished(&cfg, now) && !direct
        });
        let probe = probe_packet();
        let rng = &mut self.rng;
        for b in self.birthdays.values_mut() {
            match b.step(&cfg, now, || rng.next_u32()) {
                Sends::None => {}
                Sends::FromEverySocket(dst) => {
                    for k in 0..cfg.sockets {
                        self.extra_transmits.push_back((
                            k,
                            Transmit {
                                dst,
                                payload: probe.clone(),
                            },
                        ));
                    }
                }
                Sends::Spray(dsts) => {
                    for dst in dsts {
                        self.direct_sends.push_back(Transmit {
                            dst,
                            payload: probe.clone(),
                        });
                    }
                }
            }
        }
    }

    /// Handles a datagram that arrived on extra socket `socket`.
    pub fn handle_extra_datagram(
        &mut self,
        now: Instant,
        socket: usize,
        from: SocketAddr,
        bytes: &[u8],
    ) {
        self.last_now = self.last_now.max(now);
        if self.cfg.relay_only || socket >= self.cfg.birthday.sockets {
            return;
        }
        match Packet::decode(bytes) {
            Ok(Packet::Probe) => {
                // Only a peer we run an attempt with may open a path here.
                let Some(user) = self
                    .birthdays
                    .iter()
                    .find(|(_, b)| {
                        matches!(b.role, crate::nat::Role::Hard { target } if target.ip() == from.ip())
                    })
                    .map(|(u, _)| u.clone())
                else {
                    return;
                };
                tracing::debug!(peer = %user, socket, "birthday probe arrived");
                let probe = probe_packet();
                // Answer from this socket: the peer (if it dials) learns the port; and if
                // we dial, our handshake goes out through the mapping that works.
                self.extra_transmits.push_back((
                    socket,
                    Transmit {
                        dst: from,
                        payload: probe,
                    },
                ));
                for d in self.dials.values().filter(|d| d.user == user && !d.upgrade) {
                    self.extra_transmits.push_back((
                        socket,
                        Transmit {
                            dst: from,
                            payload: d.packet.clone(),
                        },
                    ));
                }
            }
            Ok(Packet::HandshakeInit { sender, noise, .. }) if self.own_macs.mac1_ok(bytes) => {
                self.on_peer_handshake(now, from, sender, noise, Some(socket))
            }
            Ok(Packet::HandshakeResponse {
                sender,
                receiver,
                noise,
            }) if self.dials.contains_key(&receiver) => {
                self.on_handshake_response(now, from, sender, receiver, noise, Some(socket));
            }
            Ok(Packet::Transport {
                receiver,
                counter,
                ciphertext,
            }) => {
                if let Some(p) = self.peers.get_mut(&receiver) {
                    // Authenticated traffic decides the path, as the link follows `from`.
                    if p.link
                        .handle_transport(now, from, counter, ciphertext)
                        .is_ok()
                    {
                        p.socket = Some(socket);
                        p.relayed = false;
                    }
                    self.process(now);
                }
            }
            _ => {}
        }
    }

    /// Queues `t` on the main socket, or on extra socket `socket`.
    fn send_on(&mut self, socket: Option<usize>, t: Transmit) {
        match socket {
            Some(k) => self.extra_transmits.push_back((k, t)),
            None => self.transmits.push_back(t),
        }
    }

    fn seed(&mut self) -> [u8; 32] {
        let mut s = [0u8; 32];
        self.rng.fill_bytes(&mut s);
        s
    }

    fn index(&mut self) -> u32 {
        loop {
            let i = self.rng.next_u32();
            if i != 0 && !self.peers.contains_key(&i) && !self.dials.contains_key(&i) {
                return i;
            }
        }
    }

    // ----- supernode session -----

    fn start_handshake(&mut self, now: Instant, attempt: u32) {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            unix_ms: self.unix_ms(now),
            cert: self.cert.as_ref().map(|c| c.to_bytes()),
            presence: self.presence,
            relay_only: self.cfg.relay_only,
        };
        let seed = self.seed();
        let index = self.index();
        let started = hello.encode().ok().and_then(|p| {
            Handshake::initiate(&self.keys.noise_private(), &self.cfg.server_key, seed, &p).ok()
        });
        let Some((hs, msg1)) = started else {
            self.server = Server::Offline {
                retry_at: now + self.cfg.max_backoff,
                attempt: attempt + 1,
            };
            return;
        };
        let c = self.server_cookie.current(now);
        let out = cookie::encode_init(index, &msg1, &self.server_cookie.keys, c.as_ref());
        self.server_cookie.sent_mac1 = cookie::mac1_of(&out);
        self.server_cookie.sent_with_cookie = c.is_some();
        self.transmits.push_back(Transmit {
            dst: self.current,
            payload: out,
        });
        self.server = Server::Handshaking {
            hs: Box::new(hs),
            index,
            deadline: now + self.cfg.handshake_timeout,
            attempt,
        };
    }

    fn backoff(&mut self, attempt: u32) -> Duration {
        let base = Duration::from_millis(250).saturating_mul(1u32 << attempt.min(8));
        let cap = base.min(self.cfg.max_backoff);
        // Full jitter in [cap/2, cap]: a restarted supernode is not hit by every client at once.
        let j = 0.5 + (self.rng.next_u32() as f64 / u32::MAX as f64) * 0.5;
        cap.mul_f64(j)
    }

    fn go_offline(&mut self, now: Instant, reason: &str, attempt: u32) {
        let was_online = self.is_online();
        let delay = self.backoff(attempt);
        self.server = Server::Offline {
            retry_at: now + delay,
            attempt: attempt + 1,
        };
        // Requests in flight on the dead session run again once back online (they are
        // idempotent: messages keep their ids); each still fails after its deadline.
        let deadline = now + self.cfg.command_timeout;
        for (_, r) in std::mem::take(&mut self.server_reqs) {
            match r {
                ServerReq::Command(id, cmd) => self.queued.push_back((id, cmd, deadline)),
                ServerReq::ContactPage(id) => {
                    self.contact_pages.remove(&id);
                    self.queued.push_back((id, Command::ContactList, deadline));
                }
                ServerReq::Store(id) => {
                    if let Some(o) = self.pending_store.remove(&id) {
                        self.resend.push((o, deadline));
                    }
                }
                ServerReq::Connect(user) => {
                    for o in self.outbox.remove(&user).unwrap_or_default() {
                        self.resend.push((o, deadline));
                    }
                }
                ServerReq::CallInvite(id, call_id) => {
                    // A call is not worth ringing late: the user tries again.
                    self.calls.remove(&call_id);
                    self.done(
                        id,
                        CommandResult::error(
                            ErrorCode::Unavailable,
                            "lost the supernode while ringing: try again",
                        ),
                    );
                }
                ServerReq::CallSignal(id, _) => {
                    if let Some(id) = id {
                        self.done(
                            id,
                            CommandResult::error(
                                ErrorCode::Unavailable,
                                "lost the supernode: the other side was not told",
                            ),
                        );
                    }
                }
                ServerReq::Renew | ServerReq::Presence | ServerReq::Relay => {}
            }
        }
        if was_online {
            tracing::info!(reason, "offline; reconnecting");
            self.events.push_back(ClientEvent::Offline {
                reason: reason.to_string(),
            });
        }
    }

    fn on_server_up(&mut self, now: Instant) {
        let tid = self.random_tid();
        self.hops = 0;
        self.mapping.ask(now, self.current, tid);
        let Server::Up { link, authed } = &mut self.server else {
            return;
        };
        let needs_renewal = self
            .cert
            .as_ref()
            .is_some_and(|c| c.check_time(self.clock.unix_s(now)).is_err());
        if self.cert.is_none() {
            // Registration or enrolment session: only those commands run.
            *authed = false;
        } else if needs_renewal {
            *authed = false;
            if let Ok(id) = link.send_request(now, Request::RenewCert) {
                self.server_reqs.insert(id, ServerReq::Renew);
            }
        } else {
            *authed = true;
            self.became_online(now);
        }
        self.run_queued(now);
    }

    fn became_online(&mut self, now: Instant) {
        tracing::info!("online");
        self.events.push_back(ClientEvent::Online);
        self.schedule_renewal(now);
        if self.relay.as_ref().is_none_or(|r| r.closed) {
            self.request_relay(now);
        }
        if self.presence != Presence::Online {
            let p = self.presence;
            if let Server::Up { link, .. } = &mut self.server {
                if let Ok(id) = link.send_request(now, Request::SetPresence(p)) {
                    self.server_reqs.insert(id, ServerReq::Presence);
                }
            }
        }
        if self.anyone_can_call {
            // The supernode forgets it with the session.
            if let Server::Up { link, .. } = &mut self.server {
                if let Ok(id) = link.send_request(now, Request::SetCallPolicy { anyone: true }) {
                    self.server_reqs.insert(id, ServerReq::Presence);
                }
            }
        }
    }

    fn schedule_renewal(&mut self, now: Instant) {
        self.renew_after = self.cert.as_ref().map(|c| {
            let unix = self.clock.unix_s(now);
            let half = c.lifetime() / 2;
            let wait = c.remaining(unix).saturating_sub(half);
            now + Duration::from_secs(wait)
        });
    }

    /// Starts connecting (or reconnects at once if offline; a login in progress starts
    /// again, as when the driver just opened another path to the supernode).
    pub fn connect(&mut self, now: Instant) {
        match self.server {
            Server::Offline { attempt, .. } | Server::Handshaking { attempt, .. } => {
                self.start_handshake(now, attempt)
            }
            // The user acts on this device again: take the account back.
            Server::Stopped => self.start_handshake(now, 0),
            _ => {}
        }
    }

    // ----- commands -----

    /// Gives a command; its result arrives as [`ClientEvent::CommandDone`] with this id.
    pub fn command(&mut self, now: Instant, cmd: Command) -> CommandId {
        self.last_now = self.last_now.max(now);
        let id = self.next_command;
        self.next_command += 1;
        if let Command::SetPresence(p) = cmd {
            if p == Presence::Offline {
                self.done(
                    id,
                    CommandResult::error(ErrorCode::BadRequest, "use `down` to go offline"),
                );
                return id;
            }
            self.presence = p;
        }
        if let Command::SendMessage { to, .. } = &cmd {
            if !self.is_online() && self.peer_by_user.contains_key(to) {
                // A direct session needs no supernode: chat goes on while the client is
                // offline or logging in elsewhere.
                self.run(now, id, cmd);
                self.flush_links();
                return id;
            }
        }
        self.queued
            .push_back((id, cmd, now + self.cfg.command_timeout));
        self.run_queued(now);
        id
    }

    fn done(&mut self, id: CommandId, result: CommandResult) {
        self.events
            .push_back(ClientEvent::CommandDone { id, result });
    }

    fn run_queued(&mut self, now: Instant) {
        let (up, authed) = match &self.server {
            Server::Up { authed, .. } => (true, *authed),
            _ => (false, false),
        };
        if !up {
            if matches!(self.server, Server::Offline { .. } | Server::Stopped)
                && !self.queued.is_empty()
            {
                // A command is a reason to try now rather than wait out the backoff.
                self.connect(now);
            }
            return;
        }
        let mut keep = VecDeque::new();
        while let Some((id, cmd, deadline)) = self.queued.pop_front() {
            let enrolment = matches!(cmd, Command::Register { .. } | Command::Enroll { .. });
            if enrolment && self.cert.is_some() {
                self.done(
                    id,
                    CommandResult::error(ErrorCode::BadRequest, "this device is already enrolled"),
                );
            } else if enrolment || authed {
                self.run(now, id, cmd);
            } else {
                keep.push_back((id, cmd, deadline));
            }
        }
        self.queued = keep;
        if authed {
            for (o, _) in std::mem::take(&mut self.resend) {
                self.send_message(now, o);
            }
        }
    }

    fn server_request(
        &mut self,
        now: Instant,
        body: Request,
        purpose: ServerReq,
    ) -> Result<(), CommandResult> {
        let Server::Up { link, .. } = &mut self.server else {
            return Err(CommandResult::error(
                ErrorCode::Unavailable,
                "not connected to the supernode",
            ));
        };
        match link.send_request(now, body) {
            Ok(rid) => {
                self.server_reqs.insert(rid, purpose);
                Ok(())
            }
            Err(e) => Err(CommandResult::error(ErrorCode::Unavailable, e.to_string())),
        }
    }

    fn run(&mut self, now: Instant, id: CommandId, cmd: Command) {
        let sign_key = self.keys.sign_public();
        let kept = cmd.clone();
        let body = match cmd {
            Command::Register { username, password } => Request::Register {
                username,
                password,
                sign_key,
            },
            Command::Enroll { username, password } => Request::Enroll {
                username,
                password,
                sign_key,
            },
            Command::SetPresence(p) => Request::SetPresence(p),
            Command::ContactAdd { user, note } => Request::ContactAdd { user, note },
            Command::ContactReply { user, action } => Request::ContactReply { user, action },
            Command::ContactRemove { user } => Request::ContactRemove { user },
            Command::ContactList => {
                self.contact_pages.insert(id, Vec::new());
                if let Err(e) = self.server_request(
                    now,
                    Request::ContactList { offset: 0 },
                    ServerReq::ContactPage(id),
                ) {
                    self.contact_pages.remove(&id);
                    self.done(id, e);
                }
                return;
            }
            Command::Search { prefix } => Request::Search { prefix },
            Command::SendMessage { to, text } => {
                let mut b = [0u8; 8];
                self.rng.fill_bytes(&mut b);
                let out = Outgoing {
                    id,
                    to: to.clone(),
                    msg_id: u64::from_le_bytes(b),
                    sent_at: self.unix_ms(now),
                    text,
                };
                return self.send_message(now, out);
            }
            Command::CallStart { user } => return self.call_start(now, id, user),
            Command::CallAnswer { call_id, accept } => {
                return self.call_answer(now, id, call_id, accept)
            }
            Command::CallHangUp { call_id } => {
                self.call_hang_up(now, call_id, "hung up");
                return self.done(id, CommandResult::Ok);
            }
            Command::SetCallPolicy { anyone } => {
                self.anyone_can_call = anyone;
                Request::SetCallPolicy { anyone }
            }
        };
        if let Err(e) = self.server_request(now, body, ServerReq::Command(id, kept)) {
            self.done(id, e);
        }
    }

    fn send_message(&mut self, now: Instant, out: Outgoing) {
        if self.username() == Some(&out.to) {
            return self.done(
                out.id,
                CommandResult::error(ErrorCode::BadRequest, "you cannot message yourself"),
            );
        }
        if let Some(&pi) = self.peer_by_user.get(&out.to) {
            if let Some(p) = self.peers.get_mut(&pi) {
                let body = Request::Chat {
                    msg_id: out.msg_id,
                    sent_at: out.sent_at,
                    text: out.text.clone(),
                };
                if let Ok(rid) = p.link.send_request(now, body) {
                    self.peer_reqs.insert((pi, rid), out);
                    return;
                }
            }
        }
        if !self.is_online() {
            // No direct session and no supernode to set one up: once logged in again.
            let deadline = now + self.cfg.command_timeout;
            self.resend.push((out, deadline));
            return;
        }
        if self.cfg.relay_only && self.relayed_address().is_none() {
            // Without a relay allocation a connection setup would hand out our addresses.
            return self.store_one(now, out);
        }
        let to = out.to.clone();
        let dialing = self.outbox.contains_key(&to);
        self.outbox.entry(to.clone()).or_default().push(out);
        if !dialing {
            let candidates = self.offer();
            let body = Request::Connect {
                user: to.clone(),
                candidates,
                hard_nat: self.hard_nat(),
            };
            if let Err(CommandResult::Error { detail, .. }) =
                self.server_request(now, body, ServerReq::Connect(to.clone()))
            {
                self.fail_outbox(&to, &detail);
            }
        }
    }

    fn fail_outbox(&mut self, user: &Username, detail: &str) {
        for o in self.outbox.remove(user).unwrap_or_default() {
            self.done(
                o.id,
                CommandResult::error(ErrorCode::Unavailable, detail.to_string()),
            );
        }
    }

    /// Sends everything waiting for `user` to the supernode's mailbox.
    fn store_outbox(&mut self, now: Instant, user: &Username) {
        for o in self.outbox.remove(user).unwrap_or_default() {
            self.store_one(now, o);
        }
    }

    fn store_one(&mut self, now: Instant, o: Outgoing) {
        if !self.is_online() {
            // The mailbox is on the supernode: submit once logged in again (the message
            // keeps its id, so the recipient drops a copy that did arrive directly).
            let deadline = now + self.cfg.command_timeout;
            self.resend.push((o, deadline));
            return;
        }
        let body = Request::StoreMessage {
            to: o.to.clone(),
            msg_id: o.msg_id,
            sent_at: o.sent_at,
            text: o.text.clone(),
        };
        let id = o.id;
        if let Err(e) = self.server_request(now, body, ServerReq::Store(id)) {
            self.done(id, e);
        } else {
            self.pending_store.insert(id, o);
        }
    }

    /// Confirms that the message with `token` was saved; acknowledges it to its sender.
    pub fn message_saved(&mut self, now: Instant, token: u64) {
        self.last_now = self.last_now.max(now);
        if let Some(key) = self.unsaved.remove(&token) {
            self.recent.insert(key.clone());
            self.recent_order.push_back(key);
            if self.recent_order.len() > RECENT_MESSAGES {
                if let Some(old) = self.recent_order.pop_front() {
                    self.recent.remove(&old);
                }
            }
        }
        match self.acks.remove(&token) {
            Some(Ack::Server(rid)) => {
                if let Server::Up { link, .. } = &mut self.server {
                    let _ = link.respond(now, rid, Response::Ok);
                }
            }
            Some(Ack::Peer(pi, rid)) => {
                if let Some(p) = self.peers.get_mut(&pi) {
                    let _ = p.link.respond(now, rid, Response::Ok);
                }
            }
            None => {}
        }
        self.flush_links();
    }

    /// Closes every session (best effort) before the agent exits.
    pub fn shutdown(&mut self, now: Instant) {
        if let Server::Up { link, .. } = &mut self.server {
            link.close(now);
        }
        for p in self.peers.values_mut() {
            p.link.close(now);
        }
        self.flush_links();
    }

    // ----- input -----

    /// Handles a datagram from `from`.
    pub fn handle_datagram(&mut self, now: Instant, from: SocketAddr, bytes: &[u8]) {
        self.last_now = self.last_now.max(now);
        if peerline_wire::packet::is_stun(bytes) && self.mapping.handle(from, bytes) {
            return;
        }
        if self.relay.as_ref().is_some_and(|r| r.server == from) {
            let tn = self.turn_now(now);
            let local = self.local_candidates.first().copied().unwrap_or(from);
            let Some(r) = self.relay.as_mut() else { return };
            let transport = if self.relay_over_tcp {
                TransportType::Tcp
            } else {
                TransportType::Udp
            };
            let peer_data = match r
                .turn
                .recv(TurnTransmit::new(bytes, transport, from, local), tn)
            {
                TurnRecvRet::PeerData(d) => Some((d.peer, d.data().to_vec())),
                _ => None,
            };
            self.relay_flush(now);
            if let Some((peer, data)) = peer_data {
                self.handle_packet(now, peer, &data, true);
            }
            return;
        }
        self.handle_packet(now, from, bytes, false);
    }

    /// Handles a Peerline datagram from `from`; `relayed` when it came through our relay.
    fn handle_packet(&mut self, now: Instant, from: SocketAddr, bytes: &[u8], relayed: bool) {
        if self.cfg.relay_only && !relayed && from != self.current {
            // Relay-only: peers reach us through the relay or not at all.
            return;
        }
        let packet = Packet::decode(bytes);
        if matches!(
            packet,
            Ok(Packet::HandshakeInit { .. } | Packet::HandshakeResponse { .. })
        ) {
            // The latest handshake decides the path: through our relay, everything we send
            // this peer goes back there; directly, it no longer does.
            if relayed {
                self.relayed_peers.insert(from);
            } else {
                self.relayed_peers.remove(&from);
            }
        }
        match packet {
            Ok(Packet::HandshakeResponse {
                sender,
                receiver,
                noise,
            }) => self.on_handshake_response(now, from, sender, receiver, noise, None),
            // mac1 first: a stranger's junk costs a hash, not Diffie-Hellman work.
            Ok(Packet::HandshakeInit { sender, noise, .. }) if self.own_macs.mac1_ok(bytes) => {
                self.on_peer_handshake(now, from, sender, noise, None)
            }
            Ok(Packet::HandshakeInit { .. }) => {}
            Ok(Packet::CookieReply {
                receiver,
                nonce,
                cookie,
            }) => self.on_cookie_reply(now, from, receiver, &nonce, &cookie),
            Ok(Packet::Reject {
                receiver,
                reason,
                version,
            }) => self.on_reject(now, from, receiver, reason, version),
            Ok(Packet::Transport {
                receiver,
                counter,
                ciphertext,
            }) => {
                if let Server::Up { link, .. } = &mut self.server {
                    if link.local_index() == receiver {
                        let _ = link.handle_transport(now, from, counter, ciphertext);
                        return self.process(now);
                    }
                }
                if let Some(p) = self.peers.get_mut(&receiver) {
                    // Authenticated traffic decides the path, as the link follows `from`.
                    if p.link
                        .handle_transport(now, from, counter, ciphertext)
                        .is_ok()
                    {
                        p.socket = None;
                    }
                    self.process(now);
                }
            }
            Ok(Packet::Reset { receiver }) => {
                // The supernode lost our session (it restarted): log in again now.
                let ours = match &self.server {
                    Server::Up { link, .. } => {
                        link.remote_index() == receiver && from == self.current
                    }
                    _ => false,
                };
                if ours {
                    self.go_offline(now, "the supernode restarted", 0);
                    self.start_handshake(now, 0);
                }
            }
            Ok(Packet::Probe) => self.on_probe(from, relayed),
            Ok(Packet::Stun(_)) | Err(_) => {}
        }
    }

    /// The supernode is under load and wants proof that we receive at our address.
    fn on_cookie_reply(
        &mut self,
        now: Instant,
        from: SocketAddr,
        receiver: u32,
        nonce: &[u8; 24],
        sealed: &[u8; 32],
    ) {
        let Server::Handshaking { index, attempt, .. } = &self.server else {
            return;
        };
        if *index != receiver || from != self.current {
            return;
        }
        let attempt = *attempt;
        let sc = &mut self.server_cookie;
        let Some(c) = sc.keys.open_cookie(nonce, sealed, &sc.sent_mac1) else {
            return;
        };
        sc.cookie = Some((c, now));
        // The supernode did no work for that initiation: send one with the cookie at once
        // (once; a further cookie reply waits for the normal retry).
        if !sc.sent_with_cookie {
            self.start_handshake(now, attempt);
        }
    }

    /// The supernode refused our handshake (or, after login, our device): say why.
    fn on_reject(
        &mut self,
        now: Instant,
        from: SocketAddr,
        receiver: u32,
        reason: RejectReason,
        version: u8,
    ) {
        if from != self.current {
            return;
        }
        if let RejectReason::Busy { retry_after_ms } = reason {
            return self.on_busy(now, receiver, retry_after_ms);
        }
        // Unauthenticated, so it only ever ends a handshake or session early, like a Reset.
        let attempt = match &self.server {
            Server::Handshaking { index, attempt, .. } if *index == receiver => *attempt,
            Server::Up { link, .. } if link.local_index() == receiver => 3,
            _ => return,
        };
        let why = match reason {
            RejectReason::Version => format!(
                "the supernode speaks protocol version {version} and this build {PROTOCOL_VERSION}: upgrade peerline"
            ),
            RejectReason::Stale => "the supernode refused the login: this device's clock is more than 5 minutes off; set the clock right".to_string(),
            RejectReason::RateLimited => {
                "the supernode refused the login: too many logins for this account; retrying later".to_string()
            }
            RejectReason::Revoked => "this device was revoked: enrol it again".to_string(),
            RejectReason::Full => "the supernode is full; trying another".to_string(),
            RejectReason::Draining => "the supernode is shutting down; trying another".to_string(),
            // Handled above; listed so that a new reason is a compile error here.
            RejectReason::Busy { .. } => "the supernode is busy".to_string(),
            RejectReason::Other(b) => format!("the supernode refused the login (reason {b})"),
        };
        let was_online = self.is_online();
        let elsewhere = matches!(reason, RejectReason::Full | RejectReason::Draining);
        if elsewhere {
            self.next_host(now);
        }
        self.go_offline(now, &why, attempt);
        if elsewhere && self.hops + 1 < self.hosts.len() {
            // Another supernode may take us: go there at once, but only to each other host
            // once in a row (a fleet that is full everywhere gets the normal backoff).
            self.hops += 1;
            self.start_handshake(now, attempt);
        }
        if !was_online {
            tracing::warn!(reason = %why, "login refused");
            self.events.push_back(ClientEvent::Offline { reason: why });
        }
    }

    /// The supernode has more logins queued than it can serve soon: come back when it
    /// says, plus jitter, so that a storm's clients spread out. Not a failure: the attempt
    /// count (and so the backoff) stays where it was. Only a handshake in flight ends
    /// (unauthenticated, a forged Busy can only delay a login, like a `RateLimited`).
    fn on_busy(&mut self, now: Instant, receiver: u32, retry_after_ms: u16) {
        let attempt = match &self.server {
            Server::Handshaking { index, attempt, .. } if *index == receiver => *attempt,
            _ => return,
        };
        let wait = busy_wait(retry_after_ms, self.rng.next_u32());
        self.server = Server::Offline {
            retry_at: now + wait,
            attempt,
        };
        let why = format!(
            "the supernode is busy with other logins; trying again in {:.1} s",
            wait.as_secs_f64()
        );
        tracing::info!(reason = %why, "login deferred");
        self.events.push_back(ClientEvent::Offline { reason: why });
    }

    fn on_handshake_response(
        &mut self,
        now: Instant,
        from: SocketAddr,
        sender: u32,
        receiver: u32,
        noise: &[u8],
        socket: Option<usize>,
    ) {
        if let Server::Handshaking { index, .. } = &self.server {
            if *index == receiver && from == self.current {
                let Server::Handshaking {
                    hs, index, attempt, ..
                } = std::mem::replace(
                    &mut self.server,
                    Server::Offline {
                        retry_at: now,
                        attempt: 0,
                    },
                )
                else {
                    return;
                };
                match hs.finish(noise) {
                    Ok((transport, payload)) => {
                        if Welcome::decode(&payload).is_err() {
                            return self.go_offline(now, "bad welcome from supernode", attempt);
                        }
                        let link =
                            Link::new(self.link_config(), transport, index, sender, from, now);
                        self.server = Server::Up {
                            link: Box::new(link),
                            authed: false,
                        };
                        self.on_server_up(now);
                        self.process(now);
                    }
                    Err(_) => {
                        self.next_host(now);
                        self.go_offline(
                            now,
                            "supernode handshake failed (wrong supernode key?)",
                            attempt,
                        )
                    }
                }
                return;
            }
        }
        if self.dials.contains_key(&receiver) {
            let Some(d) = self.dials.remove(&receiver) else {
                return;
            };
            match d.hs.finish(noise) {
                Ok((transport, payload)) => {
                    if Welcome::decode(&payload).is_err() {
                        return self.store_outbox(now, &d.user);
                    }
                    let link =
                        Link::new(LinkConfig::peer(), transport, receiver, sender, from, now);
                    let remote_static = *link.remote_static();
                    self.add_peer(now, receiver, d.user.clone(), link, socket);
                    let relayed = self.peers.get(&receiver).is_some_and(|p| p.relayed);
                    let relay_ip = self.relay.as_ref().map(|r| r.server.ip());
                    if relayed && !self.cfg.relay_only {
                        let candidates: Vec<SocketAddr> = d
                            .candidates
                            .iter()
                            .copied()
                            .filter(|c| Some(c.ip()) != relay_ip)
                            .collect();
                        self.upgrades.insert(
                            d.user.clone(),
                            Upgrade {
                                remote_static,
                                candidates,
                                next_try: now + UPGRADE_INTERVAL,
                            },
                        );
                    } else {
                        self.upgrades.remove(&d.user);
                    }
                    let waiting = self.outbox.remove(&d.user).unwrap_or_default();
                    for o in waiting {
                        self.send_message(now, o);
                    }
                    self.process(now);
                }
                Err(_) => self.store_outbox(now, &d.user),
            }
        }
    }

    fn add_peer(
        &mut self,
        now: Instant,
        index: u32,
        user: Username,
        link: Link,
        socket: Option<usize>,
    ) {
        let mut handed_over = Vec::new();
        if let Some(old) = self.peer_by_user.insert(user.clone(), index) {
            if let Some(mut p) = self.peers.remove(&old) {
                p.link.close(now);
                while let Some(t) = p.link.poll_transmit() {
                    self.send_on(p.socket, t);
                }
            }
            // Messages in flight on the replaced session go on over the new one (same
            // ids: the peer answers a copy it already has without showing it twice).
            let stranded: Vec<(u32, u64)> = self
                .peer_reqs
                .keys()
                .filter(|(i, _)| *i == old)
                .copied()
                .collect();
            for k in stranded {
                if let Some(o) = self.peer_reqs.remove(&k) {
                    handed_over.push(o);
                }
            }
        }
        // Through our relay, or to an address on the operator's relay (the peer's
        // relayed address): either way the path is relayed.
        let remote = link.remote_addr();
        let relayed = socket.is_none()
            && (self.relayed_peers.contains(&remote)
                || self
                    .relay
                    .as_ref()
                    .is_some_and(|r| r.server.ip() == remote.ip()));
        tracing::debug!(peer = %user, relayed, ?socket, "peer session up");
        self.peers.insert(
            index,
            Peer {
                user: user.clone(),
                link,
                relayed,
                socket,
            },
        );
        self.call_session_up(now, &user);
        for o in handed_over {
            self.send_message(now, o);
        }
    }

    fn on_peer_handshake(
        &mut self,
        now: Instant,
        from: SocketAddr,
        sender: u32,
        noise: &[u8],
        socket: Option<usize>,
    ) {
        let Some(my_cert) = self.cert.as_ref().map(|c| c.to_bytes()) else {
            return;
        };
        // A repeated initiation (the dialer probes every candidate until it hears back)
        // gets the same answer again rather than a second session.
        let ephemeral = first_32(noise);
        self.answered_inits
            .retain(|_, (_, t)| now.saturating_duration_since(*t) < ANSWERED_INIT_TTL);
        if let Some((resp, _)) = self.answered_inits.get(&ephemeral) {
            let payload = resp.clone();
            self.send_on(socket, Transmit { dst: from, payload });
            return;
        }
        let seed = self.seed();
        let Ok(r) = Responder::read(&self.keys.noise_private(), seed, noise) else {
            return;
        };
        // Only a contact whose connection setup we agreed to may open a session, or one we
        // already have a session with (it is moving that session to another path).
        let agreed = self
            .expected
            .get(&r.remote_static)
            .filter(|(_, until)| now <= *until)
            .map(|(u, _)| u.clone());
        let live = self
            .peers
            .values()
            .find(|p| p.link.remote_static() == &r.remote_static)
            .map(|p| p.user.clone());
        let Some(user) = agreed.or(live) else {
            return;
        };
        let Ok(hello) = Hello::decode(&r.payload) else {
            return;
        };
        let unix = self.clock.unix_s(now);
        let cert_ok = hello
            .cert
            .as_deref()
            .and_then(|b| Certificate::verify(b, &self.cfg.authority).ok())
            .is_some_and(|c| c.username() == &user && c.check_for(&r.remote_static, unix).is_ok());
        if !cert_ok {
            return;
        }
        let welcome = Welcome {
            version: PROTOCOL_VERSION,
            unix_ms: self.unix_ms(now),
            cert: Some(my_cert),
        };
        let Ok(payload) = welcome.encode() else {
            return;
        };
        let Ok((transport, msg2)) = r.accept(&payload) else {
            return;
        };
        let index = self.index();
        let mut out = Vec::new();
        Packet::HandshakeResponse {
            sender: index,
            receiver: sender,
            noise: &msg2,
        }
        .encode(&mut out);
        self.answered_inits.insert(ephemeral, (out.clone(), now));
        self.send_on(
            socket,
            Transmit {
                dst: from,
                payload: out,
            },
        );
        let link = Link::new(LinkConfig::peer(), transport, index, sender, from, now);
        self.add_peer(now, index, user, link, socket);
    }

    fn flush_links(&mut self) {
        if let Server::Up { link, .. } = &mut self.server {
            while let Some(t) = link.poll_transmit() {
                self.transmits.push_back(t);
            }
        }
        for p in self.peers.values_mut() {
            while let Some(t) = p.link.poll_transmit() {
                match p.socket {
                    Some(k) => self.extra_transmits.push_back((k, t)),
                    None => self.transmits.push_back(t),
                }
            }
        }
    }

    /// Drains link events until quiet.
    fn process(&mut self, now: Instant) {
        for _ in 0..64 {
            let mut any = false;
            let server_event = match &mut self.server {
                Server::Up { link, .. } => link.poll_event(),
                _ => None,
            };
            if let Some(e) = server_event {
                any = true;
                self.on_server_event(now, e);
            }
            let peer_events: Vec<(u32, LinkEvent)> = self
                .peers
                .iter_mut()
                .filter_map(|(i, p)| p.link.poll_event().map(|e| (*i, e)))
                .collect();
            for (i, e) in peer_events {
                any = true;
                self.on_peer_event(now, i, e);
            }
            if !any {
                break;
            }
        }
        self.flush_links();
    }

    fn on_server_event(&mut self, now: Instant, e: LinkEvent) {
        match e {
            LinkEvent::Request { id, body } => self.on_server_push(now, id, body),
            LinkEvent::Response { id, body } => {
                if let Some(purpose) = self.server_reqs.remove(&id) {
                    self.on_server_response(now, purpose, Some(body));
                }
            }
            LinkEvent::RequestFailed { .. } => {
                // Keep what the request was for: `go_offline` requeues it (with every other
                // request in flight) to run again on the next session.
                self.suspect(now);
                self.next_host(now);
                self.go_offline(now, "the supernode stopped answering", 0);
                self.start_handshake(now, 0);
            }
            LinkEvent::Dead => {
                // In a fleet the next host takes over; peer sessions are not touched.
                self.suspect(now);
                self.next_host(now);
                self.go_offline(now, "no answer from the supernode", 0);
            }
            // Nothing but media uses datagrams, and never with the supernode.
            LinkEvent::Datagram(_) => {}
            LinkEvent::Closed => {
                // The supernode closes a session only when the same account logs in from
                // another device. Reconnecting would take it back and start a tug of war,
                // so this device stays offline until the user brings it up again.
                self.go_offline(
                    now,
                    "signed in from another device; run `peerline up` here to take over",
                    0,
                );
                self.server = Server::Stopped;
            }
        }
    }

    fn on_server_response(&mut self, now: Instant, purpose: ServerReq, body: Option<Response>) {
        let Some(body) = body else { return };
        match purpose {
            ServerReq::CallInvite(id, call_id) => self.on_invite_answer(id, call_id, body),
            ServerReq::CallSignal(id, call_id) => {
                let result = match &body {
                    Response::Ok => CommandResult::Ok,
                    other => err_result(other).unwrap_or(CommandResult::error(
                        ErrorCode::Internal,
                        "unexpected answer",
                    )),
                };
                if matches!(result, CommandResult::Error { .. }) {
                    // The other side cannot be told (offline, or the call is unknown).
                    if let Some(c) = self.calls.get_mut(&call_id).filter(|c| c.live()) {
                        c.end("the other side is unreachable");
                        self.call_event(call_id);
                    }
                }
                if let Some(id) = id {
                    self.done(id, result);
                }
            }
            ServerReq::Command(id, _) => {
                let result = match body {
                    Response::Certificate(bytes) => {
                        match Certificate::verify(&bytes, &self.cfg.authority) {
                            Ok(c) if c.repr().noise_key == self.keys.noise_public() => {
                                self.cert = Some(c);
                                self.events.push_back(ClientEvent::Certificate(bytes));
                                if let Server::Up { authed, .. } = &mut self.server {
                                    *authed = true;
                                }
                                self.became_online(now);
                                self.run_queued(now);
                                CommandResult::Ok
                            }
                            _ => CommandResult::error(
                                ErrorCode::BadCertificate,
                                "the supernode sent a certificate that does not verify",
                            ),
                        }
                    }
                    Response::SearchResults { users } => CommandResult::Users(users),
                    Response::Error { code, detail } => CommandResult::Error { code, detail },
                    _ => CommandResult::Ok,
                };
                self.done(id, result);
            }
            ServerReq::ContactPage(id) => match body {
                Response::Contacts { entries, more } => {
                    let page = self.contact_pages.entry(id).or_default();
                    page.extend(entries);
                    let offset = page.len() as u32;
                    if more && offset < 100_000 {
                        if let Err(e) = self.server_request(
                            now,
                            Request::ContactList { offset },
                            ServerReq::ContactPage(id),
                        ) {
                            self.contact_pages.remove(&id);
                            self.done(id, e);
                        }
                    } else {
                        let all = self.contact_pages.remove(&id).unwrap_or_default();
                        self.done(id, CommandResult::Contacts(all));
                    }
                }
                other => {
                    self.contact_pages.remove(&id);
                    let r = err_result(&other).unwrap_or(CommandResult::error(
                        ErrorCode::Internal,
                        "unexpected answer",
                    ));
                    self.done(id, r);
                }
            },
            ServerReq::Connect(user) => match body {
                Response::ConnectAccepted {
                    cert,
                    candidates,
                    hard_nat,
                    call_only,
                } => {
                    self.mark_call_only(&user, call_only);
                    let peer_candidates = candidates.clone();
                    self.dial(now, user.clone(), &cert, candidates);
                    if self.dials.values().any(|d| d.user == user) {
                        self.start_birthday(now, &user, &peer_candidates, hard_nat);
                    }
                }
                Response::Error {
                    code: ErrorCode::Offline | ErrorCode::Declined,
                    ..
                } => self.store_outbox(now, &user),
                Response::Error { code, detail } => {
                    for o in self.outbox.remove(&user).unwrap_or_default() {
                        self.done(o.id, CommandResult::error(code, detail.clone()));
                    }
                }
                _ => self.store_outbox(now, &user),
            },
            ServerReq::Store(id) => {
                let (msg_id, sent_at) = self
                    .pending_store
                    .remove(&id)
                    .map_or((0, 0), |o| (o.msg_id, o.sent_at));
                let r = match body {
                    Response::Ok => CommandResult::Sent {
                        via: Via::Offline,
                        msg_id,
                        sent_at,
                    },
                    other => err_result(&other).unwrap_or(CommandResult::error(
                        ErrorCode::Internal,
                        "unexpected answer",
                    )),
                };
                self.done(id, r);
            }
            ServerReq::Renew => match body {
                Response::Certificate(bytes) => {
                    match Certificate::verify(&bytes, &self.cfg.authority) {
                        Ok(c) if c.repr().noise_key == self.keys.noise_public() => {
                            self.cert = Some(c);
                            self.events.push_back(ClientEvent::Certificate(bytes));
                            let was = matches!(self.server, Server::Up { authed: true, .. });
                            if let Server::Up { authed, .. } = &mut self.server {
                                *authed = true;
                            }
                            if was {
                                self.schedule_renewal(now);
                            } else {
                                self.became_online(now);
                                self.run_queued(now);
                            }
                        }
                        _ => tracing::warn!("renewed certificate does not verify"),
                    }
                }
                Response::Error { detail, .. } => {
                    tracing::warn!(%detail, "certificate renewal refused");
                    self.renew_after = Some(now + Duration::from_secs(600));
                    if !self.is_online() {
                        // Logged in with an expired certificate that cannot be renewed:
                        // say why instead of waiting silently.
                        self.events.push_back(ClientEvent::Offline {
                            reason: format!("certificate refused: {detail}"),
                        });
                    }
                }
                _ => {}
            },
            ServerReq::Presence => {}
            ServerReq::Relay => match body {
                Response::RelayCredentials {
                    server,
                    username,
                    password,
                } => self.start_relay(now, server, &username, &password),
                Response::Error { detail, .. } => tracing::debug!(%detail, "no relay"),
                _ => {}
            },
        }
    }

    // ----- relay (TURN client) -----

    /// Asks the supernode for (fresh) relay credentials.
    fn request_relay(&mut self, now: Instant) {
        self.relay_retry = None;
        if let Server::Up { link, .. } = &mut self.server {
            if let Ok(id) = link.send_request(now, Request::RelayCredentials) {
                self.server_reqs.insert(id, ServerReq::Relay);
            }
        }
    }

    fn turn_now(&self, now: Instant) -> TurnInstant {
        let nanos = now.saturating_duration_since(self.t0).as_nanos();
        TurnInstant::from_nanos(i64::try_from(nanos).unwrap_or(i64::MAX))
    }

    fn start_relay(&mut self, now: Instant, server: SocketAddr, username: &str, password: &str) {
        let local = self
            .local_candidates
            .first()
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)));
        let mut config = TurnConfig::new(TurnCredentials::new(username, password));
        // A relay that does not answer within a few seconds is no use for setup.
        config.set_request_retransmits(
            Duration::from_millis(250),
            Duration::from_millis(1000),
            5,
            Duration::from_millis(1000),
        );
        self.relay = Some(RelayClient {
            server,
            turn: if self.relay_over_tcp {
                TurnClient::Tcp(TurnClientTcp::allocate(local, server, config))
            } else {
                TurnClient::Udp(TurnClientUdp::allocate(local, server, config))
            },
            username: username.to_string(),
            password: password.to_string(),
            relayed: None,
            closed: false,
            wait: None,
        });
        if !self.relay_over_tcp {
            // A second STUN server: comparing its answer with the supernode's tells whether
            // our NAT maps each destination to a new port.
            let tid = self.random_tid();
            self.mapping.ask(now, server, tid);
        }
        self.relay_flush(now);
    }

    /// Runs the TURN client's timers and collects what it wants sent.
    fn relay_flush(&mut self, now: Instant) {
        let tn = self.turn_now(now);
        let t0 = self.t0;
        let Some(r) = self.relay.as_mut() else { return };
        r.wait = match r.turn.poll(tn) {
            TurnPollRet::WaitUntil(at) => {
                let nanos = u64::try_from(at.as_nanos()).unwrap_or(0);
                Some(t0 + Duration::from_nanos(nanos))
            }
            TurnPollRet::Closed => {
                if !r.closed {
                    // The allocation ended (its credentials expired, or the relay went
                    // away): get fresh credentials and allocate again in a while.
                    self.relay_retry = Some(now + RELAY_RETRY);
                }
                r.closed = true;
                None
            }
            _ => None,
        };
        while let Some(t) = r.turn.poll_transmit(tn) {
            self.transmits.push_back(Transmit {
                dst: t.to,
                payload: t.data.to_vec(),
            });
        }
        if r.relayed.is_some() && !r.closed && r.turn.relayed_addresses().next().is_none() {
            // The allocation expired (a refresh failed, e.g. with expired credentials).
            r.relayed = None;
            r.closed = true;
            self.relay_retry = Some(now + RELAY_RETRY);
        }
        while let Some(e) = r.turn.poll_event() {
            match e {
                TurnEvent::AllocationCreated(_, addr) => {
                    tracing::debug!("relay allocation ready");
                    r.relayed = Some(addr);
                }
                TurnEvent::AllocationCreateFailed(_) => {
                    r.closed = true;
                    self.relay_retry = Some(now + RELAY_RETRY);
                }
                _ => {}
            }
        }
    }

    /// `ready` (allocated), `allocating`, or `none` (no relay offered, or it failed).
    pub fn relay_state(&self) -> &'static str {
        match &self.relay {
            Some(r) if r.relayed.is_some() && !r.closed => "ready",
            Some(r) if !r.closed => "allocating",
            _ => "none",
        }
    }

    /// The relay's address, once the supernode offered one (the driver routes it).
    pub fn relay_server(&self) -> Option<SocketAddr> {
        self.relay.as_ref().map(|r| r.server)
    }

    /// Whether the relay is spoken to over TCP.
    pub fn relay_over_tcp(&self) -> bool {
        self.relay_over_tcp
    }

    /// Reaches the relay over TCP from now on (UDP is blocked here): allocates again over
    /// TCP with the same credentials, and relays peer sessions at once, since direct UDP
    /// cannot work.
    pub fn set_relay_over_tcp(&mut self, now: Instant) {
        if self.relay_over_tcp {
            return;
        }
        self.relay_over_tcp = true;
        self.last_now = self.last_now.max(now);
        if let Some(r) = self.relay.take() {
            let (server, username, password) = (r.server, r.username, r.password);
            self.start_relay(now, server, &username, &password);
        }
    }

    /// Our relayed address, when the allocation is ready.
    pub fn relayed_address(&self) -> Option<SocketAddr> {
        self.relay.as_ref().and_then(|r| r.relayed)
    }

    /// Our candidates for a connection setup: local addresses, plus the relayed one (only
    /// the relayed one in relay-only mode).
    fn offer(&self) -> Vec<SocketAddr> {
        let mut c = if self.cfg.relay_only {
            Vec::new()
        } else {
            self.local_candidates.clone()
        };
        if let Some(r) = self.relayed_address() {
            c.push(r);
        }
        c
    }

    /// Installs relay permissions for the IPs of `addrs` (so the relay lets them in).
    fn permit(&mut self, now: Instant, addrs: &[SocketAddr]) {
        let tn = self.turn_now(now);
        let Some(r) = self.relay.as_mut().filter(|r| r.relayed.is_some()) else {
            return;
        };
        for a in addrs {
            if !r.turn.have_permission(TransportType::Udp, a.ip()) {
                let _ = r.turn.create_permission(TransportType::Udp, a.ip(), tn);
            }
        }
        self.relay_flush(now);
    }

    /// Wraps a datagram for `dst` into a message to the relay.
    fn via_relay(&mut self, now: Instant, t: Transmit) -> Option<Transmit> {
        let tn = self.turn_now(now);
        let r = self.relay.as_mut()?;
        match r.turn.send_to(TransportType::Udp, t.dst, t.payload, tn) {
            Ok(Some(b)) => {
                let b = b.build();
                Some(Transmit {
                    dst: b.to,
                    payload: b.data.to_vec(),
                })
            }
            _ => None,
        }
    }

    fn dial(&mut self, now: Instant, user: Username, cert: &[u8], candidates: Vec<SocketAddr>) {
        let unix = self.clock.unix_s(now);
        let cert = match Certificate::verify(cert, &self.cfg.authority) {
            Ok(c) if c.username() == &user && c.check_time(unix).is_ok() => c,
            _ => {
                tracing::warn!(peer = %user, "contact's certificate does not verify; using the mailbox");
                return self.store_outbox(now, &user);
            }
        };
        if !self.start_dial(now, user.clone(), cert.repr().noise_key, candidates, false) {
            self.store_outbox(now, &user);
        }
    }

    /// Starts a handshake towards `remote_static` at `candidates`; false if it could not
    /// even be built.
    fn start_dial(
        &mut self,
        now: Instant,
        user: Username,
        remote_static: [u8; 32],
        candidates: Vec<SocketAddr>,
        upgrade: bool,
    ) -> bool {
        let hello = Hello {
            version: PROTOCOL_VERSION,
            unix_ms: self.unix_ms(now),
            cert: self.cert.as_ref().map(|c| c.to_bytes()),
            presence: Presence::Online,
            relay_only: false,
        };
        let seed = self.seed();
        let Some((hs, msg1)) = hello.encode().ok().and_then(|p| {
            Handshake::initiate(&self.keys.noise_private(), &remote_static, seed, &p).ok()
        }) else {
            return false;
        };
        let index = self.index();
        let packet = cookie::encode_init(index, &msg1, &MacKeys::new(&remote_static), None);
        let mut cands = candidates;
        cands.dedup();
        let d = Dial {
            user,
            hs,
            packet,
            candidates: cands.clone(),
            relay_candidates: Vec::new(),
            relay_from: if self.cfg.relay_only || self.relay_over_tcp {
                now
            } else {
                now + RELAY_AFTER
            },
            upgrade,
            next_send: now,
            deadline: now + self.cfg.dial_timeout,
        };
        if !upgrade {
            // Let the callee's probes reach us through the relay too.
            self.permit(now, &cands);
        }
        self.dials.insert(index, d);
        self.dial_tick(now);
        true
    }

    /// Sends due handshake probes to every candidate; gives up on expired dials.
    fn dial_tick(&mut self, now: Instant) {
        let mut expired = Vec::new();
        for (i, d) in self.dials.iter_mut() {
            if now >= d.deadline {
                expired.push(*i);
                continue;
            }
            if now >= d.next_send {
                let relay_ip = self.relay.as_ref().map(|r| r.server.ip());
                // Relay-only: nothing leaves except through the relay.
                let direct = if self.cfg.relay_only {
                    &[][..]
                } else {
                    &d.candidates[..]
                };
                for c in direct {
                    // Direct paths first: the peer's relayed address only after a while,
                    // as ICE ranks relay candidates last.
                    if Some(c.ip()) == relay_ip && now < d.relay_from {
                        continue;
                    }
                    let t = Transmit {
                        dst: *c,
                        payload: d.packet.clone(),
                    };
                    if d.upgrade {
                        self.direct_sends.push_back(t);
                    } else {
                        self.transmits.push_back(t);
                    }
                }
                if !d.upgrade
                    && now >= d.relay_from
                    && self.relay.as_ref().is_some_and(|r| r.relayed.is_some())
                {
                    // No direct answer yet: try every candidate through our relay as well.
                    for c in d.candidates.iter().chain(&d.relay_candidates) {
                        self.relay_sends.push_back(Transmit {
                            dst: *c,
                            payload: d.packet.clone(),
                        });
                    }
                }
                d.next_send = now + PROBE_INTERVAL;
            }
        }
        for i in expired {
            if let Some(d) = self.dials.remove(&i) {
                if d.upgrade {
                    continue; // the relayed session stays; try again later
                }
                tracing::debug!(peer = %d.user, "no direct path; using the mailbox");
                self.store_outbox(now, &d.user);
            }
        }
        // Keep trying to move relayed sessions to a direct path.
        let due: Vec<Username> = self
            .upgrades
            .iter()
            .filter(|(u, up)| now >= up.next_try && !self.dials.values().any(|d| &d.user == *u))
            .map(|(u, _)| u.clone())
            .collect();
        for u in due {
            let relayed_now = self
                .peer_by_user
                .get(&u)
                .and_then(|i| self.peers.get(i))
                .is_some_and(|p| p.relayed);
            if !relayed_now {
                self.upgrades.remove(&u);
                continue;
            }
            if let Some(up) = self.upgrades.get_mut(&u) {
                up.next_try = now + UPGRADE_INTERVAL;
                let (key, cands) = (up.remote_static, up.candidates.clone());
                self.start_dial(now, u, key, cands, true);
            }
        }
    }

    /// Sends due probes towards callers we agreed to; stops when their session is up or
    /// the setup window closed.
    fn punch_tick(&mut self, now: Instant) {
        let probe = probe_packet();
        let peer_by_user = &self.peer_by_user;
        self.punches
            .retain(|p| now < p.until && !peer_by_user.contains_key(&p.user));
        let relay_only = self.cfg.relay_only;
        for p in self.punches.iter_mut() {
            if now >= p.next_send {
                for c in &p.candidates {
                    let t = Transmit {
                        dst: *c,
                        payload: probe.clone(),
                    };
                    // Relay-only: even probes leave through the relay.
                    if relay_only {
                        self.relay_sends.push_back(t);
                    } else {
                        self.transmits.push_back(t);
                    }
                }
                p.next_send = now + PROBE_INTERVAL;
            }
        }
    }

    /// A probe from `from`: if it comes from the address (any port) of a peer we are
    /// dialing, its port is the one that peer's NAT opened for us (a peer-reflexive
    /// candidate, as in ICE); try it at once. Probes from any other address are ignored,
    /// so a stranger cannot steer our handshakes.
    fn on_probe(&mut self, from: SocketAddr, relayed: bool) {
        // Direct: try the new port at once. Relayed: remember it for the relay phase.
        if relayed {
            // Through our relay: the peer's NAT opened this port towards our relayed
            // address, so our handshake must come from there too.
            for d in self.dials.values_mut() {
                let known_ip = d.candidates.iter().any(|c| c.ip() == from.ip());
                if known_ip
                    && !d.relay_candidates.contains(&from)
                    && d.relay_candidates.len() < MAX_DIAL_CANDIDATES
                {
                    d.relay_candidates.push(from);
                    // Tried through the relay only once direct paths had their chance
                    // (dial_tick sends it from then on).
                }
            }
            return;
        }
        for d in self.dials.values_mut() {
            let known_ip = d.candidates.iter().any(|c| c.ip() == from.ip());
            if known_ip && !d.candidates.contains(&from) && d.candidates.len() < MAX_DIAL_CANDIDATES
            {
                d.candidates.push(from);
                self.transmits.push_back(Transmit {
                    dst: from,
                    payload: d.packet.clone(),
                });
            }
        }
    }

    fn on_server_push(&mut self, now: Instant, id: u64, body: Request) {
        let mut permit_later: Vec<SocketAddr> = Vec::new();
        self.server_push(now, id, body, &mut permit_later);
        if !permit_later.is_empty() {
            // The caller may come in through our relayed address.
            self.permit(now, &permit_later);
        }
    }

    fn server_push(
        &mut self,
        now: Instant,
        id: u64,
        body: Request,
        permit_later: &mut Vec<SocketAddr>,
    ) {
        let Server::Up { link, .. } = &mut self.server else {
            return;
        };
        match body {
            Request::IncomingCall { user, call_id } => {
                let answer = self.on_incoming_call(now, user, call_id);
                if let Server::Up { link, .. } = &mut self.server {
                    let _ = link.respond(now, id, answer);
                }
            }
            Request::CallSignal {
                user,
                call_id,
                signal,
            } => {
                let _ = link.respond(now, id, Response::Ok);
                self.on_call_signal(now, &user, call_id, signal);
            }
            Request::ContactEvent { user, state, note } => {
                let _ = link.respond(now, id, Response::Ok);
                if state == ContactState::Accepted {
                    // Now contacts: a session made for a call may carry messages too.
                    self.call_only.remove(&user);
                } else {
                    if let Some(pi) = self.peer_by_user.remove(&user) {
                        if let Some(mut p) = self.peers.remove(&pi) {
                            p.link.close(now);
                            while let Some(t) = p.link.poll_transmit() {
                                self.send_on(p.socket, t);
                            }
                        }
                    }
                }
                self.events
                    .push_back(ClientEvent::Contact { user, state, note });
            }
            Request::PresenceEvent { user, presence } => {
                let _ = link.respond(now, id, Response::Ok);
                self.events
                    .push_back(ClientEvent::Presence { user, presence });
            }
            Request::IncomingConnect {
                user,
                cert,
                candidates: caller_candidates,
                hard_nat: caller_hard,
                call_only,
            } => {
                if call_only {
                    self.call_only.insert(user.clone());
                } else {
                    self.call_only.remove(&user);
                }
                let unix = self.clock.unix_s(now);
                match Certificate::verify(&cert, &self.cfg.authority) {
                    _ if self.cfg.relay_only
                        && self.relay.as_ref().is_none_or(|r| r.relayed.is_none()) =>
                    {
                        let _ = link.respond(
                            now,
                            id,
                            Response::error(ErrorCode::Declined, "relay-only mode"),
                        );
                    }
                    Ok(c) if c.username() == &user && c.check_time(unix).is_ok() => {
                        self.expected.retain(|_, (_, t)| *t > now);
                        self.expected.insert(
                            c.repr().noise_key,
                            (user.clone(), now + Duration::from_secs(30)),
                        );
                        let candidates = self.offer();
                        let hard_nat = self.hard_nat();
                        let Server::Up { link, .. } = &mut self.server else {
                            return;
                        };
                        let _ = link.respond(
                            now,
                            id,
                            Response::ConnectAnswer {
                                candidates,
                                hard_nat,
                            },
                        );
                        self.start_birthday(now, &user, &caller_candidates, caller_hard);
                        permit_later.extend(caller_candidates.iter().copied());
                        // Open our NAT towards the caller while the answer travels back:
                        // its handshake then finds the way in.
                        let until = now + self.cfg.dial_timeout;
                        self.punches.retain(|p| p.user != user);
                        self.punches.push(Punch {
                            user,
                            candidates: caller_candidates,
                            next_send: now,
                            until,
                        });
                        self.punch_tick(now);
                    }
                    _ => {
                        let _ = link.respond(
                            now,
                            id,
                            Response::error(
                                ErrorCode::BadCertificate,
                                "caller certificate invalid",
                            ),
                        );
                    }
                }
            }
            Request::Deliver {
                id: _,
                from,
                msg_id,
                sent_at,
                text,
            } => self.received(Ack::Server(id), from, msg_id, sent_at, text, Via::Offline),
            Request::Hosts { hosts } => {
                let _ = link.respond(now, id, Response::Ok);
                self.learn_hosts(&hosts);
            }
            Request::Redirect { hosts } => {
                let _ = link.respond(now, id, Response::Ok);
                // The answer must leave before the link is dropped: the draining
                // supernode closes the session once it has it.
                while let Some(t) = link.poll_transmit() {
                    self.transmits.push_back(t);
                }
                let Some(to) = hosts
                    .iter()
                    .copied()
                    .find(|h| usable_host(h) && *h != self.current)
                else {
                    // Nowhere to go: stay until the session ends, then fail over as usual.
                    return;
                };
                self.learn_hosts(&hosts);
                self.move_to(to);
                self.go_offline(now, "the supernode is shutting down; moving to another", 0);
                self.hops = 1;
                self.start_handshake(now, 0);
            }
            _ => {
                let _ = link.respond(
                    now,
                    id,
                    Response::error(ErrorCode::BadRequest, "not a push a client accepts"),
                );
            }
        }
    }

    /// Hands a received message to the driver; `ack` answers its sender once saved.
    fn received(
        &mut self,
        ack: Ack,
        from: Username,
        msg_id: u64,
        sent_at: u64,
        text: String,
        via: Via,
    ) {
        let token = self.next_ack;
        self.next_ack += 1;
        self.acks.insert(token, ack);
        self.events.push_back(ClientEvent::Message {
            token,
            from,
            msg_id,
            sent_at,
            text,
            via,
        });
    }

    fn on_peer_event(&mut self, now: Instant, index: u32, e: LinkEvent) {
        match e {
            LinkEvent::Request { id, body } => {
                let Some(p) = self.peers.get_mut(&index) else {
                    return;
                };
                match body {
                    Request::Chat { .. } if self.call_only.contains(&p.user) => {
                        let _ = p.link.respond(
                            now,
                            id,
                            Response::error(
                                ErrorCode::NotContact,
                                "not a contact: only the call is allowed",
                            ),
                        );
                    }
                    Request::Chat {
                        msg_id,
                        sent_at,
                        text,
                    } => {
                        let from = p.user.clone();
                        let via = if p.relayed { Via::Relay } else { Via::Direct };
                        let key = (from.clone(), msg_id);
                        if self.recent.contains(&key) {
                            // A copy re-sent after the session moved, already saved: answer
                            // it without showing it twice.
                            let _ = p.link.respond(now, id, Response::Ok);
                            return;
                        }
                        if self.unsaved.values().any(|k| *k == key) {
                            // The first copy is still being saved: let this one be
                            // retransmitted and answered once it is.
                            return;
                        }
                        self.unsaved.insert(self.next_ack, key);
                        self.received(Ack::Peer(index, id), from, msg_id, sent_at, text, via);
                    }
                    Request::CallSignal {
                        call_id, signal, ..
                    } => {
                        // The session proves who sends it, whatever `user` says.
                        let from = p.user.clone();
                        let _ = p.link.respond(now, id, Response::Ok);
                        self.on_call_signal(now, &from, call_id, signal);
                    }
                    _ => {
                        let _ = p.link.respond(
                            now,
                            id,
                            Response::error(ErrorCode::BadRequest, "not a peer request"),
                        );
                    }
                }
            }
            LinkEvent::Response { id, body } => {
                let via = match self.peers.get(&index) {
                    Some(p) if p.relayed => Via::Relay,
                    _ => Via::Direct,
                };
                if let Some(o) = self.peer_reqs.remove(&(index, id)) {
                    match body {
                        Response::Ok => self.done(
                            o.id,
                            CommandResult::Sent {
                                via,
                                msg_id: o.msg_id,
                                sent_at: o.sent_at,
                            },
                        ),
                        other => {
                            let r = err_result(&other).unwrap_or(CommandResult::error(
                                ErrorCode::Internal,
                                "unexpected answer",
                            ));
                            self.done(o.id, r);
                        }
                    }
                }
            }
            LinkEvent::RequestFailed { id } => {
                // The direct path broke mid-message: fall back to the mailbox (same msg_id,
                // so the recipient deduplicates if the first copy did arrive).
                if let Some(o) = self.peer_reqs.remove(&(index, id)) {
                    self.store_one(now, o);
                }
                self.drop_peer(now, index);
            }
            LinkEvent::Dead | LinkEvent::Closed => self.drop_peer(now, index),
            LinkEvent::Datagram(bytes) => {
                if let Some(user) = self.peers.get(&index).map(|p| p.user.clone()) {
                    self.on_call_media(now, &user, bytes);
                }
            }
        }
    }

    fn drop_peer(&mut self, now: Instant, index: u32) {
        if let Some(p) = self.peers.remove(&index) {
            if self.peer_by_user.get(&p.user) == Some(&index) {
                self.peer_by_user.remove(&p.user);
                self.call_session_down(now, &p.user);
            }
        }
        let stranded: Vec<(u32, u64)> = self
            .peer_reqs
            .keys()
            .filter(|(i, _)| *i == index)
            .copied()
            .collect();
        for k in stranded {
            if let Some(o) = self.peer_reqs.remove(&k) {
                self.store_one(now, o);
            }
        }
    }

    // ----- timers -----

    /// Runs due timers: handshake retries, reconnection, retransmissions, keepalives,
    /// dials, command timeouts, certificate renewal.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.last_now = self.last_now.max(now);
        if self
            .relay
            .as_ref()
            .is_some_and(|r| r.wait.is_some_and(|w| now >= w))
        {
            self.relay_flush(now);
        }
        if self.is_online() && self.relay_retry.is_some_and(|t| now >= t) {
            self.request_relay(now);
        }
        match &mut self.server {
            Server::Stopped => {}
            Server::Offline { retry_at, attempt } => {
                if now >= *retry_at {
                    let a = *attempt;
                    self.start_handshake(now, a);
                }
            }
            Server::Handshaking {
                deadline, attempt, ..
            } => {
                if now >= *deadline {
                    let a = *attempt;
                    self.next_host(now);
                    self.go_offline(now, "supernode unreachable", a);
                }
            }
            Server::Up { link, authed } => {
                link.handle_timeout(now);
                if *authed && self.renew_after.is_some_and(|t| now >= t) {
                    self.renew_after = Some(now + Duration::from_secs(600));
                    if let Ok(id) = link.send_request(now, Request::RenewCert) {
                        self.server_reqs.insert(id, ServerReq::Renew);
                    }
                }
            }
        }
        for p in self.peers.values_mut() {
            p.link.handle_timeout(now);
        }
        self.dial_tick(now);
        self.punch_tick(now);
        self.birthday_tick(now);
        self.call_tick(now);
        for (dst, payload) in self.mapping.poll_requests(now) {
            self.transmits.push_back(Transmit { dst, payload });
        }
        let (late, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut self.resend)
            .into_iter()
            .partition(|(_, d)| now >= *d);
        self.resend = keep;
        for (o, _) in late {
            self.done(
                o.id,
                CommandResult::error(
                    ErrorCode::Unavailable,
                    "supernode unreachable: the message was not sent",
                ),
            );
        }
        let expired: Vec<CommandId> = self
            .queued
            .iter()
            .filter(|(_, _, d)| now >= *d)
            .map(|(id, _, _)| *id)
            .collect();
        if !expired.is_empty() {
            self.queued.retain(|(_, _, d)| now < *d);
            for id in expired {
                self.done(
                    id,
                    CommandResult::error(
                        ErrorCode::Unavailable,
                        "supernode unreachable: check the address and your network",
                    ),
                );
            }
        }
        self.process(now);
    }

    /// When [`Client::handle_timeout`] next has work.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut t = match &self.server {
            Server::Stopped => None,
            Server::Offline { retry_at, .. } => Some(*retry_at),
            Server::Handshaking { deadline, .. } => Some(*deadline),
            Server::Up { link, authed } => {
                let l = link.poll_timeout();
                match (l, self.renew_after.filter(|_| *authed)) {
                    (Some(a), Some(b)) => Some(a.min(b)),
                    (a, b) => a.or(b),
                }
            }
        };
        let mut fold = |x: Option<Instant>| {
            if let Some(x) = x {
                t = Some(t.map_or(x, |y| y.min(x)));
            }
        };
        for p in self.peers.values() {
            fold(p.link.poll_timeout());
        }
        for d in self.dials.values() {
            fold(Some(d.next_send.min(d.deadline)));
        }
        for p in &self.punches {
            fold(Some(p.next_send.min(p.until)));
        }
        for b in self.birthdays.values() {
            fold(Some(b.next.min(b.until)));
        }
        fold(self.mapping.poll_timeout());
        fold(self.calls_timeout());
        fold(self.relay.as_ref().and_then(|r| r.wait));
        fold(self.relay_retry);
        for u in self.upgrades.values() {
            fold(Some(u.next_try));
        }
        for (_, _, d) in &self.queued {
            fold(Some(*d));
        }
        for (_, d) in &self.resend {
            fold(Some(*d));
        }
        t
    }

    /// Next datagram to send.
    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        let now = self.last_now;
        loop {
            if self.transmits.is_empty() {
                // Requests sealed by `command` wait in their link until drained here.
                self.flush_links();
            }
            if let Some(t) = self.transmits.pop_front() {
                if self.relayed_peers.contains(&t.dst) {
                    match self.via_relay(now, t) {
                        Some(w) => return Some(w),
                        None => continue, // no permission yet: dropped, as a lost datagram
                    }
                }
                return Some(t);
            }
            if let Some(t) = self.direct_sends.pop_front() {
                return Some(t);
            }
            let t = self.relay_sends.pop_front()?;
            if let Some(w) = self.via_relay(now, t) {
                return Some(w);
            }
        }
    }

    /// Next event.
    pub fn poll_event(&mut self) -> Option<ClientEvent> {
        self.events.pop_front()
    }
}

// ----- calls -----

impl Client {
    /// The calls not yet over.
    pub fn calls(&self) -> Vec<CallInfo> {
        let mut v: Vec<CallInfo> = self
            .calls
            .values()
            .filter(|c| c.live())
            .map(|c| c.info.clone())
            .collect();
        v.sort_by_key(|c| c.call_id);
        v
    }

    /// Sends a media datagram on active call `call_id` over the peer session; false if
    /// the call is not active (the datagram is dropped).
    pub fn send_call_media(&mut self, now: Instant, call_id: u64, bytes: Vec<u8>) -> bool {
        self.last_now = self.last_now.max(now);
        let Some(c) = self
            .calls
            .get(&call_id)
            .filter(|c| c.info.state == CallState::Active)
        else {
            return false;
        };
        let Some(p) = self
            .peer_by_user
            .get(&c.info.peer)
            .and_then(|i| self.peers.get_mut(i))
        else {
            return false;
        };
        let ok = p.link.send_datagram(now, bytes).is_ok();
        self.flush_links();
        ok
    }

    fn call_event(&mut self, call_id: u64) {
        if let Some(c) = self.calls.get(&call_id) {
            self.events.push_back(ClientEvent::Call(c.info.clone()));
            if !c.live() {
                self.calls.remove(&call_id);
            }
        }
    }

    fn in_a_call(&self) -> bool {
        self.calls.values().any(|c| c.live())
    }

    fn call_start(&mut self, now: Instant, id: CommandId, user: Username) {
        if self.username() == Some(&user) {
            return self.done(
                id,
                CommandResult::error(ErrorCode::BadRequest, "you cannot call yourself"),
            );
        }
        if self.in_a_call() {
            return self.done(
                id,
                CommandResult::error(ErrorCode::Busy, "already in a call: hang up first"),
            );
        }
        let call_id = self.rng.next_u64();
        let body = Request::CallInvite {
            user: user.clone(),
            call_id,
        };
        if let Err(e) = self.server_request(now, body, ServerReq::CallInvite(id, call_id)) {
            return self.done(id, e);
        }
        self.calls.insert(
            call_id,
            Call::new(call_id, user, Direction::Outgoing, now, Some(id)),
        );
    }

    fn call_answer(&mut self, now: Instant, id: CommandId, call_id: u64, accept: bool) {
        let Some(c) = self
            .calls
            .get_mut(&call_id)
            .filter(|c| c.info.state == CallState::Incoming)
        else {
            return self.done(
                id,
                CommandResult::error(ErrorCode::BadRequest, "no such call is ringing"),
            );
        };
        let peer = c.info.peer.clone();
        let signal = if accept {
            c.info.state = CallState::Connecting;
            c.started = now;
            c.deadline = Some(now + CONNECT_TIMEOUT);
            CallSignal::Accept
        } else {
            c.end("declined");
            CallSignal::Decline
        };
        let body = Request::CallSignal {
            user: peer.clone(),
            call_id,
            signal,
        };
        if let Err(e) = self.server_request(now, body, ServerReq::CallSignal(Some(id), call_id)) {
            if let Some(c) = self.calls.get_mut(&call_id) {
                c.end("not connected to the supernode");
            }
            self.call_event(call_id);
            return self.done(id, e);
        }
        if accept && self.peer_by_user.contains_key(&peer) {
            // A session with the caller already exists: media can flow at once.
            self.call_session_up(now, &peer);
        }
        self.call_event(call_id);
    }

    /// Ends our side of a call and tells the other side (through the supernode, and over
    /// the peer session when there is one).
    fn call_hang_up(&mut self, now: Instant, call_id: u64, reason: &str) {
        let Some(c) = self.calls.get_mut(&call_id).filter(|c| c.live()) else {
            return;
        };
        let signal = match (c.info.state, c.info.direction) {
            (CallState::Ringing, _) => CallSignal::Cancel,
            (CallState::Incoming, _) => CallSignal::Decline,
            _ => CallSignal::HangUp,
        };
        let peer = c.info.peer.clone();
        c.end(reason);
        let body = Request::CallSignal {
            user: peer.clone(),
            call_id,
            signal,
        };
        let _ = self.server_request(now, body.clone(), ServerReq::CallSignal(None, call_id));
        if let Some(p) = self
            .peer_by_user
            .get(&peer)
            .and_then(|i| self.peers.get_mut(i))
        {
            let _ = p.link.send_request(now, body);
        }
        self.call_event(call_id);
    }

    /// A signal from `from` about `call_id` (pushed by the supernode or over the peer
    /// session).
    fn on_call_signal(&mut self, now: Instant, from: &Username, call_id: u64, signal: CallSignal) {
        let Some(c) = self
            .calls
            .get_mut(&call_id)
            .filter(|c| &c.info.peer == from && c.live())
        else {
            return;
        };
        match (signal, c.info.direction, c.info.state) {
            (CallSignal::Accept, Direction::Outgoing, CallState::Ringing) => {
                c.info.state = CallState::Connecting;
                c.deadline = Some(now + CONNECT_TIMEOUT);
                let peer = c.info.peer.clone();
                if self.peer_by_user.contains_key(&peer) {
                    self.call_session_up(now, &peer);
                } else {
                    self.ensure_session(now, &peer);
                }
            }
            (CallSignal::Decline, Direction::Outgoing, CallState::Ringing) => c.end("declined"),
            (CallSignal::Cancel, Direction::Incoming, CallState::Incoming) => c.end("cancelled"),
            (CallSignal::HangUp, _, _) => c.end("the other side hung up"),
            _ => return,
        }
        self.call_event(call_id);
    }

    /// Opens a peer session to `user` for a call (unless one exists or is being set up).
    fn ensure_session(&mut self, now: Instant, user: &Username) {
        if self.peer_by_user.contains_key(user) || self.outbox.contains_key(user) {
            return;
        }
        if self.cfg.relay_only && self.relayed_address().is_none() {
            // A connection setup would hand out our addresses.
            return;
        }
        // An empty outbox marks the setup as under way; the dial drains it.
        self.outbox.insert(user.clone(), Vec::new());
        let body = Request::Connect {
            user: user.clone(),
            candidates: self.offer(),
            hard_nat: self.hard_nat(),
        };
        if self
            .server_request(now, body, ServerReq::Connect(user.clone()))
            .is_err()
        {
            self.outbox.remove(user);
        }
    }

    /// A peer session with `user` came up (or moved): calls waiting for it go active.
    fn call_session_up(&mut self, now: Instant, user: &Username) {
        let via = match self.peer_by_user.get(user).and_then(|i| self.peers.get(i)) {
            Some(p) if p.relayed => Via::Relay,
            Some(_) => Via::Direct,
            None => return,
        };
        let ids: Vec<u64> = self
            .calls
            .values()
            .filter(|c| {
                &c.info.peer == user
                    && (c.info.state == CallState::Connecting
                        || (c.info.state == CallState::Active && c.info.via != Some(via)))
            })
            .map(|c| c.info.call_id)
            .collect();
        for id in ids {
            if let Some(c) = self.calls.get_mut(&id) {
                c.activate(now, via);
            }
            self.call_event(id);
        }
    }

    /// Records whether the session with `user` is for a call only.
    fn mark_call_only(&mut self, user: &Username, call_only: bool) {
        if call_only {
            self.call_only.insert(user.clone());
        } else {
            self.call_only.remove(user);
        }
    }

    /// The peer session with `user` is gone: its active calls end.
    fn call_session_down(&mut self, now: Instant, user: &Username) {
        let ids: Vec<u64> = self
            .calls
            .values()
            .filter(|c| &c.info.peer == user && c.info.state == CallState::Active)
            .map(|c| c.info.call_id)
            .collect();
        for id in ids {
            self.call_hang_up(now, id, "the connection to the other side broke");
        }
    }

    /// A media datagram over the peer session with `user`.
    fn on_call_media(&mut self, now: Instant, user: &Username, bytes: Vec<u8>) {
        // Media from the callee over our session with them proves they answered: when it
        // overtakes the accept notice (which goes the long way, through the supernode),
        // the call goes active now rather than drop the callee's first words.
        let early = self
            .calls
            .values()
            .find(|c| {
                &c.info.peer == user
                    && c.info.direction == Direction::Outgoing
                    && matches!(c.info.state, CallState::Ringing | CallState::Connecting)
            })
            .map(|c| c.info.call_id);
        if let Some(id) = early {
            if let Some(c) = self.calls.get_mut(&id) {
                c.info.state = CallState::Connecting;
            }
            self.call_session_up(now, user);
        }
        let Some(c) = self
            .calls
            .values_mut()
            .find(|c| &c.info.peer == user && c.info.state == CallState::Active)
        else {
            return;
        };
        c.last_media = now;
        let call_id = c.info.call_id;
        self.events
            .push_back(ClientEvent::CallMedia { call_id, bytes });
    }

    /// Runs call timers.
    fn call_tick(&mut self, now: Instant) {
        let due: Vec<(u64, &'static str)> = self
            .calls
            .values()
            .filter_map(|c| c.timed_out(now).map(|r| (c.info.call_id, r)))
            .collect();
        for (id, reason) in due {
            self.call_hang_up(now, id, reason);
        }
    }

    fn calls_timeout(&self) -> Option<Instant> {
        self.calls.values().filter_map(|c| c.next_timer()).min()
    }

    /// The supernode pushed `IncomingCall`: ring, or answer busy.
    fn on_incoming_call(&mut self, now: Instant, from: Username, call_id: u64) -> Response {
        if self.in_a_call() {
            return Response::error(ErrorCode::Busy, "in another call");
        }
        self.calls.insert(
            call_id,
            Call::new(call_id, from, Direction::Incoming, now, None),
        );
        self.call_event(call_id);
        Response::Ok
    }

    /// The supernode answered our invite.
    fn on_invite_answer(&mut self, id: CommandId, call_id: u64, body: Response) {
        match body {
            Response::Ok => {
                if let Some(c) = self.calls.get_mut(&call_id) {
                    c.invite = None;
                }
                self.done(id, CommandResult::Call { call_id });
                if self
                    .calls
                    .get(&call_id)
                    .is_some_and(|c| c.info.state == CallState::Ringing)
                {
                    self.call_event(call_id);
                }
            }
            other => {
                self.calls.remove(&call_id);
                let r = err_result(&other).unwrap_or(CommandResult::error(
                    ErrorCode::Internal,
                    "unexpected answer",
                ));
                self.done(id, r);
            }
        }
    }
}
