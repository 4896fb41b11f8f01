//! STUN Binding (RFC 8489) on the supernode's port: any standard STUN client learns its
//! reflexive address there, and Peerline clients use the same exchange.
//!
//! The codec is the `stun-types` crate (zero-copy, fuzzed); this module only decides what
//! to answer. Sans-IO: bytes in, bytes out.

use std::net::SocketAddr;

use stun_types::attribute::XorMappedAddress;
use stun_types::message::{
    Message, MessageClass, MessageWrite, MessageWriteExt, MessageWriteMutSlice, BINDING,
};

/// Bytes an answer takes at most: header, XOR-MAPPED-ADDRESS of an IPv6 address,
/// FINGERPRINT. A buffer this long always fits an answer.
pub const ANSWER_MAX: usize = 20 + 4 + 20 + 8;

/// The answer to a STUN message from `from`, if it is a Binding request: a success
/// response carrying XOR-MAPPED-ADDRESS (the address the request came from) and a
/// FINGERPRINT. Anything else (responses, indications, other methods, garbage) gets
/// no answer, so the port cannot be used to reflect traffic at a third party.
pub fn answer(request: &[u8], from: SocketAddr) -> Option<Vec<u8>> {
    let mut out = [0u8; ANSWER_MAX];
    let n = answer_into(request, from, &mut out)?;
    Some(out[..n].to_vec())
}

/// [`answer`] written into `out` (the caller's send buffer: no allocation), returning
/// its length. `None` when there is nothing to answer or `out` is shorter than
/// [`ANSWER_MAX`].
pub fn answer_into(request: &[u8], from: SocketAddr, out: &mut [u8]) -> Option<usize> {
    if out.len() < ANSWER_MAX {
        return None;
    }
    let msg = Message::from_bytes(request).ok()?;
    if !msg.has_class(MessageClass::Request) || !msg.has_method(BINDING) {
        return None;
    }
    let mut resp = Message::builder_success(&msg, MessageWriteMutSlice::new(out));
    resp.add_attribute(&XorMappedAddress::new(from, msg.transaction_id()))
        .ok()?;
    resp.add_fingerprint().ok()?;
    Some(resp.finish())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A Binding request built by hand from RFC 8489 section 5 (no library involved).
    fn request(tid: [u8; 12]) -> Vec<u8> {
        let mut b = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
        b.extend_from_slice(&tid);
        b
    }

    /// Decodes XOR-MAPPED-ADDRESS by hand (RFC 8489 section 14.2).
    fn xor_mapped(resp: &[u8]) -> Option<SocketAddr> {
        let mut at = 20;
        while at + 4 <= resp.len() {
            let ty = u16::from_be_bytes([resp[at], resp[at + 1]]);
            let len = u16::from_be_bytes([resp[at + 2], resp[at + 3]]) as usize;
            let v = &resp[at + 4..at + 4 + len];
            if ty == 0x0020 && v[1] == 0x01 {
                let port = u16::from_be_bytes([v[2], v[3]]) ^ 0x2112;
                let ip = [v[4] ^ 0x21, v[5] ^ 0x12, v[6] ^ 0xA4, v[7] ^ 0x42];
                return Some(SocketAddr::from((ip, port)));
            }
            at += 4 + len.div_ceil(4) * 4;
        }
        None
    }

    #[test]
    fn binding_request_gets_the_source_address_back() {
        let from: SocketAddr = "198.51.100.7:40123".parse().unwrap();
        let tid = [7u8; 12];
        let resp = answer(&request(tid), from).expect("answered");
        assert_eq!(&resp[0..2], &[0x01, 0x01], "Binding success response");
        assert_eq!(&resp[8..20], &tid, "same transaction id");
        assert_eq!(xor_mapped(&resp), Some(from));
        assert!(peerline_wire::packet::is_stun(&resp));
    }

    #[test]
    fn responses_and_other_methods_get_no_answer() {
        let from: SocketAddr = "198.51.100.7:1".parse().unwrap();
        let mut r = request([1; 12]);
        r[0] = 0x01; // success class: never answered (no reflection loops)
        r[1] = 0x01;
        assert!(answer(&r, from).is_none());
        let mut other = request([1; 12]);
        other[1] = 0x03; // Allocate (TURN) is not served here
        assert!(answer(&other, from).is_none());
    }

    #[test]
    fn answer_into_writes_the_same_bytes_and_refuses_short_buffers() {
        let req = request([3; 12]);
        for from in ["198.51.100.7:9", "[2001:db8::1]:443"] {
            let from: SocketAddr = from.parse().unwrap();
            let mut out = [0xAAu8; 200];
            let n = answer_into(&req, from, &mut out).expect("answered");
            assert!(n <= ANSWER_MAX);
            assert_eq!(Some(out[..n].to_vec()), answer(&req, from));
            assert_eq!(xor_mapped(&out[..n]).is_some(), from.is_ipv4());
            let mut short = [0u8; ANSWER_MAX - 1];
            assert_eq!(answer_into(&req, from, &mut short), None);
        }
    }

    proptest! {
        #[test]
        fn answer_into_is_total(b in proptest::collection::vec(any::<u8>(), 0..300), len in 0usize..100) {
            let mut out = vec![0u8; len];
            if let Some(n) = answer_into(&b, "[::1]:1".parse().unwrap(), &mut out) {
                prop_assert!(n <= len);
            }
        }

        #[test]
        fn answer_is_total(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = answer(&b, "127.0.0.1:1".parse().unwrap());
        }
    }
}
