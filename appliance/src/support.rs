//! `km support-bundle`: one archive to attach to a ticket (mode 0600): versions, the
//! settings with every secret masked, `km config check`'s report and live checks, the
//! last lines of each unit's journal, `/healthz`, the stores' files and schema versions,
//! disk space. Nothing in it lets its reader sign in or reach a store.

use std::collections::BTreeMap;
use std::fs::{self, OpenOptions};
use std::io::{BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context;

use km_config::{Secret, envfile, table};
use km_setup::validate;

/// Units whose journal goes in.
const UNITS: [&str; 8] = [
    "km-gateway",
    "km-api",
    "km-auth",
    "km-realtime",
    "km-interactor",
    "km-workers",
    "km-wizard",
    "redis-server",
];
/// Journal lines per unit.
const JOURNAL_LINES: &str = "300";
/// The env file's variables with secrets masked: the whole value of a secret setting,
/// the password of every URL.
pub fn masked(entries: &[(String, String)]) -> Vec<(String, String)> {
    entries
        .iter()
        .map(|(k, v)| {
            let whole = table::by_var(k).is_some_and(|s| s.secret == Secret::Whole);
            let value = if whole && !v.is_empty() {
                "*** (set)".to_string()
            } else {
                v.split_whitespace()
                    .map(|word| match table::url_password(word) {
                        Some(password) => word.replacen(&format!(":{password}@"), ":***@", 1),
                        None => word.to_string(),
                    })
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            (k.clone(), value)
        })
        .collect()
}

/// Writes the bundle into `out` (a directory); its path.
pub async fn bundle(env_file: &Path, out: &Path) -> anyhow::Result<PathBuf> {
    let stage = tempfile::Builder::new().prefix(".km-support-").tempdir()?;
    let dir = stage.path();
    let text = fs::read_to_string(env_file).unwrap_or_default();
    let entries = envfile::parse(&text).unwrap_or_default();
    let map: BTreeMap<String, String> = entries.iter().cloned().collect();
    fs::write(dir.join("versions.txt"), versions())?;
    fs::write(dir.join("settings.env"), envfile::render(&masked(&entries)))?;
    fs::write(dir.join("config-check.txt"), config_check(&map).await)?;
    let data_dir = envfile::setting(&entries, &table::DATA_DIR).unwrap_or_default();
    fs::write(dir.join("stores.txt"), stores(Path::new(data_dir)))?;
    fs::write(
        dir.join("disk.txt"),
        command("df", &["-h", data_dir, "/var/backups", "/"]),
    )?;
    fs::write(dir.join("health.json"), health(&entries).await)?;
    fs::create_dir(dir.join("journal"))?;
    for unit in UNITS {
        let lines = command(
            "journalctl",
            &[
                "-u",
                unit,
                "-n",
                JOURNAL_LINES,
                "--no-pager",
                "-o",
                "short-iso",
            ],
        );
        fs::write(dir.join("journal").join(format!("{unit}.txt")), lines)?;
    }
    let name = format!(
        "km-support-{}.tar.gz",
        km_backup::stamp(km_stores::ids::now_ms())
    );
    fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let path = out.join(name);
    write_tar(dir, &path)?;
    Ok(path)
}

fn write_tar(dir: &Path, path: &Path) -> anyhow::Result<()> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let gz = flate2::write::GzEncoder::new(BufWriter::new(file), flate2::Compression::default());
    let mut tar = tar::Builder::new(gz);
    tar.append_dir_all("km-support", dir)?;
    let mut buffered = tar.into_inner()?.finish()?;
    buffered.flush()?;
    Ok(())
}

fn versions() -> String {
    let read = |p: &str| fs::read_to_string(p).unwrap_or_default();
    format!(
        "km {}\npackage: {}\nkernel: {}\n{}",
        env!("CARGO_PKG_VERSION"),
        command("dpkg-query", &["-W", "-f=${Version}", "km"]).trim(),
        read("/proc/sys/kernel/osrelease").trim(),
        read("/etc/os-release")
    )
}

/// The static report and the live checks, as `km config check` prints them (no mail).
async fn config_check(map: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let checked = km_setup::check_settings(map, km_stores::ids::now_ms() / 1000);
    out.push_str(&checked.report.to_string());
    if let Some(settings) = checked.settings.filter(|_| checked.report.is_ok()) {
        out.push_str("live checks:\n");
        for check in validate::live_only(&settings, &validate::Options::default()).await {
            out.push_str(&format!("  {:<8} {check}\n", check.status.as_str()));
        }
    }
    out
}

/// The data dir's files with their sizes, and the schema version of each store.
fn stores(data_dir: &Path) -> String {
    let mut out = format!("{}\n", data_dir.display());
    if let Ok(dir) = fs::read_dir(data_dir) {
        let mut files: Vec<_> = dir.flatten().collect();
        files.sort_by_key(|e| e.file_name());
        for entry in files {
            let size = entry.metadata().map_or(0, |m| m.len());
            out.push_str(&format!(
                "  {:>14}  {}\n",
                size,
                entry.file_name().to_string_lossy()
            ));
        }
    }
    for store in ["documents", "events"] {
        let path = data_dir.join(format!("{store}.sqlite"));
        if let Ok(version) = km_stores::sqlite::schema_of(&path) {
            out.push_str(&format!(
                "schema {store}: version {version} (this km knows {})\n",
                km_stores::sqlite::schema_version(store).unwrap_or(0)
            ));
        }
    }
    out
}

async fn health(entries: &[(String, String)]) -> String {
    let url = envfile::health_url(entries);
    let answer = async {
        reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(5))
            .build()?
            .get(&url)
            .send()
            .await?
            .text()
            .await
    };
    answer.await.unwrap_or_else(|e| format!("{url}: {e}\n"))
}

/// A command's output, or why it did not run.
fn command(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(out) => format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(e) => format!("{program}: {e}\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked() {
        let entries: Vec<(String, String)> = [
            ("KM_DEDICATED_KEY", "km1.abc.def"),
            ("SMTP_PASSWORD", "hunter2"),
            ("KM_MONGO_URL", "mongodb://km:s3cret@db:27017/km"),
            (
                "KM_ELASTICSEARCH_URL",
                "http://e:pw1@es1:9200 http://es2:9200",
            ),
            ("KM_SITE_URL", "https://km.example.com"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let text = envfile::render(&masked(&entries));
        for secret in ["km1.abc", "hunter2", "s3cret", "pw1"] {
            assert!(!text.contains(secret), "{text}");
        }
        assert!(text.contains("mongodb://km:***@db:27017/km"), "{text}");
        assert!(
            text.contains("http://e:***@es1:9200 http://es2:9200"),
            "{text}"
        );
        assert!(
            text.contains("KM_SITE_URL=https://km.example.com"),
            "{text}"
        );
    }
}
