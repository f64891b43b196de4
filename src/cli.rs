//! Command line of the `dropbox-operator` binary. Every flag has an environment
//! variable twin, so the same settings work from a shell, a Deployment or Helm.

use std::net::SocketAddr;
use std::time::Duration;

use clap::builder::TypedValueParser;
use clap::{Args, Parser, Subcommand, ValueEnum};
use url::Url;

use crate::api::EventFormat;

/// Kubernetes operator for Dropbox element instances.
///
/// A DropboxElementInstance connects one Dropbox account (OAuth 2 code or
/// long-lived access token, read from Secrets) and delivers standardized,
/// signed file-change events to an application's callback URL.
#[derive(Debug, Parser)]
#[command(name = "dropbox-operator", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

/// Log settings of the long-running services (`controller`, `ingress`). Only
/// they read the generic `LOG_LEVEL`/`LOG_FORMAT`: the commands a person runs
/// from a shell (`connect`, `import`, `completion`, `crd`) ignore them, so a
/// shell that exports them for other programs does not change their output.
#[derive(Debug, Clone, Args)]
pub struct ServiceLogArgs {
    /// Log output format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,

    /// Log filter in tracing's EnvFilter syntax, e.g. `info` or
    /// `dropbox_operator=debug,kube=info`.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// Output format of the logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print the DropboxElementInstance CustomResourceDefinition as YAML.
    ///
    /// The output is what crds/ and the Helm chart ship; install it with
    /// `dropbox-operator crd | kubectl apply --server-side -f -`.
    Crd,

    /// Reconcile DropboxElementInstances: read credentials from Secrets, exchange
    /// OAuth codes, keep tokens fresh, revoke them on deletion, report status.
    ///
    /// Uses the in-cluster service account, or KUBECONFIG outside a cluster. With
    /// leader election on (the default), only the replica holding the Lease
    /// reconciles; the others wait on standby.
    Controller(Box<ControllerArgs>),

    /// Run the webhook ingress: receive Dropbox webhooks, fetch the changes,
    /// deliver standardized, signed events to each instance's callback URL.
    ///
    /// The controller runs it as the `dropbox-webhook-ingress` Deployment; any
    /// number of replicas is safe (cursor commits use preconditions).
    Ingress(Box<IngressArgs>),

    /// Convert a Cloud Elements instance JSON (the body POSTed to /instances) into
    /// Secrets and a DropboxElementInstance, printed as YAML for `kubectl apply -f -`.
    ///
    /// Secret values (oauth.api.key/oauth.api.secret, providerData.code,
    /// event.notification.signature.key, the apiKey access token) go into Secrets
    /// named `<name>-app`, `<name>-code`, `<name>-events-key` and `<name>-api-key`;
    /// the DropboxElementInstance only references them. For
    /// `"authentication.type": "apiKey"` the access token is read from
    /// configuration."api.key", configuration."oauth.user.token" or
    /// providerData.apiKey. The output contains secrets: keep it out of version
    /// control. Example:
    /// `dropbox-operator import instance.json | kubectl apply -f -`
    Import(ImportArgs),

    /// Connect a Dropbox account to an oauth2 instance in one command: open the
    /// approval page, catch Dropbox's redirect, store the code, wait for Ready.
    ///
    /// Uses your kubeconfig (needs get/list/watch on the instance and
    /// create/patch on its code Secret; the app key comes from the instance's
    /// status.appKey, so the app Secret is not read). It builds the authorize
    /// link with PKCE (S256) and a random state, listens on a loopback redirect
    /// URI for Dropbox's answer, writes the code, its PKCE verifier and the
    /// redirect URI into the instance's code Secret (codeSecretRef), and follows
    /// the instance until it is Ready. Refused approvals, a wrong state and
    /// timeouts write nothing. Also a kubectl plugin: copy or symlink the binary
    /// as `kubectl-dropbox` on your PATH, then `kubectl dropbox connect NAME -n NS`.
    ///
    /// The redirect URI must be registered exactly in the Dropbox App Console:
    /// by default `http://127.0.0.1:53682/`; the instance's callbackUrl when it is
    /// a loopback URL; or --redirect-uri. Apps without one: --no-redirect.
    #[command(after_long_help = crate::connect::EXIT_CODES_HELP)]
    Connect(Box<ConnectArgs>),

