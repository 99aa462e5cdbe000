//! Commands learned from a backend's own metadata (`COMMAND`): the shape (arity, flags,
//! key range, ACL categories, subcommands) of every command the built-in table does not
//! know, such as a newer server's core commands and module commands. Shape only: the
//! permission for a learned command comes from the static policy (`policy.rs`), never
//! from the backend, whose module flags are whatever the module author wrote.
//!
//! Learned specs are `&'static` like the built-in ones, so a session handles them the
//! same way; each distinct spec is allocated once per process and shared by every catalog
//! that reports it (a backend restarting in a loop does not grow memory).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use crate::command::{
    self, AclCategories, CommandSpec, Flags, RequestPolicy, ResponsePolicy, Special,
};
use crate::protocol::{Node, Reply};

/// Most commands (top-level) read from one `COMMAND` reply: Redis 8 with every shipped
/// module reports about 600; a hostile backend must not make the proxy keep millions.
pub const MAX_REPORTED: usize = 8192;

/// Most distinct learned shapes kept per process (each is allocated once, for good).
const MAX_INTERNED: usize = 32768;

/// One command or subcommand the backend reported and the built-in table lacks.
#[derive(Debug)]
pub struct Learned {
    /// Its shape, as a session uses it (lowercase `name` or `container|sub`).
    pub spec: CommandSpec,
    /// Every ACL category the server reports for it, lowercase without `@` (modules add
    /// their own, e.g. `json`, `search`).
    pub categories: Box<[Box<str>]>,
    /// The server marks it as a module command (the `module` flag, set by the server
    /// itself for every module command, whatever the module declares).
    pub module: bool,
}

impl Learned {
    /// True when one of its reported categories is `cat` (without `@`, lowercase).
    pub fn has_category(&self, cat: &str) -> bool {
        self.categories.iter().any(|c| &**c == cat)
    }
}

/// The outcome of looking a request up in a catalog.
#[derive(Debug, Clone, Copy)]
pub enum Found {
    /// A learned command or subcommand.
    Command(&'static Learned),
    /// A learned container, with a missing or unknown subcommand.
    UnknownSubcommand(&'static Learned),
    /// Not learned either.
    Missing,
}

/// What one backend reported beyond the built-in table.
#[derive(Debug, Default)]
pub struct Catalog {
    /// By lowercase name (`delifeq`, `client|capa`, `testmod.config|set`).
    entries: HashMap<Box<str>, &'static Learned>,
    /// Number of commands (top-level) the server reported in all.
    pub reported: usize,
    /// The server's version line (`redis_version` or `valkey_version`), when known.
    pub server: Option<String>,
}

/// Why a `COMMAND` reply could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("COMMAND answered an error: {0}")]
    Refused(String),
    #[error("COMMAND reply is not in the expected layout")]
    Layout,
}

/// One entry as decoded from the reply (owned), before interning.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Raw {
    name: String,
    arity: i32,
    flags: Vec<String>,
    first: i32,
    last: i32,
    step: i32,
    categories: Vec<String>,
    request_policy: RequestPolicy,
    response_policy: ResponsePolicy,
    subs: Vec<Raw>,
}

/// The request and response policies among a command's tips (element 8 of its
/// `COMMAND` entry, Redis `src/commands/*.json` `command_tips`).
fn policies(tips: &[String]) -> (RequestPolicy, ResponsePolicy) {
    let mut request = RequestPolicy::Default;
    let mut response = ResponsePolicy::Default;
    for tip in tips {
        match tip.as_str() {
            "request_policy:all_nodes" => request = RequestPolicy::AllNodes,
            "request_policy:all_shards" => request = RequestPolicy::AllShards,
            "request_policy:multi_shard" => request = RequestPolicy::MultiShard,
            "request_policy:special" => request = RequestPolicy::Special,
            "response_policy:one_succeeded" => response = ResponsePolicy::OneSucceeded,
            "response_policy:all_succeeded" => response = ResponsePolicy::AllSucceeded,
            "response_policy:agg_logical_and" => response = ResponsePolicy::AggLogicalAnd,
            "response_policy:agg_logical_or" => response = ResponsePolicy::AggLogicalOr,
            "response_policy:agg_min" => response = ResponsePolicy::AggMin,
            "response_policy:agg_max" => response = ResponsePolicy::AggMax,
            "response_policy:agg_sum" => response = ResponsePolicy::AggSum,
            "response_policy:special" => response = ResponsePolicy::Special,
            _ => {}
        }
    }
    (request, response)
}

