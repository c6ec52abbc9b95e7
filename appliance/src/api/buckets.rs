//! Buckets: create, list, retrieve; and `BucketAccess`, the check every bucket route
//! makes (bearer token, then membership: another user's bucket is "not found").

use axum::Json;
use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use serde::Deserialize;
use serde_json::{Value, json};

use super::Body;
use crate::auth::UserAuth;
use crate::error::{ApiError, ApiResult};
use crate::interactor::ws_url;
use km_core::app::AppState;
use km_core::bucket_settings::{BucketSettings, logging_command};
use km_core::fleet;
use km_core::limits;
use km_stores::ids::{is_object_id, new_object_id, now_ms, random_hex};
use km_stores::{Bucket, Member, MemberRole, StoreError, User};
use km_workers::notify::choices;

/// A bucket the signed-in user is a member of, with their role.
#[derive(Clone)]
pub struct BucketAccess {
    pub bucket: Bucket,
    pub role: MemberRole,
    pub auth: UserAuth,
}

impl BucketAccess {
    /// The bucket `id` if `auth`'s user is a member (anything else is "not found").
    pub async fn load(app: &AppState, auth: UserAuth, id: &str) -> ApiResult<Self> {
        let not_found = || ApiError::not_found("no such bucket");
        if !is_object_id(id) {
            return Err(not_found());
        }
        let role = app
            .documents
            .member_role(id, &auth.user.id)
            .await?
            .ok_or_else(not_found)?;
        let bucket = app
            .documents
            .bucket_by_id(id)
            .await?
            .ok_or_else(not_found)?;
        Ok(BucketAccess { bucket, role, auth })
    }
}

impl FromRequestParts<AppState> for BucketAccess {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, app: &AppState) -> Result<Self, ApiError> {
        let auth = UserAuth::from_request_parts(parts, app).await?;
        let Path(params) = Path::<Vec<(String, String)>>::from_request_parts(parts, app)
            .await
            .map_err(|_| ApiError::not_found("no such bucket"))?;
        let id = params
            .iter()
            .find(|(k, _)| k == "id")
            .map(|(_, v)| v.as_str())
            .unwrap_or_default();
        BucketAccess::load(app, auth, id).await
    }
}

/// The bucket as clients see it, with where agents and browsers connect.
pub fn bucket_json(app: &AppState, bucket: &Bucket) -> Value {
    let mut v = json!(bucket);
    v["node"] = json!({
        "endpoints": {
            "web": app.public_url,
            "realtime": app.public_url,
            "ws": ws_url(&app.public_url),
        }
    });
    v
}

#[derive(Deserialize)]
pub struct CreateForm {
    #[serde(default)]
    pub name: String,
}

fn bucket_name(name: &str) -> ApiResult<&str> {
    let name = name.trim();
    if name.is_empty() || name.chars().count() > 100 {
        return Err(ApiError::bad_request("name: 1 to 100 characters"));
    }
    Ok(name)
}

/// `POST /api/bucket/create_classic`.
pub async fn create(
    State(app): State<AppState>,
    auth: UserAuth,
    Body(form): Body<CreateForm>,
) -> ApiResult<Json<Value>> {
    let name = bucket_name(&form.name)?;
    // Public ids are unique; a collision of 64 random bits is retried, not reported.
    for _ in 0..3 {
        let bucket = Bucket {
            id: new_object_id(),
            name: name.to_string(),
            public_id: random_hex(8),
            secret_id: random_hex(16),
            owner: auth.user.id.clone(),
            created_at: now_ms(),
            disabled: false,
        };
        match app.documents.insert_bucket(&bucket).await {
            Ok(()) => {
                tracing::info!(bucket = %bucket.id, user = %auth.user.username, "bucket created");
                return Ok(Json(json!({ "bucket": bucket_json(&app, &bucket) })));
            }
            Err(StoreError::Conflict("public_id")) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict(
        "could not pick a unique public key; try again",
    ))
}

/// `GET /api/bucket/`: the buckets the user belongs to.
pub async fn list(State(app): State<AppState>, auth: UserAuth) -> ApiResult<Json<Vec<Value>>> {
    let buckets = app.documents.buckets_of_user(&auth.user.id).await?;
    Ok(Json(buckets.iter().map(|b| bucket_json(&app, b)).collect()))
}

/// `GET /api/bucket/:id`.
pub async fn retrieve(State(app): State<AppState>, access: BucketAccess) -> Json<Value> {
    Json(bucket_json(&app, &access.bucket))
}

impl BucketAccess {
    /// Refuses (403) unless the member's role includes `needed`; `what` says what was
    /// attempted.
    pub fn require(&self, needed: MemberRole, what: &str) -> ApiResult<()> {
        if self.role.includes(needed) {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "a {} of this bucket cannot {what} (needs {})",
                self.role.as_str(),
                needed.as_str()
            )))
        }
    }
}

