//! The steps of one sync, without the scheduling around them
//! (docs/architecture.md, "Delivery"):
//!
//! - [`Deliverer::list`]: the changes since the committed cursor, as
//!   notifications ready to send. Dropbox may answer with small pages; pages
//!   are gathered into one batch while their events fit one notification
//!   ([`MAX_EVENTS_PER_NOTIFICATION`]), so a notification carries up to 20
//!   events however Dropbox pages, and the cursor to commit is the one after
//!   the last page included. A page that would overflow the batch is kept for
//!   the next one (it was listed from the cursor that batch commits); a page
//!   of more than 20 events is a batch of its own, cut into notifications of 20.
//! - [`Deliverer::attempt`]: one POST to the callback, and what its failure means:
//!   permanent (410, a refused address, other 4xx except 408/409/425/429) or
//!   worth retrying.

use std::time::Duration;

use serde_json::json;

use super::payload::{self, Format, InstanceInfo, MAX_EVENTS_PER_NOTIFICATION, Notification};
use super::projections::Projection;
use super::ssrf::{self, AddressPolicy};
use crate::api::EventFormat;
use crate::conditions::Reason;
use crate::dropbox::{DropboxClient, DropboxError};
use crate::retry::error_chain;

/// Pages listed for one batch at most (Dropbox may answer with empty pages
/// that say more is coming).
const MAX_PAGES_PER_BATCH: usize = 50;

/// A page listed but not yet in a batch: the first page of the next one.
pub struct Page {
    /// The fence epoch it was listed in.
    pub epoch: u64,
    /// The cursor it was listed from.
    pub from: String,
    pub entries: Vec<serde_json::Value>,
    pub cursor: String,
    pub has_more: bool,
}

/// Notifications listed from one committed cursor, and the cursor that
/// follows them.
pub struct Batch {
    /// The fence epoch it was listed in: it may be delivered only in that epoch.
    pub epoch: u64,
    /// The committed cursor it was listed from.
    pub from: String,
    /// The cursor after the last page included.
    pub cursor: String,
    /// More changes are waiting after `cursor`.
    pub has_more: bool,
    /// Its last page was listed from Dropbox just now: when it says no more is
    /// waiting, that holds for changes made before this listing (a batch kept
    /// from an earlier attempt, or a kept page, says nothing about later ones).
    pub fresh: bool,
    pub notifications: Vec<Notification>,
    /// The first notification not delivered yet.
    pub next: usize,
}

/// A failed POST.
#[derive(Debug, Clone)]
pub struct CallbackFailure {
    pub reason: Reason,
    /// Safe to show: never the callback URL's query string or userinfo.
    pub message: String,
    pub retry_after: Option<Duration>,
    /// Retrying cannot help until the callback or the instance changes.
    pub permanent: bool,
}

impl CallbackFailure {
    fn new(reason: Reason, message: impl Into<String>, permanent: bool) -> Self {
        CallbackFailure {
            reason,
            message: message.into(),
            retry_after: None,
            permanent,
        }
    }
}

/// Whether an HTTP answer of the callback is worth retrying: 408, 409, 425,
/// 429, 3xx (a redirect is not followed, but may go away) and 5xx are; 410 and
/// every other 4xx are not.
pub fn retryable(status: u16) -> bool {
    matches!(status, 408 | 409 | 425 | 429) || (300..400).contains(&status) || status >= 500
}

/// What the steps need.
pub struct Deliverer {
    pub dropbox: DropboxClient,
    pub policy: AddressPolicy,
    pub callbacks: reqwest::Client,
}

/// The listing failed before anything was listed.
#[derive(Debug)]
pub enum ListError {
    Dropbox(DropboxError),
    /// The controller has not projected a token.
    NoToken,
}

