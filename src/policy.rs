//! Protection policy: which commands a client may run. Pure decisions over a looked-up
//! command and its argv; built once from the config (rules expanded per command at load
//! time, so a check is one map lookup). Must not do I/O.
//!
//! The default refuses everything that changes replication, configuration, persistence,
//! modules or users, reaches other clients, or is unknown; destructive data-plane
//! commands are refused unless allowed. Reasons are in the README's policy table.

use std::collections::HashMap;

use serde::Deserialize;

use std::sync::Arc;

use crate::catalog::{Catalog, Found, Learned};
use crate::command::{self, AclCategories, CommandSpec, Flags, Lookup};
use crate::protocol::Request;

/// Script policy: what EVAL/FCALL a client may run.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ScriptPolicy {
    /// EVAL, EVALSHA, FCALL and their _RO variants, SCRIPT LOAD/EXISTS/FLUSH/KILL.
    #[default]
    Allow,
    /// Only EVAL_RO, EVALSHA_RO, FCALL_RO (and SCRIPT EXISTS/KILL).
    Readonly,
    /// No script execution or loading at all.
    Deny,
}

/// Whether refusals are enforced or only reported.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ProtectionMode {
    /// Refused commands get `-NOPERM` and never reach Redis.
    #[default]
    Enforce,
    /// Refused commands are forwarded anyway, logged at WARN as "would be refused" and
    /// counted with `mode="shadow"`: for reading what enforcement would block before
    /// turning it on. Protection is NOT enforced.
    Shadow,
}

/// `[protection]` section of the config.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProtectionConfig {
    /// `enforce` (default) or `shadow` (forward what would be refused, log and count it).
    pub mode: ProtectionMode,
    /// Extra refusals: `name`, `container|sub`, or `@category`.
    pub deny: Vec<String>,
    /// Exceptions to the default refusals (same syntax). Cannot re-enable the takeover set.
    pub allow: Vec<String>,
    /// Parameters `CONFIG GET` may read.
    pub config_get_allow: Vec<String>,
    /// Allow `CONFIG SET notify-keyspace-events <flags>` (Spring Session sets it on start);
    /// the value is checked against Redis's flag alphabet.
    pub allow_notify_keyspace_events: bool,
    /// Scripting policy.
    pub scripts: ScriptPolicy,
    /// Heal a hijacked backend (one replicating from outside the configured set) with
    /// `REPLICAOF` from the proxy's own connection.
    pub auto_heal: bool,
    /// With no `[[users]]`, accept only loopback clients (like Redis's protected mode).
    pub protected_mode: bool,
}

impl Default for ProtectionConfig {
    fn default() -> Self {
        ProtectionConfig {
            mode: ProtectionMode::Enforce,
            deny: Vec::new(),
            allow: Vec::new(),
            config_get_allow: DEFAULT_CONFIG_GET_ALLOW
                .iter()
                .map(|s| s.to_string())
                .collect(),
            allow_notify_keyspace_events: true,
            scripts: ScriptPolicy::Allow,
            auto_heal: false,
            protected_mode: true,
        }
    }
}

/// CONFIG GET parameters real clients read on connect (Spring Session,
/// StackExchange.Redis); everything else is reconnaissance.
pub const DEFAULT_CONFIG_GET_ALLOW: &[&str] = &[
    "notify-keyspace-events",
    "databases",
    "timeout",
    "replica-read-only",
    "slave-read-only",
];

/// Redis's `notify-keyspace-events` flag alphabet (redis.conf 7.2).
const KEYSPACE_EVENT_FLAGS: &[u8] = b"KEg$lshzxentdmA";

/// Why a command is refused; the text ends up in the client's `-NOPERM` reply and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    Replication,
    Configuration,
    CodeLoading,
    ServerState,
    Users,
    OtherClients,
    Destructive,
    Cluster,
    Scripting,
    Sentinel,
    Operator,
    /// A module command portcullis does not know (not one of Redis 8's shipped modules).
    UnknownModule,
    /// A module's control, debug or internal command (`FT.CONFIG`, `*.DEBUG`, `_FT.*`).
    ModuleControl,
    /// A command only the backend's metadata knows, flagged admin or dangerous there.
    Unclassified,
    /// A command only the backend's metadata knows, flagged pub/sub: its replies cannot
    /// be accounted for without the proxy's own handling.
    UnaccountedReplies,
}

impl Reason {
    /// Short human text for replies and logs.
    pub fn text(self) -> &'static str {
        match self {
            Reason::Replication => "it changes replication",
            Reason::Configuration => "it changes or reads server configuration",
            Reason::CodeLoading => "it loads or removes server-side code",
            Reason::ServerState => "it changes server or persistence state",
            Reason::Users => "it changes users or permissions",
            Reason::OtherClients => "it reaches other clients' connections or commands",
            Reason::Destructive => "it destroys or moves whole datasets (allow it explicitly)",
            Reason::Cluster => {
                "it changes cluster membership, slots, epochs, failover or node configuration"
            }
            Reason::Scripting => "scripting is restricted by protection.scripts",
            Reason::Sentinel => "it is a Sentinel command",
            Reason::Operator => "the operator's protection.deny list refuses it",
            Reason::UnknownModule => {
                "it is a command of a module portcullis does not know (allow it by name or category in protection.allow)"
            }
            Reason::ModuleControl => {
                "it is a module's control, debug or internal command (allow it by its exact name)"
            }
            Reason::Unclassified => {
                "portcullis's table lacks it and the server flags it admin or dangerous (allow it by name)"
            }
            Reason::UnaccountedReplies => {
                "portcullis's table lacks it and the server flags it pub/sub, whose replies the proxy cannot account for"
            }
        }
    }

    /// Whether `protection.allow` may lift this refusal. The takeover set cannot be lifted.
    fn liftable(self) -> bool {
        matches!(
            self,
            Reason::Destructive
                | Reason::OtherClients
                | Reason::Operator
                | Reason::Scripting
                | Reason::UnknownModule
                | Reason::Unclassified
        )
    }
}

