//! The OAuth lifecycle of one instance, as one state machine: its states, what
//! it observes and its transitions, read together here (docs/architecture.md,
//! "The credential state machine", has the diagram).
//!
//! A reconcile gathers [`Facts`] once (`gather.rs`): the instance, its Secrets,
//! the codes it sent, the tokens kept in memory. Then [`start`] gives the first
//! state and [`Effect`]; the executor (`execute.rs`) carries out each effect
//! (with fenced writes) and reports what happened as an [`Observation`];
//! [`decide`] turns (state, observation) into the next state and effect. The
//! machine ends in a [`Verdict`] for the status (`Finished`) or with the
//! instance released (`Released`, deletion).
//!
//! Everything here is pure: no API server, no Dropbox, no clock but
//! `facts.now`, so every transition is tested from a table below.
//!
//! The rules it encodes (docs/reference.md, "Conditions and reasons"):
//! - a code is single-use and never burned by us: everything that must succeed
//!   after the exchange is proven before it (the token Secret write, by a dry
//!   run; the app key and secret, by Dropbox's `check/app`), and its fingerprint
//!   is recorded on the instance before it is sent. After any answer, or none,
//!   it is spent; only 429, 5xx or a connection never made give it back.
//! - every code an instance sent is remembered (the last [`SpentCodes::MAX`]):
//!   putting one back (a GitOps tool restoring an old Secret) sends nothing and
//!   keeps the working tokens.
//! - tokens are refreshed before they expire; a refresh token Dropbox refuses
//!   asks a person to approve again.
//! - deletion revokes every token that existed (stored, or only in memory),
//!   then releases the token Secret and the instance.

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use super::common::Next;
use super::inputs::Problem;
use super::token::{
    AppCredentials, SecretString, SpentCodes, StoredToken, refresh_at, token_from_response,
    token_status,
};
use crate::api::{AccountStatus, DropboxElementInstanceStatus};
use crate::conditions::{self, AUTHORIZED, Desired, Reason};
use crate::dropbox::{Account, DropboxError, TokenResponse};

// ---- what the machine starts from --------------------------------------------

/// Everything a reconcile knows before it acts, gathered once.
#[derive(Clone, Debug)]
pub struct Facts {
    pub now: jiff::Timestamp,
    /// The instance carries a deletion timestamp.
    pub deleting: bool,
    /// The instance carries the revoke finalizer.
    pub has_finalizer: bool,
    pub auth: Auth,
    /// The app credentials of the app Secret, when it can be read.
    pub app: Option<AppCredentials>,
    /// Every code the instance sent (its annotation, with the fingerprints
    /// status and the token Secret name).
    pub spent: SpentCodes,
    /// The status as it is.
    pub status: DropboxElementInstanceStatus,
    pub token_secret: TokenSecret,
    /// Tokens Dropbox issued that the API server has not stored yet.
    pub kept: Option<Kept>,
    pub texts: Texts,
    pub refresh_margin: Duration,
    pub resync_interval: Duration,
}

/// What the instance's credentials resolve to.
#[derive(Clone, Debug)]
pub enum Auth {
    /// A referenced Secret or key is not there: the user has to fix it.
    Problem(Problem),
    OAuth2 {
        /// The code in the code Secret, None when there is none.
        code: Option<Code>,
        /// Where a person approves the app (status.authorizeUrl).
        authorize_url: String,
    },
    ApiKey {
        token: SecretString,
    },
}

/// An authorization code, as the code Secret holds it.
#[derive(Clone, Debug)]
pub struct Code {
    pub value: SecretString,
    /// `sha256:<hex>` of the code: what is remembered, never the code.
    pub fingerprint: String,
    /// The PKCE verifier stored next to it.
    pub verifier: Option<SecretString>,
    /// The redirect URI the exchange sends (None: none).
    pub redirect_uri: Option<String>,
}

/// The token Secret.
#[derive(Clone, Debug, PartialEq)]
pub enum TokenSecret {
    Absent,
    /// Made by the operator for this instance.
    Ours {
        tokens: Option<StoredToken>,
        /// Someone deletes it while the instance lives.
        deleting: bool,
    },
}

impl TokenSecret {
    fn tokens(&self) -> Option<&StoredToken> {
        match self {
            TokenSecret::Ours { tokens, .. } => tokens.as_ref(),
            TokenSecret::Absent => None,
        }
    }
}

/// Tokens held in memory because the API server did not store them.
#[derive(Clone, Debug, PartialEq)]
pub struct Kept {
    pub tokens: StoredToken,
    pub origin: Origin,
    pub issued_at: jiff::Timestamp,
}

/// Where tokens came from: a code (a new grant, nowhere else: revoked when
/// they cannot be stored) or a refresh (the same grant as the stored tokens).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Origin {
    Code,
    Refresh,
}

/// Instance-specific words of the messages.
#[derive(Clone, Debug, Default)]
pub struct Texts {
    /// `Secret "x" key "code"`.
    pub code_location: String,
    /// `Secret "dropbox-app"`.
    pub app_location: String,
    /// How a person approves the app again.
    pub reapprove_hint: String,
    /// The token Secret's name.
    pub token_secret: String,
}

// ---- what the machine does and sees ---------------------------------------------

/// What the executor does for the machine.
#[derive(Clone, Debug, PartialEq)]
pub enum Effect {
    /// Writes the finalizer and the set of spent codes on the instance, in one
    /// write fenced by the resourceVersion the decision read.
    Record(SpentCodes),
    /// Claims the code in this process: no other instance is sending it, and no
    /// other instance recorded it as sent.
    Claim,
    /// Gives the claim back: the code was not sent, or Dropbox did not consume it.
    Unclaim,
    /// Proves that the token Secret would be admitted (a server-side dry run).
    ProveStorage,
    /// Proves the app key and secret with Dropbox (`check/app`, app auth).
    ProveApp,
    /// Sends the code to Dropbox: the one effect that spends it.
    SendCode,
    /// Writes the token Secret (fenced); when the API server refuses, the
    /// tokens are kept in memory.
    Store(Kept),
    /// Refreshes the access token with this refresh token.
    Refresh(String),
    /// Reads the Dropbox account of an access token.
    ReadAccount(SecretString),
    /// Revokes these tokens (refreshing an expired access token first, with
    /// the app credentials the tokens kept or the app Secret's), bounded.
    Revoke(Vec<StoredToken>),
    /// Removes the finalizer from the token Secret.
    ReleaseTokenSecret,
    /// Removes the finalizer from the instance.
    ReleaseInstance,
}

/// What an effect came to.
#[derive(Debug)]
pub enum Observation {
    /// The start of a reconcile.
    Begin,
    /// The effect succeeded with nothing more to say.
    Done,
    /// The API server or Dropbox refused (who holds a claimed code, why the
    /// token Secret or the app credentials are refused).
    Refused(String),
    /// Dropbox issued tokens (a code exchange or a refresh), at `issued_at`.
    Tokens(TokenResponse, jiff::Timestamp),
    /// A Dropbox request failed.
    Failed(DropboxError),
    /// The account of an access token.
    Account(Account),
}

/// Working tokens and what is known about them.
#[derive(Clone, Debug, PartialEq)]
pub struct Tokens {
    pub stored: StoredToken,
    pub last_refresh: Option<Time>,
    /// The code they came from.
    pub fingerprint: Option<String>,
    /// Said in Authorized's message (an already-used code in the Secret).
    pub note: Option<String>,
}

/// What status says about the credentials, and when to come back.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    pub authorized: Desired,
    pub account: Option<AccountStatus>,
    pub token_status: Option<crate::api::TokenStatus>,
    pub code_fingerprint: Option<String>,
    pub authorize_url: Option<String>,
    pub next: Next,
    /// The working access token, when Authorized is True (for the events step).
    pub access_token: Option<SecretString>,
}

