//! The end of a member record: merging a duplicate into a survivor, and erasure on request.
//!
//! A merge is two steps in two services, each idempotent, so a failure between them is
//! completed by retrying the same call:
//! 1. identity, in one atomic write: the duplicate becomes `Merged` with a merge record,
//!    its cards move to the survivor, and its phone and email find the survivor. From then
//!    on every lookup (card, phone, email, member id) lands on the survivor.
//! 2. balance moves every point of the duplicate to the survivor and closes the duplicate's
//!    account (`MemberPoints::transfer`, keyed by the duplicate), then the merge record is
//!    marked as done.
//!
//! Identity goes first so that no new receipt reaches the duplicate once the points are
//! moved; a receipt resolved just before the merge that reaches balance afterwards is
//! refused there (the account is closed), never lost in a closed account.

use loyalty_platform::clock::Millis;
use loyalty_platform::error::{Error, MAX_ID_LEN, Result, Violations};
use loyalty_platform::types::check_tenant;
use serde::{Deserialize, Serialize};

use crate::domain::{Identity, Member, MemberStatus, Profile};

/// Most merge hops followed when a merged id is resolved (A into B, B into C, ...).
const MAX_MERGE_HOPS: usize = 16;
/// The longest actor id and comment kept in an audit record.
const MAX_ACTOR_LEN: usize = 128;
const MAX_COMMENT_LEN: usize = 1_000;

/// Who did something and why: the audit of a merge or an erasure.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Audit {
    /// The person or system the caller names (e.g. "manager:anna").
    pub actor: String,
    pub comment: String,
    /// The API key the call was authenticated with (empty with authentication off).
    pub key_id: String,
    pub at: Millis,
}

/// Where a merged member went.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MergeRecord {
    pub into: String,
    pub audit: Audit,
    /// Set once balance has moved the duplicate's points to the survivor.
    pub points_moved: bool,
}

/// That a member's personal data was erased, by whom and when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Erasure {
    pub audit: Audit,
}

/// Why a member is blocked, and who blocked it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberBlock {
    pub reason: String,
    pub audit: Audit,
}

/// One row of a member import, once its member exists: a resumed import skips it, and
/// finishes its opening balance if that had not gone through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImportRow {
    pub tenant_id: String,
    pub import_id: String,
    pub row_number: i64,
    pub member_id: String,
    pub opening_balance: i64,
    pub balance_done: bool,
    /// A digest of the row as it was sent ([`crate::import::RowInput::fingerprint`]): the
    /// same row number sent again with other data is an error, not a silent skip. Empty in
    /// rows recorded before it was kept.
    #[serde(deserialize_with = "loyalty_platform::embedded::added_last")]
    pub fingerprint: Vec<u8>,
}

/// How identity reaches the points ledger: in process or over gRPC (the wiring decides).
#[async_trait::async_trait]
pub trait MemberPoints: Send + Sync + std::fmt::Debug {
    /// Moves every point of `from` to `to` and closes `from`'s account; idempotent by
    /// `key`. Returns the amount moved.
    async fn transfer(&self, tenant_id: &str, from: &str, to: &str, key: &str) -> Result<i64>;
    /// Credits points carried over from a previous system, active at once, never expiring;
    /// idempotent by `key` (per member).
    async fn opening_balance(
        &self,
        tenant_id: &str,
        member_id: &str,
        amount: i64,
        key: &str,
    ) -> Result<()>;
}

/// No balance service within reach: merges and opening balances are refused.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoPoints;

#[async_trait::async_trait]
impl MemberPoints for NoPoints {
    async fn transfer(&self, _: &str, _: &str, _: &str, _: &str) -> Result<i64> {
        Err(unreachable_balance())
    }
    async fn opening_balance(&self, _: &str, _: &str, _: i64, _: &str) -> Result<()> {
        Err(unreachable_balance())
    }
}

fn unreachable_balance() -> Error {
    Error::FailedPrecondition(
        "the balance service is not reachable from identity: run them in one process or set `peers.balance`".into(),
    )
}

/// Checks an actor given with an admin action.
pub fn check_actor(v: &mut Violations, actor: &str, comment: &str) {
    v.text(actor, "actor.id", MAX_ACTOR_LEN);
    v.optional_text(comment, "actor.comment", MAX_COMMENT_LEN);
}

