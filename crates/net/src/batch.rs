//! Batched UDP: one `recvmmsg` reads up to [`BATCH`] datagrams, one `sendmmsg` sends as
//! many. Loopback UDP costs a few microseconds of system time per datagram and call;
//! batching shares the call, and fixed buffers keep the path free of allocation. Used by
//! the supernode driver and by the load generator's reference servers, so both pay the
//! same per-datagram cost.
//!
//! Neither side ever blocks on a full socket: a datagram the kernel cannot take now is
//! dropped and counted (UDP semantics: the sender retransmits), so one slow receiver
//! never stalls everyone else's answers.

use std::io::{IoSlice, IoSliceMut};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};

use nix::errno::Errno;
use nix::sys::socket::{
    recvmmsg, sendmmsg, setsockopt, sockopt, ControlMessage, MsgFlags, MultiHeaders,
    SockaddrStorage,
};

/// Datagrams per system call at most.
pub const BATCH: usize = 64;
/// Bytes per datagram slot: more than any Peerline or STUN datagram (longer ones are
/// truncated on receipt and then rejected by the codec).
pub const SLOT: usize = 2048;

/// Received datagrams, read by [`RecvBatch::recv`].
///
/// The `mmsghdr` arrays are made per call (two small allocations per batch, not per
/// datagram): they hold raw pointers, and keeping them would make the driver's future
/// not `Send`.
pub struct RecvBatch {
    bufs: Vec<u8>,
    got: Vec<(usize, SocketAddr)>,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl RecvBatch {
    /// Buffers for [`BATCH`] datagrams.
    pub fn new() -> Self {
        RecvBatch {
            bufs: vec![0; BATCH * SLOT],
            got: Vec::with_capacity(BATCH),
        }
    }

    /// Reads what is queued, up to [`BATCH`] datagrams, in one system call. With `wait`
    /// it blocks for the first (as the socket's timeout allows); without, an empty queue
    /// is `WouldBlock`. Replaces what the previous call read.
    pub fn recv(&mut self, sock: &impl AsFd, wait: bool) -> std::io::Result<usize> {
        self.got.clear();
        let flags = if wait {
            MsgFlags::MSG_WAITFORONE
        } else {
            MsgFlags::MSG_DONTWAIT
        };
        let mut iovs: [[IoSliceMut<'_>; 1]; BATCH] = {
            let mut chunks = self.bufs.chunks_exact_mut(SLOT);
            std::array::from_fn(|_| [IoSliceMut::new(chunks.next().unwrap_or_default())])
        };
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(BATCH, None);
        let msgs = recvmmsg(
            sock.as_fd().as_raw_fd(),
            &mut headers,
            iovs.iter_mut(),
            flags,
            None,
        )
        .map_err(std::io::Error::from)?;
        for m in msgs {
            // A datagram without a usable source address cannot be answered: skipped,
            // but its slot is kept so indexes stay aligned with the buffers.
            let from = m.address.as_ref().and_then(to_std);
            self.got
                .push((m.bytes, from.unwrap_or(SocketAddr::from(([0, 0, 0, 0], 0)))));
        }
        Ok(self.got.len())
    }

    /// The datagrams of the last [`RecvBatch::recv`], with their sources (sources the
    /// kernel did not give are left out).
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], SocketAddr)> {
        self.got
            .iter()
            .zip(self.bufs.chunks_exact(SLOT))
            .filter(|((_, from), _)| from.port() != 0)
            .map(|((n, from), buf)| (&buf[..(*n).min(SLOT)], *from))
    }
}

/// Datagrams to send, queued in fixed slots and sent by [`SendBatch::flush`] (its
/// `mmsghdr` array made per flush, as for [`RecvBatch`]).
pub struct SendBatch {
    bufs: Vec<u8>,
    lens: Vec<usize>,
    dsts: Vec<Option<SockaddrStorage>>,
}

/// What a [`SendBatch::flush`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flushed {
    /// Datagrams the kernel took.
    pub sent: usize,
    /// Datagrams dropped: the socket's buffer was full, or the destination refused.
    pub dropped: usize,
}

impl Default for SendBatch {
    fn default() -> Self {
        Self::new()
    }
}

impl SendBatch {
    /// Slots for [`BATCH`] datagrams.
    pub fn new() -> Self {
        SendBatch {
            bufs: vec![0; BATCH * SLOT],
            lens: Vec::with_capacity(BATCH),
            dsts: Vec::with_capacity(BATCH),
        }
    }

    /// Datagrams queued.
    pub fn len(&self) -> usize {
        self.lens.len()
    }

    /// Nothing queued.
    pub fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    /// No slot left: flush first.
    pub fn is_full(&self) -> bool {
        self.lens.len() >= BATCH
    }

    /// Queues a copy of `payload` for `dst`; false when full or longer than a slot.
    pub fn push(&mut self, dst: SocketAddr, payload: &[u8]) -> bool {
        self.push_with(dst, |out| {
            let n = payload.len();
            out.get_mut(..n)?.copy_from_slice(payload);
            Some(n)
        })
    }

    /// Lets `write` fill the next slot in place (no copy, no allocation); it returns the
    /// length written, or `None` to queue nothing. False when full or nothing written.
    pub fn push_with(
        &mut self,
        dst: SocketAddr,
        write: impl FnOnce(&mut [u8]) -> Option<usize>,
    ) -> bool {
        let i = self.lens.len();
        let Some(slot) = self.bufs.get_mut(i * SLOT..(i + 1) * SLOT) else {
            return false;
        };
        match write(slot) {
            Some(n) if n <= SLOT => {
                self.lens.push(n);
                self.dsts.push(Some(dst.into()));
                true
            }
            _ => false,
        }
    }

