//! Runtime profiles (issue 12): which language runtime a container runs
//! ([`detect`], a Go binary by its build information: [`go_build_info`];
//! a JDK's version from its `release` file: [`java_version`]) and the
//! settings that
//! size it to its share of the pod VM ([`profile`]): for a JVM a memory
//! calculator in the spirit of Paketo's (the heap is what is left after
//! metaspace, code cache, direct memory, thread stacks and headroom; fed
//! with measured class and thread counts when there are some, instead of
//! fixed guesses) and `-XX:ActiveProcessorCount`; `GOMAXPROCS` and
//! `GOMEMLIMIT` for Go; `--max-old-space-size` for Node.js; the CPU count
//! for CPython. The settings are environment variables the runtime reads
//! itself (`JAVA_TOOL_OPTIONS`, `NODE_OPTIONS`, ...), and a setting the
//! user gave wins. Each profile says why it chose what it chose.
//!
//! A class-data archive built for the image is added to a JVM's flags
//! mapped at its base address ([`use_class_data_archive`]).
//!
//! Pure computation: nothing here opens files or starts anything (the Go
//! build information is read from a reader the caller opened, every read
//! bounded). The guest agent applies profiles to a container's main
//! process (see `podvisor_proto::runtime` for who does what).

pub mod jvm_archive;

use std::fmt::Write as _;

mod go_build;
mod jdk;

pub use go_build::{GoBuild, GoBuildError, go_build_info, parse_build_info};
pub use jdk::{MAX_RELEASE_LEN, archive_flags, java_version, use_class_data_archive};

const MIB: u64 = 1 << 20;

/// A language runtime podvisor sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Runtime {
    Jvm,
    Go,
    Node,
    Python,
}

impl Runtime {
    pub fn as_str(self) -> &'static str {
        match self {
            Runtime::Jvm => "JVM",
            Runtime::Go => "Go",
            Runtime::Node => "Node.js",
            Runtime::Python => "CPython",
        }
    }
}

/// The program a container's argv runs, as written: `argv[0]`, or for
/// `sh -c "[exec] prog ..."` the script's first program (`java`,
/// `/opt/app/server`).
pub fn command_word(argv: &[String]) -> Option<&str> {
    let first = argv.first()?;
    let base = first.rsplit('/').next().unwrap_or(first);
    if matches!(base, "sh" | "bash" | "dash" | "ash")
        && argv.get(1).map(String::as_str) == Some("-c")
    {
        let script = argv.get(2)?;
        let mut words = script.split_whitespace().skip_while(|w| *w == "exec");
        return words.next();
    }
    Some(first)
}

/// The file name of the program a container's argv runs.
fn program(argv: &[String]) -> Option<&str> {
    let word = command_word(argv)?;
    Some(word.rsplit('/').next().unwrap_or(word))
}

/// The version in a CPython program's file name (`python3.11` -> `3.11`).
pub fn python_version(file_name: &str) -> Option<&str> {
    let v = file_name.strip_prefix("python")?;
    let plain = v.contains('.')
        && v.split('.')
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()));
    plain.then_some(v)
}

/// The runtime a container runs, from its effective command (`argv`:
/// entrypoint then command) and environment (`KEY=VALUE`); `None` if it
/// is none podvisor knows from these (a Go binary is known from its file:
/// [`go_build_info`]).
pub fn detect(argv: &[String], env: &[String]) -> Option<Runtime> {
    let prog = program(argv)?;
    let python = prog == "python"
        || prog.strip_prefix("python3").is_some_and(|v| {
            v.is_empty() || v.starts_with('.') && v[1..].chars().all(|c| c.is_ascii_digit())
        });
    if prog == "java" {
        return Some(Runtime::Jvm);
    }
    if matches!(prog, "node" | "nodejs") {
        return Some(Runtime::Node);
    }
    if python {
        return Some(Runtime::Python);
    }
    // A launcher script next to a JDK (`JAVA_HOME` set, the program in
    // its `bin`).
    let java_home = env_value(env, "JAVA_HOME");
    if let (Some(home), Some(first)) = (java_home, command_word(argv))
        && !home.is_empty()
        && first.starts_with(&format!("{}/bin/", home.trim_end_matches('/')))
    {
        return Some(Runtime::Jvm);
    }
    None
}

/// What the container may use: its share of the pod VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Share {
    pub memory_bytes: u64,
    pub cpus: u32,
}

/// What a training run measured of a JVM, where podvisor has it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JvmFacts {
    pub loaded_classes: Option<u64>,
    pub peak_threads: Option<u64>,
}

