//! The Helm chart `charts/dropbox-operator` with the real helm and kubectl on a real
//! control plane: lint, schema, rendering, server-side dry runs, and RBAC that is
//! proven by running the real controller with the chart's ServiceAccount token.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use clap::{CommandFactory, Parser as _};
use dropbox_operator::api::DropboxElementInstance;
use dropbox_operator::cli::{Cli, Command as CliCommand};
use dropbox_operator::contract;
use dropbox_operator::controller::finalizer::FINALIZER;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config, ResourceExt};
use serde_json::Value as Yaml;
use serde_json::json;
use support::chart::{
    REDIRECT, chart_arg, chart_dir, helm_offline, instance_manifest, kubeconfig_for, run,
};
use support::condition_is;
use support::controlplane;
use support::dropbox::Emulator;
use support::operator::OperatorProcess;
use support::put_secret;

const CRD_FILE: &str = "dropboxelementinstances.elements.dropbox-operator.dev.yaml";
/// The ingress ServiceAccount's default name (values.yaml), which is also the
/// controller's default INGRESS_SERVICE_ACCOUNT.
const INGRESS_SA: &str = "dropbox-webhook-ingress";
const INGRESS_NAME: &str = "dropbox-webhook-ingress";
const LEADER_LEASE: &str = "dropbox-operator-controller";
const IMAGE_SETTINGS: [&str; 4] = [
    "--set",
    "image.repository=registry.example.com/dropbox-operator",
    "--set",
    "image.tag=test",
];

const APP_KEY: &str = "app-key-chart";
const APP_SECRET: &str = "APP-SECRET-c4a7";
const ACCOUNT: &str = "dbid:AAChartRbacAccount0000000000000000000";

/// `helm template` of the chart with extra arguments.
fn template(namespace: &str, extra: &[&str]) -> Result<String> {
    let mut cmd = helm_offline();
    cmd.args([
        "template",
        "dropbox-operator",
        &chart_arg(),
        "--namespace",
        namespace,
    ])
    .args(extra);
    let (ok, out, err) = run(cmd);
    ensure!(ok, "helm template {extra:?} failed: {err}");
    Ok(out)
}

/// The rendered objects, as YAML values.
fn documents(rendered: &str) -> Vec<Yaml> {
    serde_saphyr::from_multiple::<Yaml>(rendered)
        .expect("helm renders YAML")
        .into_iter()
        .filter(|v| !v.is_null())
        .collect()
}

fn kind_of(doc: &Yaml) -> &str {
    doc["kind"].as_str().unwrap_or_default()
}

fn name_of(doc: &Yaml) -> &str {
    doc["metadata"]["name"].as_str().unwrap_or_default()
}

/// The controller container's `env` with literal values (fieldRefs left out).
fn controller_env(docs: &[Yaml]) -> Result<Vec<(String, String)>> {
    let deployment = docs
        .iter()
        .find(|d| kind_of(d) == "Deployment")
        .context("no Deployment rendered")?;
    let containers = deployment["spec"]["template"]["spec"]["containers"]
        .as_array()
        .context("containers")?;
    ensure!(containers.len() == 1, "one container expected");
    let env = containers[0]["env"].as_array().context("env")?;
    Ok(env
        .iter()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .collect())
}

