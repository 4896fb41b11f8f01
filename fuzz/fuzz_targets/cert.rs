//! Certificate decoder and verifier: never panic; decoded certificates re-encode exactly.
#![no_main]
use libfuzzer_sys::fuzz_target;
use peerline_wire::cert::CertRepr;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = CertRepr::decode(data) {
        assert_eq!(c.encode(), data);
    }
    let _ = peerline_crypto::Certificate::verify(data, &[7; 32]);
});
