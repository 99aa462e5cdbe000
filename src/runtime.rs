//! The reloadable part of the proxy: configuration, compiled policy and users, swapped as
//! one immutable `Runtime` behind `ArcSwap` on SIGHUP. Sessions pick up a new runtime at
//! their next read; connections are never dropped by a reload.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tracing::{info, warn};

use crate::auth::{AuthMode, BackendPasswords, UserError, Users};
use crate::config::{Config, ConfigError};
use crate::policy::{Policy, PolicyError};
use crate::protocol::{ReplyLimits, RequestLimits};
use crate::tls::{BackendTls, ClientTls, TlsError};

/// Why a runtime could not be built from a config.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Policy(#[from] PolicyError),
    #[error(transparent)]
    Users(#[from] UserError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// One consistent generation of reloadable settings.
#[derive(Debug)]
pub struct Runtime {
    pub config: Config,
    pub policy: Policy,
    pub users: Users,
    /// Proxy mode without users: the backend credentials a client's AUTH is checked
    /// against.
    pub backend_passwords: BackendPasswords,
    /// `[tls]` loaded: new client connections handshake with this.
    pub client_tls: Option<ClientTls>,
    /// `[backend_tls]` loaded: new backend connections use this.
    pub backend_tls: Option<Arc<BackendTls>>,
    /// Increases with every successful reload.
    pub generation: u64,
}

impl Runtime {
    /// Validate and compile a config.
    pub fn build(config: Config, generation: u64) -> Result<Runtime, RuntimeError> {
        config.validate()?;
        let policy = Policy::new(&config.protection)?;
        let users = Users::new(&config.users, &config.protection)?;
        let backend_passwords = BackendPasswords::from_config(&config);
        let client_tls = config.tls.as_ref().map(ClientTls::new).transpose()?;
        let backend_tls = config
            .backend_tls
            .as_ref()
            .map(|c| BackendTls::new(c).map(Arc::new))
            .transpose()?;
        Ok(Runtime {
            config,
            policy,
            users,
            backend_passwords,
            client_tls,
            backend_tls,
            generation,
        })
    }

    /// Protected mode is in force: no one authenticates at the proxy (no `[[users]]`,
    /// no required client certificates), so only loopback clients are admitted.
    pub fn protected(&self) -> bool {
        self.config.protection.protected_mode
            && !self.users.enabled()
            && !self
                .client_tls
                .as_ref()
                .is_some_and(ClientTls::verifies_clients)
    }

    /// `[auth] mode = "passthrough"`: Redis checks AUTH, links carry the client's own
    /// credentials.
    pub fn passthrough(&self) -> bool {
        self.config.auth.mode == AuthMode::Passthrough
    }

    /// Protected mode for a new connection: `protected()`, lifted in pass-through mode
    /// when every backend is known to require a password (Redis authenticates clients).
    pub fn protected_now(&self, backends_require_auth: bool) -> bool {
        self.protected() && !(self.passthrough() && backends_require_auth)
    }

    /// Parser limits; before authentication, Redis's pre-auth bounds (CVE-2021-32675).
    pub fn request_limits(&self, authenticated: bool) -> RequestLimits {
        let l = &self.config.limits;
        RequestLimits {
            max_bulk_len: l.max_bulk_len,
            max_multibulk_len: l.max_multibulk_len,
            max_inline_len: l.max_inline_len,
            unauthenticated: !authenticated,
        }
    }

    /// Bounds on backend replies.
    pub fn reply_limits(&self) -> ReplyLimits {
        ReplyLimits {
            max_bulk_len: crate::config::DEFAULT_MAX_BULK_LEN,
            max_depth: self.config.limits.max_reply_depth,
        }
    }
}

/// The loud line for `protection.mode = "shadow"`: nothing is refused.
pub fn warn_if_shadow(rt: &Runtime) {
    if rt.config.protection.mode == crate::policy::ProtectionMode::Shadow {
        warn!(
            mode = "shadow",
            "PROTECTION NOT ENFORCED: protection.mode = \"shadow\" forwards every command the policy would refuse (REPLICAOF, CONFIG SET, MODULE LOAD, CLUSTER MEET, ...) and only logs and counts it; set mode = \"enforce\" to protect Redis"
        );
    }
}

/// Settings a reload cannot change in place; reported, and the running values kept.
fn restart_needed(old: &Config, new: &mut Config) -> Vec<&'static str> {
    let mut fields = Vec::new();
    if old.listen != new.listen {
        fields.push("listen");
        new.listen = old.listen.clone();
    }
    if old.admin != new.admin {
        fields.push("admin.listen");
        new.admin = old.admin.clone();
    }
    if old.cluster != new.cluster {
        fields.push("cluster");
        new.cluster = old.cluster.clone();
    }
    if old.sentinel != new.sentinel {
        fields.push("sentinel");
        new.sentinel = old.sentinel.clone();
    }
    if old.log != new.log {
        fields.push("log");
        new.log = old.log.clone();
    }
    // Certificates and keys reload (rotation); turning TLS on or off does not.
    if old.tls.is_some() != new.tls.is_some() {
        fields.push("tls");
        new.tls = old.tls.clone();
    }
    if old.backend_tls.is_some() != new.backend_tls.is_some() {
        fields.push("backend_tls");
        new.backend_tls = old.backend_tls.clone();
    }
    // Sessions and their links were set up for one mode; switching needs new connections.
    if old.auth != new.auth {
        fields.push("auth.mode");
        new.auth = old.auth.clone();
    }
    if old.runtime != new.runtime {
        fields.push("runtime");
        new.runtime = old.runtime.clone();
    }
    if old.protection.auto_heal != new.protection.auto_heal {
        fields.push("protection.auto_heal");
        new.protection.auto_heal = old.protection.auto_heal;
    }
    fields
}

