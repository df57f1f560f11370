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
        let rows = [
            ("prepare (image, guest artifacts)", self.prepare),
            ("QEMU start -> kernel", self.vmm_to_kernel),
            ("kernel -> agent started", self.kernel_to_init),
            ("agent: load modules", self.module_loading),
            ("agent: modules -> ready", self.modules_to_ready),
            ("agent ready -> container started", self.container_start),
            ("container run", self.container_run),
            ("exit -> VM gone", self.shutdown),
            ("total", self.total),
        ];
        rows.iter()
            .map(|(name, d)| format!("{name:<34} {:>8.3} s\n", d.as_secs_f64()))
            .collect()
    }
}
