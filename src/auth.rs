//! Who a client is, in the two `[auth]` modes. Pure: no I/O.
//!
//! - `proxy` (default): `AUTH` / `HELLO ... AUTH` are answered here, against `[[users]]`
//!   (SHA-256 password hashes, each user with its own compiled policy on top of the global
//!   one) or, with no users, against the proxy's own backend credentials
//!   (`BackendPasswords`), so an app that still sends its Redis password keeps working.
//!   Backend credentials never reach clients.
//! - `passthrough`: the client's `AUTH` goes to Redis, whose ACL decides; the session keeps
//!   the accepted `Credentials` and replays them on each new backend link.

use std::sync::Arc;

use bytes::Bytes;
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::policy::{Policy, PolicyError, ProtectionConfig};
use crate::protocol::Request;

/// `[auth] mode`: who checks a client's `AUTH`.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// The proxy answers AUTH (`[[users]]`, or the backend credentials it holds); backend
    /// links use the proxy's own credentials.
    #[default]
    Proxy,
    /// Redis answers AUTH; backend links carry the client's own credentials.
    Passthrough,
}

/// `[auth]`.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub mode: AuthMode,
}

/// Credentials a client sent (`AUTH [user] pass`, `HELLO p AUTH user pass`) and Redis
/// accepted: replayed as `AUTH` on every new backend link of that session. The password is
/// never shown (`Debug` redacts it).
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// `None`: one-argument `AUTH pass` (Redis's `default` user), replayed the same way.
    username: Option<Bytes>,
    password: Bytes,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field(
                "username",
                &self.username.as_ref().map(|u| String::from_utf8_lossy(u)),
            )
            .field("password", &"<redacted>")
            .finish()
    }
}

impl Credentials {
    /// Credentials from their parts.
    pub fn new(username: Option<&[u8]>, password: &[u8]) -> Credentials {
        Credentials {
            username: username.map(Bytes::copy_from_slice),
            password: Bytes::copy_from_slice(password),
        }
    }

    /// The credentials of an `AUTH pass` / `AUTH user pass` request; `None` for any other
    /// arity (Redis answers those with its own error).
    pub fn from_auth(req: &Request) -> Option<Credentials> {
        match req.argc() {
            2 => Some(Credentials::new(None, req.arg(1)?)),
            3 => Some(Credentials::new(req.arg(1), req.arg(2)?)),
            _ => None,
        }
    }

    /// The credentials of `HELLO <proto> ... AUTH user pass ...`, parsed as Redis does
    /// (options after the protocol version; the last AUTH wins). `None` without AUTH.
    pub fn from_hello(req: &Request) -> Option<Credentials> {
        let mut found = None;
        let mut i = 2;
        while i < req.argc() {
            let opt = req.arg(i).unwrap_or_default();
            let more = req.argc() - 1 - i;
            if opt.eq_ignore_ascii_case(b"auth") && more >= 2 {
                found = Some(Credentials::new(req.arg(i + 1), req.arg(i + 2)?));
                i += 3;
            } else if opt.eq_ignore_ascii_case(b"setname") && more >= 1 {
                i += 2;
            } else {
                // Redis answers a syntax error; nothing is applied.
                return None;
            }
        }
        found
    }

    /// The username, `None` for one-argument AUTH.
    pub fn username(&self) -> Option<&[u8]> {
        self.username.as_deref()
    }

    /// The `AUTH` request that replays these credentials on a new link.
    pub fn auth_request(&self) -> Request {
        match &self.username {
            Some(user) => Request::from_args(&[b"AUTH".as_slice(), user, &self.password]),
            None => Request::from_args(&[b"AUTH".as_slice(), &self.password]),
        }
    }
}

