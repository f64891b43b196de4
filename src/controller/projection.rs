//! The events step of a reconcile: everything the webhook ingress needs about an
//! events-enabled instance, projected into the ingress's data namespace
//! (docs/architecture.md, "Who reads and writes what"), so the ingress reads no
//! instance and no other namespace:
//!
//! - the cursor ConfigMap `dropbox-cursor-<uid>` with the first cursor
//!   (`get_latest_cursor`), made again (with an `UNKNOWN` event due) when the
//!   ingress reports it missing;
//! - the Secret `dropbox-instance-<uid>`: the instance's settings (callback
//!   URL, format, folder, source, account, app key, identity, generation,
//!   resume annotation) and secrets (app secret, access token, signature key),
//!   re-applied whenever one of them changes (rotation, refresh, a spec
//!   change), after the cursor, so the ingress never sees an instance without
//!   its cursor;
//! - EventsReady.
//!
//! Objects of those names that the operator did not make are never overwritten:
//! EventsReady says `ResourceConflict` instead. They are deleted, with the
//! instance's delivery state, when events are turned off or the instance goes.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use sha2::{Digest, Sha256};

use super::ingress::delete_ignoring_missing;
use super::inputs::Problem;
use crate::api::{DropboxElementInstance, EventSource};
use crate::conditions::{Desired, EVENTS_READY, Reason};
use crate::contract::{
    self, ACCESS_TOKEN_KEY, ACCOUNT_KEY, APP_SECRET_KEY, COMMITTED_AT_KEY,
    CONTROLLER_FIELD_MANAGER, CURSOR_KEY, INGRESS_NAME, INSTANCE_KEY, INSTANCE_UID_LABEL, PATH_KEY,
    ProjectedInstance, RESET_PENDING_KEY, RESUME_ANNOTATION, ROLE_CURSOR, ROLE_PROJECTION,
    SIGNATURE_KEY_KEY,
};
use crate::dropbox::{DropboxClient, DropboxError};

/// The outcome of the events step of a reconcile.
#[derive(Clone, Debug)]
pub struct EventsStep {
    pub ready: Desired,
    pub webhook_path: Option<String>,
    /// Transient trouble (Dropbox 5xx/429): retry with backoff, not sooner than this.
    pub retry: Option<Option<Duration>>,
}

/// What the events step works from.
pub struct EventsInputs<'a> {
    pub app_key: Option<&'a str>,
    pub app_secret: Option<&'a str>,
    pub account_id: Option<&'a str>,
    /// The working access token; None while the instance is not authorized.
    pub access_token: Option<&'a str>,
    /// The signature key, when one is referenced (or why it cannot be read).
    pub signature_key: Option<Result<String, Problem>>,
    /// Ingress liveness; None while unknown (just after a controller start).
    pub ingress_alive: Option<bool>,
    /// EventsReady as the status has it now.
    pub previous: Option<&'a Condition>,
    /// The ingress reported the instance's cursor missing: make a new one,
    /// with an `UNKNOWN` event due.
    pub cursor_missing: bool,
    /// The status shows deliveries happened: a cursor that is not there was
    /// lost (e.g. the data namespace was deleted with the release), and a new
    /// one gets an `UNKNOWN` event due.
    pub delivered_before: bool,
}

/// What was last projected for each instance uid, so a settled instance makes
/// no API call at all.
#[derive(Default)]
pub struct Projections {
    memo: Mutex<HashMap<String, Memo>>,
}

#[derive(Default, Clone)]
struct Memo {
    /// Digest of the projected Secret's data.
    secret: Option<[u8; 32]>,
    /// The (account, folder) whose cursor is known to be committed.
    cursor_scope: Option<(String, String)>,
}

impl Projections {
    fn get(&self, uid: &str) -> Memo {
        self.memo
            .lock()
            .expect("projections lock")
            .get(uid)
            .cloned()
            .unwrap_or_default()
    }

    fn update(&self, uid: &str, f: impl FnOnce(&mut Memo)) {
        f(self
            .memo
            .lock()
            .expect("projections lock")
            .entry(uid.to_owned())
            .or_default());
    }

    pub fn forget(&self, uid: &str) {
        self.memo.lock().expect("projections lock").remove(uid);
    }
}

/// The API handles and settings the step uses.
pub struct Projector<'a> {
    pub client: &'a Client,
    pub dropbox: &'a DropboxClient,
    pub memo: &'a Projections,
    /// The ingress's data namespace.
    pub namespace: &'a str,
}

fn conflict(kind: &str, namespace: &str, name: &str) -> Desired {
    Desired::new(
        EVENTS_READY,
        Some(false),
        Reason::ResourceConflict,
        format!(
            "{kind} {namespace}/{name} exists and was not created by dropbox-operator for this instance; \
             it is left untouched. Delete or rename it to enable events."
        ),
    )
}

