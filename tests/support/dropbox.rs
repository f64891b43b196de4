//! An in-memory emulator of the parts of the Dropbox API the operator talks to:
//! `GET /oauth2/authorize` (a scripted person approves or denies),
//! `POST /oauth2/token` (with PKCE), `/2/check/app`, `/2/users/get_current_account`,
//! `/2/auth/token/revoke`,
//! `/2/files/list_folder`, `/2/files/list_folder/continue`,
//! `/2/files/list_folder/get_latest_cursor`, `/2/files/list_folder/longpoll`
//! (the notify host's route, served on the same listener), plus Dropbox-style
//! webhook notifications, fault injection and a record of every call.
//!
//! Sources followed (and where a detail could not be confirmed, the comment at that
//! spot says so):
//! - Route names, argument, result and error unions: the Stone spec
//!   (github.com/dropbox/dropbox-api-spec: `auth.stone` for `AuthError`,
//!   `RateLimitError` and `token/revoke`; `users.stone`/`users_common.stone`/
//!   `common.stone` for `FullAccount`, `Name`, `RootInfo`; `files.stone` for
//!   `ListFolderArg`, `ListFolderResult`, `ListFolderContinueError`, `LookupError`,
//!   `FileMetadata`/`FolderMetadata`/`DeletedMetadata` and the `WriteMode` rule that
//!   writing identical contents writes nothing; `ListFolderLongpollArg`,
//!   `ListFolderLongpollResult`, `ListFolderLongpollError` and the route's
//!   `auth = "noauth"`, `host = "notify"`).
//! - How errors travel (status codes, JSON vs plain text): the Dropbox HTTP docs'
//!   error section and Error Handling Guide, and how the official Python SDK
//!   decodes answers (`dropbox_client.py`: 400 = plain-text bad input, 401 = JSON
//!   `AuthError` with `Content-Type: application/json`, 409 = JSON route error,
//!   429 = `RateLimitError` + `Retry-After`, 5xx = text).
//! - OAuth: the OAuth guide / "Using OAuth 2.0 with offline access" (token
//!   response fields, `expires_in` 14400, refresh answers without a new refresh
//!   token) and answers of the real service quoted in public bug reports (cited at
//!   each error below). Dropbox does not rotate refresh tokens: its refresh answer
//!   has none, and the official SDKs keep using the one they have
//!   (dropbox-sdk-python's `refresh_access_token` reads only `access_token` and
//!   `expires_in`). RFC 6749 §6 lets a server rotate them, and the client must
//!   cope (it stores a refresh token an answer carries); a row can turn rotation
//!   on ([`Emulator::rotate_refresh_tokens`]) to see a refresh token used twice,
//!   which a stale leader would do, where Dropbox would let it pass.
//! - `check/app` (check.stone): app authentication (HTTP Basic with the app key
//!   and secret), echoes `query`, no other effect. `/oauth2/authorize`: the HTTP docs' parameters
//!   (`client_id`, `response_type`, `redirect_uri` registered exactly in the App
//!   Console and optional for the code flow, `state` echoed back,
//!   `code_challenge` + `code_challenge_method` `S256`/`plain` for PKCE,
//!   `token_access_type`); PKCE verification follows RFC 7636 §4.6.
//! - Content hash: the documented Dropbox content-hash algorithm (SHA-256 over the
//!   concatenated SHA-256 digests of 4 MiB blocks).
//! - Webhooks: the webhooks reference (POST, JSON body with `list_folder.accounts`
//!   and `delta.users`, `X-Dropbox-Signature` = hex HMAC-SHA256 of the body keyed
//!   with the app secret).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes, to_bytes};
use axum::extract::{Request, State as AxState};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use hmac::{Hmac, KeyInit, Mac};
use serde_json::{Map, Value, json};
use sha2::{Digest, Sha256};

/// Dropbox's short-lived access tokens live four hours (`expires_in: 14400`).
const DEFAULT_ACCESS_TTL: Duration = Duration::from_secs(14_400);
const DEFAULT_CODE_TTL: Duration = Duration::from_secs(600);
/// `ListFolderArg.limit` is `UInt32(max_value=2000)`.
const MAX_LIST_LIMIT: usize = 2000;
const DEFAULT_SCOPE: &str = "account_info.read files.metadata.read";
/// The content hash works on 4 MiB blocks.
const HASH_BLOCK: usize = 4 * 1024 * 1024;
/// The three `Content-Type`s Dropbox accepts on RPC routes.
const JSON_CONTENT_TYPES: [&str; 3] = [
    "application/json",
    "application/json; charset=utf-8",
    "text/plain; charset=dropbox-cors-hack",
];

/// One request the emulator received (including ones answered by an injected fault).
#[derive(Clone, Debug)]
pub struct Call {
    pub method: String,
    /// The request path, e.g. `/oauth2/token`.
    pub route: String,
    pub status: u16,
    /// Request headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Form fields (body, and for `/oauth2/token` also the query string).
    pub form: BTreeMap<String, String>,
    /// The raw request body (lossy UTF-8).
    pub body: String,
    /// When the request arrived.
    pub at: Instant,
}

impl Call {
    /// The first value of request header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// The Dropbox API emulator. Dropping it stops the server.
pub struct Emulator {
    /// Base URL, `http://127.0.0.1:PORT`; serves the API, `/oauth2/token` and
    /// the notify host's `/2/files/list_folder/longpoll`.
    pub url: String,
    state: Shared,
    longpolls: Arc<AtomicUsize>,
    server: tokio::task::AbortHandle,
    http: reqwest::Client,
}

type Shared = Arc<Mutex<State>>;

impl Drop for Emulator {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Emulator {
    /// Binds 127.0.0.1:0 and serves in a background task of the current tokio runtime.
    pub async fn start() -> Emulator {
        Emulator::start_on(std::net::Ipv4Addr::LOCALHOST.into()).await
    }

    /// Like [`Emulator::start`], on `ip` (the e2e node's address, which pods reach).
    pub async fn start_on(ip: std::net::IpAddr) -> Emulator {
        let state: Shared = Arc::new(Mutex::new(State::new()));
        let longpolls = Arc::new(AtomicUsize::new(0));
        let listener = tokio::net::TcpListener::bind((ip, 0))
            .await
            .expect("bind the Dropbox emulator");
        let addr = listener.local_addr().expect("emulator local address");
        let app = Router::new()
            .fallback(handle)
            .with_state((state.clone(), longpolls.clone()));
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Emulator {
            url: format!("http://{addr}"),
            state,
            longpolls,
            server: server.abort_handle(),
            http: http_client(),
        }
    }

    fn st(&self) -> MutexGuard<'_, State> {
        self.state.lock().expect("emulator state poisoned")
    }

    // ---- apps and accounts -------------------------------------------------

    /// Registers an app (its key is the OAuth `client_id`, its secret the `client_secret`).
    pub fn add_app(&self, app_key: &str, app_secret: &str) {
        self.st().apps.insert(
            app_key.to_owned(),
            App {
                secret: app_secret.to_owned(),
                scope: DEFAULT_SCOPE.to_owned(),
                redirect_uris: Vec::new(),
                approval: None,
            },
        );
    }

    /// Adds a redirect URI to the app's list in the App Console:
    /// `/oauth2/authorize` refuses any other (exact match).
    pub fn add_redirect_uri(&self, app_key: &str, uri: &str) {
        let mut st = self.st();
        let app = st
            .apps
            .get_mut(app_key)
            .expect("add_redirect_uri: unknown app");
        app.redirect_uris.push(uri.to_owned());
    }

    /// What the person who opens the app's `/oauth2/authorize` link does from
    /// now on: approve as `account_id`, or deny. Unscripted, the page answers
    /// 400 (nobody is there to click).
    pub fn script_approval(&self, app_key: &str, approval: Approval) {
        let mut st = self.st();
        if let Approval::Approve { account_id } | Approval::Ask { account_id } = &approval {
            assert!(
                st.accounts.contains_key(account_id),
                "script_approval: unknown account {account_id}"
            );
        }
        st.apps
            .get_mut(app_key)
            .expect("script_approval: unknown app")
            .approval = Some(approval);
    }

    /// The app's permissions (space-separated scopes): what the token endpoint
    /// reports, and what tokens approved from now on may do. A route needing a
    /// scope the token's grant lacks answers 401 `missing_scope`; like Dropbox,
    /// granting a permission later takes a new approval (a new code).
    pub fn set_app_scope(&self, app_key: &str, scope: &str) {
        let mut st = self.st();
        let app = st
            .apps
            .get_mut(app_key)
            .expect("set_app_scope: unknown app");
        app.scope = scope.to_owned();
    }

    /// Adds a user. Real account ids are `dbid:` + 35 characters (40 in all, see
    /// `users_common.AccountId`); any string works here. A numeric uid (the one
    /// webhooks carry in `delta.users`) and a namespace id are assigned.
    pub fn add_account(&self, account_id: &str, email: &str, display_name: &str) {
        let n = next_number();
        self.st().accounts.insert(
            account_id.to_owned(),
            Account {
                account_id: account_id.to_owned(),
                email: email.to_owned(),
                display_name: display_name.to_owned(),
                uid: 100_000_000 + n,
                namespace_id: 1_000_000_000 + n,
                files: Files::default(),
                epoch: 0,
            },
        );
    }

    /// The numeric user id of an account (as in the token response's `uid` and
    /// webhook `delta.users`).
    pub fn uid(&self, account_id: &str) -> u64 {
        self.st()
            .accounts
            .get(account_id)
            .expect("uid: unknown account")
            .uid
    }

    /// A single-use authorization code for (app, account), as the /oauth2/authorize
    /// redirect would deliver it with token_access_type=offline. If redirect_uri is
    /// Some, the exchange must send the same redirect_uri.
    pub fn issue_code(
        &self,
        app_key: &str,
        account_id: &str,
        redirect_uri: Option<&str>,
    ) -> String {
        let st = self.st();
        assert!(
            st.apps.contains_key(app_key),
            "issue_code: unknown app {app_key}"
        );
        assert!(
            st.accounts.contains_key(account_id),
            "issue_code: unknown account {account_id}"
        );
        // Real codes are 43 characters of URL-safe base64.
        let code = random_string(32);
        drop(st);
        self.issue_code_value(app_key, account_id, redirect_uri, &code);
        code
    }

    /// Like [`Emulator::issue_code`], with a code chosen by the caller (e.g. the
    /// placeholder of examples/secrets.yaml for `make dev`).
    pub fn issue_code_value(
        &self,
        app_key: &str,
        account_id: &str,
        redirect_uri: Option<&str>,
        code: &str,
    ) {
        let mut st = self.st();
        let expires_at = Instant::now() + st.code_ttl;
        st.codes.insert(
            code.to_owned(),
            Code {
                app_key: app_key.to_owned(),
                account_id: account_id.to_owned(),
                redirect_uri: redirect_uri.map(str::to_owned),
                challenge: None,
                expires_at,
            },
        );
    }

