//! The supernode's side of a fleet: signalling for users homed on other supernodes.
//!
//! The core never looks anything up in the fleet directory itself. It emits
//! [`NodeTransmit`]s addressed either to "whichever supernode holds this user" or to a node
//! id; the glue resolves the first through the shared directory and carries both over the
//! node-to-node channel, then feeds what other supernodes send back in through
//! [`Supernode::handle_node_msg`]. When nobody holds the user, the glue says so with
//! [`Supernode::node_unreachable`], which answers the waiting caller at once; when a whole
//! supernode dies, [`Supernode::node_down`] turns its users offline for their contacts here.
//!
//! Every rule that depends on the caller (contacts, rate limits) is checked on the caller's
//! supernode; every rule that depends on the callee (visibility, call policy, relay-only)
//! on the callee's. Supernodes of one fleet trust each other.

use std::net::SocketAddr;
use std::time::Instant;

use peerline_wire::msg::{ContactState, ErrorCode, Presence, Request, Response};
use peerline_wire::node::NodeMsg;
use peerline_wire::Username;

use super::{err, Push, Supernode};
use crate::calls::CallKey;
use crate::directory::Location;

/// Where a message for another supernode goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeDest {
    /// Whichever supernode `user` is online at (nobody: [`Supernode::node_unreachable`]).
    HomeOf(Username),
    /// A supernode by id (answers go back to where the question came from).
    Node(u32),
}

/// A message for another supernode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeTransmit {
    /// Where it goes.
    pub to: NodeDest,
    /// What it says.
    pub msg: NodeMsg,
}

/// A forwarded setup or call waiting for the callee's supernode.
#[derive(Debug)]
pub(super) enum RemoteWait {
    Connect {
        caller: u32,
        req: u64,
        to: Username,
    },
    Ring {
        caller: u32,
        req: u64,
        key: CallKey,
        mutual: bool,
        to: Username,
    },
}

/// What another supernode told us about one of its users.
#[derive(Debug)]
pub(super) struct RemoteSeen {
    /// Where the user is online.
    pub node: u32,
    /// As their contacts see it.
    pub presence: Presence,
    /// Local sessions that were told (for `node_down`); stale indexes are skipped.
    pub watchers: Vec<u32>,
}

/// Sessions told about a changed host list per [`Supernode::set_hosts`] call.
pub const HOSTS_PER_CALL: usize = 20_000;

/// Watchers remembered per remote user at most (each is a contact online here).
const MAX_WATCHERS: usize = 4096;

fn offline(to: &Username) -> Response {
    err(ErrorCode::Offline, format!("{to} is offline"))
}

/// A stranger's refusal reads the same whether the callee is online or not.
pub(super) fn not_contact(to: &Username) -> Response {
    err(
        ErrorCode::NotContact,
        format!("{to} is not your contact: you can only call your contacts"),
    )
}

impl Supernode {
    /// The next message for another supernode.
    pub fn poll_node_msg(&mut self) -> Option<NodeTransmit> {
        self.node_out.pop_front()
    }

    /// Tells clients about the other supernodes (least loaded first) at their next login,
    /// and makes a full supernode redirect instead of dropping.
    ///
    /// Call it periodically: when the list changed, everyone online learns the new one,
    /// paced at [`HOSTS_PER_CALL`] sessions a call so a change costs no burst.
    pub fn set_hosts(&mut self, now: Instant, hosts: Vec<SocketAddr>) {
        let mut hosts = hosts;
        hosts.truncate(peerline_wire::msg::MAX_HOSTS);
        if hosts != self.hosts {
            self.hosts = hosts;
            self.hosts_queue = self
                .sessions
                .iter()
                .filter(|(_, s)| s.user().is_some())
                .map(|(i, _)| *i)
                .collect();
        }
        if self.hosts.is_empty() {
            self.hosts_queue.clear();
        }
        for _ in 0..HOSTS_PER_CALL {
            let Some(i) = self.hosts_queue.pop_front() else {
                break;
            };
            let body = Request::Hosts {
                hosts: self.hosts.clone(),
            };
            self.push(now, i, body, Push::Info);
        }
    }

