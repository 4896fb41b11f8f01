//! Adaptive jitter buffer with loss recovery and concealment.
//!
//! Frames are keyed by their capture index (timestamp / 960). Each received packet fills
//! its own slot and, from its redundant copies, any earlier slot still empty. Playout runs
//! at one frame per [`JitterBuffer::pull`], and for each frame takes the first of:
//! 1. the frame itself (sent, or a redundant copy that arrived in a later packet),
//! 2. comfort noise when the sender was silent (DTX: the next packet's sequence number
//!    follows the last one played, so nothing was lost),
//! 3. the next packet's in-band FEC (Opus LBRR),
//! 4. Opus packet loss concealment.
//!
//! The playout delay is measured against each frame's earliest possible arrival: the
//! minimum transit time over a sliding window. Its target is a high quantile of the transit
//! spread over that window, plus the frames of lookahead that redundancy needs; it rises at
//! once when a packet comes later than the target allows and decays slowly when the network
//! calms. The buffer reaches a higher target by playing a concealment frame without
//! advancing (preferably in silence) and a lower one by dropping a quiet frame.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::codec::{has_lbrr, is_dtx_frame, Decoder, Frame, FRAME_MS, FRAME_SAMPLES};
use crate::packet::{MediaPacket, FLAG_DTX, FLAG_FEC};

/// How much one late packet adds to the delay (and to the learnt margin), ms.
const LATE_STEP_MS: f64 = 5.0;
/// Most margin learnt from late packets, ms (two frames).
const LATE_MARGIN_MAX_MS: f64 = 40.0;
/// How fast the learnt margin fades once packets stop being late, ms per second.
const LATE_MARGIN_DECAY_MS_PER_S: f64 = 0.5;

/// Jitter buffer tuning. The defaults are what the quality benchmark was measured with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JitterConfig {
    /// Lowest playout delay target, in ms.
    pub min_delay_ms: f64,
    /// Highest playout delay target, in ms.
    pub max_delay_ms: f64,
    /// Added above the measured spread, in ms.
    pub margin_ms: f64,
    /// Quantile of the transit spread the target covers (0..1).
    pub quantile: f64,
    /// Length of the window the spread is measured over, in ms.
    pub window_ms: f64,
    /// How fast the target falls when the network calms, in ms per second.
    pub decay_ms_per_s: f64,
    /// Most frames of lookahead kept for redundancy and FEC to arrive.
    pub max_lookahead_frames: u64,
    /// Packets further ahead of playout than this many frames restart playout there.
    pub max_ahead_frames: u64,
}

impl Default for JitterConfig {
    fn default() -> Self {
        JitterConfig {
            min_delay_ms: 10.0,
            max_delay_ms: 500.0,
            margin_ms: 4.0,
            quantile: 0.97,
            window_ms: 4000.0,
            decay_ms_per_s: 15.0,
            max_lookahead_frames: 4,
            max_ahead_frames: 150,
        }
    }
}

/// What the receiving side counted. All counters start at zero for a call.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReceiveStats {
    /// Distinct media packets received.
    pub packets_received: u64,
    /// Media packets the sender's sequence numbers say were sent (first to highest).
    pub packets_expected: u64,
    /// Copies of a packet already received.
    pub packets_duplicate: u64,
    /// Packets that arrived after their frame had been played.
    pub packets_late: u64,
    /// Frames decoded from their own packet.
    pub frames_decoded: u64,
    /// Lost frames recovered from a redundant copy.
    pub frames_recovered_red: u64,
    /// Lost frames recovered from the next packet's in-band FEC.
    pub frames_recovered_fec: u64,
    /// Lost frames concealed (Opus PLC).
    pub frames_concealed: u64,
    /// Frames of sender silence (DTX), played as comfort noise.
    pub frames_dtx: u64,
    /// Concealment frames inserted to grow the playout delay.
    pub frames_stretched: u64,
    /// Quiet frames dropped to shrink the playout delay.
    pub frames_dropped: u64,
    /// Playout restarts after a jump in the sender's timestamps.
    pub resyncs: u64,
    /// RFC 3550 interarrival jitter, ms.
    pub jitter_ms: f64,
    /// Playout delay of the last frame played (time since its earliest possible arrival), ms.
    pub playout_delay_ms: f64,
    /// Mean playout delay over the frames played, ms.
    pub mean_playout_delay_ms: f64,
    /// Current playout delay target, ms.
    pub target_delay_ms: f64,
    /// Mean length of runs of consecutive frames whose own packet was missing at playout
    /// (smoothed over recent runs), in packets.
    pub mean_loss_run: f64,
}

