#!/usr/bin/env python3
"""Generate src/command_table.rs from Redis's own command metadata.

Usage:
  tools/gen-command-table.py --fetch [--server BIN] [--out FILE]
        start a throwaway server (redis-server, or BIN: a newer redis-server, a
        valkey-server) on a free loopback port, store its COMMAND reply as JSON in FILE
        (default tools/commands-7.0.json), stop it
  tools/gen-command-table.py [--base FILE]
        regenerate src/command_table.rs from FILE (default tools/commands-7.0.json) plus
        tools/commands-newer.json

The base JSON is the raw RESP2 reply of `COMMAND` (one array per command: name, arity,
flags, first key, last key, step, ACL categories, tips, key specs, subcommands) plus the
server version. Key specs are kept (begin_search index/keyword/unknown, find_keys
range/keynum/unknown, and the incomplete and not_key flags): cluster routing reads the
keys of `movablekeys` commands from them. Entries of tools/commands-newer.json may carry
`key_specs` in the same flat shape; without them only the legacy range is known. Its ACL categories are the effective ones (the file's acl_categories plus
the implicit ones Redis derives from flags). Core commands added after the base server
come from tools/commands-newer.json: data taken from redis/redis src/commands/*.json of
the release that added them and from valkey-server 9.1.2's COMMAND, each entry naming its
source.

Newer metadata is accepted: module commands (flag `module`) are skipped (the proxy
learns them from each backend and its policy names them); ACL categories and flags this
script does not know are reported and dropped, so a newer server's dump still generates.
"""

import json
import re
import os
import shutil
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tools", "commands-7.0.json")
NEWER = os.path.join(ROOT, "tools", "commands-newer.json")
OUT = os.path.join(ROOT, "src", "command_table.rs")

# ---------------------------------------------------------------------------------------
# Fetching (needs redis-server on PATH; no third-party Python packages)
# ---------------------------------------------------------------------------------------


def _read_line(f):
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise IOError("connection closed mid-reply")
    return line[:-2]


def _read_reply(f):
    line = _read_line(f)
    kind, rest = line[:1], line[1:]
    if kind == b"+":
        return rest.decode()
    if kind == b"-":
        raise RuntimeError(rest.decode())
    if kind == b":":
        return int(rest)
    if kind == b"$":
        n = int(rest)
        if n < 0:
            return None
        data = f.read(n + 2)
        return data[:-2].decode()
    if kind == b"*":
        n = int(rest)
        if n < 0:
            return None
        return [_read_reply(f) for _ in range(n)]
    raise IOError("unexpected RESP type %r" % kind)


