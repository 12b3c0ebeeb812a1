//! RFM: recency, frequency and monetary scores 1-5 by quintiles within a tenant, and the
//! named segments they map to. Pure: segmentation scores its members with it on a schedule,
//! reporting its RFM overview.
//!
//! Inputs per member who has bought (at least one receipt that still counts):
//! - recency: whole days since the last purchase (fewer is better);
//! - frequency: receipts in the last 365 days;
//! - monetary: spend in the last 365 days.
//!
//! A member's score on each is `1 + ⌊5 · w / n⌋`, where `n` is the number of members scored
//! and `w` the number of them with a strictly worse value. Equal values get equal scores, the
//! best fifth gets 5, and a tenant of one member scores 1 on everything.

use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};

/// The named RFM segments, in the order their rules are tried (first match wins), with
/// `FM = ⌈(F + M) / 2⌉`:
///
/// | segment | rule |
/// |---|---|
/// | new customers | R = 5, F = 1 |
/// | promising | R = 4, F = 1 |
/// | champions | R ≥ 4, FM ≥ 4 |
/// | loyal | R ≥ 3, FM ≥ 3 |
/// | potential loyalists | R ≥ 4 |
/// | need attention | R = 3, FM = 2 |
/// | about to sleep | R = 3 |
/// | can't lose | R ≤ 2, FM = 5 |
/// | at risk | R ≤ 2, FM ≥ 3 |
/// | hibernating | R = 2 |
/// | lost | R = 1 |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Named {
    Champions,
    Loyal,
    PotentialLoyalists,
    NewCustomers,
    Promising,
    NeedAttention,
    AboutToSleep,
    AtRisk,
    CannotLose,
    Hibernating,
    Lost,
}

