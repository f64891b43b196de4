//! Credential lifecycle guarantees, proven by faults (docs/reference.md, "Conditions and
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
//! tokens not revoked | Ready flaps | stale-leader writes | panics escaping
//!
//! - codes sent twice: codes the emulator saw at `/oauth2/token` more than once;
//! - not Ready at the end: after the fault is lifted (and, where Dropbox consumed
//!   a code without the controller storing its tokens, after a new code is put
//!   in the code Secret), instances whose Ready is not True within a timeout;
//! - tokens not revoked: for rows that delete instances (or whose controller
//!   gives up tokens it could not store), token families (grants) the emulator
//!   still honours afterwards: an expired access token whose refresh token
//!   still works counts;
//! - Ready flaps (rows where a working instance must stay Ready): Ready going
//!   from True to False, as a watch of the instances saw it;
//! - stale-leader writes (rows with two live leaders): writes to instances or
//!   Secrets that the API server's audit log records as made, successfully, by
//!   the stale leader's user after it was stopped or cut off;
//! - panics escaping: "panicked at" in the logs of every operator process of
//!   the row, except the one panic a row injects on purpose.
//!
//! Every count after `instances` must be 0 ("-": not measured by that row);
//! checks a row makes beyond the table (reasons, events, writes) are printed
//! under it and must hold too.

mod support;

use std::collections::HashMap;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

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
    flaps: Option<usize>,
    stale_writes: Option<usize>,
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
    flaps: Option<usize>,
    stale_writes: Option<usize>,
    notes: Vec<String>,
}

#[test]
fn credential_lifecycle_survives_faults() {
    support::run_blocking(run());
}

const ROWS: [(&str, &str); 27] = [
    ("long-names", "70-character instance names"),
    ("name-253", "a 253-character instance name"),
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
    (
        "claims-restart",
        "one code for two instances, controller killed mid-exchange",
    ),
    ("apiserver", "kube-apiserver restarted mid-exchange"),
    (
        "apiserver-long",
        "kube-apiserver down past the renew deadline mid-exchange; new code",
    ),
    (
        "sigstop",
        "leader SIGSTOPped for twice the lease mid-exchange, then SIGCONT",
    ),
    (
        "blackhole",
        "leader's API server connection black-holed mid-exchange, then healed",
    ),
    (
        "failover",
        "leader SIGSTOPped mid-refresh, 100 instances, rotating refresh tokens",
    ),
    ("spent-code", "spent code Secret deleted after Ready"),
    ("self-heal", "GitOps puts the previous (spent) code back"),
    ("ns-delete", "namespace deleted with 20 instances"),
    (
        "ns-expired",
        "namespace deleted, tokens expired, app Secret deleted first",
    ),
    (
        "unstored-delete",
        "instance deleted while its tokens are only in memory",
    ),
    (
        "finalizer-refused",
        "admission policy refuses releasing the token Secret, then removed",
    ),
    ("foreground", "foreground-cascade deletion of an instance"),
    (
        "release",
        "controller removed, namespace stuck; release-finalizers by hand",
    ),
    (
        "expiry",
        "token Secret expires_at -9999-01-01 / +9999-12-31",
    ),
    ("apikey", "apiKey malformed (400), then fixed"),
    (
        "apikey-429",
        "apiKey instances, 429 bursts across a controller restart",
    ),
    (
        "scope",
        "app without files.metadata.read, events on; then granted",
    ),
    (
        "restarts",
        "5 controller restarts, events-enabled instances Ready",
    ),
    (
        "restart-reads",
        "3 controller restarts read no settled instance's Secret; a code put in while down",
    ),
    (
        "panic",
        "one instance's reconcile panics (test fault switch)",
    ),
];

