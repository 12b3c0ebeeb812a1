//! Just enough of the protobuf wire format to read one string field of an encoded message
//! by its field-number path, without decoding the message.

/// The message is not valid protobuf.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Malformed;

fn varint(buf: &mut &[u8]) -> Result<u64, Malformed> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let (&byte, rest) = buf.split_first().ok_or(Malformed)?;
        *buf = rest;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(Malformed)
}

fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8], Malformed> {
    if buf.len() < n {
        return Err(Malformed);
    }
    let (head, rest) = buf.split_at(n);
    *buf = rest;
    Ok(head)
}

/// The value of the string at `path` (field numbers, outermost first) in `message`, as
/// protobuf reads it: the last occurrence wins, and repeated occurrences of an enclosing
/// message merge. `None` when absent (the empty string, to protobuf).
pub fn string_at<'a>(message: &'a [u8], path: &[u32]) -> Result<Option<&'a [u8]>, Malformed> {
    let Some((&first, rest_of_path)) = path.split_first() else {
        return Ok(None);
    };
    let mut buf = message;
    let mut found = None;
    while !buf.is_empty() {
        let tag = varint(&mut buf)?;
        let (number, wire) = (tag >> 3, tag & 7);
        match wire {
            0 => {
                varint(&mut buf)?;
            }
            1 => {
                take(&mut buf, 8)?;
            }
            2 => {
                let len = usize::try_from(varint(&mut buf)?).map_err(|_| Malformed)?;
                let value = take(&mut buf, len)?;
                if number == u64::from(first) {
                    if rest_of_path.is_empty() {
                        found = Some(value);
                    } else if let Some(inner) = string_at(value, rest_of_path)? {
                        found = Some(inner);
                    }
                }
            }
            5 => {
                take(&mut buf, 4)?;
            }
            _ => return Err(Malformed),
        }
        if number == u64::from(first) && wire != 2 {
            // The field exists with another type than the API's: not our message.
            return Err(Malformed);
        }
    }
    Ok(found)
}

/// The top-level string field `number` in the leading part of a message cut short (the
/// rest did not arrive, or was not kept): fields are read in order up to the cut, and the
/// last complete occurrence wins.
pub fn leading_string(head: &[u8], number: u32) -> Option<&[u8]> {
    let mut buf = head;
    let mut found = None;
    while !buf.is_empty() {
        let Ok(tag) = varint(&mut buf) else { break };
        let skipped = match tag & 7 {
            0 => varint(&mut buf).map(|_| ()),
            1 => take(&mut buf, 8).map(|_| ()),
            5 => take(&mut buf, 4).map(|_| ()),
            2 => match varint(&mut buf).ok().and_then(|l| usize::try_from(l).ok()) {
                Some(len) => take(&mut buf, len).map(|value| {
                    if tag >> 3 == u64::from(number) {
                        found = Some(value);
                    }
                }),
                None => Err(Malformed),
            },
            _ => Err(Malformed),
        };
        if skipped.is_err() {
            break;
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use prost::Message;

    #[derive(Clone, PartialEq, Message)]
    struct Inner {
        #[prost(string, tag = "1")]
        tenant_id: String,
        #[prost(int64, tag = "2")]
        n: i64,
    }

    #[derive(Clone, PartialEq, Message)]
    struct Outer {
        #[prost(fixed64, tag = "1")]
        a: u64,
        #[prost(message, optional, tag = "3")]
        inner: Option<Inner>,
        #[prost(fixed32, tag = "4")]
        b: u32,
        #[prost(string, tag = "5")]
        store_id: String,
    }

    #[test]
    fn reads_nested_strings_as_prost_decodes_them() {
        let m = Outer {
            a: 7,
            inner: Some(Inner {
                tenant_id: "acme".into(),
                n: -1,
            }),
            b: 3,
            store_id: "s-1".into(),
        };
        let bytes = m.encode_to_vec();
        assert_eq!(string_at(&bytes, &[3, 1]).unwrap(), Some(&b"acme"[..]));
        assert_eq!(string_at(&bytes, &[5]).unwrap(), Some(&b"s-1"[..]));
        assert_eq!(string_at(&bytes, &[9]).unwrap(), None);
        // A second occurrence merges and wins, as in prost.
        let mut twice = bytes.clone();
        twice.extend(
            Outer {
                inner: Some(Inner {
                    tenant_id: "other".into(),
                    n: 0,
                }),
                ..Outer::default()
            }
            .encode_to_vec(),
        );
        let decoded = Outer::decode(twice.as_slice()).unwrap();
        assert_eq!(decoded.inner.unwrap().tenant_id, "other");
        assert_eq!(string_at(&twice, &[3, 1]).unwrap(), Some(&b"other"[..]));
    }

    #[test]
    fn reads_the_leading_part_of_a_message_cut_short() {
        let m = Outer {
            a: 7,
            inner: None,
            b: 3,
            store_id: "s-1".into(),
        };
        let mut bytes = m.encode_to_vec();
        bytes.extend([0x32, 0x40, b'x']); // field 6, 64 bytes long, cut after one
        assert_eq!(leading_string(&bytes, 5), Some(&b"s-1"[..]));
        assert_eq!(leading_string(&bytes, 6), None);
        assert!(string_at(&bytes, &[5]).is_err());
    }

    #[test]
    fn refuses_what_is_not_protobuf() {
        assert_eq!(string_at(&[0x1a, 0x10, 1], &[3, 1]), Err(Malformed));
        assert_eq!(string_at(&[0xff; 11], &[1]), Err(Malformed));
        // Field 1 as a varint where the API has a string.
        assert_eq!(string_at(&[0x08, 0x01], &[1]), Err(Malformed));
        assert_eq!(string_at(&[], &[1]), Ok(None));
    }
}
