//! One reconcile of a DropboxElementInstance, as a pipeline:
//!
//! 1. read the referenced objects ([`inputs::read`]),
//! 2. decide and act on the OAuth lifecycle ([`oauth2`] / [`api_key`]), which
//!    applies the token Secret (server-side apply) when tokens change,
//! 3. compute the desired status ([`desired_status`], pure),
//! 4. write it only when it differs, publish Events for transitions, and pick the
//!    next requeue.
//!
//! Deletion goes through a finalizer that revokes the token once, bounded in time.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::Context;
use super::inputs::{self, AppCredentials, Credentials, Inputs, Problem, SecretString};
use super::projection::{EventsInputs, EventsStep, Projector};
use super::token::{self, StoredToken};
use crate::api::{
    AccountStatus, DropboxElementInstance, DropboxElementInstanceStatus, EventsStatus, TokenStatus,
};
use crate::conditions::{
    self, AUTHORIZED, Desired, EVENTS_DELIVERING, EVENTS_READY, READY, Reason,
};
use crate::dropbox::{DropboxError, TokenResponse};
use crate::metrics::{ReasonLabels, ResultLabels};

/// Finalizer that revokes the Dropbox token before the instance goes away.
pub const FINALIZER: &str = "elements.dropbox-operator.dev/revoke-token";
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
}

