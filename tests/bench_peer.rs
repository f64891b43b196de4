//! Side by side with the closest peer: Knative's GitHubSource receive adapter
//! (knative-extensions/eventing-github, `cmd/receive_adapter`), which verifies a
//! webhook's HMAC, converts it and POSTs one CloudEvent to a sink. The ingress is
//! measured in the same run and the same way, end to end: a webhook in, one
//! change fetched from the Dropbox emulator, one signed event delivered, the
//! cursor committed.
//!
//! Ignored by `cargo test`: the peer is not part of the project. Run it with
//! `make bench-peer` (hack/bench-peer.sh), which builds the adapter from a
//! checkout you bring and this test in release mode; README.md, "Side by side
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

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn account(k: usize) -> String {
    format!("dbid:AAB-peer-bench-account-{k:02}")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// utime + stime of a process (all its threads), in seconds.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let after = stat.rsplit(')').next().unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of /proc/<pid>/stat (11, 12 after the comm).
    let ticks: u64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ticks as f64 / if hz > 0 { hz as f64 } else { 100.0 }
}

/// kube-apiserver write requests (POST/PUT/PATCH/DELETE/APPLY) by resource.
fn apiserver_writes() -> BTreeMap<String, f64> {
    let (ok, out, _) = support::kubectl(&["get", "--raw", "/metrics"]);
    assert!(ok, "read apiserver metrics");
    let label = |line: &str, name: &str| {
        line.split(&format!("{name}=\""))
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("")
            .to_owned()
    };
    let mut writes = BTreeMap::new();
    for line in out
        .lines()
        .filter(|l| l.starts_with("apiserver_request_total{"))
    {
        if !matches!(
            label(line, "verb").as_str(),
            "POST" | "PUT" | "PATCH" | "DELETE" | "APPLY"
        ) {
            continue;
        }
        let (resource, sub) = (label(line, "resource"), label(line, "subresource"));
        let key = if sub.is_empty() {
            resource
        } else {
            format!("{resource}/{sub}")
        };
        let value: f64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0);
        *writes.entry(key).or_insert(0.0) += value;
    }
    writes
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

/// `Elements-Webhook-Signature: sha256=<base64 HMAC-SHA256(key, body)>` (README, "Events").
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
}

/// One measured round of one side.
struct Round {
    webhooks: usize,
    wall: Duration,
    cpu: f64,
    latencies: Vec<Duration>,
    writes: BTreeMap<String, f64>,
}

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

    async fn ours(&self, in_flight: usize, count: usize) -> Result<Round> {
        let next = AtomicUsize::new(0);
        let pid = self.ingress.pid().context("ingress pid")?;
        let writes_before = apiserver_writes();
        let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
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
        let (cpu, wall) = (cpu_seconds(pid) - cpu0, t0.elapsed());
        let after = apiserver_writes();
        let writes = after
            .iter()
            .map(|(k, v)| (k.clone(), v - writes_before.get(k).copied().unwrap_or(0.0)))
            .filter(|(_, v)| *v > 0.0)
            .collect();
        Ok(Round {
            webhooks: count,
            wall,
            cpu,
            latencies: slots.into_iter().flatten().collect(),
            writes,
        })
    }

    async fn peer(&self, in_flight: usize, count: usize) -> Result<Round> {
        let next = AtomicUsize::new(0);
        let pid = self.peer.id();
        let (cpu0, t0) = (cpu_seconds(pid), Instant::now());
        let slots =
            futures::future::try_join_all((0..in_flight).map(|_| self.peer_slot(&next, count)))
                .await?;
        let (cpu, wall) = (cpu_seconds(pid) - cpu0, t0.elapsed());
        Ok(Round {
            webhooks: count,
            wall,
            cpu,
            latencies: slots.into_iter().flatten().collect(),
            writes: BTreeMap::new(),
        })
    }
}

/// The figures of one side at one concurrency: medians over the rounds, latency
/// percentiles over every sample.
struct Figures {
    cpu_us: f64,
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    samples: usize,
    webhooks: usize,
    rounds_cpu_us: Vec<f64>,
    writes_per_webhook: BTreeMap<String, f64>,
}

