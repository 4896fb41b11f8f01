//! Length-prefixed framing for byte streams (the node-to-node channel over TCP).
//!
//! A frame is a 2-byte big-endian length `n` followed by `n` bytes, with
//! `1 <= n <= max_len` and `max_len <= 65535` (Noise's message limit). Sans-IO: the caller
//! reads from its socket into [`FrameReader::spare`], reports how many bytes arrived with
//! [`FrameReader::filled`], then takes complete frames with [`FrameReader::next_frame`].
//! The reader's buffer is allocated once, `2 + max_len` bytes, and never grows: a peer
//! announcing a longer frame is an error before any of its body is buffered.

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 2;
/// The largest frame body any stream may carry (Noise's message limit).
pub const MAX_FRAME_LIMIT: usize = u16::MAX as usize;

/// Why a stream's frame was refused. The stream is unusable afterwards: close it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FrameError {
    /// A frame announced a length of zero.
    #[error("empty frame")]
    Empty,
    /// A frame announced (or the caller offered) more than the stream's limit.
    #[error("frame of {len} bytes over the limit of {limit}")]
    TooLarge {
        /// Length announced or offered.
        len: usize,
        /// The stream's limit.
        limit: usize,
    },
}

/// Appends `body` as one frame to `out`. Refuses empty bodies and bodies over `max_len`
/// (itself capped at [`MAX_FRAME_LIMIT`]), so the writer can never emit what a reader
/// with the same limit would refuse.
pub fn write_frame(out: &mut Vec<u8>, body: &[u8], max_len: usize) -> Result<(), FrameError> {
    let limit = max_len.min(MAX_FRAME_LIMIT);
    if body.is_empty() {
        return Err(FrameError::Empty);
    }
    let n = u16::try_from(body.len())
        .ok()
        .filter(|&n| usize::from(n) <= limit)
        .ok_or(FrameError::TooLarge {
            len: body.len(),
            limit,
        })?;
    out.extend_from_slice(&n.to_be_bytes());
    out.extend_from_slice(body);
    Ok(())
}

/// Incremental decoder of length-prefixed frames with a fixed-size buffer.
#[derive(Debug, Clone)]
pub struct FrameReader {
    buf: Box<[u8]>,
    /// Start of unconsumed bytes.
    start: usize,
    /// End of received bytes.
    end: usize,
    max_len: usize,
    /// Set once a bad length was seen: the stream is dead.
    failed: Option<FrameError>,
}

impl FrameReader {
    /// A reader for frames of at most `max_len` bytes (capped at [`MAX_FRAME_LIMIT`]).
    pub fn new(max_len: usize) -> FrameReader {
        let max_len = max_len.clamp(1, MAX_FRAME_LIMIT);
        FrameReader {
            buf: vec![0u8; LEN_PREFIX + max_len].into_boxed_slice(),
            start: 0,
            end: 0,
            max_len,
            failed: None,
        }
    }

    /// The largest frame body this reader accepts.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// True when some bytes of a frame have arrived but not the whole frame (a read
    /// deadline applies to the rest).
    pub fn is_partial(&self) -> bool {
        self.end > self.start
    }