    /// A long-lived access token (legacy "generated access token"), never expires;
    /// for apiKey instances.
    pub fn issue_long_lived_token(&self, app_key: &str, account_id: &str) -> String {
        let mut st = self.st();
        assert!(st.apps.contains_key(app_key), "unknown app {app_key}");
        assert!(
            st.accounts.contains_key(account_id),
            "unknown account {account_id}"
        );
        // Legacy long-lived tokens were 64 characters without the `sl.` prefix.
        let token = random_string(48);
        st.access_tokens.insert(
            token.clone(),
            AccessToken {
                app_key: app_key.to_owned(),
                account_id: account_id.to_owned(),
                grant: None,
                expires_at: None,
            },
        );
        token
    }

    /// Lifetime of access tokens minted from now on (default 14400 s). The token
    /// response's `expires_in` is this in whole seconds, at least 1.
    pub fn set_access_token_ttl(&self, ttl: Duration) {
        self.st().access_ttl = ttl;
    }

    /// Lifetime of authorization codes issued from now on (default 600 s).
    pub fn set_code_ttl(&self, ttl: Duration) {
        self.st().code_ttl = ttl;
    }

    /// From now on a successful code exchange consumes the code, mints the tokens
    /// and records the call at once, and only then waits `delay` before answering
    /// (a client that gave up meanwhile never sees the tokens, but the code is
    /// spent, as on the real service); zero turns it off. Unlike
    /// [`Emulator::set_latency`], which waits before the request is handled.
    pub fn hang_after_consuming_code(&self, delay: Duration) {
        self.st().hang_after_code = delay;
    }

    /// Access tokens minted from a refresh token (code exchange or refresh) that
    /// `/2/` routes would accept right now: what a revocation should have killed.
    pub fn live_oauth_access_tokens(&self) -> Vec<String> {
        let st = self.st();
        st.access_tokens
            .iter()
            .filter(|(_, t)| t.grant.is_some())
            .filter(|(token, _)| st.check_access_token(token).is_ok())
            .map(|(token, _)| token.clone())
            .collect()
    }

    /// Grants (a code exchange's refresh token family) not revoked: each can
    /// still mint access tokens, even when all its access tokens expired.
    pub fn live_grants(&self) -> usize {
        self.st().grants.len()
    }

    /// Whether the grant that exchanging `code` created is still alive (None:
    /// the code was never exchanged).
    pub fn grant_of_code_alive(&self, code: &str) -> Option<bool> {
        let st = self.st();
        st.code_grants
            .get(code)
            .map(|id| st.grants.contains_key(id))
    }

    /// The user disconnected the app: every refresh token (and access token) of the
    /// account is revoked, and codes not yet exchanged die with the grant.
    pub fn revoke_account_tokens(&self, account_id: &str) {
        let mut st = self.st();
        let ids: Vec<u64> = st
            .grants
            .iter()
            .filter(|(_, g)| g.account_id == account_id)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            st.revoke_grant(id);
        }
        st.access_tokens.retain(|_, t| t.account_id != account_id);
        st.codes.retain(|_, c| c.account_id != account_id);
    }

    /// From now on a refresh answer carries a new refresh token (RFC 6749 §6
    /// allows it; Dropbox does not do it, see the module's sources). The refresh
    /// token used stays good until the new one is first used (a lost answer
    /// does not burn the grant); then only the new one works. A refresh token
    /// that a later refresh replaced is refused (`invalid_grant`).
    pub fn rotate_refresh_tokens(&self, on: bool) {
        self.st().rotate_refresh_tokens = on;
    }

    /// Whether `token` would be accepted by the `/2/` routes right now.
    pub fn is_access_token_valid(&self, token: &str) -> bool {
        self.st().check_access_token(token).is_ok()
    }

    /// Whether `token` is a live refresh token.
    pub fn is_refresh_token_valid(&self, token: &str) -> bool {
        self.st().refresh_tokens.contains_key(token)
    }

    // ---- fault injection ---------------------------------------------------

    /// The next `count` requests to `route` (a path, or `"*"` for every route) get
    /// `status` with a Dropbox-like body instead of being handled.
    pub fn fail_next(&self, route: &str, count: usize, status: u16) {
        self.st().faults.push(Fault {
            route: route.to_owned(),
            kind: FaultKind::Status(status),
            remaining: Some(count),
            until: None,
        });
    }

    /// Every request to `route` fails with `status` for `duration` from now.
    pub fn fail_for(&self, route: &str, duration: Duration, status: u16) {
        self.st().faults.push(Fault {
            route: route.to_owned(),
            kind: FaultKind::Status(status),
            remaining: None,
            until: Some(Instant::now() + duration),
        });
    }

    /// The next `count` requests to `route` get 429 `too_many_requests` with
    /// `Retry-After: retry_after_secs`.
    pub fn rate_limit_next(&self, route: &str, count: usize, retry_after_secs: u64) {
        self.st().faults.push(Fault {
            route: route.to_owned(),
            kind: FaultKind::RateLimit(retry_after_secs),
            remaining: Some(count),
            until: None,
        });
    }

    /// [`Emulator::rate_limit_next`] with `Retry-After` as an HTTP date
    /// `retry_after_secs` from now. Dropbox documents seconds; a date is what
    /// RFC 9110 also allows and an HTTP intermediary in front of Dropbox may
    /// send, so clients must accept both.
    pub fn rate_limit_next_with_date(&self, route: &str, count: usize, retry_after_secs: u64) {
        self.st().faults.push(Fault {
            route: route.to_owned(),
            kind: FaultKind::RateLimitDate(retry_after_secs),
            remaining: Some(count),
            until: None,
        });
    }

    /// Every request to `route` (or `"*"`) waits `latency` before it is handled;
    /// zero removes it. The request is still handled (and recorded) when the client
    /// gave up meanwhile, as a real server would: a timed-out code exchange has
    /// still used the code.
    pub fn set_latency(&self, route: &str, latency: Duration) {
        let mut st = self.st();
        if latency.is_zero() {
            st.latency.remove(route);
        } else {
            st.latency.insert(route.to_owned(), latency);
        }
    }

    /// From now on every `list_folder/longpoll` answer carries `backoff: secs`
    /// (`ListFolderLongpollResult.backoff`); None removes it.
    pub fn set_longpoll_backoff(&self, secs: Option<u64>) {
        self.st().longpoll_backoff = secs;
    }

    /// Long-polls wait at most `wait` (instead of their `timeout`) before they
    /// answer `changes: false`; None restores the requested timeout. Lets tests
    /// see timeouts without waiting 30 s.
    pub fn set_longpoll_max_wait(&self, wait: Option<Duration>) {
        self.st().longpoll_max_wait = wait;
    }

    /// Long-polls waiting for changes right now.
    pub fn longpolls_waiting(&self) -> usize {
        self.longpolls.load(Ordering::SeqCst)
    }

    // ---- call records ------------------------------------------------------

    /// Every request so far, in arrival order of completion.
    pub fn calls(&self) -> Vec<Call> {
        self.st().calls.clone()
    }

    /// The requests to one route (a path such as `/oauth2/token`).
    pub fn calls_to(&self, route: &str) -> Vec<Call> {
        self.st()
            .calls
            .iter()
            .filter(|c| c.route == route)
            .cloned()
            .collect()
    }

    // ---- files -------------------------------------------------------------

    /// Writes a file, creating missing parent folders (as Dropbox does), or
    /// updates it with a new rev. Identical contents write nothing (`WriteMode`).
    pub fn upload(&self, account_id: &str, path: &str, contents: &[u8]) {
        let mut st = self.st();
        st.account_mut(account_id).files.upload(path, contents);
        st.changed.send_modify(|n| *n += 1);
    }

    /// Creates a folder (and missing parents); an existing folder is left alone.
    pub fn create_folder(&self, account_id: &str, path: &str) {
        let mut st = self.st();
        st.account_mut(account_id).files.create_folder(path);
        st.changed.send_modify(|n| *n += 1);
    }

    /// Deletes a file or a folder with everything in it.
    pub fn delete(&self, account_id: &str, path: &str) {
        let mut st = self.st();
        st.account_mut(account_id).files.delete(path);
        st.changed.send_modify(|n| *n += 1);
    }

    /// Every cursor issued so far for the account answers `reset`.
    pub fn reset_cursors(&self, account_id: &str) {
        let mut st = self.st();
        st.account_mut(account_id).epoch += 1;
        st.changed.send_modify(|n| *n += 1);
    }

    /// The journal position a cursor issued here stands at (changes of the
    /// account before it are reported), `None` for a string never issued. Lets
    /// tests check how far a committed cursor has moved.
    pub fn cursor_position(&self, cursor: &str) -> Option<usize> {
        self.st().cursors.get(cursor).map(|c| c.pos)
    }

    /// Every change of the account so far, in commit order: the metadata
    /// list_folder/continue reports for it (`path_display`, `.tag`, ...), with
    /// its journal position at index i.
    pub fn change_log(&self, account_id: &str) -> Vec<Value> {
        self.st()
            .accounts
            .get(account_id)
            .expect("change_log: unknown account")
            .files
            .journal
            .iter()
            .map(|(_, meta)| meta.clone())
            .collect()
    }

    /// What is at every path the account's change log mentions, now: the file
    /// or folder metadata list_folder/continue reports for it, or a `deleted`
    /// entry for a path that is gone. Keyed by `path_lower`. The record a
    /// receiver's last event per path must match.
    pub fn final_states(&self, account_id: &str) -> BTreeMap<String, Value> {
        let st = self.st();
        let files = &st
            .accounts
            .get(account_id)
            .expect("final_states: unknown account")
            .files;
        files
            .journal
            .iter()
            .map(|(path, meta)| {
                let now = match files.nodes.get(path) {
                    Some(node) => node.metadata(),
                    None => deleted_metadata(meta["path_display"].as_str().unwrap_or(path)),
                };
                (path.clone(), now)
            })
            .collect()
    }

    /// Max entries per list_folder(/continue) page; default 2000.
    pub fn set_list_limit(&self, limit: usize) {
        assert!(limit >= 1, "list limit must be at least 1");
        self.st().list_limit = limit;
    }

    // ---- webhooks ----------------------------------------------------------

