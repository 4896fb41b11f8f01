//! What the end-to-end tests with real processes share: where the binaries are, and a
//! free loopback port.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::UdpSocket;
use std::path::PathBuf;

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

pub fn free_port() -> u16 {
    UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
