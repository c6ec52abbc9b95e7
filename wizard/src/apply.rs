//! Applying settings, step by step: check everything (nothing is written if a check
//! fails), write the env file atomically keeping the previous one, restart the services
//! and wait until healthy (or restore the previous file and restart again), create the
//! first admin, lock the wizard. The web page and `km-wizard apply` run the same steps.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use parking_lot::Mutex;
use serde::Serialize;

use crate::services::{self, Services};
use crate::token::StateDir;
use km_config::envfile;
use km_setup::checks::{Check, Status};
use km_setup::validate;

/// The first admin account, created on the restarted appliance.
#[derive(Clone)]
pub struct Admin {
    pub username: String,
    pub email: String,
    pub password: String,
}

/// What an apply is given.
pub struct Plan {
    /// Every variable of the new env file.
    pub env: BTreeMap<String, String>,
    pub admin: Option<Admin>,
    /// Where the SMTP check sends its test mail.
    pub test_mail_to: Option<String>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "state", content = "detail", rename_all = "snake_case")]
pub enum StepState {
    Pending,
    Running,
    Done(String),
    Failed(String),
}

#[derive(Debug, Clone, Serialize)]
pub struct Step {
    pub name: &'static str,
    #[serde(flatten)]
    pub state: StepState,
}

impl Step {
    /// The state as a CSS class.
    pub fn state_name(&self) -> &'static str {
        match self.state {
            StepState::Pending => "pending",
            StepState::Running => "running",
            StepState::Done(_) => "done",
            StepState::Failed(_) => "failed",
        }
    }

    pub fn detail(&self) -> &str {
        match &self.state {
            StepState::Done(d) | StepState::Failed(d) => d,
            StepState::Pending | StepState::Running => "",
        }
    }
}

impl Progress {
    /// Whether the new settings run (the restart step passed), even if a later step failed.
    pub fn applied(&self) -> bool {
        self.steps
            .get(2)
            .is_some_and(|s| matches!(s.state, StepState::Done(_)))
    }
}

/// The steps of an apply as they progress, read by the progress page.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Progress {
    pub steps: Vec<Step>,
    pub checks: Vec<Check>,
    pub finished: bool,
    pub succeeded: bool,
}

pub type SharedProgress = Arc<Mutex<Progress>>;

const STEPS: [&str; 5] = [
    "Check the settings",
    "Write the env file",
    "Restart the services",
    "Create the admin account",
    "Lock the wizard",
];

/// Where an apply writes and whom it restarts.
pub struct Target {
    pub env_file: PathBuf,
    pub state: StateDir,
    /// Where uploaded certificates and keys are saved (readable by km's group).
    pub pem_dir: PathBuf,
    pub services: Arc<Services>,
}

fn set(progress: &SharedProgress, index: usize, state: StepState) {
    if let Some(step) = progress.lock().steps.get_mut(index) {
        step.state = state;
    }
}

/// Every step pending: what the progress page shows from the moment an apply is asked
/// for (not the outcome of the previous one, which would stop its refreshes).
pub fn reset(progress: &SharedProgress) {
    *progress.lock() = Progress {
        steps: STEPS
            .iter()
            .map(|name| Step {
                name,
                state: StepState::Pending,
            })
            .collect(),
        ..Progress::default()
    };
}

/// Runs every step; the outcome is also in `progress`.
pub async fn apply(
    target: &Target,
    plan: Plan,
    options: validate::Options,
    progress: &SharedProgress,
) -> Result<(), String> {
    reset(progress);
    let outcome = run(target, plan, &options, progress).await;
    let mut p = progress.lock();
    p.finished = true;
    p.succeeded = outcome.is_ok();
    outcome
}