/// How the proxy answers `AUTH` in proxy mode with no `[[users]]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyAuthAnswer {
    /// `+OK`: the credentials are the ones the proxy itself uses for a backend.
    Ok,
    /// `-WRONGPASS ...`: they are not.
    WrongPass,
    /// One-argument AUTH and no backend password configured: Redis's answer for a
    /// password-less server (`-ERR AUTH <password> called without any password ...`).
    NoPasswordConfigured,
}

/// The backend credentials the proxy holds (`[[backends]]`, `sentinel.backend_*`), as
/// (user, SHA-256 of the password), for proxy mode without `[[users]]`: an app built for a
/// password-protected Redis keeps sending that password, and it is accepted exactly when
/// it is the one the proxy holds.
#[derive(Default)]
pub struct BackendPasswords {
    known: Vec<(String, [u8; 32])>,
}

impl std::fmt::Debug for BackendPasswords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let users: Vec<&str> = self.known.iter().map(|(u, _)| u.as_str()).collect();
        f.debug_struct("BackendPasswords")
            .field("users", &users)
            .finish_non_exhaustive()
    }
}

impl BackendPasswords {
    /// Collect the configured backend credentials (no username = `default`).
    pub fn from_config(config: &Config) -> BackendPasswords {
        let mut known = Vec::new();
        let mut add = |user: &Option<String>, password: &Option<String>| {
            if let Some(p) = password {
                let user = user.clone().unwrap_or_else(|| "default".to_string());
                let digest: [u8; 32] = Sha256::digest(p.as_bytes()).into();
                if !known.contains(&(user.clone(), digest)) {
                    known.push((user, digest));
                }
            }
        };
        for b in &config.backends {
            add(&b.username, &b.password);
        }
        if let Some(s) = &config.sentinel {
            add(&s.backend_username, &s.backend_password);
        }
        BackendPasswords { known }
    }

    /// Answer `AUTH [user] password` (`user` = `None` for one-argument AUTH) as Redis
    /// configured with these credentials would.
    pub fn answer(&self, user: Option<&[u8]>, password: &[u8]) -> ProxyAuthAnswer {
        if self.known.is_empty() {
            // A password-less Redis: its `default` user takes any password.
            return match user {
                None => ProxyAuthAnswer::NoPasswordConfigured,
                Some(b"default") => ProxyAuthAnswer::Ok,
                Some(_) => ProxyAuthAnswer::WrongPass,
            };
        }
        let name = user.unwrap_or(b"default");
        let digest: [u8; 32] = Sha256::digest(password).into();
        let mut ok = false;
        for (u, hash) in &self.known {
            // Compare every byte: no early exit on the secret.
            let same = hash
                .iter()
                .zip(digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
            ok |= same && u.as_bytes() == name;
        }
        if ok {
            ProxyAuthAnswer::Ok
        } else {
            ProxyAuthAnswer::WrongPass
        }
    }
}

/// One `[[users]]` entry.
#[derive(Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    /// The name clients send in `AUTH <name> <password>` (`default` for one-argument AUTH).
    pub name: String,
    /// Hex SHA-256 of the password (`printf %s "$PASSWORD" | sha256sum`).
    pub password_sha256: String,
    /// Lifts of default refusals for this user (e.g. `flushdb`), same syntax as
    /// `protection.allow`.
    #[serde(default)]
    pub allow: Vec<String>,
    /// Extra refusals for this user, same syntax as `protection.deny`.
    #[serde(default)]
    pub deny: Vec<String>,
}

impl std::fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserConfig")
            .field("name", &self.name)
            .field("password_sha256", &"<redacted>")
            .field("allow", &self.allow)
            .field("deny", &self.deny)
            .finish()
    }
}

/// A configuration problem with a user entry.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("users[{index}].password_sha256: must be 64 hex digits")]
    Hash { index: usize },
    #[error("users[{index}].name: {name:?} appears twice")]
    Duplicate { index: usize, name: String },
    #[error("users[{index}]: {source}")]
    Policy { index: usize, source: PolicyError },
}

