//! The supernode's port answers standard STUN clients: coturn's `turnutils_stunclient`
//! (installed by scripts/test.sh) learns its reflexive address from a running `peerlined`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn peerlined_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_peerline")).with_file_name("peerlined")
}

#[test]
fn a_standard_stun_client_learns_its_address_from_the_supernode() {
    let client = "turnutils_stunclient";
    let present = Command::new("sh")
        .args(["-c", &format!("command -v {client}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        present,
        "{client} is missing: run scripts/test.sh (it installs coturn) or apt-get install coturn"
    );

    let root = tempfile::tempdir().unwrap();
    let data = root.path().join("sn");
    let port = peerline_net::ports::free_loopback_port().unwrap();
    let init = Command::new(peerlined_bin())
        .args(["init", "--data"])
        .arg(&data)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .output()
        .unwrap();
    assert!(init.status.success());
    std::fs::write(
        data.join("peerlined.toml"),
        format!("listen = \"127.0.0.1:{port}\"\nadmin = \"off\"\n"),
    )
    .unwrap();
    let mut sn = Command::new(peerlined_bin())
        .args(["run", "--data"])
        .arg(&data)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !data.join("peerlined.pid").exists() {
        assert!(start.elapsed() < Duration::from_secs(10));
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = Command::new(client)
        .args(["-p", &port.to_string(), "127.0.0.1"])
        .output()
        .unwrap();
    let _ = sn.kill();
    let _ = sn.wait();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("UDP reflexive addr: 127.0.0.1:"),
        "no reflexive address in: {text}"
    );
}
