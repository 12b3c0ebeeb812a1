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

/// Most calls kept one by one for the report's `details` (a uniform sample of the run).
pub const MAX_DETAILS: usize = 10_000;

/// One measured call, as ghz lists them in `details`.
#[derive(Debug, Clone, PartialEq)]
pub struct Detail {
    pub rpc: Rpc,
    /// When it was due, in µs after the end of warm-up.
    pub offset_micros: u64,
    pub latency_micros: u64,
    pub code: String,
    pub error: Option<String>,
}

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
    /// A uniform sample of at most `MAX_DETAILS` measured calls (reservoir sampling).
    pub details: Vec<Detail>,
    /// Calls the sample was drawn from.
    pub seen: u64,
    /// The sampler's state (xorshift64): deterministic, no shared RNG behind a lock.
    sampler: u64,
    /// Wall-clock end of warm-up (µs since the Unix epoch), for the details' timestamps.
    pub measured_from_unix_micros: u64,
    /// Why the run ended, in ghz's words: "timeout" (the duration passed) or "normal"
    /// (`--count` calls were sent).
    pub end_reason: &'static str,
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
            details: Vec::new(),
            seen: 0,
            sampler: 0x9e37_79b9_7f4a_7c15,
            measured_from_unix_micros: 0,
            end_reason: "timeout",
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

    /// Records one finished call: when it was due (µs after the end of warm-up), its latency
    /// in µs, and the status code name ("OK" on success).
    pub fn record(
        &mut self,
        rpc: Rpc,
        offset_micros: u64,
        micros: u64,
        code: &str,
        message: Option<&str>,
    ) {
        let micros = micros.clamp(1, 300_000_000);
        self.sample(Detail {
            rpc,
            offset_micros,
            latency_micros: micros,
            code: code.to_string(),
            error: message.map(|m| m.chars().take(120).collect()),
        });
        let second = usize::try_from(offset_micros / 1_000_000).unwrap_or(usize::MAX);
        let s = self.rpcs.entry(rpc).or_default();
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

    /// Keeps `detail` with probability `MAX_DETAILS / seen` (Algorithm R).
    fn sample(&mut self, detail: Detail) {
        self.seen += 1;
        if self.details.len() < MAX_DETAILS {
            self.details.push(detail);
            return;
        }
        let mut x = self.sampler;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.sampler = x;
        if let Ok(k) = usize::try_from(x % self.seen)
            && let Some(slot) = self.details.get_mut(k)
        {
            *slot = detail;
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
                i / 50 * 1_000_000,
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
        assert_eq!(s.details.len(), 100);
        assert_eq!(s.details[99].code, "UNAVAILABLE");
        assert_eq!(s.details[99].error.as_deref(), Some("down"));
    }

    #[test]
    fn details_are_a_bounded_uniform_sample() {
        let mut s = Stats::for_duration(100);
        let n = 5 * MAX_DETAILS as u64;
        for i in 0..n {
            s.record(Rpc::Quote, i * 10, 100, "OK", None);
        }
        assert_eq!((s.details.len(), s.seen), (MAX_DETAILS, n));
        // Uniform over the run: about a fifth of the sample from each fifth of it.
        for fifth in 0..5 {
            let range = fifth * n * 2..(fifth + 1) * n * 2;
            let kept = s
                .details
                .iter()
                .filter(|d| range.contains(&d.offset_micros))
                .count();
            assert!((1_600..=2_400).contains(&kept), "fifth {fifth}: {kept}");
        }
    }
}
