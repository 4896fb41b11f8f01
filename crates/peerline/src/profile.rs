//! A profile directory: device keys, certificate, supernode entry, history, agent files.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use peerline_crypto::identity::DEVICE_KEYS_LEN;
use peerline_crypto::DeviceKeys;
use peerline_net::bootstrap::Bootstrap;
use peerline_net::files::{create_private_dir, write_private_file};

/// Why a profile could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProfileError {
    /// IO on a profile file.
    #[error("{}: {source}", path.display())]
    Io {
        /// File.
        path: PathBuf,
        /// Error.
        source: std::io::Error,
    },
    /// A file is corrupt.
    #[error("{} is corrupt; remove the profile and register or enrol again", .0.display())]
    Corrupt(PathBuf),
    /// No certificate yet.
    #[error("this profile ({}) is not registered: run `peerline register USER --server BOOTSTRAP` first", .0.display())]
    NotRegistered(PathBuf),
    /// Bad bootstrap entry stored.
    #[error("{0}")]
    Bootstrap(#[from] peerline_net::bootstrap::BootstrapError),
}

/// A profile directory.
#[derive(Debug, Clone)]
pub struct Profile {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProfileError + '_ {
    move |source| ProfileError::Io {
        path: path.to_path_buf(),
        source,
    }
}

impl Profile {
    /// The profile dir: `arg`, else `$PEERLINE_PROFILE`, else `~/.peerline`.
    pub fn resolve(arg: Option<PathBuf>) -> PathBuf {
        arg.or_else(|| std::env::var_os("PEERLINE_PROFILE").map(PathBuf::from))
            .unwrap_or_else(|| {
                std::env::var_os("HOME")
                    .map(PathBuf::from)
                    .unwrap_or_else(|| PathBuf::from("."))
                    .join(".peerline")
            })
    }

