//! Deterministic simulations of a fleet: several supernodes sharing one key, one authority
//! and one store, a fleet directory (user -> supernode) kept from their login and logout
//! events the way the glue keeps it, and node-to-node messages carried in order. Users homed
//! on different supernodes find each other, connect directly, call, and mail each other.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peerline_core::call::CallState;
use peerline_core::client::{Client, ClientConfig, ClientEvent, Command, CommandResult, Via};
use peerline_core::clock::WallClock;
use peerline_core::directory::MemoryDirectory;
use peerline_core::link::Transmit;
use peerline_core::memstore::MemoryStore;
use peerline_core::ops::execute;
use peerline_core::sim::Net;
use peerline_core::store::Store as _;
use peerline_core::supernode::{NodeDest, Supernode, SupernodeConfig, SupernodeEvent};
use peerline_crypto::{Authority, DeviceKeys};
use peerline_wire::msg::{ContactAction, ContactState, ErrorCode, Presence};
use peerline_wire::node::NodeMsg;
use peerline_wire::Username;
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

const UNIX_START_MS: u64 = 1_790_000_000_000;

fn sn_addr(n: usize) -> SocketAddr {
    format!("203.0.113.{}:7000", n + 1).parse().unwrap()
}

mod support;
use support::{user, Sim};

struct Fleet {
    now: Instant,
    t0: Instant,
    net: Net,
    nodes: Vec<Supernode>,
    /// Supernodes that were killed: not stepped, their datagrams lost.
    dead: HashSet<usize>,
    /// The shared directory: user -> supernode, from login and logout events.
    directory: HashMap<Username, usize>,
    sn_keys: DeviceKeys,
    authority_bytes: [u8; 32],
    store: MemoryStore,
    rng: ChaCha20Rng,
    clients: Vec<(SocketAddr, Client)>,
    /// Each client's device keys (to bring the same device back elsewhere).
    keys: Vec<DeviceKeys>,
    events: Vec<Vec<ClientEvent>>,
    /// Node-to-node messages carried, by kind.
    carried: Vec<&'static str>,
}

/// A supernode of the fleet (all share the Noise key and the authority).
fn make_node(
    cfg: SupernodeConfig,
    keys: &DeviceKeys,
    authority: &[u8; 32],
    seed: u8,
    now: Instant,
) -> Supernode {
    Supernode::new(
        cfg,
        keys.noise_private(),
        Authority::from_bytes(authority),
        [seed; 32],
        Box::new(MemoryDirectory::new()),
        WallClock::new(now, UNIX_START_MS),
        now,
    )
}

fn kind(m: &NodeMsg) -> &'static str {
    match m {
        NodeMsg::Presence { .. } => "presence",
        NodeMsg::Contact { .. } => "contact",
        NodeMsg::Connect { .. } => "connect",
        NodeMsg::Ring { .. } => "ring",
        NodeMsg::Signal { .. } => "signal",
        NodeMsg::Mail { .. } => "mail",
        NodeMsg::Kick { .. } => "kick",
        NodeMsg::Answer { .. } => "answer",
        NodeMsg::Recheck { .. } => "recheck",
    }
}

impl Sim for Fleet {
    fn step(&mut self) {
        Fleet::step(self)
    }
    fn now(&self) -> Instant {
        self.now
    }
    fn client_mut(&mut self, i: usize) -> &mut Client {
        &mut self.clients[i].1
    }
    fn events(&self, i: usize) -> &[ClientEvent] {
        &self.events[i]
    }
}

impl Fleet {
    fn new(seed: u64, nodes: usize, net: Net) -> Self {
        let t0 = Instant::now();
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let sn_keys = DeviceKeys::generate(&mut rng);
        let authority = Authority::generate(&mut rng);
        let authority_bytes = authority.to_bytes();
        let nodes = (0..nodes)
            .map(|n| {
                let cfg = SupernodeConfig {
                    node_id: n as u32,
                    fleet: true,
                    ..SupernodeConfig::default()
                };
                make_node(cfg, &sn_keys, &authority_bytes, seed as u8 + n as u8, t0)
            })
            .collect();
        Fleet {
            now: t0,
            t0,
            net,
            nodes,
            dead: HashSet::new(),
            directory: HashMap::new(),
            sn_keys,
            authority_bytes,
            store: MemoryStore::new(),
            rng,
            clients: Vec::new(),
            keys: Vec::new(),
            events: Vec::new(),
            carried: Vec::new(),
        }
    }

