//! A bucket's own settings, kept among its documents: for now whether its agents are
//! asked to send their logs all the time.

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use km_stores::{Documents, StoreResult};

/// Where the settings are kept: (kind, id) of a bucket document.
const DOC: (&str, &str) = ("settings", "bucket");

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct BucketSettings {
    /// Each agent is asked to send its logs (soon after it links or reconnects, then
    /// every minute), so that they are stored with no one watching: agents send logs
    /// only when asked, for 120 s.
    pub collect_logs: bool,
}

impl Default for BucketSettings {
    fn default() -> Self {
        BucketSettings { collect_logs: true }
    }
}

impl BucketSettings {
    /// The bucket's settings (the defaults until someone changes one; a document that
    /// does not read gives the defaults too).
    pub async fn load(documents: &dyn Documents, bucket_id: &str) -> StoreResult<BucketSettings> {
        let docs = documents.bucket_docs(bucket_id, DOC.0).await?;
        Ok((docs.iter())
            .find(|(id, _)| id == DOC.1)
            .and_then(|(_, doc)| serde_json::from_str(doc).ok())
            .unwrap_or_default())
    }

    pub async fn save(&self, documents: &dyn Documents, bucket_id: &str) -> StoreResult<()> {
        let doc = serde_json::to_string(self).unwrap_or_default();
        documents
            .put_bucket_doc(bucket_id, DOC.0, DOC.1, &doc)
            .await
    }
}

/// The command that starts (or stops) an agent's log sending: `trigger:pm2:action`
/// with its `parameters` (an agent crashes on a `trigger:pm2:action` without them).
pub fn logging_command(on: bool) -> (&'static str, Value) {
    let method = if on { "startLogging" } else { "stopLogging" };
    (
        "trigger:pm2:action",
        json!({"method_name": method, "parameters": {}}),
    )
}
