//! `km backup restore`: onto a stopped or fresh appliance. The archive is checked whole
//! (every checksum, the schema versions) before anything is touched; what the restore
//! replaces is moved aside, never deleted.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail, ensure};

use super::create::is_plain_name;
use super::{Manifest, SETTINGS, archive};
use km_config::{envfile, table};
use km_stores::sqlite;

/// Where a restore puts things.
pub struct Targets {
    /// The data dir (`KM_DATA_DIR`) of this appliance.
    pub data_dir: PathBuf,
    /// The env file the settings go to (the previous one kept as `<file>.prev`).
    pub env_file: PathBuf,
    /// The wizard's state directory.
    pub wizard_state: Option<PathBuf>,
}

/// What a restore did.
pub struct Restored {
    pub manifest: Manifest,
    /// Where the files it replaced went.
    pub set_aside: Option<PathBuf>,
    /// The MongoDB collections written, with their documents.
    pub collections: Vec<(String, usize)>,
}

/// A MongoDB document larger than this is not one km wrote (the server's limit is 16 MiB).
const MAX_BSON_DOCUMENT: usize = 16 << 20;
/// Documents per insert.
const INSERT_BATCH: usize = 1_000;

/// Restores `archive` onto `targets`; refuses while a km serves the data dir.
pub async fn restore(archive_path: &Path, targets: &Targets) -> anyhow::Result<Restored> {
    fs::create_dir_all(&targets.data_dir)
        .with_context(|| format!("KM_DATA_DIR: cannot create {}", targets.data_dir.display()))?;
    // Held until the restore is done: no km starts on a half-restored data dir.
    let _lock = sqlite::lock_data_dir_exclusive(&targets.data_dir)?;
    let staging = tempfile::Builder::new()
        .prefix(".km-restore-")
        .tempdir_in(&targets.data_dir)?;
    let stage = staging.path().to_path_buf();
    let from = archive_path.to_path_buf();
    let manifest =
        tokio::task::spawn_blocking(move || archive::read(&from, Some(&stage))).await??;
    check_schema(&manifest)?;
    // Read once: written to the env file below, and naming MongoDB and the TLS files.
    let entries = settings_entries(staging.path())?;
    let settings: BTreeMap<String, String> = entries.iter().flatten().cloned().collect();
    let collections = match staging.path().join("mongodb") {
        dir if dir.is_dir() => restore_mongo(&dir, settings.get(table::MONGO_URL.var))
            .await
            .context(table::MONGO_URL.var)?,
        _ => Vec::new(),
    };
    let set_aside = replace_data(&staging.path().join("data"), &targets.data_dir)?;
    if let Some(entries) = &entries {
        envfile::write_atomic(&targets.env_file, entries, 0o600)
            .with_context(|| format!("cannot write {}", targets.env_file.display()))?;
    }
    restore_named_files(staging.path(), &settings)?;
    if let Some(dir) = &targets.wizard_state {
        restore_wizard(&staging.path().join("wizard"), dir)?;
    }
    Ok(Restored {
        manifest,
        set_aside,
        collections,
    })
}

/// A store newer than this km would not open: said now, before anything is replaced.
fn check_schema(manifest: &Manifest) -> anyhow::Result<()> {
    for (store, version) in &manifest.schema {
        let known = sqlite::schema_version(store)
            .with_context(|| format!("the backup holds a {store} store this km does not know"))?;
        ensure!(
            *version as usize <= known,
            "the backup's {store} store has schema version {version}, newer than this km knows \
             ({known}): restore it with km {} or newer",
            manifest.version
        );
    }
    Ok(())
}

fn settings_entries(stage: &Path) -> anyhow::Result<Option<Vec<(String, String)>>> {
    let path = stage.join(SETTINGS);
    if !path.exists() {
        return Ok(None);
    }
    let text = fs::read_to_string(&path).context("the backup's km.env")?;
    Ok(Some(envfile::parse(&text).context("the backup's km.env")?))
}

