//! Exec credential plugins gone wrong, said as kubectl says it and without secrets.
//!
//! A missing plugin is named with the kubeconfig's `installHint` (client-go
//! `plugin/pkg/client/auth/exec/exec.go` prints the hint after "executable … not found"),
//! else with where credential plugins are documented. A failing plugin is its exit status and
//! stderr: kube's own message quotes the command with its environment (kubeconfigs keep client
//! secrets there, e.g. kubelogin's `AAD_SERVICE_PRINCIPAL_CLIENT_SECRET`) and the plugin's
//! stdout (a partial credential), so it is never shown, at start-up or after a refresh.

use super::Error;

/// Where client-go sends users whose credential plugin is missing (its `installHintVerboseHelp`).
const CREDENTIAL_PLUGINS_DOC: &str =
    "https://kubernetes.io/docs/reference/access-authn-authz/authentication/#client-go-credential-plugins";

/// `source` in context: a missing or unstartable exec plugin is named with its install hint.
pub(super) fn client_error(config: &kube::Config, context: String, source: kube::Error) -> Error {
    let exec = config.auth_info.exec.as_ref();
    let command = exec.and_then(|e| e.command.clone()).unwrap_or_default();
    let io = match source {
        kube::Error::Auth(kube::client::AuthError::AuthExecStart(io)) => io,
        kube::Error::Auth(kube::client::AuthError::AuthExecRun { out, .. }) => {
            return Error::ExecPluginFailed {
                context,
                command,
                status: out.status,
                stderr: stderr_line(&out.stderr),
            };
        }
        source => return Error::Client { context, source },
    };
    if io.kind() != std::io::ErrorKind::NotFound {
        return Error::ExecPluginStart {
            context,
            command,
            source: io,
        };
    }
    let hint = exec
        .and_then(|e| e.install_hint.as_deref())
        .map(|h| h.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| {
            format!(
                "install it (on PATH) or fix users[].user.exec.command in the kubeconfig \
                 (client-go credential plugins: {CREDENTIAL_PLUGINS_DOC})"
            )
        });
    Error::ExecPluginMissing {
        context,
        command,
        hint,
    }
}

/// `: ` and a plugin's stderr on one line, or nothing if it wrote none.
fn stderr_line(stderr: &[u8]) -> String {
    let text = String::from_utf8_lossy(stderr);
    let line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if line.is_empty() {
        line
    } else {
        format!(": {line}")
    }
}

/// `err` on one line ([`crate::error::one_line`]), except that a failed exec plugin is only
/// its exit status and stderr: kube's message for it quotes the command's environment (where
/// kubeconfigs may keep a client secret) and the plugin's stdout. For every kube error that
/// may be shown after start-up (a credential refresh runs the plugin again).
pub(crate) fn safe_one_line(err: &(dyn std::error::Error + 'static)) -> String {
    match crate::error::find_cause::<kube::client::AuthError>(err) {
        Some(kube::client::AuthError::AuthExecRun { out, .. }) => format!(
            "the exec credential plugin failed ({}){}",
            out.status,
            stderr_line(&out.stderr)
        ),
        _ => crate::error::one_line(err),
    }
}

/// A kube error that renders as `safe_one_line` does and hides its chain, so that no later
/// rendering (the proxy's warnings walk an error's sources) reaches kube's own message of a
/// failed plugin. For errors kept inside other errors, such as a tunnel that did not open.
pub struct Redacted(String);

impl From<kube::Error> for Redacted {
    fn from(e: kube::Error) -> Self {
        Self(safe_one_line(&e))
    }
}

impl std::fmt::Display for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for Redacted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

impl std::error::Error for Redacted {}

#[cfg(test)]
mod tests {
    use std::os::unix::process::ExitStatusExt as _;

    use super::*;

    fn failed_plugin() -> kube::client::AuthError {
        kube::client::AuthError::AuthExecRun {
            cmd: "AAD_SERVICE_PRINCIPAL_CLIENT_SECRET=\"s3cret\" \"kubelogin\"".into(),
            out: Box::new(std::process::Output {
                status: std::process::ExitStatus::from_raw(3 << 8),
                stdout: b"{\"status\":{\"token\":\"half-a-t0ken\"}}".to_vec(),
                stderr: b"error: AADSTS7000215\n  invalid client secret\n".to_vec(),
            }),
        }
    }

    /// A failed exec plugin, directly or inside the service error of a later request, is its
    /// status and stderr only.
    #[test]
    fn a_failed_exec_plugin_never_shows_its_environment_or_stdout() {
        for err in [
            kube::Error::Auth(failed_plugin()),
            kube::Error::Service(Box::new(failed_plugin())),
        ] {
            let line = safe_one_line(&err);
            assert_eq!(
                line,
                "the exec credential plugin failed (exit status: 3): \
                 error: AADSTS7000215 invalid client secret"
            );
            assert!(
                crate::error::one_line(&err).contains("s3cret"),
                "kube's own text"
            );
        }
        let other = kube::Error::LinesCodecMaxLineLengthExceeded;
        assert_eq!(safe_one_line(&other), crate::error::one_line(&other));
    }

    /// A tunnel that did not open because the plugin failed on a credential refresh: its
    /// error, rendered the way the proxy's warnings render errors, has no secret either.
    #[test]
    fn a_tunnel_error_from_a_failed_plugin_keeps_its_secrets() {
        let tunnel = crate::k8s::tunnel::Error::Open {
            pod: "etcd-0".into(),
            source: kube::Error::Auth(failed_plugin()).into(),
        };
        let line = crate::error::one_line(&tunnel);
        assert_eq!(
            line,
            "cannot open a port-forward tunnel to pod etcd-0: the exec credential plugin failed \
             (exit status: 3): error: AADSTS7000215 invalid client secret"
        );
        let spdy = crate::k8s::spdy::upgrade::UpgradeError::Kube(
            kube::Error::Service(Box::new(failed_plugin())).into(),
        );
        let line = crate::error::one_line(&spdy);
        assert!(
            !line.contains("s3cret") && !line.contains("t0ken"),
            "{line}"
        );
        assert!(line.contains("invalid client secret"), "{line}");
    }
}
