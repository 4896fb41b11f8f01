//! Drawing: `render(&App, frame)` reads the model and changes nothing.

use ratatui::layout::{Constraint, Layout, Rect};
use ratatui::style::{Color, Modifier, Style};
use ratatui::text::{Line, Span};
use ratatui::widgets::{Block, BorderType, Borders, Clear, Paragraph, Wrap};
use ratatui::Frame;
use unicode_width::UnicodeWidthChar;

use super::app::{
    App, Call, CallPath, CallStats, Contact, ContactState, Delivery, Focus, Link, LoginForm,
    Message, Overlay, Presence, Screen, SearchBox, ENDED_SHOWN_MS,
};

/// The smallest terminal the app draws in; below it says so instead.
pub const MIN_WIDTH: u16 = 60;
/// See [`MIN_WIDTH`].
pub const MIN_HEIGHT: u16 = 16;

const ACCENT: Color = Color::Cyan;

/// Draws the whole screen for `app`.
pub fn render(app: &App, f: &mut Frame) {
    let area = f.area();
    if area.width < MIN_WIDTH || area.height < MIN_HEIGHT {
        too_small(f, area);
        return;
    }
    match &app.screen {
        Screen::Login(form) => login(f, area, form),
        Screen::Main => main_screen(app, f, area),
    }
}

fn too_small(f: &mut Frame, area: Rect) {
    let text = vec![
        Line::from(Span::styled(
            "Terminal too small",
            Style::default().add_modifier(Modifier::BOLD),
        )),
        Line::from(format!("{}x{} now", area.width, area.height)),
        Line::from(format!("needs {MIN_WIDTH}x{MIN_HEIGHT}")),
        Line::from("enlarge it, or Ctrl-C to quit"),
    ];
    let h = (text.len() as u16).min(area.height);
    let y = area.y + area.height.saturating_sub(h) / 2;
    let r = Rect::new(area.x, y, area.width, h);
    f.render_widget(
        Paragraph::new(text)
            .alignment(ratatui::layout::Alignment::Center)
            .wrap(Wrap { trim: true }),
        r,
    );
}

/// A `w` x `h` rectangle in the middle of `area` (clipped to it).
fn centered(area: Rect, w: u16, h: u16) -> Rect {
    let w = w.min(area.width);
    let h = h.min(area.height);
    Rect::new(
        area.x + (area.width - w) / 2,
        area.y + (area.height - h) / 2,
        w,
        h,
    )
}

fn popup<'a>(title: &'a str) -> Block<'a> {
    Block::default()
        .borders(Borders::ALL)
        .border_type(BorderType::Rounded)
        .border_style(Style::default().fg(ACCENT))
        .title(Span::styled(
            format!(" {title} "),
            Style::default().add_modifier(Modifier::BOLD),
        ))
}

fn login(f: &mut Frame, area: Rect, form: &LoginForm) {
    let r = centered(area, 64, 14);
    f.render_widget(Clear, r);
    let block = popup("Welcome to Peerline");
    let inner = block.inner(r);
    f.render_widget(block, r);
    // One line per field: a long value (a bootstrap entry) shows its end, where typing goes.
    let vw = (inner.width as usize).saturating_sub(13);
    let field = |i: usize, label: &str, value: String| {
        let n = value.chars().count();
        let value = if n > vw {
            let tail: String = value.chars().skip(n + 1 - vw).collect();
            format!("…{tail}")
        } else {
            value
        };
        let mark = if form.field == i { "> " } else { "  " };
        let style = if form.field == i {
            Style::default().fg(ACCENT).add_modifier(Modifier::BOLD)
        } else {
            Style::default()
        };
        Line::from(vec![
            Span::styled(format!("{mark}{label:<10}"), style),
            Span::raw(value),
        ])
    };
    let masked = "*".repeat(form.password.chars().count());
    let mode = if form.register {
        "(x) new account   ( ) add this device"
    } else {
        "( ) new account   (x) add this device"
    };
    let mut lines = vec![
        Line::from("This profile has no account yet."),
        Line::from(""),
        field(0, "username", form.user.clone()),
        field(1, "server", form.server.clone()),
        field(2, "password", masked),
        field(3, "account", mode.to_string()),
        Line::from(""),
    ];
    if form.busy {
        lines.push(Line::from(Span::styled(
            "contacting the supernode...",
            Style::default().fg(Color::Yellow),
        )));
    } else if let Some(e) = &form.error {
        lines.push(Line::from(Span::styled(
            e.clone(),
            Style::default().fg(Color::Red),
        )));
    } else {
        lines.push(Line::from(""));
    }
    lines.push(Line::from(Span::styled(
        "Tab next field  Space switch  Enter go on  Esc quit",
        Style::default().fg(Color::DarkGray),
    )));
    lines.push(Line::from(Span::styled(
        "server: the HOST:PORT#KEY line your operator gave you",
        Style::default().fg(Color::DarkGray),
    )));
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), inner);
}

