//! Zipkin tracing with B3 propagation (`fsm.dataplane.v1.Tracing`, whose comment is the spec).
//!
//! [`ActiveSpan::start`] reads a request's B3 context and starts this sidecar's span (a child of
//! it, or the root of a new trace), [`ActiveSpan::inject`] writes the span's context into the
//! request forwarded upstream, and [`Tracer::finish`] queues a sampled span for its collector.
//! One task per sidecar ([`Tracer::spawn`]) sends queued spans in batches (Zipkin v2 JSON, `POST
//! <endpoint>`), one report at a time, off the request path: the queue is bounded, and what does
//! not fit in it or what the collector does not take is dropped and counted
//! (`sidecar_tracing_zipkin_*`), never retried, never waited for by a request.
//!
//! B3 headers and the span's JSON come from the `http-zipkin` and `zipkin` crates.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Request};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use prometheus::{IntCounter, Registry};
use tokio::sync::mpsc;
use zipkin::{Endpoint, Kind, Span, SpanId, TraceContext, TraceId};

use crate::config::{Collector, Direction, TracingConfig};
use crate::upstream::connect_to;

/// `sampled_per_million` that samples every request.
pub const ALL: u32 = 1_000_000;
/// Spans waiting for the reporter; more are dropped.
pub const QUEUE: usize = 4096;
/// Spans in one report at most; a full batch is sent at once.
pub const BATCH: usize = 512;
/// How long a span waits for a batch to fill before it is sent anyway.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// How long one report may take, connection included, before its spans are dropped.
pub const REPORT_TIMEOUT: Duration = Duration::from_secs(5);

// === ActiveSpan ===

/// The span of one request, from its start until its response headers.
#[derive(Debug)]
pub struct ActiveSpan {
    /// This span's context: its trace, its id, its parent (the incoming span), its sampling.
    context: TraceContext,
    kind: Kind,
    /// The request came with the single `b3` header: the forwarded one carries it too.
    single_header: bool,
    timestamp: SystemTime,
    started: Instant,
}

impl ActiveSpan {
    /// Starts the span of a request on a listener of `direction`: a child of the request's B3
    /// context when it has one, else the root of a new trace. The request's own sampling
    /// decision is kept; without one, `config.sampled_per_million` decides.
    pub fn start(config: &TracingConfig, headers: &HeaderMap, direction: Direction) -> Self {
        let incoming = http_zipkin::get_trace_context(headers);
        let flags = match &incoming {
            Some(context) => context.sampling_flags(),
            None => http_zipkin::get_sampling_flags(headers),
        };
        let mut context = TraceContext::builder();
        match &incoming {
            Some(parent) => context
                .trace_id(parent.trace_id())
                .parent_id(parent.span_id()),
            None => context.trace_id(TraceId::from(random_id::<16>())),
        };
        context.span_id(SpanId::from(random_id::<8>()));
        if flags.debug() {
            context.debug(true);
        } else {
            context.sampled(
                flags
                    .sampled()
                    .unwrap_or_else(|| sample(config.sampled_per_million)),
            );
        }
        ActiveSpan {
            context: context.build(),
            kind: match direction {
                Direction::Inbound => Kind::Server,
                Direction::Outbound => Kind::Client,
            },
            single_header: headers.contains_key("b3"),
            timestamp: SystemTime::now(),
            started: Instant::now(),
        }
    }

    /// Writes this span's context into the headers of the request forwarded upstream
    /// (`x-b3-*`, and `b3` when the request came with it), replacing what they had.
    pub fn inject(&self, headers: &mut HeaderMap) {
        http_zipkin::set_trace_context(self.context, headers);
        if self.single_header {
            http_zipkin::set_trace_context_single(self.context, headers);
        }
    }

    pub fn context(&self) -> TraceContext {
        self.context
    }

    pub fn is_sampled(&self) -> bool {
        self.context.debug() || self.context.sampled() == Some(true)
    }
}

