//! The API server going away and coming back: stop/restart keep state, watchers resume, and a
//! compaction while they are away makes them relist (410 Gone) and converge on current state.

use std::time::Duration;

use fsm_test_apiserver::Verb;
use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::Api;
use kube::runtime::reflector::{self, Store as Reader};
use kube::runtime::{WatchStreamExt, watcher};

use crate::{config_map, eventually, server};

fn reflect(api: Api<ConfigMap>) -> Reader<ConfigMap> {
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(
        writer,
        watcher(api, watcher::Config::default()).default_backoff(),
    )
    .applied_objects();
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while stream.next().await.is_some() {}
    });
    reader
}

fn names(reader: &Reader<ConfigMap>) -> Vec<String> {
    let mut v: Vec<String> = reader
        .state()
        .iter()
        .filter_map(|c| c.metadata.name.clone())
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn stop_and_restart_keep_state_and_the_watcher_resumes() {
    let server = server().await;
    let store = server.store();
    store.apply(&config_map("default", "a", &[])).expect("load");
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let reader = reflect(api.clone());
    tokio::time::timeout(Duration::from_secs(10), reader.wait_until_ready())
        .await
        .expect("ready in time")
        .expect("ready");
    let lists_before = server.request_count(Verb::List);

    server.stop().await;
    assert!(!server.is_running());
    assert!(api.get("a").await.is_err(), "nothing is listening");

    server.restart().await.expect("restart");
    assert!(api.get("a").await.is_ok(), "state survived the restart");
    store
        .apply(&config_map("default", "b", &[]))
        .expect("load after restart");
    eventually("the watcher resumes after the restart", || async {
        names(&reader) == ["a", "b"]
    })
    .await;
    assert_eq!(
        server.request_count(Verb::List),
        lists_before,
        "resuming from the last resourceVersion needs no relist"
    );
}

#[tokio::test]
async fn compaction_while_away_forces_a_relist_that_recovers() {
    let server = server().await;
    let store = server.store();
    store
        .apply(&config_map("default", "keep", &[]))
        .expect("load");
    store
        .apply(&config_map("default", "drop", &[]))
        .expect("load");
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let reader = reflect(api);
    tokio::time::timeout(Duration::from_secs(10), reader.wait_until_ready())
        .await
        .expect("ready in time")
        .expect("ready");
    assert_eq!(names(&reader), vec!["drop", "keep"]);
    let lists_before = server.request_count(Verb::List);

    server.stop().await;
    store
        .delete("v1", "ConfigMap", Some("default"), "drop")
        .expect("delete while away");
    store
        .apply(&config_map("default", "new", &[]))
        .expect("create while away");
    server.compact();
    server.restart().await.expect("restart");

    eventually("the watcher relists and sees the current state", || async {
        names(&reader) == ["keep", "new"]
    })
    .await;
    assert!(
        server.request_count(Verb::List) > lists_before,
        "a 410 leads to a relist"
    );
}

#[tokio::test]
async fn closed_watches_are_resumed_without_a_relist() {
    let server = server().await;
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let reader = reflect(api);
    tokio::time::timeout(Duration::from_secs(10), reader.wait_until_ready())
        .await
        .expect("ready in time")
        .expect("ready");
    let watches = server.request_count(Verb::Watch);
    server.close_watches();
    eventually("the watcher re-watches", || async {
        server.request_count(Verb::Watch) > watches
    })
    .await;
    server
        .store()
        .apply(&config_map("default", "later", &[]))
        .expect("load");
    eventually("events flow on the new watch", || async {
        names(&reader) == ["later"]
    })
    .await;
    assert_eq!(server.request_count(Verb::List), 1);
}

#[tokio::test]
async fn compact_then_close_watches_makes_every_watcher_relist() {
    let server = server().await;
    server
        .store()
        .apply(&config_map("default", "a", &[]))
        .expect("load");
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let readers = [reflect(api.clone()), reflect(api)];
    for reader in &readers {
        tokio::time::timeout(Duration::from_secs(10), reader.wait_until_ready())
            .await
            .expect("ready in time")
            .expect("ready");
    }
    assert_eq!(server.request_count(Verb::List), 2);

    // Even watchers that are fully up to date resume from an expired version.
    server.compact();
    server.close_watches();
    eventually("both watchers relist", || async {
        server.request_count(Verb::List) >= 4
    })
    .await;
    server
        .store()
        .apply(&config_map("default", "b", &[]))
        .expect("load");
    for reader in &readers {
        eventually("the relisted watcher follows new events", || async {
            names(reader) == ["a", "b"]
        })
        .await;
    }
}
