//! Provisioning and the two load drivers.
//!
//! Open loop sends at the scheduled times whatever the target does and measures each call
//! from the time it was *due*, so a slow target cannot hide its queueing (no coordinated
//! omission). Closed loop runs a fixed number of workers back to back.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use loyalty_proto::common::v1::Decimal;
use loyalty_proto::{
    balance::v1 as bpb, identity::v1 as ipb, promotion::v1 as ppb, segmentation::v1 as spb,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::metadata::{AsciiMetadataKey, AsciiMetadataValue};
use tonic::transport::Channel;
use tonic::{Code, Request, Status};

use crate::keys::{Caller, Credentials};
use crate::model::{Model, ReceiptSpec, member_birthday, member_card, member_phone, money};
use crate::stats::{Rpc, Stats};

/// The service an RPC belongs to, for routing to per-service targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Service {
    Identity,
    Balance,
    Promotion,
    Segmentation,
}

impl Service {
    pub const ALL: [Service; 4] = [
        Service::Identity,
        Service::Balance,
        Service::Promotion,
        Service::Segmentation,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Service::Identity => "identity",
            Service::Balance => "balance",
            Service::Promotion => "promotion",
            Service::Segmentation => "segmentation",
        }
    }
}

/// Channels to the targets and headers sent with every call. A service with targets of its
/// own (`--target identity=URL`) is called there; every other service on the shared targets.
/// Several targets for one service are used round-robin.
#[derive(Debug, Clone)]
pub struct Clients {
    shared: Vec<Channel>,
    per_service: Arc<BTreeMap<Service, Vec<Channel>>>,
    next: Arc<AtomicUsize>,
    headers: Arc<Vec<(AsciiMetadataKey, AsciiMetadataValue)>>,
    credentials: Arc<Credentials>,
}

impl Clients {
    pub fn new(
        shared: Vec<Channel>,
        per_service: BTreeMap<Service, Vec<Channel>>,
        headers: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
    ) -> Self {
        Self {
            shared,
            per_service: Arc::new(per_service),
            next: Arc::new(AtomicUsize::new(0)),
            headers: Arc::new(headers),
            credentials: Arc::new(Credentials::default()),
        }
    }

    /// The same targets, presenting `credentials`.
    pub fn with_credentials(&self, credentials: Credentials) -> Self {
        Self {
            credentials: Arc::new(credentials),
            ..self.clone()
        }
    }

    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    pub(crate) fn channel(&self, service: Service) -> Channel {
        let pool = self
            .per_service
            .get(&service)
            .filter(|c| !c.is_empty())
            .unwrap_or(&self.shared);
        let i = self.next.fetch_add(1, Ordering::Relaxed) % pool.len().max(1);
        pool[i].clone()
    }

    /// A request made as the operator (provisioning).
    pub(crate) fn request<T>(&self, message: T) -> Request<T> {
        self.request_as(message, Caller::Admin)
    }

    fn request_as<T>(&self, message: T, caller: Caller) -> Request<T> {
        let mut r = Request::new(message);
        for (k, v) in self.headers.iter() {
            r.metadata_mut().insert(k.clone(), v.clone());
        }
        if let Some(value) = self.credentials.value(caller) {
            r.metadata_mut().insert("authorization", value.clone());
        }
        r
    }
}

fn dec(s: String) -> Option<Decimal> {
    Some(Decimal { value: s })
}

/// Creates the tenant's program, stores and products (unless `members_only`), then its
/// members and cards. Idempotent: members and cards that exist are looked up, so a second
/// run reuses them. Returns the member ids by model index.
pub async fn setup(
    model: &Model,
    clients: &Clients,
    concurrency: usize,
    members_only: bool,
) -> anyhow::Result<Vec<String>> {
    if !members_only {
        setup_program_and_catalog(model, clients).await?;
    }
    setup_members(model, clients, concurrency).await
}

/// A few dynamic segments of the kind chains target, so membership lookups answer something.
const SEGMENTS: [(&str, &str); 3] = [
    ("active-30d", "purchase_count_30d > 0"),
    ("regulars", "purchase_count_365d >= 3"),
    ("big-spenders", "spend_365d > 100000"),
];

async fn setup_segments(model: &Model, clients: &Clients) -> anyhow::Result<()> {
    let mut client = spb::segmentation_service_client::SegmentationServiceClient::new(
        clients.channel(Service::Segmentation),
    );
    for (id, predicate) in SEGMENTS {
        let created = client
            .create_segment(clients.request(spb::CreateSegmentRequest {
                segment: Some(spb::Segment {
                    tenant_id: model.config.tenant.clone(),
                    segment_id: id.into(),
                    name: id.into(),
                    kind: spb::SegmentKind::Dynamic as i32,
                    predicate: predicate.into(),
                    ..Default::default()
                }),
            }))
            .await;
        match created {
            Ok(_) => {}
            Err(status) if status.code() == tonic::Code::AlreadyExists => {}
            Err(status) => anyhow::bail!("creating segment {id}: {status}"),
        }
    }
    Ok(())
}

fn pct(value: &str) -> Option<Decimal> {
    dec(value.to_string())
}

fn percent_step(from: &str, percent: &str) -> ppb::DiscountStep {
    ppb::DiscountStep {
        from_value: pct(from),
        benefit: Some(ppb::discount_step::Benefit::Percent(Decimal {
            value: percent.into(),
        })),
    }
}