/// Parses the rendered controller env with the binary's real command line: every
/// variable must be one the controller reads, with a value it accepts.
fn parse_as_controller(env: &[(String, String)]) -> Result<dropbox_operator::cli::ControllerArgs> {
    let cli = Cli::command();
    let controller = cli
        .find_subcommand("controller")
        .context("controller subcommand")?;
    let args: Vec<&clap::Arg> = cli
        .get_arguments()
        .chain(controller.get_arguments())
        .collect();
    let mut argv = vec!["dropbox-operator".to_owned(), "controller".to_owned()];
    for (name, value) in env {
        let arg = args
            .iter()
            .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
            .with_context(|| format!("the chart sets {name}, which `controller` does not read"))?;
        let long = arg.get_long().context("flag without a long name")?;
        argv.push(format!("--{long}={value}"));
    }
    let parsed = Cli::try_parse_from(&argv).map_err(|e| anyhow::anyhow!("{argv:?}: {e}"))?;
    match parsed.command {
        CliCommand::Controller(args) => Ok(*args),
        other => bail!("parsed as {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// Static checks (no control plane).

#[test]
fn chart_crd_is_byte_identical_to_the_generated_crd() {
    let root = controlplane::repo_root();
    let generated = std::fs::read(root.join("crds").join(CRD_FILE)).expect("read crds/");
    let in_chart = std::fs::read(chart_dir().join("crds").join(CRD_FILE)).expect("read chart CRD");
    assert!(
        generated == in_chart,
        "charts/dropbox-operator/crds/{CRD_FILE} differs from crds/{CRD_FILE}: copy it over"
    );
}

#[test]
fn chart_version_matches_the_crate() {
    let chart: Yaml =
        serde_saphyr::from_str(&std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap())
            .expect("Chart.yaml");
    assert_eq!(chart["apiVersion"].as_str(), Some("v2"));
    assert_eq!(
        chart["appVersion"].as_str(),
        Some(env!("CARGO_PKG_VERSION")),
        "Chart.yaml appVersion must be the Cargo.toml version"
    );
}

#[test]
fn helm_lint_strict_is_clean() {
    for extra in [
        &[][..],
        &["--set", "watchNamespace=apps"][..],
        &[
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "networkPolicy.enabled=true",
            "--set",
            "replicas=1",
            "--set",
            "leaderElection.enabled=false",
            "--set",
            "rbac.create=false",
        ][..],
    ] {
        let mut cmd = helm_offline();
        cmd.args(["lint", "--strict", &chart_arg()]).args(extra);
        let (ok, out, err) = run(cmd);
        assert!(ok, "helm lint --strict {extra:?} failed:\n{out}\n{err}");
        for bad in ["[WARNING]", "[ERROR]"] {
            assert!(
                !out.contains(bad),
                "helm lint {extra:?} reports {bad}:\n{out}"
            );
        }
        assert!(out.contains("0 chart(s) failed"), "{out}");
    }
}

/// The internet-facing ingress has one Role, in its data namespace, and no other
/// grant: no ClusterRole, nothing in the release namespace or a watched one, no
/// Lease anywhere (docs/architecture.md). The data namespace can be neither the
/// release namespace nor a watched one.
#[test]
fn the_ingress_has_one_role_only_in_its_data_namespace() -> Result<()> {
    for extra in [&[][..], &["--set", "watchNamespace=apps"][..]] {
        let docs = documents(&template("ops", extra)?);
        let ingress_grants: Vec<&Yaml> = docs
            .iter()
            .filter(|d| kind_of(d).ends_with("Binding"))
            .filter(|d| {
                d["subjects"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|s| s["name"] == INGRESS_SA)
            })
            .collect();
        ensure!(
            ingress_grants.len() == 1,
            "{extra:?}: the ingress is bound {} times",
            ingress_grants.len()
        );
        let binding = ingress_grants[0];
        ensure!(kind_of(binding) == "RoleBinding");
        ensure!(binding["metadata"]["namespace"] == "ops-ingress-data");
        let role_name = binding["roleRef"]["name"].as_str().unwrap_or_default();
        let role = docs
            .iter()
            .find(|d| kind_of(d) == "Role" && name_of(d) == role_name)
            .context("the bound Role")?;
        ensure!(role["metadata"]["namespace"] == "ops-ingress-data");
        let resources: Vec<&str> = role["rules"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|r| r["resources"].as_array().into_iter().flatten())
            .filter_map(|r| r.as_str())
            .collect();
        ensure!(
            resources
                .iter()
                .all(|r| matches!(*r, "secrets" | "configmaps")),
            "{resources:?}"
        );
        let namespace = docs
            .iter()
            .find(|d| kind_of(d) == "Namespace")
            .context("the data Namespace")?;
        ensure!(name_of(namespace) == "ops-ingress-data");
    }
    for bad in [
        vec!["--set", "webhookIngress.dataNamespace.name=ops"],
        vec![
            "--set",
            "watchNamespace=apps",
            "--set",
            "webhookIngress.dataNamespace.name=apps",
        ],
    ] {
        let mut cmd = helm_offline();
        cmd.args(["template", "x", &chart_arg(), "--namespace", "ops"])
            .args(&bad);
        let (ok, _, err) = run(cmd);
        ensure!(!ok && err.contains("dataNamespace"), "{bad:?}: {err}");
    }
    Ok(())
}

/// Namespace admins/editors/viewers get instance rights through aggregation, and
/// both Deployments get a PodDisruptionBudget when they run more than one pod.
#[test]
fn aggregated_roles_and_disruption_budgets() -> Result<()> {
    let docs = documents(&template("ops", &[])?);
    for (role, verbs) in [("admin", "delete"), ("edit", "delete"), ("view", "watch")] {
        let found = docs
            .iter()
            .find(|d| {
                kind_of(d) == "ClusterRole"
                    && d["metadata"]["labels"]
                        [format!("rbac.authorization.k8s.io/aggregate-to-{role}")]
                        == "true"
            })
            .with_context(|| format!("no ClusterRole aggregated to {role}"))?;
        let granted = found["rules"][0]["verbs"].to_string();
        ensure!(granted.contains(verbs), "{role}: {granted}");
        if role == "view" {
            ensure!(
                !granted.contains("delete") && !granted.contains("create"),
                "{granted}"
            );
        }
    }
    let pdbs: Vec<&str> = docs
        .iter()
        .filter(|d| kind_of(d) == "PodDisruptionBudget")
        .map(name_of)
        .collect();
    ensure!(pdbs.len() == 2, "{pdbs:?}");
    // One replica of each: no budget could ever be met, none is rendered.
    let single = documents(&template(
        "ops",
        &[
            "--set",
            "replicas=1",
            "--set",
            "webhookIngress.replicas=1",
            "--set",
            "leaderElection.enabled=true",
        ],
    )?);
    ensure!(!single.iter().any(|d| kind_of(d) == "PodDisruptionBudget"));
    Ok(())
}

#[test]
fn schema_refuses_bad_values() {
    for (set, expect) in [
        ("logFormat=xml", "logFormat"),
        ("image.pullPolicy=Sometimes", "pullPolicy"),
        ("replicas=two", "replicas"),
        ("dropbox.apiUrl=ftp://example.com", "apiUrl"),
        ("controller.resyncInterval=soon", "resyncInterval"),
        (
            "webhookIngress.allowedCallbackCIDRs={10.0.0.0}",
            "allowedCallbackCIDRs",
        ),
        ("watchNamespace=Not_A_Namespace", "watchNamespace"),
        ("metrics.service.type=ExternalName", "type"),
        ("tpyo=1", "tpyo"),
    ] {
        let mut cmd = helm_offline();
        cmd.args(["template", "x", &chart_arg(), "--set", set]);
        let (ok, _, err) = run(cmd);
        assert!(!ok, "values {set} were accepted");
        assert!(
            err.contains("schema") && err.contains(expect),
            "values {set}: {err}"
        );
    }
    // Two controllers without leader election would both reconcile.
    let mut cmd = helm_offline();
    cmd.args(["template", "x", &chart_arg()])
        .args(["--set", "leaderElection.enabled=false"]);
    let (ok, _, err) = run(cmd);
    assert!(!ok && err.contains("leaderElection"), "{err}");
}

#[test]
fn rendered_controller_settings_are_accepted_by_the_binary() -> Result<()> {
    // Defaults.
    let docs = documents(&template("ops", &[])?);
    let args = parse_as_controller(&controller_env(&docs)?)?;
    assert_eq!(args.namespace, None, "all namespaces by default");
    assert_eq!(args.data_namespace.as_deref(), Some("ops-ingress-data"));
    assert!(args.leader_elect);
    assert_eq!(args.leader_election_lease, LEADER_LEASE);
    assert_eq!(args.metrics_addr.port(), 8080);
    assert_eq!(args.ingress.ingress_service_account, INGRESS_SA);
    assert_eq!(args.ingress.ingress_replicas, 2);
    assert_eq!(
        args.ingress.ingress_image,
        concat!(
            "ghcr.io/dropbox-operator/dropbox-operator:",
            env!("CARGO_PKG_VERSION")
        )
    );
    assert_eq!(args.ingress.allowed_callback_cidrs, "");
    let resources = args
        .ingress
        .ingress_resources
        .context("INGRESS_RESOURCES")?;
    assert_eq!(
        resources
            .requests
            .unwrap_or_default()
            .get("cpu")
            .map(|q| q.0.as_str()),
        Some("50m")
    );
    assert_eq!(
        args.dropbox.dropbox_api_url.as_str(),
        "https://api.dropboxapi.com/"
    );

    let deployment = docs
        .iter()
        .find(|d| kind_of(d) == "Deployment")
        .context("Deployment")?;
    assert_eq!(deployment["spec"]["replicas"].as_u64(), Some(2));
    let pod = &deployment["spec"]["template"]["spec"];
    let container = &pod["containers"][0];
    assert_eq!(container["args"][0].as_str(), Some("controller"));
    assert_eq!(container["ports"][0]["name"].as_str(), Some("metrics"));
    assert_eq!(container["ports"][0]["containerPort"].as_u64(), Some(8080));
    assert_eq!(
        container["livenessProbe"]["httpGet"]["path"].as_str(),
        Some("/healthz")
    );
    assert_eq!(
        container["readinessProbe"]["httpGet"]["path"].as_str(),
        Some("/readyz")
    );
    let sc = &container["securityContext"];
    assert_eq!(sc["runAsNonRoot"].as_bool(), Some(true));
    assert_eq!(sc["readOnlyRootFilesystem"].as_bool(), Some(true));
    assert_eq!(sc["allowPrivilegeEscalation"].as_bool(), Some(false));
    assert_eq!(sc["capabilities"]["drop"][0].as_str(), Some("ALL"));
    assert_eq!(
        sc["seccompProfile"]["type"].as_str(),
        Some("RuntimeDefault")
    );
    let field_refs: Vec<&str> = container["env"]
        .as_array()
        .context("env")?
        .iter()
        .filter(|e| e["valueFrom"]["fieldRef"].is_object())
        .filter_map(|e| e["name"].as_str())
        .collect();
    assert_eq!(field_refs, ["POD_NAMESPACE", "POD_NAME"]);
    // The ServiceAccount the pods run as is the one the RBAC binds.
    let sa = pod["serviceAccountName"]
        .as_str()
        .context("serviceAccountName")?;
    for binding in docs.iter().filter(|d| name_of(d).ends_with("-controller")) {
        if kind_of(binding).ends_with("Binding") {
            assert_eq!(binding["subjects"][0]["name"].as_str(), Some(sa));
        }
    }
    // Nothing optional by default.
    for kind in ["ServiceMonitor", "NetworkPolicy"] {
        assert!(
            !docs.iter().any(|d| kind_of(d) == kind),
            "{kind} rendered by default"
        );
    }

    // Everything set.
    let docs = documents(&template(
        "ops",
        &[
            "--set",
            "watchNamespace=apps",
            "--set",
            "webhookIngress.allowedCallbackCIDRs={10.0.0.0/8,fd00::/8}",
            "--set",
            "webhookIngress.image.repository=registry.example.com/ingress",
            "--set",
            "webhookIngress.replicas=3",
            "--set",
            "webhookIngress.serviceAccount.name=hooks",
            "--set",
            "image.tag=1.2.3",
            "--set",
            "dropbox.apiUrl=https://dropbox-proxy.example.com",
            "--set",
            "controller.resyncInterval=30m",
            "--set",
            "leaderElection.leaseName=my-lease",
            "--set",
            "logFormat=text",
            "--set",
            "metrics.port=9090",
            "--set",
            "metrics.serviceMonitor.enabled=true",
            "--set",
            "networkPolicy.enabled=true",
        ],
    )?);
    let args = parse_as_controller(&controller_env(&docs)?)?;
    assert_eq!(args.namespace.as_deref(), Some("apps"));
    assert_eq!(args.ingress.allowed_callback_cidrs, "10.0.0.0/8,fd00::/8");
    assert_eq!(
        args.ingress.ingress_image,
        "registry.example.com/ingress:1.2.3"
    );
    assert_eq!(args.ingress.ingress_replicas, 3);
    assert_eq!(args.ingress.ingress_service_account, "hooks");
    assert_eq!(args.resync_interval, Duration::from_secs(1800));
    assert_eq!(args.leader_election_lease, "my-lease");
    assert_eq!(args.metrics_addr.port(), 9090);
    assert_eq!(
        args.dropbox.dropbox_api_url.host_str(),
        Some("dropbox-proxy.example.com")
    );
    assert!(
        docs.iter()
            .any(|d| kind_of(d) == "ServiceAccount" && name_of(d) == "hooks")
    );
    assert_eq!(
        docs.iter()
            .filter(|d| kind_of(d) == "ServiceMonitor")
            .count(),
        1
    );
    // The ingress's metrics port is not behind its public Service: a PodMonitor.
    assert_eq!(
        docs.iter().filter(|d| kind_of(d) == "PodMonitor").count(),
        1
    );
    assert_eq!(
        docs.iter()
            .filter(|d| kind_of(d) == "NetworkPolicy")
            .count(),
        2
    );
    // watchNamespace: no cluster-wide grants at all.
    assert!(
        !docs.iter().any(|d| kind_of(d).starts_with("Cluster")),
        "ClusterRole(Binding)s rendered although watchNamespace is set"
    );
    let in_apps: Vec<&str> = docs
        .iter()
        .filter(|d| d["metadata"]["namespace"].as_str() == Some("apps"))
        .map(kind_of)
        .collect();
    // The controller's, not the ingress's: it has none there.
    assert_eq!(in_apps, ["Role", "RoleBinding"]);
    Ok(())
}

// ---------------------------------------------------------------------------
// On the control plane.

/// `helm template` output passes a server-side dry run, with defaults and with
/// watchNamespace.
#[tokio::test]
async fn templates_pass_a_server_side_dry_run() -> Result<()> {
    let client = support::client().await;
    support::install_crd(&client).await?;
    let ops = support::namespace(&client, "chart-dry-run").await;
    let apps = support::namespace(&client, "chart-dry-run-apps").await;
    // A dry run creates nothing: the data namespace the chart makes must exist
    // for the objects in it.
    let (ok, _, err) = support::kubectl(&[
        "create",
        "namespace",
        &data_namespace(&ops),
        "--save-config",
    ]);
    ensure!(ok, "{err}");
    for extra in [
        vec![],
        vec!["--set".to_owned(), format!("watchNamespace={apps}")],
        vec![
            "--set".to_owned(),
            "networkPolicy.enabled=true".to_owned(),
            "--set".to_owned(),
            "webhookIngress.allowedCallbackCIDRs={10.0.0.0/8}".to_owned(),
        ],
    ] {
        let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
        let rendered = template(&ops, &extra)?;
        let (ok, out, err) =
            support::kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &rendered);
        ensure!(ok, "server-side dry run of {extra:?} failed:\n{out}\n{err}");
        ensure!(
            out.contains("deployment.apps/dropbox-operator created (server dry run)"),
            "{out}"
        );
        ensure!(!err.to_lowercase().contains("warning"), "warnings: {err}");
    }
    Ok(())
}

/// Installs the chart with the real helm into `ns` (release name = `ns`), mints
/// tokens for its controller and ingress ServiceAccounts (TokenRequest), and
/// returns kubeconfigs using them: (controller, ingress).
async fn chart_install(ns: &str, extra: &[&str]) -> Result<(PathBuf, PathBuf)> {
    let cluster = support::cluster();
    let mut cmd = cluster.helm();
    cmd.args(["install", ns, &chart_arg(), "--namespace", ns])
        .args(IMAGE_SETTINGS)
        .args(extra);
    let (ok, out, err) = run(cmd);
    ensure!(ok, "helm install failed:\n{out}\n{err}");
    ensure!(
        out.contains("STATUS: deployed") && out.contains("/webhooks/dropbox/<APP_KEY>"),
        "{out}"
    );
    let controller = kubeconfig_for(ns, &controller_sa(ns))?;
    let ingress = kubeconfig_for(ns, INGRESS_SA)?;
    Ok((controller, ingress))
}

/// The data namespace of a release installed by [`chart_install`] (the default).
fn data_namespace(ops: &str) -> String {
    format!("{ops}-ingress-data")
}

/// The controller's ServiceAccount of a release installed by [`chart_install`].
fn controller_sa(ns: &str) -> String {
    format!("{ns}-dropbox-operator")
}

/// A kube client with the credentials of `kubeconfig`.
async fn client_from(kubeconfig: &Path) -> Result<Client> {
    let config = Config::from_custom_kubeconfig(
        Kubeconfig::read_from(kubeconfig)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    Ok(Client::try_from(config)?)
}

/// One `kubectl auth can-i` question: (verb, resource[/name][:subresource],
/// namespace ("" = all namespaces), expected answer).
type CanI<'a> = (&'a str, &'a str, &'a str, bool);

/// Asks every question as `system:serviceaccount:<ns>:<sa>` and reports all wrong
/// answers at once.
fn check_can_i(ns: &str, sa: &str, questions: &[CanI]) -> Result<()> {
    let user = format!("--as=system:serviceaccount:{ns}:{sa}");
    let mut wrong = Vec::new();
    let mut rows = Vec::new();
    for (verb, resource, namespace, expected) in questions {
        // `resource:subresource` is asked with --subresource (`/` names an object).
        let mut args = vec!["auth", "can-i", *verb];
        let (resource, subresource) = match resource.split_once(':') {
            Some((r, s)) => (r, Some(s)),
            None => (*resource, None),
        };
        args.push(resource);
        let sub;
        if let Some(s) = subresource {
            sub = format!("--subresource={s}");
            args.push(&sub);
        }
        if namespace.is_empty() {
            args.push("--all-namespaces");
        } else {
            args.extend(["-n", namespace]);
        }
        args.push(&user);
        let (_, out, err) = support::kubectl(&args);
        let answer = out.trim();
        let want = if *expected { "yes" } else { "no" };
        let what = match subresource {
            Some(s) => format!("{resource}/{s}"),
            None => (*resource).to_owned(),
        };
        let place = if namespace.is_empty() {
            "(all namespaces)"
        } else {
            namespace
        };
        rows.push(format!(
            "| {verb:<6} | {what:<70} | {place:<28} | {want:<8} | {answer:<6} |{}",
            if answer == want { "" } else { " WRONG" }
        ));
        if answer != want {
            wrong.push(format!(
                "{sa}: can-i {verb} {resource} {subresource:?} in {namespace:?}: {answer} {err}"
            ));
        }
    }
    // The table goes straight to stdout (not the test's captured output), so
    // `make test` shows what each ServiceAccount may and may not do.
    let mut table = format!(
        "\ncan-i table for {sa}\n| {:<6} | {:<70} | {:<28} | {:<8} | {:<6} |\n",
        "verb", "resource", "namespace", "expected", "answer"
    );
    table.push_str(&format!(
        "|--------|{}|{}|----------|--------|\n",
        "-".repeat(72),
        "-".repeat(30)
    ));
    table.push_str(&rows.join("\n"));
    table.push('\n');
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), table.as_bytes());
    ensure!(wrong.is_empty(), "wrong permissions:\n{}", wrong.join("\n"));
    Ok(())
}

