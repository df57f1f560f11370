//! The tap of a sleeping pod (hibernated: no VMM reads its tap), kept so
//! that the first packet for the pod waits in the tap's queue and tells
//! the host to wake it. A classic BPF program on the tap
//! (`TUNATTACHFILTER`) lets through only frames meant for the pod: those
//! sent to its MAC, and ARP requests for one of its addresses. Everything
//! else on the pod's network (other pods' ARP, broadcasts, multicast, and
//! ARP replies, to what the pod asked before it slept) is dropped before it reaches the queue, so it neither wakes the pod nor
//! fills the queue (500 frames) ahead of the request that matters. The
//! host polls the tap for readability without reading it, removes the
//! program (`TUNDETACHFILTER`) and hands the tap to the restored VMM,
//! which finds the waiting frames (the ARP request, the first SYN) in
//! order.
//!
//! The restored VMM must not be the one to read the waiting frames: left
//! in the tap for the QEMU that loads the state, the first SYN went
//! unanswered and only TCP's retransmission a second later was served
//! (seen in a capture; QEMU reads its tap from the start, likely before
//! the saved device state, with its different virtio-net header size, is
//! loaded). So the host takes the waiting frames out
//! ([`take_queued`]) before the VMM starts and, once the VM runs, sends
//! them again through the pod's veth ([`replay`]): they come back in on
//! the pod's interface and the tc redirect delivers them to the tap, now
//! read by the running VM. While asleep the tap has no checksum offload,
//! so the frames it keeps carry complete checksums.
//!
//! IPv6 neighbour solicitations go to a multicast address and are not
//! let through: a pod reached only over IPv6 does not wake by itself.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use tokio::io::Interest;
use tokio::io::unix::AsyncFd;

const ETH_P_ARP: u32 = 0x0806;
/// Offsets in an Ethernet frame (the filter sees frames without the
/// `virtio_net_hdr` a reader of the tap gets).
const OFF_ETHERTYPE: u32 = 12;
const OFF_ARP_TARGET_IP: u32 = 14 + 24;
const OFF_ARP_OPCODE: u32 = 14 + 6;
const ARP_REQUEST: u32 = 1;

/// Frames meant for one pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WakeFilter {
    /// The pod's MAC (its CNI interface's, which its VM's NIC has).
    pub mac: [u8; 6],
    /// Its IPv4 addresses (ARP requests for them pass). At most 16.
    pub ipv4: Vec<Ipv4Addr>,
}

// Classic BPF opcodes (linux/bpf_common.h).
const BPF_LD: u16 = 0x00;
const BPF_JMP: u16 = 0x05;
const BPF_RET: u16 = 0x06;
const BPF_W: u16 = 0x00;
const BPF_H: u16 = 0x08;
const BPF_ABS: u16 = 0x20;
const BPF_JEQ: u16 = 0x10;
const BPF_K: u16 = 0x00;

