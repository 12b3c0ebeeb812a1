//! Bonuses for actions outside purchases: registration, a filled questionnaire and a
//! referral. Member changes arrive at least once and in any order; each bonus is granted
//! at most once per campaign and member, by a claim on a counter and an idempotent ledger
//! key, so a redelivered or repeated change never pays twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use loyalty_platform::clock::{DAY_MS, Millis, SharedClock};
use loyalty_platform::error::{Error, Result};
use loyalty_platform::types::Channel;

use crate::calendar::end_of_local_day;
use crate::campaign::{ActionKind, Campaign, CampaignStatus, Mechanic};
use crate::ports::Points;
use crate::store::PromotionStore;
use crate::usage::{Claim, action_counter, points_counter};

/// What a member change says, as far as action bonuses care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberFacts {
    pub tenant_id: String,
    pub member_id: String,
    pub active: bool,
    pub registered_at: Millis,
    pub store_id: String,
    pub channel: Channel,
    pub questionnaire_complete: bool,
    /// The member whose referral code this one used (empty: none).
    pub referred_by: String,
    /// When the change happened.
    pub at: Millis,
    /// The survivor this member was merged into (empty: not merged).
    pub merged_into: String,
}

/// One bonus granted (or found granted before).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Granted {
    pub campaign_id: String,
    /// Who receives the points (the referrer, for a referral).
    pub member_id: String,
    pub points: i64,
}

/// A tenant's action campaigns at a campaigns version.
type Versioned = (u64, Arc<Vec<Campaign>>);

#[derive(Debug, Clone)]
pub struct ActionBonuses {
    store: Arc<dyn PromotionStore>,
    points: Arc<dyn Points>,
    clock: SharedClock,
    /// Action campaigns per tenant at a campaigns version.
    cache: Arc<Mutex<HashMap<String, Versioned>>>,
}

/// The ledger key of an action bonus: once per campaign and member whose action it was.
pub fn action_key(campaign_id: &str, subject: &str) -> String {
    format!("action:{campaign_id}:{subject}")
}

impl ActionBonuses {
    pub fn new(
        store: Arc<dyn PromotionStore>,
        points: Arc<dyn Points>,
        clock: SharedClock,
    ) -> Self {
        Self {
            store,
            points,
            clock,
            cache: Arc::default(),
        }
    }