const DBXI: &str = "dropboxelementinstances.elements.dropbox-operator.dev";

/// What the controller may and may not do, with `ops` the release namespace,
/// `data` the ingress's data namespace and `apps` a namespace with instances.
fn controller_questions<'a>(ops: &'a str, data: &'a str, apps: &'a str) -> Vec<CanI<'a>> {
    vec![
        // Instances, everywhere.
        ("get", DBXI, apps, true),
        ("list", DBXI, "", true),
        ("watch", DBXI, "", true),
        ("patch", DBXI, apps, true),
        (
            "patch",
            "dropboxelementinstances.elements.dropbox-operator.dev:status",
            apps,
            true,
        ),
        (
            "update",
            "dropboxelementinstances.elements.dropbox-operator.dev:finalizers",
            apps,
            true,
        ),
        ("create", DBXI, apps, false),
        ("update", DBXI, apps, false),
        ("delete", DBXI, apps, false),
        (
            "update",
            "dropboxelementinstances.elements.dropbox-operator.dev:status",
            apps,
            false,
        ),
        // Secrets: read, watch, server-side apply of the token Secret; never delete.
        ("get", "secrets", apps, true),
        ("list", "secrets", "", true),
        ("watch", "secrets", "", true),
        ("create", "secrets", apps, true),
        ("patch", "secrets", apps, true),
        ("delete", "secrets", apps, false),
        ("update", "secrets", apps, false),
        ("deletecollection", "secrets", apps, false),
        // No ConfigMap outside the data namespace.
        ("get", "configmaps", apps, false),
        ("delete", "configmaps", apps, false),
        ("create", "configmaps", apps, false),
        ("update", "configmaps", apps, false),
        ("list", "configmaps", apps, false),
        ("patch", "configmaps", apps, false),
        ("get", "configmaps", ops, false),
        ("create", "configmaps", ops, false),
        ("update", "configmaps", ops, false),
        ("delete", "secrets", ops, false),
        // The data namespace: projections, cursors, delivery states, heartbeats.
        ("get", "secrets", data, true),
        ("create", "secrets", data, true),
        ("patch", "secrets", data, true),
        ("delete", "secrets", data, true),
        ("list", "secrets", data, true),
        ("update", "secrets", data, false),
        ("get", "configmaps", data, true),
        ("list", "configmaps", data, true),
        ("watch", "configmaps", data, true),
        ("create", "configmaps", data, true),
        ("update", "configmaps", data, true),
        ("delete", "configmaps", data, true),
        ("patch", "configmaps", data, false),
        // Events.
        ("create", "events.events.k8s.io", apps, true),
        ("patch", "events.events.k8s.io", apps, true),
        ("delete", "events.events.k8s.io", apps, false),
        ("create", "events", apps, false),
        // Its own namespace: the leader Lease, nothing else.
        ("list", "leases.coordination.k8s.io", ops, false),
        ("create", "leases.coordination.k8s.io", ops, true),
        ("get", LEADER_LEASE_REF, ops, true),
        ("update", LEADER_LEASE_REF, ops, true),
        ("patch", LEADER_LEASE_REF, ops, false),
        (
            "update",
            "leases.coordination.k8s.io/someone-else",
            ops,
            false,
        ),
        ("delete", LEADER_LEASE_REF, ops, false),
        ("create", "leases.coordination.k8s.io", apps, false),
        ("list", "leases.coordination.k8s.io", apps, false),
        // The webhook ingress Deployment, only that, only in its namespace.
        // Created with server-side apply, i.e. by name; a plain POST is refused.
        // Its Service is the chart's: no right on Services at all.
        (
            "create",
            "deployments.apps/dropbox-webhook-ingress",
            ops,
            true,
        ),
        ("create", "services/dropbox-webhook-ingress", ops, false),
        ("create", "deployments.apps", ops, false),
        ("create", "deployments.apps/other", ops, false),
        ("get", "deployments.apps/dropbox-webhook-ingress", ops, true),
        ("get", "services/dropbox-webhook-ingress", ops, false),
        ("get", "deployments.apps/other", ops, false),
        ("get", "services/other", ops, false),
        (
            "patch",
            "deployments.apps/dropbox-webhook-ingress",
            ops,
            true,
        ),
        (
            "delete",
            "deployments.apps/dropbox-webhook-ingress",
            ops,
            true,
        ),
        ("patch", "services/dropbox-webhook-ingress", ops, false),
        ("delete", "services/dropbox-webhook-ingress", ops, false),
        // Its HPA: read and removed (a left-over one); made only with autoscaling.
        (
            "get",
            "horizontalpodautoscalers.autoscaling/dropbox-webhook-ingress",
            ops,
            true,
        ),
        (
            "delete",
            "horizontalpodautoscalers.autoscaling/dropbox-webhook-ingress",
            ops,
            true,
        ),
        (
            "create",
            "horizontalpodautoscalers.autoscaling/dropbox-webhook-ingress",
            ops,
            false,
        ),
        (
            "get",
            "horizontalpodautoscalers.autoscaling/other",
            ops,
            false,
        ),
        ("patch", "deployments.apps/other", ops, false),
        ("delete", "deployments.apps/other", ops, false),
        ("delete", "services/other", ops, false),
        ("list", "deployments.apps", ops, false),
        ("create", "deployments.apps", apps, false),
        (
            "patch",
            "deployments.apps/dropbox-webhook-ingress",
            apps,
            false,
        ),
        ("create", "services", apps, false),
        // Nothing else.
        ("get", "pods", apps, false),
        ("create", "pods", ops, false),
        ("get", "serviceaccounts", ops, false),
        ("create", "serviceaccounts/token", ops, false),
        (
            "create",
            "rolebindings.rbac.authorization.k8s.io",
            ops,
            false,
        ),
        (
            "update",
            "customresourcedefinitions.apiextensions.k8s.io",
            "",
            false,
        ),
    ]
}

