//! Benchmarks, measured side by side in one run (ratios, not absolute timings:
//! the machine is shared). Ignored by `cargo test`; run with `make bench`
//! (`make bench-scale` for 10,000 instances, `BENCH_INSTANCES=30000` for more),
//! which builds in release mode and writes one section per benchmark to
//! target/bench/ (a text report and a JSON file stamped with the commit, the
//! time and the source tree's digest); `hack/bench-results.py collect` merges
//! them into docs/benchmarks/results.json and `make bench-readme` turns that
//! into docs/performance.md's table and the plots in docs/benchmarks/.
//!
//! The rules every figure here follows (docs/performance.md):
//! - every figure is the median of at least 3 rounds (`BENCH_ROUNDS`), and
//!   every round's value is kept (the table shows their spread);
//! - a baseline makes exactly the calls the measured side makes, and the
//!   benchmark prints both sides' API calls per instance to show it; a
//!   baseline that does the measured side's work runs in a process of its own
//!   (the delivery baseline: the `bench-deliver` example);
//! - completion is detected the same way on both sides (a watch);
//! - time ratios are medians of alternating rounds;
//! - CPU per request is also counted in instructions (callgrind), which the
//!   machine's noise does not move;
//! - latency is measured from each request's scheduled send time (no
//!   coordinated omission) by a load generator in a process of its own (the
//!   `bench-load` example), pinned to another CPU than the ingress, which
//!   reports its own send lateness; each latency names the load it was
//!   measured under.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result};
use base64::Engine as _;
use dropbox_operator::api::DropboxElementInstance;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::core::PartialObjectMeta;
use kube::runtime::watcher::{self, Event, watcher};
use kube::{Client, Resource, ResourceExt};
use serde_json::{Value, json};
use support::bench::{
    Figure, Load, Section, apiserver_requests, cpu_seconds, cpus_of, diff, env_usize,
    example_binary, list, ms, percentile, percentiles_ms, pin_pair, resource_requests, rounds,
    rss_kib, spread, summary, taskset,
};
use support::dropbox::Emulator;
use support::operator::OperatorProcess;
use support::receiver::Receiver;

const APP_KEY: &str = "bench-app";
const APP_SECRET: &str = "bench-app-secret";
const ACCOUNT: &str = "dbid:AAB-bench-account";
const CONCURRENCY: usize = 16;
const SIGNATURE_KEY: &[u8] = b"bench-key";

async fn secret(client: &Client, ns: &str, name: &str, data: Value) {
    let s: Secret = serde_json::from_value(json!({"apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": name}, "stringData": data}))
    .expect("secret");
    Api::<Secret>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &s)
        .await
        .expect("create secret");
}

/// Creates `n` oauth2 instances with their code Secrets (not measured).
async fn populate(client: &Client, ns: &str, emu: &Emulator, n: usize) {
    secret(
        client,
        ns,
        "app",
        json!({"oauth.api.key": APP_KEY, "oauth.api.secret": APP_SECRET}),
    )
    .await;
    futures::stream::iter(0..n)
        .for_each_concurrent(CONCURRENCY, |i| async move {
            let code = emu.issue_code(APP_KEY, ACCOUNT, Some("https://app.example.com/auth"));
            secret(client, ns, &format!("code-{i}"), json!({"code": code})).await;
            let instance: DropboxElementInstance = serde_json::from_value(json!({
                "apiVersion": "elements.dropbox-operator.dev/v1alpha1", "kind": "DropboxElementInstance",
                "metadata": {"name": format!("i-{i}")},
                "spec": {"element": {"key": "dropbox"}, "authentication": {
                    "type": "oauth2", "appSecretRef": {"name": "app"},
                    "codeSecretRef": {"name": format!("code-{i}")},
                    "callbackUrl": "https://app.example.com/auth"}}
            }))
            .expect("instance");
            Api::<DropboxElementInstance>::namespaced(client.clone(), ns)
                .create(&PostParams::default(), &instance)
                .await
                .expect("create instance");
        })
        .await;
}

fn is_write(key: &str) -> bool {
    ["POST ", "PUT ", "PATCH ", "DELETE ", "APPLY "]
        .iter()
        .any(|v| key.starts_with(v))
        && !key.ends_with("(dry run)")
}

/// Writes to objects of instances (not the leader Lease or the ingress's
/// Deployment, which are per controller, not per instance).
fn instance_writes(calls: &BTreeMap<String, f64>) -> f64 {
    // `+ 0.0`: an empty sum is -0.0.
    0.0 + calls
        .iter()
        .filter(|(k, _)| is_write(k))
        .filter(|(k, _)| {
            ["secrets", "dropboxelementinstances", "events", "configmaps"]
                .iter()
                .any(|r| k.split(' ').nth(1).is_some_and(|res| res.starts_with(r)))
        })
        .map(|(_, v)| v)
        .sum::<f64>()
}

fn is_ready(instance: &DropboxElementInstance) -> bool {
    instance.status.as_ref().is_some_and(|s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Ready" && c.status == "True")
    })
}

/// Whether all `n` instances of `api` are Ready (a list: for set-up waits
/// outside any measured time).
async fn all_ready(api: &Api<DropboxElementInstance>, n: usize) -> bool {
    api.list(&kube::api::ListParams::default())
        .await
        .is_ok_and(|l| l.items.len() == n && l.items.iter().all(is_ready))
}

/// Completion, detected the same way for every side: a watch that notes the
/// moment the n-th instance is Ready.
struct ReadyWatch {
    done: tokio::sync::oneshot::Receiver<Milestones>,
    task: tokio::task::JoinHandle<()>,
}

impl ReadyWatch {
    /// Returns once the watch's initial list is in.
    async fn start(api: Api<DropboxElementInstance>, n: usize) -> ReadyWatch {
        let (listed_tx, listed) = tokio::sync::oneshot::channel();
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let task = tokio::spawn(async move {
            let (mut listed_tx, mut done_tx) = (Some(listed_tx), Some(done_tx));
            let mut ready = HashSet::new();
            let mut first = None;
            let mut half = None;
            let mut events = std::pin::pin!(watcher(api, watcher::Config::default()));
            while let Some(event) = events.next().await {
                match event {
                    Ok(Event::InitDone) => {
                        if let Some(tx) = listed_tx.take() {
                            let _ = tx.send(());
                        }
                    }
                    Ok(Event::Apply(i) | Event::InitApply(i)) => {
                        if is_ready(&i) {
                            ready.insert(i.name_any());
                        } else {
                            ready.remove(&i.name_any());
                        }
                    }
                    Ok(Event::Delete(i)) => {
                        ready.remove(&i.name_any());
                    }
                    _ => {}
                }
                if !ready.is_empty() {
                    first.get_or_insert_with(Instant::now);
                }
                if ready.len() * 2 >= n {
                    half.get_or_insert_with(Instant::now);
                }
                if ready.len() >= n
                    && let Some(tx) = done_tx.take()
                {
                    let all = Instant::now();
                    let _ = tx.send(Milestones {
                        first: first.unwrap_or(all),
                        half: half.unwrap_or(all),
                        all,
                    });
                }
            }
        });
        let _ = listed.await;
        ReadyWatch { done, task }
    }

    async fn wait(self, timeout: Duration) -> Result<Milestones> {
        let at = tokio::time::timeout(timeout, self.done)
            .await
            .context("not all instances Ready in time")??;
        self.task.abort();
        Ok(at)
    }
}

/// When the first instance, half of them and all of them were Ready.
struct Milestones {
    first: Instant,
    half: Instant,
    all: Instant,
}

impl Milestones {
    /// "first / half / all" in seconds since `started`.
    fn since(&self, started: Instant) -> String {
        let s = |t: Instant| t.saturating_duration_since(started).as_secs_f64();
        format!(
            "{:.2} / {:.2} / {:.2}",
            s(self.first),
            s(self.half),
            s(self.all)
        )
    }
}

/// The fair baseline for the controller: a plain client loop making exactly the
/// calls the controller makes for a new instance, with the same caching (a
/// watch of instances, a metadata watch of Secrets, the app Secret read once),
/// the same client setup and the same concurrency. No queue, no retry logic,
/// no status computation: what is left is the controller's own overhead.
async fn plain_run(ns: &str, emu_url: &str, n: usize) -> Result<()> {
    let client = support::client().await;
    let instances: Api<DropboxElementInstance> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    // The controller's metadata watch of Secrets (it maps Secret changes to
    // instances); the loop holds one too, so the API server does the same work.
    let meta: Api<PartialObjectMeta<Secret>> = Api::namespaced(client.clone(), ns);
    let meta_watch = tokio::spawn(
        watcher(meta, watcher::Config::default().any_semantic()).for_each(|_| async {}),
    );
    let http = support::dropbox::http_client();
    let app = tokio::sync::OnceCell::<Arc<Secret>>::new();
    let mut seen = HashSet::new();
    let result = watcher(instances.clone(), watcher::Config::default().any_semantic())
        .map_err(anyhow::Error::from)
        .try_filter_map(|event| {
            let fresh = match event {
                Event::Apply(i) | Event::InitApply(i) if seen.insert(i.name_any()) => Some(i),
                _ => None,
            };
            async move { Ok(fresh) }
        })
        .take(n)
        .map_ok(|instance| {
            let (instances, secrets, http, app) = (&instances, &secrets, &http, &app);
            async move {
                let app = app
                    .get_or_try_init(|| async { secrets.get("app").await.map(Arc::new) })
                    .await?;
                plain_reconcile(instances, secrets, app, emu_url, http, &instance).await
            }
        })
        .try_buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await;
    meta_watch.abort();
    result.map(|_| ())
}

