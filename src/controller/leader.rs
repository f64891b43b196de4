//! Leader election, and leadership as a fence (docs/architecture.md, "Two
//! leaders never both act").
//!
//! [`Elector`] holds a `coordination.k8s.io` Lease the way client-go's leader
//! election does: every write of it carries the resourceVersion it read, a
//! standby takes the lease only when its record has not changed for a whole
//! lease duration by the standby's own clock, and the holder renews it every
//! `interval`. (Written here rather than taken from a crate: the fence below
//! needs to know when each successful renewal was *sent*, and every lease write
//! must carry a precondition, so a stale leader's late renewal or release can
//! never overwrite the new holder's record.)
//!
//! [`Leadership`] says until when *this* replica may act, by its own clocks,
//! without asking the API server: each successful renewal sent at `t` lets it
//! act until `t + deadline`, with the deadline shorter than the lease; a
//! standby observes that renewal no earlier than `t` and waits a whole lease
//! duration after it, so this replica has stopped before. The controller asks
//! [`Leadership::check`] before every write and every Dropbox request that
//! commits a decision; a process that was paused (SIGSTOP, a frozen VM) or cut
//! off from the API server finds its validity over the moment it runs again,
//! whichever task runs first. Both the monotonic and the wall clock must agree
//! that time is left.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::ResourceExt;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

#[derive(Clone, Copy, Debug)]
struct Validity {
    monotonic: Instant,
    wall: jiff::Timestamp,
}

/// Until when this replica may act.
#[derive(Debug)]
pub struct Leadership {
    /// None: not acting (not yet renewed, or stepped down).
    valid: Mutex<Option<Validity>>,
    /// Without leader election this replica always acts.
    unconditional: bool,
    changed: Notify,
}

impl Leadership {
    /// A replica without leader election: it is the only one and always acts.
    pub fn unconditional() -> Self {
        Leadership {
            valid: Mutex::new(None),
            unconditional: true,
            changed: Notify::new(),
        }
    }

    /// A replica that acts only while its lease renewals keep it valid.
    pub fn elected() -> Self {
        Leadership {
            valid: Mutex::new(None),
            unconditional: false,
            changed: Notify::new(),
        }
    }

    /// A renewal of this replica's lease, sent at `sent` (by both clocks),
    /// succeeded: acting is allowed until `sent + deadline`.
    pub fn renewed(&self, sent: (Instant, jiff::Timestamp), deadline: Duration) {
        let deadline_signed =
            jiff::SignedDuration::try_from(deadline).unwrap_or(jiff::SignedDuration::ZERO);
        let Ok(wall) = sent.1.checked_add(deadline_signed) else {
            return;
        };
        let monotonic = sent.0 + deadline;
        let mut valid = self.valid.lock().expect("leadership lock");
        let extends = valid.is_none_or(|v| v.wall < wall);
        if extends {
            *valid = Some(Validity { monotonic, wall });
            drop(valid);
            self.changed.notify_waiters();
        }
    }

    /// Stops acting now (the lease names another holder, or shutdown).
    pub fn step_down(&self) {
        *self.valid.lock().expect("leadership lock") = None;
        self.changed.notify_waiters();
    }

    /// Ok while this replica may act; else why not.
    pub fn check(&self) -> Result<(), String> {
        if self.unconditional {
            return Ok(());
        }
        let valid = *self.valid.lock().expect("leadership lock");
        match valid {
            None => Err("this replica does not hold the leader lease".into()),
            Some(v) if Instant::now() >= v.monotonic || jiff::Timestamp::now() >= v.wall => {
                Err(format!(
                    "the leader lease was not renewed in time (valid until {})",
                    v.wall
                ))
            }
            Some(_) => Ok(()),
        }
    }

