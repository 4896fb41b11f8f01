//! CI smoke test: a real `peerlined` on loopback, 10,000 provisioned users logged in by
//! `peerline-load steady` and held for 10 s with keepalives and the request mix.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn load_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_peerline-load"))
}

fn peerlined_bin() -> PathBuf {
    let p = load_bin().with_file_name("peerlined");
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build --workspace)",
        p.display()
    );
    p
}

fn free_port() -> u16 {
    peerline_net::ports::free_loopback_port().expect("a free loopback port")
}

struct Daemon(Child);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(data: &Path) -> Daemon {
    let log = std::fs::File::create(data.join("test.log")).unwrap();
    let child = Command::new(peerlined_bin())
        .args(["run", "--data"])
        .arg(data)
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let pid_file = data.join("peerlined.pid");
    let t = Instant::now();
    while std::fs::read_to_string(&pid_file)
        .map(|p| p.trim() != child.id().to_string())
        .unwrap_or(true)
    {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "peerlined did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    Daemon(child)
}

#[test]
fn ten_thousand_users_log_in_and_all_get_answers() {
    const USERS: usize = 10_000;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("sn");
    let out = Command::new(peerlined_bin())
        .args(["init", "--data"])
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{}", free_port())])
        .args(["--admin", &format!("127.0.0.1:{}", free_port())])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // No relay: the test needs only the supernode.
    let cfg = data.join("peerlined.toml");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace(
            "relay_listen = \"127.0.0.1:3478\"",
            "relay_listen = \"off\"",
        ),
    )
    .unwrap();

    let out = Command::new(load_bin())
        .args([
            "provision",
            "--json",
            "--users",
            &USERS.to_string(),
            "--data",
        ])
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "provision: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(p["users"], USERS);

    let _sn = start(&data);
    let out = Command::new(load_bin())
        .args([
            "steady",
            "--json",
            "--users",
            &USERS.to_string(),
            "--duration",
            "10",
        ])
        .args([
            "--keepalive",
            "2",
            "--echo-seconds",
            "1",
            "--crypto-iterations",
            "50",
        ])
        .args([
            "--presence-rate",
            "100",
            "--lookup-rate",
            "100",
            "--connect-rate",
            "20",
        ])
        .arg("--data")
        .arg(&data)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "steady: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["users"], USERS);
    assert_eq!(r["logged_in"], USERS, "every simulated client logged in");
    assert_eq!(r["answered"], USERS, "every simulated client got answers");
    let phase = &r["phase"];
    assert!(phase["echoes"].as_u64().unwrap() >= USERS as u64, "{phase}");
    assert!(phase["responses"].as_u64().unwrap() > 0, "{phase}");
    // Every operation of the mix was answered and measured.
    for op in r["latency"].as_array().unwrap() {
        if op["op"] != "login" {
            assert!(op["latency_us"]["count"].as_u64().unwrap() > 0, "{op}");
        }
    }
    assert!(r["supernode"]["rss_loaded"].as_u64().unwrap() > 0);
    assert!(r["crypto"]["bound_per_core_second"].as_f64().unwrap() > 0.0);
    assert!(r["echo"]["echo"]["answered"].as_u64().unwrap() > 0);
    assert!(r["timeline"].as_array().unwrap().len() >= 10);
    let svg = std::fs::read_to_string(data.join("load-steady.svg")).unwrap();
    assert!(svg.starts_with("<svg"));
}
