//! Batched socket writes: sends of many connections handed to the kernel in one
//! `io_uring_enter` when the runtime thread runs out of work.
//!
//! Why: at pipeline 1 with many clients, a proxy and Redis that share a core pay for
//! every `send` to Redis twice, once for the call and once because the write wakes Redis,
//! which then takes the core and serves the one request it found. Sent together, the
//! requests of every session that woke in the same turn reach Redis before it runs, and
//! it serves them in one wake-up (`scripts/bench-cpu.sh`: Redis requests per wake-up).
//!
//! How: a plain TCP stream's output (`Stream::queue_batched`) is copied into this thread's
//! batch instead of written; the runtime's park hook (`submit`, registered in `main.rs`)
//! submits the batch as one `IORING_OP_SEND` per connection, with `MSG_DONTWAIT`, and
//! waits for every completion: all complete inside that call, so nothing is in flight
//! once it returns. What a socket did not take (a full socket buffer, an error) goes back
//! to its stream (`take_returned`), whose owner is woken to write it the ordinary way.
//!
//! Only on the single-threaded runtime (`enable_on_this_thread`): a batch lives in one
//! thread and a stream never moves to another before it is submitted. Must not leave a
//! queued send behind a socket that closes (`Stream`'s `Drop` submits first), and must
//! not let anything written directly overtake queued bytes (`Stream` submits first).
//! Without io_uring (not Linux, a kernel or a seccomp profile without it, `off`) every
//! call here reports "not batched" and streams write as before.

use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::Waker;

/// Largest output a stream queues in a batch (bytes): bigger writes gain nothing from
/// batching and are not worth a copy; they are written directly.
pub const MAX_QUEUED: usize = 16 * 1024;

/// Sends per batch at most (the ring's submission queue): a full batch is submitted at
/// once.
const RING_ENTRIES: u32 = 256;

/// Batches submitted (`portcullis_uring_submissions_total`).
static SUBMISSIONS: AtomicU64 = AtomicU64::new(0);
/// Sends in them (`portcullis_uring_sends_total`).
static SENDS: AtomicU64 = AtomicU64::new(0);

/// Batches submitted and sends they carried, since start: (submissions, sends).
pub fn totals() -> (u64, u64) {
    (
        SUBMISSIONS.load(Ordering::Relaxed),
        SENDS.load(Ordering::Relaxed),
    )
}

/// Make `builder` (a single-threaded runtime, to be built and run on this thread) batch
/// its streams' small writes: the ring is set up here and the park hook submits. `Err`
/// when the kernel refuses io_uring; the builder is then unchanged.
pub fn enable(builder: &mut tokio::runtime::Builder) -> io::Result<()> {
    enable_on_this_thread()?;
    builder.on_thread_park(submit);
    Ok(())
}

/// Where a stream's output waits in the current batch. `Default`: nothing queued yet.
#[derive(Debug, Default)]
pub struct Slot {
    /// This stream's key in the thread's batches (0: never queued).
    key: u64,
    /// The batch its entry is in.
    generation: u64,
    /// Its entry's position there.
    index: usize,
}

impl Slot {
    /// Whether this stream ever queued output (only then can anything be queued or come
    /// back: the common check, without the thread-local lookup).
    pub(crate) fn is_used(&self) -> bool {
        self.key != 0
    }
}

/// What a socket did not take of a stream's queued output.
#[derive(Debug)]
pub enum Returned {
    /// Bytes still to write, in order, before anything newer.
    Unsent(Vec<u8>),
    /// The send failed; none of these bytes was written.
    Failed(io::Error, Vec<u8>),
    /// A failure already reported: the bytes were never written (they count as unwritten
    /// until the stream closes; see `held`).
    Lost(Vec<u8>),
}

impl Returned {
    /// The bytes it holds.
    pub fn bytes(&self) -> usize {
        match self {
            Returned::Unsent(d) | Returned::Failed(_, d) | Returned::Lost(d) => d.len(),
        }
    }

    /// Whether the owner still has to act on it (write it, or see its error).
    pub fn pending(&self) -> bool {
        !matches!(self, Returned::Lost(_))
    }
}

#[cfg(target_os = "linux")]
pub use imp::{enable_on_this_thread, submit};

#[cfg(target_os = "linux")]
pub(crate) use imp::{forget, has_returned, held, queue, submit_if_queued, take_returned};

