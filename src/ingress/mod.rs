//! `dropbox-operator ingress`: the webhook ingress.
//!
//! - [`webhook`]: the HTTP endpoints Dropbox calls.
//! - [`listener`]: the public port's server: connection cap, header and idle
//!   deadlines, HTTP/1.1 only, bounded shutdown.
//! - [`budget`]: the process-wide memory budget of webhook bodies in flight.
//! - [`verify`]: which instances a notification concerns and proves itself for.
//! - [`handoff`]: webhooks go to the replica that delivers each instance.
//! - [`membership`], [`heartbeat`]: the live replicas, who delivers which
//!   instance, and the fence that keeps it to one at a time.
//! - [`sync`]: per-instance workers: scheduling, retries, parking; [`slots`]:
//!   the work slots they share fairly between tenants.
//! - [`delivery`]: listing changes into notifications, one POST and its outcome.
//! - [`cursors`], [`reports`]: committed cursors and delivery states.
//! - [`longpoll`]: long-polls for instances with `events.source: longpoll`,
//!   which get no webhook.
//! - [`payload`]: standardized events, batches and signatures.
//! - [`ssrf`]: the callback address policy and the HTTP client that enforces it.
//! - [`projections`]: what the controller projected of each instance.
//!
//! The ingress reads and writes only its data namespace (docs/architecture.md,
//! "Who reads and writes what"): the projections of the instances, their
//! cursors and delivery states, and the heartbeats. It answers Dropbox within
//! milliseconds and does the work in the background. Webhooks are served on
//! the public port, hand-offs between replicas on the peer port, metrics and
//! probes on a third.

pub mod budget;
pub mod cursors;
pub mod delivery;
pub mod handoff;
pub mod heartbeat;
pub mod listener;
pub mod longpoll;
pub mod membership;
pub mod payload;
pub mod projections;
pub mod reports;
pub mod slots;
pub mod ssrf;
pub mod sync;
pub mod verify;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::metrics::IngressMetrics;
use crate::server::{self, Readiness};
use membership::Membership;
use projections::{Change, Projections};

/// Settings of `dropbox-operator ingress`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The public webhook port.
    pub listen_addr: SocketAddr,
    /// Metrics and probes.
    pub metrics_addr: SocketAddr,
    /// Hand-offs from the other replicas (never public).
    pub peer_listen_addr: SocketAddr,
    /// `host:port` the other replicas reach the peer endpoint at.
    pub peer_advertise_addr: Option<String>,
    pub dropbox: crate::dropbox::DropboxClient,
    /// The data namespace: all the ingress reads and writes.
    pub data_namespace: String,
    pub identity: String,
    pub policy: ssrf::AddressPolicy,
    pub delivery: sync::DeliveryConfig,
    pub heartbeat_interval: Duration,
    pub limits: Limits,
    /// Sync every instance this replica delivers this often (and at start).
    pub resync_interval: Duration,
    /// Bound on finishing in-flight deliveries after SIGTERM.
    pub drain_timeout: Duration,
    /// Long-polls of instances with `events.source: longpoll`.
    pub longpoll: longpoll::LongPollConfig,
}

/// Bounds on what hostile or heavy traffic can make one replica do.
#[derive(Clone, Debug)]
pub struct Limits {
    /// Webhook requests handled at once (more are answered 503 at once).
    pub concurrent_webhooks: usize,
    /// Time a client has to send a webhook's body.
    pub body_timeout: Duration,
    /// Instance syncs at work at once.
    pub concurrent_syncs: usize,
    /// Bytes of webhook bodies in flight across the process (larger bodies
    /// are charged before they are read; over it: 503).
    pub body_budget: u64,
    /// Connections open at once on the public port, and their deadlines.
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
    /// Accept h2c (HTTP/2 with prior knowledge) on the public port.
    pub http2: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot connect to Kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("cannot build an HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the HTTP server failed: {0}")]
    Server(#[from] std::io::Error),
}

