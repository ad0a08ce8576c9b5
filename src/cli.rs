//! The command line, as clap sees it. Parsing is not configuration: [`crate::config`] turns
//! these flags into a validated [`crate::config::Config`]. Doc comments are the `--help` text.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{ArgGroup, Parser, ValueEnum};

/// Which port-forward protocol carries the tunnels (`--portforward`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, ValueEnum)]
pub enum PortForward {
    /// WebSocket first; SPDY when the API server refuses the WebSocket upgrade.
    #[default]
    Auto,
    /// Only WebSocket (`v4.channel.k8s.io`): one upgrade per connection; verb `get`.
    #[value(name = "websocket")]
    WebSocket,
    /// Only SPDY/3.1 (`portforward.k8s.io`): one upgrade per pod; verb `create`.
    Spdy,
}

/// One stable local etcd endpoint into a Kubernetes cluster.
///
/// etcd-proxy finds the etcd pods in a namespace, tunnels to them through the Kubernetes
/// port-forward API and serves etcd's v3 (gRPC and JSON) and v2 APIs on a local port. It
/// rewrites the member client URLs etcd advertises, so `etcdctl member list`,
/// `etcdctl ... --cluster` and v2 endpoint sync keep talking to the proxy.
///
/// Every member also gets its own local port, pinned to that member.
#[derive(Debug, Parser)]
#[command(name = "etcd-proxy", version, max_term_width = 100)]
#[command(group(ArgGroup::new("target").args(["statefulset", "service", "selector", "pod"])))]
#[command(after_help = "EXAMPLES:\n  \
    etcd-proxy --context aks-admin -n etcd\n  \
    etcdctl --endpoints localhost:4001 member list\n  \
    ETCDCTL_API=2 etcdctl --endpoints http://localhost:4001 ls /")]
pub struct Cli {
    /// Path to the kubeconfig file [default: $KUBECONFIG, else ~/.kube/config].
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,

    /// The kubeconfig context to use [default: the current context].
    #[arg(long, value_name = "NAME")]
    pub context: Option<String>,

    /// Namespace of the etcd pods [default: the context's namespace, else "default"].
    #[arg(short = 'n', long, value_name = "NS")]
    pub namespace: Option<String>,

