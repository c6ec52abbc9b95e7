//! Contract tests: one suite per store interface, run against every implementation
//! (the embedded one and the scale-out one on a real server started here).

use std::net::TcpListener;
use std::time::{Duration, Instant};

use std::sync::Arc;

use super::elastic::{ElasticEvents, parse_urls};
use super::mongo::MongoDocuments;
use super::redis_bus::RedisBus;
use super::sqlite::{open_documents, open_events};
use super::{
    AgentCommand, Bucket, Bus, Channel, CommandSink, Cutoffs, Delivery, Documents, EventKind,
    EventQuery, EventRecord, Events, LocalBus, Member, MemberRole, MetricPoint, MetricQuery,
    Notification, NotificationState, ParkedServer, PasswordReset, ServerProcesses, ServerRecord,
    SpanFacts, SpanQuery, StoreError, TokenRecord, User,
};
use crate::ids::{new_object_id, now_ms};

fn user(name: &str) -> User {
    User {
        id: new_object_id(),
        username: name.into(),
        email: format!("{name}@example.com"),
        password_hash: "h".into(),
        role: "user".into(),
        created_at: 1,
        disabled: false,
        reset: None,
    }
}

/// What every documents store must do.
async fn documents_contract(docs: &dyn Documents) {
    assert_eq!(docs.count_users().await.unwrap(), 0);
    let alice = user("alice");
    docs.insert_user(&alice).await.unwrap();
    let mut same_name = user("alice");
    same_name.email = "other@example.com".into();
    assert!(matches!(
        docs.insert_user(&same_name).await,
        Err(StoreError::Conflict("username"))
    ));
    let mut same_email = user("bob");
    same_email.email = alice.email.clone();
    assert!(matches!(
        docs.insert_user(&same_email).await,
        Err(StoreError::Conflict("email"))
    ));
    assert_eq!(docs.count_users().await.unwrap(), 1);
    assert_eq!(
        docs.user_by_login("alice@example.com").await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(
        docs.user_by_login("alice").await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(
        docs.user_by_id(&alice.id).await.unwrap(),
        Some(alice.clone())
    );
    assert_eq!(docs.user_by_login("nobody").await.unwrap(), None);

    let bucket = Bucket {
        id: new_object_id(),
        name: "prod".into(),
        public_id: "pub1".into(),
        secret_id: "sec1".into(),
        owner: alice.id.clone(),
        created_at: 5,
        disabled: false,
    };
    docs.insert_bucket(&bucket).await.unwrap();
    let twin = Bucket {
        id: new_object_id(),
        ..bucket.clone()
    };
    assert!(matches!(
        docs.insert_bucket(&twin).await,
        Err(StoreError::Conflict("public_id"))
    ));
    let second = Bucket {
        id: new_object_id(),
        public_id: "pub2".into(),
        created_at: 6,
        ..bucket.clone()
    };
    docs.insert_bucket(&second).await.unwrap();
    assert_eq!(
        docs.bucket_by_id(&bucket.id).await.unwrap(),
        Some(bucket.clone())
    );
    assert_eq!(
        docs.bucket_by_public_id("pub2").await.unwrap(),
        Some(second.clone())
    );
    assert_eq!(
        docs.member_role(&bucket.id, &alice.id).await.unwrap(),
        Some(MemberRole::Owner)
    );
    assert_eq!(docs.member_role(&bucket.id, "someone").await.unwrap(), None);
    assert_eq!(
        docs.buckets_of_user(&alice.id).await.unwrap(),
        vec![bucket.clone(), second]
    );
    assert!(docs.buckets_of_user("someone").await.unwrap().is_empty());

    let token = TokenRecord {
        access_digest: "a1".into(),
        refresh_digest: "r1".into(),
        user_id: alice.id.clone(),
        client_id: "c".into(),
        access_expires_at: 10,
        refresh_expires_at: 4_000_000_000_000,
        name: String::new(),
        created_at: 1,
    };
    docs.insert_token(&token).await.unwrap();
    assert_eq!(
        docs.token_by_access("a1").await.unwrap(),
        Some(token.clone())
    );
    assert!(docs.rotate_access("r1", "a2", 30).await.unwrap());
    assert!(docs.token_by_access("a1").await.unwrap().is_none());
    let rotated = docs
        .token_by_refresh("r1")
        .await
        .unwrap()
        .map(|t| (t.access_digest, t.access_expires_at));
    assert_eq!(rotated, Some(("a2".into(), 30)));
    docs.delete_token("a2").await.unwrap();
    assert!(!docs.rotate_access("r1", "a3", 40).await.unwrap());

    let server = |name: &str, at: i64| ServerRecord {
        bucket_id: bucket.id.clone(),
        server_name: name.into(),
        last_update: at,
        status_json: format!(r#"{{"at":{at}}}"#),
    };
    docs.upsert_servers(&[server("web-1", 1), server("web-2", 1)])
        .await
        .unwrap();
    docs.upsert_servers(&[server("web-1", 2)]).await.unwrap();
    let mut all = docs.all_servers().await.unwrap();
    all.sort_by(|a, b| a.server_name.cmp(&b.server_name));
    assert_eq!(all, vec![server("web-1", 2), server("web-2", 1)]);
}

#[tokio::test]
async fn documents_contract_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    documents_contract(&open_documents(dir.path()).unwrap()).await;
}

#[tokio::test]
async fn documents_contract_on_mongodb() {
    if !km_e2e::enabled("a MongoDB-wire server (secantusd-py)") {
        return;
    }
    let server = km_e2e::SecantusDb::start().unwrap();
    let docs = MongoDocuments::connect(&server.url("km_contract"))
        .await
        .unwrap();
    assert_eq!(docs.kind(), "mongodb");
    documents_contract(&docs).await;
    // Indexes are created idempotently: a second node connecting finds them in place.
    let again = MongoDocuments::connect(&server.url("km_contract"))
        .await
        .unwrap();
    assert_eq!(again.count_users().await.unwrap(), 1);
}

#[tokio::test]
async fn a_database_laid_out_by_a_newer_km_is_refused() {
    if !km_e2e::enabled("a MongoDB-wire server (secantusd-py)") {
        return;
    }
    let server = km_e2e::SecantusDb::start().unwrap();
    let url = server.url("km_newer");
    MongoDocuments::connect(&url).await.unwrap();
    let (db, _) = crate::mongo::open(&url, std::time::Duration::from_secs(5))
        .await
        .unwrap();
    let meta = db.collection::<bson::Document>("km_meta");
    let stored = meta
        .find_one(bson::doc! {"_id": "schema"})
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        stored.get_i64("version").unwrap(),
        crate::mongo::SCHEMA_VERSION
    );
    let newer = crate::mongo::SCHEMA_VERSION + 1;
    meta.replace_one(
        bson::doc! {"_id": "schema"},
        bson::doc! {"_id": "schema", "version": newer},
    )
    .await
    .unwrap();
    let err = MongoDocuments::connect(&url)
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains(&format!("laid out by a newer km (schema version {newer}"))
            && err.contains("run a newer km"),
        "{err}"
    );
}

fn member(user: &User, role: MemberRole) -> Member {
    Member {
        user_id: user.id.clone(),
        username: user.username.clone(),
        email: user.email.clone(),
        role,
        notify: None,
    }
}

fn token_of(user: &User, n: u32) -> TokenRecord {
    TokenRecord {
        access_digest: format!("a-{}-{n}", user.username),
        refresh_digest: format!("r-{}-{n}", user.username),
        user_id: user.id.clone(),
        client_id: "c".into(),
        access_expires_at: 4_000_000_000_000,
        refresh_expires_at: 4_000_000_000_000,
        name: format!("token {n}"),
        created_at: i64::from(n),
    }
}

