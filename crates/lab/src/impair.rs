//! Delay, jitter and loss models for the lab's user-space impairment stage, sans-IO: the
//! caller passes `now` and the packets' handles, the model says when each is released or
//! that it is dropped. All randomness comes from a seed, so tests are deterministic; the
//! NFQUEUE glue (`nfqueue.rs`) only moves verdicts.
//!
//! The figures mean what they mean in the media crate's emulator (`peerline_media::netem`),
//! so a benchmark on that emulator and one through the lab describe their paths alike:
//! a packet's delay is `delay_ms` plus a uniform draw in `0..jitter_ms`; packets overtake
//! one another when the jitter exceeds their spacing (out-of-order verdicts).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use serde::Serialize;

/// How the stage loses packets (random loss can also come from nftables, `Nat::set_loss`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(tag = "model", rename_all = "snake_case")]
pub enum LossModel {
    /// No loss in the stage.
    None,
    /// Each packet lost independently with probability `p` (0..1).
    Random { p: f64 },
    /// Gilbert-Elliott: a good state that loses nothing and a bad state that loses
    /// `loss_in_bad` of its packets; per packet, good goes bad with `p`, bad goes good with
    /// `r`. Mean loss `p / (p + r) * loss_in_bad`, mean burst `1 / r` packets.
    GilbertElliott { p: f64, r: f64, loss_in_bad: f64 },
}

impl LossModel {
    /// Bursty loss of the given mean (0..1) and mean burst length (packets), every packet
    /// of the bad state lost (the media emulator's `LossModel::bursty`).
    pub fn bursty(mean_loss: f64, mean_burst: f64) -> LossModel {
        let r = 1.0 / mean_burst.max(1.0);
        let m = mean_loss.clamp(0.0, 0.99);
        LossModel::GilbertElliott {
            p: r * m / (1.0 - m),
            r,
            loss_in_bad: 1.0,
        }
    }

    /// The long-run fraction of packets this model loses.
    pub fn mean_loss(&self) -> f64 {
        match *self {
            LossModel::None => 0.0,
            LossModel::Random { p } => p,
            LossModel::GilbertElliott { p, r, loss_in_bad } if p + r > 0.0 => {
                p / (p + r) * loss_in_bad
            }
            LossModel::GilbertElliott { .. } => 0.0,
        }
    }
}

/// What the stage does to every packet a router forwards (both directions).
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ImpairConfig {
    /// Fixed extra delay, ms.
    pub delay_ms: f64,
    /// Extra delay drawn uniformly from `0..jitter_ms` per packet, ms.
    pub jitter_ms: f64,
    /// Loss in the stage.
    pub loss: LossModel,
}

impl Default for ImpairConfig {
    fn default() -> Self {
        ImpairConfig {
            delay_ms: 0.0,
            jitter_ms: 0.0,
            loss: LossModel::None,
        }
    }
}

impl ImpairConfig {
    /// Refuses figures that make no sense (negative, not finite, probabilities outside 0..1,
    /// delays over 10 s: the stage holds packets in memory for that long).
    pub fn validate(&self) -> Result<(), String> {
        let prob = |name: &str, v: f64| {
            if (0.0..=1.0).contains(&v) {
                Ok(())
            } else {
                Err(format!("{name} {v} is not a probability (0-1)"))
            }
        };
        for (name, v) in [("delay", self.delay_ms), ("jitter", self.jitter_ms)] {
            if !(0.0..=10_000.0).contains(&v) {
                return Err(format!("{name} of {v} ms (0-10000)"));
            }
        }
        match self.loss {
            LossModel::None => Ok(()),
            LossModel::Random { p } => prob("loss", p),
            LossModel::GilbertElliott { p, r, loss_in_bad } => {
                prob("good-to-bad", p)?;
                prob("bad-to-good", r)?;
                prob("loss in the bad state", loss_in_bad)
            }
        }
    }
}

/// What to do with one packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Drop,
    /// Accept it at this time.
    ReleaseAt(Instant),
}

