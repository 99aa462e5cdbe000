# bench.sh: helpers sourced by the measurement scripts (bench-e2e.sh, idle-memory.sh).
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
