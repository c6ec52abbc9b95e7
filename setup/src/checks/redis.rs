//! `KM_REDIS_URL`: AUTH, version, a scratch key set, read and deleted.

use super::*;
use km_stores::redis_bus;

/// Connects to `KM_REDIS_URL` (`redis://` or `rediss://`), authenticating if the URL
/// holds a password, checks the version (6 or newer), then sets, reads and deletes a
/// scratch key that expires on its own.
pub async fn check_redis(url: &str) -> Check {
    bounded(REDIS, "Redis", redis_steps(url))
        .await
        .redacted(url_password(url))
}

async fn redis_steps(url: &str) -> Step<Check> {
    let (client, host) = redis_bus::open(url).map_err(|e| Check::failed(REDIS, e.to_string()))?;
    if let ::redis::ConnectionAddr::Tcp(name, port)
    | ::redis::ConnectionAddr::TcpTls {
        host: name, port, ..
    } = client.get_connection_info().addr()
    {
        reach(name, *port)
            .await
            .map_err(|why| Check::failed(REDIS, why))?;
    }
    let with_password = url_password(url).is_some();
    let failure =
        |doing: &str, e: ::redis::RedisError| redis_failure(&host, doing, &e, with_password);
    let config = ::redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(TIMEOUT))
        .set_response_timeout(Some(TIMEOUT));
    let mut conn = client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|e| failure("accept a connection", e))?;
    let _: String = ::redis::cmd("PING")
        .query_async(&mut conn)
        .await
        .map_err(|e| failure("answer PING", e))?;
    let info: String = ::redis::cmd("INFO")
        .arg("server")
        .query_async(&mut conn)
        .await
        .map_err(|e| failure("tell its version (INFO server)", e))?;
    let version = redis_version(&info).unwrap_or("unknown");
    let major = version
        .split('.')
        .next()
        .and_then(|m| m.parse::<u32>().ok());
    if major.is_none_or(|m| m < REDIS_MIN_MAJOR) {
        return Err(Check::failed(
            REDIS,
            format!("{host} runs Redis {version}; {REDIS_MIN_MAJOR}.0 or newer is needed"),
        ));
    }
    scratch_key(&mut conn, &host, with_password).await?;
    Ok(Check::ok(
        REDIS,
        format!("Redis {version} at {host}: set, get and delete work"),
    ))
}

/// `redis_version:7.0.15` in the answer to `INFO server`.
fn redis_version(info: &str) -> Option<&str> {
    info.lines()
        .find_map(|line| line.strip_prefix("redis_version:"))
        .map(str::trim)
}

/// Sets a key that expires in a minute (left behind if the check dies), reads it back
/// and deletes it.
async fn scratch_key(
    conn: &mut ::redis::aio::MultiplexedConnection,
    host: &str,
    with_password: bool,
) -> Step<()> {
    let failure =
        |doing: &str, e: ::redis::RedisError| redis_failure(host, doing, &e, with_password);
    let (key, value) = (format!("{SCRATCH}:{}", nonce()), nonce());
    let _: () = ::redis::cmd("SET")
        .arg(&key)
        .arg(&value)
        .arg("EX")
        .arg(60)
        .query_async(conn)
        .await
        .map_err(|e| failure("SET a scratch key", e))?;
    let read: Option<String> = ::redis::cmd("GET")
        .arg(&key)
        .query_async(conn)
        .await
        .map_err(|e| failure("GET a scratch key", e))?;
    let _: i64 = ::redis::cmd("DEL")
        .arg(&key)
        .query_async(conn)
        .await
        .map_err(|e| failure("DEL a scratch key", e))?;
    if read.as_deref() != Some(value.as_str()) {
        return Err(Check::failed(
            REDIS,
            format!("{host} did not return the scratch key just set (a read-only replica?)"),
        ));
    }
    Ok(())
}

