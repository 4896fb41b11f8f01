//! What the end-to-end tests with real processes share: where the binaries are, a free
//! loopback port, a supernode process and a user driven through the CLI.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

pub fn peerline_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_peerline"))
}

pub fn peerlined_bin() -> PathBuf {
    let p = peerline_bin().with_file_name("peerlined");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        p.display()
    );
    p
}

/// A loopback port free for UDP and TCP (a supernode listens on both).
pub fn free_port() -> u16 {
    peerline_net::ports::free_loopback_port().expect("a free loopback port")
}

pub struct Supernode {
    pub data: PathBuf,
    pub child: Option<Child>,
    pub admin: u16,
    pub port: u16,
}

impl Supernode {
    pub fn init(root: &Path) -> Self {
        let s = Self::init_only(root, "supernode", &[]);
        s.started()
    }

    /// `peerlined init` with `extra` arguments into `root/name`, not started.
    pub fn init_only(root: &Path, name: &str, extra: &[&str]) -> Self {
        let data = root.join(name);
        let port = free_port();
        let admin = free_port();
        let out = Command::new(peerlined_bin())
            .args(["init", "--data"])
            .arg(&data)
            .args([
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--admin",
                &format!("127.0.0.1:{admin}"),
            ])
            .args(extra)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "init: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Supernode {
            data,
            child: None,
            admin,
            port,
        }
    }

    pub fn started(mut self) -> Self {
        self.start();
        self
    }

    pub fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.data.join("test.log"))
            .unwrap();
        let child = Command::new(peerlined_bin())
            .args(["run", "--data"])
            .arg(&self.data)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        let pid_file = self.data.join("peerlined.pid");
        let start = Instant::now();
        while std::fs::read_to_string(&pid_file)
            .map(|p| p.trim() != child.id().to_string())
            .unwrap_or(true)
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "peerlined did not write its pid file"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.child = Some(child);
    }

    pub fn kill9(&mut self) {
        let mut c = self.child.take().unwrap();
        // SIGKILL: no shutdown path runs, like a crash or power loss of the process.
        c.kill().unwrap();
        c.wait().unwrap();
    }

    /// A counter or gauge from the admin endpoint's /metrics (published once a second,
    /// so wait a second after what it should count).
    pub fn metric(&self, name: &str) -> u64 {
        use std::io::{Read, Write};
        let start = Instant::now();
        loop {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", self.admin)).unwrap();
            s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
                .unwrap();
            let mut body = String::new();
            s.read_to_string(&mut body).unwrap();
            let v = body.lines().find_map(|l| {
                let (k, v) = l.split_once(' ')?;
                (k == name).then(|| v.trim().parse::<f64>().ok())?
            });
            if let Some(v) = v {
                return v as u64;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "no metric {name} in {body}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn bootstrap(&self) -> String {
        std::fs::read_to_string(self.data.join("bootstrap"))
            .unwrap()
            .trim()
            .to_string()
    }
}

impl Drop for Supernode {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub struct User {
    pub name: &'static str,
    pub profile: PathBuf,
}

impl User {
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(peerline_bin())
            .arg("--profile")
            .arg(&self.profile)
            .args(args)
            .env("PEERLINE_PASSWORD", format!("{}-password", self.name))
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{} {:?} failed: {}",
            self.name,
            args,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command expected to fail; returns its one-line error.
    pub fn fails(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            !out.status.success(),
            "{} {:?} should have failed",
            self.name,
            args
        );
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(
            err.trim().lines().count(),
            1,
            "one clear line expected, got: {err}"
        );
        err
    }

    pub fn json(&self, args: &[&str]) -> Value {
        serde_json::from_str(&self.ok(args)).unwrap()
    }

    pub fn messages(&self) -> Vec<Value> {
        self.json(&["msg", "list", "--json"])
            .as_array()
            .unwrap()
            .clone()
    }

    pub fn has_message(&self, from: &str, text: &str, via: &str) -> bool {
        self.messages().iter().any(|m| {
            m["from"] == from && m["text"] == text && m["via"] == via && m["to"] == self.name
        })
    }

    pub fn wait_message(&self, from: &str, text: &str, via: &str) {
        let start = Instant::now();
        while !self.has_message(from, text, via) {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "{} never got {text:?} from {from} via {via}: {:?}",
                self.name,
                self.messages()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for User {
    fn drop(&mut self) {
        let _ = self.run(&["down"]);
    }
}
