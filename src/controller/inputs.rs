//! Reading what an instance refers to: its Secrets, from the instance's own
//! namespace only, and its token Secret. A missing Secret or key is a
//! [`Problem`] (a condition for the user), not an error. Secret contents are
//! cached and re-read only when the metadata watch saw them change.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, ResourceExt};
use sha2::{Digest, Sha256};

use crate::api::{AuthenticationType, DropboxElementInstance};
use crate::conditions::Reason;
use crate::controller::token::{self, StoredToken};

pub use crate::controller::token::{AppCredentials, SecretString};

/// What the instance's credentials resolve to.
#[derive(Debug)]
pub enum Credentials {
    OAuth2 {
        /// The code and its `sha256:<hex>` fingerprint; None when the code Secret
        /// or key is not there (not yet, or a spent code was deleted).
        code: Option<(SecretString, String)>,
        /// The PKCE verifier stored next to the code (`code_verifier`), if any.
        code_verifier: Option<SecretString>,
        /// `spec.authentication.callbackUrl`: the redirect URI of the authorize
        /// link in status.
        redirect_uri: Option<String>,
        /// The redirect URI the code exchange sends: the code Secret's
        /// `redirect_uri` when it has one (`Some(None)`: it is empty, the code
        /// was obtained without one), else `redirect_uri`.
        exchange_redirect_uri: Option<String>,
        /// The code Secret's resourceVersion as read (None: no code Secret).
        code_secret_version: Option<String>,
    },
    ApiKey {
        token: SecretString,
    },
}

/// Everything a reconcile needs from the cluster besides the instance itself.
#[derive(Debug)]
pub struct Inputs {
    /// App key and secret: required for oauth2, optional for apiKey (where they
    /// only verify webhook signatures).
    pub app: Option<AppCredentials>,
    pub credentials: Credentials,
    /// The token Secret this controller owns, when it exists.
    pub token: Option<StoredToken>,
    /// The token Secret's resourceVersion when it exists (and is ours): the
    /// precondition of the next write of it.
    pub token_secret_version: Option<String>,
    /// The signature key, when events are enabled and one is referenced; a
    /// missing one is an EventsReady problem, not an Authorized one.
    pub signature_key: Option<Result<String, Problem>>,
    /// The token Secret, when someone is deleting it while the instance lives.
    pub token_secret_deleting: Option<Arc<Secret>>,
}

use crate::contract::{CODE_REDIRECT_URI_KEY, CODE_VERIFIER_KEY};

/// A referenced Secret or key that is not there: the user has to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub reason: Reason,
    pub message: String,
}

/// `sha256:<hex>` fingerprint of an authorization code.
pub fn fingerprint(code: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(code.as_bytes())))
}

/// Secret contents the controller has read, keyed by (namespace, name) and
/// checked against the resourceVersion the metadata watch last saw: a Secret
/// that did not change since it was read is not fetched again. Only Secrets that
/// instances refer to (and the token Secrets) are held.
pub struct SecretCache {
    versions: Store<PartialObjectMeta<Secret>>,
    contents: Mutex<HashMap<(String, String), Cached>>,
}

struct Cached {
    secret: CompactSecret,
    /// Written by this controller and not yet seen by the metadata watch: the
    /// watch lags our own writes, so its silence about this Secret means "not
    /// caught up", not "gone". (A Secret we wrote carries our finalizer, so it
    /// cannot vanish without an update the watch shows first.)
    own_unseen: bool,
}

impl SecretCache {
    pub fn new(versions: Store<PartialObjectMeta<Secret>>) -> Self {
        SecretCache {
            versions,
            contents: Mutex::default(),
        }
    }

