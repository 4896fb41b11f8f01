//! Storage operations the supernode core asks its glue to run, and the rules they apply.
//!
//! The supernode core never calls the [`Store`] itself: it emits an [`Op`] with a token,
//! the glue runs [`execute`] wherever blocking is acceptable (a storage thread, a
//! connection pool) and feeds the [`OpResult`] back. Each op is one domain transaction:
//! the contact rules (who may request, accept, block) and the offline-message rules
//! (contacts only, quota, idempotency) are applied here, against the injected store.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use peerline_wire::msg::{ContactAction, ContactState, ErrorCode, MIN_PASSWORD};
use peerline_wire::Username;
use rand_core::{CryptoRng, RngCore};

use crate::store::{
    Account, ContactRow, Device, NewMessage, QueueOutcome, Store, StoreError, StoredMessage,
};

/// A storage operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Create an account and its first device.
    Register {
        /// Wanted name.
        username: Username,
        /// Password to hash.
        password: String,
        /// Device Noise key.
        noise_key: [u8; 32],
        /// Device signing key.
        sign_key: [u8; 32],
        /// Random device id.
        device_id: [u8; 16],
        /// Unix seconds.
        now: u64,
    },
    /// Enrol a new device with the account password.
    Enroll {
        /// Account.
        username: Username,
        /// Password to verify.
        password: String,
        /// Device Noise key.
        noise_key: [u8; 32],
        /// Device signing key.
        sign_key: [u8; 32],
        /// Random device id.
        device_id: [u8; 16],
    },
    /// At login: refuse a device marked revoked (an unknown device passes: its
    /// certificate is the authority's word).
    CheckDevice {
        /// Device Noise key.
        noise_key: [u8; 32],
    },
    /// Re-issue for an enrolled, unrevoked device.
    Renew {
        /// Device Noise key.
        noise_key: [u8; 32],
    },
    /// `from` asks `to` to become contacts.
    ContactAdd {
        /// Requester.
        from: Username,
        /// Requested.
        to: Username,
        /// Note.
        note: String,
    },
    /// `owner` answers `peer`'s request (or blocks `peer`).
    ContactReply {
        /// Who answers.
        owner: Username,
        /// Who asked.
        peer: Username,
        /// The answer.
        action: ContactAction,
    },
    /// `owner` removes `peer` (or unblocks, or withdraws a request).
    ContactRemove {
        /// Who removes.
        owner: Username,
        /// Whom.
        peer: Username,
    },
    /// A page of `owner`'s contacts.
    ContactList {
        /// Whose.
        owner: Username,
        /// Skip.
        offset: usize,
        /// Page size.
        limit: usize,
    },
    /// What a login needs, in one operation: whether the device (by its Noise key) was
    /// revoked, `user`'s mutual contacts, and the first `limit` offline messages.
    Login {
        /// Device Noise key.
        noise_key: [u8; 32],
        /// Who logged in.
        user: Username,
        /// Messages at most.
        limit: usize,
    },
    /// Everyone `user` has accepted (presence fan-out).
    Accepted {
        /// Whose.
        user: Username,
    },
    /// Prefix search.
    Search {
        /// Lowercase prefix.
        prefix: String,
        /// Most results.
        limit: usize,
    },
    /// Check that `from` and `to` are mutually accepted contacts.
    CheckContact {
        /// Asking.
        from: Username,
        /// Asked.
        to: Username,
    },
    /// May `from` ring `to`? `Ok(true)` for mutual contacts, `Ok(false)` for a stranger
    /// (allowed only if `to` takes calls from anyone); `Err(NotContact)` when `to` blocked
    /// `from` or does not exist, so a refusal never tells which.
    CheckCall {
        /// Caller.
        from: Username,
        /// Callee.
        to: Username,
    },
    /// Queue an offline message (contacts only, within quota, idempotent).
    Queue {
        /// The message.
        msg: NewMessage,
        /// Recipient's mailbox limit.
        quota: usize,
    },
    /// Messages waiting for `to`.
    Pending {
        /// Recipient.
        to: Username,
        /// Most messages.
        limit: usize,
    },
    /// Delete a delivered message.
    Delete {
        /// Recipient.
        to: Username,
        /// Store id.
        id: u64,
    },
}

