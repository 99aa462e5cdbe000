//! Users at the proxy: `AUTH` / `HELLO ... AUTH` are answered here against `[[users]]`
//! (SHA-256 password hashes), each user with its own compiled policy on top of the global
//! one. Backend credentials are a separate thing (`[[backends]]`) and never reach clients.
//! Pure: no I/O.

use std::sync::Arc;

use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::policy::{Policy, PolicyError, ProtectionConfig};

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
