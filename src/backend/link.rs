//! One connection to one Redis backend, opened with the proxy's own credentials (or, in
//! pass-through mode, the client's) and the session's replayed state (db, protocol, client
//! name, library info, eviction and touch flags, cluster read mode). Owns connect +
//! handshake only;
//! the session drives the connection afterwards.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::net::TcpStream;

use crate::auth::Credentials;
use crate::config::BackendConfig;
use crate::net::Stream;
use crate::protocol::{Reply, ReplyError, ReplyLimits, ReplyScanner, Request};
use crate::tls::BackendTls;

/// Why a backend connection could not be opened or used. Always backend-side.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("cannot connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {addr} failed: {source}")]
    Tls {
        addr: String,
        source: std::io::Error,
    },
    #[error("{addr} did not answer within {timeout:?}")]
    Timeout { addr: String, timeout: Duration },
    #[error("{addr} refused the handshake ({command}): {reply}")]
    Refused {
        addr: String,
        command: &'static str,
        reply: String,
    },
    #[error("{addr} closed the connection during the handshake")]
    Closed { addr: String },
    #[error("{addr} sent a malformed reply: {source}")]
    Protocol { addr: String, source: ReplyError },
    #[error("i/o error on {addr}: {source}")]
    Io {
        addr: String,
        source: std::io::Error,
    },
}

impl BackendError {
    /// What this failure says about the backend: a timeout is silence, a handshake
    /// answered `-BUSY`/`-LOADING` proves life, the rest (refused, reset, ...) is down.
    pub fn evidence(&self) -> crate::backend::Evidence {
        use crate::backend::Evidence;
        match self {
            BackendError::Timeout { .. } => Evidence::Silence(self.to_string()),
            BackendError::Refused { reply, .. } => match Evidence::of_error_reply(reply) {
                Evidence::Alive(_) => Evidence::Alive(self.to_string()),
                _ => Evidence::Down(self.to_string()),
            },
            _ => Evidence::Down(self.to_string()),
        }
    }

    /// The backend refused the handshake's `AUTH` (wrong credentials, user disabled).
    pub fn refused_auth(&self) -> bool {
        matches!(
            self,
            BackendError::Refused {
                command: "AUTH",
                ..
            }
        )
    }
}

/// Why reading one reply on one of the proxy's own backend connections failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadReplyError {
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    #[error("connection closed")]
    Closed,
    #[error("malformed reply: {0}")]
    Protocol(#[from] ReplyError),
}

/// Which credentials a new link authenticates with.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum LinkAuth {
    /// The backend's configured `username`/`password` (proxy mode; probes).
    #[default]
    Proxy,
    /// None: pass-through before the client authenticated, so Redis's own `requirepass`
    /// or ACL applies to it exactly as on a direct connection.
    Unauthenticated,
    /// The client's own credentials, accepted earlier by Redis (pass-through).
    Client(Credentials),
}

/// Session state replayed on a fresh backend connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Handshake {
    /// Whose credentials `AUTH` sends first.
    pub auth: LinkAuth,
    /// `SELECT` this database when not 0.
    pub db: u64,
    /// `HELLO 3` when the client switched to RESP3.
    pub resp3: bool,
    /// `CLIENT SETNAME` when the client named its connection.
    pub client_name: Option<Bytes>,
    /// `CLIENT SETINFO <attr> <value>` pairs the client set (library name and version).
    pub setinfo: Vec<(Bytes, Bytes)>,
    /// `CLIENT NO-EVICT ON`.
    pub no_evict: bool,
    /// `CLIENT NO-TOUCH ON`.
    pub no_touch: bool,
    /// `READONLY` (cluster replica reads).
    pub readonly: bool,
}

/// An open, authenticated backend connection, used request by request: the one
/// request/reply connection type of the backend plane (the handshake itself, probes,
/// Sentinel). A session takes its stream and buffer over and drives them itself.
#[derive(Debug)]
pub struct BackendLink {
    /// The connection, in the state the session expects (authenticated, state replayed).
    pub stream: Stream,
    /// Bytes read and not yet taken as replies (after the handshake: normally empty).
    pub leftover: BytesMut,
    scanner: ReplyScanner,
}

impl BackendLink {
    /// Write `frames` (one or more requests, sent together).
    pub async fn send(&mut self, frames: &[u8]) -> Result<(), ReadReplyError> {
        Ok(self.stream.write_all(frames).await?)
    }

    /// The next complete reply, waiting for it.
    pub async fn next_reply(&mut self) -> Result<Reply, ReadReplyError> {
        loop {
            if let Some(reply) = self.scanner.next(&mut self.leftover)? {
                return Ok(reply);
            }
            if self.stream.read_buf(&mut self.leftover).await? == 0 {
                return Err(ReadReplyError::Closed);
            }
        }
    }

