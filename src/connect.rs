//! `dropbox-operator connect` (also `kubectl dropbox connect`): authorizes an
//! oauth2 instance's Dropbox account in one command (README, "Connect an account
//! in one command").
//!
//! 1. Reads the instance and the app key from its app Secret.
//! 2. Builds the `/oauth2/authorize` link with a random `state` and a PKCE
//!    challenge (S256 of a random verifier), and a loopback redirect URI it
//!    listens on (or none with `--no-redirect`: the person pastes the code).
//! 3. On the redirect: a wrong `state`, a refusal (`error=access_denied`) or a
//!    timeout end the command with an error and write nothing. A code is written,
//!    in one server-side apply, into the instance's code Secret with its PKCE
//!    verifier (`code_verifier`) and the redirect URI it was obtained with
//!    (`redirect_uri`, empty for none): the controller sends exactly these when
//!    it exchanges the code (docs/architecture.md, "Credentials").
//! 4. Follows the instance until it is Ready with this code, or a condition says
//!    the code cannot work.
//!
//! Nothing secret is printed: not the code, the verifier or the app secret
//! (which is not even read).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Config};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use url::Url;

use crate::api::{AuthenticationType, DropboxElementInstance};
use crate::cli::ConnectArgs;
use crate::conditions::{AUTHORIZED, READY};
use crate::contract::{CODE_REDIRECT_URI_KEY, CODE_VERIFIER_KEY};

/// Field manager of the code Secret fields `connect` writes.
pub const FIELD_MANAGER: &str = "dropbox-operator-connect";

/// Why `connect` stopped; the message is what the person reads.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ConnectError(String);

fn err(message: impl Into<String>) -> ConnectError {
    ConnectError(message.into())
}

/// Runs the subcommand; prints its own progress and errors.
pub fn run(args: &ConnectArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(connect(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A PKCE verifier (RFC 7636 §4.1: 43 characters of base64url from 32 random
/// bytes) and its S256 challenge.
pub struct Pkce {
    pub verifier: String,
    pub challenge: String,
}

impl Pkce {
    pub fn new() -> Pkce {
        let verifier = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>());
        let challenge = s256(&verifier);
        Pkce {
            verifier,
            challenge,
        }
    }
}

impl Default for Pkce {
    fn default() -> Self {
        Pkce::new()
    }
}

/// `BASE64URL(SHA256(verifier))`, the S256 transform of RFC 7636 §4.2.
pub fn s256(verifier: &str) -> String {
    URL_SAFE_NO_PAD.encode(Sha256::digest(verifier.as_bytes()))
}

/// Whether `url` is one `connect` can listen on: http on 127.0.0.1, [::1] or
/// localhost, without credentials or fragment.
pub fn is_loopback_redirect(url: &Url) -> bool {
    let host_ok = match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    };
    url.scheme() == "http"
        && host_ok
        && url.username().is_empty()
        && url.password().is_none()
        && url.fragment().is_none()
}

/// The redirect URI of this run: --no-redirect → none; --redirect-uri; the
/// instance's callbackUrl when it is loopback; else http://127.0.0.1:<port>/.
pub fn choose_redirect(
    args: &ConnectArgs,
    callback_url: Option<&str>,
) -> Result<Option<Url>, ConnectError> {
    if args.no_redirect {
        return Ok(None);
    }
    if let Some(uri) = &args.redirect_uri {
        if !is_loopback_redirect(uri) {
            return Err(err(format!(
                "--redirect-uri {uri} is not a loopback http URL (http://127.0.0.1:PORT/..., \
                 http://[::1]:PORT/... or http://localhost:PORT/...): connect must receive the \
                 redirect itself. For an app without such a redirect URI use --no-redirect"
            )));
        }
        return Ok(Some(uri.clone()));
    }
    if let Some(url) = callback_url
        .and_then(|u| Url::parse(u).ok())
        .filter(is_loopback_redirect)
    {
        return Ok(Some(url));
    }
    Url::parse(&format!("http://127.0.0.1:{}/", args.port))
        .map(Some)
        .map_err(|e| err(format!("invalid --port: {e}")))
}

async fn kube_client(args: &ConnectArgs) -> Result<(Client, String), ConnectError> {
    let config = kube_config(args.kubeconfig.as_deref(), args.context.as_deref())
        .await
        .map_err(err)?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| err(format!("Kubernetes client: {e}")))?;
    Ok((client, namespace))
}

/// The Kubernetes configuration of a command a person runs: `kubeconfig`
/// (else $KUBECONFIG, ~/.kube/config, the in-cluster service account), with
/// `context` (else the current one). The error is what the person reads.
pub(crate) async fn kube_config(
    kubeconfig: Option<&std::path::Path>,
    context: Option<&str>,
) -> Result<Config, String> {
    let options = KubeConfigOptions {
        context: context.map(str::to_owned),
        ..KubeConfigOptions::default()
    };
    match kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| format!("cannot read kubeconfig {}: {e}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|e| format!("kubeconfig {}: {e}", path.display()))
        }
        None if context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|e| format!("kubeconfig: {e}")),
        None => Config::infer()
            .await
            .map_err(|e| format!("no Kubernetes configuration found: {e}")),
    }
}

