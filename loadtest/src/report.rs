//! Reports: a JSON file close to ghz's format (so existing tooling reads it) and an HTML page
//! with latency-over-time and throughput charts and a summary a manager can read.

use std::fmt::Write as _;

use serde_json::{Value, json};

use crate::stats::{RpcStats, Stats};

const PERCENTILES: [f64; 6] = [50.0, 75.0, 90.0, 99.0, 99.9, 100.0];

/// What was run, for the report's header.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RunInfo {
    pub date: String,
    pub targets: Vec<String>,
    pub scenario: String,
    pub mode: String,
    /// The constant offered rate, when there was one (open loop, constant shape).
    pub offered_rate: Option<f64>,
    pub duration_secs: f64,
    pub warmup_secs: f64,
    pub model: crate::model::ModelConfig,
}

fn ns(micros: u64) -> u64 {
    micros.saturating_mul(1000)
}

/// RFC 3339 in UTC, with microseconds when `fraction`, without pulling a date library.
pub fn rfc3339(unix_micros: u64, fraction: bool) -> String {
    let secs = unix_micros / 1_000_000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let sub = if fraction {
        format!(".{:06}", unix_micros % 1_000_000)
    } else {
        String::new()
    };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}{sub}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// ghz's `histogram`: ten equal-width bins from the fastest to the slowest call, each with
/// its upper mark in seconds, its count and its share of all calls.
fn latency_bins(h: &hdrhistogram::Histogram<u64>) -> Vec<Value> {
    let total = h.len();
    if total == 0 {
        return Vec::new();
    }
    let (lo, hi) = (h.min(), h.max());
    let width = ((hi - lo) as f64 / 10.0).max(1.0);
    let mut counts = [0u64; 11];
    for v in h.iter_recorded() {
        let bin = ((h.highest_equivalent(v.value_iterated_to()).min(hi) - lo) as f64 / width).ceil()
            as usize;
        counts[bin.min(10)] += v.count_at_value();
    }
    counts
        .iter()
        .enumerate()
        .map(|(i, n)| {
            json!({
                "mark": (lo as f64 + width * i as f64) / 1e6,
                "count": n,
                "frequency": *n as f64 / total as f64,
            })
        })
        .collect()
}

/// ghz's `details`: the sampled calls, each with its due time, latency (ns) and status.
fn details(stats: &Stats) -> Vec<Value> {
    let mut sample: Vec<_> = stats.details.iter().collect();
    sample.sort_by_key(|d| d.offset_micros);
    sample
        .into_iter()
        .map(|d| {
            json!({
                "timestamp": rfc3339(stats.measured_from_unix_micros.saturating_add(d.offset_micros), true),
                "latency": ns(d.latency_micros),
                "error": d.error.as_deref().unwrap_or(""),
                "status": d.code,
                "rpc": d.rpc.method(),
            })
        })
        .collect()
}

fn rpc_json(s: &RpcStats, seconds: f64) -> Value {
    let h = &s.latency;
    let count = h.len();
    json!({
        "count": count,
        "offered": s.offered,
        "offeredRps": s.offered as f64 / seconds,
        "rps": count as f64 / seconds,
        "total": (seconds * 1e9) as u64,
        "average": if count == 0 { 0 } else { ns(h.mean() as u64) },
        "fastest": if count == 0 { 0 } else { ns(h.min()) },
        "slowest": ns(h.max()),
        "latencyDistribution": PERCENTILES.iter().map(|p| json!({
            "percentage": p,
            "latency": if count == 0 { 0 } else { ns(h.value_at_percentile(*p)) },
        })).collect::<Vec<_>>(),
        "statusCodeDistribution": s.codes,
        "errorDistribution": s.errors,
    })
}