impl ReceiveStats {
    /// Fraction of sent packets that never arrived (before any recovery).
    pub fn loss_before_recovery(&self) -> f64 {
        if self.packets_expected == 0 {
            return 0.0;
        }
        self.packets_expected.saturating_sub(self.packets_received) as f64
            / self.packets_expected as f64
    }

    /// Fraction of speech frames (DTX excluded) that had to be concealed.
    pub fn loss_after_recovery(&self) -> f64 {
        let speech = self.frames_decoded
            + self.frames_recovered_red
            + self.frames_recovered_fec
            + self.frames_concealed;
        if speech == 0 {
            return 0.0;
        }
        self.frames_concealed as f64 / speech as f64
    }
}

/// Tracks distinct sequence numbers in a sliding window (as a replay window does), so
/// duplicates are found in constant memory.
#[derive(Debug, Clone, Default)]
struct SeqWindow {
    first: Option<u64>,
    highest: u64,
    /// Bit `i` set: `highest - i` was received.
    bits: [u64; SEQ_WORDS],
}

const SEQ_WORDS: usize = 16;
const SEQ_WINDOW: u64 = (SEQ_WORDS * 64) as u64;

enum SeqVerdict {
    New,
    Duplicate,
    TooOld,
}

impl SeqWindow {
    /// Extends a 16-bit sequence number to the one nearest the highest seen.
    fn extend(&self, seq: u16) -> u64 {
        if self.first.is_none() {
            // Offset by one cycle so that packets reordered before the first stay positive.
            return (1 << 16) + u64::from(seq);
        }
        extend_near(self.highest, u64::from(seq), 16)
    }

    fn insert(&mut self, ext: u64) -> SeqVerdict {
        if self.first.is_none() {
            self.first = Some(ext);
            self.highest = ext;
            self.bits = [0; SEQ_WORDS];
            self.bits[0] = 1;
            return SeqVerdict::New;
        }
        if ext > self.highest {
            self.shift(ext - self.highest);
            self.highest = ext;
            self.bits[0] |= 1;
            return SeqVerdict::New;
        }
        let back = self.highest - ext;
        if back >= SEQ_WINDOW {
            return SeqVerdict::TooOld;
        }
        let (w, b) = ((back / 64) as usize, back % 64);
        if self.bits[w] & (1 << b) != 0 {
            return SeqVerdict::Duplicate;
        }
        self.bits[w] |= 1 << b;
        if let Some(first) = self.first.as_mut() {
            *first = (*first).min(ext);
        }
        SeqVerdict::New
    }

    /// Moves the window up by `n` (bit i becomes bit i + n).
    fn shift(&mut self, n: u64) {
        if n >= SEQ_WINDOW {
            self.bits = [0; SEQ_WORDS];
            return;
        }
        let words = (n / 64) as usize;
        let bits = (n % 64) as u32;
        for i in (0..SEQ_WORDS).rev() {
            let lo = if i >= words { self.bits[i - words] } else { 0 };
            let lower = if i > words {
                self.bits[i - words - 1]
            } else {
                0
            };
            self.bits[i] = if bits == 0 {
                lo
            } else {
                (lo << bits) | (lower >> (64 - bits))
            };
        }
    }

    fn expected(&self) -> u64 {
        self.first.map_or(0, |f| self.highest - f + 1)
    }
}

/// Extends an `bits`-bit counter value to the full value nearest `reference`.
pub(crate) fn extend_near(reference: u64, value: u64, bits: u32) -> u64 {
    let cycle = 1u64 << bits;
    let candidate = (reference & !(cycle - 1)) | value;
    let half = cycle / 2;
    if candidate + half < reference {
        candidate + cycle
    } else if candidate > reference + half && candidate >= cycle {
        candidate - cycle
    } else {
        candidate
    }
}

#[derive(Debug, Clone)]
struct Slot {
    opus: Vec<u8>,
    seq: u64,
    /// Frame index of the packet sent just before this one, when a copy says so.
    prev_sent: Option<u64>,
    dtx: bool,
    from_copy: bool,
}

