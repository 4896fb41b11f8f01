//! Plaintext frames carried inside encrypted transport packets, and handshake payloads.
//!
//! Frames are encoded with `postcard` (varint integers, length-prefixed strings and
//! sequences, enum variants as a varint index; see `docs/protocol.md`). A shipped variant
//! is never changed: new behaviour gets a new variant at the end of its enum.
//!
//! Decoding is total, rejects trailing bytes, and then checks every semantic limit
//! (text lengths, candidate counts, list sizes), so a decoded frame is within bounds.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::packet::MAX_TRANSPORT_PLAINTEXT;
use crate::{Error, Username};

/// Longest chat or offline message text, in bytes of UTF-8.
pub const MAX_TEXT: usize = 1000;
/// Longest note attached to a contact request.
pub const MAX_NOTE: usize = 200;
/// Longest password accepted at registration or enrolment.
pub const MAX_PASSWORD: usize = 256;
/// Shortest password accepted at registration.
pub const MIN_PASSWORD: usize = 8;
/// Most address candidates in one connection setup.
pub const MAX_CANDIDATES: usize = 8;
/// Most search results in one answer.
pub const MAX_SEARCH_RESULTS: usize = 20;
/// Most contact entries in one page of `ContactList`.
pub const CONTACTS_PAGE: usize = 25;
/// Longest error detail text.
pub const MAX_DETAIL: usize = 200;
/// Longest encoded certificate in a frame.
pub const MAX_CERT: usize = crate::cert::MAX_CERT_LEN;
/// Longest media payload in one [`Frame::Datagram`] (an encoded audio packet).
pub const MAX_MEDIA: usize = 1000;
/// Most supernode addresses in one host list (`Hosts`, `Redirect`).
pub const MAX_HOSTS: usize = 16;

/// Availability a user shows to their contacts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Presence {
    /// Not connected (or invisible, as seen by others).
    Offline,
    /// Connected and available.
    Online,
    /// Connected, away from the keyboard.
    Away,
    /// Connected, do not disturb.
    Busy,
    /// Connected but shown to contacts as offline.
    Invisible,
}

impl Presence {
    /// Lowercase name as used by the CLI and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Presence::Offline => "offline",
            Presence::Online => "online",
            Presence::Away => "away",
            Presence::Busy => "busy",
            Presence::Invisible => "invisible",
        }
    }

    /// What contacts see: invisible shows as offline.
    pub fn as_seen(self) -> Presence {
        if self == Presence::Invisible {
            Presence::Offline
        } else {
            self
        }
    }
}

impl std::str::FromStr for Presence {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "online" => Presence::Online,
            "away" => Presence::Away,
            "busy" => Presence::Busy,
            "invisible" => Presence::Invisible,
            "offline" => Presence::Offline,
            _ => {
                return Err(format!(
                    "unknown presence {s:?}: use online, away, busy or invisible"
                ))
            }
        })
    }
}

/// Relationship of a contact, as seen by the list's owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ContactState {
    /// The owner asked; the other side has not answered.
    Requested,
    /// The other side asked; the owner has not answered.
    Incoming,
    /// Both agreed: messages, presence and connections are allowed.
    Accepted,
    /// The owner blocked this user.
    Blocked,
    /// No relationship (used in events after a removal or a decline).
    None,
}

impl ContactState {
    /// Lowercase name as used by the CLI and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ContactState::Requested => "requested",
            ContactState::Incoming => "incoming",
            ContactState::Accepted => "accepted",
            ContactState::Blocked => "blocked",
            ContactState::None => "none",
        }
    }
}

/// Answer to an incoming contact request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContactAction {
    /// Become contacts.
    Accept,
    /// Refuse this request (the requester may ask again later).
    Decline,
    /// Refuse and never hear from this user again.
    Block,
}