/// The per-packet draws of one stage.
pub struct Impairer {
    cfg: ImpairConfig,
    rng: ChaCha8Rng,
    bad: bool,
}

impl Impairer {
    /// Every draw comes from `seed`.
    pub fn new(cfg: ImpairConfig, seed: u64) -> Impairer {
        Impairer {
            cfg,
            rng: ChaCha8Rng::seed_from_u64(seed),
            bad: false,
        }
    }

    fn uniform(&mut self) -> f64 {
        // 53 random bits: uniform in [0, 1).
        (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn lost(&mut self) -> bool {
        match self.cfg.loss {
            LossModel::None => false,
            LossModel::Random { p } => self.uniform() < p,
            LossModel::GilbertElliott { p, r, loss_in_bad } => {
                let u = self.uniform();
                self.bad = if self.bad { u >= r } else { u < p };
                self.bad && self.uniform() < loss_in_bad
            }
        }
    }

    /// The fate of a packet that arrived at `now`.
    pub fn decide(&mut self, now: Instant) -> Decision {
        if self.lost() {
            return Decision::Drop;
        }
        let ms = self.cfg.delay_ms + self.uniform() * self.cfg.jitter_ms;
        Decision::ReleaseAt(now + Duration::from_secs_f64(ms.max(0.0) / 1000.0))
    }
}

/// What a stage did, for reports and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct StageStats {
    /// Packets handed to the stage.
    pub packets: u64,
    /// Dropped by the loss model.
    pub dropped: u64,
    /// Dropped because too many were held (a router queue overflowing).
    pub overflow: u64,
    /// Released (accepted) so far.
    pub released: u64,
    /// Released after a packet that arrived later.
    pub reordered: u64,
    /// Mean delay the stage added to released packets, ms (as released, scheduling included).
    pub mean_delay_ms: f64,
    /// Longest run of consecutive drops.
    pub longest_burst: u64,
}

/// Packets held until their release time, bounded. `T` is whatever identifies a packet to
/// the glue (an NFQUEUE message); tests use numbers.
pub struct Schedule<T> {
    impairer: Impairer,
    held: BinaryHeap<Reverse<Held<T>>>,
    capacity: usize,
    arrivals: u64,
    last_released: Option<u64>,
    run: u64,
    delay_sum_ms: f64,
    stats: StageStats,
}

struct Held<T> {
    at: Instant,
    order: u64,
    arrived: Instant,
    item: T,
}

// Ordered by release time, then arrival, never by the item.
impl<T> PartialEq for Held<T> {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.order) == (o.at, o.order)
    }
}
impl<T> Eq for Held<T> {}
impl<T> PartialOrd for Held<T> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<T> Ord for Held<T> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.order).cmp(&(o.at, o.order))
    }
}

impl<T> Schedule<T> {
    /// Holds at most `capacity` packets; beyond that a packet is dropped as overflow.
    pub fn new(cfg: ImpairConfig, seed: u64, capacity: usize) -> Schedule<T> {
        Schedule {
            impairer: Impairer::new(cfg, seed),
            held: BinaryHeap::new(),
            capacity,
            arrivals: 0,
            last_released: None,
            run: 0,
            delay_sum_ms: 0.0,
            stats: StageStats::default(),
        }
    }

    /// A packet arrived at `now`: held (`None`), or handed back to be dropped.
    pub fn arrive(&mut self, now: Instant, item: T) -> Option<T> {
        self.stats.packets += 1;
        let order = self.arrivals;
        self.arrivals += 1;
        match self.impairer.decide(now) {
            Decision::Drop => {
                self.stats.dropped += 1;
                self.run += 1;
                self.stats.longest_burst = self.stats.longest_burst.max(self.run);
                Some(item)
            }
            Decision::ReleaseAt(_) if self.held.len() >= self.capacity => {
                self.stats.overflow += 1;
                Some(item)
            }
            Decision::ReleaseAt(at) => {
                self.run = 0;
                self.held.push(Reverse(Held {
                    at,
                    order,
                    arrived: now,
                    item,
                }));
                None
            }
        }
    }

