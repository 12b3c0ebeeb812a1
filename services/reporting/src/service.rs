//! The reporting core: takes facts in (stored first, deduplicated, then rolled up), answers
//! KPI queries from the rollups, and pages facts out for exports. Knows nothing of gRPC.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use loyalty_platform::calendar::Day;
use loyalty_platform::clock::{Millis, SharedClock};
use loyalty_platform::error::{Error, MAX_ID_LEN, Result, Violations};
use loyalty_platform::types::{Channel, check_tenant};
use rust_decimal::Decimal;

use crate::exporter::{Job, Kind, Resume};
use crate::fact::{Fact, Member, TenantFact};
use crate::kpi::{self, Group, Kpi, Scope, Uplift, Value};
use crate::ports::{NoSegmentation, SegmentMembers};
use crate::rollup::Rollups;
use crate::store::{Position, Receipts, ReportingStore, ScanFrom};

/// Longest period a query or export covers.
pub const MAX_PERIOD_DAYS: i64 = 3 * 366;
/// Most entries of each filter list.
pub const MAX_FILTER: usize = 1000;
/// Most KPIs one request asks for.
pub const MAX_KPIS: usize = 64;
/// Rows per export chunk: default and most.
pub const DEFAULT_CHUNK_ROWS: usize = 10_000;
pub const MAX_CHUNK_ROWS: usize = 100_000;
/// Facts read per page while rebuilding at start.
const SCAN_PAGE: usize = 10_000;

/// A period as asked: instants, both required.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Period {
    pub start: Option<Millis>,
    pub end: Option<Millis>,
}

/// The filter lists of a request.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Filter {
    pub stores: Vec<String>,
    pub brands: Vec<String>,
    pub regions: Vec<String>,
    pub channels: Vec<Channel>,
    /// Only the members of this segment (as they are now); empty: everyone.
    pub segment: String,
}

/// What a KPI request names.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    pub tenant_id: String,
    pub period: Period,
    pub filter: Filter,
    /// Empty: the zone the tenant's stores share, else UTC.
    pub time_zone: String,
}

#[derive(Debug, Clone)]
pub struct Reporting {
    pub(crate) store: Arc<dyn ReportingStore>,
    tenants: Arc<RwLock<HashMap<String, Rollups>>>,
    clock: SharedClock,
    segments: Arc<dyn SegmentMembers>,
    building: Arc<tokio::sync::Semaphore>,
}

/// The most members a segment filter reads.
pub const MAX_SEGMENT_MEMBERS: usize = 250_000;
/// How many heavy queries (segment views, fraud signals) run at once; more wait their turn.
pub const VIEW_BUILDS: usize = 2;
/// Members whose facts are read at once while a segment's rollups are built.
const SEGMENT_BATCH: usize = 1_000;

/// Set when dropped: a segment build running on the blocking pool learns that the request
/// that started it is gone (its deadline passed or its client left).
#[derive(Debug, Default)]
struct Abandoned(Arc<AtomicBool>);

