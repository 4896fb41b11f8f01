//! Peerline's PostgreSQL [`Store`]: accounts, devices, certificate serials, contacts and
//! offline messages in one database that a fleet of supernodes shares.
//!
//! [`PgStore`] implements [`peerline_core::store::Store`] with the same rules as the
//! embedded SQLite store (`peerline-store`):
//!
//! - Durability: every mutating call is one transaction and returns after `COMMIT`
//!   (run the server with `synchronous_commit = on`, its default, so that means flushed).
//! - Offline messages are deleted only by [`Store::delete_message`], which the supernode
//!   calls after the recipient's acknowledgement; `(from, msg_id)` is unique, which makes
//!   queueing idempotent.
//! - The mailbox quota holds with several supernodes writing at once: `queue_message`
//!   locks the recipient's `mailboxes` row before it counts, so two writers for the same
//!   recipient take turns.
//! - Certificate serials come from a sequence, which never hands out a value twice.
//!
//! The client is the blocking `postgres` crate (the supernode runs its store on a storage
//! thread of its own). Do not call a `PgStore` from async code: it runs its own small
//! runtime per connection. A lost connection is reopened and the call retried once; a
//! `COMMIT` whose outcome is unknown is not retried but reported as
//! [`StoreError::Backend`]. Serialization failures and deadlocks are retried a few times.
//!
//! Schema: the SQL files in `migrations/` are applied in order by [`PgStore::open`] under
//! a PostgreSQL advisory lock (several supernodes may start at once), each in its own
//! transaction and recorded in `schema_migrations`. A database with a migration newer
//! than this build knows is refused.
//!
//! No TLS: connections are plain TCP (or a Unix socket), for a database on loopback or a
//! private network; see docs/security.md.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

use std::collections::HashMap;
use std::time::Duration;

use peerline_core::store::sql::{
    from_sql_u64, key, positive, prefix_successor, sql_count, to_sql_u64,
};
use peerline_core::store::{
    Account, ContactRow, Device, NewMessage, QueueOutcome, Store, StoreError, StoredMessage,
};
use peerline_wire::msg::ContactState;
use peerline_wire::Username;
use postgres::error::SqlState;
use postgres::{Client, NoTls, Statement, Transaction};

pub mod testing;

/// One versioned schema migration.
#[derive(Debug, Clone, Copy)]
pub struct Migration {
    /// Version (the file's number); applied in increasing order.
    pub version: i32,
    /// File name, recorded with the version.
    pub name: &'static str,
    /// The SQL, run in one transaction.
    pub sql: &'static str,
}

/// The migrations this build applies, in order: the files of `migrations/`.
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: 1,
    name: "0001_initial.sql",
    sql: include_str!("../migrations/0001_initial.sql"),
}];

/// Advisory lock key held while migrating ("peerline" in ASCII).
const MIGRATION_LOCK: i64 = 0x7065_6572_6c69_6e65;

/// How long connecting may take unless the URL says otherwise.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Serialization failures and deadlocks retried before giving up.
const CONFLICT_RETRIES: u32 = 5;

/// Session settings after the migrations. A row lock held longer than `lock_timeout`
/// (by a supernode cut off from the database mid-transaction) fails the waiting call
/// instead of stalling its storage thread; the server ends a session idle inside a
/// transaction after `idle_in_transaction_session_timeout`, releasing such locks (our
/// transactions take milliseconds); `statement_timeout` bounds any one statement.
const SESSION_SETTINGS: &str = "SET lock_timeout = '5s';
     SET idle_in_transaction_session_timeout = '10s';
     SET statement_timeout = '30s'";