/// A random id that is not all zeros (B3 reads zero as absent).
fn random_id<const N: usize>() -> [u8; N] {
    let mut id = [0u8; N];
    while id.iter().all(|b| *b == 0) {
        id.iter_mut().for_each(|b| *b = fastrand::u8(..));
    }
    id
}

fn sample(per_million: u32) -> bool {
    per_million >= ALL || fastrand::u32(..ALL) < per_million
}

/// What a finished span says of its request.
#[derive(Debug)]
pub struct RequestFacts {
    pub method: Method,
    /// Host (or `:authority`) and path, as Envoy's `http.url` tag has them.
    pub host: String,
    pub path: String,
    pub request_id: Option<String>,
    pub client: IpAddr,
}

impl RequestFacts {
    pub fn of<B>(req: &Request<B>, host: &str, client: IpAddr) -> Self {
        RequestFacts {
            method: req.method().clone(),
            host: host.to_owned(),
            path: req.uri().path().to_owned(),
            request_id: req
                .headers()
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned),
            client,
        }
    }
}

/// The Zipkin span of a finished request.
pub fn span(
    active: &ActiveSpan,
    service_name: &str,
    facts: &RequestFacts,
    status: u16,
    cluster: Option<&str>,
) -> Span {
    let context = active.context;
    let mut span = Span::builder();
    span.trace_id(context.trace_id())
        .id(context.span_id())
        .kind(active.kind)
        .name(&format!("{} {}", facts.method, facts.path))
        .timestamp(active.timestamp)
        .duration(active.started.elapsed().max(Duration::from_micros(1)))
        .debug(context.debug())
        .local_endpoint(Endpoint::builder().service_name(service_name).build())
        .tag("component", "proxy")
        .tag("http.method", facts.method.as_str())
        .tag("http.url", &format!("http://{}{}", facts.host, facts.path))
        .tag("http.path", &facts.path)
        .tag("http.status_code", &status.to_string())
        .tag("peer.address", &facts.client.to_string());
    if let Some(parent) = context.parent_id() {
        span.parent_id(parent);
    }
    if let Some(cluster) = cluster {
        span.tag("upstream_cluster", cluster);
    }
    if let Some(id) = &facts.request_id {
        span.tag("guid:x-request-id", id);
    }
    if status >= 500 {
        span.tag("error", "true");
    }
    span.build()
}

// === Tracer ===

/// Counters of the reporter, Envoy's `tracing.zipkin.*` statistics.
#[derive(Clone, Debug)]
struct Counters {
    spans_sent: IntCounter,
    spans_dropped: IntCounter,
    reports_sent: IntCounter,
    reports_failed: IntCounter,
}

/// The sidecar's span queue and reporter.
#[derive(Debug)]
pub struct Tracer {
    queue: mpsc::Sender<(Arc<Collector>, Span)>,
    counters: Counters,
}

impl Tracer {
    /// Registers the counters in `registry` and starts the reporter task (on the current tokio
    /// runtime), which ends when the tracer is dropped.
    pub fn spawn(registry: &Registry) -> Result<Tracer, prometheus::Error> {
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let counters = Counters {
            spans_sent: counter(
                "sidecar_tracing_zipkin_spans_sent",
                "Spans the tracing collector took",
            )?,
            spans_dropped: counter(
                "sidecar_tracing_zipkin_spans_dropped",
                "Sampled spans not reported: the queue was full, the collector unknown, or its report failed",
            )?,
            reports_sent: counter(
                "sidecar_tracing_zipkin_reports_sent",
                "Reports (batches of spans) the tracing collector took",
            )?,
            reports_failed: counter(
                "sidecar_tracing_zipkin_reports_failed",
                "Reports the tracing collector could not be sent or refused",
            )?,
        };
        let (queue, spans) = mpsc::channel(QUEUE);
        tokio::spawn(report(spans, counters.clone()));
        Ok(Tracer { queue, counters })
    }

