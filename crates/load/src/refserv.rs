//! Reference servers and the closed-loop datagram client that measures them.
//!
//! * A bare batched UDP echo server: `recvmmsg` a batch, `sendmmsg` it back. This is the
//!   ceiling for any request/response service on one core of this box: the supernode's
//!   authenticated requests are compared with it in the same run.
//! * A minimal batched STUN responder: the same loop, answering Binding requests with the
//!   supernode's own STUN code (`peerline_core::stun::answer`), so the comparison with
//!   `peerlined` isolates the cost of everything around the codec.
//! * [`blast`]: many sockets (distinct loopback addresses), each keeping a window of
//!   requests in flight, for echo or STUN, reporting answers per second and latencies.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use peerline_net::batch::{RecvBatch, SendBatch};

/// What a reference server answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
pub enum Mode {
    /// Every datagram back to its sender.
    Echo,
    /// STUN Binding success responses.
    Stun,
}

/// Serves `sock` until `stop` is set; returns datagrams answered. Blocking, one thread.
/// The batched loop is the supernode's own ([`peerline_net::batch`]), so the ratios
/// measure what the supernode does per datagram, not a different socket path.
pub fn serve(
    sock: std::net::UdpSocket,
    mode: Mode,
    stop: &AtomicBool,
    answered: &AtomicU64,
) -> std::io::Result<()> {
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let mut rx = RecvBatch::new();
    let mut tx = SendBatch::new();
    while !stop.load(Ordering::Relaxed) {
        match rx.recv(&sock, true) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue
            }
            Err(e) => return Err(e),
        }
        for (data, from) in rx.iter() {
            match mode {
                Mode::Echo => tx.push(from, data),
                Mode::Stun => tx.push_with(from, |out| {
                    peerline_core::stun::answer_into(data, from, out)
                }),
            };
        }
        if !tx.is_empty() {
            let f = tx.flush(&sock);
            answered.fetch_add(f.sent as u64, Ordering::Relaxed);
        }
    }
    Ok(())
}

