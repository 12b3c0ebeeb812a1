//! Members and cards: the identity domain core. No gRPC, no storage engine here.

use std::sync::Arc;

use loyalty_platform::clock::{Millis, SharedClock};
use loyalty_platform::error::{Error, MAX_ID_LEN, Result, Violations};
use loyalty_platform::types::{Channel, check_tenant};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::events::{MemberEvents, MemberSnapshot, NoMemberEvents};
use crate::lifecycle::{MemberPoints, NoPoints};
use crate::store::{CardHolder, IdentityStore, Replaced, Saved};

pub(crate) const MAX_NAME_LEN: usize = 100;
pub(crate) const MAX_EMAIL_LEN: usize = 254;
const MAX_RAW_PHONE_LEN: usize = 32;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemberStatus {
    Active,
    Merged,
    Erased,
    /// Blocked by the back office (fraud): refused at the POS, in the app and by balance.
    Blocked,
}

/// What [`Identity::lookup_by_card`] found: an active member, the card and the profile.
#[derive(Debug, Clone)]
pub struct CardLookup {
    pub member: Member,
    pub card: Card,
    pub profile: Profile,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub tenant_id: String,
    pub member_id: String,
    pub status: MemberStatus,
    /// E.164.
    pub phone: String,
    pub email: String,
    pub first_name: String,
    pub last_name: String,
    pub referral_code: String,
    pub referred_by: Option<String>,
    pub channel: Channel,
    pub store_id: String,
    pub registered_at: Millis,
    pub updated_at: Millis,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CardKind {
    Plastic,
    Virtual,
    NoName,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlockReason {
    Lost,
    Stolen,
    Fraud,
}

impl BlockReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Lost => "lost",
            Self::Stolen => "stolen",
            Self::Fraud => "fraud",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CardStatus {
    Active,
    Unbound,
    Blocked(BlockReason),
    Replaced { by: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Card {
    pub tenant_id: String,
    pub number: String,
    pub kind: CardKind,
    pub status: CardStatus,
    pub member_id: Option<String>,
    pub issued_at: Millis,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Gender {
    #[default]
    Unspecified,
    Female,
    Male,
    Other,
}

/// A calendar date (birthdays).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Date {
    pub year: u16,
    pub month: u8,
    pub day: u8,
}

impl Date {
    /// A real date between 1900-01-01 and 2100-12-31.
    pub fn checked(year: i32, month: i32, day: i32) -> Option<Self> {
        let leap = (year % 4 == 0 && year % 100 != 0) || year % 400 == 0;
        let days = match month {
            1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
            4 | 6 | 9 | 11 => 30,
            2 if leap => 29,
            2 => 28,
            _ => return None,
        };
        if !(1900..=2100).contains(&year) || !(1..=days).contains(&day) {
            return None;
        }
        Some(Self {
            year: u16::try_from(year).ok()?,
            month: u8::try_from(month).ok()?,
            day: u8::try_from(day).ok()?,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ConsentChannel {
    Sms,
    Email,
    Push,
    Messenger,
}

/// Consent (or its withdrawal) to be contacted on one channel, with when and where it was
/// given.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consent {
    pub channel: ConsentChannel,
    pub granted: bool,
    pub recorded_at: Millis,
    pub source: String,
}

/// The profile beyond registration: kept beside the member, versioned for safe updates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Profile {
    /// 0 before the first update.
    pub version: u64,
    pub gender: Gender,
    pub birthday: Option<Date>,
    pub preferred_store_id: String,
    pub attributes: std::collections::BTreeMap<String, String>,
    /// At most one per channel, in channel order.
    pub consents: Vec<Consent>,
}

impl Profile {
    /// Whether the member may be contacted on at least one channel.
    pub fn contactable(&self) -> bool {
        self.consents.iter().any(|c| c.granted)
    }
}

/// The fields a questionnaire can require.
pub use loyalty_platform::config::QUESTIONNAIRE_FIELDS;

/// Changes to a profile; `None` leaves a field as it is.
#[derive(Debug, Clone, Default)]
pub struct ProfileUpdate {
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub email: Option<String>,
    pub gender: Option<Gender>,
    /// `Some(None)` clears the birthday.
    pub birthday: Option<Option<Date>>,
    pub preferred_store_id: Option<String>,
    pub attributes: Option<std::collections::BTreeMap<String, String>>,
}

/// Most custom attributes per member, and their sizes.
pub const MAX_ATTRIBUTES: usize = 50;
const MAX_ATTRIBUTE_KEY_LEN: usize = 64;
const MAX_ATTRIBUTE_VALUE_LEN: usize = 256;
const MAX_CONSENT_SOURCE_LEN: usize = 32;

/// A registration as it arrives.
#[derive(Debug, Clone, Default)]
pub struct Registration {
    pub tenant_id: String,
    pub phone: String,
    pub default_region: String,
    pub channel: Channel,
    pub store_id: String,
    pub referral_code: String,
    pub email: String,
    pub first_name: String,
    pub last_name: String,
}

/// Parses a phone number written in any common format into E.164. `region` (ISO 3166-1
/// alpha-2) applies to numbers without a country code.
pub fn normalize_phone(raw: &str, region: &str) -> std::result::Result<String, String> {
    if raw.trim().is_empty() {
        return Err("is required".into());
    }
    if raw.len() > MAX_RAW_PHONE_LEN {
        return Err(format!("must be at most {MAX_RAW_PHONE_LEN} characters"));
    }
    let region: phonenumber::country::Id = region
        .parse()
        .map_err(|_| format!("unknown default region {region:?}"))?;
    let parsed =
        phonenumber::parse(Some(region), raw).map_err(|_| "is not a phone number".to_string())?;
    // The number itself is not echoed: errors reach logs and the audit log.
    if !parsed.is_valid() {
        return Err("is not a valid phone number".into());
    }
    Ok(parsed.format().mode(phonenumber::Mode::E164).to_string())
}

/// Appends the Luhn check digit to a string of digits.
pub fn with_check_digit(digits: &str) -> String {
    let sum: u32 = digits
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 0 {
                let x = d * 2;
                if x > 9 { x - 9 } else { x }
            } else {
                d
            }
        })
        .sum();
    let check = (10 - sum % 10) % 10;
    format!("{digits}{check}")
}

/// True when the last digit is the Luhn check digit of the others.
pub fn check_digit_ok(number: &str) -> bool {
    number.len() >= 2 && with_check_digit(&number[..number.len() - 1]) == number
}

pub(crate) fn check_card_number(v: &mut Violations, number: &str, field: &str) {
    if number.is_empty() {
        v.add(field, "is required");
    } else if !(8..=19).contains(&number.len()) || !number.bytes().all(|b| b.is_ascii_digit()) {
        v.add(field, "must be 8 to 19 digits");
    }
}

const REFERRAL_ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";

pub(crate) fn new_referral_code() -> String {
    let mut rng = rand::rng();
    (0..8)
        .map(|_| char::from(REFERRAL_ALPHABET[rng.random_range(0..REFERRAL_ALPHABET.len())]))
        .collect()
}

fn new_virtual_card_number() -> String {
    let mut rng = rand::rng();
    let body: String = std::iter::once('9')
        .chain((0..14).map(|_| char::from(b'0' + rng.random_range(0..10u8))))
        .collect();
    with_check_digit(&body)
}

/// How many times a generated code or number is retried on a collision.
pub(crate) const GENERATION_ATTEMPTS: usize = 8;

/// Most members one page lists.
pub const MAX_PAGE: usize = 1_000;

/// Most cards one range import creates.
pub const MAX_CARD_RANGE: u64 = 100_000;

/// How many times a card or profile change is re-decided after a concurrent change.
pub(crate) const CHANGE_ATTEMPTS: usize = 4;

/// The identity service's domain operations.
#[derive(Debug, Clone)]
pub struct Identity {
    pub(crate) store: Arc<dyn IdentityStore>,
    pub(crate) clock: SharedClock,
    default_region: String,
    questionnaire: Vec<String>,
    events: Arc<dyn MemberEvents>,
    pub(crate) points: Arc<dyn MemberPoints>,
}

impl Identity {
    pub fn new(store: Arc<dyn IdentityStore>, clock: SharedClock, default_region: String) -> Self {
        Self {
            store,
            clock,
            default_region,
            questionnaire: ["first_name", "last_name", "gender", "birthday"]
                .map(String::from)
                .to_vec(),
            events: Arc::new(NoMemberEvents),
            points: Arc::new(NoPoints),
        }
    }

    /// How merges move points and imports hand over opening balances (refused by default).
    #[must_use]
    pub fn with_points(mut self, points: Arc<dyn MemberPoints>) -> Self {
        self.points = points;
        self
    }

    /// Where member events go (nowhere by default).
    #[must_use]
    pub fn with_events(mut self, events: Arc<dyn MemberEvents>) -> Self {
        self.events = events;
        self
    }

    async fn republish_by_phone(&self, tenant_id: &str, phone: &str) -> Result<()> {
        let Some(id) = self.store.member_id_by_phone(tenant_id, phone).await? else {
            return Ok(());
        };
        let Some(existing) = self.store.member(tenant_id, &id).await? else {
            return Ok(());
        };
        let profile = self
            .store
            .profile(tenant_id, &id)
            .await?
            .unwrap_or_default();
        self.publish(&existing, &profile).await
    }

    /// The newest snapshot of every member after `after` (tenant, member), at most `limit`:
    /// what the member stream last said of each, for rebuilding what others derive from it.
    pub async fn snapshots(
        &self,
        after: Option<(String, String)>,
        limit: usize,
    ) -> Result<Vec<MemberSnapshot>> {
        let members = self.store.members_after(after, limit).await?;
        let mut out = Vec::with_capacity(members.len());
        for m in members {
            // A point read on this task per member: let other calls in between.
            tokio::task::yield_now().await;
            let profile = self
                .store
                .profile(&m.tenant_id, &m.member_id)
                .await?
                .unwrap_or_default();
            let complete = self.questionnaire_complete(&m, &profile);
            out.push(MemberSnapshot::of(&m, &profile, complete));
        }
        Ok(out)
    }

    /// Publishes the member's snapshot; the caller is answered only after it.
    pub(crate) async fn publish(&self, member: &Member, profile: &Profile) -> Result<()> {
        let complete = self.questionnaire_complete(member, profile);
        self.events
            .member_changed(MemberSnapshot::of(member, profile, complete))
            .await
    }

    /// Publishes the snapshot of an erased member (or of one merged into it), marked erased
    /// so consumers drop what they kept of its personal data.
    pub(crate) async fn publish_erasure(&self, member: &Member, profile: &Profile) -> Result<()> {
        let complete = self.questionnaire_complete(member, profile);
        let mut snapshot = MemberSnapshot::of(member, profile, complete);
        snapshot.erased = true;
        self.events.member_changed(snapshot).await
    }

    /// Publishes a merged member's snapshot, naming the survivor.
    pub(crate) async fn publish_merged(
        &self,
        member: &Member,
        profile: &Profile,
        into: &str,
    ) -> Result<()> {
        let complete = self.questionnaire_complete(member, profile);
        let mut snapshot = MemberSnapshot::of(member, profile, complete);
        snapshot.merged_into = into.to_string();
        self.events.member_changed(snapshot).await
    }

    /// Rewrites storage where erasures left replaced bytes behind; true when it did.
    pub async fn scrub_erased(&self) -> Result<bool> {
        self.store.scrub().await
    }

    /// The profile fields that make the questionnaire complete (names from
    /// [`QUESTIONNAIRE_FIELDS`]).
    #[must_use]
    pub fn with_questionnaire(mut self, fields: Vec<String>) -> Self {
        self.questionnaire = fields;
        self
    }

    /// Whether every questionnaire field is filled.
    pub fn questionnaire_complete(&self, member: &Member, profile: &Profile) -> bool {
        self.questionnaire.iter().all(|f| match f.as_str() {
            "first_name" => !member.first_name.is_empty(),
            "last_name" => !member.last_name.is_empty(),
            "email" => !member.email.is_empty(),
            "gender" => profile.gender != Gender::Unspecified,
            "birthday" => profile.birthday.is_some(),
            "preferred_store_id" => !profile.preferred_store_id.is_empty(),
            _ => false,
        })
    }

    /// The member's profile (empty before its first update).
    pub async fn profile(&self, tenant_id: &str, member_id: &str) -> Result<Profile> {
        Ok(self
            .store
            .profile(tenant_id, member_id)
            .await?
            .unwrap_or_default())
    }

    /// Changes the fields `update` names, atomically with a version check; concurrent
    /// updates are re-applied on the newer profile.
    pub async fn update_profile(
        &self,
        tenant_id: &str,
        member_id: &str,
        update: ProfileUpdate,
    ) -> Result<(Member, Profile)> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.text(member_id, "member_id", MAX_ID_LEN);
        if let Some(name) = &update.first_name {
            v.optional_text(name, "member.first_name", MAX_NAME_LEN);
        }
        if let Some(name) = &update.last_name {
            v.optional_text(name, "member.last_name", MAX_NAME_LEN);
        }
        if let Some(email) = &update.email {
            v.optional_text(email, "member.email", MAX_EMAIL_LEN);
            if !email.is_empty() && !looks_like_email(email) {
                v.add("member.email", "is not an email address");
            }
        }
        if let Some(store) = &update.preferred_store_id {
            v.optional_text(store, "member.preferred_store_id", MAX_ID_LEN);
        }
        if let Some(attributes) = &update.attributes {
            v.check(
                attributes.len() <= MAX_ATTRIBUTES,
                "member.attributes",
                format!("at most {MAX_ATTRIBUTES} attributes"),
            );
            for (k, value) in attributes {
                v.check(
                    !k.is_empty() && k.len() <= MAX_ATTRIBUTE_KEY_LEN,
                    "member.attributes",
                    format!("keys are 1 to {MAX_ATTRIBUTE_KEY_LEN} bytes"),
                );
                v.check(
                    value.len() <= MAX_ATTRIBUTE_VALUE_LEN,
                    format!("member.attributes[{k}]"),
                    format!("at most {MAX_ATTRIBUTE_VALUE_LEN} bytes"),
                );
            }
        }
        v.finish()?;
        for _ in 0..CHANGE_ATTEMPTS {
            let mut member = self.changeable_member(tenant_id, member_id).await?;
            let before = self.profile(tenant_id, member_id).await?;
            let mut profile = before.clone();
            if let Some(name) = &update.first_name {
                member.first_name.clone_from(name);
            }
            if let Some(name) = &update.last_name {
                member.last_name.clone_from(name);
            }
            if let Some(email) = &update.email {
                member.email = email.to_ascii_lowercase();
            }
            if let Some(gender) = update.gender {
                profile.gender = gender;
            }
            if let Some(birthday) = update.birthday {
                profile.birthday = birthday;
            }
            if let Some(store) = &update.preferred_store_id {
                profile.preferred_store_id.clone_from(store);
            }
            if let Some(attributes) = &update.attributes {
                profile.attributes.clone_from(attributes);
            }
            if self.save(&mut member, &mut profile, before.version).await? {
                self.publish(&member, &profile).await?;
                return Ok((member, profile));
            }
        }
        Err(Error::Unavailable(format!(
            "member {member_id} kept changing; retry"
        )))
    }

    /// Records consent (or its withdrawal) per channel, with the time and the source.
    pub async fn set_consents(
        &self,
        tenant_id: &str,
        member_id: &str,
        consents: &[(Option<ConsentChannel>, bool, String)],
    ) -> Result<(Member, Profile)> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.text(member_id, "member_id", MAX_ID_LEN);
        v.check(
            !consents.is_empty(),
            "consents",
            "must name at least one channel",
        );
        v.check(
            consents.len() <= 4,
            "consents",
            "at most 4 entries, one per channel",
        );
        let mut seen = std::collections::BTreeSet::new();
        // More than 4 is refused above; the first 4 are enough to report on.
        for (i, (channel, _, source)) in consents.iter().enumerate().take(4) {
            match channel {
                None => v.add(
                    format!("consents[{i}].channel"),
                    "must be SMS, EMAIL, PUSH or MESSENGER",
                ),
                Some(c) => v.check(
                    seen.insert(*c),
                    format!("consents[{i}].channel"),
                    "appears twice",
                ),
            }
            v.optional_text(
                source,
                format!("consents[{i}].source"),
                MAX_CONSENT_SOURCE_LEN,
            );
        }
        v.finish()?;
        for _ in 0..CHANGE_ATTEMPTS {
            let mut member = self.changeable_member(tenant_id, member_id).await?;
            let before = self.profile(tenant_id, member_id).await?;
            let mut profile = before.clone();
            let now = self.clock.now_ms();
            for (channel, granted, source) in consents {
                let Some(channel) = *channel else { continue };
                profile.consents.retain(|c| c.channel != channel);
                profile.consents.push(Consent {
                    channel,
                    granted: *granted,
                    recorded_at: now,
                    source: source.clone(),
                });
            }
            profile.consents.sort_by_key(|c| c.channel);
            if self.save(&mut member, &mut profile, before.version).await? {
                self.publish(&member, &profile).await?;
                return Ok((member, profile));
            }
        }
        Err(Error::Unavailable(format!(
            "member {member_id} kept changing; retry"
        )))
    }

    /// Saves a changed member and profile; `false` when another change came first.
    async fn save(
        &self,
        member: &mut Member,
        profile: &mut Profile,
        expected: u64,
    ) -> Result<bool> {
        member.updated_at = self.clock.now_ms();
        profile.version = expected + 1;
        match self.store.save_profile(member, profile, expected).await? {
            Saved::Done => Ok(true),
            Saved::Stale => Ok(false),
            Saved::EmailTaken => Err(email_taken()),
        }
    }

    pub fn store(&self) -> &Arc<dyn IdentityStore> {
        &self.store
    }

    pub(crate) fn region<'a>(&'a self, requested: &'a str) -> &'a str {
        if requested.is_empty() {
            &self.default_region
        } else {
            requested
        }
    }

    /// Registers a member by phone; one member per phone per tenant.
    pub async fn register(&self, r: Registration) -> Result<Member> {
        let mut v = Violations::new();
        check_tenant(&mut v, &r.tenant_id);
        let phone = normalize_phone(&r.phone, self.region(&r.default_region));
        if let Err(why) = &phone {
            v.add("phone", why.clone());
        }
        v.optional_text(&r.store_id, "store_id", MAX_ID_LEN);
        v.optional_text(&r.first_name, "first_name", MAX_NAME_LEN);
        v.optional_text(&r.last_name, "last_name", MAX_NAME_LEN);
        v.optional_text(&r.email, "email", MAX_EMAIL_LEN);
        if !r.email.is_empty() && !looks_like_email(&r.email) {
            v.add("email", "is not an email address");
        }
        v.optional_text(&r.referral_code, "referral_code", 32);
        v.finish()?;
        let phone = phone.map_err(|why| Error::invalid("phone", why))?;

        let referred_by = if r.referral_code.is_empty() {
            None
        } else {
            let code = r.referral_code.to_ascii_uppercase();
            match self
                .store
                .member_by_referral_code(&r.tenant_id, &code)
                .await?
            {
                // A blocked referrer earns nothing from new sign-ups.
                Some(id) => match self.usable_member(&r.tenant_id, &id).await {
                    Ok(referrer) => Some(referrer.member_id),
                    Err(Error::FailedPrecondition(_)) => {
                        return Err(Error::invalid(
                            "referral_code",
                            "belongs to a member who cannot refer anyone now",
                        ));
                    }
                    Err(e) => return Err(e),
                },
                None => {
                    return Err(Error::invalid(
                        "referral_code",
                        "no member has this referral code",
                    ));
                }
            }
        };

        let now = self.clock.now_ms();
        let mut member = Member {
            tenant_id: r.tenant_id,
            member_id: uuid::Uuid::now_v7().simple().to_string(),
            status: MemberStatus::Active,
            phone,
            email: r.email.to_ascii_lowercase(),
            first_name: r.first_name,
            last_name: r.last_name,
            referral_code: new_referral_code(),
            referred_by,
            channel: r.channel,
            store_id: r.store_id,
            registered_at: now,
            updated_at: now,
        };
        for _ in 0..GENERATION_ATTEMPTS {
            match self.store.insert_member(&member).await? {
                Inserted::Done => {
                    self.publish(&member, &Profile::default()).await?;
                    return Ok(member);
                }
                Inserted::PhoneTaken => {
                    // Perhaps a retry of a registration whose event never went out: publish
                    // the existing member's snapshot again (consumers skip it if they have it).
                    self.republish_by_phone(&member.tenant_id, &member.phone)
                        .await?;
                    // The number is not echoed: errors reach logs and the audit log.
                    return Err(Error::AlreadyExists(
                        "a member with this phone already exists".into(),
                    ));
                }
                Inserted::EmailTaken => return Err(email_taken()),
                Inserted::CodeTaken => member.referral_code = new_referral_code(),
            }
        }
        Err(Error::internal(anyhow::anyhow!(
            "could not generate a unique referral code"
        )))
    }

    /// A member with their cards. Merged members resolve to the survivor.
    /// A member by id with its cards. A merged member's id answers the survivor.
    pub async fn member(&self, tenant_id: &str, member_id: &str) -> Result<(Member, Vec<Card>)> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.text(member_id, "member_id", MAX_ID_LEN);
        v.finish()?;
        let member = self.current(tenant_id, member_id).await?;
        let cards = self
            .store
            .cards_of_member(tenant_id, &member.member_id)
            .await?;
        Ok((member, cards))
    }

    /// A tenant's members in id order after `after`, at most `limit` (1 to 1000).
    pub async fn list_members(
        &self,
        tenant_id: &str,
        after: &str,
        limit: usize,
    ) -> Result<Vec<Member>> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.optional_text(after, "page_token", MAX_ID_LEN);
        v.check(
            (1..=MAX_PAGE).contains(&limit),
            "page_size",
            format!("must be between 1 and {MAX_PAGE}"),
        );
        v.finish()?;
        let mut members = self
            .store
            .members_after(Some((tenant_id.to_string(), after.to_string())), limit)
            .await?;
        members.retain(|m| m.tenant_id == tenant_id);
        Ok(members)
    }

