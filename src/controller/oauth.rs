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

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};

use super::Context;
use super::inputs::{AppCredentials, SecretString};
use super::reconcile::{Error, FIELD_MANAGER, Next, now, object_key};
use super::token::{self, StoredToken, refresh_at, token_from_response, token_status, until};
use crate::api::{
    AccountStatus, DropboxElementInstance, DropboxElementInstanceStatus, TokenStatus,
};
use crate::conditions::{self, AUTHORIZED, Desired, Reason};
use crate::dropbox::DropboxError;
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
    /// `spec.authentication.callbackUrl`, for the authorize link in status.
    pub redirect_uri: Option<&'a str>,
    /// The redirect URI sent with the code (see `inputs::Credentials`).
    pub exchange_redirect_uri: Option<&'a str>,
}

pub(super) fn code_location(instance: &DropboxElementInstance) -> String {
    instance
        .spec
        .authentication
        .code_secret_ref
        .as_ref()
        .map(|r| format!("Secret {:?} key {:?}", r.name, r.key))
        .unwrap_or_else(|| "the code Secret".into())
}

/// How a person approves the app again: `connect` first, the raw way second
/// (README, "Connect an account in one command").
pub(super) fn reapprove_hint(instance: &DropboxElementInstance) -> String {
    format!(
        "Run `kubectl dropbox connect {} -n {}`, or approve the app again at status.authorizeUrl \
         and put the new code in {}.",
        instance.name_any(),
        instance.namespace().unwrap_or_default(),
        code_location(instance)
    )
}

pub(super) fn app_location(instance: &DropboxElementInstance) -> String {
    instance
        .spec
        .authentication
        .app_secret_ref
        .as_ref()
        .map(|r| format!("Secret {:?}", r.name))
        .unwrap_or_else(|| "the app Secret".into())
}

/// Authorized=False because Dropbox refused the app credentials.
pub(super) fn invalid_client(instance: &DropboxElementInstance, description: &str) -> Desired {
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
pub(super) fn authorize_state(instance: &DropboxElementInstance) -> String {
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

pub(super) fn account_status(account: crate::dropbox::Account) -> AccountStatus {
    AccountStatus {
        account_id: Some(account.account_id),
        email: account.email,
        display_name: account.name.and_then(|n| n.display_name),
    }
}

pub(super) async fn apply_token_secret(
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
pub(super) async fn store_tokens(
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

/// Tokens Dropbox issued that the API server refused: kept in memory, retried.
pub(super) fn kept_in_memory(
    prev: &DropboxElementInstanceStatus,
    fingerprint: Option<String>,
    error: &kube::Error,
) -> AuthStep {
    let mut step = AuthStep::from_previous(
        prev,
        Desired::new(
            AUTHORIZED,
            Some(false),
            Reason::TokensNotStored,
            format!(
                "Dropbox issued tokens but the API server refused the token Secret ({error}); they are \
                 kept in memory and stored as soon as it accepts them"
            ),
        ),
        Next::Backoff { at_least: None },
    );
    step.code_fingerprint = fingerprint;
    step
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
                return Ok(kept_in_memory(prev, tokens.code_fingerprint.clone(), &e));
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
        return super::exchange::exchange(
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
        return Ok(super::exchange::spent_without_tokens(
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
                                 access or the app was disconnected. {}",
                                reapprove_hint(instance)
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

pub(super) fn token_valid(stored: &StoredToken) -> Desired {
    let message = match stored.expires_at {
        Some(t) => format!("Access token valid until {t}; it is refreshed before then"),
        None => "Access token valid (it does not expire)".to_owned(),
    };
    Desired::new(AUTHORIZED, Some(true), Reason::TokenValid, message)
}

/// Fills `status.account` when it is unknown or belongs to another account.
pub(super) async fn ensure_account(
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
