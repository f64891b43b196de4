//! What users look at: the chart's PrometheusRule and Grafana dashboard.
//!
//! - The alert rules pass promtool's unit tests (tests/observability/rules.test.yaml),
//!   with promtool built from Prometheus's Go module (hack/build-tools.sh).
//! - Every metric a rule or a dashboard panel reads, as Prometheus's own PromQL
//!   parser sees it (promql-names, hack/tools/prometheus), is one that the real
//!   controller and ingress export: both run against the test control plane
//!   with an events-enabled instance, and their /metrics are scraped.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, Result, ensure};
use dropbox_operator::api::DropboxElementInstance;
use kube::api::{Api, PostParams};
use serde_json::{Value, json};
use support::chart::{chart_arg, chart_dir, helm_offline, run};

const APP_KEY: &str = "app-key-observability";
const APP_SECRET: &str = "APP-SECRET-0b5e";
const ACCOUNT: &str = "dbid:AAObservability00000000000000000000";
const REDIRECT: &str = "https://www.mycoolapp.com/auth";

/// A tool of hack/build-tools.sh (built by `make testdeps`).
fn tool(name: &str) -> PathBuf {
    let path = support::controlplane::repo_root()
        .join("target/tools/bin")
        .join(name);
    assert!(
        path.exists(),
        "{} is missing: run `make testdeps` (hack/build-tools.sh {name})",
        path.display()
    );
    path
}

/// The PrometheusRule as the chart renders it (release namespace dropbox-system).
fn rendered_rule() -> Result<Value> {
    let mut cmd = helm_offline();
    cmd.args([
        "template",
        "dropbox-operator",
        &chart_arg(),
        "--namespace",
        "dropbox-system",
        "--set",
        "metrics.prometheusRule.enabled=true",
        "--show-only",
        "templates/prometheusrule.yaml",
    ]);
    let (ok, out, err) = run(cmd);
    ensure!(ok, "helm template: {err}");
    Ok(serde_saphyr::from_str(&out)?)
}

/// The dashboard JSON the chart ships (and renders into its ConfigMap).
fn dashboard() -> Result<Value> {
    let path = chart_dir().join("dashboards/dropbox-operator.json");
    Ok(serde_json::from_str(&std::fs::read_to_string(&path)?)?)
}

#[test]
fn alert_rules_pass_promtool_unit_tests() -> Result<()> {
    let rule = rendered_rule()?;
    let dir = tempfile::tempdir()?;
    // promtool reads a rule file: the PrometheusRule's spec (its `groups`).
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_json::to_string_pretty(&rule["spec"])?,
    )?;
    let tests = dir.path().join("rules.test.yaml");
    std::fs::copy(
        support::controlplane::repo_root().join("tests/observability/rules.test.yaml"),
        &tests,
    )?;
    let mut check = std::process::Command::new(tool("promtool"));
    check
        .args(["check", "rules"])
        .arg(dir.path().join("rules.yaml"));
    let (ok, out, err) = run(check);
    ensure!(ok, "promtool check rules:\n{out}{err}");
    let mut test = std::process::Command::new(tool("promtool"));
    test.args(["test", "rules"]).arg(&tests);
    let (ok, out, err) = run(test);
    ensure!(ok, "promtool test rules:\n{out}{err}");
    println!("{out}");

    // Every alert of the rule has a test case that fires it.
    let alerts: BTreeSet<String> = rule["spec"]["groups"][0]["rules"]
        .as_array()
        .context("rules")?
        .iter()
        .filter_map(|r| r["alert"].as_str().map(str::to_owned))
        .collect();
    let tested = std::fs::read_to_string(&tests)?;
    for alert in &alerts {
        ensure!(
            tested.contains(&format!(
                "alertname: {alert}\n        exp_alerts:\n          - "
            )),
            "{alert} has no promtool case in which it fires"
        );
    }
    ensure!(alerts.len() == 7, "{alerts:?}");
    Ok(())
}

/// The sample names a Prometheus text exposition offers to queries: from each
/// `# TYPE` line (a counter's `_total`, a histogram's `_bucket`/`_sum`/`_count`),
/// so a family with no sample yet counts too.
fn exported_names(exposition: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in exposition.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let (Some(name), Some(kind)) = (words.next(), words.next()) else {
            continue;
        };
        match kind {
            "counter" => {
                names.insert(format!("{name}_total"));
            }
            "histogram" => {
                for suffix in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{suffix}"));
                }
            }
            _ => {
                names.insert(name.to_owned());
            }
        }
    }
    names
}

