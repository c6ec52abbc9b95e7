//! The dashboard's security without a browser: sessions, CSRF, roles and isolation
//! between users, checked on the HTTP answers themselves. Each test starts its own km.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use km_e2e::{Km, e2e, linked, post_visitor_form, run_node_script};
use reqwest::header::{COOKIE, LOCATION, SET_COOKIE};
use reqwest::redirect::Policy;
use serde_json::{Value, json};

/// A signed-in browser without the browser: a session cookie and its CSRF token.
struct Session {
    http: reqwest::Client,
    base: String,
    cookie: String,
    csrf: String,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .redirect(Policy::none())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

/// The `km_session=…` pair of a Set-Cookie answer, checking its attributes.
fn session_cookie(r: &reqwest::Response) -> Result<String> {
    let set = r
        .headers()
        .get_all(SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .find(|v| v.starts_with("km_session="))
        .context("no km_session cookie set")?
        .to_string();
    ensure!(
        set.contains("HttpOnly") && set.contains("SameSite=Lax") && set.contains("Path=/"),
        "session cookie lacks HttpOnly/SameSite/Path: {set}"
    );
    Ok(set.split(';').next().unwrap_or_default().to_string())
}

fn csrf_of(html: &str) -> Result<String> {
    let marker = "name=\"csrf-token\" content=\"";
    let start = html
        .find(marker)
        .context("no csrf-token meta in the page")?
        + marker.len();
    let end = html[start..].find('"').context("unterminated csrf meta")? + start;
    Ok(html[start..end].to_string())
}

impl Session {
    /// Signs up (or in, with `login`) through the forms.
    async fn start(base: &str, path: &str, fields: &[(&str, &str)]) -> Result<Session> {
        let http = client();
        let r = post_visitor_form(&http, base, path, fields).await?;
        ensure!(
            r.status() == 303,
            "{path}: expected 303, got {}: {}",
            r.status(),
            r.text().await?
        );
        let cookie = session_cookie(&r)?;
        let page = http
            .get(format!("{base}/buckets"))
            .header(COOKIE, &cookie)
            .send()
            .await?;
        ensure!(
            page.status() == 200,
            "/buckets after {path}: {}",
            page.status()
        );
        let csp = page
            .headers()
            .get("content-security-policy")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string();
        ensure!(
            csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "CSP: {csp:?}"
        );
        let csrf = csrf_of(&page.text().await?)?;
        Ok(Session {
            http,
            base: base.to_string(),
            cookie,
            csrf,
        })
    }

    async fn get(&self, path: &str) -> Result<(u16, String)> {
        let r = self
            .http
            .get(format!("{}{path}", self.base))
            .header(COOKIE, &self.cookie)
            .send()
            .await?;
        Ok((r.status().as_u16(), r.text().await?))
    }

    /// Posts a form with the session's CSRF token (or `csrf` if given); (status, Location).
    async fn post(
        &self,
        path: &str,
        fields: &[(&str, &str)],
        csrf: Option<&str>,
    ) -> Result<(u16, String)> {
        let mut form: Vec<(&str, &str)> = fields.to_vec();
        form.push(("csrf", csrf.unwrap_or(&self.csrf)));
        let r = self
            .http
            .post(format!("{}{path}", self.base))
            .header(COOKIE, &self.cookie)
            .form(&form)
            .send()
            .await?;
        let location = r
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        Ok((r.status().as_u16(), location))
    }

    /// Calls the JSON API with the cookie (and the CSRF header when `with_csrf`).
    async fn api(&self, path: &str, body: &Value, with_csrf: bool) -> Result<(u16, String)> {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header(COOKIE, &self.cookie)
            .json(body);
        if with_csrf {
            request = request.header("x-csrf-token", &self.csrf);
        }
        let r = request.send().await?;
        Ok((r.status().as_u16(), r.text().await?))
    }

    async fn create_bucket(&self, name: &str) -> Result<String> {
        let (status, location) = self.post("/buckets", &[("name", name)], None).await?;
        ensure!(
            status == 303 && location.starts_with("/buckets/"),
            "create bucket: {status} {location}"
        );
        Ok(location.trim_start_matches("/buckets/").to_string())
    }
}

const PASSWORD: &str = "correct horse battery";

#[tokio::test]
async fn sign_up_is_closed_after_the_admin_and_admins_create_accounts() {
    e2e(async {
        let km = Km::start_with(vec![("KM_ALLOW_SIGNUP".into(), "false".into())]).await?;
        let base = km.url();
        let admin = Session::start(&base, "/signup", &[("username", "root"), ("email", "root@example.com"), ("password", PASSWORD)]).await?;
        // A visitor cannot sign up now, by the form or the API.
        let r = post_visitor_form(&client(), &base, "/signup", &[("username", "eve"), ("email", "eve@example.com"), ("password", PASSWORD)]).await?;
        ensure!(r.status() == 403, "visitor sign-up: expected 403, got {}", r.status());
        let r = km.api().post("/api/oauth/register", &json!({"username": "eve", "email": "eve@example.com", "password": PASSWORD, "accept_terms": true})).await?;
        ensure!(r.status == 403 && r.text.contains("KM_ALLOW_SIGNUP"), "API register: {} {}", r.status, r.text);
        // The admin creates one (and stays signed in as themself).
        let (status, location) = admin.post("/signup", &[("username", "bob"), ("email", "bob@example.com"), ("password", PASSWORD)], None).await?;
        ensure!(status == 303 && location.contains("created"), "admin creates bob: {status} {location}");
        Session::start(&base, "/login", &[("login", "bob"), ("password", PASSWORD)]).await.context("bob signs in")?;
        let wrong = post_visitor_form(&client(), &base, "/login", &[("login", "bob"), ("password", "nope-nope-nope")]).await?;
        ensure!(wrong.status() == 401, "wrong password: {}", wrong.status());
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn csrf_roles_and_other_users_buckets() {
    e2e(async {
        let km = Km::start().await?;
        let base = km.url();
        let alice = Session::start(
            &base,
            "/signup",
            &[
                ("username", "alice"),
                ("email", "alice@example.com"),
                ("password", PASSWORD),
            ],
        )
        .await?;
        let bob = Session::start(
            &base,
            "/signup",
            &[
                ("username", "bob"),
                ("email", "bob@example.com"),
                ("password", PASSWORD),
            ],
        )
        .await?;
        let bucket = alice.create_bucket("prod").await?;

        // CSRF: a form without the token, or with another session's, changes nothing.
        let (status, _) = alice
            .post("/buckets", &[("name", "forged")], Some(""))
            .await?;
        ensure!(status == 403, "form without CSRF token: {status}");
        let (status, _) = alice
            .post("/buckets", &[("name", "forged")], Some(&bob.csrf))
            .await?;
        ensure!(
            status == 403,
            "form with another session's CSRF token: {status}"
        );
        let (status, body) = alice
            .api(
                "/api/bucket/create_classic",
                &json!({"name": "forged"}),
                false,
            )
            .await?;
        ensure!(
            status == 403,
            "API call by cookie without x-csrf-token: {status} {body}"
        );
        let (_, list) = alice.get("/buckets").await?;
        ensure!(
            !list.contains("forged"),
            "a forged request created a bucket"
        );

        // Another user's bucket: pages and API answer 404, and so do its actions.
        for path in [
            format!("/buckets/{bucket}"),
            format!("/buckets/{bucket}/settings"),
            format!("/buckets/{bucket}/servers/web/apps/api"),
            format!("/api/bucket/{bucket}"),
        ] {
            let (status, _) = bob.get(&path).await?;
            ensure!(status == 404, "bob GET {path}: expected 404, got {status}");
        }
        let (status, _) = bob
            .api(
                &format!("/api/bucket/{bucket}/actions/triggerPM2"),
                &json!({"server_name": "web", "method_name": "restart", "app_name": "api"}),
                true,
            )
            .await?;
        ensure!(status == 404, "bob restarts in alice's bucket: {status}");
        let (status, _) = bob
            .post(
                &format!("/buckets/{bucket}/settings/add_member"),
                &[("email", "bob@example.com"), ("role", "admin")],
                None,
            )
            .await?;
        ensure!(
            status == 404,
            "bob adds himself to alice's bucket: {status}"
        );

        // Read-only member: sees the bucket, cannot act or manage.
        let (status, location) = alice
            .post(
                &format!("/buckets/{bucket}/settings/add_member"),
                &[("email", "bob@example.com"), ("role", "read_only")],
                None,
            )
            .await?;
        ensure!(
            status == 303 && location.contains("msg="),
            "alice adds bob read-only: {status} {location}"
        );
        let (status, page) = bob.get(&format!("/buckets/{bucket}")).await?;
        ensure!(
            status == 200 && page.contains("prod"),
            "bob's overview: {status}"
        );
        let (status, body) = bob
            .api(
                &format!("/api/bucket/{bucket}/actions/triggerPM2"),
                &json!({"server_name": "web", "method_name": "restart", "app_name": "api"}),
                true,
            )
            .await?;
        ensure!(
            status == 403 && body.contains("read_only"),
            "read-only restart by API: {status} {body}"
        );
        let r = bob
            .http
            .post(format!(
                "{base}/buckets/{bucket}/servers/web/apps/api/actions"
            ))
            .header(COOKIE, &bob.cookie)
            .header("x-requested-with", "fetch")
            .form(&[
                ("csrf", bob.csrf.as_str()),
                ("kind", "pm2"),
                ("method_name", "restart"),
            ])
            .send()
            .await?;
        ensure!(
            r.status() == 403,
            "read-only restart from the page: {}",
            r.status()
        );
        let (status, location) = bob
            .post(
                &format!("/buckets/{bucket}/settings/rename"),
                &[("name", "mine")],
                None,
            )
            .await?;
        ensure!(
            status == 303 && location.contains("error="),
            "read-only rename: {status} {location}"
        );
        // Promoted to developer, the same restart passes the role check (no agent: 404).
        alice
            .post(
                &format!("/buckets/{bucket}/settings/set_role"),
                &[("email", "bob@example.com"), ("role", "developer")],
                None,
            )
            .await?;
        let (status, body) = bob
            .api(
                &format!("/api/bucket/{bucket}/actions/triggerPM2"),
                &json!({"server_name": "web", "method_name": "restart", "app_name": "api"}),
                true,
            )
            .await?;
        ensure!(
            status == 404 && body.contains("not connected"),
            "developer restart without agent: {status} {body}"
        );
        // Only the owner deletes the bucket.
        let (status, location) = bob
            .post(&format!("/buckets/{bucket}/settings/delete"), &[], None)
            .await?;
        ensure!(
            status == 303 && location.contains("error="),
            "developer deletes the bucket: {status} {location}"
        );
        let (status, location) = alice
            .post(&format!("/buckets/{bucket}/settings/delete"), &[], None)
            .await?;
        ensure!(
            status == 303 && location.starts_with("/buckets?msg="),
            "owner deletes the bucket: {status} {location}"
        );
        let (status, _) = bob.get(&format!("/buckets/{bucket}")).await?;
        ensure!(status == 404, "deleted bucket still shown: {status}");
        Ok(())
    })
    .await;
}

#[tokio::test]
async fn password_change_ends_other_sessions() {
    e2e(async {
        let km = Km::start().await?;
        let base = km.url();
        let fields = [
            ("username", "carol"),
            ("email", "carol@example.com"),
            ("password", PASSWORD),
        ];
        let first = Session::start(&base, "/signup", &fields).await?;
        let other = Session::start(
            &base,
            "/login",
            &[("login", "carol"), ("password", PASSWORD)],
        )
        .await?;
        let (status, location) = first
            .post(
                "/account/password",
                &[
                    ("current", "wrong-password"),
                    ("new", "new password 1"),
                    ("confirm", "new password 1"),
                ],
                None,
            )
            .await?;
        ensure!(
            status == 303 && location.contains("error="),
            "wrong current password: {status} {location}"
        );
        let r = first
            .http
            .post(format!("{base}/account/password"))
            .header(COOKIE, &first.cookie)
            .form(&[
                ("csrf", first.csrf.as_str()),
                ("current", PASSWORD),
                ("new", "new password 1"),
                ("confirm", "new password 1"),
            ])
            .send()
            .await?;
        ensure!(r.status() == 303, "password change: {}", r.status());
        let renewed = session_cookie(&r)?;
        let r = client()
            .get(format!("{base}/buckets"))
            .header(COOKIE, &renewed)
            .send()
            .await?;
        ensure!(
            r.status() == 200,
            "the renewed session works: {}",
            r.status()
        );
        let (status, _) = other.get("/buckets").await?;
        ensure!(
            status == 303,
            "the other session still works after a password change: {status}"
        );
        Session::start(
            &base,
            "/login",
            &[("login", "carol"), ("password", "new password 1")],
        )
        .await?;
        Ok(())
    })
    .await;
}

/// The realtime socket: no token → 401; another user's token gets nothing from the
/// bucket while its owner's token gets the server's status.
#[tokio::test]
async fn realtime_sends_a_bucket_only_to_its_members() {
    e2e(async {
        let linked = linked("rt-box", &[("rt-app", "setInterval(() => {}, 1000)")]).await?;
        let outsider = linked.km.api().register_random().await?;
        let url = linked.km.url();
        let member = linked.user.api.token().unwrap_or_default().to_string();
        let stranger = outsider.api.token().unwrap_or_default().to_string();
        let output = run_node_script(
            "realtime_isolation.js",
            &[
                ("KM_URL", url.as_str()),
                ("KM_PUBLIC_ID", linked.bucket.public_id.as_str()),
                ("KM_MEMBER_TOKEN", member.as_str()),
                ("KM_OUTSIDER_TOKEN", stranger.as_str()),
            ],
            Duration::from_secs(60),
        )
        .await;
        match output {
            Ok(out) if out.stdout.contains("realtime isolation: ok") => Ok(()),
            Ok(out) => bail!("unexpected output:\n{}\n{}", out.stdout, out.stderr),
            Err(e) => Err(e),
        }
    })
    .await;
}

/// This machine's address on its default route, if it has one besides loopback.
fn outward_ip() -> Option<std::net::IpAddr> {
    let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    // Connecting a UDP socket sends nothing; it only picks the route's local address.
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// On an appliance with a setup wizard, whoever reaches a fresh km first must not become
/// its admin: the first account comes from this machine (the wizard) only.
#[tokio::test]
async fn with_a_wizard_the_first_account_comes_from_this_machine() {
    e2e(async {
        let Some(ip) = outward_ip() else {
            bail!("this machine has no address besides loopback to test from");
        };
        let env = vec![("KM_WIZARD_URL".into(), "http://127.0.0.1:9".into())];
        let km = Km::start_on_all_addresses(env).await?;
        let remote = format!("http://{ip}:{}", km.port());
        let body = json!({"username": "eve", "email": "eve@example.com", "password": PASSWORD, "accept_terms": true});
        let r = client().post(format!("{remote}/api/oauth/register")).json(&body).send().await?;
        let (status, text) = (r.status(), r.text().await?);
        ensure!(status == 403 && text.contains("setup wizard"), "first account from {ip}: HTTP {status}: {text}");
        let r = post_visitor_form(&client(), &remote, "/signup", &[("username", "eve"), ("email", "eve@example.com"), ("password", PASSWORD)]).await?;
        ensure!(r.status() == 403, "first account from {ip} through the sign-up page: HTTP {}", r.status());
        let admin = km.api().register("root", "root@example.com", PASSWORD).await.context("the first account from loopback")?;
        ensure!(admin.raw["user"]["role"] == "admin", "the loopback account is not admin: {}", admin.raw);
        Ok(())
    })
    .await;
}

/// A subscription ends with its reason to exist: a member removed from the bucket stops
/// receiving within the re-check period (10 s), a revoked token's socket is closed.
#[tokio::test]
async fn realtime_stops_for_removed_members_and_revoked_tokens() {
    e2e(async {
        let linked = linked("rt-box", &[("rt-app", "setInterval(() => {}, 1000)")]).await?;
        let owner = &linked.user;
        let bucket = &linked.bucket.id;
        let member = linked.km.api().register_random().await?;
        owner
            .api
            .post_ok(&format!("/api/bucket/{bucket}/add_user"), &json!({"email": member.email, "role": "read_only"}))
            .await?;
        // A second sign-in of the owner, to revoke.
        let second = linked
            .km
            .api()
            .post_ok(
                "/api/oauth/token",
                &json!({"grant_type": "password", "username": owner.username, "password": owner.password}),
            )
            .await?;
        let revoked = second["access_token"].as_str().context("access_token")?.to_string();
        let url = linked.km.url();
        let owner_token = owner.api.token().unwrap_or_default().to_string();
        let member_token = member.api.token().unwrap_or_default().to_string();
        let out = run_node_script(
            "realtime_revocation.js",
            &[
                ("KM_URL", url.as_str()),
                ("KM_PUBLIC_ID", linked.bucket.public_id.as_str()),
                ("KM_BUCKET_ID", bucket.as_str()),
                ("KM_OWNER_TOKEN", owner_token.as_str()),
                ("KM_MEMBER_TOKEN", member_token.as_str()),
                ("KM_MEMBER_EMAIL", member.email.as_str()),
                ("KM_REVOKED_TOKEN", revoked.as_str()),
            ],
            Duration::from_secs(60),
        )
        .await?;
        ensure!(out.stdout.contains("realtime revocation: ok"), "{}\n{}", out.stdout, out.stderr);
        Ok(())
    })
    .await;
}

/// Behind HTTPS (an https site URL), the session cookie is also `Secure`.
#[tokio::test]
async fn the_session_cookie_is_secure_on_an_https_site() {
    e2e(async {
        let km = Km::start_with(vec![(
            "KM_SITE_URL".into(),
            "https://km.example.com".into(),
        )])
        .await?;
        let fields = [
            ("username", "dana"),
            ("email", "dana@example.com"),
            ("password", PASSWORD),
        ];
        let r = post_visitor_form(&client(), &km.url(), "/signup", &fields).await?;
        session_cookie(&r)?;
        let set = r
            .headers()
            .get(SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        ensure!(
            set.contains("; Secure"),
            "no Secure attribute on an https site: {set}"
        );
        // And not on a plain-HTTP one (a browser would drop a Secure cookie there).
        let plain = Km::start().await?;
        let r = post_visitor_form(&client(), &plain.url(), "/signup", &fields).await?;
        let set = r
            .headers()
            .get(SET_COOKIE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default();
        ensure!(
            set.starts_with("km_session=") && !set.contains("Secure"),
            "plain HTTP: {set}"
        );
        Ok(())
    })
    .await;
}

/// The alerts page: a rule made with its form (and refused with a reason), the channels,
/// the member's own choices, and the report page.
#[tokio::test]
async fn alerts_page_forms_rules_channels_and_choices() {
    e2e(async {
        let km = Km::start().await?;
        let base = km.url();
        let s = Session::start(
            &base,
            "/signup",
            &[
                ("username", "alma"),
                ("email", "alma@example.com"),
                ("password", PASSWORD),
            ],
        )
        .await?;
        let b = s.create_bucket("shop").await?;
        let page = format!("/buckets/{b}/alerts");
        let rule = [
            ("name", "hot api"),
            ("metric", "cpu"),
            ("operator", ">"),
            ("threshold", "80"),
            ("timerange", "120"),
            ("aggregation", "all"),
            ("app", "api, worker"),
            ("pm2_action", "restart"),
        ];
        let (status, location) = s.post(&format!("{page}/create"), &rule, None).await?;
        ensure!(
            status == 303 && location.starts_with(&page),
            "create: {status} {location}"
        );
        let mut short = rule;
        short[4] = ("timerange", "30");
        let (_, refused) = s.post(&format!("{page}/create"), &short, None).await?;
        let (status, html) = s.get(&refused).await?;
        ensure!(status == 200, "alerts page: {status}");
        for expected in [
            "hot api",
            "cpu every point &#62; 80",
            "over 120 s",
            "api, worker",
            "notify, pm2_action",
            "between 60",
        ] {
            ensure!(
                html.contains(expected),
                "{expected:?} not on the page:\n{html}"
            );
        }
        let (status, _) = s
            .post(&format!("{page}/create"), &rule, Some("forged"))
            .await?;
        ensure!(status == 403, "a forged form: {status}");

        s.post(
            &format!("{page}/webhook"),
            &[("url", "http://127.0.0.1:9/hook"), ("active", "true")],
            None,
        )
        .await?;
        // No SMTP on this km: the mail channel is said to be off and not attempted.
        let (_, html) = s.get(&page).await?;
        ensure!(
            html.contains(r#"id="mail-not-set-up""#)
                && html.contains(r#"Mail <span class="badge off">not set up</span>"#),
            "mail not said to be off:\n{html}"
        );
        let (_, rules) = s.get(&format!("/api/bucket/{b}/alerts")).await?;
        let rules: Value = serde_json::from_str(&rules)?;
        let id = rules[0]["_id"].as_str().context("no rule id")?;
        let (status, sent) = s
            .api(
                &format!("/api/bucket/{b}/alerts/{id}/sample"),
                &json!({}),
                true,
            )
            .await?;
        ensure!(
            status == 200 && sent.contains("webhook") && !sent.contains("email"),
            "a sample without SMTP: {status} {sent}"
        );
        let (status, refused) = s
            .api(
                &format!("/api/bucket/{b}/reports/daily/send"),
                &json!({}),
                true,
            )
            .await?;
        ensure!(
            status == 400 && refused.contains("mail is not set up"),
            "a report without SMTP: {status} {refused}"
        );
        let (status, location) = s
            .post(
                &format!("{page}/mine"),
                &[("daily", "on"), ("kind_new_issue", "on")],
                None,
            )
            .await?;
        ensure!(
            status == 303 && location.contains("saved"),
            "mine: {status} {location}"
        );
        let (_, html) = s.get(&page).await?;
        ensure!(html.contains("X-KM-Signature"), "no webhook secret shown");
        ensure!(
            html.contains(r#"name="daily" checked"#)
                && !html.contains(r#"name="active" checked"#)
                && html.contains(r#"name="kind_new_issue" checked"#)
                && !html.contains(r#"name="kind_deployment" checked"#),
            "choices not kept:\n{html}"
        );
        let (status, html) = s
            .get(&format!("/buckets/{b}/reports?period=weekly"))
            .await?;
        ensure!(
            status == 200 && html.contains("weekly report") && html.contains("<svg"),
            "report page: {status}\n{html}"
        );
        Ok(())
    })
    .await;
}

/// Password guesses are held per account and per client address on every sign-in path,
/// with 429 and Retry-After; the sign-in form refuses a post without its form token.
#[tokio::test]
async fn sign_ins_are_throttled_and_the_form_needs_its_token() {
    e2e(async {
        let km = Km::start().await?;
        let base = km.url();
        km.api().register("bob", "bob@example.com", PASSWORD).await?;
        // Login CSRF: a form posted from elsewhere (no token, or no cookie) is refused.
        let forged = client().post(format!("{base}/login")).form(&[("login", "bob"), ("password", PASSWORD), ("csrf", "x")]).send().await?;
        ensure!(forged.status() == 403, "a sign-in without its form token: {}", forged.status());
        // Five wrong passwords for bob (by username and by email alike)...
        for i in 0..5 {
            let login = if i % 2 == 0 { "bob" } else { "bob@example.com" };
            let r = km.api().post("/api/oauth/token", &json!({"grant_type": "password", "username": login, "password": "guess-guess"})).await?;
            ensure!(r.status == 401, "guess {i}: {} {}", r.status, r.text);
        }
        // ...then even the right one waits, through the API and the dashboard.
        let r = km.api().post("/api/oauth/token", &json!({"grant_type": "password", "username": "bob", "password": PASSWORD})).await?;
        ensure!(r.status == 429 && r.text.contains("try again in"), "held API sign-in: {} {}", r.status, r.text);
        let page = post_visitor_form(&client(), &base, "/login", &[("login", "bob"), ("password", PASSWORD)]).await?;
        let retry = page.headers().get("retry-after").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
        ensure!(page.status() == 429 && retry.is_some_and(|s| s > 0 && s <= 900), "held dashboard sign-in: {} {retry:?}", page.status());
        ensure!(page.text().await?.contains("too many failed sign-ins"), "the page says why");
        // The address: twenty failures (bob's five, then made-up names) hold every account
        // from it.
        for i in 0..15 {
            let r = km.api().post("/api/oauth/token", &json!({"grant_type": "password", "username": format!("nobody{i}"), "password": "x"})).await?;
            ensure!(r.status == 401, "made-up name {i}: {}", r.status);
        }
        km.api().register("carol", "carol@example.com", PASSWORD).await?;
        let r = km.api().post("/api/oauth/token", &json!({"grant_type": "password", "username": "carol", "password": PASSWORD})).await?;
        ensure!(r.status == 429, "carol from a held address: {} {}", r.status, r.text);
        Ok(())
    })
    .await;
}
