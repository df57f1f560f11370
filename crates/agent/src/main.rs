//! `podvisor-agent`: `/init` of the pod VM's initramfs. See the library
//! documentation for what it does.

use podvisor_agent::{boot, log};

fn main() {
    if nix::unistd::getpid().as_raw() != 1 {
        eprintln!("podvisor-agent: this is the pod VM's init; it only runs as PID 1 in the guest");
        std::process::exit(2);
    }
    match std::panic::catch_unwind(podvisor_agent::run) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => {
            log!("fatal: {}; powering off", podvisor_errors::ErrorChain(&e));
        }
        Err(_) => log!("fatal: the agent panicked; powering off"),
    }
    boot::power_off()
}
