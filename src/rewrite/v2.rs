//! The v2 API's URL-bearing responses (etcd 2.3.x, and 3.x with `--enable-v2`).
//!
//! * `GET /v2/members`: `{"members":[{"id","name","peerURLs","clientURLs"}]}` — what
//!   etcdctl v2 and the Go v2 client `Sync` to, replacing their endpoints with every
//!   `clientURLs` entry.
//! * `GET /v2/members/leader`: one member object.
//! * `GET /v2/machines`: text, the client URLs joined by `", "` (python-etcd, Patroni).
//!
//! Formats: `docs/etcd-protocols.md` §3.2 (captured from 3.4.23).

use bytes::Bytes;
use serde_json::Value;

use super::{json, AddrMap, Error, Rewritten};

/// Which v2 response a path names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum V2Route {
    /// `/v2/members`
    Members,
    /// `/v2/members/leader`
    Leader,
    /// `/v2/machines`
    Machines,
}

impl V2Route {
    /// The route for a request path (without query), if its response carries client URLs.
    pub fn from_path(path: &str) -> Option<Self> {
        match path.trim_end_matches('/') {
            "/v2/members" => Some(Self::Members),
            "/v2/members/leader" => Some(Self::Leader),
            "/v2/machines" => Some(Self::Machines),
            _ => None,
        }
    }
}

/// Rewrites the body of a successful response to `route`.
pub fn rewrite_body(route: V2Route, body: &[u8], map: &AddrMap) -> Result<Rewritten, Error> {
    let mut unmapped = Vec::new();
    let body = match route {
        V2Route::Members => {
            let mut v = json::parse(body)?;
            if let Some(Value::Array(members)) = v.get_mut("members") {
                for m in members {
                    json::rewrite_member(m, map, &mut unmapped);
                }
            }
            json::emit(&v, body)?
        }
        V2Route::Leader => {
            let mut v = json::parse(body)?;
            json::rewrite_member(&mut v, map, &mut unmapped);
            json::emit(&v, body)?
        }
        V2Route::Machines => rewrite_machines(body, map, &mut unmapped)?,
    };
    Ok(Rewritten { body, unmapped })
}

/// `http://a:2379, http://b:2379` → one local URL per member, in order, deduplicated.
fn rewrite_machines(
    body: &[u8],
    map: &AddrMap,
    unmapped: &mut Vec<String>,
) -> Result<Bytes, Error> {
    let text = std::str::from_utf8(body).map_err(|_| Error::NotUtf8)?;
    let mut out: Vec<&str> = Vec::new();
    for url in text.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let mapped = map.local_for_url(url).unwrap_or_else(|| {
            unmapped.push(url.to_owned());
            url
        });
        if !out.contains(&mapped) {
            out.push(mapped);
        }
    }
    Ok(Bytes::from(out.join(", ")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::tests::three_pods;

    /// Shape captured from etcd 3.4.23 `--enable-v2` (`docs/etcd-protocols.md` §3.2), with the
    /// in-cluster names a StatefulSet advertises.
    const MEMBERS: &str = concat!(
        r#"{"members":[{"id":"b71f75320dc06a6c","name":"etcd-0","peerURLs":["http://127.0.0.1:2380"],"#,
        r#""clientURLs":["http://etcd-0.etcd.etcd.svc.cluster.local:2379"]},"#,
        r#"{"id":"c1","name":"","peerURLs":["http://127.0.0.1:2381"],"clientURLs":[]},"#,
        r#"{"id":"d2","name":"etcd-2","peerURLs":["http://p"],"clientURLs":["http://etcd-2.etcd:2379","http://10.244.0.12:2379"]}]}"#,
        "\n"
    );

    #[test]
    fn members_get_their_local_urls_and_keep_everything_else() {
        let out = rewrite_body(V2Route::Members, MEMBERS.as_bytes(), &three_pods()).unwrap();
        let want = MEMBERS
            .replace(
                r#"["http://etcd-0.etcd.etcd.svc.cluster.local:2379"]"#,
                r#"["http://127.0.0.1:4002"]"#,
            )
            .replace(
                r#"["http://etcd-2.etcd:2379","http://10.244.0.12:2379"]"#,
                r#"["http://127.0.0.1:4004"]"#,
            );
        assert_eq!(std::str::from_utf8(&out.body).unwrap(), want);
        assert!(out.unmapped.is_empty());
    }

    #[test]
    fn leader_and_machines() {
        let leader =
            r#"{"id":"1","name":"etcd-1","peerURLs":[],"clientURLs":["http://etcd-1.etcd:2379"]}"#;
        let out = rewrite_body(V2Route::Leader, leader.as_bytes(), &three_pods()).unwrap();
        assert!(std::str::from_utf8(&out.body)
            .unwrap()
            .contains(r#""clientURLs":["http://127.0.0.1:4003"]"#));

        let machines = "http://etcd-0.etcd:2379, http://10.244.0.10:2379, http://etcd-1.etcd:2379, http://db:1";
        let out = rewrite_body(V2Route::Machines, machines.as_bytes(), &three_pods()).unwrap();
        assert_eq!(
            &out.body[..],
            b"http://127.0.0.1:4002, http://127.0.0.1:4003, http://db:1"
        );
        assert_eq!(out.unmapped, vec!["http://db:1".to_string()]);
    }

    #[test]
    fn malformed_bodies_are_errors() {
        assert!(matches!(
            rewrite_body(V2Route::Members, b"{\"members\":[", &three_pods()),
            Err(Error::Json(_))
        ));
        assert_eq!(
            rewrite_body(V2Route::Machines, &[0xff, 0xfe], &three_pods()),
            Err(Error::NotUtf8)
        );
    }

    #[test]
    fn routes() {
        assert_eq!(V2Route::from_path("/v2/members/"), Some(V2Route::Members));
        assert_eq!(V2Route::from_path("/v2/members/abc"), None);
        assert_eq!(V2Route::from_path("/v2/keys/a"), None);
    }
}
