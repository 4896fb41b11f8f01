//! Property tests of the terminal app: whatever the agent reports and whatever keys are
//! pressed, the model never panics, stays bounded and consistent, and every screen renders
//! at every size without a panic or a control character.
#![allow(clippy::unwrap_used)]

use peerline::tui::app::{
    AgentEvent, App, CallEvent, CallPath, CallPhase, CallStats, CallUpdate, ContactState, Event,
    MessageRecord, Presence, Status, MAX_LOADED_MESSAGES,
};
use peerline::tui::io::parse_event;
use peerline::tui::ui::render;
use proptest::prelude::*;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;

fn name() -> impl Strategy<Value = String> {
    prop::sample::select(vec!["alice", "bob", "carol", "dave", "x"]).prop_map(str::to_string)
}

fn state() -> impl Strategy<Value = ContactState> {
    prop::sample::select(vec![
        ContactState::Accepted,
        ContactState::Incoming,
        ContactState::Requested,
        ContactState::Blocked,
        ContactState::None,
    ])
}

fn presence() -> impl Strategy<Value = Presence> {
    prop::sample::select(
        Presence::CHOICES
            .to_vec()
            .into_iter()
            .chain([Presence::Offline])
            .collect::<Vec<_>>(),
    )
}

fn record() -> impl Strategy<Value = MessageRecord> {
    (
        name(),
        name(),
        any::<String>(),
        any::<u64>(),
        "[a-z]{0,8}",
        0u64..20,
    )
        .prop_map(|(from, to, text, time, via, msg_id)| MessageRecord {
            from,
            to,
            text,
            time,
            via,
            msg_id,
        })
}

fn key() -> impl Strategy<Value = Event> {
    let code = prop_oneof![
        any::<char>().prop_map(KeyCode::Char),
        prop::sample::select(vec![
            KeyCode::Enter,
            KeyCode::Tab,
            KeyCode::BackTab,
            KeyCode::Esc,
            KeyCode::Up,
            KeyCode::Down,
            KeyCode::Left,
            KeyCode::Right,
            KeyCode::PageUp,
            KeyCode::PageDown,
            KeyCode::Home,
            KeyCode::End,
            KeyCode::Backspace,
            KeyCode::Delete,
            KeyCode::Char('q'),
            KeyCode::Char('?'),
            KeyCode::Char('/'),
            KeyCode::Char('p'),
            KeyCode::Char('s'),
            KeyCode::Char('a'),
            KeyCode::Char('x'),
            KeyCode::Char('c'),
            KeyCode::Char('h'),
            KeyCode::Char('d'),
        ]),
    ];
    let mods = prop::sample::select(vec![
        KeyModifiers::NONE,
        KeyModifiers::SHIFT,
        KeyModifiers::ALT,
    ]);
    (code, mods).prop_map(|(c, m)| Event::Key(KeyEvent::new(c, m)))
}

fn stats() -> impl Strategy<Value = CallStats> {
    (
        prop::option::of(any::<f64>()),
        any::<f64>(),
        any::<f64>(),
        any::<f64>(),
        any::<f64>(),
        prop::sample::select(vec!["devices", "file", "silence", ""]),
    )
        .prop_map(|(rtt_ms, loss, jitter, li, lo, src)| CallStats {
            rtt_ms,
            loss_pct: loss,
            residual_loss_pct: loss / 3.0,
            jitter_ms: jitter,
            send_kbps: jitter * 2.0,
            level_in: li,
            level_out: lo,
            audio_source: src.into(),
        })
}

fn phase() -> impl Strategy<Value = CallPhase> {
    prop::sample::select(vec![
        CallPhase::Ringing,
        CallPhase::Incoming,
        CallPhase::Connecting,
        CallPhase::Active,
        CallPhase::Ended,
    ])
}

