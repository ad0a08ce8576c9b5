//! Kubeconfig parity with kubectl: `proxy-url` (http, https, socks5) for API calls and
//! tunnels, `HTTPS_PROXY`/`NO_PROXY`, `tls-server-name`, `insecure-skip-tls-verify`,
//! `tokenFile`, exec credential plugins (present and missing) and client certificates.
//!
//! Proxied kubeconfigs name the API server `https://etcd-proxy-sim.invalid:PORT`
//! ([`EXTRA_SAN`]): only the test proxies resolve it, so a connection that bypasses the proxy
//! cannot even resolve its address, and the test fails.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::Path;

use etcd_proxy_sim::{CaData, KubeconfigVariant, SimCluster, SimConfig, UserAuth, EXTRA_SAN};

use crate::support::proxies::{self, ProxyOptions, TestProxy};
use crate::support::{ctl3, proxy_fails_env, start_proxy_with, within, within_for, START_DEADLINE};

const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

/// A 1-member simulated cluster.
async fn sim() -> SimCluster {
    within_for(
        START_DEADLINE,
        "the simulated cluster starts",
        SimCluster::start(SimConfig {
            members: 1,
            ..SimConfig::default()
        }),
    )
    .await
    .expect("simulated cluster starts")
}

/// The API server as only a test proxy can reach it.
fn unresolvable_server(sim: &SimCluster) -> String {
    let port = sim.api_url().rsplit(':').next().unwrap().to_owned();
    format!("https://{EXTRA_SAN}:{port}")
}

/// Proxy options resolving [`EXTRA_SAN`] to the simulator.
fn resolving_the_sim() -> ProxyOptions {
    ProxyOptions {
        hosts: HashMap::from([(EXTRA_SAN.to_owned(), LOCALHOST)]),
        ..ProxyOptions::default()
    }
}

/// Starts etcd-proxy with `kubeconfig` (and `extra` flags) and requires put/get to work.
async fn works(kubeconfig: &Path, extra: &[&str], env: &[(&str, &str)], what: &str) {
    let proxy = start_proxy_with(kubeconfig, extra, env).await;
    let ep = proxy.cluster_addr.as_str();
    ctl3(ep, &["put", "row", what]).await;
    let got = ctl3(ep, &["get", "row", "--print-value-only"]).await.stdout;
    assert_eq!(got.trim(), what);
}

