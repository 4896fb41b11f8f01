//! Opus at 48 kHz mono in 20 ms frames: a thin, typed wrapper over the `opus` crate
//! (bundled libopus).

use serde::{Deserialize, Serialize};

use crate::MediaError;

/// Sample rate of everything inside the crate.
pub const SAMPLE_RATE: u32 = 48_000;
/// Samples in one 20 ms frame at 48 kHz mono.
pub const FRAME_SAMPLES: usize = 960;
/// Duration of one frame in milliseconds.
pub const FRAME_MS: u64 = 20;
/// Largest Opus frame the encoder may produce (64 kb/s needs 160 bytes; VBR peaks stay
/// below this, and libopus lowers the rate of a frame rather than exceed it).
pub const MAX_OPUS_FRAME: usize = 400;

/// Highest audio bandwidth the encoder may code (the sample rate stays 48 kHz).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bandwidth {
    /// 8 kHz audio band: wide-band voice (as SILK in Skype, G.722, "HD voice").
    Wideband,
    /// 12 kHz audio band.
    Superwideband,
    /// 20 kHz audio band.
    Fullband,
}

impl Bandwidth {
    fn opus(self) -> opus::Bandwidth {
        match self {
            Bandwidth::Wideband => opus::Bandwidth::Wideband,
            Bandwidth::Superwideband => opus::Bandwidth::Superwideband,
            Bandwidth::Fullband => opus::Bandwidth::Fullband,
        }
    }
}

/// One 20 ms frame of 48 kHz mono PCM.
pub type Frame = [i16; FRAME_SAMPLES];

/// Encoder settings the rate controller changes during a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderSettings {
    /// Target bitrate in bits per second.
    pub bitrate: i32,
    /// In-band FEC (LBRR) on.
    pub fec: bool,
    /// Expected loss in percent (tells libopus how much FEC to spend).
    pub loss_percent: i32,
    /// Highest coded audio bandwidth.
    pub max_bandwidth: Bandwidth,
}

/// Opus encoder with DTX on.
pub struct Encoder {
    inner: opus::Encoder,
    settings: EncoderSettings,
    lookahead: usize,
}

fn opus_err(what: &'static str) -> impl FnOnce(opus::Error) -> MediaError {
    move |e| MediaError::Opus(what, e.to_string())
}

impl Encoder {
    /// A VoIP-tuned encoder with the given settings and DTX on.
    pub fn new(settings: EncoderSettings) -> Result<Encoder, MediaError> {
        let mut inner =
            opus::Encoder::new(SAMPLE_RATE, opus::Channels::Mono, opus::Application::Voip)
                .map_err(opus_err("create encoder"))?;
        inner.set_dtx(true).map_err(opus_err("set DTX"))?;
        inner.set_vbr(true).map_err(opus_err("set VBR"))?;
        let lookahead =
            usize::try_from(inner.get_lookahead().map_err(opus_err("lookahead"))?).unwrap_or(0);
        let mut enc = Encoder {
            inner,
            settings,
            lookahead,
        };
        enc.apply(settings)?;
        Ok(enc)
    }

    /// Changes bitrate and FEC (takes effect from the next frame).
    pub fn apply(&mut self, s: EncoderSettings) -> Result<(), MediaError> {
        self.inner
            .set_bitrate(opus::Bitrate::Bits(s.bitrate))
            .map_err(opus_err("set bitrate"))?;
        self.inner
            .set_inband_fec(s.fec)
            .map_err(opus_err("set FEC"))?;
        self.inner
            .set_max_bandwidth(s.max_bandwidth.opus())
            .map_err(opus_err("set bandwidth"))?;
        self.inner
            .set_packet_loss_perc(s.loss_percent.clamp(0, 100))
            .map_err(opus_err("set loss"))?;
        self.settings = s;
        Ok(())
    }

    /// Current settings.
    pub fn settings(&self) -> EncoderSettings {
        self.settings
    }

    /// Encoder lookahead in samples at 48 kHz (part of the codec's delay).
    pub fn lookahead(&self) -> usize {
        self.lookahead
    }

    /// Encodes one frame. A result of two bytes or less is a DTX frame (silence: libopus
    /// says it need not be sent).
    pub fn encode(&mut self, pcm: &Frame) -> Result<Vec<u8>, MediaError> {
        self.inner
            .encode_vec(pcm, MAX_OPUS_FRAME)
            .map_err(opus_err("encode"))
    }

    /// Whether the encoder is in DTX (sending silence) after the last frame.
    pub fn in_dtx(&mut self) -> bool {
        self.inner.get_in_dtx().unwrap_or(false)
    }
}

/// Whether an Opus frame is a DTX frame (nothing worth sending).
pub fn is_dtx_frame(opus: &[u8]) -> bool {
    opus.len() <= 2
}

/// Whether a single-frame 20 ms Opus packet carries in-band FEC (LBRR) data for the frame
/// before it. Mirrors libopus's `opus_packet_has_lbrr` for the packets this crate makes:
/// the LBRR flag is the second bit of the SILK layer, which only SILK and hybrid modes have.
pub fn has_lbrr(opus: &[u8]) -> bool {
    let (Some(&toc), Some(&first)) = (opus.first(), opus.get(1)) else {
        return false;
    };
    let config = toc >> 3;
    let code = toc & 0x03;
    let silk_layer = config < 16;
    let mono = toc & 0x04 == 0;
    // Code 0 (one frame) of 20 ms: SILK configs 1, 5, 9 and hybrid configs 13, 15.
    let twenty_ms = matches!(config, 1 | 5 | 9 | 13 | 15);
    silk_layer && mono && code == 0 && twenty_ms && (first >> 6) & 1 == 1
}

/// Opus decoder with the three ways to produce a frame: decode, recover from the next
/// packet's FEC, conceal.
pub struct Decoder {
    inner: opus::Decoder,
}

impl Decoder {
    /// A 48 kHz mono decoder.
    pub fn new() -> Result<Decoder, MediaError> {
        Ok(Decoder {
            inner: opus::Decoder::new(SAMPLE_RATE, opus::Channels::Mono)
                .map_err(opus_err("create decoder"))?,
        })
    }

    /// Decodes a frame; a corrupt frame (possible only from a buggy peer: the session is
    /// authenticated) is concealed instead.
    pub fn decode(&mut self, opus: &[u8]) -> (Frame, bool) {
        let mut out = [0i16; FRAME_SAMPLES];
        match self.inner.decode(opus, &mut out, false) {
            Ok(n) if n == FRAME_SAMPLES => (out, true),
            _ => (self.conceal(), false),
        }
    }

    /// Recovers the frame before `next` from `next`'s in-band FEC.
    pub fn decode_fec(&mut self, next: &[u8]) -> Frame {
        let mut out = [0i16; FRAME_SAMPLES];
        match self.inner.decode(next, &mut out, true) {
            Ok(n) if n == FRAME_SAMPLES => out,
            _ => self.conceal(),
        }
    }

    /// Packet loss concealment (or comfort noise after DTX).
    pub fn conceal(&mut self) -> Frame {
        let mut out = [0i16; FRAME_SAMPLES];
        if self.inner.decode(&[], &mut out, false).is_err() {
            out = [0; FRAME_SAMPLES];
        }
        out
    }
}
