//! A fake [`Launcher`] and [`Sandbox`] for unit tests of the pod task,
//! the runtime and the reconciler: each sandbox it starts or adopts is
//! handed to the test ([`FakeVm`]), which sees every message the pod task
//! sends and plays the agent's answers; dropping its event sender is the
//! VM dying.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use podvisor_podvm::PodVmError;
use podvisor_proto::{ContainerSpec, GuestMessage, HostMessage, ProcessSpec};
use podvisor_vmm::process::VmmProcess;
use podvisor_vmm::{BlockDevice, VmExit};
use tokio::sync::mpsc;

use super::error::RuntimeError;
use super::images::{HeldLayers, ImageProblem};
use super::plan::PodPlan;
use super::records::{PodRecord, VmRecord};
use super::sandbox::{Launcher, Prepared, Sandbox};

/// How a fake sandbox ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Shutdown(Duration),
    Detached,
    Dropped,
}

/// The test's side of one fake sandbox.
pub struct FakeVm {
    /// `Started` or `Adopted`.
    pub adopted: bool,
    /// What the pod task sent.
    pub sent: mpsc::UnboundedReceiver<HostMessage>,
    /// What the agent says; drop it and the VM dies.
    pub events: mpsc::UnboundedSender<GuestMessage>,
    pub ending: mpsc::UnboundedReceiver<Ending>,
}

impl FakeVm {
    /// The next message the pod task sends, within 5 s.
    pub async fn next_sent(&mut self) -> HostMessage {
        tokio::time::timeout(Duration::from_secs(5), self.sent.recv())
            .await
            .expect("the pod task sends a message within 5 s")
            .expect("the sandbox is still there")
    }

    /// The id of the container the next message starts.
    pub async fn next_start(&mut self) -> String {
        match self.next_sent().await {
            HostMessage::StartContainer(spec) => spec.id,
            other => panic!("expected a container start, got {other:?}"),
        }
    }

    pub fn say(&self, msg: GuestMessage) {
        self.events.send(msg).expect("the sandbox listens");
    }

    /// How the sandbox ended, within 5 s.
    pub async fn ended(&mut self) -> Ending {
        tokio::time::timeout(Duration::from_secs(5), self.ending.recv())
            .await
            .expect("the sandbox ends within 5 s")
            .expect("an ending is reported")
    }
}

/// Makes fake sandboxes and records what it was asked.
pub struct FakeLauncher {
    vms: mpsc::UnboundedSender<FakeVm>,
    /// Layers `prepare` holds for every pod.
    pub holds: Vec<HeldLayers>,
    /// `start` fails with this message.
    pub boot_failure: Mutex<Option<String>>,
    /// `adopt` fails.
    pub adopt_fails: bool,
    pub recovered: Mutex<Vec<String>>,
    pub released: Mutex<Vec<HeldLayers>>,
    pub discarded: Mutex<Vec<String>>,
}

impl FakeLauncher {
    /// A launcher and the receiver of its sandboxes.
    pub fn new() -> (FakeLauncher, mpsc::UnboundedReceiver<FakeVm>) {
        let (vms, rx) = mpsc::unbounded_channel();
        let launcher = FakeLauncher {
            vms,
            holds: vec![HeldLayers {
                id: "pod test".into(),
                chains: vec![],
            }],
            boot_failure: Mutex::new(None),
            adopt_fails: false,
            recovered: Mutex::new(vec![]),
            released: Mutex::new(vec![]),
            discarded: Mutex::new(vec![]),
        };
        (launcher, rx)
    }

    fn sandbox(&self, adopted: bool) -> Box<dyn Sandbox> {
        let (sent_tx, sent) = mpsc::unbounded_channel();
        let (events, events_rx) = mpsc::unbounded_channel();
        let (ending_tx, ending) = mpsc::unbounded_channel();
        let _ = self.vms.send(FakeVm {
            adopted,
            sent,
            events,
            ending,
        });
        Box::new(FakeSandbox {
            sent: sent_tx,
            events: events_rx,
            ending: Some(ending_tx),
        })
    }
}