/// Whether an object in the data namespace is ours for this instance.
fn ours_for(meta: &ObjectMeta, uid: &str) -> bool {
    contract::is_managed(meta.labels.as_ref())
        && meta
            .labels
            .as_ref()
            .and_then(|l| l.get(INSTANCE_UID_LABEL))
            .is_some_and(|u| u == uid)
}

impl Projector<'_> {
    /// Projects the instance and reports EventsReady.
    pub async fn events_step(
        &self,
        instance: &DropboxElementInstance,
        input: EventsInputs<'_>,
    ) -> Result<EventsStep, kube::Error> {
        // Long-polled instances take no webhook: no webhook path to register, and
        // no app secret to verify one with (docs/user-guide.md, "Behind a firewall").
        let longpoll = instance
            .spec
            .events
            .as_ref()
            .is_some_and(|e| e.source == EventSource::LongPoll);
        let webhook = input
            .app_key
            .filter(|_| !longpoll)
            .map(contract::webhook_path);
        let step = |status: bool, reason: Reason, message: String| EventsStep {
            ready: Desired::new(EVENTS_READY, Some(status), reason, message),
            webhook_path: webhook.clone(),
            retry: None,
        };
        let app_secret = match (input.app_key, input.app_secret) {
            _ if longpoll => None,
            (Some(_), Some(app_secret)) => Some(app_secret),
            _ => {
                return Ok(step(
                    false,
                    Reason::SecretNotFound,
                    "Events need spec.authentication.appSecretRef: the app secret verifies Dropbox's webhook signatures \
                     (or use spec.events.source: longpoll, which takes no webhook)"
                        .into(),
                ));
            }
        };
        let signature_key = match input.signature_key {
            Some(Err(Problem { reason, message })) => {
                return Ok(step(false, reason, format!("Signature key: {message}")));
            }
            Some(Ok(key)) => Some(key),
            None => None,
        };
        let (Some(access_token), Some(account_id)) = (input.access_token, input.account_id) else {
            return Ok(step(
                false,
                Reason::AwaitingAuthorization,
                "Events start once the instance is authorized".into(),
            ));
        };
        let uid = instance.uid().unwrap_or_default();
        let namespace = instance.namespace().unwrap_or_default();
        let name = instance.name_any();
        let Some(events) = instance.spec.events.clone() else {
            return Ok(step(
                false,
                Reason::IngressUnavailable,
                "Events are not enabled".into(),
            ));
        };

        // 1. The cursor, for this account and folder (before the projection:
        // the ingress never knows an instance without its cursor).
        let folder = events.path.clone().unwrap_or_default();
        let scope = (account_id.to_owned(), folder);
        if input.cursor_missing || self.memo.get(&uid).cursor_scope.as_ref() != Some(&scope) {
            match self
                .ensure_cursor(
                    instance,
                    &uid,
                    account_id,
                    &scope.1,
                    access_token,
                    input.cursor_missing || input.delivered_before,
                )
                .await?
            {
                Ok(()) => self.memo.update(&uid, |m| m.cursor_scope = Some(scope)),
                Err(problem) => {
                    return Ok(EventsStep {
                        webhook_path: webhook,
                        ..problem
                    });
                }
            }
        }

        // 2. The projected Secret: the instance's settings and secrets.
        let settings = ProjectedInstance {
            namespace: namespace.clone(),
            name: name.clone(),
            uid: uid.clone(),
            generation: instance.metadata.generation.unwrap_or_default(),
            display_name: instance.spec.name.clone().unwrap_or_else(|| name.clone()),
            tags: instance.spec.tags.clone().unwrap_or_default(),
            account_id: account_id.to_owned(),
            app_key: input.app_key.unwrap_or_default().to_owned(),
            source: events.source,
            format: events.format,
            folder: events.path.clone().unwrap_or_default(),
            callback_url: events.callback_url.clone().unwrap_or_default(),
            resume: instance
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(RESUME_ANNOTATION))
                .cloned(),
        };
        let mut data = BTreeMap::from([
            (ACCESS_TOKEN_KEY.to_owned(), access_token.to_owned()),
            (
                INSTANCE_KEY.to_owned(),
                serde_json::to_string(&settings).expect("the settings serialize"),
            ),
        ]);
        if let Some(app_secret) = app_secret {
            data.insert(APP_SECRET_KEY.to_owned(), app_secret.to_owned());
        }
        if let Some(key) = signature_key {
            data.insert(SIGNATURE_KEY_KEY.to_owned(), key);
        }
        let digest = digest(&data);
        if self.memo.get(&uid).secret != Some(digest) {
            let secrets: Api<Secret> = Api::namespaced(self.client.clone(), self.namespace);
            let secret_name = contract::instance_secret_name(&uid);
            if let Some(existing) = secrets.get_opt(&secret_name).await?
                && !ours_for(&existing.metadata, &uid)
            {
                return Ok(EventsStep {
                    ready: conflict("Secret", self.namespace, &secret_name),
                    webhook_path: webhook,
                    retry: None,
                });
            }
            let secret = Secret {
                metadata: ObjectMeta {
                    name: Some(secret_name.clone()),
                    namespace: Some(self.namespace.to_owned()),
                    labels: Some(contract::instance_labels(
                        &namespace,
                        &name,
                        &uid,
                        ROLE_PROJECTION,
                    )),
                    ..Default::default()
                },
                type_: Some("Opaque".into()),
                data: Some(
                    data.into_iter()
                        .map(|(k, v)| (k, ByteString(v.into_bytes())))
                        .collect(),
                ),
                ..Default::default()
            };
            secrets
                .patch(
                    &secret_name,
                    &PatchParams::apply(CONTROLLER_FIELD_MANAGER).force(),
                    &Patch::Apply(&secret),
                )
                .await?;
            self.memo.update(&uid, |m| m.secret = Some(digest));
        }

        // 3. Liveness. Unknown (a controller that just started) keeps what the
        // status says, so a restart or failover flips nothing.
        // For a long-polled instance, a live replica means a long-poll is held:
        // the replica responsible for the instance (rendezvous hashing over the
        // live replicas) holds one whenever it is running.
        match input.ingress_alive {
            Some(true) if longpoll => Ok(step(
                true,
                Reason::IngressReady,
                "The webhook ingress is running, long-polls Dropbox for the instance's changes, and the instance's cursor is set".into(),
            )),
            Some(true) => Ok(step(
                true,
                Reason::IngressReady,
                "The webhook ingress is running and the instance's cursor is set".into(),
            )),
            Some(false) => Ok(step(
                false,
                Reason::IngressUnavailable,
                format!(
                    "No webhook ingress replica is running (Deployment {INGRESS_NAME} in the operator's namespace)"
                ),
            )),
            None => match input.previous.and_then(previous_ingress_verdict) {
                Some((status, reason)) => Ok(step(
                    status,
                    reason,
                    input
                        .previous
                        .map(|c| c.message.clone())
                        .unwrap_or_default(),
                )),
                None => Ok(step(
                    false,
                    Reason::IngressUnavailable,
                    "Waiting to learn whether a webhook ingress replica is running".into(),
                )),
            },
        }
    }

    /// Makes sure the cursor ConfigMap holds a cursor for `account_id` and
    /// `folder` (`""`: the whole account); an Err is the EventsReady verdict
    /// when it cannot. A new folder for the same account re-baselines: the
    /// cursor starts at the folder's present and the ingress is told to send
    /// one `UNKNOWN` event; so is a cursor made where one was `missing` (the
    /// ingress found it gone, or deliveries happened before: changes since the
    /// lost one may be missing).
    async fn ensure_cursor(
        &self,
        instance: &DropboxElementInstance,
        uid: &str,
        account_id: &str,
        folder: &str,
        access_token: &str,
        missing: bool,
    ) -> Result<Result<(), EventsStep>, kube::Error> {
        let configmaps: Api<ConfigMap> = Api::namespaced(self.client.clone(), self.namespace);
        let cm_name = contract::cursor_configmap_name(uid);
        let existing = configmaps.get_opt(&cm_name).await?;
        if let Some(cm) = &existing {
            if !ours_for(&cm.metadata, uid) {
                return Ok(Err(EventsStep {
                    ready: conflict("ConfigMap", self.namespace, &cm_name),
                    webhook_path: None,
                    retry: None,
                }));
            }
            let data = cm.data.as_ref();
            let same_account =
                data.and_then(|d| d.get(ACCOUNT_KEY)).map(String::as_str) == Some(account_id);
            let same_folder = data
                .and_then(|d| d.get(PATH_KEY))
                .map(String::as_str)
                .unwrap_or("")
                == folder;
            let has_cursor = data
                .and_then(|d| d.get(CURSOR_KEY))
                .is_some_and(|c| !c.is_empty());
            if has_cursor && same_account && same_folder {
                return Ok(Ok(()));
            }
        }
        let refolder = existing.as_ref().is_some_and(|cm| {
            let data = cm.data.as_ref();
            data.and_then(|d| d.get(ACCOUNT_KEY)).map(String::as_str) == Some(account_id)
                && data
                    .and_then(|d| d.get(PATH_KEY))
                    .map(String::as_str)
                    .unwrap_or("")
                    != folder
        });
        let namespace = instance.namespace().unwrap_or_default();
        let name = instance.name_any();
        // Lost (deleted, or never committed after a reported loss): the
        // receiver is told it may have missed changes.
        let reset = refolder || (missing && existing.is_none());
        let cursor = match self.dropbox.latest_cursor(access_token, folder).await {
            Ok(c) => c,
            Err(e) => {
                let reason = match &e {
                    DropboxError::RateLimited { .. } => Reason::RateLimited,
                    DropboxError::MissingScope { .. } => Reason::MissingScope,
                    _ => Reason::DropboxUnavailable,
                };
                return Ok(Err(EventsStep {
                    ready: Desired::new(
                        EVENTS_READY,
                        Some(false),
                        reason,
                        format!("Reading the first cursor failed: {e}; retrying with backoff"),
                    ),
                    webhook_path: None,
                    retry: Some(e.retry_after()),
                }));
            }
        };
        let mut cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some(cm_name.clone()),
                namespace: Some(self.namespace.to_owned()),
                labels: Some(contract::instance_labels(
                    &namespace,
                    &name,
                    uid,
                    ROLE_CURSOR,
                )),
                ..Default::default()
            },
            data: Some(
                [
                    (CURSOR_KEY, cursor),
                    (ACCOUNT_KEY, account_id.to_owned()),
                    (PATH_KEY, folder.to_owned()),
                    (COMMITTED_AT_KEY, jiff::Timestamp::now().to_string()),
                ]
                .into_iter()
                .chain(reset.then(|| (RESET_PENDING_KEY, "true".to_owned())))
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            ),
            ..Default::default()
        };
        match existing {
            // Replace with a precondition: never overwrite a cursor the ingress moved meanwhile.
            Some(old) => {
                cm.metadata.resource_version = old.metadata.resource_version.clone();
                configmaps
                    .replace(&cm_name, &PostParams::default(), &cm)
                    .await?;
            }
            None => {
                configmaps.create(&PostParams::default(), &cm).await?;
            }
        }
        if reset && !refolder {
            tracing::warn!(instance = %format!("{namespace}/{name}"), "events cursor was missing; made a new one (the receiver gets an UNKNOWN event)");
        } else {
            tracing::info!(instance = %format!("{namespace}/{name}"), "first events cursor set");
        }
        Ok(Ok(()))
    }

    /// Removes the projected Secret, the cursor and the delivery state (events
    /// turned off or the instance deleted), so turning events on again reports
    /// only later changes.
    pub async fn remove(&self, instance: &DropboxElementInstance) -> Result<(), kube::Error> {
        let uid = instance.uid().unwrap_or_default();
        self.memo.forget(&uid);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), self.namespace);
        let secret_name = contract::instance_secret_name(&uid);
        if let Some(s) = secrets.get_opt(&secret_name).await?
            && ours_for(&s.metadata, &uid)
        {
            delete_ignoring_missing(&secrets, &secret_name).await?;
        }
        let configmaps: Api<ConfigMap> = Api::namespaced(self.client.clone(), self.namespace);
        for cm_name in [
            contract::cursor_configmap_name(&uid),
            contract::delivery_configmap_name(&uid),
        ] {
            if let Some(c) = configmaps.get_opt(&cm_name).await?
                && ours_for(&c.metadata, &uid)
            {
                delete_ignoring_missing(&configmaps, &cm_name).await?;
            }
        }
        Ok(())
    }
}

