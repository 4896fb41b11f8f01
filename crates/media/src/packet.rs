//! Media and feedback packets: byte layouts and total decoders.
//!
//! Both packets travel as the plaintext of one encrypted, unreliable datagram of the peer
//! session, so they carry no addresses, no keys and no length prefix of their own. Layouts
//! are in `docs/protocol.md` (section "Media packets"). Every byte string decodes to a
//! packet or a [`PacketError`]; whatever decodes re-encodes to the same bytes.

use thiserror::Error;

/// First byte of a media packet (version 1).
pub const KIND_MEDIA: u8 = 0xA1;
/// First byte of a feedback (receiver report) packet (version 1).
pub const KIND_FEEDBACK: u8 = 0xA2;

/// Largest media packet the decoder accepts. The encoder stays under
/// [`MEDIA_BUDGET`]; a peer session datagram holds at most 1,200 bytes with its overhead.
pub const MAX_PACKET: usize = 1100;
/// Size the sender keeps media packets under, redundancy included.
pub const MEDIA_BUDGET: usize = 900;
/// Most redundant copies one media packet may carry.
pub const MAX_REDUNDANT: usize = 4;
/// Size of a media packet's fixed header.
pub const MEDIA_HEADER: usize = 9;
/// Size of a redundant block's header (distance, length).
pub const RED_BLOCK_HEADER: usize = 3;
/// Size of a feedback packet (fixed).
pub const FEEDBACK_LEN: usize = 27;

/// Media flag: the primary frame is an Opus DTX frame; the sender sends nothing more until
/// speech resumes, so the receiver plays comfort noise rather than counting a loss.
pub const FLAG_DTX: u8 = 0x01;
/// Media flag: the sender's Opus encoder has in-band FEC switched on.
pub const FLAG_FEC: u8 = 0x02;
const MEDIA_FLAGS_KNOWN: u8 = FLAG_DTX | FLAG_FEC;

/// Feedback flag: `echo_ms` and `echo_delay_ms` are meaningful.
pub const FLAG_ECHO: u8 = 0x01;
const FEEDBACK_FLAGS_KNOWN: u8 = FLAG_ECHO;

/// Why a byte string is not a media or feedback packet.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[non_exhaustive]
pub enum PacketError {
    /// The packet ends before a field it announces.
    #[error("media packet truncated")]
    UnexpectedEnd,
    /// The first byte names no known packet kind or version.
    #[error("unknown media packet kind 0x{0:02x}")]
    UnknownKind(u8),
    /// A reserved flag bit is set.
    #[error("reserved flag bits set: 0x{0:02x}")]
    ReservedFlags(u8),
    /// More redundant copies than [`MAX_REDUNDANT`].
    #[error("{0} redundant copies, at most {MAX_REDUNDANT}")]
    TooManyCopies(u8),
    /// Redundant copies must go strictly further back, starting one frame back.
    #[error("redundant copy distances out of order")]
    BadDistance,
    /// An Opus frame of zero bytes (an Opus frame holds at least its TOC byte).
    #[error("empty Opus frame")]
    EmptyFrame,
    /// Larger than [`MAX_PACKET`].
    #[error("media packet of {0} bytes, at most {MAX_PACKET}")]
    TooLarge(usize),
    /// A fixed-size packet with bytes after its end.
    #[error("trailing bytes after the packet")]
    Trailing,
}

/// A copy of an earlier frame carried again (RED-style, RFC 2198 in spirit).
///
/// Copies are of the sender's previous transmitted packets in order: the `k`-th copy
/// (counting from 1) is of the packet whose sequence number is the primary's minus `k`,
/// and `distance` says how many 20 ms frames before the primary it was captured (more
/// than `k` when DTX left frames unsent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Redundant {
    /// Frames between this copy and the primary frame (at least 1).
    pub distance: u8,
    /// The Opus frame, exactly as first sent.
    pub opus: Vec<u8>,
}

/// One 20 ms Opus frame plus redundant copies of earlier ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MediaPacket {
    /// [`FLAG_DTX`], [`FLAG_FEC`].
    pub flags: u8,
    /// Incremented by one for every media packet sent (DTX gaps leave no hole).
    pub seq: u16,
    /// Capture time of the primary frame's first sample, in 48 kHz samples.
    pub timestamp: u32,
    /// Earlier frames, nearest first (distances strictly increasing).
    pub redundant: Vec<Redundant>,
    /// The primary Opus frame.
    pub opus: Vec<u8>,
}

