//! Tests of the state machine with a fake launcher whose "processes" are
//! plain pipes the test writes to and closes.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use nix::sys::wait::WaitStatus;
use nix::unistd::Pid;
use podvisor_proto::{
    AppliedProfile, CloneIdentity, ContainerSpec, DnsConfig, ExecSpec, ExitStatus, GuestMessage,
    HostMessage, InterfaceConfig, Mount, MountSource, MountTarget, NetworkConfig, ProcessSpec,
    RuntimeSizing, StartError, StartErrorKind, Stream, image_mounts,
};

use super::*;
use crate::launcher::Launcher;
use crate::process::Launched;

/// The test's ends of a fake process's stdio.
struct FakeProcess {
    stdin: Option<OwnedFd>,
    stdout: Option<OwnedFd>,
    stderr: Option<OwnedFd>,
}

#[derive(Default)]
struct FakeLauncher {
    next_pid: i32,
    procs: HashMap<String, FakeProcess>,
    signals: Vec<(i32, i32)>,
    cleaned: Vec<String>,
    /// (exec id, init pid of the container it entered).
    execs: Vec<(String, i32)>,
    /// Identities applied, with the container pids they were given.
    identities: Vec<(CloneIdentity, Vec<i32>)>,
    /// What `apply_identity` reports as failed.
    identity_errors: Vec<String>,
    /// Mount lists `mount_shared` was asked for.
    mounted: Vec<Vec<Mount>>,
    /// Network configurations applied.
    networks: Vec<NetworkConfig>,
    /// Volume calls, in order (`request <context>`, `keys <n>`,
    /// `suspend`, `close <volume>`).
    volume_calls: Vec<String>,
}

fn nonblocking_pipe() -> (OwnedFd, OwnedFd) {
    let (r, w) =
        nix::unistd::pipe2(nix::fcntl::OFlag::O_NONBLOCK | nix::fcntl::OFlag::O_CLOEXEC).unwrap();
    (r, w)
}

impl FakeLauncher {
    fn launch(&mut self, id: &str, process: &ProcessSpec) -> Result<Launched, StartError> {
        if process.args[0] == "missing" {
            return Err(StartError {
                kind: StartErrorKind::NotFound,
                message: "executable file not found in $PATH: missing".into(),
            });
        }
        self.next_pid += 100;
        let (out_r, out_w) = nonblocking_pipe();
        let (err_r, err_w) = nonblocking_pipe();
        let (in_r, in_w) = nonblocking_pipe();
        self.procs.insert(
            id.to_string(),
            FakeProcess {
                stdin: Some(in_r),
                stdout: Some(out_w),
                stderr: Some(err_w),
            },
        );
        Ok(Launched {
            pid: self.next_pid,
            stdin: process.stdin.then_some(in_w),
            stdout: out_r,
            stderr: Some(err_r),
            terminal: false,
            status: None,
            profile: None,
        })
    }
}

impl Launcher for FakeLauncher {
    fn start(&mut self, spec: &ContainerSpec) -> Result<Launched, StartError> {
        let mut launched = self.launch(&spec.id, &spec.process)?;
        // As the real launcher does for a runtime it recognises.
        launched.profile = spec.runtime.as_ref().map(|_| fake_profile());
        Ok(launched)
    }

    fn exec(&mut self, spec: &ExecSpec, init_pid: i32) -> Result<Launched, StartError> {
        self.execs.push((spec.id.clone(), init_pid));
        self.launch(&spec.id, &spec.process)
    }

    fn signal(&mut self, pid: i32, signal: i32) -> Result<(), Errno> {
        self.signals.push((pid, signal));
        Ok(())
    }

    fn cleanup(&mut self, id: &str) {
        self.cleaned.push(id.to_string());
    }

    fn apply_identity(&mut self, identity: &CloneIdentity, pids: &[i32]) -> Vec<String> {
        self.identities.push((identity.clone(), pids.to_vec()));
        self.identity_errors.clone()
    }

