# bench.sh: helpers sourced by the measurement scripts (bench-e2e.sh, bench-cpu.sh,
# bench-cluster.sh, idle-memory.sh).
# They expect the caller to define die() and TMP (its temp dir, holding NAME.log files).

# A loopback port nothing listens on (the kernel's pick, then released).
free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# PING_ARGS: extra redis-cli flags for wait_pong (e.g. --tls --cacert FILE).
PING_ARGS=()

# wait_pong PORT PID NAME: poll PING until PONG, 20 s deadline; dies if PID exits.
wait_pong() {
  local port=$1 pid=$2 name=$3 deadline=$((SECONDS + 20))
  while (( SECONDS < deadline )); do
    kill -0 "$pid" 2>/dev/null || die "$name (pid $pid) exited; log: $(tail -5 "$TMP/$name.log" 2>/dev/null)"
    [[ "$(timeout 2 redis-cli -h 127.0.0.1 -p "$port" "${PING_ARGS[@]}" PING 2>/dev/null)" == PONG ]] && return 0
    sleep 0.05
  done
  die "$name on port $port never answered PONG"
}

# A loopback port whose cluster bus port (+10000) is free too.
cluster_port() {
  python3 -c '
import socket
while True:
    a = socket.socket(); a.bind(("127.0.0.1", 0)); p = a.getsockname()[1]
    if p + 10000 > 65535: a.close(); continue
    b = socket.socket()
    try:
        b.bind(("127.0.0.1", p + 10000))
    except OSError:
        a.close(); continue
    a.close(); b.close(); print(p); break'
}

# start_cluster N [PIN...]: N redis-server cluster masters on free loopback ports (each
# started under PIN, e.g. taskset -c 1; files in $TMP/nodeI), joined with
# `redis-cli --cluster create` (no replicas), waited for until every node says
# cluster_state:ok. Sets NODE_PIDS and NODE_ADDRS (host:port); adds the pids to PIDS.
# Extra redis-server flags: CLUSTER_NODE_ARGS (array).
start_cluster() {
  local n=$1 i port pid addr deadline
  shift
  NODE_PIDS=()
  NODE_ADDRS=()
  for ((i=0; i<n; i++)); do
    port=$(cluster_port)
    mkdir -p "$TMP/node$i"
    "$@" redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
      --cluster-enabled yes --cluster-config-file "$TMP/node$i/nodes.conf" \
      --daemonize no --dir "$TMP/node$i" --logfile "$TMP/node$i.log" \
      "${CLUSTER_NODE_ARGS[@]}" >/dev/null 2>&1 &
    pid=$!; PIDS+=("$pid"); NODE_PIDS+=("$pid"); NODE_ADDRS+=("127.0.0.1:$port")
    wait_pong "$port" "$pid" "node$i"
  done
  redis-cli --cluster create "${NODE_ADDRS[@]}" --cluster-replicas 0 --cluster-yes \
    >"$TMP/create.log" 2>&1 || die "cluster create failed: $(tail -5 "$TMP/create.log")"
  deadline=$((SECONDS + 30))
  for addr in "${NODE_ADDRS[@]}"; do
    until redis-cli -h 127.0.0.1 -p "${addr##*:}" CLUSTER INFO 2>/dev/null | grep -q 'cluster_state:ok'; do
      (( SECONDS < deadline )) || die "cluster not ok on $addr"
      sleep 0.1
    done
  done
}
CLUSTER_NODE_ARGS=()

# make_test_ca DIR: a throwaway CA (DIR/ca.pem) and a server certificate for 127.0.0.1
# and localhost (DIR/server.pem, DIR/server.key), valid one day, with openssl. For local
# measurements only.
make_test_ca() {
  local dir=$1
  command -v openssl >/dev/null || { echo "make_test_ca: needs openssl" >&2; return 1; }
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 \
    -subj /CN=portcullis-test-ca -keyout "$dir/ca.key" -out "$dir/ca.pem" 2>/dev/null || return 1
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=localhost \
    -keyout "$dir/server.key" -out "$dir/server.csr" 2>/dev/null || return 1
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost\n' >"$dir/san.ext"
  openssl x509 -req -in "$dir/server.csr" -CA "$dir/ca.pem" -CAkey "$dir/ca.key" \
    -CAcreateserial -days 1 -extfile "$dir/san.ext" -out "$dir/server.pem" 2>/dev/null
}

