//! One reconcile of a DropboxElementInstance, as a pipeline:
//!
//! 1. gather what the credentials decision needs, once (`gather.rs`);
//! 2. run the OAuth state machine (`lifecycle.rs`) through its executor
//!    (`execute.rs`), which carries out every effect with fenced writes;
//! 3. project what the ingress needs and report EventsReady (`projection.rs`);
//! 4. compute the desired status and write it (fenced) only when it differs,
//!    publish Events for transitions (`status.rs`), and pick the next requeue:
//!    the earliest any step asked for.
//!
//! A write whose precondition fails (the instance changed since it was read)
//! starts the reconcile again from a fresh copy, a few times at most. A panic in
//! a reconcile is contained to that object: it becomes an error, retried with
//! backoff, and the other instances keep reconciling.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use super::Context;
use super::common::{Error, Next, now, object_key};
use super::execute::{Executor, Outcome};
use super::gather::gather;
use super::projection::{EventsInputs, Projector};
use super::status::{desired_status, publish_transitions};
use super::token::FINALIZER;
use crate::api::DropboxElementInstance;
use crate::conditions::{self, EVENTS_READY, Reason};
use crate::metrics::{ReasonLabels, ResultLabels};

/// How often one reconcile decides again after a failed precondition.
const ATTEMPTS: usize = 3;
/// How soon an instance whose cursor the ingress reports missing is looked at again.
const CURSOR_RECHECK: Duration = Duration::from_secs(5);

/// Entry point called by the kube-runtime controller.
pub async fn reconcile(
    instance: Arc<DropboxElementInstance>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.time_reconcile();
    let result = AssertUnwindSafe(reconcile_with_retries(instance.clone(), &ctx))
        .catch_unwind()
        .await
        .unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<&str>()
                .map(|s| (*s).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown".into());
            ctx.metrics.reconcile_panics.inc();
            tracing::error!(instance = %object_key(&instance), %message, "reconcile panicked; contained, retrying with backoff");
            Err(Error::Panicked(message))
        });
    let label = if result.is_ok() { "success" } else { "error" };
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabels { result: label })
        .inc();
    result
}

async fn reconcile_with_retries(
    instance: Arc<DropboxElementInstance>,
    ctx: &Context,
) -> Result<Action, Error> {
    ctx.leadership.check().map_err(Error::NotLeader)?;
    let namespace = instance.namespace().ok_or(Error::NotNamespaced)?;
    let deleting = instance.meta().deletion_timestamp.is_some();
    if deleting && !instance.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(Action::await_change());
    }
    if !deleting && ctx.written.is_stale(&instance) {
        // The watch has not delivered our own status write yet; it will wake us
        // (and the requeue our write's reconcile asked for stays scheduled).
        return Ok(Action::await_change());
    }
    faults::inject(&instance);
    let api: Api<DropboxElementInstance> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut current = instance.as_ref().clone();
    for attempt in 1..=ATTEMPTS {
        match reconcile_once(&current, ctx).await {
            Err(Error::Conflict(what)) if attempt < ATTEMPTS => {
                tracing::debug!(instance = %object_key(&current), %what, "precondition failed; deciding again from a fresh copy");
                match api.get_opt(&current.name_any()).await? {
                    Some(fresh) => current = fresh,
                    None => return Ok(Action::await_change()),
                }
            }
            other => return other,
        }
    }
    Err(Error::Conflict("the instance".into()))
}

