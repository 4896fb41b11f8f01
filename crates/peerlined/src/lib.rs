//! The operator's daemon: data dir initialisation, configuration, and running the
//! supernode with its embedded authority and store, and the TURN relay it offers.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use peerline_core::relay::RelayConfig;
use peerline_core::supernode::{Limits, RelayOffer, SupernodeConfig};
use peerline_crypto::{Authority, DeviceKeys};
use peerline_net::bootstrap::Bootstrap;
use peerline_net::files::{create_private_dir, write_private_file};
use peerline_net::relay::RelayRuntime;
use rand_core::RngCore;
use serde::Deserialize;

/// Name of the config file in the data dir.
pub const CONFIG_FILE: &str = "peerlined.toml";
/// Supernode Noise key file.
pub const NODE_KEY_FILE: &str = "node.key";
/// Authority signing key file.
pub const AUTHORITY_KEY_FILE: &str = "authority.key";
/// Bootstrap entry file.
pub const BOOTSTRAP_FILE: &str = "bootstrap";
/// Pid file written by `run`.
pub const PID_FILE: &str = "peerlined.pid";
/// SQLite store.
pub const STORE_FILE: &str = "store.sqlite";
/// Session snapshot used to wake clients after a restart.
pub const SNAPSHOT_FILE: &str = "sessions.snapshot";
/// Secret shared by the supernode (which issues TURN credentials) and the relay.
pub const RELAY_SECRET_FILE: &str = "relay.secret";
/// The relay's UDP port unless configured otherwise (the usual TURN port).
pub const DEFAULT_RELAY_PORT: u16 = 3478;

/// Settings from `peerlined.toml`; every field has a default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// UDP address to listen on.
    pub listen: SocketAddr,
    /// TCP address for clients whose network blocks UDP: the UDP address if unset,
    /// `"off"` disables it.
    #[serde(deserialize_with = "tcp_listen")]
    pub tcp_listen: TcpListen,
    /// Admin HTTP address (metrics); `"off"` disables it.
    #[serde(deserialize_with = "admin_addr")]
    pub admin: Option<SocketAddr>,
    /// Device certificate validity in hours.
    pub cert_lifetime_hours: u64,
    /// Offline messages kept per recipient.
    pub mailbox_quota: usize,
    /// Most concurrent sessions.
    pub max_sessions: usize,
    /// Per-source and per-account rate limits (false only for load tests from one host).
    pub rate_limits: bool,
    /// Handshakes per second beyond which initiations must carry a cookie.
    pub handshake_load_per_second: u32,
    /// Half-open sessions at which initiations must carry a cookie.
    pub half_open_load: usize,
    /// Most half-open sessions at once.
    pub max_half_open: usize,
    /// Largest clock difference accepted in a login, in seconds.
    pub max_clock_skew_secs: u64,
    /// `text` or `json`.
    pub log_format: String,
    /// UDP address of the TURN relay: the `listen` IP with port 3478 if unset, `"off"`
    /// runs none.
    #[serde(deserialize_with = "relay_listen")]
    pub relay_listen: RelayListen,
    /// The relay address clients are told; unset: the relay's listening address.
    pub relay_public: Option<SocketAddr>,
    /// Validity of the relay credentials handed to clients, in hours.
    pub relay_credential_hours: u64,
    /// Let the relay reach peers on private, shared (CGNAT), link-local and unique-local
    /// addresses (never loopback).
    pub relay_allow_private_peers: bool,
    /// `[store]`: where accounts, contacts and offline messages live.
    pub store: StoreConfig,
    /// `[directory]`: where the online directory lives.
    pub directory: DirectorySection,
    /// `[fleet]`: this supernode's place in a fleet (used with a shared directory).
    pub fleet: FleetSection,
}

/// The `[directory]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DirectorySection {
    /// `"memory"` (a single supernode) or `"redis://h1:p1,h2:p2,..."` (a fleet on Redis
    /// Cluster).
    pub url: String,
    /// Prefix of the fleet's Redis keys (several fleets may share one cluster).
    pub prefix: String,
}

impl Default for DirectorySection {
    fn default() -> Self {
        DirectorySection {
            url: "memory".into(),
            prefix: "peerline".into(),
        }
    }
}

/// The `[fleet]` table.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetSection {
    /// This supernode's id, unique in the fleet (required with a shared directory).
    pub node_id: Option<u32>,
    /// TCP address for the node-to-node channel.
    pub listen: SocketAddr,
    /// The node-to-node address other supernodes use, when `listen` is a wildcard.
    pub advertise: Option<SocketAddr>,
    /// The UDP address clients are sent to (host caches, redirects): `listen` if unset.
    pub public: Option<SocketAddr>,
    /// At shutdown, seconds to wait for users to move to other supernodes.
    pub drain_timeout_secs: u64,
}

impl Default for FleetSection {
    fn default() -> Self {
        FleetSection {
            node_id: None,
            listen: SocketAddr::from(([127, 0, 0, 1], 7100)),
            advertise: None,
            public: None,
            drain_timeout_secs: 10,
        }
    }
}

