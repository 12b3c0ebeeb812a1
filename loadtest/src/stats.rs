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
        }
    }
}

/// Latencies are recorded in microseconds, 1 µs to 5 minutes, 3 significant digits.
#[allow(clippy::expect_used)]
fn histogram() -> Histogram<u64> {
    // Constant, valid bounds: this cannot fail.
    Histogram::new_with_bounds(1, 300_000_000, 3).expect("valid histogram bounds")
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
            latency: histogram(),
        }
    }
}

/// Everything measured after warm-up.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    pub rpcs: BTreeMap<Rpc, RpcStats>,
    pub timeline: Vec<Second>,
    /// Sends skipped because the in-flight limit was reached (the target fell behind).
    pub dropped: u64,
}

impl Stats {
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
        if second < 86_400 {
            if self.timeline.len() <= second {
                self.timeline.resize_with(second + 1, Second::default);
            }
            let t = &mut self.timeline[second];
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
        assert_eq!(s.timeline.iter().map(|t| t.completed).sum::<u64>(), 100);
        assert_eq!(s.total().errors.values().sum::<u64>(), 1);
    }
}
