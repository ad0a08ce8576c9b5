//! `etcd-proxy-sim`: run a simulated cluster by hand, to try etcd-proxy
//! without Kubernetes. Prints the kubeconfig and the command to run, then
//! waits for Ctrl-C or SIGTERM and shuts down cleanly.

use clap::Parser;
use etcd_proxy_sim::{SimCluster, SimConfig};

/// A simulated Kubernetes API server backed by real etcd members.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Number of etcd members (pods).
    #[arg(long, default_value_t = 3)]
    members: usize,
    /// Namespace of the etcd StatefulSet.
    #[arg(long, default_value = "etcd")]
    namespace: String,
    /// StatefulSet/Service name and pod prefix.
    #[arg(long, default_value = "etcd")]
    name: String,
    /// Make etcd listen only on the "pod IP", so port-forward is refused.
    #[arg(long)]
    no_loopback_listen: bool,
    /// Do not pass --enable-v2 to etcd.
    #[arg(long)]
    disable_v2: bool,
    /// Simulated Kubernetes minor version: from 35 a WebSocket port-forward needs `create`
    /// on pods/portforward as well as `get`.
    #[arg(long, default_value_t = 33)]
    kubernetes_minor: u32,
}

async fn wait_for_signal() -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let cfg = SimConfig {
        members: args.members,
        namespace: args.namespace,
        name: args.name,
        loopback_listen: !args.no_loopback_listen,
        enable_v2: !args.disable_v2,
        kubernetes_minor: args.kubernetes_minor,
    };
    let cluster = SimCluster::start(cfg.clone()).await?;
    let kubeconfig = cluster.kubeconfig_path().display().to_string();
    println!(
        "Simulated cluster ready: {} etcd members in namespace {} (statefulset {})",
        cfg.members, cfg.namespace, cfg.name
    );
    println!("  kubeconfig: {kubeconfig}");
    println!("  api server: {}", cluster.api_url());
    println!(
        "  contexts:   sim (default), sim-portforward-create, sim-portforward-get, \
         sim-no-portforward, sim-no-list"
    );
    println!("Try:  etcd-proxy --kubeconfig {kubeconfig}");
    let result = wait_for_signal().await;
    println!("Shutting down...");
    cluster.shutdown().await;
    result
}
