//! Conformance tests every [`Store`] backend must pass.
//!
//! Call [`run_all`] from a backend's test suite with a closure that opens a fresh, empty
//! store; each check gets its own store and panics with a message naming the check and
//! what went wrong.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use peerline_wire::msg::ContactState;
use peerline_wire::Username;

use crate::store::{
    Account, ContactRow, Device, NewMessage, QueueOutcome, Store, StoreError, StoredMessage,
};

/// One conformance check, run against a fresh store.
type Check = fn(&mut dyn Store);

/// Runs every check, each against a fresh store from `make()`.
pub fn run_all(make: &mut dyn FnMut() -> Box<dyn Store>) {
    let checks: &[(&str, Check)] = &[
        ("create_account_then_account", create_account_then_account),
        ("duplicate_username_is_exists", duplicate_username_is_exists),
        (
            "duplicate_first_device_key_is_exists",
            duplicate_first_device_key_is_exists,
        ),
        (
            "add_device_to_missing_account",
            add_device_to_missing_account,
        ),
        (
            "add_device_duplicate_noise_key",
            add_device_duplicate_noise_key,
        ),
        ("device_by_noise_key", device_by_noise_key),
        ("revoke_device", revoke_device),
        (
            "devices_of_lists_an_accounts_devices",
            devices_of_lists_an_accounts_devices,
        ),
        ("next_serial_increases", next_serial_increases),
        ("search_prefix_sorted_bounded", search_prefix_sorted_bounded),
        ("search_prefix_is_literal", search_prefix_is_literal),
        (
            "set_contact_pair_sets_and_deletes",
            set_contact_pair_sets_and_deletes,
        ),
        ("contacts_paging_sorted", contacts_paging_sorted),
        (
            "accepted_contacts_only_accepted",
            accepted_contacts_only_accepted,
        ),
        ("queue_ids_increase", queue_ids_increase),
        (
            "queue_duplicate_returns_same_id",
            queue_duplicate_returns_same_id,
        ),
        (
            "queue_mailbox_full_writes_nothing",
            queue_mailbox_full_writes_nothing,
        ),
        ("pending_oldest_first_bounded", pending_oldest_first_bounded),
        (
            "delete_message_true_then_false",
            delete_message_true_then_false,
        ),
        ("delete_is_per_recipient", delete_is_per_recipient),
    ];
    for (name, check) in checks {
        let mut store = make();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&mut *store)));
        if let Err(payload) = result {
            let why = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("(non-string panic)");
            panic!("store conformance check `{name}` failed: {why}");
        }
    }
}

pub(crate) fn user(name: &str) -> Username {
    Username::parse(name).expect("test username")
}

pub(crate) fn account(name: &str) -> Account {
    Account {
        username: user(name),
        password_hash: format!("$argon2id$v=19$m=8,t=1,p=1$c2FsdA${name}"),
        created_at: 1_700_000_000,
    }
}

pub(crate) fn device(name: &str, key: u8) -> Device {
    Device {
        username: user(name),
        device_id: [key; 16],
        noise_key: [key; 32],
        sign_key: [key.wrapping_add(100); 32],
        revoked: false,
    }
}

fn register(s: &mut dyn Store, name: &str, key: u8) {
    s.create_account(&account(name), &device(name, key))
        .unwrap_or_else(|e| panic!("create_account({name}) failed: {e}"));
}

fn msg(from: &str, to: &str, msg_id: u64, text: &str) -> NewMessage {
    NewMessage {
        from: user(from),
        to: user(to),
        msg_id,
        sent_at: 1_700_000_000_000 + msg_id,
        text: text.to_string(),
    }
}

fn queued(s: &mut dyn Store, m: &NewMessage, quota: usize) -> u64 {
    match s.queue_message(m, quota) {
        Ok(QueueOutcome::Queued(id)) => id,
        other => panic!("queue_message({m:?}) should be Queued, got {other:?}"),
    }
}

fn names(v: &[Username]) -> Vec<&str> {
    v.iter().map(Username::as_str).collect()
}

