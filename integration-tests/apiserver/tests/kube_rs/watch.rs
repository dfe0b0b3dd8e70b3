//! List/watch through `kube::runtime::watcher` and `reflector`, and raw `Api::watch` streams.

use std::time::Duration;

use fsm_test_apiserver::{ApiServer, Verb};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::ResourceExt;
use kube::api::{Api, ListParams, Patch, PatchParams, WatchEvent, WatchParams};
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::{self, Store as Reader};
use kube::runtime::{WatchStreamExt, watcher};
use serde_json::json;

use crate::{config_map, eventually, namespace, server};

/// Runs a reflector for config maps in the background; returns its reader.
fn reflect(api: Api<ConfigMap>, config: watcher::Config) -> Reader<ConfigMap> {
    let (reader, writer) = reflector::store();
    let stream =
        reflector::reflector(writer, watcher(api, config).default_backoff()).applied_objects();
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

fn data(reader: &Reader<ConfigMap>, name: &str) -> Option<String> {
    reader
        .state()
        .iter()
        .find(|c| c.metadata.name.as_deref() == Some(name))
        .and_then(|c| c.data.as_ref()?.get("k").cloned())
}

async fn reflector_follows_changes(config: watcher::Config) {
    let server = server().await;
    let store = server.store();
    store
        .apply(&config_map("default", "before", &[]))
        .expect("load");
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let reader = reflect(api.clone(), config);
    tokio::time::timeout(Duration::from_secs(10), reader.wait_until_ready())
        .await
        .expect("ready in time")
        .expect("ready");
    assert_eq!(names(&reader), vec!["before"]);

    api.create(&Default::default(), &config_map("default", "after", &[]))
        .await
        .expect("create");
    eventually("ADDED reaches the reflector", || async {
        names(&reader) == ["after", "before"]
    })
    .await;
    api.patch(
        "after",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "changed"}})),
    )
    .await
    .expect("patch");
    eventually("MODIFIED reaches the reflector", || async {
        data(&reader, "after").as_deref() == Some("changed")
    })
    .await;
    store
        .delete("v1", "ConfigMap", Some("default"), "before")
        .expect("delete in-process");
    eventually("DELETED reaches the reflector", || async {
        names(&reader) == ["after"]
    })
    .await;
}

#[tokio::test]
async fn watcher_initial_list_then_watch() {
    reflector_follows_changes(watcher::Config::default()).await;
}

#[tokio::test]
async fn watcher_with_streaming_lists() {
    reflector_follows_changes(watcher::Config::default().streaming_lists()).await;
}

#[tokio::test]
async fn watcher_with_any_semantic() {
    reflector_follows_changes(watcher::Config::default().any_semantic()).await;
}

#[tokio::test]
async fn streaming_list_ends_initial_events_with_annotated_bookmark() {
    let server = server().await;
    server
        .store()
        .apply(&config_map("default", "a", &[]))
        .expect("load");
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let mut stream = api
        .watch(&WatchParams::streaming_lists().timeout(5), "0")
        .await
        .expect("watch")
        .boxed();
    match stream.try_next().await.expect("event") {
        Some(WatchEvent::Added(cm)) => assert_eq!(cm.metadata.name.as_deref(), Some("a")),
        other => panic!("expected ADDED, got {other:?}"),
    }
    match stream.try_next().await.expect("event") {
        Some(WatchEvent::Bookmark(bm)) => {
            assert_eq!(
                bm.metadata
                    .annotations
                    .get("k8s.io/initial-events-end")
                    .map(String::as_str),
                Some("true")
            );
            assert_eq!(
                bm.metadata.resource_version,
                server.store().resource_version().to_string()
            );
            assert_eq!(bm.types.kind, "ConfigMap");
        }
        other => panic!("expected BOOKMARK, got {other:?}"),
    }
}

