//! The client's packet handler fed arbitrary datagrams from its supernode's address, from
//! strangers, and on the birthday technique's extra sockets, with time advancing: it must
//! never panic. It knows a second supernode of a fleet, so refusals and timeouts move it
//! between the two; "its supernode" is whichever it tries at the moment.
//!
//! Input format: repeated `[len u16 LE][source u8][delay u8][len bytes]`; a source with
//! bit 6 set delivers on extra socket `source % 8` (one past the range included).
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use peerline_core::client::{Client, ClientConfig, Command};
use peerline_core::clock::WallClock;
use peerline_crypto::DeviceKeys;
use rand_core::SeedableRng;

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut now = t0;
    let server: std::net::SocketAddr = "203.0.113.1:7000"
        .parse()
        .unwrap_or_else(|_| unreachable!());
    let keys = DeviceKeys::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(2));
    let cfg = ClientConfig::new(server, [4; 32], [6; 32]);
    let mut c = Client::new(
        cfg,
        keys,
        None,
        [8; 32],
        WallClock::new(t0, 1_790_000_000_000),
        t0,
    );
    c.add_hosts(&["203.0.113.2:7000"
        .parse()
        .unwrap_or_else(|_| unreachable!())]);
    c.connect(now);
    let _ = c.command(now, Command::ContactList);
    let mut rest = data;
    while rest.len() >= 4 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let (src, delay) = (rest[2], rest[3]);
        rest = &rest[4..];
        let n = len.min(rest.len());
        let (dgram, tail) = rest.split_at(n);
        rest = tail;
        now += Duration::from_millis(delay as u64 * 50);
        let from = if src % 2 == 0 {
            c.supernode()
        } else {
            std::net::SocketAddr::from(([198, 51, 100, src], 5000))
        };
        if src & 0x40 != 0 {
            c.handle_extra_datagram(now, usize::from(src % 8) * 64, from, dgram);
        } else {
            c.handle_datagram(now, from, dgram);
        }
        c.handle_timeout(now);
        while c.poll_transmit().is_some() {}
        while c.poll_extra_transmit().is_some() {}
        while c.poll_event().is_some() {}
    }
});
