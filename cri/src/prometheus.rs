//! The Prometheus endpoint (`[metrics] address`, off by default), as containerd's
//! `[metrics]` has one: latency and in-flight calls of every CRI and berth API method,
//! pods and containers by state, pulls, shim deaths and OOM kills, served as
//! OpenMetrics text at `GET /metrics`. The figures are gathered whether or not the
//! endpoint is served (a few atomic operations per call).

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use tonic::codegen::http;
use tracing::{info, warn};

/// The methods that get their own label: every CRI v1 method and berth's own API
/// (any other path is a client's invention and is not counted, so a client cannot
/// grow the label set).
const METHODS: &[&str] = &[
    "Version",
    "RunPodSandbox",
    "StopPodSandbox",
    "RemovePodSandbox",
    "PodSandboxStatus",
    "ListPodSandbox",
    "CreateContainer",
    "StartContainer",
    "StopContainer",
    "RemoveContainer",
    "ListContainers",
    "ContainerStatus",
    "UpdateContainerResources",
    "ReopenContainerLog",
    "ExecSync",
    "Exec",
    "Attach",
    "PortForward",
    "ContainerStats",
    "ListContainerStats",
    "PodSandboxStats",
    "ListPodSandboxStats",
    "UpdateRuntimeConfig",
    "Status",
    "CheckpointContainer",
    "GetContainerEvents",
    "ListMetricDescriptors",
    "ListPodSandboxMetrics",
    "RuntimeConfig",
    "ListImages",
    "ImageStatus",
    "PullImage",
    "RemoveImage",
    "ImageFsInfo",
];

/// berth's own API (`berthctl`), as `<service>/<method>`.
const BERTH_METHODS: &[&str] = &[
    "Introspection/Info",
    "Introspection/Check",
    "Sandboxes/List",
    "Containers/List",
    "Containers/Get",
    "Tasks/List",
    "Tasks/Pids",
    "Tasks/Pause",
    "Tasks/Resume",
    "Tasks/Kill",
    "Tasks/Metrics",
    "Images/List",
    "Images/Remove",
    "Images/Pull",
    "Events/Subscribe",
];

/// The gRPC services whose calls are counted: path prefix, label, methods.
const SERVICES: &[(&str, &str, &[&str])] = &[
    ("/runtime.v1.RuntimeService/", "runtime", METHODS),
    ("/runtime.v1.ImageService/", "image", METHODS),
    ("/berth.api.v1.", "berth", BERTH_METHODS),
];

/// Connections the endpoint serves at once (a scraper needs one).
const MAX_CONNECTIONS: usize = 16;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    service: &'static str,
    method: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct HandledLabels {
    service: &'static str,
    method: &'static str,
    code: &'static str,
}

/// gRPC status codes by number, named as grpc-go names them.
const CODES: [&str; 17] = [
    "OK",
    "Canceled",
    "Unknown",
    "InvalidArgument",
    "DeadlineExceeded",
    "NotFound",
    "AlreadyExists",
    "PermissionDenied",
    "ResourceExhausted",
    "FailedPrecondition",
    "Aborted",
    "OutOfRange",
    "Unimplemented",
    "Internal",
    "Unavailable",
    "DataLoss",
    "Unauthenticated",
];

/// The status of an answer: an error's `grpc-status` is in its head (trailers-only);
/// a success's comes in trailers, after this point.
fn status_of<B>(answer: &http::Response<B>) -> &'static str {
    match answer.headers().get("grpc-status") {
        None => "OK",
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .and_then(|n| CODES.get(n).copied())
            .unwrap_or("Unknown"),
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    state: &'static str,
}

type Histograms<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 0.5 ms to ~33 s.
    Histogram::new(exponential_buckets(0.0005, 2.0, 17))
}