const LEADER_LEASE_REF: &str = "leases.coordination.k8s.io/dropbox-operator-controller";

/// What the ingress may and may not do: only its data namespace's Secrets (read)
/// and ConfigMaps (read, commit, report, heartbeat).
fn ingress_questions<'a>(ops: &'a str, data: &'a str, apps: &'a str) -> Vec<CanI<'a>> {
    vec![
        // No instance at all: the controller projects and mirrors.
        ("get", DBXI, apps, false),
        ("list", DBXI, "", false),
        ("watch", DBXI, "", false),
        (
            "patch",
            "dropboxelementinstances.elements.dropbox-operator.dev:status",
            apps,
            false,
        ),
        ("patch", DBXI, apps, false),
        // No Secret and no ConfigMap outside the data namespace: not the release
        // namespace's (Helm release Secrets, TLS keys), not a tenant's.
        ("get", "secrets", ops, false),
        ("list", "secrets", ops, false),
        ("get", "secrets", apps, false),
        ("get", "secrets", "kube-system", false),
        ("list", "secrets", "", false),
        ("watch", "secrets", "", false),
        ("get", "configmaps", ops, false),
        ("update", "configmaps", ops, false),
        ("patch", "configmaps", ops, false),
        ("get", "configmaps", apps, false),
        ("update", "configmaps", apps, false),
        ("update", "configmaps", "kube-system", false),
        ("get", "configmaps", "", false),
        // The data namespace: read the projections, never write them.
        ("get", "secrets", data, true),
        ("list", "secrets", data, true),
        ("watch", "secrets", data, true),
        ("create", "secrets", data, false),
        ("update", "secrets", data, false),
        ("patch", "secrets", data, false),
        ("delete", "secrets", data, false),
        // Cursors, delivery states, heartbeats; never deleted.
        ("get", "configmaps", data, true),
        ("list", "configmaps", data, true),
        ("watch", "configmaps", data, true),
        ("update", "configmaps", data, true),
        ("create", "configmaps", data, true),
        ("patch", "configmaps", data, true),
        ("delete", "configmaps", data, false),
        // No Lease at all: the controller's leader Lease is out of reach.
        ("get", LEADER_LEASE_REF, ops, false),
        ("patch", LEADER_LEASE_REF, ops, false),
        ("delete", LEADER_LEASE_REF, ops, false),
        ("create", "leases.coordination.k8s.io", ops, false),
        ("list", "leases.coordination.k8s.io", ops, false),
        ("create", "leases.coordination.k8s.io", data, false),
        ("create", "leases.coordination.k8s.io", apps, false),
        // Nothing of the controller's.
        ("create", "events.events.k8s.io", apps, false),
        ("create", "deployments.apps", ops, false),
        (
            "patch",
            "deployments.apps/dropbox-webhook-ingress",
            ops,
            false,
        ),
        ("get", "pods", apps, false),
        ("get", "pods", data, false),
    ]
}