    /// Queues the span of a finished request when it is sampled; never waits.
    pub fn finish(
        &self,
        active: &ActiveSpan,
        config: &TracingConfig,
        facts: &RequestFacts,
        status: u16,
        cluster: Option<&str>,
    ) {
        if !active.is_sampled() {
            return;
        }
        let Some(collector) = config.collector.clone() else {
            self.counters.spans_dropped.inc();
            return;
        };
        let span = span(active, &config.service_name, facts, status, cluster);
        if self.queue.try_send((collector, span)).is_err() {
            self.counters.spans_dropped.inc();
        }
    }
}

/// The reporter: batches queued spans per collector and sends each batch, one at a time.
async fn report(mut spans: mpsc::Receiver<(Arc<Collector>, Span)>, counters: Counters) {
    let mut batches: Vec<(Arc<Collector>, Vec<Span>)> = Vec::new();
    let mut held = 0usize;
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            next = spans.recv() => {
                let Some((collector, span)) = next else {
                    flush(&mut batches, &counters).await;
                    return;
                };
                match batches.iter_mut().find(|(c, _)| **c == *collector) {
                    Some((_, batch)) => batch.push(span),
                    None => batches.push((collector, vec![span])),
                }
                held += 1;
                if held >= BATCH {
                    flush(&mut batches, &counters).await;
                    held = 0;
                }
            }
            _ = tick.tick() => {
                if held > 0 {
                    flush(&mut batches, &counters).await;
                    held = 0;
                }
            }
        }
    }
}

async fn flush(batches: &mut Vec<(Arc<Collector>, Vec<Span>)>, counters: &Counters) {
    for (collector, batch) in batches.drain(..) {
        let n = batch.len() as u64;
        match tokio::time::timeout(REPORT_TIMEOUT, send(&collector, &batch)).await {
            Ok(Ok(())) => {
                counters.reports_sent.inc();
                counters.spans_sent.inc_by(n);
            }
            failed => {
                let why = match failed {
                    Ok(Err(e)) => e,
                    _ => format!("no answer within {REPORT_TIMEOUT:?}"),
                };
                tracing::debug!(collector = %collector.dest, spans = n, "tracing report dropped: {why}");
                counters.reports_failed.inc();
                counters.spans_dropped.inc_by(n);
            }
        }
    }
}

