//! Where member connections come from: port-forward tunnels (the default) or plain TCP to the
//! member's address (`--direct` inside the cluster, or `--endpoints` without Kubernetes).

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::k8s::tunnel;
use crate::member::EtcdPod;
use crate::upstream::{BoxIo, Dial, DialFuture};

/// Port-forward tunnels as the upstream pool's dialer.
pub(super) struct TunnelDial(pub(super) tunnel::Tunneler);

impl Dial for TunnelDial {
    fn dial(&self, pod: &str, port: u16) -> DialFuture {
        let tunneler = self.0.clone();
        let pod = pod.to_owned();
        Box::pin(async move {
            let stream = tunneler.open(&pod, port).await?;
            Ok(Box::pin(stream) as BoxIo)
        })
    }
}

/// Plain TCP to the member's address (pod IP, or the host of a `--endpoints` URL).
pub(super) struct DirectDial {
    pub(super) pods: watch::Receiver<Arc<Vec<EtcdPod>>>,
    /// How long a connect may take (`--dial-timeout`).
    pub(super) timeout: Duration,
}

/// The member has no address to connect to.
#[derive(Debug, thiserror::Error)]
#[error("member {0} has no address yet (pod without an IP?)")]
struct NoAddress(String);

/// The connect did not finish in time.
#[derive(Debug, thiserror::Error)]
#[error("connecting to member {pod} at {host}:{port} timed out after {after:?} (--dial-timeout)")]
struct ConnectTimeout {
    pod: String,
    host: String,
    port: u16,
    after: Duration,
}

/// The TCP connect failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot connect to member {pod} at {host}:{port}: {source}")]
struct ConnectFailed {
    pod: String,
    host: String,
    port: u16,
    source: std::io::Error,
}

impl Dial for DirectDial {
    fn dial(&self, pod: &str, port: u16) -> DialFuture {
        let host = self
            .pods
            .borrow()
            .iter()
            .find(|p| p.name == pod)
            .and_then(|p| p.ip.clone());
        let pod = pod.to_owned();
        let after = self.timeout;
        Box::pin(async move {
            let host = host.ok_or_else(|| NoAddress(pod.clone()))?;
            let connect = TcpStream::connect((host.as_str(), port));
            let tcp = tokio::time::timeout(after, connect)
                .await
                .map_err(|_| ConnectTimeout {
                    pod: pod.clone(),
                    host: host.clone(),
                    port,
                    after,
                })?
                .map_err(|source| ConnectFailed {
                    pod,
                    host,
                    port,
                    source,
                })?;
            tcp.set_nodelay(true)?;
            Ok(Box::pin(tcp) as BoxIo)
        })
    }
}