    fn configure_network(&mut self, config: &NetworkConfig) -> crate::network::Outcome {
        self.networks.push(config.clone());
        // The real thing, against a fake kernel without the NIC.
        let mut kernel = crate::netlink::FakeRtnetlink::default();
        kernel.links.push(crate::netlink::Link {
            index: 1,
            name: "lo".into(),
            mac: None,
            up: false,
            loopback: true,
        });
        let dir = tempfile::tempdir().unwrap();
        crate::network::configure(&mut kernel, config, dir.path(), Duration::ZERO)
    }

    fn request_volume_keys(
        &mut self,
        context: &str,
        _volumes: &[podvisor_proto::volumes::EncryptedVolume],
    ) -> Result<Vec<u8>, String> {
        self.volume_calls.push(format!("request {context}"));
        if context.is_empty() {
            return Err("bad context".into());
        }
        Ok(vec![1; 32])
    }

    fn volume_keys(&mut self, sealed: &[u8]) -> Vec<podvisor_proto::VolumeOpened> {
        self.volume_calls.push(format!("keys {}", sealed.len()));
        vec![podvisor_proto::VolumeOpened {
            name: "data".into(),
            error: None,
        }]
    }

    fn suspend_volumes(&mut self) -> Option<String> {
        self.volume_calls.push("suspend".into());
        None
    }

    fn close_volume(&mut self, volume: &str) -> Option<String> {
        self.volume_calls.push(format!("close {volume}"));
        None
    }

    fn read_shared_file(
        &mut self,
        name: &str,
        path: &str,
        offset: u64,
    ) -> Result<(Vec<u8>, bool), String> {
        match (name, path) {
            ("train", "app.jsa") => Ok((
                b"archive".get(offset as usize..).unwrap_or(&[]).to_vec(),
                true,
            )),
            _ => Err(format!("no {path} in {name}")),
        }
    }

    fn mount_shared(&mut self, mounts: &[Mount]) -> Result<(), StartError> {
        self.mounted.push(mounts.to_vec());
        match mounts.iter().find(|m| m.shared_name() == Some("pvl9")) {
            Some(_) => Err(StartError {
                kind: StartErrorKind::Mount,
                message: "layer disk with serial \"pvl9\" not found".into(),
            }),
            None => Ok(()),
        }
    }
}

fn fake_profile() -> AppliedProfile {
    AppliedProfile {
        runtime: "Go go1.19.8".into(),
        env: vec![("GOMAXPROCS".into(), "1".into())],
        reasons: vec!["GOMAXPROCS=1: the share's CPUs".into()],
    }
}

fn spec(id: &str, args: &[&str], stdin: bool) -> ContainerSpec {
    ContainerSpec {
        id: id.into(),
        hostname: id.into(),
        mounts: image_mounts(&["pvl0".into()]),
        process: ProcessSpec {
            args: args.iter().map(|s| s.to_string()).collect(),
            env: vec![],
            cwd: "/".into(),
            user: String::new(),
            terminal: None,
            stdin,
        },
        runtime: None,
    }
}

/// Lets the agent read every ready output, as the event loop would.
fn pump(agent: &mut Agent<FakeLauncher>) {
    for _ in 0..4 {
        for (_, _, watch) in agent.watches(true) {
            agent.ready(&watch);
        }
    }
}

fn outbox(agent: &mut Agent<FakeLauncher>) -> Vec<GuestMessage> {
    agent.take_outbox().collect()
}

fn exited(pid: i32, code: i32) -> WaitStatus {
    WaitStatus::Exited(Pid::from_raw(pid), code)
}

#[test]
fn a_sized_container_reports_its_profile_just_before_started() {
    let now = Instant::now();
    let mut agent = Agent::new(FakeLauncher::default());
    let mut sized = spec("c1", &["/app/server"], false);
    sized.runtime = Some(RuntimeSizing {
        memory_share_ppm: 1_000_000,
        cpus: Some(1),
        loaded_classes: None,
        peak_threads: None,
        jvm_archive: None,
    });
    agent.handle(HostMessage::StartContainer(sized), now);
    assert_eq!(
        outbox(&mut agent),
        [
            GuestMessage::ProfileApplied {
                id: "c1".into(),
                profile: fake_profile(),
            },
            GuestMessage::Started {
                id: "c1".into(),
                pid: 100
            }
        ]
    );
    // An exec in it gets none.
    agent.handle(
        HostMessage::Exec(ExecSpec {
            id: "e1".into(),
            container: "c1".into(),
            process: spec("e1", &["/app/server"], false).process,
        }),
        now,
    );
    assert!(matches!(
        outbox(&mut agent)[..],
        [GuestMessage::Started { .. }]
    ));
}

