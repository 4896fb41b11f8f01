//! Outer datagram framing.
//!
//! Every Peerline datagram starts with a 4-byte header `[type, version, 0, 0]`. Types have
//! the top bit set so they never collide with STUN, whose first two bits are zero
//! (RFC 8489 section 5), and a STUN message is recognised by its magic cookie.
//!
//! ```text
//! 0x81 HandshakeInit      hdr(4) sender_index(4 LE) noise_ik_msg1(..)
//! 0x82 HandshakeResponse  hdr(4) sender_index(4 LE) receiver_index(4 LE) noise_ik_msg2(..)
//! 0x83 Reset              hdr(4) receiver_index(4 LE)
//! 0x84 Transport          hdr(4) receiver_index(4 LE) counter(8 LE) ciphertext(..)
//! 0x85 Probe              hdr(4) reserved(4) = 0
//! ```

use crate::{Error, MAX_DATAGRAM, PROTOCOL_VERSION};

/// Type byte of a handshake initiation.
pub const TYPE_HANDSHAKE_INIT: u8 = 0x81;
/// Type byte of a handshake response.
pub const TYPE_HANDSHAKE_RESPONSE: u8 = 0x82;
/// Type byte of a reset hint.
pub const TYPE_RESET: u8 = 0x83;
/// Type byte of a transport packet.
pub const TYPE_TRANSPORT: u8 = 0x84;
/// Type byte of a hole-punching probe.
pub const TYPE_PROBE: u8 = 0x85;

/// Bytes of the common header.
pub const HEADER_LEN: usize = 4;
/// Bytes before the Noise message in a handshake initiation.
pub const INIT_PREFIX: usize = HEADER_LEN + 4;
/// Bytes before the Noise message in a handshake response.
pub const RESPONSE_PREFIX: usize = HEADER_LEN + 8;
/// Bytes before the ciphertext in a transport packet.
pub const TRANSPORT_PREFIX: usize = HEADER_LEN + 12;
/// Length of a reset packet.
pub const RESET_LEN: usize = HEADER_LEN + 4;
/// Length of a probe packet.
pub const PROBE_LEN: usize = HEADER_LEN + 4;
/// Poly1305 tag length.
pub const TAG_LEN: usize = 16;
/// Smallest Noise IK first message: e (32) + encrypted s (32 + 16) + empty payload tag (16).
pub const MIN_IK_MSG1: usize = 96;
/// Smallest Noise IK second message: e (32) + empty payload tag (16).
pub const MIN_IK_MSG2: usize = 48;
/// Largest plaintext that fits one transport packet.
pub const MAX_TRANSPORT_PLAINTEXT: usize = MAX_DATAGRAM - TRANSPORT_PREFIX - TAG_LEN;

/// STUN magic cookie (RFC 8489 section 6).
pub const STUN_MAGIC_COOKIE: u32 = 0x2112_A442;

/// A decoded datagram, borrowing its variable part from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// First message of the Noise IK handshake.
    HandshakeInit {
        /// The initiator's index: the responder puts it in every packet it sends back.
        sender: u32,
        /// Noise message 1.
        noise: &'a [u8],
    },
    /// Second message of the Noise IK handshake.
    HandshakeResponse {
        /// The responder's index.
        sender: u32,
        /// The initiator's index, echoed.
        receiver: u32,
        /// Noise message 2.
        noise: &'a [u8],
    },
    /// "I hold no session for this index: handshake again." Unauthenticated, so it only
    /// ever triggers a new handshake, never tears down anything by itself.
    Reset {
        /// The index the sender does not know.
        receiver: u32,
    },
    /// Encrypted frame of an established session.
    Transport {
        /// The recipient's index for this session.
        receiver: u32,
        /// Nonce and replay counter.
        counter: u64,
        /// ChaCha20-Poly1305 ciphertext with tag.
        ciphertext: &'a [u8],
    },
    /// Opens the sender's NAT towards a peer during connection setup; carries nothing and
    /// is never answered. Its source address may teach the peer a new candidate.
    Probe,
    /// A STUN message (handled by the STUN codec, not here).
    Stun(&'a [u8]),
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}

