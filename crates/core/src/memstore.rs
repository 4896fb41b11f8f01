//! In-memory [`Store`] for tests and deterministic simulations.
//!
//! [`MemoryStore`] keeps every table in a `BTreeMap`, so iteration order (and therefore
//! every result) is deterministic. It follows the same semantics as the SQLite backend in
//! `peerline-store`; both are checked by [`crate::store_conformance::run_all`]:
//!
//! * message ids start at 1, increase and are never reused, even after deletion;
//! * queueing is idempotent on `(from, msg_id)`: a retry returns `Duplicate` with the
//!   original id (checked before the quota, so a retry is never answered `MailboxFull`);
//! * a recipient with `quota` messages waiting gets `MailboxFull` and nothing is written;
//! * unique keys report [`StoreError::Exists`], missing rows [`StoreError::NotFound`];
//! * lists come back sorted (usernames by name, messages oldest first).
//!
//! Nothing here is durable: "durable on return" holds only for the life of the value.

use std::collections::{BTreeMap, BTreeSet};
use std::ops::Bound;

use peerline_wire::msg::ContactState;
use peerline_wire::Username;

use crate::store::{
    Account, ContactRow, Device, NewMessage, QueueOutcome, Store, StoreError, StoredMessage,
};

/// A [`Store`] held entirely in memory.
#[derive(Debug, Default, Clone)]
pub struct MemoryStore {
    /// Accounts keyed by canonical username (a `String` so prefix ranges work).
    accounts: BTreeMap<String, Account>,
    /// Devices keyed by Noise static key.
    devices: BTreeMap<[u8; 32], Device>,
    /// Last certificate serial handed out (0 = none yet).
    last_serial: u64,
    /// Directed contact rows: owner -> peer -> (state, note). No empty inner maps.
    contacts: BTreeMap<Username, BTreeMap<Username, (ContactState, String)>>,
    /// Queued messages keyed by id.
    messages: BTreeMap<u64, NewMessage>,
    /// Recipient -> ids of its queued messages (oldest first). No empty sets.
    mailbox: BTreeMap<Username, BTreeSet<u64>>,
    /// `(sender, msg_id) -> id` for every queued message (idempotent queueing).
    by_sender: BTreeMap<(Username, u64), u64>,
    /// Last message id assigned (0 = none yet). Ids are never reused.
    last_message_id: u64,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of messages queued for `to`.
    fn mailbox_len(&self, to: &Username) -> usize {
        self.mailbox.get(to).map_or(0, BTreeSet::len)
    }

    /// `owner`'s contact rows, sorted by peer.
    fn rows_of<'a>(
        &'a self,
        owner: &Username,
    ) -> impl Iterator<Item = (&'a Username, &'a (ContactState, String))> + 'a {
        self.contacts.get(owner).into_iter().flat_map(|m| m.iter())
    }

    /// Writes (or deletes) one directed contact row. A `ContactState::None` row is a
    /// deletion: "no relationship" is never stored.
    fn put_contact(
        &mut self,
        owner: &Username,
        peer: &Username,
        row: Option<(ContactState, &str)>,
    ) {
        match row {
            Some((state, note)) if state != ContactState::None => {
                self.contacts
                    .entry(owner.clone())
                    .or_default()
                    .insert(peer.clone(), (state, note.to_string()));
            }
            _ => {
                if let Some(rows) = self.contacts.get_mut(owner) {
                    rows.remove(peer);
                    if rows.is_empty() {
                        self.contacts.remove(owner);
                    }
                }
            }
        }
    }
}

impl Store for MemoryStore {
    fn create_account(&mut self, account: &Account, device: &Device) -> Result<(), StoreError> {
        if device.username != account.username {
            return Err(StoreError::Backend(format!(
                "first device belongs to {} but the account is {}",
                device.username, account.username
            )));
        }
        if self.accounts.contains_key(account.username.as_str())
            || self.devices.contains_key(&device.noise_key)
        {
            return Err(StoreError::Exists);
        }
        self.accounts
            .insert(account.username.as_str().to_string(), account.clone());
        self.devices.insert(device.noise_key, device.clone());
        Ok(())
    }

    fn account(&mut self, username: &Username) -> Result<Option<Account>, StoreError> {
        Ok(self.accounts.get(username.as_str()).cloned())
    }

    fn add_device(&mut self, device: &Device) -> Result<(), StoreError> {
        if !self.accounts.contains_key(device.username.as_str()) {
            return Err(StoreError::NotFound);
        }
        if self.devices.contains_key(&device.noise_key) {
            return Err(StoreError::Exists);
        }
        self.devices.insert(device.noise_key, device.clone());
        Ok(())
    }

