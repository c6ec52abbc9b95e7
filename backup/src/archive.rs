//! The archive itself: written from a staging directory, read back checking every file
//! against the manifest (and extracted, for a restore).

use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufReader, BufWriter, Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use anyhow::{Context, bail, ensure};
use flate2::Compression;
use flate2::read::GzDecoder;
use flate2::write::GzEncoder;
use sha2::{Digest, Sha256};

use super::{Entry, FORMAT, MANIFEST, MAX_MANIFEST_BYTES, Manifest, safe_path};

/// Writes `manifest` and the files it lists (read from `staged`) to `out`, created new
/// with mode 0600 (through `<out>.partial`, renamed when complete).
pub(super) fn write(out: &Path, manifest: &Manifest, staged: &Path) -> anyhow::Result<()> {
    let partial = out.with_extension("partial");
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&partial)
        .with_context(|| format!("cannot create {}", partial.display()))?;
    let written = write_members(file, manifest, staged).and_then(|file| {
        file.sync_all()?;
        Ok(())
    });
    if let Err(e) = written {
        let _ = fs::remove_file(&partial);
        return Err(e.context(format!("cannot write {}", partial.display())));
    }
    fs::rename(&partial, out).with_context(|| format!("cannot rename to {}", out.display()))
}

fn write_members(file: File, manifest: &Manifest, staged: &Path) -> anyhow::Result<File> {
    // Level 3: most of gzip's gain on SQLite pages at a fraction of level 6's time.
    let gz = GzEncoder::new(BufWriter::new(file), Compression::new(3));
    let mut tar = tar::Builder::new(gz);
    let mtime = u64::try_from(manifest.created_at / 1000).unwrap_or(0);
    let json = serde_json::to_vec_pretty(manifest)?;
    tar.append_data(
        &mut header(json.len() as u64, 0o600, mtime),
        MANIFEST,
        &json[..],
    )?;
    for entry in &manifest.files {
        let source = staged.join(&entry.path);
        let f = File::open(&source).with_context(|| format!("{}", source.display()))?;
        let mut h = header(entry.size, entry.mode, mtime);
        tar.append_data(&mut h, &entry.path, BufReader::new(f).take(entry.size))?;
    }
    let gz = tar.into_inner()?;
    let buffered = gz.finish()?;
    buffered.into_inner().map_err(|e| e.into_error().into())
}

fn header(size: u64, mode: u32, mtime: u64) -> tar::Header {
    let mut h = tar::Header::new_gnu();
    h.set_size(size);
    h.set_mode(mode);
    h.set_mtime(mtime);
    h.set_entry_type(tar::EntryType::Regular);
    h
}

/// Reads `archive` through, checking the manifest and every file's size and checksum;
/// what it holds, or why it cannot be trusted.
pub fn verify(archive: &Path) -> anyhow::Result<Manifest> {
    read(archive, None)
}

/// As [`verify`], also writing each file under `extract_to` (created 0700 by the caller).
pub(super) fn read(archive: &Path, extract_to: Option<&Path>) -> anyhow::Result<Manifest> {
    let file = File::open(archive).with_context(|| format!("cannot open {}", archive.display()))?;
    read_from(file, extract_to).with_context(|| format!("{}", archive.display()))
}

fn read_from(file: File, extract_to: Option<&Path>) -> anyhow::Result<Manifest> {
    let mut tar = tar::Archive::new(GzDecoder::new(BufReader::new(file)));
    let mut entries = tar
        .entries()
        .context("not a km backup (not a tar.gz archive)")?;
    let manifest = match entries.next() {
        Some(first) => read_manifest(first?)?,
        None => bail!("not a km backup: the archive is empty"),
    };
    let mut expected: BTreeMap<&str, &Entry> = manifest
        .files
        .iter()
        .map(|f| (f.path.as_str(), f))
        .collect();
    ensure!(
        expected.len() == manifest.files.len(),
        "the manifest lists a file twice"
    );
    for member in entries {
        let mut member = member.context("the archive is damaged")?;
        // Directories (tar tools add them) hold nothing to check.
        if member.header().entry_type() == tar::EntryType::Directory {
            continue;
        }
        let path = String::from_utf8_lossy(&member.path_bytes()).into_owned();
        let Some(entry) = expected.remove(path.as_str()) else {
            bail!("{path}: in the archive but not in its manifest (or twice)");
        };
        ensure!(
            member.header().entry_type() == tar::EntryType::Regular,
            "{path}: not a regular file"
        );
        // Never more than the manifest's size (plus one byte, to see it is more).
        let mut bounded = (&mut member).take(entry.size.saturating_add(1));
        let (size, sha256) = match extract_to {
            Some(dir) => copy_checked(&mut bounded, &dir.join(&path), entry.mode)?,
            None => digest(&mut bounded, &mut io::sink())?,
        };
        ensure!(
            size == entry.size && sha256 == entry.sha256,
            "{path}: damaged ({size} bytes with SHA-256 {sha256}; the manifest says {} bytes, {})",
            entry.size,
            entry.sha256
        );
    }
    if let Some(missing) = expected.keys().next() {
        bail!("{missing}: in the manifest but missing from the archive (truncated?)");
    }
    Ok(manifest)
}

fn read_manifest(mut first: tar::Entry<'_, impl Read>) -> anyhow::Result<Manifest> {
    ensure!(
        first.path_bytes().as_ref() == MANIFEST.as_bytes(),
        "not a km backup: it does not start with {MANIFEST}"
    );
    ensure!(
        first.size() <= MAX_MANIFEST_BYTES,
        "not a km backup: {MANIFEST} is {} bytes",
        first.size()
    );
    let mut json = Vec::new();
    first.read_to_end(&mut json)?;
    let manifest: Manifest =
        serde_json::from_slice(&json).context("not a km backup: unreadable manifest")?;
    ensure!(
        manifest.product == "km",
        "not a km backup (made by {:?})",
        manifest.product
    );
    ensure!(
        manifest.format <= FORMAT,
        "backup format {} is newer than this km reads ({FORMAT}): use km {} or newer",
        manifest.format,
        manifest.version
    );
    if let Some(bad) = manifest.files.iter().find(|f| !safe_path(&f.path)) {
        bail!("{:?}: not a path a km backup holds", bad.path);
    }
    Ok(manifest)
}

/// Writes `from` to `to` (a new file with `mode`), returning its size and SHA-256.
fn copy_checked(from: &mut impl Read, to: &Path, mode: u32) -> anyhow::Result<(u64, String)> {
    if let Some(dir) = to.parent() {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)
        .with_context(|| format!("cannot create {}", to.display()))?;
    let mut out = BufWriter::new(file);
    let got = digest(from, &mut out)?;
    let file = out.into_inner().map_err(|e| e.into_error())?;
    file.set_permissions(fs::Permissions::from_mode(mode & 0o777))?;
    file.sync_all()?;
    Ok(got)
}

/// Copies `from` into `to`, returning the bytes copied and their SHA-256 (hex).
pub(super) fn digest(from: &mut impl Read, to: &mut impl Write) -> io::Result<(u64, String)> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let chunk = buf.get(..n).unwrap_or_default();
        hasher.update(chunk);
        to.write_all(chunk)?;
        size += n as u64;
    }
    Ok((size, hex::encode(hasher.finalize())))
}
