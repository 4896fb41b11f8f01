//! TCP fallback for networks that block UDP: the same datagrams, each framed with a
//! 2-byte big-endian length, over one TCP connection per client.
//!
//! The cores never know: the supernode sees a TCP client's datagrams as coming from the
//! connection's peer address, and the drivers send a datagram over TCP when its
//! destination is a TCP peer (supernode) or the supernode itself while the client is in
//! fallback mode.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use peerline_wire::MAX_DATAGRAM;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Datagrams queued per connection before further ones are dropped (as UDP would).
const QUEUE: usize = 256;

/// Reads one frame; `Ok(None)` at a clean end of stream. A frame longer than a datagram
/// is an error (the connection is then closed): nothing from the network sizes a buffer.
pub async fn read_frame(r: &mut OwnedReadHalf) -> std::io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = u16::from_be_bytes(len) as usize;
    if n == 0 || n > MAX_DATAGRAM {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "frame length out of range",
        ));
    }
    let mut buf = vec![0u8; n];
    r.read_exact(&mut buf).await?;
    Ok(Some(buf))
}

/// Writes one frame.
pub async fn write_frame(w: &mut OwnedWriteHalf, b: &[u8]) -> std::io::Result<()> {
    let n = u16::try_from(b.len())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "datagram too large"))?;
    let mut out = Vec::with_capacity(b.len() + 2);
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(b);
    w.write_all(&out).await
}

/// The supernode's TCP side: accepted connections by peer address.
#[derive(Clone, Default)]
pub struct TcpPeers {
    conns: Arc<Mutex<HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>>>,
}

impl TcpPeers {
    /// Sends `b` to `dst` if `dst` is a TCP peer; returns false if it is not (use UDP).
    pub fn send(&self, dst: SocketAddr, b: &[u8]) -> bool {
        let tx = self.conns.lock().ok().and_then(|m| m.get(&dst).cloned());
        match tx {
            Some(tx) => {
                // A full queue drops the datagram, as a congested UDP path would.
                let _ = tx.try_send(b.to_vec());
                true
            }
            None => false,
        }
    }

    fn len(&self) -> usize {
        self.conns.lock().map(|m| m.len()).unwrap_or(0)
    }
}

/// Accepts TCP clients on `listener` until dropped, feeding their datagrams to `inbound`.
/// At most `max_conns` connections are kept; further ones are closed at once.
pub async fn serve(
    listener: TcpListener,
    peers: TcpPeers,
    inbound: mpsc::Sender<(SocketAddr, Vec<u8>)>,
    max_conns: usize,
) {
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            continue;
        };
        if peers.len() >= max_conns {
            continue; // dropping the stream closes it
        }
        let _ = stream.set_nodelay(true);
        let (mut r, mut w) = stream.into_split();
        let (tx, mut rx) = mpsc::channel::<Vec<u8>>(QUEUE);
        if let Ok(mut m) = peers.conns.lock() {
            m.insert(from, tx);
        }
        tokio::spawn(async move {
            while let Some(b) = rx.recv().await {
                if write_frame(&mut w, &b).await.is_err() {
                    break;
                }
            }
        });
        let inbound = inbound.clone();
        let peers = peers.clone();
        tokio::spawn(async move {
            while let Ok(Some(b)) = read_frame(&mut r).await {
                if inbound.send((from, b)).await.is_err() {
                    break;
                }
            }
            if let Ok(mut m) = peers.conns.lock() {
                m.remove(&from);
            }
        });
    }
}

/// A client's TCP connection to its supernode.
pub struct TcpLink {
    /// Datagrams to send.
    pub tx: mpsc::Sender<Vec<u8>>,
    /// Datagrams received; closes when the connection ends.
    pub rx: mpsc::Receiver<Vec<u8>>,
}

/// Connects to `addr` and starts the framing tasks.
pub async fn connect(addr: SocketAddr) -> std::io::Result<TcpLink> {
    spawn_link(TcpStream::connect(addr).await?, true)
}

/// Connects to `addr` for a protocol that frames itself (TURN over TCP): bytes are written
/// as given and handed back as they arrive, in chunks of at most 64 KiB.
pub async fn connect_raw(addr: SocketAddr) -> std::io::Result<TcpLink> {
    spawn_link(TcpStream::connect(addr).await?, false)
}

/// Starts the writer and reader tasks of a client connection; `framed` puts each datagram
/// behind its 2-byte length, otherwise bytes pass as they are.
fn spawn_link(stream: TcpStream, framed: bool) -> std::io::Result<TcpLink> {
    let _ = stream.set_nodelay(true);
    let (mut r, mut w) = stream.into_split();
    let (out_tx, mut out_rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    let (in_tx, in_rx) = mpsc::channel::<Vec<u8>>(QUEUE);
    tokio::spawn(async move {
        while let Some(b) = out_rx.recv().await {
            let sent = if framed {
                write_frame(&mut w, &b).await
            } else {
                w.write_all(&b).await
            };
            if sent.is_err() {
                break;
            }
        }
    });
    tokio::spawn(async move {
        let mut buf = vec![0u8; if framed { 0 } else { 64 * 1024 }];
        loop {
            let b = if framed {
                match read_frame(&mut r).await {
                    Ok(Some(b)) => b,
                    _ => break,
                }
            } else {
                match r.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf[..n].to_vec(),
                }
            };
            if in_tx.send(b).await.is_err() {
                break;
            }
        }
    });
    Ok(TcpLink {
        tx: out_tx,
        rx: in_rx,
    })
}
