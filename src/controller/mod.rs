//! `dropbox-operator controller`: reconciles DropboxElementInstances.
//!
//! - [`inputs`]: reads the referenced Secrets and the token Secret.
//! - [`reconcile`]: the OAuth lifecycle, status, events and the deletion finalizer.
//! - [`token`]: the token Secret the controller owns.
//! - [`projection`]: what the ingress needs of an instance, in the operator namespace.
//! - [`ingress`]: the ingress Deployment/Service, its liveness, orphan sweeps.
//!
//! This module wires them into a kube-runtime controller with leader election,
//! metrics, probes and graceful shutdown.

pub mod exchange;
pub mod finalizer;
pub mod ingress;
pub mod inputs;
pub mod memo;
pub mod oauth;
pub mod projection;
pub mod reconcile;
pub mod status;
pub mod token;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use kube_lease_manager::LeaseManagerBuilder;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::api::DropboxElementInstance;
use crate::dropbox::DropboxClient;
use crate::metrics::ControllerMetrics;
use crate::server::{self, Readiness};
pub use memo::{Backoff, CodeRegistry, OwnSecretWrites, WrittenStatus};

/// Settings of the controller (from the command line).
#[derive(Clone, Debug)]
pub struct Config {
    /// Refresh access tokens at the latest this long before they expire.
    pub refresh_margin: Duration,
    /// Bound on revoking a token when an instance is deleted.
    pub revoke_timeout: Duration,
    /// A healthy instance is looked at again at least this often.
    pub resync_interval: Duration,
    /// Upper bound of the retry backoff.
    pub max_backoff: Duration,
}

/// Everything reconciles share.
pub struct Context {
    pub client: Client,
    pub dropbox: DropboxClient,
    pub recorder: Recorder,
    pub metrics: ControllerMetrics,
    pub config: Config,
    /// The controller's cache of all instances (for cross-instance code checks).
    pub store: Store<DropboxElementInstance>,
    pub codes: CodeRegistry,
    pub backoff: Backoff,
    /// The webhook ingress objects and liveness.
    pub ingress: Arc<ingress::IngressManager>,
    /// What was projected into the operator namespace, per instance.
    pub projections: projection::Projections,
    /// Tokens Dropbox issued that the API server has not stored yet, by instance
    /// uid (the code that gave them is spent: they are all there is).
    pub unstored: Mutex<HashMap<String, token::StoredToken>>,
    /// The code marker (`finalizer::CODE_SENT_ANNOTATION`) this process last
    /// wrote per instance uid: newer than any cached copy of the instance.
    pub code_markers: Mutex<HashMap<String, Option<String>>>,
    /// Instances (uid) whose token this process revoked on deletion.
    pub revoked: Mutex<std::collections::HashSet<String>>,
    pub written: WrittenStatus,
    pub own_secret_writes: Arc<OwnSecretWrites>,
    /// Secret contents, re-read only when the metadata watch saw them change.
    pub secrets: inputs::SecretCache,
}

/// Command-line settings of `dropbox-operator controller`.
#[derive(Clone, Debug)]
pub struct RunOptions {
    pub config: Config,
    pub dropbox: DropboxClient,
    pub namespace: Option<String>,
    pub metrics_addr: SocketAddr,
    pub concurrency: u16,
    pub leader_election: Option<LeaderElection>,
    pub ingress: ingress::IngressSettings,
}

/// Lease-based leader election settings.
#[derive(Clone, Debug)]
pub struct LeaderElection {
    pub namespace: String,
    pub lease_name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_grace: Duration,
    pub renew_deadline: Duration,
}