/// One row of a contact list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactEntry {
    /// The contact.
    pub user: Username,
    /// The relationship.
    pub state: ContactState,
    /// Their presence as they show it to the owner (offline unless accepted).
    pub presence: Presence,
}

/// Why a request failed. Stable codes; the detail text is for humans.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request is malformed or not allowed in this state.
    BadRequest,
    /// The session has not proven a device certificate.
    NotAuthenticated,
    /// Registration: the username is taken.
    UsernameTaken,
    /// The username is not valid.
    InvalidUsername,
    /// Wrong username or password.
    WrongPassword,
    /// No such user.
    UnknownUser,
    /// The two users are not (accepted) contacts.
    NotContact,
    /// The user is not online.
    Offline,
    /// The other side declined.
    Declined,
    /// Too many requests: slow down.
    RateLimited,
    /// The recipient's offline mailbox is full; the message was not accepted.
    MailboxFull,
    /// A field is over its limit.
    TooLarge,
    /// The certificate is expired, revoked, or not for this key.
    BadCertificate,
    /// The server failed; try again.
    Internal,
    /// The server is overloaded or shutting down; try again later.
    Unavailable,
    /// The password is too weak.
    WeakPassword,
    /// The callee is in another call.
    Busy,
}

/// A call's signalling step, passed between the two parties through the supernode (and
/// over their direct session once there is one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CallSignal {
    /// Callee: answered; the caller opens the direct session.
    Accept,
    /// Callee: refused while ringing.
    Decline,
    /// Caller: gave up before an answer.
    Cancel,
    /// Either side: the call is over.
    HangUp,
}

