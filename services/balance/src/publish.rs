//! The adapter from balance's ledger events to the event stream: each entry encoded as a
//! `loyalty.events.v1.Event` and appended to `events::LEDGER`.

use std::sync::Arc;

use loyalty_platform::error::Result;
use loyalty_platform::events::{LEDGER, SharedEventLog};
use loyalty_platform::grpc::timestamp;
use loyalty_platform::replay::{self, EventSource};
use loyalty_proto::events::v1 as pb;
use prost::Message;

use crate::events::{LedgerEvent, LedgerEvents};
use crate::grpc::reason_to_proto;
use crate::store::{BalanceStore, EntryQuery};

#[derive(Debug, Clone)]
pub struct LogLedgerEvents {
    log: SharedEventLog,
}

impl LogLedgerEvents {
    pub fn new(log: SharedEventLog) -> Self {
        Self { log }
    }
}

pub fn encode(e: LedgerEvent) -> Vec<u8> {
    pb::Event {
        event_id: format!("ledger/{}/{}/{}", e.tenant_id, e.member_id, e.entry.seq),
        tenant_id: e.tenant_id,
        event_time: Some(timestamp(e.entry.created_at)),
        kind: Some(pb::event::Kind::Ledger(pb::LedgerEntryAppended {
            member_id: e.member_id,
            sequence: e.entry.seq,
            reason: reason_to_proto(e.entry.reason) as i32,
            amount: e.entry.amount,
            balance_after: e.entry.balance_after,
            create_time: Some(timestamp(e.entry.created_at)),
        })),
    }
    .encode_to_vec()
}

#[async_trait::async_trait]
impl LedgerEvents for LogLedgerEvents {
    async fn appended(&self, event: LedgerEvent) -> Result<()> {
        self.log.append(LEDGER, &[encode(event)]).await
    }
}

/// Balance's durable ledger replayed: members in (tenant, member) order, each member's
/// entries newest first, as the ledger events they published. The cursor is (tenant,
/// member, the sequence number the member's entries continue below; `None`: after the
/// member).
#[derive(Debug, Clone)]
pub struct LedgerReplay(pub Arc<dyn BalanceStore>);

type LedgerCursor = (String, String, Option<i64>);

/// Members read at a time while filling a page.
const MEMBERS_AT_ONCE: usize = 64;

#[async_trait::async_trait]
impl EventSource for LedgerReplay {
    async fn page(&self, cursor: &[u8], limit: usize) -> Result<replay::Page> {
        let mut page = replay::Page::default();
        // The member a previous page stopped inside, then the members after it.
        let (mut after, mut inside) = match replay::position::<LedgerCursor>(cursor)? {
            None => (None, None),
            Some((tenant, member, None)) => (Some((tenant, member)), None),
            Some((tenant, member, Some(before))) => (
                Some((tenant.clone(), member.clone())),
                Some((tenant, member, before)),
            ),
        };
        loop {
            let members: Vec<(String, String, Option<i64>)> = match inside.take() {
                Some((tenant, member, before)) => vec![(tenant, member, Some(before))],
                None => {
                    let members = self.0.members(after.clone(), MEMBERS_AT_ONCE).await?;
                    if members.is_empty() {
                        return Ok(page);
                    }
                    members.into_iter().map(|(t, m)| (t, m, None)).collect()
                }
            };
            for (tenant, member, mut before) in members {
                loop {
                    let query = EntryQuery {
                        before_seq: before,
                        limit: limit
                            .saturating_sub(page.events.len())
                            .clamp(1, crate::service::MAX_PAGE_SIZE),
                        ..EntryQuery::default()
                    };
                    let entries = self.0.entries(&tenant, &member, &query).await?;
                    page.events.extend(entries.entries.into_iter().map(|entry| {
                        encode(LedgerEvent {
                            tenant_id: tenant.clone(),
                            member_id: member.clone(),
                            entry,
                        })
                    }));
                    before = entries.next_before;
                    if before.is_none() || page.is_full(limit) {
                        break;
                    }
                }
                if page.is_full(limit) {
                    page.next = Some(replay::cursor(&(tenant, member, before)));
                    return Ok(page);
                }
                after = Some((tenant, member));
            }
        }
    }
}