    /// A member by id (a merged id answers the survivor) that may buy, earn and spend now:
    /// erased and blocked members are refused with the reason.
    pub async fn usable_member(&self, tenant_id: &str, member_id: &str) -> Result<Member> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.text(member_id, "member_id", MAX_ID_LEN);
        v.finish()?;
        Self::usable(self.current(tenant_id, member_id).await?)
    }

    /// The POS may use a member found by a lookup only while it is active.
    fn usable(member: Member) -> Result<Member> {
        match member.status {
            MemberStatus::Active => Ok(member),
            MemberStatus::Erased => Err(Error::FailedPrecondition(format!(
                "member {} was erased",
                member.member_id
            ))),
            MemberStatus::Merged => Err(Error::internal(anyhow::anyhow!(
                "member {} resolved to a merged member",
                member.member_id
            ))),
            MemberStatus::Blocked => Err(Error::FailedPrecondition(format!(
                "member {} is blocked",
                member.member_id
            ))),
        }
    }

    /// Looks a member up by email (stored lower-case, one member per email per tenant).
    pub async fn lookup_by_email(&self, tenant_id: &str, email: &str) -> Result<Member> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.text(email, "email", MAX_EMAIL_LEN);
        if !email.is_empty() && !looks_like_email(email) {
            v.add("email", "is not an email address");
        }
        v.finish()?;
        let email = email.to_ascii_lowercase();
        let id = self
            .store
            .member_id_by_email(tenant_id, &email)
            .await?
            .ok_or_else(|| Error::NotFound("no member with this email".into()))?;
        Self::usable(self.indexed(tenant_id, &id, "email").await?)
    }

    /// The member an index entry names, or its survivor if it was merged since.
    async fn indexed(&self, tenant_id: &str, id: &str, index: &str) -> Result<Member> {
        match self.current(tenant_id, id).await {
            Err(Error::NotFound(_)) => Err(Error::internal(anyhow::anyhow!(
                "{index} index points to missing member {id}"
            ))),
            other => other,
        }
    }

    /// The POS lookup by card: refuses blocked, replaced and unbound cards with the reason.
    /// The card, its member and the profile come from one read of the store when the card's
    /// member is active; a merged member's survivor takes reads of its own.
    pub async fn lookup_by_card(&self, tenant_id: &str, number: &str) -> Result<CardLookup> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        check_card_number(&mut v, number, "card_number");
        v.finish()?;
        let CardHolder {
            card,
            member,
            profile,
        } = self
            .store
            .card_holder(tenant_id, number)
            .await?
            .ok_or_else(|| Error::NotFound(format!("card {number} not found")))?;
        let member_id = match (&card.status, &card.member_id) {
            (CardStatus::Active, Some(id)) => id.clone(),
            (CardStatus::Blocked(reason), _) => {
                return Err(Error::FailedPrecondition(format!(
                    "card {number} is blocked ({})",
                    reason.as_str()
                )));
            }
            (CardStatus::Replaced { by }, _) => {
                return Err(Error::FailedPrecondition(format!(
                    "card {number} was replaced by card {by}"
                )));
            }
            (CardStatus::Unbound, _) | (CardStatus::Active, None) => {
                return Err(Error::FailedPrecondition(format!(
                    "card {number} is not bound to a member"
                )));
            }
        };
        let (member, profile) = match member {
            Some(m) if m.status == MemberStatus::Active => (m, profile.unwrap_or_default()),
            // Merged (resolved to its survivor), blocked, erased or missing: the general path
            // says which.
            _ => {
                let m = Self::usable(self.indexed(tenant_id, &member_id, "card").await?)?;
                let p = self.profile(tenant_id, &m.member_id).await?;
                (m, p)
            }
        };
        Ok(CardLookup {
            member,
            card,
            profile,
        })
    }

    /// Lookup by phone, normalized like at registration.
    pub async fn lookup_by_phone(
        &self,
        tenant_id: &str,
        raw: &str,
        region: &str,
    ) -> Result<Member> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        let phone = normalize_phone(raw, self.region(region));
        if let Err(why) = &phone {
            v.add("phone", why.clone());
        }
        v.finish()?;
        let phone = phone.map_err(|why| Error::invalid("phone", why))?;
        let id = self
            .store
            .member_id_by_phone(tenant_id, &phone)
            .await?
            .ok_or_else(|| Error::NotFound("no member with this phone".into()))?;
        Self::usable(self.indexed(tenant_id, &id, "phone").await?)
    }

    /// Issues a virtual card (number generated) or a plastic card (number given).
    pub async fn issue_card(
        &self,
        tenant_id: &str,
        member_id: &str,
        kind: CardKind,
        number: &str,
    ) -> Result<Card> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.text(member_id, "member_id", MAX_ID_LEN);
        match kind {
            CardKind::Virtual => v.check(
                number.is_empty(),
                "number",
                "must be empty for a virtual card: it is generated",
            ),
            CardKind::Plastic => check_card_number(&mut v, number, "number"),
            CardKind::NoName => v.add(
                "kind",
                "no-name cards are imported in ranges, not issued to a member",
            ),
        }
        v.finish()?;
        self.active_member(tenant_id, member_id).await?;
        let mut card = Card {
            tenant_id: tenant_id.to_string(),
            number: if kind == CardKind::Virtual {
                new_virtual_card_number()
            } else {
                number.to_string()
            },
            kind,
            status: CardStatus::Active,
            member_id: Some(member_id.to_string()),
            issued_at: self.clock.now_ms(),
        };
        for _ in 0..GENERATION_ATTEMPTS {
            if self.store.insert_card(&card).await? {
                return Ok(card);
            }
            if kind != CardKind::Virtual {
                // A pre-printed card from an imported range is handed out by binding it.
                if let Some(existing) = self.store.card(tenant_id, &card.number).await?
                    && existing.status == CardStatus::Unbound
                    && existing.kind == CardKind::Plastic
                {
                    return self.bind_card(tenant_id, &card.number, member_id).await;
                }
                return Err(Error::AlreadyExists(format!(
                    "card {} already exists",
                    card.number
                )));
            }
            card.number = new_virtual_card_number();
        }
        Err(Error::internal(anyhow::anyhow!(
            "could not generate a unique card number"
        )))
    }

    pub async fn card(&self, tenant_id: &str, number: &str) -> Result<Card> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        check_card_number(&mut v, number, "number");
        v.finish()?;
        self.store
            .card(tenant_id, number)
            .await?
            .ok_or_else(|| Error::NotFound(format!("card {number} not found")))
    }

    /// Imports a range of pre-printed plastic or no-name card numbers, unbound. Numbers that
    /// exist already are skipped, so a retried or overlapping import creates each card once.
    /// Returns how many cards were created.
    pub async fn import_card_range(
        &self,
        tenant_id: &str,
        kind: CardKind,
        first: &str,
        last: &str,
    ) -> Result<u64> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.check(
            kind != CardKind::Virtual,
            "kind",
            "must be CARD_KIND_PLASTIC or CARD_KIND_NO_NAME: virtual numbers are generated",
        );
        check_card_number(&mut v, first, "first_number");
        check_card_number(&mut v, last, "last_number");
        v.finish()?;
        if first.len() != last.len() {
            return Err(Error::invalid(
                "last_number",
                "must have as many digits as first_number",
            ));
        }
        let (Ok(start), Ok(end)) = (first.parse::<u64>(), last.parse::<u64>()) else {
            return Err(Error::invalid("first_number", "must be 8 to 19 digits"));
        };
        if end < start {
            return Err(Error::invalid(
                "last_number",
                "must not be below first_number",
            ));
        }
        if end - start >= MAX_CARD_RANGE {
            return Err(Error::invalid(
                "last_number",
                format!("a range holds at most {MAX_CARD_RANGE} cards; import it in parts"),
            ));
        }
        let width = first.len();
        let now = self.clock.now_ms();
        let mut created = 0;
        let numbers: Vec<u64> = (start..=end).collect();
        for chunk in numbers.chunks(5_000) {
            let cards: Vec<Card> = chunk
                .iter()
                .map(|n| Card {
                    tenant_id: tenant_id.to_string(),
                    number: format!("{n:0width$}"),
                    kind,
                    status: CardStatus::Unbound,
                    member_id: None,
                    issued_at: now,
                })
                .collect();
            created += self.store.insert_cards(&cards).await?;
        }
        Ok(created)
    }

    /// Binds an unbound plastic or no-name card to a member (at the POS, when the card is
    /// handed out). Binding it again to the same member returns it unchanged.
    pub async fn bind_card(&self, tenant_id: &str, number: &str, member_id: &str) -> Result<Card> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        check_card_number(&mut v, number, "number");
        v.text(member_id, "member_id", MAX_ID_LEN);
        v.finish()?;
        self.active_member(tenant_id, member_id).await?;
        for _ in 0..CHANGE_ATTEMPTS {
            let card = self.card(tenant_id, number).await?;
            match &card.status {
                CardStatus::Unbound => {
                    let bound = Card {
                        status: CardStatus::Active,
                        member_id: Some(member_id.to_string()),
                        ..card.clone()
                    };
                    if self.store.update_card(&bound, &card.status).await? {
                        return Ok(bound);
                    }
                }
                CardStatus::Active if card.member_id.as_deref() == Some(member_id) => {
                    return Ok(card);
                }
                CardStatus::Active => {
                    return Err(Error::AlreadyExists(format!(
                        "card {number} is already bound to another member"
                    )));
                }
                CardStatus::Blocked(reason) => {
                    return Err(Error::FailedPrecondition(format!(
                        "card {number} is blocked ({}) and cannot be bound",
                        reason.as_str()
                    )));
                }
                CardStatus::Replaced { by } => {
                    return Err(Error::FailedPrecondition(format!(
                        "card {number} was replaced by card {by} and cannot be bound"
                    )));
                }
            }
        }
        Err(Error::Unavailable(format!(
            "card {number} kept changing; retry"
        )))
    }

    /// Blocks a card (lost, stolen, fraud): the POS refuses it from then on with the reason.
    /// Blocking a blocked card returns it unchanged.
    pub async fn block_card(
        &self,
        tenant_id: &str,
        number: &str,
        reason: Option<BlockReason>,
    ) -> Result<Card> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        check_card_number(&mut v, number, "number");
        v.check(
            reason.is_some(),
            "reason",
            "must be BLOCK_REASON_LOST, BLOCK_REASON_STOLEN or BLOCK_REASON_FRAUD",
        );
        v.finish()?;
        let reason = reason.ok_or_else(|| Error::invalid("reason", "is required"))?;
        for _ in 0..CHANGE_ATTEMPTS {
            let card = self.card(tenant_id, number).await?;
            match &card.status {
                CardStatus::Blocked(_) => return Ok(card),
                CardStatus::Replaced { by } => {
                    return Err(Error::FailedPrecondition(format!(
                        "card {number} was replaced by card {by}; it is no longer usable"
                    )));
                }
                CardStatus::Active | CardStatus::Unbound => {
                    let blocked = Card {
                        status: CardStatus::Blocked(reason),
                        ..card.clone()
                    };
                    if self.store.update_card(&blocked, &card.status).await? {
                        return Ok(blocked);
                    }
                }
            }
        }
        Err(Error::Unavailable(format!(
            "card {number} kept changing; retry"
        )))
    }

    /// Replaces a member's card (active or blocked) with a new one: an unbound pre-printed
    /// card given by number, a new plastic number, or, when `new_number` is empty, a virtual
    /// card. The member, and so the balance and history, stay the same; the old card is
    /// refused at the POS from then on. A retry returns the same pair.
    pub async fn replace_card(
        &self,
        tenant_id: &str,
        old_number: &str,
        new_number: &str,
    ) -> Result<(Card, Card)> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        check_card_number(&mut v, old_number, "old_number");
        if !new_number.is_empty() {
            check_card_number(&mut v, new_number, "new_number");
            v.check(
                new_number != old_number,
                "new_number",
                "must differ from old_number",
            );
        }
        v.finish()?;
        for _ in 0..CHANGE_ATTEMPTS {
            let old = self.card(tenant_id, old_number).await?;
            let member_id = match (&old.status, &old.member_id) {
                (CardStatus::Replaced { by }, _) => {
                    if new_number.is_empty() || new_number == by {
                        let new = self.card(tenant_id, by).await?;
                        return Ok((old, new));
                    }
                    return Err(Error::FailedPrecondition(format!(
                        "card {old_number} was already replaced by card {by}"
                    )));
                }
                (CardStatus::Active | CardStatus::Blocked(_), Some(member_id)) => member_id.clone(),
                _ => {
                    return Err(Error::FailedPrecondition(format!(
                        "card {old_number} is not bound to a member; nothing to replace"
                    )));
                }
            };
            self.active_member(tenant_id, &member_id).await?;
            let (new, new_expected) = if new_number.is_empty() {
                (
                    Card {
                        tenant_id: tenant_id.to_string(),
                        number: new_virtual_card_number(),
                        kind: CardKind::Virtual,
                        status: CardStatus::Active,
                        member_id: Some(member_id.clone()),
                        issued_at: self.clock.now_ms(),
                    },
                    None,
                )
            } else {
                match self.store.card(tenant_id, new_number).await? {
                    None => (
                        Card {
                            tenant_id: tenant_id.to_string(),
                            number: new_number.to_string(),
                            kind: CardKind::Plastic,
                            status: CardStatus::Active,
                            member_id: Some(member_id.clone()),
                            issued_at: self.clock.now_ms(),
                        },
                        None,
                    ),
                    Some(existing) if existing.status == CardStatus::Unbound => (
                        Card {
                            status: CardStatus::Active,
                            member_id: Some(member_id.clone()),
                            ..existing
                        },
                        Some(CardStatus::Unbound),
                    ),
                    Some(_) => {
                        return Err(Error::AlreadyExists(format!(
                            "card {new_number} is already in use"
                        )));
                    }
                }
            };
            let replaced = Card {
                status: CardStatus::Replaced {
                    by: new.number.clone(),
                },
                ..old.clone()
            };
            match self
                .store
                .replace_card(&replaced, &old.status, &new, new_expected.as_ref())
                .await?
            {
                Replaced::Done => return Ok((replaced, new)),
                // A generated number collided, or either card changed meanwhile: decide again.
                Replaced::OldChanged | Replaced::NewChanged => {}
            }
        }
        Err(Error::Unavailable(format!(
            "card {old_number} kept changing; retry"
        )))
    }

    /// The stored record of `member_id` (merged or not), NOT_FOUND when there is none.
    pub(crate) async fn stored(&self, tenant_id: &str, member_id: &str) -> Result<Member> {
        self.store
            .member(tenant_id, member_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("member {member_id} not found")))
    }

    /// A member whose profile and consents may change: active or blocked (a blocked member
    /// may still withdraw consent or correct data).
    async fn changeable_member(&self, tenant_id: &str, member_id: &str) -> Result<Member> {
        let member = self.stored(tenant_id, member_id).await?;
        if !matches!(member.status, MemberStatus::Active | MemberStatus::Blocked) {
            return Err(Error::FailedPrecondition(format!(
                "member {member_id} was merged or erased"
            )));
        }
        Ok(member)
    }

    pub(crate) async fn active_member(&self, tenant_id: &str, member_id: &str) -> Result<Member> {
        let member = self.stored(tenant_id, member_id).await?;
        if member.status != MemberStatus::Active {
            return Err(Error::FailedPrecondition(format!(
                "member {member_id} is not active"
            )));
        }
        Ok(member)
    }

    pub async fn resolve_referral_code(&self, tenant_id: &str, code: &str) -> Result<String> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.text(code, "referral_code", 32);
        v.finish()?;
        self.store
            .member_by_referral_code(tenant_id, &code.to_ascii_uppercase())
            .await?
            .ok_or_else(|| Error::NotFound(format!("referral code {code} not found")))
    }
}

