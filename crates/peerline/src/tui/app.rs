//! The terminal app's state model: plain data plus `update(event) -> effects`.
//!
//! Nothing here touches the terminal, the agent or the clock: keys, agent events and ticks
//! come in as [`Event`]s, and whatever must happen outside (a control request, quitting)
//! goes out as [`Effect`]s. Rendering reads the model and never changes it, so tests can
//! script a state and snapshot the screen.

use std::collections::BTreeMap;

use ratatui::crossterm::event::{KeyCode, KeyEvent, KeyEventKind, KeyModifiers};

/// Messages kept in memory per open conversation (older ones stay in the history file).
pub const MAX_LOADED_MESSAGES: usize = 1000;
/// Characters accepted in the input line (the wire limit is in bytes and checked by the agent).
pub const MAX_INPUT_CHARS: usize = 2000;
/// How long a notice stays in the status bar.
const NOTICE_MS: u64 = 6000;

/// A contact's presence as shown to us.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Presence {
    /// Available.
    Online,
    /// Away from the keyboard.
    Away,
    /// Do not disturb.
    Busy,
    /// Connected but shown as offline (only ever our own presence).
    Invisible,
    /// Not connected.
    Offline,
}

impl Presence {
    /// Parses the agent's lowercase name; anything unknown reads as offline.
    pub fn parse(s: &str) -> Self {
        match s {
            "online" => Presence::Online,
            "away" => Presence::Away,
            "busy" => Presence::Busy,
            "invisible" => Presence::Invisible,
            _ => Presence::Offline,
        }
    }

    /// Lowercase name as the agent spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            Presence::Online => "online",
            Presence::Away => "away",
            Presence::Busy => "busy",
            Presence::Invisible => "invisible",
            Presence::Offline => "offline",
        }
    }

    /// The presences a user can choose, in the selector's order.
    pub const CHOICES: [Presence; 4] = [
        Presence::Online,
        Presence::Away,
        Presence::Busy,
        Presence::Invisible,
    ];
}

/// The relationship with another user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContactState {
    /// Both agreed.
    Accepted,
    /// They asked us.
    Incoming,
    /// We asked them.
    Requested,
    /// We blocked them.
    Blocked,
    /// No relationship (after a removal or decline).
    None,
}

impl ContactState {
    /// Parses the agent's lowercase name.
    pub fn parse(s: &str) -> Self {
        match s {
            "accepted" => ContactState::Accepted,
            "incoming" => ContactState::Incoming,
            "requested" => ContactState::Requested,
            "blocked" => ContactState::Blocked,
            _ => ContactState::None,
        }
    }
}

/// One row of the contact list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Contact {
    /// Username.
    pub name: String,
    /// Relationship.
    pub state: ContactState,
    /// Presence (offline unless accepted).
    pub presence: Presence,
    /// Received messages not yet seen.
    pub unread: u64,
    /// Newest message either way (unix ms), if any.
    pub last_time: Option<u64>,
    /// The note of their contact request, when seen live.
    pub note: String,
}

impl Contact {
    fn new(name: &str, state: ContactState) -> Self {
        Contact {
            name: name.to_string(),
            state,
            presence: Presence::Offline,
            unread: 0,
            last_time: None,
            note: String::new(),
        }
    }
}

/// What became of a message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Delivery {
    /// Handed to the agent, no answer yet.
    Sending,
    /// Delivered to the peer's device over a direct session.
    Direct,
    /// Delivered to the peer's device through the relay.
    Relay,
    /// Durably queued in the supernode's mailbox (the peer was offline).
    Queued,
    /// Not sent; the one-line reason.
    Failed(String),
    /// Received by us; the path it came by (`direct`, `relay`, `offline`).
    Received(String),
}

impl Delivery {
    /// The state of an outgoing message the agent reports as sent `via`.
    pub fn sent_via(via: &str) -> Self {
        match via {
            "direct" => Delivery::Direct,
            "relay" => Delivery::Relay,
            _ => Delivery::Queued,
        }
    }
}

/// One message in a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// Sender.
    pub from: String,
    /// Recipient.
    pub to: String,
    /// Text.
    pub text: String,
    /// Sender's clock (unix ms); for a message still sending, when it was typed.
    pub time: u64,
    /// Delivery state.
    pub delivery: Delivery,
    /// Sender's message id, once known.
    pub msg_id: Option<u64>,
    /// Our own id for a message typed here, to match the agent's answer.
    pub local_id: Option<u64>,
}

/// A message as the agent or the history reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRecord {
    /// Sender.
    pub from: String,
    /// Recipient.
    pub to: String,
    /// Text.
    pub text: String,
    /// Sender's clock (unix ms).
    pub time: u64,
    /// `direct`, `relay` or `offline`.
    pub via: String,
    /// Sender's message id.
    pub msg_id: u64,
}

/// The agent's answer to `status`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Status {
    /// Logged in to the supernode.
    pub online: bool,
    /// Our username.
    pub user: String,
    /// Supernode host.
    pub supernode: String,
    /// Our presence.
    pub presence: String,
    /// Relay-only mode as the profile has it.
    pub relay_only: bool,
    /// Why the agent last went offline.
    pub reason: Option<String>,
    /// Sound support of the agent's build: `devices` or `none` (empty: not reported).
    pub audio: String,
    /// Who may ring us: `anyone` or `contacts` (empty: not reported).
    pub call_policy: String,
}

/// Which path a call's media takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallPath {
    /// Peer to peer.
    Direct,
    /// Through the operator's relay.
    Relay,
}

impl CallPath {
    /// Parses the agent's name (`direct` or `relay`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "direct" => Some(CallPath::Direct),
            "relay" => Some(CallPath::Relay),
            _ => None,
        }
    }
}

/// Where a call stands, as the agent reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallPhase {
    /// Ours, ringing at the peer.
    Ringing,
    /// Theirs, ringing here.
    Incoming,
    /// Answered; the media path is being set up.
    Connecting,
    /// Audio flows.
    Active,
    /// Over.
    Ended,
}

impl CallPhase {
    /// Parses the agent's lowercase name.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "ringing" => CallPhase::Ringing,
            "incoming" => CallPhase::Incoming,
            "connecting" => CallPhase::Connecting,
            "active" => CallPhase::Active,
            "ended" => CallPhase::Ended,
            _ => return None,
        })
    }
}

/// A call's state as the agent's `call` event reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallUpdate {
    /// The agent's id for the call.
    pub call_id: u64,
    /// The other party.
    pub peer: String,
    /// We rang (else they did).
    pub outgoing: bool,
    /// Where it stands.
    pub phase: CallPhase,
    /// The media path, once known.
    pub path: Option<CallPath>,
    /// Why it ended.
    pub end_reason: Option<String>,
}

/// Live figures of a call, from the agent's `call_stats` event.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CallStats {
    /// Round-trip time (ms), once measured.
    pub rtt_ms: Option<f64>,
    /// Packets from the peer that never arrived (percent).
    pub loss_pct: f64,
    /// Speech still missing after loss recovery (percent).
    pub residual_loss_pct: f64,
    /// Jitter (ms).
    pub jitter_ms: f64,
    /// What we send (kbit/s).
    pub send_kbps: f64,
    /// Level of what we send: RMS as a fraction of full scale.
    pub level_in: f64,
    /// Level of what we hear: RMS as a fraction of full scale.
    pub level_out: f64,
    /// What we send: `devices`, `file` or `silence` (empty when the agent does not say).
    pub audio_source: String,
}

/// The call the app shows (the agent runs at most one at a time).
#[derive(Debug, Clone, PartialEq)]
pub enum Call {
    /// No call.
    Idle,
    /// Asked the agent to ring a contact; no answer yet.
    Placing {
        /// Callee.
        peer: String,
        /// Since (unix ms).
        since: u64,
        /// Hang up as soon as the call has an id.
        cancel: bool,
    },
    /// A contact is calling us.
    Incoming {
        /// The call.
        call_id: u64,
        /// Caller.
        peer: String,
        /// Since (unix ms).
        since: u64,
    },
    /// Our call rings at the contact.
    Outgoing {
        /// The call.
        call_id: u64,
        /// Callee.
        peer: String,
        /// Since (unix ms).
        since: u64,
    },
    /// Answered; the media path is being set up.
    Connecting {
        /// The call.
        call_id: u64,
        /// The other party.
        peer: String,
        /// Since (unix ms).
        since: u64,
    },
    /// A call is up.
    Active {
        /// The call.
        call_id: u64,
        /// The other party.
        peer: String,
        /// Became active at (unix ms).
        started: u64,
        /// Media path.
        path: Option<CallPath>,
        /// Latest figures (none before the first second).
        stats: Option<CallStats>,
    },
}

