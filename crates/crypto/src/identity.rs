//! A device's long-term keys: X25519 for Noise, Ed25519 for signatures.

use ed25519_dalek::SigningKey;
use rand_core::{CryptoRng, RngCore};
use x25519_dalek::{PublicKey, StaticSecret};

/// Length of [`DeviceKeys::to_bytes`].
pub const DEVICE_KEYS_LEN: usize = 64;

/// The private keys of one device.
#[derive(Clone)]
pub struct DeviceKeys {
    noise: StaticSecret,
    sign: SigningKey,
}

impl DeviceKeys {
    /// Generates fresh keys from the caller's RNG.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        let noise = StaticSecret::random_from_rng(&mut *rng);
        let sign = SigningKey::generate(rng);
        DeviceKeys { noise, sign }
    }

    /// Serialises both private keys (keep this secret: mode 0600).
    pub fn to_bytes(&self) -> [u8; DEVICE_KEYS_LEN] {
        let mut out = [0u8; DEVICE_KEYS_LEN];
        out[..32].copy_from_slice(&self.noise.to_bytes());
        out[32..].copy_from_slice(&self.sign.to_bytes());
        out
    }

    /// Restores keys written by [`DeviceKeys::to_bytes`].
    pub fn from_bytes(b: &[u8; DEVICE_KEYS_LEN]) -> Self {
        let mut n = [0u8; 32];
        n.copy_from_slice(&b[..32]);
        let mut s = [0u8; 32];
        s.copy_from_slice(&b[32..]);
        DeviceKeys {
            noise: StaticSecret::from(n),
            sign: SigningKey::from_bytes(&s),
        }
    }

    /// X25519 private key bytes, as the Noise handshake needs them.
    pub fn noise_private(&self) -> [u8; 32] {
        self.noise.to_bytes()
    }

    /// X25519 public key.
    pub fn noise_public(&self) -> [u8; 32] {
        PublicKey::from(&self.noise).to_bytes()
    }

    /// Ed25519 verifying key.
    pub fn sign_public(&self) -> [u8; 32] {
        self.sign.verifying_key().to_bytes()
    }

    /// The Ed25519 signing key.
    pub fn signing_key(&self) -> &SigningKey {
        &self.sign
    }
}

impl std::fmt::Debug for DeviceKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DeviceKeys(noise={})",
            crate::cert::short_hex(&self.noise_public())
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::SeedableRng;

    #[test]
    fn bytes_roundtrip_and_deterministic_generation() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let k = DeviceKeys::generate(&mut rng);
        let back = DeviceKeys::from_bytes(&k.to_bytes());
        assert_eq!(back.noise_public(), k.noise_public());
        assert_eq!(back.sign_public(), k.sign_public());
        let mut rng2 = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        assert_eq!(
            DeviceKeys::generate(&mut rng2).noise_public(),
            k.noise_public()
        );
    }
}