    /// One request and its reply.
    pub async fn call(&mut self, req: &Request) -> Result<Reply, ReadReplyError> {
        self.send(req.frame()).await?;
        self.next_reply().await
    }

    /// Connect (with TLS when `tls` is given), authenticate with the configured
    /// credentials and replay `state`, all within `timeout`.
    pub async fn open(
        backend: &BackendConfig,
        state: &Handshake,
        timeout: Duration,
        limits: ReplyLimits,
        tls: Option<&BackendTls>,
    ) -> Result<BackendLink, BackendError> {
        let addr = backend.address.clone();
        match tokio::time::timeout(timeout, Self::open_inner(backend, state, limits, tls)).await {
            Ok(result) => result,
            Err(_) => Err(BackendError::Timeout { addr, timeout }),
        }
    }

    async fn open_inner(
        backend: &BackendConfig,
        state: &Handshake,
        limits: ReplyLimits,
        tls: Option<&BackendTls>,
    ) -> Result<BackendLink, BackendError> {
        let addr = backend.address.as_str();
        let tcp = TcpStream::connect(addr)
            .await
            .map_err(|source| BackendError::Connect {
                addr: addr.to_string(),
                source,
            })?;
        // Small request/reply frames: never wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let stream = match tls {
            None => Stream::plain(tcp),
            Some(tls) => tls.connect(tcp, addr).await.map_err(|source| {
                crate::metrics::tls_handshake_failure("backend");
                BackendError::Tls {
                    addr: addr.to_string(),
                    source,
                }
            })?,
        };

        let mut steps: Vec<(&'static str, Request)> = Vec::new();
        match (&state.auth, &backend.password) {
            (LinkAuth::Proxy, Some(password)) => {
                let req = match &backend.username {
                    Some(user) => Request::from_args(&[
                        b"AUTH".as_slice(),
                        user.as_bytes(),
                        password.as_bytes(),
                    ]),
                    None => Request::from_args(&[b"AUTH".as_slice(), password.as_bytes()]),
                };
                steps.push(("AUTH", req));
            }
            (LinkAuth::Client(creds), _) => steps.push(("AUTH", creds.auth_request())),
            (LinkAuth::Proxy, None) | (LinkAuth::Unauthenticated, _) => {}
        }
        if state.resp3 {
            steps.push(("HELLO 3", Request::from_args(&[b"HELLO".as_slice(), b"3"])));
        }
        if state.db != 0 {
            let mut db = itoa::Buffer::new();
            steps.push((
                "SELECT",
                Request::from_args(&[b"SELECT".as_slice(), db.format(state.db).as_bytes()]),
            ));
        }
        if let Some(name) = &state.client_name {
            steps.push((
                "CLIENT SETNAME",
                Request::from_args(&[b"CLIENT".as_slice(), b"SETNAME", name]),
            ));
        }
        for (attr, value) in &state.setinfo {
            steps.push((
                "CLIENT SETINFO",
                Request::from_args(&[b"CLIENT".as_slice(), b"SETINFO", attr, value]),
            ));
        }
        if state.no_evict {
            steps.push((
                "CLIENT NO-EVICT",
                Request::from_args(&[b"CLIENT".as_slice(), b"NO-EVICT", b"ON"]),
            ));
        }
        if state.no_touch {
            steps.push((
                "CLIENT NO-TOUCH",
                Request::from_args(&[b"CLIENT".as_slice(), b"NO-TOUCH", b"ON"]),
            ));
        }
        if state.readonly {
            steps.push(("READONLY", Request::from_args(&[b"READONLY".as_slice()])));
        }
        let mut link = BackendLink {
            stream,
            leftover: BytesMut::new(),
            scanner: ReplyScanner::new(limits),
        };
        if steps.is_empty() {
            return Ok(link);
        }
        let failed = |e: ReadReplyError| {
            let addr = addr.to_string();
            match e {
                ReadReplyError::Io(source) => BackendError::Io { addr, source },
                ReadReplyError::Closed => BackendError::Closed { addr },
                ReadReplyError::Protocol(source) => BackendError::Protocol { addr, source },
            }
        };
        let mut out = Vec::new();
        for (_, req) in &steps {
            out.extend_from_slice(req.frame());
        }
        link.send(&out).await.map_err(failed)?;
        for (command, _) in &steps {
            let reply = link.next_reply().await.map_err(failed)?;
            if reply.is_error() {
                return Err(BackendError::Refused {
                    addr: addr.to_string(),
                    command,
                    reply: String::from_utf8_lossy(reply.frame().trim_ascii_end()).into_owned(),
                });
            }
        }
        Ok(link)
    }
}
