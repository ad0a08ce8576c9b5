//! The v3 JSON gateway's member endpoints: `POST /v3{,beta,alpha}/cluster/member/{list,add,
//! remove,update,promote}`.
//!
//! The gateway marshals with proto field names (`members[*].clientURLs`, `member` for
//! MemberAdd) and 64-bit integers as strings (`docs/etcd-protocols.md` §4.2). Everything but
//! `clientURLs` is re-emitted as parsed.

use serde_json::Value;

use super::{json, AddrMap, Error, Rewritten};

/// Whether `path` is a gateway member endpoint whose response we rewrite.
pub fn is_member_path(path: &str) -> bool {
    let Some(rest) = ["/v3/", "/v3beta/", "/v3alpha/"]
        .iter()
        .find_map(|p| path.strip_prefix(p))
    else {
        return false;
    };
    matches!(
        rest.trim_end_matches('/'),
        "cluster/member/list"
            | "cluster/member/add"
            | "cluster/member/remove"
            | "cluster/member/update"
            | "cluster/member/promote"
    )
}

/// Rewrites a gateway member response body.
pub fn rewrite_body(body: &[u8], map: &AddrMap) -> Result<Rewritten, Error> {
    let mut v = json::parse(body)?;
    let mut unmapped = Vec::new();
    if let Some(Value::Array(members)) = v.get_mut("members") {
        for m in members {
            json::rewrite_member(m, map, &mut unmapped);
        }
    }
    if let Some(m) = v.get_mut("member") {
        json::rewrite_member(m, map, &mut unmapped);
    }
    Ok(Rewritten {
        body: json::emit(&v, body)?,
        unmapped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rewrite::tests::three_pods;

    #[test]
    fn captured_gateway_member_list() {
        // etcd 3.4.23 (docs/etcd-protocols.md §4.2), member renamed to a pod name.
        let body = concat!(
            r#"{"header":{"cluster_id":"2037210783374497686","member_id":"13195394291058371180","raft_term":"2"},"#,
            r#""members":[{"ID":"13195394291058371180","name":"etcd-0","peerURLs":["http://127.0.0.1:2380"],"#,
            r#""clientURLs":["http://10.99.0.1:2379","http://127.0.0.1:2379"]}]}"#
        );
        let out = rewrite_body(body.as_bytes(), &three_pods()).unwrap();
        let want = body.replace(
            r#"["http://10.99.0.1:2379","http://127.0.0.1:2379"]"#,
            r#"["http://127.0.0.1:4002"]"#,
        );
        assert_eq!(std::str::from_utf8(&out.body).unwrap(), want);
    }

    #[test]
    fn member_add_response_and_errors() {
        let body = r#"{"member":{"ID":"5","peerURLs":["http://p:2380"]},"members":[{"name":"etcd-2","clientURLs":["http://etcd-2.etcd:2379"]}]}"#;
        let out = rewrite_body(body.as_bytes(), &three_pods()).unwrap();
        let s = std::str::from_utf8(&out.body).unwrap();
        assert!(s.contains(r#"{"ID":"5","peerURLs":["http://p:2380"]}"#));
        assert!(s.contains(r#""clientURLs":["http://127.0.0.1:4004"]"#));
        assert!(rewrite_body(b"not json", &three_pods()).is_err());
    }

    #[test]
    fn numbers_keep_their_value() {
        // serde_json's default number parse reads this one ulp off; re-emitted, the client
        // would read another number than etcd sent (found by the `gateway_rewrite` fuzzer).
        for n in [
            "9.999900000015909e+30",
            "30000381186101626377398",
            "0.1",
            "-7",
        ] {
            let body = format!(r#"{{"members":[],"n":{n}}}"#);
            let out = rewrite_body(body.as_bytes(), &three_pods()).unwrap();
            let out = std::str::from_utf8(&out.body).unwrap();
            let emitted = out
                .strip_prefix(r#"{"members":[],"n":"#)
                .and_then(|s| s.strip_suffix('}'))
                .unwrap();
            assert_eq!(
                emitted.parse::<f64>().unwrap(),
                n.parse::<f64>().unwrap(),
                "{n} became {emitted}"
            );
            let again = rewrite_body(out.as_bytes(), &three_pods()).unwrap();
            assert_eq!(std::str::from_utf8(&again.body).unwrap(), out);
        }
    }

    #[test]
    fn paths() {
        assert!(is_member_path("/v3/cluster/member/list"));
        assert!(is_member_path("/v3beta/cluster/member/add"));
        assert!(!is_member_path("/v3/kv/range"));
        assert!(!is_member_path("/v2/members"));
    }
}