/// What every documents store must do to manage buckets, members, passwords and servers.
async fn bucket_management_contract(docs: &dyn Documents) {
    // The owner's name sorts after the others', who join out of name order.
    let (nina, bob, carol, dave) = (user("nina"), user("bob"), user("carol"), user("dave"));
    for u in [&nina, &bob, &carol, &dave] {
        docs.insert_user(u).await.unwrap();
    }
    let bucket = |name: &str, public_id: &str| Bucket {
        id: new_object_id(),
        name: name.into(),
        public_id: public_id.into(),
        secret_id: format!("sec-{public_id}"),
        owner: nina.id.clone(),
        created_at: 5,
        disabled: false,
    };
    let (prod, staging) = (bucket("prod", "pub-prod"), bucket("staging", "pub-staging"));
    docs.insert_bucket(&prod).await.unwrap();
    docs.insert_bucket(&staging).await.unwrap();

    // Members: the owner first, then by username, each with their role.
    docs.set_member(&prod.id, &carol.id, MemberRole::Developer)
        .await
        .unwrap();
    docs.set_member(&prod.id, &dave.id, MemberRole::Admin)
        .await
        .unwrap();
    docs.set_member(&prod.id, &bob.id, MemberRole::ReadOnly)
        .await
        .unwrap();
    docs.set_member(&staging.id, &dave.id, MemberRole::Developer)
        .await
        .unwrap();
    assert_eq!(
        docs.bucket_members(&prod.id).await.unwrap(),
        vec![
            member(&nina, MemberRole::Owner),
            member(&bob, MemberRole::ReadOnly),
            member(&carol, MemberRole::Developer),
            member(&dave, MemberRole::Admin),
        ]
    );
    assert_eq!(
        docs.bucket_members(&staging.id).await.unwrap(),
        vec![
            member(&nina, MemberRole::Owner),
            member(&dave, MemberRole::Developer),
        ]
    );
    assert!(docs.bucket_members("nobucket").await.unwrap().is_empty());
    assert_eq!(
        docs.buckets_of_user(&bob.id).await.unwrap(),
        vec![prod.clone()]
    );

    // A role change replaces the role, it adds no second membership.
    docs.set_member(&prod.id, &bob.id, MemberRole::Developer)
        .await
        .unwrap();
    assert_eq!(
        docs.member_role(&prod.id, &bob.id).await.unwrap(),
        Some(MemberRole::Developer)
    );
    assert_eq!(
        docs.member_role(&staging.id, &bob.id).await.unwrap(),
        None,
        "only in the bucket it was given for"
    );
    assert_eq!(docs.bucket_members(&prod.id).await.unwrap().len(), 4);

    // Removal.
    assert!(docs.remove_member(&prod.id, &bob.id).await.unwrap());
    assert!(!docs.remove_member(&prod.id, &bob.id).await.unwrap());
    assert!(!docs.remove_member("nobucket", &carol.id).await.unwrap());
    assert_eq!(docs.member_role(&prod.id, &bob.id).await.unwrap(), None);
    assert!(docs.buckets_of_user(&bob.id).await.unwrap().is_empty());
    assert_eq!(
        docs.bucket_members(&prod.id).await.unwrap(),
        vec![
            member(&nina, MemberRole::Owner),
            member(&carol, MemberRole::Developer),
            member(&dave, MemberRole::Admin),
        ]
    );

    // Rename: only the name changes.
    assert!(docs.rename_bucket(&prod.id, "production").await.unwrap());
    let renamed = Bucket {
        name: "production".into(),
        ..prod.clone()
    };
    assert_eq!(
        docs.bucket_by_id(&prod.id).await.unwrap(),
        Some(renamed.clone())
    );
    assert!(!docs.rename_bucket("nobucket", "x").await.unwrap());

    // Disabled: agents are refused; found by public id as such; enabled again.
    assert!(docs.set_bucket_disabled(&prod.id, true).await.unwrap());
    let found = docs.bucket_by_public_id("pub-prod").await.unwrap().unwrap();
    assert!(found.disabled);
    assert!(docs.set_bucket_disabled(&prod.id, false).await.unwrap());
    assert_eq!(
        docs.bucket_by_id(&prod.id).await.unwrap(),
        Some(renamed.clone())
    );
    assert!(!docs.set_bucket_disabled("nobucket", true).await.unwrap());

    // Server records: deleting one forgets only it.
    let server = |bucket: &Bucket, name: &str| ServerRecord {
        bucket_id: bucket.id.clone(),
        server_name: name.into(),
        last_update: 1,
        status_json: "{}".into(),
    };
    docs.upsert_servers(&[
        server(&prod, "web-1"),
        server(&prod, "web-2"),
        server(&staging, "web-1"),
    ])
    .await
    .unwrap();
    assert!(docs.delete_server(&prod.id, "web-2").await.unwrap());
    assert!(!docs.delete_server(&prod.id, "web-2").await.unwrap());
    assert!(!docs.delete_server("nobucket", "web-1").await.unwrap());
    let by_bucket = |mut servers: Vec<ServerRecord>| {
        servers.sort_by(|a, b| a.bucket_id.cmp(&b.bucket_id));
        servers
    };
    assert_eq!(
        by_bucket(docs.all_servers().await.unwrap()),
        by_bucket(vec![server(&prod, "web-1"), server(&staging, "web-1")])
    );
    assert_eq!(
        docs.bucket_servers(&staging.id, None).await.unwrap(),
        vec![server(&staging, "web-1")]
    );
    assert_eq!(
        docs.bucket_servers(&prod.id, Some("web-1")).await.unwrap(),
        vec![server(&prod, "web-1")]
    );
    assert_eq!(
        docs.bucket_servers(&prod.id, Some("web-2")).await.unwrap(),
        vec![]
    );

    // Notification choices: by role until a member chooses; only members can.
    assert!(
        docs.set_member_notify(&prod.id, &carol.id, Some(true))
            .await
            .unwrap()
    );
    let carol_notify = |members: Vec<Member>| {
        members
            .into_iter()
            .find(|m| m.user_id == carol.id)
            .map(|m| m.notify)
    };
    assert_eq!(
        carol_notify(docs.bucket_members(&prod.id).await.unwrap()),
        Some(Some(true))
    );
    assert!(
        docs.set_member_notify(&prod.id, &carol.id, None)
            .await
            .unwrap()
    );
    assert_eq!(
        carol_notify(docs.bucket_members(&prod.id).await.unwrap()),
        Some(None)
    );
    assert!(
        !docs
            .set_member_notify(&staging.id, &carol.id, Some(true))
            .await
            .unwrap()
    );

    // Every bucket, oldest first.
    let all: Vec<String> = docs
        .all_buckets()
        .await
        .unwrap()
        .into_iter()
        .map(|b| b.name)
        .collect();
    assert_eq!(all, ["production", "staging"]);

    // Notifications: listed newest first per bucket; due ones by their next attempt.
    let note = |id: &str, created_at: i64, state: NotificationState, next: i64| Notification {
        id: id.into(),
        bucket_id: prod.id.clone(),
        kind: "new_issue".into(),
        channel: if id == "n2" {
            Channel::Webhook
        } else {
            Channel::Email
        },
        created_at,
        subject: format!("subject {id}"),
        text: "text".into(),
        html: "<p>html</p>".into(),
        count: 3,
        recipients: vec!["nina@example.com".into()],
        payload: serde_json::json!({"type": "new_issue", "items": [{"app": "api"}]}),
        state,
        attempts: 0,
        next_attempt_at: next,
        last_error: None,
        sent_at: None,
    };
    docs.save_notification(&note("n1", 10, NotificationState::Pending, 10))
        .await
        .unwrap();
    docs.save_notification(&note("n2", 20, NotificationState::Retrying, 50))
        .await
        .unwrap();
    docs.save_notification(&note("n3", 30, NotificationState::Sent, 0))
        .await
        .unwrap();
    let ids = |n: Vec<Notification>| n.into_iter().map(|n| n.id).collect::<Vec<_>>();
    assert_eq!(
        ids(docs.notifications(&prod.id, 10).await.unwrap()),
        ["n3", "n2", "n1"]
    );
    assert_eq!(ids(docs.notifications(&prod.id, 1).await.unwrap()), ["n3"]);
    assert_eq!(ids(docs.due_notifications(40, 10).await.unwrap()), ["n1"]);
    assert_eq!(
        ids(docs.due_notifications(60, 10).await.unwrap()),
        ["n1", "n2"]
    );
    let mut sent = note("n1", 10, NotificationState::Sent, 10);
    sent.attempts = 1;
    sent.sent_at = Some(15);
    docs.save_notification(&sent).await.unwrap();
    assert_eq!(ids(docs.due_notifications(60, 10).await.unwrap()), ["n2"]);
    assert_eq!(docs.notifications(&prod.id, 10).await.unwrap()[2], sent);
    assert!(
        docs.notifications(&staging.id, 10)
            .await
            .unwrap()
            .is_empty()
    );

    // Parked servers: parked again updates, unparked once, deleted with their server.
    let parked = |bucket: &Bucket, name: &str, processes: u32| ParkedServer {
        bucket_id: bucket.id.clone(),
        server_name: name.into(),
        reason: "over the limit".into(),
        processes,
        parked_at: 10,
    };
    docs.park_server(&parked(&prod, "web-1", 3)).await.unwrap();
    docs.park_server(&parked(&prod, "web-1", 4)).await.unwrap();
    docs.park_server(&parked(&staging, "web-9", 1))
        .await
        .unwrap();
    assert_eq!(
        docs.parked_servers(Some(&prod.id)).await.unwrap(),
        vec![parked(&prod, "web-1", 4)]
    );
    assert_eq!(docs.parked_servers(None).await.unwrap().len(), 2);
    assert!(docs.unpark_server(&staging.id, "web-9").await.unwrap());
    assert!(!docs.unpark_server(&staging.id, "web-9").await.unwrap());
    docs.park_server(&parked(&staging, "web-1", 1))
        .await
        .unwrap();
    docs.delete_server(&staging.id, "web-1").await.unwrap();
    assert!(
        docs.parked_servers(Some(&staging.id))
            .await
            .unwrap()
            .is_empty()
    );
    docs.upsert_servers(&[server(&staging, "web-1")])
        .await
        .unwrap();

    // Bucket documents: replaced by (kind, id), listed by id, kept apart per bucket and
    // kind, deleted once.
    for (bucket, kind, id, doc) in [
        (&prod, "alert", "b", "{\"v\":1}"),
        (&prod, "alert", "a", "{\"v\":2}"),
        (&prod, "alert", "b", "{\"v\":3}"),
        (&prod, "channels", "a", "{}"),
        (&staging, "alert", "a", "{\"v\":4}"),
    ] {
        docs.put_bucket_doc(&bucket.id, kind, id, doc)
            .await
            .unwrap();
    }
    let listed = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(id, doc)| (id.to_string(), doc.to_string()))
            .collect()
    };
    assert_eq!(
        docs.bucket_docs(&prod.id, "alert").await.unwrap(),
        listed(&[("a", "{\"v\":2}"), ("b", "{\"v\":3}")])
    );
    assert!(
        docs.delete_bucket_doc(&prod.id, "alert", "b")
            .await
            .unwrap()
    );
    assert!(
        !docs
            .delete_bucket_doc(&prod.id, "alert", "b")
            .await
            .unwrap()
    );
    assert!(
        !docs
            .delete_bucket_doc(&prod.id, "nokind", "a")
            .await
            .unwrap()
    );
    assert_eq!(
        docs.bucket_docs(&staging.id, "alert").await.unwrap(),
        listed(&[("a", "{\"v\":4}")])
    );

    // Deleting a bucket takes its memberships, server records and documents, and
    // nothing else.
    docs.delete_bucket(&prod.id).await.unwrap();
    for kind in ["alert", "channels"] {
        assert!(docs.bucket_docs(&prod.id, kind).await.unwrap().is_empty());
    }
    assert_eq!(
        docs.bucket_docs(&staging.id, "alert").await.unwrap().len(),
        1
    );
    assert_eq!(docs.bucket_by_id(&prod.id).await.unwrap(), None);
    assert_eq!(docs.bucket_by_public_id("pub-prod").await.unwrap(), None);
    for u in [&nina, &carol, &dave] {
        assert_eq!(docs.member_role(&prod.id, &u.id).await.unwrap(), None);
    }
    assert!(docs.bucket_members(&prod.id).await.unwrap().is_empty());
    assert_eq!(
        docs.buckets_of_user(&nina.id).await.unwrap(),
        vec![staging.clone()]
    );
    assert!(docs.buckets_of_user(&carol.id).await.unwrap().is_empty());
    assert!(
        docs.parked_servers(Some(&prod.id))
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        docs.buckets_of_user(&dave.id).await.unwrap(),
        vec![staging.clone()]
    );
    assert_eq!(
        docs.all_servers().await.unwrap(),
        vec![server(&staging, "web-1")]
    );
    assert_eq!(
        docs.member_role(&staging.id, &dave.id).await.unwrap(),
        Some(MemberRole::Developer)
    );
    // Deleting again, or a bucket that never was, is no error; the public id is free.
    docs.delete_bucket(&prod.id).await.unwrap();
    docs.delete_bucket("nobucket").await.unwrap();
    let reborn = bucket("prod", "pub-prod");
    docs.insert_bucket(&reborn).await.unwrap();
    assert_eq!(
        docs.bucket_members(&reborn.id).await.unwrap(),
        vec![member(&nina, MemberRole::Owner)]
    );

    // A new password revokes every token of its user, and only theirs.
    for t in [token_of(&nina, 1), token_of(&nina, 2), token_of(&carol, 1)] {
        docs.insert_token(&t).await.unwrap();
    }
    docs.set_password(&nina.id, "h2").await.unwrap();
    let changed = docs.user_by_id(&nina.id).await.unwrap();
    assert_eq!(changed.map(|u| u.password_hash), Some("h2".to_string()));
    for n in [1, 2] {
        let t = token_of(&nina, n);
        assert_eq!(docs.token_by_access(&t.access_digest).await.unwrap(), None);
        assert_eq!(
            docs.token_by_refresh(&t.refresh_digest).await.unwrap(),
            None
        );
        assert!(
            !docs
                .rotate_access(&t.refresh_digest, "a-new", 1)
                .await
                .unwrap()
        );
    }
    assert_eq!(
        docs.token_by_access("a-carol-1").await.unwrap(),
        Some(token_of(&carol, 1))
    );
    let carol_now = docs.user_by_id(&carol.id).await.unwrap();
    assert_eq!(carol_now.map(|u| u.password_hash), Some("h".to_string()));
}

