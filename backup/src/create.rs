//! `km backup create`: everything staged in a private directory next to the archive
//! (the stores copied online), then written out with its manifest.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use futures_util::TryStreamExt;
use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};

use super::{Entry, FORMAT, Manifest, SETTINGS, WIZARD_TOKEN_PREFIX, archive};
use km_config::{Settings, TlsMode, table};

/// What to back up.
pub struct Sources {
    pub settings: Settings,
    /// The env file's text the settings came from (see [`settings_of_process`]).
    pub settings_text: Option<String>,
    /// The wizard's state directory.
    pub wizard_state: Option<PathBuf>,
}

/// The settings of the env file `path` (none when it does not exist) with `data_dir`
/// instead of its `KM_DATA_DIR` if given, and the file's text.
pub fn settings_of(
    path: &Path,
    data_dir: Option<&Path>,
) -> anyhow::Result<(Settings, Option<String>)> {
    let text = match fs::read_to_string(path) {
        Ok(text) => Some(text),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => anyhow::bail!("{}: {e}", path.display()),
    };
    let mut map: BTreeMap<String, String> = match &text {
        Some(text) => km_config::envfile::parse(text)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            .into_iter()
            .collect(),
        None => BTreeMap::new(),
    };
    if let Some(dir) = data_dir {
        map.insert("KM_DATA_DIR".into(), dir.display().to_string());
    }
    let settings =
        Settings::from_env_map(&map).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok((settings, text))
}

/// The settings this process was given, as env-file text: its `KM_*` and `SMTP_*`
/// variables (a role of the appliance gets them from km.env, which only root reads).
pub fn settings_of_process() -> String {
    let mut entries: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| k.starts_with("KM_") || k.starts_with("SMTP_"))
        .collect();
    entries.sort();
    km_config::envfile::render(&entries)
}

/// A backup written.
pub struct Created {
    pub path: PathBuf,
    pub manifest: Manifest,
}

/// The embedded stores: file name and schema name.
const SQLITE_STORES: [(&str, &str); 2] = [
    ("documents.sqlite", "documents"),
    ("events.sqlite", "events"),
];

/// Backs `sources` up into `out`: a new file when it ends with `.tar.gz`, else a new
/// file named after the host and the time in the directory `out` (made if needed).
pub async fn create(sources: &Sources, out: &Path) -> anyhow::Result<Created> {
    let created_at = km_stores::ids::now_ms();
    let host = host_name();
    let path = if out.to_string_lossy().ends_with(".tar.gz") {
        out.to_path_buf()
    } else {
        out.join(format!("km-{}.tar.gz", stamp(created_at)))
    };
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("cannot create {}", dir.display()))?;
    let staging = tempfile::Builder::new()
        .prefix(".km-backup-")
        .tempdir_in(dir)
        .with_context(|| format!("cannot make a staging directory in {}", dir.display()))?;
    let s = &sources.settings;
    let data_dir = s.data_dir.clone();
    let stage = staging.path().to_path_buf();
    let embedded_documents = s.mongo_url.is_none();
    let embedded_events = s.elasticsearch.is_empty();
    let schema = tokio::task::spawn_blocking(move || {
        stage_data_dir(&data_dir, &stage, embedded_documents, embedded_events)
    })
    .await??;
    if let Some(url) = &s.mongo_url {
        stage_mongo(url, &staging.path().join("mongodb"))
            .await
            .context(table::MONGO_URL.var)?;
    }
    stage_settings(sources, staging.path())?;
    let manifest = Manifest {
        format: FORMAT,
        product: "km".into(),
        version: env!("CARGO_PKG_VERSION").into(),
        created_at,
        host,
        documents: if embedded_documents {
            "sqlite"
        } else {
            "mongodb"
        }
        .into(),
        events: if embedded_events {
            "sqlite"
        } else {
            "elasticsearch"
        }
        .into(),
        schema,
        files: entries(staging.path())?,
    };
    let writing_path = path.clone();
    let staged = staging.path().to_path_buf();
    let manifest = tokio::task::spawn_blocking(move || {
        archive::write(&writing_path, &manifest, &staged).map(|()| manifest)
    })
    .await??;
    Ok(Created { path, manifest })
}

