//! The fleet directory: which supernode of a fleet holds each online user, and which
//! supernodes are alive.
//!
//! Each supernode keeps its own users in the core's local `Directory`; this crate is the
//! separate, shared map that the tokio glue updates on login and logout and queries to
//! route signalling to the supernode that holds a user. Two backends implement
//! [`FleetDirectory`]:
//!
//! - [`MemoryFleetDirectory`]: in-process, shared behind an `Arc` by several in-process
//!   supernodes, its clock injected so expiry runs on virtual time in tests;
//! - `RedisDirectory` (feature `redis`, on by default): Redis Cluster, for a real fleet.
//!
//! [`open`] picks one from a `[directory] url` (`"memory"` or `"redis://h1:p1,h2:p2"`).
//!
//! Driving it: a supernode [`announce`](FleetDirectory::announce)s its [`Member`] record
//! about once a second, [`claim`](FleetDirectory::claim)s a user on login (telling the
//! previous home, if any, to drop its stale session), [`refresh`](FleetDirectory::refresh)es
//! its users in batches well within [`FleetConfig::location_ttl`],
//! [`release`](FleetDirectory::release)s a user on logout and
//! [`withdraw`](FleetDirectory::withdraw)s itself on graceful shutdown. A location resolves
//! only while its supernode, in the same epoch, is a live member: a dead or restarted
//! supernode's users stop resolving within [`FleetConfig::member_ttl`] plus
//! [`FleetConfig::member_cache`], long before their own entries expire.
#![deny(missing_docs)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
pub use peerline_wire::Username;

mod clock;
pub mod codec;
pub mod conformance;
mod memory;
#[cfg(feature = "redis")]
mod redis_dir;
mod url;

pub use clock::{Clock, SystemClock, VirtualClock};
pub use codec::DecodeError;
pub use memory::MemoryFleetDirectory;
#[cfg(feature = "redis")]
pub use redis_dir::RedisDirectory;
pub use url::{DirectoryUrl, UrlError};

/// Where a user is homed: a supernode and that supernode's current epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FleetLocation {
    /// Supernode id within the fleet.
    pub node: u32,
    /// The epoch of that supernode's process (a restarted supernode has a new one).
    pub epoch: u64,
}

/// A supernode's announcement of itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Supernode id within the fleet.
    pub id: u32,
    /// Epoch of this process (e.g. its start time in milliseconds): new on every restart.
    pub epoch: u64,
    /// The UDP address clients use.
    pub client_addr: SocketAddr,
    /// The node-to-node TCP address.
    pub fleet_addr: SocketAddr,
    /// Users online on it now.
    pub online: u32,
    /// Users it accepts at most.
    pub capacity: u32,
    /// Whether it is draining (redirecting its users elsewhere before shutdown).
    pub draining: bool,
}

/// Timing and naming shared by both backends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FleetConfig {
    /// Prefix of every Redis key (lets several fleets or tests share one cluster). Must not
    /// contain `{` or `}`, so that it never forms a hash tag.
    pub prefix: String,
    /// Lifetime of a location entry; the owner refreshes well within it.
    pub location_ttl: Duration,
    /// Lifetime of a member announcement; the owner re-announces well within it.
    pub member_ttl: Duration,
    /// How long a directory handle reuses the member list when filtering lookups.
    pub member_cache: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            prefix: "peerline".to_string(),
            location_ttl: Duration::from_secs(600),
            member_ttl: Duration::from_secs(5),
            member_cache: Duration::from_secs(1),
        }
    }
}