/// The promo code receipts present (`promo_share`).
pub const PROMO_CODE: &str = "11.11";
/// The campaign whose coupons commits present (`coupon_share`).
pub const COUPON_CAMPAIGN: &str = "coupon-15";

/// The campaigns of the model: `model.config.campaigns` over the categories, in two stacking
/// groups, a third of them for a few stores only and some with budgets; then a birthday
/// boost, the promo code and the coupon campaign. Idempotent.
fn campaigns(model: &Model) -> (Vec<ppb::StackingGroup>, Vec<ppb::Campaign>) {
    let tenant = model.config.tenant.clone();
    let group = |id: &str, mode: ppb::StackingMode, priority: i32| ppb::StackingGroup {
        tenant_id: tenant.clone(),
        group_id: id.into(),
        name: id.into(),
        mode: mode as i32,
        priority,
        max_discount_percent: pct("30"),
    };
    let groups = vec![
        group("discounts", ppb::StackingMode::ExclusiveBest, 1),
        group("accrual", ppb::StackingMode::Stackable, 2),
    ];
    let category = |i: usize| ppb::ProductScope {
        categories: vec![format!("category-{:03}", i % model.config.categories)],
        ..Default::default()
    };
    use ppb::campaign::Mechanic as M;
    let mut list: Vec<ppb::Campaign> = (0..model.config.campaigns)
        .map(|i| {
            // Mostly boosts and discounts on categories; one in twenty a fixed bonus.
            let kind = if i % 20 == 19 {
                4
            } else {
                [0, 1, 2, 3, 5, 1, 2, 0, 5, 3][i % 10]
            };
            let (mechanic, group) = match kind {
                0 => (
                    M::AccrualBoost(ppb::AccrualBoost {
                        scope: Some(category(i)),
                        accrual_percent: pct("3"),
                        multiplier: None,
                    }),
                    "accrual",
                ),
                1 => (
                    M::ThresholdDiscount(ppb::ThresholdDiscount {
                        scope: Some(category(i)),
                        steps: vec![percent_step("5000", "5"), percent_step("20000", "10")],
                    }),
                    "discounts",
                ),
                2 => (
                    M::QuantityDiscount(ppb::QuantityDiscount {
                        scope: Some(category(i)),
                        steps: vec![percent_step("2", "7")],
                    }),
                    "discounts",
                ),
                3 => (
                    M::NForM(ppb::NForM {
                        scope: Some(category(i)),
                        n: 3,
                        m: 2,
                    }),
                    "",
                ),
                4 => (
                    M::FixedBonus(ppb::FixedBonus {
                        points: 500,
                        activation_delay_days: 0,
                        lifetime_days: 7,
                    }),
                    "accrual",
                ),
                _ => (
                    M::AccrualBoost(ppb::AccrualBoost {
                        scope: Some(category(i)),
                        accrual_percent: None,
                        multiplier: pct("2"),
                    }),
                    "accrual",
                ),
            };
            let mut targeting = ppb::Targeting::default();
            if i % 3 == 2 {
                targeting.store_ids = model
                    .stores
                    .iter()
                    .skip(i % model.stores.len())
                    .take(3)
                    .map(|s| s.id.clone())
                    .collect();
            }
            if kind == 4 {
                // Fixed bonuses go to regulars only.
                targeting.segment_ids = vec!["regulars".into()];
            }
            ppb::Campaign {
                tenant_id: tenant.clone(),
                campaign_id: format!("campaign-{i:04}"),
                name: format!("Campaign {i}"),
                status: ppb::CampaignStatus::Active as i32,
                stacking_group_id: group.into(),
                priority: (i % 10) as i32,
                targeting: Some(targeting),
                mechanic: Some(mechanic),
                budget: (i % 10 == 7).then(|| ppb::Budget {
                    max_uses: 10_000_000,
                    ..Default::default()
                }),
                ..Default::default()
            }
        })
        .collect();
    list.push(ppb::Campaign {
        tenant_id: tenant.clone(),
        campaign_id: "birthday-14".into(),
        name: "Birthday 14%".into(),
        status: ppb::CampaignStatus::Active as i32,
        mechanic: Some(M::BirthdayBoost(ppb::BirthdayBoost {
            accrual_percent: pct("14"),
            days_before: 2,
            days_after: 0,
        })),
        ..Default::default()
    });
    list.push(ppb::Campaign {
        tenant_id: tenant.clone(),
        campaign_id: "promo-11-11".into(),
        name: "11.11".into(),
        status: ppb::CampaignStatus::Active as i32,
        mechanic: Some(M::ExtraDiscount(ppb::ExtraDiscount {
            scope: None,
            percent: pct("11"),
        })),
        code: Some(ppb::CodeRequirement {
            kind: Some(ppb::code_requirement::Kind::PromoCode(PROMO_CODE.into())),
        }),
        ..Default::default()
    });
    list.push(ppb::Campaign {
        tenant_id: tenant,
        campaign_id: COUPON_CAMPAIGN.into(),
        name: "Coupon 15%".into(),
        status: ppb::CampaignStatus::Active as i32,
        mechanic: Some(M::ThresholdDiscount(ppb::ThresholdDiscount {
            scope: None,
            steps: vec![percent_step("0", "15")],
        })),
        code: Some(ppb::CodeRequirement {
            kind: Some(ppb::code_requirement::Kind::Coupons(ppb::CouponPolicy {
                max_uses: 1,
                member_bound: false,
            })),
        }),
        ..Default::default()
    });
    (groups, list)
}

