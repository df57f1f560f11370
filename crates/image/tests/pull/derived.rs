//! Derived layers (a JVM's class-data archive): made once per cluster under
//! a lock on the maker's lease, recorded with their facts, forgotten when
//! unusable.

use std::collections::BTreeMap;

use podvisor_image::derived::{add_derived_layer, valid_key};
use podvisor_image::{ChainId, Digest};

use crate::env::Env;

fn archive_tar(dir: &std::path::Path, content: &[u8]) -> std::path::PathBuf {
    let path = dir.join("archive.tar");
    let mut builder = tar::Builder::new(std::fs::File::create(&path).unwrap());
    let mut header = tar::Header::new_gnu();
    header.set_size(content.len() as u64);
    header.set_mode(0o444);
    header.set_uid(0);
    header.set_gid(0);
    header.set_mtime(0);
    header.set_cksum();
    builder
        .append_data(&mut header, ".podvisor/jvm/app.jsa", content)
        .unwrap();
    builder.finish().unwrap();
    path
}

#[tokio::test]
async fn a_derived_layer_is_made_once_under_a_lock_and_can_be_forgotten() {
    let env = Env::new().await;
    let key = "ab".repeat(32);
    assert!(valid_key(&key) && !valid_key("../etc") && !valid_key(&"AB".repeat(32)));
    assert!(env.catalog.derived(&key).await.unwrap().is_none());

    // One maker at a time; a dead maker's lock goes with its lease.
    let other = env.other_process().await;
    assert!(env.catalog.try_lock_derived(&key, "train").await.unwrap());
    assert!(!other.try_lock_derived(&key, "train").await.unwrap());

    let parent = ChainId::extend(None, &Digest::sha256_of(b"base layer"));
    let tar = archive_tar(env.dir.path(), b"\xa8\xba\x0b\xf0 archive bytes");
    let facts = BTreeMap::from([("loadedClasses".to_string(), "1335".to_string())]);
    let (entry, disk, hold) = add_derived_layer(
        &env.cache,
        &env.catalog,
        &key,
        &parent,
        &tar,
        facts.clone(),
        "test",
    )
    .await
    .unwrap();
    env.catalog.unlock_derived(&key).await.unwrap();
    hold.release().await;
    assert_eq!(entry.parent, parent);
    assert_eq!(disk.parent.as_ref(), Some(&parent));
    assert!(disk.path.is_file(), "the layer disk is in the cache");

    // Every process sees it, with what its maker measured.
    let seen = other.derived(&key).await.unwrap().expect("recorded");
    assert_eq!((seen.chain_id, seen.facts), (disk.chain_id.clone(), facts));

    // An unusable archive is forgotten, and may be made again.
    other.forget_derived(&key).await.unwrap();
    assert!(env.catalog.derived(&key).await.unwrap().is_none());
    assert!(other.try_lock_derived(&key, "train").await.unwrap());
    other.close().await;
    assert!(env.catalog.try_lock_derived(&key, "train").await.unwrap());

    // A key from elsewhere is checked before it names anything.
    assert!(env.catalog.derived("../../x").await.is_err());
}