/// `kubectl auth can-i --list` for `sa` of release `ops` in namespace `ns`: the
/// rows (resource, resource names, verbs), printed.
fn can_i_list(ops: &str, sa: &str, ns: &str) -> Result<Vec<String>> {
    let user = format!("--as=system:serviceaccount:{ops}:{sa}");
    let (ok, out, err) = support::kubectl(&["auth", "can-i", "--list", "-n", ns, &user]);
    ensure!(ok, "kubectl auth can-i --list: {err}");
    let table = format!("\nkubectl auth can-i --list -n {ns} {user}\n{out}");
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), table.as_bytes());
    let mut rows: Vec<String> = out
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect();
    rows.sort();
    Ok(rows)
}

/// Everything the ingress ServiceAccount may do, as `kubectl auth can-i --list`
/// shows it in three namespaces: the release namespace, the data namespace and
/// a tenant's. Outside the data namespace it may do exactly what a
/// ServiceAccount without any grant may (ask the API server about itself,
/// read the discovery URLs); in the data namespace, that and the Role's rules.
fn ingress_can_i_list_is_confined(ops: &str, data: &str, apps: &str) -> Result<()> {
    // A ServiceAccount nobody granted anything: the cluster's baseline.
    let nobody: k8s_openapi::api::core::v1::ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "nobody"}}))?;
    let (ok, _, err) = support::kubectl_stdin(
        &["apply", "-n", ops, "-f", "-"],
        &serde_json::to_string(&nobody)?,
    );
    ensure!(ok, "{err}");
    let mut outside = Vec::new();
    for ns in [ops, apps, data] {
        let baseline = can_i_list(ops, "nobody", ns)?;
        let granted: Vec<String> = can_i_list(ops, INGRESS_SA, ns)?
            .into_iter()
            .filter(|row| !baseline.contains(row))
            .collect();
        if ns == data {
            let expected = [
                "configmaps [] [] [get list watch create update patch]",
                "secrets [] [] [get list watch]",
            ];
            ensure!(
                granted == expected,
                "in the data namespace the ingress may: {granted:?}"
            );
        } else if !granted.is_empty() {
            outside.push(format!("{ns}: {granted:?}"));
        }
    }
    ensure!(
        outside.is_empty(),
        "the ingress has rights outside its data namespace: {}",
        outside.join("; ")
    );
    Ok(())
}

/// Fails with the controller's log when a Kubernetes request was forbidden.
fn assert_nothing_forbidden(log: &str) {
    let forbidden: Vec<&str> = log
        .lines()
        .filter(|l| l.to_lowercase().contains("forbidden"))
        .collect();
    assert!(
        forbidden.is_empty(),
        "the controller was refused something:\n{}",
        forbidden.join("\n")
    );
}

async fn wait_condition(
    api: &Api<DropboxElementInstance>,
    name: &str,
    type_: &str,
    status: &str,
    reason: Option<&str>,
) -> Result<DropboxElementInstance> {
    support::wait_condition(api, name, type_, status, reason, Duration::from_secs(60)).await
}