/// New packets in a row far behind playout that make the buffer restart at them.
const RESYNC_AFTER: u32 = 3;

/// Below this RMS (of 32,767) a decoded frame counts as quiet enough to drop.
const QUIET_RMS: f64 = 150.0;

/// The receiving half of a call: buffer, decoder and receive statistics.
pub struct JitterBuffer {
    cfg: JitterConfig,
    epoch: Instant,
    decoder: Decoder,
    slots: BTreeMap<u64, Slot>,
    seqs: SeqWindow,
    highest_ts: Option<u64>,
    /// Frame index of the first packet received.
    origin: u64,
    /// Next frame index to play; `None` until the first packet.
    next: Option<u64>,
    started: bool,
    last_seq: Option<u64>,
    last_dtx: bool,
    /// (arrival ms, transit ms) of recent packets.
    transits: VecDeque<(f64, f64)>,
    base_ms: f64,
    net_target_ms: f64,
    /// Extra delay learnt from packets that came after their playout time although their
    /// transit looked in line: the phase of our playout clock against the sender's
    /// capture clock, which the transit spread does not see.
    late_margin_ms: f64,
    last_target_update_ms: f64,
    last_transit: Option<f64>,
    lookahead: u64,
    delay_sum_ms: f64,
    delay_count: u64,
    /// Recently concealed frames, in case a later packet shows they were silence.
    concealed: VecDeque<u64>,
    /// Frames in the current run whose own packet was missing.
    loss_run: u64,
    /// Consecutive new packets far behind playout.
    far_behind: u32,
    stats: ReceiveStats,
}

/// Concealed frames remembered for reclassification (a DTX gap is rarely longer: the
/// encoder sends a comfort-noise update every 400 ms).
const MAX_CONCEALED_KEPT: usize = 64;

impl JitterBuffer {
    /// An empty buffer; `now` is the call's start (the buffer's clock epoch).
    pub fn new(cfg: JitterConfig, now: Instant) -> Result<JitterBuffer, crate::MediaError> {
        Ok(JitterBuffer {
            net_target_ms: cfg.min_delay_ms,
            late_margin_ms: 0.0,
            cfg,
            epoch: now,
            decoder: Decoder::new()?,
            slots: BTreeMap::new(),
            seqs: SeqWindow::default(),
            highest_ts: None,
            origin: 0,
            next: None,
            started: false,
            last_seq: None,
            last_dtx: false,
            transits: VecDeque::new(),
            base_ms: 0.0,
            last_target_update_ms: 0.0,
            last_transit: None,
            lookahead: 0,
            delay_sum_ms: 0.0,
            delay_count: 0,
            concealed: VecDeque::new(),
            loss_run: 0,
            far_behind: 0,
            stats: ReceiveStats::default(),
        })
    }

    fn ms(&self, now: Instant) -> f64 {
        // Whole microseconds: exact in f64, so frame boundaries compare exactly.
        now.saturating_duration_since(self.epoch).as_micros() as f64 / 1000.0
    }

    /// Capture time of frame `idx` in ms, relative to the first frame received (small
    /// numbers keep the arithmetic exact).
    fn frame_ms(&self, idx: u64) -> f64 {
        (idx as i64 - self.origin as i64) as f64 * FRAME_MS as f64
    }

    /// Statistics so far.
    pub fn stats(&self) -> ReceiveStats {
        let mut s = self.stats.clone();
        s.packets_expected = self.seqs.expected();
        s.target_delay_ms = self.target_ms();
        s.mean_playout_delay_ms = if self.delay_count == 0 {
            0.0
        } else {
            self.delay_sum_ms / self.delay_count as f64
        };
        s
    }

    /// Highest sequence number received, extended to 32 bits (for feedback).
    pub fn highest_seq(&self) -> u32 {
        // Low 32 bits of the extended number: the receiver report's field is 32 bits wide.
        (self.seqs.highest & 0xFFFF_FFFF) as u32
    }

    /// Frames currently held.
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// True when no frame is held.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// The playout delay the buffer aims for, in ms.
    pub fn target_ms(&self) -> f64 {
        let t = self.net_target_ms + (self.lookahead * FRAME_MS) as f64;
        t.clamp(self.cfg.min_delay_ms, self.cfg.max_delay_ms)
    }

