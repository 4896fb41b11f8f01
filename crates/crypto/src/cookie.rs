//! Handshake MACs and cookies, as in WireGuard (section 5.4.4 of its paper).
//!
//! Every handshake initiation ends with two 16-byte MACs:
//!
//! * `mac1` = BLAKE2s-128 keyed with `BLAKE2s("peerline mac1----" ‖ responder static key)`,
//!   over every byte before it. Anyone who knows the responder's public key can make it,
//!   so it proves nothing about the sender; but it is checked before any Diffie-Hellman
//!   work, so random datagrams cost the responder one keyed hash.
//! * `mac2` = BLAKE2s-128 keyed with a *cookie*, over every byte before it (mac1 included),
//!   or zeros. A responder under load answers an initiation without a valid mac2 with a
//!   cookie reply instead of doing Diffie-Hellman work. The cookie is
//!   BLAKE2s-128(secret, source IP ‖ port) with a secret the responder rotates every two
//!   minutes, so only a sender that can receive at its address learns it.
//!
//! A cookie reply carries the cookie encrypted with XChaCha20-Poly1305 under
//! `BLAKE2s("peerline cookie--" ‖ responder static key)`, with the initiation's mac1 as
//! associated data: only the initiator of that very initiation can use it, and a reply to
//! someone else's initiation cannot be forged without the responder's public key.
//!
//! [`encode_init`] is the one way to write a handshake initiation: callers that build
//! packets (the client, load generators) follow any change of the layout through it.

use std::net::SocketAddr;

use blake2::digest::{KeyInit, Mac};
use blake2::{Blake2s256, Blake2sMac, Digest};
use chacha20poly1305::aead::{Aead, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use peerline_wire::packet::{
    Packet, COOKIE_NONCE_LEN, ENCRYPTED_COOKIE_LEN, INIT_MACS, INIT_PREFIX, MAC_LEN, MIN_IK_MSG1,
    TYPE_HANDSHAKE_INIT,
};

/// Bytes of a cookie.
pub const COOKIE_LEN: usize = 16;
/// How long a cookie secret is used before a fresh one replaces it (cookies made with the
/// previous secret are still accepted, so a cookie lives between 2 and 4 minutes).
pub const SECRET_LIFETIME_S: u64 = 120;
/// How long an initiator uses a cookie it was given (a little under the secret lifetime).
pub const COOKIE_USE_S: u64 = 110;

const LABEL_MAC1: &[u8] = b"peerline mac1----";
const LABEL_COOKIE: &[u8] = b"peerline cookie--";

type Mac16 = Blake2sMac<blake2::digest::consts::U16>;

/// The keys a responder's static public key gives for mac1 and cookie encryption.
/// Derive once per responder and keep: both are hashes of the public key.
#[derive(Clone)]
pub struct MacKeys {
    mac1: [u8; 32],
    cookie: [u8; 32],
}

impl std::fmt::Debug for MacKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MacKeys")
    }
}

fn hash2(a: &[u8], b: &[u8]) -> [u8; 32] {
    let mut h = Blake2s256::new();
    h.update(a);
    h.update(b);
    h.finalize().into()
}