/// An authenticated identity and what it may run.
#[derive(Debug)]
pub struct User {
    pub name: String,
    hash: [u8; 32],
    pub policy: Policy,
}

/// All configured users.
#[derive(Debug, Default)]
pub struct Users {
    users: Vec<Arc<User>>,
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    let s = s.trim();
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
        let hi = (chunk[0] as char).to_digit(16)?;
        let lo = (chunk[1] as char).to_digit(16)?;
        out[i] = (hi * 16 + lo) as u8;
    }
    Some(out)
}

impl Users {
    /// Compile the users: each one's policy is the global protection plus its own lists.
    pub fn new(users: &[UserConfig], global: &ProtectionConfig) -> Result<Users, UserError> {
        let mut out: Vec<Arc<User>> = Vec::new();
        for (index, u) in users.iter().enumerate() {
            let hash = parse_hex32(&u.password_sha256).ok_or(UserError::Hash { index })?;
            if out.iter().any(|o| o.name == u.name) {
                return Err(UserError::Duplicate {
                    index,
                    name: u.name.clone(),
                });
            }
            let mut cfg = global.clone();
            cfg.allow.extend(u.allow.iter().cloned());
            cfg.deny.extend(u.deny.iter().cloned());
            let policy = Policy::new(&cfg).map_err(|source| UserError::Policy { index, source })?;
            out.push(Arc::new(User {
                name: u.name.clone(),
                hash,
                policy,
            }));
        }
        Ok(Users { users: out })
    }

    /// Whether any user is configured (then clients must authenticate).
    pub fn enabled(&self) -> bool {
        !self.users.is_empty()
    }

    /// The user with this name.
    pub fn get(&self, name: &str) -> Option<Arc<User>> {
        self.users.iter().find(|u| u.name == name).cloned()
    }

