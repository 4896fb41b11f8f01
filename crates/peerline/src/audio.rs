//! The microphone and speaker for calls (cargo feature `audio`, through cpal and ALSA).
//!
//! cpal streams cannot move between threads, so a thread of their own owns them; the
//! call's media task exchanges 20 ms frames with it through two short queues at 48 kHz
//! mono. Devices that do not run at 48 kHz are resampled linearly (good enough for a
//! headset; the codec band-limits anyway).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use cpal::traits::{DeviceTrait, HostTrait, StreamTrait};
use cpal::{SampleFormat, StreamConfig};
use peerline_media::{FRAME_SAMPLES, SAMPLE_RATE};

/// Most audio a queue holds before the oldest is dropped (latency stays bounded).
const MAX_QUEUED: usize = SAMPLE_RATE as usize / 5;

type Queue = Arc<Mutex<VecDeque<i16>>>;

/// The default input and output devices, open for one call.
pub struct Devices {
    captured: Queue,
    to_play: Queue,
    /// Dropping it stops the device thread (and closes the streams).
    _stop: std::sync::mpsc::Sender<()>,
}

/// Linear resampler from one rate to another, one sample at a time.
struct Linear {
    /// Input samples per output sample.
    step: f64,
    /// Position of the next output between the previous input (0) and the next (1).
    t: f64,
    prev: f32,
}

impl Linear {
    fn new(from: u32, to: u32) -> Self {
        Linear {
            step: f64::from(from) / f64::from(to),
            t: 0.0,
            prev: 0.0,
        }
    }

    fn push(&mut self, x: f32, out: &mut impl FnMut(f32)) {
        while self.t <= 1.0 {
            out(self.prev + (x - self.prev) * self.t as f32);
            self.t += self.step;
        }
        self.t -= 1.0;
        self.prev = x;
    }
}

fn push_bounded(q: &Queue, samples: impl Iterator<Item = i16>) {
    if let Ok(mut q) = q.lock() {
        q.extend(samples);
        let over = q.len().saturating_sub(MAX_QUEUED);
        q.drain(..over);
    }
}

fn to_i16(x: f32) -> i16 {
    (x * 32767.0).round().clamp(-32768.0, 32767.0) as i16
}