    /// Takes in one media packet.
    pub fn insert(&mut self, now: Instant, pkt: &MediaPacket) {
        let now_ms = self.ms(now);
        let ext_seq = self.seqs.extend(pkt.seq);
        match self.seqs.insert(ext_seq) {
            SeqVerdict::Duplicate => {
                self.stats.packets_duplicate += 1;
                return;
            }
            SeqVerdict::TooOld => {
                self.stats.packets_late += 1;
                return;
            }
            SeqVerdict::New => {}
        }
        self.stats.packets_received += 1;

        let ext_ts = match self.highest_ts {
            None => (1u64 << 32) + u64::from(pkt.timestamp),
            Some(h) => extend_near(h, u64::from(pkt.timestamp), 32),
        };
        self.highest_ts = Some(self.highest_ts.map_or(ext_ts, |h| h.max(ext_ts)));
        let idx = ext_ts / FRAME_SAMPLES as u64;
        if self.stats.packets_received == 1 {
            self.origin = idx;
        }
        let depth = pkt.redundant.len() as u64
            + u64::from(pkt.flags & FLAG_FEC != 0 && pkt.redundant.is_empty());
        self.lookahead = depth.min(self.cfg.max_lookahead_frames);

        let next = match self.next {
            None => {
                self.next = Some(idx);
                idx
            }
            Some(n) if !self.started && idx < n && n - idx < 16 => {
                self.next = Some(idx);
                idx
            }
            Some(n) => n,
        };
        let far_behind = idx + self.cfg.max_ahead_frames < next;
        self.far_behind = if far_behind { self.far_behind + 1 } else { 0 };
        // The sender's clock jumped forward (or a long outage), or several packets in a
        // row belong far in the past (the sender restarted its clock): start again here.
        if idx >= next + self.cfg.max_ahead_frames || self.far_behind >= RESYNC_AFTER {
            self.resync(idx);
        }
        let next = self.next.unwrap_or(idx);
        // Late packets count too: they are what the delay must grow to cover (but not
        // ones from another clock).
        if self.far_behind == 0 {
            self.observe_transit(now_ms, now_ms - self.frame_ms(idx));
        }
        if idx < next {
            self.stats.packets_late += 1;
            // Late although in line: the clocks' phase. Hold more, and remember it.
            self.late_margin_ms = (self.late_margin_ms + LATE_STEP_MS).min(LATE_MARGIN_MAX_MS);
            self.net_target_ms = (self.net_target_ms + LATE_STEP_MS).min(self.cfg.max_delay_ms);
            return;
        }
        let dtx = pkt.flags & FLAG_DTX != 0 || is_dtx_frame(&pkt.opus);
        let prev_sent = pkt
            .redundant
            .first()
            .and_then(|c| idx.checked_sub(u64::from(c.distance)));
        if let Some(p) = prev_sent {
            // Frames between the previous packet sent and this one were never sent (DTX):
            // any of them concealed as lost were silence after all.
            let before = self.concealed.len();
            self.concealed.retain(|&c| c <= p || c >= idx);
            let silent = (before - self.concealed.len()) as u64;
            self.stats.frames_concealed = self.stats.frames_concealed.saturating_sub(silent);
            self.stats.frames_dtx += silent;
        }
        self.slots.insert(
            idx,
            Slot {
                opus: pkt.opus.clone(),
                seq: ext_seq,
                prev_sent,
                dtx,
                from_copy: false,
            },
        );
        for (k, copy) in pkt.redundant.iter().enumerate() {
            let Some(cidx) = idx.checked_sub(u64::from(copy.distance)) else {
                continue;
            };
            if cidx < next || self.slots.contains_key(&cidx) {
                continue;
            }
            self.slots.insert(
                cidx,
                Slot {
                    opus: copy.opus.clone(),
                    seq: ext_seq.saturating_sub(k as u64 + 1),
                    prev_sent: pkt
                        .redundant
                        .get(k + 1)
                        .and_then(|c| idx.checked_sub(u64::from(c.distance))),
                    dtx: is_dtx_frame(&copy.opus),
                    from_copy: true,
                },
            );
        }
    }

