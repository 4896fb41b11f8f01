//! A supernode whose data dir is configured with a PostgreSQL store (`peerlined init
//! --store-url postgres://...`): users register and log in through it, their rows are in
//! PostgreSQL, and an offline message survives a kill -9 of the supernode, is delivered,
//! and is deleted from PostgreSQL after the recipient's acknowledgement.
//!
//! Needs `PEERLINE_TEST_PG_URL` (`eval "$(bash scripts/fleet-services.sh start)"`); each
//! run gets a database of its own.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{Supernode, User};

use std::time::{Duration, Instant};

use peerline_store_pg::testing::TestDb;

fn rows(db: &TestDb, sql: &str) -> i64 {
    db.client().query_one(sql, &[]).unwrap().get(0)
}

#[test]
fn a_supernode_on_postgresql_registers_users_and_keeps_offline_messages() {
    let db = TestDb::create();
    let root = tempfile::tempdir().unwrap();
    let mut sn = Supernode::init_only(root.path(), "supernode", &["--store-url", db.url()]);
    let data = sn.data.clone();
    let cfg = std::fs::read_to_string(data.join("peerlined.toml")).unwrap();
    assert!(cfg.contains(&format!("url = \"{}\"", db.url())), "{cfg}");
    sn.start();
    let bootstrap = sn.bootstrap();

    let user = |name: &'static str| User {
        name,
        profile: root.path().join(name),
    };
    let (alice, bob) = (user("alice"), user("bob"));
    for u in [&alice, &bob] {
        u.ok(&["register", u.name, "--server", &bootstrap]);
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
