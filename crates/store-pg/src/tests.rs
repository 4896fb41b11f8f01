#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::{Arc, Barrier};

use peerline_core::store_conformance::run_all;
use proptest::prelude::*;

use super::*;
use crate::testing::TestDb;

fn user(s: &str) -> Username {
    Username::parse(s).unwrap()
}

fn account(name: &str) -> Account {
    Account {
        username: user(name),
        password_hash: "$argon2id$v=19$m=8,t=1,p=1$c2FsdA$aGFzaA".into(),
        created_at: 1_700_000_000,
    }
}

fn device(name: &str, key: u8) -> Device {
    Device {
        username: user(name),
        device_id: [key; 16],
        noise_key: [key; 32],
        sign_key: [key.wrapping_add(1); 32],
        revoked: false,
    }
}

fn msg(from: &str, to: &str, msg_id: u64) -> NewMessage {
    NewMessage {
        from: user(from),
        to: user(to),
        msg_id,
        sent_at: msg_id,
        text: format!("m{msg_id}"),
    }
}

fn count(db: &TestDb, sql: &str) -> i64 {
    db.client().query_one(sql, &[]).unwrap().get(0)
}

#[test]
fn pg_store_conforms() {
    // A fresh schema per check, each with its own migrations.
    let db = TestDb::create();
    let mut n = 0;
    run_all(&mut || {
        n += 1;
        Box::new(PgStore::open(&db.schema_url(&format!("conformance{n}"))).unwrap())
    });
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pg_tables WHERE tablename = 'schema_migrations'"
        ),
        n,
        "every check had a schema of its own"
    );
}

#[test]
fn opening_twice_applies_each_migration_once() {
    let db = TestDb::create();
    drop(PgStore::open(db.url()).unwrap());
    let mut s = PgStore::open(db.url()).unwrap();
    assert_eq!(
        count(&db, "SELECT count(*) FROM schema_migrations"),
        MIGRATIONS.len() as i64
    );
    // The tables of migration 1 were created once and work.
    s.create_account(&account("ann"), &device("ann", 1))
        .unwrap();
    assert_eq!(s.account(&user("ann")).unwrap(), Some(account("ann")));
}