#[test]
fn output_then_exit_in_order_and_cleanup() {
    let now = Instant::now();
    let mut agent = Agent::new(FakeLauncher::default());
    agent.handle(
        HostMessage::StartContainer(spec("c1", &["echo"], false)),
        now,
    );
    assert_eq!(
        outbox(&mut agent),
        [GuestMessage::Started {
            id: "c1".into(),
            pid: 100
        }]
    );

    let p = agent.launcher.procs.get_mut("c1").unwrap();
    nix::unistd::write(p.stdout.as_ref().unwrap(), b"hello\n").unwrap();
    nix::unistd::write(p.stderr.as_ref().unwrap(), b"oops\n").unwrap();
    // The process exits before its output has been read.
    agent.reaped(exited(100, 3));
    pump(&mut agent);
    assert_eq!(
        outbox(&mut agent),
        [
            GuestMessage::Output {
                id: "c1".into(),
                stream: Stream::Stdout,
                data: b"hello\n".to_vec()
            },
            GuestMessage::Output {
                id: "c1".into(),
                stream: Stream::Stderr,
                data: b"oops\n".to_vec()
            },
        ]
    );
    // Exited only once both pipes are at end of file.
    let p = agent.launcher.procs.get_mut("c1").unwrap();
    p.stdout = None;
    pump(&mut agent);
    assert!(outbox(&mut agent).is_empty());
    agent.launcher.procs.get_mut("c1").unwrap().stderr = None;
    pump(&mut agent);
    assert_eq!(
        outbox(&mut agent),
        [GuestMessage::Exited {
            id: "c1".into(),
            status: ExitStatus::Code(3)
        }]
    );
    assert_eq!(agent.launcher.cleaned, ["c1"]);
    // The id can be used again.
    agent.handle(
        HostMessage::StartContainer(spec("c1", &["echo"], false)),
        now,
    );
    assert!(matches!(
        outbox(&mut agent)[..],
        [GuestMessage::Started { .. }]
    ));
}

#[test]
fn start_failures_and_duplicates_are_reported() {
    let now = Instant::now();
    let mut agent = Agent::new(FakeLauncher::default());
    agent.handle(
        HostMessage::StartContainer(spec("c1", &["missing"], false)),
        now,
    );
    agent.handle(HostMessage::StartContainer(spec("c2", &["sh"], false)), now);
    agent.handle(HostMessage::StartContainer(spec("c2", &["sh"], false)), now);
    let out = outbox(&mut agent);
    assert!(
        matches!(&out[0], GuestMessage::StartFailed { id, error } if id == "c1" && error.kind == StartErrorKind::NotFound)
    );
    assert!(matches!(&out[1], GuestMessage::Started { id, .. } if id == "c2"));
    assert!(
        matches!(&out[2], GuestMessage::StartFailed { error, .. } if error.kind == StartErrorKind::InvalidSpec && error.message.contains("already exists"))
    );
}

#[test]
fn stdin_is_written_and_closed_after_flush() {
    let now = Instant::now();
    let mut agent = Agent::new(FakeLauncher::default());
    agent.handle(HostMessage::StartContainer(spec("c1", &["cat"], true)), now);
    agent.handle(
        HostMessage::Stdin {
            id: "c1".into(),
            data: b"abc".to_vec(),
        },
        now,
    );
    agent.handle(HostMessage::CloseStdin { id: "c1".into() }, now);
    let p = agent.launcher.procs.get("c1").unwrap();
    let mut buf = [0u8; 16];
    let r = p.stdin.as_ref().unwrap();
    assert_eq!(nix::unistd::read(r, &mut buf).unwrap(), 3);
    assert_eq!(&buf[..3], b"abc");
    assert_eq!(nix::unistd::read(r, &mut buf).unwrap(), 0, "stdin closed");
    // More stdin after close, and stdin for a process without it, are errors.
    agent.handle(
        HostMessage::Stdin {
            id: "c1".into(),
            data: b"x".to_vec(),
        },
        now,
    );
    agent.handle(HostMessage::StartContainer(spec("c2", &["sh"], false)), now);
    agent.handle(
        HostMessage::Stdin {
            id: "c2".into(),
            data: b"x".to_vec(),
        },
        now,
    );
    let errors = outbox(&mut agent)
        .into_iter()
        .filter(|m| matches!(m, GuestMessage::Error { .. }))
        .count();
    assert_eq!(errors, 2);
}