#[tokio::test]
async fn label_selector_watch_reports_objects_leaving_the_selection_as_deleted() {
    let server = server().await;
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let current = api
        .list(&ListParams::default())
        .await
        .expect("list")
        .metadata
        .resource_version
        .expect("rv");
    let mut stream = api
        .watch(
            &WatchParams::default().labels("app=web").timeout(10),
            &current,
        )
        .await
        .expect("watch")
        .boxed();
    let store = server.store();
    store
        .apply(&config_map("default", "other", &[("app", "db")]))
        .expect("not selected");
    store
        .apply(&config_map("default", "w", &[("app", "web")]))
        .expect("selected");
    store
        .apply(&config_map("default", "w", &[("app", "db")]))
        .expect("leaves selection");
    store
        .apply(&config_map("default", "w", &[("app", "web")]))
        .expect("returns");

    let mut seen = Vec::new();
    while seen.len() < 3 {
        match stream.try_next().await.expect("event") {
            Some(WatchEvent::Added(c)) => {
                seen.push(format!("ADDED {}", c.metadata.name.unwrap_or_default()))
            }
            Some(WatchEvent::Modified(c)) => {
                seen.push(format!("MODIFIED {}", c.metadata.name.unwrap_or_default()))
            }
            Some(WatchEvent::Deleted(c)) => {
                // The last state that matched, at the resourceVersion of the change.
                assert_eq!(c.labels().get("app").map(String::as_str), Some("web"));
                seen.push(format!("DELETED {}", c.metadata.name.unwrap_or_default()));
            }
            Some(WatchEvent::Bookmark(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(seen, vec!["ADDED w", "DELETED w", "ADDED w"]);
}

#[tokio::test]
async fn pagination_over_500_objects() {
    let server = server().await;
    let store = server.store();
    store.apply(&namespace("bulk")).expect("namespace");
    store
        .apply_all((0..1234).map(|i| {
            config_map(
                "bulk",
                &format!("cm-{i:04}"),
                &[("n", &(i % 2).to_string())],
            )
        }))
        .expect("bulk load");
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "bulk");

    let first = api
        .list(&ListParams::default().limit(500))
        .await
        .expect("page 1");
    assert_eq!(first.items.len(), 500);
    assert_eq!(first.metadata.remaining_item_count, Some(734));
    let token = first.metadata.continue_.clone().expect("continue token");
    let second = api
        .list(&ListParams::default().limit(500).continue_token(&token))
        .await
        .expect("page 2");
    assert_eq!(
        second
            .items
            .first()
            .and_then(|c| c.metadata.name.as_deref()),
        Some("cm-0500")
    );
    assert_eq!(
        second.metadata.resource_version,
        first.metadata.resource_version
    );

    server.reset_request_counts();
    let reader = reflect(api.clone(), watcher::Config::default().labels("n=1"));
    tokio::time::timeout(Duration::from_secs(20), reader.wait_until_ready())
        .await
        .expect("ready in time")
        .expect("ready");
    assert_eq!(reader.state().len(), 617);
    assert_eq!(
        server.request_count(Verb::List),
        2,
        "617 objects come in two pages of 500"
    );

    let all = reflect(api, watcher::Config::default());
    tokio::time::timeout(Duration::from_secs(20), all.wait_until_ready())
        .await
        .expect("ready in time")
        .expect("ready");
    assert_eq!(all.state().len(), 1234);
    assert_eq!(server.request_count(Verb::List), 5);
}

#[tokio::test]
async fn bookmarks_arrive_periodically() {
    let server = ApiServer::builder()
        .bookmark_interval(Duration::from_millis(200))
        .start()
        .await
        .expect("start");
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let rv = server.store().resource_version().to_string();
    let mut stream = api
        .watch(&WatchParams::default().timeout(10), &rv)
        .await
        .expect("watch")
        .boxed();
    server
        .store()
        .apply(&config_map("default", "x", &[]))
        .expect("load");
    let mut bookmarks = 0;
    while bookmarks < 2 {
        match tokio::time::timeout(Duration::from_secs(5), stream.try_next())
            .await
            .expect("in time")
            .expect("event")
        {
            Some(WatchEvent::Bookmark(bm)) => {
                assert_eq!(
                    bm.metadata.resource_version,
                    server.store().resource_version().to_string()
                );
                bookmarks += 1;
            }
            Some(WatchEvent::Added(_)) => {}
            other => panic!("unexpected {other:?}"),
        }
    }

    // Without allowWatchBookmarks there are none.
    let quiet = WatchParams {
        bookmarks: false,
        ..WatchParams::default().timeout(1)
    };
    let events: Vec<_> = api
        .watch(&quiet, &rv)
        .await
        .expect("watch")
        .try_collect()
        .await
        .expect("events");
    assert!(events.iter().all(|e| !matches!(e, WatchEvent::Bookmark(_))));
}

#[tokio::test]
async fn timeout_seconds_closes_the_stream() {
    let server = server().await;
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let started = std::time::Instant::now();
    let events: Vec<_> = api
        .watch(&WatchParams::default().timeout(1), "0")
        .await
        .expect("watch")
        .try_collect()
        .await
        .expect("events");
    assert!(events.is_empty());
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "took {took:?}"
    );
}

#[tokio::test]
async fn watch_from_a_compacted_version_is_410_gone() {
    let server = server().await;
    let store = server.store();
    let old = store.resource_version().to_string();
    store.apply(&config_map("default", "a", &[])).expect("load");
    server.compact();
    let api: Api<ConfigMap> = Api::namespaced(server.client(), "default");
    let mut stream = api
        .watch(&WatchParams::default().timeout(5), &old)
        .await
        .expect("watch")
        .boxed();
    match stream.try_next().await.expect("event") {
        Some(WatchEvent::Error(status)) => {
            assert_eq!(status.code, 410);
            assert_eq!(status.reason, "Expired");
            assert!(status.message.starts_with("too old resource version: "));
        }
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    assert!(
        stream.try_next().await.expect("end").is_none(),
        "the stream ends after the error"
    );

    // Watching from the compaction point itself is fine.
    let now = store.resource_version().to_string();
    let events: Vec<_> = api
        .watch(&WatchParams::default().timeout(1), &now)
        .await
        .expect("watch")
        .try_collect()
        .await
        .expect("events");
    assert!(events.iter().all(|e| !matches!(e, WatchEvent::Error(_))));
}

#[tokio::test]
async fn metadata_watcher_sees_partial_objects() {
    let server = server().await;
    server
        .store()
        .apply(&config_map("default", "m", &[("app", "x")]))
        .expect("load");
    // `Api<PartialObjectMeta<K>>` sends `Accept: …;as=PartialObjectMetadata…` on lists and watches.
    let api: Api<PartialObjectMeta<ConfigMap>> = Api::namespaced(server.client(), "default");
    let (reader, writer) = reflector::store();
    let stream = reflector::reflector(writer, watcher(api, watcher::Config::default()));
    tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while stream.next().await.is_some() {}
    });
    tokio::time::timeout(Duration::from_secs(10), reader.wait_until_ready())
        .await
        .expect("ready in time")
        .expect("ready");
    let state = reader.state();
    assert_eq!(state.len(), 1);
    assert_eq!(
        state[0].types.as_ref().map(|t| t.kind.as_str()),
        Some("PartialObjectMetadata")
    );
    assert_eq!(
        state[0]
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("app"))
            .map(String::as_str),
        Some("x")
    );
}
