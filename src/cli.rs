//! Command line of the `dropbox-operator` binary. Every flag has an environment
//! variable twin, so the same settings work from a shell, a Deployment or Helm.

use clap::{Parser, Subcommand, ValueEnum};

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
