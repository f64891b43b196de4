//! Prometheus metrics (prometheus-client). Labels are low-cardinality except the
//! per-instance token expiry, which is one series per instance by design (it is
//! what an alert on "token about to expire" needs).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    pub namespace: String,
    pub name: String,
}

/// Token expiry per instance, exported as "seconds until expiry" computed at
/// scrape time (so it needs no timer to stay current).
#[derive(Debug, Default)]
pub struct TokenExpiry {
    expiries: Mutex<BTreeMap<(String, String), jiff::Timestamp>>,
}

impl TokenExpiry {
    pub fn set(&self, namespace: &str, name: &str, expires_at: jiff::Timestamp) {
        self.expiries
            .lock()
            .expect("token expiry lock")
            .insert((namespace.to_owned(), name.to_owned()), expires_at);
    }

    pub fn remove(&self, namespace: &str, name: &str) {
        self.expiries
            .lock()
            .expect("token expiry lock")
            .remove(&(namespace.to_owned(), name.to_owned()));
    }
}

impl Collector for TokenExpiry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let now = jiff::Timestamp::now();
        let expiries = self.expiries.lock().expect("token expiry lock").clone();
        let gauge = ConstGauge::new(0.0f64);
        let mut family = encoder.encode_descriptor(
            "dropbox_operator_token_expiry_seconds",
            "Seconds until the access token of an instance expires (negative: expired)",
            None,
            gauge.metric_type(),
        )?;
        for ((namespace, name), expires_at) in expiries {
            let seconds = (expires_at.as_millisecond() - now.as_millisecond()) as f64 / 1000.0;
            let labels = InstanceLabels { namespace, name };
            ConstGauge::new(seconds).encode(family.encode_family(&labels)?)?;
        }
        Ok(())
    }
}

/// One instance as the controller's cache shows it, for [`ClusterState`].
pub struct InstanceState {
    pub namespace: String,
    pub name: String,
    /// `status.phase` (Pending, AwaitingAuthorization, Ready, Degraded, Failed); None before the first status.
    pub phase: Option<&'static str>,
    /// The Ready condition is True.
    pub ready: bool,
}

/// What [`ClusterState`] exports, read at scrape time.
#[derive(Default)]
pub struct StateSnapshot {
    pub instances: Vec<InstanceState>,
    /// Whether an ingress replica is alive; None while no instance needs the
    /// ingress (or before the first look).
    pub ingress_alive: Option<bool>,
}

/// Phases of `status.phase`, each exported (0 when none) so the series exist.
pub const PHASES: [&str; 5] = [
    "Pending",
    "AwaitingAuthorization",
    "Ready",
    "Degraded",
    "Failed",
];

type SnapshotSource = Box<dyn Fn() -> StateSnapshot + Send + Sync>;

/// Instances by phase, per-instance readiness and ingress liveness, computed
/// at scrape time from the leader's cache (so it holds no copy of its own and
/// is never stale). A replica that does not lead exports none of them.
#[derive(Default)]
pub struct ClusterState {
    source: Mutex<Option<SnapshotSource>>,
}

impl std::fmt::Debug for ClusterState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterState").finish_non_exhaustive()
    }
}

impl ClusterState {
    /// Starts exporting what `source` returns (the leader, once its cache runs).
    pub fn set_source(&self, source: impl Fn() -> StateSnapshot + Send + Sync + 'static) {
        *self.source.lock().expect("cluster state lock") = Some(Box::new(source));
    }