/// A Redis error as a failed check: a refused or missing password gets its own words.
fn redis_failure(host: &str, doing: &str, e: &::redis::RedisError, with_password: bool) -> Check {
    let refused =
        e.kind() == ::redis::ErrorKind::AuthenticationFailed || e.code() == Some("WRONGPASS");
    let name = host.rsplit_once(':').map_or(host, |(name, _)| name);
    let tls_problem = rustls_error(e).map(|tls| {
        certificate_problem(host, name, tls)
            .unwrap_or_else(|| format!("TLS with {host} failed: {tls}"))
    });
    let detail = if let Some(problem) = tls_problem {
        problem
    } else if refused {
        format!("{host} refused the password (AUTH failed): check the password in the URL")
    } else if e.code() == Some("NOAUTH") && !with_password {
        format!(
            "{host} requires a password: put it in the URL (redis://:PASSWORD@host:port, or redis://USER:PASSWORD@ with an ACL user)"
        )
    } else if e.code() == Some("NOPERM") {
        format!("the user may not {doing} on {host}: {e}")
    } else if e.is_timeout() {
        format!("{host} did not {doing} within {} s", TIMEOUT.as_secs())
    } else {
        format!("{host} did not {doing}: {e}")
    };
    Check::failed(REDIS, detail)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checks::testkit::*;

    #[tokio::test]
    async fn redis_good_url_passes() {
        if !km_e2e::enabled("redis-server") {
            return;
        }
        let server = km_e2e::Redis::start().unwrap();
        let check = check_redis(&server.url()).await;
        assert_status(&check, Status::Ok, "set, get and delete work");
        assert!(
            check.detail.starts_with("Redis 7") || check.detail.starts_with("Redis 8"),
            "{check}"
        );
    }

    #[tokio::test]
    async fn redis_closed_port_is_connection_refused() {
        let port = closed_port();
        let check = check_redis(&format!("redis://:hunter2@127.0.0.1:{port}/")).await;
        assert_status(
            &check,
            Status::Failed,
            &format!("cannot connect to 127.0.0.1:{port}: connection refused"),
        );
        assert!(!check.to_string().contains("hunter2"), "{check}");
    }

    #[tokio::test]
    async fn redis_password_refused_or_missing() {
        if !km_e2e::enabled("redis-server") {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = closed_port();
        let server = Process::start(
            Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--requirepass",
                    "right-pw",
                ])
                .arg("--dir")
                .arg(dir.path()),
            port,
        );
        let url = |auth: &str| format!("redis://{auth}127.0.0.1:{}/", server.port);
        let wrong = check_redis(&url(":wrong-pw@")).await;
        assert_status(&wrong, Status::Failed, "refused the password");
        assert!(!wrong.to_string().contains("wrong-pw"), "{wrong}");
        let missing = check_redis(&url("")).await;
        assert_status(&missing, Status::Failed, "requires a password");
        let good = check_redis(&url(":right-pw@")).await;
        assert_status(&good, Status::Ok, "set, get and delete work");
    }

    #[tokio::test]
    async fn redis_over_tls_refuses_an_untrusted_certificate() {
        if !km_e2e::enabled("redis-server") {
            return;
        }
        crypto();
        let dir = tempfile::tempdir().unwrap();
        let pki = private_pki();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, &pki.cert_pem).unwrap();
        std::fs::write(&key, &pki.key_pem).unwrap();
        let port = closed_port();
        let server = Process::start(
            Command::new("redis-server")
                .args([
                    "--port",
                    "0",
                    "--tls-port",
                    &port.to_string(),
                    "--bind",
                    "127.0.0.1",
                ])
                .args([
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--tls-auth-clients",
                    "no",
                ])
                .arg("--tls-cert-file")
                .arg(&cert)
                .arg("--tls-key-file")
                .arg(&key)
                .arg("--tls-ca-cert-file")
                .arg(&cert)
                .arg("--dir")
                .arg(dir.path()),
            port,
        );
        let untrusted = check_redis(&format!("rediss://127.0.0.1:{}/", server.port)).await;
        assert_status(
            &untrusted,
            Status::Failed,
            "not signed by an authority this appliance trusts",
        );
    }
}