fn call_update() -> impl Strategy<Value = CallUpdate> {
    (
        0u64..4,
        name(),
        any::<bool>(),
        phase(),
        any::<bool>(),
        prop::option::of(any::<String>()),
    )
        .prop_map(
            |(call_id, peer, outgoing, phase, direct, end_reason)| CallUpdate {
                call_id,
                peer,
                outgoing,
                phase,
                path: Some(if direct {
                    CallPath::Direct
                } else {
                    CallPath::Relay
                }),
                end_reason,
            },
        )
}

fn agent_event() -> impl Strategy<Value = AgentEvent> {
    prop_oneof![
        Just(AgentEvent::Attached),
        any::<String>().prop_map(|reason| AgentEvent::Lost { reason }),
        (any::<bool>(), name(), any::<String>(), any::<bool>()).prop_map(
            |(online, user, presence, relay_only)| AgentEvent::Status(Status {
                online,
                user,
                supernode: "s".into(),
                presence,
                relay_only,
                reason: None,
                audio: if relay_only { "none" } else { "devices" }.into(),
                call_policy: if online { "anyone" } else { "contacts" }.into(),
            })
        ),
        prop::collection::vec((name(), state(), presence()), 0..6).prop_map(AgentEvent::Contacts),
        prop::collection::vec((name(), any::<u64>(), any::<u64>()), 0..6)
            .prop_map(AgentEvent::Summaries),
        (name(), prop::collection::vec(record(), 0..30))
            .prop_map(|(peer, messages)| AgentEvent::History { peer, messages }),
        record().prop_map(AgentEvent::Received),
        record().prop_map(AgentEvent::Sent),
        (0u64..5, any::<bool>(), "[a-z]{0,8}", any::<String>()).prop_map(
            |(local_id, ok, via, err)| AgentEvent::SendResult {
                local_id,
                result: if ok { Ok((via, 1, 2)) } else { Err(err) },
            }
        ),
        (name(), presence()).prop_map(|(user, presence)| AgentEvent::Presence { user, presence }),
        (name(), state(), any::<String>()).prop_map(|(user, state, note)| AgentEvent::Contact {
            user,
            state,
            note
        }),
        Just(AgentEvent::Online),
        any::<String>().prop_map(|reason| AgentEvent::Offline { reason }),
        ("[a-z]{0,3}", prop::collection::vec(name(), 0..25))
            .prop_map(|(query, users)| AgentEvent::SearchResults { query, users }),
        any::<String>().prop_map(AgentEvent::Done),
        any::<String>().prop_map(AgentEvent::Failed),
        any::<bool>().prop_map(AgentEvent::RelayOnly),
        Just(AgentEvent::Lagged),
        call_update().prop_map(|u| AgentEvent::Call(CallEvent::Update(u))),
        (0u64..4, stats())
            .prop_map(|(call_id, stats)| AgentEvent::Call(CallEvent::Stats { call_id, stats })),
        (name(), any::<bool>(), 0u64..4, any::<String>()).prop_map(|(peer, ok, id, e)| {
            AgentEvent::Call(CallEvent::Placed {
                peer,
                result: if ok { Ok(id) } else { Err(e) },
            })
        }),
        prop::sample::select(vec!["anyone", "contacts", "?"])
            .prop_map(|p| AgentEvent::CallPolicy(p.into())),
    ]
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => key(),
        3 => agent_event().prop_map(Event::Agent),
        1 => any::<u64>().prop_map(Event::Tick),
        1 => (0u16..300, 0u16..100).prop_map(|(w, h)| Event::Resize(w, h)),
    ]
}

