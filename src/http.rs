//! The HTTP endpoints (`monitoring.listen`):
//! - `GET /metrics`: the Prometheus exposition;
//! - `GET /healthz`: 200 while the process runs (liveness);
//! - `GET /readyz`: 200 when this replica streams and lag is within `monitoring.ready_max_lag`,
//!   else 503 with the reason; `/readyz?standby=ok` also answers 200 for a healthy standby;
//! - `GET /status`: the pipeline's status as JSON (what `sluice status` prints).

use sluice_core::Shutdown;
use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;

use crate::monitor::PipelineState;

/// Serves until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    state: Arc<PipelineState>,
    metrics: PrometheusHandle,
    mut shutdown: Shutdown,
) {
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(error = %error, "HTTP accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = shutdown.requested() => return,
        };
        let (state, metrics) = (Arc::clone(&state), metrics.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let (state, metrics) = (Arc::clone(&state), metrics.clone());
                async move { Ok::<_, Infallible>(respond(&request, &state, &metrics).await) }
            });
            // Clients that hang up early are not worth a log line.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond(
    request: &Request<Incoming>,
    state: &PipelineState,
    metrics: &PrometheusHandle,
) -> Response<Full<Bytes>> {
    if request.method() != Method::GET && request.method() != Method::HEAD {
        return text(StatusCode::METHOD_NOT_ALLOWED, "only GET\n".into());
    }
    match request.uri().path() {
        "/metrics" => {
            let mut response = text(StatusCode::OK, metrics.render());
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            response
        }
        "/healthz" => text(StatusCode::OK, "ok\n".into()),
        "/readyz" => match state.readiness(request.uri().query() == Some("standby=ok")) {
            Ok(()) => text(StatusCode::OK, "ready\n".into()),
            Err(reason) => text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {reason}\n")),
        },
        "/status" => {
            let body = serde_json::to_string_pretty(&state.status_now().await)
                .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
            let mut response = text(StatusCode::OK, body + "\n");
            response.headers_mut().insert(
                hyper::header::CONTENT_TYPE,
                hyper::header::HeaderValue::from_static("application/json"),
            );
            response
        }
        _ => text(StatusCode::NOT_FOUND, "not found: try /metrics, /healthz, /readyz or /status\n".into()),
    }
}

fn text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
}
