//! Snapshots of the terminal app's screens at fixed sizes, rendered from scripted states
//! (agent events and keys fed to the model; no agent, no terminal).
#![allow(clippy::unwrap_used)]

use peerline::tui::app::{
    AgentEvent, App, CallEvent, ContactState, Effect, Event, MessageRecord, Presence, Status,
};
use peerline::tui::io::parse_event;
use peerline::tui::ui::render;
use peerline_core::call::{CallInfo, CallState, Direction};
use peerline_core::client::Via;
use ratatui::backend::TestBackend;
use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyModifiers};
use ratatui::Terminal;

/// 2026-11-23 23:20:25 UTC.
const NOW: u64 = 1_795_476_025_000;
const MIN: u64 = 60_000;

fn screen(app: &App, w: u16, h: u16) -> String {
    let mut t = Terminal::new(TestBackend::new(w, h)).unwrap();
    t.draw(|f| render(app, f)).unwrap();
    t.backend().to_string()
}

fn agent(app: &mut App, ev: AgentEvent) {
    app.update(Event::Agent(ev));
}

fn key(app: &mut App, c: KeyCode) {
    app.update(Event::Key(KeyEvent::new(c, KeyModifiers::NONE)));
}

fn typed(app: &mut App, s: &str) {
    for ch in s.chars() {
        key(app, KeyCode::Char(ch));
    }
}

fn msg(from: &str, to: &str, text: &str, via: &str, ago_min: u64, id: u64) -> MessageRecord {
    MessageRecord {
        from: from.into(),
        to: to.into(),
        text: text.into(),
        time: NOW - ago_min * MIN,
        via: via.into(),
        msg_id: id,
    }
}

/// Alice online with contacts in every state.
fn alice() -> App {
    let mut app = App::new(NOW, true, None);
    app.update(Event::Tick(NOW));
    agent(&mut app, AgentEvent::Attached);
    agent(
        &mut app,
        AgentEvent::Status(Status {
            online: true,
            user: "alice".into(),
            supernode: "chat.example.org:7000".into(),
            presence: "online".into(),
            relay_only: false,
            reason: None,
            audio: "none".into(),
            call_policy: "contacts".into(),
        }),
    );
    agent(
        &mut app,
        AgentEvent::Contacts(vec![
            ("bob".into(), ContactState::Accepted, Presence::Online),
            ("carol".into(), ContactState::Accepted, Presence::Away),
            ("frank".into(), ContactState::Accepted, Presence::Busy),
            ("grace".into(), ContactState::Accepted, Presence::Offline),
            ("erin".into(), ContactState::Requested, Presence::Offline),
            ("mallory".into(), ContactState::Blocked, Presence::Offline),
        ]),
    );
    agent(
        &mut app,
        AgentEvent::Contact {
            user: "dave".into(),
            state: ContactState::Incoming,
            note: "we met at the meetup".into(),
        },
    );
    agent(
        &mut app,
        AgentEvent::Summaries(vec![
            ("bob".into(), NOW - 3 * MIN, 0),
            ("carol".into(), NOW - 40 * MIN, 2),
            ("grace".into(), NOW - 3 * 86_400_000, 0),
        ]),
    );
    // Notices from the scripted events are not part of these screens.
    app.notice = None;
    app
}

/// Alice reading her conversation with bob, one message of each delivery state.
fn conversation() -> App {
    let mut app = alice();
    app.selected = Some("bob".into());
    key(&mut app, KeyCode::Enter);
    agent(
        &mut app,
        AgentEvent::History {
            peer: "bob".into(),
            messages: vec![
                msg(
                    "bob",
                    "alice",
                    "left you a note while you were out",
                    "offline",
                    24 * 60,
                    1,
                ),
                msg(
                    "alice",
                    "bob",
                    "thanks! are you around later?",
                    "direct",
                    12,
                    1,
                ),
                msg("bob", "alice", "yes, from 8 pm", "direct", 11, 2),
                msg(
                    "alice",
                    "bob",
                    "sent while you were offline",
                    "offline",
                    9,
                    2,
                ),
                msg("alice", "bob", "via the relay", "relay", 5, 3),
                msg(
                    "bob",
                    "alice",
                    "a longer message that has to wrap over more than one line in the pane, \
                     to show how continuation lines are indented under the text",
                    "direct",
                    3,
                    3,
                ),
            ],
        },
    );
    typed(&mut app, "see you then");
    key(&mut app, KeyCode::Enter);
    typed(&mut app, "one more thi");
    app
}

