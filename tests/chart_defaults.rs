//! The chart's defaults and knobs with the real helm, kubectl and controller on
//! a real control plane: the default pods meet OpenShift's restricted-v2 and Pod
//! Security `restricted`; the values and docs say what the binary's defaults
//! are; Leases are granted only with leader election; every knob reaches what
//! it configures; a private CA mounted through the controller's extra volumes
//! is trusted by the binary.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result, bail, ensure};
use clap::{CommandFactory, Parser as _};
use dropbox_operator::api::DropboxElementInstance;
use dropbox_operator::cli::{Cli, Command as CliCommand, ControllerArgs, parse_duration};
use dropbox_operator::contract;
use dropbox_operator::controller::ingress::{IngressSettings, ingress_deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::Client;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use support::chart::{
    REDIRECT, chart_dir, controller_process, instance_manifest, render, run, try_install,
};
use support::controlplane::repo_root;
use support::dropbox::Emulator;
use support::put_secret;

const APP_KEY: &str = "app-key-defaults";
const APP_SECRET: &str = "APP-SECRET-5e0b";
const ACCOUNT: &str = "dbid:AADefaultsAccount00000000000000000000";

fn kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"] == kind).collect()
}

fn controller_deployment(docs: &[Value]) -> Result<&Value> {
    docs.iter()
        .find(|d| d["kind"] == "Deployment")
        .context("no Deployment rendered")
}

/// The controller's literal env as rendered.
fn env_of(deployment: &Value) -> Vec<(String, String)> {
    deployment["spec"]["template"]["spec"]["containers"][0]["env"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e["name"].as_str()?.to_owned(),
                e["value"].as_str()?.to_owned(),
            ))
        })
        .collect()
}

/// The rendered env parsed by the binary's own command line.
fn controller_args(env: &[(String, String)]) -> Result<ControllerArgs> {
    let cli = Cli::command();
    let sub = cli.find_subcommand("controller").context("controller")?;
    let args: Vec<&clap::Arg> = cli.get_arguments().chain(sub.get_arguments()).collect();
    let mut argv = vec!["dropbox-operator".to_owned(), "controller".to_owned()];
    for (name, value) in env {
        let arg = args
            .iter()
            .find(|a| a.get_env().is_some_and(|e| e == name.as_str()))
            .with_context(|| format!("`controller` does not read {name}"))?;
        argv.push(format!("--{}={value}", arg.get_long().context("long")?));
    }
    match Cli::try_parse_from(&argv)
        .map_err(|e| anyhow::anyhow!("{argv:?}: {e}"))?
        .command
    {
        CliCommand::Controller(args) => Ok(*args),
        other => bail!("parsed as {other:?}"),
    }
}

/// The ingress pod spec the controller would apply for the rendered env.
fn ingress_pod(env: &[(String, String)]) -> Result<Value> {
    let args = controller_args(env)?;
    let settings = IngressSettings::from_args(&args, "ops".into(), "json");
    settings.validate().map_err(anyhow::Error::msg)?;
    let deployment = serde_json::to_value(ingress_deployment(&settings))?;
    Ok(deployment["spec"]["template"].clone())
}

// ---------------------------------------------------------------------------
// OpenShift restricted-v2 and Pod Security `restricted`.

