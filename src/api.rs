//! The `DropboxElementInstance` custom resource (docs/reference.md, "Resource reference").
//!
//! The CRD YAML in `crds/` is generated from these types by `dropbox-operator crd`;
//! doc comments become the descriptions `kubectl explain` prints, and the
//! `x_kube(validation = ...)` rules become CEL `x-kubernetes-validations` that the
//! API server enforces at admission.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::core::Rule;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// API group of the custom resource.
pub const GROUP: &str = "elements.dropbox-operator.dev";

/// Path of the checked-in CRD, relative to the repository root.
pub const CRD_FILE: &str = "crds/dropboxelementinstances.elements.dropbox-operator.dev.yaml";

/// Desired state of a Dropbox element instance: which Dropbox account to connect
/// (through an OAuth 2 authorization code or a long-lived access token) and where
/// to deliver standardized file-change events.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "elements.dropbox-operator.dev",
    version = "v1alpha1",
    kind = "DropboxElementInstance",
    doc = "A connection to one Dropbox account, and the delivery of its file-change events to an application (a Cloud Elements \"Dropbox element instance\").",
    plural = "dropboxelementinstances",
    singular = "dropboxelementinstance",
    shortname = "dbxi",
    category = "dropbox",
    namespaced,
    status = "DropboxElementInstanceStatus",
    printcolumn = r#"{"name":"Account", "type":"string", "description":"Email of the connected Dropbox account", "jsonPath":".status.account.email"}"#,
    printcolumn = r#"{"name":"Ready", "type":"string", "description":"Status of the Ready condition", "jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Reason", "type":"string", "description":"Reason of the Ready condition", "jsonPath":".status.conditions[?(@.type==\"Ready\")].reason"}"#,
    printcolumn = r#"{"name":"Events", "type":"boolean", "description":"Whether file-change events are delivered", "jsonPath":".spec.events.enabled"}"#,
    printcolumn = r#"{"name":"Age", "type":"date", "jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct DropboxElementInstanceSpec {
    /// The element this instance connects to (Cloud Elements: element.key).
    pub element: ElementRef,

    /// Display name of the instance (Cloud Elements: name). Defaults to metadata.name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    pub name: Option<String>,

    /// User-defined tags that identify the instance; they are copied into every
    /// event delivered for it (Cloud Elements: tags).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub tags: Option<Vec<String>>,

    /// How the instance authenticates with Dropbox.
    pub authentication: AuthenticationSpec,

    /// Delivery of standardized file-change events to the application's callback URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<EventsSpec>,
}

/// The element this instance connects to.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ElementRef {
    /// Element key; `dropbox` is the only supported value (Cloud Elements: element.key).
    pub key: ElementKey,
}

/// Supported element keys.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ElementKey {
    /// Dropbox.
    #[serde(rename = "dropbox")]
    Dropbox,
}

/// How the instance authenticates with Dropbox (Cloud Elements: authentication.type).
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthenticationType {
    /// OAuth 2 authorization-code grant: the controller exchanges the code for tokens
    /// and keeps the access token fresh.
    #[serde(rename = "oauth2")]
    OAuth2,
    /// A long-lived Dropbox access token that the controller only verifies.
    #[serde(rename = "apiKey")]
    ApiKey,
}

/// Credentials of the instance. All referenced Secrets live in the instance's own
/// namespace.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("self.type != 'oauth2' || has(self.appSecretRef)")
        .message("appSecretRef is required when type is oauth2")
        .field_path(".appSecretRef")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("self.type != 'oauth2' || has(self.codeSecretRef)")
        .message("codeSecretRef is required when type is oauth2")
        .field_path(".codeSecretRef")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("self.type != 'oauth2' || has(self.callbackUrl)")
        .message("callbackUrl is required when type is oauth2")
        .field_path(".callbackUrl")
        .reason(Reason::FieldValueRequired),
    validation = Rule::new("self.type != 'apiKey' || has(self.apiKeySecretRef)")
        .message("apiKeySecretRef is required when type is apiKey")
        .field_path(".apiKeySecretRef")
        .reason(Reason::FieldValueRequired),
)]
pub struct AuthenticationSpec {
    /// `oauth2` (exchange an authorization code) or `apiKey` (use a long-lived access
    /// token) (Cloud Elements: authentication.type).
    #[serde(rename = "type")]
    pub auth_type: AuthenticationType,

    /// oauth2: the Secret holding the Dropbox app key and app secret
    /// (Cloud Elements: oauth.api.key / oauth.api.secret).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_secret_ref: Option<AppSecretRef>,

    /// oauth2: the Secret holding the authorization code the user granted
    /// (Cloud Elements: providerData.code). Putting a new code in the Secret
    /// re-authorizes the instance. `dropbox-operator connect` writes it, with the
    /// PKCE verifier (key `code_verifier`) and the redirect URI it used (key
    /// `redirect_uri`, sent instead of callbackUrl; empty: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_secret_ref: Option<CodeSecretRef>,

