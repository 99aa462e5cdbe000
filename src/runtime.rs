//! The reloadable part of the proxy: configuration, compiled policy and users, swapped as
//! one immutable `Runtime` behind `ArcSwap` on SIGHUP. Sessions pick up a new runtime at
//! their next read; connections are never dropped by a reload.

use std::sync::Arc;

use arc_swap::ArcSwap;
use tracing::{info, warn};

use crate::auth::{UserError, Users};
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
            client_tls,
            backend_tls,
            generation,
        })
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
            current.store(Arc::new(rt));
            metrics::counter!("portcullis_config_reloads_total", "result" => "ok").increment(1);
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
            metrics::counter!("portcullis_config_reloads_total", "result" => "rejected")
                .increment(1);
            warn!(error = %e, "config reload rejected; the running config stays");
            Err(e)
        }
    }
}
