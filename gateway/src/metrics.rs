//! Prometheus metrics for the proxy, rendered as text on `GET /metrics`.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;

use forge_layer::store::{CaptureCounters, Unsettled};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of `forge_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `chat`, `feedback`, `models` or `passthrough`.
    pub endpoint: &'static str,
    /// The HTTP status the client received.
    pub status: u16,
}

/// All of the gateway's metrics.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// Requests answered, by endpoint and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Requests being served now (a stream counts until it ends).
    pub in_flight: Gauge<i64, AtomicI64>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("forge");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests answered, by endpoint and status",
            requests.clone(),
        );
        let in_flight = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "in_flight",
            "Requests being served now; a stream counts until it ends",
            in_flight.clone(),
        );
        Self {
            registry,
            requests,
            in_flight,
        }
    }
}

impl Metrics {
    /// Counts one answered request.
    pub fn record(&self, endpoint: &'static str, status: http::StatusCode) {
        self.requests
            .get_or_create(&RequestLabels {
                endpoint,
                status: status.as_u16(),
            })
            .inc();
    }

    /// Exports the capture counters; their equation `captured + dropped + failed + pending ==
    /// eligible` holds in every scrape.
    pub fn register_capture(&mut self, counters: Arc<CaptureCounters>, unsettled: Arc<Unsettled>) {
        self.registry
            .register_collector(Box::new(CaptureCollector(counters, unsettled)));
    }

    /// Exports `forge_capture_expired_total`, the traces deleted for their age; returns the
    /// counter to add to.
    pub fn register_expired(&mut self) -> Counter {
        self.counter(
            "capture_expired",
            "Traces deleted for being older than capture.retention_days",
        )
    }

    /// Exports `forge_send_timeouts_total`, the client connections closed because a response
    /// write waited past `server.send_timeout_secs`; returns the counter to add to.
    pub fn register_send_timeouts(&mut self) -> Counter {
        self.counter(
            "send_timeouts",
            "Client connections closed because a response write waited past server.send_timeout_secs",
        )
    }

    /// Registers a counter (exported as `forge_{name}_total`) and returns it.
    fn counter(&mut self, name: &str, help: &str) -> Counter {
        let counter = Counter::default();
        self.registry.register(name, help, counter.clone());
        counter
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[derive(Debug)]
struct CaptureCollector(Arc<CaptureCounters>, Arc<Unsettled>);

impl Collector for CaptureCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let c = self.0.snapshot();
        for (name, help, value) in [
            (
                "capture_eligible",
                "Finished chat exchanges handed to the trace writer",
                c.eligible,
            ),
            (
                "capture_captured",
                "Traces committed to the store",
                c.captured,
            ),
            (
                "capture_dropped",
                "Traces dropped because the capture queue was full",
                c.dropped,
            ),
            ("capture_failed", "Traces lost to a failed commit", c.failed),
        ] {
            let counter = ConstCounter::new(value);
            counter.encode(encoder.encode_descriptor(
                name,
                help,
                None,
                counter.metric_type(),
            )?)?;
        }
        let pending = ConstGauge::new(i64::try_from(c.pending).unwrap_or(i64::MAX));
        pending.encode(encoder.encode_descriptor(
            "capture_pending",
            "Traces queued or being written",
            None,
            pending.metric_type(),
        )?)?;
        let queued = ConstGauge::new(i64::try_from(c.queued_bytes).unwrap_or(i64::MAX));
        queued.encode(encoder.encode_descriptor(
            "capture_queued_bytes",
            "Bytes of exchanges the pending traces hold, against capture.queue_mb",
            None,
            queued.metric_type(),
        )?)?;
        let commits = self.0.commit_times();
        encoder
            .encode_descriptor(
                "capture_commit",
                "Time each trace commit took (two fsyncs, retries included)",
                Some(&Unit::Seconds),
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(
                commits.sum_secs,
                commits.count(),
                &commits.buckets,
                None,
            )?;
        let oldest_ms = self.1.oldest_started_ms().map_or(0, |started| {
            forge_layer::trace::now_ms().saturating_sub(started)
        });
        let oldest = ConstGauge::new(oldest_ms as f64 / 1000.0);
        oldest.encode(encoder.encode_descriptor(
            "capture_oldest_unsettled_seconds",
            "Age of the oldest exchange not yet stored (0 when none); the judge and dataset cuts wait for it",
            None,
            oldest.metric_type(),
        )?)?;
        Ok(())
    }
}
