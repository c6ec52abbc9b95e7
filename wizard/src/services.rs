//! Restarting the appliance's services after the env file changed, and waiting until
//! they answer healthy. Under systemd the units restart in the order given (the order
//! their dependencies need); outside systemd (development, tests) the wizard runs `km
//! serve` itself with the env file's variables.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::Mutex;

use km_config::envfile;

/// How long a restarted appliance has to answer `/healthz` with `ok`.
const HEALTHY_WITHIN: Duration = Duration::from_secs(60);

pub enum Services {
    /// `systemctl restart` of each unit, in order.
    Systemd { units: Vec<String> },
    /// A `km serve` child of the wizard.
    Process {
        km_bin: PathBuf,
        child: Box<Mutex<Option<Child>>>,
    },
}

impl Services {
    pub fn process(km_bin: PathBuf) -> Services {
        Services::Process {
            km_bin,
            child: Box::new(Mutex::new(None)),
        }
    }

    /// Restarts everything on the settings of `env_file`, then waits until healthy.
    pub async fn restart(&self, env_file: &Path) -> Result<(), String> {
        let entries = envfile::parse(
            &tokio::fs::read_to_string(env_file)
                .await
                .map_err(|e| format!("cannot read {}: {e}", env_file.display()))?,
        )
        .map_err(|e| format!("{}: {e}", env_file.display()))?;
        let url = health_url(&entries);
        match self {
            Services::Systemd { units } => {
                for unit in units {
                    systemctl(&["restart", unit]).await?;
                }
                // A unit that fails ends the wait at once, named with its last lines.
                wait_healthy(&url, HEALTHY_WITHIN, Watch::Units(units)).await
            }
            Services::Process { km_bin, child } => {
                let mut child = child.lock().await;
                if let Some(old) = child.as_mut() {
                    stop(old).await;
                }
                let spawned = Command::new(km_bin)
                    .arg("serve")
                    .envs(entries.iter().map(|(k, v)| (k, v)))
                    .stdin(Stdio::null())
                    .kill_on_drop(true)
                    .spawn()
                    .map_err(|e| format!("cannot start {}: {e}", km_bin.display()))?;
                *child = Some(spawned);
                // A km that exits (a port taken, a store refused) fails the restart at
                // once instead of after HEALTHY_WITHIN.
                wait_healthy(&url, HEALTHY_WITHIN, Watch::Child(&mut child)).await
            }
        }
    }

    /// Stops a `km serve` the wizard runs (nothing to do under systemd).
    pub async fn shutdown(&self) {
        if let Services::Process { child, .. } = self
            && let Some(old) = child.lock().await.as_mut()
        {
            stop(old).await;
        }
    }
}

pub async fn systemctl(args: &[&str]) -> Result<(), String> {
    run(Command::new("systemctl").args(args)).await.map(drop)
}

/// SIGTERM (km flushes and exits), then SIGKILL after 15 s.
async fn stop(child: &mut Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: kill only sends a signal to our own child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    if tokio::time::timeout(Duration::from_secs(15), child.wait())
        .await
        .is_err()
    {
        let _ = child.kill().await;
    }
}

pub use km_config::envfile::health_url;
use km_config::envfile::{local, setting};
use km_config::table;

/// Where the wizard calls km's API on this machine: `KM_LISTEN` with HTTPS off, else
/// `KM_HTTPS_LISTEN` (the plain port then redirects every API call to the site URL).
pub fn api_base(entries: &[(String, String)]) -> String {
    let (scheme, listen) = match setting(entries, &table::TLS) {
        None | Some("off") => ("http", &table::LISTEN),
        Some(_) => ("https", &table::HTTPS_LISTEN),
    };
    let listen = setting(entries, listen).unwrap_or_default();
    format!("{scheme}://{}", local(listen))
}

/// The client for [`api_base`]. It accepts km's certificate as it is: the connection
/// goes to this machine's own km, whose certificate names the site (not the address
/// called) and, right after a restart with ACME, is still the temporary self-signed
/// one. It never follows a redirect (a password must not leave the machine).
pub fn api_client() -> Result<reqwest::Client, String> {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .redirect(reqwest::redirect::Policy::none())
        .danger_accept_invalid_certs(true)
        .build()
        .map_err(|e| format!("HTTP client: {e}"))
}

