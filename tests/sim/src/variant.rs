//! Kubeconfig variants: the simulated cluster described the other ways real kubeconfigs do.
//!
//! The default kubeconfig ([`SimCluster::kubeconfig_path`]) is the plain case: server
//! `https://127.0.0.1:PORT`, the CA inline, a bearer token per user. Clients also meet
//! `proxy-url`, `tls-server-name`, `insecure-skip-tls-verify`, `tokenFile`, exec credential
//! plugins (kubelogin, `aws eks get-token`) and client certificates (`az aks get-credentials
//! --admin`, kubeadm's `admin.conf`). [`KubeconfigVariant`] writes one of those next to the
//! default file, for the admin user. The API server is the same: what varies is only how the
//! client reaches and authenticates to it, so nothing here makes the simulator kinder.
//!
//! Field names follow client-go's `tools/clientcmd/api/v1/types.go` (`Cluster`, `AuthInfo`,
//! `ExecConfig`).

use std::path::PathBuf;

use base64::Engine as _;

use crate::{SimCluster, SimError};

/// Which CA bundle the cluster entry carries.
#[derive(Debug, Clone, Default)]
pub enum CaData {
    /// The simulator's CA (as the default kubeconfig).
    #[default]
    Sim,
    /// The simulator's CA followed by more PEM certificates (e.g. a TLS proxy's CA).
    SimAnd(String),
    /// No `certificate-authority-data` at all.
    Absent,
}

/// How the admin user authenticates.
#[derive(Debug, Clone, Default)]
pub enum UserAuth {
    /// `token:` inline (as the default kubeconfig).
    #[default]
    Token,
    /// `tokenFile:` naming a file that holds the token.
    TokenFile,
    /// `exec:` a plugin (a shell script here) that prints a client.authentication.k8s.io/v1
    /// `ExecCredential` with the token, as kubelogin does.
    ExecPlugin,
    /// `exec:` a command that is not installed, with an optional `installHint`.
    MissingExecPlugin {
        /// The command (not on PATH).
        command: String,
        /// `installHint`.
        install_hint: Option<String>,
    },
    /// `exec:` a plugin that writes `stderr` and exits 3, with `env` set for it (as
    /// kubelogin's service-principal mode passes a client secret).
    FailingExecPlugin {
        /// What it writes to stderr.
        stderr: String,
        /// `exec.env`.
        env: Vec<(String, String)>,
    },
    /// `client-certificate-data`/`client-key-data`: kubeadm's `kubernetes-admin`, signed by the
    /// cluster CA (see [`SimCluster::admin_client_cert`]).
    ClientCertificate,
}

/// One kubeconfig: a cluster entry and the admin user, context `sim` (the current one).
#[derive(Debug, Clone, Default)]
pub struct KubeconfigVariant {
    /// `server:`; default the simulator's `https://127.0.0.1:PORT`.
    pub server: Option<String>,
    /// `proxy-url:`.
    pub proxy_url: Option<String>,
    /// `tls-server-name:`.
    pub tls_server_name: Option<String>,
    /// `insecure-skip-tls-verify: true`.
    pub insecure_skip_tls_verify: bool,
    /// `certificate-authority-data:`.
    pub ca: CaData,
    /// The user's credentials.
    pub user: UserAuth,
}