    /// The tenant's action campaigns at `version` (from the caller's snapshot read).
    async fn campaigns(&self, tenant_id: &str, version: u64) -> Result<Arc<Vec<Campaign>>> {
        if let Ok(cache) = self.cache.lock()
            && let Some((v, list)) = cache.get(tenant_id)
            && *v == version
        {
            return Ok(list.clone());
        }
        let (stored, all, _) = self.store.campaigns(tenant_id).await?;
        let list: Arc<Vec<Campaign>> = Arc::new(
            all.into_iter()
                .filter(|c| matches!(c.mechanic, Mechanic::ActionBonus { .. }))
                .collect(),
        );
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(tenant_id.to_string(), (stored, list.clone()));
        }
        Ok(list)
    }

    /// Grants every action bonus the change earns. Safe to call any number of times.
    pub async fn apply(&self, facts: &MemberFacts) -> Result<Vec<Granted>> {
        if !facts.merged_into.is_empty() {
            // A merged member's purchase history is the survivor's from now on.
            let moved = self
                .store
                .move_member_purchases(&facts.tenant_id, &facts.member_id, &facts.merged_into)
                .await?;
            tracing::info!(tenant_id = %facts.tenant_id, member_id = %facts.member_id, into = %facts.merged_into, moved, "merged member's purchase history moved");
        }
        if !facts.active {
            return Ok(Vec::new());
        }
        // One snapshot read gives the program, the campaigns version and the time zone of
        // the member's store (bonus points expire at the end of its local day).
        let ctx = self
            .store
            .checkout_context(&facts.tenant_id, &facts.store_id, &[], &[])
            .await?;
        let time_zone = ctx.store.map(|s| s.time_zone).unwrap_or_default();
        let program = ctx.program;
        let campaigns = self
            .campaigns(&facts.tenant_id, ctx.campaigns_version)
            .await?;
        let mut granted = Vec::new();
        for c in campaigns
            .iter()
            .filter(|c| c.status == CampaignStatus::Active)
        {
            let Mechanic::ActionBonus {
                action,
                points,
                lifetime_days,
            } = c.mechanic
            else {
                continue;
            };
            // When the action happened, and who gets the points.
            let (when, receiver) = match action {
                ActionKind::Registration => (facts.registered_at, facts.member_id.as_str()),
                // A snapshot says the questionnaire is complete, not when it became so: only
                // members who registered while the campaign existed can have completed it
                // during the campaign, so only they qualify.
                ActionKind::Questionnaire
                    if facts.questionnaire_complete && facts.registered_at >= c.created_at =>
                {
                    (facts.at, facts.member_id.as_str())
                }
                ActionKind::Referral if !facts.referred_by.is_empty() => {
                    (facts.registered_at, facts.referred_by.as_str())
                }
                _ => continue,
            };
            if !eligible(c, facts, when) {
                continue;
            }
            let mut claims = vec![Claim {
                counter: action_counter(&c.campaign_id, &facts.member_id),
                amount: 1,
                limit: 1,
            }];
            if c.budget.max_points > 0 {
                claims.push(Claim {
                    counter: points_counter(&c.campaign_id),
                    amount: points,
                    limit: c.budget.max_points,
                });
            }
            let claimed_now = match self.store.claim(&facts.tenant_id, &claims).await? {
                None => true,
                // Claimed by an earlier delivery whose accrual may not have happened: the
                // ledger key makes the accrual below happen exactly once.
                Some(0) => false,
                Some(_) => {
                    tracing::info!(campaign = %c.campaign_id, "action bonus budget is spent");
                    continue;
                }
            };
            let now = self.clock.now_ms();
            let lifetime = if lifetime_days > 0 {
                i64::from(lifetime_days)
            } else {
                program
                    .as_ref()
                    .map_or(0, |p| i64::from(p.point_lifetime_days))
            };
            let accrued = self
                .points
                .accrue(
                    &facts.tenant_id,
                    receiver,
                    &action_key(&c.campaign_id, &facts.member_id),
                    points,
                    &format!("campaign:{}", c.campaign_id),
                    now,
                    (lifetime > 0).then(|| end_of_local_day(now + lifetime * DAY_MS, &time_zone)),
                )
                .await;
            match accrued {
                // The key is the bonus: an entry under it (written by an earlier delivery,
                // with that delivery's dates) means it was granted.
                Ok(_) | Err(Error::AlreadyExists(_)) => {}
                // The ledger refuses this member for good (merged, at its lot limit, gone):
                // the bonus is not paid, what was claimed for it goes back, and the stream
                // moves on rather than retrying forever.
                Err(
                    e @ (Error::FailedPrecondition(_)
                    | Error::InvalidArgument(_)
                    | Error::NotFound(_)),
                ) => {
                    tracing::warn!(campaign = %c.campaign_id, error = %e, "action bonus refused by the ledger");
                    if claimed_now {
                        let back: Vec<Claim> =
                            claims.iter().map(|k| k.give_back(k.amount)).collect();
                        self.store.claim(&facts.tenant_id, &back).await?;
                    }
                    continue;
                }
                Err(e) => return Err(e),
            }
            granted.push(Granted {
                campaign_id: c.campaign_id.clone(),
                member_id: receiver.to_string(),
                points,
            });
        }
        Ok(granted)
    }
}