    fn device_by_noise_key(&mut self, noise_key: &[u8; 32]) -> Result<Option<Device>, StoreError> {
        Ok(self.devices.get(noise_key).cloned())
    }

    fn revoke_device(&mut self, noise_key: &[u8; 32]) -> Result<(), StoreError> {
        match self.devices.get_mut(noise_key) {
            Some(d) => {
                d.revoked = true;
                Ok(())
            }
            None => Err(StoreError::NotFound),
        }
    }

    fn devices_of(&mut self, username: &Username) -> Result<Vec<Device>, StoreError> {
        Ok(self
            .devices
            .values()
            .filter(|d| d.username == *username)
            .cloned()
            .collect())
    }

    fn next_serial(&mut self) -> Result<u64, StoreError> {
        let next = self
            .last_serial
            .checked_add(1)
            .ok_or_else(|| StoreError::Backend("certificate serials exhausted".to_string()))?;
        self.last_serial = next;
        Ok(next)
    }

    fn search_prefix(&mut self, prefix: &str, limit: usize) -> Result<Vec<Username>, StoreError> {
        Ok(self
            .accounts
            .range::<str, _>((Bound::Included(prefix), Bound::Unbounded))
            .take_while(|(name, _)| name.starts_with(prefix))
            .take(limit)
            .map(|(_, a)| a.username.clone())
            .collect())
    }

    fn contact(
        &mut self,
        owner: &Username,
        peer: &Username,
    ) -> Result<Option<ContactRow>, StoreError> {
        Ok(self
            .contacts
            .get(owner)
            .and_then(|rows| rows.get(peer))
            .map(|(state, note)| ContactRow {
                peer: peer.clone(),
                state: *state,
                note: note.clone(),
            }))
    }

    fn set_contact_pair(
        &mut self,
        a: &Username,
        a_row: Option<(ContactState, &str)>,
        b: &Username,
        b_row: Option<(ContactState, &str)>,
    ) -> Result<(), StoreError> {
        self.put_contact(a, b, a_row);
        self.put_contact(b, a, b_row);
        Ok(())
    }

    fn contacts(
        &mut self,
        owner: &Username,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<ContactRow>, StoreError> {
        Ok(self
            .rows_of(owner)
            .skip(offset)
            .take(limit)
            .map(|(peer, (state, note))| ContactRow {
                peer: peer.clone(),
                state: *state,
                note: note.clone(),
            })
            .collect())
    }

    fn accepted_contacts(&mut self, owner: &Username) -> Result<Vec<Username>, StoreError> {
        Ok(self
            .rows_of(owner)
            .filter(|(_, (state, _))| *state == ContactState::Accepted)
            .map(|(peer, _)| peer.clone())
            .collect())
    }

    fn queue_message(
        &mut self,
        msg: &NewMessage,
        quota: usize,
    ) -> Result<QueueOutcome, StoreError> {
        if let Some(id) = self.by_sender.get(&(msg.from.clone(), msg.msg_id)) {
            return Ok(QueueOutcome::Duplicate(*id));
        }
        if self.mailbox_len(&msg.to) >= quota {
            return Ok(QueueOutcome::MailboxFull);
        }
        let id = self
            .last_message_id
            .checked_add(1)
            .ok_or_else(|| StoreError::Backend("message ids exhausted".to_string()))?;
        self.last_message_id = id;
        self.messages.insert(id, msg.clone());
        self.mailbox.entry(msg.to.clone()).or_default().insert(id);
        self.by_sender.insert((msg.from.clone(), msg.msg_id), id);
        Ok(QueueOutcome::Queued(id))
    }

    fn pending_messages(
        &mut self,
        to: &Username,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        Ok(self
            .mailbox
            .get(to)
            .into_iter()
            .flat_map(|ids| ids.iter())
            .take(limit)
            .filter_map(|id| {
                self.messages.get(id).map(|msg| StoredMessage {
                    id: *id,
                    msg: msg.clone(),
                })
            })
            .collect())
    }

    fn delete_message(&mut self, to: &Username, id: u64) -> Result<bool, StoreError> {
        let Some(ids) = self.mailbox.get_mut(to) else {
            return Ok(false);
        };
        if !ids.remove(&id) {
            return Ok(false);
        }
        if ids.is_empty() {
            self.mailbox.remove(to);
        }
        if let Some(msg) = self.messages.remove(&id) {
            self.by_sender.remove(&(msg.from, msg.msg_id));
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store_conformance::run_all;

    #[test]
    fn memory_store_conforms() {
        run_all(&mut || Box::new(MemoryStore::new()))
    }
}
