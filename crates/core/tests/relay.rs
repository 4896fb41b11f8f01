//! The TURN relay core driven directly on virtual time: authentication, allocation,
//! permissions, Send/Data indications, channels, refresh, expiry and quotas. Requests are
//! built with `stun-types`/`turn-types`, independently of the relay's own encoders.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peerline_core::relay::{
    turn_credentials, AllocationId, Relay, RelayBindFailure, RelayConfig, RelayEvent, RelayFamily,
    RelaySocket, RelayTransmit,
};
use proptest::prelude::*;
use stun_types::attribute::{
    AttributeStaticType, AttributeWrite, ErrorCode, Nonce, Realm, UnknownAttributes, Username,
    XorMappedAddress,
};
use stun_types::message::{
    IntegrityAlgorithm, LongTermKeyCredentials, Message, MessageClass, MessageIntegrityCredentials,
    MessageType, MessageWrite, MessageWriteExt, MessageWriteVec, Method, TransactionId,
};
use turn_types::attribute::{
    ChannelNumber, Data, EvenPort, Lifetime, RequestedTransport, XorPeerAddress, XorRelayedAddress,
};
use turn_types::channel::ChannelData;
use turn_types::message::{ALLOCATE, CHANNEL_BIND, CREATE_PERMISSION, DATA, REFRESH, SEND};

const SECRET: [u8; 32] = [0x5e; 32];
const UNIX0: u64 = 1_800_000_000;
const REALM: &str = "peerline";

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// Documentation addresses count as public, so the default peer policy applies.
const CLIENT: &str = "198.51.100.10:50000";
const PEER: &str = "203.0.113.20:6000";
const RELAYED: &str = "192.0.2.1:49152";

struct Creds {
    username: String,
    password: String,
    nonce: String,
}

impl Creds {
    fn credentials(&self) -> MessageIntegrityCredentials {
        LongTermKeyCredentials::new(
            self.username.clone(),
            self.password.clone(),
            REALM.to_owned(),
        )
        .into()
    }
}

struct H {
    relay: Relay,
    now: Instant,
    txid: u128,
}

impl H {
    fn new(config: RelayConfig) -> H {
        let now = Instant::now();
        H {
            relay: Relay::new(config, SECRET, [3; 32], now, UNIX0),
            now,
            txid: 1,
        }
    }

    fn txid(&mut self) -> TransactionId {
        self.txid += 1;
        TransactionId::from(self.txid)
    }

    fn advance(&mut self, d: Duration) {
        self.now += d;
        self.relay.handle_timeout(self.now);
    }

    fn transmits(&mut self) -> Vec<RelayTransmit> {
        std::iter::from_fn(|| self.relay.poll_transmit()).collect()
    }

    fn events(&mut self) -> Vec<RelayEvent> {
        std::iter::from_fn(|| self.relay.poll_event()).collect()
    }

    /// Sends `bytes` from `from` and returns the one reply to it (to `from`, on the
    /// listening socket).
    fn ask(&mut self, from: SocketAddr, bytes: &[u8]) -> Vec<u8> {
        self.relay.handle_client(self.now, from, bytes);
        let t = self.transmits();
        assert_eq!(t.len(), 1, "exactly one reply: {t:?}");
        assert_eq!(t[0].socket, RelaySocket::Listen);
        assert_eq!(t[0].dst, from);
        t[0].payload.clone()
    }

    fn creds(&mut self, client: SocketAddr, user: &str) -> Creds {
        let (username, password) = turn_credentials(&SECRET, user, UNIX0 + 3600);
        let tx = self.txid();
        let r = self.ask(
            client,
            &request(ALLOCATE, tx, &[&RequestedTransport::new(17)], None),
        );
        let m = Message::from_bytes(&r).unwrap();
        assert_eq!(code(&m), Some(401));
        Creds {
            username,
            password,
            nonce: m.attribute::<Nonce>().unwrap().nonce().to_owned(),
        }
    }

