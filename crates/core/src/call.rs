//! A call's state as one client sees it, and the timers that end stuck calls.
//!
//! Signalling (invite, ringing, accept, decline, cancel, hang-up) passes through the
//! supernode; media travels over the two users' peer session (direct, or relayed when no
//! direct path exists) as unreliable datagrams. The client core drives these records; the
//! media engine lives outside the core.

use std::time::{Duration, Instant};

use peerline_wire::Username;
use serde::Serialize;

use crate::client::Via;

/// How long a call rings before the caller gives up.
pub const RING_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an answered call may take to get a peer session.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A running call with no media from the other side for this long is over.
pub const MEDIA_TIMEOUT: Duration = Duration::from_secs(15);

/// Who rang.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// We called.
    Outgoing,
    /// We were called.
    Incoming,
}

/// Where a call stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CallState {
    /// Outgoing: the invite is on its way or the callee's device rings.
    Ringing,
    /// Incoming: our device rings; answer or decline.
    Incoming,
    /// Answered: the peer session is being set up.
    Connecting,
    /// Media flows over the peer session.
    Active,
    /// Over (see the reason).
    Ended,
}

impl CallState {
    /// Lowercase name.
    pub fn as_str(self) -> &'static str {
        match self {
            CallState::Ringing => "ringing",
            CallState::Incoming => "incoming",
            CallState::Connecting => "connecting",
            CallState::Active => "active",
            CallState::Ended => "ended",
        }
    }
}

/// What the user sees of a call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallInfo {
    /// The caller's id for the call.
    pub call_id: u64,
    /// The other party.
    pub peer: Username,
    /// Who rang.
    pub direction: Direction,
    /// Where it stands.
    pub state: CallState,
    /// The media path once active.
    #[serde(serialize_with = "via_name")]
    pub via: Option<Via>,
    /// From the invite (caller) or the answer (callee) to an active call, in ms.
    pub setup_ms: Option<u64>,
    /// Why it ended.
    pub end_reason: Option<String>,
}

fn via_name<S: serde::Serializer>(v: &Option<Via>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(v) => s.serialize_str(v.as_str()),
        None => s.serialize_none(),
    }
}

/// A call record inside the client.
#[derive(Debug, Clone)]
pub(crate) struct Call {
    pub info: CallInfo,
    /// When setup time starts counting.
    pub started: Instant,
    /// When the current state times out.
    pub deadline: Option<Instant>,
    /// Last media datagram from the peer (or when the call became active).
    pub last_media: Instant,
    /// The command waiting for the supernode's answer to our invite.
    pub invite: Option<u64>,
}

impl Call {
    pub fn new(
        call_id: u64,
        peer: Username,
        direction: Direction,
        now: Instant,
        invite: Option<u64>,
    ) -> Self {
        let state = match direction {
            Direction::Outgoing => CallState::Ringing,
            Direction::Incoming => CallState::Incoming,
        };
        Call {
            info: CallInfo {
                call_id,
                peer,
                direction,
                state,
                via: None,
                setup_ms: None,
                end_reason: None,
            },
            started: now,
            // The callee's side waits a little longer than the caller, who cancels.
            deadline: Some(
                now + match direction {
                    Direction::Outgoing => RING_TIMEOUT,
                    Direction::Incoming => RING_TIMEOUT + Duration::from_secs(5),
                },
            ),
            last_media: now,
            invite,
        }
    }

    /// Whether the call is not over.
    pub fn live(&self) -> bool {
        self.info.state != CallState::Ended
    }

    /// The peer session is up: the call is active on path `via`.
    pub fn activate(&mut self, now: Instant, via: Via) {
        if self.info.state != CallState::Active {
            self.info.setup_ms =
                Some(now.saturating_duration_since(self.started).as_millis() as u64);
            self.last_media = now;
        }
        self.info.state = CallState::Active;
        self.info.via = Some(via);
        self.deadline = None;
    }

    /// Over, for `reason`.
    pub fn end(&mut self, reason: &str) {
        self.info.state = CallState::Ended;
        self.info.end_reason = Some(reason.to_string());
        self.deadline = None;
    }

    /// When a timer of this call is next due.
    pub fn next_timer(&self) -> Option<Instant> {
        match self.info.state {
            CallState::Active => Some(self.last_media + MEDIA_TIMEOUT),
            CallState::Ended => None,
            _ => self.deadline,
        }
    }

    /// Whether the call timed out at `now`, and why.
    pub fn timed_out(&self, now: Instant) -> Option<&'static str> {
        match self.info.state {
            CallState::Active if now >= self.last_media + MEDIA_TIMEOUT => {
                Some("no audio from the other side for 15 s")
            }
            CallState::Ringing if self.deadline.is_some_and(|d| now >= d) => Some("no answer"),
            CallState::Incoming if self.deadline.is_some_and(|d| now >= d) => Some("missed"),
            CallState::Connecting if self.deadline.is_some_and(|d| now >= d) => {
                Some("could not reach the other side")
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bob() -> Username {
        Username::parse("bob").unwrap()
    }

    #[test]
    fn each_waiting_state_times_out_with_its_own_reason() {
        let t = Instant::now();
        let out = Call::new(1, bob(), Direction::Outgoing, t, None);
        assert_eq!(
            out.timed_out(t + RING_TIMEOUT - Duration::from_millis(1)),
            None
        );
        assert_eq!(out.timed_out(t + RING_TIMEOUT), Some("no answer"));
        let inc = Call::new(1, bob(), Direction::Incoming, t, None);
        assert_eq!(
            inc.timed_out(t + RING_TIMEOUT),
            None,
            "the caller cancels first"
        );
        assert_eq!(
            inc.timed_out(t + RING_TIMEOUT + Duration::from_secs(5)),
            Some("missed")
        );
        let mut c = Call::new(1, bob(), Direction::Outgoing, t, None);
        c.info.state = CallState::Connecting;
        c.deadline = Some(t + CONNECT_TIMEOUT);
        assert_eq!(
            c.timed_out(t + CONNECT_TIMEOUT),
            Some("could not reach the other side")
        );
    }

    #[test]
    fn an_active_call_ends_only_after_media_stops_and_reports_its_setup_time() {
        let t = Instant::now();
        let mut c = Call::new(1, bob(), Direction::Outgoing, t, None);
        c.activate(t + Duration::from_millis(420), Via::Direct);
        assert_eq!(c.info.setup_ms, Some(420));
        assert_eq!(c.info.via, Some(Via::Direct));
        assert_eq!(
            c.timed_out(t + Duration::from_secs(60)),
            Some("no audio from the other side for 15 s")
        );
        c.last_media = t + Duration::from_secs(59);
        assert_eq!(c.timed_out(t + Duration::from_secs(60)), None);
        // A later path change keeps the first setup time.
        c.activate(t + Duration::from_secs(61), Via::Relay);
        assert_eq!(c.info.setup_ms, Some(420));
        assert_eq!(c.info.via, Some(Via::Relay));
        c.end("hung up");
        assert!(!c.live());
        assert_eq!(c.next_timer(), None);
    }

    #[test]
    fn call_info_serialises_with_lowercase_names() {
        let mut c = Call::new(9, bob(), Direction::Incoming, Instant::now(), None);
        c.activate(Instant::now(), Via::Relay);
        let j = serde_json::to_value(&c.info).unwrap();
        assert_eq!(j["state"], "active");
        assert_eq!(j["direction"], "incoming");
        assert_eq!(j["via"], "relay");
        assert_eq!(j["peer"], "bob");
    }
}
