//! Accelerator choice: KVM when it can really run a guest, else TCG.
//!
//! `/dev/kvm` existing is not enough: some machines expose a nested
//! paravirtual KVM that cannot boot a stock kernel. KVM is used only when
//! `/dev/kvm` opens read-write **and** the CPU flags include `vmx` or `svm`.

use std::path::Path;

/// A QEMU accelerator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's software emulator (slow, but runs anywhere).
    Tcg,
}

impl Accel {
    /// The name QEMU uses for it.
    pub fn as_str(self) -> &'static str {
        match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        }
    }
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            other => Err(format!("unknown accelerator {other:?} (use kvm or tcg)")),
        }
    }
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The accelerator picked and why, to tell the user once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

impl AccelChoice {
    /// Uses `requested` if given, else detects from this machine.
    pub fn resolve(requested: Option<Accel>) -> Self {
        match requested {
            Some(accel) => Self {
                accel,
                reason: format!("{accel} requested"),
            },
            None => detect(Path::new("/dev/kvm"), Path::new("/proc/cpuinfo")),
        }
    }
}

/// Detects the accelerator from a KVM device node and a cpuinfo file.
pub fn detect(kvm_dev: &Path, cpuinfo: &Path) -> AccelChoice {
    let kvm_opens = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(kvm_dev)
        .is_ok();
    let cpu_has_vt = std::fs::read_to_string(cpuinfo)
        .map(|s| cpu_flags_have_virtualization(&s))
        .unwrap_or(false);
    match (kvm_opens, cpu_has_vt) {
        (true, true) => AccelChoice {
            accel: Accel::Kvm,
            reason: "KVM available".into(),
        },
        (false, _) => AccelChoice {
            accel: Accel::Tcg,
            reason: format!(
                "{} cannot be opened: using TCG software emulation (slow)",
                kvm_dev.display()
            ),
        },
        (true, false) => AccelChoice {
            accel: Accel::Tcg,
            reason: "the CPU has no vmx/svm flag (nested KVM without hardware support): \
                     using TCG software emulation (slow)"
                .into(),
        },
    }
}

/// True if any `flags` line of a cpuinfo text has `vmx` or `svm`.
fn cpu_flags_have_virtualization(cpuinfo: &str) -> bool {
    cpuinfo
        .lines()
        .filter(|l| l.starts_with("flags"))
        .any(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kvm_needs_both_device_and_cpu_flag() {
        let dir = tempfile::tempdir().unwrap();
        let dev = dir.path().join("kvm");
        std::fs::write(&dev, b"").unwrap();
        let with_vmx = dir.path().join("cpu1");
        std::fs::write(&with_vmx, "flags\t\t: fpu vme vmx sse\n").unwrap();
        let without = dir.path().join("cpu2");
        std::fs::write(&without, "flags\t\t: fpu vme sse hypervisor\n").unwrap();

        assert_eq!(detect(&dev, &with_vmx).accel, Accel::Kvm);
        let c = detect(&dev, &without);
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("vmx/svm"), "{}", c.reason);
        let c = detect(&dir.path().join("missing"), &with_vmx);
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("cannot be opened"), "{}", c.reason);
    }

    #[test]
    fn explicit_choice_wins() {
        let c = AccelChoice::resolve(Some(Accel::Kvm));
        assert_eq!(c.accel, Accel::Kvm);
        assert_eq!("tcg".parse::<Accel>(), Ok(Accel::Tcg));
        assert!("hvf".parse::<Accel>().is_err());
    }
}