#[tokio::test]
async fn bucket_management_contract_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    bucket_management_contract(&open_documents(dir.path()).unwrap()).await;
}

#[tokio::test]
async fn bucket_management_contract_on_mongodb() {
    if !km_e2e::enabled("a MongoDB-wire server (secantusd-py)") {
        return;
    }
    let server = km_e2e::SecantusDb::start().unwrap();
    let docs = MongoDocuments::connect(&server.url("km_contract"))
        .await
        .unwrap();
    bucket_management_contract(&docs).await;
}

/// What every documents store must do for an appliance's admins and a bucket's owner:
/// accounts listed and disabled, password resets, personal tokens, ownership transfers.
async fn account_contract(docs: &dyn Documents) {
    let (zoe, ann, max) = (user("zoe"), user("ann"), user("max"));
    for u in [&zoe, &ann, &max] {
        docs.insert_user(u).await.unwrap();
    }
    let names = |users: Vec<User>| users.into_iter().map(|u| u.username).collect::<Vec<_>>();
    assert_eq!(
        names(docs.all_users().await.unwrap()),
        ["ann", "max", "zoe"]
    );

    // Disabling revokes the account's tokens (only theirs); enabling keeps the flag off.
    for t in [token_of(&ann, 1), token_of(&max, 1)] {
        docs.insert_token(&t).await.unwrap();
    }
    assert!(docs.set_user_disabled(&ann.id, true).await.unwrap());
    assert!(!docs.set_user_disabled("nobody", true).await.unwrap());
    let stored = docs.user_by_id(&ann.id).await.unwrap().unwrap();
    assert!(stored.disabled);
    assert!(docs.tokens_of_user(&ann.id).await.unwrap().is_empty());
    assert_eq!(
        docs.tokens_of_user(&max.id).await.unwrap(),
        vec![token_of(&max, 1)]
    );
    assert!(docs.set_user_disabled(&ann.id, false).await.unwrap());
    assert!(!docs.user_by_login("ann").await.unwrap().unwrap().disabled);

    // A reset replaces the pending one, is cancelled, and ends when the password is set.
    let reset = |digest: &str| PasswordReset {
        digest: digest.into(),
        expires_at: 4_000_000_000_000,
    };
    assert!(
        docs.set_password_reset(&ann.id, Some(&reset("d1")))
            .await
            .unwrap()
    );
    assert!(
        docs.set_password_reset(&ann.id, Some(&reset("d2")))
            .await
            .unwrap()
    );
    assert_eq!(
        docs.user_by_id(&ann.id).await.unwrap().unwrap().reset,
        Some(reset("d2"))
    );
    assert!(docs.set_password_reset(&ann.id, None).await.unwrap());
    assert_eq!(docs.user_by_id(&ann.id).await.unwrap().unwrap().reset, None);
    assert!(!docs.set_password_reset("nobody", None).await.unwrap());
    docs.set_password_reset(&ann.id, Some(&reset("d3")))
        .await
        .unwrap();
    docs.set_password(&ann.id, "h2").await.unwrap();
    assert_eq!(docs.user_by_id(&ann.id).await.unwrap().unwrap().reset, None);

    // A user's token pairs, oldest first, with their names; one revoked by its refresh
    // digest, and only by its holder.
    for n in [3, 1, 2] {
        docs.insert_token(&token_of(&zoe, n)).await.unwrap();
    }
    assert_eq!(
        docs.tokens_of_user(&zoe.id).await.unwrap(),
        vec![token_of(&zoe, 1), token_of(&zoe, 2), token_of(&zoe, 3)]
    );
    assert!(!docs.delete_token_pair(&max.id, "r-zoe-2").await.unwrap());
    assert!(docs.delete_token_pair(&zoe.id, "r-zoe-2").await.unwrap());
    assert!(!docs.delete_token_pair(&zoe.id, "r-zoe-2").await.unwrap());
    assert_eq!(
        docs.tokens_of_user(&zoe.id).await.unwrap(),
        vec![token_of(&zoe, 1), token_of(&zoe, 3)]
    );

    // A transfer makes a member the owner and the owner until now an admin.
    let bucket = Bucket {
        id: new_object_id(),
        name: "team".into(),
        public_id: "pub-team".into(),
        secret_id: "sec-team".into(),
        owner: zoe.id.clone(),
        created_at: 5,
        disabled: false,
    };
    docs.insert_bucket(&bucket).await.unwrap();
    docs.set_member(&bucket.id, &ann.id, MemberRole::Developer)
        .await
        .unwrap();
    assert!(!docs.transfer_bucket(&bucket.id, &max.id).await.unwrap());
    assert!(!docs.transfer_bucket("nobucket", &ann.id).await.unwrap());
    assert_eq!(
        docs.bucket_by_id(&bucket.id)
            .await
            .unwrap()
            .map(|b| b.owner),
        Some(zoe.id.clone()),
        "a refused transfer changes nothing"
    );
    assert!(docs.transfer_bucket(&bucket.id, &ann.id).await.unwrap());
    assert_eq!(
        docs.bucket_by_id(&bucket.id)
            .await
            .unwrap()
            .map(|b| b.owner),
        Some(ann.id.clone())
    );
    assert_eq!(
        docs.bucket_members(&bucket.id).await.unwrap(),
        vec![
            member(&ann, MemberRole::Owner),
            member(&zoe, MemberRole::Admin)
        ]
    );
}