async fn setup_campaigns(model: &Model, clients: &Clients) -> anyhow::Result<()> {
    let mut client = ppb::campaign_service_client::CampaignServiceClient::new(
        clients.channel(Service::Promotion),
    );
    let (groups, list) = campaigns(model);
    for g in groups {
        client
            .upsert_stacking_group(clients.request(ppb::UpsertStackingGroupRequest {
                group: Some(g),
                actor: None,
            }))
            .await
            .context("creating a stacking group")?;
    }
    let wanted: std::collections::HashSet<String> =
        list.iter().map(|c| c.campaign_id.clone()).collect();
    for c in list {
        let id = c.campaign_id.clone();
        match client
            .create_campaign(clients.request(ppb::CreateCampaignRequest {
                campaign: Some(c.clone()),
                actor: None,
            }))
            .await
        {
            Ok(_) => {}
            // Seeded before, perhaps from another model: this run's definition replaces it.
            Err(status) if status.code() == Code::AlreadyExists => {
                client
                    .update_campaign(clients.request(ppb::UpdateCampaignRequest {
                        campaign: Some(c),
                        expected_version: 0,
                        actor: None,
                    }))
                    .await
                    .with_context(|| format!("updating campaign {id}"))?;
            }
            Err(status) => anyhow::bail!("creating campaign {id}: {status}"),
        }
    }
    // Generated campaigns an earlier, larger seed made are archived, so a run evaluates the
    // campaigns its model names and no others.
    let mut page_token = String::new();
    let mut stale = Vec::new();
    loop {
        let page = client
            .list_campaigns(clients.request(ppb::ListCampaignsRequest {
                tenant_id: model.config.tenant.clone(),
                statuses: vec![
                    ppb::CampaignStatus::Active as i32,
                    ppb::CampaignStatus::Paused as i32,
                ],
                page_size: 1000,
                page_token,
            }))
            .await
            .context("listing campaigns")?
            .into_inner();
        stale.extend(
            page.campaigns
                .into_iter()
                .map(|c| c.campaign_id)
                .filter(|id| id.starts_with("campaign-") && !wanted.contains(id)),
        );
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    for id in stale {
        client
            .archive_campaign(clients.request(ppb::ArchiveCampaignRequest {
                tenant_id: model.config.tenant.clone(),
                campaign_id: id.clone(),
                actor: None,
            }))
            .await
            .with_context(|| format!("archiving campaign {id}"))?;
    }
    Ok(())
}

/// A fresh batch of single-use coupons for this run (none when the model wants none).
pub async fn generate_coupons(
    model: &Model,
    clients: &Clients,
    run_id: &str,
) -> anyhow::Result<Vec<String>> {
    if model.config.coupons == 0 || model.config.coupon_share == 0.0 {
        return Ok(Vec::new());
    }
    let mut client = ppb::campaign_service_client::CampaignServiceClient::new(
        clients.channel(Service::Promotion),
    );
    let reply = client
        .generate_coupons(clients.request(ppb::GenerateCouponsRequest {
            tenant_id: model.config.tenant.clone(),
            campaign_id: COUPON_CAMPAIGN.into(),
            count: i32::try_from(model.config.coupons).unwrap_or(i32::MAX),
            idempotency_key: run_id.into(),
            ..Default::default()
        }))
        .await
        .context("generating coupons")?;
    Ok(reply.into_inner().codes)
}

async fn setup_program_and_catalog(model: &Model, clients: &Clients) -> anyhow::Result<()> {
    setup_segments(model, clients).await?;
    let tenant = model.config.tenant.clone();
    let mut program =
        ppb::program_service_client::ProgramServiceClient::new(clients.channel(Service::Promotion));
    program
        .update_program(clients.request(ppb::UpdateProgramRequest {
            program: Some(ppb::Program {
                tenant_id: tenant.clone(),
                currency: "KZT".into(),
                point_minor_units: 100,
                base_accrual: Some(ppb::program::BaseAccrual::AccrualPercent(Decimal {
                    value: "1".into(),
                })),
                point_value: dec("1".into()),
                max_redeem_percent: dec("20".into()),
                sale_items_excluded_from_accrual: true,
                sale_items_excluded_from_redemption: true,
                point_lifetime_days: 180,
                refund_returns_redeemed_points: true,
                ..Default::default()
            }),
            expected_version: 0,
            actor: None,
        }))
        .await
        .context("setting the program")?;
    let mut catalog =
        ppb::catalog_service_client::CatalogServiceClient::new(clients.channel(Service::Promotion));
    for chunk in model.stores.chunks(1000) {
        let stores = chunk
            .iter()
            .map(|s| ppb::Store {
                tenant_id: tenant.clone(),
                store_id: s.id.clone(),
                name: s.id.clone(),
                brand: s.brand.clone(),
                region: s.region.clone(),
                time_zone: "Asia/Almaty".into(),
            })
            .collect();
        catalog
            .upsert_stores(clients.request(ppb::UpsertStoresRequest {
                tenant_id: tenant.clone(),
                stores,
            }))
            .await
            .context("creating stores")?;
    }
    for chunk in model.products.chunks(1000) {
        let products = chunk
            .iter()
            .map(|p| ppb::Product {
                tenant_id: tenant.clone(),
                sku: p.sku.clone(),
                name: p.sku.clone(),
                category: p.category.clone(),
                brand: p.brand.clone(),
            })
            .collect();
        catalog
            .upsert_products(clients.request(ppb::UpsertProductsRequest {
                tenant_id: tenant.clone(),
                products,
            }))
            .await
            .context("creating products")?;
    }
    setup_campaigns(model, clients).await
}

async fn setup_members(
    model: &Model,
    clients: &Clients,
    concurrency: usize,
) -> anyhow::Result<Vec<String>> {
    let tenant = model.config.tenant.clone();
    let members = model.config.members;
    let ids = Arc::new(Mutex::new(vec![String::new(); members]));
    let next = Arc::new(AtomicUsize::new(0));
    let mut workers = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (clients, ids, next, tenant) =
            (clients.clone(), ids.clone(), next.clone(), tenant.clone());
        workers.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= members {
                    return Ok::<(), anyhow::Error>(());
                }
                let id = provision_member(&clients, &tenant, i).await?;
                if let Ok(mut ids) = ids.lock() {
                    ids[i] = id;
                }
            }
        }));
    }
    for w in workers {
        w.await??;
    }
    let ids = ids
        .lock()
        .map(|ids| ids.clone())
        .map_err(|_| anyhow::anyhow!("setup state poisoned"))?;
    Ok(ids)
}