# stop_pid PID: TERM, wait up to 5 s, then KILL (a process this script started).
stop_pid() {
  local pid=$1 i
  kill -TERM "$pid" 2>/dev/null || return 0
  for i in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}

# set_pinning: SRV_PIN and CLI_PIN command prefixes from PIN (split | none), CPU_SERVERS
# and CPU_CLIENT, as ../shared/bench/compare.sh pins.
set_pinning() {
  case "$PIN" in
    split) command -v taskset >/dev/null || die "PIN=split needs taskset"
           SRV_PIN=(taskset -c "$CPU_SERVERS"); CLI_PIN=(taskset -c "$CPU_CLIENT") ;;
    none)  SRV_PIN=(); CLI_PIN=() ;;
    *)     die "PIN must be split or none" ;;
  esac
}

# cpu_ms PID...: utime+stime (all threads) of these processes, summed, in ms.
cpu_ms() { cpu_fields_ms "12 13" "$@"; }

# cpu_user_ms PID...: utime alone (user space: the process's own code, not the kernel's
# socket work on its behalf), summed, in ms.
cpu_user_ms() { cpu_fields_ms 12 "$@"; }

# children_cpu_ms: CHILDREN_MS = user+sys CPU (ms) of every child this shell has waited
# for so far (bash's `times`, run in this shell: in a $(...) it would see the subshell's).
# The difference around a `wait` is that child's CPU, its own children included.
children_cpu_ms() {
  times >"$TMP/times.txt"
  CHILDREN_MS=$(awk 'NR == 2 {
    t = 0
    for (i = 1; i <= 2; i++) { split($i, a, "m"); sub(/s$/, "", a[2]); t += a[1] * 60000 + a[2] * 1000 }
    printf "%.0f", t
  }' "$TMP/times.txt")
}

# cpu_fields_ms FIELDS PID...: the sum of these fields of /proc/PID/stat, counted after
# the command name (12 utime, 13 stime, in clock ticks), over the processes, in ms.
cpu_fields_ms() {
  local hz pid fields=$1; shift
  hz=$(getconf CLK_TCK 2>/dev/null || echo 100)
  for pid in "$@"; do
    awk -v hz="$hz" -v fields="$fields" '{
      sub(/^.*\) /, ""); n = split(fields, f, " "); t = 0
      for (i = 1; i <= n; i++) t += $(f[i])
      printf "%d\n", t * 1000 / hz
    }' "/proc/$pid/stat"
  done | awk '{ s += $1 } END { print s + 0 }'
}