/// The JSON report: ghz's top-level fields for all calls together, plus `rpcs` per method
/// and a per-second `timeline`.
pub fn json(info: &RunInfo, stats: &Stats) -> Value {
    let seconds = info.duration_secs.max(1e-9);
    let mut top = rpc_json(&stats.total(), seconds);
    let obj = top.as_object_mut().map(std::mem::take).unwrap_or_default();
    let mut out = serde_json::Map::new();
    out.insert(
        "name".into(),
        json!(format!("loyalty-loadtest {}", info.scenario)),
    );
    out.insert("date".into(), json!(info.date));
    out.insert("endReason".into(), json!(stats.end_reason));
    out.insert("options".into(), json!(info));
    out.extend(obj);
    let all = stats.total();
    out.insert("histogram".into(), json!(latency_bins(&all.latency)));
    out.insert("details".into(), json!(details(stats)));
    out.insert("detailsSampledFrom".into(), json!(stats.seen));
    out.insert("dropped".into(), json!(stats.dropped));
    out.insert("unfinished".into(), json!(stats.unfinished()));
    out.insert(
        "sendLag".into(),
        json!({
            "p50Us": stats.send_lag.value_at_quantile(0.5),
            "p99Us": stats.send_lag.value_at_quantile(0.99),
            "maxUs": stats.send_lag.max(),
        }),
    );
    out.insert("timelineBucketSecs".into(), json!(stats.bucket_secs));
    out.insert(
        "rpcs".into(),
        Value::Object(
            stats
                .rpcs
                .iter()
                .map(|(rpc, s)| (rpc.method().to_string(), rpc_json(s, seconds)))
                .collect(),
        ),
    );
    out.insert(
        "timeline".into(),
        Value::Array(
            stats
                .timeline
                .iter()
                .enumerate()
                .map(|(i, t)| {
                    let q = |p: f64| {
                        if t.completed == 0 {
                            0
                        } else {
                            t.latency.value_at_quantile(p)
                        }
                    };
                    json!({"second": i as u64 * stats.bucket_secs, "count": t.completed, "errors": t.errors,
                           "p50Us": q(0.5), "p99Us": q(0.99), "maxUs": t.latency.max()})
                })
                .collect(),
        ),
    );
    Value::Object(out)
}

fn ms(micros: u64) -> String {
    format!("{:.2}", micros as f64 / 1000.0)
}

/// A line chart as inline SVG: no scripts, no external files.
fn chart(title: &str, unit: &str, bucket_secs: u64, series: &[(&str, &str, Vec<f64>)]) -> String {
    let (w, h, pad) = (760.0, 220.0, 40.0);
    let n = series.iter().map(|s| s.2.len()).max().unwrap_or(0).max(2);
    let max = series
        .iter()
        .flat_map(|s| s.2.iter().copied())
        .fold(0.0_f64, f64::max)
        .max(1e-9);
    let mut svg = format!(
        "<figure><figcaption>{title}</figcaption><svg viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\">\
         <line x1=\"{pad}\" y1=\"{y0}\" x2=\"{x1}\" y2=\"{y0}\" stroke=\"#999\"/>\
         <line x1=\"{pad}\" y1=\"10\" x2=\"{pad}\" y2=\"{y0}\" stroke=\"#999\"/>\
         <text x=\"2\" y=\"16\" font-size=\"11\">{max:.1} {unit}</text>\
         <text x=\"{pad}\" y=\"{yl}\" font-size=\"11\">0 s</text><text x=\"{xl}\" y=\"{yl}\" font-size=\"11\">{last} s</text>",
        y0 = h - pad,
        x1 = w - 10.0,
        yl = h - pad + 14.0,
        xl = w - 50.0,
        last = (n as u64 - 1) * bucket_secs,
    );
    for (i, (name, color, values)) in series.iter().enumerate() {
        let points: Vec<String> = values
            .iter()
            .enumerate()
            .map(|(x, v)| {
                let px = pad + (w - pad - 10.0) * x as f64 / (n - 1) as f64;
                let py = (h - pad) - (h - pad - 10.0) * v / max;
                format!("{px:.1},{py:.1}")
            })
            .collect();
        let _ = write!(
            svg,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\" points=\"{}\"/>\
             <text x=\"{}\" y=\"16\" font-size=\"11\" fill=\"{color}\">{name}</text>",
            points.join(" "),
            120.0 + 90.0 * i as f64
        );
    }
    svg.push_str("</svg></figure>");
    svg
}

