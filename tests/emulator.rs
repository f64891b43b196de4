//! Self-tests of the Dropbox API emulator (tests/support/dropbox.rs), over real
//! HTTP. No Kubernetes here.

mod support;

use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use base64::Engine;
use serde_json::{Value, json};
use support::dropbox::{Emulator, content_hash, hmac_sha256, http_client, http_client_builder};
use tokio::sync::mpsc;

const KEY: &str = "app-key-1";
const SECRET: &str = "app-secret-1";
const ALICE: &str = "dbid:AAH4f99T0taONIb-OurWxbNQ6ywGRopQngc";
const BOB: &str = "dbid:AAB0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0bob";
const REDIRECT: &str = "https://app.example.com/auth";

async fn emulator() -> Emulator {
    let emu = Emulator::start().await;
    emu.add_app(KEY, SECRET);
    emu.add_account(ALICE, "franz@example.com", "Franz Ferdinand");
    emu.add_account(BOB, "bob@example.com", "Bob");
    emu
}

fn http() -> reqwest::Client {
    http_client()
}

/// POST /oauth2/token with `form`; returns (status, JSON body).
async fn token(emu: &Emulator, form: &[(&str, &str)]) -> (u16, Value) {
    let r = http()
        .post(format!("{}/oauth2/token", emu.url))
        .form(form)
        .send()
        .await
        .expect("token request");
    let status = r.status().as_u16();
    (status, r.json().await.expect("token answer is JSON"))
}

async fn exchange(emu: &Emulator, code: &str, redirect_uri: Option<&str>) -> (u16, Value) {
    let mut form = vec![
        ("grant_type", "authorization_code"),
        ("code", code),
        ("client_id", KEY),
        ("client_secret", SECRET),
    ];
    if let Some(uri) = redirect_uri {
        form.push(("redirect_uri", uri));
    }
    token(emu, &form).await
}

async fn refresh(emu: &Emulator, refresh_token: &str) -> (u16, Value) {
    token(
        emu,
        &[
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("client_id", KEY),
            ("client_secret", SECRET),
        ],
    )
    .await
}

/// A fresh (access, refresh) token pair for ALICE.
async fn tokens(emu: &Emulator) -> (String, String) {
    let code = emu.issue_code(KEY, ALICE, None);
    let (status, body) = exchange(emu, &code, None).await;
    assert_eq!(status, 200, "{body}");
    (
        body["access_token"].as_str().unwrap().to_owned(),
        body["refresh_token"].as_str().unwrap().to_owned(),
    )
}

/// POST to an RPC route with a bearer token and JSON args (`None` = body `null`).
async fn rpc(
    emu: &Emulator,
    access_token: &str,
    route: &str,
    args: Option<Value>,
) -> reqwest::Response {
    let request = http()
        .post(format!("{}{route}", emu.url))
        .bearer_auth(access_token);
    let request = match args {
        Some(args) => request.json(&args),
        None => request
            .header("content-type", "application/json")
            .body("null"),
    };
    request.send().await.expect("rpc request")
}

async fn rpc_json(
    emu: &Emulator,
    access_token: &str,
    route: &str,
    args: Option<Value>,
) -> (u16, Value) {
    let r = rpc(emu, access_token, route, args).await;
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, body)
}

fn assert_summary(body: &Value, prefix: &str) {
    let summary = body["error_summary"].as_str().expect("error_summary");
    let rest = summary
        .strip_prefix(prefix)
        .unwrap_or_else(|| panic!("{summary:?} does not start with {prefix:?}"));
    assert!(
        !rest.is_empty() && rest.chars().all(|c| c == '.'),
        "{summary:?}"
    );
}

#[tokio::test]
async fn code_exchange_with_form_credentials() {
    let emu = emulator().await;
    let code = emu.issue_code(KEY, ALICE, Some(REDIRECT));
    let (status, body) = exchange(&emu, &code, Some(REDIRECT)).await;
    assert_eq!(status, 200, "{body}");
    let access = body["access_token"].as_str().unwrap();
    assert!(access.starts_with("sl."), "{access}");
    assert_eq!(body["expires_in"], json!(14400));
    assert_eq!(body["token_type"], json!("bearer"));
    assert_eq!(
        body["scope"],
        json!("account_info.read files.metadata.read")
    );
    assert_eq!(body["account_id"], json!(ALICE));
    assert_eq!(body["uid"], json!(emu.uid(ALICE).to_string()));
    assert_eq!(body["refresh_token"].as_str().unwrap().len(), 64);
    assert!(emu.is_access_token_valid(access));

    let call = &emu.calls_to("/oauth2/token")[0];
    assert_eq!(call.method, "POST");
    assert_eq!(call.status, 200);
    assert_eq!(call.form["grant_type"], "authorization_code");
    assert_eq!(call.form["redirect_uri"], REDIRECT);
}

#[tokio::test]
async fn code_exchange_with_basic_auth() {
    let emu = emulator().await;
    let code = emu.issue_code(KEY, ALICE, None);
    let r = http()
        .post(format!("{}/oauth2/token", emu.url))
        .basic_auth(KEY, Some(SECRET))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["account_id"], json!(ALICE));

    let call = &emu.calls_to("/oauth2/token")[0];
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{KEY}:{SECRET}"))
    );
    assert_eq!(call.header("Authorization"), Some(expected.as_str()));

    // Wrong secret over Basic.
    let code = emu.issue_code(KEY, ALICE, None);
    let r = http()
        .post(format!("{}/oauth2/token", emu.url))
        .basic_auth(KEY, Some("wrong"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
        ])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_eq!(
        r.json::<Value>().await.unwrap(),
        json!({"error": "invalid_client: Invalid client_id or client_secret"})
    );
}