/// etcd-proxy fails with `kubeconfig`: one line on stderr, a non-zero exit, within the
/// deadline. Returns the line.
async fn fails(kubeconfig: &Path, env: &[(&str, &str)]) -> String {
    let kc = kubeconfig.to_str().unwrap();
    // What users see: the default log filter.
    let mut env = env.to_vec();
    env.push(("ETCD_PROXY_LOG", etcd_proxy::telemetry::DEFAULT_FILTER));
    let (status, err) =
        proxy_fails_env(&["--kubeconfig", kc, "--listen", "127.0.0.1:0"], &env).await;
    assert!(!status.success(), "must fail: {err}");
    assert_eq!(status.code(), Some(1), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line, got:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
    eprintln!("as expected: {}", err.trim());
    err
}

/// Every connection the proxy relayed went to the simulator's unresolvable name, there was
/// at least one per API connection and tunnel, and nothing was refused.
fn all_through(proxy: &TestProxy, sim: &SimCluster, tunnels_at_least: usize) {
    let log = proxy.log();
    let want = unresolvable_server(sim)
        .trim_start_matches("https://")
        .to_owned();
    assert!(log.refused.is_empty(), "refused: {:?}", log.refused);
    assert!(
        log.relayed.len() > tunnels_at_least,
        "an API connection and {tunnels_at_least}+ tunnels: {:?}",
        log.relayed
    );
    assert!(log.relayed.iter().all(|t| *t == want), "{:?}", log.relayed);
}

/// `proxy-url: http://user:pass@…` (a percent-encoded password): API calls and WebSocket
/// tunnels all go through CONNECT with Basic auth, whatever NO_PROXY says. Wrong credentials and an unsupported
/// scheme are one clear line each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_proxy_url_with_basic_auth_carries_api_calls_and_tunnels() {
    let sim = sim().await;
    let proxy = proxies::http_proxy(ProxyOptions {
        credentials: Some(("etcd".into(), "p@ss:word".into())),
        ..resolving_the_sim()
    })
    .await;
    let kc = sim
        .write_kubeconfig_variant(
            "http-proxy",
            &KubeconfigVariant {
                server: Some(unresolvable_server(&sim)),
                proxy_url: Some(format!("http://etcd:p%40ss%3Aword@{}", proxy.addr)),
                ..KubeconfigVariant::default()
            },
        )
        .unwrap();
    // NO_PROXY does not apply to a kubeconfig's proxy-url (kube's loader would drop this one,
    // on 127.0.0.1, and fail on the empty entry, which kubectl ignores).
    let no_proxy = [("NO_PROXY", "127.0.0.1,localhost,")];
    works(&kc, &[], &no_proxy, "through-http-proxy").await;
    assert!(sim.portforward_count() > 0, "WebSocket tunnels");
    all_through(&proxy, &sim, 1);

    let kc = sim
        .write_kubeconfig_variant(
            "http-proxy-wrong-password",
            &KubeconfigVariant {
                server: Some(unresolvable_server(&sim)),
                proxy_url: Some(format!("http://etcd:guess@{}", proxy.addr)),
                ..KubeconfigVariant::default()
            },
        )
        .unwrap();
    let err = fails(&kc, &[]).await;
    let through = format!("through the proxy http://{}", proxy.addr);
    assert!(err.contains(&through), "{err}");
    assert!(err.contains("proxy authorization required"), "{err}");
    assert!(!err.contains("guess"), "no credentials in messages: {err}");

    let kc = sim
        .write_kubeconfig_variant(
            "socks4-proxy",
            &KubeconfigVariant {
                server: Some(unresolvable_server(&sim)),
                proxy_url: Some(format!("socks4://etcd:secret@{}", proxy.addr)),
                ..KubeconfigVariant::default()
            },
        )
        .unwrap();
    let err = fails(&kc, &[]).await;
    assert!(
        err.contains("unsupported scheme \"socks4\", must be http, https, or socks5"),
        "{err}"
    );
    assert!(!err.contains("secret"), "{err}");
    within("sim.shutdown", sim.shutdown()).await;
}

/// `proxy-url: https://…`: TLS to the proxy (verified against the kubeconfig's CA bundle, as
/// kube and kubectl do), CONNECT, then TLS to the API server; SPDY tunnels go through it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_url_carries_api_calls_and_spdy_tunnels() {
    let sim = sim().await;
    let (tls, proxy_ca) = proxies::proxy_tls();
    let proxy = proxies::http_proxy(ProxyOptions {
        tls: Some(tls),
        ..resolving_the_sim()
    })
    .await;
    let kc = sim
        .write_kubeconfig_variant(
            "https-proxy",
            &KubeconfigVariant {
                server: Some(unresolvable_server(&sim)),
                proxy_url: Some(format!("https://localhost:{}", proxy.addr.port())),
                ca: CaData::SimAnd(proxy_ca),
                ..KubeconfigVariant::default()
            },
        )
        .unwrap();
    works(&kc, &["--portforward", "spdy"], &[], "through-https-proxy").await;
    assert!(sim.spdy_upgrade_count() > 0, "SPDY tunnels");
    assert_eq!(sim.portforward_count(), 0);
    all_through(&proxy, &sim, 1);

    // The proxy's certificate is not signed by a CA the kubeconfig trusts.
    let kc = sim
        .write_kubeconfig_variant(
            "https-proxy-untrusted",
            &KubeconfigVariant {
                server: Some(unresolvable_server(&sim)),
                proxy_url: Some(format!("https://localhost:{}", proxy.addr.port())),
                ..KubeconfigVariant::default()
            },
        )
        .unwrap();
    let err = fails(&kc, &[]).await;
    let through = format!("through the proxy https://localhost:{}", proxy.addr.port());
    assert!(err.contains(&through), "{err}");
    assert!(err.contains("UnknownIssuer"), "{err}");
    within("sim.shutdown", sim.shutdown()).await;
}