fn create_account_then_account(s: &mut dyn Store) {
    assert_eq!(
        s.account(&user("alice")).unwrap(),
        None,
        "empty store has no alice"
    );
    register(s, "alice", 1);
    assert_eq!(
        s.account(&user("alice")).unwrap(),
        Some(account("alice")),
        "account() must return the created account unchanged"
    );
    assert_eq!(
        s.device_by_noise_key(&[1; 32]).unwrap(),
        Some(device("alice", 1)),
        "create_account must also store the first device"
    );
    assert_eq!(
        s.account(&user("bob")).unwrap(),
        None,
        "other names stay absent"
    );
}

fn duplicate_username_is_exists(s: &mut dyn Store) {
    register(s, "alice", 1);
    let mut other = account("alice");
    other.password_hash = "other-hash".to_string();
    other.created_at = 5;
    assert_eq!(
        s.create_account(&other, &device("alice", 2)),
        Err(StoreError::Exists),
        "a taken username must be Err(Exists)"
    );
    assert_eq!(
        s.account(&user("alice")).unwrap(),
        Some(account("alice")),
        "a refused registration must not change the existing account"
    );
    assert_eq!(
        s.device_by_noise_key(&[2; 32]).unwrap(),
        None,
        "a refused registration must not write its device"
    );
}

fn duplicate_first_device_key_is_exists(s: &mut dyn Store) {
    register(s, "alice", 1);
    assert_eq!(
        s.create_account(&account("bob"), &device("bob", 1)),
        Err(StoreError::Exists),
        "registering with an enrolled Noise key must be Err(Exists)"
    );
    assert_eq!(
        s.account(&user("bob")).unwrap(),
        None,
        "a refused registration must not write the account"
    );
    assert_eq!(
        s.device_by_noise_key(&[1; 32]).unwrap(),
        Some(device("alice", 1))
    );
}

fn add_device_to_missing_account(s: &mut dyn Store) {
    assert_eq!(
        s.add_device(&device("ghost", 3)),
        Err(StoreError::NotFound),
        "add_device for a missing account must be Err(NotFound)"
    );
    assert_eq!(
        s.device_by_noise_key(&[3; 32]).unwrap(),
        None,
        "nothing written"
    );
}

fn add_device_duplicate_noise_key(s: &mut dyn Store) {
    register(s, "alice", 1);
    register(s, "bob", 2);
    s.add_device(&device("alice", 3))
        .expect("add a second device");
    assert_eq!(
        s.add_device(&device("bob", 3)),
        Err(StoreError::Exists),
        "an enrolled Noise key must be Err(Exists) even for another account"
    );
    assert_eq!(
        s.add_device(&device("alice", 1)),
        Err(StoreError::Exists),
        "re-adding the first device must be Err(Exists)"
    );
    assert_eq!(
        s.device_by_noise_key(&[3; 32]).unwrap(),
        Some(device("alice", 3)),
        "the refused add must not change the existing device"
    );
}

fn device_by_noise_key(s: &mut dyn Store) {
    register(s, "alice", 1);
    register(s, "bob", 2);
    s.add_device(&device("alice", 3)).unwrap();
    for (key, owner) in [(1, "alice"), (2, "bob"), (3, "alice")] {
        assert_eq!(
            s.device_by_noise_key(&[key; 32]).unwrap(),
            Some(device(owner, key)),
            "device_by_noise_key([{key}; 32]) must return {owner}'s device"
        );
    }
    assert_eq!(
        s.device_by_noise_key(&[9; 32]).unwrap(),
        None,
        "unknown key is None"
    );
}

fn revoke_device(s: &mut dyn Store) {
    register(s, "alice", 1);
    s.add_device(&device("alice", 2)).unwrap();
    s.revoke_device(&[2; 32]).expect("revoke a known device");
    let d = s
        .device_by_noise_key(&[2; 32])
        .unwrap()
        .expect("revoked device still listed");
    assert!(d.revoked, "revoke_device must set revoked");
    assert!(
        !s.device_by_noise_key(&[1; 32]).unwrap().unwrap().revoked,
        "revoking one device must not revoke the others"
    );
    s.revoke_device(&[2; 32]).expect("revoking twice is fine");
    assert_eq!(
        s.revoke_device(&[9; 32]),
        Err(StoreError::NotFound),
        "revoking an unknown key must be Err(NotFound)"
    );
}

