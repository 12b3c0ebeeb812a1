//! Quote, Commit and Refund: the POS path, orchestrating the store, identity, balance and
//! segmentation.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use loyalty_platform::clock::{Millis, SharedClock};
use loyalty_platform::error::{Error, Result, Violations};
use loyalty_platform::types::check_tenant;
use rust_decimal::Decimal;

use crate::book::CampaignBook;
use crate::calendar::LocalTime;
use crate::campaign::{CodeRequirement, normalize_code};
use crate::catalog::Store;
use crate::evaluate::{
    Codes, Evaluation, LineInfo, MemberContext, MemberProfile, Situation, cents, evaluate, reprice,
};
use crate::events::{
    Catalog, Events, PurchaseEvent, RefundEvent, StoreFacts, purchase_event, refund_event,
};
use crate::ports::{HoldState, Members, Points, Redeemed, Segments};
use crate::program::{MONEY_SCALE, Program, Rounding};
use crate::purchase::{
    MAX_REFUNDS_PER_RECEIPT, Purchase, PurchaseState, Refund, RefundOutcome, accrue_key, bonus_key,
    fingerprint, redeem_excess_key, redeem_key, refund_bonus_key, refund_key, release_hold_key,
};
use crate::receipt::{MAX_LINES, MAX_RECEIPT_ID_LEN, Receipt, parse_decimal};
use crate::store::{PromotionStore, Put, Unsettled};
use crate::tier;
use crate::usage::{Claim, Counters};
use crate::velocity;

/// Longest hold id a receipt may name (balance's ids are shorter).
pub const MAX_HOLD_ID_LEN: usize = 400;

/// Compare-and-set attempts before a contended purchase update gives up.
const CAS_ATTEMPTS: usize = 16;

/// The answer of a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Committed {
    pub evaluation: Evaluation,
    pub points_balance: Option<i64>,
    pub commit_time: i64,
}

/// The answer of a refund.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refunded {
    pub refund_id: String,
    pub refunded_amount: Decimal,
    pub outcome: RefundOutcome,
}

/// Everything an evaluation reads, gathered once per request.
#[derive(Debug)]
struct Prepared {
    program: Program,
    book: Arc<CampaignBook>,
    store: Store,
    infos: Vec<LineInfo>,
    member: Option<MemberContext>,
    profile: Option<MemberProfile>,
    codes: Codes,
    counters: Counters,
    local: LocalTime,
    now: Millis,
}

impl Prepared {
    fn evaluate(&self, receipt: &Receipt) -> Evaluation {
        let situation = Situation {
            store_brand: &self.store.brand,
            local: self.local,
            time_zone: &self.store.time_zone,
            lines: &self.infos,
            member: self.member.as_ref(),
            profile: self.profile.as_ref(),
            codes: &self.codes,
            counters: &self.counters,
            now: self.now,
        };
        evaluate(&self.program, &self.book, receipt, &situation)
    }

    /// Evaluates and holds the result to the bounds and the velocity limits: a hard limit
    /// refuses, soft ones are flagged on the evaluation. Returns the velocity claims to
    /// write with the purchase.
    fn judged(&self, receipt: &Receipt) -> Result<(Evaluation, Vec<Claim>)> {
        let mut evaluation = self.evaluate(receipt);
        check_bounds(&evaluation)?;
        let limits = &self.program.velocity_limits;
        if limits.is_empty() {
            return Ok((evaluation, Vec::new()));
        }
        let verdict = velocity::judge(limits, receipt, &evaluation, &self.counters, self.now);
        if let Some(why) = verdict.refused {
            return Err(velocity::refusal(&why));
        }
        evaluation.velocity_flags = verdict.flags;
        Ok((evaluation, verdict.claims))
    }
}

#[derive(Debug, Clone)]
pub struct Checkout {
    store: Arc<dyn PromotionStore>,
    members: Arc<dyn Members>,
    points: Arc<dyn Points>,
    segments: Arc<dyn Segments>,
    events: Arc<dyn Events>,
    clock: SharedClock,
    /// Compiled campaigns per tenant; replaced when the stored version moves.
    books: Arc<RwLock<HashMap<String, Arc<CampaignBook>>>>,
    /// Where the next round of [`Checkout::repair_stale`] goes on from.
    repair_from: Arc<std::sync::Mutex<Option<Unsettled>>>,
}

impl Checkout {
    pub fn new(
        store: Arc<dyn PromotionStore>,
        members: Arc<dyn Members>,
        points: Arc<dyn Points>,
        segments: Arc<dyn Segments>,
        events: Arc<dyn Events>,
        clock: SharedClock,
    ) -> Self {
        Self {
            store,
            members,
            points,
            segments,
            events,
            clock,
            books: Arc::default(),
            repair_from: Arc::default(),
        }
    }

    pub fn store(&self) -> &Arc<dyn PromotionStore> {
        &self.store
    }

    /// The tenant's compiled campaigns at `version`: a change is seen by the next request
    /// on every replica, since each request reads the version.
    async fn book(&self, tenant_id: &str, version: u64) -> Result<Arc<CampaignBook>> {
        if version == 0 {
            return Ok(Arc::default());
        }
        if let Ok(books) = self.books.read()
            && let Some(b) = books.get(tenant_id)
            && b.version == version
        {
            return Ok(b.clone());
        }
        let (stored, campaigns, groups) = self.store.campaigns(tenant_id).await?;
        let book = Arc::new(CampaignBook::compile(stored, campaigns, &groups));
        if let Ok(mut books) = self.books.write() {
            let newer = books.get(tenant_id).is_some_and(|b| b.version > stored);
            if !newer {
                books.insert(tenant_id.to_string(), book.clone());
            }
        }
        Ok(book)
    }

    /// (category, brand) of each line's product, for the events; the store as it was at the
    /// purchase.
    async fn catalog(&self, p: &Purchase) -> Result<Catalog> {
        catalog_of(self.store.as_ref(), p).await
    }

    /// Finishes the commit, then publishes the purchase before the caller is answered: a
    /// caller that never got its answer retries, and the retry publishes again.
    async fn committed(&self, p: Purchase, known: Option<Catalog>) -> Result<Committed> {
        let (committed, p) = self.finish_commit(p).await?;
        let catalog = match known {
            Some(c) => c,
            None => self.catalog(&p).await?,
        };
        self.events
            .purchase_committed(purchase_event(
                &p,
                &catalog,
                committed.commit_time,
                committed.points_balance,
            ))
            .await?;
        Ok(committed)
    }

