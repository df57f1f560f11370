//! A misbehaving stand-in for the agent, for the host's hostile-guest tests.
//!
//! It boots like the real agent (basic mounts, modules, the agent port) and
//! then, according to `podvisor.hostile=MODE` on the kernel command line:
//! - `garbage`: writes bytes that are not a frame;
//! - `oversized`: writes a frame header announcing a 4 GiB payload;
//! - `bogus`: sends a well-formed `Exited` for a process that never existed,
//!   before ever saying `Ready`.
//!
//! Then it sleeps: the host must kill the VM. Built static like the agent:
//! `cargo build -p podvisor-agent --example hostile-agent --target x86_64-unknown-linux-gnu`.

use std::io::Write;
use std::time::Duration;

use podvisor_agent::{boot, port, syscall::LinuxSyscall};
use podvisor_proto::{AGENT_PORT_NAME, ExitStatus, GuestMessage, PROTOCOL_VERSION, encode};

fn main() {
    let sys = LinuxSyscall;
    let _ = boot::mount_basics(&sys);
    boot::ensure_console();
    boot::load_modules(&sys, &boot::kernel_release());
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let mode = cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix("podvisor.hostile="))
        .unwrap_or("garbage")
        .to_string();
    let bytes: Vec<u8> = match mode.as_str() {
        "oversized" => {
            let mut h = b"PV".to_vec();
            h.extend_from_slice(&PROTOCOL_VERSION.to_be_bytes());
            h.extend_from_slice(&u32::MAX.to_be_bytes());
            h
        }
        "bogus" => encode(&GuestMessage::Exited {
            id: "never-started".into(),
            status: ExitStatus::Code(0),
        })
        .expect("encode"),
        _ => b"\x00\xffthis is not a podvisor frame\n\x1b[2J".repeat(64),
    };
    for _ in 0..1000 {
        if let Some(dev) = port::find_port(
            std::path::Path::new("/sys/class/virtio-ports"),
            AGENT_PORT_NAME,
        ) && let Ok(mut f) = std::fs::OpenOptions::new()
            .write(true)
            .open(format!("/dev/{dev}"))
        {
            eprintln!("hostile-agent: sending {mode}");
            let _ = f.write_all(&bytes);
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}