fn devices_of_lists_an_accounts_devices(s: &mut dyn Store) {
    register(s, "alice", 3);
    s.add_device(&device("alice", 1)).unwrap();
    register(s, "bob", 2);
    s.revoke_device(&[3; 32]).unwrap();
    let alice = s.devices_of(&user("alice")).unwrap();
    assert_eq!(
        alice.iter().map(|d| d.noise_key[0]).collect::<Vec<_>>(),
        vec![1, 3],
        "alice's two devices, ordered by Noise key"
    );
    assert_eq!(alice[1], {
        let mut d = device("alice", 3);
        d.revoked = true;
        d
    });
    assert!(!alice[0].revoked);
    assert_eq!(s.devices_of(&user("bob")).unwrap().len(), 1);
    assert!(
        s.devices_of(&user("carol")).unwrap().is_empty(),
        "no account: no devices"
    );
}

fn next_serial_increases(s: &mut dyn Store) {
    let mut last = s.next_serial().unwrap();
    for _ in 0..50 {
        let next = s.next_serial().unwrap();
        assert!(
            next > last,
            "next_serial must strictly increase: {last} then {next}"
        );
        last = next;
    }
}

fn search_prefix_sorted_bounded(s: &mut dyn Store) {
    for (i, name) in ["carol", "bobby", "alice", "bob", "bo-x", "bob.z", "boa"]
        .iter()
        .enumerate()
    {
        register(s, name, i as u8 + 1);
    }
    let got = s.search_prefix("bo", 10).unwrap();
    assert_eq!(
        names(&got),
        ["bo-x", "boa", "bob", "bob.z", "bobby"],
        "search_prefix(\"bo\") must return exactly the names starting with bo, sorted"
    );
    let got = s.search_prefix("bo", 2).unwrap();
    assert_eq!(
        names(&got),
        ["bo-x", "boa"],
        "search_prefix must stop at limit, sorted"
    );
    let got = s.search_prefix("bob", 10).unwrap();
    assert_eq!(
        names(&got),
        ["bob", "bob.z", "bobby"],
        "exact name is its own prefix"
    );
    assert!(
        s.search_prefix("bo", 0).unwrap().is_empty(),
        "limit 0 returns nothing"
    );
    assert!(
        s.search_prefix("dave", 10).unwrap().is_empty(),
        "no match returns nothing"
    );
    assert!(
        s.search_prefix("lice", 10).unwrap().is_empty(),
        "prefix, not substring"
    );
    let got = s.search_prefix("carol", 10).unwrap();
    assert_eq!(names(&got), ["carol"], "last name in the table");
    assert!(
        s.search_prefix("carolz", 10).unwrap().is_empty(),
        "longer than any name"
    );
}

fn search_prefix_is_literal(s: &mut dyn Store) {
    for (i, name) in ["abc", "a_b", "a_c", "axb", "zzz"].iter().enumerate() {
        register(s, name, i as u8 + 1);
    }
    let got = s.search_prefix("a_", 10).unwrap();
    assert_eq!(
        names(&got),
        ["a_b", "a_c"],
        "`_` in a prefix is literal, not a wildcard"
    );
    let got = s.search_prefix("a_b", 10).unwrap();
    assert_eq!(
        names(&got),
        ["a_b"],
        "`_` in a prefix is literal, not a wildcard"
    );
    assert!(
        s.search_prefix("%", 10).unwrap().is_empty(),
        "`%` in a prefix is literal"
    );
    assert!(
        s.search_prefix("a%", 10).unwrap().is_empty(),
        "`a%` is literal"
    );
    assert!(
        s.search_prefix("_", 10).unwrap().is_empty(),
        "`_` alone is literal"
    );
    let got = s.search_prefix("a", 10).unwrap();
    assert_eq!(
        names(&got),
        ["a_b", "a_c", "abc", "axb"],
        "plain prefix still works"
    );
}

