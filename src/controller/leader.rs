//! Leadership as a fence (docs/architecture.md, "Two leaders never both act").
//!
//! The lease says who may act; this says until when *this* replica may, by its
//! own clocks, without asking the API server. Every renewal the replica sees of
//! its own lease (`spec.renewTime`, which it wrote with its own clock) extends
//! the validity to `renewTime + deadline`, with the deadline shorter than the
//! lease: a standby takes the lease no earlier than `renewTime + duration`, so
//! this replica has stopped before. The controller asks [`Leadership::check`]
//! before every write and every Dropbox request that commits a decision; a
//! process that was paused (SIGSTOP, a frozen VM) or cut off from the API server
//! finds its validity over the moment it runs again, whichever task runs first.
//! Both the monotonic and the wall clock must agree that time is left.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::Notify;

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

    /// The lease was seen renewed at `renew_time` (written by this replica with
    /// its own wall clock): acting is allowed until `renew_time + deadline`.
    pub fn renewed(&self, renew_time: jiff::Timestamp, deadline: Duration) {
        let now_wall = jiff::Timestamp::now();
        let now_mono = Instant::now();
        let deadline_signed =
            jiff::SignedDuration::try_from(deadline).unwrap_or(jiff::SignedDuration::ZERO);
        let Ok(wall) = renew_time.checked_add(deadline_signed) else {
            return;
        };
        // The renewal happened this long ago (never counted as in the future).
        let age = Duration::try_from(now_wall.duration_since(renew_time)).unwrap_or(Duration::ZERO);
        let monotonic = match deadline.checked_sub(age) {
            Some(left) => now_mono + left,
            None => now_mono,
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_renewal_makes_the_replica_act_until_the_deadline_after_it() {
        let l = Leadership::elected();
        assert!(l.check().is_err(), "not acting before the first renewal");
        l.renewed(jiff::Timestamp::now(), Duration::from_secs(10));
        assert!(l.check().is_ok());
        // A renewal seen late counts from when it happened, not when it was seen.
        let l = Leadership::elected();
        let old = jiff::Timestamp::now() - jiff::SignedDuration::from_secs(11);
        l.renewed(old, Duration::from_secs(10));
        assert!(l.check().is_err(), "renewed 11 s ago with a 10 s deadline");
        // An older renewal never shortens a newer one.
        let l = Leadership::elected();
        l.renewed(jiff::Timestamp::now(), Duration::from_secs(10));
        l.renewed(old, Duration::from_secs(10));
        assert!(l.check().is_ok());
        l.step_down();
        assert!(l.check().is_err());
        assert!(Leadership::unconditional().check().is_ok());
    }

    #[tokio::test]
    async fn lapsed_resolves_when_the_deadline_passes() {
        let l = Leadership::elected();
        l.renewed(jiff::Timestamp::now(), Duration::from_millis(300));
        let started = Instant::now();
        tokio::time::timeout(Duration::from_secs(3), l.lapsed())
            .await
            .expect("lapses");
        assert!(started.elapsed() >= Duration::from_millis(250));
        assert!(l.check().is_err());
    }
}
