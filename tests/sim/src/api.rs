//! The HTTPS API server: TLS accept loop, authentication, routing, authorisation.
//!
//! It serves the handful of read paths etcd-proxy uses (pods, the StatefulSet,
//! the Service, `/version`) plus the `portforward` connect subresource, with
//! the apiserver's status codes and `Status` bodies. Paths follow
//! `staging/src/k8s.io/apiserver/pkg/endpoints/request/requestinfo.go`:
//! `/api/v1/namespaces/{ns}/{resource}[/{name}[/{subresource}]]` and
//! `/apis/{group}/{version}/namespaces/{ns}/...`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::auth::{Attributes, User};
use crate::faults::PortForwardFault;
use crate::selector::{FieldSelector, LabelSelector};
use crate::{objects, portforward, status, watch, Shared};

/// Response body: full JSON documents or a streamed watch.
pub(crate) type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A body holding `bytes`.
pub(crate) fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into()).boxed_unsync()
}

/// A JSON response with `Content-Type: application/json`.
pub(crate) fn json_response(code: StatusCode, value: &Value) -> Response<Body> {
    let body = serde_json::to_vec(value).unwrap_or_else(|e| {
        format!(r#"{{"kind":"Status","apiVersion":"v1","status":"Failure","message":"{e}"}}"#)
            .into_bytes()
    });
    let mut res = Response::new(full(body));
    *res.status_mut() = code;
    res.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    res
}

/// A `Status` error response; the HTTP code is the Status' `code`.
pub(crate) fn status_response(value: Value) -> Response<Body> {
    let code = value
        .get("code")
        .and_then(Value::as_u64)
        .and_then(|c| u16::try_from(c).ok())
        .and_then(|c| StatusCode::from_u16(c).ok())
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    json_response(code, &value)
}

/// Accepts TLS connections until the task is aborted; aborting also drops
/// (and so closes) every connection it spawned.
pub(crate) async fn serve(listener: TcpListener, acceptor: TlsAcceptor, shared: Arc<Shared>) {
    let mut conns = JoinSet::new();
    loop {
        while conns.try_join_next().is_some() {}
        let (tcp, _) = match listener.accept().await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        let shared = shared.clone();
        // Under TLS, so that the silent faults act on the TCP connection (`faults`).
        let valve = shared.faults.valve();
        conns.spawn(async move {
            let tls = match acceptor.accept(valve.wrap(tcp)).await {
                Ok(tls) => tls,
                Err(e) => {
                    tracing::debug!("TLS handshake failed: {e}");
                    return;
                }
            };
            // A verified client certificate authenticates every request on the connection.
            let cert_user = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|leaf| crate::tls::cert_admin(leaf));
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                req.extensions_mut().insert(valve.clone());
                let shared = shared.clone();
                let cert_user = cert_user.clone();
                async move { Ok::<_, Infallible>(handle(shared, req, cert_user).await) }
            });
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await
            {
                tracing::debug!("connection ended with error: {e}");
            }
        });
    }
}

/// A parsed resource path.
#[derive(Debug)]
struct Route<'a> {
    group: &'a str,
    resource: &'a str,
    namespace: &'a str,
    name: &'a str,
    subresource: &'a str,
}

fn parse_route(path: &str) -> Option<Route<'_>> {
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, rest) = match segs.as_slice() {
        ["api", "v1", rest @ ..] => ("", rest),
        ["apis", "apps", "v1", rest @ ..] => ("apps", rest),
        _ => return None,
    };
    let (namespace, rest) = match rest {
        ["namespaces", ns, rest @ ..] if !rest.is_empty() => (*ns, rest),
        rest => ("", rest),
    };
    let (resource, name, subresource) = match rest {
        [r] => (*r, "", ""),
        [r, n] => (*r, *n, ""),
        [r, n, s] => (*r, *n, *s),
        _ => return None,
    };
    let known = matches!(
        (group, resource, subresource),
        ("", "pods", "")
            | ("", "pods", "portforward")
            | ("", "services", "")
            | ("apps", "statefulsets", "")
    );
    known.then_some(Route {
        group,
        resource,
        namespace,
        name,
        subresource,
    })
}

fn query_map(req: &Request<Incoming>) -> HashMap<String, String> {
    req.uri()
        .query()
        .map(|q| {
            url::form_urlencoded::parse(q.as_bytes())
                .into_owned()
                .collect()
        })
        .unwrap_or_default()
}

fn forbidden(user: &User, a: &Attributes<'_>) -> Response<Body> {
    if a.namespace.is_empty() {
        // Cluster-scoped wording of ForbiddenStatusError.
        let full = a.resource;
        let msg = format!(
            "{full} is forbidden: User {:?} cannot {} resource {full:?} in API group {:?} at the cluster scope",
            user.name, a.verb, a.group
        );
        return status_response(status::failure(
            403,
            "Forbidden",
            &msg,
            Some(json!({"kind": a.resource})),
        ));
    }
    status_response(status::forbidden(
        user.name,
        a.verb,
        a.group,
        a.resource,
        a.subresource,
        a.namespace,
        a.name,
    ))
}

