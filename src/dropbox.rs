//! A small client for the parts of the Dropbox API the operator uses: the OAuth 2
//! token endpoint, `check/app`, `users/get_current_account`,
//! `auth/token/revoke` and the `files/list_folder` cursor routes.
//!
//! Errors are classified so callers can decide between "retry with backoff"
//! ([`DropboxError::is_transient`]) and "wait for a person to change something".
//! No token or secret is ever part of an error message or a log line.

use std::fmt;
use std::time::Duration;

use reqwest::{StatusCode, header};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use url::Url;

/// Why a Dropbox call failed.
#[derive(Debug, thiserror::Error)]
pub enum DropboxError {
    /// OAuth `invalid_grant`: the code or refresh token is used, expired or revoked.
    #[error("Dropbox refused the grant (invalid_grant): {description}")]
    InvalidGrant { description: String },
    /// OAuth `invalid_client`: the app key or app secret is wrong.
    #[error("Dropbox refused the app key or app secret (invalid_client): {description}")]
    InvalidClient { description: String },
    /// Any other OAuth error (`invalid_request`, `unsupported_grant_type`, ...).
    #[error("Dropbox OAuth error {error}: {description}")]
    OAuth { error: String, description: String },
    /// 401: the access token is expired, invalid or revoked. `tag` is Dropbox's
    /// error tag, e.g. `expired_access_token`.
    #[error("Dropbox refused the access token ({tag})")]
    Unauthorized { tag: String },
    /// 429: too many requests.
    #[error("Dropbox rate-limited the request; retry after {}s", retry_after.as_secs())]
    RateLimited { retry_after: Duration },
    /// 5xx: Dropbox is having trouble.
    #[error("Dropbox is unavailable (HTTP {status})")]
    Unavailable { status: u16 },
    /// Another API error (400/409 with an `error_summary`), e.g. `reset` on a cursor.
    #[error("Dropbox API error (HTTP {status}): {summary}")]
    Api {
        status: u16,
        summary: String,
        tag: Option<String>,
    },
    /// 401 `missing_scope`: the app lacks a permission the call needs.
    #[error("the Dropbox app lacks the permission {scope:?} (missing_scope)")]
    MissingScope { scope: String },
    /// The request never left: the connection could not be made (refused,
    /// unreachable, DNS, TLS handshake). Dropbox cannot have seen it.
    #[error("cannot reach Dropbox: {0}")]
    NotSent(String),
    /// The request may have reached Dropbox but no usable answer came back
    /// (timeout, connection reset): its effect is unknown.
    #[error("no answer from Dropbox: {0}")]
    Transport(String),
    /// Dropbox answered something this client does not understand.
    #[error("unexpected answer from Dropbox: {0}")]
    Decode(String),
}

impl DropboxError {
    /// Worth retrying with backoff: 5xx, 429, timeouts and connection errors.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            DropboxError::RateLimited { .. }
                | DropboxError::Unavailable { .. }
                | DropboxError::Transport(_)
                | DropboxError::NotSent(_)
        )
    }

    /// Dropbox provably did not act on the request: it answered 429 or 5xx, or
    /// the request never left. Only then may a single-use code be sent again.
    pub fn proves_not_consumed(&self) -> bool {
        matches!(
            self,
            DropboxError::RateLimited { .. }
                | DropboxError::Unavailable { .. }
                | DropboxError::NotSent(_)
        )
    }

    /// Dropbox refused app credentials (on `check/app`, or `invalid_client`):
    /// the app key or secret is wrong, not Dropbox in trouble.
    pub fn refuses_app(&self) -> bool {
        matches!(
            self,
            DropboxError::InvalidClient { .. }
                | DropboxError::Unauthorized { .. }
                | DropboxError::Api { status: 400, .. }
        )
    }

    /// The delay Dropbox asked for (429 `Retry-After`).
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            DropboxError::RateLimited { retry_after } => Some(*retry_after),
            _ => None,
        }
    }

    /// Dropbox's error tag for API errors (`reset`, `expired_access_token`, ...).
    pub fn tag(&self) -> Option<&str> {
        match self {
            DropboxError::Api { tag, .. } => tag.as_deref(),
            DropboxError::Unauthorized { tag } => Some(tag),
            _ => None,
        }
    }

    /// A short, stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            DropboxError::InvalidGrant { .. } => "invalid_grant",
            DropboxError::InvalidClient { .. } => "invalid_client",
            DropboxError::OAuth { .. } => "oauth_error",
            DropboxError::Unauthorized { .. } => "unauthorized",
            DropboxError::RateLimited { .. } => "rate_limited",
            DropboxError::Unavailable { .. } => "unavailable",
            DropboxError::Api { .. } => "api_error",
            DropboxError::Transport(_) => "transport",
            DropboxError::NotSent(_) => "not_sent",
            DropboxError::MissingScope { .. } => "missing_scope",
            DropboxError::Decode(_) => "decode",
        }
    }
}

