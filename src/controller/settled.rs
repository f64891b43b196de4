//! Settled instances after a start: nothing to read.
//!
//! A controller that starts (a restart, a new leader) reconciles every
//! instance once, and its Secret contents cache is empty. For an oauth2
//! instance whose tokens are valid and whose inputs did not change, that
//! reconcile would read the code Secret and the token Secret only to decide
//! "nothing to do until the refresh": 2 reads per instance, 20,000 for 10,000
//! instances in one burst. What that decision needs is visible without them:
//!
//! - the instance (the watch cache): the spec generation status describes,
//!   Authorized=True (TokenValid) and Ready=True, the token's expiry and last
//!   refresh (status.token), the code the tokens came from
//!   (status.codeFingerprint) and the codes sent (annotation
//!   [`CODE_SENT_ANNOTATION`]);
//! - the code Secret's resourceVersion, recorded on the instance when its code
//!   was spent ([`CODE_SECRET_VERSION_ANNOTATION`]), against the metadata
//!   watch's: the same version holds the same (spent) code; a new one may hold
//!   a code to send. A deleted code Secret holds nothing to send;
//! - the token Secret's metadata (the watch): there, ours, not being deleted;
//! - the app key, from the app Secret (shared by the app's instances: read
//!   once, not per instance) against status.appKey.
//!
//! When all hold, the reconcile ends with a requeue at the refresh time, as the
//! full one would have. Anything else (events enabled, a code Secret that
//! changed, a refresh due, tokens kept in memory) takes the full reconcile.
//! Only instances whose token Secret this process has not read yet take the
//! shortcut: once read, the full reconcile costs no read either.

use std::time::Duration;

use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::core::PartialObjectMeta;

use super::Context;
use super::common::Error;
use super::token::{self, CODE_SECRET_VERSION_ANNOTATION, CODE_SENT_ANNOTATION, SpentCodes};
use crate::api::{AuthenticationType, DropboxElementInstance};
use crate::conditions::{self, AUTHORIZED, READY, Reason};

/// How long the instance stays settled by what the instance itself shows
/// (None: it is not settled, or a refresh is due).
pub fn settled_for(
    instance: &DropboxElementInstance,
    now: jiff::Timestamp,
    margin: Duration,
) -> Option<Duration> {
    let spec = &instance.spec;
    if spec.authentication.auth_type != AuthenticationType::OAuth2
        || spec.events.as_ref().is_some_and(|e| e.enabled)
        || instance.metadata.deletion_timestamp.is_some()
        || !instance.finalizers().iter().any(|f| f == token::FINALIZER)
    {
        return None;
    }
    let status = instance.status.as_ref()?;
    if status.events.is_some()
        || status.observed_generation.is_none()
        || status.observed_generation != instance.metadata.generation
        || !conditions::is_true(&status.conditions, READY)
    {
        return None;
    }
    let authorized = conditions::find(&status.conditions, AUTHORIZED)?;
    if authorized.status != "True" || authorized.reason != Reason::TokenValid.as_str() {
        return None;
    }
    // The tokens came from the code sent last.
    let spent = SpentCodes::parse(
        instance
            .annotations()
            .get(CODE_SENT_ANNOTATION)
            .map(String::as_str),
    );
    if spent.latest().is_none() || status.code_fingerprint.as_deref() != spent.latest() {
        return None;
    }
    let tokens = status.token.as_ref()?;
    let at = token::refresh_before(
        tokens.expires_at.as_ref()?.0,
        tokens.last_refresh_time.as_ref(),
        margin,
    );
    let left = Duration::try_from(at.duration_since(now)).ok()?;
    (!left.is_zero()).then_some(left)
}