#[tokio::test]
async fn bad_or_missing_client_credentials() {
    let emu = emulator().await;
    let code = emu.issue_code(KEY, ALICE, None);
    let (status, body) = token(
        &emu,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code),
            ("client_id", "nope"),
            ("client_secret", SECRET),
        ],
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"error": "invalid_client: Invalid client_id or client_secret"})
    );

    let (status, body) = token(
        &emu,
        &[("grant_type", "authorization_code"), ("code", &code)],
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"error": "invalid_request", "error_description": "No auth function available for given request"})
    );

    // Neither failure used the code up.
    assert_eq!(exchange(&emu, &code, None).await.0, 200);
}

#[tokio::test]
async fn reused_code_is_invalid_grant() {
    let emu = emulator().await;
    let code = emu.issue_code(KEY, ALICE, None);
    assert_eq!(exchange(&emu, &code, None).await.0, 200);
    let (status, body) = exchange(&emu, &code, None).await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"error": "invalid_grant", "error_description": "code doesn't exist or has expired"})
    );
    let (status, body) = exchange(&emu, "never-issued", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );
}

#[tokio::test]
async fn expired_code_is_invalid_grant() {
    let emu = emulator().await;
    emu.set_code_ttl(Duration::from_millis(100));
    let code = emu.issue_code(KEY, ALICE, None);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (status, body) = exchange(&emu, &code, None).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], json!("invalid_grant"));
    assert_eq!(
        body["error_description"],
        json!("code doesn't exist or has expired")
    );
}

#[tokio::test]
async fn redirect_uri_must_match() {
    let emu = emulator().await;
    let code = emu.issue_code(KEY, ALICE, Some(REDIRECT));
    for sent in [Some("https://evil.example.com/auth"), None] {
        let (status, body) = exchange(&emu, &code, sent).await;
        assert_eq!(status, 400);
        assert_eq!(
            body,
            json!({"error": "invalid_grant", "error_description": "redirect_uri mismatch"})
        );
    }
    // A code issued without redirect_uri must be exchanged without one.
    let bare = emu.issue_code(KEY, ALICE, None);
    assert_eq!(exchange(&emu, &bare, Some(REDIRECT)).await.0, 400);
    // The mismatches did not use the codes up.
    assert_eq!(exchange(&emu, &code, Some(REDIRECT)).await.0, 200);
    assert_eq!(exchange(&emu, &bare, None).await.0, 200);
}

#[tokio::test]
async fn refresh_mints_a_new_access_token() {
    let emu = emulator().await;
    let (access, refresh_token) = tokens(&emu).await;
    let (status, body) = refresh(&emu, &refresh_token).await;
    assert_eq!(status, 200, "{body}");
    let obj = body.as_object().unwrap();
    let mut keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["access_token", "expires_in", "token_type"]);
    assert_eq!(body["token_type"], json!("bearer"));
    let fresh = body["access_token"].as_str().unwrap();
    assert_ne!(fresh, access);
    assert!(emu.is_access_token_valid(fresh));
    // The earlier access token stays valid until it expires.
    assert!(emu.is_access_token_valid(&access));

    let (status, body) = refresh(&emu, "short").await;
    assert_eq!(status, 400);
    assert_eq!(
        body["error_description"],
        json!("refresh token is malformed")
    );
    let (status, body) = refresh(&emu, &"A".repeat(64)).await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"error": "invalid_grant", "error_description": "refresh token is invalid or revoked"})
    );
}

#[tokio::test]
async fn access_tokens_expire() {
    let emu = emulator().await;
    emu.set_access_token_ttl(Duration::from_millis(300));
    let code = emu.issue_code(KEY, ALICE, None);
    let (_, body) = exchange(&emu, &code, None).await;
    assert_eq!(body["expires_in"], json!(1));
    let access = body["access_token"].as_str().unwrap().to_owned();
    let refresh_token = body["refresh_token"].as_str().unwrap().to_owned();
    let (status, _) = rpc_json(&emu, &access, "/2/users/get_current_account", None).await;
    assert_eq!(status, 200);

    tokio::time::sleep(Duration::from_millis(400)).await;
    assert!(!emu.is_access_token_valid(&access));
    let r = rpc(&emu, &access, "/2/users/get_current_account", None).await;
    assert_eq!(r.status(), 401);
    assert_eq!(r.headers()["content-type"], "application/json");
    let body: Value = r.json().await.unwrap();
    assert_eq!(body["error"], json!({".tag": "expired_access_token"}));
    assert_summary(&body, "expired_access_token/");

    // The refresh token does not expire.
    let (status, body) = refresh(&emu, &refresh_token).await;
    assert_eq!(status, 200, "{body}");
}

#[tokio::test]
async fn revoke_kills_refresh_and_access_tokens() {
    let emu = emulator().await;
    let (first, refresh_token) = tokens(&emu).await;
    let (_, body) = refresh(&emu, &refresh_token).await;
    let second = body["access_token"].as_str().unwrap().to_owned();
    // An unrelated grant of the same account survives.
    let (other, other_refresh) = tokens(&emu).await;

    let r = rpc(&emu, &first, "/2/auth/token/revoke", None).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "null");

    for token in [&first, &second] {
        let (status, body) = rpc_json(&emu, token, "/2/users/get_current_account", None).await;
        assert_eq!(status, 401);
        assert_eq!(body["error"], json!({".tag": "invalid_access_token"}));
        assert_summary(&body, "invalid_access_token/");
    }
    let (status, body) = refresh(&emu, &refresh_token).await;
    assert_eq!(status, 400);
    assert_eq!(body["error"], json!("invalid_grant"));
    assert!(emu.is_access_token_valid(&other));
    assert!(emu.is_refresh_token_valid(&other_refresh));

    // Disconnecting the app revokes every grant of the account.
    let long_lived = emu.issue_long_lived_token(KEY, ALICE);
    emu.revoke_account_tokens(ALICE);
    assert!(!emu.is_access_token_valid(&other));
    assert!(!emu.is_access_token_valid(&long_lived));
    let (status, body) = refresh(&emu, &other_refresh).await;
    assert_eq!(
        (status, body["error_description"].as_str()),
        (400, Some("refresh token is invalid or revoked"))
    );
}

