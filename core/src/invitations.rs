//! Invitations to a bucket for people without an account: kept among the bucket's
//! documents under the digest of the secret their link carries (the link itself is
//! only mailed), until accepted, revoked or expired.

use serde::{Deserialize, Serialize};

use km_stores::ids::now_ms;
use km_stores::{Documents, MemberRole, StoreResult};

/// The kind of the bucket documents they are.
const KIND: &str = "invitation";
/// How long an invitation's link works.
pub const INVITATION_TTL_MS: i64 = 7 * 24 * 3600 * 1000;
/// Pending invitations a bucket may have: more are refused until some are accepted,
/// revoked or expired (each is a document and a mail).
pub const MAX_PENDING_INVITATIONS: usize = 100;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Invitation {
    pub email: String,
    pub role: MemberRole,
    /// The username of the admin who invited.
    pub invited_by: String,
    pub created_at: i64,
    pub expires_at: i64,
}

/// A pending invitation and its id (the digest of its link's secret).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pending {
    pub id: String,
    #[serde(flatten)]
    pub invitation: Invitation,
}

impl Invitation {
    pub fn new(email: String, role: MemberRole, invited_by: String) -> Invitation {
        let now = now_ms();
        Invitation {
            email,
            role,
            invited_by,
            created_at: now,
            expires_at: now + INVITATION_TTL_MS,
        }
    }

    pub fn expired(&self) -> bool {
        self.expires_at <= now_ms()
    }

    /// The bucket's invitations that still work, oldest first.
    pub async fn pending(documents: &dyn Documents, bucket_id: &str) -> StoreResult<Vec<Pending>> {
        let mut pending: Vec<Pending> = (documents.bucket_docs(bucket_id, KIND).await?)
            .into_iter()
            .filter_map(|(id, doc)| {
                let invitation: Invitation = serde_json::from_str(&doc).ok()?;
                (!invitation.expired()).then_some(Pending { id, invitation })
            })
            .collect();
        pending.sort_by_key(|p| p.invitation.created_at);
        Ok(pending)
    }

    /// The invitation stored under `id`, expired or not.
    pub async fn find(
        documents: &dyn Documents,
        bucket_id: &str,
        id: &str,
    ) -> StoreResult<Option<Invitation>> {
        let docs = documents.bucket_docs(bucket_id, KIND).await?;
        Ok((docs.iter())
            .find(|(doc_id, _)| doc_id == id)
            .and_then(|(_, doc)| serde_json::from_str(doc).ok()))
    }

    pub async fn save(
        &self,
        documents: &dyn Documents,
        bucket_id: &str,
        id: &str,
    ) -> StoreResult<()> {
        let doc = serde_json::to_string(self).unwrap_or_default();
        documents.put_bucket_doc(bucket_id, KIND, id, &doc).await
    }

    /// Accepted or revoked: whether there was one.
    pub async fn remove(documents: &dyn Documents, bucket_id: &str, id: &str) -> StoreResult<bool> {
        documents.delete_bucket_doc(bucket_id, KIND, id).await
    }
}
