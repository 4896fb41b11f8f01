//! The command-line front end: flags, and each command as a thin call to the agent (or,
//! for `register`, `msg list` and `demo`, to the library directly).

use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use clap::{Parser, Subcommand};
use peerline_core::client::{ClientEvent, Command, CommandResult};
use peerline_net::bootstrap::Bootstrap;
use peerline_net::client::{local_candidates, run_client, Input};
use peerline_wire::Username;
use serde_json::{json, Value};

use crate::control::{call, ControlError, ControlRequest};
use crate::history::History;
use crate::profile::Profile;

/// Peerline: peer-to-peer messaging and calls.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
pub struct Cli {
    /// Profile directory (default: $PEERLINE_PROFILE, else ~/.peerline).
    #[arg(long, global = true)]
    pub profile: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub cmd: Cmd,
}

/// Top-level commands.
#[derive(Subcommand, Debug)]
pub enum Cmd {
    /// Create an account on a supernode with this device (password from $PEERLINE_PASSWORD or a prompt).
    Register {
        /// Username: 3 to 32 of a-z 0-9 . _ -
        user: String,
        /// The supernode's bootstrap entry HOST:PORT#KEY.
        #[arg(long)]
        server: String,
        /// Print the result as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Enrol this device into an existing account (password from $PEERLINE_PASSWORD or a prompt).
    Enroll {
        /// Username.
        user: String,
        /// The supernode's bootstrap entry HOST:PORT#KEY.
        #[arg(long)]
        server: String,
    },
    /// Start the agent in the background; returns once online.
    Up {
        /// Print the status as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stop the agent.
    Down,
    /// Show whether the agent is online, as whom, on which supernode.
    Status {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Manage contacts.
    Contacts {
        /// Contact command.
        #[command(subcommand)]
        cmd: ContactsCmd,
    },
    /// Set presence.
    Presence {
        /// Presence command.
        #[command(subcommand)]
        cmd: PresenceCmd,
    },
    /// Privacy settings.
    Privacy {
        /// Privacy command.
        #[command(subcommand)]
        cmd: PrivacyCmd,
    },
    /// Find users by username prefix.
    Search {
        /// Prefix.
        query: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Send and list messages.
    Msg {
        /// Message command.
        #[command(subcommand)]
        cmd: MsgCmd,
    },
    /// Call USER: rings, streams --play once answered, records what it hears into
    /// --record, hangs up after --duration or at the end of --play, then prints the call's
    /// statistics.
    Call {
        /// Callee.
        user: String,
        /// WAV file to send (any common sample rate and channel count); silence without.
        #[arg(long)]
        play: Option<PathBuf>,
        /// WAV file to write with what you hear (48 kHz mono).
        #[arg(long)]
        record: Option<PathBuf>,
        /// Hang up after this many seconds.
        #[arg(long)]
        duration: Option<f64>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Incoming calls and call settings.
    Calls {
        /// Calls command.
        #[command(subcommand)]
        cmd: CallsCmd,
    },
    /// Follow the agent's live events (messages, presence, contact requests, online state).
    Events {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// The terminal app: contacts, conversations, presence and settings in one screen
    /// (starts the agent if needed; offers registration when the profile has no account).
    Tui {
        /// Pre-fill the supernode's bootstrap entry HOST:PORT#KEY when registering.
        #[arg(long)]
        server: Option<String>,
    },
    /// Run a self-contained demo: a supernode and three users on loopback.
    Demo {
        /// JSON transcript.
        #[arg(long)]
        json: bool,
    },
    /// Run the agent in the foreground (what `up` starts).
    #[command(hide = true)]
    Agent,
}

/// `contacts` subcommands.
#[derive(Subcommand, Debug)]
pub enum ContactsCmd {
    /// Ask USER to become a contact.
    Add {
        /// Who.
        user: String,
        /// A note shown with the request.
        #[arg(long, default_value = "")]
        note: String,
    },
    /// Accept USER's request.
    Accept {
        /// Who.
        user: String,
    },
    /// Decline USER's request.
    Decline {
        /// Who.
        user: String,
    },
    /// Block USER.
    Block {
        /// Who.
        user: String,
    },
    /// Remove USER (or withdraw a request, or unblock).
    Remove {
        /// Who.
        user: String,
    },
    /// List contacts with their state and presence.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// `presence` subcommands.
#[derive(Subcommand, Debug)]
pub enum PresenceCmd {
    /// online, away, busy or invisible.
    Set {
        /// The presence.
        state: String,
    },
}

/// `privacy` subcommands.
#[derive(Subcommand, Debug)]
pub enum PrivacyCmd {
    /// Relay-only mode: never reveal this device's addresses to peers; sessions always go
    /// through the operator's relay (or the mailbox without one).
    RelayOnly {
        /// on or off.
        #[arg(value_parser = ["on", "off"])]
        state: String,
    },
    /// Show the privacy settings.
    Show {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

/// `calls` subcommands.
#[derive(Subcommand, Debug)]
pub enum CallsCmd {
    /// Wait for the next incoming call and answer (--accept) or decline (--decline) it;
    /// returns with the call's statistics when it ends.
    Wait {
        /// Answer it.
        #[arg(long, conflicts_with = "decline", required_unless_present = "decline")]
        accept: bool,
        /// Decline it.
        #[arg(long)]
        decline: bool,
        /// WAV file to send; silence without.
        #[arg(long)]
        play: Option<PathBuf>,
        /// WAV file to write with what you hear (48 kHz mono).
        #[arg(long)]
        record: Option<PathBuf>,
        /// Hang up after this many seconds (else when the caller does).
        #[arg(long)]
        duration: Option<f64>,
        /// Give up waiting for a call after this many seconds.
        #[arg(long, default_value_t = 3600.0)]
        timeout: f64,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Calls ringing or running now.
    List {
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Hang up, cancel or decline a call.
    Hangup {
        /// The call's id (from `calls list`).
        call_id: u64,
    },
    /// Who may ring you: `contacts` (the default) or `anyone`.
    From {
        /// contacts or anyone.
        #[arg(value_parser = ["contacts", "anyone"])]
        who: String,
    },
}

/// `msg` subcommands.
#[derive(Subcommand, Debug)]
pub enum MsgCmd {
    /// Send TEXT to USER; succeeds once delivered or durably queued at the supernode.
    Send {
        /// Recipient.
        user: String,
        /// Text.
        text: String,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// List messages (with USER only, if given).
    List {
        /// Only with this user.
        user: Option<String>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

const CALL_TIMEOUT: Duration = Duration::from_secs(30);

fn agent(profile: &Profile, req: ControlRequest) -> anyhow::Result<Value> {
    call(&profile.socket_path(), &req, CALL_TIMEOUT).map_err(|e| anyhow!(e))
}

/// `path` made absolute (the agent runs in another directory).
fn absolute(path: PathBuf) -> anyhow::Result<PathBuf> {
    std::path::absolute(&path).with_context(|| format!("bad path {}", path.display()))
}

/// Prints a call's report.
fn print_call(v: &Value, json: bool) {
    if json {
        return print_json(v);
    }
    let peer = v["peer"].as_str().unwrap_or("?");
    let reason = v["end_reason"].as_str().unwrap_or("ended");
    if v["media"].is_null() {
        println!("call with {peer}: {reason}");
        return;
    }
    let m = &v["media"];
    let f = |x: &Value| x.as_f64().map_or("-".to_string(), |x| format!("{x:.1}"));
    println!(
        "call with {peer}: {} s over a {} path, set up in {} ms; {reason}",
        f(&v["duration_s"]),
        v["via"].as_str().unwrap_or("?"),
        v["setup_ms"].as_u64().map_or("-".into(), |x| x.to_string())
    );
    println!(
        "  rtt {} ms, loss {} % before recovery and {} % after, jitter {} ms",
        f(&m["rtt_ms"]),
        f(&Value::from(
            m["loss_before_recovery"].as_f64().unwrap_or(0.0) * 100.0
        )),
        f(&Value::from(
            m["loss_after_recovery"].as_f64().unwrap_or(0.0) * 100.0
        )),
        f(&m["jitter_ms"])
    );
    println!(
        "  playout delay {} ms (mean {}), codec {} ms, sending {} kb/s (Opus {} kb/s)",
        f(&m["playout_delay_ms"]),
        f(&m["mean_playout_delay_ms"]),
        f(&m["codec_delay_ms"]),
        f(&m["send_kbps"]),
        f(&m["bitrate_kbps"])
    );
    if let Some(p) = v["recorded"].as_str() {
        println!("  recorded to {p}");
    }
    if let Some(e) = v["media_error"].as_str() {
        println!("  audio problem: {e}");
    }
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn password() -> anyhow::Result<String> {
    if let Ok(p) = std::env::var("PEERLINE_PASSWORD") {
        return Ok(p);
    }
    eprint!("password: ");
    let _ = std::io::stderr().flush();
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .context("cannot read the password: set PEERLINE_PASSWORD")?;
    let p = line.trim_end_matches(['\r', '\n']).to_string();
    if p.is_empty() {
        bail!("no password given: set PEERLINE_PASSWORD or type one at the prompt");
    }
    Ok(p)
}

/// Register or enrol this profile's device; the password comes from the environment or a prompt.
async fn enrol(
    profile: &Profile,
    user: &str,
    server: &str,
    register: bool,
) -> anyhow::Result<String> {
    let username = Username::parse(user)?;
    let b = Bootstrap::parse(server)?;
    enrol_with(profile, username, b, None, register).await
}

/// Register or enrol this profile's device with the supernode in `b`; returns its host.
pub(crate) async fn enrol_with(
    profile: &Profile,
    username: Username,
    b: Bootstrap,
    pw: Option<String>,
    register: bool,
) -> anyhow::Result<String> {
    if let Some(c) = profile.cert()? {
        let name = peerline_crypto::Certificate::verify(&c, &b.authority)
            .map(|c| c.username().to_string())
            .unwrap_or_else(|_| "another account".into());
        bail!(
            "this profile ({}) is already registered as {name}: use another --profile",
            profile.dir().display()
        );
    }
    let pw = match pw {
        Some(p) => p,
        None => password()?,
    };
    profile.save_server(&b)?;
    let (mut client, cfg) = crate::agent::client_for(profile, None)?;
    let socket = tokio::net::UdpSocket::bind(peerline_net::client::bind_addr(cfg.server)).await?;
    client.set_local_candidates(local_candidates(&socket, cfg.server));
    let (in_tx, in_rx) = tokio::sync::mpsc::channel(8);
    let (ev_tx, mut ev_rx) = tokio::sync::mpsc::channel(64);
    let driver = tokio::spawn(run_client(client, socket, in_rx, ev_tx, cfg.server));
    let (tx, rx) = tokio::sync::oneshot::channel();
    let cmd = if register {
        Command::Register {
            username,
            password: pw,
        }
    } else {
        Command::Enroll {
            username,
            password: pw,
        }
    };
    in_tx
        .send(Input::Command(cmd, tx))
        .await
        .map_err(|_| anyhow!("client stopped"))?;
    let result = rx.await.map_err(|_| anyhow!("client stopped"))?;
    let mut cert = None;
    while let Ok(ev) = ev_rx.try_recv() {
        if let ClientEvent::Certificate(c) = ev {
            cert = Some(c);
        }
    }
    let _ = in_tx.send(Input::Shutdown).await;
    let _ = driver.await;
    match (result, cert) {
        (CommandResult::Ok, Some(c)) => {
            profile.save_cert(&c)?;
            Ok(b.host)
        }
        (CommandResult::Error { detail, .. }, _) => {
            let _ = std::fs::remove_file(profile.dir().join("server"));
            if detail.contains("unreachable") {
                bail!(
                    "supernode unreachable at {}: is it running, and is the bootstrap entry right?",
                    b.host
                )
            }
            bail!("{detail}")
        }
        _ => bail!("the supernode did not issue a certificate"),
    }
}

fn agent_running(profile: &Profile) -> bool {
    std::os::unix::net::UnixStream::connect(profile.socket_path()).is_ok()
}

fn status_value(profile: &Profile) -> anyhow::Result<Value> {
    let cert = profile
        .cert()
        .ok()
        .flatten()
        .and_then(|c| peerline_wire::cert::CertRepr::decode(&c).ok());
    // The device's Noise key: what an operator needs to revoke it (`peerlined revoke`).
    let device = cert.as_ref().map(|c| hex::encode(c.noise_key));
    let mut v = match call(
        &profile.socket_path(),
        &ControlRequest::Status,
        Duration::from_secs(5),
    ) {
        Ok(v) => v,
        Err(ControlError::NotRunning) => {
            let server = profile.server().map(|b| b.host).ok();
            let user = cert.as_ref().map(|c| c.username.to_string());
            json!({"online": false, "user": user, "supernode": server, "agent": "stopped"})
        }
        Err(e) => return Err(anyhow!(e)),
    };
    if let Some(o) = v.as_object_mut() {
        o.insert("device".into(), json!(device));
    }
    Ok(v)
}

fn up(profile: &Profile, json_out: bool) -> anyhow::Result<()> {
    profile
        .cert()?
        .ok_or_else(|| crate::profile::ProfileError::NotRegistered(profile.dir().to_path_buf()))?;
    if !agent_running(profile) {
        let mut child = crate::agent::spawn_agent(profile).map_err(|e| anyhow!(e))?;
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                let tail = std::fs::read_to_string(profile.log_path())
                    .ok()
                    .and_then(|t| {
                        t.lines()
                            .rev()
                            .find(|l| !l.trim().is_empty())
                            .map(str::to_string)
                    })
                    .unwrap_or_default();
                bail!("the agent exited ({status}): {tail}");
            }
            if let Ok(v) = status_value(profile) {
                if v["online"] == json!(true) {
                    break;
                }
            }
            if start.elapsed() > Duration::from_secs(15) {
                let why = status_value(profile)
                    .ok()
                    .and_then(|v| v["reason"].as_str().map(str::to_string))
                    .unwrap_or_else(|| "supernode unreachable?".into());
                bail!(
                    "not online after 15 s ({why}); the agent keeps trying in the background (see {}; `peerline down` stops it)",
                    profile.log_path().display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    } else {
        // Already running: make it connect now (taking the account back if another device
        // had signed in), then wait briefly for it to be online.
        let _ = call(
            &profile.socket_path(),
            &ControlRequest::Connect,
            Duration::from_secs(5),
        );
        let start = Instant::now();
        while status_value(profile)?["online"] != json!(true) {
            if start.elapsed() > Duration::from_secs(15) {
                bail!(
                    "the agent is running but not online: supernode unreachable? (see {})",
                    profile.log_path().display()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    // Give a relay allocation in progress a moment: a connection set up right after `up`
    // can then offer it (it matters most where UDP is blocked and only the relay works).
    let start = Instant::now();
    while status_value(profile)?["relay"] == json!("allocating")
        && start.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let v = status_value(profile)?;
    if json_out {
        print_json(&v);
    } else {
        println!(
            "{} is online via {}",
            v["user"].as_str().unwrap_or("?"),
            v["supernode"].as_str().unwrap_or("?")
        );
    }
    Ok(())
}

fn down(profile: &Profile) -> anyhow::Result<()> {
    match call(
        &profile.socket_path(),
        &ControlRequest::Down,
        Duration::from_secs(5),
    ) {
        Ok(_) => {
            let start = Instant::now();
            while agent_running(profile) && start.elapsed() < Duration::from_secs(5) {
                std::thread::sleep(Duration::from_millis(50));
            }
            println!("agent stopped");
            Ok(())
        }
        Err(ControlError::NotRunning) => {
            println!("agent is not running");
            Ok(())
        }
        Err(e) => Err(anyhow!(e)),
    }
}

/// Prints the agent's events as they happen, until the agent stops or the reader quits.
fn events(profile: &Profile, json_out: bool) -> anyhow::Result<()> {
    use std::io::{BufRead, BufReader, Write};
    let mut s = std::os::unix::net::UnixStream::connect(profile.socket_path())
        .map_err(|_| anyhow!(ControlError::NotRunning))?;
    s.write_all(b"{\"op\":\"events\"}\n")?;
    let stdout = std::io::stdout();
    for line in BufReader::new(s).lines() {
        let line = line?;
        let mut out = stdout.lock();
        if json_out {
            writeln!(out, "{line}")?;
        } else {
            let v: Value = serde_json::from_str(&line).unwrap_or(Value::Null);
            let t = time_str(v["time"].as_u64().unwrap_or(0));
            let s = |k: &str| v[k].as_str().unwrap_or("?").to_string();
            let text = match v["type"].as_str().unwrap_or("") {
                "message" => format!("{} -> {} [{}] {}", s("from"), s("to"), s("via"), s("text")),
                "sent" => format!("{} -> {} [{}] {}", s("from"), s("to"), s("via"), s("text")),
                "presence" => format!("{} is {}", s("user"), s("presence")),
                "contact" => format!("contact {}: {} {}", s("user"), s("state"), s("note")),
                "online" => "online".to_string(),
                "offline" => format!("offline: {}", s("reason")),
                "lagged" => format!("(missed {} events)", v["missed"]),
                other => format!("{other}: {line}"),
            };
            writeln!(out, "{t} {text}")?;
        }
        // A closed pipe (`| head`) ends the command quietly.
        if out.flush().is_err() {
            break;
        }
    }
    Ok(())
}

fn time_str(ms: u64) -> String {
    let s = ms / 1000;
    let (h, m, sec) = ((s / 3600) % 24, (s / 60) % 60, s % 60);
    format!("{h:02}:{m:02}:{sec:02}Z")
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let dir = Profile::resolve(cli.profile);
    if let Cmd::Demo { json } = cli.cmd {
        return crate::demo::run_demo(json);
    }
    let profile = Profile::open(&dir)?;
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot start the async runtime")
    };
    match cli.cmd {
        Cmd::Demo { .. } => unreachable!("handled above"),
        Cmd::Agent => {
            let filter = tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
            tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .init();
            rt()?.block_on(crate::agent::run_agent(profile))?;
        }
        Cmd::Register { user, server, json } => {
            let host = rt()?.block_on(enrol(&profile, &user, &server, true))?;
            let user = Username::parse(&user)?;
            if json {
                print_json(
                    &json!({"user": user.as_str(), "supernode": host, "profile": profile.dir()}),
                );
            } else {
                println!(
                    "registered {user} on {host}; start with: peerline --profile {} up",
                    profile.dir().display()
                );
            }
        }
        Cmd::Enroll { user, server } => {
            let host = rt()?.block_on(enrol(&profile, &user, &server, false))?;
            println!("enrolled this device as {user} on {host}");
        }
        Cmd::Up { json } => up(&profile, json)?,
        Cmd::Tui { server } => crate::tui::run(profile, server)?,
        Cmd::Events { json } => events(&profile, json)?,
        Cmd::Down => down(&profile)?,
        Cmd::Status { json } => {
            let v = status_value(&profile)?;
            if json {
                print_json(&v);
            } else if v["online"] == json!(true) {
                println!(
                    "{} online via {} ({}); direct sessions: {}",
                    v["user"].as_str().unwrap_or("?"),
                    v["supernode"].as_str().unwrap_or("?"),
                    v["presence"].as_str().unwrap_or("?"),
                    v["direct_peers"].as_array().map_or(0, |a| a.len())
                );
            } else {
                println!(
                    "offline (agent {}); user {}",
                    v["agent"].as_str().unwrap_or("reconnecting"),
                    v["user"].as_str().unwrap_or("not registered")
                );
            }
        }
        Cmd::Contacts { cmd } => {
            let (req, done) = match cmd {
                ContactsCmd::Add { user, note } => (
                    ControlRequest::ContactAdd {
                        user: user.clone(),
                        note,
                    },
                    format!("contact request sent to {user}"),
                ),
                ContactsCmd::Accept { user } => (
                    ControlRequest::ContactReply {
                        user: user.clone(),
                        action: "accept".into(),
                    },
                    format!("{user} is now a contact"),
                ),
                ContactsCmd::Decline { user } => (
                    ControlRequest::ContactReply {
                        user: user.clone(),
                        action: "decline".into(),
                    },
                    format!("declined {user}"),
                ),
                ContactsCmd::Block { user } => (
                    ControlRequest::ContactReply {
                        user: user.clone(),
                        action: "block".into(),
                    },
                    format!("blocked {user}"),
                ),
                ContactsCmd::Remove { user } => (
                    ControlRequest::ContactRemove { user: user.clone() },
                    format!("removed {user}"),
                ),
                ContactsCmd::List { json } => {
                    let v = agent(&profile, ControlRequest::ContactList)?;
                    if json {
                        print_json(&v);
                    } else if v.as_array().is_none_or(|a| a.is_empty()) {
                        println!("no contacts yet: `peerline contacts add USER`");
                    } else {
                        for c in v.as_array().into_iter().flatten() {
                            println!(
                                "{:<32} {:<10} {}",
                                c["user"].as_str().unwrap_or("?"),
                                c["state"].as_str().unwrap_or("?"),
                                c["presence"].as_str().unwrap_or("?")
                            );
                        }
                    }
                    return Ok(());
                }
            };
            agent(&profile, req)?;
            println!("{done}");
        }
        Cmd::Privacy {
            cmd: PrivacyCmd::RelayOnly { state },
        } => {
            profile.save_relay_only(state == "on")?;
            if agent_running(&profile) {
                println!("relay-only mode {state}: takes effect at the next `peerline down` and `peerline up`");
            } else {
                println!("relay-only mode {state}");
            }
        }
        Cmd::Privacy {
            cmd: PrivacyCmd::Show { json },
        } => {
            let on = profile.relay_only();
            let from = if profile.anyone_can_call() {
                "anyone"
            } else {
                "contacts"
            };
            if json {
                print_json(&json!({"relay_only": on, "calls_from": from}));
            } else {
                println!("relay-only mode: {}", if on { "on" } else { "off" });
                println!("calls from: {from}");
            }
        }
        Cmd::Presence {
            cmd: PresenceCmd::Set { state },
        } => {
            agent(
                &profile,
                ControlRequest::Presence {
                    presence: state.clone(),
                },
            )?;
            println!("presence set to {state}");
        }
        Cmd::Search { query, json } => {
            let v = agent(&profile, ControlRequest::Search { prefix: query })?;
            if json {
                print_json(&v);
            } else {
                let users: Vec<&str> = v
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|u| u.as_str())
                    .collect();
                if users.is_empty() {
                    println!("no users found");
                }
                for u in users {
                    println!("{u}");
                }
            }
        }
        Cmd::Msg {
            cmd: MsgCmd::Send { user, text, json },
        } => {
            let v = agent(
                &profile,
                ControlRequest::MsgSend {
                    to: user.clone(),
                    text,
                },
            )?;
            if json {
                print_json(&v);
            } else if v["via"] == json!("offline") {
                println!("queued for {user} at the supernode (offline delivery)");
            } else {
                println!("delivered to {user} ({})", v["via"].as_str().unwrap_or("?"));
            }
        }
        Cmd::Call {
            user,
            play,
            record,
            duration,
            json,
        } => {
            let req = ControlRequest::Call {
                user: user.clone(),
                play: play.map(absolute).transpose()?,
                record: record.map(absolute).transpose()?,
                duration_s: duration,
            };
            let limit = Duration::from_secs_f64(duration.unwrap_or(3600.0) + 120.0);
            let v = call(&profile.socket_path(), &req, limit).map_err(|e| anyhow!(e))?;
            print_call(&v, json);
        }
        Cmd::Calls {
            cmd:
                CallsCmd::Wait {
                    accept,
                    decline,
                    play,
                    record,
                    duration,
                    timeout,
                    json,
                },
        } => {
            let req = ControlRequest::CallsWait {
                accept: accept && !decline,
                play: play.map(absolute).transpose()?,
                record: record.map(absolute).transpose()?,
                duration_s: duration,
                timeout_s: Some(timeout),
            };
            let limit = Duration::from_secs_f64(timeout + duration.unwrap_or(86_400.0) + 120.0);
            let v = call(&profile.socket_path(), &req, limit).map_err(|e| anyhow!(e))?;
            print_call(&v, json);
        }
        Cmd::Calls {
            cmd: CallsCmd::List { json },
        } => {
            let v = agent(&profile, ControlRequest::CallsList)?;
            if json {
                print_json(&v);
            } else if v.as_array().is_none_or(|a| a.is_empty()) {
                println!("no calls");
            } else {
                for c in v.as_array().into_iter().flatten() {
                    println!(
                        "{:<20} {:<32} {:<9} {:<10} {}",
                        c["call_id"],
                        c["peer"].as_str().unwrap_or("?"),
                        c["direction"].as_str().unwrap_or("?"),
                        c["state"].as_str().unwrap_or("?"),
                        c["via"].as_str().unwrap_or("")
                    );
                }
            }
        }
        Cmd::Calls {
            cmd: CallsCmd::Hangup { call_id },
        } => {
            agent(&profile, ControlRequest::CallHangUp { call_id })?;
            println!("call {call_id} ended");
        }
        Cmd::Calls {
            cmd: CallsCmd::From { who },
        } => {
            agent(&profile, ControlRequest::CallPolicy { from: who.clone() })?;
            println!("calls from {who} ring this device");
        }
        Cmd::Msg {
            cmd: MsgCmd::List { user, json },
        } => {
            let h = History::open(&profile.history_path())
                .context("cannot open the message history")?;
            let filter = user.as_deref().map(Username::parse).transpose()?;
            let entries = h.list(filter.as_ref().map(|u| u.as_str()))?;
            if json {
                print_json(&serde_json::to_value(&entries)?);
            } else if entries.is_empty() {
                println!("no messages");
            } else {
                for e in entries {
                    println!(
                        "{} {} -> {} [{}] {}",
                        time_str(e.time),
                        e.from,
                        e.to,
                        e.via,
                        e.text
                    );
                }
            }
        }
    }
    Ok(())
}