    /// A full Allocate for `user` from `client`, with the glue's socket at `relayed`.
    fn allocate(
        &mut self,
        client: SocketAddr,
        user: &str,
        relayed: SocketAddr,
    ) -> (AllocationId, Creds) {
        let c = self.creds(client, user);
        let tx = self.txid();
        let req = request(ALLOCATE, tx, &[&RequestedTransport::new(17)], Some(&c));
        self.relay.handle_client(self.now, client, &req);
        assert!(self.transmits().is_empty(), "no answer before the socket");
        let ev = self.events();
        let [RelayEvent::AllocationCreated {
            id,
            client: c2,
            family,
        }] = ev[..]
        else {
            panic!("expected AllocationCreated, got {ev:?}");
        };
        assert_eq!(c2, client);
        assert_eq!(family, RelayFamily::V4);
        self.relay.relayed_bound(self.now, id, relayed);
        let t = self.transmits();
        assert_eq!(t.len(), 1);
        let m = Message::from_bytes(&t[0].payload).unwrap();
        assert!(m.has_class(MessageClass::Success), "{m}");
        assert!(m.validate_integrity(&c.credentials()).is_ok());
        assert_eq!(
            m.attribute::<XorRelayedAddress>()
                .unwrap()
                .addr(m.transaction_id()),
            relayed
        );
        assert_eq!(
            m.attribute::<XorMappedAddress>()
                .unwrap()
                .addr(m.transaction_id()),
            client
        );
        assert_eq!(m.attribute::<Lifetime>().unwrap().seconds(), 600);
        (id, c)
    }

    /// An authenticated request; returns the parsed reply's bytes after checking its
    /// integrity.
    fn auth_ask(
        &mut self,
        client: SocketAddr,
        method: Method,
        attrs: &[&dyn AttributeWrite],
        c: &Creds,
    ) -> Vec<u8> {
        let tx = self.txid();
        let r = self.ask(client, &request(method, tx, attrs, Some(c)));
        let m = Message::from_bytes(&r).unwrap();
        assert_eq!(m.transaction_id(), tx);
        assert!(
            m.validate_integrity(&c.credentials()).is_ok(),
            "signed reply: {m}"
        );
        r
    }
}

/// A request with `attrs`, signed with long-term credentials when given.
fn request(
    method: Method,
    tx: TransactionId,
    attrs: &[&dyn AttributeWrite],
    auth: Option<&Creds>,
) -> Vec<u8> {
    let mut w = Message::builder(
        MessageType::from_class_method(MessageClass::Request, method),
        tx,
        MessageWriteVec::new(),
    );
    for a in attrs {
        w.add_attribute(*a).unwrap();
    }
    if let Some(c) = auth {
        w.add_attribute(&Username::new(&c.username).unwrap())
            .unwrap();
        w.add_attribute(&Realm::new(REALM).unwrap()).unwrap();
        w.add_attribute(&Nonce::new(&c.nonce).unwrap()).unwrap();
        w.add_message_integrity(&c.credentials(), IntegrityAlgorithm::Sha1)
            .unwrap();
    }
    w.finish()
}

fn indication(method: Method, tx: TransactionId, attrs: &[&dyn AttributeWrite]) -> Vec<u8> {
    let mut w = Message::builder(
        MessageType::from_class_method(MessageClass::Indication, method),
        tx,
        MessageWriteVec::new(),
    );
    for a in attrs {
        w.add_attribute(*a).unwrap();
    }
    w.finish()
}

fn code(m: &Message<'_>) -> Option<u16> {
    if !m.has_class(MessageClass::Error) {
        return None;
    }
    m.attribute::<ErrorCode>().ok().map(|e| e.code())
}

fn reply_code(bytes: &[u8]) -> Option<u16> {
    code(&Message::from_bytes(bytes).unwrap())
}

/// CreatePermission for `peer` (XOR-PEER-ADDRESS encoded with the request's own id).
fn permit(h: &mut H, client: SocketAddr, c: &Creds, peer: SocketAddr) -> Option<u16> {
    let tx = h.txid();
    let req = request(
        CREATE_PERMISSION,
        tx,
        &[&XorPeerAddress::new(peer, tx)],
        Some(c),
    );
    let r = h.ask(client, &req);
    let m = Message::from_bytes(&r).unwrap();
    assert!(m.validate_integrity(&c.credentials()).is_ok());
    code(&m)
}

fn channel_bind(
    h: &mut H,
    client: SocketAddr,
    c: &Creds,
    number: u16,
    peer: SocketAddr,
) -> Option<u16> {
    let tx = h.txid();
    let req = request(
        CHANNEL_BIND,
        tx,
        &[&ChannelNumber::new(number), &XorPeerAddress::new(peer, tx)],
        Some(c),
    );
    reply_code(&h.ask(client, &req))
}

fn refresh(h: &mut H, client: SocketAddr, c: &Creds, secs: u32) -> Vec<u8> {
    h.auth_ask(client, REFRESH, &[&Lifetime::new(secs)], c)
}