/// Why a store could not be opened.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OpenError {
    /// The URL does not parse.
    #[error(
        "invalid PostgreSQL URL {url:?}: {reason}; expected postgres://USER@HOST:PORT/DATABASE"
    )]
    Url {
        /// The URL, with any password removed.
        url: String,
        /// The parser's reason.
        reason: String,
    },
    /// Connecting (or configuring the connection) failed.
    #[error(
        "cannot connect to PostgreSQL at {target}: {reason}; check that the server runs \
         and that the URL's role may log in"
    )]
    Connect {
        /// Host, port and database.
        target: String,
        /// The client's error, with its cause.
        reason: String,
    },
    /// The database holds migrations newer than this build knows.
    #[error(
        "PostgreSQL database {target} has schema migration {found}, but this Peerline knows \
         migrations up to {supported}; run a newer Peerline"
    )]
    TooNew {
        /// Host, port and database.
        target: String,
        /// Newest version recorded in `schema_migrations`.
        found: i32,
        /// Newest version this build has.
        supported: i32,
    },
    /// A migration failed; it was rolled back, the earlier ones stay.
    #[error("cannot apply schema migration {name} to PostgreSQL database {target}: {reason}")]
    Migrate {
        /// Host, port and database.
        target: String,
        /// The migration's file name.
        name: &'static str,
        /// The server's error.
        reason: String,
    },
}

/// Checks a `postgres://` URL without connecting, so a config file can be validated at
/// load time with one clear line.
pub fn parse_url(url: &str) -> Result<postgres::Config, OpenError> {
    let bad = |reason: String| OpenError::Url {
        url: redact(url),
        reason,
    };
    if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
        return Err(bad("it must start with postgres://".into()));
    }
    let config: postgres::Config = url
        .parse()
        .map_err(|e: postgres::Error| bad(e.to_string()))?;
    if config.get_hosts().is_empty() {
        return Err(bad("it names no host".into()));
    }
    if config.get_dbname().is_none() {
        return Err(bad("it names no database".into()));
    }
    if config.get_user().is_none() {
        return Err(bad("it names no user".into()));
    }
    Ok(config)
}

/// `url` without its password (for messages and logs).
pub fn redact(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((auth, host)) => (auth, host),
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// "host:port/db" of a config, for messages.
fn target(config: &postgres::Config) -> String {
    let host = match config.get_hosts().first() {
        Some(postgres::config::Host::Tcp(h)) => h.clone(),
        Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
        None => "?".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!("{host}:{port}/{}", config.get_dbname().unwrap_or("?"))
}

/// One open connection and the statements prepared on it.
struct Conn {
    client: Client,
    statements: HashMap<&'static str, Statement>,
}

impl Conn {
    /// The prepared statement for `sql` (prepared on first use on this connection).
    fn stmt(&mut self, sql: &'static str) -> Result<Statement, Fail> {
        if let Some(s) = self.statements.get(sql) {
            return Ok(s.clone());
        }
        let s = self.client.prepare(sql).map_err(Fail::Pg)?;
        self.statements.insert(sql, s.clone());
        Ok(s)
    }

    /// Starts a transaction and hands back the statements it needs.
    fn begin<const N: usize>(
        &mut self,
        sql: [&'static str; N],
    ) -> Result<(Transaction<'_>, [Statement; N]), Fail> {
        let mut stmts = Vec::with_capacity(N);
        for s in sql {
            stmts.push(self.stmt(s)?);
        }
        let stmts: [Statement; N] = stmts
            .try_into()
            .map_err(|_| Fail::Store(StoreError::Backend("statement count".into())))?;
        let tx = self.client.transaction().map_err(Fail::Pg)?;
        Ok((tx, stmts))
    }
}

/// How one attempt of an operation failed.
#[derive(Debug)]
enum Fail {
    /// A result for the caller (not retried).
    Store(StoreError),
    /// The server or the connection failed before the commit.
    Pg(postgres::Error),
    /// `COMMIT` failed: if the connection was lost, the outcome is unknown.
    Commit(postgres::Error),
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Self {
        Fail::Store(e)
    }
}

fn pg(e: postgres::Error) -> Fail {
    Fail::Pg(e)
}

/// Like [`pg`], but a unique violation is `Exists`.
fn insert_err(e: postgres::Error) -> Fail {
    if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
        Fail::Store(StoreError::Exists)
    } else {
        Fail::Pg(e)
    }
}

fn commit(tx: Transaction<'_>) -> Result<(), Fail> {
    tx.commit().map_err(Fail::Commit)
}

/// The connection is gone (or the server is going away): reconnecting may help.
fn connection_lost(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        return [
            SqlState::ADMIN_SHUTDOWN,
            SqlState::CRASH_SHUTDOWN,
            SqlState::CANNOT_CONNECT_NOW,
        ]
        .contains(code);
    }
    std::error::Error::source(e).is_some_and(|s| s.is::<std::io::Error>())
}

/// Another transaction got in the way; running again will succeed.
fn conflict(e: &postgres::Error) -> bool {
    matches!(
        e.code(),
        Some(c) if *c == SqlState::T_R_SERIALIZATION_FAILURE || *c == SqlState::T_R_DEADLOCK_DETECTED
    )
}

fn backend(e: &postgres::Error) -> StoreError {
    StoreError::Backend(format!("postgresql: {}", describe(e)))
}

/// One line: `Display` of a server error is only "db error" and of a connection error
/// only "error connecting to server"; the detail is in the source.
fn describe(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        return format!("{} ({})", db.message(), db.code().code());
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// A [`Store`] on a PostgreSQL database, possibly shared with other supernodes.
pub struct PgStore {
    config: postgres::Config,
    conn: Option<Conn>,
    /// Reconnections after a lost connection (for tests and metrics).
    reconnects: u64,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &target(&self.config))
            .field("connected", &self.conn.is_some())
            .finish()
    }
}