#[tokio::test]
async fn account_contract_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    account_contract(&open_documents(dir.path()).unwrap()).await;
}

#[tokio::test]
async fn account_contract_on_mongodb() {
    if !km_e2e::enabled("a MongoDB-wire server (secantusd-py)") {
        return;
    }
    let server = km_e2e::SecantusDb::start().unwrap();
    let docs = MongoDocuments::connect(&server.url("km_contract"))
        .await
        .unwrap();
    account_contract(&docs).await;
}

/// Scheduled jobs: of many claims of one period from two nodes, exactly one wins;
/// another period or another job is claimed anew; a claim is never won twice.
async fn job_slot_contract(node_a: &dyn Documents, node_b: &dyn Documents) {
    let claims = (0..8).map(|i| {
        let node = if i % 2 == 0 { node_a } else { node_b };
        node.claim_slot("report", 100)
    });
    let won = futures_util::future::join_all(claims).await;
    let winners = won.iter().filter(|r| matches!(r, Ok(true))).count();
    assert!(won.iter().all(Result::is_ok), "{won:?}");
    assert_eq!(winners, 1, "one claim of the period wins: {won:?}");
    assert!(!node_a.claim_slot("report", 100).await.unwrap());
    assert!(node_b.claim_slot("report", 101).await.unwrap());
    assert!(node_a.claim_slot("retention", 100).await.unwrap());
    node_a.claim_slot("off:b1:web%1", 7).await.unwrap();
    node_a.claim_slot("off:b1:web%1", 9).await.unwrap();
    node_a.claim_slot("off:b2:web-1", 8).await.unwrap();
    assert_eq!(
        node_b.latest_slots("off:b1:").await.unwrap(),
        [("off:b1:web%1".to_string(), 9)]
    );
    assert_eq!(
        node_b.latest_slots("report").await.unwrap(),
        [("report".to_string(), 101)]
    );
    assert!(node_b.latest_slots("nothing").await.unwrap().is_empty());
}

#[tokio::test]
async fn job_slot_contract_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    // Two handles on one file, as two processes of one machine.
    let (a, b) = (
        open_documents(dir.path()).unwrap(),
        open_documents(dir.path()).unwrap(),
    );
    job_slot_contract(&a, &b).await;
}

