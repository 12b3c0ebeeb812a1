//! Rate limits per API key and per tenant (`[rate_limits]`), checked by the access layer
//! after a caller is known and before the handler runs.
//!
//! Each key and each tenant has a bucket of `rate × burst_secs` calls that refills at `rate`
//! per second (the generic cell rate algorithm: one instant per bucket, no timer). A call over
//! either limit gets RESOURCE_EXHAUSTED with a `google.rpc.RetryInfo` saying when the next
//! call would pass. Our own processes (the `service` role) are never limited. Limits hold per
//! process: with N replicas behind a balancer a caller gets up to N times the rate.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::{Principal, Role};
use crate::config::RateLimitConfig;

/// Buckets kept per map before idle ones are dropped: callers are verified keys, so this
/// is reached only by a tenant with that many live keys.
const MAX_BUCKETS: usize = 100_000;

/// One bucket: when it will be empty again (its theoretical arrival time).
type Buckets = Mutex<HashMap<String, Instant>>;

/// The limits of one process.
#[derive(Debug)]
pub struct RateLimits {
    per_key: f64,
    per_tenant: f64,
    tenants: HashMap<String, f64>,
    burst: Duration,
    keys: Buckets,
    tenant_buckets: Buckets,
}

impl RateLimits {
    /// `None` when the configuration limits nothing.
    pub fn new(config: &RateLimitConfig) -> Option<Self> {
        let limits = Self {
            per_key: config.per_key,
            per_tenant: config.per_tenant,
            tenants: config.tenants.clone(),
            burst: Duration::from_secs_f64(config.burst_secs),
            keys: Mutex::new(HashMap::new()),
            tenant_buckets: Mutex::new(HashMap::new()),
        };
        let any = limits.per_key > 0.0
            || limits.per_tenant > 0.0
            || limits.tenants.values().any(|r| *r > 0.0);
        any.then_some(limits)
    }

    /// Whether `who` may make one more call at `now`; takes the call from both buckets
    /// only when both have room.
    pub fn admit(&self, who: &Principal, now: Instant) -> Result<(), Status> {
        if who.role == Role::Service || who.all_tenants {
            return Ok(());
        }
        let tenant_rate = self
            .tenants
            .get(&who.tenant_id)
            .copied()
            .unwrap_or(self.per_tenant);
        // The tenant's bucket is checked first but charged last, so a call the key's own
        // limit refuses costs the tenant nothing.
        if tenant_rate > 0.0 {
            self.wait(&self.tenant_buckets, &who.tenant_id, tenant_rate, now)
                .map_err(|wait| refused("tenant", &who.tenant_id, tenant_rate, wait))?;
        }
        if self.per_key > 0.0 {
            self.take(&self.keys, &who.key_id, self.per_key, now)
                .map_err(|wait| refused("API key", &who.key_id, self.per_key, wait))?;
        }
        if tenant_rate > 0.0
            && let Err(wait) = self.take(&self.tenant_buckets, &who.tenant_id, tenant_rate, now)
        {
            // Filled by a concurrent call since the check: the key gets its call back.
            if self.per_key > 0.0 {
                self.give_back(&self.keys, &who.key_id, self.per_key);
            }
            return Err(refused("tenant", &who.tenant_id, tenant_rate, wait));
        }
        Ok(())
    }

    /// Undoes one [`Self::take`] of `id`'s bucket.
    fn give_back(&self, buckets: &Buckets, id: &str, rate: f64) {
        let Ok(mut buckets) = buckets.lock() else {
            return;
        };
        if let Some(empty_at) = buckets.get_mut(id) {
            let interval = Duration::from_secs_f64(1.0 / rate);
            if let Some(earlier) = empty_at.checked_sub(interval) {
                *empty_at = earlier;
            }
        }
    }

    /// How long until `id`'s bucket has room; `Ok` when it has now.
    fn wait(&self, buckets: &Buckets, id: &str, rate: f64, now: Instant) -> Result<(), Duration> {
        let Ok(buckets) = buckets.lock() else {
            return Ok(());
        };
        match buckets.get(id) {
            Some(empty_at) => self.room(*empty_at, rate, now).map(|_| ()),
            None => Ok(()),
        }
    }

    /// Takes one call from `id`'s bucket, or says how long until there is room.
    fn take(&self, buckets: &Buckets, id: &str, rate: f64, now: Instant) -> Result<(), Duration> {
        // A poisoned lock means a panic elsewhere; limits must not turn it into an outage.
        let Ok(mut buckets) = buckets.lock() else {
            return Ok(());
        };
        let empty_at = buckets.get(id).copied().unwrap_or(now);
        let next = self.room(empty_at, rate, now)?;
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(id) {
            // Buckets already empty again hold nothing worth keeping.
            buckets.retain(|_, at| *at > now);
            if buckets.len() >= MAX_BUCKETS {
                return Ok(());
            }
        }
        buckets.insert(id.to_owned(), next);
        Ok(())
    }