/// A request. Every request gets exactly one [`Response`] with the same id; a repeated
/// id gets the same answer again (idempotency), so retransmission is always safe.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    /// Client to supernode, before authentication: create an account and enrol this
    /// session's Noise key as its first device. Answer: `Certificate`.
    Register {
        /// Wanted username.
        username: Username,
        /// Password (hashed with Argon2id by the authority; never stored).
        password: String,
        /// The device's Ed25519 verifying key.
        sign_key: [u8; 32],
    },
    /// Client to supernode, before authentication: enrol this session's key as a new
    /// device of an existing account. Answer: `Certificate`.
    Enroll {
        /// Account.
        username: Username,
        /// Its password.
        password: String,
        /// The device's Ed25519 verifying key.
        sign_key: [u8; 32],
    },
    /// Ask for a fresh certificate for this device. Answer: `Certificate`.
    RenewCert,
    /// Set the presence shown to contacts. Answer: `Ok`.
    SetPresence(Presence),
    /// Ask a user to become a contact. Answer: `Ok`.
    ContactAdd {
        /// Who.
        user: Username,
        /// A short note shown with the request.
        note: String,
    },
    /// Answer a contact request. Answer: `Ok`.
    ContactReply {
        /// Who asked.
        user: Username,
        /// Accept, decline or block.
        action: ContactAction,
    },
    /// Remove a contact (or cancel one's own request, or unblock). Answer: `Ok`.
    ContactRemove {
        /// Who.
        user: Username,
    },
    /// One page of the contact list. Answer: `Contacts`.
    ContactList {
        /// Entries to skip.
        offset: u32,
    },
    /// Users whose name starts with a prefix. Answer: `SearchResults`.
    Search {
        /// 1 to 32 username characters.
        prefix: String,
    },
    /// Ask to open a direct session to a contact, offering our candidates.
    /// Answer: `ConnectAccepted`, or `Error(Offline | NotContact | Declined ...)`.
    Connect {
        /// Who.
        user: Username,
        /// Our candidate addresses (the supernode adds the reflexive one it sees).
        candidates: Vec<SocketAddr>,
        /// Our NAT maps each destination to a new port (endpoint-dependent mapping): the
        /// peer should spray probes for the birthday technique.
        hard_nat: bool,
    },
    /// Store a message for a contact who is offline. Answer `Ok` only once the message is
    /// durably committed. `msg_id` makes the request idempotent across sessions.
    StoreMessage {
        /// Recipient.
        to: Username,
        /// Sender-chosen unique id.
        msg_id: u64,
        /// Sender's clock when written (unix ms).
        sent_at: u64,
        /// The text.
        text: String,
    },
    /// Supernode to client: a contact relationship changed. Answer: `Ok`.
    ContactEvent {
        /// The other user.
        user: Username,
        /// The new state as seen by the recipient.
        state: ContactState,
        /// Note of a contact request.
        note: String,
    },
    /// Supernode to client: a contact's presence changed. Answer: `Ok`.
    PresenceEvent {
        /// The contact.
        user: Username,
        /// Their presence as seen by the recipient.
        presence: Presence,
    },
    /// Supernode to client: a contact wants a direct session.
    /// Answer: `ConnectAnswer` or `Error(Declined)`.
    IncomingConnect {
        /// The caller.
        user: Username,
        /// The caller's device certificate (its Noise key will initiate).
        cert: Vec<u8>,
        /// The caller's candidates.
        candidates: Vec<SocketAddr>,
        /// The caller's NAT has endpoint-dependent mapping.
        hard_nat: bool,
        /// The two are not contacts: the session is for an answered call only (no
        /// messages).
        call_only: bool,
    },
    /// Supernode to client: a stored offline message. Answer `Ok` once the client has
    /// saved it; only then does the supernode delete it.
    Deliver {
        /// Store id.
        id: u64,
        /// Sender.
        from: Username,
        /// Sender's id for the message.
        msg_id: u64,
        /// Sender's clock (unix ms).
        sent_at: u64,
        /// The text.
        text: String,
    },
    /// Peer to peer: a chat message. Answer: `Ok` once saved.
    Chat {
        /// Sender-chosen unique id (deduplicated by the receiver).
        msg_id: u64,
        /// Sender's clock (unix ms).
        sent_at: u64,
        /// The text.
        text: String,
    },
    /// Client to supernode: credentials for the operator's TURN relay.
    /// Answer: `RelayCredentials`, or `Error(Unavailable)` when there is no relay.
    RelayCredentials,
    /// Client to supernode: ring a user. Answer `Ok` once the callee's device rings, or
    /// `Error(NotContact)` (the same whether the callee is online or not), `Offline`,
    /// `Busy`.
    CallInvite {
        /// Callee.
        user: Username,
        /// Caller-chosen id of the call.
        call_id: u64,
    },
    /// Supernode to client: a call is ringing. Answer `Ok` (ringing) or `Error(Busy)`.
    IncomingCall {
        /// Caller.
        user: Username,
        /// The caller's id of the call.
        call_id: u64,
    },
    /// A step of a call. Client to supernode: `user` is the other party, and the supernode
    /// forwards it as a push with `user` set to the sender. Peer to peer (over their
    /// session): `user` is the sender. Answer `Ok`, or `Error(Offline)`.
    CallSignal {
        /// The other party (to the supernode) or the sender (in a push).
        user: Username,
        /// The call.
        call_id: u64,
        /// What happened.
        signal: CallSignal,
    },
    /// Who may ring this user: contacts only (`false`, the default) or anyone. Answer `Ok`.
    SetCallPolicy {
        /// Anyone can call.
        anyone: bool,
    },
    /// Supernode to client: other supernodes of the fleet, least loaded first, for the
    /// client's host cache (where it logs in again if this supernode goes away). Answer `Ok`.
    Hosts {
        /// Their UDP addresses (every supernode of a fleet has the fleet's Noise key).
        hosts: Vec<SocketAddr>,
    },
    /// Supernode to client: this supernode is draining; log in at one of `hosts` now (it
    /// closes the session after the answer). Answer `Ok`.
    Redirect {
        /// Where to go, preferred first.
        hosts: Vec<SocketAddr>,
    },
}

