//! Helpers of the Helm chart tests (`charts/dropbox-operator` with the real helm
//! and kubectl): where the chart is, helm without a cluster, running a command,
//! kubeconfigs with a ServiceAccount's token, and the instance they create.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, ensure};
use dropbox_operator::api::DropboxElementInstance;
use serde_json::json;

use super::controlplane;

/// The redirect URI of the chart tests' Dropbox app (the instances' callbackUrl).
pub const REDIRECT: &str = "https://www.mycoolapp.com/auth";

/// The chart's directory in the repository.
pub fn chart_dir() -> PathBuf {
    controlplane::repo_root().join("charts/dropbox-operator")
}

/// The chart's directory as a helm argument.
pub fn chart_arg() -> String {
    chart_dir().display().to_string()
}

/// helm without a cluster (lint, template): the tests that need no control plane
/// do not start one.
pub fn helm_offline() -> Command {
    let bin = controlplane::ensure_binaries().expect("control-plane binaries (helm)");
    let home = controlplane::repo_root().join("target/chart-tests-helm");
    let mut cmd = Command::new(bin.join("helm"));
    cmd.env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_DATA_HOME", home.join("data"))
        .env("KUBECONFIG", home.join("no-kubeconfig"));
    cmd
}

/// An oauth2 instance `name` whose code is in Secret `<name>-code` and whose app
/// is Secret `dropbox-app`; with `events`, events to a public callback.
pub fn instance_manifest(name: &str, events: bool) -> Result<DropboxElementInstance> {
    let mut spec = json!({
        "element": {"key": "dropbox"},
        "authentication": {
            "type": "oauth2",
            "appSecretRef": {"name": "dropbox-app"},
            "codeSecretRef": {"name": format!("{name}-code")},
            "callbackUrl": REDIRECT
        }
    });
    if events {
        spec["events"] =
            json!({"enabled": true, "callbackUrl": "https://app.example.com/dropbox-events"});
    }
    Ok(serde_json::from_value(json!({
        "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
        "kind": "DropboxElementInstance",
        "metadata": {"name": name},
        "spec": spec
    }))?)
}

/// Runs `cmd`; (success, stdout, stderr).
pub fn run(mut cmd: Command) -> (bool, String, String) {
    let out = cmd.output().expect("run command");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A kubeconfig for the test control plane with a fresh TokenRequest token of
/// ServiceAccount `ns/sa`.
pub fn kubeconfig_for(ns: &str, sa: &str) -> Result<PathBuf> {
    let (ok, token, err) = super::kubectl(&["create", "token", sa, "-n", ns, "--duration=1h"]);
    ensure!(ok, "kubectl create token {sa} failed: {err}");
    let cluster = super::cluster();
    let path = cluster.dir.join(format!("{ns}-{sa}.kubeconfig"));
    std::fs::write(
        &path,
        controlplane::kubeconfig_yaml(
            &cluster.server,
            &cluster.ca_pem,
            &format!("system:serviceaccount:{ns}:{sa}"),
            token.trim(),
        ),
    )?;
    Ok(path)
}
