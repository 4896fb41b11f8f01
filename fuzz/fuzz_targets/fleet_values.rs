//! Fleet directory values read back from Redis: never panic; what decodes re-encodes exactly.
#![no_main]
use libfuzzer_sys::fuzz_target;
use peerline_fleet::codec::{
    decode_location, decode_member, decode_stamped_member, encode_location, encode_member,
    encode_stamped_member,
};
use peerline_fleet::DirectoryUrl;

fuzz_target!(|data: &[u8]| {
    if let Ok(loc) = decode_location(data) {
        assert_eq!(encode_location(loc).as_bytes(), data);
    }
    if let Ok(m) = decode_member(data) {
        assert_eq!(decode_member(encode_member(&m).as_bytes()), Ok(m));
    }
    if let Ok((stamp, m)) = decode_stamped_member(data) {
        let again = encode_stamped_member(stamp, &m);
        assert_eq!(decode_stamped_member(again.as_bytes()), Ok((stamp, m)));
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = DirectoryUrl::parse(s);
    }
});
