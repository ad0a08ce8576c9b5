//! Talking to Kubernetes: a `kube::Client` from the kubeconfig (as kubectl reads it),
//! pod discovery, and port-forward tunnels.
//!
//! Named `k8s`, not `kube`: a root module named `kube` would shadow the crate.

pub mod client;
pub mod discovery;
pub mod exec;
pub mod proxy;
pub mod spdy;
pub mod tunnel;

pub(crate) use exec::safe_one_line;

use std::path::PathBuf;

use kube::config::{KubeConfigOptions, Kubeconfig, KubeconfigError};

/// Why no Kubernetes client could be made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kubeconfig file does not exist.
    #[error("kubeconfig {path} not found: pass --kubeconfig PATH or set KUBECONFIG")]
    NoKubeconfig {
        /// The path tried.
        path: PathBuf,
    },
    /// No path was given and none could be guessed.
    #[error("no kubeconfig: pass --kubeconfig PATH or set KUBECONFIG (no home directory to find ~/.kube/config)")]
    NoKubeconfigPath,
    /// The kubeconfig could not be read or parsed: the first line of what kube said. A YAML
    /// error goes on with a snippet of the file, which may hold a token or a key.
    #[error("cannot load kubeconfig: {0}")]
    Kubeconfig(String),
    /// The requested context is not in the kubeconfig.
    #[error("context \"{context}\" not found in the kubeconfig (available: {available}); pick one with --context")]
    UnknownContext {
        /// The context asked for.
        context: String,
        /// The contexts that exist, comma-separated.
        available: String,
    },
    /// Neither `--context` nor `current-context`.
    #[error(
        "the kubeconfig has no current-context; pick one with --context (available: {available})"
    )]
    NoContext {
        /// The contexts that exist.
        available: String,
    },
    /// Running in a pod, but its service account is unusable.
    #[error("no kubeconfig, and the in-cluster service account in {dir} is unusable: {reason}")]
    InCluster {
        /// The service-account directory.
        dir: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// The proxy-url (or `HTTPS_PROXY`) cannot be used.
    #[error("cannot use context \"{context}\": {source}")]
    Proxy {
        /// The context.
        context: String,
        /// What is wrong with the proxy.
        #[source]
        source: proxy::Error,
    },
    /// The user's exec credential plugin is not installed (client-go's message adds the
    /// kubeconfig's `installHint`: `plugin/pkg/client/auth/exec/exec.go`).
    #[error("cannot use context \"{context}\": its exec credential plugin \"{command}\" was not found; {hint}")]
    ExecPluginMissing {
        /// The context.
        context: String,
        /// `users[].user.exec.command`.
        command: String,
        /// The kubeconfig's `installHint` on one line, or what to do.
        hint: String,
    },
    /// The exec plugin ran and failed. Only its exit status and stderr are shown: kube's own
    /// message quotes the command with its environment (the kubeconfig's `exec.env` may hold
    /// a client secret) and the plugin's stdout.
    #[error("cannot use context \"{context}\": its exec credential plugin \"{command}\" failed ({status}){stderr}")]
    ExecPluginFailed {
        /// The context.
        context: String,
        /// `users[].user.exec.command`.
        command: String,
        /// How it exited.
        status: std::process::ExitStatus,
        /// `: ` and its stderr on one line, or nothing when it wrote none (or wrote it to the
        /// terminal, in interactive mode).
        stderr: String,
    },
    /// The exec plugin exists but could not be started.
    #[error("cannot use context \"{context}\": cannot run its exec credential plugin \"{command}\": {source}")]
    ExecPluginStart {
        /// The context.
        context: String,
        /// `users[].user.exec.command`.
        command: String,
        /// Why it did not start.
        #[source]
        source: std::io::Error,
    },
    /// The first request failed below HTTP: the network, the proxy or TLS.
    #[error("cannot reach the API server {server}{via} (context \"{context}\"): {reason}")]
    Unreachable {
        /// The context.
        context: String,
        /// The API server's URL.
        server: String,
        /// ` through the proxy scheme://host:port`, or nothing.
        via: String,
        /// Why, on one line.
        reason: String,
    },
    /// kube could not build a client from the context.
    #[error("cannot use context \"{context}\": {source}")]
    Client {
        /// The context.
        context: String,
        /// What kube said.
        #[source]
        source: kube::Error,
    },
}

