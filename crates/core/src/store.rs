//! The ports the supernode core needs from durable storage and from the online directory.
//!
//! `Store` holds accounts, devices, contacts and offline messages. The embedded default
//! is SQLite (crate `peerline-store`); a PostgreSQL backend implements the same trait for a
//! fleet. Contact *rules* (who may request, accept, block) live in the core; the store
//! keeps rows and makes each call atomic.
//!
//! Every method that changes data returns only after the change is durably committed: the
//! supernode acknowledges an offline message to its sender on that basis.

use peerline_wire::msg::ContactState;
use peerline_wire::Username;

/// A storage failure (the backend's own error, flattened to text for the core).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// A unique key already exists (for example the username at registration).
    #[error("already exists")]
    Exists,
    /// The named row does not exist.
    #[error("not found")]
    NotFound,
    /// The backend failed (IO, corruption, connection). The operation had no effect.
    #[error("storage backend: {0}")]
    Backend(String),
}

/// An account row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Canonical username.
    pub username: Username,
    /// PHC string of the Argon2id password hash.
    pub password_hash: String,
    /// Creation time (unix seconds).
    pub created_at: u64,
}

/// A device row: the keys a certificate may bind for this account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Device {
    /// Owner.
    pub username: Username,
    /// Random device id.
    pub device_id: [u8; 16],
    /// X25519 static key (Noise); unique across all devices.
    pub noise_key: [u8; 32],
    /// Ed25519 verifying key.
    pub sign_key: [u8; 32],
    /// Revoked devices may not log in or renew.
    pub revoked: bool,
}

/// One directed contact row: what `owner` sees about `peer`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContactRow {
    /// The other user.
    pub peer: Username,
    /// Relationship as seen by the owner (never `ContactState::None`).
    pub state: ContactState,
    /// Note of a pending request.
    pub note: String,
}

/// A message for an offline recipient, as submitted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewMessage {
    /// Sender.
    pub from: Username,
    /// Recipient.
    pub to: Username,
    /// Sender-chosen id; `(from, msg_id)` is unique, which makes queueing idempotent.
    pub msg_id: u64,
    /// Sender's clock (unix ms).
    pub sent_at: u64,
    /// Text.
    pub text: String,
}

/// A queued message with its store id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Store-assigned id, increasing.
    pub id: u64,
    /// The message.
    pub msg: NewMessage,
}

/// Result of queueing an offline message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueOutcome {
    /// Committed under this id.
    Queued(u64),
    /// `(from, msg_id)` is already queued; nothing changed. Ids are remembered only while
    /// the message waits: once delivered and deleted, the same id could be queued again
    /// (the recipient's client deduplicates on `(from, msg_id)`).
    Duplicate(u64),
    /// The recipient already has `quota` messages waiting; nothing changed.
    MailboxFull,
}

