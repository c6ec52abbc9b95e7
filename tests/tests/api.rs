//! End-to-end tests of km's HTTP API without an agent: accounts, tokens, buckets and the
//! agent's verify call. Each test starts its own km.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use anyhow::{Context, ensure};
use km_e2e::{Km, e2e, show};
use serde_json::json;

#[tokio::test]
async fn register_login_refresh_revoke() {
    e2e(async {
    let km = Km::start().await?;
    let api = km.api();
    let alice = api
        .register("alice", "alice@example.com", "pw-alice-123")
        .await?;
    ensure!(
        alice.raw["token_type"] == "Bearer"
            && alice.raw["refresh_token"].is_string()
            && alice.raw["user"]["username"] == "alice"
            && alice.raw["user"]["email"] == "alice@example.com",
        "register answer: {}",
        show(&alice.raw, 3000)
    );
    ensure!(
        !alice.raw.to_string().contains("pw-alice-123"),
        "register answer reveals the password: {}",
        alice.raw
    );
    // Taken username or email: 409.
    for (u, e) in [
        ("alice", "other@example.com"),
        ("other", "alice@example.com"),
    ] {
        let r = api
            .post(
                "/api/oauth/register",
                &json!({"username": u, "email": e, "password": "pw-other-123", "accept_terms": 1}),
            )
            .await?;
        ensure!(
            r.status == 409,
            "register with a taken username/email ({u}, {e}): expected 409, got {}: {}",
            r.status,
            r.text
        );
    }
    let me = alice
        .api
        .get_ok("/api/users/isLogged")
        .await
        .context("the register answer's access token")?;
    ensure!(
        me["username"] == "alice" && me["_id"] == alice.id.as_str(),
        "isLogged: {}",
        show(&me, 2000)
    );
    // Password grant, then refresh grant.
    let tok = api
        .post_ok(
            "/api/oauth/token",
            &json!({"grant_type": "password", "username": "alice", "password": "pw-alice-123", "client_id": "e2e"}),
        )
        .await?;
    let access = tok["access_token"].as_str().context("access_token")?;
    let refresh = tok["refresh_token"].as_str().context("refresh_token")?;
    ensure!(tok["token_type"] == "Bearer", "token answer: {tok}");
    api.with_token(access)
        .get_ok("/api/users/isLogged")
        .await
        .context("the password grant's access token")?;
    let r = api
        .post(
            "/api/oauth/token",
            &json!({"grant_type": "password", "username": "alice", "password": "wrong", "client_id": "e2e"}),
        )
        .await?;
    ensure!(
        !r.ok() && r.body["access_token"].is_null(),
        "password grant with a wrong password must fail, got {}: {}",
        r.status,
        r.text
    );
    let tok2 = api
        .post_ok(
            "/api/oauth/token",
            &json!({"grant_type": "refresh_token", "refresh_token": refresh, "client_id": "e2e"}),
        )
        .await?;
    let access2 = tok2["access_token"]
        .as_str()
        .context("refreshed access_token")?;
    let by_refresh = api.with_token(access2);
    by_refresh
        .get_ok("/api/users/isLogged")
        .await
        .context("the refresh grant's access token")?;
    // Revoke: the token stops working.
    let r = by_refresh.post("/api/oauth/revoke", &json!({})).await?;
    ensure!(r.ok(), "revoke: HTTP {}: {}", r.status, r.text);
    let r = by_refresh.get("/api/users/isLogged").await?;
    ensure!(
        r.status == 401,
        "isLogged with a revoked token: expected 401, got {}: {}",
        r.status,
        r.text
    );
    let r = api.get("/api/users/isLogged").await?;
    ensure!(
        r.status == 401,
        "isLogged without a token: expected 401, got {}",
        r.status
    );
    Ok(())
    })
    .await
}