/// The answer to a [`Request`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Done.
    Ok,
    /// Failed, with a stable code and a human-readable detail.
    Error {
        /// What kind of failure.
        code: ErrorCode,
        /// One line for humans.
        detail: String,
    },
    /// A device certificate (encoded as in [`crate::cert`]).
    Certificate(Vec<u8>),
    /// A page of the contact list.
    Contacts {
        /// Entries.
        entries: Vec<ContactEntry>,
        /// More entries follow at `offset + entries.len()`.
        more: bool,
    },
    /// Search results: usernames only, never addresses.
    SearchResults {
        /// Matching users, sorted.
        users: Vec<Username>,
    },
    /// Callee agreed: its certificate and candidates.
    ConnectAccepted {
        /// Callee's device certificate.
        cert: Vec<u8>,
        /// Callee's candidates.
        candidates: Vec<SocketAddr>,
        /// The callee's NAT has endpoint-dependent mapping.
        hard_nat: bool,
        /// The two are not contacts: the session is for an answered call only.
        call_only: bool,
    },
    /// Client to supernode: the callee's answer to `IncomingConnect`.
    ConnectAnswer {
        /// The callee's candidates.
        candidates: Vec<SocketAddr>,
        /// The callee's NAT has endpoint-dependent mapping.
        hard_nat: bool,
    },
    /// Time-limited TURN credentials (RFC 8656 long-term credential mechanism, in
    /// coturn's shared-secret style).
    RelayCredentials {
        /// The relay's address.
        server: SocketAddr,
        /// `<expiry unix s>:<username>`.
        username: String,
        /// base64(HMAC-SHA1(secret, username)).
        password: String,
    },
}

impl Response {
    /// Shorthand for an error response.
    pub fn error(code: ErrorCode, detail: impl Into<String>) -> Self {
        let mut detail: String = detail.into();
        truncate_utf8(&mut detail, MAX_DETAIL);
        Response::Error { code, detail }
    }
}

fn truncate_utf8(s: &mut String, max: usize) {
    if s.len() > max {
        let mut cut = max;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
}

/// One plaintext frame inside a transport packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Keeps NAT mappings and the session alive; never answered.
    Keepalive,
    /// A request with its id (unique per sender and session direction).
    Request {
        /// Request id.
        id: u64,
        /// The request.
        body: Request,
    },
    /// The response to the request with the same id.
    Response {
        /// Id of the request answered.
        id: u64,
        /// The response.
        body: Response,
    },
    /// The sender is closing this session.
    Close,
    /// An unreliable datagram inside the session (call media): never acknowledged or
    /// retransmitted; at most [`MAX_MEDIA`] bytes.
    Datagram(Vec<u8>),
}

/// Payload of the first handshake message (encrypted by Noise).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Protocol version the initiator speaks.
    pub version: u8,
    /// Initiator's clock (unix ms); the responder rejects stale or replayed hellos.
    pub unix_ms: u64,
    /// The initiator's device certificate; absent only for registration or enrolment.
    pub cert: Option<Vec<u8>>,
    /// Presence to show from the first moment (so an invisible user never flashes online).
    pub presence: Presence,
    /// Relay-only mode: this user's addresses are never given to peers.
    pub relay_only: bool,
}

/// Payload of the second handshake message (encrypted by Noise).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Welcome {
    /// Protocol version the responder speaks.
    pub version: u8,
    /// Responder's clock (unix ms), so a client can notice a skewed clock.
    pub unix_ms: u64,
    /// The responder's certificate (peer sessions); absent from a supernode.
    pub cert: Option<Vec<u8>>,
}

fn check_len(s: &str, limit: usize, what: &'static str) -> Result<(), Error> {
    if s.len() > limit {
        let _ = what;
        return Err(Error::TooLarge {
            len: s.len(),
            limit,
        });
    }
    Ok(())
}

pub(crate) fn check_count(n: usize, limit: usize) -> Result<(), Error> {
    if n > limit {
        return Err(Error::TooLarge { len: n, limit });
    }
    Ok(())
}

