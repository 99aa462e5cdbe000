//! TLS material from `[tls]` (clients) and `[backend_tls]` (backends), loaded into rustls
//! configs when a runtime is built, so a reload (SIGHUP) re-reads rotated certificates.
//! Handshakes run through tokio-rustls; the finished connection is handed to
//! `net::Stream`, which drives it non-blocking inside the session loop.
//!
//! Crypto is rustls with the `ring` provider, TLS 1.2 and 1.3, rustls's safe defaults.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use tokio::net::TcpStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::config::{BackendTlsConfig, TlsConfig};
use crate::net::{Stream, TlsStream};

/// Why TLS material could not be loaded; names the config field.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{field}: cannot read {path}: {reason}")]
    File {
        field: &'static str,
        path: String,
        reason: String,
    },
    #[error("{field}: {path} holds no PEM certificate")]
    NoCertificate { field: &'static str, path: String },
    #[error("{field}: {reason}")]
    Invalid { field: &'static str, reason: String },
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn certs(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let file_error = |reason: String| TlsError::File {
        field,
        path: path.display().to_string(),
        reason,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_error(e.to_string()))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            field,
            path: path.display().to_string(),
        });
    }
    Ok(certs)
}

fn key(field: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::File {
        field,
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn roots(field: &'static str, path: &Path) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certs(field, path)? {
        store.add(cert).map_err(|e| TlsError::Invalid {
            field,
            reason: format!("{}: {e}", path.display()),
        })?;
    }
    Ok(store)
}

fn invalid(field: &'static str) -> impl Fn(rustls::Error) -> TlsError {
    move |e| TlsError::Invalid {
        field,
        reason: e.to_string(),
    }
}

/// The listener's TLS: certificate, key and optional client-certificate verification.
#[derive(Clone)]
pub struct ClientTls {
    acceptor: TlsAcceptor,
    handshake_timeout: Duration,
    /// `client_ca` is set: every client proves itself with a certificate.
    verifies_clients: bool,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    pub fn new(cfg: &TlsConfig) -> Result<ClientTls, TlsError> {
        let chain = certs("tls.cert", &cfg.cert)?;
        let key = key("tls.key", &cfg.key)?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(invalid("tls"))?;
        let builder = match &cfg.client_ca {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                    Arc::new(roots("tls.client_ca", path)?),
                    provider(),
                )
                .build()
                .map_err(|e| TlsError::Invalid {
                    field: "tls.client_ca",
                    reason: e.to_string(),
                })?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let config = builder
            .with_single_cert(chain, key)
            .map_err(invalid("tls.cert/tls.key"))?;
        Ok(ClientTls {
            acceptor: TlsAcceptor::from(Arc::new(config)),
            handshake_timeout: cfg.handshake_timeout,
            verifies_clients: cfg.client_ca.is_some(),
        })
    }

    /// Clients must present a certificate from `tls.client_ca`.
    pub fn verifies_clients(&self) -> bool {
        self.verifies_clients
    }

    /// Run the server side of the handshake within `tls.handshake_timeout`.
    pub async fn accept(&self, tcp: TcpStream) -> std::io::Result<Stream> {
        let handshake = self.acceptor.accept(tcp);
        match tokio::time::timeout(self.handshake_timeout, handshake).await {
            Ok(Ok(tls)) => {
                let (tcp, conn) = tls.into_inner();
                Ok(Stream::Tls(Box::new(TlsStream::new(tcp, conn))))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }
}

/// How backend connections are encrypted and verified.
#[derive(Clone)]
pub struct BackendTls {
    connector: TlsConnector,
    /// `backend_tls.server_name`, else each address's host.
    server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for BackendTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl BackendTls {
    pub fn new(cfg: &BackendTlsConfig) -> Result<BackendTls, TlsError> {
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(invalid("backend_tls"))?
            .with_root_certificates(roots("backend_tls.ca", &cfg.ca)?);
        let config = match (&cfg.cert, &cfg.key) {
            (Some(cert), Some(key_path)) => builder
                .with_client_auth_cert(
                    certs("backend_tls.cert", cert)?,
                    key("backend_tls.key", key_path)?,
                )
                .map_err(invalid("backend_tls.cert/backend_tls.key"))?,
            _ => builder.with_no_client_auth(),
        };
        let server_name = match &cfg.server_name {
            None => None,
            Some(name) => Some(server_name(name).ok_or(TlsError::Invalid {
                field: "backend_tls.server_name",
                reason: format!("{name:?} is not a DNS name or IP address"),
            })?),
        };
        Ok(BackendTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }

    /// Run the client side of the handshake with `address`'s backend (the caller bounds
    /// the time).
    pub async fn connect(&self, tcp: TcpStream, address: &str) -> std::io::Result<Stream> {
        let name = match &self.server_name {
            Some(name) => name.clone(),
            None => server_name(host_of(address)).ok_or_else(|| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("{address}: the host is not a valid TLS server name"),
                )
            })?,
        };
        let tls = self.connector.connect(name, tcp).await?;
        let (tcp, conn) = tls.into_inner();
        Ok(Stream::Tls(Box::new(TlsStream::new(tcp, conn))))
    }
}

fn server_name(s: &str) -> Option<ServerName<'static>> {
    ServerName::try_from(s).ok().map(|n| n.to_owned())
}

/// The host of `host:port` or `[v6]:port`.
fn host_of(address: &str) -> &str {
    let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_of_strips_port_and_brackets() {
        assert_eq!(host_of("redis.example.com:6379"), "redis.example.com");
        assert_eq!(host_of("127.0.0.1:6379"), "127.0.0.1");
        assert_eq!(host_of("[::1]:6379"), "::1");
        assert!(matches!(
            server_name(host_of("[::1]:6379")),
            Some(ServerName::IpAddress(_))
        ));
        assert!(matches!(
            server_name(host_of("master.cache.amazonaws.com:6379")),
            Some(ServerName::DnsName(_))
        ));
    }

    #[test]
    fn missing_files_name_the_field() {
        let cfg = TlsConfig {
            cert: "/nonexistent/cert.pem".into(),
            key: "/nonexistent/key.pem".into(),
            client_ca: None,
            handshake_timeout: Duration::from_secs(1),
        };
        let err = ClientTls::new(&cfg).unwrap_err().to_string();
        assert!(
            err.starts_with("tls.cert: cannot read /nonexistent/cert.pem"),
            "{err}"
        );
    }
}