/// Progress through the start of a reconcile.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Progress {
    /// The finalizer is on the instance.
    pub finalizer: bool,
    /// A token Secret someone deleted was revoked and let go.
    pub released_deleted_secret: bool,
}

/// Where the machine is.
#[derive(Clone, Debug, PartialEq)]
pub enum State {
    /// Every reconcile starts here.
    Start(Progress),
    /// The finalizer goes on before any token can exist.
    AddingFinalizer(Progress),
    /// Someone deletes the token Secret while the instance lives: what it holds
    /// is revoked, then it is let go (the instance then needs a new code).
    RevokingDeletedSecret(Progress),
    ReleasingDeletedSecret(Progress),
    /// Tokens kept in memory are stored before anything else.
    StoringKept(Kept),
    /// A code never sent, step by step: claimed, proven, recorded, sent.
    Claiming,
    ProvingStorage,
    ProvingApp,
    Recording,
    Exchanging,
    /// Dropbox issued tokens for the code; they are being stored.
    StoringIssued(Tokens),
    /// Dropbox did not consume the code: it is taken off the spent set.
    GivingBack(Box<Verdict>),
    /// Working tokens: refreshed when due, their account read when unknown.
    Refreshing(Tokens),
    StoringRefreshed(Tokens),
    ReadingAccount(Tokens),
    /// apiKey: the long-lived token is verified.
    VerifyingKey,
    /// Deletion: revoke, then release the token Secret and the instance.
    Revoking,
    ReleasingTokenSecret,
    ReleasingInstance,
    /// One last effect (giving a claim back) before the verdict.
    Finishing(Box<Verdict>),
    /// Done: the verdict goes to status.
    Finished(Box<Verdict>),
    /// Done: the instance was released (deletion).
    Released,
    /// An observation that does not belong to the state (a bug, reported).
    Stuck(String),
}

/// The next state and what to do for it.
#[derive(Clone, Debug, PartialEq)]
pub struct Step {
    pub state: State,
    pub effect: Option<Effect>,
}

fn go(state: State, effect: Effect) -> Step {
    Step {
        state,
        effect: Some(effect),
    }
}

/// The claim on a code given back, then the verdict.
fn unclaim_then(verdict: Verdict) -> Step {
    go(State::Finishing(Box::new(verdict)), Effect::Unclaim)
}

fn finish(verdict: Verdict) -> Step {
    Step {
        state: State::Finished(Box::new(verdict)),
        effect: None,
    }
}

/// The first step of a reconcile.
pub fn start(facts: &Facts) -> Step {
    decide(
        State::Start(Progress {
            finalizer: facts.has_finalizer,
            released_deleted_secret: false,
        }),
        Observation::Begin,
        facts,
    )
}

// ---- the transitions ------------------------------------------------------------

