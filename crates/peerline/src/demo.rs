//! `peerline demo`: a supernode and three users on loopback, end to end, with a transcript.
//!
//! Everything is real: the supernode runs on a UDP port with its SQLite store, each user
//! has a profile and a running agent, and the steps go through the same control socket
//! the CLI uses. Files live in a temporary directory removed at the end.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use peerline_core::supernode::SupernodeConfig;
use peerline_crypto::{Authority, DeviceKeys};
use peerline_net::admin::MetricsText;
use peerline_net::bootstrap::Bootstrap;
use peerline_net::supernode::{run_supernode, SupernodeRuntime};
use peerline_wire::Username;
use serde::Serialize;
use serde_json::{json, Value};

use crate::control::{call, ControlRequest};
use crate::history::History;
use crate::profile::Profile;

#[derive(Serialize)]
struct Step {
    t_ms: u64,
    actor: String,
    action: String,
    detail: Value,
}

struct Transcript {
    start: Instant,
    json: bool,
    steps: Vec<Step>,
}

impl Transcript {
    fn say(&mut self, actor: &str, action: &str, text: String, detail: Value) {
        let t_ms = self.start.elapsed().as_millis() as u64;
        if !self.json {
            println!("[{:>7.3}s] {actor:<9} {text}", t_ms as f64 / 1000.0);
        }
        self.steps.push(Step {
            t_ms,
            actor: actor.into(),
            action: action.into(),
            detail,
        });
    }
}

struct User {
    name: String,
    profile: Profile,
    agent: Option<tokio::task::JoinHandle<()>>,
}

async fn control(p: &Profile, req: ControlRequest) -> anyhow::Result<Value> {
    let sock = p.socket_path();
    tokio::task::spawn_blocking(move || call(&sock, &req, Duration::from_secs(20)))
        .await?
        .map_err(|e| anyhow!(e))
}