    /// Release what a removed controller left behind: for every instance and
    /// token Secret being deleted (or in a namespace being deleted), revoke its
    /// tokens and remove the operator's finalizer, namespace by namespace.
    ///
    /// Instances and token Secrets carry the finalizer
    /// `elements.dropbox-operator.dev/revoke-token`; without a running
    /// controller, a deleted instance (or a namespace being deleted) waits
    /// forever. This does what the controller would, with your kubeconfig
    /// (needs list on instances and Secrets, patch on both): an expired access
    /// token is refreshed first, with the app credentials the token Secret
    /// keeps or the instance's app Secret. Objects not being deleted are left
    /// alone (reading namespaces tells which are being deleted). It prints what it released and every token it could not revoke;
    /// exit code 0: all released and revoked, 2: all released, some tokens not
    /// revoked, 1: something could not be released. Also a kubectl plugin:
    /// `kubectl dropbox release-finalizers -n NS`.
    ReleaseFinalizers(Box<ReleaseArgs>),

    /// Print a shell completion script for this command (bash, zsh or fish).
    ///
    /// bash: `source <(dropbox-operator completion bash)` (or write it to
    /// /etc/bash_completion.d/). zsh: `dropbox-operator completion zsh >
    /// "${fpath[1]}/_dropbox-operator"`. Started as the kubectl plugin, the
    /// script completes `kubectl-dropbox`.
    Completion(CompletionArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ReleaseArgs {
    /// Namespaces to release in (repeat, or comma-separate; default: every
    /// namespace where something of the operator's is being deleted).
    #[arg(short = 'n', long, env = "RELEASE_NAMESPACE", value_delimiter = ',')]
    pub namespace: Vec<String>,

    /// Path of the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config,
    /// else the in-cluster service account).
    #[arg(long, env = "RELEASE_KUBECONFIG")]
    pub kubeconfig: Option<std::path::PathBuf>,

    /// kubeconfig context to use (default: the current context).
    #[arg(long, env = "RELEASE_CONTEXT")]
    pub context: Option<String>,

    /// Only say what would be released; revoke and change nothing.
    #[arg(long, env = "RELEASE_DRY_RUN")]
    pub dry_run: bool,

    /// Bound on revoking one token family.
    #[arg(long, env = "RELEASE_REVOKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub revoke_timeout: Duration,

    #[command(flatten)]
    pub dropbox: DropboxArgs,
}

/// The subcommands a person runs; the others (`controller`, `ingress`, `crd`)
/// are the operator's own and hidden from the kubectl plugin's help.
pub const USER_SUBCOMMANDS: [&str; 4] = ["connect", "import", "release-finalizers", "completion"];

#[derive(Debug, Clone, Args)]
pub struct CompletionArgs {
    /// The shell to complete in.
    #[arg(value_enum, value_name = "SHELL")]
    pub shell: CompletionShell,
}

/// Shells `completion` writes scripts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// What `connect` prints on standard output.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ConnectOutput {
    /// Progress and the result as sentences.
    Text,
    /// One JSON object per line (`"event"`: link, stored, progress, result);
    /// the last one, `"result"`, carries `exitCode` and `class`.
    Json,
}

/// Default port of the loopback redirect URI of `connect`.
pub const CONNECT_DEFAULT_PORT: u16 = 53682;

#[derive(Debug, Clone, Args)]
pub struct ConnectArgs {
    /// Name of the DropboxElementInstance (type oauth2).
    #[arg(value_name = "INSTANCE")]
    pub instance: String,

    /// Namespace of the instance (default: the kubeconfig context's namespace).
    #[arg(short = 'n', long, env = "CONNECT_NAMESPACE")]
    pub namespace: Option<String>,

    /// Path of the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config,
    /// else the in-cluster service account).
    #[arg(long, env = "CONNECT_KUBECONFIG")]
    pub kubeconfig: Option<std::path::PathBuf>,

    /// kubeconfig context to use (default: the current context).
    #[arg(long, env = "CONNECT_CONTEXT")]
    pub context: Option<String>,

    /// Loopback redirect URI to listen on, e.g. `http://127.0.0.1:8910/dropbox`
    /// (http, host 127.0.0.1, [::1] or localhost). Default: the instance's
    /// callbackUrl when it is such a URL, else http://127.0.0.1:<--port>/.
    #[arg(long, env = "CONNECT_REDIRECT_URI", conflicts_with = "no_redirect")]
    pub redirect_uri: Option<Url>,

    /// Port of the default redirect URI http://127.0.0.1:<port>/.
    #[arg(long, env = "CONNECT_PORT", default_value_t = CONNECT_DEFAULT_PORT)]
    pub port: u16,