async fn provision_member(clients: &Clients, tenant: &str, i: usize) -> anyhow::Result<String> {
    let mut members =
        ipb::member_service_client::MemberServiceClient::new(clients.channel(Service::Identity));
    let registered = members
        .register_member(clients.request(ipb::RegisterMemberRequest {
            tenant_id: tenant.into(),
            phone: member_phone(i),
            ..Default::default()
        }))
        .await;
    let member_id = match registered {
        Ok(r) => {
            let member_id = r
                .into_inner()
                .member
                .map(|m| m.member_id)
                .unwrap_or_default();
            if let Some((year, month, day)) = member_birthday(i) {
                members
                    .update_profile(clients.request(ipb::UpdateProfileRequest {
                        tenant_id: tenant.into(),
                        member_id: member_id.clone(),
                        member: Some(ipb::Member {
                            birthday: Some(loyalty_proto::common::v1::Date { year, month, day }),
                            ..Default::default()
                        }),
                        update_mask: vec!["birthday".into()],
                    }))
                    .await
                    .with_context(|| format!("giving member {i} a birthday"))?;
            }
            member_id
        }
        Err(s) if s.code() == Code::AlreadyExists => members
            .lookup_member(clients.request(ipb::LookupMemberRequest {
                tenant_id: tenant.into(),
                key: Some(ipb::lookup_member_request::Key::Phone(member_phone(i))),
                default_region: String::new(),
            }))
            .await
            .with_context(|| format!("looking up member {i}"))?
            .into_inner()
            .member
            .map(|m| m.member_id)
            .unwrap_or_default(),
        Err(s) => return Err(anyhow::anyhow!("registering member {i}: {s}")),
    };
    let mut cards =
        ipb::card_service_client::CardServiceClient::new(clients.channel(Service::Identity));
    match cards
        .issue_card(clients.request(ipb::IssueCardRequest {
            tenant_id: tenant.into(),
            member_id: member_id.clone(),
            kind: ipb::CardKind::Plastic as i32,
            number: member_card(i),
        }))
        .await
    {
        Ok(_) => {}
        Err(s) if s.code() == Code::AlreadyExists => {}
        Err(s) => return Err(anyhow::anyhow!("issuing card {i}: {s}")),
    }
    Ok(member_id)
}

/// The share of each call in the traffic.
pub type Mix = Vec<(Rpc, f64)>;

/// Most committed receipts kept for refunds.
const REFUND_POOL: usize = 10_000;

/// Everything a call needs; shared by all in-flight calls.
#[derive(Debug)]
pub struct Workload {
    pub model: Model,
    pub member_ids: Vec<String>,
    pub clients: Clients,
    pub run_id: String,
    pub mix: Mix,
    /// Committed receipts and their stores, for refunds.
    refundable: Mutex<VecDeque<(String, usize)>>,
    run_salt: u64,
    /// This run's coupons, each presented once, in order.
    coupons: Vec<String>,
    next_coupon: AtomicUsize,
}

/// One call to make, decided at schedule time.
#[derive(Debug)]
pub struct Call {
    pub rpc: Rpc,
    seed: u64,
    refund_of: Option<(String, usize)>,
}

