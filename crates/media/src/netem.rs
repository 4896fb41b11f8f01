//! A seeded network emulator on virtual time: loss (random or bursty), delay with jitter,
//! duplication and reordering. One instance models one direction of a path.
//!
//! The same [`ChannelConfig`] drives the quality harness, so a benchmark on the emulator
//! and one through the network namespaces later can be described with the same figures.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::{Deserialize, Serialize};

/// How packets are lost.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "model", rename_all = "snake_case")]
pub enum LossModel {
    /// Each packet lost independently with this probability.
    Random {
        /// Loss probability (0..1).
        p: f64,
    },
    /// Gilbert-Elliott: a good state without loss and a bad state that loses
    /// `loss_in_bad` of its packets. The mean loss is `p / (p + r) * loss_in_bad`.
    Bursty {
        /// Probability of moving from good to bad per packet.
        p: f64,
        /// Probability of moving from bad to good per packet (1 / mean burst length).
        r: f64,
        /// Loss probability in the bad state.
        loss_in_bad: f64,
    },
}

impl LossModel {
    /// Bursty loss with the given mean loss and mean burst length (in packets), all
    /// packets lost in the bad state.
    pub fn bursty(mean_loss: f64, mean_burst: f64) -> LossModel {
        let r = 1.0 / mean_burst.max(1.0);
        let m = mean_loss.clamp(0.0, 0.99);
        LossModel::Bursty {
            p: r * m / (1.0 - m),
            r,
            loss_in_bad: 1.0,
        }
    }
}

/// One direction of an emulated path.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ChannelConfig {
    /// Loss process.
    pub loss: LossModel,
    /// Fixed one-way delay, ms.
    pub delay_ms: f64,
    /// Extra delay drawn uniformly from 0 to this, per packet, ms (the peak-to-peak spread;
    /// packets overtake one another when it exceeds the packet interval).
    pub jitter_ms: f64,
    /// Probability that a delivered packet is delivered twice (the copy with its own delay).
    pub duplicate: f64,
}

impl Default for ChannelConfig {
    fn default() -> Self {
        ChannelConfig {
            loss: LossModel::Random { p: 0.0 },
            delay_ms: 40.0,
            jitter_ms: 0.0,
            duplicate: 0.0,
        }
    }
}

/// What the emulator did, for reports and test assertions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ChannelStats {
    /// Packets offered.
    pub sent: u64,
    /// Packets dropped.
    pub lost: u64,
    /// Extra copies made.
    pub duplicated: u64,
    /// Packets delivered (copies included).
    pub delivered: u64,
    /// Packets delivered after one sent later.
    pub reordered: u64,
    /// Mean one-way delay of delivered packets, ms.
    pub mean_delay_ms: f64,
    /// Longest run of consecutive losses.
    pub longest_burst: u64,
}

/// One direction of an emulated path.
pub struct Channel {
    cfg: ChannelConfig,
    rng: ChaCha8Rng,
    bad: bool,
    run: u64,
    order: u64,
    last_delivered_order: Option<u64>,
    in_flight: BinaryHeap<Reverse<(Instant, u64, Vec<u8>)>>,
    delay_sum_ms: f64,
    stats: ChannelStats,
}

/// Most packets in flight; more are dropped (a router queue, and a bound on memory).
const MAX_IN_FLIGHT: usize = 10_000;

impl Channel {
    /// A channel whose every random choice comes from `seed`.
    pub fn new(cfg: ChannelConfig, seed: u64) -> Channel {
        Channel {
            cfg,
            rng: ChaCha8Rng::seed_from_u64(seed),
            bad: false,
            run: 0,
            order: 0,
            last_delivered_order: None,
            in_flight: BinaryHeap::new(),
            delay_sum_ms: 0.0,
            stats: ChannelStats::default(),
        }
    }

