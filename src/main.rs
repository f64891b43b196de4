use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use dropbox_operator::api;
use dropbox_operator::cli::{Cli, Command, LogFormat};
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(&cli);
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Crd => api::crd_yaml().map_err(Into::into).and_then(|yaml| {
            std::io::stdout()
                .write_all(yaml.as_bytes())
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
