//! Authentication (bearer tokens) and a tiny RBAC for the kubeconfig users.
//!
//! etcd-proxy must work with, and report clearly on, the permissions real
//! restricted kubeconfigs have. Port-forward is authorized by HTTP method
//! (`requestinfo.go`): the WebSocket upgrade (GET) needs `get` on
//! `pods/portforward`, SPDY (POST) needs `create`, and from 1.35 the WebSocket
//! upgrade needs `create` too (`pkg/registry/core/pod/rest/subresources.go`).
//! So there are users with only `create` (what kubectl needed for years, the
//! common case), only `get`, neither, and one that cannot read pods.

use crate::random::random_hex;
use crate::SimError;

/// Which permissions a user has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Everything the simulator serves.
    Admin,
    /// get/list/watch on pods, statefulsets, services; no `pods/portforward`.
    NoPortforward,
    /// Everything except get/list/watch on pods.
    NoList,
    /// The Role of deploy/gateway.yaml for `--direct`: get/list/watch pods, get services and
    /// statefulsets, no `pods/portforward`.
    Gateway,
    /// Reads, and only `create` on `pods/portforward`.
    PortforwardCreateOnly,
    /// Reads, and only `get` on `pods/portforward`.
    PortforwardGetOnly,
}

/// One kubeconfig user.
#[derive(Debug, Clone)]
pub(crate) struct User {
    pub context: &'static str,
    pub name: &'static str,
    pub token: String,
    pub role: Role,
}

/// The authorisation attributes of a resource request
/// (`staging/src/k8s.io/apiserver/pkg/authorization/authorizer/interfaces.go`).
#[derive(Debug, Clone)]
pub(crate) struct Attributes<'a> {
    pub verb: &'a str,
    pub group: &'a str,
    pub resource: &'a str,
    pub subresource: &'a str,
    pub namespace: &'a str,
    pub name: &'a str,
}

/// The set of users of one simulated cluster, with fresh random tokens.
#[derive(Debug, Clone)]
pub(crate) struct Auth {
    pub users: Vec<User>,
}

impl Auth {
    pub fn generate() -> Result<Self, SimError> {
        let mk = |context, name, role| -> Result<User, SimError> {
            Ok(User {
                context,
                name,
                token: random_hex(24)?,
                role,
            })
        };
        Ok(Auth {
            users: vec![
                mk("sim", "sim-admin", Role::Admin)?,
                mk(
                    "sim-no-portforward",
                    "sim-no-portforward",
                    Role::NoPortforward,
                )?,
                mk("sim-no-list", "sim-no-list", Role::NoList)?,
                mk(
                    "sim-gateway",
                    "system:serviceaccount:etcd:etcd-proxy",
                    Role::Gateway,
                )?,
                mk(
                    "sim-portforward-create",
                    "sim-portforward-create",
                    Role::PortforwardCreateOnly,
                )?,
                mk(
                    "sim-portforward-get",
                    "sim-portforward-get",
                    Role::PortforwardGetOnly,
                )?,
            ],
        })
    }

    /// The cluster admin (what an admin client certificate authenticates as).
    pub fn admin(&self) -> Option<&User> {
        self.users.iter().find(|u| u.role == Role::Admin)
    }

    /// The user a `Authorization` header value authenticates, if any.
    pub fn authenticate(&self, header: Option<&str>) -> Option<&User> {
        let token = header?.strip_prefix("Bearer ")?.trim();
        self.users.iter().find(|u| u.token == token)
    }
}

impl User {
    /// RBAC decision for `a`.
    pub fn allows(&self, a: &Attributes<'_>) -> bool {
        let reads = matches!(a.verb, "get" | "list" | "watch");
        let portforward =
            a.group.is_empty() && a.resource == "pods" && a.subresource == "portforward";
        let pods = a.group.is_empty() && a.resource == "pods" && a.subresource.is_empty();
        match self.role {
            Role::Admin => true,
            Role::NoPortforward => reads && !portforward,
            Role::PortforwardCreateOnly => {
                if portforward {
                    a.verb == "create"
                } else {
                    reads
                }
            }
            Role::PortforwardGetOnly => {
                if portforward {
                    a.verb == "get"
                } else {
                    reads
                }
            }
            Role::NoList => {
                if pods {
                    false
                } else {
                    reads || (portforward && a.verb == "create")
                }
            }
            Role::Gateway => {
                let named = a.group.is_empty() && a.resource == "services"
                    || a.group == "apps" && a.resource == "statefulsets";
                (pods && reads) || (named && a.subresource.is_empty() && a.verb == "get")
            }
        }
    }
}
