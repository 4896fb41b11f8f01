//! The behaviour every [`FleetDirectory`] backend must show, as one generic async function
//! per behaviour. Each backend's tests run all of them through a [`Harness`] (see
//! `tests/conformance.rs`); a failed expectation panics with what went wrong.
//!
//! The functions wait only through [`Harness::wait`], which advances a virtual clock for
//! the in-memory backend and really sleeps for Redis, so the TTLs in
//! [`Harness::config`] should be short (seconds) for a real backend.

use std::net::SocketAddr;
use std::time::Duration;

use async_trait::async_trait;

use crate::{FleetConfig, FleetDirectory, FleetLocation, Member, Username};

/// One backend under test: two handles on the same shared directory (as two supernodes
/// would hold) and a way to let time pass.
#[async_trait]
pub trait Harness: Send + Sync {
    /// The backend.
    type Dir: FleetDirectory;
    /// The first handle.
    fn a(&self) -> &Self::Dir;
    /// A second, independent handle on the same directory.
    fn b(&self) -> &Self::Dir;
    /// The TTLs both handles use.
    fn config(&self) -> &FleetConfig;
    /// Lets `d` pass.
    async fn wait(&self, d: Duration);
}

fn user(name: &str) -> Username {
    // Test names are literals that satisfy the username rules.
    Username::parse(name).expect("test usernames are valid")
}

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A member record for node `id` in `epoch`.
pub fn member(id: u32, epoch: u64) -> Member {
    Member {
        id,
        epoch,
        client_addr: addr(7000 + (id % 1000) as u16),
        fleet_addr: addr(8000 + (id % 1000) as u16),
        online: 0,
        capacity: 1_000_000,
        draining: false,
    }
}

fn at(node: u32, epoch: u64) -> FleetLocation {
    FleetLocation { node, epoch }
}

/// Waits `total`, re-announcing `alive` often enough that they never expire meanwhile.
async fn wait_announcing<H: Harness>(h: &H, total: Duration, alive: &[Member]) {
    let step = (h.config().member_ttl / 3).max(Duration::from_millis(10));
    let mut left = total;
    while !left.is_zero() {
        let d = step.min(left);
        h.wait(d).await;
        left -= d;
        for m in alive {
            h.a().announce(m).await.expect("announce");
        }
    }
}

/// Past the point where a change of membership is visible to every handle.
fn membership_settles(c: &FleetConfig) -> Duration {
    c.member_ttl + c.member_cache + Duration::from_millis(300)
}

/// Claim, lookup, and release only if still ours.
pub async fn claim_lookup_release<H: Harness>(h: &H) {
    let (a, b) = (h.a(), h.b());
    a.announce(&member(1, 10)).await.expect("announce");
    let alice = user("alice");
    assert_eq!(a.claim(&alice, at(1, 10)).await.expect("claim"), None);
    assert_eq!(a.lookup(&alice).await.expect("lookup"), Some(at(1, 10)));
    assert_eq!(b.lookup(&alice).await.expect("lookup"), Some(at(1, 10)));
    assert!(
        !a.release(&alice, at(1, 11)).await.expect("release"),
        "released another epoch's entry"
    );
    assert!(
        !a.release(&alice, at(2, 10)).await.expect("release"),
        "released another node's entry"
    );
    assert_eq!(b.lookup(&alice).await.expect("lookup"), Some(at(1, 10)));
    assert!(a.release(&alice, at(1, 10)).await.expect("release"));
    assert_eq!(b.lookup(&alice).await.expect("lookup"), None);
    assert!(
        !a.release(&alice, at(1, 10)).await.expect("release"),
        "released twice"
    );
    assert_eq!(a.lookup(&user("nobody")).await.expect("lookup"), None);
}

/// A newer claim takes the user, names the previous home, and survives the old home's
/// release and refresh.
pub async fn newer_claim_wins<H: Harness>(h: &H) {
    let (a, b) = (h.a(), h.b());
    a.announce(&member(1, 10)).await.expect("announce");
    b.announce(&member(2, 20)).await.expect("announce");
    let bob = user("bob");
    assert_eq!(a.claim(&bob, at(1, 10)).await.expect("claim"), None);
    assert_eq!(
        b.claim(&bob, at(2, 20)).await.expect("claim"),
        Some(at(1, 10))
    );
    assert_eq!(a.lookup(&bob).await.expect("lookup"), Some(at(2, 20)));
    assert!(!a.release(&bob, at(1, 10)).await.expect("release"));
    assert_eq!(
        a.refresh(&[(bob.clone(), at(1, 10))])
            .await
            .expect("refresh"),
        vec![false]
    );
    assert_eq!(b.lookup(&bob).await.expect("lookup"), Some(at(2, 20)));
    assert_eq!(
        b.refresh(&[(bob.clone(), at(2, 20))])
            .await
            .expect("refresh"),
        vec![true]
    );
    // Re-login on the same node: the previous value is its own.
    assert_eq!(
        b.claim(&bob, at(2, 20)).await.expect("claim"),
        Some(at(2, 20))
    );
}