#[test]
fn stdin_that_does_not_fit_waits_for_pollout() {
    let now = Instant::now();
    let mut agent = Agent::new(FakeLauncher::default());
    agent.handle(HostMessage::StartContainer(spec("c1", &["cat"], true)), now);
    let big = vec![b'x'; 200_000];
    agent.handle(
        HostMessage::Stdin {
            id: "c1".into(),
            data: big,
        },
        now,
    );
    let watches = agent.watches(false);
    assert!(matches!(&watches[..], [(_, f, Watch::Stdin { .. })] if *f == PollFlags::POLLOUT));
    let r = agent
        .launcher
        .procs
        .get("c1")
        .unwrap()
        .stdin
        .as_ref()
        .unwrap()
        .as_raw_fd();
    let mut total = 0;
    let mut buf = vec![0u8; 65536];
    while total < 200_000 {
        // SAFETY: `r` is the fake process's end of its stdin pipe, which
        // the launcher (owned by `agent`) keeps open for the whole loop.
        match nix::unistd::read(unsafe { std::os::fd::BorrowedFd::borrow_raw(r) }, &mut buf) {
            Ok(n) => total += n,
            Err(Errno::EAGAIN) => agent.ready(&Watch::Stdin { id: "c1".into() }),
            Err(e) => panic!("{e}"),
        }
    }
    assert!(agent.watches(false).is_empty());
}

#[test]
fn stop_sends_term_then_kill_after_grace() {
    let now = Instant::now();
    let mut agent = Agent::new(FakeLauncher::default());
    agent.handle(
        HostMessage::StartContainer(spec("c1", &["sleep"], false)),
        now,
    );
    agent.handle(
        HostMessage::Stop {
            id: "c1".into(),
            grace_ms: 1000,
        },
        now,
    );
    assert_eq!(agent.launcher.signals, [(100, libc::SIGTERM)]);
    assert_eq!(agent.next_deadline(), Some(now + Duration::from_secs(1)));
    agent.tick(now + Duration::from_millis(999));
    assert_eq!(agent.launcher.signals.len(), 1);
    agent.tick(now + Duration::from_secs(1));
    assert_eq!(
        agent.launcher.signals,
        [(100, libc::SIGTERM), (100, libc::SIGKILL)]
    );
    assert_eq!(agent.next_deadline(), None);
    agent.handle(
        HostMessage::Signal {
            id: "c1".into(),
            signal: 10,
        },
        now,
    );
    assert_eq!(agent.launcher.signals.last(), Some(&(100, 10)));
    agent.handle(
        HostMessage::Stop {
            id: "nope".into(),
            grace_ms: 0,
        },
        now,
    );
    assert!(matches!(
        outbox(&mut agent).last(),
        Some(GuestMessage::Error { .. })
    ));
}

#[test]
fn shutdown_stops_everything_and_powers_off_once_reported() {
    let now = Instant::now();
    let mut agent = Agent::new(FakeLauncher::default());
    agent.handle(
        HostMessage::StartContainer(spec("a", &["sleep"], false)),
        now,
    );
    agent.handle(
        HostMessage::StartContainer(spec("b", &["sleep"], false)),
        now,
    );
    outbox(&mut agent);
    assert!(!agent.power_off_due(now, true));
    agent.handle(HostMessage::Shutdown { grace_ms: 0 }, now);
    let mut sigs = agent.launcher.signals.clone();
    sigs.sort();
    assert_eq!(sigs, [(100, 9), (100, 15), (200, 9), (200, 15)]);
    assert!(!agent.power_off_due(now, true));
    agent.handle(
        HostMessage::StartContainer(spec("c", &["sleep"], false)),
        now,
    );
    agent.launcher.procs.clear(); // all pipes close
    agent.reaped(WaitStatus::Signaled(
        Pid::from_raw(100),
        nix::sys::signal::Signal::SIGKILL,
        false,
    ));
    agent.reaped(exited(200, 0));
    agent.reaped(exited(4242, 0)); // an orphan: ignored
    pump(&mut agent);
    assert!(!agent.power_off_due(now, true), "reports not taken yet");
    let out = outbox(&mut agent);
    assert!(matches!(&out[0], GuestMessage::StartFailed { id, .. } if id == "c"));
    assert!(out.contains(&GuestMessage::Exited {
        id: "a".into(),
        status: ExitStatus::Signaled {
            signal: 9,
            core_dumped: false
        }
    }));
    assert!(!agent.power_off_due(now, false), "reports not sent yet");
    assert!(agent.power_off_due(now, true));
}

