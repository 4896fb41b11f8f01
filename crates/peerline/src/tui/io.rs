//! The link between the app and the agent: background tasks that talk to the control
//! socket, follow the event stream, read the history, and report [`AgentEvent`]s on a
//! channel. Nothing here runs on the UI's thread, so the screen never waits on the network.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::app::{
    AgentEvent, CallEvent, CallPath, CallPhase, CallStats, CallUpdate, ContactState, Effect,
    MessageRecord, Presence, Status,
};
use crate::history::History;
use crate::profile::Profile;

/// How long one control request may take (a send waits for delivery or the mailbox).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long to wait for a freshly started agent's socket.
const START_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the status is refreshed (the event stream carries the rest).
const STATUS_EVERY: Duration = Duration::from_secs(3);
/// Messages loaded when a conversation opens.
const HISTORY_LOAD: usize = 500;
/// The longest event line read from the agent.
const MAX_EVENT_LINE: usize = 64 * 1024;

/// Sends one request to the agent and returns its data or its one-line error.
async fn call(socket: &PathBuf, req: Value) -> Result<Value, String> {
    let fut = async {
        let mut s = UnixStream::connect(socket)
            .await
            .map_err(|_| "the agent is not running".to_string())?;
        let mut line = req.to_string();
        line.push('\n');
        s.write_all(line.as_bytes())
            .await
            .map_err(|e| format!("lost contact with the agent: {e}"))?;
        let mut answer = String::new();
        BufReader::new(s.take(1 << 20))
            .read_line(&mut answer)
            .await
            .map_err(|e| format!("lost contact with the agent: {e}"))?;
        let v: Value = serde_json::from_str(&answer)
            .map_err(|_| "the agent sent a malformed answer".to_string())?;
        if v["ok"] == json!(true) {
            Ok(v["data"].clone())
        } else {
            Err(v["error"].as_str().unwrap_or("failed").to_string())
        }
    };
    tokio::time::timeout(CALL_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| Err("the agent did not answer in time".into()))
}

fn s(v: &Value, k: &str) -> String {
    v[k].as_str().unwrap_or_default().to_string()
}

/// Parses the agent's `status` data.
pub fn parse_status(v: &Value) -> Status {
    Status {
        online: v["online"] == json!(true),
        user: s(v, "user"),
        supernode: s(v, "supernode"),
        presence: s(v, "presence"),
        relay_only: v["relay_only"] == json!(true),
        reason: v["reason"].as_str().map(str::to_string),
        audio: s(v, "audio"),
        call_policy: s(v, "call_policy"),
    }
}

/// Parses a `call` event (a CallInfo); None when it names no call.
fn parse_call(v: &Value) -> Option<CallUpdate> {
    let peer = super::app::sanitize(&s(v, "peer")).replace('\n', " ");
    if peer.is_empty() {
        return None;
    }
    Some(CallUpdate {
        call_id: v["call_id"].as_u64()?,
        peer,
        outgoing: v["direction"] == json!("outgoing"),
        phase: CallPhase::parse(v["state"].as_str()?)?,
        path: v["via"].as_str().and_then(CallPath::parse),
        end_reason: v["end_reason"].as_str().map(str::to_string),
    })
}

/// A number from the agent, or 0; never NaN or infinite.
fn num(v: &Value, k: &str) -> f64 {
    v[k].as_f64().filter(|x| x.is_finite()).unwrap_or(0.0)
}

/// Parses a `call_stats` event (the media engine's statistics).
fn parse_call_stats(v: &Value) -> Option<(u64, CallStats)> {
    let stats = CallStats {
        rtt_ms: v["rtt_ms"].as_f64().filter(|x| x.is_finite()),
        loss_pct: (100.0 * num(v, "loss_before_recovery")).clamp(0.0, 100.0),
        residual_loss_pct: (100.0 * num(v, "loss_after_recovery")).clamp(0.0, 100.0),
        jitter_ms: num(v, "jitter_ms"),
        send_kbps: num(v, "send_kbps"),
        level_in: num(v, "input_level"),
        level_out: num(v, "output_level"),
        audio_source: s(v, "audio_source"),
    };
    Some((v["call_id"].as_u64()?, stats))
}

