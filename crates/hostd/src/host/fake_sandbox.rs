//! A fake [`Launcher`] and [`Sandbox`] for unit tests of the pod task,
//! the runtime and the reconciler: each sandbox it starts or adopts is
//! handed to the test ([`FakeVm`]), which sees every message the pod task
//! sends and plays the agent's answers; dropping its event sender is the
//! VM dying.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use podvisor_hibernate::{HibernateError, Snapshot, SnapshotKey};
use podvisor_podvm::PodVmError;
use podvisor_proto::{ContainerSpec, GuestMessage, HostMessage, ProcessSpec};
use podvisor_vmm::process::VmmProcess;
use podvisor_vmm::{BlockDevice, VmExit};
use tokio::sync::{Notify, mpsc};

use super::error::RuntimeError;
use super::hibernation::{CustodyError, Hibernated, KeyCustody};
use super::images::{HeldLayers, ImageProblem};
use super::plan::PodPlan;
use super::records::{PodRecord, VmRecord};
use super::sandbox::{Launcher, NotSaved, Paused, Prepared, Sandbox};

/// How a fake sandbox ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    Shutdown(Duration),
    Detached,
    Dropped,
    /// Saved into a snapshot and stopped.
    Hibernated,
}

/// The test's side of one fake sandbox.
pub struct FakeVm {
    /// `Started` or `Adopted` (or woken from a snapshot).
    pub adopted: bool,
    /// Woken from a snapshot.
    pub woken: bool,
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
    /// `wake` refuses the snapshot.
    pub wake_refused: std::sync::atomic::AtomicBool,
    /// `wake` never finishes.
    pub wake_hangs: std::sync::atomic::AtomicBool,
    /// Pods whose network waits for a request, and the bell that rings it.
    pub sleeping: Mutex<HashMap<String, Arc<Notify>>>,
    /// Frames the pods' networks took in (a change is traffic).
    pub frames: Mutex<HashMap<String, u64>>,
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
            wake_refused: Default::default(),
            wake_hangs: Default::default(),
            sleeping: Mutex::new(HashMap::new()),
            frames: Mutex::new(HashMap::new()),
        };
        (launcher, rx)
    }

    /// A request for sleeping pod `uid` arrives; `false` if it does not
    /// sleep.
    pub fn request(&self, uid: &str) -> bool {
        match self.sleeping.lock().unwrap().get(uid) {
            Some(bell) => {
                bell.notify_one();
                true
            }
            None => false,
        }
    }

    fn sandbox(&self, adopted: bool) -> Box<dyn Sandbox> {
        self.sandbox_woken(adopted, false)
    }

    fn sandbox_woken(&self, adopted: bool, woken: bool) -> Box<dyn Sandbox> {
        let (sent_tx, sent) = mpsc::unbounded_channel();
        let (events, events_rx) = mpsc::unbounded_channel();
        let (ending_tx, ending) = mpsc::unbounded_channel();
        let _ = self.vms.send(FakeVm {
            adopted,
            woken,
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
                    runtime: None,
                })
            })
            .collect();
        Ok(Prepared {
            disks: vec![BlockDevice {
                id: "layer0".into(),
                path: "/nonexistent/layer0.erofs".into(),
                read_only: true,
                serial: "layer0".into(),
            }],
            pmem: vec![],
            containers,
            holds: self.holds.clone(),
            archive_keys: vec![],
        })
    }

    async fn release(&self, holds: &[HeldLayers]) {
        self.released.lock().unwrap().extend_from_slice(holds);
    }

    async fn start(
        &self,
        _plan: &PodPlan,
        _disks: Vec<BlockDevice>,
        _pmem: Vec<podvisor_vmm::PmemDevice>,
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

    async fn frames_in(&self, plan: &PodPlan) -> Option<u64> {
        self.frames.lock().unwrap().get(&plan.uid).copied()
    }

    async fn sleep(&self, plan: &PodPlan) -> Result<(), PodVmError> {
        self.sleeping
            .lock()
            .unwrap()
            .insert(plan.uid.clone(), Arc::new(Notify::new()));
        Ok(())
    }

    async fn requested(&self, plan: &PodPlan) -> Result<(), PodVmError> {
        let bell = self.sleeping.lock().unwrap().get(&plan.uid).cloned();
        match bell {
            Some(bell) => bell.notified().await,
            None => std::future::pending().await,
        }
        Ok(())
    }

    async fn wake(
        &self,
        plan: &PodPlan,
        hibernated: &Hibernated,
        key: &SnapshotKey,
        _timeout: Duration,
    ) -> Result<(Box<dyn Sandbox>, VmmProcess), HibernateError> {
        self.sleeping.lock().unwrap().remove(&plan.uid);
        if self.wake_hangs.load(std::sync::atomic::Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if self.wake_refused.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(HibernateError::Refused {
                id: hibernated.snapshot.id.clone(),
                source: podvisor_hibernate::SealError::NotASnapshot,
            });
        }
        // The fake snapshot file holds its key.
        let kept =
            std::fs::read(&hibernated.snapshot.path).map_err(|source| HibernateError::Missing {
                id: hibernated.snapshot.id.clone(),
                path: hibernated.snapshot.path.clone(),
                source,
            })?;
        assert_eq!(kept, key.as_bytes(), "the key the custody gave back");
        let process = VmmProcess {
            pid: 0,
            start_time: 0,
            run_dir: PathBuf::new(),
        };
        Ok((self.sandbox_woken(true, true), process))
    }

    fn forget_sleep(&self, plan: &PodPlan) {
        self.sleeping.lock().unwrap().remove(&plan.uid);
    }
}

