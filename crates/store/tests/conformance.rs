//! One conformance suite, run against both backends: `sqlite::*` on a temp
//! file, `etcd::*` on a real etcd server started for the test.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use common::{Backend, assert_quiet, next_event, wait_gone};
use podvisor_store::{KeyValue, LeaseKeeper, StoreError, WatchEvent};

/// Lease TTL of the tests: etcd 3.4 grants at least 2 s.
const TTL: Duration = Duration::from_secs(2);
const EVENT_WAIT: Duration = Duration::from_secs(5);

macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&super::Backend::sqlite().await).await;
                }
            )*
        }
        mod etcd {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(&super::Backend::etcd().await).await;
                }
            )*
        }
    };
}

conformance!(
    get_put_list_with_prefix_isolation,
    create_if_absent_race_has_one_winner,
    compare_and_swap,
    concurrent_cas_increments_lose_nothing,
    delete_and_delete_if,
    revisions_strictly_increase,
    watch_replays_history_then_live_events,
    watch_resumed_from_last_revision_misses_nothing,
    watch_from_compacted_revision_is_refused,
    lease_keys_vanish_after_ttl,
    kept_alive_lease_keeps_keys_until_dropped,
    lease_keeper_reports_a_revoked_lease_as_lost,
    revoke_deletes_keys_with_delete_events,
    update_keeps_the_lease_put_replaces_it,
    invalid_requests_are_refused,
);

fn keys(kvs: &[KeyValue]) -> Vec<&str> {
    kvs.iter().map(|kv| kv.key.as_str()).collect()
}

async fn get_put_list_with_prefix_isolation(b: &Backend) {
    let s = &b.store;
    assert_eq!(s.get("a/1").await.unwrap(), None);
    let r1 = s.put("a/1", b"one", None).await.unwrap();
    s.put("a/2", b"two", None).await.unwrap();
    s.put("ab/1", b"x", None).await.unwrap();
    s.put("b/1", b"y", None).await.unwrap();
    s.put("a/empty", b"", None).await.unwrap();
    let r2 = s.put("a/1", b"uno", None).await.unwrap();
    assert_eq!(
        s.get("a/1").await.unwrap(),
        Some(KeyValue {
            key: "a/1".into(),
            value: b"uno".to_vec(),
            create_revision: r1,
            mod_revision: r2,
            lease: None,
        })
    );
    assert_eq!(s.get("a/empty").await.unwrap().unwrap().value, b"");

    let (kvs, rev) = s.list("a/").await.unwrap();
    assert_eq!(keys(&kvs), ["a/1", "a/2", "a/empty"]);
    assert_eq!(rev, r2, "the listed revision is that of the last change");
    assert_eq!(rev, s.current_revision().await.unwrap());
    assert_eq!(
        keys(&s.list("a").await.unwrap().0),
        ["a/1", "a/2", "a/empty", "ab/1"]
    );
    assert_eq!(keys(&s.list("b/").await.unwrap().0), ["b/1"]);
    assert_eq!(
        keys(&s.list("").await.unwrap().0),
        ["a/1", "a/2", "a/empty", "ab/1", "b/1"]
    );
    let (none, rev_empty) = s.list("c/").await.unwrap();
    assert!(none.is_empty());
    assert_eq!(rev_empty, rev);
    // Unicode keys sort and match by their UTF-8 bytes.
    s.put("u/é", b"e", None).await.unwrap();
    s.put("u/\u{7f}", b"del", None).await.unwrap();
    assert_eq!(keys(&s.list("u/").await.unwrap().0), ["u/\u{7f}", "u/é"]);
    assert_eq!(keys(&s.list("u/\u{7f}").await.unwrap().0), ["u/\u{7f}"]);
}

