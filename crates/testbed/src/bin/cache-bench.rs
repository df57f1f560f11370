//! The global image cache benchmark (docs/BENCHMARKS.md, issue 3):
//!
//! 1. N = 1, 4, 8 "hosts" (processes with their own state directory) pull
//!    the same 3-layer image at once from a real registry into one shared
//!    cache directory coordinated by an etcd catalog, against the baseline
//!    of N hosts with independent caches, measured in the same run:
//!    registry bytes served, bytes stored, wall time.
//! 2. The conversion rate of one large layer (`podvisor image import` of a
//!    layout holding it: verify, unpack, mkfs.erofs) against `tar -xzf` of
//!    the same blob into a directory.
//!
//! `cache-bench PODVISOR_BINARY [LARGE_LAYER_MIB]` prints markdown tables.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use podvisor_testbed::etcd::EtcdServer;
use podvisor_testbed::oci::{BuiltImage, Entry, ImageBuilder, incompressible};
use podvisor_testbed::registry::Registry;

fn main() {
    let mut args = std::env::args().skip(1);
    let Some(podvisor) = args.next().map(PathBuf::from) else {
        eprintln!("usage: cache-bench PODVISOR_BINARY [LARGE_LAYER_MIB]");
        std::process::exit(2);
    };
    let large_mib: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(256);
    let image = three_layer_image();
    let image_bytes: u64 = image
        .layers
        .iter()
        .chain([&image.config])
        .map(|b| b.data.len() as u64)
        .sum();
    println!(
        "Image: 3 layers, {:.1} MB of blobs (busybox; 16 MiB incompressible; 16 MiB text, gzip)\n",
        mb(image_bytes)
    );
    println!("| hosts | cache | registry bytes served | bytes stored | wall time |");
    println!("|---:|---|---:|---:|---:|");
    for n in [1usize, 4, 8] {
        for shared in [true, false] {
            let r = pull_round(&podvisor, &image, n, shared);
            println!(
                "| {n} | {} | {:.1} MB ({:.2}× image) | {:.1} MB | {:.2} s |",
                if shared {
                    "shared + etcd catalog"
                } else {
                    "independent (baseline)"
                },
                mb(r.served),
                r.served as f64 / image_bytes as f64,
                mb(r.stored),
                r.seconds
            );
        }
    }
    println!();
    conversion(&podvisor, large_mib);
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

fn three_layer_image() -> BuiltImage {
    let text: Vec<u8> = (0..)
        .flat_map(|i: u64| {
            format!("line {i} of a compressible text file in the benchmark image\n").into_bytes()
        })
        .take(16 << 20)
        .collect();
    ImageBuilder::new()
        .busybox_layer()
        .layer(vec![Entry::file(
            "data/random",
            incompressible(16 << 20, "bench"),
            0o644,
        )])
        .layer(vec![Entry::file("data/text", text, 0o644)])
        .cmd(&["sh"])
        .build()
        .expect("build the benchmark image")
}

struct Round {
    served: u64,
    stored: u64,
    seconds: f64,
}

fn pull_round(podvisor: &Path, image: &BuiltImage, hosts: usize, shared: bool) -> Round {
    let registry = Registry::start();
    registry.push(image, "bench/app", "v1");
    let reference = registry.reference("bench/app", "v1");
    let etcd = shared.then(EtcdServer::start);
    let dir = tempfile::tempdir().expect("temp dir");
    let shared_cache = dir.path().join("shared-cache");
    let served_before: u64 = registry
        .access_log()
        .iter()
        .filter(|e| e.method == "GET")
        .map(|e| e.bytes)
        .sum();
    let start = Instant::now();
    let children: Vec<_> = (0..hosts)
        .map(|h| {
            let state = dir.path().join(format!("host{h}"));
            std::fs::create_dir_all(&state).unwrap();
            let mut cmd = Command::new(podvisor);
            cmd.env("PODVISOR_CONFIG", "/dev/null")
                .env("DOCKER_CONFIG", state.join("docker"))
                .env("PODVISOR_RUN_DIR", state.join("run"));
            match &etcd {
                Some(etcd) => cmd
                    .env("PODVISOR_CACHE_DIR", &shared_cache)
                    .env("PODVISOR_CATALOG", etcd.url()),
                None => cmd.env("PODVISOR_CACHE_DIR", state.join("cache")),
            };
            cmd.args(["image", "pull", &reference])
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start podvisor")
        })
        .collect();
    for child in children {
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "pull failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let seconds = start.elapsed().as_secs_f64();
    let served: u64 = registry
        .access_log()
        .iter()
        .filter(|e| e.method == "GET")
        .map(|e| e.bytes)
        .sum::<u64>()
        - served_before;
    let stored = if shared {
        du(&shared_cache.join("layers-v2"))
    } else {
        (0..hosts)
            .map(|h| du(&dir.path().join(format!("host{h}/cache/layers-v2"))))
            .sum()
    };
    Round {
        served,
        stored,
        seconds,
    }
}

fn du(path: &Path) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    if !meta.is_dir() {
        return meta.len();
    }
    std::fs::read_dir(path)
        .map(|rd| rd.flatten().map(|e| du(&e.path())).sum())
        .unwrap_or(0)
}

fn conversion(podvisor: &Path, mib: usize) {
    let dir = tempfile::tempdir().expect("temp dir");
    // Many files of mixed content, like an application layer.
    let mut entries = vec![Entry::dir("usr"), Entry::dir("usr/lib")];
    let mut total = 0usize;
    let mut i = 0;
    while total < mib << 20 {
        let size = 4096 + (i * 7919) % (512 << 10);
        let data = if i % 2 == 0 {
            incompressible(size, &format!("f{i}"))
        } else {
            format!("text file {i} ").repeat(size / 16).into_bytes()
        };
        total += data.len();
        entries.push(Entry::file(&format!("usr/lib/file{i:05}"), data, 0o644));
        i += 1;
    }
    let layout = dir.path().join("layout");
    let built = ImageBuilder::new()
        .layer(entries)
        .write_layout(&layout)
        .expect("write layout");
    let blob = podvisor_testbed::oci::blob_path(&layout, &built.layer_digests[0]);
    let uncompressed = built.layer_tars[0].len() as u64;
    let compressed = std::fs::metadata(&blob).unwrap().len();

    // Alternating runs, each into a fresh directory; the median counts.
    const RUNS: usize = 3;
    let (mut tar_runs, mut pv_runs) = (Vec::new(), Vec::new());
    let (mut tar_bytes, mut disk) = (0, 0);
    for run in 0..RUNS {
        let out_dir = dir.path().join(format!("tar-out-{run}"));
        std::fs::create_dir_all(&out_dir).unwrap();
        let t = Instant::now();
        let status = Command::new("tar")
            .arg("-xzf")
            .arg(&blob)
            .arg("-C")
            .arg(&out_dir)
            .status()
            .unwrap();
        assert!(status.success());
        Command::new("sync").status().unwrap();
        tar_runs.push(t.elapsed().as_secs_f64());
        tar_bytes = du(&out_dir);
        std::fs::remove_dir_all(&out_dir).unwrap();

        let cache = dir.path().join(format!("cache-{run}"));
        let t = Instant::now();
        let out = Command::new(podvisor)
            .env("PODVISOR_CONFIG", "/dev/null")
            .env("PODVISOR_CACHE_DIR", &cache)
            .args(["image", "import"])
            .arg(&layout)
            .stderr(Stdio::piped())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        pv_runs.push(t.elapsed().as_secs_f64());
        disk = du(&cache.join("layers-v2"));
        std::fs::remove_dir_all(&cache).unwrap();
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let runs = |v: &[f64]| {
        v.iter()
            .map(|s| format!("{s:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let (tar_all, pv_all) = (runs(&tar_runs), runs(&pv_runs));
    let (tar_secs, pv_secs) = (median(&mut tar_runs), median(&mut pv_runs));

    println!(
        "Large layer: {i} files, {:.0} MB uncompressed, {:.0} MB gzip blob\n",
        mb(uncompressed),
        mb(compressed)
    );
    println!(
        "| what | median time ({RUNS} runs: seconds) | rate (uncompressed MB/s) | result on disk |"
    );
    println!("|---|---:|---:|---:|");
    println!(
        "| `tar -xzf` to a directory (+ sync) | {tar_secs:.2} s ({tar_all}) | {:.1} | {:.0} MB of files |",
        mb(uncompressed) / tar_secs,
        mb(tar_bytes)
    );
    println!(
        "| `podvisor image import` (verify digest + DiffID, unpack, mkfs.erofs, fsync, catalog) | {pv_secs:.2} s ({pv_all}) | {:.1} | {:.0} MB layer disk |",
        mb(uncompressed) / pv_secs,
        mb(disk)
    );
}