/// lookup_many answers in order, like lookup, across nodes, absent users and dead nodes.
pub async fn batch_lookup<H: Harness>(h: &H) {
    let (a, b) = (h.a(), h.b());
    a.announce(&member(1, 10)).await.expect("announce");
    b.announce(&member(2, 20)).await.expect("announce");
    let users: Vec<Username> = (0..60).map(|i| user(&format!("batch{i:02}"))).collect();
    let mut want = Vec::new();
    for (i, u) in users.iter().enumerate() {
        let w = match i % 4 {
            0 => {
                a.claim(u, at(1, 10)).await.expect("claim");
                Some(at(1, 10))
            }
            1 => {
                b.claim(u, at(2, 20)).await.expect("claim");
                Some(at(2, 20))
            }
            // On node 3, which never announced itself: does not resolve.
            2 => {
                a.claim(u, at(3, 30)).await.expect("claim");
                None
            }
            _ => None,
        };
        want.push(w);
    }
    assert_eq!(a.lookup_many(&users).await.expect("lookup_many"), want);
    assert_eq!(b.lookup_many(&users).await.expect("lookup_many"), want);
    for (u, w) in users.iter().zip(&want).take(8) {
        assert_eq!(b.lookup(u).await.expect("lookup"), *w, "{u}");
    }
    assert!(a.lookup_many(&[]).await.expect("empty batch").is_empty());
    // Duplicates are answered as often as asked.
    let dup = vec![users[0].clone(), users[0].clone()];
    assert_eq!(
        a.lookup_many(&dup).await.expect("lookup_many"),
        vec![want[0], want[0]]
    );
}

/// Refreshed entries outlive their TTL; unrefreshed ones expire; a vanished entry is
/// re-created by its owner's refresh.
pub async fn refresh_keeps_entries_alive<H: Harness>(h: &H) {
    let a = h.a();
    let m = member(1, 10);
    a.announce(&m).await.expect("announce");
    let (kept, dropped) = (user("kept"), user("dropped"));
    a.claim(&kept, at(1, 10)).await.expect("claim");
    a.claim(&dropped, at(1, 10)).await.expect("claim");
    let ttl = h.config().location_ttl;
    for _ in 0..3 {
        wait_announcing(h, ttl / 2, std::slice::from_ref(&m)).await;
        let r = a
            .refresh(&[(kept.clone(), at(1, 10))])
            .await
            .expect("refresh");
        assert_eq!(r, vec![true]);
    }
    // 1.5 TTL after the claims: only the refreshed entry is left.
    assert_eq!(a.lookup(&kept).await.expect("lookup"), Some(at(1, 10)));
    assert_eq!(a.lookup(&dropped).await.expect("lookup"), None);
    assert_eq!(
        a.refresh(&[(dropped.clone(), at(1, 10))])
            .await
            .expect("refresh"),
        vec![true]
    );
    assert_eq!(a.lookup(&dropped).await.expect("lookup"), Some(at(1, 10)));
}

/// A node that stops announcing drops out of the members, and its users stop resolving
/// long before their entries expire; when it comes back, they resolve again.
pub async fn member_expiry_hides_dead_node<H: Harness>(h: &H) {
    let (a, b) = (h.a(), h.b());
    let (m1, m2) = (member(1, 10), member(2, 20));
    a.announce(&m1).await.expect("announce");
    b.announce(&m2).await.expect("announce");
    let (on1, on2) = (user("on-one"), user("on-two"));
    a.claim(&on1, at(1, 10)).await.expect("claim");
    b.claim(&on2, at(2, 20)).await.expect("claim");
    assert_eq!(a.lookup(&on2).await.expect("lookup"), Some(at(2, 20)));
    let ids: Vec<u32> = a
        .members()
        .await
        .expect("members")
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, vec![1, 2]);
    // Node 2 dies: only node 1 keeps announcing.
    wait_announcing(h, membership_settles(h.config()), std::slice::from_ref(&m1)).await;
    assert_eq!(
        a.lookup(&on2).await.expect("lookup"),
        None,
        "dead node's user resolves"
    );
    assert_eq!(a.lookup(&on1).await.expect("lookup"), Some(at(1, 10)));
    assert_eq!(
        a.lookup_many(&[on1.clone(), on2.clone()])
            .await
            .expect("lookup_many"),
        vec![Some(at(1, 10)), None]
    );
    let ids: Vec<u32> = b
        .members()
        .await
        .expect("members")
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, vec![1]);
    // It comes back in the same epoch (a network partition healed).
    b.announce(&m2).await.expect("announce");
    h.wait(h.config().member_cache + Duration::from_millis(100))
        .await;
    a.announce(&m1).await.expect("announce");
    assert_eq!(a.lookup(&on2).await.expect("lookup"), Some(at(2, 20)));
}