impl Drop for Abandoned {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Whose facts a query reads: the tenant's rollups, or with a segment filter, rollups built
/// from the facts of the segment's members alone.
#[derive(Debug, Clone, Default)]
pub struct View(Option<Arc<Rollups>>);

fn zone(name: &str, field: &str) -> Result<jiff::tz::TimeZone> {
    jiff::tz::TimeZone::get(name)
        .map_err(|_| Error::invalid(field, format!("unknown IANA time zone {name:?}")))
}

/// The zone every store of the tenant shares; UTC when they differ or none is known.
fn tenant_zone(r: &Rollups) -> jiff::tz::TimeZone {
    match (r.time_zones.len(), r.time_zones.iter().next()) {
        (1, Some(only)) => zone(only, "time_zone").unwrap_or(jiff::tz::TimeZone::UTC),
        _ => jiff::tz::TimeZone::UTC,
    }
}

/// The local date of an instant in a zone, as days since 1970-01-01.
pub fn local_day(at: Millis, tz: &jiff::tz::TimeZone) -> Day {
    match jiff::Timestamp::from_millisecond(at) {
        Ok(ts) => {
            let d = ts.to_zoned(tz.clone()).date();
            loyalty_platform::calendar::day_from_civil(
                i32::from(d.year()),
                d.month() as u32,
                d.day() as u32,
            )
        }
        Err(_) => loyalty_platform::calendar::day_of(at),
    }
}

impl Reporting {
    /// Opens the service over its store, rebuilding every tenant's rollups from the facts.
    pub async fn open(store: Arc<dyn ReportingStore>, clock: SharedClock) -> Result<Self> {
        store.prepare().await?;
        let mut tenants: HashMap<String, Rollups> = HashMap::new();
        let mut from = ScanFrom::START;
        loop {
            let (facts, next) = store.scan(from, SCAN_PAGE).await?;
            for f in &facts {
                tenants
                    .entry(f.tenant_id.clone())
                    .or_default()
                    .apply(&f.fact);
            }
            match next {
                Some(n) => from = n,
                None => break,
            }
        }
        Ok(Self {
            store,
            tenants: Arc::new(RwLock::new(tenants)),
            clock,
            segments: Arc::new(NoSegmentation),
            building: Arc::new(tokio::sync::Semaphore::new(VIEW_BUILDS)),
        })
    }

    /// Where the segment filter learns a segment's members.
    #[must_use]
    pub fn with_segments(mut self, segments: Arc<dyn SegmentMembers>) -> Self {
        self.segments = segments;
        self
    }

