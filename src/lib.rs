//! # etcd-proxy
//!
//! One stable, local etcd endpoint into a Kubernetes cluster. etcd-proxy tunnels to the etcd
//! pods through the Kubernetes port-forward API and serves etcd's protocols at L7, rewriting
//! the member client URLs etcd advertises (in-cluster DNS names a laptop cannot resolve) into
//! local endpoints, so clients that sync endpoints from the member list keep using the proxy.
//!
//! ## Data flow
//!
//! ```text
//!  etcdctl / clients
//!       │ TCP, optionally TLS: HTTP/2 prior knowledge (gRPC) or HTTP/1.1 (v2, gateway, WebSocket)
//!       ▼
//!  listener ──► router ──► auth ──► proxy ──► rewrite ──► upstream pool ──► dialer ──► etcd
//!  (accept, TLS, (gRPC or  (users,  (forward,  (Member*    (one h2 conn    (port-forward
//!   :authority    HTTP;     tokens,  replay,    responses,  per member;     tunnel, or TCP
//!   repair, h1/h2) member,  Basic)   resume     v2, gw)     h1 pool; TLS    with --direct /
//!                 leader)            watches)               to etcd)        --endpoints)
//!       ▲                                                                     ▲
//!       └──── k8s::discovery (list/watch pods) → endpoints, router, health ───┘
//! ```
//!
//! ## Layout
//!
//! * [`cli`] → [`config`]: flags, then a validated configuration.
//! * [`app`]: the composition root; the only module that wires the others.
//! * [`env`](mod@env): `--env`, the etcdctl environment for a proxy.
//! * [`endpoints`]: one local endpoint per member, following scale-up and scale-down.
//! * [`auth`]: users, proxy-issued tokens, Basic auth; etcd's own auth passes through.
//! * [`listener`]: local endpoints (cluster and one per member), a span per connection.
//! * [`router`]: protocol class, rewrite needed, member choice.
//! * [`proxy`]: the per-request pipeline and protocol-correct errors.
//! * [`rewrite`]: pure byte-exact rewriting of member URLs (gRPC, v2, gateway).
//! * [`upstream`]: one HTTP/2 connection per member and pooled HTTP/1.1 connections, over a
//!   dialer seam.
//! * [`k8s`]: kubeconfig, pod discovery, port-forward tunnels (WebSocket, or SPDY/3.1 when the
//!   API server refuses WebSocket: `k8s::spdy`).
//! * [`admin`], [`metrics`]: the optional admin listener, `/metrics` and `/healthz`.
//! * [`error`], [`telemetry`], [`shutdown`]: leaves open to all: error plumbing, logging, signals.
//!   `coalesce` (private) makes `h2` write small frames together, for the listener and upstream.

pub mod admin;
pub mod app;
pub mod auth;
pub mod cli;
mod coalesce;
pub mod config;
pub mod endpoints;
pub mod env;
pub mod error;
/// Entry points for the fuzz targets and property tests; not API.
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod k8s;
pub mod listener;
pub mod member;
pub mod metrics;
mod pem;
mod protowire;
pub mod proxy;
pub mod rewrite;
pub mod router;
pub mod shutdown;
pub mod telemetry;
pub mod upstream;