fn row(peer: &str, state: ContactState, note: &str) -> ContactRow {
    ContactRow {
        peer: user(peer),
        state,
        note: note.to_string(),
    }
}

fn set_contact_pair_sets_and_deletes(s: &mut dyn Store) {
    let (a, b, c) = (user("alice"), user("bob"), user("carol"));
    assert_eq!(s.contact(&a, &b).unwrap(), None, "no row before any write");
    s.set_contact_pair(
        &a,
        Some((ContactState::Requested, "hi bob")),
        &b,
        Some((ContactState::Incoming, "hi bob")),
    )
    .unwrap();
    assert_eq!(
        s.contact(&a, &b).unwrap(),
        Some(row("bob", ContactState::Requested, "hi bob"))
    );
    assert_eq!(
        s.contact(&b, &a).unwrap(),
        Some(row("alice", ContactState::Incoming, "hi bob"))
    );
    assert_eq!(
        s.contact(&a, &c).unwrap(),
        None,
        "unrelated pair has no row"
    );

    s.set_contact_pair(
        &a,
        Some((ContactState::Accepted, "")),
        &b,
        Some((ContactState::Accepted, "")),
    )
    .unwrap();
    assert_eq!(
        s.contact(&a, &b).unwrap(),
        Some(row("bob", ContactState::Accepted, "")),
        "set_contact_pair must overwrite an existing row"
    );
    assert_eq!(
        s.contact(&b, &a).unwrap(),
        Some(row("alice", ContactState::Accepted, ""))
    );

    // One side deleted, the other blocked (a block keeps only the blocker's row).
    s.set_contact_pair(&a, Some((ContactState::Blocked, "")), &b, None)
        .unwrap();
    assert_eq!(
        s.contact(&a, &b).unwrap(),
        Some(row("bob", ContactState::Blocked, ""))
    );
    assert_eq!(s.contact(&b, &a).unwrap(), None, "None must delete the row");

    s.set_contact_pair(&a, None, &b, None).unwrap();
    assert_eq!(s.contact(&a, &b).unwrap(), None, "both rows deleted");
    assert_eq!(s.contact(&b, &a).unwrap(), None, "both rows deleted");
    s.set_contact_pair(&a, None, &b, None)
        .expect("deleting missing rows is fine");

    // ContactState::None is "no relationship": storing it deletes the row.
    s.set_contact_pair(
        &a,
        Some((ContactState::Accepted, "")),
        &c,
        Some((ContactState::Accepted, "")),
    )
    .unwrap();
    s.set_contact_pair(
        &a,
        Some((ContactState::None, "")),
        &c,
        Some((ContactState::None, "")),
    )
    .unwrap();
    assert_eq!(
        s.contact(&a, &c).unwrap(),
        None,
        "a ContactState::None row is a deletion"
    );
    assert_eq!(
        s.contact(&c, &a).unwrap(),
        None,
        "a ContactState::None row is a deletion"
    );
}

fn contacts_paging_sorted(s: &mut dyn Store) {
    let owner = user("mallory");
    let peers = ["zed", "bob", "erin", "alice", "dave", "carol"];
    for p in peers {
        s.set_contact_pair(&owner, Some((ContactState::Accepted, p)), &user(p), None)
            .unwrap();
    }
    // Rows of another owner must not show up.
    s.set_contact_pair(
        &user("aaron"),
        Some((ContactState::Accepted, "")),
        &user("zoe"),
        None,
    )
    .unwrap();
    s.set_contact_pair(
        &user("zoe"),
        Some((ContactState::Accepted, "")),
        &user("aaa"),
        None,
    )
    .unwrap();

    let all = s.contacts(&owner, 0, 100).unwrap();
    let got: Vec<&str> = all.iter().map(|r| r.peer.as_str()).collect();
    assert_eq!(
        got,
        ["alice", "bob", "carol", "dave", "erin", "zed"],
        "contacts sorted by peer"
    );
    assert!(
        all.iter().all(|r| r.note == r.peer.as_str()),
        "notes kept per row"
    );

    let mut paged = Vec::new();
    let mut offset = 0;
    loop {
        let page = s.contacts(&owner, offset, 4).unwrap();
        assert!(page.len() <= 4, "a page is bounded by limit");
        if page.is_empty() {
            break;
        }
        offset += page.len();
        paged.extend(page);
    }
    assert_eq!(paged, all, "pages of 4 must concatenate to the full list");
    let page = s.contacts(&owner, 2, 2).unwrap();
    let got: Vec<&str> = page.iter().map(|r| r.peer.as_str()).collect();
    assert_eq!(got, ["carol", "dave"], "offset 2 limit 2");
    assert!(
        s.contacts(&owner, 6, 10).unwrap().is_empty(),
        "offset past the end"
    );
    assert!(s.contacts(&owner, 0, 0).unwrap().is_empty(), "limit 0");
    assert!(
        s.contacts(&user("nobody"), 0, 10).unwrap().is_empty(),
        "owner without rows"
    );
}