    /// A new device whose supernode is `home`.
    fn add_client(&mut self, home: usize) -> usize {
        let keys = DeviceKeys::generate(&mut self.rng);
        self.add_device(home, keys, None)
    }

    /// Client `i`'s device stops and comes back as a new client on supernode `home`.
    fn move_client(&mut self, i: usize, home: usize, shutdown: bool) -> usize {
        let cert = self.clients[i].1.certificate().unwrap().to_bytes();
        if shutdown {
            let now = self.now;
            self.clients[i].1.shutdown(now);
            self.step();
        }
        let keys = self.keys[i].clone();
        self.add_device(home, keys, Some(cert))
    }

    fn add_device(&mut self, home: usize, keys: DeviceKeys, cert: Option<Vec<u8>>) -> usize {
        let i = self.clients.len();
        let addr: SocketAddr = format!("198.51.100.{}:{}", i + 10, 5000 + i)
            .parse()
            .unwrap();
        self.keys.push(keys.clone());
        let cfg = ClientConfig::new(
            sn_addr(home),
            self.sn_keys.noise_public(),
            Authority::from_bytes(&self.authority_bytes).public(),
        );
        let elapsed = self.now.duration_since(self.t0).as_millis() as u64;
        let mut c = Client::new(
            cfg,
            keys,
            cert.as_deref(),
            [i as u8 + 1; 32],
            WallClock::new(self.now, UNIX_START_MS + elapsed),
            self.now,
        );
        c.set_local_candidates(vec![addr]);
        c.connect(self.now);
        self.clients.push((addr, c));
        self.events.push(Vec::new());
        i
    }

    /// Kills supernode `n`: it stops, and the others learn it left (as the glue does when
    /// its membership entry expires).
    fn kill(&mut self, n: usize) {
        self.dead.insert(n);
        self.directory.retain(|_, home| *home != n);
        let now = self.now;
        for (m, sn) in self.nodes.iter_mut().enumerate() {
            if !self.dead.contains(&m) {
                sn.node_down(now, n as u32);
            }
        }
    }

