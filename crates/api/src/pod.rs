//! The Pod object: the Kubernetes fields podvisor supports, no others (an
//! unknown field is an error, see [`crate::parse`]).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use chrono::{DateTime, Utc};

use crate::meta::{ListMeta, ObjectMeta};
use crate::quantity::{Quantity, QuantityError};

/// CPU of a pod VM whose containers state no resources: 1 CPU.
pub const DEFAULT_POD_MILLICORES: u64 = 1000;
/// Memory of a pod VM whose containers state no resources: 256 MiB.
pub const DEFAULT_POD_MEMORY: u64 = 256 << 20;

/// A pod: containers that run together in one pod VM on one host.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Pod {
    /// `v1`.
    #[serde(default = "v1")]
    pub api_version: String,
    /// `Pod`.
    #[serde(default = "pod_kind")]
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    pub spec: PodSpec,
    /// Written by the host running the pod (and by the server for pods that
    /// cannot be scheduled or whose host was lost). Ignored on create.
    #[serde(default)]
    pub status: PodStatus,
}

fn v1() -> String {
    "v1".into()
}
fn pod_kind() -> String {
    "Pod".into()
}

/// What the user asks for.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodSpec {
    pub containers: Vec<Container>,
    #[serde(default)]
    pub restart_policy: RestartPolicy,
    /// The host that runs the pod: set by the user to pin it, else by the
    /// scheduler.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Where the containers' `resolv.conf` starts from. podvisor has no
    /// cluster DNS service: `ClusterFirst` (the default) and
    /// `ClusterFirstWithHostNet` are `Default` there, as for a kubelet
    /// without `clusterDNS`.
    #[serde(default)]
    pub dns_policy: DnsPolicy,
    /// Resolver settings merged into those of `dnsPolicy` (all of them
    /// with `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns_config: Option<PodDnsConfig>,
    /// Extra `/etc/hosts` lines, after the pod's own.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub host_aliases: Vec<HostAlias>,
    /// The pod's volumes, which its containers mount by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volumes: Vec<crate::volume::Volume>,
}

/// A pod's DNS policy, as in Kubernetes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum DnsPolicy {
    /// The cluster's DNS service; without one (podvisor), as `Default`.
    /// An empty value means this, as Kubernetes' defaulting does.
    #[default]
    #[serde(alias = "")]
    ClusterFirst,
    /// As `ClusterFirst` (podvisor runs no `hostNetwork` pods).
    ClusterFirstWithHostNet,
    /// The node's resolvers (the pod network's DNS, else the host's).
    Default,
    /// Only `dnsConfig`.
    None,
}

impl DnsPolicy {
    pub fn as_str(self) -> &'static str {
        match self {
            DnsPolicy::ClusterFirst => "ClusterFirst",
            DnsPolicy::ClusterFirstWithHostNet => "ClusterFirstWithHostNet",
            DnsPolicy::Default => "Default",
            DnsPolicy::None => "None",
        }
    }
}

/// A pod's own resolver settings (`spec.dnsConfig`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodDnsConfig {
    /// Nameserver IP addresses, at most 3 (with the policy's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    /// Search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub searches: Vec<String>,
    /// Resolver options; one the policy has too takes this value.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<PodDnsConfigOption>,
}

/// One resolver option (`ndots` with value `"2"`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodDnsConfigOption {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

/// Host names for an IP address, written into the pod's `/etc/hosts`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HostAlias {
    #[serde(default)]
    pub ip: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hostnames: Vec<String>,
}

/// When the host restarts a container that exited.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

/// One container of a pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Container {
    pub name: String,
    pub image: String,
    /// Replaces the image's entrypoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    /// Replaces the image's cmd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub args: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ports: Vec<ContainerPort>,
    #[serde(default, skip_serializing_if = "ResourceRequirements::is_empty")]
    pub resources: ResourceRequirements,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tty: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stdin: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub volume_mounts: Vec<crate::volume::VolumeMount>,
}

/// An environment variable with a literal value.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EnvVar {
    pub name: String,
    #[serde(default)]
    pub value: String,
}

/// A port the container listens on; `hostPort` publishes it on the host.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerPort {
    pub container_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<Protocol>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_port: Option<u16>,
    /// The host address `hostPort` is published on; all of the host's
    /// addresses when unset.
    #[serde(default, rename = "hostIP", skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// Transport protocol of a port.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

/// A port a pod publishes on its host: a host-wide resource, which two
/// pods on one host cannot both hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HostPort {
    pub protocol: Protocol,
    /// `None`: every address of the host.
    pub ip: Option<std::net::IpAddr>,
    pub port: u16,
}