/// One instruction before its jumps are resolved.
enum Insn {
    Load {
        size: u16,
        offset: u32,
    },
    /// If the accumulator equals `k` go on with the next instruction, else
    /// jump to `otherwise`.
    JeqElse {
        k: u32,
        otherwise: Label,
    },
    /// If the accumulator equals `k` jump to `then`, else go on.
    JeqThen {
        k: u32,
        then: Label,
    },
    Ret(u32),
    Here(Label),
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Label {
    Ip,
    Accept,
    Drop,
}

impl WakeFilter {
    /// The program: accept (the whole frame) or drop (length 0).
    pub fn program(&self) -> Vec<libc::sock_filter> {
        use Insn::*;
        let mac_hi = u32::from_be_bytes(self.mac[..4].try_into().expect("4 bytes"));
        let mac_lo = u32::from(u16::from_be_bytes([self.mac[4], self.mac[5]]));
        let mut insns = vec![
            Load {
                size: BPF_H,
                offset: OFF_ETHERTYPE,
            },
            JeqElse {
                k: ETH_P_ARP,
                otherwise: Label::Ip,
            },
            // Only requests: a reply (to what the pod asked before it
            // slept) is no reason to wake it.
            Load {
                size: BPF_H,
                offset: OFF_ARP_OPCODE,
            },
            JeqElse {
                k: ARP_REQUEST,
                otherwise: Label::Drop,
            },
            Load {
                size: BPF_W,
                offset: OFF_ARP_TARGET_IP,
            },
        ];
        for ip in self.ipv4.iter().take(16) {
            insns.push(JeqThen {
                k: u32::from(*ip),
                then: Label::Accept,
            });
        }
        insns.extend([
            // An ARP frame for nobody of ours; but one sent to the pod's
            // MAC (a unicast ARP probe) is the pod's.
            Here(Label::Ip),
            Load {
                size: BPF_W,
                offset: 0,
            },
            JeqElse {
                k: mac_hi,
                otherwise: Label::Drop,
            },
            Load {
                size: BPF_H,
                offset: 4,
            },
            JeqElse {
                k: mac_lo,
                otherwise: Label::Drop,
            },
            Here(Label::Accept),
            Ret(u32::MAX),
            Here(Label::Drop),
            Ret(0),
        ]);
        assemble(&insns)
    }
}

/// Resolves labels into classic BPF's forward jump counts.
fn assemble(insns: &[Insn]) -> Vec<libc::sock_filter> {
    // Index of each real instruction, and where each label points.
    let mut index = Vec::with_capacity(insns.len());
    let mut labels = Vec::new();
    let mut n = 0u8;
    for insn in insns {
        index.push(n);
        match insn {
            Insn::Here(l) => labels.push((*l, n)),
            _ => n += 1,
        }
    }
    let at = |l: Label| {
        labels
            .iter()
            .find(|(x, _)| *x == l)
            .map(|(_, i)| *i)
            .expect("a defined label")
    };
    let mut out = Vec::with_capacity(n as usize);
    for (insn, &i) in insns.iter().zip(&index) {
        let jump = |target: Label| at(target) - i - 1;
        let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
        match insn {
            Insn::Load { size, offset } => out.push(op(BPF_LD | size | BPF_ABS, 0, 0, *offset)),
            Insn::JeqElse { k, otherwise } => {
                out.push(op(BPF_JMP | BPF_JEQ | BPF_K, 0, jump(*otherwise), *k))
            }
            Insn::JeqThen { k, then } => {
                out.push(op(BPF_JMP | BPF_JEQ | BPF_K, jump(*then), 0, *k))
            }
            Insn::Ret(k) => out.push(op(BPF_RET | BPF_K, 0, 0, *k)),
            Insn::Here(_) => {}
        }
    }
    out
}

nix::ioctl_write_ptr_bad!(
    tun_attach_filter,
    nix::request_code_write!(b'T', 213, std::mem::size_of::<libc::sock_fprog>()),
    libc::sock_fprog
);
nix::ioctl_write_ptr_bad!(
    tun_detach_filter,
    nix::request_code_write!(b'T', 214, std::mem::size_of::<libc::sock_fprog>()),
    libc::sock_fprog
);

nix::ioctl_write_int_bad!(
    tun_set_offload,
    nix::request_code_write!(b'T', 208, std::mem::size_of::<libc::c_uint>())
);
nix::ioctl_read_bad!(
    tun_get_vnet_hdr_size,
    nix::request_code_read!(b'T', 215, std::mem::size_of::<libc::c_int>()),
    libc::c_int
);

/// Most frames taken out of a sleeping pod's tap (its queue holds 500).
const MAX_QUEUED: usize = 500;

/// Takes the frames waiting in the tap (without their virtio-net header),
/// oldest first, for [`replay`].
pub fn take_queued(tap: BorrowedFd<'_>) -> io::Result<Vec<Vec<u8>>> {
    let mut hdr: libc::c_int = 0;
    // SAFETY: TUNGETVNETHDRSZ writes one int to `hdr`; `tap` is a tap fd.
    unsafe { tun_get_vnet_hdr_size(tap.as_raw_fd(), &mut hdr) }.map_err(io::Error::from)?;
    let hdr = usize::try_from(hdr).unwrap_or(0);
    let mut frames = Vec::new();
    let mut buf = vec![0u8; 65536 + 64];
    while frames.len() < MAX_QUEUED && has_frame(tap)? {
        let n = nix::unistd::read(tap, &mut buf).map_err(io::Error::from)?;
        if n > hdr {
            frames.push(buf[hdr..n].to_vec());
        }
    }
    Ok(frames)
}

/// Sends `frames` (Ethernet frames for the pod) out of the host side of
/// the pod's veth, the peer of `ifname` in the namespace `netns_path`:
/// they arrive on the pod's interface as they first did, and its tc
/// redirect gives them to the tap. The caller must be in the namespace
/// of that peer (the host's).
pub async fn replay(netns_path: &Path, ifname: &str, frames: &[Vec<u8>]) -> io::Result<()> {
    if frames.is_empty() {
        return Ok(());
    }
    let name = ifname.to_string();
    let peer = crate::netns::run_netlink_in(netns_path, move |handle| async move {
        use futures_util::TryStreamExt;
        let link = handle
            .link()
            .get()
            .match_name(name)
            .execute()
            .try_next()
            .await
            .ok()
            .flatten()?;
        link.attributes.iter().find_map(|a| match a {
            rtnetlink::packet_route::link::LinkAttribute::Link(index) => Some(*index),
            _ => None,
        })
    })
    .await
    .map_err(io::Error::other)?
    .ok_or_else(|| io::Error::other(format!("{ifname} in {} has no peer", netns_path.display())))?;
    // SAFETY: socket(2) with constant arguments; the fd is owned at once.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
    let socket = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    for frame in frames {
        // SAFETY: a zeroed sockaddr_ll is valid; the fields set below are
        // the family and the interface to send on.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = peer as i32;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6.min(frame.len())]);
        // SAFETY: sendto(2) reads `frame` and `to` for the lengths given;
        // both live for the call.
        let sent = unsafe {
            libc::sendto(
                socket.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&to as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Lets only `filter`'s frames into the tap's queue from now on, with
/// their checksums complete (no offload while asleep).
pub fn attach(tap: BorrowedFd<'_>, filter: &WakeFilter) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its flags by value; `tap` is a tap fd.
    unsafe { tun_set_offload(tap.as_raw_fd(), 0) }.map_err(io::Error::from)?;
    let mut program = filter.program();
    let fprog = libc::sock_fprog {
        len: program.len() as u16,
        filter: program.as_mut_ptr(),
    };
    // SAFETY: TUNATTACHFILTER copies the program out of `fprog`, which
    // points at `program`, alive for the call; `tap` is an open tap fd.
    unsafe { tun_attach_filter(tap.as_raw_fd(), &fprog) }.map_err(io::Error::from)?;
    Ok(())
}

/// Removes the program: every frame reaches the queue again.
pub fn detach(tap: BorrowedFd<'_>) -> io::Result<()> {
    let fprog = libc::sock_fprog {
        len: 0,
        filter: std::ptr::null_mut(),
    };
    // SAFETY: TUNDETACHFILTER reads nothing behind the (empty) program;
    // `tap` is an open tap fd.
    unsafe { tun_detach_filter(tap.as_raw_fd(), &fprog) }.map_err(io::Error::from)?;
    Ok(())
}

/// Waits until a frame is in the tap's queue, without taking it, or until
/// `timeout` (`Ok(false)`).
pub async fn wait_for_frame(tap: BorrowedFd<'_>, timeout: Option<Duration>) -> io::Result<bool> {
    // A duplicate of the fd for the reactor: the caller keeps the tap, and
    // the registration ends with the duplicate.
    let dup: OwnedFd = tap.try_clone_to_owned()?;
    // SAFETY: `dup` is an open fd that the AsyncFd owns from here on and
    // never replaces or closes before it is dropped.
    let watched = unsafe { AsyncFd::register_with_interest(dup, Interest::READABLE) }
        .map_err(io::Error::from)?;
    let ready = async {
        let guard = watched.readable().await?;
        // Leave the readiness set: nothing was read.
        drop(guard);
        Ok::<(), io::Error>(())
    };
    match timeout {
        Some(t) => match tokio::time::timeout(t, ready).await {
            Ok(r) => r.map(|()| true),
            Err(_) => Ok(false),
        },
        None => ready.await.map(|()| true),
    }
}

/// Whether the tap has a frame queued now.
pub fn has_frame(tap: BorrowedFd<'_>) -> io::Result<bool> {
    let mut fds = [nix::poll::PollFd::new(
        tap.as_fd(),
        nix::poll::PollFlags::POLLIN,
    )];
    let n = nix::poll::poll(&mut fds, nix::poll::PollTimeout::ZERO).map_err(io::Error::from)?;
    Ok(n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs a classic BPF program over `frame` the way the kernel does for
    /// these instructions (absolute loads, jeq, ret); returns what it
    /// returns (0 = drop).
    fn run(program: &[libc::sock_filter], frame: &[u8]) -> u32 {
        let mut acc = 0u32;
        let mut pc = 0usize;
        loop {
            let insn = program[pc];
            match insn.code {
                c if c == BPF_LD | BPF_H | BPF_ABS => {
                    let o = insn.k as usize;
                    let Some(b) = frame.get(o..o + 2) else {
                        return 0;
                    };
                    acc = u32::from(u16::from_be_bytes([b[0], b[1]]));
                }
                c if c == BPF_LD | BPF_W | BPF_ABS => {
                    let o = insn.k as usize;
                    let Some(b) = frame.get(o..o + 4) else {
                        return 0;
                    };
                    acc = u32::from_be_bytes(b.try_into().unwrap());
                }
                c if c == BPF_JMP | BPF_JEQ | BPF_K => {
                    let skip = if acc == insn.k { insn.jt } else { insn.jf };
                    pc += skip as usize;
                }
                c if c == BPF_RET | BPF_K => return insn.k,
                other => panic!("unexpected opcode {other:#x}"),
            }
            pc += 1;
        }
    }

    const POD_MAC: [u8; 6] = [0x0a, 0x58, 0x0a, 0x57, 0x00, 0x05];

    fn filter() -> WakeFilter {
        WakeFilter {
            mac: POD_MAC,
            ipv4: vec![Ipv4Addr::new(10, 87, 0, 5), Ipv4Addr::new(10, 87, 1, 5)],
        }
    }

    fn arp_request(target: Ipv4Addr) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&[0x08, 0x06]);
        f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 1]);
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
        f.extend_from_slice(&[10, 87, 0, 1]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&target.octets());
        f
    }

    fn ipv4_to(mac: [u8; 6]) -> Vec<u8> {
        let mut f = mac.to_vec();
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x08, 0x00]);
        f.extend_from_slice(&[0x45; 40]);
        f
    }

