//! The quality harness: speech through encoder, emulated channel, jitter buffer and
//! decoder on virtual time, with the delay and fidelity of what comes out measured.
//!
//! One side talks (`a`), the other listens (`b`) and sends receiver reports back over a
//! reverse channel with the same impairment, so the talker's rate control sees the loss
//! and round-trip time as it would in a call.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::call::{CallMedia, CallStats, MediaConfig};
use crate::codec::{FRAME_MS, FRAME_SAMPLES};
use crate::netem::{Channel, ChannelConfig, ChannelStats};
use crate::MediaError;

/// A harness run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimConfig {
    /// Talker to listener.
    pub forward: ChannelConfig,
    /// Listener to talker (receiver reports).
    pub reverse: ChannelConfig,
    /// Seed of both channels' random choices.
    pub seed: u64,
    /// Media settings of both sides.
    pub media: MediaConfig,
    /// Playout kept running after the input ends, ms.
    pub tail_ms: u64,
    /// When in each 20 ms the listener's sound card asks for a frame, ms (0..20). Capture
    /// and playout clocks are not in phase in a real call; half a frame is the average.
    pub playout_phase_ms: u64,
}

/// What a harness run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SimReport {
    /// Seconds of audio sent.
    pub seconds: f64,
    /// Capture to playout, measured by aligning output with input, ms.
    pub mouth_to_ear_ms: f64,
    /// Mean one-way delay of the packets the channel delivered, ms.
    pub network_mean_ms: f64,
    /// Mouth-to-ear delay beyond the mean network delay: jitter buffer (mean time a frame
    /// waits) plus codec (20 ms frame plus encoder lookahead), ms.
    pub added_delay_ms: f64,
    /// Normalised correlation of output with input after alignment (1 is identical).
    pub correlation: f64,
    /// Signal-to-noise ratio of output against input after alignment and gain match, dB.
    pub snr_db: f64,
    /// Mean correlation of 1 s segments, each aligned on its own (see
    /// [`segmental_correlation`]).
    pub segmental_correlation: f64,
    /// Listener's statistics (loss, jitter, playout delay, recovery).
    pub listener: CallStats,
    /// Talker's statistics (bitrate, redundancy, round-trip time).
    pub talker: CallStats,
    /// Talker-to-listener channel.
    pub channel: ChannelStats,
}

/// Runs `input` (48 kHz mono) through a call on virtual time; returns what the listener
/// played (from the start of the call) and the measurements.
pub fn simulate(input: &[i16], cfg: &SimConfig) -> Result<(Vec<i16>, SimReport), MediaError> {
    let t0 = Instant::now();
    let mut a = CallMedia::new(cfg.media.clone(), t0)?;
    let mut b = CallMedia::new(cfg.media.clone(), t0)?;
    let mut fwd = Channel::new(cfg.forward, cfg.seed);
    let mut rev = Channel::new(cfg.reverse, cfg.seed ^ 0x5eed_5eed);
    let frames: Vec<&[i16]> = input.chunks(FRAME_SAMPLES).collect();
    let end_ms = frames.len() as u64 * FRAME_MS + FRAME_MS + cfg.tail_ms;
    let mut out = Vec::with_capacity((end_ms / FRAME_MS + 1) as usize * FRAME_SAMPLES);
    // Sample i of the output is heard i / 48 ms after the call starts: silence until the
    // first pull.
    out.resize((cfg.playout_phase_ms % FRAME_MS) as usize * 48, 0);
    for t in 0..=end_ms {
        let now = t0 + Duration::from_millis(t);
        while let Some(p) = fwd.recv(now) {
            // Errors would mean a bug in our own encoder; count nothing, keep going.
            let _ = b.handle_packet(now, &p);
        }
        while let Some(p) = rev.recv(now) {
            let _ = a.handle_packet(now, &p);
        }
        if t % FRAME_MS == 0 {
            // Frame k is captured during [20k, 20k + 20) ms, so it is ready at 20(k + 1).
            let k = (t / FRAME_MS) as usize;
            if k >= 1 {
                // After the input, the microphone goes on capturing silence until hang-up.
                let mut frame = [0i16; FRAME_SAMPLES];
                if let Some(f) = frames.get(k - 1) {
                    frame[..f.len()].copy_from_slice(f);
                }
                a.push_capture(&frame)?;
            }
            let _ = a.pull_playout(now);
        }
        if t % FRAME_MS == cfg.playout_phase_ms % FRAME_MS {
            out.extend_from_slice(&b.pull_playout(now));
        }
        while let Some(p) = a.poll_transmit(now) {
            fwd.send(now, p);
        }
        while let Some(p) = b.poll_transmit(now) {
            rev.send(now, p);
        }
    }
    let lag = align(input, &out);
    let (correlation, snr_db) = fidelity(input, &out, lag);
    let channel = fwd.stats();
    let mouth_to_ear_ms = lag as f64 * 1000.0 / 48_000.0;
    let report = SimReport {
        seconds: input.len() as f64 / 48_000.0,
        mouth_to_ear_ms,
        network_mean_ms: channel.mean_delay_ms,
        added_delay_ms: mouth_to_ear_ms - channel.mean_delay_ms,
        correlation,
        snr_db,
        segmental_correlation: segmental_correlation(input, &out),
        listener: b.stats(),
        talker: a.stats(),
        channel,
    };
    Ok((out, report))
}