/// A fake sandbox whose "state" is saved: a snapshot file holding its key.
struct FakePaused {
    sandbox: Box<FakeSandbox>,
    snapshot: Snapshot,
    key: SnapshotKey,
}

#[async_trait]
impl Paused for FakePaused {
    fn snapshot(&self) -> &Snapshot {
        &self.snapshot
    }

    fn key(&self) -> &SnapshotKey {
        &self.key
    }

    async fn stop(mut self: Box<Self>) {
        self.sandbox.end(Ending::Hibernated);
    }

    async fn resume(self: Box<Self>, why: HibernateError) -> NotSaved {
        let _ = std::fs::remove_file(&self.snapshot.path);
        NotSaved {
            sandbox: Some(self.sandbox),
            error: why,
        }
    }
}

/// Keeps snapshot keys in memory, as the server would; `fail` makes it
/// refuse.
#[derive(Default)]
pub struct MemoryCustody {
    pub keys: Mutex<HashMap<String, (String, SnapshotKey)>>,
    pub fail: std::sync::atomic::AtomicBool,
}

impl MemoryCustody {
    fn refused(&self) -> Result<(), CustodyError> {
        if self.fail.load(std::sync::atomic::Ordering::SeqCst) {
            return Err(CustodyError {
                what: "the fake custody refuses".into(),
                retryable: true,
                source: "unreachable".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl KeyCustody for MemoryCustody {
    async fn put(
        &self,
        plan: &PodPlan,
        snapshot: &str,
        key: &SnapshotKey,
    ) -> Result<(), CustodyError> {
        self.refused()?;
        self.keys
            .lock()
            .unwrap()
            .insert(plan.uid.clone(), (snapshot.to_string(), key.clone()));
        Ok(())
    }

    async fn get(&self, plan: &PodPlan, snapshot: &str) -> Result<SnapshotKey, CustodyError> {
        self.refused()?;
        match self.keys.lock().unwrap().get(&plan.uid) {
            Some((id, key)) if id == snapshot => Ok(key.clone()),
            _ => Err(CustodyError {
                what: format!("no key for snapshot {snapshot}"),
                retryable: false,
                source: "not found".into(),
            }),
        }
    }

    async fn delete(&self, plan: &PodPlan) -> Result<(), CustodyError> {
        self.refused()?;
        self.keys.lock().unwrap().remove(&plan.uid);
        Ok(())
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

    async fn save(
        self: Box<Self>,
        dir: &Path,
        _context: &[u8],
    ) -> Result<Box<dyn Paused>, NotSaved> {
        let key = SnapshotKey::generate().expect("a key");
        let id = podvisor_store::random_hex(8).expect("an id");
        let path = dir.join(format!("{id}.sealed"));
        let written =
            std::fs::create_dir_all(dir).and_then(|()| std::fs::write(&path, key.as_bytes()));
        if let Err(e) = written {
            return Err(NotSaved {
                sandbox: Some(self),
                error: HibernateError::Write {
                    path,
                    source: Box::new(e),
                },
            });
        }
        let snapshot = Snapshot {
            id,
            path,
            pci: Default::default(),
            agent: podvisor_proto::AgentInfo {
                agent_version: "fake".into(),
                kernel_release: "fake".into(),
                boottime_ms: 0,
                boot_steps: vec![],
            },
            state_bytes: 1 << 20,
            sealed_bytes: 1 << 18,
            taken_unix_ms: 0,
        };
        Ok(Box::new(FakePaused {
            sandbox: self,
            snapshot,
            key,
        }))
    }
}
