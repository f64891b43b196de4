//! The Helm chart's life cycle with the real helm, kubectl and controller on a
//! real control plane: the ingress pod settings (`webhookIngress.*`) reach the
//! `dropbox-webhook-ingress` Deployment the controller makes, field by field;
//! with autoscaling the controller leaves the replicas alone; `helm uninstall`
//! lets the garbage collector remove the ingress objects; `watchNamespaces`
//! confines both ServiceAccounts to a list of namespaces.
//!
//! Its own test binary (so its own control plane): the controllers here watch
//! some namespaces only, but tests/chart.rs runs one over all namespaces, which
//! would manage these instances too.

mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Args as _, CommandFactory, Parser as _};
use dropbox_operator::api::DropboxElementInstance;
use dropbox_operator::cli::{Cli, Command as CliCommand, IngressArgs};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use support::chart::{REDIRECT, chart_arg, helm_offline, instance_manifest, kubeconfig_for, run};
use support::controlplane;
use support::dropbox::Emulator;
use support::operator::{OperatorProcess, Process};
use support::put_secret;

const INGRESS_NAME: &str = "dropbox-webhook-ingress";
const INGRESS_SA: &str = "dropbox-webhook-ingress";
const APP_KEY: &str = "app-key-lifecycle";
const APP_SECRET: &str = "APP-SECRET-9d1e";
const ACCOUNT: &str = "dbid:AALifecycleAccount000000000000000000";
const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const DBXI: &str = "dropboxelementinstances.elements.dropbox-operator.dev";

/// Writes `values` as a values file for helm.
fn values_file(name: &str, values: &Value) -> Result<PathBuf> {
    let dir = controlplane::repo_root().join("target/chart-tests-helm/values");
    std::fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{name}-{}.json", std::process::id()));
    std::fs::write(&path, serde_json::to_vec_pretty(values)?)?;
    Ok(path)
}

/// `helm template` with a values file: the rendered objects.
fn template(namespace: &str, values: &Value) -> Result<Vec<Value>> {
    let file = values_file(namespace, values)?;
    let mut cmd = helm_offline();
    cmd.args([
        "template",
        namespace,
        &chart_arg(),
        "--namespace",
        namespace,
    ])
    .arg("-f")
    .arg(&file);
    let (ok, out, err) = run(cmd);
    ensure!(ok, "helm template failed: {err}");
    Ok(serde_saphyr::from_multiple::<Value>(&out)?
        .into_iter()
        .filter(|v| !v.is_null())
        .collect())
}

/// `helm install` (release name = namespace) with a values file.
fn install(ns: &str, values: &Value) -> Result<String> {
    let file = values_file(ns, values)?;
    let mut cmd = support::cluster().helm();
    cmd.args(["install", ns, &chart_arg(), "--namespace", ns])
        .arg("-f")
        .arg(&file);
    let (ok, out, err) = run(cmd);
    ensure!(ok, "helm install failed:\n{out}\n{err}");
    Ok(out)
}

/// The literal env of the first container of a Deployment.
fn literal_env(deployment: &Deployment) -> Vec<(String, String)> {
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

/// Parses env as `dropbox-operator <subcommand>` flags with the binary's command
/// line: every variable must be one the subcommand reads, with a value it takes.
fn parse_env(subcommand: &str, env: &[(String, String)]) -> Result<CliCommand> {
    let cli = Cli::command();
    let sub = cli.find_subcommand(subcommand).context("subcommand")?;
    let args: Vec<&clap::Arg> = cli.get_arguments().chain(sub.get_arguments()).collect();
    let mut argv = vec!["dropbox-operator".to_owned(), subcommand.to_owned()];
    for (name, value) in env {
        let arg = args
            .iter()
            .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
            .with_context(|| format!("{name} is not read by `{subcommand}`"))?;
        argv.push(format!("--{}={value}", arg.get_long().context("long")?));
    }
    Ok(Cli::try_parse_from(&argv)
        .map_err(|e| anyhow::anyhow!("{argv:?}: {e}"))?
        .command)
}

/// Starts the real controller the way the chart's Deployment runs it: the env
/// of the installed controller Deployment, the token of the chart's controller
/// ServiceAccount; only the metrics address and Dropbox's URL are the test's.
async fn start_controller(ns: &str, admin: &Client, emu: &Emulator, name: &str) -> Result<Process> {
    let fullname = format!("{ns}-dropbox-operator");
    let deployment = Api::<Deployment>::namespaced(admin.clone(), ns)
        .get(&fullname)
        .await?;
    let kubeconfig = kubeconfig_for(ns, &fullname)?;
    let mut process = OperatorProcess::new(ns, &emu.url)
        .env("KUBECONFIG", &kubeconfig.display().to_string())
        .name(name);
    for (key, value) in literal_env(&deployment) {
        if !matches!(
            key.as_str(),
            "METRICS_ADDR" | "DROPBOX_API_URL" | "DROPBOX_WWW_URL"
        ) {
            process = process.env(&key, &value);
        }
    }
    Ok(process.start().await)
}

/// An OAuth instance in `ns` with a fresh code (events to a public callback).
async fn create_instance(
    admin: &Client,
    ns: &str,
    name: &str,
    events: bool,
    emu: &Emulator,
) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
    put_secret(
        &secrets,
        "dropbox-app",
        &[("oauth.api.key", APP_KEY), ("oauth.api.secret", APP_SECRET)],
    )
    .await?;
    let code = emu.issue_code(APP_KEY, ACCOUNT, Some(REDIRECT));
    put_secret(&secrets, &format!("{name}-code"), &[("code", &code)]).await?;
    Api::<DropboxElementInstance>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &instance_manifest(name, events)?)
        .await?;
    Ok(())
}

fn emulator_account(emu: &Emulator) {
    emu.add_app(APP_KEY, APP_SECRET);
    emu.add_account(ACCOUNT, "lifecycle@example.com", "Lifecycle Tester");
}

async fn ingress_deployment(admin: &Client, ns: &str, controller: &Process) -> Result<Deployment> {
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), ns);
    support::eventually(
        "the ingress Deployment",
        Duration::from_secs(60),
        || support::get_opt(&deployments, INGRESS_NAME),
        Option::is_some,
    )
    .await
    .with_context(|| format!("controller log:\n{}", controller.log_text()))?
    .context("deployment")
}

/// Restarts the controller and waits until the new process applied the
/// ingress objects again (its log says so).
async fn restart_controller(
    controller: &mut Process,
    ns: &str,
    admin: &Client,
    emu: &Emulator,
    name: &str,
) -> Result<()> {
    controller.terminate(Duration::from_secs(10));
    *controller = start_controller(ns, admin, emu, name).await?;
    let log = controller.log.clone();
    support::eventually(
        "the restarted controller to apply the ingress",
        Duration::from_secs(60),
        || {
            let log = log.clone();
            async move { Ok(std::fs::read_to_string(&log).unwrap_or_default()) }
        },
        |text: &String| text.contains("webhook ingress Deployment and Service applied"),
    )
    .await?;
    Ok(())
}

