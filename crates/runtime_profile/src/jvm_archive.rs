//! JVM class-data archives made by a training run (issue 12): where the
//! archive and the training run's logs live, the options that make a JDK
//! write them, and reading what the run left.
//!
//! The training run starts the image's JVM as a pod would, with
//! [`training_options`] added to `JAVA_TOOL_OPTIONS`: the JVM dumps a
//! dynamic AppCDS archive of the classes it loaded when it exits (a
//! SIGTERM after the warm-up is enough), and logs each class it loads and
//! each thread it starts and ends. Pods of the image then start with the
//! archive mapped at its base address (see the agent's profile), so its
//! pages are the same in every pod VM and the host can share them.

/// Where a training run's files are written, inside the container.
pub const TRAINING_DIR: &str = "/.podvisor-training";

/// The archive's file name in [`TRAINING_DIR`].
pub const TRAINING_ARCHIVE: &str = "app.jsa";

/// The class-load log's file name in [`TRAINING_DIR`].
pub const TRAINING_CLASSES_LOG: &str = "classes.log";

/// The thread log's file name in [`TRAINING_DIR`].
pub const TRAINING_THREADS_LOG: &str = "threads.log";

/// Where pods find the archive: its path in the derived layer (relative)
/// and so in the container's root.
pub const ARCHIVE_IN_LAYER: &str = ".podvisor/jvm/app.jsa";

/// [`ARCHIVE_IN_LAYER`] as a path in the container.
pub fn archive_path() -> String {
    format!("/{ARCHIVE_IN_LAYER}")
}

/// The environment variables that change what a JVM loads, and so what an
/// archive holds and whether a JVM accepts it: they are part of an
/// archive's key, with the command.
pub const ARCHIVE_RELEVANT_ENV: &[&str] = &[
    "CLASSPATH",
    "JAVA_HOME",
    "JAVA_TOOL_OPTIONS",
    "JDK_JAVA_OPTIONS",
    "_JAVA_OPTIONS",
];

/// What the training run adds to `JAVA_TOOL_OPTIONS`.
pub fn training_options() -> String {
    format!(
        "-XX:ArchiveClassesAtExit={TRAINING_DIR}/{TRAINING_ARCHIVE} \
         -Xlog:class+load=info:file={TRAINING_DIR}/{TRAINING_CLASSES_LOG} \
         -Xlog:os+thread=info:file={TRAINING_DIR}/{TRAINING_THREADS_LOG}"
    )
}

/// The first bytes of a dynamic archive (`CDS_DYNAMIC_ARCHIVE_MAGIC`,
/// little-endian), which the training run must have written.
pub const DYNAMIC_ARCHIVE_MAGIC: [u8; 4] = 0xf00b_aba8u32.to_le_bytes();

/// Whether `head` starts like a dynamic CDS archive.
pub fn is_dynamic_archive(head: &[u8]) -> bool {
    head.starts_with(&DYNAMIC_ARCHIVE_MAGIC)
}

/// Classes the JVM loaded, from its `-Xlog:class+load` log.
pub fn loaded_classes(log: &str) -> u64 {
    log.lines().filter(|l| l.contains(" source: ")).count() as u64
}

/// Most threads alive at once, from the JVM's `-Xlog:os+thread` log (each
/// thread started or attached counts until it is reported finished or
/// detached).
pub fn peak_threads(log: &str) -> u64 {
    let (mut alive, mut peak) = (0i64, 0i64);
    for line in log.lines() {
        let Some((_, event)) = line.split_once("[os,thread] ") else {
            continue;
        };
        if event.starts_with("Thread attached") || event.contains("\" started (") {
            alive += 1;
            peak = peak.max(alive);
        } else if event.starts_with("Thread finished") || event.starts_with("Thread detached") {
            alive = (alive - 1).max(0);
        }
    }
    peak as u64
}

/// What a JDK prints (on stdout, by default) when it cannot use the
/// archive it was given: a different JDK build, a changed class path.
const REJECTED: &str = "Unable to use shared archive";

/// Whether a JVM's output says it rejected its archive.
pub fn archive_rejected(output: &[u8]) -> bool {
    output
        .windows(REJECTED.len())
        .any(|w| w == REJECTED.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Lines as JDK 17 writes them.
    const THREADS: &str = "\
[0.002s][info][os,thread] Lookup of __pthread_get_minstack succeeded
[0.002s][info][os,thread] Thread attached (tid: 19010, pthread id: 1, stack: 0x1 - 0x2 (1024K) ).
[0.005s][info][os,thread] Thread \"GC Thread#0\" started (pthread id: 2, attributes: stacksize: 1024k, guardsize: 4k, detached).
[0.005s][info][os,thread] Thread is alive (tid: 19011, pthread id: 2).
[0.006s][info][os,thread] Thread \"C2 CompilerThread0\" started (pthread id: 3, attributes: stacksize: 1024k, guardsize: 0k, detached).
[0.900s][info][os,thread] Thread finished (tid: 19012, pthread id: 3).
[0.950s][info][os,thread] Thread \"HTTP-Dispatcher\" started (pthread id: 4, attributes: stacksize: 1024k, guardsize: 4k, detached).
";

    #[test]
    fn the_logs_give_classes_and_the_most_threads_at_once() {
        let classes = "[0.020s][info][class,load] path: /app/hello.jar\n\
            [0.020s][info][class,load] java.lang.Object source: shared objects file\n\
            [0.3s][info][class,load] Hello source: file:/app/hello.jar\n";
        assert_eq!(loaded_classes(classes), 2);
        assert_eq!(peak_threads(THREADS), 3);
        assert_eq!(peak_threads("garbage\n[os,thread] Thread finished"), 0);
    }

    #[test]
    fn archives_and_rejections_are_recognised() {
        assert!(is_dynamic_archive(&[0xa8, 0xab, 0x0b, 0xf0, 0x35]));
        assert!(!is_dynamic_archive(&[0xa2, 0xab, 0x0b, 0xf0]));
        assert!(!is_dynamic_archive(b""));
        assert!(archive_rejected(
            b"[0.067s][warning][cds,dynamic] Unable to use shared archive. The top archive failed to load: /.podvisor/jvm/app.jsa\nlistening"
        ));
        assert!(!archive_rejected(b"listening\n"));
        assert!(
            training_options().contains("-XX:ArchiveClassesAtExit=/.podvisor-training/app.jsa")
        );
    }
}
