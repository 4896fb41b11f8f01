//! The crypto of a login and of a session's datagrams: Noise IK on both sides, the
//! responder side alone (what a supernode pays per login, with and without the certificate
//! check), certificate verification, the mac1 check every initiation gets first, and
//! `Transport::seal`/`open` of a 100-byte payload.
//!
//! `cargo bench -p peerline-crypto --bench handshake [-- --warm-up-time 1 --measurement-time 3]`
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use peerline_crypto::cert::CertRequest;
use peerline_crypto::cookie::{self, MacKeys};
use peerline_crypto::noise::{Handshake, Responder};
use peerline_crypto::{Authority, Certificate, DeviceKeys, Transport};
use peerline_wire::msg::{Hello, Presence, Welcome};
use peerline_wire::{Username, PROTOCOL_VERSION};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

/// Unix seconds the certificates are valid at.
const NOW_S: u64 = 1_790_000_000;

struct Setup {
    authority: Authority,
    server: DeviceKeys,
    client: DeviceKeys,
    cert: Certificate,
    /// The client's hello (with its certificate): the payload of message 1.
    hello: Vec<u8>,
    /// The supernode's welcome: the payload of message 2.
    welcome: Vec<u8>,
}

fn setup() -> Setup {
    let mut rng = ChaCha20Rng::seed_from_u64(42);
    let authority = Authority::generate(&mut rng);
    let server = DeviceKeys::generate(&mut rng);
    let client = DeviceKeys::generate(&mut rng);
    let req = CertRequest {
        username: Username::parse("alice.martin").unwrap(),
        device_id: [1; 16],
        noise_key: client.noise_public(),
        sign_key: client.sign_public(),
    };
    let cert = authority.issue(&req, 1, NOW_S, 24 * 3600);
    let hello = Hello {
        version: PROTOCOL_VERSION,
        unix_ms: NOW_S * 1000,
        cert: Some(cert.to_bytes()),
        presence: Presence::Online,
        relay_only: false,
    }
    .encode()
    .unwrap();
    let welcome = Welcome {
        version: PROTOCOL_VERSION,
        unix_ms: NOW_S * 1000,
        cert: None,
    }
    .encode()
    .unwrap();
    Setup {
        authority,
        server,
        client,
        cert,
        hello,
        welcome,
    }
}

/// A pair of transports out of one handshake: (client's, supernode's).
fn transports(s: &Setup) -> (Transport, Transport) {
    let (hs, msg1) = Handshake::initiate(
        &s.client.noise_private(),
        &s.server.noise_public(),
        [1; 32],
        &s.hello,
    )
    .unwrap();
    let r = Responder::read(&s.server.noise_private(), [2; 32], &msg1).unwrap();
    let (server, msg2) = r.accept(&s.welcome).unwrap();
    let (client, _) = hs.finish(&msg2).unwrap();
    (client, server)
}

fn handshake(c: &mut Criterion) {
    let s = setup();
    let client_private = s.client.noise_private();
    let server_private = s.server.noise_private();
    let server_public = s.server.noise_public();
    let authority = s.authority.public();
    let (_, msg1) =
        Handshake::initiate(&client_private, &server_public, [1; 32], &s.hello).unwrap();

    let mut g = c.benchmark_group("handshake");
    g.bench_function("ik_initiator_and_responder", |b| {
        b.iter(|| {
            let (hs, msg1) =
                Handshake::initiate(&client_private, &server_public, [1; 32], &s.hello).unwrap();
            let r = Responder::read(&server_private, [2; 32], &msg1).unwrap();
            let (server, msg2) = r.accept(&s.welcome).unwrap();
            let (client, _) = hs.finish(&msg2).unwrap();
            black_box((client, server))
        })
    });
    g.bench_function("initiator_message1", |b| {
        b.iter(|| {
            Handshake::initiate(
                &client_private,
                &server_public,
                [1; 32],
                black_box(&s.hello),
            )
            .unwrap()
        })
    });
    g.bench_function("responder_read", |b| {
        b.iter(|| Responder::read(&server_private, [2; 32], black_box(&msg1)).unwrap())
    });
    g.bench_function("responder_accept", |b| {
        b.iter_batched(
            || Responder::read(&server_private, [2; 32], &msg1).unwrap(),
            |r| r.accept(&s.welcome).unwrap(),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("responder", |b| {
        b.iter(|| {
            let r = Responder::read(&server_private, [2; 32], black_box(&msg1)).unwrap();
            r.accept(&s.welcome).unwrap()
        })
    });
    // What a supernode's crypto costs per certificate login: both Noise messages, the
    // hello, the certificate (signature, validity, key) and the welcome.
    g.bench_function("responder_with_certificate", |b| {
        b.iter(|| {
            let r = Responder::read(&server_private, [2; 32], black_box(&msg1)).unwrap();
            let hello = Hello::decode(&r.payload).unwrap();
            let cert = Certificate::verify(hello.cert.as_deref().unwrap(), &authority).unwrap();
            cert.check_for(&r.remote_static, NOW_S).unwrap();
            let welcome = Welcome {
                version: PROTOCOL_VERSION,
                unix_ms: NOW_S * 1000,
                cert: None,
            }
            .encode()
            .unwrap();
            r.accept(&welcome).unwrap()
        })
    });
    g.finish();

    let mut g = c.benchmark_group("certificate");
    let bytes = s.cert.to_bytes();
    let noise_key = s.client.noise_public();
    g.bench_function("verify", |b| {
        b.iter(|| {
            let cert = Certificate::verify(black_box(&bytes), &authority).unwrap();
            cert.check_for(&noise_key, NOW_S).unwrap();
            cert
        })
    });
    let req = CertRequest {
        username: Username::parse("alice.martin").unwrap(),
        device_id: [1; 16],
        noise_key,
        sign_key: s.client.sign_public(),
    };
    g.bench_function("issue", |b| {
        b.iter(|| s.authority.issue(black_box(&req), 7, NOW_S, 24 * 3600))
    });
    g.finish();

    let mut g = c.benchmark_group("cookie");
    let keys = MacKeys::new(&server_public);
    let init = cookie::encode_init(7, &msg1, &keys, None);
    g.bench_function("mac1_check", |b| {
        b.iter(|| assert!(keys.mac1_ok(black_box(&init))))
    });
    g.finish();
}

fn transport(c: &mut Criterion) {
    let s = setup();
    let payload = [0x42u8; 100];
    let mut g = c.benchmark_group("transport");
    let (mut client, _) = transports(&s);
    let mut out = Vec::with_capacity(256);
    g.bench_function("seal_100B", |b| {
        b.iter(|| {
            out.clear();
            client.seal(black_box(&payload), &mut out).unwrap()
        })
    });
    // A fresh pair per benchmark: each receiver's replay window starts at counter 0.
    let (mut client, mut server) = transports(&s);
    g.bench_function("open_100B", |b| {
        b.iter_batched(
            || {
                let mut ct = Vec::with_capacity(128);
                let n = client.seal(&payload, &mut ct).unwrap();
                (n, ct)
            },
            |(n, ct)| server.open(n, &ct).unwrap(),
            BatchSize::SmallInput,
        )
    });
    let (mut client, mut server) = transports(&s);
    let mut ct = Vec::with_capacity(128);
    g.bench_function("seal_open_100B", |b| {
        b.iter(|| {
            ct.clear();
            let n = server.seal(black_box(&payload), &mut ct).unwrap();
            client.open(n, &ct).unwrap()
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    // Short by default; the command line (`-- --measurement-time N`) overrides.
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = handshake, transport
}
criterion_main!(benches);