    /// oauth2: the redirect URI registered with the Dropbox app and used when the
    /// code was obtained (Cloud Elements: oauth.callback.url), unless the code
    /// Secret names another (`redirect_uri`, written by `connect`). Must be an
    /// absolute http(s) URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = url_rule())]
    pub callback_url: Option<String>,

    /// apiKey: the Secret holding a long-lived Dropbox access token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_secret_ref: Option<ApiKeySecretRef>,
}

/// A reference to the Secret with the Dropbox app credentials.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AppSecretRef {
    /// Name of a Secret in the instance's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the app key (OAuth client id) in the Secret.
    #[serde(default = "default_client_id_key")]
    #[schemars(length(min = 1, max = 253))]
    pub client_id_key: String,
    /// Key of the app secret (OAuth client secret) in the Secret.
    #[serde(default = "default_client_secret_key")]
    #[schemars(length(min = 1, max = 253))]
    pub client_secret_key: String,
}

fn default_client_id_key() -> String {
    "oauth.api.key".into()
}

fn default_client_secret_key() -> String {
    "oauth.api.secret".into()
}

/// Declares a reference to one key of a Secret in the instance's namespace, with the
/// key's default given by the Cloud Elements parameter it replaces.
macro_rules! secret_key_ref {
    ($(#[$doc:meta])* $name:ident, $default_fn:literal, $default:literal, $key_doc:literal) => {
        $(#[$doc])*
        #[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
        pub struct $name {
            /// Name of a Secret in the instance's namespace.
            #[schemars(length(min = 1, max = 253))]
            pub name: String,
            #[doc = $key_doc]
            #[serde(default = $default_fn)]
            #[schemars(length(min = 1, max = 253))]
            pub key: String,
        }

        impl $name {
            fn default_key() -> String {
                $default.into()
            }
        }
    };
}

secret_key_ref!(
    /// A reference to the Secret key holding the OAuth authorization code.
    CodeSecretRef, "CodeSecretRef::default_key", "code",
    "Key of the authorization code in the Secret."
);
secret_key_ref!(
    /// A reference to the Secret key holding a long-lived Dropbox access token.
    ApiKeySecretRef, "ApiKeySecretRef::default_key", "apiKey",
    "Key of the access token in the Secret."
);
secret_key_ref!(
    /// A reference to the Secret key holding the event signature key.
    SignatureKeySecretRef, "SignatureKeySecretRef::default_key", "event.notification.signature.key",
    "Key of the signature key in the Secret."
);

/// Delivery of file-change events.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
#[x_kube(
    validation = Rule::new("!self.enabled || has(self.callbackUrl)")
        .message("callbackUrl is required when events are enabled")
        .field_path(".callbackUrl")
        .reason(Reason::FieldValueRequired),
)]
pub struct EventsSpec {
    /// Deliver events for this instance (Cloud Elements: event.notification.enabled).
    #[serde(default)]
    pub enabled: bool,

    /// Where events are POSTed (Cloud Elements: event.notification.callback.url).
    /// Required when enabled; must be an absolute http(s) URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = url_rule())]
    pub callback_url: Option<String>,

    /// Optional Secret key holding the key that signs every delivery
    /// (Cloud Elements: event.notification.signature.key). Without it, deliveries
    /// are not signed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature_key_secret_ref: Option<SignatureKeySecretRef>,

    /// Payload format: `elements` (the Cloud Elements event message) or
    /// `cloudevents` (CloudEvents 1.0 structured mode).
    #[serde(default)]
    pub format: EventFormat,

    /// Only changes in this Dropbox folder and below, e.g. `/Reports` (default:
    /// the whole account). Changing it re-baselines: one `UNKNOWN` event, then
    /// the changes under the new folder.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^(/[^/]+)+$"), length(max = 1024))]
    pub path: Option<String>,

    /// How the operator learns of changes: `webhook` (default: Dropbox calls the
    /// webhook ingress, whose URL is registered in the App Console) or
    /// `longpoll` (an ingress replica holds `files/list_folder/longpoll` open
    /// against Dropbox: no public endpoint, no webhook registration and no app
    /// secret needed, e.g. behind a firewall). Delivery and its guarantees are
    /// the same.
    #[serde(default, skip_serializing_if = "EventSource::is_webhook")]
    pub source: EventSource,
}

/// How the operator learns of an instance's changes.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EventSource {
    /// Dropbox calls the webhook ingress (register its URL in the App Console).
    #[default]
    #[serde(rename = "webhook")]
    Webhook,
    /// An ingress replica long-polls Dropbox (`files/list_folder/longpoll`); no
    /// inbound connection is needed.
    #[serde(rename = "longpoll")]
    LongPoll,
}