    /// Stops exporting (the replica stopped leading).
    pub fn clear_source(&self) {
        *self.source.lock().expect("cluster state lock") = None;
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabels {
    phase: &'static str,
}

impl Collector for ClusterState {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = match self.source.lock().expect("cluster state lock").as_ref() {
            Some(source) => source(),
            None => return Ok(()),
        };
        let gauge = ConstGauge::new(0i64);
        {
            let mut family = encoder.encode_descriptor(
                "dropbox_operator_instances",
                "DropboxElementInstances by status.phase (\"\": no status yet)",
                None,
                gauge.metric_type(),
            )?;
            let mut counts: BTreeMap<&'static str, i64> = PHASES.iter().map(|p| (*p, 0)).collect();
            for i in &snapshot.instances {
                *counts.entry(i.phase.unwrap_or("")).or_default() += 1;
            }
            for (phase, count) in counts {
                ConstGauge::new(count).encode(family.encode_family(&PhaseLabels { phase })?)?;
            }
        }
        {
            let mut family = encoder.encode_descriptor(
                "dropbox_operator_instance_ready",
                "1 while the instance's Ready condition is True, else 0",
                None,
                gauge.metric_type(),
            )?;
            for i in snapshot.instances {
                let labels = InstanceLabels {
                    namespace: i.namespace,
                    name: i.name,
                };
                ConstGauge::new(i64::from(i.ready)).encode(family.encode_family(&labels)?)?;
            }
        }
        if let Some(alive) = snapshot.ingress_alive {
            let family = encoder.encode_descriptor(
                "dropbox_operator_ingress_alive",
                "1 while a webhook ingress replica renews its heartbeat, 0 when none does; \
                 absent while no instance has events enabled",
                None,
                gauge.metric_type(),
            )?;
            ConstGauge::new(i64::from(alive)).encode(family)?;
        }
        Ok(())
    }
}

/// Metrics of the controller.
#[derive(Clone)]
pub struct ControllerMetrics {
    pub reconciles: Family<ResultLabels, Counter>,
    pub reconcile_errors: Family<ReasonLabels, Counter>,
    pub reconcile_duration: Histogram,
    pub token_refreshes: Family<ResultLabels, Counter>,
    pub code_exchanges: Family<ResultLabels, Counter>,
    pub revocations: Family<ResultLabels, Counter>,
    pub token_expiry: Arc<TokenExpiry>,
    pub leader: Gauge,
    pub reconcile_panics: Counter,
    pub cluster: Arc<ClusterState>,
}

impl ControllerMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = ControllerMetrics {
            reconciles: Family::default(),
            reconcile_errors: Family::default(),
            reconcile_duration: Histogram::new(exponential_buckets(0.005, 2.0, 14)),
            token_refreshes: Family::default(),
            code_exchanges: Family::default(),
            revocations: Family::default(),
            token_expiry: Arc::new(TokenExpiry::default()),
            leader: Gauge::default(),
            reconcile_panics: Counter::default(),
            cluster: Arc::new(ClusterState::default()),
        };
        let r = registry.sub_registry_with_prefix("dropbox_operator");
        r.register(
            "reconciles",
            "Reconciles of DropboxElementInstances by result",
            m.reconciles.clone(),
        );
        r.register(
            "reconcile_errors",
            "Reconciles that ended in an error or a failing condition, by reason",
            m.reconcile_errors.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Duration of one reconcile",
            m.reconcile_duration.clone(),
        );
        r.register(
            "token_refreshes",
            "Access-token refreshes by result",
            m.token_refreshes.clone(),
        );
        r.register(
            "code_exchanges",
            "Authorization-code exchanges by result",
            m.code_exchanges.clone(),
        );
        r.register(
            "token_revocations",
            "Token revocations on deletion by result",
            m.revocations.clone(),
        );
        r.register(
            "leader",
            "1 while this replica holds the leader lease",
            m.leader.clone(),
        );
        r.register(
            "reconcile_panics",
            "Reconciles that panicked (contained to their object, retried with backoff)",
            m.reconcile_panics.clone(),
        );
        registry.register_collector(Box::new(m.token_expiry.clone()));
        registry.register_collector(Box::new(m.cluster.clone()));
        m
    }

    /// Starts a reconcile timer; the duration is observed when it is dropped.
    pub fn time_reconcile(&self) -> ReconcileTimer {
        ReconcileTimer {
            start: Instant::now(),
            histogram: self.reconcile_duration.clone(),
        }
    }
}

/// Observes the reconcile duration on drop, whichever way the reconcile ends.
pub struct ReconcileTimer {
    start: Instant,
    histogram: Histogram,
}

impl Drop for ReconcileTimer {
    fn drop(&mut self) {
        self.histogram.observe(self.start.elapsed().as_secs_f64());
    }
}