/// Receiver report: what one side has received of the other's media, and a time echo for
/// the round-trip time (as RTCP's LSR/DLSR).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Feedback {
    /// [`FLAG_ECHO`].
    pub flags: u8,
    /// Highest media sequence number received, extended to 32 bits (cycles in the high half).
    pub highest_seq: u32,
    /// Distinct media packets received since the call started (wrapping).
    pub received: u32,
    /// Interarrival jitter (RFC 3550 section 6.4.1) in tenths of a millisecond.
    pub jitter_tenth_ms: u16,
    /// Frames played after loss recovery failed (concealed), in 1/65536 of frames played
    /// since the previous report.
    pub residual_loss: u16,
    /// Sender's clock when this report left, in milliseconds (wrapping).
    pub send_ms: u32,
    /// `send_ms` of the last report received from the peer.
    pub echo_ms: u32,
    /// Milliseconds between receiving that report and sending this one.
    pub echo_delay_ms: u16,
    /// Current playout delay of the sender of this report, in milliseconds.
    pub playout_delay_ms: u16,
    /// Mean length of runs of consecutive lost packets, in tenths of a packet (saturating
    /// at 25.5): how bursty the loss is, so the sender can spread its redundancy.
    pub loss_run_tenths: u8,
}

/// A decoded media-plane packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// Audio.
    Media(MediaPacket),
    /// Receiver report.
    Feedback(Feedback),
}

/// Reads fields from a byte slice, failing with `UnexpectedEnd` instead of panicking.
struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PacketError> {
        if self.buf.len() < n {
            return Err(PacketError::UnexpectedEnd);
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }
    fn u8(&mut self) -> Result<u8, PacketError> {
        Ok(self.take(1)?[0])
    }
    fn u16(&mut self) -> Result<u16, PacketError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }
    fn u32(&mut self) -> Result<u32, PacketError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
}

impl Packet {
    /// Decodes one packet. Total: any input gives a packet or an error.
    pub fn decode(buf: &[u8]) -> Result<Packet, PacketError> {
        match buf.first() {
            None => Err(PacketError::UnexpectedEnd),
            Some(&KIND_MEDIA) => MediaPacket::decode(buf).map(Packet::Media),
            Some(&KIND_FEEDBACK) => Feedback::decode(buf).map(Packet::Feedback),
            Some(&k) => Err(PacketError::UnknownKind(k)),
        }
    }

    /// Appends the packet's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Packet::Media(m) => m.encode(out),
            Packet::Feedback(f) => f.encode(out),
        }
    }
}

impl MediaPacket {
    /// Decodes a media packet (first byte [`KIND_MEDIA`]).
    pub fn decode(buf: &[u8]) -> Result<MediaPacket, PacketError> {
        if buf.len() > MAX_PACKET {
            return Err(PacketError::TooLarge(buf.len()));
        }
        let mut r = Reader { buf };
        let kind = r.u8()?;
        if kind != KIND_MEDIA {
            return Err(PacketError::UnknownKind(kind));
        }
        let flags = r.u8()?;
        if flags & !MEDIA_FLAGS_KNOWN != 0 {
            return Err(PacketError::ReservedFlags(flags));
        }
        let seq = r.u16()?;
        let timestamp = r.u32()?;
        let count = r.u8()?;
        if usize::from(count) > MAX_REDUNDANT {
            return Err(PacketError::TooManyCopies(count));
        }
        let mut redundant = Vec::with_capacity(usize::from(count));
        let mut last_distance = 0u8;
        for _ in 0..count {
            let distance = r.u8()?;
            if distance <= last_distance {
                return Err(PacketError::BadDistance);
            }
            last_distance = distance;
            let len = usize::from(r.u16()?);
            if len == 0 {
                return Err(PacketError::EmptyFrame);
            }
            let opus = r.take(len)?.to_vec();
            redundant.push(Redundant { distance, opus });
        }
        if r.buf.is_empty() {
            return Err(PacketError::EmptyFrame);
        }
        Ok(MediaPacket {
            flags,
            seq,
            timestamp,
            redundant,
            opus: r.buf.to_vec(),
        })
    }