/// Handles one request (after the injected latency). `cert_user`: the admin a verified client
/// certificate on the connection names.
async fn handle(
    shared: Arc<Shared>,
    req: Request<Incoming>,
    cert_user: Option<String>,
) -> Response<Body> {
    let latency = shared.latency();
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let auth_header = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    // kube-apiserver's authenticator union tries x509 client certificates before bearer
    // tokens (`pkg/kubeapiserver/authenticator/config.go`); the first that succeeds wins.
    let user = match cert_user {
        Some(_) => shared.auth.admin(),
        None => shared.auth.authenticate(auth_header),
    };
    let Some(user) = user.cloned() else {
        return status_response(status::unauthorized());
    };
    let path = req.uri().path().to_string();
    if path == "/version" {
        return json_response(StatusCode::OK, &version(shared.cfg.kubernetes_minor));
    }
    if req.method() == Method::GET {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .unwrap_or_default();
        if let Some(doc) = crate::discovery::document(&path, host) {
            return json_response(StatusCode::OK, &doc);
        }
    }
    let Some(route) = parse_route(&path) else {
        return status_response(status::path_not_found());
    };
    let query = query_map(&req);
    let is_watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let method = req.method().clone();
    // The verb comes from the method (`requestinfo.go`): GET → get, POST → create. So a
    // WebSocket port-forward (GET) is a `get`, a SPDY one (POST) a `create`.
    let verb = match (&method, route.subresource, route.name.is_empty()) {
        (&Method::GET, "portforward", _) => "get",
        (&Method::POST, "portforward", _) => "create",
        (&Method::GET, _, true) if is_watch => "watch",
        (&Method::GET, _, true) => "list",
        (&Method::GET, _, false) => "get",
        _ => return status_response(status::method_not_allowed()),
    };
    let attrs = Attributes {
        verb,
        group: route.group,
        resource: route.resource,
        subresource: route.subresource,
        namespace: route.namespace,
        name: route.name,
    };
    if !user.allows(&attrs) {
        return forbidden(&user, &attrs);
    }
    if route.subresource == "portforward"
        && shared.cfg.kubernetes_minor >= 35
        && verb != "create"
        && !user.allows(&Attributes {
            verb: "create",
            ..attrs.clone()
        })
    {
        // 1.35+ (`AuthorizePodWebsocketUpgradeCreatePermission`): `PortForwardREST.Connect`
        // re-checks with verb `create` (`pkg/registry/core/pod/rest/subresources.go`
        // `ensureAuthorizedForVerb`, kubernetes#133515) and answers `NewForbidden(pods, name,
        // reason)`; RBAC gives an empty reason when it denies.
        return status_response(status::failure(
            403,
            "Forbidden",
            &format!("pods {:?} is forbidden: ", route.name),
            Some(json!({"name": route.name, "kind": "pods"})),
        ));
    }
    let ns_ok = route.namespace.is_empty() || route.namespace == shared.cfg.namespace;
    match (route.resource, route.subresource) {
        ("pods", "portforward") => {
            if ns_ok && shared.faults.get(route.name) == Some(PortForwardFault::Unanswered) {
                // The API server waits for the wedged kubelet's answer without a deadline.
                shared
                    .faults
                    .while_in_force(route.name, PortForwardFault::Unanswered)
                    .await;
            }
            portforward::handle(shared.clone(), req, route.namespace, route.name, &query)
        }
        ("pods", _) if route.name.is_empty() => pods_collection(&shared, ns_ok, &query, is_watch),
        ("pods", _) => {
            let pod = if ns_ok {
                shared.store.pod_state(route.name)
            } else {
                None
            };
            match pod {
                Some(p) => object_response(&objects::pod(&shared.store.id, &p)),
                None => status_response(status::not_found("", "pods", route.name)),
            }
        }
        ("statefulsets", _) => {
            let sts = objects::statefulset(&shared.store.id, shared.store.statefulset_status());
            single_or_list(
                &shared,
                ns_ok,
                &route,
                &sts,
                ("StatefulSet", "apps/v1"),
                &query,
                is_watch,
            )
        }
        ("services", _) => {
            let rv = shared.store.service_rv();
            let svc = objects::service(&shared.store.id, rv);
            single_or_list(
                &shared,
                ns_ok,
                &route,
                &svc,
                ("Service", "v1"),
                &query,
                is_watch,
            )
        }
        _ => status_response(status::path_not_found()),
    }
}