/// The test's next sandbox, within 5 s.
pub async fn next_vm(vms: &mut mpsc::UnboundedReceiver<FakeVm>) -> FakeVm {
    tokio::time::timeout(Duration::from_secs(5), vms.recv())
        .await
        .expect("a sandbox within 5 s")
        .expect("the launcher is alive")
}

#[async_trait]
impl Launcher for FakeLauncher {
    fn recover(&self, _run_dir: &Path, records: &[PodRecord]) -> Result<(), RuntimeError> {
        let uids = records.iter().map(|r| r.plan.uid.clone());
        self.recovered.lock().unwrap().extend(uids);
        Ok(())
    }

    async fn prepare(&self, plan: &PodPlan) -> Result<Prepared, ImageProblem> {
        let containers = plan
            .containers
            .iter()
            .map(|c| {
                Ok(ContainerSpec {
                    id: c.name.clone(),
                    hostname: plan.hostname(),
                    mounts: vec![],
                    process: ProcessSpec {
                        args: c.command.clone().unwrap_or_else(|| vec!["true".into()]),
                        env: vec![],
                        cwd: "/".into(),
                        user: String::new(),
                        terminal: None,
                        stdin: false,
                    },
                })
            })
            .collect();
        Ok(Prepared {
            disks: vec![],
            containers,
            holds: self.holds.clone(),
        })
    }

    async fn release(&self, holds: &[HeldLayers]) {
        self.released.lock().unwrap().extend_from_slice(holds);
    }

    async fn start(
        &self,
        _plan: &PodPlan,
        _disks: Vec<BlockDevice>,
    ) -> Result<(Box<dyn Sandbox>, VmmProcess), PodVmError> {
        if let Some(why) = self.boot_failure.lock().unwrap().clone() {
            return Err(PodVmError::Io {
                what: why,
                source: std::io::Error::other("fake boot failure"),
            });
        }
        let process = VmmProcess {
            pid: 0,
            start_time: 0,
            run_dir: PathBuf::new(),
        };
        Ok((self.sandbox(false), process))
    }

    async fn adopt(&self, _record: &VmRecord) -> Result<Box<dyn Sandbox>, PodVmError> {
        if self.adopt_fails {
            return Err(PodVmError::VmDied {
                exit: VmExit::Unknown,
                console_tail: String::new(),
            });
        }
        Ok(self.sandbox(true))
    }

    fn discard(&self, record: &VmRecord) {
        self.discarded.lock().unwrap().push(record.vm_id.clone());
    }
}

struct FakeSandbox {
    sent: mpsc::UnboundedSender<HostMessage>,
    events: mpsc::UnboundedReceiver<GuestMessage>,
    ending: Option<mpsc::UnboundedSender<Ending>>,
}

impl FakeSandbox {
    fn end(&mut self, how: Ending) {
        if let Some(tx) = self.ending.take() {
            let _ = tx.send(how);
        }
    }
}

impl Drop for FakeSandbox {
    fn drop(&mut self) {
        self.end(Ending::Dropped);
    }
}

#[async_trait]
impl Sandbox for FakeSandbox {
    async fn send(&mut self, msg: &HostMessage) -> Result<(), PodVmError> {
        self.sent.send(msg.clone()).map_err(|_| PodVmError::Io {
            what: "the test let go of the fake VM".into(),
            source: std::io::Error::other("closed"),
        })
    }

    async fn next_event(&mut self) -> Result<GuestMessage, PodVmError> {
        self.events.recv().await.ok_or(PodVmError::VmDied {
            exit: VmExit::Killed(9),
            console_tail: "fake console".into(),
        })
    }

    async fn reject(&mut self, what: String) -> PodVmError {
        PodVmError::Io {
            what,
            source: std::io::Error::other("rejected"),
        }
    }

    async fn shutdown(mut self: Box<Self>, grace: Duration) {
        self.end(Ending::Shutdown(grace));
    }

    fn detach(mut self: Box<Self>) {
        self.end(Ending::Detached);
    }
}
