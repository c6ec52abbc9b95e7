//! The Packer template of the appliance image (`packer/`), checked with Packer itself
//! (Debian 12's Packer 1.6.6, which tests/run.sh installs; it has every builder built in):
//!
//! - `packer validate` of all three sources (amazon-ebs, googlecompute, null) as a person
//!   would run it, with a stand-in for the package `target/deb/km_<version>_amd64.deb`
//!   (the appliance's boot test builds and installs the real one). It is a full validate, not `-syntax-only`: every
//!   builder and provisioner checks its settings and every uploaded file must exist. It
//!   is offline: Packer 1.6.6 contacts neither AWS nor Google Cloud there and needs no
//!   credentials (it opens no network connection at all); only the variables without a
//!   usable default are given (`gcp_project_id`, `host_address`; nothing connects to
//!   that host).
//! - `packer fmt -check` of `packer/` and `packer/plugins/`.
//! - the files the template uploads from the repository (`packer/provision.sh`) exist.
//! - the checks bite: on a copy of the template, a builder setting removed, an uploaded
//!   file missing and a misaligned line each make validate or fmt fail.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// The repository's root (tests/ is one of its folders).
fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Runs `packer ARGS` in `dir`, with no `PKR_VAR_*` of the caller's environment and no
/// version check against HashiCorp's servers.
fn packer(dir: &Path, args: &[&str]) -> Output {
    let mut cmd = Command::new("packer");
    cmd.args(args)
        .current_dir(dir)
        .env("CHECKPOINT_DISABLE", "1");
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("PKR_VAR_") {
            cmd.env_remove(name);
        }
    }
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("packer not found: tests/run.sh installs it (apt-get install packer)")
        }
        Err(e) => panic!("run packer {args:?}: {e}"),
    }
}

fn text(out: &Output) -> String {
    format!(
        "{}\n--- stdout\n{}--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// A directory with a stand-in for the package the template uploads (named with
/// Cargo.toml's version, as packaging/build-deb.sh names it).
fn stand_in_artifacts() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let cargo = fs::read_to_string(repo_root().join("Cargo.toml")).unwrap();
    let version = cargo
        .split("[workspace.package]")
        .nth(1)
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("version = ")))
        .map(|v| v.trim_matches('"').to_string())
        .expect("a version in [workspace.package]");
    fs::write(
        dir.path().join(format!("km_{version}_amd64.deb")),
        "stand-in\n",
    )
    .unwrap();
    dir
}

/// `packer validate` of every source of `<root>/packer/`, run in `root`.
fn validate(root: &Path, artifacts: &Path) -> Output {
    let artifacts_var = format!("artifacts_dir={}", artifacts.display());
    packer(
        root,
        &[
            "validate",
            "-var",
            &artifacts_var,
            "-var",
            "gcp_project_id=km-validate",
            "-var",
            "host_address=localhost",
            "packer/",
        ],
    )
}

/// `packer fmt -check DIR`, run in `root`.
fn fmt_check(root: &Path, dir: &str) -> Output {
    packer(root, &["fmt", "-check", dir])
}

#[test]
fn template_validates_offline() {
    if !km_e2e::enabled("packer") {
        return;
    }
    let artifacts = stand_in_artifacts();
    let out = validate(&repo_root(), artifacts.path());
    assert!(
        out.status.success(),
        "packer validate packer/ failed:\n{}",
        text(&out)
    );
}

#[test]
fn template_is_formatted() {
    if !km_e2e::enabled("packer") {
        return;
    }
    for dir in ["packer/", "packer/plugins/"] {
        let out = fmt_check(&repo_root(), dir);
        assert!(
            out.status.success(),
            "packer fmt -check {dir} failed (run `packer fmt {dir}`); files not formatted:\n{}",
            text(&out)
        );
    }
}

/// The `source` of every `provisioner "file"` block of km.pkr.hcl, as written.
fn file_provisioner_sources(template: &str) -> Vec<String> {
    let mut sources = Vec::new();
    let mut in_file_block = false;
    for line in template.lines() {
        let line = line.trim();
        if line.starts_with("provisioner \"file\"") {
            in_file_block = true;
        } else if in_file_block && line == "}" {
            in_file_block = false;
        } else if in_file_block
            && let Some(value) = line.strip_prefix("source")
            && let Some(value) = value.trim_start().strip_prefix('=')
        {
            sources.push(value.trim().trim_matches('"').to_string());
        }
    }
    sources
}