fn accepted_contacts_only_accepted(s: &mut dyn Store) {
    let owner = user("alice");
    let rows = [
        ("erin", ContactState::Accepted),
        ("bob", ContactState::Accepted),
        ("carol", ContactState::Requested),
        ("dave", ContactState::Incoming),
        ("frank", ContactState::Blocked),
        ("grace", ContactState::Accepted),
    ];
    for (p, st) in rows {
        s.set_contact_pair(&owner, Some((st, "")), &user(p), None)
            .unwrap();
    }
    // Another owner's Accepted row must not leak into alice's list.
    s.set_contact_pair(
        &user("carol"),
        Some((ContactState::Accepted, "")),
        &user("zed"),
        None,
    )
    .unwrap();
    let got = s.accepted_contacts(&owner).unwrap();
    assert_eq!(
        names(&got),
        ["bob", "erin", "grace"],
        "only Accepted rows, sorted by peer"
    );
    assert!(s.accepted_contacts(&user("nobody")).unwrap().is_empty());
}

fn queue_ids_increase(s: &mut dyn Store) {
    let mut last = 0;
    for i in 0..10 {
        let (from, to) = if i % 2 == 0 {
            ("alice", "bob")
        } else {
            ("carol", "dave")
        };
        let id = queued(s, &msg(from, to, i, "x"), 100);
        assert!(id > last, "queued ids must increase: {last} then {id}");
        last = id;
    }
    // Ids are not reused after deletion.
    assert!(s.delete_message(&user("dave"), last).unwrap());
    let id = queued(s, &msg("carol", "dave", 99, "again"), 100);
    assert!(
        id > last,
        "ids must not be reused after delete: {last} then {id}"
    );
}

fn queue_duplicate_returns_same_id(s: &mut dyn Store) {
    let m = msg("alice", "bob", 7, "hello");
    let id = queued(s, &m, 10);
    assert_eq!(
        s.queue_message(&m, 10),
        Ok(QueueOutcome::Duplicate(id)),
        "re-queueing the same (from, msg_id) must be Duplicate with the original id"
    );
    let mut changed = m.clone();
    changed.text = "different".to_string();
    changed.sent_at += 1;
    assert_eq!(
        s.queue_message(&changed, 10),
        Ok(QueueOutcome::Duplicate(id)),
        "(from, msg_id) alone decides duplicates"
    );
    let pending = s.pending_messages(&user("bob"), 10).unwrap();
    assert_eq!(
        pending,
        vec![StoredMessage { id, msg: m.clone() }],
        "duplicate wrote nothing"
    );

    // Same msg_id from another sender is a different message.
    let other = queued(s, &msg("carol", "bob", 7, "hey"), 10);
    assert_ne!(other, id);
    // Duplicate is reported even when the mailbox is full (a retry is not a new message).
    assert_eq!(
        s.queue_message(&m, 2),
        Ok(QueueOutcome::Duplicate(id)),
        "duplicate before quota"
    );
    // Once deleted, the (from, msg_id) may be queued again.
    assert!(s.delete_message(&user("bob"), id).unwrap());
    let again = queued(s, &m, 10);
    assert!(again > other, "a re-queued message gets a fresh id");
}

