//! The background agent: keeps the device online, saves what arrives, and serves the
//! control socket the CLI talks to.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use peerline_core::client::{Client, ClientConfig, ClientEvent, Command, CommandResult};
use peerline_core::clock::WallClock;
use peerline_net::client::{local_candidates, run_client, Input};
use peerline_wire::msg::{ContactAction, Presence};
use peerline_wire::Username;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::calls::{CallManager, MediaPlan};
use crate::control::{ControlRequest, ControlResponse};
use crate::history::{Entry, History};
use crate::profile::{Profile, ProfileError};

/// Why the agent could not start or stopped.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AgentError {
    /// Profile problem.
    #[error(transparent)]
    Profile(#[from] ProfileError),
    /// Another agent is serving this profile.
    #[error("an agent is already running for this profile")]
    AlreadyRunning,
    /// Socket or file IO.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// History database.
    #[error("message history: {0}")]
    History(#[from] rusqlite::Error),
}

struct Shared {
    profile: Profile,
    input: mpsc::Sender<Input>,
    history: Mutex<History>,
    me: Username,
    /// The bootstrap entry's host (as the user wrote it) and its address.
    server: String,
    server_addr: std::net::SocketAddr,
    stop: Notify,
    /// Why the agent last went offline (shown by `status` and `up`).
    reason: Mutex<Option<String>>,
    /// Live events for `peerline events` (and the terminal app): one JSON object each.
    events: tokio::sync::broadcast::Sender<serde_json::Value>,
    /// Calls and their media.
    calls: CallManager,
}

/// Events kept for a slow `events` reader before it is told it missed some.
const EVENT_BACKLOG: usize = 256;

impl Shared {
    fn emit(&self, kind: &str, data: serde_json::Value) {
        emit_to(&self.events, kind, data);
    }
}

/// Publishes one live event (no subscriber is fine: nobody is listening).
fn emit_to(
    events: &tokio::sync::broadcast::Sender<serde_json::Value>,
    kind: &str,
    mut data: serde_json::Value,
) {
    if let Some(o) = data.as_object_mut() {
        o.insert("type".into(), json!(kind));
        o.insert("time".into(), json!(peerline_net::unix_ms_now()));
    }
    let _ = events.send(data);
}

/// Builds the client core for a registered profile.
pub fn client_for(
    profile: &Profile,
    cert: Option<Vec<u8>>,
) -> Result<(Client, ClientConfig), ProfileError> {
    let b = profile.server()?;
    let addr = b.addr()?;
    let mut cfg = ClientConfig::new(addr, b.node_key, b.authority);
    cfg.relay_only = profile.relay_only();
    let now = Instant::now();
    let mut client = Client::new(
        cfg.clone(),
        profile.keys()?,
        cert.as_deref(),
        peerline_net::os_seed(),
        WallClock::new(now, peerline_net::unix_ms_now()),
        now,
    );
    // The fleet's supernodes from last time: where to go if the bootstrap one is gone.
    client.add_hosts(&profile.hosts());
    Ok((client, cfg))
}

/// Starts the agent for `profile` in the background, logging to the profile's agent log.
/// It runs in its own process group, so it outlives the terminal (or app) that started it
/// and ignores a Ctrl-C there. Errors are one line each.
pub fn spawn_agent(profile: &Profile) -> Result<std::process::Child, String> {
    use std::os::unix::process::CommandExt;
    use std::process::Stdio;
    let exe =
        std::env::current_exe().map_err(|e| format!("cannot find the peerline executable: {e}"))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(profile.log_path())
        .map_err(|e| format!("cannot open {}: {e}", profile.log_path().display()))?;
    std::process::Command::new(exe)
        .arg("--profile")
        .arg(profile.dir())
        .arg("agent")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .process_group(0)
        .spawn()
        .map_err(|e| format!("cannot start the agent: {e}"))
}

/// Runs the agent for `profile` until asked to stop.
pub async fn run_agent(profile: Profile) -> Result<(), AgentError> {
    let cert = profile
        .cert()?
        .ok_or_else(|| ProfileError::NotRegistered(profile.dir().to_path_buf()))?;
    let sock_path = profile.socket_path();
    if sock_path.exists() {
        if UnixStream::connect(&sock_path).await.is_ok() {
            return Err(AgentError::AlreadyRunning);
        }
        std::fs::remove_file(&sock_path)?;
    }
    let (mut client, cfg) = client_for(&profile, Some(cert))?;
    let me = client
        .username()
        .cloned()
        .ok_or_else(|| ProfileError::Corrupt(profile.dir().join("device.cert")))?;
    let socket = tokio::net::UdpSocket::bind(peerline_net::client::bind_addr(cfg.server)).await?;
    client.set_local_candidates(local_candidates(&socket, cfg.server));
    // Log in with the presence chosen last time, so an invisible user never flashes online.
    let presence = profile.presence();
    if presence != Presence::Online {
        client.command(Instant::now(), Command::SetPresence(presence));
    }
    if profile.anyone_can_call() {
        client.command(Instant::now(), Command::SetCallPolicy { anyone: true });
    }
    let listener = UnixListener::bind(&sock_path)?;
    std::fs::write(profile.pid_path(), format!("{}\n", std::process::id()))?;

    let (in_tx, in_rx) = mpsc::channel(256);
    let (ev_tx, mut ev_rx) = mpsc::channel(256);
    let driver = tokio::spawn(run_client(client, socket, in_rx, ev_tx, cfg.server));
    let shared = Arc::new(Shared {
        profile: profile.clone(),
        input: in_tx.clone(),
        history: Mutex::new(History::open(&profile.history_path())?),
        me: me.clone(),
        server: profile.server()?.host,
        server_addr: cfg.server,
        stop: Notify::new(),
        reason: Mutex::new(None),
        events: tokio::sync::broadcast::channel(EVENT_BACKLOG).0,
        calls: CallManager::new(),
    });
    tracing::info!(user = %me, "agent started");

    loop {
        tokio::select! {
            ev = ev_rx.recv() => {
                let Some(ev) = ev else { break };
                on_event(&profile, &shared, ev).await;
            }
            conn = listener.accept() => {
                if let Ok((stream, _)) = conn {
                    let sh = shared.clone();
                    tokio::spawn(async move { serve(sh, stream).await });
                }
            }
            _ = shared.stop.notified() => break,
        }
    }
    tracing::info!("agent stopping");
    let _ = in_tx.send(Input::Shutdown).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), driver).await;
    let _ = std::fs::remove_file(&sock_path);
    let _ = std::fs::remove_file(profile.pid_path());
    Ok(())
}