#[cfg(target_os = "linux")]
#[allow(unsafe_code)]
mod imp {
    //! The ring and the thread's batch. Two `unsafe` calls: `SubmissionQueue::push`
    //! (the kernel reads each entry's buffer until its completion, and every buffer stays
    //! in `Batch::entries`, not moved, not freed, until `submit` has reaped all
    //! completions or closed the ring) and `libc::send` for a batch of one.

    use super::*;
    use std::cell::RefCell;
    use std::os::fd::RawFd;

    use io_uring::{opcode, types, IoUring};

    struct Entry {
        fd: RawFd,
        key: u64,
        data: Vec<u8>,
        /// Woken when something comes back.
        waker: Waker,
    }

    struct Batch {
        /// `None` once the ring failed: this thread writes directly from then on.
        ring: Option<IoUring>,
        generation: u64,
        entries: Vec<Entry>,
        /// Output that came back, by stream key (rare: a full socket buffer, an error).
        returned: Vec<(u64, Returned)>,
        /// Buffers of completed entries, for the next ones.
        spare: Vec<Vec<u8>>,
        next_key: u64,
    }

    thread_local! {
        static BATCH: RefCell<Option<Batch>> = const { RefCell::new(None) };
    }

    /// Batch this thread's stream writes from now on (`submit` must then run whenever
    /// the thread is about to wait: `enable`). `Err` when the kernel refuses io_uring
    /// (too old, disabled by `kernel.io_uring_disabled`, a seccomp profile): writes then
    /// stay direct.
    pub fn enable_on_this_thread() -> io::Result<()> {
        let ring = IoUring::builder()
            .setup_submit_all()
            .setup_coop_taskrun()
            .setup_single_issuer()
            .build(RING_ENTRIES)
            // Kernels before 6.0 lack the flags; the ring works without them.
            .or_else(|_| IoUring::new(RING_ENTRIES))?;
        BATCH.with(|b| {
            *b.borrow_mut() = Some(Batch {
                ring: Some(ring),
                generation: 1,
                entries: Vec::new(),
                returned: Vec::new(),
                spare: Vec::new(),
                next_key: 1,
            })
        });
        Ok(())
    }

    /// Queue `bufs` (in order) for `fd`, after what `slot` queued before. `false`: not
    /// batched here (no ring on this thread); write directly.
    pub(crate) fn queue(fd: RawFd, slot: &mut Slot, bufs: &[&[u8]], waker: &Waker) -> bool {
        let full = BATCH.with(|b| {
            let mut guard = b.borrow_mut();
            let batch = guard.as_mut().filter(|b| b.ring.is_some())?;
            if slot.key == 0 {
                slot.key = batch.next_key;
                batch.next_key += 1;
            }
            let open = slot.generation == batch.generation
                && batch
                    .entries
                    .get(slot.index)
                    .is_some_and(|e| e.key == slot.key);
            let entry = if open {
                &mut batch.entries[slot.index]
            } else {
                let data = batch.spare.pop().unwrap_or_default();
                slot.generation = batch.generation;
                slot.index = batch.entries.len();
                batch.entries.push(Entry {
                    fd,
                    key: slot.key,
                    data,
                    waker: waker.clone(),
                });
                &mut batch.entries[slot.index]
            };
            for buf in bufs {
                entry.data.extend_from_slice(buf);
            }
            Some(batch.entries.len() >= RING_ENTRIES as usize)
        });
        match full {
            None => false,
            Some(full) => {
                if full {
                    submit();
                }
                true
            }
        }
    }

    /// Whether `slot` has output in the batch not submitted yet.
    fn is_queued(slot: &Slot) -> bool {
        slot.key != 0
            && BATCH.with(|b| {
                b.borrow()
                    .as_ref()
                    .is_some_and(|batch| batch.generation == slot.generation)
            })
    }

    /// Submit the batch now if `slot` has output in it: before a direct write, a
    /// half-close or a close of that socket.
    pub(crate) fn submit_if_queued(slot: &Slot) {
        if is_queued(slot) {
            submit();
        }
    }

    /// Whether output of `slot` came back and waits for its owner (to be written, or
    /// its error seen).
    pub(crate) fn has_returned(slot: &Slot) -> bool {
        slot.key != 0
            && BATCH.with(|b| {
                b.borrow().as_ref().is_some_and(|batch| {
                    !batch.returned.is_empty()
                        && batch
                            .returned
                            .iter()
                            .any(|r| r.0 == slot.key && r.1.pending())
                })
            })
    }

