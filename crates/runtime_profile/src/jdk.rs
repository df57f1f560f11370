//! What a JDK says about itself (its `release` file) and the flags that
//! start a JVM with a class-data archive mapped so its pages can be shared
//! between pod VMs.

use crate::{Profile, Runtime, env_value};

/// Most bytes of a JDK's `release` file worth reading (they hold a few
/// hundred).
pub const MAX_RELEASE_LEN: u64 = 64 << 10;

/// The Java version a JDK's `release` file gives (`JAVA_VERSION="17.0.15"`),
/// if it is a plain version (digits, dots, `+`, `-`, letters; at most 64
/// bytes).
pub fn java_version(release: &str) -> Option<String> {
    let value = release
        .lines()
        .find_map(|l| l.trim().strip_prefix("JAVA_VERSION="))?
        .trim();
    let value = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    let plain = !value.is_empty()
        && value.len() <= 64
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._+-".contains(c));
    plain.then(|| value.to_string())
}

/// The flags that map the class-data archive `path` at its base address:
/// a JDK maps an archive at a random address by default and patches every
/// pointer in it, which makes most of its pages private to each JVM.
/// `-Xshare:auto`: a JVM that rejects the archive (another JDK build)
/// still starts, without it.
pub fn archive_flags(path: &str) -> [String; 4] {
    [
        format!("-XX:SharedArchiveFile={path}"),
        "-Xshare:auto".into(),
        "-XX:+UnlockDiagnosticVMOptions".into(),
        "-XX:ArchiveRelocationMode=0".into(),
    ]
}

/// Adds the class-data archive at `path` (absolute, inside the container;
/// `found`: whether it is there) to a JVM's profile, before the user's
/// own options, unless the user's `JAVA_TOOL_OPTIONS` or
/// `JDK_JAVA_OPTIONS` choose their own archive or sharing mode. Says
/// what it did, or why not, in the profile's reasons.
pub fn use_class_data_archive(profile: &mut Profile, env: &[String], path: &str, found: bool) {
    if profile.runtime != Runtime::Jvm {
        return;
    }
    let users_own = ["JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS"]
        .iter()
        .filter_map(|k| env_value(env, k))
        .flat_map(str::split_whitespace)
        .any(|f| f.starts_with("-Xshare:") || f.starts_with("-XX:SharedArchiveFile="));
    let why_not = if users_own {
        Some("the container's own -Xshare or -XX:SharedArchiveFile".to_string())
    } else if !path.starts_with('/') {
        Some(format!("{path:?} is not an absolute path"))
    } else if path.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some(format!(
            "{path:?} has white space, which JAVA_TOOL_OPTIONS cannot carry"
        ))
    } else if !found {
        Some(format!("{path} is not in the container's root"))
    } else {
        None
    };
    if let Some(why) = why_not {
        profile
            .reasons
            .push(format!("no class-data archive: {why}"));
        return;
    }
    let flags = archive_flags(path).join(" ");
    match profile
        .env
        .iter_mut()
        .find(|(k, _)| k == "JAVA_TOOL_OPTIONS")
    {
        Some((_, value)) => *value = format!("{flags} {value}").trim().to_string(),
        None => profile.env.push(("JAVA_TOOL_OPTIONS".into(), flags)),
    }
    profile.reasons.push(format!(
        "class-data archive {path}, mapped at its base address (ArchiveRelocationMode=0) so its pages stay shared"
    ));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{JvmFacts, Share, profile};

    fn jvm(env: &[String]) -> Profile {
        let share = Share {
            memory_bytes: 1 << 30,
            cpus: 1,
        };
        profile(Runtime::Jvm, share, env, JvmFacts::default()).unwrap()
    }

    fn tool_options(p: &Profile) -> &str {
        &p.env
            .iter()
            .find(|(k, _)| k == "JAVA_TOOL_OPTIONS")
            .unwrap()
            .1
    }

    #[test]
    fn the_version_comes_from_the_release_file() {
        let release = "IMPLEMENTOR=\"Debian\"\nJAVA_RUNTIME_VERSION=\"17.0.15+6-Debian-1deb12u1\"\nJAVA_VERSION=\"17.0.15\"\n";
        assert_eq!(java_version(release).as_deref(), Some("17.0.15"));
        assert_eq!(java_version("JAVA_VERSION=21\n").as_deref(), Some("21"));
        assert_eq!(java_version("JAVA_VERSION=\"17; rm -rf\"\n"), None);
        assert_eq!(java_version("IMPLEMENTOR=x\n"), None);
        assert_eq!(java_version("JAVA_VERSION=\"\"\n"), None);
    }

    #[test]
    fn an_archive_goes_before_the_users_options() {
        let env = vec!["JAVA_TOOL_OPTIONS=-Xmx64m".to_string()];
        let mut p = jvm(&env);
        use_class_data_archive(&mut p, &env, "/opt/app/app.jsa", true);
        let flags = tool_options(&p);
        assert!(
            flags.starts_with(
                "-XX:SharedArchiveFile=/opt/app/app.jsa -Xshare:auto \
                 -XX:+UnlockDiagnosticVMOptions -XX:ArchiveRelocationMode=0 -XX:"
            ),
            "{flags}"
        );
        assert!(flags.ends_with(" -Xmx64m"), "{flags}");
        assert!(
            p.reasons
                .last()
                .unwrap()
                .contains("ArchiveRelocationMode=0"),
            "{p:?}"
        );
    }

    #[test]
    fn a_missing_archive_or_the_users_own_sharing_leaves_the_flags_alone() {
        let cases: [(&[&str], &str, bool, &str); 4] = [
            (
                &[],
                "/opt/app/app.jsa",
                false,
                "not in the container's root",
            ),
            (
                &["JDK_JAVA_OPTIONS=-Xshare:off"],
                "/opt/app/app.jsa",
                true,
                "the container's own",
            ),
            (&[], "app.jsa", true, "not an absolute path"),
            (&[], "/opt/my app.jsa", true, "white space"),
        ];
        for (env, path, found, why) in cases {
            let env: Vec<String> = env.iter().map(|s| s.to_string()).collect();
            let mut p = jvm(&env);
            let before = p.env.clone();
            use_class_data_archive(&mut p, &env, path, found);
            assert_eq!(p.env, before, "{path}");
            let last = p.reasons.last().unwrap();
            assert!(
                last.starts_with("no class-data archive") && last.contains(why),
                "{last}"
            );
        }
        // Not a JVM: nothing at all.
        let mut go = profile(
            Runtime::Go,
            Share {
                memory_bytes: 1 << 30,
                cpus: 1,
            },
            &[],
            JvmFacts::default(),
        )
        .unwrap();
        let before = go.clone();
        use_class_data_archive(&mut go, &[], "/a.jsa", true);
        assert_eq!(go, before);
    }
}
