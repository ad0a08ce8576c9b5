//! Shared by the v2 and gateway rewrites: replace `clientURLs` in JSON member objects.
//!
//! Both APIs name the field `clientURLs` (v2: `httptypes.Member`; gateway: the proto field name)
//! and the member name `name`. Key order is preserved (`serde_json` `preserve_order`), and a
//! trailing newline (Go's `json.Encoder`) is kept.

use bytes::Bytes;
use serde_json::Value;

use super::{AddrMap, Error};

/// Parses a JSON body.
pub(super) fn parse(body: &[u8]) -> Result<Value, Error> {
    serde_json::from_slice(body).map_err(|e| Error::Json(e.to_string()))
}

/// Serialises `value`, ending with a newline if `original` did.
pub(super) fn emit(value: &Value, original: &[u8]) -> Result<Bytes, Error> {
    let mut out = serde_json::to_vec(value).map_err(|e| Error::Json(e.to_string()))?;
    if original.ends_with(b"\n") {
        out.push(b'\n');
    }
    Ok(Bytes::from(out))
}

/// Rewrites one member object in place; records it in `unmapped` if no pod matches.
pub(super) fn rewrite_member(member: &mut Value, map: &AddrMap, unmapped: &mut Vec<String>) {
    let Some(obj) = member.as_object_mut() else {
        return;
    };
    let name = obj
        .get("name")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let Some(Value::Array(urls)) = obj.get("clientURLs") else {
        return;
    };
    let urls: Vec<&str> = urls.iter().filter_map(Value::as_str).collect();
    if urls.is_empty() {
        return;
    }
    match map.local_for_member(&name, &urls) {
        Some(local) => {
            let local = Value::from(vec![local.to_owned()]);
            obj.insert("clientURLs".to_owned(), local);
        }
        None => unmapped.push(if name.is_empty() {
            urls[0].to_owned()
        } else {
            name
        }),
    }
}