/// The machine: (state, observation) → next state and effect.
pub fn decide(state: State, observation: Observation, facts: &Facts) -> Step {
    use Observation as O;
    use State as S;
    match (state, observation) {
        // -- the start: deletion, then what must come first ---------------------
        (S::Start(_), O::Begin) if facts.deleting => {
            let mut tokens: Vec<StoredToken> =
                facts.token_secret.tokens().cloned().into_iter().collect();
            if let Some(kept) = &facts.kept {
                tokens.push(kept.tokens.clone());
            }
            if tokens.is_empty() {
                release(facts)
            } else {
                go(S::Revoking, Effect::Revoke(tokens))
            }
        }
        (S::Start(p), O::Begin) => begin(p, facts),

        (S::AddingFinalizer(p), O::Done) => begin(
            Progress {
                finalizer: true,
                ..p
            },
            facts,
        ),
        (S::RevokingDeletedSecret(p), O::Done) => {
            go(S::ReleasingDeletedSecret(p), Effect::ReleaseTokenSecret)
        }
        (S::ReleasingDeletedSecret(p), O::Done) => begin(
            Progress {
                released_deleted_secret: true,
                ..p
            },
            facts,
        ),

        // -- tokens kept in memory ---------------------------------------------------
        (S::StoringKept(kept), O::Done) => {
            let tokens = Tokens {
                fingerprint: kept.tokens.code_fingerprint.clone(),
                last_refresh: Some(Time(kept.issued_at)),
                stored: kept.tokens,
                note: None,
            };
            with_code(Some(tokens), facts)
        }
        (S::StoringKept(kept), O::Refused(why)) => finish(not_stored(&kept, &why, facts)),

        // -- a new code ---------------------------------------------------------------
        (S::Claiming, O::Done) => go(S::ProvingStorage, Effect::ProveStorage),
        (S::Claiming, O::Refused(holder)) => finish(used_elsewhere(&holder, facts)),
        (S::ProvingStorage, O::Done) => go(S::ProvingApp, Effect::ProveApp),
        (S::ProvingStorage, O::Refused(why)) => unclaim_then(verdict(
            facts,
            Desired::new(
                AUTHORIZED,
                Some(false),
                Reason::TokensNotStored,
                format!(
                    "The API server would refuse the token Secret ({why}); the authorization code is \
                     kept, unsent, until it can be stored"
                ),
            ),
            Next::Backoff { at_least: None },
        )),
        (S::ProvingApp, O::Done) => match new_code(facts) {
            Some(code) => go(
                S::Recording,
                Effect::Record(facts.spent.with(&code.fingerprint)),
            ),
            None => stuck("a code to record"),
        },
        (S::ProvingApp, O::Refused(why)) => unclaim_then(verdict(
            facts,
            Desired::new(
                AUTHORIZED,
                Some(false),
                Reason::InvalidClient,
                format!(
                    "Dropbox refused the app key or secret in {} ({why}); the authorization code is \
                     kept, unsent, until they are fixed",
                    facts.texts.app_location
                ),
            ),
            Next::WaitForChange,
        )),
        (S::ProvingApp, O::Failed(e)) => unclaim_then(verdict(
            facts,
            dropbox_condition(&e, "Checking the app key and secret with Dropbox failed"),
            Next::Backoff {
                at_least: e.retry_after(),
            },
        )),
        (S::Recording, O::Done) => go(S::Exchanging, Effect::SendCode),
        (S::Exchanging, O::Tokens(response, issued_at)) => {
            let (Some(code), Some(app)) = (new_code(facts), facts.app.as_ref()) else {
                return stuck("the code and the app that were sent");
            };
            let stored =
                token_from_response(response, None, Some(&code.fingerprint), issued_at, app);
            let tokens = Tokens {
                stored: stored.clone(),
                last_refresh: Some(Time(issued_at)),
                fingerprint: Some(code.fingerprint.clone()),
                note: None,
            };
            go(
                S::StoringIssued(tokens),
                Effect::Store(Kept {
                    tokens: stored,
                    origin: Origin::Code,
                    issued_at,
                }),
            )
        }
        (S::Exchanging, O::Failed(e)) if e.proves_not_consumed() => {
            let Some(code) = new_code(facts) else {
                return stuck("the code that was sent");
            };
            let v = verdict(
                facts,
                dropbox_condition(&e, "Exchanging the authorization code failed"),
                Next::Backoff {
                    at_least: e.retry_after(),
                },
            );
            go(
                S::GivingBack(Box::new(v)),
                Effect::Record(facts.spent.without(&code.fingerprint)),
            )
        }
        (S::Exchanging, O::Failed(e)) => finish(exchange_failed(&e, facts)),
        (S::GivingBack(v), O::Done) => unclaim_then(*v),
        (S::StoringIssued(tokens), O::Done) => account_or_valid(tokens, facts),
        (S::StoringIssued(tokens), O::Refused(why)) => finish(not_stored(
            &Kept {
                issued_at: tokens
                    .last_refresh
                    .as_ref()
                    .map(|t| t.0)
                    .unwrap_or(facts.now),
                tokens: tokens.stored,
                origin: Origin::Code,
            },
            &why,
            facts,
        )),

        // -- working tokens -------------------------------------------------------------
        (S::Refreshing(tokens), O::Tokens(response, issued_at)) => {
            let Some(app) = facts.app.as_ref() else {
                return stuck("the app that refreshed");
            };
            let stored = token_from_response(response, Some(&tokens.stored), None, issued_at, app);
            go(
                S::StoringRefreshed(Tokens {
                    stored: stored.clone(),
                    last_refresh: Some(Time(issued_at)),
                    ..tokens
                }),
                Effect::Store(Kept {
                    tokens: stored,
                    origin: Origin::Refresh,
                    issued_at,
                }),
            )
        }
        (S::Refreshing(tokens), O::Failed(e)) => finish(refresh_failed(&tokens, &e, facts)),
        (S::StoringRefreshed(tokens), O::Done) => account_or_valid(tokens, facts),
        (S::StoringRefreshed(tokens), O::Refused(why)) => {
            let mut v = valid(&tokens, facts);
            v.authorized.message = format!(
                "The access token was refreshed, but the API server refused the token Secret ({why}); the \
                 tokens are kept in memory and stored as soon as it accepts them"
            );
            v.next = Next::Backoff { at_least: None };
            finish(v)
        }
        (S::ReadingAccount(tokens), O::Account(account)) => {
            let mut v = valid(&tokens, facts);
            v.account = Some(account_status(account));
            finish(v)
        }
        (S::ReadingAccount(tokens), O::Failed(e)) => {
            let mut v = valid(&tokens, facts);
            if let DropboxError::MissingScope { .. } = e {
                v.authorized = dropbox_condition(&e, "Reading the Dropbox account failed");
                v.access_token = None;
            }
            v.account = tokens.stored.account_id.clone().map(|id| AccountStatus {
                account_id: Some(id),
                ..Default::default()
            });
            v.next = Next::Backoff {
                at_least: e.retry_after(),
            };
            finish(v)
        }

        // -- apiKey ---------------------------------------------------------------------
        (S::VerifyingKey, O::Account(account)) => {
            let mut v = verdict(
                facts,
                Desired::new(
                    AUTHORIZED,
                    Some(true),
                    Reason::TokenValid,
                    "The access token is accepted by Dropbox",
                ),
                Next::After(facts.resync_interval),
            );
            v.account = Some(account_status(account));
            v.token_status = None;
            v.code_fingerprint = None;
            v.access_token = api_key(facts).cloned();
            finish(v)
        }
        // 401 for a token Dropbox does not know, 400 for one it cannot even read.
        (
            S::VerifyingKey,
            O::Failed(
                e @ (DropboxError::Unauthorized { .. } | DropboxError::Api { status: 400, .. }),
            ),
        ) => finish(verdict(
            facts,
            Desired::new(
                AUTHORIZED,
                Some(false),
                Reason::InvalidApiKey,
                format!(
                    "Dropbox refused the access token in the apiKey Secret ({}); put a valid token in the Secret",
                    e.tag().unwrap_or("malformed token")
                ),
            ),
            Next::WaitForChange,
        )),
        (S::VerifyingKey, O::Failed(e)) => {
            let next = Next::Backoff {
                at_least: e.retry_after(),
            };
            let accepted_before = conditions::find(&facts.status.conditions, AUTHORIZED)
                .is_some_and(|c| c.status == "True");
            if e.is_transient() && accepted_before {
                // Like an oauth2 token still valid: Dropbox's trouble is not the token's.
                let mut v = verdict(
                    facts,
                    Desired::new(
                        AUTHORIZED,
                        Some(true),
                        Reason::TokenValid,
                        format!(
                            "The access token was accepted by Dropbox; verifying it again failed ({e}), retrying"
                        ),
                    ),
                    next,
                );
                v.access_token = api_key(facts).cloned();
                finish(v)
            } else {
                finish(verdict(
                    facts,
                    dropbox_condition(&e, "Verifying the access token failed"),
                    next,
                ))
            }
        }

        // -- deletion -------------------------------------------------------------------
        (S::Revoking, O::Done) => release(facts),
        (S::ReleasingTokenSecret, O::Done) => go(S::ReleasingInstance, Effect::ReleaseInstance),
        (S::ReleasingInstance, O::Done) => Step {
            state: S::Released,
            effect: None,
        },

        (S::Finishing(v), O::Done) => Step {
            state: S::Finished(v),
            effect: None,
        },
        (state, observation) => stuck(&format!("{observation:?} in {}", state.name())),
    }
}

fn stuck(what: &str) -> Step {
    Step {
        state: State::Stuck(what.to_owned()),
        effect: None,
    }
}

/// The start, once deletion is ruled out.
fn begin(p: Progress, facts: &Facts) -> Step {
    use State as S;
    if let (
        TokenSecret::Ours {
            tokens,
            deleting: true,
        },
        false,
    ) = (&facts.token_secret, p.released_deleted_secret)
    {
        return match tokens {
            Some(t) => go(S::RevokingDeletedSecret(p), Effect::Revoke(vec![t.clone()])),
            None => go(S::ReleasingDeletedSecret(p), Effect::ReleaseTokenSecret),
        };
    }
    // The finalizer goes on before any token can exist; a code about to be sent
    // records itself in the same write.
    if !p.finalizer && new_code(facts).is_none() {
        return go(S::AddingFinalizer(p), Effect::Record(facts.spent.clone()));
    }
    match &facts.auth {
        Auth::Problem(problem) => finish(verdict(
            facts,
            Desired::new(
                AUTHORIZED,
                Some(false),
                problem.reason,
                problem.message.clone(),
            ),
            Next::WaitForChange,
        )),
        Auth::ApiKey { token } => go(S::VerifyingKey, Effect::ReadAccount(token.clone())),
        Auth::OAuth2 { .. } => match &facts.kept {
            Some(kept) => go(S::StoringKept(kept.clone()), Effect::Store(kept.clone())),
            None => with_code(stored_tokens(facts), facts),
        },
    }
}

/// The tokens of the token Secret, when it is ours and being kept.
fn stored_tokens(facts: &Facts) -> Option<Tokens> {
    let stored = match &facts.token_secret {
        TokenSecret::Ours {
            tokens: Some(t),
            deleting: false,
        } => t.clone(),
        _ => return None,
    };
    Some(Tokens {
        fingerprint: stored.code_fingerprint.clone(),
        last_refresh: facts
            .status
            .token
            .as_ref()
            .and_then(|t| t.last_refresh_time.clone()),
        stored,
        note: None,
    })
}

/// The code in the Secret, when it was never sent.
fn new_code(facts: &Facts) -> Option<&Code> {
    match &facts.auth {
        Auth::OAuth2 {
            code: Some(code), ..
        } if !facts.spent.contains(&code.fingerprint) => Some(code),
        _ => None,
    }
}

fn api_key(facts: &Facts) -> Option<&SecretString> {
    match &facts.auth {
        Auth::ApiKey { token } => Some(token),
        _ => None,
    }
}