/// What the instance says about where its credentials are.
struct Target {
    app_key: String,
    code_secret: String,
    code_key: String,
    callback_url: Option<String>,
}

async fn read_target(
    instances: &Api<DropboxElementInstance>,
    secrets: &Api<Secret>,
    namespace: &str,
    name: &str,
) -> Result<Target, ConnectError> {
    let instance = instances
        .get_opt(name)
        .await
        .map_err(|e| {
            err(format!(
                "cannot read DropboxElementInstance {namespace}/{name}: {e}"
            ))
        })?
        .ok_or_else(|| {
            err(format!(
                "DropboxElementInstance {namespace}/{name} not found"
            ))
        })?;
    let auth = &instance.spec.authentication;
    if auth.auth_type != AuthenticationType::OAuth2 {
        return Err(err(format!(
            "{namespace}/{name} has authentication type apiKey; connect authorizes oauth2 instances"
        )));
    }
    let (Some(app_ref), Some(code_ref)) = (&auth.app_secret_ref, &auth.code_secret_ref) else {
        return Err(err(format!(
            "{namespace}/{name} needs spec.authentication.appSecretRef and codeSecretRef"
        )));
    };
    if [CODE_VERIFIER_KEY, CODE_REDIRECT_URI_KEY].contains(&code_ref.key.as_str()) {
        return Err(err(format!(
            "codeSecretRef.key {:?} is reserved for what connect stores next to the code; use another key",
            code_ref.key
        )));
    }
    let app = secrets
        .get_opt(&app_ref.name)
        .await
        .map_err(|e| err(format!("cannot read the app Secret {namespace}/{}: {e}", app_ref.name)))?
        .ok_or_else(|| {
            err(format!(
                "the app Secret {namespace}/{} (appSecretRef) does not exist: create it with the app key and secret first",
                app_ref.name
            ))
        })?;
    let app_key = app
        .data
        .as_ref()
        .and_then(|d| d.get(&app_ref.client_id_key))
        .map(|ByteString(b)| String::from_utf8_lossy(b).trim().to_owned())
        .filter(|k| !k.is_empty())
        .ok_or_else(|| {
            err(format!(
                "the app Secret {namespace}/{} has no (non-empty) key {:?} with the app key",
                app_ref.name, app_ref.client_id_key
            ))
        })?;
    Ok(Target {
        app_key,
        code_secret: code_ref.name.clone(),
        code_key: code_ref.key.clone(),
        callback_url: auth.callback_url.clone(),
    })
}