/// `PUT /api/bucket/:id`: renames the bucket (admins).
pub async fn update(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<UpdateForm>,
) -> ApiResult<Json<Value>> {
    access.require(MemberRole::Admin, "change it")?;
    let disabled = flag("disabled", &form.disabled)?;
    let collect_logs = flag("collect_logs", &form.collect_logs)?;
    if form.name.is_none() && disabled.is_none() && collect_logs.is_none() {
        return Err(ApiError::bad_request(
            "name, disabled or collect_logs: nothing to change",
        ));
    }
    let mut bucket = access.bucket;
    if let Some(name) = &form.name {
        let name = bucket_name(name)?;
        if !app.documents.rename_bucket(&bucket.id, name).await? {
            return Err(ApiError::not_found("no such bucket"));
        }
        bucket.name = name.to_string();
    }
    if let Some(disabled) = disabled {
        if !app
            .documents
            .set_bucket_disabled(&bucket.id, disabled)
            .await?
        {
            return Err(ApiError::not_found("no such bucket"));
        }
        bucket.disabled = disabled;
        if disabled {
            app.bus.evict(&bucket.id).await;
        }
        tracing::info!(bucket = %bucket.id, user = %access.auth.user.username, disabled, "bucket agents {}", if disabled { "refused" } else { "admitted" });
    }
    let mut settings = BucketSettings::load(app.documents.as_ref(), &bucket.id).await?;
    if let Some(collect_logs) = collect_logs {
        settings.collect_logs = collect_logs;
        settings.save(app.documents.as_ref(), &bucket.id).await?;
        tell_agents_to_log(&app, &bucket.id, collect_logs, &access.auth.user.username).await;
    }
    let mut json = bucket_json(&app, &bucket);
    json["settings"] = json!(settings);
    Ok(Json(json))
}

/// Starts (or stops) the log sending of every agent of the bucket connected now; the
/// others are asked when they link.
async fn tell_agents_to_log(app: &AppState, bucket_id: &str, on: bool, by: &str) {
    let (channel, payload) = logging_command(on);
    for server in fleet::servers(app, bucket_id, None).await {
        if !server.online {
            continue;
        }
        let name = &server.server_name;
        let command =
            fleet::command_agent(app, bucket_id, (name, None), channel, payload.clone(), by);
        if let Err(e) = command.await {
            tracing::warn!(error = %e, server = %name, "log sending not changed");
        }
    }
}

/// `PUT /api/bucket/:id`: a new name, `disabled` to refuse the bucket's agents, and/or
/// `collect_logs` (agents send their logs all the time, or only while someone watches).
#[derive(Deserialize, Default)]
pub struct UpdateForm {
    #[serde(default)]
    pub name: Option<String>,
    /// `true`/`false` (JSON or form).
    #[serde(default)]
    pub disabled: Option<Value>,
    /// `true`/`false` (JSON or form).
    #[serde(default)]
    pub collect_logs: Option<Value>,
}

/// A true/false field of a JSON body or a form.
fn flag(name: &str, value: &Option<Value>) -> ApiResult<Option<bool>> {
    match value {
        None => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(Value::String(s)) if s == "true" || s == "1" => Ok(Some(true)),
        Some(Value::String(s)) if s == "false" || s == "0" => Ok(Some(false)),
        Some(other) => Err(ApiError::bad_request(format!(
            "{name}: {other} is not true or false"
        ))),
    }
}

/// `DELETE /api/bucket/:id`: deletes the bucket, its members and servers (owner only).
/// Stored events age out with retention.
pub async fn destroy(State(app): State<AppState>, access: BucketAccess) -> ApiResult<Json<Value>> {
    access.require(MemberRole::Owner, "delete it")?;
    app.documents.delete_bucket(&access.bucket.id).await?;
    app.sessions.remove_bucket(&access.bucket.id);
    tracing::info!(bucket = %access.bucket.id, user = %access.auth.user.username, "bucket deleted");
    Ok(Json(json!({ "deleted": true, "_id": access.bucket.id })))
}

/// `GET /api/bucket/:id/users_authorized`.
pub async fn members(
    State(app): State<AppState>,
    access: BucketAccess,
) -> ApiResult<Json<Vec<Member>>> {
    Ok(Json(app.documents.bucket_members(&access.bucket.id).await?))
}

