//! Fair slots: a counting semaphore whose waiters queue per tenant (the
//! instance's namespace) and are served round-robin across tenants. One
//! tenant with many instances waiting (e.g. callbacks that stall until the
//! delivery timeout) queues behind itself: another tenant's instance gets the
//! next free slot (docs/architecture.md, "Broken callbacks isolate themselves").
//!
//! Written here rather than taken from a crate: tokio's semaphore is FIFO over
//! all waiters, which is exactly the unfairness this avoids.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;

#[derive(Default)]
struct State {
    free: usize,
    /// Waiters per tenant, oldest first.
    queues: HashMap<String, VecDeque<oneshot::Sender<Slot>>>,
    /// Tenants with waiters, in the order they are served.
    order: VecDeque<String>,
}

/// `capacity` slots shared fairly between tenants.
pub struct FairSlots {
    state: Mutex<State>,
}

/// A slot, given back when dropped.
pub struct Slot {
    slots: Option<Arc<FairSlots>>,
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(slots) = self.slots.take() {
            slots.release();
        }
    }
}

impl FairSlots {
    pub fn new(capacity: usize) -> Arc<Self> {
        Arc::new(FairSlots {
            state: Mutex::new(State {
                free: capacity,
                ..State::default()
            }),
        })
    }

    /// Waits for a slot for `tenant`.
    pub async fn acquire(self: &Arc<Self>, tenant: &str) -> Slot {
        let waiting = {
            let mut state = self.state.lock().expect("slots lock");
            if state.free > 0 && state.order.is_empty() {
                state.free -= 1;
                return Slot {
                    slots: Some(self.clone()),
                };
            }
            let (tx, rx) = oneshot::channel();
            let state = &mut *state;
            let queue = state.queues.entry(tenant.to_owned()).or_default();
            if queue.is_empty() {
                state.order.push_back(tenant.to_owned());
            }
            queue.push_back(tx);
            rx
        };
        // The sender is dropped only with the slots, which this Arc keeps.
        waiting.await.expect("the slots outlive their waiters")
    }

    /// Hands a freed slot to the next tenant's oldest waiter, or keeps it.
    fn release(self: &Arc<Self>) {
        let mut guard = self.state.lock().expect("slots lock");
        let state = &mut *guard;
        loop {
            let Some(tenant) = state.order.pop_front() else {
                state.free += 1;
                return;
            };
            let queue = state
                .queues
                .get_mut(&tenant)
                .expect("a queue per tenant in order");
            let waiter = queue.pop_front();
            if queue.is_empty() {
                state.queues.remove(&tenant);
            } else {
                state.order.push_back(tenant);
            }
            let Some(waiter) = waiter else { continue };
            match waiter.send(Slot {
                slots: Some(self.clone()),
            }) {
                Ok(()) => return,
                // That waiter gave up: the next one gets the slot (not released
                // again while this lock is held).
                Err(mut slot) => slot.slots = None,
            }
        }
    }

    /// Slots free right now.
    pub fn available(&self) -> usize {
        self.state.lock().expect("slots lock").free
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn tenants_are_served_round_robin() {
        let slots = FairSlots::new(1);
        let held = slots.acquire("noisy").await;
        let served = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        // Ten waiters of one tenant, then one of another.
        for i in 0..10 {
            let (slots, served) = (slots.clone(), served.clone());
            tasks.push(tokio::spawn(async move {
                let _slot = slots.acquire("noisy").await;
                served.lock().unwrap().push(format!("noisy-{i}"));
            }));
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        let (s, v) = (slots.clone(), served.clone());
        tasks.push(tokio::spawn(async move {
            let _slot = s.acquire("quiet").await;
            v.lock().unwrap().push("quiet".to_owned());
        }));
        tokio::time::sleep(Duration::from_millis(10)).await;
        drop(held);
        for t in tasks {
            t.await.unwrap();
        }
        let order = served.lock().unwrap().clone();
        assert_eq!(order[0], "noisy-0");
        assert_eq!(order[1], "quiet", "{order:?}");
        assert_eq!(order.len(), 11);
        assert_eq!(slots.available(), 1);
    }

    #[tokio::test]
    async fn a_waiter_that_gives_up_loses_no_slot() {
        let slots = FairSlots::new(1);
        let held = slots.acquire("a").await;
        let waiting = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire("b").await })
        };
        tokio::time::sleep(Duration::from_millis(10)).await;
        waiting.abort();
        let _ = waiting.await;
        drop(held);
        assert_eq!(slots.available(), 1);
        let _again = slots.acquire("c").await;
        assert_eq!(slots.available(), 0);
    }
}