async fn start_agent(u: &mut User) -> anyhow::Result<()> {
    let p = u.profile.clone();
    u.agent = Some(tokio::spawn(async move {
        if let Err(e) = crate::agent::run_agent(p).await {
            eprintln!("agent failed: {e}");
        }
    }));
    let start = Instant::now();
    loop {
        if let Ok(v) = control(&u.profile, ControlRequest::Status).await {
            if v["online"] == json!(true) {
                return Ok(());
            }
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("{} did not come online", u.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn stop_agent(u: &mut User) -> anyhow::Result<()> {
    control(&u.profile, ControlRequest::Down).await?;
    if let Some(h) = u.agent.take() {
        let _ = tokio::time::timeout(Duration::from_secs(5), h).await;
    }
    Ok(())
}

async fn wait_received(u: &User, from: &str, text: &str) -> anyhow::Result<String> {
    let start = Instant::now();
    loop {
        let h = History::open(&u.profile.history_path())?;
        if let Some(e) = h
            .list(Some(from))?
            .into_iter()
            .find(|e| e.text == text && e.to == u.name)
        {
            return Ok(e.via);
        }
        if start.elapsed() > Duration::from_secs(10) {
            bail!("{} never received {text:?}", u.name);
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn demo(t: &mut Transcript, root: &Path) -> anyhow::Result<()> {
    // The supernode, with its authority and SQLite store, on a free loopback port.
    let port = peerline_net::ports::free_loopback_port()
        .context("cannot find a free loopback port for the demo's supernode")?;
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let node = DeviceKeys::generate(&mut rand_core::OsRng);
    let authority = Authority::generate(&mut rand_core::OsRng);
    let bootstrap = Bootstrap {
        host: listen.to_string(),
        node_key: node.noise_public(),
        authority: authority.public(),
    };
    let data = root.join("supernode");
    peerline_net::files::create_private_dir(&data)?;
    let store = peerline_store::SqliteStore::open(&data.join("store.sqlite"))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let sn = tokio::spawn(run_supernode(
        SupernodeRuntime {
            listen,
            tcp_listen: Some(listen),
            node_private: node.noise_private(),
            authority: authority.to_bytes(),
            config: SupernodeConfig::default(),
            snapshot_path: None,
            metrics: MetricsText::default(),
            rechecks: Default::default(),
            fleet: None,
            drain_timeout: std::time::Duration::ZERO,
        },
        Box::new(store),
        async {
            let _ = stop_rx.await;
        },
    ));
    t.say(
        "supernode",
        "start",
        format!("listening on {listen}, SQLite store in its data dir"),
        json!({"listen": listen.to_string(), "bootstrap": bootstrap.encode()}),
    );

    let mut users = Vec::new();
    for name in ["alice", "bob", "carol"] {
        let profile = Profile::open(&root.join(name))?;
        crate::cli::enrol_with(
            &profile,
            Username::parse(name)?,
            bootstrap.clone(),
            Some(format!("{name}-demo-password")),
            true,
        )
        .await?;
        t.say(
            name,
            "register",
            "registered (Argon2id password hash on the server, device certificate issued)".into(),
            json!({"user": name}),
        );
        users.push(User {
            name: name.into(),
            profile,
            agent: None,
        });
    }
    for u in users.iter_mut() {
        start_agent(u).await?;
        let name = u.name.clone();
        t.say(&name, "up", "agent online".into(), json!({"online": true}));
    }
    let (alice, rest) = users.split_at_mut(1);
    let (bob, carol) = rest.split_at_mut(1);
    let (alice, bob, carol) = (&mut alice[0], &mut bob[0], &mut carol[0]);

    control(
        &alice.profile,
        ControlRequest::ContactAdd {
            user: "bob".into(),
            note: "Hi, it's Alice".into(),
        },
    )
    .await?;
    t.say(
        "alice",
        "contacts add",
        "asked bob to become a contact".into(),
        json!({"to": "bob"}),
    );
    let list = control(&bob.profile, ControlRequest::ContactList).await?;
    t.say(
        "bob",
        "contacts list",
        format!("sees {}", list),
        list.clone(),
    );
    control(
        &bob.profile,
        ControlRequest::ContactReply {
            user: "alice".into(),
            action: "accept".into(),
        },
    )
    .await?;
    t.say(
        "bob",
        "contacts accept",
        "accepted alice".into(),
        json!({"user": "alice"}),
    );

    for (from, to, text) in [
        (
            &*alice,
            &*bob,
            "Hi Bob! This goes straight to your machine.",
        ),
        (&*bob, &*alice, "Hi Alice, got it. No server in between."),
    ] {
        let r = control(
            &from.profile,
            ControlRequest::MsgSend {
                to: to.name.clone(),
                text: text.into(),
            },
        )
        .await?;
        t.say(
            &from.name,
            "msg send",
            format!(
                "-> {}: {text:?} ({})",
                to.name,
                r["via"].as_str().unwrap_or("?")
            ),
            json!({"to": to.name, "text": text, "via": r["via"]}),
        );
        let via = wait_received(to, &from.name, text).await?;
        t.say(
            &to.name,
            "msg received",
            format!("<- {}: {text:?} ({via})", from.name),
            json!({"from": from.name, "text": text, "via": via}),
        );
    }

    match control(
        &carol.profile,
        ControlRequest::MsgSend {
            to: "alice".into(),
            text: "buy cheap watches".into(),
        },
    )
    .await
    {
        Ok(_) => bail!("a non-contact's message was accepted"),
        Err(e) => t.say(
            "carol",
            "msg send",
            format!("-> alice refused: {e}"),
            json!({"to": "alice", "refused": e.to_string()}),
        ),
    }
    let found = control(
        &carol.profile,
        ControlRequest::Search { prefix: "b".into() },
    )
    .await?;
    t.say(
        "carol",
        "search",
        format!("users starting with \"b\": {found} (names only, never addresses)"),
        found.clone(),
    );

    stop_agent(bob).await?;
    t.say(
        "bob",
        "down",
        "agent stopped".into(),
        json!({"online": false}),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let text = "See you tomorrow - sent while you were offline.";
    let r = control(
        &alice.profile,
        ControlRequest::MsgSend {
            to: "bob".into(),
            text: text.into(),
        },
    )
    .await?;
    t.say(
        "alice",
        "msg send",
        format!(
            "-> bob: {text:?} ({}: durably queued at the supernode)",
            r["via"].as_str().unwrap_or("?")
        ),
        json!({"to": "bob", "text": text, "via": r["via"]}),
    );
    start_agent(bob).await?;
    t.say(
        "bob",
        "up",
        "agent online again".into(),
        json!({"online": true}),
    );
    let via = wait_received(bob, "alice", text).await?;
    t.say(
        "bob",
        "msg received",
        format!("<- alice: {text:?} ({via})"),
        json!({"from": "alice", "text": text, "via": via}),
    );

    for u in [alice, bob, carol] {
        stop_agent(u).await?;
    }
    let _ = stop_tx.send(());
    let _ = sn.await;
    t.say(
        "supernode",
        "stop",
        "stopped; demo files removed".into(),
        json!({}),
    );
    Ok(())
}

/// Runs the demo and prints its transcript (as JSON with `json`).
pub fn run_demo(json_out: bool) -> anyhow::Result<()> {
    let root: PathBuf = std::env::temp_dir().join(format!("peerline-demo-{}", std::process::id()));
    peerline_net::files::create_private_dir(&root)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut t = Transcript {
        start: Instant::now(),
        json: json_out,
        steps: Vec::new(),
    };
    if !json_out {
        println!("Peerline demo: one supernode and three users (alice, bob, carol) on loopback\n");
    }
    let r = rt.block_on(demo(&mut t, &root));
    rt.shutdown_timeout(Duration::from_secs(2));
    let _ = std::fs::remove_dir_all(&root);
    r?;
    if json_out {
        println!("{}", serde_json::to_string_pretty(&t.steps)?);
    } else {
        println!("\nDone: direct messages both ways, a non-contact refused, search without addresses, and an offline message delivered on return.");
    }
    Ok(())
}
