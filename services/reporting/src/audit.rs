//! The audit log as reporting keeps it: records of admins' calls, from the `audit` stream,
//! stored once each (by id), listed newest first and exported oldest first.

use loyalty_platform::clock::Millis;
use loyalty_platform::error::{Error, Result, Violations};
use serde::{Deserialize, Serialize};

/// Most records one list page or export chunk holds.
pub const MAX_PAGE: usize = 1000;
/// Most stored bytes one page or chunk holds (at least one record): a record can reach
/// about 60 KB, and a message must stay under the server's limit.
pub const MAX_PAGE_BYTES: usize = 1024 * 1024;
/// Records of a list page when the caller asks for none in particular.
pub const DEFAULT_PAGE: usize = 100;
/// Longest filter value accepted (a method name, a key id, a member id).
pub const MAX_FILTER_BYTES: usize = 256;

/// One audited call.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub id: String,
    pub tenant_id: String,
    pub time: Millis,
    pub key_id: String,
    pub role: String,
    pub actor_id: String,
    pub actor_comment: String,
    /// `package.Service/Method`.
    pub method: String,
    pub member_id: String,
    pub status_code: i32,
    pub status_message: String,
    pub request: String,
    pub before: String,
    pub after: String,
    /// The record of the call's start, with no answer recorded (yet, or ever: its process
    /// ended). Kept by the store beside the record, not in it.
    #[serde(skip)]
    pub in_flight: bool,
}

/// Which records a list or export reads.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditQuery {
    /// From (inclusive) and to (exclusive), in milliseconds; unbounded when not given.
    pub from: Millis,
    pub to: Millis,
    /// Empty: any.
    pub method: String,
    pub key_id: String,
    pub member_id: String,
}

impl AuditQuery {
    /// A query over `[from, to)`, refused when the period is inverted or a filter too long.
    pub fn new(
        from: Option<Millis>,
        to: Option<Millis>,
        method: &str,
        key_id: &str,
        member_id: &str,
    ) -> Result<Self> {
        let mut v = Violations::new();
        let (from, to) = (from.unwrap_or(i64::MIN), to.unwrap_or(Millis::MAX));
        if from >= to {
            v.add("filter.end_time", "must be after start_time");
        }
        for (field, value) in [
            ("filter.method", method),
            ("filter.key_id", key_id),
            ("filter.member_id", member_id),
        ] {
            if value.len() > MAX_FILTER_BYTES {
                v.add(field, format!("at most {MAX_FILTER_BYTES} bytes"));
            }
        }
        v.finish()?;
        Ok(Self {
            from,
            to,
            method: method.trim_start_matches('/').to_string(),
            key_id: key_id.to_string(),
            member_id: member_id.to_string(),
        })
    }

    pub fn matches(&self, entry: &AuditEntry) -> bool {
        self.matches_head(entry.time, &AuditHead::of(entry))
    }

    /// Whether a record with this time and head is one the query reads.
    pub fn matches_head(&self, time: Millis, head: &AuditHead) -> bool {
        let is = |want: &str, have: &str| want.is_empty() || want == have;
        time >= self.from
            && time < self.to
            && is(&self.method, &head.method)
            && is(&self.key_id, &head.key_id)
            && is(&self.member_id, &head.member_id)
    }
}

/// What queries filter a record on, kept apart so a filtered page reads only the records it
/// returns.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditHead {
    pub method: String,
    pub key_id: String,
    pub member_id: String,
}

impl AuditHead {
    pub fn of(entry: &AuditEntry) -> Self {
        Self {
            method: entry.method.clone(),
            key_id: entry.key_id.clone(),
            member_id: entry.member_id.clone(),
        }
    }
}

/// Where a page stops: the last record read (time, id).
pub type AuditCursor = (Millis, String);

/// Which way a page reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Order {
    NewestFirst,
    OldestFirst,
}

/// Records of one page, and where the next starts (None: nothing more).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditPage {
    pub entries: Vec<AuditEntry>,
    pub next: Option<AuditCursor>,
}

/// A cursor as clients pass it back: `<time>.<id>`.
pub fn encode_cursor(cursor: &AuditCursor) -> String {
    format!("{}.{}", cursor.0, cursor.1)
}

pub fn decode_cursor(field: &str, token: &str) -> Result<Option<AuditCursor>> {
    if token.is_empty() {
        return Ok(None);
    }
    let bad = || Error::invalid(field, "not a token this service issued");
    if token.len() > 128 {
        return Err(bad());
    }
    let (time, id) = token.split_once('.').ok_or_else(bad)?;
    let time = time.parse().map_err(|_| bad())?;
    Ok(Some((time, id.to_string())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_check_their_period_and_filters() {
        assert!(AuditQuery::new(Some(10), Some(10), "", "", "").is_err());
        assert!(AuditQuery::new(None, None, &"x".repeat(300), "", "").is_err());
        let q = AuditQuery::new(None, None, "/a.B/C", "", "").unwrap();
        assert_eq!(q.method, "a.B/C");
        assert_eq!(q.to, Millis::MAX);
        let cursor = (42, "0190-abc".to_string());
        assert_eq!(
            decode_cursor("t", &encode_cursor(&cursor)).unwrap(),
            Some(cursor)
        );
        assert!(decode_cursor("t", "nope").is_err());
        assert_eq!(decode_cursor("t", "").unwrap(), None);
    }
}