/// POSTs one batch as a Zipkin v2 JSON array; a 2xx answer is success.
async fn send(collector: &Collector, batch: &[Span]) -> Result<(), String> {
    let body = serde_json::to_vec(batch).map_err(|e| e.to_string())?;
    let stream = connect_to(&collector.dest, collector.connect_timeout)
        .await
        .map_err(|e| e.to_string())?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let request = Request::post(&*collector.endpoint)
        .header(header::HOST, &collector.host)
        .header(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )
        .body(Full::new(Bytes::from(body)))
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| e.to_string())?;
    if response.status().is_success() {
        Ok(())
    } else {
        Err(format!("the collector answered {}", response.status()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(per_million: u32) -> TracingConfig {
        TracingConfig {
            collector_cluster: Arc::from("pipy-tracing-cluster"),
            sampled_per_million: per_million,
            service_name: Arc::from("curl.demo"),
            collector: None,
            endpoint: Arc::from("/api/v2/spans"),
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_static(v));
        }
        h
    }

    #[test]
    fn a_request_without_context_starts_a_trace_sampled_at_the_rate() {
        let all = ActiveSpan::start(&config(ALL), &HeaderMap::new(), Direction::Outbound);
        assert!(all.is_sampled() && all.context().parent_id().is_none());
        assert_eq!(all.context().trace_id().bytes().len(), 16);
        assert!(matches!(all.kind, Kind::Client));
        let none = ActiveSpan::start(&config(0), &HeaderMap::new(), Direction::Inbound);
        assert!(!none.is_sampled());
        assert!(matches!(none.kind, Kind::Server));
    }

    #[test]
    fn an_incoming_context_is_joined_as_a_child_and_its_decision_kept() {
        let incoming = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
            ("x-b3-sampled", "0"),
        ]);
        let span = ActiveSpan::start(&config(ALL), &incoming, Direction::Inbound);
        let c = span.context();
        assert_eq!(c.trace_id().to_string(), "463ac35c9f6413ad48485a3953bb6124");
        assert_eq!(
            c.parent_id().map(|p| p.to_string()).as_deref(),
            Some("a2fb4a1d1a96d312")
        );
        assert_ne!(c.span_id().to_string(), "a2fb4a1d1a96d312");
        assert!(
            !span.is_sampled(),
            "the caller's decision wins over the rate"
        );

        let mut out = incoming.clone();
        span.inject(&mut out);
        assert_eq!(out["x-b3-traceid"], "463ac35c9f6413ad48485a3953bb6124");
        assert_eq!(out["x-b3-spanid"], c.span_id().to_string().as_str());
        assert_eq!(out["x-b3-parentspanid"], "a2fb4a1d1a96d312");
        assert_eq!(out["x-b3-sampled"], "0");
        assert!(!out.contains_key("b3"));
    }

    #[test]
    fn the_single_header_is_read_and_written_back() {
        let incoming = headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]);
        let span = ActiveSpan::start(&config(0), &incoming, Direction::Outbound);
        assert!(span.is_sampled());
        let mut out = incoming.clone();
        span.inject(&mut out);
        let id = span.context().span_id().to_string();
        assert_eq!(
            out["b3"],
            format!("80f198ee56343ba864fe8b2a57d3eff7-{id}-1-e457b5a2e4d86bd1").as_str()
        );
        assert_eq!(out["x-b3-spanid"], id.as_str());
    }

    #[test]
    fn a_decision_without_ids_is_kept_on_a_new_trace() {
        let span = ActiveSpan::start(&config(ALL), &headers(&[("b3", "0")]), Direction::Outbound);
        assert!(!span.is_sampled() && span.context().parent_id().is_none());
        let debug = ActiveSpan::start(
            &config(0),
            &headers(&[("x-b3-flags", "1")]),
            Direction::Outbound,
        );
        assert!(debug.is_sampled());
    }

    #[test]
    fn the_span_is_zipkin_v2_json() {
        let incoming = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad48485a3953bb6124"),
            ("x-b3-spanid", "a2fb4a1d1a96d312"),
        ]);
        let active = ActiveSpan::start(&config(ALL), &incoming, Direction::Inbound);
        let facts = RequestFacts {
            method: Method::GET,
            host: "httpbin.demo:14001".into(),
            path: "/get".into(),
            request_id: Some("r-1".into()),
            client: "127.0.0.1".parse().expect("ip"),
        };
        let span = span(
            &active,
            "httpbin.demo",
            &facts,
            503,
            Some("demo/httpbin|14001|local"),
        );
        let json = serde_json::to_value(&span).expect("json");
        assert_eq!(json["traceId"], "463ac35c9f6413ad48485a3953bb6124");
        assert_eq!(json["parentId"], "a2fb4a1d1a96d312");
        assert_eq!(json["id"], active.context().span_id().to_string());
        assert_eq!(json["kind"], "SERVER");
        // Zipkin lower-cases span names.
        assert_eq!(json["name"], "get /get");
        assert_eq!(json["localEndpoint"]["serviceName"], "httpbin.demo");
        assert!(
            json["timestamp"]
                .as_u64()
                .is_some_and(|t| t > 1_600_000_000_000_000)
        );
        assert!(json["duration"].as_u64().is_some_and(|d| d >= 1));
        let tags = &json["tags"];
        assert_eq!(tags["http.method"], "GET");
        assert_eq!(tags["http.path"], "/get");
        assert_eq!(tags["http.url"], "http://httpbin.demo:14001/get");
        assert_eq!(tags["http.status_code"], "503");
        assert_eq!(tags["upstream_cluster"], "demo/httpbin|14001|local");
        assert_eq!(tags["guid:x-request-id"], "r-1");
        assert_eq!(tags["error"], "true");
    }

    #[test]
    fn random_ids_are_never_zero() {
        for _ in 0..1000 {
            assert!(random_id::<8>().iter().any(|b| *b != 0));
        }
    }
}
