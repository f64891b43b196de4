//! `dropbox-operator controller`: reconciles DropboxElementInstances.
//!
//! - [`reconcile`]: one reconcile, as a pipeline of the files below.
//! - [`lifecycle`]: the OAuth lifecycle as one pure state machine: states,
//!   observations, transitions (docs/architecture.md, "The credential state machine").
//! - [`gather`]: what the machine decides from, read once; [`inputs`] reads the
//!   referenced Secrets and the token Secret.
//! - [`execute`]: carries out the machine's effects with fenced writes.
//! - [`token`]: the token Secret and the set of spent codes; [`revoke`] revokes
//!   a token family; [`finalizer`]: the revoke finalizer and the orphan sweep.
//! - [`status`]: the desired status and the Events of its transitions.
//! - [`leader`]: leadership as a fence, by the replica's own clocks.
//! - [`projection`]: what the ingress needs of an instance, in the ingress's data namespace.
//! - [`ingress`]: the ingress Deployment/Service, its liveness, orphan sweeps.
//! - [`common`]: the error, `Next`, the clock: a leaf every file may import.
//!
//! This module wires them into a kube-runtime controller with leader election,
//! metrics, probes and graceful shutdown.

pub mod autoscaler;
pub mod common;
pub mod execute;
pub mod finalizer;
pub mod gather;
pub mod ingress;
pub mod inputs;
pub mod leader;
pub mod lifecycle;
pub mod memo;
pub mod projection;
pub mod reconcile;
pub mod revoke;
pub mod settled;
pub mod status;
pub mod token;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::Controller;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
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
    /// Bound of every Kubernetes API request (watches: of their answer's start).
    pub api_timeout: Duration,
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
    /// What was projected into the data namespace, per instance.
    pub projections: projection::Projections,
    /// The delivery states the ingress reports (`dropbox-delivery-<uid>` in the
    /// data namespace), mirrored into the instances' status.
    pub deliveries: Store<k8s_openapi::api::core::v1::ConfigMap>,
    /// Whether `deliveries` holds its first listing (until then an events
    /// reconcile waits, so a restart drops no EventsDelivering).
    pub deliveries_ready: Arc<std::sync::atomic::AtomicBool>,
    /// Tokens Dropbox issued that the API server has not stored yet, by instance
    /// uid (the code that gave them is spent: they are all there is).
    pub unstored: Mutex<HashMap<String, lifecycle::Kept>>,
    /// Until when this replica may act (the leader lease, by its own clocks).
    pub leadership: Arc<leader::Leadership>,
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

impl Context {
    /// What the ingress last reported about the deliveries of instance `uid`.
    pub fn delivery(&self, uid: &str) -> Option<crate::contract::DeliveryState> {
        let name = crate::contract::delivery_configmap_name(uid);
        let cm = self
            .deliveries
            .get(&ObjectRef::new(&name).within(&self.ingress.settings.data_namespace))?;
        crate::contract::DeliveryState::from_data(cm.data.as_ref()?)
    }
}

