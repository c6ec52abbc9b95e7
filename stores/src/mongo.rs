//! The documents store on MongoDB (`KM_MONGO_URL`): one collection per record type,
//! with the unique indexes the queries rely on. Only plain CRUD operators are used (the
//! original broke on servers that dropped `$pushAll`).

use std::collections::HashMap;
use std::time::Duration;

use async_trait::async_trait;
use bson::{Document, doc};
use mongodb::error::{ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, Database, IndexModel};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::{
    Bucket, Documents, Member, MemberRole, Notification, ParkedServer, PasswordReset, ServerRecord,
    StoreError, StoreResult, TokenRecord, User,
};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const DEFAULT_DATABASE: &str = "km";
/// The layout of the collections and indexes, kept in `km_meta` (`_id: "schema"`): a km
/// refuses a database a newer km laid out, and raises it after its own indexes.
pub const SCHEMA_VERSION: i64 = 1;
/// Oldest MongoDB version supported (the driver needs 4.4).
const MIN_VERSION: (u32, u32) = (4, 4);

pub struct MongoDocuments {
    db: Database,
}

fn unavailable(e: mongodb::error::Error) -> StoreError {
    StoreError::Unavailable {
        store: "documents",
        reason: e.to_string(),
    }
}

/// The hosts of a connection string, without credentials, for messages.
fn hosts(options: &ClientOptions) -> String {
    options
        .hosts
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

/// Whether an insert failed on a unique key.
fn is_duplicate(e: &mongodb::error::Error) -> bool {
    matches!(e.kind.as_ref(), ErrorKind::Write(WriteFailure::WriteError(write)) if write.code == 11000)
}

/// The unique field a duplicate-key error is about, from the index name (`email_1`).
fn duplicate_field(e: &mongodb::error::Error) -> Option<&'static str> {
    let ErrorKind::Write(WriteFailure::WriteError(write)) = e.kind.as_ref() else {
        return None;
    };
    if !is_duplicate(e) {
        return None;
    }
    ["username", "email", "public_id"]
        .into_iter()
        .find(|f| write.message.contains(&format!("{f}_1")))
}

/// A client for `url` (nothing sent yet) with bounded timeouts, its database (`km`
/// unless the URL names one) and its hosts for messages. Errors name the hosts, never
/// the credentials (the caller names the setting).
pub async fn open(url: &str, timeout: Duration) -> anyhow::Result<(Database, String)> {
    let mut options = ClientOptions::parse(url)
        .await
        .map_err(|e| anyhow::anyhow!("not a usable MongoDB connection string: {}", e.kind))?;
    options.server_selection_timeout = Some(timeout);
    options.connect_timeout = Some(timeout);
    options.app_name = Some("km".into());
    let where_ = hosts(&options);
    let name = options
        .default_database
        .clone()
        .unwrap_or_else(|| DEFAULT_DATABASE.into());
    let client = Client::with_options(options)
        .map_err(|e| anyhow::anyhow!("cannot use {where_}: {}", e.kind))?;
    Ok((client.database(&name), where_))
}

/// Whether the driver can work with a server reporting `version` (it needs 4.4: wire
/// version 9); the error completes "<hosts> ...".
pub fn supported_version(version: &str) -> Result<(), String> {
    let mut parts = version.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    let found = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    if found < MIN_VERSION {
        let (major, minor) = MIN_VERSION;
        return Err(format!(
            "runs MongoDB {version}; {major}.{minor} or newer is needed"
        ));
    }
    Ok(())
}