/// The settings chosen for one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Profile {
    pub runtime: Runtime,
    /// Environment variables to set (replacing the container's own of the
    /// same name, whose value they include where the user gave one).
    pub env: Vec<(String, String)>,
    /// What was chosen and why, one line each (for `describe pod`).
    pub reasons: Vec<String>,
}

/// Why no profile could be made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProfileError {
    #[error(
        "{runtime} needs at least {needed_mib} MiB besides its heap ({regions}), and has {share_mib} MiB"
    )]
    TooSmall {
        runtime: &'static str,
        needed_mib: u64,
        share_mib: u64,
        regions: String,
    },
}

pub(crate) fn env_value<'a>(env: &'a [String], key: &str) -> Option<&'a str> {
    env.iter()
        .rev()
        .find_map(|e| e.strip_prefix(key)?.strip_prefix('='))
}

/// Classes a JVM loads when nothing was measured.
pub const DEFAULT_CLASSES: u64 = 8000;
/// Threads a JVM runs when nothing was measured (Paketo assumes 250; a
/// pod VM's JVM serves one application).
pub const DEFAULT_THREADS: u64 = 50;
/// Smallest heap the calculator gives.
pub const MIN_HEAP: u64 = 16 * MIB;
/// A heap the ordinary rule leaves below this makes a share small (see
/// [`TIGHT_STACK`]); a small share's heap is at most this.
const TIGHT_HEAP: u64 = 64 * MIB;
/// What a thread's stack is counted at when the share is small.
const TIGHT_STACK: u64 = 256 << 10;
/// The code cache reserved when the share is small.
const TIGHT_CODE_CACHE: u64 = 24 * MIB;

/// A JVM memory size flag's value in bytes (`512m`, `1g`, `1048576`).
fn jvm_size(v: &str) -> Option<u64> {
    let (num, mult) = match v.chars().last()? {
        'k' | 'K' => (&v[..v.len() - 1], 1 << 10),
        'm' | 'M' => (&v[..v.len() - 1], MIB),
        'g' | 'G' => (&v[..v.len() - 1], 1 << 30),
        _ => (v, 1),
    };
    num.parse::<u64>().ok()?.checked_mul(mult)
}