impl LeaderElection {
    /// Lease duration, renew interval and renew deadline, made consistent: the
    /// lease is renewed about every 2 s (at most a third of its duration, and at
    /// least `renew_grace` before it expires), and a leader that has not renewed
    /// for the deadline (at most two thirds of the duration) steps down before
    /// anyone else may take the lease.
    pub fn timings(&self) -> (Duration, Duration, Duration) {
        let duration = self.lease_duration.as_secs().max(3);
        let grace = self.renew_grace.as_secs().min(duration - 1);
        let interval = (duration / 3).clamp(1, 2).min(duration - grace).max(1);
        let deadline = self
            .renew_deadline
            .min(Duration::from_secs(duration * 2 / 3))
            .max(Duration::from_secs(interval + 1));
        (
            Duration::from_secs(duration),
            Duration::from_secs(interval),
            deadline,
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("cannot connect to Kubernetes: {0}")]
    Kube(#[from] kube::Error),
    #[error("lost the leader lease; exiting so another replica takes over")]
    LostLease,
    #[error("the metrics server failed: {0}")]
    Server(#[from] std::io::Error),
}

/// Runs the controller until SIGTERM/SIGINT (or, with leader election, until the
/// lease is lost).
pub async fn run(options: RunOptions) -> Result<(), RunError> {
    let identity = options
        .leader_election
        .as_ref()
        .map(|e| e.identity.clone())
        .unwrap_or_else(|| "controller".into());
    let client = api_client(
        options.config.api_timeout,
        &format!("controller; {identity}"),
    )
    .await?;
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
            let leadership = Arc::new(leader::Leadership::unconditional());
            run_controller(
                client,
                options.clone(),
                metrics,
                leadership,
                shutdown.clone(),
            )
            .await;
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

/// A Kubernetes client whose every request is bounded by `timeout` (kube sets
/// no read timeout, so a request on a black-holed connection would wait
/// forever; for a watch the bound is on the start of its answer) and whose
/// User-Agent names the process (`dropbox-operator/<version> (<who>)`), so the
/// API server's audit log tells which replica wrote what.
pub async fn api_client(timeout: Duration, who: &str) -> Result<Client, kube::Error> {
    let mut config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    config.connect_timeout = Some(timeout);
    // Also bounds each read of a watch's stream (the server ends watches
    // sooner, `store::WATCH_TIMEOUT_SECS`), so a black-holed watch is noticed.
    config.read_timeout = Some(crate::store::API_READ_TIMEOUT);
    config.reset_reader_on_write = true;
    let agent = format!("dropbox-operator/{} ({who})", env!("CARGO_PKG_VERSION"));
    if let Ok(value) = reqwest::header::HeaderValue::from_str(&agent) {
        config.headers.push((reqwest::header::USER_AGENT, value));
    }
    Ok(kube::client::ClientBuilder::try_from(config)?
        .with_layer(&BoundedRequestsLayer { timeout })
        .build())
}

/// Bounds every request but lists and watches by a timeout. A list is not
/// bounded by it: after an API server restart, a consistent list can take
/// longer than the bound (measured: more than 10 s for the Secrets of one
/// namespace while the restarted server's cache caught up, tests/faults.rs row
/// 13 under load), and a list cut off every time is retried for ever: the
/// controller stayed blind. Lists and watches are bounded by the client's read
/// timeout instead (a black-holed connection still ends).
#[derive(Clone, Copy)]
struct BoundedRequestsLayer {
    timeout: Duration,
}

impl<S> tower::Layer<S> for BoundedRequestsLayer {
    type Service = BoundedRequests<S>;
    fn layer(&self, inner: S) -> Self::Service {
        BoundedRequests {
            inner,
            timeout: self.timeout,
        }
    }
}

#[derive(Clone)]
struct BoundedRequests<S> {
    inner: S,
    timeout: Duration,
}

/// A list (kube-runtime's watcher lists in pages, `limit=`) or a watch.
fn lists_or_watches<B>(request: &axum::http::Request<B>) -> bool {
    request.method() == axum::http::Method::GET
        && request.uri().query().is_some_and(|q| {
            q.split('&')
                .any(|p| p.starts_with("watch=") || p.starts_with("limit="))
        })
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<S, B> tower::Service<axum::http::Request<B>> for BoundedRequests<S>
where
    S: tower::Service<axum::http::Request<B>>,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    S::Response: Send + 'static,
{
    type Response = S::Response;
    type Error = BoxError;
    type Future = futures::future::BoxFuture<'static, Result<S::Response, BoxError>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: axum::http::Request<B>) -> Self::Future {
        let bounded = !lists_or_watches(&request);
        let answer = self.inner.call(request);
        let timeout = self.timeout;
        Box::pin(async move {
            if bounded {
                match tokio::time::timeout(timeout, answer).await {
                    Ok(result) => result.map_err(Into::into),
                    Err(_) => Err(Box::new(tower::timeout::error::Elapsed::new()) as BoxError),
                }
            } else {
                answer.await.map_err(Into::into)
            }
        })
    }
}

async fn run_as_leader(
    client: Client,
    options: &RunOptions,
    election: LeaderElection,
    metrics: ControllerMetrics,
    ready: Arc<Readiness>,
    shutdown: CancellationToken,
) -> Result<(), RunError> {
    let (duration, interval, renew_deadline) = election.timings();
    // The Lease belongs to the release: owned by the controller's Deployment,
    // the garbage collector removes it with `helm uninstall` (found by `make
    // e2e`: it outlived the release). Without an owner it is merely left behind.
    let owner = match &options.ingress.owner_deployment {
        Some(name) => match Api::<k8s_openapi::api::apps::v1::Deployment>::namespaced(
            client.clone(),
            &election.namespace,
        )
        .get(name)
        .await
        {
            Ok(d) => d.metadata.uid.map(|uid| OwnerReference {
                api_version: "apps/v1".into(),
                kind: "Deployment".into(),
                name: name.clone(),
                uid,
                ..Default::default()
            }),
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the controller's Deployment; the leader Lease will outlive an uninstall");
                None
            }
        },
        None => None,
    };
    let elector = leader::Elector::new(
        Api::<Lease>::namespaced(client.clone(), &election.namespace),
        &election.lease_name,
        &election.identity,
        duration,
        interval,
        renew_deadline,
    )
    .owned_by(owner);
    let leadership = Arc::new(leader::Leadership::elected());
    // A standby replica is healthy and ready: it is waiting for its turn.
    ready.set(true);
    tracing::info!(lease = %election.lease_name, identity = %election.identity, "waiting for the leader lease");
    if !elector.acquire(&leadership, &shutdown).await {
        return Ok(());
    }
    tracing::info!(identity = %election.identity, "acquired the leader lease; starting the controller");
    metrics.leader.set(1);
    let stop = shutdown.child_token();
    let mut controller = tokio::spawn(run_controller(
        client,
        options.clone(),
        metrics.clone(),
        leadership.clone(),
        stop.clone(),
    ));
    // Acting ends at shutdown, or when this replica must stop: the lease names
    // another holder, or no renewal succeeded within the renew deadline (as
    // client-go's renewDeadline). The last is decided by this replica's own
    // clocks: a leader cut off from the API server, or paused, stops before its
    // lease can expire and be taken, without waiting for any answer.
    let why = tokio::select! {
        _ = &mut controller => None,
        _ = leadership.lapsed() => Some(format!("no renewal of the lease succeeded within {renew_deadline:?}")),
        why = elector.hold(&leadership) => Some(why),
    };
    metrics.leader.set(0);
    let Some(why) = why else {
        // Shutdown: give the lease up, so a standby takes over at once.
        let _ = tokio::time::timeout(Duration::from_secs(5), elector.release(&leadership)).await;
        return Ok(());
    };
    leadership.step_down();
    stop.cancel();
    tracing::error!(reason = %why, "stepping down as leader");
    // In-flight reconciles end at their next fenced step; tokens they hold that
    // could not be stored are revoked on the way out (run_controller). Nothing
    // is written to the lease: this replica cannot know whether it is still
    // its own (a release would clear the new holder's record).
    let bound =
        options.dropbox.timeout() + options.config.revoke_timeout + options.config.api_timeout;
    if tokio::time::timeout(bound, controller).await.is_err() {
        tracing::warn!("the controller did not stop within {bound:?}");
    }
    Err(RunError::LostLease)
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
    options: RunOptions,
    metrics: ControllerMetrics,
    leadership: Arc<leader::Leadership>,
    stop: CancellationToken,
) {
    // One watch per namespace when several are given (Roles there, no
    // cluster-wide grant), one for all namespaces otherwise.
    let namespaces = crate::store::split_namespaces(options.namespace.as_deref());
    let instances: Vec<Api<DropboxElementInstance>> = crate::store::apis(&client, &namespaces);
    let secrets: Vec<Api<PartialObjectMeta<Secret>>> = crate::store::apis(&client, &namespaces);
    let (store, instance_writer) = kube::runtime::reflector::store();
    // Consistent lists, not "any": after an API server restart a list served
    // from its fresh cache can be older than the watch window, and every watch
    // then fails "too old resource version" again and again; the controller was
    // blind for minutes (tests/faults.rs, row 13).
    let instance_events = kube::runtime::reflector(
        instance_writer,
        crate::store::namespaces_watcher(instances, crate::store::watch_config())
            .modify(crate::store::slim_instance),
    )
    .backoff(crate::store::watch_backoff())
    .applied_objects();
    // Every trigger stream below backs off on its own errors. kube-runtime's
    // default would add one shared backoff over all of them (800 ms doubling to
    // 30 s, reset only after two error-free minutes): after an API server
    // restart, each watch's single "too old resource version" paused every
    // trigger, 2.6, 5, 9, 25 and 40 s in turn, and a new instance waited more
    // than a minute for its first reconcile (tests/faults.rs, rows 13 and 14).
    let controller = Controller::for_stream(instance_events, store.clone())
        .with_config(kube::runtime::controller::Config::default().concurrency(options.concurrency))
        .trigger_backoff(crate::store::TriggerBackoff);

    // Secrets are watched as metadata only: the mapper needs names and owners, and
    // Secret contents (possibly large, e.g. Helm releases) never sit in memory.
    let (secret_versions, secret_writer) = kube::runtime::reflector::store();
    let secret_events = kube::runtime::reflector(
        secret_writer,
        crate::store::namespaces_watcher(secrets, crate::store::watch_config())
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
    .backoff(crate::store::watch_backoff())
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

    // Delivery states the ingress reports: an instance whose state changed is
    // reconciled (its status mirrors it).
    let (deliveries, delivery_writer) = kube::runtime::reflector::store();
    let delivery_events = kube::runtime::reflector(
        delivery_writer,
        watcher(
            Api::<k8s_openapi::api::core::v1::ConfigMap>::namespaced(
                client.clone(),
                &options.ingress.data_namespace,
            ),
            // A consistent list, not "any": after an API server restart a list
            // served from its cache can be older than the watch window, and
            // every watch then fails "too old resource version" (seen for
            // minutes in tests/faults.rs row 13). The delivery states are few
            // and small.
            crate::store::watch_config().labels(&crate::contract::role_selector(
                crate::contract::ROLE_DELIVERY,
            )),
        )
        .modify(|cm| {
            cm.metadata.managed_fields = None;
            cm.metadata.annotations = None;
        }),
    )
    .backoff(crate::store::watch_backoff())
    .touched_objects();
    let delivery_store = store.clone();
    let controller = controller.watches_stream(delivery_events, move |cm| {
        let uid = cm
            .labels()
            .get(crate::contract::INSTANCE_UID_LABEL)
            .cloned()
            .unwrap_or_default();
        delivery_store
            .find(|i| i.metadata.uid.as_deref() == Some(uid.as_str()))
            .map(|i| ObjectRef::from_obj(i.as_ref()))
    });
    let deliveries_ready = Arc::new(std::sync::atomic::AtomicBool::new(false));
    tokio::spawn({
        let deliveries = deliveries.clone();
        let ready = deliveries_ready.clone();
        async move {
            crate::store::wait_until_ready(&deliveries).await;
            ready.store(true, std::sync::atomic::Ordering::Release);
        }
    });

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
        deliveries,
        deliveries_ready,
        unstored: Mutex::default(),
        leadership,
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
                if let Err(e) = finalizer::release_orphaned_token_secrets(&ctx).await {
                    tracing::warn!(error = %e, "releasing orphaned token Secrets failed; retrying later");
                }
            }
        }
    });
    controller
        .graceful_shutdown_on(async move { stop.cancelled().await })
        .run(reconcile::reconcile, reconcile::error_policy, ctx.clone())
        .for_each(|result| async move {
            if let Err(e) = result {
                // Object-level failures are already logged by the error policy;
                // these are watch/queue errors, retried by kube-runtime.
                tracing::debug!(error = %e, "controller stream error");
            }
        })
        .await;
    cluster.clear_source();
    revoke_unstorable(&ctx).await;
    tracing::info!("controller stopped");
}

