use std::io::Write;
use std::process::ExitCode;

use dropbox_operator::cli::{Command, ControllerArgs, DropboxArgs, IngressArgs, LogFormat};
use dropbox_operator::dropbox::DropboxClient;
use dropbox_operator::{api, controller, ingress};
use tracing_subscriber::EnvFilter;

/// The services log as their flags (or LOG_LEVEL/LOG_FORMAT) say; the commands
/// a person runs only let warnings through, as text, unless `connect
/// --log-level` asks for more (cli::ServiceLogArgs says why).
fn init_logging(command: &Command) {
    let (level, format) = match command {
        Command::Controller(args) => (args.log.log_level.as_str(), args.log.log_format),
        Command::Ingress(args) => (args.log.log_level.as_str(), args.log.log_format),
        Command::Connect(args) => (args.log_level.as_str(), LogFormat::Text),
        Command::Crd
        | Command::Import(_)
        | Command::Completion(_)
        | Command::ReleaseFinalizers(_) => ("warn", LogFormat::Text),
    };
    let filter = EnvFilter::try_new(level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

fn dropbox_client(args: &DropboxArgs) -> Result<DropboxClient, BoxError> {
    Ok(DropboxClient::new(
        args.dropbox_api_url.clone(),
        args.dropbox_www_url.clone(),
        args.dropbox_timeout,
    )?
    .with_notify(args.dropbox_notify_url.clone()))
}

fn identity(explicit: Option<&str>) -> String {
    explicit.map(str::to_owned).unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .unwrap_or_else(|_| "dropbox-operator".into());
        format!("{host}-{:08x}", rand::random::<u32>())
    })
}

fn controller_options(args: &ControllerArgs) -> Result<controller::RunOptions, BoxError> {
    let log_format = log_format_name(args.log.log_format);
    let options = controller::RunOptions {
        config: controller::Config {
            refresh_margin: args.token_refresh_margin,
            revoke_timeout: args.revoke_timeout,
            resync_interval: args.resync_interval,
            max_backoff: args.max_backoff,
            api_timeout: args.api_timeout,
        },
        dropbox: dropbox_client(&args.dropbox)?,
        namespace: args.namespace.clone(),
        metrics_addr: args.metrics_addr,
        concurrency: args.concurrency,
        ingress: controller::ingress::IngressSettings::from_args(
            args,
            args.operator_namespace.clone(),
            log_format,
        ),
        leader_election: args.leader_elect.then(|| controller::LeaderElection {
            namespace: args.operator_namespace.clone(),
            lease_name: args.leader_election_lease.clone(),
            identity: identity(args.leader_election_identity.as_deref()),
            lease_duration: args.lease_duration,
            renew_grace: args.lease_renew_grace,
            renew_deadline: args.lease_renew_deadline,
        }),
    };
    options.ingress.validate()?;
    Ok(options)
}

fn ingress_options(args: &IngressArgs) -> Result<ingress::RunOptions, BoxError> {
    Ok(ingress::RunOptions {
        listen_addr: args.listen_addr,
        metrics_addr: args.metrics_addr,
        dropbox: dropbox_client(&args.dropbox)?,
        peer_listen_addr: args.peer_listen_addr,
        peer_advertise_addr: Some(peer_advertise_addr(args)),
        data_namespace: args
            .data_namespace
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| args.operator_namespace.clone()),
        identity: identity(args.identity.as_deref()),
        policy: ingress::ssrf::AddressPolicy::parse(
            &args.allowed_callback_cidrs,
            &args.denied_callback_cidrs,
        )?,
        limits: ingress::Limits {
            concurrent_webhooks: args.max_concurrent_webhooks.max(1),
            body_timeout: args.webhook_body_timeout,
            concurrent_syncs: args.max_concurrent_syncs.max(1),
            body_budget: args.webhook_body_budget,
            max_connections: args.max_connections.max(1),
            header_timeout: args.webhook_header_timeout,
            idle_timeout: args.webhook_idle_timeout,
            http2: args.webhook_http2,
        },
        resync_interval: args.resync_interval.max(std::time::Duration::from_secs(1)),
        drain_timeout: args.drain_timeout,
        delivery: ingress::sync::DeliveryConfig {
            timeout: args.delivery_timeout,
            base_backoff: args.delivery_base_backoff,
            max_backoff: args.delivery_max_backoff,
            park_after: args.delivery_park_after,
        },
        heartbeat_interval: args.heartbeat_interval,
        longpoll: ingress::longpoll::LongPollConfig {
            timeout: args.longpoll_timeout,
            base_backoff: std::time::Duration::from_secs(1),
            max_backoff: args
                .longpoll_max_backoff
                .max(std::time::Duration::from_secs(1)),
        },
    })
}

/// Where the other replicas reach this one's peer endpoint.
fn peer_advertise_addr(args: &IngressArgs) -> String {
    let ip = args.pod_ip.unwrap_or_else(|| {
        let listen = args.peer_listen_addr.ip();
        if listen.is_unspecified() {
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        } else {
            listen
        }
    });
    std::net::SocketAddr::new(ip, args.peer_listen_addr.port()).to_string()
}

fn log_format_name(f: LogFormat) -> &'static str {
    match f {
        LogFormat::Json => "json",
        LogFormat::Text => "text",
    }
}

/// jemalloc rather than the system allocator: the controller holds small
/// objects for every instance, and with jemalloc it keeps less memory resident
/// per instance (docs/performance.md gives the measured difference).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn runtime() -> Result<tokio::runtime::Runtime, BoxError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> ExitCode {
    // Also started as `kubectl-dropbox` (the kubectl plugin): same arguments.
    let cli = dropbox_operator::cli::parse_args();
    init_logging(&cli.command);
    dropbox_operator::tls::install_crypto_provider();
    let result: Result<(), BoxError> = match &cli.command {
        Command::Crd => api::crd_yaml().map_err(Into::into).and_then(|yaml| {
            std::io::stdout()
                .write_all(yaml.as_bytes())
                .map_err(Into::into)
        }),
        Command::Controller(args) => controller_options(args).and_then(|options| {
            runtime()?
                .block_on(controller::run(options))
                .map_err(Into::into)
        }),
        Command::Ingress(args) => ingress_options(args).and_then(|options| {
            runtime()?
                .block_on(ingress::run(options))
                .map_err(Into::into)
        }),
        // Prints its own errors: a CLI user wants `error: <field> ...`, not a log line.
        Command::Import(args) => return dropbox_operator::import::run(args),
        Command::Connect(args) => return dropbox_operator::connect::run(args),
        Command::ReleaseFinalizers(args) => return dropbox_operator::release::run(args),
        Command::Completion(args) => {
            let plugin = dropbox_operator::cli::invoked_as_kubectl_plugin(
                std::env::args_os().next().as_deref(),
            );
            let script = dropbox_operator::cli::completion_script(args.shell, plugin);
            std::io::stdout().write_all(&script).map_err(Into::into)
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "dropbox-operator failed");
            ExitCode::FAILURE
        }
    }
}