/// The JVM's settings for `share`, given the user's `JAVA_TOOL_OPTIONS`
/// and `JDK_JAVA_OPTIONS` (their flags win) and what was measured.
fn jvm(share: Share, env: &[String], facts: JvmFacts) -> Result<Profile, ProfileError> {
    let user: Vec<&str> = ["JAVA_TOOL_OPTIONS", "JDK_JAVA_OPTIONS"]
        .iter()
        .filter_map(|k| env_value(env, k))
        .flat_map(str::split_whitespace)
        .collect();
    let given = |prefix: &str| {
        user.iter()
            .rev()
            .find_map(|f| f.strip_prefix(prefix))
            .and_then(jvm_size)
    };
    let total = share.memory_bytes;
    let (classes, class_src) = match facts.loaded_classes {
        Some(n) => (n, "measured"),
        None => (DEFAULT_CLASSES, "estimated"),
    };
    let (threads, thread_src) = match facts.peak_threads {
        Some(n) => (n, "measured"),
        None => (DEFAULT_THREADS, "estimated"),
    };
    // Paketo's metaspace estimate: 5800 bytes a class and 14 MB.
    let metaspace = given("-XX:MaxMetaspaceSize=").unwrap_or(classes * 5800 + 14_000_000);
    let mut code_cache =
        given("-XX:ReservedCodeCacheSize=").unwrap_or((total / 8).clamp(32 * MIB, 240 * MIB));
    let direct = given("-XX:MaxDirectMemorySize=").unwrap_or(10 * MIB);
    let stack = given("-Xss").unwrap_or(MIB);
    let mut stack_counted = stack;
    let mut headroom = (total / 20).max(16 * MIB);
    let mut others = metaspace + code_cache + direct + threads * stack_counted + headroom;
    let mut reasons = vec![format!(
        "share of the pod VM: {} MiB, {} CPU(s)",
        total / MIB,
        share.cpus
    )];
    // What the ordinary rule leaves; a heap this small (or none) makes the
    // share a small one.
    let ordinary_heap = total.saturating_sub(others);
    let mut heap_cap = u64::MAX;
    if given("-Xmx").is_none() && ordinary_heap < TIGHT_HEAP {
        // A small share: count what a thread's stack commits rather than
        // its whole reserve (the kernel commits stack pages as they are
        // touched; -Xss still bounds each), the code cache at its smaller
        // size, and less headroom.
        let tight_stack = stack.min(TIGHT_STACK);
        let tight_code_cache = given("-XX:ReservedCodeCacheSize=").unwrap_or(TIGHT_CODE_CACHE);
        let tight_headroom = (total / 20).max(8 * MIB);
        let tight_others =
            metaspace + tight_code_cache + direct + threads * tight_stack + tight_headroom;
        if total.saturating_sub(tight_others) > ordinary_heap {
            stack_counted = tight_stack;
            code_cache = tight_code_cache;
            headroom = tight_headroom;
            others = tight_others;
            // No more heap than the ordinary rule gives a share just
            // large enough for it: a larger share never gets less.
            heap_cap = TIGHT_HEAP;
            reasons.push(format!(
                "a small share: thread stacks counted at the {} KiB a thread commits, not their {} KiB reserve; code cache {} MiB; headroom {} MiB",
                stack_counted >> 10,
                stack >> 10,
                code_cache / MIB,
                headroom / MIB
            ));
        }
    }
    let mut flags = Vec::new();
    match given("-Xmx") {
        Some(heap) => reasons.push(format!("heap {} MiB: the container's own -Xmx", heap / MIB)),
        None => {
            let heap = total.saturating_sub(others).min(heap_cap);
            if heap < MIN_HEAP {
                return Err(ProfileError::TooSmall {
                    runtime: Runtime::Jvm.as_str(),
                    needed_mib: (others + MIN_HEAP).div_ceil(MIB),
                    share_mib: total / MIB,
                    regions: format!(
                        "metaspace {} MiB, code cache {} MiB, direct {} MiB, {threads} threads x {} KiB, headroom {} MiB",
                        metaspace / MIB,
                        code_cache / MIB,
                        direct / MIB,
                        stack_counted >> 10,
                        headroom / MIB
                    ),
                });
            }
            let heap_mib = heap / MIB;
            flags.push(format!("-Xmx{heap_mib}m"));
            reasons.push(format!(
                "heap {heap_mib} MiB: what is left of {} MiB after metaspace {} MiB ({classes} classes, {class_src}), code cache {} MiB, direct memory {} MiB, {threads} thread stacks ({thread_src}) of {} KiB and headroom {} MiB",
                total / MIB,
                metaspace.div_ceil(MIB),
                code_cache / MIB,
                direct / MIB,
                stack_counted >> 10,
                headroom / MIB
            ));
        }
    }
    let mut set = |prefix: &str, value: String| {
        if given(prefix).is_none() {
            flags.push(format!("{prefix}{value}"));
        }
    };
    set(
        "-XX:MaxMetaspaceSize=",
        format!("{}m", metaspace.div_ceil(MIB)),
    );
    set(
        "-XX:ReservedCodeCacheSize=",
        format!("{}m", code_cache / MIB),
    );
    set("-XX:MaxDirectMemorySize=", format!("{}m", direct / MIB));
    set("-Xss", format!("{}k", stack >> 10));
    if !user
        .iter()
        .any(|f| f.starts_with("-XX:ActiveProcessorCount="))
    {
        flags.push(format!("-XX:ActiveProcessorCount={}", share.cpus));
        reasons.push(format!(
            "{} active processor(s): the share's CPUs",
            share.cpus
        ));
    }
    // The user's flags come after: for a JVM the last of a flag wins.
    let mut value = flags.join(" ");
    if let Some(own) = env_value(env, "JAVA_TOOL_OPTIONS") {
        let _ = write!(value, " {own}");
    }
    Ok(Profile {
        runtime: Runtime::Jvm,
        env: vec![("JAVA_TOOL_OPTIONS".into(), value.trim().to_string())],
        reasons,
    })
}