async fn connect(args: &ConnectArgs) -> Result<(), ConnectError> {
    let (client, namespace) = kube_client(args).await?;
    let name = args.instance.as_str();
    let instances: Api<DropboxElementInstance> = Api::namespaced(client.clone(), &namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let target = read_target(&instances, &secrets, &namespace, name).await?;
    let redirect = choose_redirect(args, target.callback_url.as_deref())?;

    let pkce = Pkce::new();
    let state = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>());
    // Listen before the link is shown: the redirect can come at once.
    let listener = match &redirect {
        Some(uri) => Some(Listener::bind(uri, &state).await?),
        None => None,
    };
    let link = crate::dropbox::authorize_url(
        &args.dropbox_www_url,
        &target.app_key,
        redirect.as_ref().map(Url::as_str),
        &state,
        Some(&pkce.challenge),
    );
    println!("Approve the Dropbox app for {namespace}/{name} at:\n\n  {link}\n");
    match &redirect {
        Some(uri) => println!(
            "Waiting up to {} for Dropbox to redirect to {uri} (this exact URI must be a redirect URI \
             of the app in the Dropbox App Console).",
            humanize(args.timeout)
        ),
        None => println!(
            "After approving, Dropbox shows a code: paste it here and press Enter (waiting up to {}).",
            humanize(args.timeout)
        ),
    }
    if !args.no_browser && webbrowser::open(&link).is_ok() {
        println!("(opened in your browser)");
    }

    let code = match listener {
        Some(listener) => listener.wait(args.timeout).await?,
        None => read_pasted_code(args.timeout).await?,
    };

    // Only now is anything written. Status before the write tells a fresh
    // verdict from an old one.
    let before = instances
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|i| authorized_summary(&i));
    write_code_secret(
        &secrets,
        &target,
        &code,
        &pkce.verifier,
        redirect.as_ref().map(Url::as_str),
    )
    .await
    .map_err(|e| {
        err(format!(
            "cannot write the code Secret {namespace}/{}: {e}",
            target.code_secret
        ))
    })?;
    println!(
        "Stored the code in Secret {namespace}/{} (keys {:?}, {CODE_VERIFIER_KEY:?}, {CODE_REDIRECT_URI_KEY:?}); \
         waiting up to {} for the instance to be Ready...",
        target.code_secret,
        target.code_key,
        humanize(args.wait_timeout)
    );
    let fingerprint = crate::controller::inputs::fingerprint(&code);
    wait_ready(&instances, name, &fingerprint, before, args.wait_timeout).await
}

fn humanize(d: Duration) -> String {
    jiff::SignedDuration::try_from(d)
        .map(|d| format!("{d:#}"))
        .unwrap_or_else(|_| format!("{d:?}"))
}

/// One server-side apply: the code, its verifier and its redirect URI arrive together.
async fn write_code_secret(
    secrets: &Api<Secret>,
    target: &Target,
    code: &str,
    verifier: &str,
    redirect_uri: Option<&str>,
) -> Result<(), kube::Error> {
    let data = BTreeMap::from([
        (
            target.code_key.clone(),
            ByteString(code.as_bytes().to_vec()),
        ),
        (
            CODE_VERIFIER_KEY.to_owned(),
            ByteString(verifier.as_bytes().to_vec()),
        ),
        (
            CODE_REDIRECT_URI_KEY.to_owned(),
            ByteString(redirect_uri.unwrap_or_default().as_bytes().to_vec()),
        ),
    ]);
    let secret = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(target.code_secret.clone()),
            ..Default::default()
        },
        data: Some(data),
        ..Default::default()
    };
    let mut value = serde_json::to_value(&secret).map_err(kube::Error::SerdeError)?;
    value["apiVersion"] = "v1".into();
    value["kind"] = "Secret".into();
    secrets
        .patch(
            &target.code_secret,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&value),
        )
        .await?;
    Ok(())
}

/// The loopback server that receives Dropbox's redirect.
struct Listener {
    outcome: mpsc::Receiver<Result<String, ConnectError>>,
    servers: Vec<tokio::task::JoinHandle<()>>,
    shutdown: tokio_util::sync::CancellationToken,
}

