//! What a run measured: per RPC a latency histogram (from the scheduled send time), status
//! codes and counts, plus a per-second timeline for the charts.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;

/// The calls the load test makes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub enum Rpc {
    RegisterMember,
    LookupMember,
    Quote,
    Commit,
    Refund,
    GetBalance,
    Accrue,
    Redeem,
    GetMemberSegments,
}

impl Rpc {
    pub fn method(self) -> &'static str {
        match self {
            Rpc::RegisterMember => "loyalty.identity.v1.MemberService/RegisterMember",
            Rpc::LookupMember => "loyalty.identity.v1.MemberService/LookupMember",
            Rpc::Quote => "loyalty.promotion.v1.CheckoutService/Quote",
            Rpc::Commit => "loyalty.promotion.v1.CheckoutService/Commit",
            Rpc::Refund => "loyalty.promotion.v1.CheckoutService/Refund",
            Rpc::GetBalance => "loyalty.balance.v1.BalanceService/GetBalance",
            Rpc::Accrue => "loyalty.balance.v1.BalanceService/Accrue",
            Rpc::Redeem => "loyalty.balance.v1.BalanceService/Redeem",
            Rpc::GetMemberSegments => {
                "loyalty.segmentation.v1.SegmentationService/GetMemberSegments"
            }
        }
    }
}

/// Latencies are recorded in microseconds, 1 µs to 5 minutes, 3 significant digits.
#[allow(clippy::expect_used)]
fn histogram() -> Histogram<u64> {
    // Constant, valid bounds: this cannot fail.
    Histogram::new_with_bounds(1, 300_000_000, 3).expect("valid histogram bounds")
}

/// Per-bucket histograms of the timeline: 2 significant digits keep a long run small.
#[allow(clippy::expect_used)]
fn coarse_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 300_000_000, 2).expect("valid histogram bounds")
}

/// Most timeline buckets: longer runs get wider buckets, so memory stays bounded.
pub const MAX_TIMELINE_BUCKETS: usize = 1_800;

#[derive(Debug, Clone)]
pub struct RpcStats {
    pub offered: u64,
    pub latency: Histogram<u64>,
    pub codes: BTreeMap<String, u64>,
    pub errors: BTreeMap<String, u64>,
}

impl Default for RpcStats {
    fn default() -> Self {
        Self {
            offered: 0,
            latency: histogram(),
            codes: BTreeMap::new(),
            errors: BTreeMap::new(),
        }
    }
}

impl RpcStats {
    pub fn completed(&self) -> u64 {
        self.latency.len()
    }

    pub fn failed(&self) -> u64 {
        self.codes
            .iter()
            .filter(|(c, _)| *c != "OK")
            .map(|(_, n)| n)
            .sum()
    }
}

#[derive(Debug, Clone)]
pub struct Second {
    pub completed: u64,
    pub errors: u64,
    pub latency: Histogram<u64>,
}

impl Default for Second {
    fn default() -> Self {
        Self {
            completed: 0,
            errors: 0,
            latency: coarse_histogram(),
        }
    }
}

/// Everything measured after warm-up.
#[derive(Debug, Clone)]
pub struct Stats {
    pub rpcs: BTreeMap<Rpc, RpcStats>,
    /// One entry per `bucket_secs` seconds.
    pub timeline: Vec<Second>,
    pub bucket_secs: u64,
    /// Sends skipped because the in-flight limit was reached (the target fell behind).
    pub dropped: u64,
    /// How late the generator itself sent each call after its scheduled time (µs): part of
    /// every measured latency, reported so a struggling generator is not taken for the target.
    pub send_lag: Histogram<u64>,
    /// How long the measured phase really lasted (shorter than asked when `--count` ended it).
    pub measured_secs: f64,
}

impl Default for Stats {
    fn default() -> Self {
        Self::for_duration(0)
    }
}