impl LeaderElection {
    /// Lease duration, renew grace and renew deadline in whole seconds, made
    /// consistent: the lease is renewed about every 2 s (at most a third of its
    /// duration), and a leader that has not renewed for the deadline (at most two
    /// thirds of the duration) steps down before anyone else may take the lease.
    pub fn timings(&self) -> (u64, u64, Duration) {
        let duration = self.lease_duration.as_secs().max(3);
        let interval = (duration / 3).clamp(1, 2);
        let grace = self
            .renew_grace
            .as_secs()
            .max(duration - interval)
            .min(duration - 1);
        let deadline = self
            .renew_deadline
            .min(Duration::from_secs(duration * 2 / 3))
            .max(Duration::from_secs(interval + 1));
        (duration, grace, deadline)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot connect to Kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("leader election failed: {0}")]
    Lease(#[from] kube_lease_manager::LeaseManagerError),
    #[error("lost the leader lease; exiting so another replica takes over")]
    LostLease,
    #[error("the metrics server failed: {0}")]
    Server(#[from] std::io::Error),
}

/// Runs the controller until SIGTERM/SIGINT (or, with leader election, until the
/// lease is lost).
pub async fn run(options: RunOptions) -> Result<(), RunError> {
    let client = Client::try_default().await?;
    let mut registry = Registry::default();
    let metrics = ControllerMetrics::register(&mut registry);
    let ready = Arc::new(Readiness::default());
    let shutdown = CancellationToken::new();

    tokio::spawn({
        let shutdown = shutdown.clone();
        async move {
            server::shutdown_signal().await;
            shutdown.cancel();
        }
    });
    let http = tokio::spawn(server::serve(
        options.metrics_addr,
        server::probe_routes(Arc::new(registry), ready.clone()),
        shutdown.clone(),
    ));

    let result = match options.leader_election.clone() {
        None => {
            ready.set(true);
            run_controller(client, &options, metrics, shutdown.clone()).await;
            Ok(())
        }
        Some(election) => {
            run_as_leader(client, &options, election, metrics, ready, shutdown.clone()).await
        }
    };
    shutdown.cancel();
    if let Ok(Err(e)) = http.await {
        return Err(RunError::Server(e));
    }
    result
}

async fn run_as_leader(
    client: Client,
    options: &RunOptions,
    election: LeaderElection,
    metrics: ControllerMetrics,
    ready: Arc<Readiness>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let (duration, grace, renew_deadline) = election.timings();
    let manager = LeaseManagerBuilder::new(client.clone(), &election.lease_name)
        .with_namespace(&election.namespace)
        .with_identity(&election.identity)
        .with_duration(duration)
        .with_grace(grace)
        .with_field_manager(format!("dropbox-operator-leader-{}", election.identity))
        .build()
        .await?;
    let (mut leader, lease_task) = manager.watch().await;
    // A standby replica is healthy and ready: it is waiting for its turn.
    ready.set(true);
    tracing::info!(lease = %election.lease_name, identity = %election.identity, "waiting for the leader lease");
    let became_leader = loop {
        if *leader.borrow_and_update() {
            break true;
        }
        tokio::select! {
            changed = leader.changed() => if changed.is_err() { break false },
            _ = shutdown.cancelled() => break false,
        }
    };
    let result = if became_leader {
        tracing::info!(identity = %election.identity, "acquired the leader lease; starting the controller");
        metrics.leader.set(1);
        let controller_stop = shutdown.child_token();
        let lost = async {
            loop {
                if leader.changed().await.is_err() || !*leader.borrow() {
                    break;
                }
            }
        };
        let leases: Api<Lease> = Api::namespaced(client.clone(), &election.namespace);
        let watchdog = renew_watchdog(&leases, &election, renew_deadline);
        tokio::select! {
            _ = run_controller(client, options, metrics.clone(), controller_stop.clone()) => Ok(()),
            _ = lost => {
                controller_stop.cancel();
                metrics.leader.set(0);
                Err(RunError::LostLease)
            }
            why = watchdog => {
                // Stop reconciling at once: a standby may take the lease soon.
                controller_stop.cancel();
                metrics.leader.set(0);
                tracing::error!(reason = %why, "stepping down as leader");
                Err(RunError::LostLease)
            }
        }
    } else {
        Ok(())
    };
    // Closing the channel makes the lease task release the lease, so a standby
    // takes over at once instead of waiting for expiry.
    drop(leader);
    match tokio::time::timeout(Duration::from_secs(5), lease_task).await {
        Ok(Ok(Ok(_))) => tracing::info!("released the leader lease"),
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "releasing the leader lease failed"),
        _ => tracing::warn!("releasing the leader lease did not finish"),
    }
    result
}

/// Resolves when this replica must stop acting as the leader: the lease names
/// another holder or is gone, or it was not renewed within `deadline` (as
/// client-go's renewDeadline: a leader cut off from the API server stops before
/// its lease can expire and be taken).
async fn renew_watchdog(
    leases: &Api<Lease>,
    election: &LeaderElection,
    deadline: Duration,
) -> String {
    let deadline =
        jiff::SignedDuration::try_from(deadline).unwrap_or(jiff::SignedDuration::from_secs(10));
    let mut last_renew = jiff::Timestamp::now();
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        match leases.get_opt(&election.lease_name).await {
            Ok(Some(lease)) => {
                let spec = lease.spec.unwrap_or_default();
                if spec.holder_identity.as_deref() != Some(election.identity.as_str()) {
                    return "the lease names another holder".into();
                }
                if let Some(renewed) = spec.renew_time.or(spec.acquire_time) {
                    last_renew = last_renew.max(renewed.0);
                }
            }
            Ok(None) => return "the lease is gone".into(),
            // Cut off from the API server: what counts is the last renewal seen.
            Err(e) => tracing::warn!(error = %e, "cannot read the leader lease"),
        }
        if jiff::Timestamp::now().duration_since(last_renew) > deadline {
            return format!("the lease was not renewed within {deadline:#}");
        }
    }
}