#[test]
fn main_screen_with_a_conversation_100x30() {
    insta::assert_snapshot!(screen(&conversation(), 100, 30));
}

#[test]
fn main_screen_at_the_minimum_size_60x16() {
    insta::assert_snapshot!(screen(&conversation(), 60, 16));
}

#[test]
fn a_failed_send_and_the_contacts_pane_focused_80x24() {
    let mut app = conversation();
    agent(
        &mut app,
        AgentEvent::SendResult {
            local_id: 1,
            result: Err("bob is not your contact".into()),
        },
    );
    key(&mut app, KeyCode::Esc);
    insta::assert_snapshot!(screen(&app, 80, 24));
}

#[test]
fn first_start_without_contacts_80x24() {
    let mut app = App::new(NOW, true, None);
    agent(&mut app, AgentEvent::Attached);
    agent(
        &mut app,
        AgentEvent::Status(Status {
            online: true,
            user: "newbie".into(),
            supernode: "chat.example.org:7000".into(),
            presence: "online".into(),
            relay_only: false,
            reason: None,
            audio: "none".into(),
            call_policy: "contacts".into(),
        }),
    );
    insta::assert_snapshot!(screen(&app, 80, 24));
}

#[test]
fn too_small_40x10() {
    insta::assert_snapshot!(screen(&conversation(), 40, 10));
}

#[test]
fn too_small_even_at_1x1_does_not_panic() {
    for (w, h) in [(1, 1), (2, 1), (59, 40), (200, 15), (60, 1)] {
        screen(&conversation(), w, h);
    }
}

#[test]
fn help_overlay_80x24() {
    let mut app = alice();
    key(&mut app, KeyCode::Char('?'));
    insta::assert_snapshot!(screen(&app, 80, 24));
}

#[test]
fn search_results_80x24() {
    let mut app = alice();
    key(&mut app, KeyCode::Char('/'));
    typed(&mut app, "b");
    key(&mut app, KeyCode::Enter);
    agent(
        &mut app,
        AgentEvent::SearchResults {
            query: "b".into(),
            users: vec!["barbara".into(), "bob".into(), "bobby_t".into()],
        },
    );
    key(&mut app, KeyCode::Down);
    key(&mut app, KeyCode::Down);
    insta::assert_snapshot!(screen(&app, 80, 24));
}

#[test]
fn presence_selector_80x24() {
    let mut app = alice();
    key(&mut app, KeyCode::Char('p'));
    key(&mut app, KeyCode::Down);
    insta::assert_snapshot!(screen(&app, 80, 24));
}

#[test]
fn settings_80x24() {
    let mut app = alice();
    agent(&mut app, AgentEvent::RelayOnly(true));
    key(&mut app, KeyCode::Char('s'));
    insta::assert_snapshot!(screen(&app, 80, 24));
}

#[test]
fn supernode_lost_shows_in_the_status_bar_80x24() {
    let mut app = conversation();
    agent(
        &mut app,
        AgentEvent::Offline {
            reason: "supernode unreachable".into(),
        },
    );
    app.update(Event::Tick(NOW + 17_000));
    insta::assert_snapshot!(screen(&app, 80, 24));
}

#[test]
fn agent_restarting_80x24() {
    let mut app = alice();
    agent(
        &mut app,
        AgentEvent::Lost {
            reason: "the agent stopped".into(),
        },
    );
    insta::assert_snapshot!(screen(&app, 80, 24));
}

#[test]
fn login_form_80x24() {
    let mut app = App::new(NOW, false, Some("chat.example.org:7000#S2V5".into()));
    typed(&mut app, "alice");
    key(&mut app, KeyCode::Tab);
    key(&mut app, KeyCode::Tab);
    typed(&mut app, "secret words");
    key(&mut app, KeyCode::Tab);
    key(&mut app, KeyCode::Enter);
    // Submitting waits on the supernode; a refusal comes back as one line.
    agent(
        &mut app,
        AgentEvent::LoginResult(Err("username alice is taken".into())),
    );
    insta::assert_snapshot!(screen(&app, 80, 24));
}

/// Feeds one line of the agent's event stream to the app, as the link does.
fn line(app: &mut App, json: serde_json::Value) -> Vec<Effect> {
    let ev = parse_event(&json.to_string()).expect("an event the app understands");
    app.update(Event::Agent(ev))
}

