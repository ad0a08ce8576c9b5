//! The parts of etcd's Watch messages a resuming proxy reads and writes, walked on the wire
//! like the member rewrite (unknown fields are kept).
//!
//! Field numbers (`api/etcdserverpb/rpc.proto`, `api/mvccpb/kv.proto`, 3.4; the semantics the
//! resumption relies on are in `docs/etcd-protocols.md` §5):
//! `WatchRequest { create_request = 1; cancel_request = 2; progress_request = 3 }`,
//! `WatchCreateRequest { key = 1; range_end = 2; start_revision = 3; …; watch_id = 7 }`,
//! `WatchCancelRequest { watch_id = 1 }`,
//! `WatchResponse { header = 1; watch_id = 2; created = 3; canceled = 4; compact_revision = 5;
//! cancel_reason = 6; fragment = 7; events = 11 }`, `ResponseHeader { revision = 3 }`,
//! `Event { kv = 2 }`, `KeyValue { mod_revision = 3 }`.

use crate::protowire::{
    put_len_field, put_varint_field, read_varint, varint_value, Error, Field, Fields, LEN,
};

/// What a client's `WatchRequest` asks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Create a watch: the raw `WatchCreateRequest`, its start revision and requested ID.
    Create {
        /// The `WatchCreateRequest` bytes.
        create: Vec<u8>,
        /// `start_revision` (0: from now).
        start_revision: i64,
        /// `watch_id` the client asked for (0: let the server choose).
        watch_id: i64,
    },
    /// Cancel a watch.
    Cancel {
        /// The client's ID of the watch.
        watch_id: i64,
    },
    /// Anything else (progress requests, unknown future requests): forwarded as is.
    Other,
}

/// Parses one `WatchRequest`.
pub fn parse_request(msg: &[u8]) -> Result<Request, Error> {
    for field in Fields::new(msg) {
        let field = field?;
        match (field.number, field.wire_type) {
            (1, LEN) => {
                let (mut start_revision, mut watch_id) = (0, 0);
                for f in Fields::new(field.payload) {
                    let f = f?;
                    match (f.number, f.wire_type) {
                        (3, 0) => start_revision = varint_value(f.raw)? as i64,
                        (7, 0) => watch_id = varint_value(f.raw)? as i64,
                        _ => {}
                    }
                }
                return Ok(Request::Create {
                    create: field.payload.to_vec(),
                    start_revision,
                    watch_id,
                });
            }
            (2, LEN) => {
                let mut watch_id = 0;
                for f in Fields::new(field.payload) {
                    let f = f?;
                    if (f.number, f.wire_type) == (1, 0) {
                        watch_id = varint_value(f.raw)? as i64;
                    }
                }
                return Ok(Request::Cancel { watch_id });
            }
            _ => {}
        }
    }
    Ok(Request::Other)
}

/// A `WatchRequest` re-creating `create` from `start_revision`, letting the server choose
/// the ID (the proxy maps it back to the client's).
pub fn recreate(create: &[u8], start_revision: i64) -> Result<Vec<u8>, Error> {
    let mut inner = Vec::with_capacity(create.len() + 12);
    for f in Fields::new(create) {
        let f = f?;
        if f.number == 3 || f.number == 7 {
            continue;
        }
        inner.extend_from_slice(f.raw);
    }
    if start_revision > 0 {
        put_varint_field(&mut inner, 3, start_revision as u64);
    }
    let mut out = Vec::with_capacity(inner.len() + 4);
    put_len_field(&mut out, 1, &inner);
    Ok(out)
}

/// A `WatchRequest` cancelling `watch_id`.
pub fn cancel(watch_id: i64) -> Vec<u8> {
    let mut inner = Vec::new();
    put_varint_field(&mut inner, 1, watch_id as u64);
    let mut out = Vec::new();
    put_len_field(&mut out, 2, &inner);
    out
}

