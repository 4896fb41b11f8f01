//! `peerlined devices` and `peerlined revoke` against a data dir's store: what an operator
//! does for a user who lost a device.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::process::{Command, Output};

use peerline_core::store::{Account, Device, Store};
use peerline_wire::name::Username;

fn peerlined(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peerlined"))
        .args(args)
        .output()
        .expect("peerlined runs")
}

fn device(user: &str, key: u8) -> Device {
    Device {
        username: Username::parse(user).unwrap(),
        device_id: [key; 16],
        noise_key: [key; 32],
        sign_key: [key; 32],
        revoked: false,
    }
}

/// A data dir whose store holds alice with two devices and bob with one.
fn data_dir(root: &Path) -> std::path::PathBuf {
    let data = root.join("sn");
    let out = peerlined(&["init", "--data", data.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut store = peerline_store::SqliteStore::open(&data.join("store.sqlite")).unwrap();
    for (user, key) in [("alice", 0xa1), ("bob", 0xb0)] {
        let account = Account {
            username: Username::parse(user).unwrap(),
            password_hash: "$argon2id$v=19$m=8,t=1,p=1$c2FsdA$x".into(),
            created_at: 1_700_000_000,
        };
        store.create_account(&account, &device(user, key)).unwrap();
    }
    store.add_device(&device("alice", 0xa2)).unwrap();
    data
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

#[test]
fn an_operator_lists_and_revokes_a_users_device() {
    let root = tempfile::tempdir().unwrap();
    let data = data_dir(root.path());
    let d = data.to_str().unwrap();
    let listed = json(&peerlined(&["devices", "--data", d, "alice", "--json"]));
    let devices = listed["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2, "{listed}");
    let lost = "a2".repeat(32);
    assert_eq!(devices[1]["noise_key"], lost.as_str());
    assert_eq!(devices[1]["revoked"], false);

    let revoked = json(&peerlined(&["revoke", "--data", d, &lost, "--json"]));
    assert_eq!(revoked["user"], "alice");
    assert_eq!(revoked["already_revoked"], false);
    assert_eq!(
        revoked["supernode_asked"], false,
        "no supernode runs on this data dir"
    );

    let listed = json(&peerlined(&["devices", "--data", d, "alice", "--json"]));
    let devices = listed["devices"].as_array().unwrap();
    assert_eq!(
        devices[0]["revoked"], false,
        "the other device is untouched"
    );
    assert_eq!(devices[1]["revoked"], true);
    let mut store = peerline_store::SqliteStore::open(&data.join("store.sqlite")).unwrap();
    assert!(
        store
            .device_by_noise_key(&[0xa2; 32])
            .unwrap()
            .unwrap()
            .revoked
    );
    assert!(
        !store
            .device_by_noise_key(&[0xb0; 32])
            .unwrap()
            .unwrap()
            .revoked
    );

    // Again: nothing changes, and it says so.
    let again = json(&peerlined(&["revoke", "--data", d, &lost, "--json"]));
    assert_eq!(again["already_revoked"], true);
    // The table form names each device's state.
    let table = peerlined(&["devices", "--data", d, "alice"]);
    let text = String::from_utf8(table.stdout).unwrap();
    assert!(
        text.contains(&format!("{lost}  {}  revoked", "a2".repeat(16))),
        "{text}"
    );
}

#[test]
fn mistakes_are_one_clear_line_and_a_failure() {
    let root = tempfile::tempdir().unwrap();
    let data = data_dir(root.path());
    let d = data.to_str().unwrap();
    for (args, says) in [
        (vec!["revoke", "--data", d, "xyz"], "is not a device key"),
        (
            vec!["revoke", "--data", d, &"00".repeat(32)],
            "no device has the Noise key",
        ),
        (
            vec!["devices", "--data", d, "carol"],
            "there is no account carol",
        ),
        (
            vec!["devices", "--data", d, "Not A Name!"],
            "is not a username",
        ),
    ] {
        let out = peerlined(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} succeeded");
        assert!(err.contains(says), "{args:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}