    fn step(&mut self) {
        let now = self.now;
        for n in 0..self.nodes.len() {
            if self.dead.contains(&n) {
                continue;
            }
            loop {
                let mut progressed = false;
                while let Some((token, op)) = self.nodes[n].poll_op() {
                    let r = execute(&mut self.store, op, &mut self.rng);
                    self.nodes[n].handle_op_result(now, token, r);
                    progressed = true;
                }
                while let Some(e) = self.nodes[n].poll_event() {
                    match e {
                        SupernodeEvent::Login(u) => {
                            if let Some(old) = self.directory.insert(u.clone(), n) {
                                if old != n && !self.dead.contains(&old) {
                                    self.nodes[old].kick(now, &u);
                                }
                            }
                        }
                        SupernodeEvent::Logout(u) => {
                            if self.directory.get(&u) == Some(&n) {
                                self.directory.remove(&u);
                            }
                        }
                        SupernodeEvent::Registered(_) => {}
                    }
                    progressed = true;
                }
                while let Some(t) = self.nodes[n].poll_node_msg() {
                    progressed = true;
                    self.carried.push(kind(&t.msg));
                    let dest = match &t.to {
                        NodeDest::HomeOf(u) => self.directory.get(u).copied().filter(|d| *d != n),
                        NodeDest::Node(d) => Some(*d as usize),
                    };
                    match dest {
                        Some(d) if !self.dead.contains(&d) => {
                            self.nodes[d].handle_node_msg(now, n as u32, t.msg)
                        }
                        Some(_) => {}
                        None => self.nodes[n].node_unreachable(now, t.msg),
                    }
                }
                if !progressed {
                    break;
                }
            }
            while let Some(t) = self.nodes[n].poll_transmit() {
                self.net.send(now, sn_addr(n), t);
            }
        }
        for (i, (addr, c)) in self.clients.iter_mut().enumerate() {
            while let Some(t) = c.poll_transmit() {
                self.net.send(now, *addr, t);
            }
            while let Some(e) = c.poll_event() {
                if let ClientEvent::Message { token, .. } = &e {
                    c.message_saved(now, *token);
                }
                self.events[i].push(e);
            }
            while let Some(t) = c.poll_transmit() {
                self.net.send(now, *addr, t);
            }
        }
        for (from, Transmit { dst, payload }) in self.net.deliver(now) {
            if let Some(n) = (0..self.nodes.len()).find(|n| sn_addr(*n) == dst) {
                if !self.dead.contains(&n) {
                    self.nodes[n].handle_datagram(now, from, &payload);
                }
            } else if let Some(i) = self.clients.iter().position(|(a, _)| *a == dst) {
                self.clients[i].1.handle_datagram(now, from, &payload);
            }
        }
        self.now += Duration::from_millis(5);
        let now = self.now;
        for (n, sn) in self.nodes.iter_mut().enumerate() {
            if !self.dead.contains(&n) && sn.poll_timeout().is_some_and(|t| t <= now) {
                sn.handle_timeout(now);
            }
        }
        for (_, c) in self.clients.iter_mut() {
            if c.poll_timeout().is_some_and(|t| t <= now) {
                c.handle_timeout(now);
            }
        }
    }

    /// As [`Sim::befriend`], checking that the request crossed as a contact event.
    fn befriend_across(&mut self, a: usize, b: usize, bname: &str, aname: &str) {
        let add = Command::ContactAdd {
            user: user(bname),
            note: "hi".into(),
        };
        assert_eq!(self.command(a, add), CommandResult::Ok);
        // The request crosses supernodes as a contact event.
        assert!(self.saw(b, |e| matches!(e, ClientEvent::Contact { user: u, state: ContactState::Incoming, .. } if u.as_str() == aname)));
        let reply = Command::ContactReply {
            user: user(aname),
            action: ContactAction::Accept,
        };
        assert_eq!(self.command(b, reply), CommandResult::Ok);
    }

    fn last_presence(&self, i: usize, of: &str) -> Option<Presence> {
        self.events[i].iter().rev().find_map(|e| match e {
            ClientEvent::Presence { user: u, presence } if u.as_str() == of => Some(*presence),
            _ => None,
        })
    }

    fn wait_presence(&mut self, i: usize, of: &str, want: Presence) {
        let end = self.now + Duration::from_secs(20);
        while self.now < end {
            if self.last_presence(i, of) == Some(want) {
                return;
            }
            self.step();
        }
        panic!(
            "client {i} never saw {of} {want:?} (last {:?})",
            self.last_presence(i, of)
        );
    }

    fn messages(&self, i: usize) -> Vec<(String, Via)> {
        self.events[i]
            .iter()
            .filter_map(|e| match e {
                ClientEvent::Message { text, via, .. } => Some((text.clone(), *via)),
                _ => None,
            })
            .collect()
    }

    /// Client `i` sends `text` to `to`, which must go `via`; waits for the receiver `j`.
    fn send_via(&mut self, i: usize, j: usize, to: &str, text: &str, via: Via) {
        let r = self.command(
            i,
            Command::SendMessage {
                to: user(to),
                text: text.into(),
            },
        );
        assert!(
            matches!(r, CommandResult::Sent { via: v, .. } if v == via),
            "{text}: {r:?}"
        );
        assert!(self.saw_message(j, text), "{text} never arrived");
    }
}