/// Runs the ingress until SIGTERM/SIGINT, then drains: no new webhook, sync or
/// POST; POSTs in flight end, the heartbeat entry is removed so the other
/// replicas take over at once, all within the drain timeout.
pub async fn run(options: RunOptions) -> Result<(), RunError> {
    let client = crate::store::client().await?;
    let mut registry = Registry::default();
    let metrics = IngressMetrics::register(&mut registry);
    let ready = Arc::new(Readiness::default());
    // SIGTERM: stop taking work. `stop`: the drain time is up (or drained).
    let draining = CancellationToken::new();
    let stop = CancellationToken::new();
    tokio::spawn({
        let draining = draining.clone();
        async move {
            server::shutdown_signal().await;
            draining.cancel();
        }
    });

    let ns = &options.data_namespace;
    let configmaps: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let (projections, changes) = Projections::new();
    tokio::spawn(projections.clone().run(
        Api::<Secret>::namespaced(client.clone(), ns),
        metrics.secret_reads.clone(),
        stop.clone(),
    ));
    let reports = reports::Reports::new(configmaps.clone());
    tokio::spawn(reports.clone().run(stop.clone()));

    let fence = membership::FenceConfig::new(options.heartbeat_interval, options.delivery.timeout);
    let membership = Arc::new(Membership::new(
        &options.identity,
        options.peer_advertise_addr.clone(),
        fence,
    ));
    let heartbeat_wake = Arc::new(tokio::sync::Notify::new());
    tokio::spawn(heartbeat::watch(
        configmaps.clone(),
        membership.clone(),
        heartbeat_wake.clone(),
        stop.clone(),
    ));

    let callbacks = ssrf::callback_client(options.policy.clone(), options.delivery.timeout)?;
    let syncer = sync::Syncer::new(
        delivery::Deliverer {
            dropbox: options.dropbox.clone(),
            policy: options.policy.clone(),
            callbacks,
        },
        projections.clone(),
        membership.clone(),
        cursors::Cursors::new(configmaps.clone()),
        reports.clone(),
        metrics.clone(),
        options.delivery.clone(),
        options.limits.concurrent_syncs,
        draining.clone(),
        stop.clone(),
    );

    tokio::spawn({
        let ready = ready.clone();
        let syncer = syncer.clone();
        let draining = draining.clone();
        let interval = options.resync_interval;
        async move {
            tokio::select! {
                _ = syncer.projections.wait_ready() => {}
                _ = draining.cancelled() => return,
            }
            ready.set(true);
            tracing::info!("instances known; ready");
            resync(&syncer, interval, changes, &draining).await;
        }
    });
    tokio::spawn(longpoll::run(
        syncer.clone(),
        projections.clone(),
        membership.clone(),
        options.longpoll.clone(),
        draining.clone(),
    ));
    tokio::spawn(count_parked(syncer.clone(), draining.clone()));
    let heartbeat = tokio::spawn(heartbeat::run(
        configmaps,
        membership.clone(),
        options.heartbeat_interval,
        heartbeat_wake,
        draining.clone(),
    ));

    let open_connections = metrics.open_connections.clone();
    let budget = budget::BodyBudget::new(
        options.limits.body_budget,
        webhook::MAX_BODY as u64,
        metrics.body_bytes_in_flight.clone(),
    );
    let verifier = Arc::new(verify::Verifier::default());
    let webhooks = webhook::routes(webhook::State {
        syncer: syncer.clone(),
        handoff: handoff::Handoff::new()?,
        verifier: verifier.clone(),
        metrics,
        permits: Arc::new(tokio::sync::Semaphore::new(
            options.limits.concurrent_webhooks,
        )),
        body_timeout: options.limits.body_timeout,
        budget,
    });
    let listener_config = listener::ListenerConfig {
        max_connections: options.limits.max_connections,
        header_timeout: options.limits.header_timeout,
        idle_timeout: options.limits.idle_timeout,
        http2: options.limits.http2,
        drain_timeout: options.drain_timeout,
    };
    let peers = handoff::routes(handoff::PeerState::new(syncer.clone(), verifier));
    let probes: axum::Router = server::probe_routes(Arc::new(registry), ready);
    let drain_timeout = options.drain_timeout;
    let (served, peers_served, probes_served, ()) = tokio::join!(
        async {
            let r = listener::serve(
                options.listen_addr,
                webhooks,
                listener_config,
                draining.clone(),
                open_connections,
            )
            .await;
            draining.cancel();
            r
        },
        async {
            let r = server::serve(options.peer_listen_addr, peers, draining.clone()).await;
            draining.cancel();
            r
        },
        async {
            let r = server::serve(options.metrics_addr, probes, stop.clone()).await;
            draining.cancel();
            r
        },
        async {
            draining.cancelled().await;
            tracing::info!(timeout = ?drain_timeout, "draining: finishing in-flight deliveries");
            match tokio::time::timeout(drain_timeout, syncer.drained()).await {
                Ok(()) => tracing::info!("drained"),
                Err(_) => tracing::warn!(
                    "deliveries still running at the drain timeout; stopping them (they are redelivered)"
                ),
            }
            stop.cancel();
        },
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), heartbeat).await;
    served
        .and(peers_served)
        .and(probes_served)
        .map_err(Into::into)
}

