//! The NAT behaviour probe of `shared/LAB.md`, with std sockets opened inside the lab's
//! namespaces (no helper processes, nothing to install):
//!
//! 1. the host sends from one socket to server A (port 3478); A answers;
//! 2. A's second socket (port 4000, same address) sends to the host's public address;
//! 3. server B (another address) sends to it too, before the host ever talked to B;
//! 4. the host sends to B.
//!
//! Which of the three packets arrive gives the filtering; whether A and B saw the same
//! public address and port gives the mapping. A TCP connection to A's port 443 checks the
//! TCP path (what a UDP-blocked network still allows).

use crate::{Host, Lab, LabError, NatType};
use std::net::{SocketAddr, SocketAddrV4, UdpSocket};
use std::time::{Duration, Instant};

pub const SERVER_PORT: u16 = 3478;
pub const SERVER_OTHER_PORT: u16 = 4000;
pub const TCP_PORT: u16 = 443;
/// The host's local port: fixed, so port preservation shows in the report.
pub const HOST_PORT: u16 = 40000;
/// How long to wait for a packet that should come: everything is local, a lost one is gone.
const WAIT: Duration = Duration::from_millis(500);

/// How the NAT maps the host's socket to public addresses (RFC 4787 terms).
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mapping {
    /// The servers see the host's own address: no NAT.
    None,
    EndpointIndependent,
    EndpointDependent,
    /// UDP never reached the servers.
    Blocked,
    /// A saw the host and B did not (or the reverse): loss, or a broken lab.
    Inconsistent,
}

/// Which unsolicited packets reach the host once it has sent to A.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Filtering {
    /// Anyone can send to the public address.
    EndpointIndependent,
    /// Any port of an address the host has sent to.
    AddressDependent,
    /// Only the exact address and port the host has sent to.
    AddressAndPortDependent,
    /// Not even A's answer arrives.
    Blocked,
    /// B's packet arrived but A's other port's did not: matches no NAT type.
    Inconsistent,
}

impl Mapping {
    pub fn as_str(self) -> &'static str {
        match self {
            Mapping::None => "none",
            Mapping::EndpointIndependent => "endpoint-independent",
            Mapping::EndpointDependent => "endpoint-dependent",
            Mapping::Blocked => "blocked",
            Mapping::Inconsistent => "inconsistent",
        }
    }
}

impl Filtering {
    pub fn as_str(self) -> &'static str {
        match self {
            Filtering::EndpointIndependent => "endpoint-independent",
            Filtering::AddressDependent => "address-dependent",
            Filtering::AddressAndPortDependent => "address-and-port-dependent",
            Filtering::Blocked => "blocked",
            Filtering::Inconsistent => "inconsistent",
        }
    }
}

/// What one probe observed.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct ProbeReport {
    /// The host's own address and port.
    pub local: SocketAddrV4,
    /// The host's address as server A saw it (None: nothing arrived).
    pub seen_by_a: Option<SocketAddrV4>,
    /// The host's address as server B saw it, when the host sent to B last.
    pub seen_by_b: Option<SocketAddrV4>,
    pub a_answer_arrived: bool,
    pub a_other_port_arrived: bool,
    pub b_unsolicited_arrived: bool,
    /// B's answer to the host's last packet (the path to B works both ways).
    pub b_answer_arrived: bool,
    /// A TCP connection to server A's port 443 was established.
    pub tcp_443: bool,
    pub mapping: Mapping,
    pub filtering: Filtering,
    /// The public port equals the local one (meaningful when mapped).
    pub port_preserved: bool,
}

impl ProbeReport {
    /// The NAT type this behaviour is, if any.
    pub fn classify(&self) -> Option<NatType> {
        NatType::ALL.into_iter().find(|t| {
            t.expected() == (self.mapping, self.filtering)
                && (*t != NatType::UdpBlocked || self.tcp_443)
        })
    }
}