fn send_indication(h: &mut H, client: SocketAddr, peer: SocketAddr, data: &[u8]) {
    let tx = h.txid();
    let ind = indication(
        SEND,
        tx,
        &[&XorPeerAddress::new(peer, tx), &Data::new(data)],
    );
    h.relay.handle_client(h.now, client, &ind);
}

#[test]
fn unauthenticated_allocate_gets_401_with_realm_and_nonce() {
    let mut h = H::new(RelayConfig::default());
    let tx = h.txid();
    let r = h.ask(
        addr(CLIENT),
        &request(ALLOCATE, tx, &[&RequestedTransport::new(17)], None),
    );
    let m = Message::from_bytes(&r).unwrap();
    assert_eq!(m.transaction_id(), tx);
    assert!(m.has_method(ALLOCATE));
    assert_eq!(code(&m), Some(401));
    assert_eq!(m.attribute::<Realm>().unwrap().realm(), REALM);
    assert!(!m.attribute::<Nonce>().unwrap().nonce().is_empty());
    assert_eq!(
        h.relay.allocation_count(),
        0,
        "no state before authentication"
    );
    assert!(h.events().is_empty());
}

#[test]
fn wrong_expired_or_stale_credentials_are_refused() {
    let mut h = H::new(RelayConfig::default());
    let client = addr(CLIENT);
    let mut c = h.creds(client, "alice");

    // Wrong password.
    let good = c.password.clone();
    c.password = "not-the-password".into();
    let tx = h.txid();
    let r = h.ask(
        client,
        &request(ALLOCATE, tx, &[&RequestedTransport::new(17)], Some(&c)),
    );
    assert_eq!(reply_code(&r), Some(401));
    c.password = good;

    // A username forged with another expiry does not match the password.
    let forged = Creds {
        username: format!("{}:alice", UNIX0 + 999_999),
        password: c.password.clone(),
        nonce: c.nonce.clone(),
    };
    let tx = h.txid();
    let r = h.ask(
        client,
        &request(ALLOCATE, tx, &[&RequestedTransport::new(17)], Some(&forged)),
    );
    assert_eq!(reply_code(&r), Some(401));

    // Expired credentials (valid signature, past expiry).
    let (username, password) = turn_credentials(&SECRET, "alice", UNIX0 - 1);
    let expired = Creds {
        username,
        password,
        nonce: c.nonce.clone(),
    };
    let tx = h.txid();
    let r = h.ask(
        client,
        &request(
            ALLOCATE,
            tx,
            &[&RequestedTransport::new(17)],
            Some(&expired),
        ),
    );
    assert_eq!(reply_code(&r), Some(401));

    // A nonce from another source address is stale here.
    let tx = h.txid();
    let r = h.ask(
        addr("198.51.100.11:50000"),
        &request(ALLOCATE, tx, &[&RequestedTransport::new(17)], Some(&c)),
    );
    let m = Message::from_bytes(&r).unwrap();
    assert_eq!(code(&m), Some(438));
    assert!(m.attribute::<Nonce>().is_ok(), "438 carries a new nonce");

    // Integrity without USERNAME/REALM/NONCE: 400.
    let tx = h.txid();
    let mut w = Message::builder(
        MessageType::from_class_method(MessageClass::Request, ALLOCATE),
        tx,
        MessageWriteVec::new(),
    );
    w.add_attribute(&RequestedTransport::new(17)).unwrap();
    w.add_message_integrity(&c.credentials(), IntegrityAlgorithm::Sha1)
        .unwrap();
    let r = h.ask(client, &w.finish());
    assert_eq!(reply_code(&r), Some(400));

    assert_eq!(h.relay.allocation_count(), 0);
    assert!(h.relay.stats().auth_failures >= 5);

    // The nonce goes stale after an hour.
    h.advance(Duration::from_secs(3601));
    let (username, password) = turn_credentials(&SECRET, "alice", UNIX0 + 7200);
    let later = Creds {
        username,
        password,
        nonce: c.nonce.clone(),
    };
    let tx = h.txid();
    let r = h.ask(
        client,
        &request(ALLOCATE, tx, &[&RequestedTransport::new(17)], Some(&later)),
    );
    assert_eq!(reply_code(&r), Some(438));
}

#[test]
fn good_allocate_returns_the_relayed_address() {
    let mut h = H::new(RelayConfig::default());
    let client = addr(CLIENT);
    let (id, c) = h.allocate(client, "alice", addr(RELAYED));
    assert_eq!(h.relay.allocation_count(), 1);
    assert_eq!(h.relay.relayed_addr(id), Some(addr(RELAYED)));
    assert_eq!(
        h.relay.poll_timeout(),
        Some(h.now + Duration::from_secs(600))
    );

    // A second Allocate (new transaction) on the same 5-tuple: 437.
    let tx = h.txid();
    let r = h.ask(
        client,
        &request(ALLOCATE, tx, &[&RequestedTransport::new(17)], Some(&c)),
    );
    assert_eq!(reply_code(&r), Some(437));
}

