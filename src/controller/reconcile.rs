//! One reconcile of a DropboxElementInstance, as a pipeline:
//!
//! 1. read the referenced objects ([`inputs::read`]),
//! 2. decide and act on the OAuth lifecycle ([`oauth`]), which applies the
//!    token Secret (server-side apply) when tokens change,
//! 3. project what the ingress needs and report EventsReady ([`super::projection`]),
//! 4. compute the desired status and write it only when it differs, publish
//!    Events for transitions ([`super::status`]), and pick the next requeue: the
//!    earliest any step asked for.
//!
//! Deletion goes through [`super::finalizer`]. A panic in a reconcile is
//! contained to that object: it becomes an error, retried with backoff.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::Api;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use super::Context;
use super::finalizer::{self, FINALIZER};
use super::inputs::{self, Credentials, Inputs, Problem};
use super::oauth::{self, AuthStep, OAuthCredentials};
use super::projection::{EventsInputs, Projector};
use super::status::{desired_status, publish_transitions, write_status};
use super::token::StoredToken;
use crate::api::{DropboxElementInstance, DropboxElementInstanceStatus};
use crate::conditions::{self, AUTHORIZED, Desired, EVENTS_READY, Reason};
use crate::metrics::{ReasonLabels, ResultLabels};

/// Field manager of everything the controller applies.
pub const FIELD_MANAGER: &str = crate::contract::CONTROLLER_FIELD_MANAGER;

/// Errors that end a reconcile early; they are retried with backoff. Dropbox
/// trouble is not among them: it becomes a condition and a scheduled retry.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API request failed: {0}")]
    Kube(#[from] kube::Error),
    #[error("the instance has no namespace")]
    NotNamespaced,
    #[error("the reconcile panicked: {0}")]
    Panicked(String),
}

impl Error {
    /// Low-cardinality label for metrics.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesAPI",
            Error::NotNamespaced => "NotNamespaced",
            Error::Panicked(_) => "Panicked",
        }
    }
}

/// When to look at the instance again.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Next {
    /// Healthy: come back after this long (e.g. when the token is due for refresh).
    After(Duration),
    /// Transient trouble: retry with exponential backoff, not sooner than `at_least`.
    Backoff { at_least: Option<Duration> },
    /// Only a change (spec, Secret) can help.
    WaitForChange,
}

/// Now, in whole seconds: metav1.Time is serialized with second precision, so
/// anything finer would make the stored status look different on every reconcile.
pub fn now() -> jiff::Timestamp {
    jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())
        .unwrap_or_else(|_| jiff::Timestamp::now())
}

pub fn object_key(instance: &DropboxElementInstance) -> String {
    format!(
        "{}/{}",
        instance.namespace().unwrap_or_default(),
        instance.name_any()
    )
}

