//! `dropbox-operator connect` (also `kubectl dropbox connect`): authorizes an
//! oauth2 instance's Dropbox account in one command (docs/user-guide.md, "Connect an account
//! in one command").
//!
//! 1. Reads the instance; the app key is its `status.appKey`, which the
//!    controller publishes (so the app Secret, which also holds the app secret,
//!    is not read). Right after the instance was applied, waits for it.
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
//! The page the browser lands on (the loopback redirect) says what happened and
//! what to do next; after an approval it follows step 4 and shows its outcome.
//! Each failure class has its own exit code ([`EXIT_CODES_HELP`]); `-o json`
//! prints one JSON object per line instead of sentences.
//!
//! Nothing secret is printed: not the code, the verifier or the app secret
//! (which is not even read).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
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
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tokio::sync::{Notify, mpsc};
use url::Url;

use crate::api::{AccountStatus, AuthenticationType, DropboxElementInstance};
use crate::cli::{ConnectArgs, ConnectOutput};
use crate::conditions::{AUTHORIZED, READY};
use crate::contract::{CODE_REDIRECT_URI_KEY, CODE_VERIFIER_KEY};

/// Field manager of the code Secret fields `connect` writes.
pub const FIELD_MANAGER: &str = "dropbox-operator-connect";

/// Where the landing page asks connect's loopback server for the outcome.
pub const OUTCOME_PATH: &str = "/.dropbox-operator-connect/outcome";

/// `connect --help`'s table of exit codes; [`ConnectError::exit_code`] and
/// [`ConnectError::class`] follow it (a unit test checks each row).
pub const EXIT_CODES_HELP: &str = "\
Exit codes (with -o json, the last line's \"exitCode\" and \"class\"):
   0  connected         the instance is Ready with the new code
   2  usage             an invalid flag or argument
   3  kubernetes        no usable kubeconfig, the API server unreachable, or a request
                        refused (RBAC)
   4  instance          the instance cannot be connected as it is: not found, type apiKey, no Secret
                        references, or no status.appKey (the controller cannot read the app Secret)
   5  local             cannot listen on the redirect URI, or standard input failed
   6  denied            the approval was denied or refused in Dropbox; nothing was written
   7  redirect          a redirect this run did not start (state mismatch) or without a code;
                        nothing was written
   8  approval-timeout  no approval within --timeout; nothing was written
   9  not-ready         the code is stored, but the instance reports a failure a person must fix
  10  ready-timeout     the code is stored, but the instance was not Ready within --wait-timeout";

/// Why `connect` stopped, by failure class; the message is what the person
/// reads (terminal, landing page, `-o json`).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// No usable kubeconfig, the API server unreachable, or a request refused.
    #[error("{0}")]
    Kubernetes(String),
    /// The instance cannot be connected as it is.
    #[error("{0}")]
    Instance(String),
    /// This machine: the redirect port, standard input, the runtime.
    #[error("{0}")]
    Local(String),
    /// Dropbox did not issue a code: the person denied, or Dropbox refused.
    #[error("{0}")]
    Denied(String),
    /// A redirect this run did not start, or one without a code.
    #[error("{0}")]
    Redirect(String),
    /// No approval within --timeout.
    #[error("{0}")]
    ApprovalTimeout(String),
    /// The code is stored; the instance reports a failure a person must fix.
    #[error("{0}")]
    NotReady(String),
    /// The code is stored; not Ready within --wait-timeout.
    #[error("{0}")]
    ReadyTimeout(String),
}

impl ConnectError {
    /// The process exit code of this class (see [`EXIT_CODES_HELP`]).
    pub fn exit_code(&self) -> u8 {
        match self {
            ConnectError::Kubernetes(_) => 3,
            ConnectError::Instance(_) => 4,
            ConnectError::Local(_) => 5,
            ConnectError::Denied(_) => 6,
            ConnectError::Redirect(_) => 7,
            ConnectError::ApprovalTimeout(_) => 8,
            ConnectError::NotReady(_) => 9,
            ConnectError::ReadyTimeout(_) => 10,
        }
    }

    /// The class's name in `-o json` and on the landing page.
    pub fn class(&self) -> &'static str {
        match self {
            ConnectError::Kubernetes(_) => "kubernetes",
            ConnectError::Instance(_) => "instance",
            ConnectError::Local(_) => "local",
            ConnectError::Denied(_) => "denied",
            ConnectError::Redirect(_) => "redirect",
            ConnectError::ApprovalTimeout(_) => "approval-timeout",
            ConnectError::NotReady(_) => "not-ready",
            ConnectError::ReadyTimeout(_) => "ready-timeout",
        }
    }
}

