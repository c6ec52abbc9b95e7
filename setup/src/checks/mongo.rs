//! `KM_MONGO_URL`: ping, version, a scratch write, read and delete.

use super::*;
use bson::doc;
use km_stores::mongo as store;

/// Connects to `KM_MONGO_URL`, pings, checks the version the driver needs, and writes,
/// reads and deletes a record in the scratch collection `km_setup_check`.
pub async fn check_mongo(url: &str) -> Check {
    bounded(MONGO, "MongoDB", mongo_steps(url))
        .await
        .redacted(url_password(url))
}

async fn mongo_steps(url: &str) -> Step<Check> {
    let (db, hosts) = store::open(url, TIMEOUT)
        .await
        .map_err(|e| Check::failed(MONGO, e.to_string()))?;
    let unreachable = reach_any(MONGO, &hosts).await?;
    let failure = |doing: &str, e: mongodb::error::Error| {
        mongo_failure(&hosts, doing, &e, url_userinfo(url).is_some())
    };
    db.run_command(doc! {"ping": 1})
        .await
        .map_err(|e| failure("answer a ping", e))?;
    let info = db
        .run_command(doc! {"buildInfo": 1})
        .await
        .map_err(|e| failure("tell its version", e))?;
    let version = info.get_str("version").unwrap_or("unknown");
    store::supported_version(version).map_err(|e| Check::failed(MONGO, format!("{hosts} {e}")))?;
    let name = db.name().to_string();
    let scratch = db.collection::<bson::Document>(SCRATCH);
    let id = nonce();
    scratch
        .insert_one(doc! {"_id": &id, "at": bson::DateTime::now()})
        .await
        .map_err(|e| failure(&format!("write to {name}.{SCRATCH}"), e))?;
    let found = scratch
        .find_one(doc! {"_id": &id})
        .await
        .map_err(|e| failure(&format!("read {name}.{SCRATCH}"), e))?;
    scratch
        .delete_one(doc! {"_id": &id})
        .await
        .map_err(|e| failure(&format!("delete from {name}.{SCRATCH}"), e))?;
    if found.is_none() {
        return Err(Check::failed(
            MONGO,
            format!("{hosts} accepted a write to {name}.{SCRATCH} but did not return it"),
        ));
    }
    let detail =
        format!("MongoDB {version} at {hosts}, database {name}: write, read and delete work");
    Ok(ok_unless_unreachable(MONGO, detail, &unreachable))
}

