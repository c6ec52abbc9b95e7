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

impl Db {
    fn open(path: &Path, store: &'static str, schema: &str) -> anyhow::Result<Self> {
        let conn = Connection::open(path)
            .map_err(|e| anyhow::anyhow!("{store} store: cannot open {}: {e}", path.display()))?;
        conn.execute_batch(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL; PRAGMA foreign_keys=ON;
             PRAGMA busy_timeout=5000;",
        )
        .and_then(|()| conn.execute_batch(schema))
        .map_err(|e| anyhow::anyhow!("{store} store: cannot prepare {}: {e}", path.display()))?;
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

/// Opens both embedded stores in `dir`, creating it if needed.
pub fn open(dir: &Path) -> anyhow::Result<(SqliteDocuments, SqliteEvents)> {
    std::fs::create_dir_all(dir)
        .map_err(|e| anyhow::anyhow!("KM_DATA_DIR: cannot create {}: {e}", dir.display()))?;
    Ok((
        SqliteDocuments::open(&dir.join("documents.sqlite"))?,
        SqliteEvents::open(&dir.join("events.sqlite"))?,
    ))
}