/// What every rule and panel reads: `where` → expression, Grafana's interval
/// variables replaced by durations so that Prometheus's parser accepts them.
fn expressions() -> Result<BTreeMap<String, String>> {
    let mut exprs = BTreeMap::new();
    let rule = rendered_rule()?;
    for group in rule["spec"]["groups"].as_array().context("groups")? {
        for r in group["rules"].as_array().context("rules")? {
            let name = r["alert"]
                .as_str()
                .or(r["record"].as_str())
                .context("name")?;
            exprs.insert(
                format!("rule {name}"),
                r["expr"].as_str().context("expr")?.to_owned(),
            );
        }
    }
    let dash = dashboard()?;
    let mut panels = 0;
    for panel in dash["panels"].as_array().context("panels")? {
        if panel["type"] == "row" {
            continue;
        }
        panels += 1;
        let title = panel["title"].as_str().context("title")?;
        let targets = panel["targets"].as_array().context("targets")?;
        ensure!(!targets.is_empty(), "panel {title:?} has no query");
        for (i, target) in targets.iter().enumerate() {
            let expr = target["expr"]
                .as_str()
                .with_context(|| format!("panel {title:?} target {i}: no expr"))?
                .replace("$__rate_interval", "5m")
                .replace("$__interval", "1m")
                .replace("$__range", "1h");
            ensure!(
                !expr.contains('$'),
                "panel {title:?}: an unknown variable in {expr}"
            );
            exprs.insert(format!("panel {title:?} #{i}"), expr);
        }
    }
    ensure!(panels >= 8, "{panels} panels");
    Ok(exprs)
}