    /// Sends a webhook notification for `accounts` to `url` exactly as Dropbox does:
    /// POST, JSON body {"list_folder": {"accounts": [...]}, "delta": {"users":
    /// [uids...]}}, header X-Dropbox-Signature = hex HMAC-SHA256(app secret, raw
    /// body), Content-Type application/json.
    ///
    /// Panics when the request cannot be sent; see [`Emulator::try_send_webhook`].
    pub async fn send_webhook(
        &self,
        url: &str,
        app_key: &str,
        accounts: &[&str],
    ) -> reqwest::Response {
        self.try_send_webhook(url, app_key, accounts)
            .await
            .unwrap_or_else(|e| panic!("send webhook to {url}: {e}"))
    }

    /// [`Emulator::send_webhook`], returning transport errors (receiver not up yet, ...).
    pub async fn try_send_webhook(
        &self,
        url: &str,
        app_key: &str,
        accounts: &[&str],
    ) -> reqwest::Result<reqwest::Response> {
        let (body, signature) = self.webhook_body(app_key, accounts);
        self.http
            .post(url)
            .header(header::CONTENT_TYPE, "application/json")
            // The user agent Dropbox's notifier sends (not verified in the docs).
            .header(header::USER_AGENT, "DropboxWebhooks/1.0")
            .header("X-Dropbox-Signature", signature)
            .body(body)
            .send()
            .await
    }

    /// The raw body and signature `send_webhook` would send (for tests that craft
    /// their own requests, e.g. with a wrong signature).
    pub fn webhook_body(&self, app_key: &str, accounts: &[&str]) -> (String, String) {
        let st = self.st();
        let secret = &st.apps.get(app_key).expect("webhook: unknown app").secret;
        let uids: Vec<u64> = accounts
            .iter()
            .map(|a| st.accounts.get(*a).expect("webhook: unknown account").uid)
            .collect();
        // Field order as in the webhooks reference.
        let body = format!(
            r#"{{"list_folder": {{"accounts": {}}}, "delta": {{"users": {}}}}}"#,
            json!(accounts),
            json!(uids)
        );
        let signature = hex::encode(hmac_sha256(secret.as_bytes(), body.as_bytes()));
        (body, signature)
    }
}

/// A reqwest client builder usable in tests. reqwest is built with
/// `rustls-no-provider`, and building any client (even for plain http) panics
/// unless a rustls crypto provider is installed, so this installs ring (the
/// provider the operator uses) first.
pub fn http_client_builder() -> reqwest::ClientBuilder {
    // Err only means a provider is already installed.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
}

/// A plain reqwest client (see [`http_client_builder`]).
pub fn http_client() -> reqwest::Client {
    http_client_builder().build().expect("build reqwest client")
}

/// HMAC-SHA256 of `data` keyed with `key` (webhook signatures).
pub fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// The Dropbox content hash: SHA-256 of the concatenated SHA-256 digests of the
/// 4 MiB blocks of the contents, hex-encoded.
pub fn content_hash(contents: &[u8]) -> String {
    let mut outer = Sha256::new();
    for block in contents.chunks(HASH_BLOCK) {
        outer.update(Sha256::digest(block));
    }
    hex::encode(outer.finalize())
}

// ---- state -------------------------------------------------------------------

struct App {
    secret: String,
    scope: String,
    /// Redirect URIs registered in the App Console.
    redirect_uris: Vec<String>,
    /// What the person at `/oauth2/authorize` does.
    approval: Option<Approval>,
}

/// A scripted answer of the person who opens an authorize link.
#[derive(Clone, Debug)]
pub enum Approval {
    /// Signs in as this account and clicks "Allow".
    Approve { account_id: String },
    /// Clicks "Cancel": Dropbox redirects with `error=access_denied`.
    Deny,
    /// Signed in as this account, the page shows "Allow" and "Cancel" buttons
    /// and waits: a browser (a person, or a test driving one) clicks. The
    /// buttons POST the authorize parameters back with `decision` = `allow` or
    /// `deny` (the emulator's own form; Dropbox's is not documented).
    Ask { account_id: String },
}

/// A PKCE challenge a code was issued for (RFC 7636).
#[derive(Clone)]
struct Challenge {
    challenge: String,
    /// `S256` or `plain`.
    method: String,
}

struct Account {
    account_id: String,
    email: String,
    display_name: String,
    uid: u64,
    namespace_id: u64,
    files: Files,
    /// Cursors carry the epoch they were issued in; `reset_cursors` bumps it.
    epoch: u64,
}

struct Code {
    app_key: String,
    account_id: String,
    redirect_uri: Option<String>,
    /// The PKCE challenge of the authorize request, if it had one.
    challenge: Option<Challenge>,
    expires_at: Instant,
}

/// What a code exchange created: a refresh token family. Revoking any of its
/// tokens kills all of them.
struct Grant {
    app_key: String,
    account_id: String,
    /// The app's scope when the user approved it: a token has the scopes of its
    /// grant, so permissions added to the app later need a new approval.
    scope: String,
    /// The refresh token in use.
    refresh_token: String,
    /// With rotation: the newer one a refresh issued, not used yet.
    pending: Option<String>,
}

struct AccessToken {
    app_key: String,
    account_id: String,
    /// The grant it was minted from; revoking it kills the grant.
    grant: Option<u64>,
    /// `None` for legacy long-lived tokens.
    expires_at: Option<Instant>,
}

#[derive(Clone, Copy)]
enum FaultKind {
    Status(u16),
    RateLimit(u64),
    /// As `RateLimit`, with `Retry-After` as an HTTP date.
    RateLimitDate(u64),
}

struct Fault {
    route: String,
    kind: FaultKind,
    remaining: Option<usize>,
    until: Option<Instant>,
}

impl Fault {
    fn matches(&self, route: &str) -> bool {
        self.route == "*" || self.route == route
    }

    fn active(&self, now: Instant) -> bool {
        self.remaining.is_none_or(|n| n > 0) && self.until.is_none_or(|t| now < t)
    }
}

/// A list_folder cursor. Like Dropbox's, a cursor string encodes a position: it
/// is base64url(HMAC-SHA256(emulator-private key, (account, folder, recursive,
/// limit, epoch, journal position, rest of the listing))), so two calls that end
/// at the same position of the same account/folder/epoch get the same string,
/// while a cursor stays bound to its account and folder and can't be forged
/// (the string is also looked up here: only issued cursors are accepted).
#[derive(Clone)]
struct Cursor {
    account_id: String,
    /// `path_lower` of the listed folder, `""` for the root.
    root: String,
    recursive: bool,
    /// `ListFolderArg.limit`, if the caller set one.
    limit: Option<usize>,
    epoch: u64,
    /// Journal position: changes after it are not yet reported.
    pos: usize,
    /// Rest of a `list_folder` listing not yet returned.
    pending: Vec<Value>,
}

struct State {
    apps: HashMap<String, App>,
    accounts: HashMap<String, Account>,
    codes: HashMap<String, Code>,
    grants: HashMap<u64, Grant>,
    /// Refresh token → its grant (current and pending ones).
    refresh_tokens: HashMap<String, u64>,
    /// Code → the grant its exchange created.
    code_grants: HashMap<String, u64>,
    /// See [`Emulator::rotate_refresh_tokens`].
    rotate_refresh_tokens: bool,
    access_tokens: HashMap<String, AccessToken>,
    access_ttl: Duration,
    code_ttl: Duration,
    /// See [`Emulator::hang_after_consuming_code`].
    hang_after_code: Duration,
    list_limit: usize,
    faults: Vec<Fault>,
    latency: HashMap<String, Duration>,
    calls: Vec<Call>,
    cursors: HashMap<String, Cursor>,
    /// Keys the cursor strings; never leaves the emulator.
    cursor_key: [u8; 32],
    /// Bumped by every change of any account (and every reset): wakes long-polls.
    changed: tokio::sync::watch::Sender<u64>,
    /// See [`Emulator::set_longpoll_backoff`].
    longpoll_backoff: Option<u64>,
    /// See [`Emulator::set_longpoll_max_wait`].
    longpoll_max_wait: Option<Duration>,
}

/// Why an access token is refused; maps to the `AuthError` tag.
enum TokenRefusal {
    Invalid,
    Expired,
}

impl State {
    fn new() -> State {
        State {
            apps: HashMap::new(),
            accounts: HashMap::new(),
            codes: HashMap::new(),
            grants: HashMap::new(),
            refresh_tokens: HashMap::new(),
            code_grants: HashMap::new(),
            rotate_refresh_tokens: false,
            access_tokens: HashMap::new(),
            access_ttl: DEFAULT_ACCESS_TTL,
            code_ttl: DEFAULT_CODE_TTL,
            hang_after_code: Duration::ZERO,
            list_limit: MAX_LIST_LIMIT,
            faults: Vec::new(),
            latency: HashMap::new(),
            calls: Vec::new(),
            cursors: HashMap::new(),
            cursor_key: rand::random(),
            changed: tokio::sync::watch::Sender::new(0),
            longpoll_backoff: None,
            longpoll_max_wait: None,
        }
    }

    fn account_mut(&mut self, account_id: &str) -> &mut Account {
        self.accounts
            .get_mut(account_id)
            .unwrap_or_else(|| panic!("unknown account {account_id}"))
    }

    fn latency_for(&self, route: &str) -> Option<Duration> {
        self.latency
            .get(route)
            .or_else(|| self.latency.get("*"))
            .copied()
    }

    /// Consumes one use of the first active fault for `route`.
    fn take_fault(&mut self, route: &str) -> Option<FaultKind> {
        let now = Instant::now();
        self.faults.retain(|f| f.active(now));
        let fault = self
            .faults
            .iter_mut()
            .find(|f| f.matches(route) && f.active(now))?;
        if let Some(n) = fault.remaining.as_mut() {
            *n -= 1;
        }
        Some(fault.kind)
    }

    fn check_access_token(&self, token: &str) -> Result<&AccessToken, TokenRefusal> {
        let t = self.access_tokens.get(token).ok_or(TokenRefusal::Invalid)?;
        match t.expires_at {
            Some(at) if Instant::now() >= at => Err(TokenRefusal::Expired),
            _ => Ok(t),
        }
    }

    /// Mints a short-lived access token of grant `grant`; returns it with `expires_in`.
    fn mint_access_token(&mut self, app_key: &str, account_id: &str, grant: u64) -> (String, u64) {
        // Short-lived tokens start with `sl.` (the `sl.u.` form is the current one).
        let token = format!("sl.u.{}", random_string(105));
        self.access_tokens.insert(
            token.clone(),
            AccessToken {
                app_key: app_key.to_owned(),
                account_id: account_id.to_owned(),
                grant: Some(grant),
                expires_at: Some(Instant::now() + self.access_ttl),
            },
        );
        (token, self.access_ttl.as_secs().max(1))
    }

    /// Kills a grant: its refresh tokens and every access token minted from it.
    fn revoke_grant(&mut self, id: u64) {
        if let Some(g) = self.grants.remove(&id) {
            self.refresh_tokens.remove(&g.refresh_token);
            if let Some(p) = g.pending {
                self.refresh_tokens.remove(&p);
            }
        }
        self.access_tokens.retain(|_, t| t.grant != Some(id));
    }

