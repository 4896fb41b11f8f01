//! The lab's NATs behave as `shared/LAB.md` says. These tests need root and nftables; without
//! them they fail, unless PEERLINE_LAB_SKIP=1 is set (then they say why and return).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use peerline_lab::probe::{self, Filtering, Mapping, HOST_PORT};
use peerline_lab::{check_environment, cleanup_stale, Lab, NatOptions, NatType};
use std::net::SocketAddr;
use std::time::Duration;

const PREFIX: &str = "pltest";

/// A lab, or None (after saying why) when the machine can't build one and the caller opted
/// out with PEERLINE_LAB_SKIP=1. Never a silent pass.
fn lab(test: &str) -> Option<Lab> {
    if let Err(e) = check_environment().require() {
        if std::env::var("PEERLINE_LAB_SKIP").as_deref() == Ok("1") {
            eprintln!("SKIPPED {test}: {e} (PEERLINE_LAB_SKIP=1)");
            return None;
        }
        panic!("{test}: {e}. The NAT lab tests need root and nftables; set PEERLINE_LAB_SKIP=1 to skip them.");
    }
    Some(Lab::new(PREFIX).expect("building the lab"))
}

#[test]
fn every_nat_type_maps_and_filters_as_lab_md_says() {
    let Some(mut lab) = lab("every_nat_type_maps_and_filters_as_lab_md_says") else {
        return;
    };
    let reports = probe::probe_all(&mut lab).unwrap();
    println!("{}", probe::table(&reports));

    for (t, r) in &reports {
        // LAB.md's table, packet by packet: (A:4000 arrives, B's unsolicited arrives).
        let (a_other, b_unsolicited) = match t {
            NatType::Public | NatType::FullCone => (true, true),
            NatType::Restricted => (true, false),
            NatType::PortRestricted | NatType::Symmetric | NatType::UdpBlocked => (false, false),
        };
        let udp_out = *t != NatType::UdpBlocked;
        assert_eq!(r.a_answer_arrived, udp_out, "{t}: A's answer");
        assert_eq!(r.a_other_port_arrived, a_other, "{t}: A's other port");
        assert_eq!(r.b_unsolicited_arrived, b_unsolicited, "{t}: B unsolicited");
        assert_eq!(r.b_answer_arrived, udp_out, "{t}: B's answer");
        assert!(r.tcp_443, "{t}: TCP to 443 must pass");
        match t {
            NatType::Public => {
                assert_eq!(r.seen_by_a, Some(r.local), "{t}: no translation");
                assert!(r.local.ip().octets()[..3] == [198, 51, 100]);
            }
            NatType::FullCone | NatType::Restricted | NatType::PortRestricted => {
                let seen = r.seen_by_a.unwrap();
                assert_eq!(
                    seen.ip().octets()[..3],
                    [203, 0, 113],
                    "{t}: the WAN address"
                );
                assert_eq!(r.seen_by_b, Some(seen), "{t}: one mapping for both servers");
                assert_eq!(seen.port(), HOST_PORT, "{t}: port preserved when free");
            }
            NatType::Symmetric => {
                assert_ne!(
                    r.seen_by_a.unwrap(),
                    r.seen_by_b.unwrap(),
                    "{t}: port per destination"
                );
            }
            NatType::UdpBlocked => assert_eq!((r.seen_by_a, r.seen_by_b), (None, None)),
        }
        assert_eq!(t.expected(), (r.mapping, r.filtering), "{t}");
        assert_eq!(r.classify(), Some(*t));
    }
}

#[test]
fn udp_blocked_lets_only_web_tcp_through() {
    let Some(mut lab) = lab("udp_blocked_lets_only_web_tcp_through") else {
        return;
    };
    let server = lab.add_public_host("server").unwrap();
    let nat = lab.add_nat("fw", NatType::UdpBlocked).unwrap();
    let host = lab.add_host_behind(&nat, "host").unwrap();
    let _l443 = server.tcp_listen(443).unwrap();
    let _l80 = server.tcp_listen(80).unwrap();
    let _l7000 = server.tcp_listen(7000).unwrap();
    // Generous for what must connect (a loaded machine is slow); a drop is a timeout
    // whatever the limit.
    let connect = |port, ms| {
        let to = SocketAddr::V4(server.socket_addr(port));
        host.tcp_connect(to, Duration::from_millis(ms)).is_ok()
    };
    assert!(connect(443, 5000) && connect(80, 5000));
    assert!(!connect(7000, 500), "TCP to other ports is dropped");
}