    /// The Secret, from memory when the watch says it is unchanged (or has not
    /// caught up with our own write of it yet), else from the API.
    pub async fn get(
        &self,
        api: &Api<Secret>,
        namespace: &str,
        name: &str,
    ) -> Result<Option<Arc<Secret>>, kube::Error> {
        // Until the metadata watch has listed every Secret its silence means
        // nothing; the first reconciles after a start would each fetch the
        // shared app Secret.
        crate::store::wait_until_ready(&self.versions).await;
        let key = (namespace.to_owned(), name.to_owned());
        let current = self
            .versions
            .get(&ObjectRef::new(name).within(namespace))
            .and_then(|m| m.resource_version());
        {
            let mut contents = self.contents.lock().expect("secret cache lock");
            if let Some(cached) = contents.get_mut(&key) {
                match &current {
                    Some(rv) if cached.secret.resource_version.as_ref() == Some(rv) => {
                        cached.own_unseen = false;
                        return Ok(Some(Arc::new(cached.secret.expand(namespace, name))));
                    }
                    None if cached.own_unseen => {
                        return Ok(Some(Arc::new(cached.secret.expand(namespace, name))));
                    }
                    _ => {}
                }
            }
        }
        let fetched = api.get_opt(name).await?.map(CompactSecret::new);
        let mut contents = self.contents.lock().expect("secret cache lock");
        let secret = fetched
            .as_ref()
            .map(|s| Arc::new(s.expand(namespace, name)));
        match fetched {
            Some(secret) => {
                contents.insert(
                    key,
                    Cached {
                        secret,
                        own_unseen: false,
                    },
                );
            }
            None => {
                contents.remove(&key);
            }
        }
        Ok(secret)
    }

    /// The Secret's metadata as the watch last saw it (after its first list).
    pub async fn metadata(
        &self,
        namespace: &str,
        name: &str,
    ) -> Option<Arc<PartialObjectMeta<Secret>>> {
        crate::store::wait_until_ready(&self.versions).await;
        self.versions.get(&ObjectRef::new(name).within(namespace))
    }

    /// Whether this process holds the Secret's contents.
    pub fn is_cached(&self, namespace: &str, name: &str) -> bool {
        self.contents
            .lock()
            .expect("secret cache lock")
            .contains_key(&(namespace.to_owned(), name.to_owned()))
    }

    /// Secrets (metadata as watched) that carry finalizer `finalizer`.
    pub fn tracked_with_finalizer(&self, finalizer: &str) -> Vec<Arc<PartialObjectMeta<Secret>>> {
        self.versions
            .state_filter(|m| m.finalizers().iter().any(|f| f == finalizer))
    }

    /// Drops a Secret that is going away (the token Secret of a deleted instance).
    pub fn forget(&self, namespace: &str, name: &str) {
        self.contents
            .lock()
            .expect("secret cache lock")
            .remove(&(namespace.to_owned(), name.to_owned()));
    }

    /// Remembers a Secret this controller just wrote.
    pub fn put(&self, secret: Secret) {
        let key = (secret.namespace().unwrap_or_default(), secret.name_any());
        self.contents.lock().expect("secret cache lock").insert(
            key,
            Cached {
                secret: CompactSecret::new(secret),
                own_unseen: true,
            },
        );
    }
}

/// What a reconcile reads of a Secret, held compactly: one is cached per
/// instance and per referenced Secret, so its size is the controller's memory
/// per instance (docs/performance.md). A `Secret` keeps each of its maps in a
/// B-tree node of about half a KiB however few entries it has, and carries
/// metadata no reconcile reads (uid, creation time, field managers, a
/// `kubectl apply` annotation repeating the data); here maps are exact-size
/// vectors and only the metadata the controller reads is kept: its own labels
/// and annotation, owner references, finalizers, deletion time and version.
#[derive(Debug, Clone, PartialEq)]
struct CompactSecret {
    resource_version: Option<String>,
    labels: Box<[(String, String)]>,
    annotations: Box<[(String, String)]>,
    owner_references: Box<[k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference]>,
    finalizers: Box<[String]>,
    deletion_timestamp: Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>,
    data: Box<[(String, ByteString)]>,
}

