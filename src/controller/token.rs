//! The token Secret `<name>-dropbox-token`, owned by the instance (so the garbage
//! collector removes it with the instance) and kept by the revoke finalizer
//! until the token is revoked: `access_token`, `refresh_token`, `expires_at`,
//! `account_id`, `scope`. Also the token arithmetic: expiry, refresh time.

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

use crate::contract::{self, INSTANCE_LABEL, MANAGED_BY, MANAGED_BY_LABEL};
/// Annotation on the token Secret: fingerprint of the code the tokens came from.
pub const CODE_FINGERPRINT_ANNOTATION: &str = "elements.dropbox-operator.dev/code-fingerprint";

/// Name of the token Secret of instance `name`.
pub fn secret_name(instance: &str) -> String {
    format!("{instance}-dropbox-token")
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
                finalizers: Some(vec![super::finalizer::FINALIZER.to_owned()]),
                ..Default::default()
            },
            type_: Some("Opaque".into()),
            data: Some(data),
            ..Default::default()
        }
    }
}

// Token arithmetic, all checked: an absurd value means "expired", never a panic.

pub fn token_from_response(
    response: crate::dropbox::TokenResponse,
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

pub fn token_status(
    instance: &DropboxElementInstance,
    stored: &StoredToken,
    last_refresh: Option<Time>,
) -> TokenStatus {
    TokenStatus {
        secret_name: Some(secret_name(&instance.name_any())),
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

pub fn until(t: jiff::Timestamp) -> Duration {
    Duration::try_from(t.duration_since(super::reconcile::now())).unwrap_or(Duration::ZERO)
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