    #[test]
    fn only_frames_for_the_pod_pass() {
        let p = filter().program();
        assert!(p.len() < 20, "{}", p.len());
        assert_eq!(run(&p, &arp_request(Ipv4Addr::new(10, 87, 0, 5))), u32::MAX);
        assert_eq!(run(&p, &arp_request(Ipv4Addr::new(10, 87, 1, 5))), u32::MAX);
        assert_eq!(run(&p, &arp_request(Ipv4Addr::new(10, 87, 0, 6))), 0);
        // The answer to the pod's own ARP request (sent to its MAC, its
        // address the target) does not wake it.
        let mut reply = arp_request(Ipv4Addr::new(10, 87, 0, 5));
        reply[..6].copy_from_slice(&POD_MAC);
        reply[14 + 7] = 2;
        assert_eq!(run(&p, &reply), 0, "an ARP reply");
        assert_eq!(run(&p, &ipv4_to(POD_MAC)), u32::MAX);
        let mut other = POD_MAC;
        other[5] ^= 1;
        assert_eq!(run(&p, &ipv4_to(other)), 0);
        other = POD_MAC;
        other[0] ^= 1;
        assert_eq!(run(&p, &ipv4_to(other)), 0);
        assert_eq!(run(&p, &ipv4_to([0xff; 6])), 0, "broadcast");
        assert_eq!(run(&p, &ipv4_to([0x33, 0x33, 0, 0, 0, 1])), 0, "multicast");
        assert_eq!(run(&p, &[0u8; 4]), 0, "a runt");
        // No addresses: only frames to the MAC.
        let none = WakeFilter {
            mac: POD_MAC,
            ipv4: vec![],
        }
        .program();
        assert_eq!(run(&none, &arp_request(Ipv4Addr::new(10, 87, 0, 5))), 0);
        assert_eq!(run(&none, &ipv4_to(POD_MAC)), u32::MAX);
    }
}
