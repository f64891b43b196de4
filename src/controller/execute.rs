//! The executor: carries out the state machine's effects (`lifecycle.rs`) and
//! reports what came of each, with every decision fenced
//! (docs/architecture.md, "Two leaders never both act"):
//!
//! - before any write or Dropbox request, this replica must still be the leader
//!   by its own clocks ([`super::leader::Leadership::check`]);
//! - every write carries a precondition on what the decision read: the
//!   instance's metadata and status writes its resourceVersion, the token Secret
//!   its resourceVersion (or, for a new one, that none exists), finalizer
//!   removals a JSON-patch `test` of the entry. A failed precondition is
//!   [`Error::Conflict`]: the reconcile reads the instance again and decides
//!   afresh.
//!
//! Tokens Dropbox issued are never dropped: when they cannot be stored (refused,
//! or this replica stopped being the leader), they are kept in memory, stored
//! first by the next reconcile, and revoked when the process gives up on them.

use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::{Event as KubeEvent, EventType};
use kube::{Resource, ResourceExt};
use serde_json::json;

use super::Context;
use super::common::{Error, FIELD_MANAGER, is_conflict, object_key};
use super::finalizer::{Removal, remove_finalizer};
use super::lifecycle::{self, Auth, Effect, Facts, Kept, Observation, State};
use super::revoke::{Revocation, revoke};
use super::status;
use super::token::{self, SpentCodes, StoredToken};
use crate::api::{DropboxElementInstance, DropboxElementInstanceStatus};
use crate::metrics::ResultLabels;

/// How a run of the machine ended.
pub enum Outcome {
    /// The verdict for status.
    Verdict(Box<lifecycle::Verdict>),
    /// The instance was released (deletion).
    Released,
}

/// Carries out the effects of one reconcile.
pub struct Executor<'a> {
    ctx: &'a Context,
    instance: &'a DropboxElementInstance,
    facts: &'a Facts,
    instances: Api<DropboxElementInstance>,
    secrets: Api<Secret>,
    uid: String,
    /// The instance's resourceVersion the next write is fenced on: what the
    /// decision read, then what our own writes produced.
    version: Option<String>,
    /// The token Secret's resourceVersion (None: there is none).
    secret_version: Option<String>,
    /// The code Secret's resourceVersion as the decision read it.
    code_secret_version: Option<String>,
    /// What this run wrote into [`token::CODE_SECRET_VERSION_ANNOTATION`]
    /// (Some(None): that it removed it).
    recorded_code_version: Option<Option<String>>,
    /// A code claimed in this process and not yet spent or given back.
    claimed: bool,
}

/// Steps after which a run that has not settled is a bug (every path ends in a
/// handful).
const MAX_STEPS: usize = 24;

impl<'a> Executor<'a> {
    pub fn new(
        ctx: &'a Context,
        instance: &'a DropboxElementInstance,
        facts: &'a Facts,
        secret_version: Option<String>,
        code_secret_version: Option<String>,
    ) -> Self {
        let namespace = instance.namespace().unwrap_or_default();
        Executor {
            ctx,
            instance,
            facts,
            instances: Api::namespaced(ctx.client.clone(), &namespace),
            secrets: Api::namespaced(ctx.client.clone(), &namespace),
            uid: instance.uid().unwrap_or_default(),
            version: instance.resource_version(),
            secret_version,
            code_secret_version,
            recorded_code_version: None,
            claimed: false,
        }
    }

    /// Runs the machine from its start until it settles.
    pub async fn run(&mut self) -> Result<Outcome, Error> {
        let mut step = lifecycle::start(self.facts);
        for _ in 0..MAX_STEPS {
            let Some(effect) = step.effect else {
                return match step.state {
                    State::Finished(verdict) => Ok(Outcome::Verdict(verdict)),
                    State::Released => Ok(Outcome::Released),
                    other => Err(Error::Unsettled(format!(
                        "{} without an effect ({other:?})",
                        other.name()
                    ))),
                };
            };
            tracing::debug!(instance = %object_key(self.instance), state = step.state.name(), effect = effect.name(), "credential step");
            let observation = match self.carry_out(effect).await {
                Ok(o) => o,
                Err(e) => {
                    self.give_back_claim();
                    return Err(e);
                }
            };
            step = lifecycle::decide(step.state, observation, self.facts);
        }
        self.give_back_claim();
        Err(Error::Unsettled(format!(
            "still at {} after {MAX_STEPS} steps",
            step.state.name()
        )))
    }