/// One new instance, the calls in the controller's order: the code Secret,
/// the token Secret (absent), a server-side dry run of the token Secret's
/// create, the app key and secret checked at Dropbox (`check/app`), the
/// finalizer, the code marker and the code Secret's version in one write, the
/// code exchange at Dropbox, the token Secret's create, the account lookup at
/// Dropbox, the status.
async fn plain_reconcile(
    instances: &Api<DropboxElementInstance>,
    secrets: &Api<Secret>,
    app: &Secret,
    emu_url: &str,
    http: &reqwest::Client,
    instance: &DropboxElementInstance,
) -> Result<()> {
    let name = instance.name_any();
    let data = app.data.as_ref().context("app data")?;
    let key = String::from_utf8_lossy(&data["oauth.api.key"].0).into_owned();
    let app_secret = String::from_utf8_lossy(&data["oauth.api.secret"].0).into_owned();
    let code_name = format!("code-{}", name.trim_start_matches("i-"));
    let code_secret = secrets.get(&code_name).await?;
    let code_version = code_secret.resource_version().unwrap_or_default();
    let code = String::from_utf8_lossy(&code_secret.data.context("data")?["code"].0).into_owned();
    let token_name = format!("{name}-dropbox-token");
    let _ = secrets.get_opt(&token_name).await?;
    let token_secret = |data: Value| -> Result<Secret> {
        Ok(serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": token_name, "ownerReferences": [instance.controller_owner_ref(&())]},
            "stringData": data
        }))?)
    };
    let create = |secret: Secret, dry_run: bool| async move {
        let pp = PostParams {
            dry_run,
            field_manager: Some("plain-loop".into()),
        };
        secrets.create(&pp, &secret).await
    };
    create(token_secret(json!({"access_token": "probe"}))?, true).await?;
    let checked = http
        .post(format!("{emu_url}/2/check/app"))
        .basic_auth(&key, Some(&app_secret))
        .json(&json!({"query": "plain-loop"}))
        .send()
        .await?;
    anyhow::ensure!(
        checked.status().is_success(),
        "check/app: {}",
        checked.status()
    );
    instances
        .patch(
            &name,
            &PatchParams::apply("plain-loop"),
            &Patch::Apply(json!({
                "apiVersion": "elements.dropbox-operator.dev/v1alpha1", "kind": "DropboxElementInstance",
                "metadata": {
                    "finalizers": ["elements.dropbox-operator.dev/revoke-token"],
                    "annotations": {
                        "elements.dropbox-operator.dev/code-sent": format!("sha256:{code}"),
                        "elements.dropbox-operator.dev/code-secret-version": code_version,
                    }
            }})),
        )
        .await?;
    let token: Value = http
        .post(format!("{emu_url}/oauth2/token"))
        .form(&[
            ("grant_type", "authorization_code"),
            ("code", code.as_str()),
            ("client_id", key.as_str()),
            ("client_secret", app_secret.as_str()),
            ("redirect_uri", "https://app.example.com/auth"),
        ])
        .send()
        .await?
        .json()
        .await?;
    let access = token["access_token"]
        .as_str()
        .context("access_token")?
        .to_owned();
    let stored = token_secret(json!({
        "access_token": access, "refresh_token": token["refresh_token"],
        "expires_at": "2030-01-01T00:00:00Z", "account_id": token["account_id"],
        "scope": token["scope"]}))?;
    create(stored, false).await?;
    let account: Value = http
        .post(format!("{emu_url}/2/users/get_current_account"))
        .bearer_auth(&access)
        .header("Content-Type", "application/json")
        .body("null")
        .send()
        .await?
        .json()
        .await?;
    let status = json!({"apiVersion": "elements.dropbox-operator.dev/v1alpha1", "kind": "DropboxElementInstance",
        "status": {"conditions": [{"type": "Ready", "status": "True", "reason": "Ready", "message": "ok",
                                   "lastTransitionTime": "2026-01-01T00:00:00Z"}],
                   "account": {"accountId": account["account_id"], "email": account["email"]}}});
    instances
        .patch_status(
            &name,
            &PatchParams::apply("plain-loop").force(),
            &Patch::Apply(&status),
        )
        .await?;
    Ok(())
}

/// The API calls of both sides, per instance, side by side.
fn call_table(
    out: &mut String,
    n: usize,
    plain: &BTreeMap<String, f64>,
    controller: &BTreeMap<String, f64>,
) -> bool {
    let keys: std::collections::BTreeSet<&String> = plain.keys().chain(controller.keys()).collect();
    let _ = writeln!(
        out,
        "API calls per instance (kube-apiserver's request counters; calls on leases, deployments, services, configmaps and discovery are per controller, compared only for instances, secrets and events):"
    );
    let _ = writeln!(
        out,
        "  {:<52} {:>10} {:>12}",
        "call", "plain loop", "controller"
    );
    let mut same = true;
    for k in keys {
        let (p, c) = (
            plain.get(k).copied().unwrap_or(0.0),
            controller.get(k).copied().unwrap_or(0.0),
        );
        // Calls on instances, their Secrets and Events are per instance; the
        // rest (leader Lease, the ingress's Deployment, Service and heartbeats,
        // discovery) are per controller and time-dependent.
        let per_instance = ["dropboxelementinstances", "secrets", "events"]
            .iter()
            .any(|r| k.split(' ').nth(1).is_some_and(|res| res.starts_with(r)));
        // Neither side GETs an instance: those GETs are kube-controller-manager's
        // garbage collector checking the owner of a new token Secret it has not
        // seen yet, as many as its watch lags, so they differ between runs.
        let garbage_collector = k == "GET dropboxelementinstances";
        // A call both make per instance differs by less than one in twenty instances.
        let per_instance_difference =
            per_instance && !garbage_collector && (p - c).abs() > (n as f64 / 20.0).max(2.0);
        if per_instance_difference {
            same = false;
        }
        let _ = writeln!(
            out,
            "  {:<52} {:>10.2} {:>12.2}{}",
            k,
            p / n as f64,
            c / n as f64,
            if per_instance_difference {
                "   <- differs"
            } else if garbage_collector {
                "   (the garbage collector's)"
            } else {
                ""
            }
        );
    }
    same
}

/// Removes the finalizers of every instance and Secret in `ns` (its controller is
/// stopped: nothing else would) and deletes the namespace, waiting until it is
/// gone, so every round starts on an API server holding what the first held.
async fn cleanup(client: &Client, ns: &str) {
    let api: Api<DropboxElementInstance> = Api::namespaced(client.clone(), ns);
    let names: Vec<String> = api
        .list_metadata(&kube::api::ListParams::default())
        .await
        .map(|l| l.items.iter().map(ResourceExt::name_any).collect())
        .unwrap_or_default();
    futures::stream::iter(names)
        .for_each_concurrent(CONCURRENCY, |name| {
            let api = api.clone();
            async move {
                let _ = api
                    .patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                    )
                    .await;
            }
        })
        .await;
    // The controller's token Secrets carry its finalizer too.
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let held: Vec<String> = secrets
        .list_metadata(&kube::api::ListParams::default())
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|s| s.finalizers().iter().next().is_some())
                .map(ResourceExt::name_any)
                .collect()
        })
        .unwrap_or_default();
    futures::stream::iter(held)
        .for_each_concurrent(CONCURRENCY, |name| {
            let secrets = secrets.clone();
            async move {
                let _ = secrets
                    .patch(
                        &name,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                    )
                    .await;
            }
        })
        .await;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let _ = namespaces.delete(ns, &DeleteParams::default()).await;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(900) {
        if namespaces.get_opt(ns).await.ok().flatten().is_none() {
            settle().await;
            return;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    eprintln!("namespace {ns} still there after 15 min; going on");
}

/// Waits until kube-apiserver has served no resource request for 3 s (at most
/// a minute): the garbage collector's work after a cleanup must not fall into
/// the next round's count of calls.
async fn settle() {
    let started = Instant::now();
    let mut last = resource_requests(&apiserver_requests());
    while started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let now = resource_requests(&apiserver_requests());
        if now == last {
            return;
        }
        last = now;
    }
}