async fn run_row(tag: &str, c: &mut Ctx) -> Result<Outcome> {
    match tag {
        "long-names" => long_names(c).await,
        "name-253" => longest_name(c).await,
        "claims-restart" => claims_across_restart(c).await,
        "sigstop" => sigstop_mid_exchange(c).await,
        "blackhole" => black_hole_mid_exchange(c).await,
        "self-heal" => self_heal(c).await,
        "ns-expired" => namespace_deleted_expired(c).await,
        "unstored-delete" => deleted_while_unstored(c).await,
        "finalizer-refused" => finalizer_refused(c).await,
        "apikey-429" => api_key_rate_limited(c).await,
        "panic" => panic_contained(c).await,
        "release" => released_by_hand(c).await,
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
        "restart-reads" => restart_reads(c).await,
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
            flaps: outcome.flaps,
            stale_writes: outcome.stale_writes,
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
            let measured = r.flaps.unwrap_or(0) + r.stale_writes.unwrap_or(0);
            r.codes_twice + r.not_ready + r.not_revoked + r.panics + measured > 0
                || !r.notes.is_empty()
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
        "| {:width$} | {:>9} | {:>16} | {:>30} | {:>18} | {:>11} | {:>19} | {:>15} |\n",
        "fault",
        "instances",
        "codes sent twice",
        "instances not Ready at the end",
        "tokens not revoked",
        "Ready flaps",
        "stale-leader writes",
        "panics escaping"
    );
    out += &format!(
        "|{}|-----------|------------------|--------------------------------|--------------------|-------------|---------------------|-----------------|\n",
        "-".repeat(width + 2)
    );
    let shown = |n: Option<usize>| n.map(|n| n.to_string()).unwrap_or_else(|| "-".into());
    for r in rows {
        out += &format!(
            "| {:width$} | {:>9} | {:>16} | {:>30} | {:>18} | {:>11} | {:>19} | {:>15} |\n",
            r.fault,
            r.instances,
            r.codes_twice,
            r.not_ready,
            r.not_revoked,
            shown(r.flaps),
            shown(r.stale_writes),
            r.panics
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
            .env("POD_NAME", name)
            .env("API_TIMEOUT", "2s")
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

    /// Panics in the logs that were not contained: every one but those the
    /// `panic` row injects, and of those as many as the controller did not
    /// report contained (the standard hook prints the message on the next line).
    fn panics(&self) -> usize {
        self.logs
            .iter()
            .map(|l| {
                let log = std::fs::read_to_string(l).unwrap_or_default();
                let (injected, other): (Vec<usize>, Vec<usize>) = log
                    .match_indices("panicked at")
                    .map(|(i, _)| i)
                    .partition(|i| {
                        let after: String = log[*i..].chars().take(400).collect();
                        after.contains("injected test fault")
                    });
                let contained = log.matches("reconcile panicked; contained").count();
                other.len() + injected.len().saturating_sub(contained)
            })
            .sum()
    }

    /// Token families the emulator still honours (an access token, or a refresh
    /// token that can mint one).
    fn not_revoked(&self) -> usize {
        self.emu.live_grants()
    }

    /// A controller that authenticates as `user` (one of the control plane's
    /// process users, so the audit log tells its writes apart) and reaches the
    /// API server at `server` (default: directly).
    fn controller_as(
        &self,
        name: &str,
        user: &str,
        server: Option<&str>,
    ) -> Result<OperatorProcess> {
        let cluster = support::cluster();
        let kubeconfig = cluster.kubeconfig_for_user(user, server.unwrap_or(&cluster.server))?;
        Ok(self
            .controller(name)
            .env("KUBECONFIG", &kubeconfig.display().to_string()))
    }

    /// Successful writes (create, update, patch, delete of Secrets and instances
    /// in the row's namespace) the API server's audit log records as made by
    /// `user` at or after `since`.
    fn writes_by(&self, user: &str, since: SystemTime) -> Vec<String> {
        let Some(path) = support::cluster().audit_log.clone() else {
            return vec!["the control plane runs without an audit log".into()];
        };
        let since = jiff::Timestamp::try_from(since).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["user"]["username"] == user && is_write(e))
            .filter(|e| e["objectRef"]["namespace"] == self.ns.as_str())
            .filter(|e| {
                e["responseStatus"]["code"]
                    .as_u64()
                    .is_some_and(|c| (200..300).contains(&c))
            })
            .filter(|e| {
                e["requestReceivedTimestamp"]
                    .as_str()
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .is_some_and(|t| t >= since)
            })
            .map(|e| {
                format!(
                    "{} {}/{}{} at {}",
                    e["verb"].as_str().unwrap_or("?"),
                    e["objectRef"]["resource"].as_str().unwrap_or("?"),
                    e["objectRef"]["name"].as_str().unwrap_or("?"),
                    e["objectRef"]["subresource"]
                        .as_str()
                        .map(|s| format!("/{s}"))
                        .unwrap_or_default(),
                    e["requestReceivedTimestamp"].as_str().unwrap_or("?"),
                )
            })
            .collect()
    }

    /// Secrets of the row that `user` read (get) at or after `since`, by name
    /// (the API server's audit log).
    fn secret_reads_by(&self, user: &str, since: SystemTime) -> HashMap<String, usize> {
        let Some(path) = support::cluster().audit_log.clone() else {
            return HashMap::new();
        };
        let since = jiff::Timestamp::try_from(since).unwrap_or(jiff::Timestamp::UNIX_EPOCH);
        let mut reads: HashMap<String, usize> = HashMap::new();
        for e in std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["user"]["username"] == user && e["verb"] == "get")
            .filter(|e| e["objectRef"]["namespace"] == self.ns.as_str())
            .filter(|e| e["objectRef"]["resource"] == "secrets")
            .filter(|e| {
                e["requestReceivedTimestamp"]
                    .as_str()
                    .and_then(|t| t.parse::<jiff::Timestamp>().ok())
                    .is_some_and(|t| t >= since)
            })
        {
            *reads
                .entry(e["objectRef"]["name"].as_str().unwrap_or("?").to_owned())
                .or_default() += 1;
        }
        reads
    }

    /// Refused writes by `user` to Secrets of the row (the API server's audit log).
    fn refused_writes_by(&self, user: &str) -> usize {
        let Some(path) = support::cluster().audit_log.clone() else {
            return 0;
        };
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["user"]["username"] == user && is_write(e))
            .filter(|e| e["objectRef"]["namespace"] == self.ns.as_str())
            .filter(|e| e["objectRef"]["resource"] == "secrets")
            .filter(|e| {
                e["responseStatus"]["code"]
                    .as_u64()
                    .is_some_and(|c| c >= 400)
            })
            .count()
    }

    /// Starts recording Ready going from True to False for `names`.
    fn watch_flaps(&self, names: &[String]) -> Flaps {
        let seen: Arc<Mutex<Vec<String>>> = Arc::default();
        let names = names.to_vec();
        let stream = watcher(self.instances.clone(), watcher::Config::default()).applied_objects();
        let task = tokio::spawn({
            let seen = seen.clone();
            async move {
                let mut ready: HashMap<String, bool> = HashMap::new();
                let mut stream = std::pin::pin!(stream);
                while let Some(item) = stream.next().await {
                    let Ok(i) = item else { continue };
                    if !names.contains(&i.name_any()) {
                        continue;
                    }
                    let now = is_ready(&i);
                    if ready.insert(i.name_any(), now) == Some(true) && !now {
                        seen.lock().expect("flaps").push(format!(
                            "{}: {}",
                            i.name_any(),
                            state(&i)
                        ));
                    }
                }
            }
        });
        Flaps { seen, task }
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

/// Ready transitions True → False seen by a watch.
struct Flaps {
    seen: Arc<Mutex<Vec<String>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Flaps {
    fn stop(self) -> Vec<String> {
        self.task.abort();
        self.seen.lock().expect("flaps").clone()
    }
}

/// Sends `signal` to a process.
/// Waits (up to 20 s) until a freshly started controller has reconciled `n`
/// instances, and a second more.
async fn reconciled_all(controller: &Process, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while controller
        .metric_sum("dropbox_operator_reconciles_total", "")
        .await
        < n as f64
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
}

/// An audit event of a write (the log also records Secret reads).
fn is_write(event: &serde_json::Value) -> bool {
    ["create", "update", "patch", "delete"]
        .iter()
        .any(|v| event["verb"] == *v)
}

fn signal(process: &Process, signal: i32) {
    if let Some(pid) = process.pid() {
        // SAFETY: signalling our own child process.
        unsafe {
            libc::kill(pid as i32, signal);
        }
    }
}

/// Waits until `process` leads (its leader metric is 1).
async fn wait_leading(process: &Process, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while process.metric_sum("dropbox_operator_leader", "").await != 1.0 {
        if Instant::now() > deadline {
            bail!("{} did not lead within {timeout:?}", process.name);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Ok(())
}

/// Waits until `process` exits on its own; whether it did.
async fn wait_exit(process: &mut Process, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while !process.exited() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    true
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

/// While the token Secret is refused: the code must stay unsent (docs/reference.md,
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
/// must step down and exit (nothing tells it whether a standby took over), and
/// revoke the tokens it could not store on its way out; restarted as a
/// Deployment would, it asks for a new approval (status.authorizeUrl) and a
/// new code makes the instance Ready.
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
    let first = c.code("restart-code").await?;
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
    // The leader steps down on its own clock: by now it has exited (the renew
    // deadline is 3 s, the outage longer), or it never needed to.
    let stepped_down = wait_exit(&mut controller, Duration::from_secs(5)).await;
    if outlives_lease && !stepped_down {
        notes.push(format!(
            "the leader did not step down although the API server was away for {away:?} (renew deadline 3 s)"
        ));
    }
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
    // Tokens the stepped-down leader held are stored by nobody: revoked.
    let leaked =
        usize::from(!is_ready(&verdict) && c.emu.grant_of_code_alive(&first) == Some(true));
    if leaked > 0 {
        notes.push("the tokens of the first code were neither stored nor revoked".into());
    }
    if is_ready(&verdict) {
        return Ok(Outcome {
            notes,
            ..Outcome::default()
        });
    }
    if !outlives_lease {
        notes.push(format!(
            "the controller kept running, yet its tokens were not stored: {}",
            state(&verdict)
        ));
    }
    let mut out = new_code_then_ready(c, "restart", "restart-code").await?;
    out.notes.splice(0..0, notes);
    out.not_revoked = leaked;
    if out.not_ready == 0 && c.not_ready(&names, Duration::ZERO).await > 0 {
        out.not_ready = 1;
    }
    Ok(out)
}

/// Two replicas, 100 instances whose tokens live 20 s (refreshed at half-life),
/// refresh tokens rotating (a stricter Dropbox: see the emulator); the leader
/// is SIGSTOPped for twice the lease while refreshes are going on (Dropbox
/// takes 1 s to answer, so some are in flight), then SIGCONTed: two live
/// leaders. The old one must write nothing after the stop (audit log); no
/// refresh token may be burned, no stored access token dead, no Ready flap.
async fn failover(c: &mut Ctx) -> Result<Outcome> {
    let lease = Duration::from_secs(4);
    c.emu.set_access_token_ttl(Duration::from_secs(20));
    c.emu.rotate_refresh_tokens(true);
    let a = c.controller_as("replica-a", "process-1", None)?;
    let a = c.start(a).await;
    wait_leading(&a, Duration::from_secs(15)).await?;
    let b = c.controller_as("replica-b", "process-2", None)?;
    let b = c.start(b).await;
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
    c.emu.set_latency("/oauth2/token", Duration::from_secs(1));
    tokio::time::sleep(Duration::from_secs(1)).await;
    let flaps = c.watch_flaps(&names);
    let refreshes_before = c.grant_calls("refresh_token");
    let mut notes = Vec::new();
    let (mut leader, standby) = (a, b);
    let stopped_at = SystemTime::now();
    signal(&leader, libc::SIGSTOP);
    let stopped = Instant::now();
    eprintln!("stopped the leader after {refreshes_before} refreshes");
    tokio::time::sleep(2 * lease).await;
    signal(&leader, libc::SIGCONT);
    c.emu.set_latency("/oauth2/token", Duration::ZERO);
    if !wait_exit(&mut leader, Duration::from_secs(20)).await {
        notes.push("the stale leader kept running".into());
        leader.kill();
    }
    // Every token is refreshed again by the new leader (each lives 20 s).
    let deadline = Instant::now() + Duration::from_secs(45);
    while c.grant_calls("refresh_token") < refreshes_before + 100 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!(
        "{} refreshes in {:?} after the stop; standby leads: {}",
        c.grant_calls("refresh_token") - refreshes_before,
        stopped.elapsed(),
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
    let stale = c.writes_by("process-1", stopped_at);
    if !stale.is_empty() {
        eprintln!("stale leader's writes: {stale:?}");
    }
    let flapped = flaps.stop();
    notes.extend(flapped.iter().take(5).cloned());
    Ok(Outcome {
        not_ready,
        flaps: Some(flapped.len()),
        stale_writes: Some(stale.len()),
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
    // must not travel on into status or Events (docs/security.md).
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
        reconciled_all(&controller, names.len()).await;
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

/// A controller restarted 3 times (SIGTERM, SIGKILL, SIGTERM) with 4 settled
/// instances (events off) reads none of their Secrets (the API server's audit
/// log, by the controller's user): what a restart decides from is in the
/// instance and the Secrets' metadata. The app Secret they share is read at
/// each start (printed, not bounded: concurrent first reads may each miss the
/// empty cache). A new code put in one code Secret while the controller is down
/// is exchanged at the next start all the same; an instance without the code
/// Secret's version (as an earlier release left it) gets it recorded.
async fn restart_reads(c: &mut Ctx) -> Result<Outcome> {
    const USER: &str = "process-1";
    let start = |c: &Ctx, n: usize| c.controller_as(&format!("controller-{n}"), USER, None);
    let mut controller = c.start(start(c, 0)?).await;
    let names = c.many("s", 4, false).await?;
    c.all_ready(&names).await?;
    // s-3 as an earlier release left it, without the code Secret's version:
    // the controller records it again (one write), so restarts skip it too.
    let version_annotation = "elements.dropbox-operator.dev/code-secret-version";
    c.instances
        .patch(
            "s-3",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {version_annotation: null}}})),
        )
        .await?;
    let deadline = Instant::now() + READY_TIMEOUT;
    while !c
        .instances
        .get("s-3")
        .await?
        .annotations()
        .contains_key(version_annotation)
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the code Secret's version was not recorded again on s-3"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let since = SystemTime::now();
    let mut new_code = None;
    for n in 1..=3 {
        if n == 2 {
            controller.kill();
            new_code = Some(c.code("s-0-code").await?);
        } else {
            controller.terminate(Duration::from_secs(10));
        }
        controller = c.start(start(c, n)?).await;
        reconciled_all(&controller, names.len()).await;
    }
    let mut notes = Vec::new();
    // The new code: exchanged, and the instance on its tokens.
    let new_code = new_code.context("a new code")?;
    let fingerprint = dropbox_operator::controller::inputs::fingerprint(&new_code);
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let i = c.instances.get("s-0").await?;
        let fp = i.status.as_ref().and_then(|s| s.code_fingerprint.clone());
        if fp.as_deref() == Some(fingerprint.as_str()) && is_ready(&i) {
            break;
        }
        if Instant::now() > deadline {
            notes.push(format!(
                "the code put in while the controller was down was not taken: s-0 is on {fp:?}, {}",
                state(&i)
            ));
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let sent = c
        .emu
        .calls_to("/oauth2/token")
        .iter()
        .filter(|call| call.form.get("code") == Some(&new_code))
        .count();
    if sent != 1 {
        notes.push(format!("the new code was sent {sent} times (1 expected)"));
    }
    // Reads: none of the settled instances' Secrets; s-0's after its new code.
    let reads = c.secret_reads_by(USER, since);
    let mut settled_reads: Vec<String> = reads
        .iter()
        .filter(|(name, _)| name.starts_with("s-") && !name.starts_with("s-0-"))
        .map(|(name, n)| format!("{name} {n}x"))
        .collect();
    settled_reads.sort();
    let app_reads = reads.get("dropbox-app").copied().unwrap_or(0);
    eprintln!(
        "restart-reads: Secret reads by the restarted controllers: {reads:?} \
         (settled instances' Secrets: {}; app Secret: {app_reads} in 3 starts)",
        settled_reads.len()
    );
    if !settled_reads.is_empty() {
        notes.push(format!(
            "restarts read the Secrets of settled instances: {}",
            settled_reads.join(", ")
        ));
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

// ---- rows of issue 23: fenced decisions, spent codes, revocation, names ---------

/// A 253-character instance name (the longest the API allows): the token Secret
/// gets a shortened name, Events are published, the instance becomes Ready and
/// is deleted with its token revoked.
async fn longest_name(c: &mut Ctx) -> Result<Outcome> {
    let _controller = c.start_controller("controller").await;
    let name = format!(
        "{}.{}.{}.{}",
        "a".repeat(63),
        "b".repeat(63),
        "c".repeat(63),
        "d".repeat(61)
    );
    anyhow::ensure!(name.len() == 253, "the name has {} characters", name.len());
    // First without a code: its AwaitingAuthorization is a Warning Event.
    c.oauth(&name, "long-code", false).await?;
    let names = vec![name.clone()];
    let mut notes = Vec::new();
    let api = c.instances.clone();
    let waiting = support::eventually(
        "AwaitingAuthorization",
        Duration::from_secs(20),
        || {
            let api = api.clone();
            let name = name.clone();
            async move { Ok(api.get(&name).await?) }
        },
        |i: &DropboxElementInstance| reason(i, "Authorized") == "AwaitingAuthorization",
    )
    .await;
    if waiting.is_err() {
        notes.push(format!(
            "not AwaitingAuthorization: {}",
            c.describe(&names).await
        ));
    }
    c.code("long-code").await?;
    let not_ready = c.not_ready(&names, READY_TIMEOUT).await;
    if not_ready > 0 {
        notes.push(c.describe(&names).await);
    }
    if c.warnings(&name).await?.is_empty() {
        notes.push("no Warning Event was published for the instance".into());
    }
    let i = c.get(&name).await?;
    let secret_name = i
        .status
        .as_ref()
        .and_then(|s| s.token.as_ref())
        .and_then(|t| t.secret_name.clone())
        .unwrap_or_default();
    let found = match secret_name.is_empty() {
        true => None,
        false => c.secrets.get_opt(&secret_name).await?,
    };
    match found {
        Some(_) if secret_name.len() <= 253 => {}
        _ => notes.push(format!(
            "status.token.secretName {secret_name:?} does not name the token Secret"
        )),
    }
    c.instances.delete(&name, &DeleteParams::default()).await?;
    c.wait_gone(&names, Duration::from_secs(20)).await?;
    Ok(Outcome {
        not_ready,
        not_revoked: c.not_revoked(),
        notes,
        ..Outcome::default()
    })
}

/// Two instances name one code Secret. The first (zeta) records the code and
/// sends it; the controller is killed before the answer; the second (alpha,
/// listed and so reconciled first) is created while no controller runs. The
/// restarted controller must find zeta's durable record of the code (its
/// status says nothing yet) and not send it for alpha.
async fn claims_across_restart(c: &mut Ctx) -> Result<Outcome> {
    c.emu.hang_after_consuming_code(Duration::from_secs(3));
    let mut controller = c.start_controller("controller-1").await;
    c.code("shared-code").await?;
    c.oauth("zeta", "shared-code", false).await?;
    c.wait_exchanges(1, Duration::from_secs(20)).await?;
    controller.kill();
    c.emu.hang_after_consuming_code(Duration::ZERO);
    c.oauth("alpha", "shared-code", false).await?;
    let _controller = c.start_controller("controller-2").await;
    let mut notes = Vec::new();
    for name in ["zeta", "alpha"] {
        let settled = c.settled(name, Duration::from_secs(20)).await;
        eprintln!("{name} after the restart: {}", state(&c.get(name).await?));
        if settled.is_err() {
            notes.push(format!("{name} did not settle"));
        }
    }
    if reason(&c.get("alpha").await?, "Authorized") != "CodeAlreadyUsed" {
        notes.push(format!(
            "alpha: want CodeAlreadyUsed, {}",
            state(&c.get("alpha").await?)
        ));
    }
    // A code of its own for each makes both Ready.
    c.code("alpha-code").await?;
    c.instances
        .patch(
            "alpha",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"authentication": {"codeSecretRef": {"name": "alpha-code"}}}}),
            ),
        )
        .await?;
    let mut out = new_code_then_ready(c, "zeta", "shared-code").await?;
    let names = vec!["zeta".to_owned(), "alpha".to_owned()];
    out.not_ready = c.not_ready(&names, READY_TIMEOUT).await;
    if out.not_ready > 0 {
        notes.push(c.describe(&names).await);
    }
    out.notes.splice(0..0, notes);
    Ok(out)
}

/// Two replicas and an instance whose code exchange the leader has sent:
/// replica-a (user process-1, reaching the API server at `a_server`, else
/// directly) leads, replica-b (process-2) stands by; Dropbox answers the
/// exchange after `hold`.
struct TwoLeaders {
    stale: Process,
    standby: Process,
    /// The code the stale leader sent.
    first: String,
    name: &'static str,
}

async fn two_replicas_mid_exchange(
    c: &mut Ctx,
    name: &'static str,
    hold: Duration,
    a_server: Option<&str>,
) -> Result<TwoLeaders> {
    c.emu.hang_after_consuming_code(hold);
    let a = c
        .controller_as("replica-a", "process-1", a_server)?
        .env("DROPBOX_TIMEOUT", "30s");
    let stale = c.start(a).await;
    wait_leading(&stale, Duration::from_secs(15)).await?;
    let b = c
        .controller_as("replica-b", "process-2", None)?
        .env("DROPBOX_TIMEOUT", "30s");
    let standby = c.start(b).await;
    let first = c.code(&format!("{name}-code")).await?;
    c.oauth(name, &format!("{name}-code"), false).await?;
    c.wait_exchanges(1, Duration::from_secs(20)).await?;
    Ok(TwoLeaders {
        stale,
        standby,
        first,
        name,
    })
}

/// After the fault: the stale leader must stop on its own, the standby lead,
/// the stale leader have written nothing since `since` (audit log) and revoked
/// the tokens it could not store; a new code makes the instance Ready.
async fn after_the_takeover(c: &mut Ctx, mut t: TwoLeaders, since: SystemTime) -> Result<Outcome> {
    let mut notes = Vec::new();
    if !wait_exit(&mut t.stale, Duration::from_secs(25)).await {
        notes.push("the stale leader kept running".into());
        t.stale.kill();
    }
    c.emu.hang_after_consuming_code(Duration::ZERO);
    if wait_leading(&t.standby, Duration::from_secs(10))
        .await
        .is_err()
    {
        notes.push("the standby does not lead".into());
    }
    let stale = c.writes_by("process-1", since);
    eprintln!(
        "the stale leader's writes: {stale:?}; after the takeover: {}",
        state(&c.get(t.name).await?)
    );
    let leaked = usize::from(c.emu.grant_of_code_alive(&t.first) == Some(true));
    if leaked > 0 {
        notes.push("the tokens of the first code were neither stored nor revoked".into());
    }
    let mut out = new_code_then_ready(c, t.name, &format!("{}-code", t.name)).await?;
    out.notes.splice(0..0, notes);
    out.stale_writes = Some(stale.len());
    out.not_revoked = leaked;
    Ok(out)
}

/// Two replicas; Dropbox holds the answer of the leader's code exchange while
/// the leader is SIGSTOPped for twice the lease (the answer arrives meanwhile
/// and waits); the standby takes over, then the old leader runs again with the
/// answer in hand. It must write nothing (audit log), stop on its own, and
/// revoke the tokens it could not store; the code is never sent again.
async fn sigstop_mid_exchange(c: &mut Ctx) -> Result<Outcome> {
    let lease = Duration::from_secs(4);
    let t = two_replicas_mid_exchange(c, "stop", lease + Duration::from_secs(2), None).await?;
    let stopped_at = SystemTime::now();
    signal(&t.stale, libc::SIGSTOP);
    tokio::time::sleep(2 * lease).await;
    signal(&t.stale, libc::SIGCONT);
    after_the_takeover(c, t, stopped_at).await
}

/// Two replicas; the leader reaches the API server through a proxy the test
/// controls. While Dropbox holds the answer of its code exchange, the proxy
/// stops forwarding (connections stay open); the standby takes over; Dropbox
/// answers the old leader, which cannot know it lost the lease; then the proxy
/// forwards again, delivering whatever was held. The old leader must have
/// stopped on its own, written nothing after the cut (audit log), and revoked
/// the tokens it could not store.
async fn black_hole_mid_exchange(c: &mut Ctx) -> Result<Outcome> {
    let proxy = support::proxy::Proxy::start(support::cluster().apiserver_addr()).await;
    let via_proxy = format!("https://{}", proxy.addr);
    let mut t =
        two_replicas_mid_exchange(c, "cut", Duration::from_secs(8), Some(&via_proxy)).await?;
    let cut_at = SystemTime::now();
    proxy.black_hole();
    // Past the held answer and the lease: the standby leads, the old leader has
    // the tokens.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let stepped_down = t.stale.exited();
    proxy.heal();
    eprintln!("the cut-off leader stepped down before the heal: {stepped_down}");
    // Whatever the proxy held reaches the API server now.
    tokio::time::sleep(Duration::from_secs(2)).await;
    after_the_takeover(c, t, cut_at).await
}

/// GitOps self-heal: an instance authorized with code A is re-authorized with
/// code B; then the code Secret gets A back (a GitOps tool restoring it). Nothing
/// is sent, the tokens of B keep working, Ready never flaps, and Authorized's
/// message says the Secret holds an already-used code.
async fn self_heal(c: &mut Ctx) -> Result<Outcome> {
    let _controller = c.start_controller("controller").await;
    let a = c.code("heal-code").await?;
    c.oauth("heal", "heal-code", false).await?;
    let names = vec!["heal".to_owned()];
    c.all_ready(&names).await?;
    let fp_a = c.get("heal").await?.status.and_then(|s| s.code_fingerprint);
    c.code("heal-code").await?;
    let api = c.instances.clone();
    support::eventually(
        "Ready with code B",
        Duration::from_secs(20),
        || {
            let api = api.clone();
            async move { Ok(api.get("heal").await?) }
        },
        |i: &DropboxElementInstance| {
            is_ready(i) && i.status.as_ref().and_then(|s| s.code_fingerprint.clone()) != fp_a
        },
    )
    .await?;
    let flaps = c.watch_flaps(&names);
    let exchanges = c.exchanges();
    c.put_secret("heal-code", &[("code", &a)]).await?;
    let mut notes = Vec::new();
    let said = support::eventually(
        "the message about an already-used code",
        Duration::from_secs(15),
        || {
            let api = api.clone();
            async move { Ok(api.get("heal").await?) }
        },
        |i: &DropboxElementInstance| {
            support::condition(i, "Authorized").is_some_and(|c| c.message.contains("already used"))
        },
    )
    .await;
    if said.is_err() {
        notes.push(format!(
            "Authorized does not say so: {}",
            state(&c.get("heal").await?)
        ));
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    if c.exchanges() != exchanges {
        notes.push(format!(
            "{} exchanges after the old code came back",
            c.exchanges() - exchanges
        ));
    }
    let token = c
        .token_secret("heal")
        .await?
        .and_then(|s| secret_text(&s, "access_token"));
    if !token.is_some_and(|t| c.emu.is_access_token_valid(&t)) {
        notes.push("the stored access token is not valid".into());
    }
    let flapped = flaps.stop();
    notes.extend(flapped.iter().cloned());
    Ok(Outcome {
        not_ready: c.not_ready(&names, Duration::from_secs(5)).await,
        flaps: Some(flapped.len()),
        notes,
        ..Outcome::default()
    })
}

/// The controller is down while access tokens expire; then the app Secret is
/// deleted and the namespace with it. The controller comes back: it must
/// refresh each expired token (with the app credentials the token Secret keeps)
/// to revoke its family, and the namespace goes away.
async fn namespace_deleted_expired(c: &mut Ctx) -> Result<Outcome> {
    c.emu.set_access_token_ttl(Duration::from_secs(4));
    let mut controller = c.start_controller("controller-1").await;
    let names = c.many("x", 3, false).await?;
    c.all_ready(&names).await?;
    controller.terminate(Duration::from_secs(10));
    tokio::time::sleep(Duration::from_secs(5)).await;
    let expired = c.emu.live_oauth_access_tokens().len();
    c.secrets
        .delete("dropbox-app", &DeleteParams::default())
        .await?;
    let namespaces: Api<Namespace> = Api::all(c.client.clone());
    namespaces.delete(&c.ns, &DeleteParams::default()).await?;
    let _controller = c.start_controller("controller-2").await;
    let mut notes = Vec::new();
    if expired > 0 {
        notes.push(format!(
            "{expired} access tokens had not expired (the row needs them expired)"
        ));
    }
    let deadline = Instant::now() + Duration::from_secs(45);
    while namespaces.get_opt(&c.ns).await?.is_some() {
        if Instant::now() > deadline {
            notes.push("the namespace is still there after 45 s".into());
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

/// A ValidatingAdmissionPolicy manifest for the row's namespace.
fn admission_policy_manifest(
    name: &str,
    ns: &str,
    operations: &str,
    expression: &str,
    message: &str,
) -> String {
    format!(
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
      operations: {operations}
      resources: ["secrets"]
  validations:
  - expression: "{expression}"
    message: "{message}"
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
"#
    )
}

fn remove_policy(name: &str) -> Result<()> {
    let (ok, _, err) = support::kubectl(&[
        "delete",
        "--ignore-not-found",
        "validatingadmissionpolicybinding,validatingadmissionpolicy",
        name,
    ]);
    anyhow::ensure!(ok, "delete the admission policy: {err}");
    Ok(())
}

/// Dry runs pass, real writes of token Secrets are refused: the code is sent,
/// its tokens live only in memory (TokensNotStored). The instance is deleted
/// then: its tokens must be revoked all the same.
async fn deleted_while_unstored(c: &mut Ctx) -> Result<Outcome> {
    let name = format!("refuse-real-writes-{}", c.ns);
    let manifest = admission_policy_manifest(
        &name,
        &c.ns,
        r#"["CREATE", "UPDATE"]"#,
        "request.dryRun == true || !object.metadata.name.endsWith('-dropbox-token')",
        "token Secrets are refused here, dry runs aside (test policy)",
    );
    let (ok, _, err) = support::kubectl_stdin(&["apply", "-f", "-"], &manifest);
    anyhow::ensure!(ok, "apply the admission policy: {err}");
    // Effective once a real create is refused.
    let probe: Secret = serde_json::from_value(json!({
        "metadata": {"name": "probe-dropbox-token"}, "stringData": {"x": "y"}
    }))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while c
        .secrets
        .create(&PostParams::default(), &probe)
        .await
        .is_ok()
    {
        c.secrets
            .delete("probe-dropbox-token", &DeleteParams::default())
            .await?;
        anyhow::ensure!(
            Instant::now() < deadline,
            "the admission policy never took effect"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let _controller = c.start_controller("controller").await;
    let code = c.code("mem-code").await?;
    c.oauth("mem", "mem-code", false).await?;
    let mut notes = Vec::new();
    let kept = support::wait_condition(
        &c.instances,
        "mem",
        "Authorized",
        "False",
        Some("TokensNotStored"),
        Duration::from_secs(20),
    )
    .await;
    if kept.is_err() || c.emu.grant_of_code_alive(&code) != Some(true) {
        notes.push(format!(
            "the tokens were not issued and kept: {}",
            state(&c.get("mem").await?)
        ));
    }
    c.instances.delete("mem", &DeleteParams::default()).await?;
    let gone = c
        .wait_gone(&["mem".to_owned()], Duration::from_secs(20))
        .await;
    remove_policy(&name)?;
    if let Err(e) = gone {
        notes.push(e.to_string());
    }
    Ok(Outcome {
        not_revoked: c.not_revoked(),
        notes,
        ..Outcome::default()
    })
}

/// A ValidatingAdmissionPolicy refuses any update that leaves a token Secret
/// without the operator's finalizer; then the instance is deleted. The token is
/// revoked, the release is refused: the controller must back off (a bounded
/// number of refused writes), say why in a Warning Event, and finish once the
/// policy is removed.
async fn finalizer_refused(c: &mut Ctx) -> Result<Outcome> {
    let controller = c.controller_as("controller", "process-1", None)?;
    let _controller = c.start(controller).await;
    c.code("keep-code").await?;
    c.oauth("keep", "keep-code", false).await?;
    let names = vec!["keep".to_owned()];
    c.all_ready(&names).await?;
    let name = format!("keep-token-finalizers-{}", c.ns);
    let finalizer = "elements.dropbox-operator.dev/revoke-token";
    let manifest = admission_policy_manifest(
        &name,
        &c.ns,
        r#"["UPDATE"]"#,
        &format!(
            "!object.metadata.name.endsWith('-dropbox-token') || (has(object.metadata.finalizers) && object.metadata.finalizers.exists(f, f == '{finalizer}'))"
        ),
        "test policy: a token Secret keeps its finalizer",
    );
    let (ok, _, err) = support::kubectl_stdin(&["apply", "-f", "-"], &manifest);
    anyhow::ensure!(ok, "apply the admission policy: {err}");
    // Effective once removing a probe's finalizer is refused (a dry run).
    let probe: Secret = serde_json::from_value(json!({
        "metadata": {"name": "probe-dropbox-token", "finalizers": [finalizer]},
        "stringData": {"x": "y"}
    }))?;
    c.secrets.create(&PostParams::default(), &probe).await?;
    let release = Patch::Merge(json!({"metadata": {"finalizers": null}}));
    let dry = PatchParams {
        dry_run: true,
        ..PatchParams::default()
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    while c
        .secrets
        .patch("probe-dropbox-token", &dry, &release)
        .await
        .is_ok()
    {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the admission policy never took effect"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    c.instances.delete("keep", &DeleteParams::default()).await?;
    let refused_for = Duration::from_secs(8);
    tokio::time::sleep(refused_for).await;
    let mut notes = Vec::new();
    let refused = c.refused_writes_by("process-1");
    eprintln!("refused writes in {refused_for:?}: {refused}");
    // Backing off (at most 2 s here, two tries per reconcile): a handful, not a loop.
    if refused > 24 {
        notes.push(format!(
            "{refused} refused writes in {refused_for:?}: no backoff"
        ));
    }
    if refused == 0 {
        notes.push("the release was never refused (the policy did not bite)".into());
    }
    let warnings = c.warnings("keep").await?;
    if !warnings
        .iter()
        .any(|w| w.contains("FinalizerRemovalRefused") && w.contains("keeps its finalizer"))
    {
        notes.push(format!("no Warning names the refusal: {warnings:?}"));
    }
    if c.instances.get_opt("keep").await?.is_none() {
        notes.push("the instance went although its token Secret could not be released".into());
    }
    remove_policy(&name)?;
    if let Err(e) = c.wait_gone(&names, Duration::from_secs(20)).await {
        notes.push(format!("after the policy was removed: {e}"));
    }
    c.secrets
        .patch("probe-dropbox-token", &PatchParams::default(), &release)
        .await?;
    Ok(Outcome {
        not_revoked: c.not_revoked(),
        notes,
        ..Outcome::default()
    })
}

/// apiKey instances are Ready; Dropbox answers 429 to the next account reads,
/// and the controller restarts into them. Authorized and Ready must not flap:
/// a working token stays working while Dropbox is busy.
async fn api_key_rate_limited(c: &mut Ctx) -> Result<Outcome> {
    let mut controller = c.start_controller("controller-0").await;
    let mut names = Vec::new();
    for i in 0..3 {
        let name = format!("key-{i}");
        let token = c.emu.issue_long_lived_token(APP_KEY, ACCOUNT);
        c.put_secret(&name, &[("apiKey", &token)]).await?;
        c.create(
            &name,
            json!({"type": "apiKey", "apiKeySecretRef": {"name": name}}),
            false,
        )
        .await?;
        names.push(name);
    }
    c.all_ready(&names).await?;
    let flaps = c.watch_flaps(&names);
    let route = "/2/users/get_current_account";
    let before = c.emu.calls_to(route).len();
    c.emu.rate_limit_next(route, 9, 1);
    controller.terminate(Duration::from_secs(10));
    let _controller = c.start_controller("controller-1").await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    let limited = c.emu.calls_to(route)[before..]
        .iter()
        .filter(|call| call.status == 429)
        .count();
    let mut notes = Vec::new();
    if limited < 3 {
        notes.push(format!(
            "only {limited} account reads were answered 429 (the burst did not hit)"
        ));
    }
    let flapped = flaps.stop();
    notes.extend(flapped.iter().cloned());
    Ok(Outcome {
        not_ready: c.not_ready(&names, READY_TIMEOUT).await,
        flaps: Some(flapped.len()),
        notes,
        ..Outcome::default()
    })
}

/// One instance's reconcile panics (the test-only fault switch, an
/// annotation): the panic stays with it, and the other instances keep
/// reconciling (their short-lived tokens are refreshed) while it panics again
/// and again.
async fn panic_contained(c: &mut Ctx) -> Result<Outcome> {
    c.emu.set_access_token_ttl(Duration::from_secs(6));
    let mut controller = c.start_controller("controller").await;
    let names = c.many("p", 3, false).await?;
    c.all_ready(&names).await?;
    let annotation = "elements.dropbox-operator.dev/test-fault";
    let set_fault = |value: serde_json::Value| {
        Patch::Merge(json!({"metadata": {"annotations": {annotation: value}}}))
    };
    c.instances
        .patch(
            &names[0],
            &PatchParams::default(),
            &set_fault(json!("panic")),
        )
        .await?;
    let refreshes = c.grant_calls("refresh_token");
    tokio::time::sleep(Duration::from_secs(8)).await;
    let mut notes = Vec::new();
    if controller.exited() {
        notes.push("the panic took the controller down".into());
    } else {
        let contained = controller
            .metric_sum("dropbox_operator_reconcile_panics_total", "")
            .await;
        if contained < 2.0 {
            notes.push(format!(
                "{contained} panics contained (want the fault hit and retried)"
            ));
        }
    }
    // 6 s tokens, refreshed at half-life: the others refresh in 8 s.
    let refreshed = c.grant_calls("refresh_token") - refreshes;
    if refreshed < 2 {
        notes.push(format!("{refreshed} refreshes while one instance panicked"));
    }
    let others = c.not_ready(&names[1..], Duration::from_secs(5)).await;
    if others > 0 {
        notes.push(format!(
            "{others} of the other instances not Ready: {}",
            c.describe(&names[1..]).await
        ));
    }
    c.instances
        .patch(
            &names[0],
            &PatchParams::default(),
            &set_fault(serde_json::Value::Null),
        )
        .await?;
    Ok(Outcome {
        not_ready: c.not_ready(&names, READY_TIMEOUT).await,
        notes,
        ..Outcome::default()
    })
}

/// The controller is removed (killed) with instances Ready; their access
/// tokens expire; the app Secret, then the namespace, are deleted: the
/// namespace hangs on the finalizers. `dropbox-operator release-finalizers -n
/// NS` (the escape hatch docs/operations.md documents) revokes every token family,
/// refreshing the expired tokens with the app credentials the token Secrets
/// keep, and releases the finalizers: the namespace goes away.
async fn released_by_hand(c: &mut Ctx) -> Result<Outcome> {
    c.emu.set_access_token_ttl(Duration::from_secs(4));
    let mut controller = c.start_controller("controller").await;
    let names = c.many("r", 2, false).await?;
    c.all_ready(&names).await?;
    controller.kill();
    tokio::time::sleep(Duration::from_secs(5)).await;
    c.secrets
        .delete("dropbox-app", &DeleteParams::default())
        .await?;
    let namespaces: Api<Namespace> = Api::all(c.client.clone());
    namespaces.delete(&c.ns, &DeleteParams::default()).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut notes = Vec::new();
    if namespaces.get_opt(&c.ns).await?.is_none() {
        notes.push("nothing held the namespace (the finalizers were not there)".into());
    }
    let (ns, api) = (c.ns.clone(), c.emu.url.clone());
    let output = tokio::task::spawn_blocking(move || {
        std::process::Command::new(support::operator::binary())
            .args(["release-finalizers", "--namespace", &ns])
            .env("KUBECONFIG", support::kubeconfig())
            .env("DROPBOX_API_URL", &api)
            .env("DROPBOX_TIMEOUT", "2s")
            .env("RELEASE_REVOKE_TIMEOUT", "5s")
            .output()
    })
    .await??;
    let stdout = String::from_utf8_lossy(&output.stdout);
    eprintln!(
        "release-finalizers ({}): {stdout}{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    if !output.status.success() {
        notes.push(format!("release-finalizers exited with {}", output.status));
    }
    if !stdout.contains("2 instances and 2 token Secrets released; 2 token families revoked") {
        notes.push(format!("the report does not say what was done: {stdout}"));
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    while namespaces.get_opt(&c.ns).await?.is_some() {
        if Instant::now() > deadline {
            notes.push("the namespace is still there 30 s after the release".into());
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