impl PgStore {
    /// Connects to `url` (`postgres://USER[:PASSWORD]@HOST:PORT/DATABASE[?options]`) and
    /// applies any pending schema migrations.
    pub fn open(url: &str) -> Result<PgStore, OpenError> {
        Self::open_config(parse_url(url)?)
    }

    /// Like [`PgStore::open`] with a parsed configuration.
    pub fn open_config(config: postgres::Config) -> Result<PgStore, OpenError> {
        Self::open_with(config, MIGRATIONS)
    }

    fn open_with(
        mut config: postgres::Config,
        migrations: &[Migration],
    ) -> Result<PgStore, OpenError> {
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(CONNECT_TIMEOUT);
        }
        if config.get_application_name().is_none() {
            config.application_name("peerlined");
        }
        // Notice a server that vanished without closing the connection.
        config.keepalives(true);
        config.keepalives_idle(Duration::from_secs(30));
        let mut conn = connect(&config)?;
        // Before the session settings: waiting for another supernode's migrations may
        // take longer than the lock timeout.
        migrate(&mut conn.client, &config, migrations)?;
        configure(&mut conn.client, &config)?;
        Ok(PgStore {
            config,
            conn: Some(conn),
            reconnects: 0,
        })
    }

    /// How many times a lost connection was reopened.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Runs `op`, reconnecting once after a lost connection and retrying conflicts.
    fn run<T>(
        &mut self,
        mut op: impl FnMut(&mut Conn) -> Result<T, Fail>,
    ) -> Result<T, StoreError> {
        let mut reconnected = false;
        let mut conflicts = 0;
        loop {
            let conn = match self.conn.take() {
                Some(c) if !c.client.is_closed() => c,
                _ => {
                    // Open at `open`, so any connect here replaces a lost connection.
                    self.reconnects += 1;
                    reconnected = true;
                    let mut c =
                        connect(&self.config).map_err(|e| StoreError::Backend(e.to_string()))?;
                    configure(&mut c.client, &self.config)
                        .map_err(|e| StoreError::Backend(e.to_string()))?;
                    c
                }
            };
            let conn = self.conn.insert(conn);
            let err = match op(conn) {
                Ok(v) => return Ok(v),
                Err(Fail::Store(e)) => return Err(e),
                Err(Fail::Commit(e)) => {
                    if connection_lost(&e) {
                        self.conn = None;
                        return Err(StoreError::Backend(format!(
                            "connection to PostgreSQL lost during COMMIT, the change may or may \
                             not have been applied: {}",
                            backend(&e)
                        )));
                    }
                    e
                }
                Err(Fail::Pg(e)) => e,
            };
            if conflict(&err) && conflicts < CONFLICT_RETRIES {
                conflicts += 1;
                continue;
            }
            if connection_lost(&err) {
                self.conn = None;
                if !reconnected {
                    // The top of the loop reconnects (once per call).
                    continue;
                }
            }
            return Err(backend(&err));
        }
    }
}