    /// Resolves when this replica may no longer act (never without election).
    pub async fn lapsed(&self) {
        loop {
            // Registered before the check, so a renewal in between is not missed.
            let changed = self.changed.notified();
            if self.unconditional {
                return std::future::pending().await;
            }
            let valid = *self.valid.lock().expect("leadership lock");
            let Some(v) = valid else { return };
            if self.check().is_err() {
                return;
            }
            // Wall-clock time left, as a monotonic wait (whichever ends first).
            let wall_left = Duration::try_from(v.wall.duration_since(jiff::Timestamp::now()))
                .unwrap_or(Duration::ZERO);
            let until = v.monotonic.min(Instant::now() + wall_left);
            tokio::select! {
                _ = tokio::time::sleep_until(until.into()) => {}
                _ = changed => {}
            }
        }
    }
}

/// What one look at the lease came to.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// This replica holds the lease (it just wrote it).
    Held,
    /// Another replica holds it, and its record is not expired.
    Other(String),
    /// The lease changed between the read and the write: look again.
    Raced,
}

/// Holds one Lease for this replica (see the module's description).
pub struct Elector {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
    interval: Duration,
    deadline: Duration,
    /// Another holder's record (resourceVersion) and since when it is unchanged.
    observed: Mutex<Option<(String, Instant)>>,
    /// Set on the Lease when this replica creates or takes it, so the Lease goes
    /// with its owner.
    owner: Option<OwnerReference>,
}

impl Elector {
    /// `duration`: how long a record stays valid without renewal; `interval`:
    /// how often the holder renews (and a standby looks); `deadline`: how long
    /// after a renewal the holder may act (shorter than `duration`).
    pub fn new(
        api: Api<Lease>,
        name: &str,
        identity: &str,
        duration: Duration,
        interval: Duration,
        deadline: Duration,
    ) -> Self {
        Elector {
            api,
            name: name.to_owned(),
            identity: identity.to_owned(),
            duration,
            interval,
            deadline,
            observed: Mutex::new(None),
            owner: None,
        }
    }

    /// The Lease this replica writes is owned by `owner` (when known).
    pub fn owned_by(mut self, owner: Option<OwnerReference>) -> Self {
        self.owner = owner;
        self
    }

    /// Waits until this replica holds the lease; false when `stop` came first.
    pub async fn acquire(&self, leadership: &Leadership, stop: &CancellationToken) -> bool {
        loop {
            match self.attempt(leadership).await {
                Ok(Attempt::Held) => return true,
                Ok(Attempt::Raced) => continue,
                Ok(Attempt::Other(_)) => {}
                Err(e) => tracing::warn!(error = %e, "cannot read or write the leader lease"),
            }
            tokio::select! {
                _ = tokio::time::sleep(self.interval) => {}
                _ = stop.cancelled() => return false,
            }
        }
    }