/// oauth2 with the tokens there are: the code in the Secret decides.
fn with_code(tokens: Option<Tokens>, facts: &Facts) -> Step {
    let Auth::OAuth2 { code, .. } = &facts.auth else {
        return stuck("oauth2 credentials");
    };
    let Some(code) = code else {
        // No code (not there yet, or a spent one was deleted): keep going on the
        // tokens, if there are any.
        return match tokens {
            Some(t) => working(t, facts),
            None => finish(awaiting(facts)),
        };
    };
    let fp = code.fingerprint.as_str();
    if !facts.spent.contains(fp) {
        return go(State::Claiming, Effect::Claim);
    }
    if facts.spent.latest() == Some(fp) {
        // The code sent last: only its own tokens make it good.
        return match tokens.filter(|t| t.fingerprint.as_deref().is_none_or(|f| f == fp)) {
            Some(t) => working(t, facts),
            None => finish(spent_without_tokens(fp, facts)),
        };
    }
    // An older code put back (a GitOps tool restoring the Secret): nothing is
    // sent, the working tokens are kept.
    match tokens {
        Some(mut t) => {
            t.note = Some(format!(
                "{} holds an authorization code that was already used ({fp}); it is not sent again, and \
                 the tokens of a later code are kept",
                facts.texts.code_location
            ));
            working(t, facts)
        }
        None => finish(verdict_with_url(
            facts,
            Desired::new(
                AUTHORIZED,
                Some(false),
                Reason::CodeAlreadyUsed,
                format!(
                    "{} holds an authorization code this instance already used ({fp}), and there are no \
                     tokens. Codes are single-use: {}",
                    facts.texts.code_location, facts.texts.reapprove_hint
                ),
            ),
            Next::WaitForChange,
        )),
    }
}

/// Working tokens: refresh them when due, else read the account when unknown.
fn working(tokens: Tokens, facts: &Facts) -> Step {
    let prev = conditions::find(&facts.status.conditions, AUTHORIZED);
    if prev.map(|c| c.reason.as_str()) == Some("ReauthorizationRequired") {
        // Same tokens, same dead refresh token: nothing to try until a new code.
        return finish(verdict_with_url(
            facts,
            Desired::new(
                AUTHORIZED,
                Some(false),
                Reason::ReauthorizationRequired,
                prev.map(|c| c.message.clone()).unwrap_or_default(),
            ),
            Next::WaitForChange,
        ));
    }
    let due = refresh_at(
        &tokens.stored,
        tokens.last_refresh.as_ref(),
        facts.refresh_margin,
    )
    .is_some_and(|t| t <= facts.now);
    if !due {
        return account_or_valid(tokens, facts);
    }
    match tokens.stored.refresh_token.clone() {
        Some(rt) => go(State::Refreshing(tokens), Effect::Refresh(rt)),
        None => finish(verdict_with_url(
            facts,
            Desired::new(
                AUTHORIZED,
                Some(false),
                Reason::ReauthorizationRequired,
                "The access token expires and there is no refresh token to renew it: approve the app again \
                 at status.authorizeUrl (it asks for offline access) and put the new code in the Secret.",
            ),
            Next::WaitForChange,
        )),
    }
}

fn account_or_valid(tokens: Tokens, facts: &Facts) -> Step {
    let known = facts
        .status
        .account
        .as_ref()
        .and_then(|a| a.account_id.as_ref());
    let fresh_code = tokens.fingerprint.is_some()
        && tokens.fingerprint.as_deref() != facts.status.code_fingerprint.as_deref();
    if known.is_some() && known == tokens.stored.account_id.as_ref() && !fresh_code {
        return finish(valid(&tokens, facts));
    }
    let access = SecretString(tokens.stored.access_token.clone());
    go(State::ReadingAccount(tokens), Effect::ReadAccount(access))
}

/// Deletion after the revocation: the token Secret, then the instance.
fn release(facts: &Facts) -> Step {
    match facts.token_secret {
        TokenSecret::Ours { .. } => go(State::ReleasingTokenSecret, Effect::ReleaseTokenSecret),
        TokenSecret::Absent => go(State::ReleasingInstance, Effect::ReleaseInstance),
    }
}

// ---- verdicts ------------------------------------------------------------------

/// Starts from what status already says, so a verdict only states what changed.
fn verdict(facts: &Facts, authorized: Desired, next: Next) -> Verdict {
    Verdict {
        authorized,
        account: facts.status.account.clone(),
        token_status: facts.status.token.clone(),
        code_fingerprint: facts.status.code_fingerprint.clone(),
        authorize_url: None,
        next,
        access_token: None,
    }
}

/// A verdict that asks a person to approve the app (status.authorizeUrl).
fn verdict_with_url(facts: &Facts, authorized: Desired, next: Next) -> Verdict {
    let mut v = verdict(facts, authorized, next);
    if let Auth::OAuth2 { authorize_url, .. } = &facts.auth {
        v.authorize_url = Some(authorize_url.clone());
    }
    v
}

/// Authorized=True with working tokens; come back when they are due.
fn valid(tokens: &Tokens, facts: &Facts) -> Verdict {
    let mut message = match tokens.stored.expires_at {
        Some(t) => format!("Access token valid until {t}; it is refreshed before then"),
        None => "Access token valid (it does not expire)".to_owned(),
    };
    if let Some(note) = &tokens.note {
        message = format!("{message}. {note}");
    }
    let next = match refresh_at(
        &tokens.stored,
        tokens.last_refresh.as_ref(),
        facts.refresh_margin,
    ) {
        Some(at) => {
            Next::After(Duration::try_from(at.duration_since(facts.now)).unwrap_or(Duration::ZERO))
        }
        None => Next::After(facts.resync_interval),
    };
    let mut v = verdict(
        facts,
        Desired::new(AUTHORIZED, Some(true), Reason::TokenValid, message),
        next,
    );
    v.access_token = Some(SecretString(tokens.stored.access_token.clone()));
    v.token_status = Some(token_status(
        &facts.texts.token_secret,
        &tokens.stored,
        tokens.last_refresh.clone(),
    ));
    v.code_fingerprint = tokens
        .fingerprint
        .clone()
        .or_else(|| facts.status.code_fingerprint.clone());
    v
}

fn awaiting(facts: &Facts) -> Verdict {
    verdict_with_url(
        facts,
        Desired::new(
            AUTHORIZED,
            Some(false),
            Reason::AwaitingAuthorization,
            format!(
                "No authorization code yet: run `dropbox-operator connect`, or approve the app at \
                 status.authorizeUrl and put the code in {}",
                facts.texts.code_location
            ),
        ),
        Next::WaitForChange,
    )
}

fn used_elsewhere(holder: &str, facts: &Facts) -> Verdict {
    verdict_with_url(
        facts,
        Desired::new(
            AUTHORIZED,
            Some(false),
            Reason::CodeAlreadyUsed,
            format!(
                "The authorization code in {} was already exchanged by instance {holder}. Codes are \
                 single-use: approve the app again at status.authorizeUrl and put the new code in the Secret.",
                facts.texts.code_location
            ),
        ),
        Next::WaitForChange,
    )
}

/// Tokens Dropbox issued that the API server did not store: kept in memory.
fn not_stored(kept: &Kept, why: &str, facts: &Facts) -> Verdict {
    let mut v = verdict(
        facts,
        Desired::new(
            AUTHORIZED,
            Some(false),
            Reason::TokensNotStored,
            format!(
                "Dropbox issued tokens but the API server refused the token Secret ({why}); they are \
                 kept in memory and stored as soon as it accepts them"
            ),
        ),
        Next::Backoff { at_least: None },
    );
    if kept.origin == Origin::Code {
        v.code_fingerprint = kept.tokens.code_fingerprint.clone();
    }
    v
}