fn text(node: &Node<'_>) -> Option<String> {
    match node {
        Node::Str(s) => Some(String::from_utf8_lossy(s).to_ascii_lowercase()),
        _ => None,
    }
}

fn int(node: &Node<'_>) -> Option<i32> {
    match node {
        Node::Int(i) => i32::try_from(*i).ok(),
        _ => None,
    }
}

fn strings(node: Option<&Node<'_>>) -> Vec<String> {
    match node {
        Some(Node::List(items)) => items.iter().filter_map(text).collect(),
        _ => Vec::new(),
    }
}

fn raw(node: &Node<'_>) -> Option<Raw> {
    let Node::List(f) = node else { return None };
    let name = text(f.first()?)?;
    // A name the session could never match, or absurd: not learned.
    if name.is_empty() || name.len() > 128 || name.bytes().any(|b| b <= b' ' || b >= 0x7f) {
        return None;
    }
    let subs = match f.get(9) {
        Some(Node::List(items)) => items.iter().filter_map(raw).collect(),
        _ => Vec::new(),
    };
    let (request_policy, response_policy) = policies(&strings(f.get(7)));
    Some(Raw {
        name,
        request_policy,
        response_policy,
        arity: int(f.get(1)?)?,
        flags: strings(f.get(2)),
        first: int(f.get(3)?)?,
        last: int(f.get(4)?)?,
        step: int(f.get(5)?)?,
        categories: strings(f.get(6))
            .into_iter()
            .map(|c| c.trim_start_matches('@').to_string())
            .collect(),
        subs,
    })
}

fn leak_str(s: &str) -> &'static str {
    Box::leak(s.to_string().into_boxed_str())
}

fn spec_of(r: &Raw, subcommands: &'static [CommandSpec]) -> CommandSpec {
    let mut flags = Flags::EMPTY;
    for f in &r.flags {
        if let Some(flag) = Flags::from_name(f) {
            flags |= flag;
        }
    }
    let mut acl = AclCategories::EMPTY;
    for c in &r.categories {
        if let Some(cat) = AclCategories::from_name(c) {
            acl |= cat;
        }
    }
    CommandSpec {
        name: leak_str(&r.name),
        arity: r.arity,
        flags,
        acl,
        first_key: r.first,
        last_key: r.last,
        step: r.step,
        // Module key specs are not read yet: legacy range only.
        key_specs: &[],
        request_policy: r.request_policy,
        response_policy: r.response_policy,
        special: Special::None,
        subcommands,
    }
}

