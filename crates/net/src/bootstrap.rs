//! Bootstrap entries: `HOST:PORT#KEY`, where KEY is base64url (no padding) of the
//! supernode's X25519 Noise key followed by the authority's Ed25519 key (64 bytes).
//!
//! The entry pins the supernode's key (Noise IK authenticates it) and the authority that
//! certifies every device, so a client needs nothing else to start.

use std::net::{SocketAddr, ToSocketAddrs};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;

/// A parsed bootstrap entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bootstrap {
    /// `HOST:PORT` as written.
    pub host: String,
    /// Supernode Noise static key.
    pub node_key: [u8; 32],
    /// Authority verifying key.
    pub authority: [u8; 32],
}

/// Why a bootstrap entry is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BootstrapError {
    /// Not of the form `HOST:PORT#KEY`.
    #[error("bootstrap entry must look like HOST:PORT#KEY (copy it from the supernode's data dir, file `bootstrap`)")]
    Format,
    /// The key part does not decode to 64 bytes.
    #[error(
        "bootstrap key is not valid: copy the whole entry from the supernode's `bootstrap` file"
    )]
    Key,
    /// The host does not resolve.
    #[error("cannot resolve supernode address {0}")]
    Resolve(String),
}

impl Bootstrap {
    /// Parses `HOST:PORT#KEY`.
    pub fn parse(s: &str) -> Result<Self, BootstrapError> {
        let (host, key) = s.trim().rsplit_once('#').ok_or(BootstrapError::Format)?;
        if host.is_empty() || !host.contains(':') {
            return Err(BootstrapError::Format);
        }
        let raw = URL_SAFE_NO_PAD
            .decode(key)
            .map_err(|_| BootstrapError::Key)?;
        if raw.len() != 64 {
            return Err(BootstrapError::Key);
        }
        let mut node_key = [0u8; 32];
        node_key.copy_from_slice(&raw[..32]);
        let mut authority = [0u8; 32];
        authority.copy_from_slice(&raw[32..]);
        Ok(Bootstrap {
            host: host.to_string(),
            node_key,
            authority,
        })
    }

    /// Formats the entry.
    pub fn encode(&self) -> String {
        let mut raw = self.node_key.to_vec();
        raw.extend_from_slice(&self.authority);
        format!("{}#{}", self.host, URL_SAFE_NO_PAD.encode(raw))
    }

    /// Resolves the host to a socket address.
    pub fn addr(&self) -> Result<SocketAddr, BootstrapError> {
        self.host
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .ok_or_else(|| BootstrapError::Resolve(self.host.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn parse_is_total_and_roundtrips(s in ".{0,120}") {
            if let Ok(b) = Bootstrap::parse(&s) {
                prop_assert_eq!(Bootstrap::parse(&b.encode()).unwrap(), b);
            }
        }

        #[test]
        fn any_keys_roundtrip(node in any::<[u8; 32]>(), auth in any::<[u8; 32]>(), port in any::<u16>()) {
            let b = Bootstrap { host: format!("example.org:{port}"), node_key: node, authority: auth };
            prop_assert_eq!(Bootstrap::parse(&b.encode()).unwrap(), b);
        }
    }

    #[test]
    fn roundtrip_and_errors() {
        let b = Bootstrap {
            host: "127.0.0.1:7000".into(),
            node_key: [1; 32],
            authority: [2; 32],
        };
        assert_eq!(Bootstrap::parse(&b.encode()).unwrap(), b);
        assert_eq!(Bootstrap::parse("nohash"), Err(BootstrapError::Format));
        assert_eq!(
            Bootstrap::parse("127.0.0.1:1#abc"),
            Err(BootstrapError::Key)
        );
        assert_eq!(b.addr().unwrap(), "127.0.0.1:7000".parse().unwrap());
    }
}
