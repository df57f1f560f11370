//! The time each stage of a pod run took, for `--timings` and benchmarks.

use std::time::Duration;

use serde::Serialize;

/// Stage durations of one `podvisor run`, in order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Timings {
    /// Image import and guest artifacts (cached after the first run).
    pub prepare: Duration,
    /// QEMU process start until the guest kernel started (host time to the
    /// agent's ready message minus the guest's own uptime then).
    pub vmm_to_kernel: Duration,
    /// Guest kernel start until the agent (init) started: the kernel's boot.
    pub kernel_to_init: Duration,
    /// Agent start until its kernel modules (virtio, EROFS, overlay) were
    /// loaded.
    pub module_loading: Duration,
    /// Modules loaded until the agent was ready (devices found, host port
    /// open).
    pub modules_to_ready: Duration,
    /// Agent ready until the container process was started (layer mounts,
    /// namespaces, exec).
    pub container_start: Duration,
    /// Container started until it exited.
    pub container_run: Duration,
    /// Container exit until the VM was gone and its files removed.
    pub shutdown: Duration,
    /// Whole run.
    pub total: Duration,
    /// The VM template the pod was forked from; `None`: booted cold.
    pub forked_from: Option<String>,
    /// Making missing or stale templates for this pod.
    pub template_build: Duration,
    /// Restoring the clone until it had its own identity (instead of the
    /// boot stages).
    pub fork: Duration,
}

impl Timings {
    /// Fills the boot stages from the VMM launch, the moment the agent was
    /// ready (host clock) and the agent's own report (guest uptimes).
    pub fn set_boot(&mut self, since_launch: Duration, agent: &podvisor_proto::AgentInfo) {
        let step = |name: &str| {
            agent
                .boot_steps
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, ms)| Duration::from_millis(*ms))
        };
        let ready = Duration::from_millis(agent.boottime_ms).min(since_launch);
        let init = step("init").unwrap_or(ready).min(ready);
        let modules = step("modules").unwrap_or(init).clamp(init, ready);
        self.vmm_to_kernel = since_launch.saturating_sub(ready);
        self.kernel_to_init = init;
        self.module_loading = modules - init;
        self.modules_to_ready = ready - modules;
    }

    /// One line per stage, for humans.
    pub fn render(&self) -> String {
        let mut rows = vec![("prepare (image, guest artifacts)".to_string(), self.prepare)];
        match &self.forked_from {
            Some(template) => {
                if !self.template_build.is_zero() {
                    rows.push(("make templates on demand".into(), self.template_build));
                }
                rows.push((format!("fork from template {template}"), self.fork));
                rows.push((
                    "clone ready -> container started".into(),
                    self.container_start,
                ));
            }
            None => {
                rows.push(("QEMU start -> kernel".into(), self.vmm_to_kernel));
                rows.push(("kernel -> agent started".into(), self.kernel_to_init));
                rows.push(("agent: load modules".into(), self.module_loading));
                rows.push(("agent: modules -> ready".into(), self.modules_to_ready));
                rows.push((
                    "agent ready -> container started".into(),
                    self.container_start,
                ));
            }
        }
        rows.push(("container run".into(), self.container_run));
        rows.push(("exit -> VM gone".into(), self.shutdown));
        rows.push(("total".into(), self.total));
        rows.iter()
            .map(|(name, d)| format!("{name:<34} {:>8.3} s\n", d.as_secs_f64()))
            .collect()
    }
}
