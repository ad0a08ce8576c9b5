//! Logging: `tracing` to stderr, so stdout carries only the startup summary a user (or a
//! script) reads. The filter comes from `--log` (or `ETCD_PROXY_LOG`, which clap reads for
//! it), else `RUST_LOG`, else
//! `etcd_proxy=info,rustls_platform_verifier=off,error`: other crates only speak up for errors
//! (kube-client logs an API server going away as a debug-formatted warning; our own watch logs
//! say it plainly), and the platform verifier (used when a kubeconfig has no CA) not even then:
//! the certificate it rejects is already the reason in etcd-proxy's own one-line error.

use tracing_subscriber::EnvFilter;

/// The filter when neither `--log`, `ETCD_PROXY_LOG` nor `RUST_LOG` gives one.
pub const DEFAULT_FILTER: &str = "etcd_proxy=info,rustls_platform_verifier=off,error";

/// Installs the global subscriber.
pub fn init(filter: Option<&str>) {
    let spec = filter
        .map(str::to_owned)
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| DEFAULT_FILTER.to_owned());
    let filter = EnvFilter::try_new(&spec).unwrap_or_else(|e| {
        eprintln!("etcd-proxy: ignoring log filter {spec:?}: {e}");
        EnvFilter::new(DEFAULT_FILTER)
    });
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}
