//! The conformance suite (`peerline_fleet::conformance`) against both backends: the
//! in-memory one on a virtual clock, and Redis Cluster at `PEERLINE_TEST_REDIS_URL`, each
//! Redis test under its own key prefix so they run in parallel.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use peerline_fleet::conformance::{self, Harness};
use peerline_fleet::{FleetConfig, MemoryFleetDirectory, RedisDirectory, VirtualClock};

fn test_config(prefix: String) -> FleetConfig {
    FleetConfig {
        prefix,
        location_ttl: Duration::from_secs(2),
        member_ttl: Duration::from_secs(1),
        member_cache: Duration::from_millis(200),
    }
}

struct Memory {
    a: MemoryFleetDirectory,
    b: MemoryFleetDirectory,
    clock: VirtualClock,
    config: FleetConfig,
}

impl Memory {
    fn new() -> Self {
        let clock = VirtualClock::new();
        let config = test_config(String::new());
        let a = MemoryFleetDirectory::new(Arc::new(clock.clone()), config.clone());
        Self {
            b: a.clone(),
            a,
            clock,
            config,
        }
    }
}

#[async_trait]
impl Harness for Memory {
    type Dir = MemoryFleetDirectory;
    fn a(&self) -> &Self::Dir {
        &self.a
    }
    fn b(&self) -> &Self::Dir {
        &self.b
    }
    fn config(&self) -> &FleetConfig {
        &self.config
    }
    async fn wait(&self, d: Duration) {
        self.clock.advance(d);
    }
}

struct Redis {
    a: RedisDirectory,
    b: RedisDirectory,
    config: FleetConfig,
}

static SEQ: AtomicU32 = AtomicU32::new(0);

impl Redis {
    async fn new(test: &str) -> Self {
        let url = std::env::var("PEERLINE_TEST_REDIS_URL").unwrap_or_else(|_| {
            panic!(
                "PEERLINE_TEST_REDIS_URL is not set: run eval \"$(bash scripts/fleet-services.sh start)\" first"
            )
        });
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or_default();
        let prefix = format!(
            "peerline-test:{test}:{}:{nanos}:{}",
            std::process::id(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let config = test_config(prefix);
        let connect = |c: FleetConfig| {
            let url = url.clone();
            async move {
                RedisDirectory::connect_with(&url, c)
                    .await
                    .unwrap_or_else(|e| panic!("cannot reach the Redis Cluster at {url}: {e}"))
            }
        };
        Self {
            a: connect(config.clone()).await,
            b: connect(config.clone()).await,
            config,
        }
    }
}

#[async_trait]
impl Harness for Redis {
    type Dir = RedisDirectory;
    fn a(&self) -> &Self::Dir {
        &self.a
    }
    fn b(&self) -> &Self::Dir {
        &self.b
    }
    fn config(&self) -> &FleetConfig {
        &self.config
    }
    async fn wait(&self, d: Duration) {
        tokio::time::sleep(d).await;
    }
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod memory {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    conformance::$name(&Memory::new()).await;
                }
            )*
        }
        mod redis {
            use super::*;
            $(
                #[tokio::test]
                async fn $name() {
                    conformance::$name(&Redis::new(stringify!($name)).await).await;
                }
            )*
        }
    };
}

suite!(
    claim_lookup_release,
    newer_claim_wins,
    batch_lookup,
    refresh_keeps_entries_alive,
    member_expiry_hides_dead_node,
    epoch_change_hides_old_users,
    draining_flag,
    withdraw_removes_member,
    a_new_member_is_routable_at_once,
);

#[tokio::test]
async fn redis_connect_rejects_a_bad_url_in_one_line() {
    let e = RedisDirectory::connect("redis://host:notaport")
        .await
        .expect_err("bad port");
    let msg = e.to_string();
    assert!(msg.starts_with("bad directory url"), "{msg}");
    assert!(!msg.contains('\n'));
    let e = RedisDirectory::connect("memory")
        .await
        .expect_err("memory is not redis");
    assert!(e.to_string().contains("not a Redis Cluster"), "{e}");
}

#[tokio::test]
async fn redis_connect_to_nothing_fails_with_an_error() {
    // Port 1 on loopback: nothing listens; the client reports it instead of hanging.
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        RedisDirectory::connect("redis://127.0.0.1:1"),
    )
    .await
    .expect("connect gives up within its timeouts");
    assert!(r.is_err());
}

#[tokio::test]
async fn redis_batches_go_out_as_pipelines_without_retries() {
    let h = Redis::new("pipelines").await;
    conformance::batch_lookup(&h).await;
    conformance::refresh_keeps_entries_alive(&h).await;
    // Larger than one pipeline (1,000 commands): split, answered in order.
    use peerline_fleet::{FleetDirectory, FleetLocation, Username};
    h.a.announce(&conformance::member(1, 10))
        .await
        .expect("announce");
    let loc = FleetLocation { node: 1, epoch: 10 };
    let users: Vec<Username> = (0..2500)
        .map(|i| Username::parse(&format!("big{i}")).expect("valid name"))
        .collect();
    let claimed: Vec<(Username, FleetLocation)> =
        users.iter().step_by(2).map(|u| (u.clone(), loc)).collect();
    assert!(h
        .a
        .refresh(&claimed)
        .await
        .expect("refresh")
        .iter()
        .all(|ours| *ours));
    let found = h.b.lookup_many(&users).await.expect("lookup_many");
    let want: Vec<Option<FleetLocation>> = (0..2500).map(|i| (i % 2 == 0).then_some(loc)).collect();
    assert_eq!(found, want);
    assert_eq!(
        h.a.batch_retries(),
        0,
        "batched commands fell back to single requests"
    );
    assert_eq!(
        h.b.batch_retries(),
        0,
        "batched commands fell back to single requests"
    );
}

#[tokio::test]
async fn redis_concurrent_lookups_share_one_member_list_read() {
    use peerline_fleet::{FleetDirectory, FleetLocation, Username};
    let h = Arc::new(Redis::new("single_flight").await);
    h.a.announce(&conformance::member(1, 10))
        .await
        .expect("announce");
    let u = Username::parse("flighty").expect("valid name");
    let loc = FleetLocation { node: 1, epoch: 10 };
    h.a.claim(&u, loc).await.expect("claim");
    let before = h.b.member_reads();
    let lookups = (0..64).map(|_| {
        let (h, u) = (Arc::clone(&h), u.clone());
        tokio::spawn(async move { h.b.lookup(&u).await })
    });
    for l in lookups {
        assert_eq!(l.await.expect("task").expect("lookup"), Some(loc));
    }
    assert_eq!(
        h.b.member_reads() - before,
        1,
        "each stale lookup re-read the member list"
    );
}
