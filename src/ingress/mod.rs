//! `dropbox-operator ingress`: the webhook ingress.
//!
//! - [`webhook`]: the HTTP endpoints Dropbox calls.
//! - [`sync`]: per-instance syncs, delivery with retries, cursor commits.
//! - [`payload`]: standardized events, batches and signatures.
//! - [`ssrf`]: the callback address policy and the HTTP client that enforces it.
//! - [`secrets`]: get-only, read-through access to the instances' projected Secrets.
//!
//! The ingress learns instances (app key, account, callback, format) by watching
//! them; everything else it reads from the operator namespace, where the
//! controller projects it (docs/architecture.md). It answers Dropbox within
//! milliseconds and does the work in the background. Webhooks are served on the
//! public port; metrics and probes on a separate one.

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
use kube::{Client, Resource};
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

/// Runs the ingress until SIGTERM/SIGINT.
pub async fn run(options: RunOptions) -> Result<(), RunError> {
    let client = Client::try_default().await?;
    let mut registry = Registry::default();
    let metrics = IngressMetrics::register(&mut registry);
    let ready = Arc::new(Readiness::default());
    let stop = CancellationToken::new();
    tokio::spawn({
        let stop = stop.clone();
        async move {
            server::shutdown_signal().await;
            stop.cancel();
        }
    });

    let instances: Api<DropboxElementInstance> = match &options.namespace {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    let (store, writer) = reflector::store();
    let watch = reflector(
        writer,
        watcher(instances, watcher::Config::default().any_semantic()),
    )
    .default_backoff()
    .touched_objects()
    .for_each(|_| async {});
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
        stop.clone(),
    );

    tokio::spawn({
        let store = store.clone();
        let ready = ready.clone();
        async move {
            crate::store::wait_until_ready(&store).await;
            ready.set(true);
            tracing::info!("instances cache synced; ready");
        }
    });
    let heartbeat = tokio::spawn(heartbeat(
        client.clone(),
        options.operator_namespace.clone(),
        options.identity.clone(),
        options.heartbeat_interval,
        stop.clone(),
    ));

    let webhooks = webhook::routes(webhook::State {
        syncer,
        store,
        metrics,
        permits: Arc::new(tokio::sync::Semaphore::new(
            options.limits.concurrent_webhooks,
        )),
        body_timeout: options.limits.body_timeout,
    });
    let probes: axum::Router = server::probe_routes(Arc::new(registry), ready);
    let (served, probes_served) = tokio::join!(
        async {
            let r = server::serve(options.listen_addr, webhooks, stop.clone()).await;
            stop.cancel();
            r
        },
        async {
            let r = server::serve(options.metrics_addr, probes, stop.clone()).await;
            stop.cancel();
            r
        },
    );
    let _ = tokio::time::timeout(Duration::from_secs(5), heartbeat).await;
    served.and(probes_served).map_err(Into::into)
}

/// Renews this replica's key in the heartbeats ConfigMap (an RFC 3339 expiry
/// time; the controller turns it into EventsReady) and removes it on shutdown.
/// A JSON merge patch of one key: replicas never overwrite each other, and the
/// ingress needs no right on any Lease.
async fn heartbeat(
    client: Client,
    namespace: String,
    identity: String,
    interval: Duration,
    stop: CancellationToken,
) {
    let configmaps: Api<ConfigMap> = Api::namespaced(client, &namespace);
    let key = contract::heartbeat_key(&identity);
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
        let expires = jiff::Timestamp::now()
            .checked_add(validity)
            .unwrap_or(jiff::Timestamp::MAX);
        let patch = json!({"data": {key.as_str(): expires.to_string()}});
        match configmaps
            .patch(
                HEARTBEATS_CONFIGMAP,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
        {
            Ok(_) => warned = false,
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