impl Call {
    /// The agent's id for the call, once known.
    pub fn id(&self) -> Option<u64> {
        match self {
            Call::Incoming { call_id, .. }
            | Call::Outgoing { call_id, .. }
            | Call::Connecting { call_id, .. }
            | Call::Active { call_id, .. } => Some(*call_id),
            Call::Idle | Call::Placing { .. } => None,
        }
    }

    /// The other party, if there is a call.
    pub fn peer(&self) -> Option<&str> {
        match self {
            Call::Idle => None,
            Call::Placing { peer, .. }
            | Call::Incoming { peer, .. }
            | Call::Outgoing { peer, .. }
            | Call::Connecting { peer, .. }
            | Call::Active { peer, .. } => Some(peer),
        }
    }
}

/// The call that just ended, shown for a while after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedCall {
    /// The other party.
    pub peer: String,
    /// Why it ended.
    pub reason: String,
    /// How long it was active (seconds), if it was.
    pub duration_s: Option<u64>,
    /// When it ended (unix ms).
    pub at: u64,
}

/// How long the panel shows a call that ended.
pub const ENDED_SHOWN_MS: u64 = 30_000;

/// Call news from the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum CallEvent {
    /// The agent's answer to our call start: the call's id, or why it could not ring.
    Placed {
        /// Callee.
        peer: String,
        /// Call id or reason.
        result: Result<u64, String>,
    },
    /// A call changed state.
    Update(CallUpdate),
    /// New figures for a call.
    Stats {
        /// The call.
        call_id: u64,
        /// Figures.
        stats: CallStats,
    },
}

/// What the agent link reports.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// The agent is being started (or looked for).
    Starting,
    /// Attached to the agent's control socket and event stream.
    Attached,
    /// The agent went away; the link starts it again.
    Lost {
        /// Why.
        reason: String,
    },
    /// A fresh status.
    Status(Status),
    /// The full contact list (user, state, presence).
    Contacts(Vec<(String, ContactState, Presence)>),
    /// Last message time and unread count per peer, from the history.
    Summaries(Vec<(String, u64, u64)>),
    /// A conversation's recent history, oldest first.
    History {
        /// With whom.
        peer: String,
        /// Messages.
        messages: Vec<MessageRecord>,
    },
    /// A message arrived.
    Received(MessageRecord),
    /// A message was sent (by this app or another front end).
    Sent(MessageRecord),
    /// The agent answered a send typed here.
    SendResult {
        /// The app's id for it.
        local_id: u64,
        /// `(via, msg_id, time)`, or the reason it failed.
        result: Result<(String, u64, u64), String>,
    },
    /// A contact's presence changed.
    Presence {
        /// Who.
        user: String,
        /// Now.
        presence: Presence,
    },
    /// A contact relationship changed.
    Contact {
        /// Who.
        user: String,
        /// New state.
        state: ContactState,
        /// Request note.
        note: String,
    },
    /// The agent logged in to the supernode.
    Online,
    /// The agent lost the supernode (it reconnects by itself).
    Offline {
        /// Why.
        reason: String,
    },
    /// Search results (usernames only).
    SearchResults {
        /// The query they answer.
        query: String,
        /// Users.
        users: Vec<String>,
    },
    /// A request finished: a line for the status bar.
    Done(String),
    /// A request failed: its one-line reason.
    Failed(String),
    /// Relay-only mode as saved in the profile.
    RelayOnly(bool),
    /// Who may ring us, as the agent now has it: `anyone` or `contacts`.
    CallPolicy(String),
    /// Registration or enrolment finished.
    LoginResult(Result<String, String>),
    /// Events were dropped by the agent for a slow reader: reload everything.
    Lagged,
    /// A call state change.
    Call(CallEvent),
}

/// Input to the model.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A key press.
    Key(KeyEvent),
    /// The terminal changed size.
    Resize(u16, u16),
    /// The wall clock (unix ms), about once a second.
    Tick(u64),
    /// From the agent link.
    Agent(AgentEvent),
}

/// What the model asks the outside to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Leave the app (the agent keeps running).
    Quit,
    /// Send a message.
    Send {
        /// The app's id for it.
        local_id: u64,
        /// Recipient.
        to: String,
        /// Text.
        text: String,
    },
    /// Load a conversation's recent history.
    LoadHistory(String),
    /// Mark a conversation read.
    MarkRead(String),
    /// Send a contact request.
    ContactAdd(String),
    /// Answer a request: `accept`, `decline` or `block`.
    ContactReply {
        /// Whom.
        user: String,
        /// Answer.
        action: &'static str,
    },
    /// Remove a contact, withdraw a request or unblock.
    ContactRemove(String),
    /// Change our presence.
    SetPresence(&'static str),
    /// Search users by prefix.
    Search(String),
    /// Turn relay-only mode on or off.
    SetRelayOnly(bool),
    /// Register or enrol this device, then start the agent.
    Login {
        /// Username.
        user: String,
        /// Bootstrap entry.
        server: String,
        /// Password.
        password: String,
        /// Register a new account (else enrol into an existing one).
        register: bool,
    },
    /// Set who may ring us: `anyone` or `contacts`.
    SetCallPolicy(&'static str),
    /// Call a contact.
    CallStart(String),
    /// Answer the ringing call.
    CallAccept(u64),
    /// Refuse the ringing call.
    CallDecline(u64),
    /// End (or cancel) the call.
    CallHangup(u64),
}

/// Which pane has the keyboard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Focus {
    /// The contact list.
    Contacts,
    /// The conversation's input line.
    Conversation,
}

/// A modal window over the main screen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overlay {
    /// Key help.
    Help,
    /// Search users and send a request.
    Search(SearchBox),
    /// Choose our presence.
    Presence {
        /// Highlighted choice.
        selected: usize,
    },
    /// Settings.
    Settings {
        /// Highlighted row.
        selected: usize,
    },
}

/// The search window.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SearchBox {
    /// What is typed.
    pub query: String,
    /// The query the results answer.
    pub searched: Option<String>,
    /// Usernames found.
    pub results: Vec<String>,
    /// Highlighted result.
    pub selected: usize,
}

/// The registration or enrolment form shown when the profile has no account yet.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoginForm {
    /// Username.
    pub user: String,
    /// Bootstrap entry.
    pub server: String,
    /// Password (shown masked).
    pub password: String,
    /// Register a new account (else enrol this device into an existing one).
    pub register: bool,
    /// Field with the cursor: 0 user, 1 server, 2 password, 3 mode.
    pub field: usize,
    /// Waiting for the supernode's answer.
    pub busy: bool,
    /// The last failure.
    pub error: Option<String>,
}

/// Top-level screen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Screen {
    /// No account on this profile yet.
    Login(LoginForm),
    /// Contacts and conversation.
    Main,
}

/// How the link to the agent stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Link {
    /// Starting or looking for the agent.
    Starting,
    /// Attached.
    Attached,
    /// Lost; being restarted.
    Lost(String),
}

/// A line for the status bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// Text.
    pub text: String,
    /// Shown as an error.
    pub error: bool,
    /// Hidden after (unix ms).
    pub until: u64,
}

/// Settings rows, in order.
pub const SETTINGS_ROWS: usize = 3;

/// The whole app state.
#[derive(Debug, Clone, PartialEq)]
pub struct App {
    /// Top-level screen.
    pub screen: Screen,
    /// Wall clock (unix ms) as of the last tick.
    pub now: u64,
    /// Terminal size.
    pub size: (u16, u16),
    /// Agent link state.
    pub link: Link,
    /// Agent status.
    pub status: Status,
    /// Offline since (unix ms), while the agent reconnects to the supernode.
    pub offline_since: Option<u64>,
    /// Everyone with a relationship, by name.
    pub contacts: BTreeMap<String, Contact>,
    /// Highlighted contact.
    pub selected: Option<String>,
    /// Open conversation.
    pub open: Option<String>,
    /// Loaded conversations.
    pub conversations: BTreeMap<String, Vec<Message>>,
    /// Lines scrolled up from the bottom of the open conversation (0 follows new messages).
    pub scroll: usize,
    /// The input line.
    pub input: String,
    /// Which pane has the keyboard.
    pub focus: Focus,
    /// Modal window.
    pub overlay: Option<Overlay>,
    /// Status bar notice.
    pub notice: Option<Notice>,
    /// Call state.
    pub call: Call,
    /// The last call that ended, shown for [`ENDED_SHOWN_MS`].
    pub last_call: Option<EndedCall>,
    /// The contact a first `x` asked to remove (a second `x` confirms).
    pub confirm_remove: Option<String>,
    next_local_id: u64,
}