/// The chart's RBAC is enough for the real controller: run with the token of the
/// chart's controller ServiceAccount (all namespaces, leader election on), it
/// authorizes an instance in another namespace, writes the token Secret, status
/// and Events, runs and removes the webhook ingress objects, keeps the events
/// cursor, and finalizes a deletion, without a single forbidden request. And
/// `kubectl auth can-i` confirms what each ServiceAccount may and may not do.
#[tokio::test]
async fn chart_rbac_is_enough_for_the_controller_and_no_more() -> Result<()> {
    let admin = support::client().await;
    support::install_crd(&admin).await?;
    let ops = support::namespace(&admin, "chart-rbac").await;
    let apps = support::namespace(&admin, "chart-rbac-apps").await;
    let (controller_kubeconfig, ingress_kubeconfig) = chart_install(&ops, &[]).await?;
    let data = data_namespace(&ops);

    check_can_i(
        &ops,
        &controller_sa(&ops),
        &controller_questions(&ops, &data, &apps),
    )?;
    check_can_i(&ops, INGRESS_SA, &ingress_questions(&ops, &data, &apps))?;
    ingress_can_i_list_is_confined(&ops, &data, &apps)?;

    let emu = Emulator::start().await;
    emu.add_app(APP_KEY, APP_SECRET);
    emu.add_account(ACCOUNT, "chart@example.com", "Chart Tester");
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &apps);
    let instances: Api<DropboxElementInstance> = Api::namespaced(admin.clone(), &apps);
    put_secret(
        &secrets,
        "dropbox-app",
        &[("oauth.api.key", APP_KEY), ("oauth.api.secret", APP_SECRET)],
    )
    .await?;
    for name in ["marketing", "eventful"] {
        let code = emu.issue_code(APP_KEY, ACCOUNT, Some(REDIRECT));
        put_secret(&secrets, &format!("{name}-code"), &[("code", &code)]).await?;
    }

    let mut controller = OperatorProcess::new(&ops, &emu.url)
        .env("KUBECONFIG", &controller_kubeconfig.display().to_string())
        .env_remove("WATCH_NAMESPACE")
        // As the chart's Deployment runs it: the ingress Service is the chart's.
        .env("INGRESS_MANAGE_SERVICE", "false")
        .env("DATA_NAMESPACE", &data)
        .name("chart-controller")
        .start()
        .await;

    // oauth2 in another namespace: Ready, token Secret written and owned.
    instances
        .create(
            &PostParams::default(),
            &instance_manifest("marketing", false)?,
        )
        .await?;
    let ready = wait_condition(&instances, "marketing", "Ready", "True", None).await;
    let ready = ready.with_context(|| format!("controller log:\n{}", controller.log_text()))?;
    ensure!(condition_is(&ready, "Authorized", "True", None));
    let token = secrets.get("marketing-dropbox-token").await?;
    ensure!(
        token
            .data
            .as_ref()
            .is_some_and(|d| d.contains_key("access_token"))
    );
    ensure!(
        token
            .owner_references()
            .iter()
            .any(|o| Some(&o.uid) == ready.metadata.uid.as_ref())
    );
    ensure!(
        ready.finalizers().iter().any(|f| f == FINALIZER),
        "finalizer added: {:?}",
        ready.finalizers()
    );

    // Events enabled: cursor ConfigMap and projection in the data namespace,
    // ingress Deployment and Service in the operator's namespace.
    instances
        .create(
            &PostParams::default(),
            &instance_manifest("eventful", true)?,
        )
        .await?;
    wait_condition(
        &instances,
        "eventful",
        "EventsReady",
        "False",
        Some("IngressUnavailable"),
    )
    .await
    .with_context(|| format!("controller log:\n{}", controller.log_text()))?;
    // Kubernetes Events (none for a first success, so about `eventful`, which is
    // not Ready while no ingress runs), in the instance's namespace.
    let events: Api<Event> = Api::namespaced(admin.clone(), &apps);
    support::eventually(
        "an Event about eventful",
        Duration::from_secs(30),
        || {
            let events = events.clone();
            async move { Ok(events.list(&ListParams::default()).await?.items) }
        },
        |items: &Vec<Event>| {
            items
                .iter()
                .any(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("eventful"))
        },
    )
    .await?;

    // The cursor and the projected Secret: in the data namespace, by uid.
    let eventful_uid = instances.get("eventful").await?.uid().context("uid")?;
    let cursor_name = contract::cursor_configmap_name(&eventful_uid);
    let configmaps: Api<ConfigMap> = Api::namespaced(admin.clone(), &data);
    ensure!(configmaps.get_opt(&cursor_name).await?.is_some());
    ensure!(
        Api::<Secret>::namespaced(admin.clone(), &data)
            .get_opt(&contract::instance_secret_name(&eventful_uid))
            .await?
            .is_some()
    );
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &ops);
    let services: Api<Service> = Api::namespaced(admin.clone(), &ops);
    let deployment = support::eventually(
        "the ingress Deployment",
        Duration::from_secs(30),
        || support::get_opt(&deployments, INGRESS_NAME),
        Option::is_some,
    )
    .await?
    .context("deployment")?;
    let pod = deployment.spec.template.spec.context("pod spec")?;
    ensure!(pod.service_account_name.as_deref() == Some(INGRESS_SA));
    // The Service is the chart's, there from the install on.
    ensure!(services.get_opt(INGRESS_NAME).await?.is_some());

    // An ingress heartbeat (as an ingress replica would renew it; the ingress's
    // own RBAC is exercised elsewhere): the controller reads the heartbeats
    // ConfigMap it created.
    let entry = contract::Heartbeat {
        expires: jiff::Timestamp::now() + jiff::SignedDuration::from_secs(600),
        view: vec![],
        addr: None,
    }
    .to_value();
    support::eventually(
        "a heartbeat to be accepted",
        Duration::from_secs(30),
        || {
            let configmaps = configmaps.clone();
            let patch = json!({"data": {"test": entry}});
            async move {
                Ok(configmaps
                    .patch(
                        contract::HEARTBEATS_CONFIGMAP,
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                    .is_ok())
            }
        },
        |ok: &bool| *ok,
    )
    .await?;
    wait_condition(
        &instances,
        "eventful",
        "EventsReady",
        "True",
        Some("IngressReady"),
    )
    .await
    .with_context(|| format!("controller log:\n{}", controller.log_text()))?;

    // Events off: the ingress objects and the cursor go away.
    instances
        .patch(
            "eventful",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"events": {"enabled": false}}})),
        )
        .await?;
    support::eventually(
        "the ingress Deployment to be removed",
        Duration::from_secs(30),
        || support::get_opt(&deployments, INGRESS_NAME),
        Option::is_none,
    )
    .await?;
    support::eventually(
        "the cursor to be removed",
        Duration::from_secs(30),
        || support::get_opt(&configmaps, &cursor_name),
        Option::is_none,
    )
    .await?;
    // The chart's Service stays (no endpoints until the ingress runs again).
    ensure!(support::get_opt(&services, INGRESS_NAME).await?.is_some());

    // Deletion: the finalizer revokes the token and lets go.
    instances
        .delete("marketing", &DeleteParams::default())
        .await?;
    support::eventually(
        "marketing to be deleted",
        Duration::from_secs(30),
        || support::get_opt(&instances, "marketing"),
        Option::is_none,
    )
    .await?;
    ensure!(
        !emu.calls_to("/2/auth/token/revoke").is_empty(),
        "token revoked"
    );

    // The leader Lease is the one the Role names.
    let leases: Api<Lease> = Api::namespaced(admin.clone(), &ops);
    ensure!(leases.get_opt(LEADER_LEASE).await?.is_some());

    // The whole events flow with the ingress's own token.
    events_flow_with_the_ingress_token(
        &admin,
        &ops,
        &data,
        &apps,
        &emu,
        &ingress_kubeconfig,
        &controller,
    )
    .await?;

    controller.terminate(Duration::from_secs(10));
    assert_nothing_forbidden(&controller.log_text());
    Ok(())
}