/// Tokens a code gave that the API server never stored exist only in this
/// process: on the way out they are revoked, so they do not stay valid where
/// nobody can reach them (the instance asks for a new approval instead).
/// Refreshed tokens are left alone: they share their grant with the stored
/// ones, which revoking them would kill.
async fn revoke_unstorable(ctx: &Context) {
    let kept: Vec<(String, lifecycle::Kept)> = ctx
        .unstored
        .lock()
        .expect("unstored lock")
        .drain()
        .filter(|(_, k)| k.origin == lifecycle::Origin::Code)
        .collect();
    for (uid, kept) in kept {
        let outcome =
            revoke::revoke(&ctx.dropbox, &kept.tokens, None, ctx.config.revoke_timeout).await;
        ctx.metrics
            .revocations
            .get_or_create(&crate::metrics::ResultLabels {
                result: outcome.label(),
            })
            .inc();
        tracing::warn!(instance_uid = %uid, result = outcome.label(), "revoked tokens that could not be stored before stopping");
    }
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
        for (d, g, dl) in [
            (15, 5, 10),
            (6, 2, 10),
            (4, 1, 10),
            (4, 2, 3),
            (60, 5, 30),
            (3, 1, 1),
            (10, 9, 5),
        ] {
            let (duration, interval, deadline) = election(d, g, dl).timings();
            let s = Duration::from_secs;
            assert!(
                interval >= s(1) && interval <= s(2),
                "{d}/{g}: renews every {interval:?}"
            );
            assert!(
                interval <= duration - s(g.min(d - 1)),
                "{d}/{g}: {interval:?} leaves the grace"
            );
            assert!(deadline < duration, "{d}: deadline {deadline:?}");
            assert!(
                deadline > interval,
                "{d}: deadline {deadline:?} vs {interval:?}"
            );
        }
        assert_eq!(
            election(15, 5, 10).timings(),
            (
                Duration::from_secs(15),
                Duration::from_secs(2),
                Duration::from_secs(10)
            )
        );
    }
}
