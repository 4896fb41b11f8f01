//! Interop: the relay glue on 127.0.0.1 against an independent TURN client
//! (`turn-client-proto`, sans-IO) driven over real UDP sockets, with a plain UDP socket as
//! the peer, over UDP and over TCP (client to relay). Proves the relay speaks TURN, not just
//! what our own tests expect.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use peerline_core::relay::{turn_credentials, RelayConfig};
use peerline_net::relay::{RelayRuntime, RelayServer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use turn_client_proto::api::Transmit;
use turn_client_proto::api::{TurnClientApi, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet};
use turn_client_proto::tcp::TurnClientTcp;
use turn_client_proto::types::{TransportType, TurnCredentials};
use turn_client_proto::udp::TurnClientUdp;

type TurnInstant = turn_client_proto::stun::Instant;

const SECRET: [u8; 32] = [0x42; 32];

/// A TURN client on a real socket, with the clock `turn-client-proto` wants.
struct Client {
    turn: TurnClientUdp,
    socket: UdpSocket,
    start: std::time::Instant,
    /// Peer data received: (peer, bytes).
    received: Vec<(SocketAddr, Vec<u8>)>,
    events: Vec<TurnEvent>,
    /// Every datagram received from the relay, raw.
    raw: Vec<Vec<u8>>,
    /// The client gave up or finished (its `poll` said `Closed`).
    closed: bool,
}

impl Client {
    fn now(&self) -> TurnInstant {
        TurnInstant::from_std(self.start)
    }

    async fn flush(&mut self) {
        let now = self.now();
        while let Some(t) = self.turn.poll_transmit(now) {
            self.socket.send_to(&t.data, t.to).await.unwrap();
        }
        while let Some(e) = self.turn.poll_event() {
            self.events.push(e);
        }
    }

    /// Runs the client (sending, receiving, timers) until `done` holds or 5 s pass.
    async fn drive_until(&mut self, mut done: impl FnMut(&Client) -> bool) {
        let give_up = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 65_536];
        loop {
            self.flush().await;
            if done(self) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "timed out; events so far: {:?}",
                self.events
            );
            let now = self.now();
            let wait = match self.turn.poll(now) {
                TurnPollRet::WaitUntil(at) => at.saturating_duration_since(now),
                TurnPollRet::Closed => {
                    self.closed = true;
                    assert!(done(self), "client closed; events: {:?}", self.events);
                    return;
                }
                other => panic!("unexpected poll result {other:?}"),
            };
            let wait = wait.clamp(Duration::from_millis(1), Duration::from_millis(50));
            if let Ok(r) = tokio::time::timeout(wait, self.socket.recv_from(&mut buf)).await {
                let (n, from) = r.unwrap();
                let local = self.socket.local_addr().unwrap();
                let now = self.now();
                self.raw.push(buf[..n].to_vec());
                let t = Transmit::new(&buf[..n], TransportType::Udp, from, local);
                match self.turn.recv(t, now) {
                    TurnRecvRet::PeerData(d) => self.received.push((d.peer, d.data().to_vec())),
                    TurnRecvRet::Handled | TurnRecvRet::Ignored(_) => {}
                    other => panic!("unexpected recv result {other:?}"),
                }
            }
        }
    }

    async fn send_to_peer(&mut self, peer: SocketAddr, data: &[u8]) {
        let now = self.now();
        let t = self
            .turn
            .send_to(TransportType::Udp, peer, data, now)
            .unwrap()
            .expect("something to send to the relay");
        let t = t.build();
        self.socket.send_to(&t.data, t.to).await.unwrap();
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn start_relay() -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let server = RelayServer::bind(RelayRuntime {
        listen: "127.0.0.1:0".parse().unwrap(),
        secret: SECRET,
        config: RelayConfig {
            // The test's peer lives on loopback.
            allow_loopback_peers: true,
            ..RelayConfig::default()
        },
        advertise_ip: None,
        tcp: true,
    })
    .await
    .unwrap();
    let addr = server.local_addr();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(server.run(async move {
        let _ = stopped.await;
    }));
    (addr, stop)
}

async fn client_for(relay: SocketAddr, username: &str, password: &str) -> Client {
    let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let local = socket.local_addr().unwrap();
    let mut config = TurnConfig::new(TurnCredentials::new(username, password));
    // Loopback answers in microseconds: give up on a transaction after ~1 s, not 39 s.
    config.set_request_retransmits(
        Duration::from_millis(100),
        Duration::from_millis(200),
        4,
        Duration::from_millis(400),
    );
    Client {
        turn: TurnClientUdp::allocate(local, relay, config),
        socket,
        start: std::time::Instant::now(),
        received: Vec::new(),
        events: Vec::new(),
        raw: Vec::new(),
        closed: false,
    }
}