impl Devices {
    /// Opens the default microphone and speaker.
    pub fn open() -> Result<Devices, String> {
        let captured: Queue = Arc::default();
        let to_play: Queue = Arc::default();
        let (stop_tx, stop_rx) = std::sync::mpsc::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let (cq, pq) = (captured.clone(), to_play.clone());
        std::thread::Builder::new()
            .name("audio-devices".into())
            .spawn(move || match open_streams(cq, pq) {
                Ok(streams) => {
                    let _ = ready_tx.send(Ok(()));
                    // Keep the streams alive until the call is over.
                    let _ = stop_rx.recv();
                    drop(streams);
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| format!("cannot start the audio thread: {e}"))?;
        ready_rx
            .recv()
            .map_err(|_| "the audio thread stopped".to_string())??;
        Ok(Devices {
            captured,
            to_play,
            _stop: stop_tx,
        })
    }

    /// The next 20 ms from the microphone (silence where it has not delivered yet).
    pub fn capture_frame(&self) -> [i16; FRAME_SAMPLES] {
        let mut f = [0i16; FRAME_SAMPLES];
        if let Ok(mut q) = self.captured.lock() {
            let n = q.len().min(FRAME_SAMPLES);
            for (dst, src) in f.iter_mut().zip(q.drain(..n)) {
                *dst = src;
            }
        }
        f
    }

    /// Queues 20 ms for the speaker.
    pub fn play_frame(&self, frame: &[i16]) {
        push_bounded(&self.to_play, frame.iter().copied());
    }
}

fn open_streams(captured: Queue, to_play: Queue) -> Result<(cpal::Stream, cpal::Stream), String> {
    let host = cpal::default_host();
    let input = host
        .default_input_device()
        .ok_or("no microphone found (check ALSA's default device)")?;
    let output = host
        .default_output_device()
        .ok_or("no speaker found (check ALSA's default device)")?;
    let in_cfg = input
        .default_input_config()
        .map_err(|e| format!("microphone: {e}"))?;
    let out_cfg = output
        .default_output_config()
        .map_err(|e| format!("speaker: {e}"))?;
    let err_fn = |e: cpal::Error| tracing::warn!(error = %e, "audio device");

    let (in_format, in_config): (SampleFormat, StreamConfig) =
        (in_cfg.sample_format(), in_cfg.into());
    let channels = usize::from(in_config.channels).max(1);
    let mut rs = Linear::new(in_config.sample_rate, SAMPLE_RATE);
    let mut capture = move |mono: &mut dyn Iterator<Item = f32>| {
        let mut out = Vec::with_capacity(FRAME_SAMPLES);
        for x in mono {
            rs.push(x, &mut |y| out.push(to_i16(y)));
        }
        push_bounded(&captured, out.into_iter());
    };
    let in_stream = match in_format {
        SampleFormat::F32 => input.build_input_stream(
            in_config,
            move |data: &[f32], _: &cpal::InputCallbackInfo| {
                capture(
                    &mut data
                        .chunks(channels)
                        .map(|c| c.iter().sum::<f32>() / c.len() as f32),
                )
            },
            err_fn,
            None,
        ),
        SampleFormat::I16 => input.build_input_stream(
            in_config,
            move |data: &[i16], _: &cpal::InputCallbackInfo| {
                capture(&mut data.chunks(channels).map(|c| {
                    c.iter().map(|&s| f32::from(s) / 32768.0).sum::<f32>() / c.len() as f32
                }))
            },
            err_fn,
            None,
        ),
        other => return Err(format!("microphone sample format {other} is not supported")),
    }
    .map_err(|e| format!("microphone: {e}"))?;

    let (out_format, out_config): (SampleFormat, StreamConfig) =
        (out_cfg.sample_format(), out_cfg.into());
    let out_channels = usize::from(out_config.channels).max(1);
    let mut up = Linear::new(SAMPLE_RATE, out_config.sample_rate);
    let mut ready: VecDeque<f32> = VecDeque::new();
    // Fills `frames` device frames of mono audio, resampled from the 48 kHz queue.
    let mut fill = move |frames: usize| -> Vec<f32> {
        while ready.len() < frames {
            let x = to_play
                .lock()
                .ok()
                .and_then(|mut q| q.pop_front())
                .map_or(0.0, |s| f32::from(s) / 32768.0);
            up.push(x, &mut |y| ready.push_back(y));
        }
        ready.drain(..frames).collect()
    };
    let out_stream = match out_format {
        SampleFormat::F32 => output.build_output_stream(
            out_config,
            move |data: &mut [f32], _: &cpal::OutputCallbackInfo| {
                let mono = fill(data.len() / out_channels);
                for (frame, x) in data.chunks_mut(out_channels).zip(mono) {
                    frame.fill(x);
                }
            },
            err_fn,
            None,
        ),
        SampleFormat::I16 => output.build_output_stream(
            out_config,
            move |data: &mut [i16], _: &cpal::OutputCallbackInfo| {
                let mono = fill(data.len() / out_channels);
                for (frame, x) in data.chunks_mut(out_channels).zip(mono) {
                    frame.fill(to_i16(x));
                }
            },
            err_fn,
            None,
        ),
        other => return Err(format!("speaker sample format {other} is not supported")),
    }
    .map_err(|e| format!("speaker: {e}"))?;
    in_stream.play().map_err(|e| format!("microphone: {e}"))?;
    out_stream.play().map_err(|e| format!("speaker: {e}"))?;
    Ok((in_stream, out_stream))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn linear_resampling_keeps_duration_and_shape() {
        let mut r = Linear::new(16_000, 48_000);
        let mut out = Vec::new();
        for i in 0..16_000 {
            r.push((i as f32 * 0.01).sin(), &mut |y| out.push(y));
        }
        assert!((out.len() as i64 - 48_000).abs() <= 3, "{}", out.len());
        // Every third output sits on an input sample.
        let want = (100.0f32 * 0.01).sin();
        assert!(out[300..306].iter().any(|y| (y - want).abs() < 1e-3));
        let mut down = Linear::new(48_000, 16_000);
        let mut back = Vec::new();
        for y in out {
            down.push(y, &mut |z| back.push(z));
        }
        assert!((back.len() as i64 - 16_000).abs() <= 3);
    }
}
