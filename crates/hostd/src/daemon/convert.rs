//! Between the REST object model ([`podvisor_api`]) and the host runtime:
//! a Pod object becomes a [`PodPlan`], a [`PodState`] becomes a PodStatus.

use std::time::SystemTime;

use chrono::{DateTime, Utc};
use podvisor_api as api;

use podvisor_net::host_ports::{PortMapping, Protocol};
use podvisor_podvm::network::{DnsOption, DnsPolicy, HostAlias, PodDns, PodDnsConfig};

use crate::host::plan::vm_size;
use crate::host::status::reasons;
use crate::host::volumes::{DEFAULT_EMPTY_DIR_BYTES, MountPlan, VolumePlan, VolumeSource};
use crate::host::{ContainerPlan, ContainerState, PodPhase, PodPlan, PodState, RestartPolicy};

/// Why a pod cannot run on this host; reported as the pod's status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Unrunnable {
    pub reason: UnrunnableReason,
    pub message: String,
}

reasons! {
    /// The word for the status of a pod that cannot run here.
    UnrunnableReason {
        /// The pod object is not one the host can run (no uid, bad sizes).
        InvalidPod = "InvalidPod",
        /// It asks for what podvisor's host daemon does not do yet.
        Unsupported = "Unsupported",
    }
}

fn unrunnable(reason: UnrunnableReason, message: String) -> Unrunnable {
    Unrunnable { reason, message }
}

/// The plan for running `pod` here.
pub fn plan_from_pod(pod: &api::Pod) -> Result<PodPlan, Unrunnable> {
    let uid = pod
        .metadata
        .uid
        .clone()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| {
            unrunnable(
                UnrunnableReason::InvalidPod,
                format!("pod {} has no uid", pod.key()),
            )
        })?;
    let port_mappings = port_mappings(pod)?;
    let dns = pod_dns(pod)?;
    let invalid = |e: String| {
        unrunnable(
            UnrunnableReason::InvalidPod,
            format!("pod {}: {e}", pod.key()),
        )
    };
    let size = pod.spec.vm_size().map_err(|e| invalid(e.to_string()))?;
    let (cpus, memory_mib) = vm_size(size.cpu, size.memory);
    let volumes = volumes(pod)?;
    let isolated = api::isolated(&pod.metadata).map_err(invalid)?;
    let size_runtimes = api::runtime_profile(&pod.metadata).map_err(invalid)?;
    let hibernate_after = api::hibernate_after(&pod.metadata).map_err(invalid)?;
    Ok(PodPlan {
        hibernate_after,
        isolated,
        uid,
        namespace: pod.metadata.namespace().to_string(),
        name: pod.metadata.name.clone(),
        containers: pod
            .spec
            .containers
            .iter()
            .map(|c| ContainerPlan {
                name: c.name.clone(),
                image: c.image.clone(),
                command: c.command.clone(),
                args: c.args.clone(),
                env: c
                    .env
                    .iter()
                    .map(|e| (e.name.clone(), e.value.clone()))
                    .collect(),
                working_dir: c.working_dir.clone(),
                tty: c.tty,
                stdin: c.stdin,
                volume_mounts: c
                    .volume_mounts
                    .iter()
                    .map(|m| MountPlan {
                        volume: m.name.clone(),
                        path: m.mount_path.clone(),
                        read_only: m.read_only,
                        sub_path: (!m.sub_path.is_empty()).then(|| m.sub_path.clone()),
                    })
                    .collect(),
                memory_bytes: c.memory_bytes().ok().flatten(),
                millicores: c.millicores().ok().flatten(),
            })
            .collect(),
        restart_policy: match pod.spec.restart_policy {
            api::RestartPolicy::Always => RestartPolicy::Always,
            api::RestartPolicy::OnFailure => RestartPolicy::OnFailure,
            api::RestartPolicy::Never => RestartPolicy::Never,
        },
        cpus,
        memory_mib,
        port_mappings,
        dns,
        volumes,
        size_runtimes,
    })
}

