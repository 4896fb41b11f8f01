//! A minimal admin HTTP endpoint serving Prometheus text metrics at `/metrics`.
//!
//! Hand-written rather than pulling an HTTP stack: it answers one GET with a text body
//! and is bound to loopback by default.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

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

/// Serves `/metrics` on `addr` until the task is dropped.
pub async fn serve(addr: SocketAddr, metrics: MetricsText) -> std::io::Result<()> {
    let listener = TcpListener::bind(addr).await?;
    loop {
        let (mut s, _) = listener.accept().await?;
        let m = metrics.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 1024];
            let n = match tokio::time::timeout(std::time::Duration::from_secs(2), s.read(&mut buf))
                .await
            {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let (status, body) = if req.starts_with("GET /metrics") {
                ("200 OK", m.get())
            } else if req.starts_with("GET /health") {
                ("200 OK", "ok\n".to_string())
            } else {
                ("404 Not Found", "try /metrics\n".to_string())
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes()).await;
        });
    }
}
