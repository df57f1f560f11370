//! Volumes in a pod VM (QEMU, the real guest kernel and agent): a plain
//! ext4 volume disk, an encrypted volume (dm-crypt in the guest, its key
//! sealed to a key pair the guest made, formatted from a format image),
//! an emptyDir in memory; sub-paths and read-only binds; suspending the
//! mappings and resuming them with a new key request; closing a volume
//! whose containers are running; and a second VM opening the same volume
//! (the data persists; a wrong key fails to mount and never formats).
//!
//! Prints the timings that go into docs/BENCHMARKS.md (`volumes:` lines).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use podvisor_podvm::PodVm;
use podvisor_podvm::image_boot::ImageBoot;
use podvisor_proto::volumes::{
    self, CIPHER, DATA_KEY_LEN, EncryptedVolume, FormatImage, ReleasedKey, ReleasedKeys,
    SECTOR_SIZE,
};
use podvisor_proto::{
    ContainerSpec, ExitStatus, GuestMessage, HostMessage, Mount, MountSource, MountTarget,
    ProcessSpec, StartError, VolumeOpened,
};
use podvisor_testbed::oci::ImageBuilder;
use podvisor_vmm::{BlockDevice, Device};

const SIZE: u64 = 128 << 20;
const CANARY: &str = "canary-7d1f0c3e-in-the-encrypted-volume";
const PLAIN_CANARY: &str = "canary-5a9e-in-the-plain-volume";

fn disk(id: &str, path: &Path, serial: &str, read_only: bool) -> Device {
    Device::Block(BlockDevice {
        id: id.into(),
        path: path.to_path_buf(),
        read_only,
        serial: serial.into(),
    })
}

fn shared(source: MountSource, fstype: &str, name: &str, options: &[&str]) -> Mount {
    Mount {
        source,
        fstype: fstype.into(),
        target: MountTarget::Shared { name: name.into() },
        options: options.iter().map(|o| o.to_string()).collect(),
        read_only: false,
    }
}

fn bind(source: MountSource, path: &str, read_only: bool) -> Mount {
    Mount {
        source,
        fstype: "bind".into(),
        target: MountTarget::Container { path: path.into() },
        options: vec![],
        read_only,
    }
}

fn of(name: &str) -> MountSource {
    MountSource::Shared { name: name.into() }
}

fn sub(name: &str, path: &str) -> MountSource {
    MountSource::SharedPath {
        name: name.into(),
        path: path.into(),
    }
}

/// The encrypted volume `data` as the shared mount `vol-data`.
fn encrypted_volume() -> Mount {
    shared(
        MountSource::Encrypted {
            volume: "data".into(),
        },
        "ext4",
        "vol-data",
        &["nosuid", "nodev"],
    )
}

fn container(id: &str, serials: &[String], mounts: Vec<Mount>, script: &str) -> ContainerSpec {
    let mut all = podvisor_proto::image_mounts(serials);
    // Shared mounts first: the binds refer to them.
    let (shared, inside): (Vec<_>, Vec<_>) = mounts
        .into_iter()
        .partition(|m| matches!(m.target, MountTarget::Shared { .. }));
    all.splice(0..0, shared);
    all.extend(inside);
    ContainerSpec {
        id: id.into(),
        hostname: "volumes".into(),
        mounts: all,
        process: ProcessSpec {
            args: vec!["sh".into(), "-c".into(), script.into()],
            env: vec![],
            cwd: "/".into(),
            user: String::new(),
            terminal: None,
            stdin: false,
        },
        runtime: None,
    }
}