async fn create_if_absent_race_has_one_winner(b: &Backend) {
    let tasks: Vec<_> = (0..16)
        .map(|i| {
            let s = b.store.clone();
            tokio::spawn(
                async move { (i, s.create("race", format!("{i}").as_bytes(), None).await) },
            )
        })
        .collect();
    let mut winners = Vec::new();
    let mut losers_saw = BTreeSet::new();
    for t in tasks {
        let (i, result) = t.await.unwrap();
        match result.unwrap() {
            Ok(rev) => winners.push((i, rev)),
            Err(existing) => {
                losers_saw.insert(existing.value);
            }
        }
    }
    assert_eq!(winners.len(), 1, "exactly one create wins: {winners:?}");
    let (winner, rev) = winners[0];
    let stored = b.store.get("race").await.unwrap().unwrap();
    assert_eq!(stored.value, format!("{winner}").as_bytes());
    assert_eq!((stored.create_revision, stored.mod_revision), (rev, rev));
    // Every loser was shown the winner's value.
    assert_eq!(losers_saw, BTreeSet::from([stored.value.clone()]));
}

async fn compare_and_swap(b: &Backend) {
    let s = &b.store;
    assert_eq!(s.update("cas", b"v", 1).await.unwrap(), Err(None));
    assert_eq!(s.update("cas", b"v", 0).await.unwrap(), Err(None));
    assert_eq!(s.get("cas").await.unwrap(), None, "CAS never creates");
    let r1 = s.put("cas", b"v1", None).await.unwrap();
    let r2 = s.update("cas", b"v2", r1).await.unwrap().unwrap();
    assert!(r2 > r1);
    // A stale revision fails and shows the current value.
    let current = s
        .update("cas", b"v3", r1)
        .await
        .unwrap()
        .unwrap_err()
        .unwrap();
    assert_eq!(
        (current.value.as_slice(), current.mod_revision),
        (&b"v2"[..], r2)
    );
    assert_eq!(current.create_revision, r1);
    assert_eq!(s.get("cas").await.unwrap().unwrap().value, b"v2");
    s.delete("cas").await.unwrap();
    assert_eq!(s.update("cas", b"v4", r2).await.unwrap(), Err(None));
}