/// The code sent last left no tokens: say why, and how to approve again.
fn spent_without_tokens(fingerprint: &str, facts: &Facts) -> Verdict {
    let prev = conditions::find(&facts.status.conditions, AUTHORIZED);
    // A permanent verdict about this code stays as it is.
    let kept = prev.and_then(|c| match c.reason.as_str() {
        "CodeExchangeFailed" => Some(Reason::CodeExchangeFailed),
        "ReauthorizationRequired" => Some(Reason::ReauthorizationRequired),
        "CodeAlreadyUsed" => Some(Reason::CodeAlreadyUsed),
        "TokensNotStored" => Some(Reason::TokensNotStored),
        "InvalidClient" => Some(Reason::InvalidClient),
        _ => None,
    });
    let authorized = match (kept, prev) {
        (Some(reason), Some(c)) => Desired::new(AUTHORIZED, Some(false), reason, c.message.clone()),
        _ if facts.status.code_fingerprint.as_deref() == Some(fingerprint) => Desired::new(
            AUTHORIZED,
            Some(false),
            Reason::CodeAlreadyUsed,
            format!(
                "The authorization code in {} was already exchanged and its tokens are gone (Secret {:?} \
                 was deleted). Codes are single-use: approve the app again at status.authorizeUrl and \
                 put the new code in the Secret.",
                facts.texts.code_location, facts.texts.token_secret
            ),
        ),
        _ => Desired::new(
            AUTHORIZED,
            Some(false),
            Reason::TokensNotStored,
            format!(
                "The authorization code in {} was sent to Dropbox, but no tokens were stored (the \
                 answer was lost or the controller stopped in between). Codes are single-use and this one \
                 is never sent again: approve the app again at status.authorizeUrl and put the new code \
                 in the Secret.",
                facts.texts.code_location
            ),
        ),
    };
    let mut v = verdict_with_url(facts, authorized, Next::WaitForChange);
    v.code_fingerprint = Some(fingerprint.to_owned());
    v.token_status = None;
    v
}

/// Dropbox answered the code with an error that may have consumed it.
fn exchange_failed(error: &DropboxError, facts: &Facts) -> Verdict {
    let authorized = match error {
        DropboxError::InvalidGrant { description } | DropboxError::OAuth { description, .. } => {
            Desired::new(
                AUTHORIZED,
                Some(false),
                Reason::CodeExchangeFailed,
                format!(
                    "Dropbox refused the authorization code in {}: {description}. {}",
                    facts.texts.code_location, facts.texts.reapprove_hint
                ),
            )
        }
        // Checked with check/app just before; changed in between. Dropbox does
        // not say that such a code stays good, so it counts as used.
        DropboxError::InvalidClient { description } => Desired::new(
            AUTHORIZED,
            Some(false),
            Reason::InvalidClient,
            format!(
                "Dropbox refused the app key or secret in {} ({description}) when the code was sent; the \
                 code counts as used. Fix the app Secret, then: {}",
                facts.texts.app_location, facts.texts.reapprove_hint
            ),
        ),
        e => Desired::new(
            AUTHORIZED,
            Some(false),
            Reason::TokensNotStored,
            format!(
                "The authorization code in {} was sent but Dropbox's answer was lost ({e}); the code may \
                 have been used, so it is never sent again. Approve the app again at status.authorizeUrl \
                 and put the new code in the Secret.",
                facts.texts.code_location
            ),
        ),
    };
    let mut v = verdict_with_url(facts, authorized, Next::WaitForChange);
    v.code_fingerprint = new_code(facts).map(|c| c.fingerprint.clone());
    // Tokens of an earlier code stay usable until they stop working.
    v.token_status = facts.token_secret.tokens().map(|old| {
        token_status(
            &facts.texts.token_secret,
            old,
            facts
                .status
                .token
                .as_ref()
                .and_then(|t| t.last_refresh_time.clone()),
        )
    });
    v
}

fn refresh_failed(tokens: &Tokens, error: &DropboxError, facts: &Facts) -> Verdict {
    let still_valid = !tokens.stored.expired(facts.now);
    match error {
        DropboxError::InvalidGrant { description } => verdict_with_url(
            facts,
            Desired::new(
                AUTHORIZED,
                Some(false),
                Reason::ReauthorizationRequired,
                format!(
                    "Dropbox no longer accepts the refresh token ({description}): the user revoked access \
                     or the app was disconnected. {}",
                    facts.texts.reapprove_hint
                ),
            ),
            Next::WaitForChange,
        ),
        DropboxError::InvalidClient { description } => verdict(
            facts,
            Desired::new(
                AUTHORIZED,
                Some(false),
                Reason::InvalidClient,
                format!(
                    "Dropbox refused the app key or secret in {}: {description}",
                    facts.texts.app_location
                ),
            ),
            Next::WaitForChange,
        ),
        e if still_valid => {
            let mut v = valid(tokens, facts);
            v.authorized.message =
                format!("The access token is still valid; refreshing it failed ({e}), retrying");
            v.next = Next::Backoff {
                at_least: e.retry_after(),
            };
            v
        }
        e => verdict(
            facts,
            dropbox_condition(e, "Refreshing the access token failed"),
            Next::Backoff {
                at_least: e.retry_after(),
            },
        ),
    }
}

/// Condition for a Dropbox failure that is not the credentials' fault.
pub fn dropbox_condition(error: &DropboxError, what: &str) -> Desired {
    let reason = match error {
        DropboxError::RateLimited { .. } => Reason::RateLimited,
        DropboxError::MissingScope { .. } => Reason::MissingScope,
        _ => Reason::DropboxUnavailable,
    };
    let hint = match error {
        DropboxError::MissingScope { scope } => format!(
            "; enable the permission {scope:?} for the app in the Dropbox App Console (tokens issued \
             before that need a new approval)"
        ),
        _ => "; retrying with backoff".to_owned(),
    };
    Desired::new(
        AUTHORIZED,
        Some(false),
        reason,
        format!("{what}: {error}{hint}"),
    )
}

pub fn account_status(account: Account) -> AccountStatus {
    AccountStatus {
        account_id: Some(account.account_id),
        email: account.email,
        display_name: account.name.and_then(|n| n.display_name),
    }
}

impl State {
    /// The state's name, for logs and the tables of the tests.
    pub fn name(&self) -> &'static str {
        match self {
            State::Start(_) => "Start",
            State::AddingFinalizer(_) => "AddingFinalizer",
            State::RevokingDeletedSecret(_) => "RevokingDeletedSecret",
            State::ReleasingDeletedSecret(_) => "ReleasingDeletedSecret",
            State::StoringKept(_) => "StoringKept",
            State::Claiming => "Claiming",
            State::ProvingStorage => "ProvingStorage",
            State::ProvingApp => "ProvingApp",
            State::Recording => "Recording",
            State::Exchanging => "Exchanging",
            State::StoringIssued(_) => "StoringIssued",
            State::GivingBack(_) => "GivingBack",
            State::Refreshing(_) => "Refreshing",
            State::StoringRefreshed(_) => "StoringRefreshed",
            State::ReadingAccount(_) => "ReadingAccount",
            State::VerifyingKey => "VerifyingKey",
            State::Revoking => "Revoking",
            State::ReleasingTokenSecret => "ReleasingTokenSecret",
            State::ReleasingInstance => "ReleasingInstance",
            State::Finishing(_) => "Finishing",
            State::Finished(_) => "Finished",
            State::Released => "Released",
            State::Stuck(_) => "Stuck",
        }
    }
}

