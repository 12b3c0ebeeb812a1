//! What identity tells other services about members: a snapshot of the fields segmentation
//! and reporting use (never the phone, names or email) after each change, versioned by the
//! profile's version so a consumer keeps the newest whatever the order of arrival.

use loyalty_platform::clock::Millis;
use loyalty_platform::error::Result;
use loyalty_platform::types::Channel;

use crate::domain::{ConsentChannel, Date, Member, MemberStatus, Profile};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberSnapshot {
    pub tenant_id: String,
    pub member_id: String,
    /// The profile's version: 0 at registration, then one more per profile or consent change.
    pub version: u64,
    pub active: bool,
    pub registered_at: Millis,
    pub channel: Channel,
    /// Where the member registered: the chain's first store for them.
    pub store_id: String,
    pub birthday: Option<Date>,
    pub sms: bool,
    pub email: bool,
    pub push: bool,
    pub messenger: bool,
    pub questionnaire_complete: bool,
    pub referred: bool,
    /// The member whose referral code this one registered with (empty: none).
    pub referred_by: String,
    /// Set when this member was merged into another: the survivor.
    pub merged_into: String,
    /// The member was erased: the snapshot carries no personal data.
    pub erased: bool,
}

impl MemberSnapshot {
    pub fn of(member: &Member, profile: &Profile, questionnaire_complete: bool) -> Self {
        let granted = |channel: ConsentChannel| {
            profile
                .consents
                .iter()
                .any(|c| c.channel == channel && c.granted)
        };
        Self {
            tenant_id: member.tenant_id.clone(),
            member_id: member.member_id.clone(),
            version: profile.version,
            active: member.status == MemberStatus::Active,
            registered_at: member.registered_at,
            channel: member.channel,
            store_id: member.store_id.clone(),
            birthday: profile.birthday,
            sms: granted(ConsentChannel::Sms),
            email: granted(ConsentChannel::Email),
            push: granted(ConsentChannel::Push),
            messenger: granted(ConsentChannel::Messenger),
            questionnaire_complete,
            referred: member.referred_by.is_some(),
            referred_by: member.referred_by.clone().unwrap_or_default(),
            merged_into: String::new(),
            erased: member.status == MemberStatus::Erased,
        }
    }

    pub fn event_id(&self) -> String {
        format!(
            "member/{}/{}/{}",
            self.tenant_id, self.member_id, self.version
        )
    }
}

/// Where member events go. The wiring plugs in the event log.
#[async_trait::async_trait]
pub trait MemberEvents: Send + Sync + std::fmt::Debug {
    async fn member_changed(&self, snapshot: MemberSnapshot) -> Result<()>;
}

/// Publishes nothing (identity alone, in unit tests).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoMemberEvents;

#[async_trait::async_trait]
impl MemberEvents for NoMemberEvents {
    async fn member_changed(&self, _: MemberSnapshot) -> Result<()> {
        Ok(())
    }
}
