//! Credential lifecycle guarantees, proven by faults (README, "Conditions and
//! reasons" and "Security"): a single-use code is never sent twice, a working
//! instance never breaks or flaps, and deletion always revokes.
//!
//! One test runs every fault in turn against the real control plane, real
//! controller (and, where events are on, ingress) processes and the Dropbox
//! emulator. Each row gets a namespace of its own for its instances, one for the
//! operator (leader Lease, projections) and an emulator of its own, so its
//! counts are its own. At the end it prints one table:
//!
//! fault | instances | codes sent twice | instances not Ready at the end |
//! tokens not revoked | panics
//!
//! - codes sent twice: codes the emulator saw at `/oauth2/token` more than once;
//! - not Ready at the end: after the fault is lifted (and, where Dropbox consumed
//!   a code without the controller storing its tokens, after a new code is put
//!   in the code Secret), instances whose Ready is not True within a timeout;
//! - tokens not revoked: for rows that delete instances, access tokens the
//!   emulator minted that it still accepts afterwards;
//! - panics: "panicked" in the logs of every operator process of the row.
//!
//! Every count after `instances` must be 0; checks a row makes beyond the table
//! (reasons, events, flaps, writes) are printed under it and must hold too.

mod support;

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use dropbox_operator::api::DropboxElementInstance;
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Namespace, ResourceQuota, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use serde_json::json;
use support::dropbox::Emulator;
use support::operator::{OperatorProcess, Process};

const APP_KEY: &str = "app-key-credentials";
const APP_SECRET: &str = "APP-SECRET-c4ed";
const ACCOUNT: &str = "dbid:AAC-credentials-00000000000000000001";
const REDIRECT: &str = "https://www.mycoolapp.com/auth";
const CALLBACK: &str = "https://receiver.example.com/dropbox";
const DEFAULT_SCOPE: &str = "account_info.read files.metadata.read";
/// An apiKey with spaces: Dropbox answers 400 "Invalid authorization value".
const MALFORMED_KEY: &str = "paste the Dropbox token here";
/// How long an instance may take to become Ready once nothing stands in its way.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Default)]
struct Row {
    fault: String,
    instances: usize,
    codes_twice: usize,
    not_ready: usize,
    not_revoked: usize,
    panics: usize,
    /// Checks beyond the table that failed (each must be empty), and errors.
    notes: Vec<String>,
    seconds: f64,
}

/// What a row reports; the runner adds codes sent twice and panics.
#[derive(Default)]
struct Outcome {
    not_ready: usize,
    not_revoked: usize,
    notes: Vec<String>,
}

#[test]
fn credential_lifecycle_survives_faults() {
    support::run_blocking(run());
}

const ROWS: [(&str, &str); 15] = [
    ("long-names", "70-character instance names"),
    (
        "quota",
        "ResourceQuota refuses the token Secret, then lifted",
    ),
    (
        "vap",
        "ValidatingAdmissionPolicy refuses the token Secret, then removed",
    ),
    (
        "hang",
        "Dropbox times out after consuming the code; new code",
    ),
    (
        "sigkill",
        "controller SIGKILL between exchange and storage; new code",
    ),
    ("apiserver", "kube-apiserver restarted mid-exchange"),
    (
        "apiserver-long",
        "kube-apiserver down past the renew deadline mid-exchange; new code",
    ),
    ("failover", "leader failover with 100 instances mid-refresh"),
    ("spent-code", "spent code Secret deleted after Ready"),
    ("ns-delete", "namespace deleted with 20 instances"),
    ("foreground", "foreground-cascade deletion of an instance"),
    (
        "expiry",
        "token Secret expires_at -9999-01-01 / +9999-12-31",
    ),
    ("apikey", "apiKey malformed (400), then fixed"),
    (
        "scope",
        "app without files.metadata.read, events on; then granted",
    ),
    (
        "restarts",
        "5 controller restarts, events-enabled instances Ready",
    ),
];

async fn run_row(tag: &str, c: &mut Ctx) -> Result<Outcome> {
    match tag {
        "long-names" => long_names(c).await,
        "quota" => quota(c).await,
        "vap" => admission_policy(c).await,
        "hang" => hang_after_consuming(c).await,
        "sigkill" => sigkill_mid_exchange(c).await,
        "apiserver" => apiserver_restart(c, false).await,
        "apiserver-long" => apiserver_restart(c, true).await,
        "failover" => failover(c).await,
        "spent-code" => spent_code_deleted(c).await,
        "ns-delete" => namespace_deleted(c).await,
        "foreground" => foreground_delete(c).await,
        "expiry" => absurd_expiry(c).await,
        "apikey" => malformed_api_key(c).await,
        "scope" => missing_scope(c).await,
        "restarts" => restarts(c).await,
        other => bail!("no row {other}"),
    }
}

async fn run() -> Result<()> {
    let started = Instant::now();
    let client = support::client().await;
    support::install_crd(&client).await?;
    let only = std::env::var("CREDENTIALS_ROWS").ok();
    let mut table = Vec::new();
    for (tag, fault) in ROWS {
        if only
            .as_deref()
            .is_some_and(|o| !o.split(',').any(|t| t == tag))
        {
            continue;
        }
        let row_started = Instant::now();
        eprintln!("--- {fault}");
        let mut ctx = Ctx::new(&client, tag).await?;
        let outcome = match run_row(tag, &mut ctx).await {
            Ok(o) => o,
            Err(e) => Outcome {
                not_ready: ctx.created.len(),
                notes: vec![format!("error: {e:#}")],
                ..Outcome::default()
            },
        };
        // The row's processes have stopped (dropped); their logs remain.
        let r = Row {
            fault: fault.to_owned(),
            instances: ctx.created.len(),
            codes_twice: ctx.codes_twice(),
            not_ready: outcome.not_ready,
            not_revoked: outcome.not_revoked,
            panics: ctx.panics(),
            notes: outcome.notes,
            seconds: row_started.elapsed().as_secs_f64(),
        };
        eprintln!("{r:?}");
        table.push(r);
    }
    print_table(&table, started.elapsed());
    let bad: Vec<&Row> = table
        .iter()
        .filter(|r| {
            r.codes_twice + r.not_ready + r.not_revoked + r.panics > 0 || !r.notes.is_empty()
        })
        .collect();
    if !bad.is_empty() {
        let faults: Vec<&str> = bad.iter().map(|r| r.fault.as_str()).collect();
        bail!("credential guarantees broken (see the table above): {faults:?}");
    }
    Ok(())
}