    fn resync(&mut self, idx: u64) {
        self.slots.clear();
        self.next = Some(idx);
        self.started = false;
        self.far_behind = 0;
        self.origin = idx;
        // Transit times measured against the old clock mean nothing against the new one.
        self.transits.clear();
        self.last_transit = None;
        self.net_target_ms = self.cfg.min_delay_ms;
        self.last_seq = None;
        self.stats.resyncs += 1;
    }

    fn observe_transit(&mut self, now_ms: f64, transit: f64) {
        if let Some(last) = self.last_transit {
            let d = (transit - last).abs();
            self.stats.jitter_ms += (d - self.stats.jitter_ms) / 16.0;
        }
        self.last_transit = Some(transit);
        self.transits.push_back((now_ms, transit));
        while let Some(&(t, _)) = self.transits.front() {
            if now_ms - t > self.cfg.window_ms && self.transits.len() > 1 {
                self.transits.pop_front();
            } else {
                break;
            }
        }
        // Bounded by the window: at 50 packets per second, 200 entries for 4 s.
        if self.transits.len() > 2000 {
            self.transits.pop_front();
        }
        self.base_ms = self
            .transits
            .iter()
            .map(|&(_, t)| t)
            .fold(f64::INFINITY, f64::min);
        let mut spreads: Vec<f64> = self
            .transits
            .iter()
            .map(|&(_, t)| t - self.base_ms)
            .collect();
        spreads.sort_by(f64::total_cmp);
        let q = ((spreads.len() as f64 - 1.0) * self.cfg.quantile).round() as usize;
        let dt_s = (now_ms - self.last_target_update_ms).max(0.0) / 1000.0;
        self.late_margin_ms = (self.late_margin_ms - LATE_MARGIN_DECAY_MS_PER_S * dt_s).max(0.0);
        let margin = self.cfg.margin_ms + self.late_margin_ms;
        let desired = spreads.get(q).copied().unwrap_or(0.0) + margin;
        // This packet's own lateness raises the target at once; the quantile brings it down.
        let this = transit - self.base_ms + margin;
        self.last_target_update_ms = now_ms;
        if this > self.net_target_ms && this <= self.cfg.max_delay_ms {
            self.net_target_ms = this;
        } else if desired > self.net_target_ms {
            self.net_target_ms = desired;
        } else {
            self.net_target_ms = (self.net_target_ms - self.cfg.decay_ms_per_s * dt_s).max(desired);
        }
    }

    /// Plays the next 20 ms. Call once every 20 ms; concealment fills whatever is missing.
    pub fn pull(&mut self, now: Instant) -> Frame {
        let Some(next) = self.next else {
            return [0; FRAME_SAMPLES];
        };
        let now_ms = self.ms(now);
        let target = self.target_ms();
        let delay = now_ms - (self.frame_ms(next) + self.base_ms);
        let half = FRAME_MS as f64 / 2.0;
        if !self.started {
            if delay + half < target {
                return [0; FRAME_SAMPLES];
            }
            self.started = true;
        }
        // Grow: play concealment without advancing when too early. With the frame missing
        // it would be concealed anyway, and in silence it is inaudible; in the middle of
        // speech only when far too early.
        let missing = !self.slots.contains_key(&next);
        if delay + half < target
            && (missing || self.last_dtx || delay + 2.0 * (FRAME_MS as f64) < target)
        {
            self.stats.frames_stretched += 1;
            return self.decoder.conceal();
        }
        let mut frame = self.produce(next);
        self.next = Some(next + 1);
        self.record_delay(delay);
        // Shrink: drop a quiet frame when well above target, any frame when far above.
        let excess = delay - target;
        if excess > FRAME_MS as f64 && (rms(&frame) < QUIET_RMS || excess > 120.0) {
            self.stats.frames_dropped += 1;
            frame = self.produce(next + 1);
            self.next = Some(next + 2);
        }
        frame
    }

    fn record_delay(&mut self, delay: f64) {
        self.stats.playout_delay_ms = delay;
        self.delay_sum_ms += delay;
        self.delay_count += 1;
    }

