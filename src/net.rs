//! One connection's bytes, plain TCP or TLS, behind the readiness-driven API the session
//! loop is built on: wait `readable()` / `writable()`, then `read_some` / `try_write`
//! without blocking. TLS is rustls used sans-IO over the same `TcpStream`: records are
//! read and written with the socket's non-blocking calls, so a TLS session has the same
//! shape (one task, no extra buffers between tasks) as a plain one.
//!
//! Must not block, and must not lose bytes rustls has buffered: decrypted plaintext not
//! yet handed out makes the stream readable at once, and encrypted records not yet
//! written make `wants_flush` true so the session waits for writability.

use std::io::{self, IoSlice, Read, Write};

use bytes::BytesMut;
use tokio::net::TcpStream;

use crate::uring::{self, Returned, Slot};

/// First read buffer: a few commands; a connection that never sent more keeps no more.
pub(crate) const READ_MIN: usize = 512;
/// Largest growth step of a read buffer (bigger frames reserve for themselves).
const READ_MAX_STEP: usize = 64 * 1024;
/// Most bytes one readiness event reads before the session handles them.
pub(crate) const READ_BATCH: usize = 64 * 1024;

/// Make room for the next read: start small, double while reads fill the buffer, and
/// leave room for `expect` bytes (the size of the previous batch) plus slack, so a
/// pipeline of the usual size arrives in one short read.
fn read_space(buf: &mut BytesMut, expect: usize) {
    let spare = buf.capacity() - buf.len();
    let want = expect.min(READ_BATCH) + READ_MIN / 2;
    if spare < want {
        buf.reserve(want.max(buf.capacity().clamp(READ_MIN, READ_MAX_STEP)));
    }
}

/// A client or backend connection.
pub enum Stream {
    /// Plain TCP, with where its output waits in this thread's batch of sends (`uring`).
    Plain(TcpStream, Slot),
    Tls(Box<TlsStream>),
}

impl Drop for Stream {
    fn drop(&mut self) {
        // The socket closes next: a send queued for it goes now, while its descriptor
        // still names it (a closed one may be reused by the next connection).
        if let Stream::Plain(_, slot) = self {
            uring::forget(slot);
        }
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stream::Plain(s, _) => f.debug_tuple("Plain").field(s).finish(),
            Stream::Tls(s) => f.debug_tuple("Tls").field(&s.tcp).finish(),
        }
    }
}

/// rustls over a non-blocking socket.
pub struct TlsStream {
    tcp: TcpStream,
    conn: rustls::Connection,
    /// Decrypted bytes may be waiting inside rustls: the next read needs no socket event.
    plaintext: bool,
    /// An error met after some bytes were handed out; returned by the next read.
    deferred: Option<io::Error>,
}

impl TlsStream {
    pub(crate) fn new(tcp: TcpStream, conn: impl Into<rustls::Connection>) -> TlsStream {
        TlsStream {
            tcp,
            conn: conn.into(),
            // The handshake may have read application data along with its last flight.
            plaintext: true,
            deferred: None,
        }
    }

