//! km on the scale-out stores: a configuration that cannot work stops km at once with a
//! message naming the variable.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use km_e2e::{free_port, km_bin};

#[test]
fn unreachable_mongodb_stops_km_naming_the_variable() {
    let closed = free_port().unwrap();
    let data = tempfile::tempdir().unwrap();
    let started = Instant::now();
    let mut child = Command::new(km_bin())
        .args([
            "serve",
            "--listen",
            &format!("127.0.0.1:{}", free_port().unwrap()),
            "--data-dir",
        ])
        .arg(data.path())
        .env(
            "KM_MONGO_URL",
            format!("mongodb://km:s3cret-pw@127.0.0.1:{closed}/km"),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > Duration::from_secs(10) {
            let _ = child.kill();
            panic!("km still running 10 s after start with an unreachable KM_MONGO_URL");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let stderr = std::io::read_to_string(child.stderr.take().unwrap()).unwrap();
    assert!(!status.success(), "km exited successfully: {stderr}");
    assert!(
        stderr.contains("KM_MONGO_URL: cannot connect to 127.0.0.1:"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("s3cret-pw"),
        "the password was printed: {stderr}"
    );
}