/// A supernode's fleet settings, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetSettings {
    /// The shared directory's URL.
    pub directory_url: String,
    /// Prefix of its keys.
    pub prefix: String,
    /// This supernode's id.
    pub node_id: u32,
    /// Node-to-node listen address.
    pub listen: SocketAddr,
    /// Node-to-node address others use.
    pub advertise: Option<SocketAddr>,
    /// UDP address clients use.
    pub public: SocketAddr,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: SocketAddr::from(([127, 0, 0, 1], 7000)),
            tcp_listen: TcpListen::SameAsUdp,
            admin: Some(SocketAddr::from(([127, 0, 0, 1], 7001))),
            cert_lifetime_hours: 24,
            mailbox_quota: 1000,
            max_sessions: 1_000_000,
            rate_limits: true,
            handshake_load_per_second: Limits::default().load_handshakes_per_second,
            half_open_load: Limits::default().load_half_open,
            max_half_open: Limits::default().max_half_open,
            max_clock_skew_secs: Limits::default().max_clock_skew.as_secs(),
            log_format: "text".into(),
            relay_listen: RelayListen::SameIpAsListen,
            relay_public: None,
            relay_credential_hours: 24,
            relay_allow_private_peers: true,
            directory: DirectorySection::default(),
            fleet: FleetSection::default(),
            store: StoreConfig::default(),
        }
    }
}

impl Config {
    /// The fleet settings: `None` with the in-memory directory (a single supernode).
    pub fn fleet_settings(&self) -> Result<Option<FleetSettings>, DaemonError> {
        let url = self.directory.url.trim();
        if url == "memory" {
            return Ok(None);
        }
        if !url.starts_with("redis://") {
            return Err(DaemonError::Fleet(format!(
                "[directory] url must be \"memory\" or \"redis://HOST:PORT,HOST:PORT,...\", not {url:?}"
            )));
        }
        let Some(node_id) = self.fleet.node_id else {
            return Err(DaemonError::Fleet(
                "a shared [directory] needs [fleet] node_id = N, unique in the fleet".into(),
            ));
        };
        Ok(Some(FleetSettings {
            directory_url: url.to_string(),
            prefix: self.directory.prefix.clone(),
            node_id,
            listen: self.fleet.listen,
            advertise: self.fleet.advertise,
            public: self.fleet.public.unwrap_or(self.listen),
        }))
    }

    /// The TCP fallback address, if enabled.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self.tcp_listen {
            TcpListen::SameAsUdp => Some(self.listen),
            TcpListen::Off => None,
            TcpListen::At(a) => Some(a),
        }
    }

    /// The core configuration these settings describe, offering `relay` if given (see
    /// [`Config::relay_offer`]).
    pub fn supernode(&self, relay: Option<RelayOffer>) -> SupernodeConfig {
        let base = if self.rate_limits {
            Limits {
                load_handshakes_per_second: self.handshake_load_per_second,
                load_half_open: self.half_open_load,
                ..Limits::default()
            }
        } else {
            Limits::off()
        };
        SupernodeConfig {
            cert_lifetime: Duration::from_secs(self.cert_lifetime_hours.max(1) * 3600),
            mailbox_quota: self.mailbox_quota,
            max_sessions: self.max_sessions,
            relay,
            limits: Limits {
                max_half_open: self.max_half_open,
                max_clock_skew: Duration::from_secs(self.max_clock_skew_secs),
                ..base
            },
            ..SupernodeConfig::default()
        }
    }

    /// The relay's listening address, if it runs in this process.
    pub fn relay_addr(&self) -> Option<SocketAddr> {
        match self.relay_listen {
            RelayListen::SameIpAsListen => {
                Some(SocketAddr::new(self.listen.ip(), DEFAULT_RELAY_PORT))
            }
            RelayListen::Off => None,
            RelayListen::At(a) => Some(a),
        }
    }

    /// The relay driver's settings: `Ok(None)` when `relay_listen` is off, an error (one
    /// line saying what to set) when clients and peers could not be told a usable address.
    pub fn relay_runtime(&self, secret: [u8; 32]) -> Result<Option<RelayRuntime>, String> {
        let Some(listen) = self.relay_addr() else {
            return Ok(None);
        };
        let advertise = self.relay_public.map_or(listen.ip(), |p| p.ip());
        if advertise.is_unspecified() {
            let example = if listen.is_ipv4() {
                "203.0.113.5"
            } else {
                "[2001:db8::5]"
            };
            return Err(format!(
                "relay_listen {listen} is a wildcard address: set relay_public = \"{example}:{}\" \
                 (this server's public IP) in {CONFIG_FILE}",
                listen.port()
            ));
        }
        Ok(Some(RelayRuntime {
            listen,
            secret,
            config: RelayConfig {
                allow_private_peers: self.relay_allow_private_peers,
                allow_loopback_peers: false,
                ..RelayConfig::default()
            },
            advertise_ip: Some(advertise),
            tcp: true,
        }))
    }

    /// What the supernode offers clients. With `relay_listen` set, the relay of this
    /// process once bound at `bound` (`None`: it is not running, so nothing is offered);
    /// with `relay_listen = "off"`, the `relay_public` of a relay run elsewhere, if set.
    /// `Ok(None)`: no relay to offer; `Err`: a relay that clients could not use (a wildcard
    /// or loopback address), with what to change.
    pub fn relay_offer(
        &self,
        bound: Option<SocketAddr>,
        secret: [u8; 32],
    ) -> Result<Option<RelayOffer>, String> {
        let server = match (self.relay_addr(), bound, self.relay_public) {
            (Some(_), None, _) | (None, _, None) => return Ok(None),
            (Some(_), Some(b), None) => b,
            (Some(_), Some(b), Some(p)) if p.port() == 0 => SocketAddr::new(p.ip(), b.port()),
            (_, _, Some(p)) => p,
        };
        if server.ip().is_unspecified() || server.port() == 0 {
            return Err(format!(
                "{server} is not an address clients can use: set relay_public in {CONFIG_FILE}"
            ));
        }
        if server.ip().is_loopback() {
            // Loopback peers are refused, and nothing off this host reaches a loopback
            // relayed address: such a relay could relay nothing.
            return Err(format!(
                "{server} is a loopback address, which no peer could use: set relay_listen \
                 (or relay_public) in {CONFIG_FILE} to a reachable address"
            ));
        }
        Ok(Some(RelayOffer {
            server,
            secret,
            lifetime: Duration::from_secs(self.relay_credential_hours.max(1) * 3600),
        }))
    }
}