impl App {
    /// A fresh app at `now` (unix ms); `registered` chooses the main screen or the login form.
    pub fn new(now: u64, registered: bool, server_hint: Option<String>) -> Self {
        App {
            screen: if registered {
                Screen::Main
            } else {
                Screen::Login(LoginForm {
                    server: server_hint.unwrap_or_default(),
                    register: true,
                    ..LoginForm::default()
                })
            },
            now,
            size: (80, 24),
            link: Link::Starting,
            status: Status::default(),
            offline_since: None,
            contacts: BTreeMap::new(),
            selected: None,
            open: None,
            conversations: BTreeMap::new(),
            scroll: 0,
            input: String::new(),
            focus: Focus::Contacts,
            overlay: None,
            notice: None,
            call: Call::Idle,
            last_call: None,
            confirm_remove: None,
            next_local_id: 1,
        }
    }

    /// Contacts in display order, grouped: requests to answer first, then contacts
    /// (available ones first), then our pending requests, then blocked users.
    pub fn rows(&self) -> Vec<&Contact> {
        let group = |c: &Contact| match c.state {
            ContactState::Incoming => 0,
            ContactState::Accepted => 1,
            ContactState::Requested => 2,
            ContactState::Blocked => 3,
            ContactState::None => 4,
        };
        let mut v: Vec<&Contact> = self
            .contacts
            .values()
            .filter(|c| c.state != ContactState::None)
            .collect();
        v.sort_by(|a, b| {
            (group(a), a.presence == Presence::Offline, &a.name).cmp(&(
                group(b),
                b.presence == Presence::Offline,
                &b.name,
            ))
        });
        v
    }

    /// The open conversation's messages.
    pub fn messages(&self) -> &[Message] {
        self.open
            .as_ref()
            .and_then(|p| self.conversations.get(p))
            .map_or(&[], |v| v.as_slice())
    }

    /// Our username.
    pub fn me(&self) -> &str {
        &self.status.user
    }

    fn notify(&mut self, text: impl Into<String>, error: bool) {
        self.notice = Some(Notice {
            text: text.into(),
            error,
            until: self.now + NOTICE_MS,
        });
    }

    /// Applies one event; returns what must happen outside.
    pub fn update(&mut self, ev: Event) -> Vec<Effect> {
        match ev {
            Event::Tick(now) => {
                self.now = now;
                if self.notice.as_ref().is_some_and(|n| n.until <= now) {
                    self.notice = None;
                }
                if self
                    .last_call
                    .as_ref()
                    .is_some_and(|c| c.at + ENDED_SHOWN_MS <= now)
                {
                    self.last_call = None;
                }
                Vec::new()
            }
            Event::Resize(w, h) => {
                self.size = (w, h);
                Vec::new()
            }
            Event::Agent(a) => self.on_agent(a),
            Event::Key(k) => {
                // Only presses: some terminals also report releases and repeats.
                if k.kind == KeyEventKind::Release {
                    return Vec::new();
                }
                if k.code == KeyCode::Char('c') && k.modifiers.contains(KeyModifiers::CONTROL) {
                    return vec![Effect::Quit];
                }
                // A control character is never text (terminals report Tab, Enter and
                // Backspace as their own keys).
                if matches!(k.code, KeyCode::Char(c) if c.is_control()) {
                    return Vec::new();
                }
                if matches!(self.screen, Screen::Login(_)) {
                    return self.on_login_key(k);
                }
                if let Some(eff) = self.on_call_key(k) {
                    return eff;
                }
                if self.overlay.is_some() {
                    return self.on_overlay_key(k);
                }
                // Terminals send Esc quickly followed by a key as Alt+key: in the input
                // line that is "leave the input, then this key".
                if self.focus == Focus::Conversation
                    && k.modifiers.contains(KeyModifiers::ALT)
                    && matches!(k.code, KeyCode::Char(_))
                {
                    self.focus = Focus::Contacts;
                    return self.on_contacts_key(KeyEvent::new(k.code, KeyModifiers::NONE));
                }
                match self.focus {
                    Focus::Contacts => self.on_contacts_key(k),
                    Focus::Conversation => self.on_conversation_key(k),
                }
            }
        }
    }

    fn on_agent(&mut self, a: AgentEvent) -> Vec<Effect> {
        match a {
            AgentEvent::Starting => self.link = Link::Starting,
            AgentEvent::Attached => {
                self.link = Link::Attached;
                // Reload the open conversation: messages may have come while detached.
                if let Some(p) = self.open.clone() {
                    return vec![Effect::LoadHistory(p)];
                }
            }
            AgentEvent::Lost { reason } => {
                // The agent ran the call: a call cannot outlive it.
                if let Some(peer) = self.call.peer().map(str::to_string) {
                    self.last_call = Some(EndedCall {
                        peer,
                        reason: "the agent stopped".into(),
                        duration_s: match &self.call {
                            Call::Active { started, .. } => {
                                Some(self.now.saturating_sub(*started) / 1000)
                            }
                            _ => None,
                        },
                        at: self.now,
                    });
                    self.call = Call::Idle;
                }
                self.link = Link::Lost(reason);
            }
            AgentEvent::Status(s) => {
                if s.online {
                    self.offline_since = None;
                } else if self.offline_since.is_none() {
                    self.offline_since = Some(self.now);
                }
                self.status = s;
            }
            AgentEvent::Online => {
                self.status.online = true;
                self.status.reason = None;
                self.offline_since = None;
            }
            AgentEvent::Offline { reason } => {
                self.status.online = false;
                self.status.reason = Some(reason);
                if self.offline_since.is_none() {
                    self.offline_since = Some(self.now);
                }
            }
            AgentEvent::Contacts(list) => {
                let mut seen = Vec::with_capacity(list.len());
                for (name, state, presence) in list {
                    let c = self
                        .contacts
                        .entry(name.clone())
                        .or_insert_with(|| Contact::new(&name, state));
                    c.state = state;
                    c.presence = presence;
                    seen.push(name);
                }
                // Names the agent no longer lists have no relationship now; keep them only
                // if we have messages with them (history stays visible).
                for (name, c) in self.contacts.iter_mut() {
                    if !seen.contains(name) {
                        c.state = ContactState::None;
                    }
                }
                self.fix_selection();
            }
            AgentEvent::Summaries(list) => {
                for (peer, last, unread) in list {
                    if let Some(c) = self.contacts.get_mut(&peer) {
                        c.last_time = Some(last);
                        // The open conversation is being read.
                        c.unread = if self.open.as_deref() == Some(peer.as_str()) {
                            0
                        } else {
                            unread
                        };
                    }
                }
            }
            AgentEvent::History { peer, messages } => {
                let mut conv: Vec<Message> =
                    messages.into_iter().map(|m| self.to_message(m)).collect();
                // Keep messages still sending: the history has them only once sent.
                if let Some(old) = self.conversations.get(&peer) {
                    conv.extend(
                        old.iter()
                            .filter(|m| m.delivery == Delivery::Sending)
                            .cloned(),
                    );
                }
                self.conversations.insert(peer, conv);
            }
            AgentEvent::Received(m) => return self.on_received(m),
            AgentEvent::Sent(m) => self.on_sent(m),
            AgentEvent::SendResult { local_id, result } => self.on_send_result(local_id, result),
            AgentEvent::Presence { user, presence } => {
                if let Some(c) = self.contacts.get_mut(&user) {
                    c.presence = presence;
                }
            }
            AgentEvent::Contact { user, state, note } => {
                let c = self
                    .contacts
                    .entry(user.clone())
                    .or_insert_with(|| Contact::new(&user, state));
                c.state = state;
                if state != ContactState::Accepted {
                    c.presence = Presence::Offline;
                }
                if !note.is_empty() {
                    c.note = sanitize(&note).replace('\n', " ");
                }
                match state {
                    ContactState::Incoming => {
                        self.notify(format!("{user} wants to be your contact"), false)
                    }
                    ContactState::Accepted => {
                        self.notify(format!("{user} is now a contact"), false)
                    }
                    _ => {}
                }
                self.fix_selection();
            }
            AgentEvent::SearchResults { query, users } => {
                if let Some(Overlay::Search(sb)) = &mut self.overlay {
                    if sb.query.trim() == query {
                        sb.results = users;
                        sb.searched = Some(query);
                        sb.selected = 0;
                    }
                }
            }
            AgentEvent::Done(text) => self.notify(text, false),
            AgentEvent::Failed(text) => self.notify(text, true),
            AgentEvent::RelayOnly(on) => self.status.relay_only = on,
            AgentEvent::CallPolicy(p) => self.status.call_policy = p,
            AgentEvent::LoginResult(r) => {
                if let Screen::Login(f) = &mut self.screen {
                    match r {
                        Ok(user) => {
                            self.screen = Screen::Main;
                            self.status.user = user;
                        }
                        Err(e) => {
                            f.busy = false;
                            f.error = Some(e);
                        }
                    }
                }
            }
            AgentEvent::Lagged => {
                let mut v = Vec::new();
                if let Some(p) = self.open.clone() {
                    v.push(Effect::LoadHistory(p));
                }
                return v;
            }
            AgentEvent::Call(c) => return self.on_call_event(c),
        }
        Vec::new()
    }

