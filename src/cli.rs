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
    /// Log output format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,

    /// Log filter in tracing's EnvFilter syntax, e.g. `info` or
    /// `dropbox_operator=debug,kube=info`.
    #[arg(long, env = "LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,

    #[command(subcommand)]
    pub command: Command,
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
    pub dropbox: DropboxArgs,

    /// Address of the public webhook endpoints (`[::]` is dual-stack: IPv4 and IPv6).
    #[arg(long, env = "LISTEN_ADDR", default_value = "[::]:8080")]
    pub listen_addr: SocketAddr,

    /// Address of /metrics, /healthz and /readyz (never on the public port).
    #[arg(long, env = "METRICS_ADDR", default_value = "[::]:8081")]
    pub metrics_addr: SocketAddr,

    /// Watch only instances in these namespaces, comma-separated (default: all
    /// namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    pub namespace: Option<String>,

    /// The operator's namespace: the projected Secrets, cursors and heartbeats
    /// the ingress reads and writes live there.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub operator_namespace: String,

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

    /// How often the ingress renews its heartbeat (the controller's EventsReady).
    #[arg(long, env = "HEARTBEAT_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub heartbeat_interval: Duration,
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

    /// How many instances are reconciled at the same time.
    #[arg(long, env = "CONCURRENCY", default_value_t = 16)]
    pub concurrency: u16,

    /// Elect a leader with a Lease, so several replicas are safe.
    #[arg(long, env = "LEADER_ELECT", default_value_t = true, action = clap::ArgAction::Set)]
    pub leader_elect: bool,

    /// The operator's own namespace: the leader Lease and the webhook ingress live there.
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    pub operator_namespace: String,

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
    /// Container image of the webhook ingress (the operator's own image).
    #[arg(long, env = "INGRESS_IMAGE", default_value = concat!("dropbox-operator:", env!("CARGO_PKG_VERSION")))]
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

fn parse_resources(s: &str) -> Result<k8s_openapi::api::core::v1::ResourceRequirements, String> {
    serde_json::from_str(s).map_err(|e| format!("invalid resources JSON: {e}"))
}

/// Parses `10s`, `5m`, `1h30m`, `250ms` (and ISO 8601 `PT10S`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let d: jiff::SignedDuration = s
        .parse()
        .map_err(|e| format!("invalid duration {s:?}: {e}"))?;
    Duration::try_from(d).map_err(|_| format!("duration {s:?} must not be negative"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn durations_parse_in_friendly_units() {
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse_duration("-5s").is_err());
        assert!(parse_duration("soon").is_err());
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