/// The name of each [`Request`] variant, by [`Request::kind`] (for metrics and logs).
pub const REQUEST_KINDS: [&str; 23] = [
    "register",
    "enroll",
    "renew_cert",
    "set_presence",
    "contact_add",
    "contact_reply",
    "contact_remove",
    "contact_list",
    "search",
    "connect",
    "store_message",
    "contact_event",
    "presence_event",
    "incoming_connect",
    "deliver",
    "chat",
    "relay_credentials",
    "call_invite",
    "incoming_call",
    "call_signal",
    "set_call_policy",
    "hosts",
    "redirect",
];

impl Request {
    /// The variant's index into [`REQUEST_KINDS`] (its wire index).
    pub fn kind(&self) -> usize {
        match self {
            Request::Register { .. } => 0,
            Request::Enroll { .. } => 1,
            Request::RenewCert => 2,
            Request::SetPresence(_) => 3,
            Request::ContactAdd { .. } => 4,
            Request::ContactReply { .. } => 5,
            Request::ContactRemove { .. } => 6,
            Request::ContactList { .. } => 7,
            Request::Search { .. } => 8,
            Request::Connect { .. } => 9,
            Request::StoreMessage { .. } => 10,
            Request::ContactEvent { .. } => 11,
            Request::PresenceEvent { .. } => 12,
            Request::IncomingConnect { .. } => 13,
            Request::Deliver { .. } => 14,
            Request::Chat { .. } => 15,
            Request::RelayCredentials => 16,
            Request::CallInvite { .. } => 17,
            Request::IncomingCall { .. } => 18,
            Request::CallSignal { .. } => 19,
            Request::SetCallPolicy { .. } => 20,
            Request::Hosts { .. } => 21,
            Request::Redirect { .. } => 22,
        }
    }

    /// Checks every field limit.
    pub fn validate(&self) -> Result<(), Error> {
        match self {
            Request::Register { password, .. } | Request::Enroll { password, .. } => {
                check_len(password, MAX_PASSWORD, "password")
            }
            Request::ContactAdd { note, .. } | Request::ContactEvent { note, .. } => {
                check_len(note, MAX_NOTE, "note")
            }
            Request::Search { prefix } => {
                crate::name::parse_prefix(prefix)
                    .map_err(|_| Error::Malformed("invalid search prefix"))?;
                Ok(())
            }
            Request::Connect { candidates, .. } => check_count(candidates.len(), MAX_CANDIDATES),
            Request::IncomingConnect {
                cert, candidates, ..
            } => {
                check_count(cert.len(), MAX_CERT)?;
                check_count(candidates.len(), MAX_CANDIDATES)
            }
            Request::StoreMessage { text, .. }
            | Request::Deliver { text, .. }
            | Request::Chat { text, .. } => check_len(text, MAX_TEXT, "text"),
            Request::Hosts { hosts } | Request::Redirect { hosts } => {
                check_count(hosts.len(), MAX_HOSTS)
            }
            Request::RenewCert
            | Request::SetPresence(_)
            | Request::ContactReply { .. }
            | Request::ContactRemove { .. }
            | Request::ContactList { .. }
            | Request::RelayCredentials
            | Request::CallInvite { .. }
            | Request::IncomingCall { .. }
            | Request::CallSignal { .. }
            | Request::SetCallPolicy { .. }
            | Request::PresenceEvent { .. } => Ok(()),
        }
    }
}