fn version(minor: u32) -> Value {
    json!({
        "major": "1",
        "minor": minor.to_string(),
        "gitVersion": format!("v1.{minor}.0-etcd-proxy-sim"),
        "gitCommit": "0000000000000000000000000000000000000000",
        "gitTreeState": "clean",
        "buildDate": "2025-04-23T00:00:00Z",
        "goVersion": "go1.24.2",
        "compiler": "gc",
        "platform": "linux/amd64",
    })
}

fn object_response<T: serde::Serialize>(obj: &T) -> Response<Body> {
    match objects::to_json(obj) {
        Ok(v) => json_response(StatusCode::OK, &v),
        Err(e) => status_response(status::failure(500, "InternalError", &e.to_string(), None)),
    }
}

/// Removes `apiVersion`/`kind` from a list item, as the apiserver's list encoding does.
fn as_list_item(mut v: Value) -> Value {
    if let Some(m) = v.as_object_mut() {
        m.remove("apiVersion");
        m.remove("kind");
    }
    v
}

/// Parses the `labelSelector` / `fieldSelector` query parameters.
pub(crate) fn selectors(
    query: &HashMap<String, String>,
    fields: &[&str],
) -> Result<(LabelSelector, FieldSelector), String> {
    let labels = LabelSelector::parse(query.get("labelSelector").map_or("", String::as_str))?;
    let fields = FieldSelector::parse(
        query.get("fieldSelector").map_or("", String::as_str),
        fields,
    )?;
    Ok((labels, fields))
}

/// Fields a pod field selector may use (a subset of `pkg/registry/core/pod/strategy.go` `ToSelectableFields`).
pub(crate) const POD_FIELDS: &[&str] = &[
    "metadata.name",
    "metadata.namespace",
    "status.phase",
    "spec.nodeName",
    "status.podIP",
];

/// Value of a selectable pod field.
pub(crate) fn pod_field(pod: &k8s_openapi::api::core::v1::Pod, field: &str) -> String {
    let status = pod.status.as_ref();
    match field {
        "metadata.name" => pod.metadata.name.clone(),
        "metadata.namespace" => pod.metadata.namespace.clone(),
        "status.phase" => status.and_then(|s| s.phase.clone()),
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()),
        "spec.nodeName" => pod.spec.as_ref().and_then(|s| s.node_name.clone()),
        _ => None,
    }
    .unwrap_or_default()
}

fn pods_collection(
    shared: &Arc<Shared>,
    ns_ok: bool,
    query: &HashMap<String, String>,
    is_watch: bool,
) -> Response<Body> {
    let (labels, fields) = match selectors(query, POD_FIELDS) {
        Ok(s) => s,
        Err(msg) => return status_response(status::bad_request(&msg)),
    };
    if is_watch {
        return watch::watch_pods(shared.clone(), ns_ok, labels, fields, query);
    }
    // `limit`/`continue` are ignored: returning everything without a continue
    // token is allowed by the API (`limit` is a maximum, servers may ignore it).
    let (pods, rv) = shared.store.pods();
    let items = if ns_ok {
        pods.iter()
            .filter(|p| {
                let l = p.metadata.labels.clone().unwrap_or_default();
                labels.matches(&l) && fields.matches(|f| pod_field(p, f))
            })
            .filter_map(|p| objects::to_json(p).ok())
            .map(as_list_item)
            .collect()
    } else {
        Vec::new()
    };
    json_response(StatusCode::OK, &objects::list("Pod", "v1", rv, items))
}

fn single_or_list<T: serde::Serialize>(
    shared: &Arc<Shared>,
    ns_ok: bool,
    route: &Route<'_>,
    obj: &T,
    (kind, api_version): (&str, &str),
    query: &HashMap<String, String>,
    is_watch: bool,
) -> Response<Body> {
    let id = &shared.store.id;
    // kubeadm's control plane has no etcd StatefulSet or Service: gets are 404, lists empty.
    let ns_ok = ns_ok && id.layout == crate::Layout::StatefulSet;
    if !route.name.is_empty() {
        return if ns_ok && route.name == id.name {
            object_response(obj)
        } else {
            status_response(status::not_found(route.group, route.resource, route.name))
        };
    }
    if is_watch {
        // Simulator limitation: only pods can be watched (etcd-proxy watches
        // pods only). A 405 keeps the gap loud instead of faking a stream.
        return status_response(status::method_not_allowed());
    }
    let (labels, fields) = match selectors(query, &["metadata.name", "metadata.namespace"]) {
        Ok(s) => s,
        Err(msg) => return status_response(status::bad_request(&msg)),
    };
    let matches = labels.matches(&id.selector_labels())
        && fields.matches(|f| match f {
            "metadata.name" => id.name.clone(),
            _ => id.namespace.clone(),
        });
    let items = match objects::to_json(obj) {
        Ok(v) if ns_ok && matches => vec![as_list_item(v)],
        _ => Vec::new(),
    };
    let rv = shared.store.resource_version();
    json_response(StatusCode::OK, &objects::list(kind, api_version, rv, items))
}
