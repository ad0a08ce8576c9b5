//! The bookkeeping of one client Watch stream, apart from any I/O: which watches the client
//! holds, the next revision each has not delivered, the creates upstream has not answered, and
//! how upstream watch IDs map to the client's.
//!
//! Invariants:
//! * the client only ever sees its own watch IDs: every upstream response is translated, and a
//!   re-creation's `created` reply is swallowed;
//! * `next_rev` of a watch only grows: it is the revision after the last event delivered, or
//!   after a progress notification's revision, so a re-creation from it delivers every event
//!   exactly once;
//! * creates are answered in the order they were sent (etcd serves one stream's requests in
//!   order), so `pending` is a queue.

use std::collections::{BTreeMap, HashMap, VecDeque};

use super::proto;

/// One watch the client holds.
struct Watch {
    /// The client's `WatchCreateRequest`.
    create: Vec<u8>,
    /// The first revision the client has not seen.
    next_rev: i64,
}

/// A create sent upstream and not yet answered, in order (etcd answers creates in order).
enum Pending {
    /// The client's own create: the client ID it will get, its request, its start revision.
    New {
        client_id: i64,
        create: Vec<u8>,
        start_revision: i64,
    },
    /// Our re-creation of an existing watch after a reconnect.
    Resume { client_id: i64 },
}

/// What becomes of an upstream response.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Translated {
    /// Goes to the client as it came.
    Pass,
    /// Goes to the client as this message (its watch ID translated).
    Rewritten(Vec<u8>),
    /// Is not for the client (a re-creation's `created` reply).
    Swallow,
}

/// What becomes of an upstream response, before its bytes are looked at again.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    /// Goes to the client as it came.
    Pass,
    /// Goes to the client with this (client) watch ID.
    As(i64),
    /// Is not for the client.
    Swallow,
}

/// The watches of one client stream.
#[derive(Default)]
pub(super) struct Table {
    watches: BTreeMap<i64, Watch>,
    pending: VecDeque<Pending>,
    /// Upstream watch ID → client watch ID, for the current upstream stream.
    ids: HashMap<i64, i64>,
    next_client_id: i64,
}

impl Table {
    /// Watches the client holds.
    pub fn len(&self) -> usize {
        self.watches.len()
    }

    /// A new upstream stream: forgets the old one's IDs and creates, and returns the requests
    /// that re-create every watch from its next revision.
    pub fn resume(&mut self) -> Vec<Vec<u8>> {
        self.ids.clear();
        self.pending.clear();
        let mut requests = Vec::new();
        for (&client_id, w) in &self.watches {
            let Ok(req) = proto::recreate(&w.create, w.next_rev) else {
                continue;
            };
            requests.push(req);
            self.pending.push_back(Pending::Resume { client_id });
        }
        requests
    }

    /// A client request, translated for the current upstream stream (`None`: nothing to send).
    pub fn on_client_message(&mut self, msg: &[u8]) -> Option<Vec<u8>> {
        match proto::parse_request(msg) {
            Ok(proto::Request::Create {
                create,
                start_revision,
                watch_id,
            }) => {
                let client_id = if watch_id != 0 {
                    watch_id
                } else {
                    self.allocate_id()
                };
                let req = proto::recreate(&create, start_revision).ok()?;
                self.pending.push_back(Pending::New {
                    client_id,
                    create,
                    start_revision,
                });
                Some(req)
            }
            Ok(proto::Request::Cancel { watch_id }) => {
                let upstream_id = self
                    .ids
                    .iter()
                    .find(|(_, c)| **c == watch_id)
                    .map(|(u, _)| *u);
                Some(proto::cancel(upstream_id.unwrap_or(watch_id)))
            }
            Ok(proto::Request::Other) | Err(_) => Some(msg.to_vec()),
        }
    }

    /// The lowest free client ID at or above the counter, as etcd assigns them.
    fn allocate_id(&mut self) -> i64 {
        while self.watches.contains_key(&self.next_client_id)
            || self.pending.iter().any(|p| matches!(p, Pending::New { client_id, .. } if *client_id == self.next_client_id))
        {
            self.next_client_id += 1;
        }
        let id = self.next_client_id;
        self.next_client_id += 1;
        id
    }

