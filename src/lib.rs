//! dropbox-operator: Dropbox element instances for Kubernetes.
//!
//! - [`api`]: the `DropboxElementInstance` custom resource.
//! - [`cli`]: the command line of the `dropbox-operator` binary.
//! - [`connect`]: the `connect` subcommand (and `kubectl dropbox connect`).
//! - [`conditions`]: condition types, reasons and status helpers.
//! - [`contract`]: names, labels and keys shared by the controller and the ingress.
//! - [`controller`]: the reconciler (OAuth lifecycle, status, finalizer).
//! - [`dropbox`]: the Dropbox API client.
//! - [`import`]: converts a Cloud Elements instance JSON into Secrets and a CR.
//! - [`ingress`]: the webhook ingress (verification, syncs, delivery).
//! - [`metrics`], [`server`]: Prometheus metrics and the probe/metrics HTTP server.
//! - [`release`]: the `release-finalizers` subcommand, for a removed controller.
//! - [`yaml`]: the YAML the `crd` and `import` subcommands write.

pub mod api;
pub mod cli;
pub mod conditions;
pub mod connect;
pub mod contract;
pub mod controller;
pub mod dropbox;
pub mod import;
pub mod ingress;
pub mod metrics;
pub mod release;
pub mod retry;
pub mod server;
pub mod store;
pub mod tls;
pub mod yaml;
