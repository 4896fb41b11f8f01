//! A Redis master dies and comes back: calls fail meanwhile (within the timeouts, never
//! hanging) and the same directory handle works again once the cluster has healed.
//!
//! Runs its own three-master cluster on free loopback ports (the shared test cluster is
//! left alone), with redis-server and redis-cli from the system: `scripts/fleet-services.sh
//! start` installs them.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use peerline_fleet::conformance::member;
use peerline_fleet::{FleetConfig, FleetDirectory, FleetLocation, RedisDirectory, Username};

struct Node {
    port: u16,
    bus: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Node {
    fn start(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--cluster-enabled", "yes", "--cluster-port", &self.bus.to_string()])
            .args(["--cluster-node-timeout", "1000", "--appendonly", "no", "--save", ""])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--cluster-config-file", "nodes.conf"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("cannot run redis-server ({e}): run eval \"$(bash scripts/fleet-services.sh start)\" to install it")
            });
        self.child = Some(child);
        wait_for(Duration::from_secs(10), || {
            cli(self.port, &["ping"]).contains("PONG")
        });
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

fn cli(port: u16, args: &[&str]) -> String {
    Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

fn wait_for(limit: Duration, mut ok: impl FnMut() -> bool) {
    let start = Instant::now();
    while !ok() {
        assert!(start.elapsed() < limit, "gave up waiting after {limit:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn free_port() -> u16 {
    // Bound then released: another process could take it in between, which would only
    // make this test fail, not pass wrongly.
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn cluster_ok(port: u16) -> bool {
    cli(port, &["cluster", "info"]).contains("cluster_state:ok")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_master_fails_calls_quickly_and_the_handle_recovers() {
    let mut nodes: Vec<Node> = (0..3)
        .map(|_| Node {
            port: free_port(),
            bus: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        })
        .collect();
    for n in &mut nodes {
        n.start();
    }
    let addrs: Vec<String> = nodes
        .iter()
        .map(|n| format!("127.0.0.1:{}", n.port))
        .collect();
    let mut create = vec!["--cluster", "create"];
    create.extend(addrs.iter().map(String::as_str));
    create.extend(["--cluster-replicas", "0", "--cluster-yes"]);
    cli(nodes[0].port, &create);
    wait_for(Duration::from_secs(20), || {
        nodes.iter().all(|n| cluster_ok(n.port))
    });

    let url = format!("redis://{}", addrs.join(","));
    let config = FleetConfig {
        prefix: "failover".to_string(),
        member_cache: Duration::ZERO,
        ..FleetConfig::default()
    };
    let dir = RedisDirectory::connect_with(&url, config)
        .await
        .expect("connect");
    let me = member(1, 1);
    let home = FleetLocation { node: 1, epoch: 1 };
    let users: Vec<Username> = (0..30)
        .map(|i| Username::parse(&format!("fo-user{i}")).expect("valid name"))
        .collect();
    dir.announce(&me).await.expect("announce");
    for u in &users {
        dir.claim(u, home).await.expect("claim");
    }
    assert!(dir
        .lookup_many(&users)
        .await
        .expect("lookup_many")
        .iter()
        .all(|l| *l == Some(home)));

    // Kill one master: with no replica the cluster is down until it returns.
    nodes[1].kill();
    let t0 = Instant::now();
    let r = dir.lookup_many(&users).await;
    assert!(
        r.is_err(),
        "a batch touching a dead master succeeded: {r:?}"
    );
    let failed_after = t0.elapsed();
    assert!(
        failed_after < Duration::from_secs(15),
        "a failing call hung for {failed_after:?}"
    );

    // It comes back (same node id from nodes.conf, its data gone): the same handle works
    // again, and the owner's claims re-create what was lost.
    nodes[1].start();
    let restarted = Instant::now();
    wait_for(Duration::from_secs(30), || {
        nodes.iter().all(|n| cluster_ok(n.port))
    });
    let start = Instant::now();
    loop {
        let attempt = async {
            dir.announce(&me).await?;
            dir.refresh(&users.iter().map(|u| (u.clone(), home)).collect::<Vec<_>>())
                .await?;
            dir.lookup_many(&users).await
        }
        .await;
        match attempt {
            Ok(locs) if locs.iter().all(|l| *l == Some(home)) => break,
            other => {
                assert!(
                    start.elapsed() < Duration::from_secs(30),
                    "the handle did not recover: {other:?}"
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
    assert!(dir.lookup(&users[0]).await.expect("lookup").is_some());
    eprintln!(
        "failed call returned after {failed_after:?}; handle working again {:?} after the restart ({:?} after cluster_state:ok)",
        restarted.elapsed(),
        start.elapsed()
    );
}