    /// Bytes of `slot` not written yet: queued in the open batch, or come back.
    pub(crate) fn held(slot: &Slot) -> usize {
        if slot.key == 0 {
            return 0;
        }
        BATCH.with(|b| {
            let guard = b.borrow();
            let Some(batch) = guard.as_ref() else {
                return 0;
            };
            let queued = if batch.generation == slot.generation {
                batch.entries.get(slot.index).map_or(0, |e| e.data.len())
            } else {
                0
            };
            queued
                + batch
                    .returned
                    .iter()
                    .filter(|r| r.0 == slot.key)
                    .map(|r| r.1.bytes())
                    .sum::<usize>()
        })
    }

    /// Take what came back of `slot`'s output.
    pub(crate) fn take_returned(slot: &Slot) -> Option<Returned> {
        if slot.key == 0 {
            return None;
        }
        BATCH.with(|b| {
            let mut guard = b.borrow_mut();
            let batch = guard.as_mut()?;
            let at = batch.returned.iter().position(|r| r.0 == slot.key)?;
            Some(batch.returned.swap_remove(at).1)
        })
    }

    /// Put back what is left of `slot`'s returned output (its socket is full again).
    pub(crate) fn give_back(slot: &Slot, returned: Returned) {
        BATCH.with(|b| {
            if let Some(batch) = b.borrow_mut().as_mut() {
                batch.returned.push((slot.key, returned));
            }
        })
    }

    /// The stream of `slot` is closing: what it queued is not sent (its descriptor is
    /// about to close, and may then name another connection), and what came back is
    /// dropped. Both counted as unwritten (`held`) until now, as bytes left in an output
    /// queue are when a connection closes: a session closes a stream with output only
    /// when that output can no longer matter (a lost link whose unwritten requests are
    /// retried elsewhere, a failed client); it settles a finished one first.
    pub(crate) fn forget(slot: &Slot) {
        if slot.key == 0 {
            return;
        }
        BATCH.with(|b| {
            let mut guard = b.borrow_mut();
            let Some(batch) = guard.as_mut() else {
                return;
            };
            if batch.generation == slot.generation {
                if let Some(e) = batch.entries.get_mut(slot.index) {
                    e.fd = -1;
                    e.data.clear();
                }
            }
            batch.returned.retain(|r| r.0 != slot.key);
        });
    }

    /// Submit the batch and wait for every completion (the runtime's park hook). A send
    /// that fell short comes back to its stream and wakes its owner.
    pub fn submit() {
        let wake = BATCH.with(|b| {
            let mut guard = b.borrow_mut();
            let batch = guard.as_mut()?;
            if batch.entries.is_empty() {
                return None;
            }
            Some(batch.run())
        });
        for waker in wake.into_iter().flatten() {
            waker.wake();
        }
    }

    impl Batch {
        /// Send every entry; the wakers of entries that came back.
        fn run(&mut self) -> Vec<Waker> {
            let n = self.entries.len();
            // No entry is queued into this batch from here on: the next one is new.
            self.generation += 1;
            let mut results: Vec<Option<i32>> = vec![None; n];
            let live: Vec<usize> = (0..n).filter(|&i| self.entries[i].fd >= 0).collect();
            for (i, r) in results.iter_mut().enumerate() {
                if self.entries[i].fd < 0 {
                    // Forgotten (its stream closed): nothing to send.
                    *r = Some(0);
                }
            }
            match live.as_slice() {
                [] => {}
                // One send: a plain `send` costs less than a submission and gathers
                // nothing less.
                &[i] => results[i] = Some(send(&self.entries[i])),
                _ => self.submit_all(&live, &mut results),
            }
            SUBMISSIONS.fetch_add(1, Ordering::Relaxed);
            SENDS.fetch_add(live.len() as u64, Ordering::Relaxed);
            let mut wake = Vec::new();
            for (e, result) in self.entries.drain(..).zip(results) {
                let Entry {
                    key,
                    mut data,
                    waker,
                    ..
                } = e;
                match result {
                    Some(sent) if sent >= 0 && sent as usize >= data.len() => {
                        if data.capacity() <= MAX_QUEUED * 2 && self.spare.len() < 64 {
                            data.clear();
                            self.spare.push(data);
                        }
                    }
                    other => {
                        let returned = match other {
                            Some(sent) if sent >= 0 => {
                                data.drain(..sent as usize);
                                Returned::Unsent(data)
                            }
                            Some(err) if -err == libc::EAGAIN => Returned::Unsent(data),
                            Some(err) => Returned::Failed(io::Error::from_raw_os_error(-err), data),
                            // Never reaped (the ring failed): the owner writes it.
                            None => Returned::Unsent(data),
                        };
                        self.returned.push((key, returned));
                        wake.push(waker);
                    }
                }
            }
            wake
        }