/// Where the TURN relay listens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum RelayListen {
    /// The IP of `listen`, port [`DEFAULT_RELAY_PORT`].
    #[default]
    SameIpAsListen,
    /// No relay in this process.
    Off,
    /// This address.
    At(SocketAddr),
}

/// Where the TCP fallback listens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum TcpListen {
    /// The same address and port as UDP.
    #[default]
    SameAsUdp,
    /// No TCP fallback.
    Off,
    /// This address.
    At(SocketAddr),
}

/// The `[store]` table.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite://PATH` (relative paths are inside the data dir) or
    /// `postgres://USER@HOST:PORT/DATABASE`.
    #[serde(deserialize_with = "store_url")]
    pub url: StoreUrl,
}

/// Which [`peerline_core::store::Store`] backend holds the data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// An SQLite file; a relative path is inside the data dir.
    Sqlite(PathBuf),
    /// A PostgreSQL database, possibly shared by several supernodes (the URL as written).
    Postgres(String),
}

impl Default for StoreUrl {
    fn default() -> Self {
        StoreUrl::Sqlite(PathBuf::from(STORE_FILE))
    }
}

/// Why a `[store] url` is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreUrlError {
    /// Neither `sqlite://` nor `postgres://`.
    #[error("store url {0:?} is neither sqlite://PATH nor postgres://USER@HOST:PORT/DATABASE")]
    Scheme(String),
    /// `sqlite://` without a path.
    #[error(
        "store url {0:?} names no file: write sqlite://store.sqlite or sqlite:///absolute/path"
    )]
    NoPath(String),
    /// A `postgres://` URL that does not parse.
    #[error("{0}")]
    Postgres(String),
}

impl StoreUrl {
    /// Parses a `[store] url` value (see [`StoreConfig::url`]).
    pub fn parse(url: &str) -> Result<StoreUrl, StoreUrlError> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(StoreUrlError::NoPath(url.to_string()));
            }
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            peerline_store_pg::parse_url(url)
                .map_err(|e| StoreUrlError::Postgres(e.to_string()))?;
            return Ok(StoreUrl::Postgres(url.to_string()));
        }
        Err(StoreUrlError::Scheme(peerline_store_pg::redact(url)))
    }
}

fn store_url<'de, D: serde::Deserializer<'de>>(d: D) -> Result<StoreUrl, D::Error> {
    let s = String::deserialize(d)?;
    StoreUrl::parse(&s).map_err(serde::de::Error::custom)
}

fn tcp_listen<'de, D: serde::Deserializer<'de>>(d: D) -> Result<TcpListen, D::Error> {
    Ok(opt_addr(d)?.map_or(TcpListen::Off, TcpListen::At))
}

fn relay_listen<'de, D: serde::Deserializer<'de>>(d: D) -> Result<RelayListen, D::Error> {
    Ok(opt_addr(d)?.map_or(RelayListen::Off, RelayListen::At))
}

fn admin_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    opt_addr(d)
}

fn opt_addr<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if s == "off" {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| serde::de::Error::custom(format!("{s:?} is not HOST:PORT or \"off\"")))
}

/// The `[store]` table of a new config: the default SQLite file unless `store_url` is given.
fn store_section(store_url: Option<&str>) -> String {
    let url_line = match store_url {
        // Quoted by the TOML writer, so any character survives.
        Some(u) => format!("url = {}", toml::Value::String(u.to_string())),
        None => format!("url = \"sqlite://{STORE_FILE}\""),
    };
    format!(
        r#"
# Where accounts, devices, contacts and offline messages live.
#   sqlite://PATH: an SQLite file (a relative PATH is inside this data dir); one supernode.
#   postgres://USER@HOST:PORT/DATABASE: PostgreSQL, which several supernodes can share.
#     The schema is created and upgraded at start; no TLS: keep it on a private network.
[store]
{url_line}
"#
    )
}

