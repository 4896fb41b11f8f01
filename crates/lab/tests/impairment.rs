//! The NFQUEUE impairment stage delays, jitters and drops what a router forwards roughly as
//! asked. Real packets through real namespaces, timed with the wall clock, so the bounds
//! leave room for a loaded machine. Needs root, nftables and iptables; without them these
//! tests fail, unless PEERLINE_LAB_SKIP=1 is set (then they say why and return).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use peerline_lab::{check_environment, Host, ImpairConfig, Lab, LossModel, NatType};
use std::net::UdpSocket;
use std::time::{Duration, Instant};

const PREFIX: &str = "pltest";

fn lab(test: &str) -> Option<Lab> {
    if let Err(e) = check_environment().require_iptables() {
        if std::env::var("PEERLINE_LAB_SKIP").as_deref() == Ok("1") {
            eprintln!("SKIPPED {test}: {e} (PEERLINE_LAB_SKIP=1)");
            return None;
        }
        panic!("{test}: {e}. The NAT lab tests need root, nftables and iptables; set PEERLINE_LAB_SKIP=1 to skip them.");
    }
    Some(Lab::new(PREFIX).expect("building the lab"))
}

/// What arrived of `n` numbered packets sent every `gap` from `from` to `to`'s port 5000:
/// per packet, its one-way delay when it arrived; and the arrival order.
struct Trace {
    delay: Vec<Option<Duration>>,
    order: Vec<u32>,
}

impl Trace {
    fn loss(&self) -> f64 {
        self.delay.iter().filter(|d| d.is_none()).count() as f64 / self.delay.len() as f64
    }
    fn delays_ms(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .delay
            .iter()
            .flatten()
            .map(|d| d.as_secs_f64() * 1000.0)
            .collect();
        v.sort_by(f64::total_cmp);
        v
    }
    fn reordered(&self) -> usize {
        let mut max = None;
        self.order
            .iter()
            .filter(|&&i| {
                let late = max.is_some_and(|m| i < m);
                max = Some(max.map_or(i, |m: u32| m.max(i)));
                late
            })
            .count()
    }
    /// Mean length of runs of consecutive lost packets.
    fn mean_burst(&self) -> f64 {
        let (mut runs, mut lost, mut inside) = (0, 0, false);
        for d in &self.delay {
            if d.is_none() {
                lost += 1;
                runs += usize::from(!inside);
            }
            inside = d.is_none();
        }
        lost as f64 / runs.max(1) as f64
    }
}

fn send(from: &Host, to: &Host, n: u32, gap: Duration) -> Trace {
    let rx = to.udp_bind(5000).unwrap();
    rx.set_read_timeout(Some(Duration::from_millis(400)))
        .unwrap();
    let tx: UdpSocket = from.udp_bind(0).unwrap();
    let dest = to.socket_addr(5000);
    let receiver = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 64];
        while let Ok(len) = rx.recv(&mut buf) {
            if len == 4 {
                got.push((
                    u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]),
                    Instant::now(),
                ));
            }
        }
        got
    });
    let start = Instant::now();
    let mut sent = Vec::new();
    for i in 0..n {
        // Paced against the start, so a late wake-up does not stretch the whole run.
        let due = start + gap * i;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        sent.push(Instant::now());
        tx.send_to(&i.to_be_bytes(), dest).unwrap();
    }
    let got = receiver.join().unwrap();
    let mut delay = vec![None; n as usize];
    for &(i, at) in &got {
        if let Some(d) = delay.get_mut(i as usize) {
            *d = Some(at.duration_since(sent[i as usize]));
        }
    }
    Trace {
        delay,
        order: got.iter().map(|g| g.0).collect(),
    }
}

fn pair(lab: &mut Lab) -> (peerline_lab::Nat, Host, Host) {
    let server = lab.add_public_host("server").unwrap();
    let nat = lab.add_nat("router", NatType::Public).unwrap();
    let host = lab.add_host_behind(&nat, "host").unwrap();
    (nat, host, server)
}