/// What the person reads on standard output: sentences, or JSON lines.
struct Output {
    format: ConnectOutput,
}

impl Output {
    fn json(&self) -> bool {
        self.format == ConnectOutput::Json
    }

    /// A sentence in text mode, nothing in JSON mode.
    fn say(&self, text: &str) {
        if !self.json() {
            println!("{text}");
        }
    }

    /// A JSON line in JSON mode, nothing in text mode.
    fn event(&self, value: Value) {
        if self.json() {
            println!("{value}");
        }
    }
}

/// Runs the subcommand; prints its own progress and errors and exits with the
/// failure class's code.
pub fn run(args: &ConnectArgs) -> ExitCode {
    let out = Output {
        format: args.output,
    };
    let instance = args.instance.clone();
    let result = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime.block_on(connect(args, &out)),
        Err(e) => Err(ConnectError::Local(format!(
            "cannot start the async runtime: {e}"
        ))),
    };
    match result {
        Ok(connected) => {
            out.say(&connected.sentence());
            out.event(json!({
                "event": "result", "ok": true, "exitCode": 0, "class": "connected",
                "instance": connected.instance, "account": connected.account,
                "message": connected.sentence(),
            }));
            ExitCode::SUCCESS
        }
        Err(e) => {
            if out.json() {
                out.event(json!({
                    "event": "result", "ok": false, "exitCode": e.exit_code(), "class": e.class(),
                    "instance": instance, "message": e.to_string(),
                }));
            } else {
                eprintln!("error: {e}");
            }
            ExitCode::from(e.exit_code())
        }
    }
}

/// The instance is Ready with the new code.
struct Connected {
    /// `namespace/name`.
    instance: String,
    account: Option<AccountStatus>,
}

impl Connected {
    fn sentence(&self) -> String {
        let name = self.instance.rsplit('/').next().unwrap_or_default();
        let account = self
            .account
            .as_ref()
            .and_then(|a| a.email.clone().or_else(|| a.account_id.clone()))
            .map(|a| format!(" (account {a})"))
            .unwrap_or_default();
        format!("Connected: {name} is Ready{account}.")
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
        if !is_loopback_redirect(uri) || uri.path() == OUTCOME_PATH {
            return Err(ConnectError::Local(format!(
                "--redirect-uri {uri} is not a loopback http URL (http://127.0.0.1:PORT/..., \
                 http://[::1]:PORT/... or http://localhost:PORT/..., path other than {OUTCOME_PATH}): \
                 connect must receive the redirect itself. For an app without such a redirect URI \
                 use --no-redirect"
            )));
        }
        return Ok(Some(uri.clone()));
    }
    if let Some(url) = callback_url
        .and_then(|u| Url::parse(u).ok())
        .filter(is_loopback_redirect)
        .filter(|u| u.path() != OUTCOME_PATH)
    {
        return Ok(Some(url));
    }
    Url::parse(&format!("http://127.0.0.1:{}/", args.port))
        .map(Some)
        .map_err(|e| ConnectError::Local(format!("invalid --port: {e}")))
}

async fn kube_client(args: &ConnectArgs) -> Result<(Client, String), ConnectError> {
    let k8s = ConnectError::Kubernetes;
    let config = kube_config(args.kubeconfig.as_deref(), args.context.as_deref())
        .await
        .map_err(k8s)?;
    let namespace = args
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).map_err(|e| k8s(format!("Kubernetes client: {e}")))?;
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

/// The instance's own problems; else the code Secret's name and key.
fn check_instance(
    instance: &DropboxElementInstance,
    namespace: &str,
    name: &str,
) -> Result<(String, String), ConnectError> {
    let auth = &instance.spec.authentication;
    if auth.auth_type != AuthenticationType::OAuth2 {
        return Err(ConnectError::Instance(format!(
            "{namespace}/{name} has authentication type apiKey; connect authorizes oauth2 instances"
        )));
    }
    let (Some(_), Some(code_ref)) = (&auth.app_secret_ref, &auth.code_secret_ref) else {
        return Err(ConnectError::Instance(format!(
            "{namespace}/{name} needs spec.authentication.appSecretRef and codeSecretRef"
        )));
    };
    if [CODE_VERIFIER_KEY, CODE_REDIRECT_URI_KEY].contains(&code_ref.key.as_str()) {
        return Err(ConnectError::Instance(format!(
            "codeSecretRef.key {:?} is reserved for what connect stores next to the code; use another key",
            code_ref.key
        )));
    }
    Ok((code_ref.name.clone(), code_ref.key.clone()))
}

