//! Drives a [`Client`] core on a UDP socket for the user's agent.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use peerline_core::client::{Client, ClientEvent, Command, CommandId, CommandResult};
use tokio::net::UdpSocket;
use tokio::sync::{mpsc, oneshot};

/// What the agent asks of the driver.
#[derive(Debug)]
pub enum Input {
    /// Run a command and send its result back.
    Command(Command, oneshot::Sender<CommandResult>),
    /// A received message was saved: acknowledge it.
    Saved(u64),
    /// Report whether online, the user and direct peers.
    Status(oneshot::Sender<Status>),
    /// Connect now (or take the account back after a login elsewhere).
    Connect,
    /// A media datagram for an active call (dropped if the call is not active).
    CallMedia(u64, Vec<u8>),
    /// Close sessions and stop.
    Shutdown,
}

/// A snapshot of the client's state.
#[derive(Debug, Clone)]
pub struct Status {
    /// Logged in.
    pub online: bool,
    /// Certified username.
    pub user: Option<String>,
    /// Chosen presence.
    pub presence: &'static str,
    /// Users with a direct session.
    pub direct_peers: Vec<String>,
    /// The local UDP address.
    pub local: Option<SocketAddr>,
    /// How the supernode is reached: `udp`, or `tcp` in fallback.
    pub transport: &'static str,
    /// The relay allocation: `ready`, `allocating` or `none`.
    pub relay: &'static str,
    /// The supernode the session is with (or the next login goes to): in a fleet, not
    /// necessarily the bootstrap one.
    pub supernode: SocketAddr,
    /// The host cache: the bootstrap address first, then the fleet's supernodes.
    pub hosts: Vec<SocketAddr>,
}

/// The wildcard address of the same family as `server`, port chosen by the OS.
pub fn bind_addr(server: SocketAddr) -> SocketAddr {
    if server.is_ipv6() {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    } else {
        SocketAddr::from((std::net::Ipv4Addr::UNSPECIFIED, 0))
    }
}

/// The addresses a peer could reach this socket at: the interface used towards the
/// supernode, with the socket's port.
pub fn local_candidates(socket: &UdpSocket, server: SocketAddr) -> Vec<SocketAddr> {
    let port = socket.local_addr().map(|a| a.port()).unwrap_or(0);
    vec![SocketAddr::new(crate::route_source(server), port)]
}

/// The extra UDP sockets the birthday technique asks for, each with a task that hands its
/// datagrams to the driver loop.
struct ExtraSockets {
    sockets: Vec<Arc<UdpSocket>>,
    readers: Vec<tokio::task::JoinHandle<()>>,
    rx: mpsc::Receiver<(usize, SocketAddr, Vec<u8>)>,
    tx: mpsc::Sender<(usize, SocketAddr, Vec<u8>)>,
}

impl ExtraSockets {
    fn new() -> Self {
        let (tx, rx) = mpsc::channel(1024);
        ExtraSockets {
            sockets: Vec::new(),
            readers: Vec::new(),
            rx,
            tx,
        }
    }

    /// Opens or closes sockets until `want` are open (all of them close at 0).
    fn resize(&mut self, want: usize, like: SocketAddr) {
        if want == 0 {
            for r in self.readers.drain(..) {
                r.abort();
            }
            self.sockets.clear();
            return;
        }
        while self.sockets.len() < want {
            let s = match std::net::UdpSocket::bind(SocketAddr::new(like.ip(), 0))
                .and_then(|s| s.set_nonblocking(true).map(|_| s))
                .and_then(UdpSocket::from_std)
            {
                Ok(s) => Arc::new(s),
                Err(e) => {
                    tracing::warn!(error = %e, "cannot open an extra socket");
                    return;
                }
            };
            let (k, sock, tx) = (self.sockets.len(), s.clone(), self.tx.clone());
            self.readers.push(tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                while let Ok((n, from)) = sock.recv_from(&mut buf).await {
                    if tx.send((k, from, buf[..n].to_vec())).await.is_err() {
                        return;
                    }
                }
            }));
            self.sockets.push(s);
        }
    }
}