impl HostPort {
    /// Whether `self` and `other` cannot both be published on one host:
    /// the same protocol and port, on the same address or where either
    /// takes every address (as Kubernetes' scheduler decides).
    pub fn conflicts_with(&self, other: &HostPort) -> bool {
        self.protocol == other.protocol
            && self.port == other.port
            && (self.ip.is_none_or(|ip| ip.is_unspecified())
                || other.ip.is_none_or(|ip| ip.is_unspecified())
                || self.ip == other.ip)
    }
}

impl std::fmt::Display for HostPort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.ip {
            Some(std::net::IpAddr::V6(ip)) => write!(f, "[{ip}]:")?,
            Some(ip) => write!(f, "{ip}:")?,
            None => {}
        }
        write!(f, "{}/{}", self.port, self.protocol)
    }
}

/// Requests and limits of CPU and memory.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceRequirements {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub requests: Option<ResourceList>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits: Option<ResourceList>,
}

impl ResourceRequirements {
    fn is_empty(&self) -> bool {
        self.requests.is_none() && self.limits.is_none()
    }
}

/// CPU and memory quantities.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ResourceList {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

/// CPU (millicores) and memory (bytes) of a pod VM.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct Resources {
    /// Millicores.
    pub cpu: u64,
    /// Bytes.
    pub memory: u64,
}

impl Container {
    /// A resource's limit, else its request.
    fn resource(&self, pick: fn(&ResourceList) -> Option<&Quantity>) -> Option<&Quantity> {
        self.resources
            .limits
            .as_ref()
            .and_then(pick)
            .or_else(|| self.resources.requests.as_ref().and_then(pick))
    }

    /// The container's CPU (its limit, else its request) in millicores, if
    /// it states one.
    pub fn millicores(&self) -> Result<Option<u64>, QuantityError> {
        self.resource(|r| r.cpu.as_ref())
            .map(Quantity::millicores)
            .transpose()
    }

    /// The container's memory (its limit, else its request) in bytes, if
    /// it states one.
    pub fn memory_bytes(&self) -> Result<Option<u64>, QuantityError> {
        self.resource(|r| r.memory.as_ref())
            .map(Quantity::bytes)
            .transpose()
    }
}

impl PodSpec {
    /// The host ports the pod's containers publish. Validation has checked
    /// each `hostIP`; one that is not an address counts as every address.
    pub fn host_ports(&self) -> Vec<HostPort> {
        self.containers
            .iter()
            .flat_map(|c| &c.ports)
            .filter_map(|p| {
                Some(HostPort {
                    protocol: p.protocol.unwrap_or_default(),
                    ip: p.host_ip.as_deref().and_then(|ip| ip.parse().ok()),
                    port: p.host_port?,
                })
            })
            .collect()
    }

    /// The size of the pod's VM, which the scheduler reserves on its host:
    /// per resource, the sum over containers of the limit (else the
    /// request); a resource no container states gets the pod default
    /// (1 CPU, 256 MiB). Quantities are checked by validation; one that
    /// cannot be read here is an error.
    pub fn vm_size(&self) -> Result<Resources, QuantityError> {
        let mut cpu = 0u64;
        let mut memory = 0u64;
        for c in &self.containers {
            cpu = cpu.saturating_add(c.millicores()?.unwrap_or(0));
            memory = memory.saturating_add(c.memory_bytes()?.unwrap_or(0));
        }
        Ok(Resources {
            cpu: if cpu == 0 {
                DEFAULT_POD_MILLICORES
            } else {
                cpu
            },
            memory: if memory == 0 {
                DEFAULT_POD_MEMORY
            } else {
                memory
            },
        })
    }
}

/// What the host reports about a pod.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodStatus {
    #[serde(default)]
    pub phase: PodPhase,
    /// A CamelCase word: `Unschedulable`, `NodeLost`, `ErrImagePull`, ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, rename = "hostIP", skip_serializing_if = "Option::is_none")]
    pub host_ip: Option<String>,
    /// The pod's address on the pod network (the first of `podIPs`).
    #[serde(default, rename = "podIP", skip_serializing_if = "Option::is_none")]
    pub pod_ip: Option<String>,
    /// Every address of the pod on the pod network, IPv4 first.
    #[serde(default, rename = "podIPs", skip_serializing_if = "Vec::is_empty")]
    pub pod_ips: Vec<PodIp>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<DateTime<Utc>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub container_statuses: Vec<ContainerStatus>,
    /// What is true of the pod now, one condition per type (podvisor's:
    /// [`HIBERNATED_CONDITION`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<PodCondition>,
}

/// The type of the condition a host reports while a pod is hibernated
/// (status `True`: its VM's state is saved to disk and its QEMU has
/// exited; it wakes on the first network request, on exec or `logs -f`,
/// or when asked). `lastTransitionTime` is when it went to sleep, the
/// message says what the snapshot holds (`snapshot 15.1 MiB of 192 MiB
/// guest memory`).
pub const HIBERNATED_CONDITION: &str = "Hibernated";