/// What OpenShift's restricted-v2 SCC refuses or cannot admit in a pod spec,
/// as far as it can be checked without a cluster: a pinned user, group or
/// fsGroup (the SCC assigns them from the namespace's range), SELinux options,
/// host namespaces, privilege, escalation, added capabilities, a seccomp
/// profile other than the runtime's default, and volume types outside its list.
fn restricted_v2_violations(pod: &Value) -> Vec<String> {
    let mut found = Vec::new();
    let spec = &pod["spec"];
    let psc = &spec["securityContext"];
    for key in [
        "runAsUser",
        "runAsGroup",
        "fsGroup",
        "supplementalGroups",
        "seLinuxOptions",
    ] {
        if !psc[key].is_null() {
            found.push(format!("pod securityContext.{key} = {}", psc[key]));
        }
    }
    for key in ["hostNetwork", "hostPID", "hostIPC"] {
        if spec[key] == true {
            found.push(key.to_owned());
        }
    }
    let allowed_volumes = [
        "configMap",
        "downwardAPI",
        "emptyDir",
        "persistentVolumeClaim",
        "projected",
        "secret",
        "ephemeral",
        "csi",
    ];
    for v in spec["volumes"].as_array().into_iter().flatten() {
        let types: Vec<&String> = v
            .as_object()
            .into_iter()
            .flat_map(|o| o.keys())
            .filter(|k| *k != "name")
            .collect();
        if !types.iter().all(|t| allowed_volumes.contains(&t.as_str())) {
            found.push(format!("volume {v}"));
        }
    }
    let pod_seccomp = psc["seccompProfile"]["type"].as_str();
    let containers = spec["containers"].as_array().into_iter().flatten();
    let init = spec["initContainers"].as_array().into_iter().flatten();
    for c in containers.chain(init) {
        let name = c["name"].as_str().unwrap_or("?");
        let sc = &c["securityContext"];
        for key in ["runAsUser", "runAsGroup", "seLinuxOptions"] {
            if !sc[key].is_null() {
                found.push(format!("{name}: securityContext.{key} = {}", sc[key]));
            }
        }
        if sc["privileged"] == true {
            found.push(format!("{name}: privileged"));
        }
        if sc["allowPrivilegeEscalation"] != false {
            found.push(format!("{name}: allowPrivilegeEscalation is not false"));
        }
        if sc["capabilities"]["add"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            found.push(format!("{name}: capabilities added"));
        }
        if !sc["capabilities"]["drop"]
            .as_array()
            .is_some_and(|d| d.iter().any(|c| c == "ALL"))
        {
            found.push(format!("{name}: capabilities not dropped"));
        }
        let seccomp = sc["seccompProfile"]["type"].as_str().or(pod_seccomp);
        if seccomp != Some("RuntimeDefault") {
            found.push(format!("{name}: seccomp {seccomp:?}"));
        }
        if sc["runAsNonRoot"] != true && psc["runAsNonRoot"] != true {
            found.push(format!("{name}: runAsNonRoot not set"));
        }
    }
    found
}