/// The default refusals: (name or `container|sub` or `container|*`, reason).
const DEFAULT_DENY: &[(&str, Reason)] = &[
    ("replicaof", Reason::Replication),
    ("slaveof", Reason::Replication),
    ("failover", Reason::Replication),
    ("sync", Reason::Replication),
    ("psync", Reason::Replication),
    ("replconf", Reason::Replication),
    ("config|set", Reason::Configuration),
    ("config|rewrite", Reason::Configuration),
    ("config|resetstat", Reason::Configuration),
    ("module|*", Reason::CodeLoading),
    ("function|load", Reason::CodeLoading),
    ("function|delete", Reason::CodeLoading),
    ("function|flush", Reason::CodeLoading),
    ("function|restore", Reason::CodeLoading),
    ("script|debug", Reason::CodeLoading),
    ("debug", Reason::ServerState),
    ("pfdebug", Reason::ServerState),
    ("pfselftest", Reason::ServerState),
    ("shutdown", Reason::ServerState),
    ("save", Reason::ServerState),
    ("bgsave", Reason::ServerState),
    ("bgrewriteaof", Reason::ServerState),
    ("acl|*", Reason::Users),
    ("client|kill", Reason::OtherClients),
    ("client|list", Reason::OtherClients),
    ("client|pause", Reason::OtherClients),
    ("client|unpause", Reason::OtherClients),
    ("client|unblock", Reason::OtherClients),
    ("client|no-evict", Reason::OtherClients),
    ("monitor", Reason::OtherClients),
    ("slowlog|*", Reason::OtherClients),
    ("latency|*", Reason::OtherClients),
    ("flushall", Reason::Destructive),
    ("flushdb", Reason::Destructive),
    ("swapdb", Reason::Destructive),
    ("migrate", Reason::Destructive),
    ("restore", Reason::Destructive),
    ("restore-asking", Reason::Destructive),
    // Cluster control: membership, slots, epochs, failover, the node's config, slot
    // migration. Every CLUSTER subcommand is refused except the read-only ones in
    // DEFAULT_ALLOW_SUB, so one added by a newer server is refused too.
    ("cluster|*", Reason::Cluster),
];

/// Exceptions inside denied containers: read-only helpers real clients use.
const DEFAULT_ALLOW_SUB: &[&str] = &[
    "acl|whoami",
    "acl|cat",
    "acl|genpass",
    "acl|help",
    "latency|help",
    "slowlog|help",
    "module|help",
    // Clients probe a server's modules at start (read-only).
    "module|list",
    // Read-only CLUSTER introspection (cluster-aware clients read the topology on start).
    "cluster|help",
    "cluster|info",
    "cluster|nodes",
    "cluster|slots",
    "cluster|shards",
    "cluster|myid",
    "cluster|myshardid",
    "cluster|keyslot",
    "cluster|countkeysinslot",
    "cluster|getkeysinslot",
    "cluster|replicas",
    "cluster|slaves",
    "cluster|links",
    "cluster|count-failure-reports",
    "cluster|slot-stats",
    "cluster|getslotmigrations",
];

/// Built-in containers whose subcommands unknown to portcullis's table (a newer server's)
/// are refused, with the reason their known ones are: the control planes.
const CLOSED_CONTAINERS: &[(&str, Reason)] = &[
    ("cluster", Reason::Cluster),
    ("config", Reason::Configuration),
    ("module", Reason::CodeLoading),
    ("function", Reason::CodeLoading),
    ("script", Reason::CodeLoading),
    ("acl", Reason::Users),
    ("debug", Reason::ServerState),
    ("slowlog", Reason::OtherClients),
    ("latency", Reason::OtherClients),
    ("commandlog", Reason::OtherClients),
    ("sentinel", Reason::Sentinel),
];

/// Name prefixes of the data commands of the modules Redis 8 ships (RedisJSON,
/// RediSearch, RedisTimeSeries, RedisBloom's Bloom/Cuckoo/Count-min/Top-K/t-digest):
/// allowed by default, except what `module_control` names.
const SHIPPED_MODULE_PREFIXES: &[&str] = &[
    "json.", "ft.", "ts.", "bf.", "cf.", "cms.", "topk.", "tdigest.",
];

/// Redis 8's vector sets (`modules/vector-sets`): data commands without a dot.
const VECTOR_SET_COMMANDS: &[&str] = &[
    "vadd",
    "vcard",
    "vdim",
    "vemb",
    "vgetattr",
    "vinfo",
    "vismember",
    "vlinks",
    "vrandmember",
    "vrange",
    "vrem",
    "vsetattr",
    "vsim",
];

/// Control, debug and internal commands of the shipped modules, refused by default:
/// module configuration (`FT.CONFIG`; Redis 8 also takes it as `CONFIG SET search-*`,
/// refused as configuration), debug commands, and the cluster-coordination commands of
/// the search and time-series modules.
const MODULE_CONTROL: &[&str] = &[
    "ft.config",
    "ft.debug",
    "json.debug",
    "bf.debug",
    "cf.debug",
    "ts.debug",
    "search.clusterset",
    "search.clusterrefresh",
    "search.clusterinfo",
    "timeseries.clusterset",
    "timeseries.refreshcluster",
    "timeseries.infocluster",
];

