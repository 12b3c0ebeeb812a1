//! Bonuses for actions outside purchases: registration, a filled questionnaire and a
//! referral. Member changes arrive at least once and in any order; each bonus is granted
//! at most once per campaign and member, by a claim on a counter and an idempotent ledger
//! key, so a redelivered or repeated change never pays twice.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use loyalty_platform::clock::{DAY_MS, Millis, SharedClock};
use loyalty_platform::error::{Error, Result};
use loyalty_platform::types::Channel;

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

    async fn campaigns(&self, tenant_id: &str) -> Result<Arc<Vec<Campaign>>> {
        let version = self
            .store
            .checkout_context(tenant_id, "", &[], &[])
            .await?
            .campaigns_version;
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
        if !facts.active {
            return Ok(Vec::new());
        }
        let campaigns = self.campaigns(&facts.tenant_id).await?;
        let program = self.store.program(&facts.tenant_id).await?;
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
                ActionKind::Questionnaire if facts.questionnaire_complete => {
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
            match self.store.claim(&facts.tenant_id, &claims).await? {
                // Claimed now, or claimed by an earlier delivery whose accrual may not have
                // happened: the ledger key makes the accrual below happen exactly once.
                None | Some(0) => {}
                Some(_) => {
                    tracing::info!(campaign = %c.campaign_id, "action bonus budget is spent");
                    continue;
                }
            }
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
                    (lifetime > 0).then(|| now + lifetime * DAY_MS),
                )
                .await;
            match accrued {
                // The key is the bonus: an entry under it (written by an earlier delivery,
                // with that delivery's dates) means it was granted.
                Ok(_) | Err(Error::AlreadyExists(_)) => {}
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