fn main_screen(app: &App, f: &mut Frame, area: Rect) {
    let [top, body, bottom] = Layout::vertical([
        Constraint::Length(1),
        Constraint::Min(1),
        Constraint::Length(1),
    ])
    .areas(area);
    title_bar(app, f, top);
    let left_w = (area.width / 3).clamp(24, 34);
    let [left, right] =
        Layout::horizontal([Constraint::Length(left_w), Constraint::Min(1)]).areas(body);
    contacts_pane(app, f, left);
    conversation_pane(app, f, right);
    status_bar(app, f, bottom);
    match &app.overlay {
        Some(Overlay::Help) => help(f, area),
        Some(Overlay::Search(sb)) => search(app, f, area, sb),
        Some(Overlay::Presence { selected }) => presence_picker(app, f, area, *selected),
        Some(Overlay::Settings { selected }) => settings(app, f, area, *selected),
        None => {}
    }
    if let Call::Incoming { peer, since, .. } = &app.call {
        ringing(app, f, area, peer, *since);
    }
}

fn presence_style(p: Presence) -> (&'static str, Style) {
    match p {
        Presence::Online => ("●", Style::default().fg(Color::Green)),
        Presence::Away => ("◐", Style::default().fg(Color::Yellow)),
        Presence::Busy => ("⊘", Style::default().fg(Color::Red)),
        Presence::Invisible => ("◌", Style::default().fg(Color::DarkGray)),
        Presence::Offline => ("○", Style::default().fg(Color::DarkGray)),
    }
}

fn title_bar(app: &App, f: &mut Frame, area: Rect) {
    // While the supernode is lost, contacts see us offline: say so.
    let me = if app.status.online {
        Presence::parse(&app.status.presence)
    } else {
        Presence::Offline
    };
    let (dot, st) = presence_style(me);
    let mut spans = vec![
        Span::styled(
            " Peerline ",
            Style::default()
                .fg(Color::Black)
                .bg(ACCENT)
                .add_modifier(Modifier::BOLD),
        ),
        Span::raw(" "),
    ];
    if !app.status.user.is_empty() {
        spans.push(Span::styled(
            app.status.user.clone(),
            Style::default().add_modifier(Modifier::BOLD),
        ));
        spans.push(Span::raw(" "));
        spans.push(Span::styled(dot, st));
        spans.push(Span::raw(format!(" {}", me.as_str())));
    }
    if app.status.relay_only {
        spans.push(Span::styled(
            "  relay-only",
            Style::default().fg(Color::Magenta),
        ));
    }
    let left = Line::from(spans);
    let right = Line::from(Span::styled(
        "? help  / search  p presence  s settings  q quit ",
        Style::default().fg(Color::DarkGray),
    ));
    let room = area.width as usize > left.width() + right.width() + 2;
    f.render_widget(Paragraph::new(left), area);
    if room {
        f.render_widget(
            Paragraph::new(right).alignment(ratatui::layout::Alignment::Right),
            area,
        );
    }
}

/// `HH:MM` (UTC) of a unix-ms time.
pub fn hhmm(ms: u64) -> String {
    let s = ms / 1000;
    format!("{:02}:{:02}", (s / 3600) % 24, (s / 60) % 60)
}

/// `YYYY-MM-DD` (UTC) of a unix-ms time.
pub fn date(ms: u64) -> String {
    let (y, m, d) = civil_from_days((ms / 86_400_000) as i64);
    format!("{y:04}-{m:02}-{d:02}")
}

/// Days since 1970-01-01 to a Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A short "when" for the contact list: the time today, else the date.
fn when(now: u64, t: u64) -> String {
    if now / 86_400_000 == t / 86_400_000 {
        hhmm(t)
    } else {
        date(t)[5..].to_string()
    }
}

