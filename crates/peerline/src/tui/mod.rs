//! `peerline tui`: the full-screen terminal app over the agent.
//!
//! Three parts that do not know one another's insides:
//! - [`app`]: the state model, `App::update(event) -> effects`, pure and tested alone;
//! - [`ui`]: `render(&App, frame)`, which snapshot tests drive from scripted states;
//! - [`io`]: background tasks that talk to the agent and report on a channel.
//!
//! This module only wires them to a real terminal: keys from a reader thread, agent events
//! from the link, a clock tick, one redraw per batch of events.

pub mod app;
pub mod io;
pub mod ui;

use std::time::Duration;

use anyhow::Context;
use ratatui::crossterm::event::{self, Event as TermEvent};
use tokio::sync::mpsc;

use crate::profile::Profile;
use app::{App, Effect, Event, Screen};

/// How often the clock in the model advances (durations, notices, "offline for").
const TICK: Duration = Duration::from_secs(1);

/// Runs the app on the current terminal until the user quits. `server` pre-fills the
/// login form when the profile has no account yet.
pub fn run(profile: Profile, server: Option<String>) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() || !std::io::stdin().is_terminal() {
        anyhow::bail!(
            "`peerline tui` needs an interactive terminal; scripts can use the other commands and `peerline events`"
        );
    }
    let registered = profile.cert()?.is_some();
    let hint = server.or_else(|| profile.server().ok().map(|b| b.encode()));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let mut terminal = ratatui::try_init().context("cannot set up the terminal")?;
    let result = rt.block_on(event_loop(&mut terminal, profile, registered, hint));
    ratatui::restore();
    // Background tasks may be waiting on the agent: do not wait for them.
    rt.shutdown_background();
    result
}

async fn event_loop(
    terminal: &mut ratatui::DefaultTerminal,
    profile: Profile,
    registered: bool,
    hint: Option<String>,
) -> anyhow::Result<()> {
    let mut app = App::new(peerline_net::unix_ms_now(), registered, hint);
    let size = terminal.size().context("cannot read the terminal size")?;
    app.update(Event::Resize(size.width, size.height));

    // Keys and resizes come from a blocking reader on its own thread.
    let (key_tx, mut key_rx) = mpsc::channel::<Event>(256);
    std::thread::spawn(move || loop {
        let ev = match event::read() {
            Ok(TermEvent::Key(k)) => Event::Key(k),
            Ok(TermEvent::Resize(w, h)) => Event::Resize(w, h),
            Ok(_) => continue,
            Err(_) => return,
        };
        if key_tx.blocking_send(ev).is_err() {
            return;
        }
    });
    let (agent_tx, mut agent_rx) = mpsc::channel(1024);
    let link = io::Link::new(profile, agent_tx);
    let mut supervising = false;
    let mut tick = tokio::time::interval(TICK);

    loop {
        if !supervising && app.screen == Screen::Main {
            tokio::spawn(link.clone().supervise());
            supervising = true;
        }
        terminal
            .draw(|f| ui::render(&app, f))
            .context("cannot draw on the terminal")?;
        let first = tokio::select! {
            Some(ev) = key_rx.recv() => ev,
            Some(ev) = agent_rx.recv() => Event::Agent(ev),
            _ = tick.tick() => Event::Tick(peerline_net::unix_ms_now()),
        };
        // Take everything already waiting before drawing again.
        let mut batch = vec![first];
        while let Ok(ev) = key_rx.try_recv() {
            batch.push(ev);
        }
        while let Ok(ev) = agent_rx.try_recv() {
            batch.push(Event::Agent(ev));
        }
        for ev in batch {
            for effect in app.update(ev) {
                if effect == Effect::Quit {
                    return Ok(());
                }
                tokio::spawn(link.clone().run(effect));
            }
        }
    }
}