impl Workload {
    pub fn new(
        model: Model,
        member_ids: Vec<String>,
        clients: Clients,
        run_id: String,
        mix: Mix,
        coupons: Vec<String>,
    ) -> Self {
        // FNV-1a of the run id.
        let run_salt = run_id.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
        });
        Self {
            model,
            member_ids,
            clients,
            run_id,
            run_salt,
            mix,
            refundable: Mutex::new(VecDeque::new()),
            coupons,
            next_coupon: AtomicUsize::new(0),
        }
    }

    /// Picks the next call by the mix. A refund needs a committed receipt; without one the
    /// call becomes a commit.
    pub fn next_call(&self, rng: &mut StdRng, n: u64) -> Call {
        let total: f64 = self.mix.iter().map(|(_, w)| w).sum();
        let mut x = rng.random_range(0.0..total.max(f64::MIN_POSITIVE));
        let mut rpc = self.mix.last().map_or(Rpc::Commit, |(r, _)| *r);
        for (r, w) in &self.mix {
            if x < *w {
                rpc = *r;
                break;
            }
            x -= w;
        }
        let mut refund_of = None;
        if rpc == Rpc::Refund {
            refund_of = self.refundable.lock().ok().and_then(|mut q| q.pop_front());
            if refund_of.is_none() {
                rpc = Rpc::Commit;
            }
        }
        Call {
            rpc,
            seed: rng.random::<u64>() ^ n,
            refund_of,
        }
    }

    /// The receipt a spec describes. `with_coupon`: a commit, which may use up a coupon.
    fn receipt(&self, spec: &ReceiptSpec, id: String, with_coupon: bool) -> ppb::Receipt {
        let m = &self.model;
        let mut codes = Vec::new();
        if spec.promo {
            codes.push(PROMO_CODE.to_string());
        }
        if with_coupon && spec.coupon {
            let k = self.next_coupon.fetch_add(1, Ordering::Relaxed);
            if let Some(code) = self.coupons.get(k) {
                codes.push(code.clone());
            }
        }
        let id_for_cashier = id.clone();
        ppb::Receipt {
            tenant_id: m.config.tenant.clone(),
            receipt_id: id,
            store_id: m.stores[spec.store].id.clone(),
            channel: loyalty_proto::common::v1::Channel::Store as i32,
            identification: spec
                .member
                .map(|i| ppb::receipt::Identification::CardNumber(member_card(i))),
            lines: spec
                .lines
                .iter()
                .enumerate()
                .map(|(n, l)| {
                    let p = &m.products[l.product];
                    ppb::ReceiptLine {
                        line_id: (n + 1).to_string(),
                        sku: p.sku.clone(),
                        quantity: dec(l.quantity.to_string()),
                        unit_price: dec(money(p.price)),
                        sale_price: p.sale,
                    }
                })
                .collect(),
            points_to_redeem: spec.redeem_points,
            codes,
            cashier_id: cashier(&m.stores[spec.store].id, &id_for_cashier),
            ..Default::default()
        }
    }

    /// Makes one call; `Err` carries the status.
    pub async fn call(&self, call: Call, n: u64) -> Result<(), Status> {
        let mut rng = StdRng::seed_from_u64(call.seed);
        let c = &self.clients;
        let tenant = self.model.config.tenant.clone();
        // The till of a random store, for calls whose store the model does not decide.
        let till = Caller::Pos(rng.random_range(0..self.model.stores.len().max(1)));
        match call.rpc {
            Rpc::RegisterMember => {
                let phone = registration_phone(self.run_salt, n);
                let mut client = ipb::member_service_client::MemberServiceClient::new(
                    c.channel(Service::Identity),
                );
                client
                    .register_member(c.request_as(
                        ipb::RegisterMemberRequest {
                            tenant_id: tenant,
                            phone,
                            channel: loyalty_proto::common::v1::Channel::Store as i32,
                            ..Default::default()
                        },
                        till,
                    ))
                    .await?;
            }
            Rpc::LookupMember => {
                let i = self.model.member(&mut rng);
                let mut client = ipb::member_service_client::MemberServiceClient::new(
                    c.channel(Service::Identity),
                );
                client
                    .lookup_member(c.request_as(
                        ipb::LookupMemberRequest {
                            tenant_id: tenant,
                            key: Some(ipb::lookup_member_request::Key::CardNumber(member_card(i))),
                            default_region: String::new(),
                        },
                        till,
                    ))
                    .await?;
            }
            Rpc::GetBalance => {
                let i = self.model.member(&mut rng);
                let mut client = bpb::balance_service_client::BalanceServiceClient::new(
                    c.channel(Service::Balance),
                );
                client
                    .get_balance(c.request_as(
                        bpb::GetBalanceRequest {
                            tenant_id: tenant,
                            member_id: self.member_ids.get(i).cloned().unwrap_or_default(),
                        },
                        Caller::App(i),
                    ))
                    .await?;
            }
            Rpc::GetMemberSegments => {
                let i = self.model.member(&mut rng);
                let mut client = spb::segmentation_service_client::SegmentationServiceClient::new(
                    c.channel(Service::Segmentation),
                );
                client
                    .get_member_segments(c.request_as(
                        spb::GetMemberSegmentsRequest {
                            tenant_id: tenant,
                            member_id: self.member_ids.get(i).cloned().unwrap_or_default(),
                        },
                        till,
                    ))
                    .await?;
            }
            Rpc::Accrue | Rpc::Redeem => {
                let i = self.model.member(&mut rng);
                let member_id = self.member_ids.get(i).cloned().unwrap_or_default();
                let mut client = bpb::balance_service_client::BalanceServiceClient::new(
                    c.channel(Service::Balance),
                );
                if call.rpc == Rpc::Accrue {
                    // Points outside a receipt are the back office's (tills accrue and redeem
                    // through checkout): with a key, this scenario runs as the admin, and is
                    // audited.
                    client
                        .accrue(c.request_as(
                            bpb::AccrueRequest {
                                tenant_id: tenant,
                                member_id,
                                idempotency_key: format!("{}-a{n}", self.run_id),
                                amount: 100,
                                reference: "loadtest".into(),
                                ..Default::default()
                            },
                            Caller::Admin,
                        ))
                        .await?;
                } else {
                    client
                        .redeem(c.request_as(
                            bpb::RedeemRequest {
                                tenant_id: tenant,
                                member_id,
                                idempotency_key: format!("{}-r{n}", self.run_id),
                                amount: 50,
                                reference: "loadtest".into(),
                                up_to_available: true,
                            },
                            Caller::Admin,
                        ))
                        .await?;
                }
            }
            Rpc::Quote => {
                let spec = self.model.receipt(&mut rng);
                let receipt = self.receipt(&spec, format!("{}-q{n}", self.run_id), false);
                let mut client = ppb::checkout_service_client::CheckoutServiceClient::new(
                    c.channel(Service::Promotion),
                );
                client
                    .quote(c.request_as(
                        ppb::QuoteRequest {
                            receipt: Some(receipt),
                            ..Default::default()
                        },
                        Caller::Pos(spec.store),
                    ))
                    .await?;
            }
            Rpc::Commit => {
                let spec = self.model.receipt(&mut rng);
                let id = format!("{}-c{n}", self.run_id);
                let receipt = self.receipt(&spec, id.clone(), true);
                let mut client = ppb::checkout_service_client::CheckoutServiceClient::new(
                    c.channel(Service::Promotion),
                );
                client
                    .commit(c.request_as(
                        ppb::CommitRequest {
                            receipt: Some(receipt),
                            ..Default::default()
                        },
                        Caller::Pos(spec.store),
                    ))
                    .await?;
                // Refunds take one unit of line 1 back: only receipts that keep something
                // after that are refunded, so every refund is partial.
                let partial =
                    spec.lines.len() > 1 || spec.lines.first().is_some_and(|l| l.quantity > 1);
                if partial
                    && let Ok(mut q) = self.refundable.lock()
                    && q.len() < REFUND_POOL
                {
                    q.push_back((id, spec.store));
                }
            }
            Rpc::Refund => {
                let (receipt_id, store) = call.refund_of.unwrap_or_default();
                let mut client = ppb::checkout_service_client::CheckoutServiceClient::new(
                    c.channel(Service::Promotion),
                );
                client
                    .refund(c.request_as(
                        ppb::RefundRequest {
                            tenant_id: tenant,
                            receipt_id,
                            refund_id: "r1".into(),
                            lines: vec![ppb::RefundLine {
                                line_id: "1".into(),
                                quantity: dec("1".into()),
                            }],
                        },
                        Caller::Pos(store),
                    ))
                    .await?;
            }
        }
        Ok(())
    }
}