impl Error {
    /// Low-cardinality label for metrics.
    pub fn metric_reason(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesAPI",
            Error::NotNamespaced => "NotNamespaced",
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

/// The outcome of the authorization step.
#[derive(Clone, Debug)]
pub struct AuthStep {
    pub authorized: Desired,
    pub account: Option<AccountStatus>,
    pub token: Option<TokenStatus>,
    pub code_fingerprint: Option<String>,
    pub authorize_url: Option<String>,
    pub next: Next,
    /// The working access token, when Authorized is True (for the events step).
    pub access_token: Option<SecretString>,
}

impl AuthStep {
    /// Starts from what status already says, so a step only states what changed.
    fn from_previous(prev: &DropboxElementInstanceStatus, authorized: Desired, next: Next) -> Self {
        AuthStep {
            authorized,
            account: prev.account.clone(),
            token: prev.token.clone(),
            code_fingerprint: prev.code_fingerprint.clone(),
            authorize_url: None,
            next,
            access_token: None,
        }
    }
}

/// Now, in whole seconds: metav1.Time is serialized with second precision, so
/// anything finer would make the stored status look different on every reconcile.
fn now() -> jiff::Timestamp {
    jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())
        .unwrap_or_else(|_| jiff::Timestamp::now())
}

fn object_key(instance: &DropboxElementInstance) -> String {
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
    let result = reconcile_with_finalizer(instance, &ctx).await;
    let label = if result.is_ok() { "success" } else { "error" };
    ctx.metrics
        .reconciles
        .get_or_create(&ResultLabels { result: label })
        .inc();
    result
}

/// The finalizer, managed with server-side apply (our field manager owns just our
/// entry of the set): added before any token exists, in the same pass as the
/// work (no extra round trip through the watch), removed after cleanup.
async fn reconcile_with_finalizer(
    instance: Arc<DropboxElementInstance>,
    ctx: &Context,
) -> Result<Action, Error> {
    let namespace = instance.namespace().ok_or(Error::NotNamespaced)?;
    let api: Api<DropboxElementInstance> = Api::namespaced(ctx.client.clone(), &namespace);
    let has_finalizer = instance.finalizers().iter().any(|f| f == FINALIZER);
    let finalizers = |list: Vec<&str>| {
        json!({
            "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
            "kind": "DropboxElementInstance",
            "metadata": {"name": instance.name_any(), "finalizers": list},
        })
    };
    let ssa = PatchParams::apply(FIELD_MANAGER).force();
    if instance.meta().deletion_timestamp.is_some() {
        if !has_finalizer {
            return Ok(Action::await_change());
        }
        let action = cleanup(&instance, ctx).await?;
        match api
            .patch(
                &instance.name_any(),
                &ssa,
                &Patch::Apply(finalizers(vec![])),
            )
            .await
        {
            Ok(_) => {}
            // Already gone: nothing left to release.
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        return Ok(action);
    }
    let instance = if has_finalizer {
        instance
    } else {
        // Continue with the patched object, so the status written below is
        // recorded over the version that has the finalizer.
        Arc::new(
            api.patch(
                &instance.name_any(),
                &ssa,
                &Patch::Apply(finalizers(vec![FINALIZER])),
            )
            .await?,
        )
    };
    apply(&instance, ctx).await
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
        Err(Problem { reason, message }) => (
            AuthStep::from_previous(
                &prev,
                Desired::new(AUTHORIZED, Some(false), reason, message),
                Next::WaitForChange,
            ),
            None,
            None,
        ),
        Ok(Inputs {
            app,
            credentials,
            token,
            signature_key,
        }) => {
            let step = match (credentials, &app) {
                (
                    Credentials::OAuth2 {
                        code,
                        code_fingerprint,
                        redirect_uri,
                    },
                    Some(app),
                ) => {
                    let creds = OAuthCredentials {
                        app,
                        code: &code,
                        fingerprint: &code_fingerprint,
                        redirect_uri: redirect_uri.as_deref(),
                    };
                    oauth2(instance, &prev, creds, token, ctx).await?
                }
                (Credentials::ApiKey { token }, _) => api_key(&prev, &token, ctx).await,
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
    ctx.ingress.poke();

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

    let desired = desired_status(instance, &step, events.as_ref(), &Time(now()));
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
                code_fingerprint, ..
            } => code_fingerprint.hash(&mut h),
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

/// The referenced OAuth credentials of an instance.
#[derive(Clone, Copy)]
struct OAuthCredentials<'a> {
    app: &'a AppCredentials,
    code: &'a SecretString,
    fingerprint: &'a str,
    redirect_uri: Option<&'a str>,
}

fn code_location(instance: &DropboxElementInstance) -> String {
    instance
        .spec
        .authentication
        .code_secret_ref
        .as_ref()
        .map(|r| format!("Secret {:?} key {:?}", r.name, r.key))
        .unwrap_or_else(|| "the code Secret".into())
}

fn app_location(instance: &DropboxElementInstance) -> String {
    instance
        .spec
        .authentication
        .app_secret_ref
        .as_ref()
        .map(|r| format!("Secret {:?}", r.name))
        .unwrap_or_else(|| "the app Secret".into())
}

/// Authorized=False because Dropbox refused the app credentials.
fn invalid_client(instance: &DropboxElementInstance, description: &str) -> Desired {
    Desired::new(
        AUTHORIZED,
        Some(false),
        Reason::InvalidClient,
        format!(
            "Dropbox refused the app key or secret in {}: {description}",
            app_location(instance)
        ),
    )
}

/// `state` parameter of the authorize URL: identifies the instance to the person
/// (and the app's redirect handler) that completes the approval.
fn authorize_state(instance: &DropboxElementInstance) -> String {
    object_key(instance)
}

/// Condition for a transient Dropbox failure.
fn transient_condition(error: &DropboxError, what: &str) -> Desired {
    let reason = if error.retry_after().is_some() {
        Reason::RateLimited
    } else {
        Reason::DropboxUnavailable
    };
    Desired::new(
        AUTHORIZED,
        Some(false),
        reason,
        format!("{what}: {error}; retrying with backoff"),
    )
}

fn token_from_response(
    response: TokenResponse,
    previous: Option<&StoredToken>,
    code_fingerprint: &str,
    issued_at: jiff::Timestamp,
) -> StoredToken {
    let expires_at = response
        .expires_in
        .map(|s| issued_at + jiff::SignedDuration::from_secs(s.min(i64::MAX as u64) as i64));
    StoredToken {
        access_token: response.access_token,
        refresh_token: response
            .refresh_token
            .or_else(|| previous.and_then(|p| p.refresh_token.clone())),
        expires_at,
        account_id: response
            .account_id
            .or_else(|| previous.and_then(|p| p.account_id.clone())),
        scope: response
            .scope
            .or_else(|| previous.and_then(|p| p.scope.clone())),
        code_fingerprint: Some(code_fingerprint.to_owned()),
    }
}

fn token_status(
    instance: &DropboxElementInstance,
    stored: &StoredToken,
    last_refresh: Option<Time>,
) -> TokenStatus {
    TokenStatus {
        secret_name: Some(token::secret_name(&instance.name_any())),
        expires_at: stored.expires_at.map(Time),
        last_refresh_time: last_refresh,
    }
}

/// How long before expiry to refresh: the configured margin (default 5 min), but
/// never more than half the token's lifetime, so very short-lived tokens (tests,
/// unusual deployments) are not refreshed in a tight loop.
fn refresh_at(
    stored: &StoredToken,
    last_refresh: Option<&Time>,
    margin: Duration,
) -> Option<jiff::Timestamp> {
    let expires_at = stored.expires_at?;
    let margin =
        jiff::SignedDuration::try_from(margin).unwrap_or(jiff::SignedDuration::from_secs(300));
    let margin = match last_refresh {
        Some(Time(issued)) if *issued < expires_at => {
            margin.min(expires_at.duration_since(*issued) / 2)
        }
        _ => margin,
    };
    Some(expires_at - margin)
}

fn until(t: jiff::Timestamp) -> Duration {
    Duration::try_from(t.duration_since(now())).unwrap_or(Duration::ZERO)
}

fn account_status(account: crate::dropbox::Account) -> AccountStatus {
    AccountStatus {
        account_id: Some(account.account_id),
        email: account.email,
        display_name: account.name.and_then(|n| n.display_name),
    }
}

async fn apply_token_secret(
    instance: &DropboxElementInstance,
    stored: &StoredToken,
    ctx: &Context,
) -> Result<(), Error> {
    let secret = stored.to_secret(instance);
    let api: Api<Secret> = Api::namespaced(
        ctx.client.clone(),
        &instance.namespace().unwrap_or_default(),
    );
    let written = api
        .patch(
            &token::secret_name(&instance.name_any()),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await?;
    ctx.own_secret_writes.record(&written);
    ctx.secrets.put(written);
    Ok(())
}

/// The oauth2 lifecycle: exchange a new code once, refresh before expiry, and
/// ask for re-authorization when Dropbox no longer accepts the refresh token.
async fn oauth2(
    instance: &DropboxElementInstance,
    prev: &DropboxElementInstanceStatus,
    creds: OAuthCredentials<'_>,
    stored: Option<StoredToken>,
    ctx: &Context,
) -> Result<AuthStep, Error> {
    let authorize_url = ctx.dropbox.authorize_url(
        &creds.app.client_id,
        creds.redirect_uri,
        &authorize_state(instance),
    );
    let exchanged_by_us = prev.code_fingerprint.as_deref() == Some(creds.fingerprint)
        || stored.as_ref().and_then(|s| s.code_fingerprint.as_deref()) == Some(creds.fingerprint);
    if !exchanged_by_us {
        return exchange(instance, prev, creds, stored.as_ref(), authorize_url, ctx).await;
    }

    let prev_authorized = conditions::find(&prev.conditions, AUTHORIZED);
    let prev_reason = prev_authorized.map(|c| c.reason.as_str());
    // Tokens minted from an older code do not make this (spent) code good.
    let stored = stored.filter(|s| {
        s.code_fingerprint
            .as_deref()
            .is_none_or(|f| f == creds.fingerprint)
    });
    let Some(mut stored) = stored else {
        // The code was spent and there are no tokens: keep a permanent verdict
        // about this code as it is, otherwise the token Secret was lost.
        if let Some(c) = prev_authorized
            && matches!(
                c.reason.as_str(),
                "CodeExchangeFailed" | "ReauthorizationRequired" | "CodeAlreadyUsed"
            )
        {
            let reason = match c.reason.as_str() {
                "CodeExchangeFailed" => Reason::CodeExchangeFailed,
                "ReauthorizationRequired" => Reason::ReauthorizationRequired,
                _ => Reason::CodeAlreadyUsed,
            };
            let mut step = AuthStep::from_previous(
                prev,
                Desired::new(AUTHORIZED, Some(false), reason, c.message.clone()),
                Next::WaitForChange,
            );
            step.authorize_url = Some(authorize_url);
            return Ok(step);
        }
        let mut step = AuthStep::from_previous(
            prev,
            Desired::new(
                AUTHORIZED,
                Some(false),
                Reason::CodeAlreadyUsed,
                format!(
                    "The authorization code in {} was already exchanged and its tokens are gone (Secret {:?} \
                     was deleted). Codes are single-use: approve the app again at status.authorizeUrl and \
                     put the new code in the Secret.",
                    code_location(instance),
                    token::secret_name(&instance.name_any())
                ),
            ),
            Next::WaitForChange,
        );
        step.token = None;
        step.authorize_url = Some(authorize_url);
        return Ok(step);
    };

    if prev_reason == Some("ReauthorizationRequired") {
        // Same code, same dead refresh token: nothing to try until a new code arrives.
        let mut step = AuthStep::from_previous(
            prev,
            Desired::new(
                AUTHORIZED,
                Some(false),
                Reason::ReauthorizationRequired,
                prev_authorized
                    .map(|c| c.message.clone())
                    .unwrap_or_default(),
            ),
            Next::WaitForChange,
        );
        step.authorize_url = Some(authorize_url);
        return Ok(step);
    }

    let prev_refresh = prev
        .token
        .as_ref()
        .and_then(|t| t.last_refresh_time.clone());
    let mut last_refresh = prev_refresh.clone();
    let due = refresh_at(&stored, prev_refresh.as_ref(), ctx.config.refresh_margin)
        .is_some_and(|t| t <= now());
    if due {
        let Some(refresh_token) = stored.refresh_token.clone() else {
            let mut step = AuthStep::from_previous(
                prev,
                Desired::new(
                    AUTHORIZED,
                    Some(false),
                    Reason::ReauthorizationRequired,
                    "The access token expires and there is no refresh token to renew it: approve the app \
                     again at status.authorizeUrl (it asks for offline access) and put the new code in the Secret.",
                ),
                Next::WaitForChange,
            );
            step.authorize_url = Some(authorize_url);
            return Ok(step);
        };
        let issued_at = now();
        match ctx
            .dropbox
            .refresh(
                &creds.app.client_id,
                &creds.app.client_secret,
                &refresh_token,
            )
            .await
        {
            Ok(response) => {
                ctx.metrics
                    .token_refreshes
                    .get_or_create(&ResultLabels { result: "success" })
                    .inc();
                stored = token_from_response(response, Some(&stored), creds.fingerprint, issued_at);
                apply_token_secret(instance, &stored, ctx).await?;
                last_refresh = Some(Time(issued_at));
                tracing::info!(instance = %object_key(instance), expires_at = ?stored.expires_at, "access token refreshed");
            }
            Err(error) => {
                ctx.metrics
                    .token_refreshes
                    .get_or_create(&ResultLabels { result: "failure" })
                    .inc();
                let still_valid = stored.expires_at.is_some_and(|t| t > now());
                let (authorized, next, needs_url) = match &error {
                    DropboxError::InvalidGrant { description } => (
                        Desired::new(
                            AUTHORIZED,
                            Some(false),
                            Reason::ReauthorizationRequired,
                            format!(
                                "Dropbox no longer accepts the refresh token ({description}): the user revoked \
                                 access or the app was disconnected. Approve the app again at \
                                 status.authorizeUrl and put the new code in {}.",
                                code_location(instance)
                            ),
                        ),
                        Next::WaitForChange,
                        true,
                    ),
                    DropboxError::InvalidClient { description } => (
                        invalid_client(instance, description),
                        Next::WaitForChange,
                        false,
                    ),
                    e if still_valid => (
                        Desired::new(
                            AUTHORIZED,
                            Some(true),
                            Reason::TokenValid,
                            format!(
                                "The access token is still valid; refreshing it failed ({e}), retrying"
                            ),
                        ),
                        Next::Backoff {
                            at_least: e.retry_after(),
                        },
                        false,
                    ),
                    e => (
                        transient_condition(e, "Refreshing the access token failed"),
                        Next::Backoff {
                            at_least: e.retry_after(),
                        },
                        false,
                    ),
                };
                let mut step = AuthStep::from_previous(prev, authorized, next);
                if needs_url {
                    step.authorize_url = Some(authorize_url);
                }
                return Ok(step);
            }
        }
    }

    let mut step = AuthStep::from_previous(prev, token_valid(&stored), Next::WaitForChange);
    step.access_token = Some(SecretString(stored.access_token.clone()));
    step.token = Some(token_status(instance, &stored, last_refresh.clone()));
    step.code_fingerprint = Some(creds.fingerprint.to_owned());
    if let Err(next) = ensure_account(&mut step, &stored, ctx).await {
        step.next = next;
        return Ok(step);
    }
    step.next = match refresh_at(&stored, last_refresh.as_ref(), ctx.config.refresh_margin) {
        Some(at) => Next::After(until(at)),
        None => Next::After(ctx.config.resync_interval),
    };
    Ok(step)
}

fn token_valid(stored: &StoredToken) -> Desired {
    let message = match stored.expires_at {
        Some(t) => format!("Access token valid until {t}; it is refreshed before then"),
        None => "Access token valid (it does not expire)".to_owned(),
    };
    Desired::new(AUTHORIZED, Some(true), Reason::TokenValid, message)
}

/// Fills `status.account` when it is unknown or belongs to another account.
async fn ensure_account(
    step: &mut AuthStep,
    stored: &StoredToken,
    ctx: &Context,
) -> Result<(), Next> {
    let known = step.account.as_ref().and_then(|a| a.account_id.as_ref());
    if known.is_some() && known == stored.account_id.as_ref() {
        return Ok(());
    }
    match ctx.dropbox.current_account(&stored.access_token).await {
        Ok(account) => {
            step.account = Some(account_status(account));
            Ok(())
        }
        Err(error) => {
            tracing::warn!(error = %error, "reading the Dropbox account failed; retrying");
            step.account = stored.account_id.clone().map(|id| AccountStatus {
                account_id: Some(id),
                ..Default::default()
            });
            Err(Next::Backoff {
                at_least: error.retry_after(),
            })
        }
    }
}

/// Exchanges a code this instance has not exchanged before.
async fn exchange(
    instance: &DropboxElementInstance,
    prev: &DropboxElementInstanceStatus,
    creds: OAuthCredentials<'_>,
    previous_token: Option<&StoredToken>,
    authorize_url: String,
    ctx: &Context,
) -> Result<AuthStep, Error> {
    let uid = instance.uid().unwrap_or_default();
    if let Err(holder) = ctx.codes.claim(creds.fingerprint, &uid, &ctx.store) {
        let mut step = AuthStep::from_previous(
            prev,
            Desired::new(
                AUTHORIZED,
                Some(false),
                Reason::CodeAlreadyUsed,
                format!(
                    "The authorization code in {} was already exchanged by instance {holder}. Codes are \
                     single-use: approve the app again at status.authorizeUrl and put the new code in the Secret.",
                    code_location(instance)
                ),
            ),
            Next::WaitForChange,
        );
        step.authorize_url = Some(authorize_url);
        return Ok(step);
    }

    let issued_at = now();
    let result = ctx
        .dropbox
        .exchange_code(
            &creds.app.client_id,
            &creds.app.client_secret,
            &creds.code.0,
            creds.redirect_uri,
        )
        .await;
    let outcome = if result.is_ok() { "success" } else { "failure" };
    ctx.metrics
        .code_exchanges
        .get_or_create(&ResultLabels { result: outcome })
        .inc();
    match result {
        Ok(response) => {
            let stored = token_from_response(response, None, creds.fingerprint, issued_at);
            apply_token_secret(instance, &stored, ctx).await?;
            tracing::info!(instance = %object_key(instance), account_id = ?stored.account_id, "authorization code exchanged");
            let mut step = AuthStep::from_previous(prev, token_valid(&stored), Next::WaitForChange);
            step.access_token = Some(SecretString(stored.access_token.clone()));
            step.code_fingerprint = Some(creds.fingerprint.to_owned());
            step.token = Some(token_status(instance, &stored, Some(Time(issued_at))));
            step.account = None;
            if let Err(next) = ensure_account(&mut step, &stored, ctx).await {
                step.next = next;
                return Ok(step);
            }
            step.next = match refresh_at(&stored, Some(&Time(issued_at)), ctx.config.refresh_margin)
            {
                Some(at) => Next::After(until(at)),
                None => Next::After(ctx.config.resync_interval),
            };
            Ok(step)
        }
        Err(error) => {
            let (authorized, next, spent) = match &error {
                // Dropbox looked at the code and refused it: it is spent either way.
                DropboxError::InvalidGrant { description }
                | DropboxError::OAuth { description, .. } => (
                    Desired::new(
                        AUTHORIZED,
                        Some(false),
                        Reason::CodeExchangeFailed,
                        format!(
                            "Dropbox refused the authorization code in {}: {description}. Approve the app again \
                             at status.authorizeUrl and put the new code in the Secret.",
                            code_location(instance)
                        ),
                    ),
                    Next::WaitForChange,
                    true,
                ),
                // The client was refused before the code was looked at: the code may
                // still be good once the app credentials are fixed.
                DropboxError::InvalidClient { description } => (
                    invalid_client(instance, description),
                    Next::WaitForChange,
                    false,
                ),
                // 429/5xx/unreachable: the code was not consumed; try again later.
                e => (
                    transient_condition(e, "Exchanging the authorization code failed"),
                    Next::Backoff {
                        at_least: e.retry_after(),
                    },
                    false,
                ),
            };
            if !spent {
                ctx.codes.release(creds.fingerprint, &uid);
            }
            let mut step = AuthStep::from_previous(prev, authorized, next);
            if spent {
                step.code_fingerprint = Some(creds.fingerprint.to_owned());
                step.authorize_url = Some(authorize_url);
                // Tokens of an earlier code stay usable until they stop working.
                if let Some(old) = previous_token {
                    step.token = Some(token_status(
                        instance,
                        old,
                        prev.token
                            .as_ref()
                            .and_then(|t| t.last_refresh_time.clone()),
                    ));
                }
            }
            Ok(step)
        }
    }
}

/// apiKey: verify the long-lived token and read the account.
async fn api_key(
    prev: &DropboxElementInstanceStatus,
    token: &SecretString,
    ctx: &Context,
) -> AuthStep {
    match ctx.dropbox.current_account(&token.0).await {
        Ok(account) => {
            let mut step = AuthStep::from_previous(
                prev,
                Desired::new(
                    AUTHORIZED,
                    Some(true),
                    Reason::TokenValid,
                    "The access token is accepted by Dropbox",
                ),
                Next::After(ctx.config.resync_interval),
            );
            step.account = Some(account_status(account));
            step.token = None;
            step.code_fingerprint = None;
            step.access_token = Some(token.clone());
            step
        }
        Err(DropboxError::Unauthorized { tag }) => AuthStep::from_previous(
            prev,
            Desired::new(
                AUTHORIZED,
                Some(false),
                Reason::InvalidApiKey,
                format!(
                    "Dropbox refused the access token in the apiKey Secret ({tag}); put a valid token in the Secret"
                ),
            ),
            Next::WaitForChange,
        ),
        Err(e) => {
            let at_least = e.retry_after();
            AuthStep::from_previous(
                prev,
                transient_condition(&e, "Verifying the access token failed"),
                Next::Backoff { at_least },
            )
        }
    }
}

/// The full desired status (pure). Fields written by the ingress
/// (EventsDelivering, events.lastDeliveryTime) are carried over from the current
/// status so the comparison sees them; [`write_status`] does not send them.
pub fn desired_status(
    instance: &DropboxElementInstance,
    step: &AuthStep,
    events: Option<&EventsStep>,
    now: &Time,
) -> DropboxElementInstanceStatus {
    let prev = instance.status.clone().unwrap_or_default();
    let generation = instance.metadata.generation;
    let existing = &prev.conditions;

    let delivering = events.and_then(|_| conditions::find(existing, EVENTS_DELIVERING));
    let ready = if !step.authorized.is_true() {
        Desired::new(
            READY,
            Some(false),
            step.authorized.reason,
            step.authorized.message.clone(),
        )
    } else if let Some(e) = events.filter(|e| !e.ready.is_true()) {
        Desired::new(READY, Some(false), e.ready.reason, e.ready.message.clone())
    } else if let Some(d) = delivering.filter(|d| d.status == "False") {
        Desired::new(
            READY,
            Some(false),
            delivery_reason(&d.reason),
            format!("Event delivery is failing: {}", d.message),
        )
    } else {
        Desired::new(
            READY,
            Some(true),
            Reason::Ready,
            "The instance is connected to Dropbox",
        )
    };
    let mut conditions = vec![
        step.authorized.to_condition(existing, generation, now),
        ready.to_condition(existing, generation, now),
    ];
    if let Some(e) = events {
        conditions.push(e.ready.to_condition(existing, generation, now));
    }
    if let Some(d) = delivering {
        conditions.push(d.clone());
    }
    DropboxElementInstanceStatus {
        observed_generation: generation,
        phase: Some(conditions::phase(&step.authorized, &ready)),
        conditions,
        account: step.account.clone(),
        token: step.token.clone(),
        code_fingerprint: step.code_fingerprint.clone(),
        authorize_url: step.authorize_url.clone(),
        events: events.map(|e| EventsStatus {
            webhook_path: e.webhook_path.clone(),
            last_delivery_time: prev
                .events
                .as_ref()
                .and_then(|p| p.last_delivery_time.clone()),
        }),
    }
}

fn delivery_reason(reason: &str) -> Reason {
    match reason {
        "CallbackRejected" => Reason::CallbackRejected,
        "CallbackForbidden" => Reason::CallbackForbidden,
        _ => Reason::CallbackUnreachable,
    }
}

/// Server-side apply of the status subresource with the controller's field
/// manager; ingress-owned fields are left out so the two never fight.
async fn write_status(
    instance: &DropboxElementInstance,
    desired: &DropboxElementInstanceStatus,
    ctx: &Context,
) -> Result<(), Error> {
    let mut owned = desired.clone();
    owned.conditions.retain(|c| c.type_ != EVENTS_DELIVERING);
    if let Some(events) = owned.events.as_mut() {
        events.last_delivery_time = None;
    }
    let patch = json!({
        "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
        "kind": "DropboxElementInstance",
        "status": owned,
    });
    let api: Api<DropboxElementInstance> = Api::namespaced(
        ctx.client.clone(),
        &instance.namespace().unwrap_or_default(),
    );
    let written = api
        .patch_status(
            &instance.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    ctx.written.record(instance, &written);
    Ok(())
}

/// A Kubernetes Event for a change a person should see: Ready (or, while Ready
/// holds its status, Authorized) changing status or reason. The first success of a
/// new instance gets none (status says it); problems are Warnings, recoveries
/// Normal.
async fn publish_transitions(
    instance: &DropboxElementInstance,
    prev: &DropboxElementInstanceStatus,
    desired: &DropboxElementInstanceStatus,
    ctx: &Context,
) {
    let changed = |type_: &str| {
        let new = conditions::find(&desired.conditions, type_)?;
        let old = conditions::find(&prev.conditions, type_);
        let same = old.is_some_and(|o| o.status == new.status && o.reason == new.reason);
        let first_success = old.is_none() && new.status == "True";
        (!same && !first_success).then_some(new)
    };
    let Some(condition) = changed(READY).or_else(|| changed(AUTHORIZED)) else {
        return;
    };
    let event = KubeEvent {
        type_: if condition.status == "True" {
            EventType::Normal
        } else {
            EventType::Warning
        },
        reason: condition.reason.clone(),
        note: Some(condition.message.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: None,
    };
    if let Err(e) = ctx
        .recorder
        .publish(&event, &instance.object_ref(&()))
        .await
    {
        tracing::warn!(error = %e, "could not publish a Kubernetes Event");
    }
}

/// Deletion: revoke the token once, within `revoke_timeout`, then let the
/// finalizer go whatever happened (deletion never hangs on Dropbox).
async fn cleanup(instance: &DropboxElementInstance, ctx: &Context) -> Result<Action, Error> {
    let key = object_key(instance);
    ctx.metrics.token_expiry.remove(
        &instance.namespace().unwrap_or_default(),
        &instance.name_any(),
    );
    ctx.backoff.reset(&key);
    ctx.written.forget(instance);
    let namespace = instance.namespace().unwrap_or_default();
    let token_secret = token::secret_name(&instance.name_any());
    ctx.own_secret_writes.forget(&namespace, &token_secret);
    ctx.secrets.forget(&namespace, &token_secret);
    let secrets: Api<Secret> = Api::namespaced(
        ctx.client.clone(),
        &instance.namespace().unwrap_or_default(),
    );
    let stored = match secrets
        .get_opt(&token::secret_name(&instance.name_any()))
        .await
    {
        Ok(secret) => secret.and_then(|s| StoredToken::from_secret(&s, instance)),
        Err(e) => {
            tracing::warn!(instance = %key, error = %e, "could not read the token Secret; nothing to revoke");
            None
        }
    };
    // Best effort: the orphan sweep removes what is left, deletion never waits on it.
    if let Err(e) = (Projector {
        client: &ctx.client,
        dropbox: &ctx.dropbox,
        memo: &ctx.projections,
        namespace: &ctx.ingress.settings.namespace,
    })
    .remove(instance)
    .await
    {
        tracing::warn!(instance = %key, error = %e, "could not remove the instance's projected objects; the sweep will");
    }
    let Some(stored) = stored else {
        ctx.metrics
            .revocations
            .get_or_create(&ResultLabels { result: "no_token" })
            .inc();
        return Ok(Action::await_change());
    };
    let outcome =
        tokio::time::timeout(ctx.config.revoke_timeout, revoke(instance, &stored, ctx)).await;
    let (result, warning) = match outcome {
        Ok(Ok(())) => ("revoked", None),
        Ok(Err(DropboxError::Unauthorized { .. } | DropboxError::InvalidGrant { .. })) => {
            ("already_invalid", None)
        }
        Ok(Err(e)) => (
            "failed",
            Some(format!("Revoking the Dropbox token failed: {e}")),
        ),
        Err(_) => (
            "timeout",
            Some(format!(
                "Revoking the Dropbox token did not finish within {}s",
                ctx.config.revoke_timeout.as_secs()
            )),
        ),
    };
    ctx.metrics
        .revocations
        .get_or_create(&ResultLabels { result })
        .inc();
    if let Some(message) = warning {
        tracing::warn!(instance = %key, "{message}; deletion continues");
        let event = KubeEvent {
            type_: EventType::Warning,
            reason: "RevokeFailed".into(),
            note: Some(format!(
                "{message}. The instance is deleted anyway; disconnect the app in the Dropbox account settings if \
                 the token must not stay valid."
            )),
            action: "Revoke".into(),
            secondary: None,
        };
        if let Err(e) = ctx
            .recorder
            .publish(&event, &instance.object_ref(&()))
            .await
        {
            tracing::warn!(error = %e, "could not publish a Kubernetes Event");
        }
    } else {
        tracing::info!(instance = %key, result, "token revoked on deletion");
    }
    Ok(Action::await_change())
}

/// Revokes the token family. An expired access token cannot call revoke, so it
/// is refreshed first when the app credentials are still readable.
async fn revoke(
    instance: &DropboxElementInstance,
    stored: &StoredToken,
    ctx: &Context,
) -> Result<(), DropboxError> {
    let expired = stored.expires_at.is_some_and(|t| t <= now());
    let mut access_token = stored.access_token.clone();
    if expired
        && let Some(refresh_token) = &stored.refresh_token
        && let Ok(Ok(Inputs { app: Some(app), .. })) =
            inputs::read(&ctx.client, &ctx.secrets, instance).await
    {
        access_token = ctx
            .dropbox
            .refresh(&app.client_id, &app.client_secret, refresh_token)
            .await?
            .access_token;
    }
    ctx.dropbox.revoke(&access_token).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(expires_at: &str) -> StoredToken {
        StoredToken {
            access_token: "a".into(),
            refresh_token: Some("r".into()),
            expires_at: Some(expires_at.parse().expect("ts")),
            account_id: None,
            scope: None,
            code_fingerprint: None,
        }
    }

    #[test]
    fn refresh_is_five_minutes_before_expiry_for_normal_tokens() {
        let t = stored("2026-01-01T04:00:00Z");
        let issued = Time("2026-01-01T00:00:00Z".parse().expect("ts"));
        let at = refresh_at(&t, Some(&issued), Duration::from_secs(300)).expect("expires");
        assert_eq!(at.to_string(), "2026-01-01T03:55:00Z");
    }

    #[test]
    fn short_lived_tokens_refresh_at_half_life() {
        let t = stored("2026-01-01T00:00:20Z");
        let issued = Time("2026-01-01T00:00:00Z".parse().expect("ts"));
        let at = refresh_at(&t, Some(&issued), Duration::from_secs(300)).expect("expires");
        assert_eq!(at.to_string(), "2026-01-01T00:00:10Z");
    }
}