/// Whether the Secrets, by their metadata, are as the settled status found
/// them: the code Secret (`code`: its metadata, None when there is none) has
/// the version recorded when its code was spent, and the token Secret is there,
/// ours and not being deleted.
pub fn secrets_unchanged(
    instance: &DropboxElementInstance,
    code: Option<&PartialObjectMeta<Secret>>,
    token_secret: Option<&PartialObjectMeta<Secret>>,
) -> bool {
    let code_unchanged = match code {
        None => true,
        Some(meta) => {
            meta.metadata.resource_version.is_some()
                && instance
                    .annotations()
                    .get(CODE_SECRET_VERSION_ANNOTATION)
                    .is_some_and(|v| Some(v) == meta.metadata.resource_version.as_ref())
        }
    };
    let token_ours = token_secret.is_some_and(|meta| {
        meta.metadata.deletion_timestamp.is_none()
            && meta
                .metadata
                .owner_references
                .iter()
                .flatten()
                .any(|r| Some(&r.uid) == instance.metadata.uid.as_ref())
    });
    code_unchanged && token_ours
}

/// The requeue of a settled instance whose Secrets this process has not read:
/// Some(delay) when the reconcile can end here (see the module's text).
pub async fn shortcut(
    instance: &DropboxElementInstance,
    ctx: &Context,
) -> Result<Option<Duration>, Error> {
    let Some(left) = settled_for(instance, super::common::now(), ctx.config.refresh_margin) else {
        return Ok(None);
    };
    let namespace = instance.namespace().unwrap_or_default();
    let uid = instance.uid().unwrap_or_default();
    let token_name = token::secret_name(&instance.name_any());
    if ctx.secrets.is_cached(&namespace, &token_name)
        || ctx
            .unstored
            .lock()
            .expect("unstored lock")
            .contains_key(&uid)
    {
        return Ok(None);
    }
    let Some(code_ref) = &instance.spec.authentication.code_secret_ref else {
        return Ok(None);
    };
    let code = ctx.secrets.metadata(&namespace, &code_ref.name).await;
    let token_secret = ctx.secrets.metadata(&namespace, &token_name).await;
    if !secrets_unchanged(instance, code.as_deref(), token_secret.as_deref()) {
        return Ok(None);
    }
    // The app key status publishes; the app Secret is shared, read once.
    let app_key = super::inputs::app_key(&ctx.client, &ctx.secrets, instance).await?;
    let status_key = instance.status.as_ref().and_then(|s| s.app_key.as_deref());
    if app_key.is_none() || app_key.as_deref() != status_key {
        return Ok(None);
    }
    if let Some(expires_at) = instance
        .status
        .as_ref()
        .and_then(|s| s.token.as_ref())
        .and_then(|t| t.expires_at.as_ref())
    {
        ctx.metrics
            .token_expiry
            .set(&namespace, &instance.name_any(), expires_at.0);
    }
    Ok(Some(left))
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::api::ObjectMeta;

    const NOW: &str = "2026-12-06T12:00:00Z";

    fn settled() -> DropboxElementInstance {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
            "kind": "DropboxElementInstance",
            "metadata": {
                "name": "i", "namespace": "ns", "uid": "u-1", "generation": 2,
                "finalizers": [token::FINALIZER],
                "annotations": {
                    CODE_SENT_ANNOTATION: "sha256:old,sha256:new",
                    CODE_SECRET_VERSION_ANNOTATION: "41",
                },
            },
            "spec": {"element": {"key": "dropbox"}, "authentication": {
                "type": "oauth2", "appSecretRef": {"name": "app"},
                "codeSecretRef": {"name": "code"}}},
            "status": {
                "observedGeneration": 2,
                "codeFingerprint": "sha256:new",
                "appKey": "k",
                "token": {"secretName": "i-dropbox-token",
                          "expiresAt": "2026-12-06T16:00:00Z",
                          "lastRefreshTime": "2026-12-06T12:00:00Z"},
                "conditions": [
                    {"type": "Authorized", "status": "True", "reason": "TokenValid", "message": "",
                     "lastTransitionTime": NOW},
                    {"type": "Ready", "status": "True", "reason": "Ready", "message": "",
                     "lastTransitionTime": NOW},
                ],
            },
        }))
        .expect("instance")
    }

    fn left(instance: &DropboxElementInstance) -> Option<Duration> {
        settled_for(
            instance,
            NOW.parse().expect("now"),
            Duration::from_secs(300),
        )
    }

    fn meta(version: &str, owner: Option<&str>) -> PartialObjectMeta<Secret> {
        PartialObjectMeta::<Secret> {
            metadata: ObjectMeta {
                resource_version: Some(version.into()),
                owner_references: owner.map(|uid| {
                    vec![
                        k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
                            uid: uid.into(),
                            ..Default::default()
                        },
                    ]
                }),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    #[test]
    fn a_settled_instance_waits_for_its_refresh() {
        // Refreshed at 12:00, expires 16:00: due 5 minutes before.
        assert_eq!(left(&settled()), Some(Duration::from_secs(4 * 3600 - 300)));
    }

    type Change = Box<dyn Fn(&mut DropboxElementInstance)>;

    #[test]
    fn anything_unsettled_takes_the_full_reconcile() {
        let cases: Vec<(&str, Change)> = vec![
            (
                "spec changed",
                Box::new(|i| i.metadata.generation = Some(3)),
            ),
            (
                "events enabled",
                Box::new(|i| {
                    i.spec.events = serde_json::from_value(serde_json::json!(
                        {"enabled": true, "callbackUrl": "https://x.example.com/"}))
                    .expect("events");
                }),
            ),
            (
                "being deleted",
                Box::new(|i| {
                    i.metadata.deletion_timestamp =
                        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                            NOW.parse().expect("ts"),
                        ));
                }),
            ),
            ("no finalizer", Box::new(|i| i.metadata.finalizers = None)),
            (
                "not TokenValid",
                Box::new(|i| {
                    i.status.as_mut().expect("status").conditions[0].reason = "RefreshFailed".into()
                }),
            ),
            (
                "not Ready",
                Box::new(|i| {
                    i.status.as_mut().expect("status").conditions[1].status = "False".into()
                }),
            ),
            (
                "tokens from an older code",
                Box::new(|i| {
                    i.status.as_mut().expect("status").code_fingerprint = Some("sha256:old".into())
                }),
            ),
            (
                "refresh due",
                Box::new(|i| {
                    let t = i
                        .status
                        .as_mut()
                        .expect("status")
                        .token
                        .as_mut()
                        .expect("token");
                    t.expires_at = Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                        "2026-12-06T12:04:00Z".parse().expect("ts"),
                    ));
                    t.last_refresh_time = None;
                }),
            ),
            (
                "no expiry known",
                Box::new(|i| {
                    i.status.as_mut().expect("status").token = None;
                }),
            ),
        ];
        for (what, change) in cases {
            let mut i = settled();
            change(&mut i);
            assert_eq!(left(&i), None, "{what}");
        }
    }

    #[test]
    fn the_secrets_must_be_as_the_spent_code_left_them() {
        let i = settled();
        let token = meta("77", Some("u-1"));
        assert!(secrets_unchanged(&i, Some(&meta("41", None)), Some(&token)));
        // A deleted code Secret holds nothing to send.
        assert!(secrets_unchanged(&i, None, Some(&token)));
        // A code Secret written since (a new code, perhaps).
        assert!(!secrets_unchanged(
            &i,
            Some(&meta("90", None)),
            Some(&token)
        ));
        // No version recorded (the code was given back, or an older release).
        let mut unrecorded = settled();
        unrecorded
            .metadata
            .annotations
            .as_mut()
            .expect("annotations")
            .remove(CODE_SECRET_VERSION_ANNOTATION);
        assert!(!secrets_unchanged(
            &unrecorded,
            Some(&meta("41", None)),
            Some(&token)
        ));
        // The token Secret gone, someone else's, or being deleted.
        assert!(!secrets_unchanged(&i, Some(&meta("41", None)), None));
        assert!(!secrets_unchanged(
            &i,
            Some(&meta("41", None)),
            Some(&meta("77", Some("u-2")))
        ));
        let mut deleting = token.clone();
        deleting.metadata.deletion_timestamp = Some(
            k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(NOW.parse().expect("ts")),
        );
        assert!(!secrets_unchanged(
            &i,
            Some(&meta("41", None)),
            Some(&deleting)
        ));
    }
}