/// Syncs every instance this replica delivers: at once when it starts, when it
/// takes instances over, when a parked delivery is resumed or a cursor
/// re-baselined, and every `interval` (jittered), so delivery resumes without a
/// webhook after a restart, a crash, a hand-over or retries that were lost.
async fn resync(
    syncer: &Arc<sync::Syncer>,
    interval: Duration,
    mut changes: tokio::sync::mpsc::UnboundedReceiver<Change>,
    draining: &CancellationToken,
) {
    let membership = &syncer.membership;
    let mut fences = membership.subscribe();
    // The first round waits (briefly) for the live set, so replicas that start
    // together do not each sync everything.
    let _ = tokio::time::timeout(Duration::from_secs(5), fences.wait_for(|v| *v > 0)).await;
    let owned_now = || {
        let all = syncer.projections.all();
        membership.owned(all.iter().map(|p| p.uid()))
    };
    let mut owned: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut full = true;
    let mut next_full = tokio::time::Instant::now();
    loop {
        let now_owned: std::collections::HashSet<String> = owned_now().into_iter().collect();
        let to_sync: Vec<&String> = if full {
            now_owned.iter().collect()
        } else {
            // Taken over since the last look.
            now_owned.difference(&owned).collect()
        };
        for uid in &to_sync {
            syncer.trigger(uid);
        }
        if !to_sync.is_empty() {
            tracing::debug!(
                instances = to_sync.len(),
                full,
                "sync started without a webhook"
            );
        }
        owned = now_owned;
        if full {
            // Up to a fifth earlier, so replicas started together spread out.
            let jitter = interval.mul_f64(rand::random::<f64>() / 5.0);
            next_full = tokio::time::Instant::now() + interval - jitter;
        }
        full = false;
        tokio::select! {
            _ = tokio::time::sleep_until(next_full) => full = true,
            // A replica came or went: sync what this one took over.
            _ = fences.changed() => {}
            change = changes.recv() => match change {
                Some(Change::Updated { uid, resync: true }) if membership.owns(&uid) => syncer.trigger(&uid),
                Some(Change::Removed(uid)) => syncer.reports.forget(&uid),
                Some(_) => {}
                None => return,
            },
            _ = draining.cancelled() => return,
        }
    }
}

/// How often `dropbox_ingress_parked_instances` is recounted.
const PARKED_COUNT_INTERVAL: Duration = Duration::from_secs(5);

/// Keeps `dropbox_ingress_parked_instances` at the number of instances this
/// replica delivers whose delivery is parked (their callback failed
/// permanently or for too long, and nothing resumed them).
async fn count_parked(syncer: Arc<sync::Syncer>, draining: CancellationToken) {
    loop {
        let parked = syncer
            .projections
            .all()
            .iter()
            .filter(|p| syncer.membership.owns(p.uid()) && syncer.reports.parked(&p.instance))
            .count();
        syncer
            .metrics
            .parked_instances
            .set(i64::try_from(parked).unwrap_or(i64::MAX));
        tokio::select! {
            _ = tokio::time::sleep(PARKED_COUNT_INTERVAL) => {}
            _ = draining.cancelled() => return,
        }
    }
}