#[tokio::test]
async fn long_lived_tokens_never_expire_and_revoke_alone() {
    let emu = emulator().await;
    emu.set_access_token_ttl(Duration::from_millis(1));
    let long_lived = emu.issue_long_lived_token(KEY, ALICE);
    let (access, _) = tokens(&emu).await;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(emu.is_access_token_valid(&long_lived));
    assert!(!emu.is_access_token_valid(&access));
    let second = emu.issue_long_lived_token(KEY, ALICE);
    assert_eq!(
        rpc(&emu, &long_lived, "/2/auth/token/revoke", None)
            .await
            .status(),
        200
    );
    assert!(!emu.is_access_token_valid(&long_lived));
    assert!(emu.is_access_token_valid(&second));
}

#[tokio::test]
async fn get_current_account_shape() {
    let emu = emulator().await;
    let (access, _) = tokens(&emu).await;
    let (status, body) = rpc_json(&emu, &access, "/2/users/get_current_account", None).await;
    assert_eq!(status, 200);
    let ns = body["root_info"]["root_namespace_id"].clone();
    assert!(ns.as_str().unwrap().chars().all(|c| c.is_ascii_digit()));
    assert_eq!(
        body,
        json!({
            "account_id": ALICE,
            "name": {
                "given_name": "Franz",
                "surname": "Ferdinand",
                "familiar_name": "Franz",
                "display_name": "Franz Ferdinand",
                "abbreviated_name": "FF",
            },
            "email": "franz@example.com",
            "email_verified": true,
            "disabled": false,
            "country": "US",
            "locale": "en",
            "referral_link": body["referral_link"],
            "is_paired": false,
            "account_type": {".tag": "basic"},
            "root_info": {".tag": "user", "root_namespace_id": ns, "home_namespace_id": ns},
        })
    );

    // No body and no Content-Type is fine too.
    let r = http()
        .post(format!("{}/2/users/get_current_account", emu.url))
        .bearer_auth(&access)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers().contains_key("x-dropbox-request-id"));

    // A form Content-Type is bad input, in plain text.
    let r = http()
        .post(format!("{}/2/users/get_current_account", emu.url))
        .bearer_auth(&access)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let text = r.text().await.unwrap();
    assert!(
        text.starts_with(
            "Error in call to API function \"users/get_current_account\": Bad HTTP \"Content-Type\" header"
        ),
        "{text}"
    );

    // No Authorization header: 400 text, not 401.
    let r = http()
        .post(format!("{}/2/users/get_current_account", emu.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("Must provide HTTP header \"Authorization\"")
    );

    // An unknown token: 401 invalid_access_token.
    let (status, body) = rpc_json(&emu, "sl.u.nope", "/2/users/get_current_account", None).await;
    assert_eq!(status, 401);
    assert_eq!(body["error"], json!({".tag": "invalid_access_token"}));
}

#[tokio::test]
async fn rate_limit_answers_429_with_retry_after() {
    let emu = emulator().await;
    let (access, _) = tokens(&emu).await;
    emu.rate_limit_next("/2/users/get_current_account", 1, 7);
    let r = rpc(&emu, &access, "/2/users/get_current_account", None).await;
    assert_eq!(r.status(), 429);
    assert_eq!(r.headers()["retry-after"], "7");
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["error"],
        json!({"reason": {".tag": "too_many_requests"}, "retry_after": 7})
    );
    assert_summary(&body, "too_many_requests/");
    let (status, _) = rpc_json(&emu, &access, "/2/users/get_current_account", None).await;
    assert_eq!(status, 200);

    let statuses: Vec<u16> = emu
        .calls_to("/2/users/get_current_account")
        .iter()
        .map(|c| c.status)
        .collect();
    assert_eq!(statuses, [429, 200]);
}

#[tokio::test]
async fn rate_limit_can_send_retry_after_as_an_http_date() {
    let emu = emulator().await;
    let (access, _) = tokens(&emu).await;
    emu.rate_limit_next_with_date("/2/users/get_current_account", 1, 7);
    let r = rpc(&emu, &access, "/2/users/get_current_account", None).await;
    assert_eq!(r.status(), 429);
    let value = r.headers()["retry-after"].to_str().unwrap().to_owned();
    let at = httpdate::parse_http_date(&value).expect("an HTTP date");
    let ahead = at
        .duration_since(std::time::SystemTime::now())
        .unwrap_or_default();
    assert!(
        (5..=7).contains(&ahead.as_secs()),
        "{value}: {ahead:?} from now"
    );
    let body: Value = r.json().await.unwrap();
    assert_eq!(
        body["error"],
        json!({"reason": {".tag": "too_many_requests"}, "retry_after": 7})
    );
}

#[tokio::test]
async fn fail_next_and_fail_for() {
    let emu = emulator().await;
    emu.fail_next("/oauth2/token", 2, 503);
    let code = emu.issue_code(KEY, ALICE, None);
    for _ in 0..2 {
        let (status, body) = exchange(&emu, &code, None).await;
        assert_eq!(status, 503);
        assert!(
            body["error"]
                .as_str()
                .unwrap()
                .starts_with("The server has either erred")
        );
    }
    // The injected failures were not handled, so the code is still good.
    let (status, body) = exchange(&emu, &code, None).await;
    assert_eq!(status, 200);
    let access = body["access_token"].as_str().unwrap().to_owned();

    emu.fail_next("*", 1, 500);
    let r = rpc(&emu, &access, "/2/users/get_current_account", None).await;
    assert_eq!(r.status(), 500);
    assert_eq!(r.text().await.unwrap(), "");
    assert_eq!(
        rpc(&emu, &access, "/2/users/get_current_account", None)
            .await
            .status(),
        200
    );

    emu.fail_for(
        "/2/users/get_current_account",
        Duration::from_millis(300),
        502,
    );
    let r = rpc(&emu, &access, "/2/users/get_current_account", None).await;
    assert_eq!(r.status(), 502);
    assert!(r.text().await.unwrap().contains("Dropbox - 5xx"));
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        rpc(&emu, &access, "/2/users/get_current_account", None)
            .await
            .status(),
        200
    );
    let recorded: Vec<u16> = emu.calls().iter().map(|c| c.status).collect();
    assert_eq!(recorded, [503, 503, 200, 500, 200, 502, 200]);
}