/// Runs the probe from `host` against servers `a` and `b` (two public hosts with different
/// addresses). Uses UDP ports 3478 and 4000 on A, 3478 on B, TCP 443 on A, 40000 on the host:
/// run one probe at a time per set of servers.
pub fn probe(a: &Host, b: &Host, host: &Host) -> Result<ProbeReport, LabError> {
    let a_main = a.udp_bind(SERVER_PORT)?;
    let a_other = a.udp_bind(SERVER_OTHER_PORT)?;
    let b_sock = b.udp_bind(SERVER_PORT)?;
    let h = host.udp_bind(HOST_PORT)?;
    let io = |what: &str| LabError::io(format!("probe from {}: {what}", host.name));

    // 1. host -> A; A answers; A's other port and B send unsolicited to what A saw.
    h.send_to(b"probe-a", a.socket_addr(SERVER_PORT))
        .map_err(io("sending to A"))?;
    let seen_by_a = recv_matching(&a_main, b"probe-a", WAIT).map_err(io("A receiving"))?;
    if let Some(seen) = seen_by_a {
        a_main
            .send_to(b"a-answer", seen)
            .map_err(io("A answering"))?;
        a_other
            .send_to(b"a-other", seen)
            .map_err(io("A's other port sending"))?;
        b_sock
            .send_to(b"b-unsolicited", seen)
            .map_err(io("B sending"))?;
    }
    let arrived = drain(&h, WAIT).map_err(io("host receiving"))?;

    // 2. host -> B, after B's unsolicited packet (the order LAB.md's quirk depends on).
    h.send_to(b"probe-b", b.socket_addr(SERVER_PORT))
        .map_err(io("sending to B"))?;
    let seen_by_b = recv_matching(&b_sock, b"probe-b", WAIT).map_err(io("B receiving"))?;
    let mut b_answer_arrived = false;
    if let Some(seen) = seen_by_b {
        b_sock
            .send_to(b"b-answer", seen)
            .map_err(io("B answering"))?;
        b_answer_arrived = drain(&h, WAIT)
            .map_err(io("host receiving"))?
            .contains(&b"b-answer".to_vec());
    }

    // 3. TCP to A:443 (refused or timed out both count as "no").
    let listener = a.tcp_listen(TCP_PORT)?;
    let tcp_443 = host
        .tcp_connect(SocketAddr::V4(a.socket_addr(TCP_PORT)), WAIT)
        .is_ok();
    drop(listener);

    let local = host.socket_addr(HOST_PORT);
    let got = |m: &[u8]| arrived.iter().any(|p| p == m);
    let (a_answer, a_other_port, b_unsolicited) =
        (got(b"a-answer"), got(b"a-other"), got(b"b-unsolicited"));
    let mapping = match (seen_by_a, seen_by_b) {
        (None, None) => Mapping::Blocked,
        (Some(sa), Some(sb)) if sa == local && sb == local => Mapping::None,
        (Some(sa), Some(sb)) if sa == sb => Mapping::EndpointIndependent,
        (Some(_), Some(_)) => Mapping::EndpointDependent,
        _ => Mapping::Inconsistent,
    };
    let filtering = match (a_answer, a_other_port, b_unsolicited) {
        (false, ..) => Filtering::Blocked,
        (true, true, true) => Filtering::EndpointIndependent,
        (true, true, false) => Filtering::AddressDependent,
        (true, false, false) => Filtering::AddressAndPortDependent,
        (true, false, true) => Filtering::Inconsistent,
    };
    Ok(ProbeReport {
        local,
        seen_by_a,
        seen_by_b,
        a_answer_arrived: a_answer,
        a_other_port_arrived: a_other_port,
        b_unsolicited_arrived: b_unsolicited,
        b_answer_arrived,
        tcp_443,
        mapping,
        filtering,
        port_preserved: seen_by_a.is_some_and(|s| s.port() == HOST_PORT),
    })
}

/// Builds servers A (203.0.113.1) and B (203.0.113.2) and one NAT of every type with one
/// host behind it, and probes each in turn.
pub fn probe_all(lab: &mut Lab) -> Result<Vec<(NatType, ProbeReport)>, LabError> {
    let a = lab.add_public_host("server-a")?;
    let b = lab.add_public_host("server-b")?;
    let mut reports = Vec::new();
    for nat_type in NatType::ALL {
        let nat = lab.add_nat(&format!("nat-{nat_type}"), nat_type)?;
        let host = lab.add_host_behind(&nat, &format!("host-{nat_type}"))?;
        reports.push((nat_type, probe(&a, &b, &host)?));
    }
    Ok(reports)
}

/// The first datagram with this payload within `wait`, and where it came from.
fn recv_matching(
    sock: &UdpSocket,
    payload: &[u8],
    wait: Duration,
) -> std::io::Result<Option<SocketAddrV4>> {
    let deadline = Instant::now() + wait;
    let mut buf = [0u8; 64];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        match sock.recv_from(&mut buf) {
            Ok((n, SocketAddr::V4(from))) if &buf[..n] == payload => return Ok(Some(from)),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => break,
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

/// Every datagram arriving within `wait`.
fn drain(sock: &UdpSocket, wait: Duration) -> std::io::Result<Vec<Vec<u8>>> {
    let deadline = Instant::now() + wait;
    let mut got = Vec::new();
    let mut buf = [0u8; 64];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        match sock.recv_from(&mut buf) {
            Ok((n, _)) => got.push(buf[..n].to_vec()),
            Err(e) if is_timeout(&e) => break,
            // An ICMP error from an earlier send surfaces here on Linux: not a datagram.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn is_timeout(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
    )
}

/// The probe results as an aligned text table.
pub fn table(reports: &[(NatType, ProbeReport)]) -> String {
    let addr = |a: Option<SocketAddrV4>| a.map_or_else(|| "-".to_owned(), |a| a.to_string());
    let yes = |b: bool| if b { "yes" } else { "no" };
    let mut out = format!(
        "{:<16} {:<21} {:<27} {:<19} {:<19} {:<6} {:<7} {:<5} {:<4} {}\n",
        "nat",
        "mapping",
        "filtering",
        "seen by A",
        "seen by B",
        "A:4000",
        "B unsol",
        "tcp",
        "ok",
        "classified"
    );
    for (t, r) in reports {
        let classified = r.classify();
        out += &format!(
            "{:<16} {:<21} {:<27} {:<19} {:<19} {:<6} {:<7} {:<5} {:<4} {}\n",
            t.as_str(),
            r.mapping.as_str(),
            r.filtering.as_str(),
            addr(r.seen_by_a),
            addr(r.seen_by_b),
            yes(r.a_other_port_arrived),
            yes(r.b_unsolicited_arrived),
            yes(r.tcp_443),
            yes(classified == Some(*t)),
            classified.map_or("none", NatType::as_str),
        );
    }
    out
}