    /// Decrypt what the socket has and hand out all of it, reading the socket until it
    /// would block, so the stream is readable again only when new bytes arrive (one
    /// wake-up per batch, as for plain TCP). Plaintext is copied out of rustls's buffer:
    /// no zero-filling of the room a parser reserved for a big frame.
    fn read_some(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        use std::io::BufRead;
        if let Some(e) = self.deferred.take() {
            return Err(e);
        }
        let (mut got, mut wire) = (0, 0);
        loop {
            let mut reader = self.conn.reader();
            loop {
                match reader.fill_buf() {
                    Ok(chunk) if !chunk.is_empty() => {
                        let n = chunk.len();
                        buf.extend_from_slice(chunk);
                        reader.consume(n);
                        got += n;
                    }
                    // Empty: the peer sent close_notify, a clean end of stream (reported
                    // once the data before it is handed out).
                    Ok(_) => {
                        self.plaintext = got > 0;
                        return Ok(got);
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    // UnexpectedEof: the socket closed without close_notify.
                    Err(_) if got > 0 => {
                        self.plaintext = true;
                        return Ok(got);
                    }
                    Err(e) => return Err(e),
                }
            }
            if got >= READ_BATCH || wire >= 2 * READ_BATCH {
                // Enough for one event (records with little or no plaintext count too);
                // the socket may hold more.
                self.plaintext = true;
                return Ok(got);
            }
            let step = match self.conn.read_tls(&mut SocketIo(&self.tcp)) {
                // Drained (tokio's readiness is cleared by the WouldBlock).
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.plaintext = false;
                    return if got > 0 { Ok(got) } else { Err(e) };
                }
                Err(e) => Err(e),
                Ok(n) => {
                    wire += n;
                    match self.conn.process_new_packets() {
                        // Tell the peer why (the alert rustls queued), then fail.
                        Err(e) => {
                            let _ = self.flush();
                            Err(io::Error::new(io::ErrorKind::InvalidData, e))
                        }
                        // Post-handshake messages (key updates) may need an answer.
                        Ok(_) if self.conn.wants_write() => match self.flush() {
                            Err(e) if e.kind() != io::ErrorKind::WouldBlock => Err(e),
                            _ => Ok(()),
                        },
                        Ok(_) => Ok(()),
                    }
                }
            };
            if let Err(e) = step {
                if got == 0 {
                    return Err(e);
                }
                // Hand out what arrived first; the error ends the stream at the next read.
                self.deferred = Some(e);
                self.plaintext = true;
                return Ok(got);
            }
        }
    }

    /// Hand plaintext to rustls (bounded by its send buffer) and push records out.
    fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self.flush() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
            _ => {}
        }
        let n = self.conn.writer().write_vectored(bufs)?;
        match self.flush() {
            Err(e) if e.kind() != io::ErrorKind::WouldBlock => return Err(e),
            _ => {}
        }
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            // rustls's buffer is full of records the socket does not take yet.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    /// Write queued TLS records; `WouldBlock` if the socket is full.
    fn flush(&mut self) -> io::Result<()> {
        while self.conn.wants_write() {
            if self.conn.write_tls(&mut SocketIo(&self.tcp))? == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
        }
        Ok(())
    }
}

/// `std::io` view of a tokio socket's non-blocking calls, for rustls.
struct SocketIo<'a>(&'a TcpStream);

impl Read for SocketIo<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.try_read(buf)
    }
}