impl MongoDocuments {
    /// Connects, checks the server answers, and creates the indexes. Errors name the
    /// hosts (never the credentials).
    pub async fn connect(url: &str) -> anyhow::Result<Self> {
        let (db, where_) = open(url, CONNECT_TIMEOUT).await?;
        let name = db.name().to_string();
        db.run_command(doc! { "ping": 1 })
            .await
            .map_err(|e| anyhow::anyhow!("cannot connect to {where_}: {}", e.kind))?;
        let info = db
            .run_command(doc! { "buildInfo": 1 })
            .await
            .map_err(|e| anyhow::anyhow!("{where_} does not tell its version: {}", e.kind))?;
        supported_version(info.get_str("version").unwrap_or("0"))
            .map_err(|e| anyhow::anyhow!("{where_} {e}"))?;
        let store = MongoDocuments { db };
        let meta = store.db.collection::<Document>("km_meta");
        let found = meta
            .find_one(doc! { "_id": "schema" })
            .await
            .map_err(|e| anyhow::anyhow!("cannot read {where_}/{name}: {}", e.kind))?
            .and_then(|d| d.get_i64("version").ok())
            .unwrap_or(0);
        if found > SCHEMA_VERSION {
            anyhow::bail!(
                "{where_}/{name} was laid out by a newer km (schema version {found}, \
                 this km knows {SCHEMA_VERSION}): run a newer km"
            );
        }
        store
            .create_indexes()
            .await
            .map_err(|e| anyhow::anyhow!("cannot create indexes in {where_}/{name}: {}", e.kind))?;
        if found < SCHEMA_VERSION {
            meta.replace_one(
                doc! { "_id": "schema" },
                doc! { "_id": "schema", "version": SCHEMA_VERSION },
            )
            .upsert(true)
            .await
            .map_err(|e| anyhow::anyhow!("cannot write {where_}/{name}: {}", e.kind))?;
        }
        Ok(store)
    }

    async fn create_indexes(&self) -> mongodb::error::Result<()> {
        let unique = |keys: Document| {
            IndexModel::builder()
                .keys(keys)
                .options(IndexOptions::builder().unique(true).build())
                .build()
        };
        let plain = |keys: Document| IndexModel::builder().keys(keys).build();
        self.users()
            .create_indexes([unique(doc! {"username": 1}), unique(doc! {"email": 1})])
            .await?;
        self.tokens()
            .create_indexes([
                unique(doc! {"refresh_digest": 1}),
                unique(doc! {"access_digest": 1}),
                plain(doc! {"user_id": 1}),
            ])
            .await?;
        let ttl = IndexOptions::builder().expire_after(Duration::ZERO).build();
        self.tokens()
            .create_index(
                IndexModel::builder()
                    .keys(doc! {"expires": 1})
                    .options(ttl)
                    .build(),
            )
            .await?;
        self.buckets()
            .create_index(unique(doc! {"public_id": 1}))
            .await?;
        self.members()
            .create_indexes([
                unique(doc! {"bucket_id": 1, "user_id": 1}),
                plain(doc! {"user_id": 1}),
            ])
            .await?;
        self.servers()
            .create_index(unique(doc! {"bucket_id": 1, "server_name": 1}))
            .await?;
        Ok(())
    }

    fn users(&self) -> Collection<UserDoc> {
        self.db.collection("users")
    }
    fn tokens(&self) -> Collection<TokenDoc> {
        self.db.collection("tokens")
    }
    fn buckets(&self) -> Collection<BucketDoc> {
        self.db.collection("buckets")
    }
    fn members(&self) -> Collection<MemberDoc> {
        self.db.collection("members")
    }
    fn servers(&self) -> Collection<ServerDoc> {
        self.db.collection("servers")
    }

    async fn find_servers(&self, filter: Document) -> StoreResult<Vec<ServerRecord>> {
        Ok(find_all(self.servers(), filter)
            .await?
            .into_iter()
            .map(ServerRecord::from)
            .collect())
    }

    fn notifications_collection(&self) -> Collection<Notification> {
        self.db.collection("notifications")
    }

    async fn find_notifications(
        &self,
        filter: Document,
        sort: Document,
        limit: u32,
    ) -> StoreResult<Vec<Notification>> {
        use futures_util::TryStreamExt;
        self.notifications_collection()
            .find(filter)
            .sort(sort)
            .limit(i64::from(limit))
            .await
            .map_err(unavailable)?
            .try_collect()
            .await
            .map_err(unavailable)
    }

    fn job_slots(&self) -> Collection<Document> {
        self.db.collection("job_slots")
    }

    fn bucket_docs_collection(&self) -> Collection<KindDoc> {
        self.db.collection("bucket_docs")
    }

    fn parked(&self) -> Collection<ParkedDoc> {
        self.db.collection("parked_servers")
    }
}

async fn find_one<T: DeserializeOwned + Send + Sync, R>(
    collection: Collection<T>,
    filter: Document,
    into: impl Fn(T) -> R,
) -> StoreResult<Option<R>> {
    Ok(collection
        .find_one(filter)
        .await
        .map_err(unavailable)?
        .map(into))
}