async fn on_event(profile: &Profile, shared: &Shared, ev: ClientEvent) {
    match ev {
        ClientEvent::Message {
            token,
            from,
            msg_id,
            sent_at,
            text,
            via,
        } => {
            let entry = Entry {
                from: from.to_string(),
                to: shared.me.to_string(),
                text,
                time: sent_at,
                via: via.as_str().into(),
                msg_id,
            };
            // The guard is dropped inside `map`, before any await.
            let added = shared.history.lock().ok().map(|h| h.add(&entry));
            let saved = matches!(added, Some(Ok(_)));
            if saved {
                tracing::info!(from = %from, via = via.as_str(), "message received");
                if matches!(added, Some(Ok(true))) {
                    shared.emit(
                        "message",
                        json!({"from": entry.from, "to": entry.to, "text": entry.text, "sent_at": entry.time, "via": entry.via, "msg_id": entry.msg_id}),
                    );
                }
                // Only now may the sender (or the supernode's mailbox) forget it.
                let _ = shared.input.send(Input::Saved(token)).await;
            } else {
                tracing::error!("could not save a received message; it will be delivered again");
            }
        }
        ClientEvent::Certificate(bytes) => {
            if let Err(e) = profile.save_cert(&bytes) {
                tracing::error!(error = %e, "could not save the renewed certificate");
            }
        }
        ClientEvent::Hosts(hosts) => {
            tracing::info!(hosts = hosts.len(), "fleet host cache updated");
            if let Err(e) = profile.save_hosts(&hosts) {
                tracing::warn!(error = %e, "could not save the host cache");
            }
            shared.emit(
                "hosts",
                json!({"hosts": hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>()}),
            );
        }
        ClientEvent::Online => {
            tracing::info!("online");
            shared.emit("online", json!({}));
            if let Ok(mut r) = shared.reason.lock() {
                *r = None;
            }
        }
        ClientEvent::Offline { reason } => {
            tracing::warn!(%reason, "offline; reconnecting");
            shared.emit("offline", json!({"reason": reason}));
            if let Ok(mut r) = shared.reason.lock() {
                *r = Some(reason);
            }
        }
        ClientEvent::Contact { user, state, note } => {
            tracing::info!(user = %user, state = state.as_str(), "contact");
            shared.emit(
                "contact",
                json!({"user": user.as_str(), "state": state.as_str(), "note": note}),
            );
        }
        ClientEvent::Presence { user, presence } => {
            tracing::info!(user = %user, presence = presence.as_str(), "presence");
            shared.emit(
                "presence",
                json!({"user": user.as_str(), "presence": presence.as_str()}),
            );
        }
        ClientEvent::Call(info) => {
            tracing::info!(call = info.call_id, peer = %info.peer, state = info.state.as_str(), "call");
            shared.emit("call", serde_json::to_value(&info).unwrap_or_default());
            let events = shared.events.clone();
            shared
                .calls
                .on_state(info, &shared.input, move |kind, data| {
                    emit_to(&events, kind, data)
                });
        }
        ClientEvent::CallMedia { call_id, bytes } => shared.calls.on_media(call_id, bytes),
        ClientEvent::CommandDone { .. } => {}
    }
}

