//! Calls in the agent: each active call runs a media engine (Opus, jitter buffer, loss
//! recovery) that plays a WAV file or silence into the call and records what it hears.
//!
//! The client core does the signalling and carries the media datagrams over the peer
//! session; this module paces the audio (20 ms frames) and reports what a call was like.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use peerline_core::call::{CallInfo, CallState};
use peerline_media::{CallMedia, CallStats, MediaConfig, FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE};
use peerline_net::client::Input;
use serde::Serialize;
use tokio::sync::{broadcast, mpsc, oneshot};

/// Whether this build can use the sound card: `devices` with the `audio` feature, `none`
/// without (calls then send silence, or a file).
pub const AUDIO_SUPPORT: &str = if cfg!(feature = "audio") {
    "devices"
} else {
    "none"
};

/// The RMS level of audio samples, as a fraction of full scale (0 for none).
pub fn rms_level(sum_squares: f64, samples: usize) -> f64 {
    if samples == 0 {
        return 0.0;
    }
    ((sum_squares / samples as f64).sqrt() / 32768.0).clamp(0.0, 1.0)
}

fn sum_squares(frame: &[i16]) -> f64 {
    frame.iter().map(|&x| f64::from(x) * f64::from(x)).sum()
}

/// What a call plays and records.
#[derive(Debug, Clone, Default)]
pub struct MediaPlan {
    /// WAV to send (any common rate and channel count); silence when absent or finished.
    pub play: Option<PathBuf>,
    /// Where to write what is heard (48 kHz mono).
    pub record: Option<PathBuf>,
    /// Hang up after this long once active.
    pub duration: Option<Duration>,
    /// Hang up when `play` has been sent in full.
    pub hang_up_at_end: bool,
    /// Use the microphone and speaker (feature `audio`) where no file is given.
    pub devices: bool,
}

/// How a call went, as `peerline call` and `peerline calls wait` print it.
#[derive(Debug, Clone, Serialize)]
pub struct CallReport {
    /// The call's last state (ended).
    #[serde(flatten)]
    pub info: CallInfo,
    /// Seconds of audio exchanged while active.
    pub duration_s: f64,
    /// Where the recording went.
    pub recorded: Option<PathBuf>,
    /// Media statistics (none if the call never became active).
    pub media: Option<CallStats>,
    /// Why media could not run, if it could not.
    pub media_error: Option<String>,
}

/// What a media task hears from the agent.
enum ToMedia {
    /// A datagram from the peer.
    Datagram(Vec<u8>),
    /// The call is over, as the core reports it.
    Ended(CallInfo),
}

struct Running {
    to_media: mpsc::Sender<ToMedia>,
}

#[derive(Default)]
struct Inner {
    /// The plan for the next outgoing call to a user, set before it rings (the callee may
    /// answer before the ringing confirmation reaches us).
    outgoing: HashMap<String, (MediaPlan, oneshot::Sender<CallReport>)>,
    plans: HashMap<u64, MediaPlan>,
    running: HashMap<u64, Running>,
    reports: HashMap<u64, oneshot::Sender<CallReport>>,
    last: HashMap<u64, CallInfo>,
}

/// The agent's calls.
pub struct CallManager {
    states: broadcast::Sender<CallInfo>,
    inner: Mutex<Inner>,
}

impl Default for CallManager {
    fn default() -> Self {
        Self::new()
    }
}

/// Datagrams queued for a call's media task before they are dropped.
const MEDIA_QUEUE: usize = 256;

impl CallManager {
    /// No calls.
    pub fn new() -> Self {
        CallManager {
            states: broadcast::channel(64).0,
            inner: Mutex::new(Inner::default()),
        }
    }