#[test]
fn allocate_retransmission_gets_the_same_success() {
    let mut h = H::new(RelayConfig::default());
    let client = addr(CLIENT);
    let c = h.creds(client, "alice");
    let tx = h.txid();
    let req = request(ALLOCATE, tx, &[&RequestedTransport::new(17)], Some(&c));
    h.relay.handle_client(h.now, client, &req);
    let [RelayEvent::AllocationCreated { id, .. }] = h.events()[..] else {
        panic!()
    };
    // Retransmitted while the socket is being bound: no second allocation, no answer.
    h.relay.handle_client(h.now, client, &req);
    assert!(h.events().is_empty());
    assert!(h.transmits().is_empty());
    h.relay.relayed_bound(h.now, id, addr(RELAYED));
    assert_eq!(h.transmits().len(), 1);
    // Retransmitted after the success: the success again.
    let r = h.ask(client, &req);
    let m = Message::from_bytes(&r).unwrap();
    assert!(m.has_class(MessageClass::Success));
    assert_eq!(m.transaction_id(), tx);
    assert_eq!(h.relay.allocation_count(), 1);
}

#[test]
fn allocate_argument_errors() {
    let mut h = H::new(RelayConfig::default());
    let client = addr(CLIENT);
    let c = h.creds(client, "alice");
    // No REQUESTED-TRANSPORT: 400.
    let r = h.auth_ask(client, ALLOCATE, &[], &c);
    assert_eq!(reply_code(&r), Some(400));
    // TCP: 442.
    let r = h.auth_ask(client, ALLOCATE, &[&RequestedTransport::new(6)], &c);
    assert_eq!(reply_code(&r), Some(442));
    // EVEN-PORT (not supported, comprehension-required): 420 naming it.
    let r = h.auth_ask(
        client,
        ALLOCATE,
        &[&RequestedTransport::new(17), &EvenPort::new(true)],
        &c,
    );
    let m = Message::from_bytes(&r).unwrap();
    assert_eq!(code(&m), Some(420));
    assert!(m
        .attribute::<UnknownAttributes>()
        .unwrap()
        .has_attribute(EvenPort::TYPE));
    // Unknown method: 400.
    let tx = h.txid();
    let r = h.ask(client, &request(Method::new(0x0123), tx, &[], Some(&c)));
    assert_eq!(reply_code(&r), Some(400));
    assert_eq!(h.relay.allocation_count(), 0);
}

#[test]
fn bind_failures_answer_440_or_508_and_free_the_slot() {
    let mut h = H::new(RelayConfig::default());
    let client = addr(CLIENT);
    for (why, want) in [
        (RelayBindFailure::AddressFamily, 440),
        (RelayBindFailure::Unavailable, 508),
    ] {
        let c = h.creds(client, "alice");
        let tx = h.txid();
        h.relay.handle_client(
            h.now,
            client,
            &request(ALLOCATE, tx, &[&RequestedTransport::new(17)], Some(&c)),
        );
        let [RelayEvent::AllocationCreated { id, .. }] = h.events()[..] else {
            panic!()
        };
        h.relay.relay_bind_failed(h.now, id, why);
        let t = h.transmits();
        assert_eq!(reply_code(&t[0].payload), Some(want));
        assert_eq!(h.events(), vec![RelayEvent::AllocationExpired { id }]);
        assert_eq!(h.relay.allocation_count(), 0);
    }
    // A bound address of the wrong family counts as 440.
    let c = h.creds(client, "alice");
    let tx = h.txid();
    h.relay.handle_client(
        h.now,
        client,
        &request(ALLOCATE, tx, &[&RequestedTransport::new(17)], Some(&c)),
    );
    let [RelayEvent::AllocationCreated { id, .. }] = h.events()[..] else {
        panic!()
    };
    h.relay.relayed_bound(h.now, id, addr("[2001:db8::1]:3478"));
    assert_eq!(reply_code(&h.transmits()[0].payload), Some(440));
}