/// A connected Kubernetes client with the namespace and context it is for.
#[derive(Clone)]
pub struct Kube {
    /// The client.
    pub client: kube::Client,
    /// The namespace the etcd pods are in.
    pub namespace: String,
    /// The context name, for messages.
    pub context: String,
    /// The API server's URL, for messages.
    pub server: String,
    /// The proxy (`scheme://host:port`, no credentials), for messages.
    pub proxy: Option<String>,
}

impl Kube {
    /// [`Error::Unreachable`] if `e` failed below HTTP (no connection, proxy or TLS failure).
    pub fn unreachable(&self, e: &kube::Error) -> Option<Error> {
        let reason = match e {
            kube::Error::Service(inner) => exec::safe_one_line(inner.as_ref()),
            kube::Error::HyperError(inner) => exec::safe_one_line(inner),
            _ => return None,
        };
        Some(Error::Unreachable {
            context: self.context.clone(),
            server: self.server.clone(),
            via: self
                .proxy
                .as_ref()
                .map(|p| format!(" through the proxy {p}"))
                .unwrap_or_default(),
            reason,
        })
    }
}

/// Loads the kubeconfig like kubectl (`--kubeconfig`, else `KUBECONFIG` merged, else
/// `~/.kube/config`), selects the context and builds a client.
pub async fn connect(
    kubeconfig: Option<&PathBuf>,
    context: Option<&str>,
    namespace: Option<&str>,
) -> Result<Kube, Error> {
    let file = match kubeconfig {
        Some(path) => Kubeconfig::read_from(path),
        None => Kubeconfig::read(),
    }
    .map_err(kubeconfig_error);
    let file = match file {
        Ok(f) => f,
        // Inside a pod (the gateway Deployment) with no kubeconfig: the service account.
        Err(Error::NoKubeconfig { .. } | Error::NoKubeconfigPath)
            if kubeconfig.is_none()
                && context.is_none()
                && std::env::var_os("KUBERNETES_SERVICE_HOST").is_some() =>
        {
            return in_cluster(namespace);
        }
        Err(e) => return Err(e),
    };
    let available = file
        .contexts
        .iter()
        .map(|c| c.name.as_str())
        .collect::<Vec<_>>()
        .join(", ");
    let available = if available.is_empty() {
        "none: the kubeconfig defines no contexts".to_owned()
    } else {
        available
    };
    let context = match context
        .map(str::to_owned)
        .or_else(|| file.current_context.clone())
    {
        Some(c) if file.contexts.iter().any(|n| n.name == c) => c,
        Some(c) => {
            return Err(Error::UnknownContext {
                context: c,
                available,
            })
        }
        None => return Err(Error::NoContext { available }),
    };
    // Read here and hidden from kube's loader, which drops a proxy-url when NO_PROXY matches
    // the proxy, and fails on a NO_PROXY that kubectl accepts (an empty entry, `a,b,`).
    let mut file = file;
    let proxy_url = file
        .contexts
        .iter()
        .find(|c| c.name == context)
        .and_then(|c| c.context.as_ref())
        .and_then(|c| file.clusters.iter().find(|n| n.name == c.cluster))
        .and_then(|n| n.cluster.as_ref())
        .and_then(|c| c.proxy_url.clone());
    for cluster in file.clusters.iter_mut().filter_map(|n| n.cluster.as_mut()) {
        cluster.proxy_url = None;
    }
    let options = KubeConfigOptions {
        context: Some(context.clone()),
        ..Default::default()
    };
    let config = kube::Config::from_custom_kubeconfig(file, &options)
        .await
        .map_err(|e| Error::Kubeconfig(first_line(&e)))?;
    kube_for(config, proxy_url.as_deref(), namespace, context)
}

