//! Exec and container restarts inside one real pod VM (QEMU, the real guest
//! kernel and agent): an exec joins the running container (its files, PID
//! namespace, hostname, user and working directory), works with a terminal
//! and stdin, dies with the container, and a container started again under
//! the same id gets a fresh writable layer. In between, the VM is detached
//! and adopted by a new handle, as a restarted host daemon adopts it. A
//! second VM shows the mounts a container spec lists inside the container.

use std::time::Duration;

use podvisor_image::LayerCache;
use podvisor_podvm::{NodeConfig, PodVm, PodVmSpec, layer_disks};
use podvisor_proto::{
    ContainerSpec, ExecSpec, ExitStatus, GuestMessage, HostMessage, ProcessSpec, TerminalSize,
};
use podvisor_testbed::oci::ImageBuilder;

/// Everything one process reported until it ended.
#[derive(Debug, Default)]
struct Ended {
    stdout: String,
    stderr: String,
    status: Option<ExitStatus>,
}

/// Collects messages until process `id` has exited; other processes'
/// messages are kept in `others`.
async fn until_exit(pod: &mut PodVm, id: &str, others: &mut Vec<GuestMessage>) -> Ended {
    let mut ended = Ended::default();
    let deadline = Duration::from_secs(60);
    tokio::time::timeout(deadline, async {
        loop {
            match pod.next_event().await.expect("pod event") {
                GuestMessage::Output {
                    id: i,
                    stream,
                    data,
                } if i == id => {
                    let s = String::from_utf8_lossy(&data).into_owned();
                    match stream {
                        podvisor_proto::Stream::Stdout => ended.stdout.push_str(&s),
                        podvisor_proto::Stream::Stderr => ended.stderr.push_str(&s),
                    }
                }
                GuestMessage::Exited { id: i, status } if i == id => {
                    ended.status = Some(status);
                    return;
                }
                GuestMessage::StartFailed { id: i, error } if i == id => {
                    panic!("{id} failed to start: {error:?}")
                }
                other => others.push(other),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{id} did not exit within {deadline:?}"));
    ended
}

async fn until_started(pod: &mut PodVm, id: &str) {
    loop {
        match pod.next_event().await.expect("pod event") {
            GuestMessage::Started { id: i, .. } if i == id => return,
            GuestMessage::StartFailed { id: i, error } if i == id => {
                panic!("{id} failed to start: {error:?}")
            }
            _ => {}
        }
    }
}

fn process(args: &[&str]) -> ProcessSpec {
    ProcessSpec {
        args: args.iter().map(|s| s.to_string()).collect(),
        env: vec!["MODE=test".into()],
        cwd: "/srv/app".into(),
        user: "app".into(),
        terminal: None,
        stdin: false,
    }
}

fn exec(id: &str, args: &[&str]) -> HostMessage {
    HostMessage::Exec(ExecSpec {
        id: id.into(),
        container: "web".into(),
        process: process(args),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_exec_adoption_and_a_restart_on_a_fresh_upper() {
    let dir = tempfile::tempdir().unwrap();
    // VMs outlive their handles here: never leave one behind a failed test.
    let _vms = VmReaper(dir.path().to_path_buf());
    let mut cfg = NodeConfig::with_defaults(podvisor_vmm::AccelChoice::resolve(None).accel);
    cfg.cache_dir = dir.path().join("cache");
    cfg.run_dir = dir.path().join("run");
    let archive = dir.path().join("img.tar");
    ImageBuilder::new()
        .busybox_layer()
        .user("app")
        .write_oci_archive(&archive)
        .unwrap();
    let cache = LayerCache::open(&cfg.cache_dir).unwrap();
    let image = podvisor_image::import(&cache, &archive, None).unwrap();
    let mut layers = podvisor_image::LayerAttachments::default();
    let serials = layers.add_image(&image);
    let guest = podvisor_guest::prepare(&podvisor_guest::GuestOptions {
        kernel: None,
        agent: None,
        extra_modules: vec![],
        cache_dir: cfg.cache_dir.clone(),
    })
    .unwrap();
    let mut pod = PodVm::boot(
        &cfg,
        PodVmSpec {
            id: "exectest".into(),
            cpus: 1,
            memory_mib: 192,
            guest,
            devices: layer_disks(&layers)
                .into_iter()
                .map(podvisor_vmm::Device::Block)
                .collect(),
            pci: Default::default(),
            netns: None,
            memory: podvisor_vmm::MemoryBacking::Anonymous,
            memory_merge: false,
            die_with_parent: false,
        },
    )
    .await
    .unwrap();
    let container = ContainerSpec {
        id: "web".into(),
        hostname: "mypod".into(),
        mounts: podvisor_proto::image_mounts(&serials),
        process: process(&[
            "sh",
            "-c",
            "if [ -e /tmp/marker ]; then echo stale; else echo fresh; fi; \
             echo data > /tmp/m.new && mv /tmp/m.new /tmp/marker; exec sleep 1000",
        ]),
        runtime: None,
    };
    let mut others = Vec::new();
    pod.send(&HostMessage::StartContainer(container.clone()))
        .await
        .unwrap();
    until_started(&mut pod, "web").await;

    // The exec sees the container's files, its main process as PID 2 of the
    // container's PID namespace, its hostname, user, working directory and
    // environment. (Retried until the container has written its marker and
    // exec'd sleep: between the two its PID 2 is still `sh`.)
    let mut seen = String::new();
    for attempt in 0..20 {
        let id = format!("exec.{attempt}");
        pod.send(&exec(
            &id,
            &[
                "sh",
                "-c",
                "grep -qx sleep /proc/2/comm && cat /tmp/marker && cat /proc/2/comm && hostname \
                 && id -u && pwd && echo $MODE",
            ],
        ))
        .await
        .unwrap();
        let out = until_exit(&mut pod, &id, &mut others).await;
        seen = out.stdout;
        if out.status == Some(ExitStatus::Code(0)) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(seen, "data\nsleep\nmypod\n1000\n/srv/app\ntest\n");

    // With a terminal and stdin: an interactive shell.
    let mut tty = process(&["sh"]);
    tty.terminal = Some(TerminalSize {
        rows: 30,
        cols: 100,
    });
    tty.stdin = true;
    pod.send(&HostMessage::Exec(ExecSpec {
        id: "exec.tty".into(),
        container: "web".into(),
        process: tty,
    }))
    .await
    .unwrap();
    pod.send(&HostMessage::Stdin {
        id: "exec.tty".into(),
        data: b"tty; stty size; exit 7\n".to_vec(),
    })
    .await
    .unwrap();
    let out = until_exit(&mut pod, "exec.tty", &mut others).await;
    assert_eq!(out.status, Some(ExitStatus::Code(7)), "{out:?}");
    assert!(out.stdout.contains("/dev/pts/"), "{out:?}");
    assert!(out.stdout.contains("30 100"), "{out:?}");

    // A missing program is a start failure, as for containers.
    pod.send(&exec("exec.missing", &["no-such-program"]))
        .await
        .unwrap();
    loop {
        match pod.next_event().await.unwrap() {
            GuestMessage::StartFailed { id, error } if id == "exec.missing" => {
                assert_eq!(error.kind, podvisor_proto::StartErrorKind::NotFound);
                break;
            }
            other => others.push(other),
        }
    }

    // Another PodVm takes the VM over, as a restarted host daemon does: the
    // container is still running and listed.
    let record = pod.vmm_process().unwrap();
    let pid = pod.vmm_pid();
    // Under TCG, QEMU runs without transparent huge pages.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let thp = status.lines().find(|l| l.starts_with("THP_enabled:"));
    if cfg.accel == podvisor_vmm::Accel::Tcg {
        assert_eq!(
            thp.map(|l| l.split_whitespace().nth(1)),
            Some(Some("0")),
            "{status}"
        );
    } else {
        assert_eq!(
            thp.map(|l| l.split_whitespace().nth(1)),
            Some(Some("1")),
            "{status}"
        );
    }
    pod.detach();
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the VM survives its handle"
    );
    let mut pod = PodVm::adopt(&cfg, "exectest", &record).await.unwrap();
    assert_eq!(pod.vmm_pid(), pid);
    let listed = loop {
        match pod.next_event().await.unwrap() {
            GuestMessage::Processes { processes } => break processes,
            other => others.push(other),
        }
    };
    assert_eq!(
        listed,
        [podvisor_proto::ProcessInfo {
            id: "web".into(),
            exec_in: None
        }]
    );

    // An exec still running when the container stops ends with it.
    pod.send(&exec("exec.long", &["sleep", "1000"]))
        .await
        .unwrap();
    until_started(&mut pod, "exec.long").await;
    pod.send(&HostMessage::Stop {
        id: "web".into(),
        grace_ms: 1000,
    })
    .await
    .unwrap();
    // The two exits may come in either order.
    let long = until_exit(&mut pod, "exec.long", &mut others).await;
    assert!(
        matches!(long.status, Some(ExitStatus::Signaled { signal: 9, .. })),
        "{long:?}"
    );
    let web_exited = others
        .iter()
        .any(|m| matches!(m, GuestMessage::Exited { id, .. } if id == "web"));
    let first = if web_exited {
        Ended::default()
    } else {
        until_exit(&mut pod, "web", &mut others).await
    };
    let earlier: String = others
        .iter()
        .filter_map(|m| match m {
            GuestMessage::Output { id, data, .. } if id == "web" => {
                Some(String::from_utf8_lossy(data).into_owned())
            }
            _ => None,
        })
        .collect();
    assert_eq!(earlier + &first.stdout, "fresh\n");

    // The same container id starts again on a fresh writable layer.
    pod.send(&HostMessage::StartContainer(container))
        .await
        .unwrap();
    until_started(&mut pod, "web").await;
    // Its first line, then stop it.
    let mut second = String::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while !second.contains('\n') {
            if let GuestMessage::Output { id, data, .. } =
                pod.next_event().await.expect("pod event")
                && id == "web"
            {
                second.push_str(&String::from_utf8_lossy(&data));
            }
        }
    })
    .await
    .expect("the restarted container's first line");
    pod.send(&HostMessage::Stop {
        id: "web".into(),
        grace_ms: 0,
    })
    .await
    .unwrap();
    second += &until_exit(&mut pod, "web", &mut Vec::new()).await.stdout;
    assert_eq!(second, "fresh\n");
    pod.shutdown(Duration::ZERO).await;
}

/// Kills, when dropped, every process whose command line names the test's
/// directory (the test's VMs, which outlive their handles by design).
struct VmReaper(std::path::PathBuf);

impl Drop for VmReaper {
    fn drop(&mut self) {
        podvisor_testbed::daemon::kill_mentioning(&self.0.display().to_string());
    }
}

/// A container's mounts as the real agent makes them: a tmpfs inside the
/// container (seen by an exec too), a bind of a layer, a shared tmpfs bound
/// twice (writable and read-only), and mounts it refuses or cannot make,
/// each a clear `StartFailed`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_mounts_inside_the_container_and_refused_mounts() {
    use podvisor_proto::{Mount, MountSource, MountTarget, StartErrorKind};

    let dir = tempfile::tempdir().unwrap();
    let _vms = VmReaper(dir.path().to_path_buf());
    let mut cfg = NodeConfig::with_defaults(podvisor_vmm::AccelChoice::resolve(None).accel);
    cfg.cache_dir = dir.path().join("cache");
    cfg.run_dir = dir.path().join("run");
    let archive = dir.path().join("img.tar");
    ImageBuilder::new()
        .busybox_layer()
        .user("app")
        .write_oci_archive(&archive)
        .unwrap();
    let cache = LayerCache::open(&cfg.cache_dir).unwrap();
    let image = podvisor_image::import(&cache, &archive, None).unwrap();
    let mut layers = podvisor_image::LayerAttachments::default();
    let serials = layers.add_image(&image);
    let guest = podvisor_guest::prepare(&podvisor_guest::GuestOptions {
        kernel: None,
        agent: None,
        extra_modules: vec![],
        cache_dir: cfg.cache_dir.clone(),
    })
    .unwrap();
    let mut pod = PodVm::boot(
        &cfg,
        PodVmSpec {
            id: "mounttest".into(),
            cpus: 1,
            memory_mib: 192,
            guest,
            devices: layer_disks(&layers)
                .into_iter()
                .map(podvisor_vmm::Device::Block)
                .collect(),
            pci: Default::default(),
            netns: None,
            memory: podvisor_vmm::MemoryBacking::Anonymous,
            memory_merge: false,
            die_with_parent: false,
        },
    )
    .await
    .unwrap();
    let tmpfs = Mount {
        source: MountSource::Anonymous,
        fstype: "tmpfs".into(),
        target: MountTarget::Container {
            path: "/scratch".into(),
        },
        options: vec!["size=1m".into(), "mode=1777".into(), "nosuid".into()],
        read_only: false,
    };
    let base = Mount {
        source: MountSource::Shared {
            name: "pvl0".into(),
        },
        fstype: "bind".into(),
        target: MountTarget::Container {
            path: "/srv/base".into(),
        },
        options: vec![],
        read_only: true,
    };
    let shared = Mount {
        target: MountTarget::Shared {
            name: "pod-scratch".into(),
        },
        options: vec![],
        ..tmpfs.clone()
    };
    let bind = |path: &str, read_only| Mount {
        source: MountSource::Shared {
            name: "pod-scratch".into(),
        },
        target: MountTarget::Container { path: path.into() },
        read_only,
        ..base.clone()
    };
    let spec = |id: &str, more: Vec<Mount>, args: &[&str]| {
        let mut mounts = podvisor_proto::image_mounts(&serials);
        mounts.extend(more);
        ContainerSpec {
            id: id.into(),
            hostname: "mypod".into(),
            mounts,
            process: ProcessSpec {
                cwd: "/".into(),
                user: String::new(),
                ..process(args)
            },
            runtime: None,
        }
    };
    pod.send(&HostMessage::StartContainer(spec(
        "m",
        vec![
            tmpfs.clone(),
            base.clone(),
            shared,
            bind("/srv/rw", false),
            bind("/srv/ro", true),
        ],
        &[
            "sh",
            "-c",
            "echo kept > /scratch/f && cat /scratch/f; \
             grep ' /scratch ' /proc/mounts | cut -d' ' -f3,4; \
             test -x /srv/base/bin/busybox && echo base; \
             echo shared > /srv/rw/g && cat /srv/ro/g; \
             touch /srv/ro/x 2>/dev/null || echo read-only; \
             exec sleep 1000",
        ],
    )))
    .await
    .unwrap();
    until_started(&mut pod, "m").await;
    let mut out = String::new();
    tokio::time::timeout(Duration::from_secs(60), async {
        while out.matches('\n').count() < 5 {
            if let GuestMessage::Output { id, data, .. } =
                pod.next_event().await.expect("pod event")
                && id == "m"
            {
                out.push_str(&String::from_utf8_lossy(&data));
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the container's five lines; got {out:?}"));
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], "kept");
    assert!(
        lines[1].starts_with("tmpfs rw,nosuid,") && lines[1].contains("size=1024k"),
        "{out}"
    );
    assert_eq!(lines[2..], ["base", "shared", "read-only"], "{out}");

    // An exec joins the container's mount namespace: it sees the tmpfs.
    pod.send(&HostMessage::Exec(ExecSpec {
        id: "exec.cat".into(),
        container: "m".into(),
        process: ProcessSpec {
            cwd: "/".into(),
            ..process(&["cat", "/scratch/f"])
        },
    }))
    .await
    .unwrap();
    let cat = until_exit(&mut pod, "exec.cat", &mut Vec::new()).await;
    assert_eq!(cat.stdout, "kept\n");

    // Refused before anything is mounted, or not makeable: each named.
    let outside = Mount {
        target: MountTarget::Container {
            path: "/srv/../../etc".into(),
        },
        ..tmpfs.clone()
    };
    let xfs = Mount {
        fstype: "xfs".into(),
        ..tmpfs.clone()
    };
    let missing_disk = Mount {
        target: MountTarget::Shared {
            name: "pvl7".into(),
        },
        ..Mount::layer("pvl7")
    };
    for (id, more, kind, message) in [
        (
            "outside",
            vec![outside],
            StartErrorKind::InvalidSpec,
            "the mount on \"/srv/../../etc\": the target has a `.` or `..` component",
        ),
        (
            "xfs",
            vec![xfs],
            StartErrorKind::InvalidSpec,
            "the mount on \"/scratch\": unknown mount type \"xfs\"",
        ),
        (
            "nodisk",
            vec![missing_disk],
            StartErrorKind::Mount,
            "shared mount \"pvl7\": disk with serial \"pvl7\" not found in /sys/block after",
        ),
    ] {
        pod.send(&HostMessage::StartContainer(spec(id, more, &["true"])))
            .await
            .unwrap();
        let error = tokio::time::timeout(Duration::from_secs(60), async {
            loop {
                match pod.next_event().await.expect("pod event") {
                    GuestMessage::StartFailed { id: i, error } if i == id => break error,
                    GuestMessage::Started { id: i, .. } if i == id => {
                        panic!("{id} started")
                    }
                    _ => {}
                }
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{id}: no StartFailed"));
        assert_eq!(error.kind, kind, "{id}: {}", error.message);
        assert!(
            error.message.starts_with(message),
            "{id}: {}",
            error.message
        );
    }
    // The container that runs is not disturbed by the refusals.
    pod.send(&HostMessage::ListProcesses).await.unwrap();
    let listed = loop {
        if let GuestMessage::Processes { processes } = pod.next_event().await.unwrap() {
            break processes;
        }
    };
    assert_eq!(
        listed,
        [podvisor_proto::ProcessInfo {
            id: "m".into(),
            exec_in: None
        }]
    );
    pod.shutdown(Duration::ZERO).await;
}