/// Error codes of the STUN error responses the client received.
fn error_codes(c: &Client) -> Vec<u16> {
    use turn_client_proto::types::stun::attribute::ErrorCode;
    use turn_client_proto::types::stun::message::{Message, MessageClass};
    c.raw
        .iter()
        .filter_map(|b| Message::from_bytes(b).ok())
        .filter(|m| m.has_class(MessageClass::Error))
        .filter_map(|m| m.attribute::<ErrorCode>().ok().map(|e| e.code()))
        .collect()
}

fn allocated(c: &Client) -> Option<SocketAddr> {
    c.events.iter().find_map(|e| match e {
        TurnEvent::AllocationCreated(TransportType::Udp, a) => Some(*a),
        _ => None,
    })
}

#[tokio::test]
async fn turn_client_proto_allocates_and_exchanges_data_through_the_relay() {
    let (relay, _stop) = start_relay().await;
    let (username, password) = turn_credentials(&SECRET, "alice", unix_now() + 3600);
    let mut client = client_for(relay, &username, &password).await;

    // Allocate (401 challenge, then the authenticated request).
    client.drive_until(|c| allocated(c).is_some()).await;
    let relayed = allocated(&client).unwrap();
    assert_eq!(relayed.ip(), relay.ip(), "relayed on the listening IP");
    assert_ne!(relayed.port(), relay.port());

    // Permission for the peer.
    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let now = client.now();
    client
        .turn
        .create_permission(TransportType::Udp, peer_addr.ip(), now)
        .unwrap();
    client
        .drive_until(|c| {
            c.events
                .iter()
                .any(|e| matches!(e, TurnEvent::PermissionCreated(..)))
        })
        .await;

    // Client -> peer (Send indication): arrives from the relayed address.
    client.send_to_peer(peer_addr, b"hello peer").await;
    let mut buf = [0u8; 1500];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut buf))
        .await
        .expect("peer got the datagram")
        .unwrap();
    assert_eq!(&buf[..n], b"hello peer");
    assert_eq!(from, relayed);

    // Peer -> client (Data indication).
    peer.send_to(b"hello client", relayed).await.unwrap();
    client.drive_until(|c| !c.received.is_empty()).await;
    assert_eq!(client.received[0], (peer_addr, b"hello client".to_vec()));

    // Channel: bind, then ChannelData both ways.
    let now = client.now();
    client
        .turn
        .bind_channel(TransportType::Udp, peer_addr, now)
        .unwrap();
    client
        .drive_until(|c| {
            c.events
                .iter()
                .any(|e| matches!(e, TurnEvent::ChannelCreated(..)))
        })
        .await;
    client.send_to_peer(peer_addr, b"over a channel").await;
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut buf))
        .await
        .expect("peer got the channel datagram")
        .unwrap();
    assert_eq!((&buf[..n], from), (&b"over a channel"[..], relayed));
    peer.send_to(b"channel back", relayed).await.unwrap();
    client.drive_until(|c| c.received.len() >= 2).await;
    assert_eq!(client.received[1], (peer_addr, b"channel back".to_vec()));

    // A stranger (no permission) cannot reach the client.
    let stranger = UdpSocket::bind("127.0.0.2:0").await;
    if let Ok(stranger) = stranger {
        stranger.send_to(b"spam", relayed).await.unwrap();
        peer.send_to(b"after spam", relayed).await.unwrap();
        client.drive_until(|c| c.received.len() >= 3).await;
        assert_eq!(client.received[2].1, b"after spam".to_vec());
        assert_eq!(client.received.len(), 3);
    }

    // Delete (Refresh with lifetime 0): the relayed socket closes.
    let now = client.now();
    client.turn.delete(now).unwrap();
    client.drive_until(|c| c.closed).await;
}

#[tokio::test]
async fn wrong_password_fails_the_allocation() {
    let (relay, _stop) = start_relay().await;
    let (username, _) = turn_credentials(&SECRET, "mallory", unix_now() + 3600);
    let mut client = client_for(relay, &username, "not-the-password").await;
    // The relay answers 401 again; turn-client-proto ignores an unsigned 401 once it
    // sent credentials, times the transaction out and closes.
    client.drive_until(|c| c.closed).await;
    assert!(allocated(&client).is_none());
    let codes = error_codes(&client);
    assert!(
        codes.len() >= 2 && codes.iter().all(|&c| c == 401),
        "a challenge, then a refusal of the credentials: {codes:?}"
    );
}