    /// The cursor string of a position (the same position, the same string).
    fn new_cursor(&mut self, cursor: Cursor) -> String {
        let pending = if cursor.pending.is_empty() {
            String::new()
        } else {
            hex::encode(Sha256::digest(
                Value::Array(cursor.pending.clone()).to_string().as_bytes(),
            ))
        };
        let position = json!([
            cursor.account_id,
            cursor.root,
            cursor.recursive,
            cursor.limit,
            cursor.epoch,
            cursor.pos,
            pending
        ]);
        let id = URL_SAFE_NO_PAD.encode(hmac_sha256(
            &self.cursor_key,
            position.to_string().as_bytes(),
        ));
        self.cursors.insert(id.clone(), cursor);
        id
    }
}

// ---- files -------------------------------------------------------------------

#[derive(Default)]
struct Files {
    /// Keyed by `path_lower`: Dropbox paths are case-insensitive.
    nodes: BTreeMap<String, Node>,
    /// Every change in commit order: (`path_lower`, metadata as list_folder shows it).
    journal: Vec<(String, Value)>,
    /// The `deleted` metadata of paths that used to exist (for `include_deleted`).
    tombstones: BTreeMap<String, Value>,
}

struct Node {
    path_display: String,
    id: String,
    kind: NodeKind,
}

enum NodeKind {
    Folder,
    File {
        rev: String,
        size: usize,
        content_hash: String,
        client_modified: String,
        server_modified: String,
    },
}

impl Node {
    fn metadata(&self) -> Value {
        let name = last_component(&self.path_display);
        let path_lower = self.path_display.to_lowercase();
        match &self.kind {
            NodeKind::Folder => json!({
                ".tag": "folder",
                "name": name,
                "path_lower": path_lower,
                "path_display": self.path_display,
                "id": self.id,
            }),
            NodeKind::File {
                rev,
                size,
                content_hash,
                client_modified,
                server_modified,
            } => json!({
                ".tag": "file",
                "name": name,
                "path_lower": path_lower,
                "path_display": self.path_display,
                "id": self.id,
                "client_modified": client_modified,
                "server_modified": server_modified,
                "rev": rev,
                "size": size,
                "is_downloadable": true,
                "content_hash": content_hash,
            }),
        }
    }
}

fn deleted_metadata(path_display: &str) -> Value {
    json!({
        ".tag": "deleted",
        "name": last_component(path_display),
        "path_lower": path_display.to_lowercase(),
        "path_display": path_display,
    })
}

impl Files {
    fn put(&mut self, node: Node) {
        let key = node.path_display.to_lowercase();
        self.journal.push((key.clone(), node.metadata()));
        self.tombstones.remove(&key);
        self.nodes.insert(key, node);
    }

    /// Creates the missing ancestors of `path` (a checked absolute path).
    fn create_parents(&mut self, path: &str) {
        let mut end = 0;
        while let Some(i) = path[end + 1..].find('/') {
            end += 1 + i;
            self.ensure_folder(&path[..end]);
        }
    }

    fn ensure_folder(&mut self, path: &str) {
        match self.nodes.get(&path.to_lowercase()) {
            Some(Node {
                kind: NodeKind::Folder,
                ..
            }) => {}
            Some(_) => panic!("cannot create folder {path}: a file is in the way"),
            None => self.put(Node {
                path_display: path.to_owned(),
                id: new_id(),
                kind: NodeKind::Folder,
            }),
        }
    }

    fn upload(&mut self, path: &str, contents: &[u8]) {
        check_path(path);
        self.create_parents(path);
        let hash = content_hash(contents);
        let id = match self.nodes.get(&path.to_lowercase()) {
            Some(Node {
                kind: NodeKind::Folder,
                ..
            }) => panic!("cannot upload to {path}: it is a folder"),
            Some(Node {
                kind: NodeKind::File { content_hash, .. },
                ..
            }) if *content_hash == hash => return,
            Some(node) => node.id.clone(),
            None => new_id(),
        };
        let now = jiff::Timestamp::now()
            .strftime("%Y-%m-%dT%H:%M:%SZ")
            .to_string();
        self.put(Node {
            path_display: path.to_owned(),
            id,
            kind: NodeKind::File {
                // `Rev` is at least 9 lower-case hex digits.
                rev: format!("{:012x}", 0x5f00_0000_0000 + next_number()),
                size: contents.len(),
                content_hash: hash,
                client_modified: now.clone(),
                server_modified: now,
            },
        });
    }

    fn create_folder(&mut self, path: &str) {
        check_path(path);
        self.create_parents(path);
        self.ensure_folder(path);
    }

    fn delete(&mut self, path: &str) {
        check_path(path);
        let key = path.to_lowercase();
        let node = self
            .nodes
            .remove(&key)
            .unwrap_or_else(|| panic!("cannot delete {path}: not found"));
        // The folder itself first, then everything that was in it: each removed
        // path gets a `deleted` entry (a later re-creation must not be masked).
        let mut removed = vec![node.path_display];
        let prefix = format!("{key}/");
        let inside: Vec<String> = self
            .nodes
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in inside {
            if let Some(n) = self.nodes.remove(&k) {
                removed.push(n.path_display);
            }
        }
        for display in removed {
            let meta = deleted_metadata(&display);
            let lower = display.to_lowercase();
            self.journal.push((lower.clone(), meta.clone()));
            self.tombstones.insert(lower, meta);
        }
    }

