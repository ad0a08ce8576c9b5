//! `metav1.Status` error bodies, worded exactly like the apiserver's.
//!
//! Clients branch on these (kube-rs surfaces them as `Error::Api`, kube-runtime's
//! watcher relists on a 410 `Expired`), so code, reason, message and details
//! follow `staging/src/k8s.io/apimachinery/pkg/api/errors/errors.go` and
//! `staging/src/k8s.io/apiserver/pkg/endpoints/handlers/responsewriters/errors.go`.

use serde_json::{json, Value};

/// A failure `Status` with the given code, reason, message and optional details.
pub(crate) fn failure(code: u16, reason: &str, message: &str, details: Option<Value>) -> Value {
    let mut status = json!({
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    });
    if let (Some(details), Some(map)) = (details, status.as_object_mut()) {
        map.insert("details".to_string(), details);
    }
    status
}

/// Details object as in `errors.go`: `{name, group?, kind: <resource>}`.
fn details(group: &str, resource: &str, name: &str) -> Value {
    let mut d = serde_json::Map::new();
    if !name.is_empty() {
        d.insert("name".into(), json!(name));
    }
    if !group.is_empty() {
        d.insert("group".into(), json!(group));
    }
    d.insert("kind".into(), json!(resource));
    Value::Object(d)
}

/// `schema.GroupResource.String()`: `pods`, `statefulsets.apps`.
fn group_resource(group: &str, resource: &str) -> String {
    if group.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}.{group}")
    }
}

/// 401, as written by the authentication filter
/// (`staging/src/k8s.io/apiserver/pkg/endpoints/handlers/responsewriters/errors.go` `unauthorized`).
pub(crate) fn unauthorized() -> Value {
    failure(401, "Unauthorized", "Unauthorized", None)
}

/// 403 from `ForbiddenStatusError` + `errors.NewForbidden` for a namespaced resource request.
pub(crate) fn forbidden(
    user: &str,
    verb: &str,
    group: &str,
    resource: &str,
    subresource: &str,
    namespace: &str,
    name: &str,
) -> Value {
    let full = if subresource.is_empty() {
        resource.to_string()
    } else {
        format!("{resource}/{subresource}")
    };
    let reason = format!(
        "User {user:?} cannot {verb} resource {full:?} in API group {group:?} in the namespace {namespace:?}"
    );
    let gr = group_resource(group, resource);
    let message = if name.is_empty() {
        format!("{gr} is forbidden: {reason}")
    } else {
        format!("{gr} {name:?} is forbidden: {reason}")
    };
    failure(
        403,
        "Forbidden",
        &message,
        Some(details(group, resource, name)),
    )
}

/// 404 from `errors.NewNotFound`.
pub(crate) fn not_found(group: &str, resource: &str, name: &str) -> Value {
    let message = format!("{} {name:?} not found", group_resource(group, resource));
    failure(
        404,
        "NotFound",
        &message,
        Some(details(group, resource, name)),
    )
}

/// 404 for a path no API group serves (the apiserver's `NotFound` handler).
pub(crate) fn path_not_found() -> Value {
    failure(
        404,
        "NotFound",
        "the server could not find the requested resource",
        Some(json!({})),
    )
}

/// 405 for a verb the resource does not support (`errors.NewMethodNotSupported` wording).
pub(crate) fn method_not_allowed() -> Value {
    failure(
        405,
        "MethodNotAllowed",
        "the server does not allow this method on the requested resource",
        Some(json!({})),
    )
}

/// 400 `BadRequest`.
pub(crate) fn bad_request(message: &str) -> Value {
    failure(400, "BadRequest", message, None)
}

/// 410 `Expired`, as the watch cache reports a too old resourceVersion
/// (`staging/src/k8s.io/apiserver/pkg/storage/cacher/watch_cache.go`:
/// `errors.NewResourceExpired(fmt.Sprintf("too old resource version: %d (%d)", resourceVersion, oldest-1))`).
pub(crate) fn expired(requested: u64, oldest_minus_one: u64) -> Value {
    failure(
        410,
        "Expired",
        &format!("too old resource version: {requested} ({oldest_minus_one})"),
        None,
    )
}