/// This machine's name (`km` when it has none).
pub fn host_name() -> String {
    fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "km".into())
}

/// `<host>-<YYYYMMDDTHHMMSSZ>`: what names an archive of this machine made at `at_ms`.
pub fn stamp(at_ms: i64) -> String {
    let host = host_name();
    let stamp = bson::DateTime::from_millis(at_ms)
        .try_to_rfc3339_string()
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_digit() || *c == 'T')
        .take(15)
        .collect::<String>();
    let host: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{host}-{stamp}Z")
}

/// The data dir: each embedded store through SQLite's backup API, every other file as
/// is (the WAL, the lock and staging directories are not data). The schema versions.
fn stage_data_dir(
    data_dir: &Path,
    stage: &Path,
    documents: bool,
    events: bool,
) -> anyhow::Result<BTreeMap<String, u32>> {
    let mut schema = BTreeMap::new();
    let to = stage.join("data");
    fs::create_dir_all(&to)?;
    for (file, store) in SQLITE_STORES {
        let wanted = if store == "documents" {
            documents
        } else {
            events
        };
        let source = data_dir.join(file);
        if wanted && source.exists() {
            let version = copy_sqlite(&source, &to.join(file))
                .with_context(|| format!("{store} store: cannot copy {}", source.display()))?;
            schema.insert(store.to_string(), version);
        }
    }
    // Not data: the stores (copied above) and their WAL, the lock, hidden temporary and
    // staging files, what restores set aside, the dashboard's request for the wizard.
    copy_tree(data_dir, &to, &|rel: &Path| {
        let name = rel.to_string_lossy();
        !(name.ends_with(".sqlite")
            || name.ends_with(".sqlite-wal")
            || name.ends_with(".sqlite-shm")
            || name == km_stores::sqlite::LOCK_FILE
            || name == km_stores::sqlite::WIZARD_START_REQUEST
            || name.starts_with('.')
            || name.starts_with("before-restore-"))
    })?;
    Ok(schema)
}

/// A consistent copy of a live database (one read transaction: writers carry on in WAL
/// mode); its schema version.
fn copy_sqlite(source: &Path, dest: &Path) -> anyhow::Result<u32> {
    let from = Connection::open_with_flags(source, OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    from.busy_timeout(Duration::from_secs(5))?;
    let mut to = Connection::open(dest)?;
    {
        let backup = Backup::new(&from, &mut to)?;
        let mut attempts = 0;
        // -1: every page in one step, so no write in between makes it start over.
        loop {
            match backup.step(-1)? {
                StepResult::Done => break,
                StepResult::More => {}
                _ if attempts < 100 => {
                    attempts += 1;
                    std::thread::sleep(Duration::from_millis(50));
                }
                _ => bail!("the database stayed locked for 5 s"),
            }
        }
    }
    let version: i64 = to.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    // A single file: the copy carries no WAL.
    to.pragma_update(None, "journal_mode", "DELETE")?;
    drop(to);
    fs::set_permissions(dest, fs::Permissions::from_mode(0o600))?;
    Ok(u32::try_from(version).unwrap_or(u32::MAX))
}

/// Copies the regular files under `from` to `to` (keeping their modes) for which
/// `keep(relative path)` holds; directories are entered when kept too.
fn copy_tree(from: &Path, to: &Path, keep: &dyn Fn(&Path) -> bool) -> anyhow::Result<()> {
    let Ok(dir) = fs::read_dir(from) else {
        return Ok(());
    };
    for entry in dir {
        let entry = entry?;
        let name = PathBuf::from(entry.file_name());
        if !keep(&name) {
            continue;
        }
        let kind = entry.file_type()?;
        if kind.is_dir() {
            copy_tree(&entry.path(), &to.join(&name), keep)?;
        } else if kind.is_file() {
            copy_file(&entry.path(), &to.join(&name))?;
        }
    }
    Ok(())
}

fn copy_file(from: &Path, to: &Path) -> anyhow::Result<()> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir)?;
    }
    fs::copy(from, to).with_context(|| format!("cannot copy {}", from.display()))?;
    Ok(())
}