/// Durable storage of accounts, devices, contacts and offline messages.
///
/// Usernames passed in are canonical. Every mutating call is atomic and durable on return.
pub trait Store: Send {
    /// Creates an account with its first device. `Err(Exists)` if the username is taken,
    /// in which case nothing is written.
    fn create_account(&mut self, account: &Account, device: &Device) -> Result<(), StoreError>;
    /// Looks up an account.
    fn account(&mut self, username: &Username) -> Result<Option<Account>, StoreError>;
    /// Adds a device to an existing account (`Err(NotFound)` if there is none;
    /// `Err(Exists)` if the Noise key is already enrolled).
    fn add_device(&mut self, device: &Device) -> Result<(), StoreError>;
    /// Finds the device that owns a Noise static key.
    fn device_by_noise_key(&mut self, noise_key: &[u8; 32]) -> Result<Option<Device>, StoreError>;
    /// Marks a device revoked (`Err(NotFound)` if unknown).
    fn revoke_device(&mut self, noise_key: &[u8; 32]) -> Result<(), StoreError>;
    /// Every device of an account, revoked ones included, ordered by Noise key (empty if
    /// the account does not exist).
    fn devices_of(&mut self, username: &Username) -> Result<Vec<Device>, StoreError>;
    /// Returns a fresh certificate serial, never returned before (survives restarts).
    fn next_serial(&mut self) -> Result<u64, StoreError>;
    /// Usernames starting with `prefix` (already lowercase), sorted, at most `limit`.
    fn search_prefix(&mut self, prefix: &str, limit: usize) -> Result<Vec<Username>, StoreError>;
    /// The row `owner -> peer`, if any.
    fn contact(
        &mut self,
        owner: &Username,
        peer: &Username,
    ) -> Result<Option<ContactRow>, StoreError>;
    /// Sets both directed rows between `a` and `b` in one transaction. `None` deletes a row.
    fn set_contact_pair(
        &mut self,
        a: &Username,
        a_row: Option<(ContactState, &str)>,
        b: &Username,
        b_row: Option<(ContactState, &str)>,
    ) -> Result<(), StoreError>;
    /// A page of `owner`'s rows sorted by peer name.
    fn contacts(
        &mut self,
        owner: &Username,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<ContactRow>, StoreError>;
    /// All peers `owner` has in state `Accepted` (for presence fan-out).
    fn accepted_contacts(&mut self, owner: &Username) -> Result<Vec<Username>, StoreError>;
    /// Queues a message unless the recipient already has `quota` waiting.
    fn queue_message(&mut self, msg: &NewMessage, quota: usize)
        -> Result<QueueOutcome, StoreError>;
    /// The oldest `limit` messages waiting for `to`, oldest first.
    fn pending_messages(
        &mut self,
        to: &Username,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError>;
    /// Deletes a delivered message; `Ok(false)` if it was not there (already deleted).
    fn delete_message(&mut self, to: &Username, id: u64) -> Result<bool, StoreError>;
}

/// Conversions every SQL backend of [`Store`] needs between its column types and the
/// trait's, with the same error for corrupt rows.
pub mod sql {
    use super::StoreError;

    /// A fixed-size key read back from the database.
    pub fn key<const N: usize>(what: &str, v: Vec<u8>) -> Result<[u8; N], StoreError> {
        let len = v.len();
        v.try_into().map_err(|_| {
            StoreError::Backend(format!(
                "database holds a {len}-byte {what}, expected {N} bytes"
            ))
        })
    }

    /// Store-assigned id or serial read back (always positive).
    pub fn positive(what: &str, v: i64) -> Result<u64, StoreError> {
        u64::try_from(v)
            .ok()
            .filter(|v| *v > 0)
            .ok_or_else(|| StoreError::Backend(format!("database holds invalid {what} {v}")))
    }

    /// A caller-chosen `u64` stored bit-for-bit in a signed 64-bit integer column.
    pub fn to_sql_u64(v: u64) -> i64 {
        v as i64
    }

    /// Inverse of [`to_sql_u64`].
    pub fn from_sql_u64(v: i64) -> u64 {
        v as u64
    }

    /// A count or limit for SQL (saturating: SQL has no unsigned integers).
    pub fn sql_count(n: usize) -> i64 {
        i64::try_from(n).unwrap_or(i64::MAX)
    }

    /// The smallest string greater than every string starting with `prefix`, or `None` if
    /// there is none (so the range is unbounded above). Compared in code point order, which
    /// is also UTF-8 byte order: SQLite's BINARY and PostgreSQL's "C" collation.
    pub fn prefix_successor(prefix: &str) -> Option<String> {
        let mut chars: Vec<char> = prefix.chars().collect();
        while let Some(last) = chars.pop() {
            let mut next = u32::from(last) + 1;
            if (0xD800..=0xDFFF).contains(&next) {
                next = 0xE000;
            }
            if let Some(c) = char::from_u32(next) {
                chars.push(c);
                return Some(chars.into_iter().collect());
            }
        }
        None
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn prefix_successor_bounds() {
            assert_eq!(prefix_successor("bo").as_deref(), Some("bp"));
            assert_eq!(prefix_successor("a_").as_deref(), Some("a`"));
            assert_eq!(prefix_successor("").as_deref(), None);
            assert_eq!(prefix_successor("a\u{10FFFF}").as_deref(), Some("b"));
            assert_eq!(prefix_successor("\u{D7FF}").as_deref(), Some("\u{E000}"));
        }
    }
}