/// Answer of `POST /oauth2/token`. Debug output hides the tokens.
#[derive(Clone, Deserialize)]
pub struct TokenResponse {
    pub access_token: String,
    #[serde(default)]
    pub token_type: Option<String>,
    /// Lifetime of the access token in seconds; absent for long-lived tokens.
    #[serde(default)]
    pub expires_in: Option<u64>,
    /// Only on the authorization-code grant with `token_access_type=offline`.
    #[serde(default)]
    pub refresh_token: Option<String>,
    #[serde(default)]
    pub scope: Option<String>,
    #[serde(default)]
    pub account_id: Option<String>,
    #[serde(default)]
    pub uid: Option<String>,
}

impl fmt::Debug for TokenResponse {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenResponse")
            .field("access_token", &"<redacted>")
            .field("expires_in", &self.expires_in)
            .field(
                "refresh_token",
                &self.refresh_token.as_ref().map(|_| "<redacted>"),
            )
            .field("scope", &self.scope)
            .field("account_id", &self.account_id)
            .finish()
    }
}

/// The parts of `users/get_current_account` the operator reports.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Account {
    pub account_id: String,
    #[serde(default)]
    pub email: Option<String>,
    #[serde(default)]
    pub name: Option<AccountName>,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct AccountName {
    #[serde(default)]
    pub display_name: Option<String>,
}

/// Answer of `files/list_folder/continue`.
#[derive(Clone, Debug, Deserialize)]
pub struct ListFolderResult {
    pub entries: Vec<Value>,
    pub cursor: String,
    pub has_more: bool,
}

#[derive(Deserialize)]
struct OAuthErrorBody {
    error: String,
    #[serde(default)]
    error_description: Option<String>,
}

#[derive(Deserialize)]
struct ApiErrorBody {
    #[serde(default)]
    error_summary: Option<String>,
    #[serde(default)]
    error: Option<Value>,
}

/// The `/oauth2/authorize` link under the Dropbox website `www`: the code flow
/// with `token_access_type=offline` (a refresh token), the redirect URI when
/// there is one (without, Dropbox shows the code to copy), `state`, and with
/// `code_challenge` the PKCE parameters (`code_challenge_method=S256`).
pub fn authorize_url(
    www: &Url,
    client_id: &str,
    redirect_uri: Option<&str>,
    state: &str,
    code_challenge: Option<&str>,
) -> String {
    let mut url = www.clone();
    let base = url.path().trim_end_matches('/').to_owned();
    url.set_path(&format!("{base}/oauth2/authorize"));
    {
        let mut q = url.query_pairs_mut();
        q.append_pair("client_id", client_id)
            .append_pair("response_type", "code")
            .append_pair("token_access_type", "offline");
        if let Some(uri) = redirect_uri {
            q.append_pair("redirect_uri", uri);
        }
        q.append_pair("state", state);
        if let Some(challenge) = code_challenge {
            q.append_pair("code_challenge", challenge)
                .append_pair("code_challenge_method", "S256");
        }
    }
    url.to_string()
}

/// Answer of `files/list_folder/longpoll` (`ListFolderLongpollResult`).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct LongpollResult {
    /// New changes are available: call `list_folder/continue`.
    pub changes: bool,
    /// Wait at least this many seconds before the next long-poll.
    #[serde(default)]
    pub backoff: Option<u64>,
}

/// Dropbox's long-poll timeout range (`ListFolderLongpollArg.timeout`, seconds).
pub const LONGPOLL_TIMEOUT_RANGE: std::ops::RangeInclusive<u64> = 30..=480;
/// Dropbox adds up to this much random jitter to a long-poll's timeout.
pub const LONGPOLL_JITTER: Duration = Duration::from_secs(90);

