//! Logging and tracing, in one place.
//!
//! Log lines go to stdout (text or JSON) and carry the request id through
//! the `http` span that the request context middleware opens, and the trace
//! id when tracing is on. OpenTelemetry traces are exported over OTLP/HTTP
//! when an endpoint is configured, and cost nothing when it is not: the
//! layer is simply not installed.
//!
//! One trace follows a write from the HTTP request through the append (its
//! W3C `traceparent` rides in the NATS message headers) into the projector,
//! whose span for that event continues the same trace.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
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

/// Where traces go.
#[derive(Debug, Clone, clap::Args)]
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

/// Installs logging, and tracing when an endpoint is configured.
pub fn init(cfg: &TelemetryConfig) -> anyhow::Result<Telemetry> {
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
                    .with_resource(resource)
                    .build(),
            )
        }
    };
    install(cfg.log_format, provider.clone());
    Ok(Telemetry { provider })
}

static ENABLED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Whether traces are exported: code that would make a span per item (the
/// projector, per event) only does so then.
pub fn enabled() -> bool {
    ENABLED.load(std::sync::atomic::Ordering::Relaxed)
}

/// Installs the global subscriber: an env filter (`RUST_LOG` overrides the
/// default), the log lines, and an OpenTelemetry layer when `provider` is
/// given. Calling it again is harmless (the first wins), which tests rely
/// on.
pub fn install(format: LogFormat, provider: Option<SdkTracerProvider>) {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn,async_nats=warn,opentelemetry=warn"));
    let logs = match format {
        LogFormat::Text => fmt::layer().with_target(false).boxed(),
        LogFormat::Json => fmt::layer()
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

/// The W3C `traceparent` of the current span, if tracing is on and the span
/// is sampled into a trace.
pub fn current_traceparent() -> Option<String> {
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove("traceparent")
}

/// The trace id of the current span, for log lines; `None` when tracing is
/// off.
pub fn current_trace_id() -> Option<String> {
    let cx = tracing::Span::current().context();
    let sc = cx.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id().to_string())
}

/// Makes `span` continue the trace named by a W3C `traceparent`.
pub fn continue_trace(span: &tracing::Span, traceparent: Option<&str>) {
    let Some(tp) = traceparent else { return };
    let carrier = One(tp);
    let cx = TraceContextPropagator::new().extract(&carrier);
    if cx.span().span_context().is_valid() {
        let _ = span.set_parent(cx);
    }
}

/// A carrier holding only a `traceparent`.
struct One<'a>(&'a str);

impl Extractor for One<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == "traceparent").then_some(self.0)
    }
    fn keys(&self) -> Vec<&str> {
        vec!["traceparent"]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spans_have_a_traceparent_when_tracing_is_on() {
        install(LogFormat::Text, Some(SdkTracerProvider::builder().build()));
        let span = tracing::info_span!("outer");
        continue_trace(
            &span,
            Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
        );
        let _g = span.enter();
        let inner = tracing::info_span!("inner");
        let _i = inner.enter();
        let tp = current_traceparent().expect("a traceparent");
        assert!(
            tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
            "{tp}"
        );
        assert!(
            !tp.contains("00f067aa0ba902b7"),
            "the inner span's own id: {tp}"
        );
    }
}
