//! The host↔agent wire protocol, defined once and used by both sides.
//!
//! The host (the `podvm` crate) and the guest agent (PID 1 inside the pod VM)
//! talk over one virtio-serial port named [`AGENT_PORT_NAME`]. Every message
//! travels in a [`frame`]: a fixed header carrying a magic number, the
//! protocol version and the payload length, followed by the payload encoded
//! with `postcard`. The decoder is sans-IO so the single-threaded agent and
//! the async host drive it the same way.
//!
//! The guest is untrusted: [`frame::FrameDecoder`] rejects a bad magic, a
//! foreign version, a payload over [`MAX_PAYLOAD`] or an undecodable payload
//! with a [`ProtoError`] naming the problem, and never allocates more than the
//! size limit for one frame.

pub mod frame;
pub mod messages;
pub mod mounts;
pub mod runtime;
pub mod volumes;

pub use frame::{FrameDecoder, MAX_PAYLOAD, PROTOCOL_VERSION, ProtoError, encode};
pub use messages::*;
pub use mounts::*;
pub use runtime::{AppliedProfile, RuntimeSizing};

/// Largest chunk of stdout/stderr/stdin data the sender puts in one frame.
pub const MAX_CHUNK: usize = 32 * 1024;

/// Name of the virtio-serial port the agent listens on; the guest finds it in
/// `/sys/class/virtio-ports/*/name`.
pub const AGENT_PORT_NAME: &str = "io.podvisor.agent.0";

/// Path inside the initramfs of the module load list: one path per line,
/// relative to `/lib/modules/<kernel release>/`, in dependency order.
pub const MODULES_LOAD_LIST: &str = "/etc/podvisor/modules.load";

/// Like [`MODULES_LOAD_LIST`], the modules of encrypted volumes (device
/// mapper, dm-crypt, the generic AES-XTS pieces): loaded by the agent only
/// when the first `RequestVolumeKeys` arrives, so pods without encrypted
/// volumes pay nothing for them at boot.
pub const MODULES_VOLUMES_LIST: &str = "/etc/podvisor/modules.volumes";

/// Like [`MODULES_VOLUMES_LIST`], the AES-NI driver and what it needs:
/// loaded after it only when the CPU has the `aes` flag.
pub const MODULES_VOLUMES_AESNI_LIST: &str = "/etc/podvisor/modules.volumes-aesni";

/// Like [`MODULES_VOLUMES_LIST`], the modules of virtio-pmem devices
/// (libnvdimm, virtio_pmem, nd_pmem): loaded by the agent when it first
/// mounts a [`MountSource::Pmem`] layer.
pub const MODULES_PMEM_LIST: &str = "/etc/podvisor/modules.pmem";