fn scale(ns: &str, replicas: u32) -> Result<()> {
    let (ok, _, err) = support::kubectl(&[
        "scale",
        "deployment",
        INGRESS_NAME,
        "-n",
        ns,
        &format!("--replicas={replicas}"),
    ]);
    ensure!(ok, "kubectl scale: {err}");
    Ok(())
}

async fn replicas(admin: &Client, ns: &str) -> Result<Option<i32>> {
    Ok(Api::<Deployment>::namespaced(admin.clone(), ns)
        .get(INGRESS_NAME)
        .await?
        .spec
        .replicas)
}

/// Non-default values for every ingress pod setting.
fn ingress_values(apps: &[&str]) -> Value {
    json!({
        "global": {"imageRegistry": "mirror.example.com"},
        "image": {"repository": "acme/dropbox-operator", "digest": DIGEST},
        "watchNamespaces": apps,
        "webhookIngress": {
            "replicas": 3,
            "logLevel": "debug",
            "logFormat": "text",
            "maxConcurrentWebhooks": 64,
            "webhookBodyTimeout": "7s",
            "webhookBodyBudget": "48Mi",
            "maxConnections": 2048,
            "webhookHeaderTimeout": "4s",
            "webhookIdleTimeout": "90s",
            "webhookHttp2": true,
            "maxConcurrentSyncs": 8,
            "resyncInterval": "90s",
            "drainTimeout": "25s",
            "delivery": {"timeout": "4s", "baseBackoff": "2s", "maxBackoff": "2m"},
            "heartbeatInterval": "3s",
            "terminationGracePeriodSeconds": 45,
            "podLabels": {"team": "payments"},
            "podAnnotations": {"sidecar.istio.io/inject": "false"},
            "priorityClassName": "webhooks-high",
            "nodeSelector": {"node-role.example.com/edge": "true"},
            "tolerations": [{"key": "edge", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [
                    {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64"]}
                ]}]
            }}},
            "extraEnv": [
                {"name": "HTTPS_PROXY", "value": "http://proxy.example.com:3128"},
                {"name": "SSL_CERT_FILE", "value": "/etc/corporate-ca/ca.crt"}
            ],
            "extraVolumes": [{"name": "corporate-ca", "configMap": {"name": "corporate-ca"}}],
            "extraVolumeMounts": [
                {"name": "corporate-ca", "mountPath": "/etc/corporate-ca", "readOnly": true}
            ],
            "podSecurityContext": {"runAsUser": 10001, "fsGroup": 10001},
            "securityContext": {"runAsUser": 10001}
        }
    })
}

// ---------------------------------------------------------------------------
// Without a control plane.