/// berthd's figures, and the registry they are encoded from.
pub struct Metrics {
    registry: Registry,
    rpc_seconds: Histograms<RpcLabels>,
    rpc_in_flight: Family<RpcLabels, Gauge>,
    rpc_handled: Family<HandledLabels, Counter>,
    pods: Family<StateLabels, Gauge>,
    containers: Family<StateLabels, Gauge>,
    pull_seconds: Histogram,
    pull_bytes: Counter,
    pull_failures: Counter,
    shim_deaths: Counter,
    oom_kills: Counter,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Every figure at zero, registered under berth's names.
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("berth");
        let rpc_seconds: Histograms<RpcLabels> = Family::new_with_constructor(latency_histogram);
        let rpc_in_flight = Family::<RpcLabels, Gauge>::default();
        let rpc_handled = Family::<HandledLabels, Counter>::default();
        let pods = Family::<StateLabels, Gauge>::default();
        let containers = Family::<StateLabels, Gauge>::default();
        let pull_seconds = Histogram::new(exponential_buckets(0.01, 2.0, 16));
        let (pull_bytes, pull_failures) = (Counter::default(), Counter::default());
        let (shim_deaths, oom_kills) = (Counter::default(), Counter::default());
        let r = &mut registry;
        r.register(
            "grpc_request_duration_seconds",
            "Time to answer a gRPC call (to the response head, for a stream)",
            rpc_seconds.clone(),
        );
        r.register(
            "grpc_requests_in_flight",
            "gRPC calls being answered",
            rpc_in_flight.clone(),
        );
        r.register(
            "grpc_requests",
            "gRPC calls answered, by status (Canceled: the caller went first)",
            rpc_handled.clone(),
        );
        r.register("pods", "Pod sandboxes by state", pods.clone());
        r.register("containers", "Containers by state", containers.clone());
        r.register(
            "image_pull_duration_seconds",
            "Time of successful pulls",
            pull_seconds.clone(),
        );
        r.register(
            "image_pull_bytes",
            "Bytes of the images pulled (compressed layers)",
            pull_bytes.clone(),
        );
        r.register(
            "image_pull_failures",
            "Pulls that failed",
            pull_failures.clone(),
        );
        r.register(
            "shim_deaths",
            "Pod shims that died while their pod was ready",
            shim_deaths.clone(),
        );
        r.register(
            "oom_kills",
            "Containers the kernel OOM-killed a process of",
            oom_kills.clone(),
        );
        Metrics {
            registry,
            rpc_seconds,
            rpc_in_flight,
            rpc_handled,
            pods,
            containers,
            pull_seconds,
            pull_bytes,
            pull_failures,
            shim_deaths,
            oom_kills,
        }
    }

    /// A call to `path` begins; it is measured until the returned guard drops.
    fn call(self: &Arc<Self>, path: &str) -> Option<CallGuard> {
        let (prefix, service, methods) = SERVICES.iter().find(|(p, ..)| path.starts_with(p))?;
        let name = &path[prefix.len()..];
        let method = methods
            .iter()
            .find(|m| **m == name)
            .copied()
            .unwrap_or("other");
        let labels = RpcLabels { service, method };
        self.rpc_in_flight.get_or_create(&labels).inc();
        Some(CallGuard {
            metrics: self.clone(),
            labels,
            started: Instant::now(),
            code: "Canceled",
        })
    }

    /// A pull ended.
    pub fn pulled(&self, took: Duration, result: Result<u64, ()>) {
        match result {
            Ok(bytes) => {
                self.pull_seconds.observe(took.as_secs_f64());
                self.pull_bytes.inc_by(bytes);
            }
            Err(()) => {
                self.pull_failures.inc();
            }
        }
    }

    /// A ready pod's shim died.
    pub fn shim_died(&self) {
        self.shim_deaths.inc();
    }

    /// The kernel OOM-killed a process of a container.
    pub fn oom_killed(&self) {
        self.oom_kills.inc();
    }

    /// The text a scrape gets, with the objects counted now.
    pub fn encode(&self, now: &StateCounts) -> String {
        for (state, n) in now.pods {
            self.pods
                .get_or_create(&StateLabels { state })
                .set(n as i64);
        }
        for (state, n) in now.containers {
            self.containers
                .get_or_create(&StateLabels { state })
                .set(n as i64);
        }
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.registry) {
            warn!(error = %e, "encoding metrics");
        }
        out
    }
}

