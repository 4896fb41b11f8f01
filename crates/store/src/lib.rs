//! Peerline storage backends.
//!
//! [`SqliteStore`] is the embedded default implementation of
//! [`peerline_core::store::Store`]: accounts, devices, certificate serials, contacts and
//! offline messages in one SQLite file.
//!
//! Durability: the database runs in WAL mode with `synchronous=FULL` and every mutating
//! call is one transaction, so when a call returns `Ok` its change is on disk and
//! survives a crash of the process (`kill -9`) or of the machine.
//!
//! Schema: the version lives in `PRAGMA user_version`. [`SqliteStore::open`] applies any
//! missing migrations in order (each in its own transaction) and refuses a file written
//! by a newer Peerline instead of guessing at its layout.
//!
//! Integers: SQLite integers are signed 64-bit. Caller-chosen `u64` values (`msg_id`,
//! `sent_at`, `created_at`) are stored bit-for-bit as `i64` and read back unchanged;
//! store-assigned ids and serials are always positive.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use peerline_core::store::sql::{
    from_sql_u64, key, positive, prefix_successor, sql_count, to_sql_u64,
};
use peerline_core::store::{
    Account, ContactRow, Device, NewMessage, QueueOutcome, Store, StoreError, StoredMessage,
};
use peerline_wire::msg::ContactState;
use peerline_wire::Username;
use rusqlite::{params, Connection, OptionalExtension, Transaction, TransactionBehavior};

/// Schema version this build writes and understands (`PRAGMA user_version`).
pub const SCHEMA_VERSION: u32 = 1;

/// How long a call waits for a lock held by another connection before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Migrations: `MIGRATIONS[i]` upgrades a database from version `i` to `i + 1`.
const MIGRATIONS: &[&str] = &[
    // 0 -> 1: initial schema.
    "
    CREATE TABLE accounts (
        username      TEXT    NOT NULL PRIMARY KEY,
        password_hash TEXT    NOT NULL,
        created_at    INTEGER NOT NULL
    ) WITHOUT ROWID;

    CREATE TABLE devices (
        noise_key BLOB    NOT NULL PRIMARY KEY CHECK (length(noise_key) = 32),
        username  TEXT    NOT NULL REFERENCES accounts(username),
        device_id BLOB    NOT NULL CHECK (length(device_id) = 16),
        sign_key  BLOB    NOT NULL CHECK (length(sign_key) = 32),
        revoked   INTEGER NOT NULL DEFAULT 0 CHECK (revoked IN (0, 1))
    ) WITHOUT ROWID;
    CREATE INDEX devices_by_username ON devices(username);

    CREATE TABLE meta (
        key   TEXT    NOT NULL PRIMARY KEY,
        value INTEGER NOT NULL
    ) WITHOUT ROWID;
    INSERT INTO meta (key, value) VALUES ('last_serial', 0);

    CREATE TABLE contacts (
        owner TEXT    NOT NULL,
        peer  TEXT    NOT NULL,
        state INTEGER NOT NULL,
        note  TEXT    NOT NULL,
        PRIMARY KEY (owner, peer)
    ) WITHOUT ROWID;

    CREATE TABLE messages (
        id        INTEGER PRIMARY KEY AUTOINCREMENT,
        sender    TEXT    NOT NULL,
        recipient TEXT    NOT NULL,
        msg_id    INTEGER NOT NULL,
        sent_at   INTEGER NOT NULL,
        text      TEXT    NOT NULL,
        UNIQUE (sender, msg_id)
    );
    CREATE INDEX messages_by_recipient ON messages(recipient, id);
    ",
];

