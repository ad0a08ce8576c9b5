//! The upstream half of a Watch stream, apart from any I/O: turns etcd's DATA chunks into
//! what goes to the client, without holding a large response back until its end.
//!
//! A watch catching up from an old revision gets all the events of up to 1,000 revisions in
//! one response, which can be many megabytes. Reassembling such a response before sending any
//! of it would make the client wait for the whole transfer to the proxy before its own
//! transfer starts. So a response is judged by its head — the fields before its first event,
//! which etcd marshals first (fields go out in number order, and `events` is the highest) —
//! and, if it goes to the client unchanged, it is handed on a revision at a time as it
//! arrives: the events of a revision go once an event of a later revision (or the end of the
//! response) shows that the revision is complete.
//!
//! If the upstream breaks in the middle of such a response, the client already has its
//! prefix, which promised a length. [`Relay::abort`] completes it with one unknown field of
//! the missing length (protobuf decoders skip unknown fields), so the client sees a response
//! with the revisions delivered so far, and the table resumes the watch after the last of
//! them: every event still reaches the client exactly once.
//!
//! Invariants:
//! * the bytes handed on are the bytes received, in order, until an abort; only the padding
//!   of an aborted response is made up;
//! * a response is handed on early only once its first revision is complete, so a client
//!   never sees a cut response without events (which it would take for a progress
//!   notification vouching for the header's revision);
//! * every response reaches the table exactly once: whole ([`Step::Whole`]), as a summary
//!   after its last byte ([`Step::Passed`]), or as the summary of what was delivered when it
//!   was cut ([`Relay::abort`]);
//! * memory per stream is one response while it is judged (its head is small, so judging
//!   ends early for large ones), then one revision's events;
//! * size limit and compressed flag are checked at the prefix, before anything is handed on.

use bytes::{Bytes, BytesMut};

use super::super::frames::{Error, MAX_FROM_ETCD};
use super::proto::{self, Response, EVENTS};
use crate::grpc::{Prefix, PREFIX};
use crate::protowire::{put_varint, Error as WireError, Fields, LEN};

/// The field that pads an aborted response: the highest field number protobuf allows, which
/// no etcd message will ever use.
const PADDING_FIELD: u64 = (1 << 29) - 1;

/// What to do with the next piece of the upstream stream.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Step {
    /// A whole message with its prefix, as it came: the table decides what becomes of it.
    Whole(Bytes),
    /// Bytes of a response that goes to the client unchanged; send them as they are.
    Pass(Bytes),
    /// The last byte of a passed response has been handed on: what the table must learn of
    /// it (`None` if it was not a well-formed `WatchResponse`, which the table ignores).
    Passed(Option<Response>),
}

/// How to end a response cut in the middle.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Abort {
    /// Send these bytes to complete it, and let the table learn what was delivered (`None`:
    /// nothing it can use).
    Pad(Bytes, Option<Response>),
    /// It cannot be completed (fewer bytes missing than the smallest padding field): the
    /// client's stream must end.
    Impossible,
}

/// The upstream stream's state between chunks.
pub(crate) struct Relay {
    /// The message being judged, from its prefix (empty while one is being passed).
    buf: BytesMut,
    /// The response being passed, if one is.
    passing: Option<Passing>,
}

/// A response handed on as it arrives.
struct Passing {
    /// Bytes of it not yet received.
    left: usize,
    /// Bytes received and not yet handed on.
    held: BytesMut,
    /// Bytes already handed on.
    sent: usize,
    /// Offset in `held` up to which fields have been walked.
    walked: usize,
    /// Offset in `held` up to which bytes may be handed on: complete revisions.
    safe: usize,
    /// The revision of the events after `safe`.
    group: Option<i64>,
    /// What the walked fields say.
    summary: Response,
    /// What the fields up to `safe` say (with their last event).
    complete: Response,
    /// A field was malformed: nothing more is walked, the rest goes at the end, and the table
    /// learns nothing of this response.
    malformed: bool,
}