    /// For apps without a redirect URI: the link carries none, Dropbox shows the
    /// code after the approval, and you paste it here (read from standard input).
    #[arg(long, env = "CONNECT_NO_REDIRECT")]
    pub no_redirect: bool,

    /// Only print the link; do not try to open a browser.
    #[arg(long, env = "CONNECT_NO_BROWSER")]
    pub no_browser: bool,

    /// How long to wait for the approval (the redirect, or the pasted code).
    #[arg(long, env = "CONNECT_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub timeout: Duration,

    /// How long to wait, once the code is stored, for the instance to be Ready.
    #[arg(long, env = "CONNECT_WAIT_TIMEOUT", default_value = "2m", value_parser = parse_duration)]
    pub wait_timeout: Duration,

    /// Base URL of the Dropbox website, used to build the `/oauth2/authorize` link.
    #[arg(
        long,
        env = "DROPBOX_WWW_URL",
        default_value = "https://www.dropbox.com"
    )]
    pub dropbox_www_url: Url,

    /// Output format: `text` (sentences) or `json` (one JSON object per line
    /// on standard output, nothing else there).
    #[arg(short = 'o', long, env = "CONNECT_OUTPUT", value_enum, default_value_t = ConnectOutput::Text)]
    pub output: ConnectOutput,

    /// Log filter (tracing's EnvFilter syntax) for the libraries' diagnostics
    /// on standard error, e.g. `debug`. The generic LOG_LEVEL is not read.
    #[arg(long, env = "CONNECT_LOG_LEVEL", default_value = "warn")]
    pub log_level: String,
}

#[derive(Debug, Clone, Args)]
pub struct ImportArgs {
    /// The instance JSON file; `-` reads standard input.
    #[arg(value_name = "INSTANCE_JSON")]
    pub path: String,

    /// metadata.name of the DropboxElementInstance, and prefix of its Secrets
    /// (default: the instance's `name`, lower-cased, other characters turned into '-').
    #[arg(long, env = "IMPORT_NAME")]
    pub name: Option<String>,

    /// Namespace written into every manifest (default: none, so kubectl's current
    /// namespace).
    #[arg(long, env = "IMPORT_NAMESPACE")]
    pub namespace: Option<String>,

    /// Payload format of the delivered events: `elements` (the Cloud Elements
    /// event message) or `cloudevents` (CloudEvents 1.0).
    #[arg(
        long,
        env = "IMPORT_EVENTS_FORMAT",
        default_value = "elements",
        value_parser = clap::builder::PossibleValuesParser::new(["elements", "cloudevents"])
            .map(|s| if s == "cloudevents" { EventFormat::CloudEvents } else { EventFormat::Elements })
    )]
    pub events_format: EventFormat,
}

#[derive(Debug, Clone, Args)]
pub struct IngressArgs {
    #[command(flatten)]
    pub log: ServiceLogArgs,

    #[command(flatten)]
    pub dropbox: DropboxArgs,

    /// Address of the public webhook endpoints (`[::]` is dual-stack: IPv4 and IPv6).
    #[arg(long, env = "LISTEN_ADDR", default_value = "[::]:8080")]
    pub listen_addr: SocketAddr,

    /// Address of /metrics, /healthz and /readyz (never on the public port).
    #[arg(long, env = "METRICS_ADDR", default_value = "[::]:8081")]
    pub metrics_addr: SocketAddr,

    /// Address of the peer endpoint, where the other replicas hand over
    /// webhooks for the instances this one delivers (never public).
    #[arg(long, env = "PEER_LISTEN_ADDR", default_value = "[::]:8082")]
    pub peer_listen_addr: SocketAddr,

    /// This replica's IP address as the other replicas reach it (the pod IP);
    /// default: the peer listen address when it names one, else 127.0.0.1.
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<std::net::IpAddr>,

    /// The operator's namespace (the default data namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub operator_namespace: String,

    /// The data namespace: the only namespace the ingress reads or writes (the
    /// instances' projected Secrets, cursors, delivery states, heartbeats).
    /// Default: the operator's namespace.
    #[arg(long, env = "DATA_NAMESPACE")]
    pub data_namespace: Option<String>,

    /// Name of this replica (default: the pod name, else host name and a random suffix).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,

    /// CIDRs callbacks may point to although they are loopback, private,
    /// link-local, ... (comma-separated, e.g. `10.0.0.0/8,fd00::/8`). Default: none.
    #[arg(long, env = "ALLOWED_CALLBACK_CIDRS", default_value = "")]
    pub allowed_callback_cidrs: String,