impl Drop for Listener {
    fn drop(&mut self) {
        for s in &self.servers {
            s.abort();
        }
    }
}

impl Listener {
    async fn bind(uri: &Url, state: &str) -> Result<Listener, ConnectError> {
        let port = uri.port_or_known_default().unwrap_or(80);
        let addrs: Vec<IpAddr> = match uri.host() {
            Some(url::Host::Ipv4(ip)) => vec![IpAddr::V4(ip)],
            Some(url::Host::Ipv6(ip)) => vec![IpAddr::V6(ip)],
            // A browser may try either for localhost.
            _ => vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
        };
        let (tx, outcome) = mpsc::channel(4);
        let expected = Expected {
            path: uri.path().to_owned(),
            state: state.to_owned(),
        };
        let mut servers = Vec::new();
        let mut first_error = None;
        let shutdown = tokio_util::sync::CancellationToken::new();
        for ip in addrs {
            match tokio::net::TcpListener::bind(SocketAddr::new(ip, port)).await {
                Ok(listener) => {
                    let app = axum::Router::new().fallback({
                        let tx = tx.clone();
                        let expected = expected.clone();
                        move |uri: axum::http::Uri| redirect_page(uri, expected.clone(), tx.clone())
                    });
                    let stop = shutdown.clone().cancelled_owned();
                    servers.push(tokio::spawn(async move {
                        let _ = axum::serve(listener, app)
                            .with_graceful_shutdown(stop)
                            .await;
                    }));
                }
                Err(e) => {
                    first_error.get_or_insert(format!("{ip}:{port}: {e}"));
                }
            }
        }
        if servers.is_empty() {
            return Err(err(format!(
                "cannot listen on the redirect URI {uri} ({}); pick a free port with --port or --redirect-uri \
                 (and register that URI in the Dropbox App Console)",
                first_error.unwrap_or_default()
            )));
        }
        Ok(Listener {
            outcome,
            servers,
            shutdown,
        })
    }

    async fn wait(mut self, timeout: Duration) -> Result<String, ConnectError> {
        match tokio::time::timeout(timeout, self.outcome.recv()).await {
            Ok(Some(outcome)) => {
                // The browser gets its page before the command goes on (or exits).
                self.shutdown.cancel();
                let servers = std::mem::take(&mut self.servers);
                let _ = tokio::time::timeout(
                    Duration::from_secs(2),
                    futures::future::join_all(servers),
                )
                .await;
                outcome
            }
            Ok(None) => Err(err("the redirect listener stopped")),
            Err(_) => Err(err(format!(
                "no approval within {} (--timeout); nothing was written. Run connect again to get a new link",
                humanize(timeout)
            ))),
        }
    }
}

#[derive(Clone)]
struct Expected {
    path: String,
    state: String,
}

/// Judges one request on the redirect URI; the page tells the person the same.
async fn redirect_page(
    uri: axum::http::Uri,
    expected: Expected,
    tx: mpsc::Sender<Result<String, ConnectError>>,
) -> (axum::http::StatusCode, axum::response::Html<String>) {
    use axum::http::StatusCode;
    if uri.path() != expected.path {
        return (StatusCode::NOT_FOUND, page("Not found."));
    }
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let (status, outcome) = judge_redirect(&query, &expected.state);
    let text = match &outcome {
        Ok(_) => "The Dropbox account is approved. You can close this tab: connect finishes in the terminal.".to_owned(),
        Err(e) => format!("{e}"),
    };
    let _ = tx.try_send(outcome);
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        page(&text),
    )
}