impl Identity {
    /// The member `member_id` is now: itself, or the survivor it was merged into.
    pub(crate) async fn current(&self, tenant_id: &str, member_id: &str) -> Result<Member> {
        let mut id = member_id.to_string();
        for _ in 0..MAX_MERGE_HOPS {
            // NOT_FOUND names the id asked for, not a survivor on the way.
            let member = self
                .store
                .member(tenant_id, &id)
                .await?
                .ok_or_else(|| Error::NotFound(format!("member {member_id} not found")))?;
            if member.status != MemberStatus::Merged {
                return Ok(member);
            }
            let record = self
                .store
                .merge_record(tenant_id, &id)
                .await?
                .ok_or_else(|| {
                    Error::internal(anyhow::anyhow!("merged member {id} has no merge record"))
                })?;
            id = record.into;
        }
        Err(Error::internal(anyhow::anyhow!(
            "member {member_id} is merged more than {MAX_MERGE_HOPS} times over"
        )))
    }

    /// Merges `duplicate` into `survivor`: cards, points and lookups move to the survivor,
    /// and the duplicate's id resolves to it from then on. A retry (also after a failure
    /// half way) completes the same merge and answers the same.
    pub async fn merge(
        &self,
        tenant_id: &str,
        survivor: &str,
        duplicate: &str,
        audit: Audit,
    ) -> Result<Member> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.text(survivor, "survivor_member_id", MAX_ID_LEN);
        v.text(duplicate, "duplicate_member_id", MAX_ID_LEN);
        v.check(
            survivor != duplicate,
            "duplicate_member_id",
            "must differ from survivor_member_id",
        );
        check_actor(&mut v, &audit.actor, &audit.comment);
        v.finish()?;
        for _ in 0..crate::domain::CHANGE_ATTEMPTS {
            let dup = self.stored(tenant_id, duplicate).await?;
            match dup.status {
                MemberStatus::Merged => {
                    let record = self
                        .store
                        .merge_record(tenant_id, duplicate)
                        .await?
                        .ok_or_else(|| {
                            Error::internal(anyhow::anyhow!("merged member has no merge record"))
                        })?;
                    if record.into != survivor {
                        return Err(Error::FailedPrecondition(format!(
                            "member {duplicate} was already merged into {}",
                            record.into
                        )));
                    }
                    return self.finish_merge(tenant_id, duplicate, record).await;
                }
                MemberStatus::Erased => {
                    return Err(Error::FailedPrecondition(format!(
                        "member {duplicate} was erased"
                    )));
                }
                MemberStatus::Blocked => {
                    return Err(Error::FailedPrecondition(format!(
                        "member {duplicate} is blocked; unblock it before merging"
                    )));
                }
                MemberStatus::Active => {}
            }
            let kept = self.active_member(tenant_id, survivor).await?;
            self.merges_into_finished(tenant_id, duplicate).await?;
            let before = self.profile(tenant_id, duplicate).await?;
            let mut merged = dup.clone();
            merged.status = MemberStatus::Merged;
            merged.updated_at = self.clock.now_ms();
            let record = MergeRecord {
                into: kept.member_id.clone(),
                audit: Audit {
                    at: self.clock.now_ms(),
                    ..audit.clone()
                },
                points_moved: false,
            };
            // The profile's version moves on, so the snapshot saying "no longer active"
            // supersedes every earlier one at the consumers.
            let mut profile = before.clone();
            profile.version = before.version + 1;
            if !self
                .store
                .merge_members(&merged, &profile, before.version, &record)
                .await?
            {
                continue;
            }
            tracing::info!(
                tenant_id,
                survivor = %record.into,
                duplicate,
                actor = %record.audit.actor,
                key_id = %record.audit.key_id,
                "members merged"
            );
            return self.finish_merge(tenant_id, duplicate, record).await;
        }
        Err(Error::Unavailable(format!(
            "member {duplicate} kept changing; retry"
        )))
    }

    /// Refuses to merge `member` away while a member merged into it (at any depth) has not
    /// had its points moved: their transfer is keyed to the account they were sent to, and
    /// a closed one could not take them. The store checks it again in the merge's write.
    async fn merges_into_finished(&self, tenant_id: &str, member: &str) -> Result<()> {
        for from in self.store.merged_from(tenant_id, member).await? {
            if let Some(r) = self.store.merge_record(tenant_id, &from).await?
                && !r.points_moved
            {
                return Err(Error::FailedPrecondition(format!(
                    "member {from} was merged into {} and its points have not moved yet: retry that merge (survivor {}, duplicate {from}) first",
                    r.into, r.into
                )));
            }
        }
        Ok(())
    }

    /// The second half of a merge: points and events. Idempotent.
    async fn finish_merge(
        &self,
        tenant_id: &str,
        duplicate: &str,
        mut record: MergeRecord,
    ) -> Result<Member> {
        if !record.points_moved {
            // To whoever the survivor is now: it may have been merged on since.
            let to = self.current(tenant_id, &record.into).await?.member_id;
            let key = format!("merge:{duplicate}");
            let moved = self
                .points
                .transfer(tenant_id, duplicate, &to, &key)
                .await?;
            tracing::info!(tenant_id, duplicate, into = %record.into, moved, "merged member's points moved");
            record.points_moved = true;
            self.store
                .save_merge_record(tenant_id, duplicate, &record)
                .await?;
        }
        // Both snapshots again on every retry: consumers keep the newest version only. The
        // event names the survivor as it is now, so history merged on since follows.
        let survivor = self.current(tenant_id, &record.into).await?;
        if let Some(dup) = self.store.member(tenant_id, duplicate).await? {
            let profile = self.profile(tenant_id, duplicate).await?;
            self.publish_merged(&dup, &profile, &survivor.member_id)
                .await?;
        }
        let profile = self.profile(tenant_id, &survivor.member_id).await?;
        self.publish(&survivor, &profile).await?;
        Ok(survivor)
    }

    /// Erases a member's personal data: phone, email, names, birthday, gender, attributes,
    /// consents and referral code are removed for good; the id, the registration's store,
    /// channel and time stay, so anonymous purchase facts still count in reports. The phone
    /// and email are free for a new registration at once. Erasing an erased member answers
    /// it unchanged.
    pub async fn erase(&self, tenant_id: &str, member_id: &str, audit: Audit) -> Result<Member> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.text(member_id, "member_id", MAX_ID_LEN);
        check_actor(&mut v, &audit.actor, &audit.comment);
        v.finish()?;
        for _ in 0..crate::domain::CHANGE_ATTEMPTS {
            let stored = self.stored(tenant_id, member_id).await?;
            match stored.status {
                MemberStatus::Erased => {
                    // A retry: what the first attempt may not have told the consumers.
                    self.publish_erased(tenant_id, &stored).await?;
                    return Ok(stored);
                }
                MemberStatus::Merged => {
                    return Err(Error::FailedPrecondition(format!(
                        "member {member_id} was merged into another member; erase that one"
                    )));
                }
                MemberStatus::Active | MemberStatus::Blocked => {}
            }
            let before = self.profile(tenant_id, member_id).await?;
            let now = self.clock.now_ms();
            let erased = Member {
                status: MemberStatus::Erased,
                phone: String::new(),
                email: String::new(),
                first_name: String::new(),
                last_name: String::new(),
                referral_code: String::new(),
                updated_at: now,
                ..stored.clone()
            };
            let profile = Profile {
                version: before.version + 1,
                ..Profile::default()
            };
            let erasure = Erasure {
                audit: Audit {
                    at: now,
                    ..audit.clone()
                },
            };
            if self
                .store
                .erase_member(&erased, &profile, before.version, &erasure)
                .await?
            {
                // The audit line names ids only: the data it erased is gone.
                tracing::info!(
                    tenant_id,
                    member_id,
                    actor = %erasure.audit.actor,
                    key_id = %erasure.audit.key_id,
                    "member erased"
                );
                self.publish_erased(tenant_id, &erased).await?;
                return Ok(erased);
            }
        }
        Err(Error::Unavailable(format!(
            "member {member_id} kept changing; retry"
        )))
    }

    /// Tells the consumers of an erased member and of every member merged into it: their
    /// snapshots now carry no birthday or consents.
    async fn publish_erased(&self, tenant_id: &str, erased: &Member) -> Result<()> {
        let profile = self.profile(tenant_id, &erased.member_id).await?;
        self.publish_erasure(erased, &profile).await?;
        for id in self.store.merged_from(tenant_id, &erased.member_id).await? {
            if let Some(m) = self.store.member(tenant_id, &id).await? {
                let profile = self.profile(tenant_id, &id).await?;
                self.publish_erasure(&m, &profile).await?;
            }
        }
        Ok(())
    }

    /// The survivor a merged member went into (empty if it was not merged).
    pub async fn merged_into(&self, tenant_id: &str, member_id: &str) -> Result<String> {
        Ok(self
            .store
            .merge_record(tenant_id, member_id)
            .await?
            .map(|r| r.into)
            .unwrap_or_default())
    }

    /// Blocks a member (fraud, abuse): lookups, checkout and balance's direct accruals,
    /// redemptions and holds refuse it with the reason until it is unblocked; the back
    /// office can still adjust its points or erase it. Blocking a blocked member answers it
    /// unchanged.
    pub async fn block(
        &self,
        tenant_id: &str,
        member_id: &str,
        reason: &str,
        audit: Audit,
    ) -> Result<Member> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.text(member_id, "member_id", MAX_ID_LEN);
        v.text(reason, "reason", MAX_COMMENT_LEN);
        check_actor(&mut v, &audit.actor, &audit.comment);
        v.finish()?;
        let block = MemberBlock {
            reason: reason.to_string(),
            audit: Audit {
                at: self.clock.now_ms(),
                ..audit
            },
        };
        self.set_status(tenant_id, member_id, MemberStatus::Blocked, Some(&block))
            .await
    }

    /// Lifts a block. Unblocking an active member answers it unchanged.
    pub async fn unblock(&self, tenant_id: &str, member_id: &str, audit: Audit) -> Result<Member> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.text(member_id, "member_id", MAX_ID_LEN);
        check_actor(&mut v, &audit.actor, &audit.comment);
        v.finish()?;
        tracing::info!(tenant_id, member_id, actor = %audit.actor, key_id = %audit.key_id, "member unblock asked");
        self.set_status(tenant_id, member_id, MemberStatus::Active, None)
            .await
    }

    async fn set_status(
        &self,
        tenant_id: &str,
        member_id: &str,
        to: MemberStatus,
        block: Option<&MemberBlock>,
    ) -> Result<Member> {
        for _ in 0..crate::domain::CHANGE_ATTEMPTS {
            let stored = self.stored(tenant_id, member_id).await?;
            match stored.status {
                s if s == to => {
                    // A retry: tell the consumers again in case the first attempt did not.
                    let profile = self.profile(tenant_id, member_id).await?;
                    self.publish(&stored, &profile).await?;
                    return Ok(stored);
                }
                MemberStatus::Merged | MemberStatus::Erased => {
                    return Err(Error::FailedPrecondition(format!(
                        "member {member_id} was merged or erased"
                    )));
                }
                MemberStatus::Active | MemberStatus::Blocked => {}
            }
            let before = self.profile(tenant_id, member_id).await?;
            let member = Member {
                status: to,
                updated_at: self.clock.now_ms(),
                ..stored
            };
            let profile = Profile {
                version: before.version + 1,
                ..before.clone()
            };
            if self
                .store
                .set_block(&member, &profile, before.version, block)
                .await?
            {
                match block {
                    Some(b) => {
                        tracing::info!(tenant_id, member_id, reason = %b.reason, actor = %b.audit.actor, key_id = %b.audit.key_id, "member blocked")
                    }
                    None => tracing::info!(tenant_id, member_id, "member unblocked"),
                }
                self.publish(&member, &profile).await?;
                return Ok(member);
            }
        }
        Err(Error::Unavailable(format!(
            "member {member_id} kept changing; retry"
        )))
    }

    /// Why a member is blocked (None when it is not).
    pub async fn member_block(
        &self,
        tenant_id: &str,
        member_id: &str,
    ) -> Result<Option<MemberBlock>> {
        self.store.member_block(tenant_id, member_id).await
    }

    /// Who erased a member, and when.
    pub async fn erasure(&self, tenant_id: &str, member_id: &str) -> Result<Option<Erasure>> {
        self.store.erasure(tenant_id, member_id).await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use loyalty_platform::clock::SystemClock;

    use super::*;
    use crate::domain::{Identity, Registration};
    use crate::store::embedded::EmbeddedIdentityStore;

    #[test]
    fn import_rows_recorded_before_fingerprints_read_without_one() {
        use loyalty_platform::embedded::{decode, encode};
        let row = ImportRow {
            tenant_id: "t".into(),
            import_id: "old-crm".into(),
            row_number: 3,
            member_id: "m".into(),
            opening_balance: 10,
            balance_done: true,
            fingerprint: Vec::new(),
        };
        let mut old = encode(&row).unwrap();
        assert_eq!(old.pop(), Some(0), "the empty fingerprint's length, last");
        assert_eq!(decode::<ImportRow>(&old).unwrap(), row);
        let with = ImportRow {
            fingerprint: vec![1, 2, 3],
            ..row
        };
        assert_eq!(decode::<ImportRow>(&encode(&with).unwrap()).unwrap(), with);
    }

    #[test]
    fn a_rows_fingerprint_follows_everything_it_says() {
        use crate::import::RowInput;
        let row = RowInput {
            row_number: 1,
            phone: "+77017300001".into(),
            email: "a@b.kz".into(),
            first_name: "A".into(),
            last_name: "B".into(),
            birthday: Some((1990, 1, 2)),
            card_numbers: vec!["1".into(), "2".into()],
            opening_balance: 5,
        };
        let same = RowInput {
            row_number: 9,
            ..row.clone()
        };
        assert_eq!(
            row.fingerprint(),
            same.fingerprint(),
            "the number is not data"
        );
        let changes: Vec<fn(&mut RowInput)> = vec![
            |r| r.phone.push('0'),
            |r| r.email.clear(),
            |r| r.first_name = "AB".into(),
            // The same text split differently between fields.
            |r| {
                r.first_name = "AB".into();
                r.last_name = String::new();
            },
            |r| r.birthday = None,
            |r| {
                r.card_numbers.pop();
            },
            |r| r.opening_balance = 6,
        ];
        for change in changes {
            let mut other = row.clone();
            change(&mut other);
            assert_ne!(row.fingerprint(), other.fingerprint(), "{other:?}");
        }
    }

    #[tokio::test]
    async fn a_member_with_an_unfinished_merge_into_it_is_not_merged_away() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedIdentityStore::open(&dir.path().join("i.redb")).unwrap());
        // No balance within reach: a merge commits its identity half and then fails.
        let identity = Identity::new(store, Arc::new(SystemClock), "KZ".into());
        let mut ids = Vec::new();
        for phone in ["+77010003001", "+77010003002", "+77010003003"] {
            let m = identity
                .register(Registration {
                    tenant_id: "t".into(),
                    phone: phone.into(),
                    ..Registration::default()
                })
                .await
                .unwrap();
            ids.push(m.member_id);
        }
        let (a, b, c) = (&ids[0], &ids[1], &ids[2]);
        let audit = || Audit {
            actor: "manager:anna".into(),
            ..Audit::default()
        };
        assert!(identity.merge("t", b, a, audit()).await.is_err());
        let record = identity
            .store()
            .merge_record("t", a)
            .await
            .unwrap()
            .unwrap();
        assert!(
            !record.points_moved,
            "merged in identity, its points not moved"
        );

        let err = identity.merge("t", c, b, audit()).await.unwrap_err();
        assert!(
            matches!(&err, Error::FailedPrecondition(m) if m.contains(a.as_str())),
            "{err:?}"
        );
        assert_eq!(
            identity
                .store()
                .member("t", b)
                .await
                .unwrap()
                .unwrap()
                .status,
            MemberStatus::Active,
            "nothing written"
        );

        // Consents: one entry per channel, every entry checked.
        use crate::domain::ConsentChannel as C;
        let mut five: Vec<_> = [C::Sms, C::Email, C::Push, C::Messenger]
            .into_iter()
            .map(|c| (Some(c), true, "pos".to_string()))
            .collect();
        five.push((Some(C::Sms), false, "x".repeat(10_000)));
        let err = identity.set_consents("t", c, &five).await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        let profile = identity.profile("t", c).await.unwrap();
        assert!(profile.consents.is_empty(), "nothing written");
    }
}
