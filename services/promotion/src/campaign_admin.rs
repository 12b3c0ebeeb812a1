//! Managing campaigns: create, update (versioned, with who changed it), archive, stacking
//! groups, coupon batches, JSON export and import, and a member's tier.

use std::collections::BTreeMap;

use loyalty_platform::clock::Millis;
use loyalty_platform::error::{Error, MAX_ID_LEN, Result, Violations};
use loyalty_platform::types::{check_tenant, tenant};
use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::admin::{Admin, page};
use crate::calendar::LocalTime;
use crate::campaign::{
    Campaign, CampaignStatus, CodeRequirement, Coupon, MAX_CAMPAIGNS, MAX_COUPON_BATCH,
    StackingGroup, normalize_code,
};
use crate::tier::{self, TierStatus};

/// Characters of generated coupon codes: no 0/O, 1/I/L, so a cashier cannot misread them.
const CODE_ALPHABET: &[u8] = b"23456789ABCDEFGHJKMNPQRSTUVWXYZ";
const CODE_LEN: usize = 12;
/// Largest JSON document ImportCampaigns accepts.
pub const MAX_IMPORT_BYTES: usize = 8 * 1024 * 1024;

/// The export and import document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CampaignDocument {
    pub tenant_id: String,
    pub groups: Vec<StackingGroup>,
    pub campaigns: Vec<Campaign>,
}

fn new_code(rng: &mut impl Rng) -> String {
    (0..CODE_LEN)
        .map(|_| CODE_ALPHABET[rng.random_range(0..CODE_ALPHABET.len())] as char)
        .collect()
}

impl Admin {
    /// Checks a campaign against the tenant as it stands.
    async fn check_campaign(&self, c: &Campaign) -> Result<()> {
        let (_, campaigns, groups) = self.store.campaigns(&c.tenant_id).await?;
        self.check_against(c, &campaigns, &groups).await
    }

    /// Checks what a campaign refers to: its group, segments and tiers exist; its promo
    /// code is not another campaign's (in `campaigns`) or a coupon.
    async fn check_against(
        &self,
        c: &Campaign,
        campaigns: &[Campaign],
        groups: &[StackingGroup],
    ) -> Result<()> {
        let known_segments = if c.targeting.segment_ids.is_empty() {
            Vec::new()
        } else {
            self.segments
                .exist(&c.tenant_id, &c.targeting.segment_ids)
                .await?
        };
        let tiers: Vec<String> = self
            .store
            .program(&c.tenant_id)
            .await?
            .map(|p| p.tiers.into_iter().map(|t| t.tier_id).collect())
            .unwrap_or_default();
        c.validate(&known_segments, &tiers)?;
        let mut v = Violations::new();
        if !c.stacking_group_id.is_empty() {
            v.check(
                groups.iter().any(|g| g.group_id == c.stacking_group_id),
                "campaign.stacking_group_id",
                format!(
                    "unknown stacking group {:?}: create it with UpsertStackingGroup",
                    c.stacking_group_id
                ),
            );
        }
        if let Some(CodeRequirement::PromoCode(code)) = &c.code {
            let code = normalize_code(code);
            let taken = campaigns.iter().find(|other| {
                other.campaign_id != c.campaign_id
                    && other.status != CampaignStatus::Archived
                    && matches!(&other.code, Some(CodeRequirement::PromoCode(x)) if normalize_code(x) == code)
            });
            if let Some(other) = taken {
                v.add(
                    "campaign.code.promo_code",
                    format!(
                        "promo code {code:?} is already used by campaign {}",
                        other.campaign_id
                    ),
                );
            }
            if self.store.coupon(&c.tenant_id, &code).await?.is_some() {
                v.add(
                    "campaign.code.promo_code",
                    format!("{code:?} is already a coupon code"),
                );
            }
        }
        if !campaigns.iter().any(|x| x.campaign_id == c.campaign_id) {
            v.check(
                campaigns.len() < MAX_CAMPAIGNS,
                "campaign",
                format!("a tenant keeps at most {MAX_CAMPAIGNS} campaigns"),
            );
        }
        v.finish()
    }