#[test]
fn a_socket_never_bound_is_given_up() {
    let mut h = H::new(RelayConfig::default());
    let client = addr(CLIENT);
    let c = h.creds(client, "alice");
    let tx = h.txid();
    h.relay.handle_client(
        h.now,
        client,
        &request(ALLOCATE, tx, &[&RequestedTransport::new(17)], Some(&c)),
    );
    let [RelayEvent::AllocationCreated { id, .. }] = h.events()[..] else {
        panic!()
    };
    assert_eq!(h.relay.poll_timeout(), Some(h.now + Duration::from_secs(5)));
    h.advance(Duration::from_secs(5));
    assert_eq!(h.events(), vec![RelayEvent::AllocationExpired { id }]);
    assert_eq!(h.relay.allocation_count(), 0);
    // A late bind is ignored.
    h.relay.relayed_bound(h.now, id, addr(RELAYED));
    assert!(h.transmits().is_empty());
}

#[test]
fn permission_is_required_before_data_flows() {
    let mut h = H::new(RelayConfig::default());
    let client = addr(CLIENT);
    let peer = addr(PEER);
    let (id, c) = h.allocate(client, "alice", addr(RELAYED));

    // Without a permission, nothing passes either way.
    h.relay.handle_peer(h.now, id, peer, b"early");
    send_indication(&mut h, client, peer, b"early");
    assert!(h.transmits().is_empty());

    assert_eq!(permit(&mut h, client, &c, peer), None);

    // Peer -> client: a Data indication carrying the peer's address.
    h.relay.handle_peer(h.now, id, peer, b"hello client");
    let t = h.transmits();
    assert_eq!(t.len(), 1);
    assert_eq!((t[0].socket, t[0].dst), (RelaySocket::Listen, client));
    let m = Message::from_bytes(&t[0].payload).unwrap();
    assert!(m.has_class(MessageClass::Indication) && m.has_method(DATA));
    assert_eq!(
        m.attribute::<XorPeerAddress>()
            .unwrap()
            .addr(m.transaction_id()),
        peer
    );
    assert_eq!(m.attribute::<Data>().unwrap().data(), b"hello client");

    // A permission is per IP: another port of the same host is let in too; another host
    // is not.
    h.relay
        .handle_peer(h.now, id, addr("203.0.113.20:7000"), b"same ip");
    assert_eq!(h.transmits().len(), 1);
    h.relay
        .handle_peer(h.now, id, addr("203.0.113.21:6000"), b"stranger");
    assert!(h.transmits().is_empty());
}

#[test]
fn send_indication_leaves_from_the_relayed_socket() {
    let mut h = H::new(RelayConfig::default());
    let client = addr(CLIENT);
    let peer = addr(PEER);
    let (id, c) = h.allocate(client, "alice", addr(RELAYED));
    assert_eq!(permit(&mut h, client, &c, peer), None);
    send_indication(&mut h, client, peer, b"hello peer");
    let t = h.transmits();
    assert_eq!(
        t,
        vec![RelayTransmit {
            socket: RelaySocket::Relayed(id),
            dst: peer,
            payload: b"hello peer".to_vec(),
        }]
    );
    // From another address (no allocation): dropped.
    send_indication(&mut h, addr("198.51.100.99:1"), peer, b"spoof");
    assert!(h.transmits().is_empty());
    assert_eq!(h.relay.stats().relayed_to_peers, 1);
}

#[test]
fn channel_data_flows_both_ways_after_channel_bind() {
    let mut h = H::new(RelayConfig::default());
    let client = addr(CLIENT);
    let peer = addr(PEER);
    let (id, c) = h.allocate(client, "alice", addr(RELAYED));

    // Out of range numbers: 400.
    assert_eq!(channel_bind(&mut h, client, &c, 0x3FFF, peer), Some(400));
    assert_eq!(channel_bind(&mut h, client, &c, 0x5000, peer), Some(400));
    // Bind (this also installs the permission).
    assert_eq!(channel_bind(&mut h, client, &c, 0x4001, peer), None);
    // Rebinding the same pair refreshes; reusing the number or the peer elsewhere: 400.
    assert_eq!(channel_bind(&mut h, client, &c, 0x4001, peer), None);
    assert_eq!(
        channel_bind(&mut h, client, &c, 0x4001, addr("203.0.113.20:6001")),
        Some(400)
    );
    assert_eq!(channel_bind(&mut h, client, &c, 0x4002, peer), Some(400));

    // Client -> peer.
    let mut cd = vec![0u8; 4 + 5];
    let n = ChannelData::new(0x4001, b"hello").write_into_unchecked(&mut cd);
    h.relay.handle_client(h.now, client, &cd[..n]);
    let t = h.transmits();
    assert_eq!(
        t,
        vec![RelayTransmit {
            socket: RelaySocket::Relayed(id),
            dst: peer,
            payload: b"hello".to_vec(),
        }]
    );
    // An unbound channel number: dropped.
    let n = ChannelData::new(0x4003, b"hello").write_into_unchecked(&mut cd);
    h.relay.handle_client(h.now, client, &cd[..n]);
    assert!(h.transmits().is_empty());

    // Peer -> client as ChannelData.
    h.relay.handle_peer(h.now, id, peer, b"back");
    let t = h.transmits();
    assert_eq!(t.len(), 1);
    let cd = ChannelData::parse(&t[0].payload).unwrap();
    assert_eq!((cd.id(), cd.data()), (0x4001, &b"back"[..]));
    // Another port of the same peer (permission yes, channel no): Data indication.
    h.relay
        .handle_peer(h.now, id, addr("203.0.113.20:6001"), b"other port");
    let t = h.transmits();
    let m = Message::from_bytes(&t[0].payload).unwrap();
    assert!(m.has_method(DATA));
}