#[test]
fn concurrent_opens_apply_each_migration_once() {
    let db = TestDb::create();
    let url = db.url().to_string();
    let barrier = Arc::new(Barrier::new(6));
    let threads: Vec<_> = (0..6)
        .map(|_| {
            let (url, barrier) = (url.clone(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                barrier.wait();
                PgStore::open(&url).map(drop)
            })
        })
        .collect();
    for t in threads {
        // Without the advisory lock, all but one would fail on "relation already exists".
        t.join().unwrap().unwrap();
    }
    let mut c = db.client();
    let rows: Vec<(i32, String)> = c
        .query(
            "SELECT version, name FROM schema_migrations ORDER BY version",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let want: Vec<(i32, String)> = MIGRATIONS
        .iter()
        .map(|m| (m.version, m.name.to_string()))
        .collect();
    assert_eq!(rows, want);
}

#[test]
fn later_migrations_apply_in_order_and_only_once() {
    let db = TestDb::create();
    let cfg = || parse_url(db.url()).unwrap();
    let m = |version, name, sql| Migration { version, name, sql };
    let one = [m(1, "0001_a.sql", "CREATE TABLE a (x int)")];
    let three = [
        one[0],
        m(
            2,
            "0002_b.sql",
            "CREATE TABLE b (x int); INSERT INTO a VALUES (2)",
        ),
        m(3, "0003_c.sql", "INSERT INTO a VALUES (3)"),
    ];
    drop(PgStore::open_with(cfg(), &one).unwrap());
    drop(PgStore::open_with(cfg(), &three).unwrap());
    drop(PgStore::open_with(cfg(), &three).unwrap());
    let mut c = db.client();
    let xs: Vec<i32> = c
        .query("SELECT x FROM a ORDER BY x", &[])
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert_eq!(xs, vec![2, 3], "2 and 3 ran once each, after 1");
    assert_eq!(count(&db, "SELECT count(*) FROM schema_migrations"), 3);

    // A failing migration is rolled back and reported; the earlier ones stay.
    let broken = [
        three[0],
        three[1],
        three[2],
        m(
            4,
            "0004_bad.sql",
            "INSERT INTO a VALUES (4); SELECT nonsense",
        ),
    ];
    let err = PgStore::open_with(cfg(), &broken).unwrap_err();
    assert!(
        matches!(
            err,
            OpenError::Migrate {
                name: "0004_bad.sql",
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("0004_bad.sql"), "{err}");
    assert_eq!(count(&db, "SELECT count(*) FROM a"), 2, "rolled back");
    assert_eq!(
        count(&db, "SELECT max(version)::bigint FROM schema_migrations"),
        3
    );

    // A database migrated by a newer build is refused.
    let err = PgStore::open_with(cfg(), &one).unwrap_err();
    assert!(
        matches!(
            err,
            OpenError::TooNew {
                found: 3,
                supported: 1,
                ..
            }
        ),
        "{err:?}"
    );
    assert!(err.to_string().contains("newer Peerline"), "{err}");
}

#[test]
fn a_schema_of_its_own_via_url_options() {
    let db = TestDb::create();
    let mut s = PgStore::open(&db.schema_url("fleet")).unwrap();
    s.create_account(&account("ann"), &device("ann", 1))
        .unwrap();
    assert!(s.next_serial().unwrap() > 0);
    assert_eq!(
        count(&db, "SELECT count(*) FROM fleet.accounts"),
        1,
        "the tables are in the schema the URL names"
    );
    assert_eq!(
        count(
            &db,
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'"
        ),
        0
    );
}

#[test]
fn migration_files_are_all_registered_in_order() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".sql"))
        .collect();
    files.sort();
    let names: Vec<&str> = MIGRATIONS.iter().map(|m| m.name).collect();
    assert_eq!(files, names, "every file in migrations/ is in MIGRATIONS");
    for (i, m) in MIGRATIONS.iter().enumerate() {
        assert_eq!(m.version, i as i32 + 1, "versions count up from 1");
        assert!(
            m.name.starts_with(&format!("{:04}_", m.version)),
            "{}",
            m.name
        );
        let on_disk = std::fs::read_to_string(dir.join(m.name)).unwrap();
        assert_eq!(on_disk, m.sql);
    }
}

