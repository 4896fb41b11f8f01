//! Outer datagram framing.
//!
//! Every Peerline datagram starts with a 4-byte header `[type, version, 0, 0]`. Types have
//! the top bit set so they never collide with STUN, whose first two bits are zero
//! (RFC 8489 section 5), and a STUN message is recognised by its magic cookie.
//!
//! ```text
//! 0x81 HandshakeInit      hdr(4) sender_index(4 LE) noise_ik_msg1(..) mac1(16) mac2(16)
//! 0x82 HandshakeResponse  hdr(4) sender_index(4 LE) receiver_index(4 LE) noise_ik_msg2(..)
//! 0x83 Reset              hdr(4) receiver_index(4 LE)
//! 0x84 Transport          hdr(4) receiver_index(4 LE) counter(8 LE) ciphertext(..)
//! 0x85 Probe              hdr(4) reserved(4) = 0
//! 0x86 CookieReply        hdr(4) receiver_index(4 LE) nonce(24) encrypted_cookie(32)
//! 0x87 Reject             hdr(4) receiver_index(4 LE) reason(1) version(1) hint(2 LE)
//! ```
//!
//! A Reject's `hint` is 0 for every reason but `Busy` (7), where it is the number of
//! milliseconds to wait before the next try.
//!
//! The MACs of a handshake initiation and the cookie are computed by
//! `peerline_crypto::cookie` (this crate has no cryptography); a Reject is decoded whatever
//! its header's version byte, so that a peer of another version can read it.

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
/// Type byte of a cookie reply (the answer to a handshake initiation under load).
pub const TYPE_COOKIE_REPLY: u8 = 0x86;
/// Type byte of a handshake rejection (its layout is the same in every version).
pub const TYPE_REJECT: u8 = 0x87;

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
/// Length of each of the two MACs that end a handshake initiation.
pub const MAC_LEN: usize = 16;
/// Bytes after the Noise message in a handshake initiation: mac1 and mac2.
pub const INIT_MACS: usize = 2 * MAC_LEN;
/// Nonce of an encrypted cookie (XChaCha20-Poly1305).
pub const COOKIE_NONCE_LEN: usize = 24;
/// An encrypted cookie: 16 bytes and its tag.
pub const ENCRYPTED_COOKIE_LEN: usize = 16 + TAG_LEN;
/// Length of a cookie reply.
pub const COOKIE_REPLY_LEN: usize = HEADER_LEN + 4 + COOKIE_NONCE_LEN + ENCRYPTED_COOKIE_LEN;
/// Length of a reject packet.
pub const REJECT_LEN: usize = HEADER_LEN + 8;
/// Smallest Noise IK first message: e (32) + encrypted s (32 + 16) + empty payload tag (16).
pub const MIN_IK_MSG1: usize = 96;
/// Smallest Noise IK second message: e (32) + empty payload tag (16).
pub const MIN_IK_MSG2: usize = 48;
/// Largest plaintext that fits one transport packet.
pub const MAX_TRANSPORT_PLAINTEXT: usize = MAX_DATAGRAM - TRANSPORT_PREFIX - TAG_LEN;

/// STUN magic cookie (RFC 8489 section 6).
pub const STUN_MAGIC_COOKIE: u32 = 0x2112_A442;

/// Why a handshake was refused (the `reason` byte of a [`Packet::Reject`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectReason {
    /// The initiator speaks another protocol version; `version` says which one we speak.
    Version,
    /// `Hello.unix_ms` is too far from the responder's clock (a replay, or a wrong clock).
    Stale,
    /// Too many handshakes from this source or logins to this account: wait and retry.
    RateLimited,
    /// The device's certificate was revoked: enrol the device again.
    Revoked,
    /// The supernode is full: log in at another supernode of the fleet.
    Full,
    /// The supernode is shutting down: log in at another supernode of the fleet.
    Draining,
    /// The supernode has more logins queued than it can serve soon: try again after
    /// `retry_after_ms` (plus jitter). Not a failure of this client: it never counts
    /// towards a backoff.
    Busy {
        /// Milliseconds to wait before the next handshake.
        retry_after_ms: u16,
    },
    /// A reason this build does not know (a newer peer).
    Other(u8),
}

