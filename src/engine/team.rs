//! A small team of threads for the matrix products of one token.
//!
//! Decoding a token is ~120 matrix-vector products of 50–500 µs each. With a general-purpose
//! pool (rayon) the helper thread falls asleep between them and is woken by a futex call
//! every time: measured, a quarter of the CPU time went to scheduling. Here the helpers spin
//! while work keeps coming and only park after a few milliseconds without any, so an idle
//! server does not burn CPU.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long an idle helper spins before it parks.
const SPIN_BEFORE_PARK: Duration = Duration::from_millis(5);

/// The job of one round: a borrowed closure, called with the thread's index.
struct JobRef<'a>(&'a (dyn Fn(usize) + Sync));

struct Shared {
    /// Bumped once per round; helpers run the job when it changes.
    round: AtomicUsize,
    /// Helpers that finished the current round.
    done: AtomicUsize,
    job: AtomicPtr<JobRef<'static>>,
    panicked: AtomicBool,
    stop: AtomicBool,
}

/// `threads - 1` helper threads plus the caller.
pub struct Team {
    shared: Arc<Shared>,
    helpers: Vec<JoinHandle<()>>,
}

impl Team {
    pub fn new(threads: usize) -> Team {
        let shared = Arc::new(Shared {
            round: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let helpers = (1..threads.max(1))
            .map(|tid| {
                let shared = shared.clone();
                std::thread::Builder::new()
                    .name(format!("confab-team-{tid}"))
                    .spawn(move || helper(&shared, tid))
                    .expect("spawn team thread")
            })
            .collect();
        Team { shared, helpers }
    }

    /// Number of threads, the caller included.
    pub fn size(&self) -> usize {
        self.helpers.len() + 1
    }

    /// Runs `f(0)` here and `f(1..size)` on the helpers; returns when all are done.
    pub fn run(&self, f: &(dyn Fn(usize) + Sync)) {
        if self.helpers.is_empty() {
            f(0);
            return;
        }
        let job = JobRef(f);
        // The pointer is only used by helpers before they report `done`, and this function
        // does not return before every helper has: the borrow outlives every use.
        let ptr = &job as *const JobRef<'_> as *mut JobRef<'static>;
        self.shared.job.store(ptr, Ordering::Release);
        self.shared.done.store(0, Ordering::Release);
        self.shared.round.fetch_add(1, Ordering::AcqRel);
        for h in &self.helpers {
            h.thread().unpark();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| f(0)));
        let want = self.helpers.len();
        let mut spins = 0u32;
        while self.shared.done.load(Ordering::Acquire) < want {
            backoff(&mut spins);
        }
        self.shared
            .job
            .store(std::ptr::null_mut(), Ordering::Release);
        if let Err(p) = mine {
            std::panic::resume_unwind(p);
        }
        if self.shared.panicked.swap(false, Ordering::AcqRel) {
            panic!("a model thread panicked");
        }
    }
}

fn helper(shared: &Shared, tid: usize) {
    // Round 0 is "no work yet"; reading the counter here instead could miss a round that
    // started before this thread did.
    let mut seen = 0;
    loop {
        let idle_since = Instant::now();
        let mut spins = 0u32;
        loop {
            if shared.stop.load(Ordering::Acquire) {
                return;
            }
            let r = shared.round.load(Ordering::Acquire);
            if r != seen {
                seen = r;
                break;
            }
            if spins % 1024 == 1023 && idle_since.elapsed() > SPIN_BEFORE_PARK {
                std::thread::park_timeout(Duration::from_millis(100));
            }
            backoff(&mut spins);
        }
        let ptr = shared.job.load(Ordering::Acquire);
        if !ptr.is_null() {
            // SAFETY: `Team::run` keeps the job alive until this thread increments `done`.
            let job = unsafe { &*ptr };
            if catch_unwind(AssertUnwindSafe(|| (job.0)(tid))).is_err() {
                shared.panicked.store(true, Ordering::Release);
            }
        }
        shared.done.fetch_add(1, Ordering::AcqRel);
    }
}

/// Spins briefly, then yields: with more runnable threads than cores (other work on the
/// machine, parallel tests), a pure spin would keep the thread it waits for off the CPU.
#[inline]
fn backoff(spins: &mut u32) {
    *spins = spins.wrapping_add(1);
    if *spins < 2048 {
        std::hint::spin_loop();
    } else {
        std::thread::yield_now();
    }
}

impl Drop for Team {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        for h in self.helpers.drain(..) {
            h.thread().unpark();
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_thread_runs_each_round() {
        let team = Team::new(2);
        let hits = AtomicUsize::new(0);
        for _ in 0..1000 {
            team.run(&|tid| {
                hits.fetch_add(tid + 1, Ordering::Relaxed);
            });
        }
        assert_eq!(hits.load(Ordering::Relaxed), 1000 * 3);
        // After an idle spell the parked helpers still answer.
        std::thread::sleep(Duration::from_millis(20));
        team.run(&|tid| {
            hits.fetch_add(tid + 1, Ordering::Relaxed);
        });
        assert_eq!(hits.load(Ordering::Relaxed), 1001 * 3);
    }

    #[test]
    fn a_panicking_job_is_reported_not_hung() {
        let team = Team::new(2);
        let r = catch_unwind(AssertUnwindSafe(|| {
            team.run(&|tid| assert!(tid == 0, "helper fails"))
        }));
        assert!(r.is_err());
        team.run(&|_| {});
    }
}
