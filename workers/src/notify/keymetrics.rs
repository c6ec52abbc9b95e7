//! The webhook's bodies in the Keymetrics shape (`format: keymetrics`), for receivers
//! written for the original service: one body per item of a notification,
//! `{"event": "event:<kind>", "data": {...}}`.
//!
//! A new or reopened issue is `event:new_exception` with the fields Keymetrics documented:
//! `data.process {pm_id, name, rev, server}`, `data.data {message, stack}`, `at`,
//! `created_at`, `updated_at`, `count`, `identifier`, `infected_servers`, `timestamps`,
//! `commits` and `bucket_url`. km keeps no revision per exception: `rev` is null and
//! `commits` empty. Every other kind (`server_offline`, `alert_fired`, …) is
//! `event:<kind>` with `data.process {pm_id, name, server}` (what the item names), `data.data`
//! (km's item as is), `at` and `bucket_url`.

use serde_json::{Value, json};

/// The bodies of the notification whose km payload is `payload`.
pub fn bodies(payload: &Value) -> Vec<String> {
    let kind = payload["type"].as_str().unwrap_or("notification");
    let items = payload["items"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if items.is_empty() {
        let data = json!({"data": {"subject": payload["subject"]}, "at": payload["at"], "bucket_url": payload["link"]});
        return vec![json!({"event": format!("event:{kind}"), "data": data}).to_string()];
    }
    items
        .iter()
        .map(|item| match kind {
            "new_issue" => json!({"event": "event:new_exception", "data": exception(item)}),
            _ => json!({"event": format!("event:{kind}"), "data": other(payload, item)}),
        })
        .map(|body| body.to_string())
        .collect()
}

fn exception(item: &Value) -> Value {
    let servers = &item["server_names"];
    json!({
        "process": {
            "pm_id": item["pm_id"], "name": item["app"], "rev": null,
            "server": servers.get(0).cloned().unwrap_or(Value::Null),
        },
        "data": {"message": item["message"], "stack": item["stack"]},
        "at": item["last_seen"],
        "created_at": item["first_seen"],
        "updated_at": item["last_seen"],
        "count": item["count"],
        "identifier": item["identifier"],
        "infected_servers": servers,
        "timestamps": [item["last_seen"]],
        "commits": [],
        "bucket_url": item["link"],
    })
}

fn other(payload: &Value, item: &Value) -> Value {
    json!({
        "process": {"pm_id": item.get("pm_id"), "name": item.get("app"), "server": item.get("server")},
        "data": item,
        "at": payload["at"],
        "bucket_url": payload["link"],
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_issue_is_a_new_exception_as_keymetrics_posted_it() {
        let payload = json!({"type": "new_issue", "at": 5, "link": "https://km/buckets/b/issues", "items": [
            {"app": "api", "message": "Bad argument", "count": 3, "identifier": "ad6f", "first_seen": 1,
             "last_seen": 4, "server_names": ["web-1", "web-2"], "pm_id": 9, "stack": "TypeError: Bad argument",
             "link": "https://km/buckets/b/issues/ad6f"},
            {"app": "api", "message": "other", "server_names": []},
        ]});
        let bodies: Vec<Value> = bodies(&payload)
            .iter()
            .map(|b| serde_json::from_str(b).unwrap())
            .collect();
        assert_eq!(bodies.len(), 2, "one body per issue");
        assert_eq!(
            bodies[0],
            json!({"event": "event:new_exception", "data": {
                "process": {"pm_id": 9, "name": "api", "rev": null, "server": "web-1"},
                "data": {"message": "Bad argument", "stack": "TypeError: Bad argument"},
                "at": 4, "created_at": 1, "updated_at": 4, "count": 3, "identifier": "ad6f",
                "infected_servers": ["web-1", "web-2"], "timestamps": [4], "commits": [],
                "bucket_url": "https://km/buckets/b/issues/ad6f"}})
        );
        assert_eq!(bodies[1]["data"]["process"]["server"], Value::Null);
    }

    #[test]
    fn other_kinds_share_the_envelope() {
        let payload = json!({"type": "server_offline", "at": 7, "link": "https://km/buckets/b", "items": [{"server": "web-1", "since": 3}]});
        let body: Value = serde_json::from_str(&bodies(&payload)[0]).unwrap();
        assert_eq!(body["event"], "event:server_offline");
        assert_eq!(
            body["data"]["process"],
            json!({"pm_id": null, "name": null, "server": "web-1"})
        );
        assert_eq!(body["data"]["data"], json!({"server": "web-1", "since": 3}));
        assert_eq!(
            (
                body["data"]["at"].clone(),
                body["data"]["bucket_url"].clone()
            ),
            (json!(7), json!("https://km/buckets/b"))
        );
        let empty =
            bodies(&json!({"type": "report", "subject": "s", "at": 1, "link": "l", "items": []}));
        assert_eq!(empty.len(), 1);
    }
}