fn parse_contacts(v: &Value) -> Vec<(String, ContactState, Presence)> {
    v.as_array()
        .into_iter()
        .flatten()
        .map(|c| {
            (
                s(c, "user"),
                ContactState::parse(c["state"].as_str().unwrap_or("")),
                Presence::parse(c["presence"].as_str().unwrap_or("")),
            )
        })
        .filter(|(u, _, _)| !u.is_empty())
        .collect()
}

fn record(v: &Value) -> MessageRecord {
    MessageRecord {
        from: s(v, "from"),
        to: s(v, "to"),
        text: s(v, "text"),
        time: v["sent_at"].as_u64().unwrap_or(0),
        via: s(v, "via"),
        msg_id: v["msg_id"].as_u64().unwrap_or(0),
    }
}

/// Turns one line of the agent's event stream into an app event (None: not for the app).
pub fn parse_event(line: &str) -> Option<AgentEvent> {
    let v: Value = serde_json::from_str(line).ok()?;
    Some(match v["type"].as_str()? {
        "message" => AgentEvent::Received(record(&v)),
        "sent" => AgentEvent::Sent(record(&v)),
        "presence" => AgentEvent::Presence {
            user: s(&v, "user"),
            presence: Presence::parse(v["presence"].as_str().unwrap_or("")),
        },
        "contact" => AgentEvent::Contact {
            user: s(&v, "user"),
            state: ContactState::parse(v["state"].as_str().unwrap_or("")),
            note: s(&v, "note"),
        },
        "online" => AgentEvent::Online,
        "offline" => AgentEvent::Offline {
            reason: s(&v, "reason"),
        },
        "lagged" => AgentEvent::Lagged,
        "call" => AgentEvent::Call(CallEvent::Update(parse_call(&v)?)),
        "call_stats" => {
            let (call_id, stats) = parse_call_stats(&v)?;
            AgentEvent::Call(CallEvent::Stats { call_id, stats })
        }
        _ => return None,
    })
}

/// The agent link: cheap to clone, each effect runs on its own task.
#[derive(Clone)]
pub struct Link {
    profile: Profile,
    tx: mpsc::Sender<AgentEvent>,
}

impl Link {
    /// A link for `profile` reporting on `tx`.
    pub fn new(profile: Profile, tx: mpsc::Sender<AgentEvent>) -> Self {
        Link { profile, tx }
    }

    async fn report(&self, ev: AgentEvent) {
        // The app has quit when nobody receives: nothing left to do.
        let _ = self.tx.send(ev).await;
    }

    fn socket(&self) -> PathBuf {
        self.profile.socket_path()
    }