fn learned(r: &Raw, subcommands: &'static [CommandSpec]) -> &'static Learned {
    Box::leak(Box::new(Learned {
        spec: spec_of(r, subcommands),
        categories: r.categories.iter().map(|c| c.as_str().into()).collect(),
        module: r.flags.iter().any(|f| f == "module"),
    }))
}

/// Learned entries of one reported top-level command: `(full name, entry)`, interned.
fn intern(r: &Raw) -> &'static [(&'static str, &'static Learned)] {
    type Interned = HashMap<Raw, &'static [(&'static str, &'static Learned)]>;
    static INTERNED: OnceLock<Mutex<Interned>> = OnceLock::new();
    let map = INTERNED.get_or_init(Default::default);
    let mut map = match map.lock() {
        Ok(m) => m,
        Err(poisoned) => poisoned.into_inner(),
    };
    if let Some(found) = map.get(r) {
        return found;
    }
    if map.len() >= MAX_INTERNED {
        return &[];
    }
    let mut out: Vec<(&'static str, &'static Learned)> = Vec::new();
    match command::lookup_name(&r.name) {
        // A built-in command: learn only the subcommands the table lacks.
        Some(_) => {
            for sub in &r.subs {
                if command::lookup_name(&sub.name).is_none() && sub.name.contains('|') {
                    let l = learned(sub, &[]);
                    out.push((l.spec.name, l));
                }
            }
        }
        None => {
            let mut subs: Vec<&Raw> = r.subs.iter().filter(|s| s.name.contains('|')).collect();
            subs.sort_by(|a, b| a.name.cmp(&b.name));
            let specs: Vec<CommandSpec> = subs.iter().map(|s| spec_of(s, &[])).collect();
            let top = learned(r, Box::leak(specs.into_boxed_slice()));
            out.push((top.spec.name, top));
            for sub in subs {
                let l = learned(sub, &[]);
                out.push((l.spec.name, l));
            }
        }
    }
    let out: &'static [(&'static str, &'static Learned)] = Box::leak(out.into_boxed_slice());
    map.insert(r.clone(), out);
    out
}

impl Catalog {
    /// Build from a RESP2 or RESP3 `COMMAND` reply.
    pub fn from_reply(reply: &Reply, server: Option<String>) -> Result<Catalog, CatalogError> {
        if reply.is_error() {
            return Err(CatalogError::Refused(
                String::from_utf8_lossy(reply.frame().trim_ascii_end()).into_owned(),
            ));
        }
        let Some(Node::List(commands)) = reply.tree() else {
            return Err(CatalogError::Layout);
        };
        let mut catalog = Catalog {
            server,
            ..Catalog::default()
        };
        for node in commands.iter().take(MAX_REPORTED) {
            let Some(r) = raw(node) else { continue };
            catalog.reported += 1;
            for (name, l) in intern(&r) {
                catalog.entries.insert((*name).into(), l);
            }
        }
        if catalog.reported == 0 && !commands.is_empty() {
            return Err(CatalogError::Layout);
        }
        Ok(catalog)
    }

