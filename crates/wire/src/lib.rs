//! Peerline wire format, version 1.
//!
//! Two layers, both documented byte by byte in `docs/protocol.md`:
//!
//! * [`packet`]: the outer datagram framing (handshake packets, transport packets carrying
//!   a receiver index and an explicit nonce, reset hints, and STUN demultiplexing).
//! * [`msg`]: the plaintext [`msg::Frame`]s carried inside encrypted transport packets:
//!   keepalives, requests and responses of the control and data planes.
//!
//! Every decoder is total: any byte string yields a value or a typed [`Error`], never a
//! panic, and never allocates more than the input's length justifies. This crate has no
//! crypto and no IO.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod cert;
pub mod msg;
pub mod name;
pub mod node;
pub mod packet;
pub mod stream;

pub use name::{NameError, Username};

/// Largest datagram Peerline sends or accepts (fits the IPv6 minimum MTU with headroom).
pub const MAX_DATAGRAM: usize = 1200;

/// Wire protocol version carried in every Peerline packet header.
pub const PROTOCOL_VERSION: u8 = 1;

/// Why a byte string did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The input ended before the structure was complete.
    #[error("truncated: needed {needed} bytes, got {got}")]
    Truncated {
        /// Bytes the structure needs at least.
        needed: usize,
        /// Bytes that were there.
        got: usize,
    },
    /// The input is longer than [`MAX_DATAGRAM`] or a field's limit.
    #[error("too large: {len} bytes, limit {limit}")]
    TooLarge {
        /// Length seen.
        len: usize,
        /// Limit that applies.
        limit: usize,
    },
    /// The first byte names no known packet type.
    #[error("unknown packet type 0x{0:02x}")]
    UnknownType(u8),
    /// The packet was made by a different protocol version.
    #[error("unsupported protocol version {0} (this build speaks {PROTOCOL_VERSION})")]
    Version(u8),
    /// Reserved bits were not zero.
    #[error("reserved field not zero")]
    Reserved,
    /// The body did not decode as the expected message.
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    /// Trailing bytes followed a complete message.
    #[error("{0} trailing bytes after message")]
    Trailing(usize),
}