#[test]
fn refresh_with_lifetime_zero_deletes_the_allocation() {
    let mut h = H::new(RelayConfig::default());
    let client = addr(CLIENT);
    let (id, c) = h.allocate(client, "alice", addr(RELAYED));
    let r = refresh(&mut h, client, &c, 0);
    let m = Message::from_bytes(&r).unwrap();
    assert!(m.has_class(MessageClass::Success));
    assert_eq!(m.attribute::<Lifetime>().unwrap().seconds(), 0);
    assert_eq!(h.events(), vec![RelayEvent::AllocationExpired { id }]);
    assert_eq!(h.relay.allocation_count(), 0);
    assert_eq!(h.relay.poll_timeout(), None);
    // Anything further on that 5-tuple: 437.
    assert_eq!(permit(&mut h, client, &c, addr(PEER)), Some(437));
    h.relay.handle_peer(h.now, id, addr(PEER), b"late");
    assert!(h.transmits().is_empty());
}

#[test]
fn refresh_extends_and_clamps_the_lifetime() {
    let mut h = H::new(RelayConfig::default());
    let client = addr(CLIENT);
    let (_id, c) = h.allocate(client, "alice", addr(RELAYED));
    let lt = |r: &[u8]| {
        Message::from_bytes(r)
            .unwrap()
            .attribute::<Lifetime>()
            .unwrap()
            .seconds()
    };
    assert_eq!(
        lt(&refresh(&mut h, client, &c, 60)),
        600,
        "at least the default"
    );
    assert_eq!(
        lt(&refresh(&mut h, client, &c, 999_999)),
        3600,
        "at most the max"
    );
    assert_eq!(
        h.relay.poll_timeout(),
        Some(h.now + Duration::from_secs(3600))
    );
    // Another user's credentials on this allocation: 441.
    let other = h.creds(client, "bob");
    let (username, password) = turn_credentials(&SECRET, "bob", UNIX0 + 3600);
    let other = Creds {
        username,
        password,
        nonce: other.nonce,
    };
    let r = refresh(&mut h, client, &other, 600);
    assert_eq!(reply_code(&r), Some(441));
}

#[test]
fn allocations_permissions_and_channels_expire_on_virtual_time() {
    let mut h = H::new(RelayConfig::default());
    let client = addr(CLIENT);
    let peer = addr(PEER);
    let other = addr("203.0.113.30:6000");
    let (id, c) = h.allocate(client, "alice", addr(RELAYED));
    assert_eq!(permit(&mut h, client, &c, peer), None);
    assert_eq!(channel_bind(&mut h, client, &c, 0x4000, other), None);

    // Permissions last 300 s.
    h.advance(Duration::from_secs(299));
    h.relay.handle_peer(h.now, id, peer, b"x");
    assert_eq!(h.transmits().len(), 1);
    h.advance(Duration::from_secs(1));
    h.relay.handle_peer(h.now, id, peer, b"x");
    h.relay.handle_peer(h.now, id, other, b"x");
    assert!(h.transmits().is_empty(), "both permissions expired");
    // The channel (600 s) outlives its permission: a CreatePermission brings it back.
    assert_eq!(permit(&mut h, client, &c, other), None);
    h.relay.handle_peer(h.now, id, other, b"y");
    let t = h.transmits();
    assert_eq!(ChannelData::parse(&t[0].payload).unwrap().id(), 0x4000);

    // The allocation lasts 600 s from its creation.
    assert!(h.events().is_empty());
    h.advance(Duration::from_secs(299));
    assert!(h.events().is_empty());
    assert_eq!(h.relay.allocation_count(), 1);
    h.advance(Duration::from_secs(1));
    assert_eq!(h.events(), vec![RelayEvent::AllocationExpired { id }]);
    assert_eq!(h.relay.allocation_count(), 0);
    assert_eq!(h.relay.poll_timeout(), None);

    // The same client can allocate again.
    let (id2, _) = h.allocate(client, "alice", addr(RELAYED));
    assert_ne!(id, id2);
}