impl Effect {
    /// The effect's name, for logs and the tables of the tests.
    pub fn name(&self) -> &'static str {
        match self {
            Effect::Record(_) => "Record",
            Effect::Claim => "Claim",
            Effect::Unclaim => "Unclaim",
            Effect::ProveStorage => "ProveStorage",
            Effect::ProveApp => "ProveApp",
            Effect::SendCode => "SendCode",
            Effect::Store(_) => "Store",
            Effect::Refresh(_) => "Refresh",
            Effect::ReadAccount(_) => "ReadAccount",
            Effect::Revoke(_) => "Revoke",
            Effect::ReleaseTokenSecret => "ReleaseTokenSecret",
            Effect::ReleaseInstance => "ReleaseInstance",
        }
    }
}

#[cfg(test)]
mod tests {
    //! Every transition from a table: (facts, state, observation) → (next state,
    //! effect, and for a verdict its reason). No API server, no Dropbox.

    use super::*;
    use crate::conditions::Desired;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    const NOW: &str = "2026-01-01T12:00:00Z";

    fn ts(s: &str) -> jiff::Timestamp {
        s.parse().expect("timestamp")
    }

    fn app() -> AppCredentials {
        AppCredentials {
            client_id: "key".into(),
            client_secret: "secret".into(),
        }
    }

    fn code(fp: &str) -> Code {
        Code {
            value: SecretString(format!("code-{fp}")),
            fingerprint: fp.into(),
            verifier: None,
            redirect_uri: None,
        }
    }

    fn stored(fp: Option<&str>, expires_at: &str) -> StoredToken {
        StoredToken {
            access_token: "at".into(),
            refresh_token: Some("rt".into()),
            expires_at: Some(ts(expires_at)),
            account_id: Some("dbid:a".into()),
            scope: None,
            code_fingerprint: fp.map(str::to_owned),
            app: Some(app()),
        }
    }

    fn tokens(fp: &str, expires_at: &str) -> Tokens {
        Tokens {
            stored: stored(Some(fp), expires_at),
            last_refresh: Some(Time(ts("2026-01-01T11:00:00Z"))),
            fingerprint: Some(fp.into()),
            note: None,
        }
    }

    fn authorized(status: &str, reason: &str) -> Condition {
        Desired::new(
            AUTHORIZED,
            Some(status == "True"),
            match reason {
                "TokenValid" => Reason::TokenValid,
                _ => Reason::ReauthorizationRequired,
            },
            "before",
        )
        .to_condition(&[], Some(1), &Time(ts(NOW)))
    }

    /// An oauth2 instance with the finalizer, code `A` in its Secret, nothing sent.
    fn oauth() -> Facts {
        Facts {
            now: ts(NOW),
            deleting: false,
            has_finalizer: true,
            auth: Auth::OAuth2 {
                code: Some(code("A")),
                authorize_url: "https://www.dropbox.com/oauth2/authorize?x".into(),
            },
            app: Some(app()),
            spent: SpentCodes::default(),
            status: DropboxElementInstanceStatus::default(),
            token_secret: TokenSecret::Absent,
            kept: None,
            texts: Texts::default(),
            refresh_margin: Duration::from_secs(300),
            resync_interval: Duration::from_secs(3600),
        }
    }

    /// Code `A` sent and its tokens stored (valid until 16:00), account known.
    fn authorized_with(code_in_secret: Option<&str>, spent: &[&str]) -> Facts {
        let mut f = oauth();
        f.auth = Auth::OAuth2 {
            code: code_in_secret.map(code),
            authorize_url: "u".into(),
        };
        f.spent = spent.iter().fold(SpentCodes::default(), |s, fp| s.with(fp));
        f.token_secret = TokenSecret::Ours {
            tokens: Some(stored(
                Some(spent.last().copied().unwrap_or("A")),
                "2026-01-01T16:00:00Z",
            )),
            deleting: false,
        };
        f.status.code_fingerprint = spent.last().map(|s| (*s).to_owned());
        f.status.account = Some(AccountStatus {
            account_id: Some("dbid:a".into()),
            ..Default::default()
        });
        f.status.token = Some(crate::api::TokenStatus {
            last_refresh_time: Some(Time(ts("2026-01-01T11:00:00Z"))),
            ..Default::default()
        });
        f
    }

    fn err(status: u16) -> DropboxError {
        match status {
            429 => DropboxError::RateLimited {
                retry_after: Duration::from_secs(3),
            },
            401 => DropboxError::Unauthorized {
                tag: "invalid_access_token".into(),
            },
            _ => DropboxError::Unavailable { status },
        }
    }

    fn response() -> TokenResponse {
        serde_json::from_value(serde_json::json!({
            "access_token": "new-at", "refresh_token": "new-rt", "expires_in": 14400,
            "account_id": "dbid:a"
        }))
        .expect("token response")
    }

    fn account() -> Account {
        serde_json::from_value(
            serde_json::json!({"account_id": "dbid:a", "email": "a@example.com"}),
        )
        .expect("account")
    }

    fn kept(origin: Origin) -> Kept {
        Kept {
            tokens: stored(Some("A"), "2026-01-01T16:00:00Z"),
            origin,
            issued_at: ts(NOW),
        }
    }

    fn begin() -> State {
        State::Start(Progress {
            finalizer: true,
            released_deleted_secret: false,
        })
    }