    /// The rollups `req` reads. Without a segment filter, the tenant's (nothing is built).
    /// With one, rollups of the segment's members' purchases and refunds in the period,
    /// their ledger entries when `ledger` (liability needs all of them) and their profiles,
    /// so every KPI reads as if the tenant had those members alone: the cost is reading
    /// their facts. The request is checked first; at most [`VIEW_BUILDS`] are built at once.
    pub async fn view(&self, req: &Request, ledger: bool) -> Result<View> {
        let segment = req.filter.segment.as_str();
        if segment.is_empty() {
            return Ok(View::default());
        }
        let mut v = Violations::new();
        v.text(segment, "filter.segment_id", MAX_ID_LEN);
        v.finish()?;
        let (scope, _) = self.with(&req.tenant_id, |r| self.scope(r, req))?;
        let permit = self.heavy_query().await?;
        let members = self
            .segments
            .members(&req.tenant_id, segment, MAX_SEGMENT_MEMBERS)
            .await?;
        if members.len() > MAX_SEGMENT_MEMBERS {
            return Err(crate::ports::too_many(segment, MAX_SEGMENT_MEMBERS));
        }
        // Rolling up takes CPU the async workers (and the consumers on them) should not
        // wait for. The build holds the permit until it ends, and stops at its next batch
        // when the caller gave up (a deadline dropped this future): an abandoned build
        // neither runs on nor lets another start beside it.
        let (this, tenant) = (self.clone(), req.tenant_id.clone());
        let runtime = tokio::runtime::Handle::current();
        let days = (scope.from, scope.to);
        let abandoned = Abandoned::default();
        let flag = abandoned.0.clone();
        let sub = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            this.build_view(&runtime, &tenant, &members, days, ledger, &flag)
        })
        .await
        .map_err(Error::internal)??;
        drop(abandoned);
        Ok(View(Some(Arc::new(sub))))
    }

    /// A permit for a query that holds much in memory or CPU (a segment build, fraud
    /// signals): at most [`VIEW_BUILDS`] run at once.
    pub(crate) async fn heavy_query(&self) -> Result<tokio::sync::OwnedSemaphorePermit> {
        self.building
            .clone()
            .acquire_owned()
            .await
            .map_err(Error::internal)
    }

    fn build_view(
        &self,
        runtime: &tokio::runtime::Handle,
        tenant: &str,
        members: &[String],
        days: (Day, Day),
        ledger: bool,
        abandoned: &AtomicBool,
    ) -> Result<Rollups> {
        let mut sub: Option<Rollups> = None;
        for batch in members.chunks(SEGMENT_BATCH) {
            if abandoned.load(Ordering::Relaxed) {
                return Err(Error::Unavailable(
                    "the segment's rollups were abandoned by their caller".into(),
                ));
            }
            // Only members the tenant's facts know: the others have nothing to count. The
            // lock is held for one batch at a time.
            let (known, profiles) = {
                let tenants = self
                    .tenants
                    .read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                let Some(r) = tenants.get(tenant) else {
                    return Ok(Rollups::default());
                };
                if sub.is_none() {
                    sub = Some(r.directory());
                }
                let mut known = Vec::new();
                let mut profiles = Vec::new();
                for m in batch {
                    if let Some(i) = r.members.get(m) {
                        known.push(m.clone());
                        profiles.extend(r.profiles.get(&i).cloned().map(Fact::Member));
                    }
                }
                (known, profiles)
            };
            let Some(sub) = sub.as_mut() else { break };
            for p in &profiles {
                sub.apply(p);
            }
            let facts = runtime.block_on(self.store.member_facts(tenant, known, days, ledger))?;
            for f in &facts {
                sub.apply(f);
            }
        }
        Ok(sub.unwrap_or_default())
    }

    /// Stores the facts (one durable write) and rolls up those not seen before. Returns how
    /// many were new. Safe to repeat: a fact already stored changes nothing.
    pub async fn ingest(&self, facts: Vec<TenantFact>) -> Result<usize> {
        let fresh = self.store.append(facts).await?;
        // A panic while applying cannot leave a half-applied sum worse than a lost service:
        // the rollups stay readable, and a restart rebuilds them from the stored facts.
        let mut tenants = self
            .tenants
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for f in &fresh {
            tenants
                .entry(f.tenant_id.clone())
                .or_default()
                .apply(&f.fact);
        }
        metrics::counter!("loyalty_reporting_facts_total").increment(fresh.len() as u64);
        Ok(fresh.len())
    }

    pub async fn ping(&self) -> Result<()> {
        self.store.ping().await
    }

    /// Stores audit records (each once); returns how many were new.
    pub async fn record_audit(&self, entries: Vec<crate::audit::AuditEntry>) -> Result<usize> {
        let fresh = self.store.append_audit(entries).await?;
        metrics::counter!("loyalty_reporting_audit_records_total").increment(fresh as u64);
        Ok(fresh)
    }

    /// When the oldest of the tenant's audited calls still without a recorded answer began,
    /// among those that began at or after `since`.
    pub async fn oldest_open_audit(
        &self,
        tenant_id: &str,
        since: loyalty_platform::clock::Millis,
    ) -> Result<Option<loyalty_platform::clock::Millis>> {
        self.store.oldest_open_audit(tenant_id, since).await
    }

    /// A page of a tenant's audit records.
    pub async fn audit_page(
        &self,
        tenant_id: &str,
        query: &crate::audit::AuditQuery,
        order: crate::audit::Order,
        after: Option<crate::audit::AuditCursor>,
        limit: usize,
    ) -> Result<crate::audit::AuditPage> {
        self.store
            .audit_page(
                tenant_id,
                query,
                order,
                after,
                limit.clamp(1, crate::audit::MAX_PAGE),
                crate::audit::MAX_PAGE_BYTES,
            )
            .await
    }

    fn with<R>(&self, tenant: &str, f: impl FnOnce(&Rollups) -> Result<R>) -> Result<R> {
        let tenants = self
            .tenants
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match tenants.get(tenant) {
            Some(r) => f(r),
            None => f(&Rollups::default()),
        }
    }

    /// Checks `req` against the tenant's rollups (stores, time zone), then runs `f` on the
    /// rollups `view` reads.
    fn scoped<R>(
        &self,
        view: &View,
        req: &Request,
        f: impl FnOnce(&Rollups, Scope, jiff::tz::TimeZone) -> Result<R>,
    ) -> Result<R> {
        self.with(&req.tenant_id, |tenant| {
            let (scope, tz) = self.scope(tenant, req)?;
            match &view.0 {
                Some(segment) => f(segment, scope, tz),
                None => f(tenant, scope, tz),
            }
        })
    }

    /// Checks the request and turns it into business days and filter sets.
    fn scope(&self, r: &Rollups, req: &Request) -> Result<(Scope, jiff::tz::TimeZone)> {
        let mut v = Violations::new();
        check_tenant(&mut v, &req.tenant_id);
        let (start, end) = (req.period.start, req.period.end);
        v.check(start.is_some(), "period.start_time", "is required");
        v.check(end.is_some(), "period.end_time", "is required");
        if let (Some(s), Some(e)) = (start, end) {
            v.check(s < e, "period", "must end after it starts");
        }
        let lists = [
            ("filter.store_ids", &req.filter.stores),
            ("filter.brands", &req.filter.brands),
            ("filter.regions", &req.filter.regions),
        ];
        for (field, list) in lists {
            v.check(
                list.len() <= MAX_FILTER,
                field,
                format!("at most {MAX_FILTER} entries"),
            );
            for (i, s) in list.iter().take(MAX_FILTER).enumerate() {
                v.text(s, format!("{field}[{i}]"), MAX_ID_LEN);
            }
        }
        let unknown = req
            .filter
            .stores
            .iter()
            .take(MAX_FILTER)
            .enumerate()
            .filter(|(_, s)| !r.stores.contains_key(*s) && s.len() <= MAX_ID_LEN);
        // A few are enough to say what is wrong; thousands would not fit an error.
        for (i, s) in unknown.take(10) {
            v.add(
                format!("filter.store_ids[{i}]"),
                format!("unknown store {s:?}: no purchase was ever reported for it"),
            );
        }
        v.optional_text(&req.time_zone, "time_zone", MAX_ID_LEN);
        v.check(
            req.filter.channels.len() <= CHANNEL_LIMIT,
            "filter.channels",
            format!("at most {CHANNEL_LIMIT} entries"),
        );
        let tz = if req.time_zone.is_empty() || req.time_zone.len() > MAX_ID_LEN {
            tenant_zone(r)
        } else {
            match zone(&req.time_zone, "time_zone") {
                Ok(tz) => tz,
                Err(_) => {
                    v.add(
                        "time_zone",
                        format!("unknown IANA time zone {:?}", req.time_zone),
                    );
                    jiff::tz::TimeZone::UTC
                }
            }
        };
        // A short period across a daylight-saving change can end on an earlier local date
        // than it starts: it is then the start's day.
        let days = match (start, end) {
            (Some(s), Some(e)) if s < e => {
                let from = local_day(s, &tz);
                Some((from, local_day(e - 1, &tz).max(from)))
            }
            _ => None,
        };
        if let Some((from, to)) = days {
            v.check(
                to - from < MAX_PERIOD_DAYS,
                "period",
                format!("covers {} days; at most {MAX_PERIOD_DAYS}", to - from + 1),
            );
        }
        v.finish()?;
        let (from, to) = days.unwrap_or_default();
        let set = |l: &Vec<String>| l.iter().cloned().collect::<BTreeSet<String>>();
        Ok((
            Scope {
                from,
                to,
                stores: set(&req.filter.stores),
                brands: set(&req.filter.brands),
                regions: set(&req.filter.regions),
                channels: req.filter.channels.iter().copied().collect(),
            },
            tz,
        ))
    }

    /// Whether `kpis` grouped by `group` can be answered for `req`: the checks
    /// [`Reporting::kpis`] makes, without reading anything, so a request that would be
    /// refused is refused before its segment's rollups are built.
    pub fn check_kpis(&self, req: &Request, kpis: &[Kpi], group: Group) -> Result<()> {
        if kpis.is_empty() || kpis.len() > MAX_KPIS {
            return Err(Error::invalid(
                "kpis",
                format!("name between 1 and {MAX_KPIS} KPIs"),
            ));
        }
        let (scope, _) = self.with(&req.tenant_id, |r| self.scope(r, req))?;
        kpi::check(kpis, &scope, group)
    }

    /// The KPIs over `view` (from [`Reporting::view`] for the same request).
    pub fn kpis(
        &self,
        view: &View,
        req: &Request,
        kpis: &[Kpi],
        group: Group,
    ) -> Result<Vec<Value>> {
        self.check_kpis(req, kpis, group)?;
        self.scoped(view, req, |r, scope, tz| {
            kpi::compute(r, kpis, &scope, group, &|at| local_day(at, &tz))
        })
    }

    pub fn category_intersection(
        &self,
        view: &View,
        req: &Request,
        a: &str,
        b: &str,
    ) -> Result<(u64, u64)> {
        let mut v = Violations::new();
        v.text(a, "category_a", MAX_ID_LEN);
        v.text(b, "category_b", MAX_ID_LEN);
        v.finish()?;
        self.scoped(view, req, |r, scope, _| {
            Ok(kpi::category_intersection(r, &scope, a, b))
        })
    }

    pub fn uplift(&self, view: &View, req: &Request, campaign_id: &str) -> Result<Uplift> {
        let mut v = Violations::new();
        v.text(campaign_id, "campaign_id", MAX_ID_LEN);
        v.finish()?;
        self.scoped(view, req, |r, scope, _| {
            Ok(kpi::uplift(r, &scope, campaign_id))
        })
    }

    /// Members and spend per RFM segment as of `as_of` (now when None).
    pub fn rfm_overview(
        &self,
        tenant_id: &str,
        as_of: Option<Millis>,
    ) -> Result<Vec<(&'static str, u64, Decimal)>> {
        loyalty_platform::types::tenant(tenant_id)?;
        let at = as_of.unwrap_or_else(|| self.clock.now_ms());
        self.with(tenant_id, |r| {
            let tz = tenant_zone(r);
            Ok(kpi::rfm_overview(r, local_day(at, &tz))
                .into_iter()
                .map(|(n, c, s)| (n.as_str(), c, s))
                .collect())
        })
    }

    /// Checks an export request like a KPI query (member features need no period), pins
    /// its snapshot, and checks a resume token against it: a token continues only the
    /// export (tenant, kind, days, format) that handed it out.
    pub async fn export_job(
        &self,
        req: &Request,
        kind: Kind,
        format: &str,
        token: &str,
        rows: usize,
    ) -> Result<Job> {
        let scope = if kind == Kind::Members {
            loyalty_platform::types::tenant(&req.tenant_id)?;
            Scope::default()
        } else {
            self.with(&req.tenant_id, |r| Ok(self.scope(r, req)?.0))?
        };
        let binding = binding(&req.tenant_id, kind, &scope, format);
        let snapshot = self.store.snapshot().await?;
        let resume = Resume::parse(token, kind, binding)?;
        if let Some(Resume::Receipts(s, _)) = &resume
            && *s > snapshot
        {
            return Err(Error::invalid(
                "resume_token",
                "is not a token this export handed out",
            ));
        }
        let range = match (kind, req.period.start, req.period.end) {
            (Kind::Ledger, Some(start), Some(end)) => (start, end - 1),
            _ => (scope.from, scope.to),
        };
        Ok(Job {
            tenant_id: req.tenant_id.clone(),
            kind,
            range,
            scope,
            snapshot,
            resume,
            rows,
            binding,
        })
    }

    /// A page of receipt facts the scope admits, and where the next page starts (None
    /// when there is nothing more).
    #[allow(clippy::too_many_arguments)]
    pub async fn export_page(
        &self,
        tenant_id: &str,
        kind: Receipts,
        scope: &Scope,
        range: (i64, i64),
        snapshot: u64,
        after: Option<Position>,
        limit: usize,
        max_bytes: usize,
    ) -> Result<(Vec<(Position, Fact)>, Option<Position>)> {
        let (from, to) = range;
        let page = self
            .store
            .page(tenant_id, kind, from, to, snapshot, after, limit, max_bytes)
            .await?;
        let next = if page.more {
            page.rows.last().map(|(p, _)| *p)
        } else {
            None
        };
        // The filter applies to what the rows say; the store pages by day only.
        let kept = page
            .rows
            .into_iter()
            .filter(|(_, f)| admits(scope, f))
            .collect();
        Ok((kept, next))
    }

    /// The business days of `req`'s period, checked like a KPI query's.
    pub(crate) fn days(&self, req: &Request) -> Result<(Day, Day)> {
        self.with(&req.tenant_id, |r| {
            let (scope, _) = self.scope(r, req)?;
            Ok((scope.from, scope.to))
        })
    }

    /// When each of `members` registered, for those the tenant's facts know.
    pub(crate) fn registered_at(
        &self,
        tenant_id: &str,
        members: &[&String],
    ) -> HashMap<String, Millis> {
        self.with(tenant_id, |r| {
            Ok(members
                .iter()
                .filter_map(|m| {
                    let at = r.profiles.get(&r.members.get(*m)?)?.registered_at?;
                    Some(((*m).clone(), at))
                })
                .collect())
        })
        .unwrap_or_default()
    }

    /// Member features after `after` (by member id), at most `limit`: each member's newest
    /// profile facts and their purchase summary, without personal data.
    pub fn member_features(
        &self,
        tenant_id: &str,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<MemberFeatures>> {
        self.with(tenant_id, |r| {
            use std::ops::Bound;
            let from = match after {
                Some(a) => Bound::Excluded(a),
                None => Bound::Unbounded,
            };
            let ids: Vec<(&String, u32)> = r
                .member_order
                .range::<str, _>((from, Bound::Unbounded))
                .take(limit.max(1))
                .map(|(id, i)| (id, *i))
                .collect();
            Ok(ids
                .into_iter()
                .map(|(id, i)| {
                    let days = r.member_days.get(&i);
                    let bought = || days.into_iter().flatten().filter(|(_, d)| d.receipts > 0);
                    MemberFeatures {
                        member_id: id.clone(),
                        profile: r.profiles.get(&i).cloned(),
                        first_purchase: bought().map(|(d, _)| *d).next(),
                        last_purchase: bought().map(|(d, _)| *d).next_back(),
                        receipts: days.into_iter().flatten().map(|(_, d)| d.receipts).sum(),
                        spend: days.into_iter().flatten().map(|(_, d)| d.paid).sum(),
                    }
                })
                .collect())
        })
    }
}