    /// Call state changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<CallInfo> {
        self.states.subscribe()
    }

    /// A call of ours that rings here now, if any.
    pub fn ringing(&self) -> Option<CallInfo> {
        let inner = self.inner.lock().ok()?;
        inner
            .last
            .values()
            .find(|c| c.state == CallState::Incoming)
            .cloned()
    }

    /// Calls not yet over.
    pub fn live(&self) -> Vec<CallInfo> {
        let Ok(inner) = self.inner.lock() else {
            return Vec::new();
        };
        let mut v: Vec<CallInfo> = inner.last.values().cloned().collect();
        v.sort_by_key(|c| c.call_id);
        v
    }

    /// Sets what call `call_id` plays and records, and returns where its report will
    /// arrive when it ends.
    pub fn plan(&self, call_id: u64, plan: MediaPlan) -> oneshot::Receiver<CallReport> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut inner) = self.inner.lock() {
            inner.plans.insert(call_id, plan);
            inner.reports.insert(call_id, tx);
        }
        rx
    }

    /// Sets what the next outgoing call to `peer` plays and records, before it is placed;
    /// returns where its report will arrive.
    pub fn plan_outgoing(&self, peer: &str, plan: MediaPlan) -> oneshot::Receiver<CallReport> {
        let (tx, rx) = oneshot::channel();
        if let Ok(mut inner) = self.inner.lock() {
            inner.outgoing.insert(peer.to_string(), (plan, tx));
        }
        rx
    }

    /// Forgets the plan for an outgoing call that could not be placed.
    pub fn cancel_outgoing(&self, peer: &str) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.outgoing.remove(peer);
        }
    }

    /// A media datagram from the peer of `call_id`.
    pub fn on_media(&self, call_id: u64, bytes: Vec<u8>) {
        if let Ok(inner) = self.inner.lock() {
            if let Some(r) = inner.running.get(&call_id) {
                // A full queue means the task fell behind: drop, as the network would.
                let _ = r.to_media.try_send(ToMedia::Datagram(bytes));
            }
        }
    }

    /// A call changed state: start its media when active, stop it when over.
    pub fn on_state(
        &self,
        info: CallInfo,
        input: &mpsc::Sender<Input>,
        emit: impl Fn(&str, serde_json::Value) + Send + Sync + 'static,
    ) {
        let _ = self.states.send(info.clone());
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let id = info.call_id;
        if info.direction == peerline_core::call::Direction::Outgoing {
            // The pending plan belongs to this call from its first event on.
            if let Some((plan, tx)) = inner.outgoing.remove(info.peer.as_str()) {
                inner.plans.insert(id, plan);
                inner.reports.insert(id, tx);
            }
        }
        match info.state {
            CallState::Active if !inner.running.contains_key(&id) => {
                let plan = inner.plans.remove(&id).unwrap_or_default();
                let report = inner.reports.remove(&id);
                let (tx, rx) = mpsc::channel(MEDIA_QUEUE);
                inner.running.insert(id, Running { to_media: tx });
                inner.last.insert(id, info.clone());
                tokio::spawn(run_media(info, plan, rx, input.clone(), report, emit));
            }
            CallState::Ended => {
                inner.last.remove(&id);
                inner.plans.remove(&id);
                // The running media task stops and reports (dropping its sender stops it
                // too, should the notice not fit).
                let running = inner.running.remove(&id);
                if let Some(r) = running {
                    let _ = r.to_media.try_send(ToMedia::Ended(info));
                } else {
                    if let Some(tx) = inner.reports.remove(&id) {
                        let _ = tx.send(CallReport {
                            info,
                            duration_s: 0.0,
                            recorded: None,
                            media: None,
                            media_error: None,
                        });
                    }
                }
            }
            _ => {
                inner.last.insert(id, info);
            }
        }
    }
}

/// Pulls 20 ms frames from a WAV file's samples, then silence.
struct Source {
    samples: Vec<i16>,
    pos: usize,
}

impl Source {
    fn next(&mut self) -> ([i16; FRAME_SAMPLES], bool) {
        let mut f = [0i16; FRAME_SAMPLES];
        let left = self.samples.len().saturating_sub(self.pos);
        let n = left.min(FRAME_SAMPLES);
        f[..n].copy_from_slice(&self.samples[self.pos..self.pos + n]);
        self.pos += n;
        (f, self.pos >= self.samples.len())
    }
}

/// Live statistics are published this often during a call.
const STATS_EVERY: Duration = Duration::from_secs(1);

