// node-redis (RESP3 with client-side caching) and ioredis through the proxy binary, in
// front of a redis-server on loopback ephemeral ports. Run: bash scripts/node-test.sh
// (PORTCULLIS_BIN picks the binary; default target/debug/portcullis).
import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { createServer, connect } from "node:net";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { createClient, BasicClientSideCache } from "redis";
import Redis from "ioredis";

const WAIT_MS = 10_000;
const bin = process.env.PORTCULLIS_BIN ?? resolve(import.meta.dirname, "../../target/debug/portcullis");
const children = [];
let redisPort;
let proxyPort;

function freePort() {
  return new Promise((res, rej) => {
    const s = createServer();
    s.once("error", rej);
    s.listen(0, "127.0.0.1", () => {
      const { port } = s.address();
      s.close(() => res(port));
    });
  });
}

/** One RESP exchange on a fresh socket: resolves with the first reply line. */
function rawLine(port, command) {
  return new Promise((res) => {
    const sock = connect(port, "127.0.0.1");
    let buf = "";
    const done = (v) => {
      sock.destroy();
      res(v);
    };
    sock.setTimeout(1000, () => done(null));
    sock.on("error", () => done(null));
    sock.on("connect", () => sock.write(command));
    sock.on("data", (d) => {
      buf += d.toString("latin1");
      const i = buf.indexOf("\r\n");
      if (i >= 0) done(buf.slice(0, i));
    });
  });
}

async function waitFor(what, check) {
  const deadline = Date.now() + WAIT_MS;
  while (Date.now() < deadline) {
    if (await check()) return;
    await new Promise((r) => setTimeout(r, 20));
  }
  throw new Error(`timed out: ${what}`);
}

async function httpStatus(port, path) {
  try {
    const r = await fetch(`http://127.0.0.1:${port}${path}`);
    return r.status;
  } catch {
    return 0;
  }
}

before(async () => {
  redisPort = await freePort();
  const dir = mkdtempSync(join(tmpdir(), "portcullis-node-"));
  children.push(
    spawn("redis-server", ["--port", String(redisPort), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", dir], {
      stdio: "ignore",
    }),
  );
  await waitFor("redis-server answers", async () => (await rawLine(redisPort, "PING\r\n")) === "+PONG");
  proxyPort = await freePort();
  const adminPort = await freePort();
  const config = join(dir, "portcullis.toml");
  writeFileSync(
    config,
    `listen = "127.0.0.1:${proxyPort}"\n[admin]\nlisten = "127.0.0.1:${adminPort}"\n` +
      `[log]\nlevel = "warn"\n[[backends]]\naddress = "127.0.0.1:${redisPort}"\n`,
  );
  const proxy = spawn(bin, ["--config", config], { stdio: ["ignore", "ignore", "inherit"] });
  children.push(proxy);
  await waitFor("the proxy is ready", async () => (await httpStatus(adminPort, "/readyz")) === 200);
});

after(() => {
  for (const c of children) c.kill("SIGKILL");
});

test("node-redis RESP3 with client-side caching: hits, then invalidation by another client", async () => {
  const cache = new BasicClientSideCache({ ttl: 0, maxEntries: 0, evictPolicy: "LRU" });
  const client = createClient({ url: `redis://127.0.0.1:${proxyPort}`, RESP: 3, clientSideCache: cache });
  const writer = createClient({ url: `redis://127.0.0.1:${proxyPort}` });
  client.on("error", () => {});
  writer.on("error", () => {});
  await client.connect();
  await writer.connect();
  try {
    await writer.set("node:csc", "v1");
    assert.equal(await client.get("node:csc"), "v1");
    assert.equal(await client.get("node:csc"), "v1");
    assert.ok(cache.stats().hitCount >= 1, `a cache hit: ${JSON.stringify(cache.stats())}`);
    await writer.set("node:csc", "v2");
    // The invalidation push must reach the client through the proxy: the cached v1 goes.
    await waitFor("the cached value is invalidated", async () => (await client.get("node:csc")) === "v2");
    // Other commands on the tracking connection still work (pipelined and MULTI).
    const [a, b] = await Promise.all([client.incr("node:n"), client.incr("node:n")]);
    assert.deepEqual([a, b], [1, 2]);
    const replies = await client.multi().set("node:m", "1").get("node:m").exec();
    assert.deepEqual(replies, ["OK", "1"]);
  } finally {
    await client.quit().catch(() => {});
    await writer.quit().catch(() => {});
  }
});