    /// Renews the lease every `interval`; returns why this replica lost it (the
    /// lease names another holder). Failed renewals are retried: the
    /// leadership lapses on its own when none succeeds in time.
    pub async fn hold(&self, leadership: &Leadership) -> String {
        loop {
            tokio::time::sleep(self.interval).await;
            loop {
                match self.attempt(leadership).await {
                    Ok(Attempt::Held) => break,
                    Ok(Attempt::Raced) => continue,
                    Ok(Attempt::Other(holder)) => {
                        return format!("the lease names another holder ({holder})");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "renewing the leader lease failed");
                        break;
                    }
                }
            }
        }
    }

    /// Gives the lease up so a standby takes over at once; only while this
    /// replica is sure to hold it (a stale leader writes nothing), and only the
    /// record it read (resourceVersion).
    pub async fn release(&self, leadership: &Leadership) {
        if leadership.check().is_err() {
            return;
        }
        let Ok(Some(mut lease)) = self.api.get_opt(&self.name).await else {
            return;
        };
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        spec.holder_identity = None;
        spec.lease_duration_seconds = Some(1);
        spec.renew_time = Some(MicroTime(jiff::Timestamp::now()));
        leadership.step_down();
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => tracing::info!("released the leader lease"),
            Err(e) => tracing::warn!(error = %e, "releasing the leader lease failed"),
        }
    }

    /// One read of the lease and, when it is this replica's or free or expired,
    /// one write of it fenced by the resourceVersion read.
    async fn attempt(&self, leadership: &Leadership) -> Result<Attempt, kube::Error> {
        let sent = (Instant::now(), jiff::Timestamp::now());
        let now = MicroTime(sent.1);
        let seconds = i32::try_from(self.duration.as_secs()).unwrap_or(i32::MAX);
        let Some(mut lease) = self.api.get_opt(&self.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.name.clone()),
                    owner_references: self.owner.clone().map(|o| vec![o]),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => {
                    leadership.renewed(sent, self.deadline);
                    Ok(Attempt::Held)
                }
                Err(e) if super::common::is_conflict(&e) => Ok(Attempt::Raced),
                Err(e) => Err(e),
            };
        };
        let version = lease.resource_version().unwrap_or_default();
        let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
        let holder = spec.holder_identity.clone().filter(|h| !h.is_empty());
        let mine = holder.as_deref() == Some(self.identity.as_str());
        if let Some(other) = holder.filter(|_| !mine) {
            // Expired only once its record stayed the same for a whole lease
            // duration, by this replica's clock (clocks of nodes may differ).
            let valid_for = spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .map(Duration::from_secs)
                .unwrap_or(self.duration);
            let mut observed = self.observed.lock().expect("observed lock");
            match observed.as_ref() {
                Some((seen, since)) if *seen == version && since.elapsed() >= valid_for => {}
                Some((seen, _)) if *seen == version => return Ok(Attempt::Other(other)),
                _ => {
                    *observed = Some((version, Instant::now()));
                    return Ok(Attempt::Other(other));
                }
            }
        }
        if !mine {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(now.clone());
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0).saturating_add(1));
        }
        spec.renew_time = Some(now);
        spec.lease_duration_seconds = Some(seconds);
        if let Some(owner) = &self.owner {
            let owners = lease.metadata.owner_references.get_or_insert_with(Vec::new);
            if !owners.iter().any(|o| o.uid == owner.uid) {
                owners.push(owner.clone());
            }
        }
        // `lease` carries the resourceVersion read: a precondition.
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => {
                leadership.renewed(sent, self.deadline);
                Ok(Attempt::Held)
            }
            Err(e) if super::common::is_conflict(&e) => Ok(Attempt::Raced),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> (Instant, jiff::Timestamp) {
        (Instant::now(), jiff::Timestamp::now())
    }

    #[test]
    fn a_renewal_makes_the_replica_act_until_the_deadline_after_it() {
        let l = Leadership::elected();
        assert!(l.check().is_err(), "not acting before the first renewal");
        l.renewed(now(), Duration::from_secs(10));
        assert!(l.check().is_ok());
        // A renewal counts from when it was sent, not when its answer came.
        let l = Leadership::elected();
        let old = (
            Instant::now() - Duration::from_secs(11),
            jiff::Timestamp::now() - jiff::SignedDuration::from_secs(11),
        );
        l.renewed(old, Duration::from_secs(10));
        assert!(l.check().is_err(), "renewed 11 s ago with a 10 s deadline");
        // An older renewal never shortens a newer one.
        let l = Leadership::elected();
        l.renewed(now(), Duration::from_secs(10));
        l.renewed(old, Duration::from_secs(10));
        assert!(l.check().is_ok());
        l.step_down();
        assert!(l.check().is_err());
        assert!(Leadership::unconditional().check().is_ok());
    }

    #[tokio::test]
    async fn lapsed_resolves_when_the_deadline_passes() {
        let l = Leadership::elected();
        l.renewed(now(), Duration::from_millis(300));
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(3), l.lapsed())
            .await
            .expect("lapses");
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert!(l.check().is_err());
    }
}
