//! Who gets the engine next: one bounded queue of waiting replies per tenant, served
//! least-recently-served tenant first.
//!
//! Plain round-robin over a list of tenants has a flaw: a tenant that was just served goes to
//! the back, but a tenant that arrives *after* that goes behind it. Ordering by "when was this
//! tenant last given a slot" instead puts a newcomer (never served, or served long ago) ahead
//! of a tenant that is working through a backlog, so one tenant's backlog delays another's
//! reply by at most the replies already running. Tenants with backlogs alternate.
//!
//! Background work (chat titles) waits in a queue of its own and gets a slot only when no
//! tenant's item could take it, one at a time: it never runs ahead of anyone's reply.
//!
//! Pure bookkeeping, no I/O and no locks: the chat service wraps it in a mutex.

use std::collections::{HashMap, VecDeque};

use crate::store::TenantId;

/// How many replies may wait and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerLimits {
    /// Replies generated at the same time (the engine's capacity).
    pub slots: usize,
    /// Replies one tenant may have waiting (reserved ones included).
    pub queue_per_tenant: usize,
    /// Slots one tenant may hold at once.
    pub max_running_per_tenant: usize,
    /// Replies waiting (and reserved), all tenants together: past this the server is
    /// overloaded, whatever each tenant's own queue says.
    pub max_waiting_total: usize,
}

impl SchedulerLimits {
    fn normalized(l: SchedulerLimits) -> SchedulerLimits {
        SchedulerLimits {
            slots: l.slots.max(1),
            queue_per_tenant: l.queue_per_tenant.max(1),
            max_running_per_tenant: l.max_running_per_tenant.max(1),
            max_waiting_total: l.max_waiting_total.max(1),
        }
    }
}

/// Why a new reply is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The tenant's own queue is full.
    QueueFull { capacity: usize },
    /// All queues together are at the server's bound.
    Overloaded { capacity: usize },
}

#[derive(Debug)]
struct TenantQueue<T> {
    waiting: VecDeque<T>,
    /// Places promised to replies whose user message is still being saved.
    reserved: usize,
    running: usize,
    /// Value of the dispatch counter when this tenant last got a slot (0: never).
    last_served: u64,
    /// Tie-break among tenants never served: first come, first served.
    arrival: u64,
}

/// Per-tenant queues of items `T` (one per waiting reply), keyed by `K` for removal.
#[derive(Debug)]
pub struct Scheduler<T> {
    limits: SchedulerLimits,
    tenants: HashMap<TenantId, TenantQueue<T>>,
    running: usize,
    dispatched: u64,
    arrivals: u64,
    /// Background items, oldest first, with the tenant they are done for.
    background: VecDeque<(TenantId, T)>,
    /// Background items holding a slot (at most one).
    background_running: usize,
}

/// Background items that may wait at once; more are refused (a title is a nicety).
pub const MAX_BACKGROUND: usize = 256;

impl<T> Scheduler<T> {
    pub fn new(limits: SchedulerLimits) -> Scheduler<T> {
        Scheduler {
            limits: SchedulerLimits::normalized(limits),
            tenants: HashMap::new(),
            running: 0,
            dispatched: 0,
            arrivals: 0,
            background: VecDeque::new(),
            background_running: 0,
        }
    }

    /// Queues background work; false (and not queued) when [`MAX_BACKGROUND`] wait already.
    pub fn enqueue_background(&mut self, tenant: TenantId, item: T) -> bool {
        if self.background.len() >= MAX_BACKGROUND {
            return false;
        }
        self.background.push_back((tenant, item));
        true
    }

    /// A background item ended; its slot is free.
    pub fn finish_background(&mut self) {
        if self.background_running > 0 {
            self.background_running -= 1;
            self.running = self.running.saturating_sub(1);
        }
    }