/// What the proxy needs to know of a `WatchResponse`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Response {
    /// `watch_id`.
    pub watch_id: i64,
    /// `created`.
    pub created: bool,
    /// `canceled`.
    pub canceled: bool,
    /// `fragment`: more of this response follows.
    pub fragment: bool,
    /// `header.revision`.
    pub revision: i64,
    /// The highest `kv.mod_revision` among the events, if there are events.
    pub last_event: Option<i64>,
}

/// Parses one `WatchResponse`.
pub fn parse_response(msg: &[u8]) -> Result<Response, Error> {
    let mut r = Response::default();
    for field in Fields::new(msg) {
        r.learn(&field?)?;
    }
    Ok(r)
}

/// The field number of `WatchResponse.events`.
pub const EVENTS: u64 = 11;

/// What the fields before the first event of a response still arriving say, once they are all
/// in (`None`: not yet, or not an event-carrying response). etcd marshals fields in number
/// order, so everything but the events precedes them: a response can be judged by its head
/// and its events passed on as they arrive.
pub fn parse_head(partial: &[u8]) -> Option<Response> {
    let mut r = Response::default();
    let mut fields = Fields::new(partial);
    loop {
        let mut at = fields.position();
        // The first event may still be arriving: its key is enough.
        if read_varint(partial, &mut at).ok()? >> 3 == EVENTS {
            return Some(r);
        }
        // An error here is most likely a field cut by the chunk boundary: wait for more.
        r.learn(&fields.next()?.ok()?).ok()?;
    }
}

impl Response {
    /// Takes in one top-level field of the response.
    pub(crate) fn learn(&mut self, field: &Field<'_>) -> Result<(), Error> {
        match (field.number, field.wire_type) {
            (1, LEN) => {
                for f in Fields::new(field.payload) {
                    let f = f?;
                    if (f.number, f.wire_type) == (3, 0) {
                        self.revision = varint_value(f.raw)? as i64;
                    }
                }
            }
            (2, 0) => self.watch_id = varint_value(field.raw)? as i64,
            (3, 0) => self.created = varint_value(field.raw)? != 0,
            (4, 0) => self.canceled = varint_value(field.raw)? != 0,
            (7, 0) => self.fragment = varint_value(field.raw)? != 0,
            (EVENTS, LEN) => {
                let rev = event_revision(field.payload)?;
                self.last_event = Some(self.last_event.map_or(rev, |l| l.max(rev)));
            }
            _ => {}
        }
        Ok(())
    }
}

/// `event.kv.mod_revision`.
pub(crate) fn event_revision(event: &[u8]) -> Result<i64, Error> {
    for f in Fields::new(event) {
        let f = f?;
        if (f.number, f.wire_type) == (2, LEN) {
            for kv in Fields::new(f.payload) {
                let kv = kv?;
                if (kv.number, kv.wire_type) == (3, 0) {
                    return Ok(varint_value(kv.raw)? as i64);
                }
            }
        }
    }
    Ok(0)
}

