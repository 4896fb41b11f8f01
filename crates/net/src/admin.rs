//! A minimal admin HTTP endpoint: Prometheus text metrics at `GET /metrics`, `GET
//! /health`, and `POST /devices/recheck?user=NAME&key=HEX`, by which `peerlined revoke`
//! asks the running supernode to check a logged-in device again (it logs the device out
//! if, and only if, the store says it is revoked, so the call is harmless to anyone who
//! can reach the endpoint).
//!
//! Hand-written rather than pulling an HTTP stack: it answers one request line per
//! connection with a text body and is bound to loopback by default.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use peerline_wire::name::Username;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Rendered metrics, one section per driver (supernode, relay), each refreshed by its
/// own driver and served together.
#[derive(Debug, Default, Clone)]
pub struct MetricsText(Arc<Mutex<BTreeMap<&'static str, String>>>);

impl MetricsText {
    /// Replaces the supernode's section.
    pub fn set(&self, s: String) {
        self.set_section("supernode", s);
    }

    /// Replaces one section.
    pub fn set_section(&self, name: &'static str, s: String) {
        if let Ok(mut g) = self.0.lock() {
            g.insert(name, s);
        }
    }

    /// All sections, in name order.
    pub fn get(&self) -> String {
        self.0
            .lock()
            .map(|g| g.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// Devices to check again, from the admin endpoint to the supernode loop (which takes
/// them on its timer tick).
#[derive(Debug, Default, Clone)]
pub struct Rechecks(Arc<Mutex<VecDeque<Recheck>>>);

/// A user and the Noise key of the device to check.
pub type Recheck = (Username, [u8; 32]);

/// Most rechecks waiting for the supernode loop; more are refused with 503.
const MAX_RECHECKS: usize = 1024;

impl Rechecks {
    /// Queues a recheck; false when the queue is full.
    pub fn push(&self, user: Username, key: [u8; 32]) -> bool {
        match self.0.lock() {
            Ok(mut q) if q.len() < MAX_RECHECKS => {
                q.push_back((user, key));
                true
            }
            _ => false,
        }
    }

    /// Takes every queued recheck.
    pub fn take(&self) -> Vec<Recheck> {
        self.0
            .lock()
            .map(|mut q| q.drain(..).collect())
            .unwrap_or_default()
    }
}

/// The path and query of the endpoint that asks for a recheck.
pub const RECHECK_PATH: &str = "/devices/recheck";

/// Parses `user=NAME&key=HEX` (either order).
fn recheck_query(query: &str) -> Result<Recheck, &'static str> {
    let (mut user, mut key) = (None, None);
    for pair in query.split('&') {
        match pair.split_once('=') {
            Some(("user", v)) => user = Username::parse(v).ok(),
            Some(("key", v)) => key = parse_key(v),
            _ => {}
        }
    }
    match (user, key) {
        (Some(u), Some(k)) => Ok((u, k)),
        (None, _) => Err("user= is missing or not a username"),
        (_, None) => Err("key= is missing or not 64 hex digits"),
    }
}

fn parse_key(v: &str) -> Option<[u8; 32]> {
    let mut k = [0u8; 32];
    hex::decode_to_slice(v, &mut k).ok()?;
    Some(k)
}

/// The status and body for one request line.
fn answer(line: &str, metrics: &MetricsText, rechecks: &Rechecks) -> (&'static str, String) {
    let mut parts = line.split(' ');
    let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    match (method, path) {
        ("GET", "/metrics") => ("200 OK", metrics.get()),
        ("GET", "/health") => ("200 OK", "ok\n".to_string()),
        ("POST", RECHECK_PATH) => match recheck_query(query) {
            Ok((user, key)) => {
                if rechecks.push(user, key) {
                    ("202 Accepted", "checking the device again\n".to_string())
                } else {
                    (
                        "503 Service Unavailable",
                        "too many rechecks waiting\n".to_string(),
                    )
                }
            }
            Err(why) => ("400 Bad Request", format!("{why}\n")),
        },
        _ => ("404 Not Found", "try /metrics\n".to_string()),
    }
}

/// Serves the endpoint on `addr` until the task is dropped.
pub async fn serve(
    addr: SocketAddr,
    metrics: MetricsText,
    rechecks: Rechecks,
) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (mut s, _) = listener.accept().await?;
        let m = metrics.clone();
        let r = rechecks.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(2), s.read(&mut buf))
                .await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let line = req.lines().next().unwrap_or("");
            let (status, body) = answer(line, &m, &r);
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}

/// A Prometheus histogram with fixed buckets, for latencies measured in the drivers.
#[derive(Debug, Clone)]
pub struct Histogram {
    /// Upper bounds in seconds, increasing.
    bounds: &'static [f64],
    /// Count per bucket (not cumulative), plus one for +Inf.
    counts: Vec<u64>,
    sum: f64,
}

/// Bucket bounds for per-datagram and per-request handling times (1 µs to 50 ms).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.000_001, 0.000_002, 0.000_005, 0.000_01, 0.000_02, 0.000_05, 0.000_1, 0.000_2, 0.000_5,
    0.001, 0.002, 0.005, 0.01, 0.05,
];