    fn to_message(&self, m: MessageRecord) -> Message {
        let m = MessageRecord {
            text: sanitize(&m.text),
            ..m
        };
        let mine = m.from == self.status.user;
        let delivery = if mine {
            Delivery::sent_via(&m.via)
        } else {
            Delivery::Received(m.via)
        };
        Message {
            from: m.from,
            to: m.to,
            text: m.text,
            time: m.time,
            delivery,
            msg_id: Some(m.msg_id),
            local_id: None,
        }
    }

    fn push_message(&mut self, peer: &str, m: Message) {
        let conv = self.conversations.entry(peer.to_string()).or_default();
        conv.push(m);
        if conv.len() > MAX_LOADED_MESSAGES {
            let excess = conv.len() - MAX_LOADED_MESSAGES;
            conv.drain(..excess);
        }
        if self.open.as_deref() == Some(peer) && self.scroll > 0 {
            // Keep the reader about in place while they look back (one line per message).
            self.scroll += 1;
        }
    }

    fn on_received(&mut self, m: MessageRecord) -> Vec<Effect> {
        let peer = m.from.clone();
        let time = m.time;
        // A message id of 0 means the agent did not report one: never a duplicate then.
        let dup = self.conversations.get(&peer).is_some_and(|c| {
            c.iter()
                .any(|x| x.from == peer && m.msg_id != 0 && x.msg_id == Some(m.msg_id))
        });
        if dup {
            return Vec::new();
        }
        let msg = self.to_message(m);
        // Only conversations we loaded keep messages in memory; others load on opening.
        let reading = self.open.as_deref() == Some(peer.as_str());
        if self.conversations.contains_key(&peer) || reading {
            self.push_message(&peer, msg);
        }
        let c = self
            .contacts
            .entry(peer.clone())
            .or_insert_with(|| Contact::new(&peer, ContactState::Accepted));
        c.last_time = Some(c.last_time.map_or(time, |t| t.max(time)));
        if reading {
            return vec![Effect::MarkRead(peer)];
        }
        c.unread += 1;
        Vec::new()
    }

    fn on_sent(&mut self, m: MessageRecord) {
        let peer = m.to.clone();
        if let Some(c) = self.contacts.get_mut(&peer) {
            c.last_time = Some(c.last_time.map_or(m.time, |t| t.max(m.time)));
        }
        let Some(conv) = self.conversations.get_mut(&peer) else {
            return;
        };
        if conv
            .iter()
            .any(|x| x.from == m.from && m.msg_id != 0 && x.msg_id == Some(m.msg_id))
        {
            return;
        }
        // Typed here and still waiting for the agent's answer: this event is that answer.
        if let Some(x) = conv
            .iter_mut()
            .find(|x| x.delivery == Delivery::Sending && x.text == m.text)
        {
            x.delivery = Delivery::sent_via(&m.via);
            x.msg_id = Some(m.msg_id);
            x.time = m.time;
            return;
        }
        // Sent by another front end (the CLI).
        let msg = self.to_message(m);
        self.push_message(&peer, msg);
    }

    fn on_send_result(&mut self, local_id: u64, result: Result<(String, u64, u64), String>) {
        let mut failure = None;
        for conv in self.conversations.values_mut() {
            if let Some(x) = conv.iter_mut().find(|x| x.local_id == Some(local_id)) {
                match result {
                    Ok((ref via, msg_id, time)) => {
                        if x.delivery == Delivery::Sending {
                            x.delivery = Delivery::sent_via(via);
                            x.msg_id = Some(msg_id);
                            x.time = time;
                        }
                    }
                    Err(ref e) => {
                        x.delivery = Delivery::Failed(e.clone());
                        failure = Some(e.clone());
                    }
                }
                break;
            }
        }
        if let Some(e) = failure {
            self.notify(format!("not sent: {e}"), true);
        }
    }

    fn on_call_event(&mut self, c: CallEvent) -> Vec<Effect> {
        match c {
            CallEvent::Placed { peer, result } => {
                let Call::Placing {
                    peer: placing,
                    since,
                    cancel,
                } = &self.call
                else {
                    // The call's own events got here first: nothing to add.
                    return Vec::new();
                };
                if *placing != peer {
                    return Vec::new();
                }
                let (since, cancel) = (*since, *cancel);
                match result {
                    Ok(call_id) => {
                        self.call = Call::Outgoing {
                            call_id,
                            peer,
                            since,
                        };
                        if cancel {
                            return vec![Effect::CallHangup(call_id)];
                        }
                    }
                    Err(e) => {
                        self.call = Call::Idle;
                        self.notify(format!("cannot call {peer}: {e}"), true);
                    }
                }
            }
            CallEvent::Update(u) => return self.on_call_update(u),
            CallEvent::Stats { call_id, stats } => {
                if let Call::Active {
                    call_id: id,
                    stats: s,
                    ..
                } = &mut self.call
                {
                    if *id == call_id {
                        *s = Some(stats);
                    }
                }
            }
        }
        Vec::new()
    }

    fn on_call_update(&mut self, u: CallUpdate) -> Vec<Effect> {
        let ours = match &self.call {
            Call::Idle => u.phase != CallPhase::Ended,
            Call::Placing { peer, .. } => u.outgoing && *peer == u.peer,
            other => other.id() == Some(u.call_id),
        };
        if !ours {
            // Another call's news (the agent runs one at a time; this is an old one).
            return Vec::new();
        }
        let since = match &self.call {
            Call::Placing { since, .. }
            | Call::Incoming { since, .. }
            | Call::Outgoing { since, .. }
            | Call::Connecting { since, .. } => *since,
            _ => self.now,
        };
        let cancel = matches!(self.call, Call::Placing { cancel: true, .. });
        let (call_id, peer) = (u.call_id, u.peer);
        match u.phase {
            CallPhase::Ended => {
                let duration_s = match &self.call {
                    Call::Active { started, .. } => Some(self.now.saturating_sub(*started) / 1000),
                    _ => None,
                };
                let reason =
                    sanitize(u.end_reason.as_deref().unwrap_or("ended")).replace('\n', " ");
                self.notify(format!("call with {peer} ended: {reason}"), false);
                self.last_call = Some(EndedCall {
                    peer,
                    reason,
                    duration_s,
                    at: self.now,
                });
                self.call = Call::Idle;
                return Vec::new();
            }
            CallPhase::Incoming => {
                self.last_call = None;
                self.call = Call::Incoming {
                    call_id,
                    peer,
                    since,
                };
            }
            CallPhase::Ringing => {
                self.last_call = None;
                self.call = Call::Outgoing {
                    call_id,
                    peer,
                    since,
                };
            }
            CallPhase::Connecting => {
                self.call = Call::Connecting {
                    call_id,
                    peer,
                    since,
                };
            }
            CallPhase::Active => {
                let (started, stats) = match &self.call {
                    Call::Active { started, stats, .. } => (*started, stats.clone()),
                    _ => (self.now, None),
                };
                self.call = Call::Active {
                    call_id,
                    peer,
                    started,
                    path: u.path,
                    stats,
                };
            }
        }
        if cancel {
            return vec![Effect::CallHangup(call_id)];
        }
        Vec::new()
    }