impl Relay {
    pub fn new() -> Self {
        Self {
            buf: BytesMut::new(),
            passing: None,
        }
    }

    /// Takes a chunk from etcd and appends to `out` what to do with it. `passes` says whether
    /// a response with this head goes to the client unchanged.
    pub fn push(
        &mut self,
        mut chunk: Bytes,
        passes: impl Fn(&Response) -> bool,
        out: &mut Vec<Step>,
    ) -> Result<(), Error> {
        while !chunk.is_empty() {
            if let Some(p) = &mut self.passing {
                let piece = chunk.split_to(p.left.min(chunk.len()));
                p.left -= piece.len();
                p.held.extend_from_slice(&piece);
                p.walk();
                if let Some(bytes) = p.ready() {
                    out.push(Step::Pass(bytes));
                }
                if p.left == 0 {
                    out.push(Step::Passed((!p.malformed).then_some(p.summary)));
                    self.passing = None;
                }
                continue;
            }
            self.buf.extend_from_slice(&chunk);
            chunk.clear();
            self.judge(&passes, out)?;
        }
        Ok(())
    }

    /// The upstream broke: how to end the response being handed on, if one is and the client
    /// has part of it. The relay is then ready for a new upstream stream.
    pub fn abort(&mut self) -> Option<Abort> {
        self.buf.clear();
        let p = self.passing.take()?;
        if p.sent == 0 {
            return None;
        }
        let missing = p.held.len() + p.left;
        let delivered = (!p.malformed && p.complete.last_event.is_some()).then_some(p.complete);
        Some(match padding(missing) {
            Some(pad) => Abort::Pad(pad, delivered),
            None => Abort::Impossible,
        })
    }

    /// Hands out the whole messages in `buf`, then starts passing the partial one if its head
    /// allows.
    fn judge(
        &mut self,
        passes: impl Fn(&Response) -> bool,
        out: &mut Vec<Step>,
    ) -> Result<(), Error> {
        while let Some(Prefix { compressed, len }) = Prefix::parse(&self.buf) {
            if compressed {
                return Err(Error::Compressed);
            }
            if len > MAX_FROM_ETCD {
                return Err(Error::TooLarge(len, MAX_FROM_ETCD));
            }
            let total = PREFIX + len;
            if self.buf.len() >= total {
                out.push(Step::Whole(self.buf.split_to(total).freeze()));
                continue;
            }
            let Some(head) = proto::parse_head(&self.buf[PREFIX..]) else {
                break;
            };
            // Fragments (asked for by the client) are bounded by etcd, and a revision's
            // events may span them: they are not worth passing early.
            if head.fragment || !passes(&head) {
                self.buf.reserve(total - self.buf.len());
                break;
            }
            let held = self.buf.split();
            let mut p = Passing {
                left: total - held.len(),
                held,
                sent: 0,
                walked: PREFIX,
                safe: 0,
                group: None,
                summary: Response::default(),
                complete: Response::default(),
                malformed: false,
            };
            p.walk();
            if let Some(bytes) = p.ready() {
                out.push(Step::Pass(bytes));
            }
            self.passing = Some(p);
            break;
        }
        Ok(())
    }
}

impl Passing {
    /// Walks the complete fields after `walked`, moving `safe` to each revision boundary; at
    /// the end of the response everything is safe.
    fn walk(&mut self) {
        if !self.malformed {
            let base = self.walked;
            let mut fields = Fields::new(&self.held[base..]);
            loop {
                let start = base + fields.position();
                let field = match fields.next() {
                    None | Some(Err(WireError::Truncated { .. })) => break,
                    Some(Ok(f)) => f,
                    Some(Err(_)) => {
                        self.malformed = true;
                        break;
                    }
                };
                if (field.number, field.wire_type) == (EVENTS, LEN) {
                    let Ok(rev) = proto::event_revision(field.payload) else {
                        self.malformed = true;
                        break;
                    };
                    if self.group.is_some_and(|g| g != rev) {
                        self.safe = start;
                        self.complete = self.summary;
                    }
                    self.group = Some(rev);
                }
                if self.summary.learn(&field).is_err() {
                    self.malformed = true;
                    break;
                }
                self.walked = base + fields.position();
            }
        }
        if self.left == 0 {
            if self.walked != self.held.len() {
                self.malformed = true;
            }
            self.safe = self.held.len();
            self.complete = self.summary;
        }
    }