/// A reference server running on its own thread.
pub struct RefServer {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its thread id, for CPU accounting.
    pub tid: i32,
    stop: Arc<AtomicBool>,
    answered: Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RefServer {
    /// Binds `listen` and serves on a new thread.
    pub fn start(listen: SocketAddr, mode: Mode) -> std::io::Result<RefServer> {
        let sock = std::net::UdpSocket::bind(listen)?;
        set_buffers(&sock);
        let addr = sock.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let answered = Arc::new(AtomicU64::new(0));
        let (tid_tx, tid_rx) = std::sync::mpsc::channel();
        let (s, a) = (stop.clone(), answered.clone());
        let thread = std::thread::Builder::new()
            .name(format!("ref-{mode:?}").to_lowercase())
            .spawn(move || {
                let _ = tid_tx.send(crate::procstat::current_tid());
                if let Err(e) = serve(sock, mode, &s, &a) {
                    eprintln!("reference server stopped: {e}");
                }
            })?;
        let tid = tid_rx
            .recv()
            .map_err(|_| std::io::Error::other("reference server thread died"))?;
        Ok(RefServer {
            addr,
            tid,
            stop,
            answered,
            thread: Some(thread),
        })
    }

    /// CPU seconds its thread used so far.
    pub fn cpu_s(&self) -> f64 {
        crate::procstat::sample_thread(self.tid).map_or(0.0, |s| s.cpu_s)
    }

    /// Datagrams answered so far.
    pub fn answered(&self) -> u64 {
        self.answered.load(Ordering::Relaxed)
    }
}

impl Drop for RefServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Large socket buffers so bursts queue instead of dropping (best effort: capped by
/// `net.core.rmem_max` unless root).
pub fn set_buffers(sock: &impl std::os::fd::AsFd) {
    peerline_net::batch::set_buffers(sock, 8 << 20);
}

/// The `i`th loopback source address of a load run: spread across 127.0.0.0/8 (never
/// 127.0.0.1, which the servers use), so per-source limits see distinct sources.
pub fn source_ip(i: usize) -> IpAddr {
    let n = i as u32 + 1;
    IpAddr::V4(Ipv4Addr::new(
        127,
        10 + ((n >> 16) & 0x7f) as u8,
        (n >> 8) as u8,
        n as u8,
    ))
}

/// Result of a [`blast`] run.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BlastReport {
    /// What was sent.
    pub mode: Mode,
    /// Server address.
    pub target: SocketAddr,
    /// Seconds measured.
    pub seconds: f64,
    /// Requests sent.
    pub sent: u64,
    /// Valid answers received.
    pub answered: u64,
    /// Answers per second.
    pub per_second: f64,
    /// Server CPU seconds used in the run, when known.
    pub server_cpu_s: Option<f64>,
    /// Answers per server core-second, when the server's CPU is known.
    pub per_core_second: Option<f64>,
    /// Latency percentiles in microseconds.
    pub latency_us: Percentiles,
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Percentiles {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest.
    pub max: u64,
}

impl Percentiles {
    /// Percentiles of a histogram.
    pub fn of(h: &Histogram<u64>) -> Percentiles {
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            p50: h.value_at_quantile(0.5),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// A latency histogram in microseconds up to 60 s.
pub fn histogram() -> Histogram<u64> {
    #[allow(clippy::expect_used)]
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("constant bounds are valid")
}

/// A STUN Binding request whose transaction id carries `stamp` (send time) and `tag`.
pub fn stun_request(stamp: u64, tag: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[..2].copy_from_slice(&[0x00, 0x01]);
    b[4..8].copy_from_slice(&peerline_wire::packet::STUN_MAGIC_COOKIE.to_be_bytes());
    b[8..16].copy_from_slice(&stamp.to_le_bytes());
    b[16..20].copy_from_slice(&tag.to_le_bytes());
    b
}

/// The send time carried by a reply, if it is a valid answer to what `mode` sends.
fn reply_stamp(mode: Mode, b: &[u8], tag: u32) -> Option<u64> {
    match mode {
        Mode::Echo => {
            if b.len() != ECHO_LEN || b[8..12] != tag.to_le_bytes() {
                return None;
            }
            Some(u64::from_le_bytes(b[..8].try_into().ok()?))
        }
        Mode::Stun => {
            // Binding success response, magic cookie, our transaction id.
            if b.len() < 20 || b[..2] != [0x01, 0x01] || b[16..20] != tag.to_le_bytes() {
                return None;
            }
            Some(u64::from_le_bytes(b[8..16].try_into().ok()?))
        }
    }
}

/// Echo requests are the size of a Peerline keepalive.
const ECHO_LEN: usize = 33;

fn request(mode: Mode, stamp: u64, tag: u32) -> Vec<u8> {
    match mode {
        Mode::Echo => {
            let mut b = vec![0u8; ECHO_LEN];
            b[..8].copy_from_slice(&stamp.to_le_bytes());
            b[8..12].copy_from_slice(&tag.to_le_bytes());
            b
        }
        Mode::Stun => stun_request(stamp, tag).to_vec(),
    }
}

/// Sends `mode` requests to `target` from `sockets` sockets (distinct loopback sources),
/// each keeping `window` in flight, for `duration`; `server_cpu` reads the server's CPU
/// seconds (before and after) when known.
pub async fn blast(
    target: SocketAddr,
    mode: Mode,
    sockets: usize,
    window: usize,
    duration: Duration,
    server_cpu: &(dyn Fn() -> Option<f64> + Sync),
) -> std::io::Result<BlastReport> {
    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for s in 0..sockets {
        let src = if target.ip().is_loopback() {
            SocketAddr::new(source_ip(s), 0)
        } else {
            SocketAddr::new(Ipv4Addr::UNSPECIFIED.into(), 0)
        };
        let sock = tokio::net::UdpSocket::bind(src).await?;
        set_buffers(&sock);
        let stop = stop.clone();
        let tag = s as u32;
        tasks.push(tokio::spawn(async move {
            let mut h = histogram();
            let (mut sent, mut answered) = (0u64, 0u64);
            let mut buf = [0u8; 1500];
            let mut last_answer = Instant::now();
            let now_us = |start: Instant| start.elapsed().as_micros() as u64;
            for _ in 0..window {
                if sock
                    .send_to(&request(mode, now_us(start), tag), target)
                    .await
                    .is_ok()
                {
                    sent += 1;
                }
            }
            while !stop.load(Ordering::Relaxed) {
                match tokio::time::timeout(Duration::from_millis(50), sock.recv_from(&mut buf))
                    .await
                {
                    Ok(Ok((n, _))) => {
                        if let Some(stamp) = reply_stamp(mode, &buf[..n], tag) {
                            answered += 1;
                            last_answer = Instant::now();
                            let _ = h.record(now_us(start).saturating_sub(stamp).max(1));
                            if sock
                                .send_to(&request(mode, now_us(start), tag), target)
                                .await
                                .is_ok()
                            {
                                sent += 1;
                            }
                        }
                    }
                    Ok(Err(_)) => {}
                    Err(_) => {
                        // Window lost (drops): refill it.
                        if last_answer.elapsed() > Duration::from_millis(200) {
                            last_answer = Instant::now();
                            for _ in 0..window {
                                if sock
                                    .send_to(&request(mode, now_us(start), tag), target)
                                    .await
                                    .is_ok()
                                {
                                    sent += 1;
                                }
                            }
                        }
                    }
                }
            }
            (h, sent, answered)
        }));
    }
    // Measure only the middle of the run: skip the first 10 % (warm-up).
    let warm = duration / 10;
    tokio::time::sleep(warm).await;
    let cpu0 = server_cpu();
    let t0 = Instant::now();
    tokio::time::sleep(duration - warm).await;
    let cpu1 = server_cpu();
    let seconds = t0.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    let mut h = histogram();
    let (mut sent, mut answered) = (0, 0);
    for t in tasks {
        if let Ok((th, s, a)) = t.await {
            let _ = h.add(&th);
            sent += s;
            answered += a;
        }
    }
    // Answers are counted over the whole run; scale to the measured window.
    let total_s = start.elapsed().as_secs_f64();
    let per_second = answered as f64 / total_s;
    let measured = per_second * seconds;
    let server_cpu_s = match (cpu0, cpu1) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    Ok(BlastReport {
        mode,
        target,
        seconds,
        sent,
        answered,
        per_second,
        server_cpu_s,
        per_core_second: server_cpu_s.filter(|c| *c > 0.0).map(|c| measured / c),
        latency_us: Percentiles::of(&h),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stun_requests_get_answers_the_blaster_accepts() {
        let req = stun_request(1234, 7);
        let from: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        let resp = peerline_core::stun::answer(&req, from).unwrap();
        assert_eq!(reply_stamp(Mode::Stun, &resp, 7), Some(1234));
        assert_eq!(reply_stamp(Mode::Stun, &resp, 8), None);
        assert_eq!(
            reply_stamp(Mode::Stun, &req, 7),
            None,
            "a request is no answer"
        );
    }

    #[test]
    fn source_addresses_are_distinct_loopback_addresses() {
        let a: Vec<IpAddr> = (0..70_000).map(source_ip).collect();
        let set: std::collections::HashSet<_> = a.iter().collect();
        assert_eq!(set.len(), a.len());
        assert!(a
            .iter()
            .all(|ip| ip.is_loopback() && *ip != IpAddr::from([127, 0, 0, 1])));
    }

    #[tokio::test]
    async fn echo_and_stun_servers_answer_the_blaster() {
        for mode in [Mode::Echo, Mode::Stun] {
            let srv = RefServer::start("127.0.0.1:0".parse().unwrap(), mode).unwrap();
            let cpu = || Some(srv.cpu_s());
            let r = blast(srv.addr, mode, 4, 4, Duration::from_millis(500), &cpu)
                .await
                .unwrap();
            assert!(r.answered > 100, "{mode:?}: {r:?}");
            assert!(srv.answered() >= r.answered);
            assert!(r.latency_us.p50 > 0);
        }
    }
}