#[test]
fn quota_holds_with_concurrent_writers() {
    const WRITERS: u64 = 8;
    const EACH: u64 = 25;
    const QUOTA: usize = 60;
    let db = TestDb::create();
    drop(PgStore::open(db.url()).unwrap());
    let barrier = Arc::new(Barrier::new(WRITERS as usize));
    let threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let (url, barrier) = (db.url().to_string(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                // One store per thread: a supernode each.
                let mut s = PgStore::open(&url).unwrap();
                barrier.wait();
                (0..EACH)
                    .map(|i| {
                        s.queue_message(&msg("ann", "bob", w * 1000 + i), QUOTA)
                            .unwrap()
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let outcomes: Vec<QueueOutcome> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let queued = outcomes
        .iter()
        .filter(|o| matches!(o, QueueOutcome::Queued(_)))
        .count();
    let full = outcomes
        .iter()
        .filter(|o| **o == QueueOutcome::MailboxFull)
        .count();
    assert_eq!(queued, QUOTA, "exactly the quota is queued");
    assert_eq!(full, (WRITERS * EACH) as usize - QUOTA);
    assert_eq!(
        count(&db, "SELECT count(*) FROM messages WHERE recipient = 'bob'"),
        QUOTA as i64
    );
}

#[test]
fn concurrent_duplicates_queue_once() {
    let db = TestDb::create();
    drop(PgStore::open(db.url()).unwrap());
    let barrier = Arc::new(Barrier::new(6));
    let threads: Vec<_> = (0..6u8)
        .map(|t| {
            let (url, barrier) = (db.url().to_string(), Arc::clone(&barrier));
            std::thread::spawn(move || {
                let mut s = PgStore::open(&url).unwrap();
                barrier.wait();
                // Half send it to bob, half (a buggy or malicious sender) to carol.
                let to = if t % 2 == 0 { "bob" } else { "carol" };
                s.queue_message(&msg("ann", to, 7), 100).unwrap()
            })
        })
        .collect();
    let outcomes: Vec<QueueOutcome> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    let ids: Vec<u64> = outcomes
        .iter()
        .filter_map(|o| match o {
            QueueOutcome::Queued(id) => Some(*id),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 1, "{outcomes:?}");
    for o in &outcomes {
        assert!(
            matches!(o, QueueOutcome::Queued(id) | QueueOutcome::Duplicate(id) if *id == ids[0]),
            "{outcomes:?}"
        );
    }
    assert_eq!(count(&db, "SELECT count(*) FROM messages"), 1);
}

#[test]
fn serials_never_repeat_across_stores() {
    let db = TestDb::create();
    drop(PgStore::open(db.url()).unwrap());
    let threads: Vec<_> = (0..4)
        .map(|_| {
            let url = db.url().to_string();
            std::thread::spawn(move || {
                let mut s = PgStore::open(&url).unwrap();
                (0..50)
                    .map(|_| s.next_serial().unwrap())
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut all: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().unwrap())
        .collect();
    let n = all.len();
    all.sort_unstable();
    all.dedup();
    assert_eq!(all.len(), n, "no serial handed out twice");
    assert!(all[0] > 0);
}

#[test]
fn another_supernode_sees_committed_writes() {
    let db = TestDb::create();
    let mut a = PgStore::open(db.url()).unwrap();
    let mut b = PgStore::open(db.url()).unwrap();
    a.create_account(&account("ann"), &device("ann", 1))
        .unwrap();
    let QueueOutcome::Queued(id) = a.queue_message(&msg("ann", "bob", 1), 10).unwrap() else {
        panic!("not queued")
    };
    assert_eq!(b.account(&user("ann")).unwrap(), Some(account("ann")));
    let pending = b.pending_messages(&user("bob"), 10).unwrap();
    assert_eq!(
        pending,
        vec![StoredMessage {
            id,
            msg: msg("ann", "bob", 1)
        }]
    );
    assert!(b.delete_message(&user("bob"), id).unwrap());
    assert!(!a.delete_message(&user("bob"), id).unwrap(), "deleted once");
    assert!(a.pending_messages(&user("bob"), 10).unwrap().is_empty());
}

#[test]
fn lost_connection_is_reopened_once() {
    let db = TestDb::create();
    let mut s = PgStore::open(db.url()).unwrap();
    s.create_account(&account("ann"), &device("ann", 1))
        .unwrap();
    let kill = |db: &TestDb| {
        let n: i64 = db
            .client()
            .query_one(
                "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity
                 WHERE datname = current_database() AND pid <> pg_backend_pid()) k",
                &[],
            )
            .unwrap()
            .get(0);
        assert!(n >= 1, "a connection was terminated");
    };
    kill(&db);
    assert_eq!(s.account(&user("ann")).unwrap(), Some(account("ann")));
    assert_eq!(s.reconnects(), 1);
    kill(&db);
    let QueueOutcome::Queued(_) = s.queue_message(&msg("ann", "bob", 1), 10).unwrap() else {
        panic!("not queued after a reconnect")
    };
    assert_eq!(s.reconnects(), 2);
    assert_eq!(s.pending_messages(&user("bob"), 10).unwrap().len(), 1);
    // The new connection has the session settings too.
    let show = |s: &mut PgStore, what: &str| -> String {
        let c = &mut s.conn.as_mut().unwrap().client;
        c.query_one(&format!("SHOW {what}"), &[]).unwrap().get(0)
    };
    assert_eq!(show(&mut s, "lock_timeout"), "5s");
    assert_eq!(show(&mut s, "idle_in_transaction_session_timeout"), "10s");
}

#[test]
fn a_lock_held_by_a_stuck_supernode_fails_the_call_instead_of_hanging() {
    let db = TestDb::create();
    let mut s = PgStore::open(db.url()).unwrap();
    s.queue_message(&msg("ann", "bob", 1), 10).unwrap();
    // Another "supernode" locks bob's mailbox and stalls mid-transaction.
    let mut other = db.client();
    let mut tx = other.transaction().unwrap();
    tx.execute(
        "SELECT 1 FROM mailboxes WHERE recipient = 'bob' FOR UPDATE",
        &[],
    )
    .unwrap();
    let t0 = std::time::Instant::now();
    let err = s.queue_message(&msg("ann", "bob", 2), 10).unwrap_err();
    let waited = t0.elapsed();
    assert!(
        matches!(&err, StoreError::Backend(m) if m.contains("lock timeout")),
        "{err:?}"
    );
    assert!(
        waited >= Duration::from_secs(4) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
    tx.rollback().unwrap();
    // Nothing was written by the failed call, and the store works on.
    assert_eq!(s.pending_messages(&user("bob"), 10).unwrap().len(), 1);
    let QueueOutcome::Queued(_) = s.queue_message(&msg("ann", "bob", 2), 10).unwrap() else {
        panic!("not queued")
    };
}

#[test]
fn unreachable_server_is_a_backend_error_not_a_panic() {
    let db = TestDb::create();
    let mut s = PgStore::open(db.url()).unwrap();
    // Point the store at a port nothing listens on, then lose the connection.
    s.config.port(1);
    s.config.connect_timeout(Duration::from_secs(1));
    s.conn = None;
    let err = s.account(&user("ann")).unwrap_err();
    assert!(
        matches!(&err, StoreError::Backend(m) if m.contains("cannot connect")),
        "{err:?}"
    );
}

#[test]
fn bad_urls_and_servers_are_one_clear_line() {
    for url in [
        "mysql://u@h/db",
        "postgres://u@h:notaport/db",
        "postgres://u@h:5432",
        "postgres://",
    ] {
        let err = PgStore::open(url).unwrap_err();
        assert!(matches!(err, OpenError::Url { .. }), "{url}: {err:?}");
        let text = err.to_string();
        assert!(
            text.contains("postgres://USER@HOST:PORT/DATABASE"),
            "{text}"
        );
        assert!(!text.contains('\n'), "{text}");
    }
    let err = PgStore::open("postgres://u:secret@127.0.0.1:1/db?connect_timeout=1").unwrap_err();
    assert!(matches!(err, OpenError::Connect { .. }), "{err:?}");
    let text = err.to_string();
    assert!(text.contains("127.0.0.1:1/db"), "{text}");
    assert!(!text.contains("secret"), "{text}");
    let err = PgStore::open("postgres://u:secret@h:x/db").unwrap_err();
    assert!(!err.to_string().contains("secret"), "{err}");
}

#[test]
fn redact_hides_only_the_password() {
    assert_eq!(redact("postgres://u:pw@h:1/db"), "postgres://u:***@h:1/db");
    assert_eq!(redact("postgres://u@h:1/db"), "postgres://u@h:1/db");
    assert_eq!(redact("postgres://h/db"), "postgres://h/db");
}

#[test]
fn search_prefix_uses_the_primary_key_index() {
    let db = TestDb::create();
    drop(PgStore::open(db.url()).unwrap());
    let mut c = db.client();
    c.batch_execute("SET enable_seqscan = off").unwrap();
    let plan: Vec<String> = c
        .query(
            "EXPLAIN SELECT username FROM accounts WHERE username >= 'bo' AND username < 'bp'
             ORDER BY username LIMIT 10",
            &[],
        )
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let plan = plan.join("\n");
    assert!(plan.contains("accounts_pkey"), "{plan}");
    assert!(plan.contains("Index Cond"), "{plan}");
}

#[test]
fn corrupt_rows_are_backend_errors() {
    let db = TestDb::create();
    let mut s = PgStore::open(db.url()).unwrap();
    db.client()
        .batch_execute(
            "INSERT INTO accounts VALUES ('BAD NAME', 'h', 0);
             INSERT INTO contacts VALUES ('carol', 'Not Valid!', 3, '');
             INSERT INTO messages (sender, recipient, msg_id, sent_at, text)
                 VALUES ('ann', 'bob', 1, 1, '\\xff'::bytea);",
        )
        .unwrap();
    assert!(matches!(
        s.search_prefix("BAD", 10),
        Err(StoreError::Backend(_))
    ));
    assert!(matches!(
        s.accepted_contacts(&user("carol")),
        Err(StoreError::Backend(_))
    ));
    assert!(matches!(
        s.pending_messages(&user("bob"), 10),
        Err(StoreError::Backend(m)) if m.contains("UTF-8")
    ));
    // The store is still usable afterwards.
    assert!(s.account(&user("ann")).unwrap().is_none());
}

#[test]
fn dropping_inside_async_code_does_not_panic() {
    let db = TestDb::create();
    let store = PgStore::open(db.url()).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    rt.block_on(async move { drop(store) });
}

/// Canonical usernames: what `Username::parse` accepts and leaves unchanged.
fn username_strategy() -> impl Strategy<Value = String> {
    "[a-z0-9._-]{1,32}".prop_filter("canonical username", |s| {
        Username::parse(s).is_ok_and(|u| u.as_str() == s)
    })
}

/// Runs `cases` property cases against one database (creating one per case would take
/// most of the time), emptying its tables before each case.
fn prop_run<S: Strategy>(
    strategy: S,
    cases: u32,
    check: impl Fn(&mut PgStore, S::Value) -> Result<(), TestCaseError>,
) {
    let db = TestDb::create();
    // `TestRunner::run` takes a `Fn`.
    let s = std::cell::RefCell::new(PgStore::open(db.url()).unwrap());
    let wipe = std::cell::RefCell::new(db.client());
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    runner
        .run(&strategy, |v| {
            wipe.borrow_mut()
                .batch_execute("TRUNCATE accounts, devices, contacts, mailboxes, messages")
                .unwrap();
            check(&mut s.borrow_mut(), v)
        })
        .unwrap();
}

/// Any text (NUL, any Unicode) and any u64 fields come back exactly as queued; so does any
/// contact note.
#[test]
fn messages_and_notes_round_trip() {
    let strategy = (
        proptest::collection::vec((any::<String>(), any::<u64>(), any::<u64>()), 1..8),
        any::<String>(),
    );
    prop_run(strategy, 32, |s, (texts, note)| {
        let mut want = Vec::new();
        for (i, (text, msg_id, sent_at)) in texts.iter().enumerate() {
            let m = NewMessage {
                from: user("ann"),
                to: user("bob"),
                // Distinct ids: the same id would be a duplicate.
                msg_id: msg_id.wrapping_add((i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                sent_at: *sent_at,
                text: text.clone(),
            };
            let QueueOutcome::Queued(id) = s.queue_message(&m, 100).unwrap() else {
                panic!("not queued")
            };
            want.push(StoredMessage { id, msg: m });
        }
        prop_assert_eq!(s.pending_messages(&user("bob"), 100).unwrap(), want);
        s.set_contact_pair(
            &user("ann"),
            Some((ContactState::Requested, note.as_str())),
            &user("bob"),
            Some((ContactState::Incoming, note.as_str())),
        )
        .unwrap();
        prop_assert_eq!(
            s.contact(&user("bob"), &user("ann")).unwrap().unwrap().note,
            note
        );
        Ok(())
    });
}

/// Accounts of any valid usernames round-trip, and prefix search agrees with a sorted
/// filter of them (the SQLite store's byte order).
#[test]
fn usernames_round_trip_and_search_agrees_with_a_model() {
    let strategy = (
        proptest::collection::btree_set(username_strategy(), 1..12),
        "[a-z0-9._-]{0,3}",
    );
    prop_run(strategy, 64, |s, (names, prefix)| {
        for (i, n) in names.iter().enumerate() {
            s.create_account(&account(n), &device(n, i as u8)).unwrap();
        }
        for n in &names {
            prop_assert_eq!(s.account(&user(n)).unwrap(), Some(account(n)));
        }
        let want: Vec<&String> = names
            .iter()
            .filter(|n| n.starts_with(&prefix))
            .take(5)
            .collect();
        let got = s.search_prefix(&prefix, 5).unwrap();
        let got: Vec<&str> = got.iter().map(Username::as_str).collect();
        prop_assert_eq!(got, want);
        Ok(())
    });
}

proptest! {
    /// URL checking and redaction never panic, and a password never comes back in an
    /// error or a redacted URL.
    #[test]
    fn url_parsing_never_panics_or_leaks_the_password(
        user in "[a-z]{1,8}",
        pw in "[A-Za-z0-9]{6,12}",
        rest in ".{0,40}",
    ) {
        let url = format!("postgres://{user}:{pw}@{rest}");
        let shown = redact(&url);
        prop_assert!(!shown.contains(&format!(":{pw}@")), "{}", shown);
        if let Err(e) = parse_url(&url) {
            prop_assert!(!e.to_string().contains(&format!(":{pw}@")), "{}", e);
        }
        let _ = parse_url(&rest);
        let _ = redact(&rest);
    }
}