/// Renders a registry in the Prometheus text format.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::text::encode(&mut out, registry);
    out
}

/// Metrics of the webhook ingress.
#[derive(Clone)]
pub struct IngressMetrics {
    pub webhooks: Family<ResultLabels, Counter>,
    pub syncs: Family<ResultLabels, Counter>,
    pub events_delivered: Counter,
    pub notifications_delivered: Counter,
    pub delivery_failures: Family<ReasonLabels, Counter>,
    pub delivery_retries: Counter,
    pub delivery_latency: Histogram,
    pub cursor_conflicts: Counter,
    pub queue_depth: Gauge,
    pub secret_reads: Counter,
    pub longpolls: Gauge,
    pub longpoll_results: Family<ResultLabels, Counter>,
    pub open_connections: Gauge,
    pub body_bytes_in_flight: Gauge,
    pub handoffs: Family<ResultLabels, Counter>,
    pub parked_instances: Gauge,
}

impl IngressMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = IngressMetrics {
            webhooks: Family::default(),
            syncs: Family::default(),
            events_delivered: Counter::default(),
            notifications_delivered: Counter::default(),
            delivery_failures: Family::default(),
            delivery_retries: Counter::default(),
            delivery_latency: Histogram::new(exponential_buckets(0.005, 2.0, 16)),
            cursor_conflicts: Counter::default(),
            queue_depth: Gauge::default(),
            secret_reads: Counter::default(),
            longpolls: Gauge::default(),
            longpoll_results: Family::default(),
            open_connections: Gauge::default(),
            body_bytes_in_flight: Gauge::default(),
            handoffs: Family::default(),
            parked_instances: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("dropbox_ingress");
        r.register(
            "webhooks",
            "Dropbox webhook requests by result (accepted, forbidden, not_found, too_large, timeout, malformed, overloaded, over_budget)",
            m.webhooks.clone(),
        );
        r.register(
            "syncs",
            "Syncs of an instance's changes by result",
            m.syncs.clone(),
        );
        r.register(
            "events_delivered",
            "Events delivered to callback URLs",
            m.events_delivered.clone(),
        );
        r.register(
            "notifications_delivered",
            "Notifications (batches of at most 20 events) delivered",
            m.notifications_delivered.clone(),
        );
        r.register(
            "delivery_failures",
            "Failed delivery attempts by reason",
            m.delivery_failures.clone(),
        );
        r.register(
            "delivery_retries",
            "Delivery attempts that are retried",
            m.delivery_retries.clone(),
        );
        r.register(
            "delivery_latency_seconds",
            "From the webhook that announced a change to the delivery of its events",
            m.delivery_latency.clone(),
        );
        r.register(
            "cursor_conflicts",
            "Cursor commits refused because the cursor ConfigMap changed since it was read (the controller re-baselined it); the batch is listed again",
            m.cursor_conflicts.clone(),
        );
        r.register(
            "queue_depth",
            "Instances with a sync waiting to run",
            m.queue_depth.clone(),
        );
        r.register(
            "secret_reads",
            "Listings of the projected Secrets from the API server (the watch's first list and relists)",
            m.secret_reads.clone(),
        );
        r.register(
            "longpolls",
            "Instances (events.source: longpoll) this replica long-polls Dropbox for",
            m.longpolls.clone(),
        );
        r.register(
            "longpoll_results",
            "Answers to list_folder/longpoll by result (changes, timeout, reset, error)",
            m.longpoll_results.clone(),
        );
        r.register(
            "open_connections",
            "Connections open on the public webhook port",
            m.open_connections.clone(),
        );
        r.register(
            "body_bytes_in_flight",
            "Bytes of webhook bodies charged against the body budget (--webhook-body-budget)",
            m.body_bytes_in_flight.clone(),
        );
        r.register(
            "handoffs",
            "Webhooks handed between replicas by result (forwarded, failed, local: sent / received, refused: at the peer endpoint)",
            m.handoffs.clone(),
        );
        r.register(
            "parked_instances",
            "Instances whose delivery is parked (their callback failed permanently or for too long), \
             of those this replica is responsible for",
            m.parked_instances.clone(),
        );
        m
    }
}