/// Internal-looking names that are plain reads clients use.
const MODULE_CONTROL_EXCEPTIONS: &[&str] = &["ft._list"];

/// True for a module command or subcommand that configures, debugs or coordinates the
/// module rather than handling data: named in `MODULE_CONTROL`, or, for any module, a
/// name part (`.`/`|`-separated) that is `config` or `debug`, or starts with `_`
/// (`_FT.*`, `FT._DROPIFX`), or the `search.`/`timeseries.` coordination namespaces.
fn module_control(name: &str) -> bool {
    if MODULE_CONTROL_EXCEPTIONS.contains(&name) {
        return false;
    }
    let top = name.split('|').next().unwrap_or(name);
    MODULE_CONTROL.contains(&top)
        || top.starts_with("search.")
        || top.starts_with("timeseries.")
        || name
            .split(['.', '|'])
            .any(|part| part == "config" || part == "debug" || part.starts_with('_'))
}

/// True for the data commands of Redis 8's shipped modules.
fn shipped_module_data(name: &str) -> bool {
    let top = name.split('|').next().unwrap_or(name);
    SHIPPED_MODULE_PREFIXES.iter().any(|p| top.starts_with(p)) || VECTOR_SET_COMMANDS.contains(&top)
}

/// Script commands by policy level.
const SCRIPT_WRITE: &[&str] = &["eval", "evalsha", "fcall", "script|load", "script|flush"];
const SCRIPT_ALL: &[&str] = &[
    "eval",
    "evalsha",
    "fcall",
    "eval_ro",
    "evalsha_ro",
    "fcall_ro",
    "script|load",
    "script|flush",
];

/// A policy problem in the config, naming the entry.
#[derive(Debug, thiserror::Error)]
#[error("invalid value for protection.{list}: {entry:?} {reason}")]
pub struct PolicyError {
    pub list: &'static str,
    pub entry: String,
    pub reason: &'static str,
}

/// The outcome of checking one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Forward it.
    Allow,
    /// Refuse with `-NOPERM`, naming the command and the reason.
    Deny {
        command: &'static str,
        reason: Reason,
    },
}

/// Hashes a table entry's address: one multiply instead of SipHash on the per-command
/// path (keys are our own static pointers, not attacker-chosen).
#[derive(Default, Clone, Copy)]
struct AddrHasher(u64);

impl std::hash::Hasher for AddrHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = (self.0 ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_usize(&mut self, n: usize) {
        // Fold the high product bits down: the table indexes by the low bits.
        let x = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        self.0 = x ^ (x >> 29);
    }
}

type AddrMap<V> = HashMap<usize, V, std::hash::BuildHasherDefault<AddrHasher>>;

/// The compiled policy.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Refusals by command spec (address of the static table entry).
    denied: AddrMap<Reason>,
    /// A bit per `filter_bit` of every key of `denied`: a clear bit means "not denied"
    /// without a map probe (the common, allowed command).
    denied_filter: [u64; FILTER_WORDS],
    /// `protection.allow` entries that name no built-in command or category: module
    /// commands (`testmod.read`, `testmod.config|get`) and categories (`@json`),
    /// lowercase, matched against commands learned from the backend.
    learned_allow: Vec<String>,
    /// Categories of `protection.deny` `@category` entries: learned commands in them
    /// are refused too.
    deny_categories: AclCategories,
    /// Names of `protection.deny` entries (lowercase), for learned subcommands of a
    /// denied built-in container.
    deny_names: Vec<String>,
    /// Lowercase CONFIG GET parameters allowed.
    config_get_allow: Vec<String>,
    allow_notify_keyspace_events: bool,
}

fn key(spec: &'static CommandSpec) -> usize {
    spec as *const CommandSpec as usize
}

/// Words of `Policy::denied_filter` (1024 bits, for a few hundred denied specs).
const FILTER_WORDS: usize = 16;