    fn fence(&self) -> Result<(), Error> {
        self.ctx.leadership.check().map_err(Error::NotLeader)
    }

    fn give_back_claim(&mut self) {
        if self.claimed
            && let Some(code) = self.code()
        {
            self.ctx.codes.release(&code.fingerprint, &self.uid);
            self.claimed = false;
        }
    }

    fn code(&self) -> Option<&lifecycle::Code> {
        match &self.facts.auth {
            Auth::OAuth2 { code, .. } => code.as_ref(),
            _ => None,
        }
    }

    async fn carry_out(&mut self, effect: Effect) -> Result<Observation, Error> {
        match effect {
            Effect::Record(spent) => {
                self.fence()?;
                self.record(&spent).await?;
                Ok(Observation::Done)
            }
            Effect::Claim => {
                let Some(code) = self.code() else {
                    return Err(Error::Unsettled("Claim without a code".into()));
                };
                let fingerprint = code.fingerprint.clone();
                // Every instance's durable markers count, so the cache must hold
                // every instance (right after a start it may not yet).
                crate::store::wait_until_ready(&self.ctx.store).await;
                match self
                    .ctx
                    .codes
                    .claim(&fingerprint, &self.uid, &self.ctx.store)
                {
                    Ok(()) => {
                        self.claimed = true;
                        Ok(Observation::Done)
                    }
                    Err(holder) => Ok(Observation::Refused(holder)),
                }
            }
            Effect::Unclaim => {
                self.give_back_claim();
                Ok(Observation::Done)
            }
            Effect::ProveStorage => {
                self.fence()?;
                let probe = StoredToken {
                    access_token: "probe".into(),
                    refresh_token: Some("probe".into()),
                    expires_at: Some(self.facts.now),
                    account_id: Some("probe".into()),
                    scope: Some("probe".into()),
                    code_fingerprint: self.code().map(|c| c.fingerprint.clone()),
                    app: self.facts.app.clone(),
                };
                match self.write_token_secret(&probe, true).await {
                    Ok(()) => Ok(Observation::Done),
                    Err(e) if is_conflict(&e) => Err(Error::Conflict("the token Secret".into())),
                    Err(e) => Ok(Observation::Refused(e.to_string())),
                }
            }
            Effect::ProveApp => {
                self.fence()?;
                let Some(app) = &self.facts.app else {
                    return Err(Error::Unsettled("ProveApp without app credentials".into()));
                };
                match self
                    .ctx
                    .dropbox
                    .check_app(&app.client_id, &app.client_secret)
                    .await
                {
                    Ok(()) => Ok(Observation::Done),
                    Err(e) if e.refuses_app() => Ok(Observation::Refused(e.to_string())),
                    Err(e) if e.is_transient() => Ok(Observation::Failed(e)),
                    // An answer the check does not expect (the route is a
                    // preview in Dropbox's spec): the exchange itself still
                    // checks the credentials, so it goes on.
                    Err(e) => {
                        tracing::warn!(instance = %object_key(self.instance), error = %e, "check/app gave no verdict on the app credentials; exchanging the code anyway");
                        Ok(Observation::Done)
                    }
                }
            }
            Effect::SendCode => {
                self.fence()?;
                let (Some(code), Some(app)) = (self.code(), &self.facts.app) else {
                    return Err(Error::Unsettled("SendCode without a code".into()));
                };
                let issued_at = super::common::now();
                let result = self
                    .ctx
                    .dropbox
                    .exchange_code(
                        &app.client_id,
                        &app.client_secret,
                        &code.value.0,
                        code.redirect_uri.as_deref(),
                        code.verifier.as_ref().map(|v| v.0.as_str()),
                    )
                    .await;
                let outcome = if result.is_ok() { "success" } else { "failure" };
                self.ctx
                    .metrics
                    .code_exchanges
                    .get_or_create(&ResultLabels { result: outcome })
                    .inc();
                // From here on the code is spent (or given back by the machine).
                self.claimed = matches!(&result, Err(e) if e.proves_not_consumed());
                Ok(match result {
                    Ok(response) => {
                        tracing::info!(instance = %object_key(self.instance), "authorization code exchanged");
                        Observation::Tokens(response, issued_at)
                    }
                    Err(e) => {
                        tracing::warn!(instance = %object_key(self.instance), error = %e, "exchanging the authorization code failed");
                        Observation::Failed(e)
                    }
                })
            }
            Effect::Store(kept) => self.store(kept).await,
            Effect::Refresh(refresh_token) => {
                self.fence()?;
                let Some(app) = &self.facts.app else {
                    return Err(Error::Unsettled("Refresh without app credentials".into()));
                };
                let issued_at = super::common::now();
                let result = self
                    .ctx
                    .dropbox
                    .refresh(&app.client_id, &app.client_secret, &refresh_token)
                    .await;
                let outcome = if result.is_ok() { "success" } else { "failure" };
                self.ctx
                    .metrics
                    .token_refreshes
                    .get_or_create(&ResultLabels { result: outcome })
                    .inc();
                Ok(match result {
                    Ok(response) => Observation::Tokens(response, issued_at),
                    Err(e) => Observation::Failed(e),
                })
            }
            Effect::ReadAccount(token) => {
                Ok(match self.ctx.dropbox.current_account(&token.0).await {
                    Ok(account) => Observation::Account(account),
                    Err(e) => {
                        tracing::warn!(instance = %object_key(self.instance), error = %e, "reading the Dropbox account failed");
                        Observation::Failed(e)
                    }
                })
            }
            Effect::Revoke(tokens) => {
                self.fence()?;
                self.revoke(&tokens).await;
                Ok(Observation::Done)
            }
            Effect::ReleaseTokenSecret => {
                self.fence()?;
                let name = self.facts.texts.token_secret.clone();
                if let Some(secret) = self.secrets.get_opt(&name).await? {
                    self.release(&self.secrets.clone(), &secret, "the token Secret")
                        .await?;
                }
                let namespace = self.instance.namespace().unwrap_or_default();
                self.ctx.own_secret_writes.forget(&namespace, &name);
                self.ctx.secrets.forget(&namespace, &name);
                Ok(Observation::Done)
            }
            Effect::ReleaseInstance => {
                self.fence()?;
                self.release(&self.instances.clone(), self.instance, "the instance")
                    .await?;
                Ok(Observation::Done)
            }
        }
    }