/// The rendered settings are what the binaries accept: the controller's env
/// parses with `controller`, and the ingress container env the controller
/// derives from them parses with `ingress`, with the values' numbers.
#[test]
fn rendered_ingress_settings_are_accepted_by_both_subcommands() -> Result<()> {
    let docs = template("ops", &ingress_values(&["apps", "billing"]))?;
    let deployment: Deployment = serde_json::from_value(
        docs.iter()
            .find(|d| d["kind"] == "Deployment")
            .context("Deployment")?
            .clone(),
    )?;
    let env = literal_env(&deployment);
    let CliCommand::Controller(args) = parse_env("controller", &env)? else {
        bail!("not the controller");
    };
    assert_eq!(args.namespace.as_deref(), Some("apps,billing"));
    assert!(!args.ingress.ingress_autoscaling);
    assert_eq!(
        args.ingress.ingress_owner_deployment.as_deref(),
        Some("ops-dropbox-operator")
    );
    assert_eq!(
        args.ingress.ingress_image,
        format!("mirror.example.com/acme/dropbox-operator@{DIGEST}")
    );
    let container = &deployment
        .spec
        .template
        .spec
        .as_ref()
        .context("pod")?
        .containers[0];
    assert_eq!(
        container.image.as_deref(),
        Some(format!("mirror.example.com/acme/dropbox-operator@{DIGEST}").as_str())
    );

    // What the controller makes of them, parsed as the ingress does.
    let settings = dropbox_operator::controller::ingress::IngressSettings::from_args(
        &args,
        "ops".into(),
        "json",
    );
    settings.validate().map_err(anyhow::Error::msg)?;
    let ingress = dropbox_operator::controller::ingress::ingress_deployment(&settings);
    let ingress_env: Vec<(String, String)> = literal_env(&ingress)
        .into_iter()
        .filter(|(k, _)| !matches!(k.as_str(), "HTTPS_PROXY" | "SSL_CERT_FILE"))
        .collect();
    let CliCommand::Ingress(ingress_args) = parse_env("ingress", &ingress_env)? else {
        bail!("not the ingress");
    };
    let IngressArgs {
        max_concurrent_webhooks,
        webhook_body_timeout,
        webhook_body_budget,
        max_connections,
        webhook_header_timeout,
        webhook_idle_timeout,
        webhook_http2,
        max_concurrent_syncs,
        resync_interval,
        drain_timeout,
        delivery_timeout,
        delivery_base_backoff,
        delivery_max_backoff,
        heartbeat_interval,
        data_namespace,
        ..
    } = *ingress_args;
    assert_eq!(max_concurrent_webhooks, 64);
    assert_eq!(webhook_body_timeout, Duration::from_secs(7));
    assert_eq!(webhook_body_budget, 48 << 20);
    assert_eq!(max_connections, 2048);
    assert_eq!(webhook_header_timeout, Duration::from_secs(4));
    assert_eq!(webhook_idle_timeout, Duration::from_secs(90));
    assert!(webhook_http2);
    assert_eq!(max_concurrent_syncs, 8);
    assert_eq!(resync_interval, Duration::from_secs(90));
    assert_eq!(drain_timeout, Duration::from_secs(25));
    assert_eq!(delivery_timeout, Duration::from_secs(4));
    assert_eq!(delivery_base_backoff, Duration::from_secs(2));
    assert_eq!(delivery_max_backoff, Duration::from_secs(120));
    assert_eq!(heartbeat_interval, Duration::from_secs(3));
    assert_eq!(data_namespace.as_deref(), Some("ops-ingress-data"));
    let env: BTreeMap<String, String> = literal_env(&ingress).into_iter().collect();
    assert_eq!(env["LOG_LEVEL"], "debug");
    assert_eq!(env["LOG_FORMAT"], "text");

    // Defaults: the default settings are the binary's defaults, and the ingress
    // pods spread over nodes (soft).
    let docs = template("ops", &json!({}))?;
    let deployment: Deployment = serde_json::from_value(
        docs.iter()
            .find(|d| d["kind"] == "Deployment")
            .context("Deployment")?
            .clone(),
    )?;
    let env = literal_env(&deployment);
    let template = env
        .iter()
        .find(|(k, _)| k == "INGRESS_POD_TEMPLATE")
        .context("INGRESS_POD_TEMPLATE")?;
    let template: Value = serde_json::from_str(&template.1)?;
    let spread = &template["spec"]["topologySpreadConstraints"][0];
    assert_eq!(spread["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(spread["whenUnsatisfiable"], "ScheduleAnyway");
    let defaults = IngressArgs::augment_args(clap::Command::new("x"));
    for item in template["spec"]["containers"][0]["env"]
        .as_array()
        .context("env")?
    {
        let name = item["name"].as_str().unwrap_or_default();
        if name == "LOG_FORMAT" {
            // Chosen on purpose: in a cluster the chart logs JSON (values.yaml
            // `logFormat`), the binary run by a person logs text.
            continue;
        }
        let Some(arg) = defaults
            .get_arguments()
            .find(|a| a.get_env().is_some_and(|e| e == name))
        else {
            continue;
        };
        let default = arg
            .get_default_values()
            .first()
            .map(|d| d.to_string_lossy().into_owned());
        if let Some(default) = default {
            assert_eq!(
                item["value"].as_str(),
                Some(default.as_str()),
                "values.yaml default of {name} differs from the binary's"
            );
        }
    }
    Ok(())
}

#[test]
fn schema_refuses_bad_ingress_values() {
    for (set, expect) in [
        (
            "webhookIngress.maxConcurrentWebhooks=0",
            "maxConcurrentWebhooks",
        ),
        ("webhookIngress.delivery.timeout=soon", "timeout"),
        ("webhookIngress.logFormat=xml", "logFormat"),
        ("webhookIngress.autoscaling.minReplicas=0", "minReplicas"),
        ("watchNamespaces={Not_A_Namespace}", "watchNamespaces"),
        ("image.digest=latest", "digest"),
        ("webhookIngress.tpyo=1", "tpyo"),
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
}

#[test]
fn helm_lint_strict_is_clean_with_the_new_values() {
    for values in [
        ingress_values(&["apps", "billing"]),
        json!({"webhookIngress": {"autoscaling": {"enabled": true, "targetMemoryUtilizationPercentage": 80}}}),
        json!({"openshift": true}),
        json!({
            "webhookIngress": {"expose": {
                "ingress": {"enabled": true, "hosts": ["hooks.example.com"]},
                "httpRoute": {"enabled": true, "parentRefs": [{"name": "public"}]}
            }},
            "networkPolicy": {"enabled": true, "egress": {"enabled": true, "dropboxCIDRs": ["162.125.0.0/16"]}},
            "admissionPolicy": {"enabled": true}
        }),
    ] {
        let file = values_file("lint", &values).expect("values file");
        let mut cmd = helm_offline();
        cmd.args(["lint", "--strict", &chart_arg()])
            .arg("-f")
            .arg(&file);
        let (ok, out, err) = run(cmd);
        assert!(ok, "helm lint --strict {values} failed:\n{out}\n{err}");
        assert!(
            !out.contains("[WARNING]") && !out.contains("[ERROR]"),
            "{out}"
        );
    }
}

/// Autoscaling hands the controller the HPA to make with the ingress Deployment
/// (INGRESS_AUTOSCALER), tells it to leave the replicas alone, and renders a
/// PDB from minReplicas; OpenShift leaves the user ids to the platform.
#[test]
fn autoscaling_openshift_and_the_placeholder_warning_render() -> Result<()> {
    let docs = template(
        "ops",
        &json!({"webhookIngress": {"replicas": 1, "autoscaling": {"enabled": true, "minReplicas": 3, "maxReplicas": 7}}}),
    )?;
    // The controller makes the HPA with the Deployment (INGRESS_AUTOSCALER).
    assert!(!docs.iter().any(|d| d["kind"] == "HorizontalPodAutoscaler"));
    assert!(docs.iter().any(|d| d["kind"] == "PodDisruptionBudget"
        && d["metadata"]["name"] == "ops-dropbox-operator-webhook-ingress"));
    let deployment: Deployment = serde_json::from_value(
        docs.iter()
            .find(|d| d["kind"] == "Deployment")
            .context("Deployment")?
            .clone(),
    )?;
    let env: BTreeMap<String, String> = literal_env(&deployment).into_iter().collect();
    assert_eq!(env["INGRESS_AUTOSCALING"], "true");
    let hpa = dropbox_operator::controller::autoscaler::autoscaler(
        &serde_json::from_str(&env["INGRESS_AUTOSCALER"])?,
        "ops",
        None,
    )
    .map_err(anyhow::Error::msg)?;
    let spec = hpa.spec;
    assert_eq!(spec.scale_target_ref.name, INGRESS_NAME);
    assert_eq!((spec.min_replicas, spec.max_replicas), (Some(3), 7));
    assert_eq!(
        spec.metrics.unwrap_or_default()[0]
            .resource
            .as_ref()
            .and_then(|r| r.target.average_utilization),
        Some(70)
    );

    let docs = template("ops", &json!({"openshift": true}))?;
    let pod = &docs
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .context("Deployment")?["spec"]["template"]["spec"];
    assert!(pod["securityContext"]["runAsUser"].is_null(), "{pod}");
    assert!(pod["securityContext"]["runAsGroup"].is_null());
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);

    Ok(())
}

// ---------------------------------------------------------------------------
// On the control plane.

/// Every `webhookIngress.*` pod setting, rendered by the real helm and handed to
/// the real controller (run with the chart's env and ServiceAccount token,
/// watching two namespaces), ends up in the Deployment it applies, compared
/// field by field. A `kubectl scale` is undone (replicas are the chart's), and
/// `helm uninstall` lets the garbage collector remove the ingress objects.
#[tokio::test]
async fn ingress_settings_reach_the_deployment_and_uninstall_collects_it() -> Result<()> {
    let admin = support::client().await;
    support::install_crd(&admin).await?;
    let ops = support::namespace(&admin, "lc-settings").await;
    let apps = support::namespace(&admin, "lc-settings-apps").await;
    let billing = support::namespace(&admin, "lc-settings-billing").await;
    let values = ingress_values(&[&apps, &billing]);
    install(&ops, &values)?;
    let emu = Emulator::start().await;
    emulator_account(&emu);
    let mut controller = start_controller(&ops, &admin, &emu, "lc-settings").await?;

    // Instances in both watched namespaces: the controller watches each.
    create_instance(&admin, &apps, "eventful", true, &emu).await?;
    create_instance(&admin, &billing, "plain", false, &emu).await?;
    let plain: Api<DropboxElementInstance> = Api::namespaced(admin.clone(), &billing);
    support::wait_condition(
        &plain,
        "plain",
        "Ready",
        "True",
        None,
        Duration::from_secs(60),
    )
    .await
    .with_context(|| format!("controller log:\n{}", controller.log_text()))?;

    let deployment = ingress_deployment(&admin, &ops, &controller).await?;
    let owner = Api::<Deployment>::namespaced(admin.clone(), &ops)
        .get(&format!("{ops}-dropbox-operator"))
        .await?;
    let d = serde_json::to_value(&deployment)?;
    let spec = &d["spec"];
    let pod = &spec["template"]["spec"];
    let container = pod["containers"]
        .as_array()
        .context("containers")?
        .iter()
        .find(|c| c["name"] == "ingress")
        .context("ingress container")?;
    let env: BTreeMap<String, Value> = container["env"]
        .as_array()
        .context("env")?
        .iter()
        .map(|e| {
            (
                e["name"].as_str().unwrap_or_default().to_owned(),
                e["value"].clone(),
            )
        })
        .collect();
    let w = &values["webhookIngress"];
    let mut wrong = Vec::new();
    let mut check = |what: &str, got: &Value, want: &Value| {
        if got != want {
            wrong.push(format!("{what}: got {got}, want {want}"));
        }
    };
    check("replicas", &spec["replicas"], &w["replicas"]);
    check(
        "image",
        &container["image"],
        &json!(format!("mirror.example.com/acme/dropbox-operator@{DIGEST}")),
    );
    check(
        "pod label team",
        &spec["template"]["metadata"]["labels"]["team"],
        &w["podLabels"]["team"],
    );
    check(
        "selector label kept",
        &spec["template"]["metadata"]["labels"]["app.kubernetes.io/component"],
        &json!("webhook-ingress"),
    );
    check(
        "pod annotations",
        &spec["template"]["metadata"]["annotations"],
        &w["podAnnotations"],
    );
    check(
        "priorityClassName",
        &pod["priorityClassName"],
        &w["priorityClassName"],
    );
    check("nodeSelector", &pod["nodeSelector"], &w["nodeSelector"]);
    check("tolerations", &pod["tolerations"], &w["tolerations"]);
    check("affinity", &pod["affinity"], &w["affinity"]);
    check(
        "terminationGracePeriodSeconds",
        &pod["terminationGracePeriodSeconds"],
        &w["terminationGracePeriodSeconds"],
    );
    check(
        "topologySpreadConstraints (default)",
        &pod["topologySpreadConstraints"][0]["whenUnsatisfiable"],
        &json!("ScheduleAnyway"),
    );
    // (The API server adds defaultMode to the volume.)
    check(
        "volume name",
        &pod["volumes"][0]["name"],
        &w["extraVolumes"][0]["name"],
    );
    check(
        "volume configMap",
        &pod["volumes"][0]["configMap"]["name"],
        &w["extraVolumes"][0]["configMap"]["name"],
    );
    check(
        "volumeMounts",
        &container["volumeMounts"],
        &w["extraVolumeMounts"],
    );
    check(
        "pod runAsUser",
        &pod["securityContext"]["runAsUser"],
        &json!(10001),
    );
    check(
        "pod fsGroup",
        &pod["securityContext"]["fsGroup"],
        &json!(10001),
    );
    check(
        "pod runAsNonRoot (default kept)",
        &pod["securityContext"]["runAsNonRoot"],
        &json!(true),
    );
    check(
        "container runAsUser",
        &container["securityContext"]["runAsUser"],
        &json!(10001),
    );
    check(
        "container readOnlyRootFilesystem (default kept)",
        &container["securityContext"]["readOnlyRootFilesystem"],
        &json!(true),
    );
    check(
        "serviceAccountName",
        &pod["serviceAccountName"],
        &json!(INGRESS_SA),
    );
    check("args", &container["args"], &json!(["ingress"]));
    for (name, want) in [
        ("LOG_LEVEL", json!("debug")),
        ("LOG_FORMAT", json!("text")),
        ("MAX_CONCURRENT_WEBHOOKS", json!("64")),
        ("WEBHOOK_BODY_TIMEOUT", json!("7s")),
        ("WEBHOOK_BODY_BUDGET", json!("48Mi")),
        ("MAX_CONNECTIONS", json!("2048")),
        ("WEBHOOK_HEADER_TIMEOUT", json!("4s")),
        ("WEBHOOK_IDLE_TIMEOUT", json!("90s")),
        ("WEBHOOK_HTTP2", json!("true")),
        ("MAX_CONCURRENT_SYNCS", json!("8")),
        ("RESYNC_INTERVAL", json!("90s")),
        ("DRAIN_TIMEOUT", json!("25s")),
        ("DELIVERY_TIMEOUT", json!("4s")),
        ("DELIVERY_BASE_BACKOFF", json!("2s")),
        ("DELIVERY_MAX_BACKOFF", json!("2m")),
        ("HEARTBEAT_INTERVAL", json!("3s")),
        ("HTTPS_PROXY", json!("http://proxy.example.com:3128")),
        ("SSL_CERT_FILE", json!("/etc/corporate-ca/ca.crt")),
        ("DATA_NAMESPACE", json!(format!("{ops}-ingress-data"))),
    ] {
        check(
            &format!("env {name}"),
            env.get(name).unwrap_or(&Value::Null),
            &want,
        );
    }
    // Owned by the controller's Deployment (the chart's), for the garbage collector.
    let owned_by = |refs: &Value| {
        refs.as_array().is_some_and(|r| {
            r.iter().any(|o| {
                o["kind"] == "Deployment" && o["uid"].as_str() == owner.metadata.uid.as_deref()
            })
        })
    };
    if !owned_by(&d["metadata"]["ownerReferences"]) {
        wrong.push(format!(
            "Deployment ownerReferences: {}",
            d["metadata"]["ownerReferences"]
        ));
    }
    // The Service is the chart's (helm removes it), not the controller's.
    let service = Api::<Service>::namespaced(admin.clone(), &ops)
        .get(INGRESS_NAME)
        .await?;
    let labels = service.metadata.labels.clone().unwrap_or_default();
    if labels
        .get("app.kubernetes.io/managed-by")
        .map(String::as_str)
        != Some("Helm")
        || service.metadata.owner_references.is_some()
    {
        wrong.push(format!("Service not the chart's: {:?}", service.metadata));
    }
    // The heartbeats are in the data namespace (no ownerReference can cross
    // namespaces); it goes with the release.
    let data = format!("{ops}-ingress-data");
    let data_configmaps = Api::<ConfigMap>::namespaced(admin.clone(), &data);
    if data_configmaps
        .get_opt(dropbox_operator::contract::HEARTBEATS_CONFIGMAP)
        .await?
        .is_none()
    {
        wrong.push("no heartbeats ConfigMap in the data namespace".into());
    }
    ensure!(
        wrong.is_empty(),
        "the ingress Deployment differs from the values:\n{}",
        wrong.join("\n")
    );

    // Without autoscaling the replicas are the chart's: a scale is undone on the
    // next apply (here: a restarted controller).
    scale(&ops, 5)?;
    ensure!(replicas(&admin, &ops).await? == Some(5));
    restart_controller(&mut controller, &ops, &admin, &emu, "lc-settings-2").await?;
    ensure!(
        replicas(&admin, &ops).await? == Some(3),
        "the chart's replicas are applied again"
    );

    // Uninstall with an instance still there: the controller's Deployment goes,
    // and with it (garbage collector) the ingress objects.
    let (ok, out, err) = run({
        let mut cmd = support::cluster().helm();
        cmd.args(["uninstall", &ops, "--namespace", &ops, "--wait"]);
        cmd
    });
    ensure!(ok, "helm uninstall: {out}\n{err}");
    controller.terminate(Duration::from_secs(10));
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &ops);
    // The Service is the chart's: helm removes it.
    let services: Api<Service> = Api::namespaced(admin.clone(), &ops);
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(admin.clone());
    support::eventually(
        "helm and the garbage collector to remove the ingress objects, and the data namespace to go",
        Duration::from_secs(60),
        || async {
            Ok((
                deployments.get_opt(INGRESS_NAME).await?.is_some(),
                services.get_opt(INGRESS_NAME).await?.is_some(),
                namespaces
                    .get_opt(&data)
                    .await?
                    .is_some_and(|n| n.metadata.deletion_timestamp.is_none()),
            ))
        },
        |left: &(bool, bool, bool)| *left == (false, false, false),
    )
    .await?;
    ensure!(
        deployments
            .list(&Default::default())
            .await?
            .items
            .is_empty(),
        "a Deployment is left in the release namespace"
    );

    // The controller is gone: the instance keeps its finalizer until it is
    // released by hand, with the command NOTES gives.
    let eventful: Api<DropboxElementInstance> = Api::namespaced(admin.clone(), &apps);
    let (ok, _, err) =
        support::kubectl(&["delete", "dbxi", "eventful", "-n", &apps, "--wait=false"]);
    ensure!(ok, "{err}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(
        eventful.get_opt("eventful").await?.is_some(),
        "the finalizer holds the instance"
    );
    // Off the runtime: the emulator it talks to is served by this test's runtime.
    let (namespace, api) = (apps.clone(), emu.url.clone());
    let release = tokio::task::spawn_blocking(move || {
        std::process::Command::new(support::operator::binary())
            .args(["release-finalizers", "-n", &namespace])
            .env("KUBECONFIG", support::kubeconfig())
            .env("DROPBOX_API_URL", &api)
            .output()
    })
    .await??;
    ensure!(
        release.status.success(),
        "release-finalizers: {} {}",
        String::from_utf8_lossy(&release.stdout),
        String::from_utf8_lossy(&release.stderr)
    );
    support::eventually(
        "eventful to be deleted",
        Duration::from_secs(30),
        || support::get_opt(&eventful, "eventful"),
        Option::is_none,
    )
    .await?;
    Ok(())
}

/// With autoscaling, the controller applies no replicas: a `kubectl scale` (as
/// the HPA does through the scale subresource) survives the controller's next
/// apply, and the controller's field manager does not own `spec.replicas`.
#[tokio::test]
async fn with_autoscaling_the_controller_leaves_the_replicas_alone() -> Result<()> {
    let admin = support::client().await;
    support::install_crd(&admin).await?;
    let ops = support::namespace(&admin, "lc-hpa").await;
    let apps = support::namespace(&admin, "lc-hpa-apps").await;
    install(
        &ops,
        &json!({
            "image": {"repository": "acme/dropbox-operator", "tag": "test"},
            "watchNamespaces": [apps],
            "webhookIngress": {"autoscaling": {"enabled": true, "minReplicas": 2, "maxReplicas": 6}}
        }),
    )?;
    // No HPA before the ingress exists (it would report FailedGetScale).
    let (ok, out, err) = support::kubectl(&["get", "hpa", "-n", &ops, "-o", "name"]);
    ensure!(ok && out.trim().is_empty(), "HPA: {out} {err}");
    let emu = Emulator::start().await;
    emulator_account(&emu);
    let mut controller = start_controller(&ops, &admin, &emu, "lc-hpa").await?;
    create_instance(&admin, &apps, "eventful", true, &emu).await?;
    let deployment = ingress_deployment(&admin, &ops, &controller).await?;
    // The controller made the HPA with it.
    let (ok, out, err) = support::kubectl(&[
        "get",
        "hpa",
        INGRESS_NAME,
        "-n",
        &ops,
        "-o",
        "jsonpath={.spec.scaleTargetRef.name}",
    ]);
    ensure!(ok && out == INGRESS_NAME, "HPA: {out} {err}");
    let owns_replicas = |d: &Deployment| {
        d.metadata.managed_fields.iter().flatten().any(|m| {
            m.manager.as_deref() == Some(dropbox_operator::contract::CONTROLLER_FIELD_MANAGER)
                && m.fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0["f:spec"].get("f:replicas").is_some())
        })
    };
    ensure!(
        !owns_replicas(&deployment),
        "the controller applied spec.replicas: {:?}",
        deployment.metadata.managed_fields
    );

    scale(&ops, 4)?;
    restart_controller(&mut controller, &ops, &admin, &emu, "lc-hpa-2").await?;
    for _ in 0..10 {
        ensure!(
            replicas(&admin, &ops).await? == Some(4),
            "the controller reset the replicas"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let deployment = Api::<Deployment>::namespaced(admin.clone(), &ops)
        .get(INGRESS_NAME)
        .await?;
    ensure!(!owns_replicas(&deployment));
    controller.terminate(Duration::from_secs(10));
    Ok(())
}

/// `kubectl auth can-i` as each ServiceAccount: a list of namespaces gives
/// rights in each of them and nowhere else, and nothing cluster-wide.
#[tokio::test]
async fn watch_namespaces_confine_both_service_accounts() -> Result<()> {
    let admin = support::client().await;
    support::install_crd(&admin).await?;
    let ops = support::namespace(&admin, "lc-scoped").await;
    let a = support::namespace(&admin, "lc-scoped-a").await;
    let b = support::namespace(&admin, "lc-scoped-b").await;
    let other = support::namespace(&admin, "lc-scoped-other").await;
    let notes = install(
        &ops,
        &json!({"watchNamespaces": [a, b], "image": {"repository": "acme/dropbox-operator"}}),
    )?;
    ensure!(
        !notes.contains("WARNING: image.repository") && notes.contains("Uninstall:"),
        "{notes}"
    );
    let (ok, manifest, err) = run({
        let mut cmd = support::cluster().helm();
        cmd.args(["get", "manifest", &ops, "--namespace", &ops]);
        cmd
    });
    ensure!(ok, "{err}");
    ensure!(!manifest.contains("kind: ClusterRole"), "{manifest}");
    let controller = format!("{ops}-dropbox-operator");
    let data = format!("{ops}-ingress-data");
    let own_deployment = format!("deployments.apps/{controller}");
    let mut wrong = Vec::new();
    let mut table = String::from(
        "\ncan-i table (watchNamespaces)\n| account | verb | resource | namespace | expected | answer |\n|---|---|---|---|---|---|\n",
    );
    let questions: Vec<(&str, &str, &str, &str, bool)> = vec![
        (&controller, "list", DBXI, &a, true),
        (&controller, "list", DBXI, &b, true),
        (&controller, "patch", DBXI, &b, true),
        (&controller, "watch", "secrets", &a, true),
        (&controller, "watch", "secrets", &b, true),
        (&controller, "create", "events.events.k8s.io", &b, true),
        (&controller, "list", DBXI, &other, false),
        (&controller, "list", DBXI, "", false),
        (&controller, "get", "secrets", &other, false),
        (
            &controller,
            "get",
            "deployments.apps/dropbox-webhook-ingress",
            &ops,
            true,
        ),
        (&controller, "get", &own_deployment, &ops, true),
        (&controller, "patch", &own_deployment, &ops, false),
        (INGRESS_SA, "watch", DBXI, &a, false),
        (INGRESS_SA, "watch", DBXI, &b, false),
        (INGRESS_SA, "watch", DBXI, &other, false),
        (INGRESS_SA, "list", DBXI, "", false),
        (INGRESS_SA, "get", "secrets", &a, false),
        (INGRESS_SA, "get", "secrets", &ops, false),
        (INGRESS_SA, "watch", "secrets", &data, true),
        (INGRESS_SA, "update", "configmaps", &data, true),
    ];
    for (sa, verb, resource, namespace, expected) in &questions {
        let user = format!("--as=system:serviceaccount:{ops}:{sa}");
        let mut args = vec!["auth", "can-i", *verb, *resource];
        if namespace.is_empty() {
            args.push("--all-namespaces");
        } else {
            args.extend(["-n", *namespace]);
        }
        args.push(&user);
        let (_, out, _) = support::kubectl(&args);
        let answer = out.trim() == "yes";
        table.push_str(&format!(
            "| {sa} | {verb} | {resource} | {} | {expected} | {answer} |\n",
            if namespace.is_empty() {
                "(all)"
            } else {
                namespace
            }
        ));
        if answer != *expected {
            wrong.push(format!("{sa} {verb} {resource} in {namespace:?}: {answer}"));
        }
    }
    let _ = std::io::Write::write_all(&mut std::io::stdout().lock(), table.as_bytes());
    ensure!(wrong.is_empty(), "wrong permissions:\n{}", wrong.join("\n"));
    Ok(())
}

/// The webhook path only, exposed through an Ingress or an HTTPRoute; egress
/// restricted to DNS, the API server, Dropbox and (for the ingress) callbacks.
#[test]
fn webhook_exposure_and_egress_render() -> Result<()> {
    let docs = template(
        "ops",
        &json!({
            "webhookIngress": {"expose": {
                "ingress": {"enabled": true, "className": "public", "hosts": ["hooks.example.com"],
                            "tls": [{"hosts": ["hooks.example.com"], "secretName": "hooks-tls"}]},
                "httpRoute": {"enabled": true, "parentRefs": [{"name": "public", "namespace": "gateways"}],
                              "hostnames": ["hooks.example.com"]}
            }},
            "networkPolicy": {"enabled": true, "egress": {
                "enabled": true, "apiServerCIDRs": ["10.0.0.1/32"], "dropboxCIDRs": ["162.125.0.0/16"],
                "callbackCIDRs": ["203.0.113.0/24"]
            }}
        }),
    )?;
    let ingress = docs
        .iter()
        .find(|d| d["kind"] == "Ingress")
        .context("Ingress")?;
    let rule = &ingress["spec"]["rules"][0];
    assert_eq!(rule["host"], "hooks.example.com");
    let paths = rule["http"]["paths"].as_array().context("paths")?;
    assert_eq!(paths.len(), 1, "the webhook path only");
    assert_eq!(paths[0]["path"], "/webhooks/dropbox");
    assert_eq!(paths[0]["backend"]["service"]["name"], INGRESS_NAME);
    assert_eq!(paths[0]["backend"]["service"]["port"]["name"], "http");
    assert_eq!(ingress["spec"]["ingressClassName"], "public");
    let route = docs
        .iter()
        .find(|d| d["kind"] == "HTTPRoute")
        .context("HTTPRoute")?;
    assert_eq!(
        route["spec"]["rules"][0]["matches"][0]["path"]["value"],
        "/webhooks/dropbox"
    );
    assert_eq!(route["spec"]["rules"][0]["backendRefs"][0]["port"], 80);
    assert_eq!(route["spec"]["parentRefs"][0]["namespace"], "gateways");

    let policies: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "NetworkPolicy")
        .collect();
    assert_eq!(policies.len(), 2);
    for policy in policies {
        let name = policy["metadata"]["name"].as_str().unwrap_or_default();
        assert_eq!(
            policy["spec"]["policyTypes"],
            json!(["Ingress", "Egress"]),
            "{name}"
        );
        let egress = policy["spec"]["egress"].to_string();
        assert!(
            egress.contains("kube-dns") && egress.contains("\"port\":53"),
            "{name}: {egress}"
        );
        assert!(
            egress.contains("10.0.0.1/32") && egress.contains("162.125.0.0/16"),
            "{name}: {egress}"
        );
        assert_eq!(
            egress.contains("203.0.113.0/24"),
            name.ends_with("-webhook-ingress"),
            "callbacks are the ingress's only: {name}: {egress}"
        );
    }
    // Off by default.
    let docs = template("ops", &json!({"networkPolicy": {"enabled": true}}))?;
    assert!(
        !docs
            .iter()
            .any(|d| matches!(d["kind"].as_str(), Some("Ingress" | "HTTPRoute")))
    );
    for policy in docs.iter().filter(|d| d["kind"] == "NetworkPolicy") {
        assert_eq!(policy["spec"]["policyTypes"], json!(["Ingress"]));
    }
    Ok(())
}

/// The exposure and egress objects pass a server-side dry run (Gateway API
/// CRDs are not installed here: the HTTPRoute is checked by rendering only).
#[tokio::test]
async fn exposure_and_egress_pass_a_server_side_dry_run() -> Result<()> {
    let admin = support::client().await;
    support::install_crd(&admin).await?;
    let ops = support::namespace(&admin, "lc-expose").await;
    // A dry run creates nothing: the data namespace must exist for its objects.
    let (ok, _, err) = support::kubectl(&[
        "create",
        "namespace",
        &format!("{ops}-ingress-data"),
        "--save-config",
    ]);
    ensure!(ok, "{err}");
    let file = values_file(
        "expose",
        &json!({
            "webhookIngress": {"expose": {"ingress": {"enabled": true, "hosts": ["hooks.example.com"]}}},
            "networkPolicy": {"enabled": true, "egress": {
                "enabled": true, "apiServerCIDRs": ["10.0.0.1/32"], "dropboxCIDRs": ["162.125.0.0/16"],
                "callbackCIDRs": ["203.0.113.0/24"], "callbackPorts": []
            }}
        }),
    )?;
    let mut cmd = helm_offline();
    cmd.args(["template", &ops, &chart_arg(), "--namespace", &ops])
        .arg("-f")
        .arg(&file);
    let (ok, rendered, err) = run(cmd);
    ensure!(ok, "{err}");
    let (ok, out, err) =
        support::kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &rendered);
    ensure!(ok, "server-side dry run failed:\n{out}\n{err}");
    ensure!(out.contains("ingress.networking.k8s.io/"), "{out}");
    ensure!(!err.to_lowercase().contains("warning"), "warnings: {err}");
    Ok(())
}