    /// Keeps the highlight on an existing row.
    fn fix_selection(&mut self) {
        let rows = self.rows();
        let ok = self
            .selected
            .as_ref()
            .is_some_and(|s| rows.iter().any(|c| &c.name == s));
        if !ok {
            self.selected = rows.first().map(|c| c.name.clone());
        }
    }

    fn move_selection(&mut self, delta: isize) {
        let rows = self.rows();
        if rows.is_empty() {
            return;
        }
        let cur = self
            .selected
            .as_ref()
            .and_then(|s| rows.iter().position(|c| &c.name == s))
            .unwrap_or(0);
        let next = cur
            .saturating_add_signed(delta)
            .min(rows.len().saturating_sub(1));
        self.selected = rows.get(next).map(|c| c.name.clone());
    }

    fn selected_contact(&self) -> Option<&Contact> {
        self.selected.as_ref().and_then(|s| self.contacts.get(s))
    }

    /// Opens the conversation with `peer` and gives the input line the keyboard.
    fn open_conversation(&mut self, peer: String) -> Vec<Effect> {
        self.scroll = 0;
        self.focus = Focus::Conversation;
        if let Some(c) = self.contacts.get_mut(&peer) {
            c.unread = 0;
        }
        self.open = Some(peer.clone());
        vec![Effect::LoadHistory(peer.clone()), Effect::MarkRead(peer)]
    }

    fn on_contacts_key(&mut self, k: KeyEvent) -> Vec<Effect> {
        if !matches!(k.code, KeyCode::Char('x') | KeyCode::Delete) {
            self.confirm_remove = None;
        }
        match k.code {
            KeyCode::Char('q') => return vec![Effect::Quit],
            KeyCode::Char('?') => self.overlay = Some(Overlay::Help),
            KeyCode::Char('/') => self.overlay = Some(Overlay::Search(SearchBox::default())),
            KeyCode::Char('p') => {
                let cur = Presence::parse(&self.status.presence);
                let selected = Presence::CHOICES
                    .iter()
                    .position(|p| *p == cur)
                    .unwrap_or(0);
                self.overlay = Some(Overlay::Presence { selected });
            }
            KeyCode::Char('s') => self.overlay = Some(Overlay::Settings { selected: 0 }),
            KeyCode::Up | KeyCode::Char('k') => self.move_selection(-1),
            KeyCode::Down | KeyCode::Char('j') => self.move_selection(1),
            KeyCode::Home => self.selected = self.rows().first().map(|c| c.name.clone()),
            KeyCode::End => self.selected = self.rows().last().map(|c| c.name.clone()),
            KeyCode::Tab | KeyCode::Right if self.open.is_some() => {
                self.focus = Focus::Conversation
            }
            KeyCode::Enter => {
                if let Some(c) = self.selected_contact() {
                    let name = c.name.clone();
                    return self.open_conversation(name);
                }
            }
            KeyCode::Char(ch @ ('a' | 'd' | 'b')) => {
                let Some(c) = self.selected_contact() else {
                    return Vec::new();
                };
                let (name, state) = (c.name.clone(), c.state);
                let action = match ch {
                    'a' if state == ContactState::Incoming => "accept",
                    'd' if state == ContactState::Incoming => "decline",
                    'b' if state != ContactState::Blocked => "block",
                    'a' | 'd' => {
                        self.notify(format!("{name} has not sent you a request"), true);
                        return Vec::new();
                    }
                    _ => {
                        self.notify(format!("{name} is blocked already (x unblocks)"), true);
                        return Vec::new();
                    }
                };
                return vec![Effect::ContactReply { user: name, action }];
            }
            KeyCode::Char('x') | KeyCode::Delete => {
                let Some(c) = self.selected_contact() else {
                    return Vec::new();
                };
                let name = c.name.clone();
                // Removing is not undone by a key: ask for a second press.
                if self.confirm_remove.as_deref() == Some(name.as_str()) {
                    self.confirm_remove = None;
                    return vec![Effect::ContactRemove(name)];
                }
                let what = match c.state {
                    ContactState::Blocked => "unblock",
                    ContactState::Requested => "withdraw your request to",
                    _ => "remove",
                };
                self.notify(format!("press x again to {what} {name}"), false);
                self.confirm_remove = Some(name);
                return Vec::new();
            }
            KeyCode::Char('c') => {
                if let Some(c) = self.selected_contact() {
                    if c.state != ContactState::Accepted {
                        let t = format!("{} is not a contact yet", c.name);
                        self.notify(t, true);
                    } else if self.call != Call::Idle {
                        self.notify("already in a call: h hangs up", true);
                    } else {
                        let peer = c.name.clone();
                        self.last_call = None;
                        self.call = Call::Placing {
                            peer: peer.clone(),
                            since: self.now,
                            cancel: false,
                        };
                        return vec![Effect::CallStart(peer)];
                    }
                }
            }
            _ => {}
        }
        Vec::new()
    }

    fn on_conversation_key(&mut self, k: KeyEvent) -> Vec<Effect> {
        match k.code {
            KeyCode::Tab | KeyCode::Esc => self.focus = Focus::Contacts,
            KeyCode::PageUp => self.scroll = self.scroll.saturating_add(10),
            KeyCode::PageDown => self.scroll = self.scroll.saturating_sub(10),
            KeyCode::Up if k.modifiers.contains(KeyModifiers::SHIFT) => {
                self.scroll = self.scroll.saturating_add(1)
            }
            KeyCode::Down if k.modifiers.contains(KeyModifiers::SHIFT) => {
                self.scroll = self.scroll.saturating_sub(1)
            }
            KeyCode::Backspace => {
                self.input.pop();
            }
            KeyCode::Enter => return self.send_input(),
            KeyCode::Char(ch) if !k.modifiers.contains(KeyModifiers::CONTROL) => {
                push_limited(&mut self.input, ch, MAX_INPUT_CHARS)
            }
            KeyCode::Char('u') => self.input.clear(),
            _ => {}
        }
        Vec::new()
    }

    fn send_input(&mut self) -> Vec<Effect> {
        let text = self.input.trim().to_string();
        let Some(peer) = self.open.clone() else {
            return Vec::new();
        };
        if text.is_empty() {
            return Vec::new();
        }
        let state = self.contacts.get(&peer).map(|c| c.state);
        if state != Some(ContactState::Accepted) {
            self.notify(
                format!("{peer} is not a contact: messages are refused"),
                true,
            );
            return Vec::new();
        }
        self.input.clear();
        self.scroll = 0;
        let local_id = self.next_local_id;
        self.next_local_id += 1;
        let me = self.status.user.clone();
        self.push_message(
            &peer,
            Message {
                from: me,
                to: peer.clone(),
                text: text.clone(),
                time: self.now,
                delivery: Delivery::Sending,
                msg_id: None,
                local_id: Some(local_id),
            },
        );
        vec![Effect::Send {
            local_id,
            to: peer,
            text,
        }]
    }