test("node-redis client-side cache is not left stale when the backend link is lost", async () => {
  const cache = new BasicClientSideCache({ ttl: 0, maxEntries: 0, evictPolicy: "LRU" });
  const client = createClient({ url: `redis://127.0.0.1:${proxyPort}`, RESP: 3, clientSideCache: cache });
  client.on("error", () => {});
  await client.connect();
  try {
    assert.equal(await rawLine(proxyPort, "SET node:lost v1\r\n"), "+OK");
    assert.equal(await client.get("node:lost"), "v1");
    assert.equal(await client.get("node:lost"), "v1");
    // Redis drops every normal connection (the proxy's links among them): the tracking
    // table of the client's link is gone, so the proxy must close the client (as Redis
    // would), and node-redis reconnects with an empty cache.
    const killed = await rawLine(redisPort, "CLIENT KILL TYPE normal SKIPME yes\r\n");
    assert.match(killed ?? "", /^:[1-9]/);
    await waitFor("a write through the proxy after the kill", async () =>
      (await rawLine(proxyPort, "SET node:lost v2\r\n")) === "+OK",
    );
    await waitFor("the client sees v2, not its stale cached v1", async () => {
      try {
        return (await client.get("node:lost")) === "v2";
      } catch {
        return false;
      }
    });
  } finally {
    await client.quit().catch(() => {});
  }
});

test("node-redis pub/sub through the proxy", async () => {
  const sub = createClient({ url: `redis://127.0.0.1:${proxyPort}` });
  const pub = createClient({ url: `redis://127.0.0.1:${proxyPort}` });
  sub.on("error", () => {});
  pub.on("error", () => {});
  await sub.connect();
  await pub.connect();
  try {
    const got = new Promise((res) => sub.subscribe("node:chan", (message) => res(message)));
    await waitFor("subscribed", async () => (await pub.publish("node:chan", "hello")) === 1);
    assert.equal(await got, "hello");
  } finally {
    await sub.quit().catch(() => {});
    await pub.quit().catch(() => {});
  }
});

test("ioredis through the proxy: commands, pipeline, MULTI, pub/sub", async () => {
  const r = new Redis({ host: "127.0.0.1", port: proxyPort, lazyConnect: true, maxRetriesPerRequest: 1 });
  const sub = new Redis({ host: "127.0.0.1", port: proxyPort, lazyConnect: true, maxRetriesPerRequest: 1 });
  r.on("error", () => {});
  sub.on("error", () => {});
  await r.connect();
  await sub.connect();
  try {
    assert.equal(await r.set("io:k", "v"), "OK");
    assert.equal(await r.get("io:k"), "v");
    const pipe = await r.pipeline().incr("io:n").incr("io:n").get("io:k").exec();
    assert.deepEqual(pipe, [
      [null, 1],
      [null, 2],
      [null, "v"],
    ]);
    const multi = await r.multi().set("io:m", "1").incr("io:m").exec();
    assert.deepEqual(multi, [
      [null, "OK"],
      [null, 2],
    ]);
    await sub.subscribe("io:chan");
    const got = new Promise((res) => sub.on("message", (_ch, m) => res(m)));
    assert.equal(await r.publish("io:chan", "hi"), 1);
    assert.equal(await got, "hi");
  } finally {
    r.disconnect();
    sub.disconnect();
  }
});