/// Swap in a new config if it is valid; on error the running one stays. Counted in
/// `portcullis_config_reloads_total{result}`.
pub fn reload(current: &ArcSwap<Runtime>, mut new: Config) -> Result<u64, RuntimeError> {
    let old = current.load_full();
    let kept = restart_needed(&old.config, &mut new);
    match Runtime::build(new, old.generation + 1) {
        Ok(rt) => {
            let generation = rt.generation;
            warn_if_shadow(&rt);
            current.store(Arc::new(rt));
            crate::metrics::config_reload(true);
            if !kept.is_empty() {
                warn!(fields = ?kept, "config reloaded, but these settings need a restart; the running values stay");
            }
            info!(
                generation,
                "config reloaded: policy, users and limits apply to every session's next command"
            );
            Ok(generation)
        }
        Err(e) => {
            crate::metrics::config_reload(false);
            warn!(error = %e, "config reload rejected; the running config stays");
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendConfig, TlsConfig};

    fn config() -> Config {
        Config {
            backends: vec![BackendConfig::from_address("127.0.0.1:6379")],
            ..Config::default()
        }
    }

    /// A self-signed certificate and key in `dir`: (cert, key) paths.
    fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf) {
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&key)
            .expect("cert");
        let (c, k) = (dir.join("c.pem"), dir.join("k.pem"));
        std::fs::write(&c, cert.pem()).expect("write cert");
        std::fs::write(&k, key.serialize_pem()).expect("write key");
        (c, k)
    }

    #[test]
    fn protected_mode_needs_someone_to_authenticate() {
        let protected = |c: Config| Runtime::build(c, 0).expect("valid").protected();
        assert!(protected(config()), "no users, no client certificates");

        let mut off = config();
        off.protection.protected_mode = false;
        assert!(!protected(off));

        let mut users = config();
        users.users = vec![crate::auth::UserConfig {
            name: "app".into(),
            password_sha256: "0".repeat(64),
            allow: Vec::new(),
            deny: Vec::new(),
        }];
        assert!(!protected(users), "AUTH at the proxy");

        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = self_signed(dir.path());
        let tls = |client_ca| TlsConfig {
            cert: cert.clone(),
            key: key.clone(),
            client_ca,
            handshake_timeout: std::time::Duration::from_secs(1),
        };
        let mut server_only = config();
        server_only.tls = Some(tls(None));
        assert!(protected(server_only), "TLS alone authenticates no one");
        let mut mutual = config();
        mutual.tls = Some(tls(Some(cert.clone())));
        assert!(!protected(mutual), "required client certificates");

        let rt = |mode| {
            let mut c = config();
            c.auth.mode = mode;
            Runtime::build(c, 0).expect("valid")
        };
        let proxy = rt(crate::auth::AuthMode::Proxy);
        assert!(
            proxy.protected_now(true),
            "proxy mode: Redis never sees AUTH"
        );
        let passthrough = rt(crate::auth::AuthMode::Passthrough);
        assert!(passthrough.protected_now(false), "unknown or open backend");
        assert!(
            !passthrough.protected_now(true),
            "Redis requires a password"
        );
    }
}