fn template(
    listen: SocketAddr,
    public: Option<&str>,
    admin: Option<SocketAddr>,
    store_url: Option<&str>,
) -> String {
    let admin_line = match admin {
        Some(a) => format!("admin = \"{a}\""),
        None => "admin = \"off\"".to_string(),
    };
    let relay_listen = SocketAddr::new(listen.ip(), DEFAULT_RELAY_PORT);
    // On a wildcard address the relay needs a public IP to tell clients and peers: take it
    // from `--public` when that is an IP literal, else leave the operator a hint.
    let public_ip: Option<IpAddr> = public
        .and_then(|p| p.parse::<SocketAddr>().ok())
        .map(|a| a.ip())
        .filter(|ip| !ip.is_unspecified());
    let relay_public_line = match public_ip {
        Some(ip) if listen.ip().is_unspecified() => {
            format!(
                "relay_public = \"{}\"",
                SocketAddr::new(ip, DEFAULT_RELAY_PORT)
            )
        }
        _ if listen.ip().is_unspecified() => format!(
            "# REQUIRED with a wildcard relay_listen, else no relay runs:\n\
             # relay_public = \"{}\"",
            SocketAddr::new(
                if listen.is_ipv4() {
                    IpAddr::from([203, 0, 113, 5])
                } else {
                    IpAddr::from([0x2001, 0xdb8, 0, 0, 0, 0, 0, 5])
                },
                DEFAULT_RELAY_PORT
            )
        ),
        _ => format!(
            "# relay_public = \"{}\"",
            SocketAddr::new(listen.ip(), DEFAULT_RELAY_PORT)
        ),
    };
    format!(
        r#"# Peerline supernode configuration. Every setting is optional; command-line flags win.

# UDP address clients connect to.
listen = "{listen}"

# TCP address for clients whose network blocks UDP (datagrams framed over TCP).
# Unset: the same address and port as `listen`; "off" disables it.
# tcp_listen = "0.0.0.0:443"

# Admin HTTP endpoint with Prometheus metrics at /metrics ("off" disables it).
# Keep it on loopback.
{admin_line}

# Validity of device certificates in hours; clients renew at half-life while online.
cert_lifetime_hours = 24

# Offline messages kept per recipient; beyond it senders get "mailbox full".
mailbox_quota = 1000

# Most concurrent client sessions.
max_sessions = 1000000

# Flood protection. Beyond this many handshakes per second, or this many half-open
# sessions (clients that have not answered yet), a handshake must carry a cookie: the
# supernode answers one without it with a cookie reply and does no key-exchange work, so
# spoofed sources cost almost nothing. Half-open sessions are capped and expire after 10 s.
handshake_load_per_second = 2000
half_open_load = 2000
max_half_open = 50000

# Logins whose clock differs from the supernode's by more than this are refused (a
# replayed handshake, or a device with a wrong clock, which is told so).
max_clock_skew_secs = 300

# Per-address and per-account limits on handshakes under load, logins, registrations,
# enrolments (with a growing wait after wrong passwords), searches, contact requests,
# messages and connection setups. Set false only for a load test from a single host.
rate_limits = true

# Log format: "text" or "json" (logs never contain users' addresses at info level).
log_format = "text"

# TURN relay (UDP) for users who cannot reach each other directly; logged-in users get
# time-limited credentials for it, signed with the secret in relay.secret. Each allocation
# uses one more UDP port on the same IP, picked by the OS from its ephemeral range.
# "off": no relay in this process.
relay_listen = "{relay_listen}"

# IP:PORT clients are told, and whose IP is given to peers. Unset: relay_listen. Needed
# when relay_listen is a wildcard (0.0.0.0 or [::]) or behind a 1:1 NAT. With
# relay_listen = "off", setting it still offers that relay: one run elsewhere with
# `peerlined relay` and a copy of relay.secret.
{relay_public_line}

# Validity of relay credentials handed to clients, in hours.
relay_credential_hours = 24

# Let the relay reach peers on private addresses (10/8, 172.16/12, 192.168/16, 100.64/10,
# link-local, fc00::/7), as LANs and labs need. Set false on a relay facing the public
# internet, so it cannot be used to reach into your network. Loopback is always refused.
relay_allow_private_peers = true
{store}"#,
        store = store_section(store_url)
    )
}

