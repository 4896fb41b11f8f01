//! One side of a call: sender, jitter buffer and receiver reports behind one driven API.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::codec::{Frame, FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE};
use crate::jitter::{JitterBuffer, JitterConfig, ReceiveStats};
use crate::packet::{Feedback, Packet, PacketError, FLAG_ECHO};
use crate::sender::{MediaSender, RatePolicy, SendStats};
use crate::MediaError;

/// Settings for one call's media.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MediaConfig {
    /// Jitter buffer tuning.
    pub jitter: JitterConfig,
    /// Bitrate and redundancy ladder.
    pub rate: RatePolicy,
    /// Interval between receiver reports, ms (0: 100 ms).
    pub feedback_interval_ms: u64,
}

/// Per-call statistics, for `--json` output and logs.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CallStats {
    /// Smoothed round-trip time from receiver-report echoes, ms (none before the first echo).
    pub rtt_ms: Option<f64>,
    /// Fraction of the peer's packets that never arrived.
    pub loss_before_recovery: f64,
    /// Fraction of the peer's speech frames concealed after FEC and redundancy.
    pub loss_after_recovery: f64,
    /// Interarrival jitter of the peer's packets (RFC 3550), ms.
    pub jitter_ms: f64,
    /// Playout delay of the last frame, ms (beyond the earliest possible arrival).
    pub playout_delay_ms: f64,
    /// Mean playout delay over the call, ms.
    pub mean_playout_delay_ms: f64,
    /// Codec delay: one frame of packetisation plus the encoder's lookahead, ms.
    pub codec_delay_ms: f64,
    /// Media sent, kb/s over the audio captured (redundancy included; DTX lowers it).
    pub send_kbps: f64,
    /// Primary Opus frames alone, kb/s over the audio captured.
    pub opus_kbps: f64,
    /// Current Opus bitrate target, kb/s.
    pub bitrate_kbps: f64,
    /// Current redundancy depth (copies per packet).
    pub red_depth: usize,
    /// Opus in-band FEC on.
    pub fec: bool,
    /// Receiving side in detail.
    pub receive: ReceiveStats,
    /// Sending side in detail.
    pub send: SendStats,
}

/// Default interval between receiver reports.
pub const FEEDBACK_INTERVAL_MS: u64 = 100;

/// The media of one call, one side. Sans-IO: the caller moves bytes and time.
///
/// Drive it with, every 20 ms, [`push_capture`](Self::push_capture) and
/// [`pull_playout`](Self::pull_playout); after each call and on every
/// [`poll_timeout`](Self::poll_timeout) deadline, drain
/// [`poll_transmit`](Self::poll_transmit); feed every datagram from the peer to
/// [`handle_packet`](Self::handle_packet).
pub struct CallMedia {
    epoch: Instant,
    sender: MediaSender,
    buffer: JitterBuffer,
    feedback_interval: Duration,
    next_feedback: Instant,
    /// `send_ms` of the peer's last report and when it came.
    peer_report: Option<(u32, Instant)>,
    srtt_ms: Option<f64>,
    /// Counters at the previous report, for the residual-loss fraction.
    last_speech: u64,
    last_concealed: u64,
}

impl CallMedia {
    /// Starts a call's media at `now` (the clock epoch for its reports).
    pub fn new(config: MediaConfig, now: Instant) -> Result<CallMedia, MediaError> {
        let interval = if config.feedback_interval_ms == 0 {
            FEEDBACK_INTERVAL_MS
        } else {
            config.feedback_interval_ms
        };
        Ok(CallMedia {
            epoch: now,
            sender: MediaSender::new(config.rate)?,
            buffer: JitterBuffer::new(config.jitter, now)?,
            feedback_interval: Duration::from_millis(interval),
            next_feedback: now,
            peer_report: None,
            srtt_ms: None,
            last_speech: 0,
            last_concealed: 0,
        })
    }

    fn ms(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    /// Hands over 20 ms of captured audio (960 samples, 48 kHz mono).
    pub fn push_capture(&mut self, pcm: &[i16]) -> Result<(), MediaError> {
        let frame: &Frame = pcm
            .try_into()
            .map_err(|_| MediaError::FrameSize(pcm.len()))?;
        self.sender.push(frame)
    }

    /// Next payload to send unreliably to the peer (media or receiver report), if any.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Vec<u8>> {
        if now >= self.next_feedback {
            self.next_feedback = now + self.feedback_interval;
            return Some(self.feedback(now));
        }
        self.sender.poll_transmit()
    }

    /// When `poll_transmit` next has something without new input (the next report).
    pub fn poll_timeout(&self) -> Instant {
        self.next_feedback
    }