impl Drop for PgStore {
    fn drop(&mut self) {
        // The blocking client runs a runtime of its own, which may not be shut down from
        // inside async code (a supernode that fails to bind drops its store there): close
        // such a connection on a plain thread instead.
        if let Some(conn) = self.conn.take() {
            if tokio_context() {
                let _ = std::thread::Builder::new()
                    .name("peerline-pg-close".into())
                    .spawn(move || drop(conn));
            }
        }
    }
}

/// Whether this thread is inside a tokio runtime.
fn tokio_context() -> bool {
    tokio::runtime::Handle::try_current().is_ok()
}

fn connect(config: &postgres::Config) -> Result<Conn, OpenError> {
    let client = config.connect(NoTls).map_err(|e| OpenError::Connect {
        target: target(config),
        reason: describe(&e),
    })?;
    Ok(Conn {
        client,
        statements: HashMap::new(),
    })
}

/// Applies [`SESSION_SETTINGS`] to a new connection.
fn configure(client: &mut Client, config: &postgres::Config) -> Result<(), OpenError> {
    client
        .batch_execute(SESSION_SETTINGS)
        .map_err(|e| OpenError::Connect {
            target: target(config),
            reason: describe(&e),
        })
}

/// Applies the missing `migrations` under the advisory lock.
fn migrate(
    client: &mut Client,
    config: &postgres::Config,
    migrations: &[Migration],
) -> Result<(), OpenError> {
    let connect_err = |e| OpenError::Connect {
        target: target(config),
        reason: describe(&e),
    };
    // Session lock: a second supernode starting now waits here until the first one has
    // finished, then finds every migration recorded. Released below, or by the server
    // when the connection ends.
    client
        .execute("SELECT pg_advisory_lock($1)", &[&MIGRATION_LOCK])
        .map_err(connect_err)?;
    let result = apply(client, config, migrations);
    let unlock = client
        .execute("SELECT pg_advisory_unlock($1)", &[&MIGRATION_LOCK])
        .map_err(connect_err);
    result.and(unlock.map(drop))
}

fn apply(
    client: &mut Client,
    config: &postgres::Config,
    migrations: &[Migration],
) -> Result<(), OpenError> {
    let connect_err = |e| OpenError::Connect {
        target: target(config),
        reason: describe(&e),
    };
    client
        .batch_execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (
                version    integer     NOT NULL PRIMARY KEY,
                name       text        NOT NULL,
                applied_at timestamptz NOT NULL DEFAULT now()
            )",
        )
        .map_err(connect_err)?;
    let found: i32 = client
        .query_one(
            "SELECT COALESCE(max(version), 0) FROM schema_migrations",
            &[],
        )
        .and_then(|r| r.try_get(0))
        .map_err(connect_err)?;
    let supported = migrations.last().map_or(0, |m| m.version);
    if found > supported {
        return Err(OpenError::TooNew {
            target: target(config),
            found,
            supported,
        });
    }
    for m in migrations.iter().filter(|m| m.version > found) {
        let step = |client: &mut Client| -> Result<(), postgres::Error> {
            let mut tx = client.transaction()?;
            tx.batch_execute(m.sql)?;
            tx.execute(
                "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)",
                &[&m.version, &m.name],
            )?;
            tx.commit()
        };
        step(client).map_err(|e| OpenError::Migrate {
            target: target(config),
            name: m.name,
            reason: describe(&e),
        })?;
    }
    Ok(())
}

/// Database code of a contact state. `None` is never stored.
fn state_code(state: ContactState) -> Option<i16> {
    match state {
        ContactState::Requested => Some(1),
        ContactState::Incoming => Some(2),
        ContactState::Accepted => Some(3),
        ContactState::Blocked => Some(4),
        ContactState::None => None,
    }
}