/// How the offered rate moves over the measured part of a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Shape {
    Constant,
    /// Base rate, ramp to `peak` times it, a spike of 1.5 times the peak, back to the peak.
    BlackFriday {
        peak: f64,
    },
    /// A whole trading day compressed into the run, following the model's daily shape.
    Day(Vec<f64>),
}

impl Shape {
    /// Calls per second at `t` seconds into a measured phase of `duration` seconds.
    pub fn rate(&self, base: f64, t: f64, duration: f64) -> f64 {
        let f = (t / duration.max(1e-9)).clamp(0.0, 1.0);
        match self {
            Shape::Constant => base,
            Shape::BlackFriday { peak } => {
                let top = base * peak;
                if f < 0.2 {
                    base
                } else if f < 0.6 {
                    base + (top - base) * (f - 0.2) / 0.4
                } else if f < 0.7 {
                    top * 1.5
                } else {
                    top
                }
            }
            Shape::Day(weights) => {
                let max = weights.iter().copied().fold(0.0_f64, f64::max).max(1e-9);
                let hour = ((f * 24.0) as usize).min(23);
                // Never zero: closed hours still see a trickle (the web shop).
                (base * weights[hour] / max).max(base * 0.01)
            }
        }
    }
}

/// The deadline of one call; the drain after a run waits longer than this.
/// Mobile prefixes of the numbers registered at the till, outside the provisioned range
/// (+7701...).
const TILL_PREFIXES: [&str; 10] = [
    "702", "705", "707", "708", "747", "771", "775", "776", "777", "778",
];

/// The number a new customer registers at the till on call `n`: 10^8 numbers taken in turn
/// from an offset of the run's own, so a run never registers one twice (a random pick did,
/// by the birthday paradox, in long soaks: thousands of ALREADY_EXISTS failures a day), and
/// a rerun against the same server starts elsewhere.
pub fn registration_phone(run_salt: u64, n: u64) -> String {
    const PER_PREFIX: u64 = 10_000_000;
    let k = run_salt.wrapping_add(n) % (PER_PREFIX * TILL_PREFIXES.len() as u64);
    format!(
        "+7{}{:07}",
        TILL_PREFIXES[(k / PER_PREFIX) as usize],
        k % PER_PREFIX
    )
}

pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The highest rate the scheduler will honour, calls per second.
pub const MAX_RATE: f64 = 10_000_000.0;

/// Time to the next send at `rate`, never zero, and never more than 1/48 of the run, so a
/// quiet hour of the day shape cannot skip over the busy hours after it.
pub fn next_gap(rate: f64, measured_secs: f64) -> Duration {
    let rate = if rate.is_finite() {
        rate.clamp(0.01, MAX_RATE)
    } else {
        MAX_RATE
    };
    let gap = (1.0 / rate).min((measured_secs / 48.0).max(1e-3));
    Duration::from_secs_f64(gap.max(1.0 / MAX_RATE))
}