impl RejectReason {
    /// The reason's byte.
    pub fn to_byte(self) -> u8 {
        match self {
            RejectReason::Version => 1,
            RejectReason::Stale => 2,
            RejectReason::RateLimited => 3,
            RejectReason::Revoked => 4,
            RejectReason::Full => 5,
            RejectReason::Draining => 6,
            RejectReason::Busy { .. } => REJECT_BUSY,
            RejectReason::Other(b) => b,
        }
    }

    /// The reason a byte names (`Busy` with no wait: its hint travels apart, see
    /// [`RejectReason::hint`]).
    pub fn from_byte(b: u8) -> Self {
        match b {
            REJECT_BUSY => RejectReason::Busy { retry_after_ms: 0 },
            1 => RejectReason::Version,
            2 => RejectReason::Stale,
            3 => RejectReason::RateLimited,
            4 => RejectReason::Revoked,
            5 => RejectReason::Full,
            6 => RejectReason::Draining,
            b => RejectReason::Other(b),
        }
    }
}

impl RejectReason {
    /// The two bytes after the version: the retry-after of a `Busy`, zero otherwise.
    pub fn hint(self) -> u16 {
        match self {
            RejectReason::Busy { retry_after_ms } => retry_after_ms,
            _ => 0,
        }
    }
}

/// Reason byte of [`RejectReason::Busy`].
pub const REJECT_BUSY: u8 = 7;

