//! Throwaway databases for tests (this crate's and those of crates that run a supernode
//! on PostgreSQL).
//!
//! The server comes from `PEERLINE_TEST_PG_URL`, whose role must have `CREATEDB`.
//! [`TestDb::create`] makes a uniquely named database and drops it (closing any
//! connection left) when the value is dropped, so tests run in parallel without sharing
//! rows. Tests fail, never skip, when the variable is unset.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::sync::atomic::{AtomicU32, Ordering};

use postgres::{Client, NoTls};

/// The environment variable naming the test server.
pub const URL_VAR: &str = "PEERLINE_TEST_PG_URL";

/// The test server's URL; panics with what to run when it is not set.
pub fn server_url() -> String {
    url_from(std::env::var(URL_VAR).ok()).unwrap_or_else(|why| panic!("{why}"))
}

/// The URL in the variable's value, or the one line to print without it.
fn url_from(value: Option<String>) -> Result<String, String> {
    match value {
        Some(url) if !url.is_empty() => Ok(url),
        _ => Err(format!(
            "{URL_VAR} is not set: start PostgreSQL for the tests with \
             `eval \"$(bash scripts/fleet-services.sh start)\"` and run them again"
        )),
    }
}

/// `url` with its database replaced by `db` (query options kept).
fn with_database(url: &str, db: &str) -> String {
    let (base, query) = match url.split_once('?') {
        Some((b, q)) => (b, format!("?{q}")),
        None => (url, String::new()),
    };
    let after_scheme = base.find("://").map_or(0, |i| i + 3);
    let host_end = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    format!("{}/{db}{query}", &base[..host_end])
}

/// Drops test databases left by test processes of this host that no longer run (killed
/// before their `TestDb` was dropped). The server is on loopback, so pids are local.
fn drop_orphans(admin: &mut Client) {
    let Ok(rows) = admin.query(
        "SELECT datname FROM pg_database WHERE datname LIKE 'peerline\\_test\\_%'",
        &[],
    ) else {
        return;
    };
    for row in rows {
        let name: String = row.get(0);
        let pid = name
            .strip_prefix("peerline_test_")
            .and_then(|rest| rest.split('_').next())
            .and_then(|pid| pid.parse::<u32>().ok());
        if let Some(pid) = pid {
            if !std::path::Path::new(&format!("/proc/{pid}")).exists() {
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"));
            }
        }
    }
}

/// A fresh database, dropped with the value.
#[derive(Debug)]
pub struct TestDb {
    server: String,
    name: String,
    url: String,
}

impl TestDb {
    /// Creates a uniquely named empty database on the test server.
    pub fn create() -> TestDb {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let server = server_url();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "peerline_test_{}_{}_{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        let mut admin = Client::connect(&server, NoTls).unwrap_or_else(|e| {
            panic!(
                "cannot connect to {URL_VAR}={}: {e}; start it with \
                 `eval \"$(bash scripts/fleet-services.sh start)\"`",
                crate::redact(&server)
            )
        });
        drop_orphans(&mut admin);
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .unwrap_or_else(|e| panic!("cannot create test database {name}: {e:?}"));
        let url = with_database(&server, &name);
        TestDb { server, name, url }
    }

    /// The database's URL.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Creates the empty schema `name` in the database and returns a URL whose sessions
    /// use it (`search_path`): a fresh store for much less than a database costs.
    pub fn schema_url(&self, name: &str) -> String {
        assert!(
            name.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'),
            "schema name {name:?}"
        );
        self.client()
            .batch_execute(&format!("CREATE SCHEMA {name}"))
            .unwrap_or_else(|e| panic!("cannot create schema {name}: {e:?}"));
        let sep = if self.url.contains('?') { '&' } else { '?' };
        format!("{}{sep}options=-c%20search_path%3D{name}", self.url)
    }

    /// A separate connection to the database, for assertions on its rows.
    pub fn client(&self) -> Client {
        Client::connect(&self.url, NoTls).expect("connect to the test database")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        let server = self.server.clone();
        // The blocking client cannot run inside async code: drop from a plain thread.
        let dropper = std::thread::spawn(move || {
            if let Ok(mut admin) = Client::connect(&server, NoTls) {
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"));
            }
        });
        let _ = dropper.join();
    }
}

#[cfg(test)]
mod tests {
    use super::{url_from, with_database, URL_VAR};

    #[test]
    fn an_unset_or_empty_variable_says_what_to_run() {
        for v in [None, Some(String::new())] {
            let why = url_from(v).unwrap_err();
            assert!(why.starts_with("PEERLINE_TEST_PG_URL is not set"), "{why}");
            assert!(
                why.contains("eval \"$(bash scripts/fleet-services.sh start)\""),
                "{why}"
            );
            assert!(!why.contains('\n'));
        }
        assert_eq!(
            url_from(Some("postgres://u@h/d".into())).unwrap(),
            "postgres://u@h/d"
        );
    }

    #[test]
    fn databases_of_dead_test_processes_are_dropped() {
        // No process has this pid (above the kernel's pid_max).
        let orphan = "peerline_test_4999999_0_1";
        let mut admin = postgres::Client::connect(&super::server_url(), postgres::NoTls).unwrap();
        admin
            .batch_execute(&format!("CREATE DATABASE \"{orphan}\""))
            .unwrap();
        let db = super::TestDb::create();
        let exists = |admin: &mut postgres::Client, name: &str| -> bool {
            admin
                .query_opt("SELECT 1 FROM pg_database WHERE datname = $1", &[&name])
                .unwrap()
                .is_some()
        };
        assert!(!exists(&mut admin, orphan), "the orphan was dropped");
        assert!(
            exists(&mut admin, db.name()),
            "a live process's database stays"
        );
        let name = db.name().to_string();
        drop(db);
        assert!(!exists(&mut admin, &name), "dropped with the value");
    }

    /// Runs a database test in a child without the variable: it fails (not skips), and
    /// its output names the command to run.
    #[test]
    fn tests_fail_without_the_server_variable() {
        if std::env::var_os("PEERLINE_PG_CHILD").is_some() {
            super::TestDb::create();
            return;
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "testing::tests::tests_fail_without_the_server_variable",
                "--nocapture",
                "--test-threads=1",
            ])
            .env("PEERLINE_PG_CHILD", "1")
            .env_remove(URL_VAR)
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "the child test passed without a server"
        );
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains("PEERLINE_TEST_PG_URL is not set: start PostgreSQL for the tests with `eval \"$(bash scripts/fleet-services.sh start)\"`"),
            "{text}"
        );
    }

    #[test]
    fn database_is_replaced_and_options_kept() {
        assert_eq!(
            with_database("postgres://u@h:1/peerline", "t1"),
            "postgres://u@h:1/t1"
        );
        assert_eq!(
            with_database("postgres://u:p@h:1/db?connect_timeout=3", "t2"),
            "postgres://u:p@h:1/t2?connect_timeout=3"
        );
        assert_eq!(with_database("postgres://u@h", "t3"), "postgres://u@h/t3");
    }
}