/// A deterministic speech-like test signal (48 kHz mono): a voiced tone whose pitch
/// glides between about 110 and 170 Hz, with twelve harmonics shaped by two formants,
/// syllables at 3.5 per second and a 0.8 s pause every 3 s (so DTX has silence to skip).
/// For tests that must not depend on a speech synthesiser.
pub fn synthetic_speech(seconds: f64) -> Vec<i16> {
    let n = (seconds * 48_000.0) as usize;
    let mut phase = 0.0f64;
    let tau = std::f64::consts::TAU;
    (0..n)
        .map(|i| {
            let t = i as f64 / 48_000.0;
            let f0 = 140.0 + 30.0 * (tau * 0.7 * t).sin();
            phase += tau * f0 / 48_000.0;
            if t % 3.0 > 2.2 {
                return 0;
            }
            let env = (tau * 1.75 * t).sin().abs().sqrt();
            let mut v = 0.0;
            for h in 1..=12 {
                let f = f64::from(h) * f0;
                let formant = (-((f - 700.0) / 300.0).powi(2)).exp()
                    + 0.6 * (-((f - 1500.0) / 400.0).powi(2)).exp();
                v += (0.15 + formant) / f64::from(h) * (f64::from(h) * phase).sin();
            }
            (v * env * 7000.0).round().clamp(-32768.0, 32767.0) as i16
        })
        .collect()
}

/// Longest delay searched when aligning, in ms.
const MAX_LAG_MS: usize = 1000;

/// Delay of `output` behind `input` in samples: coarse search on 1 kHz averages, then
/// exact search around the best coarse lag on the first 8 s.
pub fn align(input: &[i16], output: &[i16]) -> usize {
    let dec = |x: &[i16]| -> Vec<f64> {
        x.chunks(48)
            .map(|c| c.iter().map(|&s| f64::from(s)).sum::<f64>() / c.len() as f64)
            .collect()
    };
    let (ci, co) = (dec(input), dec(output));
    let coarse = best_lag(&ci, &co, 0, MAX_LAG_MS);
    let x: Vec<f64> = input
        .iter()
        .take(8 * 48_000)
        .map(|&s| f64::from(s))
        .collect();
    let y: Vec<f64> = output.iter().map(|&s| f64::from(s)).collect();
    let lo = (coarse * 48).saturating_sub(96);
    best_lag(&x, &y, lo, coarse * 48 + 96)
}

fn best_lag(x: &[f64], y: &[f64], lo: usize, hi: usize) -> usize {
    let mut best = (f64::MIN, lo);
    for lag in lo..=hi {
        let n = x.len().min(y.len().saturating_sub(lag));
        if n == 0 {
            break;
        }
        let mut c = 0.0;
        for i in 0..n {
            c += x[i] * y[i + lag];
        }
        if c > best.0 {
            best = (c, lag);
        }
    }
    best.1
}

/// Mean normalised correlation of 1 s segments of `input` (those with sound) with
/// `output`, each segment aligned on its own: robust to a playout delay that moves
/// during the call, where one lag for the whole call is not.
pub fn segmental_correlation(input: &[i16], output: &[i16]) -> f64 {
    const SEG: usize = 48_000;
    let mut sum = 0.0;
    let mut n = 0;
    for start in (0..input.len().saturating_sub(SEG)).step_by(SEG) {
        let x = &input[start..start + SEG];
        if x.iter().map(|&v| f64::from(v).abs()).sum::<f64>() / (SEG as f64) < 300.0 {
            continue;
        }
        let Some(y) = output.get(start..) else { break };
        let lag = align(x, y);
        let (c, _) = fidelity(x, y, lag);
        sum += c;
        n += 1;
    }
    if n == 0 {
        0.0
    } else {
        sum / f64::from(n)
    }
}

/// Normalised correlation and SNR (dB, after a least-squares gain) of `output` delayed by
/// `lag` samples against `input`.
pub fn fidelity(input: &[i16], output: &[i16], lag: usize) -> (f64, f64) {
    let n = input.len().min(output.len().saturating_sub(lag));
    let (mut xy, mut xx, mut yy) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (x, y) = (f64::from(input[i]), f64::from(output[i + lag]));
        xy += x * y;
        xx += x * x;
        yy += y * y;
    }
    if xx == 0.0 || yy == 0.0 {
        return (0.0, f64::NEG_INFINITY);
    }
    let corr = xy / (xx * yy).sqrt();
    let gain = xy / yy;
    let mut err = 0.0;
    for i in 0..n {
        let e = f64::from(input[i]) - gain * f64::from(output[i + lag]);
        err += e * e;
    }
    (corr, 10.0 * (xx / err.max(1e-9)).log10())
}