    /// Free space to read into. Empty only when a complete frame is waiting to be taken
    /// with [`next_frame`](Self::next_frame) (so a caller that drains frames before
    /// reading always gets room), or after an error.
    pub fn spare(&mut self) -> &mut [u8] {
        if self.failed.is_some() {
            return &mut [];
        }
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.start > 0 && self.end == self.buf.len() {
            // Move the partial frame to the front: a whole frame always fits the buffer.
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        &mut self.buf[self.end..]
    }

    /// Records that `n` bytes were written at the start of the last [`spare`](Self::spare).
    /// `n` larger than that space is clamped (a caller bug, never trusted).
    pub fn filled(&mut self, n: usize) {
        self.end = self.end.saturating_add(n).min(self.buf.len());
    }

    /// Copies as much of `data` as fits; returns how many bytes were taken. A convenience
    /// for callers that already hold the bytes (tests, fuzzing).
    pub fn push(&mut self, data: &[u8]) -> usize {
        let spare = self.spare();
        let n = spare.len().min(data.len());
        spare[..n].copy_from_slice(&data[..n]);
        self.filled(n);
        n
    }

    /// The next complete frame's body, `Ok(None)` when more bytes are needed, or the error
    /// that ended the stream (returned again on every later call).
    pub fn next_frame(&mut self) -> Result<Option<&[u8]>, FrameError> {
        if let Some(e) = self.failed {
            return Err(e);
        }
        let avail = &self.buf[self.start..self.end];
        let Some(&[hi, lo]) = avail.get(..LEN_PREFIX) else {
            return Ok(None);
        };
        let n = usize::from(u16::from_be_bytes([hi, lo]));
        if n == 0 || n > self.max_len {
            let e = if n == 0 {
                FrameError::Empty
            } else {
                FrameError::TooLarge {
                    len: n,
                    limit: self.max_len,
                }
            };
            self.failed = Some(e);
            return Err(e);
        }
        if avail.len() < LEN_PREFIX + n {
            return Ok(None);
        }
        let body = self.start + LEN_PREFIX;
        self.start = body + n;
        Ok(self.buf.get(body..body + n))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn encode_all(frames: &[Vec<u8>], max: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for f in frames {
            write_frame(&mut out, f, max).expect("frames within limits");
        }
        out
    }

    /// Feeds `bytes` in chunks of the given sizes (cycled) and collects frames.
    fn decode_chunked(
        bytes: &[u8],
        chunks: &[usize],
        max: usize,
    ) -> (Vec<Vec<u8>>, Option<FrameError>) {
        let mut r = FrameReader::new(max);
        let mut got = Vec::new();
        let mut rest = bytes;
        let mut i = 0;
        loop {
            loop {
                match r.next_frame() {
                    Ok(Some(f)) => got.push(f.to_vec()),
                    Ok(None) => break,
                    Err(e) => return (got, Some(e)),
                }
            }
            if rest.is_empty() {
                return (got, None);
            }
            let want = chunks
                .get(i % chunks.len().max(1))
                .copied()
                .unwrap_or(1)
                .max(1);
            i += 1;
            let take = want.min(rest.len());
            let n = r.push(&rest[..take]);
            assert!(n > 0, "reader must take bytes after frames are drained");
            rest = &rest[n..];
        }
    }

    #[test]
    fn round_trip_one_frame() {
        let mut out = Vec::new();
        write_frame(&mut out, b"hello", 100).expect("fits");
        assert_eq!(out, [0, 5, b'h', b'e', b'l', b'l', b'o']);
        let mut r = FrameReader::new(100);
        assert_eq!(r.push(&out), out.len());
        assert_eq!(r.next_frame(), Ok(Some(&b"hello"[..])));
        assert_eq!(r.next_frame(), Ok(None));
        assert!(!r.is_partial());
    }

    #[test]
    fn writer_refuses_empty_and_oversized() {
        let mut out = Vec::new();
        assert_eq!(write_frame(&mut out, b"", 10), Err(FrameError::Empty));
        assert_eq!(
            write_frame(&mut out, &[0; 11], 10),
            Err(FrameError::TooLarge { len: 11, limit: 10 })
        );
        assert_eq!(
            write_frame(&mut out, &vec![0; 65536], usize::MAX),
            Err(FrameError::TooLarge {
                len: 65536,
                limit: 65535
            })
        );
        assert!(out.is_empty(), "a refused frame writes nothing");
    }

    #[test]
    fn over_long_length_fails_before_body_and_stays_failed() {
        let mut r = FrameReader::new(8);
        r.push(&[0, 9]);
        let e = FrameError::TooLarge { len: 9, limit: 8 };
        assert_eq!(r.next_frame(), Err(e));
        assert_eq!(r.next_frame(), Err(e));
        assert!(r.spare().is_empty(), "a failed reader takes no more bytes");
    }

    #[test]
    fn zero_length_is_an_error() {
        let mut r = FrameReader::new(8);
        r.push(&[0, 0, 1]);
        assert_eq!(r.next_frame(), Err(FrameError::Empty));
    }

    #[test]
    fn partial_frame_is_reported_and_compacted() {
        let max = 4;
        let mut r = FrameReader::new(max);
        // One full frame and the first byte of the next: the buffer (6 bytes) is full.
        assert_eq!(r.push(&[0, 3, 1, 2, 3, 0]), 6);
        assert_eq!(r.next_frame(), Ok(Some(&[1u8, 2, 3][..])));
        assert_eq!(r.next_frame(), Ok(None));
        assert!(r.is_partial());
        // The partial frame moves to the front, leaving room for the rest of it.
        assert_eq!(r.spare().len(), 5);
        assert_eq!(r.push(&[4, 9, 9, 9, 9]), 5);
        assert_eq!(r.next_frame(), Ok(Some(&[9u8, 9, 9, 9][..])));
        assert!(!r.is_partial());
    }

    proptest! {
        #[test]
        fn any_frames_any_chunking_round_trip(
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..300), 0..20),
            chunks in proptest::collection::vec(1usize..700, 1..8),
        ) {
            let bytes = encode_all(&frames, 300);
            let (got, err) = decode_chunked(&bytes, &chunks, 300);
            prop_assert_eq!(err, None);
            prop_assert_eq!(got, frames);
        }

        #[test]
        fn arbitrary_bytes_never_panic_and_frames_respect_limit(
            bytes in proptest::collection::vec(any::<u8>(), 0..2000),
            chunks in proptest::collection::vec(1usize..300, 1..8),
            max in 1usize..600,
        ) {
            let (got, _) = decode_chunked(&bytes, &chunks, max);
            let mut consumed = 0;
            for f in &got {
                prop_assert!(!f.is_empty() && f.len() <= max);
                consumed += LEN_PREFIX + f.len();
            }
            prop_assert!(consumed <= bytes.len());
            // The frames decoded are exactly the prefix of the input they encode.
            prop_assert_eq!(&encode_all(&got, max)[..], &bytes[..consumed]);
        }

        #[test]
        fn frame_over_limit_is_refused_by_both_ends(len in 1usize..2000, max in 1usize..1000) {
            let body = vec![7u8; len];
            let mut out = Vec::new();
            let w = write_frame(&mut out, &body, max);
            prop_assert_eq!(w.is_ok(), len <= max);
            // A raw over-long prefix is refused by the reader with the same limit.
            let mut raw = (len as u16).to_be_bytes().to_vec();
            raw.extend_from_slice(&body);
            let (got, err) = decode_chunked(&raw, &[64], max);
            if len <= max {
                prop_assert_eq!(got, vec![body]);
            } else {
                prop_assert_eq!(err, Some(FrameError::TooLarge { len, limit: max }));
            }
        }
    }
}