/// A decoded datagram, borrowing its variable part from the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Packet<'a> {
    /// First message of the Noise IK handshake.
    HandshakeInit {
        /// The initiator's index: the responder puts it in every packet it sends back.
        sender: u32,
        /// Noise message 1.
        noise: &'a [u8],
        /// MAC over everything before it, keyed by the responder's static public key.
        mac1: [u8; MAC_LEN],
        /// MAC over everything before it, keyed by a cookie (zeros without one).
        mac2: [u8; MAC_LEN],
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
    /// "Prove you can receive at your address": answers a handshake initiation under load.
    CookieReply {
        /// The initiator's index from the initiation.
        receiver: u32,
        /// XChaCha20-Poly1305 nonce.
        nonce: [u8; COOKIE_NONCE_LEN],
        /// The cookie, encrypted with the initiation's mac1 as associated data.
        cookie: [u8; ENCRYPTED_COOKIE_LEN],
    },
    /// "Your handshake was refused, and why." Unauthenticated: a hint for the user, never
    /// more than a failed handshake.
    Reject {
        /// The index the refused initiation carried (or the session's, after login).
        receiver: u32,
        /// Why.
        reason: RejectReason,
        /// The protocol version the sender speaks.
        version: u8,
    },
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

fn array_at<const N: usize>(b: &[u8], at: usize) -> [u8; N] {
    let mut a = [0u8; N];
    a.copy_from_slice(&b[at..at + N]);
    a
}

fn exact(b: &[u8], n: usize) -> Result<(), Error> {
    match b.len().cmp(&n) {
        std::cmp::Ordering::Less => Err(Error::Truncated {
            needed: n,
            got: b.len(),
        }),
        std::cmp::Ordering::Greater => Err(Error::Trailing(b.len() - n)),
        std::cmp::Ordering::Equal => Ok(()),
    }
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
                | TYPE_COOKIE_REPLY
                | TYPE_REJECT
        ) {
            return Err(Error::UnknownType(ty));
        }
        if ty == TYPE_REJECT {
            // Version-independent, so that it can say "wrong version".
            exact(b, REJECT_LEN)?;
            if b[2] != 0 || b[3] != 0 {
                return Err(Error::Reserved);
            }
            if b[1] != b[9] {
                return Err(Error::Malformed("reject: the two version bytes differ"));
            }
            let hint = u16::from_le_bytes([b[10], b[11]]);
            let reason = match RejectReason::from_byte(b[8]) {
                RejectReason::Busy { .. } => RejectReason::Busy {
                    retry_after_ms: hint,
                },
                // Only a Busy carries a hint; elsewhere the bytes are reserved.
                _ if hint != 0 => return Err(Error::Reserved),
                r => r,
            };
            return Ok(Packet::Reject {
                receiver: u32_at(b, 4),
                reason,
                version: b[9],
            });
        }
        if b[1] != PROTOCOL_VERSION {
            return Err(Error::Version(b[1]));
        }
        if b[2] != 0 || b[3] != 0 {
            return Err(Error::Reserved);
        }
        match ty {
            TYPE_HANDSHAKE_INIT => {
                need(b, INIT_PREFIX + MIN_IK_MSG1 + INIT_MACS)?;
                let macs = b.len() - INIT_MACS;
                Ok(Packet::HandshakeInit {
                    sender: u32_at(b, 4),
                    noise: &b[INIT_PREFIX..macs],
                    mac1: array_at(b, macs),
                    mac2: array_at(b, macs + MAC_LEN),
                })
            }
            TYPE_COOKIE_REPLY => {
                exact(b, COOKIE_REPLY_LEN)?;
                Ok(Packet::CookieReply {
                    receiver: u32_at(b, 4),
                    nonce: array_at(b, 8),
                    cookie: array_at(b, 8 + COOKIE_NONCE_LEN),
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
            Packet::HandshakeInit {
                sender,
                noise,
                mac1,
                mac2,
            } => {
                header(out, TYPE_HANDSHAKE_INIT);
                out.extend_from_slice(&sender.to_le_bytes());
                out.extend_from_slice(noise);
                out.extend_from_slice(&mac1);
                out.extend_from_slice(&mac2);
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
            Packet::CookieReply {
                receiver,
                nonce,
                cookie,
            } => {
                header(out, TYPE_COOKIE_REPLY);
                out.extend_from_slice(&receiver.to_le_bytes());
                out.extend_from_slice(&nonce);
                out.extend_from_slice(&cookie);
            }
            Packet::Reject {
                receiver,
                reason,
                version,
            } => {
                out.extend_from_slice(&[TYPE_REJECT, version, 0, 0]);
                out.extend_from_slice(&receiver.to_le_bytes());
                out.extend_from_slice(&[reason.to_byte(), version]);
                out.extend_from_slice(&reason.hint().to_le_bytes());
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
            mac1: [3; MAC_LEN],
            mac2: [4; MAC_LEN],
        });
        roundtrip(Packet::CookieReply {
            receiver: 9,
            nonce: [5; COOKIE_NONCE_LEN],
            cookie: [6; ENCRYPTED_COOKIE_LEN],
        });
        for reason in [
            RejectReason::Version,
            RejectReason::Stale,
            RejectReason::RateLimited,
            RejectReason::Revoked,
            RejectReason::Full,
            RejectReason::Draining,
            RejectReason::Busy { retry_after_ms: 0 },
            RejectReason::Busy {
                retry_after_ms: 1500,
            },
            RejectReason::Busy {
                retry_after_ms: u16::MAX,
            },
            RejectReason::Other(77),
        ] {
            roundtrip(Packet::Reject {
                receiver: 8,
                reason,
                version: PROTOCOL_VERSION,
            });
        }
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
    fn a_reject_of_another_version_still_decodes() {
        let mut b = Vec::new();
        Packet::Reject {
            receiver: 3,
            reason: RejectReason::Version,
            version: 9,
        }
        .encode(&mut b);
        assert_eq!(b[1], 9);
        assert_eq!(
            Packet::decode(&b),
            Ok(Packet::Reject {
                receiver: 3,
                reason: RejectReason::Version,
                version: 9
            })
        );
        b.push(0);
        assert_eq!(Packet::decode(&b), Err(Error::Trailing(1)));
    }

    #[test]
    fn a_reject_whose_version_bytes_differ_is_malformed() {
        // Found by the `packet` fuzz target: it would not re-encode to the same bytes.
        let b = [0x87, 148, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        assert!(matches!(Packet::decode(&b), Err(Error::Malformed(_))));
    }

    #[test]
    fn a_busy_reject_carries_its_wait_in_the_last_two_bytes() {
        let mut b = Vec::new();
        Packet::Reject {
            receiver: 0x0102_0304,
            reason: RejectReason::Busy {
                retry_after_ms: 0x1234,
            },
            version: PROTOCOL_VERSION,
        }
        .encode(&mut b);
        assert_eq!(
            b,
            [
                TYPE_REJECT,
                PROTOCOL_VERSION,
                0,
                0,
                4,
                3,
                2,
                1,
                REJECT_BUSY,
                PROTOCOL_VERSION,
                0x34,
                0x12
            ]
        );
    }

    #[test]
    fn only_a_busy_reject_may_carry_a_hint() {
        let mut b = Vec::new();
        Packet::Reject {
            receiver: 1,
            reason: RejectReason::RateLimited,
            version: PROTOCOL_VERSION,
        }
        .encode(&mut b);
        assert_eq!(&b[10..], &[0, 0]);
        b[10] = 1;
        assert_eq!(Packet::decode(&b), Err(Error::Reserved));
    }

    #[test]
    fn an_unknown_reason_decodes_as_other() {
        // What a build that predates a reason makes of it: a generic refusal.
        let b = [TYPE_REJECT, 9, 0, 0, 1, 0, 0, 0, 200, 9, 0, 0];
        assert_eq!(
            Packet::decode(&b),
            Ok(Packet::Reject {
                receiver: 1,
                reason: RejectReason::Other(200),
                version: 9
            })
        );
    }

    #[test]
    fn the_macs_are_the_last_32_bytes_of_an_initiation() {
        let noise = [7u8; MIN_IK_MSG1 + 5];
        let mut b = Vec::new();
        Packet::HandshakeInit {
            sender: 2,
            noise: &noise,
            mac1: [0xaa; MAC_LEN],
            mac2: [0xbb; MAC_LEN],
        }
        .encode(&mut b);
        assert_eq!(b.len(), INIT_PREFIX + noise.len() + INIT_MACS);
        assert_eq!(&b[b.len() - 32..b.len() - 16], &[0xaa; 16]);
        assert_eq!(&b[b.len() - 16..], &[0xbb; 16]);
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
                mac1: [1; MAC_LEN],
                mac2: [0; MAC_LEN],
            },
            Packet::CookieReply {
                receiver: 1,
                nonce: [2; COOKIE_NONCE_LEN],
                cookie: [3; ENCRYPTED_COOKIE_LEN],
            },
            Packet::Reject {
                receiver: 1,
                reason: RejectReason::Stale,
                version: PROTOCOL_VERSION,
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
        fn every_reject_roundtrips(
            receiver in any::<u32>(),
            byte in any::<u8>(),
            wait in any::<u16>(),
            version in any::<u8>(),
        ) {
            let reason = match RejectReason::from_byte(byte) {
                RejectReason::Busy { .. } => RejectReason::Busy { retry_after_ms: wait },
                r => r,
            };
            prop_assert_eq!(reason.to_byte(), byte);
            let p = Packet::Reject { receiver, reason, version };
            let mut out = Vec::new();
            p.encode(&mut out);
            prop_assert_eq!(out.len(), REJECT_LEN);
            prop_assert_eq!(Packet::decode(&out), Ok(p));
        }

        #[test]
        fn transport_header_matches_encode(r in any::<u32>(), c in any::<u64>()) {
            let mut out = Vec::new();
            Packet::Transport { receiver: r, counter: c, ciphertext: &[] }.encode(&mut out);
            prop_assert_eq!(&out[..], &Packet::transport_header(r, c)[..]);
        }
    }
}