async fn concurrent_cas_increments_lose_nothing(b: &Backend) {
    b.store.put("counter", b"0", None).await.unwrap();
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let s = b.store.clone();
            tokio::spawn(async move {
                for _ in 0..10 {
                    loop {
                        let kv = s.get("counter").await.unwrap().unwrap();
                        let n: u32 = std::str::from_utf8(&kv.value).unwrap().parse().unwrap();
                        let next = (n + 1).to_string();
                        if s.update("counter", next.as_bytes(), kv.mod_revision)
                            .await
                            .unwrap()
                            .is_ok()
                        {
                            break;
                        }
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap();
    }
    assert_eq!(b.store.get("counter").await.unwrap().unwrap().value, b"80");
}

async fn delete_and_delete_if(b: &Backend) {
    let s = &b.store;
    assert_eq!(s.delete("d").await.unwrap(), None);
    assert!(!s.delete_if("d", 0).await.unwrap());
    let r1 = s.put("d", b"1", None).await.unwrap();
    assert!(!s.delete_if("d", r1 - 1).await.unwrap());
    assert!(
        s.get("d").await.unwrap().is_some(),
        "a stale delete_if keeps the key"
    );
    assert!(s.delete_if("d", r1).await.unwrap());
    assert_eq!(s.get("d").await.unwrap(), None);
    let r2 = s.put("d", b"2", None).await.unwrap();
    let r3 = s.delete("d").await.unwrap().unwrap();
    assert!(r3 > r2);
    assert_eq!(s.get("d").await.unwrap(), None);
    // Recreated after a delete: a new create_revision.
    let r4 = s.put("d", b"3", None).await.unwrap();
    assert_eq!(s.get("d").await.unwrap().unwrap().create_revision, r4);
}

async fn revisions_strictly_increase(b: &Backend) {
    let s = &b.store;
    let mut revs = vec![s.current_revision().await.unwrap()];
    revs.push(s.put("r/1", b"a", None).await.unwrap());
    revs.push(s.create("r/2", b"b", None).await.unwrap().unwrap());
    let kv = s.get("r/1").await.unwrap().unwrap();
    revs.push(
        s.update("r/1", b"c", kv.mod_revision)
            .await
            .unwrap()
            .unwrap(),
    );
    revs.push(s.delete("r/2").await.unwrap().unwrap());
    let before = s.current_revision().await.unwrap();
    assert_eq!(Some(&before), revs.last());
    // Refused changes change nothing.
    assert!(s.create("r/1", b"x", None).await.unwrap().is_err());
    assert!(s.update("r/1", b"x", 1).await.unwrap().is_err());
    assert!(!s.delete_if("r/1", 1).await.unwrap());
    assert_eq!(s.delete("r/nothing").await.unwrap(), None);
    assert_eq!(s.current_revision().await.unwrap(), before);
    revs.push(s.put("r/3", b"d", None).await.unwrap());
    assert!(
        revs.windows(2).all(|w| w[1] > w[0]),
        "not strictly increasing: {revs:?}"
    );
}

async fn watch_replays_history_then_live_events(b: &Backend) {
    let s = &b.store;
    let start = s.current_revision().await.unwrap();
    let r1 = s.put("w/a", b"1", None).await.unwrap();
    s.put("other/x", b"-", None).await.unwrap();
    let r2 = s.put("w/b", b"2", None).await.unwrap();
    let r3 = s.put("w/a", b"3", None).await.unwrap();
    let r4 = s.delete("w/b").await.unwrap().unwrap();
    let mut watch = s.watch("w/", start).await.unwrap();
    let put = |key: &str, value: &[u8], create, rev| {
        WatchEvent::Put(KeyValue {
            key: key.into(),
            value: value.to_vec(),
            create_revision: create,
            mod_revision: rev,
            lease: None,
        })
    };
    let expected = [
        put("w/a", b"1", r1, r1),
        put("w/b", b"2", r2, r2),
        put("w/a", b"3", r1, r3),
        WatchEvent::Delete {
            key: "w/b".into(),
            revision: r4,
        },
    ];
    for want in expected {
        assert_eq!(next_event(&mut watch, EVENT_WAIT).await.unwrap(), want);
    }
    // Then live events, in order; other prefixes stay out.
    s.put("other/y", b"-", None).await.unwrap();
    let r5 = s.put("w/c", b"5", None).await.unwrap();
    let r6 = s.delete("w/a").await.unwrap().unwrap();
    assert_eq!(
        next_event(&mut watch, EVENT_WAIT).await.unwrap(),
        put("w/c", b"5", r5, r5)
    );
    assert_eq!(
        next_event(&mut watch, EVENT_WAIT).await.unwrap(),
        WatchEvent::Delete {
            key: "w/a".into(),
            revision: r6
        }
    );
    assert_quiet(&mut watch, Duration::from_millis(300)).await;
    // A watch from a listed revision sees only what came after.
    let (listed, rev) = s.list("w/").await.unwrap();
    assert_eq!(keys(&listed), ["w/c"]);
    let mut from_list = s.watch("w/", rev).await.unwrap();
    assert_quiet(&mut from_list, Duration::from_millis(300)).await;
    let r7 = s.put("w/d", b"7", None).await.unwrap();
    assert_eq!(
        next_event(&mut from_list, EVENT_WAIT).await.unwrap(),
        put("w/d", b"7", r7, r7)
    );
    assert_eq!(
        next_event(&mut watch, EVENT_WAIT).await.unwrap(),
        put("w/d", b"7", r7, r7)
    );
}

async fn watch_resumed_from_last_revision_misses_nothing(b: &Backend) {
    let s = &b.store;
    let start = s.current_revision().await.unwrap();
    let mut watch = s.watch("job/", start).await.unwrap();
    s.put("job/1", b"a", None).await.unwrap();
    let seen = next_event(&mut watch, EVENT_WAIT).await.unwrap().revision();
    drop(watch);
    // Changes while nobody watches...
    let missed: Vec<i64> = vec![
        s.put("job/2", b"b", None).await.unwrap(),
        s.put("unrelated", b"-", None).await.unwrap(),
        s.delete("job/1").await.unwrap().unwrap(),
    ];
    let mut resumed = s.watch("job/", seen).await.unwrap();
    let first = next_event(&mut resumed, EVENT_WAIT).await.unwrap();
    let second = next_event(&mut resumed, EVENT_WAIT).await.unwrap();
    assert_eq!((first.key(), first.revision()), ("job/2", missed[0]));
    assert_eq!(
        second,
        WatchEvent::Delete {
            key: "job/1".into(),
            revision: missed[2]
        }
    );
    assert_quiet(&mut resumed, Duration::from_millis(300)).await;
}

async fn watch_from_compacted_revision_is_refused(b: &Backend) {
    let s = &b.store;
    let start = s.current_revision().await.unwrap();
    for i in 0..5 {
        s.put(&format!("c/{i}"), b"v", None).await.unwrap();
    }
    let kept = b.compact().await;
    assert!(kept > start + 1);
    match s.watch("c/", start).await {
        Err(StoreError::Compacted { requested, oldest }) => {
            assert_eq!((requested, oldest), (start, kept));
        }
        other => panic!("expected Compacted, got {:?}", other.map(|_| "a watch")),
    }
    // The remedy works: list, then watch from the listed revision.
    let (listed, rev) = s.list("c/").await.unwrap();
    assert_eq!(listed.len(), 5);
    let mut watch = s.watch("c/", rev).await.unwrap();
    let r = s.put("c/new", b"n", None).await.unwrap();
    let event = next_event(&mut watch, EVENT_WAIT).await.unwrap();
    assert_eq!((event.key(), event.revision()), ("c/new", r));
}

async fn lease_keys_vanish_after_ttl(b: &Backend) {
    let s = &b.store;
    let granted = Instant::now();
    let lease = s.grant_lease(TTL).await.unwrap();
    let rev = s.put("l/key", b"v", Some(lease)).await.unwrap();
    assert_eq!(s.get("l/key").await.unwrap().unwrap().lease, Some(lease));
    let mut watch = s.watch("l/", rev).await.unwrap();
    tokio::time::sleep(TTL / 2).await;
    assert!(
        s.get("l/key").await.unwrap().is_some(),
        "alive within the TTL"
    );
    let gone = wait_gone(s.as_ref(), "l/key", TTL + Duration::from_secs(3)).await;
    let lived = gone - granted;
    assert!(
        lived >= TTL - Duration::from_millis(100),
        "deleted after {lived:?}"
    );
    match next_event(&mut watch, EVENT_WAIT).await.unwrap() {
        WatchEvent::Delete { key, revision } => assert!(key == "l/key" && revision > rev),
        other => panic!("expected a Delete event, got {other:?}"),
    }
    assert!(matches!(s.keep_alive(lease).await, Err(StoreError::LeaseNotFound(l)) if l == lease));
    assert!(matches!(
        s.put("l/again", b"v", Some(lease)).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    assert!(matches!(
        s.create("l/again", b"v", Some(lease)).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    assert_eq!(s.get("l/again").await.unwrap(), None);
}

async fn kept_alive_lease_keeps_keys_until_dropped(b: &Backend) {
    let s = &b.store;
    let keeper = LeaseKeeper::start(s.clone(), TTL).await.unwrap();
    s.put("k/held", b"v", Some(keeper.id())).await.unwrap();
    tokio::time::sleep(TTL * 2 + TTL / 2).await;
    assert!(
        s.get("k/held").await.unwrap().is_some(),
        "kept alive past 2.5 TTLs"
    );
    assert!(!keeper.is_lost());
    // Dropping the keeper revokes the lease: the key goes at once.
    let dropped = Instant::now();
    drop(keeper);
    let gone = wait_gone(s.as_ref(), "k/held", Duration::from_secs(3)).await;
    assert!(
        gone - dropped < TTL,
        "revoked on drop, not expired: {:?}",
        gone - dropped
    );
}

async fn lease_keeper_reports_a_revoked_lease_as_lost(b: &Backend) {
    let s = &b.store;
    let keeper = LeaseKeeper::start(s.clone(), TTL).await.unwrap();
    s.put("lost/key", b"v", Some(keeper.id())).await.unwrap();
    assert!(
        tokio::time::timeout(TTL / 2, keeper.lost()).await.is_err(),
        "lost while kept alive"
    );
    // Someone else ends the lease: the keeper notices at its next keep-alive.
    s.revoke(keeper.id()).await.unwrap();
    tokio::time::timeout(TTL, keeper.lost())
        .await
        .expect("the keeper reports the loss within a TTL");
    assert!(keeper.is_lost());
    assert_eq!(s.get("lost/key").await.unwrap(), None);
}

async fn revoke_deletes_keys_with_delete_events(b: &Backend) {
    let s = &b.store;
    let lease = s.grant_lease(Duration::from_secs(30)).await.unwrap();
    let start = s.current_revision().await.unwrap();
    s.put("v/1", b"a", Some(lease)).await.unwrap();
    s.create("v/2", b"b", Some(lease)).await.unwrap().unwrap();
    s.put("v/3", b"kept", None).await.unwrap();
    let mut watch = s.watch("v/", start).await.unwrap();
    for _ in 0..3 {
        assert!(matches!(
            next_event(&mut watch, EVENT_WAIT).await.unwrap(),
            WatchEvent::Put(_)
        ));
    }
    s.revoke(lease).await.unwrap();
    let mut deleted = BTreeSet::new();
    for _ in 0..2 {
        match next_event(&mut watch, EVENT_WAIT).await.unwrap() {
            WatchEvent::Delete { key, .. } => deleted.insert(key),
            other => panic!("expected a Delete event, got {other:?}"),
        };
    }
    assert_eq!(
        deleted,
        BTreeSet::from(["v/1".to_string(), "v/2".to_string()])
    );
    assert_eq!(keys(&s.list("v/").await.unwrap().0), ["v/3"]);
    assert!(matches!(
        s.revoke(lease).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    let keeper = LeaseKeeper::start(s.clone(), TTL).await.unwrap();
    s.put("v/4", b"d", Some(keeper.id())).await.unwrap();
    keeper.revoke().await.unwrap();
    assert_eq!(s.get("v/4").await.unwrap(), None);
}

async fn update_keeps_the_lease_put_replaces_it(b: &Backend) {
    let s = &b.store;
    let lease = s.grant_lease(Duration::from_secs(30)).await.unwrap();
    let r1 = s.put("u/k", b"1", Some(lease)).await.unwrap();
    let r2 = s.update("u/k", b"2", r1).await.unwrap().unwrap();
    let kv = s.get("u/k").await.unwrap().unwrap();
    assert_eq!(
        (kv.lease, kv.mod_revision, kv.value.as_slice()),
        (Some(lease), r2, &b"2"[..])
    );
    s.put("u/k", b"3", None).await.unwrap();
    assert_eq!(s.get("u/k").await.unwrap().unwrap().lease, None);
    s.revoke(lease).await.unwrap();
    assert_eq!(
        s.get("u/k").await.unwrap().unwrap().value,
        b"3",
        "detached from the lease"
    );
}

async fn invalid_requests_are_refused(b: &Backend) {
    let s = &b.store;
    let err = s.put("", b"v", None).await.unwrap_err();
    assert!(matches!(err, StoreError::InvalidRequest { .. }), "{err}");
    assert!(err.to_string().contains("key is empty"), "{err}");
    assert!(matches!(
        s.get("").await,
        Err(StoreError::InvalidRequest { .. })
    ));
    assert!(matches!(
        s.watch("w/", -1).await,
        Err(StoreError::InvalidRequest { .. })
    ));
    assert!(matches!(
        s.grant_lease(Duration::ZERO).await,
        Err(StoreError::InvalidRequest { .. })
    ));
    assert!(matches!(
        s.keep_alive(987_654_321).await,
        Err(StoreError::LeaseNotFound(987_654_321))
    ));
    assert!(matches!(
        s.put("k", b"v", Some(987_654_321)).await,
        Err(StoreError::LeaseNotFound(_))
    ));
    assert_eq!(
        s.get("k").await.unwrap(),
        None,
        "a refused put writes nothing"
    );
}
