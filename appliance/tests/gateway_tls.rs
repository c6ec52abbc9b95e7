//! The gateway's TLS with the real `km` binary: a certificate from a real ACME CA
//! (Pebble, HTTP-01 validated against km's plain port), PEM files reloaded on SIGHUP
//! without dropping an open connection, the plain port's redirects, and start-up errors
//! naming the variable. HTTPS is checked with rustls trusting only the expected root.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use km_e2e::{
    Api, Km, Pebble, Pm2, TestCa, e2e, find_process, free_port, km_start_failure, unique,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, ClientConnection, RootCertStore, StreamOwned};
use serde_json::Value;

/// A leaf for `names` from `ca`: (certificate PEM, key PEM, certificate DER).
fn leaf(ca: &TestCa, names: &[&str]) -> (String, String, Vec<u8>) {
    let (cert, key) = ca.leaf(names).unwrap();
    let der = CertificateDer::from_pem_slice(cert.as_bytes())
        .unwrap()
        .to_vec();
    (cert, key, der)
}

/// A rustls client trusting only the certificates of `roots_pem`.
fn client(roots_pem: &str) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(roots_pem.as_bytes()) {
        roots.add(cert.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    Arc::new(
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

/// One HTTPS connection (HTTP/1.1, kept alive), verified at the handshake.
struct Https(StreamOwned<ClientConnection, TcpStream>);

impl Https {
    fn connect(port: u16, name: &str, config: &Arc<ClientConfig>) -> Result<Https> {
        let name = ServerName::try_from(name.to_string())?;
        let mut tcp = TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(Duration::from_secs(10)))?;
        let mut tls = ClientConnection::new(config.clone(), name)?;
        while tls.is_handshaking() {
            tls.complete_io(&mut tcp).context("TLS handshake")?;
        }
        Ok(Https(StreamOwned::new(tls, tcp)))
    }

    /// The DER of the certificate the server presented.
    fn leaf(&self) -> Vec<u8> {
        self.0
            .conn
            .peer_certificates()
            .and_then(|chain| chain.first())
            .map(|c| c.to_vec())
            .unwrap_or_default()
    }

    /// `GET path`: (status, body); the body must have a Content-Length.
    fn get(&mut self, path: &str) -> Result<(u16, String)> {
        write!(self.0, "GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")?;
        self.0.flush()?;
        let mut head = Vec::new();
        let mut byte = [0u8];
        while !head.ends_with(b"\r\n\r\n") {
            self.0
                .read_exact(&mut byte)
                .context("reading the response")?;
            head.push(byte[0]);
        }
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("no status")?;
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok())
            .context("no content-length")?;
        let mut body = vec![0; length];
        self.0.read_exact(&mut body)?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// `GET /healthz` on km's plain port (it is never redirected).
async fn health(km: &Km) -> Result<Value> {
    let response = reqwest::get(format!("{}/healthz", km.url())).await?;
    ensure!(
        response.status() == 200,
        "healthz: HTTP {}",
        response.status()
    );
    Ok(response.json().await?)
}

/// Polls `/healthz` until its `tls` section satisfies `pred`.
async fn wait_tls(
    km: &Km,
    what: &str,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Result<Value> {
    let deadline = Instant::now() + timeout;
    loop {
        let tls = health(km).await?["tls"].clone();
        if pred(&tls) {
            return Ok(tls);
        }
        ensure!(
            Instant::now() < deadline,
            "{what} within {timeout:?}; tls: {tls}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn no_redirects() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap()
}

fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn write(dir: &Path, name: &str, contents: &str) -> PathBuf {
    let path = dir.join(name);
    // Replaced whole, as a deployment tool would.
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// KM_TLS=acme against Pebble: the certificate served on the HTTPS port chains to
/// Pebble's root, the plain port redirects, and a restart reuses the saved certificate.
#[tokio::test]
async fn acme_certificate_from_pebble_is_served_and_survives_restart() {
    e2e(async {
        let (km_port, https_port) = (free_port()?, free_port()?);
        let pebble = Pebble::start(km_port, false)?;
        let ca = pebble.https_ca_path();
        let started = Instant::now();
        let mut km = Km::start_on(
            km_port,
            env(&[
                ("KM_TLS", "acme"),
                ("KM_HTTPS_LISTEN", &format!("127.0.0.1:{https_port}")),
                ("KM_SITE_URL", &format!("https://localhost:{https_port}")),
                ("KM_ACME_DIRECTORY", &pebble.directory()),
                ("KM_ACME_CA", ca.to_str().unwrap()),
                ("KM_ACME_EMAIL", "ops@example.com"),
            ]),
        )
        .await?;
        let tls = wait_tls(
            &km,
            "a certificate from Pebble",
            Duration::from_secs(30),
            |t| t["certificate"] == "acme",
        )
        .await?;
        eprintln!(
            "certificate from Pebble {:?} after km started",
            started.elapsed()
        );
        ensure!(
            tls["mode"] == "acme" && tls["last_error"].is_null(),
            "{tls}"
        );
        ensure!(tls["days_left"].as_i64().is_some_and(|d| d > 30), "{tls}");

        // Trusting Pebble's root only: the handshake proves the chain.
        let pebble_root = client(&pebble.root_pem().await?);
        let mut https = Https::connect(https_port, "localhost", &pebble_root)?;
        let (status, body) = https.get("/healthz")?;
        ensure!(status == 200, "GET /healthz over HTTPS: {status} {body}");
        let issued = https.leaf();

        let plain = no_redirects()
            .get(format!("{}/api/bucket?limit=2", km.url()))
            .send()
            .await?;
        ensure!(plain.status() == 308, "plain HTTP: {}", plain.status());
        let location = plain.headers()["location"].to_str()?.to_string();
        ensure!(
            location == format!("https://localhost:{https_port}/api/bucket?limit=2"),
            "{location}"
        );

        let tls_dir = km.data_dir().join("tls");
        for key in ["key.pem", "account.json"] {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(tls_dir.join(key))?.permissions().mode() & 0o777;
            ensure!(mode == 0o600, "{key} has mode {mode:o}");
        }

        km.restart().await?;
        let tls = health(&km).await?["tls"].clone();
        ensure!(tls["certificate"] == "acme", "after restart: {tls}");
        let again = Https::connect(https_port, "localhost", &pebble_root)?.leaf();
        ensure!(again == issued, "a restart ordered a new certificate");
        ensure!(km.log().contains("serving the saved ACME certificate"));
        // Real HTTP-01: Pebble fetched the answer from km's plain port.
        let log = pebble.log();
        let fetched =
            format!("validate w/ HTTP: http://localhost:{km_port}/.well-known/acme-challenge/");
        ensure!(
            log.contains(&fetched) && log.contains("set VALID by completed challenge"),
            "{log}"
        );
        Ok(())
    })
    .await
}

/// An ACME CA that cannot be reached: HTTPS answers with a self-signed certificate and
/// `/healthz` says why there is no real one.
#[tokio::test]
async fn unreachable_acme_ca_leaves_a_self_signed_certificate_and_the_reason() {
    e2e(async {
        let https_port = free_port()?;
        let directory = format!("https://127.0.0.1:{}/dir", free_port()?);
        let km = Km::start_with(env(&[
            ("KM_TLS", "acme"),
            ("KM_HTTPS_LISTEN", &format!("127.0.0.1:{https_port}")),
            ("KM_SITE_URL", &format!("https://localhost:{https_port}")),
            ("KM_ACME_DIRECTORY", &directory),
        ]))
        .await?;
        let tls = wait_tls(&km, "the failure reported", Duration::from_secs(20), |t| {
            !t["last_error"].is_null()
        })
        .await?;
        ensure!(tls["certificate"] == "self-signed", "{tls}");
        let error = tls["last_error"].as_str().unwrap_or_default();
        ensure!(
            error.contains("KM_ACME_DIRECTORY") && error.contains(&directory),
            "{error}"
        );
        let unrelated = client(TestCa::new("someone else").unwrap().pem());
        let refused = Https::connect(https_port, "localhost", &unrelated).err();
        let refused = format!("{refused:?}");
        ensure!(refused.contains("UnknownIssuer"), "{refused}");
        ensure!(km.log().contains("temporary self-signed certificate"));
        Ok(())
    })
    .await
}

/// KM_TLS=files: served on the HTTPS port; a new pair applies on SIGHUP to new
/// connections while an open one carries on; a broken pair is refused and reported;
/// the plain port redirects all but `/healthz` and ACME challenges.
#[tokio::test]
async fn files_are_served_reloaded_without_dropping_connections_and_redirected_to() {
    e2e(async {
        let ca = TestCa::new("km files test CA").unwrap();
        let dir = tempfile::tempdir()?;
        let (cert_pem, key_pem, first) = leaf(&ca, &["localhost"]);
        let cert = write(dir.path(), "cert.pem", &cert_pem);
        let key = write(dir.path(), "key.pem", &key_pem);
        let https_port = free_port()?;
        let km = Km::start_with(env(&[
            ("KM_TLS", "files"),
            ("KM_TLS_CERT", cert.to_str().unwrap()),
            ("KM_TLS_KEY", key.to_str().unwrap()),
            ("KM_HTTPS_LISTEN", &format!("127.0.0.1:{https_port}")),
            ("KM_SITE_URL", &format!("https://localhost:{https_port}")),
        ]))
        .await?;
        let trust = client(ca.pem());
        let mut open = Https::connect(https_port, "localhost", &trust)?;
        ensure!(open.leaf() == first, "not the KM_TLS_CERT certificate");
        let (status, body) = open.get("/healthz")?;
        ensure!(status == 200, "{status} {body}");
        let tls: Value = serde_json::from_str(&body)?;
        ensure!(
            tls["tls"]["mode"] == "files" && tls["tls"]["certificate"] == "files",
            "{body}"
        );

        let http = no_redirects();
        let https_url = format!("https://localhost:{https_port}");
        for (method, path) in [
            ("GET", "/"),
            ("GET", "/api/bucket?limit=1"),
            ("POST", "/api/oauth/token"),
        ] {
            let r = http
                .request(method.parse()?, format!("{}{path}", km.url()))
                .send()
                .await?;
            ensure!(r.status() == 308, "{method} {path}: {}", r.status());
            ensure!(
                r.headers()["location"].to_str()? == format!("{https_url}{path}"),
                "{method} {path}"
            );
        }
        let r = http
            .get(format!("{}/.well-known/acme-challenge/nope", km.url()))
            .send()
            .await?;
        ensure!(
            r.status() == 404,
            "challenge path redirected: {}",
            r.status()
        );

        let (cert_pem, key_pem, second) = leaf(&ca, &["localhost"]);
        write(dir.path(), "key.pem", &key_pem);
        write(dir.path(), "cert.pem", &cert_pem);
        km.signal(libc::SIGHUP)?;
        let deadline = Instant::now() + Duration::from_secs(5);
        while Https::connect(https_port, "localhost", &trust)?.leaf() != second {
            ensure!(
                Instant::now() < deadline,
                "new certificate not served 5 s after SIGHUP"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let (status, _) = open.get("/healthz")?;
        ensure!(
            status == 200,
            "the connection opened before the reload: {status}"
        );

        write(dir.path(), "key.pem", "not a key");
        km.signal(libc::SIGHUP)?;
        let tls = wait_tls(
            &km,
            "the broken key reported",
            Duration::from_secs(5),
            |t| !t["last_error"].is_null(),
        )
        .await?;
        ensure!(
            tls["last_error"]
                .as_str()
                .unwrap_or_default()
                .contains("KM_TLS_KEY"),
            "{tls}"
        );
        let still = Https::connect(https_port, "localhost", &trust)?.leaf();
        ensure!(still == second, "a broken pair replaced the certificate");
        Ok(())
    })
    .await
}

/// A real pm2 agent pointed at `https://` (`KEYMETRICS_NODE`): `verifyPM2` and the
/// agent's websocket go through TLS termination, and the API answers over HTTPS.
#[tokio::test]
async fn pm2_agent_links_and_reports_over_https() {
    e2e(async {
        let ca = TestCa::new("km agent test CA").unwrap();
        let dir = tempfile::tempdir()?;
        let (cert_pem, key_pem, _) = leaf(&ca, &["localhost"]);
        let cert = write(dir.path(), "cert.pem", &cert_pem);
        let key = write(dir.path(), "key.pem", &key_pem);
        let ca_file = write(dir.path(), "ca.pem", ca.pem());
        let https_port = free_port()?;
        let site = format!("https://localhost:{https_port}");
        let km = Km::start_with(env(&[
            ("KM_TLS", "files"),
            ("KM_TLS_CERT", cert.to_str().unwrap()),
            ("KM_TLS_KEY", key.to_str().unwrap()),
            ("KM_HTTPS_LISTEN", &format!("127.0.0.1:{https_port}")),
            ("KM_SITE_URL", &site),
        ]))
        .await?;
        let http = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.pem().as_bytes())?)
            .tls_built_in_root_certs(false)
            .timeout(Duration::from_secs(15))
            .build()?;
        let user = Api::with_http(&site, http).register_random().await?;
        let bucket = user.api.create_bucket(&unique("bucket-")).await?;
        let pm2 = Pm2::with_env(
            &site,
            env(&[("NODE_EXTRA_CA_CERTS", ca_file.to_str().unwrap())]),
        )?;
        pm2.start_app("ticker", "setInterval(() => {}, 1000);")
            .await?;
        let (code, out) = pm2
            .link(&bucket.secret_id, &bucket.public_id, "tls-host")
            .await?;
        ensure!(code == 0, "pm2 link exited {code}: {out}");
        user.api
            .wait_server(
                &bucket.id,
                "tls-host",
                "the agent online over HTTPS with its app",
                Duration::from_secs(30),
                |s| (s["online"] == true && find_process(s, "ticker").is_some()).then_some(()),
            )
            .await?;
        drop(pm2);
        drop(km);
        Ok(())
    })
    .await
}

/// The setup wizard's dry run against Pebble: passes when the challenge answers are
/// served on the port Pebble validates, fails with the CA's reason when they are not.
#[tokio::test]
async fn acme_dry_run_validates_the_name_without_issuing() {
    if !km_e2e::enabled("Pebble (an ACME CA)") {
        return;
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let pebble = Pebble::start(listener.local_addr().unwrap().port(), false).unwrap();
    let ca = pebble.https_ca_path();
    let served = km_tls::Challenges::default();
    tokio::spawn(axum::serve(listener, served.routes()).into_future());

    let started = Instant::now();
    let dry_run = |challenges| {
        let (directory, ca) = (pebble.directory(), ca.clone());
        async move {
            km_tls::acme_dry_run(
                &directory,
                Some(&ca),
                Some("ops@example.com"),
                "localhost",
                &challenges,
            )
            .await
        }
    };
    dry_run(served.clone()).await.unwrap();
    eprintln!("dry run passed in {:?}", started.elapsed());
    assert!(
        !pebble.log().contains("Issued certificate"),
        "the dry run finalized an order"
    );

    // Answers published where the CA does not look: the CA's reason comes back.
    let err = dry_run(km_tls::Challenges::default()).await.unwrap_err();
    assert!(
        err.contains("could not validate http://localhost/.well-known/acme-challenge/"),
        "{err}"
    );
    assert!(err.contains("404"), "the CA's reason is missing: {err}");

    let err = km_tls::acme_dry_run(&pebble.directory(), None, None, "localhost", &served)
        .await
        .unwrap_err();
    assert!(
        err.contains("KM_ACME_DIRECTORY") && err.contains("certificate"),
        "{err}"
    );
}

/// Runs `km serve` with `env` and returns its stderr once it has exited (it must).
fn km_fails_with(env: &[(&str, &str)]) -> String {
    let (status, stderr) = km_start_failure(env).unwrap();
    assert!(!status.success(), "km started: {stderr}");
    stderr
}

#[test]
fn unusable_tls_files_stop_km_naming_the_variable() {
    let ca = TestCa::new("km start test CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (cert, _, _) = leaf(&ca, &["localhost"]);
    let (_, other_key, _) = leaf(&ca, &["localhost"]);
    let cert = write(dir.path(), "cert.pem", &cert);
    let other_key = write(dir.path(), "key.pem", &other_key);
    let missing = dir.path().join("missing.pem");
    let (cert, other_key, missing) = (
        cert.to_str().unwrap(),
        other_key.to_str().unwrap(),
        missing.to_str().unwrap(),
    );

    let stderr = km_fails_with(&[
        ("KM_TLS", "files"),
        ("KM_TLS_CERT", cert),
        ("KM_TLS_KEY", other_key),
    ]);
    assert!(
        stderr.contains("KM_TLS_CERT and KM_TLS_KEY") && stderr.contains("does not go with"),
        "{stderr}"
    );
    let stderr = km_fails_with(&[
        ("KM_TLS", "files"),
        ("KM_TLS_CERT", missing),
        ("KM_TLS_KEY", other_key),
    ]);
    assert!(stderr.contains("KM_TLS_CERT: cannot read"), "{stderr}");
    let stderr = km_fails_with(&[
        ("KM_TLS", "files"),
        ("KM_TLS_CERT", cert),
        ("KM_TLS_KEY", cert),
    ]);
    assert!(stderr.contains("KM_TLS_KEY:"), "{stderr}");
    let stderr = km_fails_with(&[
        ("KM_TLS", "acme"),
        ("KM_SITE_URL", "https://localhost"),
        ("KM_ACME_CA", missing),
    ]);
    assert!(
        stderr.contains("KM_ACME_CA: no PEM certificate"),
        "{stderr}"
    );
}