    /// Number of learned entries (commands and subcommands the built-in table lacks).
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the server reported nothing beyond the built-in table.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The learned names, sorted (for logs).
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.entries.keys().map(|k| &**k).collect();
        v.sort_unstable();
        v
    }

    /// A learned entry by its lowercase name.
    pub fn get(&self, name: &str) -> Option<&'static Learned> {
        self.entries.get(name).copied()
    }

    /// Look up a request the built-in table did not resolve (ASCII case-insensitively).
    pub fn find(&self, argv0: &[u8], argv1: Option<&[u8]>) -> Found {
        let Ok(top) = std::str::from_utf8(argv0) else {
            return Found::Missing;
        };
        let top = top.to_ascii_lowercase();
        let sub_key = |sub: &[u8]| {
            std::str::from_utf8(sub)
                .ok()
                .map(|s| format!("{top}|{}", s.to_ascii_lowercase()))
        };
        if let Some(t) = self.get(&top) {
            if t.spec.subcommands.is_empty() {
                return Found::Command(t);
            }
            return match argv1 {
                None if t.spec.arity_allows(1) => Found::Command(t),
                None => Found::UnknownSubcommand(t),
                Some(sub) => match sub_key(sub).and_then(|k| self.get(&k)) {
                    Some(s) => Found::Command(s),
                    None => Found::UnknownSubcommand(t),
                },
            };
        }
        match argv1.and_then(sub_key).and_then(|k| self.get(&k)) {
            Some(s) => Found::Command(s),
            None => Found::Missing,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(bytes: &[u8]) -> Reply {
        Reply::parse_one(bytes)
    }

    /// RESP2 encoding of one COMMAND entry (strings as bulk, flags as simple strings).
    fn entry(
        name: &str,
        arity: i64,
        flags: &[&str],
        keys: [i64; 3],
        cats: &[&str],
        subs: &[String],
    ) -> String {
        let mut s = format!(
            "*10\r\n${}\r\n{name}\r\n:{arity}\r\n*{}\r\n",
            name.len(),
            flags.len()
        );
        for f in flags {
            s += &format!("+{f}\r\n");
        }
        for k in keys {
            s += &format!(":{k}\r\n");
        }
        s += &format!("*{}\r\n", cats.len());
        for c in cats {
            s += &format!("${}\r\n{c}\r\n", c.len());
        }
        s += "*0\r\n*0\r\n";
        s += &format!("*{}\r\n", subs.len());
        for sub in subs {
            s += sub;
        }
        s
    }

    #[test]
    fn learns_only_what_the_table_lacks() {
        let cmds = [
            entry(
                "get",
                2,
                &["readonly", "fast"],
                [1, 1, 1],
                &["@read", "@string", "@fast"],
                &[],
            ),
            entry(
                "delifeq",
                -5,
                &["write", "fast"],
                [1, 1, 1],
                &["@write", "@stream", "@fast"],
                &[],
            ),
            entry(
                "client",
                -2,
                &[],
                [0, 0, 0],
                &["@slow"],
                &[
                    entry(
                        "client|id",
                        2,
                        &["noscript"],
                        [0, 0, 0],
                        &["@slow", "@connection"],
                        &[],
                    ),
                    entry(
                        "client|capa",
                        -3,
                        &["noscript", "loading", "stale"],
                        [0, 0, 0],
                        &["@slow", "@connection"],
                        &[],
                    ),
                ],
            ),
            entry(
                "testmod.config",
                -2,
                &["module"],
                [0, 0, 0],
                &["@slow"],
                &[entry(
                    "testmod.config|set",
                    4,
                    &["write", "module"],
                    [0, 0, 0],
                    &["@write", "@slow", "@testmod"],
                    &[],
                )],
            ),
        ];
        let body = format!("*{}\r\n{}", cmds.len(), cmds.concat());
        let c = Catalog::from_reply(&reply(body.as_bytes()), None).unwrap();
        assert_eq!(c.reported, 4);
        assert_eq!(
            c.names(),
            [
                "client|capa",
                "delifeq",
                "testmod.config",
                "testmod.config|set"
            ]
        );
        let Found::Command(x) = c.find(b"DELIFEQ", None) else {
            panic!()
        };
        assert!(x.spec.is_write() && !x.module);
        assert_eq!((x.spec.first_key, x.spec.last_key, x.spec.step), (1, 1, 1));
        assert!(
            matches!(c.find(b"client", Some(b"CAPA")), Found::Command(l) if l.spec.name == "client|capa")
        );
        assert!(matches!(c.find(b"client", Some(b"nope")), Found::Missing));
        assert!(matches!(c.find(b"get", None), Found::Missing));
        let Found::Command(set) = c.find(b"TestMod.Config", Some(b"SET")) else {
            panic!()
        };
        assert!(set.module && set.has_category("testmod") && set.spec.is_write());
        assert!(matches!(
            c.find(b"testmod.config", None),
            Found::UnknownSubcommand(_)
        ));
        assert!(matches!(
            c.find(b"testmod.config", Some(b"x")),
            Found::UnknownSubcommand(_)
        ));
        // The same reply again reuses the same allocations.
        let again = Catalog::from_reply(&reply(body.as_bytes()), None).unwrap();
        assert!(std::ptr::eq(again.get("delifeq").unwrap(), x));
        assert!(Catalog::from_reply(&reply(b"-ERR no\r\n"), None).is_err());
        assert!(Catalog::from_reply(&reply(b":1\r\n"), None).is_err());
    }
}
