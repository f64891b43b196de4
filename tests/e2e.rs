//! `make e2e`: the Helm chart on a real node. One Kubernetes node (kubelet,
//! containerd, runc, CNI bridge, kube-proxy, tests/support/node.rs) runs the
//! project's own image (the root filesystem hack/verify-runtime-image.sh
//! assembles, imported without a registry) installed by `helm install` with the
//! chart's default values plus only the image pull policy and where the Dropbox
//! emulator and the callback receiver are. Everything, emulator and receiver
//! included, runs in a network namespace of the run's own.
//!
//! Prints step | expected | observed | seconds; any mismatch fails. Needs root
//! and the node's binaries (`make e2e` builds them); ignored by `cargo test`.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use dropbox_operator::api::DropboxElementInstance;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde_json::{Value, json};
use support::dropbox::{Emulator, http_client};
use support::node::{self, NODE_IP, NODE_NAME, Node};
use support::receiver::Receiver;
use support::{chart, condition, image, put_secret};

const RELEASE: &str = "dropbox-operator";
const RELEASE_NS: &str = "dropbox-operator";
const TENANT: &str = "e2e-tenant";
const APP_KEY: &str = "e2eappkey0000001";
const APP_SECRET: &str = "e2eappsecret0001";
const ACCOUNT: &str = "dbid:AAE2E-webhook-account-000000000001";
const LONGPOLL_ACCOUNT: &str = "dbid:AAE2E-longpoll-account-00000000002";
const SIGNING_KEY: &[u8] = b"e2e-signing-key-0123456789";
const COMPONENT: &str = "app.kubernetes.io/component";
const INGRESS_SELECTOR: &str = "app.kubernetes.io/component=webhook-ingress";

#[test]
#[ignore = "needs root and the node's binaries: run `make e2e`"]
fn e2e() {
    if !node::inside() {
        node::run_confined("e2e");
        return;
    }
    support::run_blocking(run());
}

/// One row of the printed table.
struct Row {
    step: &'static str,
    expected: &'static str,
    observed: String,
    seconds: f64,
    ok: bool,
}

#[derive(Default)]
struct Table(Vec<Row>);

impl Table {
    /// Runs one step; an error is its observation and fails the run.
    async fn step(
        &mut self,
        step: &'static str,
        expected: &'static str,
        body: impl Future<Output = Result<String>>,
    ) -> Result<()> {
        eprintln!("e2e: {step} ...");
        let started = Instant::now();
        let result = body.await;
        let seconds = started.elapsed().as_secs_f64();
        let ok = result.is_ok();
        let observed = match result {
            Ok(o) => o,
            Err(e) => format!("MISMATCH: {e:#}"),
        };
        eprintln!("e2e: {step}: {observed} ({seconds:.1}s)");
        self.0.push(Row {
            step,
            expected,
            observed,
            seconds,
            ok,
        });
        if !ok {
            self.print();
            bail!("e2e step `{step}` did not hold");
        }
        Ok(())
    }

    fn print(&self) {
        let w0 = self
            .0
            .iter()
            .map(|r| r.step.len())
            .max()
            .unwrap_or(4)
            .max(4);
        let w1 = self
            .0
            .iter()
            .map(|r| r.expected.len())
            .max()
            .unwrap_or(8)
            .max(8);
        println!(
            "\n{:<w0$} | {:<w1$} | {:>7} | observed",
            "step", "expected", "seconds"
        );
        println!(
            "{}-|-{}-|-{}-|-{}",
            "-".repeat(w0),
            "-".repeat(w1),
            "-".repeat(7),
            "-".repeat(40)
        );
        for r in &self.0 {
            println!(
                "{:<w0$} | {:<w1$} | {:>7.1} | {}{}",
                r.step,
                r.expected,
                r.seconds,
                if r.ok { "" } else { "FAILED " },
                r.observed
            );
        }
        let total: f64 = self.0.iter().map(|r| r.seconds).sum();
        println!(
            "{} steps, {} held, {total:.0}s\n",
            self.0.len(),
            self.0.iter().filter(|r| r.ok).count()
        );
    }
}

/// Everything the steps share.
struct Ctx {
    node: Node,
    client: Client,
    emu: Emulator,
    receiver: Receiver,
    /// `--set` values of the install (the upgrade adds its own).
    values: Vec<String>,
    /// The image the chart's default values name, as the runtime lists it.
    image: String,
    /// Codes issued to instances (each must be sent exactly once).
    codes: Vec<String>,
    /// The root network namespace as it was when the run began.
    root_netns_before: Vec<String>,
}

async fn run() -> Result<()> {
    let root_netns = node::root_netns().context("no root network namespace handed down")?;
    let root_netns_before = node::network_state(Some(&root_netns))?;
    let mut table = Table::default();

    let started = Instant::now();
    let node = tokio::task::spawn_blocking(Node::start).await??;
    let node_seconds = started.elapsed().as_secs_f64();
    node.keep_pod_logs();
    let client = client_for(&node.cp.kubeconfig).await?;
    let emu = Emulator::start_on(NODE_IP.into()).await;
    emu.add_app(APP_KEY, APP_SECRET);
    emu.add_redirect_uri(APP_KEY, chart::REDIRECT);
    emu.add_account(ACCOUNT, "webhook@example.com", "Webhook Account");
    emu.add_account(LONGPOLL_ACCOUNT, "longpoll@example.com", "Longpoll Account");
    let receiver = Receiver::start_on(NODE_IP.into(), Some(SIGNING_KEY)).await;
    table.0.push(Row {
        step: "node",
        expected: "Ready, untainted; kubernetes Service reachable",
        observed: format!(
            "{NODE_NAME} Ready at {NODE_IP} (kubelet, containerd, runc, CNI bridge, kube-proxy)"
        ),
        seconds: node_seconds,
        ok: true,
    });

    let values = vec![
        // The image is imported, not pulled: say so instead of trying a registry.
        "image.pullPolicy=Never".to_string(),
        format!("dropbox.apiUrl={}", emu.url),
        format!("dropbox.notifyUrl={}", emu.url),
        format!("dropbox.wwwUrl={}", emu.url),
        // The receiver is on a private address, which the SSRF policy refuses
        // unless allowed.
        format!("webhookIngress.allowedCallbackCIDRs={{{NODE_IP}/32}}"),
    ];
    let mut ctx = Ctx {
        node,
        client,
        emu,
        receiver,
        values,
        image: String::new(),
        codes: Vec::new(),
        root_netns_before,
    };
    steps(&mut ctx, &mut table, &root_netns).await
}