# ctx_switches KIND PID: the process's context switches so far, all threads summed
# (/proc/PID/task/*/status): KIND "voluntary" (it went to sleep: each is one wake-up
# later) or "nonvoluntary" (the kernel preempted it).
ctx_switches() {
  cat /proc/"$2"/task/*/status 2>/dev/null \
    | awk -v k="$1" '$1 == k "_ctxt_switches:" { s += $2 } END { print s + 0 }'
}

# haproxy_config PORT REDIS_PORT: an HAProxy configuration on stdout, as
# ../shared/bench/compare.sh runs it: TCP mode, one thread, listening on 127.0.0.1:PORT,
# forwarding to the Redis on REDIS_PORT, which its tcp-check confirms as a master.
haproxy_config() {
  local port=$1 REDIS_PORT=$2
  cat <<EOF
global
    maxconn 4000
    nbthread 1
defaults
    mode tcp
    timeout connect 2s
    timeout client 1h
    timeout server 1h
    timeout check 2s
frontend redis_in
    bind 127.0.0.1:$port
    default_backend redis_master
backend redis_master
    option tcp-check
    tcp-check connect
    tcp-check send PING\r\n
    tcp-check expect string +PONG
    tcp-check send info\ replication\r\n
    tcp-check expect string role:master
    tcp-check send QUIT\r\n
    tcp-check expect string +OK
    server redis1 127.0.0.1:$REDIS_PORT check inter 1s fall 2 rise 1
EOF
}

# AWK_MED: an awk function, med(s), the median of the space-separated numbers in s. Put
# it before an awk program: awk "$AWK_MED"'...'.
AWK_MED='function med(s,   a, n, i, j, x) {
  n = split(s, a, " ")
  for (i = 2; i <= n; i++) { x = a[i]; for (j = i - 1; j >= 1 && a[j] + 0 > x + 0; j--) a[j+1] = a[j]; a[j+1] = x }
  return (n % 2) ? a[(n + 1) / 2] : (a[n/2] + a[n/2 + 1]) / 2
}
'

# cpu_table RAW TESTS TARGETS: the markdown table (medians over rounds) of RAW, whose rows
# are "round target test rps p50_ms proxy_us redis_us [proxy_user_us [client_us]]"
# (tab-separated); TESTS and TARGETS (space-separated) give the row order; target
# "direct" is the reference. With the optional fields, a "proxy user µs/req" column
# follows the proxy's total, and a "client µs/req" column (the benchmark client's own
# CPU per request: near its core's whole time per request, the client is the limit).
cpu_table() {
  awk -F'\t' -v tests="$2" -v targets="$3" "$AWK_MED"'
{ R[$1, $2, $3, "rps"] = $4; R[$1, $2, $3, "p50"] = $5; R[$1, $2, $3, "pu"] = $6; R[$1, $2, $3, "ru"] = $7; R[$1, $2, $3, "uu"] = $8; R[$1, $2, $3, "cu"] = $9; rounds[$1] = 1; if (NF >= 8) user = 1; if (NF >= 9) client = 1 }
END {
  if (client) {
    print "| test | target | rps | x direct | proxy µs/req | proxy user µs/req | redis µs/req | client µs/req | p50 µs | added p50 µs |"
    print "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
  } else if (user) {
    print "| test | target | rps | x direct | proxy µs/req | proxy user µs/req | redis µs/req | p50 µs | added p50 µs |"
    print "|---|---|---:|---:|---:|---:|---:|---:|---:|"
  } else {
    print "| test | target | rps | x direct | proxy µs/req | redis µs/req | p50 µs | added p50 µs |"
    print "|---|---|---:|---:|---:|---:|---:|---:|"
  }
  nt = split(tests, T, " "); ng = split(targets, G, " ")
  for (ti = 1; ti <= nt; ti++) for (gi = 1; gi <= ng; gi++) {
    t = T[ti]; g = G[gi]
    rp = ra = pu = uu = ru = cu = p5 = ad = ""
    for (r in rounds) {
      if (!((r, g, t, "rps") in R) || !((r, "direct", t, "rps") in R)) continue
      d = R[r, "direct", t, "rps"]
      rp = rp " " R[r, g, t, "rps"]; if (d > 0) ra = ra " " R[r, g, t, "rps"] / d
      pu = pu " " R[r, g, t, "pu"]; uu = uu " " R[r, g, t, "uu"]; ru = ru " " R[r, g, t, "ru"]
      cu = cu " " R[r, g, t, "cu"]
      p5 = p5 " " R[r, g, t, "p50"] * 1000; ad = ad " " (R[r, g, t, "p50"] - R[r, "direct", t, "p50"]) * 1000
    }
    if (rp == "") continue
    pcol = (g == "direct" ? "-" : sprintf("%.2f", med(pu)))
    if (user) pcol = pcol " | " (g == "direct" ? "-" : sprintf("%.2f", med(uu)))
    rcol = sprintf("%.2f", med(ru))
    if (client) rcol = rcol " | " sprintf("%.2f", med(cu))
    printf "| %s | %s | %.0f | %.2f | %s | %s | %.0f | %+.0f |\n", t, g, med(rp), med(ra), pcol, rcol, med(p5), med(ad)
  }
}' "$1"
}

# start_run NAME: TMP (a new temp dir), PIDS (processes started, in order) and BENCH_PID
# (a running benchmark, when set); at exit, INT or TERM, every one of them is stopped by
# pid, newest first, and TMP is removed unless KEEP_TMP=1. The caller defines log().
start_run() {
  TMP=$(mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX")
  PIDS=()
  BENCH_PID=
  trap run_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
}

run_cleanup() {
  local rc=$? i
  trap - EXIT INT TERM
  [[ -n "${BENCH_PID:-}" ]] && stop_pid "$BENCH_PID"
  for ((i=${#PIDS[@]}-1; i>=0; i--)); do stop_pid "${PIDS[$i]}"; done
  if [[ "${KEEP_TMP:-0}" == 1 ]]; then log "kept $TMP"; else rm -rf "$TMP"; fi
  exit "$rc"
}