async fn reconcile_once(instance: &DropboxElementInstance, ctx: &Context) -> Result<Action, Error> {
    let key = object_key(instance);
    let deleting = instance.meta().deletion_timestamp.is_some();
    if deleting {
        forget(instance, ctx).await;
    }
    let events_enabled = instance.spec.events.as_ref().is_some_and(|e| e.enabled);
    if !deleting
        && events_enabled
        && !ctx
            .deliveries_ready
            .load(std::sync::atomic::Ordering::Acquire)
    {
        // Status mirrors the delivery states: wait for their first listing.
        return Ok(Action::requeue(Duration::from_millis(500)));
    }
    if !deleting && let Some(left) = super::settled::shortcut(instance, ctx).await? {
        // Settled, and nothing it was settled on changed: no Secret to read.
        ctx.backoff.reset(&key);
        return Ok(Action::requeue(left.min(ctx.config.resync_interval)));
    }
    let gathered = gather(instance, ctx).await?;
    if !deleting && let Some(wait) = ctx.backoff.remaining(&key, gathered.inputs_hash) {
        // Woken up by our own status write while backing off: nothing changed.
        return Ok(Action::requeue(wait));
    }
    let mut executor = Executor::new(
        ctx,
        instance,
        &gathered.facts,
        gathered.token_secret_version.clone(),
        gathered.code_secret_version.clone(),
    );
    let mut verdict = match executor.run().await? {
        Outcome::Released => {
            ctx.backoff.reset(&key);
            return Ok(Action::await_change());
        }
        Outcome::Verdict(verdict) => *verdict,
    };
    if verdict.authorized.reason == Reason::TokenValid {
        executor.record_code_secret_version().await?;
    }

    let prev = instance.status.clone().unwrap_or_default();
    let projector = Projector {
        client: &ctx.client,
        dropbox: &ctx.dropbox,
        memo: &ctx.projections,
        namespace: &ctx.ingress.settings.data_namespace,
    };
    // Whether the ingress is needed can change only through an instance that
    // has or had events; the others do not wake its manager (which then looks
    // at every instance).
    let ingress_concerned = events_enabled || prev.events.is_some();
    let app = gathered.facts.app.as_ref();
    let delivery = events_enabled
        .then(|| ctx.delivery(&instance.uid().unwrap_or_default()))
        .flatten();
    let events = if events_enabled {
        let authorized = verdict.authorized.is_true();
        let input = EventsInputs {
            app_key: app.map(|a| a.client_id.as_str()),
            app_secret: app.map(|a| a.client_secret.as_str()),
            account_id: verdict
                .account
                .as_ref()
                .and_then(|a| a.account_id.as_deref()),
            access_token: verdict
                .access_token
                .as_ref()
                .filter(|_| authorized)
                .map(|t| t.0.as_str()),
            signature_key: gathered.signature_key.clone(),
            ingress_alive: ctx.ingress.alive(),
            previous: conditions::find(&prev.conditions, EVENTS_READY),
            cursor_missing: delivery
                .as_ref()
                .is_some_and(|d| !d.delivering && d.reason == Reason::CursorMissing.as_str()),
            delivered_before: conditions::find(&prev.conditions, conditions::EVENTS_DELIVERING)
                .is_some(),
        };
        let cursor_missing = input.cursor_missing;
        ctx.leadership.check().map_err(Error::NotLeader)?;
        let events = projector.events_step(instance, input).await?;
        if let Some(at_least) = events.retry
            && !matches!(verdict.next, Next::Backoff { .. })
        {
            verdict.next = Next::Backoff { at_least };
        }
        // Until the ingress says delivery works again, look again soon: the
        // cursor may have gone again (nothing else wakes this instance).
        if cursor_missing {
            verdict.next = match verdict.next {
                Next::After(d) => Next::After(d.min(CURSOR_RECHECK)),
                Next::WaitForChange => Next::After(CURSOR_RECHECK),
                backoff => backoff,
            };
        }
        Some(events)
    } else {
        if prev.events.is_some() {
            ctx.leadership.check().map_err(Error::NotLeader)?;
            projector.remove(instance).await?;
        }
        None
    };
    if ingress_concerned {
        ctx.ingress.poke();
    }

    if !verdict.authorized.is_true() {
        ctx.metrics
            .reconcile_errors
            .get_or_create(&ReasonLabels {
                reason: verdict.authorized.reason.as_str(),
            })
            .inc();
    }
    let (namespace, name) = (
        instance.namespace().unwrap_or_default(),
        instance.name_any(),
    );
    match verdict
        .token_status
        .as_ref()
        .and_then(|t| t.expires_at.as_ref())
    {
        Some(Time(expires_at)) => ctx.metrics.token_expiry.set(&namespace, &name, *expires_at),
        None => ctx.metrics.token_expiry.remove(&namespace, &name),
    }

    let mut desired = desired_status(
        instance,
        &verdict,
        events.as_ref(),
        delivery.as_ref(),
        &Time(now()),
    );
    // The app key is public (every authorize link carries it); published so that
    // `connect` needs no access to the app Secret (docs/user-guide.md, "Connect an account").
    desired.app_key = app.map(|a| a.client_id.clone());
    if conditions::status_differs(instance.status.as_ref(), &desired) {
        tracing::debug!(
            instance = %key,
            current = %serde_json::to_string(&instance.status).unwrap_or_default(),
            desired = %serde_json::to_string(&desired).unwrap_or_default(),
            "status changed"
        );
        executor.write_status(&desired).await?;
        publish_transitions(instance, &prev, &desired, ctx).await;
    }
    Ok(next_action(&key, verdict.next, gathered.inputs_hash, ctx))
}