async fn steps(ctx: &mut Ctx, table: &mut Table, root_netns: &str) -> Result<()> {
    table
        .step(
            "image",
            "archive holds what the Dockerfile declares; imported",
            step_image(ctx),
        )
        .await?;
    table
        .step(
            "helm install",
            "deployed with default values",
            step_install(ctx),
        )
        .await?;
    table
        .step(
            "controller pods",
            "2/2 Ready, chart probes, non-root, read-only /, 1 leader",
            step_controller(ctx),
        )
        .await?;
    table
        .step(
            "oauth2 instance",
            "Ready against the emulator",
            step_instance(ctx),
        )
        .await?;
    table
        .step(
            "ingress Deployment",
            "created by the controller, 2/2 Ready",
            step_ingress(ctx),
        )
        .await?;
    table
        .step(
            "webhook via Service",
            "signed event arrives and verifies",
            step_webhook(ctx),
        )
        .await?;
    table
        .step(
            "long-polled instance",
            "delivers, no webhook received",
            step_longpoll(ctx),
        )
        .await?;
    table
        .step(
            "delete leader pod",
            "takeover; 0 Ready flaps; 0 codes sent twice",
            step_takeover(ctx),
        )
        .await?;
    table
        .step(
            "rollout restart ingress",
            "100 changes: 0 lost, 0 ids with two bodies",
            step_rollout(ctx),
        )
        .await?;
    table
        .step(
            "drain ingress pods",
            "PDB respected: >= minAvailable Ready",
            step_drain(ctx),
        )
        .await?;
    table
        .step(
            "helm upgrade",
            "pods roll; instances Ready; 0 status writes",
            step_upgrade(ctx),
        )
        .await?;
    table
        .step(
            "helm uninstall",
            "0 objects left; every token revoked",
            step_uninstall(ctx),
        )
        .await?;
    table
        .step(
            "confinement",
            "root namespace unchanged; no route out",
            step_confinement(ctx, root_netns),
        )
        .await?;
    table.print();
    Ok(())
}

// ---- helpers -----------------------------------------------------------------

async fn client_for(kubeconfig: &std::path::Path) -> Result<Client> {
    let config = Config::from_custom_kubeconfig(
        Kubeconfig::read_from(kubeconfig)?,
        &KubeConfigOptions::default(),
    )
    .await?;
    Ok(Client::try_from(config)?)
}

impl Ctx {
    fn kubectl(&self, args: &[&str]) -> Result<String> {
        run_cmd(self.node.cp.kubectl().args(args))
    }

    fn helm(&self, args: &[&str]) -> Result<String> {
        run_cmd(self.node.cp.helm().args(args))
    }

    fn set_args(&self, extra: &[&str]) -> Vec<String> {
        self.values
            .iter()
            .map(String::as_str)
            .chain(extra.iter().copied())
            .flat_map(|v| ["--set".to_string(), v.to_string()])
            .collect()
    }

    fn instances(&self) -> Api<DropboxElementInstance> {
        Api::namespaced(self.client.clone(), TENANT)
    }
}