fn mac16(key: &[u8], parts: &[&[u8]]) -> [u8; MAC_LEN] {
    // Keys here are 16 or 32 bytes, within BLAKE2s's 32-byte key limit.
    let Ok(mut m) = <Mac16 as KeyInit>::new_from_slice(key) else {
        return [0; MAC_LEN];
    };
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

/// Constant-time comparison of two MACs.
fn same(a: &[u8; MAC_LEN], b: &[u8]) -> bool {
    if b.len() != MAC_LEN {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl MacKeys {
    /// The keys for initiations to the responder with this X25519 public key.
    pub fn new(responder_static_public: &[u8; 32]) -> Self {
        MacKeys {
            mac1: hash2(LABEL_MAC1, responder_static_public),
            cookie: hash2(LABEL_COOKIE, responder_static_public),
        }
    }

    /// The keys for initiations to ourselves, from our X25519 private key.
    pub fn for_private(static_private: &[u8; 32]) -> Self {
        let public =
            x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from(*static_private));
        Self::new(public.as_bytes())
    }

    /// Whether `datagram`, a whole handshake initiation, carries a valid mac1.
    pub fn mac1_ok(&self, datagram: &[u8]) -> bool {
        let Some(at) = mac1_offset(datagram) else {
            return false;
        };
        same(
            &mac16(&self.mac1, &[&datagram[..at]]),
            &datagram[at..at + MAC_LEN],
        )
    }

    /// Encrypts `cookie` for the initiator of an initiation whose mac1 was `mac1`.
    pub fn seal_cookie(
        &self,
        nonce: &[u8; COOKIE_NONCE_LEN],
        cookie: &[u8; COOKIE_LEN],
        mac1: &[u8; MAC_LEN],
    ) -> [u8; ENCRYPTED_COOKIE_LEN] {
        let aead = XChaCha20Poly1305::new((&self.cookie).into());
        let mut out = [0u8; ENCRYPTED_COOKIE_LEN];
        if let Ok(ct) = aead.encrypt(
            XNonce::from_slice(nonce),
            Payload {
                msg: cookie,
                aad: mac1,
            },
        ) {
            if ct.len() == ENCRYPTED_COOKIE_LEN {
                out.copy_from_slice(&ct);
            }
        }
        out
    }

    /// Decrypts a cookie reply's cookie; `mac1` is that of the initiation it answers.
    pub fn open_cookie(
        &self,
        nonce: &[u8; COOKIE_NONCE_LEN],
        sealed: &[u8; ENCRYPTED_COOKIE_LEN],
        mac1: &[u8; MAC_LEN],
    ) -> Option<[u8; COOKIE_LEN]> {
        let aead = XChaCha20Poly1305::new((&self.cookie).into());
        let pt = aead
            .decrypt(
                XNonce::from_slice(nonce),
                Payload {
                    msg: sealed,
                    aad: mac1,
                },
            )
            .ok()?;
        pt.try_into().ok()
    }
}

/// Offset of mac1 in a datagram that is long enough to be a handshake initiation.
fn mac1_offset(datagram: &[u8]) -> Option<usize> {
    if datagram.len() < INIT_PREFIX + MIN_IK_MSG1 + INIT_MACS
        || datagram.first() != Some(&TYPE_HANDSHAKE_INIT)
    {
        return None;
    }
    Some(datagram.len() - INIT_MACS)
}

/// The mac1 field of a handshake initiation datagram (zeros if it is not one).
pub fn mac1_of(datagram: &[u8]) -> [u8; MAC_LEN] {
    let mut m = [0u8; MAC_LEN];
    if let Some(at) = mac1_offset(datagram) {
        m.copy_from_slice(&datagram[at..at + MAC_LEN]);
    }
    m
}

/// Whether `datagram`, a whole handshake initiation, carries mac2 made with `cookie`.
pub fn mac2_ok(cookie: &[u8; COOKIE_LEN], datagram: &[u8]) -> bool {
    let Some(at) = mac1_offset(datagram) else {
        return false;
    };
    let at2 = at + MAC_LEN;
    same(&mac16(cookie, &[&datagram[..at2]]), &datagram[at2..])
}

/// The cookie for a source address under a responder secret.
pub fn cookie_for(secret: &[u8; 32], source: &SocketAddr) -> [u8; COOKIE_LEN] {
    let ip = match source.ip() {
        std::net::IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
        std::net::IpAddr::V6(a) => a.octets(),
    };
    mac16(secret, &[&ip, &source.port().to_le_bytes()])
}

/// Writes a complete handshake initiation: header, `sender`, Noise message 1, mac1 keyed
/// by the responder's static key and mac2 keyed by `cookie` (zeros without one).
pub fn encode_init(
    sender: u32,
    noise: &[u8],
    keys: &MacKeys,
    cookie: Option<&[u8; COOKIE_LEN]>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(INIT_PREFIX + noise.len() + INIT_MACS);
    Packet::HandshakeInit {
        sender,
        noise,
        mac1: [0; MAC_LEN],
        mac2: [0; MAC_LEN],
    }
    .encode(&mut out);
    let at = out.len() - INIT_MACS;
    let mac1 = mac16(&keys.mac1, &[&out[..at]]);
    out[at..at + MAC_LEN].copy_from_slice(&mac1);
    if let Some(c) = cookie {
        let mac2 = mac16(c, &[&out[..at + MAC_LEN]]);
        out[at + MAC_LEN..].copy_from_slice(&mac2);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn init(keys: &MacKeys, cookie: Option<&[u8; 16]>) -> Vec<u8> {
        encode_init(7, &[9u8; MIN_IK_MSG1 + 3], keys, cookie)
    }

    #[test]
    fn mac1_verifies_only_for_the_right_responder_and_unchanged_bytes() {
        let k = MacKeys::new(&[1; 32]);
        let p = init(&k, None);
        assert!(k.mac1_ok(&p));
        assert!(!MacKeys::new(&[2; 32]).mac1_ok(&p));
        for i in 0..p.len() - MAC_LEN {
            let mut q = p.clone();
            q[i] ^= 1;
            assert!(!k.mac1_ok(&q), "flip at {i} still passes");
        }
        // mac2 is not covered by mac1.
        let mut q = p.clone();
        let n = q.len();
        q[n - 1] ^= 1;
        assert!(k.mac1_ok(&q));
    }

    #[test]
    fn mac2_verifies_with_the_cookie_for_that_address_only() {
        let k = MacKeys::new(&[1; 32]);
        let a: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        let b: SocketAddr = "192.0.2.1:4001".parse().unwrap();
        let secret = [5u8; 32];
        let c = cookie_for(&secret, &a);
        assert_ne!(c, cookie_for(&secret, &b));
        assert_ne!(c, cookie_for(&[6; 32], &a));
        let p = init(&k, Some(&c));
        assert!(k.mac1_ok(&p));
        assert!(mac2_ok(&cookie_for(&secret, &a), &p));
        assert!(!mac2_ok(&cookie_for(&secret, &b), &p));
        assert!(!mac2_ok(&c, &init(&k, None)));
    }

    #[test]
    fn a_cookie_reply_opens_only_for_the_initiation_it_answers() {
        let k = MacKeys::new(&[1; 32]);
        let p = init(&k, None);
        let m1 = mac1_of(&p);
        let sealed = k.seal_cookie(&[3; 24], &[8; 16], &m1);
        assert_eq!(k.open_cookie(&[3; 24], &sealed, &m1), Some([8; 16]));
        assert_eq!(k.open_cookie(&[3; 24], &sealed, &[0; 16]), None);
        assert_eq!(
            MacKeys::new(&[2; 32]).open_cookie(&[3; 24], &sealed, &m1),
            None
        );
        let mut bad = sealed;
        bad[0] ^= 1;
        assert_eq!(k.open_cookie(&[3; 24], &bad, &m1), None);
    }

    #[test]
    fn encode_init_decodes_as_an_initiation() {
        let k = MacKeys::new(&[1; 32]);
        let p = init(&k, Some(&[4; 16]));
        match Packet::decode(&p) {
            Ok(Packet::HandshakeInit {
                sender,
                noise,
                mac1,
                ..
            }) => {
                assert_eq!(sender, 7);
                assert_eq!(noise, &[9u8; MIN_IK_MSG1 + 3][..]);
                assert_eq!(mac1, mac1_of(&p));
            }
            other => panic!("{other:?}"),
        }
    }

    proptest! {
        #[test]
        fn checks_are_total(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let k = MacKeys::new(&[1; 32]);
            let _ = k.mac1_ok(&b);
            let _ = mac2_ok(&[0; 16], &b);
            let _ = mac1_of(&b);
        }
    }
}