/// The settings of a container running `runtime` with `share` of the pod
/// VM, given its environment (`KEY=VALUE`; what it sets wins) and, for a
/// JVM, what was measured.
pub fn profile(
    runtime: Runtime,
    share: Share,
    env: &[String],
    facts: JvmFacts,
) -> Result<Profile, ProfileError> {
    let mib = share.memory_bytes / MIB;
    let mut out = Profile {
        runtime,
        env: vec![],
        reasons: vec![],
    };
    let mut set = |key: &str, value: String, why: String| match env_value(env, key) {
        Some(own) => out
            .reasons
            .push(format!("{key}={own}: the container's own")),
        None => {
            out.reasons.push(format!("{key}={value}: {why}"));
            out.env.push((key.to_string(), value));
        }
    };
    match runtime {
        Runtime::Jvm => return jvm(share, env, facts),
        Runtime::Go => {
            set(
                "GOMAXPROCS",
                share.cpus.to_string(),
                "the share's CPUs".into(),
            );
            set(
                "GOMEMLIMIT",
                format!("{}MiB", mib * 9 / 10),
                format!("90 % of the share's {mib} MiB"),
            );
        }
        Runtime::Node => {
            let own = env_value(env, "NODE_OPTIONS").unwrap_or("");
            if own.contains("--max-old-space-size") {
                out.reasons
                    .push("--max-old-space-size: the container's own NODE_OPTIONS".into());
            } else {
                let size = mib * 3 / 4;
                out.env.push((
                    "NODE_OPTIONS".into(),
                    format!("--max-old-space-size={size} {own}")
                        .trim()
                        .to_string(),
                ));
                out.reasons.push(format!(
                    "--max-old-space-size={size}: 75 % of the share's {mib} MiB"
                ));
            }
        }
        Runtime::Python => set(
            "PYTHON_CPU_COUNT",
            share.cpus.to_string(),
            "the share's CPUs (os.cpu_count(), Python 3.13 and later)".into(),
        ),
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(args: &[&str]) -> Vec<String> {
        args.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn runtimes_are_known_from_the_command_and_environment() {
        assert_eq!(
            detect(&v(&["java", "-jar", "app.jar"]), &[]),
            Some(Runtime::Jvm)
        );
        assert_eq!(detect(&v(&["/usr/bin/java"]), &[]), Some(Runtime::Jvm));
        assert_eq!(
            detect(&v(&["sh", "-c", "exec java -cp /app Main"]), &[]),
            Some(Runtime::Jvm)
        );
        assert_eq!(
            detect(&v(&["/opt/jdk/bin/jshell"]), &v(&["JAVA_HOME=/opt/jdk/"])),
            Some(Runtime::Jvm)
        );
        assert_eq!(detect(&v(&["node", "server.js"]), &[]), Some(Runtime::Node));
        assert_eq!(
            detect(&v(&["python3.11", "-m", "http.server"]), &[]),
            Some(Runtime::Python)
        );
        assert_eq!(detect(&v(&["python3"]), &[]), Some(Runtime::Python));
        assert_eq!(detect(&v(&["python3x"]), &[]), None);
        assert_eq!(detect(&v(&["/app/server"]), &[]), None);
        assert_eq!(detect(&[], &[]), None);
    }

    #[test]
    fn the_command_word_is_the_program_as_written() {
        assert_eq!(
            command_word(&v(&["/usr/bin/java", "-jar"])),
            Some("/usr/bin/java")
        );
        assert_eq!(
            command_word(&v(&["/bin/sh", "-c", "exec /app/server --port 80"])),
            Some("/app/server")
        );
        assert_eq!(command_word(&v(&["sh", "-c", ""])), None);
        assert_eq!(python_version("python3.11"), Some("3.11"));
        assert_eq!(python_version("python3"), None);
        assert_eq!(python_version("python3.x"), None);
        assert_eq!(python_version("python3."), None);
    }

    fn tool_options(p: &Profile) -> &str {
        &p.env
            .iter()
            .find(|(k, _)| k == "JAVA_TOOL_OPTIONS")
            .unwrap()
            .1
    }

    fn heap_mib(p: &Profile) -> u64 {
        tool_options(p)
            .split_whitespace()
            .find_map(|f| f.strip_prefix("-Xmx")?.strip_suffix('m')?.parse().ok())
            .unwrap()
    }

    #[test]
    fn a_jvm_of_1_gib_gets_at_least_half_as_heap_and_its_cpus() {
        let share = Share {
            memory_bytes: 1 << 30,
            cpus: 2,
        };
        let p = profile(Runtime::Jvm, share, &[], JvmFacts::default()).unwrap();
        assert!(heap_mib(&p) >= 512, "{p:?}");
        assert!(
            tool_options(&p).contains("-XX:ActiveProcessorCount=2"),
            "{p:?}"
        );
        assert!(p.reasons.iter().any(|r| r.contains("estimated")), "{p:?}");
        // Every region adds up to no more than the share.
        let flags = tool_options(&p);
        let size = |prefix: &str| -> u64 {
            flags
                .split_whitespace()
                .find_map(|f| jvm_size(f.strip_prefix(prefix)?))
                .unwrap()
        };
        let sum = size("-Xmx")
            + size("-XX:MaxMetaspaceSize=")
            + size("-XX:ReservedCodeCacheSize=")
            + size("-XX:MaxDirectMemorySize=")
            + DEFAULT_THREADS * size("-Xss");
        assert!(sum <= 1 << 30, "{sum}");
    }

    #[test]
    fn a_small_jvm_still_gets_a_heap_and_a_too_small_one_is_refused() {
        let small = Share {
            memory_bytes: 256 * MIB,
            cpus: 1,
        };
        let p = profile(Runtime::Jvm, small, &[], JvmFacts::default()).unwrap();
        assert!(heap_mib(&p) >= 64, "{p:?}");
        // Measured numbers replace the guesses.
        let measured = JvmFacts {
            loaded_classes: Some(3000),
            peak_threads: Some(20),
        };
        let q = profile(Runtime::Jvm, small, &[], measured).unwrap();
        assert!(heap_mib(&q) > heap_mib(&p), "{q:?}");
        assert!(
            q.reasons
                .iter()
                .any(|r| r.contains("3000 classes, measured")),
            "{q:?}"
        );
        // What a 256 MiB pod VM leaves its container: stacks are counted
        // at what they commit, and the heap still starts.
        let vm_256 = Share {
            memory_bytes: 176 * MIB,
            cpus: 1,
        };
        let t = profile(Runtime::Jvm, vm_256, &[], JvmFacts::default()).unwrap();
        assert!((40..=80).contains(&heap_mib(&t)), "{t:?}");
        assert!(
            t.reasons.iter().any(|r| r.contains("a small share")),
            "{t:?}"
        );
        assert!(
            !p.reasons.iter().any(|r| r.contains("a small share")),
            "{p:?}"
        );
        // A larger share never gets a smaller heap (the small-share rule
        // gave 19 MiB at 185 MiB but 63 MiB at 176 MiB).
        let mut last = 0;
        for mib in (130..=400).step_by(3) {
            let share = Share {
                memory_bytes: mib * MIB,
                cpus: 1,
            };
            let h = heap_mib(&profile(Runtime::Jvm, share, &[], JvmFacts::default()).unwrap());
            assert!(
                h >= last,
                "{mib} MiB: heap {h} MiB, less than {last} MiB below"
            );
            last = h;
        }
        let tiny = Share {
            memory_bytes: 96 * MIB,
            cpus: 1,
        };
        let e = profile(Runtime::Jvm, tiny, &[], JvmFacts::default()).unwrap_err();
        assert!(e.to_string().contains("has 96 MiB"), "{e}");
    }

    #[test]
    fn the_users_own_settings_win() {
        let share = Share {
            memory_bytes: 1 << 30,
            cpus: 2,
        };
        let env = v(&["JAVA_TOOL_OPTIONS=-Xmx300m -XX:ActiveProcessorCount=1"]);
        let p = profile(Runtime::Jvm, share, &env, JvmFacts::default()).unwrap();
        let flags = tool_options(&p);
        assert!(
            flags.ends_with("-Xmx300m -XX:ActiveProcessorCount=1"),
            "{flags}"
        );
        assert_eq!(flags.matches("-Xmx").count(), 1, "{flags}");
        assert_eq!(flags.matches("ActiveProcessorCount").count(), 1, "{flags}");
        let go = profile(
            Runtime::Go,
            share,
            &v(&["GOMAXPROCS=8"]),
            JvmFacts::default(),
        )
        .unwrap();
        assert_eq!(
            go.env,
            vec![("GOMEMLIMIT".to_string(), "921MiB".to_string())]
        );
        let node = profile(
            Runtime::Node,
            share,
            &v(&["NODE_OPTIONS=--max-old-space-size=100"]),
            JvmFacts::default(),
        )
        .unwrap();
        assert!(node.env.is_empty(), "{node:?}");
    }

    #[test]
    fn go_node_and_python_are_sized_to_the_share() {
        let share = Share {
            memory_bytes: 512 * MIB,
            cpus: 2,
        };
        let go = profile(Runtime::Go, share, &[], JvmFacts::default()).unwrap();
        assert_eq!(
            go.env,
            vec![
                ("GOMAXPROCS".to_string(), "2".to_string()),
                ("GOMEMLIMIT".to_string(), "460MiB".to_string())
            ]
        );
        let node = profile(
            Runtime::Node,
            share,
            &v(&["NODE_OPTIONS=--enable-source-maps"]),
            JvmFacts::default(),
        )
        .unwrap();
        assert_eq!(
            node.env,
            vec![(
                "NODE_OPTIONS".to_string(),
                "--max-old-space-size=384 --enable-source-maps".to_string()
            )]
        );
        let py = profile(Runtime::Python, share, &[], JvmFacts::default()).unwrap();
        assert_eq!(
            py.env,
            vec![("PYTHON_CPU_COUNT".to_string(), "2".to_string())]
        );
    }
}
