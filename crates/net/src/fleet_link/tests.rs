use super::*;

const WAIT: Duration = Duration::from_secs(10);

fn cfg(node: u32, epoch: u64, psk: u8) -> FleetLinkConfig {
    FleetLinkConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        psk: [psk; 32],
        node_id: node,
        epoch,
    }
}

async fn link(node: u32, epoch: u64, psk: u8) -> (FleetLink, mpsc::Receiver<Incoming>) {
    FleetLink::bind(cfg(node, epoch, psk))
        .await
        .expect("bind loopback")
}

async fn recv(rx: &mut mpsc::Receiver<Incoming>) -> Incoming {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("a message within the deadline")
        .expect("link alive")
}

async fn wait_for(what: &str, f: impl Fn() -> bool) {
    let t0 = Instant::now();
    while !f() {
        assert!(t0.elapsed() < WAIT, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Sends, retrying while the queue is full (the caller a well-behaved node would be).
async fn send_retrying(l: &FleetLink, node: u32, addr: SocketAddr, msg: Vec<u8>) {
    let t0 = Instant::now();
    loop {
        match l.send(node, addr, msg.clone()) {
            Ok(()) => return,
            Err(LinkSendError::QueueFull(_)) => {
                assert!(t0.elapsed() < WAIT, "queue stayed full");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            Err(e) => panic!("send failed: {e}"),
        }
    }
}

/// An address nothing listens on (bound, then released).
async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    l.local_addr().expect("addr")
}

/// A raw client that completes the handshake as `node` and returns the stream and keys.
async fn authenticated_client(to: SocketAddr, psk: u8, node: u32) -> (TcpStream, TransportState) {
    let mut s = TcpStream::connect(to).await.expect("connect");
    let (ts, _, _) = initiate(&mut s, &[psk; 32], node, 1)
        .await
        .expect("handshake");
    (s, ts)
}

#[test]
fn hello_round_trips_and_rejects_other_shapes() {
    let h = hello(7, 0x0102_0304_0506_0708);
    assert_eq!(
        h,
        [1, 0, 0, 0, 7, 1, 2, 3, 4, 5, 6, 7, 8],
        "version, node id and epoch, big-endian"
    );
    assert_eq!(parse_hello(&h).ok(), Some((7, 0x0102_0304_0506_0708)));
    assert!(parse_hello(&h[..12]).is_err());
    let mut bad = h;
    bad[0] = 2;
    assert!(parse_hello(&bad).is_err(), "unknown version");
    let mut long = h.to_vec();
    long.push(0);
    assert!(parse_hello(&long).is_err());
}

#[tokio::test]
async fn ten_thousand_messages_in_order_both_ways() {
    let (a, mut arx) = link(1, 11, 9).await;
    let (b, mut brx) = link(2, 22, 9).await;
    const N: u32 = 10_000;
    let (aa, ba) = (a.local_addr(), b.local_addr());
    let (a2, b2) = (a.clone(), b.clone());
    let sa = tokio::spawn(async move {
        for i in 0..N {
            send_retrying(&a2, 2, ba, i.to_be_bytes().repeat(8)).await;
        }
    });
    let sb = tokio::spawn(async move {
        for i in 0..N {
            send_retrying(&b2, 1, aa, i.to_be_bytes().repeat(8)).await;
        }
    });
    for i in 0..N {
        let m = recv(&mut brx).await;
        assert_eq!((m.node, m.epoch), (1, 11));
        assert_eq!(
            m.msg,
            i.to_be_bytes().repeat(8),
            "b got message {i} in order"
        );
        let m = recv(&mut arx).await;
        assert_eq!((m.node, m.epoch), (2, 22));
        assert_eq!(
            m.msg,
            i.to_be_bytes().repeat(8),
            "a got message {i} in order"
        );
    }
    sa.await.expect("sender a");
    sb.await.expect("sender b");
    for l in [&a, &b] {
        let s = l.stats();
        assert_eq!((s.sent, s.received), (u64::from(N), u64::from(N)));
        assert_eq!((s.connects, s.accepts), (1, 1), "one connection each way");
        assert_eq!((s.lost, s.expired, s.handshake_failures), (0, 0, 0));
    }
}

#[tokio::test]
async fn wrong_psk_is_rejected_and_counted() {
    let (a, _arx) = link(1, 1, 1).await;
    let (b, mut brx) = link(2, 1, 2).await;
    a.send(2, b.local_addr(), b"hi".to_vec()).expect("queued");
    wait_for("both sides to count the failed handshake", || {
        b.stats().handshake_failures >= 1 && a.stats().handshake_failures >= 1
    })
    .await;
    assert_eq!(b.stats().accepts, 0);
    assert_eq!(a.stats().connects, 0);
    assert!(
        tokio::time::timeout(Duration::from_millis(200), brx.recv())
            .await
            .is_err(),
        "nothing delivered"
    );
}

#[tokio::test]
async fn garbage_and_over_long_frames_are_dropped_without_disturbing_others() {
    let (a, _arx) = link(1, 1, 5).await;
    let (b, mut brx) = link(2, 1, 5).await;
    let ba = b.local_addr();
    a.send(2, ba, b"before".to_vec()).expect("queued");
    assert_eq!(recv(&mut brx).await.msg, b"before");

    // A stranger sending garbage: the handshake fails and the connection closes.
    let mut g = TcpStream::connect(ba).await.expect("connect");
    let mut junk = vec![0, HANDSHAKE_FRAME as u8];
    junk.extend((0..HANDSHAKE_FRAME).map(|i| i as u8));
    g.write_all(&junk).await.expect("write");
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(WAIT, g.read(&mut byte)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "garbage client closed");

    // A stranger announcing a frame longer than a handshake: closed before the body.
    let mut o = TcpStream::connect(ba).await.expect("connect");
    o.write_all(&[0xff, 0xff]).await.expect("write");
    let n = tokio::time::timeout(WAIT, o.read(&mut byte)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "over-long client closed"
    );
    wait_for("two handshake failures", || {
        b.stats().handshake_failures == 2
    })
    .await;

    // A fleet member sending a frame over the limit after its handshake: disconnected.
    let (mut m, _ts) = authenticated_client(ba, 5, 3).await;
    let over = u16::try_from(MAX_FRAME + 1).expect("fits u16");
    m.write_all(&over.to_be_bytes()).await.expect("write");
    let n = tokio::time::timeout(WAIT, m.read(&mut byte)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "member closed");
    wait_for("a protocol error", || b.stats().protocol_errors == 1).await;

    // A member sending a frame that does not decrypt: disconnected too.
    let (mut m, _ts) = authenticated_client(ba, 5, 4).await;
    m.write_all(&[0, 20]).await.expect("write");
    m.write_all(&[0xaa; 20]).await.expect("write");
    let n = tokio::time::timeout(WAIT, m.read(&mut byte)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "member closed");
    wait_for("a second protocol error", || b.stats().protocol_errors == 2).await;

    // The honest connection was not disturbed.
    a.send(2, ba, b"after".to_vec()).expect("queued");
    let got = recv(&mut brx).await;
    assert_eq!((got.node, got.msg.as_slice()), (1, &b"after"[..]));
    assert_eq!(a.stats().connects, 1, "same connection as before");
    assert_eq!(b.stats().accepts, 3, "a and the two members");
}

#[tokio::test]
async fn authenticated_messages_from_a_raw_member_are_delivered() {
    let (b, mut brx) = link(2, 1, 5).await;
    let (mut m, mut ts) = authenticated_client(b.local_addr(), 5, 3).await;
    let mut out = Vec::new();
    seal_frame(&mut ts, b"one", &mut out).expect("seal");
    seal_frame(&mut ts, &[7; MAX_MSG], &mut out).expect("seal");
    m.write_all(&out).await.expect("write");
    let got = recv(&mut brx).await;
    assert_eq!(
        (got.node, got.epoch, got.msg.as_slice()),
        (3, 1, &b"one"[..])
    );
    assert_eq!(
        recv(&mut brx).await.msg,
        vec![7; MAX_MSG],
        "a maximal message"
    );
}

#[tokio::test]
async fn stalled_frame_and_stalled_handshake_time_out() {
    let limits = FleetLinkLimits {
        handshake_timeout: Duration::from_millis(200),
        frame_timeout: Duration::from_millis(200),
        ..FleetLinkLimits::default()
    };
    let (b, _brx) = FleetLink::bind_with(cfg(2, 1, 5), limits)
        .await
        .expect("bind");
    let ba = b.local_addr();
    let mut byte = [0u8; 1];
    // Connects and says nothing.
    let mut idle = TcpStream::connect(ba).await.expect("connect");
    let n = tokio::time::timeout(WAIT, idle.read(&mut byte)).await;
    assert!(
        matches!(n, Ok(Ok(0)) | Ok(Err(_))),
        "silent stranger closed"
    );
    assert_eq!(b.stats().handshake_failures, 1);
    // A member that starts a frame and stalls.
    let (mut m, _ts) = authenticated_client(ba, 5, 3).await;
    m.write_all(&[0, 100, 1, 2, 3]).await.expect("write");
    let n = tokio::time::timeout(WAIT, m.read(&mut byte)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "stalled member closed");
    wait_for("a protocol error", || b.stats().protocol_errors == 1).await;
    wait_for("no connections left", || b.inbound_counts() == (0, 0)).await;
}

#[tokio::test]
async fn handshakes_in_progress_are_capped_per_address() {
    let limits = FleetLinkLimits {
        max_handshakes_per_ip: 2,
        ..FleetLinkLimits::default()
    };
    let (b, mut brx) = FleetLink::bind_with(cfg(2, 1, 5), limits)
        .await
        .expect("bind");
    let ba = b.local_addr();
    // The strangers come from 127.0.0.3; members from other loopback addresses.
    let from = |ip: [u8; 4]| async move {
        let sock = tokio::net::TcpSocket::new_v4().expect("socket");
        sock.bind(SocketAddr::from((ip, 0)))
            .expect("bind loopback alias");
        sock.connect(ba).await.expect("connect")
    };
    let _s1 = from([127, 0, 0, 3]).await;
    let _s2 = from([127, 0, 0, 3]).await;
    wait_for("two pending handshakes", || b.inbound_counts() == (0, 2)).await;
    let mut s3 = from([127, 0, 0, 3]).await;
    let mut byte = [0u8; 1];
    let n = tokio::time::timeout(WAIT, s3.read(&mut byte)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "third closed at once");
    assert_eq!(b.stats().rejected, 1);
    // Another source address still gets in.
    let mut s4 = from([127, 0, 0, 2]).await;
    let (_ts, peer, _) = initiate(&mut s4, &[5; 32], 9, 1).await.expect("handshake");
    assert_eq!(peer, 2);
    let (a, _arx) = link(1, 1, 5).await;
    a.send(2, ba, b"x".to_vec()).expect("queued");
    assert_eq!(
        recv(&mut brx).await.node,
        1,
        "members on other addresses unaffected"
    );
    assert_eq!(a.stats().connects, 1, "at the first attempt");
    assert_eq!(
        b.inbound_counts(),
        (2, 2),
        "a, node 9, and the two strangers"
    );
}

#[tokio::test]
async fn restarted_peer_is_reconnected_and_gets_later_messages() {
    let (a, _arx) = link(1, 1, 5).await;
    let (b, mut brx) = link(2, 100, 5).await;
    let ba = b.local_addr();
    a.send(2, ba, b"first".to_vec()).expect("queued");
    assert_eq!(recv(&mut brx).await.msg, b"first");
    drop(b);
    drop(brx);
    // The same address, a new epoch (retry while the old listener is being torn down).
    let t0 = Instant::now();
    let (b2, mut brx2) = loop {
        match FleetLink::bind(FleetLinkConfig {
            listen: ba,
            ..cfg(2, 101, 5)
        })
        .await
        {
            Ok(x) => break x,
            Err(e) => {
                assert!(t0.elapsed() < WAIT, "rebind failed: {e}");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // Messages sent while the old connection dies may be lost; later ones arrive in order.
    let mut i = 0u32;
    let first = loop {
        a.send(2, ba, i.to_be_bytes().to_vec()).expect("queued");
        i += 1;
        if let Ok(Some(m)) = tokio::time::timeout(Duration::from_millis(50), brx2.recv()).await {
            break m;
        }
        assert!(i < 200, "restarted peer never reached");
    };
    assert_eq!((first.node, first.epoch), (1, 1));
    let mut last = u32::from_be_bytes(first.msg.try_into().expect("4 bytes"));
    for j in i..i + 100 {
        a.send(2, ba, j.to_be_bytes().to_vec()).expect("queued");
    }
    loop {
        let m = recv(&mut brx2).await;
        let k = u32::from_be_bytes(m.msg.try_into().expect("4 bytes"));
        assert!(k > last, "in order, never duplicated: {k} after {last}");
        last = k;
        if k == i + 99 {
            break;
        }
    }
    assert!(a.stats().connects >= 2, "reconnected");
    assert_eq!(b2.stats().accepts, 1);
}

#[tokio::test]
async fn forget_drops_the_queue() {
    let (a, _arx) = link(1, 1, 5).await;
    let (b, mut brx) = link(2, 1, 5).await;
    let dead = dead_addr().await;
    for i in 0..10u8 {
        a.send(2, dead, vec![i]).expect("queued");
    }
    wait_for("a failed connect", || a.stats().connect_failures >= 1).await;
    a.forget(2);
    a.send(2, b.local_addr(), b"fresh".to_vec())
        .expect("queued");
    let m = recv(&mut brx).await;
    assert_eq!(m.msg, b"fresh", "the forgotten queue was not delivered");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), brx.recv())
            .await
            .is_err(),
        "nothing else arrives"
    );
}

#[tokio::test]
async fn new_address_reroutes_the_queue() {
    // The counterpart of forget: without it, queued messages follow the node's new address.
    let (a, _arx) = link(1, 1, 5).await;
    let (b, mut brx) = link(2, 1, 5).await;
    let dead = dead_addr().await;
    for i in 0..10u8 {
        a.send(2, dead, vec![i]).expect("queued");
    }
    wait_for("a failed connect", || a.stats().connect_failures >= 1).await;
    a.send(2, b.local_addr(), vec![10]).expect("queued");
    for i in 0..=10u8 {
        assert_eq!(recv(&mut brx).await.msg, vec![i]);
    }
}

#[tokio::test]
async fn forget_closes_the_inbound_connection() {
    let (a, _arx) = link(1, 1, 5).await;
    let (b, mut brx) = link(2, 1, 5).await;
    a.send(2, b.local_addr(), b"x".to_vec()).expect("queued");
    recv(&mut brx).await;
    assert_eq!(b.inbound_counts(), (1, 0));
    b.forget(1);
    wait_for("the inbound connection closed", || {
        b.inbound_counts() == (0, 0)
    })
    .await;
}

#[tokio::test]
async fn full_queue_returns_err_and_counts() {
    let limits = FleetLinkLimits {
        queue_len: 4,
        ..FleetLinkLimits::default()
    };
    let (a, _arx) = FleetLink::bind_with(cfg(1, 1, 5), limits)
        .await
        .expect("bind");
    let dead = dead_addr().await;
    let mut accepted = 0;
    let err = loop {
        match a.send(2, dead, vec![0; 10]) {
            Ok(()) => accepted += 1,
            Err(e) => break e,
        }
        assert!(accepted <= 5, "the queue is bounded");
    };
    assert_eq!(err, LinkSendError::QueueFull(2));
    // Four queued, plus at most one taken by the connecting task.
    assert!((4..=5).contains(&accepted), "accepted {accepted}");
    assert_eq!(a.stats().dropped, 1);
    assert_eq!(
        a.send(2, dead, vec![0; MAX_MSG + 1]),
        Err(LinkSendError::TooLarge(MAX_MSG + 1))
    );
}

#[tokio::test]
async fn slow_receiver_pushes_back_to_the_sender() {
    let small = FleetLinkLimits {
        queue_len: 8,
        incoming_len: 8,
        ..FleetLinkLimits::default()
    };
    let (a, _arx) = FleetLink::bind_with(cfg(1, 1, 5), small.clone())
        .await
        .expect("bind");
    let (b, mut brx) = FleetLink::bind_with(cfg(2, 1, 5), small)
        .await
        .expect("bind");
    // Nobody reads brx: the reader stops, TCP's buffers fill, then a's queue.
    let mut accepted = 0u32;
    let t0 = Instant::now();
    loop {
        match a.send(2, b.local_addr(), accepted.to_be_bytes().repeat(2048)) {
            Ok(()) => accepted += 1,
            Err(LinkSendError::QueueFull(2)) => break,
            Err(e) => panic!("unexpected {e}"),
        }
        assert!(t0.elapsed() < WAIT, "the sender never felt backpressure");
        tokio::task::yield_now().await;
    }
    // Then every accepted message arrives, in order, once the receiver reads.
    for i in 0..accepted {
        let m = recv(&mut brx).await;
        assert_eq!(m.msg, i.to_be_bytes().repeat(2048), "message {i}");
    }
    assert_eq!(b.stats().received, u64::from(accepted));
    assert!(a.stats().dropped >= 1);
}

#[tokio::test]
async fn wrong_node_at_the_address_is_a_handshake_failure() {
    let (a, _arx) = link(1, 1, 5).await;
    let (c, mut crx) = link(3, 1, 5).await;
    a.send(2, c.local_addr(), b"for 2".to_vec())
        .expect("queued");
    wait_for("the mismatch to count", || {
        a.stats().handshake_failures >= 1
    })
    .await;
    assert!(
        tokio::time::timeout(Duration::from_millis(200), crx.recv())
            .await
            .is_err(),
        "node 3 never gets node 2's message"
    );
}

#[tokio::test]
async fn dropping_the_link_closes_everything() {
    let (a, _arx) = link(1, 1, 5).await;
    let (b, mut brx) = link(2, 1, 5).await;
    a.send(2, b.local_addr(), b"x".to_vec()).expect("queued");
    recv(&mut brx).await;
    drop(a);
    wait_for("the inbound connection closed", || {
        b.inbound_counts() == (0, 0)
    })
    .await;
    drop(b);
    let end = tokio::time::timeout(WAIT, brx.recv()).await;
    assert_eq!(end.ok(), Some(None), "incoming channel ends with the link");
}

#[tokio::test]
async fn outbound_sockets_abort_on_unacknowledged_data() {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let s = TcpStream::connect(l.local_addr().expect("addr"))
        .await
        .expect("connect");
    detect_dead_peer(&s, Duration::from_secs(10)).expect("socket options");
    use rustix::net::sockopt;
    assert_eq!(sockopt::tcp_user_timeout(&s).expect("get"), 10_000);
    assert!(sockopt::socket_keepalive(&s).expect("get"));
    assert_eq!(
        sockopt::tcp_keepidle(&s).expect("get"),
        Duration::from_secs(10)
    );
}

#[tokio::test]
async fn established_inbound_connections_are_capped_before_the_handshake() {
    let limits = FleetLinkLimits {
        max_inbound: 1,
        ..FleetLinkLimits::default()
    };
    let (b, mut brx) = FleetLink::bind_with(cfg(2, 1, 5), limits)
        .await
        .expect("bind");
    let (a, _arx) = link(1, 1, 5).await;
    let (c, _crx) = link(3, 1, 5).await;
    a.send(2, b.local_addr(), b"a".to_vec()).expect("queued");
    assert_eq!(recv(&mut brx).await.node, 1);
    c.send(2, b.local_addr(), b"c".to_vec()).expect("queued");
    wait_for("c refused", || b.stats().rejected >= 1).await;
    wait_for("c backing off", || c.stats().handshake_failures >= 1).await;
    assert_eq!(c.stats().connects, 0);
    assert_eq!(b.inbound_counts(), (1, 0));
    // When a leaves, c's retry gets in with the message it kept.
    b.forget(1);
    let m = recv(&mut brx).await;
    assert_eq!((m.node, m.msg.as_slice()), (3, &b"c"[..]));
}
