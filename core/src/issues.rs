//! Issues: the exceptions of a window grouped by app, message and callsite, as the API,
//! the dashboard, the notifier and the reports show them; and what the team decided of
//! each (resolved, ignored), kept among the bucket's documents.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use km_stores::{Documents, EventKind, EventQuery, Events, StoreResult};

/// Where decisions are kept: bucket documents of this kind, by issue identifier.
const TRIAGE: &str = "issue_triage";

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
    /// Open unless someone resolved it (and it did not happen since) or ignores it.
    pub state: IssueState,
}

/// What the team decided of an issue.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IssueState {
    #[default]
    Open,
    /// Fixed: it reopens when it happens again.
    Resolved,
    /// Known and left alone: not listed among the open ones, not told.
    Ignored,
}

impl IssueState {
    pub fn as_str(self) -> &'static str {
        match self {
            IssueState::Open => "open",
            IssueState::Resolved => "resolved",
            IssueState::Ignored => "ignored",
        }
    }

    pub fn parse(text: &str) -> Option<IssueState> {
        [IssueState::Open, IssueState::Resolved, IssueState::Ignored]
            .into_iter()
            .find(|s| s.as_str() == text)
    }
}

/// A decision: the state, when and by whom.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Triage {
    pub state: IssueState,
    pub at: i64,
    pub by: String,
}

impl Triage {
    /// The bucket's decisions by issue identifier.
    pub async fn all(
        documents: &dyn Documents,
        bucket_id: &str,
    ) -> StoreResult<HashMap<String, Triage>> {
        let docs = documents.bucket_docs(bucket_id, TRIAGE).await?;
        Ok(docs
            .into_iter()
            .filter_map(|(id, doc)| Some((id, serde_json::from_str(&doc).ok()?)))
            .collect())
    }

    /// Records a decision (`Open` forgets the last one).
    pub async fn set(
        documents: &dyn Documents,
        bucket_id: &str,
        identifier: &str,
        triage: &Triage,
    ) -> StoreResult<()> {
        if triage.state == IssueState::Open {
            documents
                .delete_bucket_doc(bucket_id, TRIAGE, identifier)
                .await?;
            return Ok(());
        }
        let doc = serde_json::to_string(triage).unwrap_or_default();
        documents
            .put_bucket_doc(bucket_id, TRIAGE, identifier, &doc)
            .await
    }

    /// The state of an issue last seen at `last_seen` under this decision: a resolved
    /// issue that happened since is open again.
    pub fn state_at(&self, last_seen: i64) -> IssueState {
        match self.state {
            IssueState::Resolved if last_seen > self.at => IssueState::Open,
            state => state,
        }
    }
}

/// The dashboard's page of an issue.
pub fn issue_path(bucket_id: &str, identifier: &str) -> String {
    format!(
        "/buckets/{bucket_id}/issues/{}",
        crate::fleet::urlencode(identifier)
    )
}

/// Sets each issue's state from the bucket's decisions.
pub fn triaged(issues: &mut [Issue], decisions: &HashMap<String, Triage>) {
    for issue in issues {
        issue.state = decisions
            .get(&issue.identifier)
            .map_or(IssueState::Open, |t| t.state_at(issue.last_seen));
    }
}

/// The issues among the newest exceptions matching `query`, most recent first.
pub async fn issues(events: &dyn Events, query: EventQuery) -> StoreResult<Vec<Issue>> {
    let query = EventQuery {
        limit: ISSUE_WINDOW,
        offset: 0,
        ..query
    };
    let docs = events.query(EventKind::Exception, &query).await?;
    Ok(grouped(&docs))
}

/// Exceptions (stored documents, newest first) grouped into issues, most recent first.
pub fn grouped(docs: &[String]) -> Vec<Issue> {
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
            state: IssueState::Open,
        });
        issue.count += 1;
        issue.first_seen = issue.first_seen.min(at);
        if !issue.servers.contains(&server) {
            issue.servers.push(server);
        }
    }
    let mut issues: Vec<Issue> = by_id.into_values().collect();
    issues.sort_by_key(|i| std::cmp::Reverse(i.last_seen));
    issues
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
    fn a_resolved_issue_that_happens_again_is_open() {
        let resolved = Triage {
            state: IssueState::Resolved,
            at: 1_000,
            by: "ann".into(),
        };
        assert_eq!(resolved.state_at(999), IssueState::Resolved);
        assert_eq!(resolved.state_at(1_001), IssueState::Open);
        let ignored = Triage {
            state: IssueState::Ignored,
            ..resolved
        };
        assert_eq!(ignored.state_at(5_000), IssueState::Ignored);
        assert_eq!(IssueState::parse("ignored"), Some(IssueState::Ignored));
        assert_eq!(IssueState::parse("later"), None);
    }

    #[test]
    fn messages_come_from_the_data_or_the_string() {
        assert_eq!(message_of(&serde_json::json!({"message": "boom"})), "boom");
        assert_eq!(message_of(&serde_json::json!("plain")), "plain");
        assert_eq!(message_of(&serde_json::json!({})), "(no message)");
    }
}