impl SimCluster {
    /// The simulator's CA certificate (PEM), which signs the API server's certificate.
    pub fn ca_pem(&self) -> Result<String, SimError> {
        let doc = self.default_kubeconfig()?;
        let data = doc["clusters"][0]["cluster"]["certificate-authority-data"]
            .as_str()
            .ok_or_else(|| SimError::Config("the kubeconfig has no CA".into()))?;
        let pem = base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| SimError::Config(format!("the kubeconfig's CA: {e}")))?;
        String::from_utf8(pem).map_err(|e| SimError::Config(format!("the kubeconfig's CA: {e}")))
    }

    /// The admin user's bearer token.
    pub fn admin_token(&self) -> Result<String, SimError> {
        self.default_kubeconfig()?["users"]
            .as_array()
            .and_then(|users| users.iter().find(|u| u["name"] == "sim-admin"))
            .and_then(|u| u["user"]["token"].as_str())
            .map(str::to_owned)
            .ok_or_else(|| SimError::Config("the kubeconfig has no sim-admin token".into()))
    }

    /// kubeadm's `kubernetes-admin` client certificate and key (PEM), signed by the cluster
    /// CA, in the `kubeadm:cluster-admins` group.
    pub fn admin_client_cert(&self) -> Result<(String, String), SimError> {
        let dir = self
            .kubeconfig_path()
            .parent()
            .expect("in the simulator's dir");
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path)
                .map_err(|e| SimError::io(format!("reading {}", path.display()), e))
        };
        Ok((
            read(crate::tls::ADMIN_CERT_FILE)?,
            read(crate::tls::ADMIN_KEY_FILE)?,
        ))
    }

    fn default_kubeconfig(&self) -> Result<serde_json::Value, SimError> {
        let text = std::fs::read_to_string(self.kubeconfig_path()).map_err(|e| {
            SimError::io(format!("reading {}", self.kubeconfig_path().display()), e)
        })?;
        Ok(serde_json::from_str(&text)?)
    }

    /// Writes `variant` as `kubeconfig-<name>` next to the default kubeconfig (with any files
    /// it refers to) and returns its path.
    pub fn write_kubeconfig_variant(
        &self,
        name: &str,
        variant: &KubeconfigVariant,
    ) -> Result<PathBuf, SimError> {
        let dir = self
            .kubeconfig_path()
            .parent()
            .expect("the kubeconfig is in the simulator's dir")
            .to_path_buf();
        let write = |file: String, text: &str| -> Result<PathBuf, SimError> {
            let path = dir.join(file);
            std::fs::write(&path, text)
                .map_err(|e| SimError::io(format!("writing {}", path.display()), e))?;
            Ok(path)
        };
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s.as_bytes());
        let token = self.admin_token()?;

        let mut cluster = serde_json::json!({
            "server": variant.server.clone().unwrap_or_else(|| self.api_url()),
        });
        match &variant.ca {
            CaData::Sim => cluster["certificate-authority-data"] = b64(&self.ca_pem()?).into(),
            CaData::SimAnd(more) => {
                let bundle = format!("{}{more}", self.ca_pem()?);
                cluster["certificate-authority-data"] = b64(&bundle).into();
            }
            CaData::Absent => {}
        }
        if let Some(p) = &variant.proxy_url {
            cluster["proxy-url"] = p.clone().into();
        }
        if let Some(n) = &variant.tls_server_name {
            cluster["tls-server-name"] = n.clone().into();
        }
        if variant.insecure_skip_tls_verify {
            cluster["insecure-skip-tls-verify"] = true.into();
        }

        let user = match &variant.user {
            UserAuth::Token => serde_json::json!({ "token": token }),
            UserAuth::TokenFile => {
                let path = write(format!("{name}.token"), &token)?;
                serde_json::json!({ "tokenFile": path })
            }
            UserAuth::ExecPlugin => {
                // client-go's `ExecCredential` (client.authentication.k8s.io/v1), as kubelogin
                // prints it; the plugin finds the API version it is asked for in
                // KUBERNETES_EXEC_INFO, which this one does not need to read.
                let credential = serde_json::json!({
                    "apiVersion": "client.authentication.k8s.io/v1",
                    "kind": "ExecCredential",
                    "status": { "token": token },
                });
                let script = format!("#!/bin/sh\ncat <<'EOF'\n{credential}\nEOF\n");
                let path = write(format!("{name}-credential-plugin"), &script)?;
                make_executable(&path)?;
                serde_json::json!({ "exec": {
                    "apiVersion": "client.authentication.k8s.io/v1",
                    "command": path,
                    "args": ["get-token"],
                    "interactiveMode": "Never",
                }})
            }
            UserAuth::MissingExecPlugin {
                command,
                install_hint,
            } => {
                let mut exec = serde_json::json!({
                    "apiVersion": "client.authentication.k8s.io/v1",
                    "command": command,
                    "args": ["get-token"],
                    "interactiveMode": "IfAvailable",
                });
                if let Some(hint) = install_hint {
                    exec["installHint"] = hint.clone().into();
                }
                serde_json::json!({ "exec": exec })
            }
            UserAuth::FailingExecPlugin { stderr, env } => {
                let script = format!("#!/bin/sh\ncat >&2 <<'EOF'\n{stderr}\nEOF\nexit 3\n");
                let path = write(format!("{name}-credential-plugin"), &script)?;
                make_executable(&path)?;
                let env: Vec<_> = env
                    .iter()
                    .map(|(k, v)| serde_json::json!({ "name": k, "value": v }))
                    .collect();
                serde_json::json!({ "exec": {
                    "apiVersion": "client.authentication.k8s.io/v1",
                    "command": path,
                    "args": ["get-token"],
                    "env": env,
                    "interactiveMode": "Never",
                }})
            }
            UserAuth::ClientCertificate => {
                let (cert, key) = self.admin_client_cert()?;
                serde_json::json!({
                    "client-certificate-data": b64(&cert),
                    "client-key-data": b64(&key),
                })
            }
        };
        let doc = serde_json::json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{ "name": "sim", "cluster": cluster }],
            "users": [{ "name": "sim-admin", "user": user }],
            "contexts": [{
                "name": "sim",
                "context": { "cluster": "sim", "user": "sim-admin", "namespace": self.namespace() },
            }],
            "current-context": "sim",
        });
        write(
            format!("kubeconfig-{name}"),
            &serde_json::to_string_pretty(&doc)?,
        )
    }
}

fn make_executable(path: &std::path::Path) -> Result<(), SimError> {
    use std::os::unix::fs::PermissionsExt as _;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
        .map_err(|e| SimError::io(format!("chmod {}", path.display()), e))
}