fn contacts_pane(app: &App, f: &mut Frame, area: Rect) {
    let focused = app.focus == Focus::Contacts && app.overlay.is_none();
    let block = Block::default()
        .borders(Borders::ALL)
        .border_type(BorderType::Rounded)
        .border_style(if focused {
            Style::default().fg(ACCENT)
        } else {
            Style::default().fg(Color::DarkGray)
        })
        .title(" Contacts ");
    let inner = block.inner(area);
    f.render_widget(block, area);
    let rows = app.rows();
    let w = inner.width as usize;
    let mut lines: Vec<Line> = Vec::new();
    let mut selected_line = 0;
    let mut last_group = None;
    for c in &rows {
        let group = match c.state {
            ContactState::Incoming => "Requests",
            ContactState::Accepted => "",
            ContactState::Requested => "Waiting for an answer",
            ContactState::Blocked => "Blocked (x unblocks)",
            ContactState::None => "",
        };
        if last_group != Some(group) {
            if !group.is_empty() {
                if !lines.is_empty() {
                    lines.push(Line::from(""));
                }
                lines.push(Line::from(Span::styled(
                    truncate(group, w),
                    Style::default()
                        .fg(Color::Yellow)
                        .add_modifier(Modifier::BOLD),
                )));
            }
            last_group = Some(group);
        }
        if app.selected.as_deref() == Some(c.name.as_str()) {
            selected_line = lines.len();
        }
        lines.push(contact_line(app, c, w));
        if c.state == ContactState::Incoming {
            if !c.note.is_empty() {
                lines.push(Line::from(Span::styled(
                    truncate(&format!("    \"{}\"", c.note), w),
                    Style::default().fg(Color::DarkGray),
                )));
            }
            lines.push(Line::from(Span::styled(
                truncate("    [a]ccept [d]ecline [b]lock", w),
                Style::default().fg(Color::DarkGray),
            )));
        }
    }
    if rows.is_empty() {
        lines.push(Line::from(Span::styled(
            "No contacts yet.",
            Style::default().fg(Color::DarkGray),
        )));
        lines.push(Line::from(Span::styled(
            "Press / to find people.",
            Style::default().fg(Color::DarkGray),
        )));
    }
    // Keep the highlighted row in view.
    let h = inner.height as usize;
    let skip = (selected_line + 1).saturating_sub(h);
    let visible: Vec<Line> = lines.into_iter().skip(skip).take(h).collect();
    f.render_widget(Paragraph::new(visible), inner);
}

fn contact_line<'a>(app: &App, c: &Contact, w: usize) -> Line<'a> {
    let selected = app.selected.as_deref() == Some(c.name.as_str());
    let (dot, st) = match c.state {
        ContactState::Accepted => presence_style(c.presence),
        ContactState::Incoming => ("?", Style::default().fg(Color::Yellow)),
        ContactState::Requested => ("…", Style::default().fg(Color::DarkGray)),
        _ => ("×", Style::default().fg(Color::Red)),
    };
    let right = match (c.unread, c.last_time) {
        (0, Some(t)) => when(app.now, t),
        (n, Some(t)) => format!("({n}) {}", when(app.now, t)),
        (0, None) => String::new(),
        (n, None) => format!("({n})"),
    };
    let marker = if selected { ">" } else { " " };
    let name_w = w.saturating_sub(4 + right.chars().count());
    let name = truncate(&c.name, name_w);
    let pad = w.saturating_sub(4 + name.chars().count() + right.chars().count());
    let mut name_style = Style::default();
    if c.unread > 0 {
        name_style = name_style.add_modifier(Modifier::BOLD);
    }
    let mut line = Line::from(vec![
        Span::raw(format!("{marker} ")),
        Span::styled(dot, st),
        Span::raw(" "),
        Span::styled(name, name_style),
        Span::raw(" ".repeat(pad)),
        Span::styled(
            right,
            if c.unread > 0 {
                Style::default().fg(Color::Yellow)
            } else {
                Style::default().fg(Color::DarkGray)
            },
        ),
    ]);
    if selected {
        line = line.style(Style::default().bg(Color::DarkGray));
    }
    line
}

fn truncate(s: &str, w: usize) -> String {
    if s.chars().count() <= w {
        return s.to_string();
    }
    let mut out: String = s.chars().take(w.saturating_sub(1)).collect();
    out.push('…');
    out
}

/// Rows the call panel takes at the top of the right pane (0: no call to show).
fn call_panel_height(app: &App) -> u16 {
    match &app.call {
        Call::Active { .. } => 7,
        Call::Idle => match &app.last_call {
            Some(c) if app.now < c.at + ENDED_SHOWN_MS => 3,
            _ => 0,
        },
        // The ringing popup shows an incoming call.
        Call::Incoming { .. } => 0,
        _ => 4,
    }
}

