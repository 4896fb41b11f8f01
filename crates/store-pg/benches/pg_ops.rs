//! Per-operation cost of the PostgreSQL store on the server `PEERLINE_TEST_PG_URL` names
//! (a fresh database, dropped afterwards): each operation is timed alone, one call after
//! the other on one connection, and the median, 90th and 99th percentiles printed.
//!
//! `cargo bench -p peerline-store-pg --bench pg_ops [-- --json] [-- --n N]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use peerline_core::store::{Account, Device, NewMessage, QueueOutcome, Store};
use peerline_store_pg::testing::TestDb;
use peerline_store_pg::PgStore;
use peerline_wire::Username;

const USERS: usize = 10_000;
/// 2000 messages over 40 mailboxes: 50 waiting in each, the page `pending_messages` reads.
const RECIPIENTS: u64 = 40;

fn user(i: u64) -> Username {
    Username::parse(&format!("user{i:05}")).unwrap()
}

fn account_row(i: u64) -> (Account, Device) {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&i.to_le_bytes());
    (
        Account {
            username: user(i),
            password_hash: "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaA"
                .into(),
            created_at: 1_700_000_000,
        },
        Device {
            username: user(i),
            device_id: [1; 16],
            noise_key: key,
            sign_key: [2; 32],
            revoked: false,
        },
    )
}

struct Stats {
    name: &'static str,
    median: Duration,
    p90: Duration,
    p99: Duration,
    n: usize,
}

fn stats(name: &'static str, mut t: Vec<Duration>) -> Stats {
    t.sort_unstable();
    let at = |q: f64| t[((t.len() as f64 - 1.0) * q).round() as usize];
    Stats {
        name,
        median: at(0.5),
        p90: at(0.9),
        p99: at(0.99),
        n: t.len(),
    }
}

fn time<T>(f: impl FnOnce() -> T) -> (T, Duration) {
    let t0 = Instant::now();
    let v = f();
    (v, t0.elapsed())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    let n: u64 = args
        .iter()
        .position(|a| a == "--n")
        .and_then(|i| args.get(i + 1))
        .map_or(2000, |v| v.parse().expect("--n N"));

    let db = TestDb::create();
    let mut s = PgStore::open(db.url()).unwrap();
    let rows: Vec<(Account, Device)> = (0..USERS as u64).map(account_row).collect();
    s.bulk_import(&rows, &[]).unwrap();
    db.client().batch_execute("VACUUM ANALYZE").unwrap();

    // queue_message: n messages spread over RECIPIENTS mailboxes (each commit is flushed).
    let mut queue = Vec::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let m = NewMessage {
            from: user(RECIPIENTS + i % 1000),
            to: user(i % RECIPIENTS),
            msg_id: i,
            sent_at: 1_700_000_000_000 + i,
            text: "a typical short offline message, about sixty bytes long.".into(),
        };
        let (r, d) = time(|| s.queue_message(&m, 1000).unwrap());
        let QueueOutcome::Queued(id) = r else {
            panic!("not queued: {r:?}")
        };
        ids.push((m.to, id));
        queue.push(d);
    }
    // pending_messages: a recipient's oldest 50 (each mailbox holds n / RECIPIENTS).
    let page = (n / RECIPIENTS).min(50) as usize;
    let pending: Vec<Duration> = (0..n)
        .map(|i| {
            let (got, d) = time(|| s.pending_messages(&user(i % RECIPIENTS), 50).unwrap());
            assert_eq!(got.len(), page);
            d
        })
        .collect();
    // account lookup: random-ish existing accounts.
    let account: Vec<Duration> = (0..n)
        .map(|i| {
            let u = user((i * 7919) % USERS as u64);
            let (a, d) = time(|| s.account(&u).unwrap());
            assert!(a.is_some());
            d
        })
        .collect();
    // delete_message: every queued message, as after the recipient's acknowledgement.
    let delete: Vec<Duration> = ids
        .iter()
        .map(|(to, id)| {
            let (ok, d) = time(|| s.delete_message(to, *id).unwrap());
            assert!(ok);
            d
        })
        .collect();

    // Several writers (supernodes), one connection each, queueing to 1,000 mailboxes at
    // once: commits per second, where concurrent commits can share a WAL flush.
    let mut throughput = Vec::new();
    for writers in [1u64, 4, 16] {
        let per = (n / 4).max(1);
        let url = db.url().to_string();
        let barrier = std::sync::Arc::new(std::sync::Barrier::new(writers as usize + 1));
        let threads: Vec<_> = (0..writers)
            .map(|w| {
                let (url, barrier) = (url.clone(), std::sync::Arc::clone(&barrier));
                std::thread::spawn(move || {
                    let mut s = PgStore::open(&url).unwrap();
                    barrier.wait();
                    for i in 0..per {
                        let m = NewMessage {
                            from: user(1000 + w),
                            to: user((i * 31 + w * 7) % 1000),
                            msg_id: 1_000_000 * writers + i,
                            sent_at: i,
                            text: "a typical short offline message, about sixty bytes long.".into(),
                        };
                        let r = s.queue_message(&m, 100_000).unwrap();
                        assert!(matches!(r, QueueOutcome::Queued(_)), "{r:?}");
                    }
                })
            })
            .collect();
        barrier.wait();
        let t0 = Instant::now();
        for t in threads {
            t.join().unwrap();
        }
        let secs = t0.elapsed().as_secs_f64();
        throughput.push((writers, writers * per, (writers * per) as f64 / secs));
    }

    let all = [
        stats("queue_message", queue),
        stats("pending_messages(50)", pending),
        stats("delete_message", delete),
        stats("account", account),
    ];
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    if json {
        let items: Vec<String> = all
            .iter()
            .map(|x| {
                format!(
                    "{{\"op\":\"{}\",\"n\":{},\"median_us\":{:.0},\"p90_us\":{:.0},\"p99_us\":{:.0}}}",
                    x.name,
                    x.n,
                    us(x.median),
                    us(x.p90),
                    us(x.p99)
                )
            })
            .collect();
        let tp: Vec<String> = throughput
            .iter()
            .map(|(w, m, r)| format!("{{\"writers\":{w},\"messages\":{m},\"per_second\":{r:.0}}}"))
            .collect();
        println!(
            "{{\"ops\":[{}],\"queue_throughput\":[{}]}}",
            items.join(","),
            tp.join(",")
        );
    } else {
        println!("{USERS} accounts; {n} messages over {RECIPIENTS} mailboxes");
        println!(
            "{:<22} {:>7} {:>10} {:>10} {:>10}",
            "operation", "n", "median", "p90", "p99"
        );
        for x in &all {
            println!(
                "{:<22} {:>7} {:>8.0}us {:>8.0}us {:>8.0}us",
                x.name,
                x.n,
                us(x.median),
                us(x.p90),
                us(x.p99)
            );
        }
        println!("queue_message throughput, one connection per writer:");
        for (w, m, r) in &throughput {
            println!("  {w:>2} writers: {m:>5} messages, {r:>6.0} per second");
        }
    }
}