    /// What becomes of an upstream response.
    pub fn on_upstream_message(&mut self, msg: &[u8]) -> Translated {
        let Ok(r) = proto::parse_response(msg) else {
            return Translated::Pass;
        };
        match self.on_response(&r) {
            Verdict::Pass => Translated::Pass,
            Verdict::Swallow => Translated::Swallow,
            Verdict::As(client_id) => rewritten(msg, client_id),
        }
    }

    /// Whether a response with this head (its fields before the events) goes to the client
    /// as it came, judged before its events arrive: [`Self::on_response`] then says `Pass`
    /// for it too. Creates and cancels are not judged early (they are small and change the
    /// table).
    pub fn passes(&self, head: &proto::Response) -> bool {
        !head.created
            && !head.canceled
            && self
                .ids
                .get(&head.watch_id)
                .is_none_or(|&c| c == head.watch_id)
    }

    /// Learns from an upstream response and says what becomes of it.
    pub fn on_response(&mut self, r: &proto::Response) -> Verdict {
        if r.created {
            match self.pending.pop_front() {
                Some(Pending::New {
                    client_id,
                    create,
                    start_revision,
                }) => {
                    let next_rev = if start_revision > 0 {
                        start_revision
                    } else {
                        r.revision + 1
                    };
                    self.ids.insert(r.watch_id, client_id);
                    if !r.canceled {
                        self.watches.insert(client_id, Watch { create, next_rev });
                    }
                    return Verdict::As(client_id);
                }
                Some(Pending::Resume { client_id }) => {
                    self.ids.insert(r.watch_id, client_id);
                    if r.canceled {
                        self.watches.remove(&client_id);
                        return Verdict::As(client_id);
                    }
                    return Verdict::Swallow;
                }
                None => return Verdict::Pass,
            }
        }
        let client_id = self.ids.get(&r.watch_id).copied().unwrap_or(r.watch_id);
        if let Some(w) = self.watches.get_mut(&client_id) {
            match r.last_event {
                Some(rev) if !r.fragment => w.next_rev = w.next_rev.max(rev + 1),
                None if !r.canceled && r.revision > 0 => {
                    w.next_rev = w.next_rev.max(r.revision + 1)
                }
                _ => {}
            }
        }
        if r.canceled {
            self.watches.remove(&client_id);
            self.ids.remove(&r.watch_id);
        }
        if client_id == r.watch_id {
            Verdict::Pass
        } else {
            Verdict::As(client_id)
        }
    }
}