#[tokio::test]
async fn latency_outlasts_a_client_timeout_but_the_request_still_happens() {
    let emu = emulator().await;
    emu.set_latency("/oauth2/token", Duration::from_millis(500));
    let code = emu.issue_code(KEY, ALICE, None);
    let client = http_client_builder()
        .timeout(Duration::from_millis(100))
        .build()
        .unwrap();
    let err = client
        .post(format!("{}/oauth2/token", emu.url))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("client_id", KEY),
            ("client_secret", SECRET),
        ])
        .send()
        .await
        .unwrap_err();
    assert!(err.is_timeout(), "{err}");
    tokio::time::sleep(Duration::from_millis(600)).await;
    let calls = emu.calls_to("/oauth2/token");
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].status, 200);
    // The server did exchange the code: it is used up.
    emu.set_latency("/oauth2/token", Duration::ZERO);
    assert_eq!(exchange(&emu, &code, None).await.0, 400);
}

/// Drains a cursor; returns every page.
async fn drain(emu: &Emulator, access: &str, mut cursor: String) -> (Vec<Value>, String) {
    let mut out = Vec::new();
    loop {
        let (status, page) = rpc_json(
            emu,
            access,
            "/2/files/list_folder/continue",
            Some(json!({"cursor": cursor})),
        )
        .await;
        assert_eq!(status, 200, "{page}");
        cursor = page["cursor"].as_str().unwrap().to_owned();
        let more = page["has_more"].as_bool().unwrap();
        out.push(page);
        if !more {
            return (out, cursor);
        }
    }
}

