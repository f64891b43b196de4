//! Deletion always revokes a token that existed (README, "Security"):
//!
//! - the instance carries [`FINALIZER`], added before any code is sent (in the
//!   same write that records the code as sent, see [`record_code`]);
//! - its token Secret carries the same finalizer, so neither a namespace
//!   deletion nor a foreground cascade can remove the tokens before they are
//!   revoked;
//! - [`cleanup`] revokes once, bounded by `--revoke-timeout`, then releases the
//!   token Secret and the instance. Finalizers are removed with a JSON patch
//!   (test + remove at the entry's index), which works whoever else owns the entry.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::projection::Projector;
use super::reconcile::{Error, FIELD_MANAGER, now, object_key};
use super::token::{self, StoredToken};
use super::{Context, inputs};
use crate::api::DropboxElementInstance;
use crate::dropbox::DropboxError;
use crate::metrics::ResultLabels;

/// Finalizer that revokes the Dropbox token before the instance (and its token
/// Secret) goes away.
pub const FINALIZER: &str = "elements.dropbox-operator.dev/revoke-token";
/// Annotation on the instance: the fingerprint of the last authorization code
/// sent to Dropbox, written BEFORE it is sent. A code whose fingerprint is
/// here is never sent again, also after a crash or a restart.
pub const CODE_SENT_ANNOTATION: &str = "elements.dropbox-operator.dev/code-sent";

/// The code fingerprint recorded as sent, if any: what this process last wrote
/// (the watch cache may still show an older copy), else the annotation.
pub fn code_sent(instance: &DropboxElementInstance, ctx: &Context) -> Option<String> {
    let uid = instance.uid().unwrap_or_default();
    if let Some(written) = ctx.code_markers.lock().expect("markers lock").get(&uid) {
        return written.clone();
    }
    instance.annotations().get(CODE_SENT_ANNOTATION).cloned()
}

/// Server-side apply of the controller's metadata: the finalizer and, when
/// given, the fingerprint of the code about to be sent (None drops it). One
/// write, so a first exchange costs no extra round trip for the finalizer.
pub async fn record_code(
    api: &Api<DropboxElementInstance>,
    instance: &DropboxElementInstance,
    code: Option<&str>,
    ctx: &Context,
) -> Result<DropboxElementInstance, kube::Error> {
    let written = apply_metadata(api, instance, code).await?;
    ctx.written.note_metadata_write(&written);
    ctx.code_markers
        .lock()
        .expect("markers lock")
        .insert(instance.uid().unwrap_or_default(), code.map(str::to_owned));
    Ok(written)
}

async fn apply_metadata(
    api: &Api<DropboxElementInstance>,
    instance: &DropboxElementInstance,
    code: Option<&str>,
) -> Result<DropboxElementInstance, kube::Error> {
    let mut metadata = json!({"name": instance.name_any(), "finalizers": [FINALIZER]});
    if let Some(fingerprint) = code {
        metadata["annotations"] = json!({ CODE_SENT_ANNOTATION: fingerprint });
    }
    api.patch(
        &instance.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(json!({
            "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
            "kind": "DropboxElementInstance",
            "metadata": metadata,
        })),
    )
    .await
}

/// Removes [`FINALIZER`] from `obj` with a JSON patch that tests the entry it
/// removes; a 404 (already gone) is fine.
pub async fn remove_finalizer<K>(api: &Api<K>, obj: &K) -> Result<(), kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let Some(index) = obj.finalizers().iter().position(|f| f == FINALIZER) else {
        return Ok(());
    };
    let path = format!("/metadata/finalizers/{index}");
    let patch: json_patch::Patch = serde_json::from_value(json!([
        {"op": "test", "path": path, "value": FINALIZER},
        {"op": "remove", "path": path},
    ]))
    .expect("a valid JSON patch");
    match api
        .patch(
            &obj.name_any(),
            &PatchParams::default(),
            &Patch::<()>::Json(patch),
        )
        .await
    {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        // The list changed under us (422 from the test op): read it again.
        Err(kube::Error::Api(e)) if e.code == 422 => match api.get_opt(&obj.name_any()).await? {
            Some(fresh) => Box::pin(remove_finalizer(api, &fresh)).await,
            None => Ok(()),
        },
        Err(e) => Err(e),
    }
}