impl Write for SocketIo<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.try_write(buf)
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        self.0.try_write_vectored(bufs)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Stream {
    /// A plain TCP connection.
    pub fn plain(tcp: TcpStream) -> Stream {
        Stream::Plain(tcp, Slot::default())
    }

    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s, _) => s,
            Stream::Tls(t) => &t.tcp,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Wait until `read_some` may make progress.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Plain(s, _) => s.readable().await,
            Stream::Tls(t) if t.plaintext => Ok(()),
            Stream::Tls(t) => t.tcp.readable().await,
        }
    }

    /// Poll form of `readable` (waiting on several streams at once). It registers `cx`'s
    /// waker in the socket's one read slot, replacing the one there: a session's client
    /// stream is polled so only by `Session::wait`, which knows whose waker is there
    /// (`session/wake.rs`).
    pub fn poll_readable(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        match self {
            Stream::Plain(s, _) => s.poll_read_ready(cx),
            Stream::Tls(t) if t.plaintext => std::task::Poll::Ready(Ok(())),
            Stream::Tls(t) => t.tcp.poll_read_ready(cx),
        }
    }

    /// Poll form of `writable`.
    pub fn poll_writable(
        &self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        self.tcp().poll_write_ready(cx)
    }

    /// Wait until the socket takes bytes.
    pub async fn writable(&self) -> io::Result<()> {
        self.tcp().writable().await
    }

    /// One non-blocking read into `buf`: `Ok(0)` at end of stream, `WouldBlock` when
    /// nothing is there yet.
    pub fn read_some(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        self.read_expecting(buf, 0)
    }

    fn read_expecting(&mut self, buf: &mut BytesMut, expect: usize) -> io::Result<usize> {
        match self {
            Stream::Plain(s, _) => read_some_plain(s, buf, expect),
            Stream::Tls(t) => t.read_some(buf),
        }
    }

    /// Read what is there now, up to about `READ_BATCH` bytes: keep reading while a read
    /// filled the buffer (more is likely waiting), so a pipeline bigger than the buffer
    /// is parsed and forwarded as one batch, not as two writes to the next hop.
    /// `last` is the previous batch's size (updated here): the buffer is sized for it.
    /// `Ok(0)` only at end of stream with nothing read; `WouldBlock` only when nothing
    /// was read. An end or error after some bytes shows at the next read.
    pub fn read_batch(&mut self, buf: &mut BytesMut, last: &mut usize) -> io::Result<usize> {
        let mut total = 0;
        let result = loop {
            match self.read_expecting(buf, *last) {
                Ok(0) => break Ok(total),
                Ok(n) => {
                    total += n;
                    // A TLS read already takes everything up to would-block (and may
                    // hold back an error for the next read): one call is the batch.
                    if self.is_tls() || buf.len() < buf.capacity() || total >= READ_BATCH {
                        break Ok(total);
                    }
                }
                Err(_) if total > 0 => break Ok(total),
                Err(e) => break Err(e),
            }
        };
        if total > 0 {
            *last = total;
        }
        result
    }

    /// Write what the connection takes now; `WouldBlock` if nothing. Bytes this stream
    /// queued in the batch of sends, or that came back from it, go first.
    pub fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(s, slot) => {
                if slot.is_used() {
                    uring::submit_if_queued(slot);
                    write_returned(s, slot)?;
                    if uring::has_returned(slot) {
                        return Err(io::ErrorKind::WouldBlock.into());
                    }
                }
                if bufs.len() == 1 {
                    s.try_write(&bufs[0])
                } else {
                    s.try_write_vectored(bufs)
                }
            }
            Stream::Tls(t) => t.try_write_vectored(bufs),
        }
    }

    /// Hand `bufs` (`total` bytes, in order) to this thread's batch of sends instead of
    /// writing them: `Some(total)` when taken (they count as written; what the socket
    /// does not take comes back, see `wants_flush`), `None` when the caller must write
    /// them directly (TLS, no batching on this thread, too big, or earlier bytes came
    /// back and wait). `waker` is woken when something comes back.
    pub fn queue_batched(
        &mut self,
        bufs: &[&[u8]],
        total: usize,
        waker: &std::task::Waker,
    ) -> Option<usize> {
        match self {
            Stream::Plain(s, slot) if total <= uring::MAX_QUEUED => {
                if uring::has_returned(slot) {
                    return None;
                }
                use std::os::fd::AsRawFd;
                uring::queue(s.as_raw_fd(), slot, bufs, waker).then_some(total)
            }
            _ => None,
        }
    }

    /// Bytes handed to the batch of sends and not written yet (queued, or come back):
    /// with the queue's own, what a lost connection never wrote.
    pub fn held_bytes(&self) -> usize {
        match self {
            Stream::Plain(_, slot) if slot.is_used() => uring::held(slot),
            _ => 0,
        }
    }

    /// Bytes are waiting for the socket (even with nothing left to hand over): TLS
    /// records, or output the batch of sends could not write.
    pub fn wants_flush(&self) -> bool {
        match self {
            Stream::Plain(_, slot) => slot.is_used() && uring::has_returned(slot),
            Stream::Tls(t) => t.conn.wants_write(),
        }
    }

    /// Write waiting bytes (`wants_flush`); `Ok` also when the socket is full (try again
    /// when writable), `Err` only for a broken connection. Bytes still in the batch of
    /// sends stay there.
    pub fn flush_pending(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s, slot) => write_returned(s, slot),
            Stream::Tls(t) => match t.flush() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                other => other,
            },
        }
    }

    /// As `flush_pending`, and first submit this stream's bytes still in the batch of
    /// sends: afterwards `wants_flush` says whether everything handed over is written
    /// (before a half-close, or before a session counts its replies delivered).
    pub fn settle(&mut self) -> io::Result<()> {
        if let Stream::Plain(_, slot) = self {
            uring::submit_if_queued(slot);
        }
        self.flush_pending()
    }

    /// Read at least one byte, waiting as needed (the proxy's own request/reply links).
    pub async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        loop {
            self.readable().await?;
            match self.read_some(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }

    /// Write all of `data` (and any waiting TLS records), waiting as needed.
    pub async fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match self.try_write_vectored(&[IoSlice::new(data)]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.writable().await?,
                Err(e) => return Err(e),
            }
        }
        while self.wants_flush() {
            self.flush_pending()?;
            if self.wants_flush() {
                self.writable().await?;
            }
        }
        Ok(())
    }

    /// Close the sending side (TCP FIN; for TLS, close_notify first): the peer reads end
    /// of input and may still answer. Call once everything queued is written.
    pub fn shutdown_write(&mut self) -> io::Result<()> {
        if let Stream::Plain(_, slot) = self {
            // Never ahead of bytes still in the batch of sends.
            uring::submit_if_queued(slot);
        }
        if let Stream::Tls(t) = self {
            t.conn.send_close_notify();
            match t.flush() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => other?,
            }
        }
        socket2::SockRef::from(self.tcp()).shutdown(std::net::Shutdown::Write)
    }

    /// End a TLS connection politely (close_notify), without waiting: the socket is
    /// closed right after anyway.
    pub fn close(&mut self) {
        if let Stream::Tls(t) = self {
            t.conn.send_close_notify();
            let _ = t.flush();
        }
    }
}