    /// CIDRs callbacks may never point to although they are public (e.g. a
    /// cluster whose pod or service ranges are public addresses). Wins over
    /// --allowed-callback-cidrs.
    #[arg(long, env = "DENIED_CALLBACK_CIDRS", default_value = "")]
    pub denied_callback_cidrs: String,

    /// Webhook requests handled at once; more are answered 503 at once.
    #[arg(long, env = "MAX_CONCURRENT_WEBHOOKS", default_value_t = 256)]
    pub max_concurrent_webhooks: usize,

    /// Time a client has to send a webhook's whole body (slow uploads are cut off with 408).
    #[arg(long, env = "WEBHOOK_BODY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub webhook_body_timeout: Duration,

    /// Bytes of webhook bodies in flight at once across the process (e.g.
    /// `32Mi`). A body over 16 KiB is charged by its Content-Length (without
    /// one, 1 MiB) before it is read; when the budget cannot cover it, 503
    /// with Retry-After. Smaller bodies are bounded by --max-connections.
    #[arg(long, env = "WEBHOOK_BODY_BUDGET", default_value = "32Mi", value_parser = parse_bytes)]
    pub webhook_body_budget: u64,

    /// Connections open at once on the public port; more wait in the backlog.
    /// Each holds at most 16 KiB of request head and 16 KiB of uncharged body.
    #[arg(long, env = "MAX_CONNECTIONS", default_value_t = 1024)]
    pub max_connections: usize,

    /// Time a client has to send a request head, from the connection's start
    /// or from the first byte of a later request on a kept-alive connection
    /// (and to take an answer's bytes).
    #[arg(long, env = "WEBHOOK_HEADER_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub webhook_header_timeout: Duration,

    /// How long a kept-alive connection may wait for its next request (keep
    /// it above the idle timeout of a load balancer in front, often 60 s).
    #[arg(long, env = "WEBHOOK_IDLE_TIMEOUT", default_value = "75s", value_parser = parse_duration)]
    pub webhook_idle_timeout: Duration,

    /// Also accept HTTP/2 with prior knowledge (h2c) on the public port, for a
    /// proxy that speaks it to its backends. Default: HTTP/1.1 only.
    #[arg(long, env = "WEBHOOK_HTTP2", default_value_t = false, action = clap::ArgAction::Set)]
    pub webhook_http2: bool,

    /// Instance syncs (Dropbox listing and delivery) running at once in this replica.
    #[arg(long, env = "MAX_CONCURRENT_SYNCS", default_value_t = 32)]
    pub max_concurrent_syncs: usize,

    /// How often (jittered by up to a fifth) the replica syncs every
    /// events-enabled instance it is responsible for without a webhook; it also
    /// does so at start, so delivery resumes after any restart.
    #[arg(long, env = "RESYNC_INTERVAL", default_value = "3m", value_parser = parse_duration)]
    pub resync_interval: Duration,

    /// On SIGTERM, how long in-flight deliveries may take to finish and commit
    /// (keep it below the pod's terminationGracePeriodSeconds).
    #[arg(long, env = "DRAIN_TIMEOUT", default_value = "20s", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Timeout of one delivery to a callback URL.
    #[arg(long, env = "DELIVERY_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub delivery_timeout: Duration,

    /// First retry delay of a failed delivery (doubles, with jitter).
    #[arg(long, env = "DELIVERY_BASE_BACKOFF", default_value = "1s", value_parser = parse_duration)]
    pub delivery_base_backoff: Duration,

    /// Upper bound of the delay between delivery attempts.
    #[arg(long, env = "DELIVERY_MAX_BACKOFF", default_value = "5m", value_parser = parse_duration)]
    pub delivery_max_backoff: Duration,

    /// An instance whose callback keeps failing this long is parked: its cursor
    /// waits, and a change of its spec or of its resume annotation starts it
    /// again. Answers that retrying cannot fix (410, a refused address, other
    /// 4xx except 408/409/425/429) park it at once.
    #[arg(long, env = "DELIVERY_PARK_AFTER", default_value = "1h", value_parser = parse_duration)]
    pub delivery_park_after: Duration,

    /// How often the ingress renews its heartbeat (the controller's EventsReady).
    #[arg(long, env = "HEARTBEAT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,

