//! What the chart refuses at install, with the real helm on a real control
//! plane: values the binary would refuse or silently change at start-up (the
//! schema and templates/validate.yaml), egress lists that would cut a pod off,
//! an admission policy whose API is missing, and a second release in one
//! namespace. And what it accepts: a parent chart's `enabled`.

mod support;

use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use clap::Parser as _;
use dropbox_operator::cli::{Cli, Command as CliCommand};
use dropbox_operator::controller::LeaderElection;
use dropbox_operator::ingress::ssrf::AddressPolicy;
use serde_json::{Value, json};
use support::chart::{chart_dir, helm_offline, render, run, try_install, try_render};

/// A value the binary refuses at start-up, or changes without a word: how to
/// see that with the binary's own code.
enum Binary {
    /// `dropbox-operator <subcommand>` refuses `--flag=value`.
    Refuses(&'static str, &'static str),
    /// The lease timings (duration, grace, deadline in seconds) the controller
    /// would use differ from the configured ones.
    ChangesLease(u64, u64, u64),
    /// The ingress's callback address policy refuses the CIDR.
    RefusesCidr(&'static str),
    /// The binary runs but cannot do its job (named), which no start-up check
    /// catches.
    Breaks(&'static str),
}

/// (values, the value the error must name, what the binary would do)
fn refused() -> Vec<(Value, &'static str, Binary)> {
    use Binary::*;
    vec![
        (
            json!({"webhookIngress": {"longpollTimeout": "29s"}}),
            "webhookIngress.longpollTimeout",
            Refuses("controller", "--ingress-longpoll-timeout=29s"),
        ),
        (
            json!({"webhookIngress": {"longpollTimeout": "9m"}}),
            "webhookIngress.longpollTimeout",
            Refuses("ingress", "--longpoll-timeout=9m"),
        ),
        (
            json!({"webhookIngress": {"longpollTimeout": "30500ms"}}),
            "webhookIngress.longpollTimeout",
            Refuses("ingress", "--longpoll-timeout=30500ms"),
        ),
        (
            json!({"webhookIngress": {"longpollTimeout": "PT8M1S"}}),
            "webhookIngress.longpollTimeout",
            Refuses("ingress", "--longpoll-timeout=PT8M1S"),
        ),
        (
            json!({"webhookIngress": {"longpollTimeout": "two minutes"}}),
            "longpollTimeout",
            Refuses("ingress", "--longpoll-timeout=two minutes"),
        ),
        (
            json!({"controller": {"resyncInterval": "soon"}}),
            "resyncInterval",
            Refuses("controller", "--resync-interval=soon"),
        ),
        (
            json!({"webhookIngress": {"drainTimeout": "30s"}}),
            "webhookIngress.drainTimeout",
            Breaks("the kubelet kills the pod (grace 30 s) before its 30 s drain ends"),
        ),
        (
            json!({"webhookIngress": {"drainTimeout": "50s", "terminationGracePeriodSeconds": 45}}),
            "webhookIngress.drainTimeout",
            Breaks("the kubelet kills the pod (grace 45 s) before its 50 s drain ends"),
        ),
        (
            json!({"webhookIngress": {"heartbeatInterval": "0s"}}),
            "webhookIngress.heartbeatInterval",
            Breaks("a zero tokio interval panics the heartbeat task"),
        ),
        (
            json!({"leaderElection": {"renewDeadline": "11s"}}),
            "leaderElection.renewDeadline",
            ChangesLease(15, 5, 11),
        ),
        (
            json!({"leaderElection": {"leaseDuration": "30s", "renewDeadline": "21s"}}),
            "leaderElection.renewDeadline",
            ChangesLease(30, 5, 21),
        ),
        (
            json!({"leaderElection": {"renewGrace": "15s"}}),
            "leaderElection.renewGrace",
            ChangesLease(15, 15, 10),
        ),
        (
            json!({"leaderElection": {"leaseDuration": "2s", "renewGrace": "1s", "renewDeadline": "1s"}}),
            "leaderElection.leaseDuration",
            ChangesLease(2, 1, 1),
        ),
        (
            json!({"webhookIngress": {"autoscaling": {"enabled": true, "minReplicas": 5, "maxReplicas": 3}}}),
            "webhookIngress.autoscaling.maxReplicas",
            Breaks("the API server refuses an HPA with maxReplicas below minReplicas"),
        ),
        (
            json!({"webhookIngress": {"allowedCallbackCIDRs": ["10.0.0.0/33"]}}),
            "allowedCallbackCIDRs",
            RefusesCidr("10.0.0.0/33"),
        ),
        (
            json!({"webhookIngress": {"deniedCallbackCIDRs": ["300.0.0.0/8"]}}),
            "deniedCallbackCIDRs",
            RefusesCidr("300.0.0.0/8"),
        ),
        (
            json!({"webhookIngress": {"deniedCallbackCIDRs": ["fd00::/129"]}}),
            "deniedCallbackCIDRs",
            RefusesCidr("fd00::/129"),
        ),
        (
            json!({"commonLabels": {"app.kubernetes.io/name": "other"}}),
            "commonLabels",
            Breaks("the controller Deployment's selector would no longer match its pods"),
        ),
    ]
}

/// Checks with the binary's own code that a row is a value it refuses or
/// changes (so the chart's refusal mirrors something real); Err otherwise.
fn binary_disagrees(binary: &Binary) -> Result<String> {
    match binary {
        Binary::Refuses(sub, flag) => {
            let argv = ["dropbox-operator", sub, flag];
            match Cli::try_parse_from(argv) {
                Err(e) => Ok(format!(
                    "refused: {}",
                    e.to_string().lines().next().unwrap_or("")
                )),
                Ok(cli) => match cli.command {
                    CliCommand::Controller(_) | CliCommand::Ingress(_) => {
                        anyhow::bail!("`{}` accepts {flag}", sub)
                    }
                    _ => anyhow::bail!("not {sub}"),
                },
            }
        }
        Binary::ChangesLease(duration, grace, deadline) => {
            let election = LeaderElection {
                namespace: "ops".into(),
                lease_name: "lease".into(),
                identity: "me".into(),
                lease_duration: Duration::from_secs(*duration),
                renew_grace: Duration::from_secs(*grace),
                renew_deadline: Duration::from_secs(*deadline),
            };
            // (lease duration, renew interval, renew deadline) as the elector uses
            // them; the grace shapes the interval and is cut below the duration.
            let used = election.timings();
            let asked = (*duration, *grace, Duration::from_secs(*deadline));
            let changed = used.0 != Duration::from_secs(*duration)
                || used.2 != Duration::from_secs(*deadline)
                || *grace >= used.0.as_secs();
            ensure!(changed, "the controller uses {asked:?} as given");
            Ok(format!("changed: {asked:?} -> {used:?}"))
        }
        Binary::RefusesCidr(cidr) => match AddressPolicy::parse(cidr, "") {
            Err(e) => Ok(format!("refused: {e}")),
            Ok(_) => anyhow::bail!("the ingress accepts {cidr}"),
        },
        Binary::Breaks(why) => Ok((*why).to_owned()),
    }
}

/// Each value the binary would refuse or change at start-up fails `helm
/// template` with a message naming the value; the value next to it (the edge
/// of the range) renders.
#[test]
fn values_the_binary_would_refuse_fail_the_render_naming_them() -> Result<()> {
    let mut table = vec![format!("{:<70} {:<40} binary", "values", "error names")];
    let mut wrong = Vec::new();
    for (values, name, binary) in refused() {
        let why = binary_disagrees(&binary).with_context(|| format!("{values}"))?;
        let (ok, _, err) = try_render("x", "ops", &values, &[])?;
        if ok {
            wrong.push(format!("{values}: rendered"));
        } else if !err.contains(name) {
            wrong.push(format!("{values}: the error does not name {name}: {err}"));
        }
        table.push(format!("{:<70} {:<40} {why}", values.to_string(), name));
    }
    eprintln!("{}", table.join("\n"));
    // The edges of each range render.
    for values in [
        json!({"webhookIngress": {"longpollTimeout": "30s"}}),
        json!({"webhookIngress": {"longpollTimeout": "8m"}}),
        json!({"webhookIngress": {"longpollTimeout": "PT2M"}}),
        json!({"webhookIngress": {"drainTimeout": "29.5s"}}),
        json!({"leaderElection": {"leaseDuration": "15s", "renewDeadline": "10s", "renewGrace": "14s"}}),
        json!({"leaderElection": {"enabled": false, "renewDeadline": "1h"}, "replicas": 1}),
        json!({"webhookIngress": {"autoscaling": {"enabled": true, "minReplicas": 3, "maxReplicas": 3}}}),
        json!({"webhookIngress": {"allowedCallbackCIDRs": ["10.0.0.0/8", "fd00::/8", "::ffff:10.0.0.0/104"]}}),
    ] {
        let (ok, _, err) = try_render("x", "ops", &values, &[])?;
        if !ok {
            wrong.push(format!("{values}: refused: {err}"));
        }
    }
    ensure!(wrong.is_empty(), "{}", wrong.join("\n"));
    Ok(())
}

/// With egress on, an empty CIDR list fails the render and names the list (it
/// used to drop that rule, cutting the pods off); `extraRules` reach both
/// policies.
#[test]
fn egress_with_an_empty_list_fails_and_extra_rules_render() -> Result<()> {
    let egress = |drop: &str| {
        let mut e = json!({
            "enabled": true,
            "apiServerCIDRs": ["10.0.0.1/32"],
            "dropboxCIDRs": ["162.125.0.0/16"],
            "callbackCIDRs": ["0.0.0.0/0"],
            "extraRules": [{"to": [{"ipBlock": {"cidr": "10.9.9.9/32"}}], "ports": [{"port": 3128}]}]
        });
        if !drop.is_empty() {
            e[drop] = json!([]);
        }
        json!({"networkPolicy": {"enabled": true, "egress": e}})
    };
    for list in ["apiServerCIDRs", "dropboxCIDRs", "callbackCIDRs"] {
        let (ok, _, err) = try_render("x", "ops", &egress(list), &[])?;
        ensure!(!ok, "{list} empty: rendered");
        ensure!(
            err.contains(&format!("networkPolicy.egress.{list} is empty")),
            "{list}: {err}"
        );
    }
    let docs = render("ops", &egress(""), &[])?;
    let policies: Vec<&Value> = docs
        .iter()
        .filter(|d| d["kind"] == "NetworkPolicy")
        .collect();
    ensure!(policies.len() == 2, "{policies:?}");
    for p in policies {
        let rules = p["spec"]["egress"].as_array().context("egress")?;
        let cidrs: Vec<&str> = rules
            .iter()
            .flat_map(|r| r["to"].as_array().into_iter().flatten())
            .filter_map(|t| t["ipBlock"]["cidr"].as_str())
            .collect();
        ensure!(
            cidrs.contains(&"10.0.0.1/32")
                && cidrs.contains(&"162.125.0.0/16")
                && cidrs.contains(&"10.9.9.9/32"),
            "{}: {cidrs:?}",
            p["metadata"]["name"]
        );
        let ingress_pods = p["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n.ends_with("webhook-ingress"));
        ensure!(cidrs.contains(&"0.0.0.0/0") == ingress_pods, "{cidrs:?}");
    }
    // The values document the notify host the long-poll uses.
    let values = std::fs::read_to_string(chart_dir().join("values.yaml"))?;
    ensure!(values.contains("notify.dropboxapi.com"));
    Ok(())
}

/// admissionPolicy.enabled without the ValidatingAdmissionPolicy API fails the
/// render (helm template's default capabilities name versions, not kinds), and
/// renders the policy where the API is there (--api-versions, or a real API
/// server: see admission_policy_denies_writes_to_foreign_objects in
/// tests/chart_lifecycle.rs).
#[test]
fn admission_policy_without_its_api_fails_the_render() -> Result<()> {
    let values = json!({"admissionPolicy": {"enabled": true}});
    let (ok, out, err) = try_render("x", "ops", &values, &[])?;
    ensure!(!ok, "rendered without the API:\n{out}");
    ensure!(
        err.contains("admissionPolicy.enabled") && err.contains("ValidatingAdmissionPolicy"),
        "{err}"
    );
    let docs = render(
        "ops",
        &values,
        &[
            "--api-versions",
            "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy",
        ],
    )?;
    for kind in [
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ] {
        ensure!(docs.iter().any(|d| d["kind"] == kind), "no {kind}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// On the control plane.

/// A bad value fails `helm install` on a real API server too, naming it, and
/// leaves no release behind.
#[tokio::test]
async fn a_bad_value_fails_the_install() -> Result<()> {
    let admin = support::client().await;
    support::install_crd(&admin).await?;
    let ns = support::namespace(&admin, "checks-install").await;
    let (ok, out, err) = try_install(
        &ns,
        &ns,
        &json!({"leaderElection": {"renewDeadline": "12s"}}),
    )?;
    ensure!(!ok, "installed:\n{out}");
    ensure!(err.contains("leaderElection.renewDeadline"), "{err}");
    let (_, list, _) = run({
        let mut cmd = support::cluster().helm();
        cmd.args(["list", "-q", "-n", &ns]);
        cmd
    });
    ensure!(list.trim().is_empty(), "a release was left: {list}");
    Ok(())
}

/// A second release in a namespace that has one is refused at install with a
/// message naming the first; the first still upgrades.
#[tokio::test]
async fn a_second_release_in_the_namespace_is_refused() -> Result<()> {
    let admin = support::client().await;
    support::install_crd(&admin).await?;
    let ns = support::namespace(&admin, "checks-two").await;
    let values = json!({"watchNamespace": ns});
    let (ok, out, err) = try_install("first", &ns, &values)?;
    ensure!(ok, "first install: {out}\n{err}");
    // Without the check, helm would stop at the first object the two share by
    // name (the ingress Service) with a message about ownership metadata; the
    // Lease, heartbeats and ingress Deployment (made by the controllers) would
    // be shared without a word.
    let second =
        json!({"watchNamespace": ns, "webhookIngress": {"serviceAccount": {"create": false}}});
    let (ok, out, err) = try_install("second", &ns, &second)?;
    ensure!(!ok, "a second release was installed:\n{out}");
    ensure!(
        err.contains("already has dropbox-operator release \"first\"")
            && err.contains("one release per namespace"),
        "{err}"
    );
    let mut cmd = support::cluster().helm();
    cmd.args(["upgrade", "first", &support::chart::chart_arg(), "-n", &ns])
        .arg("-f")
        .arg(support::chart::values_file("first-upgrade", &values)?);
    let (ok, out, err) = run(cmd);
    ensure!(ok, "upgrade of the first release: {out}\n{err}");
    Ok(())
}

/// A parent chart that lists this one with `condition: dropbox-operator.enabled`
/// (a dependency from a local path, built with `helm dependency build`) renders
/// nothing of it with `enabled: false`, and renders and installs it with
/// `enabled: true` and the parent's own `global` values.
#[tokio::test]
async fn an_umbrella_chart_installs_it_under_its_condition() -> Result<()> {
    let parent = tempfile::tempdir()?;
    std::fs::write(
        parent.path().join("Chart.yaml"),
        format!(
            "apiVersion: v2\nname: platform\nversion: 1.0.0\ndependencies:\n  - name: dropbox-operator\n    version: \"{}\"\n    repository: \"file://{}\"\n    condition: dropbox-operator.enabled\n",
            env!("CARGO_PKG_VERSION"),
            chart_dir().display()
        ),
    )?;
    std::fs::write(
        parent.path().join("values.yaml"),
        "global:\n  imageRegistry: mirror.example.com\n  storageClass: fast\ndropbox-operator:\n  enabled: true\n  replicas: 1\n",
    )?;
    let mut cmd = helm_offline();
    cmd.args(["dependency", "build"]).arg(parent.path());
    let (ok, out, err) = run(cmd);
    ensure!(ok, "helm dependency build: {out}\n{err}");

    let template = |extra: &[&str]| {
        let mut cmd = helm_offline();
        cmd.args(["template", "platform"])
            .arg(parent.path())
            .args(["--namespace", "ops"])
            .args(extra);
        run(cmd)
    };
    let (ok, out, err) = template(&[]);
    ensure!(ok, "enabled: true: {err}");
    ensure!(
        out.contains("kind: Deployment")
            && out.contains("image: \"mirror.example.com/dropbox-operator/dropbox-operator:"),
        "{out}"
    );
    let (ok, out, err) = template(&["--set", "dropbox-operator.enabled=false"]);
    ensure!(ok, "enabled: false: {err}");
    ensure!(
        !out.contains("dropbox-operator"),
        "rendered while disabled:\n{out}"
    );

    let admin = support::client().await;
    support::install_crd(&admin).await?;
    let ns = support::namespace(&admin, "checks-umbrella").await;
    let mut cmd = support::cluster().helm();
    cmd.args(["install", "platform"])
        .arg(parent.path())
        .args(["--namespace", &ns, "--set"])
        .arg(format!("dropbox-operator.watchNamespace={ns}"));
    let (ok, out, err) = run(cmd);
    ensure!(
        ok && out.contains("STATUS: deployed"),
        "helm install: {out}\n{err}"
    );
    let (ok, out, err) = support::kubectl(&[
        "get",
        "deployment",
        "platform-dropbox-operator",
        "-n",
        &ns,
        "-o",
        "jsonpath={.spec.replicas}",
    ]);
    ensure!(ok && out == "1", "{out} {err}");
    Ok(())
}