/// The controller's and the ingress's default pods pin no user or group id and
/// meet restricted-v2's other constraints (a pinned id, the old default, is
/// caught; `openshift: true` and an API server serving security.openshift.io
/// drop it), the image runs as a numeric non-root user, and the API server's
/// Pod Security admission admits both pods in a `restricted` namespace (and
/// refuses a pod that is not).
#[tokio::test]
async fn default_pods_meet_restricted_v2_and_pod_security_restricted() -> Result<()> {
    let docs = render("ops", &json!({}), &[])?;
    let controller = controller_deployment(&docs)?["spec"]["template"].clone();
    let ingress = ingress_pod(&env_of(controller_deployment(&docs)?))?;
    for (who, pod) in [("controller", &controller), ("ingress", &ingress)] {
        let v = restricted_v2_violations(pod);
        ensure!(v.is_empty(), "{who}: {v:?}");
    }
    // The checker sees a pinned id (the chart's old default).
    let pinned =
        json!({"podSecurityContext": {"runAsUser": 65532, "runAsGroup": 65532, "fsGroup": 65532}});
    let docs = render("ops", &pinned, &[])?;
    let v = restricted_v2_violations(&controller_deployment(&docs)?["spec"]["template"]);
    ensure!(v.len() == 3, "{v:?}");
    // Dropped for the platform to assign: explicitly, or detected.
    let mut openshift = pinned.clone();
    openshift["openshift"] = json!(true);
    for (values, extra) in [
        (&openshift, &[][..]),
        (&pinned, &["--api-versions", "security.openshift.io/v1"][..]),
    ] {
        let docs = render("ops", values, extra)?;
        let v = restricted_v2_violations(&controller_deployment(&docs)?["spec"]["template"]);
        ensure!(v.is_empty(), "{extra:?}: {v:?}");
    }
    // runAsNonRoot holds only with a numeric non-root USER in the image.
    let dockerfile = std::fs::read_to_string(repo_root().join("Dockerfile"))?;
    let user = dockerfile
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .context("no USER in the Dockerfile")?;
    let uid: u32 = user.split(':').next().unwrap_or("").trim().parse()?;
    ensure!(uid != 0, "USER {user}");

    let admin = support::client().await;
    let ns = support::namespace(&admin, "defaults-pss").await;
    let (ok, _, err) = support::kubectl(&[
        "label",
        "namespace",
        &ns,
        "pod-security.kubernetes.io/enforce=restricted",
    ]);
    ensure!(ok, "{err}");
    let pod = |template: &Value, name: &str| {
        let mut spec = template["spec"].clone();
        // The pod's own ServiceAccount is not the question here.
        spec["serviceAccountName"] = json!("default");
        json!({"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": name, "namespace": ns, "labels": template["metadata"]["labels"]},
               "spec": spec})
        .to_string()
    };
    support::eventually(
        "the default ServiceAccount",
        Duration::from_secs(30),
        || async { Ok(support::kubectl(&["get", "sa", "default", "-n", &ns]).0) },
        |ok: &bool| *ok,
    )
    .await?;
    for (name, template) in [("controller", &controller), ("ingress", &ingress)] {
        let (ok, out, err) = support::kubectl_stdin(
            &["create", "--dry-run=server", "-f", "-"],
            &pod(template, name),
        );
        ensure!(
            ok && err.is_empty(),
            "{name} refused by Pod Security restricted: {out}\n{err}"
        );
    }
    let mut escalating = controller.clone();
    escalating["spec"]["containers"][0]["securityContext"]["allowPrivilegeEscalation"] =
        json!(true);
    let (ok, _, err) = support::kubectl_stdin(
        &["create", "--dry-run=server", "-f", "-"],
        &pod(&escalating, "escalating"),
    );
    ensure!(
        !ok && err.contains("violates PodSecurity"),
        "not enforced: {err}"
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// Values and docs against the binary's defaults.

/// The binary's default for environment variable `env` of `subcommand`.
fn binary_default(subcommand: &str, env: &str) -> Option<String> {
    let cli = Cli::command();
    let sub = cli.find_subcommand(subcommand)?;
    cli.get_arguments()
        .chain(sub.get_arguments())
        .find(|a| a.get_env().is_some_and(|e| e == env))?
        .get_default_values()
        .first()
        .map(|v| v.to_string_lossy().into_owned())
}

/// Same value: durations compared as durations (`PT5M` = `5m`), URLs as URLs.
fn same(a: &str, b: &str) -> bool {
    a == b
        || matches!((parse_duration(a), parse_duration(b)), (Ok(x), Ok(y)) if x == y)
        || matches!((url::Url::parse(a), url::Url::parse(b)), (Ok(x), Ok(y)) if x == y)
}

/// Every setting the chart renders by default is the binary's own default,
/// except the deliberate differences listed here; values.yaml's metrics port
/// is the controller's, and the docs never call 8081 (the ingress's) the
/// controller's.
#[test]
fn values_and_docs_say_what_the_binary_defaults_to() -> Result<()> {
    // Deliberate: JSON logs for collectors; the chart's own objects and names.
    let differ = [
        ("LOG_FORMAT", "json lines for log collectors"),
        (
            "INGRESS_MANAGE_SERVICE",
            "the chart renders the ingress Service",
        ),
    ];
    let docs = render("ops", &json!({}), &[])?;
    let deployment = controller_deployment(&docs)?;
    let mut compared = Vec::new();
    let mut wrong = Vec::new();
    for (name, value) in env_of(deployment) {
        let Some(default) = binary_default("controller", &name) else {
            continue; // no default in the binary: the chart's to choose
        };
        if differ.iter().any(|(n, _)| *n == name) {
            continue;
        }
        compared.push(name.clone());
        if !same(&value, &default) {
            wrong.push(format!(
                "controller {name}: chart {value:?}, binary {default:?}"
            ));
        }
    }
    let pod = ingress_pod(&env_of(deployment))?;
    for e in pod["spec"]["containers"][0]["env"]
        .as_array()
        .context("env")?
    {
        let (Some(name), Some(value)) = (e["name"].as_str(), e["value"].as_str()) else {
            continue;
        };
        let Some(default) = binary_default("ingress", name) else {
            continue;
        };
        // Set by the controller, not the chart (its own tests cover them).
        if differ.iter().any(|(n, _)| *n == name)
            || dropbox_operator::controller::ingress::ESSENTIAL_ENV.contains(&name)
        {
            continue;
        }
        compared.push(format!("ingress {name}"));
        if !same(value, &default) {
            wrong.push(format!(
                "ingress {name}: chart {value:?}, binary {default:?}"
            ));
        }
    }
    ensure!(compared.len() >= 25, "compared only {compared:?}");
    ensure!(wrong.is_empty(), "{}", wrong.join("\n"));

    // Ports: the controller's metrics port, the ingress's two.
    let values: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(chart_dir().join("values.yaml"))?)?;
    let metrics_default = binary_default("controller", "METRICS_ADDR").context("METRICS_ADDR")?;
    ensure!(
        metrics_default.ends_with(&format!(":{}", values["metrics"]["port"])),
        "values.yaml metrics.port {} vs the controller's {metrics_default}",
        values["metrics"]["port"]
    );
    let policies = render("ops", &json!({"networkPolicy": {"enabled": true}}), &[])?;
    let ingress_policy = kind(&policies, "NetworkPolicy")
        .into_iter()
        .find(|p| {
            p["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.ends_with("webhook-ingress"))
        })
        .context("ingress NetworkPolicy")?;
    let ports: Vec<i64> = ingress_policy["spec"]["ingress"]
        .as_array()
        .context("ingress rules")?
        .iter()
        .filter_map(|r| r["ports"][0]["port"].as_i64())
        .collect();
    ensure!(
        ports
            == [
                i64::from(contract::INGRESS_PORT),
                i64::from(contract::INGRESS_METRICS_PORT),
                i64::from(contract::INGRESS_PEER_PORT)
            ],
        "{ports:?}"
    );
    // A sentence of the docs that names 8081 is about the ingress; one that
    // also names the controller gives the controller's own port.
    let controller_port = metrics_default.rsplit(':').next().unwrap_or_default();
    for file in [
        chart_dir().join("values.yaml"),
        chart_dir().join("README.md"),
    ] {
        let text: String = std::fs::read_to_string(&file)?
            .lines()
            .map(|l| {
                l.trim_start()
                    .trim_start_matches('#')
                    .trim_start_matches(" --")
            })
            .collect::<Vec<_>>()
            .join(" ");
        for sentence in text.split(". ").filter(|s| s.contains("8081")) {
            ensure!(
                sentence.contains("ingress")
                    && (!sentence.contains("controller") || sentence.contains(controller_port)),
                "{}: 8081 is the ingress's metrics port, {controller_port} the controller's: {sentence}",
                file.display()
            );
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// Leases.

/// Without leader election the controller holds no right on Leases (it never
/// touches one); with it, create and its one Lease by name. Rendered and asked
/// of the API server.
#[tokio::test]
async fn leases_are_granted_only_with_leader_election() -> Result<()> {
    let off = json!({"leaderElection": {"enabled": false}, "replicas": 1});
    let docs = render("ops", &off, &[])?;
    let rules: Vec<String> = docs
        .iter()
        .filter(|d| matches!(d["kind"].as_str(), Some("Role" | "ClusterRole")))
        .map(|d| d["rules"].to_string())
        .collect();
    ensure!(!rules.iter().any(|r| r.contains("leases")), "{rules:?}");
    let env: BTreeMap<String, String> = env_of(controller_deployment(&docs)?).into_iter().collect();
    ensure!(env["LEADER_ELECT"] == "false");

    let admin = support::client().await;
    support::install_crd(&admin).await?;
    let without = support::namespace(&admin, "defaults-lease-off").await;
    let with = support::namespace(&admin, "defaults-lease-on").await;
    let mut off = off;
    off["watchNamespace"] = json!(without);
    for (ns, values) in [(&without, off), (&with, json!({"watchNamespace": with}))] {
        let (ok, out, err) = try_install(ns, ns, &values)?;
        ensure!(ok, "{out}\n{err}");
    }
    let mut table = Vec::new();
    for (ns, expected) in [(&without, "no"), (&with, "yes")] {
        let sa = format!("system:serviceaccount:{ns}:{ns}-dropbox-operator");
        for what in [
            "create leases",
            "get leases/dropbox-operator-controller",
            "update leases/dropbox-operator-controller",
        ] {
            let mut args = vec!["auth", "can-i"];
            args.extend(what.split(' '));
            args.extend(["-n", ns.as_str(), "--as", sa.as_str()]);
            let (_, out, _) = support::kubectl(&args);
            table.push(format!("{ns:<32} {what:<45} {}", out.trim()));
            ensure!(out.trim() == expected, "{ns}: can-i {what}: {out}");
        }
    }
    eprintln!("{}", table.join("\n"));
    Ok(())
}

// ---------------------------------------------------------------------------
// Knobs.

const DIGEST: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";
const INGRESS_DIGEST: &str =
    "sha256:fedcba9876543210fedcba9876543210fedcba9876543210fedcba9876543210";

fn knob_values(ns: &str) -> Value {
    json!({
        "watchNamespace": ns,
        "commonLabels": {"team": "payments", "cost-center": "42"},
        "extraObjects": [
            {"apiVersion": "v1", "kind": "ConfigMap",
             "metadata": {"name": "{{ .Release.Name }}-extra"}, "data": {"release": "{{ .Release.Name }}"}},
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {{ .Release.Name }}-extra-text\ndata:\n  namespace: {{ .Release.Namespace }}\n"
        ],
        "deploymentAnnotations": {"reloader.stakater.com/auto": "true"},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
        "revisionHistoryLimit": 2,
        "livenessProbe": {"initialDelaySeconds": 15, "periodSeconds": 20, "timeoutSeconds": 3, "failureThreshold": 6},
        "readinessProbe": {"periodSeconds": 5},
        "controller": {
            "extraVolumes": [{"name": "private-ca", "configMap": {"name": "private-ca"}}],
            "extraVolumeMounts": [{"name": "private-ca", "mountPath": "/etc/dropbox-operator/ca", "readOnly": true}],
            "extraEnv": [{"name": "SSL_CERT_DIR", "value": "/etc/dropbox-operator/ca"}]
        },
        "image": {"repository": "acme/dropbox-operator", "digest": DIGEST},
        "webhookIngress": {
            "image": {"repository": "acme/ingress", "digest": INGRESS_DIGEST},
            "autoscaling": {"enabled": true, "minReplicas": 3, "maxReplicas": 7,
                            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60}}},
            "service": {"annotations": {"example.com/owner": "payments"}}
        },
        "metrics": {"serviceMonitor": {
            "enabled": true,
            "honorLabels": true,
            "relabelings": [{"sourceLabels": ["__meta_kubernetes_pod_node_name"], "targetLabel": "node"}],
            "metricRelabelings": [{"sourceLabels": ["__name__"], "regex": "go_.*", "action": "drop"}]
        }}
    })
}

/// Every knob lands where it should in the rendered objects, what goes to the
/// controller is accepted by the binary (and reaches the ingress pods it
/// builds), and the API server accepts the whole render (server-side dry run,
/// with the Prometheus Operator's CRDs stood in for).
#[tokio::test]
async fn every_knob_reaches_what_it_configures() -> Result<()> {
    let values = knob_values("apps");
    let docs = render("knobs", &values, &[])?;
    let d = controller_deployment(&docs)?;
    let mut checks: Vec<(String, bool)> = Vec::new();
    let mut check = |what: &str, ok: bool| checks.push((what.to_owned(), ok));
    let pod = &d["spec"]["template"]["spec"];
    let c = &pod["containers"][0];
    check(
        "extraVolumes",
        pod["volumes"] == values["controller"]["extraVolumes"],
    );
    check(
        "extraVolumeMounts",
        c["volumeMounts"] == values["controller"]["extraVolumeMounts"],
    );
    check(
        "liveness timing",
        c["livenessProbe"]["initialDelaySeconds"] == 15
            && c["livenessProbe"]["periodSeconds"] == 20
            && c["livenessProbe"]["failureThreshold"] == 6
            && c["livenessProbe"]["httpGet"]["path"] == "/healthz",
    );
    check(
        "readiness timing (merged over the defaults)",
        c["readinessProbe"]["periodSeconds"] == 5
            && c["readinessProbe"]["timeoutSeconds"] == 2
            && c["readinessProbe"]["httpGet"]["path"] == "/readyz",
    );
    check(
        "deploymentAnnotations",
        d["metadata"]["annotations"]["reloader.stakater.com/auto"] == "true",
    );
    check("strategy", d["spec"]["strategy"] == values["strategy"]);
    check(
        "revisionHistoryLimit",
        d["spec"]["revisionHistoryLimit"] == 2,
    );
    check(
        "controller image digest",
        c["image"] == format!("acme/dropbox-operator@{DIGEST}"),
    );
    for doc in docs.iter().filter(|d| {
        !d["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n.contains("extra"))
    }) {
        check(
            &format!(
                "commonLabels on {} {}",
                doc["kind"], doc["metadata"]["name"]
            ),
            doc["metadata"]["labels"]["team"] == "payments",
        );
    }
    check(
        "commonLabels on the controller pods",
        d["spec"]["template"]["metadata"]["labels"]["cost-center"] == "42",
    );
    let extra: BTreeMap<&str, &Value> = kind(&docs, "ConfigMap")
        .into_iter()
        .filter_map(|c| Some((c["metadata"]["name"].as_str()?, &c["data"])))
        .collect();
    check(
        "extraObjects (object, templated)",
        extra
            .get("knobs-extra")
            .is_some_and(|d| d["release"] == "knobs"),
    );
    check(
        "extraObjects (string, templated)",
        extra
            .get("knobs-extra-text")
            .is_some_and(|d| d["namespace"] == "knobs"),
    );
    for monitor in kind(&docs, "ServiceMonitor")
        .into_iter()
        .chain(kind(&docs, "PodMonitor"))
    {
        let endpoint = monitor["spec"]["endpoints"][0]
            .as_object()
            .or(monitor["spec"]["podMetricsEndpoints"][0].as_object())
            .cloned()
            .unwrap_or_default();
        let m = &values["metrics"]["serviceMonitor"];
        check(
            &format!("scrape settings of {}: {endpoint:?}", monitor["kind"]),
            endpoint.get("honorLabels") == Some(&json!(true))
                && endpoint.get("relabelings") == Some(&m["relabelings"])
                && endpoint.get("metricRelabelings") == Some(&m["metricRelabelings"]),
        );
    }
    let service = kind(&docs, "Service")
        .into_iter()
        .find(|s| s["metadata"]["name"] == contract::INGRESS_NAME)
        .context("ingress Service")?;
    check(
        "ingress Service annotations",
        service["metadata"]["annotations"]["example.com/owner"] == "payments",
    );
    check(
        "no HPA rendered (the controller makes it)",
        kind(&docs, "HorizontalPodAutoscaler").is_empty(),
    );

    // What the controller gets, through the binary's own parsing (the extra
    // env is for the TLS library, not the command line).
    let env: Vec<(String, String)> = env_of(d)
        .into_iter()
        .filter(|(n, _)| n != "SSL_CERT_DIR")
        .collect();
    let args = controller_args(&env)?;
    check(
        "ingress image digest",
        args.ingress.ingress_image == format!("acme/ingress@{INGRESS_DIGEST}"),
    );
    let spec = args
        .ingress
        .ingress_autoscaler
        .clone()
        .context("INGRESS_AUTOSCALER")?;
    check(
        "autoscaler spec",
        spec["minReplicas"] == 3
            && spec["maxReplicas"] == 7
            && spec["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == 60
            && spec["metrics"][0]["resource"]["name"] == "cpu",
    );
    check(
        "the controller leaves the Service alone",
        !args.ingress.ingress_manage_service,
    );
    let ingress = ingress_pod(&env)?;
    check(
        "commonLabels on the ingress pods",
        ingress["metadata"]["labels"]["team"] == "payments",
    );
    check(
        "ingress selector labels kept",
        ingress["metadata"]["labels"]["app.kubernetes.io/component"] == contract::INGRESS_COMPONENT,
    );
    // Without its own repository or digest, the ingress uses the controller's digest.
    let docs2 = render(
        "knobs",
        &json!({"image": {"repository": "acme/dropbox-operator", "digest": DIGEST}}),
        &[],
    )?;
    let args2 = controller_args(&env_of(controller_deployment(&docs2)?))?;
    check(
        "ingress inherits the controller's digest",
        args2.ingress.ingress_image == format!("acme/dropbox-operator@{DIGEST}"),
    );
    eprintln!(
        "{}",
        checks
            .iter()
            .map(|(what, ok)| format!("{:<6} {what}", if *ok { "ok" } else { "WRONG" }))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let wrong: Vec<&String> = checks
        .iter()
        .filter(|(_, ok)| !ok)
        .map(|(w, _)| w)
        .collect();
    ensure!(wrong.is_empty(), "knobs not applied: {wrong:?}");

    // `helm lint --strict` stays clean with every knob set (and egress on).
    let mut linted = knob_values("apps");
    linted["networkPolicy"] = json!({"enabled": true, "egress": {
        "enabled": true, "apiServerCIDRs": ["10.0.0.1/32"], "dropboxCIDRs": ["162.125.0.0/16"],
        "callbackCIDRs": ["0.0.0.0/0", "::/0"], "extraRules": [{"ports": [{"port": 3128}]}]}});
    let mut cmd = support::chart::helm_offline();
    cmd.args(["lint", "--strict", &support::chart::chart_arg(), "-f"])
        .arg(support::chart::values_file("knobs-lint", &linted)?);
    let (ok, out, err) = run(cmd);
    ensure!(
        ok && !out.contains("[WARNING]") && !out.contains("[ERROR]"),
        "helm lint --strict:\n{out}\n{err}"
    );

    // The API server accepts it all.
    let admin = support::client().await;
    support::install_crd(&admin).await?;
    support::chart::stand_in_crds(&admin).await?;
    let ns = support::namespace(&admin, "defaults-knobs").await;
    let mut cmd = support::chart::helm_offline();
    cmd.args([
        "template",
        &ns,
        &support::chart::chart_arg(),
        "--namespace",
        &ns,
    ])
    .arg("-f")
    .arg(support::chart::values_file("knobs", &knob_values(&ns))?);
    let (ok, rendered, err) = run(cmd);
    ensure!(ok, "{err}");
    // A dry run creates no namespace: the data namespace the chart makes must
    // exist for the objects the chart puts there.
    let (ok, _, err) = support::kubectl(&[
        "create",
        "namespace",
        "--save-config",
        &format!("{ns}-ingress-data"),
    ]);
    ensure!(ok, "{err}");
    let (ok, out, err) =
        support::kubectl_stdin(&["apply", "--dry-run=server", "-f", "-"], &rendered);
    ensure!(ok, "server-side dry run failed:\n{out}\n{err}");
    ensure!(!err.to_lowercase().contains("warning"), "warnings: {err}");
    Ok(())
}

// ---------------------------------------------------------------------------
// A private CA.

/// Plays the kubelet for the controller's ConfigMap volumes: writes each
/// mounted ConfigMap's keys into a directory and returns (mountPath, directory).
async fn mount_configmaps(admin: &Client, ns: &str, dir: &Path) -> Result<Vec<(String, PathBuf)>> {
    let deployment = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(admin.clone(), ns)
        .get(&format!("{ns}-dropbox-operator"))
        .await?;
    let pod = deployment.spec.template.spec.context("pod")?;
    let volumes = pod.volumes.unwrap_or_default();
    let mut mounts = Vec::new();
    for mount in pod.containers[0].volume_mounts.clone().unwrap_or_default() {
        let volume = volumes
            .iter()
            .find(|v| v.name == mount.name)
            .context("volume")?;
        let Some(cm) = &volume.config_map else {
            continue;
        };
        let data = Api::<ConfigMap>::namespaced(admin.clone(), ns)
            .get(&cm.name)
            .await?
            .data
            .unwrap_or_default();
        let target = dir.join(&mount.name);
        std::fs::create_dir_all(&target)?;
        for (key, value) in data {
            std::fs::write(target.join(key), value)?;
        }
        mounts.push((mount.mount_path, target));
    }
    Ok(mounts)
}

/// Dropbox behind TLS signed by a private CA (a TLS-inspecting proxy): with the
/// CA in a ConfigMap (created through `extraObjects`), mounted through
/// `controller.extraVolumes`/`extraVolumeMounts` and named by `SSL_CERT_DIR`
/// (the image's bundle kept in `SSL_CERT_FILE`), the real controller exchanges
/// the code and the instance becomes Ready; without those variables the same
/// controller cannot reach Dropbox (the emulator sees no token request).
#[tokio::test]
async fn a_private_ca_from_extra_volumes_is_trusted() -> Result<()> {
    let admin = support::client().await;
    support::install_crd(&admin).await?;
    let ns = support::namespace(&admin, "defaults-ca").await;
    let emu = Emulator::start().await;
    emu.add_app(APP_KEY, APP_SECRET);
    emu.add_account(ACCOUNT, "ca@example.com", "Private CA");
    let upstream: std::net::SocketAddr = emu.url.trim_start_matches("http://").parse()?;
    let front = support::tls::tls_front(upstream).await;

    let values = json!({
        "watchNamespace": ns,
        "replicas": 1,
        "extraObjects": [{"apiVersion": "v1", "kind": "ConfigMap",
                          "metadata": {"name": "private-ca"}, "data": {"ca.crt": front.ca_pem}}],
        "controller": {
            "extraVolumes": [{"name": "private-ca", "configMap": {"name": "private-ca"}}],
            "extraVolumeMounts": [{"name": "private-ca", "mountPath": "/etc/dropbox-operator/ca", "readOnly": true}],
            "extraEnv": [
                {"name": "SSL_CERT_FILE", "value": "/etc/ssl/certs/ca-certificates.crt"},
                {"name": "SSL_CERT_DIR", "value": "/etc/dropbox-operator/ca"}
            ]
        }
    });
    let (ok, out, err) = try_install(&ns, &ns, &values)?;
    ensure!(ok, "{out}\n{err}");
    let kubelet = tempfile::tempdir()?;
    let mounts = mount_configmaps(&admin, &ns, kubelet.path()).await?;
    ensure!(mounts.len() == 1, "{mounts:?}");
    let (mount_path, host_dir) = &mounts[0];
    let host_dir = host_dir.display().to_string();
    // The rendered SSL_CERT_DIR, with the mount's path as this host sees it.
    let deployment = Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(admin.clone(), &ns)
        .get(&format!("{ns}-dropbox-operator"))
        .await?;
    let env: BTreeMap<String, String> = support::chart::literal_env(&deployment)
        .into_iter()
        .collect();
    let cert_dir = env["SSL_CERT_DIR"].replace(mount_path.as_str(), &host_dir);
    let cert_file = env["SSL_CERT_FILE"].clone();

    let secrets: Api<Secret> = Api::namespaced(admin.clone(), &ns);
    put_secret(
        &secrets,
        "dropbox-app",
        &[("oauth.api.key", APP_KEY), ("oauth.api.secret", APP_SECRET)],
    )
    .await?;
    let code = emu.issue_code(APP_KEY, ACCOUNT, Some(REDIRECT));
    put_secret(&secrets, "ca-code", &[("code", &code)]).await?;
    let instances: Api<DropboxElementInstance> = Api::namespaced(admin.clone(), &ns);
    instances
        .create(&PostParams::default(), &instance_manifest("ca", false)?)
        .await?;

    // Without the CA: the TLS handshake fails, nothing reaches Dropbox.
    let mut without = controller_process(&admin, &ns, &front.url, "ca-without", &[])
        .await?
        .env_remove("SSL_CERT_DIR")
        .env_remove("SSL_CERT_FILE")
        .start()
        .await;
    support::wait_condition(
        &instances,
        "ca",
        "Authorized",
        "False",
        Some("DropboxUnavailable"),
        Duration::from_secs(60),
    )
    .await
    .with_context(|| without.log_text())?;
    ensure!(
        emu.calls_to("/oauth2/token").is_empty(),
        "a token request got through"
    );
    without.terminate(Duration::from_secs(10));

    let mut with = controller_process(
        &admin,
        &ns,
        &front.url,
        "ca-with",
        &[("SSL_CERT_DIR", &cert_dir), ("SSL_CERT_FILE", &cert_file)],
    )
    .await?
    .start()
    .await;
    support::wait_condition(
        &instances,
        "ca",
        "Ready",
        "True",
        None,
        Duration::from_secs(60),
    )
    .await
    .with_context(|| with.log_text())?;
    ensure!(
        emu.calls_to("/oauth2/token").len() == 1,
        "{:?}",
        emu.calls_to("/oauth2/token")
    );
    with.terminate(Duration::from_secs(10));
    Ok(())
}