/// Entry point called by the kube-runtime controller.
pub async fn reconcile(
    instance: Arc<DropboxElementInstance>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    let _timer = ctx.metrics.time_reconcile();
    let result = AssertUnwindSafe(reconcile_or_clean_up(instance.clone(), &ctx))
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

async fn reconcile_or_clean_up(
    instance: Arc<DropboxElementInstance>,
    ctx: &Context,
) -> Result<Action, Error> {
    instance.namespace().ok_or(Error::NotNamespaced)?;
    if instance.meta().deletion_timestamp.is_some() {
        if !instance.finalizers().iter().any(|f| f == FINALIZER) {
            return Ok(Action::await_change());
        }
        return finalizer::cleanup(&instance, ctx).await;
    }
    apply(&instance, ctx).await
}

/// Adds the finalizer when it is missing (server-side apply, keeping the
/// recorded code).
async fn ensure_finalizer(instance: &DropboxElementInstance, ctx: &Context) -> Result<(), Error> {
    if instance.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let api: Api<DropboxElementInstance> = Api::namespaced(
        ctx.client.clone(),
        &instance.namespace().unwrap_or_default(),
    );
    let marker = finalizer::code_sent(instance, ctx);
    finalizer::record_code(&api, instance, marker.as_deref(), ctx).await?;
    Ok(())
}

/// Whether the code with `fingerprint` was sent before (by status, by its tokens
/// or by the marker recorded before sending): then it is never sent again.
pub fn code_spent(
    instance: &DropboxElementInstance,
    prev: &DropboxElementInstanceStatus,
    stored: Option<&StoredToken>,
    fingerprint: &str,
    ctx: &Context,
) -> bool {
    prev.code_fingerprint.as_deref() == Some(fingerprint)
        || stored.and_then(|s| s.code_fingerprint.as_deref()) == Some(fingerprint)
        || finalizer::code_sent(instance, ctx).as_deref() == Some(fingerprint)
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

async fn apply(instance: &DropboxElementInstance, ctx: &Context) -> Result<Action, Error> {
    let prev = instance.status.clone().unwrap_or_default();
    let key = object_key(instance);
    if ctx.written.is_stale(instance) {
        // The watch has not delivered our own status write yet; it will wake us
        // (and the requeue our write's reconcile asked for stays scheduled).
        return Ok(Action::await_change());
    }
    let inputs = inputs::read(&ctx.client, &ctx.secrets, instance).await?;
    let inputs_hash = inputs_fingerprint(instance, &inputs);
    if let Some(wait) = ctx.backoff.remaining(&key, inputs_hash) {
        // Woken up by our own status write while backing off: nothing changed.
        return Ok(Action::requeue(wait));
    }
    let (mut step, app, signature_key) = match inputs {
        Err(Problem { reason, message }) => {
            ensure_finalizer(instance, ctx).await?;
            (
                AuthStep::from_previous(
                    &prev,
                    Desired::new(AUTHORIZED, Some(false), reason, message),
                    Next::WaitForChange,
                ),
                None,
                None,
            )
        }
        Ok(Inputs {
            app,
            credentials,
            token,
            signature_key,
            token_secret_deleting,
        }) => {
            if let Some(secret) = &token_secret_deleting {
                finalizer::release_token_secret(instance, secret, ctx).await?;
            }
            // The finalizer goes on before any token can exist; a code about to be
            // sent records itself in the same write (see oauth::exchange).
            let exchanges = matches!(&credentials, Credentials::OAuth2 { code: Some((_, fp)), .. }
                if !code_spent(instance, &prev, token.as_ref(), fp, ctx));
            if !exchanges {
                ensure_finalizer(instance, ctx).await?;
            }
            let step = match (credentials, &app) {
                (
                    Credentials::OAuth2 {
                        code,
                        code_verifier,
                        redirect_uri,
                        exchange_redirect_uri,
                    },
                    Some(app),
                ) => {
                    let creds = OAuthCredentials {
                        app,
                        code: code.as_ref().map(|(c, fp)| (c, fp.as_str())),
                        code_verifier: code_verifier.as_ref().map(|v| v.0.as_str()),
                        redirect_uri: redirect_uri.as_deref(),
                        exchange_redirect_uri: exchange_redirect_uri.as_deref(),
                    };
                    oauth::oauth2(instance, &prev, creds, token, ctx).await?
                }
                (Credentials::ApiKey { token }, _) => oauth::api_key(&prev, &token, ctx).await,
                // inputs::read reports a missing app Secret for oauth2 as a Problem.
                (Credentials::OAuth2 { .. }, None) => AuthStep::from_previous(
                    &prev,
                    Desired::new(
                        AUTHORIZED,
                        Some(false),
                        Reason::SecretNotFound,
                        "oauth2 needs appSecretRef",
                    ),
                    Next::WaitForChange,
                ),
            };
            (step, app, signature_key)
        }
    };

    let projector = Projector {
        client: &ctx.client,
        dropbox: &ctx.dropbox,
        memo: &ctx.projections,
        namespace: &ctx.ingress.settings.namespace,
    };
    let events_enabled = instance.spec.events.as_ref().is_some_and(|e| e.enabled);
    // Whether the ingress is needed can change only through an instance that
    // has or had events; the others do not wake its manager (which then looks
    // at every instance).
    let ingress_concerned = events_enabled || prev.events.is_some();
    let events = if events_enabled {
        let authorized = step.authorized.is_true();
        let input = EventsInputs {
            app_key: app.as_ref().map(|a| a.client_id.as_str()),
            app_secret: app.as_ref().map(|a| a.client_secret.as_str()),
            account_id: step.account.as_ref().and_then(|a| a.account_id.as_deref()),
            access_token: step
                .access_token
                .as_ref()
                .filter(|_| authorized)
                .map(|t| t.0.as_str()),
            signature_key,
            ingress_alive: ctx.ingress.alive(),
            previous: conditions::find(&prev.conditions, EVENTS_READY),
        };
        let events = projector.events_step(instance, input).await?;
        if let Some(at_least) = events.retry
            && !matches!(step.next, Next::Backoff { .. })
        {
            step.next = Next::Backoff { at_least };
        }
        Some(events)
    } else {
        if prev.events.is_some() {
            projector.remove(instance).await?;
        }
        None
    };
    if ingress_concerned {
        ctx.ingress.poke();
    }

    if !step.authorized.is_true() {
        ctx.metrics
            .reconcile_errors
            .get_or_create(&ReasonLabels {
                reason: step.authorized.reason.as_str(),
            })
            .inc();
    }
    match step.token.as_ref().and_then(|t| t.expires_at.as_ref()) {
        Some(Time(expires_at)) => ctx.metrics.token_expiry.set(
            &instance.namespace().unwrap_or_default(),
            &instance.name_any(),
            *expires_at,
        ),
        None => ctx.metrics.token_expiry.remove(
            &instance.namespace().unwrap_or_default(),
            &instance.name_any(),
        ),
    }

    let mut desired = desired_status(instance, &step, events.as_ref(), &Time(now()));
    // The app key is public (every authorize link carries it); published so that
    // `connect` needs no access to the app Secret (README, "Connect an account").
    desired.app_key = app.as_ref().map(|a| a.client_id.clone());
    if conditions::status_differs(instance.status.as_ref(), &desired) {
        tracing::debug!(
            instance = %key,
            current = %serde_json::to_string(&instance.status).unwrap_or_default(),
            desired = %serde_json::to_string(&desired).unwrap_or_default(),
            "status changed"
        );
        write_status(instance, &desired, ctx).await?;
        publish_transitions(instance, &prev, &desired, ctx).await;
    }
    Ok(next_action(&key, step.next, inputs_hash, ctx))
}

/// Identifies what an attempt was made with: the spec generation and the
/// credentials. A change of any of them ends a backoff wait at once.
fn inputs_fingerprint(instance: &DropboxElementInstance, inputs: &Result<Inputs, Problem>) -> u64 {
    use std::hash::{DefaultHasher, Hash, Hasher};
    let mut h = DefaultHasher::new();
    instance.metadata.generation.hash(&mut h);
    if let Ok(inputs) = inputs {
        if let Some(app) = &inputs.app {
            app.client_id.hash(&mut h);
            app.client_secret.hash(&mut h);
        }
        if let Some(Ok(key)) = &inputs.signature_key {
            key.hash(&mut h);
        }
        match &inputs.credentials {
            Credentials::OAuth2 {
                code,
                code_verifier,
                exchange_redirect_uri,
                ..
            } => {
                code.as_ref().map(|(_, fp)| fp).hash(&mut h);
                code_verifier.as_ref().map(|v| &v.0).hash(&mut h);
                exchange_redirect_uri.hash(&mut h);
            }
            Credentials::ApiKey { token } => token.0.hash(&mut h),
        }
    }
    h.finish()
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