/// `POST /api/bucket/:id/manage_notif` `{email, state, kinds}`: whether a member is
/// mailed the bucket's notifications (`state`: `email`, `none`, or `default`: as their
/// role has it) and which kinds they mute (`kinds`: `{kind: false}`, `true` to unmute).
/// Members choose for themselves; admins for anyone. Answers every member's state.
pub async fn manage_notif(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<NotifyForm>,
) -> ApiResult<Json<Value>> {
    let notify = match form.state.as_str() {
        "email" => Some(Some(true)),
        "none" => Some(Some(false)),
        "default" => Some(None),
        "" if form.kinds.is_some() => None,
        other => {
            return Err(ApiError::bad_request(format!(
                "state: {other:?} is not email, none or default"
            )));
        }
    };
    let documents = app.documents.as_ref();
    let bucket_id = &access.bucket.id;
    let members = documents.bucket_members(bucket_id).await?;
    let wanted = form.email.trim();
    let target = members
        .iter()
        .find(|m| m.email.eq_ignore_ascii_case(wanted) || m.username == wanted)
        .ok_or_else(|| ApiError::not_found(format!("{wanted:?} is not a member of this bucket")))?;
    if target.user_id != access.auth.user.id {
        access.require(MemberRole::Admin, "choose for another member")?;
    }
    if let Some(kinds) = &form.kinds {
        let mut choices = choices::of(documents, bucket_id, &target.user_id).await?;
        let kinds = kinds.iter().map(|(kind, on)| (kind.as_str(), on.as_bool()));
        let kinds: Option<Vec<(&str, bool)>> = kinds.map(|(k, on)| Some((k, on?))).collect();
        let kinds = kinds.ok_or_else(|| ApiError::bad_request("kinds: {kind: true|false}"))?;
        choices.set_kinds(kinds).map_err(ApiError::bad_request)?;
        choices::save(documents, bucket_id, &target.user_id, &choices).await?;
    }
    if let Some(notify) = notify {
        documents
            .set_member_notify(bucket_id, &target.user_id, notify)
            .await?;
    }
    let chosen = choices::all(documents, bucket_id).await?;
    let members = documents.bucket_members(bucket_id).await?;
    Ok(Json(Value::Array(
        members
            .iter()
            .map(|m| {
                let muted = chosen
                    .get(&m.user_id)
                    .map(|c| c.muted.clone())
                    .unwrap_or_default();
                json!({
                    "email": m.email,
                    "username": m.username,
                    "role": m.role.as_str(),
                    "state": if m.receives_mail() { "email" } else { "none" },
                    "muted": muted,
                })
            })
            .collect(),
    )))
}

#[derive(Deserialize, Default)]
pub struct NotifyForm {
    /// Email or username of a member.
    #[serde(default)]
    pub email: String,
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub kinds: Option<serde_json::Map<String, Value>>,
}

/// `GET /api/bucket/:id/current_role`.
pub async fn current_role(access: BucketAccess) -> Json<Value> {
    Json(json!({ "role": access.role.as_str() }))
}

/// `GET /api/bucket/:id/usage`: the processes in use across the appliance, the licence's
/// limit, and this bucket's servers parked by it.
pub async fn usage(State(app): State<AppState>, access: BucketAccess) -> ApiResult<Json<Value>> {
    let usage = limits::usage(&app, Some(&access.bucket.id)).await?;
    Ok(Json(json!(usage)))
}

#[derive(Deserialize, Default, Clone)]
pub struct MemberForm {
    /// Email or username of an existing account (or the email of an invitation).
    #[serde(default, alias = "username")]
    pub email: String,
    #[serde(default)]
    pub role: Option<String>,
}

/// The account a member form names, and the role it asks for (never owner).
async fn member_target(
    app: &AppState,
    form: &MemberForm,
    default_role: Option<MemberRole>,
) -> ApiResult<(User, MemberRole)> {
    let role = requested_role(form, default_role)?;
    let login = form.email.trim();
    let user = account_of(app, login).await?.ok_or_else(|| {
        ApiError::not_found(format!(
            "no account {login:?}: invite them by email to create one"
        ))
    })?;
    Ok((user, role))
}

