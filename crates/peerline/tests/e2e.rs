//! End-to-end tests with real processes on loopback: `peerlined` and several `peerline`
//! agents, driven through the command line exactly as a user would.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;
use common::{free_port, peerline_bin, peerlined_bin, Supernode, User};

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

#[test]
fn three_users_contacts_direct_offline_and_a_crashed_supernode() {
    let root = tempfile::tempdir().unwrap();
    let mut sn = Supernode::init(root.path());
    let bootstrap = sn.bootstrap();
    let user = |name: &'static str| User {
        name,
        profile: root.path().join(name),
    };
    let (alice, bob, carol) = (user("alice"), user("bob"), user("carol"));

    // Three users register and come online.
    for u in [&alice, &bob, &carol] {
        u.ok(&["register", u.name, "--server", &bootstrap]);
        let status = u.json(&["up", "--json"]);
        assert_eq!(status["online"], true);
        assert_eq!(status["user"], u.name);
    }
    // Profile and key files are private.
    use std::os::unix::fs::PermissionsExt;
    let mode = |p: PathBuf| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(alice.profile.clone()), 0o700);
    assert_eq!(mode(alice.profile.join("device.key")), 0o600);
    assert_eq!(mode(sn.data.join("authority.key")), 0o600);
    assert_eq!(mode(sn.data.clone()), 0o700);

    // Usernames are unique and case-insensitive.
    let dave = user("dave");
    let err = dave.fails(&["register", "ALICE", "--server", &bootstrap]);
    assert!(err.contains("taken"), "{err}");
    let err = dave.fails(&["register", "no spaces", "--server", &bootstrap]);
    assert!(err.contains("' '"), "{err}");

    // Privacy settings live in the profile.
    assert_eq!(
        dave.json(&["privacy", "show", "--json"])["relay_only"],
        false
    );
    dave.ok(&["privacy", "relay-only", "on"]);
    assert_eq!(
        dave.json(&["privacy", "show", "--json"])["relay_only"],
        true
    );

    // Contact request, then accept.
    alice.ok(&["contacts", "add", "bob"]);
    let list = bob.json(&["contacts", "list", "--json"]);
    assert_eq!(list[0]["user"], "alice");
    assert_eq!(list[0]["state"], "incoming");
    bob.ok(&["contacts", "accept", "alice"]);
    let list = alice.json(&["contacts", "list", "--json"]);
    assert_eq!(list[0]["state"], "accepted");
    assert_eq!(list[0]["presence"], "online");

    // Bob follows his events live.
    let mut events = Command::new(peerline_bin())
        .arg("--profile")
        .arg(&bob.profile)
        .args(["events", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let events_out = events.stdout.take().unwrap();
    let (ev_tx, ev_rx) = std::sync::mpsc::channel::<serde_json::Value>();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(events_out)
            .lines()
            .map_while(Result::ok)
        {
            if let Ok(v) = serde_json::from_str(&line) {
                let _ = ev_tx.send(v);
            }
        }
    });
    std::thread::sleep(Duration::from_millis(200));

    // An online message arrives directly.
    let sent = alice.json(&["msg", "send", "bob", "hello bob", "--json"]);
    assert_eq!(sent["via"], "direct");
    bob.wait_message("alice", "hello bob", "direct");
    let got = ev_rx
        .recv_timeout(Duration::from_secs(5))
        .expect("an event within 5 s");
    assert_eq!(got["type"], "message", "{got}");
    assert_eq!(got["from"], "alice");
    assert_eq!(got["text"], "hello bob");
    assert_eq!(got["via"], "direct");
    let _ = events.kill();
    let _ = events.wait();

    // A non-contact's message is refused with a reason and never delivered.
    let err = carol.fails(&["msg", "send", "alice", "buy cheap watches"]);
    assert!(err.contains("not your contact"), "{err}");
    std::thread::sleep(Duration::from_millis(300));
    assert!(!alice
        .messages()
        .iter()
        .any(|m| m["text"] == "buy cheap watches"));

    // A message to an unknown user names that user.
    let err = alice.fails(&["msg", "send", "nobody42", "anyone there?"]);
    assert!(err.contains("nobody42"), "{err}");

    // Search finds users by prefix and carries no address.
    let raw = carol.ok(&["search", "BO", "--json"]);
    let found: Value = serde_json::from_str(&raw).unwrap();
    assert_eq!(found, serde_json::json!(["bob"]));
    assert!(
        !raw.contains("127.0.0.1"),
        "search output leaks an address: {raw}"
    );

    // Bob goes offline; a message to him is durably queued at the supernode...
    bob.ok(&["down"]);
    assert_eq!(bob.json(&["status", "--json"])["online"], false);
    let sent = alice.json(&["msg", "send", "bob", "while you were out", "--json"]);
    assert_eq!(sent["via"], "offline");

    // ...and survives a kill -9 and restart of the supernode.
    std::thread::sleep(Duration::from_millis(1500)); // let the session snapshot land
    sn.kill9();
    sn.start();
    let restarted = Instant::now();

    // Alice's agent stayed up: it is online again by itself within 10 s and can send.
    let sent = alice.json(&["msg", "send", "bob", "after the restart", "--json"]);
    assert_eq!(sent["via"], "offline");
    assert!(alice.json(&["status", "--json"])["online"] == true);
    let took = restarted.elapsed();
    assert!(
        took < Duration::from_secs(10),
        "alice needed {took:?} to send again"
    );
    eprintln!("alice sent again {:?} after the supernode restart", took);

    // Bob's next `up` delivers both, in order, marked offline.
    bob.ok(&["up"]);
    bob.wait_message("alice", "while you were out", "offline");
    bob.wait_message("alice", "after the restart", "offline");
    let texts: Vec<String> = bob
        .messages()
        .iter()
        .filter(|m| m["via"] == "offline")
        .map(|m| m["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(texts, vec!["while you were out", "after the restart"]);

    // Delivered messages were deleted from the supernode's mailbox once acknowledged.
    let start = Instant::now();
    loop {
        let n: i64 = rusqlite::Connection::open(sn.data.join("store.sqlite"))
            .unwrap()
            .query_row("SELECT COUNT(*) FROM messages", [], |r| r.get(0))
            .unwrap();
        if n == 0 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{n} messages still in the mailbox"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn clear_errors_without_an_agent_or_a_supernode() {
    let root = tempfile::tempdir().unwrap();
    let u = User {
        name: "erin",
        profile: root.path().join("erin"),
    };
    // Not registered yet.
    let err = u.fails(&["up"]);
    assert!(err.contains("not registered"), "{err}");
    // Agent not running.
    let err = u.fails(&["msg", "send", "bob", "hi"]);
    assert!(err.contains("agent is not running"), "{err}");
    // Bad bootstrap entry.
    let err = u.fails(&["register", "erin", "--server", "nonsense"]);
    assert!(err.contains("HOST:PORT#KEY"), "{err}");
    // Supernode unreachable (nothing listens on this port).
    let data = root.path().join("sn");
    let out = Command::new(peerlined_bin())
        .args(["init", "--data"])
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    assert!(out.status.success());
    let b = std::fs::read_to_string(data.join("bootstrap")).unwrap();
    let err = u.fails(&["register", "erin", "--server", b.trim()]);
    assert!(err.contains("unreachable"), "{err}");
    // Running a supernode on an uninitialised dir.
    let out = Command::new(peerlined_bin())
        .args(["run", "--data"])
        .arg(root.path().join("empty"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("peerlined init"));
}

/// A client whose UDP gets no answer from the supernode falls back to TCP on its own:
/// here the supernode's UDP port differs from its TCP port, and the user's bootstrap entry
/// names the TCP one, so every UDP datagram to it is lost, as on a network that blocks UDP.
#[test]
fn a_client_without_udp_to_the_supernode_falls_back_to_tcp() {
    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("supernode");
    let (udp, tcp) = (free_port(), free_port());
    let out = Command::new(peerlined_bin())
        .args(["init", "--data"])
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{udp}")])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::write(
        data.join("peerlined.toml"),
        format!(
            "listen = \"127.0.0.1:{udp}\"\ntcp_listen = \"127.0.0.1:{tcp}\"\nadmin = \"off\"\n"
        ),
    )
    .unwrap();
    let mut sn = Supernode {
        data: data.clone(),
        child: None,
        admin: 0,
        port: udp,
    };
    sn.start();
    let udp_entry = sn.bootstrap();
    let tcp_entry = udp_entry.replace(&format!(":{udp}#"), &format!(":{tcp}#"));
    assert_ne!(udp_entry, tcp_entry);

    let frank = User {
        name: "frank",
        profile: root.path().join("frank"),
    };
    let grace = User {
        name: "grace",
        profile: root.path().join("grace"),
    };
    frank.ok(&["register", "frank", "--server", &tcp_entry]);
    grace.ok(&["register", "grace", "--server", &udp_entry]);
    let s = frank.json(&["up", "--json"]);
    assert_eq!(s["online"], true);
    assert_eq!(s["transport"], "tcp");
    assert_eq!(grace.json(&["up", "--json"])["transport"], "udp");
    frank.ok(&["contacts", "add", "grace"]);
    grace.ok(&["contacts", "accept", "frank"]);
    frank.ok(&["msg", "send", "grace", "over tcp"]);
    grace.wait_message("frank", "over tcp", "direct");
}

/// `peerlined run` runs the TURN relay beside the supernode: an independent TURN client
/// (`turn-client-proto`) gets an allocation on `relay_listen`, with credentials made from
/// the data dir's `relay.secret` exactly as the supernode makes them for logged-in users.
/// (On loopback the relay runs but is not offered to clients: no peer could use it.)
#[test]
fn peerlined_runs_the_turn_relay() {
    use std::net::SocketAddr;
    use turn_client_proto::api::{
        Transmit, TurnClientApi, TurnConfig, TurnEvent, TurnPollRet, TurnRecvRet,
    };
    use turn_client_proto::types::{TransportType, TurnCredentials};
    use turn_client_proto::udp::TurnClientUdp;

    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("supernode");
    let (port, admin, relay_port) = (free_port(), free_port(), free_port());
    let out = Command::new(peerlined_bin())
        .args(["init", "--data"])
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--admin", &format!("127.0.0.1:{admin}")])
        .output()
        .unwrap();
    assert!(out.status.success());
    let relay: SocketAddr = format!("127.0.0.1:{relay_port}").parse().unwrap();
    let cfg_path = data.join("peerlined.toml");
    let cfg = std::fs::read_to_string(&cfg_path).unwrap();
    assert!(
        cfg.contains("\nrelay_listen = \"127.0.0.1:3478\"\n"),
        "{cfg}"
    );
    let cfg = cfg.replace(
        "relay_listen = \"127.0.0.1:3478\"",
        &format!("relay_listen = \"{relay}\""),
    );
    std::fs::write(&cfg_path, cfg).unwrap();
    use std::os::unix::fs::PermissionsExt;
    let secret_path = data.join("relay.secret");
    let mode = std::fs::metadata(&secret_path)
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);

    let mut sn = Supernode {
        data: data.clone(),
        child: None,
        admin: 0,
        port: 0,
    };
    sn.start();
    let ivan = User {
        name: "ivan",
        profile: root.path().join("ivan"),
    };
    ivan.ok(&["register", "ivan", "--server", &sn.bootstrap()]);
    let log = std::fs::read_to_string(data.join("test.log")).unwrap();
    assert!(
        log.contains("TURN relay listening") && log.contains(&relay.to_string()),
        "{log}"
    );

    use base64::Engine;
    let secret: [u8; 32] = base64::engine::general_purpose::STANDARD
        .decode(std::fs::read_to_string(&secret_path).unwrap().trim())
        .unwrap()
        .try_into()
        .unwrap();
    let expires = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let (username, password) = peerline_core::relay::turn_credentials(&secret, "ivan", expires);

    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let local = socket.local_addr().unwrap();
    let mut config = TurnConfig::new(TurnCredentials::new(&username, &password));
    // Loopback answers at once: retransmit quickly, give up within about 3 s.
    config.set_request_retransmits(
        Duration::from_millis(100),
        Duration::from_millis(400),
        8,
        Duration::from_millis(400),
    );
    let mut turn = TurnClientUdp::allocate(local, relay, config);
    let start = Instant::now();
    let now = || turn_client_proto::stun::Instant::from_std(start);
    let mut events = Vec::new();
    let mut buf = vec![0u8; 65_536];
    let relayed = loop {
        while let Some(t) = turn.poll_transmit(now()) {
            socket.send_to(&t.data, t.to).unwrap();
        }
        events.extend(std::iter::from_fn(|| turn.poll_event()));
        if let Some(a) = events.iter().find_map(|e| match e {
            TurnEvent::AllocationCreated(TransportType::Udp, a) => Some(*a),
            _ => None,
        }) {
            break a;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no allocation; events: {events:?}"
        );
        let wait = match turn.poll(now()) {
            TurnPollRet::WaitUntil(at) => at.saturating_duration_since(now()),
            other => panic!("TURN client gave up: {other:?}; events: {events:?}"),
        };
        socket
            .set_read_timeout(Some(
                wait.clamp(Duration::from_millis(1), Duration::from_millis(50)),
            ))
            .unwrap();
        if let Ok((n, from)) = socket.recv_from(&mut buf) {
            let t = Transmit::new(&buf[..n], TransportType::Udp, from, local);
            match turn.recv(t, now()) {
                TurnRecvRet::Handled | TurnRecvRet::Ignored(_) => {}
                other => panic!("unexpected {other:?}"),
            }
        }
    };
    assert_eq!(relayed.ip(), relay.ip(), "relayed on the relay's IP");
    assert_ne!(relayed.port(), relay.port());
}

/// A speech-like test signal: a gliding voiced tone with harmonics, in syllables of about
/// 200 ms with pauses between words; `voice` picks its pitch and rhythm.
fn speechlike(rate: u32, seconds: f64, voice: f64) -> Vec<f32> {
    let n = (f64::from(rate) * seconds) as usize;
    let mut phase = 0.0f64;
    (0..n)
        .map(|i| {
            let t = i as f64 / f64::from(rate);
            let f0 = 110.0 * voice + 30.0 * (t * 1.3 * voice).sin();
            phase += 2.0 * std::f64::consts::PI * f0 / f64::from(rate);
            let voiced: f64 = (1..=6).map(|h| (phase * h as f64).sin() / h as f64).sum();
            let syllable = ((t * 5.0 * voice).sin() * 0.5 + 0.5).powi(2);
            let word = if (t * 0.7 * voice).sin() > -0.6 {
                1.0
            } else {
                0.0
            };
            (0.3 * voiced * syllable * word) as f32
        })
        .collect()
}

fn write_test_wav(path: &Path, rate: u32, channels: u16, mono: &[f32]) {
    let spec = hound::WavSpec {
        channels,
        sample_rate: rate,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for s in mono {
        for _ in 0..channels {
            w.write_sample((s * 32767.0) as i16).unwrap();
        }
    }
    w.finalize().unwrap();
}

/// How well `heard` reproduces `sent` (both 48 kHz), after alignment: the mean normalised
/// correlation over half-second segments of `sent` that carry sound, each aligned on its
/// own within 50 ms of the best overall lag (a jitter buffer stretches and shrinks time a
/// little during a call, so one lag for the whole call would understate the match).
/// Returns the score and the overall lag in samples.
fn aligned_correlation(sent: &[i16], heard: &[i16]) -> (f64, i64) {
    let down = |x: &[i16]| -> Vec<f64> {
        x.chunks_exact(6)
            .map(|c| c.iter().map(|&v| f64::from(v)).sum::<f64>() / 6.0)
            .collect()
    };
    let (s, h) = (down(sent), down(heard));
    let corr = |from: usize, len: usize, lag: i64| -> f64 {
        let (mut xy, mut xx, mut yy) = (0.0, 0.0, 0.0);
        for (i, &x) in s.iter().enumerate().skip(from).take(len) {
            let j = i as i64 + lag;
            if j < 0 || j as usize >= h.len() {
                continue;
            }
            let y = h[j as usize];
            xy += x * y;
            xx += x * x;
            yy += y * y;
        }
        if xx == 0.0 || yy == 0.0 {
            0.0
        } else {
            xy / (xx * yy).sqrt()
        }
    };
    let best = |from: usize, len: usize, lags: std::ops::RangeInclusive<i64>| {
        lags.map(|lag| (corr(from, len, lag), lag))
            .fold((f64::MIN, 0), |a, b| if b.0 > a.0 { b } else { a })
    };
    // Overall lag from the first three seconds, within one second either way.
    let (_, lag) = best(0, 8000 * 3, -8000..=8000);
    let seg = 4000;
    let loud = |from: usize| {
        s[from..(from + seg).min(s.len())]
            .iter()
            .map(|x| x * x)
            .sum::<f64>()
            / seg as f64
    };
    let threshold = (0..s.len() / seg)
        .map(|k| loud(k * seg))
        .fold(0.0, f64::max)
        / 100.0;
    let scores: Vec<f64> = (0..s.len() / seg)
        .map(|k| k * seg)
        .filter(|&from| loud(from) > threshold)
        // Skip segments the recording cannot cover (the call started or ended there).
        .filter(|&from| from as i64 + lag >= 0 && ((from + seg) as i64 + lag) as usize <= h.len())
        .map(|from| best(from, seg, lag - 400..=lag + 400).0)
        .collect();
    assert!(
        scores.len() >= 10,
        "only {} segments to compare",
        scores.len()
    );
    (scores.iter().sum::<f64>() / scores.len() as f64, lag * 6)
}

/// Two agents hold a 10 s call on loopback with WAV files both ways: each hears what the
/// other sent, the path is direct, and the supernode sees only signalling and keepalives.
#[test]
fn a_ten_second_call_carries_each_sides_audio_directly() {
    let root = tempfile::tempdir().unwrap();
    let sn = Supernode::init(root.path());
    let bootstrap = sn.bootstrap();
    let user = |name: &'static str| User {
        name,
        profile: root.path().join(name),
    };
    let (alice, bob) = (user("alice"), user("bob"));
    for u in [&alice, &bob] {
        u.ok(&["register", u.name, "--server", &bootstrap]);
        u.ok(&["up"]);
    }
    let err = alice.fails(&["call", "bob", "--duration", "1"]);
    assert!(err.contains("only call your contacts"), "{err}");
    alice.ok(&["contacts", "add", "bob"]);
    bob.ok(&["contacts", "accept", "alice"]);

    // Alice sends 16 kHz stereo, bob 44.1 kHz mono: both are resampled to 48 kHz mono.
    let a_wav = root.path().join("alice.wav");
    let b_wav = root.path().join("bob.wav");
    write_test_wav(&a_wav, 16_000, 2, &speechlike(16_000, 11.0, 1.0));
    write_test_wav(&b_wav, 44_100, 1, &speechlike(44_100, 11.0, 1.7));
    let a_heard = root.path().join("alice-heard.wav");
    let b_heard = root.path().join("bob-heard.wav");

    let bob_wait = Command::new(peerline_bin())
        .arg("--profile")
        .arg(&bob.profile)
        .args([
            "calls",
            "wait",
            "--accept",
            "--json",
            "--timeout",
            "60",
            "--play",
        ])
        .arg(&b_wav)
        .arg("--record")
        .arg(&b_heard)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let sn_before = sn.metric("peerline_datagrams_in_total");
    let out = alice.json(&[
        "call",
        "bob",
        "--duration",
        "10",
        "--json",
        "--play",
        a_wav.to_str().unwrap(),
        "--record",
        a_heard.to_str().unwrap(),
    ]);
    let bob_out = bob_wait.wait_with_output().unwrap();
    assert!(
        bob_out.status.success(),
        "calls wait: {}",
        String::from_utf8_lossy(&bob_out.stderr)
    );
    let bob_report: Value = serde_json::from_slice(&bob_out.stdout).unwrap();
    std::thread::sleep(Duration::from_millis(1100));
    let sn_during = sn.metric("peerline_datagrams_in_total") - sn_before;

    for (who, r) in [("alice", &out), ("bob", &bob_report)] {
        eprintln!("{who}: {}", serde_json::to_string_pretty(r).unwrap());
        assert_eq!(r["via"], "direct", "{who}");
        assert_eq!(r["state"], "ended", "{who}");
        assert!(r["setup_ms"].as_u64().is_some(), "{who}: setup time");
        let d = r["duration_s"].as_f64().unwrap();
        assert!((9.0..12.0).contains(&d), "{who}: {d} s of audio");
        let m = &r["media"];
        assert!(m["rtt_ms"].as_f64().is_some(), "{who}: rtt measured");
        assert!(m["send_kbps"].as_f64().unwrap() > 8.0, "{who}: sent audio");
        assert!(
            m["loss_after_recovery"].as_f64().unwrap() < 0.05,
            "{who}: loss"
        );
    }
    assert_eq!(out["end_reason"], "hung up");
    assert_eq!(bob_report["end_reason"], "the other side hung up");

    // What each recorded is what the other sent, after alignment.
    let read = |p: &Path| peerline_media::wav::read_wav(p).unwrap();
    let (c_ab, lag_ab) = aligned_correlation(&read(&a_wav), &read(&b_heard));
    let (c_ba, lag_ba) = aligned_correlation(&read(&b_wav), &read(&a_heard));
    eprintln!(
        "correlation alice->bob {c_ab:.3} at {} ms, bob->alice {c_ba:.3} at {} ms; supernode datagrams during the call: {sn_during}",
        lag_ab / 48,
        lag_ba / 48
    );
    assert!(c_ab > 0.7, "bob heard alice badly: correlation {c_ab:.3}");
    assert!(c_ba > 0.7, "alice heard bob badly: correlation {c_ba:.3}");
    // About 1,200 media datagrams went between the two; the supernode saw the call's
    // signalling (invite, ring, accept, connection setup, hang-up, their acknowledgements)
    // and keepalives only.
    assert!(
        sn_during < 60,
        "the supernode received {sn_during} datagrams during the call"
    );
}

/// A user lost a device: `peerline status` names the device's key, the operator finds it
/// with `peerlined devices` and revokes it with `peerlined revoke`; the running supernode
/// logs the device out at once and tells it why, and it cannot log in again.
#[test]
fn an_operator_revokes_a_lost_device_and_it_is_logged_out() {
    let root = tempfile::tempdir().unwrap();
    let sn = Supernode::init(root.path());
    let bootstrap = sn.bootstrap();
    let alice = User {
        name: "alice",
        profile: root.path().join("alice"),
    };
    alice.ok(&["register", "alice", "--server", &bootstrap]);
    assert_eq!(alice.json(&["up", "--json"])["online"], true);
    let key = alice.json(&["status", "--json"])["device"]
        .as_str()
        .expect("status names the device")
        .to_string();
    assert_eq!(key.len(), 64);

    let operator = |args: &[&str]| {
        let out = Command::new(peerlined_bin()).args(args).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    let data = sn.data.to_str().unwrap().to_string();
    let listed = operator(&["devices", "--data", &data, "alice", "--json"]);
    assert_eq!(listed["devices"][0]["noise_key"], key.as_str());
    assert_eq!(listed["devices"][0]["revoked"], false);
    let revoked = operator(&["revoke", "--data", &data, &key, "--json"]);
    assert_eq!(revoked["user"], "alice");
    assert_eq!(revoked["supernode_asked"], true, "{revoked}");

    // The agent, online a moment ago, is logged out and says why; it stays out.
    let start = Instant::now();
    let reason = loop {
        let v = alice.json(&["status", "--json"]);
        if let Some(r) = v["reason"].as_str().filter(|r| r.contains("revoked")) {
            assert_ne!(v["online"], true);
            break r.to_string();
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still not logged out: {v}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(reason, "this device was revoked: enrol it again");
    assert_eq!(sn.metric("peerline_online_users"), 0);
    std::thread::sleep(Duration::from_millis(1500));
    assert_ne!(alice.json(&["status", "--json"])["online"], true);
}