fn run_cmd(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().context("run command")?;
    ensure!(
        out.status.success(),
        "{:?} failed: {}{}",
        cmd.get_args().collect::<Vec<_>>(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Polls `check` (which says why it does not hold yet) until it holds.
async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> Result<T>,
) -> Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        match check().await {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() > deadline => {
                bail!("{what}: not within {timeout:?}: {e:#}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// The Deployments with `component` anywhere (the chart's values decide where).
async fn deployments(client: &Client, component: &str) -> Result<Vec<Deployment>> {
    Ok(Api::<Deployment>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{COMPONENT}={component}")))
        .await?
        .items)
}

async fn one_deployment(client: &Client, component: &str) -> Result<Deployment> {
    let mut found = deployments(client, component).await?;
    ensure!(
        found.len() == 1,
        "{} Deployments with {COMPONENT}={component}",
        found.len()
    );
    Ok(found.remove(0))
}

fn ns_name(d: &Deployment) -> (String, String) {
    (
        d.metadata.namespace.clone().unwrap_or_default(),
        d.metadata.name.clone().unwrap_or_default(),
    )
}

/// Ready pods of a Deployment when it is fully rolled out (`want` replicas,
/// all updated, all ready), else an error saying what is missing.
async fn rolled_out(client: &Client, component: &str, want: i32) -> Result<Vec<Pod>> {
    let d = one_deployment(client, component).await?;
    let status = d.status.clone().unwrap_or_default();
    let generation = d.metadata.generation.unwrap_or(0);
    ensure!(
        status.observed_generation == Some(generation)
            && status.replicas == Some(want)
            && status.updated_replicas == Some(want)
            && status.ready_replicas == Some(want),
        "{component}: replicas {:?}, updated {:?}, ready {:?}, want {want}",
        status.replicas,
        status.updated_replicas,
        status.ready_replicas
    );
    let pods = pods_of(client, component).await?;
    let ready: Vec<Pod> = pods.into_iter().filter(pod_ready).collect();
    ensure!(
        ready.len() == want as usize,
        "{component}: {} Ready pods",
        ready.len()
    );
    Ok(ready)
}

async fn pods_of(client: &Client, component: &str) -> Result<Vec<Pod>> {
    Ok(Api::<Pod>::all(client.clone())
        .list(&ListParams::default().labels(&format!("{COMPONENT}={component}")))
        .await?
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .collect())
}

fn pod_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn pod_name(p: &Pod) -> String {
    p.metadata.name.clone().unwrap_or_default()
}

fn pod_ip(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .unwrap_or_default()
}

/// `/metrics` of a pod on `port`, summed per metric name prefix.
async fn metric(pod: &Pod, port: u16, name: &str) -> Result<f64> {
    let text = http_client()
        .get(format!("http://{}:{port}/metrics", pod_ip(pod)))
        .timeout(Duration::from_secs(5))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum())
}

/// The value of env var `name` of a Deployment's first container.
fn env_of(d: &Deployment, name: &str) -> Option<String> {
    d.spec
        .template
        .spec
        .as_ref()?
        .containers
        .first()?
        .env
        .as_ref()?
        .iter()
        .find(|e| e.name == name)?
        .value
        .clone()
}

/// The metrics/probe port of a Deployment's first container (named `metrics`).
fn metrics_port(d: &Deployment) -> Result<u16> {
    d.spec
        .template
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .and_then(|c| c.ports.as_ref())
        .and_then(|ports| ports.iter().find(|p| p.name.as_deref() == Some("metrics")))
        .map(|p| p.container_port as u16)
        .context("no container port named metrics")
}

/// What the kernel says about the processes of `subcommand` in containers
/// (the node sees them: their PID namespaces are inside the run's): user id,
/// effective capabilities, whether `/` is read-only.
fn container_processes(subcommand: &str) -> Vec<(u32, String, String, bool)> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in entries.flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        if args.first() != Some(&&b"/dropbox-operator"[..])
            || args.get(1) != Some(&subcommand.as_bytes())
        {
            continue;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.split_whitespace().next().unwrap_or("").to_owned())
                .unwrap_or_default()
        };
        let root_ro = std::fs::read_to_string(format!("/proc/{pid}/mountinfo"))
            .unwrap_or_default()
            .lines()
            .any(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                f.get(4) == Some(&"/") && f.get(5).is_some_and(|o| o.split(',').any(|o| o == "ro"))
            });
        out.push((pid, field("Uid:"), field("CapEff:"), root_ro));
    }
    out
}

/// Checks that every process of `subcommand` runs as 65532, without
/// capabilities, on a read-only root; says how many there are.
fn check_processes(subcommand: &str, want: usize) -> Result<String> {
    let procs = container_processes(subcommand);
    ensure!(
        procs.len() == want,
        "{} `dropbox-operator {subcommand}` processes on the node, want {want}",
        procs.len()
    );
    for (pid, uid, cap, ro) in &procs {
        ensure!(
            uid == "65532" && cap.trim_start_matches('0').is_empty() && *ro,
            "pid {pid} ({subcommand}): uid {uid}, CapEff {cap}, read-only / {ro}"
        );
    }
    Ok(format!("{want} as uid 65532, no capabilities, / read-only"))
}