/// Alice on supernode 0 and Bob on supernode 1, contacts who see each other online.
fn alice_and_bob(seed: u64, nodes: usize, net: Net) -> (Fleet, usize, usize) {
    let mut f = Fleet::new(seed, nodes, net);
    let a = f.add_client(0);
    let b = f.add_client(1);
    f.register(a, "alice");
    f.register(b, "bob");
    f.befriend_across(a, b, "bob", "alice");
    f.wait_presence(a, "bob", Presence::Online);
    f.wait_presence(b, "alice", Presence::Online);
    (f, a, b)
}

fn perfect() -> Net {
    Net::lossy(7, 0.0, 0.0, Duration::from_millis(10))
}

/// Alice on supernode 0 and bob on supernode 1: contact request, presence, a direct
/// session with messages both ways, and the signalling crossed supernodes to get there.
#[test]
fn users_on_different_supernodes_befriend_see_presence_and_message_directly() {
    let mut f = Fleet::new(1, 2, Net::lossy(11, 0.02, 0.01, Duration::from_millis(20)));
    let a = f.add_client(0);
    let b = f.add_client(1);
    f.register(a, "alice");
    f.register(b, "bob");
    assert_eq!(f.directory.get(&user("alice")), Some(&0));
    assert_eq!(f.directory.get(&user("bob")), Some(&1));
    f.befriend_across(a, b, "bob", "alice");
    assert!(f.saw(a, |e| matches!(e, ClientEvent::Contact { user: u, state: ContactState::Accepted, .. } if u.as_str() == "bob")));
    f.wait_presence(a, "bob", Presence::Online);
    f.wait_presence(b, "alice", Presence::Online);

    f.send_via(a, b, "bob", "hello across supernodes", Via::Direct);
    f.send_via(b, a, "alice", "hi back", Via::Direct);
    assert!(f.carried.contains(&"connect") && f.carried.contains(&"answer"));
    assert!(f.carried.contains(&"contact") && f.carried.contains(&"presence"));

    // Presence changes cross too.
    assert_eq!(
        f.command(b, Command::SetPresence(Presence::Away)),
        CommandResult::Ok
    );
    f.wait_presence(a, "bob", Presence::Away);
}

/// A user logging in later learns the presence of contacts online on other supernodes
/// (the login's one-message exchange asks back).
#[test]
fn a_later_login_learns_remote_contacts_presence() {
    let (mut f, a, b) = alice_and_bob(2, 3, perfect());
    // Bob's device goes away and comes back on supernode 2.
    let now = f.now;
    f.clients[b].1.shutdown(now);
    f.run_for(Duration::from_millis(200));
    f.wait_presence(a, "bob", Presence::Offline);
    let i = f.move_client(b, 2, false);
    f.wait_presence(a, "bob", Presence::Online);
    f.wait_presence(i, "alice", Presence::Online);
    assert_eq!(f.directory.get(&user("bob")), Some(&2));
}

/// A call between users on different supernodes: ring, answer, active over a direct
/// session, hang-up seen by the other side.
#[test]
fn a_call_rings_across_supernodes() {
    let mut f = Fleet::new(3, 2, perfect());
    let a = f.add_client(0);
    let b = f.add_client(1);
    f.register(a, "alice");
    f.register(b, "bob");
    f.befriend_across(a, b, "bob", "alice");
    let call = match f.command(a, Command::CallStart { user: user("bob") }) {
        CommandResult::Call { call_id } => call_id,
        other => panic!("not ringing: {other:?}"),
    };
    assert!(f.saw(
        b,
        |e| matches!(e, ClientEvent::Call(c) if c.state == CallState::Incoming && c.call_id == call)
    ));
    let r = f.command(
        b,
        Command::CallAnswer {
            call_id: call,
            accept: true,
        },
    );
    assert_eq!(r, CommandResult::Ok);
    let ca = f.wait_call(a, call, CallState::Active);
    let cb = f.wait_call(b, call, CallState::Active);
    assert_eq!(ca.via, Some(Via::Direct));
    assert_eq!(cb.via, Some(Via::Direct));
    assert_eq!(
        f.command(b, Command::CallHangUp { call_id: call }),
        CommandResult::Ok
    );
    f.wait_call(a, call, CallState::Ended);
    assert!(f.carried.contains(&"ring") && f.carried.contains(&"signal"));
}