/// Client for one Dropbox deployment (API, notify and www base URLs are
/// configurable so tests, proxies and regional endpoints work). Clones share
/// one connection pool.
#[derive(Clone, Debug)]
pub struct DropboxClient {
    http: reqwest::Client,
    api: Url,
    www: Url,
    notify: Url,
    timeout: Duration,
}

impl DropboxClient {
    /// `timeout` bounds every request, connection included.
    pub fn new(api: Url, www: Url, timeout: Duration) -> Result<Self, DropboxError> {
        crate::tls::install_crypto_provider();
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("dropbox-operator/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| DropboxError::Transport(e.to_string()))?;
        Ok(DropboxClient {
            http,
            api,
            www,
            notify: Url::parse(DEFAULT_NOTIFY_URL).expect("the default notify URL parses"),
            timeout,
        })
    }

    /// The bound of one request.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The same client with another notify host (`files/list_folder/longpoll`).
    pub fn with_notify(mut self, notify: Url) -> Self {
        self.notify = notify;
        self
    }

    fn api_url(&self, path: &str) -> Url {
        join(&self.api, path)
    }

    /// The link a person opens to (re-)approve the app; Dropbox then redirects to
    /// `redirect_uri` with a new code. `token_access_type=offline` asks for a
    /// refresh token.
    pub fn authorize_url(
        &self,
        client_id: &str,
        redirect_uri: Option<&str>,
        state: &str,
    ) -> String {
        authorize_url(&self.www, client_id, redirect_uri, state, None)
    }

    /// `grant_type=authorization_code`.
    pub async fn exchange_code(
        &self,
        client_id: &str,
        client_secret: &str,
        code: &str,
        redirect_uri: Option<&str>,
        code_verifier: Option<&str>,
    ) -> Result<TokenResponse, DropboxError> {
        let mut form = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("client_id", client_id),
            ("client_secret", client_secret),
        ];
        if let Some(uri) = redirect_uri {
            form.push(("redirect_uri", uri));
        }
        // PKCE: the verifier whose S256 challenge the authorize link carried.
        if let Some(verifier) = code_verifier {
            form.push(("code_verifier", verifier));
        }
        self.token_request(&form).await
    }

    /// `grant_type=refresh_token`.
    pub async fn refresh(
        &self,
        client_id: &str,
        client_secret: &str,
        refresh_token: &str,
    ) -> Result<TokenResponse, DropboxError> {
        let form = [
            ("grant_type", "refresh_token"),
            ("refresh_token", refresh_token),
            ("client_id", client_id),
            ("client_secret", client_secret),
        ];
        self.token_request(&form).await
    }