    /// How long one `list_folder/longpoll` waits for changes (instances with
    /// `events.source: longpoll`), 30s to 8m (Dropbox's range; it adds up to 90 s
    /// of jitter). 2m: a quarter of the requests of Dropbox's default 30s, and
    /// with the jitter still below common idle-connection limits of NAT
    /// gateways and proxies (e.g. 350 s).
    #[arg(long, env = "LONGPOLL_TIMEOUT", default_value = "2m", value_parser = parse_longpoll_timeout)]
    pub longpoll_timeout: Duration,

    /// Upper bound of the delay between long-polls that fail (doubles from 1s,
    /// with jitter; a Retry-After or Dropbox's `backoff` is honoured).
    #[arg(long, env = "LONGPOLL_MAX_BACKOFF", default_value = "1m", value_parser = parse_duration)]
    pub longpoll_max_backoff: Duration,
}

/// A long-poll timeout: a duration within Dropbox's 30–480 s.
fn parse_longpoll_timeout(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    let range = crate::dropbox::LONGPOLL_TIMEOUT_RANGE;
    if d.subsec_nanos() != 0 || !range.contains(&d.as_secs()) {
        return Err(format!(
            "{s:?}: Dropbox accepts whole seconds from {}s to {}s",
            range.start(),
            range.end()
        ));
    }
    Ok(d)
}

/// Where Dropbox is: base URLs, so tests, proxies and regional endpoints work.
#[derive(Debug, Clone, Args)]
pub struct DropboxArgs {
    /// Base URL of the Dropbox API (`/oauth2/token`, `/2/...`).
    #[arg(
        long,
        env = "DROPBOX_API_URL",
        default_value = "https://api.dropboxapi.com"
    )]
    pub dropbox_api_url: Url,

    /// Base URL of Dropbox's notify host, which serves
    /// `/2/files/list_folder/longpoll` (instances with `events.source: longpoll`).
    #[arg(
        long,
        env = "DROPBOX_NOTIFY_URL",
        default_value = "https://notify.dropboxapi.com"
    )]
    pub dropbox_notify_url: Url,

    /// Base URL of the Dropbox website, used to build `/oauth2/authorize` links.
    #[arg(
        long,
        env = "DROPBOX_WWW_URL",
        default_value = "https://www.dropbox.com"
    )]
    pub dropbox_www_url: Url,

    /// Timeout of one Dropbox request, connection included (e.g. `10s`).
    #[arg(long, env = "DROPBOX_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub dropbox_timeout: Duration,
}

#[derive(Debug, Clone, Args)]
pub struct ControllerArgs {
    #[command(flatten)]
    pub log: ServiceLogArgs,

    #[command(flatten)]
    pub dropbox: DropboxArgs,

    /// Watch only these namespaces, comma-separated (default: all namespaces).
    /// Several namespaces are watched one by one, so the controller needs rights
    /// in those namespaces only.
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,

    /// Address of the /metrics, /healthz and /readyz endpoints.
    #[arg(long, env = "METRICS_ADDR", default_value = "0.0.0.0:8080")]
    pub metrics_addr: SocketAddr,

    /// Refresh access tokens at the latest this long before they expire (at most
    /// half a token's lifetime).
    #[arg(long, env = "TOKEN_REFRESH_MARGIN", default_value = "5m", value_parser = parse_duration)]
    pub token_refresh_margin: Duration,

    /// Upper bound on revoking the token when an instance is deleted; deletion goes
    /// on after it whatever Dropbox answered.
    #[arg(long, env = "REVOKE_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub revoke_timeout: Duration,

    /// A healthy instance is checked again at least this often.
    #[arg(long, env = "RESYNC_INTERVAL", default_value = "1h", value_parser = parse_duration)]
    pub resync_interval: Duration,

    /// Upper bound of the retry backoff for transient errors.
    #[arg(long, env = "MAX_BACKOFF", default_value = "5m", value_parser = parse_duration)]
    pub max_backoff: Duration,

    /// Bound of every Kubernetes API request (for a watch, of the start of its
    /// answer). Without one, a request on a connection that stopped answering
    /// would wait forever.
    #[arg(long, env = "API_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub api_timeout: Duration,

    /// How many instances are reconciled at the same time.
    #[arg(long, env = "CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,

    /// Elect a leader with a Lease, so several replicas are safe.
    #[arg(long, env = "LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,

    /// The operator's own namespace: the leader Lease and the webhook ingress live there.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub operator_namespace: String,

    /// The ingress's data namespace: the controller projects what the ingress
    /// needs of each instance there and keeps the cursors and heartbeats there
    /// (the Helm chart creates it). Default: the operator's namespace.
    #[arg(long, env = "DATA_NAMESPACE")]
    pub data_namespace: Option<String>,