fn email_taken() -> Error {
    Error::AlreadyExists("another member of this tenant has this email".into())
}

pub(crate) fn looks_like_email(s: &str) -> bool {
    match s.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && domain.contains('.')
                && !domain.starts_with('.')
                && !domain.ends_with('.')
                && !s.contains(char::is_whitespace)
        }
        None => false,
    }
}

/// Outcome of inserting a member: uniqueness is decided atomically by the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Inserted {
    Done,
    PhoneTaken,
    EmailTaken,
    CodeTaken,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phones_normalize_to_e164_from_several_countries() {
        assert_eq!(
            normalize_phone("8 701 123 45 67", "KZ").unwrap(),
            "+77011234567"
        );
        assert_eq!(
            normalize_phone("+7 (701) 123-45-67", "KZ").unwrap(),
            "+77011234567"
        );
        assert_eq!(
            normalize_phone("8 (912) 345-67-89", "RU").unwrap(),
            "+79123456789"
        );
        assert_eq!(normalize_phone("030 123456", "DE").unwrap(), "+4930123456");
        assert_eq!(
            normalize_phone("+1 650-253-0000", "KZ").unwrap(),
            "+16502530000"
        );
    }

    #[test]
    fn bad_phones_are_refused() {
        for bad in [
            "",
            "12",
            "hello",
            "+7 000",
            "8 701 123 45 67 89 00 11 22 33 44 55 66",
        ] {
            assert!(normalize_phone(bad, "KZ").is_err(), "{bad} accepted");
        }
        assert!(normalize_phone("87011234567", "XX").is_err());
    }

    #[test]
    fn check_digits() {
        assert_eq!(with_check_digit("7992739871"), "79927398713");
        assert!(check_digit_ok("79927398713"));
        assert!(!check_digit_ok("79927398714"));
        for _ in 0..100 {
            let n = new_virtual_card_number();
            assert_eq!(n.len(), 16);
            assert!(check_digit_ok(&n), "{n}");
        }
    }

    #[test]
    fn emails() {
        assert!(looks_like_email("a@b.kz"));
        assert!(!looks_like_email("a@b"));
        assert!(!looks_like_email("a b@c.kz"));
        assert!(!looks_like_email("@c.kz"));
    }
}