/// A restarted node (new epoch) hides its previous epoch's users; new claims resolve.
pub async fn epoch_change_hides_old_users<H: Harness>(h: &H) {
    let (a, b) = (h.a(), h.b());
    a.announce(&member(1, 10)).await.expect("announce");
    let old = user("old-session");
    a.claim(&old, at(1, 10)).await.expect("claim");
    assert_eq!(b.lookup(&old).await.expect("lookup"), Some(at(1, 10)));
    // Restart: same id, new epoch.
    a.announce(&member(1, 11)).await.expect("announce");
    h.wait(h.config().member_cache + Duration::from_millis(100))
        .await;
    a.announce(&member(1, 11)).await.expect("announce");
    assert_eq!(
        b.lookup(&old).await.expect("lookup"),
        None,
        "old epoch's user resolves"
    );
    assert_eq!(
        a.lookup(&old).await.expect("lookup"),
        None,
        "old epoch's user resolves"
    );
    let members = b.members().await.expect("members");
    assert_eq!(
        members.iter().map(|m| (m.id, m.epoch)).collect::<Vec<_>>(),
        vec![(1, 11)]
    );
    let new = user("new-session");
    a.claim(&new, at(1, 11)).await.expect("claim");
    assert_eq!(b.lookup(&new).await.expect("lookup"), Some(at(1, 11)));
    // The old entry still names the old epoch: the new home of `old` learns it on claim.
    assert_eq!(
        a.claim(&old, at(1, 11)).await.expect("claim"),
        Some(at(1, 10))
    );
}

/// The draining flag is published; a draining node's users still resolve.
pub async fn draining_flag<H: Harness>(h: &H) {
    let (a, b) = (h.a(), h.b());
    let mut m = member(4, 40);
    m.online = 1234;
    a.announce(&m).await.expect("announce");
    let u = user("drainee");
    a.claim(&u, at(4, 40)).await.expect("claim");
    m.draining = true;
    a.announce(&m).await.expect("announce");
    let seen = b.members().await.expect("members");
    assert_eq!(
        seen,
        vec![m.clone()],
        "members() must return the record as announced"
    );
    assert!(seen[0].draining);
    assert_eq!(b.lookup(&u).await.expect("lookup"), Some(at(4, 40)));
    m.draining = false;
    a.announce(&m).await.expect("announce");
    assert!(!b.members().await.expect("members")[0].draining);
}

/// Withdraw removes a node at once; its users stop resolving; others are untouched.
pub async fn withdraw_removes_member<H: Harness>(h: &H) {
    let (a, b) = (h.a(), h.b());
    a.announce(&member(5, 50)).await.expect("announce");
    b.announce(&member(6, 60)).await.expect("announce");
    let (u5, u6) = (user("on-five"), user("on-six"));
    a.claim(&u5, at(5, 50)).await.expect("claim");
    b.claim(&u6, at(6, 60)).await.expect("claim");
    assert_eq!(a.lookup(&u5).await.expect("lookup"), Some(at(5, 50)));
    a.withdraw(5).await.expect("withdraw");
    assert_eq!(
        a.lookup(&u5).await.expect("lookup"),
        None,
        "withdrawn node's user resolves"
    );
    let ids: Vec<u32> = b
        .members()
        .await
        .expect("members")
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(ids, vec![6]);
    h.wait(h.config().member_cache + Duration::from_millis(100))
        .await;
    assert_eq!(b.lookup(&u5).await.expect("lookup"), None);
    assert_eq!(b.lookup(&u6).await.expect("lookup"), Some(at(6, 60)));
    // Withdrawing an unknown node is not an error.
    a.withdraw(999).await.expect("withdraw unknown");
}

/// A supernode that joined after another handle read the member list is routable through
/// that handle at once, not only once its cached list expires (users log in on a new
/// supernode within a second of its start).
pub async fn a_new_member_is_routable_at_once<H: Harness>(h: &H) {
    let (a, b) = (h.a(), h.b());
    a.announce(&member(1, 10)).await.expect("announce");
    // b reads (and caches) the list while only supernode 1 is in it.
    assert_eq!(b.members().await.expect("members").len(), 1);
    a.announce(&member(2, 20)).await.expect("announce");
    let carol = user("carol");
    let dave = user("dave");
    a.claim(&carol, at(2, 20)).await.expect("claim");
    a.claim(&dave, at(2, 20)).await.expect("claim");
    h.wait(Duration::from_millis(150)).await;
    assert_eq!(b.lookup(&carol).await.expect("lookup"), Some(at(2, 20)));
    assert_eq!(
        b.lookup_many(&[dave.clone(), user("nobody")])
            .await
            .expect("lookup_many"),
        vec![Some(at(2, 20)), None]
    );
}