impl CompactSecret {
    fn new(secret: Secret) -> Self {
        let meta = secret.metadata;
        let ours = |key: &String| {
            key == crate::contract::MANAGED_BY_LABEL
                || key == crate::contract::INSTANCE_LABEL
                || key == token::CODE_FINGERPRINT_ANNOTATION
        };
        let kept = |map: Option<BTreeMap<String, String>>| {
            map.into_iter()
                .flatten()
                .filter(|(k, _)| ours(k))
                .collect::<Box<[_]>>()
        };
        CompactSecret {
            resource_version: meta.resource_version,
            labels: kept(meta.labels),
            annotations: kept(meta.annotations),
            owner_references: meta.owner_references.unwrap_or_default().into(),
            finalizers: meta.finalizers.unwrap_or_default().into(),
            deletion_timestamp: meta.deletion_timestamp,
            data: secret.data.into_iter().flatten().collect(),
        }
    }

    /// The Secret as the reconcile reads it.
    fn expand(&self, namespace: &str, name: &str) -> Secret {
        let map = |pairs: &[(String, String)]| {
            (!pairs.is_empty()).then(|| pairs.iter().cloned().collect::<BTreeMap<_, _>>())
        };
        Secret {
            metadata: kube::api::ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(namespace.to_owned()),
                resource_version: self.resource_version.clone(),
                labels: map(&self.labels),
                annotations: map(&self.annotations),
                owner_references: (!self.owner_references.is_empty())
                    .then(|| self.owner_references.to_vec()),
                finalizers: (!self.finalizers.is_empty()).then(|| self.finalizers.to_vec()),
                deletion_timestamp: self.deletion_timestamp.clone(),
                ..Default::default()
            },
            data: Some(self.data.iter().cloned().collect()),
            ..Default::default()
        }
    }
}

/// Secrets read once per reconcile, so two references to one Secret cost one lookup.
struct SecretReader<'a> {
    api: Api<Secret>,
    namespace: String,
    shared: &'a SecretCache,
    cache: BTreeMap<String, Option<Arc<Secret>>>,
}

impl SecretReader<'_> {
    async fn secret(&mut self, name: &str) -> Result<Option<Arc<Secret>>, kube::Error> {
        if !self.cache.contains_key(name) {
            let secret = self.shared.get(&self.api, &self.namespace, name).await?;
            self.cache.insert(name.to_owned(), secret);
        }
        Ok(self.cache.get(name).cloned().flatten())
    }

    /// The trimmed value of `key`, also when it is empty; None when the
    /// Secret or the key is not there.
    async fn raw_value(&mut self, name: &str, key: &str) -> Result<Option<String>, kube::Error> {
        let secret = self.secret(name).await?;
        Ok(secret
            .as_ref()
            .and_then(|s| s.data.as_ref())
            .and_then(|d| d.get(key))
            .map(|ByteString(bytes)| String::from_utf8_lossy(bytes).trim().to_owned()))
    }

    async fn value(
        &mut self,
        name: &str,
        key: &str,
    ) -> Result<Result<String, Problem>, kube::Error> {
        self.secret(name).await?;
        let Some(secret) = self.cache.get(name).and_then(Option::as_ref) else {
            return Ok(Err(Problem {
                reason: Reason::SecretNotFound,
                message: format!("Secret {name:?} not found in the instance's namespace"),
            }));
        };
        let value = secret
            .data
            .as_ref()
            .and_then(|d| d.get(key))
            .map(|ByteString(bytes)| String::from_utf8_lossy(bytes).trim().to_owned())
            .filter(|v| !v.is_empty());
        Ok(value.ok_or_else(|| Problem {
            reason: Reason::SecretKeyMissing,
            message: format!("Secret {name:?} has no (non-empty) key {key:?}"),
        }))
    }
}

/// The app key (client id) of the instance's app Secret, None when it cannot
/// be read (the full reconcile says why).
pub async fn app_key(
    client: &Client,
    shared: &SecretCache,
    instance: &DropboxElementInstance,
) -> Result<Option<String>, kube::Error> {
    let Some(app_ref) = &instance.spec.authentication.app_secret_ref else {
        return Ok(None);
    };
    let namespace = instance.namespace().unwrap_or_default();
    let mut secrets = SecretReader {
        api: Api::namespaced(client.clone(), &namespace),
        namespace,
        shared,
        cache: BTreeMap::new(),
    };
    Ok(secrets
        .value(&app_ref.name, &app_ref.client_id_key)
        .await?
        .ok())
}