impl Response {
    /// Checks every field limit.
    pub fn validate(&self) -> Result<(), Error> {
        match self {
            Response::Ok => Ok(()),
            Response::Error { detail, .. } => check_len(detail, MAX_DETAIL, "detail"),
            Response::Certificate(c) => check_count(c.len(), MAX_CERT),
            Response::Contacts { entries, .. } => check_count(entries.len(), CONTACTS_PAGE),
            Response::SearchResults { users } => check_count(users.len(), MAX_SEARCH_RESULTS),
            Response::ConnectAccepted {
                cert, candidates, ..
            } => {
                check_count(cert.len(), MAX_CERT)?;
                check_count(candidates.len(), MAX_CANDIDATES)
            }
            Response::ConnectAnswer { candidates, .. } => {
                check_count(candidates.len(), MAX_CANDIDATES)
            }
            Response::RelayCredentials {
                username, password, ..
            } => {
                check_len(username, MAX_NOTE, "username")?;
                check_len(password, MAX_NOTE, "password")
            }
        }
    }
}

pub(crate) fn decode_exact<'a, T: Deserialize<'a>>(b: &'a [u8]) -> Result<T, Error> {
    if b.len() > MAX_TRANSPORT_PLAINTEXT {
        return Err(Error::TooLarge {
            len: b.len(),
            limit: MAX_TRANSPORT_PLAINTEXT,
        });
    }
    let (v, rest) = postcard::take_from_bytes::<T>(b).map_err(|e| match e {
        postcard::Error::DeserializeUnexpectedEnd => Error::Truncated {
            needed: b.len() + 1,
            got: b.len(),
        },
        _ => Error::Malformed("postcard"),
    })?;
    if !rest.is_empty() {
        return Err(Error::Trailing(rest.len()));
    }
    Ok(v)
}

pub(crate) fn encode_bounded<T: Serialize>(v: &T) -> Result<Vec<u8>, Error> {
    let out = postcard::to_allocvec(v).map_err(|_| Error::Malformed("unencodable"))?;
    if out.len() > MAX_TRANSPORT_PLAINTEXT {
        return Err(Error::TooLarge {
            len: out.len(),
            limit: MAX_TRANSPORT_PLAINTEXT,
        });
    }
    Ok(out)
}

impl Frame {
    /// Decodes and validates a frame. Total.
    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        let f: Frame = decode_exact(b)?;
        match &f {
            Frame::Request { body, .. } => body.validate()?,
            Frame::Response { body, .. } => body.validate()?,
            Frame::Datagram(d) => check_count(d.len(), MAX_MEDIA)?,
            Frame::Keepalive | Frame::Close => {}
        }
        Ok(f)
    }

    /// Encodes a frame; fails with `TooLarge` if it would not fit one datagram.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        match self {
            Frame::Request { body, .. } => body.validate()?,
            Frame::Response { body, .. } => body.validate()?,
            Frame::Datagram(d) => check_count(d.len(), MAX_MEDIA)?,
            Frame::Keepalive | Frame::Close => {}
        }
        encode_bounded(self)
    }
}

impl Hello {
    /// Decodes a hello payload. Total.
    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        let h: Hello = decode_exact(b)?;
        if h.cert.as_ref().is_some_and(|c| c.len() > MAX_CERT) {
            return Err(Error::Malformed("certificate too large"));
        }
        Ok(h)
    }
    /// Encodes a hello payload.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        encode_bounded(self)
    }
}