/// Run limits and timing.
#[derive(Debug, Clone)]
pub struct RunPlan {
    pub rate: f64,
    pub shape: Shape,
    pub warmup: Duration,
    pub duration: Duration,
    pub max_in_flight: usize,
    /// `Some(n)`: closed loop with n workers instead of a rate.
    pub closed_workers: Option<usize>,
    /// Stop sending after this many measured calls (or at the end of the duration).
    pub max_calls: Option<u64>,
    pub seed: u64,
    pub progress: bool,
}

/// Runs the plan and returns what was measured after warm-up.
pub async fn run(workload: Arc<Workload>, plan: RunPlan) -> Stats {
    let stats = Arc::new(Mutex::new(Stats::for_duration(
        plan.duration.as_secs().max(1),
    )));
    let start = Instant::now();
    let measured_from = start + plan.warmup;
    let measured_from_wall = std::time::SystemTime::now() + plan.warmup;
    let end = measured_from + plan.duration;
    let sent = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    // Measured calls sent so far, against `max_calls`, and when sending stopped because of it.
    let measured_sent = Arc::new(AtomicU64::new(0));
    let stopped: Arc<Mutex<Option<Instant>>> = Arc::default();
    let may_send = {
        let (measured_sent, stopped) = (measured_sent.clone(), stopped.clone());
        move |measured: bool| {
            let ok = !measured
                || plan
                    .max_calls
                    .is_none_or(|max| measured_sent.fetch_add(1, Ordering::Relaxed) < max);
            if !ok && let Ok(mut at) = stopped.lock() {
                at.get_or_insert_with(Instant::now);
            }
            ok
        }
    };
    let progress = plan.progress.then(|| {
        let (stats, sent, done) = (stats.clone(), sent.clone(), done.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let elapsed = start.elapsed().as_secs();
                // The bucket of the second that just ended (none during warm-up).
                let finished = Instant::now()
                    .checked_duration_since(measured_from)
                    .and_then(|d| d.as_secs().checked_sub(1));
                let (errors, p99) = stats
                    .lock()
                    .map(|s| {
                        let t = finished.and_then(|sec| s.bucket_at(sec));
                        (t.map_or(0, |t| t.errors), t.map_or(0, |t| t.latency.value_at_quantile(0.99)))
                    })
                    .unwrap_or((0, 0));
                let (s, d) = (sent.load(Ordering::Relaxed), done.load(Ordering::Relaxed));
                eprintln!(
                    "t={elapsed}s sent={s} done={d} in-flight={} last-second: p99={:.2}ms errors={errors}",
                    s.saturating_sub(d),
                    p99 as f64 / 1000.0
                );
            }
        })
    });

    let record = {
        let stats = stats.clone();
        move |rpc: Rpc, due: Instant, result: Result<(), Status>| {
            if due < measured_from {
                return;
            }
            let micros = u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX);
            let offset = u64::try_from((due - measured_from).as_micros()).unwrap_or(u64::MAX);
            let (code, message) = match &result {
                Ok(()) => ("OK".to_string(), None),
                Err(s) => (
                    code_name(s.code()).to_string(),
                    Some(s.message().to_string()),
                ),
            };
            if let Ok(mut s) = stats.lock() {
                s.record(rpc, offset, micros, &code, message.as_deref());
            }
        }
    };

    match plan.closed_workers {
        Some(workers) => {
            let mut tasks = Vec::new();
            for w in 0..workers {
                let (workload, record, stats, sent, done, may_send) = (
                    workload.clone(),
                    record.clone(),
                    stats.clone(),
                    sent.clone(),
                    done.clone(),
                    may_send.clone(),
                );
                tasks.push(tokio::spawn(async move {
                    let mut rng = StdRng::seed_from_u64(plan.seed ^ (w as u64) << 32);
                    let mut n = (w as u64) << 40;
                    while Instant::now() < end {
                        let call = workload.next_call(&mut rng, n);
                        let rpc = call.rpc;
                        let due = Instant::now();
                        if !may_send(due >= measured_from) {
                            break;
                        }
                        if due >= measured_from
                            && let Ok(mut s) = stats.lock()
                        {
                            s.offered(rpc);
                        }
                        sent.fetch_add(1, Ordering::Relaxed);
                        let result = workload.call(call, n).await;
                        done.fetch_add(1, Ordering::Relaxed);
                        record(rpc, due, result);
                        n += 1;
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        }
        None => {
            let permits = Arc::new(Semaphore::new(plan.max_in_flight));
            let mut rng = StdRng::seed_from_u64(plan.seed);
            let mut due = start;
            let mut n: u64 = 0;
            let measured = plan.duration.as_secs_f64();
            while due < end {
                if due > Instant::now() {
                    tokio::time::sleep_until(due).await;
                }
                let call = workload.next_call(&mut rng, n);
                let rpc = call.rpc;
                let in_measure = due >= measured_from;
                if !may_send(in_measure) {
                    break;
                }
                if in_measure && let Ok(mut s) = stats.lock() {
                    s.offered(rpc);
                }
                match permits.clone().try_acquire_owned() {
                    Ok(permit) => {
                        let (workload, record, done) =
                            (workload.clone(), record.clone(), done.clone());
                        sent.fetch_add(1, Ordering::Relaxed);
                        let lag_stats = stats.clone();
                        tokio::spawn(async move {
                            if in_measure && let Ok(mut s) = lag_stats.lock() {
                                let lag =
                                    u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX);
                                let _ = s.send_lag.record(lag.clamp(1, 300_000_000));
                            }
                            let result = workload.call(call, n).await;
                            done.fetch_add(1, Ordering::Relaxed);
                            record(rpc, due, result);
                            drop(permit);
                        });
                    }
                    Err(_) => {
                        if in_measure && let Ok(mut s) = stats.lock() {
                            s.dropped += 1;
                        }
                    }
                }
                n += 1;
                // Warm-up runs at the base rate; the measured phase follows the shape.
                let rate = if in_measure {
                    plan.shape
                        .rate(plan.rate, (due - measured_from).as_secs_f64(), measured)
                } else {
                    plan.rate
                };
                due += next_gap(rate, measured);
            }
            // Let calls in flight finish: longer than a call's own deadline, so a call still
            // missing afterwards really never finished (the report counts those).
            let all = u32::try_from(plan.max_in_flight).unwrap_or(u32::MAX);
            let _ = tokio::time::timeout(
                CALL_TIMEOUT + Duration::from_secs(5),
                permits.acquire_many(all),
            )
            .await;
        }
    }
    if let Some(p) = progress {
        p.abort();
    }
    let mut out = stats.lock().map(|s| s.clone()).unwrap_or_default();
    // The measured phase ends with the duration, or earlier when `max_calls` stopped it.
    let stopped_early = stopped
        .lock()
        .ok()
        .and_then(|at| *at)
        .filter(|at| *at < end);
    out.end_reason = if stopped_early.is_some() {
        "normal"
    } else {
        "timeout"
    };
    out.measured_from_unix_micros = measured_from_wall
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let stopped_at = stopped_early.unwrap_or(end);
    out.measured_secs = stopped_at
        .saturating_duration_since(measured_from)
        .as_secs_f64()
        .max(1e-3);
    out
}

/// Status code names as ghz (and grpc-go) spell them.
pub fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "Canceled",
        Code::Unknown => "Unknown",
        Code::InvalidArgument => "InvalidArgument",
        Code::DeadlineExceeded => "DeadlineExceeded",
        Code::NotFound => "NotFound",
        Code::AlreadyExists => "AlreadyExists",
        Code::PermissionDenied => "PermissionDenied",
        Code::ResourceExhausted => "ResourceExhausted",
        Code::FailedPrecondition => "FailedPrecondition",
        Code::Aborted => "Aborted",
        Code::OutOfRange => "OutOfRange",
        Code::Unimplemented => "Unimplemented",
        Code::Internal => "Internal",
        Code::Unavailable => "Unavailable",
        Code::DataLoss => "DataLoss",
        Code::Unauthenticated => "Unauthenticated",
    }
}

/// Cashiers per store: each receipt is rung up by one of them, spread evenly.
const CASHIERS_PER_STORE: u64 = 4;

/// The cashier of a receipt, stable for its id (so a retried commit names the same one).
fn cashier(store_id: &str, receipt_id: &str) -> String {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    receipt_id.hash(&mut h);
    format!("{store_id}-k{}", h.finish() % CASHIERS_PER_STORE)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Calls of one run never register one number twice: the open loop's counter, and the
    /// closed loop's workers, whose counters start at `worker << 40`.
    #[test]
    fn a_run_registers_each_number_once() {
        let salt = 0x1234_5678_9abc_def0;
        let mut seen = std::collections::HashSet::new();
        for worker in 0..4u64 {
            for i in 0..50_000u64 {
                let phone = registration_phone(salt, (worker << 40) + i);
                assert_eq!(phone.len(), 12, "{phone}");
                assert!(seen.insert(phone.clone()), "{phone} twice");
            }
        }
        assert_ne!(registration_phone(salt, 0), registration_phone(salt + 1, 0));
    }

    #[test]
    fn gaps_are_never_zero_nor_too_long() {
        assert!(next_gap(f64::INFINITY, 10.0) > Duration::ZERO);
        assert!(next_gap(1e12, 10.0) >= Duration::from_nanos(100));
        assert_eq!(
            next_gap(0.01, 48.0),
            Duration::from_secs(1),
            "capped at 1/48 of the run"
        );
        assert_eq!(next_gap(1000.0, 48.0), Duration::from_millis(1));
    }

    #[test]
    fn black_friday_ramps_spikes_and_holds() {
        let s = Shape::BlackFriday { peak: 3.0 };
        assert_eq!(s.rate(100.0, 0.0, 100.0), 100.0);
        assert!((s.rate(100.0, 40.0, 100.0) - 200.0).abs() < 1e-9);
        assert_eq!(s.rate(100.0, 65.0, 100.0), 450.0);
        assert_eq!(s.rate(100.0, 90.0, 100.0), 300.0);
    }

    #[test]
    fn a_day_follows_the_shape() {
        let mut w = vec![0.0; 24];
        w[12] = 2.0;
        w[18] = 1.0;
        let s = Shape::Day(w);
        assert_eq!(s.rate(100.0, 12.5, 24.0), 100.0);
        assert_eq!(s.rate(100.0, 18.5, 24.0), 50.0);
        assert_eq!(s.rate(100.0, 3.0, 24.0), 1.0);
    }
}
