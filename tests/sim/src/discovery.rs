//! API discovery (`/api`, `/apis`, `/api/v1`, `/apis/apps/v1`), which kubectl reads before
//! anything else to map `pod/NAME` to a resource.
//!
//! Served in the legacy (unaggregated) form: kubectl asks for aggregated discovery in its
//! `Accept` header, and client-go falls back to the legacy documents when the answer is
//! plain `application/json` (`staging/src/k8s.io/client-go/discovery/discovery_client.go`
//! `ServerGroupsAndResources`). Every authenticated user may read them (the
//! `system:discovery` ClusterRole), so they pass no RBAC check here. Only the resources the
//! simulator serves are listed; shapes follow `metav1.APIVersions`, `APIGroupList` and
//! `APIResourceList` (`staging/src/k8s.io/apimachinery/pkg/apis/meta/v1/types.go`).

use serde_json::{json, Value};

/// The discovery document at `path`, if it is one.
pub(crate) fn document(path: &str, server_address: &str) -> Option<Value> {
    Some(match path.trim_end_matches('/') {
        "/api" => json!({
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [
                {"clientCIDR": "0.0.0.0/0", "serverAddress": server_address}
            ],
        }),
        "/apis" => json!({
            "kind": "APIGroupList",
            "apiVersion": "v1",
            "groups": [{
                "name": "apps",
                "versions": [{"groupVersion": "apps/v1", "version": "v1"}],
                "preferredVersion": {"groupVersion": "apps/v1", "version": "v1"},
            }],
        }),
        "/api/v1" => json!({
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [
                {
                    "name": "pods", "singularName": "pod", "namespaced": true, "kind": "Pod",
                    "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
                    "shortNames": ["po"], "categories": ["all"],
                },
                {
                    "name": "pods/portforward", "singularName": "", "namespaced": true,
                    "kind": "PodPortForwardOptions", "verbs": ["create", "get"],
                },
                {
                    "name": "services", "singularName": "service", "namespaced": true, "kind": "Service",
                    "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
                    "shortNames": ["svc"], "categories": ["all"],
                },
            ],
        }),
        "/apis/apps/v1" => json!({
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": "apps/v1",
            "resources": [{
                "name": "statefulsets", "singularName": "statefulset", "namespaced": true,
                "kind": "StatefulSet",
                "verbs": ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"],
                "shortNames": ["sts"], "categories": ["all"],
            }],
        }),
        _ => return None,
    })
}