#[test]
fn channels_expire_and_stay_reserved() {
    let mut h = H::new(RelayConfig::default());
    let client = addr(CLIENT);
    let peer = addr(PEER);
    let (id, c) = h.allocate(client, "alice", addr(RELAYED));
    refresh(&mut h, client, &c, 3600);
    assert_eq!(channel_bind(&mut h, client, &c, 0x4000, peer), None);
    h.advance(Duration::from_secs(590));
    assert_eq!(permit(&mut h, client, &c, peer), None);
    h.advance(Duration::from_secs(10));
    // Channel expired (permission still fresh): data arrives as a Data indication.
    h.relay.handle_peer(h.now, id, peer, b"z");
    let t = h.transmits();
    assert!(Message::from_bytes(&t[0].payload).unwrap().has_method(DATA));
    // Within the quarantine the number cannot go to another peer.
    assert_eq!(
        channel_bind(&mut h, client, &c, 0x4000, addr("203.0.113.31:1")),
        Some(400)
    );
    h.advance(Duration::from_secs(300));
    assert_eq!(
        channel_bind(&mut h, client, &c, 0x4000, addr("203.0.113.31:1")),
        None
    );
}

#[test]
fn quotas_per_user_and_in_total() {
    let config = RelayConfig {
        max_allocations_per_user: 2,
        max_allocations: 3,
        ..RelayConfig::default()
    };
    let mut h = H::new(config);
    h.allocate(addr("198.51.100.1:1"), "alice", addr("192.0.2.1:1"));
    h.allocate(addr("198.51.100.1:2"), "alice", addr("192.0.2.1:2"));
    // alice's third (with fresh credentials of another expiry): 486.
    let client = addr("198.51.100.1:3");
    let mut c = h.creds(client, "alice");
    let (username, password) = turn_credentials(&SECRET, "alice", UNIX0 + 100);
    (c.username, c.password) = (username, password);
    let r = h.auth_ask(client, ALLOCATE, &[&RequestedTransport::new(17)], &c);
    assert_eq!(reply_code(&r), Some(486));
    // bob fits once more, then the relay is full: 508.
    h.allocate(addr("198.51.100.2:1"), "bob", addr("192.0.2.1:3"));
    let client = addr("198.51.100.3:1");
    let c = h.creds(client, "carol");
    let r = h.auth_ask(client, ALLOCATE, &[&RequestedTransport::new(17)], &c);
    assert_eq!(reply_code(&r), Some(508));
    assert_eq!(h.relay.allocation_count(), 3);
}

#[test]
fn permission_limits_and_peer_policy() {
    let config = RelayConfig {
        max_permissions: 2,
        ..RelayConfig::default()
    };
    let mut h = H::new(config);
    let client = addr(CLIENT);
    let (_, c) = h.allocate(client, "alice", addr(RELAYED));
    assert_eq!(permit(&mut h, client, &c, addr("203.0.113.1:1")), None);
    assert_eq!(permit(&mut h, client, &c, addr("203.0.113.2:1")), None);
    // Refreshing an existing one is fine; a third IP is not.
    assert_eq!(permit(&mut h, client, &c, addr("203.0.113.2:9")), None);
    assert_eq!(permit(&mut h, client, &c, addr("203.0.113.3:1")), Some(508));
    // Loopback, private and multicast peers are forbidden by default; IPv6 on an IPv4
    // allocation is a family mismatch.
    for p in ["127.0.0.1:1", "10.0.0.1:1", "192.168.1.1:1", "224.0.0.1:1"] {
        assert_eq!(permit(&mut h, client, &c, addr(p)), Some(403), "{p}");
    }
    assert_eq!(
        permit(&mut h, client, &c, addr("[2001:db8::1]:1")),
        Some(443)
    );
    // CreatePermission without a peer: 400.
    let r = h.auth_ask(client, CREATE_PERMISSION, &[], &c);
    assert_eq!(reply_code(&r), Some(400));
}

