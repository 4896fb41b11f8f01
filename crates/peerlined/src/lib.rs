//! The operator's daemon: data dir initialisation, configuration, and running the
//! supernode with its embedded authority and store.
#![deny(missing_docs)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use peerline_core::supernode::SupernodeConfig;
use peerline_crypto::{Authority, DeviceKeys};
use peerline_net::bootstrap::Bootstrap;
use peerline_net::files::{create_private_dir, write_private_file};
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
    /// `text` or `json`.
    pub log_format: String,
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
            log_format: "text".into(),
        }
    }
}

impl Config {
    /// The TCP fallback address, if enabled.
    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        match self.tcp_listen {
            TcpListen::SameAsUdp => Some(self.listen),
            TcpListen::Off => None,
            TcpListen::At(a) => Some(a),
        }
    }

    /// The core configuration these settings describe.
    pub fn supernode(&self) -> SupernodeConfig {
        SupernodeConfig {
            cert_lifetime: Duration::from_secs(self.cert_lifetime_hours.max(1) * 3600),
            mailbox_quota: self.mailbox_quota,
            max_sessions: self.max_sessions,
            ..SupernodeConfig::default()
        }
    }
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

fn tcp_listen<'de, D: serde::Deserializer<'de>>(d: D) -> Result<TcpListen, D::Error> {
    Ok(opt_addr(d)?.map_or(TcpListen::Off, TcpListen::At))
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

fn template(listen: SocketAddr, admin: Option<SocketAddr>) -> String {
    let admin_line = match admin {
        Some(a) => format!("admin = \"{a}\""),
        None => "admin = \"off\"".to_string(),
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

# Log format: "text" or "json" (logs never contain users' addresses at info level).
log_format = "text"
"#
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
    /// A key file is corrupt.
    #[error("{} is corrupt: restore it from a backup", .0.display())]
    BadKey(PathBuf),
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

/// Creates keys, config and bootstrap entry in `data`.
pub fn init(
    data: &Path,
    listen: SocketAddr,
    public: Option<&str>,
    admin: Option<SocketAddr>,
) -> Result<InitReport, DaemonError> {
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
    write_private_file(&cfg_path, template(listen, admin).as_bytes()).map_err(io(&cfg_path))?;
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

fn read_key(path: &Path) -> Result<[u8; 32], DaemonError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let raw = STANDARD
        .decode(text.trim())
        .map_err(|_| DaemonError::BadKey(path.to_path_buf()))?;
    raw.try_into()
        .map_err(|_| DaemonError::BadKey(path.to_path_buf()))
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
    let cfg_path = data.join(CONFIG_FILE);
    let config = match std::fs::read_to_string(&cfg_path) {
        Ok(text) => toml::from_str(&text).map_err(|e| DaemonError::Config {
            path: cfg_path.clone(),
            msg: e.message().to_string(),
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Config::default(),
        Err(e) => return Err(io(&cfg_path)(e)),
    };
    Ok(Loaded {
        config,
        node_private: read_key(&node_path)?,
        authority: read_key(&data.join(AUTHORITY_KEY_FILE))?,
    })
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
}
