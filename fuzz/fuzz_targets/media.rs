//! Media packet decoder and jitter buffer: decoding never panics and whatever decodes
//! re-encodes to the same bytes; a stream of arbitrary packets (odd timestamps, jumps,
//! copies pointing anywhere) fed to a call's receiver never panics.
#![no_main]
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use peerline_media::{CallMedia, MediaConfig, Packet};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Packet::decode(data) {
        let mut out = Vec::new();
        p.encode(&mut out);
        assert_eq!(out, data);
    }
    // The same bytes as a stream: [length][packet] ..., 7 ms apart, playout every 20 ms.
    let t0 = Instant::now();
    let Ok(mut call) = CallMedia::new(MediaConfig::default(), t0) else {
        return;
    };
    let mut rest = data;
    let mut t = 0u64;
    while let Some((&len, tail)) = rest.split_first() {
        let n = usize::from(len).min(tail.len());
        let (pkt, next) = tail.split_at(n);
        rest = next;
        t += 7;
        let now = t0 + Duration::from_millis(t);
        let _ = call.handle_packet(now, pkt);
        if t % 20 < 7 {
            let _ = call.pull_playout(now);
        }
        while call.poll_transmit(now).is_some() {}
    }
    let _ = call.stats();
});