fn draw(app: &App, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| render(app, f)).unwrap();
    t.backend()
        .buffer()
        .content()
        .iter()
        .map(|c| c.symbol())
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    #[test]
    fn any_events_keep_the_model_sound_and_every_screen_renders(
        registered in any::<bool>(),
        events in prop::collection::vec(event(), 0..60),
        w in 1u16..180,
        h in 1u16..60,
    ) {
        let mut app = App::new(0, registered, None);
        for ev in events {
            app.update(ev);
            for conv in app.conversations.values() {
                prop_assert!(conv.len() <= MAX_LOADED_MESSAGES);
                // Text from others reaches the screen without terminal controls.
                for m in conv {
                    prop_assert!(!m.text.chars().any(|c| c.is_control() && c != '\n'));
                }
            }
            // An effect about a call names the call the model holds (or held a moment ago).
            if let Some(id) = app.call.id() {
                prop_assert!(id < 4);
            }
            if let Some(sel) = &app.selected {
                let rows = app.rows();
                prop_assert!(rows.is_empty() || rows.iter().any(|c| &c.name == sel));
            }
        }
        let screen = draw(&app, w, h);
        prop_assert!(!screen.chars().any(|c| c.is_control()));
    }

    #[test]
    fn any_line_from_the_agent_parses_or_is_ignored(line in any::<String>()) {
        let _ = parse_event(&line);
    }

    #[test]
    fn any_json_event_shape_parses_or_is_ignored(
        kind in prop::sample::select(vec!["message", "sent", "presence", "contact", "online", "offline", "lagged", "other"]),
        fields in prop::collection::vec(
            (
                prop::sample::select(vec!["from", "to", "text", "sent_at", "via", "msg_id", "user", "state", "presence", "note", "reason"]),
                prop_oneof![
                    any::<String>().prop_map(serde_json::Value::from),
                    any::<u64>().prop_map(serde_json::Value::from),
                    any::<i64>().prop_map(serde_json::Value::from),
                    any::<bool>().prop_map(serde_json::Value::from),
                    Just(serde_json::Value::Null),
                ],
            ),
            0..8,
        ),
    ) {
        let mut obj = serde_json::Map::new();
        obj.insert("type".into(), kind.into());
        for (k, v) in fields {
            obj.insert(k.into(), v);
        }
        let line = serde_json::Value::Object(obj).to_string();
        let parsed = parse_event(&line);
        prop_assert_eq!(parsed.is_some(), kind != "other");
    }

    #[test]
    fn any_json_call_shape_parses_or_is_ignored(
        kind in prop::sample::select(vec!["call", "call_stats"]),
        fields in prop::collection::vec(
            (
                prop::sample::select(vec!["call_id", "peer", "direction", "state", "via", "end_reason", "rtt_ms", "loss_before_recovery", "jitter_ms", "send_kbps", "input_level", "output_level", "audio_source"]),
                prop_oneof![
                    any::<String>().prop_map(serde_json::Value::from),
                    prop::sample::select(vec!["ringing", "incoming", "connecting", "active", "ended", "direct", "relay", "outgoing"]).prop_map(serde_json::Value::from),
                    any::<u64>().prop_map(serde_json::Value::from),
                    any::<f64>().prop_map(serde_json::Value::from),
                    any::<bool>().prop_map(serde_json::Value::from),
                    Just(serde_json::Value::Null),
                ],
            ),
            0..10,
        ),
    ) {
        let mut obj = serde_json::Map::new();
        obj.insert("type".into(), kind.into());
        for (k, v) in fields {
            obj.insert(k.into(), v);
        }
        let line = serde_json::Value::Object(obj).to_string();
        match parse_event(&line) {
            None => {}
            Some(AgentEvent::Call(CallEvent::Stats { stats, .. })) => {
                // Figures reach the model finite, whatever the agent wrote.
                prop_assert!(stats.jitter_ms.is_finite() && stats.loss_pct.is_finite());
                prop_assert!(stats.rtt_ms.is_none_or(f64::is_finite));
            }
            Some(AgentEvent::Call(CallEvent::Update(u))) => {
                prop_assert!(!u.peer.is_empty() && !u.peer.chars().any(char::is_control));
            }
            Some(other) => prop_assert!(false, "not a call event: {:?}", other),
        }
    }
}
