//! `etcd-proxy-sim`: run a simulated cluster by hand, to try etcd-proxy
//! without Kubernetes. Prints the kubeconfig and the command to run, then
//! waits for Ctrl-C or SIGTERM and shuts down cleanly.

use clap::Parser;
use etcd_proxy_sim::{Layout, PodNetwork, SimCluster, SimConfig};

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
    /// Give pods reachable loopback IPs (127.N.x.y) with each member serving on its pod IP,
    /// as from inside the cluster: for `etcd-proxy --direct`.
    #[arg(long)]
    reachable_pods: bool,
    /// kubeadm's control-plane etcd instead of a StatefulSet: static pods `etcd-cp-N` in
    /// kube-system (pass `--namespace kube-system`), TLS with client certificates.
    #[arg(long)]
    control_plane: bool,
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
        // kubeadm does not enable the v2 API.
        enable_v2: !args.disable_v2 && !args.control_plane,
        pod_network: if args.reachable_pods {
            PodNetwork::Loopback
        } else {
            PodNetwork::Unroutable
        },
        layout: if args.control_plane {
            Layout::ControlPlane
        } else {
            Layout::StatefulSet
        },
        kubernetes_minor: args.kubernetes_minor,
    };
    let cluster = SimCluster::start(cfg.clone()).await?;
    let kubeconfig = cluster.kubeconfig_path().display().to_string();
    let shape = match cfg.layout {
        Layout::StatefulSet => format!("statefulset {}", cfg.name),
        Layout::ControlPlane => "kubeadm static pods, TLS with client certificates".to_string(),
    };
    println!(
        "Simulated cluster ready: {} etcd members in namespace {} ({shape})",
        cfg.members, cfg.namespace
    );
    println!("  kubeconfig: {kubeconfig}");
    println!("  api server: {}", cluster.api_url());
    println!("  contexts:   sim (default), sim-portforward-create, sim-portforward-get, sim-no-portforward, sim-no-list, sim-gateway");
    match cluster.etcd_pki() {
        Some(pki) => println!(
            "Try:  etcd-proxy --kubeconfig {kubeconfig} -n {} --etcd-cacert {} --etcd-cert {} --etcd-key {}",
            cfg.namespace,
            pki.ca_cert.display(),
            pki.apiserver_client_cert.display(),
            pki.apiserver_client_key.display()
        ),
        None => println!("Try:  etcd-proxy --kubeconfig {kubeconfig}"),
    }
    let result = wait_for_signal().await;
    println!("Shutting down...");
    cluster.shutdown().await;
    result
}