fn conversation_pane(app: &App, f: &mut Frame, area: Rect) {
    // The call shows whichever conversation is open.
    let call_h = call_panel_height(app).min(area.height.saturating_sub(5));
    let [call_area, area] =
        Layout::vertical([Constraint::Length(call_h), Constraint::Min(1)]).areas(area);
    if call_h > 0 {
        call_panel(app, f, call_area);
    }
    let focused = app.focus == Focus::Conversation && app.overlay.is_none();
    let border = if focused {
        Style::default().fg(ACCENT)
    } else {
        Style::default().fg(Color::DarkGray)
    };
    let Some(peer) = &app.open else {
        let block = Block::default()
            .borders(Borders::ALL)
            .border_type(BorderType::Rounded)
            .border_style(border)
            .title(" Conversation ");
        let inner = block.inner(area);
        f.render_widget(block, area);
        let hint = vec![
            Line::from(""),
            Line::from("Pick a contact with ↑ ↓ and press Enter to chat."),
            Line::from("Press / to find people, ? for every key."),
        ];
        f.render_widget(
            Paragraph::new(hint)
                .style(Style::default().fg(Color::DarkGray))
                .alignment(ratatui::layout::Alignment::Center)
                .wrap(Wrap { trim: true }),
            inner,
        );
        return;
    };
    let contact = app.contacts.get(peer);
    let presence = contact.map_or(Presence::Offline, |c| c.presence);
    let (dot, st) = presence_style(presence);
    let state_note = match contact.map(|c| c.state) {
        Some(ContactState::Accepted) => presence.as_str(),
        Some(ContactState::Incoming) => "wants to be your contact",
        Some(ContactState::Requested) => "has not answered your request",
        Some(ContactState::Blocked) => "blocked",
        _ => "not a contact",
    };
    let title = Line::from(vec![
        Span::raw(" "),
        Span::styled(dot, st),
        Span::styled(
            format!(" {peer} "),
            Style::default().add_modifier(Modifier::BOLD),
        ),
        Span::raw(format!("· {state_note} ")),
    ]);
    let [msgs_area, input_area] =
        Layout::vertical([Constraint::Min(1), Constraint::Length(3)]).areas(area);
    let block = Block::default()
        .borders(Borders::ALL)
        .border_type(BorderType::Rounded)
        .border_style(border)
        .title(title);
    let inner = block.inner(msgs_area);
    f.render_widget(block, msgs_area);
    let lines = message_lines(app, app.messages(), inner.width as usize);
    let h = inner.height as usize;
    let max_scroll = lines.len().saturating_sub(h);
    let scroll = app.scroll.min(max_scroll);
    let end = lines.len() - scroll;
    let start = end.saturating_sub(h);
    let mut visible: Vec<Line> = lines[start..end].to_vec();
    if lines.is_empty() {
        visible.push(Line::from(Span::styled(
            "No messages yet. Say hello!",
            Style::default().fg(Color::DarkGray),
        )));
    }
    f.render_widget(Paragraph::new(visible), inner);
    if scroll > 0 {
        let tag = format!(" ↓ {scroll} more (PgDn) ");
        let w = tag.chars().count() as u16;
        if msgs_area.width > w + 2 {
            let r = Rect::new(
                msgs_area.x + msgs_area.width - w - 2,
                msgs_area.y + msgs_area.height - 1,
                w,
                1,
            );
            f.render_widget(
                Paragraph::new(tag).style(Style::default().fg(Color::Yellow)),
                r,
            );
        }
    }
    // The input line.
    let iblock = Block::default()
        .borders(Borders::ALL)
        .border_type(BorderType::Rounded)
        .border_style(border)
        .title(if focused {
            " Message (Enter sends, Esc back) "
        } else {
            " Message (Tab to type) "
        });
    let iinner = iblock.inner(input_area);
    f.render_widget(iblock, input_area);
    // Show the end of a long input.
    let iw = iinner.width.saturating_sub(1) as usize;
    let chars: Vec<char> = app.input.chars().collect();
    let shown: String = chars[chars.len().saturating_sub(iw)..].iter().collect();
    f.render_widget(Paragraph::new(shown.clone()), iinner);
    if focused {
        let x = iinner.x + (shown.chars().count() as u16).min(iinner.width.saturating_sub(1));
        f.set_cursor_position((x, iinner.y));
    }
}

fn delivery_span(d: &Delivery) -> Span<'static> {
    match d {
        Delivery::Sending => Span::styled(" sending…", Style::default().fg(Color::DarkGray)),
        Delivery::Direct => Span::styled(" ✓ direct", Style::default().fg(Color::Green)),
        Delivery::Relay => Span::styled(" ✓ relay", Style::default().fg(Color::Green)),
        Delivery::Queued => {
            Span::styled(" ⧗ queued at supernode", Style::default().fg(Color::Yellow))
        }
        Delivery::Failed(e) => {
            Span::styled(format!(" ✗ not sent: {e}"), Style::default().fg(Color::Red))
        }
        Delivery::Received(via) if via == "offline" => Span::styled(
            " (while you were away)",
            Style::default().fg(Color::DarkGray),
        ),
        Delivery::Received(_) => Span::raw(""),
    }
}