/// Bucket bounds for storage operations (100 µs to 5 s).
pub const STORE_BUCKETS: &[f64] = &[
    0.000_1, 0.000_2, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5, 1.0, 5.0,
];

impl Histogram {
    /// An empty histogram over `bounds`.
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    /// Records one observation of `secs` seconds.
    pub fn observe(&mut self, secs: f64) {
        let i = self.bounds.partition_point(|b| *b < secs);
        if let Some(c) = self.counts.get_mut(i) {
            *c += 1;
        }
        self.sum += secs;
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// Prometheus text for metric `name` with `help`.
    pub fn render(&self, name: &str, help: &str) -> String {
        let mut out = format!("# HELP {name} {help}\n# TYPE {name} histogram\n");
        let mut cum = 0u64;
        for (b, c) in self.bounds.iter().zip(&self.counts) {
            cum += c;
            out.push_str(&format!("{name}_bucket{{le=\"{b}\"}} {cum}\n"));
        }
        let total = self.count();
        out.push_str(&format!("{name}_bucket{{le=\"+Inf\"}} {total}\n"));
        out.push_str(&format!("{name}_sum {}\n{name}_count {total}\n", self.sum));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recheck_is_queued_only_when_well_formed() {
        let (m, r) = (MetricsText::default(), Rechecks::default());
        let key = "ab".repeat(32);
        let ok = format!("POST {RECHECK_PATH}?user=alice&key={key} HTTP/1.1");
        assert_eq!(answer(&ok, &m, &r).0, "202 Accepted");
        let q = r.take();
        assert_eq!(q.len(), 1);
        assert_eq!(q[0].0.as_str(), "alice");
        assert_eq!(q[0].1, [0xab; 32]);
        for bad in [
            format!("POST {RECHECK_PATH}?user=alice HTTP/1.1"),
            format!("POST {RECHECK_PATH}?user=a&key={key} HTTP/1.1"),
            format!("POST {RECHECK_PATH}?user=alice&key=zz HTTP/1.1"),
        ] {
            assert_eq!(answer(&bad, &m, &r).0, "400 Bad Request", "{bad}");
        }
        // A GET does not queue anything; neither does another path.
        assert_eq!(
            answer(&format!("GET {RECHECK_PATH}?user=alice&key={key}"), &m, &r).0,
            "404 Not Found"
        );
        assert!(r.take().is_empty());
        assert_eq!(answer("GET /health HTTP/1.0", &m, &r).1, "ok\n");
    }

    #[test]
    fn the_recheck_queue_is_bounded() {
        let r = Rechecks::default();
        let u = Username::parse("alice").unwrap();
        for _ in 0..MAX_RECHECKS {
            assert!(r.push(u.clone(), [1; 32]));
        }
        assert!(!r.push(u, [1; 32]));
        assert_eq!(r.take().len(), MAX_RECHECKS);
    }

    proptest::proptest! {
        #[test]
        fn any_request_line_gets_an_answer_without_panicking(line in ".{0,300}") {
            let (m, r) = (MetricsText::default(), Rechecks::default());
            let _ = answer(&line, &m, &r);
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_count_everything() {
        let mut h = Histogram::new(&[0.001, 0.01]);
        h.observe(0.0005);
        h.observe(0.001); // on a bound: counted in that bucket (le)
        h.observe(0.005);
        h.observe(2.0);
        let text = h.render("x_seconds", "test");
        assert!(
            text.contains("x_seconds_bucket{le=\"0.001\"} 2\n"),
            "{text}"
        );
        assert!(text.contains("x_seconds_bucket{le=\"0.01\"} 3\n"), "{text}");
        assert!(text.contains("x_seconds_bucket{le=\"+Inf\"} 4\n"), "{text}");
        assert!(text.contains("x_seconds_count 4\n"), "{text}");
        assert_eq!(h.count(), 4);
    }
}