/// Deletion: revoke the token once, within `revoke_timeout`, then let the token
/// Secret and the finalizer go whatever happened (deletion never hangs on Dropbox).
pub async fn cleanup(instance: &DropboxElementInstance, ctx: &Context) -> Result<Action, Error> {
    let key = object_key(instance);
    let namespace = instance.namespace().unwrap_or_default();
    ctx.metrics
        .token_expiry
        .remove(&namespace, &instance.name_any());
    ctx.backoff.reset(&key);
    ctx.written.forget(instance);
    ctx.code_markers
        .lock()
        .expect("markers lock")
        .remove(&instance.uid().unwrap_or_default());
    let token_secret = token::secret_name(&instance.name_any());
    ctx.own_secret_writes.forget(&namespace, &token_secret);
    ctx.secrets.forget(&namespace, &token_secret);
    // Best effort: the orphan sweep removes what is left, deletion never waits on it.
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
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let secret = secrets.get_opt(&token_secret).await?;
    let uid = instance.uid().unwrap_or_default();
    // A cleanup that already revoked (a cached copy can still show the finalizer
    // it removed) does not revoke again.
    let first = ctx.revoked.lock().expect("revoked lock").insert(uid);
    if first {
        let stored = secret
            .as_ref()
            .filter(|s| token::is_ours(s, instance))
            .and_then(|s| StoredToken::from_secret(s, instance));
        revoke_and_report(instance, stored.as_ref(), ctx).await;
    }
    if let Some(secret) = secret.filter(|s| token::is_ours(s, instance)) {
        remove_finalizer(&secrets, &secret).await?;
    }
    let api: Api<DropboxElementInstance> = Api::namespaced(ctx.client.clone(), &namespace);
    remove_finalizer(&api, instance).await?;
    Ok(Action::await_change())
}

/// The token Secret is being deleted while its instance lives (someone deleted
/// it): revoke what it holds, then let it go. The instance then needs a new code.
pub async fn release_token_secret(
    instance: &DropboxElementInstance,
    secret: &Secret,
    ctx: &Context,
) -> Result<(), Error> {
    let stored = StoredToken::from_secret(secret, instance);
    revoke_and_report(instance, stored.as_ref(), ctx).await;
    let secrets: Api<Secret> = Api::namespaced(
        ctx.client.clone(),
        &instance.namespace().unwrap_or_default(),
    );
    remove_finalizer(&secrets, secret).await?;
    Ok(())
}

async fn revoke_and_report(
    instance: &DropboxElementInstance,
    stored: Option<&StoredToken>,
    ctx: &Context,
) {
    let key = object_key(instance);
    let Some(stored) = stored else {
        ctx.metrics
            .revocations
            .get_or_create(&ResultLabels { result: "no_token" })
            .inc();
        return;
    };
    let outcome =
        tokio::time::timeout(ctx.config.revoke_timeout, revoke(instance, stored, ctx)).await;
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
    let Some(message) = warning else {
        tracing::info!(instance = %key, result, "token revoked");
        return;
    };
    tracing::warn!(instance = %key, "{message}; deletion continues");
    let event = KubeEvent {
        type_: EventType::Warning,
        reason: "RevokeFailed".into(),
        note: Some(format!(
            "{message}. The token is released anyway; disconnect the app in the Dropbox account settings if \
             it must not stay valid."
        )),
        action: "Revoke".into(),
        secondary: None,
    };
    super::status::publish(instance, &event, ctx).await;
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
        && let Ok(Ok(inputs::Inputs { app: Some(app), .. })) =
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

/// Token Secrets whose instance is gone without a cleanup (its finalizer was
/// removed by hand, or the controller was down and someone forced it): revoke
/// what they hold and let them go, so nothing hangs in Terminating.
pub async fn release_orphaned_token_secrets(
    ctx: &Context,
    timeout: Duration,
) -> Result<(), kube::Error> {
    // Only Secrets being deleted are candidates (usually none): the set of
    // live instances is built only for them.
    let deleting: Vec<_> = ctx
        .secrets
        .tracked_with_finalizer(FINALIZER)
        .into_iter()
        .filter(|meta| meta.meta().deletion_timestamp.is_some())
        .collect();
    if deleting.is_empty() {
        return Ok(());
    }
    let live: std::collections::HashSet<String> =
        ctx.store.state().iter().filter_map(|i| i.uid()).collect();
    for meta in deleting {
        let owners_live = meta
            .owner_references()
            .iter()
            .any(|o| live.contains(&o.uid));
        if owners_live {
            continue;
        }
        let namespace = meta.namespace().unwrap_or_default();
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
        let Some(secret) = secrets.get_opt(&meta.name_any()).await? else {
            continue;
        };
        let token = secret
            .data
            .as_ref()
            .and_then(|d| d.get(token::ACCESS_TOKEN))
            .map(|v| String::from_utf8_lossy(&v.0).into_owned());
        if let Some(token) = token {
            let result = tokio::time::timeout(timeout, ctx.dropbox.revoke(&token)).await;
            tracing::info!(secret = %format!("{namespace}/{}", meta.name_any()), ok = matches!(result, Ok(Ok(()))), "revoked the token of an orphaned token Secret");
        }
        remove_finalizer(&secrets, &secret).await?;
    }
    Ok(())
}
