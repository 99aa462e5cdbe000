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
    Plain(TcpStream),
    Tls(Box<TlsStream>),
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stream::Plain(s) => f.debug_tuple("Plain").field(s).finish(),
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
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Stream::Plain(s) => s,
            Stream::Tls(t) => &t.tcp,
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self, Stream::Tls(_))
    }

    /// Wait until `read_some` may make progress.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.readable().await,
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
            Stream::Plain(s) => s.poll_read_ready(cx),
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
            Stream::Plain(s) => read_some_plain(s, buf, expect),
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

    /// Write what the connection takes now; `WouldBlock` if nothing.
    pub fn try_write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) if bufs.len() == 1 => s.try_write(&bufs[0]),
            Stream::Plain(s) => s.try_write_vectored(bufs),
            Stream::Tls(t) => t.try_write_vectored(bufs),
        }
    }

    /// TLS records are waiting for the socket (even with nothing left to hand over).
    pub fn wants_flush(&self) -> bool {
        match self {
            Stream::Plain(_) => false,
            Stream::Tls(t) => t.conn.wants_write(),
        }
    }

    /// Write waiting TLS records; `Ok` also when the socket is full (try again when
    /// writable), `Err` only for a broken connection.
    pub fn flush_pending(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(_) => Ok(()),
            Stream::Tls(t) => match t.flush() {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
                other => other,
            },
        }
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
        let mut stream = Stream::Plain(server);
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
}
