//! Side by side with the closest peer: Knative's GitHubSource receive adapter
//! (knative-extensions/eventing-github, `cmd/receive_adapter`), which verifies a
//! webhook's HMAC, converts it and POSTs one CloudEvent to a sink. The ingress is
//! measured in the same run and the same way, end to end: a webhook in, one
//! change fetched from the Dropbox emulator, one signed event delivered, the
//! cursor committed.
//!
//! Ignored by `cargo test`: the peer is not part of the project. Run it with
//! `make bench-peer` (hack/bench-peer.sh), which builds the adapter from a
//! checkout you bring and this test in release mode; docs/performance.md, "Side by side
//! with Knative's GitHubSource adapter", has the setup and the figures. Results
//! go to target/bench/peer.json.

mod support;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail, ensure};
use axum::Router;
use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::routing::post;
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use dropbox_operator::api::DropboxElementInstance;
use dropbox_operator::contract;
use hmac::{Hmac, KeyInit, Mac};
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, ListParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};
use support::bench::{
    CpuSnapshot, Figure, Section, apiserver_requests, control_plane_pids, diff, env_usize, list,
    ms, percentile, spread, summary,
};
use support::dropbox::Emulator;
use support::operator::{OperatorProcess, Process};
use tokio::sync::oneshot;

const APP_KEY: &str = "peer-bench-app";
const APP_SECRET: &str = "peer-bench-app-secret";
const SIGNING_KEY: &str = "peer-bench-signing-key";
const GITHUB_SECRET: &str = "peer-bench-github-secret";
const REDIRECT: &str = "https://app.example.com/auth";
/// One instance (one account) per webhook in flight.
const ACCOUNTS: usize = 8;
const TARGET_CPU_RATIO: f64 = 0.5;

fn account(k: usize) -> String {
    format!("dbid:AAB-peer-bench-account-{k:02}")
}

// ---- the sink both sides deliver to ------------------------------------------

/// A minimal HTTP sink: `/ours/<k>` takes the ingress's deliveries for account
/// k (checking the signature and that each carries exactly one event), `/peer`
/// the adapter's CloudEvents (keyed by `ce-id`). The arrival time of each is
/// handed to whoever waits for it.
#[derive(Default)]
struct SinkState {
    waiters: Mutex<HashMap<String, oneshot::Sender<Instant>>>,
    ours: AtomicUsize,
    ours_bad: AtomicUsize,
    peer: AtomicUsize,
    peer_bad: AtomicUsize,
    /// Deliveries nobody waited for (a duplicate, or a second event).
    stray: AtomicUsize,
}

struct Sink {
    url: String,
    state: Arc<SinkState>,
}

impl Sink {
    async fn start() -> Sink {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind sink");
        let addr = listener.local_addr().expect("sink address");
        let state = Arc::new(SinkState::default());
        let app = Router::new()
            .route("/ours/{k}", post(sink))
            .route("/peer", post(sink))
            .with_state(state.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Sink {
            url: format!("http://{addr}"),
            state,
        }
    }

    fn wait(&self, key: String) -> oneshot::Receiver<Instant> {
        let (tx, rx) = oneshot::channel();
        self.state
            .waiters
            .lock()
            .expect("waiters lock")
            .insert(key, tx);
        rx
    }

    fn counts(&self) -> [usize; 5] {
        let s = &self.state;
        [&s.ours, &s.ours_bad, &s.peer, &s.peer_bad, &s.stray].map(|c| c.load(Ordering::SeqCst))
    }
}

/// `Elements-Webhook-Signature: sha256=<base64 HMAC-SHA256(key, body)>` (docs/user-guide.md, "Events").
fn elements_signature_ok(headers: &HeaderMap, body: &[u8]) -> bool {
    let Some(sig) = headers
        .get("elements-webhook-signature")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("sha256="))
        .and_then(|v| BASE64.decode(v).ok())
    else {
        return false;
    };
    let mut mac = <Hmac<sha2::Sha256> as KeyInit>::new_from_slice(SIGNING_KEY.as_bytes())
        .expect("HMAC takes any key");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

async fn sink(
    State(s): State<Arc<SinkState>>,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let at = Instant::now();
    let key = if uri.path() == "/peer" {
        let id = headers
            .get("ce-id")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let ok = headers.get("ce-type").and_then(|v| v.to_str().ok())
            == Some("dev.knative.source.github.push")
            && serde_json::from_slice::<Value>(&body).is_ok_and(|v| v["ref"].is_string());
        s.peer.fetch_add(1, Ordering::SeqCst);
        if !ok {
            s.peer_bad.fetch_add(1, Ordering::SeqCst);
        }
        format!("peer:{id}")
    } else {
        let events = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["message"]["events"].as_array().map(Vec::len));
        s.ours.fetch_add(1, Ordering::SeqCst);
        if events != Some(1) || !elements_signature_ok(&headers, &body) {
            s.ours_bad.fetch_add(1, Ordering::SeqCst);
        }
        uri.path().to_owned()
    };
    match s.waiters.lock().expect("waiters lock").remove(&key) {
        Some(tx) => {
            let _ = tx.send(at);
        }
        None => {
            s.stray.fetch_add(1, Ordering::SeqCst);
        }
    }
    StatusCode::OK
}