    /// The finalizer and the set of spent codes on the instance, one write,
    /// fenced by the resourceVersion the decision read.
    async fn record(&mut self, spent: &SpentCodes) -> Result<(), Error> {
        let mut metadata = json!({
            "name": self.instance.name_any(),
            "finalizers": [token::FINALIZER],
        });
        if let Some(version) = &self.version {
            metadata["resourceVersion"] = json!(version);
        }
        let mut annotations = serde_json::Map::new();
        if let Some(codes) = spent.to_annotation() {
            annotations.insert(token::CODE_SENT_ANNOTATION.into(), json!(codes));
        }
        // The code Secret's version, when its code is among the spent ones: until
        // that Secret changes, a restart need not read it (`settled.rs`). Left
        // out otherwise (server-side apply then removes it), e.g. when a code that
        // was not consumed is given back.
        let code_version = self.spent_code_version(spent);
        if let Some(version) = &code_version {
            annotations.insert(token::CODE_SECRET_VERSION_ANNOTATION.into(), json!(version));
        }
        if !annotations.is_empty() {
            metadata["annotations"] = annotations.into();
        }
        let written = self
            .instances
            .patch(
                &self.instance.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(json!({
                    "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
                    "kind": "DropboxElementInstance",
                    "metadata": metadata,
                })),
            )
            .await
            .map_err(|e| conflict_or(e, "the instance"))?;
        self.version = written.resource_version();
        self.ctx.written.note_metadata_write(&written);
        self.recorded_code_version = Some(code_version);
        Ok(())
    }

