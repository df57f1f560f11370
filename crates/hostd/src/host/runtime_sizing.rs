//! Each container's share of its pod VM, sent to the agent so that it can
//! size the container's language runtime (see `podvisor_proto::runtime`).
//!
//! The VM's memory is the sum of its containers' memory (limits, else
//! requests), so a container's share is its memory over that sum. A
//! container that states none gets as much as the average container that
//! does (all alike when none does). Its CPUs are its CPU limit (else
//! request) rounded up; none stated: the whole VM's.

use podvisor_proto::RuntimeSizing;
use podvisor_proto::runtime::WHOLE_VM_PPM;

use super::plan::PodPlan;

/// The sizing of each container of `plan`, in order; all `None` when the
/// pod turned runtime profiles off.
pub fn runtime_sizing(plan: &PodPlan) -> Vec<Option<RuntimeSizing>> {
    if !plan.size_runtimes {
        return vec![None; plan.containers.len()];
    }
    let stated: Vec<u64> = plan
        .containers
        .iter()
        .filter_map(|c| c.memory_bytes)
        .collect();
    let fill = match stated.len() {
        0 => 1,
        n => (stated.iter().map(|&b| u128::from(b)).sum::<u128>() / n as u128).max(1) as u64,
    };
    let weights: Vec<u128> = plan
        .containers
        .iter()
        .map(|c| u128::from(c.memory_bytes.unwrap_or(fill).max(1)))
        .collect();
    let total: u128 = weights.iter().sum::<u128>().max(1);
    plan.containers
        .iter()
        .zip(weights)
        .map(|(c, w)| {
            Some(RuntimeSizing {
                memory_share_ppm: (w * u128::from(WHOLE_VM_PPM) / total) as u32,
                cpus: c
                    .millicores
                    .map(|m| m.div_ceil(1000).clamp(1, u64::from(u32::MAX)) as u32),
                ..RuntimeSizing::whole_vm()
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::plan::RestartPolicy;
    use crate::host::tests::plan;

    fn plan_with(containers: &[&str]) -> PodPlan {
        plan("u1", containers, RestartPolicy::Never)
    }

    const MIB: u64 = 1 << 20;

    fn shares(plan: &PodPlan) -> Vec<(u32, Option<u32>)> {
        runtime_sizing(plan)
            .into_iter()
            .map(|s| {
                let s = s.unwrap();
                (s.memory_share_ppm, s.cpus)
            })
            .collect()
    }

    #[test]
    fn one_container_gets_the_whole_vm() {
        let plan = plan_with(&["app"]);
        assert_eq!(shares(&plan), vec![(WHOLE_VM_PPM, None)]);
    }

    #[test]
    fn containers_share_by_their_memory_and_keep_their_cpus() {
        let mut plan = plan_with(&["app", "sidecar", "free"]);
        plan.containers[0].memory_bytes = Some(768 * MIB);
        plan.containers[0].millicores = Some(1500);
        plan.containers[1].memory_bytes = Some(256 * MIB);
        // "free" states nothing: it counts as the average (512 MiB).
        let s = shares(&plan);
        assert_eq!(s[0], (500_000, Some(2)));
        assert_eq!(s[1], (166_666, None));
        assert_eq!(s[2], (333_333, None));
    }

    #[test]
    fn the_annotation_turns_sizing_off() {
        let mut plan = plan_with(&["a", "b"]);
        plan.size_runtimes = false;
        assert_eq!(runtime_sizing(&plan), vec![None, None]);
    }
}
