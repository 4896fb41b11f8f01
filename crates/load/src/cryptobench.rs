//! The login's own crypto cost, measured in the same run as the load: what the supernode
//! must do for every certificate login (Noise IK responder, both messages, and the
//! certificate's signature check), with the same public functions it uses. Its inverse is
//! the bound on logins per core-second that no supernode on this box can beat.

use std::time::Instant;

use peerline_crypto::noise::{Handshake, Responder};
use peerline_crypto::Certificate;
use peerline_wire::msg::{Hello, Presence, Welcome};
use peerline_wire::PROTOCOL_VERSION;

use crate::users::Users;

/// Result of the micro-benchmark.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CryptoCost {
    /// Logins measured.
    pub iterations: usize,
    /// Median microseconds of a supernode's crypto per login (responder + certificate).
    pub login_us: f64,
    /// Median microseconds of reading message 1 (two DH, decrypt).
    pub responder_read_us: f64,
    /// Median microseconds of writing message 2 (ephemeral key, two DH, encrypt).
    pub responder_accept_us: f64,
    /// Median microseconds of the certificate check (decode and Ed25519 verify).
    pub cert_verify_us: f64,
    /// Median microseconds of the client's side (message 1 and reading message 2).
    pub initiator_us: f64,
    /// The bound: logins per core-second (1e6 / `login_us`).
    pub bound_per_core_second: f64,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Times `iterations` logins of the first users of `users` against `node_private`.
pub fn measure(users: &Users, node_private: &[u8; 32], iterations: usize) -> CryptoCost {
    let node_public = x25519_public(node_private);
    let authority = users.authority();
    let (mut read, mut accept, mut verify, mut total, mut init) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..iterations {
        let u = i % users.len().max(1);
        let hello = Hello {
            version: PROTOCOL_VERSION,
            unix_ms: 1,
            cert: Some(users.cert(u).to_vec()),
            presence: Presence::Online,
            relay_only: false,
        };
        let Ok(payload) = hello.encode() else {
            continue;
        };
        let mut seed = [0u8; 32];
        seed[..8].copy_from_slice(&(i as u64).to_le_bytes());
        let t = Instant::now();
        let Ok((hs, msg1)) =
            Handshake::initiate(&users.noise_private(u), &node_public, seed, &payload)
        else {
            continue;
        };
        let init1 = t.elapsed();

        let t0 = Instant::now();
        let Ok(r) = Responder::read(node_private, seed, &msg1) else {
            continue;
        };
        let t1 = Instant::now();
        let Ok(h) = Hello::decode(&r.payload) else {
            continue;
        };
        let ok = h
            .cert
            .as_deref()
            .and_then(|c| Certificate::verify(c, &authority).ok())
            .is_some_and(|c| c.check_for(&r.remote_static, now_s()).is_ok());
        let t2 = Instant::now();
        let welcome = Welcome {
            version: PROTOCOL_VERSION,
            unix_ms: 1,
            cert: None,
        };
        let Ok(wp) = welcome.encode() else { continue };
        let Ok((_transport, msg2)) = r.accept(&wp) else {
            continue;
        };
        let t3 = Instant::now();
        let t4 = Instant::now();
        if hs.finish(&msg2).is_err() || !ok {
            continue;
        }
        let init2 = t4.elapsed();
        read.push((t1 - t0).as_secs_f64() * 1e6);
        verify.push((t2 - t1).as_secs_f64() * 1e6);
        accept.push((t3 - t2).as_secs_f64() * 1e6);
        total.push((t3 - t0).as_secs_f64() * 1e6);
        init.push((init1 + init2).as_secs_f64() * 1e6);
    }
    let login_us = median(&mut total);
    CryptoCost {
        iterations: total.len(),
        login_us,
        responder_read_us: median(&mut read),
        responder_accept_us: median(&mut accept),
        cert_verify_us: median(&mut verify),
        initiator_us: median(&mut init),
        bound_per_core_second: if login_us > 0.0 { 1e6 / login_us } else { 0.0 },
    }
}

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The X25519 public key of a private key, through the crypto crate's own key type.
fn x25519_public(private: &[u8; 32]) -> [u8; 32] {
    let mut b = [0u8; 64];
    b[..32].copy_from_slice(private);
    peerline_crypto::DeviceKeys::from_bytes(&b).noise_public()
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerline_crypto::Authority;
    use rand_chacha::rand_core::SeedableRng;

    #[test]
    fn every_measured_login_completes_and_costs_something() {
        let auth = Authority::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(1));
        let users = Users::issue(&auth, 3, 1, now_s(), 1);
        let c = measure(&users, &[7; 32], 20);
        assert_eq!(c.iterations, 20);
        assert!(c.login_us > 0.0 && c.login_us >= c.cert_verify_us);
        assert!(c.bound_per_core_second > 0.0);
    }
}
