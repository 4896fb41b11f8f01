//! WAV input and output for headless calls: any common rate and channel count in, 48 kHz
//! mono 16-bit out.

use std::path::Path;

use rubato::audioadapter_buffers::direct::InterleavedSlice;
use rubato::{Fft, FixedSync, Resampler};

use crate::codec::SAMPLE_RATE;
use crate::MediaError;

/// Reads a WAV file (8/16/24/32-bit integer or 32-bit float, any channel count and common
/// sample rate) as 48 kHz mono: channels are averaged, then resampled.
pub fn read_wav(path: &Path) -> Result<Vec<i16>, MediaError> {
    let reader = hound::WavReader::open(path)
        .map_err(|e| MediaError::Wav(path.display().to_string(), e.to_string()))?;
    let spec = reader.spec();
    let werr = |e: hound::Error| MediaError::Wav(path.display().to_string(), e.to_string());
    let samples: Vec<f32> = match spec.sample_format {
        hound::SampleFormat::Float => reader
            .into_samples::<f32>()
            .collect::<Result<_, _>>()
            .map_err(werr)?,
        hound::SampleFormat::Int => {
            let scale = 1.0 / (1u64 << (spec.bits_per_sample.clamp(1, 32) - 1)) as f32;
            reader
                .into_samples::<i32>()
                .map(|s| s.map(|v| v as f32 * scale))
                .collect::<Result<_, _>>()
                .map_err(werr)?
        }
    };
    to_mono_48k(&samples, usize::from(spec.channels), spec.sample_rate)
}

/// Mixes interleaved samples (-1..1) down to mono and resamples them to 48 kHz 16-bit.
pub fn to_mono_48k(
    interleaved: &[f32],
    channels: usize,
    rate: u32,
) -> Result<Vec<i16>, MediaError> {
    if channels == 0 || rate == 0 {
        return Err(MediaError::Config(format!(
            "{channels} channels at {rate} Hz"
        )));
    }
    let mono: Vec<f32> = interleaved
        .chunks_exact(channels)
        .map(|c| c.iter().sum::<f32>() / channels as f32)
        .collect();
    let out = if rate == SAMPLE_RATE || mono.is_empty() {
        mono
    } else {
        resample(&mono, rate, SAMPLE_RATE)?
    };
    Ok(out
        .iter()
        .map(|&s| (s * 32767.0).round().clamp(-32768.0, 32767.0) as i16)
        .collect())
}

fn resample(mono: &[f32], from: u32, to: u32) -> Result<Vec<f32>, MediaError> {
    let rerr = |e: &dyn std::fmt::Display| MediaError::Resample(e.to_string());
    let mut r = Fft::<f32>::new(from as usize, to as usize, 1024, 1, FixedSync::Both)
        .map_err(|e| rerr(&e))?;
    let input = InterleavedSlice::new(mono, 1, mono.len()).map_err(|e| rerr(&e))?;
    let out = r
        .process_all(&input, mono.len(), None)
        .map_err(|e| rerr(&e))?;
    Ok(out.take_data())
}

/// Writes 48 kHz mono 16-bit samples as a WAV file.
pub fn write_wav(path: &Path, samples: &[i16]) -> Result<(), MediaError> {
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: SAMPLE_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let werr = |e: hound::Error| MediaError::Wav(path.display().to_string(), e.to_string());
    let mut w = hound::WavWriter::create(path, spec).map_err(werr)?;
    for &s in samples {
        w.write_sample(s).map_err(werr)?;
    }
    w.finalize().map_err(werr)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tone(rate: u32, secs: f32, hz: f32) -> Vec<f32> {
        (0..(rate as f32 * secs) as usize)
            .map(|i| 0.5 * (2.0 * std::f32::consts::PI * hz * i as f32 / rate as f32).sin())
            .collect()
    }

    #[test]
    fn stereo_44k1_becomes_mono_48k_with_the_same_tone() -> Result<(), MediaError> {
        let dir = tempfile::tempdir().map_err(|e| MediaError::Config(e.to_string()))?;
        let path = dir.path().join("in.wav");
        let spec = hound::WavSpec {
            channels: 2,
            sample_rate: 44_100,
            bits_per_sample: 24,
            sample_format: hound::SampleFormat::Int,
        };
        let t = tone(44_100, 1.0, 440.0);
        {
            let mut w = hound::WavWriter::create(&path, spec)
                .map_err(|e| MediaError::Config(e.to_string()))?;
            for &s in &t {
                let v = (s * 8_388_607.0) as i32;
                w.write_sample(v)
                    .map_err(|e| MediaError::Config(e.to_string()))?;
                w.write_sample(v)
                    .map_err(|e| MediaError::Config(e.to_string()))?;
            }
            w.finalize()
                .map_err(|e| MediaError::Config(e.to_string()))?;
        }
        let pcm = read_wav(&path)?;
        assert!((47_900..48_100).contains(&pcm.len()), "len {}", pcm.len());
        // Zero crossings in the middle half: 440 Hz gives 880 per second.
        let mid = &pcm[12_000..36_000];
        let crossings = mid.windows(2).filter(|w| (w[0] < 0) != (w[1] < 0)).count();
        assert!((430..450).contains(&crossings), "crossings {crossings}");
        let peak = mid.iter().map(|s| s.unsigned_abs()).max().unwrap_or(0);
        assert!((15_500..17_000).contains(&peak), "peak {peak}");
        let out = dir.path().join("out.wav");
        write_wav(&out, &pcm)?;
        assert_eq!(read_wav(&out)?, pcm);
        Ok(())
    }

    #[test]
    fn missing_file_is_an_error() {
        assert!(matches!(
            read_wav(Path::new("/nonexistent/x.wav")),
            Err(MediaError::Wav(..))
        ));
    }
}
