//! Text encodings of the values the directory keeps in Redis.
//!
//! Values come back from the network, so every decoder is total: any byte string gives a
//! value or a [`DecodeError`], never a panic, and nothing is allocated beyond the input's
//! own (bounded) size. Encodings are canonical (decimal without leading zeros), because
//! release compares the stored bytes with the encoding of the caller's location.
//!
//! - location: `NODE:EPOCH`, e.g. `17:1764000000000`;
//! - member record: `1 ID EPOCH CLIENT_ADDR FLEET_ADDR ONLINE CAPACITY DRAINING` (the
//!   leading `1` is the format version, DRAINING is `0` or `1`);
//! - stamped member (a value of the members hash): `EXPIRES_MS RECORD`, where the stamp is
//!   the Redis server's clock in milliseconds, written by the announce script.

use std::net::SocketAddr;

use crate::{FleetLocation, Member};

/// The longest location value accepted.
pub const MAX_LOCATION_LEN: usize = 32;
/// The longest stamped member value accepted.
pub const MAX_MEMBER_LEN: usize = 256;

/// Why a stored value could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// Longer than any value this crate writes.
    #[error("value too long ({0} bytes)")]
    TooLong(usize),
    /// Not ASCII text.
    #[error("value is not ASCII text")]
    NotText,
    /// A field is missing or there are extra fields.
    #[error("value has the wrong number of fields")]
    Fields,
    /// A number is empty, not decimal, not canonical, or out of range.
    #[error("bad number in field {0}")]
    Number(&'static str),
    /// An address does not parse.
    #[error("bad socket address in field {0}")]
    Addr(&'static str),
    /// A record of a format version this build does not know.
    #[error("unknown member record version")]
    Version,
}

/// Encodes a location value.
pub fn encode_location(loc: FleetLocation) -> String {
    format!("{}:{}", loc.node, loc.epoch)
}

/// Decodes a location value.
pub fn decode_location(bytes: &[u8]) -> Result<FleetLocation, DecodeError> {
    if bytes.len() > MAX_LOCATION_LEN {
        return Err(DecodeError::TooLong(bytes.len()));
    }
    let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::NotText)?;
    let (node, epoch) = s.split_once(':').ok_or(DecodeError::Fields)?;
    Ok(FleetLocation {
        node: number(node, "node")?,
        epoch: number(epoch, "epoch")?,
    })
}

/// Encodes a member record (without the expiry stamp, which the server adds).
pub fn encode_member(m: &Member) -> String {
    format!(
        "1 {} {} {} {} {} {} {}",
        m.id,
        m.epoch,
        m.client_addr,
        m.fleet_addr,
        m.online,
        m.capacity,
        u8::from(m.draining)
    )
}

/// Decodes a member record.
pub fn decode_member(bytes: &[u8]) -> Result<Member, DecodeError> {
    if bytes.len() > MAX_MEMBER_LEN {
        return Err(DecodeError::TooLong(bytes.len()));
    }
    let s = std::str::from_utf8(bytes).map_err(|_| DecodeError::NotText)?;
    let mut f = s.split(' ');
    let mut next = || f.next().ok_or(DecodeError::Fields);
    if next()? != "1" {
        return Err(DecodeError::Version);
    }
    let id = number(next()?, "id")?;
    let epoch = number(next()?, "epoch")?;
    let client_addr = addr(next()?, "client_addr")?;
    let fleet_addr = addr(next()?, "fleet_addr")?;
    let online = number(next()?, "online")?;
    let capacity = number(next()?, "capacity")?;
    let draining = match next()? {
        "0" => false,
        "1" => true,
        _ => return Err(DecodeError::Number("draining")),
    };
    if f.next().is_some() {
        return Err(DecodeError::Fields);
    }
    Ok(Member {
        id,
        epoch,
        client_addr,
        fleet_addr,
        online,
        capacity,
        draining,
    })
}

/// Encodes a value of the members hash: the expiry stamp, then the record.
pub fn encode_stamped_member(expires_ms: u64, m: &Member) -> String {
    format!("{expires_ms} {}", encode_member(m))
}

/// Decodes a value of the members hash into its expiry stamp and record.
pub fn decode_stamped_member(bytes: &[u8]) -> Result<(u64, Member), DecodeError> {
    if bytes.len() > MAX_MEMBER_LEN {
        return Err(DecodeError::TooLong(bytes.len()));
    }
    let split = bytes
        .iter()
        .position(|&b| b == b' ')
        .ok_or(DecodeError::Fields)?;
    let (stamp, rest) = bytes.split_at(split);
    let stamp = std::str::from_utf8(stamp).map_err(|_| DecodeError::NotText)?;
    // `rest` starts with the separating space (position found it).
    let record = rest.get(1..).ok_or(DecodeError::Fields)?;
    Ok((number(stamp, "expires")?, decode_member(record)?))
}

/// Canonical unsigned decimal: non-empty, digits only, no leading zero unless it is "0".
fn number<T: std::str::FromStr>(s: &str, field: &'static str) -> Result<T, DecodeError> {
    let canonical = !s.is_empty()
        && s.bytes().all(|b| b.is_ascii_digit())
        && (s.len() == 1 || !s.starts_with('0'));
    if !canonical {
        return Err(DecodeError::Number(field));
    }
    s.parse().map_err(|_| DecodeError::Number(field))
}

