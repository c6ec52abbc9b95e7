//! Users, tokens, buckets, memberships and server records in SQLite.

use std::path::Path;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, Row, params};

use super::Db;
use crate::{
    Bucket, Documents, Member, MemberRole, Notification, ParkedServer, PasswordReset, ServerRecord,
    StoreError, StoreResult, TokenRecord, User,
};

/// Schema migrations, oldest first (see `Db::open`).
pub(super) const MIGRATIONS: &[&str] = &[
    "
CREATE TABLE users (
  id TEXT PRIMARY KEY, username TEXT NOT NULL UNIQUE, email TEXT NOT NULL UNIQUE,
  password_hash TEXT NOT NULL, role TEXT NOT NULL, created_at INTEGER NOT NULL);
CREATE TABLE tokens (
  access_digest TEXT PRIMARY KEY, refresh_digest TEXT NOT NULL UNIQUE,
  user_id TEXT NOT NULL REFERENCES users(id), client_id TEXT NOT NULL,
  access_expires_at INTEGER NOT NULL, refresh_expires_at INTEGER NOT NULL);
CREATE TABLE buckets (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, public_id TEXT NOT NULL UNIQUE,
  secret_id TEXT NOT NULL, owner TEXT NOT NULL REFERENCES users(id), created_at INTEGER NOT NULL);
CREATE TABLE members (
  bucket_id TEXT NOT NULL REFERENCES buckets(id), user_id TEXT NOT NULL REFERENCES users(id),
  role TEXT NOT NULL, PRIMARY KEY (bucket_id, user_id));
CREATE INDEX members_by_user ON members(user_id);
CREATE TABLE servers (
  bucket_id TEXT NOT NULL, server_name TEXT NOT NULL, internal_ip TEXT,
  last_update INTEGER NOT NULL, status_json TEXT NOT NULL, PRIMARY KEY (bucket_id, server_name));
",
    // v2: a server's internal IP is read from its status.
    "
ALTER TABLE servers DROP COLUMN internal_ip;
",
    // v3: servers parked by the process limit.
    "
CREATE TABLE parked_servers (
  bucket_id TEXT NOT NULL, server_name TEXT NOT NULL, reason TEXT NOT NULL,
  processes INTEGER NOT NULL, parked_at INTEGER NOT NULL, PRIMARY KEY (bucket_id, server_name));
",
    // v4: a bucket's agents can be refused.
    "
ALTER TABLE buckets ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
",
    // v5: the periods scheduled jobs ran for.
    "
CREATE TABLE job_slots (
  job TEXT NOT NULL, slot INTEGER NOT NULL, claimed_at INTEGER NOT NULL, PRIMARY KEY (job, slot));
",
    // v6: notifications and their delivery.
    "
CREATE TABLE notifications (
  id TEXT PRIMARY KEY, bucket_id TEXT NOT NULL, created_at INTEGER NOT NULL,
  state TEXT NOT NULL, next_attempt_at INTEGER NOT NULL, doc TEXT NOT NULL);
CREATE INDEX notifications_by_bucket ON notifications(bucket_id, created_at);
CREATE INDEX notifications_due ON notifications(state, next_attempt_at);
",
    // v7: members choose whether they are mailed notifications.
    "
ALTER TABLE members ADD COLUMN notify INTEGER;
",
    // v8: small per-bucket documents (alert rules, channels, report choices, …).
    "
CREATE TABLE bucket_docs (
  bucket_id TEXT NOT NULL, kind TEXT NOT NULL, id TEXT NOT NULL, doc TEXT NOT NULL,
  PRIMARY KEY (bucket_id, kind, id));
",
    // v9: accounts disabled by an admin, password resets, personal tokens.
    "
ALTER TABLE users ADD COLUMN disabled INTEGER NOT NULL DEFAULT 0;
ALTER TABLE users ADD COLUMN reset_digest TEXT;
ALTER TABLE users ADD COLUMN reset_expires_at INTEGER;
ALTER TABLE tokens ADD COLUMN name TEXT NOT NULL DEFAULT '';
ALTER TABLE tokens ADD COLUMN created_at INTEGER NOT NULL DEFAULT 0;
CREATE INDEX tokens_by_user ON tokens(user_id);
",
    // A version after this km's, for the upgrade tests only (the feature
    // test-migration): it fails where the table is already there.
    #[cfg(feature = "test-migration")]
    "
CREATE TABLE upgrade_probe (id INTEGER PRIMARY KEY);
",
];

