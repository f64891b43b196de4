//! The durable records of an instance's credentials, and their arithmetic:
//!
//! - the token Secret `<name>-dropbox-token` (shortened with a hash when the
//!   instance's name is too long for it), owned by the instance (so the garbage
//!   collector removes it with the instance) and kept by the revoke finalizer
//!   until the token is revoked: `access_token`, `refresh_token`, `expires_at`,
//!   `account_id`, `scope`, and `app_key`/`app_secret`, the app credentials the
//!   tokens were issued to, so they can be refreshed for revocation when the app
//!   Secret is gone (a namespace deletion removes it first);
//! - the set of codes the instance sent ([`SpentCodes`], an annotation on the
//!   instance), each never sent again.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::{Resource, ResourceExt};

use crate::api::{DropboxElementInstance, TokenStatus};

pub const ACCESS_TOKEN: &str = "access_token";
pub const REFRESH_TOKEN: &str = "refresh_token";
pub const EXPIRES_AT: &str = "expires_at";
pub const ACCOUNT_ID: &str = "account_id";
pub const SCOPE: &str = "scope";
/// The app key the tokens were issued to (kept for revocation).
pub const APP_KEY: &str = "app_key";
/// The app secret the tokens were issued with (kept for revocation).
pub const APP_SECRET: &str = "app_secret";

use crate::contract::{self, INSTANCE_LABEL, MANAGED_BY, MANAGED_BY_LABEL};
/// Annotation on the token Secret: fingerprint of the code the tokens came from.
pub const CODE_FINGERPRINT_ANNOTATION: &str = "elements.dropbox-operator.dev/code-fingerprint";

/// Finalizer that revokes the Dropbox token before the instance (and its token
/// Secret) goes away.
pub const FINALIZER: &str = "elements.dropbox-operator.dev/revoke-token";

/// Annotation on the instance: the fingerprints of the authorization codes it
/// sent to Dropbox, oldest first, comma-separated, at most [`SpentCodes::MAX`].
/// Each is written BEFORE its code is sent, and a code whose fingerprint is
/// here is never sent again, also after a crash, a restart or a failover.
pub const CODE_SENT_ANNOTATION: &str = "elements.dropbox-operator.dev/code-sent";

/// Annotation on the instance: the resourceVersion of the code Secret as it was
/// when its code went into [`CODE_SENT_ANNOTATION`] (written in the same write,
/// left out when the Secret's code is not spent). While the code Secret still
/// has that version, it holds nothing to send: a restarted controller knows it
/// from the metadata watch, without reading the Secret (`settled.rs`).
pub const CODE_SECRET_VERSION_ANNOTATION: &str =
    "elements.dropbox-operator.dev/code-secret-version";

/// Name of the token Secret of instance `name`: `<name>-dropbox-token`, with
/// the name shortened (a prefix and a hash) when that would exceed the 253
/// characters of an object name.
pub fn secret_name(instance: &str) -> String {
    const SUFFIX: &str = "-dropbox-token";
    format!(
        "{}{SUFFIX}",
        contract::shorten(instance, 253 - SUFFIX.len())
    )
}

/// The Dropbox app key and secret. Debug output hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct AppCredentials {
    pub client_id: String,
    pub client_secret: String,
}

impl fmt::Debug for AppCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppCredentials")
            .field("client_id", &self.client_id)
            .field("client_secret", &"<redacted>")
            .finish()
    }
}

/// A secret string whose Debug output is redacted.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(pub String);

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

/// The fingerprints of the codes an instance sent, oldest first, bounded: a
/// GitOps tool may put back any of the last [`SpentCodes::MAX`] codes, and
/// none of them is sent again.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SpentCodes(Vec<String>);

impl SpentCodes {
    /// How many fingerprints are remembered.
    pub const MAX: usize = 16;

    /// The annotation's value (see [`CODE_SENT_ANNOTATION`]); a value written
    /// before the set existed holds one fingerprint, which parses the same.
    pub fn parse(annotation: Option<&str>) -> Self {
        let mut set = SpentCodes::default();
        for fp in annotation.unwrap_or_default().split(',') {
            let fp = fp.trim();
            if !fp.is_empty() {
                set = set.with(fp);
            }
        }
        set
    }

    /// The value to write, None when empty (the annotation is left out).
    pub fn to_annotation(&self) -> Option<String> {
        (!self.0.is_empty()).then(|| self.0.join(","))
    }

    pub fn contains(&self, fingerprint: &str) -> bool {
        self.0.iter().any(|f| f == fingerprint)
    }

    /// The code sent last.
    pub fn latest(&self) -> Option<&str> {
        self.0.last().map(String::as_str)
    }

