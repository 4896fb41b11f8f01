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
            CREATE INDEX IF NOT EXISTS messages_by_peer ON messages(sender, recipient);
            CREATE TABLE IF NOT EXISTS read_marks (
                peer TEXT PRIMARY KEY,
                last_id INTEGER NOT NULL
            );",
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

/// Per-peer summary for a contact list: when the last message was written and how many
/// received messages are unread.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PeerSummary {
    /// The other party.
    pub peer: String,
    /// Time of the newest message either way (unix ms).
    pub last_time: u64,
    /// Received messages after the peer's read mark.
    pub unread: u64,
}

impl History {
    /// The newest `limit` messages exchanged with `peer`, oldest first.
    pub fn recent(&self, peer: &str, limit: usize) -> rusqlite::Result<Vec<Entry>> {
        let mut stmt = self.conn.prepare(
            "SELECT sender, recipient, text, time, via, msg_id FROM (
                SELECT id, sender, recipient, text, time, via, msg_id FROM messages
                WHERE sender = ?1 OR recipient = ?1 ORDER BY id DESC LIMIT ?2
             ) ORDER BY id",
        )?;
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let rows = stmt.query_map(params![peer, limit], |r| {
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

    /// Marks every message received from `peer` so far as read.
    pub fn mark_read(&self, peer: &str) -> rusqlite::Result<()> {
        self.conn.execute(
            "INSERT INTO read_marks (peer, last_id)
             SELECT ?1, COALESCE(MAX(id), 0) FROM messages WHERE sender = ?1
             ON CONFLICT(peer) DO UPDATE SET last_id = excluded.last_id",
            params![peer],
        )?;
        Ok(())
    }

    /// One summary per peer that `me` exchanged messages with.
    pub fn summaries(&self, me: &str) -> rusqlite::Result<Vec<PeerSummary>> {
        let mut stmt = self.conn.prepare(
            "SELECT p.peer, MAX(m.time),
                    SUM(CASE WHEN m.sender = p.peer AND m.id > COALESCE(r.last_id, 0) THEN 1 ELSE 0 END)
             FROM (SELECT id, CASE WHEN sender = ?1 THEN recipient ELSE sender END AS peer FROM messages) p
             JOIN messages m ON m.id = p.id
             LEFT JOIN read_marks r ON r.peer = p.peer
             GROUP BY p.peer ORDER BY p.peer",
        )?;
        let rows = stmt.query_map(params![me], |r| {
            Ok(PeerSummary {
                peer: r.get(0)?,
                last_time: r.get::<_, i64>(1)? as u64,
                unread: r.get::<_, i64>(2)? as u64,
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

    #[test]
    fn unread_counts_follow_the_read_mark() {
        let d = tempfile::tempdir().unwrap();
        let h = History::open(&d.path().join("h.sqlite")).unwrap();
        let msg = |from: &str, to: &str, time: u64, id: u64| Entry {
            from: from.into(),
            to: to.into(),
            text: format!("m{id}"),
            time,
            via: "direct".into(),
            msg_id: id,
        };
        h.add(&msg("bob", "alice", 10, 1)).unwrap();
        h.add(&msg("bob", "alice", 20, 2)).unwrap();
        h.add(&msg("alice", "bob", 30, 1)).unwrap();
        h.add(&msg("carol", "alice", 5, 1)).unwrap();
        let s = h.summaries("alice").unwrap();
        assert_eq!(
            s,
            vec![
                PeerSummary {
                    peer: "bob".into(),
                    last_time: 30,
                    unread: 2
                },
                PeerSummary {
                    peer: "carol".into(),
                    last_time: 5,
                    unread: 1
                },
            ]
        );
        h.mark_read("bob").unwrap();
        h.add(&msg("bob", "alice", 40, 3)).unwrap();
        let s = h.summaries("alice").unwrap();
        assert_eq!(s[0].unread, 1);
        assert_eq!(s[0].last_time, 40);
        // The newest two, oldest first.
        let r = h.recent("bob", 2).unwrap();
        assert_eq!(
            r.iter().map(|e| e.text.as_str()).collect::<Vec<_>>(),
            vec!["m1", "m3"]
        );
    }
}
