//! The chart as Argo CD sees it: the objects a Helm install created, read back
//! from a real API server (with the status its controllers wrote: the HPA and
//! disruption controllers run in the test control plane) and judged by Argo
//! CD's own health code (gitops-engine's `pkg/health`, built from its Go module:
//! tests/argocd-health). Nothing may be Degraded before an instance enables
//! events, i.e. before the webhook ingress exists.

mod support;

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use dropbox_operator::api::DropboxElementInstance;
use dropbox_operator::contract::INGRESS_NAME;
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use support::argocd::{Health, assess};
use support::chart::{REDIRECT, controller_process, instance_manifest, run, try_install};
use support::dropbox::Emulator;
use support::put_secret;

const APP_KEY: &str = "app-key-argocd";
const APP_SECRET: &str = "APP-SECRET-a7c3";
const ACCOUNT: &str = "dbid:AAArgoCdAccount000000000000000000000";

/// Every object of release `ns` as the API server has it now (`kubectl get -f`
/// over the release's manifest), judged by Argo CD's health code.
fn release_health(ns: &str) -> Result<Vec<Health>> {
    let mut cmd = support::cluster().helm();
    cmd.args(["get", "manifest", ns, "-n", ns]);
    let (ok, manifest, err) = run(cmd);
    ensure!(ok, "helm get manifest: {err}");
    // Every namespaced object of the chart names its namespace (the release's or
    // the data namespace), so no `-n`: kubectl refuses one that differs.
    let (ok, live, err) = support::kubectl_stdin(&["get", "-f", "-", "-o", "json"], &manifest);
    ensure!(ok, "kubectl get: {err}");
    assess(&live)
}