/// A refusal or failure with the code and text the requester will see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpError {
    /// Stable code.
    pub code: ErrorCode,
    /// One line for humans.
    pub detail: String,
}

impl OpError {
    fn new(code: ErrorCode, detail: impl Into<String>) -> Self {
        OpError {
            code,
            detail: detail.into(),
        }
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        tracing::error!(error = %e, "store operation failed");
        OpError::new(
            ErrorCode::Internal,
            "storage error on the supernode; try again",
        )
    }
}

/// A contact change that an online user should be told about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// Who to tell.
    pub to: Username,
    /// About whom.
    pub about: Username,
    /// The new state as `to` sees it.
    pub state: ContactState,
    /// Request note.
    pub note: String,
}

/// The result of an [`Op`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    /// Register, Enroll, Renew: the device to certify and a fresh serial.
    Device(Result<(Device, u64), OpError>),
    /// Contact changes: notices to push.
    Contact(Result<Vec<Notice>, OpError>),
    /// ContactList.
    Contacts(Result<Vec<ContactRow>, OpError>),
    /// Accepted, Search.
    Users(Result<Vec<Username>, OpError>),
    /// CheckContact, CheckDevice, Delete.
    Done(Result<(), OpError>),
    /// Queue.
    Queued(Result<QueueOutcome, OpError>),
    /// CheckCall: whether the two are mutual contacts.
    Callable(Result<bool, OpError>),
    /// Pending.
    Messages(Result<Vec<StoredMessage>, OpError>),
    /// Login.
    Login(LoginLookups),
}

/// The three lookups of [`Op::Login`], each with its own outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginLookups {
    /// As [`Op::CheckDevice`].
    pub device: Result<(), OpError>,
    /// As [`Op::Accepted`].
    pub contacts: Result<Vec<Username>, OpError>,
    /// As [`Op::Pending`].
    pub pending: Result<Vec<StoredMessage>, OpError>,
}

fn hash_password<R: RngCore + CryptoRng>(password: &str, rng: &mut R) -> Result<String, OpError> {
    let salt = SaltString::generate(rng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|_| OpError::new(ErrorCode::Internal, "password hashing failed"))
}