    /// Metadata of what is at `root` and below now, parents before children.
    fn listing(&self, root: &str, recursive: bool, include_deleted: bool) -> Vec<Value> {
        let mut entries: Vec<(String, Value)> = self
            .nodes
            .iter()
            .filter(|(k, _)| in_scope(k, root, recursive))
            .map(|(k, n)| (k.clone(), n.metadata()))
            .collect();
        if include_deleted {
            entries.extend(
                self.tombstones
                    .iter()
                    .filter(|(k, _)| in_scope(k, root, recursive))
                    .map(|(k, v)| (k.clone(), v.clone())),
            );
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        entries.into_iter().map(|(_, v)| v).collect()
    }

    /// The changes after journal position `pos` within the cursor's scope, as a
    /// state delta: one entry per path (its latest state), ordered by when that
    /// latest change happened; each with the journal index of that change.
    fn changes_since(&self, pos: usize, root: &str, recursive: bool) -> Vec<(usize, Value)> {
        let mut latest: HashMap<&str, usize> = HashMap::new();
        for (i, (path, _)) in self.journal.iter().enumerate().skip(pos) {
            if in_scope(path, root, recursive) {
                latest.insert(path.as_str(), i);
            }
        }
        let mut idx: Vec<usize> = latest.into_values().collect();
        idx.sort_unstable();
        idx.into_iter()
            .map(|i| (i, self.journal[i].1.clone()))
            .collect()
    }

    fn node_by_id(&self, id: &str) -> Option<(&String, &Node)> {
        self.nodes.iter().find(|(_, n)| n.id == id)
    }
}

/// Whether `path` (lower-case) is listed for a cursor on folder `root`.
fn in_scope(path: &str, root: &str, recursive: bool) -> bool {
    if recursive {
        path.strip_prefix(root)
            .is_some_and(|rest| rest.starts_with('/'))
    } else {
        parent_of(path) == root
    }
}

fn parent_of(path: &str) -> &str {
    path.rfind('/').map_or("", |i| &path[..i])
}

fn last_component(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// Test helpers take absolute paths like Dropbox's `/Folder/file.txt`.
fn check_path(path: &str) {
    assert!(
        path.starts_with('/') && path.len() > 1 && !path.ends_with('/') && !path.contains("//"),
        "not a Dropbox path: {path:?} (want /folder/name)"
    );
}

// ---- HTTP --------------------------------------------------------------------

/// An answer, kept as plain data so it can be recorded and turned into a response.
struct Reply {
    status: u16,
    headers: Vec<(&'static str, String)>,
    body: String,
}

impl Reply {
    fn json(status: u16, value: &Value) -> Reply {
        Reply {
            status,
            headers: vec![("content-type", "application/json".into())],
            body: value.to_string(),
        }
    }

    /// A page of the website (`/oauth2/authorize`).
    fn html(status: u16, body: &str) -> Reply {
        Reply {
            status,
            headers: vec![("content-type", "text/html; charset=utf-8".into())],
            body: format!("<!DOCTYPE html>\n<html><body><p>{body}</p></body></html>\n"),
        }
    }

    /// Dropbox's plain-text errors (400 bad input) come as a downloadable "error".
    fn text(status: u16, text: impl Into<String>) -> Reply {
        Reply {
            status,
            headers: vec![
                ("content-type", "text/plain; charset=utf-8".into()),
                ("content-disposition", "attachment; filename='error'".into()),
            ],
            body: text.into(),
        }
    }

    /// 400 "bad input" for an RPC route, e.g.
    /// `Error in call to API function "files/list_folder": request body: ...`.
    fn bad_input(route_name: &str, message: &str) -> Reply {
        Reply::text(
            400,
            format!("Error in call to API function \"{route_name}\": {message}"),
        )
    }

    /// OAuth errors of `/oauth2/token` (RFC 6749 §5.2 shape, status 400).
    fn oauth_error(error: &str, description: &str) -> Reply {
        Reply::json(
            400,
            &json!({"error": error, "error_description": description}),
        )
    }

    /// An `AuthError` (401), e.g. `{"error_summary": "expired_access_token/..",
    /// "error": {".tag": "expired_access_token"}}`.
    fn auth_error(tag: &str) -> Reply {
        Reply::json(
            401,
            &json!({"error_summary": summary(&[tag]), "error": {".tag": tag}}),
        )
    }

    /// `AuthError.missing_scope` (401; `auth.stone`: `missing_scope TokenScopeError`
    /// with `required_scope`), e.g. `{"error_summary": "missing_scope/..", "error":
    /// {".tag": "missing_scope", "required_scope": "files.metadata.read"}}`.
    fn missing_scope(required: &str) -> Reply {
        Reply::json(
            401,
            &json!({
                "error_summary": summary(&["missing_scope"]),
                "error": {".tag": "missing_scope", "required_scope": required},
            }),
        )
    }

    /// A route error (409) whose union is `error`, summarized by `tags`.
    fn route_error(tags: &[&str], error: Value) -> Reply {
        Reply::json(
            409,
            &json!({"error_summary": summary(tags), "error": error}),
        )
    }

    fn lookup_error(tag: &str) -> Reply {
        Reply::route_error(
            &["path", tag],
            json!({".tag": "path", "path": {".tag": tag}}),
        )
    }

    /// 429 with `Retry-After` and a `RateLimitError` body (`auth.stone`, where
    /// `retry_after` defaults to 1). A real answer quoted in
    /// dropbox-sdk-go-unofficial#33 has the same `reason` shape (there without the
    /// `retry_after` field, which the Python SDK reads when present).
    fn rate_limited(retry_after: u64) -> Reply {
        let mut reply = Reply::json(
            429,
            &json!({
                "error_summary": summary(&["too_many_requests"]),
                "error": {"reason": {".tag": "too_many_requests"}, "retry_after": retry_after},
            }),
        );
        reply.headers.push(("retry-after", retry_after.to_string()));
        reply
    }

    /// [`Reply::rate_limited`] with `Retry-After` as an HTTP date (IMF-fixdate).
    fn rate_limited_until(retry_after: u64) -> Reply {
        let mut reply = Reply::rate_limited(retry_after);
        let at = std::time::SystemTime::now() + Duration::from_secs(retry_after);
        reply.headers.retain(|(name, _)| *name != "retry-after");
        reply
            .headers
            .push(("retry-after", httpdate::fmt_http_date(at)));
        reply
    }

    /// 5xx as Dropbox sends them: the token endpoint answers JSON
    /// (`{"error": "The server has either erred or ..."}`, snarfed/oauth-dropins#729);
    /// an API 500 has an empty text/plain body (dropbox-sdk-python#44, ShareX#4154);
    /// gateway errors (502/503/504) are an HTML "Dropbox - 5xx" page
    /// (SwiftyDropbox#10).
    fn server_error(route: &str, status: u16) -> Reply {
        if route.starts_with("/oauth2/") {
            return Reply::json(
                status,
                &json!({"error": "The server has either erred or is incapable of performing the requested operation."}),
            );
        }
        match status {
            502..=504 => Reply {
                status,
                headers: vec![("content-type", "text/html; charset=utf-8".into())],
                body: "<!DOCTYPE html>\n<html>\n<head><title>Dropbox - 5xx</title></head>\n\
                       <body>Something went wrong. Don't worry, your files are still safe \
                       and the Dropboxers have been notified.</body>\n</html>\n"
                    .into(),
            },
            _ => Reply::text(status, ""),
        }
    }

    fn into_response(self) -> Response {
        let mut response = Response::new(Body::from(self.body));
        *response.status_mut() =
            StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let headers = response.headers_mut();
        for (name, value) in self.headers {
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.append(name, v);
            }
        }
        // Every Dropbox answer carries a request id.
        if let Ok(v) = HeaderValue::from_str(&hex::encode(rand::random::<[u8; 16]>())) {
            headers.insert("x-dropbox-request-id", v);
        }
        response
    }
}

/// Dropbox's `error_summary`: the tag path plus a varying run of dots. Real answers
/// show `too_many_write_operations/.`, `invalid_access_token/..` and
/// `too_many_requests/...`; the summary is not meant to be parsed, so neither
/// should clients: the dots vary here too.
fn summary(tags: &[&str]) -> String {
    format!(
        "{}/{}",
        tags.join("/"),
        ".".repeat(rand::random_range(1..=3))
    )
}

async fn handle(
    AxState((state, longpolls)): AxState<(Shared, Arc<AtomicUsize>)>,
    request: Request,
) -> Response {
    let at = Instant::now();
    let (parts, body) = request.into_parts();
    let body = to_bytes(body, 64 << 20).await.unwrap_or_default();
    if parts.uri.path() == LONGPOLL_ROUTE {
        // Not in a task of its own: a long-poll whose client went away stops
        // waiting (and is recorded when it would have answered, not at all).
        return process_longpoll(state, longpolls, parts.method, parts.headers, body, at)
            .await
            .into_response();
    }
    // Handled in its own task so the work completes (and is recorded) even when
    // the client disconnects, e.g. after a timeout during injected latency.
    let work = tokio::spawn(process(
        state,
        parts.method,
        parts.uri,
        parts.headers,
        body,
        at,
    ));
    match work.await {
        Ok(reply) => reply.into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

async fn process(
    state: Shared,
    method: Method,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
) -> Reply {
    let route = uri.path().to_owned();
    let latency = lock(&state).latency_for(&route);
    if let Some(latency) = latency {
        tokio::time::sleep(latency).await;
    }
    let mut form = parse_form(&headers, &body);
    if route == "/oauth2/token" || route == "/oauth2/authorize" {
        // The token endpoint also takes its parameters in the query string
        // (and the authorize page only there).
        for (k, v) in url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes()) {
            form.entry(k.into_owned()).or_insert_with(|| v.into_owned());
        }
    }
    // The guard lives in this block only, so the future stays Send.
    let (reply, hang) = {
        let mut st = lock(&state);
        let reply = match st.take_fault(&route) {
            Some(FaultKind::RateLimit(secs)) => Reply::rate_limited(secs),
            Some(FaultKind::RateLimitDate(secs)) => Reply::rate_limited_until(secs),
            Some(FaultKind::Status(status)) => injected(&route, status),
            None => dispatch(&mut st, &method, &route, &headers, &form, &body),
        };
        let consumed_code = route == "/oauth2/token"
            && reply.status == 200
            && form.get("grant_type").map(String::as_str) == Some("authorization_code");
        let hang = if consumed_code {
            st.hang_after_code
        } else {
            Duration::ZERO
        };
        st.calls.push(Call {
            method: method.to_string(),
            route,
            status: reply.status,
            headers: headers
                .iter()
                .map(|(n, v)| {
                    (
                        n.as_str().to_owned(),
                        String::from_utf8_lossy(v.as_bytes()).into_owned(),
                    )
                })
                .collect(),
            form,
            body: String::from_utf8_lossy(&body).into_owned(),
            at,
        });
        (reply, hang)
    };
    if !hang.is_zero() {
        tokio::time::sleep(hang).await;
    }
    reply
}

/// The notify host's route.
const LONGPOLL_ROUTE: &str = "/2/files/list_folder/longpoll";

fn record(
    st: &mut State,
    method: &Method,
    route: &str,
    headers: &HeaderMap,
    body: &[u8],
    status: u16,
    at: Instant,
) {
    st.calls.push(Call {
        method: method.to_string(),
        route: route.to_owned(),
        status,
        headers: headers
            .iter()
            .map(|(n, v)| {
                (
                    n.as_str().to_owned(),
                    String::from_utf8_lossy(v.as_bytes()).into_owned(),
                )
            })
            .collect(),
        form: BTreeMap::new(),
        body: String::from_utf8_lossy(body).into_owned(),
        at,
    });
}

/// `files/list_folder/longpoll` (files.stone: `auth = "noauth"`, `host =
/// "notify"`): `ListFolderLongpollArg {cursor, timeout: UInt64(30..=480) = 30}`
/// blocks until the cursor's folder has changes (`{"changes": true}`) or the
/// timeout passed (`{"changes": false}`; Dropbox adds up to 90 s of jitter, not
/// emulated), with `backoff` when a test asks for it. A reset cursor answers the
/// route error `reset` (409, like `list_folder/continue`'s).
async fn process_longpoll(
    state: Shared,
    longpolls: Arc<AtomicUsize>,
    method: Method,
    headers: HeaderMap,
    body: Bytes,
    at: Instant,
) -> Reply {
    let route = LONGPOLL_ROUTE;
    let name = &route["/2/".len()..];
    let latency = lock(&state).latency_for(route);
    if let Some(latency) = latency {
        tokio::time::sleep(latency).await;
    }
    let prepared = {
        let mut st = lock(&state);
        let checked = match st.take_fault(route) {
            Some(FaultKind::RateLimit(secs)) => Err(Reply::rate_limited(secs)),
            Some(FaultKind::RateLimitDate(secs)) => Err(Reply::rate_limited_until(secs)),
            Some(FaultKind::Status(status)) => Err(injected(route, status)),
            None => longpoll_args(&st, &method, name, &headers, &body),
        };
        match checked {
            Err(reply) => {
                record(&mut st, &method, route, &headers, &body, reply.status, at);
                return reply;
            }
            Ok((cursor, timeout)) => {
                let wait = st.longpoll_max_wait.map_or(timeout, |w| w.min(timeout));
                (cursor, wait, st.changed.subscribe())
            }
        }
    };
    let (cursor, wait, mut changed) = prepared;
    let deadline = tokio::time::Instant::now() + wait;
    longpolls.fetch_add(1, Ordering::SeqCst);
    let _waiting = Waiting(longpolls.clone());
    loop {
        // Subscribed before looking, so no change slips in between.
        changed.borrow_and_update();
        let verdict = {
            let st = lock(&state);
            match longpoll_verdict(&st, &cursor) {
                Some(v) => Some(v),
                None if tokio::time::Instant::now() >= deadline => Some(Ok(false)),
                None => None,
            }
        };
        if let Some(verdict) = verdict {
            let mut st = lock(&state);
            let reply = match verdict {
                Ok(changes) => {
                    let mut result = json!({"changes": changes});
                    if let Some(secs) = st.longpoll_backoff {
                        result["backoff"] = json!(secs);
                    }
                    Reply::json(200, &result)
                }
                Err(reply) => reply,
            };
            record(&mut st, &method, route, &headers, &body, reply.status, at);
            return reply;
        }
        tokio::select! {
            _ = changed.changed() => {}
            _ = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// Decrements the count of waiting long-polls when dropped.
struct Waiting(Arc<AtomicUsize>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Checks a long-poll request: POST, no `Authorization` header (Dropbox refuses
/// one on this route: "Your request includes an Authorization header, but this
/// function does not use it.", dropbox/dropbox-sdk-rust#15), JSON arguments.
fn longpoll_args(
    st: &State,
    method: &Method,
    name: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(String, Duration), Reply> {
    if method != Method::POST {
        let mut reply = Reply::text(405, "Method Not Allowed");
        reply.headers.push(("allow", "POST".into()));
        return Err(reply);
    }
    if headers.contains_key(header::AUTHORIZATION) {
        return Err(Reply::bad_input(
            name,
            "Your request includes an Authorization header, but this function does not use it.",
        ));
    }
    let args = rpc_args(name, headers, body)?;
    let Value::Object(map) = &args else {
        return Err(Reply::bad_input(
            name,
            &format!("request body: expected dict, got {}", type_name(&args)),
        ));
    };
    if let Some(k) = map
        .keys()
        .find(|k| !["cursor", "timeout"].contains(&k.as_str()))
    {
        return Err(Reply::bad_input(
            name,
            &format!("request body: unknown field '{k}'"),
        ));
    }
    let cursor = match map.get("cursor") {
        Some(Value::String(c)) => c.clone(),
        Some(other) => {
            return Err(Reply::bad_input(
                name,
                &format!(
                    "request body: cursor: expected string, got {}",
                    type_name(other)
                ),
            ));
        }
        None => {
            return Err(Reply::bad_input(
                name,
                "request body: missing required field 'cursor'",
            ));
        }
    };
    let timeout = match map.get("timeout") {
        None | Some(Value::Null) => 30,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(t @ 30..=480) => t,
            _ => {
                return Err(Reply::bad_input(
                    name,
                    &format!("request body: timeout: {n} is not within range [30, 480]"),
                ));
            }
        },
        Some(other) => {
            return Err(Reply::bad_input(
                name,
                &format!(
                    "request body: timeout: expected integer, got {}",
                    type_name(other)
                ),
            ));
        }
    };
    if !st.cursors.contains_key(&cursor) {
        return Err(Reply::bad_input(
            name,
            &format!("Invalid \"cursor\" parameter: '{cursor}'"),
        ));
    }
    Ok((cursor, Duration::from_secs(timeout)))
}

/// Whether the cursor has changes now (Some(Ok(true))), is reset (Some(Err)),
/// or has nothing yet (None).
fn longpoll_verdict(st: &State, cursor: &str) -> Option<Result<bool, Reply>> {
    let c = st.cursors.get(cursor)?;
    let account = st.accounts.get(&c.account_id)?;
    if c.epoch != account.epoch {
        return Some(Err(Reply::route_error(
            &["reset"],
            json!({".tag": "reset"}),
        )));
    }
    let changes = !c.pending.is_empty()
        || !account
            .files
            .changes_since(c.pos, &c.root, c.recursive)
            .is_empty();
    changes.then_some(Ok(true))
}

fn lock(state: &Shared) -> MutexGuard<'_, State> {
    state.lock().expect("emulator state poisoned")
}

fn parse_form(headers: &HeaderMap, body: &[u8]) -> BTreeMap<String, String> {
    let is_form = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
    if !is_form {
        return BTreeMap::new();
    }
    url::form_urlencoded::parse(body)
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

/// The Dropbox-like answer for an injected `status`.
fn injected(route: &str, status: u16) -> Reply {
    let api = route.strip_prefix("/2/");
    match (status, api) {
        (429, _) => Reply::rate_limited(1),
        (500..=599, _) => Reply::server_error(route, status),
        (401, Some(_)) => Reply::auth_error("invalid_access_token"),
        (400, Some(name)) => Reply::bad_input(name, "injected fault"),
        (400, None) => Reply::oauth_error("invalid_request", "injected fault"),
        (409, Some(_)) => Reply::route_error(&["other"], json!({".tag": "other"})),
        _ => Reply::text(status, ""),
    }
}

fn dispatch(
    st: &mut State,
    method: &Method,
    route: &str,
    headers: &HeaderMap,
    form: &BTreeMap<String, String>,
    body: &[u8],
) -> Reply {
    if route == "/oauth2/authorize" {
        // POST: a click on the approval page's buttons (Approval::Ask).
        if method == Method::POST && form.contains_key("decision") {
            return authorize(st, form);
        }
        if method != Method::GET || form.contains_key("decision") {
            let mut reply = Reply::text(405, "Method Not Allowed");
            reply.headers.push(("allow", "GET".into()));
            return reply;
        }
        return authorize(st, form);
    }
    let known = matches!(
        route,
        "/oauth2/token"
            | "/2/check/app"
            | "/2/users/get_current_account"
            | "/2/auth/token/revoke"
            | "/2/files/list_folder"
            | "/2/files/list_folder/continue"
            | "/2/files/list_folder/get_latest_cursor"
    );
    if !known {
        // Not verified against the real service: unknown paths get a bare 404.
        return Reply::text(404, "Not Found");
    }
    if method != Method::POST {
        let mut reply = Reply::text(405, "Method Not Allowed");
        reply.headers.push(("allow", "POST".into()));
        return reply;
    }
    if route == "/oauth2/token" {
        return oauth_token(st, headers, form);
    }
    if route == "/2/check/app" {
        return check_app(st, headers, body);
    }
    let name = &route["/2/".len()..];
    let (token, account_id) = match authenticate(st, name, headers) {
        Ok(v) => v,
        Err(reply) => return reply,
    };
    if let Some(required) = required_scope(name)
        && !st
            .token_scope(&token)
            .split_whitespace()
            .any(|s| s == required)
    {
        return Reply::missing_scope(required);
    }
    let args = match rpc_args(name, headers, body) {
        Ok(v) => v,
        Err(reply) => return reply,
    };
    match name {
        "users/get_current_account" => match args {
            Value::Null => Reply::json(200, &full_account(&st.accounts[&account_id])),
            other => Reply::bad_input(
                name,
                &format!("request body: expected null, got {}", type_name(&other)),
            ),
        },
        "auth/token/revoke" => match args {
            Value::Null => revoke(st, &token),
            other => Reply::bad_input(
                name,
                &format!("request body: expected null, got {}", type_name(&other)),
            ),
        },
        "files/list_folder" => list_folder(st, name, &account_id, &args, true),
        "files/list_folder/get_latest_cursor" => list_folder(st, name, &account_id, &args, false),
        _ => list_folder_continue(st, name, &account_id, &args),
    }
}

/// The scope a route needs (the App Console's permission names; the `files/`
/// routes here only read metadata). `auth/token/revoke` needs none.
fn required_scope(route_name: &str) -> Option<&'static str> {
    match route_name {
        "users/get_current_account" => Some("account_info.read"),
        "files/list_folder"
        | "files/list_folder/continue"
        | "files/list_folder/get_latest_cursor" => Some("files.metadata.read"),
        _ => None,
    }
}

impl State {
    /// The scopes of an (already authenticated) access token: those of its grant,
    /// or, for a legacy long-lived token, the app's current ones.
    fn token_scope(&self, token: &str) -> String {
        let Some(t) = self.access_tokens.get(token) else {
            return String::new();
        };
        let grant = t.grant.and_then(|id| self.grants.get(&id));
        match grant {
            Some(g) => g.scope.clone(),
            None => self
                .apps
                .get(&t.app_key)
                .map(|a| a.scope.clone())
                .unwrap_or_default(),
        }
    }
}

// ---- /oauth2/token -----------------------------------------------------------

fn oauth_token(st: &mut State, headers: &HeaderMap, form: &BTreeMap<String, String>) -> Reply {
    // Client authentication: HTTP Basic or client_id/client_secret in the form.
    let credentials = basic_credentials(headers).or_else(|| {
        Some((
            form.get("client_id")?.clone(),
            form.get("client_secret")?.clone(),
        ))
    });
    let Some((client_id, client_secret)) = credentials else {
        // What Dropbox answers when neither is present (dropbox-js#242, sintaxi/dbox#96).
        return Reply::oauth_error(
            "invalid_request",
            "No auth function available for given request",
        );
    };
    let app_ok = st
        .apps
        .get(&client_id)
        .is_some_and(|a| a.secret == client_secret);
    if !app_ok {
        // Dropbox folds the description into `error` here, with no
        // `error_description` (s-aska/dropbox-api-command#41, 2018;
        // CloudRail/cloudrail-si-android-sdk#88, 2017).
        return Reply::json(
            400,
            &json!({"error": "invalid_client: Invalid client_id or client_secret"}),
        );
    }
    match form.get("grant_type").map(String::as_str) {
        Some("authorization_code") => exchange_code(st, &client_id, form),
        Some("refresh_token") => refresh(st, &client_id, form),
        // Not observed on the real service: RFC 6749 §5.2 names.
        Some(other) => Reply::oauth_error(
            "unsupported_grant_type",
            &format!("unsupported grant_type \"{other}\""),
        ),
        None => Reply::oauth_error("invalid_request", "missing grant_type"),
    }
}

fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = String::from_utf8(STANDARD.decode(encoded.trim()).ok()?).ok()?;
    let (id, secret) = decoded.split_once(':')?;
    Some((id.to_owned(), secret.to_owned()))
}

fn exchange_code(st: &mut State, client_id: &str, form: &BTreeMap<String, String>) -> Reply {
    let Some(code) = form.get("code") else {
        // Not observed on the real service: RFC 6749 §5.2 name.
        return Reply::oauth_error("invalid_request", "missing code");
    };
    let live = st
        .codes
        .get(code)
        .is_some_and(|c| c.app_key == client_id && Instant::now() < c.expires_at);
    if !live {
        // Used, unknown and expired codes all get this (OpenIntegrations'
        // recorded Dropbox answer, docs/en/results/Dropbox/GetToken.log).
        return Reply::oauth_error("invalid_grant", "code doesn't exist or has expired");
    }
    let redirect_ok = st
        .codes
        .get(code)
        .is_some_and(|c| c.redirect_uri.as_ref() == form.get("redirect_uri"));
    if !redirect_ok {
        // dropbox-sdk-php#50, huginn#3226, kunalvarma05/dropbox-php-sdk#121.
        // A failed exchange does not use the code up.
        return Reply::oauth_error("invalid_grant", "redirect_uri mismatch");
    }
    // PKCE (RFC 7636 §4.6): a code issued for a challenge needs the verifier
    // whose transform is that challenge. The error text is not verified against
    // the real service (the error code is RFC 7636's); like a redirect_uri
    // mismatch, it does not use the code up here.
    let challenge = st.codes.get(code).and_then(|c| c.challenge.clone());
    if let Some(challenge) = challenge {
        let Some(verifier) = form.get("code_verifier") else {
            return Reply::oauth_error("invalid_grant", "missing code verifier");
        };
        let transformed = match challenge.method.as_str() {
            "S256" => URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes())),
            _ => verifier.clone(),
        };
        if transformed != challenge.challenge {
            return Reply::oauth_error("invalid_grant", "invalid code verifier");
        }
    }
    let Some(c) = st.codes.remove(code) else {
        return Reply::oauth_error("invalid_grant", "code doesn't exist or has expired");
    };
    // Real refresh tokens are 64 characters.
    let refresh_token = random_string(48);
    let id = next_number();
    st.grants.insert(
        id,
        Grant {
            app_key: c.app_key.clone(),
            account_id: c.account_id.clone(),
            scope: st.apps[&c.app_key].scope.clone(),
            refresh_token: refresh_token.clone(),
            pending: None,
        },
    );
    st.refresh_tokens.insert(refresh_token.clone(), id);
    st.code_grants.insert(code.clone(), id);
    let (access_token, expires_in) = st.mint_access_token(&c.app_key, &c.account_id, id);
    let account = &st.accounts[&c.account_id];
    let scope = &st.apps[&c.app_key].scope;
    Reply::json(
        200,
        &json!({
            "access_token": access_token,
            "expires_in": expires_in,
            "token_type": "bearer",
            "scope": scope,
            "uid": account.uid.to_string(),
            "refresh_token": refresh_token,
            "account_id": account.account_id,
        }),
    )
}

// ---- /oauth2/authorize ---------------------------------------------------------

/// The authorize page, with the person's click scripted: a code bound to the
/// app, account, redirect URI and PKCE challenge, delivered by a 302 to the
/// redirect URI (with `state`), or shown on the page when there is none.
fn authorize(st: &mut State, query: &BTreeMap<String, String>) -> Reply {
    // Errors before the redirect URI is trusted are shown on Dropbox's page (no
    // redirect): that much is the OAuth 2 rule (RFC 6749 §4.1.2.1); the wording
    // is the emulator's.
    let Some(app_key) = query.get("client_id") else {
        return Reply::html(400, "Error (400): missing client_id");
    };
    let Some(app) = st.apps.get(app_key) else {
        return Reply::html(400, "Error (400): Invalid client_id");
    };
    let redirect_uri = query.get("redirect_uri");
    if let Some(uri) = redirect_uri
        && !app.redirect_uris.contains(uri)
    {
        return Reply::html(
            400,
            "Error (400): Invalid redirect_uri. It must exactly match one of the redirect URIs you've pre-configured for your app (including the path).",
        );
    }
    if query.get("response_type").map(String::as_str) != Some("code") {
        return Reply::html(400, "Error (400): response_type must be \"code\" here");
    }
    let challenge = match (
        query.get("code_challenge"),
        query.get("code_challenge_method"),
    ) {
        (None, None) => None,
        (Some(challenge), method) => {
            let method = method.map(String::as_str).unwrap_or("plain");
            // RFC 7636 §4.2: 43 to 128 characters of [A-Za-z0-9-._~].
            let well_formed = (43..=128).contains(&challenge.len())
                && challenge
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b));
            if !well_formed || !matches!(method, "S256" | "plain") {
                return Reply::html(
                    400,
                    "Error (400): invalid code_challenge or code_challenge_method",
                );
            }
            Some(Challenge {
                challenge: challenge.clone(),
                method: method.to_owned(),
            })
        }
        (None, Some(_)) => {
            return Reply::html(
                400,
                "Error (400): code_challenge_method without code_challenge",
            );
        }
    };
    let approval = match (
        app.approval.clone(),
        query.get("decision").map(String::as_str),
    ) {
        (Some(Approval::Ask { account_id }), None) => {
            let email = st
                .accounts
                .get(&account_id)
                .map(|a| a.email.clone())
                .unwrap_or_default();
            return approval_page(app_key, &email, query);
        }
        (Some(Approval::Ask { account_id }), Some("allow")) => {
            Some(Approval::Approve { account_id })
        }
        (Some(Approval::Ask { .. }), Some(_)) => Some(Approval::Deny),
        (_, Some(_)) => {
            return Reply::html(400, "emulator: no approval page is waiting for a click");
        }
        (approval, None) => approval,
    };
    let redirect = |params: &[(&str, &str)]| -> Reply {
        let mut url = url::Url::parse(redirect_uri.expect("checked by the caller"))
            .expect("registered redirect URIs are URLs");
        {
            let mut q = url.query_pairs_mut();
            for (k, v) in params {
                q.append_pair(k, v);
            }
            if let Some(state) = query.get("state") {
                q.append_pair("state", state);
            }
        }
        let mut reply = Reply::html(302, "Redirecting");
        reply.headers.push(("location", url.to_string()));
        reply
    };
    match approval {
        None => Reply::html(
            400,
            "emulator: nobody is scripted to approve or deny this app",
        ),
        Some(Approval::Ask { .. }) => unreachable!("answered above"),
        Some(Approval::Deny) => match redirect_uri {
            // The description Dropbox sends with a denial.
            Some(_) => redirect(&[
                ("error", "access_denied"),
                (
                    "error_description",
                    "The user chose not to give your app access to their Dropbox account.",
                ),
            ]),
            None => Reply::html(200, "You chose not to give the app access."),
        },
        Some(Approval::Approve { account_id }) => {
            let code = random_string(32);
            let expires_at = Instant::now() + st.code_ttl;
            st.codes.insert(
                code.clone(),
                Code {
                    app_key: app_key.clone(),
                    account_id,
                    redirect_uri: redirect_uri.cloned(),
                    challenge,
                    expires_at,
                },
            );
            match redirect_uri {
                Some(_) => redirect(&[("code", &code)]),
                // Without a redirect URI the page shows the code to copy.
                None => Reply::html(
                    200,
                    &format!(
                        "Enter this code into the app to finish: <input id=\"auth-code\" readonly value=\"{code}\">"
                    ),
                ),
            }
        }
    }
}

/// The approval page of [`Approval::Ask`]: who is signed in, which app asks,
/// and two buttons that POST the authorize parameters back with a decision.
fn approval_page(app_key: &str, email: &str, query: &BTreeMap<String, String>) -> Reply {
    let escape = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let hidden: String = query
        .iter()
        .map(|(k, v)| {
            format!(
                "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
                escape(k),
                escape(v)
            )
        })
        .collect();
    Reply {
        status: 200,
        headers: vec![("content-type", "text/html; charset=utf-8".into())],
        body: format!(
            "<!DOCTYPE html>\n<html><head><title>API Request Authorization - Dropbox (emulator)</title></head>\
             <body><h1>App {app} wants access to your Dropbox</h1><p>Signed in as {email}</p>\
             <form method=\"post\" action=\"/oauth2/authorize\">{hidden}\
             <button type=\"submit\" name=\"decision\" value=\"deny\" id=\"deny\">Cancel</button> \
             <button type=\"submit\" name=\"decision\" value=\"allow\" id=\"allow\">Allow</button>\
             </form></body></html>\n",
            app = escape(app_key),
            email = escape(email),
        ),
    }
}

fn refresh(st: &mut State, client_id: &str, form: &BTreeMap<String, String>) -> Reply {
    let Some(token) = form.get("refresh_token") else {
        // Not observed on the real service: RFC 6749 §5.2 name.
        return Reply::oauth_error("invalid_request", "missing refresh_token");
    };
    let well_formed = token.len() == 64
        && token
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !well_formed {
        // boly38/node-mongotools#94.
        return Reply::oauth_error("invalid_grant", "refresh token is malformed");
    }
    let found = st
        .refresh_tokens
        .get(token)
        .copied()
        .filter(|id| st.grants.get(id).is_some_and(|g| g.app_key == client_id));
    let Some(id) = found else {
        // Revoked (user disconnected the app, or token/revoke) or unknown:
        // nextcloud/integration_dropbox#34 (2025).
        return Reply::oauth_error("invalid_grant", "refresh token is invalid or revoked");
    };
    let rotate = st.rotate_refresh_tokens;
    let Some(grant) = st.grants.get_mut(&id) else {
        return Reply::oauth_error("invalid_grant", "refresh token is invalid or revoked");
    };
    let (app_key, account_id) = (grant.app_key.clone(), grant.account_id.clone());
    let rotated = if rotate {
        // The pending token's first use retires the one before it; a refresh
        // with the current one replaces an unused pending one.
        let retired = if grant.pending.as_deref() == Some(token.as_str()) {
            Some(std::mem::replace(&mut grant.refresh_token, token.clone()))
        } else {
            grant.pending.take()
        };
        let fresh = random_string(48);
        grant.pending = Some(fresh.clone());
        if let Some(old) = retired {
            st.refresh_tokens.remove(&old);
        }
        st.refresh_tokens.insert(fresh.clone(), id);
        Some(fresh)
    } else {
        None
    };
    let (access_token, expires_in) = st.mint_access_token(&app_key, &account_id, id);
    // No uid/account_id on refresh, and (Dropbox) no new refresh token.
    let mut answer =
        json!({"access_token": access_token, "token_type": "bearer", "expires_in": expires_in});
    if let Some(fresh) = rotated {
        answer["refresh_token"] = json!(fresh);
    }
    Reply::json(200, &answer)
}

// ---- /2/ routes ----------------------------------------------------------------

/// Checks the bearer token; returns (token, account id).
fn authenticate(
    st: &State,
    route_name: &str,
    headers: &HeaderMap,
) -> Result<(String, String), Reply> {
    let Some(value) = headers.get(header::AUTHORIZATION) else {
        // A missing header is bad input (400, text), not a 401 (SwiftyDropbox#9, #20).
        return Err(Reply::bad_input(
            route_name,
            "Must provide HTTP header \"Authorization\" or URL parameter \"authorization\".",
        ));
    };
    let value = String::from_utf8_lossy(value.as_bytes()).into_owned();
    let token = value
        .strip_prefix("Bearer ")
        .map(str::trim)
        .filter(|t| !t.is_empty() && !t.contains(' '));
    let Some(token) = token else {
        // kunalvarma05/dropbox-php-sdk#57, react-native-blob-util#293.
        return Err(Reply::bad_input(
            route_name,
            &format!(
                "Invalid authorization value in HTTP header \"Authorization\": \"{value}\".  \
                 Expecting \"Bearer <oauth2-access-token>\"."
            ),
        ));
    };
    match st.check_access_token(token) {
        Ok(t) => Ok((token.to_owned(), t.account_id.clone())),
        // Revoked tokens are forgotten, so they answer like unknown ones.
        Err(TokenRefusal::Invalid) => Err(Reply::auth_error("invalid_access_token")),
        Err(TokenRefusal::Expired) => Err(Reply::auth_error("expired_access_token")),
    }
}

/// Decodes the JSON arguments of an RPC route. A route without arguments accepts
/// no body at all (with or without a JSON `Content-Type`) or `null`.
fn rpc_args(route_name: &str, headers: &HeaderMap, body: &[u8]) -> Result<Value, Reply> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
    let empty = body.iter().all(u8::is_ascii_whitespace);
    if empty && content_type.is_none() {
        return Ok(Value::Null);
    }
    let ct = content_type.unwrap_or_default();
    if !JSON_CONTENT_TYPES
        .iter()
        .any(|ok| ct.trim().eq_ignore_ascii_case(ok))
    {
        return Err(Reply::bad_input(
            route_name,
            &format!(
                "Bad HTTP \"Content-Type\" header: \"{ct}\".  Expecting one of \"application/json\", \
                 \"application/json; charset=utf-8\", \"text/plain; charset=dropbox-cors-hack\"."
            ),
        ));
    }
    if empty {
        return Ok(Value::Null);
    }
    serde_json::from_slice(body)
        .map_err(|_| Reply::bad_input(route_name, "request body: could not decode input as JSON"))
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "list",
        Value::Object(_) => "dict",
    }
}