impl Stats {
    /// Stats for a measured phase of `seconds`, with the timeline sized and bucketed for it.
    pub fn for_duration(seconds: u64) -> Self {
        let bucket_secs = seconds.div_ceil(MAX_TIMELINE_BUCKETS as u64).max(1);
        let buckets = usize::try_from(seconds.div_ceil(bucket_secs))
            .unwrap_or(0)
            .min(MAX_TIMELINE_BUCKETS);
        Self {
            rpcs: BTreeMap::new(),
            timeline: (0..buckets).map(|_| Second::default()).collect(),
            bucket_secs,
            dropped: 0,
            send_lag: histogram(),
            measured_secs: seconds as f64,
        }
    }

    /// The timeline bucket holding measured second `second` (0 = the first after warm-up).
    pub fn bucket_at(&self, second: u64) -> Option<&Second> {
        self.timeline
            .get(usize::try_from(second / self.bucket_secs.max(1)).ok()?)
    }

    /// Calls offered but neither completed nor dropped: still running when the run ended.
    pub fn unfinished(&self) -> u64 {
        let total = self.total();
        total
            .offered
            .saturating_sub(total.completed() + self.dropped)
    }

    pub fn offered(&mut self, rpc: Rpc) {
        self.rpcs.entry(rpc).or_default().offered += 1;
    }

    /// Records one finished call: `second` since the end of warm-up, latency in µs, and the
    /// status code name ("OK" on success).
    pub fn record(
        &mut self,
        rpc: Rpc,
        second: usize,
        micros: u64,
        code: &str,
        message: Option<&str>,
    ) {
        let s = self.rpcs.entry(rpc).or_default();
        let micros = micros.clamp(1, 300_000_000);
        let _ = s.latency.record(micros);
        *s.codes.entry(code.to_string()).or_default() += 1;
        if let Some(m) = message {
            let key = format!("{code}: {}", m.chars().take(120).collect::<String>());
            if s.errors.len() < 50 || s.errors.contains_key(&key) {
                *s.errors.entry(key).or_default() += 1;
            }
        }
        let bucket = second / usize::try_from(self.bucket_secs).unwrap_or(1).max(1);
        if bucket < MAX_TIMELINE_BUCKETS {
            if self.timeline.len() <= bucket {
                self.timeline.resize_with(bucket + 1, Second::default);
            }
            let t = &mut self.timeline[bucket];
            t.completed += 1;
            if code != "OK" {
                t.errors += 1;
            }
            let _ = t.latency.record(micros);
        }
    }

    /// All RPCs merged.
    pub fn total(&self) -> RpcStats {
        let mut all = RpcStats::default();
        for s in self.rpcs.values() {
            all.offered += s.offered;
            let _ = all.latency.add(&s.latency);
            for (c, n) in &s.codes {
                *all.codes.entry(c.clone()).or_default() += n;
            }
            for (e, n) in &s.errors {
                *all.errors.entry(e.clone()).or_default() += n;
            }
        }
        all
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_runs_get_wide_buckets_so_memory_stays_bounded() {
        let s = Stats::for_duration(86_400);
        assert_eq!(s.bucket_secs, 48);
        assert_eq!(s.timeline.len(), MAX_TIMELINE_BUCKETS);
        let s = Stats::for_duration(20);
        assert_eq!((s.bucket_secs, s.timeline.len()), (1, 20));
    }

    #[test]
    fn records_percentiles_codes_and_timeline() {
        let mut s = Stats::default();
        for i in 1..=100u64 {
            s.offered(Rpc::Commit);
            s.record(
                Rpc::Commit,
                (i / 50) as usize,
                i * 1000,
                if i == 100 { "UNAVAILABLE" } else { "OK" },
                (i == 100).then_some("down"),
            );
        }
        let c = &s.rpcs[&Rpc::Commit];
        assert_eq!(c.completed(), 100);
        assert_eq!(c.failed(), 1);
        let p99 = c.latency.value_at_quantile(0.99);
        assert!((98_000..=100_000).contains(&p99), "{p99}");
        assert_eq!(s.timeline.len(), 3);
        assert_eq!(s.unfinished(), 0);
        assert_eq!(s.timeline.iter().map(|t| t.completed).sum::<u64>(), 100);
        assert_eq!(s.total().errors.values().sum::<u64>(), 1);
    }
}
