//! Every check against a real server started here on a free loopback port:
//! SecantusDB (MongoDB wire, with SCRAM users), osmem-server (OpenSearch API, which
//! has no authentication to test), redis-server, aiosmtpd (tests/support/smtp_server.py)
//! and a small axum server for the site URL probe.

pub(super) use std::net::TcpListener;
pub(super) use std::path::{Path, PathBuf};
pub(super) use std::process::{Child, Command, Stdio};
pub(super) use std::time::Instant;

use super::*;

pub(super) fn crypto() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A loopback port nothing listens on.
pub(super) fn closed_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A server process started here; killed (and reaped) on drop.
pub(super) struct Process {
    pub(super) child: Child,
    pub(super) port: u16,
}

impl Process {
    /// Starts `command` and waits until `port` accepts connections.
    pub(super) fn start(command: &mut Command, port: u16) -> Process {
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {command:?}: {e}"));
        let mut process = Process { child, port };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = process.child.try_wait().unwrap() {
                panic!("{command:?} exited at start ({status})");
            }
            assert!(
                Instant::now() < deadline,
                "{command:?} did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        process
    }
}

impl Process {
    /// Stops it cleanly (SIGTERM), so that it saves what it holds.
    pub(super) fn stop(mut self) {
        // SAFETY: signals our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub(super) fn assert_status(check: &Check, status: Status, needle: &str) {
    eprintln!("{:?} {check}", check.status);
    assert_eq!(check.status, status, "{check}");
    assert!(
        check.detail.contains(needle),
        "{needle:?} missing from: {check}"
    );
}

pub(super) struct Pki {
    pub(super) ca_pem: String,
    pub(super) cert_pem: String,
    pub(super) key_pem: String,
}

pub(super) fn private_pki() -> Pki {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "KM test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    Pki {
        ca_pem: ca.pem(),
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    }
}
