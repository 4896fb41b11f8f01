//! What the simulations share: driving clients through commands on virtual time and
//! waiting for what they report. A simulation implements [`Sim`] (how to step its world
//! and where its clients and their events are) and gets the rest.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::time::{Duration, Instant};

use peerline_core::call::{CallInfo, CallState};
use peerline_core::client::{Client, ClientEvent, Command, CommandId, CommandResult};
use peerline_crypto::cookie::{self, MacKeys};
use peerline_crypto::noise::Handshake;
use peerline_crypto::DeviceKeys;
use peerline_wire::msg::{ContactAction, Hello, Presence};
use peerline_wire::{Username, PROTOCOL_VERSION};
use rand_chacha::rand_core::RngCore;

pub fn user(s: &str) -> Username {
    Username::parse(s).unwrap()
}

/// A handshake initiation as a client would send it to the supernode whose Noise key is
/// `sn_public`: the handshake, the datagram (with its mac1) and the initiator's index.
pub fn initiation(
    rng: &mut impl RngCore,
    keys: &DeviceKeys,
    sn_public: &[u8; 32],
    cert: Option<Vec<u8>>,
    unix_ms: u64,
) -> (Handshake, Vec<u8>, u32) {
    let hello = Hello {
        version: PROTOCOL_VERSION,
        unix_ms,
        cert,
        presence: Presence::Online,
        relay_only: false,
    };
    let mut seed = [0u8; 32];
    rng.fill_bytes(&mut seed);
    let (hs, msg1) = Handshake::initiate(
        &keys.noise_private(),
        sn_public,
        seed,
        &hello.encode().unwrap(),
    )
    .unwrap();
    let index = rng.next_u32() | 1;
    let macs = MacKeys::new(sn_public);
    (hs, cookie::encode_init(index, &msg1, &macs, None), index)
}

/// A simulated world of clients (and supernodes) on virtual time.
pub trait Sim {
    /// Advances the world by one tick.
    fn step(&mut self);
    /// The virtual clock.
    fn now(&self) -> Instant;
    /// Client `i`.
    fn client_mut(&mut self, i: usize) -> &mut Client;
    /// What client `i` reported so far.
    fn events(&self, i: usize) -> &[ClientEvent];

    fn run_for(&mut self, d: Duration) {
        let end = self.now() + d;
        while self.now() < end {
            self.step();
        }
    }

    /// Client `i` runs `cmd`; returns how it ended (within 60 s).
    fn command(&mut self, i: usize, cmd: Command) -> CommandResult {
        let now = self.now();
        let id = self.client_mut(i).command(now, cmd);
        self.wait_done(i, id, Duration::from_secs(60))
    }

    fn wait_done(&mut self, i: usize, id: CommandId, limit: Duration) -> CommandResult {
        let end = self.now() + limit;
        while self.now() < end {
            self.step();
            if let Some(r) = self.events(i).iter().find_map(|e| match e {
                ClientEvent::CommandDone { id: d, result } if *d == id => Some(result.clone()),
                _ => None,
            }) {
                return r;
            }
        }
        panic!("command {id} of client {i} did not finish");
    }

    /// Steps until client `i` has seen an event matching `pred`, for up to 20 s (pushes may
    /// need retransmissions on a lossy network).
    fn saw(&mut self, i: usize, pred: impl Fn(&ClientEvent) -> bool) -> bool {
        let end = self.now() + Duration::from_secs(20);
        while self.now() < end {
            if self.events(i).iter().any(&pred) {
                return true;
            }
            self.step();
        }
        false
    }

    /// Steps until client `i` has received a message with `text`.
    fn saw_message(&mut self, i: usize, text: &str) -> bool {
        self.saw(
            i,
            |e| matches!(e, ClientEvent::Message { text: t, .. } if t == text),
        )
    }

    /// Client `i` creates the account `name` and is online.
    fn register(&mut self, i: usize, name: &str) {
        let r = self.command(
            i,
            Command::Register {
                username: user(name),
                password: "correct horse".into(),
            },
        );
        assert_eq!(r, CommandResult::Ok, "register {name}");
        assert!(self.client_mut(i).is_online());
    }

    /// `a` (named `aname`) asks `b` (named `bname`) to be contacts, and `b` accepts.
    fn befriend(&mut self, a: usize, b: usize, bname: &str, aname: &str) {
        let add = Command::ContactAdd {
            user: user(bname),
            note: "hi".into(),
        };
        assert_eq!(self.command(a, add), CommandResult::Ok);
        let reply = Command::ContactReply {
            user: user(aname),
            action: ContactAction::Accept,
        };
        assert_eq!(self.command(b, reply), CommandResult::Ok);
    }

    /// The latest state client `i` reported for `call_id`.
    fn call_state(&self, i: usize, call_id: u64) -> Option<CallInfo> {
        self.events(i).iter().rev().find_map(|e| match e {
            ClientEvent::Call(c) if c.call_id == call_id => Some(c.clone()),
            _ => None,
        })
    }

    /// Steps until client `i` reports `state` for `call_id` (within 40 s).
    fn wait_call(&mut self, i: usize, call_id: u64, state: CallState) -> CallInfo {
        let end = self.now() + Duration::from_secs(40);
        while self.now() < end {
            if let Some(c) = self.call_state(i, call_id).filter(|c| c.state == state) {
                return c;
            }
            self.step();
        }
        panic!(
            "client {i}: call {call_id} never became {state:?}: last {:?}",
            self.call_state(i, call_id)
        );
    }
}
