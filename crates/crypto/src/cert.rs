//! Authority-signed device certificates.
//!
//! A certificate binds a username, a device id, the device's Noise and signing keys, a
//! validity window and a serial. The authority signs it with Ed25519; supernodes and peers
//! verify it offline against the authority's public key from the bootstrap entry.

use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};
use peerline_wire::cert::CertRepr;
use peerline_wire::Username;
use rand_core::{CryptoRng, RngCore};

/// Why a certificate was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CertError {
    /// The bytes are not a certificate.
    #[error("malformed certificate: {0}")]
    Malformed(#[from] peerline_wire::Error),
    /// The authority did not sign it.
    #[error("certificate signature is not the authority's")]
    BadSignature,
    /// Outside its validity window.
    #[error("certificate expired or not yet valid (valid {not_before}..{not_after}, now {now})")]
    Expired {
        /// Start of validity.
        not_before: u64,
        /// End of validity.
        not_after: u64,
        /// The time checked.
        now: u64,
    },
    /// It does not certify the key that was presented.
    #[error("certificate is for a different key")]
    WrongKey,
}

/// A certificate whose signature has been checked against an authority key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Certificate {
    // Only the decoded form is kept: the encoding is canonical (exact length, canonical
    // username), so the signed bytes are re-encoded on the rare occasions they are sent,
    // and a supernode holding a million certificates saves their second copy.
    repr: CertRepr,
}

/// Leeway for clock skew between devices when checking validity windows.
pub const CLOCK_SKEW_S: u64 = 300;

impl Certificate {
    /// Decodes and checks the signature (not the validity window: see [`Certificate::check_time`]).
    pub fn verify(bytes: &[u8], authority: &[u8; 32]) -> Result<Self, CertError> {
        let repr = CertRepr::decode(bytes)?;
        let key = VerifyingKey::from_bytes(authority).map_err(|_| CertError::BadSignature)?;
        let sig = Signature::from_bytes(&repr.signature);
        key.verify(&repr.signed_bytes(), &sig)
            .map_err(|_| CertError::BadSignature)?;
        Ok(Certificate { repr })
    }

    /// Checks the validity window at `now` (unix seconds), allowing [`CLOCK_SKEW_S`].
    pub fn check_time(&self, now: u64) -> Result<(), CertError> {
        let r = &self.repr;
        if now + CLOCK_SKEW_S < r.not_before || now > r.not_after.saturating_add(CLOCK_SKEW_S) {
            return Err(CertError::Expired {
                not_before: r.not_before,
                not_after: r.not_after,
                now,
            });
        }
        Ok(())
    }

    /// Full check for a handshake: signature (done), time, and that it names `noise_key`.
    pub fn check_for(&self, noise_key: &[u8], now: u64) -> Result<(), CertError> {
        self.check_time(now)?;
        if self.repr.noise_key[..] != *noise_key {
            return Err(CertError::WrongKey);
        }
        Ok(())
    }

    /// The decoded fields.
    pub fn repr(&self) -> &CertRepr {
        &self.repr
    }

    /// The account.
    pub fn username(&self) -> &Username {
        &self.repr.username
    }

    /// Encoded form (as signed): byte for byte what was verified or issued.
    pub fn to_bytes(&self) -> Vec<u8> {
        self.repr.encode()
    }

    /// Seconds left until expiry at `now` (0 once expired).
    pub fn remaining(&self, now: u64) -> u64 {
        self.repr.not_after.saturating_sub(now)
    }

    /// Total validity in seconds.
    pub fn lifetime(&self) -> u64 {
        self.repr.not_after.saturating_sub(self.repr.not_before)
    }

    /// A short fingerprint of the certified Noise key, for humans to compare.
    pub fn safety_number(&self) -> String {
        short_hex(&self.repr.noise_key)
    }
}

/// First 8 bytes of a key as hex groups, for logs and safety numbers.
pub fn short_hex(b: &[u8]) -> String {
    b.iter()
        .take(8)
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .chunks(2)
        .map(|c| c.concat())
        .collect::<Vec<_>>()
        .join(" ")
}

/// The authority's signing key.
pub struct Authority {
    key: SigningKey,
}

/// What the authority certifies.
#[derive(Debug, Clone)]
pub struct CertRequest {
    /// Account.
    pub username: Username,
    /// Device id.
    pub device_id: [u8; 16],
    /// Device X25519 key.
    pub noise_key: [u8; 32],
    /// Device Ed25519 key.
    pub sign_key: [u8; 32],
}

impl Authority {
    /// A new random authority key.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        Authority {
            key: SigningKey::generate(rng),
        }
    }

    /// Restores an authority key.
    pub fn from_bytes(b: &[u8; 32]) -> Self {
        Authority {
            key: SigningKey::from_bytes(b),
        }
    }

    /// Secret key bytes (keep 0600).
    pub fn to_bytes(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    /// The public key every verifier needs.
    pub fn public(&self) -> [u8; 32] {
        self.key.verifying_key().to_bytes()
    }

    /// Signs a certificate valid from `now` (minus skew) for `lifetime_s` seconds.
    pub fn issue(&self, req: &CertRequest, serial: u64, now: u64, lifetime_s: u64) -> Certificate {
        let mut repr = CertRepr {
            username: req.username.clone(),
            device_id: req.device_id,
            noise_key: req.noise_key,
            sign_key: req.sign_key,
            not_before: now.saturating_sub(60),
            not_after: now.saturating_add(lifetime_s),
            serial,
            signature: [0; 64],
        };
        repr.signature = self.key.sign(&repr.signed_bytes()).to_bytes();
        Certificate { repr }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::rand_core::SeedableRng;

    fn setup() -> (Authority, CertRequest) {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(7);
        let auth = Authority::generate(&mut rng);
        let req = CertRequest {
            username: Username::parse("alice").unwrap(),
            device_id: [1; 16],
            noise_key: [2; 32],
            sign_key: [3; 32],
        };
        (auth, req)
    }

    #[test]
    fn issued_certificate_verifies_and_expires() {
        let (auth, req) = setup();
        let c = auth.issue(&req, 1, 1_000_000, 3600);
        let v = Certificate::verify(&c.to_bytes(), &auth.public()).unwrap();
        assert!(v.check_for(&[2; 32], 1_000_000).is_ok());
        assert_eq!(v.check_for(&[9; 32], 1_000_000), Err(CertError::WrongKey));
        assert!(matches!(
            v.check_time(1_000_000 + 3600 + CLOCK_SKEW_S + 1),
            Err(CertError::Expired { .. })
        ));
    }

    #[test]
    fn tampering_or_another_authority_is_refused() {
        let (auth, req) = setup();
        let c = auth.issue(&req, 1, 1_000_000, 3600);
        let mut b = c.to_bytes();
        let last = b.len() - 70;
        b[last] ^= 1; // inside not_after
        assert_eq!(
            Certificate::verify(&b, &auth.public()),
            Err(CertError::BadSignature)
        );
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(8);
        let other = Authority::generate(&mut rng);
        assert_eq!(
            Certificate::verify(&c.to_bytes(), &other.public()),
            Err(CertError::BadSignature)
        );
    }
}