    fn on_overlay_key(&mut self, k: KeyEvent) -> Vec<Effect> {
        let Some(ov) = self.overlay.as_mut() else {
            return Vec::new();
        };
        match ov {
            Overlay::Help => {
                self.overlay = None;
            }
            Overlay::Search(sb) => match k.code {
                KeyCode::Esc => self.overlay = None,
                KeyCode::Up => sb.selected = sb.selected.saturating_sub(1),
                KeyCode::Down => {
                    sb.selected = (sb.selected + 1).min(sb.results.len().saturating_sub(1))
                }
                KeyCode::Backspace => {
                    sb.query.pop();
                }
                KeyCode::Enter => {
                    let q = sb.query.trim().to_string();
                    if sb.searched.as_deref() != Some(q.as_str()) {
                        if q.is_empty() {
                            return Vec::new();
                        }
                        return vec![Effect::Search(q)];
                    }
                    if let Some(user) = sb.results.get(sb.selected).cloned() {
                        if user == self.status.user {
                            self.notify("that is you", true);
                            return Vec::new();
                        }
                        let state = self.contacts.get(&user).map(|c| c.state);
                        return match state {
                            Some(ContactState::Incoming) => {
                                self.overlay = None;
                                vec![Effect::ContactReply {
                                    user,
                                    action: "accept",
                                }]
                            }
                            Some(ContactState::Accepted) => {
                                self.overlay = None;
                                self.selected = Some(user.clone());
                                self.open_conversation(user)
                            }
                            _ => {
                                self.overlay = None;
                                vec![Effect::ContactAdd(user)]
                            }
                        };
                    }
                }
                // Usernames are at most 32 characters.
                KeyCode::Char(ch) => push_limited(&mut sb.query, ch, 32),
                _ => {}
            },
            Overlay::Presence { selected } => match k.code {
                KeyCode::Esc | KeyCode::Char('q') => self.overlay = None,
                KeyCode::Up | KeyCode::Char('k') => *selected = selected.saturating_sub(1),
                KeyCode::Down | KeyCode::Char('j') => {
                    *selected = (*selected + 1).min(Presence::CHOICES.len() - 1)
                }
                KeyCode::Enter => {
                    let p = Presence::CHOICES
                        .get(*selected)
                        .copied()
                        .unwrap_or(Presence::Online);
                    self.overlay = None;
                    return vec![Effect::SetPresence(p.as_str())];
                }
                _ => {}
            },
            Overlay::Settings { selected } => match k.code {
                KeyCode::Esc | KeyCode::Char('q') => self.overlay = None,
                KeyCode::Up | KeyCode::Char('k') => *selected = selected.saturating_sub(1),
                KeyCode::Down | KeyCode::Char('j') => {
                    *selected = (*selected + 1).min(SETTINGS_ROWS - 1)
                }
                KeyCode::Enter | KeyCode::Char(' ') => match *selected {
                    0 => return vec![Effect::SetRelayOnly(!self.status.relay_only)],
                    1 => {
                        let to = if self.status.call_policy == "anyone" {
                            "contacts"
                        } else {
                            "anyone"
                        };
                        return vec![Effect::SetCallPolicy(to)];
                    }
                    _ => self.notify(
                        "display names are not supported by the network yet: contacts see your username",
                        true,
                    ),
                },
                _ => {}
            },
        }
        Vec::new()
    }

    fn on_call_key(&mut self, k: KeyEvent) -> Option<Vec<Effect>> {
        // A ringing call takes every key until it is answered.
        if let Call::Incoming { call_id, peer, .. } = &self.call {
            let (call_id, peer) = (*call_id, peer.clone());
            return Some(match k.code {
                KeyCode::Char('a') | KeyCode::Enter => {
                    self.call = Call::Connecting {
                        call_id,
                        peer,
                        since: self.now,
                    };
                    vec![Effect::CallAccept(call_id)]
                }
                KeyCode::Char('d') | KeyCode::Esc => {
                    self.call = Call::Idle;
                    self.notify(format!("declined the call from {peer}"), false);
                    vec![Effect::CallDecline(call_id)]
                }
                _ => Vec::new(),
            });
        }
        if k.code != KeyCode::Char('h') || self.focus != Focus::Contacts || self.overlay.is_some() {
            return None;
        }
        match &mut self.call {
            Call::Idle | Call::Incoming { .. } => None,
            Call::Placing { cancel, .. } => {
                // No id yet: hang up as soon as the agent gives one.
                *cancel = true;
                self.notify("hanging up…", false);
                Some(Vec::new())
            }
            other => other.id().map(|id| vec![Effect::CallHangup(id)]),
        }
    }

    fn on_login_key(&mut self, k: KeyEvent) -> Vec<Effect> {
        let Screen::Login(f) = &mut self.screen else {
            return Vec::new();
        };
        if f.busy {
            return Vec::new();
        }
        match k.code {
            KeyCode::Esc => return vec![Effect::Quit],
            KeyCode::Tab | KeyCode::Down => f.field = (f.field + 1) % 4,
            KeyCode::BackTab | KeyCode::Up => f.field = (f.field + 3) % 4,
            KeyCode::Backspace => {
                match f.field {
                    0 => f.user.pop(),
                    1 => f.server.pop(),
                    2 => f.password.pop(),
                    _ => None,
                };
            }
            KeyCode::Char(' ') if f.field == 3 => f.register = !f.register,
            KeyCode::Left | KeyCode::Right if f.field == 3 => f.register = !f.register,
            KeyCode::Char(ch) => {
                let field = match f.field {
                    0 => &mut f.user,
                    1 => &mut f.server,
                    2 => &mut f.password,
                    _ => return Vec::new(),
                };
                if field.chars().count() < 256 {
                    field.push(ch);
                }
            }
            KeyCode::Enter => {
                if f.field < 3 {
                    f.field += 1;
                    return Vec::new();
                }
                let missing = [
                    (f.user.trim().is_empty(), "a username"),
                    (
                        f.server.trim().is_empty(),
                        "the supernode's bootstrap entry",
                    ),
                    (f.password.is_empty(), "a password"),
                ]
                .into_iter()
                .find(|(m, _)| *m);
                if let Some((_, what)) = missing {
                    f.error = Some(format!("enter {what}"));
                    return Vec::new();
                }
                f.busy = true;
                f.error = None;
                return vec![Effect::Login {
                    user: f.user.trim().to_string(),
                    server: f.server.trim().to_string(),
                    password: f.password.clone(),
                    register: f.register,
                }];
            }
            _ => {}
        }
        Vec::new()
    }
}

/// Text from other users as it may be shown: control characters (other than line breaks)
/// and the bidirectional overrides that could disguise a message become `�`.
pub fn sanitize(text: &str) -> String {
    text.chars()
        .map(|c| match c {
            '\n' => c,
            '\t' => ' ',
            c if c.is_control() => '\u{fffd}',
            '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' => '\u{fffd}',
            c => c,
        })
        .collect()
}