    fn produce(&mut self, idx: u64) -> Frame {
        // Anything older than the frame being played can no longer be used.
        while let Some((&k, _)) = self.slots.first_key_value() {
            if k >= idx {
                break;
            }
            self.slots.remove(&k);
        }
        if let Some(slot) = self.slots.remove(&idx) {
            if slot.from_copy {
                self.loss_run += 1;
            } else {
                self.end_loss_run();
            }
            let (frame, _) = self.decoder.decode(&slot.opus);
            if slot.from_copy {
                self.stats.frames_recovered_red += 1;
            } else if slot.dtx {
                self.stats.frames_dtx += 1;
            } else {
                self.stats.frames_decoded += 1;
            }
            self.last_seq = Some(slot.seq);
            self.last_dtx = slot.dtx;
            return frame;
        }
        let later = self
            .slots
            .range(idx + 1..)
            .next()
            .map(|(_, s)| (s.seq, s.prev_sent));
        let silent = match later {
            Some((seq, prev_sent)) => {
                self.last_seq.is_some_and(|l| seq == l + 1) || prev_sent.is_some_and(|p| p < idx)
            }
            None => self.last_dtx,
        };
        if silent {
            self.end_loss_run();
            self.stats.frames_dtx += 1;
            return self.decoder.conceal();
        }
        self.loss_run += 1;
        // A lost frame used one sequence number.
        self.last_seq = self.last_seq.map(|l| l + 1);
        self.last_dtx = false;
        if let Some(s) = self.slots.get(&(idx + 1)) {
            if has_lbrr(&s.opus) {
                self.stats.frames_recovered_fec += 1;
                let opus = s.opus.clone();
                return self.decoder.decode_fec(&opus);
            }
        }
        self.stats.frames_concealed += 1;
        if self.concealed.len() >= MAX_CONCEALED_KEPT {
            self.concealed.pop_front();
        }
        self.concealed.push_back(idx);
        self.decoder.conceal()
    }
}

impl JitterBuffer {
    fn end_loss_run(&mut self) {
        if self.loss_run > 0 {
            let run = self.loss_run as f64;
            self.stats.mean_loss_run = if self.stats.mean_loss_run == 0.0 {
                run
            } else {
                self.stats.mean_loss_run + (run - self.stats.mean_loss_run) / 8.0
            };
            self.loss_run = 0;
        }
    }
}

