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
    /// Guest kernel start until the agent was ready (the guest's uptime when
    /// it said so): kernel boot, module loading, agent start.
    pub kernel_to_agent: Duration,
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
    /// One line per stage, for humans.
    pub fn render(&self) -> String {
        let rows = [
            ("prepare (image, guest artifacts)", self.prepare),
            ("QEMU start -> kernel", self.vmm_to_kernel),
            ("kernel -> agent ready", self.kernel_to_agent),
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
