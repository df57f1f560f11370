//! A clone's own identity. A VM restored from a template resumes with the
//! template's kernel RNG state, its stopped clock and its hostname, exactly
//! like every sibling; the host sends [`CloneIdentity`] after each restore
//! and [`apply`] makes this clone its own machine.
//!
//! Order matters: the entropy goes in and the CRNG is reseeded first, so
//! nothing the guest draws afterwards repeats a sibling's bytes. Guest
//! kernels with a vmgenid driver reseed on their own as well; Debian's 6.1
//! cloud kernel has none, so this is what makes clones differ there.

use podvisor_proto::{CloneIdentity, MAX_HOSTNAME_LEN, MAX_IDENTITY_ENTROPY};

use crate::syscall::Syscall;

/// Fewest entropy bytes accepted: 256 bits, a full CRNG seed.
pub const MIN_IDENTITY_ENTROPY: usize = 32;

/// Checks what the host sent; returns why it cannot be used.
pub fn validate(identity: &CloneIdentity) -> Result<(), String> {
    let h = &identity.hostname;
    if h.is_empty() || h.len() > MAX_HOSTNAME_LEN || h.bytes().any(|b| b == 0 || b == b'/') {
        return Err(format!(
            "invalid hostname {h:?}: need 1 to {MAX_HOSTNAME_LEN} bytes without NUL or '/'"
        ));
    }
    let n = identity.entropy.len();
    if !(MIN_IDENTITY_ENTROPY..=MAX_IDENTITY_ENTROPY).contains(&n) {
        return Err(format!(
            "{n} entropy bytes: need {MIN_IDENTITY_ENTROPY} to {MAX_IDENTITY_ENTROPY}"
        ));
    }
    Ok(())
}

/// Takes on `identity`: entropy into the RNG and a reseed, the wall clock,
/// the guest's hostname and that of every running container (`pids`: their
/// inits). Returns every step that failed, named; empty on success. An
/// invalid identity changes nothing.
pub fn apply(sys: &dyn Syscall, identity: &CloneIdentity, pids: &[i32]) -> Vec<String> {
    if let Err(e) = validate(identity) {
        return vec![e];
    }
    let mut errors = Vec::new();
    match sys.add_entropy(&identity.entropy) {
        Ok(()) => {
            if let Err(e) = sys.reseed_crng() {
                errors.push(format!("reseeding the kernel RNG (RNDRESEEDCRNG): {e}"));
            }
        }
        Err(e) => errors.push(format!("adding entropy (RNDADDENTROPY): {e}")),
    }
    if let Err(e) = sys.set_realtime(identity.unix_time_ns) {
        errors.push(format!("setting the clock: {e}"));
    }
    if let Err(e) = sys.sethostname(&identity.hostname) {
        errors.push(format!("setting the hostname: {e}"));
    }
    for &pid in pids {
        if let Err(e) = sys.sethostname_in(pid, &identity.hostname) {
            errors.push(format!(
                "setting the hostname of container process {pid}: {e}"
            ));
        }
    }
    errors
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::syscall::RecordingSyscall;
    use nix::errno::Errno;

    fn identity() -> CloneIdentity {
        CloneIdentity {
            hostname: "pod-2".into(),
            unix_time_ns: 1_700_000_000_500_000_000,
            entropy: vec![9; 64],
        }
    }

    #[test]
    fn reseeds_first_then_clock_then_hostnames() {
        let sys = RecordingSyscall::new();
        assert!(apply(&sys, &identity(), &[7, 12]).is_empty());
        assert_eq!(
            sys.calls(),
            [
                "add_entropy 64 bytes",
                "reseed_crng",
                "set_realtime 1700000000500000000",
                "sethostname pod-2",
                "sethostname_in 7 pod-2",
                "sethostname_in 12 pod-2",
            ]
        );
    }

    #[test]
    fn every_failure_is_named_and_the_rest_still_happens() {
        let sys = RecordingSyscall::new()
            .fail("add_entropy", Errno::EPERM)
            .fail("sethostname_in 7", Errno::ENOENT);
        let errors = apply(&sys, &identity(), &[7, 12]);
        assert_eq!(
            errors,
            [
                "adding entropy (RNDADDENTROPY): EPERM: Operation not permitted",
                "setting the hostname of container process 7: ENOENT: No such file or directory",
            ]
        );
        // No reseed without fresh entropy; clock and hostnames still set.
        let calls = sys.calls();
        assert!(!calls.contains(&"reseed_crng".to_string()));
        assert!(calls.contains(&"sethostname_in 12 pod-2".to_string()));
        assert!(calls.contains(&"set_realtime 1700000000500000000".to_string()));
    }

    #[test]
    fn bad_identities_change_nothing() {
        for (bad, needle) in [
            (
                CloneIdentity {
                    hostname: "x".repeat(65),
                    ..identity()
                },
                "invalid hostname",
            ),
            (
                CloneIdentity {
                    hostname: "a/b".into(),
                    ..identity()
                },
                "invalid hostname",
            ),
            (
                CloneIdentity {
                    entropy: vec![1; 8],
                    ..identity()
                },
                "8 entropy bytes",
            ),
            (
                CloneIdentity {
                    entropy: vec![1; MAX_IDENTITY_ENTROPY + 1],
                    ..identity()
                },
                "4097 entropy bytes",
            ),
        ] {
            let sys = RecordingSyscall::new();
            let errors = apply(&sys, &bad, &[1]);
            assert_eq!(errors.len(), 1);
            assert!(errors[0].contains(needle), "{errors:?}");
            assert!(sys.calls().is_empty());
        }
    }
}
