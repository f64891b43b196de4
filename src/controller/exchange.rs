//! The first exchange of an authorization code, the one step that can burn a
//! single-use code (README, "Conditions and reasons"): proven possible before,
//! recorded before sending, spent after any answer or none, and given back only
//! when Dropbox provably did not consume it (429, 5xx, never sent).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;
use kube::api::Api;

use super::Context;
use super::finalizer;
use super::inputs::SecretString;
use super::oauth::{
    AuthStep, OAuthCredentials, apply_token_secret, code_location, dropbox_condition,
    ensure_account, invalid_client, kept_in_memory, reapprove_hint, store_tokens, token_valid,
};
use super::reconcile::{Error, Next, now, object_key};
use super::token::{self, StoredToken};
use super::token::{refresh_at, token_from_response, token_status, until};
use crate::api::{DropboxElementInstance, DropboxElementInstanceStatus};
use crate::conditions::{self, AUTHORIZED, Desired, Reason};
use crate::dropbox::DropboxError;
use crate::metrics::ResultLabels;

/// A code that was sent and left no tokens: say why, and how to approve again.
pub(super) fn spent_without_tokens(
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

/// Exchanges a code this instance has not sent before.
#[allow(clippy::too_many_arguments)]
pub(super) async fn exchange(
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
            creds.exchange_redirect_uri,
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
        return Ok(kept_in_memory(prev, Some(fingerprint.to_owned()), &e));
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
                    "Dropbox refused the authorization code in {}: {description}. {}",
                    code_location(instance),
                    reapprove_hint(instance)
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
