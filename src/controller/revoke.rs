//! Revoking a token family (`auth/token/revoke`: the access token, the refresh
//! token it came from and every access token of that refresh token).
//!
//! Revoke takes an access token, so an expired one is refreshed first, with the
//! app credentials the token Secret keeps (`app_key`/`app_secret`) or the app
//! Secret's: during a namespace deletion the app Secret is often gone before the
//! token Secret, whose finalizer holds it until this has run. A refresh token
//! Dropbox refuses (`invalid_grant`) proves the family is already dead. Used by
//! deletion, the orphan sweep, a controller that steps down with tokens it
//! could not store, and `dropbox-operator release-finalizers`.

use std::time::Duration;

use super::token::{AppCredentials, StoredToken};
use crate::dropbox::{DropboxClient, DropboxError};

/// How a revocation ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Revocation {
    Revoked,
    /// Dropbox no longer knows the tokens (revoked before, or the user
    /// disconnected the app).
    AlreadyInvalid,
    /// The tokens may still be valid: why.
    Failed(String),
    /// Not finished within the bound.
    TimedOut,
}

impl Revocation {
    /// Low-cardinality label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Revocation::Revoked => "revoked",
            Revocation::AlreadyInvalid => "already_invalid",
            Revocation::Failed(_) => "failed",
            Revocation::TimedOut => "timeout",
        }
    }

    /// Whether the tokens are known to be dead.
    pub fn done(&self) -> bool {
        matches!(self, Revocation::Revoked | Revocation::AlreadyInvalid)
    }
}

/// Revokes `tokens` within `bound`. `app` is the app Secret's credentials when
/// they can be read; the ones the tokens keep are tried first.
pub async fn revoke(
    dropbox: &DropboxClient,
    tokens: &StoredToken,
    app: Option<&AppCredentials>,
    bound: Duration,
) -> Revocation {
    tokio::time::timeout(bound, attempt(dropbox, tokens, app))
        .await
        .unwrap_or(Revocation::TimedOut)
}

async fn attempt(
    dropbox: &DropboxClient,
    tokens: &StoredToken,
    app: Option<&AppCredentials>,
) -> Revocation {
    if !tokens.expired(jiff::Timestamp::now()) {
        match dropbox.revoke(&tokens.access_token).await {
            Ok(()) => return Revocation::Revoked,
            // Expired meanwhile, or revoked before: the refresh token tells which.
            Err(DropboxError::Unauthorized { .. }) => {}
            Err(e) => return Revocation::Failed(e.to_string()),
        }
    }
    let Some(refresh_token) = &tokens.refresh_token else {
        // A token without a refresh token is all of its family, and it is
        // expired or refused.
        return Revocation::AlreadyInvalid;
    };
    let mut candidates: Vec<&AppCredentials> = tokens.app.iter().collect();
    if let Some(app) = app
        && !candidates.contains(&app)
    {
        candidates.push(app);
    }
    if candidates.is_empty() {
        return Revocation::Failed(
            "the access token has expired and no app credentials are left to refresh it (the app Secret \
             is gone and the token Secret keeps none), so the refresh token stays valid"
                .into(),
        );
    }
    let mut refused = String::new();
    for app in candidates {
        match dropbox
            .refresh(&app.client_id, &app.client_secret, refresh_token)
            .await
        {
            Ok(fresh) => {
                return match dropbox.revoke(&fresh.access_token).await {
                    Ok(()) => Revocation::Revoked,
                    Err(e) => Revocation::Failed(e.to_string()),
                };
            }
            Err(DropboxError::InvalidGrant { .. }) => return Revocation::AlreadyInvalid,
            Err(e @ DropboxError::InvalidClient { .. }) => refused = e.to_string(),
            Err(e) => return Revocation::Failed(e.to_string()),
        }
    }
    Revocation::Failed(format!(
        "refreshing the expired access token for its revocation failed: {refused}"
    ))
}