async fn latest_cursor(emu: &Emulator, access: &str, args: Value) -> String {
    let (status, body) = rpc_json(
        emu,
        access,
        "/2/files/list_folder/get_latest_cursor",
        Some(args),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    body["cursor"].as_str().unwrap().to_owned()
}

fn tags_and_paths(entries: &[Value]) -> Vec<(String, String)> {
    entries
        .iter()
        .map(|e| {
            (
                e[".tag"].as_str().unwrap().to_owned(),
                e["path_display"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn changes_come_in_pages_after_the_latest_cursor() {
    let emu = emulator().await;
    let (access, _) = tokens(&emu).await;
    emu.upload(ALICE, "/old.txt", b"old");
    let cursor = latest_cursor(
        &emu,
        &access,
        json!({"path": "", "recursive": true, "include_deleted": true}),
    )
    .await;

    emu.set_list_limit(2);
    emu.create_folder(ALICE, "/Docs");
    emu.upload(ALICE, "/Docs/A.txt", b"hello");
    emu.upload(ALICE, "/Docs/b.txt", b"b");
    emu.upload(ALICE, "/c.txt", b"c");
    emu.delete(ALICE, "/old.txt");

    let (pages, cursor) = drain(&emu, &access, cursor).await;
    let sizes: Vec<usize> = pages
        .iter()
        .map(|p| p["entries"].as_array().unwrap().len())
        .collect();
    assert_eq!(sizes, [2, 2, 1]);
    let more: Vec<bool> = pages
        .iter()
        .map(|p| p["has_more"].as_bool().unwrap())
        .collect();
    assert_eq!(more, [true, true, false]);
    let entries: Vec<Value> = pages
        .iter()
        .flat_map(|p| p["entries"].as_array().unwrap().clone())
        .collect();
    assert_eq!(
        tags_and_paths(&entries),
        [
            ("folder".into(), "/Docs".into()),
            ("file".into(), "/Docs/A.txt".into()),
            ("file".into(), "/Docs/b.txt".into()),
            ("file".into(), "/c.txt".into()),
            ("deleted".into(), "/old.txt".into()),
        ]
    );

    let file = &entries[1];
    assert_eq!(file["name"], json!("A.txt"));
    assert_eq!(file["path_lower"], json!("/docs/a.txt"));
    assert_eq!(file["size"], json!(5));
    assert_eq!(file["content_hash"], json!(content_hash(b"hello")));
    assert!(file["id"].as_str().unwrap().starts_with("id:"));
    let rev = file["rev"].as_str().unwrap();
    assert!(
        rev.len() >= 9 && rev.chars().all(|c| c.is_ascii_hexdigit()),
        "{rev}"
    );
    for field in ["client_modified", "server_modified"] {
        let t = file[field].as_str().unwrap();
        assert!(
            t.parse::<jiff::Timestamp>().is_ok() && t.ends_with('Z') && t.len() == 20,
            "{t}"
        );
    }
    let folder = &entries[0];
    assert_eq!(folder["name"], json!("Docs"));
    assert!(folder["id"].as_str().unwrap().starts_with("id:"));
    assert!(folder.get("rev").is_none());
    assert_eq!(
        entries[4],
        json!({".tag": "deleted", "name": "old.txt", "path_lower": "/old.txt", "path_display": "/old.txt"})
    );

    // Nothing new: one empty page.
    let (pages_again, cursor) = drain(&emu, &access, cursor).await;
    assert_eq!(pages_again.len(), 1);
    assert_eq!(pages_again[0]["entries"], json!([]));

    // An update keeps the id and gets a new rev; identical contents write nothing.
    emu.upload(ALICE, "/Docs/a.txt", b"hello again");
    emu.upload(ALICE, "/c.txt", b"c");
    let (later, _) = drain(&emu, &access, cursor).await;
    let updated = &later[0]["entries"][0];
    assert_eq!(later[0]["entries"].as_array().unwrap().len(), 1);
    assert_eq!(updated["id"], file["id"]);
    assert_ne!(updated["rev"], file["rev"]);
}

#[tokio::test]
async fn cursors_honour_path_and_recursion_and_report_states() {
    let emu = emulator().await;
    let (access, _) = tokens(&emu).await;
    emu.create_folder(ALICE, "/Team/Deep");
    let flat = latest_cursor(&emu, &access, json!({"path": "/team"})).await;
    let deep = latest_cursor(&emu, &access, json!({"path": "/Team", "recursive": true})).await;

    emu.upload(ALICE, "/Team/one.txt", b"1");
    emu.upload(ALICE, "/Team/Deep/two.txt", b"2");
    emu.upload(ALICE, "/elsewhere.txt", b"x");
    // Three writes to one file show up once, as its latest state.
    emu.upload(ALICE, "/Team/one.txt", b"11");
    emu.upload(ALICE, "/Team/one.txt", b"111");
    // Deleting a folder reports it and everything that was in it.
    emu.delete(ALICE, "/Team/Deep");

    let (flat_pages, _) = drain(&emu, &access, flat).await;
    assert_eq!(
        tags_and_paths(flat_pages[0]["entries"].as_array().unwrap()),
        [
            ("file".into(), "/Team/one.txt".into()),
            ("deleted".into(), "/Team/Deep".into()),
        ]
    );
    assert_eq!(flat_pages[0]["entries"][0]["size"], json!(3));
    let (deep_pages, _) = drain(&emu, &access, deep).await;
    assert_eq!(
        tags_and_paths(deep_pages[0]["entries"].as_array().unwrap()),
        [
            ("file".into(), "/Team/one.txt".into()),
            ("deleted".into(), "/Team/Deep".into()),
            ("deleted".into(), "/Team/Deep/two.txt".into()),
        ]
    );

    // Lookup errors of the folder argument.
    let (status, body) = rpc_json(
        &emu,
        &access,
        "/2/files/list_folder/get_latest_cursor",
        Some(json!({"path": "/missing"})),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(
        body["error"],
        json!({".tag": "path", "path": {".tag": "not_found"}})
    );
    assert_summary(&body, "path/not_found/");
    let (status, body) = rpc_json(
        &emu,
        &access,
        "/2/files/list_folder/get_latest_cursor",
        Some(json!({"path": "/Team/one.txt"})),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(body["error"]["path"][".tag"], json!("not_folder"));
    let (status, body) = rpc_json(
        &emu,
        &access,
        "/2/files/list_folder/get_latest_cursor",
        Some(json!({"path": "/", "recursive": true})),
    )
    .await;
    assert_eq!(status, 400);
    assert!(body.as_str().unwrap().contains("empty string"), "{body}");
    let (status, body) = rpc_json(
        &emu,
        &access,
        "/2/files/list_folder/get_latest_cursor",
        Some(json!({"path": "", "recursive": true, "bogus": 1})),
    )
    .await;
    assert_eq!(status, 400);
    assert!(
        body.as_str()
            .unwrap()
            .ends_with("request body: unknown field 'bogus'"),
        "{body}"
    );
}

#[tokio::test]
async fn list_folder_lists_then_continues_with_changes() {
    let emu = emulator().await;
    let (access, _) = tokens(&emu).await;
    emu.upload(ALICE, "/a/1.txt", b"1");
    emu.upload(ALICE, "/b.txt", b"b");
    emu.set_list_limit(2);
    let (status, first) = rpc_json(
        &emu,
        &access,
        "/2/files/list_folder",
        Some(json!({"path": "", "recursive": true})),
    )
    .await;
    assert_eq!(status, 200);
    assert_eq!(
        tags_and_paths(first["entries"].as_array().unwrap()),
        [
            ("folder".into(), "/a".into()),
            ("file".into(), "/a/1.txt".into())
        ]
    );
    assert_eq!(first["has_more"], json!(true));
    emu.upload(ALICE, "/c.txt", b"c");
    let (rest, _) = drain(&emu, &access, first["cursor"].as_str().unwrap().to_owned()).await;
    let entries: Vec<Value> = rest
        .iter()
        .flat_map(|p| p["entries"].as_array().unwrap().clone())
        .collect();
    assert_eq!(
        tags_and_paths(&entries),
        [
            ("file".into(), "/b.txt".into()),
            ("file".into(), "/c.txt".into())
        ]
    );
}

#[tokio::test]
async fn reset_and_bad_cursors() {
    let emu = emulator().await;
    let (access, _) = tokens(&emu).await;
    let cursor = latest_cursor(&emu, &access, json!({"path": "", "recursive": true})).await;

    // Another account's token.
    let code = emu.issue_code(KEY, BOB, None);
    let (_, body) = exchange(&emu, &code, None).await;
    let bob = body["access_token"].as_str().unwrap().to_owned();
    let (status, body) = rpc_json(
        &emu,
        &bob,
        "/2/files/list_folder/continue",
        Some(json!({"cursor": cursor})),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(body["error"][".tag"], json!("path"));

    // Garbage.
    let (status, body) = rpc_json(
        &emu,
        &access,
        "/2/files/list_folder/continue",
        Some(json!({"cursor": "garbage"})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!(
            "Error in call to API function \"files/list_folder/continue\": Invalid \"cursor\" parameter: 'garbage'"
        )
    );

    emu.reset_cursors(ALICE);
    let (status, body) = rpc_json(
        &emu,
        &access,
        "/2/files/list_folder/continue",
        Some(json!({"cursor": cursor})),
    )
    .await;
    assert_eq!(status, 409);
    assert_eq!(body["error"], json!({".tag": "reset"}));
    assert_summary(&body, "reset/");
    // A cursor issued after the reset works.
    let fresh = latest_cursor(&emu, &access, json!({"path": "", "recursive": true})).await;
    emu.upload(ALICE, "/new.txt", b"n");
    let (p, _) = drain(&emu, &access, fresh).await;
    assert_eq!(p[0]["entries"][0]["path_display"], json!("/new.txt"));
}

#[tokio::test]
async fn unknown_routes_are_404_and_recorded() {
    let emu = emulator().await;
    let r = http()
        .post(format!("{}/2/files/nope", emu.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert_eq!(emu.calls_to("/2/files/nope")[0].status, 404);
}

#[tokio::test]
async fn webhook_is_signed_like_dropbox() {
    let emu = emulator().await;
    let (tx, mut rx) = mpsc::unbounded_channel::<(HeaderMap, Bytes)>();
    let receiver = Router::new().route(
        "/webhook",
        post(move |headers: HeaderMap, body: Bytes| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((headers, body));
                StatusCode::OK
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, receiver).await });

    let r = emu
        .send_webhook(&format!("http://{addr}/webhook"), KEY, &[ALICE, BOB])
        .await;
    assert_eq!(r.status(), 200);
    let (headers, body) = rx.recv().await.unwrap();
    assert_eq!(headers["content-type"], "application/json");
    let signature = headers["x-dropbox-signature"].to_str().unwrap();
    assert_eq!(
        signature,
        hex::encode(hmac_sha256(SECRET.as_bytes(), &body))
    );
    assert_ne!(signature, hex::encode(hmac_sha256(b"other secret", &body)));
    let parsed: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        parsed,
        json!({
            "list_folder": {"accounts": [ALICE, BOB]},
            "delta": {"users": [emu.uid(ALICE), emu.uid(BOB)]},
        })
    );
}

#[test]
fn content_hash_matches_dropbox_definition() {
    use sha2::{Digest, Sha256};
    // Empty contents: SHA-256 of nothing (the spec's example value).
    assert_eq!(
        content_hash(b""),
        "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    );
    // Two blocks: hash of the concatenated block hashes.
    let data = vec![7u8; 4 * 1024 * 1024 + 10];
    let mut concat = Vec::new();
    concat.extend_from_slice(&Sha256::digest(&data[..4 * 1024 * 1024]));
    concat.extend_from_slice(&Sha256::digest(&data[4 * 1024 * 1024..]));
    assert_eq!(content_hash(&data), hex::encode(Sha256::digest(&concat)));
}

#[tokio::test]
async fn cursors_encode_their_position_and_cannot_be_forged() {
    let emu = emulator().await;
    let (access, _) = tokens(&emu).await;
    let root = json!({"path": "", "recursive": true, "include_deleted": true});
    emu.upload(ALICE, "/a.txt", b"a");

    // The same position: the same string, however it was reached.
    let first = latest_cursor(&emu, &access, root.clone()).await;
    let again = latest_cursor(&emu, &access, root.clone()).await;
    assert_eq!(first, again, "two get_latest_cursor at one position");
    let (pages, unchanged) = drain(&emu, &access, first.clone()).await;
    assert_eq!(pages[0]["entries"], json!([]));
    assert_eq!(unchanged, first, "nothing new: the cursor stays");

    emu.set_list_limit(1);
    for name in ["b", "c", "d"] {
        emu.upload(ALICE, &format!("/{name}.txt"), name.as_bytes());
    }
    // Two readers of one cursor (two replicas) end at the same cursor, page by page.
    let (pages_1, end_1) = drain(&emu, &access, first.clone()).await;
    let (pages_2, end_2) = drain(&emu, &access, first.clone()).await;
    let cursors =
        |pages: &[Value]| -> Vec<Value> { pages.iter().map(|p| p["cursor"].clone()).collect() };
    assert_eq!(pages_1.len(), 3);
    assert_eq!(cursors(&pages_1), cursors(&pages_2));
    assert_eq!(end_1, end_2);
    assert_ne!(end_1, first, "a new position, a new cursor");
    assert_eq!(end_1, latest_cursor(&emu, &access, root.clone()).await);
    assert_eq!(emu.cursor_position(&first), Some(1));
    assert_eq!(emu.cursor_position(&end_1), Some(4));
    assert_eq!(emu.change_log(ALICE).len(), 4);
    assert_eq!(emu.change_log(ALICE)[3]["path_display"], json!("/d.txt"));

    // Bound to the folder and the account: other folder, other account, other string.
    emu.create_folder(ALICE, "/Sub");
    let head = latest_cursor(&emu, &access, root.clone()).await;
    let sub = latest_cursor(&emu, &access, json!({"path": "/sub", "recursive": true})).await;
    assert_ne!(head, sub);
    let code = emu.issue_code(KEY, BOB, None);
    let (_, body) = exchange(&emu, &code, None).await;
    let bob = body["access_token"].as_str().unwrap().to_owned();
    let bobs = latest_cursor(&emu, &bob, root.clone()).await;
    assert_ne!(bobs, head);
    let (status, _) = rpc_json(
        &emu,
        &bob,
        "/2/files/list_folder/continue",
        Some(json!({"cursor": head})),
    )
    .await;
    assert_eq!(status, 409, "another account's cursor");

    // A string that was never issued (one character changed) is refused.
    let mut forged = head.clone().into_bytes();
    forged[0] = if forged[0] == b'A' { b'B' } else { b'A' };
    let forged = String::from_utf8(forged).unwrap();
    let (status, _) = rpc_json(
        &emu,
        &access,
        "/2/files/list_folder/continue",
        Some(json!({"cursor": forged})),
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(emu.cursor_position(&forged), None);

    // A reset changes the epoch: the same position has a new string.
    emu.reset_cursors(ALICE);
    let after_reset = latest_cursor(&emu, &access, root).await;
    assert_ne!(after_reset, head);
    assert_eq!(
        emu.cursor_position(&after_reset),
        emu.cursor_position(&head)
    );
}

/// GET `/oauth2/authorize` with `query`, not following the redirect.
async fn authorize(emu: &Emulator, query: &[(&str, &str)]) -> reqwest::Response {
    let url = reqwest::Url::parse_with_params(&format!("{}/oauth2/authorize", emu.url), query)
        .expect("authorize url");
    http_client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client")
        .get(url)
        .send()
        .await
        .expect("authorize request")
}

fn location_query(r: &reqwest::Response) -> (String, std::collections::HashMap<String, String>) {
    let location = r
        .headers()
        .get("location")
        .expect("a redirect")
        .to_str()
        .unwrap();
    let url = reqwest::Url::parse(location).expect("location is a URL");
    let base = format!("{}://{}{}", url.scheme(), url.authority(), url.path());
    (base, url.query_pairs().into_owned().collect())
}

const LOOPBACK: &str = "http://127.0.0.1:53682/";
/// RFC 7636 Appendix B.
const VERIFIER: &str = "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk";
const CHALLENGE: &str = "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM";

#[tokio::test]
async fn authorize_redirects_with_a_pkce_bound_code() {
    let emu = emulator().await;
    emu.add_redirect_uri(KEY, LOOPBACK);
    emu.script_approval(
        KEY,
        support::dropbox::Approval::Approve {
            account_id: ALICE.into(),
        },
    );
    let query = [
        ("client_id", KEY),
        ("response_type", "code"),
        ("token_access_type", "offline"),
        ("redirect_uri", LOOPBACK),
        ("state", "s t&ate"),
        ("code_challenge", CHALLENGE),
        ("code_challenge_method", "S256"),
    ];
    let r = authorize(&emu, &query).await;
    assert_eq!(r.status(), 302);
    let (base, params) = location_query(&r);
    assert_eq!(base, LOOPBACK);
    assert_eq!(params["state"], "s t&ate");
    let code = params["code"].clone();

    // Without the verifier, with a wrong one, or without the redirect URI: refused.
    let base_form = [
        ("grant_type", "authorization_code"),
        ("code", code.as_str()),
        ("client_id", KEY),
        ("client_secret", SECRET),
        ("redirect_uri", LOOPBACK),
    ];
    let (status, body) = token(&emu, &base_form).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );
    let mut wrong = base_form.to_vec();
    wrong.push(("code_verifier", "x".repeat(43).leak()));
    let (status, body) = token(&emu, &wrong).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant")),
        "{body}"
    );
    assert_eq!(body["error_description"], "invalid code verifier");
    let (status, body) = token(
        &emu,
        &[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("client_id", KEY),
            ("client_secret", SECRET),
            ("code_verifier", VERIFIER),
        ],
    )
    .await;
    assert_eq!(
        (status, body["error_description"].as_str()),
        (400, Some("redirect_uri mismatch"))
    );
    // The right verifier and redirect URI: tokens for the approving account.
    let mut right = base_form.to_vec();
    right.push(("code_verifier", VERIFIER));
    let (status, body) = token(&emu, &right).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["account_id"], ALICE);
}

#[tokio::test]
async fn authorize_refuses_unregistered_redirects_and_reports_denials() {
    let emu = emulator().await;
    emu.add_redirect_uri(KEY, LOOPBACK);
    let q = |redirect: &'static str| {
        vec![
            ("client_id", KEY),
            ("response_type", "code"),
            ("redirect_uri", redirect),
            ("state", "st"),
        ]
    };
    // Nobody scripted: nothing happens.
    assert_eq!(authorize(&emu, &q(LOOPBACK)).await.status(), 400);
    emu.script_approval(KEY, support::dropbox::Approval::Deny);
    // An unregistered redirect URI is an error page, never a redirect.
    let r = authorize(&emu, &q("http://127.0.0.1:1/")).await;
    assert_eq!(r.status(), 400);
    assert!(r.headers().get("location").is_none());
    let r = authorize(&emu, &q(LOOPBACK)).await;
    assert_eq!(r.status(), 302);
    let (_, params) = location_query(&r);
    assert_eq!(params["error"], "access_denied");
    assert_eq!(params["state"], "st");
    assert!(!params.contains_key("code"));
    // A bad challenge is refused on the page.
    emu.script_approval(
        KEY,
        support::dropbox::Approval::Approve {
            account_id: ALICE.into(),
        },
    );
    let mut bad = q(LOOPBACK);
    bad.push(("code_challenge", "short"));
    bad.push(("code_challenge_method", "S256"));
    assert_eq!(authorize(&emu, &bad).await.status(), 400);
    // Without a redirect URI the page shows the code; the exchange sends none.
    let r = authorize(
        &emu,
        &[
            ("client_id", KEY),
            ("response_type", "code"),
            ("code_challenge", CHALLENGE),
            ("code_challenge_method", "S256"),
        ],
    )
    .await;
    assert_eq!(r.status(), 200);
    let page = r.text().await.unwrap();
    let code = page
        .split("value=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("the page shows the code")
        .to_owned();
    let (status, body) = token(
        &emu,
        &[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("client_id", KEY),
            ("client_secret", SECRET),
            ("code_verifier", VERIFIER),
        ],
    )
    .await;
    assert_eq!(status, 200, "{body}");
}

/// POST /2/files/list_folder/longpoll without a token; returns (status, body).
async fn longpoll(emu: &Emulator, args: Value) -> (u16, Value) {
    let r = http()
        .post(format!("{}/2/files/list_folder/longpoll", emu.url))
        .json(&args)
        .send()
        .await
        .expect("longpoll request");
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (
        status,
        serde_json::from_str(&text).unwrap_or(Value::String(text)),
    )
}

#[tokio::test]
async fn longpoll_is_noauth_blocks_until_a_change_in_scope_and_knows_reset() {
    let emu = emulator().await;
    let access = emu.issue_long_lived_token(KEY, ALICE);
    let cursor = latest_cursor(&emu, &access, json!({"path": "", "recursive": true})).await;
    emu.create_folder(ALICE, "/Other");
    let scoped = latest_cursor(&emu, &access, json!({"path": "/Other", "recursive": true})).await;

    // A token is refused on this route (it is `noauth`).
    let r = http()
        .post(format!("{}/2/files/list_folder/longpoll", emu.url))
        .bearer_auth(&access)
        .json(&json!({"cursor": cursor}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    assert!(r.text().await.unwrap().contains("Authorization header"));
    // Arguments as files.stone has them.
    let (status, _) = longpoll(&emu, json!({"cursor": cursor, "timeout": 29})).await;
    assert_eq!(status, 400);
    let (status, _) = longpoll(&emu, json!({"cursor": cursor, "timeout": 481})).await;
    assert_eq!(status, 400);
    let (status, _) = longpoll(&emu, json!({"cursor": cursor, "extra": 1})).await;
    assert_eq!(status, 400);
    let (status, _) = longpoll(&emu, json!({"cursor": "garbage"})).await;
    assert_eq!(status, 400);

    // Blocks until a change in the cursor's scope; another account's or
    // another folder's changes do not wake it.
    emu.set_longpoll_max_wait(Some(Duration::from_millis(1500)));
    let waiting = tokio::spawn({
        let (url, scoped) = (emu.url.clone(), scoped.clone());
        async move {
            let t = std::time::Instant::now();
            let r = http()
                .post(format!("{url}/2/files/list_folder/longpoll"))
                .json(&json!({"cursor": scoped, "timeout": 30}))
                .send()
                .await
                .unwrap();
            (t.elapsed(), r.json::<Value>().await.unwrap())
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(emu.longpolls_waiting(), 1);
    emu.upload(BOB, "/Other/bob.txt", b"b");
    emu.upload(ALICE, "/elsewhere.txt", b"a");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(emu.longpolls_waiting(), 1, "woken by a change out of scope");
    emu.upload(ALICE, "/Other/in.txt", b"x");
    let (took, body) = waiting.await.unwrap();
    assert_eq!(body, json!({"changes": true}));
    assert!(took < Duration::from_millis(1500), "{took:?}");

    // Nothing new: the (shortened) timeout answers `changes: false`, with a
    // backoff when asked for.
    let fresh = latest_cursor(&emu, &access, json!({"path": "", "recursive": true})).await;
    emu.set_longpoll_backoff(Some(7));
    let (status, body) = longpoll(&emu, json!({"cursor": fresh})).await;
    assert_eq!(status, 200);
    assert_eq!(body, json!({"changes": false, "backoff": 7}));
    emu.set_longpoll_backoff(None);
    // Changes already there answer at once.
    let (_, body) = longpoll(&emu, json!({"cursor": cursor})).await;
    assert_eq!(body, json!({"changes": true}));

    // A reset cursor: the route error `reset` (409, as on continue).
    emu.reset_cursors(ALICE);
    let (status, body) = longpoll(&emu, json!({"cursor": fresh})).await;
    assert_eq!(status, 409);
    assert_eq!(body["error"], json!({".tag": "reset"}));
    assert_summary(&body, "reset/");
    assert!(
        emu.calls_to("/2/files/list_folder/longpoll")
            .iter()
            .all(|c| c.header("authorization").is_none() || c.status == 400)
    );
}

#[tokio::test]
async fn check_app_authenticates_the_app_key_and_secret_and_echoes() {
    let emu = emulator().await;
    let check = |secret: &'static str| {
        http()
            .post(format!("{}/2/check/app", emu.url))
            .basic_auth(KEY, Some(secret))
            .json(&json!({"query": "ping"}))
            .send()
    };
    let ok = check(SECRET).await.expect("check/app");
    assert_eq!(ok.status(), 200);
    assert_eq!(
        ok.json::<Value>().await.expect("json"),
        json!({"result": "ping"})
    );
    let refused = check("wrong").await.expect("check/app");
    assert_eq!(refused.status(), 401);
    // Nothing else happens: no token, no grant.
    assert_eq!(emu.live_grants(), 0);
}

#[tokio::test]
async fn refresh_tokens_do_not_rotate_unless_asked_and_revoking_kills_the_grant() {
    let emu = emulator().await;
    let (access, rt) = tokens(&emu).await;
    // Dropbox: the refresh answer carries no refresh token; the one used stays good.
    let (status, body) = refresh(&emu, &rt).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.get("refresh_token").is_none(), "{body}");
    assert!(emu.is_refresh_token_valid(&rt));

    // Rotation (RFC 6749 §6, a stricter Dropbox): a new one per refresh; the
    // old one works until the new one is used, then never again.
    emu.rotate_refresh_tokens(true);
    let (_, body) = refresh(&emu, &rt).await;
    let rt2 = body["refresh_token"].as_str().expect("rotated").to_owned();
    assert!(emu.is_refresh_token_valid(&rt) && emu.is_refresh_token_valid(&rt2));
    let (status, body) = refresh(&emu, &rt2).await;
    assert_eq!(status, 200, "{body}");
    assert!(
        !emu.is_refresh_token_valid(&rt),
        "the used token's predecessor retired"
    );
    let (status, body) = refresh(&emu, &rt).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_grant"))
    );

    // Revoking any access token of the grant kills all of it.
    assert_eq!(emu.live_grants(), 1);
    let (status, _) = rpc_json(&emu, &access, "/2/auth/token/revoke", None).await;
    assert_eq!(status, 200);
    assert_eq!(emu.live_grants(), 0);
    assert!(emu.live_oauth_access_tokens().is_empty());
}
