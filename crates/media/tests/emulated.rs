//! Deterministic tests of the whole media path on virtual time: sender, scripted or
//! seeded network, jitter buffer, recovery, decoder.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::{Duration, Instant};

use peerline_media::codec::has_lbrr;
use peerline_media::netem::{ChannelConfig, LossModel};
use peerline_media::packet::{Packet, MEDIA_BUDGET};
use peerline_media::sender::{RatePolicy, Tier};
use peerline_media::sim::{align, fidelity, simulate, synthetic_speech, SimConfig};
use peerline_media::{CallMedia, MediaConfig, MediaError, FRAME_SAMPLES};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};

/// What happens to one datagram from the talker: delivered after each listed delay (ms);
/// an empty list drops it.
type Fate<'a> = dyn FnMut(u64, &[u8]) -> Vec<u64> + 'a;

struct Run {
    heard: Vec<i16>,
    talker: CallMedia,
    listener: CallMedia,
    /// Listener's playout target sampled every second (ms).
    targets: Vec<f64>,
    /// Media packets the talker sent, with their sequence numbers.
    sent_seqs: Vec<u16>,
}

/// Talker sends `input`; the listener sends reports back over a 40 ms path.
fn drive(
    input: &[i16],
    media: MediaConfig,
    tail_ms: u64,
    fate: &mut Fate<'_>,
) -> Result<Run, MediaError> {
    let t0 = Instant::now();
    let mut talker = CallMedia::new(media.clone(), t0)?;
    let mut listener = CallMedia::new(media, t0)?;
    let mut fwd: BinaryHeap<Reverse<(u64, u64, Vec<u8>)>> = BinaryHeap::new();
    let mut rev: BinaryHeap<Reverse<(u64, u64, Vec<u8>)>> = BinaryHeap::new();
    let mut order = 0u64;
    let frames: Vec<&[i16]> = input.chunks(FRAME_SAMPLES).collect();
    let end = frames.len() as u64 * 20 + 20 + tail_ms;
    let mut heard = Vec::new();
    let mut targets = Vec::new();
    let mut sent_seqs = Vec::new();
    for t in 0..=end {
        let now = t0 + Duration::from_millis(t);
        while fwd.peek().is_some_and(|Reverse((at, _, _))| *at <= t) {
            if let Some(Reverse((_, _, p))) = fwd.pop() {
                listener.handle_packet(now, &p)?;
            }
        }
        while rev.peek().is_some_and(|Reverse((at, _, _))| *at <= t) {
            if let Some(Reverse((_, _, p))) = rev.pop() {
                talker.handle_packet(now, &p)?;
            }
        }
        if t % 20 == 0 {
            let k = (t / 20) as usize;
            if k >= 1 {
                // After the input, the microphone goes on capturing silence until hang-up.
                let mut frame = [0i16; FRAME_SAMPLES];
                if let Some(f) = frames.get(k - 1) {
                    frame[..f.len()].copy_from_slice(f);
                }
                talker.push_capture(&frame)?;
            }
            heard.extend_from_slice(&listener.pull_playout(now));
        }
        if t % 1000 == 0 {
            targets.push(listener.stats().receive.target_delay_ms);
        }
        while let Some(p) = talker.poll_transmit(now) {
            if let Ok(Packet::Media(m)) = Packet::decode(&p) {
                sent_seqs.push(m.seq);
                assert!(p.len() <= MEDIA_BUDGET, "packet of {} bytes", p.len());
            }
            for d in fate(t, &p) {
                fwd.push(Reverse((t + d, order, p.clone())));
                order += 1;
            }
        }
        while let Some(p) = listener.poll_transmit(now) {
            rev.push(Reverse((t + 40, order, p)));
            order += 1;
        }
    }
    Ok(Run {
        heard,
        talker,
        listener,
        targets,
        sent_seqs,
    })
}

fn seq_of(p: &[u8]) -> Option<u16> {
    match Packet::decode(p) {
        Ok(Packet::Media(m)) => Some(m.seq),
        _ => None,
    }
}

/// A policy with one fixed tier, so scripted losses meet known redundancy.
fn fixed(tier: Tier) -> MediaConfig {
    MediaConfig {
        rate: RatePolicy {
            tiers: vec![tier],
            burst_factor: 0.0,
            ..RatePolicy::default()
        },
        ..MediaConfig::default()
    }
}