    /// Reads everything the receipt's evaluation needs, refusing unknown stores, products
    /// and codes. Member, balance, segments and counters are read concurrently.
    /// `hold_id`: the till's hold the receipt redeems from, which must be the member's and
    /// open; it stands in for the active balance.
    async fn prepare(&self, receipt: &Receipt, hold_id: Option<&str>) -> Result<Prepared> {
        if let Some(hold_id) = hold_id {
            let mut v = Violations::new();
            v.text(hold_id, "hold_id", MAX_HOLD_ID_LEN);
            v.finish()?;
        }
        let tenant = receipt.tenant_id.as_str();
        let skus: Vec<String> = receipt.lines.iter().map(|l| l.sku.clone()).collect();
        let codes: Vec<String> = receipt.codes.iter().map(|c| normalize_code(c)).collect();
        let ctx = self
            .store
            .checkout_context(tenant, &receipt.store_id, &skus, &codes)
            .await?;
        let program = ctx.program.ok_or_else(|| {
            Error::FailedPrecondition(format!(
                "tenant {tenant} has no program: set one with ProgramService.UpdateProgram"
            ))
        })?;
        let book = self.book(tenant, ctx.campaigns_version).await?;
        // Campaigns run on the server's clock: a POS cannot move a receipt into a window.
        let now = self.clock.now_ms();
        let mut v = Violations::new();
        v.check(
            ctx.store.is_some(),
            "receipt.store_id",
            format!("unknown store {:?}", receipt.store_id),
        );
        for (i, (line, product)) in receipt.lines.iter().zip(&ctx.products).enumerate() {
            v.check(
                product.is_some(),
                format!("receipt.lines[{i}].sku"),
                format!("unknown product {:?}", line.sku),
            );
        }
        let member = self
            .members
            .resolve(tenant, &receipt.identification, book.needs_profile)
            .await?;
        if hold_id.is_some() && member.is_none() {
            return Err(Error::invalid(
                "hold_id",
                "only a receipt that identifies its member can redeem from a hold",
            ));
        }
        let mut presented = Codes::default();
        for (i, (code, coupon)) in codes.iter().zip(&ctx.coupons).enumerate() {
            let field = format!("receipt.codes[{i}]");
            if presented.promo.contains(code) || presented.coupons.iter().any(|c| &c.code == code) {
                v.add(field, format!("code {code:?} is presented twice"));
                continue;
            }
            match coupon {
                Some((c, uses)) => {
                    let active = book.entries.iter().any(|e| {
                        e.campaign.campaign_id == c.campaign_id
                            && matches!(e.campaign.code, Some(CodeRequirement::Coupons { .. }))
                    });
                    if c.expire_at.is_some_and(|t| now >= t) {
                        v.add(field, format!("coupon {code:?} has expired"));
                    } else if *uses >= i64::from(c.max_uses) {
                        v.add(field, format!("coupon {code:?} is used up"));
                    } else if !c.member_id.is_empty()
                        && member.as_ref().is_none_or(|m| m.member_id != c.member_id)
                    {
                        v.add(field, format!("coupon {code:?} belongs to another member"));
                    } else if !active {
                        v.add(
                            field,
                            format!("coupon {code:?} is for a campaign that is not running"),
                        );
                    } else {
                        presented.coupons.push(c.clone());
                    }
                }
                None if book.promo_codes.contains_key(code) => presented.promo.push(code.clone()),
                None => v.add(field, format!("unknown coupon or promo code {code:?}")),
            }
        }
        v.finish()?;
        let store = ctx
            .store
            .ok_or_else(|| Error::invalid("receipt.store_id", "unknown store"))?;
        let local = LocalTime::at(now, &store.time_zone);

        // Counters the campaigns and the tier read.
        let mut names: Vec<String> = Vec::new();
        if book.needs_counters {
            for e in &book.entries {
                let c = &e.campaign;
                let id = &c.campaign_id;
                if c.budget.max_uses > 0 {
                    names.push(crate::usage::uses_counter(id));
                }
                if c.budget.max_discount.is_some() {
                    names.push(crate::usage::discount_counter(id));
                }
                if c.budget.max_points > 0 {
                    names.push(crate::usage::points_counter(id));
                }
                if c.member_limit > 0
                    && let Some(m) = &member
                {
                    let period = crate::evaluate::period(&local, c.member_limit_period_days);
                    names.push(crate::usage::member_counter(id, &m.member_id, period));
                }
            }
        }
        let spend_names = member
            .as_ref()
            .map(|m| tier::spend_counters(&program, &m.member_id, &local))
            .unwrap_or_default();
        names.extend(spend_names.iter().cloned());
        if member.is_some() {
            names.extend(velocity::counter_names(
                &program.velocity_limits,
                receipt,
                member.as_ref().map(|m| m.member_id.as_str()),
                now,
            ));
        }

        let counters = async {
            if names.is_empty() {
                Ok(Vec::new())
            } else {
                self.store.counters(tenant, &names).await
            }
        };
        let (points_available, segments, values) = match &member {
            None => (0, Vec::new(), counters.await?),
            Some(m) => {
                let segments = async {
                    if book.needs_segments {
                        self.segments.member_segments(tenant, &m.member_id).await
                    } else {
                        Ok(Vec::new())
                    }
                };
                let points = async {
                    match hold_id {
                        None => self.points.available(tenant, &m.member_id).await,
                        Some(hold_id) => self.held(tenant, &m.member_id, hold_id).await,
                    }
                };
                tokio::try_join!(points, segments, counters)?
            }
        };
        let counters: Counters = names.into_iter().zip(values).collect();
        let (member, profile) = match member {
            None => (None, None),
            Some(m) => {
                let spent: Vec<i64> = spend_names
                    .iter()
                    .map(|n| counters.get(n).copied().unwrap_or(0))
                    .collect();
                let status = tier::status(&program, tier::spend_from_cents(&spent));
                (
                    Some(MemberContext {
                        member_id: m.member_id,
                        points_available,
                        tier_id: status.tier.map(|t| t.tier_id).unwrap_or_default(),
                    }),
                    Some(MemberProfile {
                        birthday: m.birthday,
                        attributes: m.attributes,
                        segments,
                    }),
                )
            }
        };
        Ok(Prepared {
            infos: ctx
                .products
                .into_iter()
                .map(|p| {
                    p.map(|p| LineInfo {
                        category: p.category,
                        brand: p.brand,
                    })
                    .unwrap_or_default()
                })
                .collect(),
            program,
            book,
            store,
            member,
            profile,
            codes: presented,
            counters,
            local,
            now,
        })
    }

    /// What an open hold of `member_id` reserves; refuses another member's hold and one
    /// that has ended.
    async fn held(&self, tenant_id: &str, member_id: &str, hold_id: &str) -> Result<i64> {
        let held = self.points.hold(tenant_id, hold_id).await?;
        if held.member_id != member_id {
            return Err(Error::FailedPrecondition(format!(
                "hold {hold_id} reserves another member's points, not the receipt's"
            )));
        }
        let ended = match held.state {
            HoldState::Open => return Ok(held.amount),
            HoldState::Confirmed => "was already confirmed",
            HoldState::Cancelled => "was cancelled",
            HoldState::Expired => "expired and its points were released",
        };
        Err(Error::FailedPrecondition(format!(
            "hold {hold_id} {ended}; redeem without it or place a new one"
        )))
    }

    /// A dry run: evaluates and writes nothing. `hold_id` as in [`Self::commit`].
    pub async fn quote(&self, receipt: Receipt, hold_id: Option<&str>) -> Result<Evaluation> {
        let prepared = self.prepare(&receipt, hold_id).await?;
        Ok(prepared.judged(&receipt)?.0)
    }

    /// Applies a receipt once, however often it is retried. With `hold_id` the receipt
    /// redeems from that hold of the till's (at most what it reserves) and the commit
    /// confirms it, returning the rest; the hold is part of the receipt's identity.
    pub async fn commit(&self, receipt: Receipt, hold_id: Option<&str>) -> Result<Committed> {
        let fp = match hold_id {
            None => fingerprint(&receipt),
            Some(hold_id) => fingerprint(&(&receipt, hold_id)),
        };
        for _ in 0..CAS_ATTEMPTS {
            match self
                .store
                .purchase(&receipt.tenant_id, &receipt.receipt_id)
                .await?
            {
                Some(p) if p.fingerprint != fp => return Err(receipt_reused(&receipt.receipt_id)),
                Some(p) => return self.committed(p, None).await,
                None => {
                    let mut prepared = self.prepare(&receipt, hold_id).await?;
                    if let Some(purchase) =
                        self.insert(&receipt, hold_id, &fp, &mut prepared).await?
                    {
                        // The products were read for the evaluation: the event reuses them.
                        let catalog = Catalog {
                            lines: prepared
                                .infos
                                .iter()
                                .map(|i| (i.category.clone(), i.brand.clone()))
                                .collect(),
                            store: purchase.store.clone(),
                        };
                        return self.committed(purchase, Some(catalog)).await;
                    }
                    // A concurrent commit of the same receipt id won; look again.
                }
            }
        }
        Err(Error::Unavailable(
            "receipt is being committed concurrently; retry".into(),
        ))
    }

    /// Writes the new purchase with its claims on budgets, limits and coupons in one atomic
    /// write. A claim that no longer fits (a concurrent commit took the last of a budget)
    /// marks its counter full and the receipt is evaluated again without that campaign.
    /// `None` when another commit of the same receipt id got there first.
    async fn insert(
        &self,
        receipt: &Receipt,
        hold_id: Option<&str>,
        fp: &[u8],
        prepared: &mut Prepared,
    ) -> Result<Option<Purchase>> {
        for _ in 0..CAS_ATTEMPTS {
            let (evaluation, velocity_claims) = match prepared.judged(receipt) {
                Err(refused @ Error::FailedPrecondition(_)) => {
                    metrics::counter!("loyalty_velocity_refused_total").increment(1);
                    return Err(refused);
                }
                other => other?,
            };
            let mut claims = evaluation.claims.clone();
            claims.extend(velocity_claims);
            if let Some(hold_id) = hold_id {
                claims.push(Claim {
                    counter: crate::usage::hold_counter(hold_id),
                    amount: 1,
                    limit: 1,
                });
            }
            if let Some(m) = &evaluation.member {
                claims.push(Claim {
                    counter: tier::spend_counter(&m.member_id, prepared.local.month_number()),
                    amount: cents(evaluation.net),
                    limit: 0,
                });
            }
            // Without a member no points move, so one atomic insert of the committed
            // record is the whole commit; otherwise it starts pending.
            let now = prepared.now;
            let state = match (&evaluation.member, hold_id) {
                (None, _) => PurchaseState::Committed {
                    commit_time: self.clock.now_ms(),
                    points_balance: None,
                },
                (Some(_), None) => PurchaseState::Pending,
                (Some(_), Some(hold_id)) => PurchaseState::PendingOnHold {
                    hold_id: hold_id.to_string(),
                },
            };
            let purchase = Purchase {
                receipt: receipt.clone(),
                fingerprint: fp.to_vec(),
                program: prepared.program.clone(),
                evaluated_at: now,
                month: prepared.local.month_number(),
                store: StoreFacts::of(&prepared.store),
                evaluation,
                state,
                refunds: Vec::new(),
                version: 1,
            };
            match self.store.put_purchase(&purchase, None, &claims).await? {
                Put::Written => {
                    if !purchase.evaluation.velocity_flags.is_empty() {
                        metrics::counter!("loyalty_velocity_flagged_total").increment(1);
                        tracing::warn!(
                            tenant_id = %purchase.receipt.tenant_id,
                            receipt_id = %purchase.receipt.receipt_id,
                            flags = ?purchase.evaluation.velocity_flags,
                            "receipt over a soft velocity limit"
                        );
                    }
                    if matches!(purchase.state, PurchaseState::Committed { .. }) {
                        crate::counters::receipt_committed(&purchase.evaluation);
                    }
                    return Ok(Some(purchase));
                }
                Put::Conflict => return Ok(None),
                Put::Refused(i) => {
                    let refused = &claims[i];
                    if let Some(code) = refused
                        .counter
                        .strip_prefix(crate::usage::COUPON_COUNTER_PREFIX)
                    {
                        return Err(Error::FailedPrecondition(format!(
                            "a coupon of this receipt was used up by another purchase just now: {code}"
                        )));
                    }
                    if let Some(hold_id) = refused.counter.strip_prefix("hold/") {
                        return Err(Error::FailedPrecondition(format!(
                            "hold {hold_id} is already named by another receipt"
                        )));
                    }
                    prepared
                        .counters
                        .insert(refused.counter.clone(), refused.limit);
                }
            }
        }
        Err(Error::Unavailable(
            "the receipt's campaigns are contended; retry".into(),
        ))
    }