#[test]
fn shutdown_gives_up_after_the_slack() {
    let now = Instant::now();
    let mut agent = Agent::new(FakeLauncher::default());
    agent.handle(
        HostMessage::StartContainer(spec("a", &["sleep"], false)),
        now,
    );
    agent.handle(HostMessage::Shutdown { grace_ms: 100 }, now);
    let give_up = now + Duration::from_millis(100) + SHUTDOWN_SLACK;
    assert_eq!(
        agent.next_deadline(),
        Some(now + Duration::from_millis(100))
    );
    assert!(!agent.power_off_due(give_up - Duration::from_millis(1), true));
    assert!(agent.power_off_due(give_up, false));
}

fn exec(id: &str, container: &str, args: &[&str]) -> HostMessage {
    HostMessage::Exec(ExecSpec {
        id: id.into(),
        container: container.into(),
        process: spec(id, args, true).process,
    })
}

#[test]
fn exec_runs_in_the_container_and_ends_without_unmounting_it() {
    let now = Instant::now();
    let mut agent = Agent::new(FakeLauncher::default());
    agent.handle(
        HostMessage::StartContainer(spec("web", &["sleep"], false)),
        now,
    );
    agent.handle(exec("exec.1", "web", &["sh"]), now);
    assert_eq!(
        outbox(&mut agent),
        [
            GuestMessage::Started {
                id: "web".into(),
                pid: 100
            },
            GuestMessage::Started {
                id: "exec.1".into(),
                pid: 200
            },
        ]
    );
    assert_eq!(agent.launcher.execs, [("exec.1".to_string(), 100)]);
    // Stdin, signals and output address the exec by its own id.
    agent.handle(
        HostMessage::Stdin {
            id: "exec.1".into(),
            data: b"id\n".to_vec(),
        },
        now,
    );
    agent.handle(
        HostMessage::Signal {
            id: "exec.1".into(),
            signal: libc::SIGINT,
        },
        now,
    );
    assert_eq!(agent.launcher.signals, [(200, libc::SIGINT)]);
    let p = agent.launcher.procs.get_mut("exec.1").unwrap();
    let mut buf = [0u8; 8];
    assert_eq!(
        nix::unistd::read(p.stdin.as_ref().unwrap(), &mut buf).unwrap(),
        3
    );
    nix::unistd::write(p.stdout.as_ref().unwrap(), b"uid=0\n").unwrap();
    p.stdout = None;
    p.stderr = None;
    agent.reaped(exited(200, 0));
    pump(&mut agent);
    assert_eq!(
        outbox(&mut agent),
        [
            GuestMessage::Output {
                id: "exec.1".into(),
                stream: Stream::Stdout,
                data: b"uid=0\n".to_vec()
            },
            GuestMessage::Exited {
                id: "exec.1".into(),
                status: ExitStatus::Code(0)
            },
        ]
    );
    assert!(
        agent.launcher.cleaned.is_empty(),
        "the container stays mounted"
    );
    agent.handle(HostMessage::ListProcesses, now);
    assert_eq!(
        outbox(&mut agent),
        [GuestMessage::Processes {
            processes: vec![podvisor_proto::ProcessInfo {
                id: "web".into(),
                exec_in: None
            }]
        }]
    );
    // The container still runs: another exec with the same id is fine now.
    agent.handle(exec("exec.1", "web", &["sh"]), now);
    assert!(matches!(
        &outbox(&mut agent)[..],
        [GuestMessage::Started { id, .. }] if id == "exec.1"
    ));
}