#[tokio::test]
async fn job_slot_contract_on_mongodb() {
    if !km_e2e::enabled("a MongoDB-wire server (secantusd-py)") {
        return;
    }
    let server = km_e2e::SecantusDb::start().unwrap();
    let url = server.url("km_contract");
    let a = MongoDocuments::connect(&url).await.unwrap();
    let b = MongoDocuments::connect(&url).await.unwrap();
    job_slot_contract(&a, &b).await;
}

/// A closed port: the connection fails within 10 s with `expected`, without `hunter2`.
async fn fails_fast<T>(
    connect: impl std::future::Future<Output = anyhow::Result<T>>,
    expected: &str,
) {
    let started = Instant::now();
    let err = connect
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        started.elapsed() < Duration::from_secs(12),
        "took {:?}",
        started.elapsed()
    );
    assert!(err.starts_with(expected), "{err}");
    assert!(!err.contains("hunter2"), "a password was printed: {err}");
}

fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn unreachable_mongodb_fails_fast_naming_the_host() {
    let url = format!("mongodb://user:hunter2@127.0.0.1:{}/km", closed_port());
    fails_fast(
        MongoDocuments::connect(&url),
        "cannot connect to 127.0.0.1:",
    )
    .await;
}

const DAY_MS: i64 = 86_400_000;