/// `msg` with `client_id` as its watch ID; as it came if it cannot be rewritten.
fn rewritten(msg: &[u8], client_id: i64) -> Translated {
    match proto::with_watch_id(msg, client_id) {
        Ok(m) => Translated::Rewritten(m),
        Err(_) => Translated::Pass,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protowire::put_varint_field;
    use proto::tests::{create_req, resp};

    /// The start revision and client-chosen ID of a forwarded create request.
    fn create_of(req: &[u8]) -> (i64, i64) {
        match proto::parse_request(req).unwrap() {
            proto::Request::Create {
                start_revision,
                watch_id,
                ..
            } => (start_revision, watch_id),
            _ => panic!("not a create"),
        }
    }

    fn watch_id_of(msg: &[u8]) -> i64 {
        proto::parse_response(msg).unwrap().watch_id
    }

    /// What the client gets for an upstream response (`None`: nothing).
    fn through(t: &mut Table, msg: Vec<u8>) -> Option<Vec<u8>> {
        match t.on_upstream_message(&msg) {
            Translated::Pass => Some(msg),
            Translated::Rewritten(m) => Some(m),
            Translated::Swallow => None,
        }
    }

    /// `resp` with `canceled` (field 4) or `fragment` (field 7) set.
    fn with_flag(mut msg: Vec<u8>, field: u64) -> Vec<u8> {
        put_varint_field(&mut msg, field, 1);
        msg
    }

    /// A table holding one watch (client ID 0) that upstream calls `upstream_id`, having
    /// delivered events up to revision 12.
    fn watching(upstream_id: i64) -> Table {
        let mut t = Table::default();
        let req = t.on_client_message(&create_req(b"k", 0, 0)).unwrap();
        assert_eq!(create_of(&req), (0, 0));
        let created = through(&mut t, resp(upstream_id, true, 10, &[])).unwrap();
        assert_eq!(watch_id_of(&created), 0, "answered with the client's ID");
        let events = through(&mut t, resp(upstream_id, false, 12, &[11, 12])).unwrap();
        assert_eq!(watch_id_of(&events), 0);
        t
    }

    #[test]
    fn a_resumed_watch_starts_after_the_last_event_and_its_created_reply_is_swallowed() {
        let mut t = watching(7);
        let resume = t.resume();
        assert_eq!(resume.len(), 1);
        assert_eq!(create_of(&resume[0]).0, 13, "next revision after event 12");
        assert_eq!(through(&mut t, resp(3, true, 12, &[])), None);
        let event = through(&mut t, resp(3, false, 14, &[14])).unwrap();
        assert_eq!(
            watch_id_of(&event),
            0,
            "the new upstream ID reads as the client's"
        );
        assert_eq!(create_of(&t.resume()[0]).0, 15);
    }

    #[test]
    fn progress_notifications_advance_and_fragments_do_not() {
        let mut t = watching(1);
        // A progress notification: no events, header revision 20.
        through(&mut t, resp(1, false, 20, &[])).unwrap();
        assert_eq!(create_of(&t.resume()[0]).0, 21);
        through(&mut t, resp(9, true, 20, &[])); // the re-creation's reply
                                                 // A fragment's events are not whole: resuming must start at the fragment again.
        through(&mut t, with_flag(resp(9, false, 30, &[25]), 7)).unwrap();
        assert_eq!(create_of(&t.resume()[0]).0, 21);
    }

    #[test]
    fn cancels_name_the_upstream_id_and_end_the_watch() {
        let mut t = watching(7);
        // WatchRequest { cancel_request = 2: WatchCancelRequest { watch_id = 1: 0 } }.
        let mut cancel = Vec::new();
        put_varint_field(&mut cancel, 1, 0);
        let mut req = Vec::new();
        crate::protowire::put_len_field(&mut req, 2, &cancel);
        let sent = t.on_client_message(&req).unwrap();
        assert_eq!(sent, proto::cancel(7), "the upstream ID");
        let done = through(&mut t, with_flag(resp(7, false, 12, &[]), 4)).unwrap();
        assert_eq!(watch_id_of(&done), 0);
        assert_eq!(t.len(), 0);
        assert!(t.resume().is_empty(), "nothing to re-create");
    }

    #[test]
    fn a_watch_compacted_while_resuming_reaches_the_client_as_etcd_sent_it() {
        let mut t = watching(7);
        t.resume();
        let compacted = through(&mut t, with_flag(resp(4, true, 12, &[]), 4)).expect("passed on");
        assert_eq!(watch_id_of(&compacted), 0);
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn client_ids_are_the_clients_own_or_the_lowest_free_one() {
        let mut t = Table::default();
        let req = t.on_client_message(&create_req(b"a", 5, 1)).unwrap();
        assert_eq!(
            create_of(&req),
            (5, 0),
            "upstream gets no ID; ours is kept aside"
        );
        t.on_client_message(&create_req(b"b", 0, 0)).unwrap();
        assert_eq!(
            watch_id_of(&through(&mut t, resp(100, true, 9, &[])).unwrap()),
            1
        );
        assert_eq!(
            watch_id_of(&through(&mut t, resp(101, true, 9, &[])).unwrap()),
            0
        );
        t.on_client_message(&create_req(b"c", 0, 0)).unwrap();
        assert_eq!(
            watch_id_of(&through(&mut t, resp(102, true, 9, &[])).unwrap()),
            2,
            "0 and 1 are taken"
        );
        assert_eq!(t.len(), 3);
        // The explicit start revision is kept for resumes until events arrive.
        let starts: Vec<i64> = t.resume().iter().map(|r| create_of(r).0).collect();
        assert_eq!(starts, [10, 5, 10]);
    }
}
