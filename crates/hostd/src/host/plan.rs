//! What the host daemon is asked to run: a pod as this crate sees it,
//! independent of the REST object model it came from.

use podvisor_net::host_ports::PortMapping;
use podvisor_podvm::ContainerOverrides;
use podvisor_podvm::network::PodDns;
use podvisor_proto::TerminalSize;
use serde::{Deserialize, Serialize};

/// Terminal size of a container or exec with `tty` before any resize.
pub const DEFAULT_TERMINAL: TerminalSize = TerminalSize { rows: 24, cols: 80 };

/// One pod to run in one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodPlan {
    /// The pod object's uid: names the pod's records on this host.
    pub uid: String,
    pub namespace: String,
    pub name: String,
    pub containers: Vec<ContainerPlan>,
    pub restart_policy: RestartPolicy,
    /// vCPUs of the pod VM.
    pub cpus: u32,
    /// RAM of the pod VM.
    pub memory_mib: u64,
    /// The pod's `hostPort`s.
    #[serde(default)]
    pub port_mappings: Vec<PortMapping>,
    /// `dnsPolicy`, `dnsConfig` and `hostAliases` (records written before
    /// they existed load as a pod that states none).
    #[serde(default)]
    pub dns: PodDns,
    /// Hibernate the pod after this long without use (its
    /// `podvisor.io/hibernate-after` annotation).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hibernate_after: Option<std::time::Duration>,
    /// The pod's volumes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<super::volumes::VolumePlan>,
    /// Size the containers' language runtimes to their share of the VM
    /// (false: the pod's `podvisor.io/runtime-profile: none`).
    #[serde(default = "size_runtimes_by_default")]
    pub size_runtimes: bool,
    /// The pod shares no memory with other pods (its
    /// `podvisor.io/isolated: "true"` annotation): its layers are on
    /// virtio-blk, never mapped from the host's page cache; no JVM
    /// archive, no KSM.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub isolated: bool,
}

fn size_runtimes_by_default() -> bool {
    true
}

/// One container of a pod, with Kubernetes' meaning of each field.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerPlan {
    pub name: String,
    /// Image reference, or the path of an OCI layout or archive.
    pub image: String,
    /// Replaces the image's entrypoint (and then drops its cmd, unless
    /// `args` is given too).
    pub command: Option<Vec<String>>,
    /// Replaces the image's cmd.
    pub args: Option<Vec<String>>,
    /// `(name, value)` pairs added to or replacing the image's environment.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    /// Give the container a terminal.
    pub tty: bool,
    /// Keep the container's stdin open.
    pub stdin: bool,
    /// The pod volumes it mounts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<super::volumes::MountPlan>,
    /// Its memory limit (else request) in bytes, if it states one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_bytes: Option<u64>,
    /// Its CPU limit (else request) in millicores, if it states one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub millicores: Option<u64>,
}

impl ContainerPlan {
    /// Container `name` running `image` as its config says, nothing
    /// overridden, no resources stated.
    pub fn of_image(name: &str, image: &str) -> ContainerPlan {
        ContainerPlan {
            name: name.into(),
            image: image.into(),
            command: None,
            args: None,
            env: vec![],
            working_dir: None,
            tty: false,
            stdin: false,
            volume_mounts: vec![],
            memory_bytes: None,
            millicores: None,
        }
    }

    /// The container's fields as overrides of its image config.
    pub fn overrides(&self) -> ContainerOverrides {
        ContainerOverrides {
            entrypoint: self.command.clone(),
            cmd: self.args.clone(),
            env: self.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            workdir: self.working_dir.clone(),
            user: None,
            terminal: self.tty.then_some(DEFAULT_TERMINAL),
            stdin: self.stdin,
        }
    }
}

/// When a container that exited is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

impl RestartPolicy {
    /// Whether a container that ended with `exit_code` is started again.
    pub fn restarts(self, exit_code: i32) -> bool {
        match self {
            RestartPolicy::Always => true,
            RestartPolicy::OnFailure => exit_code != 0,
            RestartPolicy::Never => false,
        }
    }
}

/// Smallest pod VM podvisor boots: the guest kernel and agent need about
/// this much before any container runs.
pub const MIN_VM_MEMORY_MIB: u64 = 128;

/// The pod VM's size from the pod's resources (millicores, bytes): whole
/// vCPUs rounded up, memory in MiB rounded up, at least
/// [`MIN_VM_MEMORY_MIB`].
pub fn vm_size(millicores: u64, memory_bytes: u64) -> (u32, u64) {
    let cpus = millicores.div_ceil(1000).clamp(1, 64) as u32;
    let mib = memory_bytes.div_ceil(1 << 20).max(MIN_VM_MEMORY_MIB);
    (cpus, mib)
}

impl PodPlan {
    /// Pod `uid` (also its name, in `default`) of `containers`, in a VM of
    /// one vCPU and `memory_mib`, never restarted, with nothing else set.
    pub fn of_containers(uid: &str, containers: Vec<ContainerPlan>, memory_mib: u64) -> PodPlan {
        PodPlan {
            uid: uid.into(),
            namespace: "default".into(),
            name: uid.into(),
            containers,
            restart_policy: RestartPolicy::Never,
            cpus: 1,
            memory_mib,
            port_mappings: vec![],
            dns: Default::default(),
            hibernate_after: None,
            volumes: vec![],
            size_runtimes: true,
            isolated: false,
        }
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The hostname of the pod's containers: the pod's name, cut to the 64
    /// bytes Linux allows.
    pub fn hostname(&self) -> String {
        let mut h = self.name.clone();
        while h.len() > 64 {
            h.pop();
        }
        h
    }

    /// A short id for the pod VM, its run directory and its QEMU process
    /// name: up to 16 letters and digits of the uid (unix socket paths under
    /// it must stay short).
    pub fn vm_id(&self) -> String {
        let id: String = self
            .uid
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(16)
            .collect::<String>()
            .to_ascii_lowercase();
        if id.is_empty() { "pod".into() } else { id }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_policies() {
        assert!(RestartPolicy::Always.restarts(0));
        assert!(RestartPolicy::OnFailure.restarts(1));
        assert!(!RestartPolicy::OnFailure.restarts(0));
        assert!(!RestartPolicy::Never.restarts(137));
    }

    #[test]
    fn vm_size_rounds_up_and_has_a_floor() {
        assert_eq!(vm_size(500, 64 << 20), (1, 128));
        assert_eq!(vm_size(1500, (192 << 20) + 1), (2, 193));
        assert_eq!(vm_size(0, 0), (1, 128));
    }

    #[test]
    fn vm_id_is_short_and_safe() {
        let plan = PodPlan {
            uid: "6F1c0e3a-1b2c-4d5e-8f90-123456789abc".into(),
            namespace: "default".into(),
            name: "web".into(),
            containers: vec![],
            restart_policy: RestartPolicy::Always,
            cpus: 1,
            memory_mib: 128,
            port_mappings: vec![],
            dns: PodDns::default(),
            hibernate_after: None,
            isolated: false,
            volumes: vec![],
            size_runtimes: true,
        };
        assert_eq!(plan.vm_id(), "6f1c0e3a1b2c4d5e");
        assert_eq!(plan.key(), "default/web");
    }

    #[test]
    fn a_plan_recorded_before_dns_settings_loads() {
        let old = r#"{"uid":"u","namespace":"default","name":"web","containers":[],
            "restart_policy":"Always","cpus":1,"memory_mib":128}"#;
        let plan: PodPlan = serde_json::from_str(old).unwrap();
        assert_eq!(plan.dns, PodDns::default());
        assert!(!plan.isolated);
    }
}
