//! One export, page by page, whatever its format: receipt facts of a snapshot in (business
//! day, sequence) order, or member features by member id. Each page says where a resumed
//! export continues. The formats (CSV and Arrow IPC chunks, Arrow Flight, Parquet) are
//! adapters over these pages.

use loyalty_platform::error::{Error, Result};
use tokio::sync::mpsc;

use crate::fact::Fact;
use crate::kpi::Scope;
use crate::service::{MemberFeatures, Reporting};
use crate::store::{Position, Receipts};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Purchases,
    Lines,
    Refunds,
    Ledger,
    Members,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Purchases => "purchases",
            Kind::Lines => "purchase_lines",
            Kind::Refunds => "refunds",
            Kind::Ledger => "ledger_entries",
            Kind::Members => "member_features",
        }
    }

    pub fn parse(name: &str) -> Option<Kind> {
        [
            Kind::Purchases,
            Kind::Lines,
            Kind::Refunds,
            Kind::Ledger,
            Kind::Members,
        ]
        .into_iter()
        .find(|k| k.name() == name)
    }
}

/// Where an export continues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resume {
    /// The snapshot, and the last position sent.
    Receipts(u64, Position),
    /// The last member sent.
    Members(String),
}

impl Resume {
    /// `<kind>.<binding>.<snapshot>.<day>.<seq>` or `member_features.<binding>.<member id>`;
    /// the binding names the export (tenant, kind, days, format) the token continues.
    pub fn token(&self, kind: Kind, binding: u64) -> String {
        match self {
            Resume::Receipts(snapshot, (day, seq)) => {
                format!("{}.{binding:016x}.{snapshot}.{day}.{seq}", kind.name())
            }
            Resume::Members(m) => format!("{}.{binding:016x}.{m}", kind.name()),
        }
    }

    pub fn parse(token: &str, kind: Kind, binding: u64) -> Result<Option<Resume>> {
        if token.is_empty() {
            return Ok(None);
        }
        if token.len() > 512 {
            return Err(Error::invalid("resume_token", "at most 512 characters"));
        }
        let bad = || Error::invalid("resume_token", "is not a token this export handed out");
        let mut parts = token.splitn(3, '.');
        let (Some(name), Some(bound), Some(rest)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(bad());
        };
        if name != kind.name() || bound != format!("{binding:016x}") {
            return Err(Error::invalid(
                "resume_token",
                "belongs to another export (tenant, kind, period or format)",
            ));
        }
        if kind == Kind::Members {
            return Ok(Some(Resume::Members(rest.to_string())));
        }
        let parts: Vec<&str> = rest.split('.').collect();
        match parts.as_slice() {
            [snapshot, day, seq] => Ok(Some(Resume::Receipts(
                snapshot.parse().map_err(|_| bad())?,
                (
                    day.parse().map_err(|_| bad())?,
                    seq.parse().map_err(|_| bad())?,
                ),
            ))),
            _ => Err(bad()),
        }
    }
}

/// One export as asked.
#[derive(Debug, Clone)]
pub struct Job {
    pub tenant_id: String,
    pub kind: Kind,
    pub scope: Scope,
    /// What the pages range over: business days for receipts, milliseconds for ledger
    /// entries (inclusive).
    pub range: (i64, i64),
    /// The snapshot of receipt facts it reads (ignored when resuming: the token's).
    pub snapshot: u64,
    pub resume: Option<Resume>,
    /// Rows per page at most (a line export ends a page at a receipt's end, so one receipt
    /// of more lines makes a larger page).
    pub rows: usize,
    /// What the export's resume tokens carry.
    pub binding: u64,
}

/// Stored bytes one page reads at most: it keeps every chunk well under gRPC's message
/// limit whatever the rows hold.
pub const PAGE_BYTES: usize = 1 << 20;

#[derive(Debug, Clone)]
pub enum Rows {
    Facts(Vec<Fact>),
    Members(Vec<MemberFeatures>),
}