    fn uniform(&mut self) -> f64 {
        // 53 random bits: uniform in [0, 1).
        (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn lost(&mut self) -> bool {
        match self.cfg.loss {
            LossModel::Random { p } => self.uniform() < p,
            LossModel::Bursty { p, r, loss_in_bad } => {
                let u = self.uniform();
                self.bad = if self.bad { u >= r } else { u < p };
                self.bad && self.uniform() < loss_in_bad
            }
        }
    }

    fn schedule(&mut self, now: Instant, payload: Vec<u8>) {
        let delay = self.cfg.delay_ms + self.uniform() * self.cfg.jitter_ms;
        let at = now + Duration::from_secs_f64(delay.max(0.0) / 1000.0);
        self.delay_sum_ms += delay;
        if self.in_flight.len() < MAX_IN_FLIGHT {
            self.in_flight.push(Reverse((at, self.order, payload)));
        }
        self.order += 1;
    }

    /// Changes the path's behaviour from now on (packets in flight keep their delay).
    pub fn set_config(&mut self, cfg: ChannelConfig) {
        self.cfg = cfg;
    }

    /// Offers a packet to the path at `now`.
    pub fn send(&mut self, now: Instant, payload: Vec<u8>) {
        self.stats.sent += 1;
        if self.lost() {
            self.stats.lost += 1;
            self.run += 1;
            self.stats.longest_burst = self.stats.longest_burst.max(self.run);
            return;
        }
        self.run = 0;
        let dup = self.cfg.duplicate > 0.0 && self.uniform() < self.cfg.duplicate;
        if dup {
            self.stats.duplicated += 1;
            self.schedule(now, payload.clone());
        }
        self.schedule(now, payload);
    }

    /// The next packet due at or before `now`, if any.
    pub fn recv(&mut self, now: Instant) -> Option<Vec<u8>> {
        let Reverse((at, _, _)) = self.in_flight.peek()?;
        if *at > now {
            return None;
        }
        let Reverse((_, order, payload)) = self.in_flight.pop()?;
        if self.last_delivered_order.is_some_and(|l| order < l) {
            self.stats.reordered += 1;
        }
        self.last_delivered_order = Some(self.last_delivered_order.map_or(order, |l| l.max(order)));
        self.stats.delivered += 1;
        Some(payload)
    }

    /// When the next packet becomes due.
    pub fn next_due(&self) -> Option<Instant> {
        self.in_flight.peek().map(|Reverse((at, _, _))| *at)
    }

    /// What happened so far.
    pub fn stats(&self) -> ChannelStats {
        let mut s = self.stats;
        let scheduled = self.stats.sent - self.stats.lost + self.stats.duplicated;
        s.mean_delay_ms = if scheduled == 0 {
            0.0
        } else {
            self.delay_sum_ms / scheduled as f64
        };
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(cfg: ChannelConfig, n: u64, seed: u64) -> (Channel, Vec<u64>) {
        let t0 = Instant::now();
        let mut ch = Channel::new(cfg, seed);
        let mut got = Vec::new();
        for i in 0..n {
            let now = t0 + Duration::from_millis(i * 20);
            ch.send(now, i.to_be_bytes().to_vec());
            while let Some(p) = ch.recv(now) {
                got.push(u64::from_be_bytes(p.try_into().unwrap_or([0; 8])));
            }
        }
        while let Some(p) = ch.recv(t0 + Duration::from_secs(n)) {
            got.push(u64::from_be_bytes(p.try_into().unwrap_or([0; 8])));
        }
        (ch, got)
    }

    #[test]
    fn random_loss_matches_its_rate_and_is_deterministic() {
        let cfg = ChannelConfig {
            loss: LossModel::Random { p: 0.1 },
            ..ChannelConfig::default()
        };
        let (ch, got) = run(cfg, 10_000, 7);
        let loss = ch.stats().lost as f64 / 10_000.0;
        assert!((0.09..0.11).contains(&loss), "loss {loss}");
        assert_eq!(got.len() as u64, ch.stats().delivered);
        let (_, again) = run(cfg, 10_000, 7);
        assert_eq!(got, again, "same seed, same fate");
    }

    #[test]
    fn bursty_loss_has_its_mean_and_longer_runs() {
        let (ch, _) = run(
            ChannelConfig {
                loss: LossModel::bursty(0.05, 3.0),
                ..ChannelConfig::default()
            },
            20_000,
            3,
        );
        let loss = ch.stats().lost as f64 / 20_000.0;
        assert!((0.04..0.06).contains(&loss), "loss {loss}");
        assert!(
            ch.stats().longest_burst >= 6,
            "burst {}",
            ch.stats().longest_burst
        );
    }

    #[test]
    fn jitter_reorders_and_duplicates_are_made() {
        let (ch, got) = run(
            ChannelConfig {
                jitter_ms: 60.0,
                duplicate: 0.05,
                ..ChannelConfig::default()
            },
            2000,
            1,
        );
        let s = ch.stats();
        assert!(s.reordered > 100, "reordered {}", s.reordered);
        assert!(s.duplicated > 50, "duplicated {}", s.duplicated);
        assert_eq!(got.len() as u64, 2000 + s.duplicated);
        assert!(
            (60.0..80.0).contains(&s.mean_delay_ms),
            "mean delay {}",
            s.mean_delay_ms
        );
    }
}