    /// With `fingerprint` as the latest (moved to the end when it was there).
    pub fn with(&self, fingerprint: &str) -> Self {
        let mut codes: Vec<String> = self
            .0
            .iter()
            .filter(|f| *f != fingerprint)
            .cloned()
            .collect();
        codes.push(fingerprint.to_owned());
        let excess = codes.len().saturating_sub(Self::MAX);
        codes.drain(..excess);
        SpentCodes(codes)
    }

    /// With `fingerprint` remembered, as an older code, when it is not there
    /// (fingerprints recorded elsewhere before the set existed).
    pub fn with_older(&self, fingerprint: &str) -> Self {
        if self.contains(fingerprint) {
            return self.clone();
        }
        let mut codes = vec![fingerprint.to_owned()];
        codes.extend(self.0.iter().cloned());
        let excess = codes.len().saturating_sub(Self::MAX);
        codes.drain(..excess);
        SpentCodes(codes)
    }

    /// Without `fingerprint` (a code Dropbox provably did not consume).
    pub fn without(&self, fingerprint: &str) -> Self {
        SpentCodes(
            self.0
                .iter()
                .filter(|f| *f != fingerprint)
                .cloned()
                .collect(),
        )
    }
}

/// Tokens as stored in the token Secret. Debug output hides the tokens.
#[derive(Clone, PartialEq, Eq)]
pub struct StoredToken {
    pub access_token: String,
    pub refresh_token: Option<String>,
    pub expires_at: Option<jiff::Timestamp>,
    pub account_id: Option<String>,
    pub scope: Option<String>,
    pub code_fingerprint: Option<String>,
    /// The app credentials the tokens were issued (or last refreshed) with.
    pub app: Option<AppCredentials>,
}

impl StoredToken {
    /// Whether the access token has expired at `now` (a token without an
    /// expiry does not expire).
    pub fn expired(&self, now: jiff::Timestamp) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

impl fmt::Debug for StoredToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredToken")
            .field("expires_at", &self.expires_at)
            .field("account_id", &self.account_id)
            .field("has_refresh_token", &self.refresh_token.is_some())
            .finish()
    }
}

fn text(data: &BTreeMap<String, ByteString>, key: &str) -> Option<String> {
    data.get(key)
        .map(|ByteString(b)| String::from_utf8_lossy(b).into_owned())
        .filter(|v| !v.is_empty())
}

fn kept_app(data: &BTreeMap<String, ByteString>) -> Option<AppCredentials> {
    Some(AppCredentials {
        client_id: text(data, APP_KEY)?,
        client_secret: text(data, APP_SECRET)?,
    })
}

/// Whether the Secret is this instance's token Secret: made by the operator
/// (managed-by label) and owned by the instance. Anything else of that name is
/// someone else's and is never overwritten.
pub fn is_ours(secret: &Secret, owner: &DropboxElementInstance) -> bool {
    contract::is_managed(secret.metadata.labels.as_ref())
        && secret
            .owner_references()
            .iter()
            .any(|r| Some(&r.uid) == owner.meta().uid.as_ref())
}

/// An expiry as stored; one that cannot be parsed, or that no Dropbox token
/// could have (before 2000 or more than a year ahead: they live hours), counts
/// as already expired, so the token is refreshed rather than trusted.
pub fn sane_expiry(text: &str) -> jiff::Timestamp {
    let expired = jiff::Timestamp::UNIX_EPOCH;
    let Ok(t) = text.parse::<jiff::Timestamp>() else {
        return expired;
    };
    let floor = jiff::Timestamp::from_second(946_684_800).unwrap_or(expired);
    let ceiling = jiff::Timestamp::now()
        .checked_add(jiff::SignedDuration::from_hours(24 * 366))
        .unwrap_or(jiff::Timestamp::MAX);
    if t < floor || t > ceiling { expired } else { t }
}

impl StoredToken {
    /// Parses the token Secret; `None` when it is not this instance's (another
    /// owner) or holds no access token.
    pub fn from_secret(secret: &Secret, owner: &DropboxElementInstance) -> Option<StoredToken> {
        let owned = secret
            .owner_references()
            .iter()
            .any(|r| Some(&r.uid) == owner.meta().uid.as_ref());
        if !owned {
            return None;
        }
        Self::from_any_secret(secret)
    }

    /// Parses a token Secret whatever owns it (the orphan sweep and
    /// `release-finalizers` read Secrets whose instance is gone).
    pub fn from_any_secret(secret: &Secret) -> Option<StoredToken> {
        let data = secret.data.as_ref()?;
        Some(StoredToken {
            access_token: text(data, ACCESS_TOKEN)?,
            refresh_token: text(data, REFRESH_TOKEN),
            expires_at: text(data, EXPIRES_AT).map(|t| sane_expiry(&t)),
            account_id: text(data, ACCOUNT_ID),
            scope: text(data, SCOPE),
            code_fingerprint: secret
                .annotations()
                .get(CODE_FINGERPRINT_ANNOTATION)
                .cloned(),
            app: kept_app(data),
        })
    }