/// The role a member form asks for (never owner), `default_role` if it names none.
pub(super) fn requested_role(
    form: &MemberForm,
    default_role: Option<MemberRole>,
) -> ApiResult<MemberRole> {
    match (form.role.as_deref().map(str::trim)).filter(|r| !r.is_empty()) {
        Some(r) => MemberRole::parse(r)
            .filter(|r| *r != MemberRole::Owner)
            .ok_or_else(|| {
                ApiError::bad_request(format!("role: {r:?} is not admin, developer or read_only"))
            }),
        None => {
            default_role.ok_or_else(|| ApiError::bad_request("role: admin, developer or read_only"))
        }
    }
}

/// The account of an email or username (emails are stored in lower case).
pub(crate) async fn account_of(app: &AppState, login: &str) -> ApiResult<Option<User>> {
    if login.is_empty() {
        return Err(ApiError::bad_request(
            "email: the member's email or username",
        ));
    }
    Ok(
        match app.documents.user_by_login(&login.to_lowercase()).await? {
            Some(user) => Some(user),
            None => app.documents.user_by_login(login).await?,
        },
    )
}

/// Refuses to change the owner's membership.
fn not_owner(access: &BucketAccess, user: &User) -> ApiResult<()> {
    if user.id == access.bucket.owner {
        return Err(ApiError::bad_request(
            "the owner's role cannot be changed or removed (transfer the ownership first)",
        ));
    }
    Ok(())
}

/// `POST /api/bucket/:id/add_user` `{email, role}` (admins; default role developer).
pub async fn add_member(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<MemberForm>,
) -> ApiResult<Json<Vec<Member>>> {
    access.require(MemberRole::Admin, "add members")?;
    let (user, role) = member_target(&app, &form, Some(MemberRole::Developer)).await?;
    not_owner(&access, &user)?;
    if app
        .documents
        .member_role(&access.bucket.id, &user.id)
        .await?
        .is_some()
    {
        return Err(ApiError::conflict(format!(
            "{} is already a member",
            user.username
        )));
    }
    app.documents
        .set_member(&access.bucket.id, &user.id, role)
        .await?;
    members(State(app), access).await
}

/// `POST /api/bucket/:id/promote_user` `{email, role}` (admins).
pub async fn set_member_role(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<MemberForm>,
) -> ApiResult<Json<Vec<Member>>> {
    access.require(MemberRole::Admin, "change roles")?;
    let (user, role) = member_target(&app, &form, None).await?;
    not_owner(&access, &user)?;
    if app
        .documents
        .member_role(&access.bucket.id, &user.id)
        .await?
        .is_none()
    {
        return Err(ApiError::not_found(format!(
            "{} is not a member",
            user.username
        )));
    }
    app.documents
        .set_member(&access.bucket.id, &user.id, role)
        .await?;
    members(State(app), access).await
}

/// `POST /api/bucket/:id/remove_user` `{email}` (admins).
pub async fn remove_member(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<MemberForm>,
) -> ApiResult<Json<Vec<Member>>> {
    access.require(MemberRole::Admin, "remove members")?;
    let (user, _) = member_target(&app, &form, Some(MemberRole::ReadOnly)).await?;
    not_owner(&access, &user)?;
    if !app
        .documents
        .remove_member(&access.bucket.id, &user.id)
        .await?
    {
        return Err(ApiError::not_found(format!(
            "{} is not a member",
            user.username
        )));
    }
    members(State(app), access).await
}

/// `GET /api/bucket/:id/meta_servers`: every known server, without process details.
pub async fn servers(State(app): State<AppState>, access: BucketAccess) -> Json<Vec<Value>> {
    let servers = app
        .sessions
        .of_bucket(&access.bucket.id, None)
        .iter()
        .map(|s| s.meta())
        .collect();
    Json(servers)
}

#[derive(Deserialize)]
pub struct ServerForm {
    #[serde(default)]
    pub server_name: String,
}

/// `POST /api/bucket/:id/data/deleteServer` `{server_name}` (admins): forgets an offline
/// server (a connected one would come back at its next status).
pub async fn delete_server(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<ServerForm>,
) -> ApiResult<Json<Value>> {
    access.require(MemberRole::Admin, "delete servers")?;
    let name = form.server_name.as_str();
    if app
        .sessions
        .get(&access.bucket.id, name)
        .is_some_and(|s| s.online())
    {
        return Err(ApiError::conflict(format!(
            "server {name:?} is connected: run `pm2 unlink` (or stop its agent) on it first"
        )));
    }
    let known = app.sessions.remove(&access.bucket.id, name);
    let stored = app.documents.delete_server(&access.bucket.id, name).await?;
    if !known && !stored {
        return Err(ApiError::not_found(format!(
            "no server {name:?} in this bucket"
        )));
    }
    Ok(Json(json!({ "deleted": true, "server_name": name })))
}