    /// Name of the leader Lease.
    #[arg(
        long,
        env = "LEADER_ELECTION_LEASE",
        default_value = "dropbox-operator-controller"
    )]
    pub leader_election_lease: String,

    /// Identity of this replica in the Lease (default: the pod name, else host name and a random suffix).
    #[arg(long, env = "POD_NAME")]
    pub leader_election_identity: Option<String>,

    /// How long a lease is valid without renewal; a standby takes over after it.
    #[arg(long, env = "LEASE_DURATION", default_value = "15s", value_parser = parse_duration)]
    pub lease_duration: Duration,

    /// Renew the lease at least this long before it expires (the leader renews
    /// every ~2 s in any case, as client-go does).
    #[arg(long, env = "LEASE_RENEW_GRACE", default_value = "5s", value_parser = parse_duration)]
    pub lease_renew_grace: Duration,

    /// A leader that could not renew its lease for this long stops reconciling
    /// and exits, before a standby can take the lease over (capped at two thirds
    /// of --lease-duration).
    #[arg(long, env = "LEASE_RENEW_DEADLINE", default_value = "10s", value_parser = parse_duration)]
    pub lease_renew_deadline: Duration,

    #[command(flatten)]
    pub ingress: IngressDeploymentArgs,
}

/// How the controller runs the webhook ingress Deployment.
#[derive(Debug, Clone, Args)]
pub struct IngressDeploymentArgs {
    /// Container image of the webhook ingress (the operator's own image; the
    /// default is where releases are published, as the chart's).
    #[arg(long, env = "INGRESS_IMAGE", default_value = concat!("ghcr.io/dropbox-operator/dropbox-operator:", env!("CARGO_PKG_VERSION")))]
    pub ingress_image: String,

    /// Image pull policy of the webhook ingress.
    #[arg(
        long,
        env = "INGRESS_IMAGE_PULL_POLICY",
        default_value = "IfNotPresent"
    )]
    pub ingress_image_pull_policy: String,

    /// Replicas of the webhook ingress Deployment.
    #[arg(long, env = "INGRESS_REPLICAS", default_value_t = 2)]
    pub ingress_replicas: i32,

    /// ServiceAccount of the webhook ingress pods (created by the Helm chart).
    #[arg(
        long,
        env = "INGRESS_SERVICE_ACCOUNT",
        default_value = "dropbox-webhook-ingress"
    )]
    pub ingress_service_account: String,

    /// Resource requests and limits of the ingress container, as JSON
    /// (`{"requests":{"cpu":"50m","memory":"64Mi"},"limits":{"memory":"128Mi"}}`).
    #[arg(long, env = "INGRESS_RESOURCES", value_parser = parse_resources)]
    pub ingress_resources: Option<k8s_openapi::api::core::v1::ResourceRequirements>,

    /// CIDRs the ingress may deliver events to although they are loopback, private
    /// or link-local (comma-separated, e.g. `10.0.0.0/8,fd00::/8`).
    #[arg(long, env = "ALLOWED_CALLBACK_CIDRS", default_value = "")]
    pub allowed_callback_cidrs: String,

    /// CIDRs the ingress never delivers events to although they are public.
    #[arg(long, env = "DENIED_CALLBACK_CIDRS", default_value = "")]
    pub denied_callback_cidrs: String,

    /// The ingress's long-poll timeout (`--longpoll-timeout` of `ingress`).
    #[arg(long, env = "INGRESS_LONGPOLL_TIMEOUT", default_value = "2m", value_parser = parse_longpoll_timeout)]
    pub ingress_longpoll_timeout: Duration,

    /// A pod template (a PodTemplateSpec, as JSON) merged into the ingress pods:
    /// scheduling, labels, annotations, extra env and volumes, security context,
    /// the ingress's own settings as env (docs/architecture.md, "The ingress pod
    /// template"). The controller's essentials win.
    #[arg(long, env = "INGRESS_POD_TEMPLATE", value_parser = parse_pod_template)]
    pub ingress_pod_template: Option<serde_json::Value>,

    /// The ingress replicas are managed elsewhere (an HorizontalPodAutoscaler,
    /// `kubectl scale`): leave `spec.replicas` alone instead of applying
    /// --ingress-replicas.
    #[arg(long, env = "INGRESS_AUTOSCALING", default_value_t = false, action = clap::ArgAction::Set)]
    pub ingress_autoscaling: bool,

    /// An HorizontalPodAutoscaler for the ingress, as the JSON of its spec
    /// without `scaleTargetRef` (`{"minReplicas":2,"maxReplicas":10,"metrics":[...]}`):
    /// created and removed with the ingress Deployment, pointed at it. Implies
    /// --ingress-autoscaling.
    #[arg(long, env = "INGRESS_AUTOSCALER", value_parser = parse_autoscaler)]
    pub ingress_autoscaler: Option<serde_json::Value>,

    /// Create and remove the ingress Service with the Deployment. false: the
    /// Service is someone else's (the Helm chart renders it, so that an Ingress
    /// or HTTPRoute pointing at it resolves before any instance has events).
    #[arg(long, env = "INGRESS_MANAGE_SERVICE", default_value_t = true, action = clap::ArgAction::Set)]
    pub ingress_manage_service: bool,

    /// A Deployment in the operator namespace (the Helm chart passes the
    /// controller's own) that owns the ingress Deployment, Service and
    /// heartbeats ConfigMap, so the garbage collector removes them with it.
    #[arg(long, env = "INGRESS_OWNER_DEPLOYMENT")]
    pub ingress_owner_deployment: Option<String>,
}