async fn serve(shared: Arc<Shared>, stream: UnixStream) {
    let (r, mut w) = stream.into_split();
    // One request per connection, at most 64 KiB.
    let mut lines = BufReader::new(r.take(64 * 1024)).lines();
    let Ok(Some(line)) = lines.next_line().await else {
        return;
    };
    if let Ok(ControlRequest::Events) = serde_json::from_str::<ControlRequest>(&line) {
        return stream_events(&shared, &mut w).await;
    }
    let resp = match serde_json::from_str::<ControlRequest>(&line) {
        Ok(req) => handle(&shared, req).await,
        Err(_) => ControlResponse::err("malformed control request"),
    };
    let mut out = serde_json::to_string(&resp).unwrap_or_else(|_| "{\"ok\":false}".into());
    out.push('\n');
    let _ = w.write_all(out.as_bytes()).await;
}

/// Streams events, one JSON line each, until the reader goes away.
async fn stream_events(shared: &Shared, w: &mut tokio::net::unix::OwnedWriteHalf) {
    use tokio::sync::broadcast::error::RecvError;
    let mut rx = shared.events.subscribe();
    loop {
        let v = match rx.recv().await {
            Ok(v) => v,
            Err(RecvError::Lagged(n)) => json!({"type": "lagged", "missed": n}),
            Err(RecvError::Closed) => return,
        };
        let mut line = v.to_string();
        line.push('\n');
        if w.write_all(line.as_bytes()).await.is_err() {
            return;
        }
    }
}

fn user(s: &str) -> Result<Username, ControlResponse> {
    Username::parse(s).map_err(|e| ControlResponse::err(e.to_string()))
}

async fn command(shared: &Shared, cmd: Command) -> CommandResult {
    let (tx, rx) = oneshot::channel();
    if shared.input.send(Input::Command(cmd, tx)).await.is_err() {
        return CommandResult::Error {
            code: peerline_wire::msg::ErrorCode::Internal,
            detail: "the agent is shutting down".into(),
        };
    }
    rx.await.unwrap_or(CommandResult::Error {
        code: peerline_wire::msg::ErrorCode::Internal,
        detail: "the agent is shutting down".into(),
    })
}