fn full_account(a: &Account) -> Value {
    let (given, surname) = a
        .display_name
        .split_once(' ')
        .unwrap_or((a.display_name.as_str(), ""));
    let initials: String = a
        .display_name
        .split_whitespace()
        .filter_map(|w| w.chars().next())
        .flat_map(char::to_uppercase)
        .collect();
    let ns = a.namespace_id.to_string();
    json!({
        "account_id": a.account_id,
        "name": {
            "given_name": given,
            "surname": surname,
            "familiar_name": given,
            "display_name": a.display_name,
            "abbreviated_name": initials,
        },
        "email": a.email,
        "email_verified": true,
        "disabled": false,
        "country": "US",
        "locale": "en",
        "referral_link": format!("https://www.dropbox.com/referrals/AA{}?src=global9", a.uid),
        "is_paired": false,
        "account_type": {".tag": "basic"},
        "root_info": {".tag": "user", "root_namespace_id": ns, "home_namespace_id": ns},
    })
}

/// `auth/token/revoke`: the access token, the refresh token it came from, and
/// every access token minted from that refresh token.
fn revoke(st: &mut State, token: &str) -> Reply {
    if let Some(t) = st.access_tokens.remove(token)
        && let Some(id) = t.grant
    {
        st.revoke_grant(id);
    }
    Reply::json(200, &Value::Null)
}