impl EventSource {
    /// Whether this is the default, webhooks.
    pub fn is_webhook(&self) -> bool {
        *self == EventSource::Webhook
    }
}

/// Payload format of delivered events.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EventFormat {
    /// The Cloud Elements event message.
    #[default]
    #[serde(rename = "elements")]
    Elements,
    /// A CloudEvents 1.0 structured-mode JSON document.
    #[serde(rename = "cloudevents")]
    CloudEvents,
}

fn url_rule() -> Rule {
    Rule::new("isURL(self) && url(self).getScheme() in ['http', 'https'] && url(self).getHostname() != ''")
        .message("must be an absolute http or https URL")
}

/// Observed state of the instance, written by the controller (EventsDelivering
/// and events.lastDeliveryTime mirror what the webhook ingress reports).
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DropboxElementInstanceStatus {
    /// The metadata.generation the status was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Summary of the conditions: Pending, AwaitingAuthorization, Ready, Degraded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,

    /// Authorized, EventsReady, EventsDelivering and Ready, each with a reason from
    /// the documented list.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,

    /// The Dropbox account the instance is connected to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<AccountStatus>,

    /// Where the access token is kept and when it expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<TokenStatus>,

    /// SHA-256 fingerprint (`sha256:<hex>`) of the last authorization code sent to
    /// Dropbox. Codes are single-use: a code with this fingerprint is never sent again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_fingerprint: Option<String>,

    /// Set when a person has to (re-)approve the app. Simplest: run
    /// `kubectl dropbox connect <name>` (docs/user-guide.md, "Connect an account in one
    /// command"). Or open this Dropbox URL (its redirect URI is callbackUrl),
    /// then put the new code in the code Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorize_url: Option<String>,

    /// The Dropbox app key (OAuth client_id) the controller read from the app
    /// Secret (oauth2 instances). Not a secret: every authorize link carries
    /// it. `kubectl dropbox connect` builds its link from it, so it needs no
    /// access to the app Secret, which also holds the app secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app_key: Option<String>,

    /// State of event delivery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events: Option<EventsStatus>,
}

/// Summary phase of an instance.
#[derive(JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Not reconciled yet, or waiting for a transient condition to clear.
    Pending,
    /// A person has to authorize (or re-authorize) the app.
    AwaitingAuthorization,
    /// Connected, and events (when enabled) are flowing.
    Ready,
    /// Connected, but part of the service (events) is not working.
    Degraded,
    /// The configuration cannot work until it is changed.
    Failed,
}

/// The connected Dropbox account.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct AccountStatus {
    /// Dropbox account id (`dbid:...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_id: Option<String>,
    /// Email address of the account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub email: Option<String>,
    /// Display name of the account.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
}

/// Where the tokens are stored and their lifetime.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TokenStatus {
    /// Secret (owned by this instance) holding access_token, refresh_token,
    /// expires_at, account_id and scope.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// When the current access token expires; it is refreshed before then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// When the access token was last obtained or refreshed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_refresh_time: Option<Time>,
}

/// State of event delivery.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct EventsStatus {
    /// Path of the webhook URL to register in the Dropbox app console, relative to
    /// the ingress's public address: /webhooks/dropbox/<appKey>.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub webhook_path: Option<String>,
    /// When events were last delivered to the callback URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delivery_time: Option<Time>,
}

/// Renders the CRD as YAML, exactly as checked in under `crds/`.
pub fn crd_yaml() -> Result<String, crate::yaml::Error> {
    use kube::CustomResourceExt;
    crate::yaml::to_string(&DropboxElementInstance::crd())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checked_in_crd_matches_the_types() {
        let checked_in =
            include_str!("../crds/dropboxelementinstances.elements.dropbox-operator.dev.yaml");
        assert!(
            crd_yaml().expect("render CRD") == checked_in,
            "{CRD_FILE} is stale: run `cargo run -- crd > {CRD_FILE}` and commit it"
        );
    }

    #[test]
    fn every_schema_property_has_a_description() {
        use kube::CustomResourceExt;
        fn walk(path: &str, schema: &serde_json::Value, missing: &mut Vec<String>) {
            if let Some(props) = schema.get("properties").and_then(|p| p.as_object()) {
                for (name, prop) in props {
                    let here = format!("{path}.{name}");
                    let top_level = matches!(here.as_str(), ".apiVersion" | ".kind" | ".metadata");
                    if prop.get("description").is_none() && !top_level {
                        missing.push(here.clone());
                    }
                    walk(&here, prop, missing);
                }
            }
            if let Some(items) = schema.get("items") {
                walk(&format!("{path}[]"), items, missing);
            }
        }
        let crd = serde_json::to_value(DropboxElementInstance::crd()).expect("CRD as JSON");
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let mut missing = Vec::new();
        walk("", schema, &mut missing);
        assert!(
            missing.is_empty(),
            "fields without a description: {missing:?}"
        );
    }
}