/// A `call` event exactly as the agent writes it: the core's CallInfo plus its type.
fn call_event(
    call_id: u64,
    peer: &str,
    direction: Direction,
    state: CallState,
    via: Option<Via>,
    end_reason: Option<&str>,
) -> serde_json::Value {
    let info = CallInfo {
        call_id,
        peer: peerline_wire::Username::parse(peer).unwrap(),
        direction,
        state,
        via,
        setup_ms: via.map(|_| 140),
        end_reason: end_reason.map(str::to_string),
    };
    let mut v = serde_json::to_value(&info).unwrap();
    v["type"] = "call".into();
    v
}

/// A `call_stats` event as the agent writes it: the media engine's statistics plus the
/// fields the agent adds.
fn stats_event(call_id: u64, source: &str, input: f64, output: f64) -> serde_json::Value {
    let mut v = serde_json::to_value(peerline_media::CallStats {
        rtt_ms: Some(38.4),
        loss_before_recovery: 0.012,
        loss_after_recovery: 0.001,
        jitter_ms: 6.2,
        playout_delay_ms: 40.0,
        send_kbps: 27.6,
        bitrate_kbps: 24.0,
        ..Default::default()
    })
    .unwrap();
    for (k, x) in [
        ("type", serde_json::json!("call_stats")),
        ("call_id", call_id.into()),
        ("peer", "bob".into()),
        ("elapsed_s", 125.0.into()),
        ("input_level", input.into()),
        ("output_level", output.into()),
        ("audio_source", source.into()),
    ] {
        v[k] = x;
    }
    v
}

#[test]
fn incoming_call_popup_80x24() {
    let mut app = alice();
    line(
        &mut app,
        call_event(
            5,
            "bob",
            Direction::Incoming,
            CallState::Incoming,
            None,
            None,
        ),
    );
    app.update(Event::Tick(NOW + 4_000));
    insta::assert_snapshot!(screen(&app, 80, 24));
}

#[test]
fn calling_a_contact_80x24() {
    let mut app = conversation();
    key(&mut app, KeyCode::Esc);
    let eff = app.update(Event::Key(KeyEvent::new(
        KeyCode::Char('c'),
        KeyModifiers::NONE,
    )));
    assert_eq!(eff, vec![Effect::CallStart("bob".into())]);
    line(
        &mut app,
        call_event(
            6,
            "bob",
            Direction::Outgoing,
            CallState::Ringing,
            None,
            None,
        ),
    );
    app.update(Event::Tick(NOW + 3_000));
    insta::assert_snapshot!(screen(&app, 80, 24));
}

/// Alice in a call with bob, active for 2 min 5 s, as the agent reports it.
fn in_a_call(mut app: App, via: Via, source: &str) -> App {
    line(
        &mut app,
        call_event(
            7,
            "bob",
            Direction::Outgoing,
            CallState::Ringing,
            None,
            None,
        ),
    );
    line(
        &mut app,
        call_event(
            7,
            "bob",
            Direction::Outgoing,
            CallState::Connecting,
            None,
            None,
        ),
    );
    line(
        &mut app,
        call_event(
            7,
            "bob",
            Direction::Outgoing,
            CallState::Active,
            Some(via),
            None,
        ),
    );
    app.update(Event::Tick(NOW + 125_000));
    // Speech at about -20 dBFS going out, -35 dBFS coming in.
    line(&mut app, stats_event(7, source, 0.1, 0.018));
    app
}

#[test]
fn live_call_panel_100x30() {
    let app = in_a_call(conversation(), Via::Direct, "devices");
    insta::assert_snapshot!(screen(&app, 100, 30));
}

#[test]
fn live_call_without_sound_support_over_the_relay_80x24() {
    let app = in_a_call(alice(), Via::Relay, "silence");
    insta::assert_snapshot!(screen(&app, 80, 24));
}

#[test]
fn live_call_at_the_minimum_size_60x16() {
    let app = in_a_call(conversation(), Via::Direct, "silence");
    insta::assert_snapshot!(screen(&app, 60, 16));
}

#[test]
fn call_ended_80x24() {
    let mut app = in_a_call(conversation(), Via::Direct, "silence");
    line(
        &mut app,
        call_event(
            7,
            "bob",
            Direction::Outgoing,
            CallState::Ended,
            Some(Via::Direct),
            Some("hung up"),
        ),
    );
    app.notice = None;
    insta::assert_snapshot!(screen(&app, 80, 24));
}

#[test]
fn a_refused_call_says_why_80x24() {
    let mut app = alice();
    key(&mut app, KeyCode::Char('c'));
    agent(
        &mut app,
        AgentEvent::Call(CallEvent::Placed {
            peer: "bob".into(),
            result: Err("bob is offline".into()),
        }),
    );
    insta::assert_snapshot!(screen(&app, 80, 24));
}
