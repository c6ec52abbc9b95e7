//! The Terraform modules (`terraform/aws`, `terraform/gcp`), checked offline: no provider
//! can be downloaded here, so nothing is planned. Instead:
//!
//! - checkov scans `terraform/` (both modules, and each through its example): no failed
//!   check, every skip inline with its reason, no config file that would skip checks.
//! - the formatting is what `terraform fmt` writes: Debian's packer 1.6.6 formats HCL with
//!   the same formatter (hclwrite), so each `.tf` file is checked as a copy named
//!   `*.pkr.hcl` with `packer fmt -check`. The two disagree on one thing, the space after a
//!   unary `!` (packer writes `! x`, terraform `!x`), so the modules use none.
//! - the structure: the standard files, every variable used and documented, every output
//!   documented, the secrets `sensitive` (the inputs and the output carrying the rendered
//!   first-boot script), the example passing every required input, the shared first-boot
//!   script template (AWS user data run by cloud-init; on Google Cloud, whose Debian
//!   image has no cloud-init, the `startup-script` metadata key run by the guest agent at
//!   every boot, so the script does nothing once settings were applied).
//!
//! Tools, installed by `tests/run.sh`: checkov from PyPI, in its own virtualenv at
//! `<target>/checkov` (its pinned dependencies conflict with other Python packages), found
//! there, else on PATH; packer from Debian, on PATH. `KM_E2E_CHECKOV` and `KM_E2E_PACKER`
//! name other binaries.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use km_e2e::target_dir;
use serde_json::Value;

const MODULES: [&str; 2] = ["aws", "gcp"];

/// The shared first-boot script template, as each module's main.tf names it.
const TEMPLATE_REF: &str = "${path.module}/../shared/first-boot.sh.tftpl";

/// Each module's output of the rendered template (it carries the secrets): AWS user data,
/// the GCP `startup-script` metadata key.
const SCRIPT_OUTPUTS: [(&str, &str); 2] = [("aws", "user_data"), ("gcp", "startup_script")];

/// Inputs that carry secrets: the licence, the datastore URLs (they may embed passwords),
/// the SMTP and admin passwords, and the free-form extra settings.
const SECRET_INPUTS: [&str; 7] = [
    "licence",
    "mongo_url",
    "elasticsearch_url",
    "redis_url",
    "smtp_password",
    "admin_password",
    "extra_settings",
];

/// The appliance settings each module writes (`km-wizard apply --settings`).
const SETTINGS: [&str; 17] = [
    "KM_DEDICATED_KEY",
    "KM_SITE_URL",
    "KM_MONGO_URL",
    "KM_ELASTICSEARCH_URL",
    "KM_REDIS_URL",
    "SMTP_HOST",
    "SMTP_PORT",
    "SMTP_USER",
    "SMTP_PASSWORD",
    "SMTP_SENDER",
    "SMTP_TLS",
    "KM_TLS",
    "KM_ACME_EMAIL",
    "KM_RETENTION_DAYS",
    "WIZARD_ADMIN_USERNAME",
    "WIZARD_ADMIN_EMAIL",
    "WIZARD_ADMIN_PASSWORD",
];

fn terraform_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("terraform")
}

fn read(path: &Path) -> Result<String> {
    fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
}

/// Every `*.tf` file under `dir`, sorted.
fn tf_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("listing {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                // Terraform's own working dirs are not the project's sources.
                if path.file_name().is_some_and(|n| n != ".terraform") {
                    stack.push(path);
                }
            } else if path.extension().is_some_and(|e| e == "tf") {
                found.push(path);
            }
        }
    }
    found.sort();
    Ok(found)
}

/// The blocks `<kind> "<name>" { ... }` that start a line, as (name, body), in a formatted
/// file (a block closes with `}` at the start of a line).
fn blocks(text: &str, kind: &str) -> Vec<(String, String)> {
    let prefix = format!("{kind} \"");
    let mut out = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(rest) = line.strip_prefix(&prefix) else {
            continue;
        };
        let Some((name, _)) = rest.split_once('"') else {
            continue;
        };
        let mut body = String::new();
        for l in lines.by_ref() {
            if l == "}" {
                break;
            }
            body.push_str(l);
            body.push('\n');
        }
        out.push((name.to_string(), body));
    }
    out
}