#[test]
fn uploaded_repository_files_exist() {
    let root = repo_root();
    let template = fs::read_to_string(root.join("packer/km.pkr.hcl")).unwrap();
    let sources = file_provisioner_sources(&template);
    let mut checked = Vec::new();
    let mut missing = Vec::new();
    for source in &sources {
        // The package is build output, given by artifacts_dir.
        if source.starts_with("${local.artifacts_dir}/") {
            continue;
        }
        let path = source.replace("${path.root}", "packer");
        let path = path.strip_prefix("packer/../").unwrap_or(&path).to_string();
        assert!(
            !path.contains("${"),
            "upload source {source:?}: this test only knows ${{path.root}} and ${{local.artifacts_dir}}"
        );
        if !root.join(&path).exists() {
            missing.push(path.clone());
        }
        checked.push(path);
    }
    assert!(
        checked.iter().any(|p| p == "packer/provision.sh"),
        "km.pkr.hcl no longer uploads packer/provision.sh; uploads: {sources:?}"
    );
    assert!(
        missing.is_empty(),
        "files km.pkr.hcl uploads are missing from the repository: {missing:?}"
    );
}

/// A copy of the template in a tree of its own: packer/*.pkr.hcl, packer/plugins/,
/// Cargo.toml, and a stand-in for provision.sh.
fn template_copy() -> tempfile::TempDir {
    let root = repo_root();
    let copy = tempfile::tempdir().unwrap();
    fs::create_dir_all(copy.path().join("packer/plugins")).unwrap();
    for entry in fs::read_dir(root.join("packer")).unwrap() {
        let path = entry.unwrap().path();
        if path.to_string_lossy().ends_with(".pkr.hcl") {
            fs::copy(
                &path,
                copy.path().join("packer").join(path.file_name().unwrap()),
            )
            .unwrap();
        }
    }
    fs::copy(
        root.join("packer/plugins/plugins.pkr.hcl"),
        copy.path().join("packer/plugins/plugins.pkr.hcl"),
    )
    .unwrap();
    fs::copy(root.join("Cargo.toml"), copy.path().join("Cargo.toml")).unwrap();
    fs::write(copy.path().join("packer/provision.sh"), "#!/bin/bash\n").unwrap();
    copy
}

/// Replaces the one occurrence of `from` in `file`.
fn edit(file: &Path, from: &str, to: &str) {
    let text = fs::read_to_string(file).unwrap();
    assert_eq!(
        text.matches(from).count(),
        1,
        "{from:?} once in {}",
        file.display()
    );
    fs::write(file, text.replacen(from, to, 1)).unwrap();
}

#[test]
fn checks_catch_a_broken_template() {
    if !km_e2e::enabled("packer") {
        return;
    }
    let artifacts = stand_in_artifacts();
    let copy = template_copy();
    let root = copy.path();
    let template = root.join("packer/km.pkr.hcl");

    let out = validate(root, artifacts.path());
    assert!(
        out.status.success(),
        "the copy validates as the original:\n{}",
        text(&out)
    );
    assert!(fmt_check(root, "packer/").status.success());

    // A builder's own check, not the syntax: amazon-ebs without its SSH user.
    edit(&template, "  ssh_username = \"admin\"\n", "");
    let out = validate(root, artifacts.path());
    assert!(
        !out.status.success() && text(&out).contains("ssh_username"),
        "validate passes amazon-ebs without ssh_username:\n{}",
        text(&out)
    );
    edit(
        &template,
        "    most_recent = true\n  }\n",
        "    most_recent = true\n  }\n  ssh_username = \"admin\"\n",
    );
    assert!(validate(root, artifacts.path()).status.success());

    // An uploaded file missing.
    fs::remove_file(root.join("packer/provision.sh")).unwrap();
    let out = validate(root, artifacts.path());
    assert!(
        !out.status.success() && text(&out).contains("provision.sh"),
        "validate passes without packer/provision.sh:\n{}",
        text(&out)
    );

    // A misaligned line.
    edit(
        &template,
        "  region        = var.aws_region\n",
        "  region = var.aws_region\n",
    );
    let out = fmt_check(root, "packer/");
    assert!(
        !out.status.success() && text(&out).contains("km.pkr.hcl"),
        "fmt -check passes a misaligned km.pkr.hcl:\n{}",
        text(&out)
    );
}