/// Whether the action falls within the campaign: after it was created, inside its window,
/// at its stores and through its channels (of the registration).
fn eligible(c: &Campaign, facts: &MemberFacts, when: Millis) -> bool {
    let t = &c.targeting;
    when >= c.created_at
        && t.start.is_none_or(|s| when >= s)
        && t.end.is_none_or(|e| when < e)
        && (t.store_ids.is_empty() || t.store_ids.contains(&facts.store_id))
        && (t.channels.is_empty() || t.channels.contains(&facts.channel))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::sync::Mutex as StdMutex;

    use loyalty_platform::clock::ManualClock;

    use super::*;
    use crate::campaign::{Budget, Targeting};
    use crate::ports::{Redeemed, Reversal};
    use crate::store::embedded::EmbeddedPromotionStore;

    /// A ledger that refuses for good until told otherwise, and counts what it accrued.
    #[derive(Debug, Default)]
    struct Ledger {
        refuse: StdMutex<bool>,
        accrued: StdMutex<Vec<(String, String, i64)>>,
    }

    #[async_trait::async_trait]
    impl Points for Ledger {
        async fn available(&self, _: &str, _: &str) -> Result<i64> {
            Ok(0)
        }
        async fn accrue(
            &self,
            _: &str,
            member: &str,
            key: &str,
            amount: i64,
            _: &str,
            _: Millis,
            _: Option<Millis>,
        ) -> Result<i64> {
            if *self.refuse.lock().unwrap() {
                return Err(Error::FailedPrecondition("member was merged".into()));
            }
            let mut a = self.accrued.lock().unwrap();
            if !a.iter().any(|(_, k, _)| k == key) {
                a.push((member.into(), key.into(), amount));
            }
            Ok(amount)
        }
        async fn redeem(&self, _: &str, _: &str, _: &str, _: i64, _: &str) -> Result<Redeemed> {
            unreachable!()
        }
        async fn hold(&self, _: &str, _: &str) -> Result<crate::ports::Held> {
            unreachable!()
        }
        async fn confirm_hold(&self, _: &str, _: &str, _: &str, _: i64) -> Result<Redeemed> {
            unreachable!()
        }
        async fn cancel_hold(&self, _: &str, _: &str, _: &str) -> Result<()> {
            unreachable!()
        }
        async fn reverse(
            &self,
            _: &str,
            _: &str,
            _: &str,
            _: &str,
            _: i64,
            _: &str,
        ) -> Result<Reversal> {
            unreachable!()
        }
        async fn ping(&self) -> Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_refused_grant_gives_its_claims_back_and_a_repeat_pays_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedPromotionStore::open(&dir.path().join("p.redb")).unwrap());
        let welcome = Campaign {
            tenant_id: "t".into(),
            campaign_id: "welcome".into(),
            name: String::new(),
            status: CampaignStatus::Active,
            stacking_group_id: String::new(),
            priority: 0,
            targeting: Targeting::default(),
            mechanic: Mechanic::ActionBonus {
                action: ActionKind::Registration,
                points: 300,
                lifetime_days: 30,
            },
            code: None,
            budget: Budget {
                max_points: 1_000,
                ..Budget::default()
            },
            member_limit: 0,
            member_limit_period_days: 0,
            control_group_percent: 0,
            version: 0,
            created_at: 0,
            updated_at: 0,
            updated_by: String::new(),
        };
        store.save_campaign(welcome, None).await.unwrap();
        let ledger = Arc::new(Ledger::default());
        *ledger.refuse.lock().unwrap() = true;
        let clock: SharedClock = Arc::new(ManualClock::at(1_000));
        let bonuses = ActionBonuses::new(store.clone(), ledger.clone(), clock);
        let facts = MemberFacts {
            tenant_id: "t".into(),
            member_id: "m1".into(),
            active: true,
            registered_at: 500,
            store_id: String::new(),
            channel: Channel::Store,
            questionnaire_complete: false,
            referred_by: String::new(),
            at: 500,
            merged_into: String::new(),
        };
        assert!(
            bonuses.apply(&facts).await.unwrap().is_empty(),
            "refused, not an error"
        );
        let names = [
            "action/welcome/m1".to_string(),
            "points/welcome".to_string(),
        ];
        assert_eq!(
            store.counters("t", &names).await.unwrap(),
            [0, 0],
            "claims given back"
        );
        *ledger.refuse.lock().unwrap() = false;
        for _ in 0..3 {
            bonuses.apply(&facts).await.unwrap();
        }
        assert_eq!(ledger.accrued.lock().unwrap().len(), 1);
        assert_eq!(store.counters("t", &names).await.unwrap(), [1, 300]);
    }
}
