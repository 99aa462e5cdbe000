//! Why a session woke up, per source: the client socket, the master link and the
//! shutdown token each register their own waker, which records its source before waking
//! the session's task.
//!
//! Without it every wake-up polls every source again, and each poll of a source that is
//! not ready registers the task's waker once more (tokio's `poll_read_ready` takes the
//! stream's waker lock each time). With it, a source whose waker is still registered
//! (polled `Pending`, not fired since) is skipped: at pipeline 1 a request's two
//! wake-ups poll four sources instead of seven.
//!
//! The rule, per source: *armed* = this source's waker is registered with it and has not
//! fired. Polled `Pending` arms it; polled `Ready`, or its waker firing, disarms it; only
//! an armed source may be skipped. A source's readiness may be polled with its waker only
//! in `Session::wait`: anything else that registers a waker on it (replacing this one in
//! tokio's single slot per direction) must disarm it first (`Link::readable`).

use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Wake, Waker};

/// A source with its own waker (a bit in `WakeState::bits`).
#[derive(Debug, Clone, Copy)]
pub(super) enum Source {
    Client = 1,
    Master = 2,
    Shutdown = 4,
    /// Output handed to the batch of sends came back (`uring`): a socket to write to.
    Output = 8,
}

/// What the sources' wakers share: which fired, and the task to wake. The task waker
/// stays (every firing wakes it): it is replaced only when the task polls with another
/// one, which a tokio task does not do. (An `AtomicWaker`, registered at every poll and
/// taken at every firing, costs more per request than this uncontended lock.)
#[derive(Debug, Default)]
struct WakeState {
    bits: AtomicU8,
    task: Mutex<Option<Waker>>,
}

/// One source's waker.
#[derive(Debug)]
struct SourceWaker {
    state: Arc<WakeState>,
    bit: u8,
}

impl Wake for SourceWaker {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        // The bit first: the task, once woken, must see it. Woken under the lock (no
        // clone of the waker): tokio's wake only queues the task.
        self.state.bits.fetch_or(self.bit, Ordering::AcqRel);
        let task = self
            .state
            .task
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(task) = task.as_ref() {
            task.wake_by_ref();
        }
    }
}

/// A session's per-source wakers.
#[derive(Debug)]
pub(super) struct Sources {
    state: Arc<WakeState>,
    /// The task waker last handed to `state` (compared here, without its lock).
    task: Option<Waker>,
    client: Waker,
    master: Waker,
    shutdown: Waker,
    output: Waker,
}

impl Default for Sources {
    fn default() -> Self {
        let state = Arc::new(WakeState::default());
        let waker = |source: Source| {
            Waker::from(Arc::new(SourceWaker {
                state: state.clone(),
                bit: source as u8,
            }))
        };
        Sources {
            client: waker(Source::Client),
            master: waker(Source::Master),
            shutdown: waker(Source::Shutdown),
            output: waker(Source::Output),
            task: None,
            state,
        }
    }
}

impl Sources {
    /// Start of a poll: the sources' wakers will wake the task polling with `cx`; the
    /// sources that fired since the last call are returned (and forgotten). The waker is
    /// set first: a source firing after it wakes the task, before it is seen here.
    pub(super) fn begin(&mut self, cx: &Context<'_>) -> Fired {
        if !self.task.as_ref().is_some_and(|t| t.will_wake(cx.waker())) {
            let waker = cx.waker().clone();
            *self
                .state
                .task
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(waker.clone());
            self.task = Some(waker);
        }
        Fired(self.state.bits.swap(0, Ordering::AcqRel))
    }

    /// The waker to poll `source` with.
    pub(super) fn waker(&self, source: Source) -> &Waker {
        match source {
            Source::Client => &self.client,
            Source::Master => &self.master,
            Source::Shutdown => &self.shutdown,
            Source::Output => &self.output,
        }
    }
}

/// The sources whose wakers fired.
#[derive(Debug, Clone, Copy)]
pub(super) struct Fired(u8);

impl Fired {
    /// Whether `source`'s waker fired.
    pub(super) fn has(self, source: Source) -> bool {
        self.0 & source as u8 != 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn a_source_waker_records_its_source_and_wakes_the_task() {
        let count = Arc::new(Count(AtomicUsize::new(0)));
        let task = Waker::from(count.clone());
        let cx = Context::from_waker(&task);
        let mut sources = Sources::default();
        assert!(!sources.begin(&cx).has(Source::Client));
        sources.waker(Source::Master).wake_by_ref();
        sources.waker(Source::Shutdown).wake_by_ref();
        assert_eq!(count.0.load(Ordering::SeqCst), 2);
        let fired = sources.begin(&cx);
        assert!(fired.has(Source::Master) && fired.has(Source::Shutdown));
        assert!(!fired.has(Source::Client));
        // Forgotten once returned.
        assert!(!sources.begin(&cx).has(Source::Master));
    }

    #[test]
    fn a_new_task_waker_replaces_the_old_one() {
        let first = Arc::new(Count(AtomicUsize::new(0)));
        let second = Arc::new(Count(AtomicUsize::new(0)));
        let mut sources = Sources::default();
        let w1 = Waker::from(first.clone());
        sources.begin(&Context::from_waker(&w1));
        let w2 = Waker::from(second.clone());
        sources.begin(&Context::from_waker(&w2));
        sources.waker(Source::Client).wake_by_ref();
        assert_eq!(first.0.load(Ordering::SeqCst), 0);
        assert_eq!(second.0.load(Ordering::SeqCst), 1);
    }
}