async fn run_media(
    info: CallInfo,
    plan: MediaPlan,
    mut from_peer: mpsc::Receiver<ToMedia>,
    input: mpsc::Sender<Input>,
    report: Option<oneshot::Sender<CallReport>>,
    emit: impl Fn(&str, serde_json::Value) + Send + Sync + 'static,
) {
    let call_id = info.call_id;
    let started = Instant::now();
    let mut media_error = None;
    let mut source = match plan.play.as_deref().map(peerline_media::wav::read_wav) {
        Some(Ok(samples)) => Some(Source { samples, pos: 0 }),
        Some(Err(e)) => {
            media_error = Some(format!("cannot play the file: {e}"));
            None
        }
        None => None,
    };
    #[cfg(feature = "audio")]
    let devices = if plan.devices {
        match crate::audio::Devices::open() {
            Ok(d) => Some(d),
            Err(e) => {
                media_error = Some(format!("no sound device: {e}; sending silence"));
                None
            }
        }
    } else {
        None
    };
    #[cfg(not(feature = "audio"))]
    if plan.devices {
        media_error = Some(
            "this build has no sound support (build with --features audio): sending silence"
                .to_string(),
        );
    }
    let mut media = match CallMedia::new(MediaConfig::default(), started) {
        Ok(m) => Some(m),
        Err(e) => {
            media_error = Some(format!("cannot start the audio engine: {e}"));
            None
        }
    };
    let mut heard: Vec<i16> = Vec::new();
    // Where the sent audio comes from, for the live statistics.
    let audio_source = if source.is_some() {
        "file"
    } else {
        #[cfg(feature = "audio")]
        let d = devices.is_some();
        #[cfg(not(feature = "audio"))]
        let d = false;
        if d {
            "devices"
        } else {
            "silence"
        }
    };
    let mut tick = tokio::time::interval(Duration::from_millis(FRAME_MS));
    let mut next_stats = started + STATS_EVERY;
    let mut ended: Option<CallInfo> = None;
    // Why we stop: the call ended elsewhere (None), or our own limit (Some(reason)).
    let ours: Option<&str> = loop {
        tokio::select! {
            _ = tick.tick() => {
                let now = Instant::now();
                let Some(m) = media.as_mut() else { break Some("the audio engine failed") };
                let (frame, finished) = match source.as_mut() {
                    Some(s) => s.next(),
                    #[cfg(feature = "audio")]
                    None if devices.is_some() => (
                        devices.as_ref().map_or([0; FRAME_SAMPLES], |d| d.capture_frame()),
                        false,
                    ),
                    None => ([0; FRAME_SAMPLES], false),
                };
                if let Err(e) = m.push_capture(&frame) {
                    tracing::warn!(error = %e, "audio frame refused");
                }
                while let Some(p) = m.poll_transmit(now) {
                    // Media is unreliable by nature: a full queue is a lost packet.
                    let _ = input.try_send(Input::CallMedia(call_id, p));
                }
                let out = m.pull_playout(now);
                #[cfg(feature = "audio")]
                if let Some(d) = devices.as_ref().filter(|_| plan.record.is_none()) {
                    d.play_frame(&out);
                }
                heard.extend_from_slice(&out);
                if now >= next_stats {
                    next_stats = now + STATS_EVERY;
                    let mut v = serde_json::to_value(m.stats()).unwrap_or_default();
                    if let Some(o) = v.as_object_mut() {
                        o.insert("call_id".into(), call_id.into());
                        o.insert("peer".into(), info.peer.as_str().into());
                        o.insert("elapsed_s".into(), now.duration_since(started).as_secs_f64().into());
                        // The level meters sample the frames of this tick only: summing
                        // every frame costs the real-time loop more than a meter needs.
                        o.insert("input_level".into(), rms_level(sum_squares(&frame), FRAME_SAMPLES).into());
                        o.insert("output_level".into(), rms_level(sum_squares(&out), FRAME_SAMPLES).into());
                        o.insert("audio_source".into(), audio_source.into());
                    }
                    emit("call_stats", v);
                }
                if finished && plan.hang_up_at_end {
                    break Some("hung up");
                }
                if plan.duration.is_some_and(|d| now.duration_since(started) >= d) {
                    break Some("hung up");
                }
            }
            d = from_peer.recv() => match d {
                Some(ToMedia::Datagram(bytes)) => {
                    if let Some(m) = media.as_mut() {
                        // Garbage from the peer is dropped; the call carries on.
                        let _ = m.handle_packet(Instant::now(), &bytes);
                    }
                }
                Some(ToMedia::Ended(info)) => {
                    ended = Some(info);
                    break None;
                }
                None => break None,
            },
        }
    };
    let duration_s = heard.len() as f64 / f64::from(SAMPLE_RATE);
    let mut recorded = None;
    if let Some(path) = plan.record.as_deref() {
        match peerline_media::wav::write_wav(path, &heard) {
            Ok(()) => recorded = Some(path.to_path_buf()),
            Err(e) => media_error = Some(format!("cannot write the recording: {e}")),
        }
    }
    let stats = media.as_ref().map(|m| m.stats());
    if let Some(reason) = ours {
        let (tx, rx) = oneshot::channel();
        let _ = input
            .send(Input::Command(
                peerline_core::client::Command::CallHangUp { call_id },
                tx,
            ))
            .await;
        let _ = rx.await;
        tracing::info!(call = call_id, reason, "call over");
    }
    let mut last = ended.unwrap_or(info);
    last.state = CallState::Ended;
    if last.end_reason.is_none() {
        last.end_reason = Some(ours.unwrap_or("hung up").to_string());
    }
    if let Some(tx) = report {
        let _ = tx.send(CallReport {
            info: last,
            duration_s,
            recorded,
            media: stats,
            media_error,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_are_rms_over_full_scale() {
        assert_eq!(rms_level(0.0, 0), 0.0);
        let frame = [16384i16; 4];
        assert!((rms_level(sum_squares(&frame), 4) - 0.5).abs() < 1e-9);
        let alternating = [-32768i16, 32767, -32768, 32767];
        assert!(rms_level(sum_squares(&alternating), 4) > 0.999);
        assert_eq!(rms_level(sum_squares(&[0; 8]), 8), 0.0);
    }

    #[test]
    fn a_source_gives_whole_frames_then_silence_and_says_when_it_is_done() {
        let mut s = Source {
            samples: vec![5; FRAME_SAMPLES + 10],
            pos: 0,
        };
        let (a, done) = s.next();
        assert!(a.iter().all(|&x| x == 5) && !done);
        let (b, done) = s.next();
        assert!(b[..10].iter().all(|&x| x == 5) && b[10..].iter().all(|&x| x == 0));
        assert!(done);
        let (c, done) = s.next();
        assert!(c.iter().all(|&x| x == 0) && done);
    }
}