fn need(b: &[u8], n: usize) -> Result<(), Error> {
    if b.len() < n {
        Err(Error::Truncated {
            needed: n,
            got: b.len(),
        })
    } else {
        Ok(())
    }
}

/// True when `b` looks like a STUN message: top two bits zero and the magic cookie.
pub fn is_stun(b: &[u8]) -> bool {
    b.len() >= 20
        && b[0] & 0xC0 == 0
        && u32::from_be_bytes([b[4], b[5], b[6], b[7]]) == STUN_MAGIC_COOKIE
}

impl<'a> Packet<'a> {
    /// Decodes one datagram. Total: every input gives a packet or an error.
    pub fn decode(b: &'a [u8]) -> Result<Self, Error> {
        if b.len() > MAX_DATAGRAM {
            return Err(Error::TooLarge {
                len: b.len(),
                limit: MAX_DATAGRAM,
            });
        }
        if is_stun(b) {
            return Ok(Packet::Stun(b));
        }
        need(b, HEADER_LEN)?;
        let ty = b[0];
        if !matches!(
            ty,
            TYPE_HANDSHAKE_INIT
                | TYPE_HANDSHAKE_RESPONSE
                | TYPE_RESET
                | TYPE_TRANSPORT
                | TYPE_PROBE
        ) {
            return Err(Error::UnknownType(ty));
        }
        if b[1] != PROTOCOL_VERSION {
            return Err(Error::Version(b[1]));
        }
        if b[2] != 0 || b[3] != 0 {
            return Err(Error::Reserved);
        }
        match ty {
            TYPE_HANDSHAKE_INIT => {
                need(b, INIT_PREFIX + MIN_IK_MSG1)?;
                Ok(Packet::HandshakeInit {
                    sender: u32_at(b, 4),
                    noise: &b[INIT_PREFIX..],
                })
            }
            TYPE_HANDSHAKE_RESPONSE => {
                need(b, RESPONSE_PREFIX + MIN_IK_MSG2)?;
                Ok(Packet::HandshakeResponse {
                    sender: u32_at(b, 4),
                    receiver: u32_at(b, 8),
                    noise: &b[RESPONSE_PREFIX..],
                })
            }
            TYPE_PROBE => {
                if b.len() != PROBE_LEN {
                    return Err(if b.len() < PROBE_LEN {
                        Error::Truncated {
                            needed: PROBE_LEN,
                            got: b.len(),
                        }
                    } else {
                        Error::Trailing(b.len() - PROBE_LEN)
                    });
                }
                if b[4..8] != [0, 0, 0, 0] {
                    return Err(Error::Reserved);
                }
                Ok(Packet::Probe)
            }
            TYPE_RESET => {
                if b.len() != RESET_LEN {
                    return Err(if b.len() < RESET_LEN {
                        Error::Truncated {
                            needed: RESET_LEN,
                            got: b.len(),
                        }
                    } else {
                        Error::Trailing(b.len() - RESET_LEN)
                    });
                }
                Ok(Packet::Reset {
                    receiver: u32_at(b, 4),
                })
            }
            _ => {
                need(b, TRANSPORT_PREFIX + TAG_LEN)?;
                Ok(Packet::Transport {
                    receiver: u32_at(b, 4),
                    counter: u64_at(b, 8),
                    ciphertext: &b[TRANSPORT_PREFIX..],
                })
            }
        }
    }

