//! JVM class-data archives with real pod VMs and the host's JDK 17: two
//! hosts (two runtimes with their own state, one cache and catalog, as
//! hosts of one cluster) start a Java HTTP server pod at the same time,
//! and one training run makes its archive; a pod started after that maps
//! the archive at its base address (the JVM's `-Xlog:cds` says so) with
//! the measured class count; a changed image gets an archive of its own;
//! an isolated pod gets none.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podvisor_hostd::host::{
    ContainerPlan, ContainerState, HostConfig, PodPlan, PodRuntime, PodState,
};
use podvisor_podvm::NodeConfig;

fn config(dir: &Path, state: &str) -> HostConfig {
    let mut node = NodeConfig::with_defaults(podvisor_vmm::AccelChoice::resolve(None).accel);
    node.cache_dir = dir.join("cache");
    let mut cfg = HostConfig::new(node, dir.join(state));
    cfg.delete_grace = Duration::from_secs(2);
    // Long enough for the JVM to start its server under TCG.
    cfg.jvm_archive_warm_up = Some(Duration::from_secs(12));
    cfg
}

fn plan(uid: &str, image: &Path, isolated: bool) -> PodPlan {
    let mut web = ContainerPlan::of_image("web", &image.display().to_string());
    web.memory_bytes = Some(512 << 20);
    let mut plan = PodPlan::of_containers(uid, vec![web], 512);
    plan.isolated = isolated;
    plan
}

async fn log(rt: &PodRuntime, name: &str) -> String {
    let mut r = rt.logs("default", name, Some("web"), None, false).unwrap();
    let mut out = Vec::new();
    while let Some(chunk) = r.next_chunk().await.unwrap() {
        out.extend(chunk);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits until pod `uid`'s server is listening; returns its state and log.
async fn serving(rt: &PodRuntime, uid: &str) -> (PodState, String) {
    let start = Instant::now();
    loop {
        let state = rt
            .pods()
            .into_iter()
            .find(|(p, _)| p.uid == uid)
            .map(|(_, s)| s)
            .unwrap();
        let text = log(rt, uid).await;
        if text.contains("listening on") {
            return (state, text);
        }
        assert!(
            !matches!(state.containers[0].state, ContainerState::Terminated { .. }),
            "{uid} ended: {state:#?}\n{text}"
        );
        assert!(
            start.elapsed() < Duration::from_secs(240),
            "{uid} never served: {state:#?}\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn layer_disks(cache: &Path) -> Vec<PathBuf> {
    let mut disks: Vec<PathBuf> = std::fs::read_dir(
        podvisor_image::LayerCache::open(cache)
            .unwrap()
            .layers_dir(),
    )
    .map(|d| {
        d.filter_map(|e| e.ok())
            .map(|e| e.path().join("disk.erofs"))
            .filter(|p| p.is_file())
            .collect()
    })
    .unwrap_or_default();
    disks.sort();
    disks
}

async fn wait_for_disks(cache: &Path, n: usize, what: &str) {
    let start = Instant::now();
    while layer_disks(cache).len() < n {
        assert!(
            start.elapsed() < Duration::from_secs(300),
            "{what}: layer disks {:?}",
            layer_disks(cache)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

struct VmReaper(PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        podvisor_testbed::daemon::kill_mentioning(&self.0.display().to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_a_jvm_archive_is_made_once_for_two_hosts_and_mapped_at_its_base() {
    let dir = tempfile::tempdir().unwrap();
    let _vms = VmReaper(dir.path().to_path_buf());
    let image = dir.path().join("java.tar");
    podvisor_testbed::java::java_image(dir.path(), "v1", 8080, &["-Xlog:cds=info"])
        .unwrap()
        .write_oci_archive(&image)
        .unwrap();
    let cache = dir.path().join("cache");
    let (host_a, _fa) = PodRuntime::open(config(dir.path(), "host-a")).unwrap();
    let (host_b, _fb) = PodRuntime::open(config(dir.path(), "host-b")).unwrap();

    // Both hosts start the image at once; neither has an archive yet.
    host_a.run(plan("first-a", &image, false)).unwrap();
    host_b.run(plan("first-b", &image, false)).unwrap();
    let (_, first) = serving(&host_a, "first-a").await;
    assert!(
        !first.contains("Mapped dynamic region"),
        "no archive yet:\n{first}"
    );
    serving(&host_b, "first-b").await;
    // busybox, JDK and jar layers, and one archive layer.
    wait_for_disks(&cache, 4, "the archive layer").await;

    // A pod started now maps the archive at its base address, and the
    // agent sized its JVM with the class count the training run measured.
    host_b.run(plan("second-b", &image, false)).unwrap();
    let (state, second) = serving(&host_b, "second-b").await;
    assert!(
        second.contains("Mapped dynamic region #0 at base 0x0000000800"),
        "the archive is mapped at its base address:\n{second}"
    );
    assert!(
        !second.contains("ArchiveRelocationMode == 1")
            && !second.contains("Unable to use shared archive"),
        "without relocation:\n{second}"
    );
    let profile = state.containers[0]
        .runtime_profile
        .as_ref()
        .expect("a runtime profile");
    let tool = profile
        .env
        .iter()
        .find(|(k, _)| k == "JAVA_TOOL_OPTIONS")
        .map(|(_, v)| v.as_str())
        .unwrap_or_default();
    assert!(
        tool.contains("-XX:SharedArchiveFile=/.podvisor/jvm/app.jsa")
            && tool.contains("-XX:ArchiveRelocationMode=0"),
        "{profile:#?}"
    );
    assert!(
        profile.reasons.iter().any(|r| r.contains("measured")),
        "the class count came from the training run: {profile:#?}"
    );

    // An isolated pod neither uses nor makes one.
    host_a.run(plan("isolated-a", &image, true)).unwrap();
    let (_, isolated) = serving(&host_a, "isolated-a").await;
    assert!(
        !isolated.contains("Mapped dynamic region"),
        "an isolated pod maps no shared archive:\n{isolated}"
    );

    // A changed image (its jar) gets its own archive: its app layer and
    // its archive layer.
    let changed = dir.path().join("java-v2.tar");
    podvisor_testbed::java::java_image(dir.path(), "v2", 8080, &["-Xlog:cds=info"])
        .unwrap()
        .write_oci_archive(&changed)
        .unwrap();
    host_a.run(plan("changed-a", &changed, false)).unwrap();
    serving(&host_a, "changed-a").await;
    wait_for_disks(&cache, 6, "the changed image's archive layer").await;
    // One training run per image for the two hosts: no second archive of
    // the first image appeared meanwhile.
    assert_eq!(layer_disks(&cache).len(), 6, "{:?}", layer_disks(&cache));

    for (rt, uid) in [
        (&host_a, "first-a"),
        (&host_b, "first-b"),
        (&host_b, "second-b"),
        (&host_a, "isolated-a"),
        (&host_a, "changed-a"),
    ] {
        assert!(rt.delete(uid, None).await);
    }
}
