//! What the host reports about a pod: its phase and each container's state
//! and restart count, with Kubernetes' meanings; and the restart decisions
//! behind them (restart policy, crash-loop back-off).

use std::time::{Duration, Instant, SystemTime};

use podvisor_proto::{ExitStatus, StartError};
use serde::{Deserialize, Serialize};

use super::plan::RestartPolicy;

/// The lifecycle phase of a pod on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PodPhase {
    /// Images are being pulled or the VM is starting.
    #[default]
    Pending,
    /// The VM runs and a container runs or will be restarted.
    Running,
    /// Every container ended with code 0 and none will restart.
    Succeeded,
    /// Every container ended, at least one with a failure, none will restart.
    Failed,
}

impl PodPhase {
    /// Succeeded or Failed: nothing of the pod will run again.
    pub fn is_terminal(self) -> bool {
        matches!(self, PodPhase::Succeeded | PodPhase::Failed)
    }
}

/// The state of a pod as this host sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PodState {
    pub phase: PodPhase,
    /// Why the pod has no VM, if something failed.
    pub reason: Option<PodReason>,
    pub message: Option<String>,
    /// When the pod VM was up.
    pub started_at: Option<SystemTime>,
    pub containers: Vec<ContainerStatus>,
    /// The pod's addresses (status.podIPs), while it has a network.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod_ips: Vec<std::net::IpAddr>,
    /// Hibernated now, or how the last wake went.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hibernation: Option<super::hibernation::HibernationStatus>,
}

/// One container's state and restart count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerStatus {
    pub name: String,
    pub image: String,
    pub restart_count: u32,
    pub state: ContainerState,
    /// What the agent set for the container's language runtime when it
    /// last started (sanitized and bounded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_profile: Option<podvisor_proto::AppliedProfile>,
}

impl ContainerStatus {
    /// A container that has not started yet.
    pub fn new(name: &str, image: &str) -> Self {
        Self {
            name: name.to_string(),
            image: image.to_string(),
            restart_count: 0,
            state: ContainerState::waiting(WaitingReason::ContainerCreating, None),
            runtime_profile: None,
        }
    }

    /// A running container counts as ready (podvisor has no probes).
    pub fn ready(&self) -> bool {
        matches!(self.state, ContainerState::Running { .. })
    }
}

/// At each moment a container is waiting, running or terminated.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    Waiting {
        reason: WaitingReason,
        message: Option<String>,
    },
    Running {
        started_at: SystemTime,
    },
    Terminated {
        exit_code: i32,
        signal: Option<i32>,
        reason: TerminatedReason,
        message: Option<String>,
        started_at: Option<SystemTime>,
        finished_at: SystemTime,
    },
}

impl ContainerState {
    pub fn waiting(reason: WaitingReason, message: Option<String>) -> Self {
        ContainerState::Waiting { reason, message }
    }

    /// Whether it is waiting for this reason.
    pub fn is_waiting(&self, why: WaitingReason) -> bool {
        matches!(self, ContainerState::Waiting { reason, .. } if *reason == why)
    }
}

/// Reasons with Kubernetes' names, reported as those CamelCase words (and
/// kept so in the pod records).
macro_rules! reasons {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant,)*
        }

        impl $name {
            /// The word Kubernetes uses.
            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text,)*
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl PartialEq<str> for $name {
            fn eq(&self, other: &str) -> bool {
                self.as_str() == other
            }
        }

        impl PartialEq<&str> for $name {
            fn eq(&self, other: &&str) -> bool {
                self.as_str() == *other
            }
        }
    };
}
pub(crate) use reasons;

reasons! {
    /// Why a container is waiting.
    WaitingReason {
        /// Its VM is being started, or it is being started in it.
        ContainerCreating = "ContainerCreating",
        /// Its image (or another container's) could not be pulled yet.
        ErrImagePull = "ErrImagePull",
        /// It ended and waits for its back-off to restart.
        CrashLoopBackOff = "CrashLoopBackOff",
        /// The management server refused the key of an encrypted volume
        /// it mounts (another namespace's, revoked, ...).
        KeyDenied = "KeyDenied",
        /// The key of an encrypted volume it mounts did not come in time.
        KeyTimeout = "KeyTimeout",
        /// A volume it mounts could not be made ready or opened.
        FailedMount = "FailedMount",
    }
}