#[test]
fn exec_is_refused_without_a_running_container_or_with_a_taken_id() {
    let now = Instant::now();
    let mut agent = Agent::new(FakeLauncher::default());
    agent.handle(exec("exec.1", "nope", &["sh"]), now);
    agent.handle(
        HostMessage::StartContainer(spec("web", &["sleep"], false)),
        now,
    );
    agent.handle(exec("web", "web", &["sh"]), now);
    agent.handle(exec("exec.2", "web", &["missing"]), now);
    agent.handle(exec("exec.3", "web", &["sh"]), now);
    // An exec is not a container to exec into.
    agent.handle(exec("exec.4", "exec.3", &["sh"]), now);
    let out = outbox(&mut agent);
    let failure = |i: usize| match &out[i] {
        GuestMessage::StartFailed { id, error } => (id.clone(), error.message.clone()),
        other => panic!("expected StartFailed, got {other:?}"),
    };
    assert_eq!(
        failure(0),
        ("exec.1".into(), "no running container \"nope\"".into())
    );
    assert!(matches!(&out[1], GuestMessage::Started { id, .. } if id == "web"));
    assert_eq!(
        failure(2),
        (
            "web".into(),
            "a process with id \"web\" already exists".into()
        )
    );
    assert_eq!(failure(3).0, "exec.2");
    assert!(matches!(&out[4], GuestMessage::Started { id, .. } if id == "exec.3"));
    assert_eq!(
        failure(5),
        ("exec.4".into(), "no running container \"exec.3\"".into())
    );
    // Once the container has exited, exec into it is refused.
    let p = agent.launcher.procs.get_mut("web").unwrap();
    p.stdout = None;
    p.stderr = None;
    agent.reaped(exited(100, 0));
    pump(&mut agent);
    outbox(&mut agent);
    agent.handle(exec("exec.5", "web", &["sh"]), now);
    assert_eq!(
        outbox(&mut agent),
        [GuestMessage::StartFailed {
            id: "exec.5".into(),
            error: StartError {
                kind: StartErrorKind::InvalidSpec,
                message: "no running container \"web\"".into()
            }
        }]
    );
}

#[test]
fn identity_reaches_running_containers_and_is_answered() {
    let now = Instant::now();
    let mut agent = Agent::new(FakeLauncher::default());
    agent.handle(
        HostMessage::StartContainer(spec("warm", &["sh"], false)),
        now,
    );
    agent.handle(
        HostMessage::StartContainer(spec("done", &["sh"], false)),
        now,
    );
    outbox(&mut agent);
    // "done" has exited but its output is not drained yet: not running.
    agent.reaped(exited(200, 0));
    let identity = CloneIdentity {
        hostname: "clone-7".into(),
        unix_time_ns: 5,
        entropy: vec![1; 32],
    };
    agent.handle(HostMessage::Identity(identity.clone()), now);
    assert_eq!(agent.launcher.identities, [(identity.clone(), vec![100])]);
    assert_eq!(
        outbox(&mut agent),
        [GuestMessage::IdentitySet { errors: vec![] }]
    );

    agent.launcher.identity_errors = vec!["setting the clock: EPERM".into()];
    agent.handle(HostMessage::Identity(identity), now);
    assert_eq!(
        outbox(&mut agent),
        [GuestMessage::IdentitySet {
            errors: vec!["setting the clock: EPERM".into()]
        }]
    );
}

#[test]
fn layers_are_mounted_ahead_on_request() {
    let now = Instant::now();
    let mut agent = Agent::new(FakeLauncher::default());
    let layers = |l: &[&str]| l.iter().map(|s| Mount::layer(*s)).collect::<Vec<_>>();
    agent.handle(
        HostMessage::MountShared {
            mounts: layers(&["pvl0", "pvl1"]),
        },
        now,
    );
    agent.handle(
        HostMessage::MountShared {
            mounts: layers(&["pvl9"]),
        },
        now,
    );
    // Unsafe serials never reach the launcher.
    agent.handle(
        HostMessage::MountShared {
            mounts: layers(&["../x"]),
        },
        now,
    );
    assert_eq!(
        outbox(&mut agent),
        [
            GuestMessage::SharedMounted { error: None },
            GuestMessage::SharedMounted {
                error: Some("layer disk with serial \"pvl9\" not found".into())
            },
            GuestMessage::SharedMounted {
                error: Some("invalid shared mount name \"../x\"".into())
            },
        ]
    );
    assert_eq!(
        agent.launcher.mounted,
        [layers(&["pvl0", "pvl1"]), layers(&["pvl9"])]
    );
}