#[tokio::test]
async fn buckets_and_verify_pm2() {
    e2e(async {
    let km = Km::start().await?;
    let user = km.api().register_random().await?;
    let b = user.api.create_bucket("e2e-api").await?;
    let list = user.api.get_ok("/api/bucket/").await?;
    ensure!(
        list.as_array()
            .is_some_and(|a| a.iter().any(|x| x["_id"] == b.id.as_str())),
        "GET /api/bucket/ must list the new bucket: {}",
        show(&list, 3000)
    );
    let one = user.api.get_ok(&format!("/api/bucket/{}", b.id)).await?;
    let ep = &one["node"]["endpoints"];
    ensure!(
        ep["web"].as_str().is_some_and(|w| w.starts_with("http"))
            && ep["ws"].as_str().is_some_and(|w| w.starts_with("ws"))
            && ep["realtime"].is_string(),
        "GET /api/bucket/:id must carry node.endpoints {{web, realtime, ws}}: {}",
        show(&one, 3000)
    );
    let status = user.api.status(&b.id).await?;
    ensure!(
        status.as_array().is_some_and(Vec::is_empty),
        "data/status of a fresh bucket must be []: {status}"
    );
    // The agent's verify call with the right keys.
    let v = km
        .api()
        .verify_pm2(&b.public_id, &b.secret_id, "web-1")
        .await?;
    let ws = v.body["endpoints"]["ws"].as_str().unwrap_or_default();
    ensure!(
        v.body["active"] == true
            && v.body["pending"] == false
            && v.body["disabled"] == false
            && ws.starts_with("ws://")
            && ws.contains(&format!(":{}", km.port()))
            && ws.ends_with("/interaction")
            && v.body["endpoints"]["web"].is_string(),
        "verifyPM2 with good keys: expected {{active:true, pending:false, disabled:false, endpoints:{{ws: ws://…:{}/interaction, web}}}}, got HTTP {}: {}",
        km.port(),
        v.status,
        v.text
    );
    // Unknown public key: a JSON error the agent shows.
    let v = km
        .api()
        .verify_pm2("unknownpublickey0000", "unknownsecret0000", "web-1")
        .await?;
    ensure!(
        v.body["active"] == false
            && v.body["error"] == true
            && v.body["msg"].as_str().is_some_and(|m| !m.trim().is_empty()),
        "verifyPM2 with an unknown public key: expected JSON {{active:false, error:true, msg}}, got HTTP {}: {}",
        v.status,
        v.text
    );
    // A truncated body (what a non-ASCII machine name produces) gets a JSON answer.
    let http = reqwest::Client::builder()
        .timeout(std::time::Duration::from_secs(10))
        .build()?;
    let r = http
        .post(format!("{}/api/node/verifyPM2", km.url()))
        .header("content-type", "application/json")
        .body(format!(
            "{{\"public_id\":\"{}\",\"private_id\":\"{}\",\"data\":{{\"MACHINE_NAME\":\"caf",
            b.public_id, b.secret_id
        ))
        .send()
        .await
        .context("verifyPM2 with a truncated body must answer")?;
    let status = r.status().as_u16();
    let text = r.text().await?;
    let body: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    ensure!(
        body.is_object() && body["active"] != true,
        "verifyPM2 with a truncated body: expected a JSON error, got HTTP {status}: {text}"
    );
    // Bad bucket ids.
    let r = user.api.get("/api/bucket/000000000000000000000000").await?;
    ensure!(
        r.status == 404 || r.status == 403,
        "GET an unknown bucket: expected 404, got {}: {}",
        r.status,
        r.text
    );
    let r = user.api.get("/api/bucket/not-an-id").await?;
    ensure!(
        (400..500).contains(&r.status),
        "GET /api/bucket/not-an-id: expected 4xx, got {}: {}",
        r.status,
        r.text
    );
    Ok(())
    })
    .await
}

