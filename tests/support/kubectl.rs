//! The real `kubectl port-forward`, run the way a user runs it, against the simulated
//! cluster: the comparison that matters for etcd-proxy's tunnels.
//!
//! kubectl is started on a free local port and is ready once it prints its `Forwarding from`
//! line, which it does only after it has upgraded its connection to the API server and bound
//! the port (client-go `tools/portforward/portforward.go`: `ForwardPorts` dials before
//! `listenOnPort`, then closes `Ready`). `KUBECTL_PORT_FORWARD_WEBSOCKETS` is removed from its
//! environment unless the caller sets it, so what is measured is kubectl's default: from 1.31
//! it tunnels SPDY through a WebSocket where the API server offers that and falls back to the
//! SPDY POST where it does not (`docs/spdy-portforward.md`).

use std::path::Path;
use std::process::Stdio;

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::{free_port, within};

/// Whether `kubectl` can run here (callers skip the kubectl rows without it, with a note).
pub fn installed() -> bool {
    std::process::Command::new("kubectl")
        .args(["version", "--client"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// A running `kubectl port-forward`; killed when dropped.
pub struct PortForward {
    /// `127.0.0.1:PORT`, where it listens.
    pub addr: String,
    /// Its process id, for measuring its memory.
    pub pid: Option<u32>,
    child: Child,
}

impl Drop for PortForward {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}

/// Starts `kubectl --kubeconfig K --context C -n NS port-forward pod/POD PORT:remote` on a
/// free port and waits until it listens on 127.0.0.1 (it also listens on `[::1]` where it
/// can, as it does by default). `websockets`: the value of
/// `KUBECTL_PORT_FORWARD_WEBSOCKETS`, or `None` for kubectl's default.
pub async fn port_forward(
    kubeconfig: &Path,
    context: &str,
    namespace: &str,
    pod: &str,
    remote: u16,
    websockets: Option<&str>,
) -> PortForward {
    let port = free_port();
    let mut cmd = Command::new("kubectl");
    cmd.arg("--kubeconfig")
        .arg(kubeconfig)
        .args(["--context", context, "-n", namespace, "port-forward"])
        .arg(format!("pod/{pod}"))
        .arg(format!("{port}:{remote}"))
        .env_remove("KUBECTL_PORT_FORWARD_WEBSOCKETS")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        // Errors (a refused upgrade, a failed forward) show in the caller's output.
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    if let Some(v) = websockets {
        cmd.env("KUBECTL_PORT_FORWARD_WEBSOCKETS", v);
    }
    let mut child = cmd.spawn().expect("spawn kubectl");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let ready = format!("Forwarding from 127.0.0.1:{port} -> {remote}");
    loop {
        let line = within("kubectl's Forwarding line", lines.next_line())
            .await
            .expect("read kubectl's output");
        match line {
            Some(l) if l.starts_with(&ready) => break,
            Some(_) => {}
            None => {
                let status = within("kubectl exits", child.wait()).await;
                panic!("kubectl port-forward exited before it listened ({status:?}; its stderr is above)");
            }
        }
    }
    // It prints "Handling connection for PORT" for every connection: keep its pipe drained.
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    PortForward {
        addr: format!("127.0.0.1:{port}"),
        pid: child.id(),
        child,
    }
}
