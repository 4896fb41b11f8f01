//! The supernode's packet handler fed an arbitrary sequence of datagrams from a few
//! sources, with time advancing and storage operations executed: it must never panic.
//! Datagrams go in as the driver feeds them (`handle_datagram_into`), in batches
//! (`begin_batch`/`end_batch`): datagrams without a delay join the current batch. A small
//! handshake queue and budget make the Busy shedding path reachable.
//!
//! Input format: repeated `[len u16 LE][source u8][delay u8][len bytes]` (seeds in
//! `fuzz/seeds/supernode` are sessions captured from simulated clients).
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use peerline_core::clock::WallClock;
use peerline_core::directory::MemoryDirectory;
use peerline_core::memstore::MemoryStore;
use peerline_core::ops::execute;
use peerline_core::supernode::{Limits, Supernode, SupernodeConfig};
use peerline_crypto::Authority;
use rand_core::SeedableRng;

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut now = t0;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let mut store = MemoryStore::new();
    let cfg = SupernodeConfig {
        handshake_budget: 2,
        limits: Limits {
            max_queued_handshakes: 3,
            ..Limits::default()
        },
        ..SupernodeConfig::default()
    };
    let mut sn = Supernode::new(
        cfg,
        peerline_crypto::DeviceKeys::from_bytes(&[9; 64]).noise_private(),
        Authority::from_bytes(&[3; 32]),
        [5; 32],
        Box::new(MemoryDirectory::new()),
        WallClock::new(t0, 1_790_000_000_000),
        t0,
    );
    let mut rest = data;
    sn.begin_batch();
    while rest.len() >= 4 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let (src, delay) = (rest[2], rest[3]);
        rest = &rest[4..];
        let n = len.min(rest.len());
        let (dgram, tail) = rest.split_at(n);
        rest = tail;
        if delay > 0 {
            // The batch ends: its queued handshakes get their turn, then time passes.
            sn.end_batch(now);
            now += Duration::from_millis(delay as u64 * 5);
            sn.handle_timeout(now);
            sn.begin_batch();
        }
        let from = std::net::SocketAddr::from(([198, 51, 100, src % 4], 4000));
        // The driver's path: STUN answered into a send slot (of any length here),
        // everything else through `handle_datagram`.
        let mut out = [0u8; 80];
        if let Some(k) = sn.handle_datagram_into(now, from, dgram, &mut out[..src as usize % 81]) {
            assert!(k <= src as usize % 81);
        }
        while let Some((token, op)) = sn.poll_op() {
            let r = execute(&mut store, op, &mut rng);
            sn.handle_op_result(now, token, r);
        }
        while sn.poll_transmit().is_some() {}
        while sn.poll_event().is_some() {}
    }
    sn.end_batch(now);
    // Whatever was queued is served or shed, a budget at a time.
    for _ in 0..64 {
        if sn.handshake_queue_len() == 0 {
            break;
        }
        assert!(sn.poll_timeout().is_some_and(|t| t <= now));
        sn.handle_timeout(now);
    }
    assert_eq!(sn.handshake_queue_len(), 0);
});