/// `check/app`: app authentication (HTTP Basic, app key and secret); echoes
/// `query`. How Dropbox answers a wrong secret here is not documented; this
/// answers like a refused token (401 `AuthError`), not verified against the
/// real service.
fn check_app(st: &State, headers: &HeaderMap, body: &[u8]) -> Reply {
    let name = "check/app";
    let Some((key, secret)) = basic_credentials(headers) else {
        return Reply::bad_input(
            name,
            "Must provide HTTP header \"Authorization\" or URL parameter \"authorization\".",
        );
    };
    if st.apps.get(&key).is_none_or(|a| a.secret != secret) {
        return Reply::auth_error("invalid_access_token");
    }
    let args = match rpc_args(name, headers, body) {
        Ok(v) => v,
        Err(reply) => return reply,
    };
    let query = args.get("query").and_then(Value::as_str).unwrap_or("");
    Reply::json(200, &json!({"result": query}))
}

struct ListArgs {
    path: String,
    recursive: bool,
    include_deleted: bool,
    limit: Option<usize>,
}

/// `ListFolderArg` (files.stone); Stone rejects unknown fields.
fn parse_list_args(args: &Value) -> Result<ListArgs, String> {
    const FIELDS: [&str; 11] = [
        "path",
        "recursive",
        "include_media_info",
        "include_deleted",
        "include_has_explicit_shared_members",
        "include_mounted_folders",
        "limit",
        "shared_link",
        "include_property_groups",
        "include_non_downloadable_files",
        "include_restorable_info",
    ];
    let Value::Object(map) = args else {
        return Err(format!(
            "request body: expected dict, got {}",
            type_name(args)
        ));
    };
    if let Some(k) = map.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(format!("request body: unknown field '{k}'"));
    }
    let path = match map.get("path") {
        Some(Value::String(p)) => p.clone(),
        Some(other) => {
            return Err(format!(
                "request body: path: expected string, got {}",
                type_name(other)
            ));
        }
        None => return Err("request body: missing required field 'path'".into()),
    };
    let flag = |name: &str| -> Result<bool, String> {
        match map.get(name) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(format!(
                "request body: {name}: expected boolean, got {}",
                type_name(other)
            )),
        }
    };
    let limit = match map.get("limit") {
        None | Some(Value::Null) => None,
        Some(Value::Number(n)) => match n.as_u64() {
            Some(n @ 1..=2000) => Some(n as usize),
            _ => {
                return Err(format!(
                    "request body: limit: {n} is not within range [1, 2000]"
                ));
            }
        },
        Some(other) => {
            return Err(format!(
                "request body: limit: expected integer, got {}",
                type_name(other)
            ));
        }
    };
    Ok(ListArgs {
        path,
        recursive: flag("recursive")?,
        include_deleted: flag("include_deleted")?,
        limit,
    })
}