async fn run(
    target: &Target,
    plan: Plan,
    options: &validate::Options,
    progress: &SharedProgress,
) -> Result<(), String> {
    set(progress, 0, StepState::Running);
    let mut found = validate::all(&plan.env, options).await;
    if let Err(why) = check_admin(&target.state, plan.admin.as_ref()) {
        found.push(Check::failed("admin account", why));
    }
    let failed: Vec<String> = found
        .iter()
        .filter(|c| c.status == Status::Failed)
        .map(|c| format!("{}: {}", c.setting, c.detail))
        .collect();
    progress.lock().checks = found;
    if !failed.is_empty() {
        let why = format!("nothing was written: {}", failed.join("; "));
        set(progress, 0, StepState::Failed(why.clone()));
        return Err(why);
    }
    set(progress, 0, StepState::Done("every setting checked".into()));

    set(progress, 1, StepState::Running);
    let entries: Vec<(String, String)> = plan.env.clone().into_iter().collect();
    // Root-only: it holds passwords; systemd reads it as root before dropping privileges.
    envfile::write_atomic(&target.env_file, &entries, 0o600).map_err(|e| {
        let why = format!("cannot write {}: {e}", target.env_file.display());
        set(progress, 1, StepState::Failed(why.clone()));
        why
    })?;
    set(
        progress,
        1,
        StepState::Done(format!(
            "{} written (previous kept as .prev)",
            target.env_file.display()
        )),
    );

    set(progress, 2, StepState::Running);
    if let Err(why) = target.services.restart(&target.env_file).await {
        let rolled = rollback(target).await;
        let why = format!("{why}; {rolled}");
        set(progress, 2, StepState::Failed(why.clone()));
        return Err(why);
    }
    set(
        progress,
        2,
        StepState::Done("the appliance answers healthy".into()),
    );

    set(progress, 3, StepState::Running);
    let admin = match &plan.admin {
        Some(admin) => create_admin(&entries, admin).await,
        None => Ok("no account asked for".into()),
    };
    match admin {
        Ok(done) => set(progress, 3, StepState::Done(done)),
        Err(why) => {
            // The settings are applied and healthy: keep them, say what to do.
            set(progress, 3, StepState::Failed(why.clone()));
            return Err(why);
        }
    }

    set(progress, 4, StepState::Running);
    target
        .state
        .lock()
        .map_err(|e| format!("cannot lock the wizard: {e}"))?;
    set(
        progress,
        4,
        StepState::Done("the wizard is locked: reopen it with `km-wizard reopen`".into()),
    );
    Ok(())
}

/// The first apply needs its admin: without one no one could sign in (sign-up is closed
/// to other addresses, and a reopened wizard no longer asks). An admin given must be
/// one km accepts, checked before anything is written.
fn check_admin(state: &StateDir, admin: Option<&Admin>) -> Result<(), String> {
    match admin {
        Some(a) => km::api::oauth::check_account(&a.username, &a.email, &a.password)
            .map_err(|e| format!("admin {e}")),
        None if !state.was_applied() => Err(
            "the first admin account is required (username, email and password): without it no one could sign in"
                .into(),
        ),
        None => Ok(()),
    }
}

/// Puts the previous env file back and restarts on it.
async fn rollback(target: &Target) -> String {
    if let Err(e) = envfile::restore_previous(&target.env_file) {
        return format!("the previous settings could not be restored: {e}");
    }
    match target.services.restart(&target.env_file).await {
        Ok(()) => "the previous settings were restored and the services restarted on them".into(),
        Err(e) => {
            format!("the previous settings were restored but the services did not come back: {e}")
        }
    }
}

/// Registers the first account (it becomes the admin) on the restarted appliance.
async fn create_admin(entries: &[(String, String)], admin: &Admin) -> Result<String, String> {
    let url = format!("{}/api/oauth/register", services::api_base(entries));
    let body = serde_json::json!({
        "username": admin.username, "email": admin.email, "password": admin.password, "accept_terms": true,
    });
    let answer = services::api_client()?
        .post(&url)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("cannot reach {url}: {e}"))?;
    let status = answer.status();
    let text: serde_json::Value = answer.json().await.unwrap_or_default();
    match status.as_u16() {
        200 if text["user"]["role"] == "admin" => {
            Ok(format!("{} can sign in as admin", admin.username))
        }
        200 => Err(format!(
            "{} was created, but accounts already existed: it is not admin",
            admin.username
        )),
        403 | 409 => Ok(format!(
            "accounts already exist ({}); none created",
            text["msg"].as_str().unwrap_or("")
        )),
        _ => Err(format!(
            "the account was refused ({status}): {}",
            text["msg"].as_str().unwrap_or("")
        )),
    }
}