impl Named {
    pub fn of(r: u8, f: u8, m: u8) -> Named {
        let fm = (f + m).div_ceil(2);
        match (r, f, fm) {
            (5, 1, _) => Named::NewCustomers,
            (4, 1, _) => Named::Promising,
            (4.., _, 4..) => Named::Champions,
            (3.., _, 3..) => Named::Loyal,
            (4.., _, _) => Named::PotentialLoyalists,
            (3, _, 2) => Named::NeedAttention,
            (3, _, _) => Named::AboutToSleep,
            (_, _, 5) => Named::CannotLose,
            (_, _, 3..) => Named::AtRisk,
            (2, _, _) => Named::Hibernating,
            _ => Named::Lost,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Named::Champions => "champions",
            Named::Loyal => "loyal",
            Named::PotentialLoyalists => "potential_loyalists",
            Named::NewCustomers => "new_customers",
            Named::Promising => "promising",
            Named::NeedAttention => "need_attention",
            Named::AboutToSleep => "about_to_sleep",
            Named::AtRisk => "at_risk",
            Named::CannotLose => "cannot_lose",
            Named::Hibernating => "hibernating",
            Named::Lost => "lost",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Score {
    pub recency: u8,
    pub frequency: u8,
    pub monetary: u8,
    pub named: Named,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Inputs {
    pub member_id: String,
    pub recency_days: i64,
    pub frequency: i64,
    pub monetary: Decimal,
}

/// Scores for values where `better(a, b)` orders them worst first: the score of each index.
fn quintiles<T: Ord + Copy>(values: &[T]) -> Vec<u8> {
    let n = values.len();
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by_key(|&i| values[i]);
    let mut scores = vec![1u8; n];
    let mut worse = 0usize;
    let mut i = 0;
    while i < n {
        // Members tied with order[i]: all have `worse` strictly worse members.
        let mut j = i;
        while j < n && values[order[j]] == values[order[i]] {
            j += 1;
        }
        let score = 1 + (5 * worse / n) as u8;
        for &k in &order[i..j] {
            scores[k] = score.min(5);
        }
        worse = j;
        i = j;
    }
    scores
}

/// Scores every member. O(n log n).
pub fn score_all(inputs: &[Inputs]) -> Vec<Score> {
    // Recency: fewer days is better, so order by the negated days (worst = most days first).
    let recency: Vec<i64> = inputs.iter().map(|x| -x.recency_days).collect();
    let frequency: Vec<i64> = inputs.iter().map(|x| x.frequency).collect();
    let monetary: Vec<Decimal> = inputs.iter().map(|x| x.monetary).collect();
    let (r, f, m) = (
        quintiles(&recency),
        quintiles(&frequency),
        quintiles(&monetary),
    );
    (0..inputs.len())
        .map(|i| Score {
            recency: r[i],
            frequency: f[i],
            monetary: m[i],
            named: Named::of(r[i], f[i], m[i]),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, computed the slow and obvious way.
    fn straightforward(inputs: &[Inputs]) -> Vec<(u8, u8, u8)> {
        let n = inputs.len();
        let score = |worse: usize| 1 + (5 * worse / n) as u8;
        inputs
            .iter()
            .map(|x| {
                let r = inputs
                    .iter()
                    .filter(|y| y.recency_days > x.recency_days)
                    .count();
                let f = inputs.iter().filter(|y| y.frequency < x.frequency).count();
                let m = inputs.iter().filter(|y| y.monetary < x.monetary).count();
                (score(r), score(f), score(m))
            })
            .collect()
    }

    /// A generated population: a deterministic pseudo-random walk, with many ties.
    fn population(n: usize, seed: u64) -> Vec<Inputs> {
        let mut x = seed;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        (0..n)
            .map(|i| Inputs {
                member_id: format!("m{i}"),
                recency_days: (next() % 400) as i64,
                frequency: (next() % 12) as i64,
                monetary: Decimal::new((next() % 5_000_000) as i64, 2),
            })
            .collect()
    }

    #[test]
    fn scores_match_a_straightforward_computation() {
        for (n, seed) in [(1, 1), (2, 2), (5, 3), (37, 4), (1000, 5), (2500, 6)] {
            let people = population(n, seed);
            let fast: Vec<(u8, u8, u8)> = score_all(&people)
                .iter()
                .map(|s| (s.recency, s.frequency, s.monetary))
                .collect();
            assert_eq!(fast, straightforward(&people), "n = {n}");
        }
    }

    #[test]
    fn quintiles_split_a_population_into_fifths() {
        let people: Vec<Inputs> = (0..100)
            .map(|i| Inputs {
                member_id: format!("m{i}"),
                recency_days: i,
                frequency: i,
                monetary: Decimal::from(i),
            })
            .collect();
        let scores = score_all(&people);
        for s in 1..=5u8 {
            assert_eq!(scores.iter().filter(|x| x.frequency == s).count(), 20);
            assert_eq!(scores.iter().filter(|x| x.recency == s).count(), 20);
        }
        // The most recent buyer is the best on recency; the biggest spender on the others.
        assert_eq!(scores[0].recency, 5);
        assert_eq!((scores[99].frequency, scores[99].monetary), (5, 5));
        assert_eq!(scores[99].recency, 1);
        assert_eq!(score_all(&people[..1])[0].recency, 1);
    }

    #[test]
    fn named_segments_follow_the_table() {
        assert_eq!(Named::of(5, 1, 1), Named::NewCustomers);
        assert_eq!(Named::of(4, 1, 5), Named::Promising);
        assert_eq!(Named::of(5, 5, 5), Named::Champions);
        assert_eq!(Named::of(4, 4, 3), Named::Champions);
        assert_eq!(Named::of(3, 4, 4), Named::Loyal);
        assert_eq!(Named::of(5, 2, 3), Named::Loyal);
        assert_eq!(Named::of(5, 2, 2), Named::PotentialLoyalists);
        assert_eq!(Named::of(3, 2, 2), Named::NeedAttention);
        assert_eq!(Named::of(3, 1, 1), Named::AboutToSleep);
        assert_eq!(Named::of(1, 5, 5), Named::CannotLose);
        assert_eq!(Named::of(2, 3, 3), Named::AtRisk);
        assert_eq!(Named::of(2, 2, 1), Named::Hibernating);
        assert_eq!(Named::of(1, 1, 2), Named::Lost);
        // Every combination has a name.
        for r in 1..=5 {
            for f in 1..=5 {
                for m in 1..=5 {
                    let _ = Named::of(r, f, m);
                }
            }
        }
    }
}