/// The verdict on a redirect's query: the code, or why there is none.
pub fn judge_redirect(
    query: &HashMap<String, String>,
    expected_state: &str,
) -> (u16, Result<String, ConnectError>) {
    // The state is checked first: a redirect that this run did not start
    // (login CSRF, a stale tab) must not be acted upon, whatever it carries.
    if query.get("state").map(String::as_str) != Some(expected_state) {
        return (
            400,
            Err(err(
                "the redirect's state does not match the link connect printed (a redirect of another \
                 authorization, or a forged one); nothing was written. Run connect again and use the new link",
            )),
        );
    }
    if let Some(error) = query.get("error") {
        let description = query
            .get("error_description")
            .map(|d| format!(": {d}"))
            .unwrap_or_default();
        let message = if error == "access_denied" {
            format!(
                "the approval was denied in Dropbox (access_denied{description}); nothing was written"
            )
        } else {
            format!("Dropbox refused the authorization ({error}{description}); nothing was written")
        };
        return (200, Err(err(message)));
    }
    match query
        .get("code")
        .map(|c| c.trim())
        .filter(|c| !c.is_empty())
    {
        Some(code) => (200, Ok(code.to_owned())),
        None => (
            400,
            Err(err(
                "the redirect carries neither a code nor an error; nothing was written",
            )),
        ),
    }
}

fn page(text: &str) -> axum::response::Html<String> {
    let escaped = text
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;");
    axum::response::Html(format!(
        "<!DOCTYPE html>\n<html><head><title>dropbox-operator connect</title></head>\
         <body><p>{escaped}</p></body></html>\n"
    ))
}

async fn read_pasted_code(timeout: Duration) -> Result<String, ConnectError> {
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|n| (n, line))
    });
    match tokio::time::timeout(timeout, line).await {
        Err(_) => Err(err(format!(
            "no code pasted within {} (--timeout); nothing was written",
            humanize(timeout)
        ))),
        Ok(Err(e)) => Err(err(format!("reading standard input: {e}"))),
        Ok(Ok(Err(e))) => Err(err(format!("reading standard input: {e}"))),
        Ok(Ok(Ok((0, _)))) => Err(err(
            "standard input ended before a code was pasted; nothing was written",
        )),
        Ok(Ok(Ok((_, line)))) => {
            let code = line.trim();
            if code.is_empty() {
                Err(err("an empty code was pasted; nothing was written"))
            } else {
                Ok(code.to_owned())
            }
        }
    }
}

/// (reason, message) of the Authorized condition.
fn authorized_summary(instance: &DropboxElementInstance) -> Option<(String, String)> {
    let c = find(instance, AUTHORIZED)?;
    Some((c.reason.clone(), c.message.clone()))
}

fn find<'a>(instance: &'a DropboxElementInstance, type_: &str) -> Option<&'a Condition> {
    instance
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
}

/// Reasons after which this code will not make the instance Ready: a person
/// has to act (README, "Conditions and reasons").
const TERMINAL: [&str; 7] = [
    "CodeExchangeFailed",
    "CodeAlreadyUsed",
    "TokensNotStored",
    "InvalidClient",
    "SecretNotFound",
    "SecretKeyMissing",
    "ResourceConflict",
];

/// Where the instance stands for the code just written.
#[derive(Debug, PartialEq)]
pub enum Verdict {
    Ready(String),
    Failed(String),
    Waiting,
}

/// Ready with our code; or Authorized=False for a reason that needs a person,
/// either about our code (its fingerprint is the one in status) or new since
/// the write (so not a leftover of before).
pub fn verdict(
    instance: &DropboxElementInstance,
    fingerprint: &str,
    before: Option<&(String, String)>,
) -> Verdict {
    let status = instance.status.as_ref();
    let ours = status.and_then(|s| s.code_fingerprint.as_deref()) == Some(fingerprint);
    let ready = find(instance, READY).is_some_and(|c| c.status == "True");
    if ours && ready {
        let account = status
            .and_then(|s| s.account.as_ref())
            .and_then(|a| a.email.clone().or_else(|| a.account_id.clone()))
            .map(|a| format!(" (account {a})"))
            .unwrap_or_default();
        return Verdict::Ready(account);
    }
    if let Some(c) = find(instance, AUTHORIZED)
        && c.status == "False"
        && TERMINAL.contains(&c.reason.as_str())
    {
        let fresh = before != Some(&(c.reason.clone(), c.message.clone()));
        if ours || fresh {
            return Verdict::Failed(format!(
                "the instance is not Ready: Authorized=False {}: {}",
                c.reason, c.message
            ));
        }
    }
    Verdict::Waiting
}

