//! Peerline voice media, sans-IO: Opus at 48 kHz mono in 20 ms frames, a small RTP-like
//! media packet with RED-style redundancy, receiver reports, an adaptive jitter buffer
//! with loss recovery and concealment, per-call statistics, and WAV I/O.
//!
//! Nothing here owns a socket, a clock or a random source: every call takes `now`, and
//! payloads go in and out as bytes. The integrator carries [`CallMedia::poll_transmit`]'s
//! payloads in unreliable, encrypted datagrams of the peer session (each is under
//! [`packet::MEDIA_BUDGET`] bytes) and hands what arrives to [`CallMedia::handle_packet`].
//!
//! # Driving a call
//!
//! Every 20 ms: push the captured frame, pull the frame to play, and send what is queued.
//! Also send on [`CallMedia::poll_timeout`] (receiver reports go out every 100 ms even
//! when nothing is captured).
//!
//! ```
//! use std::time::{Duration, Instant};
//! use peerline_media::{CallMedia, MediaConfig, FRAME_SAMPLES};
//!
//! # fn main() -> Result<(), peerline_media::MediaError> {
//! let t0 = Instant::now();
//! let mut alice = CallMedia::new(MediaConfig::default(), t0)?;
//! let mut bob = CallMedia::new(MediaConfig::default(), t0)?;
//! let tone: Vec<i16> = (0..FRAME_SAMPLES).map(|i| ((i as f32 * 0.07).sin() * 8000.0) as i16).collect();
//! let mut heard = Vec::new();
//! for k in 1..=50u64 {
//!     let now = t0 + Duration::from_millis(20 * k);
//!     alice.push_capture(&tone)?;
//!     // A perfect network: everything alice sends reaches bob at once.
//!     while let Some(datagram) = alice.poll_transmit(now) {
//!         bob.handle_packet(now, &datagram)?;
//!     }
//!     while let Some(datagram) = bob.poll_transmit(now) {
//!         alice.handle_packet(now, &datagram)?;
//!     }
//!     heard.extend_from_slice(&bob.pull_playout(now));
//! }
//! let stats = bob.stats();
//! assert_eq!(stats.receive.frames_concealed, 0);
//! assert!(heard.iter().any(|&s| s != 0));
//! println!("{}", serde_json::to_string(&stats).unwrap_or_default());
//! # Ok(())
//! # }
//! ```
//!
//! The same engine, with [`netem::Channel`] between the two sides and virtual time, is the
//! quality harness ([`sim::simulate`], binary `peerline-media-sim`).
//!
//! # Notes for carrying a call
//!
//! - Payloads start with `0xA1` (media) or `0xA2` (receiver report); the layouts are in
//!   `docs/protocol.md` section 10. Carry them unreliably (no retransmission: a late
//!   frame is worthless), each in its own datagram, and keep them apart from reliable
//!   frames of the same session by whatever framing the session uses.
//! - [`CallMedia::handle_packet`] fails only on a payload that is not a media packet:
//!   count it and carry on.
//! - Capture and playout run on the sound card's clock (or, headless, a 20 ms timer);
//!   pass the time of each call. Keep capturing (silence is cheap: DTX sends almost
//!   nothing) until hang-up, so the listener can tell a pause from an outage.
//! - [`CallStats`] covers the media; call setup time and the path (direct or relay) are
//!   known only to the caller of this crate and belong next to it in the call's report.
//! - [`wav::read_wav`] gives any common WAV as 48 kHz mono; [`wav::write_wav`] writes
//!   what [`CallMedia::pull_playout`] returned.
//! - One [`CallMedia`] per call: sequence numbers and the playout clock start afresh.
#![deny(missing_docs)]

pub mod call;
pub mod codec;
pub mod jitter;
pub mod netem;
pub mod packet;
pub mod sender;
pub mod sim;
pub mod wav;

pub use call::{CallMedia, CallStats, MediaConfig};
pub use codec::{Frame, FRAME_MS, FRAME_SAMPLES, SAMPLE_RATE};
pub use jitter::{JitterBuffer, JitterConfig, ReceiveStats};
pub use packet::{Packet, PacketError};
pub use sender::{MediaSender, RatePolicy, SendStats};

/// Errors of the media engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    /// A payload from the peer is not a media packet.
    #[error("bad media packet: {0}")]
    Packet(PacketError),
    /// libopus refused an operation (a bug or an impossible setting, never peer input).
    #[error("opus: {0}: {1}")]
    Opus(&'static str, String),
    /// A captured frame of the wrong length.
    #[error("captured frame of {0} samples, expected {FRAME_SAMPLES} (20 ms at 48 kHz mono)")]
    FrameSize(usize),
    /// A WAV file could not be read or written.
    #[error("{0}: {1}")]
    Wav(String, String),
    /// Resampling failed.
    #[error("resampling: {0}")]
    Resample(String),
    /// An impossible configuration.
    #[error("media configuration: {0}")]
    Config(String),
}