    /// The code Secret's version, when the code it holds is in `spent`.
    fn spent_code_version(&self, spent: &SpentCodes) -> Option<String> {
        let code = self.code()?;
        spent
            .contains(&code.fingerprint)
            .then(|| self.code_secret_version.clone())
            .flatten()
    }

    /// After a run that ended with working tokens: records the code Secret's
    /// version on the instance when the annotation does not have it yet (an
    /// instance from an earlier release, or a code Secret changed without a new
    /// code), one write, so the next start can skip reading its Secrets
    /// (`settled.rs`). Nothing when this run already recorded it.
    pub async fn record_code_secret_version(&mut self) -> Result<(), Error> {
        let wanted = self.spent_code_version(&self.facts.spent);
        let recorded = match &self.recorded_code_version {
            Some(written) => written.clone(),
            None => self
                .instance
                .annotations()
                .get(token::CODE_SECRET_VERSION_ANNOTATION)
                .cloned(),
        };
        if wanted.is_none() || wanted == recorded {
            return Ok(());
        }
        self.fence()?;
        let spent = self.facts.spent.clone();
        self.record(&spent).await
    }

    /// Stores tokens; when they cannot be stored they are kept in memory (the
    /// code that gave them is spent: they are all there is).
    async fn store(&mut self, kept: Kept) -> Result<Observation, Error> {
        let keep = |ctx: &Context, uid: &str, kept: &Kept| {
            ctx.unstored
                .lock()
                .expect("unstored lock")
                .insert(uid.to_owned(), kept.clone());
        };
        if let Err(e) = self.fence() {
            keep(self.ctx, &self.uid, &kept);
            return Err(e);
        }
        match self.write_token_secret(&kept.tokens, false).await {
            Ok(()) => {
                self.ctx
                    .unstored
                    .lock()
                    .expect("unstored lock")
                    .remove(&self.uid);
                Ok(Observation::Done)
            }
            Err(e) if is_conflict(&e) => {
                keep(self.ctx, &self.uid, &kept);
                Err(Error::Conflict("the token Secret".into()))
            }
            Err(e) => {
                tracing::warn!(instance = %object_key(self.instance), error = %e, "storing tokens failed; kept in memory, retrying");
                keep(self.ctx, &self.uid, &kept);
                Ok(Observation::Refused(e.to_string()))
            }
        }
    }

    /// Writes the token Secret: a create when there is none (it fails when one
    /// appeared meanwhile), else a server-side apply fenced by the
    /// resourceVersion read. A dry run proves the write would be admitted.
    async fn write_token_secret(
        &mut self,
        tokens: &StoredToken,
        dry_run: bool,
    ) -> Result<(), kube::Error> {
        let mut secret = tokens.to_secret(self.instance);
        let written = match &self.secret_version {
            None => {
                let pp = PostParams {
                    dry_run,
                    field_manager: Some(FIELD_MANAGER.into()),
                };
                self.secrets.create(&pp, &secret).await?
            }
            Some(version) => {
                secret.metadata.resource_version = Some(version.clone());
                let mut pp = PatchParams::apply(FIELD_MANAGER).force();
                if dry_run {
                    pp = pp.dry_run();
                }
                self.secrets
                    .patch(&self.facts.texts.token_secret, &pp, &Patch::Apply(&secret))
                    .await?
            }
        };
        if !dry_run {
            self.secret_version = written.resource_version();
            self.ctx.own_secret_writes.record(&written);
            self.ctx.secrets.put(written);
        }
        Ok(())
    }