    /// The bytes that may go now: complete revisions, once there is at least one (or the end).
    fn ready(&mut self) -> Option<Bytes> {
        let first = self.complete.last_event.is_some() || self.left == 0;
        if self.safe == 0 || !first {
            return None;
        }
        let bytes = self.held.split_to(self.safe).freeze();
        self.walked = self.walked.saturating_sub(self.safe);
        self.sent += self.safe;
        self.safe = 0;
        Some(bytes)
    }
}

/// Unknown length-delimited fields of exactly `n` bytes in all, if `n` is large enough for
/// one. Some lengths cannot be one field (the length's own varint would have to be one byte
/// longer or shorter); those are an empty field and the rest.
fn padding(n: usize) -> Option<Bytes> {
    let mut key = Vec::new();
    put_varint(&mut key, (PADDING_FIELD << 3) | u64::from(LEN));
    let one = (1..=10).find_map(|len_bytes| {
        let payload = n.checked_sub(key.len() + len_bytes)?;
        let mut out = key.clone();
        put_varint(&mut out, payload as u64);
        (out.len() == key.len() + len_bytes).then(|| {
            out.resize(n, 0);
            Bytes::from(out)
        })
    });
    one.or_else(|| {
        let empty = key.len() + 1;
        let rest = padding(n.checked_sub(empty)?)?;
        let mut out = key.clone();
        out.push(0);
        out.extend_from_slice(&rest);
        Some(Bytes::from(out))
    })
}

#[cfg(test)]
mod tests {
    use super::super::proto::tests::resp;
    use super::*;
    use crate::proxy::frames::frame;

    /// Feeds `stream` in chunks of `size`, passing responses whose watch ID is not 9.
    fn run(stream: &[u8], size: usize) -> Result<Vec<Step>, Error> {
        let mut r = Relay::new();
        let mut out = Vec::new();
        for c in stream.chunks(size) {
            r.push(Bytes::copy_from_slice(c), |h| h.watch_id != 9, &mut out)?;
        }
        Ok(out)
    }

    /// What the client would receive if every `Whole` went on unchanged.
    fn sent(steps: &[Step]) -> Vec<u8> {
        let mut v = Vec::new();
        for s in steps {
            match s {
                Step::Whole(b) | Step::Pass(b) => v.extend_from_slice(b),
                Step::Passed(_) => {}
            }
        }
        v
    }

    #[test]
    fn a_large_response_goes_on_before_its_end_arrives_and_is_summarised() {
        let revs: Vec<i64> = (100..2100).collect();
        let big = frame(&resp(3, false, 2200, &revs));
        let half = &big[..big.len() / 2];
        let mut r = Relay::new();
        let mut out = Vec::new();
        r.push(Bytes::copy_from_slice(half), |_| true, &mut out)
            .unwrap();
        let early = sent(&out);
        assert!(
            early.len() > half.len() / 2 && half.starts_with(&early),
            "most of the first half goes on at once: {} of {}",
            early.len(),
            half.len()
        );
        assert!(!out.iter().any(|s| matches!(s, Step::Passed(_))));
        r.push(
            Bytes::copy_from_slice(&big[half.len()..]),
            |_| true,
            &mut out,
        )
        .unwrap();
        assert_eq!(sent(&out), &big[..]);
        let summary = proto::parse_response(&big[PREFIX..]).unwrap();
        assert_eq!(out.last(), Some(&Step::Passed(Some(summary))));
        assert_eq!(summary.last_event, Some(2099));
    }

