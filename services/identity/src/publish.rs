//! The adapter from identity's member events to the event stream: each snapshot encoded as a
//! `loyalty.events.v1.Event` and appended to `events::MEMBERS`.

use loyalty_platform::error::Result;
use loyalty_platform::events::{MEMBERS, SharedEventLog};
use loyalty_platform::grpc::{channel_to_proto, timestamp};
use loyalty_platform::replay::{self, EventSource};
use loyalty_proto::common::v1::Date as PbDate;
use loyalty_proto::events::v1 as pb;
use prost::Message;

use crate::Identity;
use crate::events::{MemberEvents, MemberSnapshot};

#[derive(Debug, Clone)]
pub struct LogMemberEvents {
    log: SharedEventLog,
}

impl LogMemberEvents {
    pub fn new(log: SharedEventLog) -> Self {
        Self { log }
    }
}

pub fn encode(s: MemberSnapshot, now: i64) -> Vec<u8> {
    pb::Event {
        event_id: s.event_id(),
        tenant_id: s.tenant_id,
        event_time: Some(timestamp(now)),
        kind: Some(pb::event::Kind::Member(pb::MemberChanged {
            member_id: s.member_id,
            version: i64::try_from(s.version).unwrap_or(i64::MAX),
            active: s.active,
            registration_time: Some(timestamp(s.registered_at)),
            channel: channel_to_proto(s.channel),
            store_id: s.store_id,
            birthday: s.birthday.map(|d| PbDate {
                year: i32::from(d.year),
                month: i32::from(d.month),
                day: i32::from(d.day),
            }),
            contactable_sms: s.sms,
            contactable_email: s.email,
            contactable_push: s.push,
            contactable_messenger: s.messenger,
            questionnaire_complete: s.questionnaire_complete,
            referred: s.referred,
            referred_by_member_id: s.referred_by,
            merged_into_member_id: s.merged_into,
            erased: s.erased,
        })),
    }
    .encode_to_vec()
}

#[async_trait::async_trait]
impl MemberEvents for LogMemberEvents {
    async fn member_changed(&self, snapshot: MemberSnapshot) -> Result<()> {
        let now = loyalty_platform::clock::Clock::now_ms(&loyalty_platform::clock::SystemClock);
        self.log.append(MEMBERS, &[encode(snapshot, now)]).await
    }
}

/// The members replayed: every member of every tenant, in (tenant, member id) order, as a
/// member event of its current version. The cursor is the last member a page holds.
#[derive(Debug, Clone)]
pub struct MemberReplay(pub Identity);

#[async_trait::async_trait]
impl EventSource for MemberReplay {
    async fn page(&self, cursor: &[u8], limit: usize) -> Result<replay::Page> {
        let after = replay::position::<(String, String)>(cursor)?;
        let snapshots = self.0.snapshots(after, limit).await?;
        let next = match snapshots.last() {
            Some(last) if snapshots.len() == limit => {
                Some(replay::cursor(&(&last.tenant_id, &last.member_id)))
            }
            _ => None,
        };
        let now = self.0.clock.now_ms();
        Ok(replay::Page {
            events: snapshots.into_iter().map(|s| encode(s, now)).collect(),
            next,
        })
    }
}
