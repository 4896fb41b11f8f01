//! Messages between the supernodes of a fleet, carried by the node-to-node channel.
//!
//! A supernode forwards signalling for a user homed on another supernode as a [`NodeMsg`];
//! answers go back to the origin node under the origin's `token`. Encoded with `postcard`
//! like [`crate::msg::Frame`], and validated the same way: a decoded message is within
//! every limit. A shipped variant is never changed; new ones go at the end.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::msg::{
    check_count, decode_exact, encode_bounded, CallSignal, ContactState, Presence, Response,
    MAX_CANDIDATES, MAX_CERT, MAX_NOTE,
};
use crate::{Error, Username};

/// One message from a supernode to another.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NodeMsg {
    /// `about`'s presence, for `to` (a contact of `about` homed on the receiver). With
    /// `ask`, the receiver answers with `to`'s own presence (a login's first exchange).
    Presence {
        /// The user to tell.
        to: Username,
        /// Whose presence it is.
        about: Username,
        /// As `to` may see it (never `Invisible`).
        presence: Presence,
        /// Answer with `to`'s presence.
        ask: bool,
    },
    /// A contact change for `to` about `about` (a request, an answer, a removal).
    Contact {
        /// The user to tell.
        to: Username,
        /// The other user.
        about: Username,
        /// The relationship as `to` sees it now.
        state: ContactState,
        /// The request's note.
        note: String,
    },
    /// Ring `to` for a connection from `from` (already checked to be allowed by the origin).
    /// Answer: [`NodeMsg::Answer`] with `ConnectAccepted` or an error.
    Connect {
        /// Origin's id of this exchange.
        token: u64,
        /// Callee.
        to: Username,
        /// Caller.
        from: Username,
        /// Caller's certificate.
        cert: Vec<u8>,
        /// Caller's candidates.
        candidates: Vec<SocketAddr>,
        /// The caller's NAT maps each destination to a new port.
        hard_nat: bool,
        /// The session is for an answered call between strangers.
        call_only: bool,
    },
    /// Ring `to` for a call from `from`; `mutual`: they are contacts (strangers ring only a
    /// callee who takes calls from anyone). Answer: [`NodeMsg::Answer`] with `Ok` (ringing)
    /// or an error.
    Ring {
        /// Origin's id of this exchange.
        token: u64,
        /// Callee.
        to: Username,
        /// Caller.
        from: Username,
        /// Caller's id of the call.
        call_id: u64,
        /// Caller and callee are contacts.
        mutual: bool,
    },
    /// A step of a call between `from` and `to`.
    Signal {
        /// The user to tell.
        to: Username,
        /// The sender.
        from: Username,
        /// The caller's id of the call.
        call_id: u64,
        /// What happened.
        signal: CallSignal,
    },
    /// New offline mail waits for `to`: deliver it if they are online on the receiver.
    Mail {
        /// Recipient.
        to: Username,
    },
    /// `user` logged in on the sender: drop any older session the receiver holds for them,
    /// without telling contacts they went offline.
    Kick {
        /// The user.
        user: Username,
    },
    /// The answer to a `Connect` or `Ring` from the receiver.
    Answer {
        /// The origin's token.
        token: u64,
        /// What the callee's supernode answers.
        answer: Response,
    },
    /// An operator revoked `user`'s device `key` (`peerlined revoke` on the sender): if the
    /// receiver has that device logged in, it checks it against the store again.
    Recheck {
        /// The user.
        user: Username,
        /// The device's Noise key.
        key: [u8; 32],
    },
}

impl NodeMsg {
    /// Checks every field limit.
    pub fn validate(&self) -> Result<(), Error> {
        match self {
            NodeMsg::Contact { note, .. } => check_count(note.len(), MAX_NOTE),
            NodeMsg::Connect {
                cert, candidates, ..
            } => {
                check_count(cert.len(), MAX_CERT)?;
                check_count(candidates.len(), MAX_CANDIDATES)
            }
            NodeMsg::Answer { answer, .. } => answer.validate(),
            NodeMsg::Presence { .. }
            | NodeMsg::Ring { .. }
            | NodeMsg::Signal { .. }
            | NodeMsg::Mail { .. }
            | NodeMsg::Kick { .. }
            | NodeMsg::Recheck { .. } => Ok(()),
        }
    }

    /// Decodes and validates a message. Total.
    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        let m: NodeMsg = decode_exact(b)?;
        m.validate()?;
        Ok(m)
    }

    /// Encodes a message.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        self.validate()?;
        encode_bounded(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::msg::ErrorCode;
    use proptest::prelude::*;

    fn user(s: &str) -> Username {
        Username::parse(s).unwrap()
    }

    fn samples() -> Vec<NodeMsg> {
        vec![
            NodeMsg::Presence {
                to: user("alice"),
                about: user("bob"),
                presence: Presence::Away,
                ask: true,
            },
            NodeMsg::Contact {
                to: user("alice"),
                about: user("bob"),
                state: ContactState::Incoming,
                note: "hi".into(),
            },
            NodeMsg::Connect {
                token: 7,
                to: user("alice"),
                from: user("bob"),
                cert: vec![1; 100],
                candidates: vec!["192.0.2.1:4000".parse().unwrap()],
                hard_nat: true,
                call_only: false,
            },
            NodeMsg::Ring {
                token: 9,
                to: user("alice"),
                from: user("bob"),
                call_id: 3,
                mutual: true,
            },
            NodeMsg::Signal {
                to: user("alice"),
                from: user("bob"),
                call_id: 3,
                signal: CallSignal::HangUp,
            },
            NodeMsg::Mail { to: user("alice") },
            NodeMsg::Kick {
                user: user("alice"),
            },
            NodeMsg::Answer {
                token: 7,
                answer: Response::Error {
                    code: ErrorCode::Offline,
                    detail: "gone".into(),
                },
            },
            NodeMsg::Recheck {
                user: user("alice"),
                key: [9; 32],
            },
        ]
    }

    #[test]
    fn every_variant_roundtrips() {
        for m in samples() {
            let b = m.encode().unwrap();
            assert_eq!(NodeMsg::decode(&b).unwrap(), m);
        }
    }

    #[test]
    fn limits_are_enforced_both_ways() {
        let m = NodeMsg::Contact {
            to: user("alice"),
            about: user("bob"),
            state: ContactState::Incoming,
            note: "x".repeat(MAX_NOTE + 1),
        };
        assert!(m.encode().is_err());
        // Encoded without the check, it must still be refused on decode.
        let raw = postcard::to_allocvec(&m).unwrap();
        assert!(NodeMsg::decode(&raw).is_err());
    }

    #[test]
    fn trailing_bytes_are_refused() {
        let mut b = NodeMsg::Mail { to: user("alice") }.encode().unwrap();
        b.push(0);
        assert!(matches!(NodeMsg::decode(&b), Err(Error::Trailing(1))));
    }

    proptest! {
        #[test]
        fn decode_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(m) = NodeMsg::decode(&bytes) {
                // Whatever decodes re-encodes to something that decodes to the same.
                let again = m.encode().unwrap();
                prop_assert_eq!(NodeMsg::decode(&again).unwrap(), m);
            }
        }

        #[test]
        fn mutated_samples_never_panic(i in 0usize..8, pos in 0usize..200, byte in any::<u8>()) {
            let mut b = samples()[i].encode().unwrap();
            let p = pos % b.len();
            b[p] = byte;
            let _ = NodeMsg::decode(&b);
        }
    }
}