    /// Moves the points of a pending purchase and marks it committed. Every step is
    /// idempotent and depends only on the pending record and on replies the ledger stores
    /// under fixed keys, so any number of concurrent or later retries do the same thing.
    async fn finish_commit(&self, mut p: Purchase) -> Result<(Committed, Purchase)> {
        if let PurchaseState::Committed {
            commit_time,
            points_balance,
        } = p.state
        {
            let committed = Committed {
                evaluation: p.evaluation.clone(),
                points_balance,
                commit_time,
            };
            return Ok((committed, p));
        }
        let tenant = p.receipt.tenant_id.clone();
        let id = p.receipt.receipt_id.clone();
        let mut evaluation = p.evaluation.clone();
        let mut balance = None;
        if let Some(member) = p.evaluation.member.clone() {
            if evaluation.points_redeemed > 0 {
                let redeemed = self
                    .redeem(
                        &tenant,
                        &member.member_id,
                        &id,
                        p.state.hold_id(),
                        evaluation.points_redeemed,
                    )
                    .await?;
                balance = Some(redeemed.active_after);
                if redeemed.amount != evaluation.points_redeemed {
                    // Under the program and time of the pending record, so every retry
                    // gets the same answer.
                    evaluation = reprice(&p.program, &p.receipt, &p.evaluation, redeemed.amount);
                    let excess = redeemed.amount - evaluation.points_redeemed;
                    if excess > 0 {
                        let r = self
                            .points
                            .reverse(
                                &tenant,
                                &member.member_id,
                                &redeem_excess_key(&id),
                                &redeem_key(&id),
                                excess,
                                &id,
                            )
                            .await?;
                        balance = Some(r.active_after);
                    }
                }
            } else if let Some(hold_id) = p.state.hold_id() {
                // Nothing to redeem (the program capped it to none): the hold's points all
                // go back now rather than when it times out. One confirmed meanwhile stays so.
                match self
                    .points
                    .cancel_hold(&tenant, hold_id, &release_hold_key(&id))
                    .await
                {
                    Ok(()) | Err(Error::FailedPrecondition(_)) => {}
                    Err(err) => return Err(err),
                }
            }
            // The main lot and each bonus lot are independent ledger operations (each
            // idempotent by its key): they go together, so a receipt with bonuses costs the
            // ledger one round of durable writes, not one per lot.
            let mut lots = Vec::with_capacity(1 + evaluation.bonuses.len());
            if evaluation.points_accrued > 0 {
                lots.push((
                    accrue_key(&id),
                    evaluation.points_accrued,
                    evaluation.activate_at,
                    evaluation.expire_at,
                ));
            }
            for bonus in &evaluation.bonuses {
                lots.push((
                    bonus_key(&id, &bonus.campaign_id),
                    bonus.points,
                    bonus.activate_at,
                    bonus.expire_at,
                ));
            }
            let accruals = lots.iter().map(|(key, amount, activate_at, expire_at)| {
                self.points.accrue(
                    &tenant,
                    &member.member_id,
                    key,
                    *amount,
                    &id,
                    *activate_at,
                    *expire_at,
                )
            });
            // Every lot only adds, so the balance after all of them is the largest reported.
            if let Some(after) = futures_util::future::try_join_all(accruals)
                .await?
                .into_iter()
                .max()
            {
                balance = Some(after);
            }
            if balance.is_none() {
                balance = Some(self.points.available(&tenant, &member.member_id).await?);
            }
        }
        let expected = p.version;
        let commit_time = self.clock.now_ms();
        p.evaluation = evaluation;
        p.state = PurchaseState::Committed {
            commit_time,
            points_balance: balance,
        };
        p.version += 1;
        if self.store.put_purchase(&p, Some(expected), &[]).await? == Put::Written {
            crate::counters::receipt_committed(&p.evaluation);
            let committed = Committed {
                evaluation: p.evaluation.clone(),
                points_balance: balance,
                commit_time,
            };
            return Ok((committed, p));
        }
        // A concurrent retry finished first; answer what it recorded.
        match self.store.purchase(&tenant, &id).await? {
            Some(
                p @ Purchase {
                    state: PurchaseState::Committed { .. },
                    ..
                },
            ) => Box::pin(self.finish_commit(p)).await,
            _ => Err(Error::Unavailable(
                "receipt is being committed concurrently; retry".into(),
            )),
        }
    }

    pub async fn purchase(&self, tenant_id: &str, receipt_id: &str) -> Result<Purchase> {
        let mut v = Violations::new();
        check_tenant(&mut v, tenant_id);
        v.text(receipt_id, "receipt_id", MAX_RECEIPT_ID_LEN);
        v.finish()?;
        self.store
            .purchase(tenant_id, receipt_id)
            .await?
            .ok_or_else(|| Error::NotFound(format!("receipt {receipt_id} not found")))
    }

    /// Redeems a pending receipt's points under its fixed key: from the till's hold when it
    /// names one, else what is active up to `amount`. The ledger takes either atomically, so
    /// this step cannot fail half-way when the balance moved since the quote.
    async fn redeem(
        &self,
        tenant_id: &str,
        member_id: &str,
        receipt_id: &str,
        hold_id: Option<&str>,
        amount: i64,
    ) -> Result<Redeemed> {
        let key = redeem_key(receipt_id);
        if let Some(hold_id) = hold_id {
            match self
                .points
                .confirm_hold(tenant_id, hold_id, &key, amount)
                .await
            {
                // An earlier attempt found the hold timed out and redeemed under the key.
                Err(Error::AlreadyExists(_)) => {}
                Err(Error::FailedPrecondition(why)) => {
                    match self.points.hold(tenant_id, hold_id).await?.state {
                        // It timed out before the commit reached it: redeem from the active
                        // balance, as without a hold.
                        HoldState::Expired => {}
                        // The till cancelled it, or another call confirmed it: it pays
                        // nothing, and the receipt is re-priced without points. Either state
                        // is final, so every retry agrees.
                        HoldState::Cancelled | HoldState::Confirmed => {
                            let active_after = self.points.available(tenant_id, member_id).await?;
                            return Ok(Redeemed {
                                amount: 0,
                                active_after,
                            });
                        }
                        HoldState::Open => return Err(Error::FailedPrecondition(why)),
                    }
                }
                other => return other,
            }
        }
        self.points
            .redeem(tenant_id, member_id, &key, amount, receipt_id)
            .await
    }

