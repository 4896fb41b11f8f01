//! The sending half: Opus encoding, packetisation with redundancy, and the rate controller
//! that sets bitrate, FEC and redundancy depth from the loss and round-trip time the peer
//! reports.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};

use crate::codec::{
    is_dtx_frame, Bandwidth, Encoder, EncoderSettings, Frame, FRAME_MS, FRAME_SAMPLES,
};
use crate::packet::{MediaPacket, Redundant, FLAG_DTX, FLAG_FEC, MAX_REDUNDANT, MEDIA_BUDGET};
use crate::MediaError;

/// One rung of the rate ladder: what to send while measured loss stays below `max_loss`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Tier {
    /// Upper bound of measured loss (fraction) for this tier.
    pub max_loss: f64,
    /// Opus bitrate, bits per second.
    pub bitrate: i32,
    /// Redundant copies of earlier frames in each packet.
    pub red_depth: usize,
    /// Opus in-band FEC.
    pub fec: bool,
}

/// How the sender adapts to the path.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RatePolicy {
    /// Tiers by increasing loss; the last one applies above all bounds.
    pub tiers: Vec<Tier>,
    /// Tier used before the first report.
    pub initial_tier: usize,
    /// Loss is measured over this window of reports, ms.
    pub loss_window_ms: u64,
    /// A lower tier is taken only after this long without a raise, ms.
    pub hold_ms: u64,
    /// Above this round-trip time the bitrate is capped at `high_rtt_bitrate`.
    pub high_rtt_ms: f64,
    /// Bitrate cap on a long path (long paths are often congested; less to queue).
    pub high_rtt_bitrate: i32,
    /// Under bursty loss, copies per packet = mean loss run × this (within the tier's depth
    /// and [`MAX_REDUNDANT`]).
    pub burst_factor: f64,
    /// Mean loss run (packets) from which loss counts as bursty. Random loss of p gives
    /// runs of 1 / (1 - p) on average: 1.11 at 10 %.
    pub burst_threshold: f64,
    /// Lowest Opus bitrate when bursty loss takes bitrate for copies.
    pub min_bitrate: i32,
    /// Highest coded audio bandwidth. Wide band by default: at 16 to 64 kb/s the bits go
    /// where speech is, and PESQ (P.862.2) scores that band; a clean path with the cap
    /// lifted to full band scored lower (see docs/benchmarks.md).
    pub max_bandwidth: Bandwidth,
}

impl Default for RatePolicy {
    fn default() -> Self {
        // A clean path gets the full 64 kb/s and no redundancy; from about 1.5 % loss, copies
        // of earlier frames (which recover a loss exactly, unlike Opus FEC's coarser
        // copy) replace bitrate. Opus FEC is used only where one copy would cost too much.
        RatePolicy {
            tiers: vec![
                Tier {
                    max_loss: 0.003,
                    bitrate: 64_000,
                    red_depth: 0,
                    fec: false,
                },
                Tier {
                    max_loss: 0.015,
                    bitrate: 48_000,
                    red_depth: 0,
                    fec: true,
                },
                Tier {
                    max_loss: 0.05,
                    bitrate: 32_000,
                    red_depth: 1,
                    fec: false,
                },
                Tier {
                    max_loss: 0.16,
                    bitrate: 24_000,
                    red_depth: 2,
                    fec: false,
                },
                Tier {
                    max_loss: 0.30,
                    bitrate: 20_000,
                    red_depth: 3,
                    fec: false,
                },
                Tier {
                    max_loss: 1.0,
                    bitrate: 16_000,
                    red_depth: 4,
                    fec: false,
                },
            ],
            initial_tier: 0,
            loss_window_ms: 2000,
            hold_ms: 5000,
            high_rtt_ms: 400.0,
            high_rtt_bitrate: 32_000,
            burst_factor: 1.3,
            burst_threshold: 1.6,
            min_bitrate: 16_000,
            max_bandwidth: Bandwidth::Wideband,
        }
    }
}

