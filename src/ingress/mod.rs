//! `dropbox-operator ingress`: the webhook ingress.
//!
//! - [`webhook`]: the HTTP endpoints Dropbox calls.
//! - [`listener`]: the public port's server: connection cap, header and idle
//!   deadlines, HTTP/1.1 only, bounded shutdown.
//! - [`budget`]: the process-wide memory budget of webhook bodies in flight.
//! - [`sync`]: per-instance syncs, delivery with retries, cursor commits.
//! - [`longpoll`]: long-polls for instances with `events.source: longpoll`,
//!   which get no webhook.
//! - [`payload`]: standardized events, batches and signatures.
//! - [`ssrf`]: the callback address policy and the HTTP client that enforces it.
//! - [`secrets`]: get-only, read-through access to the instances' projected Secrets.
//!
//! The ingress learns instances (app key, account, callback, format) by watching
//! them; everything else it reads from the operator namespace, where the
//! controller projects it (docs/architecture.md). It answers Dropbox within
//! milliseconds and does the work in the background. Webhooks are served on the
//! public port; metrics and probes on a separate one.

pub mod budget;
pub mod listener;
pub mod longpoll;
pub mod payload;
pub mod secrets;
pub mod ssrf;
pub mod sync;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource, ResourceExt};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::api::DropboxElementInstance;
use crate::contract::{self, HEARTBEATS_CONFIGMAP};
use crate::dropbox::DropboxClient;
use crate::metrics::IngressMetrics;
use crate::server::{self, Readiness};

/// Settings of `dropbox-operator ingress`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// The public webhook port.
    pub listen_addr: SocketAddr,
    /// Metrics and probes.
    pub metrics_addr: SocketAddr,
    pub dropbox: DropboxClient,
    pub namespace: Option<String>,
    pub operator_namespace: String,
    pub identity: String,
    pub policy: ssrf::AddressPolicy,
    pub delivery: sync::DeliveryConfig,
    pub heartbeat_interval: Duration,
    pub limits: Limits,
    /// Sync every instance this replica is responsible for this often (and at start).
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
    /// Instance syncs running at once.
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
    #[error("cannot build the callback HTTP client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("the HTTP server failed: {0}")]
    Server(#[from] std::io::Error),
}