/// Why a database could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// SQLite could not open or configure the file.
    #[error(
        "cannot open database {}: {source}; check that the directory exists and is \
         writable and that the file is a Peerline SQLite database",
        path.display()
    )]
    Open {
        /// The database file.
        path: PathBuf,
        /// SQLite's error.
        source: rusqlite::Error,
    },
    /// The file was written by a newer Peerline.
    #[error(
        "database {} has schema version {found}, but this Peerline understands up to \
         version {supported}; run a newer Peerline or restore a backup of the file",
        path.display()
    )]
    TooNew {
        /// The database file.
        path: PathBuf,
        /// `user_version` found in the file.
        found: u32,
        /// Newest version this build understands.
        supported: u32,
    },
    /// A schema migration failed; the file is left at the previous version.
    #[error(
        "cannot upgrade database {} to schema version {version}: {source}; the file is \
         unchanged at version {}, restore a backup if it is damaged",
        path.display(),
        version - 1
    )]
    Migrate {
        /// The database file.
        path: PathBuf,
        /// The version being migrated to.
        version: u32,
        /// SQLite's error.
        source: rusqlite::Error,
    },
}

/// A [`Store`] in one SQLite database (file or memory).
#[derive(Debug)]
pub struct SqliteStore {
    conn: Connection,
}

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path`, configures it and applies
    /// pending schema migrations.
    pub fn open(path: &Path) -> Result<SqliteStore, OpenError> {
        let conn = Connection::open(path).map_err(|source| OpenError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::init(conn, path)
    }

    /// Opens a fresh private in-memory database (nothing survives the value).
    pub fn open_in_memory() -> Result<SqliteStore, OpenError> {
        let path = Path::new(":memory:");
        let conn = Connection::open_in_memory().map_err(|source| OpenError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::init(conn, path)
    }

    /// Applies connection settings and migrations.
    fn init(mut conn: Connection, path: &Path) -> Result<SqliteStore, OpenError> {
        let open_err = |source| OpenError::Open {
            path: path.to_path_buf(),
            source,
        };
        conn.busy_timeout(BUSY_TIMEOUT).map_err(open_err)?;
        // WAL where the file system supports it (an in-memory database reports "memory").
        // With synchronous=FULL every commit is fsynced before it returns.
        let _mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(open_err)?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(open_err)?;
        conn.pragma_update(None, "foreign_keys", true)
            .map_err(open_err)?;
        migrate(&mut conn, path)?;
        Ok(SqliteStore { conn })
    }

    /// Bulk import for benchmarks and migrations: creates every account with its first
    /// device, then makes each pair in `pairs` mutually accepted contacts, all in one
    /// transaction (one fsync instead of one per row). Nothing is written if any row
    /// fails; an account or device that exists already is `Exists`. Run it while no
    /// supernode holds the database, so the long write lock stalls nobody.
    pub fn bulk_import(
        &mut self,
        accounts: &[(Account, Device)],
        pairs: &[(Username, Username)],
    ) -> Result<(), StoreError> {
        let tx = self.write()?;
        {
            let mut acc = tx
                .prepare(
                    "INSERT INTO accounts (username, password_hash, created_at) VALUES (?1, ?2, ?3)",
                )
                .map_err(backend)?;
            for (account, device) in accounts {
                if device.username != account.username {
                    return Err(StoreError::Backend(format!(
                        "first device belongs to {} but the account is {}",
                        device.username, account.username
                    )));
                }
                acc.execute(params![
                    account.username.as_str(),
                    account.password_hash,
                    to_sql_u64(account.created_at)
                ])
                .map_err(insert_err)?;
                insert_device(&tx, device)?;
            }
            for (a, b) in pairs {
                put_contact(&tx, a, b, Some((ContactState::Accepted, "")))?;
                put_contact(&tx, b, a, Some((ContactState::Accepted, "")))?;
            }
        }
        tx.commit().map_err(backend)
    }

    /// Starts a write transaction (taking the write lock up front, so it cannot fail
    /// half-way with a lock upgrade conflict).
    fn write(&mut self) -> Result<Transaction<'_>, StoreError> {
        self.conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(backend)
    }
}

/// Reads `user_version` and applies the missing migrations, one transaction each.
fn migrate(conn: &mut Connection, path: &Path) -> Result<(), OpenError> {
    let found: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|source| OpenError::Open {
            path: path.to_path_buf(),
            source,
        })?;
    let found = u32::try_from(found).unwrap_or(u32::MAX);
    if found > SCHEMA_VERSION {
        return Err(OpenError::TooNew {
            path: path.to_path_buf(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (from, sql) in (0u32..).zip(MIGRATIONS.iter()).skip(found as usize) {
        let version = from + 1;
        let step = |conn: &mut Connection| -> rusqlite::Result<()> {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Exclusive)?;
            tx.execute_batch(sql)?;
            tx.pragma_update(None, "user_version", version)?;
            tx.commit()
        };
        step(conn).map_err(|source| OpenError::Migrate {
            path: path.to_path_buf(),
            version,
            source,
        })?;
    }
    Ok(())
}

/// Any SQLite failure, flattened for the core.
fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Like [`backend`], but a unique / primary key violation is `Exists`.
fn insert_err(e: rusqlite::Error) -> StoreError {
    match &e {
        rusqlite::Error::SqliteFailure(f, _)
            if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
                || f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE =>
        {
            StoreError::Exists
        }
        _ => backend(e),
    }
}

/// Database code of a contact state. `None` is never stored.
fn state_code(state: ContactState) -> Option<i64> {
    match state {
        ContactState::Requested => Some(1),
        ContactState::Incoming => Some(2),
        ContactState::Accepted => Some(3),
        ContactState::Blocked => Some(4),
        ContactState::None => None,
    }
}

/// Contact state of a database code.
fn state_from_code(code: i64) -> Result<ContactState, StoreError> {
    match code {
        1 => Ok(ContactState::Requested),
        2 => Ok(ContactState::Incoming),
        3 => Ok(ContactState::Accepted),
        4 => Ok(ContactState::Blocked),
        other => Err(StoreError::Backend(format!(
            "contacts table holds unknown state code {other}"
        ))),
    }
}

/// A username read back from the database: must be valid and canonical.
fn username(s: &str) -> Result<Username, StoreError> {
    match Username::parse(s) {
        Ok(u) if u.as_str() == s => Ok(u),
        Ok(_) => Err(StoreError::Backend(format!(
            "database holds non-canonical username {s:?}"
        ))),
        Err(e) => Err(StoreError::Backend(format!(
            "database holds invalid username: {e}"
        ))),
    }
}

/// Raw device columns, converted outside the rusqlite row closure.
type DeviceCols = (String, Vec<u8>, Vec<u8>, Vec<u8>, i64);

fn device_from_cols(
    (user, device_id, noise_key, sign_key, revoked): DeviceCols,
) -> Result<Device, StoreError> {
    let revoked = match revoked {
        0 => false,
        1 => true,
        other => {
            return Err(StoreError::Backend(format!(
                "devices table holds revoked = {other}"
            )))
        }
    };
    Ok(Device {
        username: username(&user)?,
        device_id: key("device id", device_id)?,
        noise_key: key("noise key", noise_key)?,
        sign_key: key("signing key", sign_key)?,
        revoked,
    })
}

/// Inserts, replaces or deletes one directed contact row inside `tx`.
fn put_contact(
    tx: &Transaction<'_>,
    owner: &Username,
    peer: &Username,
    row: Option<(ContactState, &str)>,
) -> Result<(), StoreError> {
    match row.and_then(|(state, note)| state_code(state).map(|code| (code, note))) {
        Some((code, note)) => tx
            .execute(
                "INSERT INTO contacts (owner, peer, state, note) VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (owner, peer) DO UPDATE SET state = excluded.state, note = excluded.note",
                params![owner.as_str(), peer.as_str(), code, note],
            )
            .map_err(backend)?,
        // `ContactState::None` means "no relationship": the row is deleted.
        None => tx
            .execute(
                "DELETE FROM contacts WHERE owner = ?1 AND peer = ?2",
                params![owner.as_str(), peer.as_str()],
            )
            .map_err(backend)?,
    };
    Ok(())
}

/// Inserts a device row inside `tx` (`Exists` if its Noise key is enrolled already).
fn insert_device(tx: &rusqlite::Transaction<'_>, device: &Device) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO devices (noise_key, username, device_id, sign_key, revoked)
         VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            &device.noise_key[..],
            device.username.as_str(),
            &device.device_id[..],
            &device.sign_key[..],
            device.revoked
        ],
    )
    .map_err(insert_err)?;
    Ok(())
}

impl Store for SqliteStore {
    fn create_account(&mut self, account: &Account, device: &Device) -> Result<(), StoreError> {
        if device.username != account.username {
            return Err(StoreError::Backend(format!(
                "first device belongs to {} but the account is {}",
                device.username, account.username
            )));
        }
        let tx = self.write()?;
        tx.execute(
            "INSERT INTO accounts (username, password_hash, created_at) VALUES (?1, ?2, ?3)",
            params![
                account.username.as_str(),
                account.password_hash,
                to_sql_u64(account.created_at)
            ],
        )
        .map_err(insert_err)?;
        insert_device(&tx, device)?;
        // Dropping `tx` on an error above rolls back, so nothing is written.
        tx.commit().map_err(backend)
    }

    fn account(&mut self, name: &Username) -> Result<Option<Account>, StoreError> {
        let row = self
            .conn
            .prepare_cached(
                "SELECT username, password_hash, created_at FROM accounts WHERE username = ?1",
            )
            .and_then(|mut st| {
                st.query_row(params![name.as_str()], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, i64>(2)?,
                    ))
                })
                .optional()
            })
            .map_err(backend)?;
        row.map(|(user, password_hash, created_at)| {
            Ok(Account {
                username: username(&user)?,
                password_hash,
                created_at: from_sql_u64(created_at),
            })
        })
        .transpose()
    }

    fn add_device(&mut self, device: &Device) -> Result<(), StoreError> {
        let tx = self.write()?;
        let exists = tx
            .query_row(
                "SELECT 1 FROM accounts WHERE username = ?1",
                params![device.username.as_str()],
                |_| Ok(()),
            )
            .optional()
            .map_err(backend)?
            .is_some();
        if !exists {
            return Err(StoreError::NotFound);
        }
        insert_device(&tx, device)?;
        tx.commit().map_err(backend)
    }

    fn device_by_noise_key(&mut self, noise_key: &[u8; 32]) -> Result<Option<Device>, StoreError> {
        let cols = self
            .conn
            .prepare_cached(
                "SELECT username, device_id, noise_key, sign_key, revoked
                 FROM devices WHERE noise_key = ?1",
            )
            .and_then(|mut st| {
                st.query_row(params![&noise_key[..]], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })
                .optional()
            })
            .map_err(backend)?;
        cols.map(device_from_cols).transpose()
    }

    fn revoke_device(&mut self, noise_key: &[u8; 32]) -> Result<(), StoreError> {
        let tx = self.write()?;
        let n = tx
            .execute(
                "UPDATE devices SET revoked = 1 WHERE noise_key = ?1",
                params![&noise_key[..]],
            )
            .map_err(backend)?;
        if n == 0 {
            return Err(StoreError::NotFound);
        }
        tx.commit().map_err(backend)
    }

    fn devices_of(&mut self, username: &Username) -> Result<Vec<Device>, StoreError> {
        let rows = self
            .conn
            .prepare_cached(
                "SELECT username, device_id, noise_key, sign_key, revoked
                 FROM devices WHERE username = ?1 ORDER BY noise_key",
            )
            .and_then(|mut st| {
                st.query_map(params![username.as_str()], |r| {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
                })?
                .collect::<Result<Vec<_>, _>>()
            })
            .map_err(backend)?;
        rows.into_iter().map(device_from_cols).collect()
    }

    fn next_serial(&mut self) -> Result<u64, StoreError> {
        let tx = self.write()?;
        let serial: i64 = tx
            .query_row(
                "UPDATE meta SET value = value + 1 WHERE key = 'last_serial' RETURNING value",
                [],
                |r| r.get(0),
            )
            .map_err(backend)?;
        tx.commit().map_err(backend)?;
        positive("certificate serial", serial)
    }

    fn search_prefix(&mut self, prefix: &str, limit: usize) -> Result<Vec<Username>, StoreError> {
        // A range on the primary key: no LIKE, so `%` and `_` are plain characters.
        let names: Vec<String> = match prefix_successor(prefix) {
            Some(end) => self
                .conn
                .prepare_cached(
                    "SELECT username FROM accounts WHERE username >= ?1 AND username < ?2
                     ORDER BY username LIMIT ?3",
                )
                .and_then(|mut st| {
                    st.query_map(params![prefix, end, sql_count(limit)], |r| r.get(0))?
                        .collect()
                }),
            None => self
                .conn
                .prepare_cached(
                    "SELECT username FROM accounts WHERE username >= ?1
                     ORDER BY username LIMIT ?2",
                )
                .and_then(|mut st| {
                    st.query_map(params![prefix, sql_count(limit)], |r| r.get(0))?
                        .collect()
                }),
        }
        .map_err(backend)?;
        names.iter().map(|n| username(n)).collect()
    }

    fn contact(
        &mut self,
        owner: &Username,
        peer: &Username,
    ) -> Result<Option<ContactRow>, StoreError> {
        let row: Option<(i64, String)> = self
            .conn
            .prepare_cached("SELECT state, note FROM contacts WHERE owner = ?1 AND peer = ?2")
            .and_then(|mut st| {
                st.query_row(params![owner.as_str(), peer.as_str()], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })
                .optional()
            })
            .map_err(backend)?;
        row.map(|(state, note)| {
            Ok(ContactRow {
                peer: peer.clone(),
                state: state_from_code(state)?,
                note,
            })
        })
        .transpose()
    }

    fn set_contact_pair(
        &mut self,
        a: &Username,
        a_row: Option<(ContactState, &str)>,
        b: &Username,
        b_row: Option<(ContactState, &str)>,
    ) -> Result<(), StoreError> {
        let tx = self.write()?;
        put_contact(&tx, a, b, a_row)?;
        put_contact(&tx, b, a, b_row)?;
        tx.commit().map_err(backend)
    }

    fn contacts(
        &mut self,
        owner: &Username,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<ContactRow>, StoreError> {
        let rows: Vec<(String, i64, String)> = self
            .conn
            .prepare_cached(
                "SELECT peer, state, note FROM contacts WHERE owner = ?1
                 ORDER BY peer LIMIT ?2 OFFSET ?3",
            )
            .and_then(|mut st| {
                st.query_map(
                    params![owner.as_str(), sql_count(limit), sql_count(offset)],
                    |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
                )?
                .collect()
            })
            .map_err(backend)?;
        rows.into_iter()
            .map(|(peer, state, note)| {
                Ok(ContactRow {
                    peer: username(&peer)?,
                    state: state_from_code(state)?,
                    note,
                })
            })
            .collect()
    }

    fn accepted_contacts(&mut self, owner: &Username) -> Result<Vec<Username>, StoreError> {
        let accepted = state_code(ContactState::Accepted);
        let peers: Vec<String> = self
            .conn
            .prepare_cached(
                "SELECT peer FROM contacts WHERE owner = ?1 AND state = ?2 ORDER BY peer",
            )
            .and_then(|mut st| {
                st.query_map(params![owner.as_str(), accepted], |r| r.get(0))?
                    .collect()
            })
            .map_err(backend)?;
        peers.iter().map(|p| username(p)).collect()
    }

    fn queue_message(
        &mut self,
        msg: &NewMessage,
        quota: usize,
    ) -> Result<QueueOutcome, StoreError> {
        let tx = self.write()?;
        let existing: Option<i64> = tx
            .query_row(
                "SELECT id FROM messages WHERE sender = ?1 AND msg_id = ?2",
                params![msg.from.as_str(), to_sql_u64(msg.msg_id)],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)?;
        if let Some(id) = existing {
            return Ok(QueueOutcome::Duplicate(positive("message id", id)?));
        }
        // Count at most `quota` rows: the index range scan stops there.
        let waiting: i64 = tx
            .query_row(
                "SELECT COUNT(*) FROM (SELECT 1 FROM messages WHERE recipient = ?1 LIMIT ?2)",
                params![msg.to.as_str(), sql_count(quota)],
                |r| r.get(0),
            )
            .map_err(backend)?;
        if waiting >= sql_count(quota) {
            return Ok(QueueOutcome::MailboxFull);
        }
        tx.execute(
            "INSERT INTO messages (sender, recipient, msg_id, sent_at, text)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            params![
                msg.from.as_str(),
                msg.to.as_str(),
                to_sql_u64(msg.msg_id),
                to_sql_u64(msg.sent_at),
                msg.text
            ],
        )
        .map_err(backend)?;
        let id = positive("message id", tx.last_insert_rowid())?;
        // Durable on return: the commit is fsynced (WAL, synchronous=FULL).
        tx.commit().map_err(backend)?;
        Ok(QueueOutcome::Queued(id))
    }

    fn pending_messages(
        &mut self,
        to: &Username,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        type Cols = (i64, String, String, i64, i64, String);
        let rows: Vec<Cols> = self
            .conn
            .prepare_cached(
                "SELECT id, sender, recipient, msg_id, sent_at, text FROM messages
                 WHERE recipient = ?1 ORDER BY id LIMIT ?2",
            )
            .and_then(|mut st| {
                st.query_map(params![to.as_str(), sql_count(limit)], |r| {
                    Ok((
                        r.get(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                        r.get(5)?,
                    ))
                })?
                .collect()
            })
            .map_err(backend)?;
        rows.into_iter()
            .map(|(id, from, to, msg_id, sent_at, text)| {
                Ok(StoredMessage {
                    id: positive("message id", id)?,
                    msg: NewMessage {
                        from: username(&from)?,
                        to: username(&to)?,
                        msg_id: from_sql_u64(msg_id),
                        sent_at: from_sql_u64(sent_at),
                        text,
                    },
                })
            })
            .collect()
    }

    fn delete_message(&mut self, to: &Username, id: u64) -> Result<bool, StoreError> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(false);
        };
        let tx = self.write()?;
        let n = tx
            .execute(
                "DELETE FROM messages WHERE id = ?1 AND recipient = ?2",
                params![id, to.as_str()],
            )
            .map_err(backend)?;
        tx.commit().map_err(backend)?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use peerline_core::store_conformance::run_all;

    fn user(s: &str) -> Username {
        Username::parse(s).unwrap()
    }

    #[test]
    fn sqlite_store_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let mut n = 0;
        run_all(&mut || {
            n += 1;
            Box::new(SqliteStore::open(&dir.path().join(format!("conf{n}.db"))).unwrap())
        });
    }

    fn bulk_row(name: &str, key: u8) -> (Account, Device) {
        let account = Account {
            username: user(name),
            password_hash: "$argon2id$unusable".into(),
            created_at: 1,
        };
        let device = Device {
            username: user(name),
            device_id: [key; 16],
            noise_key: [key; 32],
            sign_key: [key; 32],
            revoked: false,
        };
        (account, device)
    }

    #[test]
    fn bulk_import_creates_accounts_devices_and_mutual_contacts_or_nothing() {
        let mut s = SqliteStore::open_in_memory().unwrap();
        let rows = vec![bulk_row("ann", 1), bulk_row("ben", 2), bulk_row("cid", 3)];
        s.bulk_import(&rows, &[(user("ann"), user("ben"))]).unwrap();
        assert!(s.account(&user("cid")).unwrap().is_some());
        assert_eq!(
            s.device_by_noise_key(&[2; 32]).unwrap().unwrap().username,
            user("ben")
        );
        assert_eq!(
            s.accepted_contacts(&user("ann")).unwrap(),
            vec![user("ben")]
        );
        assert_eq!(
            s.accepted_contacts(&user("ben")).unwrap(),
            vec![user("ann")]
        );
        assert!(s.accepted_contacts(&user("cid")).unwrap().is_empty());
        // A clash rolls the whole import back.
        let again = vec![bulk_row("dan", 4), bulk_row("ann", 5)];
        assert_eq!(s.bulk_import(&again, &[]), Err(StoreError::Exists));
        assert!(s.account(&user("dan")).unwrap().is_none());
    }

    #[test]
    fn in_memory_store_conforms() {
        run_all(&mut || Box::new(SqliteStore::open_in_memory().unwrap()));
    }

    #[test]
    fn file_uses_wal_and_full_sync() {
        let dir = tempfile::tempdir().unwrap();
        let s = SqliteStore::open(&dir.path().join("p.db")).unwrap();
        let mode: String = s
            .conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
        let sync: i64 = s
            .conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(sync, 2, "synchronous=FULL");
        let fk: i64 = s
            .conn
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .unwrap();
        assert_eq!(fk, 1);
        let v: i64 = s
            .conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, i64::from(SCHEMA_VERSION));
    }

    #[test]
    fn data_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("peerline.db");
        let (alice, bob) = (user("alice"), user("bob"));
        let account = Account {
            username: alice.clone(),
            password_hash: "hash".into(),
            created_at: u64::MAX - 1,
        };
        let device = Device {
            username: alice.clone(),
            device_id: [7; 16],
            noise_key: [8; 32],
            sign_key: [9; 32],
            revoked: false,
        };
        let msg = NewMessage {
            from: alice.clone(),
            to: bob.clone(),
            msg_id: u64::MAX,
            sent_at: 1_700_000_000_000,
            text: "offline hello ✓".into(),
        };
        let (serial, id) = {
            let mut s = SqliteStore::open(&path).unwrap();
            s.create_account(&account, &device).unwrap();
            let serial = s.next_serial().unwrap();
            s.set_contact_pair(
                &alice,
                Some((ContactState::Accepted, "")),
                &bob,
                Some((ContactState::Accepted, "")),
            )
            .unwrap();
            let QueueOutcome::Queued(id) = s.queue_message(&msg, 10).unwrap() else {
                panic!("not queued")
            };
            (serial, id)
        };
        let mut s = SqliteStore::open(&path).unwrap();
        assert_eq!(s.account(&alice).unwrap(), Some(account));
        assert_eq!(s.device_by_noise_key(&[8; 32]).unwrap(), Some(device));
        assert!(
            s.next_serial().unwrap() > serial,
            "serials survive restarts"
        );
        assert_eq!(s.accepted_contacts(&bob).unwrap(), vec![alice.clone()]);
        assert_eq!(
            s.pending_messages(&bob, 10).unwrap(),
            vec![StoredMessage {
                id,
                msg: msg.clone()
            }]
        );
        assert_eq!(
            s.queue_message(&msg, 10).unwrap(),
            QueueOutcome::Duplicate(id)
        );
        assert!(s.delete_message(&bob, id).unwrap());
        drop(s);
        let mut s = SqliteStore::open(&path).unwrap();
        assert!(
            s.pending_messages(&bob, 10).unwrap().is_empty(),
            "delete is durable"
        );
        let QueueOutcome::Queued(next) = s.queue_message(&msg, 10).unwrap() else {
            panic!("not queued")
        };
        assert!(
            next > id,
            "AUTOINCREMENT ids are not reused across restarts"
        );
    }

    /// Child half of `queued_messages_survive_kill_9`: queues messages into the file named
    /// by `PEERLINE_KILL_TEST_DB`, printing each id after `queue_message` returns, then
    /// waits to be killed.
    fn kill_9_child(path: &std::ffi::OsStr) {
        use std::io::Write;
        let mut s = SqliteStore::open(Path::new(path)).unwrap();
        let mut out = std::io::stdout().lock();
        for i in 0..20u64 {
            let msg = NewMessage {
                from: user("alice"),
                to: user("bob"),
                msg_id: i,
                sent_at: i,
                text: format!("m{i}"),
            };
            let QueueOutcome::Queued(id) = s.queue_message(&msg, 1000).unwrap() else {
                panic!("not queued")
            };
            writeln!(out, "QUEUED {id}").unwrap();
            out.flush().unwrap();
        }
        std::thread::sleep(Duration::from_secs(60));
    }

    /// Runs itself as a child process that queues messages and is killed with SIGKILL.
    #[test]
    fn queued_messages_survive_kill_9() {
        use std::io::BufRead;
        if let Some(path) = std::env::var_os("PEERLINE_KILL_TEST_DB") {
            return kill_9_child(&path);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kill.db");
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "tests::queued_messages_survive_kill_9",
                "--nocapture",
            ])
            .env("PEERLINE_KILL_TEST_DB", &path)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut acked = Vec::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(id) = line.strip_prefix("QUEUED ") {
                acked.push(id.parse::<u64>().unwrap());
                if acked.len() == 20 {
                    break;
                }
            }
        }
        child.kill().unwrap(); // SIGKILL: no destructors, no checkpoint.
        child.wait().unwrap();
        assert_eq!(acked.len(), 20, "child stopped early");
        let mut s = SqliteStore::open(&path).unwrap();
        let ids: Vec<u64> = s
            .pending_messages(&user("bob"), 100)
            .unwrap()
            .iter()
            .map(|m| m.id)
            .collect();
        assert_eq!(ids, acked, "every acknowledged message survives kill -9");
    }

    #[test]
    fn newer_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("future.db");
        drop(SqliteStore::open(&path).unwrap());
        {
            let conn = Connection::open(&path).unwrap();
            conn.pragma_update(None, "user_version", SCHEMA_VERSION + 1)
                .unwrap();
        }
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(
            matches!(err, OpenError::TooNew { found, supported, .. }
                if found == SCHEMA_VERSION + 1 && supported == SCHEMA_VERSION),
            "{err:?}"
        );
        let text = err.to_string();
        assert!(text.contains(&path.display().to_string()), "{text}");
        assert!(text.contains("schema version 2"), "{text}");
        assert!(text.contains("newer Peerline"), "{text}");
    }

    #[test]
    fn not_a_database_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("junk.db");
        std::fs::write(&path, vec![0x5a; 4096]).unwrap();
        let err = SqliteStore::open(&path).unwrap_err();
        assert!(matches!(err, OpenError::Open { .. }), "{err:?}");
        assert!(err.to_string().contains("junk.db"), "{err}");
    }

    #[test]
    fn corrupt_rows_are_backend_errors() {
        let mut s = SqliteStore::open_in_memory().unwrap();
        s.conn
            .execute_batch(
                "INSERT INTO contacts VALUES ('alice', 'bob', 99, '');
                 INSERT INTO contacts VALUES ('carol', 'Not Valid!', 3, '');
                 INSERT INTO accounts VALUES ('BAD NAME', 'h', 0);",
            )
            .unwrap();
        assert!(matches!(
            s.contact(&user("alice"), &user("bob")),
            Err(StoreError::Backend(_))
        ));
        assert!(matches!(
            s.contacts(&user("alice"), 0, 10),
            Err(StoreError::Backend(_))
        ));
        assert!(matches!(
            s.accepted_contacts(&user("carol")),
            Err(StoreError::Backend(_))
        ));
        // Only names in the prefix range are read; an upper-case row sorts before 'a'.
        assert!(matches!(
            s.search_prefix("BAD", 10),
            Err(StoreError::Backend(_))
        ));
    }
}