/// One line of progress: phase and each condition's status and reason.
fn progress(instance: &DropboxElementInstance) -> String {
    let Some(status) = instance.status.as_ref() else {
        return "  (no status yet)".into();
    };
    let conditions: Vec<String> = status
        .conditions
        .iter()
        .map(|c| format!("{}={} {}", c.type_, c.status, c.reason))
        .collect();
    let phase = status
        .phase
        .map(|p| format!("{p:?}"))
        .unwrap_or_else(|| "-".into());
    format!("  phase {phase}: {}", conditions.join(", "))
}

async fn wait_ready(
    instances: &Api<DropboxElementInstance>,
    name: &str,
    fingerprint: &str,
    before: Option<(String, String)>,
    timeout: Duration,
) -> Result<(), ConnectError> {
    let stream = watcher(
        instances.clone(),
        watcher::Config::default().fields(&format!("metadata.name={name}")),
    )
    .default_backoff()
    .applied_objects();
    let mut stream = std::pin::pin!(stream);
    let mut last_line = String::new();
    let mut last_seen: Option<DropboxElementInstance> = None;
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(next) => next,
            Err(_) => {
                let last = last_seen
                    .as_ref()
                    .and_then(|i| find(i, READY).or_else(|| find(i, AUTHORIZED)))
                    .map(|c| {
                        format!(
                            "; last: {}={} {}: {}",
                            c.type_, c.status, c.reason, c.message
                        )
                    })
                    .unwrap_or_default();
                return Err(err(format!(
                    "the instance did not become Ready within {} (--wait-timeout){last}. The code is stored; \
                     `kubectl get dbxi {name}` shows how it goes on",
                    humanize(timeout)
                )));
            }
        };
        let instance = match next {
            Some(Ok(instance)) => instance,
            Some(Err(e)) => {
                eprintln!("  (watching the instance: {e}; retrying)");
                continue;
            }
            None => return Err(err("the watch on the instance ended")),
        };
        let line = progress(&instance);
        if line != last_line {
            println!("{line}");
            last_line = line;
        }
        match verdict(&instance, fingerprint, before.as_ref()) {
            Verdict::Ready(account) => {
                println!("Connected: {name} is Ready{account}.");
                return Ok(());
            }
            Verdict::Failed(message) => return Err(err(message)),
            Verdict::Waiting => {}
        }
        last_seen = Some(instance);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    fn args(extra: &[&str]) -> ConnectArgs {
        let mut argv = vec!["dropbox-operator", "connect", "x"];
        argv.extend_from_slice(extra);
        match crate::cli::Cli::try_parse_from(argv)
            .expect("parse")
            .command
        {
            crate::cli::Command::Connect(a) => *a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn pkce_follows_rfc7636() {
        // RFC 7636 Appendix B.
        assert_eq!(
            s256("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk"),
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let p = Pkce::new();
        assert_eq!(p.verifier.len(), 43);
        assert_ne!(p.verifier, Pkce::new().verifier);
        assert_eq!(s256(&p.verifier), p.challenge);
    }

    #[test]
    fn redirect_uri_choice() {
        let default = choose_redirect(&args(&[]), Some("https://app.example.com/auth")).unwrap();
        assert_eq!(default.unwrap().as_str(), "http://127.0.0.1:53682/");
        let port = choose_redirect(&args(&["--port", "8910"]), None).unwrap();
        assert_eq!(port.unwrap().as_str(), "http://127.0.0.1:8910/");
        let cb = choose_redirect(&args(&[]), Some("http://localhost:9000/cb")).unwrap();
        assert_eq!(cb.unwrap().as_str(), "http://localhost:9000/cb");
        let explicit = choose_redirect(
            &args(&["--redirect-uri", "http://[::1]:7000/x"]),
            Some("http://localhost:9000/cb"),
        )
        .unwrap();
        assert_eq!(explicit.unwrap().as_str(), "http://[::1]:7000/x");
        assert!(
            choose_redirect(&args(&["--no-redirect"]), None)
                .unwrap()
                .is_none()
        );
        assert!(
            choose_redirect(&args(&["--redirect-uri", "https://app.example.com/"]), None).is_err()
        );
        assert!(choose_redirect(&args(&["--redirect-uri", "http://10.0.0.1:80/"]), None).is_err());
    }

    #[test]
    fn redirects_are_judged_state_first() {
        let q = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs
                .iter()
                .map(|(k, v)| ((*k).into(), (*v).into()))
                .collect()
        };
        assert_eq!(
            judge_redirect(&q(&[("code", "C"), ("state", "S")]), "S")
                .1
                .unwrap(),
            "C"
        );
        let forged = judge_redirect(&q(&[("code", "C"), ("state", "X")]), "S").1;
        assert!(
            forged
                .unwrap_err()
                .to_string()
                .contains("state does not match")
        );
        let no_state = judge_redirect(&q(&[("code", "C")]), "S").1;
        assert!(no_state.is_err());
        let denied = judge_redirect(&q(&[("error", "access_denied"), ("state", "S")]), "S").1;
        assert!(denied.unwrap_err().to_string().contains("denied"));
        // A denial with another state is a state problem first.
        let other = judge_redirect(&q(&[("error", "access_denied"), ("state", "X")]), "S").1;
        assert!(other.unwrap_err().to_string().contains("state"));
    }

    fn instance(
        fingerprint: Option<&str>,
        conditions: &[(&str, &str, &str)],
    ) -> DropboxElementInstance {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
            "kind": "DropboxElementInstance",
            "metadata": {"name": "x"},
            "spec": {"element": {"key": "dropbox"}, "authentication": {"type": "oauth2"}},
            "status": {
                "codeFingerprint": fingerprint,
                "conditions": conditions.iter().map(|(t, s, r)| serde_json::json!({
                    "type": t, "status": s, "reason": r, "message": format!("{r} message"),
                    "lastTransitionTime": "2026-01-01T00:00:00Z"
                })).collect::<Vec<_>>()
            }
        }))
        .expect("instance")
    }

    #[test]
    fn verdicts() {
        let ours = "sha256:ours";
        let ready = instance(
            Some(ours),
            &[
                ("Authorized", "True", "TokenValid"),
                ("Ready", "True", "Ready"),
            ],
        );
        assert!(matches!(verdict(&ready, ours, None), Verdict::Ready(_)));
        // Ready on an older code is not this code's success.
        let old = instance(Some("sha256:old"), &[("Ready", "True", "Ready")]);
        assert_eq!(verdict(&old, ours, None), Verdict::Waiting);
        let refused = instance(Some(ours), &[("Authorized", "False", "CodeExchangeFailed")]);
        assert!(
            matches!(verdict(&refused, ours, None), Verdict::Failed(m) if m.contains("CodeExchangeFailed"))
        );
        // The same verdict as before the write, about another code: a leftover.
        let before = (
            "CodeExchangeFailed".to_owned(),
            "CodeExchangeFailed message".to_owned(),
        );
        let leftover = instance(
            Some("sha256:old"),
            &[("Authorized", "False", "CodeExchangeFailed")],
        );
        assert_eq!(verdict(&leftover, ours, Some(&before)), Verdict::Waiting);
        let fresh = instance(None, &[("Authorized", "False", "InvalidClient")]);
        assert!(matches!(
            verdict(&fresh, ours, Some(&before)),
            Verdict::Failed(_)
        ));
        let transient = instance(Some(ours), &[("Authorized", "False", "DropboxUnavailable")]);
        assert_eq!(verdict(&transient, ours, None), Verdict::Waiting);
    }
}