    /// Keeps the app attached to a running agent for as long as the app runs: starts the
    /// agent when none is running, follows its events, and starts over when it goes away.
    pub async fn supervise(self) {
        loop {
            self.report(AgentEvent::Starting).await;
            if let Err(e) = self.ensure_agent().await {
                self.report(AgentEvent::Lost { reason: e }).await;
                tokio::time::sleep(Duration::from_secs(2)).await;
                continue;
            }
            let reason = self.follow().await;
            if self.tx.is_closed() {
                return;
            }
            self.report(AgentEvent::Lost { reason }).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    /// Makes sure an agent serves this profile, starting one in the background if needed.
    async fn ensure_agent(&self) -> Result<(), String> {
        if UnixStream::connect(self.socket()).await.is_ok() {
            return Ok(());
        }
        let mut child = crate::agent::spawn_agent(&self.profile)?;
        let start = tokio::time::Instant::now();
        loop {
            if UnixStream::connect(self.socket()).await.is_ok() {
                // Reap it in the background when it exits; it runs on after the app.
                std::thread::spawn(move || child.wait());
                return Ok(());
            }
            if let Ok(Some(status)) = child.try_wait() {
                return Err(format!(
                    "the agent exited ({status}); see {}",
                    self.profile.log_path().display()
                ));
            }
            if start.elapsed() > START_TIMEOUT {
                return Err("the agent did not start in 15 s".into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Follows the agent's event stream until it ends; returns why it ended.
    async fn follow(&self) -> String {
        // Subscribe before taking the snapshot, so no event falls between the two.
        let mut stream = match UnixStream::connect(self.socket()).await {
            Ok(s) => s,
            Err(e) => return format!("cannot reach the agent: {e}"),
        };
        if let Err(e) = stream.write_all(b"{\"op\":\"events\"}\n").await {
            return format!("lost contact with the agent: {e}");
        }
        self.report(AgentEvent::Attached).await;
        let me = self.refresh_status().await;
        // Like `peerline up` on a running agent: connect now, taking the account back if
        // another device signed in meanwhile.
        if let Ok(v) = call(&self.socket(), json!({"op": "status"})).await {
            if v["online"] != json!(true) {
                let _ = call(&self.socket(), json!({"op": "connect"})).await;
            }
        }
        self.refresh_contacts(me.as_deref()).await;
        // A call may be under way already (the app restarted, or the agent did).
        if let Ok(v) = call(&self.socket(), json!({"op": "calls_list"})).await {
            for c in v.as_array().into_iter().flatten() {
                if let Some(u) = parse_call(c) {
                    self.report(AgentEvent::Call(CallEvent::Update(u))).await;
                }
            }
        }
        let mut lines = BufReader::new(stream);
        // Status polling runs beside the stream; it ends with it.
        let poller = tokio::spawn(self.clone().poll_status());
        let mut buf = Vec::new();
        let why = loop {
            match read_bounded_line(&mut lines, &mut buf).await {
                Ok(0) => break "the agent stopped".to_string(),
                Ok(_) => {}
                Err(e) => break format!("lost contact with the agent: {e}"),
            }
            let line = String::from_utf8_lossy(&buf).to_string();
            let Some(ev) = parse_event(&line) else {
                continue;
            };
            let refresh = matches!(
                ev,
                AgentEvent::Contact { .. } | AgentEvent::Online | AgentEvent::Lagged
            );
            self.report(ev).await;
            if refresh {
                self.refresh_contacts(me.as_deref()).await;
            }
            if self.tx.is_closed() {
                break "the app quit".to_string();
            }
        };
        poller.abort();
        why
    }

    async fn poll_status(self) {
        loop {
            tokio::time::sleep(STATUS_EVERY).await;
            self.refresh_status().await;
        }
    }

    async fn refresh_status(&self) -> Option<String> {
        match call(&self.socket(), json!({"op": "status"})).await {
            Ok(v) => {
                let st = parse_status(&v);
                let me = (!st.user.is_empty()).then(|| st.user.clone());
                self.report(AgentEvent::Status(st)).await;
                me
            }
            Err(_) => None,
        }
    }

    async fn refresh_contacts(&self, me: Option<&str>) {
        if let Ok(v) = call(&self.socket(), json!({"op": "contact_list"})).await {
            self.report(AgentEvent::Contacts(parse_contacts(&v))).await;
        }
        if let Some(me) = me {
            self.refresh_summaries(me.to_string()).await;
        }
    }

    async fn refresh_summaries(&self, me: String) {
        let path = self.profile.history_path();
        let r = tokio::task::spawn_blocking(move || {
            History::open(&path).and_then(|h| h.summaries(&me))
        })
        .await;
        if let Ok(Ok(list)) = r {
            self.report(AgentEvent::Summaries(
                list.into_iter()
                    .map(|s| (s.peer, s.last_time, s.unread))
                    .collect(),
            ))
            .await;
        }
    }

    /// Carries out one effect (on its own task: a slow send delays nothing else).
    pub async fn run(self, effect: Effect) {
        let sock = self.socket();
        match effect {
            Effect::Quit => {}
            Effect::Send { local_id, to, text } => {
                let r = call(&sock, json!({"op": "msg_send", "to": to, "text": text})).await;
                let result = r.map(|v| {
                    (
                        s(&v, "via"),
                        v["msg_id"].as_u64().unwrap_or(0),
                        v["time"].as_u64().unwrap_or(0),
                    )
                });
                self.report(AgentEvent::SendResult { local_id, result })
                    .await;
            }
            Effect::LoadHistory(peer) => {
                let path = self.profile.history_path();
                let p = peer.clone();
                let r = tokio::task::spawn_blocking(move || {
                    History::open(&path).and_then(|h| h.recent(&p, HISTORY_LOAD))
                })
                .await;
                match r {
                    Ok(Ok(entries)) => {
                        let messages = entries
                            .into_iter()
                            .map(|e| MessageRecord {
                                from: e.from,
                                to: e.to,
                                text: e.text,
                                time: e.time,
                                via: e.via,
                                msg_id: e.msg_id,
                            })
                            .collect();
                        self.report(AgentEvent::History { peer, messages }).await;
                    }
                    _ => {
                        self.report(AgentEvent::Failed("cannot read the message history".into()))
                            .await
                    }
                }
            }
            Effect::MarkRead(peer) => {
                let path = self.profile.history_path();
                let _ = tokio::task::spawn_blocking(move || {
                    History::open(&path).and_then(|h| h.mark_read(&peer))
                })
                .await;
            }
            Effect::ContactAdd(user) => {
                let r = call(
                    &sock,
                    json!({"op": "contact_add", "user": user, "note": ""}),
                )
                .await;
                self.done(r, format!("contact request sent to {user}"))
                    .await;
                self.refresh_contacts(None).await;
            }
            Effect::ContactReply { user, action } => {
                let r = call(
                    &sock,
                    json!({"op": "contact_reply", "user": user, "action": action}),
                )
                .await;
                let what = match action {
                    "accept" => format!("{user} is now a contact"),
                    "decline" => format!("declined {user}"),
                    _ => format!("blocked {user}"),
                };
                self.done(r, what).await;
                self.refresh_contacts(None).await;
            }
            Effect::ContactRemove(user) => {
                let r = call(&sock, json!({"op": "contact_remove", "user": user})).await;
                self.done(r, format!("removed {user}")).await;
                self.refresh_contacts(None).await;
            }
            Effect::SetPresence(p) => {
                let r = call(&sock, json!({"op": "presence", "presence": p})).await;
                self.done(r, format!("you are {p}")).await;
                self.refresh_status().await;
            }
            Effect::Search(prefix) => {
                match call(&sock, json!({"op": "search", "prefix": prefix})).await {
                    Ok(v) => {
                        let users = v
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|u| u.as_str().map(str::to_string))
                            .collect();
                        self.report(AgentEvent::SearchResults {
                            query: prefix,
                            users,
                        })
                        .await;
                    }
                    Err(e) => self.report(AgentEvent::Failed(e)).await,
                }
            }
            Effect::SetRelayOnly(on) => match self.profile.save_relay_only(on) {
                Ok(()) => {
                    self.report(AgentEvent::RelayOnly(on)).await;
                    self.report(AgentEvent::Done(format!(
                        "relay-only mode {}: applies when the agent restarts (peerline down)",
                        if on { "on" } else { "off" }
                    )))
                    .await;
                }
                Err(e) => self.report(AgentEvent::Failed(e.to_string())).await,
            },
            Effect::Login {
                user,
                server,
                password,
                register,
            } => {
                let r = login(&self.profile, &user, &server, password, register).await;
                self.report(AgentEvent::LoginResult(r)).await;
            }
            Effect::SetCallPolicy(from) => {
                let r = call(&sock, json!({"op": "call_policy", "from": from})).await;
                if r.is_ok() {
                    self.report(AgentEvent::CallPolicy(from.to_string())).await;
                }
                let what = if from == "anyone" {
                    "anyone may call you now"
                } else {
                    "only your contacts may call you now"
                };
                self.done(r, what.to_string()).await;
            }
            Effect::CallStart(peer) => {
                // Answers once the call rings (or cannot); its progress comes as events.
                let r = call(&sock, json!({"op": "call_start", "user": peer})).await;
                let result = r.and_then(|v| {
                    v["call_id"]
                        .as_u64()
                        .ok_or_else(|| "the agent sent a malformed answer".to_string())
                });
                self.report(AgentEvent::Call(CallEvent::Placed { peer, result }))
                    .await;
            }
            Effect::CallAccept(call_id) | Effect::CallDecline(call_id) => {
                let accept = matches!(effect, Effect::CallAccept(_));
                let r = call(
                    &sock,
                    json!({"op": "call_answer", "call_id": call_id, "accept": accept}),
                )
                .await;
                if let Err(e) = r {
                    self.report(AgentEvent::Failed(format!("cannot answer: {e}")))
                        .await;
                }
            }
            Effect::CallHangup(call_id) => {
                let r = call(&sock, json!({"op": "call_hang_up", "call_id": call_id})).await;
                if let Err(e) = r {
                    self.report(AgentEvent::Failed(format!("cannot hang up: {e}")))
                        .await;
                }
            }
        }
    }

    async fn done(&self, r: Result<Value, String>, ok: String) {
        self.report(match r {
            Ok(_) => AgentEvent::Done(ok),
            Err(e) => AgentEvent::Failed(e),
        })
        .await;
    }
}

/// Reads one line of at most [`MAX_EVENT_LINE`] bytes into `buf` (without the newline);
/// a longer line is skipped whole. Returns 0 at the end of the stream.
async fn read_bounded_line(
    r: &mut BufReader<UnixStream>,
    buf: &mut Vec<u8>,
) -> std::io::Result<usize> {
    buf.clear();
    let mut total = 0;
    loop {
        let chunk = r.fill_buf().await?;
        if chunk.is_empty() {
            return Ok(total);
        }
        let (take, done) = match chunk.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if buf.len() < MAX_EVENT_LINE {
            let room = MAX_EVENT_LINE - buf.len();
            buf.extend_from_slice(&chunk[..take.min(room)]);
        }
        total += take;
        r.consume(take);
        if done {
            if buf.last() == Some(&b'\n') {
                buf.pop();
            }
            if total > MAX_EVENT_LINE {
                // Too long to be an event: drop it.
                buf.clear();
            }
            return Ok(total);
        }
    }
}

async fn login(
    profile: &Profile,
    user: &str,
    server: &str,
    password: String,
    register: bool,
) -> Result<String, String> {
    let username = peerline_wire::Username::parse(user).map_err(|e| e.to_string())?;
    let b = peerline_net::bootstrap::Bootstrap::parse(server).map_err(|e| e.to_string())?;
    crate::cli::enrol_with(profile, username.clone(), b, Some(password), register)
        .await
        .map_err(|e| format!("{e:#}"))?;
    Ok(username.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn events_parse_into_app_events() {
        let m = parse_event(
            r#"{"type":"message","from":"bob","to":"alice","text":"hi","sent_at":5,"via":"direct","msg_id":9,"time":6}"#,
        )
        .unwrap();
        assert_eq!(
            m,
            AgentEvent::Received(MessageRecord {
                from: "bob".into(),
                to: "alice".into(),
                text: "hi".into(),
                time: 5,
                via: "direct".into(),
                msg_id: 9
            })
        );
        assert_eq!(
            parse_event(r#"{"type":"presence","user":"bob","presence":"away"}"#),
            Some(AgentEvent::Presence {
                user: "bob".into(),
                presence: Presence::Away
            })
        );
        assert_eq!(
            parse_event(r#"{"type":"contact","user":"bob","state":"incoming","note":"hey"}"#),
            Some(AgentEvent::Contact {
                user: "bob".into(),
                state: ContactState::Incoming,
                note: "hey".into()
            })
        );
        // Unknown kinds and garbage are ignored, never a panic.
        assert_eq!(parse_event(r#"{"type":"future_thing"}"#), None);
        assert_eq!(parse_event("not json"), None);
        assert_eq!(parse_event(r#"{"type":5}"#), None);
        // Missing fields read as empty, not as a failure.
        assert!(matches!(
            parse_event(r#"{"type":"message"}"#),
            Some(AgentEvent::Received(_))
        ));
    }

    #[test]
    fn call_events_as_the_agent_writes_them_parse() {
        use peerline_core::call::{CallInfo, CallState, Direction};
        // The agent serialises the core's CallInfo: parse exactly that.
        let info = CallInfo {
            call_id: 42,
            peer: peerline_wire::Username::parse("bob").unwrap(),
            direction: Direction::Outgoing,
            state: CallState::Active,
            via: Some(peerline_core::client::Via::Direct),
            setup_ms: Some(120),
            end_reason: None,
        };
        let mut v = serde_json::to_value(&info).unwrap();
        v["type"] = json!("call");
        assert_eq!(
            parse_event(&v.to_string()),
            Some(AgentEvent::Call(CallEvent::Update(CallUpdate {
                call_id: 42,
                peer: "bob".into(),
                outgoing: true,
                phase: CallPhase::Active,
                path: Some(CallPath::Direct),
                end_reason: None,
            })))
        );
        // The media engine's statistics, with the fields the agent adds.
        let mut v = serde_json::to_value(peerline_media::CallStats {
            rtt_ms: Some(31.5),
            loss_before_recovery: 0.02,
            loss_after_recovery: 0.001,
            jitter_ms: 4.0,
            send_kbps: 27.0,
            ..Default::default()
        })
        .unwrap();
        for (k, x) in [
            ("type", json!("call_stats")),
            ("call_id", json!(42)),
            ("input_level", json!(0.25)),
            ("output_level", json!(0.5)),
            ("audio_source", json!("silence")),
        ] {
            v[k] = x;
        }
        let Some(AgentEvent::Call(CallEvent::Stats { call_id, stats })) =
            parse_event(&v.to_string())
        else {
            panic!("stats expected")
        };
        assert_eq!(call_id, 42);
        assert_eq!(stats.rtt_ms, Some(31.5));
        assert!((stats.loss_pct - 2.0).abs() < 1e-9);
        assert!((stats.residual_loss_pct - 0.1).abs() < 1e-9);
        assert_eq!((stats.jitter_ms, stats.send_kbps), (4.0, 27.0));
        assert_eq!((stats.level_in, stats.level_out), (0.25, 0.5));
        assert_eq!(stats.audio_source, "silence");
        // A call event without an id or a known state is not a call.
        assert_eq!(
            parse_event(r#"{"type":"call","peer":"bob","state":"active"}"#),
            None
        );
        assert_eq!(
            parse_event(r#"{"type":"call","call_id":1,"peer":"bob","state":"dancing"}"#),
            None
        );
        assert_eq!(parse_event(r#"{"type":"call_stats"}"#), None);
    }

    #[test]
    fn status_reports_sound_support_and_call_policy() {
        let st = parse_status(
            &json!({"online": true, "user": "a", "audio": "none", "call_policy": "anyone"}),
        );
        assert_eq!(
            (st.audio.as_str(), st.call_policy.as_str()),
            ("none", "anyone")
        );
    }

    #[test]
    fn contact_lists_skip_nameless_rows() {
        let v =
            json!([{"user": "bob", "state": "accepted", "presence": "busy"}, {"state": "x"}, 5]);
        assert_eq!(
            parse_contacts(&v),
            vec![("bob".to_string(), ContactState::Accepted, Presence::Busy)]
        );
    }

    #[tokio::test]
    async fn overlong_event_lines_are_dropped() {
        let (a, mut b) = UnixStream::pair().unwrap();
        let mut long = vec![b'x'; MAX_EVENT_LINE + 10];
        long.push(b'\n');
        b.write_all(&long).await.unwrap();
        b.write_all(b"{\"type\":\"online\"}\n").await.unwrap();
        drop(b);
        let mut r = BufReader::new(a);
        let mut buf = Vec::new();
        assert_eq!(
            read_bounded_line(&mut r, &mut buf).await.unwrap(),
            MAX_EVENT_LINE + 11
        );
        assert!(buf.is_empty());
        read_bounded_line(&mut r, &mut buf).await.unwrap();
        assert_eq!(buf, b"{\"type\":\"online\"}");
        assert_eq!(read_bounded_line(&mut r, &mut buf).await.unwrap(), 0);
    }
}
