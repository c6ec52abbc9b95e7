//! Contract tests: one suite per store interface, run against every implementation
//! (the embedded one and the scale-out one on a real server started here).

use std::net::TcpListener;
use std::time::{Duration, Instant};

use super::mongo::MongoDocuments;
use super::sqlite::open_documents;
use super::{Bucket, Documents, MemberRole, ServerRecord, StoreError, TokenRecord, User};
use crate::ids::new_object_id;

fn user(name: &str) -> User {
    User {
        id: new_object_id(),
        username: name.into(),
        email: format!("{name}@example.com"),
        password_hash: "h".into(),
        role: "user".into(),
        created_at: 1,
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
        internal_ip: Some("10.0.0.1".into()),
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
async fn unreachable_mongodb_fails_fast_naming_the_variable() {
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let err = MongoDocuments::connect(&format!("mongodb://user:hunter2@127.0.0.1:{port}/km"))
        .await
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        err.starts_with("KM_MONGO_URL: cannot connect to 127.0.0.1:"),
        "{err}"
    );
    assert!(!err.contains("hunter2"), "credentials leaked: {err}");
}
