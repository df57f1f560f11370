//! Pod network namespaces, CNI, and the tap a pod VM's NIC uses: the host
//! side of pod networking (issue 9).
//!
//! Owns: finding (or writing) the CNI network configuration, running the
//! plugins per CNI spec 1.0 ([`cni`]), one pinned network namespace per pod
//! ([`netns`]), the intent records that make attach/detach crash-safe and
//! the host-port registry kept in them ([`pod_network`], [`host_ports`]),
//! the tap + tc redirect joining a VM's NIC to the pod's CNI interface
//! ([`vm_nic`]), and a census of what the host has for leak tests
//! ([`census`]). It knows nothing of VMs, pods' containers or the API.
//!
//! # How the VM side uses it
//!
//! ```no_run
//! # async fn pod_vm() -> Result<(), Box<dyn std::error::Error>> {
//! use podvisor_net::cni::PodIdentity;
//! use podvisor_net::host_ports::{PortMapping, Protocol};
//! use podvisor_net::pod_network::{AttachRequest, PodNetworkConfig, PodNetworks};
//! use podvisor_net::vm_nic::TapMode;
//!
//! // Once per host process (locks the state directory). Defaults:
//! // /etc/cni/net.d, /usr/lib/cni:/opt/cni/bin, /run/podvisor/netns,
//! // /var/lib/podvisor/net; the default network is 10.87.0.0/24 on bridge
//! // podvisor0 when net.d has no configuration.
//! let networks = PodNetworks::open(PodNetworkConfig::default())?;
//!
//! // At start-up (and periodically): DEL everything whose pod is gone,
//! // half-made attachments included. Adopted pods stay.
//! let live: std::collections::HashSet<String> = ["pod-uid-1".to_string()].into();
//! let report = networks.reconcile(&live).await;
//! # let _ = report;
//!
//! // Starting a pod: refused before anything exists if a host port is
//! // taken (the error names the holder), the config is bad or a plugin is
//! // missing; a failed ADD is undone.
//! let pod = networks
//!     .attach(AttachRequest {
//!         id: "pod-uid-1".into(), // CNI_CONTAINERID, namespace and record name
//!         pod: PodIdentity { namespace: "default".into(), name: "web".into(), uid: "pod-uid-1".into() },
//!         port_mappings: vec![PortMapping { host_port: 8080, container_port: 80, protocol: Protocol::Tcp, host_ip: None }],
//!     })
//!     .await?;
//! let pod_ips = pod.pod_ips(); // status.podIP / podIPs
//! # let _ = pod_ips;
//!
//! // The VM's NIC: a tap in the pod's namespace, tc-redirected to and from
//! // eth0. QEMU: `-netdev tap,id=n0,fd=N,vhost=off -device
//! // virtio-net-pci,netdev=n0,mac=<nic.mac_string()>` with `nic.tap_fd`
//! // passed as N (it runs outside the namespace). `guest` is what the agent
//! // applies: MAC, MTU, addresses, gateways, routes, DNS.
//! let (nic, guest) = networks.attach_vm_nic("pod-uid-1", "tap0", TapMode::Fd).await?;
//! # let _ = (nic, guest);
//!
//! // The pod is gone (or its VM was killed): DEL with the stored result
//! // while the namespace still exists, then the namespace and the record.
//! networks.detach("pod-uid-1").await?;
//! # Ok(()) }
//! ```
//!
//! A restore or a template clone that needs a fresh tap in an existing
//! attachment calls [`vm_nic::detach`] then [`PodNetworks::attach_vm_nic`]
//! again; network identity lives in the attachment, never in a template.
//!
//! # Decisions
//!
//! - Plugins get a cleared environment: `CNI_*`, and `PATH` set to the
//!   standard system directories (they run `iptables`; libcni would pass
//!   the runtime's whole environment).
//! - Plugins are killed with podvisor (`PR_SET_PDEATHSIG`), so that none
//!   finishes an ADD after a restarted podvisor reconciled it away.
//! - DEL asks every plugin even after one failed (libcni stops at the
//!   first); the attachment stays recorded until a DEL fully succeeds.
//! - The CNI interface keeps its addresses after the tap takes its frames:
//!   the bridge plugin's DEL reads them there to remove the masquerade.
//! - Records store the network list ADD ran; DEL uses it even if
//!   `/etc/cni/net.d` changed since.
//! - `plugin_quirks` works around two faults of bridge 1.1.1 that
//!   leave masquerade chains when an ADD was cut short.

mod atomic_file;
pub mod census;
pub mod cni;
pub mod host_ports;
pub mod netns;
mod plugin_quirks;
pub mod pod_network;
pub mod vm_nic;
pub mod wake_tap;

pub use pod_network::PodNetworks;