fn table(health: &[Health]) -> String {
    health
        .iter()
        .map(|h| {
            format!(
                "{:<34} {:<48} {:<12} {}",
                h.kind,
                h.name,
                if h.status.is_empty() { "-" } else { &h.status },
                h.message
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Installs the chart with everything that points at the ingress (autoscaling,
/// both PodDisruptionBudgets, an Ingress and an HTTPRoute for the webhook path,
/// the PodMonitor), lets the cluster's controllers write their status, and asks
/// Argo CD's health code about every object: none is Degraded (or Unknown);
/// every Service the Ingress and HTTPRoute name exists with the port they name
/// (what a gateway controller checks before it reports ResolvedRefs, which
/// Argo CD's HTTPRoute check turns into Degraded when false). Then an instance
/// enables events: the controller makes the ingress Deployment and its HPA, and
/// the HPA, pointed at a Deployment that exists, is not Degraded either.
#[tokio::test]
async fn argo_cd_sees_nothing_degraded_before_the_ingress_exists() -> Result<()> {
    support::argocd::binary()?; // build it before the clock starts
    let admin = support::client().await;
    support::install_crd(&admin).await?;
    support::chart::stand_in_crds(&admin).await?;
    let ns = support::namespace(&admin, "argocd-health").await;
    let values = json!({
        "watchNamespace": ns,
        "webhookIngress": {
            "autoscaling": {"enabled": true, "minReplicas": 2, "maxReplicas": 4},
            "expose": {
                "ingress": {"enabled": true, "hosts": ["hooks.example.com"]},
                "httpRoute": {"enabled": true, "parentRefs": [{"name": "public", "namespace": "gateways"}]}
            }
        },
        "metrics": {"serviceMonitor": {"enabled": true}}
    });
    let (ok, out, err) = try_install(&ns, &ns, &values)?;
    ensure!(ok, "{out}\n{err}");

    // The disruption controller has looked at both budgets (and the HPA
    // controller, running every 2 s, at any HPA) before the verdict.
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(admin.clone(), &ns);
    support::eventually(
        "the disruption controller's status on both budgets",
        Duration::from_secs(30),
        || {
            let pdbs = pdbs.clone();
            async move { Ok(pdbs.list(&Default::default()).await?.items) }
        },
        |items: &Vec<PodDisruptionBudget>| {
            items.len() == 2
                && items.iter().all(|p| {
                    p.status
                        .as_ref()
                        .is_some_and(|s| s.observed_generation.is_some())
                })
        },
    )
    .await?;
    let hpas: Api<HorizontalPodAutoscaler> = Api::namespaced(admin.clone(), &ns);
    tokio::time::sleep(Duration::from_secs(5)).await;
    for hpa in hpas.list(&Default::default()).await?.items {
        // An HPA rendered by the chart: wait for its verdict too.
        support::eventually(
            "the HPA controller's conditions",
            Duration::from_secs(30),
            || {
                let hpas = hpas.clone();
                let name = hpa.metadata.name.clone().unwrap_or_default();
                async move { Ok(hpas.get(&name).await?) }
            },
            |h: &HorizontalPodAutoscaler| {
                h.status
                    .as_ref()
                    .is_some_and(|s| !s.conditions.clone().unwrap_or_default().is_empty())
            },
        )
        .await?;
    }

    let health = release_health(&ns)?;
    eprintln!("before any instance has events:\n{}", table(&health));
    ensure!(health.len() >= 15, "only {} objects assessed", health.len());
    let bad: Vec<&Health> = health
        .iter()
        .filter(|h| matches!(h.status.as_str(), "Degraded" | "Unknown" | "Missing"))
        .collect();
    ensure!(
        bad.is_empty(),
        "Argo CD would show:\n{}",
        table(&bad.into_iter().cloned().collect::<Vec<_>>())
    );

    // PodDisruptionBudgets have no check in gitops-engine; Argo CD judges them
    // with a Lua script (resource_customizations/policy/PodDisruptionBudget,
    // since 2.13) that calls any False condition Degraded except
    // InsufficientPods, which is what a budget whose pods do not exist yet has.
    for pdb in pdbs.list(&Default::default()).await?.items {
        for c in pdb.status.and_then(|s| s.conditions).unwrap_or_default() {
            ensure!(
                c.status != "False" || c.reason == "InsufficientPods",
                "PodDisruptionBudget {:?}: {} {} {}: Argo CD's script would say Degraded",
                pdb.metadata.name,
                c.type_,
                c.status,
                c.reason
            );
        }
    }

    // The routes' backends resolve.
    let services: Api<Service> = Api::namespaced(admin.clone(), &ns);
    let (ok, routes, err) =
        support::kubectl(&["get", "ingress,httproute", "-n", &ns, "-o", "json"]);
    ensure!(ok, "{err}");
    let routes: Value = serde_json::from_str(&routes)?;
    let mut backends = Vec::new();
    for route in routes["items"].as_array().context("items")? {
        for rule in route["spec"]["rules"].as_array().into_iter().flatten() {
            for path in rule["http"]["paths"].as_array().into_iter().flatten() {
                let s = &path["backend"]["service"];
                backends.push((
                    s["name"].clone(),
                    s["port"]["name"].clone(),
                    s["port"]["number"].clone(),
                ));
            }
            for r in rule["backendRefs"].as_array().into_iter().flatten() {
                backends.push((r["name"].clone(), Value::Null, r["port"].clone()));
            }
        }
    }
    ensure!(backends.len() == 2, "{backends:?}");
    for (name, port_name, port) in backends {
        let name = name.as_str().context("backend name")?;
        let service = services
            .get_opt(name)
            .await?
            .with_context(|| format!("a route points at Service {name}, which does not exist"))?;
        let ports = service.spec.and_then(|s| s.ports).unwrap_or_default();
        ensure!(
            ports
                .iter()
                .any(|p| Value::from(p.name.clone()) == port_name || port == p.port),
            "Service {name} has no port {port_name}/{port}"
        );
    }

    // An instance with events: the controller makes the Deployment and its HPA.
    let emu = Emulator::start().await;
    emu.add_app(APP_KEY, APP_SECRET);
    emu.add_account(ACCOUNT, "argocd@example.com", "Argo CD");
    let mut controller = controller_process(&admin, &ns, &emu.url, "argocd", &[])
        .await?
        .start()
        .await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);
    put_secret(
        &secrets,
        "dropbox-app",
        &[("oauth.api.key", APP_KEY), ("oauth.api.secret", APP_SECRET)],
    )
    .await?;
    let code = emu.issue_code(APP_KEY, ACCOUNT, Some(REDIRECT));
    put_secret(&secrets, "hooks-code", &[("code", &code)]).await?;
    Api::<DropboxElementInstance>::namespaced(admin.clone(), &ns)
        .create(&PostParams::default(), &instance_manifest("hooks", true)?)
        .await?;
    let hpa = support::eventually(
        "the controller's HPA, with the HPA controller's conditions",
        Duration::from_secs(60),
        || {
            let hpas = hpas.clone();
            async move { Ok(hpas.get_opt(INGRESS_NAME).await?) }
        },
        |h: &Option<HorizontalPodAutoscaler>| {
            h.as_ref()
                .and_then(|h| h.status.as_ref())
                .is_some_and(|s| !s.conditions.clone().unwrap_or_default().is_empty())
        },
    )
    .await
    .with_context(|| controller.log_text())?
    .context("HPA")?;
    let spec = hpa.spec.clone();
    ensure!(
        spec.scale_target_ref.name == INGRESS_NAME
            && spec.min_replicas == Some(2)
            && spec.max_replicas == 4
    );
    let verdict = assess(&serde_json::to_string(&json!({
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler",
        "metadata": hpa.metadata, "spec": hpa.spec, "status": hpa.status
    }))?)?;
    eprintln!("the controller's HPA:\n{}", table(&verdict));
    ensure!(
        verdict.len() == 1 && verdict[0].status != "Degraded",
        "{verdict:?}"
    );
    controller.terminate(Duration::from_secs(10));
    Ok(())
}