/// The response with its `watch_id` replaced (fields kept in order; the ID is written where
/// it stood, or after the header if it was 0 and so absent).
pub fn with_watch_id(msg: &[u8], watch_id: i64) -> Result<Vec<u8>, Error> {
    let mut out = Vec::with_capacity(msg.len() + 10);
    let mut written = false;
    for field in Fields::new(msg) {
        let field = field?;
        if (field.number, field.wire_type) == (2, 0) {
            if !written && watch_id != 0 {
                put_varint_field(&mut out, 2, watch_id as u64);
            }
            written = true;
            continue;
        }
        out.extend_from_slice(field.raw);
        if field.number == 1 && !written {
            if watch_id != 0 {
                put_varint_field(&mut out, 2, watch_id as u64);
            }
            written = true;
        }
    }
    if !written && watch_id != 0 {
        put_varint_field(&mut out, 2, watch_id as u64);
    }
    Ok(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// `WatchCreateRequest{key, range_end, start_revision, prev_kv}` in a `WatchRequest`.
    pub(crate) fn create_req(key: &[u8], start: i64, watch_id: i64) -> Vec<u8> {
        let mut c = Vec::new();
        put_len_field(&mut c, 1, key);
        put_len_field(&mut c, 2, b"\0");
        if start != 0 {
            put_varint_field(&mut c, 3, start as u64);
        }
        put_varint_field(&mut c, 6, 1);
        if watch_id != 0 {
            put_varint_field(&mut c, 7, watch_id as u64);
        }
        let mut w = Vec::new();
        put_len_field(&mut w, 1, &c);
        w
    }

    /// A `WatchResponse` with a header at `revision` and events at `event_revs`.
    pub(crate) fn resp(watch_id: i64, created: bool, revision: i64, event_revs: &[i64]) -> Vec<u8> {
        let mut header = Vec::new();
        put_varint_field(&mut header, 1, 7);
        put_varint_field(&mut header, 3, revision as u64);
        let mut m = Vec::new();
        put_len_field(&mut m, 1, &header);
        if watch_id != 0 {
            put_varint_field(&mut m, 2, watch_id as u64);
        }
        if created {
            put_varint_field(&mut m, 3, 1);
        }
        for rev in event_revs {
            let mut kv = Vec::new();
            put_len_field(&mut kv, 1, b"k");
            put_varint_field(&mut kv, 3, *rev as u64);
            put_len_field(&mut kv, 5, b"v");
            let mut ev = Vec::new();
            put_len_field(&mut ev, 2, &kv);
            put_len_field(&mut m, 11, &ev);
        }
        m
    }

    #[test]
    fn requests_parse_and_recreate_from_a_revision() {
        let req = create_req(b"/x", 0, 5);
        let Request::Create {
            create,
            start_revision,
            watch_id,
        } = parse_request(&req).unwrap()
        else {
            panic!("create expected");
        };
        assert_eq!((start_revision, watch_id), (0, 5));
        let again = recreate(&create, 42).unwrap();
        let Request::Create {
            create: c2,
            start_revision,
            watch_id,
        } = parse_request(&again).unwrap()
        else {
            panic!("create expected");
        };
        assert_eq!(
            (start_revision, watch_id),
            (42, 0),
            "start moved, ID left to the server"
        );
        assert!(c2.windows(2).any(|w| w == b"/x"), "key kept");
        assert!(c2.windows(2).any(|w| w == [0x30, 0x01]), "prev_kv kept");
        assert_eq!(
            parse_request(&cancel(9)).unwrap(),
            Request::Cancel { watch_id: 9 }
        );
        assert_eq!(
            parse_request(&[0x1a, 0x00]).unwrap(),
            Request::Other,
            "progress request"
        );
    }

    #[test]
    fn responses_report_ids_revisions_and_events() {
        let r = parse_response(&resp(3, true, 10, &[])).unwrap();
        assert_eq!(
            (r.watch_id, r.created, r.revision, r.last_event),
            (3, true, 10, None)
        );
        let r = parse_response(&resp(0, false, 12, &[11, 12])).unwrap();
        assert_eq!((r.watch_id, r.last_event), (0, Some(12)));
        assert!(
            parse_response(&[0x0a, 0x05, 0x18]).is_err(),
            "truncated header"
        );
    }

    #[test]
    fn watch_ids_are_replaced_in_place() {
        let original = resp(3, false, 12, &[12]);
        let out = with_watch_id(&original, 8).unwrap();
        assert_eq!(parse_response(&out).unwrap().watch_id, 8);
        assert_eq!(out.len(), original.len());
        // ID 0 is absent on the wire; giving it one inserts it after the header.
        let zero = resp(0, false, 12, &[12]);
        let out = with_watch_id(&zero, 2).unwrap();
        let parsed = parse_response(&out).unwrap();
        assert_eq!((parsed.watch_id, parsed.last_event), (2, Some(12)));
        // And back to 0 removes it.
        assert_eq!(with_watch_id(&out, 0).unwrap(), zero);
    }
}