    /// Finishes what callers left unfinished more than `age_ms` ago, exactly as their retry
    /// would (the same keys, the same events):
    /// - a pending commit: its points move, its claims count, and segmentation and reporting
    ///   hear of it;
    /// - an accepted refund whose points did not move (its budgets and limits were given
    ///   back when it was accepted): its points move and its event goes out.
    ///
    /// Returns how many commits and refunds were finished; one that fails stays for a
    /// later round. A round takes at most `limit` and the next goes on after the last one
    /// taken, starting over from the oldest once it reaches the end: purchases that keep
    /// failing never hold newer ones back.
    pub async fn repair_stale(&self, age_ms: Millis, limit: usize) -> Result<usize> {
        let before = self.clock.now_ms() - age_ms;
        let after = self
            .repair_from
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let mut round = self
            .store
            .stale_unsettled(before, after.as_ref(), limit)
            .await?;
        if round.is_empty() && after.is_some() {
            round = self.store.stale_unsettled(before, None, limit).await?;
        }
        *self
            .repair_from
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = if round.len() < limit {
            None
        } else {
            round.last().cloned()
        };
        let mut finished = 0;
        for Unsettled {
            tenant_id: tenant,
            receipt_id: receipt,
            ..
        } in round
        {
            let Some(p) = self.store.purchase(&tenant, &receipt).await? else {
                continue;
            };
            if p.state.is_pending() {
                match self.committed(p, None).await {
                    Ok(_) => finished += 1,
                    Err(err) => {
                        tracing::warn!(%tenant, %receipt, error = %err, "finishing a stale commit failed; it stays pending");
                    }
                }
                continue;
            }
            let unsettled: Vec<Refund> = p.unsettled_refunds().cloned().collect();
            for refund in unsettled {
                // Each finished refund writes the purchase: read it again for the next.
                let Some(p) = self.store.purchase(&tenant, &receipt).await? else {
                    break;
                };
                let refund_id = refund.refund_id.clone();
                match self.refunded(p, refund).await {
                    Ok(_) => finished += 1,
                    Err(err) => {
                        tracing::warn!(%tenant, %receipt, %refund_id, error = %err, "finishing a stale refund failed; its points have not moved");
                    }
                }
            }
        }
        Ok(finished)
    }

    /// A member's purchase history, newest first; the token continues a listing.
    pub async fn list_purchases(
        &self,
        tenant_id: &str,
        member_id: &str,
        page_size: i32,
        page_token: &str,
    ) -> Result<(Vec<Purchase>, String)> {
        let size = crate::admin::page(tenant_id, page_size, page_token)?;
        let mut v = Violations::new();
        v.text(member_id, "member_id", loyalty_platform::error::MAX_ID_LEN);
        v.finish()?;
        let items = self
            .store
            .member_purchases(tenant_id, member_id, page_token, size)
            .await?;
        let next = match items.last() {
            Some((position, _)) if items.len() == size => position.clone(),
            _ => String::new(),
        };
        Ok((items.into_iter().map(|(_, p)| p).collect(), next))
    }

    /// Refunds lines by quantity. Accrued points are taken back and redeemed points given
    /// back in proportion to the quantity, cumulatively, so all partial refunds together
    /// never move more than the receipt did.
    pub async fn refund(
        &self,
        tenant_id: &str,
        receipt_id: &str,
        refund_id: &str,
        raw_lines: &[(String, String)],
    ) -> Result<Refunded> {
        let lines = parse_refund(tenant_id, receipt_id, refund_id, raw_lines)?;
        let fp = fingerprint(&lines);
        for _ in 0..CAS_ATTEMPTS {
            let mut p = self.purchase(tenant_id, receipt_id).await?;
            if p.state.is_pending() {
                return Err(Error::FailedPrecondition(format!(
                    "receipt {receipt_id} is not committed yet: retry its commit first"
                )));
            }
            if let Some(existing) = p.refunds.iter().find(|r| r.refund_id == refund_id) {
                if existing.fingerprint != fp {
                    return Err(Error::AlreadyExists(format!(
                        "refund id {refund_id} was already used for different lines"
                    )));
                }
                let existing = existing.clone();
                return self.refunded(p, existing).await;
            }
            if p.refunds.len() >= MAX_REFUNDS_PER_RECEIPT {
                return Err(Error::FailedPrecondition(format!(
                    "receipt {receipt_id} already has {MAX_REFUNDS_PER_RECEIPT} refunds, the most one receipt may have"
                )));
            }
            // The receipt's own program decides, so every partial refund of it agrees.
            let returns_redeemed = p.program.refund_returns_redeemed_points;
            let mut refund =
                plan_refund(&p, refund_id, fp.clone(), lines.clone(), returns_redeemed)?;
            refund.refunded_at = self.clock.now_ms();
            let expected = p.version;
            p.refunds.push(refund.clone());
            p.version += 1;
            // Budgets, limits, coupons and tier spend are given back in the same write
            // that records the refund, so exactly once.
            if self
                .store
                .put_purchase(&p, Some(expected), &refund.releases)
                .await?
                == Put::Written
            {
                return self.refunded(p, refund).await;
            }
        }
        Err(Error::Unavailable(
            "receipt is being refunded concurrently; retry".into(),
        ))
    }

    /// Finishes the refund, then publishes it before the caller is answered (a retry
    /// publishes again).
    async fn refunded(&self, p: Purchase, refund: Refund) -> Result<Refunded> {
        let (refunded, p) = self.finish_refund(p, refund.clone()).await?;
        let settled = Refund {
            outcome: Some(refunded.outcome),
            ..refund
        };
        let catalog = self.catalog(&p).await?;
        self.events
            .refund_committed(refund_event(&p, &settled, &catalog, settled.refunded_at))
            .await?;
        Ok(refunded)
    }

    async fn finish_refund(&self, mut p: Purchase, refund: Refund) -> Result<(Refunded, Purchase)> {
        if let Some(outcome) = refund.outcome {
            let refunded = Refunded {
                refund_id: refund.refund_id,
                refunded_amount: refund.refunded_amount,
                outcome,
            };
            return Ok((refunded, p));
        }
        let tenant = p.receipt.tenant_id.clone();
        let id = p.receipt.receipt_id.clone();
        let mut outcome = RefundOutcome {
            points_reversed: 0,
            points_unrecovered: 0,
            points_returned: 0,
            points_balance: 0,
        };
        if let Some(m) = &p.evaluation.member {
            // The balance after the last reversal: the member's, or its survivor's when the
            // member was merged since (balance reverses there).
            let mut after = None;
            if refund.reverse_points > 0 {
                let key = refund_key(&id, &refund.refund_id, "accrual");
                let r = self
                    .points
                    .reverse(
                        &tenant,
                        &m.member_id,
                        &key,
                        &accrue_key(&id),
                        refund.reverse_points,
                        &id,
                    )
                    .await?;
                outcome.points_reversed = r.taken;
                outcome.points_unrecovered = r.unrecovered;
                after = Some(r.active_after);
            }
            for (bonus, amount) in p.evaluation.bonuses.iter().zip(&refund.reverse_bonus) {
                if *amount <= 0 {
                    continue;
                }
                let r = self
                    .points
                    .reverse(
                        &tenant,
                        &m.member_id,
                        &refund_bonus_key(&id, &refund.refund_id, &bonus.campaign_id),
                        &bonus_key(&id, &bonus.campaign_id),
                        *amount,
                        &id,
                    )
                    .await?;
                outcome.points_reversed += r.taken;
                outcome.points_unrecovered += r.unrecovered;
                after = Some(r.active_after);
            }
            if refund.give_back_points > 0 {
                let key = refund_key(&id, &refund.refund_id, "redemption");
                let r = self
                    .points
                    .reverse(
                        &tenant,
                        &m.member_id,
                        &key,
                        &redeem_key(&id),
                        refund.give_back_points,
                        &id,
                    )
                    .await?;
                outcome.points_returned = refund.give_back_points;
                after = Some(r.active_after);
            }
            outcome.points_balance = match after {
                Some(active) => active,
                None => self.points.available(&tenant, &m.member_id).await?,
            };
        }
        for _ in 0..CAS_ATTEMPTS {
            if let Some(r) = p
                .refunds
                .iter_mut()
                .find(|r| r.refund_id == refund.refund_id)
            {
                if r.outcome.is_some() {
                    break;
                }
                r.outcome = Some(outcome);
            }
            let expected = p.version;
            p.version += 1;
            if self.store.put_purchase(&p, Some(expected), &[]).await? == Put::Written {
                crate::counters::refund_applied(&outcome);
                break;
            }
            p = self.purchase(&tenant, &id).await?;
        }
        let refunded = Refunded {
            refund_id: refund.refund_id,
            refunded_amount: refund.refunded_amount,
            outcome,
        };
        Ok((refunded, p))
    }
}

/// Refuses receipts whose points no ledger operation may carry, before anything is written.
fn check_bounds(e: &Evaluation) -> Result<()> {
    if e.points_accrued > crate::MAX_POINTS || e.points_redeemed > crate::MAX_POINTS {
        return Err(Error::invalid(
            "receipt.lines",
            format!(
                "the receipt would move more than {} points",
                crate::MAX_POINTS
            ),
        ));
    }
    Ok(())
}

fn receipt_reused(receipt_id: &str) -> Error {
    Error::AlreadyExists(format!(
        "receipt id {receipt_id} was already committed with different contents"
    ))
}

