//! Backups of the appliance: one archive (tar with gzip, mode 0600), the manifest first
//! (product version, schema versions, every file's size, mode and SHA-256), then
//!
//! - `data/`: the embedded stores, copied through SQLite's online backup API while km
//!   runs, and the rest of the data dir (the ACME account and certificate in `tls/`);
//! - `mongodb/<collection>.bson`: the documents store on MongoDB, as the driver reads it;
//! - `settings/km.env`: the settings;
//! - `files/<absolute path>`: the TLS files the settings name (`KM_TLS_CERT`, …);
//! - `wizard/`: the wizard's state (whether it is locked; never its one-time token).
//!
//! Events on Elasticsearch are not copied (its snapshots do that; the manifest says so).

mod archive;
mod create;
mod restore;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

pub use archive::verify;
pub use create::{Created, Sources, create, host_name, settings_of, settings_of_process, stamp};
pub use restore::{Restored, Targets, restore};

/// The archive layout this km writes and reads.
pub const FORMAT: u32 = 1;
/// The first member of every archive.
const MANIFEST: &str = "manifest.json";
/// A manifest larger than this is not one km wrote.
const MAX_MANIFEST_BYTES: u64 = 16 << 20;
/// The top directories of an archive; nothing else is read or restored.
const PARTS: [&str; 5] = ["data", "mongodb", "settings", "files", "wizard"];
/// The settings inside an archive.
const SETTINGS: &str = "settings/km.env";
/// The wizard's one-time token is never copied: a restored wizard makes a new one.
const WIZARD_TOKEN_PREFIX: &str = "setup-token";

/// What an archive holds, written first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    pub product: String,
    /// The km that made it.
    pub version: String,
    /// Epoch milliseconds.
    pub created_at: i64,
    pub host: String,
    /// `sqlite` or `mongodb`.
    pub documents: String,
    /// `sqlite`, or `elasticsearch` (not in the archive).
    pub events: String,
    /// Schema version of each embedded store copied (SQLite `user_version`).
    pub schema: BTreeMap<String, u32>,
    pub files: Vec<Entry>,
}

/// One file of the archive.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub path: String,
    pub size: u64,
    /// Permission bits, restored as they were.
    pub mode: u32,
    pub sha256: String,
}

impl Manifest {
    /// Bytes of all files.
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }

    /// One line per part: what the archive holds.
    pub fn summary(&self) -> String {
        let mut parts: BTreeMap<&str, (usize, u64)> = BTreeMap::new();
        for f in &self.files {
            let part = f.path.split('/').next().unwrap_or_default();
            let e = parts.entry(part).or_default();
            e.0 += 1;
            e.1 += f.size;
        }
        let mut out = format!(
            "km {} backup of {} made {} (format {}): documents on {}, events on {}{}\n",
            self.version,
            self.host,
            km_config::licence::date(self.created_at / 1000),
            self.format,
            self.documents,
            self.events,
            if self.events == "elasticsearch" {
                " (not in the archive: use Elasticsearch snapshots)"
            } else {
                ""
            }
        );
        for (store, version) in &self.schema {
            out.push_str(&format!("  schema {store}: version {version}\n"));
        }
        for (part, (count, bytes)) in parts {
            out.push_str(&format!("  {part:<9} {count} files, {bytes} bytes\n"));
        }
        out
    }
}

/// How the last scheduled backup went, kept next to the backups (`last-backup.json`)
/// for `/healthz` and the admins' account page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    /// Epoch milliseconds.
    pub at: i64,
    pub ok: bool,
    pub file: Option<String>,
    pub bytes: u64,
    pub took_ms: u64,
    pub error: Option<String>,
}

const OUTCOME_FILE: &str = "last-backup.json";

impl Outcome {
    pub fn read(dir: &std::path::Path) -> Option<Outcome> {
        let text = std::fs::read(dir.join(OUTCOME_FILE)).ok()?;
        serde_json::from_slice(&text).ok()
    }

    pub fn write(&self, dir: &std::path::Path) -> std::io::Result<()> {
        let tmp = dir.join(format!(".{OUTCOME_FILE}.tmp"));
        std::fs::write(&tmp, serde_json::to_vec(self).unwrap_or_default())?;
        std::fs::rename(tmp, dir.join(OUTCOME_FILE))
    }
}

/// Deletes the oldest archives (`km-*.tar.gz`, by time written) in `dir` beyond `keep`;
/// the names deleted.
pub fn prune(dir: &std::path::Path, keep: usize) -> std::io::Result<Vec<String>> {
    let mut archives: Vec<(std::time::SystemTime, std::path::PathBuf)> = std::fs::read_dir(dir)?
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let name = name.to_string_lossy();
            name.starts_with("km-") && name.ends_with(".tar.gz") && !name.starts_with("km-support-")
        })
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    archives.sort();
    let excess = archives.len().saturating_sub(keep);
    let mut deleted = Vec::new();
    for (_, path) in archives.into_iter().take(excess) {
        std::fs::remove_file(&path)?;
        deleted.push(path.display().to_string());
    }
    Ok(deleted)
}

/// Whether `path` is a relative path of plain names under one of [`PARTS`].
fn safe_path(path: &str) -> bool {
    let mut segments = path.split('/');
    let first_ok = segments.next().is_some_and(|first| PARTS.contains(&first));
    let mut rest = segments.peekable();
    first_ok
        && path.len() < 4096
        && rest.peek().is_some()
        && rest.all(|s| !s.is_empty() && s != "." && s != ".." && !s.contains('\0'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prune_keeps_the_newest() {
        let dir = tempfile::tempdir().unwrap();
        let now = std::time::SystemTime::now();
        for (i, name) in [
            "km-a-1.tar.gz",
            "km-a-2.tar.gz",
            "km-a-3.tar.gz",
            "other.txt",
        ]
        .iter()
        .enumerate()
        {
            let path = dir.path().join(name);
            std::fs::write(&path, "x").unwrap();
            let at = now - std::time::Duration::from_secs(3600 * (10 - i as u64));
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(at)
                .unwrap();
        }
        let deleted = prune(dir.path(), 2).unwrap();
        assert_eq!(deleted.len(), 1);
        assert!(deleted[0].ends_with("km-a-1.tar.gz"), "{deleted:?}");
        assert!(dir.path().join("km-a-3.tar.gz").exists() && dir.path().join("other.txt").exists());
        assert_eq!(prune(dir.path(), 2).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn only_plain_paths_under_known_parts() {
        for ok in [
            "data/documents.sqlite",
            "data/tls/account.json",
            "files/etc/km/tls/key.pem",
            "wizard/locked",
            "mongodb/users.bson",
            "settings/km.env",
        ] {
            assert!(safe_path(ok), "{ok}");
        }
        for bad in [
            "",
            "data",
            "/etc/passwd",
            "data/../../etc/passwd",
            "other/file",
            "./data/x",
            "data/./x",
            "files/../x",
        ] {
            assert!(!safe_path(bad), "{bad}");
        }
    }
}
