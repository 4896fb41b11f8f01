//! Just enough WAV for the lab: a generated test signal for the matrix's calls, and the
//! length of a speech file for the call-quality runs (the lab does not link the media
//! engine; PESQ scoring reads the files in Python).

use std::io::Write as _;
use std::path::Path;

/// Sample rate of the generated signal (the media engine's own rate).
pub const RATE: u32 = 48_000;

/// 16-bit PCM mono WAV bytes of `samples` at `rate`.
pub fn encode(samples: &[i16], rate: u32) -> Vec<u8> {
    let data_len = (samples.len() * 2) as u32;
    let mut v = Vec::with_capacity(44 + samples.len() * 2);
    v.extend_from_slice(b"RIFF");
    v.extend_from_slice(&(36 + data_len).to_le_bytes());
    v.extend_from_slice(b"WAVEfmt ");
    v.extend_from_slice(&16u32.to_le_bytes());
    v.extend_from_slice(&1u16.to_le_bytes()); // PCM
    v.extend_from_slice(&1u16.to_le_bytes()); // mono
    v.extend_from_slice(&rate.to_le_bytes());
    v.extend_from_slice(&(rate * 2).to_le_bytes());
    v.extend_from_slice(&2u16.to_le_bytes());
    v.extend_from_slice(&16u16.to_le_bytes());
    v.extend_from_slice(b"data");
    v.extend_from_slice(&data_len.to_le_bytes());
    for s in samples {
        v.extend_from_slice(&s.to_le_bytes());
    }
    v
}

/// A speech-like test signal: a 140 Hz voice with harmonics, in 4 "syllables" a second
/// with short pauses, so the codec sees voiced frames and silences rather than one tone.
pub fn test_signal(seconds: f64) -> Vec<i16> {
    let n = (seconds.max(0.0) * f64::from(RATE)) as usize;
    (0..n)
        .map(|i| {
            let t = i as f64 / f64::from(RATE);
            let syllable = (t * 4.0).fract();
            let envelope = if syllable < 0.8 {
                (std::f64::consts::PI * syllable / 0.8).sin()
            } else {
                0.0
            };
            let f0 = 140.0 + 20.0 * (t * 1.3).sin();
            let voice: f64 = (1..=6)
                .map(|h| (2.0 * std::f64::consts::PI * f0 * h as f64 * t).sin() / h as f64)
                .sum();
            (voice * envelope * 5_000.0) as i16
        })
        .collect()
}

/// Writes [`test_signal`] to `path`.
pub fn write_test_signal(path: &Path, seconds: f64) -> std::io::Result<()> {
    let mut f = std::fs::File::create(path)?;
    f.write_all(&encode(&test_signal(seconds), RATE))
}

/// Seconds of audio in WAV bytes (any PCM layout), or why they are not a WAV file.
pub fn duration(bytes: &[u8]) -> Result<f64, String> {
    let u32_at = |b: &[u8], at: usize| -> Option<u32> {
        let s = b.get(at..at.checked_add(4)?)?;
        Some(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
    };
    if bytes.get(0..4) != Some(b"RIFF") || bytes.get(8..12) != Some(b"WAVE") {
        return Err("not a RIFF/WAVE file".into());
    }
    let mut at = 12usize;
    let mut byte_rate = None;
    while let (Some(id), Some(len)) = (bytes.get(at..at + 4), u32_at(bytes, at + 4)) {
        let body = at + 8;
        match id {
            b"fmt " => byte_rate = u32_at(bytes, body + 8),
            b"data" => {
                let rate = byte_rate
                    .filter(|&r| r > 0)
                    .ok_or("no format before the data")?;
                // A streamed file may say 0 or too much: count what is there.
                let have = bytes.len().saturating_sub(body) as u64;
                let len = u64::from(len).min(have);
                return Ok(len as f64 / f64::from(rate));
            }
            _ => {}
        }
        // Chunks are padded to an even length.
        at = body
            .checked_add(len as usize + (len as usize & 1))
            .ok_or("chunk too long")?;
    }
    Err("no data chunk".into())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn the_test_signal_round_trips_with_its_length_and_has_pauses() {
        let s = test_signal(2.5);
        assert_eq!(s.len(), 120_000);
        let wav = encode(&s, RATE);
        assert_eq!(wav.len(), 44 + 240_000);
        assert!((duration(&wav).unwrap() - 2.5).abs() < 1e-9);
        let peak = s.iter().map(|x| x.unsigned_abs()).max().unwrap();
        assert!(peak > 4_000, "loud enough: {peak}");
        // The last 20 % of every quarter second is silence.
        assert!(s[10_000..12_000].iter().all(|&x| x == 0));
    }

    #[test]
    fn duration_is_total_on_any_bytes() {
        let wav = encode(&[1, 2, 3, 4], 8_000);
        for cut in 0..wav.len() {
            // Truncated files give an error or a shorter length, never a panic.
            if let Ok(d) = duration(&wav[..cut]) {
                assert!(d <= 4.0 / 8_000.0);
            }
        }
        assert!(duration(b"RIFF\0\0\0\0WAVEdata\xff\xff\xff\xff").is_err());
        let mut odd = wav.clone();
        odd[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(duration(&odd).is_err());
    }

    proptest::proptest! {
        #[test]
        fn duration_never_panics(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let _ = duration(&bytes);
            let mut b = b"RIFF\0\0\0\0WAVE".to_vec();
            b.extend_from_slice(&bytes);
            let _ = duration(&b);
        }
    }
}