#[test]
fn clean_channel_output_matches_input() -> Result<(), MediaError> {
    let input = synthetic_speech(6.0);
    let run = drive(&input, MediaConfig::default(), 500, &mut |_, _| vec![40])?;
    let lag = align(&input, &run.heard);
    let (corr, snr) = fidelity(&input, &run.heard, lag);
    let ms = lag as f64 / 48.0;
    // 40 ms path + 20 ms frame + 6.5 ms lookahead + at most one frame of buffering.
    assert!((66.0..=90.0).contains(&ms), "mouth-to-ear {ms} ms");
    assert!(corr > 0.9, "correlation {corr}");
    assert!(snr > 8.0, "SNR {snr} dB");
    let s = run.listener.stats();
    assert_eq!(s.receive.frames_concealed, 0);
    assert_eq!(s.receive.packets_late, 0);
    assert_eq!(s.loss_before_recovery, 0.0);
    // The pauses were not sent (DTX) and played as comfort noise, not counted as loss.
    let sent = run.talker.stats().send;
    assert!(
        sent.frames_dtx_skipped > 50,
        "DTX skipped {}",
        sent.frames_dtx_skipped
    );
    assert!(s.receive.frames_dtx > 50);
    // Round trip: 40 ms each way.
    let rtt = run.talker.stats().rtt_ms.unwrap_or(0.0);
    assert!((79.0..=81.0).contains(&rtt), "rtt {rtt}");
    // A clean path gets the top of the ladder: 64 kb/s, no redundancy.
    assert_eq!(run.talker.stats().bitrate_kbps, 64.0);
    assert_eq!(run.talker.stats().red_depth, 0);
    Ok(())
}

#[test]
fn redundancy_recovers_single_and_double_losses_exactly() -> Result<(), MediaError> {
    let input = synthetic_speech(2.0);
    let lost = [20u16, 40, 41, 60, 61, 62];
    let run = drive(
        &input,
        fixed(Tier {
            max_loss: 1.0,
            bitrate: 32_000,
            red_depth: 2,
            fec: false,
        }),
        300,
        &mut |_, p| match seq_of(p) {
            Some(s) if lost.contains(&s) => vec![],
            _ => vec![40],
        },
    )?;
    let r = run.listener.stats().receive;
    // 20 (single) and 40-41 (double) come back from copies; of 60-62 the first has no
    // surviving copy (its copies rode in 61 and 62) and is concealed.
    assert_eq!(r.frames_recovered_red, 5, "{r:?}");
    assert_eq!(r.frames_concealed, 1, "{r:?}");
    assert_eq!(r.packets_expected - r.packets_received, 6);
    Ok(())
}

#[test]
fn in_band_fec_recovers_isolated_losses() -> Result<(), MediaError> {
    let input = synthetic_speech(2.0);
    let lost = [30u16, 50, 70];
    let mut lbrr_next = 0;
    let run = drive(
        &input,
        fixed(Tier {
            max_loss: 0.2,
            bitrate: 24_000,
            red_depth: 0,
            fec: true,
        }),
        300,
        &mut |_, p| match Packet::decode(p) {
            Ok(Packet::Media(m)) if lost.contains(&m.seq) => vec![],
            Ok(Packet::Media(m)) => {
                if lost.contains(&m.seq.wrapping_sub(1)) && has_lbrr(&m.opus) {
                    lbrr_next += 1;
                }
                vec![40]
            }
            _ => vec![40],
        },
    )?;
    let r = run.listener.stats().receive;
    // libopus adds LBRR only after frames its VAD calls active; each one is used.
    assert!(
        lbrr_next >= 2,
        "only {lbrr_next} of the packets after a loss carry FEC"
    );
    assert_eq!(r.frames_recovered_fec, lbrr_next, "{r:?}");
    assert_eq!(r.frames_concealed, 3 - lbrr_next, "{r:?}");
    Ok(())
}

#[test]
fn without_redundancy_a_loss_is_concealed() -> Result<(), MediaError> {
    let input = synthetic_speech(2.0);
    let run = drive(
        &input,
        fixed(Tier {
            max_loss: 1.0,
            bitrate: 32_000,
            red_depth: 0,
            fec: false,
        }),
        300,
        &mut |_, p| {
            if seq_of(p) == Some(30) {
                vec![]
            } else {
                vec![40]
            }
        },
    )?;
    let r = run.listener.stats().receive;
    assert_eq!(r.frames_concealed, 1);
    assert_eq!(r.frames_recovered_red + r.frames_recovered_fec, 0);
    Ok(())
}

#[test]
fn duplicates_and_late_packets_never_play_twice() -> Result<(), MediaError> {
    let input = synthetic_speech(4.0);
    let run = drive(
        &input,
        MediaConfig::default(),
        500,
        &mut |_, p| match seq_of(p) {
            // Every tenth packet twice, and packet 61 a second late.
            Some(s) if s % 10 == 0 => vec![40, 45],
            Some(61) => vec![1000],
            _ => vec![40],
        },
    )?;
    let r = run.listener.stats().receive;
    let sent = run.sent_seqs.len() as u64;
    assert!(r.packets_duplicate >= sent / 10 - 1, "{r:?}");
    assert_eq!(r.packets_late, 1, "{r:?}");
    assert_eq!(r.packets_received, sent);
    // Each frame sent is played at most once: frames played from packets never exceed the
    // packets sent, and the late one was concealed, not played again when it came.
    let from_packets = r.frames_decoded + r.frames_recovered_red + r.frames_recovered_fec;
    assert!(
        from_packets < sent,
        "played {from_packets} frames from {sent} packets"
    );
    assert_eq!(r.frames_concealed, 1, "{r:?}");
    Ok(())
}