/// Strangers are refused the same way whether the callee is online on another supernode
/// or does not exist; a contact that is offline everywhere reads "offline".
#[test]
fn cross_supernode_refusals_leak_nothing() {
    let mut f = Fleet::new(4, 2, perfect());
    let a = f.add_client(0);
    let b = f.add_client(1);
    let c = f.add_client(0);
    f.register(a, "alice");
    f.register(b, "bob");
    f.register(c, "carol");
    let online = f.command(a, Command::CallStart { user: user("bob") });
    let absent = f.command(
        a,
        Command::CallStart {
            user: user("nobody"),
        },
    );
    let code = |r: &CommandResult| match r {
        CommandResult::Error { code, .. } => *code,
        other => panic!("not refused: {other:?}"),
    };
    assert_eq!(code(&online), ErrorCode::NotContact);
    assert_eq!(code(&absent), ErrorCode::NotContact);
    // Carol befriends bob, bob goes away: carol's call reads offline.
    f.befriend_across(c, b, "bob", "carol");
    let now = f.now;
    f.clients[b].1.shutdown(now);
    f.wait_presence(c, "bob", Presence::Offline);
    let r = f.command(c, Command::CallStart { user: user("bob") });
    assert_eq!(code(&r), ErrorCode::Offline);
}

/// A message to a contact who is invisible on another supernode goes to the mailbox, and
/// their supernode is told to deliver it at once.
#[test]
fn mail_for_a_user_on_another_supernode_is_delivered_at_once() {
    let mut f = Fleet::new(5, 2, perfect());
    let a = f.add_client(0);
    let b = f.add_client(1);
    f.register(a, "alice");
    f.register(b, "bob");
    f.befriend_across(a, b, "bob", "alice");
    assert_eq!(
        f.command(b, Command::SetPresence(Presence::Invisible)),
        CommandResult::Ok
    );
    f.wait_presence(a, "bob", Presence::Offline);
    f.send_via(a, b, "bob", "to the mailbox", Via::Offline);
    assert!(f.carried.contains(&"mail"));
    assert_eq!(f.messages(b).len(), 1);
}

/// When a supernode dies, contacts elsewhere see its users go offline; when they log in
/// again elsewhere, online again.
#[test]
fn a_dead_supernodes_users_turn_offline_then_online_elsewhere() {
    let (mut f, a, b) = alice_and_bob(6, 2, perfect());
    f.kill(1);
    f.wait_presence(a, "bob", Presence::Offline);
    let nb = f.move_client(b, 0, false);
    f.wait_presence(a, "bob", Presence::Online);
    f.wait_presence(nb, "alice", Presence::Online);
}

/// Logging in on a second supernode drops the session on the first, without an
/// "offline" blip for contacts.
#[test]
fn a_login_elsewhere_kicks_the_old_session_quietly() {
    let (mut f, a, b) = alice_and_bob(7, 3, perfect());
    f.move_client(b, 2, false);
    let seen_before = f.events[a].len();
    f.run_for(Duration::from_secs(3));
    assert_eq!(f.directory.get(&user("bob")), Some(&2));
    assert_eq!(f.nodes[1].online_count(), 0, "the old session was dropped");
    let blips = f.events[a][seen_before..]
        .iter()
        .filter(|e| {
            matches!(
                e,
                ClientEvent::Presence {
                    presence: Presence::Offline,
                    ..
                }
            )
        })
        .count();
    assert_eq!(blips, 0, "contacts saw no offline blip");
}

