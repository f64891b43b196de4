use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use dropbox_operator::cli::{Cli, Command, ControllerArgs, DropboxArgs, LogFormat};
use dropbox_operator::dropbox::DropboxClient;
use dropbox_operator::{api, controller};
use tracing_subscriber::EnvFilter;

fn init_logging(cli: &Cli) {
    let filter = EnvFilter::try_new(&cli.log_level).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
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
    )?)
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
    Ok(controller::RunOptions {
        config: controller::Config {
            refresh_margin: args.token_refresh_margin,
            revoke_timeout: args.revoke_timeout,
            resync_interval: args.resync_interval,
            max_backoff: args.max_backoff,
        },
        dropbox: dropbox_client(&args.dropbox)?,
        namespace: args.namespace.clone(),
        metrics_addr: args.metrics_addr,
        concurrency: args.concurrency,
        leader_election: args.leader_elect.then(|| controller::LeaderElection {
            namespace: args.leader_election_namespace.clone(),
            lease_name: args.leader_election_lease.clone(),
            identity: identity(args.leader_election_identity.as_deref()),
            lease_duration: args.lease_duration,
            renew_grace: args.lease_renew_grace,
        }),
    })
}

fn runtime() -> Result<tokio::runtime::Runtime, BoxError> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
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
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "dropbox-operator failed");
            ExitCode::FAILURE
        }
    }
}
