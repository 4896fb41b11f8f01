//! The `[directory] url` setting: `memory` or `redis://[user:password@]h1:p1,h2:p2,...`.

use std::fmt;

/// The most seed nodes a Redis URL may list (the cluster client discovers the rest).
pub const MAX_SEED_NODES: usize = 64;
const DEFAULT_PORT: u16 = 6379;

/// A parsed directory URL.
#[derive(Clone, PartialEq, Eq)]
pub enum DirectoryUrl {
    /// The in-process directory (a single supernode, or tests).
    Memory,
    /// A Redis Cluster, reached through these seed nodes.
    Redis {
        /// `(host, port)` of each seed node, in the order given.
        nodes: Vec<(String, u16)>,
        /// ACL user name, if any.
        username: Option<String>,
        /// Password, if any.
        password: Option<String>,
    },
}

// The password stays out of logs and error messages.
impl fmt::Debug for DirectoryUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Memory => f.write_str("Memory"),
            Self::Redis {
                nodes,
                username,
                password,
            } => f
                .debug_struct("Redis")
                .field("nodes", nodes)
                .field("username", username)
                .field("password", &password.as_ref().map(|_| "***"))
                .finish(),
        }
    }
}

/// Why a directory URL is not usable; the message is one line saying what to write instead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("bad directory url {shown:?}: {reason} (expected \"memory\" or \"redis://HOST:PORT,HOST:PORT,...\")")]
pub struct UrlError {
    /// The URL, with any password masked.
    pub shown: String,
    /// What is wrong with it.
    pub reason: String,
}

impl DirectoryUrl {
    /// Parses a directory URL.
    pub fn parse(s: &str) -> Result<Self, UrlError> {
        let err = |reason: &str| UrlError {
            shown: mask(s),
            reason: reason.to_string(),
        };
        let s_trim = s.trim();
        if s_trim == "memory" {
            return Ok(Self::Memory);
        }
        let rest = s_trim
            .strip_prefix("redis://")
            .ok_or_else(|| err("unknown scheme"))?;
        let (auth, hosts) = match rest.rsplit_once('@') {
            Some((a, h)) => (Some(a), h),
            None => (None, rest),
        };
        let (username, password) = match auth {
            None => (None, None),
            Some(a) => match a.split_once(':') {
                Some((u, p)) => ((!u.is_empty()).then(|| u.to_string()), Some(p.to_string())),
                None => (Some(a.to_string()), None),
            },
        };
        let hosts = hosts.trim_end_matches('/');
        if hosts.is_empty() {
            return Err(err("no host"));
        }
        let mut nodes = Vec::new();
        for part in hosts.split(',') {
            if nodes.len() == MAX_SEED_NODES {
                return Err(err("more than 64 seed nodes"));
            }
            nodes.push(host_port(part).map_err(|r| err(&r))?);
        }
        Ok(Self::Redis {
            nodes,
            username,
            password,
        })
    }
}

fn host_port(part: &str) -> Result<(String, u16), String> {
    if part.is_empty() {
        return Err("empty host in the list".to_string());
    }
    let (host, port) = if let Some(v6) = part.strip_prefix('[') {
        let (ip, after) = v6
            .split_once(']')
            .ok_or_else(|| format!("unclosed '[' in {part:?}"))?;
        if ip.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("{ip:?} is not an IPv6 address"));
        }
        match after {
            "" => (ip, None),
            p => (
                ip,
                Some(
                    p.strip_prefix(':')
                        .ok_or_else(|| format!("junk after ']' in {part:?}"))?,
                ),
            ),
        }
    } else {
        match part.split_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (part, None),
        }
    };
    let host_ok = !host.is_empty()
        && (host.contains(':')
            || host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_'));
    if !host_ok {
        return Err(format!("{host:?} is not a host name or address"));
    }
    let port = match port {
        None => DEFAULT_PORT,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => n,
            _ => return Err(format!("{p:?} is not a port number (1-65535)")),
        },
    };
    Ok((host.to_string(), port))
}

/// The URL with the password (between ':' and '@' of the user info) replaced by "***".
fn mask(s: &str) -> String {
    match (s.strip_prefix("redis://"), s.rfind('@')) {
        (Some(rest), Some(_)) => match rest.rsplit_once('@') {
            Some((auth, hosts)) => match auth.split_once(':') {
                Some((u, _)) => format!("redis://{u}:***@{hosts}"),
                None => s.to_string(),
            },
            None => s.to_string(),
        },
        _ => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn nodes(url: &DirectoryUrl) -> Vec<(String, u16)> {
        match url {
            DirectoryUrl::Redis { nodes, .. } => nodes.clone(),
            DirectoryUrl::Memory => Vec::new(),
        }
    }

    #[test]
    fn parses_memory_and_a_host_list() {
        assert_eq!(DirectoryUrl::parse("memory"), Ok(DirectoryUrl::Memory));
        let u = DirectoryUrl::parse("redis://127.0.0.1:57001,127.0.0.1:57002,redis-3:57003")
            .expect("valid");
        assert_eq!(
            nodes(&u),
            vec![
                ("127.0.0.1".to_string(), 57001),
                ("127.0.0.1".to_string(), 57002),
                ("redis-3".to_string(), 57003)
            ]
        );
    }

    #[test]
    fn default_port_ipv6_and_credentials() {
        let u = DirectoryUrl::parse("redis://app:s3cret@[::1]:7001,10.0.0.2").expect("valid");
        assert_eq!(
            u,
            DirectoryUrl::Redis {
                nodes: vec![("::1".to_string(), 7001), ("10.0.0.2".to_string(), 6379)],
                username: Some("app".to_string()),
                password: Some("s3cret".to_string()),
            }
        );
        assert!(!format!("{u:?}").contains("s3cret"));
    }

    #[test]
    fn bad_urls_give_one_clear_line_without_the_password() {
        for bad in [
            "",
            "memroy",
            "postgres://x",
            "redis://",
            "redis://a:1,,b:2",
            "redis://a:0",
            "redis://a:65536",
            "redis://a:+1",
            "redis://a b:1",
            "redis://[::1:7000",
            "redis://[zz]:1",
        ] {
            let e = DirectoryUrl::parse(bad).expect_err(bad);
            let msg = e.to_string();
            assert!(!msg.contains('\n'), "{msg}");
            assert!(msg.starts_with("bad directory url"), "{msg}");
            assert!(msg.contains("redis://HOST:PORT"), "{msg}");
        }
        let e = DirectoryUrl::parse("redis://u:hunter2@a:0").expect_err("port 0");
        assert!(!e.to_string().contains("hunter2"), "{e}");
        let many = format!("redis://{}", vec!["h:1"; 65].join(","));
        assert!(DirectoryUrl::parse(&many).is_err());
    }

    proptest! {
        #[test]
        fn any_string_parses_or_errors_without_panic(s in ".{0,80}") {
            if let Err(e) = DirectoryUrl::parse(&s) {
                prop_assert!(!e.to_string().contains('\n') || s.contains('\n'));
            }
        }

        #[test]
        fn generated_host_lists_round_trip(
            hosts in proptest::collection::vec(("[a-z][a-z0-9.-]{0,20}", 1u16..), 1..10)
        ) {
            let s = format!(
                "redis://{}",
                hosts.iter().map(|(h, p)| format!("{h}:{p}")).collect::<Vec<_>>().join(",")
            );
            let u = DirectoryUrl::parse(&s).expect("generated URL is valid");
            prop_assert_eq!(nodes(&u), hosts);
        }
    }
}