fn parse_pod_template(s: &str) -> Result<serde_json::Value, String> {
    let value: serde_json::Value =
        serde_json::from_str(s).map_err(|e| format!("invalid pod template JSON: {e}"))?;
    serde_json::from_value::<k8s_openapi::api::core::v1::PodTemplateSpec>(value.clone())
        .map_err(|e| format!("not a PodTemplateSpec: {e}"))?;
    Ok(value)
}

fn parse_autoscaler(s: &str) -> Result<serde_json::Value, String> {
    let spec: serde_json::Value =
        serde_json::from_str(s).map_err(|e| format!("invalid autoscaler JSON: {e}"))?;
    crate::controller::autoscaler::autoscaler(&spec, "check", None)
        .map_err(|e| format!("not a HorizontalPodAutoscaler spec: {e}"))?;
    Ok(spec)
}

fn parse_resources(s: &str) -> Result<k8s_openapi::api::core::v1::ResourceRequirements, String> {
    serde_json::from_str(s).map_err(|e| format!("invalid resources JSON: {e}"))
}

/// Whether the program was started as the kubectl plugin: its file name (argv[0]) is
/// `kubectl-dropbox` (kubectl runs `kubectl-dropbox` from PATH for `kubectl dropbox ...`).
pub fn invoked_as_kubectl_plugin(argv0: Option<&std::ffi::OsStr>) -> bool {
    argv0
        .and_then(|a| std::path::Path::new(a).file_name())
        .is_some_and(|n| {
            let n = n.to_string_lossy();
            n == "kubectl-dropbox" || n == "kubectl-dropbox.exe"
        })
}

/// The command line as the kubectl plugin shows it (`Usage: kubectl dropbox connect ...`):
/// only the subcommands a person runs are listed (the operator's own still parse,
/// so the arguments are the same either way).
pub fn plugin_command() -> clap::Command {
    use clap::CommandFactory;
    let mut cmd = Cli::command()
        .name("kubectl-dropbox")
        .bin_name("kubectl dropbox")
        .about("Connect Dropbox accounts to DropboxElementInstances (kubectl plugin of dropbox-operator).")
        .long_about(None);
    let internal: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_owned())
        .filter(|n| !USER_SUBCOMMANDS.contains(&n.as_str()))
        .collect();
    for name in internal {
        cmd = cmd.mut_subcommand(name, |s| s.hide(true));
    }
    cmd
}

/// Parses the process's arguments, under the plugin's name when started as
/// `kubectl-dropbox` (the arguments are the same either way).
pub fn parse_args() -> Cli {
    use clap::FromArgMatches;
    let argv0 = std::env::args_os().next();
    if invoked_as_kubectl_plugin(argv0.as_deref()) {
        let matches = plugin_command().get_matches();
        Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    } else {
        Cli::parse()
    }
}

