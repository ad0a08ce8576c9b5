//! What users do without etcd-proxy: a port-forward per connection (as kube-rs' example and
//! kftray do). The benches run it beside the real `kubectl port-forward`
//! (`super::kubectl`), which keeps one connection and opens a stream pair per connection.

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};

/// Aborts the forwarder (and every connection it serves) when dropped.
pub struct AbortOnDrop(JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Listens on a free loopback port; every accepted connection gets its own port-forward to
/// `pod`:2379 and is copied both ways until either side ends.
pub async fn naive_forwarder(sim: &etcd_proxy_sim::SimCluster, pod: &str) -> (String, AbortOnDrop) {
    let kubeconfig =
        kube::config::Kubeconfig::read_from(sim.kubeconfig_path()).expect("read kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("kube config");
    let client = kube::Client::try_from(config).expect("kube client");
    let pods: Api<Pod> = Api::namespaced(client, sim.namespace());
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let pod = pod.to_owned();
    let task = tokio::spawn(async move {
        let mut conns = JoinSet::new();
        while let Ok((mut conn, _)) = listener.accept().await {
            let _ = conn.set_nodelay(true);
            let (pods, pod) = (pods.clone(), pod.clone());
            conns.spawn(async move {
                let Ok(mut forwarder) = pods.portforward(&pod, &[2379]).await else {
                    return;
                };
                let Some(mut upstream) = forwarder.take_stream(2379) else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut conn, &mut upstream).await;
                drop(upstream);
                let _ = forwarder.join().await;
            });
            while conns.try_join_next().is_some() {}
        }
    });
    (addr, AbortOnDrop(task))
}