/// Resolves a `PathROrId` to the `path_lower` of a folder (`""` = root).
fn resolve_folder(account: &Account, route_name: &str, path: &str) -> Result<String, Reply> {
    if path.is_empty() {
        return Ok(String::new());
    }
    if path == "/" {
        // Dropbox names the root "" and says so.
        return Err(Reply::bad_input(
            route_name,
            "request body: path: Specify the root folder as an empty string rather than as \"/\".",
        ));
    }
    let key = if path.starts_with("id:") {
        match account.files.node_by_id(path) {
            Some((k, _)) => k.clone(),
            None => return Err(Reply::lookup_error("not_found")),
        }
    } else if let Some(rest) = path.strip_prefix("ns:") {
        let (ns, sub) = rest.split_once('/').map_or((rest, ""), |(n, s)| (n, s));
        if ns != account.namespace_id.to_string() {
            return Err(Reply::lookup_error("not_found"));
        }
        if sub.is_empty() {
            return Ok(String::new());
        }
        format!("/{}", sub.to_lowercase())
    } else if path.starts_with('/') {
        if path.ends_with('/') || path.contains("//") {
            return Err(Reply::route_error(
                &["path", "malformed_path"],
                json!({".tag": "path", "path": {".tag": "malformed_path"}}),
            ));
        }
        path.to_lowercase()
    } else {
        return Err(Reply::bad_input(
            route_name,
            &format!(
                "request body: path: '{path}' did not match pattern \
                 '(/(.|[\\r\\n])*)?|id:.*|(ns:[0-9]+(/(.|[\\r\\n])*)?)'"
            ),
        ));
    };
    match account.files.nodes.get(&key) {
        Some(Node {
            kind: NodeKind::Folder,
            ..
        }) => Ok(key),
        Some(_) => Err(Reply::lookup_error("not_folder")),
        None => Err(Reply::lookup_error("not_found")),
    }
}

/// `list_folder` (with_listing) and `list_folder/get_latest_cursor`.
fn list_folder(
    st: &mut State,
    route_name: &str,
    account_id: &str,
    args: &Value,
    with_listing: bool,
) -> Reply {
    let args = match parse_list_args(args) {
        Ok(a) => a,
        Err(message) => return Reply::bad_input(route_name, &message),
    };
    let account = &st.accounts[account_id];
    let root = match resolve_folder(account, route_name, &args.path) {
        Ok(root) => root,
        Err(reply) => return reply,
    };
    let pending = if with_listing {
        account
            .files
            .listing(&root, args.recursive, args.include_deleted)
    } else {
        Vec::new()
    };
    let cursor = Cursor {
        account_id: account_id.to_owned(),
        root,
        recursive: args.recursive,
        limit: args.limit,
        epoch: account.epoch,
        pos: account.files.journal.len(),
        pending,
    };
    if with_listing {
        Reply::json(200, &next_page(st, cursor))
    } else {
        let id = st.new_cursor(cursor);
        Reply::json(200, &json!({"cursor": id}))
    }
}

fn list_folder_continue(st: &mut State, route_name: &str, account_id: &str, args: &Value) -> Reply {
    let cursor = match args {
        Value::Object(map) => {
            if let Some(k) = map.keys().find(|k| *k != "cursor") {
                return Reply::bad_input(route_name, &format!("request body: unknown field '{k}'"));
            }
            match map.get("cursor") {
                Some(Value::String(c)) => c.clone(),
                Some(other) => {
                    return Reply::bad_input(
                        route_name,
                        &format!(
                            "request body: cursor: expected string, got {}",
                            type_name(other)
                        ),
                    );
                }
                None => {
                    return Reply::bad_input(
                        route_name,
                        "request body: missing required field 'cursor'",
                    );
                }
            }
        }
        other => {
            return Reply::bad_input(
                route_name,
                &format!("request body: expected dict, got {}", type_name(other)),
            );
        }
    };
    let Some(state) = st.cursors.get(&cursor).cloned() else {
        // A cursor Dropbox cannot decode is bad input (400, text); the wording is
        // the one mocked by several Dropbox clients' test suites.
        return Reply::bad_input(
            route_name,
            &format!("Invalid \"cursor\" parameter: '{cursor}'"),
        );
    };
    if state.account_id != account_id {
        // Not verified against the real service: another user's cursor points at
        // a folder this user can't see, answered as `path/not_found`.
        return Reply::lookup_error("not_found");
    }
    if state.epoch != st.accounts[account_id].epoch {
        return Reply::route_error(&["reset"], json!({".tag": "reset"}));
    }
    // `ListFolderContinueError.path`: the listed folder is gone (deleted or
    // moved away), e.g. an instance's `events.path` after the user removed it.
    let files = &st.accounts[account_id].files;
    if !state.root.is_empty()
        && !matches!(
            files.nodes.get(&state.root),
            Some(Node {
                kind: NodeKind::Folder,
                ..
            })
        )
    {
        return Reply::lookup_error("not_found");
    }
    Reply::json(200, &next_page(st, state))
}

/// One page of a cursor: first the rest of its listing, then the changes since
/// its journal position; stores and returns the follow-up cursor.
fn next_page(st: &mut State, mut cursor: Cursor) -> Value {
    let limit = cursor
        .limit
        .unwrap_or(MAX_LIST_LIMIT)
        .min(st.list_limit)
        .max(1);
    let take = cursor.pending.len().min(limit);
    let mut entries: Vec<Value> = cursor.pending.drain(..take).collect();
    let mut has_more = !cursor.pending.is_empty();
    if !has_more {
        let files = &st.accounts[&cursor.account_id].files;
        let changes = files.changes_since(cursor.pos, &cursor.root, cursor.recursive);
        let room = limit - entries.len();
        if changes.len() > room {
            has_more = true;
            // Everything up to the last returned change is reported: a path whose
            // latest change is later comes on a later page.
            if room > 0 {
                cursor.pos = changes[room - 1].0 + 1;
            }
            entries.extend(changes.into_iter().take(room).map(|(_, v)| v));
        } else {
            cursor.pos = files.journal.len();
            entries.extend(changes.into_iter().map(|(_, v)| v));
        }
    }
    let id = st.new_cursor(cursor);
    let mut result = Map::new();
    result.insert("entries".into(), Value::Array(entries));
    result.insert("cursor".into(), Value::String(id));
    result.insert("has_more".into(), Value::Bool(has_more));
    Value::Object(result)
}

// ---- ids and randomness --------------------------------------------------------

fn random_string(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::fill(&mut buf[..]);
    URL_SAFE_NO_PAD.encode(buf)
}

/// A file or folder id, like `id:a4ayc_80_OEAAAAAAAAAXw`.
fn new_id() -> String {
    format!("id:{}", random_string(16))
}

/// Unique numbers for uids, namespace ids and revs.
fn next_number() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    NEXT.fetch_add(1, Ordering::Relaxed)
}
