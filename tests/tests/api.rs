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