    pub async fn create_campaign(&self, mut c: Campaign, actor: &str) -> Result<Campaign> {
        self.check_campaign(&c).await?;
        c.updated_at = self.clock.now_ms();
        c.created_at = c.updated_at;
        c.updated_by = actor.to_string();
        self.store.save_campaign(c, None).await
    }

    /// Replaces a campaign; `expected_version` 0 skips the check.
    pub async fn update_campaign(
        &self,
        mut c: Campaign,
        expected_version: i64,
        actor: &str,
    ) -> Result<(Campaign, Campaign)> {
        if expected_version < 0 {
            return Err(Error::invalid("expected_version", "must not be negative"));
        }
        self.check_campaign(&c).await?;
        let current = self.campaign(&c.tenant_id, &c.campaign_id).await?;
        if current.status == CampaignStatus::Archived {
            return Err(Error::FailedPrecondition(format!(
                "campaign {} is archived; create a new one",
                c.campaign_id
            )));
        }
        c.updated_at = self.clock.now_ms();
        c.created_at = current.created_at;
        c.updated_by = actor.to_string();
        let expected = if expected_version == 0 {
            current.version
        } else {
            expected_version
        };
        let saved = self.store.save_campaign(c, Some(expected)).await?;
        // Saved over exactly `expected`: when that is what was read, it is the before.
        let before = if expected == current.version {
            current
        } else {
            self.store
                .campaign_versions(&saved.tenant_id, &saved.campaign_id, saved.version, 1)
                .await?
                .into_iter()
                .next()
                .unwrap_or(current)
        };
        Ok((before, saved))
    }