/// What a health wait watches, to stop waiting for a service that died.
pub enum Watch<'a> {
    /// systemd units (a target stands for the units it wants).
    Units(&'a [String]),
    /// A `km serve` child.
    Child(&'a mut Option<Child>),
}

impl Watch<'_> {
    /// Why the service cannot become healthy any more, if it died.
    async fn failed(&mut self, url: &str) -> Option<String> {
        match self {
            Watch::Units(units) => failed_unit(units).await,
            Watch::Child(child) => {
                let status = child.as_mut()?.try_wait().ok()??;
                Some(format!(
                    "km exited ({status}) before it answered healthy at {url}; its output is in the wizard's log"
                ))
            }
        }
    }
}

/// Polls `/healthz` until it answers `status: ok` within `within`, or says why not;
/// a watched service that dies meanwhile ends the wait.
pub async fn wait_healthy(url: &str, within: Duration, mut watch: Watch<'_>) -> Result<(), String> {
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()
        .map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + within;
    let mut last = String::from("no answer");
    while tokio::time::Instant::now() < deadline {
        if let Some(why) = watch.failed(url).await {
            return Err(why);
        }
        match http.get(url).send().await {
            Ok(r) => {
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                if body["status"] == "ok" {
                    return Ok(());
                }
                last = format!("status {}: {}", body["status"], body["stores"]);
            }
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Err(format!(
        "the appliance did not report healthy at {url} within {} s (last: {last})",
        within.as_secs()
    ))
}

/// A unit among `units` (a target stands for the units it wants) that failed, or waits
/// to be restarted after failing: named, with the last lines of its journal. Two
/// `systemctl show` calls whatever the number of units (it runs at every health poll).
pub async fn failed_unit(units: &[String]) -> Option<String> {
    let mut all = units.to_vec();
    let targets: Vec<&str> = units
        .iter()
        .filter(|u| u.ends_with(".target"))
        .map(String::as_str)
        .collect();
    if !targets.is_empty() {
        let mut args = vec!["show", "-p", "Wants", "--value"];
        args.extend(targets);
        let wants = run(Command::new("systemctl").args(&args)).await.ok()?;
        all.extend(wants.split_whitespace().map(str::to_string));
    }
    let mut args = vec!["show", "-p", "Id", "-p", "ActiveState", "-p", "SubState"];
    args.extend(all.iter().map(String::as_str));
    let states = run(Command::new("systemctl").args(&args)).await.ok()?;
    // One block per unit, blank-line separated: Id=…, ActiveState=…, SubState=….
    let unit = states.split("\n\n").find_map(|block| {
        let failed = block
            .lines()
            .any(|l| l == "ActiveState=failed" || l == "SubState=auto-restart");
        let id = block.lines().find_map(|l| l.strip_prefix("Id="))?;
        failed.then(|| id.to_string())
    })?;
    let journal =
        run(Command::new("journalctl").args(["-u", &unit, "-n", "5", "-o", "cat", "--no-pager"]))
            .await
            .unwrap_or_default();
    Some(format!(
        "{unit} failed: {} (journalctl -u {unit})",
        journal.trim().replace('\n', " / ")
    ))
}

/// Runs `command`: its standard output, or why it did not run or failed (with its
/// standard error).
pub async fn run(command: &mut Command) -> Result<String, String> {
    let out = command
        .output()
        .await
        .map_err(|e| format!("cannot run {:?}: {e}", command.as_std()))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{:?} failed ({}): {}",
            command.as_std(),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn health_url_goes_through_loopback() {
        let e = |v: &str| vec![("KM_LISTEN".to_string(), v.to_string())];
        assert_eq!(health_url(&e("0.0.0.0:80")), "http://127.0.0.1:80/healthz");
        assert_eq!(
            health_url(&e("10.0.0.2:8080")),
            "http://10.0.0.2:8080/healthz"
        );
        assert_eq!(health_url(&[]), "http://127.0.0.1:8080/healthz");
    }

    #[test]
    fn the_api_is_called_on_the_https_port_when_tls_is_on() {
        let e = |pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let plain = e(&[
            ("KM_LISTEN", "0.0.0.0:80"),
            ("KM_HTTPS_LISTEN", "0.0.0.0:443"),
        ]);
        assert_eq!(api_base(&plain), "http://127.0.0.1:80");
        let tls = e(&[
            ("KM_LISTEN", "0.0.0.0:80"),
            ("KM_TLS", "acme"),
            ("KM_HTTPS_LISTEN", "10.0.0.2:8443"),
        ]);
        assert_eq!(api_base(&tls), "https://10.0.0.2:8443");
        assert_eq!(
            api_base(&e(&[("KM_TLS", "files")])),
            "https://127.0.0.1:443"
        );
        assert_eq!(api_base(&e(&[("KM_TLS", "off")])), "http://127.0.0.1:8080");
    }
}
