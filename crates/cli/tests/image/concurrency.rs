//! Many processes and "hosts" pulling at once through one shared cache:
//! each blob is fetched from the registry once; a puller killed mid-layer
//! is taken over.

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use podvisor_testbed::cli::TestDir;
use podvisor_testbed::etcd::EtcdServer;
use podvisor_testbed::oci::{Entry, ImageBuilder, incompressible};
use podvisor_testbed::registry::Registry;
use podvisor_testbed::throttle::ThrottledProxy;

use crate::{app_image, leftovers, no_config, podvisor};

/// A three-layer image with some weight in each layer.
fn three_layers() -> podvisor_testbed::oci::BuiltImage {
    app_image("concurrent")
        .layer(vec![Entry::file(
            "data/blob",
            incompressible(2 << 20, "three"),
            0o644,
        )])
        .build()
        .unwrap()
}

#[test]
fn eight_processes_fetch_each_blob_once() {
    let t = TestDir::new();
    no_config(&t);
    let registry = Registry::start();
    let built = three_layers();
    registry.push(&built, "app", "v1");
    let reference = registry.reference("app", "v1");
    let pulls: Vec<_> = (0..8)
        .map(|_| {
            let cmd = podvisor(&t).args(["image", "pull", &reference]);
            std::thread::spawn(move || cmd.output())
        })
        .collect();
    for p in pulls {
        let out = p.join().unwrap();
        crate::assert_code(&out, 0);
        assert!(
            out.stdout.contains(&built.manifest_digest),
            "{}",
            out.stdout
        );
    }
    for digest in &built.layer_digests {
        assert_eq!(
            registry.blob_gets(digest),
            1,
            "{digest} fetched more than once"
        );
    }
    assert_eq!(t.layer_disks().len(), 3);
    assert!(leftovers(&t).is_empty(), "{:?}", leftovers(&t));
}

#[test]
fn hosts_sharing_a_cache_through_etcd_fetch_each_blob_once() {
    let etcd = EtcdServer::start();
    let registry = Registry::start();
    let built = three_layers();
    registry.push(&built, "app", "v1");
    let reference = registry.reference("app", "v1");
    // Four "hosts": their own state directories, one shared cache, one etcd.
    let shared = TestDir::new();
    let hosts: Vec<TestDir> = (0..4).map(|_| TestDir::new()).collect();
    let pulls: Vec<_> = hosts
        .iter()
        .map(|h| {
            no_config(h);
            let cmd = crate::podvisor_at(h, &shared.cache_dir())
                .env("PODVISOR_CATALOG", etcd.url())
                .args(["image", "pull", &reference]);
            std::thread::spawn(move || cmd.output())
        })
        .collect();
    for p in pulls {
        crate::assert_code(&p.join().unwrap(), 0);
    }
    for digest in &built.layer_digests {
        assert_eq!(
            registry.blob_gets(digest),
            1,
            "{digest} fetched more than once"
        );
    }
    assert_eq!(shared.layer_disks().len(), 3);
    assert!(
        !shared.cache_dir().join("catalog.db").exists(),
        "the catalog is in etcd"
    );
    // Every host sees the image in the shared catalog.
    let out = podvisor(&hosts[3])
        .args(["image", "ls", "--catalog", &etcd.url()])
        .success();
    assert!(out.stdout.contains(&reference), "{}", out.stdout);
}

/// Total bytes of regular files under `dir`.
fn du(dir: &std::path::Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return 0;
    };
    rd.flatten()
        .map(|e| {
            let m = e.metadata().unwrap();
            if m.is_dir() { du(&e.path()) } else { m.len() }
        })
        .sum()
}

#[test]
fn a_puller_killed_mid_layer_is_taken_over() {
    let t = TestDir::new();
    no_config(&t);
    let registry = Registry::start();
    let big_layer = 12 << 20;
    let built = ImageBuilder::new()
        .busybox_layer()
        .layer(vec![Entry::file(
            "big",
            incompressible(big_layer, "kill"),
            0o644,
        )])
        .build()
        .unwrap();
    registry.push(&built, "big", "v1");
    // 3 MiB/s: the big layer takes about four seconds.
    let proxy = ThrottledProxy::start(registry.addr(), 3 << 20);
    let reference = format!("{}/big:v1", proxy.addr());

    let spawn = || {
        Command::new(env!("CARGO_BIN_EXE_podvisor"))
            .env("PODVISOR_NETWORK", "none")
            .env("PODVISOR_CACHE_DIR", t.cache_dir())
            .env("DOCKER_CONFIG", t.path().join("docker"))
            .env("PODVISOR_CONFIG", t.path().join("no-config.toml"))
            .args(["image", "pull", &reference])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let mut first = spawn();
    let staging = t.cache_dir().join("layers-v2/.staging");
    let deadline = Instant::now() + Duration::from_secs(60);
    while du(&staging) < 2 << 20 {
        assert!(Instant::now() < deadline, "the first pull never got going");
        std::thread::sleep(Duration::from_millis(20));
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    assert!(
        t.layer_disks().len() < 2,
        "the big layer must not be complete yet"
    );

    // Two more pullers: one takes over once the dead one's lease expires,
    // the other waits for it.
    let (mut a, mut b) = (spawn(), spawn());
    let mut outputs = Vec::new();
    for child in [&mut a, &mut b] {
        let status = child.wait().unwrap();
        let mut err = String::new();
        child
            .stderr
            .take()
            .unwrap()
            .read_to_string(&mut err)
            .unwrap();
        assert!(status.success(), "{err}");
        outputs.push(err);
    }
    let all = outputs.join("\n");
    let big = &built.layer_digests[1][..19];
    assert!(
        all.contains(&format!("{big}: waiting for pid {}", first.id())),
        "nobody waited for the killed pull:\n{all}"
    );
    assert_eq!(
        all.matches(&format!("{big}: fetching")).count(),
        1,
        "exactly one puller takes over:\n{all}"
    );
    assert_eq!(t.layer_disks().len(), 2);
    // One complete download of the big blob after the killed partial one.
    let size = built.layers[1].data.len() as u64;
    let big_gets: Vec<_> = registry
        .all_blob_gets()
        .into_iter()
        .filter(|e| e.path.ends_with(&built.layer_digests[1]))
        .collect();
    assert_eq!(
        big_gets.iter().filter(|e| e.bytes == size).count(),
        1,
        "{big_gets:?}"
    );
    assert!(
        leftovers(&t).is_empty(),
        "the dead pull's files remain: {:?}\n{all}",
        leftovers(&t)
    );
    let out = podvisor(&t).args(["image", "ls"]).success();
    assert!(out.stdout.contains(&reference), "{}", out.stdout);
}