/// Instances that a Secret event concerns: the owner of a token Secret, and every
/// instance in the Secret's namespace that references it.
fn instances_for_secret(
    store: &Store<DropboxElementInstance>,
    namespace: Option<String>,
    name: &str,
    owners: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference],
) -> Vec<ObjectRef<DropboxElementInstance>> {
    let Some(namespace) = namespace else {
        return Vec::new();
    };
    let kind = DropboxElementInstance::kind(&());
    let mut refs: Vec<ObjectRef<DropboxElementInstance>> = owners
        .iter()
        .filter(|o| o.kind == kind)
        .map(|o| ObjectRef::new(&o.name).within(&namespace))
        .collect();
    // Every Secret event runs this (a start lists them all): filtered under
    // the cache's lock, without copying every instance.
    let referring = store.state_filter(|instance| {
        instance.metadata.namespace.as_deref() == Some(namespace.as_str())
            && references_secret(instance, name)
    });
    refs.extend(referring.iter().map(|i| ObjectRef::from_obj(i.as_ref())));
    refs
}

/// Whether the instance refers to Secret `name` (same namespace implied).
pub fn references_secret(instance: &DropboxElementInstance, name: &str) -> bool {
    let auth = &instance.spec.authentication;
    auth.app_secret_ref.as_ref().is_some_and(|r| r.name == name)
        || auth
            .code_secret_ref
            .as_ref()
            .is_some_and(|r| r.name == name)
        || auth
            .api_key_secret_ref
            .as_ref()
            .is_some_and(|r| r.name == name)
        || instance
            .spec
            .events
            .as_ref()
            .and_then(|e| e.signature_key_secret_ref.as_ref())
            .is_some_and(|r| r.name == name)
}

/// The instances whose EventsReady follows the ingress's liveness.
fn events_enabled(store: &Store<DropboxElementInstance>) -> Vec<ObjectRef<DropboxElementInstance>> {
    store
        .state()
        .iter()
        .filter(|i| i.spec.events.as_ref().is_some_and(|e| e.enabled))
        .map(|i| ObjectRef::from_obj(i.as_ref()))
        .collect()
}

async fn run_controller(
    client: Client,
    options: &RunOptions,
    metrics: ControllerMetrics,
    stop: CancellationToken,
) {
    // One watch per namespace when several are given (Roles there, no
    // cluster-wide grant), one for all namespaces otherwise.
    let namespaces = crate::store::split_namespaces(options.namespace.as_deref());
    let instances: Vec<Api<DropboxElementInstance>> = crate::store::apis(&client, &namespaces);
    let secrets: Vec<Api<PartialObjectMeta<Secret>>> = crate::store::apis(&client, &namespaces);
    let (store, instance_writer) = kube::runtime::reflector::store();
    let instance_events = kube::runtime::reflector(
        instance_writer,
        crate::store::namespaces_watcher(instances, watcher::Config::default().any_semantic())
            .modify(crate::store::slim_instance),
    )
    .default_backoff()
    .applied_objects();
    let controller = Controller::for_stream(instance_events, store.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(options.concurrency));

    // Secrets are watched as metadata only: the mapper needs names and owners, and
    // Secret contents (possibly large, e.g. Helm releases) never sit in memory.
    let (secret_versions, secret_writer) = kube::runtime::reflector::store();
    let secret_events = kube::runtime::reflector(
        secret_writer,
        crate::store::namespaces_watcher(secrets, watcher::Config::default().any_semantic())
            // Names and versions are all the cache needs: drop the rest early.
            .modify(|s| {
                s.types = None;
                s.metadata.managed_fields = None;
                s.metadata.annotations = None;
                s.metadata.labels = None;
                s.metadata.uid = None;
                s.metadata.creation_timestamp = None;
            }),
    )
    .default_backoff()
    .touched_objects();
    let mapper_store = store.clone();
    let own_secret_writes = Arc::new(OwnSecretWrites::default());
    let echoes = own_secret_writes.clone();
    let controller = controller.watches_stream(secret_events, move |secret| {
        let namespace = secret.namespace().unwrap_or_default();
        if echoes.is_echo(
            &namespace,
            &secret.name_any(),
            secret.resource_version().as_deref(),
        ) {
            return Vec::new();
        }
        instances_for_secret(
            &mapper_store,
            secret.namespace(),
            &secret.name_any(),
            secret.owner_references(),
        )
    });

    // Ingress liveness changes re-reconcile the events-enabled instances (their
    // EventsReady); the others do not depend on it.
    let (liveness_tx, liveness_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let liveness_store = store.clone();
    let liveness = futures::stream::unfold(liveness_rx, |mut rx| async move {
        rx.recv().await.map(|()| ((), rx))
    })
    .flat_map(move |()| futures::stream::iter(events_enabled(&liveness_store)));
    let controller = controller.reconcile_on(liveness);

    let ingress = ingress::IngressManager::new(options.ingress.clone());
    tokio::spawn(ingress.clone().run(
        client.clone(),
        store.clone(),
        move || {
            let _ = liveness_tx.send(());
        },
        stop.clone(),
    ));

    let cluster = metrics.cluster.clone();
    cluster.set_source({
        let store = store.clone();
        let ingress = ingress.clone();
        move || cluster_state(&store, &ingress)
    });

    let reporter = Reporter {
        controller: "dropbox-operator".into(),
        instance: std::env::var("POD_NAME").ok(),
    };
    let ctx = Arc::new(Context {
        recorder: Recorder::new(client.clone(), reporter),
        client,
        dropbox: options.dropbox.clone(),
        metrics,
        config: options.config.clone(),
        store,
        codes: CodeRegistry::default(),
        backoff: Backoff::new(Duration::from_secs(1), options.config.max_backoff),
        ingress,
        projections: projection::Projections::default(),
        unstored: Mutex::default(),
        code_markers: Mutex::default(),
        revoked: Mutex::default(),
        written: WrittenStatus::default(),
        own_secret_writes,
        secrets: inputs::SecretCache::new(secret_versions),
    });
    tracing::info!(namespace = ?options.namespace, "controller started");
    // Token Secrets whose instance vanished without a cleanup: revoked and released.
    tokio::spawn({
        let ctx = ctx.clone();
        let stop = stop.clone();
        async move {
            crate::store::wait_until_ready(&ctx.store).await;
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.cancelled() => return,
                }
                let bound = ctx.config.revoke_timeout;
                if let Err(e) = finalizer::release_orphaned_token_secrets(&ctx, bound).await {
                    tracing::warn!(error = %e, "releasing orphaned token Secrets failed; retrying later");
                }
            }
        }
    });
    controller
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile::reconcile, reconcile::error_policy, ctx)
        .for_each(|result| async move {
            if let Err(e) = result {
                // Object-level failures are already logged by the error policy;
                // these are watch/queue errors, retried by kube-runtime.
                tracing::debug!(error = %e, "controller stream error");
            }
        })
        .await;
    cluster.clear_source();
    tracing::info!("controller stopped");
}