reasons! {
    /// Why a container's run ended.
    TerminatedReason {
        /// Its process exited with code 0.
        Completed = "Completed",
        /// Its process exited with another code or was killed.
        Error = "Error",
        /// It could not be started.
        StartError = "StartError",
        /// Its VM died under it, or it ended unseen.
        Unknown = "Unknown",
    }
}

reasons! {
    /// Why a pod is not running as planned.
    PodReason {
        /// Its VM could not be started.
        VmFailed = "VMFailed",
    }
}

/// How a container run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// Its process exited (or was killed).
    Exited(ExitStatus),
    /// It could not be started.
    StartFailed(StartError),
    /// The pod VM died under it, or it ended unseen while no host daemon
    /// was connected; the message says which.
    Lost(String),
}

/// Crash-loop back-off: the delay before each restart doubles from `base`
/// up to `max`, and starts over once a container has run for `reset`
/// (Kubernetes uses 10 s, 5 min and 10 min).
#[derive(Debug, Clone, Copy)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
    pub reset: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(10),
            max: Duration::from_secs(300),
            reset: Duration::from_secs(600),
        }
    }
}

/// One container's status plus what decides its restarts.
#[derive(Debug, Clone)]
pub struct ContainerTrack {
    pub status: ContainerStatus,
    /// When to start it again, if it is to be restarted.
    pub restart_at: Option<Instant>,
    /// The next back-off delay.
    delay: Option<Duration>,
    running_since: Option<(Instant, SystemTime)>,
}

impl ContainerTrack {
    pub fn new(status: ContainerStatus) -> Self {
        Self {
            status,
            restart_at: None,
            delay: None,
            running_since: None,
        }
    }

    /// Whether the container is neither running nor going to run again.
    pub fn is_done(&self) -> bool {
        matches!(self.status.state, ContainerState::Terminated { .. }) && self.restart_at.is_none()
    }

    /// It is being started (again): counts a restart if it ran before.
    pub fn starting(&mut self, restart: bool) {
        if restart {
            self.status.restart_count += 1;
        }
        self.restart_at = None;
        self.status.state = ContainerState::waiting(WaitingReason::ContainerCreating, None);
    }

    /// Its process runs.
    pub fn started(&mut self, now: Instant) {
        let at = SystemTime::now();
        self.running_since = Some((now, at));
        self.status.state = ContainerState::Running { started_at: at };
    }

    /// It ended; decides from `policy` and the back-off whether and when it
    /// is started again. Returns the restart time, if any.
    pub fn ended(
        &mut self,
        how: Ended,
        policy: RestartPolicy,
        backoff: &Backoff,
        now: Instant,
    ) -> Option<Instant> {
        let ran = self.running_since.take();
        let (exit_code, signal, reason, message) = match how {
            Ended::Exited(s) => {
                let signal = match s {
                    ExitStatus::Signaled { signal, .. } => Some(signal),
                    ExitStatus::Code(_) => None,
                };
                let code = s.shell_code();
                let reason = if code == 0 {
                    TerminatedReason::Completed
                } else {
                    TerminatedReason::Error
                };
                (code, signal, reason, None)
            }
            Ended::StartFailed(e) => (
                e.kind.exit_code(),
                None,
                TerminatedReason::StartError,
                Some(e.message),
            ),
            Ended::Lost(message) => (255, None, TerminatedReason::Unknown, Some(message)),
        };
        self.status.state = ContainerState::Terminated {
            exit_code,
            signal,
            reason,
            message: message.clone(),
            started_at: ran.map(|(_, at)| at),
            finished_at: SystemTime::now(),
        };
        if !policy.restarts(exit_code) {
            self.restart_at = None;
            return None;
        }
        if ran.is_some_and(|(since, _)| now.saturating_duration_since(since) >= backoff.reset) {
            self.delay = None;
        }
        let delay = self.delay.unwrap_or(backoff.base);
        self.delay = Some((delay * 2).min(backoff.max));
        let at = now + delay;
        self.restart_at = Some(at);
        let why = match &message {
            Some(m) => m.clone(),
            None => format!("exited with code {exit_code}"),
        };
        self.status.state = ContainerState::waiting(
            WaitingReason::CrashLoopBackOff,
            Some(format!(
                "back-off {}s restarting container {} ({why})",
                delay.as_secs_f64().ceil() as u64,
                self.status.name
            )),
        );
        Some(at)
    }
}

