//! Bytes queued for one socket, written without blocking: zero-copy chunks for big
//! frames, one coalesced tail for small ones, handed to `writev` together.

use std::collections::VecDeque;
use std::io::{self, IoSlice};

use bytes::{Buf, Bytes, BytesMut};

use crate::net::Stream;

/// Most chunks handed to one `writev`.
const MAX_IOVECS: usize = 64;

/// Frames up to this size are copied into one contiguous tail buffer (a pipeline of
/// small replies becomes one write); bigger ones stay zero-copy chunks.
const COALESCE_MAX: usize = 2048;

/// A tail emptied by a write keeps its buffer up to this capacity (bytes); a bigger one,
/// grown by a burst, is released.
const TAIL_KEEP: usize = 64 * 1024;

/// Bytes waiting for one socket, in order: every chunk precedes the tail.
#[derive(Debug, Default)]
pub(super) struct OutQueue {
    chunks: VecDeque<Bytes>,
    tail: BytesMut,
    /// Bytes queued and not yet written.
    pub(super) bytes: usize,
}

impl OutQueue {
    /// Queue `b` after everything queued before, without taking it: a small frame is
    /// copied (no reference-count traffic), only a big one is shared.
    pub(super) fn push_ref(&mut self, b: &Bytes) {
        if !Self::shares(b.len()) {
            self.bytes += b.len();
            self.tail.extend_from_slice(b);
        } else {
            self.push(b.clone());
        }
    }

    /// Queue `range` of `b`, a run of small frames (each `!shares`), after everything
    /// queued before: always copied, whatever the run's length. A shared slice would
    /// keep the whole buffer `b` was split from (a backend connection's read buffer)
    /// alive while a slow client holds it, beyond what `bytes` counts.
    pub(super) fn push_copied(&mut self, b: &Bytes, range: std::ops::Range<usize>) {
        let Some(part) = b.get(range) else {
            return;
        };
        self.bytes += part.len();
        self.tail.extend_from_slice(part);
    }

    /// Whether a frame of `len` bytes is queued as its own zero-copy chunk (`push`)
    /// rather than copied.
    pub(super) fn shares(len: usize) -> bool {
        len > COALESCE_MAX
    }

    /// Queue `b` after everything queued before.
    pub(super) fn push(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        self.bytes += b.len();
        if !Self::shares(b.len()) {
            self.tail.extend_from_slice(&b);
        } else {
            if !self.tail.is_empty() {
                self.chunks.push_back(self.tail.split().freeze());
            }
            self.chunks.push_back(b);
        }
    }

    /// Queue `b` as its own chunk, never copied (a batch of requests already gathered).
    pub(super) fn push_chunk(&mut self, b: Bytes) {
        if b.is_empty() {
            return;
        }
        self.bytes += b.len();
        if !self.tail.is_empty() {
            self.chunks.push_back(self.tail.split().freeze());
        }
        self.chunks.push_back(b);
    }

    /// Nothing left to write.
    pub(super) fn is_empty(&self) -> bool {
        self.bytes == 0
    }

    /// Write as much as the socket takes now; `Ok(n)` bytes written.
    pub(super) fn try_write(&mut self, stream: &mut Stream) -> io::Result<usize> {
        let mut total = 0;
        while self.bytes > 0 {
            let result = if self.chunks.is_empty() {
                // The common case (small frames only): one slice, and no 64-slot array
                // to fill at every write.
                stream.try_write_vectored(&[IoSlice::new(&self.tail)])
            } else {
                self.write_chunks(stream)
            };
            let written = match result {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(total),
                Err(e) => return Err(e),
            };
            total += written;
            self.advance(written);
        }
        Ok(total)
    }

    /// As `try_write`, but small output is handed to this thread's batch of sends
    /// (`uring`): it counts as written, and what the socket does not take comes back to
    /// `stream` (`Stream::wants_flush`) and wakes `waker`. Everything else is written
    /// directly.
    pub(super) fn try_write_batched(
        &mut self,
        stream: &mut Stream,
        waker: &std::task::Waker,
    ) -> io::Result<usize> {
        let total = self.bytes;
        if total > 0 && total <= crate::uring::MAX_QUEUED && self.chunks.len() < MAX_IOVECS {
            let queued = if self.chunks.is_empty() {
                stream.queue_batched(&[&self.tail], total, waker)
            } else {
                let mut slices: [&[u8]; MAX_IOVECS] = [&[]; MAX_IOVECS];
                let n = self.chunks.len();
                for (slot, chunk) in slices.iter_mut().zip(self.chunks.iter()) {
                    *slot = chunk;
                }
                slices[n] = &self.tail;
                stream.queue_batched(&slices[..=n], total, waker)
            };
            if let Some(n) = queued {
                self.advance(n);
                return Ok(n);
            }
        }
        self.try_write(stream)
    }