/// With admissionPolicy.enabled (the API server serves the v1 API), the
/// operator's ServiceAccounts are denied writes to Secrets and ConfigMaps that
/// are not the operator's, which RBAC alone allows them.
#[tokio::test]
async fn admission_policy_denies_writes_to_foreign_objects() -> Result<()> {
    let admin = support::client().await;
    support::install_crd(&admin).await?;
    let ops = support::namespace(&admin, "lc-vap").await;
    let apps = support::namespace(&admin, "lc-vap-apps").await;
    // A bare local image name, which no registry serves: NOTES warns.
    let notes = install(
        &ops,
        &json!({"admissionPolicy": {"enabled": true}, "image": {"repository": "dropbox-operator"}}),
    )?;
    ensure!(
        notes.contains("WARNING: image.repository") && notes.contains("Uninstall:"),
        "{notes}"
    );
    let (ok, out, err) = support::kubectl(&[
        "get",
        "validatingadmissionpolicy",
        &format!("{ops}-dropbox-operator-owned-objects"),
        "-o",
        "name",
    ]);
    ensure!(
        ok,
        "the policy is rendered where the API exists: {out} {err}"
    );
    put_secret(
        &Api::namespaced(admin.clone(), &apps),
        "dropbox-app",
        &[("oauth.api.key", APP_KEY)],
    )
    .await?;
    let controller = format!("--as=system:serviceaccount:{ops}:{ops}-dropbox-operator");
    let ingress = format!("--as=system:serviceaccount:{ops}:{INGRESS_SA}");
    let secret = |name: &str, managed: bool| {
        let labels = if managed {
            json!({"app.kubernetes.io/managed-by": "dropbox-operator"})
        } else {
            json!({})
        };
        json!({"apiVersion": "v1", "kind": "Secret",
               "metadata": {"name": name, "namespace": apps, "labels": labels},
               "stringData": {"k": "v"}})
        .to_string()
    };
    // A foreign Secret: denied (RBAC allows the controller to create Secrets).
    support::eventually(
        "the policy to deny a foreign Secret",
        Duration::from_secs(30),
        || {
            let manifest = secret("foreign", false);
            let controller = controller.clone();
            async move {
                let (ok, _, err) = support::kubectl_stdin(
                    &["create", "--dry-run=server", &controller, "-f", "-"],
                    &manifest,
                );
                Ok((ok, err))
            }
        },
        |(ok, err): &(bool, String)| !ok && err.contains("dropbox-operator may write only"),
    )
    .await?;
    // Its own token Secret: allowed.
    let (ok, out, err) = support::kubectl_stdin(
        &["create", "--dry-run=server", &controller, "-f", "-"],
        &secret("marketing-dropbox-token", true),
    );
    ensure!(ok, "own token Secret: {out} {err}");
    // A managed label on a foreign name: denied.
    let (ok, _, err) = support::kubectl_stdin(
        &["create", "--dry-run=server", &controller, "-f", "-"],
        &secret("sneaky", true),
    );
    ensure!(!ok && err.contains("may write only"), "{err}");
    // Taking over the user's app Secret by labelling it: denied.
    let (ok, _, err) = support::kubectl(&[
        "label",
        "secret",
        "dropbox-app",
        "-n",
        &apps,
        "app.kubernetes.io/managed-by=dropbox-operator",
        "--dry-run=server",
        &controller,
    ]);
    ensure!(!ok && err.contains("may write only"), "{err}");
    // The ingress may update ConfigMaps in its data namespace (RBAC cannot
    // narrow that to the cursors); the policy can.
    let configmap = json!({"apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "someone-elses", "namespace": format!("{ops}-ingress-data")},
        "data": {"k": "v"}});
    let (ok, _, err) = support::kubectl_stdin(&["create", "-f", "-"], &configmap.to_string());
    ensure!(ok, "{err}");
    let mut changed = configmap.clone();
    changed["data"]["k"] = json!("overwritten");
    let (ok, _, err) = support::kubectl_stdin(
        &["replace", "--dry-run=server", &ingress, "-f", "-"],
        &changed.to_string(),
    );
    ensure!(!ok && err.contains("may write only"), "{err}");
    // The admin is not affected.
    let (ok, _, err) = support::kubectl_stdin(
        &["create", "--dry-run=server", "-f", "-"],
        &secret("foreign", false),
    );
    ensure!(ok, "{err}");
    Ok(())
}