fn parse_refund(
    tenant_id: &str,
    receipt_id: &str,
    refund_id: &str,
    raw: &[(String, String)],
) -> Result<Vec<(String, Decimal)>> {
    let mut v = Violations::new();
    check_tenant(&mut v, tenant_id);
    v.text(receipt_id, "receipt_id", MAX_RECEIPT_ID_LEN);
    v.text(refund_id, "refund_id", MAX_RECEIPT_ID_LEN);
    v.check(!raw.is_empty(), "lines", "a refund needs at least one line");
    v.check(
        raw.len() <= MAX_LINES,
        "lines",
        format!("at most {MAX_LINES} lines"),
    );
    let mut seen = std::collections::HashSet::new();
    let mut lines = Vec::new();
    for (i, (line_id, qty)) in raw.iter().enumerate().take(MAX_LINES) {
        v.text(line_id, format!("lines[{i}].line_id"), 64);
        if !seen.insert(line_id.clone()) {
            v.add(
                format!("lines[{i}].line_id"),
                format!("duplicate line id {line_id:?}"),
            );
        }
        match parse_decimal(qty, 3) {
            Ok(q) if q > Decimal::ZERO => lines.push((line_id.clone(), q)),
            Ok(_) => v.add(format!("lines[{i}].quantity"), "must be positive"),
            Err(why) => v.add(format!("lines[{i}].quantity"), why),
        }
    }
    v.finish()?;
    Ok(lines)
}

/// Works out what a refund moves, from the cumulative refunded quantity per line: points
/// to take back and give back, and what goes back to budgets, limits, coupons and the
/// member's tier spend.
pub(crate) fn plan_refund(
    p: &Purchase,
    refund_id: &str,
    fingerprint: Vec<u8>,
    lines: Vec<(String, Decimal)>,
    returns_redeemed: bool,
) -> Result<Refund> {
    let mut v = Violations::new();
    let mut reverse_points = 0;
    let mut give_back_points = 0;
    let mut reverse_bonus = vec![0i64; p.evaluation.bonuses.len()];
    let mut refunded_amount = Decimal::ZERO;
    let mut refunded_net = Decimal::ZERO;
    // Per campaign: discount (cents) and points given back.
    let mut discount_back: HashMap<&str, i64> = HashMap::new();
    let mut points_back: HashMap<&str, i64> = HashMap::new();
    for (i, (line_id, qty)) in lines.iter().enumerate() {
        let Some(line) = p.evaluation.lines.iter().find(|l| &l.line_id == line_id) else {
            v.add(
                format!("lines[{i}].line_id"),
                format!("receipt has no line {line_id:?}"),
            );
            continue;
        };
        let before = p.refunded_quantity(line_id);
        let after = before + qty;
        if after > line.quantity {
            return Err(Error::FailedPrecondition(format!(
                "line {line_id}: only {} of {} left to refund, {qty} requested",
                line.quantity - before,
                line.quantity
            )));
        }
        let share = |total: i64, q: Decimal| -> i64 {
            i64::try_from((Decimal::from(total) * q / line.quantity).floor()).unwrap_or(0)
        };
        let moved = |total: i64| share(total, after) - share(total, before);
        reverse_points += moved(line.points_accrued);
        if returns_redeemed {
            give_back_points += moved(line.points_redeemed);
        }
        for (k, points) in line.bonus_points.iter().enumerate() {
            if let Some(slot) = reverse_bonus.get_mut(k) {
                *slot += moved(*points);
            }
        }
        for effect in line.effects.iter().filter(|e| !e.campaign_id.is_empty()) {
            if !effect.discount.is_zero() {
                *discount_back.entry(&effect.campaign_id).or_default() +=
                    moved(cents(effect.discount));
            }
            if effect.points > 0 {
                *points_back.entry(&effect.campaign_id).or_default() += moved(effect.points);
            }
        }
        for (k, points) in line.bonus_points.iter().enumerate() {
            if let Some(b) = p.evaluation.bonuses.get(k) {
                *points_back.entry(&b.campaign_id).or_default() += moved(*points);
            }
        }
        let paid = line.net - line.paid_with_points;
        let money = |q: Decimal| Rounding::Down.apply(paid * q / line.quantity, MONEY_SCALE);
        refunded_amount += money(after) - money(before);
        let net = |q: Decimal| Rounding::Down.apply(line.net * q / line.quantity, MONEY_SCALE);
        refunded_net += net(after) - net(before);
    }
    v.finish()?;
    // The receipt is fully refunded once every line is.
    let fully = p.evaluation.lines.iter().all(|l| {
        let requested: Decimal = lines
            .iter()
            .filter(|(id, _)| id == &l.line_id)
            .map(|(_, q)| *q)
            .sum();
        p.refunded_quantity(&l.line_id) + requested >= l.quantity
    });
    let mut releases = Vec::new();
    for claim in &p.evaluation.claims {
        let c = claim.counter.as_str();
        // The whole rest is the campaign id (ids may contain '/').
        let amount = if let Some(campaign) = c.strip_prefix("discount/") {
            discount_back.get(campaign).copied().unwrap_or(0)
        } else if let Some(campaign) = c.strip_prefix("points/") {
            points_back.get(campaign).copied().unwrap_or(0)
        } else if fully {
            // A use (of the campaign, by the member, of a coupon) comes back with the
            // whole receipt.
            claim.amount
        } else {
            0
        };
        if amount > 0 {
            releases.push(claim.give_back(amount));
        }
    }
    if let Some(m) = &p.evaluation.member
        && refunded_net > Decimal::ZERO
    {
        releases.push(Claim {
            counter: tier::spend_counter(&m.member_id, p.month),
            amount: -cents(refunded_net),
            limit: 0,
        });
    }
    Ok(Refund {
        refund_id: refund_id.to_string(),
        fingerprint,
        lines,
        refunded_amount,
        reverse_points,
        give_back_points,
        reverse_bonus,
        releases,
        outcome: None,
        refunded_at: 0,
    })
}

/// (category, brand) of each line's product, and the store as it was at the purchase.
async fn catalog_of(store: &dyn PromotionStore, p: &Purchase) -> Result<Catalog> {
    let skus: Vec<String> = p.receipt.lines.iter().map(|l| l.sku.clone()).collect();
    let ctx = store
        .checkout_context(&p.receipt.tenant_id, &p.receipt.store_id, &skus, &[])
        .await?;
    Ok(Catalog {
        lines: ctx
            .products
            .into_iter()
            .map(|product| product.map(|p| (p.category, p.brand)).unwrap_or_default())
            .collect(),
        store: p.store.clone(),
    })
}