/// The app key the controller published, or why there is none: None while the
/// controller has not looked at this generation yet (so it may still come).
fn published_app_key(
    instance: &DropboxElementInstance,
    namespace: &str,
    name: &str,
) -> Option<Result<String, ConnectError>> {
    let status = instance.status.as_ref();
    if let Some(key) = status
        .and_then(|s| s.app_key.as_deref())
        .filter(|k| !k.is_empty())
    {
        return Some(Ok(key.to_owned()));
    }
    let seen = status.and_then(|s| s.observed_generation).is_some()
        && status.and_then(|s| s.observed_generation) == instance.metadata.generation;
    if !seen {
        return None;
    }
    let why = find(instance, AUTHORIZED)
        .filter(|c| c.status == "False")
        .map(|c| format!(" (Authorized=False {}: {})", c.reason, c.message))
        .unwrap_or_default();
    let app = instance
        .spec
        .authentication
        .app_secret_ref
        .as_ref()
        .map(|r| format!("{namespace}/{} key {:?}", r.name, r.client_id_key))
        .unwrap_or_else(|| "(appSecretRef)".into());
    Some(Err(ConnectError::Instance(format!(
        "{namespace}/{name} has no status.appKey: the controller could not read the app key from \
         the app Secret {app}{why}. Fix that (the instance's Authorized condition says how), then \
         run connect again"
    ))))
}

/// Reads the instance; waits (up to `wait`) for the controller to publish its
/// app key when it has not looked at the instance yet.
async fn read_target(
    instances: &Api<DropboxElementInstance>,
    namespace: &str,
    name: &str,
    wait: Duration,
    out: &Output,
) -> Result<Target, ConnectError> {
    let not_found = || {
        ConnectError::Instance(format!(
            "DropboxElementInstance {namespace}/{name} not found"
        ))
    };
    let mut instance = instances
        .get_opt(name)
        .await
        .map_err(|e| {
            ConnectError::Kubernetes(format!(
                "cannot read DropboxElementInstance {namespace}/{name}: {e}"
            ))
        })?
        .ok_or_else(not_found)?;
    check_instance(&instance, namespace, name)?;
    let app_key = match published_app_key(&instance, namespace, name) {
        Some(key) => key?,
        None => {
            out.say(&format!(
                "Waiting up to {} for the operator to publish the app key of {namespace}/{name} (status.appKey)...",
                humanize(wait)
            ));
            let stream = watcher(
                instances.clone(),
                watcher::Config::default().fields(&format!("metadata.name={name}")),
            )
            .default_backoff()
            .applied_objects();
            let mut stream = std::pin::pin!(stream);
            let deadline = tokio::time::Instant::now() + wait;
            loop {
                match tokio::time::timeout_at(deadline, stream.next()).await {
                    Err(_) => {
                        return Err(ConnectError::Instance(format!(
                            "the operator did not publish status.appKey of {namespace}/{name} within {} \
                             (--wait-timeout): is the controller running and does it watch namespace {namespace}?",
                            humanize(wait)
                        )));
                    }
                    Ok(None) => {
                        return Err(ConnectError::Kubernetes(
                            "the watch on the instance ended".into(),
                        ));
                    }
                    Ok(Some(Err(e))) => {
                        tracing::warn!(error = %e, "watching the instance; retrying");
                        continue;
                    }
                    Ok(Some(Ok(next))) => instance = next,
                }
                check_instance(&instance, namespace, name)?;
                if let Some(key) = published_app_key(&instance, namespace, name) {
                    break key?;
                }
            }
        }
    };
    let (code_secret, code_key) = check_instance(&instance, namespace, name)?;
    Ok(Target {
        app_key,
        code_secret,
        code_key,
        callback_url: instance.spec.authentication.callback_url.clone(),
    })
}

