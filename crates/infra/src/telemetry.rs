//! Logging and tracing, in one place.
//!
//! Log lines go to stdout (text or JSON) and carry the request id through
//! the `http` span that the request context middleware opens, and the trace
//! id when tracing is on. OpenTelemetry traces are exported over OTLP/HTTP
//! when an endpoint is configured, and cost nothing when it is not: the
//! layer is simply not installed.
//!
//! One trace follows a write from the HTTP request through the append into
//! the projector, whose span for that event continues the same trace. The
//! trace context travels as the W3C headers (`traceparent`, `tracestate`,
//! `baggage`), read and written by OpenTelemetry's propagators: HTTP
//! headers in, NATS message headers on each event, a projector span out.
//! [`TraceHeaders`] holds them where a request's context must outlive its
//! span (the write side carries it to the append).

use std::collections::{BTreeMap, HashMap};

use opentelemetry::propagation::{Extractor, Injector, TextMapCompositePropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::{BaggagePropagator, TraceContextPropagator};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::fmt::writer::BoxMakeWriter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer, fmt};

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Where log lines and traces go. Global options of `ymera`: they go
/// anywhere on the command line.
#[derive(Debug, Clone, clap::Args)]
#[command(next_help_heading = "Logs and traces")]
pub struct TelemetryConfig {
    /// Log line format.
    #[arg(long, env = "YMERA_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// OTLP/HTTP endpoint for traces, e.g. http://127.0.0.1:4318/v1/traces.
    /// Unset: no tracing cost at all.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", global = true)]
    pub otlp_endpoint: Option<String>,
    /// The service name traces are reported under.
    #[arg(
        long,
        env = "OTEL_SERVICE_NAME",
        default_value = "ymera",
        global = true
    )]
    pub service_name: String,
    /// Which traces are recorded (the OpenTelemetry names). The default
    /// follows the caller's decision when a request comes with a sampled
    /// `traceparent`, and otherwise samples the ratio below.
    #[arg(
        long,
        env = "OTEL_TRACES_SAMPLER",
        value_enum,
        default_value_t = SamplerKind::ParentbasedTraceidratio,
        global = true
    )]
    pub traces_sampler: SamplerKind,
    /// The ratio of traces the `traceidratio` samplers record, 0 to 1.
    #[arg(long, env = "OTEL_TRACES_SAMPLER_ARG", default_value_t = 1.0, value_parser = ratio, global = true)]
    pub traces_sampler_arg: f64,
}

/// The samplers of the OpenTelemetry specification, by their names there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
#[value(rename_all = "snake_case")]
pub enum SamplerKind {
    /// Every trace.
    AlwaysOn,
    /// No trace.
    AlwaysOff,
    /// The ratio of `OTEL_TRACES_SAMPLER_ARG`, by trace id.
    Traceidratio,
    /// As the caller decided, else every trace.
    ParentbasedAlwaysOn,
    /// As the caller decided, else none.
    ParentbasedAlwaysOff,
    /// As the caller decided, else the ratio of `OTEL_TRACES_SAMPLER_ARG`.
    ParentbasedTraceidratio,
}

fn ratio(s: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|r| (0.0..=1.0).contains(r))
        .ok_or_else(|| "a ratio from 0 to 1".into())
}

impl TelemetryConfig {
    /// The configured sampler.
    pub fn sampler(&self) -> Sampler {
        let ratio = self.traces_sampler_arg;
        let parent_based = |root| Sampler::ParentBased(Box::new(root));
        match self.traces_sampler {
            SamplerKind::AlwaysOn => Sampler::AlwaysOn,
            SamplerKind::AlwaysOff => Sampler::AlwaysOff,
            SamplerKind::Traceidratio => Sampler::TraceIdRatioBased(ratio),
            SamplerKind::ParentbasedAlwaysOn => parent_based(Sampler::AlwaysOn),
            SamplerKind::ParentbasedAlwaysOff => parent_based(Sampler::AlwaysOff),
            SamplerKind::ParentbasedTraceidratio => parent_based(Sampler::TraceIdRatioBased(ratio)),
        }
    }
}

/// Keeps the tracer provider alive; flushes pending spans on drop.
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
    }
}