/// The pod's volumes as the host runs them.
fn volumes(pod: &api::Pod) -> Result<Vec<VolumePlan>, Unrunnable> {
    let invalid = |message: String| unrunnable(UnrunnableReason::InvalidPod, message);
    pod.spec
        .volumes
        .iter()
        .map(|v| {
            let source = match (&v.empty_dir, &v.persistent_volume_claim) {
                (Some(e), None) => {
                    let size = match &e.size_limit {
                        Some(q) => Some(q.bytes().map_err(|err| {
                            invalid(format!(
                                "pod {}: volume {}: sizeLimit: {err}",
                                pod.key(),
                                v.name
                            ))
                        })?),
                        None => None,
                    };
                    match e.medium.as_str() {
                        "Memory" => VolumeSource::Memory { size_bytes: size },
                        _ => VolumeSource::ScratchDisk {
                            size_bytes: size.unwrap_or(DEFAULT_EMPTY_DIR_BYTES),
                        },
                    }
                }
                (None, Some(c)) => VolumeSource::Claim {
                    claim: c.claim_name.clone(),
                    read_only: c.read_only,
                },
                _ => {
                    return Err(invalid(format!(
                        "pod {}: volume {} needs exactly one of emptyDir and \
                         persistentVolumeClaim",
                        pod.key(),
                        v.name
                    )));
                }
            };
            Ok(VolumePlan {
                name: v.name.clone(),
                source,
            })
        })
        .collect()
}

/// `dnsPolicy`, `dnsConfig` and `hostAliases` for the pod VM (merged with
/// the pod network's DNS by [`podvisor_podvm::network::apply_pod_dns`]).
/// The API has checked the addresses.
fn pod_dns(pod: &api::Pod) -> Result<PodDns, Unrunnable> {
    let ip = |field: String, text: &str| {
        text.parse::<std::net::IpAddr>().map_err(|_| {
            unrunnable(
                UnrunnableReason::InvalidPod,
                format!("{field}: {text:?} is not an IP address"),
            )
        })
    };
    let spec = &pod.spec;
    let config = match &spec.dns_config {
        None => None,
        Some(c) => Some(PodDnsConfig {
            nameservers: c
                .nameservers
                .iter()
                .enumerate()
                .map(|(i, ns)| ip(format!("spec.dnsConfig.nameservers[{i}]"), ns))
                .collect::<Result<_, _>>()?,
            searches: c.searches.clone(),
            options: c
                .options
                .iter()
                .map(|o| DnsOption {
                    name: o.name.clone(),
                    value: o.value.clone(),
                })
                .collect(),
        }),
    };
    let host_aliases = spec
        .host_aliases
        .iter()
        .enumerate()
        .map(|(i, a)| {
            Ok(HostAlias {
                ip: ip(format!("spec.hostAliases[{i}].ip"), &a.ip)?,
                hostnames: a.hostnames.clone(),
            })
        })
        .collect::<Result<_, Unrunnable>>()?;
    Ok(PodDns {
        policy: match spec.dns_policy {
            api::DnsPolicy::ClusterFirst => DnsPolicy::ClusterFirst,
            api::DnsPolicy::ClusterFirstWithHostNet => DnsPolicy::ClusterFirstWithHostNet,
            api::DnsPolicy::Default => DnsPolicy::Default,
            api::DnsPolicy::None => DnsPolicy::None,
        },
        merge: Default::default(),
        config,
        host_aliases,
    })
}