/// Every collection of the documents database, one BSON document after another.
async fn stage_mongo(url: &str, to: &Path) -> anyhow::Result<()> {
    let (db, where_) = km_stores::mongo::open(url, Duration::from_secs(10)).await?;
    fs::create_dir_all(to)?;
    let names = db
        .list_collection_names()
        .await
        .map_err(|e| anyhow::anyhow!("cannot list collections in {where_}: {}", e.kind))?;
    for name in names {
        if !is_plain_name(&name) {
            continue;
        }
        let file = File::create(to.join(format!("{name}.bson")))?;
        let mut out = BufWriter::new(file);
        let mut cursor = db
            .collection::<bson::RawDocumentBuf>(&name)
            .find(bson::doc! {})
            .await
            .map_err(|e| anyhow::anyhow!("cannot read {name} in {where_}: {}", e.kind))?;
        while let Some(doc) = cursor
            .try_next()
            .await
            .map_err(|e| anyhow::anyhow!("reading {name} in {where_}: {}", e.kind))?
        {
            out.write_all(doc.as_bytes())?;
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    }
    Ok(())
}

/// A collection km made (letters, digits, `_`), never `system.*`.
pub(super) fn is_plain_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The env file, the TLS files it names, the wizard's state.
fn stage_settings(sources: &Sources, stage: &Path) -> anyhow::Result<()> {
    if let Some(text) = &sources.settings_text {
        let path = stage.join(SETTINGS);
        if let Some(dir) = path.parent() {
            fs::create_dir_all(dir)?;
        }
        fs::write(&path, text)?;
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600))?;
    }
    for file in tls_files(&sources.settings.tls) {
        if let Some(rel) = file.strip_prefix("/").ok().filter(|_| file.exists()) {
            copy_file(file, &stage.join("files").join(rel))?;
        }
    }
    if let Some(dir) = &sources.wizard_state {
        copy_tree(dir, &stage.join("wizard"), &|rel: &Path| {
            !rel.to_string_lossy().starts_with(WIZARD_TOKEN_PREFIX)
        })?;
    }
    Ok(())
}

/// The files the TLS settings name (absolute paths only).
fn tls_files(tls: &TlsMode) -> Vec<&Path> {
    match tls {
        TlsMode::Off => Vec::new(),
        TlsMode::Files { cert, key } => vec![cert.as_path(), key.as_path()],
        TlsMode::Acme { ca, .. } => ca.iter().map(PathBuf::as_path).collect(),
    }
}

/// The manifest's entries: every staged file, sorted, hashed.
fn entries(stage: &Path) -> anyhow::Result<Vec<Entry>> {
    let mut files = Vec::new();
    walk(stage, stage, &mut files)?;
    files.sort();
    files
        .into_iter()
        .map(|rel| {
            let path = stage.join(&rel);
            let mode = fs::metadata(&path)?.permissions().mode() & 0o777;
            let (size, sha256) = archive::digest(&mut File::open(&path)?, &mut std::io::sink())?;
            Ok(Entry {
                path: rel,
                size,
                mode,
                sha256,
            })
        })
        .collect()
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<String>) -> anyhow::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            walk(root, &path, out)?;
        } else {
            let rel = path.strip_prefix(root)?.to_string_lossy().into_owned();
            out.push(rel);
        }
    }
    Ok(())
}