/// Starts an ingress process the way the Deployment the controller made runs
/// its container: that container's literal env (the chart's settings merged by
/// the controller), the chart's ingress ServiceAccount token; addresses,
/// Dropbox's URL and the heartbeat are the test's.
async fn start_ingress_from(
    deployment: &Deployment,
    ns: &str,
    emu: &Emulator,
    name: &str,
) -> Result<Process> {
    let kubeconfig = kubeconfig_for(ns, INGRESS_SA)?;
    let mut process = OperatorProcess::ingress(ns, &emu.url)
        .env("KUBECONFIG", &kubeconfig.display().to_string())
        .name(name);
    for (key, value) in literal_env(deployment) {
        if !matches!(
            key.as_str(),
            "LISTEN_ADDR"
                | "METRICS_ADDR"
                | "PEER_LISTEN_ADDR"
                | "DROPBOX_API_URL"
                | "HEARTBEAT_INTERVAL"
        ) {
            process = process.env(&key, &value);
        }
    }
    Ok(process.env("HEARTBEAT_INTERVAL", "1s").start().await)
}

fn delivered_paths(receiver: &support::receiver::Receiver) -> Vec<String> {
    receiver
        .accepted_events()
        .iter()
        .filter_map(|e| e["data"]["path_display"].as_str().map(str::to_owned))
        .collect()
}