/// What the sender has done so far.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SendStats {
    /// 20 ms frames captured.
    pub frames_captured: u64,
    /// Media packets produced.
    pub packets_sent: u64,
    /// Bytes of media packets produced (redundancy included, encryption excluded).
    pub bytes_sent: u64,
    /// Bytes of primary Opus frames alone.
    pub opus_bytes: u64,
    /// Silent frames not sent (DTX).
    pub frames_dtx_skipped: u64,
    /// Packets dropped because the integrator did not poll them in time.
    pub packets_overflowed: u64,
    /// Current Opus bitrate, bits per second.
    pub bitrate: i32,
    /// Current redundancy depth.
    pub red_depth: usize,
    /// Opus in-band FEC on.
    pub fec: bool,
    /// Loss of our media the peer reports, measured over the policy's window.
    pub peer_loss: f64,
    /// Frames the peer had to conceal (after recovery), fraction, last report.
    pub peer_residual_loss: f64,
    /// Tier changes made.
    pub tier_changes: u64,
}

#[derive(Debug, Clone)]
struct Sent {
    idx: u64,
    opus: Vec<u8>,
}

/// Most receiver reports kept for the loss window.
const MAX_REPORTS: usize = 256;

/// Most packets waiting for `poll_transmit`; older ones are dropped (stale audio is useless).
const MAX_QUEUED: usize = 16;

/// Encodes captured audio into media packets.
pub struct MediaSender {
    encoder: Encoder,
    policy: RatePolicy,
    tier: usize,
    /// Redundant copies per packet now (the tier's, or more under bursty loss).
    depth: usize,
    last_raise_ms: u64,
    seq: u16,
    frame_idx: u64,
    history: VecDeque<Sent>,
    last_sent_dtx: bool,
    queue: VecDeque<Vec<u8>>,
    /// (time ms, highest extended seq, received) from the peer's reports.
    reports: VecDeque<(u64, u64, u64)>,
    highest_report_seq: Option<u64>,
    stats: SendStats,
}

impl MediaSender {
    /// A sender at the policy's initial tier.
    pub fn new(policy: RatePolicy) -> Result<MediaSender, MediaError> {
        if policy.tiers.is_empty() {
            return Err(MediaError::Config("rate policy has no tiers".into()));
        }
        let tier = policy.initial_tier.min(policy.tiers.len() - 1);
        let t = policy.tiers[tier];
        let encoder = Encoder::new(EncoderSettings {
            bitrate: t.bitrate,
            fec: t.fec,
            // Until the peer reports, expect the tier's upper bound of loss.
            loss_percent: (t.max_loss * 100.0).round() as i32,
            max_bandwidth: policy.max_bandwidth,
        })?;
        let mut s = MediaSender {
            encoder,
            policy,
            tier,
            depth: t.red_depth.min(MAX_REDUNDANT),
            last_raise_ms: 0,
            seq: 0,
            frame_idx: 0,
            history: VecDeque::new(),
            last_sent_dtx: false,
            queue: VecDeque::new(),
            reports: VecDeque::new(),
            highest_report_seq: None,
            stats: SendStats::default(),
        };
        s.set_stats_tier();
        Ok(s)
    }

    fn set_stats_tier(&mut self) {
        let t = self.policy.tiers[self.tier];
        self.stats.bitrate = self.encoder.settings().bitrate;
        self.stats.red_depth = self.depth;
        self.stats.fec = t.fec;
    }

    /// Encoder lookahead in samples.
    pub fn lookahead(&self) -> usize {
        self.encoder.lookahead()
    }

    /// Statistics so far.
    pub fn stats(&self) -> SendStats {
        self.stats.clone()
    }