impl Drop for ExtraSockets {
    fn drop(&mut self) {
        for r in &self.readers {
            r.abort();
        }
    }
}

/// How long the client tries UDP before falling back to TCP to its supernode.
pub const TCP_FALLBACK_AFTER: Duration = Duration::from_secs(3);

/// Runs the client until `Input::Shutdown` or the input channel closes. Events other than
/// command completions go to `events`.
///
/// `server` is the bootstrap supernode's address (it picks the socket family). If no
/// session is up over UDP within [`TCP_FALLBACK_AFTER`], the driver opens a TCP
/// connection to the supernode the client currently tries (in a fleet it moves from host
/// to host) and carries that supernode's datagrams over it (networks that block UDP);
/// peer traffic stays on UDP. When the client moves to another supernode, the TCP
/// connection follows it.
pub async fn run_client(
    mut client: Client,
    socket: UdpSocket,
    mut input: mpsc::Receiver<Input>,
    events: mpsc::Sender<ClientEvent>,
    server: SocketAddr,
) {
    let mut waiting: HashMap<CommandId, oneshot::Sender<CommandResult>> = HashMap::new();
    let mut buf = vec![0u8; 2048];
    // The TCP fallback and the supernode it goes to.
    let mut tcp: Option<(SocketAddr, crate::tcp::TcpLink)> = None;
    // TURN over TCP to the relay, once UDP proved blocked.
    let mut relay_tcp: Option<crate::tcp::TcpLink> = None;
    let mut fallback_at = Some(Instant::now() + TCP_FALLBACK_AFTER);
    let mut extra = ExtraSockets::new();
    let bind_like = socket.local_addr().unwrap_or_else(|_| bind_addr(server));
    client.connect(Instant::now());
    loop {
        if tcp.as_ref().is_some_and(|(a, _)| *a != client.supernode()) {
            // The client moved to another supernode of the fleet: the old connection
            // leads nowhere.
            // UDP was found blocked here: go straight to TCP at the new one.
            tracing::info!(to = %client.supernode(), "supernode changed; moving the TCP fallback");
            tcp = None;
            fallback_at = Some(Instant::now());
        }
        let want = client.extra_sockets();
        if want != extra.sockets.len() {
            extra.resize(want, bind_like);
        }
        while let Some((k, t)) = client.poll_extra_transmit() {
            if let Some(s) = extra.sockets.get(k) {
                // Never wait on one socket: a full buffer is a lost probe.
                let _ = s.try_send_to(&t.payload, t.dst);
            }
        }
        while let Some(t) = client.poll_transmit() {
            if let Some((_, link)) = tcp.as_ref().filter(|(a, _)| *a == t.dst) {
                let _ = link.tx.try_send(t.payload);
                continue;
            }
            if client.relay_over_tcp() && client.relay_server() == Some(t.dst) {
                if relay_tcp.is_none() {
                    match tokio::time::timeout(
                        Duration::from_secs(3),
                        crate::tcp::connect_raw(t.dst),
                    )
                    .await
                    {
                        Ok(Ok(link)) => relay_tcp = Some(link),
                        _ => tracing::warn!("cannot reach the relay over TCP"),
                    }
                }
                if let Some(link) = &relay_tcp {
                    let _ = link.tx.try_send(t.payload);
                }
                continue;
            }
            if let Err(e) = socket.send_to(&t.payload, t.dst).await {
                tracing::debug!(error = %e, "send failed");
            }
        }
        while let Some(e) = client.poll_event() {
            match e {
                ClientEvent::CommandDone { id, result } => {
                    if let Some(tx) = waiting.remove(&id) {
                        let _ = tx.send(result);
                    }
                }
                other => {
                    match &other {
                        ClientEvent::Online => fallback_at = None,
                        ClientEvent::Offline { .. } if tcp.is_none() => {
                            fallback_at = Some(Instant::now() + TCP_FALLBACK_AFTER)
                        }
                        _ => {}
                    }
                    if events.send(other).await.is_err() {
                        return;
                    }
                }
            }
        }
        let mut deadline = client
            .poll_timeout()
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(60));
        if let Some(f) = fallback_at {
            deadline = deadline.min(f);
        }
        tokio::select! {
            r = socket.recv_from(&mut buf) => {
                if let Ok((n, from)) = r {
                    client.handle_datagram(Instant::now(), from, &buf[..n]);
                }
            }
            Some((k, from, b)) = extra.rx.recv() => {
                client.handle_extra_datagram(Instant::now(), k, from, &b);
            }
            b = async { match relay_tcp.as_mut() { Some(l) => l.rx.recv().await, None => std::future::pending().await } } => {
                match (b, client.relay_server()) {
                    (Some(b), Some(rs)) => client.handle_datagram(Instant::now(), rs, &b),
                    _ => {
                        tracing::warn!("TCP connection to the relay closed");
                        relay_tcp = None;
                    }
                }
            }
            b = async { match tcp.as_mut() { Some((_, l)) => l.rx.recv().await, None => std::future::pending().await } } => {
                match (b, tcp.as_ref().map(|(a, _)| *a)) {
                    (Some(b), Some(from)) => client.handle_datagram(Instant::now(), from, &b),
                    _ => {
                        tracing::warn!("TCP connection to the supernode closed");
                        tcp = None;
                        fallback_at = Some(Instant::now() + TCP_FALLBACK_AFTER);
                    }
                }
            }
            _ = tokio::time::sleep_until(deadline.into()) => {
                let now = Instant::now();
                if fallback_at.is_some_and(|f| now >= f) && tcp.is_none() {
                    fallback_at = None;
                    let to = client.supernode();
                    match tokio::time::timeout(Duration::from_secs(3), crate::tcp::connect(to)).await {
                        Ok(Ok(link)) => {
                            tracing::info!(supernode = %to, "UDP to the supernode gets no answer; using TCP");
                            tcp = Some((to, link));
                            // UDP is blocked here: the relay must be reached over TCP too.
                            client.set_relay_over_tcp(now);
                            client.connect(now);
                        }
                        _ => fallback_at = Some(Instant::now() + TCP_FALLBACK_AFTER),
                    }
                }
                client.handle_timeout(Instant::now());
            }
            i = input.recv() => match i {
                Some(Input::Command(cmd, tx)) => {
                    let id = client.command(Instant::now(), cmd);
                    waiting.insert(id, tx);
                }
                Some(Input::Saved(token)) => client.message_saved(Instant::now(), token),
                Some(Input::CallMedia(call_id, bytes)) => {
                    client.send_call_media(Instant::now(), call_id, bytes);
                }
                Some(Input::Connect) => client.connect(Instant::now()),
                Some(Input::Status(tx)) => {
                    let _ = tx.send(Status {
                        online: client.is_online(),
                        user: client.username().map(|u| u.to_string()),
                        presence: client.presence().as_str(),
                        direct_peers: client.direct_peers().iter().map(|u| u.to_string()).collect(),
                        local: socket.local_addr().ok(),
                        transport: if tcp.is_some() { "tcp" } else { "udp" },
                        relay: client.relay_state(),
                        supernode: client.supernode(),
                        hosts: client.hosts().to_vec(),
                    });
                }
                Some(Input::Shutdown) | None => {
                    client.shutdown(Instant::now());
                    while let Some(t) = client.poll_transmit() {
                        if let Some((_, link)) = tcp.as_ref().filter(|(a, _)| *a == t.dst) {
                            let _ = link.tx.send(t.payload).await;
                            continue;
                        }
                        let _ = socket.send_to(&t.payload, t.dst).await;
                    }
                    return;
                }
            },
        }
    }
}