fn state_from_code(code: i16) -> Result<ContactState, StoreError> {
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

/// UTF-8 text stored as bytea.
fn utf8(what: &str, v: Vec<u8>) -> Result<String, StoreError> {
    String::from_utf8(v)
        .map_err(|_| StoreError::Backend(format!("database holds a {what} that is not UTF-8")))
}

fn get<'a, T: postgres::types::FromSql<'a>>(row: &'a postgres::Row, i: usize) -> Result<T, Fail> {
    row.try_get(i).map_err(pg)
}

const INSERT_ACCOUNT: &str =
    "INSERT INTO accounts (username, password_hash, created_at) VALUES ($1, $2, $3)";
const INSERT_DEVICE: &str =
    "INSERT INTO devices (noise_key, username, device_id, sign_key, revoked)
     VALUES ($1, $2, $3, $4, $5)";
const UPSERT_CONTACT: &str =
    "INSERT INTO contacts (owner, peer, state, note) VALUES ($1, $2, $3, $4)
     ON CONFLICT (owner, peer) DO UPDATE SET state = excluded.state, note = excluded.note";
const DELETE_CONTACT: &str = "DELETE FROM contacts WHERE owner = $1 AND peer = $2";

fn insert_device(tx: &mut Transaction<'_>, st: &Statement, device: &Device) -> Result<(), Fail> {
    tx.execute(
        st,
        &[
            &&device.noise_key[..],
            &device.username.as_str(),
            &&device.device_id[..],
            &&device.sign_key[..],
            &device.revoked,
        ],
    )
    .map_err(insert_err)?;
    Ok(())
}

/// Inserts, replaces or deletes one directed contact row inside `tx`.
fn put_contact(
    tx: &mut Transaction<'_>,
    [upsert, delete]: &[Statement; 2],
    owner: &Username,
    peer: &Username,
    row: Option<(ContactState, &str)>,
) -> Result<(), Fail> {
    match row.and_then(|(state, note)| state_code(state).map(|code| (code, note))) {
        Some((code, note)) => tx.execute(
            upsert,
            &[&owner.as_str(), &peer.as_str(), &code, &note.as_bytes()],
        ),
        // `ContactState::None` means "no relationship": the row is deleted.
        None => tx.execute(delete, &[&owner.as_str(), &peer.as_str()]),
    }
    .map_err(pg)?;
    Ok(())
}

fn device_from_row(row: &postgres::Row) -> Result<Device, Fail> {
    Ok(Device {
        username: username(get(row, 0)?)?,
        device_id: key("device id", get(row, 1)?)?,
        noise_key: key("noise key", get(row, 2)?)?,
        sign_key: key("signing key", get(row, 3)?)?,
        revoked: get(row, 4)?,
    })
}

fn contact_from_row(row: &postgres::Row) -> Result<ContactRow, Fail> {
    Ok(ContactRow {
        peer: username(get(row, 0)?)?,
        state: state_from_code(get(row, 1)?)?,
        note: utf8("contact note", get(row, 2)?)?,
    })
}

impl PgStore {
    /// Bulk import for benchmarks and migrations from another store: every account with
    /// its first device, then each pair in `pairs` as mutually accepted contacts, in one
    /// transaction (nothing is written if any row fails).
    pub fn bulk_import(
        &mut self,
        accounts: &[(Account, Device)],
        pairs: &[(Username, Username)],
    ) -> Result<(), StoreError> {
        self.run(|c| {
            let (mut tx, [acc, dev, upsert, delete]) = c.begin([
                INSERT_ACCOUNT,
                INSERT_DEVICE,
                UPSERT_CONTACT,
                DELETE_CONTACT,
            ])?;
            let contact = [upsert, delete];
            for (account, device) in accounts {
                if device.username != account.username {
                    return Err(StoreError::Backend(format!(
                        "first device belongs to {} but the account is {}",
                        device.username, account.username
                    ))
                    .into());
                }
                tx.execute(
                    &acc,
                    &[
                        &account.username.as_str(),
                        &account.password_hash,
                        &to_sql_u64(account.created_at),
                    ],
                )
                .map_err(insert_err)?;
                insert_device(&mut tx, &dev, device)?;
            }
            for (a, b) in pairs {
                let accepted = Some((ContactState::Accepted, ""));
                put_contact(&mut tx, &contact, a, b, accepted)?;
                put_contact(&mut tx, &contact, b, a, accepted)?;
            }
            commit(tx)
        })
    }
}

impl Store for PgStore {
    fn create_account(&mut self, account: &Account, device: &Device) -> Result<(), StoreError> {
        if device.username != account.username {
            return Err(StoreError::Backend(format!(
                "first device belongs to {} but the account is {}",
                device.username, account.username
            )));
        }
        self.run(|c| {
            let (mut tx, [acc, dev]) = c.begin([INSERT_ACCOUNT, INSERT_DEVICE])?;
            tx.execute(
                &acc,
                &[
                    &account.username.as_str(),
                    &account.password_hash,
                    &to_sql_u64(account.created_at),
                ],
            )
            .map_err(insert_err)?;
            insert_device(&mut tx, &dev, device)?;
            // An error above drops `tx`, which rolls back: nothing is written.
            commit(tx)
        })
    }

    fn account(&mut self, name: &Username) -> Result<Option<Account>, StoreError> {
        self.run(|c| {
            let st = c.stmt(
                "SELECT username, password_hash, created_at FROM accounts WHERE username = $1",
            )?;
            let row = c.client.query_opt(&st, &[&name.as_str()]).map_err(pg)?;
            row.map(|r| {
                Ok(Account {
                    username: username(get(&r, 0)?)?,
                    password_hash: get(&r, 1)?,
                    created_at: from_sql_u64(get(&r, 2)?),
                })
            })
            .transpose()
        })
    }

    fn add_device(&mut self, device: &Device) -> Result<(), StoreError> {
        self.run(|c| {
            // FOR SHARE: the account cannot disappear before the device row is in.
            let (mut tx, [exists, dev]) = c.begin([
                "SELECT 1 FROM accounts WHERE username = $1 FOR SHARE",
                INSERT_DEVICE,
            ])?;
            if tx
                .query_opt(&exists, &[&device.username.as_str()])
                .map_err(pg)?
                .is_none()
            {
                return Err(StoreError::NotFound.into());
            }
            insert_device(&mut tx, &dev, device)?;
            commit(tx)
        })
    }

    fn device_by_noise_key(&mut self, noise_key: &[u8; 32]) -> Result<Option<Device>, StoreError> {
        self.run(|c| {
            let st = c.stmt(
                "SELECT username, device_id, noise_key, sign_key, revoked
                 FROM devices WHERE noise_key = $1",
            )?;
            let row = c.client.query_opt(&st, &[&&noise_key[..]]).map_err(pg)?;
            row.as_ref().map(device_from_row).transpose()
        })
    }

    fn revoke_device(&mut self, noise_key: &[u8; 32]) -> Result<(), StoreError> {
        self.run(|c| {
            let (mut tx, [st]) =
                c.begin(["UPDATE devices SET revoked = true WHERE noise_key = $1"])?;
            if tx.execute(&st, &[&&noise_key[..]]).map_err(pg)? == 0 {
                return Err(StoreError::NotFound.into());
            }
            commit(tx)
        })
    }

    fn devices_of(&mut self, username: &Username) -> Result<Vec<Device>, StoreError> {
        self.run(|c| {
            let st = c.stmt(
                "SELECT username, device_id, noise_key, sign_key, revoked
                 FROM devices WHERE username = $1 ORDER BY noise_key",
            )?;
            let rows = c.client.query(&st, &[&username.as_str()]).map_err(pg)?;
            rows.iter().map(device_from_row).collect()
        })
    }

    fn next_serial(&mut self) -> Result<u64, StoreError> {
        self.run(|c| {
            // In a transaction of its own: nextval takes a transaction id, so the commit
            // flushes the sequence's WAL record and a crash cannot hand the value out again.
            let (mut tx, [st]) = c.begin(["SELECT nextval('cert_serial')"])?;
            let serial: i64 = get(&tx.query_one(&st, &[]).map_err(pg)?, 0)?;
            commit(tx)?;
            Ok(positive("certificate serial", serial)?)
        })
    }

    fn search_prefix(&mut self, prefix: &str, limit: usize) -> Result<Vec<Username>, StoreError> {
        if prefix.contains('\0') {
            // No username holds NUL, and PostgreSQL text cannot carry it.
            return Ok(Vec::new());
        }
        // A range on the primary key (collation "C"): no LIKE, so `%` and `_` are plain
        // characters, and the b-tree serves it.
        let end = prefix_successor(prefix);
        self.run(|c| {
            let rows = match &end {
                Some(end) => {
                    let st = c.stmt(
                        "SELECT username FROM accounts WHERE username >= $1 AND username < $2
                         ORDER BY username LIMIT $3",
                    )?;
                    c.client.query(&st, &[&prefix, end, &sql_count(limit)])
                }
                None => {
                    let st = c.stmt(
                        "SELECT username FROM accounts WHERE username >= $1
                         ORDER BY username LIMIT $2",
                    )?;
                    c.client.query(&st, &[&prefix, &sql_count(limit)])
                }
            }
            .map_err(pg)?;
            rows.iter().map(|r| Ok(username(get(r, 0)?)?)).collect()
        })
    }

    fn contact(
        &mut self,
        owner: &Username,
        peer: &Username,
    ) -> Result<Option<ContactRow>, StoreError> {
        self.run(|c| {
            let st =
                c.stmt("SELECT peer, state, note FROM contacts WHERE owner = $1 AND peer = $2")?;
            let row = c
                .client
                .query_opt(&st, &[&owner.as_str(), &peer.as_str()])
                .map_err(pg)?;
            row.as_ref().map(contact_from_row).transpose()
        })
    }

    fn set_contact_pair(
        &mut self,
        a: &Username,
        a_row: Option<(ContactState, &str)>,
        b: &Username,
        b_row: Option<(ContactState, &str)>,
    ) -> Result<(), StoreError> {
        // Rows in owner order: two supernodes changing the same pair from either side
        // lock the rows in the same order and so cannot deadlock.
        let (first, second) = if a.as_str() <= b.as_str() {
            ((a, b, a_row), (b, a, b_row))
        } else {
            ((b, a, b_row), (a, b, a_row))
        };
        self.run(|c| {
            let (mut tx, sts) = c.begin([UPSERT_CONTACT, DELETE_CONTACT])?;
            put_contact(&mut tx, &sts, first.0, first.1, first.2)?;
            put_contact(&mut tx, &sts, second.0, second.1, second.2)?;
            commit(tx)
        })
    }

    fn contacts(
        &mut self,
        owner: &Username,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<ContactRow>, StoreError> {
        self.run(|c| {
            let st = c.stmt(
                "SELECT peer, state, note FROM contacts WHERE owner = $1
                 ORDER BY peer LIMIT $2 OFFSET $3",
            )?;
            let rows = c
                .client
                .query(
                    &st,
                    &[&owner.as_str(), &sql_count(limit), &sql_count(offset)],
                )
                .map_err(pg)?;
            rows.iter().map(contact_from_row).collect()
        })
    }

    fn accepted_contacts(&mut self, owner: &Username) -> Result<Vec<Username>, StoreError> {
        let accepted = state_code(ContactState::Accepted);
        self.run(|c| {
            let st =
                c.stmt("SELECT peer FROM contacts WHERE owner = $1 AND state = $2 ORDER BY peer")?;
            let rows = c
                .client
                .query(&st, &[&owner.as_str(), &accepted])
                .map_err(pg)?;
            rows.iter().map(|r| Ok(username(get(r, 0)?)?)).collect()
        })
    }

    fn queue_message(
        &mut self,
        msg: &NewMessage,
        quota: usize,
    ) -> Result<QueueOutcome, StoreError> {
        let from = msg.from.as_str();
        let to = msg.to.as_str();
        let msg_id = to_sql_u64(msg.msg_id);
        self.run(|c| {
            let (mut tx, [make_box, lock_box, existing, count, insert]) = c.begin([
                "INSERT INTO mailboxes (recipient) VALUES ($1) ON CONFLICT DO NOTHING",
                "SELECT 1 FROM mailboxes WHERE recipient = $1 FOR UPDATE",
                "SELECT id FROM messages WHERE sender = $1 AND msg_id = $2",
                "SELECT COUNT(*) FROM (SELECT 1 FROM messages WHERE recipient = $1 LIMIT $2) q",
                "INSERT INTO messages (sender, recipient, msg_id, sent_at, text)
                 VALUES ($1, $2, $3, $4, $5) ON CONFLICT (sender, msg_id) DO NOTHING RETURNING id",
            ])?;
            // Every writer for this recipient, on any supernode, takes the mailbox row
            // lock first: the count below cannot go stale before the insert commits.
            // (Two statements: a row another writer inserts meanwhile is seen only by
            // the next statement's snapshot.)
            tx.execute(&make_box, &[&to]).map_err(pg)?;
            tx.query_one(&lock_box, &[&to]).map_err(pg)?;
            let dup = |tx: &mut Transaction<'_>| -> Result<Option<u64>, Fail> {
                match tx.query_opt(&existing, &[&from, &msg_id]).map_err(pg)? {
                    Some(r) => Ok(Some(positive("message id", get(&r, 0)?)?)),
                    None => Ok(None),
                }
            };
            if let Some(id) = dup(&mut tx)? {
                return Ok(QueueOutcome::Duplicate(id));
            }
            // Count at most `quota` rows: the index range scan stops there.
            let waiting: i64 = get(
                &tx.query_one(&count, &[&to, &sql_count(quota)])
                    .map_err(pg)?,
                0,
            )?;
            if waiting >= sql_count(quota) {
                return Ok(QueueOutcome::MailboxFull);
            }
            let row = tx
                .query_opt(
                    &insert,
                    &[
                        &from,
                        &to,
                        &msg_id,
                        &to_sql_u64(msg.sent_at),
                        &msg.text.as_bytes(),
                    ],
                )
                .map_err(pg)?;
            let Some(row) = row else {
                // The same (from, msg_id) to another recipient committed meanwhile.
                return match dup(&mut tx)? {
                    Some(id) => Ok(QueueOutcome::Duplicate(id)),
                    None => Err(StoreError::Backend(
                        "message id conflict vanished; try again".into(),
                    )
                    .into()),
                };
            };
            let id = positive("message id", get(&row, 0)?)?;
            // Acknowledged to the sender only after this returns.
            commit(tx)?;
            Ok(QueueOutcome::Queued(id))
        })
    }

    fn pending_messages(
        &mut self,
        to: &Username,
        limit: usize,
    ) -> Result<Vec<StoredMessage>, StoreError> {
        self.run(|c| {
            let st = c.stmt(
                "SELECT id, sender, recipient, msg_id, sent_at, text FROM messages
                 WHERE recipient = $1 ORDER BY id LIMIT $2",
            )?;
            let rows = c
                .client
                .query(&st, &[&to.as_str(), &sql_count(limit)])
                .map_err(pg)?;
            rows.iter()
                .map(|r| {
                    Ok(StoredMessage {
                        id: positive("message id", get(r, 0)?)?,
                        msg: NewMessage {
                            from: username(get(r, 1)?)?,
                            to: username(get(r, 2)?)?,
                            msg_id: from_sql_u64(get(r, 3)?),
                            sent_at: from_sql_u64(get(r, 4)?),
                            text: utf8("message text", get(r, 5)?)?,
                        },
                    })
                })
                .collect()
        })
    }

    fn delete_message(&mut self, to: &Username, id: u64) -> Result<bool, StoreError> {
        let Ok(id) = i64::try_from(id) else {
            return Ok(false);
        };
        self.run(|c| {
            let (mut tx, [st]) =
                c.begin(["DELETE FROM messages WHERE id = $1 AND recipient = $2"])?;
            let n = tx.execute(&st, &[&id, &to.as_str()]).map_err(pg)?;
            commit(tx)?;
            Ok(n > 0)
        })
    }
}

#[cfg(test)]
mod tests;