def _command(sock_file, *args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a.encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    sock_file.write(out)
    sock_file.flush()
    return _read_reply(sock_file)


def fetch(server="redis-server", out_path=DATA):
    server = shutil.which(server)
    if server is None:
        sys.exit("server binary not found")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--daemonize", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        sock = None
        for _ in range(100):
            try:
                sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                break
            except OSError:
                time.sleep(0.05)
        if sock is None:
            sys.exit("redis-server did not start")
        f = sock.makefile("rwb")
        version = None
        for line in _command(f, "INFO", "server").splitlines():
            if line.startswith("redis_version:") and version is None:
                version = line.split(":", 1)[1]
            if line.startswith("valkey_version:"):
                version = "valkey " + line.split(":", 1)[1]
        commands = _command(f, "COMMAND")
        sock.close()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    commands.sort(key=lambda c: c[0])
    with open(out_path, "w") as out:
        json.dump({"redis_version": version, "command": commands}, out, indent=1, sort_keys=False)
        out.write("\n")
    print("stored %d commands from %s in %s" % (len(commands), version, out_path))


# ---------------------------------------------------------------------------------------
# Hand-written additions (NOT fetched): flags that COMMAND does not report. Newer
# commands are data, in tools/commands-newer.json.
# ---------------------------------------------------------------------------------------

# Flags present in Redis's JSON files but not reported by COMMAND (7.0 omits "protected",
# "may_replicate", "module", "sentinel", "only_sentinel"). PROTECTED is the one that matters
# here: DEBUG and MODULE LOAD/LOADEX/UNLOAD are gated by enable-debug-command /
# enable-module-command (redis 7.0 src/commands/debug.json, module-load*.json, module-unload.json).
EXTRA_FLAGS = {
    "debug": ["protected"],
    "module|load": ["protected"],
    "module|loadex": ["protected"],
    "module|unload": ["protected"],
}

# The proxy's own behaviour tags (not Redis metadata).
SPECIAL = {
    "subscribe": "Special::Subscribe(PubSubKind::Channel)",
    "psubscribe": "Special::Subscribe(PubSubKind::Pattern)",
    "ssubscribe": "Special::Subscribe(PubSubKind::Shard)",
    "unsubscribe": "Special::Unsubscribe(PubSubKind::Channel)",
    "punsubscribe": "Special::Unsubscribe(PubSubKind::Pattern)",
    "sunsubscribe": "Special::Unsubscribe(PubSubKind::Shard)",
    "multi": "Special::Multi",
    "exec": "Special::Exec",
    "discard": "Special::Discard",
    "watch": "Special::Watch",
    "unwatch": "Special::Unwatch",
    "select": "Special::Select",
    "hello": "Special::Hello",
    "auth": "Special::Auth",
    "reset": "Special::Reset",
    "quit": "Special::Quit",
    "client|reply": "Special::ClientReply",
    "client|setname": "Special::ClientSetName",
    "client|setinfo": "Special::ClientSetInfo",
    "client|no-evict": "Special::ClientNoEvict",
    "client|no-touch": "Special::ClientNoTouch",
    "client|tracking": "Special::ClientTracking",
    "readonly": "Special::ReadOnly",
    "readwrite": "Special::ReadWrite",
    "monitor": "Special::Monitor",
    "ping": "Special::Ping",
}

# ---------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------

FLAG_CONST = {
    "write": "WRITE", "readonly": "READONLY", "denyoom": "DENYOOM", "module": "MODULE",
    "admin": "ADMIN", "pubsub": "PUBSUB", "noscript": "NOSCRIPT", "blocking": "BLOCKING",
    "loading": "LOADING", "stale": "STALE", "skip_monitor": "SKIP_MONITOR",
    "skip_slowlog": "SKIP_SLOWLOG", "asking": "ASKING", "fast": "FAST", "no_auth": "NO_AUTH",
    "may_replicate": "MAY_REPLICATE", "sentinel": "SENTINEL", "only_sentinel": "ONLY_SENTINEL",
    "no_mandatory_keys": "NO_MANDATORY_KEYS", "protected": "PROTECTED",
    "movablekeys": "MOVABLE_KEYS", "no_multi": "NO_MULTI",
    "no_async_loading": "NO_ASYNC_LOADING", "allow_busy": "ALLOW_BUSY",
    # Newer servers: Valkey 8+ (commandlog), Redis 8 (cross-slot key access).
    "skip_commandlog": "SKIP_COMMANDLOG", "touches_arbitrary_keys": "TOUCHES_ARBITRARY_KEYS",
}

ACL_NAMES = [
    "keyspace", "read", "write", "set", "sortedset", "list", "hash", "string", "bitmap",
    "hyperloglog", "geo", "stream", "pubsub", "admin", "fast", "slow", "blocking",
    "dangerous", "connection", "transaction", "scripting",
    # Redis 8's shipped modules (module commands are not in the table, but the names are
    # known categories for protection.allow/deny).
    "json", "search", "timeseries", "bloom", "cuckoo", "cms", "topk", "tdigest",
]

UNKNOWN_SEEN = set()


def known_only(kind, names, table, entry):
    """Keep the names this script knows; report the others once (newer metadata)."""
    out = []
    for n in names:
        if n in table:
            out.append(n)
        elif (kind, n) not in UNKNOWN_SEEN:
            UNKNOWN_SEEN.add((kind, n))
            print("note: dropping unknown %s %r (first on %s)" % (kind, n, entry), file=sys.stderr)
    return out


def effective_acl(flags, file_cats):
    """Redis's setImplicitACLCategories() (src/server.c)."""
    cats = set(c.lower().lstrip("@") for c in file_cats)
    if "write" in flags:
        cats.add("write")
    if "readonly" in flags and "scripting" not in cats:
        cats.add("read")
    if "admin" in flags:
        cats.update(["admin", "dangerous"])
    if "pubsub" in flags:
        cats.add("pubsub")
    if "fast" in flags:
        cats.add("fast")
    if "blocking" in flags:
        cats.add("blocking")
    if "fast" not in cats:
        cats.add("slow")
    return ["@" + c for c in cats]


def _pairs(flat):
    """A RESP2 map as COMMAND sends it (a flat [name, value, ...] list) as a dict."""
    return dict(zip(flat[::2], flat[1::2]))


def key_specs(raw, entry):
    """COMMAND's key specs (Redis src/server.c addReplyCommandKeySpecs) as
    (begin_search, find_keys, incomplete, not_key) tuples of Rust expressions."""
    out = []
    for flat in raw:
        spec = _pairs(flat)
        flags = [f.lower() for f in spec.get("flags", [])]
        bs = _pairs(spec["begin_search"])
        bs_spec = _pairs(bs.get("spec", []))
        if bs["type"] == "index":
            begin = "BeginSearch::Index(%d)" % bs_spec["index"]
        elif bs["type"] == "keyword":
            begin = "BeginSearch::Keyword { keyword: %s, startfrom: %d }" % (
                json.dumps(bs_spec["keyword"]), bs_spec["startfrom"])
        else:
            if bs["type"] != "unknown":
                print("note: unknown begin_search %r on %s" % (bs["type"], entry),
                      file=sys.stderr)
            begin = "BeginSearch::Unknown"
        fk = _pairs(spec["find_keys"])
        fk_spec = _pairs(fk.get("spec", []))
        if fk["type"] == "range":
            find = "FindKeys::Range { lastkey: %d, keystep: %d, limit: %d }" % (
                fk_spec["lastkey"], fk_spec["keystep"], fk_spec["limit"])
        elif fk["type"] == "keynum":
            find = "FindKeys::Keynum { keynumidx: %d, firstkey: %d, keystep: %d }" % (
                fk_spec["keynumidx"], fk_spec["firstkey"], fk_spec["keystep"])
        else:
            if fk["type"] != "unknown":
                print("note: unknown find_keys %r on %s" % (fk["type"], entry),
                      file=sys.stderr)
            find = "FindKeys::Unknown"
        out.append((begin, find, "incomplete" in flags, "not_key" in flags))
    return out


def load(base=DATA):
    with open(base) as f:
        data = json.load(f)
    table = {}
    for c in data["command"]:
        if "module" in c[2]:
            continue
        table[c[0]] = {
            "name": c[0], "arity": c[1], "flags": list(c[2]), "first": c[3], "last": c[4],
            "step": c[5], "acl": list(c[6]), "tips": list(c[7]),
            "key_specs": key_specs(c[8], c[0]), "subs": {
                s[0]: {"name": s[0], "arity": s[1], "flags": list(s[2]), "first": s[3],
                       "last": s[4], "step": s[5], "acl": list(s[6]), "tips": list(s[7]),
                       "key_specs": key_specs(s[8], s[0]), "subs": {}}
                for s in c[9]
            },
        }
    # Self-check of effective_acl(): Redis's effective categories are a fixed point of it.
    for top in table.values():
        for entry in [top] + list(top["subs"].values()):
            if set(effective_acl(entry["flags"], entry["acl"])) != set(entry["acl"]):
                sys.exit("effective_acl() disagrees with Redis on %s" % entry["name"])
    with open(NEWER) as f:
        newer_data = json.load(f)
    newer = newer_data["command"]
    for n in newer:
        name = n["name"]
        flags = [f.lower() for f in n["command_flags"]]
        entry = {"name": name, "arity": n["arity"], "flags": flags, "first": n["first_key"],
                 "last": n["last_key"], "step": n["step"],
                 "acl": effective_acl(flags, n["acl_categories"]),
                 "tips": [t.lower() for t in n.get("command_tips", [])],
                 "key_specs": key_specs(n.get("key_specs", []), name), "subs": {}}
        if "|" in name:
            parent = table[name.split("|")[0]]["subs"]
        else:
            parent = table
        if name in parent:
            # A newer base dump already has it: the fetched metadata wins.
            continue
        parent[name] = entry
    # Newer releases corrected some tips (Redis 7.2+ dropped MSETNX's multi_shard: split
    # per shard it would no longer be all-or-nothing): the newer metadata wins.
    for t in newer_data.get("tips_corrections", []):
        name = t["name"]
        top = name.split("|")[0]
        entry = table[top] if "|" not in name else table[top]["subs"][name]
        entry["tips"] = [x.lower() for x in t["command_tips"]]
    for name, extra in EXTRA_FLAGS.items():
        top = name.split("|")[0]
        entry = table[top] if "|" not in name else table[top]["subs"][name]
        entry["flags"] = entry["flags"] + [f for f in extra if f not in entry["flags"]]
    return data["redis_version"], table


REQUEST_POLICY = {
    "all_nodes": "AllNodes", "all_shards": "AllShards", "multi_shard": "MultiShard",
    "special": "Special",
}
RESPONSE_POLICY = {
    "one_succeeded": "OneSucceeded", "all_succeeded": "AllSucceeded",
    "agg_logical_and": "AggLogicalAnd", "agg_logical_or": "AggLogicalOr", "agg_min": "AggMin",
    "agg_max": "AggMax", "agg_sum": "AggSum", "special": "Special",
}


def policy(tips, kind, table, entry):
    """The `request_policy:*` / `response_policy:*` tip (Redis src/commands/*.json)."""
    found = [t.split(":", 1)[1] for t in tips if t.startswith(kind + ":")]
    known = known_only(kind, found, table, entry)
    if not known:
        return "Default"
    return table[known[0]]


def rust_set(kind, consts):
    if not consts:
        return "%s::EMPTY" % kind
    return "%s::of(&[%s])" % (kind, ", ".join("%s::%s" % (kind, c) for c in consts))


def emit(entry, out, indent):
    name = entry["name"]
    if name != name.lower() or not re.fullmatch(r"[a-z0-9_|.-]+", name):
        sys.exit("odd command name %r" % name)
    flags = [FLAG_CONST[f] for f in known_only("flag", entry["flags"], FLAG_CONST, name)]
    cats = known_only("ACL category", [c.lstrip("@") for c in entry["acl"]], ACL_NAMES, name)
    cats = [c.upper() for c in ACL_NAMES if c in cats]
    pad = " " * indent
    out.append(pad + "CommandSpec {")
    out.append(pad + "    name: %s," % json.dumps(name))
    out.append(pad + "    arity: %d," % entry["arity"])
    out.append(pad + "    flags: %s," % rust_set("Flags", flags))
    out.append(pad + "    acl: %s," % rust_set("AclCategories", cats))
    out.append(pad + "    first_key: %d," % entry["first"])
    out.append(pad + "    last_key: %d," % entry["last"])
    out.append(pad + "    step: %d," % entry["step"])
    specs = entry.get("key_specs", [])
    if specs:
        out.append(pad + "    key_specs: &[")
        for begin, find, incomplete, not_key in specs:
            out.append(pad + "        KeySpec {")
            out.append(pad + "            begin_search: %s," % begin)
            out.append(pad + "            find_keys: %s," % find)
            out.append(pad + "            incomplete: %s," % ("true" if incomplete else "false"))
            out.append(pad + "            not_key: %s," % ("true" if not_key else "false"))
            out.append(pad + "        },")
        out.append(pad + "    ],")
    else:
        out.append(pad + "    key_specs: &[],")
    tips = entry.get("tips", [])
    out.append(pad + "    request_policy: RequestPolicy::%s,"
               % policy(tips, "request_policy", REQUEST_POLICY, name))
    out.append(pad + "    response_policy: ResponsePolicy::%s,"
               % policy(tips, "response_policy", RESPONSE_POLICY, name))
    out.append(pad + "    special: %s," % SPECIAL.get(name, "Special::None"))
    if entry["subs"]:
        out.append(pad + "    subcommands: &[")
        for sub in sorted(entry["subs"]):
            emit(entry["subs"][sub], out, indent + 8)
        out.append(pad + "    ],")
    else:
        out.append(pad + "    subcommands: &[],")
    out.append(pad + "},")


def generate(base=DATA):
    version, table = load(base)
    out = [
        "// @generated by tools/gen-command-table.py. Sources: %s" % os.path.relpath(base, ROOT),
        "// (COMMAND of redis-server %s); tools/commands-newer.json (core commands of" % version,
        "// Redis 7.2 to 8.4 from redis/redis src/commands/*.json, CLUSTER subcommands of",
        "// Redis 8.x and Valkey 9.1.2 from their metadata; tips_corrections: command tips",
        "// as newer Redis releases state them); the script's EXTRA_FLAGS.",
        "// Module commands are not here: they are learned from each backend at run time.",
        "// Do not edit: change the sources or the script and re-run it.",
        "",
        "use super::{",
        "    AclCategories, BeginSearch, CommandSpec, FindKeys, Flags, KeySpec, PubSubKind,",
        "    RequestPolicy, ResponsePolicy, Special,",
        "};",
        "",
        "/// Every known top-level command, sorted by name (binary search relies on it).",
        "pub(super) static COMMANDS: &[CommandSpec] = &[",
    ]
    for name in sorted(table):
        emit(table[name], out, 4)
    out.append("];")
    with open(OUT, "w") as f:
        f.write("\n".join(out) + "\n")
    rustfmt = shutil.which("rustfmt")
    if rustfmt:
        subprocess.run([rustfmt, "--edition", "2021", OUT], check=True)
    subs = sum(len(e["subs"]) for e in table.values())
    print("wrote %s: %d commands, %d subcommands" % (OUT, len(table), subs))


def _opt(name, default):
    args = sys.argv[1:]
    if name in args:
        i = args.index(name)
        if i + 1 >= len(args):
            sys.exit("%s needs a value" % name)
        return args[i + 1]
    return default


if __name__ == "__main__":
    if "--fetch" in sys.argv[1:]:
        fetch(_opt("--server", "redis-server"), _opt("--out", DATA))
    generate(_opt("--base", DATA))