impl Welcome {
    /// Decodes a welcome payload. Total.
    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        let w: Welcome = decode_exact(b)?;
        if w.cert.as_ref().is_some_and(|c| c.len() > MAX_CERT) {
            return Err(Error::Malformed("certificate too large"));
        }
        Ok(w)
    }
    /// Encodes a welcome payload.
    pub fn encode(&self) -> Result<Vec<u8>, Error> {
        encode_bounded(self)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_full_media_datagram_fits_one_transport_packet_and_a_larger_one_is_refused() {
        let f = Frame::Datagram(vec![1; MAX_MEDIA]);
        let b = f.encode().expect("fits");
        assert!(b.len() <= MAX_TRANSPORT_PLAINTEXT);
        assert_eq!(Frame::decode(&b).unwrap(), f);
        assert!(Frame::Datagram(vec![1; MAX_MEDIA + 1]).encode().is_err());
    }

    use super::*;
    use proptest::prelude::*;

    fn user(s: &str) -> Username {
        Username::parse(s).unwrap()
    }

    fn samples() -> Vec<Frame> {
        let addr: SocketAddr = "127.0.0.1:4000".parse().unwrap();
        let v6: SocketAddr = "[::1]:5".parse().unwrap();
        let reqs = vec![
            Request::Register {
                username: user("alice"),
                password: "hunter22".into(),
                sign_key: [1; 32],
            },
            Request::Enroll {
                username: user("alice"),
                password: "hunter22".into(),
                sign_key: [1; 32],
            },
            Request::RenewCert,
            Request::SetPresence(Presence::Busy),
            Request::ContactAdd {
                user: user("bob"),
                note: "hi".into(),
            },
            Request::ContactReply {
                user: user("bob"),
                action: ContactAction::Block,
            },
            Request::ContactRemove { user: user("bob") },
            Request::ContactList { offset: 25 },
            Request::Search {
                prefix: "bo".into(),
            },
            Request::Connect {
                user: user("bob"),
                candidates: vec![addr, v6],
                hard_nat: true,
            },
            Request::StoreMessage {
                to: user("bob"),
                msg_id: 7,
                sent_at: 9,
                text: "later".into(),
            },
            Request::ContactEvent {
                user: user("bob"),
                state: ContactState::Incoming,
                note: "x".into(),
            },
            Request::PresenceEvent {
                user: user("bob"),
                presence: Presence::Away,
            },
            Request::IncomingConnect {
                user: user("bob"),
                cert: vec![1, 2, 3],
                candidates: vec![addr],
                hard_nat: false,
                call_only: true,
            },
            Request::Deliver {
                id: 1,
                from: user("bob"),
                msg_id: 3,
                sent_at: 4,
                text: "t".into(),
            },
            Request::Chat {
                msg_id: 1,
                sent_at: 2,
                text: "hello ✓".into(),
            },
            Request::RelayCredentials,
            Request::CallInvite {
                user: user("bob"),
                call_id: 77,
            },
            Request::IncomingCall {
                user: user("alice"),
                call_id: 77,
            },
            Request::CallSignal {
                user: user("bob"),
                call_id: 77,
                signal: CallSignal::HangUp,
            },
            Request::SetCallPolicy { anyone: true },
        ];
        let resps = vec![
            Response::Ok,
            Response::error(ErrorCode::NotContact, "bob is not your contact"),
            Response::Certificate(vec![9; 100]),
            Response::Contacts {
                entries: vec![ContactEntry {
                    user: user("bob"),
                    state: ContactState::Accepted,
                    presence: Presence::Online,
                }],
                more: false,
            },
            Response::SearchResults {
                users: vec![user("bob"), user("bobby")],
            },
            Response::ConnectAccepted {
                cert: vec![1; 10],
                candidates: vec![addr],
                hard_nat: true,
                call_only: false,
            },
            Response::ConnectAnswer {
                candidates: vec![v6],
                hard_nat: false,
            },
            Response::RelayCredentials {
                server: addr,
                username: "1790000000:alice".into(),
                password: "c2VjcmV0".into(),
            },
        ];
        let mut out = vec![
            Frame::Keepalive,
            Frame::Close,
            Frame::Datagram(vec![0x5a; MAX_MEDIA]),
            Frame::Datagram(Vec::new()),
        ];
        out.extend(
            reqs.into_iter()
                .enumerate()
                .map(|(i, body)| Frame::Request { id: i as u64, body }),
        );
        out.extend(
            resps
                .into_iter()
                .enumerate()
                .map(|(i, body)| Frame::Response {
                    id: i as u64 + 1000,
                    body,
                }),
        );
        out
    }

    /// `kind` is the variant's wire index, for every variant (the samples, with the two
    /// fleet host lists, cover all of them).
    #[test]
    fn kind_is_the_wire_variant_index_of_every_request() {
        let mut reqs: Vec<Request> = samples()
            .into_iter()
            .filter_map(|f| match f {
                Frame::Request { body, .. } => Some(body),
                _ => None,
            })
            .collect();
        reqs.push(Request::Hosts { hosts: Vec::new() });
        reqs.push(Request::Redirect { hosts: Vec::new() });
        let mut seen = vec![false; REQUEST_KINDS.len()];
        for r in &reqs {
            let b = postcard::to_allocvec(r).unwrap();
            assert_eq!(usize::from(b[0]), r.kind(), "{}", REQUEST_KINDS[r.kind()]);
            seen[r.kind()] = true;
        }
        let missing: Vec<_> = (0..seen.len())
            .filter(|&k| !seen[k])
            .map(|k| REQUEST_KINDS[k])
            .collect();
        assert!(missing.is_empty(), "no sample of {missing:?}");
    }

    #[test]
    fn every_message_roundtrips_and_every_truncation_fails() {
        for f in samples() {
            let b = f.encode().unwrap();
            assert_eq!(Frame::decode(&b).unwrap(), f);
            for cut in 0..b.len() {
                assert!(Frame::decode(&b[..cut]).is_err(), "{f:?} cut at {cut}");
            }
            let mut longer = b.clone();
            longer.push(0);
            assert_eq!(Frame::decode(&longer), Err(Error::Trailing(1)));
        }
    }

    #[test]
    fn oversized_fields_are_refused_both_ways() {
        let f = Frame::Request {
            id: 1,
            body: Request::Chat {
                msg_id: 1,
                sent_at: 1,
                text: "x".repeat(MAX_TEXT + 1),
            },
        };
        assert!(matches!(f.encode(), Err(Error::TooLarge { .. })));
        let raw = postcard::to_allocvec(&f).unwrap();
        assert!(matches!(Frame::decode(&raw), Err(Error::TooLarge { .. })));
        let ok = Frame::Request {
            id: u64::MAX,
            body: Request::Chat {
                msg_id: u64::MAX,
                sent_at: u64::MAX,
                text: "é".repeat(MAX_TEXT / 2),
            },
        };
        assert!(ok.encode().unwrap().len() <= MAX_TRANSPORT_PLAINTEXT);
    }

    #[test]
    fn invalid_username_on_the_wire_is_refused() {
        // Variant 6 = ContactRemove, username "A!" (bad char).
        let raw = [1u8, 5, 6, 2, b'a', b'!'];
        assert!(Frame::decode(&raw).is_err());
    }

    #[test]
    fn handshake_payloads_roundtrip() {
        let h = Hello {
            version: 1,
            unix_ms: 5,
            cert: Some(vec![1; 50]),
            presence: Presence::Invisible,
            relay_only: true,
        };
        assert_eq!(Hello::decode(&h.encode().unwrap()).unwrap(), h);
        let w = Welcome {
            version: 1,
            unix_ms: 5,
            cert: None,
        };
        assert_eq!(Welcome::decode(&w.encode().unwrap()).unwrap(), w);
    }

    proptest! {
        #[test]
        fn frame_decode_is_total(b in proptest::collection::vec(any::<u8>(), 0..1300)) {
            if let Ok(f) = Frame::decode(&b) {
                // Whatever decodes is within limits and re-encodes.
                prop_assert!(f.encode().is_ok());
            }
        }

        #[test]
        fn mutated_samples_never_panic(i in 0usize..25, flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..4)) {
            let s = samples();
            let mut b = s[i % s.len()].encode().unwrap();
            for (at, x) in flips { let n = b.len(); b[at % n] ^= x; }
            let _ = Frame::decode(&b);
        }

        #[test]
        fn hello_decode_is_total(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Hello::decode(&b);
            let _ = Welcome::decode(&b);
        }
    }
}