#[test]
fn playout_delay_follows_jitter_up_quickly_and_back_down() -> Result<(), MediaError> {
    let input = synthetic_speech(30.0);
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    // 0-8 s calm, 8-14 s 80 ms of jitter, then calm again.
    let run = drive(&input, MediaConfig::default(), 500, &mut |t, _| {
        let spread = if (8_000..14_000).contains(&t) {
            80.0
        } else {
            0.0
        };
        let u = (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        vec![40 + (u * spread) as u64]
    })?;
    let t = &run.targets;
    assert!(t[7] <= 15.0, "calm target {}", t[7]);
    assert!(
        t[9] >= 60.0,
        "one second into the jitter the target is {}",
        t[9]
    );
    assert!(t[13] >= 60.0, "target {}", t[13]);
    assert!(
        t[29] <= 20.0,
        "target 15 s after the jitter stopped: {}",
        t[29]
    );
    let r = run.listener.stats().receive;
    // Only the first packets of the jitter phase can come too late to play.
    assert!(r.packets_late <= 4, "late {}", r.packets_late);
    assert!(r.frames_stretched >= 2 && r.frames_dropped >= 2, "{r:?}");
    Ok(())
}

#[test]
fn rate_ladder_follows_loss_up_and_back_down() -> Result<(), MediaError> {
    let input = synthetic_speech(30.0);
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let mut depth_during_loss = 0;
    let run = drive(&input, MediaConfig::default(), 200, &mut |t, p| {
        if (2_000..10_000).contains(&t) {
            if let Ok(Packet::Media(m)) = Packet::decode(p) {
                depth_during_loss = depth_during_loss.max(m.redundant.len());
            }
            if rng.next_u64() % 10 == 0 {
                return vec![];
            }
        }
        vec![40]
    })?;
    assert!(
        depth_during_loss >= 2,
        "depth {depth_during_loss} at 10 % loss"
    );
    let s = run.talker.stats();
    assert_eq!(
        s.red_depth, 0,
        "back to no redundancy 20 s after the loss stopped"
    );
    assert_eq!(s.bitrate_kbps, 64.0);
    assert!(s.send.tier_changes >= 4, "{:?}", s.send);
    let r = run.listener.stats();
    assert!(r.loss_before_recovery > 0.02, "{r:?}");
    assert!(
        r.loss_after_recovery < 0.01,
        "after recovery {}",
        r.loss_after_recovery
    );
    Ok(())
}

#[test]
fn seeded_emulator_random_loss_with_jitter() -> Result<(), MediaError> {
    let input = synthetic_speech(20.0);
    let channel = ChannelConfig {
        loss: LossModel::Random { p: 0.10 },
        delay_ms: 40.0,
        jitter_ms: 30.0,
        duplicate: 0.02,
    };
    let cfg = SimConfig {
        forward: channel,
        reverse: channel,
        seed: 11,
        media: MediaConfig::default(),
        tail_ms: 500,
        playout_phase_ms: 10,
    };
    let (out, rep) = simulate(&input, &cfg)?;
    let (again, _) = simulate(&input, &cfg)?;
    assert_eq!(out, again, "same seed, same call");
    assert!(rep.channel.reordered > 0 && rep.channel.duplicated > 0);
    let l = &rep.listener;
    assert!((0.08..0.12).contains(&l.loss_before_recovery), "{l:?}");
    assert!(
        l.loss_after_recovery < 0.02,
        "after recovery {}",
        l.loss_after_recovery
    );
    // Most losses come back from copies; the rest were lost before the ladder climbed.
    let lost = l.receive.packets_expected - l.receive.packets_received;
    assert!(
        l.receive.frames_recovered_red * 10 > lost * 8,
        "{:?}",
        l.receive
    );
    // The channel also duplicates the talker's own receiver reports, which are not media.
    assert!(
        l.receive.packets_duplicate > 0 && l.receive.packets_duplicate <= rep.channel.duplicated
    );
    // The playout delay moves under jitter: compare segment by segment.
    assert!(
        rep.segmental_correlation > 0.85,
        "segmental correlation {}",
        rep.segmental_correlation
    );
    Ok(())
}

#[test]
fn bad_input_is_an_error_not_a_panic() -> Result<(), MediaError> {
    let t0 = Instant::now();
    let mut m = CallMedia::new(MediaConfig::default(), t0)?;
    assert!(matches!(
        m.push_capture(&[0; 100]),
        Err(MediaError::FrameSize(100))
    ));
    for junk in [&[][..], &[0xA1][..], &[0xA2, 0, 1][..], &[0xff; 40][..]] {
        assert!(m.handle_packet(t0, junk).is_err());
    }
    // Playout before anything arrived is silence.
    assert!(m.pull_playout(t0).iter().all(|&s| s == 0));
    let json = serde_json::to_string(&m.stats()).map_err(|e| MediaError::Config(e.to_string()))?;
    let back: peerline_media::CallStats =
        serde_json::from_str(&json).map_err(|e| MediaError::Config(e.to_string()))?;
    assert_eq!(back, m.stats());
    Ok(())
}