    /// Sends everything queued, in as few `sendmmsg` calls as the kernel allows, never
    /// blocking; empties the batch.
    pub fn flush(&mut self, sock: &impl AsFd) -> Flushed {
        let n = self.lens.len();
        let mut done = Flushed::default();
        if n == 0 {
            return done;
        }
        let iovs: [[IoSlice<'_>; 1]; BATCH] = {
            let (bufs, lens) = (&self.bufs, &self.lens);
            std::array::from_fn(|i| {
                let len = lens.get(i).copied().unwrap_or(0);
                [IoSlice::new(&bufs[i * SLOT..i * SLOT + len])]
            })
        };
        let fd = sock.as_fd().as_raw_fd();
        let none: [ControlMessage<'_>; 0] = [];
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(n, None);
        let mut at = 0;
        while at < n {
            match sendmmsg(
                fd,
                &mut headers,
                iovs[at..n].iter(),
                &self.dsts[at..n],
                none,
                MsgFlags::MSG_DONTWAIT,
            ) {
                Ok(r) => {
                    let k = r.count();
                    if k == 0 {
                        break;
                    }
                    done.sent += k;
                    at += k;
                }
                Err(Errno::EINTR) => {}
                // The socket buffer is full: drop the rest rather than wait.
                Err(Errno::EAGAIN) | Err(Errno::ENOBUFS) => break,
                // This destination refused (unreachable, not permitted): skip it only.
                Err(_) => {
                    done.dropped += 1;
                    at += 1;
                }
            }
        }
        done.dropped += n - at;
        self.lens.clear();
        self.dsts.clear();
        done
    }
}

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4((*v4).into()));
    }
    a.as_sockaddr_in6().map(|v6| SocketAddr::V6((*v6).into()))
}

/// Asks for `bytes` of receive and send buffer on `sock` (as root past
/// `net.core.rmem_max`/`wmem_max`) and returns what the kernel granted (receive, send),
/// as `getsockopt` reports it.
pub fn set_buffers(sock: &impl AsFd, bytes: usize) -> (usize, usize) {
    if setsockopt(sock, sockopt::RcvBufForce, &bytes).is_err() {
        let _ = setsockopt(sock, sockopt::RcvBuf, &bytes);
    }
    if setsockopt(sock, sockopt::SndBufForce, &bytes).is_err() {
        let _ = setsockopt(sock, sockopt::SndBuf, &bytes);
    }
    let rcv = nix::sys::socket::getsockopt(sock, sockopt::RcvBuf).unwrap_or(0);
    let snd = nix::sys::socket::getsockopt(sock, sockopt::SndBuf).unwrap_or(0);
    (rcv, snd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (std::net::UdpSocket, std::net::UdpSocket) {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let b = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        (a, b)
    }

    #[test]
    fn a_batch_goes_out_in_order_and_comes_back_with_its_sources() {
        let (a, b) = pair();
        let to = b.local_addr().unwrap();
        let mut tx = SendBatch::new();
        for i in 0..BATCH {
            assert!(tx.push(to, &[i as u8; 33]));
        }
        assert!(tx.is_full());
        assert!(!tx.push(to, b"one too many"));
        assert_eq!(
            tx.flush(&a),
            Flushed {
                sent: BATCH,
                dropped: 0
            }
        );
        assert!(tx.is_empty());
        b.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let mut rx = RecvBatch::new();
        let mut seen = Vec::new();
        while seen.len() < BATCH {
            rx.recv(&b, true).unwrap();
            for (d, from) in rx.iter() {
                assert_eq!(from, a.local_addr().unwrap());
                assert_eq!(d.len(), 33);
                seen.push(d[0]);
            }
        }
        assert_eq!(seen, (0..BATCH as u8).collect::<Vec<_>>());
    }

    #[test]
    fn an_empty_socket_is_would_block_without_waiting() {
        let (_, b) = pair();
        let mut rx = RecvBatch::new();
        let e = rx.recv(&b, false).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
        assert_eq!(rx.iter().count(), 0);
    }

    #[test]
    fn in_place_writes_and_oversized_payloads() {
        let (a, b) = pair();
        let to = b.local_addr().unwrap();
        let mut tx = SendBatch::new();
        assert!(!tx.push(to, &vec![0; SLOT + 1]), "longer than a slot");
        assert!(
            !tx.push_with(to, |_| None),
            "nothing written, nothing queued"
        );
        assert!(tx.push_with(to, |out| {
            out[..5].copy_from_slice(b"hello");
            Some(5)
        }));
        assert_eq!(tx.len(), 1);
        assert_eq!(tx.flush(&a).sent, 1);
        let mut buf = [0u8; 64];
        b.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .unwrap();
        let (n, _) = b.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"hello");
    }

    #[test]
    fn a_full_receiver_never_blocks_the_sender() {
        let (a, b) = pair();
        // A tiny receive buffer on b (never read) and a tiny send buffer on a: most of
        // many batches cannot be queued. Every flush returns, each datagram accounted.
        let _ = setsockopt(&b, sockopt::RcvBuf, &4096usize);
        let _ = setsockopt(&a, sockopt::SndBuf, &4096usize);
        let to = b.local_addr().unwrap();
        let mut tx = SendBatch::new();
        let mut total = Flushed::default();
        for _ in 0..50 {
            while tx.push(to, &[7; 1000]) {}
            let f = tx.flush(&a);
            total.sent += f.sent;
            total.dropped += f.dropped;
        }
        assert_eq!(total.sent + total.dropped, 50 * BATCH, "{total:?}");
    }

    #[test]
    fn buffers_are_granted_and_reported() {
        let (a, _) = pair();
        let (rcv, snd) = set_buffers(&a, 4 << 20);
        assert!(rcv > 0 && snd > 0);
    }
}