    /// Starts a graceful shutdown: new logins are refused with `Draining`, and every user
    /// is asked to move to another supernode now. Returns how many were asked.
    pub fn drain(&mut self, now: Instant) -> usize {
        self.draining = true;
        let users: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.user().is_some())
            .map(|(i, _)| *i)
            .collect();
        for &i in &users {
            let body = Request::Redirect {
                hosts: self.hosts.clone(),
            };
            self.push(now, i, body, Push::Info);
        }
        users.len()
    }

    /// Whether [`Supernode::drain`] was called.
    pub fn is_draining(&self) -> bool {
        self.draining
    }

    pub(super) fn forward(&mut self, msg: NodeMsg) {
        let user = match &msg {
            NodeMsg::Presence { to, .. }
            | NodeMsg::Contact { to, .. }
            | NodeMsg::Connect { to, .. }
            | NodeMsg::Ring { to, .. }
            | NodeMsg::Signal { to, .. }
            | NodeMsg::Mail { to } => to.clone(),
            NodeMsg::Kick { user } | NodeMsg::Recheck { user, .. } => user.clone(),
            NodeMsg::Answer { .. } => return,
        };
        self.node_out.push_back(NodeTransmit {
            to: NodeDest::HomeOf(user),
            msg,
        });
    }

    pub(super) fn send_node(&mut self, node: u32, msg: NodeMsg) {
        self.node_out.push_back(NodeTransmit {
            to: NodeDest::Node(node),
            msg,
        });
    }

    pub(super) fn wait_remote(&mut self, now: Instant, w: RemoteWait) -> u64 {
        let token = self.next_token;
        self.next_token += 1;
        self.remote_waits.insert(token, w);
        self.remote_order
            .push_back((now + self.cfg.remote_timeout, token));
        token
    }

    /// Answers forwarded setups whose supernode never answered.
    pub(super) fn expire_remote(&mut self, now: Instant) {
        while let Some(&(t, token)) = self.remote_order.front() {
            if t > now {
                break;
            }
            self.remote_order.pop_front();
            if let Some(w) = self.remote_waits.remove(&token) {
                let answer = match &w {
                    RemoteWait::Connect { .. } => {
                        err(ErrorCode::Offline, "the contact's supernode did not answer")
                    }
                    RemoteWait::Ring { .. } => {
                        err(ErrorCode::Offline, "the callee's supernode did not answer")
                    }
                };
                self.finish_remote(now, w, answer);
            }
        }
    }

    fn finish_remote(&mut self, now: Instant, w: RemoteWait, answer: Response) {
        match w {
            RemoteWait::Connect { caller, req, .. } => self.reply(now, caller, req, answer),
            RemoteWait::Ring {
                caller, req, key, ..
            } => {
                if answer == Response::Ok {
                    self.stats.calls_rung += 1;
                } else {
                    self.calls.end(&key);
                }
                self.reply(now, caller, req, answer);
            }
        }
    }

    /// The glue found no supernode holding the addressee of `msg`.
    pub fn node_unreachable(&mut self, now: Instant, msg: NodeMsg) {
        let token = match msg {
            NodeMsg::Connect { token, .. } | NodeMsg::Ring { token, .. } => token,
            _ => return,
        };
        let Some(w) = self.remote_waits.remove(&token) else {
            return;
        };
        let answer = match &w {
            RemoteWait::Connect { to, .. } => offline(to),
            RemoteWait::Ring { to, mutual, .. } => {
                if *mutual {
                    offline(to)
                } else {
                    not_contact(to)
                }
            }
        };
        self.finish_remote(now, w, answer);
    }

    /// Supernode `node` left the fleet (died or shut down): its users are offline for
    /// their contacts here until they log in again somewhere.
    pub fn node_down(&mut self, now: Instant, node: u32) {
        let gone: Vec<Username> = self
            .remote_seen
            .iter()
            .filter(|(_, r)| r.node == node)
            .map(|(u, _)| u.clone())
            .collect();
        for user in gone {
            let Some(r) = self.remote_seen.remove(&user) else {
                continue;
            };
            for w in r.watchers {
                let still = self
                    .sessions
                    .get(&w)
                    .is_some_and(|s| s.contacts.contains(&user));
                if still {
                    let body = Request::PresenceEvent {
                        user: user.clone(),
                        presence: Presence::Offline,
                    };
                    self.push(now, w, body, Push::Info);
                }
            }
        }
    }

    /// Local session of `to` that has `about` among its accepted contacts.
    fn contact_session(&self, to: &Username, about: &Username) -> Option<u32> {
        self.session_of(to).filter(|i| {
            self.sessions
                .get(i)
                .is_some_and(|s| s.contacts.contains(about))
        })
    }

    /// Whether `user` is online here and visible.
    fn visible_session(&self, user: &Username) -> Option<u32> {
        self.session_of(user).filter(|i| {
            self.sessions
                .get(i)
                .is_some_and(|s| s.presence != Presence::Invisible)
        })
    }

    /// A message from supernode `from`.
    pub fn handle_node_msg(&mut self, now: Instant, from: u32, msg: NodeMsg) {
        self.stats.node_msgs += 1;
        match msg {
            NodeMsg::Presence {
                to,
                about,
                presence,
                ask,
            } => {
                let Some(i) = self.contact_session(&to, &about) else {
                    return;
                };
                if presence == Presence::Offline {
                    self.remote_seen.remove(&about);
                } else {
                    let r = self
                        .remote_seen
                        .entry(about.clone())
                        .or_insert_with(|| RemoteSeen {
                            node: from,
                            presence,
                            watchers: Vec::new(),
                        });
                    r.node = from;
                    r.presence = presence;
                    if !r.watchers.contains(&i) && r.watchers.len() < MAX_WATCHERS {
                        r.watchers.push(i);
                    }
                }
                // A login's question carries "offline" only for an invisible user: nothing
                // to tell, but the answer is still due.
                if !(ask && presence == Presence::Offline) {
                    let body = Request::PresenceEvent {
                        user: about.clone(),
                        presence,
                    };
                    self.push(now, i, body, Push::Info);
                }
                if ask {
                    self.answer_presence(from, i, to, about);
                }
            }
            NodeMsg::Contact {
                to,
                about,
                state,
                note,
            } => {
                let Some(i) = self.session_of(&to) else {
                    return;
                };
                if let Some(s) = self.sessions.get_mut(&i) {
                    match state {
                        ContactState::Accepted => {
                            s.contacts.insert(about.clone());
                        }
                        ContactState::None | ContactState::Blocked => {
                            s.contacts.remove(&about);
                        }
                        _ => {}
                    }
                }
                let body = Request::ContactEvent {
                    user: about.clone(),
                    state,
                    note,
                };
                self.push(now, i, body, Push::Info);
                if state == ContactState::Accepted {
                    self.answer_presence(from, i, to, about);
                }
            }
            NodeMsg::Connect {
                token,
                to,
                from: caller,
                cert,
                candidates,
                hard_nat,
                call_only,
            } => match self.visible_session(&to) {
                Some(i) => {
                    let body = Request::IncomingConnect {
                        user: caller,
                        cert,
                        candidates,
                        hard_nat,
                        call_only,
                    };
                    let kind = Push::RemoteConnect {
                        node: from,
                        token,
                        call_only,
                    };
                    self.push(now, i, body, kind);
                }
                None => {
                    let answer = offline(&to);
                    self.send_node(from, NodeMsg::Answer { token, answer });
                }
            },
            NodeMsg::Ring {
                token,
                to,
                from: caller,
                call_id,
                mutual,
            } => {
                let callee = self.visible_session(&to);
                let anyone = callee
                    .and_then(|i| self.sessions.get(&i))
                    .is_some_and(|s| s.anyone_can_call);
                let answer = match callee {
                    Some(i) if mutual || anyone => {
                        let key: CallKey = (caller.clone(), call_id);
                        if self.calls.ring(now, key.clone(), to.clone()).is_err() {
                            err(ErrorCode::RateLimited, "too many calls at once")
                        } else {
                            let body = Request::IncomingCall {
                                user: caller,
                                call_id,
                            };
                            let kind = Push::RemoteRing {
                                node: from,
                                token,
                                key,
                            };
                            self.push(now, i, body, kind);
                            return;
                        }
                    }
                    None if mutual => offline(&to),
                    _ => not_contact(&to),
                };
                self.send_node(from, NodeMsg::Answer { token, answer });
            }
            NodeMsg::Signal {
                to,
                from: sender,
                call_id,
                signal,
            } => {
                if let Some((key, _)) = self.calls.find(&to, &sender, call_id) {
                    match signal {
                        peerline_wire::msg::CallSignal::Accept => self.calls.accept(now, &key),
                        _ => self.calls.end(&key),
                    }
                }
                if let Some(i) = self.session_of(&to) {
                    let body = Request::CallSignal {
                        user: sender,
                        call_id,
                        signal,
                    };
                    self.push(now, i, body, Push::Info);
                }
            }
            NodeMsg::Mail { to } => {
                let Some(i) = self.session_of(&to) else {
                    return;
                };
                let Some(s) = self.sessions.get_mut(&i) else {
                    return;
                };
                if s.delivering.is_empty() {
                    self.fetch_mail(i, to);
                } else {
                    // A batch is out: fetch again once it is acknowledged.
                    s.more_waiting = true;
                }
            }
            NodeMsg::Kick { user } => self.kick(now, &user),
            NodeMsg::Recheck { user, key } => {
                self.recheck_here(&user, &key);
            }
            NodeMsg::Answer { token, answer } => {
                if let Some(w) = self.remote_waits.remove(&token) {
                    self.finish_remote(now, w, answer);
                }
            }
        }
    }

    /// `user` logged in on another supernode: drop their session here without telling
    /// contacts they went offline (they are online, elsewhere).
    pub fn kick(&mut self, now: Instant, user: &Username) {
        let Some(index) = self.session_of(user) else {
            return;
        };
        let loc = Location {
            node: self.cfg.node_id,
            session: index,
        };
        self.directory.remove_if(user, loc);
        if let Some(mut s) = self.remove_session(index) {
            s.link.close(now);
            while let Some(t) = s.link.poll_transmit() {
                self.push_transmit(t);
            }
        }
        self.orphan_pushes(now, index, user);
        tracing::info!(user = %user, "logged in on another supernode");
        self.events
            .push_back(super::SupernodeEvent::Logout(user.clone()));
    }

    /// Tells `about` (homed on `node`) the presence of `me` (local session `i`), unless
    /// `me` looks offline.
    fn answer_presence(&mut self, node: u32, i: u32, me: Username, about: Username) {
        let mine = self.seen_local(i);
        if mine != Presence::Offline {
            self.send_node(
                node,
                NodeMsg::Presence {
                    to: about,
                    about: me,
                    presence: mine,
                    ask: false,
                },
            );
        }
    }

    /// Presence of local session `i` as contacts see it.
    fn seen_local(&self, i: u32) -> Presence {
        self.sessions
            .get(&i)
            .map_or(Presence::Offline, |s| s.presence.as_seen())
    }
}
