//! The integration tests: real etcd members (Debian `etcd-server`), real clients (`etcdctl`,
//! the `etcd-client` crate), the real `etcd-proxy` binary, and the project's simulated
//! Kubernetes API server (`tests/sim`) in between.

mod support;

/// Authentication: --auth-file users, proxy tokens, Basic auth, etcd auth passthrough.
mod auth;
/// Bulk transfers over a slow tunnel: a snapshot and a ~40 MB range arrive whole, memory flat.
mod bulk;
/// The `etcd-client` crate, the JSON gateway and raw HTTP through the proxy.
mod clients;
/// Control-plane etcd (kubeadm): static pods in kube-system, TLS with client certificates.
mod controlplane;
/// --direct in a pod: the service account, pod IPs, a pod restarted with a new IP.
mod direct;
/// Bad input: one clear line, a non-zero exit, never a panic or a hang.
mod errors;
/// Silent tunnel faults: upgrades never answered, black holes, drops without FIN or RST, the
/// runtime's 1 s close grace.
mod faults;
/// Gateway mode: --endpoints, straight to etcd, no Kubernetes.
mod gateway;
/// Hostile, unauthenticated clients: header bombs, oversized frames, slowloris, login floods.
mod hostile;
/// Kubeconfig parity with kubectl: proxy-url (http, https, socks5), HTTPS_PROXY/NO_PROXY,
/// tls-server-name, insecure-skip-tls-verify, token files, exec plugins, client certificates.
mod kubeconfig;
/// Shutdown on SIGTERM/SIGINT and resuming after SIGSTOP/SIGCONT (a laptop sleeping).
mod lifecycle;
/// Scaling, API server outages, kubelet idle timeouts and restarted pods.
mod membership;
/// Port-forward over WebSocket and SPDY under each RBAC shape and Kubernetes version.
mod portforward;
/// Gateway replicas sharing logins through --token-key.
mod replicas;
/// Failover, reconnects and isolation under faults injected in the simulated cluster.
mod resilience;
/// TLS on the local endpoints: --tls-auto, given certificates, client certificates.
mod tls;
/// etcdctl v2 through the proxy, syncing endpoints from the member list.
mod v2_etcdctl;
/// etcdctl v3 through the proxy: KV, txn, watch, lease, member list, `--cluster`.
mod v3_etcdctl;
