//! Fleet glue for a supernode: keeps the shared directory in step with the core's logins,
//! carries the core's node-to-node messages, and watches the membership.
//!
//! It runs as its own task beside the supernode loop, so directory round trips never
//! stall datagram handling; the two talk over bounded channels. Messages to one user are
//! routed in the order the core emitted them (a contact event before the presence that
//! follows it).

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peerline_core::supernode::{NodeDest, NodeTransmit};
use peerline_fleet::{FleetDirectory, FleetLocation, Member};
use peerline_wire::node::NodeMsg;
use peerline_wire::Username;
use tokio::sync::mpsc;

use crate::fleet_link::{FleetLink, FleetLinkConfig, Incoming};

/// How a supernode joins a fleet.
pub struct FleetRuntime {
    /// The shared directory (Redis Cluster in production).
    pub directory: Arc<dyn FleetDirectory>,
    /// This supernode's id, unique in the fleet.
    pub node_id: u32,
    /// Node-to-node TCP address to listen on.
    pub listen: SocketAddr,
    /// The node-to-node address other supernodes use (`listen` unless it is a wildcard).
    pub advertise: Option<SocketAddr>,
    /// The UDP address clients use to reach this supernode.
    pub client_addr: SocketAddr,
    /// Pre-shared key of the node-to-node channel (derived from the fleet's secret).
    pub psk: [u8; 32],
    /// Users this supernode accepts at most (for load-aware placement).
    pub capacity: u32,
}

/// From the supernode loop to the fleet task.
#[derive(Debug)]
pub(crate) enum ToFleet {
    Login(Username),
    Logout(Username),
    Out(NodeTransmit),
    Load { online: u32, draining: bool },
}

/// From the fleet task to the supernode loop.
#[derive(Debug)]
pub(crate) enum FromFleet {
    Msg { from: u32, msg: NodeMsg },
    Unreachable(NodeMsg),
    NodeDown(u32),
    Hosts(Vec<SocketAddr>),
    Kick(Username),
}

/// Counters for metrics, shared with the supernode loop.
#[derive(Debug, Default)]
pub(crate) struct FleetCounters {
    pub routed: std::sync::atomic::AtomicU64,
    pub unreachable: std::sync::atomic::AtomicU64,
    pub received: std::sync::atomic::AtomicU64,
    pub bad_msgs: std::sync::atomic::AtomicU64,
    pub directory_errors: std::sync::atomic::AtomicU64,
    pub members: std::sync::atomic::AtomicU64,
}

/// The supernode loop's end of the fleet task.
pub(crate) struct FleetHandle {
    pub tx: mpsc::Sender<ToFleet>,
    pub rx: mpsc::Receiver<FromFleet>,
    pub counters: Arc<FleetCounters>,
    pub node_id: u32,
    pub epoch: u64,
    directory: Arc<dyn FleetDirectory>,
    task: tokio::task::JoinHandle<()>,
    link: FleetLink,
}

/// Messages queued from the loop to the fleet task at most (beyond: dropped and counted;
/// a forwarded setup then times out in the core).
const TO_FLEET_QUEUE: usize = 65_536;
/// Membership is re-read and this node re-announced this often.
const ANNOUNCE_EVERY: Duration = Duration::from_secs(1);
/// Commands taken from the queue at once (their lookups go out as one batch).
const BATCH: usize = 256;
/// Locations refreshed per directory batch.
const REFRESH_BATCH: usize = 1000;

