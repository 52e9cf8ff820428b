//! Generation slots for stateless requests (the OpenAI-compatible API): they wait in the
//! same per-tenant queues as chat replies, but the request handler generates itself once
//! its slot is granted, and gives the slot back by dropping it.

use std::sync::atomic::Ordering;

use tokio::sync::oneshot;

use super::{lock, ChatError, ChatService, Freed, Phase, Waiting};
use crate::engine::CancelToken;
use crate::store::TenantId;

/// A generation slot held by a stateless request: dropping it frees the slot for the next
/// waiting reply. Its `cancel` is pulled by a shutdown that outlives its grace period.
pub struct Slot {
    service: ChatService,
    tenant: TenantId,
    id: u64,
    /// Given to background work (see `Scheduler`'s background queue).
    background: bool,
    pub cancel: CancelToken,
}

impl Slot {
    /// The slot the scheduler just gave to request `id`.
    pub(super) fn granted(
        service: &ChatService,
        tenant: TenantId,
        id: u64,
        background: bool,
    ) -> Slot {
        let cancel = CancelToken::default();
        lock(&service.0.stateless).insert(id, cancel.clone());
        Slot {
            service: service.clone(),
            tenant,
            id,
            background,
            cancel,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        lock(&self.service.0.stateless).remove(&self.id);
        let freed = if self.background {
            Freed::Background
        } else {
            Freed::Of(self.tenant)
        };
        self.service.finish_and_pump(Some(freed));
        self.service.0.reply_ended.notify_waiters();
    }
}

/// A stateless request waiting for a slot; dropped (the client went away) it leaves the
/// queue at once instead of holding a place until its turn.
struct SlotWait {
    service: ChatService,
    tenant: TenantId,
    id: u64,
}

impl Drop for SlotWait {
    fn drop(&mut self) {
        let removed = lock(&self.service.0.scheduler).remove(self.tenant, |w| w.is_slot(self.id));
        if removed.is_some() {
            drop(removed);
            self.service.pump();
        }
    }
}

impl ChatService {
    /// Waits for a generation slot for a stateless request of `tenant`, in the same queues
    /// (and with the same fairness and bounds, cluster-wide in a cluster) as chat replies.
    pub async fn acquire(&self, tenant: TenantId) -> Result<Slot, ChatError> {
        if self.0.model.engine().is_none() {
            return Err(ChatError::ModelNotReady);
        }
        self.cluster_queue_place(tenant).await?;
        let id = self.0.next_slot.fetch_add(1, Ordering::Relaxed);
        let (grant, granted) = oneshot::channel();
        {
            let mut sched = self.scheduler();
            // Checked under the scheduler's lock: `shutdown` changes the phase, then takes
            // this lock to turn away whoever waits.
            if *self.0.phase.borrow() != Phase::Serving {
                return Err(ChatError::ShuttingDown);
            }
            sched.reserve(tenant)?;
            sched.enqueue(
                tenant,
                Waiting::Slot {
                    id,
                    grant,
                    background: false,
                },
            );
        }
        let _waiting = SlotWait {
            service: self.clone(),
            tenant,
            id,
        };
        self.pump();
        granted.await.map_err(|_| ChatError::ShuttingDown)
    }
}

/// Background work waiting for a slot; dropped, it leaves the queue.
struct BackgroundWait {
    service: ChatService,
    id: u64,
}

impl Drop for BackgroundWait {
    fn drop(&mut self) {
        let removed = lock(&self.service.0.scheduler).remove_background(|w| w.is_slot(self.id));
        drop(removed);
    }
}

impl ChatService {
    /// Waits for a slot for background work done for `tenant` (a chat's title): granted
    /// only when no reply waits, one at a time. `None` when the model is not loaded, the
    /// server is stopping or too much background work waits already.
    pub(super) async fn acquire_background(&self, tenant: TenantId) -> Option<Slot> {
        self.0.model.engine()?;
        let id = self.0.next_slot.fetch_add(1, Ordering::Relaxed);
        let (grant, granted) = oneshot::channel();
        {
            let mut sched = self.scheduler();
            if *self.0.phase.borrow() != Phase::Serving {
                return None;
            }
            let item = Waiting::Slot {
                id,
                grant,
                background: true,
            };
            if !sched.enqueue_background(tenant, item) {
                return None;
            }
        }
        let _waiting = BackgroundWait {
            service: self.clone(),
            id,
        };
        self.pump();
        granted.await.ok()
    }
}
