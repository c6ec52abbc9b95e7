//! The bottom layer: the three narrow interfaces every role works through (documents,
//! events, bus), their records, the embedded implementations selected by default and the
//! scale-out ones (MongoDB, Elasticsearch, Redis); identifiers and time.

pub mod bus;
#[cfg(test)]
mod contract;
pub mod elastic;
pub mod ids;
pub mod latency;
pub mod model;
pub mod mongo;
pub mod redis_bus;
pub mod sqlite;

use std::sync::Arc;

use async_trait::async_trait;

pub use bus::{
    AgentCommand, Bus, CommandSink, Delivery, LiveEvent, LiveHub, LocalBus, ServerProcesses,
};
pub use model::*;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A unique field is already taken (the field is named).
    #[error("{0} is already taken")]
    Conflict(&'static str),
    /// The store cannot be used right now.
    #[error("{store} store unavailable: {reason}")]
    Unavailable { store: &'static str, reason: String },
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Users, tokens, buckets and servers.
#[async_trait]
pub trait Documents: Send + Sync {
    /// Which implementation this is (`sqlite`, `mongodb`), for `/healthz`.
    fn kind(&self) -> &'static str;
    /// Whether the store answers now.
    async fn ping(&self) -> StoreResult<()>;
    /// Inserts a user; `Conflict("username"|"email")` when taken.
    async fn insert_user(&self, user: &User) -> StoreResult<()>;
    async fn count_users(&self) -> StoreResult<u64>;
    /// Finds a user by username or email.
    async fn user_by_login(&self, login: &str) -> StoreResult<Option<User>>;
    async fn user_by_id(&self, id: &str) -> StoreResult<Option<User>>;
    /// Every account, by username.
    async fn all_users(&self) -> StoreResult<Vec<User>>;
    /// Refuses or admits an account again; disabling revokes every token it holds.
    /// False if there is no such user.
    async fn set_user_disabled(&self, user_id: &str, disabled: bool) -> StoreResult<bool>;
    /// Starts (replacing any pending one) or cancels a password reset; false if there is
    /// no such user.
    async fn set_password_reset(
        &self,
        user_id: &str,
        reset: Option<&PasswordReset>,
    ) -> StoreResult<bool>;

    async fn insert_token(&self, token: &TokenRecord) -> StoreResult<()>;
    async fn token_by_access(&self, access_digest: &str) -> StoreResult<Option<TokenRecord>>;
    async fn token_by_refresh(&self, refresh_digest: &str) -> StoreResult<Option<TokenRecord>>;
    async fn delete_token(&self, access_digest: &str) -> StoreResult<()>;
    /// The token pairs a user holds (sign-ins and personal tokens), oldest first.
    async fn tokens_of_user(&self, user_id: &str) -> StoreResult<Vec<TokenRecord>>;
    /// Revokes one of a user's token pairs; false if they hold no such pair.
    async fn delete_token_pair(&self, user_id: &str, refresh_digest: &str) -> StoreResult<bool>;
    /// Gives the token pair of `refresh_digest` a new access token; false if unknown.
    async fn rotate_access(
        &self,
        refresh_digest: &str,
        access_digest: &str,
        expires_at: i64,
    ) -> StoreResult<bool>;

    /// Inserts a bucket with its owner as first member.
    async fn insert_bucket(&self, bucket: &Bucket) -> StoreResult<()>;
    async fn bucket_by_id(&self, id: &str) -> StoreResult<Option<Bucket>>;
    async fn bucket_by_public_id(&self, public_id: &str) -> StoreResult<Option<Bucket>>;
    async fn buckets_of_user(&self, user_id: &str) -> StoreResult<Vec<Bucket>>;
    async fn member_role(&self, bucket_id: &str, user_id: &str) -> StoreResult<Option<MemberRole>>;
    /// The bucket's members with their names, the owner first, then by username.
    async fn bucket_members(&self, bucket_id: &str) -> StoreResult<Vec<Member>>;
    /// Adds a member, or changes the role of one.
    async fn set_member(&self, bucket_id: &str, user_id: &str, role: MemberRole)
    -> StoreResult<()>;
    /// Whether a member is mailed the bucket's notifications (`None`: as their role has
    /// it); false if they are not a member.
    async fn set_member_notify(
        &self,
        bucket_id: &str,
        user_id: &str,
        notify: Option<bool>,
    ) -> StoreResult<bool>;
    /// Removes a member; false if they were not one.
    async fn remove_member(&self, bucket_id: &str, user_id: &str) -> StoreResult<bool>;
    /// Refuses or admits the bucket's agents again; false if the bucket is gone.
    async fn set_bucket_disabled(&self, bucket_id: &str, disabled: bool) -> StoreResult<bool>;
    /// Renames a bucket; false if it is gone.
    async fn rename_bucket(&self, bucket_id: &str, name: &str) -> StoreResult<bool>;
    /// Makes a member the bucket's owner, the owner until now an admin; false if the
    /// bucket is gone or `user_id` is not a member.
    async fn transfer_bucket(&self, bucket_id: &str, user_id: &str) -> StoreResult<bool>;
    /// Deletes a bucket with its memberships and server records.
    async fn delete_bucket(&self, bucket_id: &str) -> StoreResult<()>;
    /// Sets a user's password hash, ends a pending reset and revokes every token they
    /// hold.
    async fn set_password(&self, user_id: &str, password_hash: &str) -> StoreResult<()>;

    async fn upsert_servers(&self, servers: &[ServerRecord]) -> StoreResult<()>;
    async fn all_servers(&self) -> StoreResult<Vec<ServerRecord>>;
    /// The server records of a bucket (only `only`'s, found by key, if given).
    async fn bucket_servers(
        &self,
        bucket_id: &str,
        only: Option<&str>,
    ) -> StoreResult<Vec<ServerRecord>>;
    /// Forgets a server's record; false if there was none.
    async fn delete_server(&self, bucket_id: &str, server_name: &str) -> StoreResult<bool>;

    /// Every bucket, oldest first.
    async fn all_buckets(&self) -> StoreResult<Vec<Bucket>>;
    /// Stores a notification, or its new delivery state.
    async fn save_notification(&self, notification: &Notification) -> StoreResult<()>;
    /// A bucket's notifications, newest first.
    async fn notifications(&self, bucket_id: &str, limit: u32) -> StoreResult<Vec<Notification>>;
    /// Notifications waiting for a delivery attempt at `now`, oldest first.
    async fn due_notifications(&self, now: i64, limit: u32) -> StoreResult<Vec<Notification>>;

    /// Claims the run of `job` for the period `slot`: true for the first caller of every
    /// node, false for all others (scheduled jobs).
    async fn claim_slot(&self, job: &str, slot: i64) -> StoreResult<bool>;
    /// The newest period claimed for each job whose name starts with `prefix`.
    async fn latest_slots(&self, prefix: &str) -> StoreResult<Vec<(String, i64)>>;

    /// Stores a small document of a bucket (JSON text) under `(kind, id)`, replacing
    /// the one there: alert rules, channel settings, members' report choices.
    async fn put_bucket_doc(
        &self,
        bucket_id: &str,
        kind: &str,
        id: &str,
        doc: &str,
    ) -> StoreResult<()>;
    /// The bucket's documents of `kind` as `(id, doc)`, by id.
    async fn bucket_docs(&self, bucket_id: &str, kind: &str) -> StoreResult<Vec<(String, String)>>;
    /// Whether there was one to delete.
    async fn delete_bucket_doc(&self, bucket_id: &str, kind: &str, id: &str) -> StoreResult<bool>;
    /// Parks a server, or updates its parking.
    async fn park_server(&self, parked: &ParkedServer) -> StoreResult<()>;
    /// Lets a parked server in; false if it was not parked.
    async fn unpark_server(&self, bucket_id: &str, server_name: &str) -> StoreResult<bool>;
    /// The parked servers (of one bucket, or all), by bucket then name.
    async fn parked_servers(&self, bucket_id: Option<&str>) -> StoreResult<Vec<ParkedServer>>;
}

/// Time-stamped data: logs, exceptions, events, transactions, profiles, spans, metric
/// minutes.
#[async_trait]
pub trait Events: Send + Sync {
    /// Which implementation this is, for `/healthz`.
    fn kind(&self) -> &'static str;
    /// Appends a batch; on failure nothing of it is kept and the caller may retry.
    async fn append(&self, events: Arc<[EventRecord]>) -> StoreResult<()>;
    /// The stored documents (JSON text) matching `query`, newest first.
    async fn query(&self, kind: EventKind, query: &EventQuery) -> StoreResult<Vec<String>>;
    /// How many events match `query` in each step of `step_ms` (steps start at multiples
    /// of `step_ms` since the epoch; oldest first; empty steps left out). `limit` and
    /// `offset` are ignored.
    async fn count_histogram(
        &self,
        kind: EventKind,
        query: &EventQuery,
        step_ms: i64,
    ) -> StoreResult<Vec<(i64, u64)>>;
    /// Deletes the events matching `query` (`limit` and `offset` ignored); returns how
    /// many went.
    async fn delete_matching(&self, kind: EventKind, query: &EventQuery) -> StoreResult<u64>;
    /// Entry spans matching `q` (documents), slowest first.
    async fn slowest_spans(&self, q: &SpanQuery) -> StoreResult<Vec<String>>;
    /// Latencies of the entry spans matching `q` per app and route, busiest first, at
    /// most `q.limit` routes.
    async fn route_latencies(&self, q: &SpanQuery) -> StoreResult<Vec<RouteLatency>>;
    async fn append_metrics(&self, points: Arc<[MetricPoint]>) -> StoreResult<()>;
    /// Metric minutes matching `query` merged into steps of `step_ms` per (server, app,
    /// metric), oldest first: `avg` weighted by `count`, extremes, the latest `last`, the
    /// sum of `count`; `pm_id` is not kept (cluster instances of an app are merged).
    async fn metric_histogram(
        &self,
        query: &MetricQuery,
        step_ms: i64,
    ) -> StoreResult<Vec<MetricPoint>>;
    /// Deletes what is older than its cutoff; returns how many rows (or daily indices)
    /// went.
    async fn delete_before(&self, cutoffs: Cutoffs) -> StoreResult<u64>;
}
