//! Command-line flags and `PORTCULLIS_*` environment variables, merged over the TOML
//! file into one validated `Config`. Flags win over env vars, which win over the file.

use std::path::PathBuf;

use clap::Parser;

use crate::config::{BackendConfig, Config, ConfigError, LogFormat};

/// portcullis: a RESP proxy that protects Redis.
#[derive(Debug, Parser)]
#[command(name = "portcullis", version, about)]
pub struct Cli {
    /// TOML config file (see config/portcullis.toml).
    #[arg(long, short = 'c', env = "PORTCULLIS_CONFIG")]
    pub config: Option<PathBuf>,

    /// Data listen address [default: 127.0.0.1:6380].
    #[arg(long, env = "PORTCULLIS_LISTEN")]
    pub listen: Option<String>,

    /// Redis backend HOST:PORT; repeatable (env: comma-separated). Replaces the file's list.
    #[arg(long = "backend", env = "PORTCULLIS_BACKEND", value_delimiter = ',')]
    pub backends: Vec<String>,

    /// Redis Cluster seed node HOST:PORT; repeatable (env: comma-separated). Enables
    /// cluster mode ([cluster] in the file) and replaces the file's seeds.
    #[arg(
        long = "cluster-seed",
        env = "PORTCULLIS_CLUSTER_SEED",
        value_delimiter = ','
    )]
    pub cluster_seeds: Vec<String>,

    /// Admin HTTP listen address for /metrics and health [default: 127.0.0.1:9190];
    /// an empty value disables it.
    #[arg(long, env = "PORTCULLIS_ADMIN_LISTEN")]
    pub admin_listen: Option<String>,

    /// Log level or tracing filter (error, warn, info, debug, trace) [default: info].
    #[arg(long, env = "PORTCULLIS_LOG_LEVEL")]
    pub log_level: Option<String>,

    /// Log format [default: text].
    #[arg(long, env = "PORTCULLIS_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,

    /// Protected mode: with no [[users]], accept only loopback clients [default: true].
    #[arg(long, env = "PORTCULLIS_PROTECTED_MODE", value_parser = clap::builder::BoolishValueParser::new())]
    pub protected_mode: Option<bool>,

    /// Who checks a client's AUTH: `proxy` ([[users]] or the backend credentials the
    /// proxy holds) or `passthrough` (Redis's own ACL) [default: proxy].
    #[arg(long, env = "PORTCULLIS_AUTH_MODE", value_enum)]
    pub auth_mode: Option<crate::auth::AuthMode>,

    /// How sessions reach the master: `dedicated` (a connection each) or `shared` (a few
    /// per backend for commands of sessions without connection state) [default: dedicated].
    #[arg(long, env = "PORTCULLIS_BACKEND_CONNECTIONS", value_enum)]
    pub backend_connections: Option<crate::config::BackendConnections>,

    /// Batched sends through io_uring when the proxy runs one thread: `auto` or `off`
    /// [default: auto].
    #[arg(long, env = "PORTCULLIS_IO_URING", value_enum)]
    pub io_uring: Option<crate::config::IoUringMode>,

    /// Validate the configuration, print it (secrets redacted) and exit.
    #[arg(long)]
    pub check_config: bool,
}

impl Cli {
    /// The file (if any) with the flags applied on top, validated.
    pub fn load(&self) -> Result<Config, ConfigError> {
        let mut config = match &self.config {
            Some(path) => Config::from_file(path)?,
            None => Config::default(),
        };
        if let Some(listen) = &self.listen {
            config.listen = listen.clone();
        }
        if !self.backends.is_empty() {
            config.backends = self
                .backends
                .iter()
                .map(|a| BackendConfig::from_address(a.trim()))
                .collect();
        }
        if !self.cluster_seeds.is_empty() {
            let seeds = self
                .cluster_seeds
                .iter()
                .map(|a| a.trim().to_string())
                .collect();
            match &mut config.cluster {
                Some(c) => c.seeds = seeds,
                None => {
                    config.cluster = Some(crate::config::ClusterConfig {
                        seeds,
                        refresh_interval: crate::config::DEFAULT_CLUSTER_REFRESH,
                        username: None,
                        password: None,
                    })
                }
            }
        }
        if let Some(admin) = &self.admin_listen {
            config.admin.listen = admin.clone();
        }
        if let Some(level) = &self.log_level {
            config.log.level = level.clone();
        }
        if let Some(mode) = self.backend_connections {
            config.routing.backend_connections = mode;
        }
        if let Some(mode) = self.io_uring {
            config.runtime.io_uring = mode;
        }
        if let Some(p) = self.protected_mode {
            config.protection.protected_mode = p;
        }
        if let Some(format) = self.log_format {
            config.log.format = format;
        }
        if let Some(mode) = self.auth_mode {
            config.auth.mode = mode;
        }
        config.validate()?;
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["portcullis"];
        argv.extend_from_slice(args);
        Cli::try_parse_from(argv).expect("flags parse").load()
    }

    #[test]
    fn flags_build_a_config() {
        let c = load(&[
            "--listen",
            "127.0.0.1:7000",
            "--backend",
            "127.0.0.1:6379",
            "--backend",
            "127.0.0.1:6389",
            "--admin-listen",
            "",
            "--log-format",
            "json",
        ])
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:7000");
        assert_eq!(c.backends.len(), 2);
        assert_eq!(c.admin.listen, "");
        assert_eq!(c.log.format, LogFormat::Json);
    }

    #[test]
    fn cluster_seed_flag_enables_cluster_mode() {
        let c = load(&[
            "--cluster-seed",
            "127.0.0.1:7000",
            "--cluster-seed",
            "127.0.0.1:7001",
        ])
        .unwrap();
        assert_eq!(
            c.cluster.unwrap().seeds,
            vec!["127.0.0.1:7000", "127.0.0.1:7001"]
        );
    }

    #[test]
    fn auth_mode_flag() {
        use crate::auth::AuthMode;
        let c = load(&["--backend", "127.0.0.1:6379"]).unwrap();
        assert_eq!(c.auth.mode, AuthMode::Proxy);
        let c = load(&["--backend", "127.0.0.1:6379", "--auth-mode", "passthrough"]).unwrap();
        assert_eq!(c.auth.mode, AuthMode::Passthrough);
        assert!(Cli::try_parse_from(["portcullis", "--auth-mode", "redis"]).is_err());
    }

    #[test]
    fn missing_backend_names_the_field() {
        let err = load(&[]).unwrap_err();
        assert!(err.to_string().contains("backends"), "{err}");
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        std::fs::write(
            &path,
            "listen = \"127.0.0.1:1111\"\n[[backends]]\naddress = \"10.0.0.1:6379\"\npassword = \"pw\"\n",
        )
        .unwrap();
        let p = path.to_str().unwrap();
        let c = load(&["--config", p]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:1111");
        assert_eq!(c.backends[0].password.as_deref(), Some("pw"));
        let c = load(&["--config", p, "--listen", "127.0.0.1:2222"]).unwrap();
        assert_eq!(c.listen, "127.0.0.1:2222");
    }

    #[test]
    fn bad_flag_value_is_rejected_by_name() {
        let err = load(&["--backend", "127.0.0.1:6379", "--listen", "nope"]).unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
        assert!(Cli::try_parse_from(["portcullis", "--log-format", "xml"]).is_err());
    }
}
