//! Throughput and latency of the node-to-node channel between two links on loopback.
//!
//! `cargo run --release -p peerline-net --example fleet_link_bench -- [--count N] [--json]`
//!
//! Throughput: one link sends `N` messages as fast as its queue takes them (retrying when
//! full) and the other receives them all; messages/s is `N` over the time from the first
//! send to the last receipt. Latency: 5,000 messages of 200 bytes, one per millisecond,
//! each carrying its send time (both links share the process clock); the one-way delay is
//! measured at receipt.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use peerline_net::fleet_link::{FleetLink, FleetLinkConfig, Incoming, LinkSendError};
use tokio::sync::mpsc;

struct Throughput {
    size: usize,
    count: u64,
    secs: f64,
}

struct Latency {
    count: usize,
    median_us: f64,
    p99_us: f64,
    max_us: f64,
}

fn cfg(node: u32) -> FleetLinkConfig {
    FleetLinkConfig {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        psk: [42; 32],
        node_id: node,
        epoch: 1,
    }
}

/// Sends `msg`, retrying while the queue is full (a refused message is dropped, so the
/// retry sends a copy).
async fn send_retrying(l: &FleetLink, to: u32, addr: SocketAddr, msg: Vec<u8>) {
    loop {
        match l.send(to, addr, msg.clone()) {
            Ok(()) => return,
            Err(LinkSendError::QueueFull(_)) => tokio::task::yield_now().await,
            Err(e) => panic!("send: {e}"),
        }
    }
}

/// Sends `count` messages of `size` bytes from `a` to `b` and waits for all of them.
async fn throughput(
    a: &FleetLink,
    b_addr: SocketAddr,
    brx: &mut mpsc::Receiver<Incoming>,
    size: usize,
    count: u64,
) -> Throughput {
    let t0 = Instant::now();
    let a2 = a.clone();
    let sender = tokio::spawn(async move {
        for i in 0..count {
            let mut msg = vec![0u8; size];
            msg[..8].copy_from_slice(&i.to_be_bytes());
            send_retrying(&a2, 2, b_addr, msg).await;
        }
    });
    for i in 0..count {
        let m = brx.recv().await.expect("link alive");
        assert_eq!(m.msg[..8], i.to_be_bytes(), "in order");
    }
    let secs = t0.elapsed().as_secs_f64();
    sender.await.expect("sender");
    Throughput { size, count, secs }
}

async fn latency(
    a: &FleetLink,
    b_addr: SocketAddr,
    brx: &mut mpsc::Receiver<Incoming>,
    count: usize,
) -> Latency {
    let base = Instant::now();
    let a2 = a.clone();
    let sender = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        for _ in 0..count {
            tick.tick().await;
            let mut msg = vec![0u8; 200];
            let ns = base.elapsed().as_nanos() as u64;
            msg[..8].copy_from_slice(&ns.to_be_bytes());
            send_retrying(&a2, 2, b_addr, msg).await;
        }
    });
    let mut us = Vec::with_capacity(count);
    for _ in 0..count {
        let m = brx.recv().await.expect("link alive");
        let mut t = [0u8; 8];
        t.copy_from_slice(&m.msg[..8]);
        let sent = Duration::from_nanos(u64::from_be_bytes(t));
        us.push((base.elapsed() - sent).as_secs_f64() * 1e6);
    }
    sender.await.expect("sender");
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize];
    Latency {
        count,
        median_us: at(0.5),
        p99_us: at(0.99),
        max_us: at(1.0),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let json = args.iter().any(|a| a == "--json");
    let count: u64 = args
        .iter()
        .position(|a| a == "--count")
        .and_then(|i| args.get(i + 1))
        .map(|s| s.parse().expect("--count takes a number"))
        .unwrap_or(200_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    rt.block_on(async move {
        let (a, _arx) = FleetLink::bind(cfg(1)).await.expect("bind a");
        let (b, mut brx) = FleetLink::bind(cfg(2)).await.expect("bind b");
        let ba = b.local_addr();
        // Warm up: the connection and handshake are not part of the figures.
        throughput(&a, ba, &mut brx, 64, 1000).await;
        let mut tp = Vec::new();
        for size in [64usize, 200, 1024, 8192] {
            let n = if size == 8192 { count / 8 } else { count };
            tp.push(throughput(&a, ba, &mut brx, size, n).await);
        }
        let lat = latency(&a, ba, &mut brx, 5000).await;
        let st = a.stats();
        assert_eq!(st.connects, 1, "one connection for the whole run");
        if json {
            let rows: Vec<String> = tp
                .iter()
                .map(|t| {
                    format!(
                        "{{\"size\":{},\"messages\":{},\"seconds\":{:.3},\"msgs_per_s\":{:.0},\"mbytes_per_s\":{:.1}}}",
                        t.size,
                        t.count,
                        t.secs,
                        t.count as f64 / t.secs,
                        (t.count as f64 * t.size as f64) / t.secs / 1e6
                    )
                })
                .collect();
            println!(
                "{{\"throughput\":[{}],\"latency\":{{\"messages\":{},\"size\":200,\"interval_ms\":1,\"median_us\":{:.1},\"p99_us\":{:.1},\"max_us\":{:.1}}}}}",
                rows.join(","),
                lat.count,
                lat.median_us,
                lat.p99_us,
                lat.max_us
            );
        } else {
            for t in &tp {
                println!(
                    "throughput  {:>5} B  {:>8} msgs  {:>7.3} s  {:>10.0} msgs/s  {:>7.1} MB/s",
                    t.size,
                    t.count,
                    t.secs,
                    t.count as f64 / t.secs,
                    (t.count as f64 * t.size as f64) / t.secs / 1e6
                );
            }
            println!(
                "latency     200 B  {} msgs, 1 per ms: median {:.1} us, p99 {:.1} us, max {:.1} us",
                lat.count, lat.median_us, lat.p99_us, lat.max_us
            );
        }
    });
}