    /// A row's expectation: the next state's name, the effect's, the verdict's reason.
    type Want = (&'static str, Option<&'static str>, Option<&'static str>);

    /// What a step came to: the state's name, the effect's name, and the
    /// verdict's reason (for Finished and Finishing).
    fn outcome(step: &Step) -> (String, Option<&'static str>, Option<&'static str>) {
        let reason = match &step.state {
            State::Finished(v) | State::Finishing(v) | State::GivingBack(v) => {
                Some(v.authorized.reason.as_str())
            }
            _ => None,
        };
        (
            step.state.name().to_owned(),
            step.effect.as_ref().map(Effect::name),
            reason,
        )
    }

    #[test]
    fn every_transition() {
        use Observation as O;
        use State as S;
        let mut deleting = authorized_with(None, &["A"]);
        deleting.deleting = true;
        let mut deleting_kept = oauth();
        deleting_kept.deleting = true;
        deleting_kept.kept = Some(kept(Origin::Code));
        let mut secret_deleted = authorized_with(None, &["A"]);
        secret_deleted.token_secret = TokenSecret::Ours {
            tokens: Some(stored(Some("A"), "2026-01-01T16:00:00Z")),
            deleting: true,
        };
        let mut new_instance = oauth();
        new_instance.has_finalizer = false;
        new_instance.auth = Auth::OAuth2 {
            code: None,
            authorize_url: "u".into(),
        };
        let mut with_kept = oauth();
        with_kept.spent = SpentCodes::default().with("A");
        with_kept.kept = Some(kept(Origin::Code));
        let mut api_key = oauth();
        api_key.auth = Auth::ApiKey {
            token: SecretString("long-lived".into()),
        };
        let mut api_key_accepted = api_key.clone();
        api_key_accepted.status.conditions = vec![authorized("True", "TokenValid")];
        let mut problem = oauth();
        problem.auth = Auth::Problem(Problem {
            reason: Reason::SecretNotFound,
            message: "Secret \"app\" not found".into(),
        });
        let mut due = authorized_with(None, &["A"]);
        due.now = ts("2026-01-01T15:58:00Z");
        let mut expired = due.clone();
        expired.now = ts("2026-01-01T16:30:00Z");
        let mut reauth = authorized_with(None, &["A"]);
        reauth.status.conditions = vec![authorized("False", "ReauthorizationRequired")];
        let mut new_account = authorized_with(None, &["A"]);
        new_account.status.account = None;
        let sent = authorized_with(Some("A"), &["A"]);
        let fresh = oauth();
        let no_code = authorized_with(None, &["A"]);
        let older_back = authorized_with(Some("A"), &["A", "B"]);
        let mut latest_deleted = authorized_with(Some("B"), &["A", "B"]);
        latest_deleted.token_secret = TokenSecret::Absent;
        let mut latest_lost = latest_deleted.clone();
        latest_lost.status.code_fingerprint = Some("A".into());
        let mut older_back_no_tokens = older_back.clone();
        older_back_no_tokens.token_secret = TokenSecret::Absent;
        let giving_back = S::GivingBack(Box::new(verdict(
            &fresh,
            dropbox_condition(&err(429), "x"),
            Next::WaitForChange,
        )));

        #[rustfmt::skip]
        let rows: Vec<(&str, &Facts, State, Observation, Want)> = vec![
            // the start
            ("a new instance gets the finalizer first", &new_instance, S::Start(Progress::default()), O::Begin, ("AddingFinalizer", Some("Record"), None)),
            ("then waits for a code", &new_instance, S::AddingFinalizer(Progress::default()), O::Done, ("Finished", None, Some("AwaitingAuthorization"))),
            ("a missing Secret is a condition", &problem, begin(), O::Begin, ("Finished", None, Some("SecretNotFound"))),
            ("a code never sent is claimed first", &fresh, S::Start(Progress::default()), O::Begin, ("Claiming", Some("Claim"), None)),
            // a new code, step by step
            ("a code another instance sent", &fresh, S::Claiming, O::Refused("ns/other".into()), ("Finished", None, Some("CodeAlreadyUsed"))),
            ("claimed: prove the token Secret", &fresh, S::Claiming, O::Done, ("ProvingStorage", Some("ProveStorage"), None)),
            ("the token Secret would be refused", &fresh, S::ProvingStorage, O::Refused("quota".into()), ("Finishing", Some("Unclaim"), Some("TokensNotStored"))),
            ("storable: prove the app", &fresh, S::ProvingStorage, O::Done, ("ProvingApp", Some("ProveApp"), None)),
            ("the app is refused: the code stays unsent", &fresh, S::ProvingApp, O::Refused("bad secret".into()), ("Finishing", Some("Unclaim"), Some("InvalidClient"))),
            ("Dropbox down before sending", &fresh, S::ProvingApp, O::Failed(err(503)), ("Finishing", Some("Unclaim"), Some("DropboxUnavailable"))),
            ("proven: record the code as sent", &fresh, S::ProvingApp, O::Done, ("Recording", Some("Record"), None)),
            ("recorded: send it", &fresh, S::Recording, O::Done, ("Exchanging", Some("SendCode"), None)),
            ("tokens: store them", &fresh, S::Exchanging, O::Tokens(response(), ts(NOW)), ("StoringIssued", Some("Store"), None)),
            ("429: the code is given back", &fresh, S::Exchanging, O::Failed(err(429)), ("GivingBack", Some("Record"), Some("RateLimited"))),
            ("5xx: the code is given back", &fresh, S::Exchanging, O::Failed(err(503)), ("GivingBack", Some("Record"), Some("DropboxUnavailable"))),
            ("never sent: the code is given back", &fresh, S::Exchanging, O::Failed(DropboxError::NotSent("refused".into())), ("GivingBack", Some("Record"), Some("DropboxUnavailable"))),
            ("given back: unclaimed", &fresh, giving_back, O::Done, ("Finishing", Some("Unclaim"), Some("RateLimited"))),
            ("invalid_grant spends the code", &fresh, S::Exchanging, O::Failed(DropboxError::InvalidGrant { description: "used".into() }), ("Finished", None, Some("CodeExchangeFailed"))),
            ("invalid_client spends the code", &fresh, S::Exchanging, O::Failed(DropboxError::InvalidClient { description: "bad".into() }), ("Finished", None, Some("InvalidClient"))),
            ("no answer spends the code", &fresh, S::Exchanging, O::Failed(DropboxError::Transport("timed out".into())), ("Finished", None, Some("TokensNotStored"))),
            ("stored: read the account", &fresh, S::StoringIssued(tokens("A", "2026-01-01T16:00:00Z")), O::Done, ("ReadingAccount", Some("ReadAccount"), None)),
            ("not stored: kept in memory", &fresh, S::StoringIssued(tokens("A", "2026-01-01T16:00:00Z")), O::Refused("denied".into()), ("Finished", None, Some("TokensNotStored"))),
            ("the account: valid", &fresh, S::ReadingAccount(tokens("A", "2026-01-01T16:00:00Z")), O::Account(account()), ("Finished", None, Some("TokenValid"))),
            ("the account is unreadable: still valid", &fresh, S::ReadingAccount(tokens("A", "2026-01-01T16:00:00Z")), O::Failed(err(503)), ("Finished", None, Some("TokenValid"))),
            ("the app lacks the scope", &fresh, S::ReadingAccount(tokens("A", "2026-01-01T16:00:00Z")), O::Failed(DropboxError::MissingScope { scope: "account_info.read".into() }), ("Finished", None, Some("MissingScope"))),
            // working tokens
            ("the code sent last, its tokens valid", &sent, begin(), O::Begin, ("Finished", None, Some("TokenValid"))),
            ("no code, tokens valid", &no_code, begin(), O::Begin, ("Finished", None, Some("TokenValid"))),
            ("an unknown account is read", &new_account, begin(), O::Begin, ("ReadingAccount", Some("ReadAccount"), None)),
            ("an older code put back keeps the tokens", &older_back, begin(), O::Begin, ("Finished", None, Some("TokenValid"))),
            ("the code sent last, its tokens deleted", &latest_deleted, begin(), O::Begin, ("Finished", None, Some("CodeAlreadyUsed"))),
            ("the code sent last left no tokens", &latest_lost, begin(), O::Begin, ("Finished", None, Some("TokensNotStored"))),
            ("an older code put back without tokens", &older_back_no_tokens, begin(), O::Begin, ("Finished", None, Some("CodeAlreadyUsed"))),
            ("due: refresh", &due, begin(), O::Begin, ("Refreshing", Some("Refresh"), None)),
            ("refreshed: store", &due, S::Refreshing(tokens("A", "2026-01-01T16:00:00Z")), O::Tokens(response(), ts(NOW)), ("StoringRefreshed", Some("Store"), None)),
            ("refresh stored: valid", &due, S::StoringRefreshed(tokens("A", "2026-01-01T20:00:00Z")), O::Done, ("Finished", None, Some("TokenValid"))),
            ("refreshed but not stored: still valid", &due, S::StoringRefreshed(tokens("A", "2026-01-01T20:00:00Z")), O::Refused("denied".into()), ("Finished", None, Some("TokenValid"))),
            ("the refresh token is refused", &due, S::Refreshing(tokens("A", "2026-01-01T16:00:00Z")), O::Failed(DropboxError::InvalidGrant { description: "revoked".into() }), ("Finished", None, Some("ReauthorizationRequired"))),
            ("the app is refused on refresh", &due, S::Refreshing(tokens("A", "2026-01-01T16:00:00Z")), O::Failed(DropboxError::InvalidClient { description: "bad".into() }), ("Finished", None, Some("InvalidClient"))),
            ("Dropbox down, the token still valid", &due, S::Refreshing(tokens("A", "2026-01-01T16:00:00Z")), O::Failed(err(503)), ("Finished", None, Some("TokenValid"))),
            ("Dropbox down, the token expired", &expired, S::Refreshing(tokens("A", "2026-01-01T16:00:00Z")), O::Failed(err(503)), ("Finished", None, Some("DropboxUnavailable"))),
            ("a dead refresh token waits for a new code", &reauth, begin(), O::Begin, ("Finished", None, Some("ReauthorizationRequired"))),
            // tokens kept in memory
            ("kept tokens are stored first", &with_kept, begin(), O::Begin, ("StoringKept", Some("Store"), None)),
            ("kept tokens stored: account", &with_kept, S::StoringKept(kept(Origin::Code)), O::Done, ("ReadingAccount", Some("ReadAccount"), None)),
            ("kept tokens refused again", &with_kept, S::StoringKept(kept(Origin::Code)), O::Refused("denied".into()), ("Finished", None, Some("TokensNotStored"))),
            // apiKey
            ("an apiKey is verified", &api_key, begin(), O::Begin, ("VerifyingKey", Some("ReadAccount"), None)),
            ("an apiKey accepted", &api_key, S::VerifyingKey, O::Account(account()), ("Finished", None, Some("TokenValid"))),
            ("an apiKey refused", &api_key, S::VerifyingKey, O::Failed(err(401)), ("Finished", None, Some("InvalidApiKey"))),
            ("a malformed apiKey", &api_key, S::VerifyingKey, O::Failed(DropboxError::Api { status: 400, summary: "bad".into(), tag: None }), ("Finished", None, Some("InvalidApiKey"))),
            ("429 on an accepted apiKey keeps it valid", &api_key_accepted, S::VerifyingKey, O::Failed(err(429)), ("Finished", None, Some("TokenValid"))),
            ("5xx on an accepted apiKey keeps it valid", &api_key_accepted, S::VerifyingKey, O::Failed(err(503)), ("Finished", None, Some("TokenValid"))),
            ("429 on a new apiKey", &api_key, S::VerifyingKey, O::Failed(err(429)), ("Finished", None, Some("RateLimited"))),
            // someone deletes the token Secret
            ("a deleted token Secret is revoked", &secret_deleted, begin(), O::Begin, ("RevokingDeletedSecret", Some("Revoke"), None)),
            ("then let go", &secret_deleted, S::RevokingDeletedSecret(Progress { finalizer: true, released_deleted_secret: false }), O::Done, ("ReleasingDeletedSecret", Some("ReleaseTokenSecret"), None)),
            // deletion
            ("deletion revokes the stored tokens", &deleting, begin(), O::Begin, ("Revoking", Some("Revoke"), None)),
            ("deletion revokes tokens kept in memory", &deleting_kept, begin(), O::Begin, ("Revoking", Some("Revoke"), None)),
            ("revoked: the token Secret goes", &deleting, S::Revoking, O::Done, ("ReleasingTokenSecret", Some("ReleaseTokenSecret"), None)),
            ("revoked, no Secret: the instance goes", &deleting_kept, S::Revoking, O::Done, ("ReleasingInstance", Some("ReleaseInstance"), None)),
            ("the Secret released: the instance", &deleting, S::ReleasingTokenSecret, O::Done, ("ReleasingInstance", Some("ReleaseInstance"), None)),
            ("released", &deleting, S::ReleasingInstance, O::Done, ("Released", None, None)),
            // what does not belong
            ("an observation out of place", &fresh, S::Claiming, O::Account(account()), ("Stuck", None, None)),
        ];
        let mut wrong = Vec::new();
        for (name, facts, state, observation, (want_state, want_effect, want_reason)) in rows {
            let got = outcome(&decide(state, observation, facts));
            if (got.0.as_str(), got.1, got.2) != (want_state, want_effect, want_reason) {
                wrong.push(format!(
                    "{name}: want {want_state} {want_effect:?} {want_reason:?}, got {got:?}"
                ));
            }
        }
        assert!(
            wrong.is_empty(),
            "transitions that differ:\n{}",
            wrong.join("\n")
        );
    }

    /// Runs the machine from the start with Dropbox and the API server answering
    /// from a script (effect name → observation); returns the effects in order
    /// and the final state.
    fn run(facts: &Facts, mut answer: impl FnMut(&Effect) -> Observation) -> (Vec<Effect>, State) {
        let mut step = start(facts);
        let mut effects = Vec::new();
        while let Some(effect) = step.effect.take() {
            let observation = answer(&effect);
            effects.push(effect);
            step = decide(step.state, observation, facts);
            assert!(effects.len() < 20, "does not settle: {effects:?}");
        }
        (effects, step.state)
    }

    #[test]
    fn a_first_code_is_proven_recorded_sent_and_stored_in_that_order() {
        let mut f = oauth();
        f.has_finalizer = false;
        let (effects, state) = run(&f, |e| match e {
            Effect::SendCode => Observation::Tokens(response(), ts(NOW)),
            Effect::ReadAccount(_) => Observation::Account(account()),
            _ => Observation::Done,
        });
        let names: Vec<&str> = effects.iter().map(Effect::name).collect();
        assert_eq!(
            names,
            [
                "Claim",
                "ProveStorage",
                "ProveApp",
                "Record",
                "SendCode",
                "Store",
                "ReadAccount"
            ]
        );
        // The record (with the finalizer) holds the code before it is sent.
        assert_eq!(effects[3], Effect::Record(SpentCodes::default().with("A")));
        let State::Finished(v) = state else {
            panic!("{state:?}")
        };
        assert!(v.authorized.is_true());
        assert_eq!(v.code_fingerprint.as_deref(), Some("A"));
        assert_eq!(
            v.account.and_then(|a| a.email).as_deref(),
            Some("a@example.com")
        );
    }

    #[test]
    fn a_code_dropbox_did_not_consume_is_taken_off_the_record() {
        let f = oauth();
        let (effects, state) = run(&f, |e| match e {
            Effect::SendCode => Observation::Failed(err(503)),
            _ => Observation::Done,
        });
        assert_eq!(effects[3], Effect::Record(SpentCodes::default().with("A")));
        assert_eq!(effects[5], Effect::Record(SpentCodes::default()));
        assert_eq!(effects.last(), Some(&Effect::Unclaim));
        assert!(matches!(state, State::Finished(v) if v.next == Next::Backoff { at_least: None }));
    }

    #[test]
    fn gitops_putting_back_any_spent_code_sends_nothing_and_keeps_the_tokens() {
        // A sent, then B sent (the tokens are B's); the Secret holds A again.
        for spent in [vec!["A", "B"], vec!["A", "X", "B"]] {
            let f = authorized_with(Some("A"), &spent);
            let (effects, state) = run(&f, |_| Observation::Done);
            assert!(effects.is_empty(), "{effects:?}");
            let State::Finished(v) = state else {
                panic!("{state:?}")
            };
            assert!(v.authorized.is_true(), "{v:?}");
            assert!(
                v.authorized.message.contains("already used"),
                "{}",
                v.authorized.message
            );
            assert!(v.access_token.is_some());
            assert_eq!(v.code_fingerprint.as_deref(), Some("B"));
        }
    }

    #[test]
    fn deletion_revokes_stored_and_kept_tokens_then_releases_both() {
        let mut f = authorized_with(None, &["A"]);
        f.deleting = true;
        f.app = None; // the app Secret went first (a namespace deletion)
        f.kept = Some(kept(Origin::Refresh));
        let (effects, state) = run(&f, |_| Observation::Done);
        let Effect::Revoke(revoked) = &effects[0] else {
            panic!("{effects:?}")
        };
        assert_eq!(revoked.len(), 2);
        // Each keeps the app credentials it was issued with, for a refresh.
        assert!(revoked.iter().all(|t| t.app.is_some()));
        let names: Vec<&str> = effects.iter().map(Effect::name).collect();
        assert_eq!(names, ["Revoke", "ReleaseTokenSecret", "ReleaseInstance"]);
        assert_eq!(state, State::Released);
    }
}