/// Runs the ingress until SIGTERM/SIGINT, then drains: no new webhook or sync,
/// in-flight deliveries finish and commit within the drain timeout.
pub async fn run(options: RunOptions) -> Result<(), RunError> {
    let client = Client::try_default().await?;
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

    let namespaces = crate::store::split_namespaces(options.namespace.as_deref());
    let instances: Vec<Api<DropboxElementInstance>> = crate::store::apis(&client, &namespaces);
    let (store, writer) = reflector::store();
    // Wakes the long-poll manager when an instance comes, goes or changes.
    let instances_changed = Arc::new(tokio::sync::Notify::new());
    let watch = reflector(
        writer,
        crate::store::namespaces_watcher(instances, watcher::Config::default().any_semantic())
            .modify(crate::store::slim_instance),
    )
    .default_backoff()
    .touched_objects()
    .for_each({
        let instances_changed = instances_changed.clone();
        move |_| {
            instances_changed.notify_one();
            async {}
        }
    });
    let watch_stop = stop.clone();
    tokio::spawn(async move {
        tokio::select! {
            _ = watch => {}
            _ = watch_stop.cancelled() => {}
        }
    });

    let callbacks = ssrf::callback_client(options.policy.clone(), options.delivery.timeout)?;
    let syncer = sync::Syncer::new(
        client.clone(),
        &options.operator_namespace,
        options.dropbox.clone(),
        options.policy.clone(),
        callbacks,
        metrics.clone(),
        options.delivery.clone(),
        store.clone(),
        options.limits.concurrent_syncs,
        draining.clone(),
        stop.clone(),
    );
    let membership = Arc::new(Membership::new(&options.identity));

    tokio::spawn({
        let store = store.clone();
        let ready = ready.clone();
        let syncer = syncer.clone();
        let membership = membership.clone();
        let draining = draining.clone();
        let interval = options.resync_interval;
        async move {
            crate::store::wait_until_ready(&store).await;
            ready.set(true);
            tracing::info!("instances cache synced; ready");
            resync(&store, &syncer, &membership, interval, &draining).await;
        }
    });
    tokio::spawn(longpoll::run(
        syncer.clone(),
        store.clone(),
        membership.clone(),
        instances_changed,
        options.longpoll.clone(),
        draining.clone(),
    ));
    let heartbeat = tokio::spawn(heartbeat(
        client.clone(),
        options.operator_namespace.clone(),
        membership.clone(),
        options.heartbeat_interval,
        draining.clone(),
    ));

    let open_connections = metrics.open_connections.clone();
    let budget = budget::BodyBudget::new(
        options.limits.body_budget,
        webhook::MAX_BODY as u64,
        metrics.body_bytes_in_flight.clone(),
    );
    let webhooks = webhook::routes(webhook::State {
        syncer: syncer.clone(),
        store,
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
    let probes: axum::Router = server::probe_routes(Arc::new(registry), ready);
    let drain_timeout = options.drain_timeout;
    let (served, probes_served, ()) = tokio::join!(
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
    served.and(probes_served).map_err(Into::into)
}

/// The live replicas, as the heartbeats ConfigMap lists them, and which of them
/// is responsible for an instance: rendezvous hashing, so when a replica comes
/// or goes only its share of instances moves. Webhooks are served by whichever
/// replica receives them; responsibility decides the syncs a replica starts by
/// itself (at start and on the resync interval).
pub struct Membership {
    me: String,
    live: std::sync::Mutex<Vec<String>>,
    /// Woken when the live set changes (and once it is first known): a replica
    /// that took over instances syncs them at once, not at the next interval.
    changed: tokio::sync::Notify,
    /// Counts changes of the live set (0: not known yet), for the long-polls.
    version: tokio::sync::watch::Sender<u64>,
}

impl Membership {
    pub fn new(identity: &str) -> Self {
        let me = contract::heartbeat_key(identity);
        Membership {
            live: std::sync::Mutex::new(Vec::new()),
            me,
            changed: tokio::sync::Notify::new(),
            version: tokio::sync::watch::Sender::new(0),
        }
    }

    /// Sees the live set change (the value counts the changes; 0: not known yet).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Replaces the live set (this replica always counts as live).
    pub fn set_live(&self, mut replicas: Vec<String>) {
        if !replicas.contains(&self.me) {
            replicas.push(self.me.clone());
        }
        replicas.sort();
        let mut live = self.live.lock().expect("membership lock");
        if *live != replicas {
            *live = replicas;
            self.changed.notify_one();
            self.version.send_modify(|v| *v += 1);
        }
    }

    /// Whether this replica is responsible for instance `uid`.
    pub fn owns(&self, uid: &str) -> bool {
        let live = self.live.lock().expect("membership lock");
        let score = |replica: &str| {
            use sha2::{Digest, Sha256};
            let digest = Sha256::new()
                .chain_update(replica.as_bytes())
                .chain_update([0u8])
                .chain_update(uid.as_bytes())
                .finalize();
            u64::from_be_bytes(digest[..8].try_into().expect("8 bytes"))
        };
        live.iter()
            .max_by_key(|r| (score(r), r.as_str()))
            .is_none_or(|owner| *owner == self.me)
    }
}

/// Syncs every events-enabled instance this replica is responsible for, now and
/// then on a jittered interval, so delivery resumes without a webhook after a
/// restart, a crash or a failed delivery whose retries were lost.
async fn resync(
    store: &reflector::Store<DropboxElementInstance>,
    syncer: &Arc<sync::Syncer>,
    membership: &Membership,
    interval: Duration,
    draining: &CancellationToken,
) {
    // The first round waits (briefly) for the live set, so replicas that start
    // together do not each sync everything.
    let _ = tokio::time::timeout(Duration::from_secs(5), membership.changed.notified()).await;
    loop {
        let mut started = 0;
        for instance in store.state() {
            let enabled = instance.spec.events.as_ref().is_some_and(|e| e.enabled)
                && instance.meta().deletion_timestamp.is_none();
            if let Some(uid) = instance.uid().filter(|u| enabled && membership.owns(u)) {
                syncer.trigger(&uid);
                started += 1;
            }
        }
        tracing::debug!(instances = started, "periodic sync started");
        // Up to a fifth earlier, so replicas started together spread out.
        let jitter = interval.mul_f64(rand::random::<f64>() / 5.0);
        tokio::select! {
            _ = tokio::time::sleep(interval - jitter) => {}
            // A replica came or went: sync what this one is responsible for now.
            _ = membership.changed.notified() => {}
            _ = draining.cancelled() => return,
        }
    }
}

/// Renews this replica's key in the heartbeats ConfigMap (an RFC 3339 expiry
/// time; the controller turns it into EventsReady) and removes it on shutdown.
/// A JSON merge patch of one key: replicas never overwrite each other, and the
/// ingress needs no right on any Lease. The answer lists every replica's key,
/// which is how this replica learns who else is live.
async fn heartbeat(
    client: Client,
    namespace: String,
    membership: Arc<Membership>,
    interval: Duration,
    stop: CancellationToken,
) {
    let configmaps: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let key = membership.me.clone();
    let validity = jiff::SignedDuration::try_from(interval * 3)
        .unwrap_or(jiff::SignedDuration::from_secs(15))
        .max(jiff::SignedDuration::from_secs(3));
    let mut tick = tokio::time::interval(interval);
    let mut warned = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let now = jiff::Timestamp::now();
        let expires = now.checked_add(validity).unwrap_or(jiff::Timestamp::MAX);
        let patch = json!({"data": {key.as_str(): expires.to_string()}});
        match configmaps
            .patch(
                HEARTBEATS_CONFIGMAP,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(cm) => {
                warned = false;
                membership.set_live(contract::live_replicas(&cm.data.unwrap_or_default(), now));
            }
            // The controller creates it with the Deployment; until then, wait.
            Err(e) if !warned => {
                warned = true;
                tracing::warn!(error = %e, "could not renew the ingress heartbeat; retrying");
            }
            Err(e) => tracing::debug!(error = %e, "could not renew the ingress heartbeat"),
        }
    }
    let patch = json!({"data": {key.as_str(): null}});
    match configmaps
        .patch(
            HEARTBEATS_CONFIGMAP,
            &PatchParams::default(),
            &Patch::Merge(&patch),
        )
        .await
    {
        Ok(_) => tracing::info!("ingress heartbeat removed"),
        Err(e) => tracing::warn!(error = %e, "could not remove the ingress heartbeat"),
    }
}

/// Instances of app `app_key` connected to `account_id`.
pub fn instances_for(
    store: &reflector::Store<DropboxElementInstance>,
    app_key: &str,
    account_id: Option<&str>,
) -> Vec<Arc<DropboxElementInstance>> {
    let path = contract::webhook_path(app_key);
    store
        .state()
        .into_iter()
        .filter(|i| i.meta().deletion_timestamp.is_none())
        .filter(|i| i.spec.events.as_ref().is_some_and(|e| e.enabled))
        .filter(|i| {
            let status = i.status.as_ref();
            status
                .and_then(|s| s.events.as_ref())
                .and_then(|e| e.webhook_path.as_deref())
                == Some(path.as_str())
                && account_id.is_none_or(|a| {
                    status
                        .and_then(|s| s.account.as_ref())
                        .and_then(|acc| acc.account_id.as_deref())
                        == Some(a)
                })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_instance_has_exactly_one_responsible_replica() {
        let replicas = ["ingress-a", "ingress-b", "ingress-c"];
        let members: Vec<Membership> = replicas
            .iter()
            .map(|r| {
                let m = Membership::new(r);
                m.set_live(replicas.iter().map(|s| s.to_string()).collect());
                m
            })
            .collect();
        let mut per_replica = [0usize; 3];
        for i in 0..300 {
            let uid = format!("uid-{i}");
            let owners: Vec<usize> = (0..3).filter(|&r| members[r].owns(&uid)).collect();
            assert_eq!(owners.len(), 1, "{uid}: {owners:?}");
            per_replica[owners[0]] += 1;
        }
        assert!(per_replica.iter().all(|&n| n > 50), "{per_replica:?}");
        // A replica that is alone owns everything.
        let alone = Membership::new("solo");
        assert!((0..10).all(|i| alone.owns(&format!("uid-{i}"))));
    }
}