fn to_response(r: CommandResult) -> ControlResponse {
    match r {
        CommandResult::Ok => ControlResponse::ok(json!({})),
        CommandResult::Contacts(entries) => ControlResponse::ok(json!(entries
            .iter()
            .map(|e| json!({"user": e.user.as_str(), "state": e.state.as_str(), "presence": e.presence.as_str()}))
            .collect::<Vec<_>>())),
        CommandResult::Users(users) => ControlResponse::ok(json!(users.iter().map(|u| u.as_str()).collect::<Vec<_>>())),
        CommandResult::Sent { via, msg_id, sent_at } => {
            ControlResponse::ok(json!({"via": via.as_str(), "msg_id": msg_id, "time": sent_at}))
        }
        CommandResult::Call { call_id } => ControlResponse::ok(json!({"call_id": call_id})),
        CommandResult::Error { detail, .. } => ControlResponse::err(detail),
    }
}

async fn handle(shared: &Shared, req: ControlRequest) -> ControlResponse {
    let cmd = match req {
        ControlRequest::Status => {
            let (tx, rx) = oneshot::channel();
            if shared.input.send(Input::Status(tx)).await.is_err() {
                return ControlResponse::err("the agent is shutting down");
            }
            return match rx.await {
                Ok(s) => ControlResponse::ok(json!({
                    "online": s.online,
                    "user": s.user,
                    "supernode": supernode_name(&shared.server, shared.server_addr, s.supernode),
                    "bootstrap": shared.server,
                    "hosts": s.hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
                    "presence": s.presence,
                    "transport": s.transport,
                    "relay": s.relay,
                    "relay_only": shared.profile.relay_only(),
                    "direct_peers": s.direct_peers,
                    "agent_pid": std::process::id(),
                    "reason": shared.reason.lock().ok().and_then(|r| r.clone()),
                    "audio": crate::calls::AUDIO_SUPPORT,
                    "call_policy": if shared.profile.anyone_can_call() { "anyone" } else { "contacts" },
                })),
                Err(_) => ControlResponse::err("the agent is shutting down"),
            };
        }
        ControlRequest::Events => {
            // Handled in `serve` (the connection stays open); never reaches here.
            return ControlResponse::err("events are streamed on their own connection");
        }
        ControlRequest::Connect => {
            let _ = shared.input.send(Input::Connect).await;
            return ControlResponse::ok(json!({}));
        }
        ControlRequest::Down => {
            shared.stop.notify_one();
            return ControlResponse::ok(json!({}));
        }
        ControlRequest::ContactAdd { user: u, note } => match user(&u) {
            Ok(u) => Command::ContactAdd { user: u, note },
            Err(e) => return e,
        },
        ControlRequest::ContactReply { user: u, action } => {
            let action = match action.as_str() {
                "accept" => ContactAction::Accept,
                "decline" => ContactAction::Decline,
                "block" => ContactAction::Block,
                other => return ControlResponse::err(format!("unknown action {other:?}")),
            };
            match user(&u) {
                Ok(u) => Command::ContactReply { user: u, action },
                Err(e) => return e,
            }
        }
        ControlRequest::ContactRemove { user: u } => match user(&u) {
            Ok(u) => Command::ContactRemove { user: u },
            Err(e) => return e,
        },
        ControlRequest::ContactList => Command::ContactList,
        ControlRequest::Presence { presence } => match presence.parse::<Presence>() {
            Ok(p) if p != Presence::Offline => {
                let r = command(shared, Command::SetPresence(p)).await;
                if r == CommandResult::Ok {
                    if let Err(e) = shared.profile.save_presence(p) {
                        tracing::warn!(error = %e, "could not remember the presence");
                    }
                }
                return to_response(r);
            }
            Ok(_) => {
                return ControlResponse::err(
                    "to appear offline use `invisible`; to disconnect use `peerline down`",
                )
            }
            Err(e) => return ControlResponse::err(e),
        },
        ControlRequest::Search { prefix } => Command::Search { prefix },
        ControlRequest::Call {
            user: u,
            play,
            record,
            duration_s,
        } => {
            let u = match user(&u) {
                Ok(u) => u,
                Err(e) => return e,
            };
            let plan = MediaPlan {
                hang_up_at_end: play.is_some() && duration_s.is_none(),
                devices: play.is_none() && record.is_none(),
                play,
                record,
                duration: duration_s.map(Duration::from_secs_f64),
            };
            return place_call(shared, u, plan).await;
        }
        ControlRequest::CallsWait {
            accept,
            play,
            record,
            duration_s,
            timeout_s,
        } => {
            let plan = MediaPlan {
                devices: play.is_none() && record.is_none(),
                play,
                record,
                duration: duration_s.map(Duration::from_secs_f64),
                hang_up_at_end: false,
            };
            let wait = Duration::from_secs_f64(timeout_s.unwrap_or(3600.0).clamp(0.0, 86_400.0));
            return wait_for_call(shared, accept, plan, wait).await;
        }
        ControlRequest::CallStart { user: u } => {
            let u = match user(&u) {
                Ok(u) => u,
                Err(e) => return e,
            };
            // Placed from an app: its report is unused (events tell the story). The plan
            // is in place before the call rings, as for `call`.
            drop(shared.calls.plan_outgoing(u.as_str(), app_plan()));
            return match command(shared, Command::CallStart { user: u.clone() }).await {
                CommandResult::Call { call_id } => {
                    ControlResponse::ok(json!({ "call_id": call_id }))
                }
                other => {
                    shared.calls.cancel_outgoing(u.as_str());
                    to_response(other)
                }
            };
        }
        ControlRequest::CallAnswer { call_id, accept } => {
            if accept {
                // Answered from an app: report unused.
                drop(shared.calls.plan(call_id, app_plan()));
            }
            Command::CallAnswer { call_id, accept }
        }
        ControlRequest::CallHangUp { call_id } => Command::CallHangUp { call_id },
        ControlRequest::CallsList => {
            return ControlResponse::ok(json!(shared.calls.live()));
        }
        ControlRequest::CallPolicy { from } => {
            let anyone = match from.as_str() {
                "anyone" => true,
                "contacts" => false,
                other => {
                    return ControlResponse::err(format!(
                        "unknown policy {other:?}: use `anyone` or `contacts`"
                    ))
                }
            };
            let r = command(shared, Command::SetCallPolicy { anyone }).await;
            if r == CommandResult::Ok {
                if let Err(e) = shared.profile.save_anyone_can_call(anyone) {
                    tracing::warn!(error = %e, "could not remember the call policy");
                }
            }
            return to_response(r);
        }
        ControlRequest::MsgSend { to, text } => {
            let to = match user(&to) {
                Ok(u) => u,
                Err(e) => return e,
            };
            if text.len() > peerline_wire::msg::MAX_TEXT {
                return ControlResponse::err(format!(
                    "message too long ({} bytes): the limit is {} bytes",
                    text.len(),
                    peerline_wire::msg::MAX_TEXT
                ));
            }
            let r = command(
                shared,
                Command::SendMessage {
                    to: to.clone(),
                    text: text.clone(),
                },
            )
            .await;
            if let CommandResult::Sent {
                via,
                msg_id,
                sent_at,
            } = &r
            {
                let entry = Entry {
                    from: shared.me.to_string(),
                    to: to.to_string(),
                    text,
                    time: *sent_at,
                    via: via.as_str().into(),
                    msg_id: *msg_id,
                };
                if let Ok(h) = shared.history.lock() {
                    let _ = h.add(&entry);
                }
                shared.emit(
                    "sent",
                    json!({"from": entry.from, "to": entry.to, "text": entry.text, "sent_at": entry.time, "via": entry.via, "msg_id": entry.msg_id}),
                );
            }
            return to_response(r);
        }
    };
    to_response(command(shared, cmd).await)
}