/// What the state metrics show at a scrape: every cached instance's phase and
/// readiness, and the ingress's liveness while an instance needs it.
fn cluster_state(
    store: &Store<DropboxElementInstance>,
    ingress: &ingress::IngressManager,
) -> crate::metrics::StateSnapshot {
    let mut needed = false;
    let instances = store
        .state()
        .iter()
        .map(|i| {
            needed |= i.meta().deletion_timestamp.is_none()
                && i.spec.events.as_ref().is_some_and(|e| e.enabled);
            let status = i.status.as_ref();
            crate::metrics::InstanceState {
                namespace: i.namespace().unwrap_or_default(),
                name: i.name_any(),
                phase: status.and_then(|s| s.phase).map(|p| match p {
                    crate::api::Phase::Pending => "Pending",
                    crate::api::Phase::AwaitingAuthorization => "AwaitingAuthorization",
                    crate::api::Phase::Ready => "Ready",
                    crate::api::Phase::Degraded => "Degraded",
                    crate::api::Phase::Failed => "Failed",
                }),
                ready: status.is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.type_ == crate::conditions::READY && c.status == "True")
                }),
            }
        })
        .collect();
    crate::metrics::StateSnapshot {
        instances,
        ingress_alive: ingress.alive().filter(|_| needed),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leader_steps_down_before_its_lease_can_be_taken() {
        let election = |duration: u64, grace: u64, deadline: u64| LeaderElection {
            namespace: "ns".into(),
            lease_name: "lease".into(),
            identity: "me".into(),
            lease_duration: Duration::from_secs(duration),
            renew_grace: Duration::from_secs(grace),
            renew_deadline: Duration::from_secs(deadline),
        };
        for (d, g, dl) in [(15, 5, 10), (6, 2, 10), (4, 1, 10), (60, 5, 30), (3, 1, 1)] {
            let (duration, grace, deadline) = election(d, g, dl).timings();
            let interval = duration - grace;
            assert!(grace < duration && interval >= 1, "{d}/{g}: grace {grace}");
            assert!(interval <= 2, "{d}/{g}: renews every {interval}s");
            assert!(deadline.as_secs() < duration, "{d}: deadline {deadline:?}");
            assert!(
                deadline.as_secs() > interval,
                "{d}: deadline {deadline:?} vs {interval}s"
            );
        }
        assert_eq!(
            election(15, 5, 10).timings(),
            (15, 13, Duration::from_secs(10))
        );
    }
}