impl FleetHandle {
    /// Binds the node-to-node channel and starts the fleet task.
    pub(crate) async fn start(rt: FleetRuntime) -> std::io::Result<FleetHandle> {
        // Unique per process: a restarted supernode's old locations stop resolving.
        let epoch = crate::unix_ms_now();
        let (link, link_rx) = FleetLink::bind(FleetLinkConfig {
            listen: rt.listen,
            psk: rt.psk,
            node_id: rt.node_id,
            epoch,
        })
        .await?;
        let fleet_addr = rt.advertise.unwrap_or_else(|| link.local_addr());
        tracing::info!(node = rt.node_id, listen = %link.local_addr(), "fleet channel listening");
        let (tx, to_rx) = mpsc::channel(TO_FLEET_QUEUE);
        let (from_tx, rx) = mpsc::channel(TO_FLEET_QUEUE);
        let counters = Arc::new(FleetCounters::default());
        let agent = Agent {
            dir: rt.directory.clone(),
            link: link.clone(),
            me: FleetLocation {
                node: rt.node_id,
                epoch,
            },
            member: Member {
                id: rt.node_id,
                epoch,
                client_addr: rt.client_addr,
                fleet_addr,
                online: 0,
                capacity: rt.capacity,
                draining: false,
            },
            members: HashMap::new(),
            users: HashSet::new(),
            out: from_tx,
            counters: counters.clone(),
        };
        let task = tokio::spawn(agent.run(to_rx, link_rx));
        Ok(FleetHandle {
            tx,
            rx,
            counters,
            node_id: rt.node_id,
            epoch,
            directory: rt.directory,
            task,
            link,
        })
    }