async fn connect(args: &ConnectArgs, out: &Output) -> Result<Connected, ConnectError> {
    let (client, namespace) = kube_client(args).await?;
    let name = args.instance.as_str();
    let instances: Api<DropboxElementInstance> = Api::namespaced(client.clone(), &namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let target = read_target(&instances, &namespace, name, args.wait_timeout, out).await?;
    let redirect = choose_redirect(args, target.callback_url.as_deref())?;

    let pkce = Pkce::new();
    let state = URL_SAFE_NO_PAD.encode(rand::random::<[u8; 24]>());
    let page = PageContext {
        instance: format!("{namespace}/{name}"),
        rerun: format!("kubectl dropbox connect {name} -n {namespace}"),
    };
    // Listen before the link is shown: the redirect can come at once.
    let mut listener = match &redirect {
        Some(uri) => Some(Listener::bind(uri, &state, page.clone()).await?),
        None => None,
    };
    let link = crate::dropbox::authorize_url(
        &args.dropbox_www_url,
        &target.app_key,
        redirect.as_ref().map(Url::as_str),
        &state,
        Some(&pkce.challenge),
    );
    out.say(&format!(
        "Approve the Dropbox app for {namespace}/{name} at:\n\n  {link}\n"
    ));
    out.event(json!({
        "event": "link", "instance": page.instance, "url": link,
        "redirectUri": redirect.as_ref().map(Url::as_str),
        "pasteCode": redirect.is_none(), "timeoutSeconds": args.timeout.as_secs(),
    }));
    match &redirect {
        Some(uri) => out.say(&format!(
            "Waiting up to {} for Dropbox to redirect to {uri} (this exact URI must be a redirect URI \
             of the app in the Dropbox App Console).",
            humanize(args.timeout)
        )),
        None => out.say(&format!(
            "After approving, Dropbox shows a code: paste it here and press Enter (waiting up to {}).",
            humanize(args.timeout)
        )),
    }
    if !args.no_browser && webbrowser::open(&link).is_ok() {
        out.say("(opened in your browser)");
    }

    let code = match listener.as_mut() {
        Some(listener) => listener.code(args.timeout).await,
        None => read_pasted_code(args.timeout).await,
    };
    let result = match code {
        Ok(code) => {
            store_and_wait(
                args, out, &instances, &secrets, &target, &redirect, &pkce, &code, &page,
            )
            .await
        }
        Err(e) => Err(e),
    };
    if let Some(listener) = listener {
        // The landing page shows the outcome of the whole run.
        listener.finish(page.outcome(&result)).await;
    }
    result
}

/// Writes the code and follows the instance until it is Ready with it.
#[allow(clippy::too_many_arguments)]
async fn store_and_wait(
    args: &ConnectArgs,
    out: &Output,
    instances: &Api<DropboxElementInstance>,
    secrets: &Api<Secret>,
    target: &Target,
    redirect: &Option<Url>,
    pkce: &Pkce,
    code: &str,
    page: &PageContext,
) -> Result<Connected, ConnectError> {
    let name = args.instance.as_str();
    // Status before the write tells a fresh verdict from an old one.
    let before = instances
        .get_opt(name)
        .await
        .ok()
        .flatten()
        .and_then(|i| authorized_summary(&i));
    write_code_secret(
        secrets,
        target,
        code,
        &pkce.verifier,
        redirect.as_ref().map(Url::as_str),
    )
    .await
    .map_err(|e| {
        ConnectError::Kubernetes(format!(
            "cannot write the code Secret {}/{}: {e}. connect needs create and patch on that Secret",
            page.namespace(),
            target.code_secret
        ))
    })?;
    out.say(&format!(
        "Stored the code in Secret {}/{} (keys {:?}, {CODE_VERIFIER_KEY:?}, {CODE_REDIRECT_URI_KEY:?}); \
         waiting up to {} for the instance to be Ready...",
        page.namespace(),
        target.code_secret,
        target.code_key,
        humanize(args.wait_timeout)
    ));
    out.event(json!({
        "event": "stored",
        "secret": format!("{}/{}", page.namespace(), target.code_secret),
        "keys": [target.code_key, CODE_VERIFIER_KEY, CODE_REDIRECT_URI_KEY],
        "waitTimeoutSeconds": args.wait_timeout.as_secs(),
    }));
    let fingerprint = crate::controller::inputs::fingerprint(code);
    wait_ready(
        instances,
        name,
        &fingerprint,
        before,
        args.wait_timeout,
        out,
    )
    .await
    .map(|account| Connected {
        instance: page.instance.clone(),
        account,
    })
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

// ---- the landing page ----------------------------------------------------------

/// What the landing pages name.
#[derive(Clone)]
struct PageContext {
    /// `namespace/name`.
    instance: String,
    /// The command that starts over.
    rerun: String,
}

impl PageContext {
    fn namespace(&self) -> &str {
        self.instance.split('/').next().unwrap_or_default()
    }

    fn name(&self) -> &str {
        self.instance.rsplit('/').next().unwrap_or_default()
    }

    /// The page for a failure class: what happened, what to do next and the
    /// command that does it.
    fn failure(&self, e: &ConnectError) -> Landing {
        let (ns, name) = (self.namespace(), self.name());
        let rerun = self.rerun.clone();
        let (title, next, command) = match e {
            ConnectError::Denied(_) => (
                "Not connected: the approval was denied".to_owned(),
                "To connect the account, run connect again and choose Allow on Dropbox's page."
                    .to_owned(),
                rerun,
            ),
            ConnectError::Redirect(_) => (
                "Not connected: this is not the link connect is waiting for".to_owned(),
                "Close this tab and older ones, run connect again and open the link it prints \
                 (each run's link is new)."
                    .to_owned(),
                rerun,
            ),
            ConnectError::NotReady(_) => (
                format!("Not connected: {name} is not Ready"),
                "The code is stored but cannot work as things are. Fix what the message says \
                 (this command shows the details), then run connect again: a code works only once."
                    .to_owned(),
                format!("kubectl describe dbxi {name} -n {ns}"),
            ),
            ConnectError::ReadyTimeout(_) => (
                format!("Still waiting: {name} is not Ready yet"),
                "The code is stored and the operator goes on with it. This command shows how it \
                 goes on; if it stays not Ready, kubectl describe says why."
                    .to_owned(),
                format!("kubectl get dbxi {name} -n {ns}"),
            ),
            ConnectError::Kubernetes(_) => (
                "Not connected: Kubernetes refused or failed a request".to_owned(),
                format!(
                    "Check your access to namespace {ns} (connect needs get, list and watch on the \
                     instance, create and patch on its code Secret), then run connect again."
                ),
                rerun,
            ),
            ConnectError::ApprovalTimeout(_)
            | ConnectError::Instance(_)
            | ConnectError::Local(_) => (
                "Not connected".to_owned(),
                "The terminal says why; then run connect again.".to_owned(),
                rerun,
            ),
        };
        Landing {
            class: e.class(),
            title,
            message: sentence_case(&e.to_string()),
            next,
            command,
        }
    }

    /// The final outcome the waiting page shows.
    fn outcome(&self, result: &Result<Connected, ConnectError>) -> Landing {
        match result {
            Ok(connected) => {
                let account = connected
                    .account
                    .as_ref()
                    .and_then(|a| a.email.clone().or_else(|| a.account_id.clone()))
                    .map(|a| format!("The Dropbox account {a}"))
                    .unwrap_or_else(|| "The Dropbox account".into());
                Landing {
                    class: "connected",
                    title: format!("Connected: {} is Ready", self.name()),
                    message: format!(
                        "{account} is connected to {}. The operator keeps its access token fresh \
                         from now on.",
                        self.instance
                    ),
                    next: "You can close this tab. This command shows the instance; its events \
                           (if enabled) go to spec.events.callbackUrl."
                        .to_owned(),
                    command: format!("kubectl get dbxi {} -n {}", self.name(), self.namespace()),
                }
            }
            Err(e) => self.failure(e),
        }
    }
}

/// `the approval ...` → `The approval ...` (messages are written to follow `error: `).
fn sentence_case(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

/// One landing page's content.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Landing {
    /// `connected`, `pending` or a failure class.
    pub class: &'static str,
    pub title: String,
    pub message: String,
    pub next: String,
    /// The command the next step runs (may be empty).
    pub command: String,
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The landing page; with `poll`, it asks connect for the final outcome
/// ([`OUTCOME_PATH`]) and shows it in place.
fn landing_page(landing: &Landing, poll: bool) -> axum::response::Html<String> {
    let script = if poll {
        format!(
            r#"<script>
(async () => {{
  const show = (o) => {{
    document.body.dataset.outcome = o.class;
    document.getElementById("title").textContent = o.title;
    document.getElementById("message").textContent = o.message;
    document.getElementById("next").textContent = o.next;
    document.getElementById("command").textContent = o.command;
    document.title = o.title;
  }};
  for (;;) {{
    try {{
      const r = await fetch("{OUTCOME_PATH}", {{cache: "no-store"}});
      if (r.status === 200) {{ show(await r.json()); return; }}
    }} catch (e) {{
      show({{class: "unknown", title: "connect has stopped",
        message: "connect is no longer running, so this page cannot say how it ended.",
        next: "The terminal where you ran connect says it.", command: ""}});
      return;
    }}
    await new Promise((resolve) => setTimeout(resolve, 1000));
  }}
}})();
</script>"#
        )
    } else {
        String::new()
    };
    axum::response::Html(format!(
        r#"<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; max-width: 44rem; margin: 3rem auto; padding: 0 1rem; color: #1e1919; }}
h1 {{ font-size: 1.5rem; border-left: 6px solid #b3261e; padding-left: .75rem; }}
body[data-outcome="connected"] h1 {{ border-color: #0a7d32; }}
body[data-outcome="pending"] h1 {{ border-color: #0061fe; }}
body[data-outcome="ready-timeout"] h1 {{ border-color: #a15c00; }}
.next {{ background: #f7f5f2; padding: .75rem 1rem; border-radius: 6px; }}
pre {{ margin: .5rem 0 0; white-space: pre-wrap; }}
pre:empty {{ display: none; }}
footer {{ color: #736c64; font-size: .85rem; margin-top: 2rem; }}
</style></head>
<body data-outcome="{class}">
<h1 id="title">{title}</h1>
<p id="message">{message}</p>
<div class="next"><strong>Next:</strong> <span id="next">{next}</span><pre id="command">{command}</pre></div>
<footer>dropbox-operator connect</footer>
{script}
</body></html>
"#,
        title = escape(&landing.title),
        class = landing.class,
        message = escape(&landing.message),
        next = escape(&landing.next),
        command = escape(&landing.command),
    ))
}

/// The loopback server that receives Dropbox's redirect and serves the landing
/// pages until the run ends.
struct Listener {
    outcome: mpsc::Receiver<Result<String, ConnectError>>,
    servers: Vec<tokio::task::JoinHandle<()>>,
    shutdown: tokio_util::sync::CancellationToken,
    shared: Arc<PageShared>,
}

/// What the handlers share with the run.
struct PageShared {
    expected: Expected,
    page: PageContext,
    tx: mpsc::Sender<Result<String, ConnectError>>,
    /// The run's final outcome, once there is one.
    last: Mutex<Option<Landing>>,
    /// Notified when a page fetched the final outcome.
    fetched: Notify,
    /// Whether a redirect with a code was answered with the waiting page.
    waiting_page: std::sync::atomic::AtomicBool,
}

impl Drop for Listener {
    fn drop(&mut self) {
        for s in &self.servers {
            s.abort();
        }
    }
}

impl Listener {
    async fn bind(uri: &Url, state: &str, page: PageContext) -> Result<Listener, ConnectError> {
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
        let shared = Arc::new(PageShared {
            expected: Expected {
                path: uri.path().to_owned(),
                state: state.to_owned(),
            },
            page,
            tx,
            last: Mutex::new(None),
            fetched: Notify::new(),
            waiting_page: std::sync::atomic::AtomicBool::new(false),
        });
        let mut servers = Vec::new();
        let mut first_error = None;
        let shutdown = tokio_util::sync::CancellationToken::new();
        for ip in addrs {
            match tokio::net::TcpListener::bind(SocketAddr::new(ip, port)).await {
                Ok(listener) => {
                    let app = axum::Router::new()
                        .route(OUTCOME_PATH, axum::routing::get(outcome_json))
                        .fallback(redirect_page)
                        .with_state(shared.clone());
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
            return Err(ConnectError::Local(format!(
                "cannot listen on the redirect URI {uri} ({}); pick a free port with --port or --redirect-uri \
                 (and register that URI in the Dropbox App Console)",
                first_error.unwrap_or_default()
            )));
        }
        Ok(Listener {
            outcome,
            servers,
            shutdown,
            shared,
        })
    }

    /// The code of the first redirect, or why there is none.
    async fn code(&mut self, timeout: Duration) -> Result<String, ConnectError> {
        match tokio::time::timeout(timeout, self.outcome.recv()).await {
            Ok(Some(outcome)) => outcome,
            Ok(None) => Err(ConnectError::Local("the redirect listener stopped".into())),
            Err(_) => Err(ConnectError::ApprovalTimeout(format!(
                "no approval within {} (--timeout); nothing was written. Run connect again to get a new link",
                humanize(timeout)
            ))),
        }
    }

    /// Publishes the run's outcome to a waiting landing page, gives it a moment
    /// to fetch it, and stops serving once the pages have been sent.
    async fn finish(mut self, last: Landing) {
        let waiting = self
            .shared
            .waiting_page
            .load(std::sync::atomic::Ordering::Acquire);
        let fetched = self.shared.fetched.notified();
        *self.shared.last.lock().expect("landing lock") = Some(last);
        if waiting {
            // The page polls every second.
            let _ = tokio::time::timeout(Duration::from_secs(3), fetched).await;
        }
        self.shutdown.cancel();
        let servers = std::mem::take(&mut self.servers);
        let _ =
            tokio::time::timeout(Duration::from_secs(2), futures::future::join_all(servers)).await;
    }
}

#[derive(Clone)]
struct Expected {
    path: String,
    state: String,
}

/// The run's final outcome for the waiting page: 204 until there is one.
async fn outcome_json(
    axum::extract::State(shared): axum::extract::State<Arc<PageShared>>,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let last = shared.last.lock().expect("landing lock").clone();
    match last {
        Some(landing) => {
            shared.fetched.notify_one();
            (
                [(axum::http::header::CACHE_CONTROL, "no-store")],
                axum::Json(landing),
            )
                .into_response()
        }
        None => axum::http::StatusCode::NO_CONTENT.into_response(),
    }
}

/// Judges one request on the redirect URI; the page tells the person the same.
async fn redirect_page(
    axum::extract::State(shared): axum::extract::State<Arc<PageShared>>,
    uri: axum::http::Uri,
) -> (axum::http::StatusCode, axum::response::Html<String>) {
    use axum::http::StatusCode;
    if uri.path() != shared.expected.path {
        let landing = Landing {
            class: "not-found",
            title: "Not found".into(),
            message: format!(
                "connect waits for Dropbox's redirect on {}, not here.",
                shared.expected.path
            ),
            next: "Open the link connect printed.".into(),
            command: String::new(),
        };
        return (StatusCode::NOT_FOUND, landing_page(&landing, false));
    }
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let (status, outcome) = judge_redirect(&query, &shared.expected.state);
    let (landing, poll) = match &outcome {
        Ok(_) => {
            shared
                .waiting_page
                .store(true, std::sync::atomic::Ordering::Release);
            (
                Landing {
                    class: "pending",
                    title: "Approved in Dropbox".into(),
                    message: format!(
                        "connect is storing the code for {} and waiting for the instance to become Ready. \
                         This page shows the result.",
                        shared.page.instance
                    ),
                    next: "Keep this tab open for a moment (the terminal shows the progress too)."
                        .into(),
                    command: String::new(),
                },
                true,
            )
        }
        Err(e) => (shared.page.failure(e), false),
    };
    let _ = shared.tx.try_send(outcome);
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::OK),
        landing_page(&landing, poll),
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
            Err(ConnectError::Redirect(
                "the redirect's state does not match the link connect printed (a redirect of another \
                 authorization, or a forged one); nothing was written. Run connect again and use the new link"
                    .into(),
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
        return (200, Err(ConnectError::Denied(message)));
    }
    match query
        .get("code")
        .map(|c| c.trim())
        .filter(|c| !c.is_empty())
    {
        Some(code) => (200, Ok(code.to_owned())),
        None => (
            400,
            Err(ConnectError::Redirect(
                "the redirect carries neither a code nor an error; nothing was written".into(),
            )),
        ),
    }
}

async fn read_pasted_code(timeout: Duration) -> Result<String, ConnectError> {
    let line = tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        std::io::stdin().read_line(&mut line).map(|n| (n, line))
    });
    let local = ConnectError::Local;
    match tokio::time::timeout(timeout, line).await {
        Err(_) => Err(ConnectError::ApprovalTimeout(format!(
            "no code pasted within {} (--timeout); nothing was written",
            humanize(timeout)
        ))),
        Ok(Err(e)) => Err(local(format!("reading standard input: {e}"))),
        Ok(Ok(Err(e))) => Err(local(format!("reading standard input: {e}"))),
        Ok(Ok(Ok((0, _)))) => Err(local(
            "standard input ended before a code was pasted; nothing was written".into(),
        )),
        Ok(Ok(Ok((_, line)))) => {
            let code = line.trim();
            if code.is_empty() {
                Err(local(
                    "an empty code was pasted; nothing was written".into(),
                ))
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
/// has to act (docs/reference.md, "Conditions and reasons").
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
    Ready(Option<AccountStatus>),
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
        return Verdict::Ready(status.and_then(|s| s.account.clone()));
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

fn progress_event(instance: &DropboxElementInstance) -> Value {
    let status = instance.status.as_ref();
    json!({
        "event": "progress",
        "phase": status.and_then(|s| s.phase).map(|p| format!("{p:?}")),
        "conditions": status.map(|s| s.conditions.iter().map(|c| json!({
            "type": c.type_, "status": c.status, "reason": c.reason,
        })).collect::<Vec<_>>()).unwrap_or_default(),
    })
}

async fn wait_ready(
    instances: &Api<DropboxElementInstance>,
    name: &str,
    fingerprint: &str,
    before: Option<(String, String)>,
    timeout: Duration,
    out: &Output,
) -> Result<Option<AccountStatus>, ConnectError> {
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
                return Err(ConnectError::ReadyTimeout(format!(
                    "the instance did not become Ready within {} (--wait-timeout){last}. The code is stored; \
                     `kubectl get dbxi {name}` shows how it goes on",
                    humanize(timeout)
                )));
            }
        };
        let instance = match next {
            Some(Ok(instance)) => instance,
            Some(Err(e)) => {
                if !out.json() {
                    eprintln!("  (watching the instance: {e}; retrying)");
                }
                continue;
            }
            None => {
                return Err(ConnectError::Kubernetes(
                    "the watch on the instance ended".into(),
                ));
            }
        };
        let line = progress(&instance);
        if line != last_line {
            out.say(&line);
            out.event(progress_event(&instance));
            last_line = line;
        }
        match verdict(&instance, fingerprint, before.as_ref()) {
            Verdict::Ready(account) => return Ok(account),
            Verdict::Failed(message) => return Err(ConnectError::NotReady(message)),
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

    #[test]
    fn each_failure_class_has_its_documented_exit_code() {
        let all = [
            ConnectError::Kubernetes(String::new()),
            ConnectError::Instance(String::new()),
            ConnectError::Local(String::new()),
            ConnectError::Denied(String::new()),
            ConnectError::Redirect(String::new()),
            ConnectError::ApprovalTimeout(String::new()),
            ConnectError::NotReady(String::new()),
            ConnectError::ReadyTimeout(String::new()),
        ];
        let rows: Vec<(u8, &str)> = EXIT_CODES_HELP
            .lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                let code = words.next()?.parse().ok()?;
                Some((code, words.next()?))
            })
            .collect();
        assert!(rows.contains(&(0, "connected")), "{rows:?}");
        // clap's own code for usage errors.
        assert!(rows.contains(&(2, "usage")), "{rows:?}");
        for e in &all {
            assert!(
                rows.contains(&(e.exit_code(), e.class())),
                "{} {} is not in the table: {rows:?}",
                e.exit_code(),
                e.class()
            );
        }
        let mut codes: Vec<u8> = all.iter().map(ConnectError::exit_code).collect();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), all.len(), "one code per class");
        assert_eq!(
            rows.len(),
            all.len() + 2,
            "no row without a class: {rows:?}"
        );
    }

    fn with_status(generation: i64, status: serde_json::Value) -> DropboxElementInstance {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
            "kind": "DropboxElementInstance",
            "metadata": {"name": "x", "generation": generation},
            "spec": {"element": {"key": "dropbox"}, "authentication": {
                "type": "oauth2", "appSecretRef": {"name": "app"}, "codeSecretRef": {"name": "code"}}},
            "status": status,
        }))
        .expect("instance")
    }

    #[test]
    fn the_app_key_comes_from_status_once_the_controller_looked() {
        let key = |i: &DropboxElementInstance| {
            published_app_key(i, "ns", "x").map(|r| r.map_err(|e| e.to_string()))
        };
        let published = with_status(
            2,
            serde_json::json!({"observedGeneration": 1, "appKey": "k3y"}),
        );
        assert_eq!(key(&published), Some(Ok("k3y".into())));
        // Not looked at yet (no status, or an older generation): wait.
        assert_eq!(key(&with_status(1, serde_json::json!({}))), None);
        assert_eq!(
            key(&with_status(
                2,
                serde_json::json!({"observedGeneration": 1})
            )),
            None
        );
        // Looked at, no key: the Authorized condition says why.
        let missing = with_status(
            1,
            serde_json::json!({"observedGeneration": 1, "conditions": [{
                "type": "Authorized", "status": "False", "reason": "SecretKeyMissing",
                "message": "Secret ns/app has no key \"oauth.api.key\"",
                "lastTransitionTime": "2026-01-01T00:00:00Z"}]}),
        );
        let err = key(&missing).expect("verdict").expect_err("no key");
        assert!(err.contains("SecretKeyMissing"), "{err}");
        assert!(err.contains("\"oauth.api.key\""), "{err}");
    }

    #[test]
    fn landing_pages_say_what_happened_and_what_to_do() {
        let page = PageContext {
            instance: "team-a/marketing".into(),
            rerun: "kubectl dropbox connect marketing -n team-a".into(),
        };
        let denied = page.failure(&ConnectError::Denied("the approval was denied <b>".into()));
        let html = landing_page(&denied, false).0;
        assert!(html.contains("data-outcome=\"denied\""), "{html}");
        assert!(html.contains("denied &lt;b&gt;"), "escaped: {html}");
        assert!(
            html.contains("kubectl dropbox connect marketing -n team-a"),
            "{html}"
        );
        assert!(!html.contains("<script>"), "a final page does not poll");
        let ok = page.outcome(&Ok(Connected {
            instance: "team-a/marketing".into(),
            account: None,
        }));
        assert_eq!(ok.class, "connected");
        assert!(ok.title.contains("marketing is Ready"));
        let pending = Landing {
            class: "pending",
            title: "t".into(),
            message: "m".into(),
            next: "n".into(),
            command: String::new(),
        };
        assert!(landing_page(&pending, true).0.contains(OUTCOME_PATH));
        for e in [
            ConnectError::Redirect(String::new()),
            ConnectError::NotReady(String::new()),
            ConnectError::ReadyTimeout(String::new()),
        ] {
            let l = page.failure(&e);
            assert_eq!(l.class, e.class());
            assert!(!l.next.is_empty() && !l.title.is_empty());
        }
    }
}