    /// Check a name and password; the same work is done for unknown names.
    pub fn authenticate(&self, name: &[u8], password: &[u8]) -> Option<Arc<User>> {
        let digest: [u8; 32] = Sha256::digest(password).into();
        let mut found = None;
        for u in &self.users {
            // Compare every byte: no early exit on the secret.
            let same = u
                .hash
                .iter()
                .zip(digest.iter())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
            if same && u.name.as_bytes() == name {
                found = Some(u.clone());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash(p: &str) -> String {
        Sha256::digest(p.as_bytes())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    #[test]
    fn authenticates_by_name_and_hash() {
        let users = Users::new(
            &[
                UserConfig {
                    name: "app".into(),
                    password_sha256: hash("s3cret"),
                    allow: vec!["flushdb".into()],
                    deny: vec!["keys".into()],
                },
                UserConfig {
                    name: "default".into(),
                    password_sha256: hash("pw"),
                    allow: vec![],
                    deny: vec![],
                },
            ],
            &ProtectionConfig::default(),
        )
        .unwrap();
        assert!(users.enabled());
        let app = users.authenticate(b"app", b"s3cret").unwrap();
        assert_eq!(app.name, "app");
        assert!(users.authenticate(b"app", b"wrong").is_none());
        assert!(users.authenticate(b"nobody", b"s3cret").is_none());
        assert!(users.authenticate(b"default", b"pw").is_some());
        let flushdb = crate::protocol::Request::from_args(&["FLUSHDB"]);
        let keys = crate::protocol::Request::from_args(&["KEYS", "*"]);
        assert_eq!(
            crate::policy::decide(&app.policy, &flushdb).1,
            Some(crate::policy::Verdict::Allow)
        );
        assert_ne!(
            crate::policy::decide(&app.policy, &keys).1,
            Some(crate::policy::Verdict::Allow)
        );
    }

    #[test]
    fn credentials_come_from_auth_and_hello_and_never_show() {
        let auth1 = Request::from_args(&["AUTH", "pw"]);
        let auth2 = Request::from_args(&["AUTH", "app", "pw"]);
        assert_eq!(
            Credentials::from_auth(&auth1),
            Some(Credentials::new(None, b"pw"))
        );
        let c = Credentials::from_auth(&auth2).unwrap();
        assert_eq!(c.username(), Some(b"app".as_slice()));
        assert_eq!(c.auth_request(), auth2);
        assert_eq!(Credentials::new(None, b"pw").auth_request(), auth1);
        assert!(Credentials::from_auth(&Request::from_args(&["AUTH"])).is_none());
        assert!(Credentials::from_auth(&Request::from_args(&["AUTH", "a", "b", "c"])).is_none());
        assert!(!format!("{c:?}").contains("pw\""), "{c:?}");
        assert!(format!("{c:?}").contains("redacted"));

        let hello = |args: &[&str]| Credentials::from_hello(&Request::from_args(args));
        assert_eq!(hello(&["HELLO", "3"]), None);
        assert_eq!(
            hello(&["HELLO", "3", "AUTH", "u", "p", "SETNAME", "n"]),
            Some(Credentials::new(Some(b"u"), b"p"))
        );
        assert_eq!(
            hello(&["HELLO", "2", "SETNAME", "n", "auth", "a", "1", "AUTH", "b", "2"]),
            Some(Credentials::new(Some(b"b"), b"2")),
            "the last AUTH wins"
        );
        assert_eq!(hello(&["HELLO", "3", "AUTH", "u"]), None, "syntax error");
        assert_eq!(hello(&["HELLO", "3", "AUTH", "u", "p", "junk"]), None);
    }

    #[test]
    fn proxy_mode_answers_with_the_backend_credentials_it_holds() {
        use crate::config::BackendConfig;
        let none = BackendPasswords::from_config(&Config::default());
        assert_eq!(
            none.answer(None, b"x"),
            ProxyAuthAnswer::NoPasswordConfigured
        );
        assert_eq!(none.answer(Some(b"default"), b"x"), ProxyAuthAnswer::Ok);
        assert_eq!(none.answer(Some(b"app"), b"x"), ProxyAuthAnswer::WrongPass);

        let config = Config {
            backends: vec![
                BackendConfig {
                    password: Some("s3cret".into()),
                    ..BackendConfig::from_address("127.0.0.1:6379")
                },
                BackendConfig {
                    username: Some("svc".into()),
                    password: Some("svc-pw".into()),
                    ..BackendConfig::from_address("127.0.0.1:6389")
                },
            ],
            ..Config::default()
        };
        let held = BackendPasswords::from_config(&config);
        assert!(!format!("{held:?}").contains("s3cret"));
        assert_eq!(held.answer(None, b"s3cret"), ProxyAuthAnswer::Ok);
        assert_eq!(
            held.answer(Some(b"default"), b"s3cret"),
            ProxyAuthAnswer::Ok
        );
        assert_eq!(held.answer(None, b"wrong"), ProxyAuthAnswer::WrongPass);
        assert_eq!(held.answer(Some(b"svc"), b"svc-pw"), ProxyAuthAnswer::Ok);
        assert_eq!(held.answer(None, b"svc-pw"), ProxyAuthAnswer::WrongPass);
        assert_eq!(
            held.answer(Some(b"svc"), b"s3cret"),
            ProxyAuthAnswer::WrongPass
        );
    }

    #[test]
    fn bad_entries_are_named() {
        let bad = UserConfig {
            name: "a".into(),
            password_sha256: "xyz".into(),
            allow: vec![],
            deny: vec![],
        };
        let e = Users::new(&[bad], &ProtectionConfig::default()).unwrap_err();
        assert!(e.to_string().contains("users[0].password_sha256"), "{e}");
        let slaveof = UserConfig {
            name: "a".into(),
            password_sha256: hash("x"),
            allow: vec!["slaveof".into()],
            deny: vec![],
        };
        assert!(Users::new(&[slaveof], &ProtectionConfig::default()).is_err());
    }
}