    /// The desired token Secret, for server-side apply.
    pub fn to_secret(&self, owner: &DropboxElementInstance) -> Secret {
        let mut data = BTreeMap::new();
        let mut put = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                data.insert(k.to_owned(), ByteString(v.clone().into_bytes()));
            }
        };
        put(ACCESS_TOKEN, &Some(self.access_token.clone()));
        put(REFRESH_TOKEN, &self.refresh_token);
        put(EXPIRES_AT, &self.expires_at.map(|t| t.to_string()));
        put(ACCOUNT_ID, &self.account_id);
        put(SCOPE, &self.scope);
        put(APP_KEY, &self.app.as_ref().map(|a| a.client_id.clone()));
        put(
            APP_SECRET,
            &self.app.as_ref().map(|a| a.client_secret.clone()),
        );
        let name = owner.name_any();
        Secret {
            metadata: ObjectMeta {
                name: Some(secret_name(&name)),
                namespace: owner.namespace(),
                labels: Some(BTreeMap::from([
                    (MANAGED_BY_LABEL.to_owned(), MANAGED_BY.to_owned()),
                    (INSTANCE_LABEL.to_owned(), contract::label_value(&name)),
                ])),
                annotations: self.code_fingerprint.as_ref().map(|fp| {
                    BTreeMap::from([(CODE_FINGERPRINT_ANNOTATION.to_owned(), fp.clone())])
                }),
                owner_references: owner.controller_owner_ref(&()).map(|r| vec![r]),
                // Kept until the controller revoked the token (namespace
                // deletion, foreground cascade): see controller::finalizer.
                finalizers: Some(vec![FINALIZER.to_owned()]),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(data),
            ..Default::default()
        }
    }
}

// Token arithmetic, all checked: an absurd value means "expired", never a panic.

/// The tokens of a token endpoint answer, completed from the tokens they
/// replace (Dropbox's refresh answer carries neither refresh token nor account),
/// issued with `app`.
pub fn token_from_response(
    response: crate::dropbox::TokenResponse,
    previous: Option<&StoredToken>,
    code_fingerprint: Option<&str>,
    issued_at: jiff::Timestamp,
    app: &AppCredentials,
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
        app: Some(app.clone()),
    }
}

/// `status.token` for tokens kept in Secret `secret_name`.
pub fn token_status(
    secret_name: &str,
    stored: &StoredToken,
    last_refresh: Option<Time>,
) -> TokenStatus {
    TokenStatus {
        secret_name: Some(secret_name.to_owned()),
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
    Some(refresh_before(stored.expires_at?, last_refresh, margin))
}

/// [`refresh_at`] for a token that expires at `expires_at`.
pub fn refresh_before(
    expires_at: jiff::Timestamp,
    last_refresh: Option<&Time>,
    margin: Duration,
) -> jiff::Timestamp {
    let margin =
        jiff::SignedDuration::try_from(margin).unwrap_or(jiff::SignedDuration::from_secs(300));
    let margin = match last_refresh {
        Some(Time(issued)) if *issued < expires_at => {
            margin.min(expires_at.duration_since(*issued) / 2)
        }
        _ => margin,
    };
    expires_at.checked_sub(margin).unwrap_or(expires_at)
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
            app: None,
        }
    }

    #[test]
    fn token_secret_names_fit_for_every_valid_instance_name() {
        assert_eq!(secret_name("marketing"), "marketing-dropbox-token");
        let longest = "a".repeat(239);
        assert_eq!(secret_name(&longest), format!("{longest}-dropbox-token"));
        let a = format!("{}.b", "x".repeat(251));
        let b = format!("{}.c", "x".repeat(251));
        let (na, nb) = (secret_name(&a), secret_name(&b));
        assert!(na.len() <= 253 && nb.len() <= 253, "{na}");
        assert_ne!(na, nb);
        assert!(na.ends_with("-dropbox-token"));
    }

    #[test]
    fn spent_codes_are_a_bounded_ordered_set() {
        let set = SpentCodes::parse(Some("sha256:a"));
        assert_eq!(set.latest(), Some("sha256:a"));
        let set = set.with("sha256:b").with("sha256:a");
        assert_eq!(set.to_annotation().as_deref(), Some("sha256:b,sha256:a"));
        let mut many = SpentCodes::default();
        for i in 0..40 {
            many = many.with(&format!("sha256:{i}"));
        }
        assert!(!many.contains("sha256:23") && many.contains("sha256:24"));
        assert_eq!(many.latest(), Some("sha256:39"));
        assert_eq!(many.with_older("sha256:old").latest(), Some("sha256:39"));
        assert!(SpentCodes::parse(Some(" , ")).to_annotation().is_none());
        assert!(!set.without("sha256:a").contains("sha256:a"));
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