/// One condition of a pod, in Kubernetes' shape: a type, whether it holds
/// (`True`, `False` or `Unknown`), and since when and why.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PodCondition {
    /// What the condition is about: `Hibernated`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase word saying why the condition last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Details for people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// When the status last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<DateTime<Utc>>,
}

impl PodStatus {
    /// The condition of type `type_`, if the pod has one.
    pub fn condition(&self, type_: &str) -> Option<&PodCondition> {
        self.conditions.iter().find(|c| c.type_ == type_)
    }

    /// Puts `condition` in place of the one of its type (or adds it).
    pub fn set_condition(&mut self, condition: PodCondition) {
        match self
            .conditions
            .iter_mut()
            .find(|c| c.type_ == condition.type_)
        {
            Some(c) => *c = condition,
            None => self.conditions.push(condition),
        }
    }

    /// Whether the pod is hibernated: its [`HIBERNATED_CONDITION`] is
    /// `True`.
    pub fn is_hibernated(&self) -> bool {
        self.condition(HIBERNATED_CONDITION)
            .is_some_and(|c| c.status == "True")
    }
}

/// One address of a pod (an entry of `status.podIPs`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct PodIp {
    pub ip: String,
}

/// The lifecycle phase of a pod, as in Kubernetes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub enum PodPhase {
    /// Accepted, not running yet (not scheduled, or starting).
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
    /// The host running the pod stopped reporting.
    Unknown,
}

impl PodPhase {
    /// Succeeded or Failed: the pod's containers will not run again.
    pub fn is_terminal(self) -> bool {
        matches!(self, PodPhase::Succeeded | PodPhase::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PodPhase::Pending => "Pending",
            PodPhase::Running => "Running",
            PodPhase::Succeeded => "Succeeded",
            PodPhase::Failed => "Failed",
            PodPhase::Unknown => "Unknown",
        }
    }
}

/// The state of one container.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerStatus {
    pub name: String,
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub ready: bool,
    #[serde(default)]
    pub restart_count: u32,
    #[serde(default)]
    pub state: ContainerState,
    /// What podvisor set for the container's language runtime and why, as
    /// the guest agent reported it when the container last started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub runtime_profile: Option<RuntimeProfile>,
}

/// The settings chosen for a container's language runtime (a JVM, Go,
/// Node.js, CPython), sized to its share of the pod VM.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RuntimeProfile {
    /// The runtime found, with its version where known (`JVM 17.0.15`).
    pub runtime: String,
    /// The environment set, as `NAME=VALUE`.
    #[serde(default)]
    pub settings: Vec<String>,
    /// What was chosen and why, one line each.
    #[serde(default)]
    pub reasons: Vec<String>,
}

/// At most one of the three is set.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<ContainerStateWaiting>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub running: Option<ContainerStateRunning>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub terminated: Option<ContainerStateTerminated>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerStateWaiting {
    /// `ContainerCreating`, `ErrImagePull`, `CrashLoopBackOff`, ...
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerStateRunning {
    pub started_at: DateTime<Utc>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ContainerStateTerminated {
    pub exit_code: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// `Completed`, `Error`, `OOMKilled`, ...
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: DateTime<Utc>,
}

/// A list of pods and the revision it was read at.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(rename_all = "camelCase")]
pub struct PodList {
    #[serde(default = "v1")]
    pub api_version: String,
    #[serde(default = "pod_list_kind")]
    pub kind: String,
    #[serde(default)]
    pub metadata: ListMeta,
    pub items: Vec<Pod>,
}

/// An empty list with its `apiVersion` and `kind` set, as it is served.
impl Default for PodList {
    fn default() -> PodList {
        PodList {
            api_version: v1(),
            kind: pod_list_kind(),
            metadata: ListMeta::default(),
            items: Vec::new(),
        }
    }
}

fn pod_list_kind() -> String {
    "PodList".into()
}

impl Pod {
    /// A pod with the given name and containers, everything else default
    /// (namespace `default`, restartPolicy Always).
    pub fn new(name: &str, containers: Vec<Container>) -> Pod {
        Pod {
            api_version: v1(),
            kind: pod_kind(),
            metadata: ObjectMeta {
                name: name.to_string(),
                ..Default::default()
            },
            spec: PodSpec {
                containers,
                ..Default::default()
            },
            status: PodStatus::default(),
        }
    }

    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.metadata.namespace(), self.metadata.name)
    }

    /// Containers ready / total, as `get pods` shows it.
    pub fn ready_count(&self) -> (usize, usize) {
        let ready = self
            .status
            .container_statuses
            .iter()
            .filter(|c| c.ready)
            .count();
        (ready, self.spec.containers.len())
    }

    /// Restarts summed over containers.
    pub fn restart_count(&self) -> u32 {
        self.status
            .container_statuses
            .iter()
            .map(|c| c.restart_count)
            .sum()
    }

    /// The STATUS column of `get pods`, as kubectl shows it: `Terminating`
    /// while being deleted, else `Hibernated` while hibernated, else a
    /// waiting/terminated container's reason, else the pod's reason, else
    /// its phase.
    pub fn display_status(&self) -> String {
        if self.metadata.deletion_timestamp.is_some() {
            return "Terminating".into();
        }
        if self.status.is_hibernated() {
            return HIBERNATED_CONDITION.into();
        }
        for c in &self.status.container_statuses {
            if let Some(w) = &c.state.waiting
                && !w.reason.is_empty()
                && w.reason != "ContainerCreating"
            {
                return w.reason.clone();
            }
            if let Some(t) = &c.state.terminated
                && self.status.phase != PodPhase::Succeeded
                && t.exit_code != 0
            {
                return t.reason.clone();
            }
        }
        if let Some(reason) = &self.status.reason {
            return reason.clone();
        }
        if self.status.phase == PodPhase::Succeeded {
            return "Completed".into();
        }
        if self.status.phase == PodPhase::Pending
            && self.spec.node_name.is_some()
            && let Some(w) = self
                .status
                .container_statuses
                .iter()
                .find_map(|c| c.state.waiting.as_ref())
        {
            return w.reason.clone();
        }
        self.status.phase.as_str().into()
    }

    /// Labels as `k=v,k2=v2`.
    pub fn labels_text(&self) -> String {
        labels_text(&self.metadata.labels)
    }
}

