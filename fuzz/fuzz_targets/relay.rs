//! The TURN relay's handlers fed arbitrary datagrams from clients and from peers of the
//! allocations it creates, with time advancing: it must never panic.
//!
//! Input format: repeated `[len u8][source u8][delay u8][len bytes]`; an odd source sends
//! to the listening port, an even one to the newest allocation.
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use peerline_core::relay::{Relay, RelayConfig, RelayEvent};

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut now = t0;
    let mut relay = Relay::new(RelayConfig::default(), [1; 32], [2; 32], t0, 1_790_000_000);
    let mut allocations = Vec::new();
    let mut rest = data;
    while rest.len() >= 3 {
        let (len, src, delay) = (rest[0] as usize, rest[1], rest[2]);
        rest = &rest[3..];
        let n = len.min(rest.len());
        let (dgram, tail) = rest.split_at(n);
        rest = tail;
        now += Duration::from_millis(delay as u64 * 100);
        let from = std::net::SocketAddr::from(([198, 51, 100, src % 8], 4000 + u16::from(src)));
        match allocations.last() {
            Some(id) if src % 2 == 0 => relay.handle_peer(now, *id, from, dgram),
            _ => relay.handle_client(now, from, dgram),
        }
        relay.handle_timeout(now);
        while let Some(e) = relay.poll_event() {
            if let RelayEvent::AllocationCreated { id, .. } = e {
                relay.relayed_bound(
                    now,
                    id,
                    std::net::SocketAddr::from(([203, 0, 113, 2], 50_000)),
                );
                allocations.push(id);
            }
        }
        while relay.poll_transmit().is_some() {}
    }
});