/// How `status` names the supernode in use: the bootstrap entry's host as the user wrote
/// it while that is the one, else the address of the fleet's supernode.
fn supernode_name(
    bootstrap: &str,
    bootstrap_addr: std::net::SocketAddr,
    current: std::net::SocketAddr,
) -> String {
    if current == bootstrap_addr {
        bootstrap.to_string()
    } else {
        current.to_string()
    }
}

/// What a call placed or answered from an app plays: the sound card where the build has
/// one, silence otherwise; nothing recorded.
fn app_plan() -> MediaPlan {
    MediaPlan {
        devices: true,
        ..MediaPlan::default()
    }
}

/// Rings `callee`, runs the call with `plan` and answers with its report.
async fn place_call(shared: &Shared, callee: Username, plan: MediaPlan) -> ControlResponse {
    // The plan is in place before the call rings: a callee may answer before the
    // ringing confirmation reaches us.
    let report = shared.calls.plan_outgoing(callee.as_str(), plan);
    match command(
        shared,
        Command::CallStart {
            user: callee.clone(),
        },
    )
    .await
    {
        CommandResult::Call { .. } => {}
        other => {
            shared.calls.cancel_outgoing(callee.as_str());
            return to_response(other);
        }
    }
    match report.await {
        Ok(r) => ControlResponse::ok(serde_json::to_value(&r).unwrap_or_default()),
        Err(_) => ControlResponse::err("the agent stopped during the call"),
    }
}