    async fn token_request(&self, form: &[(&str, &str)]) -> Result<TokenResponse, DropboxError> {
        let response = self
            .http
            .post(self.api_url("/oauth2/token"))
            .form(form)
            .send()
            .await
            .map_err(transport)?;
        let status = response.status();
        let retry_after = retry_after(&response);
        let body = response.bytes().await.map_err(transport)?;
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map_err(|e| DropboxError::Decode(format!("token response: {e}")));
        }
        if let Some(err) = classify_common(status, retry_after) {
            return Err(err);
        }
        match serde_json::from_slice::<OAuthErrorBody>(&body) {
            Ok(e) => {
                // Dropbox sometimes folds the description into `error`
                // ("invalid_client: Invalid client_id or client_secret").
                let (code, inline) = match e.error.split_once(':') {
                    Some((code, rest)) => (code.trim().to_owned(), Some(rest.trim().to_owned())),
                    None => (e.error.clone(), None),
                };
                let description = e.error_description.or(inline).unwrap_or_default();
                Err(match code.as_str() {
                    "invalid_grant" => DropboxError::InvalidGrant { description },
                    "invalid_client" | "unauthorized_client" => {
                        DropboxError::InvalidClient { description }
                    }
                    _ => DropboxError::OAuth {
                        error: code,
                        description,
                    },
                })
            }
            Err(_) if status == StatusCode::UNAUTHORIZED => Err(DropboxError::InvalidClient {
                description: short_text(&body),
            }),
            Err(_) => Err(DropboxError::Api {
                status: status.as_u16(),
                summary: short_text(&body),
                tag: None,
            }),
        }
    }

    /// `POST /2/check/app`: validates the app key and secret (app
    /// authentication, HTTP Basic) and has no other effect. Proves the app
    /// credentials before a single-use code is spent on them.
    pub async fn check_app(
        &self,
        client_id: &str,
        client_secret: &str,
    ) -> Result<(), DropboxError> {
        let path = "/2/check/app";
        let request = self
            .http
            .post(self.api_url(path))
            .basic_auth(client_id, Some(client_secret))
            .json(&serde_json::json!({"query": "dropbox-operator"}));
        let _: Value = self.send(request, path).await?;
        Ok(())
    }

    /// `POST /2/users/get_current_account`.
    pub async fn current_account(&self, access_token: &str) -> Result<Account, DropboxError> {
        self.rpc::<Value, _>(access_token, "/2/users/get_current_account", None)
            .await
    }

    /// `POST /2/auth/token/revoke`: revokes the access token and the refresh token
    /// it was minted from.
    pub async fn revoke(&self, access_token: &str) -> Result<(), DropboxError> {
        let _: Value = self
            .rpc::<Value, _>(access_token, "/2/auth/token/revoke", None)
            .await?;
        Ok(())
    }

    /// `POST /2/files/list_folder/get_latest_cursor` for the whole account.
    pub async fn latest_cursor(
        &self,
        access_token: &str,
        path: &str,
    ) -> Result<String, DropboxError> {
        #[derive(Deserialize)]
        struct Cursor {
            cursor: String,
        }
        let args = serde_json::json!({"path": path, "recursive": true, "include_deleted": true});
        let c: Cursor = self
            .rpc(
                access_token,
                "/2/files/list_folder/get_latest_cursor",
                Some(&args),
            )
            .await?;
        Ok(c.cursor)
    }

    /// `POST /2/files/list_folder/continue`.
    pub async fn list_folder_continue(
        &self,
        access_token: &str,
        cursor: &str,
    ) -> Result<ListFolderResult, DropboxError> {
        let args = serde_json::json!({ "cursor": cursor });
        self.rpc(access_token, "/2/files/list_folder/continue", Some(&args))
            .await
    }

    /// `POST {notify}/2/files/list_folder/longpoll`: waits until the cursor's
    /// folder has changes or `timeout` (30–480 s; Dropbox adds up to 90 s of
    /// jitter) passed. The route takes no authentication (`auth = "noauth"` in
    /// Dropbox's route spec): the cursor is all it needs, and no token is sent.
    pub async fn list_folder_longpoll(
        &self,
        cursor: &str,
        timeout: Duration,
    ) -> Result<LongpollResult, DropboxError> {
        let secs = timeout.as_secs().clamp(
            *LONGPOLL_TIMEOUT_RANGE.start(),
            *LONGPOLL_TIMEOUT_RANGE.end(),
        );
        let path = "/2/files/list_folder/longpoll";
        let request = self
            .http
            .post(join(&self.notify, path))
            .json(&serde_json::json!({"cursor": cursor, "timeout": secs}))
            // The answer may take the timeout plus the jitter; then the usual bound.
            .timeout(Duration::from_secs(secs) + LONGPOLL_JITTER + self.timeout);
        self.send(request, path).await
    }

    /// An RPC-style endpoint: JSON arguments in the body (or none), JSON result.
    async fn rpc<A: Serialize, T: DeserializeOwned>(
        &self,
        access_token: &str,
        path: &str,
        args: Option<&A>,
    ) -> Result<T, DropboxError> {
        let mut request = self.http.post(self.api_url(path)).bearer_auth(access_token);
        request = match args {
            Some(args) => request.json(args),
            // Dropbox accepts `null` (or no body) for routes without arguments.
            None => request
                .header(header::CONTENT_TYPE, "application/json")
                .body("null"),
        };
        self.send(request, path).await
    }

    /// Sends an RPC request and classifies the answer.
    async fn send<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        path: &str,
    ) -> Result<T, DropboxError> {
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let retry_after = retry_after(&response);
        let body = response.bytes().await.map_err(transport)?;
        if status.is_success() {
            return serde_json::from_slice(&body)
                .map_err(|e| DropboxError::Decode(format!("{path}: {e}")));
        }
        if let Some(err) = classify_common(status, retry_after) {
            return Err(err);
        }
        let parsed: Option<ApiErrorBody> = serde_json::from_slice(&body).ok();
        let summary = parsed
            .as_ref()
            .and_then(|b| b.error_summary.clone())
            .unwrap_or_else(|| short_text(&body));
        let tag = parsed
            .as_ref()
            .and_then(|b| b.error.as_ref())
            .and_then(|e| e.get(".tag"))
            .and_then(Value::as_str)
            .map(str::to_owned)
            .or_else(|| {
                summary
                    .split('/')
                    .next()
                    .map(str::to_owned)
                    .filter(|s| !s.is_empty())
            });
        if status == StatusCode::UNAUTHORIZED && tag.as_deref() == Some("missing_scope") {
            let scope = parsed
                .as_ref()
                .and_then(|b| b.error.as_ref())
                .and_then(|e| e.get("required_scope"))
                .and_then(Value::as_str)
                .unwrap_or("unknown")
                .to_owned();
            return Err(DropboxError::MissingScope { scope });
        }
        if status == StatusCode::UNAUTHORIZED {
            return Err(DropboxError::Unauthorized {
                tag: tag.unwrap_or_else(|| "invalid_access_token".into()),
            });
        }
        Err(DropboxError::Api {
            status: status.as_u16(),
            summary,
            tag,
        })
    }
}