        /// Submit the `live` entries in one `io_uring_enter` and gather their results.
        /// If the ring fails, it is closed (what it did not take is never sent) and the
        /// entries without a result come back to their streams.
        fn submit_all(&mut self, live: &[usize], results: &mut [Option<i32>]) {
            let Some(ring) = self.ring.as_mut() else {
                return;
            };
            {
                let mut sq = ring.submission();
                for &i in live {
                    let e = &self.entries[i];
                    let len = u32::try_from(e.data.len()).unwrap_or(u32::MAX);
                    let sqe = opcode::Send::new(types::Fd(e.fd), e.data.as_ptr(), len)
                        .flags(libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL)
                        .build()
                        .user_data(i as u64);
                    // SAFETY: `e.data` is neither moved nor freed until its completion is
                    // reaped below, or until the ring is closed without having taken it;
                    // a batch never holds more entries than the queue (`queue` submits a
                    // full one), so the push cannot fail.
                    let _ = unsafe { sq.push(&sqe) };
                }
            }
            let mut reaped = 0;
            while reaped < live.len() {
                // MSG_DONTWAIT: a send that cannot go now completes with EAGAIN instead
                // of waiting, so this returns as soon as the kernel has gone through them.
                if let Err(e) = ring.submit_and_wait(live.len() - reaped) {
                    if e.kind() == io::ErrorKind::Interrupted {
                        continue;
                    }
                    // A failed call took no entry: closing the ring drops the rest unsent.
                    tracing::warn!(error = %e, "io_uring submission failed; direct sends from now on");
                    self.ring = None;
                    return;
                }
                for cqe in ring.completion() {
                    if let Some(r) = results.get_mut(cqe.user_data() as usize) {
                        if r.is_none() {
                            *r = Some(cqe.result());
                            reaped += 1;
                        }
                    }
                }
            }
        }
    }

    /// One entry's bytes in one non-blocking `send`: bytes sent, or minus the errno.
    fn send(e: &Entry) -> i32 {
        // SAFETY: the pointer and length describe `e.data`, alive for the call.
        let sent = unsafe {
            libc::send(
                e.fd,
                e.data.as_ptr().cast(),
                e.data.len(),
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if sent >= 0 {
            i32::try_from(sent).unwrap_or(i32::MAX)
        } else {
            -io::Error::last_os_error()
                .raw_os_error()
                .unwrap_or(libc::EIO)
        }
    }
}

#[cfg(target_os = "linux")]
pub(crate) use imp::give_back;

#[cfg(not(target_os = "linux"))]
mod imp {
    //! No io_uring: nothing is ever batched.
    use super::*;

    /// Not available here.
    pub fn enable_on_this_thread() -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }
    /// Nothing to submit.
    pub fn submit() {}
    pub(crate) fn queue(_: i32, _: &mut Slot, _: &[&[u8]], _: &Waker) -> bool {
        false
    }
    pub(crate) fn submit_if_queued(_: &Slot) {}
    pub(crate) fn has_returned(_: &Slot) -> bool {
        false
    }
    pub(crate) fn take_returned(_: &Slot) -> Option<Returned> {
        None
    }
    pub(crate) fn give_back(_: &Slot, _: Returned) {}
    pub(crate) fn forget(_: &Slot) {}
    pub(crate) fn held(_: &Slot) -> usize {
        0
    }
}

#[cfg(not(target_os = "linux"))]
pub use imp::{enable_on_this_thread, submit};
#[cfg(not(target_os = "linux"))]
pub(crate) use imp::{
    forget, give_back, has_returned, held, queue, submit_if_queued, take_returned,
};