/// The pod's phase from its containers' tracks, once its VM is up.
pub fn running_phase<'a>(tracks: impl IntoIterator<Item = &'a ContainerTrack>) -> PodPhase {
    let (mut any, mut all_done, mut all_ok) = (false, true, true);
    for t in tracks {
        any = true;
        all_done &= t.is_done();
        all_ok &= matches!(
            t.status.state,
            ContainerState::Terminated { exit_code: 0, .. }
        );
    }
    match (any && all_done, all_ok) {
        (true, true) => PodPhase::Succeeded,
        (true, false) => PodPhase::Failed,
        (false, _) => PodPhase::Running,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use podvisor_proto::StartErrorKind;

    fn track() -> ContainerTrack {
        ContainerTrack::new(ContainerStatus::new("web", "busybox"))
    }

    #[test]
    fn back_off_doubles_up_to_the_cap_and_resets_after_a_long_run() {
        let b = Backoff {
            base: Duration::from_secs(10),
            max: Duration::from_secs(30),
            reset: Duration::from_secs(600),
        };
        let t0 = Instant::now();
        let mut t = track();
        let mut delays = vec![];
        for _ in 0..4 {
            t.starting(true);
            t.started(t0);
            let at = t
                .ended(
                    Ended::Exited(ExitStatus::Code(1)),
                    RestartPolicy::Always,
                    &b,
                    t0,
                )
                .unwrap();
            delays.push((at - t0).as_secs());
        }
        assert_eq!(delays, [10, 20, 30, 30]);
        assert_eq!(t.status.restart_count, 4);
        assert!(matches!(
            &t.status.state,
            ContainerState::Waiting { reason, message: Some(m) }
                if reason == "CrashLoopBackOff" && m == "back-off 30s restarting container web (exited with code 1)"
        ));
        // A run of ten minutes resets the back-off.
        t.starting(true);
        t.started(t0);
        let later = t0 + Duration::from_secs(600);
        let at = t
            .ended(
                Ended::Exited(ExitStatus::Code(0)),
                RestartPolicy::Always,
                &b,
                later,
            )
            .unwrap();
        assert_eq!(at - later, Duration::from_secs(10));
    }

    #[test]
    fn policies_decide_restarts_and_the_phase() {
        let b = Backoff::default();
        let now = Instant::now();
        let mut ok = track();
        ok.started(now);
        assert_eq!(running_phase(std::slice::from_ref(&ok)), PodPhase::Running);
        assert!(
            ok.ended(
                Ended::Exited(ExitStatus::Code(0)),
                RestartPolicy::OnFailure,
                &b,
                now
            )
            .is_none()
        );
        assert!(matches!(
            ok.status.state,
            ContainerState::Terminated { exit_code: 0, ref reason, .. } if reason == "Completed"
        ));
        assert_eq!(
            running_phase(std::slice::from_ref(&ok)),
            PodPhase::Succeeded
        );

        let mut killed = track();
        killed.started(now);
        let how = Ended::Exited(ExitStatus::Signaled {
            signal: 9,
            core_dumped: false,
        });
        assert!(killed.ended(how, RestartPolicy::Never, &b, now).is_none());
        assert!(matches!(
            killed.status.state,
            ContainerState::Terminated {
                exit_code: 137,
                signal: Some(9),
                ..
            }
        ));
        assert_eq!(running_phase(&[ok.clone(), killed]), PodPhase::Failed);

        let mut failing = track();
        let how = Ended::StartFailed(StartError {
            kind: StartErrorKind::NotFound,
            message: "no such file: /bin/nope".into(),
        });
        assert!(
            failing
                .ended(how, RestartPolicy::OnFailure, &b, now)
                .is_some()
        );
        assert!(!failing.is_done());
        assert_eq!(running_phase(&[ok, failing]), PodPhase::Running);
    }
}