/// Wraps `text` to `w` columns (at least 1), breaking at spaces where it can.
fn wrap(text: &str, w: usize) -> Vec<String> {
    let w = w.max(1);
    let mut out = Vec::new();
    for para in text.split('\n') {
        let mut line = String::new();
        let mut lw = 0;
        for word in para.split_inclusive(' ') {
            let ww: usize = word.chars().map(|c| c.width().unwrap_or(0)).sum();
            // A trailing space may hang past the edge.
            let tw = ww - usize::from(word.ends_with(' '));
            if lw + tw > w && lw > 0 {
                out.push(std::mem::take(&mut line).trim_end().to_string());
                lw = 0;
            }
            if tw > w {
                // A word longer than the line: break it anywhere.
                for c in word.chars() {
                    let cw = c.width().unwrap_or(0);
                    if lw + cw > w {
                        out.push(std::mem::take(&mut line));
                        lw = 0;
                    }
                    line.push(c);
                    lw += cw;
                }
            } else {
                line.push_str(word);
                lw += ww;
            }
        }
        out.push(line.trim_end().to_string());
    }
    out
}

fn message_lines(app: &App, msgs: &[Message], w: usize) -> Vec<Line<'static>> {
    let mut lines = Vec::new();
    let mut last_day = None;
    for m in msgs {
        let day = m.time / 86_400_000;
        if last_day != Some(day) {
            let d = format!(" {} ", date(m.time));
            let side = w.saturating_sub(d.chars().count()) / 2;
            let rest = w.saturating_sub(d.chars().count() + side);
            lines.push(Line::from(Span::styled(
                format!("{}{d}{}", "─".repeat(side), "─".repeat(rest)),
                Style::default().fg(Color::DarkGray),
            )));
            last_day = Some(day);
        }
        let mine = m.from == app.status.user;
        let name_style = if mine {
            Style::default().fg(ACCENT).add_modifier(Modifier::BOLD)
        } else {
            Style::default()
                .fg(Color::Magenta)
                .add_modifier(Modifier::BOLD)
        };
        let prefix = format!("{} ", hhmm(m.time));
        let indent = prefix.chars().count() + 2;
        let head = format!("{}: ", m.from);
        let first_w = w.saturating_sub(prefix.chars().count() + head.chars().count());
        let body = wrap(&m.text, first_w.max(8).min(w.saturating_sub(indent).max(8)));
        let mut it = body.into_iter();
        let first = it.next().unwrap_or_default();
        lines.push(Line::from(vec![
            Span::styled(prefix, Style::default().fg(Color::DarkGray)),
            Span::styled(head, name_style),
            Span::raw(first),
        ]));
        for rest in it {
            lines.push(Line::from(format!("{}{rest}", " ".repeat(indent))));
        }
        let d = delivery_span(&m.delivery);
        if !d.content.is_empty() {
            if let Some(last) = lines.last_mut() {
                if last.width() + d.width() <= w {
                    last.spans.push(d);
                } else {
                    lines.push(Line::from(vec![Span::raw(" ".repeat(indent)), d]));
                }
            }
        }
    }
    lines
}

fn status_bar(app: &App, f: &mut Frame, area: Rect) {
    let (text, style) = if let Some(n) = &app.notice {
        (
            n.text.clone(),
            if n.error {
                Style::default().fg(Color::White).bg(Color::Red)
            } else {
                Style::default().fg(Color::Black).bg(Color::Green)
            },
        )
    } else {
        match &app.link {
            Link::Starting => (
                "starting the agent…".to_string(),
                Style::default().fg(Color::Black).bg(Color::Yellow),
            ),
            Link::Lost(why) => (
                format!("agent stopped ({why}); restarting it…"),
                Style::default().fg(Color::White).bg(Color::Red),
            ),
            Link::Attached if !app.status.online => {
                let secs = app
                    .offline_since
                    .map_or(0, |t| app.now.saturating_sub(t) / 1000);
                let why = app.status.reason.as_deref().unwrap_or("connecting");
                (
                    format!("offline: {why}; reconnecting ({secs} s)…"),
                    Style::default().fg(Color::White).bg(Color::Red),
                )
            }
            Link::Attached => (
                format!("online via {}  (? for help)", app.status.supernode),
                Style::default().fg(Color::Black).bg(Color::Gray),
            ),
        }
    };
    f.render_widget(
        Paragraph::new(truncate(&format!(" {text}"), area.width as usize)).style(style),
        area,
    );
}

const HELP: &[(&str, &str)] = &[
    ("Tab", "switch between contacts and conversation"),
    ("↑ ↓  j k", "move in the contact list"),
    ("Enter", "open the conversation / send the message"),
    ("Esc", "back to the contact list, close a window"),
    ("PgUp PgDn", "scroll the conversation"),
    ("/", "find people by name and send a request"),
    ("a  d  b", "accept, decline, block the highlighted request"),
    ("x x", "remove contact, withdraw request, unblock"),
    ("p", "set your presence (online, away, busy, invisible)"),
    ("s", "settings (relay-only mode, calls, display name)"),
    ("c", "call the highlighted contact"),
    ("a  d", "accept, decline a ringing call"),
    ("h", "hang up (from the contact list)"),
    ("?", "this help"),
    ("q  Ctrl-C", "quit (the agent keeps running)"),
];