/// Reads the instance's credentials and its token Secret.
pub async fn read(
    client: &Client,
    shared: &SecretCache,
    instance: &DropboxElementInstance,
) -> Result<Result<Inputs, Problem>, kube::Error> {
    let namespace = instance.namespace().unwrap_or_default();
    let mut secrets = SecretReader {
        api: Api::namespaced(client.clone(), &namespace),
        namespace: namespace.clone(),
        shared,
        cache: BTreeMap::new(),
    };
    let auth = &instance.spec.authentication;
    let app = match &auth.app_secret_ref {
        Some(app_ref) => {
            let client_id = match secrets.value(&app_ref.name, &app_ref.client_id_key).await? {
                Ok(v) => v,
                Err(p) => return Ok(Err(p)),
            };
            let client_secret = match secrets
                .value(&app_ref.name, &app_ref.client_secret_key)
                .await?
            {
                Ok(v) => v,
                Err(p) => return Ok(Err(p)),
            };
            Some(AppCredentials {
                client_id,
                client_secret,
            })
        }
        None => None,
    };
    let credentials = match auth.auth_type {
        AuthenticationType::OAuth2 => {
            // CEL admission guarantees the references; a missing one (an object
            // created before the CRD had its rules) is reported, not unwrapped.
            let (true, Some(code_ref)) = (app.is_some(), &auth.code_secret_ref) else {
                return Ok(Err(Problem {
                    reason: Reason::SecretNotFound,
                    message: "oauth2 needs spec.authentication.appSecretRef and codeSecretRef"
                        .into(),
                }));
            };
            // A missing code is not a problem by itself: a spent code may be
            // deleted (the tokens carry on), and a new instance waits for one.
            let code = secrets
                .value(&code_ref.name, &code_ref.key)
                .await?
                .ok()
                .map(|code| (fingerprint(&code), SecretString(code)));
            let code_secret_version = secrets
                .secret(&code_ref.name)
                .await?
                .and_then(|s| s.metadata.resource_version.clone());
            let (code_verifier, code_redirect_uri) = match code {
                Some(_) => (
                    secrets
                        .value(&code_ref.name, CODE_VERIFIER_KEY)
                        .await?
                        .ok()
                        .map(SecretString),
                    secrets
                        .raw_value(&code_ref.name, CODE_REDIRECT_URI_KEY)
                        .await?,
                ),
                None => (None, None),
            };
            // The code Secret says which redirect URI the code was obtained with
            // (`connect` writes it; empty: none); else the spec's callbackUrl.
            let exchange_redirect_uri = match code_redirect_uri {
                Some(uri) => Some(uri).filter(|u| !u.is_empty()),
                None => auth.callback_url.clone(),
            };
            Credentials::OAuth2 {
                code: code.map(|(fp, code)| (code, fp)),
                code_verifier,
                redirect_uri: auth.callback_url.clone(),
                exchange_redirect_uri,
                code_secret_version,
            }
        }
        AuthenticationType::ApiKey => {
            let Some(key_ref) = &auth.api_key_secret_ref else {
                return Ok(Err(Problem {
                    reason: Reason::SecretNotFound,
                    message: "apiKey needs spec.authentication.apiKeySecretRef".into(),
                }));
            };
            match secrets.value(&key_ref.name, &key_ref.key).await? {
                Ok(token) => Credentials::ApiKey {
                    token: SecretString(token),
                },
                Err(p) => return Ok(Err(p)),
            }
        }
    };
    let mut token_secret_deleting = None;
    let mut token_secret_version = None;
    let token = match credentials {
        Credentials::OAuth2 { .. } => {
            let name = token::secret_name(&instance.name_any());
            match secrets.secret(&name).await? {
                // Someone else's Secret of that name: never overwritten, so no
                // code is exchanged whose tokens could not be stored.
                Some(s) if !token::is_ours(&s, instance) => {
                    return Ok(Err(Problem {
                        reason: Reason::ResourceConflict,
                        message: format!(
                            "Secret {name:?} exists and was not created by dropbox-operator for this instance; \
                             it is left untouched. Delete or rename it so the tokens can be stored."
                        ),
                    }));
                }
                // Someone deletes it while the instance lives: revoke and let it go.
                Some(s) if s.metadata.deletion_timestamp.is_some() => {
                    token_secret_deleting = Some(s);
                    None
                }
                Some(s) => {
                    token_secret_version = s.metadata.resource_version.clone();
                    StoredToken::from_secret(&s, instance)
                }
                None => None,
            }
        }
        Credentials::ApiKey { .. } => None,
    };
    let signature_key = match instance.spec.events.as_ref().filter(|e| e.enabled) {
        Some(events) => match &events.signature_key_secret_ref {
            Some(r) => Some(secrets.value(&r.name, &r.key).await?),
            None => None,
        },
        None => None,
    };
    Ok(Ok(Inputs {
        app,
        credentials,
        token,
        token_secret_version,
        signature_key,
        token_secret_deleting,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cached_secret_keeps_what_reconciles_read_and_drops_the_rest() {
        let secret: Secret = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "t", "namespace": "ns", "uid": "u-1", "resourceVersion": "42",
                "creationTimestamp": "2026-01-01T00:00:00Z",
                "labels": {"app.kubernetes.io/managed-by": "dropbox-operator", "team": "x"},
                "annotations": {
                    "elements.dropbox-operator.dev/code-fingerprint": "sha256:ab",
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"data\":{}}"
                },
                "ownerReferences": [{"apiVersion": "v1", "kind": "K", "name": "i", "uid": "o-1"}],
                "finalizers": ["f"],
                "managedFields": [{"manager": "m", "operation": "Apply"}]
            },
            "type": "Opaque",
            "data": {"access_token": "dG9r", "refresh_token": "cmVm"}
        }))
        .expect("secret");
        let expanded = CompactSecret::new(secret.clone()).expand("ns", "t");
        let meta = &expanded.metadata;
        assert_eq!(meta.resource_version.as_deref(), Some("42"));
        assert_eq!(expanded.data, secret.data);
        assert_eq!(meta.owner_references, secret.metadata.owner_references);
        assert_eq!(meta.finalizers, secret.metadata.finalizers);
        assert!(crate::contract::is_managed(meta.labels.as_ref()));
        assert_eq!(meta.labels.as_ref().map(BTreeMap::len), Some(1));
        assert_eq!(
            meta.annotations
                .as_ref()
                .map(|a| a.keys().cloned().collect::<Vec<_>>()),
            Some(vec![token::CODE_FINGERPRINT_ANNOTATION.to_owned()])
        );
        assert!(meta.uid.is_none() && meta.managed_fields.is_none());
        assert!(meta.creation_timestamp.is_none());
        // A Secret with no labels, annotations or data stays without them.
        let bare = Secret::default();
        let expanded = CompactSecret::new(bare).expand("ns", "b");
        assert!(expanded.metadata.labels.is_none() && expanded.metadata.annotations.is_none());
        assert!(expanded.data.unwrap_or_default().is_empty());
    }

    #[test]
    fn fingerprint_is_sha256_hex() {
        assert_eq!(
            fingerprint("abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn debug_hides_secrets() {
        let app = AppCredentials {
            client_id: "key".into(),
            client_secret: "TOPSECRET".into(),
        };
        let c = Credentials::OAuth2 {
            code: Some((SecretString("CODESECRET".into()), fingerprint("CODESECRET"))),
            code_verifier: Some(SecretString("VERIFIERSECRET".into())),
            redirect_uri: None,
            exchange_redirect_uri: None,
            code_secret_version: None,
        };
        let shown = format!("{c:?} {app:?}");
        assert!(
            !shown.contains("TOPSECRET")
                && !shown.contains("CODESECRET")
                && !shown.contains("VERIFIERSECRET"),
            "{shown}"
        );
    }
}