#[test]
fn without_the_wan_filter_an_early_unsolicited_packet_changes_the_port() {
    // LAB.md's conntrack quirk: B's packet reaches the router before the host sent to B; its
    // conntrack entry is confirmed (no WAN filter) and the host's packet to B clashes with it.
    let Some(mut lab) = lab("without_the_wan_filter_an_early_unsolicited_packet_changes_the_port")
    else {
        return;
    };
    let a = lab.add_public_host("a").unwrap();
    let b = lab.add_public_host("b").unwrap();
    let open = NatOptions {
        wan_filter: false,
        ..NatOptions::default()
    };
    let nat = lab
        .add_nat_with("nat", NatType::PortRestricted, open)
        .unwrap();
    let host = lab.add_host_behind(&nat, "host").unwrap();
    let r = probe::probe(&a, &b, &host).unwrap();
    println!("{r:?}");
    assert!(!r.b_unsolicited_arrived && r.b_answer_arrived);
    assert_eq!(r.seen_by_a.unwrap().port(), HOST_PORT);
    assert_ne!(
        r.seen_by_b.unwrap().port(),
        HOST_PORT,
        "expected the clash to move the host to another public port"
    );
    assert_eq!(r.mapping, Mapping::EndpointDependent);
    assert_eq!(r.filtering, Filtering::AddressAndPortDependent);
}

#[test]
fn two_hosts_behind_one_nat() {
    let Some(mut lab) = lab("two_hosts_behind_one_nat") else {
        return;
    };
    let server = lab.add_public_host("server").unwrap();
    let nat = lab.add_nat("nat", NatType::FullCone).unwrap();
    let h1 = lab.add_host_behind(&nat, "h1").unwrap();
    let h2 = lab.add_host_behind(&nat, "h2").unwrap();
    assert_eq!(h1.addr.to_string(), "10.1.0.2");
    assert_eq!(h2.addr.to_string(), "10.1.0.3");
    let wait = Some(Duration::from_millis(500));

    // Same LAN: direct, over local addresses.
    let s1 = h1.udp_bind(5000).unwrap();
    let s2 = h2.udp_bind(5000).unwrap();
    s1.set_read_timeout(wait).unwrap();
    s2.set_read_timeout(wait).unwrap();
    s1.send_to(b"hi", h2.socket_addr(5000)).unwrap();
    let mut buf = [0u8; 16];
    let (n, from) = s2.recv_from(&mut buf).unwrap();
    assert_eq!(
        (&buf[..n], from),
        (&b"hi"[..], SocketAddr::V4(h1.socket_addr(5000)))
    );

    // Both map to the outside; same local port, so the second gets another public port,
    // and full-cone inbound traffic reaches the right host for each mapping.
    let srv = server.udp_bind(3478).unwrap();
    srv.set_read_timeout(wait).unwrap();
    let mut seen = Vec::new();
    for s in [&s1, &s2] {
        s.send_to(b"out", server.socket_addr(3478)).unwrap();
        let (_, from) = srv.recv_from(&mut buf).unwrap();
        seen.push(from);
    }
    assert_ne!(seen[0], seen[1]);
    let other = server.udp_bind(4000).unwrap();
    other.send_to(b"to-h2", seen[1]).unwrap();
    let (n, _) = s2.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"to-h2");
    other.send_to(b"to-h1", seen[0]).unwrap();
    let (n, _) = s1.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"to-h1");

    // No hairpinning: h1 cannot reach h2 through the router's public address.
    s1.send_to(b"hairpin", seen[1]).unwrap();
    assert!(s2.recv_from(&mut buf).is_err(), "the router hairpinned");
}