/// Moves the data dir's files aside (into `before-restore-<time>/`), then the restored
/// ones in; keeps the data dir's owner on what it puts there.
fn replace_data(restored: &Path, data_dir: &Path) -> anyhow::Result<Option<PathBuf>> {
    let owner = fs::metadata(data_dir)?;
    let aside = data_dir.join(format!("before-restore-{}", km_stores::ids::now_ms()));
    let mut moved = false;
    for entry in fs::read_dir(data_dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let name_text = name.to_string_lossy();
        if name_text == sqlite::LOCK_FILE
            || name_text.starts_with(".km-")
            || name_text.starts_with("before-restore-")
        {
            continue;
        }
        if !moved {
            fs::DirBuilder::new().mode(0o700).create(&aside)?;
            moved = true;
        }
        fs::rename(entry.path(), aside.join(&name))
            .with_context(|| format!("cannot move {} aside", entry.path().display()))?;
    }
    if restored.is_dir() {
        for entry in fs::read_dir(restored)? {
            let entry = entry?;
            let to = data_dir.join(entry.file_name());
            fs::rename(entry.path(), &to)?;
            chown_tree(&to, owner.uid(), owner.gid())?;
        }
    }
    Ok(moved.then_some(aside))
}

fn chown_tree(path: &Path, uid: u32, gid: u32) -> anyhow::Result<()> {
    std::os::unix::fs::lchown(path, Some(uid), Some(gid))
        .with_context(|| format!("cannot give {} to uid {uid}", path.display()))?;
    if path.is_dir() {
        for entry in fs::read_dir(path)? {
            chown_tree(&entry?.path(), uid, gid)?;
        }
    }
    Ok(())
}

/// The TLS files the restored settings name, back at their paths (only those: an
/// archive cannot write anywhere else).
fn restore_named_files(stage: &Path, settings: &BTreeMap<String, String>) -> anyhow::Result<()> {
    for var in ["KM_TLS_CERT", "KM_TLS_KEY", "KM_ACME_CA"] {
        let Some(target) = settings.get(var).map(PathBuf::from) else {
            continue;
        };
        let Ok(rel) = target.strip_prefix("/") else {
            continue;
        };
        let staged = stage.join("files").join(rel);
        if staged.is_file() {
            if let Some(dir) = target.parent() {
                fs::create_dir_all(dir)?;
            }
            let _ = fs::remove_file(&target);
            fs::copy(&staged, &target)
                .with_context(|| format!("{var}: cannot write {}", target.display()))?;
        }
    }
    Ok(())
}

/// The wizard's state as it was (locked or not); its token is made anew.
fn restore_wizard(staged: &Path, dir: &Path) -> anyhow::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    for name in ["locked", "applied"] {
        let (from, to) = (staged.join(name), dir.join(name));
        if from.is_file() {
            fs::copy(&from, &to)?;
        } else if to.exists() {
            fs::remove_file(&to)?;
        }
    }
    Ok(())
}

/// Each collection of the archive replaces the one of the same name.
async fn restore_mongo(dir: &Path, url: Option<&String>) -> anyhow::Result<Vec<(String, usize)>> {
    let Some(url) = url else {
        bail!("the backup holds MongoDB collections but its km.env does not name it");
    };
    let (db, where_) = km_stores::mongo::open(url, Duration::from_secs(10)).await?;
    let mut written = Vec::new();
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()?;
    files.sort();
    for file in files {
        let name = file
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .filter(|n| is_plain_name(n))
            .with_context(|| format!("{}: not a collection km backs up", file.display()))?;
        let docs = read_bson(&file)?;
        let collection = db.collection::<bson::RawDocumentBuf>(&name);
        let failed = |e: mongodb::error::Error| {
            anyhow::anyhow!("cannot restore {name} in {where_}: {}", e.kind)
        };
        collection.drop().await.map_err(failed)?;
        for batch in docs.chunks(INSERT_BATCH) {
            collection.insert_many(batch).await.map_err(failed)?;
        }
        written.push((name, docs.len()));
    }
    Ok(written)
}

/// The documents of a `.bson` file (each starts with its length, little-endian).
fn read_bson(path: &Path) -> anyhow::Result<Vec<bson::RawDocumentBuf>> {
    let mut bytes = Vec::new();
    fs::File::open(path)?.read_to_end(&mut bytes)?;
    let mut docs = Vec::new();
    let mut rest = bytes.as_slice();
    while !rest.is_empty() {
        let len = rest
            .get(..4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(|b| u32::from_le_bytes(b) as usize)
            .filter(|len| (5..=MAX_BSON_DOCUMENT).contains(len) && *len <= rest.len())
            .with_context(|| format!("{}: not BSON documents", path.display()))?;
        let (doc, tail) = rest.split_at(len);
        docs.push(
            bson::RawDocumentBuf::from_bytes(doc.to_vec())
                .with_context(|| format!("{}: not BSON documents", path.display()))?,
        );
        rest = tail;
    }
    Ok(docs)
}