/// `proxy-url: socks5://user:pass@…`: names resolved by the proxy, WebSocket tunnels.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socks5_proxy_url_with_credentials_carries_api_calls_and_tunnels() {
    let sim = sim().await;
    let proxy = proxies::socks5_proxy(ProxyOptions {
        credentials: Some(("etcd".into(), "s3cret".into())),
        ..resolving_the_sim()
    })
    .await;
    let kc = sim
        .write_kubeconfig_variant(
            "socks5-proxy",
            &KubeconfigVariant {
                server: Some(unresolvable_server(&sim)),
                proxy_url: Some(format!("socks5://etcd:s3cret@{}", proxy.addr)),
                ..KubeconfigVariant::default()
            },
        )
        .unwrap();
    works(&kc, &[], &[], "through-socks5-proxy").await;
    assert!(sim.portforward_count() > 0, "WebSocket tunnels");
    all_through(&proxy, &sim, 1);
    within("sim.shutdown", sim.shutdown()).await;
}

/// No proxy-url: `HTTPS_PROXY` as kubectl reads it, and `NO_PROXY` naming the server
/// bypasses it (which here cannot resolve the name, so etcd-proxy fails).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_proxy_environment_and_no_proxy() {
    let sim = sim().await;
    let proxy = proxies::http_proxy(resolving_the_sim()).await;
    let kc = sim
        .write_kubeconfig_variant(
            "env-proxy",
            &KubeconfigVariant {
                server: Some(unresolvable_server(&sim)),
                ..KubeconfigVariant::default()
            },
        )
        .unwrap();
    let via = format!("http://{}", proxy.addr);
    works(&kc, &[], &[("HTTPS_PROXY", &via)], "through-env-proxy").await;
    all_through(&proxy, &sim, 1);

    let before = proxy.log().relayed.len();
    let err = fails(&kc, &[("HTTPS_PROXY", &via), ("NO_PROXY", ".invalid")]).await;
    assert!(err.contains("dns error"), "connected directly: {err}");
    assert_eq!(
        proxy.log().relayed.len(),
        before,
        "NO_PROXY bypasses the proxy"
    );
    within("sim.shutdown", sim.shutdown()).await;
}

/// The API server at an address its certificate does not name (127.0.0.2, relayed to the
/// simulator): refused as kubectl refuses it, accepted with `tls-server-name` set to a name
/// the certificate has, or with `insecure-skip-tls-verify` (and no CA at all).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_server_name_and_insecure_skip_tls_verify() {
    let sim = sim().await;
    let api: std::net::SocketAddr = sim
        .api_url()
        .trim_start_matches("https://")
        .parse()
        .unwrap();
    let relay = proxies::relay(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)), api).await;
    let server = format!("https://{}", relay.addr);
    let variant = |v: KubeconfigVariant| KubeconfigVariant {
        server: Some(server.clone()),
        ..v
    };

    let kc = sim
        .write_kubeconfig_variant("wrong-name", &variant(KubeconfigVariant::default()))
        .unwrap();
    let err = fails(&kc, &[]).await;
    assert!(
        err.contains(&format!("cannot reach the API server {server}")),
        "{err}"
    );
    assert!(
        err.contains("certificate not valid for name \"127.0.0.2\""),
        "{err}"
    );

    let kc = sim
        .write_kubeconfig_variant(
            "tls-server-name",
            &variant(KubeconfigVariant {
                tls_server_name: Some("kubernetes.default.svc".into()),
                ..KubeconfigVariant::default()
            }),
        )
        .unwrap();
    works(&kc, &[], &[], "tls-server-name").await;

    let kc = sim
        .write_kubeconfig_variant(
            "no-ca",
            &variant(KubeconfigVariant {
                ca: CaData::Absent,
                ..KubeconfigVariant::default()
            }),
        )
        .unwrap();
    let err = fails(&kc, &[]).await;
    assert!(err.contains("UnknownIssuer"), "{err}");

    let kc = sim
        .write_kubeconfig_variant(
            "insecure",
            &variant(KubeconfigVariant {
                ca: CaData::Absent,
                insecure_skip_tls_verify: true,
                ..KubeconfigVariant::default()
            }),
        )
        .unwrap();
    works(&kc, &[], &[], "insecure-skip-tls-verify").await;
    assert!(relay.log().relayed.len() >= 4, "{:?}", relay.log());
    within("sim.shutdown", sim.shutdown()).await;
}