    /// When the bucket would be empty after one more call, or how long until it may take one.
    fn room(&self, empty_at: Instant, rate: f64, now: Instant) -> Result<Instant, Duration> {
        let interval = Duration::from_secs_f64(1.0 / rate);
        let start = empty_at.max(now);
        let next = start + interval;
        // The bucket holds `burst` worth of calls (at least one).
        let allowance = self.burst.max(interval);
        match next.checked_duration_since(now) {
            Some(ahead) if ahead > allowance => Err(ahead - allowance),
            _ => Ok(next),
        }
    }
}

fn refused(scope: &str, id: &str, rate: f64, wait: Duration) -> Status {
    metrics::counter!("loyalty_rate_limited_total", "scope" => if scope == "tenant" { "tenant" } else { "key" })
        .increment(1);
    // Rounded up to a millisecond, so a client sleeping the hint is not refused again.
    let wait = Duration::from_millis(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX) + 1);
    Status::with_error_details(
        Code::ResourceExhausted,
        format!(
            "rate limit of {rate} calls per second for this {scope} ({}) reached; retry in {} ms",
            id.chars().take(64).collect::<String>(),
            wait.as_millis()
        ),
        ErrorDetails::with_retry_info(Some(wait)),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(key: &str, tenant: &str) -> Principal {
        Principal {
            key_id: key.into(),
            role: Role::Pos,
            tenant_id: tenant.into(),
            store_id: "s1".into(),
            member_id: String::new(),
            all_tenants: false,
        }
    }

    fn limits(per_key: f64, per_tenant: f64, burst_secs: f64) -> RateLimits {
        RateLimits::new(&RateLimitConfig {
            per_key,
            per_tenant,
            burst_secs,
            tenants: HashMap::from([("big".to_string(), 100.0)]),
        })
        .unwrap()
    }

    #[test]
    fn a_key_gets_its_burst_then_its_rate() {
        let l = limits(10.0, 0.0, 1.0);
        let t0 = Instant::now();
        let a = caller("a", "acme");
        // A second's worth at once, then nothing until a tenth of a second has passed.
        for i in 0..10 {
            assert!(l.admit(&a, t0).is_ok(), "call {i}");
        }
        let refused = l.admit(&a, t0).unwrap_err();
        assert_eq!(refused.code(), Code::ResourceExhausted);
        let retry = refused
            .get_details_retry_info()
            .unwrap()
            .retry_delay
            .unwrap();
        assert!(
            retry > Duration::from_millis(90) && retry <= Duration::from_millis(101),
            "{retry:?}"
        );
        assert!(
            refused.message().contains("this API key"),
            "{}",
            refused.message()
        );
        assert!(l.admit(&a, t0 + Duration::from_millis(101)).is_ok());
        assert!(l.admit(&a, t0 + Duration::from_millis(101)).is_err());
        // Another key has its own bucket.
        assert!(l.admit(&caller("b", "acme"), t0).is_ok());
        // Over ten seconds a key gets its rate, give or take the burst.
        let mut passed = 0;
        for ms in (200..10_200).step_by(5) {
            if l.admit(&a, t0 + Duration::from_millis(ms)).is_ok() {
                passed += 1;
            }
        }
        assert!((99..=101).contains(&passed), "{passed}");
    }

    #[test]
    fn a_tenant_shares_one_bucket_and_may_have_its_own_rate() {
        let l = limits(0.0, 5.0, 1.0);
        let t0 = Instant::now();
        for i in 0..5 {
            assert!(l.admit(&caller(&format!("k{i}"), "acme"), t0).is_ok());
        }
        let refused = l.admit(&caller("k9", "acme"), t0).unwrap_err();
        assert!(
            refused.message().contains("this tenant (acme)"),
            "{}",
            refused.message()
        );
        assert!(l.admit(&caller("k0", "other"), t0).is_ok(), "tenants apart");
        for i in 0..100 {
            assert!(l.admit(&caller(&format!("k{i}"), "big"), t0).is_ok());
        }
        assert!(l.admit(&caller("k0", "big"), t0).is_err());
    }

    #[test]
    fn a_call_the_key_limit_refuses_costs_the_tenant_nothing() {
        let l = limits(1.0, 3.0, 1.0);
        let t0 = Instant::now();
        assert!(l.admit(&caller("a", "acme"), t0).is_ok());
        for _ in 0..10 {
            assert!(l.admit(&caller("a", "acme"), t0).is_err());
        }
        assert!(l.admit(&caller("b", "acme"), t0).is_ok());
        assert!(l.admit(&caller("c", "acme"), t0).is_ok());
        assert!(
            l.admit(&caller("d", "acme"), t0).is_err(),
            "the tenant's three"
        );
    }

    #[test]
    fn our_own_services_and_empty_settings_are_not_limited() {
        let l = limits(1.0, 1.0, 1.0);
        let t0 = Instant::now();
        let mut service = caller("service", "");
        service.role = Role::Service;
        service.all_tenants = true;
        for _ in 0..100 {
            assert!(l.admit(&service, t0).is_ok());
        }
        assert!(RateLimits::new(&RateLimitConfig::default()).is_none());
    }
}
