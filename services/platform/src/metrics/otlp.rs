//! The same metrics over OTLP: when `metrics.otlp_endpoint` is set, every counter, gauge and
//! histogram recorded through the `metrics` facade also feeds an OpenTelemetry instrument of
//! the same name and labels, and a periodic reader pushes them (cumulative) to the endpoint.
//! With no endpoint none of this exists and recording costs one atomic load more.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Duration;

use anyhow::Context as _;
use metrics::{CounterFn, GaugeFn, HistogramFn, Key, SharedString};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};

use crate::config::MetricsConfig;

use super::{DURATION_BUCKETS, cached};

static BRIDGE: OnceLock<Bridge> = OnceLock::new();

/// The OTLP side when it is on.
pub(super) fn bridge() -> Option<&'static Bridge> {
    BRIDGE.get()
}

/// Starts exporting metrics to `config.otlp_endpoint` and returns the provider to shut down
/// (which pushes what is left). `None` when no endpoint is set, or when an earlier call in
/// this process already started the export (tests). Must run inside the Tokio runtime.
pub fn start(
    config: &MetricsConfig,
    service_name: &str,
) -> anyhow::Result<Option<SdkMeterProvider>> {
    let Some(endpoint) = &config.otlp_endpoint else {
        return Ok(None);
    };
    if BRIDGE.get().is_some() {
        return Ok(None);
    }
    let exporter = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_millis(config.export_timeout_ms))
        .build()
        .context("cannot set up the otlp metric exporter")?;
    let reader = PeriodicReader::builder(exporter)
        .with_interval(Duration::from_millis(config.export_interval_ms))
        .build();
    let provider = SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service_name.to_owned())
                .build(),
        )
        .build();
    let bridge = Bridge::new(provider.meter("loyalty"));
    if BRIDGE.set(bridge).is_err() {
        return Ok(None);
    }
    // The facade's recorder must exist for anything to reach the bridge.
    super::recorder();
    tracing::info!(
        endpoint = endpoint.as_str(),
        interval_ms = config.export_interval_ms,
        "exporting metrics over otlp"
    );
    Ok(Some(provider))
}

/// One OpenTelemetry instrument per metric name, one handle per name and label set.
pub(super) struct Bridge {
    meter: Meter,
    descriptions: RwLock<HashMap<String, SharedString>>,
    counters: Instruments<opentelemetry::metrics::Counter<u64>>,
    gauges: Instruments<opentelemetry::metrics::Gauge<f64>>,
    histograms: Instruments<opentelemetry::metrics::Histogram<f64>>,
}

type Instruments<T> = RwLock<HashMap<String, T>>;

fn attributes(key: &Key) -> Vec<KeyValue> {
    key.labels()
        .map(|l| KeyValue::new(l.key().to_owned(), l.value().to_owned()))
        .collect()
}

impl Bridge {
    fn new(meter: Meter) -> Self {
        Self {
            meter,
            descriptions: RwLock::default(),
            counters: RwLock::default(),
            gauges: RwLock::default(),
            histograms: RwLock::default(),
        }
    }

    pub(super) fn describe(&self, name: &str, description: SharedString) {
        self.descriptions
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_owned(), description);
    }

    fn description(&self, name: &str) -> String {
        self.descriptions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(name)
            .map(|d| d.to_string())
            .unwrap_or_default()
    }

    pub(super) fn counter(&self, key: &Key) -> Arc<OtlpCounter> {
        let name = key.name();
        let counter = cached(&self.counters, name, || {
            self.meter
                .u64_counter(name.to_owned())
                .with_description(self.description(name))
                .build()
        });
        Arc::new(OtlpCounter {
            counter,
            attributes: attributes(key),
            last: AtomicU64::new(0),
        })
    }

    pub(super) fn gauge(&self, key: &Key) -> Arc<OtlpGauge> {
        let name = key.name();
        let gauge = cached(&self.gauges, name, || {
            self.meter
                .f64_gauge(name.to_owned())
                .with_description(self.description(name))
                .build()
        });
        Arc::new(OtlpGauge {
            gauge,
            attributes: attributes(key),
            value: Mutex::new(0.0),
        })
    }

    pub(super) fn histogram(&self, key: &Key) -> Arc<OtlpHistogram> {
        let name = key.name();
        let histogram = cached(&self.histograms, name, || {
            let builder = self
                .meter
                .f64_histogram(name.to_owned())
                .with_description(self.description(name));
            if name.ends_with("_seconds") {
                builder
                    .with_unit("s")
                    .with_boundaries(DURATION_BUCKETS.to_vec())
                    .build()
            } else {
                builder.build()
            }
        });
        Arc::new(OtlpHistogram {
            histogram,
            attributes: attributes(key),
        })
    }
}

pub(super) struct OtlpCounter {
    counter: opentelemetry::metrics::Counter<u64>,
    attributes: Vec<KeyValue>,
    /// The largest value `absolute` was given, so it adds only what is new.
    last: AtomicU64,
}

impl CounterFn for OtlpCounter {
    fn increment(&self, value: u64) {
        self.counter.add(value, &self.attributes);
    }

    fn absolute(&self, value: u64) {
        let before = self.last.fetch_max(value, Ordering::AcqRel);
        if value > before {
            self.counter.add(value - before, &self.attributes);
        }
    }
}

pub(super) struct OtlpGauge {
    gauge: opentelemetry::metrics::Gauge<f64>,
    attributes: Vec<KeyValue>,
    /// The current value, for `increment` and `decrement`; recorded under the lock so
    /// concurrent changes are recorded in the order they were made.
    value: Mutex<f64>,
}

impl OtlpGauge {
    fn update(&self, change: impl Fn(f64) -> f64) {
        let mut value = self.value.lock().unwrap_or_else(|e| e.into_inner());
        *value = change(*value);
        self.gauge.record(*value, &self.attributes);
    }
}

impl GaugeFn for OtlpGauge {
    fn increment(&self, value: f64) {
        self.update(|v| v + value);
    }

    fn decrement(&self, value: f64) {
        self.update(|v| v - value);
    }

    fn set(&self, value: f64) {
        self.update(|_| value);
    }
}

pub(super) struct OtlpHistogram {
    histogram: opentelemetry::metrics::Histogram<f64>,
    attributes: Vec<KeyValue>,
}

impl HistogramFn for OtlpHistogram {
    fn record(&self, value: f64) {
        self.histogram.record(value, &self.attributes);
    }
}