    pub async fn campaign(&self, tenant_id: &str, campaign_id: &str) -> Result<Campaign> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.text(campaign_id, "campaign_id", MAX_ID_LEN);
        v.finish()?;
        self.store
            .campaign(tenant_id, campaign_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("campaign {campaign_id} not found")))
    }

    /// Campaigns in id order, optionally only those in `statuses`.
    pub async fn list_campaigns(
        &self,
        tenant_id: &str,
        statuses: &[CampaignStatus],
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<Campaign>, String)> {
        let size = page(tenant_id, page_size, page_token)?;
        let (_, all, _) = self.store.campaigns(tenant_id).await?;
        let items: Vec<Campaign> = all
            .into_iter()
            .filter(|c| page_token.is_empty() || c.campaign_id.as_str() > page_token)
            .filter(|c| statuses.is_empty() || statuses.contains(&c.status))
            .take(size)
            .collect();
        let next = if items.len() == size {
            items.last().map(|c| c.campaign_id.clone())
        } else {
            None
        };
        Ok((items, next.unwrap_or_default()))
    }

    pub async fn archive_campaign(
        &self,
        tenant_id: &str,
        campaign_id: &str,
        actor: &str,
    ) -> Result<(Campaign, Campaign)> {
        let mut c = self.campaign(tenant_id, campaign_id).await?;
        let before = c.clone();
        if c.status == CampaignStatus::Archived {
            return Ok((before, c));
        }
        let expected = c.version;
        c.status = CampaignStatus::Archived;
        c.updated_at = self.clock.now_ms();
        c.updated_by = actor.to_string();
        Ok((before, self.store.save_campaign(c, Some(expected)).await?))
    }

    /// Saved versions of a campaign, newest first; the page token is the oldest version
    /// of the previous page.
    pub async fn campaign_versions(
        &self,
        tenant_id: &str,
        campaign_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<Campaign>, String)> {
        let size = page(tenant_id, page_size, page_token)?;
        let before: i64 = if page_token.is_empty() {
            0
        } else {
            page_token
                .parse()
                .map_err(|_| Error::invalid("page_token", "is not a token this call returned"))?
        };
        self.campaign(tenant_id, campaign_id).await?;
        let items = self
            .store
            .campaign_versions(tenant_id, campaign_id, before, size)
            .await?;
        let next = match items.last() {
            Some(c) if items.len() == size && c.version > 1 => c.version.to_string(),
            _ => String::new(),
        };
        Ok((items, next))
    }

    pub async fn upsert_group(&self, g: StackingGroup) -> Result<StackingGroup> {
        g.validate()?;
        self.store.save_group(g.clone()).await?;
        Ok(g)
    }

    pub async fn groups(&self, tenant_id: &str) -> Result<Vec<StackingGroup>> {
        tenant(tenant_id)?;
        Ok(self.store.campaigns(tenant_id).await?.2)
    }

    /// Generates `count` unique coupons for a coupon campaign, optionally bound to a member.
    /// A repeat with the same idempotency key returns the first call's codes.
    pub async fn generate_coupons(
        &self,
        tenant_id: &str,
        campaign_id: &str,
        count: i32,
        member_id: &str,
        expire_at: Option<Millis>,
        idempotency_key: &str,
    ) -> Result<Vec<String>> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.text(campaign_id, "campaign_id", MAX_ID_LEN);
        v.optional_text(member_id, "member_id", MAX_ID_LEN);
        v.optional_text(idempotency_key, "idempotency_key", 128);
        v.check(
            count >= 1 && count as usize <= MAX_COUPON_BATCH,
            "count",
            format!("must be between 1 and {MAX_COUPON_BATCH}"),
        );
        let now = self.clock.now_ms();
        v.check(
            expire_at.is_none_or(|t| t > now),
            "expire_time",
            "must be in the future",
        );
        v.finish()?;
        let c = self.campaign(tenant_id, campaign_id).await?;
        let Some(CodeRequirement::Coupons {
            max_uses,
            member_bound,
        }) = c.code
        else {
            return Err(Error::FailedPrecondition(format!(
                "campaign {campaign_id} does not use coupons (its code requirement is not `coupons`)"
            )));
        };
        if member_bound && member_id.is_empty() {
            return Err(Error::invalid(
                "member_id",
                "the campaign's coupons are bound to a member: name one",
            ));
        }
        if c.status == CampaignStatus::Archived {
            return Err(Error::FailedPrecondition(format!(
                "campaign {campaign_id} is archived"
            )));
        }
        // Codes are random in a space of 31^12; a collision with an existing code is
        // refused by the store, and the batch is drawn again.
        for _ in 0..3 {
            let coupons: Vec<Coupon> = {
                let mut rng = rand::rng();
                let mut seen = std::collections::HashSet::new();
                std::iter::from_fn(|| Some(new_code(&mut rng)))
                    .filter(|code| seen.insert(code.clone()))
                    .take(count as usize)
                    .map(|code| Coupon {
                        tenant_id: tenant_id.to_string(),
                        code,
                        campaign_id: campaign_id.to_string(),
                        member_id: member_id.to_string(),
                        max_uses,
                        expire_at,
                        created_at: now,
                    })
                    .collect()
            };
            match self
                .store
                .insert_coupons(tenant_id, idempotency_key, &coupons)
                .await
            {
                Err(Error::AlreadyExists(_)) => continue,
                other => return other,
            }
        }
        Err(Error::Unavailable(
            "could not draw unique coupon codes; retry".into(),
        ))
    }

    /// A coupon with its uses so far.
    pub async fn coupon(&self, tenant_id: &str, code: &str) -> Result<(Coupon, i64)> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.text(code, "code", 64);
        v.finish()?;
        let code = normalize_code(code);
        self.store
            .coupon(tenant_id, &code)
            .await?
            .ok_or_else(|| Error::NotFound(format!("coupon {code} not found")))
    }

    pub async fn export_campaigns(&self, tenant_id: &str) -> Result<CampaignDocument> {
        tenant(tenant_id)?;
        let (_, campaigns, groups) = self.store.campaigns(tenant_id).await?;
        Ok(CampaignDocument {
            tenant_id: tenant_id.to_string(),
            groups,
            campaigns,
        })
    }

    /// Imports a document: groups first, then campaigns, each replacing the one with its
    /// id. The whole document is checked before anything is saved.
    pub async fn import_campaigns(
        &self,
        tenant_id: &str,
        json: &str,
        actor: &str,
    ) -> Result<usize> {
        tenant(tenant_id)?;
        if json.len() > MAX_IMPORT_BYTES {
            return Err(Error::invalid(
                "json",
                format!("at most {MAX_IMPORT_BYTES} bytes"),
            ));
        }
        let doc: CampaignDocument = serde_json::from_str(json)
            .map_err(|e| Error::invalid("json", format!("not a campaign document: {e}")))?;
        let mut v = Violations::new();
        v.check(
            doc.campaigns.len() <= MAX_CAMPAIGNS,
            "json.campaigns",
            format!("at most {MAX_CAMPAIGNS}"),
        );
        let mut ids = BTreeMap::new();
        for (i, c) in doc.campaigns.iter().enumerate() {
            v.check(
                c.tenant_id == tenant_id,
                format!("json.campaigns[{i}].tenant_id"),
                "must be the tenant of the request",
            );
            if ids.insert(c.campaign_id.clone(), i).is_some() {
                v.add(
                    format!("json.campaigns[{i}].campaign_id"),
                    format!("duplicate campaign id {:?}", c.campaign_id),
                );
            }
        }
        for (i, g) in doc.groups.iter().enumerate() {
            v.check(
                g.tenant_id == tenant_id,
                format!("json.groups[{i}].tenant_id"),
                "must be the tenant of the request",
            );
            if let Err(Error::InvalidArgument(list)) = g.validate() {
                for f in list {
                    v.add(format!("json.groups[{i}].{}", f.field), f.description);
                }
            }
        }
        v.finish()?;
        let now = self.clock.now_ms();
        // Checked against the tenant as it will be: its campaigns and groups with the
        // document's in place of those with the same ids. Read once, whatever the size.
        let (_, stored, stored_groups) = self.store.campaigns(tenant_id).await?;
        // An imported campaign starts here now, or keeps when it started if it exists.
        let created: BTreeMap<String, i64> = stored
            .iter()
            .map(|c| (c.campaign_id.clone(), c.created_at))
            .collect();
        let mut campaigns: Vec<Campaign> = stored
            .into_iter()
            .filter(|c| !ids.contains_key(&c.campaign_id))
            .collect();
        campaigns.extend(doc.campaigns.iter().cloned());
        let mut groups: Vec<StackingGroup> = stored_groups
            .into_iter()
            .filter(|g| !doc.groups.iter().any(|d| d.group_id == g.group_id))
            .collect();
        groups.extend(doc.groups.iter().cloned());
        if campaigns.len() > MAX_CAMPAIGNS {
            return Err(Error::invalid(
                "json.campaigns",
                format!("the tenant would keep more than {MAX_CAMPAIGNS} campaigns"),
            ));
        }
        for (i, c) in doc.campaigns.iter().enumerate() {
            self.check_against(c, &campaigns, &groups)
                .await
                .map_err(|e| match e {
                    Error::InvalidArgument(list) => Error::InvalidArgument(
                        list.into_iter()
                            .map(|mut f| {
                                f.field = format!("json.campaigns[{i}].{}", f.field);
                                f
                            })
                            .collect(),
                    ),
                    other => other,
                })?;
        }
        for g in &doc.groups {
            self.store.save_group(g.clone()).await?;
        }
        for c in doc.campaigns.iter().cloned() {
            let mut c = c;
            c.updated_at = now;
            c.created_at = created.get(&c.campaign_id).copied().unwrap_or(now);
            c.updated_by = actor.to_string();
            self.store.save_campaign(c, Some(0)).await?;
        }
        Ok(doc.campaigns.len())
    }

    /// A member's tier now, the next one and what is missing for it.
    pub async fn member_tier(&self, tenant_id: &str, member_id: &str) -> Result<TierStatus> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.text(member_id, "member_id", MAX_ID_LEN);
        v.finish()?;
        let program = self.program(tenant_id).await?;
        let now = LocalTime::at(self.clock.now_ms(), "");
        let names = tier::spend_counters(&program, member_id, &now);
        let spent = self.store.counters(tenant_id, &names).await?;
        Ok(tier::status(&program, tier::spend_from_cents(&spent)))
    }
}
