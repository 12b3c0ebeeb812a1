//! What reporting needs from other services.

use loyalty_platform::error::{Error, Result};

/// The members of a segment, for the segment filter.
#[async_trait::async_trait]
pub trait SegmentMembers: Send + Sync + std::fmt::Debug {
    /// The segment's members now. `NotFound` when there is no such segment;
    /// `FailedPrecondition` when it has more than `limit` members.
    async fn members(&self, tenant_id: &str, segment_id: &str, limit: usize)
    -> Result<Vec<String>>;
}

/// Where segmentation is neither in this process nor a configured peer.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoSegmentation;

#[async_trait::async_trait]
impl SegmentMembers for NoSegmentation {
    async fn members(&self, _: &str, _: &str, _: usize) -> Result<Vec<String>> {
        Err(Error::FailedPrecondition(
            "filtering by segment needs segmentation: run it in this process or set peers.segmentation".into(),
        ))
    }
}

/// The error for a segment larger than the filter takes.
pub fn too_many(segment_id: &str, limit: usize) -> Error {
    Error::FailedPrecondition(format!(
        "segment {segment_id:?} has more than {limit} members, more than a KPI filter reads"
    ))
}