    /// Encoded size in bytes.
    pub fn len(&self) -> usize {
        MEDIA_HEADER
            + self
                .redundant
                .iter()
                .map(|c| RED_BLOCK_HEADER + c.opus.len())
                .sum::<usize>()
            + self.opus.len()
    }

    /// True when the packet would encode to nothing (never: the header is always there).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Appends the packet's bytes to `out`. The caller keeps the invariants the decoder
    /// checks (at most [`MAX_REDUNDANT`] copies, increasing distances, frames of 1 to
    /// 65,535 bytes); [`crate::MediaSender`] does.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.reserve(self.len());
        out.push(KIND_MEDIA);
        out.push(self.flags);
        out.extend_from_slice(&self.seq.to_le_bytes());
        out.extend_from_slice(&self.timestamp.to_le_bytes());
        // Saturating casts: a caller breaking the invariants gets a packet the decoder
        // rejects, never a panic here.
        out.push(u8::try_from(self.redundant.len()).unwrap_or(u8::MAX));
        for c in &self.redundant {
            out.push(c.distance);
            out.extend_from_slice(
                &u16::try_from(c.opus.len())
                    .unwrap_or(u16::MAX)
                    .to_le_bytes(),
            );
            out.extend_from_slice(&c.opus);
        }
        out.extend_from_slice(&self.opus);
    }
}

impl Feedback {
    /// Decodes a feedback packet (first byte [`KIND_FEEDBACK`], exactly [`FEEDBACK_LEN`] bytes).
    pub fn decode(buf: &[u8]) -> Result<Feedback, PacketError> {
        let mut r = Reader { buf };
        let kind = r.u8()?;
        if kind != KIND_FEEDBACK {
            return Err(PacketError::UnknownKind(kind));
        }
        let flags = r.u8()?;
        if flags & !FEEDBACK_FLAGS_KNOWN != 0 {
            return Err(PacketError::ReservedFlags(flags));
        }
        let fb = Feedback {
            flags,
            highest_seq: r.u32()?,
            received: r.u32()?,
            jitter_tenth_ms: r.u16()?,
            residual_loss: r.u16()?,
            send_ms: r.u32()?,
            echo_ms: r.u32()?,
            echo_delay_ms: r.u16()?,
            playout_delay_ms: r.u16()?,
            loss_run_tenths: r.u8()?,
        };
        if !r.buf.is_empty() {
            return Err(PacketError::Trailing);
        }
        Ok(fb)
    }

    /// Appends the packet's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.push(KIND_FEEDBACK);
        out.push(self.flags);
        out.extend_from_slice(&self.highest_seq.to_le_bytes());
        out.extend_from_slice(&self.received.to_le_bytes());
        out.extend_from_slice(&self.jitter_tenth_ms.to_le_bytes());
        out.extend_from_slice(&self.residual_loss.to_le_bytes());
        out.extend_from_slice(&self.send_ms.to_le_bytes());
        out.extend_from_slice(&self.echo_ms.to_le_bytes());
        out.extend_from_slice(&self.echo_delay_ms.to_le_bytes());
        out.extend_from_slice(&self.playout_delay_ms.to_le_bytes());
        out.push(self.loss_run_tenths);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn media() -> impl Strategy<Value = MediaPacket> {
        (
            0u8..4,
            any::<u16>(),
            any::<u32>(),
            proptest::collection::vec(
                proptest::collection::vec(any::<u8>(), 1..200),
                0..=MAX_REDUNDANT,
            ),
            proptest::collection::vec(any::<u8>(), 1..200),
            1u8..10,
        )
            .prop_map(|(flags, seq, timestamp, copies, opus, step)| MediaPacket {
                flags,
                seq,
                timestamp,
                redundant: copies
                    .into_iter()
                    .enumerate()
                    .map(|(i, opus)| Redundant {
                        // Strictly increasing distances: 1, 1 + step, 1 + 2 step, ...
                        distance: 1 + step * u8::try_from(i).unwrap_or(0),
                        opus,
                    })
                    .collect(),
                opus,
            })
    }

