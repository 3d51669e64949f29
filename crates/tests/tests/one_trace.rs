//! One trace per request: the HTTP span, the append and the projection of
//! the event it wrote share one trace id, through the NATS headers, which
//! carry the whole W3C trace context (`traceparent`, `tracestate`,
//! `baggage`). Its own test binary, since it installs the process's global
//! tracing subscriber.

#![allow(clippy::unwrap_used)] // tests fail loudly on purpose

use std::collections::HashMap;

use infra::telemetry::LogFormat;
use opentelemetry::trace::{SpanId, TraceId};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider, SpanData};
use reqwest::Method;
use tests::{TestApp, agent_body, header_u64};

/// The stored message of `seq`, headers and all, straight from the stream.
async fn stored_message(app: &TestApp, seq: u64) -> async_nats::jetstream::message::StreamMessage {
    let nats = &app.sandbox.settings.nats;
    let client = async_nats::connect(&nats.nats_url).await.unwrap();
    let stream = async_nats::jetstream::new(client)
        .get_stream(&nats.stream)
        .await
        .unwrap();
    stream.get_raw_message(seq).await.unwrap()
}

fn by_name(spans: &[SpanData], trace: TraceId) -> HashMap<String, &SpanData> {
    spans
        .iter()
        .filter(|s| s.span_context.trace_id() == trace)
        .map(|s| (s.name.to_string(), s))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_is_one_trace_from_http_through_append_to_projection() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    infra::telemetry::install(LogFormat::Text, Some(provider.clone()));

    let app = TestApp::spawn().await;
    let token = app.admin_token().await;

    // A caller that is itself traced: its trace continues through us, with
    // its vendor's trace state and its baggage.
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let r = app
        .request(Method::POST, "/api/v1/agents", Some(&token))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .header("tracestate", "congo=t61rcWkgMzE")
        .header("baggage", "tenant=acme")
        .json(&agent_body("traced"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let seq = header_u64(&r, "x-event-seq");
    // Once this read succeeds, the projector has committed the event.
    let r = app.read_at("/api/v1/agents", &token, seq).await;
    assert_eq!(r.status(), 200);
    provider.force_flush().unwrap();

    let spans = exporter.get_finished_spans().unwrap();
    let trace_id = TraceId::from_hex(trace).unwrap();
    let ours = by_name(&spans, trace_id);
    let http = ours
        .get("POST /api/v1/agents")
        .unwrap_or_else(|| panic!("no HTTP span in {:?}", ours.keys()));
    let append = ours
        .get("append")
        .unwrap_or_else(|| panic!("no append span in {:?}", ours.keys()));
    let apply = ours
        .get("projector.apply")
        .unwrap_or_else(|| panic!("no projection span in {:?}", ours.keys()));
    assert_eq!(
        http.parent_span_id,
        SpanId::from_hex("00f067aa0ba902b7").unwrap(),
        "continues the caller's span"
    );
    for span in [http, append, apply] {
        assert_eq!(
            span.span_context.trace_state().header(),
            "congo=t61rcWkgMzE",
            "{} keeps the caller's tracestate",
            span.name
        );
    }

    // The event's NATS message carries the append's context.
    let message = stored_message(&app, seq).await;
    let headers = message.headers;
    let header = |name: &str| headers.get(name).map(|v| v.as_str().to_owned());
    assert_eq!(
        header("traceparent"),
        Some(format!("00-{trace}-{}-01", append.span_context.span_id())),
        "the append's own span, so the projection hangs under it"
    );
    assert_eq!(header("tracestate").as_deref(), Some("congo=t61rcWkgMzE"));
    assert_eq!(header("baggage").as_deref(), Some("tenant=acme"));
    assert_eq!(
        apply.parent_span_id,
        append.span_context.span_id(),
        "the projection hangs under the append; spans: {:#?}",
        spans
            .iter()
            .filter(|s| s.span_context.trace_id() == trace_id)
            .map(|s| (
                s.name.to_string(),
                s.span_context.span_id(),
                s.parent_span_id
            ))
            .collect::<Vec<_>>()
    );

    // Without an incoming traceparent, the request starts its own trace,
    // and the projection still joins it.
    let r = app.create_agent(&token, agent_body("fresh")).await;
    let seq = header_u64(&r, "x-event-seq");
    app.read_at("/api/v1/agents", &token, seq).await;
    provider.force_flush().unwrap();
    let spans = exporter.get_finished_spans().unwrap();
    let posts: Vec<&SpanData> = spans
        .iter()
        .filter(|s| s.name == "POST /api/v1/agents" && s.span_context.trace_id() != trace_id)
        .collect();
    assert_eq!(posts.len(), 1);
    let fresh = by_name(&spans, posts[0].span_context.trace_id());
    assert!(
        fresh.contains_key("append") && fresh.contains_key("projector.apply"),
        "{:?}",
        fresh.keys()
    );
}
