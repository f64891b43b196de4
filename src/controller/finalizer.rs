//! The revoke finalizer: deletion always revokes a token that existed
//! (docs/security.md).
//!
//! - the instance carries [`FINALIZER`], added before any code is sent (in the
//!   same write that records the code as sent);
//! - its token Secret carries the same finalizer, so neither a namespace
//!   deletion nor a foreground cascade can remove the tokens before they are
//!   revoked;
//! - the state machine (`lifecycle.rs`) revokes, then releases the token Secret
//!   and the instance with [`remove_finalizer`]: a JSON patch that tests the
//!   entry it removes, retried with backoff (and a Warning Event) while the API
//!   server refuses it;
//! - token Secrets whose instance vanished without this are revoked and released
//!   by [`release_orphaned_token_secrets`].

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::Context;
use super::revoke::{Revocation, revoke};
use super::token::StoredToken;
use crate::metrics::ResultLabels;

pub use super::token::{CODE_SENT_ANNOTATION, FINALIZER};

/// What became of a finalizer removal.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Removal {
    /// Removed, or already gone (with the object, or by someone else).
    Removed,
    /// The API server refused the write twice (an admission policy, a webhook):
    /// its message.
    Refused(String),
}

/// Removes [`FINALIZER`] from `obj` with a JSON patch that tests the entry it
/// removes. When the patch fails (the list moved, or something refuses), the
/// object is read again and the patch tried once more; a second refusal is
/// reported, never retried in a loop: the caller backs off.
pub async fn remove_finalizer<K>(api: &Api<K>, obj: &K) -> Result<Removal, kube::Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let mut current = obj.clone();
    let mut refusal = String::new();
    for _ in 0..2 {
        let Some(index) = current.finalizers().iter().position(|f| f == FINALIZER) else {
            return Ok(Removal::Removed);
        };
        let path = format!("/metadata/finalizers/{index}");
        let patch: json_patch::Patch = serde_json::from_value(json!([
            {"op": "test", "path": path, "value": FINALIZER},
            {"op": "remove", "path": path},
        ]))
        .map_err(kube::Error::SerdeError)?;
        match api
            .patch(
                &current.name_any(),
                &PatchParams::default(),
                &Patch::<()>::Json(patch),
            )
            .await
        {
            Ok(_) => return Ok(Removal::Removed),
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(Removal::Removed),
            Err(kube::Error::Api(e)) if matches!(e.code, 400 | 403 | 409 | 422) => {
                refusal = e.message;
                match api.get_opt(&current.name_any()).await? {
                    Some(fresh) => current = fresh,
                    None => return Ok(Removal::Removed),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(Removal::Refused(refusal))
}

/// Token Secrets whose instance is gone without a cleanup (its finalizer was
/// removed by hand, or the controller was down and someone forced it): revoke
/// what they hold (refreshing an expired access token with the app credentials
/// the Secret keeps) and let them go, so nothing hangs in Terminating.
pub async fn release_orphaned_token_secrets(ctx: &Context) -> Result<(), kube::Error> {
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
        if ctx.leadership.check().is_err() {
            return Ok(());
        }
        let owners_live = meta
            .owner_references()
            .iter()
            .any(|o| live.contains(&o.uid));
        if owners_live {
            continue;
        }
        let namespace = meta.namespace().unwrap_or_default();
        let key = format!("{namespace}/{}", meta.name_any());
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
        let Some(secret) = secrets.get_opt(&meta.name_any()).await? else {
            continue;
        };
        if let Some(tokens) = StoredToken::from_any_secret(&secret) {
            let outcome = revoke(&ctx.dropbox, &tokens, None, ctx.config.revoke_timeout).await;
            ctx.metrics
                .revocations
                .get_or_create(&ResultLabels {
                    result: outcome.label(),
                })
                .inc();
            match &outcome {
                Revocation::Failed(why) => {
                    tracing::warn!(secret = %key, %why, "could not revoke the token of an orphaned token Secret; releasing it anyway")
                }
                other => {
                    tracing::info!(secret = %key, result = other.label(), "revoked the token of an orphaned token Secret")
                }
            }
        }
        if let Removal::Refused(why) = remove_finalizer(&secrets, &secret).await? {
            tracing::warn!(secret = %key, %why, "the API server refused to release an orphaned token Secret; retrying later");
        }
    }
    Ok(())
}