/// Claimed periods kept per job.
const KEPT_SLOTS: i64 = 1000;

pub struct SqliteDocuments {
    db: Db,
}

impl SqliteDocuments {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(SqliteDocuments {
            db: Db::open(path, "documents", MIGRATIONS, &[])?,
        })
    }

    /// Notifications selected by `sql` (one `doc` column).
    async fn notification_docs(
        &self,
        sql: &'static str,
        params: impl rusqlite::Params + Send + 'static,
    ) -> StoreResult<Vec<Notification>> {
        let docs: Vec<String> = self
            .db
            .call(move |c| {
                let mut stmt = c.prepare_cached(sql)?;
                stmt.query_map(params, |r| r.get(0))?.collect()
            })
            .await?;
        Ok(docs
            .iter()
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect())
    }

    /// Server records, of one bucket or all, of one name or all.
    async fn servers(
        &self,
        bucket_id: Option<String>,
        server_name: Option<String>,
    ) -> StoreResult<Vec<ServerRecord>> {
        self.db
            .call(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT bucket_id, server_name, last_update, status_json FROM servers
                     WHERE (?1 IS NULL OR bucket_id = ?1) AND (?2 IS NULL OR server_name = ?2)",
                )?;
                stmt.query_map([bucket_id, server_name], |r| {
                    Ok(ServerRecord {
                        bucket_id: r.get(0)?,
                        server_name: r.get(1)?,
                        last_update: r.get(2)?,
                        status_json: r.get(3)?,
                    })
                })?
                .collect()
            })
            .await
    }
}

const USER_COLUMNS: &str = "id, username, email, password_hash, role, created_at, disabled, \
     reset_digest, reset_expires_at";
const TOKEN_COLUMNS: &str = "access_digest, refresh_digest, user_id, client_id, \
     access_expires_at, refresh_expires_at, name, created_at";
const BUCKET_COLUMNS: &str = "id, name, public_id, secret_id, owner, created_at, disabled";

fn user_from(row: &Row) -> rusqlite::Result<User> {
    Ok(User {
        id: row.get(0)?,
        username: row.get(1)?,
        email: row.get(2)?,
        password_hash: row.get(3)?,
        role: row.get(4)?,
        created_at: row.get(5)?,
        disabled: row.get(6)?,
        reset: match (row.get(7)?, row.get(8)?) {
            (Some(digest), Some(expires_at)) => Some(PasswordReset { digest, expires_at }),
            _ => None,
        },
    })
}

fn token_from(row: &Row) -> rusqlite::Result<TokenRecord> {
    Ok(TokenRecord {
        access_digest: row.get(0)?,
        refresh_digest: row.get(1)?,
        user_id: row.get(2)?,
        client_id: row.get(3)?,
        access_expires_at: row.get(4)?,
        refresh_expires_at: row.get(5)?,
        name: row.get(6)?,
        created_at: row.get(7)?,
    })
}

fn bucket_from(row: &Row) -> rusqlite::Result<Bucket> {
    Ok(Bucket {
        id: row.get(0)?,
        name: row.get(1)?,
        public_id: row.get(2)?,
        secret_id: row.get(3)?,
        owner: row.get(4)?,
        created_at: row.get(5)?,
        disabled: row.get(6)?,
    })
}

/// A member row (`user_id, username, email, role`); `None` for a role this km does not
/// know, which `member_role` does not count as a membership either.
fn member_from(row: &Row) -> rusqlite::Result<Option<Member>> {
    let Some(role) = MemberRole::parse(&row.get::<_, String>(3)?) else {
        return Ok(None);
    };
    Ok(Some(Member {
        user_id: row.get(0)?,
        username: row.get(1)?,
        email: row.get(2)?,
        role,
        notify: row.get(4)?,
    }))
}

/// Maps a UNIQUE violation on `table.column` to `Conflict(column)`.
fn conflict_field(e: &rusqlite::Error) -> Option<&'static str> {
    let msg = e.to_string();
    if !msg.contains("UNIQUE constraint failed") {
        return None;
    }
    ["username", "email", "public_id"]
        .into_iter()
        .find(|field| msg.contains(&format!(".{field}")))
}

impl SqliteDocuments {
    async fn optional<T, F>(&self, sql: String, key: String, map: F) -> StoreResult<Option<T>>
    where
        T: Send + 'static,
        F: Fn(&Row) -> rusqlite::Result<T> + Send + 'static,
    {
        self.db
            .call(move |c| c.query_row(&sql, [key], |r| map(r)).optional())
            .await
    }
}