/// A driver error as a failed check: wrong credentials, missing rights and an unusable
/// server each get their own words.
fn mongo_failure(hosts: &str, doing: &str, e: &mongodb::error::Error, with_user: bool) -> Check {
    use mongodb::error::ErrorKind;
    const AUTHENTICATION_FAILED: i32 = 18;
    const UNAUTHORIZED: i32 = 13;
    let detail = match e.kind.as_ref() {
        ErrorKind::Authentication { message, .. } => {
            format!("{hosts} refused the user name or password: {message}")
        }
        ErrorKind::Command(c) if c.code == AUTHENTICATION_FAILED => {
            format!("{hosts} refused the user name or password: {}", c.message)
        }
        ErrorKind::Command(c) if c.code == UNAUTHORIZED && !with_user => format!(
            "{hosts} requires a user name and password to {doing}: put them in the URL (mongodb://USER:PASSWORD@host:port/km)"
        ),
        ErrorKind::Command(c) if c.code == UNAUTHORIZED => format!(
            "the user may not {doing}: {} (it needs the readWrite role on that database)",
            c.message
        ),
        ErrorKind::ServerSelection { message, .. } => format!(
            "no usable MongoDB server at {hosts} within {} s: {message}",
            TIMEOUT.as_secs()
        ),
        kind => format!("{hosts} did not {doing}: {kind}"),
    };
    Check::failed(MONGO, detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testkit::*;

    #[tokio::test]
    async fn mongo_good_url_passes_and_leaves_nothing_behind() {
        if !km_e2e::enabled("a MongoDB-wire server (secantusd-py)") {
            return;
        }
        let server = km_e2e::SecantusDb::start().unwrap();
        let url = server.url("km_check");
        let check = check_mongo(&url).await;
        assert_status(&check, Status::Ok, "write, read and delete work");
        assert!(check.detail.contains("database km_check"), "{check}");
        assert_eq!(check.setting, "KM_MONGO_URL");
        let client = mongodb::Client::with_uri_str(&url).await.unwrap();
        let left = client
            .database("km_check")
            .collection::<bson::Document>(SCRATCH)
            .count_documents(doc! {})
            .await
            .unwrap();
        assert_eq!(left, 0);
    }

    #[tokio::test]
    async fn mongo_closed_port_is_connection_refused() {
        let port = closed_port();
        let check = check_mongo(&format!("mongodb://km:hunter2@127.0.0.1:{port}/km")).await;
        assert_status(
            &check,
            Status::Failed,
            &format!("cannot connect to 127.0.0.1:{port}: connection refused"),
        );
        assert!(!check.to_string().contains("hunter2"), "{check}");
    }

    #[tokio::test]
    async fn mongo_silent_server_times_out() {
        // Connections are accepted (the kernel's backlog) but nothing ever answers.
        let silent = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = silent.local_addr().unwrap().port();
        let started = Instant::now();
        let check = check_mongo(&format!("mongodb://127.0.0.1:{port}/km")).await;
        assert_status(&check, Status::Failed, "no usable MongoDB server");
        assert!(check.detail.contains("within 5 s"), "{check}");
        assert!(started.elapsed() < LIMIT, "took {:?}", started.elapsed());
    }

    /// SecantusDB with `--auth` and a user `km` / `right-pw` who may read and write the
    /// database `km_auth` only (users are created before auth is switched on).
    async fn secantus_with_user() -> (Process, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let secantus = |port: u16, auth: bool| {
            let mut command = Command::new("secantusd-py");
            command
                .args(["--host", "127.0.0.1", "--port", &port.to_string()])
                .arg("--storage-path")
                .arg(dir.path());
            if auth {
                command.arg("--auth");
            }
            Process::start(&mut command, port)
        };
        let open = secantus(closed_port(), false);
        let client = mongodb::Client::with_uri_str(format!("mongodb://127.0.0.1:{}/", open.port))
            .await
            .unwrap();
        client
            .database("km_auth")
            .run_command(doc! {
                "createUser": "km", "pwd": "right-pw",
                "roles": [{"role": "readWrite", "db": "km_auth"}],
            })
            .await
            .unwrap();
        drop(client);
        // A killed SecantusDB loses what it did not checkpoint: the user, here.
        open.stop();
        let guarded = secantus(closed_port(), true);
        (guarded, dir)
    }

    #[tokio::test]
    async fn mongo_credentials_and_rights_are_told_apart() {
        if !km_e2e::enabled("a MongoDB-wire server (secantusd-py)") {
            return;
        }
        let (server, _dir) = secantus_with_user().await;
        let url = |user: &str, db: &str| {
            format!(
                "mongodb://{user}127.0.0.1:{}/{db}?authSource=km_auth",
                server.port
            )
        };
        let good = check_mongo(&url("km:right-pw@", "km_auth")).await;
        assert_status(&good, Status::Ok, "write, read and delete work");

        let wrong = check_mongo(&url("km:wrong-pw@", "km_auth")).await;
        assert_status(&wrong, Status::Failed, "refused the user name or password");
        assert!(!wrong.to_string().contains("wrong-pw"), "{wrong}");

        let anonymous = check_mongo(&format!("mongodb://127.0.0.1:{}/km_auth", server.port)).await;
        assert_status(
            &anonymous,
            Status::Failed,
            "requires a user name and password",
        );

        let elsewhere = check_mongo(&url("km:right-pw@", "other")).await;
        assert_status(
            &elsewhere,
            Status::Failed,
            "the user may not write to other.km_setup_check",
        );
    }

    #[tokio::test]
    async fn mongo_version_rule_follows_the_driver() {
        assert!(store::supported_version("4.4.0").is_ok());
        assert!(store::supported_version("8.2.11").is_ok());
        let old = store::supported_version("4.2.24").unwrap_err();
        assert!(old.contains("4.4 or newer"), "{old}");
    }
}