fn event(bucket: &str, app: &str, at: i64, event_type: &str) -> EventRecord {
    EventRecord {
        id: crate::ids::new_object_id(),
        kind: EventKind::Log,
        bucket_id: bucket.into(),
        server_name: "web-1".into(),
        app_name: Some(app.into()),
        event_type: event_type.into(),
        name: None,
        at,
        doc: format!(r#"{{"at":{at}}}"#),
        span: None,
    }
}

fn docs(ats: &[i64]) -> Vec<String> {
    ats.iter().map(|at| format!(r#"{{"at":{at}}}"#)).collect()
}

fn point(at: i64) -> MetricPoint {
    MetricPoint {
        bucket_id: "b1".into(),
        server_name: "web-1".into(),
        app_name: "api".into(),
        pm_id: 0,
        name: "cpu".into(),
        unit: Some("%".into()),
        agg_type: None,
        at,
        avg: 1.0,
        min: 0.5,
        max: 2.0,
        last: 1.5,
        count: 60,
    }
}

/// Queries until `expected` comes back (search engines show writes after a refresh).
async fn settled(events: &dyn Events, kind: EventKind, query: &EventQuery, expected: Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = events.query(kind, query).await.unwrap();
        if got == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{kind:?} {query:?}: expected {expected:?}, got {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What every events store must do.
async fn events_contract(events: &dyn Events) {
    let now = now_ms();
    let old = now - 40 * DAY_MS;
    let batch = vec![
        event("b1", "api", now - 3000, "out"),
        event("b1", "api", now - 1000, "err"),
        event("b1", "web", now - 2000, "out"),
        event("b2", "api", now - 500, "out"),
        event("b1", "api", old, "out"),
    ];
    events.append(Arc::from(batch.clone())).await.unwrap();
    // Written again after a failure: nothing doubles.
    events.append(Arc::from(batch)).await.unwrap();
    let all = EventQuery {
        bucket_id: "b1".into(),
        limit: 10,
        ..EventQuery::default()
    };
    settled(
        events,
        EventKind::Log,
        &all,
        docs(&[now - 1000, now - 2000, now - 3000, old]),
    )
    .await;
    let api_before = EventQuery {
        app_name: Some("api".into()),
        before: Some(now - 1000),
        ..all.clone()
    };
    settled(
        events,
        EventKind::Log,
        &api_before,
        docs(&[now - 3000, old]),
    )
    .await;
    let after = EventQuery {
        after: Some(now - 2500),
        ..all.clone()
    };
    settled(
        events,
        EventKind::Log,
        &after,
        docs(&[now - 1000, now - 2000]),
    )
    .await;
    let errors = EventQuery {
        event_type: Some("err".into()),
        ..all.clone()
    };
    settled(events, EventKind::Log, &errors, docs(&[now - 1000])).await;
    let page = EventQuery {
        limit: 1,
        offset: 1,
        ..all.clone()
    };
    settled(events, EventKind::Log, &page, docs(&[now - 2000])).await;
    settled(events, EventKind::Exception, &all, Vec::new()).await;

    let minute = now - now.rem_euclid(60_000);
    events
        .append_metrics(Arc::from(vec![point(minute - 60_000), point(old)]))
        .await
        .unwrap();
    let recent = MetricQuery {
        bucket_id: "b1".into(),
        since: now - 3_600_000,
        ..MetricQuery::default()
    };
    let histogram = |query: MetricQuery, step: i64| async move {
        events.metric_histogram(&query, step).await.unwrap()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while histogram(recent.clone(), 60_000).await != vec![point(minute - 60_000)] {
        assert!(
            Instant::now() < deadline,
            "metrics: {:?}",
            histogram(recent.clone(), 60_000).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Minutes of two instances of an app within one step merge: avg weighted by count,
    // extremes, the latest `last`.
    // Two hours back: no other minute of this suite falls in that hour.
    let hour = now - now.rem_euclid(3_600_000) - 2 * 3_600_000;
    let other = MetricPoint {
        pm_id: 1,
        at: hour + 60_000,
        avg: 4.0,
        min: 3.0,
        max: 5.0,
        last: 4.5,
        count: 30,
        ..point(0)
    };
    events
        .append_metrics(Arc::from(vec![point(hour), other.clone()]))
        .await
        .unwrap();
    let merged = MetricPoint {
        at: hour,
        avg: 2.0,
        min: 0.5,
        max: 5.0,
        last: 4.5,
        count: 90,
        ..point(0)
    };
    let earlier = MetricQuery {
        since: hour,
        ..recent.clone()
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while histogram(earlier.clone(), 3_600_000).await.first() != Some(&merged) {
        assert!(
            Instant::now() < deadline,
            "merged: {:?}",
            histogram(earlier.clone(), 3_600_000).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The same minutes one series per instance, up to a time, of some metrics only.
    let instances = histogram(
        MetricQuery {
            by_instance: true,
            ..earlier.clone()
        },
        3_600_000,
    )
    .await;
    let hourly = |p: MetricPoint| MetricPoint { at: hour, ..p };
    assert_eq!(
        instances
            .iter()
            .filter(|p| p.at == hour)
            .cloned()
            .collect::<Vec<_>>(),
        vec![hourly(point(hour)), hourly(other.clone())],
        "one series per pm_id"
    );
    let until = MetricQuery {
        until: Some(hour + 60_000),
        ..earlier.clone()
    };
    assert_eq!(histogram(until, 3_600_000).await, vec![point(hour)]);
    let names = |names: &[&str]| MetricQuery {
        names: names.iter().map(|n| n.to_string()).collect(),
        until: Some(hour + 3_600_000),
        ..earlier.clone()
    };
    assert_eq!(histogram(names(&["memory"]), 3_600_000).await, vec![]);
    assert_eq!(
        histogram(names(&["cpu", "memory"]), 3_600_000).await,
        vec![merged.clone()]
    );

    // Retention: logs kept 50 days keep their 40-day-old line while the metric minute of
    // the same day goes (30 days); then logs kept 30 days lose it too.
    let cutoffs = |logs_days: i64| Cutoffs {
        logs: now - logs_days * DAY_MS,
        others: now - 30 * DAY_MS,
    };
    assert!(events.delete_before(cutoffs(50)).await.unwrap() > 0);
    let ever = MetricQuery { since: 0, ..recent };
    let kept = histogram(ever, 60_000).await;
    assert!(
        kept.iter().all(|p| p.at >= hour) && kept.contains(&point(minute - 60_000)),
        "the old minute went: {kept:?}"
    );
    settled(
        events,
        EventKind::Log,
        &all,
        docs(&[now - 1000, now - 2000, now - 3000, old]),
    )
    .await;
    assert!(events.delete_before(cutoffs(30)).await.unwrap() > 0);
    settled(
        events,
        EventKind::Log,
        &all,
        docs(&[now - 1000, now - 2000, now - 3000]),
    )
    .await;
}

#[tokio::test]
async fn events_contract_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    events_contract(&open_events(dir.path()).unwrap()).await;
}

#[tokio::test]
async fn events_contract_on_elasticsearch() {
    if !km_e2e::enabled("an Elasticsearch-API server (osmem-server)") {
        return;
    }
    let server = km_e2e::OsMem::start().unwrap();
    let urls = parse_urls(server.url()).unwrap();
    let events = ElasticEvents::connect(&urls, "kmtest").await.unwrap();
    assert_eq!(events.kind(), "elasticsearch");
    let started = now_ms();
    events_contract(&events).await;
    // One index per kind per day, named for the day of the documents in it (today's logs,
    // metric minutes of up to two hours ago); the day of 40 days ago went with retention.
    let listed: serde_json::Value = reqwest::get(format!(
        "{}/_cat/indices/kmtest-*?format=json",
        server.url()
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|i| i["index"].as_str())
        .collect();
    let day = |at: i64| {
        bson::DateTime::from_millis(at)
            .try_to_rfc3339_string()
            .unwrap()[..10]
            .replace('-', ".")
    };
    let days_written: Vec<String> = (0..=3).map(|h| day(started - h * 3_600_000)).collect();
    assert!(
        names.contains(&format!("kmtest-logs-{}", day(started)).as_str()),
        "{listed}"
    );
    for name in &names {
        let (kind, d) = name
            .strip_prefix("kmtest-")
            .and_then(|n| n.rsplit_once('-'))
            .unwrap();
        assert!(
            ["logs", "metrics"].contains(&kind) && days_written.iter().any(|w| w == d),
            "unexpected index {name}: {listed}"
        );
    }
}

/// Noon UTC on 2026-11-22: every step below stays within that day, whatever the clock.
const NOON: i64 = 1_795_348_800_000;
const MINUTE: i64 = 60_000;

fn log_line(bucket: &str, app: &str, at: i64, log_type: &str, line: &str) -> EventRecord {
    EventRecord {
        doc: serde_json::json!({"at": at, "app_name": app, "log_type": log_type, "data": line})
            .to_string(),
        ..event(bucket, app, at, log_type)
    }
}

fn exception(app: &str, at: i64, data: serde_json::Value) -> EventRecord {
    EventRecord {
        kind: EventKind::Exception,
        event_type: "process:exception".into(),
        doc: serde_json::json!({"at": at, "app_name": app, "data": data}).to_string(),
        ..event("s1", app, at, "")
    }
}

fn docs_of(events: &[&EventRecord]) -> Vec<String> {
    events.iter().map(|e| e.doc.clone()).collect()
}

/// Counts until `expected` comes back (search engines show writes after a refresh).
async fn counted(
    events: &dyn Events,
    kind: EventKind,
    query: &EventQuery,
    step: i64,
    expected: Vec<(i64, u64)>,
) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = events.count_histogram(kind, query, step).await.unwrap();
        if got == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{kind:?} {query:?} by {step}: expected {expected:?}, got {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What every events store must do to search, count and delete events by filter.
async fn event_search_contract(events: &dyn Events) {
    let t = NOON;
    // Steps of a minute: the first and last millisecond of the first, the start of the next.
    let l1 = log_line("s1", "api", t, "out", "GET /users 200 in 3ms\n");
    let l2 = log_line(
        "s1",
        "api",
        t + MINUTE - 1,
        "err",
        "Connection REFUSED by db\n",
    );
    let l3 = log_line(
        "s1",
        "api",
        t + MINUTE,
        "err",
        "retrying: connection refused\n",
    );
    let l4 = log_line(
        "s1",
        "web",
        t + MINUTE + 2_000,
        "out",
        "upstream connection Refused",
    );
    // Wildcard characters, quotes and a backslash are plain text to the search.
    let l5 = log_line(
        "s1",
        "api",
        t + 2 * MINUTE,
        "out",
        r#"50% done *ok*? "quoted" C:\Tmp"#,
    );
    let l6 = log_line(
        "s1",
        "api",
        t + 3 * MINUTE + 5_000,
        "out",
        "GET /health 200\n",
    );
    let other_bucket = log_line("s2", "api", t + 1_000, "out", "connection refused");
    let e1 = exception(
        "api",
        t + 5_000,
        serde_json::json!({
            "message": "Cannot read properties of undefined (reading 'id')",
            "stack": "TypeError: Cannot read properties of undefined\n    at handler (/srv/app/routes/Users.js:10:5)",
        }),
    );
    let e2 = exception(
        "web",
        t + MINUTE + 10_000,
        serde_json::json!({"message": "connect ECONNREFUSED 127.0.0.1:5432", "stack": "Error: connect\n    at TCPConnectWrap"}),
    );
    let e3 = exception(
        "api",
        t + MINUTE + 11_000,
        "Request Timeout after 30s".into(),
    );
    let batch = [&l1, &l2, &l3, &l4, &l5, &l6, &other_bucket, &e1, &e2, &e3];
    events
        .append(batch.iter().map(|e| (*e).clone()).collect())
        .await
        .unwrap();
    let all = EventQuery {
        bucket_id: "s1".into(),
        limit: 100,
        ..EventQuery::default()
    };
    let text = |text: &str| EventQuery {
        text: Some(text.into()),
        ..all.clone()
    };
    let in_app = |app: &str, query: EventQuery| EventQuery {
        app_name: Some(app.into()),
        ..query
    };
    let (log, exc) = (EventKind::Log, EventKind::Exception);
    settled(events, log, &all, docs_of(&[&l6, &l5, &l4, &l3, &l2, &l1])).await;
    settled(events, exc, &all, docs_of(&[&e3, &e2, &e1])).await;

    // Text search: ignores case, within the bucket, with the other filters.
    let refused = text("CONNECTION refused");
    settled(events, log, &refused, docs_of(&[&l4, &l3, &l2])).await;
    settled(
        events,
        log,
        &in_app("api", refused.clone()),
        docs_of(&[&l3, &l2]),
    )
    .await;
    let page = EventQuery {
        limit: 1,
        offset: 1,
        ..refused.clone()
    };
    settled(events, log, &page, docs_of(&[&l3])).await;
    for literal in ["*ok*?", "50% DONE", r#""quoted""#, r"c:\tmp"] {
        settled(events, log, &text(literal), docs_of(&[&l5])).await;
    }
    settled(events, log, &text("*o?*"), Vec::new()).await;
    // The line is searched, not the rest of the document.
    settled(events, log, &text("log_type"), Vec::new()).await;
    settled(
        events,
        log,
        &text(""),
        docs_of(&[&l6, &l5, &l4, &l3, &l2, &l1]),
    )
    .await;
    // Exceptions: the message and the stack (or the text when that is all there is).
    settled(events, exc, &text("users.JS:10"), docs_of(&[&e1])).await;
    settled(events, exc, &text("econnrefused"), docs_of(&[&e2])).await;
    settled(events, exc, &text("timeout"), docs_of(&[&e3])).await;
    settled(events, exc, &text("cannot read"), docs_of(&[&e1])).await;
    settled(events, exc, &in_app("web", text("cannot read")), Vec::new()).await;
    settled(events, exc, &text("refused by db"), Vec::new()).await;

    // Counts per step: steps start at multiples of the step; empty ones left out; every
    // filter applies but paging.
    let (m0, m1, m2, m3) = (t, t + MINUTE, t + 2 * MINUTE, t + 3 * MINUTE);
    counted(
        events,
        log,
        &all,
        MINUTE,
        vec![(m0, 2), (m1, 2), (m2, 1), (m3, 1)],
    )
    .await;
    counted(events, log, &page, MINUTE, vec![(m0, 1), (m1, 2)]).await;
    counted(
        events,
        log,
        &in_app("api", refused.clone()),
        MINUTE,
        vec![(m0, 1), (m1, 1)],
    )
    .await;
    counted(events, log, &all, 2 * MINUTE, vec![(m0, 4), (m2, 2)]).await;
    let errors_after = EventQuery {
        event_type: Some("err".into()),
        after: Some(t),
        before: Some(m3),
        ..all.clone()
    };
    counted(events, log, &errors_after, MINUTE, vec![(m0, 1), (m1, 1)]).await;
    counted(events, exc, &text("ECONNREFUSED"), MINUTE, vec![(m1, 1)]).await;
    counted(events, exc, &all, 3_600_000, vec![(t, 3)]).await;
    let nobody = EventQuery {
        bucket_id: "nobody".into(),
        ..all.clone()
    };
    counted(events, log, &nobody, MINUTE, Vec::new()).await;

    // Deleting by filter: only the matching events go, whatever the paging.
    let api_refused = EventQuery {
        limit: 1,
        ..in_app("api", refused.clone())
    };
    assert_eq!(events.delete_matching(log, &api_refused).await.unwrap(), 2);
    settled(events, log, &all, docs_of(&[&l6, &l5, &l4, &l1])).await;
    assert_eq!(events.delete_matching(log, &api_refused).await.unwrap(), 0);
    let first_step = EventQuery {
        before: Some(m1),
        ..all.clone()
    };
    assert_eq!(events.delete_matching(log, &first_step).await.unwrap(), 1);
    settled(events, log, &all, docs_of(&[&l6, &l5, &l4])).await;
    assert_eq!(
        events.delete_matching(exc, &text("TIMEOUT")).await.unwrap(),
        1
    );
    settled(events, exc, &all, docs_of(&[&e2, &e1])).await;
    let paged = EventQuery {
        limit: 1,
        offset: 5,
        ..all.clone()
    };
    assert_eq!(events.delete_matching(log, &paged).await.unwrap(), 3);
    settled(events, log, &all, Vec::new()).await;
    let s2 = EventQuery {
        bucket_id: "s2".into(),
        ..all.clone()
    };
    settled(events, log, &s2, docs_of(&[&other_bucket])).await;
    assert_eq!(events.delete_matching(log, &nobody).await.unwrap(), 0);
}

#[tokio::test]
async fn event_search_contract_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    event_search_contract(&open_events(dir.path()).unwrap()).await;
}

#[tokio::test]
async fn event_search_contract_on_elasticsearch() {
    if !km_e2e::enabled("an Elasticsearch-API server (osmem-server)") {
        return;
    }
    let server = km_e2e::OsMem::start().unwrap();
    let urls = parse_urls(server.url()).unwrap();
    let events = ElasticEvents::connect(&urls, "kmtest").await.unwrap();
    event_search_contract(&events).await;
}

/// A span of trace `trace` in bucket s1 taking `ms`.
fn span(
    app: &str,
    trace: &str,
    at: i64,
    route: &str,
    status: u16,
    ms: i64,
    entry: bool,
) -> EventRecord {
    EventRecord {
        kind: EventKind::Span,
        event_type: if entry { "SERVER" } else { "CLIENT" }.into(),
        name: Some(trace.into()),
        doc: serde_json::json!({"at": at, "trace": trace, "route": route, "ms": ms}).to_string(),
        span: Some(Box::new(SpanFacts {
            route: route.into(),
            status,
            duration_us: ms * 1000,
            entry,
        })),
        ..event("s1", app, at, "")
    }
}

/// Asks until `expected` comes back (search engines show writes after a refresh).
async fn spans_settled(events: &dyn Events, query: &SpanQuery, expected: Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = events.slowest_spans(query).await.unwrap();
        if got == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{query:?}: expected {expected:?}, got {got:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// What every events store must do with spans: a trace found whole, entry spans listed
/// slowest first by route and status, percentiles per route.
async fn span_contract(events: &dyn Events) {
    let t = NOON;
    // 100 requests of GET /a taking 1..=100 ms, 5 of them failing; one POST /b.
    let mut batch: Vec<EventRecord> = (1..=100)
        .map(|ms| {
            let status = if ms % 20 == 0 { 500 } else { 200 };
            span("api", &format!("t{ms}"), t + ms, "GET /a", status, ms, true)
        })
        .collect();
    let post = span("api", "t1", t, "POST /b", 201, 500, true);
    let call = span("api", "t1", t + 2, "GET db", 0, 700, false);
    let other_app = span("web", "w1", t, "GET /a", 200, 900, true);
    batch.extend([post.clone(), call.clone(), other_app.clone()]);
    events.append(batch.clone().into()).await.unwrap();
    // Written again (a retry after a lost answer): counted once.
    events.append(batch.clone().into()).await.unwrap();

    let api = SpanQuery {
        bucket_id: "s1".into(),
        app_name: Some("api".into()),
        since: t - MINUTE,
        limit: 3,
        ..SpanQuery::default()
    };
    // Entry spans only (the 700 ms call is not one), slowest first.
    spans_settled(events, &api, docs_of(&[&post, &batch[99], &batch[98]])).await;
    let failed = SpanQuery {
        route: Some("GET /a".into()),
        status: Some((500, 599)),
        limit: 10,
        ..api.clone()
    };
    let failures: Vec<&EventRecord> = [100, 80, 60, 40, 20]
        .iter()
        .map(|ms| &batch[ms - 1])
        .collect();
    spans_settled(events, &failed, docs_of(&failures)).await;
    let later = SpanQuery {
        since: t + 51,
        ..failed.clone()
    };
    spans_settled(events, &later, docs_of(&failures[..3])).await;

    // A trace, whole: its entry and its call.
    let trace = EventQuery {
        bucket_id: "s1".into(),
        name: Some("t1".into()),
        limit: 10,
        ..EventQuery::default()
    };
    settled(
        events,
        EventKind::Span,
        &trace,
        docs_of(&[&call, &batch[0], &post]),
    )
    .await;

    let routes = events
        .route_latencies(&SpanQuery {
            limit: 10,
            ..api.clone()
        })
        .await
        .unwrap();
    assert_eq!(routes.len(), 2, "{routes:?}");
    let a = &routes[0];
    assert_eq!(
        (
            a.app_name.as_str(),
            a.route.as_str(),
            a.count,
            a.errors,
            a.max_us
        ),
        ("api", "GET /a", 100, 5, 100_000)
    );
    // Exact ranks here; Elasticsearch estimates (within a millisecond at this size).
    for (got, want) in [(a.p50_us, 50_000), (a.p95_us, 95_000), (a.p99_us, 99_000)] {
        assert!((got - want).abs() <= 1_000, "{routes:?}");
    }
    assert_eq!(
        (routes[1].route.as_str(), routes[1].count, routes[1].p99_us),
        ("POST /b", 1, 500_000)
    );
    let busiest = events
        .route_latencies(&SpanQuery {
            app_name: None,
            limit: 1,
            ..api
        })
        .await
        .unwrap();
    assert_eq!(busiest.len(), 1);
    assert_eq!(
        (busiest[0].app_name.as_str(), busiest[0].count),
        ("api", 100)
    );
}

#[tokio::test]
async fn span_contract_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    span_contract(&open_events(dir.path()).unwrap()).await;
}

#[tokio::test]
async fn span_contract_on_elasticsearch() {
    if !km_e2e::enabled("an Elasticsearch-API server (osmem-server)") {
        return;
    }
    let server = km_e2e::OsMem::start().unwrap();
    let urls = parse_urls(server.url()).unwrap();
    let events = ElasticEvents::connect(&urls, "kmtest").await.unwrap();
    span_contract(&events).await;
}

#[tokio::test]
async fn templates_of_a_newer_km_are_refused() {
    if !km_e2e::enabled("an Elasticsearch-API server (osmem-server)") {
        return;
    }
    let server = km_e2e::OsMem::start().unwrap();
    let urls = parse_urls(server.url()).unwrap();
    ElasticEvents::connect(&urls, "kmnewer").await.unwrap();
    let http = reqwest::Client::new();
    let template = format!("{}/_index_template/kmnewer-metrics", server.url());
    let got: serde_json::Value = http
        .get(&template)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut body = got["index_templates"][0]["index_template"].clone();
    assert_eq!(body["version"], crate::elastic::TEMPLATE_VERSION, "{got}");
    body["version"] = serde_json::json!(crate::elastic::TEMPLATE_VERSION + 1);
    let put = http.put(&template).json(&body).send().await.unwrap();
    assert!(put.status().is_success(), "{}", put.text().await.unwrap());
    let err = ElasticEvents::connect(&urls, "kmnewer")
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("installed by a newer km") && err.contains("run a newer km"),
        "{err}"
    );
}

#[tokio::test]
async fn unreachable_elasticsearch_fails_fast_naming_the_host() {
    let port = closed_port();
    let urls = parse_urls(&format!("http://elastic:hunter2@127.0.0.1:{port}")).unwrap();
    let expected = format!("cannot connect to 127.0.0.1:{port}");
    fails_fast(ElasticEvents::connect(&urls, "km"), &expected).await;
}

/// One node's agent sockets, as the bus sees them: the servers it holds and the frames
/// it was handed.
struct NodeSockets {
    servers: Vec<&'static str>,
    got: parking_lot::Mutex<Vec<String>>,
}

impl NodeSockets {
    fn holding(servers: &[&'static str]) -> Arc<Self> {
        Arc::new(NodeSockets {
            servers: servers.to_vec(),
            got: Default::default(),
        })
    }
}

impl CommandSink for NodeSockets {
    fn deliver(&self, command: &AgentCommand) -> Delivery {
        if command.bucket_id == "b1" && self.servers.contains(&command.server_name.as_str()) {
            self.got.lock().push(command.frame.clone());
            Delivery::Sent
        } else {
            Delivery::NotConnected
        }
    }

    fn online_servers(&self, bucket_id: &str, server_name: Option<&str>) -> Vec<String> {
        let servers = if bucket_id == "b1" {
            self.servers.as_slice()
        } else {
            &[]
        };
        let wanted = |s: &&&str| server_name.is_none_or(|w| w == **s);
        servers
            .iter()
            .filter(wanted)
            .map(|s| format!(r#"{{"server_name":"{s}","online":true,"last_update":1}}"#))
            .collect()
    }

    fn evict(&self, _bucket_id: &str) -> bool {
        false
    }

    fn processes(&self) -> Vec<ServerProcesses> {
        self.servers
            .iter()
            .map(|s| ServerProcesses {
                bucket_id: "b1".into(),
                server_name: (*s).into(),
                processes: 2,
            })
            .collect()
    }

    fn tally(&self) -> u64 {
        2 * self.servers.len() as u64
    }
}

fn command(server: &str, frame: &str) -> AgentCommand {
    AgentCommand {
        bucket_id: "b1".into(),
        server_name: server.into(),
        frame: frame.into(),
    }
}

/// What every bus does for the agents of its own node.
async fn bus_contract_local(bus: &dyn Bus, sockets: &NodeSockets) {
    bus.ping().await.unwrap();
    bus.claim("b1", "web-1").await.unwrap();
    assert_eq!(
        bus.send_command(command("web-1", "f1")).await.unwrap(),
        Delivery::Sent
    );
    assert_eq!(
        bus.send_command(command("nowhere", "f2")).await.unwrap(),
        Delivery::NotConnected
    );
    assert_eq!(*sockets.got.lock(), ["f1"], "delivered once");
    assert!(
        bus.remote_servers("b1", None).await.unwrap().is_empty(),
        "no other node"
    );
    assert!(bus.remote_processes().await.unwrap().is_empty());
    assert_eq!(bus.remote_tally().await.unwrap(), 0);
}

#[tokio::test]
async fn bus_contract_in_process() {
    let sockets = NodeSockets::holding(&["web-1"]);
    bus_contract_local(&LocalBus::new(sockets.clone(), Arc::default()), &sockets).await;
}

#[tokio::test]
async fn bus_contract_on_redis_across_nodes() {
    if !km_e2e::enabled("redis-server") {
        return;
    }
    let redis = km_e2e::Redis::start().unwrap();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let here_sockets = NodeSockets::holding(&["web-1", "both"]);
    let here = RedisBus::connect(
        &redis.url(),
        here_sockets.clone(),
        Arc::default(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    assert_eq!(here.kind(), "redis");
    bus_contract_local(&*here, &here_sockets).await;

    let there_sockets = NodeSockets::holding(&["web-2", "both"]);
    let there = RedisBus::connect(
        &redis.url(),
        there_sockets.clone(),
        Arc::default(),
        shutdown.clone(),
    )
    .await
    .unwrap();
    // Both nodes heartbeat before either asks the other.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        here.send_command(command("web-2", "f3")).await.unwrap(),
        Delivery::Sent
    );
    assert_eq!(
        *there_sockets.got.lock(),
        ["f3"],
        "reached the node holding web-2, once"
    );
    let mut remote = here.remote_servers("b1", None).await.unwrap();
    remote.sort();
    let web2 = here.remote_servers("b1", Some("web-2")).await.unwrap();
    assert_eq!(web2, there_sockets.online_servers("b1", Some("web-2")));
    let mut expected = there_sockets.online_servers("b1", None);
    expected.sort();
    assert_eq!(remote, expected);
    assert_eq!(
        here.remote_processes().await.unwrap(),
        there_sockets.processes(),
        "the other node's processes"
    );
    assert_eq!(
        here.remote_tally().await.unwrap(),
        there_sockets.tally(),
        "the other node's tally, from its heartbeat"
    );

    // An agent with sockets on both nodes: commands go to the node it connected to last.
    there.claim("b1", "both").await.unwrap();
    assert_eq!(
        here.send_command(command("both", "f4")).await.unwrap(),
        Delivery::Sent
    );
    here.claim("b1", "both").await.unwrap();
    assert_eq!(
        there.send_command(command("both", "f5")).await.unwrap(),
        Delivery::Sent
    );
    assert_eq!(*there_sockets.got.lock(), ["f3", "f4"]);
    assert_eq!(*here_sockets.got.lock(), ["f1", "f5"]);
    shutdown.cancel();
}

#[tokio::test]
async fn unreachable_redis_fails_fast_naming_the_host() {
    let url = format!("redis://:hunter2@127.0.0.1:{}/", closed_port());
    let connect = RedisBus::connect(
        &url,
        NodeSockets::holding(&[]),
        Arc::default(),
        Default::default(),
    );
    fails_fast(connect, "cannot connect to 127.0.0.1:").await;
}