#[async_trait]
impl Documents for SqliteDocuments {
    fn kind(&self) -> &'static str {
        "sqlite"
    }

    async fn ping(&self) -> StoreResult<()> {
        self.db
            .call(|c| c.query_row("SELECT 1", [], |_| Ok(())))
            .await
    }

    async fn insert_user(&self, user: &User) -> StoreResult<()> {
        let u = user.clone();
        let inserted = self
            .db
            .call(move |c| {
                match c.execute(
                    &format!(
                        "INSERT INTO users ({USER_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)"
                    ),
                    params![
                        u.id,
                        u.username,
                        u.email,
                        u.password_hash,
                        u.role,
                        u.created_at,
                        u.disabled,
                        u.reset.as_ref().map(|r| &r.digest),
                        u.reset.as_ref().map(|r| r.expires_at)
                    ],
                ) {
                    Ok(_) => Ok(None),
                    Err(e) => match conflict_field(&e) {
                        Some(field) => Ok(Some(field)),
                        None => Err(e),
                    },
                }
            })
            .await?;
        match inserted {
            Some(field) => Err(StoreError::Conflict(field)),
            None => Ok(()),
        }
    }

    async fn count_users(&self) -> StoreResult<u64> {
        self.db
            .call(|c| c.query_row("SELECT COUNT(*) FROM users", [], |r| r.get::<_, i64>(0)))
            .await
            .map(|n| n as u64)
    }

    async fn user_by_login(&self, login: &str) -> StoreResult<Option<User>> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE username = ?1 OR email = ?1");
        self.optional(sql, login.to_string(), user_from).await
    }

    async fn user_by_id(&self, id: &str) -> StoreResult<Option<User>> {
        let sql = format!("SELECT {USER_COLUMNS} FROM users WHERE id = ?1");
        self.optional(sql, id.to_string(), user_from).await
    }

    async fn all_users(&self) -> StoreResult<Vec<User>> {
        self.db
            .call(|c| {
                let sql = format!("SELECT {USER_COLUMNS} FROM users ORDER BY username");
                let mut stmt = c.prepare(&sql)?;
                stmt.query_map([], user_from)?.collect()
            })
            .await
    }

    async fn set_user_disabled(&self, user_id: &str, disabled: bool) -> StoreResult<bool> {
        let user = user_id.to_string();
        self.db
            .call(move |c| {
                let tx = c.transaction()?;
                let found = tx.execute(
                    "UPDATE users SET disabled = ?2 WHERE id = ?1",
                    params![user, disabled],
                )? == 1;
                if disabled {
                    tx.execute("DELETE FROM tokens WHERE user_id = ?1", [&user])?;
                }
                tx.commit().map(|()| found)
            })
            .await
    }

    async fn set_password_reset(
        &self,
        user_id: &str,
        reset: Option<&PasswordReset>,
    ) -> StoreResult<bool> {
        let user = user_id.to_string();
        let (digest, expires_at) = (reset.map(|r| r.digest.clone()), reset.map(|r| r.expires_at));
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE users SET reset_digest = ?2, reset_expires_at = ?3 WHERE id = ?1",
                    params![user, digest, expires_at],
                )
                .map(|n| n == 1)
            })
            .await
    }

    async fn insert_token(&self, token: &TokenRecord) -> StoreResult<()> {
        let t = token.clone();
        self.db
            .call(move |c| {
                c.execute(
                    &format!(
                        "INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)"
                    ),
                    params![
                        t.access_digest,
                        t.refresh_digest,
                        t.user_id,
                        t.client_id,
                        t.access_expires_at,
                        t.refresh_expires_at,
                        t.name,
                        t.created_at
                    ],
                )
                .map(|_| ())
            })
            .await
    }

    async fn token_by_access(&self, access_digest: &str) -> StoreResult<Option<TokenRecord>> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE access_digest = ?1");
        self.optional(sql, access_digest.to_string(), token_from)
            .await
    }

    async fn token_by_refresh(&self, refresh_digest: &str) -> StoreResult<Option<TokenRecord>> {
        let sql = format!("SELECT {TOKEN_COLUMNS} FROM tokens WHERE refresh_digest = ?1");
        self.optional(sql, refresh_digest.to_string(), token_from)
            .await
    }

    async fn delete_token(&self, access_digest: &str) -> StoreResult<()> {
        let key = access_digest.to_string();
        self.db
            .call(move |c| {
                c.execute("DELETE FROM tokens WHERE access_digest = ?1", [key])
                    .map(|_| ())
            })
            .await
    }

    async fn tokens_of_user(&self, user_id: &str) -> StoreResult<Vec<TokenRecord>> {
        let user = user_id.to_string();
        self.db
            .call(move |c| {
                let sql = format!(
                    "SELECT {TOKEN_COLUMNS} FROM tokens WHERE user_id = ?1 ORDER BY created_at"
                );
                let mut stmt = c.prepare(&sql)?;
                stmt.query_map([user], token_from)?.collect()
            })
            .await
    }

    async fn delete_token_pair(&self, user_id: &str, refresh_digest: &str) -> StoreResult<bool> {
        let (user, refresh) = (user_id.to_string(), refresh_digest.to_string());
        self.db
            .call(move |c| {
                c.execute(
                    "DELETE FROM tokens WHERE user_id = ?1 AND refresh_digest = ?2",
                    [user, refresh],
                )
                .map(|n| n == 1)
            })
            .await
    }

    async fn rotate_access(
        &self,
        refresh_digest: &str,
        access_digest: &str,
        expires_at: i64,
    ) -> StoreResult<bool> {
        let (refresh, access) = (refresh_digest.to_string(), access_digest.to_string());
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE tokens SET access_digest = ?1, access_expires_at = ?2 WHERE refresh_digest = ?3",
                    params![access, expires_at, refresh],
                )
                .map(|n| n == 1)
            })
            .await
    }

    async fn insert_bucket(&self, bucket: &Bucket) -> StoreResult<()> {
        let b = bucket.clone();
        let conflict = self
            .db
            .call(move |c| {
                let tx = c.transaction()?;
                if let Err(e) = tx.execute(
                    &format!(
                        "INSERT INTO buckets ({BUCKET_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"
                    ),
                    params![
                        b.id,
                        b.name,
                        b.public_id,
                        b.secret_id,
                        b.owner,
                        b.created_at,
                        b.disabled
                    ],
                ) {
                    return conflict_field(&e).map(Some).ok_or(e);
                }
                tx.execute(
                    "INSERT INTO members (bucket_id, user_id, role) VALUES (?1, ?2, ?3)",
                    params![b.id, b.owner, MemberRole::Owner.as_str()],
                )?;
                tx.commit().map(|()| None)
            })
            .await?;
        conflict.map_or(Ok(()), |field| Err(StoreError::Conflict(field)))
    }

    async fn bucket_by_id(&self, id: &str) -> StoreResult<Option<Bucket>> {
        let sql = format!("SELECT {BUCKET_COLUMNS} FROM buckets WHERE id = ?1");
        self.optional(sql, id.to_string(), bucket_from).await
    }

    async fn bucket_by_public_id(&self, public_id: &str) -> StoreResult<Option<Bucket>> {
        let sql = format!("SELECT {BUCKET_COLUMNS} FROM buckets WHERE public_id = ?1");
        self.optional(sql, public_id.to_string(), bucket_from).await
    }

    async fn buckets_of_user(&self, user_id: &str) -> StoreResult<Vec<Bucket>> {
        let user = user_id.to_string();
        self.db
            .call(move |c| {
                let mut stmt = c.prepare(
                    "SELECT b.id, b.name, b.public_id, b.secret_id, b.owner, b.created_at, b.disabled
                     FROM buckets b JOIN members m ON m.bucket_id = b.id
                     WHERE m.user_id = ?1 ORDER BY b.created_at, b.id",
                )?;
                stmt.query_map([user], bucket_from)?.collect()
            })
            .await
    }

    async fn member_role(&self, bucket_id: &str, user_id: &str) -> StoreResult<Option<MemberRole>> {
        let (bucket, user) = (bucket_id.to_string(), user_id.to_string());
        let role: Option<String> = self
            .db
            .call(move |c| {
                c.query_row(
                    "SELECT role FROM members WHERE bucket_id = ?1 AND user_id = ?2",
                    [bucket, user],
                    |r| r.get(0),
                )
                .optional()
            })
            .await?;
        Ok(role.as_deref().and_then(MemberRole::parse))
    }

    async fn bucket_members(&self, bucket_id: &str) -> StoreResult<Vec<Member>> {
        let bucket = bucket_id.to_string();
        let members: Vec<Option<Member>> = self
            .db
            .call(move |c| {
                let mut stmt = c.prepare(
                    "SELECT m.user_id, u.username, u.email, m.role, m.notify
                     FROM members m JOIN users u ON u.id = m.user_id
                     WHERE m.bucket_id = ?1 ORDER BY m.role <> ?2, u.username",
                )?;
                stmt.query_map(params![bucket, MemberRole::Owner.as_str()], member_from)?
                    .collect()
            })
            .await?;
        Ok(members.into_iter().flatten().collect())
    }

    async fn set_member(
        &self,
        bucket_id: &str,
        user_id: &str,
        role: MemberRole,
    ) -> StoreResult<()> {
        let (bucket, user) = (bucket_id.to_string(), user_id.to_string());
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO members (bucket_id, user_id, role) VALUES (?1, ?2, ?3)
                     ON CONFLICT (bucket_id, user_id) DO UPDATE SET role = excluded.role",
                    params![bucket, user, role.as_str()],
                )
                .map(|_| ())
            })
            .await
    }

    async fn set_member_notify(
        &self,
        bucket_id: &str,
        user_id: &str,
        notify: Option<bool>,
    ) -> StoreResult<bool> {
        let (bucket, user) = (bucket_id.to_string(), user_id.to_string());
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE members SET notify = ?3 WHERE bucket_id = ?1 AND user_id = ?2",
                    params![bucket, user, notify],
                )
                .map(|n| n == 1)
            })
            .await
    }

    async fn remove_member(&self, bucket_id: &str, user_id: &str) -> StoreResult<bool> {
        let (bucket, user) = (bucket_id.to_string(), user_id.to_string());
        self.db
            .call(move |c| {
                c.execute(
                    "DELETE FROM members WHERE bucket_id = ?1 AND user_id = ?2",
                    [bucket, user],
                )
                .map(|n| n == 1)
            })
            .await
    }

    async fn set_bucket_disabled(&self, bucket_id: &str, disabled: bool) -> StoreResult<bool> {
        let bucket = bucket_id.to_string();
        self.db
            .call(move |c| {
                c.execute(
                    "UPDATE buckets SET disabled = ?2 WHERE id = ?1",
                    params![bucket, disabled],
                )
                .map(|n| n == 1)
            })
            .await
    }

    async fn rename_bucket(&self, bucket_id: &str, name: &str) -> StoreResult<bool> {
        let (bucket, name) = (bucket_id.to_string(), name.to_string());
        self.db
            .call(move |c| {
                c.execute("UPDATE buckets SET name = ?2 WHERE id = ?1", [bucket, name])
                    .map(|n| n == 1)
            })
            .await
    }

    async fn transfer_bucket(&self, bucket_id: &str, user_id: &str) -> StoreResult<bool> {
        let (bucket, user) = (bucket_id.to_string(), user_id.to_string());
        self.db
            .call(move |c| {
                let tx = c.transaction()?;
                let member = tx.execute(
                    "UPDATE members SET role = ?3 WHERE bucket_id = ?1 AND user_id = ?2",
                    params![bucket, user, MemberRole::Owner.as_str()],
                )? == 1;
                let previous: Option<String> = tx
                    .query_row("SELECT owner FROM buckets WHERE id = ?1", [&bucket], |r| {
                        r.get(0)
                    })
                    .optional()?;
                let Some(previous) = previous.filter(|_| member) else {
                    return Ok(false);
                };
                if previous != user {
                    tx.execute(
                        "UPDATE members SET role = ?3 WHERE bucket_id = ?1 AND user_id = ?2",
                        params![bucket, previous, MemberRole::Admin.as_str()],
                    )?;
                }
                tx.execute(
                    "UPDATE buckets SET owner = ?2 WHERE id = ?1",
                    [&bucket, &user],
                )?;
                tx.commit().map(|()| true)
            })
            .await
    }

    async fn delete_bucket(&self, bucket_id: &str) -> StoreResult<()> {
        let bucket = bucket_id.to_string();
        self.db
            .call(move |c| {
                let tx = c.transaction()?;
                // Memberships reference the bucket: they go before it.
                tx.execute("DELETE FROM servers WHERE bucket_id = ?1", [&bucket])?;
                tx.execute("DELETE FROM parked_servers WHERE bucket_id = ?1", [&bucket])?;
                tx.execute("DELETE FROM bucket_docs WHERE bucket_id = ?1", [&bucket])?;
                tx.execute("DELETE FROM members WHERE bucket_id = ?1", [&bucket])?;
                tx.execute("DELETE FROM buckets WHERE id = ?1", [&bucket])?;
                tx.commit()
            })
            .await
    }

    async fn set_password(&self, user_id: &str, password_hash: &str) -> StoreResult<()> {
        let (user, hash) = (user_id.to_string(), password_hash.to_string());
        self.db
            .call(move |c| {
                let tx = c.transaction()?;
                tx.execute(
                    "UPDATE users SET password_hash = ?2, reset_digest = NULL, reset_expires_at = NULL
                     WHERE id = ?1",
                    [&user, &hash],
                )?;
                tx.execute("DELETE FROM tokens WHERE user_id = ?1", [&user])?;
                tx.commit()
            })
            .await
    }

    async fn upsert_servers(&self, servers: &[ServerRecord]) -> StoreResult<()> {
        let servers = servers.to_vec();
        self.db
            .call(move |c| {
                let tx = c.transaction()?;
                {
                    let mut stmt = tx.prepare_cached(
                        "INSERT INTO servers (bucket_id, server_name, last_update, status_json) VALUES (?1, ?2, ?3, ?4)
                         ON CONFLICT (bucket_id, server_name) DO UPDATE SET
                           last_update = excluded.last_update, status_json = excluded.status_json",
                    )?;
                    for s in &servers {
                        stmt.execute(params![
                            s.bucket_id,
                            s.server_name,
                            s.last_update,
                            s.status_json
                        ])?;
                    }
                }
                tx.commit()
            })
            .await
    }

    async fn all_servers(&self) -> StoreResult<Vec<ServerRecord>> {
        self.servers(None, None).await
    }

    async fn bucket_servers(
        &self,
        bucket_id: &str,
        only: Option<&str>,
    ) -> StoreResult<Vec<ServerRecord>> {
        self.servers(Some(bucket_id.to_string()), only.map(str::to_string))
            .await
    }

    async fn delete_server(&self, bucket_id: &str, server_name: &str) -> StoreResult<bool> {
        let (bucket, server) = (bucket_id.to_string(), server_name.to_string());
        self.db
            .call(move |c| {
                let tx = c.transaction()?;
                let deleted = tx.execute(
                    "DELETE FROM servers WHERE bucket_id = ?1 AND server_name = ?2",
                    [&bucket, &server],
                )?;
                tx.execute(
                    "DELETE FROM parked_servers WHERE bucket_id = ?1 AND server_name = ?2",
                    [&bucket, &server],
                )?;
                tx.commit().map(|()| deleted == 1)
            })
            .await
    }

    async fn all_buckets(&self) -> StoreResult<Vec<Bucket>> {
        self.db
            .call(|c| {
                let sql = format!("SELECT {BUCKET_COLUMNS} FROM buckets ORDER BY created_at, id");
                let mut stmt = c.prepare_cached(&sql)?;
                stmt.query_map([], bucket_from)?.collect()
            })
            .await
    }

    async fn save_notification(&self, notification: &Notification) -> StoreResult<()> {
        let n = notification.clone();
        let doc = serde_json::to_string(&n).unwrap_or_default();
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO notifications (id, bucket_id, created_at, state, next_attempt_at, doc)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                     ON CONFLICT (id) DO UPDATE SET state = excluded.state,
                       next_attempt_at = excluded.next_attempt_at, doc = excluded.doc",
                    params![n.id, n.bucket_id, n.created_at, n.state.as_str(), n.next_attempt_at, doc],
                )
                .map(|_| ())
            })
            .await
    }

    async fn notifications(&self, bucket_id: &str, limit: u32) -> StoreResult<Vec<Notification>> {
        let bucket = bucket_id.to_string();
        self.notification_docs(
            "SELECT doc FROM notifications WHERE bucket_id = ?1 ORDER BY created_at DESC LIMIT ?2",
            (bucket, limit),
        )
        .await
    }

    async fn due_notifications(&self, now: i64, limit: u32) -> StoreResult<Vec<Notification>> {
        self.notification_docs(
            "SELECT doc FROM notifications WHERE state IN ('pending', 'retrying')
             AND next_attempt_at <= ?1 ORDER BY next_attempt_at LIMIT ?2",
            (now, limit),
        )
        .await
    }

    async fn claim_slot(&self, job: &str, slot: i64) -> StoreResult<bool> {
        let job = job.to_string();
        self.db
            .call(move |c| {
                let tx = c.transaction()?;
                let claimed = tx.execute(
                    "INSERT OR IGNORE INTO job_slots (job, slot, claimed_at) VALUES (?1, ?2, ?3)",
                    params![job, slot, crate::ids::now_ms()],
                )? == 1;
                // The job's history is kept short.
                tx.execute(
                    "DELETE FROM job_slots WHERE job = ?1 AND slot < ?2",
                    params![job, slot - KEPT_SLOTS],
                )?;
                tx.commit().map(|()| claimed)
            })
            .await
    }

    async fn latest_slots(&self, prefix: &str) -> StoreResult<Vec<(String, i64)>> {
        let prefix = prefix.to_string();
        self.db
            .call(move |c| {
                // substr, not LIKE: names may hold `%` or `_`.
                let mut stmt = c.prepare_cached(
                    "SELECT job, MAX(slot) FROM job_slots
                     WHERE substr(job, 1, length(?1)) = ?1 GROUP BY job ORDER BY job",
                )?;
                stmt.query_map([prefix], |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect()
            })
            .await
    }

    async fn put_bucket_doc(
        &self,
        bucket_id: &str,
        kind: &str,
        id: &str,
        doc: &str,
    ) -> StoreResult<()> {
        let row = [bucket_id, kind, id, doc].map(str::to_string);
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO bucket_docs (bucket_id, kind, id, doc) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT (bucket_id, kind, id) DO UPDATE SET doc = excluded.doc",
                    row,
                )
                .map(|_| ())
            })
            .await
    }

    async fn bucket_docs(&self, bucket_id: &str, kind: &str) -> StoreResult<Vec<(String, String)>> {
        let key = [bucket_id, kind].map(str::to_string);
        self.db
            .call(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT id, doc FROM bucket_docs WHERE bucket_id = ?1 AND kind = ?2 ORDER BY id",
                )?;
                stmt.query_map(key, |r| Ok((r.get(0)?, r.get(1)?)))?
                    .collect()
            })
            .await
    }

    async fn delete_bucket_doc(&self, bucket_id: &str, kind: &str, id: &str) -> StoreResult<bool> {
        let key = [bucket_id, kind, id].map(str::to_string);
        self.db
            .call(move |c| {
                c.execute(
                    "DELETE FROM bucket_docs WHERE bucket_id = ?1 AND kind = ?2 AND id = ?3",
                    key,
                )
                .map(|n| n > 0)
            })
            .await
    }

    async fn park_server(&self, parked: &ParkedServer) -> StoreResult<()> {
        let p = parked.clone();
        self.db
            .call(move |c| {
                c.execute(
                    "INSERT INTO parked_servers (bucket_id, server_name, reason, processes, parked_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (bucket_id, server_name) DO UPDATE SET
                       reason = excluded.reason, processes = excluded.processes,
                       parked_at = excluded.parked_at",
                    rusqlite::params![p.bucket_id, p.server_name, p.reason, p.processes, p.parked_at],
                )
                .map(|_| ())
            })
            .await
    }

    async fn unpark_server(&self, bucket_id: &str, server_name: &str) -> StoreResult<bool> {
        let (bucket, server) = (bucket_id.to_string(), server_name.to_string());
        self.db
            .call(move |c| {
                c.execute(
                    "DELETE FROM parked_servers WHERE bucket_id = ?1 AND server_name = ?2",
                    [bucket, server],
                )
                .map(|n| n == 1)
            })
            .await
    }

    async fn parked_servers(&self, bucket_id: Option<&str>) -> StoreResult<Vec<ParkedServer>> {
        let bucket = bucket_id.map(str::to_string);
        self.db
            .call(move |c| {
                let mut stmt = c.prepare_cached(
                    "SELECT bucket_id, server_name, reason, processes, parked_at FROM parked_servers
                     WHERE ?1 IS NULL OR bucket_id = ?1 ORDER BY bucket_id, server_name",
                )?;
                let rows = stmt.query_map([bucket], |r| {
                    Ok(ParkedServer {
                        bucket_id: r.get(0)?,
                        server_name: r.get(1)?,
                        reason: r.get(2)?,
                        processes: r.get(3)?,
                        parked_at: r.get(4)?,
                    })
                })?;
                rows.collect()
            })
            .await
    }
}
