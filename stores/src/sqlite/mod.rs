//! Embedded stores on SQLite files in the data dir (WAL mode): `documents.sqlite` and
//! `events.sqlite`, each behind one connection used from blocking threads.

mod documents;
mod events;

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;
use rusqlite::Connection;

pub use documents::SqliteDocuments;
pub use events::SqliteEvents;

use super::{StoreError, StoreResult};

/// One SQLite connection, used off the async runtime.
#[derive(Clone)]
struct Db {
    conn: Arc<Mutex<Connection>>,
    store: &'static str,
}

/// What a migration does that SQL alone cannot (a new table filled from the old rows),
/// in the migration's transaction.
type Fill = fn(&rusqlite::Transaction) -> rusqlite::Result<()>;

impl Db {
    /// Opens the file and brings its schema to the newest version: `migrations[i]` takes
    /// a database from version `i` to `i + 1` (SQLite's `user_version`), and a `(v, fill)`
    /// of `fills` runs once it reached version `v`.
    fn open(
        path: &Path,
        store: &'static str,
        migrations: &[&str],
        fills: &[(usize, Fill)],
    ) -> anyhow::Result<Self> {
        let mut conn = Connection::open(path)
            .map_err(|e| anyhow::anyhow!("{store} store: cannot open {}: {e}", path.display()))?;
        // Several processes (the roles apart) open the file at once, and switching a new
        // file to WAL answers "locked" without waiting: try again for a few seconds.
        let mut attempts = 0;
        let version = loop {
            match prepare(&mut conn, migrations, fills) {
                Err(e) if is_locked(&e) && attempts < 100 => {
                    attempts += 1;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => {
                    anyhow::bail!("{store} store: cannot prepare {}: {e}", path.display())
                }
                Ok(version) => break version,
            }
        };
        if version > migrations.len() {
            anyhow::bail!(
                "{store} store: {} has schema version {version}, newer than this km knows ({}): run a newer km",
                path.display(),
                migrations.len()
            );
        }
        Ok(Db {
            conn: Arc::new(Mutex::new(conn)),
            store,
        })
    }

    /// Runs `f` with the connection on a blocking thread.
    async fn call<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> rusqlite::Result<T> + Send + 'static,
    {
        let conn = self.conn.clone();
        let store = self.store;
        tokio::task::spawn_blocking(move || f(&mut conn.lock()))
            .await
            .map_err(|e| StoreError::Unavailable {
                store,
                reason: e.to_string(),
            })?
            .map_err(|e| unavailable(store, e))
    }
}

fn unavailable(store: &'static str, e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable {
        store,
        reason: e.to_string(),
    }
}

/// The data dir, created if needed.
fn data_dir(dir: &Path) -> anyhow::Result<&Path> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("KM_DATA_DIR: cannot create {}: {e}", dir.display()))?;
    Ok(dir)
}

/// The file every `km serve` holds a shared lock on, and a restore an exclusive one.
pub const LOCK_FILE: &str = "km.lock";
/// The file in the data dir km writes to ask for the setup wizard; on the appliance a
/// systemd path unit (`km-wizard-start.path`) sees it and root starts the wizard, so the
/// roles never hold root.
pub const WIZARD_START_REQUEST: &str = "wizard-start";

/// The data dir's lock, shared: held while km serves, so a restore waits for km to stop.
pub fn lock_data_dir_shared(dir: &Path) -> anyhow::Result<std::fs::File> {
    let file = lock_file(dir)?;
    file.lock_shared()
        .map_err(|e| anyhow::anyhow!("KM_DATA_DIR: cannot lock {}: {e}", dir.display()))?;
    Ok(file)
}

/// The data dir's lock, alone: refused while any km serves from it.
pub fn lock_data_dir_exclusive(dir: &Path) -> anyhow::Result<std::fs::File> {
    let file = lock_file(dir)?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "km is running on {}: stop it first (on the appliance: systemctl stop km.target)",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            anyhow::bail!("KM_DATA_DIR: cannot lock {}: {e}", dir.display())
        }
    }
}

fn lock_file(dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = data_dir(dir)?.join(LOCK_FILE);
    std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| anyhow::anyhow!("KM_DATA_DIR: cannot open {}: {e}", path.display()))
}

/// The schema version of the database at `path` (read only).
pub fn schema_of(path: &Path) -> rusqlite::Result<i64> {
    let conn = Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.query_row("PRAGMA user_version", [], |r| r.get(0))
}

/// The newest schema version this km knows of an embedded store (`documents`, `events`).
pub fn schema_version(store: &str) -> Option<usize> {
    match store {
        "documents" => Some(documents::MIGRATIONS.len()),
        "events" => Some(events::MIGRATIONS.len()),
        _ => None,
    }
}

/// The embedded documents store in `dir`.
pub fn open_documents(dir: &Path) -> anyhow::Result<SqliteDocuments> {
    SqliteDocuments::open(&data_dir(dir)?.join("documents.sqlite"))
}

/// The embedded events store in `dir`.
pub fn open_events(dir: &Path) -> anyhow::Result<SqliteEvents> {
    SqliteEvents::open(&data_dir(dir)?.join("events.sqlite"))
}

/// Sets the connection up and migrates; returns the schema version found (migrations
/// run only from a version this km knows).
fn prepare(
    conn: &mut Connection,
    migrations: &[&str],
    fills: &[(usize, Fill)],
) -> rusqlite::Result<usize> {
    conn.execute_batch(
        "PRAGMA busy_timeout=5000; PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
         PRAGMA foreign_keys=ON;",
    )?;
    // One process migrates; the others then find the schema done (the version is read
    // inside the write lock).
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let version: usize = tx
        .query_row("PRAGMA user_version", [], |r| r.get::<_, i64>(0))?
        .try_into()
        .unwrap_or(usize::MAX);
    if version > migrations.len() {
        return Ok(version);
    }
    for (from, migration) in migrations.iter().enumerate().skip(version) {
        tx.execute_batch(migration)?;
        for (_, fill) in fills.iter().filter(|(at, _)| *at == from + 1) {
            fill(&tx)?;
        }
        tx.pragma_update(None, "user_version", from + 1)?;
    }
    tx.commit()?;
    Ok(version)
}

fn is_locked(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reopening_keeps_data_and_refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        drop(open_events(dir.path()).unwrap());
        drop(open_events(dir.path()).unwrap());
        let conn = Connection::open(dir.path().join("events.sqlite")).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
        drop(conn);
        let err = open_events(dir.path())
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.contains("newer than this km"), "{err}");
    }
}