// ---- the two sides ---------------------------------------------------------------

/// A Dropbox webhook body of about 1 KiB naming account `k` (the rest are
/// accounts no instance has), and its X-Dropbox-Signature.
fn dropbox_body(emu: &Emulator, k: usize) -> (String, String) {
    let mut accounts = vec![account(k)];
    let mut uids = vec![emu.uid(&account(k))];
    for i in 0..24 {
        accounts.push(format!("dbid:AAB-peer-bench-unknown-{i:04}"));
        uids.push(2_000_000 + i);
    }
    let body = json!({"list_folder": {"accounts": accounts}, "delta": {"users": uids}}).to_string();
    assert!(
        (900..1200).contains(&body.len()),
        "Dropbox body is {} bytes",
        body.len()
    );
    let signature = hex::encode(support::dropbox::hmac_sha256(
        APP_SECRET.as_bytes(),
        body.as_bytes(),
    ));
    (body, signature)
}

/// A GitHub push payload of about 1 KiB (one commit), its delivery id, and its
/// `X-Hub-Signature` (SHA-1, which the adapter checks) and
/// `X-Hub-Signature-256`.
fn github_push(seq: usize) -> (String, String, String, String) {
    let after = format!("{seq:040x}");
    let before = format!("{:040x}", seq + 1_000_000_000);
    let delivery = format!("72d3162e-cc78-11e3-{:04x}-{:012x}", seq % 0xffff, seq);
    let commit = json!({
        "id": after, "distinct": true,
        "message": "Update README.md",
        "timestamp": "2026-12-02T13:00:00Z",
        "author": {"name": "Ada Lovelace", "email": "ada@example.com", "username": "ada"},
        "added": [], "removed": [], "modified": ["README.md"]
    });
    let body = json!({
        "ref": "refs/heads/main", "before": before, "after": after,
        "created": false, "deleted": false, "forced": false, "base_ref": null,
        "compare": format!("https://github.com/bench/repo/compare/{}...{}", &before[..12], &after[..12]),
        "commits": [commit], "head_commit": commit,
        "repository": {"id": 123456789, "name": "repo", "full_name": "bench/repo",
            "owner": {"login": "bench", "id": 1234}, "private": false,
            "html_url": "https://github.com/bench/repo", "default_branch": "main",
            "created_at": 1_700_000_000, "pushed_at": 1_764_680_400},
        "pusher": {"name": "ada", "email": "ada@example.com"},
        "sender": {"login": "ada", "id": 5678}
    })
    .to_string();
    assert!(
        (900..1200).contains(&body.len()),
        "GitHub body is {} bytes",
        body.len()
    );
    let mut sha1 = <Hmac<sha1::Sha1> as KeyInit>::new_from_slice(GITHUB_SECRET.as_bytes())
        .expect("HMAC takes any key");
    sha1.update(body.as_bytes());
    let sig1 = format!("sha1={}", hex::encode(sha1.finalize().into_bytes()));
    let sig256 = format!(
        "sha256={}",
        hex::encode(support::dropbox::hmac_sha256(
            GITHUB_SECRET.as_bytes(),
            body.as_bytes()
        ))
    );
    (body, delivery, sig1, sig256)
}

/// The adapter binary: $PEER_BIN, else target/peer/bin/receive_adapter (where
/// hack/bench-peer.sh builds it).
fn peer_binary() -> Result<PathBuf> {
    let path = std::env::var_os("PEER_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            support::controlplane::repo_root().join("target/peer/bin/receive_adapter")
        });
    ensure!(
        path.is_file(),
        "{} is missing: run hack/bench-peer.sh (make bench-peer), which builds it",
        path.display()
    );
    Ok(path)
}

