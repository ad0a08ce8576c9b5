//! The few pieces of the protobuf wire format that byte-exact rewrites need (member URLs,
//! watch IDs).
//!
//! We walk messages instead of decoding them with generated types: decoding and re-encoding
//! drops unknown fields (a newer etcd's additions) and is how etcd's own grpc-proxy lost the
//! response header. Every field we do not rewrite is copied as the raw bytes we received.

/// Malformed protobuf.
#[derive(Debug, thiserror::Error, PartialEq, Eq, Clone, Copy)]
pub enum Error {
    /// The message ended in the middle of a field.
    #[error("truncated protobuf message at byte {at}")]
    Truncated {
        /// Offset where more bytes were needed.
        at: usize,
    },
    /// A varint ran past ten bytes.
    #[error("malformed varint at byte {at}")]
    BadVarint {
        /// Offset of the varint.
        at: usize,
    },
    /// A wire type that proto3 messages never use (groups) or that does not exist.
    #[error("unsupported protobuf wire type {wire_type} at byte {at}")]
    BadWireType {
        /// The wire type found.
        wire_type: u8,
        /// Offset of the key.
        at: usize,
    },
}

/// Wire type of length-delimited fields (strings, bytes, embedded messages).
pub(crate) const LEN: u8 = 2;

/// One top-level field of a message.
pub(crate) struct Field<'a> {
    /// Field number.
    pub number: u64,
    /// Wire type (0 varint, 1 fixed64, 2 length-delimited, 5 fixed32).
    pub wire_type: u8,
    /// The whole field as received: key, length prefix and payload.
    pub raw: &'a [u8],
    /// The payload of a length-delimited field (empty for other types).
    pub payload: &'a [u8],
}

/// Iterates the fields of a message, failing on malformed input.
pub(crate) struct Fields<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Fields<'a> {
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// Bytes walked so far: where the next field starts (the end once a field failed).
    pub fn position(&self) -> usize {
        self.pos
    }

    fn next_field(&mut self) -> Result<Field<'a>, Error> {
        let start = self.pos;
        let key = read_varint(self.buf, &mut self.pos)?;
        let wire_type = (key & 7) as u8;
        let number = key >> 3;
        let mut payload: &[u8] = &[];
        let len = match wire_type {
            0 => {
                read_varint(self.buf, &mut self.pos)?;
                0
            }
            1 => 8,
            5 => 4,
            LEN => {
                let n = read_varint(self.buf, &mut self.pos)?;
                usize::try_from(n).map_err(|_| Error::Truncated { at: self.pos })?
            }
            other => {
                return Err(Error::BadWireType {
                    wire_type: other,
                    at: start,
                })
            }
        };
        let end = self
            .pos
            .checked_add(len)
            .filter(|&e| e <= self.buf.len())
            .ok_or(Error::Truncated { at: self.pos })?;
        if wire_type == LEN {
            payload = &self.buf[self.pos..end];
        }
        self.pos = end;
        Ok(Field {
            number,
            wire_type,
            raw: &self.buf[start..end],
            payload,
        })
    }
}

impl<'a> Iterator for Fields<'a> {
    type Item = Result<Field<'a>, Error>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.pos >= self.buf.len() {
            return None;
        }
        let item = self.next_field();
        if item.is_err() {
            self.pos = self.buf.len();
        }
        Some(item)
    }
}