/// Why a directory operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FleetError {
    /// The directory URL could not be used.
    #[error(transparent)]
    Url(#[from] UrlError),
    /// The key prefix contains a character that would change key routing.
    #[error("directory key prefix {0:?} must not contain '{{' or '}}'")]
    BadPrefix(String),
    /// Redis failed or could not be reached.
    #[cfg(feature = "redis")]
    #[error("Redis directory: {0}")]
    Redis(#[from] redis::RedisError),
    /// Redis answered with something this crate does not understand.
    #[error("Redis directory: unexpected reply to {op}: {detail}")]
    Protocol {
        /// The operation.
        op: &'static str,
        /// What was wrong with the reply.
        detail: String,
    },
}

/// The shared user -> supernode map and the supernode membership list.
///
/// Every method is one round trip (or one pipelined batch per Redis master) and safe to
/// call concurrently from many tasks. Errors are transient backend failures: the handle
/// stays usable and the next call tries again.
#[async_trait]
pub trait FleetDirectory: Send + Sync {
    /// Homes `user` at `loc` (login), returning the previous location, live or not, so the
    /// new home can tell the old one to drop a stale session.
    async fn claim(
        &self,
        user: &Username,
        loc: FleetLocation,
    ) -> Result<Option<FleetLocation>, FleetError>;

    /// Removes `user` only if still homed at `loc` (logout); a newer claim elsewhere stays.
    /// Returns whether it removed the entry.
    async fn release(&self, user: &Username, loc: FleetLocation) -> Result<bool, FleetError>;

    /// Where `user` is homed, if its supernode is a live member in the same epoch.
    async fn lookup(&self, user: &Username) -> Result<Option<FleetLocation>, FleetError>;

    /// [`lookup`](Self::lookup) for many users in one batch (presence fan-out); the answer
    /// is in the order of `users`.
    async fn lookup_many(
        &self,
        users: &[Username],
    ) -> Result<Vec<Option<FleetLocation>>, FleetError>;

    /// Renews the TTL of each `(user, loc)` still homed at `loc` (re-creating an entry that
    /// vanished), in one batch. Returns, in order, whether each entry is still ours: `false`
    /// means a newer claim elsewhere took the user, and the local session is stale.
    async fn refresh(&self, entries: &[(Username, FleetLocation)])
        -> Result<Vec<bool>, FleetError>;

    /// Publishes (or renews) a supernode's member record for [`FleetConfig::member_ttl`].
    async fn announce(&self, member: &Member) -> Result<(), FleetError>;

    /// Removes supernode `id` from the membership at once (graceful shutdown): its users
    /// stop resolving immediately for this handle and within [`FleetConfig::member_cache`]
    /// for others.
    async fn withdraw(&self, id: u32) -> Result<(), FleetError>;

    /// The live members, ordered by id.
    async fn members(&self) -> Result<Vec<Member>, FleetError>;
}

/// Opens the directory a `[directory] url` names: `"memory"` gives a fresh in-process
/// directory on the system clock (for one supernode), `redis://...` connects to the
/// cluster. A bad URL fails with one line saying what to write.
pub async fn open(url: &str, config: FleetConfig) -> Result<Arc<dyn FleetDirectory>, FleetError> {
    if config.prefix.contains(['{', '}']) {
        return Err(FleetError::BadPrefix(config.prefix));
    }
    match DirectoryUrl::parse(url)? {
        DirectoryUrl::Memory => Ok(Arc::new(MemoryFleetDirectory::new(
            Arc::new(SystemClock::new()),
            config,
        ))),
        #[cfg(feature = "redis")]
        DirectoryUrl::Redis { .. } => {
            Ok(Arc::new(RedisDirectory::connect_with(url, config).await?))
        }
        #[cfg(not(feature = "redis"))]
        DirectoryUrl::Redis { .. } => Err(UrlError {
            shown: "redis://...".to_string(),
            reason: "this build has no Redis support (feature `redis`)".to_string(),
        }
        .into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_memory_gives_a_working_directory() {
        let dir = open("memory", FleetConfig::default())
            .await
            .expect("memory opens");
        let u = Username::parse("opener").expect("valid name");
        let loc = FleetLocation { node: 1, epoch: 1 };
        dir.announce(&conformance::member(1, 1))
            .await
            .expect("announce");
        dir.claim(&u, loc).await.expect("claim");
        assert_eq!(dir.lookup(&u).await.expect("lookup"), Some(loc));
    }

    #[tokio::test]
    async fn open_rejects_bad_urls_and_prefixes_in_one_line() {
        let e = open("redis:/oops", FleetConfig::default())
            .await
            .err()
            .expect("bad url");
        assert!(e.to_string().starts_with("bad directory url"), "{e}");
        let cfg = FleetConfig {
            prefix: "{tag}".to_string(),
            ..FleetConfig::default()
        };
        let e = open("memory", cfg).await.err().expect("bad prefix");
        assert!(matches!(e, FleetError::BadPrefix(_)), "{e}");
        assert!(!e.to_string().contains('\n'));
    }
}
