//! Commands to agents. Each request is checked in full before anything is sent: the
//! agent crashes on a command without the fields it needs.

use axum::Json;
use axum::extract::State;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::Body;
use super::buckets::BucketAccess;
use crate::error::{ApiError, ApiResult};
use km_core::app::AppState;
use km_core::fleet;
use km_stores::MemberRole;

/// PM2 methods an agent accepts from the dashboard.
const PM2_METHODS: [&str; 7] = [
    "restart",
    "reload",
    "reset",
    "scale",
    "ping",
    "startLogging",
    "stopLogging",
];

fn required(value: Option<String>, field: &str) -> ApiResult<String> {
    value
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .ok_or_else(|| ApiError::bad_request(format!("{field}: required")))
}

/// A process id given as a number or a digit string.
fn process_id(v: &Option<Value>, field: &str) -> ApiResult<Option<u64>> {
    let parsed = match v {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Number(n)) => n.as_u64(),
        Some(Value::String(s)) => s.trim().parse().ok(),
        Some(_) => None,
    };
    parsed.map(Some).ok_or_else(|| {
        ApiError::bad_request(format!("{field}: expected a process id (a whole number)"))
    })
}

/// Sends `channel`/`payload` to the agent for a member who may (developers and up).
async fn send(
    app: &AppState,
    access: &BucketAccess,
    server_name: &str,
    app_name: Option<&str>,
    channel: &str,
    payload: Value,
) -> ApiResult<()> {
    access.require(MemberRole::Developer, "send commands to agents")?;
    let by = &access.auth.user.username;
    let target = (server_name, app_name);
    Ok(fleet::command_agent(app, &access.bucket.id, target, channel, payload, by).await?)
}

#[derive(Deserialize)]
pub struct Pm2Action {
    server_name: Option<String>,
    method_name: Option<String>,
    app_name: Option<String>,
    #[serde(alias = "pm_id", alias = "process_id")]
    id: Option<Value>,
    /// For `scale`: a count, or `"+N"` / `"-N"`.
    number: Option<Value>,
}

/// The `parameters` of a `trigger:pm2:action`.
fn pm2_parameters(
    method: &str,
    app_name: Option<String>,
    id: Option<u64>,
    number: Option<Value>,
) -> ApiResult<Value> {
    let mut params = Map::new();
    match (app_name, id) {
        (Some(name), _) => params.insert("name".into(), name.into()),
        (None, Some(id)) => params.insert("id".into(), id.into()),
        (None, None) if matches!(method, "startLogging" | "stopLogging") => None,
        (None, None) => {
            return Err(ApiError::bad_request(format!(
                "app_name (or id): required by {method}"
            )));
        }
    };
    if method == "scale" {
        let number = match number {
            Some(Value::Number(n)) if n.as_u64().is_some() => Value::Number(n),
            Some(Value::String(s)) if is_scale_delta(&s) => Value::String(s),
            _ => {
                return Err(ApiError::bad_request(
                    "number: scale needs a count or \"+N\"/\"-N\"",
                ));
            }
        };
        params.insert("number".into(), number);
    }
    Ok(Value::Object(params))
}

fn is_scale_delta(s: &str) -> bool {
    let digits = s
        .strip_prefix('+')
        .or_else(|| s.strip_prefix('-'))
        .unwrap_or(s);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// `POST /api/bucket/:id/actions/triggerPM2`: restart, reload, reset, scale, ping, logging.
pub async fn trigger_pm2(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<Pm2Action>,
) -> ApiResult<Json<Value>> {
    let server_name = required(form.server_name, "server_name")?;
    let method = required(form.method_name, "method_name")?;
    if !PM2_METHODS.contains(&method.as_str()) {
        return Err(ApiError::bad_request(format!(
            "method_name: {method:?} is not one of {}",
            PM2_METHODS.join(", ")
        )));
    }
    let app_name = form
        .app_name
        .map(|n| n.trim().to_string())
        .filter(|n| !n.is_empty());
    let id = process_id(&form.id, "id")?;
    let parameters = pm2_parameters(&method, app_name.clone(), id, form.number)?;
    let payload = json!({ "method_name": method, "parameters": parameters });
    send(
        &app,
        &access,
        &server_name,
        app_name.as_deref(),
        "trigger:pm2:action",
        payload,
    )
    .await?;
    Ok(Json(json!({ "success": true })))
}

#[derive(Deserialize)]
pub struct CustomAction {
    server_name: Option<String>,
    action_name: Option<String>,
    app_name: Option<String>,
    #[serde(alias = "pm_id")]
    process_id: Option<Value>,
    opts: Option<Value>,
}

impl CustomAction {
    /// `(server_name, action_name, process_id, app_name, opts)`, all checked.
    fn checked(self) -> ApiResult<(String, String, u64, Option<String>, Value)> {
        let server_name = required(self.server_name, "server_name")?;
        let action_name = required(self.action_name, "action_name")?;
        let id = process_id(&self.process_id, "process_id")?.ok_or_else(|| {
            ApiError::bad_request("process_id: required (the pm_id of the process)")
        })?;
        let opts = match self.opts {
            None | Some(Value::Null) => json!({}),
            Some(opts @ Value::Object(_)) => opts,
            Some(_) => return Err(ApiError::bad_request("opts: must be an object")),
        };
        Ok((server_name, action_name, id, self.app_name, opts))
    }
}

/// `POST /api/bucket/:id/actions/trigger`: a custom action of an app (`io.action`).
pub async fn trigger(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<CustomAction>,
) -> ApiResult<Json<Value>> {
    let (server_name, action_name, id, app_name, opts) = form.checked()?;
    let payload = json!({ "action_name": action_name, "process_id": id, "opts": opts });
    send(
        &app,
        &access,
        &server_name,
        app_name.as_deref(),
        "trigger:action",
        payload,
    )
    .await?;
    Ok(Json(json!({ "success": true })))
}

/// `POST /api/bucket/:id/actions/triggerScopedAction`: a long-running action whose
/// messages carry the returned `uuid`.
pub async fn trigger_scoped(
    State(app): State<AppState>,
    access: BucketAccess,
    Body(form): Body<CustomAction>,
) -> ApiResult<Json<Value>> {
    let (server_name, action_name, id, app_name, opts) = form.checked()?;
    let uuid = uuid::Uuid::new_v4().to_string();
    let payload =
        json!({ "action_name": action_name, "process_id": id, "opts": opts, "uuid": uuid });
    send(
        &app,
        &access,
        &server_name,
        app_name.as_deref(),
        "trigger:scoped_action",
        payload.clone(),
    )
    .await?;
    Ok(Json(
        json!({ "success": true, "uuid": uuid, "action": payload }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pm2_parameters_name_or_id_and_scale_number() {
        assert_eq!(
            pm2_parameters("restart", Some("api".into()), None, None).unwrap(),
            json!({"name": "api"})
        );
        assert_eq!(
            pm2_parameters("ping", None, Some(3), None).unwrap(),
            json!({"id": 3})
        );
        assert_eq!(
            pm2_parameters("startLogging", None, None, None).unwrap(),
            json!({})
        );
        assert!(pm2_parameters("restart", None, None, None).is_err());
        assert_eq!(
            pm2_parameters("scale", Some("api".into()), None, Some(json!("+1"))).unwrap(),
            json!({"name": "api", "number": "+1"})
        );
        assert!(pm2_parameters("scale", Some("api".into()), None, Some(json!("two"))).is_err());
        assert!(pm2_parameters("scale", Some("api".into()), None, None).is_err());
    }
}