#[tokio::test]
async fn expired_credentials_fail_the_allocation() {
    let (relay, _stop) = start_relay().await;
    let (username, password) = turn_credentials(&SECRET, "alice", unix_now() - 10);
    let mut client = client_for(relay, &username, &password).await;
    // The relay answers 401 again; turn-client-proto ignores an unsigned 401 once it
    // sent credentials, times the transaction out and closes.
    client.drive_until(|c| c.closed).await;
    assert!(allocated(&client).is_none());
    let codes = error_codes(&client);
    assert!(
        codes.len() >= 2 && codes.iter().all(|&c| c == 401),
        "a challenge, then a refusal of the credentials: {codes:?}"
    );
}

/// A TURN client over a real TCP connection to the relay.
struct TcpClient {
    turn: TurnClientTcp,
    stream: TcpStream,
    start: std::time::Instant,
    received: Vec<(SocketAddr, Vec<u8>)>,
    events: Vec<TurnEvent>,
    closed: bool,
}

impl TcpClient {
    async fn connect(relay: SocketAddr, username: &str, password: &str) -> TcpClient {
        let stream = TcpStream::connect(relay).await.unwrap();
        stream.set_nodelay(true).unwrap();
        let local = stream.local_addr().unwrap();
        let mut config = TurnConfig::new(TurnCredentials::new(username, password));
        config.set_request_retransmits(
            Duration::from_millis(100),
            Duration::from_millis(200),
            4,
            Duration::from_millis(400),
        );
        TcpClient {
            turn: TurnClientTcp::allocate(local, relay, config),
            stream,
            start: std::time::Instant::now(),
            received: Vec::new(),
            events: Vec::new(),
            closed: false,
        }
    }

    fn now(&self) -> TurnInstant {
        TurnInstant::from_std(self.start)
    }

    async fn flush(&mut self) {
        let now = self.now();
        while let Some(t) = self.turn.poll_transmit(now) {
            assert_eq!(t.transport, TransportType::Tcp);
            self.stream.write_all(&t.data).await.unwrap();
        }
        while let Some(e) = self.turn.poll_event() {
            self.events.push(e);
        }
    }

    async fn drive_until(&mut self, mut done: impl FnMut(&TcpClient) -> bool) {
        let give_up = tokio::time::Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 65_536];
        loop {
            self.flush().await;
            if done(self) {
                return;
            }
            assert!(
                tokio::time::Instant::now() < give_up,
                "timed out; events so far: {:?}",
                self.events
            );
            let now = self.now();
            let wait = match self.turn.poll(now) {
                TurnPollRet::WaitUntil(at) => at.saturating_duration_since(now),
                TurnPollRet::Closed => {
                    self.closed = true;
                    assert!(done(self), "client closed; events: {:?}", self.events);
                    return;
                }
                other => panic!("unexpected poll result {other:?}"),
            };
            let wait = wait.clamp(Duration::from_millis(1), Duration::from_millis(50));
            if let Ok(r) = tokio::time::timeout(wait, self.stream.read(&mut buf)).await {
                let n = r.unwrap();
                assert!(n > 0, "the relay closed the connection");
                let local = self.stream.local_addr().unwrap();
                let from = self.stream.peer_addr().unwrap();
                let now = self.now();
                let t = Transmit::new(&buf[..n], TransportType::Tcp, from, local);
                match self.turn.recv(t, now) {
                    TurnRecvRet::PeerData(d) => self.received.push((d.peer, d.data().to_vec())),
                    TurnRecvRet::Handled | TurnRecvRet::Ignored(_) => {}
                    other => panic!("unexpected recv result {other:?}"),
                }
                // A chunk may hold several messages.
                while let Some(d) = self.turn.poll_recv(now) {
                    self.received.push((d.peer, d.data().to_vec()));
                }
            }
        }
    }

    async fn send_to_peer(&mut self, peer: SocketAddr, data: &[u8]) {
        let now = self.now();
        let t = self
            .turn
            .send_to(TransportType::Udp, peer, data, now)
            .unwrap()
            .expect("something to send to the relay");
        let t = t.build();
        self.stream.write_all(&t.data).await.unwrap();
    }

    fn allocated(&self) -> Option<SocketAddr> {
        self.events.iter().find_map(|e| match e {
            TurnEvent::AllocationCreated(TransportType::Udp, a) => Some(*a),
            _ => None,
        })
    }
}