/// Whether `body` has the attribute line `<key> = <value>` (at any alignment).
fn has_attr(body: &str, key: &str, value: &str) -> bool {
    body.lines().any(|l| {
        l.split_once('=')
            .is_some_and(|(k, v)| k.trim() == key && v.trim() == value)
    })
}

/// Whether `text` references `var.<name>` (not as the prefix of a longer name).
fn uses_var(text: &str, name: &str) -> bool {
    let needle = format!("var.{name}");
    text.match_indices(&needle).any(|(i, _)| {
        let before_ok = text[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_' || c == '.'));
        let after_ok = text[i + needle.len()..]
            .chars()
            .next()
            .is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
        before_ok && after_ok
    })
}

/// The names in the first column of the README's tables (rows starting "| `name` |").
fn documented_names(readme: &str) -> BTreeSet<String> {
    readme
        .lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|rest| rest.split_once("` |").map(|(n, _)| n.to_string()))
        .collect()
}

/// Finds a tool: `$<env>` if set, else the first of `places`, else `<name>` on PATH.
fn tool(name: &str, env: &str, places: &[PathBuf]) -> Result<PathBuf> {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        ensure!(p.is_file(), "{env}={} does not exist", p.display());
        return Ok(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let on_path = std::env::split_paths(&path).map(|dir| dir.join(name));
    places
        .iter()
        .cloned()
        .chain(on_path)
        .find(|candidate| candidate.is_file())
        .with_context(|| format!("{name} not found: tests/run.sh installs it (or set {env})"))
}

/// Runs `cmd` to completion with output captured, killing it after `limit`.
fn run(mut cmd: Command, limit: Duration) -> Result<Output> {
    let what = format!("{cmd:?}");
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {what}"))?;
    // Drain both pipes while waiting, so that a chatty tool never blocks on a full pipe.
    let mut stdout = child.stdout.take().context("stdout")?;
    let mut stderr = child.stderr.take().context("stderr")?;
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.read_to_end(&mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.read_to_end(&mut buf);
        buf
    });
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    Ok(Output {
        status,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
    })
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn modules_have_the_standard_files_and_share_the_template() -> Result<()> {
    let root = terraform_dir();
    let template = read(&root.join("shared/first-boot.sh.tftpl"))?;
    ensure!(
        template.starts_with("#!/bin/sh\n"),
        "the template must start with #!/bin/sh (cloud-init and the guest agent run it as a script)"
    );
    for needle in [
        // The guest agent runs it at every boot: nothing once settings were applied.
        "if [ -e /var/lib/km-wizard/locked ]",
        "umask 077",
        "| base64 -d > /run/km-settings.env",
        "/usr/bin/km-wizard apply --settings /run/km-settings.env || status=$?",
        "rm -f /run/km-settings.env",
        "exit \"$status\"",
    ] {
        ensure!(
            template.contains(needle),
            "shared/first-boot.sh.tftpl lacks {needle:?}"
        );
    }
    // The lock check and the umask come before the settings file is written (the lines
    // of code, not the comments that name them).
    let line = |starts: &str| {
        template
            .lines()
            .position(|l| l.starts_with(starts))
            .unwrap_or(usize::MAX)
    };
    let write = template
        .lines()
        .position(|l| l.ends_with("| base64 -d > /run/km-settings.env"))
        .unwrap_or(0);
    ensure!(
        line("if [ -e /var/lib/km-wizard/locked ]") < write && line("umask 077") < write,
        "shared/first-boot.sh.tftpl must check the lock and set umask 077 before writing the settings"
    );

    for module in MODULES {
        let dir = root.join(module);
        for file in [
            "main.tf",
            "variables.tf",
            "outputs.tf",
            "versions.tf",
            "README.md",
        ] {
            ensure!(
                dir.join(file).is_file(),
                "terraform/{module}/{file} is missing"
            );
        }

        let versions = read(&dir.join("versions.tf"))?;
        ensure!(
            has_attr(&versions, "required_version", "\">= 1.5\""),
            "terraform/{module}/versions.tf: required_version must be \">= 1.5\""
        );
        let provider = if module == "aws" {
            "hashicorp/aws"
        } else {
            "hashicorp/google"
        };
        ensure!(
            versions.contains(&format!("\"{provider}\"")),
            "terraform/{module}/versions.tf does not require {provider}"
        );

        let main = read(&dir.join("main.tf"))?;
        ensure!(
            main.contains(&format!("templatefile(\"{TEMPLATE_REF}\"")),
            "terraform/{module}/main.tf does not render the shared template {TEMPLATE_REF}"
        );
        if module == "gcp" {
            // Debian's Google Cloud image has no cloud-init: the guest agent runs the
            // startup-script key, and nothing reads user-data.
            ensure!(
                main.contains("startup-script ") && !main.contains("user-data"),
                "terraform/gcp/main.tf must pass the script as the startup-script metadata key, not user-data"
            );
            ensure!(
                main.contains("metadata[\"startup-script\"]"),
                "terraform/gcp/main.tf must ignore later changes of metadata[\"startup-script\"]"
            );
        }
        for setting in SETTINGS {
            ensure!(
                main.lines()
                    .any(|l| l.trim_start().starts_with(&format!("{setting} "))),
                "terraform/{module}/main.tf does not write {setting}"
            );
        }

        let example = read(&dir.join("examples/basic/main.tf"))?;
        ensure!(
            example.lines().any(|l| l
                .split_once('=')
                .is_some_and(|(k, v)| k.trim() == "source" && v.trim() == "\"../..\"")),
            "terraform/{module}/examples/basic/main.tf must call the module with source = \"../..\""
        );
        // The example must pass every input that has no default.
        let variables = read(&dir.join("variables.tf"))?;
        for (name, body) in blocks(&variables, "variable") {
            let required = !body.lines().any(|l| l.trim_start().starts_with("default "));
            if required {
                ensure!(
                    example
                        .lines()
                        .any(|l| l.split_once('=').is_some_and(|(k, _)| k.trim() == name)),
                    "terraform/{module}/examples/basic/main.tf does not set the required input {name}"
                );
            }
        }
    }
    Ok(())
}

#[test]
fn every_variable_is_used_and_every_input_and_output_documented() -> Result<()> {
    let root = terraform_dir();
    for module in MODULES {
        let dir = root.join(module);
        let variables = blocks(&read(&dir.join("variables.tf"))?, "variable");
        let outputs = blocks(&read(&dir.join("outputs.tf"))?, "output");
        ensure!(
            !variables.is_empty(),
            "terraform/{module}/variables.tf declares no variable"
        );
        ensure!(
            !outputs.is_empty(),
            "terraform/{module}/outputs.tf declares no output"
        );

        // Uses outside variables.tf (whose validations name each variable).
        let mut code = String::new();
        for file in ["main.tf", "outputs.tf"] {
            code.push_str(&read(&dir.join(file))?);
        }
        let unused: Vec<&str> = variables
            .iter()
            .map(|(n, _)| n.as_str())
            .filter(|n| !uses_var(&code, n))
            .collect();
        ensure!(
            unused.is_empty(),
            "terraform/{module}: variables declared but never used: {unused:?}"
        );

        let undocumented: Vec<&str> = variables
            .iter()
            .chain(&outputs)
            .map(|(n, body)| (n.as_str(), body))
            .filter(|(_, body)| {
                !body
                    .lines()
                    .any(|l| l.trim_start().starts_with("description "))
            })
            .map(|(n, _)| n)
            .collect();
        ensure!(
            undocumented.is_empty(),
            "terraform/{module}: no description: {undocumented:?}"
        );

        let readme = documented_names(&read(&dir.join("README.md"))?);
        let declared: BTreeSet<String> = variables
            .iter()
            .chain(&outputs)
            .map(|(n, _)| n.clone())
            .collect();
        let missing: Vec<&String> = declared.difference(&readme).collect();
        let stale: Vec<&String> = readme.difference(&declared).collect();
        ensure!(
            missing.is_empty() && stale.is_empty(),
            "terraform/{module}/README.md tables: missing {missing:?}, not declared {stale:?}"
        );
    }
    Ok(())
}

#[test]
fn secrets_are_sensitive() -> Result<()> {
    let root = terraform_dir();
    for module in MODULES {
        let variables = blocks(&read(&root.join(module).join("variables.tf"))?, "variable");
        for secret in SECRET_INPUTS {
            let (_, body) = variables
                .iter()
                .find(|(n, _)| n == secret)
                .with_context(|| format!("terraform/{module}: no variable {secret}"))?;
            ensure!(
                has_attr(body, "sensitive", "true"),
                "terraform/{module}: variable {secret} must be sensitive = true"
            );
        }
        // An output of a secret must say so too.
        let outputs = blocks(&read(&root.join(module).join("outputs.tf"))?, "output");
        let (_, name) = SCRIPT_OUTPUTS
            .iter()
            .find(|(m, _)| *m == module)
            .with_context(|| format!("no script output named for {module}"))?;
        let (_, script) = outputs
            .iter()
            .find(|(n, _)| n == name)
            .with_context(|| format!("terraform/{module}: no output {name}"))?;
        ensure!(
            has_attr(script, "sensitive", "true"),
            "terraform/{module}: output {name} carries the secrets and must be sensitive"
        );
    }
    Ok(())
}

/// A unary `!` outside strings and comments (`!=` is fine), as (line, text).
fn unary_nots(source: &str) -> Vec<(usize, String)> {
    let mut found = Vec::new();
    for (n, line) in source.lines().enumerate() {
        let chars: Vec<char> = line.chars().collect();
        let mut in_string = false;
        let mut i = 0;
        while i < chars.len() {
            let c = chars[i];
            if in_string {
                if c == '\\' {
                    i += 1;
                } else if c == '"' {
                    in_string = false;
                }
            } else if c == '"' {
                in_string = true;
            } else if c == '#' || (c == '/' && chars.get(i + 1) == Some(&'/')) {
                break;
            } else if c == '!' && chars.get(i + 1) != Some(&'=') {
                found.push((n + 1, line.to_string()));
                break;
            }
            i += 1;
        }
    }
    found
}

#[test]
fn hcl_is_formatted() -> Result<()> {
    if !km_e2e::enabled("terraform and packer") {
        return Ok(());
    }
    let root = terraform_dir();
    let packer = tool("packer", "KM_E2E_PACKER", &[])?;
    let files = tf_files(&root)?;
    ensure!(
        files.len() >= 10,
        "expected the .tf files of both modules, found {files:?}"
    );

    let mut nots = Vec::new();
    for file in &files {
        for (line, text) in unary_nots(&read(file)?) {
            nots.push(format!("{}:{line}: {}", file.display(), text.trim()));
        }
    }
    ensure!(
        nots.is_empty(),
        "unary `!` (packer's formatter and terraform fmt space it differently; write `x == false` or a conditional):\n{}",
        nots.join("\n")
    );

    // The check is live: a misaligned file fails it.
    let probe = tempfile::tempdir()?;
    fs::write(
        probe.path().join("probe.pkr.hcl"),
        "variable \"a\" {\n  type = string\n  default   = \"x\"\n}\n",
    )?;
    let mut cmd = Command::new(&packer);
    cmd.args(["fmt", "-check"]).arg(probe.path());
    let out = run(cmd, Duration::from_secs(60))?;
    ensure!(
        !out.status.success(),
        "packer fmt -check accepted a misaligned file: {}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // Each .tf file as a flat copy named <path with '/' as '__'>.pkr.hcl.
    let copies = tempfile::tempdir()?;
    let mut names = Vec::new();
    for file in &files {
        let rel = file.strip_prefix(&root)?.to_string_lossy().into_owned();
        let name = format!("{}.pkr.hcl", rel.replace('/', "__"));
        fs::copy(file, copies.path().join(&name))?;
        names.push((name, format!("terraform/{rel}")));
    }
    let mut cmd = Command::new(&packer);
    cmd.args(["fmt", "-check", "-diff"]).arg(copies.path());
    let out = run(cmd, Duration::from_secs(120))?;
    if !out.status.success() {
        let mut report = format!("{}{}", text(&out.stdout), text(&out.stderr));
        for (copy, original) in &names {
            report = report.replace(&copies.path().join(copy).display().to_string(), original);
        }
        bail!("HCL not formatted as terraform fmt writes it (packer fmt -check -diff):\n{report}");
    }
    Ok(())
}

#[test]
fn checkov_finds_nothing() -> Result<()> {
    if !km_e2e::enabled("checkov") {
        return Ok(());
    }
    let root = terraform_dir();
    let checkov = tool(
        "checkov",
        "KM_E2E_CHECKOV",
        &[target_dir().join("checkov/bin/checkov")],
    )?;

    // Skips belong inline, next to the resource, with their reason: no config file or
    // baseline that could skip checks out of sight.
    for entry in fs::read_dir(&root)? {
        let name = entry?.file_name().to_string_lossy().into_owned();
        ensure!(
            !name.starts_with(".checkov") && !name.ends_with(".baseline"),
            "terraform/{name}: checks are skipped inline only"
        );
    }
    for file in tf_files(&root)? {
        for (n, line) in read(&file)?.lines().enumerate() {
            if let Some((_, skip)) = line.split_once("checkov:skip=") {
                let reason = skip.split_once(':').map(|(_, r)| r.trim()).unwrap_or("");
                ensure!(
                    reason.len() >= 30,
                    "{}:{}: a checkov skip needs its reason after the check ID: {}",
                    file.display(),
                    n + 1,
                    line.trim()
                );
            }
        }
    }

    let mut cmd = Command::new(&checkov);
    cmd.arg("-d").arg(&root).args([
        "--framework",
        "terraform",
        "--skip-download",
        "--compact",
        "-o",
        "json",
    ]);
    let out = run(cmd, Duration::from_secs(300))?;
    let stdout = text(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).with_context(|| {
        format!(
            "checkov's output is not JSON (exit {}):\n{stdout}\n{}",
            out.status,
            text(&out.stderr)
        )
    })?;
    // One framework gives one report; checkov gives a list when there are several.
    let reports: Vec<&Value> = match &report {
        Value::Array(items) => items.iter().collect(),
        single => vec![single],
    };

    let mut failed = Vec::new();
    let mut evaluated = BTreeSet::new();
    for r in &reports {
        let summary = &r["summary"];
        ensure!(
            summary["parsing_errors"].as_u64() == Some(0),
            "checkov could not parse some files: {}",
            r["results"]["parsing_errors"]
        );
        let results = &r["results"];
        for check in results["failed_checks"].as_array().into_iter().flatten() {
            failed.push(format!(
                "{} {} on {} ({}:{})",
                check["check_id"].as_str().unwrap_or("?"),
                check["check_name"].as_str().unwrap_or(""),
                check["resource"].as_str().unwrap_or("?"),
                check["file_path"].as_str().unwrap_or("?"),
                check["file_line_range"],
            ));
        }
        for check in results["skipped_checks"].as_array().into_iter().flatten() {
            let reason = check["check_result"]["suppress_comment"]
                .as_str()
                .unwrap_or("");
            ensure!(
                reason.len() >= 30,
                "checkov skip of {} on {} has no real reason: {reason:?}",
                check["check_id"],
                check["resource"]
            );
        }
        for key in ["passed_checks", "skipped_checks"] {
            for check in results[key].as_array().into_iter().flatten() {
                if let Some(resource) = check["resource"].as_str() {
                    evaluated.insert(resource.trim_start_matches("module.km.").to_string());
                }
            }
        }
    }
    ensure!(
        failed.is_empty(),
        "checkov failed checks (fix them, or skip inline with `# checkov:skip=ID:reason`):\n{}",
        failed.join("\n")
    );
    // The scan did see the modules: their main resources were checked.
    for resource in [
        "aws_instance.km",
        "aws_security_group.km",
        "google_compute_instance.km",
    ] {
        ensure!(
            evaluated.contains(resource),
            "checkov evaluated no check on {resource}; it saw {evaluated:?}"
        );
    }
    Ok(())
}