/// The chart's RBAC is enough for the whole events flow: the ingress runs with
/// its own chart ServiceAccount token (TokenRequest) — it watches the
/// projections in its data namespace, fetches the changes, delivers a signed
/// event, commits the cursor, reports its delivery state (which the controller
/// mirrors into EventsDelivering) and renews (and finally removes) its
/// heartbeat — with nothing forbidden. Runs inside the controller test above:
/// two cluster-wide controllers in one cluster would manage each other's
/// instances.
async fn events_flow_with_the_ingress_token(
    admin: &Client,
    ops: &str,
    data: &str,
    apps: &str,
    emu: &Emulator,
    ingress_kubeconfig: &Path,
    controller: &support::operator::Process,
) -> Result<()> {
    let receiver = support::receiver::Receiver::start(Some(b"chart-signing-key")).await;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), apps);
    put_secret(
        &secrets,
        "events-key",
        &[("event.notification.signature.key", "chart-signing-key")],
    )
    .await?;
    let code = emu.issue_code(APP_KEY, ACCOUNT, Some(REDIRECT));
    put_secret(&secrets, "flow-code", &[("code", &code)]).await?;
    let mut ingress = OperatorProcess::ingress(ops, &emu.url)
        .env("KUBECONFIG", &ingress_kubeconfig.display().to_string())
        .env_remove("WATCH_NAMESPACE")
        .env("DATA_NAMESPACE", data)
        .env("ALLOWED_CALLBACK_CIDRS", "127.0.0.0/8")
        .env("HEARTBEAT_INTERVAL", "1s")
        .name("chart-ingress")
        .start()
        .await;

    let mut instance = instance_manifest("flow", false)?;
    instance.spec.events = Some(serde_json::from_value(json!({
        "enabled": true, "callbackUrl": receiver.url, "signatureKeySecretRef": {"name": "events-key"}
    }))?);
    let instances: Api<DropboxElementInstance> = Api::namespaced(admin.clone(), apps);
    instances.create(&PostParams::default(), &instance).await?;
    wait_condition(&instances, "flow", "Ready", "True", None)
        .await
        .with_context(|| {
            format!(
                "controller log:\n{}\ningress log:\n{}",
                controller.log_text(),
                ingress.log_text()
            )
        })?;

    emu.upload(ACCOUNT, "/rbac-proof.txt", b"x");
    let response = emu
        .send_webhook(
            &format!("{}/webhooks/dropbox/{APP_KEY}", ingress.url()),
            APP_KEY,
            &[ACCOUNT],
        )
        .await;
    ensure!(
        response.status() == 200,
        "webhook answered {}",
        response.status()
    );
    support::eventually(
        "the event to be delivered",
        Duration::from_secs(30),
        || async { Ok(receiver.accepted()) },
        |d: &Vec<support::receiver::Delivery>| !d.is_empty(),
    )
    .await
    .with_context(|| format!("ingress log:\n{}", ingress.log_text()))?;
    let delivery = &receiver.accepted()[0];
    ensure!(
        delivery.elements_signature_ok == Some(true) && delivery.standard_webhooks_ok == Some(true)
    );
    wait_condition(
        &instances,
        "flow",
        "EventsDelivering",
        "True",
        Some("Delivered"),
    )
    .await?;

    // It renews its heartbeat with its own token.
    let heartbeats: Api<ConfigMap> = Api::namespaced(admin.clone(), data);
    support::eventually(
        "the ingress to renew its heartbeat",
        Duration::from_secs(15),
        || async {
            Ok(heartbeats
                .get(contract::HEARTBEATS_CONFIGMAP)
                .await?
                .data
                .unwrap_or_default())
        },
        |data: &std::collections::BTreeMap<String, String>| !data.is_empty(),
    )
    .await?;
    ingress.terminate(Duration::from_secs(10));
    assert_nothing_forbidden(&ingress.log_text());
    // ...and removed it on the way out.
    let left = heartbeats
        .get(contract::HEARTBEATS_CONFIGMAP)
        .await?
        .data
        .unwrap_or_default();
    ensure!(
        left.keys().all(|k| k == "test"),
        "heartbeat left behind: {left:?}"
    );
    // Leave nothing that wants events behind.
    instances.delete("flow", &DeleteParams::default()).await?;
    support::eventually(
        "flow to be deleted",
        Duration::from_secs(30),
        || support::get_opt(&instances, "flow"),
        Option::is_none,
    )
    .await?;
    Ok(())
}