impl Deliverer {
    /// Lists the changes after the committed `cursor` (committed at
    /// `committed_at`; `reset_pending`: the controller re-baselined it and one
    /// `UNKNOWN` event is due), starting with `carried` when it was listed from
    /// that cursor. Returns the batch and the page kept for the next one.
    /// `newer_token` gives a newer access token once Dropbox refused the
    /// projected one (the controller may have refreshed it).
    #[allow(clippy::too_many_arguments)]
    pub async fn list(
        &self,
        p: &Projection,
        epoch: u64,
        cursor: &str,
        committed_at: jiff::Timestamp,
        reset_pending: bool,
        mut carried: Option<Page>,
        newer_token: impl Fn() -> Option<String>,
    ) -> Result<(Batch, Option<Page>), ListError> {
        let i = &p.instance;
        let mut token = p.access_token.clone().ok_or(ListError::NoToken)?;
        let mut events = Vec::new();
        let mut next = cursor.to_owned();
        let mut has_more;
        let mut pages = 0;
        let mut retried_token = false;
        let mut keep = None;
        let mut fresh = true;
        if reset_pending {
            let origin = payload::PageOrigin {
                instance_uid: &i.uid,
                cursor,
                committed_at,
            };
            events.push(payload::reset_event(&origin));
            // The changes since the new baseline follow in the next sync.
            has_more = true;
        } else {
            loop {
                let kept = carried
                    .take()
                    .filter(|c| c.epoch == epoch && c.from == next);
                fresh = kept.is_none();
                let page = match kept {
                    Some(page) => Ok(page),
                    None => self
                        .dropbox
                        .list_folder_continue(&token, &next)
                        .await
                        .map(|r| Page {
                            epoch,
                            from: next.clone(),
                            entries: r.entries,
                            cursor: r.cursor,
                            has_more: r.has_more,
                        }),
                };
                match page {
                    Ok(page) => {
                        let origin = payload::PageOrigin {
                            instance_uid: &i.uid,
                            cursor: &page.from,
                            committed_at,
                        };
                        let standardized = payload::standardize(&page.entries, &origin);
                        if !events.is_empty()
                            && events.len() + standardized.len() > MAX_EVENTS_PER_NOTIFICATION
                        {
                            // It would split a notification: the next batch's.
                            keep = Some(page);
                            has_more = true;
                            break;
                        }
                        events.extend(standardized);
                        next = page.cursor;
                        has_more = page.has_more;
                        pages += 1;
                        if !has_more
                            || events.len() >= MAX_EVENTS_PER_NOTIFICATION
                            || pages >= MAX_PAGES_PER_BATCH
                        {
                            break;
                        }
                    }
                    Err(e) if e.tag() == Some("reset") && pages == 0 => {
                        // The cursor is no longer valid: start again from now and
                        // tell the receiver that it has to re-read what it tracks.
                        tracing::info!(instance = %p.key(), "cursor reset by Dropbox; re-baselining");
                        let origin = payload::PageOrigin {
                            instance_uid: &i.uid,
                            cursor,
                            committed_at,
                        };
                        next = self
                            .dropbox
                            .latest_cursor(&token, &i.folder)
                            .await
                            .map_err(ListError::Dropbox)?;
                        events.push(payload::reset_event(&origin));
                        has_more = false;
                        break;
                    }
                    Err(DropboxError::Unauthorized { .. }) if pages == 0 && !retried_token => {
                        retried_token = true;
                        match newer_token().filter(|t| *t != token) {
                            Some(t) => token = t,
                            None => {
                                return Err(ListError::Dropbox(DropboxError::Unauthorized {
                                    tag: "the projected access token was refused".into(),
                                }));
                            }
                        }
                    }
                    Err(e) if pages == 0 => return Err(ListError::Dropbox(e)),
                    // What was listed is delivered; the next sync meets the error again.
                    Err(_) => {
                        has_more = true;
                        break;
                    }
                }
            }
        }
        let info = InstanceInfo {
            uid: i.uid.clone(),
            namespace: i.namespace.clone(),
            name: i.name.clone(),
            display_name: i.display_name.clone(),
            tags: i.tags.clone(),
            account_id: i.account_id.clone(),
        };
        let format = match i.format {
            EventFormat::Elements => Format::Elements,
            EventFormat::CloudEvents => Format::CloudEvents,
        };
        // The notification as this instance may see it: its own account only,
        // the same whatever triggered the sync (a webhook, a restart, a resync).
        let raw = json!({"list_folder": {"accounts": [i.account_id]}});
        let batch = Batch {
            epoch,
            from: cursor.to_owned(),
            cursor: next,
            has_more,
            fresh,
            notifications: payload::notifications(&info, &events, &raw, format),
            next: 0,
        };
        Ok((batch, keep))
    }

    /// One POST of `n` to the instance's callback.
    pub async fn attempt(&self, p: &Projection, n: &Notification) -> Result<(), CallbackFailure> {
        let url = url::Url::parse(&p.instance.callback_url).map_err(|_| {
            CallbackFailure::new(
                Reason::CallbackRejected,
                "events.callbackUrl is not a valid URL",
                true,
            )
        })?;
        ssrf::check_url(&self.policy, &url)
            .map_err(|e| CallbackFailure::new(Reason::CallbackForbidden, e.to_string(), true))?;
        let timestamp = jiff::Timestamp::now().as_second();
        let mut request = self
            .callbacks
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, n.content_type)
            .body(n.body.clone());
        for (name, value) in
            payload::signature_headers(p.signature_key.as_deref(), &n.event_id, timestamp, &n.body)
        {
            request = request.header(name, value);
        }
        let response = request.send().await.map_err(|e| {
            if let Some(forbidden) = ssrf::forbidden_in(&e) {
                CallbackFailure::new(Reason::CallbackForbidden, forbidden.to_string(), true)
            } else {
                let what = if e.is_timeout() {
                    "timed out"
                } else {
                    "could not connect"
                };
                CallbackFailure::new(
                    Reason::CallbackUnreachable,
                    // without_url: callback URLs are capability URLs, never shown.
                    format!("the callback {what}: {}", error_chain(&e.without_url())),
                    false,
                )
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(());
        }
        let retry_after = response
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(crate::retry::retry_after);
        let code = status.as_u16();
        let reason = if code == 429 || status.is_server_error() {
            Reason::CallbackUnreachable
        } else {
            Reason::CallbackRejected
        };
        let message = if status.is_redirection() {
            format!("the callback answered HTTP {code} (redirects are not followed)")
        } else {
            format!("the callback answered HTTP {code}")
        };
        Err(CallbackFailure {
            reason,
            message,
            retry_after,
            permanent: !retryable(code),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn which_answers_are_worth_retrying() {
        for code in [408, 409, 425, 429, 500, 502, 503, 504, 307, 301] {
            assert!(retryable(code), "{code}");
        }
        for code in [400, 401, 403, 404, 405, 410, 413, 422] {
            assert!(!retryable(code), "{code}");
        }
    }
}
