//! Decoding the datagrams a supernode sees most, and encoding its answers, through the wire
//! crate's public API. The encrypted parts are opaque bytes of the real lengths here (this
//! crate has no crypto); `crates/crypto/benches/handshake.rs` measures the crypto.
//!
//! `cargo bench -p peerline-wire --bench decode [-- --warm-up-time 1 --measurement-time 3]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use peerline_wire::cert::CertRepr;
use peerline_wire::msg::{Frame, Hello, Presence, Request, Response, Welcome};
use peerline_wire::packet::{Packet, MAC_LEN, MIN_IK_MSG1, MIN_IK_MSG2, TAG_LEN};
use peerline_wire::{Username, PROTOCOL_VERSION};

fn user(s: &str) -> Username {
    Username::parse(s).unwrap()
}

/// A certificate of typical size (a 12-character name), signature bytes arbitrary.
fn cert() -> Vec<u8> {
    CertRepr {
        username: user("alice.martin"),
        device_id: [1; 16],
        noise_key: [2; 32],
        sign_key: [3; 32],
        not_before: 1_790_000_000,
        not_after: 1_790_086_400,
        serial: 123_456,
        signature: [4; 64],
    }
    .encode()
}

fn hello() -> Vec<u8> {
    Hello {
        version: PROTOCOL_VERSION,
        unix_ms: 1_790_000_000_123,
        cert: Some(cert()),
        presence: Presence::Online,
        relay_only: false,
    }
    .encode()
    .unwrap()
}

/// A login's handshake initiation: Noise IK message 1 carrying a hello with a certificate.
fn handshake_init() -> Vec<u8> {
    let noise = vec![0x5a; MIN_IK_MSG1 + hello().len()];
    let mut out = Vec::new();
    Packet::HandshakeInit {
        sender: 0x0102_0304,
        noise: &noise,
        mac1: [7; MAC_LEN],
        mac2: [0; MAC_LEN],
    }
    .encode(&mut out);
    out
}

/// A transport datagram carrying `plaintext_len` bytes (plus the tag).
fn transport(plaintext_len: usize) -> Vec<u8> {
    let mut out = Packet::transport_header(0xdead_beef, 4711).to_vec();
    out.extend(std::iter::repeat_n(0x33, plaintext_len + TAG_LEN));
    out
}

/// A STUN Binding request (RFC 8489: type 0x0001, no attributes, magic cookie).
fn stun_binding() -> Vec<u8> {
    let mut b = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    b.extend_from_slice(&[9; 12]);
    b
}

fn candidates() -> Vec<SocketAddr> {
    vec![
        "192.168.1.20:40000".parse().unwrap(),
        "10.8.0.3:40000".parse().unwrap(),
        "[2001:db8::20]:40000".parse().unwrap(),
    ]
}

fn decode(c: &mut Criterion) {
    let mut g = c.benchmark_group("decode");
    let init = handshake_init();
    g.bench_function("packet/handshake_init", |b| {
        b.iter(|| Packet::decode(black_box(&init)).unwrap())
    });
    let keepalive_plain = Frame::Keepalive.encode().unwrap();
    let ka = transport(keepalive_plain.len());
    g.bench_function("packet/transport_keepalive", |b| {
        b.iter(|| Packet::decode(black_box(&ka)).unwrap())
    });
    let stun = stun_binding();
    g.bench_function("packet/stun_binding", |b| {
        b.iter(|| Packet::decode(black_box(&stun)).unwrap())
    });
    g.bench_function("frame/keepalive", |b| {
        b.iter(|| Frame::decode(black_box(&keepalive_plain)).unwrap())
    });
    let frames = [
        (
            "frame/request_set_presence",
            Frame::Request {
                id: 17,
                body: Request::SetPresence(Presence::Away),
            },
        ),
        (
            "frame/request_search",
            Frame::Request {
                id: 18,
                body: Request::Search {
                    prefix: "ali".into(),
                },
            },
        ),
        (
            "frame/request_connect",
            Frame::Request {
                id: 19,
                body: Request::Connect {
                    user: user("bob"),
                    candidates: candidates(),
                    hard_nat: false,
                },
            },
        ),
        (
            "frame/response_ok",
            Frame::Response {
                id: 3,
                body: Response::Ok,
            },
        ),
    ];
    for (name, f) in frames {
        let bytes = f.encode().unwrap();
        g.bench_function(name, |b| {
            b.iter(|| Frame::decode(black_box(&bytes)).unwrap())
        });
    }
    let h = hello();
    g.bench_function("hello_with_cert", |b| {
        b.iter(|| Hello::decode(black_box(&h)).unwrap())
    });
    let crt = cert();
    g.bench_function("cert_repr", |b| {
        b.iter(|| CertRepr::decode(black_box(&crt)).unwrap())
    });
    g.finish();
}

fn encode(c: &mut Criterion) {
    let mut g = c.benchmark_group("encode");
    let welcome = Welcome {
        version: PROTOCOL_VERSION,
        unix_ms: 1_790_000_000_456,
        cert: None,
    };
    g.bench_function("welcome", |b| {
        b.iter(|| black_box(&welcome).encode().unwrap())
    });
    let msg2 = vec![0x6b; MIN_IK_MSG2 + welcome.encode().unwrap().len()];
    let mut out = Vec::with_capacity(1200);
    g.bench_function("packet/handshake_response", |b| {
        b.iter(|| {
            out.clear();
            Packet::HandshakeResponse {
                sender: black_box(0x0a0b_0c0d),
                receiver: 0x0102_0304,
                noise: &msg2,
            }
            .encode(&mut out);
            black_box(out.len())
        })
    });
    g.bench_function("packet/transport_header", |b| {
        b.iter(|| Packet::transport_header(black_box(0xdead_beef), black_box(4712)))
    });
    let frames = [
        ("frame/keepalive_echo", Frame::Keepalive),
        (
            "frame/response_ok",
            Frame::Response {
                id: 17,
                body: Response::Ok,
            },
        ),
        (
            "frame/push_presence_event",
            Frame::Request {
                id: 40,
                body: Request::PresenceEvent {
                    user: user("alice.martin"),
                    presence: Presence::Away,
                },
            },
        ),
        (
            "frame/response_search_results_20",
            Frame::Response {
                id: 18,
                body: Response::SearchResults {
                    users: (0..20).map(|i| user(&format!("alice{i:02}"))).collect(),
                },
            },
        ),
    ];
    for (name, f) in frames {
        g.bench_function(name, |b| b.iter(|| black_box(&f).encode().unwrap()));
    }
    g.finish();
}

criterion_group! {
    name = benches;
    // Short by default; the command line (`-- --measurement-time N`) overrides.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = decode, encode
}
criterion_main!(benches);
