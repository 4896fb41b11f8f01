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

/// The pre-shared key of the node-to-node channel of a fleet, derived from the authority's
/// signing key that every supernode of the fleet holds: whoever can issue certificates is
/// a member, nobody else.
pub fn fleet_psk(authority_secret: &[u8; 32]) -> [u8; 32] {
    use blake2::digest::Mac;
    type Mac32 = blake2::Blake2sMac<blake2::digest::consts::U32>;
    // A 32-byte key is within BLAKE2s's limit, so this cannot fail.
    let Ok(mut m) = <Mac32 as blake2::digest::KeyInit>::new_from_slice(authority_secret) else {
        return [0; 32];
    };
    m.update(b"peerline fleet channel psk v1");
    m.finalize().into_bytes().into()
}

#[cfg(test)]
mod fleet_psk_tests {
    #[test]
    fn the_psk_depends_on_the_authority_key_only() {
        let a = super::fleet_psk(&[1; 32]);
        assert_eq!(a, super::fleet_psk(&[1; 32]));
        assert_ne!(a, super::fleet_psk(&[2; 32]));
        assert_ne!(a, [1; 32]);
    }
}
