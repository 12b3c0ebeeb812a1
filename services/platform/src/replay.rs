//! Replaying a producer's stored records as the events it published, a page at a time, so
//! a consumer's derived state (reporting's facts, segmentation's features) can be rebuilt
//! from the sources of truth.
//!
//! Identity (members), promotion (the purchase history) and balance (the ledger) each serve
//! their records this way, in process and over gRPC (`Replay*Events`, service keys only).
//! A page ends at a cursor: opaque bytes the producer decodes to where it stopped.

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};
use crate::grpc::to_status;

/// Most events one page may ask for.
pub const MAX_PAGE: usize = 1000;
/// Events a page holds when the caller does not say.
pub const DEFAULT_PAGE: usize = 500;
/// A page stops growing once its events take this many bytes, so it fits a gRPC message
/// (it may pass the bound by one event).
pub const PAGE_BYTES: usize = 1 << 20;
/// Largest cursor accepted.
pub const MAX_CURSOR_BYTES: usize = 4096;

/// One page: encoded `loyalty.events.v1.Event`s, and where the next page starts (`None`
/// after the last).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Page {
    pub events: Vec<Vec<u8>>,
    pub next: Option<Vec<u8>>,
}

impl Page {
    /// Whether the page has as many events, or bytes, as it should hold.
    pub fn is_full(&self, limit: usize) -> bool {
        self.events.len() >= limit || self.events.iter().map(Vec::len).sum::<usize>() >= PAGE_BYTES
    }
}

/// A producer's stored records, replayed.
#[async_trait::async_trait]
pub trait EventSource: Send + Sync {
    /// The page after `cursor` (empty: from the start): at most `limit` events, fewer
    /// once they take [`PAGE_BYTES`].
    async fn page(&self, cursor: &[u8], limit: usize) -> Result<Page>;
}

/// Answers a `Replay*Events` call from `source`: the page's events and its next cursor
/// (empty after the last page).
pub async fn answer(
    source: &dyn EventSource,
    cursor: &[u8],
    limit: u32,
) -> std::result::Result<(Vec<Vec<u8>>, Vec<u8>), tonic::Status> {
    let limit = page_limit(limit).map_err(to_status)?;
    let page = source.page(cursor, limit).await.map_err(to_status)?;
    Ok((page.events, page.next.unwrap_or_default()))
}

/// The page size a request asks for: `0` means [`DEFAULT_PAGE`]; more than [`MAX_PAGE`] is
/// refused.
pub fn page_limit(limit: u32) -> Result<usize> {
    match limit as usize {
        0 => Ok(DEFAULT_PAGE),
        n if n <= MAX_PAGE => Ok(n),
        _ => Err(Error::invalid(
            "limit",
            format!("must be at most {MAX_PAGE}"),
        )),
    }
}

/// Encodes a position as a cursor.
pub fn cursor<T: Serialize>(position: &T) -> Vec<u8> {
    // Plain strings and integers: encoding them cannot fail.
    postcard::to_allocvec(position).unwrap_or_default()
}

/// Decodes a cursor made by [`cursor`]; `None` for the empty cursor (the start).
pub fn position<T: DeserializeOwned>(cursor: &[u8]) -> Result<Option<T>> {
    if cursor.is_empty() {
        return Ok(None);
    }
    if cursor.len() > MAX_CURSOR_BYTES {
        return Err(Error::invalid(
            "cursor",
            format!("must be at most {MAX_CURSOR_BYTES} bytes"),
        ));
    }
    postcard::from_bytes(cursor).map(Some).map_err(|_| {
        Error::invalid(
            "cursor",
            "is not a cursor this service returned (pass `next_cursor` back unchanged)",
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cursors_round_trip_and_bad_ones_are_refused() {
        let at = ("t1".to_string(), "m/7".to_string(), Some(12_i64));
        let c = cursor(&at);
        assert_eq!(
            position::<(String, String, Option<i64>)>(&c).unwrap(),
            Some(at)
        );
        assert_eq!(position::<(String, String)>(&[]).unwrap(), None);
        assert!(position::<(String, String)>(&[0xff, 0xff, 0xff]).is_err());
        assert!(position::<(String, String)>(&vec![1; MAX_CURSOR_BYTES + 1]).is_err());
        assert_eq!(page_limit(0).unwrap(), DEFAULT_PAGE);
        assert_eq!(page_limit(7).unwrap(), 7);
        assert!(page_limit(MAX_PAGE as u32 + 1).is_err());
    }
}