fn help(f: &mut Frame, area: Rect) {
    let r = centered(area, 68, HELP.len() as u16 + 4);
    f.render_widget(Clear, r);
    let block = popup("Keys");
    let inner = block.inner(r);
    f.render_widget(block, r);
    let mut lines: Vec<Line> = HELP
        .iter()
        .map(|(k, what)| {
            Line::from(vec![
                Span::styled(
                    format!("{k:>10}  "),
                    Style::default().fg(ACCENT).add_modifier(Modifier::BOLD),
                ),
                Span::raw(*what),
            ])
        })
        .collect();
    lines.push(Line::from(""));
    lines.push(Line::from(Span::styled(
        "any key closes this window",
        Style::default().fg(Color::DarkGray),
    )));
    f.render_widget(Paragraph::new(lines), inner);
}

fn search(app: &App, f: &mut Frame, area: Rect, sb: &SearchBox) {
    let r = centered(area, 50, 14);
    f.render_widget(Clear, r);
    let block = popup("Find people");
    let inner = block.inner(r);
    f.render_widget(block, r);
    let mut lines = vec![
        Line::from(vec![
            Span::styled("name: ", Style::default().fg(ACCENT)),
            Span::raw(sb.query.clone()),
        ]),
        Line::from(""),
    ];
    match &sb.searched {
        None => lines.push(Line::from(Span::styled(
            "type the start of a username, then Enter",
            Style::default().fg(Color::DarkGray),
        ))),
        Some(q) if sb.results.is_empty() => {
            lines.push(Line::from(format!("nobody found for {q:?}")))
        }
        Some(_) => {
            let room = (inner.height as usize).saturating_sub(4);
            let skip = (sb.selected + 1).saturating_sub(room);
            for (i, u) in sb.results.iter().enumerate().skip(skip).take(room) {
                let tag = match app.contacts.get(u).map(|c| c.state) {
                    _ if *u == app.status.user => " (you)",
                    Some(ContactState::Accepted) => " (contact)",
                    Some(ContactState::Requested) => " (asked)",
                    Some(ContactState::Incoming) => " (asks you)",
                    Some(ContactState::Blocked) => " (blocked)",
                    _ => "",
                };
                let mut line = Line::from(format!(
                    "{} {u}{tag}",
                    if i == sb.selected { ">" } else { " " }
                ));
                if i == sb.selected {
                    line = line.style(Style::default().bg(Color::DarkGray));
                }
                lines.push(line);
            }
        }
    }
    let y = inner.y + inner.height.saturating_sub(1);
    f.render_widget(Paragraph::new(lines), inner);
    f.render_widget(
        Paragraph::new("Enter search / send request  Esc close")
            .style(Style::default().fg(Color::DarkGray)),
        Rect::new(inner.x, y, inner.width, 1),
    );
    let x = inner.x + 6 + (sb.query.chars().count() as u16).min(inner.width.saturating_sub(7));
    f.set_cursor_position((x, inner.y));
}

fn presence_picker(app: &App, f: &mut Frame, area: Rect, selected: usize) {
    let r = centered(area, 36, Presence::CHOICES.len() as u16 + 4);
    f.render_widget(Clear, r);
    let block = popup("Your presence");
    let inner = block.inner(r);
    f.render_widget(block, r);
    let cur = Presence::parse(&app.status.presence);
    let mut lines: Vec<Line> = Presence::CHOICES
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let (dot, st) = presence_style(*p);
            let explain = match p {
                Presence::Invisible => " (shown as offline)",
                _ => "",
            };
            let mut l = Line::from(vec![
                Span::raw(if i == selected { "> " } else { "  " }),
                Span::styled(dot, st),
                Span::raw(format!(
                    " {}{explain}{}",
                    p.as_str(),
                    if *p == cur { " ✓" } else { "" }
                )),
            ]);
            if i == selected {
                l = l.style(Style::default().bg(Color::DarkGray));
            }
            l
        })
        .collect();
    lines.push(Line::from(Span::styled(
        "Enter choose  Esc close",
        Style::default().fg(Color::DarkGray),
    )));
    f.render_widget(Paragraph::new(lines), inner);
}