    /// Takes a waiting background item out (whoever waited for it went away).
    pub fn remove_background(&mut self, matches: impl Fn(&T) -> bool) -> Option<T> {
        let at = self.background.iter().position(|(_, item)| matches(item))?;
        self.background.remove(at).map(|(_, item)| item)
    }

    /// New limits; what already runs or waits stays (fewer slots than running replies only
    /// delays the next dispatch).
    pub fn set_limits(&mut self, limits: SchedulerLimits) {
        self.limits = SchedulerLimits::normalized(limits);
    }

    pub fn limits(&self) -> SchedulerLimits {
        self.limits
    }

    fn tenant(&mut self, tenant: TenantId) -> &mut TenantQueue<T> {
        let arrivals = &mut self.arrivals;
        self.tenants.entry(tenant).or_insert_with(|| {
            *arrivals += 1;
            TenantQueue {
                waiting: VecDeque::new(),
                reserved: 0,
                running: 0,
                last_served: 0,
                arrival: *arrivals,
            }
        })
    }

    /// Promises a place in the tenant's queue (the item follows with [`Self::enqueue`] or
    /// the promise is taken back with [`Self::unreserve`]).
    /// A place is free when the tenant's waiting and reserved replies fit in its queue plus
    /// the slots it could start at once (a reply that will not wait takes no queue place).
    pub fn reserve(&mut self, tenant: TenantId) -> Result<(), Refused> {
        let capacity = self.limits.queue_per_tenant;
        let free_slots = self.limits.slots.saturating_sub(self.running);
        let total: usize = self
            .tenants
            .values()
            .map(|q| q.waiting.len() + q.reserved)
            .sum();
        if total >= self.limits.max_waiting_total + free_slots {
            return Err(Refused::Overloaded {
                capacity: self.limits.max_waiting_total,
            });
        }
        let (queued, allowed) = self.queue_use(tenant);
        if queued >= allowed {
            return Err(Refused::QueueFull { capacity });
        }
        self.tenant(tenant).reserved += 1;
        Ok(())
    }

    /// The tenant's waiting and reserved replies, and how many [`Self::reserve`] lets it
    /// have (its queue plus the slots it could start at once).
    pub fn queue_use(&self, tenant: TenantId) -> (usize, usize) {
        let free_slots = self.limits.slots.saturating_sub(self.running);
        let (queued, running) = self
            .tenants
            .get(&tenant)
            .map_or((0, 0), |q| (q.waiting.len() + q.reserved, q.running));
        let startable = free_slots.min(self.limits.max_running_per_tenant.saturating_sub(running));
        (queued, self.limits.queue_per_tenant + startable)
    }