#[test]
fn the_stage_delays_jitters_and_drops_as_asked_then_stops_cleanly() {
    let Some(mut lab) = lab("the_stage_delays_jitters_and_drops_as_asked_then_stops_cleanly")
    else {
        return;
    };
    let (nat, host, server) = pair(&mut lab);
    let cfg = ImpairConfig {
        delay_ms: 30.0,
        jitter_ms: 20.0,
        loss: LossModel::Random { p: 0.1 },
    };
    lab.set_impairment(&nat, cfg, 1).unwrap();
    let t = send(&host, &server, 600, Duration::from_millis(4));
    let d = t.delays_ms();
    let (min, median, p95) = (d[0], d[d.len() / 2], d[d.len() * 95 / 100]);
    eprintln!(
        "asked 30 + 0..20 ms, 10 % loss: loss {:.3}, delay min {min:.1} median {median:.1} p95 {p95:.1} ms, {} reordered",
        t.loss(),
        t.reordered()
    );
    assert!((0.05..0.15).contains(&t.loss()), "loss {}", t.loss());
    assert!(min >= 29.0, "nothing overtakes the fixed delay: min {min}");
    // Uniform 30..50: median 40; scheduling on a busy machine adds a little.
    assert!((36.0..55.0).contains(&median), "median {median}");
    assert!(p95 < 90.0, "p95 {p95}");
    // 20 ms of jitter over 4 ms spacing: out-of-order verdicts reorder.
    assert!(t.reordered() > 30, "reordered {}", t.reordered());
    let live = lab.impairment_stats(&nat).unwrap();
    assert!(
        live.packets >= 600,
        "the stage saw {} packets",
        live.packets
    );

    let stats = lab.clear_impairment(&nat).unwrap().unwrap();
    assert_eq!(
        stats.packets,
        stats.dropped + stats.released + stats.overflow
    );
    assert_eq!(stats.overflow, 0);
    assert!((35.0..55.0).contains(&stats.mean_delay_ms), "{stats:?}");
    assert!(lab.impairment_stats(&nat).is_none());
    let rule = nat
        .command("iptables")
        .args(["-t", "mangle", "-S", "FORWARD"])
        .output()
        .unwrap();
    assert!(
        !String::from_utf8_lossy(&rule.stdout).contains("NFQUEUE"),
        "the rule is gone"
    );

    // Without the stage: nothing lost, prompt, in order.
    let t = send(&host, &server, 100, Duration::from_millis(2));
    let d = t.delays_ms();
    assert_eq!(t.loss(), 0.0);
    assert!(d[d.len() / 2] < 10.0, "median {}", d[d.len() / 2]);
    assert_eq!(t.reordered(), 0);
}

#[test]
fn gilbert_elliott_loss_comes_in_bursts() {
    let Some(mut lab) = lab("gilbert_elliott_loss_comes_in_bursts") else {
        return;
    };
    let (nat, host, server) = pair(&mut lab);
    let cfg = ImpairConfig {
        loss: LossModel::bursty(0.1, 4.0),
        ..ImpairConfig::default()
    };
    lab.set_impairment(&nat, cfg, 2).unwrap();
    let t = send(&host, &server, 2000, Duration::from_millis(1));
    eprintln!(
        "asked 10 % loss in bursts of 4: loss {:.3}, mean burst {:.2}",
        t.loss(),
        t.mean_burst()
    );
    assert!((0.05..0.16).contains(&t.loss()), "loss {}", t.loss());
    // Independent 10 % loss would give runs of about 1.1.
    assert!(t.mean_burst() > 2.5, "mean burst {}", t.mean_burst());
    let stats = lab.clear_impairment(&nat).unwrap().unwrap();
    assert!(stats.longest_burst >= 8, "{stats:?}");
}

#[test]
fn a_running_stage_goes_with_the_lab() {
    let Some(mut lab) = lab("a_running_stage_goes_with_the_lab") else {
        return;
    };
    let (nat, _, _) = pair(&mut lab);
    lab.set_impairment(
        &nat,
        ImpairConfig {
            delay_ms: 10.0,
            ..ImpairConfig::default()
        },
        3,
    )
    .unwrap();
    // Replacing a stage stops the old one first.
    lab.set_impairment(
        &nat,
        ImpairConfig {
            delay_ms: 20.0,
            ..ImpairConfig::default()
        },
        4,
    )
    .unwrap();
    let names = lab.namespaces().to_vec();
    drop(lab);
    let left = std::fs::read_dir("/var/run/netns")
        .map(|d| {
            d.flatten()
                .filter(|e| names.iter().any(|n| e.file_name() == n.as_str()))
                .count()
        })
        .unwrap_or(0);
    assert_eq!(left, 0, "namespaces left behind");
    // (Dropping the lab joined the stage threads: `Stage`'s drop waits for its thread.)
}