/// EventsReady's previous status and liveness reason, when it was about liveness.
fn previous_ingress_verdict(c: &Condition) -> Option<(bool, Reason)> {
    match c.reason.as_str() {
        "IngressReady" => Some((c.status == "True", Reason::IngressReady)),
        "IngressUnavailable" => Some((false, Reason::IngressUnavailable)),
        _ => None,
    }
}

fn digest(data: &BTreeMap<String, String>) -> [u8; 32] {
    let mut h = Sha256::new();
    for (k, v) in data {
        h.update((k.len() as u64).to_le_bytes());
        h.update(k.as_bytes());
        h.update((v.len() as u64).to_le_bytes());
        h.update(v.as_bytes());
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_separates_keys_and_values() {
        let a = BTreeMap::from([("ab".to_owned(), "c".to_owned())]);
        let b = BTreeMap::from([("a".to_owned(), "bc".to_owned())]);
        assert_ne!(digest(&a), digest(&b));
    }

    #[test]
    fn unknown_liveness_keeps_only_liveness_verdicts() {
        let c = |status: &str, reason: &str| Condition {
            type_: EVENTS_READY.into(),
            status: status.into(),
            reason: reason.into(),
            message: String::new(),
            last_transition_time: k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                jiff::Timestamp::UNIX_EPOCH,
            ),
            observed_generation: None,
        };
        assert_eq!(
            previous_ingress_verdict(&c("True", "IngressReady")),
            Some((true, Reason::IngressReady))
        );
        assert_eq!(
            previous_ingress_verdict(&c("False", "DropboxUnavailable")),
            None
        );
    }
}