/// Labels as `k=v,k2=v2` (`<none>` if empty).
pub fn labels_text(labels: &BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "<none>".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hibernated() -> PodCondition {
        PodCondition {
            type_: HIBERNATED_CONDITION.into(),
            status: "True".into(),
            reason: Some("Idle".into()),
            message: Some("snapshot 15.1 MiB of 192 MiB guest memory".into()),
            last_transition_time: Some("2026-12-07T18:00:00Z".parse().unwrap()),
        }
    }

    #[test]
    fn conditions_have_kubernetes_json_names() {
        let mut status = PodStatus::default();
        assert!(
            !serde_json::to_string(&status)
                .unwrap()
                .contains("conditions"),
            "no conditions, no field"
        );
        status.conditions.push(hibernated());
        let json = serde_json::to_value(&status).unwrap();
        assert_eq!(
            json["conditions"],
            serde_json::json!([{
                "type": "Hibernated",
                "status": "True",
                "reason": "Idle",
                "message": "snapshot 15.1 MiB of 192 MiB guest memory",
                "lastTransitionTime": "2026-12-07T18:00:00Z",
            }])
        );
        let back: PodStatus = serde_json::from_value(json).unwrap();
        assert_eq!(back, status);
        let bare: PodCondition =
            serde_json::from_str(r#"{"type":"Hibernated","status":"False"}"#).unwrap();
        assert_eq!(bare.reason, None);
        assert_eq!(
            serde_json::to_string(&bare).unwrap(),
            r#"{"type":"Hibernated","status":"False"}"#
        );
        let unknown =
            serde_json::from_str::<PodCondition>(r#"{"type":"Ready","status":"True","x":1}"#);
        assert!(unknown.is_err());
    }

    #[test]
    fn a_hibernated_pod_says_so() {
        let mut pod = Pod::new(
            "web",
            vec![Container {
                name: "main".into(),
                image: "busybox".into(),
                ..Default::default()
            }],
        );
        pod.status.phase = PodPhase::Running;
        assert!(!pod.status.is_hibernated());
        assert_eq!(pod.status.condition(HIBERNATED_CONDITION), None);
        pod.status.set_condition(hibernated());
        pod.status.set_condition(PodCondition {
            type_: "Ready".into(),
            status: "False".into(),
            ..Default::default()
        });
        assert!(pod.status.is_hibernated());
        assert_eq!(pod.display_status(), "Hibernated");
        assert_eq!(
            pod.status.condition("Ready").map(|c| c.status.as_str()),
            Some("False")
        );
        // Woken: the same condition, now False; still one of its type.
        pod.status.set_condition(PodCondition {
            status: "False".into(),
            ..hibernated()
        });
        assert_eq!(pod.status.conditions.len(), 2);
        assert!(!pod.status.is_hibernated());
        assert_eq!(pod.display_status(), "Running");
        pod.status.conditions[0].status = "Unknown".into();
        assert!(!pod.status.is_hibernated());
        // Being deleted wins.
        pod.status.conditions[0].status = "True".into();
        pod.metadata.deletion_timestamp = Some(chrono::Utc::now());
        assert_eq!(pod.display_status(), "Terminating");
    }
}