    /// Queues `m` for the fleet task; counts it when the queue is full.
    pub(crate) fn send(&self, m: ToFleet) {
        if self.tx.try_send(m).is_err() {
            self.counters
                .unreachable
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Leaves the fleet: stops the task and withdraws this supernode's membership, so its
    /// users stop resolving here at once.
    pub(crate) async fn leave(self) {
        self.task.abort();
        if let Err(e) = self.directory.withdraw(self.node_id).await {
            tracing::warn!(error = %e, "could not withdraw from the fleet directory");
        }
    }
}

struct Agent {
    dir: Arc<dyn FleetDirectory>,
    link: FleetLink,
    me: FleetLocation,
    member: Member,
    /// Live members by id, as last read (this one included).
    members: HashMap<u32, Member>,
    /// Users online here (for location refreshes).
    users: HashSet<Username>,
    out: mpsc::Sender<FromFleet>,
    counters: Arc<FleetCounters>,
}

impl Agent {
    async fn run(mut self, mut rx: mpsc::Receiver<ToFleet>, mut link_rx: mpsc::Receiver<Incoming>) {
        let mut tick = tokio::time::interval(ANNOUNCE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // Refresh every location well within its TTL (a third of the default 10 minutes).
        let refresh_every = Duration::from_secs(200);
        let mut next_refresh = Instant::now() + refresh_every;
        loop {
            tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => {
                        // Take what else is queued, so its lookups go out as one batch.
                        let mut batch = vec![m];
                        while batch.len() < BATCH {
                            match rx.try_recv() {
                                Ok(m) => batch.push(m),
                                Err(_) => break,
                            }
                        }
                        self.on_batch(batch).await;
                    }
                    None => return,
                },
                Some(inc) = link_rx.recv() => self.on_incoming(inc).await,
                _ = tick.tick() => {
                    self.membership().await;
                    if Instant::now() >= next_refresh {
                        next_refresh = Instant::now() + refresh_every;
                        self.refresh().await;
                    }
                }
            }
        }
    }

    fn count(&self, c: &std::sync::atomic::AtomicU64) {
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Handles commands in order; the homes of every user they route to are looked up
    /// first, in one batch (the users are online elsewhere, so this supernode's own claims
    /// in the batch do not change them).
    async fn on_batch(&mut self, batch: Vec<ToFleet>) {
        let mut users: Vec<Username> = batch
            .iter()
            .filter_map(|m| match m {
                ToFleet::Out(NodeTransmit {
                    to: NodeDest::HomeOf(u),
                    ..
                }) => Some(u.clone()),
                _ => None,
            })
            .collect();
        users.sort_unstable_by(|a, b| a.as_str().cmp(b.as_str()));
        users.dedup();
        let homes: HashMap<Username, Option<u32>> = if users.is_empty() {
            HashMap::new()
        } else {
            match self.dir.lookup_many(&users).await {
                Ok(locs) => users
                    .into_iter()
                    .zip(locs)
                    .map(|(u, l)| (u, l.map(|l| l.node)))
                    .collect(),
                Err(e) => {
                    self.count(&self.counters.directory_errors);
                    tracing::warn!(error = %e, "fleet directory: lookup failed");
                    HashMap::new()
                }
            }
        };
        for m in batch {
            self.on_cmd(m, &homes).await;
        }
    }

    /// The supernode `to` names: from `homes` (a batch's lookups), else looked up now.
    async fn home(&self, to: &NodeDest, homes: &HashMap<Username, Option<u32>>) -> Option<u32> {
        match to {
            NodeDest::Node(n) => Some(*n),
            NodeDest::HomeOf(u) => match homes.get(u) {
                Some(n) => *n,
                None => match self.dir.lookup(u).await {
                    Ok(loc) => loc.map(|l| l.node),
                    Err(e) => {
                        self.count(&self.counters.directory_errors);
                        tracing::warn!(error = %e, "fleet directory: lookup failed");
                        None
                    }
                },
            },
        }
    }

    async fn on_cmd(&mut self, m: ToFleet, homes: &HashMap<Username, Option<u32>>) {
        match m {
            ToFleet::Login(u) => {
                self.users.insert(u.clone());
                tracing::debug!(user = %u, "fleet claim");
                match self.dir.claim(&u, self.me).await {
                    Ok(Some(prev)) if prev.node != self.me.node => {
                        // An older session elsewhere: its supernode drops it quietly.
                        self.send_to(prev.node, &NodeMsg::Kick { user: u }).await;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        self.count(&self.counters.directory_errors);
                        tracing::warn!(error = %e, "fleet directory: claim failed");
                    }
                }
            }
            ToFleet::Logout(u) => {
                self.users.remove(&u);
                if let Err(e) = self.dir.release(&u, self.me).await {
                    self.count(&self.counters.directory_errors);
                    tracing::warn!(error = %e, "fleet directory: release failed");
                }
            }
            ToFleet::Load { online, draining } => {
                self.member.online = online;
                if draining && !self.member.draining {
                    self.member.draining = true;
                    // Others stop sending users here at once.
                    self.announce().await;
                }
            }
            ToFleet::Out(t) => {
                let node = self.home(&t.to, homes).await;
                self.route(t, node).await;
            }
        }
    }

    /// Sends `t` to supernode `node` (its addressee's home, or None when online nowhere
    /// else); tells the core when it cannot.
    async fn route(&mut self, t: NodeTransmit, node: Option<u32>) {
        let node = node.filter(|n| *n != self.me.node);
        let sent = match node {
            Some(n) => self.send_to(n, &t.msg).await,
            None => false,
        };
        if sent {
            self.count(&self.counters.routed);
        } else {
            self.count(&self.counters.unreachable);
            let _ = self.out.send(FromFleet::Unreachable(t.msg)).await;
        }
    }

    /// Sends `msg` to supernode `node`; false when it is not a known member or its queue
    /// is full.
    async fn send_to(&mut self, node: u32, msg: &NodeMsg) -> bool {
        if !self.members.contains_key(&node) {
            // It may have joined since the last read.
            self.membership().await;
        }
        let Some(m) = self.members.get(&node) else {
            return false;
        };
        let Ok(bytes) = msg.encode() else {
            return false;
        };
        self.link.send(node, m.fleet_addr, bytes).is_ok()
    }

    async fn on_incoming(&mut self, inc: Incoming) {
        match NodeMsg::decode(&inc.msg) {
            Ok(msg) => {
                self.count(&self.counters.received);
                let _ = self
                    .out
                    .send(FromFleet::Msg {
                        from: inc.node,
                        msg,
                    })
                    .await;
            }
            Err(e) => {
                self.count(&self.counters.bad_msgs);
                tracing::warn!(node = inc.node, error = %e, "undecodable message from a supernode");
            }
        }
    }

    async fn announce(&mut self) {
        if let Err(e) = self.dir.announce(&self.member).await {
            self.count(&self.counters.directory_errors);
            tracing::warn!(error = %e, "fleet directory: announce failed");
        }
    }

    /// Re-announces this supernode, re-reads the membership, tells the core who left and
    /// which hosts to hand out.
    async fn membership(&mut self) {
        self.announce().await;
        let list = match self.dir.members().await {
            Ok(l) => l,
            Err(e) => {
                self.count(&self.counters.directory_errors);
                tracing::warn!(error = %e, "fleet directory: members failed");
                return;
            }
        };
        let now: HashMap<u32, Member> = list.into_iter().map(|m| (m.id, m)).collect();
        for (id, old) in &self.members {
            let gone = now.get(id).is_none_or(|m| m.epoch != old.epoch);
            if *id != self.me.node && gone {
                tracing::info!(node = id, "supernode left the fleet");
                self.link.forget(*id);
                let _ = self.out.send(FromFleet::NodeDown(*id)).await;
            }
        }
        for id in now.keys() {
            if !self.members.contains_key(id) && *id != self.me.node {
                tracing::info!(node = id, "supernode joined the fleet");
            }
        }
        self.counters
            .members
            .store(now.len() as u64, std::sync::atomic::Ordering::Relaxed);
        self.members = now;
        let _ = self.out.send(FromFleet::Hosts(self.hosts())).await;
    }

    /// Other live, non-draining supernodes with room, least loaded first.
    fn hosts(&self) -> Vec<SocketAddr> {
        let mut others: Vec<&Member> = self
            .members
            .values()
            .filter(|m| m.id != self.me.node && !m.draining && m.online < m.capacity)
            .collect();
        others.sort_by_key(|m| {
            // Load as a fraction of capacity, in thousandths.
            (u64::from(m.online) * 1000) / u64::from(m.capacity.max(1))
        });
        others.into_iter().map(|m| m.client_addr).collect()
    }

    /// Renews the locations of everyone online here; a user claimed elsewhere since is
    /// dropped here.
    async fn refresh(&mut self) {
        let users: Vec<Username> = self.users.iter().cloned().collect();
        for chunk in users.chunks(REFRESH_BATCH) {
            let entries: Vec<(Username, FleetLocation)> =
                chunk.iter().map(|u| (u.clone(), self.me)).collect();
            match self.dir.refresh(&entries).await {
                Ok(ours) => {
                    for (u, mine) in chunk.iter().zip(ours) {
                        if !mine {
                            let _ = self.out.send(FromFleet::Kick(u.clone())).await;
                        }
                    }
                }
                Err(e) => {
                    self.count(&self.counters.directory_errors);
                    tracing::warn!(error = %e, "fleet directory: refresh failed");
                    return;
                }
            }
        }
    }
}

/// Prometheus text for the fleet counters (`node_msgs`: messages the core took in).
pub(crate) fn render_metrics(f: &FleetHandle, node_msgs: u64) -> String {
    use std::sync::atomic::Ordering::Relaxed;
    let c = &f.counters;
    let mut out = String::new();
    let mut m = |name: &str, kind: &str, help: &str, v: u64| {
        out.push_str(&format!(
            "# HELP peerline_fleet_{name} {help}\n# TYPE peerline_fleet_{name} {kind}\npeerline_fleet_{name} {v}\n"
        ));
    };
    m(
        "node_id",
        "gauge",
        "This supernode's id in the fleet.",
        u64::from(f.node_id),
    );
    m(
        "epoch",
        "gauge",
        "This process's epoch in the fleet (its start, unix ms).",
        f.epoch,
    );
    m(
        "members",
        "gauge",
        "Live supernodes in the fleet, this one included.",
        c.members.load(Relaxed),
    );
    m(
        "routed_total",
        "counter",
        "Messages sent to other supernodes.",
        c.routed.load(Relaxed),
    );
    m(
        "unreachable_total",
        "counter",
        "Messages for users online nowhere (or dropped: queue full, node unknown).",
        c.unreachable.load(Relaxed),
    );
    m(
        "received_total",
        "counter",
        "Messages received from other supernodes.",
        c.received.load(Relaxed),
    );
    let l = f.link.stats();
    m(
        "link_sent_total",
        "counter",
        "Messages written to node-to-node connections.",
        l.sent,
    );
    m(
        "link_dropped_total",
        "counter",
        "Messages dropped: a peer's queue was full.",
        l.dropped + l.expired + l.lost,
    );
    m(
        "link_connects_total",
        "counter",
        "Outbound node-to-node connections established.",
        l.connects,
    );
    m(
        "link_connect_failures_total",
        "counter",
        "Outbound node-to-node connects that failed.",
        l.connect_failures,
    );
    m(
        "link_accepts_total",
        "counter",
        "Inbound node-to-node connections established.",
        l.accepts,
    );
    m(
        "link_handshake_failures_total",
        "counter",
        "Node-to-node handshakes that failed (wrong key, garbage, timeout, wrong node).",
        l.handshake_failures,
    );
    m(
        "link_protocol_errors_total",
        "counter",
        "Node-to-node connections closed for a bad frame, a failed decryption or a stall.",
        l.protocol_errors,
    );
    m(
        "handled_total",
        "counter",
        "Messages from other supernodes the core handled.",
        node_msgs,
    );
    m(
        "bad_messages_total",
        "counter",
        "Undecodable messages from other supernodes.",
        c.bad_msgs.load(Relaxed),
    );
    m(
        "directory_errors_total",
        "counter",
        "Failed fleet directory operations (Redis unreachable or erroring).",
        c.directory_errors.load(Relaxed),
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerline_fleet::{FleetConfig, FleetDirectory, MemoryFleetDirectory, SystemClock};

    fn user(s: &str) -> Username {
        Username::parse(s).unwrap()
    }

    async fn node(dir: &MemoryFleetDirectory, id: u32) -> FleetHandle {
        FleetHandle::start(FleetRuntime {
            directory: Arc::new(dir.clone()),
            node_id: id,
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise: None,
            client_addr: format!("127.0.0.1:{}", 7000 + id).parse().unwrap(),
            psk: [7; 32],
            capacity: 100,
        })
        .await
        .unwrap()
    }

    /// The next message from the fleet task that `pick` accepts (others are skipped).
    async fn next<T>(h: &mut FleetHandle, mut pick: impl FnMut(FromFleet) -> Option<T>) -> T {
        let wait = async {
            loop {
                if let Some(t) = pick(h.rx.recv().await.expect("fleet task alive")) {
                    return t;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), wait)
            .await
            .expect("within 10 s")
    }

    #[tokio::test]
    async fn messages_reach_the_users_home_and_a_departed_node_is_reported() {
        let dir = MemoryFleetDirectory::new(Arc::new(SystemClock::new()), FleetConfig::default());
        let mut a = node(&dir, 1).await;
        let mut b = node(&dir, 2).await;
        // Each learns the other as a host (announce and read every second).
        let hosts = next(&mut a, |m| match m {
            FromFleet::Hosts(h) if !h.is_empty() => Some(h),
            _ => None,
        })
        .await;
        assert_eq!(hosts, vec!["127.0.0.1:7002".parse().unwrap()]);
        b.send(ToFleet::Login(user("bob")));
        let start = Instant::now();
        while dir.lookup(&user("bob")).await.unwrap().is_none() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "bob never claimed"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Routed by the directory to bob's home, in order, with the sender's id.
        for to in ["bob", "nobody", "bob"] {
            a.send(ToFleet::Out(NodeTransmit {
                to: NodeDest::HomeOf(user(to)),
                msg: NodeMsg::Mail { to: user(to) },
            }));
        }
        let unreachable = next(&mut a, |m| match m {
            FromFleet::Unreachable(msg) => Some(msg),
            _ => None,
        })
        .await;
        assert_eq!(unreachable, NodeMsg::Mail { to: user("nobody") });
        for _ in 0..2 {
            let (from, msg) = next(&mut b, |m| match m {
                FromFleet::Msg { from, msg } => Some((from, msg)),
                _ => None,
            })
            .await;
            assert_eq!((from, msg), (1, NodeMsg::Mail { to: user("bob") }));
        }
        // A login elsewhere makes the old home drop its session.
        a.send(ToFleet::Login(user("bob")));
        let kicked = next(&mut b, |m| match m {
            FromFleet::Msg {
                msg: NodeMsg::Kick { user },
                ..
            } => Some(user),
            _ => None,
        })
        .await;
        assert_eq!(kicked, user("bob"));
        // Supernode 2 leaves: supernode 1 hears of it.
        b.leave().await;
        let down = next(&mut a, |m| match m {
            FromFleet::NodeDown(n) => Some(n),
            _ => None,
        })
        .await;
        assert_eq!(down, 2);
    }
}
