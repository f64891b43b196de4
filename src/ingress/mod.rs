//! `dropbox-operator ingress`: the webhook ingress.
//!
//! - [`webhook`]: the HTTP endpoints Dropbox calls.
//! - [`sync`]: per-instance syncs, delivery with retries, cursor commits.
//! - [`payload`]: standardized events, batches and signatures.
//! - [`ssrf`]: the callback address policy and the HTTP client that enforces it.
//! - [`secrets`]: get-only, read-through access to the Secrets instances refer to.
//!
//! The ingress learns instances (app key, account, callback, format) by watching
//! them; it answers Dropbox within milliseconds and does the work in the
//! background.

pub mod payload;
pub mod secrets;
pub mod ssrf;
pub mod sync;
pub mod webhook;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use kube::runtime::{WatchStreamExt, reflector, watcher};
use kube::{Client, Resource};
use prometheus_client::registry::Registry;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::api::DropboxElementInstance;
use crate::controller::events::INGRESS_COMPONENT;
use crate::dropbox::DropboxClient;
use crate::metrics::IngressMetrics;
use crate::server::{self, Readiness};

/// Settings of `dropbox-operator ingress`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub listen_addr: SocketAddr,
    pub dropbox: DropboxClient,
    pub namespace: Option<String>,
    pub operator_namespace: String,
    pub identity: String,
    pub policy: ssrf::AddressPolicy,
    pub delivery: sync::DeliveryConfig,
    pub heartbeat_interval: Duration,
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
        options.dropbox.clone(),
        options.policy.clone(),
        callbacks,
        metrics.clone(),
        options.delivery.clone(),
        store.clone(),
        stop.clone(),
    );

    tokio::spawn({
        let store = store.clone();
        let ready = ready.clone();
        async move {
            crate::controller::events::wait_until_ready(&store).await;
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

    let router = webhook::routes(webhook::State {
        syncer,
        store,
        metrics,
    })
    .merge(server::probe_routes(Arc::new(registry), ready));
    let served = server::serve(options.listen_addr, router, stop.clone()).await;
    stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(5), heartbeat).await;
    served.map_err(Into::into)
}

fn heartbeat_name(identity: &str) -> String {
    let mut name = format!("dropbox-webhook-ingress-{identity}")
        .to_lowercase()
        .replace(
            |c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '.'),
            "-",
        );
    name.truncate(253);
    name
}

/// Renews a Lease that says "an ingress replica is alive" (the controller turns
/// it into EventsReady) and deletes it on shutdown.
async fn heartbeat(
    client: Client,
    namespace: String,
    identity: String,
    interval: Duration,
    stop: CancellationToken,
) {
    let leases: Api<Lease> = Api::namespaced(client, &namespace);
    let name = heartbeat_name(&identity);
    let duration_secs = (interval.as_secs() * 3).max(3) as i32;
    let mut tick = tokio::time::interval(interval);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = stop.cancelled() => break,
        }
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "labels": BTreeMap::from([
                ("app.kubernetes.io/name", "dropbox-operator"),
                ("app.kubernetes.io/component", INGRESS_COMPONENT),
            ])},
            "spec": {
                "holderIdentity": identity,
                "leaseDurationSeconds": duration_secs,
                "renewTime": MicroTime(jiff::Timestamp::now()),
            }
        });
        if let Err(e) = leases
            .patch(
                &name,
                &PatchParams::apply(sync::FIELD_MANAGER).force(),
                &Patch::Apply(&lease),
            )
            .await
        {
            tracing::warn!(error = %e, "could not renew the ingress heartbeat");
        }
    }
    match leases.delete(&name, &DeleteParams::default()).await {
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
    let path = crate::controller::events::webhook_path(app_key);
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
