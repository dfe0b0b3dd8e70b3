//! UpstreamTrafficSetting end to end, with real sidecars in all four pairings of client and
//! server data plane (Envoy and fsm-sidecar each side), which must all see the same.
//!
//! Circuit breaking acts in the client's sidecar: with `http.maxRequests: 1`, a request sent while
//! another (held by the app for 1.5 s) is in flight fails at once with 503, and the client
//! sidecar's `upstream_rq_active_overflow` counts it (Envoy 1.40's name). Local rate limits act in each server's
//! sidecar: the virtual-host bucket answers 429 with the configured header once spent, a route
//! bucket replaces it (its own status and header), and tcp-echo's connection bucket closes the
//! connections over its limit. Nothing restarts: the manifests change under the running mesh.
//!
//! The accuracy test offers each httpbin instance twice its limit for 20 s and measures what
//! gets through, per server data plane (the closing-note figure of issue 18).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use fsm_integration_tests::{
    DemoMesh, PAIRINGS, Plane, Sidecar, eventually, http_get_via, tcp_roundtrip,
};

const CONVERGE: Duration = Duration::from_secs(30);
const HTTPBIN: &str = "httpbin.demo:14001";

async fn start_sidecars(mesh: &DemoMesh, client: Plane, servers: Plane) -> Result<Vec<Sidecar>> {
    mesh.start_client_and_servers(client, servers, CONVERGE)
        .await
}

fn setting(spec: &str) -> String {
    format!(
        "apiVersion: policy.flomesh.io/v1alpha1\nkind: UpstreamTrafficSetting\nmetadata: {{name: httpbin, namespace: demo}}\nspec:\n  host: httpbin.demo.svc.cluster.local\n{spec}"
    )
}

const BREAKER: &str = "  connectionSettings: {http: {maxRequests: 1}}\n";
const HOST_LIMIT: &str = "  rateLimit:\n    local:\n      http:\n        requests: 2\n        unit: minute\n        responseHeadersToAdd: [{name: x-rate-limited, value: host}]\n";
const ROUTE_LIMIT: &str = "  httpRoutes:\n  - path: .*\n    rateLimit:\n      local: {requests: 1, unit: hour, responseStatusCode: 503, responseHeadersToAdd: [{name: x-rate-limited, value: route}]}\n";
const TCP_LIMIT: &str = "apiVersion: policy.flomesh.io/v1alpha1\nkind: UpstreamTrafficSetting\nmetadata: {name: tcp-echo, namespace: demo}\nspec:\n  host: tcp-echo.demo.svc.cluster.local\n  rateLimit: {local: {tcp: {connections: 3, unit: minute}}}\n";

/// What a client sees of the settings; the same in every pairing.
#[derive(Debug, PartialEq, Eq)]
struct Observed {
    /// A request while another is in flight under `maxRequests: 1`: status, and whether the
    /// client's sidecar counted the overflow.
    overflow: (u16, bool),
    /// Once the host's bucket is spent: status and `x-rate-limited`.
    host_limited: (u16, Option<String>),
    /// Once the route's bucket is spent.
    route_limited: (u16, Option<String>),
    /// tcp-echo's connections beyond its bucket are closed.
    tcp_refused: bool,
}

/// Waits until a GET of `/get` answers `status`, and returns the reply.
async fn until_status(via: SocketAddr, status: u16) -> Result<fsm_integration_tests::HttpReply> {
    eventually(CONVERGE, || async {
        let reply = http_get_via(via, HTTPBIN, "/get").await?;
        ensure!(
            reply.status == status,
            "GET /get: {}, waiting for {status}",
            reply.status
        );
        Ok(reply)
    })
    .await
}