    /// Waiting and reserved replies by tenant (tenants with none left out).
    pub fn queued_by_tenant(&self) -> HashMap<TenantId, usize> {
        self.tenants
            .iter()
            .map(|(t, q)| (*t, q.waiting.len() + q.reserved))
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    pub fn unreserve(&mut self, tenant: TenantId) {
        if let Some(q) = self.tenants.get_mut(&tenant) {
            q.reserved = q.reserved.saturating_sub(1);
        }
        self.forget_idle(tenant);
    }

    /// Turns a reservation into a waiting item.
    pub fn enqueue(&mut self, tenant: TenantId, item: T) {
        let q = self.tenant(tenant);
        q.reserved = q.reserved.saturating_sub(1);
        q.waiting.push_back(item);
    }

    /// The next item to run, if a slot is free: from the eligible tenant served least
    /// recently. The slot stays taken until [`Self::finish`].
    pub fn dispatch(&mut self) -> Option<(TenantId, T)> {
        if self.running >= self.limits.slots {
            return None;
        }
        let cap = self.limits.max_running_per_tenant;
        let next = self
            .tenants
            .iter()
            .filter(|(_, q)| !q.waiting.is_empty() && q.running < cap)
            .min_by_key(|(_, q)| (q.last_served, q.arrival))
            .map(|(t, _)| *t);
        let Some(tenant) = next else {
            return self.dispatch_background();
        };
        self.dispatched += 1;
        self.running += 1;
        let stamp = self.dispatched;
        let q = self.tenants.get_mut(&tenant)?;
        q.running += 1;
        q.last_served = stamp;
        q.waiting.pop_front().map(|item| (tenant, item))
    }

    /// A background item, when no tenant's item could have the free slot.
    fn dispatch_background(&mut self) -> Option<(TenantId, T)> {
        let waiting = self.tenants.values().any(|q| !q.waiting.is_empty());
        if waiting || self.background_running > 0 {
            return None;
        }
        let item = self.background.pop_front()?;
        self.background_running += 1;
        self.running += 1;
        Some(item)
    }

    /// A running item of `tenant` ended; its slot is free.
    pub fn finish(&mut self, tenant: TenantId) {
        if let Some(q) = self.tenants.get_mut(&tenant) {
            q.running = q.running.saturating_sub(1);
            self.running = self.running.saturating_sub(1);
        }
        self.forget_idle(tenant);
    }

    /// Takes a waiting item out (its reply was cancelled before it started).
    pub fn remove(&mut self, tenant: TenantId, matches: impl Fn(&T) -> bool) -> Option<T> {
        let q = self.tenants.get_mut(&tenant)?;
        let at = q.waiting.iter().position(matches)?;
        let item = q.waiting.remove(at);
        self.forget_idle(tenant);
        item
    }

    /// Takes out every waiting item that `matches`, all tenants (a shutdown turning away
    /// requests that would wait forever).
    pub fn remove_all(&mut self, matches: impl Fn(&T) -> bool) -> Vec<T> {
        let mut out = Vec::new();
        let tenants: Vec<TenantId> = self.tenants.keys().copied().collect();
        for t in tenants {
            if let Some(q) = self.tenants.get_mut(&t) {
                let (gone, kept): (VecDeque<T>, VecDeque<T>) =
                    q.waiting.drain(..).partition(|item| matches(item));
                q.waiting = kept;
                out.extend(gone);
            }
            self.forget_idle(t);
        }
        out
    }

    /// Drops the bookkeeping of a tenant with nothing waiting, reserved or running, so the
    /// map does not grow with every tenant ever seen. Its `last_served` goes too, which only
    /// ever moves it ahead: a tenant idle long enough to be forgotten deserves the next slot.
    fn forget_idle(&mut self, tenant: TenantId) {
        if let Some(q) = self.tenants.get(&tenant) {
            if q.waiting.is_empty() && q.reserved == 0 && q.running == 0 {
                self.tenants.remove(&tenant);
            }
        }
    }

    /// Replies running now.
    pub fn running(&self) -> usize {
        self.running
    }

    /// Replies waiting, per tenant with any.
    pub fn waiting_by_tenant(&self) -> Vec<(TenantId, usize)> {
        self.tenants
            .iter()
            .filter(|(_, q)| !q.waiting.is_empty())
            .map(|(t, q)| (*t, q.waiting.len()))
            .collect()
    }

    /// Replies waiting, all tenants together.
    pub fn waiting(&self) -> usize {
        self.tenants.values().map(|q| q.waiting.len()).sum()
    }

    /// Every waiting item with its place in line (1 = next), in that order, assuming no
    /// new arrivals: the order [`Self::dispatch`] would hand them out.
    pub fn positions(&self) -> Vec<(&T, usize)> {
        let mut cursors: Vec<(u64, u64, &TenantQueue<T>, usize)> = self
            .tenants
            .values()
            .filter(|q| !q.waiting.is_empty())
            .map(|q| (q.last_served, q.arrival, q, 0))
            .collect();
        let mut out = Vec::with_capacity(self.waiting());
        let mut stamp = self.dispatched;
        while let Some(best) = cursors
            .iter_mut()
            .filter(|c| c.3 < c.2.waiting.len())
            .min_by_key(|c| (c.0, c.1))
        {
            stamp += 1;
            best.0 = stamp;
            out.push((&best.2.waiting[best.3], out.len() + 1));
            best.3 += 1;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn tenant() -> TenantId {
        TenantId::from_uuid(Uuid::new_v4())
    }

    fn limits(slots: usize, queue: usize, share: usize) -> SchedulerLimits {
        SchedulerLimits {
            slots,
            queue_per_tenant: queue,
            max_running_per_tenant: share,
            max_waiting_total: 1000,
        }
    }

    fn push<T>(s: &mut Scheduler<T>, t: TenantId, item: T) {
        s.reserve(t).unwrap();
        s.enqueue(t, item);
    }

    #[test]
    fn background_work_waits_for_every_reply_and_runs_one_at_a_time() {
        let (a, b) = (tenant(), tenant());
        let mut s = Scheduler::new(limits(2, 10, 2));
        assert!(s.enqueue_background(a, "title-1"));
        assert!(s.enqueue_background(b, "title-2"));
        push(&mut s, a, "reply-1");
        push(&mut s, b, "reply-2");
        push(&mut s, b, "reply-3");
        // Replies first, even those queued after the titles.
        assert_eq!(s.dispatch(), Some((a, "reply-1")));
        assert_eq!(s.dispatch(), Some((b, "reply-2")));
        assert_eq!(s.dispatch(), None);
        s.finish(a);
        assert_eq!(s.dispatch(), Some((b, "reply-3")));
        s.finish(b);
        // Nothing waits: a title takes the free slot, and only one title runs at a time.
        assert_eq!(s.dispatch(), Some((a, "title-1")));
        assert_eq!(s.dispatch(), None);
        assert_eq!(s.running(), 2);
        s.finish_background();
        assert_eq!(s.dispatch(), Some((b, "title-2")));
        s.finish_background();
        s.finish(b);
        assert_eq!(s.running(), 0);
        // Bounded; and a waiting one can be taken out.
        for _ in 0..MAX_BACKGROUND {
            assert!(s.enqueue_background(a, "t"));
        }
        assert!(!s.enqueue_background(a, "t"));
        assert_eq!(s.remove_background(|t| *t == "t"), Some("t"));
    }

    #[test]
    fn a_newcomer_goes_before_a_backlog() {
        let (a, b) = (tenant(), tenant());
        let mut s = Scheduler::new(limits(1, 16, 1));
        for i in 0..16 {
            push(&mut s, a, ("a", i));
        }
        assert_eq!(s.dispatch(), Some((a, ("a", 0))));
        assert!(s.dispatch().is_none(), "one slot");
        push(&mut s, b, ("b", 0));
        let pos = s.positions();
        assert_eq!(pos[0], (&("b", 0), 1), "b is next: {pos:?}");
        s.finish(a);
        assert_eq!(s.dispatch(), Some((b, ("b", 0))));
        s.finish(b);
        assert_eq!(s.dispatch(), Some((a, ("a", 1))));
    }

    #[test]
    fn backlogs_alternate() {
        let (a, b) = (tenant(), tenant());
        let mut s = Scheduler::new(limits(1, 16, 1));
        for i in 0..3 {
            push(&mut s, a, ('a', i));
            push(&mut s, b, ('b', i));
        }
        let predicted: Vec<_> = s.positions().into_iter().map(|(x, _)| *x).collect();
        let mut got = vec![];
        while let Some((t, item)) = s.dispatch() {
            got.push(item);
            s.finish(t);
        }
        assert_eq!(got, predicted);
        assert_eq!(
            got.iter().map(|x| x.0).collect::<String>(),
            "ababab",
            "{got:?}"
        );
    }

    #[test]
    fn queue_is_bounded_and_reservations_count() {
        let a = tenant();
        let mut s: Scheduler<u32> = Scheduler::new(limits(1, 2, 1));
        // Two queue places plus the free slot.
        s.reserve(a).unwrap();
        s.reserve(a).unwrap();
        s.reserve(a).unwrap();
        assert_eq!(s.reserve(a), Err(Refused::QueueFull { capacity: 2 }));
        s.unreserve(a);
        s.reserve(a).unwrap();
        s.enqueue(a, 1);
        s.enqueue(a, 2);
        s.enqueue(a, 3);
        assert!(s.reserve(a).is_err());
        assert_eq!(s.dispatch(), Some((a, 1)));
        // One running, two waiting: full until one starts.
        assert!(s.reserve(a).is_err());
        s.finish(a);
        assert_eq!(s.dispatch(), Some((a, 2)));
        s.reserve(a).unwrap();
    }

    #[test]
    fn the_server_bound_covers_all_tenants() {
        let mut s: Scheduler<u32> = Scheduler::new(SchedulerLimits {
            max_waiting_total: 3,
            ..limits(1, 16, 1)
        });
        let t: Vec<TenantId> = (0..4).map(|_| tenant()).collect();
        // The free slot plus three waiting places, whoever asks.
        for x in &t {
            s.reserve(*x).unwrap();
        }
        assert_eq!(s.reserve(t[0]), Err(Refused::Overloaded { capacity: 3 }));
    }

    /// No cap (the default): a tenant alone takes every slot; a tenant arriving then gets the
    /// first slot that frees, ahead of the first tenant's backlog, and the two alternate.
    #[test]
    fn idle_slots_are_used_and_a_newcomer_gets_the_next_free_one() {
        let (a, b) = (tenant(), tenant());
        let mut s = Scheduler::new(limits(4, 16, 4));
        for i in 0..8 {
            push(&mut s, a, ('a', i));
        }
        for i in 0..4 {
            assert_eq!(s.dispatch(), Some((a, ('a', i))), "a alone uses slot {i}");
        }
        assert!(s.dispatch().is_none(), "all four slots busy");
        push(&mut s, b, ('b', 0));
        push(&mut s, b, ('b', 1));
        assert_eq!(s.positions()[0], (&('b', 0), 1));
        s.finish(a);
        assert_eq!(
            s.dispatch(),
            Some((b, ('b', 0))),
            "the freed slot goes to b"
        );
        s.finish(a);
        assert_eq!(
            s.dispatch(),
            Some((a, ('a', 4))),
            "then a, served less recently"
        );
        s.finish(a);
        assert_eq!(s.dispatch(), Some((b, ('b', 1))));
        assert_eq!(s.running(), 4);
    }

    #[test]
    fn a_tenant_holds_at_most_its_share_of_slots() {
        let (a, b) = (tenant(), tenant());
        let mut s = Scheduler::new(limits(4, 16, 2));
        for i in 0..5 {
            push(&mut s, a, i);
        }
        assert!(s.dispatch().is_some());
        assert!(s.dispatch().is_some());
        assert!(
            s.dispatch().is_none(),
            "a holds its two slots, b has nothing"
        );
        push(&mut s, b, 100);
        assert_eq!(s.dispatch(), Some((b, 100)));
        assert_eq!(s.running(), 3);
        s.finish(a);
        assert_eq!(s.dispatch().map(|x| x.0), Some(a));
    }

    #[test]
    fn removal_and_idle_tenants_are_forgotten() {
        let a = tenant();
        let mut s = Scheduler::new(limits(1, 4, 1));
        push(&mut s, a, 1);
        push(&mut s, a, 2);
        assert_eq!(s.dispatch(), Some((a, 1)));
        assert_eq!(s.remove(a, |x| *x == 2), Some(2));
        assert_eq!(s.remove(a, |x| *x == 2), None);
        s.finish(a);
        assert!(s.tenants.is_empty());
        assert_eq!(s.running(), 0);
    }
}
