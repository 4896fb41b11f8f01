//! Message history in the profile dir (SQLite), deduplicated on `(sender, msg_id)`.

use std::path::Path;

use rusqlite::{params, Connection};
use serde::Serialize;

/// One message, sent or received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Entry {
    /// Sender.
    pub from: String,
    /// Recipient.
    pub to: String,
    /// Text.
    pub text: String,
    /// Sender's clock when written (unix ms).
    pub time: u64,
    /// `direct`, `relay` or `offline`.
    pub via: String,
    /// Sender's message id.
    #[serde(skip)]
    pub msg_id: u64,
}

/// The history database.
#[derive(Debug)]
pub struct History {
    conn: Connection,
}

impl History {
    /// Opens (creating) the history at `path`.
    pub fn open(path: &Path) -> rusqlite::Result<Self> {
        let conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.busy_timeout(std::time::Duration::from_secs(5))?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS messages (
                id INTEGER PRIMARY KEY AUTOINCREMENT,
                sender TEXT NOT NULL,
                recipient TEXT NOT NULL,
                text TEXT NOT NULL,
                time INTEGER NOT NULL,
                via TEXT NOT NULL,
                msg_id INTEGER NOT NULL,
                UNIQUE(sender, msg_id)
            );
            CREATE INDEX IF NOT EXISTS messages_by_peer ON messages(sender, recipient);",
        )?;
        Ok(History { conn })
    }

    /// Adds an entry; returns false if `(from, msg_id)` was already there.
    pub fn add(&self, e: &Entry) -> rusqlite::Result<bool> {
        // u64 ids and times are stored bit-for-bit in SQLite's signed integers.
        let n = self.conn.execute(
            "INSERT OR IGNORE INTO messages (sender, recipient, text, time, via, msg_id) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
            params![e.from, e.to, e.text, e.time as i64, e.via, e.msg_id as i64],
        )?;
        Ok(n == 1)
    }

    /// All messages, or those exchanged with `peer`, oldest first.
    pub fn list(&self, peer: Option<&str>) -> rusqlite::Result<Vec<Entry>> {
        let mut stmt = self.conn.prepare(
            "SELECT sender, recipient, text, time, via, msg_id FROM messages
             WHERE ?1 IS NULL OR sender = ?1 OR recipient = ?1 ORDER BY id",
        )?;
        let rows = stmt.query_map(params![peer], |r| {
            Ok(Entry {
                from: r.get(0)?,
                to: r.get(1)?,
                text: r.get(2)?,
                time: r.get::<_, i64>(3)? as u64,
                via: r.get(4)?,
                msg_id: r.get::<_, i64>(5)? as u64,
            })
        })?;
        rows.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dedups_and_filters() {
        let d = tempfile::tempdir().unwrap();
        let h = History::open(&d.path().join("h.sqlite")).unwrap();
        let e = Entry {
            from: "alice".into(),
            to: "bob".into(),
            text: "hi".into(),
            time: 1,
            via: "direct".into(),
            msg_id: u64::MAX,
        };
        assert!(h.add(&e).unwrap());
        assert!(!h.add(&e).unwrap());
        let f = Entry {
            from: "carol".into(),
            to: "bob".into(),
            msg_id: 2,
            ..e.clone()
        };
        assert!(h.add(&f).unwrap());
        assert_eq!(h.list(None).unwrap().len(), 2);
        assert_eq!(h.list(Some("alice")).unwrap(), vec![e]);
    }
}