/// The events a stored purchase published: its purchase event once committed, and one per
/// settled refund. What other services rebuild their view of purchases from.
pub async fn stored_events(
    store: &dyn PromotionStore,
    p: &Purchase,
) -> Result<(Option<PurchaseEvent>, Vec<RefundEvent>)> {
    let PurchaseState::Committed {
        commit_time,
        points_balance,
    } = p.state
    else {
        return Ok((None, Vec::new()));
    };
    let catalog = catalog_of(store, p).await?;
    let refunds = p
        .refunds
        .iter()
        .filter(|r| r.outcome.is_some())
        .map(|r| refund_event(p, r, &catalog, r.refunded_at))
        .collect();
    Ok((
        Some(purchase_event(p, &catalog, commit_time, points_balance)),
        refunds,
    ))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Mutex;

    use loyalty_platform::clock::{ManualClock, Millis};
    use loyalty_platform::types::Channel;

    use super::*;
    use crate::catalog::{Product, Store};
    use crate::ports::{Held, Redeemed, Reversal};
    use crate::receipt::{Identification, Line};
    use crate::store::embedded::EmbeddedPromotionStore;

    #[derive(Debug)]
    struct OneMember;

    #[async_trait::async_trait]
    impl Members for OneMember {
        async fn resolve(
            &self,
            _: &str,
            id: &Identification,
            _: bool,
        ) -> Result<Option<crate::ports::Resolved>> {
            Ok(
                (*id != Identification::None).then(|| crate::ports::Resolved {
                    member_id: "m1".to_string(),
                    ..Default::default()
                }),
            )
        }
        async fn ping(&self) -> Result<()> {
            Ok(())
        }
    }

    /// A ledger with scripted trouble: points that vanish before a redemption (a concurrent
    /// spend elsewhere) and accruals that fail (a crash).
    #[derive(Debug, Default)]
    struct Ledger {
        state: Mutex<LedgerState>,
    }

    #[derive(Debug, Default)]
    struct LedgerState {
        active: i64,
        vanish_before_redeem: i64,
        accrual_failures: u32,
        /// Receipts whose accruals fail every time.
        accrual_refused: std::collections::HashSet<String>,
        confirm_failures: u32,
        reverse_failures: u32,
        done: HashMap<String, i64>,
        applied: Vec<(String, i64)>,
        /// Hold id → the hold (its points are out of `active` while it is open).
        holds: HashMap<String, Held>,
        /// Keys used by confirmations (the others in `done` by other operations).
        confirmed: std::collections::HashSet<String>,
    }

    impl Ledger {
        fn place_hold(&self, hold_id: &str, member_id: &str, amount: i64) {
            let mut s = self.state.lock().unwrap();
            s.active -= amount;
            let held = Held {
                member_id: member_id.into(),
                amount,
                state: HoldState::Open,
            };
            s.holds.insert(hold_id.into(), held);
        }

        /// Times a hold out (or cancels it): its points return.
        fn end_hold(&self, hold_id: &str, state: HoldState) {
            let mut s = self.state.lock().unwrap();
            let hold = s.holds.get_mut(hold_id).unwrap();
            hold.state = state;
            let amount = hold.amount;
            s.active += amount;
        }
    }

    #[async_trait::async_trait]
    impl Points for Ledger {
        async fn available(&self, _: &str, _: &str) -> Result<i64> {
            Ok(self.state.lock().unwrap().active)
        }
        async fn accrue(
            &self,
            _: &str,
            _: &str,
            key: &str,
            amount: i64,
            receipt_id: &str,
            _: Millis,
            _: Option<Millis>,
        ) -> Result<i64> {
            let mut s = self.state.lock().unwrap();
            if s.accrual_failures > 0 {
                s.accrual_failures -= 1;
                return Err(Error::Unavailable("balance is restarting".into()));
            }
            if s.accrual_refused.contains(receipt_id) {
                return Err(Error::FailedPrecondition("the member is blocked".into()));
            }
            if !s.done.contains_key(key) {
                s.done.insert(key.into(), amount);
                s.applied.push((key.into(), amount));
                s.active += amount;
            }
            Ok(s.active)
        }
        async fn redeem(
            &self,
            _: &str,
            _: &str,
            key: &str,
            amount: i64,
            _: &str,
        ) -> Result<Redeemed> {
            let mut s = self.state.lock().unwrap();
            if s.confirmed.contains(key) {
                return Err(Error::AlreadyExists(format!("{key} confirmed a hold")));
            }
            if let Some(taken) = s.done.get(key) {
                return Ok(Redeemed {
                    amount: *taken,
                    active_after: s.active,
                });
            }
            s.active -= std::mem::take(&mut s.vanish_before_redeem);
            let take = amount.min(s.active);
            s.active -= take;
            s.done.insert(key.into(), take);
            s.applied.push((key.into(), -take));
            Ok(Redeemed {
                amount: take,
                active_after: s.active,
            })
        }
        async fn hold(&self, _: &str, hold_id: &str) -> Result<Held> {
            let s = self.state.lock().unwrap();
            s.holds
                .get(hold_id)
                .cloned()
                .ok_or_else(|| Error::NotFound(format!("hold {hold_id} not found")))
        }
        async fn confirm_hold(
            &self,
            _: &str,
            hold_id: &str,
            key: &str,
            amount: i64,
        ) -> Result<Redeemed> {
            let mut s = self.state.lock().unwrap();
            if s.confirm_failures > 0 {
                s.confirm_failures -= 1;
                return Err(Error::Unavailable("balance is restarting".into()));
            }
            if let Some(taken) = s.done.get(key) {
                if !s.confirmed.contains(key) {
                    return Err(Error::AlreadyExists(format!("{key} redeemed")));
                }
                return Ok(Redeemed {
                    amount: *taken,
                    active_after: s.active,
                });
            }
            let hold = s.holds.get_mut(hold_id).unwrap();
            if hold.state != HoldState::Open || amount > hold.amount {
                return Err(Error::FailedPrecondition("hold not open".into()));
            }
            hold.state = HoldState::Confirmed;
            let rest = hold.amount - amount;
            s.active += rest;
            s.confirmed.insert(key.into());
            s.done.insert(key.into(), amount);
            s.applied.push((key.into(), -amount));
            Ok(Redeemed {
                amount,
                active_after: s.active,
            })
        }
        async fn cancel_hold(&self, _: &str, hold_id: &str, key: &str) -> Result<()> {
            let mut s = self.state.lock().unwrap();
            let hold = s.holds.get_mut(hold_id).unwrap();
            if hold.state == HoldState::Confirmed {
                return Err(Error::FailedPrecondition("hold already confirmed".into()));
            }
            if hold.state == HoldState::Open {
                hold.state = HoldState::Cancelled;
                let amount = hold.amount;
                s.active += amount;
                s.applied.push((key.into(), 0));
            }
            Ok(())
        }
        async fn reverse(
            &self,
            _: &str,
            _: &str,
            key: &str,
            _: &str,
            amount: i64,
            _: &str,
        ) -> Result<Reversal> {
            let mut s = self.state.lock().unwrap();
            if s.reverse_failures > 0 {
                s.reverse_failures -= 1;
                return Err(Error::Unavailable("balance is restarting".into()));
            }
            if !s.done.contains_key(key) {
                s.done.insert(key.into(), amount);
                s.applied.push((key.into(), amount));
                s.active += amount;
            }
            Ok(Reversal {
                taken: amount,
                unrecovered: 0,
                active_after: s.active,
            })
        }
        async fn ping(&self) -> Result<()> {
            Ok(())
        }
    }

    async fn checkout(ledger: Arc<Ledger>) -> (tempfile::TempDir, Checkout) {
        let (dir, checkout, _) = checkout_at(ledger, ManualClock::at(1_000)).await;
        (dir, checkout)
    }

    async fn checkout_at(
        ledger: Arc<Ledger>,
        manual: ManualClock,
    ) -> (tempfile::TempDir, Checkout, ManualClock) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(EmbeddedPromotionStore::open(&dir.path().join("p.redb")).unwrap());
        store
            .update_program(Program::case_study("t", "KZT"), 0)
            .await
            .unwrap();
        let s = Store {
            store_id: "s".into(),
            name: String::new(),
            brand: String::new(),
            region: String::new(),
            time_zone: String::new(),
        };
        store.upsert_stores("t", &[s]).await.unwrap();
        let p = Product {
            sku: "boots".into(),
            name: String::new(),
            category: String::new(),
            brand: String::new(),
        };
        store.upsert_products("t", &[p]).await.unwrap();
        let clock: SharedClock = Arc::new(manual.clone());
        (
            dir,
            Checkout::new(
                store,
                Arc::new(OneMember),
                ledger,
                Arc::new(crate::ports::NoSegments),
                Arc::new(crate::events::NoEvents),
                clock,
            ),
            manual,
        )
    }

    fn receipt(points: i64) -> Receipt {
        Receipt {
            tenant_id: "t".into(),
            receipt_id: "r1".into(),
            store_id: "s".into(),
            channel: Channel::Store,
            terminal_id: String::new(),
            cashier_id: String::new(),
            identification: Identification::Card("12345678".into()),
            lines: vec![Line {
                line_id: "1".into(),
                sku: "boots".into(),
                quantity: Decimal::ONE,
                unit_price: Decimal::from(1000),
                sale_price: false,
            }],
            codes: Vec::new(),
            points_to_redeem: points,
            purchase_time: None,
        }
    }

    #[tokio::test]
    async fn the_history_replays_every_receipt_and_refund_once() {
        use loyalty_platform::replay::EventSource;
        use loyalty_proto::events::v1 as pb;
        use prost::Message;

        let ledger = Arc::new(Ledger::default());
        let (_dir, checkout) = checkout(ledger).await;
        let mut want = Vec::new();
        for n in 0..7 {
            let mut r = receipt(0);
            r.receipt_id = format!("r{n}");
            r.lines[0].quantity = Decimal::from(2);
            checkout.commit(r, None).await.unwrap();
            want.push(format!("purchase/t/r{n}"));
        }
        for (receipt, refund) in [("r2", "x1"), ("r2", "x2"), ("r5", "x1")] {
            let line = [("1".to_string(), "1".to_string())];
            checkout.refund("t", receipt, refund, &line).await.unwrap();
            want.push(format!("refund/t/{receipt}/{refund}"));
        }

        let replay = crate::publish::PurchaseReplay(checkout.store().clone());
        let mut got = Vec::new();
        let mut cursor = Vec::new();
        loop {
            let page = replay.page(&cursor, 2).await.unwrap();
            // A receipt's events spread over pages (r2 has three).
            assert!(page.events.len() <= 2, "{} events", page.events.len());
            got.extend(
                page.events
                    .iter()
                    .map(|e| pb::Event::decode(e.as_slice()).unwrap().event_id),
            );
            match page.next {
                Some(next) => cursor = next,
                None => break,
            }
        }
        want.sort();
        let mut sorted = got.clone();
        sorted.sort();
        assert_eq!(sorted, want, "each once: {got:?}");
        let refunds_of_r2 = got.iter().position(|e| e == "refund/t/r2/x1").unwrap();
        assert_eq!(
            got[refunds_of_r2 - 1..refunds_of_r2 + 2],
            ["purchase/t/r2", "refund/t/r2/x1", "refund/t/r2/x2"],
            "in the order they were published"
        );
    }

    #[tokio::test]
    async fn points_that_vanish_before_commit_are_repriced_not_failed() {
        let ledger = Arc::new(Ledger::default());
        ledger.state.lock().unwrap().active = 100_000;
        ledger.state.lock().unwrap().vanish_before_redeem = 95_000;
        let (_dir, checkout) = checkout(ledger.clone()).await;
        let c = checkout.commit(receipt(20_000), None).await.unwrap();
        assert_eq!(
            c.evaluation.points_redeemed, 5_000,
            "only 50 points were left"
        );
        assert_eq!(c.evaluation.paid_with_points, Decimal::from(50));
        assert_eq!(
            c.evaluation.points_accrued, 950,
            "1% of the 950 paid in money"
        );
        assert_eq!(
            checkout.commit(receipt(20_000), None).await.unwrap(),
            c,
            "a retry agrees"
        );
        let applied = ledger.state.lock().unwrap().applied.clone();
        assert_eq!(
            applied,
            [
                ("receipt:r1:redeem".to_string(), -5_000),
                ("receipt:r1:accrue".to_string(), 950)
            ]
        );
    }

    #[tokio::test]
    async fn a_receipt_redeems_from_its_hold_and_the_rest_returns() {
        let ledger = Arc::new(Ledger::default());
        ledger.state.lock().unwrap().active = 100_000;
        ledger.place_hold("h1", "m1", 15_000);
        let (_dir, checkout) = checkout(ledger.clone()).await;
        let quoted = checkout.quote(receipt(50_000), Some("h1")).await.unwrap();
        assert_eq!(quoted.member.as_ref().unwrap().points_available, 15_000);
        assert_eq!(
            quoted.points_redeemed, 15_000,
            "at most what the hold reserves"
        );

        let c = checkout.commit(receipt(10_000), Some("h1")).await.unwrap();
        assert_eq!(c.evaluation.points_redeemed, 10_000);
        assert_eq!(
            c.points_balance,
            Some(100_000 - 10_000 + 900),
            "the rest of the hold is back"
        );
        assert_eq!(
            ledger.state.lock().unwrap().holds["h1"].state,
            HoldState::Confirmed
        );
        assert_eq!(
            checkout.commit(receipt(10_000), Some("h1")).await.unwrap(),
            c
        );
        let err = checkout.commit(receipt(10_000), None).await.unwrap_err();
        assert!(
            matches!(err, Error::AlreadyExists(_)),
            "the hold is part of the receipt: {err:?}"
        );
        let applied = ledger.state.lock().unwrap().applied.clone();
        assert_eq!(
            applied,
            [
                ("receipt:r1:redeem".to_string(), -10_000),
                ("receipt:r1:accrue".to_string(), 900)
            ]
        );
    }

    #[tokio::test]
    async fn a_hold_must_be_the_members_and_open() {
        let ledger = Arc::new(Ledger::default());
        ledger.state.lock().unwrap().active = 100_000;
        ledger.place_hold("theirs", "m2", 10_000);
        ledger.place_hold("gone", "m1", 10_000);
        ledger.end_hold("gone", HoldState::Expired);
        let (_dir, checkout) = checkout(ledger.clone()).await;
        for (hold, says) in [("theirs", "another member's points"), ("gone", "expired")] {
            let err = checkout
                .commit(receipt(5_000), Some(hold))
                .await
                .unwrap_err();
            assert!(
                matches!(&err, Error::FailedPrecondition(m) if m.contains(says)),
                "{hold}: {err:?}"
            );
        }
        let err = checkout
            .commit(receipt(5_000), Some("none"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::NotFound(_)), "{err:?}");
        let mut anonymous = receipt(0);
        anonymous.identification = Identification::None;
        let err = checkout.quote(anonymous, Some("gone")).await.unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert!(ledger.state.lock().unwrap().applied.is_empty());
        assert!(
            checkout.purchase("t", "r1").await.is_err(),
            "nothing written"
        );
    }

    #[tokio::test]
    async fn a_hold_that_ends_while_its_receipt_is_pending_redeems_from_the_balance() {
        let ledger = Arc::new(Ledger::default());
        ledger.state.lock().unwrap().active = 100_000;
        ledger.state.lock().unwrap().confirm_failures = 1;
        ledger.place_hold("h1", "m1", 30_000);
        let (_dir, checkout) = checkout(ledger.clone()).await;
        let err = checkout
            .commit(receipt(20_000), Some("h1"))
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Unavailable(_)), "{err:?}");
        let pending = checkout.purchase("t", "r1").await.unwrap();
        assert_eq!(pending.state.hold_id(), Some("h1"));

        // The hold times out; the retry redeems from the balance and fails on the accrual;
        // the next finds the redemption done under its key.
        ledger.end_hold("h1", HoldState::Expired);
        ledger.state.lock().unwrap().accrual_failures = 1;
        assert!(checkout.commit(receipt(20_000), Some("h1")).await.is_err());
        let c = checkout.commit(receipt(20_000), Some("h1")).await.unwrap();
        assert_eq!(c.evaluation.points_redeemed, 20_000);
        assert_eq!(c.points_balance, Some(100_000 - 20_000 + 800));
        let applied = ledger.state.lock().unwrap().applied.clone();
        assert_eq!(
            applied,
            [
                ("receipt:r1:redeem".to_string(), -20_000),
                ("receipt:r1:accrue".to_string(), 800)
            ]
        );
    }

    #[tokio::test]
    async fn a_hold_cancelled_while_its_receipt_is_pending_pays_nothing_and_serves_one_receipt() {
        let ledger = Arc::new(Ledger::default());
        ledger.state.lock().unwrap().active = 100_000;
        ledger.state.lock().unwrap().confirm_failures = 1;
        ledger.place_hold("h1", "m1", 30_000);
        let (_dir, checkout, clock) = checkout_at(ledger.clone(), ManualClock::at(1_000)).await;
        assert!(checkout.commit(receipt(20_000), Some("h1")).await.is_err());
        // Another receipt cannot name the same hold while the first is pending on it.
        let mut second = receipt(20_000);
        second.receipt_id = "r2".into();
        let err = checkout.commit(second, Some("h1")).await.unwrap_err();
        assert!(
            matches!(&err, Error::FailedPrecondition(m) if m.contains("another receipt")),
            "{err:?}"
        );
        assert!(checkout.purchase("t", "r2").await.is_err());

        // The till gives up and cancels the hold; the stale commit is finished later,
        // without the points the hold no longer reserves.
        ledger.end_hold("h1", HoldState::Cancelled);
        clock.advance(60_000);
        assert_eq!(checkout.repair_stale(30_000, 10).await.unwrap(), 1);
        let p = checkout.purchase("t", "r1").await.unwrap();
        assert!(!p.state.is_pending());
        assert_eq!(p.evaluation.points_redeemed, 0);
        assert_eq!(
            p.evaluation.points_accrued, 1_000,
            "1% of the whole 1,000 paid"
        );
        let s = ledger.state.lock().unwrap();
        assert_eq!(s.active, 100_000 + 1_000);
        assert_eq!(s.applied, [("receipt:r1:accrue".to_string(), 1_000)]);
    }

    #[tokio::test]
    async fn a_receipt_that_redeems_nothing_returns_its_hold() {
        let ledger = Arc::new(Ledger::default());
        ledger.state.lock().unwrap().active = 100_000;
        ledger.place_hold("h1", "m1", 30_000);
        let (_dir, checkout) = checkout(ledger.clone()).await;
        let c = checkout.commit(receipt(0), Some("h1")).await.unwrap();
        assert_eq!(c.evaluation.points_redeemed, 0);
        assert_eq!(c.points_balance, Some(100_000 + 1_000));
        assert_eq!(
            ledger.state.lock().unwrap().holds["h1"].state,
            HoldState::Cancelled
        );
    }

    #[tokio::test]
    async fn a_crash_between_redeem_and_accrue_is_repaired_by_the_retry() {
        let ledger = Arc::new(Ledger::default());
        ledger.state.lock().unwrap().active = 100_000;
        ledger.state.lock().unwrap().accrual_failures = 2;
        let (_dir, checkout) = checkout(ledger.clone()).await;
        assert!(matches!(
            checkout.commit(receipt(20_000), None).await,
            Err(Error::Unavailable(_))
        ));
        assert!(matches!(
            checkout.commit(receipt(20_000), None).await,
            Err(Error::Unavailable(_))
        ));
        let pending = checkout.purchase("t", "r1").await.unwrap();
        assert_eq!(pending.state, PurchaseState::Pending);
        let err = checkout
            .refund("t", "r1", "f1", &[("1".into(), "1".into())])
            .await
            .unwrap_err();
        assert!(
            matches!(err, Error::FailedPrecondition(_)),
            "no refund before the commit finished"
        );

        let c = checkout.commit(receipt(20_000), None).await.unwrap();
        assert_eq!(
            (c.evaluation.points_redeemed, c.evaluation.points_accrued),
            (20_000, 800)
        );
        assert_eq!(c.points_balance, Some(100_000 - 20_000 + 800));
        let applied = ledger.state.lock().unwrap().applied.clone();
        assert_eq!(applied.len(), 2, "each effect exactly once: {applied:?}");
        let mut other = receipt(20_000);
        other.points_to_redeem = 1;
        assert!(matches!(
            checkout.commit(other, None).await,
            Err(Error::AlreadyExists(_))
        ));
    }

    #[tokio::test]
    async fn a_commit_its_caller_never_retried_is_finished_by_the_repair() {
        let ledger = Arc::new(Ledger::default());
        ledger.state.lock().unwrap().active = 100_000;
        ledger.state.lock().unwrap().accrual_failures = 1;
        let (_dir, checkout, clock) = checkout_at(ledger.clone(), ManualClock::at(1_000)).await;
        assert!(checkout.commit(receipt(20_000), None).await.is_err());
        assert_eq!(
            checkout.repair_stale(60_000, 100).await.unwrap(),
            0,
            "too young"
        );
        clock.advance(120_000);
        assert_eq!(checkout.repair_stale(60_000, 100).await.unwrap(), 1);
        let p = checkout.purchase("t", "r1").await.unwrap();
        assert!(matches!(p.state, PurchaseState::Committed { .. }));
        let applied = ledger.state.lock().unwrap().applied.clone();
        assert_eq!(
            applied.len(),
            2,
            "redeemed and accrued once each: {applied:?}"
        );
        assert_eq!(
            checkout.repair_stale(60_000, 100).await.unwrap(),
            0,
            "nothing left"
        );
        // A late retry by the till gets the same answer and moves nothing more.
        let c = checkout.commit(receipt(20_000), None).await.unwrap();
        assert_eq!(c.evaluation.points_accrued, 800);
        assert_eq!(ledger.state.lock().unwrap().applied.len(), 2);
    }

    #[tokio::test]
    async fn commits_that_keep_failing_do_not_hold_the_repair_back() {
        let ledger = Arc::new(Ledger::default());
        let (_dir, checkout, clock) = checkout_at(ledger.clone(), ManualClock::at(1_000)).await;
        ledger.state.lock().unwrap().accrual_refused = ["r1", "r2", "r3"].map(String::from).into();
        for (id, at) in [("r1", 0), ("r2", 10), ("r3", 10)] {
            clock.advance(at);
            let mut r = receipt(0);
            r.receipt_id = id.into();
            assert!(checkout.commit(r, None).await.is_err());
        }
        clock.advance(120_000);
        // r1 and r2 never succeed; r3, the newest, is still reached with two a round.
        ledger.state.lock().unwrap().accrual_refused.remove("r3");
        let mut finished = 0;
        for _ in 0..2 {
            finished += checkout.repair_stale(60_000, 2).await.unwrap();
        }
        assert_eq!(finished, 1);
        let done = |id: &'static str| {
            let checkout = checkout.clone();
            async move { !checkout.purchase("t", id).await.unwrap().state.is_pending() }
        };
        assert!(done("r3").await);
        assert!(!done("r1").await && !done("r2").await);
        // Rounds go on from the oldest again: r2, once it can be finished, is.
        ledger.state.lock().unwrap().accrual_refused.remove("r2");
        let mut finished = 0;
        for _ in 0..2 {
            finished += checkout.repair_stale(60_000, 2).await.unwrap();
        }
        assert_eq!(finished, 1);
        assert!(done("r2").await && !done("r1").await);
    }

    #[tokio::test]
    async fn partial_refunds_follow_the_receipts_program_not_todays() {
        let ledger = Arc::new(Ledger::default());
        ledger.state.lock().unwrap().active = 100_000;
        let (_dir, checkout) = checkout(ledger.clone()).await;
        let mut r = receipt(20_000);
        r.lines[0].quantity = Decimal::from(2);
        let c = checkout.commit(r, None).await.unwrap();
        assert!(c.evaluation.points_redeemed > 0);
        let line = [("1".to_string(), "1".to_string())];
        let first = checkout.refund("t", "r1", "f1", &line).await.unwrap();
        assert!(first.outcome.points_returned > 0);

        // The chain stops giving redeemed points back; the receipt keeps its terms.
        let mut program = checkout.store().program("t").await.unwrap().unwrap();
        program.refund_returns_redeemed_points = false;
        checkout.store().update_program(program, 0).await.unwrap();
        let second = checkout.refund("t", "r1", "f2", &line).await.unwrap();
        assert_eq!(
            second.outcome.points_returned, first.outcome.points_returned,
            "both halves alike"
        );
    }

    #[tokio::test]
    async fn a_refund_whose_points_did_not_move_is_finished_by_the_repair() {
        let ledger = Arc::new(Ledger::default());
        ledger.state.lock().unwrap().active = 100_000;
        let (_dir, checkout, clock) = checkout_at(ledger.clone(), ManualClock::at(1_000)).await;
        let c = checkout.commit(receipt(0), None).await.unwrap();
        assert_eq!(c.evaluation.points_accrued, 1_000);
        ledger.state.lock().unwrap().reverse_failures = 1;
        let line = [("1".to_string(), "1".to_string())];
        assert!(matches!(
            checkout.refund("t", "r1", "f1", &line).await,
            Err(Error::Unavailable(_))
        ));
        // Accepted (its quantity counts), its points not moved: the till gave up on it.
        let p = checkout.purchase("t", "r1").await.unwrap();
        assert_eq!(p.refunds.len(), 1);
        assert_eq!(p.refunds[0].outcome, None);
        assert!(
            checkout.refund("t", "r1", "f2", &line).await.is_err(),
            "the line is refunded already"
        );
        assert_eq!(
            checkout.repair_stale(60_000, 100).await.unwrap(),
            0,
            "too young"
        );

        clock.advance(120_000);
        assert_eq!(checkout.repair_stale(60_000, 100).await.unwrap(), 1);
        let p = checkout.purchase("t", "r1").await.unwrap();
        let outcome = p.refunds[0].outcome.expect("settled by the repair");
        assert_eq!(outcome.points_reversed, 1_000);
        let reversals = |ledger: &Ledger| {
            ledger
                .state
                .lock()
                .unwrap()
                .applied
                .iter()
                .filter(|(k, _)| k.contains(":refund:"))
                .count()
        };
        assert_eq!(reversals(&ledger), 1);
        assert_eq!(
            checkout.repair_stale(60_000, 100).await.unwrap(),
            0,
            "nothing left"
        );
        // The till's late retry gets the same answer and moves nothing more.
        let again = checkout.refund("t", "r1", "f1", &line).await.unwrap();
        assert_eq!(again.outcome, outcome);
        assert_eq!(reversals(&ledger), 1);
    }

    #[tokio::test]
    async fn an_unidentified_receipt_commits_in_one_write_and_replays() {
        let ledger = Arc::new(Ledger::default());
        let (_dir, checkout) = checkout(ledger.clone()).await;
        let mut r = receipt(0);
        r.identification = Identification::None;
        let c = checkout.commit(r.clone(), None).await.unwrap();
        assert_eq!((c.evaluation.points_accrued, c.points_balance), (0, None));
        let stored = checkout.purchase("t", "r1").await.unwrap();
        assert_eq!(stored.version, 1, "written once, already committed");
        assert!(matches!(stored.state, PurchaseState::Committed { .. }));
        assert_eq!(checkout.commit(r, None).await.unwrap(), c);
        assert!(ledger.state.lock().unwrap().applied.is_empty());
    }

    #[tokio::test]
    async fn refunds_per_receipt_are_bounded() {
        let ledger = Arc::new(Ledger::default());
        let (_dir, checkout) = checkout(ledger).await;
        let mut r = receipt(0);
        r.lines[0].quantity = Decimal::from(1000);
        checkout.commit(r, None).await.unwrap();
        for i in 0..MAX_REFUNDS_PER_RECEIPT {
            checkout
                .refund("t", "r1", &format!("f{i}"), &[("1".into(), "1".into())])
                .await
                .unwrap();
        }
        let err = checkout
            .refund("t", "r1", "one-more", &[("1".into(), "1".into())])
            .await
            .unwrap_err();
        assert!(matches!(err, Error::FailedPrecondition(_)), "{err}");
    }
}
