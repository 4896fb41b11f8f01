//! Picking a free loopback port for a process started next (the demo and the tests).
//!
//! A port the OS hands out for `bind(0)` comes from the ephemeral range, which every
//! outgoing TCP connection also draws from: between the check and the child's own bind,
//! any connection on the machine may take it. A supernode also listens on the same
//! number for TCP as for UDP, so a UDP-free port is not enough. This picks a port below
//! the ephemeral range that is free for both, which only another picker can race for.

use std::net::{Ipv4Addr, SocketAddrV4, TcpListener, UdpSocket};

/// Lowest port considered: above the registered services that commonly listen.
const FLOOR: u16 = 20_000;

/// The bottom of the kernel's ephemeral range (Linux's default when it cannot be read).
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// Whether `port` on 127.0.0.1 can be bound for UDP and for TCP right now.
fn free_for_both(port: u16) -> bool {
    let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
    UdpSocket::bind(addr).is_ok() && TcpListener::bind(addr).is_ok()
}

/// A loopback port free for UDP and TCP, outside the ephemeral range when the range
/// leaves room below it; otherwise one the OS picks (checked for TCP as well).
pub fn free_loopback_port() -> std::io::Result<u16> {
    use rand_core::RngCore;
    let low = ephemeral_low();
    let mut rng = rand_core::OsRng;
    if low > FLOOR + 1_000 {
        for _ in 0..256 {
            let port = FLOOR + (rng.next_u32() % u32::from(low - FLOOR)) as u16;
            if free_for_both(port) {
                return Ok(port);
            }
        }
    }
    for _ in 0..64 {
        let port = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?
            .local_addr()?
            .port();
        if free_for_both(port) {
            return Ok(port);
        }
    }
    Err(std::io::Error::new(
        std::io::ErrorKind::AddrInUse,
        "no free loopback port found",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_port_is_free_for_both_and_below_the_ephemeral_range() {
        let low = ephemeral_low();
        let port = free_loopback_port().unwrap();
        assert!(free_for_both(port));
        if low > FLOOR + 1_000 {
            assert!((FLOOR..low).contains(&port), "{port} not below {low}");
        }
    }
}