    /// One `writev` of the chunks, then the tail, as far as `MAX_IOVECS` goes.
    fn write_chunks(&self, stream: &mut Stream) -> io::Result<usize> {
        let mut slices = [IoSlice::new(&[]); MAX_IOVECS];
        let mut n = 0;
        for (slot, chunk) in slices.iter_mut().zip(self.chunks.iter()) {
            *slot = IoSlice::new(chunk);
            n += 1;
        }
        if n < MAX_IOVECS && !self.tail.is_empty() {
            slices[n] = IoSlice::new(&self.tail);
            n += 1;
        }
        stream.try_write_vectored(&slices[..n])
    }

    /// Everything queued, in order (for tests).
    #[cfg(test)]
    pub(super) fn contents(&self) -> Vec<u8> {
        let mut v: Vec<u8> = self.chunks.iter().flat_map(|c| c.iter().copied()).collect();
        v.extend_from_slice(&self.tail);
        v
    }

    fn advance(&mut self, mut n: usize) {
        self.bytes -= n;
        while n > 0 {
            let Some(front) = self.chunks.front_mut() else {
                // The rest is in the tail. Written whole (the common case), it is
                // cleared, not advanced: the buffer keeps its start and its capacity,
                // so the next frame is copied in without `reserve` reclaiming space.
                // One a burst grew past `TAIL_KEEP` is given back instead.
                if n >= self.tail.len() {
                    if self.tail.capacity() > TAIL_KEEP {
                        self.tail = BytesMut::new();
                    } else {
                        self.tail.clear();
                    }
                } else {
                    self.tail.advance(n);
                }
                return;
            };
            if n >= front.len() {
                n -= front.len();
                self.chunks.pop_front();
            } else {
                front.advance(n);
                n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn order_is_kept_across_chunks_and_tail() {
        let mut q = OutQueue::default();
        q.push(Bytes::from_static(b"+a\r\n"));
        q.push(Bytes::from(vec![b'x'; COALESCE_MAX + 1]));
        q.push(Bytes::from_static(b"+b\r\n"));
        assert_eq!(q.bytes, 8 + COALESCE_MAX + 1);
        // Partial writes: advance through the first chunk boundary.
        q.advance(3);
        assert_eq!(&q.chunks[0][..], b"\n");
        q.advance(1 + COALESCE_MAX + 1);
        assert!(q.chunks.is_empty());
        assert_eq!(&q.tail[..], b"+b\r\n");
        q.advance(4);
        assert!(q.is_empty());
    }

    #[test]
    fn a_tail_written_whole_keeps_its_capacity() {
        let mut q = OutQueue::default();
        q.push(Bytes::from_static(b"+first\r\n"));
        let cap = q.tail.capacity();
        let start = q.tail.as_ptr();
        q.advance(8);
        assert!(q.is_empty());
        assert_eq!((q.tail.capacity(), q.tail.as_ptr()), (cap, start));
        q.push(Bytes::from_static(b"+second\r\n"));
        assert_eq!(q.contents(), b"+second\r\n");
        // A partial write still advances.
        q.advance(3);
        assert_eq!(q.contents(), b"cond\r\n");
        q.advance(6);
        // A tail a burst grew is given back once written.
        let burst = vec![b'z'; COALESCE_MAX];
        for _ in 0..=TAIL_KEEP / COALESCE_MAX {
            q.push_ref(&Bytes::copy_from_slice(&burst));
        }
        assert!(q.tail.capacity() > TAIL_KEEP);
        q.advance(q.bytes);
        assert!(q.is_empty() && q.tail.capacity() == 0);
    }

    #[test]
    fn push_ref_copies_small_frames_and_shares_big_ones() {
        let big = Bytes::from(vec![b'y'; COALESCE_MAX + 1]);
        let mut q = OutQueue::default();
        q.push_ref(&Bytes::from_static(b"*1\r\n$4\r\nPING\r\n"));
        q.push_ref(&big);
        q.push_ref(&Bytes::new());
        q.push_ref(&Bytes::from_static(b"+c\r\n"));
        assert_eq!(q.bytes, 14 + COALESCE_MAX + 1 + 4);
        let mut want = b"*1\r\n$4\r\nPING\r\n".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"+c\r\n");
        assert_eq!(q.contents(), want);
        // The big frame is shared, not copied.
        assert_eq!(q.chunks[1].as_ptr(), big.as_ptr());
    }

    #[test]
    fn push_copied_copies_a_run_of_any_length() {
        // A run of small frames longer than COALESCE_MAX: copied all the same, so no
        // chunk refers to the buffer it came from.
        let frame = b"$5\r\nvalue\r\n";
        let run = Bytes::from(frame.repeat(COALESCE_MAX / frame.len() + 2));
        assert!(OutQueue::shares(run.len()) && !OutQueue::shares(frame.len()));
        let mut q = OutQueue::default();
        q.push_copied(&run, 0..frame.len());
        q.push_copied(&run, frame.len()..run.len());
        q.push_copied(&run, 0..0);
        q.push_copied(&run, 0..run.len() + 1); // out of range: nothing
        assert!(q.chunks.is_empty());
        assert_eq!(q.bytes, run.len());
        assert_eq!(q.contents(), run.to_vec());
    }
}
