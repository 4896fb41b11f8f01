//! Outer packet decoder and the handshake MAC and cookie checks: never panic; whatever
//! decodes re-encodes to the same bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;
use peerline_crypto::cookie::{mac1_of, mac2_ok, MacKeys};
use peerline_wire::packet::Packet;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Packet::decode(data) {
        let mut out = Vec::new();
        p.encode(&mut out);
        assert_eq!(out, data);
        if let Packet::CookieReply { nonce, cookie, .. } = p {
            let _ = MacKeys::new(&[4; 32]).open_cookie(&nonce, &cookie, &mac1_of(data));
        }
    }
    let keys = MacKeys::new(&[4; 32]);
    let _ = keys.mac1_ok(data);
    let _ = mac2_ok(&[1; 16], data);
});