#[test]
fn binding_requests_are_answered_without_credentials() {
    let mut h = H::new(RelayConfig::default());
    let client = addr(CLIENT);
    let tx = h.txid();
    let r = h.ask(
        client,
        &request(stun_types::message::BINDING, tx, &[], None),
    );
    let m = Message::from_bytes(&r).unwrap();
    assert!(m.has_class(MessageClass::Success));
    assert_eq!(
        m.attribute::<XorMappedAddress>()
            .unwrap()
            .addr(m.transaction_id()),
        client
    );
}

#[test]
fn responses_and_garbage_get_no_answer() {
    let mut h = H::new(RelayConfig::default());
    let client = addr(CLIENT);
    let mut w = Message::builder(
        MessageType::from_class_method(MessageClass::Success, ALLOCATE),
        TransactionId::from(5),
        MessageWriteVec::new(),
    );
    w.add_attribute(&Lifetime::new(5)).unwrap();
    h.relay.handle_client(h.now, client, &w.finish());
    for junk in [
        &b""[..],
        b"\x00",
        b"\xff\xff\xff\xff",
        b"\x40\x00\x00\x10ab",
    ] {
        h.relay.handle_client(h.now, client, junk);
    }
    assert!(h.transmits().is_empty());
    assert!(h.events().is_empty());
}

/// A valid authenticated CreatePermission, for mutation below.
fn sample_requests() -> (H, SocketAddr, AllocationId, Vec<Vec<u8>>) {
    let mut h = H::new(RelayConfig {
        allow_loopback_peers: true,
        ..RelayConfig::default()
    });
    let client = addr(CLIENT);
    let (id, c) = h.allocate(client, "alice", addr(RELAYED));
    let tx = h.txid();
    let a = request(
        CREATE_PERMISSION,
        tx,
        &[&XorPeerAddress::new(addr(PEER), tx)],
        Some(&c),
    );
    let tx = h.txid();
    let b = request(
        CHANNEL_BIND,
        tx,
        &[
            &ChannelNumber::new(0x4000),
            &XorPeerAddress::new(addr(PEER), tx),
        ],
        Some(&c),
    );
    let tx = h.txid();
    let s = indication(
        SEND,
        tx,
        &[&XorPeerAddress::new(addr(PEER), tx), &Data::new(b"abc")],
    );
    let r = request(REFRESH, h.txid(), &[&Lifetime::new(600)], Some(&c));
    (
        h,
        client,
        id,
        vec![a, b, s, r, vec![0x40, 0, 0, 3, 1, 2, 3]],
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn handle_client_never_panics_on_random_bytes(
        bytes in proptest::collection::vec(any::<u8>(), 0..600),
    ) {
        let mut h = H::new(RelayConfig::default());
        h.relay.handle_client(h.now, addr(CLIENT), &bytes);
        // Also from a client with an allocation, and from a peer towards it.
        let owner = addr("198.51.100.1:1");
        let (id, _) = h.allocate(owner, "alice", addr(RELAYED));
        h.relay.handle_client(h.now, owner, &bytes);
        h.relay.handle_peer(h.now, id, addr(PEER), &bytes);
        while h.relay.poll_transmit().is_some() {}
    }

    #[test]
    fn handle_client_never_panics_on_stun_shaped_bytes(
        class_method in any::<u16>(),
        tail in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        // A valid header (magic cookie, length matching) so the parser goes deeper.
        let mut b = Vec::with_capacity(20 + tail.len());
        b.extend_from_slice(&(class_method & 0x3FFF).to_be_bytes());
        b.extend_from_slice(&(tail.len() as u16).to_be_bytes());
        b.extend_from_slice(&0x2112_A442u32.to_be_bytes());
        b.extend_from_slice(&[7; 12]);
        b.extend_from_slice(&tail);
        let mut h = H::new(RelayConfig::default());
        h.relay.handle_client(h.now, addr(CLIENT), &b);
        while h.relay.poll_transmit().is_some() {}
    }

    #[test]
    fn mutated_valid_messages_never_panic(
        which in 0usize..5,
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
        cut in any::<usize>(),
    ) {
        let (mut h, client, id, reqs) = sample_requests();
        let mut m = reqs[which].clone();
        for (at, x) in flips {
            let i = at % m.len();
            m[i] ^= x;
        }
        let keep = m.len() - cut % (m.len() / 2 + 1);
        m.truncate(keep);
        h.relay.handle_client(h.now, client, &m);
        h.relay.handle_peer(h.now, id, addr(PEER), &m);
        h.advance(Duration::from_secs(1000));
        while h.relay.poll_transmit().is_some() {}
    }
}