/// Write what came back to `slot` from the batch of sends, as far as the socket takes it;
/// the rest goes back (`Ok`), a failed send is this write's error.
fn write_returned(s: &TcpStream, slot: &Slot) -> io::Result<()> {
    let Some(returned) = uring::take_returned(slot) else {
        return Ok(());
    };
    let mut data = match returned {
        // Reported once; the bytes stay counted as unwritten (`held_bytes`).
        Returned::Failed(e, data) => {
            uring::give_back(slot, Returned::Lost(data));
            return Err(e);
        }
        lost @ Returned::Lost(_) => {
            uring::give_back(slot, lost);
            return Ok(());
        }
        Returned::Unsent(data) => data,
    };
    let mut at = 0;
    while at < data.len() {
        match s.try_write(&data[at..]) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => at += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                data.drain(..at);
                uring::give_back(slot, Returned::Unsent(data));
                return Ok(());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// One non-blocking read into `buf`. A short read means the socket is drained, so tokio's
/// readiness is cleared right away (by reporting WouldBlock through `try_io`); otherwise
/// the next wait would wake at once just to read EAGAIN, one wasted syscall per event.
/// Race-free: tokio only clears readiness if no new event arrived since it was observed.
fn read_some_plain(stream: &TcpStream, buf: &mut BytesMut, expect: usize) -> io::Result<usize> {
    read_space(buf, expect);
    let room = buf.capacity() - buf.len();
    let mut got = 0;
    let result = stream.try_io(tokio::io::Interest::READABLE, || {
        let n = stream.try_read_buf(buf)?;
        got = n;
        if n > 0 && n < room {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match result {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock && got > 0 => Ok(got),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncWriteExt;

    #[test]
    fn read_space_leaves_room_for_the_previous_batch() {
        let mut buf = BytesMut::new();
        read_space(&mut buf, 0);
        assert!(buf.capacity() >= READ_MIN / 2 && buf.capacity() < 4 * READ_MIN);
        let mut buf = BytesMut::new();
        read_space(&mut buf, 3000);
        assert!(buf.capacity() - buf.len() >= 3000 + READ_MIN / 2);
        // Bounded by the batch limit, whatever the previous batch was.
        let mut buf = BytesMut::new();
        read_space(&mut buf, 10 * READ_BATCH);
        assert!(buf.capacity() < 2 * READ_BATCH);
    }

    #[tokio::test]
    async fn read_batch_reads_past_a_full_buffer_and_keeps_the_end_for_later() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let mut peer = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (server, _) = listener.accept().await.expect("accept");
        let data = vec![b'x'; 3000];
        peer.write_all(&data).await.expect("write");
        drop(peer); // FIN right behind the data
        let mut stream = Stream::plain(server);
        let (mut buf, mut last, mut total) = (BytesMut::new(), 0, 0);
        while total < data.len() {
            stream.readable().await.expect("readable");
            match stream.read_batch(&mut buf, &mut last) {
                Ok(n) => {
                    assert!(n > 0, "end of stream reported before the data");
                    total += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(buf.len(), 3000);
        assert!(
            last > READ_MIN,
            "one batch read past the first buffer: {last}"
        );
        stream.readable().await.expect("readable");
        assert_eq!(stream.read_batch(&mut buf, &mut last).expect("eof"), 0);
    }

    /// A connected pair: the proxy's side as a `Stream`, the peer as a plain socket.
    async fn pair() -> (Stream, TcpStream) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let peer = TcpStream::connect(listener.local_addr().expect("addr"))
            .await
            .expect("connect");
        let (ours, _) = listener.accept().await.expect("accept");
        (Stream::plain(ours), peer)
    }

    /// Batching on this test's thread (`#[tokio::test]` runs one thread); `false` (and
    /// the test is skipped) where the kernel refuses io_uring.
    fn batching() -> bool {
        match uring::enable_on_this_thread() {
            Ok(()) => true,
            Err(e) => {
                eprintln!("skipped: no io_uring here ({e})");
                false
            }
        }
    }

    /// Counts its wake-ups.
    struct Count(std::sync::atomic::AtomicUsize);
    impl std::task::Wake for Count {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
    fn counter() -> (std::sync::Arc<Count>, std::task::Waker) {
        let count = std::sync::Arc::new(Count(Default::default()));
        (count.clone(), std::task::Waker::from(count))
    }

    /// `read` done within 10 s, or the test fails naming `what`.
    async fn in_time<T>(what: &str, read: impl std::future::Future<Output = io::Result<T>>) -> T {
        match tokio::time::timeout(std::time::Duration::from_secs(10), read).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => panic!("reading {what}: {e}"),
            Err(_) => panic!("{what} not read in 10 s"),
        }
    }

    async fn read_n(peer: &mut TcpStream, n: usize) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut got = vec![0; n];
        in_time("the bytes", peer.read_exact(&mut got)).await;
        got
    }

    #[tokio::test]
    async fn queued_bytes_go_at_submit_and_a_direct_write_follows_them() {
        if !batching() {
            return;
        }
        let (mut ours, mut peer) = pair().await;
        let (_, waker) = counter();
        assert_eq!(ours.queue_batched(&[b"one "], 4, &waker), Some(4));
        assert_eq!(
            ours.queue_batched(&[b"two ", b"three "], 10, &waker),
            Some(10)
        );
        let mut probe = [0u8; 64];
        assert_eq!(
            peer.try_read(&mut probe).map_err(|e| e.kind()),
            Err(io::ErrorKind::WouldBlock),
            "nothing is sent before the batch is submitted"
        );
        uring::submit();
        assert_eq!(read_n(&mut peer, 14).await, b"one two three ");
        // Queued again, then written directly: the direct write submits first.
        assert_eq!(ours.queue_batched(&[b"four "], 5, &waker), Some(5));
        assert_eq!(
            ours.try_write_vectored(&[IoSlice::new(b"five")])
                .expect("write"),
            4
        );
        assert_eq!(read_n(&mut peer, 9).await, b"four five");
        // Too big for a batch: the caller writes it.
        let big = vec![b'x'; uring::MAX_QUEUED + 1];
        assert_eq!(ours.queue_batched(&[&big], big.len(), &waker), None);
    }

    async fn read_to_end(peer: &mut TcpStream) -> Vec<u8> {
        use tokio::io::AsyncReadExt;
        let mut all = Vec::new();
        in_time("to the end of stream", peer.read_to_end(&mut all)).await;
        all
    }

    #[tokio::test]
    async fn a_half_close_follows_the_queued_bytes() {
        if !batching() {
            return;
        }
        let (_, waker) = counter();
        let (mut ours, mut peer) = pair().await;
        assert_eq!(ours.queue_batched(&[b"half"], 4, &waker), Some(4));
        ours.shutdown_write().expect("half-close");
        assert_eq!(
            read_to_end(&mut peer).await,
            b"half",
            "the bytes, then the half-close"
        );
    }

    #[tokio::test]
    async fn a_closed_streams_queued_bytes_never_reach_the_next_owner_of_its_descriptor() {
        if !batching() {
            return;
        }
        let (_, waker) = counter();
        let (mut ours, mut peer) = pair().await;
        assert_eq!(ours.queue_batched(&[b"stale"], 5, &waker), Some(5));
        assert_eq!(ours.held_bytes(), 5, "queued bytes count as unwritten");
        drop(ours);
        // The next connection most likely gets the closed one's descriptor number.
        let (mut next, mut next_peer) = pair().await;
        uring::submit();
        assert_eq!(
            read_to_end(&mut peer).await,
            b"",
            "forgotten, not sent, at close"
        );
        assert_eq!(next.queue_batched(&[b"fresh"], 5, &waker), Some(5));
        uring::submit();
        assert_eq!(read_n(&mut next_peer, 5).await, b"fresh");
        drop(next);
        assert_eq!(
            read_to_end(&mut next_peer).await,
            b"",
            "nothing of the old stream"
        );
    }

    #[tokio::test]
    async fn what_a_full_socket_does_not_take_comes_back_in_order() {
        if !batching() {
            return;
        }
        let (mut ours, peer) = pair().await;
        let sock = socket2::SockRef::from(ours.tcp());
        sock.set_send_buffer_size(4096).expect("sndbuf");
        socket2::SockRef::from(&peer)
            .set_recv_buffer_size(4096)
            .expect("rcvbuf");
        let (woken, waker) = counter();
        // Chunks of 4 KiB, each filled with its number: the peer checks the order.
        let chunk = |i: usize| vec![(i % 251) as u8; 4096];
        let mut queued = 0;
        while !ours.wants_flush() {
            assert!(queued < 4096, "the socket never filled");
            assert_eq!(
                ours.queue_batched(&[&chunk(queued)], 4096, &waker),
                Some(4096)
            );
            uring::submit();
            queued += 1;
        }
        assert_eq!(
            woken.0.load(std::sync::atomic::Ordering::SeqCst),
            1,
            "owner woken once"
        );
        // While bytes came back, nothing new is queued ahead of them.
        assert_eq!(ours.queue_batched(&[b"later"], 5, &waker), None);
        let reader = tokio::spawn(async move {
            let mut peer = peer;
            read_n(&mut peer, queued * 4096).await
        });
        while ours.wants_flush() {
            ours.flush_pending().expect("write what came back");
            if ours.wants_flush() {
                ours.writable().await.expect("writable");
            }
        }
        let got = reader.await.expect("reader");
        for (i, c) in got.chunks(4096).enumerate() {
            assert!(
                c.iter().all(|&b| b == (i % 251) as u8),
                "chunk {i} out of order"
            );
        }
    }

    #[tokio::test]
    async fn a_failed_send_is_the_next_write_error() {
        if !batching() {
            return;
        }
        let (mut ours, peer) = pair().await;
        // The peer resets the connection (linger 0: RST, no FIN).
        socket2::SockRef::from(&peer)
            .set_linger(Some(std::time::Duration::ZERO))
            .expect("linger");
        drop(peer);
        let (woken, waker) = counter();
        assert_eq!(ours.queue_batched(&[b"lost"], 4, &waker), Some(4));
        uring::submit();
        assert!(ours.wants_flush(), "the failure is waiting for the owner");
        assert_eq!(woken.0.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert!(
            ours.flush_pending().is_err(),
            "reported as the write's error"
        );
        assert!(!ours.wants_flush());
    }
}