/// The pod's `hostPort`s as CNI port mappings (to the pod's address on
/// `containerPort`). The API has refused a port published twice.
fn port_mappings(pod: &api::Pod) -> Result<Vec<PortMapping>, Unrunnable> {
    let mut out = Vec::new();
    for (i, c) in pod.spec.containers.iter().enumerate() {
        for (j, p) in c.ports.iter().enumerate() {
            let Some(host_port) = p.host_port else {
                continue;
            };
            let mapping = PortMapping {
                host_port,
                container_port: p.container_port,
                protocol: match p.protocol.unwrap_or_default() {
                    api::Protocol::Tcp => Protocol::Tcp,
                    api::Protocol::Udp => Protocol::Udp,
                },
                host_ip: match &p.host_ip {
                    None => None,
                    Some(ip) => Some(ip.parse().map_err(|_| {
                        unrunnable(
                            UnrunnableReason::InvalidPod,
                            format!("spec.containers[{i}].ports[{j}].hostIP: {ip:?} is not an IP address"),
                        )
                    })?),
                },
            };
            mapping.validate().map_err(|e| {
                unrunnable(
                    UnrunnableReason::InvalidPod,
                    format!("spec.containers[{i}].ports[{j}]: {e}"),
                )
            })?;
            out.push(mapping);
        }
    }
    Ok(out)
}

fn time(t: SystemTime) -> DateTime<Utc> {
    DateTime::<Utc>::from(t)
}

/// The pod status to report for `state`.
pub fn status_from_state(state: &PodState, host_ip: Option<&str>) -> api::PodStatus {
    // IPv4 first, as Kubernetes lists them.
    let mut ips = state.pod_ips.clone();
    ips.sort_by_key(|ip| ip.is_ipv6());
    let pod_ips: Vec<api::PodIp> = ips
        .iter()
        .map(|ip| api::PodIp { ip: ip.to_string() })
        .collect();
    api::PodStatus {
        phase: match state.phase {
            PodPhase::Pending => api::PodPhase::Pending,
            PodPhase::Running => api::PodPhase::Running,
            PodPhase::Succeeded => api::PodPhase::Succeeded,
            PodPhase::Failed => api::PodPhase::Failed,
        },
        reason: state.reason.map(|r| r.to_string()),
        message: state.message.clone(),
        host_ip: host_ip.map(str::to_string),
        pod_ip: pod_ips.first().map(|p| p.ip.clone()),
        pod_ips,
        start_time: state.started_at.map(time),
        container_statuses: state
            .containers
            .iter()
            .map(|c| api::ContainerStatus {
                name: c.name.clone(),
                image: c.image.clone(),
                ready: c.ready(),
                restart_count: c.restart_count,
                state: container_state(&c.state),
                runtime_profile: c.runtime_profile.as_ref().map(|p| api::RuntimeProfile {
                    runtime: p.runtime.clone(),
                    settings: p.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                    reasons: p.reasons.clone(),
                }),
            })
            .collect(),
        conditions: state
            .hibernation
            .iter()
            .map(|h| api::PodCondition {
                type_: api::HIBERNATED_CONDITION.into(),
                status: if h.asleep { "True" } else { "False" }.into(),
                reason: Some(h.reason.clone()),
                message: Some(h.message.clone()),
                last_transition_time: Some(time(h.since)),
            })
            .collect(),
    }
}

fn container_state(s: &ContainerState) -> api::ContainerState {
    let mut out = api::ContainerState::default();
    match s {
        ContainerState::Waiting { reason, message } => {
            out.waiting = Some(api::ContainerStateWaiting {
                reason: reason.to_string(),
                message: message.clone(),
            });
        }
        ContainerState::Running { started_at } => {
            out.running = Some(api::ContainerStateRunning {
                started_at: time(*started_at),
            });
        }
        ContainerState::Terminated {
            exit_code,
            signal,
            reason,
            message,
            started_at,
            finished_at,
        } => {
            out.terminated = Some(api::ContainerStateTerminated {
                exit_code: *exit_code,
                signal: *signal,
                reason: reason.to_string(),
                message: message.clone(),
                started_at: started_at.map(time),
                finished_at: time(*finished_at),
            });
        }
    }
    out
}