/// The controller with `BENCH_INSTANCES` instances (default 1,000), in
/// `BENCH_ROUNDS` alternating rounds (default 3) against the fair plain loop:
/// time to Ready, API calls and writes per instance, RSS, and a restart per
/// round (resync writes, Secret reads per settled instance, calls). With
/// 5,000 instances or more (or `BENCH_INGRESS_AT_SCALE=1`) also the ingress's
/// RSS with every instance events-enabled, over as many ingress starts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: make bench"]
async fn bench_controller() -> Result<()> {
    let n = env_usize("BENCH_INSTANCES", 1000);
    let rounds = rounds();
    let name = if n == 1000 {
        "controller".to_owned()
    } else {
        format!("controller-{n}")
    };
    let section = Section::start(&name);
    let clean = std::env::var("BENCH_CLEANUP").map_or(true, |v| v != "0");
    let ingress_too = n >= 5000 || std::env::var("BENCH_INGRESS_AT_SCALE").is_ok_and(|v| v == "1");
    // Ten times what 10,000 instances took in the last measurement, at least 15 min.
    let ready_timeout = Duration::from_secs_f64((n as f64 * 0.1).max(900.0));
    let client = support::client().await;
    support::install_crd(&client).await?;
    let emu = Emulator::start().await;
    emu.add_app(APP_KEY, APP_SECRET);
    emu.add_account(ACCOUNT, "bench@example.com", "Bench");
    let log_level = std::env::var("BENCH_LOG_LEVEL").unwrap_or_else(|_| "warn".into());
    // BENCH_CONTROLLER_WRAPPER runs the controller under a program, e.g.
    // `heaptrack -o target/bench/heap` to see where its memory goes.
    let wrapper = std::env::var("BENCH_CONTROLLER_WRAPPER").unwrap_or_default();
    let controller = |ns: &str| {
        let process = OperatorProcess::new(ns, &emu.url)
            .env("CONCURRENCY", &CONCURRENCY.to_string())
            .env("LOG_LEVEL", &log_level);
        let wrapper: Vec<&str> = wrapper.split_whitespace().collect();
        if wrapper.is_empty() {
            process
        } else {
            process.wrapped(&wrapper, Duration::from_secs(60))
        }
    };

    // The controller's memory with no instance, for the cost per instance.
    let mut idle_rss = Vec::new();
    for _ in 0..rounds {
        let idle_ns = support::namespace(&client, "bench-idle").await;
        let idle = controller(&idle_ns).start().await;
        tokio::time::sleep(Duration::from_secs(3)).await;
        idle_rss.push(rss_kib(idle.pid().context("pid")?).0 as f64 / 1024.0);
    }
    let (idle_median, _, _) = spread(&idle_rss);

    // A warm-up round of each side, not measured: the first start of a binary
    // and the API server's first writes to a new resource are slower.
    let warmup = env_usize("BENCH_WARMUP", 100).min(n);
    if warmup > 0 {
        let ns = support::namespace(&client, "bench-warm-plain").await;
        populate(&client, &ns, &emu, warmup).await;
        let watch = ReadyWatch::start(Api::namespaced(client.clone(), &ns), warmup).await;
        plain_run(&ns, &emu.url, warmup).await?;
        watch.wait(Duration::from_secs(300)).await?;
        let ns_controller = support::namespace(&client, "bench-warm-controller").await;
        populate(&client, &ns_controller, &emu, warmup).await;
        let watch =
            ReadyWatch::start(Api::namespaced(client.clone(), &ns_controller), warmup).await;
        let warm = controller(&ns_controller).start().await;
        watch.wait(Duration::from_secs(300)).await?;
        drop(warm);
        if clean {
            cleanup(&client, &ns).await;
            cleanup(&client, &ns_controller).await;
        }
    }

    // Alternating rounds: plain loop, controller (and its restart), plain loop, ...
    // Each round's namespaces are filled just before it (not measured) and
    // removed after it.
    let (mut plain_s, mut controller_s) = (Vec::new(), Vec::new());
    // First, half and all Ready per round: start-up shows in the first,
    // throughput in the slope after it.
    let (mut plain_milestones, mut controller_milestones) = (Vec::new(), Vec::new());
    let (mut plain_calls, mut controller_calls) = (BTreeMap::new(), BTreeMap::new());
    let (mut writes, mut calls_first, mut plain_calls_first) = (Vec::new(), Vec::new(), Vec::new());
    let (mut rss, mut peak) = (Vec::new(), Vec::new());
    let (mut resync_writes, mut resync_s, mut secret_gets, mut secret_lists, mut restart_calls) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut resync = BTreeMap::new();
    let mut same_calls = Vec::new();
    let mut ingress_rss = Vec::new();
    let mut ingress_synced = Vec::new();
    for round in 0..rounds {
        let ns = support::namespace(&client, "bench-plain").await;
        populate(&client, &ns, &emu, n).await;
        let api = Api::<DropboxElementInstance>::namespaced(client.clone(), &ns);
        let before = apiserver_requests();
        let watch = ReadyWatch::start(api, n).await;
        let started = Instant::now();
        plain_run(&ns, &emu.url, n).await?;
        let done = watch.wait(ready_timeout).await?;
        plain_s.push(done.all.duration_since(started).as_secs_f64());
        plain_milestones.push(done.since(started));
        tokio::time::sleep(Duration::from_secs(3)).await;
        plain_calls = diff(&apiserver_requests(), &before);
        plain_calls_first.push(resource_requests(&plain_calls) / n as f64);
        if clean {
            cleanup(&client, &ns).await;
        }

        let ns = support::namespace(&client, "bench-controller").await;
        populate(&client, &ns, &emu, n).await;
        let api = Api::<DropboxElementInstance>::namespaced(client.clone(), &ns);
        let before = apiserver_requests();
        let watch = ReadyWatch::start(api, n).await;
        let started = Instant::now();
        let mut process = controller(&ns).start().await;
        let done = watch.wait(ready_timeout).await?;
        controller_s.push(done.all.duration_since(started).as_secs_f64());
        controller_milestones.push(done.since(started));
        tokio::time::sleep(Duration::from_secs(3)).await;
        controller_calls = diff(&apiserver_requests(), &before);
        writes.push(instance_writes(&controller_calls) / n as f64);
        calls_first.push(resource_requests(&controller_calls) / n as f64);
        let (r, p) = rss_kib(process.pid().context("pid")?);
        rss.push(r as f64 / 1024.0);
        peak.push(p as f64 / 1024.0);
        let mut table = String::new();
        same_calls.push(call_table(&mut table, n, &plain_calls, &controller_calls));

        // A restart: the new controller reconciles every settled instance again.
        process.terminate(Duration::from_secs(10));
        let before = apiserver_requests();
        let resync_started = Instant::now();
        let process = controller(&ns).start().await;
        while process
            .metric_sum("dropbox_operator_reconciles_total", "")
            .await
            < n as f64
        {
            anyhow::ensure!(
                resync_started.elapsed() < ready_timeout,
                "resync did not finish"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        resync_s.push(resync_started.elapsed().as_secs_f64());
        tokio::time::sleep(Duration::from_secs(3)).await;
        resync = diff(&apiserver_requests(), &before);
        resync_writes.push(instance_writes(&resync) / n as f64);
        secret_gets.push(resync.get("GET secrets").copied().unwrap_or(0.0) / n as f64);
        secret_lists.push(resync.get("LIST secrets").copied().unwrap_or(0.0));
        restart_calls.push(resource_requests(&resync) / n as f64);

        // At scale, in the last round: the ingress with every instance
        // events-enabled in its cache, started `rounds` times.
        if ingress_too && round + 1 == rounds {
            for (r, synced) in ingress_at_scale(&client, &ns, &emu.url, n, rounds).await? {
                ingress_rss.push(r as f64 / 1024.0);
                ingress_synced.push(synced);
            }
        }
        drop(process);
        if clean {
            cleanup(&client, &ns).await;
        }
    }

    let (plain_median, _, _) = spread(&plain_s);
    let (ctl_median, _, _) = spread(&controller_s);
    let ratios: Vec<f64> = controller_s
        .iter()
        .zip(&plain_s)
        .map(|(c, p)| c / p)
        .collect();
    let ratio = ctl_median / plain_median;
    let same = same_calls.iter().all(|s| *s);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "## controller: {n} instances to Ready (concurrency {CONCURRENCY}, {rounds} alternating rounds)"
    );
    let _ = writeln!(
        out,
        "plain loop: {} s (rounds: {})",
        summary(&plain_s, 2),
        list(&plain_s, 2)
    );
    let _ = writeln!(
        out,
        "controller: {} s (rounds: {})",
        summary(&controller_s, 2),
        list(&controller_s, 2)
    );
    let _ = writeln!(
        out,
        "ratio of medians {ratio:.2}; per round: {}",
        list(&ratios, 2)
    );
    let _ = writeln!(
        out,
        "seconds to the first / half / all Ready, per round: plain loop {}; controller {}",
        plain_milestones.join(", "),
        controller_milestones.join(", ")
    );
    let same_last = call_table(&mut out, n, &plain_calls, &controller_calls);
    let _ = writeln!(
        out,
        "same calls per instance on both sides: {same} (every round; last round above: {same_last})"
    );
    let _ = writeln!(
        out,
        "restart (last round, {:.1} s), calls:",
        resync_s.last().copied().unwrap_or_default()
    );
    for (k, v) in &resync {
        let _ = writeln!(out, "  {k}: {v}");
    }
    let per_instance_kib: Vec<f64> = rss
        .iter()
        .map(|r| (r - idle_median).max(0.0) * 1024.0 / n as f64)
        .collect();
    let prefix = if n == 1000 { "" } else { "scale_" };
    let id = |s: &str| format!("{prefix}{s}");
    let mut figures = vec![
        Figure::of_rounds(
            id("controller_ratio"),
            format!("{n} instances to Ready: controller / fair plain loop"),
            ratios.clone(),
            "x",
        )
        .with_value(ratio)
        .at_most(1.2)
        .detail(format!(
            "ratio of the medians; {} s / {} s; same calls: {same}",
            summary(&controller_s, 2),
            summary(&plain_s, 2)
        )),
        Figure::of_rounds(
            id("writes_first"),
            format!("API writes per instance, first reconcile ({n})"),
            writes,
            "writes",
        )
        .at_most(3.0),
        Figure::of_rounds(
            id("calls_first"),
            format!("API calls per instance, first reconcile ({n})"),
            calls_first,
            "calls",
        )
        .detail(format!(
            "plain loop {}; every request kube-apiserver counted while the instances turned Ready, watches left out",
            summary(&plain_calls_first, 2)
        )),
        Figure::of_rounds(
            id("writes_resync"),
            format!("API writes per instance, resync after a restart ({n})"),
            resync_writes,
            "writes",
        )
        .at_most(0.0),
        Figure::of_rounds(
            id("restart_secret_gets"),
            format!("Secret reads (GET) per settled instance on a controller restart ({n})"),
            secret_gets,
            "reads",
        )
        .at_most(0.1)
        .detail(format!(
            "LISTs of Secrets per restart: {}; kube-apiserver's request counters over the restart",
            list(&secret_lists, 0)
        )),
        Figure::of_rounds(
            id("restart_calls"),
            format!("API calls per settled instance on a controller restart ({n})"),
            restart_calls,
            "calls",
        )
        .detail(format!(
            "until every instance was reconciled again: {} s",
            summary(&resync_s, 1)
        )),
        Figure::of_rounds(
            id("controller_rss"),
            format!("controller RSS with {n} Ready instances"),
            rss.clone(),
            "MiB",
        )
        .at_most(if n <= 1000 { 50.0 } else { 80.0 })
        .detail(format!(
            "peak {} MiB; idle (no instance) {} MiB",
            summary(&peak, 1),
            summary(&idle_rss, 1)
        )),
        Figure::of_rounds(
            id("controller_kib_per_instance"),
            format!("controller memory per instance ((RSS - idle RSS) / {n})"),
            per_instance_kib,
            "KiB",
        ),
    ];
    if !ingress_rss.is_empty() {
        figures.push(
            Figure::of_rounds(
                id("ingress_rss"),
                format!("ingress RSS with {n} events-enabled instances in its cache"),
                ingress_rss.clone(),
                "MiB",
            )
            .detail(format!(
                "each after its start-up sync ({} instances synced); one ingress start per round",
                list(&ingress_synced, 0)
            )),
        );
    }
    let per_instance = |m: &BTreeMap<String, f64>| -> BTreeMap<String, f64> {
        m.iter().map(|(k, v)| (k.clone(), v / n as f64)).collect()
    };
    let data = json!({
        "instances": n,
        "rounds": rounds,
        "controller_ready_s": controller_s,
        "plain_ready_s": plain_s,
        "controller_rss_mib": rss,
        "controller_peak_rss_mib": peak,
        "idle_rss_mib": idle_rss,
        "ingress_rss_mib": if ingress_rss.is_empty() { Value::Null } else { json!(ingress_rss) },
        "milestones_s": {"plain": plain_milestones, "controller": controller_milestones},
        "calls_per_instance_last_round": {"plain": per_instance(&plain_calls), "controller": per_instance(&controller_calls)},
        "restart_calls_per_instance_last_round": per_instance(&resync),
        "restart_s": resync_s,
    });
    section.record(&out, &figures, data);
    anyhow::ensure!(same, "the baseline's calls differ from the controller's");
    Ok(())
}

/// Turns events on for all `n` instances of `ns`, waits until the controller
/// projected them, then starts an ingress `starts` times, one after the other:
/// its RSS (KiB) once its start-up sync went through every instance, with the
/// number synced.
async fn ingress_at_scale(
    client: &Client,
    ns: &str,
    emu_url: &str,
    n: usize,
    starts: usize,
) -> Result<Vec<(u64, f64)>> {
    let receiver = Receiver::start(None).await;
    let api: Api<DropboxElementInstance> = Api::namespaced(client.clone(), ns);
    let patch = json!({"spec": {"events": {"enabled": true, "callbackUrl": receiver.url}}});
    futures::stream::iter(0..n)
        .map(|i| {
            let (api, patch) = (api.clone(), patch.clone());
            async move {
                api.patch(
                    &format!("i-{i}"),
                    &PatchParams::default(),
                    &Patch::Merge(&patch),
                )
                .await
                .map(|_| ())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;
    let configmaps: Api<k8s_openapi::api::core::v1::ConfigMap> =
        Api::namespaced(client.clone(), ns);
    let started = Instant::now();
    loop {
        let cursors = configmaps
            .list_metadata(&kube::api::ListParams::default())
            .await?
            .items
            .iter()
            .filter(|c| c.name_any().starts_with("dropbox-cursor-"))
            .count();
        if cursors >= n {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1800),
            "only {cursors} of {n} cursors after 30 min"
        );
        tokio::time::sleep(Duration::from_secs(5)).await;
    }
    let mut measured = Vec::new();
    for _ in 0..starts {
        let mut ingress = OperatorProcess::ingress(ns, emu_url)
            .env("ALLOWED_CALLBACK_CIDRS", "127.0.0.0/8")
            .env("LOG_LEVEL", "warn")
            .start()
            .await;
        let started = Instant::now();
        let mut synced = 0.0;
        while synced < n as f64 && started.elapsed() < Duration::from_secs(900) {
            tokio::time::sleep(Duration::from_secs(2)).await;
            synced = ingress.metric_sum("dropbox_ingress_syncs_total", "").await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (rss, _) = rss_kib(ingress.pid().context("ingress pid")?);
        measured.push((rss, synced));
        ingress.terminate(Duration::from_secs(10));
    }
    Ok(measured)
}

async fn blast(
    http: &reqwest::Client,
    url: &str,
    body: &str,
    signature: &str,
    count: usize,
    concurrency: usize,
) {
    futures::stream::iter(0..count)
        .for_each_concurrent(concurrency, |_| async {
            let r = http
                .post(url)
                .header("X-Dropbox-Signature", signature)
                .body(body.to_owned())
                .send()
                .await
                .expect("send webhook");
            assert_eq!(r.status(), 200);
        })
        .await;
}

/// A webhook body of about 1 KiB (accounts no instance has: pure acceptance cost).
fn kib_body() -> String {
    let accounts: Vec<String> = (0..26)
        .map(|i| format!("dbid:AAB-unknown-account-{i:04}"))
        .collect();
    let uids: Vec<u64> = (0..26).map(|i| 1_000_000 + i).collect();
    let body = json!({"list_folder": {"accounts": accounts}, "delta": {"users": uids}}).to_string();
    assert!(
        (900..1200).contains(&body.len()),
        "body is {} bytes",
        body.len()
    );
    body
}

fn strs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn bare_webhook_binary() -> PathBuf {
    example_binary("bare-webhook")
}

/// Starts the bare handler (optionally under a wrapper such as valgrind);
/// returns the process and its webhook URL.
/// With `app_secret` the handler also checks the webhook's signature.
fn start_bare(wrapper: &[&str], app_secret: Option<&str>) -> Result<(std::process::Child, String)> {
    let mut cmd = match wrapper.split_first() {
        Some((program, args)) => {
            let mut cmd = std::process::Command::new(program);
            cmd.args(args).arg(bare_webhook_binary());
            cmd
        }
        None => std::process::Command::new(bare_webhook_binary()),
    };
    if let Some(secret) = app_secret {
        cmd.env("BARE_APP_SECRET", secret);
    }
    cmd.stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null());
    let mut bare = support::controlplane::spawn_owned(cmd)
        .with_context(|| format!("run {}", bare_webhook_binary().display()))?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(bare.stdout.take().context("stdout")?),
        &mut line,
    )?;
    Ok((
        bare,
        format!("http://{}/webhooks/dropbox/{APP_KEY}", line.trim()),
    ))
}

/// Instructions (callgrind's `Ir`) the process under callgrind executed while
/// `work` ran: counters zeroed before, dumped after.
async fn instructions<F: std::future::Future<Output = ()>>(
    pid: u32,
    out_base: &Path,
    work: F,
) -> Result<u64> {
    let control = |arg: &str| {
        let status = std::process::Command::new("callgrind_control")
            .arg(arg)
            .arg(pid.to_string())
            .stdout(std::process::Stdio::null())
            .status()
            .context("run callgrind_control")?;
        anyhow::ensure!(status.success(), "callgrind_control {arg} failed");
        Ok(())
    };
    control("-z")?;
    work.await;
    let dumps_before = dumps(out_base);
    control("-d")?;
    let dump = dumps(out_base)
        .into_iter()
        .find(|d| !dumps_before.contains(d))
        .context("a new callgrind dump")?;
    let text = std::fs::read_to_string(&dump)?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .context("callgrind summary line")
}

fn dumps(base: &Path) -> Vec<PathBuf> {
    let dir = base.parent().expect("dump directory");
    let prefix = base
        .file_name()
        .expect("dump name")
        .to_string_lossy()
        .into_owned();
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| {
                    p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Runs the `bench-load` generator (its own process, pinned to `cpu` when
/// given) and returns its JSON summary; fails when a request was not answered 200.
async fn generate(
    mode: &str,
    url: &str,
    param: &str,
    count: usize,
    body_file: &Path,
    signature: &str,
    cpu: Option<usize>,
) -> Result<Value> {
    let binary = example_binary("bench-load");
    let mut argv: Vec<String> = cpu.map(taskset).unwrap_or_default();
    argv.push(binary.display().to_string());
    argv.extend([mode.into(), url.into(), param.into(), count.to_string()]);
    let out = tokio::process::Command::new(&argv[0])
        .args(&argv[1..])
        .env("BENCH_BODY", body_file)
        .env("BENCH_SIGNATURE", signature)
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("run {}", binary.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "bench-load failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary: Value = serde_json::from_slice(&out.stdout)?;
    anyhow::ensure!(
        summary["errors"] == 0,
        "bench-load {mode} {param}: {} requests not answered 200: {}",
        summary["errors"],
        summary["outcomes"]
    );
    Ok(summary)
}

/// Events per second at the receiver over a list of deliveries: from the first
/// one's answer to the last one's, the events after the first.
fn events_per_second(ds: &[support::receiver::Delivery]) -> f64 {
    match (ds.first(), ds.last()) {
        (Some(a), Some(b)) if ds.len() > 1 => {
            let events: usize = ds[1..].iter().map(|d| d.event_count).sum();
            events as f64 / b.at.duration_since(a.at).as_secs_f64()
        }
        _ => 0.0,
    }
}

/// Whether every delivery was accepted with both signatures valid.
fn all_verified(ds: &[support::receiver::Delivery]) -> bool {
    ds.iter().all(|d| {
        d.is_accepted()
            && d.elements_signature_ok == Some(true)
            && d.standard_webhooks_ok == Some(true)
    })
}

fn delivery_account(k: usize) -> String {
    format!("dbid:AAB-bench-deliver-{k:02}")
}

/// Creates an oauth2 instance `name` for `account` with events to `callback`
/// signed with Secret `key` (its code Secret too).
async fn events_instance(
    client: &Client,
    ns: &str,
    emu: &Emulator,
    name: &str,
    account: &str,
    callback: &str,
) -> Result<()> {
    let code = emu.issue_code(APP_KEY, account, Some("https://app.example.com/auth"));
    secret(client, ns, &format!("code-{name}"), json!({"code": code})).await;
    let instance: DropboxElementInstance = serde_json::from_value(json!({
        "apiVersion": "elements.dropbox-operator.dev/v1alpha1", "kind": "DropboxElementInstance",
        "metadata": {"name": name},
        "spec": {"element": {"key": "dropbox"}, "authentication": {"type": "oauth2", "appSecretRef": {"name": "app"},
                 "codeSecretRef": {"name": format!("code-{name}")}, "callbackUrl": "https://app.example.com/auth"},
                 "events": {"enabled": true, "callbackUrl": callback, "signatureKeySecretRef": {"name": "key"}}}
    }))?;
    Api::<DropboxElementInstance>::namespaced(client.clone(), ns)
        .create(&PostParams::default(), &instance)
        .await?;
    Ok(())
}

/// The ingress: CPU and instructions per accepted webhook against a bare
/// handler, the maximum acceptance rate and acknowledgement latency under three
/// loads (a pinned load generator of its own), delivery throughput against a
/// baseline process doing the same POSTs, and webhook-to-delivery latency.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: make bench"]
async fn bench_ingress() -> Result<()> {
    let rounds = rounds();
    let section = Section::start("ingress");
    let pin = pin_pair();
    let server_pin: Vec<String> = pin.map(|(a, _)| taskset(a)).unwrap_or_default();
    let generator_cpu = pin.map(|(_, b)| b);
    let client = support::client().await;
    support::install_crd(&client).await?;
    let ns = support::namespace(&client, "bench-ingress").await;
    let emu = Emulator::start().await;
    emu.add_app(APP_KEY, APP_SECRET);
    emu.add_account(ACCOUNT, "bench@example.com", "Bench");
    let delivery_instances = env_usize("BENCH_DELIVERY_INSTANCES", 8).max(1);
    for k in 0..delivery_instances {
        emu.add_account(&delivery_account(k), &format!("d{k}@example.com"), "Bench");
        // The folder exists before the first cursor: every upload is one change.
        emu.create_folder(&delivery_account(k), "/bench");
    }
    let _controller = OperatorProcess::new(&ns, &emu.url)
        .env("LOG_LEVEL", "warn")
        .start()
        .await;
    let log_level = std::env::var("BENCH_LOG_LEVEL").unwrap_or_else(|_| "warn".into());
    let ingress_process = || {
        OperatorProcess::ingress(&ns, &emu.url)
            .env("ALLOWED_CALLBACK_CIDRS", "127.0.0.0/8")
            .env("LOG_LEVEL", &log_level)
    };
    let pinned: Vec<&str> = server_pin.iter().map(String::as_str).collect();
    let ingress = if pinned.is_empty() {
        ingress_process().start().await
    } else {
        ingress_process()
            .wrapped(&pinned, Duration::from_secs(15))
            .start()
            .await
    };
    let receiver = Receiver::start(Some(SIGNATURE_KEY)).await;
    secret(
        &client,
        &ns,
        "app",
        json!({"oauth.api.key": APP_KEY, "oauth.api.secret": APP_SECRET}),
    )
    .await;
    secret(
        &client,
        &ns,
        "key",
        json!({"event.notification.signature.key": std::str::from_utf8(SIGNATURE_KEY)?}),
    )
    .await;
    events_instance(&client, &ns, &emu, "bench", ACCOUNT, &receiver.url).await?;
    for k in 0..delivery_instances {
        events_instance(
            &client,
            &ns,
            &emu,
            &format!("deliver-{k}"),
            &delivery_account(k),
            &receiver.url,
        )
        .await?;
    }
    let api: Api<DropboxElementInstance> = Api::namespaced(client.clone(), &ns);
    // The instances' events are live once their first sync delivered nothing
    // new and EventsReady is set; a webhook then finds them.
    for name in std::iter::once("bench".to_owned())
        .chain((0..delivery_instances).map(|k| format!("deliver-{k}")))
    {
        support::wait_condition(&api, &name, "Ready", "True", None, Duration::from_secs(120))
            .await?;
        support::wait_condition(
            &api,
            &name,
            "EventsReady",
            "True",
            None,
            Duration::from_secs(120),
        )
        .await?;
    }

    let bare_pinned: Vec<&str> = server_pin.iter().map(String::as_str).collect();
    let (mut bare, bare_url) = start_bare(&bare_pinned, None)?;
    let ingress_url = format!("{}/webhooks/dropbox/{APP_KEY}", ingress.url());
    let http = support::dropbox::http_client();
    let body = kib_body();
    let signature = hex::encode(support::dropbox::hmac_sha256(
        APP_SECRET.as_bytes(),
        body.as_bytes(),
    ));
    let ingress_pid = ingress.pid().context("ingress pid")?;
    let pinning = json!({
        "ingress_cpus": cpus_of(ingress_pid),
        "bare_handler_cpus": cpus_of(bare.id()),
        "generator_cpus": generator_cpu.map_or("any".to_owned(), |c| c.to_string()),
    });

    // 1. CPU per accepted webhook, in time: alternating rounds, medians.
    let per_round = env_usize("BENCH_CPU_WEBHOOKS", 20_000);
    let cpu_rounds = rounds.max(5);
    blast(&http, &ingress_url, &body, &signature, 500, 8).await;
    blast(&http, &bare_url, &body, &signature, 500, 8).await;
    let (mut ingress_us, mut bare_us) = (Vec::new(), Vec::new());
    for _ in 0..cpu_rounds {
        let c0 = cpu_seconds(ingress_pid);
        blast(&http, &ingress_url, &body, &signature, per_round, 8).await;
        ingress_us.push((cpu_seconds(ingress_pid) - c0) * 1e6 / per_round as f64);
        let c0 = cpu_seconds(bare.id());
        blast(&http, &bare_url, &body, &signature, per_round, 8).await;
        bare_us.push((cpu_seconds(bare.id()) - c0) * 1e6 / per_round as f64);
    }
    // Where the ingress's time goes (BENCH_PROFILE=1): a sampled profile of one
    // more round (software clock: this VM has no hardware counters).
    if std::env::var("BENCH_PROFILE").is_ok_and(|v| v == "1") {
        profile(
            ingress_pid,
            &http,
            &ingress_url,
            &body,
            &signature,
            per_round,
        )
        .await?;
    }
    let _ = bare.kill();
    let time_ratios: Vec<f64> = ingress_us
        .iter()
        .zip(&bare_us)
        .map(|(i, b)| i / b)
        .collect();

    // 2. Acknowledgement latency under three loads, from the pinned generator:
    // none (one request at a time), 8 in flight (which also gives the maximum
    // rate), and an open loop at half that rate, where request i is due at
    // start + i/rate and counts from then (no coordinated omission).
    let body_file = section_file("ack-body.json");
    std::fs::write(&body_file, &body)?;
    let gen_ = |mode: &'static str, param: String, count: usize| {
        let (url, body_file, signature) =
            (ingress_url.clone(), body_file.clone(), signature.clone());
        async move {
            generate(
                mode,
                &url,
                &param,
                count,
                &body_file,
                &signature,
                generator_cpu,
            )
            .await
        }
    };
    gen_("closed", "8".into(), 2000).await?; // warm-up
    let idle_samples = env_usize("BENCH_ACK_IDLE_SAMPLES", 2000);
    let busy_samples = env_usize("BENCH_ACK_SAMPLES", 20_000);
    let (mut idle, mut busy, mut half) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        idle.push(gen_("closed", "1".into(), idle_samples).await?);
    }
    for _ in 0..rounds {
        busy.push(gen_("closed", "8".into(), busy_samples).await?);
    }
    let max_rates: Vec<f64> = busy
        .iter()
        .map(|s| s["rate"].as_f64().unwrap_or(0.0))
        .collect();
    let (max_rate, _, _) = spread(&max_rates);
    let rate = max_rate / 2.0;
    let half_samples = ((rate * 5.0) as usize).max(1000);
    for _ in 0..rounds {
        half.push(gen_("open", format!("{rate:.1}"), half_samples).await?);
    }
    let field = |runs: &[Value], group: &str, key: &str| -> Vec<f64> {
        runs.iter()
            .map(|s| s[group][key].as_f64().unwrap_or(0.0))
            .collect()
    };
    let latency_entry = |name: &str, load: Load, runs: &[Value]| {
        json!({
            "name": name, "load": load.label(),
            "p50": field(runs, "latency_ms", "p50"), "p90": field(runs, "latency_ms", "p90"),
            "p99": field(runs, "latency_ms", "p99"), "p999": field(runs, "latency_ms", "p999"),
            "max": field(runs, "latency_ms", "max"),
            "generator_lateness_p99": field(runs, "lateness_ms", "p99"),
            "samples_per_round": runs.first().map_or(Value::Null, |r| r["latency_ms"]["samples"].clone()),
        })
    };

    // 3. Delivered events per second: the ingress (fetch, deliver, commit) against
    // the `bench-deliver` baseline process POSTing the same bodies, signed the
    // same way, to the same verifying receiver; both on the ingress's CPU.
    let notifications = env_usize("BENCH_DELIVERY_NOTIFICATIONS", 10_000);
    let per_instance = (notifications
        * dropbox_operator::ingress::payload::MAX_EVENTS_PER_NOTIFICATION)
        .div_ceil(delivery_instances);
    let accounts: Vec<String> = (0..delivery_instances).map(delivery_account).collect();
    let account_refs: Vec<&str> = accounts.iter().map(String::as_str).collect();
    receiver.lean(true);
    let (mut ingress_eps, mut plain_eps, mut delivery_ratios) =
        (Vec::new(), Vec::new(), Vec::new());
    let (mut ingress_cpu_us, mut plain_cpu_us, mut sent_notifications) =
        (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        for account in &accounts {
            for i in 0..per_instance {
                emu.upload(account, &format!("/bench/r{round}-f{i:06}.txt"), b"x");
            }
        }
        let events = per_instance * delivery_instances;
        receiver.take_all();
        let c0 = cpu_seconds(ingress_pid);
        let t0 = Instant::now();
        emu.send_webhook(&ingress_url, APP_KEY, &account_refs).await;
        while receiver.accepted_event_count() < events {
            anyhow::ensure!(
                t0.elapsed() < Duration::from_secs(900),
                "delivery did not finish: {} of {events} events",
                receiver.accepted_event_count()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let delivered = receiver.take_all();
        let cpu = cpu_seconds(ingress_pid) - c0;
        anyhow::ensure!(all_verified(&delivered), "every ingress delivery is signed");
        ingress_eps.push(events_per_second(&delivered));
        ingress_cpu_us.push(cpu * 1e6 / delivered.len() as f64);
        sent_notifications.push(delivered.len() as f64);
        // The baseline's input: the same bodies, per instance in order.
        let file = section_file("delivery-notifications.jsonl");
        let mut lines = String::new();
        for d in &delivered {
            let body: Value = serde_json::from_slice(&d.raw)?;
            let _ = writeln!(
                lines,
                "{}",
                json!({"instance": body["message"]["instanceId"], "event_id": d.event_id,
                       "content_type": d.content_type,
                       "body": base64::engine::general_purpose::STANDARD.encode(&d.raw)})
            );
        }
        std::fs::write(&file, lines)?;
        let count = delivered.len();
        drop(delivered);
        let mut argv: Vec<String> = server_pin.clone();
        argv.push(example_binary("bench-deliver").display().to_string());
        argv.extend([receiver.url.clone(), file.display().to_string()]);
        let out = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .env("BENCH_SIGNATURE_KEY", std::str::from_utf8(SIGNATURE_KEY)?)
            .kill_on_drop(true)
            .output()
            .await
            .context("run bench-deliver")?;
        anyhow::ensure!(
            out.status.success(),
            "bench-deliver failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: Value = serde_json::from_slice(&out.stdout)?;
        let plain = receiver.take_all();
        anyhow::ensure!(
            plain.len() == count && all_verified(&plain),
            "the baseline's {} deliveries (of {count}) verify",
            plain.len()
        );
        plain_eps.push(events_per_second(&plain));
        plain_cpu_us.push(report["cpu_seconds"].as_f64().unwrap_or(0.0) * 1e6 / count as f64);
        delivery_ratios.push(ingress_eps[round] / plain_eps[round]);
    }
    receiver.lean(false);

    // 4. Webhook-to-delivery latency, one change per webhook and nothing else
    // running, from the moment the webhook is sent to the delivery's arrival.
    let samples_w2d = env_usize("BENCH_LATENCY_SAMPLES", 1000);
    let mut w2d = Vec::new();
    for round in 0..rounds {
        let mut latencies = Vec::with_capacity(samples_w2d);
        for i in 0..samples_w2d {
            let seen = receiver.all().len();
            emu.upload(ACCOUNT, &format!("/latency/{round}-{i}.txt"), b"x");
            let sent = Instant::now();
            emu.send_webhook(&ingress_url, APP_KEY, &[ACCOUNT]).await;
            let arrived = loop {
                let all = receiver.all();
                if let Some(d) = all[seen..].iter().find(|d| d.is_accepted()) {
                    break d.arrived;
                }
                anyhow::ensure!(
                    sent.elapsed() < Duration::from_secs(30),
                    "delivery timed out"
                );
                tokio::time::sleep(Duration::from_micros(200)).await;
            };
            latencies.push(arrived.saturating_duration_since(sent));
        }
        latencies.sort();
        w2d.push(percentiles_ms(&latencies));
        receiver.take_all();
    }
    drop(ingress);

    // 5. Instructions per accepted webhook (callgrind), ingress and bare
    // handlers on the same request mix; alternating rounds.
    let counted = count_instructions(&ingress_process, &http, &body, &signature, rounds).await?;

    let ack = |runs: &[Value], key: &str| field(runs, "latency_ms", key);
    let lateness = |runs: &[Value]| field(runs, "lateness_ms", "p99");
    let mut out = String::new();
    let _ = writeln!(out, "## ingress ({rounds} rounds per figure)");
    let _ = writeln!(
        out,
        "pinning: ingress on CPUs {}, bare handler on {}, load generator on {}",
        pinning["ingress_cpus"], pinning["bare_handler_cpus"], pinning["generator_cpus"]
    );
    let _ = writeln!(
        out,
        "instructions per accepted 1 KiB webhook (callgrind, {rounds} alternating rounds of {}, 8 in flight): ingress {} / bare axum {} / bare checking the signature {}; the ingress ran {} syncs",
        counted.per_round,
        list(&counted.ingress, 0),
        list(&counted.bare, 0),
        list(&counted.signed, 0),
        counted.syncs
    );
    let _ = writeln!(
        out,
        "CPU time per accepted webhook ({cpu_rounds} alternating rounds of {per_round}, 8 in flight): ingress {} us, bare {} us; ratios {}",
        list(&ingress_us, 1),
        list(&bare_us, 1),
        list(&time_ratios, 2)
    );
    for (label, runs) in [
        (Load::None.label(), &idle),
        (Load::InFlight(8).label(), &busy),
        (
            format!("{} ({rate:.0}/s)", Load::HalfMaxRate.label()),
            &half,
        ),
    ] {
        let _ = writeln!(
            out,
            "acknowledgement, load {label}: p50 {} ms, p99 {} ms, p99.9 {} ms; generator lateness p99 {} ms; rate {}/s",
            list(&ack(runs, "p50"), 2),
            list(&ack(runs, "p99"), 2),
            list(&ack(runs, "p999"), 2),
            list(&lateness(runs), 2),
            list(
                &runs
                    .iter()
                    .map(|r| r["rate"].as_f64().unwrap_or(0.0))
                    .collect::<Vec<_>>(),
                0
            ),
        );
    }
    let _ = writeln!(
        out,
        "delivery, events/s at the receiver ({} instances, {} notifications per round): ingress {}, baseline process {}; CPU us per notification: ingress (fetch + deliver + commit) {}, baseline {}",
        delivery_instances,
        list(&sent_notifications, 0),
        list(&ingress_eps, 0),
        list(&plain_eps, 0),
        list(&ingress_cpu_us, 1),
        list(&plain_cpu_us, 1),
    );
    let w2d_p =
        |key: &str| -> Vec<f64> { w2d.iter().map(|p| p[key].as_f64().unwrap_or(0.0)).collect() };
    let _ = writeln!(
        out,
        "webhook-to-delivery, {samples_w2d} samples per round: p50 {} ms, p99 {} ms, max {} ms",
        list(&w2d_p("p50"), 2),
        list(&w2d_p("p99"), 2),
        list(&w2d_p("max"), 2),
    );

    let (ingress_instr, _, _) = spread(&counted.ingress);
    let (bare_instr, _, _) = spread(&counted.bare);
    let (signed_instr, _, _) = spread(&counted.signed);
    let ratio_rounds =
        |a: &[f64], b: &[f64]| -> Vec<f64> { a.iter().zip(b).map(|(x, y)| x / y).collect() };
    let (ingress_cpu, _, _) = spread(&ingress_us);
    let (bare_cpu, _, _) = spread(&bare_us);
    let (ieps, _, _) = spread(&ingress_eps);
    let (peps, _, _) = spread(&plain_eps);
    let figures = vec![
        Figure::of_rounds(
            "ingress_instructions_ratio",
            "instructions per accepted 1 KiB webhook: ingress / bare axum handler (callgrind)",
            ratio_rounds(&counted.ingress, &counted.bare),
            "x",
        )
        .with_value(ingress_instr / bare_instr)
        .at_most(1.2)
        .detail(format!(
            "{} / {} instructions, rounds of {}",
            summary(&counted.ingress, 0),
            summary(&counted.bare, 0),
            counted.per_round
        )),
        Figure::of_rounds(
            "ingress_instructions_vs_signed_bare",
            "instructions per accepted 1 KiB webhook: ingress / bare axum handler that also checks the signature (callgrind)",
            ratio_rounds(&counted.ingress, &counted.signed),
            "x",
        )
        .with_value(ingress_instr / signed_instr)
        .detail(format!(
            "{:.0} / {:.0}; the HMAC alone {:.0} instructions (software SHA-256 under valgrind); {:.1} syncs per 1000 accepted webhooks",
            ingress_instr,
            signed_instr,
            signed_instr - bare_instr,
            counted.syncs * 1000.0 / (rounds * counted.per_round) as f64
        )),
        Figure::of_rounds(
            "ingress_cpu_time_ratio",
            "CPU time per accepted 1 KiB webhook: ingress / bare axum handler",
            time_ratios,
            "x",
        )
        .with_value(ingress_cpu / bare_cpu)
        .detail(format!(
            "{} us / {} us, {cpu_rounds} alternating rounds of {per_round}, 8 in flight, both on CPUs {}",
            summary(&ingress_us, 1),
            summary(&bare_us, 1),
            pinning["ingress_cpus"]
        )),
        Figure::of_rounds(
            "ingress_max_rate",
            "accepted webhooks per second, 8 in flight (the maximum rate)",
            max_rates.clone(),
            "/s",
        )
        .detail(format!(
            "{busy_samples} per round; ingress on CPUs {}, load generator on {}",
            pinning["ingress_cpus"], pinning["generator_cpus"]
        )),
        Figure::of_rounds(
            "ack_p99",
            format!("acknowledgement p99 at half the measured maximum rate ({rate:.0}/s)"),
            ack(&half, "p99"),
            "ms",
        )
        .at_most(2.0)
        .load(Load::HalfMaxRate)
        .detail(format!(
            "p50 {} ms, p99.9 {} ms; the generator's own send lateness p99 {} ms (counted in); {half_samples} samples per round from scheduled send times",
            summary(&ack(&half, "p50"), 2),
            summary(&ack(&half, "p999"), 2),
            summary(&lateness(&half), 2)
        )),
        Figure::of_rounds(
            "ack_p99_in_flight",
            "acknowledgement p99, 8 in flight",
            ack(&busy, "p99"),
            "ms",
        )
        .load(Load::InFlight(8))
        .detail(format!(
            "p50 {} ms; {busy_samples} samples per round",
            summary(&ack(&busy, "p50"), 2)
        )),
        Figure::of_rounds(
            "ack_p99_idle",
            "acknowledgement p99, one at a time",
            ack(&idle, "p99"),
            "ms",
        )
        .load(Load::None)
        .detail(format!(
            "p50 {} ms; {idle_samples} samples per round",
            summary(&ack(&idle, "p50"), 2)
        )),
        Figure::of_rounds(
            "delivery_ratio",
            "delivered events/s: ingress / baseline process POSTing the same signed bodies",
            delivery_ratios,
            "x",
        )
        .with_value(ieps / peps)
        .at_least(0.9)
        .detail(format!(
            "{} / {} events/s, receiver's clock; {} notifications of up to 20 events per round from {delivery_instances} instances; CPU per notification {} / {} us",
            summary(&ingress_eps, 0),
            summary(&plain_eps, 0),
            summary(&sent_notifications, 0),
            summary(&ingress_cpu_us, 1),
            summary(&plain_cpu_us, 1)
        )),
        Figure::of_rounds(
            "webhook_to_delivery_p99",
            "webhook-to-delivery p99 (one change per webhook)",
            w2d_p("p99"),
            "ms",
        )
        .at_most(20.0)
        .load(Load::None)
        .detail(format!(
            "p50 {} ms, {samples_w2d} samples per round",
            summary(&w2d_p("p50"), 2)
        )),
    ];
    let data = json!({
        "pinning": pinning,
        "max_rate_per_s": max_rates,
        "half_rate_per_s": rate,
        "latencies": [
            latency_entry("acknowledgement", Load::None, &idle),
            latency_entry("acknowledgement", Load::InFlight(8), &busy),
            latency_entry("acknowledgement", Load::HalfMaxRate, &half),
            {
                "name": "webhook to delivery", "load": Load::None.label(),
                "p50": w2d_p("p50"), "p90": w2d_p("p90"), "p99": w2d_p("p99"), "p999": w2d_p("p999"),
                "samples_per_round": samples_w2d,
            },
        ],
        "delivery": {
            "instances": delivery_instances, "notifications": sent_notifications,
            "ingress_events_per_s": ingress_eps, "baseline_events_per_s": plain_eps,
            "ingress_cpu_us_per_notification": ingress_cpu_us, "baseline_cpu_us_per_notification": plain_cpu_us,
        },
        "cpu_us_per_webhook": {"ingress": ingress_us, "bare": bare_us},
        "instructions_per_webhook": {"ingress": counted.ingress, "bare": counted.bare, "bare_signed": counted.signed},
    });
    section.record(&out, &figures, data);
    Ok(())
}

fn section_file(name: &str) -> PathBuf {
    support::bench::bench_dir().join(name)
}

/// A `perf` cpu-clock profile of the ingress over one more round, written to
/// target/bench/ingress-profile.txt.
async fn profile(
    pid: u32,
    http: &reqwest::Client,
    url: &str,
    body: &str,
    signature: &str,
    count: usize,
) -> Result<()> {
    let data = section_file("perf.ingress.data");
    let mut perf = std::process::Command::new("perf")
        .args(["record", "-e", "cpu-clock", "-F", "2999", "-g", "-o"])
        .arg(&data)
        .args(["-p", &pid.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("run perf record")?;
    tokio::time::sleep(Duration::from_secs(1)).await;
    blast(http, url, body, signature, count, 8).await;
    // SAFETY: signalling our own child.
    unsafe {
        libc::kill(perf.id() as i32, libc::SIGINT);
    }
    let _ = perf.wait();
    let report = std::process::Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--sort",
            "dso,symbol",
            "--percent-limit",
            "1",
            "-g",
            "none",
            "-i",
        ])
        .arg(&data)
        .output()
        .context("run perf report")?;
    std::fs::write(section_file("ingress-profile.txt"), &report.stdout)?;
    Ok(())
}

/// Instructions per accepted webhook, per round.
struct Counted {
    ingress: Vec<f64>,
    bare: Vec<f64>,
    signed: Vec<f64>,
    syncs: f64,
    per_round: usize,
}

async fn count_instructions(
    ingress_process: &dyn Fn() -> OperatorProcess,
    http: &reqwest::Client,
    body: &str,
    signature: &str,
    rounds: usize,
) -> Result<Counted> {
    let dir = support::bench::bench_dir();
    let ingress_base = dir.join("callgrind.ingress");
    let bare_base = dir.join("callgrind.bare");
    let signed_base = dir.join("callgrind.bare-signed");
    for old in dumps(&ingress_base)
        .into_iter()
        .chain(dumps(&bare_base))
        .chain(dumps(&signed_base))
    {
        let _ = std::fs::remove_file(old);
    }
    let valgrind = |base: &Path| {
        vec![
            "valgrind".to_owned(),
            "--tool=callgrind".to_owned(),
            "--quiet".to_owned(),
            format!("--callgrind-out-file={}.%p", base.display()),
        ]
    };
    let (ingress_wrapper, bare_wrapper, signed_wrapper) = (
        valgrind(&ingress_base),
        valgrind(&bare_base),
        valgrind(&signed_base),
    );
    let counted = ingress_process()
        .wrapped(&strs(&ingress_wrapper), Duration::from_secs(120))
        .start()
        .await;
    let (mut counted_bare, counted_bare_url) = start_bare(&strs(&bare_wrapper), None)?;
    // Where the difference goes: the bare handler that also checks the
    // signature, and the syncs the accepted webhooks start in the ingress.
    let (mut counted_signed, counted_signed_url) =
        start_bare(&strs(&signed_wrapper), Some(APP_SECRET))?;
    let counted_url = format!("{}/webhooks/dropbox/{APP_KEY}", counted.url());
    let per_round = env_usize("BENCH_CALLGRIND_WEBHOOKS", 2000);
    blast(http, &counted_url, body, signature, 200, 8).await;
    blast(http, &counted_bare_url, body, signature, 200, 8).await;
    blast(http, &counted_signed_url, body, signature, 200, 8).await;
    let (mut ingress, mut bare, mut signed) = (Vec::new(), Vec::new(), Vec::new());
    let syncs_before = counted.metric_sum("dropbox_ingress_syncs_total", "").await;
    for _ in 0..rounds {
        let ir = instructions(
            counted.pid().context("pid")?,
            &ingress_base,
            blast(http, &counted_url, body, signature, per_round, 8),
        )
        .await?;
        ingress.push(ir as f64 / per_round as f64);
        let ir = instructions(
            counted_bare.id(),
            &bare_base,
            blast(http, &counted_bare_url, body, signature, per_round, 8),
        )
        .await?;
        bare.push(ir as f64 / per_round as f64);
        let ir = instructions(
            counted_signed.id(),
            &signed_base,
            blast(http, &counted_signed_url, body, signature, per_round, 8),
        )
        .await?;
        signed.push(ir as f64 / per_round as f64);
    }
    let syncs = counted.metric_sum("dropbox_ingress_syncs_total", "").await - syncs_before;
    let _ = counted_bare.kill();
    let _ = counted_signed.kill();
    drop(counted);
    Ok(Counted {
        ingress,
        bare,
        signed,
        syncs,
        per_round,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: make bench"]
async fn bench_longpoll_1000_instances() -> Result<()> {
    let n = env_usize("BENCH_LONGPOLLS", 1000);
    let section = Section::start("longpoll");
    let client = support::client().await;
    support::install_crd(&client).await?;
    let ns = support::namespace(&client, "bench-longpoll").await;
    let emu = Emulator::start().await;
    emu.add_app(APP_KEY, APP_SECRET);
    let receiver = Receiver::start(Some(b"bench-key")).await;
    secret(
        &client,
        &ns,
        "key",
        json!({"event.notification.signature.key": "bench-key"}),
    )
    .await;
    let log_level = std::env::var("BENCH_LOG_LEVEL").unwrap_or_else(|_| "warn".into());
    let _controller = OperatorProcess::new(&ns, &emu.url)
        .env("LOG_LEVEL", "warn")
        .env("CONCURRENCY", &CONCURRENCY.to_string())
        .start()
        .await;
    let account = |i: usize| format!("dbid:AAB-bench-longpoll-{i:05}");
    let setup = Instant::now();
    futures::stream::iter(0..n)
        .for_each_concurrent(CONCURRENCY, |i| {
            let (client, ns, emu, receiver_url) = (&client, &ns, &emu, receiver.url.clone());
            async move {
                emu.add_account(&account(i), &format!("lp{i}@example.com"), "Long Poll");
                let token = emu.issue_long_lived_token(APP_KEY, &account(i));
                secret(client, ns, &format!("token-{i}"), json!({"apiKey": token})).await;
                let instance: DropboxElementInstance = serde_json::from_value(json!({
                    "apiVersion": "elements.dropbox-operator.dev/v1alpha1", "kind": "DropboxElementInstance",
                    "metadata": {"name": format!("lp-{i}")},
                    "spec": {"element": {"key": "dropbox"},
                             "authentication": {"type": "apiKey", "apiKeySecretRef": {"name": format!("token-{i}")}},
                             "events": {"enabled": true, "source": "longpoll", "callbackUrl": receiver_url,
                                        "signatureKeySecretRef": {"name": "key"}}}
                }))
                .expect("instance");
                Api::<DropboxElementInstance>::namespaced(client.clone(), ns)
                    .create(&PostParams::default(), &instance)
                    .await
                    .expect("create instance");
            }
        })
        .await;
    let ingress = OperatorProcess::ingress(&ns, &emu.url)
        .env("ALLOWED_CALLBACK_CIDRS", "127.0.0.0/8")
        .env("LOG_LEVEL", &log_level)
        .env("HEARTBEAT_INTERVAL", "1s")
        .start()
        .await;
    let api: Api<DropboxElementInstance> = Api::namespaced(client.clone(), &ns);
    while !all_ready(&api, n).await || emu.longpolls_waiting() < n {
        anyhow::ensure!(
            setup.elapsed() < Duration::from_secs(900),
            "not all Ready and long-polled after 15 min ({} long-polls held)",
            emu.longpolls_waiting()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let settled = setup.elapsed();
    // Let start-up work (the first resync of every instance) end.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let pid = ingress.pid().context("ingress pid")?;
    let (rss, peak) = rss_kib(pid);
    let held = emu.longpolls_waiting();
    let metric = ingress.metric_sum("dropbox_ingress_longpolls", "").await;

    // Change-to-delivery, one change at a time on a different account each,
    // in rounds; the RSS again after each round.
    let samples = env_usize("BENCH_LONGPOLL_SAMPLES", 1000);
    let rounds = rounds();
    let (mut p50, mut p99, mut rss_rounds) = (Vec::new(), Vec::new(), Vec::new());
    let mut k = 0;
    for _ in 0..rounds {
        let mut latencies = Vec::with_capacity(samples);
        for _ in 0..samples {
            let i = (k * 7919) % n;
            k += 1;
            let before = receiver.accepted().len();
            let t = Instant::now();
            emu.upload(&account(i), &format!("/latency-{k}.txt"), b"x");
            loop {
                let accepted = receiver.accepted();
                if let Some(d) = accepted.get(before) {
                    latencies.push(d.arrived.saturating_duration_since(t));
                    break;
                }
                anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "delivery timed out");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            // Until its long-poll is back, so the next sample starts from rest.
            while emu.longpolls_waiting() < n {
                anyhow::ensure!(t.elapsed() < Duration::from_secs(30), "long-poll not back");
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        latencies.sort();
        p50.push(ms(percentile(&latencies, 0.5)));
        p99.push(ms(percentile(&latencies, 0.99)));
        rss_rounds.push(rss_kib(pid).0 as f64 / 1024.0);
    }
    let (_, peak_after) = rss_kib(pid);

    let mut out = String::new();
    let _ = writeln!(out, "## long-polls ({rounds} rounds)");
    let _ = writeln!(
        out,
        "{n} longpoll instances (one account each) on one ingress replica: {held} long-polls held at the emulator, ingress reports {metric}; Ready and all held {:.1}s after the first instance was created",
        settled.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "ingress RSS holding them: {:.1} MiB before the latency rounds (peak {:.1} MiB), after each round {} MiB (peak at the end {:.1} MiB) (target <= 80 MiB)",
        rss as f64 / 1024.0,
        peak as f64 / 1024.0,
        list(&rss_rounds, 1),
        peak_after as f64 / 1024.0
    );
    let _ = writeln!(
        out,
        "change-to-delivery latency (long-poll, no webhook), {samples} samples per round: p50 {} ms, p99 {} ms (target p50 <= 1 s)",
        list(&p50, 1),
        list(&p99, 1),
    );
    let mut all_rss = vec![rss as f64 / 1024.0];
    all_rss.extend(&rss_rounds);
    let figures = vec![
        Figure::of_rounds(
            "longpoll_rss",
            format!("ingress RSS holding {n} long-polls (one replica, one account each)"),
            all_rss,
            "MiB",
        )
        .at_most(80.0)
        .detail(format!(
            "{held} held at the emulator; read before the latency rounds and after each; peak {:.1} MiB",
            peak_after as f64 / 1024.0
        )),
        Figure::of_rounds(
            "longpoll_change_to_delivery_p50",
            "change-to-delivery p50 with long-polls (no webhook)",
            p50.clone(),
            "ms",
        )
        .at_most(1000.0)
        .load(Load::None)
        .detail(format!(
            "p99 {} ms, {samples} samples per round over different instances",
            summary(&p99, 1)
        )),
    ];
    let data = json!({"latencies": [{"name": "change to delivery (long-poll)", "load": Load::None.label(),
                                     "p50": p50, "p99": p99, "samples_per_round": samples}],
                      "instances": n});
    section.record(&out, &figures, data);
    anyhow::ensure!(held >= n, "only {held} of {n} long-polls held");
    Ok(())
}