fn rms(frame: &Frame) -> f64 {
    let sum: f64 = frame.iter().map(|&s| f64::from(s) * f64::from(s)).sum();
    (sum / frame.len() as f64).sqrt()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extend_near_wraps_both_ways() {
        assert_eq!(extend_near(0x1_0000 + 65_530, 3, 16), 0x2_0000 + 3);
        assert_eq!(extend_near(0x2_0000 + 3, 65_530, 16), 0x1_0000 + 65_530);
        assert_eq!(extend_near(0x2_0000 + 100, 90, 16), 0x2_0000 + 90);
    }

    #[test]
    fn seq_window_finds_duplicates_and_counts_expected() {
        let mut w = SeqWindow::default();
        for s in [10u16, 12, 11, 11, 15, 12] {
            let e = w.extend(s);
            let _ = w.insert(e);
        }
        let e = w.extend(11);
        assert!(matches!(w.insert(e), SeqVerdict::Duplicate));
        let e = w.extend(14);
        assert!(matches!(w.insert(e), SeqVerdict::New));
        assert_eq!(w.expected(), 6); // 10..=15
                                     // Far ahead: the whole window moves; something far behind is too old.
        let e = w.extend(15 + 2000);
        assert!(matches!(w.insert(e), SeqVerdict::New));
        let e = w.extend(16);
        assert!(matches!(w.insert(e), SeqVerdict::TooOld));
    }

    fn media(seq: u16, frame: u32) -> MediaPacket {
        MediaPacket {
            flags: 0,
            seq,
            timestamp: frame.wrapping_mul(FRAME_SAMPLES as u32),
            redundant: Vec::new(),
            // A CELT-only 20 ms TOC and a few bytes: decodes to something.
            opus: vec![0xf8, 0xff, 0xfe],
        }
    }

    #[test]
    fn sender_clock_jumps_restart_playout() -> Result<(), crate::MediaError> {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::default(), t0)?;
        let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
        for k in 0..50u16 {
            jb.insert(at(u64::from(k) * 20), &media(k, 1000 + u32::from(k)));
            let _ = jb.pull(at(u64::from(k) * 20 + 10));
        }
        // Forward by an hour: one packet is enough.
        jb.insert(at(1000), &media(50, 1000 + 180_000));
        assert_eq!(jb.stats().resyncs, 1);
        // Back to zero: one stray packet is only late; three in a row restart.
        for k in 0..3u16 {
            jb.insert(at(1020 + u64::from(k) * 20), &media(51 + k, u32::from(k)));
            assert_eq!(jb.stats().resyncs, if k < 2 { 1 } else { 2 });
        }
        assert!(jb.len() <= 1);
        for k in 3..20u16 {
            jb.insert(at(1020 + u64::from(k) * 20), &media(51 + k, u32::from(k)));
            let _ = jb.pull(at(1020 + u64::from(k) * 20 + 10));
        }
        assert!(jb.stats().frames_decoded > 50, "{:?}", jb.stats());
        Ok(())
    }

    #[test]
    fn memory_stays_bounded_under_a_flood() -> Result<(), crate::MediaError> {
        let t0 = Instant::now();
        let mut jb = JitterBuffer::new(JitterConfig::default(), t0)?;
        // Never pulled, packets spread over the future: the buffer holds at most
        // max_ahead_frames of them.
        for k in 0..5000u32 {
            let seq = (k % 65_536) as u16;
            jb.insert(t0, &media(seq, (k * 7919) % 100_000));
        }
        assert!(jb.len() as u64 <= JitterConfig::default().max_ahead_frames);
        assert!(jb.transits.len() <= 2000);
        Ok(())
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Reference model: whatever the reordering and duplication, when every packet
        /// arrives within the buffer's delay, each frame plays exactly once, from its own
        /// packet, and every duplicate is recognised.
        #[test]
        fn every_frame_plays_exactly_once(
            delays in proptest::collection::vec(0u64..60, 60),
            dups in proptest::collection::vec(proptest::prelude::any::<bool>(), 60),
            first_seq in proptest::prelude::any::<u16>(),
            first_frame in proptest::prelude::any::<u32>(),
        ) {
            let t0 = Instant::now();
            let cfg = JitterConfig { min_delay_ms: 80.0, ..JitterConfig::default() };
            let mut jb = JitterBuffer::new(cfg, t0).map_err(|e| proptest::test_runner::TestCaseError::fail(e.to_string()))?;
            let at = |ms: u64| t0 + std::time::Duration::from_millis(ms);
            // (arrival ms, order, packet index)
            let mut arrivals: Vec<(u64, usize, usize)> = Vec::new();
            for (i, (&d, &dup)) in delays.iter().zip(&dups).enumerate() {
                let sent = i as u64 * 20;
                arrivals.push((sent + 40 + d, arrivals.len(), i));
                if dup {
                    arrivals.push((sent + 40 + (d + 7) % 60, arrivals.len(), i));
                }
            }
            arrivals.sort();
            let mut next_arrival = 0;
            for t in 0..(60 * 20 + 400u64) {
                while next_arrival < arrivals.len() && arrivals[next_arrival].0 <= t {
                    let i = arrivals[next_arrival].2;
                    let seq = first_seq.wrapping_add(i as u16);
                    let frame = first_frame.wrapping_add(i as u32);
                    jb.insert(at(t), &media(seq, frame));
                    next_arrival += 1;
                }
                // Play until the 60 frames are through (the caller would hang up then).
                let played = jb.stats.frames_decoded + jb.stats.frames_concealed;
                if t % 20 == 10 && played < 60 {
                    let _ = jb.pull(at(t));
                }
            }
            let s = jb.stats();
            let dup_count = dups.iter().filter(|&&d| d).count() as u64;
            proptest::prop_assert_eq!(s.frames_decoded, 60, "{:?}", s);
            proptest::prop_assert_eq!(s.frames_concealed, 0);
            proptest::prop_assert_eq!(s.packets_duplicate, dup_count);
            proptest::prop_assert_eq!(s.packets_late, 0);
        }
    }

    #[test]
    fn seq_window_shift_keeps_bits() {
        let mut w = SeqWindow::default();
        let _ = w.insert(100);
        let _ = w.insert(170); // shifts by 70: bit 70 is seq 100
        assert!(matches!(w.insert(100), SeqVerdict::Duplicate));
        assert!(matches!(w.insert(101), SeqVerdict::New));
    }
}
