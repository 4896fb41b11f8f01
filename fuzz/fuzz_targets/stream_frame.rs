//! The stream framing reader fed arbitrary bytes in arbitrary chunks: it never panics,
//! never yields a frame over its limit, and the frames it yields re-encode to exactly the
//! input they came from.
//!
//! Input format: `[max_len u16 BE][chunk u8][bytes...]`; bytes are pushed `chunk + 1` at a time.
#![no_main]
use libfuzzer_sys::fuzz_target;
use peerline_wire::stream::{write_frame, FrameReader, LEN_PREFIX};

fuzz_target!(|data: &[u8]| {
    let [hi, lo, chunk, rest @ ..] = data else {
        return;
    };
    let max = usize::from(u16::from_be_bytes([*hi, *lo])).max(1);
    let chunk = usize::from(*chunk) + 1;
    let mut r = FrameReader::new(max);
    let mut input = rest;
    let mut reencoded = Vec::new();
    let mut consumed = 0usize;
    'outer: loop {
        loop {
            match r.next_frame() {
                Ok(Some(f)) => {
                    assert!(!f.is_empty() && f.len() <= max);
                    consumed += LEN_PREFIX + f.len();
                    assert!(write_frame(&mut reencoded, f, max).is_ok());
                }
                Ok(None) => break,
                Err(_) => break 'outer,
            }
        }
        if input.is_empty() {
            break;
        }
        let n = r.push(&input[..chunk.min(input.len())]);
        assert!(n > 0);
        input = &input[n..];
    }
    assert_eq!(&reencoded[..], &rest[..consumed]);
});