async fn peer_recv(peer: &UdpSocket) -> (Vec<u8>, SocketAddr) {
    let mut buf = [0u8; 1500];
    let (n, from) = tokio::time::timeout(Duration::from_secs(5), peer.recv_from(&mut buf))
        .await
        .expect("peer got the datagram")
        .unwrap();
    (buf[..n].to_vec(), from)
}

#[tokio::test]
async fn turn_client_proto_over_tcp_allocates_and_exchanges_data_through_the_relay() {
    let (relay, _stop) = start_relay().await;
    let (username, password) = turn_credentials(&SECRET, "alice", unix_now() + 3600);
    let mut client = TcpClient::connect(relay, &username, &password).await;

    // Allocate over TCP; the relayed address is UDP on the listening IP.
    client.drive_until(|c| c.allocated().is_some()).await;
    let relayed = client.allocated().unwrap();
    assert_eq!(relayed.ip(), relay.ip(), "relayed on the listening IP");
    assert_ne!(relayed.port(), relay.port());

    let peer = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let now = client.now();
    client
        .turn
        .create_permission(TransportType::Udp, peer_addr.ip(), now)
        .unwrap();
    client
        .drive_until(|c| {
            c.events
                .iter()
                .any(|e| matches!(e, TurnEvent::PermissionCreated(..)))
        })
        .await;

    // Client -> peer (Send indication on the TCP stream).
    client.send_to_peer(peer_addr, b"hello peer").await;
    assert_eq!(peer_recv(&peer).await, (b"hello peer".to_vec(), relayed));

    // Peer -> client (Data indication on the TCP stream).
    peer.send_to(b"hello client", relayed).await.unwrap();
    client.drive_until(|c| !c.received.is_empty()).await;
    assert_eq!(client.received[0], (peer_addr, b"hello client".to_vec()));

    // Channel. turn-client-proto neither pads the ChannelData it sends on TCP nor skips
    // padding in what it receives, so: unaligned payloads client -> peer (the relay
    // accepts unpadded ChannelData, and the stream stays in sync for the next ones), and
    // 4-byte-aligned payloads peer -> client.
    let now = client.now();
    client
        .turn
        .bind_channel(TransportType::Udp, peer_addr, now)
        .unwrap();
    client
        .drive_until(|c| {
            c.events
                .iter()
                .any(|e| matches!(e, TurnEvent::ChannelCreated(..)))
        })
        .await;
    client.send_to_peer(peer_addr, b"over a channel").await;
    client.send_to_peer(peer_addr, b"odd").await;
    client.send_to_peer(peer_addr, b"aligned!").await;
    assert_eq!(
        peer_recv(&peer).await,
        (b"over a channel".to_vec(), relayed)
    );
    assert_eq!(peer_recv(&peer).await, (b"odd".to_vec(), relayed));
    assert_eq!(peer_recv(&peer).await, (b"aligned!".to_vec(), relayed));
    peer.send_to(b"channel back", relayed).await.unwrap();
    peer.send_to(b"and more", relayed).await.unwrap();
    client.drive_until(|c| c.received.len() >= 3).await;
    assert_eq!(client.received[1], (peer_addr, b"channel back".to_vec()));
    assert_eq!(client.received[2], (peer_addr, b"and more".to_vec()));

    // Delete (Refresh with lifetime 0) over TCP.
    let now = client.now();
    client.turn.delete(now).unwrap();
    client.drive_until(|c| c.closed).await;
}

#[tokio::test]
async fn tcp_garbage_closes_the_connection_and_udp_keeps_working() {
    let (relay, _stop) = start_relay().await;
    // Plain HTTP, and the start of a TLS ClientHello.
    for junk in [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        &[
            0x16, 0x03, 0x01, 0x02, 0x00, 0x01, 0x00, 0x01, 0xfc, 0x03, 0x03,
        ][..],
    ] {
        let mut conn = TcpStream::connect(relay).await.unwrap();
        conn.write_all(junk).await.unwrap();
        let mut buf = [0u8; 64];
        let n = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut buf))
            .await
            .expect("the relay closes a non-TURN connection")
            .unwrap_or(0);
        assert_eq!(n, 0);
    }

    // The relay still serves UDP clients.
    let (username, password) = turn_credentials(&SECRET, "bob", unix_now() + 3600);
    let mut client = client_for(relay, &username, &password).await;
    client.drive_until(|c| allocated(c).is_some()).await;
}
