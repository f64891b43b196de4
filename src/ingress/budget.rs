//! The memory budget of webhook bodies in flight, shared by every request of
//! the process (docs/architecture.md, "Hostile traffic").
//!
//! A body is charged BEFORE it is read, by its declared `Content-Length`; a
//! body without one (chunked) is charged the largest body accepted, since
//! nothing says it will be smaller. When the budget cannot cover it, the
//! request is refused (503) and its body never read. The charge is given back
//! when the request is done with its body.
//!
//! Bodies of at most [`UNCHARGED`] bytes are not charged: a Dropbox
//! notification is a few hundred bytes, and charging those would let a few
//! stalled large uploads refuse every genuine webhook. Their memory is bounded
//! by the open-connection cap instead (each connection holds at most one
//! request), which the listener enforces (src/ingress/listener.rs).

use std::sync::Arc;

use prometheus_client::metrics::gauge::Gauge;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Bodies up to this size are not charged (see the module documentation).
pub const UNCHARGED: u64 = 16 * 1024;

/// Bytes of request bodies that may be in flight at once.
#[derive(Clone, Debug)]
pub struct BodyBudget {
    bytes: Arc<Semaphore>,
    in_use: Gauge,
}

/// A charge against the budget, given back on drop.
#[derive(Debug)]
pub struct Charge {
    permit: Option<OwnedSemaphorePermit>,
    in_use: Gauge,
}

impl BodyBudget {
    /// A budget of `total` bytes (at least one largest body of `largest` bytes,
    /// so that every acceptable body can be admitted when nothing else is in
    /// flight). `in_use` shows the bytes charged.
    pub fn new(total: u64, largest: u64, in_use: Gauge) -> Self {
        let total = total.max(largest).min(Semaphore::MAX_PERMITS as u64);
        BodyBudget {
            bytes: Arc::new(Semaphore::new(total as usize)),
            in_use,
        }
    }

    /// Charges a body of `bytes` (its declared length, or the largest body for
    /// one without a length); `None` when the budget cannot cover it now.
    pub fn charge(&self, bytes: u64) -> Option<Charge> {
        if bytes <= UNCHARGED {
            return Some(Charge {
                permit: None,
                in_use: self.in_use.clone(),
            });
        }
        let permits = u32::try_from(bytes).ok()?;
        let permit = self.bytes.clone().try_acquire_many_owned(permits).ok()?;
        self.in_use.inc_by(i64::from(permits));
        Some(Charge {
            permit: Some(permit),
            in_use: self.in_use.clone(),
        })
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        if let Some(permit) = self.permit.take() {
            self.in_use.dec_by(permit.num_permits() as i64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1024 * 1024;

    #[test]
    fn large_bodies_share_the_budget_small_ones_are_free() {
        let gauge = Gauge::default();
        let budget = BodyBudget::new(3 * MIB, MIB, gauge.clone());
        let held: Vec<Charge> = (0..3).filter_map(|_| budget.charge(MIB)).collect();
        assert_eq!(held.len(), 3);
        assert_eq!(gauge.get(), 3 * MIB as i64);
        assert!(budget.charge(UNCHARGED + 1).is_none(), "over the budget");
        // A notification-sized body is admitted although the budget is spent.
        assert!(budget.charge(400).is_some());
        assert!(budget.charge(UNCHARGED).is_some());
        drop(held);
        assert_eq!(gauge.get(), 0);
        assert!(budget.charge(MIB).is_some(), "given back on drop");
    }

    #[test]
    fn the_budget_admits_at_least_one_largest_body() {
        let budget = BodyBudget::new(1, MIB, Gauge::default());
        let one = budget.charge(MIB);
        assert!(one.is_some());
        assert!(budget.charge(MIB).is_none());
    }
}
