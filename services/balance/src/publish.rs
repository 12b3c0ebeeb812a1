//! The adapter from balance's ledger events to the event stream: each entry encoded as a
//! `loyalty.events.v1.Event` and appended to `events::LEDGER`.

use loyalty_platform::error::Result;
use loyalty_platform::events::{LEDGER, SharedEventLog};
use loyalty_platform::grpc::timestamp;
use loyalty_proto::events::v1 as pb;
use prost::Message;

use crate::events::{LedgerEvent, LedgerEvents};
use crate::grpc::reason_to_proto;

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