/// Which bit of `Policy::denied_filter` a spec's key sets: a multiplicative hash.
fn filter_bit(key: usize) -> (usize, u64) {
    let bit = ((key as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 54) as usize;
    (bit / 64 % FILTER_WORDS, 1u64 << (bit % 64))
}

/// The filter of a finished `denied` map.
fn denied_filter(denied: &AddrMap<Reason>) -> [u64; FILTER_WORDS] {
    let mut filter = [0u64; FILTER_WORDS];
    for key in denied.keys() {
        let (word, bit) = filter_bit(*key);
        if let Some(w) = filter.get_mut(word) {
            *w |= bit;
        }
    }
    filter
}

/// Every spec a rule entry names: `name`, `container|sub`, `container|*`, `@category`.
fn expand(entry: &str, list: &'static str) -> Result<Vec<&'static CommandSpec>, PolicyError> {
    let err = |reason| PolicyError {
        list,
        entry: entry.to_string(),
        reason,
    };
    if let Some(cat) = entry.strip_prefix('@') {
        let cats = AclCategories::from_name(cat).ok_or_else(|| err("is not an ACL category"))?;
        let mut out = Vec::new();
        for spec in command::all() {
            if spec.acl.contains(cats) {
                out.push(spec);
            }
            out.extend(spec.subcommands.iter().filter(|s| s.acl.contains(cats)));
        }
        return Ok(out);
    }
    if let Some(container) = entry.strip_suffix("|*") {
        let spec = command::lookup_name(container).ok_or_else(|| err("is not a command"))?;
        let mut out = vec![spec];
        out.extend(spec.subcommands.iter());
        return Ok(out);
    }
    let spec = command::lookup_name(entry).ok_or_else(|| err("is not a command"))?;
    let mut out = vec![spec];
    // Denying a container denies all its subcommands.
    out.extend(spec.subcommands.iter());
    Ok(out)
}

impl Policy {
    /// Compile the configured rules over the defaults.
    pub fn new(cfg: &ProtectionConfig) -> Result<Policy, PolicyError> {
        let mut denied = AddrMap::default();
        for (entry, reason) in DEFAULT_DENY {
            for spec in expand(entry, "default")? {
                denied.insert(key(spec), *reason);
            }
        }
        for entry in DEFAULT_ALLOW_SUB {
            for spec in expand(entry, "default")? {
                denied.remove(&key(spec));
            }
        }
        let script_denied: &[&str] = match cfg.scripts {
            ScriptPolicy::Allow => &[],
            ScriptPolicy::Readonly => SCRIPT_WRITE,
            ScriptPolicy::Deny => SCRIPT_ALL,
        };
        for entry in script_denied {
            for spec in expand(entry, "scripts")? {
                denied.insert(key(spec), Reason::Scripting);
            }
        }
        let mut deny_categories = AclCategories::EMPTY;
        let mut deny_names = Vec::new();
        for entry in &cfg.deny {
            for spec in expand(entry, "deny")? {
                denied.entry(key(spec)).or_insert(Reason::Operator);
            }
            match entry.strip_prefix('@').and_then(AclCategories::from_name) {
                Some(cat) => deny_categories |= cat,
                None => deny_names.push(entry.to_ascii_lowercase()),
            }
        }
        let mut learned_allow = Vec::new();
        for entry in &cfg.allow {
            // A category also names module commands learned from backends (`@json`).
            if entry.starts_with('@') && valid_learned_entry(entry) {
                learned_allow.push(entry.to_ascii_lowercase());
            }
            let specs = match expand(entry, "allow") {
                Ok(specs) => specs,
                // Not a built-in name or category: a module's command or category, to
                // match against what backends report.
                Err(_) if valid_learned_entry(entry) => {
                    if !entry.starts_with('@') {
                        learned_allow.push(entry.to_ascii_lowercase());
                    }
                    continue;
                }
                Err(e) => return Err(e),
            };
            for spec in specs {
                if let Some(reason) = denied.get(&key(spec)).copied() {
                    if !reason.liftable() {
                        return Err(PolicyError {
                            list: "allow",
                            entry: entry.clone(),
                            reason: "names a command portcullis always refuses (replication, configuration, code loading, server state, users)",
                        });
                    }
                    denied.remove(&key(spec));
                }
            }
        }
        Ok(Policy {
            denied_filter: denied_filter(&denied),
            denied,
            learned_allow,
            deny_categories,
            deny_names,
            config_get_allow: cfg
                .config_get_allow
                .iter()
                .map(|s| s.to_ascii_lowercase())
                .collect(),
            allow_notify_keyspace_events: cfg.allow_notify_keyspace_events,
        })
    }

    /// Decide on a known command.
    pub fn check(&self, spec: &'static CommandSpec, req: &Request) -> Verdict {
        match spec.name {
            "config|get" => return self.check_config_get(spec, req),
            "config|set" => return self.check_config_set(spec, req),
            _ => {}
        }
        match self.denied_reason(spec) {
            None if matches!(spec.name, "eval" | "eval_ro" | "script|load")
                && req
                    .arg(if spec.name == "script|load" { 2 } else { 1 })
                    .is_some_and(script_calls_cluster) =>
            {
                Verdict::Deny {
                    command: spec.name,
                    reason: Reason::Cluster,
                }
            }
            None => Verdict::Allow,
            Some(reason) => Verdict::Deny {
                command: spec.name,
                reason: *reason,
            },
        }
    }

    /// Why `spec` is refused, if it is: the filter first, the map only on a set bit.
    fn denied_reason(&self, spec: &'static CommandSpec) -> Option<&Reason> {
        let key = key(spec);
        let (word, bit) = filter_bit(key);
        if self.denied_filter.get(word).is_some_and(|w| w & bit == 0) {
            return None;
        }
        self.denied.get(&key)
    }

    fn check_config_get(&self, spec: &'static CommandSpec, req: &Request) -> Verdict {
        let all_allowed = req.argc() > 2
            && (2..req.argc()).all(|i| {
                req.arg(i).is_some_and(|p| {
                    self.config_get_allow
                        .iter()
                        .any(|a| a.as_bytes().eq_ignore_ascii_case(p))
                })
            });
        if all_allowed {
            Verdict::Allow
        } else {
            Verdict::Deny {
                command: spec.name,
                reason: Reason::Configuration,
            }
        }
    }

    fn check_config_set(&self, spec: &'static CommandSpec, req: &Request) -> Verdict {
        let pairs_ok = req.argc() >= 4
            && req.argc() % 2 == 0
            && (2..req.argc()).step_by(2).all(|i| {
                let name_ok = req
                    .arg(i)
                    .is_some_and(|p| p.eq_ignore_ascii_case(b"notify-keyspace-events"));
                let value_ok = req
                    .arg(i + 1)
                    .is_some_and(|v| v.iter().all(|b| KEYSPACE_EVENT_FLAGS.contains(b)));
                name_ok && value_ok
            });
        if self.allow_notify_keyspace_events && pairs_ok {
            Verdict::Allow
        } else {
            Verdict::Deny {
                command: spec.name,
                reason: Reason::Configuration,
            }
        }
    }
}

/// A plausible module command or category name for `protection.allow`.
fn valid_learned_entry(entry: &str) -> bool {
    let name = entry.strip_prefix('@').unwrap_or(entry);
    !name.is_empty()
        && name.len() <= 128
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b'*' && b != b'@')
}

impl Policy {
    /// Decide on a command only the backend's metadata knows. The metadata gives its
    /// shape; the permission comes from the static tables above and the operator's
    /// lists, never from the flags a module declares.
    pub fn check_learned(&self, l: &Learned) -> Verdict {
        let name = l.spec.name;
        let top = name.split('|').next().unwrap_or(name);
        let deny = |reason| Verdict::Deny {
            command: name,
            reason,
        };
        let named = |entry: &String| entry == name || entry == top;
        // A newer server's subcommand of a built-in control container.
        if let Some((_, reason)) = CLOSED_CONTAINERS.iter().find(|(c, _)| *c == top) {
            return deny(*reason);
        }
        if self.deny_names.iter().any(named) || l.spec.acl.intersects(self.deny_categories) {
            return deny(Reason::Operator);
        }
        if l.spec.flags.contains(Flags::PUBSUB) {
            return deny(Reason::UnaccountedReplies);
        }
        let allowed_by_name = self.learned_allow.iter().any(named);
        if l.module {
            if module_control(name) {
                return if self.learned_allow.iter().any(|e| e == name) {
                    Verdict::Allow
                } else {
                    deny(Reason::ModuleControl)
                };
            }
            let by_category = self
                .learned_allow
                .iter()
                .any(|e| e.strip_prefix('@').is_some_and(|cat| l.has_category(cat)));
            if shipped_module_data(name) || allowed_by_name || by_category {
                Verdict::Allow
            } else {
                deny(Reason::UnknownModule)
            }
        } else if l.spec.flags.contains(Flags::ADMIN)
            || l.spec.acl.contains(AclCategories::DANGEROUS)
        {
            if allowed_by_name {
                Verdict::Allow
            } else {
                deny(Reason::Unclassified)
            }
        } else {
            Verdict::Allow
        }
    }
}

/// Look up and decide, resolving names the built-in table lacks in the backend's
/// metadata (`catalog` is called only for those).
pub fn decide_with(
    policy: &Policy,
    req: &Request,
    catalog: impl FnOnce() -> Option<Arc<Catalog>>,
) -> (Lookup, Option<Verdict>) {
    let (lookup, verdict) = decide(policy, req);
    if matches!(lookup, Lookup::Known(_)) {
        return (lookup, verdict);
    }
    let Some(catalog) = catalog() else {
        return (lookup, verdict);
    };
    match catalog.find(req.arg(0).unwrap_or_default(), req.arg(1)) {
        Found::Command(l) => (Lookup::Known(&l.spec), Some(policy.check_learned(l))),
        Found::UnknownSubcommand(l) => (Lookup::UnknownSubcommand(&l.spec), None),
        Found::Missing => (lookup, verdict),
    }
}

/// True when a Lua script's text calls `CLUSTER` with a literal command name
/// (`redis.call('cluster', ...)`, `server.pcall("CLUSTER", ...)`, `[[cluster]]`): Redis
/// runs CLUSTER MEET/ADDSLOTS/... from scripts (they are not `noscript`). A name built at
/// run time is not visible here; README: `protection.scripts = "deny"` or a backend ACL
/// without `+cluster` close that.
fn script_calls_cluster(body: &[u8]) -> bool {
    let mut rest = body;
    while let Some(at) = find_ci(rest, b"call") {
        rest = &rest[at + 4..];
        let mut s = skip_ws(rest);
        if let Some(after) = s.strip_prefix(b"(") {
            s = skip_ws(after);
        }
        let s = match s.first() {
            Some(b'\'' | b'"') => &s[1..],
            Some(b'[') => {
                let t = &s[1..];
                let eqs = t.iter().take_while(|&&b| b == b'=').count();
                match t.get(eqs) {
                    Some(b'[') => &t[eqs + 1..],
                    _ => continue,
                }
            }
            _ => continue,
        };
        let word_ends = s
            .get(7)
            .map_or(true, |b| !b.is_ascii_alphanumeric() && *b != b'_');
        if s.len() >= 7 && s[..7].eq_ignore_ascii_case(b"cluster") && word_ends {
            return true;
        }
    }
    false
}

fn skip_ws(s: &[u8]) -> &[u8] {
    let n = s.iter().take_while(|b| b.is_ascii_whitespace()).count();
    &s[n..]
}

/// Position of `needle` (lowercase ASCII) in `hay`, ASCII case-insensitively.
fn find_ci(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
}

/// Look up and decide in one step; `None` for unknown commands/subcommands (the caller
/// answers them with Redis's own "unknown command" texts).
pub fn decide(policy: &Policy, req: &Request) -> (Lookup, Option<Verdict>) {
    let lookup = command::lookup(req.arg(0).unwrap_or_default(), req.arg(1));
    let verdict = match lookup {
        Lookup::Known(spec) => Some(policy.check(spec, req)),
        _ => None,
    };
    (lookup, verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(policy: &Policy, args: &[&str]) -> Option<Verdict> {
        decide(policy, &Request::from_args(args)).1
    }

    fn denied(policy: &Policy, args: &[&str]) -> bool {
        matches!(verdict(policy, args), Some(Verdict::Deny { .. }))
    }

    #[test]
    fn the_denied_filter_never_hides_a_refusal() {
        let cfg = ProtectionConfig {
            deny: vec!["@dangerous".into(), "get".into(), "client|list".into()],
            ..ProtectionConfig::default()
        };
        for policy in [Policy::new(&ProtectionConfig::default()), Policy::new(&cfg)] {
            let policy = policy.unwrap();
            let mut specs: Vec<&'static CommandSpec> = command::all().collect();
            specs.extend(command::all().flat_map(|s| s.subcommands.iter()));
            let mut denied = 0;
            for spec in specs {
                let want = policy.denied.get(&key(spec));
                denied += usize::from(want.is_some());
                assert_eq!(policy.denied_reason(spec), want, "{}", spec.name);
            }
            assert!(denied > 10, "{denied}");
        }
    }

    #[test]
    fn default_refuses_the_takeover_set() {
        let p = Policy::new(&ProtectionConfig::default()).unwrap();
        for args in [
            &["SLAVEOF", "127.0.0.1", "1"][..],
            &["replicaof", "no", "one"],
            &["CONFIG", "SET", "dir", "/tmp"],
            &["config", "rewrite"],
            &["MODULE", "LOAD", "/x.so"],
            &["module", "unload", "x"],
            &["DEBUG", "SEGFAULT"],
            &["SHUTDOWN"],
            &["SAVE"],
            &["BGSAVE"],
            &["ACL", "SETUSER", "x"],
            &["CLIENT", "KILL", "ID", "1"],
            &["CLIENT", "LIST"],
            &["MONITOR"],
            &["SLOWLOG", "GET"],
            &["FLUSHALL"],
            &["FLUSHDB"],
            &["SWAPDB", "0", "1"],
            &["FUNCTION", "LOAD", "x"],
            &["SCRIPT", "DEBUG", "YES"],
            &["CONFIG", "GET", "dir"],
            &["CONFIG", "GET", "*"],
            &[
                "CONFIG",
                "SET",
                "notify-keyspace-events",
                "KEA",
                "dir",
                "/tmp",
            ],
            &["CONFIG", "SET", "notify-keyspace-events", "bad;"],
            &["SYNC"],
            &["PSYNC", "?", "-1"],
            &["FAILOVER"],
        ] {
            assert!(denied(&p, args), "{args:?} should be refused");
        }
    }

    #[test]
    fn default_allows_what_clients_send() {
        let p = Policy::new(&ProtectionConfig::default()).unwrap();
        for args in [
            &["HELLO", "3"][..],
            &["CLIENT", "SETNAME", "x"],
            &["CLIENT", "SETINFO", "LIB-NAME", "x"],
            &["client", "id"],
            &["SELECT", "1"],
            &["INFO"],
            &["PING"],
            &["COMMAND"],
            &["CONFIG", "GET", "notify-keyspace-events"],
            &["CONFIG", "SET", "notify-keyspace-events", "Egx"],
            &["ACL", "WHOAMI"],
            &["MODULE", "LIST"],
            &["COMMAND", "DOCS", "get"],
            &["GET", "k"],
            &["SET", "k", "v"],
            &["EVAL", "return 1", "0"],
            &["ROLE"],
        ] {
            assert_eq!(verdict(&p, args), Some(Verdict::Allow), "{args:?}");
        }
    }

    #[test]
    fn cluster_control_is_refused_and_cannot_be_allowed() {
        let p = Policy::new(&ProtectionConfig::default()).unwrap();
        for args in [
            &["CLUSTER", "MEET", "127.0.0.1", "7000"][..],
            &["cluster", "forget", "abc"],
            &["CLUSTER", "REPLICATE", "abc"],
            &["CLUSTER", "RESET", "HARD"],
            &["CLUSTER", "FAILOVER", "TAKEOVER"],
            &["CLUSTER", "SETSLOT", "1", "NODE", "abc"],
            &["CLUSTER", "ADDSLOTS", "1"],
            &["CLUSTER", "ADDSLOTSRANGE", "0", "100"],
            &["CLUSTER", "DELSLOTS", "1"],
            &["CLUSTER", "DELSLOTSRANGE", "0", "100"],
            &["CLUSTER", "FLUSHSLOTS"],
            &["CLUSTER", "FLUSHSLOT", "1"],
            &["CLUSTER", "BUMPEPOCH"],
            &["CLUSTER", "SET-CONFIG-EPOCH", "5"],
            &["CLUSTER", "SAVECONFIG"],
            &["CLUSTER", "MIGRATION", "IMPORT", "0", "100"],
            &[
                "CLUSTER",
                "MIGRATESLOTS",
                "SLOTSRANGE",
                "0",
                "1",
                "NODE",
                "x",
            ],
            &["CLUSTER", "CANCELSLOTMIGRATIONS"],
            &["CLUSTER", "SYNCSLOTS", "x"],
            &[
                "EVAL",
                "return redis.call('cluster','meet','1.2.3.4','1')",
                "0",
            ],
            &[
                "EVAL_RO",
                "return server.pcall ( \"CLUSTER\", 'addslots', 1)",
                "0",
            ],
            &["SCRIPT", "LOAD", "redis.call([[Cluster]], 'reset')"],
        ] {
            let v = verdict(&p, args);
            assert!(
                matches!(
                    v,
                    Some(Verdict::Deny {
                        reason: Reason::Cluster,
                        ..
                    })
                ),
                "{args:?}: {v:?}"
            );
        }
        for args in [
            &["CLUSTER", "INFO"][..],
            &["CLUSTER", "NODES"],
            &["cluster", "slots"],
            &["CLUSTER", "SHARDS"],
            &["CLUSTER", "MYID"],
            &["CLUSTER", "KEYSLOT", "k"],
            &["CLUSTER", "COUNTKEYSINSLOT", "1"],
            &["CLUSTER", "GETKEYSINSLOT", "1", "10"],
            &["CLUSTER", "SLOT-STATS", "SLOTSRANGE", "0", "1"],
            &["EVAL", "return redis.call('get', 'cluster:1')", "0"],
            &["EVAL", "return redis.call('clusters')", "0"],
        ] {
            assert_eq!(verdict(&p, args), Some(Verdict::Allow), "{args:?}");
        }
        for entry in ["cluster|meet", "cluster", "cluster|*"] {
            let cfg = ProtectionConfig {
                allow: vec![entry.into()],
                ..ProtectionConfig::default()
            };
            assert!(Policy::new(&cfg).is_err(), "{entry}");
        }
    }

    /// A catalog as a backend with these commands would report them (RESP2 `COMMAND`):
    /// (name, flags, categories, subcommands as (name, flags)).
    /// (name, flags, categories, subcommands as (name, flags)).
    type Reported<'a> = (
        &'a str,
        &'a [&'a str],
        &'a [&'a str],
        &'a [(&'a str, &'a [&'a str])],
    );

    fn catalog(cmds: &[Reported<'_>]) -> Arc<Catalog> {
        fn entry(name: &str, flags: &[&str], cats: &[&str], subs: &[String]) -> String {
            let mut s = format!(
                "*10\r\n${}\r\n{name}\r\n:-1\r\n*{}\r\n",
                name.len(),
                flags.len()
            );
            for f in flags {
                s += &format!("+{f}\r\n");
            }
            s += &format!(":1\r\n:1\r\n:1\r\n*{}\r\n", cats.len());
            for c in cats {
                s += &format!("${}\r\n{c}\r\n", c.len());
            }
            s += &format!("*0\r\n*0\r\n*{}\r\n{}", subs.len(), subs.concat());
            s
        }
        let body: Vec<String> = cmds
            .iter()
            .map(|(name, flags, cats, subs)| {
                let subs: Vec<String> = subs
                    .iter()
                    .map(|(sub, f)| entry(&format!("{name}|{sub}"), f, cats, &[]))
                    .collect();
                entry(name, flags, cats, &subs)
            })
            .collect();
        let bytes = format!("*{}\r\n{}", body.len(), body.concat());
        let mut buf = bytes::BytesMut::from(bytes.as_bytes());
        let reply = crate::protocol::ReplyScanner::new(crate::protocol::ReplyLimits::default())
            .next(&mut buf)
            .unwrap()
            .unwrap();
        Arc::new(Catalog::from_reply(&reply, None).unwrap())
    }

    fn learned_verdict(p: &Policy, c: &Arc<Catalog>, args: &[&str]) -> Option<Verdict> {
        decide_with(p, &Request::from_args(args), || Some(c.clone())).1
    }

    #[test]
    fn learned_commands_get_a_static_verdict() {
        let m: &[&str] = &["write", "module"];
        let r: &[&str] = &["readonly", "module"];
        let c = catalog(&[
            ("json.set", m, &["@write", "@json"], &[]),
            ("json.debug", r, &["@json"], &[("memory", r)]),
            ("ft.search", r, &["@read", "@search"], &[]),
            ("ft.config", r, &["@search"], &[("set", m), ("get", r)]),
            ("ft._list", r, &["@search"], &[]),
            ("_ft.safeadd", m, &["@search"], &[]),
            ("search.clusterset", r, &[], &[]),
            ("ts.add", m, &["@timeseries"], &[]),
            ("bf.add", m, &["@bloom"], &[]),
            ("bf.debug", r, &["@bloom"], &[]),
            ("cms.incrby", m, &[], &[]),
            ("topk.add", m, &[], &[]),
            ("tdigest.add", m, &[], &[]),
            ("vadd", m, &["@write"], &[]),
            ("vsim", r, &["@read"], &[]),
            ("system.exec", r, &["@read"], &[]),
            ("other.cmd", m, &["@other"], &[("config", m)]),
            ("delifeq", &["write", "fast"], &["@write", "@string"], &[]),
            ("newadmin", &["admin"], &["@admin", "@dangerous"], &[]),
            ("newsub", &["pubsub"], &["@pubsub"], &[]),
            ("cluster", &[], &[], &[("brandnew", &["stale"])]),
            ("config", &[], &[], &[("brandnew", &["readonly"])]),
            (
                "client",
                &[],
                &[],
                &[("maint_notifications", &["noscript"])],
            ),
        ]);
        let p = Policy::new(&ProtectionConfig::default()).unwrap();
        let allowed =
            |p: &Policy, args: &[&str]| learned_verdict(p, &c, args) == Some(Verdict::Allow);
        let refused = |p: &Policy, args: &[&str], want: Reason| matches!(learned_verdict(p, &c, args), Some(Verdict::Deny { reason, .. }) if reason == want);
        for args in [
            &["JSON.SET", "k", "$", "1"][..],
            &["ft.search", "idx", "*"],
            &["FT._LIST"],
            &["TS.ADD", "t", "*", "1"],
            &["BF.ADD", "b", "x"],
            &["CMS.INCRBY", "c", "x", "1"],
            &["TOPK.ADD", "t", "x"],
            &["TDIGEST.ADD", "t", "1"],
            &["VADD", "v", "VALUES", "1", "1", "e"],
            &["vsim", "v", "ELE", "e"],
            &["DELIFEQ", "k", "v"],
            &["CLIENT", "MAINT_NOTIFICATIONS", "on"],
        ] {
            assert!(
                allowed(&p, args),
                "{args:?}: {:?}",
                learned_verdict(&p, &c, args)
            );
        }
        for (args, reason) in [
            (&["JSON.DEBUG", "MEMORY", "k"][..], Reason::ModuleControl),
            (&["FT.CONFIG", "SET", "TIMEOUT", "1"], Reason::ModuleControl),
            (&["FT.CONFIG", "GET", "*"], Reason::ModuleControl),
            (&["_FT.SAFEADD", "x"], Reason::ModuleControl),
            (&["SEARCH.CLUSTERSET", "x"], Reason::ModuleControl),
            (&["BF.DEBUG", "b"], Reason::ModuleControl),
            (&["system.exec", "id"], Reason::UnknownModule),
            (&["other.cmd", "config", "x"], Reason::ModuleControl),
            (&["newadmin"], Reason::Unclassified),
            (&["newsub", "x"], Reason::UnaccountedReplies),
            (&["CLUSTER", "BRANDNEW"], Reason::Cluster),
            (&["CONFIG", "BRANDNEW"], Reason::Configuration),
        ] {
            assert!(
                refused(&p, args, reason),
                "{args:?}: {:?}",
                learned_verdict(&p, &c, args)
            );
        }
        // Not learned, not built in: no verdict (Redis's "unknown command" text).
        assert_eq!(learned_verdict(&p, &c, &["nope.cmd"]), None);

        // Allowed by name or by the module's category; control stays refused unless
        // named exactly; built-in deny categories apply to learned commands.
        let cfg = |allow: &[&str], deny: &[&str]| ProtectionConfig {
            allow: allow.iter().map(|s| s.to_string()).collect(),
            deny: deny.iter().map(|s| s.to_string()).collect(),
            ..ProtectionConfig::default()
        };
        let by_name = Policy::new(&cfg(&["system.exec", "newadmin", "other.cmd"], &[])).unwrap();
        assert!(allowed(&by_name, &["system.exec", "id"]));
        assert!(allowed(&by_name, &["newadmin"]));
        assert!(refused(
            &by_name,
            &["other.cmd", "config", "x"],
            Reason::ModuleControl
        ));
        let json = Policy::new(&cfg(&[], &["@json"])).unwrap();
        assert!(refused(
            &json,
            &["JSON.SET", "k", "$", "1"],
            Reason::Operator
        ));
        assert!(allowed(&json, &["FT.SEARCH", "i", "*"]));
        let by_cat = Policy::new(&cfg(&["@other", "@json"], &[])).unwrap();
        assert!(refused(
            &by_cat,
            &["system.exec", "id"],
            Reason::UnknownModule
        ));
        assert!(refused(
            &by_cat,
            &["other.cmd", "config", "x"],
            Reason::ModuleControl
        ));
        assert!(refused(
            &by_cat,
            &["JSON.DEBUG", "MEMORY", "k"],
            Reason::ModuleControl
        ));
        let exact = Policy::new(&cfg(&["other.cmd|config", "ft.config|get"], &[])).unwrap();
        assert!(allowed(&exact, &["other.cmd", "config", "x"]));
        assert!(allowed(&exact, &["FT.CONFIG", "GET", "*"]));
        assert!(refused(
            &exact,
            &["FT.CONFIG", "SET", "x", "1"],
            Reason::ModuleControl
        ));
        let deny_write = Policy::new(&cfg(&[], &["@write"])).unwrap();
        assert!(refused(
            &deny_write,
            &["DELIFEQ", "k", "v"],
            Reason::Operator
        ));
        assert!(refused(
            &deny_write,
            &["JSON.SET", "k", "$", "1"],
            Reason::Operator
        ));
        // The takeover set still cannot be allowed, and deny names must be commands.
        assert!(Policy::new(&cfg(&["cluster|meet"], &[])).is_err());
        assert!(Policy::new(&cfg(&[], &["json.set"])).is_err());
    }

    #[test]
    fn unknown_commands_have_no_verdict() {
        let p = Policy::default();
        let (lookup, v) = decide(&p, &Request::from_args(&["system.exec", "id"]));
        assert!(matches!(lookup, Lookup::UnknownCommand));
        assert_eq!(v, None);
    }

    #[test]
    fn operator_rules_apply() {
        let cfg = ProtectionConfig {
            deny: vec!["keys".into(), "@hyperloglog".into()],
            allow: vec!["flushdb".into()],
            scripts: ScriptPolicy::Readonly,
            ..ProtectionConfig::default()
        };
        let p = Policy::new(&cfg).unwrap();
        assert!(denied(&p, &["KEYS", "*"]));
        assert!(denied(&p, &["PFADD", "h", "a"]));
        assert!(!denied(&p, &["FLUSHDB"]));
        assert!(denied(&p, &["FLUSHALL"]));
        assert!(denied(&p, &["EVAL", "return 1", "0"]));
        assert!(!denied(&p, &["EVAL_RO", "return 1", "0"]));
    }

    #[test]
    fn takeover_set_cannot_be_allowed() {
        for entry in ["slaveof", "config|set", "module", "@admin"] {
            let cfg = ProtectionConfig {
                allow: vec![entry.into()],
                ..ProtectionConfig::default()
            };
            assert!(Policy::new(&cfg).is_err(), "{entry}");
        }
        let cfg = ProtectionConfig {
            deny: vec!["nosuchcommand".into()],
            ..ProtectionConfig::default()
        };
        assert!(Policy::new(&cfg).is_err());
    }
}