/// Pods and containers by state (label, count), counted at a scrape.
pub struct StateCounts {
    pub pods: [(&'static str, usize); 2],
    pub containers: [(&'static str, usize); 3],
}

/// One call being answered: leaves the in-flight gauge and is timed when dropped (also
/// when the caller gave up and the call was dropped).
struct CallGuard {
    metrics: Arc<Metrics>,
    labels: RpcLabels,
    started: Instant,
    /// Its status; `Canceled` until it is answered.
    code: &'static str,
}

impl Drop for CallGuard {
    fn drop(&mut self) {
        let m = &self.metrics;
        m.rpc_in_flight.get_or_create(&self.labels).dec();
        let took = self.started.elapsed().as_secs_f64();
        m.rpc_seconds.get_or_create(&self.labels).observe(took);
        let RpcLabels { service, method } = self.labels;
        let handled = HandledLabels {
            service,
            method,
            code: self.code,
        };
        m.rpc_handled.get_or_create(&handled).inc();
    }
}

/// The tower layer that measures every call of a gRPC server.
#[derive(Clone)]
pub struct MeasureCalls(pub Arc<Metrics>);

impl<S> tower::Layer<S> for MeasureCalls {
    type Service = Measured<S>;
    fn layer(&self, inner: S) -> Measured<S> {
        Measured {
            inner,
            metrics: self.0.clone(),
        }
    }
}

/// A service whose calls are measured.
#[derive(Clone)]
pub struct Measured<S> {
    inner: S,
    metrics: Arc<Metrics>,
}

type BoxFuture<T> = Pin<Box<dyn std::future::Future<Output = T> + Send>>;

impl<S, B, RB> tower::Service<http::Request<B>> for Measured<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let mut guard = self.metrics.call(req.uri().path());
        let answer = self.inner.call(req);
        Box::pin(async move {
            let r = answer.await;
            if let Some(g) = guard.as_mut() {
                g.code = r.as_ref().map_or("Internal", status_of);
            }
            drop(guard);
            r
        })
    }
}

/// Serves `GET /metrics` on `listener` until `shutdown` resolves; `scrape` makes the
/// text.
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    scrape: F,
    shutdown: impl std::future::Future<Output = ()>,
) where
    F: Fn() -> String + Clone + Send + Sync + 'static,
{
    if let Ok(addr) = listener.local_addr() {
        info!(%addr, "serving Prometheus metrics at /metrics");
    }
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(error = %e, "accepting a metrics connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Over the cap, the connection is closed at once.
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let answer = hyper::service::service_fn(move |req| {
                let scrape = scrape.clone();
                async move { Ok::<_, std::convert::Infallible>(respond(&scrape, &req)) }
            });
            // One request per connection: a slot is never held by an idle keep-alive.
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .keep_alive(false)
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), answer);
            // A scraper that stalls reading the answer is dropped.
            let _ = tokio::time::timeout(Duration::from_secs(60), conn).await;
        });
    }
}

/// The answer to one HTTP request.
fn respond<B>(scrape: &impl Fn() -> String, req: &http::Request<B>) -> http::Response<Full<Bytes>> {
    let reply = |status: u16, ctype: &str, body: String| {
        http::Response::builder()
            .status(status)
            .header(http::header::CONTENT_TYPE, ctype)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    match (req.method(), req.uri().path()) {
        (&http::Method::GET, "/metrics") => reply(
            200,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            scrape(),
        ),
        (_, "/metrics") => reply(405, "text/plain", "only GET\n".into()),
        _ => reply(404, "text/plain", "not found: try /metrics\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_are_labelled_by_known_method_only() {
        let m = Arc::new(Metrics::new());
        let g = m.call("/runtime.v1.RuntimeService/RunPodSandbox");
        assert!(g.is_some());
        let labels = RpcLabels {
            service: "runtime",
            method: "RunPodSandbox",
        };
        assert_eq!(m.rpc_in_flight.get_or_create(&labels).get(), 1);
        drop(g);
        assert_eq!(m.rpc_in_flight.get_or_create(&labels).get(), 0);
        // A made-up method is counted as `other`; another service not at all.
        drop(m.call("/runtime.v1.RuntimeService/Xyzzy"));
        assert!(m.call("/grpc.health.v1.Health/Check").is_none());
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        assert!(out.contains(
            "berth_grpc_request_duration_seconds_count{service=\"runtime\",method=\"RunPodSandbox\"} 1"
        ));
        assert!(out.contains("method=\"other\""));
        assert!(out.contains(
            "berth_grpc_requests_total{service=\"runtime\",method=\"RunPodSandbox\",code=\"Canceled\"} 1"
        ));
        assert!(!out.contains("Xyzzy"));
    }

    #[test]
    fn pulls_and_events_are_counted() {
        let m = Metrics::new();
        m.pulled(Duration::from_millis(300), Ok(1000));
        m.pulled(Duration::from_millis(10), Err(()));
        m.oom_killed();
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        for want in [
            "berth_image_pull_duration_seconds_count 1",
            "berth_image_pull_bytes_total 1000",
            "berth_image_pull_failures_total 1",
            "berth_oom_kills_total 1",
            "berth_shim_deaths_total 0",
        ] {
            assert!(out.contains(want), "{want} in {out}");
        }
    }
}