/// Starts the receive adapter as its Deployment would run it (the environment
/// README.md lists), logging to target/bench/peer-adapter.log at warn level
/// like the ingress here; returns it and its webhook URL once it listens.
async fn start_peer(ns: &str, sink: &str) -> Result<(Child, String)> {
    let port = support::controlplane::free_port();
    let profiling_port = std::iter::repeat_with(support::controlplane::free_port)
        .find(|p| *p != port)
        .context("a second free port")?;
    let dir = support::controlplane::repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    let log = dir.join("peer-adapter.log");
    let file = std::fs::File::create(&log)?;
    let mut cmd = Command::new(peer_binary()?);
    cmd.env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("K_SINK", format!("{sink}/peer"))
        .env("NAMESPACE", ns)
        .env("NAME", "bench-peer")
        .env("GITHUB_SECRET_TOKEN", GITHUB_SECRET)
        .env("GITHUB_OWNER_REPO", "bench/repo")
        // Not 8080: the adapter's health probes take that port.
        .env("PORT", port.to_string())
        .env("PROFILING_PORT", profiling_port.to_string())
        .env("KUBECONFIG", support::kubeconfig())
        .env(
            "K_LOGGING_CONFIG",
            r#"{"zap-logger-config":"{\"level\":\"warn\"}"}"#,
        )
        .stdout(Stdio::from(file.try_clone()?))
        .stderr(Stdio::from(file));
    let mut child = support::controlplane::spawn_owned(cmd).context("start the receive adapter")?;
    let started = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            bail!(
                "the receive adapter exited ({status}); log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            return Ok((child, format!("http://127.0.0.1:{port}/")));
        }
        if started.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            bail!(
                "the receive adapter did not listen on {port} within 60 s; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Bench {
    _controller: Process,
    http: reqwest::Client,
    emu: Emulator,
    sink: Sink,
    ingress: Process,
    ingress_url: String,
    peer: Child,
    peer_url: String,
    /// Per account: the webhook body naming it and its signature.
    dropbox_bodies: Vec<(String, String)>,
    /// Per account: its cursor ConfigMap's name.
    cursors: Vec<String>,
    configmaps: Api<ConfigMap>,
    files: AtomicUsize,
    deliveries: AtomicUsize,
    /// GETs of cursor ConfigMaps the benchmark itself made (left out of the
    /// ingress's API calls).
    own_gets: AtomicUsize,
}

/// One measured round of one side.
struct Round {
    webhooks: usize,
    wall: Duration,
    /// CPU seconds per process over the round: the side's own process
    /// (`ingress` or `receive_adapter`), `kube-apiserver`, `etcd`, and the
    /// `controller` and `kube-controller-manager` (shown, not counted).
    cpu: BTreeMap<String, f64>,
    latencies: Vec<Duration>,
    /// kube-apiserver requests over the round (watches left out).
    calls: BTreeMap<String, f64>,
    /// HTTP exchanges other than the API server's: `webhook` (in),
    /// `delivery` (out to the sink), `dropbox` (list_folder calls).
    exchanges: BTreeMap<String, f64>,
}

/// The processes counted for a webhook: the side's own and the control plane's.
const COUNTED: [&str; 3] = ["kube-apiserver", "etcd", "own"];

impl Bench {
    /// Webhooks for account `slot` one after the other until `next` reaches
    /// `count`: upload one file, send the webhook, wait for its one event.
    async fn ours_slot(
        &self,
        slot: usize,
        next: &AtomicUsize,
        count: usize,
    ) -> Result<Vec<Duration>> {
        let mut latencies = Vec::new();
        let (body, signature) = &self.dropbox_bodies[slot];
        while next.fetch_add(1, Ordering::SeqCst) < count {
            let file = self.files.fetch_add(1, Ordering::SeqCst);
            self.emu
                .upload(&account(slot), &format!("/bench/f-{file:06}.txt"), b"x");
            let arrived = self.sink.wait(format!("/ours/{slot}"));
            let t = Instant::now();
            let r = self
                .http
                .post(&self.ingress_url)
                .header("Content-Type", "application/json")
                .header("X-Dropbox-Signature", signature)
                .body(body.clone())
                .send()
                .await?;
            ensure!(r.status() == 200, "ingress answered {}", r.status());
            let at = tokio::time::timeout(Duration::from_secs(30), arrived)
                .await
                .context("no delivery within 30 s")??;
            latencies.push(at.duration_since(t));
        }
        Ok(latencies)
    }

    async fn peer_slot(&self, next: &AtomicUsize, count: usize) -> Result<Vec<Duration>> {
        let mut latencies = Vec::new();
        while next.fetch_add(1, Ordering::SeqCst) < count {
            let seq = self.deliveries.fetch_add(1, Ordering::SeqCst);
            let (body, delivery, sig1, sig256) = github_push(seq);
            let arrived = self.sink.wait(format!("peer:{delivery}"));
            let t = Instant::now();
            let r = self
                .http
                .post(&self.peer_url)
                .header("Content-Type", "application/json")
                .header("User-Agent", "GitHub-Hookshot/bench")
                .header("X-GitHub-Event", "push")
                .header("X-GitHub-Delivery", &delivery)
                .header("X-Hub-Signature", sig1)
                .header("X-Hub-Signature-256", sig256)
                .body(body)
                .send()
                .await?;
            ensure!(r.status() == 202, "adapter answered {}", r.status());
            let at = tokio::time::timeout(Duration::from_secs(30), arrived)
                .await
                .context("no delivery within 30 s")??;
            latencies.push(at.duration_since(t));
        }
        Ok(latencies)
    }

    /// Whether the committed cursor of each of the first `n` accounts stands at
    /// the end of its account's changes.
    async fn all_committed(&self, n: usize) -> Result<bool> {
        for (k, name) in self.cursors.iter().enumerate().take(n) {
            self.own_gets.fetch_add(1, Ordering::SeqCst);
            let cm = self.configmaps.get(name).await?;
            let cursor = cm
                .data
                .as_ref()
                .and_then(|d| d.get(contract::CURSOR_KEY))
                .cloned()
                .unwrap_or_default();
            if self.emu.cursor_position(&cursor) != Some(self.emu.change_log(&account(k)).len()) {
                return Ok(false);
            }
        }
        Ok(true)
    }

    fn pids(&self, own: (&'static str, u32)) -> Vec<(&'static str, u32)> {
        let mut pids = vec![own];
        pids.extend(control_plane_pids());
        if let Some(pid) = self._controller.pid() {
            pids.push(("controller", pid));
        }
        if let Some(pid) = support::cluster().pid("kube-controller-manager") {
            pids.push(("kube-controller-manager", pid));
        }
        pids
    }

    fn list_folder_calls(&self) -> usize {
        self.emu
            .calls()
            .iter()
            .filter(|c| c.route.contains("list_folder"))
            .count()
    }

    async fn ours(&self, in_flight: usize, count: usize) -> Result<Round> {
        let next = AtomicUsize::new(0);
        let pids = self.pids(("ingress", self.ingress.pid().context("ingress pid")?));
        let (delivered0, dropbox0) = (self.sink.counts()[0], self.list_folder_calls());
        let calls_before = apiserver_requests();
        let own_before = self.own_gets.load(Ordering::SeqCst);
        let (cpu0, t0) = (CpuSnapshot::take(&pids), Instant::now());
        let slots = futures::future::try_join_all(
            (0..in_flight).map(|slot| self.ours_slot(slot, &next, count)),
        )
        .await?;
        // End to end: until every cursor is committed.
        while !self.all_committed(in_flight).await? {
            ensure!(
                t0.elapsed() < Duration::from_secs(600),
                "cursors not committed"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let (cpu, wall) = (CpuSnapshot::take(&pids).since(&cpu0), t0.elapsed());
        let mut calls = diff(&apiserver_requests(), &calls_before);
        // The benchmark's own GETs of the cursors are not the ingress's.
        let own = (self.own_gets.load(Ordering::SeqCst) - own_before) as f64;
        if let Some(gets) = calls.get_mut("GET configmaps") {
            *gets = (*gets - own).max(0.0);
        }
        let exchanges = BTreeMap::from([
            ("webhook".to_owned(), count as f64),
            (
                "delivery".to_owned(),
                (self.sink.counts()[0] - delivered0) as f64,
            ),
            (
                "dropbox".to_owned(),
                (self.list_folder_calls() - dropbox0) as f64,
            ),
        ]);
        Ok(Round {
            webhooks: count,
            wall,
            cpu,
            latencies: slots.into_iter().flatten().collect(),
            calls,
            exchanges,
        })
    }

    async fn peer(&self, in_flight: usize, count: usize) -> Result<Round> {
        let next = AtomicUsize::new(0);
        let pids = self.pids(("receive_adapter", self.peer.id()));
        let delivered0 = self.sink.counts()[2];
        let calls_before = apiserver_requests();
        let (cpu0, t0) = (CpuSnapshot::take(&pids), Instant::now());
        let slots =
            futures::future::try_join_all((0..in_flight).map(|_| self.peer_slot(&next, count)))
                .await?;
        let (cpu, wall) = (CpuSnapshot::take(&pids).since(&cpu0), t0.elapsed());
        let calls = diff(&apiserver_requests(), &calls_before);
        let exchanges = BTreeMap::from([
            ("webhook".to_owned(), count as f64),
            (
                "delivery".to_owned(),
                (self.sink.counts()[2] - delivered0) as f64,
            ),
        ]);
        Ok(Round {
            webhooks: count,
            wall,
            cpu,
            latencies: slots.into_iter().flatten().collect(),
            calls,
            exchanges,
        })
    }
}

/// CPU µs per webhook of a round: the side's own process, kube-apiserver and
/// etcd, and their total (what the ratio compares).
fn cpu_us(r: &Round, own: &str) -> BTreeMap<String, f64> {
    let mut m: BTreeMap<String, f64> = r
        .cpu
        .iter()
        .map(|(k, v)| (k.clone(), v * 1e6 / r.webhooks as f64))
        .collect();
    let total = COUNTED
        .iter()
        .map(|k| {
            m.get(if *k == "own" { own } else { k })
                .copied()
                .unwrap_or(0.0)
        })
        .sum();
    m.insert("total".into(), total);
    m
}

/// The figures of one side at one concurrency: per-round values, latency
/// percentiles per round.
struct Figures {
    own: &'static str,
    /// Per process (and `total`), per round: CPU µs per webhook.
    cpu_us: BTreeMap<String, Vec<f64>>,
    rate: Vec<f64>,
    p50_ms: Vec<f64>,
    p99_ms: Vec<f64>,
    samples: usize,
    webhooks: usize,
    /// API requests per webhook by `VERB resource`, over all rounds.
    calls_per_webhook: BTreeMap<String, f64>,
    /// HTTP exchanges per webhook (including `api`, all API requests).
    exchanges_per_webhook: BTreeMap<String, f64>,
}

fn figures(rounds: &[Round], own: &'static str) -> Figures {
    let webhooks: usize = rounds.iter().map(|r| r.webhooks).sum();
    let mut calls = BTreeMap::new();
    let mut exchanges = BTreeMap::new();
    for r in rounds {
        for (k, v) in &r.calls {
            // Non-resource requests (the benchmark's own metrics scrapes) left out.
            if k.split(' ').nth(1).is_some_and(|res| !res.is_empty()) {
                *calls.entry(k.clone()).or_insert(0.0) += v / webhooks as f64;
            }
        }
        for (k, v) in &r.exchanges {
            *exchanges.entry(k.clone()).or_insert(0.0) += v / webhooks as f64;
        }
    }
    // `+ 0.0`: an empty sum is -0.0.
    exchanges.insert("api".into(), calls.values().sum::<f64>() + 0.0);
    let mut cpu: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in rounds {
        for (k, v) in cpu_us(r, own) {
            cpu.entry(k).or_default().push(v);
        }
    }
    let mut p50 = Vec::new();
    let mut p99 = Vec::new();
    let mut samples = 0;
    for r in rounds {
        let mut l = r.latencies.clone();
        l.sort();
        samples += l.len();
        p50.push(ms(percentile(&l, 0.5)));
        p99.push(ms(percentile(&l, 0.99)));
    }
    Figures {
        own,
        cpu_us: cpu,
        rate: rounds
            .iter()
            .map(|r| r.webhooks as f64 / r.wall.as_secs_f64())
            .collect(),
        p50_ms: p50,
        p99_ms: p99,
        samples,
        webhooks,
        calls_per_webhook: calls,
        exchanges_per_webhook: exchanges,
    }
}

impl Figures {
    fn cpu(&self, key: &str) -> Vec<f64> {
        self.cpu_us.get(key).cloned().unwrap_or_default()
    }

    fn median(&self, key: &str) -> f64 {
        spread(&self.cpu(key)).0
    }

    fn json(&self) -> Value {
        json!({
            "cpu_us": self.cpu_us,
            "webhooks_per_s": self.rate,
            "p50_ms": self.p50_ms,
            "p99_ms": self.p99_ms,
            "latency_samples": self.samples,
            "webhooks": self.webhooks,
            "api_calls_per_webhook": self.calls_per_webhook,
            "exchanges_per_webhook": self.exchanges_per_webhook,
        })
    }

    /// For the plot: the counted processes only.
    fn plot_json(&self) -> Value {
        let mut parts = serde_json::Map::new();
        for k in COUNTED {
            let key = if k == "own" { self.own } else { k };
            parts.insert(key.to_owned(), json!(self.cpu(key)));
        }
        json!({"cpu_us": parts, "total_us": self.cpu("total")})
    }
}

async fn setup() -> Result<Bench> {
    let client: Client = support::client().await;
    support::install_crd(&client).await?;
    let ns = support::namespace(&client, "bench-peer").await;
    let emu = Emulator::start().await;
    emu.add_app(APP_KEY, APP_SECRET);
    for k in 0..ACCOUNTS {
        emu.add_account(&account(k), &format!("peer{k}@example.com"), "Bench");
        // The folder the files go to exists before the first cursor, so every
        // upload is exactly one change.
        emu.create_folder(&account(k), "/bench");
    }
    let sink = Sink::start().await;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ns);
    support::put_secret(
        &secrets,
        "app",
        &[("oauth.api.key", APP_KEY), ("oauth.api.secret", APP_SECRET)],
    )
    .await?;
    support::put_secret(
        &secrets,
        "key",
        &[("event.notification.signature.key", SIGNING_KEY)],
    )
    .await?;
    let controller = OperatorProcess::new(&ns, &emu.url)
        .env("LOG_LEVEL", "warn")
        .env("ALLOWED_CALLBACK_CIDRS", "127.0.0.0/8")
        .start()
        .await;
    let ingress = OperatorProcess::ingress(&ns, &emu.url)
        .env("ALLOWED_CALLBACK_CIDRS", "127.0.0.0/8")
        .env(
            "LOG_LEVEL",
            &std::env::var("BENCH_LOG_LEVEL").unwrap_or_else(|_| "warn".into()),
        )
        .start()
        .await;
    let instances: Api<DropboxElementInstance> = Api::namespaced(client.clone(), &ns);
    for k in 0..ACCOUNTS {
        let code = emu.issue_code(APP_KEY, &account(k), Some(REDIRECT));
        support::put_secret(&secrets, &format!("code-{k}"), &[("code", &code)]).await?;
        let instance: DropboxElementInstance = serde_json::from_value(json!({
            "apiVersion": "elements.dropbox-operator.dev/v1alpha1", "kind": "DropboxElementInstance",
            "metadata": {"name": format!("peer-{k}")},
            "spec": {"element": {"key": "dropbox"},
                     "authentication": {"type": "oauth2", "appSecretRef": {"name": "app"},
                                        "codeSecretRef": {"name": format!("code-{k}")}, "callbackUrl": REDIRECT},
                     "events": {"enabled": true, "callbackUrl": format!("{}/ours/{k}", sink.url),
                                "signatureKeySecretRef": {"name": "key"}}}
        }))?;
        instances.create(&PostParams::default(), &instance).await?;
    }
    // Every instance Ready with its first cursor set.
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), &ns);
    let cursors = support::eventually(
        "every instance Ready with a cursor",
        Duration::from_secs(120),
        || {
            let (instances, configmaps) = (instances.clone(), configmaps.clone());
            async move {
                let mut names = Vec::new();
                for k in 0..ACCOUNTS {
                    let i = instances.get(&format!("peer-{k}")).await?;
                    if !support::condition_is(&i, "Ready", "True", None) {
                        return Ok(None);
                    }
                    let name = contract::cursor_configmap_name(&i.uid().unwrap_or_default());
                    let set = configmaps.get_opt(&name).await?.is_some_and(|cm| {
                        cm.data.is_some_and(|d| {
                            d.get(contract::CURSOR_KEY).is_some_and(|c| !c.is_empty())
                        })
                    });
                    if !set {
                        return Ok(None);
                    }
                    names.push(name);
                }
                Ok(Some(names))
            }
        },
        Option::is_some,
    )
    .await?
    .context("cursors")?;
    ensure!(
        instances.list(&ListParams::default()).await?.items.len() == ACCOUNTS,
        "instances"
    );
    let (peer, peer_url) = start_peer(&ns, &sink.url).await?;
    let dropbox_bodies = (0..ACCOUNTS).map(|k| dropbox_body(&emu, k)).collect();
    Ok(Bench {
        _controller: controller,
        http: support::dropbox::http_client(),
        ingress_url: format!("{}/webhooks/dropbox/{APP_KEY}", ingress.url()),
        emu,
        sink,
        ingress,
        peer,
        peer_url,
        dropbox_bodies,
        cursors,
        configmaps,
        files: AtomicUsize::new(0),
        deliveries: AtomicUsize::new(0),
        own_gets: AtomicUsize::new(0),
    })
}

/// What the adapter is: `$PEER_VERSION` (the commit hack/bench-peer.sh built
/// it from), the binary's SHA-256 and Go's build information of it.
fn peer_identity(binary: &std::path::Path) -> Value {
    use sha2::Digest as _;
    let sha256 = std::fs::read(binary)
        .map(|b| hex::encode(sha2::Sha256::digest(&b)))
        .unwrap_or_default();
    let build_info = Command::new("go")
        .args(["version", "-m"])
        .arg(binary)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .map(str::trim)
                .filter(|l| {
                    l.starts_with("path")
                        || l.starts_with("mod")
                        || l.contains("vcs.")
                        || l.starts_with("build\tGO")
                        || l.contains(": go")
                })
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    json!({
        "project": "knative-extensions/eventing-github, cmd/receive_adapter",
        "version": std::env::var("PEER_VERSION").unwrap_or_else(|_| "unknown".into()),
        "binary_sha256": sha256,
        "go_build_info": build_info,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark beside Knative's GitHubSource adapter: make bench-peer"]
async fn bench_beside_knative_github_source() -> Result<()> {
    let count = env_usize("BENCH_PEER_WEBHOOKS", 2000);
    let rounds = env_usize("BENCH_PEER_ROUNDS", 5).max(1);
    let section = Section::start("peer");
    let identity = peer_identity(&peer_binary()?);
    let mut bench = setup().await?;

    // Warm up both (connections, caches), then check nothing went astray.
    bench.ours(ACCOUNTS, 400).await?;
    bench.peer(ACCOUNTS, 400).await?;
    let [ours, ours_bad, peer, peer_bad, stray] = bench.sink.counts();
    ensure!(
        ours == 400 && peer == 400 && ours_bad + peer_bad + stray == 0,
        "warm-up: ours {ours} (bad {ours_bad}), peer {peer} (bad {peer_bad}), stray {stray}"
    );

    // The control plane's own CPU with nothing sent (leases, heartbeats,
    // controllers), per second: the background both sides' windows contain.
    let idle_s = env_usize("BENCH_PEER_IDLE_SECONDS", 5) as f64;
    let pids = bench.pids(("ingress", bench.ingress.pid().context("ingress pid")?));
    let before = CpuSnapshot::take(&pids);
    tokio::time::sleep(Duration::from_secs_f64(idle_s)).await;
    let idle: BTreeMap<String, f64> = CpuSnapshot::take(&pids)
        .since(&before)
        .into_iter()
        .map(|(k, v)| (k, v * 1e3 / idle_s))
        .collect();

    let mut rows = Vec::new();
    for in_flight in [8, 2] {
        // Alternating rounds: the machine is shared and noisy.
        let mut ours_rounds = Vec::new();
        let mut peer_rounds = Vec::new();
        for _ in 0..rounds {
            ours_rounds.push(bench.ours(in_flight, count).await?);
            peer_rounds.push(bench.peer(in_flight, count).await?);
        }
        let (o, p) = (
            figures(&ours_rounds, "ingress"),
            figures(&peer_rounds, "receive_adapter"),
        );
        rows.push((in_flight, o, p));
    }

    // Everything sent was delivered, once, signed, one event per webhook.
    let sent = 400 + rows.iter().map(|(_, o, _)| o.webhooks).sum::<usize>();
    let sent_peer = 400 + rows.iter().map(|(_, _, p)| p.webhooks).sum::<usize>();
    let [ours, ours_bad, peer, peer_bad, stray] = bench.sink.counts();
    let all_delivered =
        ours == sent && peer == sent_peer && ours_bad == 0 && peer_bad == 0 && stray == 0;

    let mut out = String::new();
    let _ = writeln!(
        out,
        "## beside Knative's GitHubSource receive adapter {} ({count} webhooks x {rounds} alternating rounds per row, ~1 KiB bodies)",
        identity["version"]
    );
    let _ = writeln!(
        out,
        "control plane with nothing sent, CPU ms per second: {}",
        idle.iter()
            .map(|(k, v)| format!("{k} {v:.1}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let mut figures_out = Vec::new();
    let mut json_rows = Vec::new();
    for (in_flight, o, p) in &rows {
        for (side, f) in [
            ("ours (fetch+deliver+commit)", o),
            ("knative receive_adapter", p),
        ] {
            let _ = writeln!(
                out,
                "{in_flight} in flight, {side}: CPU us/webhook {} ({}), webhooks/s {}, p50 {} ms, p99 {} ms; API calls/webhook {}; exchanges/webhook {}",
                summary(&f.cpu("total"), 0),
                f.cpu_us
                    .iter()
                    .filter(|(k, _)| k.as_str() != "total")
                    .map(|(k, v)| format!("{k} {}", summary(v, 0)))
                    .collect::<Vec<_>>()
                    .join(", "),
                summary(&f.rate, 0),
                summary(&f.p50_ms, 2),
                summary(&f.p99_ms, 2),
                f.calls_per_webhook
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.2}"))
                    .collect::<Vec<_>>()
                    .join(", "),
                f.exchanges_per_webhook
                    .iter()
                    .map(|(k, v)| format!("{k} {v:.2}"))
                    .collect::<Vec<_>>()
                    .join(", "),
            );
        }
        // Rounds alternate, so round i of each side ran side by side.
        let ratios: Vec<f64> = o
            .cpu("total")
            .iter()
            .zip(p.cpu("total"))
            .map(|(a, b)| a / b)
            .collect();
        let ratio = o.median("total") / p.median("total");
        let process_ratio = o.median("ingress") / p.median("receive_adapter");
        let exchanges = |f: &Figures| f.exchanges_per_webhook.values().sum::<f64>();
        let _ = writeln!(
            out,
            "{in_flight} in flight: ratio ours/peer of CPU per webhook incl. kube-apiserver and etcd {ratio:.2} (per round {}), processes alone {process_ratio:.2} (target <= {TARGET_CPU_RATIO})",
            list(&ratios, 2)
        );
        figures_out.push(
            Figure::of_rounds(
                format!("peer_cpu_ratio_{in_flight}"),
                format!("CPU per delivered notification at {in_flight} in flight, incl. kube-apiserver and etcd: ingress (fetch + deliver + commit) / Knative GitHubSource receive adapter"),
                ratios,
                "x",
            )
            .with_value(ratio)
            .at_most(TARGET_CPU_RATIO)
            .detail(format!(
                "ratio of the medians; {} / {} us (ingress {} + kube-apiserver {} + etcd {} / adapter {} + kube-apiserver {} + etcd {}); processes alone {process_ratio:.2}×; HTTP exchanges per webhook {:.2} / {:.2} (API {:.2} / {:.2}); webhooks/s {} / {}; webhook-to-delivery p99 {} / {} ms (`make bench-peer`)",
                summary(&o.cpu("total"), 0),
                summary(&p.cpu("total"), 0),
                summary(&o.cpu("ingress"), 0),
                summary(&o.cpu("kube-apiserver"), 0),
                summary(&o.cpu("etcd"), 0),
                summary(&p.cpu("receive_adapter"), 0),
                summary(&p.cpu("kube-apiserver"), 0),
                summary(&p.cpu("etcd"), 0),
                exchanges(o),
                exchanges(p),
                o.exchanges_per_webhook.get("api").copied().unwrap_or(0.0),
                p.exchanges_per_webhook.get("api").copied().unwrap_or(0.0),
                summary(&o.rate, 0),
                summary(&p.rate, 0),
                summary(&o.p99_ms, 1),
                summary(&p.p99_ms, 1),
            )),
        );
        json_rows.push(json!({
            "in_flight": in_flight,
            "ours": o.plot_json(),
            "peer": p.plot_json(),
            "latency": {"ours": {"p50": o.p50_ms, "p99": o.p99_ms}, "peer": {"p50": p.p50_ms, "p99": p.p99_ms}},
            "detail": {"ours": o.json(), "peer": p.json()},
            "cpu_ratio_by_round": o.cpu("total").iter().zip(p.cpu("total")).map(|(a, b)| a / b).collect::<Vec<_>>(),
        }));
    }
    let _ = writeln!(
        out,
        "all delivered: {all_delivered} (ours {ours}/{sent}, bad {ours_bad}; peer {peer}/{sent_peer}, bad {peer_bad}; stray {stray})"
    );
    let data = json!({
        "peer": identity,
        "webhooks_per_round": count,
        "rounds": rounds,
        "cpu": "utime+stime from /proc/<pid>/stat of the side's process, kube-apiserver and etcd over each round (the controller and kube-controller-manager shown in detail, not counted)",
        "latency": "webhook sent -> delivery arrived at the sink, percentiles per round",
        "exchanges": "per webhook: the webhook in, deliveries out, Dropbox list_folder calls (emulator's log), API requests (kube-apiserver's counters, watches and the benchmark's own cursor reads left out)",
        "idle_control_plane_cpu_ms_per_s": idle,
        "rows": json_rows,
        "all_delivered": all_delivered,
        "delivered": {"ours": ours, "ours_sent": sent, "ours_bad": ours_bad,
                       "peer": peer, "peer_sent": sent_peer, "peer_bad": peer_bad, "stray": stray},
    });
    section.record(&out, &figures_out, data);
    let _ = bench.peer.kill();
    let _ = bench.peer.wait();
    bench.ingress.terminate(Duration::from_secs(5));
    ensure!(
        all_delivered,
        "not everything was delivered exactly once:\n{out}"
    );
    Ok(())
}