/// A few sentences for whoever reads the report first.
pub fn summary(info: &RunInfo, stats: &Stats) -> String {
    let total = stats.total();
    let seconds = info.duration_secs.max(1e-9);
    let done = total.completed();
    let failed = total.failed();
    let load = match info.offered_rate {
        Some(rate) => format!("{} at {rate:.0} calls/s", info.mode),
        None => format!(
            "{}, {:.0} calls/s offered on average",
            info.mode,
            total.offered as f64 / seconds
        ),
    };
    let mut text = format!(
        "During {:.0} s of the {} scenario ({load}) against {}, ",
        info.duration_secs,
        info.scenario,
        info.targets.join(", "),
    );
    if done == 0 {
        text.push_str("no call completed.");
    } else {
        let _ = write!(
            text,
            "the system completed {done} calls ({:.0} calls/s). Half of them finished within {} ms and 99% within {} ms, \
             measured from the moment each call was due to be sent, so queueing delays count.",
            done as f64 / seconds,
            ms(total.latency.value_at_quantile(0.5)),
            ms(total.latency.value_at_quantile(0.99)),
        );
    }
    let unfinished = stats.unfinished();
    if failed == 0 && stats.dropped == 0 && unfinished == 0 {
        text.push_str(" No call failed.");
    } else {
        let _ = write!(
            text,
            " {failed} calls failed ({:.2}%; their latencies are included above), {} could not be sent because too many were \
             already waiting, and {unfinished} had not finished when the run ended.",
            100.0 * failed as f64 / done.max(1) as f64,
            stats.dropped
        );
    }
    if !stats.send_lag.is_empty() && stats.send_lag.value_at_quantile(0.99) > 5_000 {
        let _ = write!(
            text,
            " Note: the load generator itself sent 1% of calls more than {} ms late, and that lag is part of the latencies; \
             run it on another machine for cleaner figures.",
            ms(stats.send_lag.value_at_quantile(0.99))
        );
    }
    text
}

