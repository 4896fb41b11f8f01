//! The load generator's simulated clients: any datagram from the network is handled
//! without a panic, whatever state the client is in (in a session or handshaking).
#![no_main]
use libfuzzer_sys::fuzz_target;
use peerline_load::engine::DatagramProbe;

fuzz_target!(|data: &[u8]| {
    let mut p = DatagramProbe::new();
    // Raw, and once more inside client 0's authenticated session (a valid frame or not).
    p.feed(data);
    let mut sealed = vec![0u8; 16];
    let c = p.server.seal(data, &mut sealed).unwrap_or(0);
    sealed[..16].copy_from_slice(&peerline_wire::packet::Packet::transport_header(1, c));
    p.feed(&sealed);
    assert!(p.online() <= 2);
});