/// Dropbox's notify host, where `files/list_folder/longpoll` is served.
pub const DEFAULT_NOTIFY_URL: &str = "https://notify.dropboxapi.com";

/// `base` with `path` appended to its path.
fn join(base: &Url, path: &str) -> Url {
    let mut url = base.clone();
    let prefix = url.path().trim_end_matches('/').to_owned();
    url.set_path(&format!("{prefix}{path}"));
    url
}

/// 429 and 5xx mean the same on every route.
fn classify_common(status: StatusCode, retry_after: Option<Duration>) -> Option<DropboxError> {
    if status == StatusCode::TOO_MANY_REQUESTS {
        return Some(DropboxError::RateLimited {
            retry_after: retry_after.unwrap_or(Duration::from_secs(1)),
        });
    }
    if status.is_server_error() {
        return Some(DropboxError::Unavailable {
            status: status.as_u16(),
        });
    }
    None
}

/// `Retry-After` in seconds or as an HTTP date (`crate::retry::retry_after`).
fn retry_after(response: &reqwest::Response) -> Option<Duration> {
    let value = response.headers().get(header::RETRY_AFTER)?.to_str().ok()?;
    crate::retry::retry_after(value)
}

fn transport(err: reqwest::Error) -> DropboxError {
    // reqwest's message names the URL (no credentials in it) and the cause.
    if err.is_connect() {
        return DropboxError::NotSent(format!(
            "connection failed: {}",
            crate::retry::error_chain(&err)
        ));
    }
    let kind = if err.is_timeout() {
        "timed out"
    } else {
        "request failed"
    };
    DropboxError::Transport(format!("{kind}: {}", crate::retry::error_chain(&err)))
}

/// The first line of an unexpected body, bounded, for error messages.
fn short_text(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let line = text.lines().next().unwrap_or("").trim();
    line.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client() -> DropboxClient {
        DropboxClient::new(
            Url::parse("https://api.dropboxapi.com").expect("url"),
            Url::parse("https://www.dropbox.com").expect("url"),
            Duration::from_secs(1),
        )
        .expect("client")
    }

    #[test]
    fn authorize_url_asks_for_offline_access() {
        let url =
            client().authorize_url("app key", Some("https://www.mycoolapp.com/auth"), "ns/name");
        assert_eq!(
            url,
            "https://www.dropbox.com/oauth2/authorize?client_id=app+key&response_type=code&token_access_type=offline\
             &redirect_uri=https%3A%2F%2Fwww.mycoolapp.com%2Fauth&state=ns%2Fname"
        );
    }

    #[test]
    fn token_response_debug_hides_tokens() {
        let t: TokenResponse = serde_json::from_str(
            r#"{"access_token":"sl.SECRET","refresh_token":"REFRESH-SECRET","expires_in":14400,"token_type":"bearer"}"#,
        )
        .expect("parse");
        let shown = format!("{t:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
    }

    #[test]
    fn transient_classification() {
        assert!(DropboxError::Unavailable { status: 503 }.is_transient());
        assert!(
            DropboxError::RateLimited {
                retry_after: Duration::from_secs(3)
            }
            .is_transient()
        );
        assert!(
            !DropboxError::InvalidGrant {
                description: "x".into()
            }
            .is_transient()
        );
        assert!(!DropboxError::Unauthorized { tag: "x".into() }.is_transient());
    }
}
