#!/bin/sh
# Make a local CA, a server certificate for etcd-proxy's TLS listener and a client certificate
# (for --client-ca mTLS), with openssl.
#
#   certs/gen.sh [OUT_DIR] [SAN...]
#
# OUT_DIR defaults to ./certs/out (git-ignored). The server certificate always covers
# IP:127.0.0.1, IP:::1 and DNS:localhost; each further argument adds a SAN, written as
# DNS:name or IP:address, or bare (an IPv4/IPv6 address becomes IP:, anything else DNS:), e.g.
#
#   certs/gen.sh certs/out etcd-proxy.example.com 203.0.113.10
#
# An existing CA in OUT_DIR (ca.crt + ca.key) is reused, so re-running to add a SAN keeps
# clients that already trust it working; the server and client certificates are replaced.
# Private keys are written with mode 0600. Never commit anything this script writes.
set -eu

out=${1:-./certs/out}
[ "$#" -gt 0 ] && shift

command -v openssl >/dev/null 2>&1 || { echo "gen.sh: openssl not found" >&2; exit 1; }

days=${DAYS:-825}
client_cn=${CLIENT_CN:-etcd-proxy-client}

sans="IP:127.0.0.1,IP:::1,DNS:localhost"
for san in "$@"; do
  case $san in
    '') continue ;;
    DNS:*|IP:*) ;;
    *[!0-9.]*)
      case $san in
        *:*) san="IP:$san" ;;          # contains a colon and is not DNS:/IP: → IPv6
        *) san="DNS:$san" ;;
      esac ;;
    *) san="IP:$san" ;;                # only digits and dots → IPv4
  esac
  sans="$sans,$san"
done

umask 077
mkdir -p "$out"
tmp=$(mktemp -d "${TMPDIR:-/tmp}/etcd-proxy-certs.XXXXXX")
trap 'rm -rf "$tmp"' EXIT
trap 'exit 1' INT TERM HUP

# P-256 keys: small, fast, and accepted by every etcd client and by rustls.
newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

if [ -f "$out/ca.crt" ] && [ -f "$out/ca.key" ]; then
  echo "Reusing the CA in $out"
else
  newkey "$out/ca.key"
  cat >"$tmp/ca.ext" <<EXT
[req]
distinguished_name = dn
x509_extensions = v3_ca
prompt = no
[dn]
CN = etcd-proxy local CA
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
EXT
  openssl req -new -x509 -sha256 -days "$days" -key "$out/ca.key" \
    -config "$tmp/ca.ext" -out "$out/ca.crt"
fi

# sign NAME CN EXTENSIONS: key NAME.key, certificate NAME.crt signed by the CA.
sign() {
  newkey "$out/$1.key"
  openssl req -new -sha256 -key "$out/$1.key" -subj "/CN=$2" -out "$tmp/$1.csr"
  printf '%s\n' "basicConstraints = critical, CA:FALSE" \
    "keyUsage = critical, digitalSignature" \
    "subjectKeyIdentifier = hash" \
    "authorityKeyIdentifier = keyid" "$3" >"$tmp/$1.ext"
  serial=$(openssl rand -hex 16)
  openssl x509 -req -sha256 -days "$days" -in "$tmp/$1.csr" \
    -CA "$out/ca.crt" -CAkey "$out/ca.key" -set_serial "0x$serial" \
    -extfile "$tmp/$1.ext" -out "$out/$1.crt" 2>/dev/null
}

sign server etcd-proxy "extendedKeyUsage = serverAuth
subjectAltName = $sans"
sign client "$client_cn" "extendedKeyUsage = clientAuth"

chmod 600 "$out/ca.key" "$out/server.key" "$out/client.key"
chmod 644 "$out/ca.crt" "$out/server.crt" "$out/client.crt"

openssl verify -CAfile "$out/ca.crt" -purpose sslserver "$out/server.crt" >/dev/null
openssl verify -CAfile "$out/ca.crt" -purpose sslclient "$out/client.crt" >/dev/null

cat <<MSG
Wrote to $out: ca.crt ca.key server.crt server.key client.crt client.key
Server SANs: $sans

etcd-proxy:
  etcd-proxy ... --tls-cert $out/server.crt --tls-key $out/server.key \\
    [--client-ca $out/ca.crt]
etcdctl:
  etcdctl --endpoints https://localhost:4001 --cacert $out/ca.crt \\
    [--cert $out/client.crt --key $out/client.key] member list
In-cluster gateway (deploy/gateway.yaml):
  kubectl -n etcd create secret tls etcd-proxy-tls --cert=$out/server.crt --key=$out/server.key
MSG
