//! A supernode whose data dir is configured with a PostgreSQL store (`peerlined init
//! --store-url postgres://...`): users register and log in through it, their rows are in
//! PostgreSQL, and an offline message survives a kill -9 of the supernode, is delivered,
//! and is deleted from PostgreSQL after the recipient's acknowledgement.
//!
//! Needs `PEERLINE_TEST_PG_URL` (`eval "$(bash scripts/fleet-services.sh start)"`); each
//! run gets a database of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{free_port, peerline_bin, peerlined_bin};

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use peerline_store_pg::testing::TestDb;
use serde_json::Value;

struct Daemon {
    data: PathBuf,
    child: Option<Child>,
}

impl Daemon {
    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.join("test.log"))
            .unwrap();
        let child = Command::new(peerlined_bin())
            .args(["run", "--data"])
            .arg(&self.data)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid_file = self.data.join("peerlined.pid");
        let start = Instant::now();
        while std::fs::read_to_string(&pid_file)
            .map(|p| p.trim() != child.id().to_string())
            .unwrap_or(true)
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "peerlined did not start: {}",
                std::fs::read_to_string(self.data.join("test.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        c.kill().unwrap();
        c.wait().unwrap();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

struct User {
    name: &'static str,
    profile: PathBuf,
}

impl User {
    fn new(root: &Path, name: &'static str) -> User {
        User {
            name,
            profile: root.join(name),
        }
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = Command::new(peerline_bin())
            .arg("--profile")
            .arg(&self.profile)
            .args(args)
            .env("PEERLINE_PASSWORD", format!("{}-password", self.name))
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{} {args:?} failed: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = Command::new(peerline_bin())
            .arg("--profile")
            .arg(&self.profile)
            .arg("down")
            .output();
    }
}

fn rows(db: &TestDb, sql: &str) -> i64 {
    db.client().query_one(sql, &[]).unwrap().get(0)
}

#[test]
fn a_supernode_on_postgresql_registers_users_and_keeps_offline_messages() {
    let db = TestDb::create();
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("supernode");
    let port = free_port();
    let out = Command::new(peerlined_bin())
        .args(["init", "--data"])
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{port}"), "--admin"])
        .arg(format!("127.0.0.1:{}", free_port()))
        .args(["--store-url", db.url()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = std::fs::read_to_string(data.join("peerlined.toml")).unwrap();
    assert!(cfg.contains(&format!("url = \"{}\"", db.url())), "{cfg}");
    let mut sn = Daemon {
        data: data.clone(),
        child: None,
    };
    sn.start();
    let bootstrap = std::fs::read_to_string(data.join("bootstrap")).unwrap();
    let bootstrap = bootstrap.trim();

    let (alice, bob) = (
        User::new(root.path(), "alice"),
        User::new(root.path(), "bob"),
    );
    for u in [&alice, &bob] {
        u.ok(&["register", u.name, "--server", bootstrap]);
        assert_eq!(u.json(&["up", "--json"])["online"], true);
    }
    // The accounts and their devices are in PostgreSQL, and no SQLite file was made.
    assert_eq!(
        rows(
            &db,
            "SELECT count(*) FROM accounts WHERE username IN ('alice', 'bob')"
        ),
        2
    );
    assert_eq!(rows(&db, "SELECT count(*) FROM devices"), 2);
    assert!(!data.join("store.sqlite").exists());

    alice.ok(&["contacts", "add", "bob"]);
    bob.ok(&["contacts", "accept", "alice"]);
    assert_eq!(
        rows(&db, "SELECT count(*) FROM contacts WHERE state = 3"),
        2,
        "both directions accepted"
    );

    // Bob goes offline; the message is queued in PostgreSQL before alice is told so...
    bob.ok(&["down"]);
    let sent = alice.json(&["msg", "send", "bob", "kept in postgres", "--json"]);
    assert_eq!(sent["via"], "offline");
    assert_eq!(
        rows(&db, "SELECT count(*) FROM messages WHERE recipient = 'bob'"),
        1
    );
    // ...and survives a kill -9 of the supernode.
    sn.kill9();
    sn.start();

    bob.ok(&["up"]);
    let start = Instant::now();
    loop {
        let got = bob.json(&["msg", "list", "--json"]);
        let delivered = got.as_array().unwrap().iter().any(|m| {
            m["from"] == "alice" && m["text"] == "kept in postgres" && m["via"] == "offline"
        });
        // Deleted only after bob's acknowledgement.
        if delivered && rows(&db, "SELECT count(*) FROM messages") == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "not delivered and deleted: {got}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop((alice, bob));
    drop(sn);
}
