//! The agent's control protocol: one JSON request per line on a Unix socket in the
//! profile dir, one JSON response line back.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A request to the agent.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ControlRequest {
    /// Online state and identity.
    Status,
    /// Stop the agent.
    Down,
    /// Connect now (taking the account back from another device if needed).
    Connect,
    /// Keep the connection open and stream events, one JSON object per line.
    Events,
    /// Contact request.
    ContactAdd {
        /// Whom.
        user: String,
        /// Note.
        note: String,
    },
    /// Accept, decline or block.
    ContactReply {
        /// Whom.
        user: String,
        /// `accept`, `decline` or `block`.
        action: String,
    },
    /// Remove a contact.
    ContactRemove {
        /// Whom.
        user: String,
    },
    /// Contact list.
    ContactList,
    /// Set presence.
    Presence {
        /// `online`, `away`, `busy` or `invisible`.
        presence: String,
    },
    /// Search users by prefix.
    Search {
        /// Prefix.
        prefix: String,
    },
    /// Send a message.
    MsgSend {
        /// Recipient.
        to: String,
        /// Text.
        text: String,
    },
    /// Call a user; answers with the call's report once it is over.
    Call {
        /// Callee.
        user: String,
        /// WAV to send.
        #[serde(default)]
        play: Option<std::path::PathBuf>,
        /// WAV to write with what is heard.
        #[serde(default)]
        record: Option<std::path::PathBuf>,
        /// Hang up after this many seconds (else at the end of `play`).
        #[serde(default)]
        duration_s: Option<f64>,
    },
    /// Wait for the next incoming call and accept or decline it; answers with the call's
    /// report once it is over (or at once when declined).
    CallsWait {
        /// Accept (else decline).
        accept: bool,
        /// WAV to send.
        #[serde(default)]
        play: Option<std::path::PathBuf>,
        /// WAV to write with what is heard.
        #[serde(default)]
        record: Option<std::path::PathBuf>,
        /// Hang up after this many seconds.
        #[serde(default)]
        duration_s: Option<f64>,
        /// Give up waiting for a call after this many seconds.
        #[serde(default)]
        timeout_s: Option<f64>,
    },
    /// Ring a user and answer with `{call_id}` at once, without waiting for the call to
    /// end (for apps: the call uses the sound card, or silence without the `audio`
    /// feature; its state comes on the `events` stream).
    CallStart {
        /// Callee.
        user: String,
    },
    /// Answer a ringing call without waiting for its end (the sound card, or silence
    /// without the `audio` feature; nothing recorded).
    CallAnswer {
        /// The call.
        call_id: u64,
        /// Accept (else decline).
        accept: bool,
    },
    /// Hang up (or cancel, or decline) a call.
    CallHangUp {
        /// The call.
        call_id: u64,
    },
    /// Calls not yet over.
    CallsList,
    /// Who may ring this user: `anyone` or `contacts`.
    CallPolicy {
        /// `anyone` or `contacts`.
        from: String,
    },
}

/// The agent's answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControlResponse {
    /// Success.
    pub ok: bool,
    /// One line saying what went wrong.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Result data.
    #[serde(default)]
    pub data: serde_json::Value,
}

impl ControlResponse {
    /// Success with data.
    pub fn ok(data: serde_json::Value) -> Self {
        ControlResponse {
            ok: true,
            error: None,
            data,
        }
    }
    /// Failure.
    pub fn err(msg: impl Into<String>) -> Self {
        ControlResponse {
            ok: false,
            error: Some(msg.into()),
            data: serde_json::Value::Null,
        }
    }
}

/// Why a control call failed before the agent answered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ControlError {
    /// No agent listening.
    #[error("the agent is not running for this profile: run `peerline up` first")]
    NotRunning,
    /// The agent answered with an error.
    #[error("{0}")]
    Refused(String),
    /// Talking to the agent failed.
    #[error("lost contact with the agent: {0}")]
    Io(#[from] std::io::Error),
    /// Garbled answer.
    #[error("the agent sent a malformed answer")]
    Malformed,
}

/// Sends one request to the agent listening at `socket` and returns its data.
pub fn call(
    socket: &Path,
    req: &ControlRequest,
    timeout: Duration,
) -> Result<serde_json::Value, ControlError> {
    let mut s = UnixStream::connect(socket).map_err(|_| ControlError::NotRunning)?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_string(req).map_err(|_| ControlError::Malformed)?;
    line.push('\n');
    s.write_all(line.as_bytes())?;
    let mut answer = String::new();
    BufReader::new(&s).read_line(&mut answer)?;
    let r: ControlResponse = serde_json::from_str(&answer).map_err(|_| ControlError::Malformed)?;
    if r.ok {
        Ok(r.data)
    } else {
        Err(ControlError::Refused(
            r.error.unwrap_or_else(|| "failed".into()),
        ))
    }
}
