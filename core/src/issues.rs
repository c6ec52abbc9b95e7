//! Issues: the exceptions of a window grouped by app, message and callsite, as the API,
//! the dashboard, the notifier and the reports show them.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use km_stores::{EventKind, EventQuery, Events, StoreResult};

/// Exceptions read to group issues: the newest this many in the window.
pub const ISSUE_WINDOW: u32 = 1_000;
/// Exceptions with the same app, message and callsite.
#[derive(Debug, Serialize)]
pub struct Issue {
    pub identifier: String,
    pub app_name: Option<String>,
    pub message: String,
    pub callsite: Option<String>,
    pub count: u64,
    pub first_seen: i64,
    pub last_seen: i64,
    pub servers: Vec<String>,
    /// The newest occurrence (with stack, context and last logs).
    pub last: Value,
}

/// The issues among the newest exceptions matching `query`, most recent first.
pub async fn issues(events: &dyn Events, query: EventQuery) -> StoreResult<Vec<Issue>> {
    let query = EventQuery {
        limit: ISSUE_WINDOW,
        offset: 0,
        ..query
    };
    let docs = events.query(EventKind::Exception, &query).await?;
    let mut by_id: BTreeMap<String, Issue> = BTreeMap::new();
    for doc in docs
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
    {
        let at = doc["at"].as_i64().unwrap_or(0);
        let server = doc["server_name"].as_str().unwrap_or("").to_string();
        let Some(identifier) = doc["issue"].as_str().map(str::to_string) else {
            continue;
        };
        let issue = by_id.entry(identifier.clone()).or_insert_with(|| Issue {
            identifier,
            app_name: doc["app_name"].as_str().map(str::to_string),
            message: message_of(&doc["data"]),
            callsite: doc["data"]["callsite"].as_str().map(str::to_string),
            count: 0,
            first_seen: at,
            last_seen: at,
            servers: Vec::new(),
            last: doc.clone(),
        });
        issue.count += 1;
        issue.first_seen = issue.first_seen.min(at);
        if !issue.servers.contains(&server) {
            issue.servers.push(server);
        }
    }
    let mut issues: Vec<Issue> = by_id.into_values().collect();
    issues.sort_by_key(|i| std::cmp::Reverse(i.last_seen));
    Ok(issues)
}

impl Issue {
    fn text(&self, field: &str) -> &str {
        self.last["data"][field].as_str().unwrap_or("")
    }

    pub fn stack(&self) -> &str {
        self.text("stack")
    }

    pub fn context(&self) -> &str {
        self.text("context")
    }

    /// The log lines printed before the newest occurrence.
    pub fn last_logs(&self) -> String {
        self.last["data"]["last_logs"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect()
    }
}

fn message_of(data: &Value) -> String {
    data["message"]
        .as_str()
        .or(data.as_str())
        .unwrap_or("(no message)")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_come_from_the_data_or_the_string() {
        assert_eq!(message_of(&serde_json::json!({"message": "boom"})), "boom");
        assert_eq!(message_of(&serde_json::json!("plain")), "plain");
        assert_eq!(message_of(&serde_json::json!({})), "(no message)");
    }
}
