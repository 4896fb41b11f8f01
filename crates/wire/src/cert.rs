//! Byte layout of a device certificate (signing and verification live in the crypto crate).
//!
//! ```text
//! version(1)=1  name_len(1)  username(name_len)  device_id(16)  noise_key(32)  sign_key(32)
//! not_before(8 LE, unix s)  not_after(8 LE, unix s)  serial(8 LE)  signature(64)
//! ```
//! The signature is Ed25519 by the authority over every byte before it, prefixed with the
//! context string [`SIGNING_CONTEXT`].

use crate::{Error, Username};

/// Certificate format version.
pub const CERT_VERSION: u8 = 1;
/// Domain separation prefix for the authority's signature.
pub const SIGNING_CONTEXT: &[u8] = b"peerline device certificate v1\0";
/// Length of a signature.
pub const SIG_LEN: usize = 64;
const FIXED: usize = 2 + 16 + 32 + 32 + 8 + 8 + 8 + SIG_LEN;
/// Largest encoded certificate.
pub const MAX_CERT_LEN: usize = FIXED + crate::name::MAX_LEN;

/// A device certificate as it travels (signature not yet checked).
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct CertRepr {
    /// Account the device belongs to.
    pub username: Username,
    /// Random device identifier.
    pub device_id: [u8; 16],
    /// The device's X25519 static key (Noise).
    pub noise_key: [u8; 32],
    /// The device's Ed25519 verifying key.
    pub sign_key: [u8; 32],
    /// Valid from (unix seconds).
    pub not_before: u64,
    /// Valid until (unix seconds).
    pub not_after: u64,
    /// Serial number, unique per authority; revocation names serials.
    pub serial: u64,
    /// Authority signature over [`CertRepr::signed_bytes`].
    pub signature: [u8; SIG_LEN],
}

impl CertRepr {
    /// The bytes the authority signs: context string then every field before the signature.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut out = SIGNING_CONTEXT.to_vec();
        self.encode_body(&mut out);
        out
    }

    fn encode_body(&self, out: &mut Vec<u8>) {
        let name = self.username.as_str().as_bytes();
        out.push(CERT_VERSION);
        // Username length is at most 32, checked by `Username`.
        out.push(name.len() as u8);
        out.extend_from_slice(name);
        out.extend_from_slice(&self.device_id);
        out.extend_from_slice(&self.noise_key);
        out.extend_from_slice(&self.sign_key);
        out.extend_from_slice(&self.not_before.to_le_bytes());
        out.extend_from_slice(&self.not_after.to_le_bytes());
        out.extend_from_slice(&self.serial.to_le_bytes());
    }

    /// Encodes the certificate.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(MAX_CERT_LEN);
        self.encode_body(&mut out);
        out.extend_from_slice(&self.signature);
        out
    }

    /// Decodes a certificate. Total; checks exact length and the username's validity.
    pub fn decode(b: &[u8]) -> Result<Self, Error> {
        if b.len() < 2 {
            return Err(Error::Truncated {
                needed: 2,
                got: b.len(),
            });
        }
        if b[0] != CERT_VERSION {
            return Err(Error::Version(b[0]));
        }
        let n = b[1] as usize;
        let total = FIXED + n;
        if b.len() < total {
            return Err(Error::Truncated {
                needed: total,
                got: b.len(),
            });
        }
        if b.len() > total {
            return Err(Error::Trailing(b.len() - total));
        }
        let name = std::str::from_utf8(&b[2..2 + n])
            .map_err(|_| Error::Malformed("username not UTF-8"))?;
        let username = Username::parse(name).map_err(|_| Error::Malformed("invalid username"))?;
        if username.as_str() != name {
            return Err(Error::Malformed("username not canonical"));
        }
        let mut at = 2 + n;
        let mut take = |len: usize| {
            let s = &b[at..at + len];
            at += len;
            s
        };
        let arr32 = |s: &[u8]| {
            let mut a = [0u8; 32];
            a.copy_from_slice(s);
            a
        };
        let u64le = |s: &[u8]| {
            let mut a = [0u8; 8];
            a.copy_from_slice(s);
            u64::from_le_bytes(a)
        };
        let mut device_id = [0u8; 16];
        device_id.copy_from_slice(take(16));
        let noise_key = arr32(take(32));
        let sign_key = arr32(take(32));
        let not_before = u64le(take(8));
        let not_after = u64le(take(8));
        let serial = u64le(take(8));
        let mut signature = [0u8; SIG_LEN];
        signature.copy_from_slice(take(SIG_LEN));
        Ok(CertRepr {
            username,
            device_id,
            noise_key,
            sign_key,
            not_before,
            not_after,
            serial,
            signature,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> CertRepr {
        CertRepr {
            username: Username::parse("alice").unwrap(),
            device_id: [1; 16],
            noise_key: [2; 32],
            sign_key: [3; 32],
            not_before: 10,
            not_after: 20,
            serial: 30,
            signature: [4; 64],
        }
    }

    #[test]
    fn roundtrip_and_truncation() {
        let c = sample();
        let b = c.encode();
        assert_eq!(CertRepr::decode(&b).unwrap(), c);
        for cut in 0..b.len() {
            assert!(CertRepr::decode(&b[..cut]).is_err());
        }
        let mut longer = b.clone();
        longer.push(0);
        assert_eq!(CertRepr::decode(&longer), Err(Error::Trailing(1)));
    }

    #[test]
    fn rejects_non_canonical_username() {
        let mut b = sample().encode();
        b[2] = b'A';
        assert!(CertRepr::decode(&b).is_err());
    }

    proptest! {
        #[test]
        fn decode_is_total(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(c) = CertRepr::decode(&b) {
                prop_assert_eq!(c.encode(), b);
            }
        }

        /// Certificates are kept decoded and re-encoded when sent: whatever decodes must
        /// re-encode to the same bytes (the signature covers them), including names that
        /// are almost canonical.
        #[test]
        fn what_decodes_reencodes_identically(
            name in "[a-zA-Z0-9._-]{0,34}",
            rest in proptest::collection::vec(any::<u8>(), FIXED - 2..FIXED - 2 + 1),
        ) {
            let mut b = vec![CERT_VERSION, name.len() as u8];
            b.extend_from_slice(name.as_bytes());
            b.extend_from_slice(&rest);
            if let Ok(c) = CertRepr::decode(&b) {
                prop_assert_eq!(c.encode(), b);
            }
        }
    }
}