const CHANNEL_LIMIT: usize = 16;

/// What ties a resume token to its export: FNV-1a over tenant, kind, days and format.
fn binding(tenant_id: &str, kind: Kind, scope: &Scope, format: &str) -> u64 {
    let text = format!(
        "{tenant_id}\0{}\0{}\0{}\0{format}",
        kind.name(),
        scope.from,
        scope.to
    );
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

fn admits(scope: &Scope, fact: &Fact) -> bool {
    let (outlet, channel) = match fact {
        Fact::Purchase(p) => (&p.outlet, p.channel),
        Fact::Refund(r) => (&r.outlet, r.channel),
        Fact::Member(_) | Fact::Ledger(_) => return true,
    };
    (scope.stores.is_empty() || scope.stores.contains(&outlet.store_id))
        && (scope.brands.is_empty() || scope.brands.contains(&outlet.brand))
        && (scope.regions.is_empty() || scope.regions.contains(&outlet.region))
        && (scope.channels.is_empty() || scope.channels.contains(&channel))
}

/// One member's row of the member features export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberFeatures {
    pub member_id: String,
    /// None when no member event arrived for them (they are known from purchases only).
    pub profile: Option<Member>,
    pub first_purchase: Option<Day>,
    pub last_purchase: Option<Day>,
    /// Receipts that still count, and the money paid net of refunds, over all time.
    pub receipts: i64,
    pub spend: Decimal,
}