#[test]
fn loss_impairment_drops_about_the_share_asked() {
    let Some(mut lab) = lab("loss_impairment_drops_about_the_share_asked") else {
        return;
    };
    let server = lab.add_public_host("server").unwrap();
    let nat = lab.add_nat("nat", NatType::PortRestricted).unwrap();
    let host = lab.add_host_behind(&nat, "host").unwrap();
    let srv = server.udp_bind(3478).unwrap();
    srv.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let sock = host.udp_bind(0).unwrap();
    let count = |n: usize| {
        for _ in 0..n {
            sock.send_to(b"x", server.socket_addr(3478)).unwrap();
        }
        let mut got = 0;
        let mut buf = [0u8; 8];
        while srv.recv_from(&mut buf).is_ok() {
            got += 1;
        }
        got
    };
    // Warm the path first (neighbour resolution, conntrack): only then count.
    let mut buf = [0u8; 8];
    let start = std::time::Instant::now();
    loop {
        sock.send_to(b"w", server.socket_addr(3478)).unwrap();
        if srv.recv_from(&mut buf).is_ok() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the path never worked"
        );
    }
    while srv.recv_from(&mut buf).is_ok() {}
    assert_eq!(count(100), 100, "no loss by default");
    nat.set_loss(30).unwrap();
    let got = count(400);
    // 280 expected; the bounds are about 4.5 standard deviations wide.
    assert!(
        (240..=320).contains(&got),
        "30% loss let {got} of 400 through"
    );
    nat.set_loss(0).unwrap();
    assert_eq!(count(100), 100, "loss removed");
}

#[test]
fn commands_run_inside_and_drop_removes_everything() {
    let Some(mut lab) = lab("commands_run_inside_and_drop_removes_everything") else {
        return;
    };
    let nat = lab.add_nat("nat", NatType::Symmetric).unwrap();
    let host = lab.add_host_behind(&nat, "host").unwrap();
    let out = host
        .command("ip")
        .args(["-4", "-o", "addr", "show", "eth0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("10.1.0.2/24"));
    let out = nat
        .command("nft")
        .args(["list", "ruleset"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("masquerade random"));

    // A process left running inside is killed, so the namespace really goes. Wait until it
    // is inside (its first line), as a caller's real server would be.
    let mut sleeper = host
        .command("sh")
        .args(["-c", "echo ready; exec sleep 60"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(sleeper.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line, "ready\n");
    let names = lab.namespaces().to_vec();
    assert_eq!(names.len(), 3);
    drop(lab);
    let status = sleeper.wait().unwrap();
    assert!(!status.success());
    let listed = std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.filter_map(|e| Some(e.ok()?.file_name().to_string_lossy().into_owned()))
                .collect()
        })
        .unwrap_or_else(|_| Vec::<String>::new());
    for name in names {
        assert!(!listed.contains(&name), "{name} survived the lab");
    }
}

#[test]
fn cleanup_stale_removes_only_dead_runs() {
    let Some(lab) = lab("cleanup_stale_removes_only_dead_runs") else {
        return;
    };
    // pid 4294967295 exceeds any pid_max: a run that cannot be alive.
    let dead = "plstale4294967295-0-core";
    let ip = |args: &[&str]| {
        assert!(std::process::Command::new("ip")
            .args(args)
            .status()
            .unwrap()
            .success())
    };
    ip(&["netns", "add", dead]);
    // Removes it even if an assertion below fails (a no-op once cleanup_stale did its job).
    struct Guard(&'static str);
    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = std::process::Command::new("ip")
                .args(["netns", "del", self.0])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
    let _guard = Guard(dead);
    let live = Lab::new("plstale").unwrap();
    let removed = cleanup_stale("plstale").unwrap();
    assert_eq!(removed, vec![dead.to_owned()]);
    assert!(live
        .namespaces()
        .iter()
        .all(|n| std::path::Path::new("/var/run/netns").join(n).exists()));
    drop((live, lab));
}