/// Daemon errors, each with what to do about it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DaemonError {
    /// `init` on a data dir that already has keys.
    #[error("{} is already initialised (found {NODE_KEY_FILE}); use another --data dir or remove it", .0.display())]
    AlreadyInitialised(PathBuf),
    /// `run` on a data dir without keys.
    #[error("{} is not a supernode data dir (no {NODE_KEY_FILE}); run `peerlined init --data {}` first", .0.display(), .0.display())]
    NotInitialised(PathBuf),
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
    /// `relay` on a data dir without the relay secret.
    #[error("{} has no {RELAY_SECRET_FILE}: copy it from the supernode's data dir (the relay and the supernode must share it)", .0.display())]
    NoRelaySecret(PathBuf),
    /// The fleet settings are incomplete or wrong.
    #[error("fleet configuration: {0}")]
    Fleet(String),
    /// A key file is corrupt.
    #[error("{} is corrupt: restore it from a backup", .0.display())]
    BadKey(PathBuf),
    /// A `[store] url` given to `init` is not usable.
    #[error(transparent)]
    StoreUrl(#[from] StoreUrlError),
    /// The config file does not parse.
    #[error("{}: {msg}", path.display())]
    Config {
        /// The file.
        path: PathBuf,
        /// Parser message.
        msg: String,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> DaemonError + '_ {
    move |source| DaemonError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// What `init` created.
#[derive(Debug, Clone)]
pub struct InitReport {
    /// The bootstrap entry clients use.
    pub bootstrap: String,
    /// The data dir.
    pub data: PathBuf,
}

/// Creates keys, config and bootstrap entry in `data`, with the default SQLite store.
pub fn init(
    data: &Path,
    listen: SocketAddr,
    public: Option<&str>,
    admin: Option<SocketAddr>,
) -> Result<InitReport, DaemonError> {
    init_with_store(data, listen, public, admin, None)
}

/// Like [`init`], writing `store_url` (checked first) as the config's `[store] url`.
pub fn init_with_store(
    data: &Path,
    listen: SocketAddr,
    public: Option<&str>,
    admin: Option<SocketAddr>,
    store_url: Option<&str>,
) -> Result<InitReport, DaemonError> {
    if let Some(u) = store_url {
        StoreUrl::parse(u)?;
    }
    if data.join(NODE_KEY_FILE).exists() {
        return Err(DaemonError::AlreadyInitialised(data.to_path_buf()));
    }
    create_private_dir(data).map_err(io(data))?;
    let mut rng = rand_core::OsRng;
    let node = DeviceKeys::generate(&mut rng);
    let authority = Authority::generate(&mut rng);
    let node_path = data.join(NODE_KEY_FILE);
    write_private_file(&node_path, STANDARD.encode(node.noise_private()).as_bytes())
        .map_err(io(&node_path))?;
    let auth_path = data.join(AUTHORITY_KEY_FILE);
    write_private_file(&auth_path, STANDARD.encode(authority.to_bytes()).as_bytes())
        .map_err(io(&auth_path))?;
    let cfg_path = data.join(CONFIG_FILE);
    write_private_file(
        &cfg_path,
        template(listen, public, admin, store_url).as_bytes(),
    )
    .map_err(io(&cfg_path))?;
    create_relay_secret(data, &mut rng)?;
    let host = public
        .map(str::to_string)
        .unwrap_or_else(|| listen.to_string());
    let bootstrap = Bootstrap {
        host,
        node_key: node.noise_public(),
        authority: authority.public(),
    }
    .encode();
    let b_path = data.join(BOOTSTRAP_FILE);
    std::fs::write(&b_path, format!("{bootstrap}\n")).map_err(io(&b_path))?;
    Ok(InitReport {
        bootstrap,
        data: data.to_path_buf(),
    })
}

/// How a new data dir joins an existing fleet.
#[derive(Debug, Clone)]
pub struct Join {
    /// Data dir of a supernode of the fleet: its keys are copied (every supernode of a
    /// fleet has the same Noise key, authority key and relay secret). None: the first
    /// supernode of a new fleet, with fresh keys.
    pub from: Option<PathBuf>,
    /// This supernode's id, unique in the fleet.
    pub node_id: u32,
    /// The shared directory's URL.
    pub directory_url: String,
    /// Node-to-node TCP address.
    pub fleet_listen: SocketAddr,
}

/// Makes `data` a supernode of the fleet `join.from` belongs to: `init`, then the fleet's
/// keys and a `[directory]` and `[fleet]` table.
pub fn init_member(
    data: &Path,
    listen: SocketAddr,
    public: Option<&str>,
    admin: Option<SocketAddr>,
    store_url: Option<&str>,
    join: &Join,
) -> Result<InitReport, DaemonError> {
    if let Some(from) = &join.from {
        if !from.join(NODE_KEY_FILE).exists() {
            return Err(DaemonError::NotInitialised(from.clone()));
        }
    }
    let mut report = init_with_store(data, listen, public, admin, store_url)?;
    if let Some(from) = &join.from {
        for f in [NODE_KEY_FILE, AUTHORITY_KEY_FILE, RELAY_SECRET_FILE] {
            let src = from.join(f);
            let key = read_key(&src)?;
            let dst = data.join(f);
            write_private_file(&dst, STANDARD.encode(key).as_bytes()).map_err(io(&dst))?;
        }
        // The same keys as the fleet's, so the fleet's bootstrap key with this host.
        let from_b = from.join(BOOTSTRAP_FILE);
        let theirs = std::fs::read_to_string(&from_b).map_err(io(&from_b))?;
        let theirs = Bootstrap::parse(&theirs).map_err(|_| DaemonError::BadKey(from_b.clone()))?;
        let host = public
            .map(str::to_string)
            .unwrap_or_else(|| listen.to_string());
        report.bootstrap = Bootstrap { host, ..theirs }.encode();
        let b_path = data.join(BOOTSTRAP_FILE);
        std::fs::write(&b_path, format!("{}\n", report.bootstrap)).map_err(io(&b_path))?;
    }
    let cfg_path = data.join(CONFIG_FILE);
    let mut text = std::fs::read_to_string(&cfg_path).map_err(io(&cfg_path))?;
    text.push_str(&format!(
        r#"
# The online directory shared by the fleet (Redis Cluster seed nodes).
[directory]
url = "{}"

# This supernode's place in the fleet.
[fleet]
node_id = {}
# Node-to-node channel (TCP, encrypted and authenticated with a key derived from the
# authority key). Other supernodes must reach it; keep it off the public internet.
listen = "{}"
# UDP address clients are sent to when they move here (default: listen above).
# public = "203.0.113.7:7000"
# Seconds to wait at shutdown for users to move to other supernodes.
drain_timeout_secs = 10
"#,
        join.directory_url, join.node_id, join.fleet_listen
    ));
    write_private_file(&cfg_path, text.as_bytes()).map_err(io(&cfg_path))?;
    Ok(report)
}

fn read_key(path: &Path) -> Result<[u8; 32], DaemonError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let raw = STANDARD
        .decode(text.trim())
        .map_err(|_| DaemonError::BadKey(path.to_path_buf()))?;
    raw.try_into()
        .map_err(|_| DaemonError::BadKey(path.to_path_buf()))
}

fn create_relay_secret(data: &Path, rng: &mut impl RngCore) -> Result<[u8; 32], DaemonError> {
    let mut secret = [0u8; 32];
    rng.fill_bytes(&mut secret);
    let path = data.join(RELAY_SECRET_FILE);
    write_private_file(&path, STANDARD.encode(secret).as_bytes()).map_err(io(&path))?;
    Ok(secret)
}

/// The relay secret of `data`, created (from the OS RNG) if the data dir predates the
/// relay; the flag says it was just created.
pub fn ensure_relay_secret(data: &Path) -> Result<([u8; 32], bool), DaemonError> {
    let path = data.join(RELAY_SECRET_FILE);
    if path.exists() {
        return Ok((read_key(&path)?, false));
    }
    Ok((create_relay_secret(data, &mut rand_core::OsRng)?, true))
}

/// The relay secret of `data`, which must exist (a relay on another box needs a copy of
/// the supernode's).
pub fn read_relay_secret(data: &Path) -> Result<[u8; 32], DaemonError> {
    let path = data.join(RELAY_SECRET_FILE);
    if !path.exists() {
        return Err(DaemonError::NoRelaySecret(data.to_path_buf()));
    }
    read_key(&path)
}

/// Reads `peerlined.toml` in `data` (defaults when there is none).
pub fn load_config(data: &Path) -> Result<Config, DaemonError> {
    let cfg_path = data.join(CONFIG_FILE);
    match std::fs::read_to_string(&cfg_path) {
        Ok(text) => toml::from_str(&text).map_err(|e| DaemonError::Config {
            path: cfg_path.clone(),
            msg: e.message().to_string(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
        Err(e) => Err(io(&cfg_path)(e)),
    }
}

/// A data dir's keys and settings.
#[derive(Debug)]
pub struct Loaded {
    /// Settings.
    pub config: Config,
    /// Noise static private key.
    pub node_private: [u8; 32],
    /// Authority signing key.
    pub authority: [u8; 32],
}

/// Reads keys and config from `data`.
pub fn load(data: &Path) -> Result<Loaded, DaemonError> {
    let node_path = data.join(NODE_KEY_FILE);
    if !node_path.exists() {
        return Err(DaemonError::NotInitialised(data.to_path_buf()));
    }
    Ok(Loaded {
        config: load_config(data)?,
        node_private: read_key(&node_path)?,
        authority: read_key(&data.join(AUTHORITY_KEY_FILE))?,
    })
}

/// A device key given on the command line.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?} is not a device key: give the 64 hex digits `peerlined devices` lists")]
pub struct BadDeviceKey(pub String);

/// Parses a device key as `peerlined devices` lists it (64 hex digits, either case).
pub fn parse_device_key(s: &str) -> Result<[u8; 32], BadDeviceKey> {
    let mut key = [0u8; 32];
    hex::decode_to_slice(s.trim(), &mut key).map_err(|_| BadDeviceKey(s.to_string()))?;
    Ok(key)
}

#[cfg(test)]
mod device_key_tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn device_keys_round_trip(key in any::<[u8; 32]>()) {
            let hex = hex::encode(key);
            prop_assert_eq!(hex.len(), 64);
            prop_assert_eq!(parse_device_key(&hex), Ok(key));
            prop_assert_eq!(parse_device_key(&hex.to_uppercase()), Ok(key));
        }

        #[test]
        fn anything_else_is_refused_without_panicking(s in ".{0,80}") {
            if let Ok(k) = parse_device_key(&s) {
                prop_assert_eq!(hex::encode(k), s.trim().to_lowercase());
            }
        }
    }

    #[test]
    fn short_long_and_non_hex_keys_are_refused() {
        assert!(parse_device_key("ab").is_err());
        assert!(parse_device_key(&"a".repeat(66)).is_err());
        assert!(parse_device_key(&"g".repeat(64)).is_err());
        assert!(parse_device_key(&"é".repeat(32)).is_err());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_load_and_refuse_twice() {
        let d = std::env::temp_dir().join(format!("peerlined-init-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let r = init(&d, "127.0.0.1:7400".parse().unwrap(), None, None).unwrap();
        let b = Bootstrap::parse(&r.bootstrap).unwrap();
        let l = load(&d).unwrap();
        assert_eq!(l.config.listen, "127.0.0.1:7400".parse().unwrap());
        assert_eq!(Authority::from_bytes(&l.authority).public(), b.authority);
        assert!(matches!(
            init(&d, "127.0.0.1:1".parse().unwrap(), None, None),
            Err(DaemonError::AlreadyInitialised(_))
        ));
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn temp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("peerlined-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn parse(text: &str) -> Config {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn init_writes_a_private_relay_secret_and_relay_keys() {
        use std::os::unix::fs::PermissionsExt;
        let d = temp("relay-init");
        init(&d, "192.0.2.7:7000".parse().unwrap(), None, None).unwrap();
        let path = d.join(RELAY_SECRET_FILE);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (secret, created) = ensure_relay_secret(&d).unwrap();
        assert!(!created);
        assert_eq!(read_relay_secret(&d).unwrap(), secret);
        assert_ne!(secret, [0u8; 32]);
        let cfg = load(&d).unwrap().config;
        assert_eq!(
            cfg.relay_listen,
            RelayListen::At("192.0.2.7:3478".parse().unwrap())
        );
        assert_eq!(cfg.relay_public, None);
        assert_eq!(cfg.relay_credential_hours, 24);
        assert!(cfg.relay_allow_private_peers);
        let offer = cfg.relay_offer(cfg.relay_addr(), secret).unwrap().unwrap();
        assert_eq!(offer.server, "192.0.2.7:3478".parse().unwrap());
        assert_eq!(offer.lifetime, Duration::from_secs(24 * 3600));
        assert!(
            cfg.relay_offer(None, secret).unwrap().is_none(),
            "a relay that is not running is not offered"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_older_data_dir_gets_a_relay_secret_once() {
        let d = temp("relay-old");
        init(&d, "127.0.0.1:7000".parse().unwrap(), None, None).unwrap();
        std::fs::remove_file(d.join(RELAY_SECRET_FILE)).unwrap();
        assert!(matches!(
            read_relay_secret(&d),
            Err(DaemonError::NoRelaySecret(_))
        ));
        let (first, created) = ensure_relay_secret(&d).unwrap();
        assert!(created);
        let (again, created) = ensure_relay_secret(&d).unwrap();
        assert!(!created);
        assert_eq!(first, again);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn wildcard_init_takes_the_relay_ip_from_an_ip_public_address() {
        let d = temp("relay-wild");
        init(
            &d,
            "0.0.0.0:7000".parse().unwrap(),
            Some("203.0.113.9:7000"),
            None,
        )
        .unwrap();
        let cfg = load(&d).unwrap().config;
        assert_eq!(cfg.relay_public, Some("203.0.113.9:3478".parse().unwrap()));
        let rt = cfg.relay_runtime([1; 32]).unwrap().unwrap();
        assert_eq!(rt.listen, "0.0.0.0:3478".parse().unwrap());
        assert_eq!(rt.advertise_ip, Some("203.0.113.9".parse().unwrap()));
        assert!(rt.config.allow_private_peers);
        assert!(!rt.config.allow_loopback_peers);
        std::fs::remove_dir_all(&d).unwrap();

        // A public name cannot be used: the relay needs relay_public set by hand.
        let d = temp("relay-wild-name");
        init(
            &d,
            "0.0.0.0:7000".parse().unwrap(),
            Some("chat.example.org:7000"),
            None,
        )
        .unwrap();
        let cfg = load(&d).unwrap().config;
        assert_eq!(cfg.relay_public, None);
        let err = cfg.relay_runtime([1; 32]).unwrap_err();
        assert!(err.contains("relay_public"), "{err}");
        let err = cfg
            .relay_offer(Some("0.0.0.0:3478".parse().unwrap()), [1; 32])
            .unwrap_err();
        assert!(err.contains("relay_public"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn relay_keys_parse_like_the_other_addresses() {
        // Absent: the listen IP, port 3478, private peers allowed.
        let cfg = parse("listen = \"10.0.0.2:7000\"\n");
        assert_eq!(cfg.relay_listen, RelayListen::SameIpAsListen);
        assert_eq!(cfg.relay_addr(), Some("10.0.0.2:3478".parse().unwrap()));
        assert!(cfg.relay_allow_private_peers);

        // "off" with no relay_public: nothing runs, nothing is offered.
        let cfg = parse("relay_listen = \"off\"\n");
        assert_eq!(cfg.relay_addr(), None);
        assert!(cfg.relay_runtime([1; 32]).unwrap().is_none());
        assert!(cfg.relay_offer(None, [1; 32]).unwrap().is_none());

        // "off" with relay_public: a relay elsewhere is offered.
        let cfg = parse(
            "relay_listen = \"off\"\nrelay_public = \"198.51.100.4:3478\"\nrelay_credential_hours = 0\n",
        );
        let offer = cfg.relay_offer(None, [1; 32]).unwrap().unwrap();
        assert_eq!(offer.server, "198.51.100.4:3478".parse().unwrap());
        assert_eq!(
            offer.lifetime,
            Duration::from_secs(3600),
            "at least an hour"
        );

        // An explicit address, and the knob for public-internet relays.
        let cfg = parse("relay_listen = \"192.0.2.1:0\"\nrelay_allow_private_peers = false\n");
        let rt = cfg.relay_runtime([1; 32]).unwrap().unwrap();
        assert_eq!(rt.listen, "192.0.2.1:0".parse().unwrap());
        assert!(!rt.config.allow_private_peers);
        // Port 0: the offer uses the port actually bound.
        let offer = cfg
            .relay_offer(Some("192.0.2.1:40000".parse().unwrap()), [1; 32])
            .unwrap()
            .unwrap();
        assert_eq!(offer.server, "192.0.2.1:40000".parse().unwrap());

        // A relay on loopback runs (tests allocate on it) but is not offered: loopback
        // peers are refused and nothing else can reach it.
        let cfg = parse("listen = \"127.0.0.1:7000\"\n");
        assert!(cfg.relay_runtime([1; 32]).unwrap().is_some());
        let err = cfg
            .relay_offer(Some("127.0.0.1:3478".parse().unwrap()), [1; 32])
            .unwrap_err();
        assert!(err.contains("loopback"), "{err}");

        // Anything else is an error naming the value.
        let err = toml::from_str::<Config>("relay_listen = \"nope\"\n").unwrap_err();
        assert!(err.message().contains("nope"), "{}", err.message());
        assert!(toml::from_str::<Config>("relay_public = \"off\"\n").is_err());
    }

    #[test]
    fn store_url_defaults_to_sqlite_in_the_data_dir() {
        let cfg = parse("");
        assert_eq!(cfg.store.url, StoreUrl::Sqlite(PathBuf::from(STORE_FILE)));
        let cfg = parse("[store]\nurl = \"sqlite://db/peerline.sqlite\"\n");
        assert_eq!(
            cfg.store.url,
            StoreUrl::Sqlite(PathBuf::from("db/peerline.sqlite"))
        );
        let cfg = parse("[store]\nurl = \"sqlite:///var/lib/peerline/store.sqlite\"\n");
        assert_eq!(
            cfg.store.url,
            StoreUrl::Sqlite(PathBuf::from("/var/lib/peerline/store.sqlite"))
        );
        let cfg = parse("[store]\nurl = \"postgres://peerline@10.0.0.5:5432/peerline\"\n");
        assert_eq!(
            cfg.store.url,
            StoreUrl::Postgres("postgres://peerline@10.0.0.5:5432/peerline".into())
        );
    }

    #[test]
    fn a_bad_store_url_is_one_clear_line() {
        for (text, want) in [
            ("[store]\nurl = \"mysql://x@h/db\"\n", "neither sqlite://"),
            ("[store]\nurl = \"sqlite://\"\n", "names no file"),
            (
                "[store]\nurl = \"postgres://u@h:port/db\"\n",
                "invalid PostgreSQL URL",
            ),
            ("[store]\nurl = \"postgres://u@h:5432\"\n", "no database"),
            ("[store]\nlocation = \"x\"\n", "unknown field"),
        ] {
            let d = temp("store-bad");
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(CONFIG_FILE), text).unwrap();
            let err = load_config(&d).unwrap_err().to_string();
            assert!(err.contains(want), "{text}: {err}");
            assert!(err.contains(CONFIG_FILE), "{err}");
            assert!(!err.trim().contains('\n'), "one line: {err}");
            std::fs::remove_dir_all(&d).unwrap();
        }
        // A password is not repeated back.
        let err = StoreUrl::parse("mysql://u:hunter2@h/db")
            .unwrap_err()
            .to_string();
        assert!(!err.contains("hunter2"), "{err}");
    }

    #[test]
    fn init_writes_the_store_url_into_the_config() {
        let d = temp("store-init");
        let url = "postgres://peerline@127.0.0.1:55432/fleet";
        init_with_store(&d, "127.0.0.1:7000".parse().unwrap(), None, None, Some(url)).unwrap();
        assert_eq!(
            load(&d).unwrap().config.store.url,
            StoreUrl::Postgres(url.into())
        );
        std::fs::remove_dir_all(&d).unwrap();

        // The default template names the SQLite file explicitly.
        let d = temp("store-init-default");
        init(&d, "127.0.0.1:7000".parse().unwrap(), None, None).unwrap();
        let text = std::fs::read_to_string(d.join(CONFIG_FILE)).unwrap();
        assert!(text.contains("url = \"sqlite://store.sqlite\""), "{text}");
        assert_eq!(load(&d).unwrap().config.store.url, StoreUrl::default());
        std::fs::remove_dir_all(&d).unwrap();

        // A bad URL is refused before anything is created.
        let d = temp("store-init-bad");
        let err = init_with_store(
            &d,
            "127.0.0.1:7000".parse().unwrap(),
            None,
            None,
            Some("postgres://nohost"),
        )
        .unwrap_err();
        assert!(matches!(err, DaemonError::StoreUrl(_)), "{err:?}");
        assert!(!d.exists());
    }
}