/// A deleted instance: what the controller remembers of it goes (its backoff
/// once it is released: a refused release backs off), and so do its projected
/// objects (best effort: the orphan sweep removes what is left, deletion never
/// waits on it).
async fn forget(instance: &DropboxElementInstance, ctx: &Context) {
    let key = object_key(instance);
    ctx.metrics.token_expiry.remove(
        &instance.namespace().unwrap_or_default(),
        &instance.name_any(),
    );
    ctx.written.forget(instance);
    if ctx.leadership.check().is_err() {
        return;
    }
    if let Err(e) = (Projector {
        client: &ctx.client,
        dropbox: &ctx.dropbox,
        memo: &ctx.projections,
        namespace: &ctx.ingress.settings.data_namespace,
    })
    .remove(instance)
    .await
    {
        tracing::warn!(instance = %key, error = %e, "could not remove the instance's projected objects; the sweep will");
    }
}

/// Error policy: retry with the same jittered exponential backoff as transient
/// Dropbox trouble, per instance.
pub fn error_policy(
    instance: Arc<DropboxElementInstance>,
    error: &Error,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics
        .reconcile_errors
        .get_or_create(&ReasonLabels {
            reason: error.metric_reason(),
        })
        .inc();
    tracing::warn!(instance = %object_key(&instance), error = %error, "reconcile failed; retrying with backoff");
    Action::requeue(ctx.backoff.next_delay(&object_key(&instance), None, 0))
}

fn next_action(key: &str, next: Next, inputs: u64, ctx: &Context) -> Action {
    match next {
        Next::After(delay) => {
            ctx.backoff.reset(key);
            Action::requeue(delay.min(ctx.config.resync_interval))
        }
        Next::Backoff { at_least } => {
            Action::requeue(ctx.backoff.next_delay(key, at_least, inputs))
        }
        Next::WaitForChange => {
            ctx.backoff.reset(key);
            Action::await_change()
        }
    }
}

/// A fault switch for the credential fault table (tests/credentials.rs): an
/// instance annotated `elements.dropbox-operator.dev/test-fault: panic` makes
/// its reconcile panic, to show that the panic stays contained to it. Compiled
/// only with the `test-faults` feature, which only the tests enable.
mod faults {
    use crate::api::DropboxElementInstance;

    /// The annotation that asks for a fault.
    #[cfg(feature = "test-faults")]
    pub const ANNOTATION: &str = "elements.dropbox-operator.dev/test-fault";

    #[cfg(feature = "test-faults")]
    pub fn inject(instance: &DropboxElementInstance) {
        use kube::ResourceExt;
        if instance.annotations().get(ANNOTATION).map(String::as_str) == Some("panic") {
            panic!("injected test fault (annotation {ANNOTATION})");
        }
    }

    #[cfg(not(feature = "test-faults"))]
    pub fn inject(_instance: &DropboxElementInstance) {}
}