fn figures(rounds: &[Round]) -> Figures {
    let mut latencies: Vec<Duration> = rounds.iter().flat_map(|r| r.latencies.clone()).collect();
    latencies.sort();
    let webhooks: usize = rounds.iter().map(|r| r.webhooks).sum();
    let mut writes = BTreeMap::new();
    for r in rounds {
        for (k, v) in &r.writes {
            *writes.entry(k.clone()).or_insert(0.0) += v / webhooks as f64;
        }
    }
    let rounds_cpu_us: Vec<f64> = rounds
        .iter()
        .map(|r| r.cpu * 1e6 / r.webhooks as f64)
        .collect();
    Figures {
        cpu_us: median(rounds_cpu_us.clone()),
        rate: median(
            rounds
                .iter()
                .map(|r| r.webhooks as f64 / r.wall.as_secs_f64())
                .collect(),
        ),
        p50_ms: percentile(&latencies, 0.5).as_secs_f64() * 1e3,
        p99_ms: percentile(&latencies, 0.99).as_secs_f64() * 1e3,
        samples: latencies.len(),
        webhooks,
        rounds_cpu_us,
        writes_per_webhook: writes,
    }
}

fn figures_json(f: &Figures) -> Value {
    json!({
        "cpu_us_per_webhook": f.cpu_us,
        "cpu_us_per_webhook_by_round": f.rounds_cpu_us,
        "webhooks_per_s": f.rate,
        "webhook_to_delivery_p50_ms": f.p50_ms,
        "webhook_to_delivery_p99_ms": f.p99_ms,
        "latency_samples": f.samples,
        "webhooks": f.webhooks,
        "apiserver_writes_per_webhook": f.writes_per_webhook,
    })
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
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark beside Knative's GitHubSource adapter: make bench-peer"]
async fn bench_beside_knative_github_source() -> Result<()> {
    let count = env_usize("BENCH_PEER_WEBHOOKS", 2000);
    let rounds = env_usize("BENCH_PEER_ROUNDS", 5);
    let mut bench = setup().await?;

    // Warm up both (connections, caches), then check nothing went astray.
    bench.ours(ACCOUNTS, 400).await?;
    bench.peer(ACCOUNTS, 400).await?;
    let [ours, ours_bad, peer, peer_bad, stray] = bench.sink.counts();
    ensure!(
        ours == 400 && peer == 400 && ours_bad + peer_bad + stray == 0,
        "warm-up: ours {ours} (bad {ours_bad}), peer {peer} (bad {peer_bad}), stray {stray}"
    );

    let mut out = String::new();
    let mut rows = Vec::new();
    for in_flight in [8, 2] {
        // Alternating rounds: the machine is shared and noisy.
        let mut ours_rounds = Vec::new();
        let mut peer_rounds = Vec::new();
        for _ in 0..rounds {
            ours_rounds.push(bench.ours(in_flight, count).await?);
            peer_rounds.push(bench.peer(in_flight, count).await?);
        }
        let (o, p) = (figures(&ours_rounds), figures(&peer_rounds));
        rows.push((in_flight, o, p));
    }

    // Everything sent was delivered, once, signed, one event per webhook.
    let sent = 400 + rows.iter().map(|(_, o, _)| o.webhooks).sum::<usize>();
    let sent_peer = 400 + rows.iter().map(|(_, _, p)| p.webhooks).sum::<usize>();
    let [ours, ours_bad, peer, peer_bad, stray] = bench.sink.counts();
    let all_delivered =
        ours == sent && peer == sent_peer && ours_bad == 0 && peer_bad == 0 && stray == 0;

    let _ = writeln!(
        out,
        "## beside Knative's GitHubSource receive adapter ({count} webhooks x {rounds} alternating rounds per row, ~1 KiB bodies)"
    );
    let _ = writeln!(
        out,
        "{:<9} {:<28} {:>12} {:>11} {:>9} {:>9} {:>8}",
        "in flight", "side", "CPU/webhook", "webhooks/s", "p50", "p99", "samples"
    );
    let mut json_rows = Vec::new();
    // README's table (hack/bench-results.py): one figure per row.
    let mut figures = Vec::new();
    for (in_flight, o, p) in &rows {
        for (side, f) in [
            ("ours (fetch+deliver+commit)", o),
            ("knative receive_adapter", p),
        ] {
            let _ = writeln!(
                out,
                "{in_flight:<9} {side:<28} {:>9.0} us {:>11.0} {:>6.2} ms {:>6.2} ms {:>8}",
                f.cpu_us, f.rate, f.p50_ms, f.p99_ms, f.samples
            );
        }
        let ratio = o.cpu_us / p.cpu_us;
        let _ = writeln!(
            out,
            "{in_flight:<9} ratio ours/peer CPU per delivered notification: {ratio:.2} (target <= {TARGET_CPU_RATIO})"
        );
        let _ = writeln!(
            out,
            "          CPU/webhook by round: ours {:?}, peer {:?}",
            o.rounds_cpu_us
                .iter()
                .map(|v| v.round() as i64)
                .collect::<Vec<_>>(),
            p.rounds_cpu_us
                .iter()
                .map(|v| v.round() as i64)
                .collect::<Vec<_>>()
        );
        let _ = writeln!(
            out,
            "          ours' kube-apiserver writes per webhook: {}",
            o.writes_per_webhook
                .iter()
                .map(|(k, v)| format!("{k} {v:.2}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        figures.push(json!({
            "id": format!("peer_cpu_ratio_{in_flight}"),
            "what": format!("CPU per delivered notification at {in_flight} in flight: ingress (fetch + deliver + commit) / Knative GitHubSource receive adapter"),
            "value": ratio, "unit": "x", "target": format!("<= {TARGET_CPU_RATIO}"),
            "met": ratio <= TARGET_CPU_RATIO,
            "detail": format!(
                "{:.0} / {:.0} us; webhooks/s {:.0} / {:.0}; webhook-to-delivery p50 {:.1} / {:.1} ms, p99 {:.1} / {:.1} ms; {} samples each (`make bench-peer`)",
                o.cpu_us, p.cpu_us, o.rate, p.rate, o.p50_ms, p.p50_ms, o.p99_ms, p.p99_ms, o.samples
            ),
        }));
        json_rows.push(json!({
            "in_flight": in_flight,
            "ours": figures_json(o),
            "peer": figures_json(p),
            "cpu_ratio_ours_over_peer": ratio,
            "target_cpu_ratio_max": TARGET_CPU_RATIO,
        }));
    }
    let _ = writeln!(
        out,
        "all delivered: {all_delivered} (ours {ours}/{sent}, bad {ours_bad}; peer {peer}/{sent_peer}, bad {peer_bad}; stray {stray})"
    );
    let report = json!({
        "bench": "peer",
        "title": "beside Knative's GitHubSource receive adapter",
        "figures": figures,
        "peer": {
            "binary": peer_binary()?.display().to_string(),
            "version": std::env::var("PEER_VERSION").unwrap_or_default(),
        },
        "webhooks_per_round": count,
        "rounds": rounds,
        "cpu": "utime+stime of the process from /proc/<pid>/stat over each round, median of the rounds",
        "latency": "webhook sent -> delivery arrived at the sink, every sample of every round",
        "rows": json_rows,
        "all_delivered": all_delivered,
        "delivered": {"ours": ours, "ours_sent": sent, "ours_bad": ours_bad,
                       "peer": peer, "peer_sent": sent_peer, "peer_bad": peer_bad, "stray": stray},
    });
    let dir = support::controlplane::repo_root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(
        dir.join("peer.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    std::fs::write(dir.join("peer.txt"), &out)?;
    println!("{out}");
    let _ = bench.peer.kill();
    let _ = bench.peer.wait();
    bench.ingress.terminate(Duration::from_secs(5));
    ensure!(
        all_delivered,
        "not everything was delivered exactly once:\n{out}"
    );
    Ok(())
}