/// Requests outside the granted permissions are refused with 403 Forbidden.
#[tokio::test]
async fn chart_rbac_refuses_what_it_does_not_grant() -> Result<()> {
    let admin = support::client().await;
    support::install_crd(&admin).await?;
    let ops = support::namespace(&admin, "chart-deny").await;
    let apps = support::namespace(&admin, "chart-deny-apps").await;
    let (controller_kubeconfig, ingress_kubeconfig) = chart_install(&ops, &[]).await?;
    put_secret(
        &Api::namespaced(admin.clone(), &apps),
        "dropbox-app",
        &[("oauth.api.key", APP_KEY), ("oauth.api.secret", APP_SECRET)],
    )
    .await?;
    let controller = client_from(&controller_kubeconfig).await?;
    let ingress = client_from(&ingress_kubeconfig).await?;

    fn forbidden<T: std::fmt::Debug>(what: &str, result: Result<T, kube::Error>) -> Result<()> {
        match result {
            Err(kube::Error::Api(e)) if e.code == 403 => Ok(()),
            other => bail!("{what}: expected 403 Forbidden, got {other:?}"),
        }
    }

    // Ingress: reads the Secrets of its data namespace, and no other: not one
    // placed in the release namespace, not a tenant's.
    let data = data_namespace(&ops);
    put_secret(
        &Api::namespaced(admin.clone(), &data),
        "projected",
        &[("k", "v")],
    )
    .await?;
    put_secret(
        &Api::namespaced(admin.clone(), &ops),
        "release-secret",
        &[("k", "v")],
    )
    .await?;
    ensure!(
        Api::<Secret>::namespaced(ingress.clone(), &data)
            .get("projected")
            .await
            .is_ok(),
        "the ingress token works (get in the data namespace)"
    );
    ensure!(
        Api::<Secret>::namespaced(ingress.clone(), &data)
            .list(&ListParams::default())
            .await
            .is_ok(),
        "the ingress lists its data namespace"
    );
    forbidden(
        "ingress reads a Secret in the release namespace",
        Api::<Secret>::namespaced(ingress.clone(), &ops)
            .get("release-secret")
            .await,
    )?;
    let ingress_secrets: Api<Secret> = Api::namespaced(ingress.clone(), &apps);
    forbidden(
        "ingress reads a Secret in an instance namespace",
        ingress_secrets.get("dropbox-app").await,
    )?;
    forbidden(
        "ingress lists Secrets in the release namespace",
        Api::<Secret>::namespaced(ingress.clone(), &ops)
            .list(&ListParams::default())
            .await,
    )?;
    forbidden(
        "ingress reads the controller's leader Lease",
        Api::<Lease>::namespaced(ingress.clone(), &ops)
            .get(LEADER_LEASE)
            .await,
    )?;
    forbidden(
        "ingress patches a ConfigMap of the release namespace",
        Api::<ConfigMap>::namespaced(ingress.clone(), &ops)
            .patch(
                "kube-root-ca.crt",
                &PatchParams::default(),
                &Patch::Merge(json!({"data": {"x": "y"}})),
            )
            .await,
    )?;
    forbidden(
        "ingress reads an instance",
        Api::<DropboxElementInstance>::namespaced(ingress.clone(), &apps)
            .list(&ListParams::default())
            .await,
    )?;
    forbidden(
        "ingress writes a Secret of its data namespace",
        Api::<Secret>::namespaced(ingress.clone(), &data)
            .delete("projected", &DeleteParams::default())
            .await,
    )?;
    forbidden(
        "ingress lists Secrets",
        ingress_secrets.list(&ListParams::default()).await,
    )?;
    forbidden(
        "ingress lists Secrets everywhere",
        Api::<Secret>::all(ingress.clone())
            .list(&ListParams::default())
            .await,
    )?;
    forbidden(
        "ingress creates a Secret",
        ingress_secrets
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "x"}}))?,
            )
            .await,
    )?;
    forbidden(
        "ingress deletes a Secret",
        ingress_secrets
            .delete("dropbox-app", &DeleteParams::default())
            .await,
    )?;
    forbidden(
        "ingress creates a ConfigMap",
        Api::<ConfigMap>::namespaced(ingress.clone(), &apps)
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": "x"}}))?,
            )
            .await,
    )?;

    // Controller: no Secret deletion, no Deployment outside its namespace or
    // other than the ingress.
    let controller_secrets: Api<Secret> = Api::namespaced(controller.clone(), &apps);
    ensure!(
        controller_secrets
            .list(&ListParams::default())
            .await
            .is_ok(),
        "the controller token works (list)"
    );
    forbidden(
        "controller deletes a Secret outside its namespace",
        controller_secrets
            .delete("dropbox-app", &DeleteParams::default())
            .await,
    )?;
    let deployment = |ns: &str, name: &str| -> Result<Deployment> {
        Ok(serde_json::from_value(json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": name, "namespace": ns},
            "spec": {
                "selector": {"matchLabels": {"app": name}},
                "template": {
                    "metadata": {"labels": {"app": name}},
                    "spec": {"containers": [{"name": "c", "image": "registry.example.com/x:1"}]}
                }
            }
        }))?)
    };
    forbidden(
        "controller creates a Deployment in another namespace",
        Api::<Deployment>::namespaced(controller.clone(), &apps)
            .create(&PostParams::default(), &deployment(&apps, INGRESS_NAME)?)
            .await,
    )?;
    forbidden(
        "controller applies the ingress Deployment in another namespace",
        Api::<Deployment>::namespaced(controller.clone(), &apps)
            .patch(
                INGRESS_NAME,
                &PatchParams::apply("test").force(),
                &Patch::Apply(&deployment(&apps, INGRESS_NAME)?),
            )
            .await,
    )?;
    forbidden(
        "controller applies another Deployment in its namespace",
        Api::<Deployment>::namespaced(controller.clone(), &ops)
            .patch(
                "not-the-ingress",
                &PatchParams::apply("test").force(),
                &Patch::Apply(&deployment(&ops, "not-the-ingress")?),
            )
            .await,
    )?;
    forbidden(
        "controller lists pods",
        Api::<k8s_openapi::api::core::v1::Pod>::namespaced(controller.clone(), &apps)
            .list(&ListParams::default())
            .await,
    )?;
    // ...while the ingress Deployment itself may be applied there (dry run).
    Api::<Deployment>::namespaced(controller.clone(), &ops)
        .patch(
            INGRESS_NAME,
            &PatchParams::apply("test").force().dry_run(),
            &Patch::Apply(&deployment(&ops, INGRESS_NAME)?),
        )
        .await
        .context("controller applies the ingress Deployment in its namespace")?;
    Ok(())
}

/// With watchNamespace, both ServiceAccounts have no access outside that
/// namespace, and the chart creates no cluster-wide grants.
#[tokio::test]
async fn watch_namespace_confines_the_grants() -> Result<()> {
    let admin = support::client().await;
    support::install_crd(&admin).await?;
    let ops = support::namespace(&admin, "chart-scoped").await;
    let apps = support::namespace(&admin, "chart-scoped-apps").await;
    let other = support::namespace(&admin, "chart-scoped-other").await;
    let watch = format!("watchNamespace={apps}");
    chart_install(&ops, &["--set", &watch]).await?;

    let (ok, manifest, err) = run({
        let mut cmd = support::cluster().helm();
        cmd.args(["get", "manifest", &ops, "--namespace", &ops]);
        cmd
    });
    ensure!(ok, "helm get manifest: {err}");
    ensure!(!manifest.contains("kind: ClusterRole"), "{manifest}");

    let controller = controller_sa(&ops);
    check_can_i(
        &ops,
        &controller,
        &[
            ("list", DBXI, &apps, true),
            ("watch", "secrets", &apps, true),
            ("create", "events.events.k8s.io", &apps, true),
            ("list", DBXI, &other, false),
            ("list", DBXI, "", false),
            ("get", "secrets", &other, false),
            ("watch", "secrets", "", false),
            ("create", "configmaps", &other, false),
            ("create", "configmaps", &ops, false),
            ("create", "configmaps", &data_namespace(&ops), true),
            ("get", "secrets", &ops, false),
            ("create", "leases.coordination.k8s.io", &ops, true),
            (
                "patch",
                "deployments.apps/dropbox-webhook-ingress",
                &ops,
                true,
            ),
        ],
    )?;
    let data = data_namespace(&ops);
    check_can_i(
        &ops,
        INGRESS_SA,
        &[
            ("get", "secrets", &data, true),
            ("update", "configmaps", &data, true),
            ("get", "secrets", &ops, false),
            ("update", "configmaps", &ops, false),
            ("list", DBXI, &apps, false),
            ("get", "secrets", &apps, false),
            ("get", "secrets", &other, false),
            ("list", DBXI, "", false),
            ("update", "configmaps", &apps, false),
            ("update", "configmaps", &other, false),
            ("create", "leases.coordination.k8s.io", &ops, false),
        ],
    )?;
    Ok(())
}