fn queue_mailbox_full_writes_nothing(s: &mut dyn Store) {
    let id1 = queued(s, &msg("alice", "bob", 1, "one"), 2);
    let _id2 = queued(s, &msg("carol", "bob", 1, "two"), 2);
    let third = msg("alice", "bob", 3, "three");
    assert_eq!(
        s.queue_message(&third, 2),
        Ok(QueueOutcome::MailboxFull),
        "a third message with quota 2 must be MailboxFull"
    );
    assert_eq!(
        s.pending_messages(&user("bob"), 10).unwrap().len(),
        2,
        "MailboxFull wrote nothing"
    );
    assert_eq!(
        s.queue_message(&third, 0),
        Ok(QueueOutcome::MailboxFull),
        "quota 0"
    );
    // The quota is per recipient.
    queued(s, &msg("alice", "carol", 4, "for carol"), 2);
    // After a delivery there is room again, and the refused message was not remembered.
    assert!(s.delete_message(&user("bob"), id1).unwrap());
    let id3 = queued(s, &third, 2);
    let pending = s.pending_messages(&user("bob"), 10).unwrap();
    assert_eq!(pending.len(), 2);
    assert_eq!(
        pending[1],
        StoredMessage {
            id: id3,
            msg: third
        }
    );
}

fn pending_oldest_first_bounded(s: &mut dyn Store) {
    let bob = user("bob");
    assert!(
        s.pending_messages(&bob, 10).unwrap().is_empty(),
        "empty mailbox"
    );
    let mut expected = Vec::new();
    for i in 0..6u64 {
        let from = ["alice", "carol", "dave"][(i % 3) as usize];
        let m = msg(from, "bob", 100 - i, &format!("text {i} ünïcode ✓"));
        let id = queued(s, &m, 100);
        expected.push(StoredMessage { id, msg: m });
        queued(s, &msg("bob", "alice", i, "noise"), 100);
    }
    assert_eq!(
        s.pending_messages(&bob, 100).unwrap(),
        expected,
        "all, oldest first, exact fields"
    );
    assert_eq!(
        s.pending_messages(&bob, 4).unwrap(),
        expected[..4].to_vec(),
        "bounded by limit"
    );
    assert!(s.pending_messages(&bob, 0).unwrap().is_empty(), "limit 0");
    assert!(s.pending_messages(&user("nobody"), 10).unwrap().is_empty());
}

fn delete_message_true_then_false(s: &mut dyn Store) {
    let bob = user("bob");
    let id = queued(s, &msg("alice", "bob", 1, "hi"), 10);
    assert!(
        s.delete_message(&bob, id).unwrap(),
        "first delete returns true"
    );
    assert!(
        !s.delete_message(&bob, id).unwrap(),
        "second delete returns false"
    );
    assert!(
        s.pending_messages(&bob, 10).unwrap().is_empty(),
        "deleted message is gone"
    );
    assert!(
        !s.delete_message(&bob, id + 1000).unwrap(),
        "unknown id returns false"
    );
    assert!(
        !s.delete_message(&bob, u64::MAX).unwrap(),
        "huge id returns false"
    );
}

fn delete_is_per_recipient(s: &mut dyn Store) {
    let (bob, carol) = (user("bob"), user("carol"));
    let for_bob = queued(s, &msg("alice", "bob", 1, "for bob"), 10);
    let for_carol = queued(s, &msg("alice", "carol", 2, "for carol"), 10);
    assert!(
        !s.delete_message(&bob, for_carol).unwrap(),
        "deleting another user's message id must return false"
    );
    assert_eq!(
        s.pending_messages(&carol, 10).unwrap().len(),
        1,
        "carol's message untouched"
    );
    assert!(s.delete_message(&bob, for_bob).unwrap());
    let left = s.pending_messages(&carol, 10).unwrap();
    assert_eq!(
        left.len(),
        1,
        "deleting bob's message must not touch carol's"
    );
    assert_eq!(left[0].id, for_carol);
}