    /// Encodes one captured 20 ms frame and queues its packet (none in DTX silence).
    pub fn push(&mut self, pcm: &Frame) -> Result<(), MediaError> {
        let opus = self.encoder.encode(pcm)?;
        let idx = self.frame_idx;
        self.frame_idx += 1;
        self.stats.frames_captured += 1;
        let dtx = is_dtx_frame(&opus);
        if dtx && self.last_sent_dtx {
            self.stats.frames_dtx_skipped += 1;
            return Ok(());
        }
        self.last_sent_dtx = dtx;
        let depth = self.depth;
        let mut flags = 0;
        if dtx {
            flags |= FLAG_DTX;
        }
        if self.encoder.settings().fec {
            flags |= FLAG_FEC;
        }
        let mut pkt = MediaPacket {
            flags,
            seq: self.seq,
            // The RTP-style timestamp wraps every 24.8 hours; the receiver extends it.
            timestamp: (idx.wrapping_mul(FRAME_SAMPLES as u64) & 0xFFFF_FFFF) as u32,
            redundant: Vec::with_capacity(depth),
            opus,
        };
        let mut size = pkt.len();
        // Copies of the previous packets in order (the receiver derives their sequence
        // numbers from their position), as many as the depth and the size budget allow.
        for prev in self.history.iter().rev().take(depth) {
            let Ok(distance) = u8::try_from(idx - prev.idx) else {
                break;
            };
            let add = crate::packet::RED_BLOCK_HEADER + prev.opus.len();
            if size + add > MEDIA_BUDGET {
                break;
            }
            size += add;
            pkt.redundant.push(Redundant {
                distance,
                opus: prev.opus.clone(),
            });
        }
        self.seq = self.seq.wrapping_add(1);
        let mut out = Vec::with_capacity(size);
        pkt.encode(&mut out);
        self.stats.packets_sent += 1;
        self.stats.bytes_sent += out.len() as u64;
        self.stats.opus_bytes += pkt.opus.len() as u64;
        self.history.push_back(Sent {
            idx,
            opus: pkt.opus,
        });
        while self.history.len() > MAX_REDUNDANT {
            self.history.pop_front();
        }
        if self.queue.len() >= MAX_QUEUED {
            self.queue.pop_front();
            self.stats.packets_overflowed += 1;
        }
        self.queue.push_back(out);
        Ok(())
    }

    /// Next media packet to send, oldest first.
    pub fn poll_transmit(&mut self) -> Option<Vec<u8>> {
        self.queue.pop_front()
    }

    /// Takes in the peer's report on our media: measures loss and moves along the ladder.
    pub fn on_report(
        &mut self,
        now_ms: u64,
        highest_seq: u32,
        received: u32,
        residual: f64,
        loss_run: f64,
        rtt_ms: Option<f64>,
    ) -> Result<(), MediaError> {
        self.stats.peer_residual_loss = residual;
        if received == 0 {
            // The peer has heard nothing yet: its highest sequence number means nothing.
            return Ok(());
        }
        let ext = match self.highest_report_seq {
            None => u64::from(highest_seq) + (1 << 32),
            Some(h) => crate::jitter::extend_near(h, u64::from(highest_seq), 32),
        };
        self.highest_report_seq = Some(self.highest_report_seq.map_or(ext, |h| h.max(ext)));
        // Received counts are cumulative; extend them the same way off the last one.
        let recv = match self.reports.back() {
            None => u64::from(received) + (1 << 32),
            Some(&(_, _, r)) => crate::jitter::extend_near(r, u64::from(received), 32),
        };
        self.reports.push_back((now_ms, ext, recv));
        // Reports come every 100 ms; a peer sending them faster cannot grow this.
        if self.reports.len() > MAX_REPORTS {
            self.reports.pop_front();
        }
        while self.reports.len() > 2
            && self
                .reports
                .front()
                .is_some_and(|&(t, _, _)| now_ms.saturating_sub(t) > self.policy.loss_window_ms)
        {
            self.reports.pop_front();
        }
        let (Some(&(_, s0, r0)), Some(&(_, s1, r1))) = (self.reports.front(), self.reports.back())
        else {
            return Ok(());
        };
        let expected = s1.saturating_sub(s0);
        if expected < 10 {
            return Ok(());
        }
        let got = r1.saturating_sub(r0).min(expected);
        let loss = 1.0 - got as f64 / expected as f64;
        self.stats.peer_loss = loss;
        let want = self
            .policy
            .tiers
            .iter()
            .position(|t| loss < t.max_loss)
            .unwrap_or(self.policy.tiers.len() - 1);
        let mut tier = self.tier;
        if want > self.tier {
            tier = want;
            self.last_raise_ms = now_ms;
        } else if want < self.tier
            && now_ms.saturating_sub(self.last_raise_ms) >= self.policy.hold_ms
        {
            tier = self.tier - 1;
            self.last_raise_ms = now_ms;
        }
        let t = self.policy.tiers[tier];
        // Bursty loss: once the tier sends copies at all, send enough to span a typical
        // run of losses, paid for out of the Opus bitrate.
        let depth = if t.red_depth > 0 && loss_run >= self.policy.burst_threshold {
            let burst = (loss_run * self.policy.burst_factor).round() as usize;
            burst.clamp(t.red_depth, MAX_REDUNDANT)
        } else {
            t.red_depth.min(MAX_REDUNDANT)
        };
        let mut bitrate = t.bitrate;
        if depth > t.red_depth {
            let scaled = i64::from(t.bitrate) * (1 + t.red_depth as i64) / (1 + depth as i64);
            bitrate = i32::try_from(scaled)
                .unwrap_or(t.bitrate)
                .max(self.policy.min_bitrate);
        }
        if rtt_ms.is_some_and(|r| r > self.policy.high_rtt_ms) {
            bitrate = bitrate.min(self.policy.high_rtt_bitrate);
        }
        let settings = EncoderSettings {
            bitrate,
            fec: t.fec,
            loss_percent: (loss * 100.0).round() as i32,
            max_bandwidth: self.policy.max_bandwidth,
        };
        if tier != self.tier {
            self.stats.tier_changes += 1;
        }
        self.tier = tier;
        self.depth = depth;
        if settings != self.encoder.settings() {
            self.encoder.apply(settings)?;
        }
        self.set_stats_tier();
        Ok(())
    }