    /// Revokes tokens once per instance's deletion, bounded; a failure is a
    /// Warning Event, never a reason to keep the instance.
    async fn revoke(&self, tokens: &[StoredToken]) {
        let deleting = self.facts.deleting;
        if deleting
            && self
                .ctx
                .revoked
                .lock()
                .expect("revoked lock")
                .contains(&self.uid)
        {
            // A cleanup that already revoked (a cached copy can still show the
            // finalizer it removed) does not revoke again.
            return;
        }
        for tokens in tokens {
            let outcome = revoke(
                &self.ctx.dropbox,
                tokens,
                self.facts.app.as_ref(),
                self.ctx.config.revoke_timeout,
            )
            .await;
            self.ctx
                .metrics
                .revocations
                .get_or_create(&ResultLabels {
                    result: outcome.label(),
                })
                .inc();
            let message = match &outcome {
                Revocation::Revoked | Revocation::AlreadyInvalid => {
                    tracing::info!(instance = %object_key(self.instance), result = outcome.label(), "token revoked");
                    continue;
                }
                Revocation::Failed(why) => format!("Revoking the Dropbox token failed: {why}"),
                Revocation::TimedOut => format!(
                    "Revoking the Dropbox token did not finish within {}s",
                    self.ctx.config.revoke_timeout.as_secs()
                ),
            };
            tracing::warn!(instance = %object_key(self.instance), "{message}; deletion continues");
            let event = KubeEvent {
                type_: EventType::Warning,
                reason: "RevokeFailed".into(),
                note: Some(format!(
                    "{message}. The token is released anyway; disconnect the app in the Dropbox account \
                     settings if it must not stay valid."
                )),
                action: "Revoke".into(),
                secondary: None,
            };
            status::publish(self.instance, &event, self.ctx).await;
        }
        if deleting {
            self.ctx
                .revoked
                .lock()
                .expect("revoked lock")
                .insert(self.uid.clone());
        }
    }

    /// Removes the finalizer; a refusal is a Warning Event naming it and an
    /// error (retried with backoff), never a tight loop.
    async fn release<K>(&self, api: &Api<K>, obj: &K, what: &str) -> Result<(), Error>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        match remove_finalizer(api, obj).await? {
            Removal::Removed => Ok(()),
            Removal::Refused(message) => {
                let what = format!("remove the finalizer from {what} {:?}", obj.name_any());
                let event = KubeEvent {
                    type_: EventType::Warning,
                    reason: "FinalizerRemovalRefused".into(),
                    note: Some(
                        format!(
                            "The API server refused to {what}: {message}. Deletion waits and retries with \
                             backoff until the refusal is lifted."
                        )
                        .chars()
                        .take(1000)
                        .collect(),
                    ),
                    action: "Release".into(),
                    secondary: None,
                };
                status::publish(self.instance, &event, self.ctx).await;
                Err(Error::Refused { what, message })
            }
        }
    }

    /// Writes the status, fenced by the resourceVersion the decision read (or
    /// our own last write produced). EventsDelivering and lastDeliveryTime are
    /// ours too: they mirror what the ingress reports in its data namespace.
    pub async fn write_status(
        &mut self,
        desired: &DropboxElementInstanceStatus,
    ) -> Result<(), Error> {
        self.fence()?;
        let mut patch = json!({
            "apiVersion": "elements.dropbox-operator.dev/v1alpha1",
            "kind": "DropboxElementInstance",
            "status": desired,
        });
        if let Some(version) = &self.version {
            patch["metadata"] = json!({ "resourceVersion": version });
        }
        let written = self
            .instances
            .patch_status(
                &self.instance.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(&patch),
            )
            .await
            .map_err(|e| conflict_or(e, "the instance"))?;
        self.version = written.resource_version();
        self.ctx.written.record(self.instance, &written);
        Ok(())
    }
}

fn conflict_or(error: kube::Error, what: &str) -> Error {
    if is_conflict(&error) {
        Error::Conflict(what.into())
    } else {
        Error::Kube(error)
    }
}
