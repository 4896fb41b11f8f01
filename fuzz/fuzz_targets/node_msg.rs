//! Node-to-node messages: the decoder never panics, what decodes re-encodes, and a fleet
//! supernode takes any decoded message (about users it may not have) without panicking.
#![no_main]
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use libfuzzer_sys::fuzz_target;
use peerline_core::clock::WallClock;
use peerline_core::directory::MemoryDirectory;
use peerline_core::supernode::{Supernode, SupernodeConfig};
use peerline_crypto::Authority;
use peerline_wire::node::NodeMsg;

fn supernode() -> &'static Mutex<(Supernode, Instant)> {
    static SN: OnceLock<Mutex<(Supernode, Instant)>> = OnceLock::new();
    SN.get_or_init(|| {
        let now = Instant::now();
        let cfg = SupernodeConfig {
            fleet: true,
            ..SupernodeConfig::default()
        };
        let sn = Supernode::new(
            cfg,
            [7; 32],
            Authority::from_bytes(&[9; 32]),
            [1; 32],
            Box::new(MemoryDirectory::new()),
            WallClock::new(now, 1_790_000_000_000),
            now,
        );
        Mutex::new((sn, now))
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(m) = NodeMsg::decode(data) else {
        return;
    };
    assert_eq!(NodeMsg::decode(&m.encode().unwrap()).unwrap(), m);
    let mut g = supernode().lock().unwrap();
    let (sn, now) = &mut *g;
    sn.handle_node_msg(*now, 3, m.clone());
    sn.node_unreachable(*now, m);
    while sn.poll_node_msg().is_some() {}
    while sn.poll_transmit().is_some() {}
});