    /// The next packet due at or before `now`.
    pub fn release(&mut self, now: Instant) -> Option<T> {
        if self.held.peek()?.0.at > now {
            return None;
        }
        let Reverse(h) = self.held.pop()?;
        if self.last_released.is_some_and(|l| h.order < l) {
            self.stats.reordered += 1;
        }
        self.last_released = Some(self.last_released.map_or(h.order, |l| l.max(h.order)));
        self.stats.released += 1;
        self.delay_sum_ms += now.saturating_duration_since(h.arrived).as_secs_f64() * 1000.0;
        Some(h.item)
    }

    /// Everything still held, in release order (when the stage stops: accept them all).
    pub fn drain(&mut self) -> Vec<T> {
        let mut v: Vec<Held<T>> = std::mem::take(&mut self.held)
            .into_iter()
            .map(|r| r.0)
            .collect();
        v.sort();
        v.into_iter().map(|h| h.item).collect()
    }

    /// When the next held packet is due.
    pub fn next_due(&self) -> Option<Instant> {
        self.held.peek().map(|r| r.0.at)
    }

    /// Packets held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    pub fn stats(&self) -> StageStats {
        let mut s = self.stats;
        s.mean_delay_ms = if s.released == 0 {
            0.0
        } else {
            self.delay_sum_ms / s.released as f64
        };
        s
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Offers `n` packets 20 ms apart, releasing on a 1 ms clock; returns (arrival index,
    /// delay in ms) of every released packet in release order, and the stats.
    fn run(cfg: ImpairConfig, seed: u64, n: u64) -> (Vec<(u64, u64)>, StageStats) {
        let t0 = Instant::now();
        let mut s: Schedule<u64> = Schedule::new(cfg, seed, 10_000);
        let mut out = Vec::new();
        let end = n * 20 + 11_000;
        for ms in 0..end {
            let now = t0 + MS * ms as u32;
            if ms % 20 == 0 && ms / 20 < n {
                let _ = s.arrive(now, ms / 20);
            }
            while let Some(i) = s.release(now) {
                out.push((i, ms - i * 20));
            }
        }
        assert_eq!(s.held(), 0);
        (out, s.stats())
    }

    #[test]
    fn delay_and_jitter_stay_in_their_range_with_the_right_mean_and_reorder() {
        let cfg = ImpairConfig {
            delay_ms: 40.0,
            jitter_ms: 30.0,
            loss: LossModel::None,
        };
        let (out, st) = run(cfg, 7, 5_000);
        assert_eq!(out.len(), 5_000);
        assert!(
            out.iter().all(|&(_, d)| (40..=70).contains(&d)),
            "delays in 40..70"
        );
        let mean = out.iter().map(|&(_, d)| d as f64).sum::<f64>() / out.len() as f64;
        // 40 + 15 on average; the 1 ms clock rounds each release up by under 1 ms.
        assert!((54.5..56.5).contains(&mean), "mean {mean}");
        assert!((st.mean_delay_ms - mean).abs() < 0.01);
        // 30 ms of jitter over 20 ms spacing: a packet overtakes the one before it when
        // their draws differ by over 20 ms, P = 10^2 / 2 / 30^2 = 5.6 %.
        assert!(
            (150..400).contains(&st.reordered),
            "reordered {}",
            st.reordered
        );
        assert_eq!(st.reordered, count_reordered(&out));
    }

    fn count_reordered(out: &[(u64, u64)]) -> u64 {
        let mut max = None;
        let mut n = 0;
        for &(i, _) in out {
            if max.is_some_and(|m| i < m) {
                n += 1;
            }
            max = Some(max.map_or(i, |m: u64| m.max(i)));
        }
        n
    }

    #[test]
    fn no_jitter_keeps_order_and_the_exact_delay() {
        let cfg = ImpairConfig {
            delay_ms: 25.0,
            ..ImpairConfig::default()
        };
        let (out, st) = run(cfg, 1, 200);
        assert!(out.iter().all(|&(_, d)| d == 25));
        assert!(out.windows(2).all(|w| w[0].0 < w[1].0));
        assert_eq!(st.reordered, 0);
    }

    #[test]
    fn random_loss_has_its_rate_and_short_runs() {
        let cfg = ImpairConfig {
            loss: LossModel::Random { p: 0.1 },
            ..ImpairConfig::default()
        };
        let (out, st) = run(cfg, 3, 20_000);
        let rate = st.dropped as f64 / st.packets as f64;
        assert!((0.09..0.11).contains(&rate), "loss {rate}");
        assert_eq!(out.len() as u64, st.packets - st.dropped);
        assert!(st.longest_burst < 8, "burst {}", st.longest_burst);
    }

    #[test]
    fn gilbert_elliott_has_its_mean_loss_and_long_bursts() {
        let model = LossModel::bursty(0.05, 3.0);
        assert!((model.mean_loss() - 0.05).abs() < 1e-9);
        let cfg = ImpairConfig {
            loss: model,
            ..ImpairConfig::default()
        };
        let (out, st) = run(cfg, 11, 40_000);
        let rate = st.dropped as f64 / st.packets as f64;
        assert!((0.04..0.06).contains(&rate), "loss {rate}");
        // Mean burst 3: runs of 10 happen in 40,000 packets; random 5 % loss almost
        // never gives one (0.05^10).
        assert!(st.longest_burst >= 10, "burst {}", st.longest_burst);
        // Mean run length of the losses, from the arrival indices that are missing.
        let mut got = vec![false; 40_000];
        for &(i, _) in &out {
            got[i as usize] = true;
        }
        let (mut runs, mut lost, mut inside) = (0u64, 0u64, false);
        for g in got {
            if !g {
                lost += 1;
                if !inside {
                    runs += 1;
                }
            }
            inside = !g;
        }
        let mean_run = lost as f64 / runs as f64;
        assert!((2.5..3.6).contains(&mean_run), "mean burst {mean_run}");
    }

    #[test]
    fn the_same_seed_gives_the_same_fates_and_another_seed_does_not() {
        let cfg = ImpairConfig {
            delay_ms: 10.0,
            jitter_ms: 50.0,
            loss: LossModel::bursty(0.1, 2.0),
        };
        assert_eq!(run(cfg, 5, 500), run(cfg, 5, 500));
        assert_ne!(run(cfg, 5, 500).0, run(cfg, 6, 500).0);
    }

    #[test]
    fn the_schedule_is_bounded_and_drains_in_release_order() {
        let cfg = ImpairConfig {
            delay_ms: 100.0,
            jitter_ms: 100.0,
            loss: LossModel::None,
        };
        let t0 = Instant::now();
        let mut s: Schedule<u32> = Schedule::new(cfg, 9, 3);
        for i in 0..5 {
            let back = s.arrive(t0, i);
            assert_eq!(back.is_some(), i >= 3, "packet {i}");
        }
        assert_eq!(s.stats().overflow, 2);
        assert_eq!(s.release(t0), None, "nothing due yet");
        let due = s.next_due().unwrap();
        assert!(due >= t0 + MS * 100 && due < t0 + MS * 200);
        let mut drained = s.drain();
        assert_eq!(drained.len(), 3);
        drained.sort();
        assert_eq!(drained, vec![0, 1, 2]);
        assert_eq!(s.held(), 0);
    }

    #[test]
    fn nonsense_figures_are_refused() {
        let ok = ImpairConfig {
            delay_ms: 40.0,
            jitter_ms: 30.0,
            loss: LossModel::bursty(0.05, 3.0),
        };
        assert!(ok.validate().is_ok());
        for bad in [
            ImpairConfig {
                delay_ms: -1.0,
                ..ok
            },
            ImpairConfig {
                jitter_ms: f64::NAN,
                ..ok
            },
            ImpairConfig {
                loss: LossModel::Random { p: 1.5 },
                ..ok
            },
            ImpairConfig {
                loss: LossModel::GilbertElliott {
                    p: 0.1,
                    r: -0.1,
                    loss_in_bad: 1.0,
                },
                ..ok
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
