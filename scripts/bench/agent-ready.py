#!/usr/bin/env python3
"""Boots a pod VM with podvisor's QEMU command line, but without podvisor:
waits only for the agent's first frame (Ready) on its socket and prints how
long that took from QEMU's start, per run and the median.

    scripts/bench/agent-ready.py CACHE_DIR RUNS [--no-thp] [--nic]

CACHE_DIR is a podvisor cache that has run a pod (its newest initramfs and
any layer disk are used). --no-thp starts QEMU with transparent huge pages
disabled for it (prctl PR_SET_THP_DISABLE), which QEMU otherwise asks for
on guest RAM and its translation buffer. --nic adds a virtio-net card (on
QEMU's user-mode network, restricted: nothing leaves the VM), to measure
what probing a NIC adds to the boot. Compare with `podvisor run --timings` (the sum of
the stages from "QEMU start" to "modules -> ready"). Keep the command line
in step with crates/vmm/src/qemu/cmdline.rs and KERNEL_CMDLINE in
crates/podvm/src/pod_vm.rs.
"""
import ctypes
import glob
import os
import socket
import subprocess
import sys
import tempfile
import time

cache, runs = sys.argv[1], int(sys.argv[2])
no_thp = "--no-thp" in sys.argv[3:]
nic = "--nic" in sys.argv[3:]


def disable_thp():
    libc = ctypes.CDLL(None, use_errno=True)
    PR_SET_THP_DISABLE = 41
    if libc.prctl(PR_SET_THP_DISABLE, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_THP_DISABLE)")
initrd = max(glob.glob(f"{cache}/guest/initramfs-*.cpio"), key=os.path.getmtime)
disk = glob.glob(f"{cache}/layers-v2/*/disk.erofs")[0]
kernel = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))[-1]
cmdline = ("console=ttyS0 quiet panic=-1 reboot=t acpi=noirq i8042.noaux i8042.nomux "
           "i8042.nopnp i8042.dumbkbd cryptomgr.notests")


def once(d):
    args = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-no-reboot",
            "-display", "none", "-machine", "pc", "-accel", "tcg,tb-size=64", "-cpu", "max",
            "-smp", "1", "-m", "256M", "-kernel", kernel, "-initrd", initrd, "-append", cmdline,
            "-chardev", f"file,id=console0,path={d}/console.log", "-serial", "chardev:console0",
            "-chardev", f"socket,id=qmp0,path={d}/q.sock,server=on,wait=off",
            "-mon", "chardev=qmp0,mode=control",
            "-device", "virtio-serial-pci,id=vserial0,bus=pci.0,addr=0x2",
            "-chardev", f"socket,id=agent0,path={d}/a.sock,server=on,wait=off",
            "-device", "virtserialport,bus=vserial0.0,chardev=agent0,name=io.podvisor.agent.0",
            "-drive", f"file={disk},format=raw,if=none,id=disk0,cache=none,aio=threads,readonly=on",
            "-device", "virtio-blk-pci,drive=disk0,id=dev-disk0,serial=pvl0,bus=pci.0,addr=0x4",
            "-object", "rng-random,id=rng0,filename=/dev/urandom",
            "-device", "virtio-rng-pci,rng=rng0,bus=pci.0,addr=0x3",
            "-device", "vmgenid,guid=auto"]
    if nic:
        args += ["-netdev", "user,id=usernet0,restrict=on",
                 "-device", "virtio-net-pci,netdev=usernet0,mac=02:42:0a:58:00:05,bus=pci.0,addr=0x1e"]
    start = time.monotonic()
    qemu = subprocess.Popen(args, preexec_fn=disable_thp if no_thp else None)
    try:
        while not os.path.exists(f"{d}/a.sock"):
            time.sleep(0.002)
        with socket.socket(socket.AF_UNIX) as s:
            while True:
                try:
                    s.connect(f"{d}/a.sock")
                    break
                except ConnectionRefusedError:  # bound, not listening yet
                    time.sleep(0.002)
            s.recv(64)
        return time.monotonic() - start
    finally:
        qemu.kill()
        qemu.wait()


times = []
for _ in range(runs):
    with tempfile.TemporaryDirectory() as d:
        times.append(once(d))
print(" ".join(f"{t:.3f}" for t in times), f"median {sorted(times)[len(times) // 2]:.3f}")