fn verify_password(password: &str, phc: &str) -> bool {
    PasswordHash::new(phc)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

fn unknown(user: &Username) -> OpError {
    OpError::new(ErrorCode::UnknownUser, format!("no user named {user}"))
}

fn not_contact(user: &Username) -> OpError {
    OpError::new(
        ErrorCode::NotContact,
        format!("{user} is not your contact: send a contact request and wait until it is accepted"),
    )
}

fn exists(store: &mut dyn Store, user: &Username) -> Result<bool, OpError> {
    Ok(store.account(user)?.is_some())
}

fn state(
    store: &mut dyn Store,
    owner: &Username,
    peer: &Username,
) -> Result<Option<ContactState>, OpError> {
    Ok(store.contact(owner, peer)?.map(|r| r.state))
}

/// Whether `a` and `b` have both accepted each other.
pub fn mutual(store: &mut dyn Store, a: &Username, b: &Username) -> Result<bool, OpError> {
    Ok(state(store, a, b)? == Some(ContactState::Accepted)
        && state(store, b, a)? == Some(ContactState::Accepted))
}

/// Runs one operation against the store. `rng` salts password hashes.
pub fn execute<R: RngCore + CryptoRng>(store: &mut dyn Store, op: Op, rng: &mut R) -> OpResult {
    match op {
        Op::Register {
            username,
            password,
            noise_key,
            sign_key,
            device_id,
            now,
        } => OpResult::Device((|| {
            if password.chars().count() < MIN_PASSWORD {
                return Err(OpError::new(
                    ErrorCode::WeakPassword,
                    format!("password too short: use at least {MIN_PASSWORD} characters"),
                ));
            }
            if exists(store, &username)? {
                return Err(OpError::new(
                    ErrorCode::UsernameTaken,
                    format!("username {username} is taken: choose another"),
                ));
            }
            let account = Account {
                username: username.clone(),
                password_hash: hash_password(&password, rng)?,
                created_at: now,
            };
            let device = Device {
                username,
                device_id,
                noise_key,
                sign_key,
                revoked: false,
            };
            match store.create_account(&account, &device) {
                Err(StoreError::Exists) => {
                    return Err(OpError::new(
                        ErrorCode::UsernameTaken,
                        format!(
                            "username {} is taken (or this device is already enrolled)",
                            account.username
                        ),
                    ))
                }
                r => r?,
            }
            Ok((device, store.next_serial()?))
        })()),
        Op::Enroll {
            username,
            password,
            noise_key,
            sign_key,
            device_id,
        } => OpResult::Device((|| {
            let wrong = || OpError::new(ErrorCode::WrongPassword, "wrong username or password");
            let Some(account) = store.account(&username)? else {
                // Spend the same time as a real check so timing does not reveal accounts.
                let _ = hash_password(&password, rng);
                return Err(wrong());
            };
            if !verify_password(&password, &account.password_hash) {
                return Err(wrong());
            }
            if let Some(d) = store.device_by_noise_key(&noise_key)? {
                if d.username == username && !d.revoked {
                    return Ok((d, store.next_serial()?));
                }
                return Err(OpError::new(
                    ErrorCode::BadRequest,
                    "this device key is enrolled elsewhere",
                ));
            }
            let device = Device {
                username,
                device_id,
                noise_key,
                sign_key,
                revoked: false,
            };
            store.add_device(&device)?;
            Ok((device, store.next_serial()?))
        })()),
        Op::Renew { noise_key } => {
            OpResult::Device((|| match store.device_by_noise_key(&noise_key)? {
                Some(d) if !d.revoked => Ok((d, store.next_serial()?)),
                Some(_) => Err(OpError::new(
                    ErrorCode::BadCertificate,
                    "this device was revoked: enrol it again",
                )),
                None => Err(OpError::new(
                    ErrorCode::BadCertificate,
                    "this device is not enrolled: register or enrol it",
                )),
            })())
        }
        Op::CheckDevice { noise_key } => OpResult::Done(check_device(store, &noise_key)),
        Op::Login {
            noise_key,
            user,
            limit,
        } => OpResult::Login(LoginLookups {
            device: check_device(store, &noise_key),
            contacts: mutual_contacts(store, &user),
            pending: store.pending_messages(&user, limit).map_err(Into::into),
        }),
        Op::ContactAdd { from, to, note } => {
            OpResult::Contact(contact_add(store, &from, &to, &note))
        }
        Op::ContactReply {
            owner,
            peer,
            action,
        } => OpResult::Contact(contact_reply(store, &owner, &peer, action)),
        Op::ContactRemove { owner, peer } => OpResult::Contact((|| {
            let theirs = state(store, &peer, &owner)?;
            if state(store, &owner, &peer)?.is_none() && theirs.is_none() {
                return Err(OpError::new(
                    ErrorCode::BadRequest,
                    format!("{peer} is not in your contacts"),
                ));
            }
            // A block the other side placed stays in place: removing never unblocks oneself.
            let keep =
                (theirs == Some(ContactState::Blocked)).then_some((ContactState::Blocked, ""));
            store.set_contact_pair(&owner, None, &peer, keep)?;
            let mut notices = Vec::new();
            if matches!(
                theirs,
                Some(ContactState::Accepted) | Some(ContactState::Incoming)
            ) {
                notices.push(Notice {
                    to: peer,
                    about: owner,
                    state: ContactState::None,
                    note: String::new(),
                });
            }
            Ok(notices)
        })()),
        Op::ContactList {
            owner,
            offset,
            limit,
        } => OpResult::Contacts(store.contacts(&owner, offset, limit).map_err(Into::into)),
        Op::Accepted { user } => OpResult::Users(mutual_contacts(store, &user)),
        Op::Search { prefix, limit } => {
            OpResult::Users(store.search_prefix(&prefix, limit).map_err(Into::into))
        }
        Op::CheckContact { from, to } => OpResult::Done((|| {
            if !exists(store, &to)? {
                return Err(unknown(&to));
            }
            if !mutual(store, &from, &to)? {
                return Err(not_contact(&to));
            }
            Ok(())
        })()),
        Op::CheckCall { from, to } => OpResult::Callable((|| {
            if !exists(store, &to)? || state(store, &to, &from)? == Some(ContactState::Blocked) {
                return Err(not_contact(&to));
            }
            mutual(store, &from, &to)
        })()),
        Op::Queue { msg, quota } => OpResult::Queued((|| {
            if !exists(store, &msg.to)? {
                return Err(unknown(&msg.to));
            }
            if !mutual(store, &msg.from, &msg.to)? {
                return Err(not_contact(&msg.to));
            }
            Ok(store.queue_message(&msg, quota)?)
        })()),
        Op::Pending { to, limit } => {
            OpResult::Messages(store.pending_messages(&to, limit).map_err(Into::into))
        }
        Op::Delete { to, id } => OpResult::Done(
            store
                .delete_message(&to, id)
                .map(|_| ())
                .map_err(Into::into),
        ),
    }
}

/// Refuses a revoked device (an unknown one is not this check's business).
fn check_device(store: &mut dyn Store, noise_key: &[u8; 32]) -> Result<(), OpError> {
    match store.device_by_noise_key(noise_key)? {
        Some(d) if d.revoked => Err(OpError::new(
            ErrorCode::BadCertificate,
            "this device was revoked: enrol it again",
        )),
        _ => Ok(()),
    }
}

/// Everyone `user` accepted who accepted `user` too.
fn mutual_contacts(store: &mut dyn Store, user: &Username) -> Result<Vec<Username>, OpError> {
    let mut out = Vec::new();
    for peer in store.accepted_contacts(user)? {
        // Only mutual acceptance counts.
        if state(store, &peer, user)? == Some(ContactState::Accepted) {
            out.push(peer);
        }
    }
    Ok(out)
}

fn contact_add(
    store: &mut dyn Store,
    from: &Username,
    to: &Username,
    note: &str,
) -> Result<Vec<Notice>, OpError> {
    if from == to {
        return Err(OpError::new(
            ErrorCode::BadRequest,
            "you cannot add yourself",
        ));
    }
    if !exists(store, to)? {
        return Err(unknown(to));
    }
    let mine = state(store, from, to)?;
    let theirs = state(store, to, from)?;
    match (mine, theirs) {
        (Some(ContactState::Accepted), Some(ContactState::Accepted)) => Ok(Vec::new()),
        // Asking again while the request is pending: they were told once, that is enough
        // (repeats would let anyone spam a user with notifications).
        (Some(ContactState::Requested), Some(ContactState::Incoming)) => Ok(Vec::new()),
        // They blocked us: look like a pending request, tell them nothing.
        (_, Some(ContactState::Blocked)) => {
            store.set_contact_pair(
                from,
                Some((ContactState::Requested, note)),
                to,
                Some((ContactState::Blocked, "")),
            )?;
            Ok(Vec::new())
        }
        // They already asked us: adding them back is accepting.
        (_, Some(ContactState::Requested)) => {
            store.set_contact_pair(
                from,
                Some((ContactState::Accepted, "")),
                to,
                Some((ContactState::Accepted, "")),
            )?;
            Ok(vec![Notice {
                to: to.clone(),
                about: from.clone(),
                state: ContactState::Accepted,
                note: String::new(),
            }])
        }
        _ => {
            store.set_contact_pair(
                from,
                Some((ContactState::Requested, note)),
                to,
                Some((ContactState::Incoming, note)),
            )?;
            Ok(vec![Notice {
                to: to.clone(),
                about: from.clone(),
                state: ContactState::Incoming,
                note: note.to_string(),
            }])
        }
    }
}

fn contact_reply(
    store: &mut dyn Store,
    owner: &Username,
    peer: &Username,
    action: ContactAction,
) -> Result<Vec<Notice>, OpError> {
    if owner == peer {
        return Err(OpError::new(
            ErrorCode::BadRequest,
            "you cannot answer yourself",
        ));
    }
    let mine = state(store, owner, peer)?;
    match action {
        ContactAction::Block => {
            if !exists(store, peer)? {
                return Err(unknown(peer));
            }
            let theirs = state(store, peer, owner)?;
            // They keep a "requested" row if they had one, so the block is not revealed.
            let their_row = matches!(theirs, Some(ContactState::Requested))
                .then_some((ContactState::Requested, ""));
            store.set_contact_pair(owner, Some((ContactState::Blocked, "")), peer, their_row)?;
            let notices = if theirs == Some(ContactState::Accepted) {
                vec![Notice {
                    to: peer.clone(),
                    about: owner.clone(),
                    state: ContactState::None,
                    note: String::new(),
                }]
            } else {
                Vec::new()
            };
            Ok(notices)
        }
        ContactAction::Accept | ContactAction::Decline => {
            if mine != Some(ContactState::Incoming) {
                return Err(OpError::new(
                    ErrorCode::BadRequest,
                    format!("there is no pending contact request from {peer}"),
                ));
            }
            if action == ContactAction::Accept {
                store.set_contact_pair(
                    owner,
                    Some((ContactState::Accepted, "")),
                    peer,
                    Some((ContactState::Accepted, "")),
                )?;
                Ok(vec![Notice {
                    to: peer.clone(),
                    about: owner.clone(),
                    state: ContactState::Accepted,
                    note: String::new(),
                }])
            } else {
                store.set_contact_pair(owner, None, peer, None)?;
                Ok(vec![Notice {
                    to: peer.clone(),
                    about: owner.clone(),
                    state: ContactState::None,
                    note: String::new(),
                }])
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memstore::MemoryStore;
    use crate::store::NewMessage;
    use crate::store_conformance::{account, device, user as name};
    use rand_chacha::rand_core::SeedableRng;

    fn add(store: &mut MemoryStore, user: &str, key: u8) {
        store
            .create_account(&account(user), &device(user, key))
            .unwrap();
    }

    /// The login's single operation answers exactly what the three it replaced did.
    #[test]
    fn login_lookups_match_the_separate_operations() {
        let mut rng = rand_chacha::ChaCha20Rng::seed_from_u64(1);
        let mut store = MemoryStore::new();
        for (u, k) in [("alice", 1), ("bob", 2), ("carol", 3), ("dave", 4)] {
            add(&mut store, u, k);
        }
        let acc = Some((ContactState::Accepted, ""));
        // bob: mutual; carol: only alice accepted her; dave: none.
        store
            .set_contact_pair(&name("alice"), acc, &name("bob"), acc)
            .unwrap();
        store
            .set_contact_pair(&name("alice"), acc, &name("carol"), None)
            .unwrap();
        let msg = NewMessage {
            from: name("bob"),
            to: name("alice"),
            msg_id: 7,
            sent_at: 1,
            text: "hi".into(),
        };
        store.queue_message(&msg, 10).unwrap();
        store.revoke_device(&[4; 32]).unwrap();
        for (user, key) in [("alice", 1u8), ("dave", 4)] {
            let OpResult::Login(l) = execute(
                &mut store,
                Op::Login {
                    noise_key: [key; 32],
                    user: name(user),
                    limit: 5,
                },
                &mut rng,
            ) else {
                panic!("not a login result");
            };
            let apart = (
                execute(
                    &mut store,
                    Op::CheckDevice {
                        noise_key: [key; 32],
                    },
                    &mut rng,
                ),
                execute(&mut store, Op::Accepted { user: name(user) }, &mut rng),
                execute(
                    &mut store,
                    Op::Pending {
                        to: name(user),
                        limit: 5,
                    },
                    &mut rng,
                ),
            );
            assert_eq!(
                (
                    OpResult::Done(l.device),
                    OpResult::Users(l.contacts),
                    OpResult::Messages(l.pending)
                ),
                apart
            );
        }
        let OpResult::Login(alice) = execute(
            &mut store,
            Op::Login {
                noise_key: [1; 32],
                user: name("alice"),
                limit: 5,
            },
            &mut rng,
        ) else {
            panic!("not a login result");
        };
        assert_eq!(alice.device, Ok(()));
        assert_eq!(alice.contacts, Ok(vec![name("bob")]));
        assert_eq!(alice.pending.map(|m| m.len()), Ok(1));
    }
}