/// The completion script of `shell` for `dropbox-operator`, or for
/// `kubectl-dropbox` (the plugin's subcommands only) when `plugin`.
pub fn completion_script(shell: CompletionShell, plugin: bool) -> Vec<u8> {
    use clap::CommandFactory;
    let (mut cmd, name) = if plugin {
        // Only the subcommands the plugin shows (bash's generator would offer
        // hidden ones too).
        let full = Cli::command();
        let user = clap::Command::new("kubectl-dropbox")
            .version(env!("CARGO_PKG_VERSION"))
            .subcommands(
                full.get_subcommands()
                    .filter(|s| USER_SUBCOMMANDS.contains(&s.get_name()))
                    .cloned(),
            );
        (user, "kubectl-dropbox")
    } else {
        (Cli::command(), "dropbox-operator")
    };
    let shell = match shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, name, &mut out);
    if shell == clap_complete::Shell::Bash {
        // clap_complete 4.6's bash script spells the state of a subcommand of a
        // hyphenated binary two ways (clap-rs/clap#6421): the loop reaches
        // `dropbox__operator__subcmd__connect`, the case arm says
        // `dropbox__subcmd__operator__subcmd__connect`, so no subcommand's
        // options complete. The arms are respelled the loop's way
        // (tests/connect.rs completes `connect --no-` in a real bash).
        let (first, rest) = name.split_once('-').unwrap_or((name, ""));
        let wrong = format!("{first}__subcmd__{rest}__subcmd__");
        let right = format!("{first}__{rest}__subcmd__");
        out = String::from_utf8_lossy(&out)
            .replace(&wrong, &right)
            .into_bytes();
    }
    out
}

/// Parses `10s`, `5m`, `1h30m`, `250ms` (and ISO 8601 `PT10S`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d: jiff::SignedDuration = s
        .parse()
        .map_err(|e| format!("invalid duration {s:?}: {e}"))?;
    Duration::try_from(d).map_err(|_| format!("duration {s:?} must not be negative"))
}

/// A size in bytes: a whole number, optionally with a binary suffix as in
/// Kubernetes quantities (`Ki`, `Mi`, `Gi`), e.g. `32Mi`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let (digits, unit) = match s.trim() {
        t if t.ends_with("Ki") => (&t[..t.len() - 2], 1u64 << 10),
        t if t.ends_with("Mi") => (&t[..t.len() - 2], 1 << 20),
        t if t.ends_with("Gi") => (&t[..t.len() - 2], 1 << 30),
        t => (t, 1),
    };
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(unit))
        .ok_or_else(|| format!("invalid size {s:?}: a whole number of bytes, or with Ki, Mi or Gi"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn sizes_are_bytes_or_binary_quantities() {
        assert_eq!(parse_bytes("1024"), Ok(1024));
        assert_eq!(parse_bytes("32Mi"), Ok(32 << 20));
        assert_eq!(parse_bytes("512Ki"), Ok(512 << 10));
        assert_eq!(parse_bytes("1Gi"), Ok(1 << 30));
        for bad in ["", "Mi", "32MB", "-1", "1.5Mi", "99999999999999Gi"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_kubectl_plugin_parses_like_the_binary() {
        let parse = |args: &[&str]| match Cli::try_parse_from(args).expect("parses").command {
            Command::Connect(c) => (c.instance, c.namespace),
            other => panic!("not connect: {other:?}"),
        };
        let direct = parse(&["dropbox-operator", "connect", "foo", "-n", "bar"]);
        let plugin = parse(&["kubectl-dropbox", "connect", "foo", "-n", "bar"]);
        assert_eq!(direct, plugin);
        assert_eq!(plugin, ("foo".into(), Some("bar".into())));
        let help = plugin_command().render_long_help().to_string();
        assert!(help.contains("Usage: kubectl dropbox"), "{help}");
        assert!(
            Cli::try_parse_from([
                "kubectl-dropbox",
                "connect",
                "x",
                "--no-redirect",
                "--redirect-uri",
                "http://127.0.0.1:1/"
            ])
            .is_err(),
            "--no-redirect and --redirect-uri exclude each other"
        );
    }

    #[test]
    fn durations_parse_in_friendly_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("soon").is_err());
        assert_eq!(parse_longpoll_timeout("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_longpoll_timeout("8m"), Ok(Duration::from_secs(480)));
        assert!(parse_longpoll_timeout("29s").is_err());
        assert!(parse_longpoll_timeout("481s").is_err());
        assert!(parse_longpoll_timeout("30500ms").is_err());
    }

    #[test]
    fn every_flag_has_an_env_twin() {
        fn check(cmd: &clap::Command) {
            for arg in cmd.get_arguments() {
                let builtin = matches!(arg.get_id().as_str(), "help" | "version");
                if !builtin && !arg.is_positional() {
                    assert!(
                        arg.get_env().is_some(),
                        "--{} of `{}` has no environment variable",
                        arg.get_id(),
                        cmd.get_name()
                    );
                }
            }
            cmd.get_subcommands().for_each(check);
        }
        check(&Cli::command());
    }
}