/// Waits up to `wait` for a call to ring, answers it, and reports how it went.
async fn wait_for_call(
    shared: &Shared,
    accept: bool,
    plan: MediaPlan,
    wait: Duration,
) -> ControlResponse {
    let mut states = shared.calls.subscribe();
    let ringing = match shared.calls.ringing() {
        Some(c) => c,
        None => {
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                match tokio::time::timeout_at(deadline, states.recv()).await {
                    Ok(Ok(c)) if c.state == peerline_core::call::CallState::Incoming => break c,
                    Ok(Ok(_)) | Ok(Err(tokio::sync::broadcast::error::RecvError::Lagged(_))) => {
                        continue
                    }
                    Ok(Err(_)) => return ControlResponse::err("the agent is shutting down"),
                    Err(_) => {
                        return ControlResponse::err(format!(
                            "no call came in within {} s",
                            wait.as_secs()
                        ))
                    }
                }
            }
        }
    };
    let call_id = ringing.call_id;
    if !accept {
        let r = command(
            shared,
            Command::CallAnswer {
                call_id,
                accept: false,
            },
        )
        .await;
        return match r {
            CommandResult::Ok => ControlResponse::ok(json!({
                "call_id": call_id,
                "peer": ringing.peer.as_str(),
                "state": "ended",
                "end_reason": "declined",
            })),
            other => to_response(other),
        };
    }
    let report = shared.calls.plan(call_id, plan);
    match command(
        shared,
        Command::CallAnswer {
            call_id,
            accept: true,
        },
    )
    .await
    {
        CommandResult::Ok => {}
        other => return to_response(other),
    }
    match report.await {
        Ok(r) => ControlResponse::ok(serde_json::to_value(&r).unwrap_or_default()),
        Err(_) => ControlResponse::err("the agent stopped during the call"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_names_the_bootstrap_host_or_the_fleet_supernode_in_use() {
        let boot: std::net::SocketAddr = "192.0.2.1:7000".parse().unwrap();
        let other: std::net::SocketAddr = "192.0.2.2:7000".parse().unwrap();
        assert_eq!(
            supernode_name("chat.example.org:7000", boot, boot),
            "chat.example.org:7000"
        );
        assert_eq!(
            supernode_name("chat.example.org:7000", boot, other),
            "192.0.2.2:7000"
        );
    }
}