    #[test]
    fn a_revision_goes_on_only_once_a_later_one_shows_it_complete() {
        // Two events of revision 5, then two of 6.
        let msg = frame(&resp(3, false, 6, &[5, 5, 6, 6]));
        let whole = proto::parse_response(&msg[PREFIX..]).unwrap();
        let one_event =
            frame(&resp(3, false, 6, &[5])).len() - frame(&resp(3, false, 6, &[])).len();
        let head = msg.len() - 4 * one_event;
        let two = head + 2 * one_event;
        let mut r = Relay::new();
        let mut out = Vec::new();
        // Up to the middle of the third event: revision 5 is not known to be complete.
        r.push(msg.slice(..two + 3), |_| true, &mut out).unwrap();
        assert!(out.is_empty(), "nothing yet: {out:?}");
        // The third event, of revision 6, is in: revision 5 goes.
        r.push(msg.slice(two + 3..two + one_event + 1), |_| true, &mut out)
            .unwrap();
        assert_eq!(out, vec![Step::Pass(msg.slice(..two))]);
        // Cut here: the rest is padded, and the table learns revision 5 was delivered.
        let Some(Abort::Pad(pad, Some(delivered))) = r.abort() else {
            panic!("a pad");
        };
        assert_eq!(pad.len(), msg.len() - two);
        assert_eq!(delivered.last_event, Some(5));
        assert_eq!(
            (delivered.watch_id, delivered.revision),
            (3, whole.revision)
        );
        let mut client = msg.slice(..two).to_vec();
        client.extend_from_slice(&pad);
        let seen = proto::parse_response(&client[PREFIX..]).unwrap();
        assert_eq!(seen.last_event, Some(5), "the padded response parses");
        assert_eq!(r.abort(), None, "the relay starts over");
    }

    #[test]
    fn a_response_the_table_must_see_whole_is_held_until_complete() {
        let msg = frame(&resp(9, false, 50, &[40, 41, 42]));
        let out = run(&msg, 7).unwrap();
        assert_eq!(out, vec![Step::Whole(msg)]);
    }

    #[test]
    fn whole_messages_in_one_chunk_come_out_whole() {
        let mut stream = frame(&resp(0, true, 5, &[])).to_vec();
        stream.extend_from_slice(&frame(&resp(0, false, 6, &[6])));
        let out = run(&stream, stream.len()).unwrap();
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|s| matches!(s, Step::Whole(_))));
    }

    #[test]
    fn compressed_and_oversized_messages_are_refused_at_the_prefix() {
        assert_eq!(run(&[1, 0, 0, 0, 9, 0x12], 6), Err(Error::Compressed));
        assert!(matches!(
            run(&[0, 0xff, 0xff, 0xff, 0xff, 0x12], 6),
            Err(Error::TooLarge(_, MAX_FROM_ETCD))
        ));
    }

    #[test]
    fn a_malformed_passed_response_teaches_the_table_nothing() {
        // Two events of different revisions, then an events field whose length runs past the
        // message.
        let mut msg = resp(3, false, 7, &[5, 6]);
        msg.extend_from_slice(&[0x5a, 0x7f, 1, 2, 3]);
        let framed = frame(&msg);
        // The first chunk ends inside the last field: the head is judged before the end.
        let out = run(&framed, framed.len() - 3).unwrap();
        assert!(matches!(out[0], Step::Pass(_)));
        assert_eq!(sent(&out), &framed[..]);
        assert_eq!(out.last(), Some(&Step::Passed(None)));
    }

    #[test]
    fn padding_has_exactly_the_missing_length_and_parses_as_an_unknown_field() {
        assert_eq!(padding(5), None, "a 5-byte key and a length need 6 bytes");
        for n in (6..300).chain([16_389, 2_097_160, 9_000_000]) {
            let pad = padding(n).expect("padding");
            assert_eq!(pad.len(), n);
            let fields: Vec<_> = Fields::new(&pad).collect::<Result<_, _>>().unwrap();
            assert!(
                matches!(fields.len(), 1 | 2),
                "{n}: {} fields",
                fields.len()
            );
            for f in fields {
                assert_eq!((f.number, f.wire_type), (PADDING_FIELD, LEN));
            }
        }
    }
}