fn network(interfaces: Vec<InterfaceConfig>, nameservers: &[&str]) -> NetworkConfig {
    NetworkConfig {
        interfaces,
        routes: vec![],
        dns: DnsConfig {
            nameservers: nameservers.iter().map(|s| s.parse().unwrap()).collect(),
            search: vec![],
            options: vec![],
        },
        hosts: vec![],
    }
}

#[test]
fn network_configuration_is_answered_with_its_warnings_and_errors() {
    let now = Instant::now();
    let mut agent = Agent::new(FakeLauncher::default());
    // --network none, with the host's stub resolver in its DNS list.
    let none = network(vec![], &["127.0.0.53", "10.0.2.3"]);
    agent.handle(HostMessage::ConfigureNetwork(none.clone()), now);
    assert_eq!(
        outbox(&mut agent),
        [GuestMessage::NetworkConfigured {
            error: None,
            warnings: vec![
                "dropped nameserver 127.0.0.53: a loopback resolver cannot be reached from the pod VM"
                    .into()
            ],
        }]
    );
    assert_eq!(agent.launcher.networks, [none]);

    // A NIC the VM does not have.
    let nic = InterfaceConfig {
        mac: "02:42:0a:58:00:05".parse().unwrap(),
        current_mac: None,
        name: "eth0".into(),
        mtu: 1500,
        addresses: vec![],
        up: true,
    };
    agent.handle(HostMessage::ConfigureNetwork(network(vec![nic], &[])), now);
    match &outbox(&mut agent)[..] {
        [
            GuestMessage::NetworkConfigured {
                error: Some(error),
                warnings,
            },
        ] => {
            assert!(
                error.starts_with("no network interface with MAC 02:42:0a:58:00:05"),
                "{error}"
            );
            assert!(warnings.is_empty());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn only_shared_mounts_are_made_ahead() {
    let now = Instant::now();
    let mut agent = Agent::new(FakeLauncher::default());
    let tmpfs = Mount {
        source: MountSource::Anonymous,
        fstype: "tmpfs".into(),
        target: MountTarget::Container {
            path: "/tmp".into(),
        },
        options: vec![],
        read_only: false,
    };
    let unknown = Mount {
        fstype: "xfs".into(),
        ..Mount::layer("pvl0")
    };
    for mounts in [vec![Mount::layer("pvl0"), tmpfs], vec![unknown]] {
        agent.handle(HostMessage::MountShared { mounts }, now);
    }
    assert_eq!(
        outbox(&mut agent),
        [
            GuestMessage::SharedMounted {
                error: Some("the mount on \"/tmp\" is not a shared mount".into())
            },
            GuestMessage::SharedMounted {
                error: Some(
                    "shared mount \"pvl0\": unknown mount type \"xfs\" \
                     (the agent mounts erofs, tmpfs, overlay, ext4 and bind)"
                        .into()
                )
            },
        ]
    );
    assert!(agent.launcher.mounted.is_empty());
}

/// A container whose spec binds the encrypted volume `data` (shared as
/// `vol-data`).
fn volume_spec(id: &str) -> ContainerSpec {
    let mut s = spec(id, &["sh"], false);
    s.mounts.push(Mount {
        source: MountSource::Encrypted {
            volume: "data".into(),
        },
        fstype: "ext4".into(),
        target: MountTarget::Shared {
            name: "vol-data".into(),
        },
        options: vec![],
        read_only: false,
    });
    s.mounts.push(Mount {
        source: MountSource::SharedPath {
            name: "vol-data".into(),
            path: "sub".into(),
        },
        fstype: "bind".into(),
        target: MountTarget::Container {
            path: "/data".into(),
        },
        options: vec![],
        read_only: false,
    });
    s
}

#[test]
fn the_key_conversation_is_answered() {
    let now = Instant::now();
    let mut agent = Agent::new(FakeLauncher::default());
    agent.handle(
        HostMessage::RequestVolumeKeys {
            context: "ns/p/u/i".into(),
            volumes: vec![],
        },
        now,
    );
    agent.handle(
        HostMessage::VolumeKeys {
            sealed: vec![0; 80],
        },
        now,
    );
    agent.handle(HostMessage::SuspendVolumes, now);
    agent.handle(
        HostMessage::RequestVolumeKeys {
            context: String::new(),
            volumes: vec![],
        },
        now,
    );
    assert_eq!(
        outbox(&mut agent),
        [
            GuestMessage::VolumeKeyRequest {
                public_key: vec![1; 32],
                error: None
            },
            GuestMessage::VolumesOpened {
                results: vec![podvisor_proto::VolumeOpened {
                    name: "data".into(),
                    error: None
                }]
            },
            GuestMessage::VolumesSuspended { error: None },
            GuestMessage::VolumeKeyRequest {
                public_key: vec![],
                error: Some("bad context".into())
            },
        ]
    );
    assert_eq!(
        agent.launcher.volume_calls,
        ["request ns/p/u/i", "keys 80", "suspend", "request "]
    );
}

#[test]
fn close_volume_stops_its_containers_and_closes_after_their_exit() {
    let now = Instant::now();
    let mut agent = Agent::new(FakeLauncher::default());
    agent.handle(HostMessage::StartContainer(volume_spec("uses")), now);
    agent.handle(
        HostMessage::StartContainer(spec("other", &["sh"], false)),
        now,
    );
    outbox(&mut agent);
    agent.handle(
        HostMessage::CloseVolume {
            name: "data".into(),
            grace_ms: 1000,
        },
        now,
    );
    // SIGTERM to the container using it only; nothing closed yet.
    assert_eq!(agent.launcher.signals, [(100, libc::SIGTERM)]);
    assert!(outbox(&mut agent).is_empty());
    assert!(agent.launcher.volume_calls.is_empty());
    // A new container using it is refused meanwhile.
    agent.handle(HostMessage::StartContainer(volume_spec("late")), now);
    assert!(matches!(
        &outbox(&mut agent)[..],
        [GuestMessage::StartFailed { error, .. }] if error.message.contains("being closed")
    ));
    // SIGKILL after the grace period.
    agent.tick(now + Duration::from_millis(1000));
    assert_eq!(agent.launcher.signals[1], (100, libc::SIGKILL));
    agent.reaped(WaitStatus::Signaled(
        Pid::from_raw(100),
        nix::sys::signal::Signal::SIGKILL,
        false,
    ));
    let p = agent.launcher.procs.get_mut("uses").unwrap();
    p.stdout = None;
    p.stderr = None;
    pump(&mut agent);
    let out = outbox(&mut agent);
    assert!(matches!(&out[0], GuestMessage::Exited { id, .. } if id == "uses"));
    assert_eq!(
        out[1],
        GuestMessage::VolumeClosed {
            name: "data".into(),
            error: None
        }
    );
    assert_eq!(agent.launcher.volume_calls, ["close data"]);
    // With no container using it, it closes at once.
    agent.handle(
        HostMessage::CloseVolume {
            name: "data".into(),
            grace_ms: 0,
        },
        now,
    );
    assert!(matches!(
        &outbox(&mut agent)[..],
        [GuestMessage::VolumeClosed { .. }]
    ));
}

#[test]
fn shared_files_are_read_in_chunks_and_failures_answered() {
    let now = Instant::now();
    let mut agent = Agent::new(FakeLauncher::default());
    agent.handle(
        HostMessage::ReadSharedFile {
            name: "train".into(),
            path: "app.jsa".into(),
            offset: 2,
        },
        now,
    );
    agent.handle(
        HostMessage::ReadSharedFile {
            name: "train".into(),
            path: "missing".into(),
            offset: 0,
        },
        now,
    );
    assert_eq!(
        outbox(&mut agent),
        vec![
            GuestMessage::SharedFileData {
                data: b"chive".to_vec(),
                eof: true,
                error: None,
            },
            GuestMessage::SharedFileData {
                data: vec![],
                eof: true,
                error: Some("no missing in train".into()),
            },
        ]
    );
}