    /// Opens (creating with mode 0700 if needed) the profile at `dir`.
    pub fn open(dir: &Path) -> Result<Self, ProfileError> {
        create_private_dir(dir).map_err(io(dir))?;
        Ok(Profile {
            dir: dir.to_path_buf(),
        })
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Control socket path.
    pub fn socket_path(&self) -> PathBuf {
        self.path("agent.sock")
    }

    /// Agent pid file.
    pub fn pid_path(&self) -> PathBuf {
        self.path("agent.pid")
    }

    /// Agent log.
    pub fn log_path(&self) -> PathBuf {
        self.path("agent.log")
    }

    /// Message history database.
    pub fn history_path(&self) -> PathBuf {
        self.path("history.sqlite")
    }

    /// The device keys, generated (and saved 0600) on first use.
    pub fn keys(&self) -> Result<DeviceKeys, ProfileError> {
        let p = self.path("device.key");
        match std::fs::read_to_string(&p) {
            Ok(text) => {
                let raw = STANDARD
                    .decode(text.trim())
                    .map_err(|_| ProfileError::Corrupt(p.clone()))?;
                let arr: [u8; DEVICE_KEYS_LEN] = raw
                    .try_into()
                    .map_err(|_| ProfileError::Corrupt(p.clone()))?;
                Ok(DeviceKeys::from_bytes(&arr))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let k = DeviceKeys::generate(&mut rand_core::OsRng);
                write_private_file(&p, STANDARD.encode(k.to_bytes()).as_bytes()).map_err(io(&p))?;
                Ok(k)
            }
            Err(e) => Err(io(&p)(e)),
        }
    }

    /// The device certificate, if registered.
    pub fn cert(&self) -> Result<Option<Vec<u8>>, ProfileError> {
        let p = self.path("device.cert");
        match std::fs::read_to_string(&p) {
            Ok(text) => Ok(Some(
                STANDARD
                    .decode(text.trim())
                    .map_err(|_| ProfileError::Corrupt(p))?,
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p)(e)),
        }
    }

    /// Saves a (renewed) certificate.
    pub fn save_cert(&self, cert: &[u8]) -> Result<(), ProfileError> {
        let p = self.path("device.cert");
        write_private_file(&p, STANDARD.encode(cert).as_bytes()).map_err(io(&p))
    }

    /// The supernode's bootstrap entry.
    pub fn server(&self) -> Result<Bootstrap, ProfileError> {
        let p = self.path("server");
        match std::fs::read_to_string(&p) {
            Ok(text) => Ok(Bootstrap::parse(&text)?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(ProfileError::NotRegistered(self.dir.clone()))
            }
            Err(e) => Err(io(&p)(e)),
        }
    }

    /// The presence chosen last time (`online` if never set).
    pub fn presence(&self) -> peerline_wire::msg::Presence {
        std::fs::read_to_string(self.path("presence"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(peerline_wire::msg::Presence::Online)
    }

    /// Remembers the chosen presence for the next start.
    pub fn save_presence(&self, p: peerline_wire::msg::Presence) -> Result<(), ProfileError> {
        let path = self.path("presence");
        write_private_file(&path, p.as_str().as_bytes()).map_err(io(&path))
    }

    /// Whether relay-only mode is on (never reveal this device's addresses to peers).
    pub fn relay_only(&self) -> bool {
        std::fs::read_to_string(self.path("relay-only")).is_ok_and(|t| t.trim() == "on")
    }

    /// Turns relay-only mode on or off (takes effect when the agent next starts).
    pub fn save_relay_only(&self, on: bool) -> Result<(), ProfileError> {
        let path = self.path("relay-only");
        write_private_file(&path, if on { b"on" } else { b"off" }).map_err(io(&path))
    }

    /// Whether anyone may ring this user (else contacts only, the default).
    pub fn anyone_can_call(&self) -> bool {
        std::fs::read_to_string(self.path("calls-from")).is_ok_and(|t| t.trim() == "anyone")
    }

    /// Remembers who may ring this user.
    pub fn save_anyone_can_call(&self, anyone: bool) -> Result<(), ProfileError> {
        let path = self.path("calls-from");
        let v: &[u8] = if anyone { b"anyone" } else { b"contacts" };
        write_private_file(&path, v).map_err(io(&path))
    }

    /// Host cache file: the fleet's supernodes, one `IP:PORT` a line.
    pub fn hosts_path(&self) -> PathBuf {
        self.path("hosts")
    }

    /// The fleet's supernodes saved last time (empty if none). Lines that are not an
    /// address are skipped: the cache is a hint, the bootstrap entry always works.
    pub fn hosts(&self) -> Vec<SocketAddr> {
        std::fs::read_to_string(self.hosts_path())
            .map(|t| parse_hosts(&t))
            .unwrap_or_default()
    }

    /// Saves the fleet's supernodes (atomically: a crash leaves the old list or the new).
    pub fn save_hosts(&self, hosts: &[SocketAddr]) -> Result<(), ProfileError> {
        let p = self.hosts_path();
        let text: String = hosts
            .iter()
            .take(peerline_wire::msg::MAX_HOSTS)
            .map(|h| format!("{h}\n"))
            .collect();
        write_private_file(&p, text.as_bytes()).map_err(io(&p))
    }

    /// Saves the supernode's bootstrap entry.
    pub fn save_server(&self, b: &Bootstrap) -> Result<(), ProfileError> {
        let p = self.path("server");
        write_private_file(&p, format!("{}\n", b.encode()).as_bytes()).map_err(io(&p))
    }
}

/// Addresses in a host cache file, at most `MAX_HOSTS`, in order, without duplicates.
fn parse_hosts(text: &str) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for line in text.lines() {
        if out.len() >= peerline_wire::msg::MAX_HOSTS {
            break;
        }
        if let Ok(a) = line.trim().parse::<SocketAddr>() {
            if !out.contains(&a) {
                out.push(a);
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn temp_profile(name: &str) -> Profile {
        let d = std::env::temp_dir().join(format!("peerline-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        Profile::open(&d).unwrap()
    }

    #[test]
    fn the_host_cache_survives_a_restart_and_starts_empty() {
        let p = temp_profile("hosts");
        assert!(p.hosts().is_empty());
        let hosts: Vec<SocketAddr> = vec![
            "203.0.113.2:7000".parse().unwrap(),
            "[2001:db8::3]:7000".parse().unwrap(),
        ];
        p.save_hosts(&hosts).unwrap();
        assert_eq!(p.hosts(), hosts);
        assert_eq!(
            std::fs::read_to_string(p.hosts_path()).unwrap(),
            "203.0.113.2:7000\n[2001:db8::3]:7000\n"
        );
        // An empty list (a lone supernode again) empties the file.
        p.save_hosts(&[]).unwrap();
        assert!(p.hosts().is_empty());
        std::fs::remove_dir_all(p.dir()).unwrap();
    }

    #[test]
    fn a_damaged_host_cache_yields_only_its_valid_addresses() {
        let text = "203.0.113.2:7000\ngarbage\n\n 203.0.113.3:7000 \n203.0.113.2:7000\n";
        assert_eq!(
            parse_hosts(text),
            vec![
                "203.0.113.2:7000".parse::<SocketAddr>().unwrap(),
                "203.0.113.3:7000".parse().unwrap()
            ]
        );
    }

    proptest! {
        #[test]
        fn any_host_cache_text_parses_to_a_bounded_list(text in ".{0,4000}") {
            let hosts = parse_hosts(&text);
            prop_assert!(hosts.len() <= peerline_wire::msg::MAX_HOSTS);
        }

        #[test]
        fn saved_hosts_read_back_the_same(ports in proptest::collection::vec(1u16.., 0..20)) {
            let mut hosts: Vec<SocketAddr> = Vec::new();
            for p in ports {
                let a = SocketAddr::from(([203, 0, 113, (p % 250) as u8], p));
                if !hosts.contains(&a) {
                    hosts.push(a);
                }
            }
            let text: String = hosts.iter().map(|h| format!("{h}\n")).collect();
            let back = parse_hosts(&text);
            hosts.truncate(peerline_wire::msg::MAX_HOSTS);
            prop_assert_eq!(back, hosts);
        }
    }
}