fn settings(app: &App, f: &mut Frame, area: Rect, selected: usize) {
    let r = centered(area, 66, 13);
    f.render_widget(Clear, r);
    let block = popup("Settings");
    let inner = block.inner(r);
    f.render_widget(block, r);
    let rows: [(String, &str); 3] = [
        (
            format!(
                "Relay-only mode: {}",
                if app.status.relay_only { "on" } else { "off" }
            ),
            "peers see only the relay's address (from the next agent start)",
        ),
        (
            format!(
                "Who may call me: {}",
                if app.status.call_policy == "anyone" {
                    "anyone"
                } else {
                    "my contacts"
                }
            ),
            "anyone: people who are not your contacts can ring you too",
        ),
        (
            "Display name: not supported yet".to_string(),
            "the network shows your username to contacts",
        ),
    ];
    let mut lines = Vec::new();
    for (i, (label, explain)) in rows.iter().enumerate() {
        let mut l = Line::from(format!("{} {label}", if i == selected { ">" } else { " " }));
        if i == selected {
            l = l.style(Style::default().bg(Color::DarkGray));
        }
        lines.push(l);
        lines.push(Line::from(Span::styled(
            format!("    {explain}"),
            Style::default().fg(Color::DarkGray),
        )));
        lines.push(Line::from(""));
    }
    lines.push(Line::from(Span::styled(
        "Enter toggle  Esc close",
        Style::default().fg(Color::DarkGray),
    )));
    f.render_widget(Paragraph::new(lines).wrap(Wrap { trim: false }), inner);
}

fn ringing(app: &App, f: &mut Frame, area: Rect, peer: &str, since: u64) {
    let r = centered(area, 40, 7);
    f.render_widget(Clear, r);
    let block = popup("Incoming call");
    let inner = block.inner(r);
    f.render_widget(block, r);
    let secs = app.now.saturating_sub(since) / 1000;
    let lines = vec![
        Line::from(Span::styled(
            format!("{peer} is calling"),
            Style::default().add_modifier(Modifier::BOLD),
        )),
        Line::from(format!("ringing for {secs} s")),
        Line::from(""),
        Line::from(vec![
            Span::styled(" a ", Style::default().fg(Color::Black).bg(Color::Green)),
            Span::raw(" accept   "),
            Span::styled(" d ", Style::default().fg(Color::White).bg(Color::Red)),
            Span::raw(" decline"),
        ]),
    ];
    f.render_widget(
        Paragraph::new(lines).alignment(ratatui::layout::Alignment::Center),
        inner,
    );
}

/// A meter `width` cells wide for an RMS `level` (fraction of full scale), on a decibel
/// scale from -60 dBFS (empty) to 0 dBFS (full), as a person hears loudness.
fn meter(level: f64, width: usize) -> String {
    let fill = if level > 0.0 {
        ((20.0 * level.log10() + 60.0) / 60.0).clamp(0.0, 1.0)
    } else {
        0.0
    };
    let n = ((fill * width as f64).round() as usize).min(width);
    format!("{}{}", "█".repeat(n), "░".repeat(width - n))
}

fn mmss(secs: u64) -> String {
    format!("{:02}:{:02}", secs / 60, secs % 60)
}

fn call_panel(app: &App, f: &mut Frame, area: Rect) {
    let live = app.call != Call::Idle;
    let block = Block::default()
        .borders(Borders::ALL)
        .border_type(BorderType::Rounded)
        .border_style(Style::default().fg(if live { Color::Green } else { Color::DarkGray }))
        .title(if live {
            " Call (h hangs up) "
        } else {
            " Call "
        });
    let inner = block.inner(area);
    f.render_widget(block, area);
    let w = inner.width as usize;
    let waiting = |what: String, since: u64| {
        vec![
            Line::from(Span::styled(
                format!("{what}  {}", mmss(app.now.saturating_sub(since) / 1000)),
                Style::default().add_modifier(Modifier::BOLD),
            )),
            Line::from(Span::styled(
                audio_note(app, None).0,
                Style::default().fg(Color::DarkGray),
            )),
        ]
    };
    let lines = match &app.call {
        Call::Placing { peer, since, .. } | Call::Outgoing { peer, since, .. } => {
            waiting(format!("calling {peer}…"), *since)
        }
        Call::Connecting { peer, since, .. } => waiting(format!("connecting to {peer}…"), *since),
        Call::Active {
            peer,
            started,
            path,
            stats,
            ..
        } => call_lines(app, peer, *started, *path, stats.as_ref(), w),
        Call::Incoming { .. } => Vec::new(),
        Call::Idle => match &app.last_call {
            Some(c) => {
                let lasted = c
                    .duration_s
                    .map_or(String::new(), |d| format!(" after {}", mmss(d)));
                vec![Line::from(format!(
                    "call with {} ended{lasted}: {}",
                    c.peer, c.reason
                ))]
            }
            None => Vec::new(),
        },
    };
    let lines: Vec<Line> = lines
        .into_iter()
        .map(|l| {
            if l.width() > w {
                let text: String = l.spans.iter().map(|s| s.content.as_ref()).collect();
                Line::from(truncate(&text, w)).style(l.style)
            } else {
                l
            }
        })
        .collect();
    f.render_widget(Paragraph::new(lines), inner);
}