async fn observe(client: Plane, servers: Plane, subnet: u8) -> Result<Observed> {
    let mesh = DemoMesh::start(subnet).await?;
    let sidecars = start_sidecars(&mesh, client, servers).await?;
    let curl_index = mesh
        .pods
        .iter()
        .position(|p| p.name == "curl")
        .context("curl pod")?;
    let curl = mesh.pod("curl")?;
    let via = curl.outbound_addr();
    let echo = SocketAddr::new(curl.ip, 9000);
    until_status(via, 200).await?;
    for _ in 0..6 {
        eventually(CONVERGE, || tcp_roundtrip(echo, "free")).await?;
    }
    let settings = mesh.manifests.join("50-upstream-traffic-setting.yaml");

    // Circuit breaking: one request in flight at a time.
    std::fs::write(&settings, setting(BREAKER))?;
    let overflow_status = eventually(CONVERGE, || async {
        let held = tokio::spawn(http_get_via(via, HTTPBIN, "/delay/1500"));
        tokio::time::sleep(Duration::from_millis(300)).await;
        let started = Instant::now();
        let second = http_get_via(via, HTTPBIN, "/get").await?;
        let took = started.elapsed();
        held.await??;
        ensure!(
            second.status != 200,
            "the second request was sent: {second:?}"
        );
        ensure!(
            took < Duration::from_millis(1000),
            "it waited {took:?} instead of failing fast"
        );
        Ok(second.status)
    })
    .await
    .context("maxRequests: 1 never refused a second request")?;
    let counted = sidecars[curl_index]
        .counter("cluster.demo/httpbin|14001.upstream_rq_active_overflow")
        .await?
        > 0;
    until_status(via, 200).await?;

    // The host's request bucket, then a route's in its place.
    std::fs::write(&settings, setting(&format!("{BREAKER}{HOST_LIMIT}")))?;
    let host = until_status(via, 429).await?;
    std::fs::write(
        &settings,
        setting(&format!("{BREAKER}{HOST_LIMIT}{ROUTE_LIMIT}")),
    )?;
    let route = until_status(via, 503).await?;

    // tcp-echo's connection bucket.
    std::fs::write(mesh.manifests.join("51-tcp-echo.yaml"), TCP_LIMIT)?;
    let refused = eventually(CONVERGE, || async {
        match tcp_roundtrip(echo, "limited").await {
            Ok(reply) => anyhow::bail!("tcp-echo answered {reply:?}"),
            Err(_) => Ok(()),
        }
    })
    .await
    .is_ok();
    // The example (examples/resilience/) in place of the above: a burst over 15 requests to one
    // pod meets its 429.
    std::fs::remove_file(mesh.manifests.join("51-tcp-echo.yaml"))?;
    std::fs::write(
        &settings,
        std::fs::read_to_string(
            fsm_integration_tests::repo_root()
                .join("examples/resilience/50-upstream-traffic-setting.yaml"),
        )?,
    )?;
    let example = eventually(CONVERGE, || async {
        let burst: Vec<_> = (0..40)
            .map(|_| tokio::spawn(http_get_via(via, HTTPBIN, "/get")))
            .collect();
        let mut limited = None;
        for reply in burst {
            let reply = reply.await??;
            if reply.status == 429 {
                limited = Some(reply);
            }
        }
        limited.context("40 requests at once, none limited")
    })
    .await?;
    ensure!(
        example.header("x-rate-limited") == Some("true"),
        "the example's header: {example:?}"
    );

    if !refused || std::env::var_os("FSM_TEST_DEBUG").is_some() {
        for (pod, sidecar) in mesh.pods.iter().zip(&sidecars) {
            eprintln!("{}: {}", pod.name, sidecar.stats_with("rate_limit").await?);
            eprintln!("{}: {}", pod.name, sidecar.stats_with("overflow").await?);
        }
    }
    let header = |reply: &fsm_integration_tests::HttpReply| {
        reply.header("x-rate-limited").map(str::to_owned)
    };
    Ok(Observed {
        overflow: (overflow_status, counted),
        host_limited: (host.status, header(&host)),
        route_limited: (route.status, header(&route)),
        tcp_refused: refused,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_traffic_settings_act_the_same_in_every_pairing() {
    let expected = Observed {
        overflow: (503, true),
        host_limited: (429, Some("host".into())),
        route_limited: (503, Some("route".into())),
        tcp_refused: true,
    };
    for ((client, servers), subnet) in PAIRINGS.into_iter().zip(64..) {
        match observe(client, servers, subnet).await {
            Ok(observed) => {
                assert_eq!(observed, expected, "client {client:?}, servers {servers:?}")
            }
            Err(err) => panic!("client {client:?}, servers {servers:?}: {err:#}"),
        }
    }
}

/// Requests per second each httpbin instance admits in the accuracy run.
const LIMIT: u32 = 10;
/// Long enough that the phase of a discrete fill schedule (at most one fill of the window) stays
/// within 5 %.
const WINDOW: Duration = Duration::from_secs(20);

/// Offers each of httpbin's two instances twice its limit for `WINDOW` and returns what they
/// admitted, per instance, as a fraction of the limit.
async fn admitted_fraction(plane: Plane, subnet: u8) -> Result<BTreeMap<String, f64>> {
    let mesh = DemoMesh::start(subnet).await?;
    let sidecars = start_sidecars(&mesh, plane, plane).await?;
    let via = mesh.pod("curl")?.outbound_addr();
    until_status(via, 200).await?;
    std::fs::write(
        mesh.manifests.join("50-upstream-traffic-setting.yaml"),
        setting(&format!(
            "  rateLimit: {{local: {{http: {{requests: {LIMIT}, unit: second}}}}}}\n"
        )),
    )?;
    // Applied once a burst over both instances' buckets meets a 429.
    eventually(CONVERGE, || async {
        let burst: Vec<_> = (0..(4 * LIMIT))
            .map(|_| tokio::spawn(http_get_via(via, HTTPBIN, "/get")))
            .collect();
        let mut limited = false;
        for reply in burst {
            limited |= reply.await??.status == 429;
        }
        ensure!(limited, "a burst of {} requests met no limit", 4 * LIMIT);
        Ok(())
    })
    .await?;
    // Two instances, round robin: 4x the limit offered is 2x each one's.
    let offered_per_second = 4 * LIMIT;
    let interval = Duration::from_secs(1) / offered_per_second;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut requests = tokio::task::JoinSet::new();
    let started = Instant::now();
    while started.elapsed() < WINDOW {
        ticker.tick().await;
        requests.spawn(http_get_via(via, HTTPBIN, "/get"));
    }
    let mut admitted: BTreeMap<String, u32> = BTreeMap::new();
    let mut offered = 0u32;
    while let Some(reply) = requests.join_next().await {
        offered += 1;
        let reply = reply??;
        match reply.status {
            200 => {
                *admitted
                    .entry(reply.served_by().unwrap_or("?").to_owned())
                    .or_default() += 1
            }
            429 => {}
            other => anyhow::bail!("unexpected status {other}: {reply:?}"),
        }
    }
    if std::env::var_os("FSM_TEST_DEBUG").is_some() {
        for (pod, sidecar) in mesh.pods.iter().zip(&sidecars) {
            eprintln!("{}: {}", pod.name, sidecar.stats_with("rate_limit").await?);
        }
    }
    let expected = f64::from(LIMIT) * WINDOW.as_secs_f64();
    eprintln!(
        "rate-limit accuracy, {plane:?}: {offered} requests offered in {WINDOW:?} ({offered_per_second}/s, 2x the limit of each instance), admitted per instance {admitted:?}, limit x window = {expected}"
    );
    Ok(admitted
        .into_iter()
        .map(|(pod, n)| (pod, f64::from(n) / expected))
        .collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_twice_the_limit_each_instance_admits_its_limit() {
    for (plane, subnet) in [Plane::Envoy, Plane::FsmSidecar].into_iter().zip(68..) {
        let fractions = admitted_fraction(plane, subnet)
            .await
            .unwrap_or_else(|e| panic!("{plane:?}: {e:#}"));
        assert_eq!(
            fractions.len(),
            2,
            "{plane:?}: both instances answer: {fractions:?}"
        );
        for (pod, fraction) in &fractions {
            assert!(
                (0.9..=1.1).contains(fraction),
                "{plane:?}: {pod} admitted {:.1} % of its limit",
                fraction * 100.0
            );
        }
    }
}