/// Samples the Ready conditions of the instances that exist when it starts,
/// until stopped: how many times one was seen not Ready.
struct ReadyWatch {
    flaps: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl ReadyWatch {
    async fn start(api: Api<DropboxElementInstance>) -> Result<ReadyWatch> {
        let watched: BTreeSet<Option<String>> = api
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .map(|i| i.metadata.name)
            .collect();
        let flaps = Arc::new(AtomicUsize::new(0));
        let seen = flaps.clone();
        let task = tokio::spawn(async move {
            loop {
                if let Ok(list) = api.list(&ListParams::default()).await {
                    for i in list
                        .items
                        .iter()
                        .filter(|i| watched.contains(&i.metadata.name))
                    {
                        if !support::condition_is(i, "Ready", "True", None) {
                            seen.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
        Ok(ReadyWatch { flaps, task })
    }

    fn stop(self) -> usize {
        self.task.abort();
        self.flaps.load(Ordering::SeqCst)
    }
}

/// Ready's lastTransitionTime of every instance.
async fn ready_transitions(api: &Api<DropboxElementInstance>) -> Result<BTreeMap<String, String>> {
    Ok(api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|i| {
            (
                i.metadata.name.clone().unwrap_or_default(),
                condition(i, "Ready")
                    .map(|c| format!("{}@{:?}", c.status, c.last_transition_time))
                    .unwrap_or_default(),
            )
        })
        .collect())
}

/// Codes the emulator received more than once at /oauth2/token, of those issued.
fn codes_sent_twice(ctx: &Ctx) -> (usize, usize) {
    let mut sent: BTreeMap<String, usize> = BTreeMap::new();
    for call in ctx.emu.calls_to("/oauth2/token") {
        if call.form.get("grant_type").map(String::as_str) == Some("authorization_code")
            && let Some(code) = call.form.get("code")
        {
            *sent.entry(code.clone()).or_default() += 1;
        }
    }
    let twice = ctx
        .codes
        .iter()
        .filter(|c| sent.get(*c).copied().unwrap_or(0) > 1)
        .count();
    let exchanged = ctx.codes.iter().filter(|c| sent.contains_key(*c)).count();
    (twice, exchanged)
}

/// The webhook URL of the ingress Service (found by label, wherever it is).
async fn webhook_url(client: &Client) -> Result<String> {
    let services = Api::<Service>::all(client.clone())
        .list(&ListParams::default().labels(INGRESS_SELECTOR))
        .await?
        .items;
    ensure!(services.len() == 1, "{} ingress Services", services.len());
    let spec = services[0].spec.clone().unwrap_or_default();
    let ip = spec
        .cluster_ip
        .context("ingress Service without a cluster IP")?;
    let port = spec
        .ports
        .unwrap_or_default()
        .first()
        .map(|p| p.port)
        .context("ingress Service without a port")?;
    Ok(format!("http://{ip}:{port}/webhooks/dropbox/{APP_KEY}"))
}

/// Paths of accepted events that verified with both signatures.
fn verified_paths(receiver: &Receiver) -> BTreeSet<String> {
    receiver
        .accepted()
        .iter()
        .filter(|d| d.elements_signature_ok == Some(true) && d.standard_webhooks_ok == Some(true))
        .flat_map(|d| d.events())
        .filter_map(|e| e["data"]["path_display"].as_str().map(str::to_owned))
        .collect()
}

// ---- steps -------------------------------------------------------------------

async fn step_image(ctx: &mut Ctx) -> Result<String> {
    let repo = support::controlplane::repo_root();
    let rootfs = repo.join("target/runtime-image/rootfs");
    let config = repo.join("target/runtime-image/config.json");
    image::ensure_assembled(&rootfs, &config)?;
    // The image the chart's default values name.
    let rendered = run_cmd(
        ctx.node
            .cp
            .helm()
            .args(["template", RELEASE, &chart::chart_arg(), "-n", RELEASE_NS])
            .args(ctx.set_args(&[])),
    )?;
    let reference = rendered
        .lines()
        .find_map(|l| l.trim().strip_prefix("image: "))
        .map(|s| s.trim_matches('"').to_owned())
        .context("no image in the rendered chart")?;
    ctx.image = image::normalized(&reference);
    let archive = ctx.node.import_image(&rootfs, &config, &ctx.image)?;
    let declared = image::declared(&repo.join("Dockerfile"))?;
    let held = image::read_archive(&archive)?;
    ensure!(
        held.name == ctx.image,
        "the archive names {}, the chart {}",
        held.name,
        ctx.image
    );
    let diffs = image::compare(
        &declared,
        &held,
        &repo.join("target/release/dropbox-operator"),
    );
    ensure!(diffs.is_empty(), "{}", diffs.join("; "));
    Ok(format!(
        "{} ({} files): USER {}, ENTRYPOINT, CMD, EXPOSE {:?}, {} labels, base env and files as declared",
        ctx.image,
        held.files.len(),
        declared.user,
        declared.exposed,
        declared.labels.len()
    ))
}

async fn step_install(ctx: &Ctx) -> Result<String> {
    let mut args = vec![
        "install".to_string(),
        RELEASE.into(),
        chart::chart_arg(),
        "-n".into(),
        RELEASE_NS.into(),
        "--create-namespace".into(),
    ];
    args.extend(ctx.set_args(&[]));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ctx.helm(&args)?;
    let status = ctx.helm(&["status", RELEASE, "-n", RELEASE_NS, "-o", "json"])?;
    let status: Value = serde_json::from_str(&status)?;
    let state = status["info"]["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    ensure!(state == "deployed", "release status {state}");
    Ok(format!("{state}; --set {}", ctx.values.join(" --set ")))
}

async fn step_controller(ctx: &Ctx) -> Result<String> {
    let pods = wait_for(
        "controller pods Ready",
        Duration::from_secs(180),
        async || rolled_out(&ctx.client, "controller", 2).await,
    )
    .await?;
    let d = one_deployment(&ctx.client, "controller").await?;
    let container = d
        .spec
        .template
        .spec
        .as_ref()
        .and_then(|s| s.containers.first())
        .context("controller container")?;
    let probes = container.readiness_probe.is_some() && container.liveness_probe.is_some();
    ensure!(probes, "the chart's probes are missing");
    for p in &pods {
        let restarts = p
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .map(|c| c.iter().map(|c| c.restart_count).sum::<i32>())
            .unwrap_or(0);
        ensure!(restarts == 0, "{} restarted {restarts} times", pod_name(p));
    }
    let processes = check_processes("controller", 2)?;
    let port = metrics_port(&d)?;
    let leader = wait_for("exactly one leader", Duration::from_secs(60), async || {
        let mut leaders = Vec::new();
        for p in &pods {
            if metric(p, port, "dropbox_operator_leader").await? == 1.0 {
                leaders.push(pod_name(p));
            }
        }
        ensure!(leaders.len() == 1, "pods reporting leader: {leaders:?}");
        let lease_name = env_of(&d, "LEADER_ELECTION_LEASE").context("lease name")?;
        let lease = Api::<Lease>::namespaced(ctx.client.clone(), RELEASE_NS)
            .get(&lease_name)
            .await?;
        let holder = lease
            .spec
            .and_then(|s| s.holder_identity)
            .unwrap_or_default();
        ensure!(
            holder == leaders[0],
            "lease holder {holder}, leader metric {leaders:?}"
        );
        Ok(holder)
    })
    .await?;
    Ok(format!(
        "2/2 Ready, 0 restarts, readiness+liveness probes; {processes}; leader {leader} (1 of 2, = Lease holder)"
    ))
}

/// An oauth2 instance `name` of `account` (events to the receiver, signed).
async fn create_instance(ctx: &mut Ctx, name: &str, account: &str, source: &str) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), TENANT);
    put_secret(
        &secrets,
        "dropbox-app",
        &[("oauth.api.key", APP_KEY), ("oauth.api.secret", APP_SECRET)],
    )
    .await?;
    put_secret(
        &secrets,
        "events-key",
        &[("key", std::str::from_utf8(SIGNING_KEY)?)],
    )
    .await?;
    let code = ctx.emu.issue_code(APP_KEY, account, Some(chart::REDIRECT));
    ctx.codes.push(code.clone());
    put_secret(&secrets, &format!("{name}-code"), &[("code", &code)]).await?;
    let instance: DropboxElementInstance = serde_json::from_value(json!({
        "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
        "kind": "DropboxElementInstance",
        "metadata": {"name": name},
        "spec": {
            "element": {"key": "dropbox"},
            "authentication": {
                "type": "oauth2",
                "appSecretRef": {"name": "dropbox-app"},
                "codeSecretRef": {"name": format!("{name}-code")},
                "callbackUrl": chart::REDIRECT
            },
            "events": {
                "enabled": true,
                "callbackUrl": ctx.receiver.url,
                "signatureKeySecretRef": {"name": "events-key", "key": "key"},
                "source": source
            }
        }
    }))?;
    ctx.instances()
        .create(&PostParams::default(), &instance)
        .await?;
    Ok(())
}

async fn wait_instance_ready(ctx: &Ctx, name: &str) -> Result<DropboxElementInstance> {
    wait_for(
        &format!("{name} Ready"),
        Duration::from_secs(120),
        async || {
            let i = ctx.instances().get(name).await?;
            ensure!(
                support::condition_is(&i, "Ready", "True", None),
                "conditions {:?}",
                i.status.as_ref().map(|s| &s.conditions)
            );
            Ok(i)
        },
    )
    .await
}

async fn step_instance(ctx: &mut Ctx) -> Result<String> {
    ctx.kubectl(&["create", "namespace", TENANT])?;
    create_instance(ctx, "webhooked", ACCOUNT, "webhook").await?;
    let i = wait_instance_ready(ctx, "webhooked").await?;
    let account = i
        .status
        .as_ref()
        .and_then(|s| s.account.as_ref())
        .and_then(|a| a.account_id.clone())
        .unwrap_or_default();
    ensure!(account == ACCOUNT, "account {account}");
    Ok(format!(
        "{TENANT}/webhooked Ready, account {account}, code exchanged once"
    ))
}

async fn step_ingress(ctx: &Ctx) -> Result<String> {
    let pods = wait_for("ingress pods Ready", Duration::from_secs(180), async || {
        rolled_out(&ctx.client, "webhook-ingress", 2).await
    })
    .await?;
    let d = one_deployment(&ctx.client, "webhook-ingress").await?;
    let (ns, name) = ns_name(&d);
    let owner = d
        .metadata
        .owner_references
        .as_ref()
        .and_then(|o| o.first())
        .map(|o| format!("{}/{}", o.kind, o.name))
        .unwrap_or_else(|| "none".into());
    let processes = check_processes("ingress", pods.len())?;
    Ok(format!(
        "{ns}/{name} 2/2 Ready (owner {owner}); {processes}"
    ))
}

async fn step_webhook(ctx: &Ctx) -> Result<String> {
    let url = webhook_url(&ctx.client).await?;
    ctx.emu
        .upload(ACCOUNT, "/e2e/hello.txt", b"hello from the e2e node");
    // Ready pods reach the Service's endpoints (EndpointSlice, then kube-proxy's
    // rules) a moment later: until then a connection is refused.
    let answer = wait_for(
        "the Service to take the webhook",
        Duration::from_secs(30),
        async || {
            ctx.emu
                .try_send_webhook(&url, APP_KEY, &[ACCOUNT])
                .await
                .map_err(|e| anyhow::anyhow!("{e}"))
        },
    )
    .await?;
    ensure!(
        answer.status() == 200,
        "the ingress answered {}",
        answer.status()
    );
    wait_for("the signed event", Duration::from_secs(60), async || {
        ensure!(
            verified_paths(&ctx.receiver).contains("/e2e/hello.txt"),
            "not delivered yet"
        );
        Ok(())
    })
    .await?;
    Ok(format!(
        "POST {} -> 200; event for /e2e/hello.txt arrived, Elements and Standard Webhooks signatures verify",
        url.split("/webhooks").next().unwrap_or("")
    ))
}

async fn ingress_webhooks_received(ctx: &Ctx) -> Result<f64> {
    let d = one_deployment(&ctx.client, "webhook-ingress").await?;
    let port = metrics_port(&d)?;
    let mut total = 0.0;
    for p in pods_of(&ctx.client, "webhook-ingress").await? {
        total += metric(&p, port, "dropbox_ingress_webhooks_total").await?;
    }
    Ok(total)
}

async fn step_longpoll(ctx: &mut Ctx) -> Result<String> {
    create_instance(ctx, "longpolled", LONGPOLL_ACCOUNT, "longpoll").await?;
    let i = wait_instance_ready(ctx, "longpolled").await?;
    let webhook_path = i
        .status
        .as_ref()
        .and_then(|s| s.events.as_ref())
        .and_then(|e| e.webhook_path.clone());
    ensure!(webhook_path.is_none(), "webhookPath {webhook_path:?}");
    wait_for("a long-poll held", Duration::from_secs(60), async || {
        ensure!(ctx.emu.longpolls_waiting() >= 1, "no long-poll waiting");
        Ok(())
    })
    .await?;
    let received_before = ingress_webhooks_received(ctx).await?;
    let started = Instant::now();
    ctx.emu.upload(
        LONGPOLL_ACCOUNT,
        "/e2e/longpoll.txt",
        b"found by a long-poll",
    );
    wait_for(
        "the long-polled event",
        Duration::from_secs(60),
        async || {
            ensure!(
                verified_paths(&ctx.receiver).contains("/e2e/longpoll.txt"),
                "not delivered yet"
            );
            Ok(())
        },
    )
    .await?;
    let received = ingress_webhooks_received(ctx).await? - received_before;
    ensure!(received == 0.0, "the ingress received {received} webhooks");
    Ok(format!(
        "delivered {:.1}s after the change, signed; 0 webhooks received, no webhookPath",
        started.elapsed().as_secs_f64()
    ))
}

async fn step_takeover(ctx: &mut Ctx) -> Result<String> {
    let d = one_deployment(&ctx.client, "controller").await?;
    let lease_name = env_of(&d, "LEADER_ELECTION_LEASE").context("lease name")?;
    let leases = Api::<Lease>::namespaced(ctx.client.clone(), RELEASE_NS);
    let holder = |l: Lease| l.spec.and_then(|s| s.holder_identity).unwrap_or_default();
    let old = holder(leases.get(&lease_name).await?);
    let transitions = ready_transitions(&ctx.instances()).await?;
    let watch = ReadyWatch::start(ctx.instances()).await?;
    let started = Instant::now();
    Api::<Pod>::namespaced(ctx.client.clone(), RELEASE_NS)
        .delete(&old, &DeleteParams::default())
        .await?;
    let new = wait_for("a new leader", Duration::from_secs(60), async || {
        let h = holder(leases.get(&lease_name).await?);
        ensure!(!h.is_empty() && h != old, "holder {h}");
        Ok(h)
    })
    .await?;
    let takeover = started.elapsed().as_secs_f64();
    wait_for(
        "controller back to 2/2",
        Duration::from_secs(120),
        async || rolled_out(&ctx.client, "controller", 2).await,
    )
    .await?;
    // The new leader acts: an instance made now becomes Ready.
    create_instance(ctx, "after-takeover", ACCOUNT, "webhook").await?;
    wait_instance_ready(ctx, "after-takeover").await?;
    let flaps = watch.stop();
    let after = ready_transitions(&ctx.instances()).await?;
    let changed: Vec<&String> = transitions
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(v))
        .map(|(k, _)| k)
        .collect();
    let (twice, exchanged) = codes_sent_twice(ctx);
    ensure!(
        flaps == 0 && changed.is_empty() && twice == 0 && exchanged == ctx.codes.len(),
        "Ready not True seen {flaps} times, transitions changed {changed:?}, codes sent twice {twice}, \
         exchanged {exchanged} of {}",
        ctx.codes.len()
    );
    Ok(format!(
        "{old} -> {new} in {takeover:.1}s; a new instance Ready under it; Ready flaps 0; \
         codes sent twice 0 ({exchanged} codes, each once)"
    ))
}

async fn step_rollout(ctx: &Ctx) -> Result<String> {
    let d = one_deployment(&ctx.client, "webhook-ingress").await?;
    let (ns, name) = ns_name(&d);
    let old_pods: BTreeSet<String> = pods_of(&ctx.client, "webhook-ingress")
        .await?
        .iter()
        .map(pod_name)
        .collect();
    let arrived_before = ctx.receiver.arrived_ids().len();
    let recorded_before = ctx.receiver.all().len();
    let paths: Vec<String> = (0..100)
        .map(|i| format!("/e2e/batch/file-{i:03}.txt"))
        .collect();
    // Small pages, and the receiver holds deliveries after two more: the
    // restart happens while the delivery is under way.
    ctx.emu.set_list_limit(10);
    ctx.receiver.hold_after(ctx.receiver.accepted().len() + 2);
    for p in &paths {
        ctx.emu.upload(ACCOUNT, p, p.as_bytes());
    }
    let url = webhook_url(&ctx.client).await?;
    let answer = ctx.emu.send_webhook(&url, APP_KEY, &[ACCOUNT]).await;
    ensure!(
        answer.status() == 200,
        "the ingress answered {}",
        answer.status()
    );
    wait_for(
        "a delivery held mid-way",
        Duration::from_secs(60),
        async || {
            ensure!(ctx.receiver.in_flight() >= 1, "nothing held yet");
            Ok(())
        },
    )
    .await?;
    let delivered_before = verified_paths(&ctx.receiver)
        .iter()
        .filter(|p| p.starts_with("/e2e/batch/"))
        .count();
    ctx.kubectl(&["rollout", "restart", "deployment", &name, "-n", &ns])?;
    // The held delivery is still in flight when its pod is told to stop; the
    // receiver lets deliveries through again only once every old pod is gone
    // (so an old pod's drain gives up on it), and the new pods deliver.
    let new_pods = wait_for("the rollout", Duration::from_secs(180), async || {
        let pods = rolled_out(&ctx.client, "webhook-ingress", 2).await?;
        let all = Api::<Pod>::namespaced(ctx.client.clone(), &ns)
            .list(&ListParams::default().labels(INGRESS_SELECTOR))
            .await?
            .items;
        ensure!(
            all.iter().all(|p| !old_pods.contains(&pod_name(p))),
            "old pods still there"
        );
        Ok(pods)
    })
    .await?;
    ctx.receiver.release();
    wait_for("all 100 changes", Duration::from_secs(180), async || {
        let got = verified_paths(&ctx.receiver);
        let missing = paths.iter().filter(|p| !got.contains(*p)).count();
        ensure!(missing == 0, "{missing} not delivered yet");
        Ok(())
    })
    .await?;
    // The receiver's record: one body per id, over everything that arrived.
    let mut bodies: BTreeMap<String, BTreeSet<Vec<u8>>> = BTreeMap::new();
    let mut requests = 0;
    for delivery in ctx.receiver.all() {
        requests += 1;
        bodies
            .entry(delivery.event_id.clone())
            .or_default()
            .insert(delivery.raw.clone());
    }
    let two_bodies = bodies.values().filter(|b| b.len() > 1).count();
    let got = verified_paths(&ctx.receiver);
    let lost = paths.iter().filter(|p| !got.contains(*p)).count();
    let duplicates = requests - bodies.len();
    // Requests that arrived but were never answered: their sender went away.
    let cut_off = (ctx.receiver.arrived_ids().len() - arrived_before)
        - (ctx.receiver.all().len() - recorded_before);
    ensure!(
        lost == 0 && two_bodies == 0,
        "lost {lost}, ids with two bodies {two_bodies}"
    );
    Ok(format!(
        "{delivered_before} delivered before the restart; {cut_off} deliveries cut off with \
         their pod; {} pods replaced; 100/100 delivered, \
         0 lost, 0 ids with two bodies ({duplicates} redeliveries with the same id and body)",
        new_pods.len()
    ))
}

async fn step_drain(ctx: &Ctx) -> Result<String> {
    let d = one_deployment(&ctx.client, "webhook-ingress").await?;
    let (ns, _) = ns_name(&d);
    let pdbs = Api::<PodDisruptionBudget>::namespaced(ctx.client.clone(), &ns)
        .list(&ListParams::default())
        .await?
        .items;
    let pod_labels = d
        .spec
        .template
        .metadata
        .as_ref()
        .and_then(|m| m.labels.clone())
        .unwrap_or_default();
    let pdb = pdbs
        .iter()
        .find(|p| {
            p.spec
                .as_ref()
                .and_then(|s| s.selector.as_ref())
                .and_then(|s| s.match_labels.as_ref())
                .is_some_and(|m| m.iter().all(|(k, v)| pod_labels.get(k) == Some(v)))
        })
        .context("no PodDisruptionBudget selects the ingress pods")?;
    let min_available = pdb
        .spec
        .as_ref()
        .and_then(|s| s.min_available.clone())
        .map(|m| match m {
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(i) => i as usize,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(_) => 1,
        })
        .context("the ingress PDB has no minAvailable")?;
    let before: BTreeSet<String> = pods_of(&ctx.client, "webhook-ingress")
        .await?
        .iter()
        .map(pod_name)
        .collect();
    // Sample Ready ingress pods while the drain runs.
    let lowest = Arc::new(AtomicUsize::new(usize::MAX));
    let sampler = {
        let lowest = lowest.clone();
        let client = ctx.client.clone();
        tokio::spawn(async move {
            loop {
                if let Ok(pods) = pods_of(&client, "webhook-ingress").await {
                    let ready = pods.iter().filter(|p| pod_ready(p)).count();
                    lowest.fetch_min(ready, Ordering::SeqCst);
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };
    let drain = ctx
        .node
        .cp
        .kubectl()
        .args([
            "drain",
            NODE_NAME,
            "--pod-selector",
            INGRESS_SELECTOR,
            "--ignore-daemonsets",
            "--delete-emptydir-data",
            "--timeout=20s",
        ])
        .output()?;
    sampler.abort();
    let stderr = String::from_utf8_lossy(&drain.stderr).into_owned();
    let stdout = String::from_utf8_lossy(&drain.stdout).into_owned();
    let after = pods_of(&ctx.client, "webhook-ingress").await?;
    let evicted = before
        .iter()
        .filter(|p| !after.iter().any(|a| &pod_name(a) == *p))
        .count();
    ctx.kubectl(&["uncordon", NODE_NAME])?;
    let lowest = lowest.load(Ordering::SeqCst);
    ensure!(
        !drain.status.success() && stderr.contains("disruption budget"),
        "the drain finished or failed otherwise: {stdout}{stderr}"
    );
    ensure!(
        evicted == before.len() - min_available && lowest >= min_available,
        "evicted {evicted} of {}, Ready ingress pods went down to {lowest} (minAvailable {min_available})",
        before.len()
    );
    wait_for(
        "ingress back to 2/2",
        Duration::from_secs(120),
        async || rolled_out(&ctx.client, "webhook-ingress", 2).await,
    )
    .await?;
    Ok(format!(
        "{evicted} of {} evicted, the rest refused by the PDB (minAvailable {min_available}) until the \
         20s timeout; Ready ingress pods never below {lowest}; 2/2 again after uncordon",
        before.len()
    ))
}

async fn resource_versions(ctx: &Ctx) -> Result<BTreeMap<String, String>> {
    Ok(ctx
        .instances()
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|i| {
            (
                i.metadata.name.clone().unwrap_or_default(),
                i.metadata.resource_version.clone().unwrap_or_default(),
            )
        })
        .collect())
}

async fn step_upgrade(ctx: &Ctx) -> Result<String> {
    let versions = resource_versions(ctx).await?;
    let old_controllers: BTreeSet<String> = pods_of(&ctx.client, "controller")
        .await?
        .iter()
        .map(pod_name)
        .collect();
    let old_ingress: BTreeSet<String> = pods_of(&ctx.client, "webhook-ingress")
        .await?
        .iter()
        .map(pod_name)
        .collect();
    let watch = ReadyWatch::start(ctx.instances()).await?;
    let mut args = vec![
        "upgrade".to_string(),
        RELEASE.into(),
        chart::chart_arg(),
        "-n".into(),
        RELEASE_NS.into(),
    ];
    args.extend(ctx.set_args(&["logLevel=debug", "webhookIngress.replicas=3"]));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    ctx.helm(&args)?;
    wait_for(
        "the controller rolled",
        Duration::from_secs(180),
        async || {
            let pods = rolled_out(&ctx.client, "controller", 2).await?;
            ensure!(
                pods.iter().all(|p| !old_controllers.contains(&pod_name(p))),
                "old controller pods still there"
            );
            Ok(())
        },
    )
    .await?;
    let ingress = wait_for(
        "the ingress rolled to 3",
        Duration::from_secs(180),
        async || {
            let d = one_deployment(&ctx.client, "webhook-ingress").await?;
            ensure!(
                env_of(&d, "LOG_LEVEL").as_deref() == Some("debug"),
                "ingress LOG_LEVEL {:?}",
                env_of(&d, "LOG_LEVEL")
            );
            let pods = rolled_out(&ctx.client, "webhook-ingress", 3).await?;
            ensure!(
                pods.iter().all(|p| !old_ingress.contains(&pod_name(p))),
                "old ingress pods still there"
            );
            Ok(pods)
        },
    )
    .await?;
    // The new leader has looked at every instance: it reconciled at least once each.
    let d = one_deployment(&ctx.client, "controller").await?;
    let port = metrics_port(&d)?;
    wait_for(
        "the new leader reconciled",
        Duration::from_secs(60),
        async || {
            let mut reconciles = 0.0;
            for p in pods_of(&ctx.client, "controller").await? {
                reconciles += metric(&p, port, "dropbox_operator_reconciles_total").await?;
            }
            ensure!(
                reconciles >= versions.len() as f64,
                "{reconciles} reconciles"
            );
            Ok(())
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let flaps = watch.stop();
    let after = resource_versions(ctx).await?;
    let writes = versions
        .iter()
        .filter(|(k, v)| after.get(*k) != Some(v))
        .count();
    ensure!(
        flaps == 0 && writes == 0,
        "Ready not True seen {flaps} times; instances written {writes} ({versions:?} -> {after:?})"
    );
    Ok(format!(
        "controller 2/2 new pods; ingress {}/3 new pods at LOG_LEVEL=debug; Ready flaps 0; \
         instance writes 0 ({} instances, resourceVersion unchanged)",
        ingress.len(),
        versions.len()
    ))
}

async fn step_uninstall(ctx: &Ctx) -> Result<String> {
    let started = Instant::now();
    ctx.kubectl(&[
        "delete",
        "dropboxelementinstances",
        "--all",
        "-n",
        TENANT,
        "--timeout=120s",
    ])?;
    let deleted = started.elapsed().as_secs_f64();
    ctx.helm(&[
        "uninstall",
        RELEASE,
        "-n",
        RELEASE_NS,
        "--wait",
        "--timeout=120s",
    ])?;
    // Every listable resource, by the labels the chart and the controller put on
    // what they make; the CRD stays (Helm never deletes crds/).
    let resources = ctx.kubectl(&["api-resources", "--verbs=list", "-o", "name"])?;
    let resources: Vec<&str> = resources
        .lines()
        .filter(|r| {
            *r != "customresourcedefinitions.apiextensions.k8s.io" && !r.starts_with("events")
        })
        .collect();
    let joined = resources.join(",");
    let namespaced = ctx.kubectl(&[
        "api-resources",
        "--verbs=list",
        "--namespaced",
        "-o",
        "name",
    ])?;
    let namespaced = namespaced
        .lines()
        .filter(|r| !r.starts_with("events"))
        .collect::<Vec<_>>()
        .join(",");
    let left =
        wait_for(
            "nothing of the release left",
            Duration::from_secs(120),
            async || {
                let mut left = Vec::new();
                for selector in [
                    format!("app.kubernetes.io/instance={RELEASE}"),
                    "app.kubernetes.io/managed-by=dropbox-operator".to_string(),
                    format!("owner=helm,name={RELEASE}"),
                ] {
                    let out = ctx.kubectl(&[
                        "get",
                        &joined,
                        "-A",
                        "-l",
                        &selector,
                        "-o",
                        "name",
                        "--ignore-not-found",
                    ])?;
                    left.extend(out.lines().map(str::to_owned));
                }
                // Whatever else is in the release's namespace but what Kubernetes
                // puts into every namespace.
                let out = ctx.kubectl(&[
                    "get",
                    &namespaced,
                    "-n",
                    RELEASE_NS,
                    "-o",
                    "name",
                    "--ignore-not-found",
                ])?;
                left.extend(out.lines().map(str::to_owned).filter(|o| {
                    o != "serviceaccount/default" && o != "configmap/kube-root-ca.crt"
                }));
                ensure!(left.is_empty(), "left: {left:?}");
                Ok(left)
            },
        )
        .await?;
    let live = ctx.emu.live_oauth_access_tokens();
    let revokes = ctx.emu.calls_to("/2/auth/token/revoke").len();
    ensure!(live.is_empty(), "{} tokens not revoked", live.len());
    Ok(format!(
        "instances gone in {deleted:.1}s (finalizer revoked); {} objects left over {} resource types \
         (CRD kept, as Helm keeps crds/); 0 live tokens, {revokes} revocations",
        left.len(),
        resources.len()
    ))
}

async fn step_confinement(ctx: &Ctx, root_netns: &str) -> Result<String> {
    let now = node::network_state(Some(root_netns))?;
    let (gained, lost) = node::network_diff(&ctx.root_netns_before, &now);
    ensure!(
        gained.is_empty() && lost.is_empty(),
        "root namespace gained {gained:?}, lost {lost:?}"
    );
    // The run's own namespace: node, bridge and pod addresses here, none there.
    let inside = node::network_state(None)?;
    let ours = ["10.200.0.1", "10.244.0.1", "cni0"];
    for want in ours {
        ensure!(
            inside.iter().any(|l| l.contains(want)),
            "{want} not in the run's namespace"
        );
        ensure!(
            !now.iter().any(|l| l.contains(want)),
            "{want} in the root namespace"
        );
    }
    // No route out: an outside address is unreachable at once.
    let route = Command::new("ip")
        .args(["route", "get", "192.0.2.1"])
        .output()?;
    ensure!(
        !route.status.success(),
        "a route out exists: {}",
        String::from_utf8_lossy(&route.stdout)
    );
    let default = node::sh("ip", &["route", "show", "default"])?;
    ensure!(default.trim().is_empty(), "default route {default}");
    Ok(format!(
        "root namespace: 0 of {} interfaces/addresses/routes changed, none of {ours:?}; run's namespace: \
         no default route, 192.0.2.1 unreachable",
        now.len()
    ))
}
