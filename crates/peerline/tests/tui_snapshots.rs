//! Snapshots of the terminal app's screens at fixed sizes, rendered from scripted states
//! (agent events and keys fed to the model; no agent, no terminal).
#![allow(clippy::unwrap_used)]

use peerline::tui::app::{
    AgentEvent, App, CallEvent, CallPath, CallStats, ContactState, Event, MessageRecord, Presence,
    Status,
};
use peerline::tui::ui::render;
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

fn stats(path: CallPath) -> CallStats {
    CallStats {
        path,
        rtt_ms: 38,
        loss_pct: 0.4,
        jitter_ms: 6,
        bitrate_kbps: 24,
        level_in: 0.6,
        level_out: 0.25,
        audio: "files (built without audio devices)".into(),
    }
}

// Calls are scripted here: the agent does not support them yet. These screens fix what
// the popup and the panel show once it does.
#[test]
fn incoming_call_popup_scripted_80x24() {
    let mut app = alice();
    agent(
        &mut app,
        AgentEvent::Call(CallEvent::Incoming { peer: "bob".into() }),
    );
    app.update(Event::Tick(NOW + 4_000));
    insta::assert_snapshot!(screen(&app, 80, 24));
}

#[test]
fn live_call_panel_scripted_100x30() {
    let mut app = conversation();
    agent(
        &mut app,
        AgentEvent::Call(CallEvent::Started {
            peer: "bob".into(),
            stats: stats(CallPath::Direct),
        }),
    );
    app.update(Event::Tick(NOW + 125_000));
    agent(
        &mut app,
        AgentEvent::Call(CallEvent::Stats(stats(CallPath::Relay))),
    );
    insta::assert_snapshot!(screen(&app, 100, 30));
}
