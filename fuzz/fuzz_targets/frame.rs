//! Frame and handshake payload decoders: never panic; decoded frames are within limits.
#![no_main]
use libfuzzer_sys::fuzz_target;
use peerline_wire::msg::{Frame, Hello, Welcome};

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = Frame::decode(data) {
        assert!(f.encode().is_ok());
    }
    let _ = Hello::decode(data);
    let _ = Welcome::decode(data);
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = peerline_wire::Username::parse(s);
        let _ = peerline_wire::name::parse_prefix(s);
    }
});
