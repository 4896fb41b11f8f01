//! Tokio glue for Peerline's sans-IO cores.
//!
//! Each driver owns a UDP socket, a timer and the core's state machine, feeds it input
//! with the current time, and performs the output it asks for: datagrams, storage
//! operations (on a dedicated thread, since the embedded store blocks), and events.
//! Protocol decisions never live here.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod admin;
pub mod batch;
pub mod bootstrap;
pub mod client;
pub mod files;
pub mod fleet;
pub mod fleet_link;
pub mod ports;
pub mod relay;
pub mod supernode;
pub mod tcp;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::{SystemTime, UNIX_EPOCH};

/// Wall time in unix milliseconds (the anchor for a core's `WallClock`).
pub fn unix_ms_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A 32-byte seed from the operating system's RNG, for a core's injected randomness.
pub fn os_seed() -> [u8; 32] {
    use rand_core::RngCore;
    let mut s = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut s);
    s
}

/// The local address the OS would use to reach `dst` (no packet is sent).
pub fn route_source(dst: SocketAddr) -> IpAddr {
    let any: SocketAddr = if dst.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        "[::]:0"
            .parse()
            .unwrap_or((Ipv4Addr::UNSPECIFIED, 0).into())
    };
    std::net::UdpSocket::bind(any)
        .and_then(|s| {
            s.connect(dst)?;
            s.local_addr()
        })
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))
}