    fn feedback(&mut self, now: Instant) -> Vec<u8> {
        let rs = self.buffer.stats();
        let speech = rs.frames_decoded
            + rs.frames_recovered_red
            + rs.frames_recovered_fec
            + rs.frames_concealed;
        // Saturating: a concealed frame can later be counted as silence instead.
        let d_speech = speech.saturating_sub(self.last_speech);
        let d_conc = rs.frames_concealed.saturating_sub(self.last_concealed);
        self.last_speech = speech;
        self.last_concealed = rs.frames_concealed;
        let residual = if d_speech == 0 {
            0
        } else {
            ((d_conc as f64 / d_speech as f64).min(1.0) * 65535.0).round() as u16
        };
        let (flags, echo_ms, echo_delay_ms) = match self.peer_report {
            Some((sent, at)) => (
                FLAG_ECHO,
                sent,
                u16::try_from(now.saturating_duration_since(at).as_millis()).unwrap_or(u16::MAX),
            ),
            None => (0, 0, 0),
        };
        let fb = Feedback {
            flags,
            highest_seq: self.buffer.highest_seq(),
            received: (rs.packets_received & 0xFFFF_FFFF) as u32,
            jitter_tenth_ms: (rs.jitter_ms * 10.0).round().clamp(0.0, 65535.0) as u16,
            residual_loss: residual,
            send_ms: (self.ms(now) & 0xFFFF_FFFF) as u32,
            echo_ms,
            echo_delay_ms,
            playout_delay_ms: rs.playout_delay_ms.round().clamp(0.0, 65535.0) as u16,
            loss_run_tenths: (rs.mean_loss_run * 10.0).round().clamp(0.0, 255.0) as u8,
        };
        let mut out = Vec::with_capacity(crate::packet::FEEDBACK_LEN);
        fb.encode(&mut out);
        out
    }

    /// Takes in one payload from the peer. A payload that is not a media packet is an
    /// error for the caller to count and drop; the call carries on.
    pub fn handle_packet(&mut self, now: Instant, payload: &[u8]) -> Result<(), MediaError> {
        match Packet::decode(payload)? {
            Packet::Media(m) => self.buffer.insert(now, &m),
            Packet::Feedback(f) => {
                let now_ms = self.ms(now);
                if f.flags & FLAG_ECHO != 0 {
                    let now32 = (now_ms & 0xFFFF_FFFF) as u32;
                    let rtt = now32
                        .wrapping_sub(f.echo_ms)
                        .wrapping_sub(u32::from(f.echo_delay_ms));
                    // A report echoing a time we never sent gives nonsense: keep plausible ones.
                    if rtt < 60_000 {
                        let rtt = f64::from(rtt);
                        self.srtt_ms = Some(match self.srtt_ms {
                            None => rtt,
                            Some(s) => s + (rtt - s) / 8.0,
                        });
                    }
                }
                self.peer_report = Some((f.send_ms, now));
                self.sender.on_report(
                    now_ms,
                    f.highest_seq,
                    f.received,
                    f64::from(f.residual_loss) / 65535.0,
                    f64::from(f.loss_run_tenths) / 10.0,
                    self.srtt_ms,
                )?;
            }
        }
        Ok(())
    }

    /// The next 20 ms to play (960 samples, 48 kHz mono); concealment or silence when
    /// nothing is there. Call once every 20 ms.
    pub fn pull_playout(&mut self, now: Instant) -> Frame {
        self.buffer.pull(now)
    }

    /// Statistics so far.
    pub fn stats(&self) -> CallStats {
        let r = self.buffer.stats();
        let s = self.sender.stats();
        let captured_s = (s.frames_captured * FRAME_MS) as f64 / 1000.0;
        let kbps = |bytes: u64| {
            if captured_s > 0.0 {
                bytes as f64 * 8.0 / captured_s / 1000.0
            } else {
                0.0
            }
        };
        CallStats {
            rtt_ms: self.srtt_ms,
            loss_before_recovery: r.loss_before_recovery(),
            loss_after_recovery: r.loss_after_recovery(),
            jitter_ms: r.jitter_ms,
            playout_delay_ms: r.playout_delay_ms,
            mean_playout_delay_ms: r.mean_playout_delay_ms,
            codec_delay_ms: (FRAME_SAMPLES + self.sender.lookahead()) as f64 * 1000.0
                / f64::from(SAMPLE_RATE),
            send_kbps: kbps(s.bytes_sent),
            opus_kbps: kbps(s.opus_bytes),
            bitrate_kbps: f64::from(s.bitrate) / 1000.0,
            red_depth: s.red_depth,
            fec: s.fec,
            receive: r,
            send: s,
        }
    }
}

impl From<PacketError> for MediaError {
    fn from(e: PacketError) -> Self {
        MediaError::Packet(e)
    }
}