/// Waits for the first event `pick` takes; other events are dropped.
async fn wait_for<T>(
    pod: &mut PodVm,
    what: &str,
    mut pick: impl FnMut(GuestMessage) -> Option<T>,
) -> T {
    tokio::time::timeout(Duration::from_secs(120), async {
        loop {
            if let Some(t) = pick(pod.next_event().await.expect("pod event")) {
                return t;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {what}: {}", pod.console_tail(4000)))
}

/// Runs a container to its end: stdout+stderr and status, or its
/// `StartFailed`.
async fn run(pod: &mut PodVm, spec: ContainerSpec) -> Result<(String, ExitStatus), StartError> {
    let id = spec.id.clone();
    pod.send(&HostMessage::StartContainer(spec)).await.unwrap();
    let mut out = String::new();
    wait_for(pod, &format!("end of {id}"), |m| match m {
        GuestMessage::Output { id: i, data, .. } if i == id => {
            out.push_str(&String::from_utf8_lossy(&data));
            None
        }
        GuestMessage::Exited { id: i, status } if i == id => Some(Ok(status)),
        GuestMessage::StartFailed { id: i, error } if i == id => Some(Err(error)),
        _ => None,
    })
    .await
    .map(|status| (out, status))
}

/// The key conversation: request, seal `key` (as the server would),
/// answer; returns the results and how long the agent took from the sealed
/// keys to its answer.
async fn open_volume(
    pod: &mut PodVm,
    context: &str,
    volume: EncryptedVolume,
    key: &[u8],
    format: bool,
) -> (Vec<VolumeOpened>, Duration) {
    let asked = Instant::now();
    pod.send(&HostMessage::RequestVolumeKeys {
        context: context.into(),
        volumes: vec![volume.clone()],
    })
    .await
    .unwrap();
    let public_key = wait_for(pod, "VolumeKeyRequest", |m| match m {
        GuestMessage::VolumeKeyRequest { public_key, error } => {
            assert_eq!(error, None);
            Some(public_key)
        }
        _ => None,
    })
    .await;
    assert_eq!(public_key.len(), volumes::PUBLIC_KEY_LEN);
    eprintln!(
        "volumes: RequestVolumeKeys -> VolumeKeyRequest ({context}) {:?}",
        asked.elapsed()
    );
    let keys = ReleasedKeys {
        keys: vec![ReleasedKey {
            volume: volume.name.clone(),
            key: key.to_vec(),
            cipher: CIPHER.into(),
            sector_size: SECTOR_SIZE,
            format,
        }],
    };
    let mut ikm = [0u8; 32];
    getrandom(&mut ikm);
    let sealed = volumes::seal(&public_key, context, &keys, &ikm).unwrap();
    assert!(!contains(&sealed, key));
    let sent = Instant::now();
    pod.send(&HostMessage::VolumeKeys { sealed }).await.unwrap();
    let results = wait_for(pod, "VolumesOpened", |m| match m {
        GuestMessage::VolumesOpened { results } => Some(results),
        _ => None,
    })
    .await;
    (results, sent.elapsed())
}

fn getrandom(buf: &mut [u8]) {
    use std::io::Read;
    std::fs::File::open("/dev/urandom")
        .unwrap()
        .read_exact(buf)
        .unwrap();
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

fn ok(results: &[VolumeOpened]) -> bool {
    results.len() == 1 && results[0].name == "data" && results[0].error.is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_encrypted_and_plain_volumes_open_mount_suspend_close_and_persist() {
    let dir = tempfile::tempdir().unwrap();
    let _vms = VmReaper(dir.path().to_path_buf());
    let archive = dir.path().join("img.tar");
    ImageBuilder::new()
        .busybox_layer()
        .write_oci_archive(&archive)
        .unwrap();
    let node = ImageBoot::prepare(dir.path(), &archive).unwrap();
    let serials = node.serials.clone();

    // The host's files: a plain volume, an encrypted volume's empty disk,
    // and the format image it is formatted from.
    let plain: PathBuf = dir.path().join("plain.img");
    podvisor_volume::format_ext4(&plain, SIZE).unwrap();
    let secret = dir.path().join("secret.img");
    podvisor_volume::create_sparse(&secret, SIZE).unwrap();
    let image = podvisor_volume::FormatImage::make(&dir.path().join("format"), SIZE).unwrap();
    eprintln!(
        "volumes: format image of {} MiB: {} extents, {} KiB to copy",
        SIZE >> 20,
        image.extents.len(),
        image.data_bytes() >> 10
    );
    let volume = EncryptedVolume {
        name: "data".into(),
        serial: "pvv0".into(),
        format_image: Some(FormatImage {
            serial: "pvf0".into(),
            size: image.size,
            extents: image.extents.clone(),
        }),
    };
    let mut key = vec![0u8; DATA_KEY_LEN];
    getrandom(&mut key);

    let boot = Instant::now();
    let mut pod = PodVm::boot(
        &node.cfg,
        node.spec(
            "volumes1",
            256,
            vec![
                disk("plain", &plain, "pvp0", false),
                disk("secret", &secret, "pvv0", false),
                disk("format", &image.path, "pvf0", true),
            ],
        ),
    )
    .await
    .unwrap();
    eprintln!("volumes: boot {:?}", boot.elapsed());

    // A container mounting the encrypted volume before its key came.
    let early = container("early", &serials, vec![encrypted_volume()], "true");
    let e = run(&mut pod, early).await.unwrap_err();
    assert!(
        e.message.contains("encrypted volume data is not open"),
        "{e:?}"
    );

    let (results, took) = open_volume(&mut pod, "ns/p/uid/i1", volume.clone(), &key, true).await;
    assert!(ok(&results), "{results:?}\n{}", pod.console_tail(3000));
    eprintln!("volumes: first open with format (VolumeKeys -> VolumesOpened) {took:?}");

    // Writer: the encrypted volume whole, a sub-path of it, read-only; the
    // plain volume; an emptyDir in memory, whole and by sub-path.
    let mounts = || {
        vec![
            encrypted_volume(),
            shared(
                MountSource::Disk {
                    serial: "pvp0".into(),
                },
                "ext4",
                "vol-plain",
                &["nosuid", "nodev"],
            ),
            shared(MountSource::Anonymous, "tmpfs", "vol-cache", &["size=16m"]),
            bind(of("vol-data"), "/data", false),
            bind(sub("vol-data", "app/sub"), "/sub", false),
            bind(of("vol-data"), "/ro", true),
            bind(of("vol-plain"), "/plain", false),
            bind(of("vol-cache"), "/cache", false),
            bind(sub("vol-cache", "x/y"), "/cachesub", false),
        ]
    };
    let script = format!(
        "set -e; echo {CANARY} > /data/canary; echo sub > /sub/f; \
         echo {PLAIN_CANARY} > /plain/canary; echo cached > /cachesub/f; \
         if (echo x > /ro/w) 2>/dev/null; then echo RO-WRITABLE; fi; \
         mkdir -p /data/etc; echo inside > /data/etc/marker; ln -s /etc /data/escape; \
         ln -s ../../../etc /data/up; sync; echo written"
    );
    let (out, status) = run(&mut pod, container("writer", &serials, mounts(), &script))
        .await
        .unwrap();
    assert_eq!((out.as_str(), status), ("written\n", ExitStatus::Code(0)));

    // Reader: a second container sees the data, the sub-paths inside
    // their volumes, the emptyDir's content; links planted in the volume
    // (`/etc`, `../../../etc`) stay inside it (CVE-2017-1002101).
    let mut m = mounts();
    m.push(bind(sub("vol-data", "escape"), "/esc", true));
    m.push(bind(sub("vol-data", "up"), "/up", true));
    let script = "cat /data/canary /data/app/sub/f /cache/x/y/f /plain/canary \
                  /esc/marker /up/marker; test -e /esc/passwd && echo ESCAPED; true";
    let (out, status) = run(&mut pod, container("reader", &serials, m, script))
        .await
        .unwrap();
    assert_eq!(status, ExitStatus::Code(0), "{out}");
    assert_eq!(
        out,
        format!("{CANARY}\nsub\ncached\n{PLAIN_CANARY}\ninside\ninside\n")
    );

    // Throughput inside the guest, encrypted vs plain, same VM (busybox's
    // dd prints no rate: timed with /proc/uptime).
    let dd = "up() { cut -d' ' -f1 /proc/uptime; }; for v in data plain; do \
                a=$(up); dd if=/dev/zero of=/$v/big bs=1M count=32 conv=fsync 2>/dev/null; \
                echo \"$v write $a $(up)\"; echo 3 > /proc/sys/vm/drop_caches 2>/dev/null; \
                a=$(up); dd if=/$v/big of=/dev/null bs=1M iflag=direct 2>/dev/null; \
                echo \"$v read $a $(up)\"; rm /$v/big; done; \
                grep -A1 'name *: xts(aes)' /proc/crypto | grep driver";
    let (out, _) = run(&mut pod, container("bench", &serials, mounts(), dd))
        .await
        .unwrap();
    for line in out.lines() {
        if line.starts_with("driver") {
            eprintln!("volumes: cipher {line}");
        }
        let f: Vec<&str> = line.split_whitespace().collect();
        if let [v, op, a, b] = f[..] {
            let secs = b.parse::<f64>().unwrap() - a.parse::<f64>().unwrap();
            let kind = if v == "data" { "encrypted" } else { "plain" };
            eprintln!(
                "volumes: dd 32 MiB {kind} {op}: {:.2} s, {:.1} MB/s",
                secs,
                32.0 * 1.048576 / secs.max(0.01)
            );
        }
    }

    // On the host: the plain volume holds its canary in the clear, the
    // encrypted one neither the canary nor the key.
    let raw_plain = std::fs::read(&plain).unwrap();
    assert!(contains(&raw_plain, PLAIN_CANARY.as_bytes()));
    let raw = std::fs::read(&secret).unwrap();
    assert!(!contains(&raw, CANARY.as_bytes()));
    assert!(!contains(&raw, &key[..16]));
    assert!(!contains(&raw, &key[32..48]));
    assert!(raw.iter().any(|b| *b != 0), "nothing was written");

    // Before a save: the mappings are suspended and their keys wiped; after
    // the wake, a new key request resumes the same mapping.
    pod.send(&HostMessage::SuspendVolumes).await.unwrap();
    let error = wait_for(&mut pod, "VolumesSuspended", |m| match m {
        GuestMessage::VolumesSuspended { error } => Some(error),
        _ => None,
    })
    .await;
    assert_eq!(error, None);
    let (results, took) = open_volume(&mut pod, "ns/p/uid/i2", volume.clone(), &key, false).await;
    assert!(ok(&results), "{results:?}\n{}", pod.console_tail(3000));
    eprintln!("volumes: resume after suspend (VolumeKeys -> VolumesOpened) {took:?}");
    let (out, _) = run(
        &mut pod,
        container("after-resume", &serials, mounts(), "cat /data/canary"),
    )
    .await
    .unwrap();
    assert_eq!(out, format!("{CANARY}\n"));

    // The key is revoked while a container uses the volume: it is stopped,
    // then the volume closed.
    let sleeper = container(
        "sleeper",
        &serials,
        vec![encrypted_volume(), bind(of("vol-data"), "/data", false)],
        "trap 'exit 0' TERM; echo up; while true; do sleep 1; done",
    );
    pod.send(&HostMessage::StartContainer(sleeper))
        .await
        .unwrap();
    wait_for(&mut pod, "sleeper output", |m| {
        matches!(m, GuestMessage::Output { ref id, .. } if id == "sleeper").then_some(())
    })
    .await;
    pod.send(&HostMessage::CloseVolume {
        name: "data".into(),
        grace_ms: 3000,
    })
    .await
    .unwrap();
    let mut exited = false;
    let closed = wait_for(&mut pod, "VolumeClosed", |m| match m {
        GuestMessage::Exited { id, .. } if id == "sleeper" => {
            exited = true;
            None
        }
        GuestMessage::VolumeClosed { name, error } => Some((name, error)),
        _ => None,
    })
    .await;
    assert!(exited, "VolumeClosed came before the sleeper's Exited");
    assert_eq!(closed, ("data".to_string(), None));
    let e = run(
        &mut pod,
        container("after-close", &serials, vec![encrypted_volume()], "true"),
    )
    .await
    .unwrap_err();
    assert!(e.message.contains("not open"), "{e:?}");
    pod.shutdown(Duration::from_secs(5)).await;

    // A second VM: the same volume, never to be formatted again. A wrong
    // key opens a mapping (dm-crypt cannot tell) whose ext4 does not mount.
    let mut pod = PodVm::boot(
        &node.cfg,
        node.spec(
            "volumes2",
            256,
            vec![disk("secret", &secret, "pvv0", false)],
        ),
    )
    .await
    .unwrap();
    let again = EncryptedVolume {
        format_image: None,
        ..volume.clone()
    };
    let mut wrong = key.clone();
    wrong[0] ^= 1;
    let (results, _) = open_volume(&mut pod, "ns/p/uid/i3", again.clone(), &wrong, false).await;
    assert!(ok(&results), "{results:?}\n{}", pod.console_tail(3000));
    let e = run(
        &mut pod,
        container("wrong-key", &serials, vec![encrypted_volume()], "true"),
    )
    .await
    .unwrap_err();
    assert!(e.message.contains("vol-data"), "{e:?}");
    // Asked to format without a format image: refused.
    let (results, _) = open_volume(&mut pod, "ns/p/uid/i4", again.clone(), &key, true).await;
    assert_eq!(
        results[0].error.as_deref(),
        Some("asked to format but no format image")
    );
    pod.send(&HostMessage::CloseVolume {
        name: "data".into(),
        grace_ms: 0,
    })
    .await
    .unwrap();
    let closed = wait_for(&mut pod, "VolumeClosed", |m| match m {
        GuestMessage::VolumeClosed { name, error } => Some((name, error)),
        _ => None,
    })
    .await;
    assert_eq!(closed, ("data".to_string(), None));
    let (results, took) = open_volume(&mut pod, "ns/p/uid/i5", again, &key, false).await;
    assert!(ok(&results), "{results:?}\n{}", pod.console_tail(3000));
    eprintln!("volumes: open of an existing volume (VolumeKeys -> VolumesOpened) {took:?}");
    let (out, status) = run(
        &mut pod,
        container(
            "second-vm",
            &serials,
            vec![encrypted_volume(), bind(of("vol-data"), "/data", true)],
            "cat /data/canary",
        ),
    )
    .await
    .unwrap();
    assert_eq!(
        (out.as_str(), status),
        (format!("{CANARY}\n").as_str(), ExitStatus::Code(0))
    );
    pod.shutdown(Duration::from_secs(5)).await;
}

struct VmReaper(PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        podvisor_testbed::daemon::kill_mentioning(&self.0.display().to_string());
    }
}