/// Appends `ch` unless `s` has `max` characters already.
fn push_limited(s: &mut String, ch: char, max: usize) {
    if s.chars().count() < max {
        s.push(ch);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn key(c: KeyCode) -> Event {
        Event::Key(KeyEvent::new(c, KeyModifiers::NONE))
    }

    fn typed(app: &mut App, s: &str) {
        for ch in s.chars() {
            app.update(key(KeyCode::Char(ch)));
        }
    }

    fn record(from: &str, to: &str, text: &str, via: &str, id: u64) -> MessageRecord {
        MessageRecord {
            from: from.into(),
            to: to.into(),
            text: text.into(),
            time: 1_000 + id,
            via: via.into(),
            msg_id: id,
        }
    }

    /// Alice, attached, with bob as an online contact.
    fn alice() -> App {
        let mut app = App::new(1_000, true, None);
        app.update(Event::Agent(AgentEvent::Attached));
        app.update(Event::Agent(AgentEvent::Status(Status {
            online: true,
            user: "alice".into(),
            supernode: "127.0.0.1:7000".into(),
            presence: "online".into(),
            ..Status::default()
        })));
        app.update(Event::Agent(AgentEvent::Contacts(vec![(
            "bob".into(),
            ContactState::Accepted,
            Presence::Online,
        )])));
        app
    }

    #[test]
    fn enter_opens_the_conversation_and_marks_it_read() {
        let mut app = alice();
        assert_eq!(app.selected.as_deref(), Some("bob"));
        let eff = app.update(key(KeyCode::Enter));
        assert_eq!(
            eff,
            vec![
                Effect::LoadHistory("bob".into()),
                Effect::MarkRead("bob".into())
            ]
        );
        assert_eq!(app.focus, Focus::Conversation);
        assert_eq!(app.open.as_deref(), Some("bob"));
    }

    #[test]
    fn typing_and_enter_sends_and_the_answer_sets_the_delivery_state() {
        let mut app = alice();
        app.update(key(KeyCode::Enter));
        app.update(Event::Agent(AgentEvent::History {
            peer: "bob".into(),
            messages: vec![],
        }));
        typed(&mut app, "hi q");
        let eff = app.update(key(KeyCode::Enter));
        assert_eq!(
            eff,
            vec![Effect::Send {
                local_id: 1,
                to: "bob".into(),
                text: "hi q".into()
            }]
        );
        assert!(app.input.is_empty());
        assert_eq!(app.messages()[0].delivery, Delivery::Sending);
        app.update(Event::Agent(AgentEvent::SendResult {
            local_id: 1,
            result: Ok(("offline".into(), 77, 2_000)),
        }));
        assert_eq!(app.messages()[0].delivery, Delivery::Queued);
        // The agent's `sent` event for the same message adds nothing.
        let mut r = record("alice", "bob", "hi q", "offline", 77);
        r.time = 2_000;
        app.update(Event::Agent(AgentEvent::Sent(r)));
        assert_eq!(app.messages().len(), 1);
    }

    #[test]
    fn the_sent_event_may_come_before_the_answer() {
        let mut app = alice();
        app.update(key(KeyCode::Enter));
        typed(&mut app, "yo");
        app.update(key(KeyCode::Enter));
        app.update(Event::Agent(AgentEvent::Sent(record(
            "alice", "bob", "yo", "direct", 5,
        ))));
        app.update(Event::Agent(AgentEvent::SendResult {
            local_id: 1,
            result: Ok(("direct".into(), 5, 1_005)),
        }));
        assert_eq!(app.messages().len(), 1);
        assert_eq!(app.messages()[0].delivery, Delivery::Direct);
    }

    #[test]
    fn a_failed_send_says_why() {
        let mut app = alice();
        app.update(key(KeyCode::Enter));
        typed(&mut app, "x");
        app.update(key(KeyCode::Enter));
        app.update(Event::Agent(AgentEvent::SendResult {
            local_id: 1,
            result: Err("bob is not your contact".into()),
        }));
        assert_eq!(
            app.messages()[0].delivery,
            Delivery::Failed("bob is not your contact".into())
        );
        assert!(app.notice.as_ref().unwrap().error);
    }

    #[test]
    fn messages_to_other_conversations_count_as_unread() {
        let mut app = alice();
        app.update(Event::Agent(AgentEvent::Contacts(vec![
            ("bob".into(), ContactState::Accepted, Presence::Online),
            ("carol".into(), ContactState::Accepted, Presence::Away),
        ])));
        app.update(key(KeyCode::Enter)); // bob
        let eff = app.update(Event::Agent(AgentEvent::Received(record(
            "carol", "alice", "psst", "direct", 1,
        ))));
        assert!(eff.is_empty());
        assert_eq!(app.contacts["carol"].unread, 1);
        // While reading bob, his messages are read at once.
        let eff = app.update(Event::Agent(AgentEvent::Received(record(
            "bob", "alice", "hey", "direct", 1,
        ))));
        assert_eq!(eff, vec![Effect::MarkRead("bob".into())]);
        assert_eq!(app.contacts["bob"].unread, 0);
        assert_eq!(app.messages().len(), 1);
        // A duplicate delivery is shown once.
        app.update(Event::Agent(AgentEvent::Received(record(
            "bob", "alice", "hey", "direct", 1,
        ))));
        assert_eq!(app.messages().len(), 1);
    }

    #[test]
    fn q_quits_from_the_contacts_pane_but_types_in_the_input() {
        let mut app = alice();
        app.update(key(KeyCode::Enter));
        assert!(app.update(key(KeyCode::Char('q'))).is_empty());
        assert_eq!(app.input, "q");
        app.update(key(KeyCode::Tab));
        assert_eq!(app.focus, Focus::Contacts);
        assert_eq!(app.update(key(KeyCode::Char('q'))), vec![Effect::Quit]);
    }

    #[test]
    fn alt_key_in_the_input_reads_as_escape_then_key() {
        let mut app = alice();
        app.update(key(KeyCode::Enter));
        let eff = app.update(Event::Key(KeyEvent::new(
            KeyCode::Char('?'),
            KeyModifiers::ALT,
        )));
        assert!(eff.is_empty());
        assert!(app.input.is_empty());
        assert_eq!(app.focus, Focus::Contacts);
        assert_eq!(app.overlay, Some(Overlay::Help));
    }

    #[test]
    fn requests_are_answered_from_the_list() {
        let mut app = alice();
        app.update(Event::Agent(AgentEvent::Contact {
            user: "dave".into(),
            state: ContactState::Incoming,
            note: "from the conference".into(),
        }));
        // Requests sort first.
        assert_eq!(app.rows()[0].name, "dave");
        app.update(key(KeyCode::Home));
        assert_eq!(
            app.update(key(KeyCode::Char('a'))),
            vec![Effect::ContactReply {
                user: "dave".into(),
                action: "accept"
            }]
        );
        // Accept on an accepted contact is refused with a reason.
        app.update(key(KeyCode::Down));
        assert!(app.update(key(KeyCode::Char('a'))).is_empty());
        assert!(app.notice.as_ref().unwrap().error);
    }

    #[test]
    fn text_from_others_cannot_carry_terminal_controls() {
        assert_eq!(sanitize("a\x1b[2Jb\r\tc\nd"), "a\u{fffd}[2Jb\u{fffd} c\nd");
        assert_eq!(sanitize("x\u{202e}gnp.exe"), "x\u{fffd}gnp.exe");
        let mut app = alice();
        app.update(key(KeyCode::Enter));
        app.update(Event::Agent(AgentEvent::Received(record(
            "bob",
            "alice",
            "\x1b]0;pwned\x07",
            "direct",
            1,
        ))));
        assert!(!app.messages()[0].text.chars().any(|c| c.is_control()));
    }

    #[test]
    fn events_without_a_message_id_are_never_taken_for_duplicates() {
        // An agent from before message ids were in events reports none (read as 0).
        let mut app = alice();
        app.update(key(KeyCode::Enter));
        for text in ["one", "two"] {
            app.update(Event::Agent(AgentEvent::Received(record(
                "bob", "alice", text, "direct", 0,
            ))));
        }
        assert_eq!(app.messages().len(), 2);
    }

    #[test]
    fn removing_a_contact_takes_a_second_press() {
        let mut app = alice();
        assert!(app.update(key(KeyCode::Char('x'))).is_empty());
        assert!(app.notice.as_ref().unwrap().text.contains("press x again"));
        // Any other key cancels.
        app.update(key(KeyCode::Down));
        assert!(app.update(key(KeyCode::Char('x'))).is_empty());
        assert_eq!(
            app.update(key(KeyCode::Char('x'))),
            vec![Effect::ContactRemove("bob".into())]
        );
    }

    #[test]
    fn scrolled_back_the_view_keeps_its_place_as_messages_arrive() {
        let mut app = alice();
        app.update(key(KeyCode::Enter));
        app.update(key(KeyCode::PageUp));
        assert_eq!(app.scroll, 10);
        app.update(Event::Agent(AgentEvent::Received(record(
            "bob", "alice", "new", "direct", 1,
        ))));
        assert_eq!(app.scroll, 11);
        app.update(key(KeyCode::PageDown));
        app.update(key(KeyCode::PageDown));
        assert_eq!(app.scroll, 0);
        // Sending jumps back to the newest message.
        app.update(key(KeyCode::PageUp));
        typed(&mut app, "x");
        app.update(key(KeyCode::Enter));
        assert_eq!(app.scroll, 0);
    }

    #[test]
    fn search_then_enter_sends_a_request() {
        let mut app = alice();
        app.update(key(KeyCode::Char('/')));
        typed(&mut app, "car");
        assert_eq!(
            app.update(key(KeyCode::Enter)),
            vec![Effect::Search("car".into())]
        );
        app.update(Event::Agent(AgentEvent::SearchResults {
            query: "car".into(),
            users: vec!["carl".into(), "carol".into()],
        }));
        app.update(key(KeyCode::Down));
        assert_eq!(
            app.update(key(KeyCode::Enter)),
            vec![Effect::ContactAdd("carol".into())]
        );
        assert!(app.overlay.is_none());
    }

    #[test]
    fn presence_selector_sets_the_chosen_presence() {
        let mut app = alice();
        app.update(key(KeyCode::Char('p')));
        assert_eq!(app.overlay, Some(Overlay::Presence { selected: 0 }));
        app.update(key(KeyCode::Down));
        assert_eq!(
            app.update(key(KeyCode::Enter)),
            vec![Effect::SetPresence("away")]
        );
    }

    #[test]
    fn offline_time_is_tracked_until_back_online() {
        let mut app = alice();
        app.update(Event::Tick(5_000));
        app.update(Event::Agent(AgentEvent::Offline {
            reason: "supernode unreachable".into(),
        }));
        assert_eq!(app.offline_since, Some(5_000));
        app.update(Event::Tick(9_000));
        app.update(Event::Agent(AgentEvent::Offline {
            reason: "again".into(),
        }));
        assert_eq!(app.offline_since, Some(5_000));
        app.update(Event::Agent(AgentEvent::Online));
        assert_eq!(app.offline_since, None);
        assert!(app.status.online);
    }

    #[test]
    fn settings_toggle_relay_only_and_say_what_is_not_supported() {
        let mut app = alice();
        app.update(key(KeyCode::Char('s')));
        assert_eq!(
            app.update(key(KeyCode::Enter)),
            vec![Effect::SetRelayOnly(true)]
        );
        app.update(key(KeyCode::Down));
        app.update(key(KeyCode::Down));
        app.update(key(KeyCode::Enter));
        assert!(app.notice.as_ref().unwrap().text.contains("not supported"));
    }

    fn update(call_id: u64, peer: &str, outgoing: bool, phase: CallPhase) -> Event {
        Event::Agent(AgentEvent::Call(CallEvent::Update(CallUpdate {
            call_id,
            peer: peer.into(),
            outgoing,
            phase,
            path: Some(CallPath::Direct),
            end_reason: (phase == CallPhase::Ended).then(|| "hung up".into()),
        })))
    }

    #[test]
    fn a_ringing_call_takes_the_keys_and_accept_answers_it() {
        let mut app = alice();
        app.update(update(7, "bob", false, CallPhase::Incoming));
        assert_eq!(app.update(key(KeyCode::Char('q'))), vec![]);
        assert_eq!(
            app.update(key(KeyCode::Char('a'))),
            vec![Effect::CallAccept(7)]
        );
        assert!(matches!(app.call, Call::Connecting { call_id: 7, .. }));
        app.update(update(7, "bob", false, CallPhase::Active));
        assert!(matches!(
            app.call,
            Call::Active {
                call_id: 7,
                path: Some(CallPath::Direct),
                ..
            }
        ));
        // Stats for another call are not this call's.
        let stats = CallStats {
            rtt_ms: Some(12.0),
            ..CallStats::default()
        };
        app.update(Event::Agent(AgentEvent::Call(CallEvent::Stats {
            call_id: 8,
            stats: stats.clone(),
        })));
        assert!(matches!(&app.call, Call::Active { stats: None, .. }));
        app.update(Event::Agent(AgentEvent::Call(CallEvent::Stats {
            call_id: 7,
            stats: stats.clone(),
        })));
        assert!(matches!(&app.call, Call::Active { stats: Some(s), .. } if *s == stats));
        // h hangs up from the contact list.
        assert_eq!(
            app.update(key(KeyCode::Char('h'))),
            vec![Effect::CallHangup(7)]
        );
        app.update(Event::Tick(13_000));
        app.update(update(7, "bob", false, CallPhase::Ended));
        assert_eq!(app.call, Call::Idle);
        let ended = app.last_call.clone().unwrap();
        assert_eq!(
            (ended.reason.as_str(), ended.duration_s),
            ("hung up", Some(12))
        );
        // The summary goes after a while.
        app.update(Event::Tick(13_000 + ENDED_SHOWN_MS));
        assert_eq!(app.last_call, None);
    }

    #[test]
    fn declining_closes_the_popup_at_once_and_the_end_changes_nothing() {
        let mut app = alice();
        app.update(update(3, "bob", false, CallPhase::Incoming));
        assert_eq!(app.update(key(KeyCode::Esc)), vec![Effect::CallDecline(3)]);
        assert_eq!(app.call, Call::Idle);
        app.update(update(3, "bob", false, CallPhase::Ended));
        assert_eq!(app.call, Call::Idle);
        assert_eq!(app.last_call, None);
    }

    #[test]
    fn c_calls_the_contact_and_the_agent_answer_gives_the_call_its_id() {
        let mut app = alice();
        assert_eq!(
            app.update(key(KeyCode::Char('c'))),
            vec![Effect::CallStart("bob".into())]
        );
        assert!(matches!(app.call, Call::Placing { .. }));
        // A second call is refused while one is under way.
        assert!(app.update(key(KeyCode::Char('c'))).is_empty());
        app.update(Event::Agent(AgentEvent::Call(CallEvent::Placed {
            peer: "bob".into(),
            result: Ok(4),
        })));
        assert!(matches!(app.call, Call::Outgoing { call_id: 4, .. }));
        // The ringing event after the answer keeps the call as it is.
        app.update(update(4, "bob", true, CallPhase::Ringing));
        assert!(matches!(app.call, Call::Outgoing { call_id: 4, .. }));
        app.update(update(4, "bob", true, CallPhase::Ended));
        assert_eq!(app.call, Call::Idle);
        assert_eq!(app.last_call.as_ref().unwrap().duration_s, None);
    }

    #[test]
    fn a_call_the_agent_refuses_says_why() {
        let mut app = alice();
        app.update(key(KeyCode::Char('c')));
        app.update(Event::Agent(AgentEvent::Call(CallEvent::Placed {
            peer: "bob".into(),
            result: Err("bob is offline".into()),
        })));
        assert_eq!(app.call, Call::Idle);
        let n = app.notice.as_ref().unwrap();
        assert!(n.error && n.text.contains("bob is offline"), "{n:?}");
    }

    #[test]
    fn hanging_up_before_the_call_has_an_id_hangs_up_once_it_has_one() {
        let mut app = alice();
        app.update(key(KeyCode::Char('c')));
        assert!(app.update(key(KeyCode::Char('h'))).is_empty());
        // The ringing event may come before the agent's answer.
        assert_eq!(
            app.update(update(9, "bob", true, CallPhase::Ringing)),
            vec![Effect::CallHangup(9)]
        );
        let mut app = alice();
        app.update(key(KeyCode::Char('c')));
        app.update(key(KeyCode::Char('h')));
        assert_eq!(
            app.update(Event::Agent(AgentEvent::Call(CallEvent::Placed {
                peer: "bob".into(),
                result: Ok(9),
            }))),
            vec![Effect::CallHangup(9)]
        );
    }

    #[test]
    fn a_call_ends_when_the_agent_goes_away() {
        let mut app = alice();
        app.update(update(2, "bob", true, CallPhase::Active));
        app.update(Event::Tick(6_000));
        app.update(Event::Agent(AgentEvent::Lost {
            reason: "the agent stopped".into(),
        }));
        assert_eq!(app.call, Call::Idle);
        assert_eq!(app.last_call.as_ref().unwrap().duration_s, Some(5));
    }

    #[test]
    fn h_types_in_the_input_line_during_a_call() {
        let mut app = alice();
        app.update(update(2, "bob", true, CallPhase::Active));
        app.update(key(KeyCode::Enter));
        assert!(app.update(key(KeyCode::Char('h'))).is_empty());
        assert_eq!(app.input, "h");
    }

    #[test]
    fn the_settings_row_sets_who_may_call() {
        let mut app = alice();
        app.update(key(KeyCode::Char('s')));
        app.update(key(KeyCode::Down));
        assert_eq!(
            app.update(key(KeyCode::Enter)),
            vec![Effect::SetCallPolicy("anyone")]
        );
        app.update(Event::Agent(AgentEvent::CallPolicy("anyone".into())));
        assert_eq!(
            app.update(key(KeyCode::Enter)),
            vec![Effect::SetCallPolicy("contacts")]
        );
    }

    #[test]
    fn login_form_asks_for_every_field_before_submitting() {
        let mut app = App::new(0, false, Some("h:1#k".into()));
        typed(&mut app, "alice");
        app.update(key(KeyCode::Enter));
        app.update(key(KeyCode::Enter));
        app.update(key(KeyCode::Enter));
        assert!(app.update(key(KeyCode::Enter)).is_empty());
        let Screen::Login(f) = &app.screen else {
            panic!("login form expected")
        };
        assert_eq!(f.error.as_deref(), Some("enter a password"));
        app.update(key(KeyCode::Up));
        typed(&mut app, "pw");
        app.update(key(KeyCode::Down));
        assert_eq!(
            app.update(key(KeyCode::Enter)),
            vec![Effect::Login {
                user: "alice".into(),
                server: "h:1#k".into(),
                password: "pw".into(),
                register: true
            }]
        );
        app.update(Event::Agent(AgentEvent::LoginResult(Ok("alice".into()))));
        assert_eq!(app.screen, Screen::Main);
    }

    #[test]
    fn loaded_conversations_stay_bounded() {
        let mut app = alice();
        app.update(key(KeyCode::Enter));
        for i in 0..(MAX_LOADED_MESSAGES as u64 + 50) {
            app.update(Event::Agent(AgentEvent::Received(record(
                "bob", "alice", "m", "direct", i,
            ))));
        }
        assert_eq!(app.messages().len(), MAX_LOADED_MESSAGES);
    }
}