impl Rows {
    /// Rows this page makes in the export (a purchase makes one per line in a line export).
    pub fn count(&self, kind: Kind) -> usize {
        match self {
            Rows::Members(m) => m.len(),
            Rows::Facts(f) if kind == Kind::Lines => f
                .iter()
                .map(|f| match f {
                    Fact::Purchase(p) => p.lines.len(),
                    _ => 0,
                })
                .sum(),
            Rows::Facts(f) => f.len(),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Page {
    pub rows: Rows,
    /// Where to continue after this page; None on the last.
    pub resume: Option<Resume>,
}

/// Sends the export's pages in order, then returns; stops early when the receiver is gone.
/// At most the channel's capacity of pages wait for a slow reader.
pub async fn run(reporting: Reporting, job: Job, tx: mpsc::Sender<Result<Page>>) {
    let rows = job.rows.max(1);
    if job.kind == Kind::Members {
        let mut after = match job.resume {
            Some(Resume::Members(m)) => Some(m),
            _ => None,
        };
        loop {
            let page = match reporting.member_features(&job.tenant_id, after.as_deref(), rows) {
                Ok(p) => p,
                Err(e) => {
                    let _ = tx.send(Err(e)).await;
                    return;
                }
            };
            let more = page.len() >= rows;
            after = page.last().map(|m| m.member_id.clone());
            let resume = after.clone().filter(|_| more).map(Resume::Members);
            let last = resume.is_none();
            if tx
                .send(Ok(Page {
                    rows: Rows::Members(page),
                    resume,
                }))
                .await
                .is_err()
                || last
            {
                return;
            }
        }
    }
    let receipts = match job.kind {
        Kind::Refunds => Receipts::Refunds,
        Kind::Ledger => Receipts::Ledger,
        _ => Receipts::Purchases,
    };
    let (snapshot, mut after) = match job.resume {
        Some(Resume::Receipts(s, p)) => (s, Some(p)),
        _ => (job.snapshot, None),
    };
    loop {
        let (mut kept, mut next) = match reporting
            .export_page(
                &job.tenant_id,
                receipts,
                &job.scope,
                job.range,
                snapshot,
                after,
                rows,
                PAGE_BYTES,
            )
            .await
        {
            Ok(p) => p,
            Err(e) => {
                let _ = tx.send(Err(e)).await;
                return;
            }
        };
        if job.kind == Kind::Lines {
            // End the page at the receipt that reaches the row count.
            let mut lines = 0;
            for i in 0..kept.len() {
                if let Fact::Purchase(p) = &kept[i].1 {
                    lines += p.lines.len();
                }
                if lines >= rows && i + 1 < kept.len() {
                    next = Some(kept[i].0);
                    kept.truncate(i + 1);
                    break;
                }
            }
        }
        let resume = next.map(|p| Resume::Receipts(snapshot, p));
        let facts = kept.into_iter().map(|(_, f)| f).collect();
        if tx
            .send(Ok(Page {
                rows: Rows::Facts(facts),
                resume,
            }))
            .await
            .is_err()
            || next.is_none()
        {
            return;
        }
        after = next;
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn resume_tokens_round_trip_and_refuse_strangers() {
        let r = Resume::Receipts(7, (20000, 42));
        let t = r.token(Kind::Purchases, 99);
        assert_eq!(Resume::parse(&t, Kind::Purchases, 99).unwrap(), Some(r));
        assert!(Resume::parse("garbage", Kind::Purchases, 99).is_err());
        assert!(Resume::parse(&t, Kind::Refunds, 99).is_err());
        assert!(
            Resume::parse(&t, Kind::Purchases, 98).is_err(),
            "another export's token"
        );
        let m = Resume::Members("member.with.dots".into());
        assert_eq!(
            Resume::parse(&m.token(Kind::Members, 1), Kind::Members, 1).unwrap(),
            Some(m)
        );
    }
}
