//! The adapter from the member stream to action bonuses: promotion reads `members` in its
//! own consumer group and grants registration, questionnaire and referral bonuses; a merged
//! member's purchase history is filed under the survivor.

use loyalty_platform::events::consume::{Subscription, consume};
use loyalty_platform::events::{Delivery, MEMBERS, SharedEventLog};
use loyalty_platform::grpc::{channel, millis};
use loyalty_proto::events::v1 as pb;
use prost::Message;

use crate::actions::{ActionBonuses, MemberFacts};

pub const GROUP: &str = "promotion";

/// The facts of a member event; None for other events and undecodable payloads.
pub fn decode(payload: &[u8]) -> Option<MemberFacts> {
    let event = match pb::Event::decode(payload) {
        Ok(e) => e,
        Err(err) => {
            tracing::warn!(error = %err, "undecodable event skipped");
            return None;
        }
    };
    let Some(pb::event::Kind::Member(m)) = event.kind else {
        return None;
    };
    if event.tenant_id.is_empty() || m.member_id.is_empty() {
        return None;
    }
    let registered_at = m.registration_time.as_ref().map_or(0, millis);
    Some(MemberFacts {
        tenant_id: event.tenant_id,
        member_id: m.member_id,
        active: m.active,
        registered_at,
        store_id: m.store_id,
        channel: channel(m.channel),
        questionnaire_complete: m.questionnaire_complete,
        referred_by: m.referred_by_member_id,
        merged_into: m.merged_into_member_id,
        at: event.event_time.as_ref().map_or(registered_at, millis),
    })
}

/// Grants what one batch earns; the caller acknowledges it after this returns Ok.
pub async fn apply_batch(
    bonuses: &ActionBonuses,
    batch: &[Delivery],
) -> loyalty_platform::error::Result<usize> {
    let mut granted = 0;
    for facts in batch.iter().filter_map(|d| decode(&d.payload)) {
        granted += bonuses.apply(&facts).await?.len();
    }
    Ok(granted)
}

/// Consumes the member stream for as long as the process runs.
pub async fn run(bonuses: ActionBonuses, log: SharedEventLog, consumer: String) {
    let sub = Subscription {
        stream: MEMBERS,
        group: GROUP,
        consumer,
        span: "promotion.action_bonuses",
    };
    consume(log, sub, move |batch| {
        let bonuses = bonuses.clone();
        async move { apply_batch(&bonuses, &batch).await.map(|_| ()) }
    })
    .await;
}