/// What the call sends and plays, and whether that is worth a warning (what matters
/// first, as narrow panels cut the end).
fn audio_note(app: &App, s: Option<&CallStats>) -> (String, bool) {
    let no_support = app.status.audio == "none";
    match s.map(|s| s.audio_source.as_str()) {
        Some("devices") => ("audio: microphone and speaker".into(), false),
        Some("file") => ("audio: playing a file".into(), false),
        Some("silence") if no_support => (
            "sending silence (no sound support in this build)".into(),
            true,
        ),
        Some("silence") => ("sending silence (no sound device found)".into(), true),
        _ if no_support => (
            "no sound support in this build: calls send silence".into(),
            true,
        ),
        _ if app.status.audio == "devices" => ("audio: microphone and speaker".into(), false),
        _ => (String::new(), false),
    }
}

fn call_lines(
    app: &App,
    peer: &str,
    started: u64,
    path: Option<CallPath>,
    s: Option<&CallStats>,
    w: usize,
) -> Vec<Line<'static>> {
    let path = match path {
        Some(CallPath::Direct) => Span::styled("direct", Style::default().fg(Color::Green)),
        Some(CallPath::Relay) => Span::styled("relay", Style::default().fg(Color::Yellow)),
        None => Span::styled("unknown", Style::default().fg(Color::DarkGray)),
    };
    // Narrow panels drop the words and keep the facts.
    let (with, path_label) = if w >= 40 {
        ("on call with ", "path: ")
    } else {
        ("", "")
    };
    let head = Line::from(vec![
        Span::styled(
            format!(
                "{with}{peer}  {}  ",
                mmss(app.now.saturating_sub(started) / 1000)
            ),
            Style::default().add_modifier(Modifier::BOLD),
        ),
        Span::raw(path_label),
        path,
    ]);
    let (note, warn) = audio_note(app, s);
    let note = Line::from(Span::styled(
        note,
        Style::default().fg(if warn { Color::Yellow } else { Color::DarkGray }),
    ));
    let Some(s) = s else {
        return vec![
            head,
            Line::from(Span::styled(
                "measuring…",
                Style::default().fg(Color::DarkGray),
            )),
            Line::from(""),
            Line::from(""),
            note,
        ];
    };
    let rtt = s
        .rtt_ms
        .map_or("–".to_string(), |r| format!("{:.0} ms", r.max(0.0)));
    let mw = w.saturating_sub(22).clamp(4, 20) / 2;
    vec![
        head,
        Line::from(format!(
            "RTT {rtt}  jitter {:.0} ms  {:.0} kbit/s",
            s.jitter_ms.max(0.0),
            s.send_kbps.max(0.0)
        )),
        Line::from(format!(
            "loss {:.1}%  after recovery {:.1}%",
            s.loss_pct.clamp(0.0, 100.0),
            s.residual_loss_pct.clamp(0.0, 100.0)
        )),
        Line::from(format!(
            "mic {}  speaker {}",
            meter(s.level_in, mw),
            meter(s.level_out, mw)
        )),
        note,
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_and_times_are_utc() {
        // 2026-11-23 23:20:25 UTC
        let t = 1_795_476_025_000;
        assert_eq!(date(t), "2026-11-23");
        assert_eq!(hhmm(t), "23:20");
        assert_eq!(date(0), "1970-01-01");
        assert_eq!(date(951_782_400_000), "2000-02-29");
    }

    #[test]
    fn wrap_breaks_at_spaces_and_inside_long_words() {
        assert_eq!(wrap("hello big world", 9), vec!["hello big", "world"]);
        assert_eq!(wrap("abcdefghij", 4), vec!["abcd", "efgh", "ij"]);
        assert_eq!(wrap("", 4), vec![""]);
        assert_eq!(wrap("a\nb", 4), vec!["a", "b"]);
        // Wide characters count two columns.
        assert_eq!(wrap("日本語", 4), vec!["日本", "語"]);
    }

    #[test]
    fn meters_use_decibels_and_are_clamped() {
        // -30 dBFS is half way.
        assert_eq!(meter(10f64.powf(-1.5), 4), "██░░");
        assert_eq!(meter(1.0, 4), "████");
        assert_eq!(meter(7.0, 2), "██");
        assert_eq!(meter(1e-9, 2), "░░");
        assert_eq!(meter(0.0, 2), "░░");
        assert_eq!(meter(-1.0, 2), "░░");
        assert_eq!(meter(f64::NAN, 2), "░░");
    }
}