/// Where the kubelet mounts a pod's service account (token, CA, namespace).
const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// The pod's service account, as kubectl and client-go do inside a pod: the API server from
/// `KUBERNETES_SERVICE_HOST`/`KUBERNETES_SERVICE_PORT`, the token, CA and namespace from the
/// service-account directory (`ETCD_PROXY_SERVICEACCOUNT_DIR` overrides its path, so that the
/// path is testable outside a pod). The token file is re-read as it rotates (kube's
/// `token_file`).
fn in_cluster(namespace: Option<&str>) -> Result<Kube, Error> {
    let dir = std::env::var_os("ETCD_PROXY_SERVICEACCOUNT_DIR")
        .map_or_else(|| PathBuf::from(SERVICE_ACCOUNT_DIR), PathBuf::from);
    let fail = |reason: String| Error::InCluster {
        dir: dir.clone(),
        reason,
    };
    let host = std::env::var("KUBERNETES_SERVICE_HOST")
        .map_err(|_| fail("KUBERNETES_SERVICE_HOST is not set".into()))?;
    let port = std::env::var("KUBERNETES_SERVICE_PORT").unwrap_or_else(|_| "443".into());
    let host = if host.contains(':') {
        format!("[{host}]")
    } else {
        host
    };
    let url = format!("https://{host}:{port}")
        .parse()
        .map_err(|e| fail(format!("bad API server address {host}:{port}: {e}")))?;
    let ca = dir.join("ca.crt");
    let roots = crate::pem::certs(&ca).map_err(|e| fail(format!("{}: {e}", ca.display())))?;
    let token = dir.join("token");
    if !token.is_file() {
        return Err(fail(format!("{} does not exist", token.display())));
    }
    let mut config = kube::Config::new(url);
    config.default_namespace = std::fs::read_to_string(dir.join("namespace"))
        .map(|n| n.trim().to_owned())
        .ok()
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "default".into());
    config.root_cert = Some(roots.into_iter().map(|c| c.to_vec()).collect());
    config.root_cert_file = Some(ca);
    config.auth_info.token_file = Some(token.to_string_lossy().into_owned());
    kube_for(config, None, namespace, "in-cluster".to_owned())
}

/// The client for `config` (through the kubeconfig's `proxy_url`, else the environment's
/// proxy) in `namespace` (default: the config's), named `context` in messages.
fn kube_for(
    config: kube::Config,
    proxy_url: Option<&str>,
    namespace: Option<&str>,
    context: String,
) -> Result<Kube, Error> {
    let namespace = namespace
        .map(str::to_owned)
        .unwrap_or_else(|| config.default_namespace.clone());
    let proxy = proxy::select(proxy_url, &config.cluster_url).map_err(|source| Error::Proxy {
        context: context.clone(),
        source,
    })?;
    if let Some(proxy) = &proxy {
        tracing::debug!(%proxy, "reaching the API server through a proxy");
    }
    let client = client::build(&config, &namespace, proxy.as_ref())
        .map_err(|source| exec::client_error(&config, context.clone(), source))?;
    Ok(Kube {
        client,
        namespace,
        context,
        server: config
            .cluster_url
            .to_string()
            .trim_end_matches('/')
            .to_owned(),
        proxy: proxy.map(|p| p.to_string()),
    })
}

fn kubeconfig_error(e: KubeconfigError) -> Error {
    match e {
        KubeconfigError::ReadConfig(io, path) if io.kind() == std::io::ErrorKind::NotFound => {
            Error::NoKubeconfig { path }
        }
        KubeconfigError::FindPath => Error::NoKubeconfigPath,
        other => Error::Kubeconfig(first_line(&other)),
    }
}

/// The first line of `e` on one line: never the file excerpt a YAML error shows below it.
fn first_line(e: &KubeconfigError) -> String {
    crate::error::one_line(e)
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .to_owned()
}

/// `kube::Error::Api` with this HTTP status, if that is what `e` is.
pub(crate) fn api_status(e: &kube::Error) -> Option<(u16, &str)> {
    match e {
        kube::Error::Api(s) => Some((s.code, s.message.as_str())),
        _ => None,
    }
}
