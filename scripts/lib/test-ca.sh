# test-ca.sh: sourced by the benchmark scripts. make_test_ca DIR writes a throwaway CA
# (DIR/ca.pem) and a server certificate for 127.0.0.1 and localhost (DIR/server.pem,
# DIR/server.key), valid one day, with openssl. For local measurements only.
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