    /// Use the pods of this StatefulSet.
    #[arg(
        long,
        value_name = "NAME",
        help_heading = "Target (default: auto-detect)"
    )]
    pub statefulset: Option<String>,

    /// Use the pods selected by this Service.
    #[arg(
        long,
        value_name = "NAME",
        help_heading = "Target (default: auto-detect)"
    )]
    pub service: Option<String>,

    /// Use the pods matching this label selector, e.g. `app=etcd`.
    #[arg(
        short = 'l',
        long,
        value_name = "SEL",
        help_heading = "Target (default: auto-detect)"
    )]
    pub selector: Option<String>,

    /// Use this one pod.
    #[arg(
        long,
        value_name = "NAME",
        help_heading = "Target (default: auto-detect)"
    )]
    pub pod: Option<String>,

    /// Connect straight to the pods' IPs instead of through port-forward: for running inside
    /// the cluster (the gateway Deployment in deploy/gateway.yaml).
    #[arg(long)]
    pub direct: bool,

    /// Serve these etcd members (comma-separated http://HOST:PORT) without Kubernetes,
    /// connecting directly.
    #[arg(long, value_name = "URLS", value_delimiter = ',', conflicts_with_all = ["target", "kubeconfig", "context", "namespace", "direct"])]
    pub endpoints: Vec<String>,

    /// Port-forward protocol: `auto` tries WebSocket and falls back to SPDY when the API
    /// server refuses the upgrade (as kubectl does), then keeps using SPDY; `spdy` multiplexes
    /// every connection to a pod over one upgrade. RBAC: WebSocket needs `get` on
    /// `pods/portforward` (and `create` from Kubernetes 1.35), SPDY needs `create`.
    #[arg(long, value_enum, value_name = "PROTOCOL", default_value_t = PortForward::Auto)]
    pub portforward: PortForward,

    /// etcd's client port inside the pods [default: the container port named `client`, else
    /// 2379, else 4001].
    #[arg(long, value_name = "PORT")]
    pub remote_port: Option<u16>,

    /// Local address of the cluster endpoint, which spreads requests over the ready members.
    #[arg(long, value_name = "ADDR", default_value = "127.0.0.1:4001")]
    pub listen: SocketAddr,

    /// First local port of the per-member endpoints; member N listens on this port + N.
    /// 0 picks free ports [default: the --listen port + 1, or 0 when --listen uses port 0].
    #[arg(long, value_name = "PORT")]
    pub member_ports: Option<u16>,

    /// How often each member is health-checked through its tunnels (and SPDY port-forward
    /// connections pinged). The checks also keep idle tunnels alive through load-balancer and
    /// kubelet idle timeouts (Azure: 4 minutes).
    #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = humantime::parse_duration)]
    pub keepalive: std::time::Duration,

    /// How long a health check, HTTP/2 ping or SPDY ping may go unanswered before the member
    /// is counted as failing and the connection dropped (a tunnel dropped without FIN or RST
    /// is noticed this way).
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration)]
    pub keepalive_timeout: std::time::Duration,

    /// How long opening a connection to a member may take: a port-forward tunnel (the
    /// upgrade through the API server and the kubelet's dial into the pod) or, with --direct
    /// and --endpoints, the TCP connect. Past it the attempt fails, the member counts as
    /// failing and reads go to another member; other members' connections are not held up.
    #[arg(long, value_name = "DURATION", default_value = "10s", value_parser = humantime::parse_duration)]
    pub dial_timeout: std::time::Duration,

    /// Where linearizable reads go: `leader` skips the follower-to-leader ReadIndex hop
    /// (lowest latency); `spread` round-robins them over the members like clientv3.
    /// Writes always go to the leader; serializable reads always spread. Status and MoveLeader
    /// always go to the leader, so `etcdctl move-leader` works through the cluster endpoint.
    #[arg(long, value_enum, value_name = "WHERE", default_value_t = ReadsArg::Leader)]
    pub reads: ReadsArg,

    /// Threads serving requests. One event loop gives the lowest CPU cost and latency per
    /// request (no wake-ups across threads); an in-cluster gateway with many busy clients
    /// may use more. 0 means one per CPU core.
    #[arg(long, value_name = "N", default_value_t = 1)]
    pub threads: usize,

    /// Serve TLS with this certificate chain (PEM); rewritten member URLs become `https://`.
    #[arg(
        long,
        value_name = "PATH",
        requires = "tls_key",
        help_heading = "TLS and authentication"
    )]
    pub tls_cert: Option<PathBuf>,

    /// The private key (PEM) for --tls-cert.
    #[arg(
        long,
        value_name = "PATH",
        requires = "tls_cert",
        help_heading = "TLS and authentication"
    )]
    pub tls_key: Option<PathBuf>,

    /// Serve TLS with a local CA and certificate generated once and kept in the config
    /// directory; prints the `--cacert` path for etcdctl.
    #[arg(
        long,
        conflicts_with = "tls_cert",
        help_heading = "TLS and authentication"
    )]
    pub tls_auto: bool,

    /// Extra DNS name or IP for the --tls-auto certificate (repeatable).
    #[arg(
        long,
        value_name = "NAME",
        requires = "tls_auto",
        help_heading = "TLS and authentication"
    )]
    pub tls_san: Vec<String>,

    /// Require client certificates signed by this CA (PEM).
    #[arg(long, value_name = "PATH", help_heading = "TLS and authentication")]
    pub client_ca: Option<PathBuf>,

    /// Require users from this htpasswd-style file (bcrypt or argon2 hashes, e.g. made with
    /// `htpasswd -B`): etcdctl `--user`, v2 `--username`, HTTP Basic, gateway tokens. Without
    /// it, etcd's own authentication passes through untouched.
    #[arg(long, value_name = "PATH", help_heading = "TLS and authentication")]
    pub auth_file: Option<PathBuf>,

    /// Sign login tokens with the key in this file (at least 32 random bytes, e.g. from the
    /// Secret that holds the users file), so that every etcd-proxy with the same key and
    /// users file accepts them: gateway replicas share logins. Without it, tokens are signed
    /// with a random key per process. Tokens are valid for 10 minutes; clients log in again.
    #[arg(
        long,
        value_name = "PATH",
        requires = "auth_file",
        help_heading = "TLS and authentication"
    )]
    pub token_key: Option<PathBuf>,

    /// Allow listening on a non-loopback address without both TLS and --auth-file.
    #[arg(long, help_heading = "TLS and authentication")]
    pub insecure_expose: bool,

    /// etcd serves TLS: verify its certificates with this CA (PEM), as etcdctl's --cacert.
    #[arg(long, value_name = "PATH", help_heading = "TLS to etcd")]
    pub etcd_cacert: Option<PathBuf>,

    /// Client certificate for etcd (`--client-cert-auth`), as etcdctl's --cert.
    #[arg(long, value_name = "PATH", requires_all = ["etcd_key", "etcd_cacert"], help_heading = "TLS to etcd")]
    pub etcd_cert: Option<PathBuf>,

    /// Key of --etcd-cert, as etcdctl's --key.
    #[arg(
        long,
        value_name = "PATH",
        requires = "etcd_cert",
        help_heading = "TLS to etcd"
    )]
    pub etcd_key: Option<PathBuf>,

    /// Name to verify etcd's certificates against (default: each member's DNS name,
    /// `<pod>.<service>.<namespace>.svc`, or the host of its --endpoints URL).
    #[arg(
        long,
        value_name = "NAME",
        requires = "etcd_cacert",
        help_heading = "TLS to etcd"
    )]
    pub etcd_server_name: Option<String>,

    /// Open connections each local endpoint accepts; further ones are closed at once.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 4096,
        help_heading = "Limits (every listener is treated as exposed)"
    )]
    pub max_connections: usize,

    /// Open connections one client address may hold, over all local endpoints. Raise it for
    /// many clients behind one NAT address.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 256,
        help_heading = "Limits (every listener is treated as exposed)"
    )]
    pub max_connections_per_address: usize,

    /// New connections one client address may open per second (and at once), over all local
    /// endpoints; more are closed at accept.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 200,
        help_heading = "Limits (every listener is treated as exposed)"
    )]
    pub max_connection_rate_per_address: u32,

    /// How long a connection may take to send a complete first request, and may then sit idle
    /// until one of its requests has authenticated (HTTP/1.1: also the time to send each
    /// request head). Authenticated connections have no idle limit.
    #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = humantime::parse_duration, help_heading = "Limits (every listener is treated as exposed)")]
    pub header_timeout: std::time::Duration,

    /// Serve `/metrics` (Prometheus) and `/healthz` on this address.
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,

    /// Print `export ETCDCTL_ENDPOINTS=…` (and `ETCDCTL_CACERT` with --tls-auto) for the proxy
    /// these flags start, and exit: `eval "$(etcd-proxy --env)"`.
    #[arg(long)]
    pub env: bool,

    /// Log filter, e.g. `debug` or `etcd_proxy=debug` (else `RUST_LOG`, else
    /// `etcd_proxy=info,error`); release builds leave out trace-level logging.
    #[arg(long, value_name = "FILTER", env = "ETCD_PROXY_LOG")]
    pub log: Option<String>,
}

