//! `--runtime ack-without-vm`, for measuring the control plane alone: a
//! sandbox that runs nothing. Every container it is asked to start is
//! reported started at once and runs until it is stopped; there are no
//! images, no disks, no logs and no exec. Never the default.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use podvisor_hibernate::{HibernateError, SnapshotKey};
use podvisor_podvm::PodVmError;
use podvisor_proto::{
    ContainerSpec, ExitStatus, GuestMessage, HostMessage, ProcessInfo, ProcessSpec, StartError,
    StartErrorKind,
};
use podvisor_vmm::BlockDevice;
use podvisor_vmm::process::VmmProcess;

use super::error::RuntimeError;
use super::hibernation::Hibernated;
use super::images::{HeldLayers, ImageProblem};
use super::plan::{DEFAULT_TERMINAL, PodPlan};
use super::records::{PodRecord, VmRecord};
use super::sandbox::{Launcher, NotSaved, Paused, Prepared, Sandbox};

/// What logs and exec requests are told.
const NOTHING_RUNS: &str = "this host runs with --runtime ack-without-vm: its pods run nothing, \
     so there are no logs and no exec";

/// What a hibernation is told.
const NOTHING_TO_HIBERNATE: &str = "this host runs with --runtime ack-without-vm: its pods have \
     no VM to hibernate";

/// Launches sandboxes that run nothing.
pub struct AckLauncher;

#[async_trait]
impl Launcher for AckLauncher {
    fn recover(&self, _run_dir: &Path, _records: &[PodRecord]) -> Result<(), RuntimeError> {
        Ok(())
    }

    async fn prepare(&self, plan: &PodPlan) -> Result<Prepared, ImageProblem> {
        let containers = plan
            .containers
            .iter()
            .map(|c| {
                let mut args = c.command.clone().unwrap_or_default();
                args.extend(c.args.clone().unwrap_or_default());
                Ok(ContainerSpec {
                    id: c.name.clone(),
                    hostname: plan.hostname(),
                    mounts: vec![],
                    process: ProcessSpec {
                        args,
                        env: c.overrides().env,
                        cwd: c.working_dir.clone().unwrap_or_else(|| "/".into()),
                        user: String::new(),
                        terminal: c.tty.then_some(DEFAULT_TERMINAL),
                        stdin: c.stdin,
                    },
                    runtime: None,
                })
            })
            .collect();
        Ok(Prepared {
            disks: vec![],
            pmem: vec![],
            containers,
            holds: vec![],
            archive_keys: vec![],
        })
    }

    async fn release(&self, _holds: &[HeldLayers]) {}

    async fn start(
        &self,
        _plan: &PodPlan,
        _disks: Vec<BlockDevice>,
        _pmem: Vec<podvisor_vmm::PmemDevice>,
    ) -> Result<(Box<dyn Sandbox>, VmmProcess), PodVmError> {
        // No process: pid 0 is never a VMM, so nothing adopts or kills it.
        let process = VmmProcess {
            pid: 0,
            start_time: 0,
            run_dir: PathBuf::new(),
        };
        Ok((Box::new(AckSandbox::default()), process))
    }

    async fn adopt(&self, record: &VmRecord) -> Result<Box<dyn Sandbox>, PodVmError> {
        // What ran before still "runs".
        let processes = record
            .containers
            .iter()
            .flatten()
            .map(|c| ProcessInfo {
                id: c.id.clone(),
                exec_in: None,
            })
            .collect();
        let mut sandbox = AckSandbox::default();
        sandbox
            .events
            .push_back(GuestMessage::Processes { processes });
        Ok(Box::new(sandbox))
    }

    fn discard(&self, _record: &VmRecord) {}

    fn without_logs_and_exec(&self) -> Option<&'static str> {
        Some(NOTHING_RUNS)
    }

    fn without_hibernation(&self) -> Option<&'static str> {
        Some(NOTHING_TO_HIBERNATE)
    }

    async fn wake(
        &self,
        _plan: &PodPlan,
        _hibernated: &Hibernated,
        _key: &SnapshotKey,
        _timeout: Duration,
    ) -> Result<(Box<dyn Sandbox>, VmmProcess), HibernateError> {
        Err(HibernateError::Unsupported(NOTHING_TO_HIBERNATE))
    }
}

/// A sandbox that answers as an agent whose processes never end by
/// themselves.
#[derive(Default)]
struct AckSandbox {
    events: VecDeque<GuestMessage>,
}

#[async_trait]
impl Sandbox for AckSandbox {
    async fn send(&mut self, msg: &HostMessage) -> Result<(), PodVmError> {
        let answer = match msg {
            HostMessage::StartContainer(spec) => GuestMessage::Started {
                id: spec.id.clone(),
                pid: 0,
            },
            HostMessage::Exec(spec) => GuestMessage::StartFailed {
                id: spec.id.clone(),
                error: StartError {
                    kind: StartErrorKind::Other,
                    message: NOTHING_RUNS.into(),
                },
            },
            HostMessage::Stop { id, .. } => GuestMessage::Exited {
                id: id.clone(),
                status: ExitStatus::Signaled {
                    signal: libc::SIGTERM,
                    core_dumped: false,
                },
            },
            _ => return Ok(()),
        };
        self.events.push_back(answer);
        Ok(())
    }

    async fn next_event(&mut self) -> Result<GuestMessage, PodVmError> {
        match self.events.pop_front() {
            Some(m) => Ok(m),
            None => std::future::pending().await,
        }
    }

    async fn reject(&mut self, what: String) -> PodVmError {
        PodVmError::Io {
            what: format!("ack-without-vm sandbox: {what}"),
            source: std::io::Error::other("unexpected message"),
        }
    }

    async fn shutdown(self: Box<Self>, _grace: Duration) {}

    fn detach(self: Box<Self>) {}

    async fn save(
        self: Box<Self>,
        _dir: &Path,
        _context: &[u8],
    ) -> Result<Box<dyn Paused>, NotSaved> {
        Err(NotSaved {
            sandbox: Some(self),
            error: HibernateError::Unsupported(NOTHING_TO_HIBERNATE),
        })
    }
}