/// An operator revokes bob's device with the data dir of a supernode bob is not on: the
/// recheck goes to bob's supernode, which logs him out (alice sees him go offline) and
/// tells his device why.
#[test]
fn a_device_revoked_elsewhere_in_the_fleet_is_logged_out_on_its_supernode() {
    let (mut f, a, b) = alice_and_bob(8, 2, perfect());
    let key = f.keys[b].noise_public();
    f.store.revoke_device(&key).unwrap();
    assert!(
        !f.nodes[0].recheck_device(&user("bob"), &key),
        "bob is not on 0"
    );
    f.run_for(Duration::from_secs(2));
    assert!(f.carried.contains(&"recheck"));
    assert_eq!(f.nodes[1].online_count(), 0, "bob was logged out on 1");
    f.wait_presence(a, "bob", Presence::Offline);
    assert!(f.saw(
        b,
        |e| matches!(e, ClientEvent::Offline { reason } if reason.contains("revoked"))
    ));
}

/// Supernodes hand their users the others' addresses (paced, on a change), so a user
/// logged in before the fleet grew still learns where to go.
#[test]
fn users_learn_the_other_supernodes() {
    let mut f = Fleet::new(8, 2, perfect());
    let a = f.add_client(0);
    f.register(a, "alice");
    assert_eq!(f.clients[a].1.hosts(), &[sn_addr(0)]);
    let now = f.now;
    f.nodes[0].set_hosts(now, vec![sn_addr(1)]);
    assert!(f.saw(
        a,
        |e| matches!(e, ClientEvent::Hosts(h) if h == &vec![sn_addr(1)])
    ));
    assert_eq!(f.clients[a].1.hosts(), &[sn_addr(0), sn_addr(1)]);
}

/// A full supernode of a fleet refuses a login with `Full` instead of dropping it, and the
/// client goes on to the next supernode it knows.
#[test]
fn a_full_supernode_sends_new_logins_elsewhere() {
    let mut f = Fleet::new(9, 2, perfect());
    let a = f.add_client(0);
    f.register(a, "alice");
    let b = f.add_client(1);
    f.register(b, "bob");
    // Supernode 0 is now full; it knows supernode 1.
    let now = f.now;
    f.nodes[0] = {
        let cfg = SupernodeConfig {
            node_id: 0,
            fleet: true,
            max_sessions: 0,
            ..SupernodeConfig::default()
        };
        let mut sn = make_node(cfg, &f.sn_keys, &f.authority_bytes, 90, now);
        sn.set_hosts(now, vec![sn_addr(1)]);
        sn
    };
    // Bob's device comes back with supernode 0 as its bootstrap and 1 in its cache.
    let nb = f.move_client(b, 0, true);
    f.clients[nb].1.add_hosts(&[sn_addr(1)]);
    f.run_for(Duration::from_secs(5));
    assert!(f.clients[nb].1.is_online());
    assert_eq!(f.clients[nb].1.supernode(), sn_addr(1));
    assert_eq!(f.nodes[0].online_count(), 0);
    assert!(
        f.nodes[0].stats().rejects_sent >= 1,
        "refused with a reject, not dropped"
    );
}

/// Draining: every user is sent to another supernode at once, new logins are refused, and
/// the users end up online elsewhere, still able to reach each other.
#[test]
fn a_draining_supernode_moves_its_users() {
    let mut f = Fleet::new(10, 2, perfect());
    let a = f.add_client(0);
    let b = f.add_client(0);
    f.register(a, "alice");
    f.register(b, "bob");
    f.befriend_across(a, b, "bob", "alice");
    let now = f.now;
    f.nodes[0].set_hosts(now, vec![sn_addr(1)]);
    f.run_for(Duration::from_millis(500));
    let now = f.now;
    assert_eq!(f.nodes[0].drain(now), 2);
    f.run_for(Duration::from_secs(3));
    assert_eq!(f.nodes[0].online_count(), 0);
    assert_eq!(f.nodes[1].online_count(), 2);
    for i in [a, b] {
        assert!(f.clients[i].1.is_online());
        assert_eq!(f.clients[i].1.supernode(), sn_addr(1));
    }
    f.wait_presence(a, "bob", Presence::Online);
    // A new device trying the draining supernode is refused (and has nowhere else to go).
    let c = f.add_client(0);
    f.run_for(Duration::from_secs(2));
    assert!(!f.clients[c].1.is_online());
    assert!(f.nodes[0].stats().rejects_sent >= 1);
}
