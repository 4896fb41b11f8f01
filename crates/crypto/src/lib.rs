//! Peerline cryptography: device identities, authority certificates, Noise IK sessions
//! over datagrams, and replay windows.
//!
//! No IO, no clock, no global randomness: key generation and handshakes take their
//! randomness from the caller (a seed or an `RngCore`), and certificate checks take `now`.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod cert;
pub mod cookie;
pub mod identity;
pub mod noise;
pub mod replay;

pub use cert::{Authority, CertError, Certificate};
pub use identity::DeviceKeys;
pub use noise::{Handshake, NoiseError, Transport};
pub use replay::ReplayWindow;