    /// Milliseconds of audio captured.
    pub fn captured_ms(&self) -> u64 {
        self.frame_idx * FRAME_MS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Feeds reports claiming `loss` over 3 s (one every 100 ms, 5 packets each).
    fn report(s: &mut MediaSender, start_ms: u64, loss: f64, run: f64) -> Result<(), MediaError> {
        for i in 0..30u64 {
            let sent = (i + 1) * 5;
            let got = (sent as f64 * (1.0 - loss)).round() as u32;
            s.on_report(start_ms + i * 100, sent as u32, got, 0.0, run, Some(50.0))?;
        }
        Ok(())
    }

    #[test]
    fn random_loss_takes_the_tier_depth() -> Result<(), MediaError> {
        let mut s = MediaSender::new(RatePolicy::default())?;
        report(&mut s, 0, 0.10, 1.1)?;
        let st = s.stats();
        assert_eq!((st.red_depth, st.bitrate, st.fec), (2, 24_000, false));
        assert!((st.peer_loss - 0.10).abs() < 0.01, "{}", st.peer_loss);
        Ok(())
    }

    #[test]
    fn bursty_loss_spreads_more_copies_at_a_lower_bitrate() -> Result<(), MediaError> {
        let mut s = MediaSender::new(RatePolicy::default())?;
        report(&mut s, 0, 0.05, 3.0)?;
        let st = s.stats();
        assert_eq!(st.red_depth, MAX_REDUNDANT);
        assert_eq!(st.bitrate, 16_000);
        Ok(())
    }

    #[test]
    fn low_loss_uses_opus_fec_and_a_long_path_caps_the_bitrate() -> Result<(), MediaError> {
        let mut s = MediaSender::new(RatePolicy::default())?;
        for i in 0..30u64 {
            let sent = (i + 1) * 200;
            s.on_report(
                i * 100,
                sent as u32,
                (sent - sent / 100) as u32,
                0.0,
                1.0,
                Some(500.0),
            )?;
        }
        let st = s.stats();
        assert!(st.fec && st.red_depth == 0, "{st:?}");
        assert_eq!(
            st.bitrate, 32_000,
            "48 kb/s tier capped for a 500 ms round trip"
        );
        Ok(())
    }

    #[test]
    fn packets_stay_within_budget_at_the_deepest_tier() -> Result<(), MediaError> {
        let mut s = MediaSender::new(RatePolicy::default())?;
        report(&mut s, 0, 0.5, 4.0)?;
        let loud: Frame = std::array::from_fn(|i| if i % 2 == 0 { 20_000 } else { -20_000 });
        for _ in 0..20 {
            s.push(&loud)?;
        }
        let mut n = 0;
        while let Some(p) = s.poll_transmit() {
            assert!(p.len() <= MEDIA_BUDGET);
            n += 1;
        }
        assert_eq!(n, 16, "the queue keeps the newest 16 packets");
        assert_eq!(s.stats().packets_overflowed, 4);
        Ok(())
    }
}
