//! A fleet of three real supernodes on PostgreSQL and a 3-node Redis Cluster (started by
//! `scripts/fleet-services.sh`, which the test command runs): users homed on different
//! supernodes find each other, message directly and mail each other; one supernode is
//! killed with SIGKILL and its users are online again on the others within 15 s while
//! their direct session keeps carrying messages; another drains on SIGTERM.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{free_port, Supernode, User};

use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn env_url(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!(
            "{name} is not set: start the fleet engines with \
             `eval \"$(bash scripts/fleet-services.sh start)\"` (the test command does)"
        )
    })
}

/// A fresh database on the test PostgreSQL; returns its URL.
fn fresh_database(base: &str, name: &str) -> String {
    let out = Command::new("psql")
        .arg(base)
        .args(["-v", "ON_ERROR_STOP=1", "-c"])
        .arg(format!("CREATE DATABASE {name}"))
        .output()
        .expect("psql runs");
    assert!(
        out.status.success(),
        "cannot create database {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (prefix, _) = base.rsplit_once('/').unwrap();
    format!("{prefix}/{name}")
}

fn drop_database(base: &str, name: &str) {
    let _ = Command::new("psql")
        .arg(base)
        .arg("-c")
        .arg(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .output();
}

/// Gives the fleet its own key prefix in the shared Redis Cluster.
fn set_prefix(data: &Path, prefix: &str) {
    let path = data.join("peerlined.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.contains("[directory]\n"), "{text}");
    let text = text.replacen(
        "[directory]\n",
        &format!("[directory]\nprefix = \"{prefix}\"\n"),
        1,
    );
    std::fs::write(&path, text).unwrap();
}

struct Fleet<'a> {
    root: &'a Path,
    redis: &'a str,
    store_url: &'a str,
    prefix: &'a str,
}

fn member(f: &Fleet, name: &str, id: u32, join: Option<&Path>) -> Supernode {
    let fleet_listen = format!("127.0.0.1:{}", free_port());
    let id = id.to_string();
    let mut args = vec![
        "--node-id",
        &id,
        "--directory",
        f.redis,
        "--fleet-listen",
        &fleet_listen,
        "--store-url",
        f.store_url,
    ];
    let join_s;
    if let Some(j) = join {
        join_s = j.display().to_string();
        args.extend(["--join", &join_s]);
    }
    let sn = Supernode::init_only(f.root, name, &args);
    set_prefix(&sn.data, f.prefix);
    sn
}

fn status(u: &User) -> serde_json::Value {
    u.json(&["status", "--json"])
}

/// Waits until `u` is online at a supernode other than `not`; returns how long it took.
fn wait_online_elsewhere(u: &User, not: &str, limit: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let s = status(u);
        if s["online"] == true && s["supernode"].as_str().is_some_and(|h| !h.contains(not)) {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < limit,
            "{} not online elsewhere after {limit:?}: {s}",
            u.name
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn wait_presence(u: &User, of: &str, want: &str) {
    let start = Instant::now();
    loop {
        let list = u.json(&["contacts", "list", "--json"]);
        let p = list
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["user"] == of)
            .map(|c| c["presence"].clone());
        if p.as_ref().is_some_and(|p| p == want) {
            return;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "{} never saw {of} {want}: {list}",
            u.name
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn befriend(a: &User, b: &User) {
    a.ok(&["contacts", "add", b.name]);
    let start = Instant::now();
    while !b
        .json(&["contacts", "list", "--json"])
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["user"] == a.name && c["state"] == "incoming")
    {
        assert!(start.elapsed() < Duration::from_secs(10), "request lost");
        std::thread::sleep(Duration::from_millis(50));
    }
    b.ok(&["contacts", "accept", a.name]);
    wait_presence(a, b.name, "online");
    wait_presence(b, a.name, "online");
}

#[test]
fn a_fleet_survives_losing_a_supernode() {
    let pg = env_url("PEERLINE_TEST_PG_URL");
    let redis = env_url("PEERLINE_TEST_REDIS_URL");
    let unique = format!(
        "fleet_{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
    );
    let store_url = fresh_database(&pg, &unique);
    struct DropDb(String, String);
    impl Drop for DropDb {
        fn drop(&mut self) {
            drop_database(&self.0, &self.1);
        }
    }
    let _db = DropDb(pg.clone(), unique.clone());

    let root = tempfile::tempdir().unwrap();
    // On failure, show what the supernodes logged.
    struct Logs(std::path::PathBuf, Vec<u16>);
    impl Drop for Logs {
        fn drop(&mut self) {
            if std::thread::panicking() {
                for admin in &self.1 {
                    use std::io::{Read, Write};
                    if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", *admin)) {
                        let _ = s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n");
                        let mut body = String::new();
                        let _ = s.read_to_string(&mut body);
                        eprintln!("---- metrics of :{admin} ----");
                        for l in body.lines().filter(|l| l.starts_with("peerline_fleet")) {
                            eprintln!("{l}");
                        }
                    }
                }
                for n in ["n1", "n2", "n3", "alice", "bob", "carol"] {
                    let dir = self.0.join(n);
                    let log = std::fs::read_to_string(dir.join("test.log"))
                        .or_else(|_| std::fs::read_to_string(dir.join("agent.log")))
                        .unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(60).collect();
                    eprintln!("---- {n} log (last lines) ----");
                    for l in tail.iter().rev() {
                        eprintln!("{l}");
                    }
                }
            }
        }
    }
    let f = Fleet {
        root: root.path(),
        redis: &redis,
        store_url: &store_url,
        prefix: &unique,
    };
    let mut n1 = member(&f, "n1", 1, None);
    let n1_data = n1.data.clone();
    let mut n2 = member(&f, "n2", 2, Some(&n1_data));
    let mut n3 = member(&f, "n3", 3, Some(&n1_data));
    let _logs = Logs(
        root.path().to_path_buf(),
        vec![n1.admin, n2.admin, n3.admin],
    );
    n1.start();
    n2.start();
    n3.start();
    let n1_host = format!("127.0.0.1:{}", n1.port);
    let n2_host = format!("127.0.0.1:{}", n2.port);

    let user = |name: &'static str| User {
        name,
        profile: root.path().join(name),
    };
    let (alice, bob, carol, dave) = (user("alice"), user("bob"), user("carol"), user("dave"));
    for (u, n) in [(&alice, &n1), (&bob, &n1), (&carol, &n2), (&dave, &n3)] {
        u.ok(&["register", u.name, "--server", &n.bootstrap()]);
        let s = u.json(&["up", "--json"]);
        assert_eq!(s["online"], true, "{s}");
    }
    // Everyone shares the store (one account namespace) and finds everyone.
    let found = carol.json(&["search", "da", "--json"]);
    assert_eq!(found, serde_json::json!(["dave"]));

    // Users homed on different supernodes befriend, see each other and talk directly.
    befriend(&alice, &carol);
    let sent = alice.json(&["msg", "send", "carol", "hello from n1", "--json"]);
    assert_eq!(sent["via"], "direct", "{sent}");
    carol.wait_message("alice", "hello from n1", "direct");
    befriend(&dave, &carol);
    let sent = dave.json(&["msg", "send", "carol", "hello from n3", "--json"]);
    assert_eq!(sent["via"], "direct", "{sent}");
    carol.wait_message("dave", "hello from n3", "direct");
    befriend(&alice, &bob);
    befriend(&bob, &dave);

    // An offline message across supernodes, acknowledged before the crash.
    dave.ok(&["down"]);
    wait_presence(&bob, "dave", "offline");
    let sent = bob.json(&["msg", "send", "dave", "queued before the crash", "--json"]);
    assert_eq!(sent["via"], "offline", "{sent}");

    // Alice and Bob (both on n1) keep a direct session busy through the crash.
    let sent = alice.json(&["msg", "send", "bob", "warm-up", "--json"]);
    assert_eq!(sent["via"], "direct", "{sent}");
    let stop = Arc::new(AtomicBool::new(false));
    let chatter = {
        let stop = stop.clone();
        // Not a `User`: dropping one stops its agent.
        let profile = alice.profile.clone();
        std::thread::spawn(move || {
            let mut sent = Vec::new();
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                let text = format!("during failover {n}");
                let out = Command::new(common::peerline_bin())
                    .arg("--profile")
                    .arg(&profile)
                    .args(["msg", "send", "bob", &text, "--json"])
                    .stdin(std::process::Stdio::null())
                    .output()
                    .unwrap();
                let via = serde_json::from_slice::<serde_json::Value>(&out.stdout)
                    .map(|v| v["via"].as_str().unwrap_or("?").to_string())
                    .unwrap_or_else(|_| {
                        format!("failed: {}", String::from_utf8_lossy(&out.stderr).trim())
                    });
                sent.push((text, via));
                n += 1;
                std::thread::sleep(Duration::from_millis(300));
            }
            sent
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    n1.kill9();
    let killed = Instant::now();
    let a_took = wait_online_elsewhere(&alice, &n1_host, Duration::from_secs(15));
    let b_took = wait_online_elsewhere(&bob, &n1_host, Duration::from_secs(15));
    let back = killed.elapsed();
    eprintln!(
        "after SIGKILL of n1: alice online elsewhere after {a_took:?}, bob by {back:?} ({b_took:?} more)"
    );
    assert!(back < Duration::from_secs(15), "back after {back:?}");
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let sent = chatter.join().unwrap();
    assert!(
        sent.len() >= 5,
        "too few messages during the failover: {sent:?}"
    );
    for (text, via) in &sent {
        assert_eq!(via, "direct", "{text} went {via}: {sent:?}");
    }
    for (text, _) in &sent {
        bob.wait_message("alice", text, "direct");
    }

    // Presence converges: carol (n2) sees alice online again after her move.
    wait_presence(&carol, "alice", "online");
    // Users now homed on different supernodes still connect.
    let sent = carol.json(&["msg", "send", "alice", "still there?", "--json"]);
    assert_eq!(sent["via"], "direct", "{sent}");
    alice.wait_message("carol", "still there?", "direct");

    // The acknowledged offline message survived the crash.
    dave.ok(&["up"]);
    dave.wait_message("bob", "queued before the crash", "offline");

    // A graceful shutdown drains n2: carol moves on by herself and n2 exits.
    let pid = n2.child.as_ref().unwrap().id();
    let term = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let moved = wait_online_elsewhere(&carol, &n2_host, Duration::from_secs(10));
    eprintln!("carol moved off the draining n2 after {moved:?}");
    let mut child = n2.child.take().unwrap();
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "n2 did not exit after draining"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    wait_presence(&alice, "carol", "online");
    drop(n3);
}