/// Installs logging, to `logs`, and tracing when an endpoint is
/// configured.
pub fn init(cfg: &TelemetryConfig, logs: BoxMakeWriter) -> anyhow::Result<Telemetry> {
    let provider = match &cfg.otlp_endpoint {
        None => None,
        Some(endpoint) => {
            use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint)
                .with_headers(HashMap::new())
                .build()?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(cfg.service_name.clone())
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_sampler(cfg.sampler())
                    .with_resource(resource)
                    .build(),
            )
        }
    };
    install_to(cfg.log_format, provider.clone(), logs);
    Ok(Telemetry { provider })
}

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether traces are exported: code that would make a span per item (the
/// projector, per event) only does so then.
pub fn enabled() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Installs the global subscriber: an env filter (`RUST_LOG` overrides the
/// default), the log lines on stdout, and an OpenTelemetry layer when
/// `provider` is given. Calling it again is harmless (the first wins),
/// which tests rely on.
pub fn install(format: LogFormat, provider: Option<SdkTracerProvider>) {
    install_to(format, provider, BoxMakeWriter::new(std::io::stdout));
}

/// [`install`] with the log lines written to `logs`.
pub fn install_to(format: LogFormat, provider: Option<SdkTracerProvider>, logs: BoxMakeWriter) {
    opentelemetry::global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
        Box::new(TraceContextPropagator::new()),
        Box::new(BaggagePropagator::new()),
    ]));
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,async_nats=warn,opentelemetry=warn"));
    let logs = match format {
        LogFormat::Text => fmt::layer().with_writer(logs).with_target(false).boxed(),
        LogFormat::Json => fmt::layer()
            .with_writer(logs)
            .json()
            .flatten_event(true)
            .with_target(false)
            .boxed(),
    };
    if provider.is_some() {
        ENABLED.store(true, std::sync::atomic::Ordering::Relaxed);
    }
    let otel = provider.map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("ymera")));
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(logs)
        .with(otel)
        .try_init();
}

/// The trace id of the current span, for log lines; `None` when tracing is
/// off.
pub fn current_trace_id() -> Option<String> {
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Makes `span` continue the trace (and carry the baggage) that `carrier`
/// holds, when it holds a valid one.
pub fn continue_trace(span: &tracing::Span, carrier: &dyn Extractor) {
    let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(carrier));
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// Writes the trace context of the current span into `carrier` when
/// tracing is on and the span is in a valid trace, else `fallback` as it
/// came, if any (so a process that does not trace still passes its
/// caller's context on).
pub fn inject_current_or(fallback: Option<&TraceHeaders>, carrier: &mut dyn Injector) {
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, carrier));
    } else if let Some(fallback) = fallback {
        for (key, value) in &fallback.0 {
            carrier.set(key, value.clone());
        }
    }
}

/// The trace context headers of a request, kept beyond its span: the
/// `traceparent`, `tracestate` and `baggage` the propagators understood
/// (a malformed one is dropped, and the baggage propagator bounds its
/// size), in the form they write them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TraceHeaders(BTreeMap<String, String>);

impl TraceHeaders {
    /// What the propagators make of the headers in `carrier`.
    pub fn extract(carrier: &dyn Extractor) -> Self {
        let cx = opentelemetry::global::get_text_map_propagator(|p| p.extract(carrier));
        let mut headers = TraceHeaders::default();
        opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut headers));
        headers
    }

    /// The trace context of an HTTP request's headers.
    pub fn from_http(headers: &axum::http::HeaderMap) -> Self {
        Self::extract(&opentelemetry_http::HeaderExtractor(headers))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
}

impl Injector for TraceHeaders {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

impl Extractor for TraceHeaders {
    fn get(&self, key: &str) -> Option<&str> {
        TraceHeaders::get(self, key)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_have_a_traceparent_when_tracing_is_on() {
        install(LogFormat::Text, Some(SdkTracerProvider::builder().build()));
        let span = tracing::info_span!("outer");
        let mut incoming = HashMap::new();
        incoming.insert(
            "traceparent".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        );
        incoming.insert("tracestate".to_owned(), "congo=t61rcWkgMzE".to_owned());
        incoming.insert("baggage".to_owned(), "tenant=acme".to_owned());
        continue_trace(&span, &incoming);
        let _g = span.enter();
        let inner = tracing::info_span!("inner");
        let _i = inner.enter();
        let mut out = TraceHeaders::default();
        inject_current_or(None, &mut out);
        let tp = out.get("traceparent").expect("a traceparent");
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{tp}"
        );
        assert!(
            !tp.contains("00f067aa0ba902b7"),
            "the inner span's own id: {tp}"
        );
        assert_eq!(out.get("tracestate"), Some("congo=t61rcWkgMzE"));
        assert_eq!(out.get("baggage"), Some("tenant=acme"));
    }

    #[test]
    fn headers_pass_through_a_process_that_does_not_trace() {
        opentelemetry::global::set_text_map_propagator(TextMapCompositePropagator::new(vec![
            Box::new(TraceContextPropagator::new()),
            Box::new(BaggagePropagator::new()),
        ]));
        let mut incoming = HashMap::new();
        incoming.insert(
            "traceparent".to_owned(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".to_owned(),
        );
        incoming.insert("tracestate".to_owned(), "congo=t61rcWkgMzE".to_owned());
        let kept = TraceHeaders::extract(&incoming);
        assert_eq!(kept.get("tracestate"), Some("congo=t61rcWkgMzE"));
        incoming.insert("traceparent".to_owned(), "not a traceparent".to_owned());
        assert_eq!(
            TraceHeaders::extract(&incoming),
            TraceHeaders::default(),
            "a malformed traceparent carries nothing"
        );
    }
}