fn print_table(rows: &[Row], took: Duration) {
    let width = rows.iter().map(|r| r.fault.len()).max().unwrap_or(5).max(5);
    let mut out = format!(
        "\ncredential lifecycle under faults (real control plane, controller processes, Dropbox emulator; {:.0} s)\n",
        took.as_secs_f64()
    );
    out += &format!(
        "| {:width$} | {:>9} | {:>16} | {:>30} | {:>18} | {:>6} |\n",
        "fault",
        "instances",
        "codes sent twice",
        "instances not Ready at the end",
        "tokens not revoked",
        "panics"
    );
    out += &format!(
        "|{}|-----------|------------------|--------------------------------|--------------------|--------|\n",
        "-".repeat(width + 2)
    );
    for r in rows {
        out += &format!(
            "| {:width$} | {:>9} | {:>16} | {:>30} | {:>18} | {:>6} |\n",
            r.fault, r.instances, r.codes_twice, r.not_ready, r.not_revoked, r.panics
        );
    }
    let notes: Vec<String> = rows
        .iter()
        .flat_map(|r| r.notes.iter().map(move |n| format!("- {}: {n}", r.fault)))
        .collect();
    if notes.is_empty() {
        out += "\nall further checks held\n";
    } else {
        out += "\nfurther checks that failed:\n";
        for n in notes {
            out += &n;
            out.push('\n');
        }
    }
    out += "\nrow times: ";
    out += &rows
        .iter()
        .map(|r| format!("{:.0}s", r.seconds))
        .collect::<Vec<_>>()
        .join(", ");
    out += "\n\n";
    let _ = std::io::stdout().lock().write_all(out.as_bytes());
}

// ---- the world of one row -------------------------------------------------------

struct Ctx {
    client: Client,
    /// Where the instances and their Secrets live.
    ns: String,
    /// The operator's namespace (leader Lease, projections, heartbeats).
    ops: String,
    emu: Emulator,
    instances: Api<DropboxElementInstance>,
    secrets: Api<Secret>,
    /// Every operator process log of the row (processes may be gone).
    logs: Vec<PathBuf>,
    /// Names of the instances created.
    created: Vec<String>,
}

impl Ctx {
    async fn new(client: &Client, tag: &str) -> Result<Ctx> {
        let ns = support::namespace(client, &format!("cred-{tag}")).await;
        let ops = support::namespace(client, &format!("cred-{tag}-ops")).await;
        let emu = Emulator::start().await;
        emu.add_app(APP_KEY, APP_SECRET);
        emu.add_account(ACCOUNT, "ada@example.com", "Ada Lovelace");
        let ctx = Ctx {
            client: client.clone(),
            instances: Api::namespaced(client.clone(), &ns),
            secrets: Api::namespaced(client.clone(), &ns),
            ns,
            ops,
            emu,
            logs: Vec::new(),
            created: Vec::new(),
        };
        ctx.put_secret(
            "dropbox-app",
            &[("oauth.api.key", APP_KEY), ("oauth.api.secret", APP_SECRET)],
        )
        .await?;
        Ok(ctx)
    }

    /// A controller for the row, with short timeouts everywhere.
    fn controller(&self, name: &str) -> OperatorProcess {
        OperatorProcess::new(&self.ns, &self.emu.url)
            .name(name)
            .env("POD_NAMESPACE", &self.ops)
            .env("DROPBOX_TIMEOUT", "2s")
            .env("REVOKE_TIMEOUT", "3s")
            .env("MAX_BACKOFF", "2s")
            .env("LEASE_DURATION", "4s")
            .env("LEASE_RENEW_GRACE", "2s")
            .env("LEASE_RENEW_DEADLINE", "3s")
            .env("INGRESS_REPLICAS", "0")
    }

    async fn start(&mut self, process: OperatorProcess) -> Process {
        let p = process.start().await;
        self.logs.push(p.log.clone());
        p
    }

    async fn start_controller(&mut self, name: &str) -> Process {
        let c = self.controller(name);
        self.start(c).await
    }

    async fn start_ingress(&mut self) -> Process {
        let i = OperatorProcess::ingress(&self.ns, &self.emu.url)
            .env("POD_NAMESPACE", &self.ops)
            .env("HEARTBEAT_INTERVAL", "1s")
            .env("DROPBOX_TIMEOUT", "2s");
        self.start(i).await
    }

    async fn put_secret(&self, name: &str, data: &[(&str, &str)]) -> Result<()> {
        support::put_secret(&self.secrets, name, data).await
    }

    /// A fresh code for the account, stored in Secret `name`.
    async fn code(&self, name: &str) -> Result<String> {
        let code = self.emu.issue_code(APP_KEY, ACCOUNT, Some(REDIRECT));
        self.put_secret(name, &[("code", &code)]).await?;
        Ok(code)
    }