/// The HTML report.
pub fn html(info: &RunInfo, stats: &Stats) -> String {
    let mut rows = String::new();
    let seconds = info.duration_secs.max(1e-9);
    for (rpc, s) in &stats.rpcs {
        let h = &s.latency;
        let q = |p: f64| {
            if h.is_empty() {
                "-".to_string()
            } else {
                ms(h.value_at_quantile(p))
            }
        };
        let _ = write!(
            rows,
            "<tr><td>{}</td><td>{:.0}</td><td>{:.0}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            rpc.method(),
            s.offered as f64 / seconds,
            s.completed() as f64 / seconds,
            s.failed(),
            q(0.5),
            q(0.9),
            q(0.99),
            q(0.999),
            if h.is_empty() {
                "-".into()
            } else {
                ms(h.max())
            },
        );
    }
    let throughput: Vec<f64> = stats.timeline.iter().map(|t| t.completed as f64).collect();
    let errors: Vec<f64> = stats.timeline.iter().map(|t| t.errors as f64).collect();
    let p50: Vec<f64> = stats
        .timeline
        .iter()
        .map(|t| t.latency.value_at_quantile(0.5) as f64 / 1000.0)
        .collect();
    let p99: Vec<f64> = stats
        .timeline
        .iter()
        .map(|t| t.latency.value_at_quantile(0.99) as f64 / 1000.0)
        .collect();
    let errors_table: String = stats
        .total()
        .errors
        .iter()
        .map(|(e, n)| format!("<tr><td>{}</td><td>{n}</td></tr>", escape(e)))
        .collect();
    format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Load test: {scenario}</title>\
         <style>body{{font-family:sans-serif;max-width:820px;margin:2em auto}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}td:first-child{{text-align:left}}</style></head><body>\
         <h1>Load test: {scenario}</h1><p>{date} · targets {targets} · {mode} · warm-up {warmup:.0} s excluded</p>\
         <p>{summary}</p>\
         <h2>Per call (latency in ms)</h2><table><tr><th>RPC</th><th>offered/s</th><th>done/s</th><th>failed</th>\
         <th>p50</th><th>p90</th><th>p99</th><th>p99.9</th><th>max</th></tr>{rows}</table>\
         {c1}{c2}<h2>Errors</h2><table><tr><th>status: message</th><th>count</th></tr>{errors_table}</table></body></html>",
        scenario = escape(&info.scenario),
        date = escape(&info.date),
        targets = escape(&info.targets.join(", ")),
        mode = escape(&info.mode),
        warmup = info.warmup_secs,
        summary = escape(&summary(info, stats)),
        c1 = chart(
            &format!("Completed calls per {} s", stats.bucket_secs),
            "calls",
            stats.bucket_secs,
            &[
                ("completed", "#1f77b4", throughput),
                ("failed", "#d62728", errors)
            ]
        ),
        c2 = chart(
            &format!("Latency per {} s", stats.bucket_secs),
            "ms",
            stats.bucket_secs,
            &[("p50", "#2ca02c", p50), ("p99", "#ff7f0e", p99)]
        ),
    )
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Rpc;

    fn info(rate: Option<f64>) -> RunInfo {
        RunInfo {
            date: "2026-11-22T00:00:00Z".into(),
            targets: vec!["http://127.0.0.1:1".into()],
            scenario: "steady".into(),
            mode: "open loop".into(),
            offered_rate: rate,
            duration_secs: 10.0,
            warmup_secs: 0.0,
            model: crate::model::ModelConfig::default(),
        }
    }

    #[test]
    fn a_run_where_nothing_completed_says_so() {
        let mut stats = Stats::for_duration(10);
        for _ in 0..5 {
            stats.offered(Rpc::Commit);
        }
        let text = summary(&info(Some(100.0)), &stats);
        assert!(text.contains("no call completed"), "{text}");
        assert!(text.contains("5 had not finished"), "{text}");
        assert!(!text.contains("No call failed"), "{text}");
        let j = json(&info(Some(100.0)), &stats);
        assert_eq!(j["unfinished"], 5);
        assert!(html(&info(None), &stats).contains("<svg"));
    }

    #[test]
    fn a_clean_run_reports_percentiles_in_nanoseconds() {
        let mut stats = Stats::for_duration(10);
        for i in 1..=10u64 {
            stats.offered(Rpc::Quote);
            stats.record(Rpc::Quote, i * 1000, i * 100, "OK", None);
        }
        let text = summary(&info(None), &stats);
        assert!(
            text.contains("No call failed") && text.contains("1 calls/s offered on average"),
            "{text}"
        );
        let j = json(&info(None), &stats);
        let p99 = j["latencyDistribution"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["percentage"] == 99.0)
            .unwrap()["latency"]
            .as_u64()
            .unwrap();
        assert!((990_000..=1_000_000).contains(&p99), "{p99}");
        // ghz's histogram: eleven marks from the fastest to the slowest, counts adding up.
        let bins = j["histogram"].as_array().unwrap();
        assert_eq!(bins.len(), 11);
        assert_eq!(
            bins.iter()
                .map(|b| b["count"].as_u64().unwrap())
                .sum::<u64>(),
            10
        );
        assert!((bins[0]["mark"].as_f64().unwrap() - 0.0001).abs() < 1e-6);
        // ...and the calls one by one, in order, with their status.
        let details = j["details"].as_array().unwrap();
        assert_eq!(details.len(), 10);
        assert_eq!(details[9]["latency"], 1_000_000);
        assert_eq!(details[9]["status"], "OK");
        assert_eq!(details[0]["timestamp"], "1970-01-01T00:00:00.001000Z");
        assert_eq!(j["endReason"], "timeout");
    }

    #[test]
    fn timestamps() {
        assert_eq!(
            rfc3339(1_795_000_000_123_456, true),
            "2026-11-18T11:06:40.123456Z"
        );
        assert_eq!(
            rfc3339(1_795_000_000_123_456, false),
            "2026-11-18T11:06:40Z"
        );
    }
}