#[tokio::test]
async fn rules_and_panels_read_only_exported_metrics() -> Result<()> {
    // Prometheus's parser names what each expression reads.
    let exprs = expressions()?;
    let mut child = std::process::Command::new(tool("promql-names"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    serde_json::to_writer(child.stdin.take().context("stdin")?, &exprs)?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promql-names: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read: BTreeMap<String, Vec<String>> = serde_json::from_slice(&out.stdout)?;

    // Both binaries, for real, through what the rules and panels watch: a code
    // exchange, a token refresh (short-lived tokens), the ingress's heartbeat,
    // a webhook, and a delivery that fails (nothing listens at the callback).
    // prometheus-client exports a labelled family only once it has a series.
    let (client, ns, emu) =
        support::fixture::emulated_namespace("observability", APP_KEY, APP_SECRET).await;
    emu.add_account(ACCOUNT, "obs@example.com", "Obs");
    emu.add_redirect_uri(APP_KEY, REDIRECT);
    emu.set_access_token_ttl(Duration::from_secs(20));
    let secrets = Api::namespaced(client.clone(), &ns);
    support::put_secret(
        &secrets,
        "dropbox-app",
        &[("oauth.api.key", APP_KEY), ("oauth.api.secret", APP_SECRET)],
    )
    .await?;
    let code = emu.issue_code(APP_KEY, ACCOUNT, Some(REDIRECT));
    support::put_secret(&secrets, "watched-code", &[("code", &code)]).await?;
    let closed_port = support::controlplane::free_port();
    let instances: Api<DropboxElementInstance> = Api::namespaced(client.clone(), &ns);
    let instance: DropboxElementInstance = serde_json::from_value(json!({
        "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
        "kind": "DropboxElementInstance",
        "metadata": {"name": "watched"},
        "spec": {
            "element": {"key": "dropbox"},
            "authentication": {
                "type": "oauth2",
                "appSecretRef": {"name": "dropbox-app"},
                "codeSecretRef": {"name": "watched-code"},
                "callbackUrl": REDIRECT
            },
            "events": {"enabled": true, "callbackUrl": format!("http://127.0.0.1:{closed_port}/events")}
        }
    }))?;
    instances.create(&PostParams::default(), &instance).await?;
    // One waiting for its code: a failing condition (reconcile_errors_total).
    let waiting: DropboxElementInstance = serde_json::from_value(json!({
        "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
        "kind": "DropboxElementInstance",
        "metadata": {"name": "waiting"},
        "spec": {
            "element": {"key": "dropbox"},
            "authentication": {
                "type": "oauth2",
                "appSecretRef": {"name": "dropbox-app"},
                "codeSecretRef": {"name": "waiting-code"},
                "callbackUrl": REDIRECT
            }
        }
    }))?;
    instances.create(&PostParams::default(), &waiting).await?;
    let controller = support::operator::OperatorProcess::new(&ns, &emu.url)
        .start()
        .await;
    let ingress = support::fixture::quick_ingress(&ns, &emu).start().await;
    support::wait_condition(
        &instances,
        "watched",
        "Authorized",
        "True",
        None,
        Duration::from_secs(60),
    )
    .await?;
    let response = emu
        .send_webhook(
            &format!("{}/webhooks/dropbox/{APP_KEY}", ingress.url()),
            APP_KEY,
            &[ACCOUNT],
        )
        .await;
    ensure!(response.status() == 200, "webhook: {}", response.status());
    emu.upload(ACCOUNT, "/report.txt", b"quarterly");
    let _ = emu
        .send_webhook(
            &format!("{}/webhooks/dropbox/{APP_KEY}", ingress.url()),
            APP_KEY,
            &[ACCOUNT],
        )
        .await;
    let controller_metrics = support::eventually(
        "the controller's metrics after a refresh, with the ingress alive",
        Duration::from_secs(60),
        || async { Ok(controller.metrics().await) },
        |m: &String| {
            m.contains("dropbox_operator_ingress_alive 1")
                && m.contains("dropbox_operator_instance_ready{namespace=")
                && m.contains("dropbox_operator_token_refreshes_total{result=\"success\"}")
        },
    )
    .await?;
    let ingress_metrics = support::eventually(
        "the ingress's metrics after a failed delivery",
        Duration::from_secs(60),
        || async { Ok(ingress.metrics().await) },
        |m: &String| m.contains("dropbox_ingress_delivery_failures_total{reason="),
    )
    .await?;
    let mut exported = exported_names(&controller_metrics);
    exported.extend(exported_names(&ingress_metrics));
    ensure!(
        exported.len() >= 20,
        "too few metrics scraped: {exported:?}"
    );

    let mut missing = Vec::new();
    for (place, names) in &read {
        ensure!(!names.is_empty(), "{place} reads no metric");
        for name in names {
            if !exported.contains(name) {
                missing.push(format!("{place}: {name}"));
            }
        }
    }
    ensure!(
        missing.is_empty(),
        "rules or panels read metrics that neither binary exports:\n  {}\nexported: {exported:?}",
        missing.join("\n  ")
    );
    println!(
        "{} expressions read {} metrics, all exported",
        read.len(),
        read.values().flatten().collect::<BTreeSet<_>>().len()
    );
    Ok(())
}

/// The dashboard ConfigMap carries the shipped JSON unchanged, for Grafana's
/// sidecar (its label), and only when asked for.
#[test]
fn the_dashboard_configmap_carries_the_json() -> Result<()> {
    let render = |extra: &[&str]| -> Result<String> {
        let mut cmd = helm_offline();
        cmd.args(["template", "dropbox-operator", &chart_arg()])
            .args(extra);
        let (ok, out, err) = run(cmd);
        ensure!(ok, "helm template {extra:?}: {err}");
        Ok(out)
    };
    let default = render(&[])?;
    ensure!(
        !default.contains("kind: PrometheusRule") && !default.contains("grafana_dashboard"),
        "off by default"
    );
    let out = render(&[
        "--set",
        "metrics.grafanaDashboard.enabled=true",
        "--set",
        "metrics.grafanaDashboard.namespace=monitoring",
        "--show-only",
        "templates/grafana-dashboard.yaml",
    ])?;
    let cm: Value = serde_saphyr::from_str(&out)?;
    ensure!(cm["metadata"]["namespace"] == "monitoring", "{cm}");
    ensure!(cm["metadata"]["labels"]["grafana_dashboard"] == "1", "{cm}");
    let shipped: Value = serde_json::from_str(
        cm["data"]["dropbox-operator.json"]
            .as_str()
            .context("data")?,
    )?;
    ensure!(
        shipped == dashboard()?,
        "the ConfigMap's JSON differs from the file"
    );
    Ok(())
}
