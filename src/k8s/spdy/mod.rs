//! SPDY/3.1 port-forward (`portforward.k8s.io`), the protocol `kubectl port-forward` falls
//! back to when the API server refuses its WebSocket upgrade.
//!
//! Why it exists: the API server authorizes the port-forward subresource by HTTP method. A
//! WebSocket upgrade is a GET and needs `get` on `pods/portforward`; SPDY is a POST and needs
//! `create` (apiserver `requestinfo.go`). Many Roles grant only `create` (what kubectl needed
//! for years), so etcd-proxy must be able to speak SPDY as kubectl does. From Kubernetes
//! 1.35 a WebSocket upgrade needs both verbs (`AuthorizePodWebsocketUpgradeCreatePermission`).
//!
//! - [`zlib`]: the header-block compression contexts and the SPDY/3 dictionary.
//! - [`frame`]: frames and a bounded decoder.
//! - [`conn`]: a client connection: the upgrade, many stream pairs over one connection,
//!   one pair (error stream + data stream) per forwarded TCP connection.
//!
//! The wire facts (header names, stream order, what the kubelet's streaming server does)
//! are written down in docs/spdy-portforward.md.

pub mod conn;
pub mod frame;
pub mod upgrade;
pub mod zlib;