/// `--reads`: where linearizable reads go (the router's `Reads`; clap's types stay here so
/// that the command line depends on nothing else in the crate).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ReadsArg {
    /// To the leader, when it is known and ready.
    Leader,
    /// Round-robin over the ready members.
    Spread,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn verify_cli() {
        Cli::command().debug_assert();
    }

    #[test]
    fn targets_are_exclusive() {
        let err = Cli::try_parse_from(["etcd-proxy", "--pod", "a", "-l", "app=etcd"]).unwrap_err();
        assert_eq!(err.kind(), clap::error::ErrorKind::ArgumentConflict);
        let ok = Cli::try_parse_from(["etcd-proxy", "-n", "x", "--statefulset", "etcd"]).unwrap();
        assert_eq!(ok.statefulset.as_deref(), Some("etcd"));
        assert_eq!(ok.listen.port(), 4001);
        assert_eq!(ok.portforward, PortForward::Auto);
    }

    #[test]
    fn portforward_values() {
        for (arg, want) in [
            ("auto", PortForward::Auto),
            ("websocket", PortForward::WebSocket),
            ("spdy", PortForward::Spdy),
        ] {
            let cli = Cli::try_parse_from(["etcd-proxy", "--portforward", arg]).unwrap();
            assert_eq!(cli.portforward, want);
        }
        assert!(Cli::try_parse_from(["etcd-proxy", "--portforward", "grpc"]).is_err());
    }
}
