//! `smi-compile`: the compiler in SMI mode on a mesh where every service has a TrafficTarget (the
//! next service's account may call it) and an HTTPRouteGroup: how long the shared view, one
//! proxy and every proxy take to compile, and how many proxies one TrafficTarget or
//! HTTPRouteGroup change recompiles. In-process (catalog, view and compiler as the controller
//! runs them), so the figures are the compiler's alone.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use fsm_catalog::{Catalog, CatalogSettings, decode_manifests};
use fsm_compiler::{MeshView, ProxyRef, compile_with_view};
use serde_json::{Value, json};

use crate::mesh_gen::to_yaml_docs;
use crate::xds_scale::mesh::{Mesh, namespace_of, service_name};

fn traffic_target(services: usize, s: usize, sources: &[usize]) -> Value {
    json!({"apiVersion": "access.smi-spec.io/v1alpha3", "kind": "TrafficTarget",
        "metadata": {"name": service_name(s), "namespace": namespace_of(s)},
        "spec": {"destination": {"kind": "ServiceAccount", "name": service_name(s), "namespace": namespace_of(s)},
                 "sources": sources.iter().map(|c| json!({"kind": "ServiceAccount",
                     "name": service_name(*c % services), "namespace": namespace_of(*c % services)})).collect::<Vec<_>>(),
                 "rules": [{"kind": "HTTPRouteGroup", "name": service_name(s)}]}})
}

fn route_group(s: usize, path: &str) -> Value {
    json!({"apiVersion": "specs.smi-spec.io/v1alpha4", "kind": "HTTPRouteGroup",
        "metadata": {"name": service_name(s), "namespace": namespace_of(s)},
        "spec": {"matches": [{"name": "api", "pathRegex": path, "methods": ["GET", "POST"]},
                             {"name": "health", "pathRegex": "/healthz", "methods": ["GET"]}]}})
}

fn apply(catalog: &mut Catalog, objects: &[Value]) -> Result<()> {
    let (decoded, errors) = decode_manifests("smi-compile.yaml", &to_yaml_docs(objects));
    ensure!(errors.is_empty(), "generated manifests: {errors:?}");
    for object in decoded {
        catalog.apply(object);
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

pub(crate) fn smi_compile(services: usize) -> Result<()> {
    let mesh = Mesh::new(services, services);
    let mut objects = mesh.all_objects();
    // SMI mode.
    objects[1]["spec"]["traffic"]["enablePermissiveTrafficPolicyMode"] = json!(false);
    for s in 0..services {
        objects.push(traffic_target(services, s, &[s + 1]));
        objects.push(route_group(s, "/api/.*"));
    }
    let mut catalog = Catalog::new(CatalogSettings::default());
    apply(&mut catalog, &objects)?;
    catalog.take_changes();
    let proxies: Vec<ProxyRef> = catalog
        .sidecar_proxies()
        .into_iter()
        .map(|p| ProxyRef {
            uuid: p.uuid,
            service_account: p.service_account,
            namespace: p.namespace,
        })
        .collect();
    ensure!(proxies.len() == services, "{} proxies", proxies.len());

    let started = Instant::now();
    let mut view = MeshView::build(&catalog);
    let view_took = started.elapsed();
    let detail = fsm_adapter_envoy::PROXY_RESOURCES_OUTBOUND;
    let mut each = Vec::with_capacity(proxies.len());
    let started = Instant::now();
    for proxy in &proxies {
        let t = Instant::now();
        let compiled = compile_with_view(&catalog, proxy, &view, detail)
            .map_err(|e| anyhow::anyhow!("{proxy:?}: {e}"))?;
        each.push(t.elapsed());
        // Every proxy is a TrafficTarget's destination: its inbound has the group's routes.
        let routes = compiled
            .ir
            .inbound
            .first()
            .map_or(0, |p| p.services[0].routes.len());
        ensure!(routes == 3, "{}: {routes} inbound routes", proxy.uuid);
    }
    let all_took = started.elapsed();
    each.sort_unstable();

    // One TrafficTarget gains a source; then one HTTPRouteGroup changes its path.
    let mut recompiled = Vec::new();
    for (what, change) in [
        ("TrafficTarget", traffic_target(services, 0, &[1, 2])),
        ("HTTPRouteGroup", route_group(0, "/v2/.*")),
    ] {
        apply(&mut catalog, &[change])?;
        let changes = catalog.take_changes();
        let started = Instant::now();
        let (_, scope) = view.refresh_scoped(&catalog, &changes);
        let covered: Vec<&ProxyRef> = proxies
            .iter()
            .filter(|p| scope.covers(&p.uuid, &p.namespace, &p.service_account, detail))
            .collect();
        for proxy in &covered {
            compile_with_view(&catalog, proxy, &view, detail)
                .map_err(|e| anyhow::anyhow!("{proxy:?}: {e}"))?;
        }
        recompiled.push((what, covered.len(), started.elapsed()));
    }

    println!(
        "smi-compile: {services} services, each with one pod, a TrafficTarget and an HTTPRouteGroup (SMI mode)"
    );
    println!(
        "  shared view: {:.1} ms; one proxy: median {:.3} ms, max {:.3} ms; every proxy: {:.1} ms (view + proxies {:.1} ms)",
        ms(view_took),
        ms(each[each.len() / 2]),
        ms(*each.last().context("no proxy")?),
        ms(all_took),
        ms(view_took + all_took)
    );
    for (what, count, took) in recompiled {
        println!(
            "  one {what} changed: {count} of {services} proxies recompiled, in {:.3} ms",
            ms(took)
        );
    }
    Ok(())
}