/// The ways users authenticate besides an inline token: `tokenFile`, an exec plugin
/// (kubelogin, `aws eks get-token`), a client certificate (`az aks get-credentials --admin`,
/// kubeadm's admin.conf).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_file_exec_plugin_and_client_certificate_users() {
    let sim = sim().await;
    for (name, user) in [
        ("token-file", UserAuth::TokenFile),
        ("exec-plugin", UserAuth::ExecPlugin),
        ("client-certificate", UserAuth::ClientCertificate),
    ] {
        let kc = sim
            .write_kubeconfig_variant(
                name,
                &KubeconfigVariant {
                    user,
                    ..KubeconfigVariant::default()
                },
            )
            .unwrap();
        works(&kc, &[], &[], name).await;
    }
    within("sim.shutdown", sim.shutdown()).await;
}

/// A missing exec plugin: one line naming the program and the kubeconfig's `installHint` (on
/// one line), or where to read about credential plugins when there is none; no hang.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_exec_plugin_names_the_program_and_its_install_hint() {
    let sim = sim().await;
    let command = "kubelogin-not-installed-here";
    let kc = sim
        .write_kubeconfig_variant(
            "missing-plugin-hint",
            &KubeconfigVariant {
                user: UserAuth::MissingExecPlugin {
                    command: command.into(),
                    install_hint: Some(
                        "kubelogin is not installed.\n\n  Install it:\n    az aks install-cli\n"
                            .into(),
                    ),
                },
                ..KubeconfigVariant::default()
            },
        )
        .unwrap();
    let err = fails(&kc, &[]).await;
    assert!(
        err.contains(&format!(
            "exec credential plugin \"{command}\" was not found"
        )),
        "{err}"
    );
    assert!(
        err.contains("kubelogin is not installed. Install it: az aks install-cli"),
        "{err}"
    );

    let kc = sim
        .write_kubeconfig_variant(
            "missing-plugin",
            &KubeconfigVariant {
                user: UserAuth::MissingExecPlugin {
                    command: command.into(),
                    install_hint: None,
                },
                ..KubeconfigVariant::default()
            },
        )
        .unwrap();
    let err = fails(&kc, &[]).await;
    assert!(err.contains(command), "{err}");
    assert!(err.contains("client-go-credential-plugins"), "{err}");
    within("sim.shutdown", sim.shutdown()).await;
}

/// An exec plugin that fails: one line with its exit status and stderr, and nothing of its
/// environment (kubelogin's service-principal mode passes a client secret there).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_exec_plugin_shows_its_stderr_and_no_secrets() {
    let sim = sim().await;
    let stderr =
        "error: AADSTS7000215: Invalid client secret provided.\nrun kubelogin convert-kubeconfig";
    let kc = sim
        .write_kubeconfig_variant(
            "failing-plugin",
            &KubeconfigVariant {
                user: UserAuth::FailingExecPlugin {
                    stderr: stderr.into(),
                    env: vec![(
                        "AAD_SERVICE_PRINCIPAL_CLIENT_SECRET".into(),
                        "do-not-print-me".into(),
                    )],
                },
                ..KubeconfigVariant::default()
            },
        )
        .unwrap();
    let err = fails(&kc, &[]).await;
    assert!(
        err.contains("failing-plugin-credential-plugin\" failed (exit status: 3)"),
        "{err}"
    );
    assert!(
        err.contains("Invalid client secret provided. run kubelogin convert-kubeconfig"),
        "{err}"
    );
    assert!(!err.contains("do-not-print-me"), "{err}");
    within("sim.shutdown", sim.shutdown()).await;
}