    fn feedback() -> impl Strategy<Value = Feedback> {
        (
            0u8..2,
            any::<u32>(),
            any::<u32>(),
            any::<u16>(),
            any::<u16>(),
            any::<u32>(),
            any::<u32>(),
            any::<u16>(),
            any::<u16>(),
            any::<u8>(),
        )
            .prop_map(|(flags, h, rc, j, rl, s, e, ed, pd, res)| Feedback {
                flags,
                highest_seq: h,
                received: rc,
                jitter_tenth_ms: j,
                residual_loss: rl,
                send_ms: s,
                echo_ms: e,
                echo_delay_ms: ed,
                playout_delay_ms: pd,
                loss_run_tenths: res,
            })
    }

    proptest! {
        #[test]
        fn media_round_trips(p in media()) {
            let mut out = Vec::new();
            p.encode(&mut out);
            prop_assert_eq!(out.len(), p.len());
            prop_assert_eq!(Packet::decode(&out), Ok(Packet::Media(p)));
        }

        #[test]
        fn feedback_round_trips(f in feedback()) {
            let mut out = Vec::new();
            f.encode(&mut out);
            prop_assert_eq!(out.len(), FEEDBACK_LEN);
            prop_assert_eq!(Packet::decode(&out), Ok(Packet::Feedback(f)));
        }

        /// Garbage never panics, and whatever decodes re-encodes to the same bytes.
        #[test]
        fn garbage_is_total_and_canonical(buf in proptest::collection::vec(any::<u8>(), 0..1200)) {
            if let Ok(p) = Packet::decode(&buf) {
                let mut out = Vec::new();
                p.encode(&mut out);
                prop_assert_eq!(out, buf);
            }
        }

        /// Garbage after a valid kind byte exercises the field checks, not just the kind.
        #[test]
        fn garbage_with_valid_kind(kind in prop_oneof![Just(KIND_MEDIA), Just(KIND_FEEDBACK)],
                                   rest in proptest::collection::vec(any::<u8>(), 0..300)) {
            let mut buf = vec![kind];
            buf.extend_from_slice(&rest);
            if let Ok(p) = Packet::decode(&buf) {
                let mut out = Vec::new();
                p.encode(&mut out);
                prop_assert_eq!(out, buf);
            }
        }

        /// Every strict prefix of a valid media packet with copies fails cleanly or decodes
        /// to a packet with a shorter primary frame, never panics.
        #[test]
        fn truncations_are_total(p in media()) {
            let mut out = Vec::new();
            p.encode(&mut out);
            for n in 0..out.len() {
                let _ = Packet::decode(&out[..n]);
            }
        }
    }

    #[test]
    fn rejects_what_it_should() {
        assert_eq!(Packet::decode(&[]), Err(PacketError::UnexpectedEnd));
        assert_eq!(Packet::decode(&[0x7f]), Err(PacketError::UnknownKind(0x7f)));
        // Header only: no primary frame.
        let hdr = [KIND_MEDIA, 0, 0, 1, 0, 0, 0, 0, 0];
        assert_eq!(Packet::decode(&hdr), Err(PacketError::EmptyFrame));
        let mut reserved = hdr.to_vec();
        reserved[1] = 0x80;
        reserved.push(1);
        assert_eq!(
            Packet::decode(&reserved),
            Err(PacketError::ReservedFlags(0x80))
        );
        let mut many = hdr.to_vec();
        many[8] = 5;
        assert_eq!(Packet::decode(&many), Err(PacketError::TooManyCopies(5)));
        // Two copies at the same distance.
        let mut same = hdr.to_vec();
        same[8] = 2;
        same.extend_from_slice(&[1, 1, 0, 0xaa, 1, 1, 0, 0xbb, 0xcc]);
        assert_eq!(Packet::decode(&same), Err(PacketError::BadDistance));
        // A copy announcing more bytes than follow.
        let mut short = hdr.to_vec();
        short[8] = 1;
        short.extend_from_slice(&[1, 50, 0, 0xaa]);
        assert_eq!(Packet::decode(&short), Err(PacketError::UnexpectedEnd));
        assert_eq!(
            Packet::decode(&vec![KIND_MEDIA; MAX_PACKET + 1]),
            Err(PacketError::TooLarge(MAX_PACKET + 1))
        );
        let mut fb = Vec::new();
        Feedback::default().encode(&mut fb);
        fb.push(0);
        assert_eq!(Packet::decode(&fb), Err(PacketError::Trailing));
    }
}
