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

/// Writes `values` as a values file for helm (under target/, one per process).
pub fn values_file(name: &str, values: &serde_json::Value) -> Result<PathBuf> {
    let dir = controlplane::repo_root().join("target/chart-tests-helm/values");
    std::fs::create_dir_all(&dir)?;
    // Tests of one binary run at once: one file per call.
    static COUNT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = dir.join(format!("{name}-{}-{n}.json", std::process::id()));
    std::fs::write(&path, serde_json::to_vec_pretty(values)?)?;
    Ok(path)
}

/// `helm template` (release `release`, namespace `ns`) with a values file and
/// extra arguments: (success, stdout, stderr).
pub fn try_render(
    release: &str,
    ns: &str,
    values: &serde_json::Value,
    extra: &[&str],
) -> Result<(bool, String, String)> {
    let file = values_file(&format!("{release}-{ns}"), values)?;
    let mut cmd = helm_offline();
    cmd.args(["template", release, &chart_arg(), "--namespace", ns])
        .arg("-f")
        .arg(&file)
        .args(extra);
    Ok(run(cmd))
}

/// The objects `helm template` renders (a failed render is an error).
pub fn render(
    ns: &str,
    values: &serde_json::Value,
    extra: &[&str],
) -> Result<Vec<serde_json::Value>> {
    let (ok, out, err) = try_render(ns, ns, values, extra)?;
    ensure!(ok, "helm template failed: {err}");
    Ok(serde_saphyr::from_multiple::<serde_json::Value>(&out)?
        .into_iter()
        .filter(|v| !v.is_null())
        .collect())
}

/// `helm install <release>` into `ns` on the test control plane with a values
/// file: (success, stdout, stderr).
pub fn try_install(
    release: &str,
    ns: &str,
    values: &serde_json::Value,
) -> Result<(bool, String, String)> {
    let file = values_file(&format!("{release}-{ns}"), values)?;
    let mut cmd = super::cluster().helm();
    cmd.args(["install", release, &chart_arg(), "--namespace", ns])
        .arg("-f")
        .arg(&file);
    Ok(run(cmd))
}

/// The literal env (`value`, not `valueFrom`) of a Deployment's first container.
pub fn literal_env(deployment: &k8s_openapi::api::apps::v1::Deployment) -> Vec<(String, String)> {
    deployment
        .spec
        .template
        .spec
        .as_ref()
        .map(|p| p.containers[0].env.clone().unwrap_or_default())
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| Some((e.name, e.value?)))
        .collect()
}

/// The real controller run the way the installed chart's Deployment runs it
/// (release = namespace): the Deployment's env and the token of the chart's
/// controller ServiceAccount. Only the metrics address and Dropbox's URLs are
/// the test's; `env` adds or replaces variables (the test's stand-ins for
/// what a kubelet would provide, e.g. a mounted volume's path).
pub async fn controller_process(
    admin: &kube::Client,
    ns: &str,
    dropbox_url: &str,
    name: &str,
    env: &[(&str, &str)],
) -> Result<super::operator::OperatorProcess> {
    let fullname = format!("{ns}-dropbox-operator");
    let deployment =
        kube::Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(admin.clone(), ns)
            .get(&fullname)
            .await?;
    let kubeconfig = kubeconfig_for(ns, &fullname)?;
    let mut process = super::operator::OperatorProcess::new(ns, dropbox_url)
        .env("KUBECONFIG", &kubeconfig.display().to_string())
        .name(name);
    for (key, value) in literal_env(&deployment) {
        let own = matches!(
            key.as_str(),
            "METRICS_ADDR" | "DROPBOX_API_URL" | "DROPBOX_NOTIFY_URL" | "DROPBOX_WWW_URL"
        );
        if !own && !env.iter().any(|(k, _)| *k == key) {
            process = process.env(&key, &value);
        }
    }
    for (key, value) in env {
        process = process.env(key, value);
    }
    Ok(process)
}

/// Stand-ins for the CRDs of the kinds the chart can render besides its own:
/// the Prometheus Operator's ServiceMonitor and PodMonitor and Gateway API's
/// HTTPRoute, each accepting any spec, so that a render with them enabled can
/// be applied. Idempotent.
pub async fn stand_in_crds(client: &kube::Client) -> Result<()> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{Api, Patch, PatchParams};
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    for (group, kind, plural) in [
        ("monitoring.coreos.com", "ServiceMonitor", "servicemonitors"),
        ("monitoring.coreos.com", "PodMonitor", "podmonitors"),
        ("gateway.networking.k8s.io", "HTTPRoute", "httproutes"),
    ] {
        let name = format!("{plural}.{group}");
        let crd: CustomResourceDefinition = serde_json::from_value(json!({
            "apiVersion": "apiextensions.k8s.io/v1",
            "kind": "CustomResourceDefinition",
            "metadata": {"name": name, "annotations": if group.ends_with(".k8s.io") {
                // *.k8s.io groups are protected: the API server wants this.
                json!({"api-approved.kubernetes.io": "https://github.com/kubernetes-sigs/gateway-api/pull/2466"})
            } else {
                json!({})
            }},
            "spec": {
                "group": group,
                "scope": "Namespaced",
                "names": {"kind": kind, "plural": plural, "singular": kind.to_lowercase(), "listKind": format!("{kind}List")},
                "versions": [{
                    "name": "v1", "served": true, "storage": true,
                    "subresources": {"status": {}},
                    "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                        "spec": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
                        "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true}
                    }}}
                }]
            }
        }))?;
        crds.patch(
            &name,
            &PatchParams::apply("dropbox-operator-tests").force(),
            &Patch::Apply(&crd),
        )
        .await?;
        tokio::time::timeout(
            std::time::Duration::from_secs(30),
            kube::runtime::wait::await_condition(
                crds.clone(),
                &name,
                kube::runtime::wait::conditions::is_crd_established(),
            ),
        )
        .await
        .map_err(|_| anyhow::anyhow!("{name} not Established within 30s"))??;
    }
    Ok(())
}