/// `helm upgrade` with changed replicas and ingress settings, rolled the way
/// Kubernetes would (new controller, which re-applies the ingress Deployment;
/// new ingress replica from it; old one drained): the instance stays Ready and
/// every change is delivered, before, during and after the roll.
#[tokio::test]
async fn helm_upgrade_with_changed_values_loses_no_event() -> Result<()> {
    let admin = support::client().await;
    support::install_crd(&admin).await?;
    let ops = support::namespace(&admin, "lc-upgrade").await;
    let apps = support::namespace(&admin, "lc-upgrade-apps").await;
    let values = |replicas: u32, syncs: u32, timeout: &str| {
        json!({
            "image": {"repository": "acme/dropbox-operator", "tag": "test"},
            "watchNamespaces": [apps],
            "webhookIngress": {
                "replicas": replicas,
                "allowedCallbackCIDRs": ["127.0.0.0/8"],
                "maxConcurrentSyncs": syncs,
                "delivery": {"timeout": timeout},
                "podLabels": {"revision": format!("r{replicas}")}
            }
        })
    };
    install(&ops, &values(2, 32, "10s"))?;
    let emu = Emulator::start().await;
    emulator_account(&emu);
    let receiver = support::receiver::Receiver::start(Some(b"upgrade-key")).await;
    let mut controller = start_controller(&ops, &admin, &emu, "lc-upgrade").await?;
    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &apps);
    put_secret(
        &secrets,
        "events-key",
        &[("event.notification.signature.key", "upgrade-key")],
    )
    .await?;
    put_secret(
        &secrets,
        "dropbox-app",
        &[("oauth.api.key", APP_KEY), ("oauth.api.secret", APP_SECRET)],
    )
    .await?;
    let code = emu.issue_code(APP_KEY, ACCOUNT, Some(REDIRECT));
    put_secret(&secrets, "flow-code", &[("code", &code)]).await?;
    let instance: DropboxElementInstance = serde_json::from_value(json!({
        "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
        "kind": "DropboxElementInstance",
        "metadata": {"name": "flow"},
        "spec": {
            "element": {"key": "dropbox"},
            "authentication": {"type": "oauth2", "appSecretRef": {"name": "dropbox-app"},
                               "codeSecretRef": {"name": "flow-code"}, "callbackUrl": REDIRECT},
            "events": {"enabled": true, "callbackUrl": receiver.url,
                       "signatureKeySecretRef": {"name": "events-key"}}
        }
    }))?;
    let instances: Api<DropboxElementInstance> = Api::namespaced(admin.clone(), &apps);
    instances.create(&PostParams::default(), &instance).await?;
    let before = ingress_deployment(&admin, &ops, &controller).await?;
    let mut old_ingress = start_ingress_from(&before, &ops, &emu, "lc-upgrade-ingress-1").await?;
    support::wait_condition(
        &instances,
        "flow",
        "Ready",
        "True",
        None,
        Duration::from_secs(60),
    )
    .await
    .with_context(|| {
        format!(
            "controller log:\n{}\ningress log:\n{}",
            controller.log_text(),
            old_ingress.log_text()
        )
    })?;
    let webhook = |ingress: &Process| format!("{}/webhooks/dropbox/{APP_KEY}", ingress.url());
    let notify = |url: String| {
        let emu = &emu;
        async move {
            let response = emu.send_webhook(&url, APP_KEY, &[ACCOUNT]).await;
            ensure!(
                response.status() == 200,
                "webhook answered {}",
                response.status()
            );
            Ok(())
        }
    };
    emu.upload(ACCOUNT, "/before.txt", b"1");
    notify(webhook(&old_ingress)).await?;

    // The upgrade: more replicas, other ingress settings.
    let file = values_file(&format!("{ops}-v2"), &values(3, 4, "5s"))?;
    let mut cmd = support::cluster().helm();
    cmd.args(["upgrade", &ops, &chart_arg(), "--namespace", &ops])
        .arg("-f")
        .arg(&file);
    let (ok, out, err) = run(cmd);
    ensure!(ok, "helm upgrade failed:\n{out}\n{err}");
    // A change while the roll is under way, to the old ingress.
    emu.upload(ACCOUNT, "/during.txt", b"2");
    notify(webhook(&old_ingress)).await?;
    // The controller's pods are replaced (its env changed): the new one
    // re-applies the ingress Deployment with the new settings.
    restart_controller(&mut controller, &ops, &admin, &emu, "lc-upgrade-2").await?;
    let deployments: Api<Deployment> = Api::namespaced(admin.clone(), &ops);
    let after = support::eventually(
        "the ingress Deployment with the new settings",
        Duration::from_secs(60),
        || support::get_opt(&deployments, INGRESS_NAME),
        |d: &Option<Deployment>| {
            d.as_ref().is_some_and(|d| {
                d.spec.replicas == Some(3)
                    && literal_env(d)
                        .iter()
                        .any(|(k, v)| k == "MAX_CONCURRENT_SYNCS" && v == "4")
            })
        },
    )
    .await?
    .context("deployment")?;
    let env: BTreeMap<String, String> = literal_env(&after).into_iter().collect();
    ensure!(env["DELIVERY_TIMEOUT"] == "5s", "{env:?}");
    // The ingress rolls: a new replica with the new settings, then the old one
    // drains and stops.
    let new_ingress = start_ingress_from(&after, &ops, &emu, "lc-upgrade-ingress-2").await?;
    emu.upload(ACCOUNT, "/rolling.txt", b"3");
    notify(webhook(&new_ingress)).await?;
    ensure!(
        old_ingress.terminate(Duration::from_secs(30)),
        "the old ingress drained and exited"
    );
    emu.upload(ACCOUNT, "/after.txt", b"4");
    notify(webhook(&new_ingress)).await?;

    let want = ["/before.txt", "/during.txt", "/rolling.txt", "/after.txt"];
    support::eventually(
        "every change to be delivered",
        Duration::from_secs(60),
        || async { Ok(delivered_paths(&receiver)) },
        |paths: &Vec<String>| want.iter().all(|w| paths.iter().any(|p| p == w)),
    )
    .await
    .with_context(|| {
        format!(
            "controller log:\n{}\nnew ingress log:\n{}",
            controller.log_text(),
            new_ingress.log_text()
        )
    })?;
    ensure!(
        receiver
            .accepted()
            .iter()
            .all(|d| d.elements_signature_ok == Some(true)),
        "every delivery is signed with the key"
    );
    let flow = instances.get("flow").await?;
    ensure!(
        support::condition_is(&flow, "Ready", "True", None),
        "the instance stays Ready: {:?}",
        flow.status
    );
    Ok(())
}
