//! The supernode's request handlers behind a real, logged-in session: every chunk of the
//! input is sealed as a frame on that session (or sent raw, or from another address), so
//! the fuzzer reaches the handlers past Noise, with time advancing and storage operations
//! executed. It must never panic.
//!
//! Input format: repeated `[len u16 LE][kind u8][delay u8][len bytes]`; kind % 4: 0 sealed
//! frame, 1 raw datagram from the client's address, 2 raw datagram from a stranger, 3 sealed
//! frame from a new address (NAT rebinding).
#![no_main]
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use peerline_core::clock::WallClock;
use peerline_core::directory::MemoryDirectory;
use peerline_core::memstore::MemoryStore;
use peerline_core::ops::execute;
use peerline_core::store::{Account, Device, Store};
use peerline_core::supernode::{Supernode, SupernodeConfig};
use peerline_crypto::cert::CertRequest;
use peerline_crypto::cookie::{encode_init, MacKeys};
use peerline_crypto::noise::Handshake;
use peerline_crypto::{Authority, DeviceKeys};
use peerline_wire::msg::{Hello, Presence};
use peerline_wire::packet::Packet;
use peerline_wire::{Username, PROTOCOL_VERSION};
use rand_core::SeedableRng;

const UNIX_MS: u64 = 1_790_000_000_000;

fuzz_target!(|data: &[u8]| {
    let t0 = Instant::now();
    let mut now = t0;
    let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
    let authority = Authority::from_bytes(&[3; 32]);
    let sn_keys = DeviceKeys::from_bytes(&[9; 64]);
    let me = DeviceKeys::from_bytes(&[2; 64]);
    let mut store = MemoryStore::new();
    let Ok(alice) = Username::parse("alice") else {
        return;
    };
    let Ok(bob) = Username::parse("bob") else {
        return;
    };
    for (u, k) in [(&alice, [2u8; 32]), (&bob, [7u8; 32])] {
        let _ = store.create_account(
            &Account {
                username: u.clone(),
                password_hash: "x".into(),
                created_at: 0,
            },
            &Device {
                username: u.clone(),
                device_id: k[..16].try_into().unwrap_or([0; 16]),
                noise_key: k,
                sign_key: k,
                revoked: false,
            },
        );
    }
    let cert = authority.issue(
        &CertRequest {
            username: alice.clone(),
            device_id: [1; 16],
            noise_key: me.noise_public(),
            sign_key: me.sign_public(),
        },
        1,
        UNIX_MS / 1000,
        86_400,
    );
    let mut sn = Supernode::new(
        SupernodeConfig::default(),
        sn_keys.noise_private(),
        Authority::from_bytes(&[3; 32]),
        [5; 32],
        Box::new(MemoryDirectory::new()),
        WallClock::new(t0, UNIX_MS),
        t0,
    );
    let client: SocketAddr = ([198, 51, 100, 1], 4000).into();
    let hello = Hello {
        version: PROTOCOL_VERSION,
        unix_ms: UNIX_MS,
        cert: Some(cert.to_bytes()),
        presence: Presence::Online,
        relay_only: false,
    };
    let Ok(payload) = hello.encode() else { return };
    let Ok((hs, msg1)) = Handshake::initiate(
        &me.noise_private(),
        &sn_keys.noise_public(),
        [6; 32],
        &payload,
    ) else {
        return;
    };
    sn.handle_datagram(
        now,
        client,
        &encode_init(11, &msg1, &MacKeys::new(&sn_keys.noise_public()), None),
    );
    let mut session = None;
    while let Some(t) = sn.poll_transmit() {
        if let Ok(Packet::HandshakeResponse { sender, noise, .. }) = Packet::decode(&t.payload) {
            if let Ok((tr, _)) = hs.finish(noise) {
                session = Some((tr, sender));
            }
            break;
        }
    }
    let Some((mut tr, remote)) = session else {
        return;
    };
    let mut rest = data;
    let mut port = 5000u16;
    while rest.len() >= 4 {
        let len = u16::from_le_bytes([rest[0], rest[1]]) as usize;
        let (kind, delay) = (rest[2], rest[3]);
        rest = &rest[4..];
        let n = len.min(rest.len());
        let (chunk, tail) = rest.split_at(n);
        rest = tail;
        now += Duration::from_millis(delay as u64 * 50);
        let sealed = |tr: &mut peerline_crypto::Transport| {
            let mut out = Packet::transport_header(remote, 0).to_vec();
            let c = tr.seal(chunk, &mut out).ok()?;
            out[8..16].copy_from_slice(&c.to_le_bytes());
            Some(out)
        };
        match kind % 4 {
            0 => {
                if let Some(p) = sealed(&mut tr) {
                    sn.handle_datagram(now, client, &p);
                }
            }
            1 => sn.handle_datagram(now, client, chunk),
            2 => sn.handle_datagram(now, ([203, 0, 113, kind], 6000).into(), chunk),
            _ => {
                port = port.wrapping_add(1);
                if let Some(p) = sealed(&mut tr) {
                    sn.handle_datagram(now, ([198, 51, 100, 2], port).into(), &p);
                }
            }
        }
        sn.handle_timeout(now);
        while let Some((token, op)) = sn.poll_op() {
            let r = execute(&mut store, op, &mut rng);
            sn.handle_op_result(now, token, r);
        }
        while sn.poll_transmit().is_some() {}
        while sn.poll_event().is_some() {}
    }
});