fn addr(s: &str, field: &'static str) -> Result<SocketAddr, DecodeError> {
    s.parse().map_err(|_| DecodeError::Addr(field))
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv6Addr, SocketAddrV6};

    use proptest::prelude::*;

    use super::*;

    fn arb_addr() -> impl Strategy<Value = SocketAddr> {
        prop_oneof![
            (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, p)| SocketAddr::from((ip, p))),
            (any::<[u8; 16]>(), any::<u16>())
                .prop_map(|(ip, p)| SocketAddr::V6(SocketAddrV6::new(Ipv6Addr::from(ip), p, 0, 0))),
        ]
    }

    fn arb_member() -> impl Strategy<Value = Member> {
        (
            any::<u32>(),
            any::<u64>(),
            arb_addr(),
            arb_addr(),
            any::<u32>(),
            any::<u32>(),
            any::<bool>(),
        )
            .prop_map(
                |(id, epoch, client_addr, fleet_addr, online, capacity, draining)| Member {
                    id,
                    epoch,
                    client_addr,
                    fleet_addr,
                    online,
                    capacity,
                    draining,
                },
            )
    }

    #[test]
    fn location_has_the_documented_form() {
        let loc = FleetLocation {
            node: 17,
            epoch: 1_764_000_000_000,
        };
        assert_eq!(encode_location(loc), "17:1764000000000");
        assert_eq!(decode_location(b"17:1764000000000"), Ok(loc));
    }

    #[test]
    fn non_canonical_or_out_of_range_numbers_are_rejected() {
        for bad in [
            &b"017:1"[..],
            b"1:01",
            b"+1:1",
            b"1:",
            b":1",
            b"1",
            b"4294967296:1",
            b"1:18446744073709551616",
            b"1:1:1",
            b"1 :1",
            b"\xff:1",
        ] {
            assert!(decode_location(bad).is_err(), "{bad:?} decoded");
        }
        assert_eq!(decode_location(&[b'1'; 40]), Err(DecodeError::TooLong(40)));
    }

    #[test]
    fn member_record_has_the_documented_form() {
        let m = Member {
            id: 3,
            epoch: 99,
            client_addr: "192.0.2.1:7000".parse().expect("literal"),
            fleet_addr: "[2001:db8::1]:7100".parse().expect("literal"),
            online: 12,
            capacity: 1_000_000,
            draining: true,
        };
        let s = encode_stamped_member(5000, &m);
        assert_eq!(
            s,
            "5000 1 3 99 192.0.2.1:7000 [2001:db8::1]:7100 12 1000000 1"
        );
        assert_eq!(decode_stamped_member(s.as_bytes()), Ok((5000, m)));
    }

    #[test]
    fn malformed_member_records_are_rejected() {
        for bad in [
            &b""[..],
            b"5000",
            b"5000 ",
            b"5000 2 3 99 1.2.3.4:1 1.2.3.4:2 0 1 0",
            b"5000 1 3 99 1.2.3.4 1.2.3.4:2 0 1 0",
            b"5000 1 3 99 1.2.3.4:1 1.2.3.4:2 0 1 2",
            b"5000 1 3 99 1.2.3.4:1 1.2.3.4:2 0 1 0 extra",
            b"5000 1 3 99 1.2.3.4:1 1.2.3.4:2 0 1",
            b"x 1 3 99 1.2.3.4:1 1.2.3.4:2 0 1 0",
        ] {
            assert!(decode_stamped_member(bad).is_err(), "{bad:?} decoded");
        }
        let ok = decode_stamped_member(b"5000 1 3 99 1.2.3.4:1 1.2.3.4:2 0 1 0").expect("valid");
        assert_eq!(ok.1.client_addr.ip(), IpAddr::from([1, 2, 3, 4]));
    }

    proptest! {
        #[test]
        fn location_round_trips(node in any::<u32>(), epoch in any::<u64>()) {
            let loc = FleetLocation { node, epoch };
            prop_assert_eq!(decode_location(encode_location(loc).as_bytes()), Ok(loc));
        }

        // Canonical: whatever decodes re-encodes to the same bytes, so compare-and-delete
        // on bytes agrees with comparing decoded locations.
        #[test]
        fn location_decoding_is_total_and_canonical(bytes in proptest::collection::vec(any::<u8>(), 0..40)) {
            if let Ok(loc) = decode_location(&bytes) {
                let enc = encode_location(loc);
                prop_assert_eq!(enc.as_bytes(), &bytes[..]);
            }
        }

        #[test]
        fn location_like_text_never_panics(s in "[0-9:]{0,34}") {
            if let Ok(loc) = decode_location(s.as_bytes()) {
                prop_assert_eq!(encode_location(loc), s);
            }
        }

        #[test]
        fn member_round_trips(m in arb_member(), stamp in any::<u64>()) {
            let s = encode_stamped_member(stamp, &m);
            prop_assert!(s.len() <= MAX_MEMBER_LEN);
            prop_assert_eq!(decode_stamped_member(s.as_bytes()), Ok((stamp, m)));
        }

        #[test]
        fn member_decoding_is_total(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = decode_stamped_member(&bytes);
            let _ = decode_member(&bytes);
        }

        #[test]
        fn mutated_member_records_never_panic(m in arb_member(), pos in any::<usize>(), b in any::<u8>()) {
            let mut bytes = encode_stamped_member(1, &m).into_bytes();
            let i = pos % bytes.len();
            bytes[i] = b;
            let _ = decode_stamped_member(&bytes);
        }
    }
}