/// Reads a base-128 varint at `pos`, advancing it.
pub(crate) fn read_varint(buf: &[u8], pos: &mut usize) -> Result<u64, Error> {
    let at = *pos;
    let mut value: u64 = 0;
    for i in 0..10 {
        let byte = *buf.get(*pos).ok_or(Error::Truncated { at: *pos })?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(Error::BadVarint { at })
}

/// Appends a varint field (`int64` values are their two's complement, ten bytes if negative).
pub(crate) fn put_varint_field(out: &mut Vec<u8>, number: u64, value: u64) {
    put_varint(out, number << 3);
    put_varint(out, value);
}

/// The value of a varint field's raw bytes (key included), as `Fields` yields them.
pub(crate) fn varint_value(raw: &[u8]) -> Result<u64, Error> {
    let mut pos = 0;
    read_varint(raw, &mut pos)?;
    read_varint(raw, &mut pos)
}

/// Appends a varint.
pub(crate) fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a length-delimited field.
pub(crate) fn put_len_field(out: &mut Vec<u8>, number: u64, payload: &[u8]) {
    put_varint(out, (number << 3) | u64::from(LEN));
    put_varint(out, payload.len() as u64);
    out.extend_from_slice(payload);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varints_round_trip() {
        for v in [0u64, 1, 127, 128, 300, u64::from(u32::MAX), u64::MAX] {
            let mut out = Vec::new();
            put_varint(&mut out, v);
            let mut pos = 0;
            assert_eq!(read_varint(&out, &mut pos), Ok(v));
            assert_eq!(pos, out.len());
        }
    }

    #[test]
    fn rejects_overlong_and_truncated_varints() {
        let mut pos = 0;
        assert_eq!(
            read_varint(&[0xff; 11], &mut pos),
            Err(Error::BadVarint { at: 0 })
        );
        let mut pos = 0;
        assert_eq!(
            read_varint(&[0x80], &mut pos),
            Err(Error::Truncated { at: 1 })
        );
    }

    #[test]
    fn fields_reject_groups_and_overruns() {
        // field 1, wire type 3 (start group)
        assert!(matches!(
            Fields::new(&[0x0b]).next(),
            Some(Err(Error::BadWireType {
                wire_type: 3,
                at: 0
            }))
        ));
        // field 2, LEN 5, but only 1 byte follows
        assert!(matches!(
            Fields::new(&[0x12, 0x05, 0x61]).next(),
            Some(Err(Error::Truncated { .. }))
        ));
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// A field as (number, wire type, encoded value).
        fn field() -> impl Strategy<Value = (u64, u8, Vec<u8>)> {
            let number = 1u64..(1 << 29);
            prop_oneof![
                (number.clone(), any::<u64>()).prop_map(|(n, v)| {
                    let mut b = Vec::new();
                    put_varint(&mut b, v);
                    (n, 0, b)
                }),
                (number.clone(), any::<[u8; 8]>()).prop_map(|(n, b)| (n, 1, b.to_vec())),
                (number.clone(), prop::collection::vec(any::<u8>(), 0..40))
                    .prop_map(|(n, b)| (n, LEN, b)),
                (number, any::<[u8; 4]>()).prop_map(|(n, b)| (n, 5, b.to_vec())),
            ]
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn varints_round_trip(v in any::<u64>()) {
                let mut out = Vec::new();
                put_varint(&mut out, v);
                let mut pos = 0;
                prop_assert_eq!(read_varint(&out, &mut pos), Ok(v));
                prop_assert_eq!(pos, out.len());
            }

            /// A message written field by field walks back as the same fields, each with its
            /// exact raw bytes; cut short anywhere inside a field, the walk reports truncation.
            #[test]
            fn fields_walk_back(fields in prop::collection::vec(field(), 0..8), cut in any::<prop::sample::Index>()) {
                let mut msg = Vec::new();
                let mut raws = Vec::new();
                for (n, wt, value) in &fields {
                    let start = msg.len();
                    put_varint(&mut msg, (n << 3) | u64::from(*wt));
                    if *wt == LEN {
                        put_varint(&mut msg, value.len() as u64);
                    }
                    msg.extend_from_slice(value);
                    raws.push(start..msg.len());
                }
                let walked: Vec<_> = Fields::new(&msg).collect::<Result<_, _>>().unwrap();
                prop_assert_eq!(walked.len(), fields.len());
                for ((f, (n, wt, value)), raw) in walked.iter().zip(&fields).zip(&raws) {
                    prop_assert_eq!((f.number, f.wire_type), (*n, *wt));
                    prop_assert_eq!(f.raw, &msg[raw.clone()]);
                    if *wt == LEN {
                        prop_assert_eq!(f.payload, value.as_slice());
                    }
                }
                let cut = cut.index(msg.len() + 1);
                let inside = raws.iter().any(|r| r.start < cut && cut < r.end);
                let truncated = Fields::new(&msg[..cut]).any(|f| f.is_err());
                prop_assert_eq!(truncated, inside);
            }

            #[test]
            fn any_bytes_walk_or_fail(data in prop::collection::vec(any::<u8>(), 0..256)) {
                crate::fuzzing::protowire(&data);
            }
        }
    }
}