    /// Appends the encoded packet to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let header =
            |out: &mut Vec<u8>, ty: u8| out.extend_from_slice(&[ty, PROTOCOL_VERSION, 0, 0]);
        match *self {
            Packet::HandshakeInit { sender, noise } => {
                header(out, TYPE_HANDSHAKE_INIT);
                out.extend_from_slice(&sender.to_le_bytes());
                out.extend_from_slice(noise);
            }
            Packet::HandshakeResponse {
                sender,
                receiver,
                noise,
            } => {
                header(out, TYPE_HANDSHAKE_RESPONSE);
                out.extend_from_slice(&sender.to_le_bytes());
                out.extend_from_slice(&receiver.to_le_bytes());
                out.extend_from_slice(noise);
            }
            Packet::Reset { receiver } => {
                header(out, TYPE_RESET);
                out.extend_from_slice(&receiver.to_le_bytes());
            }
            Packet::Transport {
                receiver,
                counter,
                ciphertext,
            } => {
                header(out, TYPE_TRANSPORT);
                out.extend_from_slice(&receiver.to_le_bytes());
                out.extend_from_slice(&counter.to_le_bytes());
                out.extend_from_slice(ciphertext);
            }
            Packet::Probe => {
                header(out, TYPE_PROBE);
                out.extend_from_slice(&[0, 0, 0, 0]);
            }
            Packet::Stun(b) => out.extend_from_slice(b),
        }
    }

    /// Writes the 16-byte transport header; the caller appends the ciphertext.
    pub fn transport_header(receiver: u32, counter: u64) -> [u8; TRANSPORT_PREFIX] {
        let mut h = [0u8; TRANSPORT_PREFIX];
        h[0] = TYPE_TRANSPORT;
        h[1] = PROTOCOL_VERSION;
        h[4..8].copy_from_slice(&receiver.to_le_bytes());
        h[8..16].copy_from_slice(&counter.to_le_bytes());
        h
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn roundtrip(p: Packet<'_>) {
        let mut out = Vec::new();
        p.encode(&mut out);
        assert_eq!(Packet::decode(&out).unwrap(), p);
    }

    #[test]
    fn every_type_roundtrips() {
        let n1 = [7u8; MIN_IK_MSG1];
        let n2 = [9u8; MIN_IK_MSG2 + 20];
        let ct = [1u8; 40];
        roundtrip(Packet::HandshakeInit {
            sender: 1,
            noise: &n1,
        });
        roundtrip(Packet::HandshakeResponse {
            sender: 2,
            receiver: 3,
            noise: &n2,
        });
        roundtrip(Packet::Probe);
        roundtrip(Packet::Reset {
            receiver: 0xdead_beef,
        });
        roundtrip(Packet::Transport {
            receiver: 5,
            counter: u64::MAX,
            ciphertext: &ct,
        });
    }

    #[test]
    fn rejects_other_versions_and_reserved_bits() {
        let mut b = Vec::new();
        Packet::Reset { receiver: 1 }.encode(&mut b);
        b[1] = 2;
        assert_eq!(Packet::decode(&b), Err(Error::Version(2)));
        b[1] = PROTOCOL_VERSION;
        b[3] = 1;
        assert_eq!(Packet::decode(&b), Err(Error::Reserved));
    }

    #[test]
    fn recognises_stun_binding_request() {
        let mut b = vec![0x00, 0x01, 0x00, 0x00];
        b.extend_from_slice(&STUN_MAGIC_COOKIE.to_be_bytes());
        b.extend_from_slice(&[0u8; 12]);
        assert!(matches!(Packet::decode(&b), Ok(Packet::Stun(_))));
    }

    #[test]
    fn every_truncation_is_an_error_not_a_panic() {
        let n1 = [7u8; MIN_IK_MSG1];
        for p in [
            Packet::HandshakeInit {
                sender: 1,
                noise: &n1,
            },
            Packet::Transport {
                receiver: 5,
                counter: 1,
                ciphertext: &[0u8; 16],
            },
        ] {
            let mut out = Vec::new();
            p.encode(&mut out);
            for cut in 0..out.len() {
                assert!(Packet::decode(&out[..cut]).is_err(), "cut at {cut}");
            }
        }
    }

    proptest! {
        #[test]
        fn decode_is_total(b in proptest::collection::vec(any::<u8>(), 0..1300)) {
            let _ = Packet::decode(&b);
        }

        #[test]
        fn decoded_packets_reencode_identically(b in proptest::collection::vec(any::<u8>(), 0..1300)) {
            if let Ok(p) = Packet::decode(&b) {
                let mut out = Vec::new();
                p.encode(&mut out);
                prop_assert_eq!(out, b);
            }
        }

        #[test]
        fn transport_header_matches_encode(r in any::<u32>(), c in any::<u64>()) {
            let mut out = Vec::new();
            Packet::Transport { receiver: r, counter: c, ciphertext: &[] }.encode(&mut out);
            prop_assert_eq!(&out[..], &Packet::transport_header(r, c)[..]);
        }
    }
}