    async fn create(
        &mut self,
        name: &str,
        authentication: serde_json::Value,
        events: bool,
    ) -> Result<()> {
        let mut spec = json!({"element": {"key": "dropbox"}, "authentication": authentication});
        if events {
            spec["events"] = json!({"enabled": true, "callbackUrl": CALLBACK});
        }
        let instance: DropboxElementInstance = serde_json::from_value(json!({
            "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
            "kind": "DropboxElementInstance",
            "metadata": {"name": name},
            "spec": spec,
        }))?;
        self.instances
            .create(&PostParams::default(), &instance)
            .await
            .with_context(|| format!("create instance {name}"))?;
        self.created.push(name.to_owned());
        Ok(())
    }

    async fn oauth(&mut self, name: &str, code_secret: &str, events: bool) -> Result<()> {
        self.create(
            name,
            json!({"type": "oauth2", "appSecretRef": {"name": "dropbox-app"},
                   "codeSecretRef": {"name": code_secret}, "callbackUrl": REDIRECT}),
            events,
        )
        .await
    }

    /// `n` oauth2 instances `<prefix>-<i>`, each with a code of its own.
    async fn many(&mut self, prefix: &str, n: usize, events: bool) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for i in 0..n {
            let name = format!("{prefix}-{i}");
            self.code(&format!("{name}-code")).await?;
            self.oauth(&name, &format!("{name}-code"), events).await?;
            names.push(name);
        }
        Ok(names)
    }

    /// Waits until every named instance is Ready; returns how many are not.
    async fn not_ready(&self, names: &[String], timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let n = match self.instances.list(&ListParams::default()).await {
                Ok(list) => names
                    .iter()
                    .filter(|n| {
                        !list
                            .items
                            .iter()
                            .any(|i| i.name_any() == **n && is_ready(i))
                    })
                    .count(),
                Err(_) => names.len(),
            };
            if n == 0 || Instant::now() > deadline {
                return n;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    async fn all_ready(&self, names: &[String]) -> Result<()> {
        let n = self.not_ready(names, READY_TIMEOUT).await;
        if n > 0 {
            bail!(
                "{n} of {} instances not Ready within {READY_TIMEOUT:?} (before any fault): {}",
                names.len(),
                self.describe(names).await
            );
        }
        Ok(())
    }

    /// `name: Ready=False Reason (message)` for the named instances that are not Ready.
    async fn describe(&self, names: &[String]) -> String {
        let mut out = Vec::new();
        for n in names.iter().take(5) {
            match self.instances.get_opt(n).await {
                Ok(Some(i)) if !is_ready(&i) => out.push(format!("{n}: {}", state(&i))),
                Ok(Some(_)) => {}
                Ok(None) => out.push(format!("{n}: gone")),
                Err(e) => out.push(format!("{n}: {e}")),
            }
        }
        out.join("; ")
    }

    async fn get(&self, name: &str) -> Result<DropboxElementInstance> {
        Ok(self.instances.get(name).await?)
    }

    async fn wait_gone(&self, names: &[String], timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = self.instances.list(&ListParams::default()).await?.items;
            let left: Vec<String> = left
                .iter()
                .map(|i| i.name_any())
                .filter(|n| names.contains(n))
                .collect();
            if left.is_empty() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("instances not deleted within {timeout:?}: {left:?}");
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }

    /// Waits until the emulator has seen `n` code exchanges.
    async fn wait_exchanges(&self, n: usize, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        while self.exchanges() < n {
            if Instant::now() > deadline {
                bail!("{n} code exchanges not seen within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    fn exchanges(&self) -> usize {
        self.grant_calls("authorization_code")
    }

    fn grant_calls(&self, grant_type: &str) -> usize {
        self.emu
            .calls_to("/oauth2/token")
            .iter()
            .filter(|c| c.form.get("grant_type").map(String::as_str) == Some(grant_type))
            .count()
    }

    fn codes_twice(&self) -> usize {
        let mut by_code: HashMap<String, usize> = HashMap::new();
        for call in self.emu.calls_to("/oauth2/token") {
            if let Some(code) = call.form.get("code") {
                *by_code.entry(code.clone()).or_default() += 1;
            }
        }
        by_code.values().filter(|n| **n > 1).count()
    }

    fn panics(&self) -> usize {
        self.logs
            .iter()
            .map(|l| {
                std::fs::read_to_string(l)
                    .unwrap_or_default()
                    .matches("panicked")
                    .count()
            })
            .sum()
    }

    fn not_revoked(&self) -> usize {
        self.emu
            .live_oauth_access_tokens()
            .iter()
            .filter(|t| self.emu.is_access_token_valid(t))
            .count()
    }

    async fn token_secret(&self, instance: &str) -> Result<Option<Secret>> {
        Ok(self
            .secrets
            .get_opt(&format!("{instance}-dropbox-token"))
            .await?)
    }

    async fn warnings(&self, name: &str) -> Result<Vec<String>> {
        let events: Api<Event> = Api::namespaced(self.client.clone(), &self.ns);
        Ok(events
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
            .filter(|e| e.type_.as_deref() == Some("Warning"))
            .map(|e| {
                format!(
                    "{}: {}",
                    e.reason.unwrap_or_default(),
                    e.note.unwrap_or_default()
                )
            })
            .collect())
    }

    /// Waits until instance `name` shows a verdict on its own: Ready, or
    /// Authorized=False with a reason other than a transient one. Returns it.
    async fn settled(&self, name: &str, timeout: Duration) -> Result<DropboxElementInstance> {
        let api = self.instances.clone();
        support::eventually(
            &format!("{name} to settle"),
            timeout,
            || {
                let api = api.clone();
                async move { Ok(api.get(name).await?) }
            },
            |i: &DropboxElementInstance| {
                is_ready(i)
                    || support::condition(i, "Authorized").is_some_and(|c| {
                        c.status == "False"
                            && !matches!(c.reason.as_str(), "DropboxUnavailable" | "RateLimited")
                    })
            },
        )
        .await
    }
}

fn is_ready(i: &DropboxElementInstance) -> bool {
    support::condition_is(i, "Ready", "True", None)
}

/// `Ready=False Reason: message` and Authorized's reason.
fn state(i: &DropboxElementInstance) -> String {
    let cond = |t: &str| {
        support::condition(i, t)
            .map(|c| format!("{t}={} {}: {}", c.status, c.reason, c.message))
            .unwrap_or_else(|| format!("{t}=?"))
    };
    format!("{} / {}", cond("Ready"), cond("Authorized"))
}

fn reason(i: &DropboxElementInstance, type_: &str) -> String {
    support::condition(i, type_)
        .map(|c| c.reason.clone())
        .unwrap_or_default()
}

fn secret_text(secret: &Secret, key: &str) -> Option<String> {
    secret
        .data
        .as_ref()?
        .get(key)
        .map(|b| String::from_utf8_lossy(&b.0).into_owned())
}

/// Whether creating a Secret named `<x>-dropbox-token` is admitted (dry run).
async fn token_secret_admitted(secrets: &Api<Secret>) -> bool {
    let probe: Secret = serde_json::from_value(json!({
        "metadata": {"name": "admission-probe-dropbox-token"},
        "stringData": {"x": "y"}
    }))
    .expect("probe manifest");
    secrets
        .create(
            &PostParams {
                dry_run: true,
                ..PostParams::default()
            },
            &probe,
        )
        .await
        .is_ok()
}

async fn wait_admitted(secrets: &Api<Secret>, admitted: bool, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while token_secret_admitted(secrets).await != admitted {
        if Instant::now() > deadline {
            bail!("token Secret admitted={admitted} not reached within {timeout:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

// ---- rows -----------------------------------------------------------------------

/// Instance names of 70 characters (valid for the resource, too long for a label
/// value): two that share their first 63 characters, Ready, then deleted.
async fn long_names(c: &mut Ctx) -> Result<Outcome> {
    let _controller = c.start_controller("controller").await;
    // Equal in their first 67 characters: cut to 63, their labels would collide.
    let base = &"long-instance-name-".repeat(4)[..67];
    let names: Vec<String> = ["01", "02"].iter().map(|s| format!("{base}-{s}")).collect();
    for (n, s) in names.iter().zip(["01", "02"]) {
        anyhow::ensure!(n.len() == 70, "name {n} has {} characters", n.len());
        c.code(&format!("code-{s}")).await?;
        c.oauth(n, &format!("code-{s}"), false).await?;
    }
    let mut out = Outcome {
        not_ready: c.not_ready(&names, READY_TIMEOUT).await,
        ..Outcome::default()
    };
    if out.not_ready > 0 {
        out.notes.push(c.describe(&names).await);
    }
    // The instance label of each token Secret: a valid label value, its own.
    let mut labels = Vec::new();
    for n in &names {
        let secret = c.token_secret(n).await?.context("token Secret")?;
        labels.push(
            secret
                .labels()
                .get("elements.dropbox-operator.dev/instance")
                .cloned()
                .unwrap_or_default(),
        );
    }
    if labels[0] == labels[1] || labels.iter().any(|l| l.is_empty() || l.len() > 63) {
        out.notes.push(format!(
            "instance labels not distinct valid values: {labels:?}"
        ));
    }
    for n in &names {
        c.instances.delete(n, &DeleteParams::default()).await?;
    }
    c.wait_gone(&names, Duration::from_secs(20)).await?;
    out.not_revoked = c.not_revoked();
    Ok(out)
}

/// A ResourceQuota at the namespace's current Secret count refuses the token
/// Secret; once it is lifted the instance becomes Ready with its first code.
async fn quota(c: &mut Ctx) -> Result<Outcome> {
    c.code("quota-code").await?;
    let count = c.secrets.list(&ListParams::default()).await?.items.len();
    let quotas: Api<ResourceQuota> = Api::namespaced(c.client.clone(), &c.ns);
    let quota: ResourceQuota = serde_json::from_value(json!({
        "metadata": {"name": "no-more-secrets"},
        "spec": {"hard": {"count/secrets": count.to_string()}}
    }))?;
    quotas.create(&PostParams::default(), &quota).await?;
    // No quota controller runs here: the status it would compute is set by hand.
    quotas
        .patch_status(
            "no-more-secrets",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {
                "hard": {"count/secrets": count.to_string()},
                "used": {"count/secrets": count.to_string()}
            }})),
        )
        .await?;
    wait_admitted(&c.secrets, false, Duration::from_secs(10)).await?;
    let _controller = c.start_controller("controller").await;
    c.oauth("quota", "quota-code", false).await?;
    let names = vec!["quota".to_owned()];
    // Let the controller meet the refusal (and retry) for a while.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = while_refused(c, "quota").await?;
    quotas
        .delete("no-more-secrets", &DeleteParams::default())
        .await?;
    wait_admitted(&c.secrets, true, Duration::from_secs(10)).await?;
    let mut out = Outcome {
        not_ready: c.not_ready(&names, READY_TIMEOUT).await,
        notes: during,
        ..Outcome::default()
    };
    if out.not_ready > 0 {
        out.notes.push(c.describe(&names).await);
    }
    Ok(out)
}

/// While the token Secret is refused: the code must stay unsent (README,
/// `TokensNotStored`: "the code is kept unsent and retried").
async fn while_refused(c: &Ctx, name: &str) -> Result<Vec<String>> {
    let i = c.get(name).await?;
    eprintln!("while the token Secret is refused: {}", state(&i));
    let mut notes = Vec::new();
    if c.exchanges() > 0 {
        notes.push(format!(
            "the code was sent while its tokens could not be stored: {}",
            state(&i)
        ));
    }
    if is_ready(&i) {
        notes.push("Ready although the token Secret was refused".into());
    }
    Ok(notes)
}

/// A ValidatingAdmissionPolicy refusing Secrets named `*-dropbox-token` in the
/// namespace; once removed, the instance becomes Ready with its first code.
async fn admission_policy(c: &mut Ctx) -> Result<Outcome> {
    let (ok, resources, err) = support::kubectl(&[
        "api-resources",
        "--api-group=admissionregistration.k8s.io",
        "-o",
        "name",
    ]);
    anyhow::ensure!(
        ok && resources.contains("validatingadmissionpolicies.admissionregistration.k8s.io")
            && resources.contains("validatingadmissionpolicybindings"),
        "the test apiserver does not serve ValidatingAdmissionPolicy: {resources} {err}"
    );
    let name = format!("deny-token-secrets-{}", c.ns);
    let manifest = format!(
        r#"apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicy
metadata:
  name: {name}
spec:
  failurePolicy: Fail
  matchConstraints:
    resourceRules:
    - apiGroups: [""]
      apiVersions: ["v1"]
      operations: ["CREATE", "UPDATE"]
      resources: ["secrets"]
  validations:
  - expression: "!object.metadata.name.endsWith('-dropbox-token')"
    message: "token Secrets are refused here (test policy)"
---
apiVersion: admissionregistration.k8s.io/v1
kind: ValidatingAdmissionPolicyBinding
metadata:
  name: {name}
spec:
  policyName: {name}
  validationActions: [Deny]
  matchResources:
    namespaceSelector:
      matchLabels:
        kubernetes.io/metadata.name: {ns}
"#,
        ns = c.ns
    );
    let (ok, _, err) = support::kubectl_stdin(&["apply", "-f", "-"], &manifest);
    anyhow::ensure!(ok, "apply the admission policy: {err}");
    wait_admitted(&c.secrets, false, Duration::from_secs(20)).await?;
    c.code("vap-code").await?;
    let _controller = c.start_controller("controller").await;
    c.oauth("vap", "vap-code", false).await?;
    let names = vec!["vap".to_owned()];
    tokio::time::sleep(Duration::from_secs(6)).await;
    let during = while_refused(c, "vap").await?;
    let (ok, _, err) = support::kubectl(&[
        "delete",
        "validatingadmissionpolicybinding,validatingadmissionpolicy",
        &name,
    ]);
    anyhow::ensure!(ok, "delete the admission policy: {err}");
    wait_admitted(&c.secrets, true, Duration::from_secs(20)).await?;
    let mut out = Outcome {
        not_ready: c.not_ready(&names, READY_TIMEOUT).await,
        notes: during,
        ..Outcome::default()
    };
    if out.not_ready > 0 {
        out.notes.push(c.describe(&names).await);
    }
    Ok(out)
}

/// Dropbox consumes the code, then answers only after the controller's timeout:
/// the code is spent but no tokens arrived. The code must never be sent again;
/// a new code makes the instance Ready.
async fn hang_after_consuming(c: &mut Ctx) -> Result<Outcome> {
    c.emu.hang_after_consuming_code(Duration::from_secs(6));
    let _controller = c.start_controller("controller").await;
    c.code("hang-code").await?;
    c.oauth("hang", "hang-code", false).await?;
    c.wait_exchanges(1, Duration::from_secs(20)).await?;
    // The hang, the client's timeout and a few backoffs: room to resend.
    tokio::time::sleep(Duration::from_secs(9)).await;
    let seen = c.get("hang").await?;
    eprintln!("after the timeout: {}", state(&seen));
    c.emu.hang_after_consuming_code(Duration::ZERO);
    new_code_then_ready(c, "hang", "hang-code").await
}

/// Puts a new code in `code_secret` and waits for Ready.
async fn new_code_then_ready(c: &Ctx, name: &str, code_secret: &str) -> Result<Outcome> {
    c.code(code_secret).await?;
    let names = vec![name.to_owned()];
    let mut out = Outcome {
        not_ready: c.not_ready(&names, READY_TIMEOUT).await,
        ..Outcome::default()
    };
    if out.not_ready > 0 {
        out.notes.push(c.describe(&names).await);
    }
    Ok(out)
}

/// The controller is SIGKILLed after Dropbox consumed the code and before the
/// (slow) answer arrived; a restarted controller must not send it again.
async fn sigkill_mid_exchange(c: &mut Ctx) -> Result<Outcome> {
    c.emu.hang_after_consuming_code(Duration::from_millis(1500));
    let mut controller = c.start_controller("controller-1").await;
    c.code("kill-code").await?;
    c.oauth("kill", "kill-code", false).await?;
    c.wait_exchanges(1, Duration::from_secs(20)).await?;
    controller.kill();
    c.emu.hang_after_consuming_code(Duration::ZERO);
    let _controller = c.start_controller("controller-2").await;
    let _ = c.settled("kill", Duration::from_secs(15)).await;
    eprintln!("after the restart: {}", state(&c.get("kill").await?));
    new_code_then_ready(c, "kill", "kill-code").await
}

/// kube-apiserver is killed and started again while Dropbox answers the code
/// exchange (after consuming it): the tokens arrive while nothing can be
/// stored. The code is never resent. With the default lease timings the
/// controller rides out the outage and stores the tokens it kept: Ready with
/// the first code. With an outage longer than --lease-renew-deadline the leader
/// steps down and exits (the tokens die with it); restarted as a Deployment
/// would, it asks for a new approval (status.authorizeUrl) and a new code
/// makes the instance Ready.
async fn apiserver_restart(c: &mut Ctx, outlives_lease: bool) -> Result<Outcome> {
    c.emu.hang_after_consuming_code(Duration::from_millis(1500));
    let controller = if outlives_lease {
        c.controller("controller-0")
    } else {
        c.controller("controller-0")
            .env("LEASE_DURATION", "15s")
            .env("LEASE_RENEW_GRACE", "5s")
            .env("LEASE_RENEW_DEADLINE", "10s")
    };
    let mut controller = c.start(controller).await;
    c.code("restart-code").await?;
    c.oauth("restart", "restart-code", false).await?;
    c.wait_exchanges(1, Duration::from_secs(20)).await?;
    // Down for longer than Dropbox takes to answer.
    let away = tokio::task::spawn_blocking(|| {
        support::cluster().restart_kube_apiserver(Duration::from_secs(4))
    })
    .await??;
    eprintln!("kube-apiserver was away for {away:?}");
    c.emu.hang_after_consuming_code(Duration::ZERO);
    let names = vec!["restart".to_owned()];
    let mut notes = Vec::new();
    let mut restarts = 0;
    let deadline = Instant::now() + READY_TIMEOUT;
    let verdict = loop {
        if controller.exited() {
            // What the Deployment's restartPolicy does.
            restarts += 1;
            controller = c.start_controller(&format!("controller-{restarts}")).await;
        }
        let i = c.get("restart").await?;
        let asks = support::condition_is(&i, "Authorized", "False", None)
            && i.status.as_ref().is_some_and(|s| s.authorize_url.is_some());
        if is_ready(&i) || asks || Instant::now() > deadline {
            break i;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    eprintln!(
        "after the outage ({restarts} controller restarts): {}",
        state(&verdict)
    );
    if is_ready(&verdict) {
        return Ok(Outcome::default());
    }
    if !outlives_lease {
        notes.push(format!(
            "the controller kept running, yet its tokens were not stored: {}",
            state(&verdict)
        ));
    }
    let mut out = new_code_then_ready(c, "restart", "restart-code").await?;
    out.notes.splice(0..0, notes);
    if out.not_ready == 0 && c.not_ready(&names, Duration::ZERO).await > 0 {
        out.not_ready = 1;
    }
    Ok(out)
}

/// Two replicas, 100 instances whose tokens live 20 s (refreshed at half-life);
/// the leader is SIGKILLed while refreshes are going on.
async fn failover(c: &mut Ctx) -> Result<Outcome> {
    c.emu.set_access_token_ttl(Duration::from_secs(20));
    let mut a = c.start_controller("replica-a").await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mut b = c.start_controller("replica-b").await;
    let names = c.many("f", 100, false).await?;
    let n = c.not_ready(&names, Duration::from_secs(90)).await;
    if n > 0 {
        bail!(
            "{n} of 100 not Ready before the fault: {}",
            c.describe(&names).await
        );
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while c.grant_calls("refresh_token") < 15 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let refreshes_before = c.grant_calls("refresh_token");
    let a_leads = a.metric_sum("dropbox_operator_leader", "").await == 1.0;
    let b_leads = b.metric_sum("dropbox_operator_leader", "").await == 1.0;
    let mut notes = Vec::new();
    if a_leads == b_leads {
        notes.push(format!("leaders: a={a_leads} b={b_leads}"));
    }
    let (leader, standby) = if a_leads { (&mut a, &b) } else { (&mut b, &a) };
    leader.kill();
    let killed = Instant::now();
    eprintln!("killed the leader after {refreshes_before} refreshes");
    // Every token is refreshed again by the new leader (each lives 20 s).
    let deadline = Instant::now() + Duration::from_secs(45);
    while c.grant_calls("refresh_token") < refreshes_before + 100 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "{} refreshes in {:?} after the failover; standby leads: {}",
        c.grant_calls("refresh_token") - refreshes_before,
        killed.elapsed(),
        standby.metric_sum("dropbox_operator_leader", "").await
    );
    let not_ready = c.not_ready(&names, READY_TIMEOUT).await;
    if not_ready > 0 {
        notes.push(c.describe(&names).await);
    }
    // No refresh token burned, no stored access token dead.
    let mut burned = 0;
    let mut dead = 0;
    for n in &names {
        let secret = c.token_secret(n).await?;
        let rt = secret
            .as_ref()
            .and_then(|s| secret_text(s, "refresh_token"));
        let at = secret.as_ref().and_then(|s| secret_text(s, "access_token"));
        if !rt.is_some_and(|t| c.emu.is_refresh_token_valid(&t)) {
            burned += 1;
        }
        if !at.is_some_and(|t| c.emu.is_access_token_valid(&t)) {
            dead += 1;
        }
    }
    if burned > 0 {
        notes.push(format!("{burned} refresh tokens burned"));
    }
    if dead > 0 {
        notes.push(format!("{dead} stored access tokens not valid"));
    }
    Ok(Outcome {
        not_ready,
        notes,
        ..Outcome::default()
    })
}

/// After Ready, the (spent) code Secret is deleted: the instance keeps
/// refreshing from its token Secret, stays Ready and gets no Warning.
async fn spent_code_deleted(c: &mut Ctx) -> Result<Outcome> {
    c.emu.set_access_token_ttl(Duration::from_secs(6));
    let _controller = c.start_controller("controller").await;
    c.code("spent-code").await?;
    c.oauth("spent", "spent-code", false).await?;
    let names = vec!["spent".to_owned()];
    c.all_ready(&names).await?;
    c.secrets
        .delete("spent-code", &DeleteParams::default())
        .await?;
    let refreshes = c.grant_calls("refresh_token");
    let mut notes = Vec::new();
    let until = Instant::now() + Duration::from_secs(10);
    while Instant::now() < until {
        let i = c.get("spent").await?;
        if !is_ready(&i) {
            notes.push(format!(
                "not Ready after the code Secret went: {}",
                state(&i)
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    if c.grant_calls("refresh_token") <= refreshes {
        notes.push("no refresh after the code Secret was deleted".into());
    }
    let warnings = c.warnings("spent").await?;
    if !warnings.is_empty() {
        notes.push(format!("Warning events: {warnings:?}"));
    }
    let secret = c.token_secret("spent").await?;
    if !secret
        .as_ref()
        .and_then(|s| secret_text(s, "access_token"))
        .is_some_and(|t| c.emu.is_access_token_valid(&t))
    {
        notes.push("the stored access token is not valid".into());
    }
    Ok(Outcome {
        not_ready: c.not_ready(&names, Duration::from_secs(5)).await,
        notes,
        ..Outcome::default()
    })
}

/// The instances' namespace is deleted with 20 Ready instances in it: every
/// token is revoked and the namespace goes away.
async fn namespace_deleted(c: &mut Ctx) -> Result<Outcome> {
    let _controller = c.start_controller("controller").await;
    let names = c.many("n", 20, false).await?;
    c.all_ready(&names).await?;
    let namespaces: Api<Namespace> = Api::all(c.client.clone());
    namespaces.delete(&c.ns, &DeleteParams::default()).await?;
    let mut notes = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(45);
    loop {
        if namespaces.get_opt(&c.ns).await?.is_none() {
            break;
        }
        if Instant::now() > deadline {
            let left = c.instances.list(&ListParams::default()).await?.items.len();
            let secrets = c.secrets.list(&ListParams::default()).await?.items;
            notes.push(format!(
                "namespace still there after 45 s: {left} instances, Secrets {:?}",
                secrets
                    .iter()
                    .map(|s| format!("{} {:?}", s.name_any(), s.finalizers()))
                    .collect::<Vec<_>>()
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    Ok(Outcome {
        not_revoked: c.not_revoked(),
        notes,
        ..Outcome::default()
    })
}

/// `DeleteParams::foreground()`: the garbage collector deletes the dependents
/// (the token Secret) before the instance; the token is revoked all the same.
async fn foreground_delete(c: &mut Ctx) -> Result<Outcome> {
    let _controller = c.start_controller("controller").await;
    c.code("fg-code").await?;
    c.oauth("fg", "fg-code", false).await?;
    let names = vec!["fg".to_owned()];
    c.all_ready(&names).await?;
    c.instances
        .delete("fg", &DeleteParams::foreground())
        .await?;
    c.wait_gone(&names, Duration::from_secs(30)).await?;
    Ok(Outcome {
        not_revoked: c.not_revoked(),
        ..Outcome::default()
    })
}

/// The token Secret is edited to hold absurd expiries: no panic, the token is
/// treated as expired and refreshed, both instances Ready.
async fn absurd_expiry(c: &mut Ctx) -> Result<Outcome> {
    let _controller = c.start_controller("controller").await;
    let names = c.many("e", 2, false).await?;
    c.all_ready(&names).await?;
    let edits = [
        (names[0].clone(), "-9999-01-01T00:00:00Z"),
        (names[1].clone(), "+9999-12-31T23:59:59Z"),
    ];
    // (refresh token, when its Secret was edited) per instance.
    let mut refresh_tokens = Vec::new();
    for (name, expiry) in &edits {
        let secret = c.token_secret(name).await?.context("token Secret")?;
        let rt = secret_text(&secret, "refresh_token").context("refresh_token")?;
        refresh_tokens.push((rt, Instant::now()));
        c.secrets
            .patch(
                &format!("{name}-dropbox-token"),
                &PatchParams::default(),
                &Patch::Merge(json!({"stringData": {"expires_at": expiry}})),
            )
            .await?;
    }
    let mut notes = Vec::new();
    for ((name, expiry), (rt, edited)) in edits.iter().zip(&refresh_tokens) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let refreshed = c.emu.calls_to("/oauth2/token").iter().any(|call| {
                call.at >= *edited
                    && call.form.get("refresh_token") == Some(rt)
                    && call.status == 200
            });
            let stored = c
                .token_secret(name)
                .await?
                .and_then(|s| secret_text(&s, "expires_at"));
            let sane = stored
                .as_deref()
                .is_some_and(|t| t != *expiry && !t.contains("9999"));
            if refreshed && sane {
                break;
            }
            if Instant::now() > deadline {
                notes.push(format!(
                    "{name} (expires_at {expiry}): refreshed={refreshed}, stored expires_at {stored:?}"
                ));
                break;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    }
    let not_ready = c.not_ready(&names, READY_TIMEOUT).await;
    if not_ready > 0 {
        notes.push(c.describe(&names).await);
    }
    Ok(Outcome {
        not_ready,
        notes,
        ..Outcome::default()
    })
}

/// A malformed apiKey (Dropbox answers 400 bad input) is `InvalidApiKey`, not
/// `DropboxUnavailable`; fixing the Secret makes the instance Ready.
async fn malformed_api_key(c: &mut Ctx) -> Result<Outcome> {
    let _controller = c.start_controller("controller").await;
    c.put_secret("key", &[("apiKey", MALFORMED_KEY)]).await?;
    c.create(
        "key",
        json!({"type": "apiKey", "apiKeySecretRef": {"name": "key"}}),
        false,
    )
    .await?;
    let mut notes = Vec::new();
    let seen = c.settled("key", Duration::from_secs(15)).await;
    let calls = c.emu.calls_to("/2/users/get_current_account");
    if !calls.iter().any(|call| call.status == 400) {
        notes.push(format!(
            "the emulator did not answer 400: {:?}",
            calls.iter().map(|c| c.status).collect::<Vec<_>>()
        ));
    }
    match seen {
        Ok(i) if reason(&i, "Authorized") == "InvalidApiKey" => {}
        _ => notes.push(format!(
            "want Authorized=False InvalidApiKey: {}",
            state(&c.get("key").await?)
        )),
    }
    // Dropbox echoes the Authorization header in its 400 text: the Secret's value
    // must not travel on into status or Events (README, "Security").
    let status = serde_json::to_string(&c.get("key").await?.status)?;
    let events = c.warnings("key").await?.join("\n");
    if status.contains(MALFORMED_KEY) || events.contains(MALFORMED_KEY) {
        notes.push("the apiKey Secret's value appears in status or Events".into());
    }
    let token = c.emu.issue_long_lived_token(APP_KEY, ACCOUNT);
    c.put_secret("key", &[("apiKey", &token)]).await?;
    let names = vec!["key".to_owned()];
    let not_ready = c.not_ready(&names, READY_TIMEOUT).await;
    if not_ready > 0 {
        notes.push(c.describe(&names).await);
    }
    Ok(Outcome {
        not_ready,
        notes,
        ..Outcome::default()
    })
}

/// The app lacks files.metadata.read and events are on: get_latest_cursor
/// answers `missing_scope`. The reason is `MissingScope` naming the permission;
/// granting it (and approving again, as Dropbox needs) makes it Ready.
async fn missing_scope(c: &mut Ctx) -> Result<Outcome> {
    c.emu.set_app_scope(APP_KEY, "account_info.read");
    let _controller = c.start_controller("controller").await;
    let _ingress = c.start_ingress().await;
    c.code("scope-code").await?;
    c.oauth("scope", "scope-code", true).await?;
    let mut notes = Vec::new();
    let api = c.instances.clone();
    let seen = support::eventually(
        "Ready=False MissingScope",
        Duration::from_secs(20),
        || {
            let api = api.clone();
            async move { Ok(api.get("scope").await?) }
        },
        |i: &DropboxElementInstance| reason(i, "Ready") == "MissingScope",
    )
    .await;
    match seen {
        Ok(i) => {
            let named = i.status.as_ref().is_some_and(|s| {
                s.conditions.iter().any(|c| {
                    c.reason == "MissingScope" && c.message.contains("files.metadata.read")
                })
            });
            if !named {
                notes.push(format!(
                    "the message does not name the permission: {}",
                    state(&i)
                ));
            }
        }
        Err(_) => notes.push(format!(
            "want Ready=False MissingScope: {}",
            state(&c.get("scope").await?)
        )),
    }
    if !c
        .emu
        .calls_to("/2/files/list_folder/get_latest_cursor")
        .iter()
        .any(|call| call.status == 401)
    {
        notes.push("the emulator did not answer missing_scope".into());
    }
    c.emu.set_app_scope(APP_KEY, DEFAULT_SCOPE);
    let mut out = new_code_then_ready(c, "scope", "scope-code").await?;
    out.notes.splice(0..0, notes);
    Ok(out)
}

/// Five controller restarts in a row (SIGTERM and SIGKILL alternating) with
/// events-enabled instances Ready and an ingress running: no Ready or
/// EventsReady change is ever seen, and no status is written.
async fn restarts(c: &mut Ctx) -> Result<Outcome> {
    let mut controller = c.start_controller("controller-0").await;
    let _ingress = c.start_ingress().await;
    let names = c.many("r", 3, true).await?;
    c.all_ready(&names).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let baseline: HashMap<String, (String, String)> = c
        .instances
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|i| {
            (
                i.name_any(),
                (i.resource_version().unwrap_or_default(), conditions_of(i)),
            )
        })
        .collect();
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let watch = {
        let seen = seen.clone();
        let baseline = baseline.clone();
        let stream = watcher(c.instances.clone(), watcher::Config::default()).applied_objects();
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                let Ok(i) = item else { continue };
                let Some((rv, conds)) = baseline.get(&i.name_any()) else {
                    continue;
                };
                if i.resource_version().as_ref() != Some(rv) {
                    let now = conditions_of(&i);
                    let what = if now == *conds { "written" } else { "flapped" };
                    seen.lock()
                        .expect("seen")
                        .push(format!("{} {what}: {conds} -> {now}", i.name_any()));
                }
            }
        })
    };
    for n in 1..=5 {
        if n % 2 == 1 {
            controller.terminate(Duration::from_secs(10));
        } else {
            controller.kill();
        }
        controller = c.start_controller(&format!("controller-{n}")).await;
        let deadline = Instant::now() + Duration::from_secs(20);
        while controller
            .metric_sum("dropbox_operator_reconciles_total", "")
            .await
            < names.len() as f64
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    watch.abort();
    let mut notes: Vec<String> = seen.lock().expect("seen").clone();
    for i in c.instances.list(&ListParams::default()).await?.items {
        if let Some((rv, _)) = baseline.get(&i.name_any())
            && i.resource_version().as_ref() != Some(rv)
            && notes.is_empty()
        {
            notes.push(format!(
                "{} written (resourceVersion changed)",
                i.name_any()
            ));
        }
    }
    Ok(Outcome {
        not_ready: c.not_ready(&names, Duration::from_secs(5)).await,
        notes,
        ..Outcome::default()
    })
}

/// `Ready=True Ready, EventsReady=True IngressReady, ...` (status and reason of each).
fn conditions_of(i: &DropboxElementInstance) -> String {
    ["Ready", "Authorized", "EventsReady"]
        .iter()
        .map(|t| {
            support::condition(i, t)
                .map(|c| format!("{t}={} {}", c.status, c.reason))
                .unwrap_or_else(|| format!("{t}=-"))
        })
        .collect::<Vec<_>>()
        .join(", ")
}
