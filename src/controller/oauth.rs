//! Step 2 of a reconcile: the OAuth lifecycle (README, "Conditions and reasons").
//!
//! - oauth2: exchange a new code exactly once, refresh before expiry, ask for
//!   re-authorization when Dropbox no longer accepts the refresh token.
//! - apiKey: verify the long-lived token.
//!
//! A code is single-use and never burned by us: before it is sent, the token
//! Secret write is proven possible (a server-side dry run) and the code is
//! recorded as sent on the instance (see `finalizer::record_code`). After any
//! answer, or no answer at all, it counts as spent and is never sent again, also
//! after a restart; only answers that prove Dropbox did not consume it (429,
//! 5xx, a connection that was never made) give it back. Tokens Dropbox returned
//! but the API server did not store yet are kept in memory and stored first.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};

use super::Context;
use super::finalizer;
use super::inputs::{AppCredentials, SecretString};
use super::reconcile::{Error, FIELD_MANAGER, Next, now, object_key};
use super::token::{self, StoredToken};
use crate::api::{
    AccountStatus, DropboxElementInstance, DropboxElementInstanceStatus, TokenStatus,
};
use crate::conditions::{self, AUTHORIZED, Desired, Reason};
use crate::dropbox::{DropboxError, TokenResponse};
use crate::metrics::ResultLabels;

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
    pub fn from_previous(
        prev: &DropboxElementInstanceStatus,
        authorized: Desired,
        next: Next,
    ) -> Self {
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

/// The referenced OAuth credentials of an instance. `code` is None when the
/// code Secret is gone (a spent code may be deleted) or not there yet.
#[derive(Clone, Copy)]
pub struct OAuthCredentials<'a> {
    pub app: &'a AppCredentials,
    pub code: Option<(&'a SecretString, &'a str)>,
    pub code_verifier: Option<&'a str>,
    pub redirect_uri: Option<&'a str>,
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

/// Condition for a Dropbox failure that is not the credentials' fault.
pub fn dropbox_condition(error: &DropboxError, what: &str) -> Desired {
    let reason = match error {
        DropboxError::RateLimited { .. } => Reason::RateLimited,
        DropboxError::MissingScope { .. } => Reason::MissingScope,
        _ => Reason::DropboxUnavailable,
    };
    let hint = match error {
        DropboxError::MissingScope { scope } => format!(
            "; enable the permission {scope:?} for the app in the Dropbox App Console (tokens issued \
             before that need a new approval)"
        ),
        _ => "; retrying with backoff".to_owned(),
    };
    Desired::new(
        AUTHORIZED,
        Some(false),
        reason,
        format!("{what}: {error}{hint}"),
    )
}

fn token_from_response(
    response: TokenResponse,
    previous: Option<&StoredToken>,
    code_fingerprint: Option<&str>,
    issued_at: jiff::Timestamp,
) -> StoredToken {
    // Checked: an absurd expires_in counts as "expires now" (refreshed soon), never a panic.
    let expires_at = response.expires_in.map(|s| {
        i64::try_from(s)
            .ok()
            .and_then(|s| {
                issued_at
                    .checked_add(jiff::SignedDuration::from_secs(s))
                    .ok()
            })
            .unwrap_or(issued_at)
    });
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
        code_fingerprint: code_fingerprint
            .map(str::to_owned)
            .or_else(|| previous.and_then(|p| p.code_fingerprint.clone())),
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
pub fn refresh_at(
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
    Some(expires_at.checked_sub(margin).unwrap_or(expires_at))
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
    dry_run: bool,
) -> Result<(), kube::Error> {
    let secret = stored.to_secret(instance);
    let api: Api<Secret> = Api::namespaced(
        ctx.client.clone(),
        &instance.namespace().unwrap_or_default(),
    );
    let mut pp = PatchParams::apply(FIELD_MANAGER).force();
    if dry_run {
        pp = pp.dry_run();
    }
    let written = api
        .patch(
            &token::secret_name(&instance.name_any()),
            &pp,
            &Patch::Apply(&secret),
        )
        .await?;
    if !dry_run {
        ctx.own_secret_writes.record(&written);
        ctx.secrets.put(written);
    }
    Ok(())
}

/// Stores tokens; when the API server refuses, keeps them in memory so the
/// next reconcile stores them before anything else (the code is spent: these
/// tokens are all there is).
async fn store_tokens(
    instance: &DropboxElementInstance,
    stored: &StoredToken,
    ctx: &Context,
) -> Result<(), kube::Error> {
    let uid = instance.uid().unwrap_or_default();
    match apply_token_secret(instance, stored, ctx, false).await {
        Ok(()) => {
            ctx.unstored.lock().expect("unstored lock").remove(&uid);
            Ok(())
        }
        Err(e) => {
            ctx.unstored
                .lock()
                .expect("unstored lock")
                .insert(uid, stored.clone());
            Err(e)
        }
    }
}

fn awaiting(instance: &DropboxElementInstance, prev: &DropboxElementInstanceStatus) -> AuthStep {
    AuthStep::from_previous(
        prev,
        Desired::new(
            AUTHORIZED,
            Some(false),
            Reason::AwaitingAuthorization,
            format!(
                "No authorization code yet: run `dropbox-operator connect`, or approve the app at \
                 status.authorizeUrl and put the code in {}",
                code_location(instance)
            ),
        ),
        Next::WaitForChange,
    )
}

/// The oauth2 lifecycle: exchange a new code once, refresh before expiry, and
/// ask for re-authorization when Dropbox no longer accepts the refresh token.
pub async fn oauth2(
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
    let uid = instance.uid().unwrap_or_default();
    // Tokens Dropbox gave us that are not stored yet come first.
    let unstored = ctx
        .unstored
        .lock()
        .expect("unstored lock")
        .get(&uid)
        .cloned();
    let stored = match unstored {
        Some(tokens) => {
            if let Err(e) = store_tokens(instance, &tokens, ctx).await {
                let mut step = AuthStep::from_previous(
                    prev,
                    Desired::new(
                        AUTHORIZED,
                        Some(false),
                        Reason::TokensNotStored,
                        format!(
                            "Dropbox issued tokens but the API server refuses the token Secret ({e}); \
                             they are kept in memory and stored as soon as it accepts them"
                        ),
                    ),
                    Next::Backoff { at_least: None },
                );
                step.code_fingerprint = tokens.code_fingerprint.clone();
                return Ok(step);
            }
            Some(tokens)
        }
        None => stored,
    };

    let Some((code, fingerprint)) = creds.code else {
        // No code (not there yet, or a spent one was deleted): keep going on the
        // tokens, if there are any.
        return match stored {
            Some(stored) => {
                refresh_or_keep(instance, prev, creds, stored, None, authorize_url, ctx).await
            }
            None => {
                let mut step = awaiting(instance, prev);
                step.authorize_url = Some(authorize_url);
                Ok(step)
            }
        };
    };
    if !super::reconcile::code_spent(instance, prev, stored.as_ref(), fingerprint, ctx) {
        return exchange(
            instance,
            prev,
            creds,
            code,
            fingerprint,
            stored.as_ref(),
            authorize_url,
            ctx,
        )
        .await;
    }

    // Tokens minted from an older code do not make this (spent) code good.
    let stored = stored.filter(|s| {
        s.code_fingerprint
            .as_deref()
            .is_none_or(|f| f == fingerprint)
    });
    let Some(stored) = stored else {
        return Ok(spent_without_tokens(
            instance,
            prev,
            fingerprint,
            authorize_url,
        ));
    };
    refresh_or_keep(
        instance,
        prev,
        creds,
        stored,
        Some(fingerprint),
        authorize_url,
        ctx,
    )
    .await
}

/// A code that was sent and left no tokens: say why, and how to approve again.
fn spent_without_tokens(
    instance: &DropboxElementInstance,
    prev: &DropboxElementInstanceStatus,
    fingerprint: &str,
    authorize_url: String,
) -> AuthStep {
    let prev_authorized = conditions::find(&prev.conditions, AUTHORIZED);
    // A permanent verdict about this code stays as it is.
    let kept = prev_authorized.and_then(|c| match c.reason.as_str() {
        "CodeExchangeFailed" => Some(Reason::CodeExchangeFailed),
        "ReauthorizationRequired" => Some(Reason::ReauthorizationRequired),
        "CodeAlreadyUsed" => Some(Reason::CodeAlreadyUsed),
        "TokensNotStored" => Some(Reason::TokensNotStored),
        _ => None,
    });
    let authorized = match (kept, prev_authorized) {
        (Some(reason), Some(c)) => Desired::new(AUTHORIZED, Some(false), reason, c.message.clone()),
        _ if prev.code_fingerprint.as_deref() == Some(fingerprint) => Desired::new(
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
        _ => Desired::new(
            AUTHORIZED,
            Some(false),
            Reason::TokensNotStored,
            format!(
                "The authorization code in {} was sent to Dropbox, but no tokens were stored (the \
                 answer was lost or the controller stopped in between). Codes are single-use and this one \
                 is never sent again: approve the app again at status.authorizeUrl and put the new code \
                 in the Secret.",
                code_location(instance)
            ),
        ),
    };
    let mut step = AuthStep::from_previous(prev, authorized, Next::WaitForChange);
    step.code_fingerprint = Some(fingerprint.to_owned());
    step.token = None;
    step.authorize_url = Some(authorize_url);
    step
}

/// Tokens exist: refresh them when due, else report them valid.
async fn refresh_or_keep(
    instance: &DropboxElementInstance,
    prev: &DropboxElementInstanceStatus,
    creds: OAuthCredentials<'_>,
    mut stored: StoredToken,
    fingerprint: Option<&str>,
    authorize_url: String,
    ctx: &Context,
) -> Result<AuthStep, Error> {
    let prev_authorized = conditions::find(&prev.conditions, AUTHORIZED);
    if prev_authorized.map(|c| c.reason.as_str()) == Some("ReauthorizationRequired") {
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
                stored = token_from_response(response, Some(&stored), None, issued_at);
                store_tokens(instance, &stored, ctx).await?;
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
                        dropbox_condition(e, "Refreshing the access token failed"),
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
    step.code_fingerprint = fingerprint
        .map(str::to_owned)
        .or_else(|| stored.code_fingerprint.clone())
        .or_else(|| prev.code_fingerprint.clone());
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
            if let DropboxError::MissingScope { .. } = error {
                step.authorized = dropbox_condition(&error, "Reading the Dropbox account failed");
                step.access_token = None;
            }
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

/// Exchanges a code this instance has not sent before.
#[allow(clippy::too_many_arguments)]
async fn exchange(
    instance: &DropboxElementInstance,
    prev: &DropboxElementInstanceStatus,
    creds: OAuthCredentials<'_>,
    code: &SecretString,
    fingerprint: &str,
    previous_token: Option<&StoredToken>,
    authorize_url: String,
    ctx: &Context,
) -> Result<AuthStep, Error> {
    let uid = instance.uid().unwrap_or_default();
    if let Err(holder) = ctx.codes.claim(fingerprint, &uid, &ctx.store) {
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

    // 1. Everything that must succeed afterwards is possible: the token Secret
    //    would be admitted (quota, admission policies, names and labels).
    let probe = StoredToken {
        access_token: "probe".into(),
        refresh_token: Some("probe".into()),
        expires_at: Some(now()),
        account_id: Some("probe".into()),
        scope: Some("probe".into()),
        code_fingerprint: Some(fingerprint.to_owned()),
    };
    if let Err(e) = apply_token_secret(instance, &probe, ctx, true).await {
        ctx.codes.release(fingerprint, &uid);
        let step = AuthStep::from_previous(
            prev,
            Desired::new(
                AUTHORIZED,
                Some(false),
                Reason::TokensNotStored,
                format!(
                    "The API server would refuse the token Secret ({e}); the authorization code is kept, \
                     unsent, until it can be stored"
                ),
            ),
            Next::Backoff { at_least: None },
        );
        return Ok(step);
    }
    // 2. The code is recorded as sent before it is (with the finalizer, one write).
    let api: Api<DropboxElementInstance> = Api::namespaced(
        ctx.client.clone(),
        &instance.namespace().unwrap_or_default(),
    );
    let before = finalizer::code_sent(instance, ctx);
    if let Err(e) = finalizer::record_code(&api, instance, Some(fingerprint), ctx).await {
        ctx.codes.release(fingerprint, &uid);
        return Err(e.into());
    }

    // 3. Send it.
    let issued_at = now();
    let result = ctx
        .dropbox
        .exchange_code(
            &creds.app.client_id,
            &creds.app.client_secret,
            &code.0,
            creds.redirect_uri,
            creds.code_verifier,
        )
        .await;
    let outcome = if result.is_ok() { "success" } else { "failure" };
    ctx.metrics
        .code_exchanges
        .get_or_create(&ResultLabels { result: outcome })
        .inc();
    let response = match result {
        Ok(response) => response,
        Err(error) => {
            return exchange_failed(
                instance,
                prev,
                fingerprint,
                before,
                error,
                authorize_url,
                previous_token,
                ctx,
                &api,
            )
            .await;
        }
    };
    let stored = token_from_response(response, None, Some(fingerprint), issued_at);
    if let Err(e) = store_tokens(instance, &stored, ctx).await {
        tracing::warn!(instance = %object_key(instance), error = %e, "storing fresh tokens failed; kept in memory, retrying");
        let mut step = AuthStep::from_previous(
            prev,
            Desired::new(
                AUTHORIZED,
                Some(false),
                Reason::TokensNotStored,
                format!(
                    "Dropbox issued tokens but the API server refused the token Secret ({e}); they are kept \
                     in memory and stored as soon as it accepts them"
                ),
            ),
            Next::Backoff { at_least: None },
        );
        step.code_fingerprint = Some(fingerprint.to_owned());
        return Ok(step);
    }
    tracing::info!(instance = %object_key(instance), account_id = ?stored.account_id, "authorization code exchanged");
    let mut step = AuthStep::from_previous(prev, token_valid(&stored), Next::WaitForChange);
    step.access_token = Some(SecretString(stored.access_token.clone()));
    step.code_fingerprint = Some(fingerprint.to_owned());
    step.token = Some(token_status(instance, &stored, Some(Time(issued_at))));
    step.account = None;
    if let Err(next) = ensure_account(&mut step, &stored, ctx).await {
        step.next = next;
        return Ok(step);
    }
    step.next = match refresh_at(&stored, Some(&Time(issued_at)), ctx.config.refresh_margin) {
        Some(at) => Next::After(until(at)),
        None => Next::After(ctx.config.resync_interval),
    };
    Ok(step)
}

/// Dropbox did not give tokens for a code. Only an answer that proves the code
/// was not consumed gives it back; anything else spends it.
#[allow(clippy::too_many_arguments)]
async fn exchange_failed(
    instance: &DropboxElementInstance,
    prev: &DropboxElementInstanceStatus,
    fingerprint: &str,
    marker_before: Option<String>,
    error: DropboxError,
    authorize_url: String,
    previous_token: Option<&StoredToken>,
    ctx: &Context,
    api: &Api<DropboxElementInstance>,
) -> Result<AuthStep, Error> {
    let uid = instance.uid().unwrap_or_default();
    // The client was refused before the code was looked at, or Dropbox said it
    // did nothing: the code is still good.
    let not_consumed =
        error.proves_not_consumed() || matches!(error, DropboxError::InvalidClient { .. });
    if not_consumed {
        finalizer::record_code(api, instance, marker_before.as_deref(), ctx).await?;
        ctx.codes.release(fingerprint, &uid);
        let (authorized, next) = match &error {
            DropboxError::InvalidClient { description } => {
                (invalid_client(instance, description), Next::WaitForChange)
            }
            e => (
                dropbox_condition(e, "Exchanging the authorization code failed"),
                Next::Backoff {
                    at_least: e.retry_after(),
                },
            ),
        };
        return Ok(AuthStep::from_previous(prev, authorized, next));
    }
    let authorized = match &error {
        DropboxError::InvalidGrant { description } | DropboxError::OAuth { description, .. } => {
            Desired::new(
                AUTHORIZED,
                Some(false),
                Reason::CodeExchangeFailed,
                format!(
                    "Dropbox refused the authorization code in {}: {description}. Approve the app again \
                     at status.authorizeUrl and put the new code in the Secret.",
                    code_location(instance)
                ),
            )
        }
        e => Desired::new(
            AUTHORIZED,
            Some(false),
            Reason::TokensNotStored,
            format!(
                "The authorization code in {} was sent but Dropbox's answer was lost ({e}); the code may \
                 have been used, so it is never sent again. Approve the app again at status.authorizeUrl \
                 and put the new code in the Secret.",
                code_location(instance)
            ),
        ),
    };
    let mut step = AuthStep::from_previous(prev, authorized, Next::WaitForChange);
    step.code_fingerprint = Some(fingerprint.to_owned());
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
    Ok(step)
}

/// apiKey: verify the long-lived token and read the account.
pub async fn api_key(
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
        // 401 for a token Dropbox does not know, 400 for one it cannot even read.
        Err(e @ (DropboxError::Unauthorized { .. } | DropboxError::Api { status: 400, .. })) => {
            AuthStep::from_previous(
                prev,
                Desired::new(
                    AUTHORIZED,
                    Some(false),
                    Reason::InvalidApiKey,
                    format!(
                        "Dropbox refused the access token in the apiKey Secret ({}); put a valid token in the Secret",
                        e.tag().unwrap_or("malformed token")
                    ),
                ),
                Next::WaitForChange,
            )
        }
        Err(e) => {
            let at_least = e.retry_after();
            AuthStep::from_previous(
                prev,
                dropbox_condition(&e, "Verifying the access token failed"),
                Next::Backoff { at_least },
            )
        }
    }
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