/// Invitations without SMTP (the link comes back to the admin) accepted while sign-up is
/// closed, revoked ones refused, and the ownership transferred by the owner alone.
#[tokio::test]
async fn invitations_and_ownership_transfer() {
    e2e(async {
        let km = Km::start_with(vec![("KM_ALLOW_SIGNUP".into(), "false".into())]).await?;
        let owner = km.api().register_random().await?;
        let b = owner.api.create_bucket("team-api").await?;
        let invitations = format!("/api/bucket/{}/invitations", b.id);
        let invite = |email: &str| json!({"email": email, "role": "read_only"});
        let made = owner.api.post_ok(&invitations, &invite("Fresh@Example.com")).await?;
        let link = made["link"].as_str().unwrap_or_default().to_string();
        ensure!(
            made["mailed"] == false
                && made["email"] == "fresh@example.com"
                && made["mail_error"].as_str().is_some_and(|e| e.contains("SMTP_HOST"))
                && link.starts_with(&format!("{}/invitations/{}/", km.url(), b.id)),
            "an invitation without SMTP: {made}"
        );
        let pending = owner.api.get_ok(&invitations).await?;
        ensure!(
            pending.as_array().is_some_and(|p| p.len() == 1 && p[0]["role"] == "read_only"),
            "pending: {pending}"
        );
        let taken = owner.api.post(&invitations, &invite(&owner.email)).await?;
        ensure!(taken.status == 409, "inviting an account: {} {}", taken.status, taken.text);

        // Accepted with a new account although sign-up is closed; the link then ends.
        let http = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let path = link.trim_start_matches(&km.url()).to_string();
        let fields = [("username", "fresh"), ("password", "correct horse battery")];
        let joined = km_e2e::post_visitor_form(&http, &km.url(), &path, &fields).await?;
        let to = joined.headers().get("location").and_then(|v| v.to_str().ok());
        ensure!(
            to == Some(&format!("/buckets/{}", b.id)),
            "accepting: {} to {to:?}",
            joined.status()
        );
        let again = http.get(&link).send().await?.status().as_u16();
        ensure!(again == 404, "a used invitation answers {again}");
        let signed_in = km
            .api()
            .post_ok(
                "/api/oauth/token",
                &json!({"grant_type": "password", "username": "fresh", "password": "correct horse battery"}),
            )
            .await?;
        let fresh = km
            .api()
            .with_token(signed_in["access_token"].as_str().unwrap_or_default());
        let current_role = format!("/api/bucket/{}/current_role", b.id);
        let role = fresh.get_ok(&current_role).await?;
        ensure!(role["role"] == "read_only", "the invited role: {role}");

        // Revoked: the link is refused.
        let made = owner.api.post_ok(&invitations, &invite("later@example.com")).await?;
        let pending = owner.api.get_ok(&invitations).await?;
        let id = pending[0]["id"].as_str().unwrap_or_default();
        let revoked = owner
            .api
            .request(reqwest::Method::DELETE, &format!("{invitations}/{id}"), None)
            .await?;
        ensure!(revoked.status == 200, "revoke: {} {}", revoked.status, revoked.text);
        let link = made["link"].as_str().unwrap_or_default();
        let gone = http.get(link).send().await?.status().as_u16();
        ensure!(gone == 404, "a revoked invitation answers {gone}");

        // The transfer: the owner alone, to a member; the owner stays an admin.
        let transfer = format!("/api/bucket/{}/transfer_ownership", b.id);
        let by_member = fresh.post(&transfer, &json!({"email": "fresh"})).await?;
        ensure!(by_member.status == 403, "a member transfers: {}", by_member.status);
        let stranger = owner.api.post(&transfer, &json!({"email": "nobody@example.com"})).await?;
        ensure!(stranger.status == 404, "to a stranger: {}", stranger.status);
        let done = owner.api.post_ok(&transfer, &json!({"email": "fresh@example.com"})).await?;
        ensure!(done["owner"] == "fresh" && done["mailed"] == false, "transfer: {done}");
        let roles = (
            fresh.get_ok(&current_role).await?,
            owner.api.get_ok(&current_role).await?,
        );
        ensure!(
            roles.0["role"] == "owner" && roles.1["role"] == "admin",
            "after the transfer (new owner, former owner): {roles:?}"
        );
        Ok(())
    })
    .await
}
