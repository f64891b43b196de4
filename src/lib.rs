//! dropbox-operator: Dropbox element instances for Kubernetes.
//!
//! - [`api`]: the `DropboxElementInstance` custom resource.
//! - [`cli`]: the command line of the `dropbox-operator` binary.

pub mod api;
pub mod cli;