async fn find_all<T: DeserializeOwned + Send + Sync>(
    collection: Collection<T>,
    filter: Document,
) -> StoreResult<Vec<T>> {
    use futures_util::TryStreamExt;
    collection
        .find(filter)
        .await
        .map_err(unavailable)?
        .try_collect()
        .await
        .map_err(unavailable)
}

/// An insert whose duplicate key is a `Conflict` naming the field.
fn inserted(result: mongodb::error::Result<impl Sized>) -> StoreResult<()> {
    match result {
        Ok(_) => Ok(()),
        Err(e) => Err(duplicate_field(&e)
            .map(StoreError::Conflict)
            .unwrap_or_else(|| unavailable(e))),
    }
}

#[async_trait]
impl Documents for MongoDocuments {
    fn kind(&self) -> &'static str {
        "mongodb"
    }

    async fn ping(&self) -> StoreResult<()> {
        self.db
            .run_command(doc! {"ping": 1})
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn insert_user(&self, user: &User) -> StoreResult<()> {
        inserted(self.users().insert_one(UserDoc::from(user)).await)
    }

    async fn count_users(&self) -> StoreResult<u64> {
        self.users()
            .estimated_document_count()
            .await
            .map_err(unavailable)
    }

    async fn user_by_login(&self, login: &str) -> StoreResult<Option<User>> {
        find_one(
            self.users(),
            doc! {"$or": [{"username": login}, {"email": login}]},
            User::from,
        )
        .await
    }

    async fn user_by_id(&self, id: &str) -> StoreResult<Option<User>> {
        find_one(self.users(), doc! {"_id": id}, User::from).await
    }

    async fn all_users(&self) -> StoreResult<Vec<User>> {
        let mut users: Vec<User> = find_all(self.users(), doc! {})
            .await?
            .into_iter()
            .map(User::from)
            .collect();
        users.sort_by(|a, b| a.username.cmp(&b.username));
        Ok(users)
    }

    async fn set_user_disabled(&self, user_id: &str, disabled: bool) -> StoreResult<bool> {
        // The flag first: once it is set no token is accepted, so a failed revocation
        // below leaves nothing usable and can be retried.
        let result = self
            .users()
            .update_one(doc! {"_id": user_id}, doc! {"$set": {"disabled": disabled}})
            .await
            .map_err(unavailable)?;
        if disabled {
            self.tokens()
                .delete_many(doc! {"user_id": user_id})
                .await
                .map_err(unavailable)?;
        }
        Ok(result.matched_count == 1)
    }

    async fn set_password_reset(
        &self,
        user_id: &str,
        reset: Option<&PasswordReset>,
    ) -> StoreResult<bool> {
        let update = match reset {
            Some(r) => doc! {"$set": {"reset_digest": &r.digest, "reset_expires_at": r.expires_at}},
            None => doc! {"$unset": {"reset_digest": "", "reset_expires_at": ""}},
        };
        let result = self
            .users()
            .update_one(doc! {"_id": user_id}, update)
            .await
            .map_err(unavailable)?;
        Ok(result.matched_count == 1)
    }

    async fn insert_token(&self, token: &TokenRecord) -> StoreResult<()> {
        inserted(self.tokens().insert_one(TokenDoc::from(token)).await)
    }

    async fn token_by_access(&self, access_digest: &str) -> StoreResult<Option<TokenRecord>> {
        find_one(
            self.tokens(),
            doc! {"access_digest": access_digest},
            TokenRecord::from,
        )
        .await
    }

    async fn token_by_refresh(&self, refresh_digest: &str) -> StoreResult<Option<TokenRecord>> {
        find_one(
            self.tokens(),
            doc! {"refresh_digest": refresh_digest},
            TokenRecord::from,
        )
        .await
    }

    async fn delete_token(&self, access_digest: &str) -> StoreResult<()> {
        self.tokens()
            .delete_one(doc! {"access_digest": access_digest})
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn tokens_of_user(&self, user_id: &str) -> StoreResult<Vec<TokenRecord>> {
        let mut tokens: Vec<TokenRecord> = find_all(self.tokens(), doc! {"user_id": user_id})
            .await?
            .into_iter()
            .map(TokenRecord::from)
            .collect();
        tokens.sort_by_key(|t| t.created_at);
        Ok(tokens)
    }

    async fn delete_token_pair(&self, user_id: &str, refresh_digest: &str) -> StoreResult<bool> {
        let result = self
            .tokens()
            .delete_one(doc! {"user_id": user_id, "refresh_digest": refresh_digest})
            .await
            .map_err(unavailable)?;
        Ok(result.deleted_count == 1)
    }

    async fn rotate_access(
        &self,
        refresh_digest: &str,
        access_digest: &str,
        expires_at: i64,
    ) -> StoreResult<bool> {
        let update =
            doc! {"$set": {"access_digest": access_digest, "access_expires_at": expires_at}};
        let result = self
            .tokens()
            .update_one(doc! {"refresh_digest": refresh_digest}, update)
            .await
            .map_err(unavailable)?;
        Ok(result.matched_count == 1)
    }

    async fn insert_bucket(&self, bucket: &Bucket) -> StoreResult<()> {
        inserted(self.buckets().insert_one(BucketDoc::from(bucket)).await)?;
        let owner = MemberDoc {
            bucket_id: bucket.id.clone(),
            user_id: bucket.owner.clone(),
            role: MemberRole::Owner.as_str().into(),
            notify: None,
        };
        if let Err(e) = self.members().insert_one(owner).await {
            // No bucket without its owner: undo (transactions need a replica set).
            let _ = self.buckets().delete_one(doc! {"_id": &bucket.id}).await;
            return Err(unavailable(e));
        }
        Ok(())
    }

    async fn bucket_by_id(&self, id: &str) -> StoreResult<Option<Bucket>> {
        find_one(self.buckets(), doc! {"_id": id}, Bucket::from).await
    }

    async fn bucket_by_public_id(&self, public_id: &str) -> StoreResult<Option<Bucket>> {
        find_one(self.buckets(), doc! {"public_id": public_id}, Bucket::from).await
    }

    async fn buckets_of_user(&self, user_id: &str) -> StoreResult<Vec<Bucket>> {
        let ids: Vec<String> = find_all(self.members(), doc! {"user_id": user_id})
            .await?
            .into_iter()
            .map(|m| m.bucket_id)
            .collect();
        let mut buckets: Vec<Bucket> = find_all(self.buckets(), doc! {"_id": {"$in": ids}})
            .await?
            .into_iter()
            .map(Bucket::from)
            .collect();
        buckets.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(buckets)
    }

    async fn member_role(&self, bucket_id: &str, user_id: &str) -> StoreResult<Option<MemberRole>> {
        let member = find_one(
            self.members(),
            doc! {"bucket_id": bucket_id, "user_id": user_id},
            |m| m.role,
        )
        .await?;
        Ok(member.as_deref().and_then(MemberRole::parse))
    }

    async fn bucket_members(&self, bucket_id: &str) -> StoreResult<Vec<Member>> {
        let memberships = find_all(self.members(), doc! {"bucket_id": bucket_id}).await?;
        let ids: Vec<&str> = memberships.iter().map(|m| m.user_id.as_str()).collect();
        let users: HashMap<String, UserDoc> = find_all(self.users(), doc! {"_id": {"$in": ids}})
            .await?
            .into_iter()
            .map(|u| (u.id.clone(), u))
            .collect();
        let mut members: Vec<Member> = memberships
            .into_iter()
            .filter_map(|m| {
                let user = users.get(&m.user_id)?;
                Some(Member {
                    role: MemberRole::parse(&m.role)?,
                    user_id: m.user_id,
                    username: user.username.clone(),
                    email: user.email.clone(),
                    notify: m.notify,
                })
            })
            .collect();
        members.sort_by(|a, b| {
            (a.role != MemberRole::Owner, &a.username)
                .cmp(&(b.role != MemberRole::Owner, &b.username))
        });
        Ok(members)
    }

    async fn set_member(
        &self,
        bucket_id: &str,
        user_id: &str,
        role: MemberRole,
    ) -> StoreResult<()> {
        self.members()
            .update_one(
                doc! {"bucket_id": bucket_id, "user_id": user_id},
                doc! {"$set": {"role": role.as_str()}},
            )
            .upsert(true)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn set_member_notify(
        &self,
        bucket_id: &str,
        user_id: &str,
        notify: Option<bool>,
    ) -> StoreResult<bool> {
        let update = match notify {
            Some(notify) => doc! {"$set": {"notify": notify}},
            None => doc! {"$unset": {"notify": ""}},
        };
        let result = self
            .members()
            .update_one(doc! {"bucket_id": bucket_id, "user_id": user_id}, update)
            .await
            .map_err(unavailable)?;
        Ok(result.matched_count == 1)
    }

    async fn remove_member(&self, bucket_id: &str, user_id: &str) -> StoreResult<bool> {
        let result = self
            .members()
            .delete_one(doc! {"bucket_id": bucket_id, "user_id": user_id})
            .await
            .map_err(unavailable)?;
        Ok(result.deleted_count == 1)
    }

    async fn set_bucket_disabled(&self, bucket_id: &str, disabled: bool) -> StoreResult<bool> {
        let result = self
            .buckets()
            .update_one(
                doc! {"_id": bucket_id},
                doc! {"$set": {"disabled": disabled}},
            )
            .await
            .map_err(unavailable)?;
        Ok(result.matched_count == 1)
    }

    async fn rename_bucket(&self, bucket_id: &str, name: &str) -> StoreResult<bool> {
        let result = self
            .buckets()
            .update_one(doc! {"_id": bucket_id}, doc! {"$set": {"name": name}})
            .await
            .map_err(unavailable)?;
        Ok(result.matched_count == 1)
    }

    async fn transfer_bucket(&self, bucket_id: &str, user_id: &str) -> StoreResult<bool> {
        // No transactions: the new owner's membership first, then the bucket's owner,
        // then the previous owner made an admin. A failure part way leaves two owners
        // (both had the rights before), never none; the transfer can be run again.
        let Some(bucket) = self.bucket_by_id(bucket_id).await? else {
            return Ok(false);
        };
        let promoted = self
            .members()
            .update_one(
                doc! {"bucket_id": bucket_id, "user_id": user_id},
                doc! {"$set": {"role": MemberRole::Owner.as_str()}},
            )
            .await
            .map_err(unavailable)?;
        if promoted.matched_count == 0 {
            return Ok(false);
        }
        self.buckets()
            .update_one(doc! {"_id": bucket_id}, doc! {"$set": {"owner": user_id}})
            .await
            .map_err(unavailable)?;
        if bucket.owner != user_id {
            self.members()
                .update_one(
                    doc! {"bucket_id": bucket_id, "user_id": &bucket.owner},
                    doc! {"$set": {"role": MemberRole::Admin.as_str()}},
                )
                .await
                .map_err(unavailable)?;
        }
        Ok(true)
    }

    async fn delete_bucket(&self, bucket_id: &str) -> StoreResult<()> {
        // No transactions (they need a replica set): the bucket goes first, so that if a
        // later step fails nothing reaches what is left (agents authenticate and members
        // get in through the bucket record), rather than leaving a bucket with its keys
        // but without members. Each step can be run again.
        self.buckets()
            .delete_one(doc! {"_id": bucket_id})
            .await
            .map_err(unavailable)?;
        self.members()
            .delete_many(doc! {"bucket_id": bucket_id})
            .await
            .map_err(unavailable)?;
        self.servers()
            .delete_many(doc! {"bucket_id": bucket_id})
            .await
            .map_err(unavailable)?;
        self.parked()
            .delete_many(doc! {"bucket_id": bucket_id})
            .await
            .map_err(unavailable)?;
        self.bucket_docs_collection()
            .delete_many(doc! {"_id.bucket_id": bucket_id})
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn set_password(&self, user_id: &str, password_hash: &str) -> StoreResult<()> {
        // The password first: once it is changed no token can be got with the old one, so
        // the revocation below catches them all (and a failed revocation can be retried).
        self.users()
            .update_one(
                doc! {"_id": user_id},
                doc! {
                    "$set": {"password_hash": password_hash},
                    "$unset": {"reset_digest": "", "reset_expires_at": ""},
                },
            )
            .await
            .map_err(unavailable)?;
        self.tokens()
            .delete_many(doc! {"user_id": user_id})
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn upsert_servers(&self, servers: &[ServerRecord]) -> StoreResult<()> {
        for s in servers {
            let filter = doc! {"bucket_id": &s.bucket_id, "server_name": &s.server_name};
            let update = doc! {"$set": {
                "last_update": s.last_update, "status_json": &s.status_json,
            }};
            self.servers()
                .update_one(filter, update)
                .upsert(true)
                .await
                .map_err(unavailable)?;
        }
        Ok(())
    }

    async fn all_servers(&self) -> StoreResult<Vec<ServerRecord>> {
        self.find_servers(doc! {}).await
    }

    async fn bucket_servers(
        &self,
        bucket_id: &str,
        only: Option<&str>,
    ) -> StoreResult<Vec<ServerRecord>> {
        let mut filter = doc! {"bucket_id": bucket_id};
        if let Some(name) = only {
            filter.insert("server_name", name);
        }
        self.find_servers(filter).await
    }

    async fn delete_server(&self, bucket_id: &str, server_name: &str) -> StoreResult<bool> {
        let result = self
            .servers()
            .delete_one(doc! {"bucket_id": bucket_id, "server_name": server_name})
            .await
            .map_err(unavailable)?;
        self.unpark_server(bucket_id, server_name).await?;
        Ok(result.deleted_count == 1)
    }

    async fn all_buckets(&self) -> StoreResult<Vec<Bucket>> {
        let mut buckets: Vec<Bucket> = find_all(self.buckets(), doc! {})
            .await?
            .into_iter()
            .map(Bucket::from)
            .collect();
        buckets.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        Ok(buckets)
    }

    async fn save_notification(&self, notification: &Notification) -> StoreResult<()> {
        self.notifications_collection()
            .replace_one(doc! {"_id": &notification.id}, notification)
            .upsert(true)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn notifications(&self, bucket_id: &str, limit: u32) -> StoreResult<Vec<Notification>> {
        self.find_notifications(
            doc! {"bucket_id": bucket_id},
            doc! {"created_at": -1},
            limit,
        )
        .await
    }

    async fn due_notifications(&self, now: i64, limit: u32) -> StoreResult<Vec<Notification>> {
        let filter = doc! {
            "state": {"$in": ["pending", "retrying"]},
            "next_attempt_at": {"$lte": now},
        };
        self.find_notifications(filter, doc! {"next_attempt_at": 1}, limit)
            .await
    }

    async fn claim_slot(&self, job: &str, slot: i64) -> StoreResult<bool> {
        // The unique _id decides: a second insert of the slot fails as a duplicate.
        let claim = doc! {"_id": format!("{job}:{slot}"), "job": job, "slot": slot, "claimed_at": crate::ids::now_ms()};
        match self.job_slots().insert_one(claim).await {
            Ok(_) => {}
            Err(e) if is_duplicate(&e) => return Ok(false),
            Err(e) => return Err(unavailable(e)),
        }
        self.job_slots()
            .delete_many(doc! {"job": job, "slot": {"$lt": slot - 1000}})
            .await
            .map_err(unavailable)?;
        Ok(true)
    }

    async fn latest_slots(&self, prefix: &str) -> StoreResult<Vec<(String, i64)>> {
        let pattern = format!("^{}", regex_escape(prefix));
        let claims = find_all(self.job_slots(), doc! {"job": {"$regex": pattern}}).await?;
        let mut latest: std::collections::BTreeMap<String, i64> = Default::default();
        for claim in claims {
            if let (Ok(job), Ok(slot)) = (claim.get_str("job"), claim.get_i64("slot")) {
                let newest = latest.entry(job.to_string()).or_insert(slot);
                *newest = (*newest).max(slot);
            }
        }
        Ok(latest.into_iter().collect())
    }

    async fn put_bucket_doc(
        &self,
        bucket_id: &str,
        kind: &str,
        id: &str,
        doc: &str,
    ) -> StoreResult<()> {
        let record = KindDoc {
            id: KindDocId::of(bucket_id, kind, id),
            doc: doc.to_string(),
        };
        self.bucket_docs_collection()
            .replace_one(
                doc! {"_id": KindDocId::of(bucket_id, kind, id).key()},
                record,
            )
            .upsert(true)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn bucket_docs(&self, bucket_id: &str, kind: &str) -> StoreResult<Vec<(String, String)>> {
        let filter = doc! {"_id.bucket_id": bucket_id, "_id.kind": kind};
        let mut docs: Vec<(String, String)> = find_all(self.bucket_docs_collection(), filter)
            .await?
            .into_iter()
            .map(|d| (d.id.id, d.doc))
            .collect();
        docs.sort();
        Ok(docs)
    }

    async fn delete_bucket_doc(&self, bucket_id: &str, kind: &str, id: &str) -> StoreResult<bool> {
        self.bucket_docs_collection()
            .delete_one(doc! {"_id": KindDocId::of(bucket_id, kind, id).key()})
            .await
            .map(|r| r.deleted_count > 0)
            .map_err(unavailable)
    }

    async fn park_server(&self, parked: &ParkedServer) -> StoreResult<()> {
        let doc = ParkedDoc::from(parked);
        self.parked()
            .replace_one(doc! {"_id": &doc.id}, &doc)
            .upsert(true)
            .await
            .map(|_| ())
            .map_err(unavailable)
    }

    async fn unpark_server(&self, bucket_id: &str, server_name: &str) -> StoreResult<bool> {
        let result = self
            .parked()
            .delete_one(doc! {"_id": parked_id(bucket_id, server_name)})
            .await
            .map_err(unavailable)?;
        Ok(result.deleted_count == 1)
    }

    async fn parked_servers(&self, bucket_id: Option<&str>) -> StoreResult<Vec<ParkedServer>> {
        let filter = match bucket_id {
            Some(bucket) => doc! {"bucket_id": bucket},
            None => doc! {},
        };
        let mut parked: Vec<ParkedServer> = find_all(self.parked(), filter)
            .await?
            .into_iter()
            .map(ParkedServer::from)
            .collect();
        parked.sort_by(|a, b| (&a.bucket_id, &a.server_name).cmp(&(&b.bucket_id, &b.server_name)));
        Ok(parked)
    }
}

/// `text` matched literally in a regular expression.
fn regex_escape(text: &str) -> String {
    text.chars()
        .flat_map(|c| {
            let special = "\\.^$|?*+()[]{}".contains(c);
            special.then_some('\\').into_iter().chain([c])
        })
        .collect()
}

/// A bucket document: its `_id` is `{bucket_id, kind, id}`, unique by construction.
#[derive(Serialize, Deserialize)]
struct KindDoc {
    #[serde(rename = "_id")]
    id: KindDocId,
    doc: String,
}

#[derive(Serialize, Deserialize)]
struct KindDocId {
    bucket_id: String,
    kind: String,
    id: String,
}

impl KindDocId {
    fn of(bucket_id: &str, kind: &str, id: &str) -> KindDocId {
        KindDocId {
            bucket_id: bucket_id.into(),
            kind: kind.into(),
            id: id.into(),
        }
    }

    /// The `_id` as a filter value (field order matters to MongoDB).
    fn key(&self) -> Document {
        doc! {"bucket_id": &self.bucket_id, "kind": &self.kind, "id": &self.id}
    }
}

fn parked_id(bucket_id: &str, server_name: &str) -> String {
    format!("{bucket_id}/{server_name}")
}

#[derive(Serialize, Deserialize)]
struct ParkedDoc {
    #[serde(rename = "_id")]
    id: String,
    bucket_id: String,
    server_name: String,
    reason: String,
    processes: i64,
    parked_at: i64,
}

impl From<&ParkedServer> for ParkedDoc {
    fn from(p: &ParkedServer) -> Self {
        ParkedDoc {
            id: parked_id(&p.bucket_id, &p.server_name),
            bucket_id: p.bucket_id.clone(),
            server_name: p.server_name.clone(),
            reason: p.reason.clone(),
            processes: i64::from(p.processes),
            parked_at: p.parked_at,
        }
    }
}

impl From<ParkedDoc> for ParkedServer {
    fn from(p: ParkedDoc) -> Self {
        ParkedServer {
            bucket_id: p.bucket_id,
            server_name: p.server_name,
            reason: p.reason,
            processes: u32::try_from(p.processes).unwrap_or(0),
            parked_at: p.parked_at,
        }
    }
}

// Stored shapes. Ids are the records' 24-hex ObjectId strings; tokens are keyed by the
// digest of their access token and expire through a TTL index on `expires`.

#[derive(Serialize, Deserialize)]
struct UserDoc {
    #[serde(rename = "_id")]
    id: String,
    username: String,
    email: String,
    password_hash: String,
    role: String,
    created_at: i64,
    #[serde(default)]
    disabled: bool,
    #[serde(default)]
    reset_digest: Option<String>,
    #[serde(default)]
    reset_expires_at: Option<i64>,
}

impl From<&User> for UserDoc {
    fn from(u: &User) -> Self {
        UserDoc {
            id: u.id.clone(),
            username: u.username.clone(),
            email: u.email.clone(),
            password_hash: u.password_hash.clone(),
            role: u.role.clone(),
            created_at: u.created_at,
            disabled: u.disabled,
            reset_digest: u.reset.as_ref().map(|r| r.digest.clone()),
            reset_expires_at: u.reset.as_ref().map(|r| r.expires_at),
        }
    }
}

impl From<UserDoc> for User {
    fn from(u: UserDoc) -> Self {
        User {
            id: u.id,
            username: u.username,
            email: u.email,
            password_hash: u.password_hash,
            role: u.role,
            created_at: u.created_at,
            disabled: u.disabled,
            reset: match (u.reset_digest, u.reset_expires_at) {
                (Some(digest), Some(expires_at)) => Some(PasswordReset { digest, expires_at }),
                _ => None,
            },
        }
    }
}

#[derive(Serialize, Deserialize)]
struct TokenDoc {
    access_digest: String,
    refresh_digest: String,
    user_id: String,
    client_id: String,
    access_expires_at: i64,
    refresh_expires_at: i64,
    expires: bson::DateTime,
    #[serde(default)]
    name: String,
    #[serde(default)]
    created_at: i64,
}

impl From<&TokenRecord> for TokenDoc {
    fn from(t: &TokenRecord) -> Self {
        TokenDoc {
            access_digest: t.access_digest.clone(),
            refresh_digest: t.refresh_digest.clone(),
            user_id: t.user_id.clone(),
            client_id: t.client_id.clone(),
            access_expires_at: t.access_expires_at,
            refresh_expires_at: t.refresh_expires_at,
            expires: bson::DateTime::from_millis(t.refresh_expires_at),
            name: t.name.clone(),
            created_at: t.created_at,
        }
    }
}

impl From<TokenDoc> for TokenRecord {
    fn from(t: TokenDoc) -> Self {
        TokenRecord {
            access_digest: t.access_digest,
            refresh_digest: t.refresh_digest,
            user_id: t.user_id,
            client_id: t.client_id,
            access_expires_at: t.access_expires_at,
            refresh_expires_at: t.refresh_expires_at,
            name: t.name,
            created_at: t.created_at,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct BucketDoc {
    #[serde(rename = "_id")]
    id: String,
    name: String,
    public_id: String,
    secret_id: String,
    owner: String,
    created_at: i64,
    #[serde(default)]
    disabled: bool,
}

impl From<&Bucket> for BucketDoc {
    fn from(b: &Bucket) -> Self {
        BucketDoc {
            id: b.id.clone(),
            name: b.name.clone(),
            public_id: b.public_id.clone(),
            secret_id: b.secret_id.clone(),
            owner: b.owner.clone(),
            created_at: b.created_at,
            disabled: b.disabled,
        }
    }
}

impl From<BucketDoc> for Bucket {
    fn from(b: BucketDoc) -> Self {
        Bucket {
            id: b.id,
            name: b.name,
            public_id: b.public_id,
            secret_id: b.secret_id,
            owner: b.owner,
            created_at: b.created_at,
            disabled: b.disabled,
        }
    }
}

#[derive(Serialize, Deserialize)]
struct MemberDoc {
    bucket_id: String,
    user_id: String,
    role: String,
    #[serde(default)]
    notify: Option<bool>,
}

#[derive(Serialize, Deserialize)]
struct ServerDoc {
    bucket_id: String,
    server_name: String,
    last_update: i64,
    status_json: String,
}

impl From<ServerDoc> for ServerRecord {
    fn from(s: ServerDoc) -> Self {
        ServerRecord {
            bucket_id: s.bucket_id,
            server_name: s.server_name,
            last_update: s.last_update,
            status_json: s.status_json,
        }
    }
}