/// The status of a pod that cannot run here.
pub fn unrunnable_status(problem: &Unrunnable, host_ip: Option<&str>) -> api::PodStatus {
    api::PodStatus {
        phase: api::PodPhase::Failed,
        reason: Some(problem.reason.to_string()),
        message: Some(problem.message.clone()),
        host_ip: host_ip.map(str::to_string),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::ContainerStatus;

    fn pod(yaml: &str) -> api::Pod {
        let mut pod = api::parse_pod(yaml, api::Format::Yaml).unwrap();
        pod.metadata.uid = Some("u-1".into());
        pod
    }

    #[test]
    fn a_pod_becomes_a_plan_with_its_vm_size() {
        let p = pod("
apiVersion: v1
kind: Pod
metadata: {name: web, namespace: shop}
spec:
  restartPolicy: OnFailure
  containers:
  - name: app
    image: busybox
    command: [sh, -c]
    args: [echo hi]
    env: [{name: A, value: '1'}]
    workingDir: /srv
    resources: {limits: {cpu: 500m, memory: 96Mi}}
  - name: side
    image: busybox
    resources: {requests: {cpu: '1', memory: 64Mi}}
");
        let plan = plan_from_pod(&p).unwrap();
        assert_eq!(plan.key(), "shop/web");
        assert_eq!(plan.uid, "u-1");
        assert_eq!(plan.restart_policy, RestartPolicy::OnFailure);
        assert_eq!((plan.cpus, plan.memory_mib), (2, 160));
        let app = &plan.containers[0];
        assert_eq!(
            app.command.as_deref(),
            Some(&["sh".to_string(), "-c".into()][..])
        );
        assert_eq!(app.args.as_deref(), Some(&["echo hi".to_string()][..]));
        assert_eq!(app.env, [("A".to_string(), "1".to_string())]);
        assert_eq!(app.working_dir.as_deref(), Some("/srv"));
    }

    #[test]
    fn host_ports_become_port_mappings() {
        let p = pod("
metadata: {name: web}
spec:
  containers:
  - name: app
    image: busybox
    ports: [{containerPort: 80, hostPort: 8080}, {containerPort: 53, hostPort: 5353, protocol: UDP}, {containerPort: 9090}]
");
        let plan = plan_from_pod(&p).unwrap();
        let shown: Vec<String> = plan.port_mappings.iter().map(|m| m.to_string()).collect();
        assert_eq!(shown, ["8080->80/tcp", "5353->53/udp"]);
    }

    #[test]
    fn dns_settings_reach_the_plan_and_the_guest_config() {
        use podvisor_podvm::network::{apply_pod_dns, no_network};
        let p = pod("
metadata: {name: web}
spec:
  containers: [{name: app, image: busybox}]
  dnsPolicy: None
  dnsConfig:
    nameservers: [192.0.2.53]
    searches: [corp.example]
    options: [{name: ndots, value: '2'}, {name: edns0}]
  hostAliases: [{ip: 192.0.2.7, hostnames: [db.test, db]}]
");
        let plan = plan_from_pod(&p).unwrap();
        assert_eq!(plan.dns.policy, DnsPolicy::None);
        let mut config = no_network(&plan.hostname());
        assert!(apply_pod_dns(&mut config, &plan.dns).is_empty());
        assert_eq!(
            config.dns.nameservers,
            ["192.0.2.53".parse::<std::net::IpAddr>().unwrap()]
        );
        assert_eq!(config.dns.search, ["corp.example"]);
        assert_eq!(config.dns.options, ["ndots:2", "edns0"]);
        let last = config.hosts.last().unwrap();
        assert_eq!(last.address.to_string(), "192.0.2.7");
        assert_eq!(last.names, ["db.test", "db"]);
        // A pod that states nothing is ClusterFirst: the base as it is.
        let plan = plan_from_pod(&pod("
metadata: {name: web}
spec:
  containers: [{name: app, image: busybox}]
"))
        .unwrap();
        assert_eq!(plan.dns, PodDns::default());
    }

    #[test]
    fn states_become_statuses() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let mut waiting = ContainerStatus::new("a", "busybox");
        waiting.restart_count = 2;
        let state = PodState {
            phase: PodPhase::Running,
            reason: None,
            message: None,
            started_at: Some(t),
            pod_ips: vec![],
            hibernation: None,
            containers: vec![
                waiting,
                ContainerStatus {
                    name: "b".into(),
                    image: "busybox".into(),
                    restart_count: 0,
                    state: ContainerState::Running { started_at: t },
                    runtime_profile: None,
                },
            ],
        };
        let s = status_from_state(&state, Some("127.0.0.1"));
        assert_eq!(s.phase, api::PodPhase::Running);
        assert_eq!(s.host_ip.as_deref(), Some("127.0.0.1"));
        assert_eq!(s.container_statuses[0].restart_count, 2);
        assert!(!s.container_statuses[0].ready);
        assert_eq!(
            s.container_statuses[0]
                .state
                .waiting
                .as_ref()
                .unwrap()
                .reason,
            "ContainerCreating"
        );
        assert!(s.container_statuses[1].ready);
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(
            json["containerStatuses"][1]["state"]["running"]["startedAt"],
            "2023-11-14T22:13:20Z"
        );
    }

    #[test]
    fn a_hibernated_pod_has_the_hibernated_condition() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_700_000_000);
        let mut state = PodState {
            phase: PodPhase::Running,
            hibernation: Some(crate::host::hibernation::HibernationStatus {
                asleep: true,
                since: t,
                reason: "Idle".into(),
                message: "snapshot 15.1 MiB of 192 MiB guest memory".into(),
            }),
            ..Default::default()
        };
        let s = status_from_state(&state, None);
        assert!(s.is_hibernated());
        let c = s.condition(api::HIBERNATED_CONDITION).unwrap();
        assert_eq!(
            (c.status.as_str(), c.reason.as_deref()),
            ("True", Some("Idle"))
        );
        assert_eq!(c.last_transition_time, Some(time(t)));
        state.hibernation.as_mut().unwrap().asleep = false;
        let s = status_from_state(&state, None);
        assert!(!s.is_hibernated());
        assert_eq!(
            s.condition(api::HIBERNATED_CONDITION).unwrap().status,
            "False"
        );
        state.hibernation = None;
        assert!(status_from_state(&state, None).conditions.is_empty());
    }

    #[test]
    fn the_hibernate_after_annotation_becomes_the_plans_idle_time() {
        let mut pod: api::Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "uid": "u-1",
                         "annotations": {"podvisor.io/hibernate-after": "1m30s"}},
            "spec": {"containers": [{"name": "main", "image": "busybox"}]}
        }))
        .unwrap();
        let plan = plan_from_pod(&pod).unwrap();
        assert_eq!(
            plan.hibernate_after,
            Some(std::time::Duration::from_secs(90))
        );
        pod.metadata
            .annotations
            .insert(api::HIBERNATE_AFTER_ANNOTATION.into(), "soon".into());
        let e = plan_from_pod(&pod).unwrap_err();
        assert_eq!(e.reason, UnrunnableReason::InvalidPod);
        assert!(e.message.contains("soon"), "{}", e.message);
    }

    #[test]
    fn the_isolated_annotation_becomes_the_plans_isolation() {
        let mut pod: api::Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web", "uid": "u-1"},
            "spec": {"containers": [{"name": "main", "image": "busybox"}]}
        }))
        .unwrap();
        assert!(!plan_from_pod(&pod).unwrap().isolated);
        let mut annotate = |value: &str| {
            pod.metadata
                .annotations
                .insert(api::ISOLATED_ANNOTATION.into(), value.into());
            plan_from_pod(&pod)
        };
        assert!(annotate("true").unwrap().isolated);
        assert!(!annotate("false").unwrap().isolated);
        let e = annotate("yes").unwrap_err();
        assert_eq!(e.reason, UnrunnableReason::InvalidPod);
        assert!(e.message.contains("yes"), "{}", e.message);
    }
}
