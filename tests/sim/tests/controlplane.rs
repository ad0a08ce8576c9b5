//! The control-plane layout: kubeadm's static etcd pods, seen through a real `kube::Client`,
//! and the members' TLS with client-certificate auth, reached through kube-rs' port-forward.

use std::future::{Future, IntoFuture};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{Pod, Service};
use kube::api::ListParams;
use kube::{Api, Client};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use etcd_proxy_sim::{within_for, SimCluster, SimConfig};

const STEP: Duration = Duration::from_secs(15);
const START: Duration = Duration::from_secs(90);

#[track_caller]
fn within<'a, F: IntoFuture + 'a>(what: &'a str, fut: F) -> impl Future<Output = F::Output> + 'a {
    within_for(STEP, what, fut)
}

async fn client(c: &SimCluster) -> Client {
    let kc = kube::config::Kubeconfig::read_from(c.kubeconfig_path()).expect("kubeconfig");
    let cfg = within(
        "kube config",
        kube::Config::from_custom_kubeconfig(kc, &Default::default()),
    )
    .await
    .expect("kube config");
    Client::try_from(cfg).expect("client")
}

/// Every certificate in a PEM file.
fn pem_certs(path: &Path) -> Vec<CertificateDer<'static>> {
    CertificateDer::pem_file_iter(path)
        .expect("read PEM")
        .map(|c| c.expect("certificate PEM"))
        .collect()
}

/// `GET /version` over TLS through a port-forward to `pod`, verifying etcd's certificate
/// against `server_name`, with the client identity if given. Err: what failed.
async fn version_over_tls(
    pods: &Api<Pod>,
    pod: &str,
    ca: &Path,
    identity: Option<(&Path, &Path)>,
    server_name: &str,
) -> Result<String, String> {
    let mut roots = rustls::RootCertStore::empty();
    for c in pem_certs(ca) {
        roots.add(c).expect("CA");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let config = match identity {
        Some((cert, key)) => {
            let key = PrivateKeyDer::from_pem_file(key).expect("key");
            builder
                .with_client_auth_cert(pem_certs(cert), key)
                .expect("identity")
        }
        None => builder.with_no_client_auth(),
    };
    let mut pf = within("portforward", pods.portforward(pod, &[2379]))
        .await
        .expect("portforward");
    let stream = pf.take_stream(2379).expect("stream");
    let name = ServerName::try_from(server_name.to_owned()).expect("server name");
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let exchange = async {
        let mut tls = connector
            .connect(name, stream)
            .await
            .map_err(|e| e.to_string())?;
        tls.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .map_err(|e| e.to_string())?;
        let mut buf = Vec::new();
        tls.read_to_end(&mut buf).await.map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&buf).into_owned())
    };
    let out = within("TLS exchange", exchange).await;
    let _ = tokio::time::timeout(STEP, pf.join()).await;
    out
}

#[tokio::test]
async fn kubeadm_static_pods_with_tls_and_client_certificates() {
    let sim = within_for(
        START,
        "start",
        SimCluster::start(SimConfig::control_plane(2)),
    )
    .await
    .expect("control-plane cluster starts");
    assert_eq!(sim.namespace(), "kube-system");
    assert_eq!(sim.pod_names(), ["etcd-cp-1", "etcd-cp-2"]);
    assert_eq!(sim.member_name("etcd-cp-1").as_deref(), Some("cp-1"));
    assert_eq!(
        sim.advertised_client_url("etcd-cp-2").as_deref(),
        Some("https://10.0.0.12:2379")
    );

    let client = client(&sim).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "kube-system");
    let list = within(
        "list pods",
        pods.list(&ListParams::default().labels("component=etcd,tier=control-plane")),
    )
    .await
    .expect("list");
    assert_eq!(list.items.len(), 2);
    let p = &list.items[0];
    let spec = p.spec.as_ref().unwrap();
    let status = p.status.as_ref().unwrap();
    assert_eq!(p.metadata.name.as_deref(), Some("etcd-cp-1"));
    assert_eq!(spec.host_network, Some(true));
    assert_eq!(spec.node_name.as_deref(), Some("cp-1"));
    assert!(spec.hostname.is_none() && spec.subdomain.is_none());
    assert_eq!(status.pod_ip.as_deref(), Some("10.0.0.11"));
    assert_eq!(
        status.host_ip, status.pod_ip,
        "host network: pod IP = node IP"
    );
    let annotations = p.metadata.annotations.as_ref().unwrap();
    assert_eq!(
        annotations
            .get("kubeadm.kubernetes.io/etcd.advertise-client-urls")
            .map(String::as_str),
        Some("https://10.0.0.11:2379")
    );
    let owner = &p.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!((owner.kind.as_str(), owner.name.as_str()), ("Node", "cp-1"));
    let command = spec.containers[0].command.as_ref().unwrap();
    assert!(command.contains(&"--client-cert-auth=true".to_string()));
    assert!(command.contains(&"--name=cp-1".to_string()));

    // No StatefulSet and no Service: 404, as in a kubeadm cluster.
    let sts: Api<StatefulSet> = Api::namespaced(client.clone(), "kube-system");
    let svc: Api<Service> = Api::namespaced(client.clone(), "kube-system");
    assert!(within("get sts", sts.get_opt("etcd"))
        .await
        .unwrap()
        .is_none());
    assert!(within("get svc", svc.get_opt("etcd"))
        .await
        .unwrap()
        .is_none());
    let all = within("list sts", sts.list(&ListParams::default()))
        .await
        .unwrap();
    assert!(all.items.is_empty());

    // etcd over TLS through the port-forward: the certificate names the node IP and the
    // node name, and etcd wants a client certificate signed by its CA.
    let pki = sim.etcd_pki().expect("control-plane PKI").clone();
    let identity = Some((
        pki.apiserver_client_cert.as_path(),
        pki.apiserver_client_key.as_path(),
    ));
    for name in ["10.0.0.11", "cp-1"] {
        let out = version_over_tls(&pods, "etcd-cp-1", &pki.ca_cert, identity, name).await;
        let out = out.unwrap_or_else(|e| panic!("TLS to etcd as {name}: {e}"));
        assert!(out.starts_with("HTTP/1.1 200"), "{out}");
        assert!(out.contains("etcdserver"), "{out}");
    }
    let healthcheck = Some((
        pki.healthcheck_client_cert.as_path(),
        pki.healthcheck_client_key.as_path(),
    ));
    let out = version_over_tls(&pods, "etcd-cp-2", &pki.ca_cert, healthcheck, "10.0.0.12").await;
    assert!(out.is_ok_and(|o| o.starts_with("HTTP/1.1 200")));
    // The certificate names no service DNS name.
    let wrong = version_over_tls(
        &pods,
        "etcd-cp-1",
        &pki.ca_cert,
        identity,
        "etcd-cp-1.etcd.kube-system.svc",
    )
    .await;
    assert!(
        wrong.as_ref().is_err_and(|e| e.contains("certificate")),
        "{wrong:?}"
    );
    // Without a client certificate etcd ends the handshake.
    let anonymous = version_over_tls(&pods, "etcd-cp-1", &pki.ca_cert, None, "10.0.0.11").await;
    assert!(anonymous.is_err(), "{anonymous:?}");

    assert!(within("scale", sim.scale(3)).await.is_err());
    within("shutdown", sim.shutdown()).await;
}
