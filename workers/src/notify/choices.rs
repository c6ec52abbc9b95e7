//! What each member of a bucket chose to receive: the kinds of notification they muted
//! (mail) and the reports they want. A bucket document per member (kind `member`, id the
//! user's id); a member who never chose gets every kind and no report.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::reporter::Period;
use km_stores::{Documents, StoreResult};

const KIND: &str = "member";

/// The kinds a member can mute, with the words the dashboard shows.
pub const KINDS: [(&str, &str); 10] = [
    ("new_issue", "new issues"),
    ("server_offline", "servers offline"),
    ("server_online", "servers back online"),
    ("process_errored", "errored processes"),
    ("restart_loop", "restart loops"),
    ("deployment", "deployments"),
    ("alert_fired", "alerts fired"),
    ("alert_resolved", "alerts resolved"),
    ("alert_sample", "alert tests"),
    ("custom_event", "custom events subscribed to"),
];

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Choices {
    #[serde(default)]
    pub daily: bool,
    #[serde(default)]
    pub weekly: bool,
    /// Kinds not mailed to this member.
    #[serde(default)]
    pub muted: BTreeSet<String>,
}

impl Choices {
    pub fn wants(&self, period: Period) -> bool {
        match period {
            Period::Daily => self.daily,
            Period::Weekly => self.weekly,
        }
    }

    pub fn receives(&self, kind: &str) -> bool {
        !self.muted.contains(kind)
    }

    /// Mutes or unmutes kinds: `{kind: bool}`; an unknown kind is an error naming the
    /// known ones.
    pub fn set_kinds<'a>(
        &mut self,
        kinds: impl IntoIterator<Item = (&'a str, bool)>,
    ) -> Result<(), String> {
        for (kind, on) in kinds {
            if !KINDS.iter().any(|(k, _)| *k == kind) {
                let known: Vec<&str> = KINDS.iter().map(|(k, _)| *k).collect();
                return Err(format!("kinds.{kind}: not one of {}", known.join(", ")));
            }
            if on {
                self.muted.remove(kind);
            } else {
                self.muted.insert(kind.to_string());
            }
        }
        Ok(())
    }
}

/// Every member's choices in the bucket, by user id.
pub async fn all(
    documents: &dyn Documents,
    bucket_id: &str,
) -> StoreResult<BTreeMap<String, Choices>> {
    Ok(documents
        .bucket_docs(bucket_id, KIND)
        .await?
        .into_iter()
        .filter_map(|(user, doc)| Some((user, serde_json::from_str(&doc).ok()?)))
        .collect())
}

pub async fn of(documents: &dyn Documents, bucket_id: &str, user_id: &str) -> StoreResult<Choices> {
    Ok(all(documents, bucket_id)
        .await?
        .remove(user_id)
        .unwrap_or_default())
}

pub async fn save(
    documents: &dyn Documents,
    bucket_id: &str,
    user_id: &str,
    choices: &Choices,
) -> StoreResult<()> {
    let doc = json!(choices).to_string();
    documents
        .put_bucket_doc(bucket_id, KIND, user_id, &doc)
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_are_muted_and_unmuted_by_name() {
        let mut c = Choices::default();
        assert!(c.receives("deployment"));
        c.set_kinds([("deployment", false), ("new_issue", false)])
            .unwrap();
        c.set_kinds([("new_issue", true)]).unwrap();
        assert!(!c.receives("deployment") && c.receives("new_issue"));
        let err = c.set_kinds([("deploy", false)]).unwrap_err();
        assert!(
            err.contains("kinds.deploy") && err.contains("deployment"),
            "{err}"
        );
    }
}
