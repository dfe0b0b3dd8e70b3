//! The admission webhooks' Prometheus metric, with FSM's name and labels verbatim, and the
//! plain-HTTP `/metrics` endpoint of the injector (FSM's 9091, where the pod's
//! `prometheus.io/port` annotation points).
//!
//! `fsm_admission_webhook_response_total{kind,success}` counts every answer to an
//! AdmissionReview of the injector's mutating webhook and of the controller's validating one:
//! `kind` is the request's `kind.kind` (`Pod`, `MeshConfig`, …; empty when the review could not
//! be read) and `success` whether the object was admitted (`false` for a refusal and for a
//! review answered with an error).

use std::convert::Infallible;
use std::sync::OnceLock;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use prometheus::{IntCounterVec, Opts};
use serde_json::Value;

pub struct Metrics {
    /// `fsm_admission_webhook_response_total{kind,success}`
    pub admission_webhook_response_total: IntCounterVec,
}

/// The metric, registered in the default registry on first use.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(|| {
        let metrics = Metrics {
            admission_webhook_response_total: IntCounterVec::new(
                Opts::new(
                    "admission_webhook_response_total",
                    "Counter for responses sent by admission webhooks",
                )
                .namespace("fsm"),
                &["kind", "success"],
            )
            .expect("static metric options are valid"),
        };
        if let Err(error) =
            prometheus::register(Box::new(metrics.admission_webhook_response_total.clone()))
        {
            // A clash leaves the metric counting but unexported: a defect of the build, which
            // the metrics tests catch (they read every metric back), not an operational error.
            tracing::debug!(%error, "could not register the admission webhook metric");
        }
        metrics
    })
}

/// The `request.kind.kind` of an AdmissionReview (empty when absent).
pub fn review_kind(review: &Value) -> &str {
    review
        .pointer("/request/kind/kind")
        .and_then(Value::as_str)
        .unwrap_or("")
}

/// Counts one answer to an AdmissionReview of `kind`.
pub fn count_admission(kind: &str, allowed: bool) {
    metrics()
        .admission_webhook_response_total
        .with_label_values(&[kind, if allowed { "true" } else { "false" }])
        .inc();
}

/// Counts the AdmissionReview `answer` (its `response.allowed`) to a review of `kind`.
pub fn count_answer(kind: &str, answer: &Value) {
    let allowed = answer
        .pointer("/response/allowed")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    count_admission(kind, allowed);
}

/// Serves `GET /metrics` (the default registry, Prometheus text format) and `GET /healthz` over
/// plain HTTP/1.1 on `listener` until the process ends.
pub async fn serve(listener: tokio::net::TcpListener) {
    loop {
        let (stream, _) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                fsm_errcode::warn!(
                    fsm_errcode::ErrCode::E6102,
                    error = %e,
                    "metrics listener: accept failed"
                );
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        tokio::spawn(async move {
            let service = hyper::service::service_fn(|request: Request<hyper::body::Incoming>| {
                std::future::ready(Ok::<_, Infallible>(answer(&request)))
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer<B>(request: &Request<B>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method().as_str(), request.uri().path()) {
        ("GET", "/metrics") => {
            match prometheus::TextEncoder::new().encode_to_string(&prometheus::gather()) {
                Ok(text) => (StatusCode::OK, prometheus::TEXT_FORMAT, Bytes::from(text)),
                Err(e) => (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "text/plain",
                    Bytes::from(e.to_string()),
                ),
            }
        }
        ("GET", "/healthz") => (StatusCode::OK, "text/plain", Bytes::from_static(b"ok")),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain",
            Bytes::from_static(b"not found"),
        ),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(body))
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_counted_by_kind_and_whether_they_admit() {
        let review = serde_json::json!({"request": {"uid": "u", "kind": {"kind": "Pod"}}});
        let counter = &metrics().admission_webhook_response_total;
        let before = counter.with_label_values(&["Pod", "false"]).get();
        count_answer(
            review_kind(&review),
            &serde_json::json!({"response": {"allowed": false}}),
        );
        count_answer(review_kind(&review), &serde_json::json!({"response": {}}));
        assert_eq!(
            counter.with_label_values(&["Pod", "false"]).get(),
            before + 2
        );
        assert_eq!(review_kind(&serde_json::json!({})), "");
    }

    #[tokio::test]
    async fn metrics_are_served_over_plain_http() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        count_admission("Pod", true);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let address = listener.local_addr().expect("address");
        tokio::spawn(serve(listener));
        let mut stream = tokio::net::TcpStream::connect(address)
            .await
            .expect("connect");
        stream
            .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .expect("request");
        let mut text = String::new();
        stream.read_to_string(&mut text).await.expect("answer");
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            text.contains(r#"fsm_admission_webhook_response_total{kind="Pod",success="true"}"#),
            "{text}"
        );
    }
}
