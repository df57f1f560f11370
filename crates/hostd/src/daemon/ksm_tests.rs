//! KSM's settings and counters on a fake `/sys/kernel/mm/ksm` and `/proc`.

use super::*;

/// A fake machine: KSM's files as a kernel 6.x has them (stopped, the
/// kernel's scan rate), ksmd as pid 39 and a user process calling itself
/// ksmd as pid 4000.
struct FakeMachine {
    dir: tempfile::TempDir,
}

impl FakeMachine {
    fn new() -> FakeMachine {
        let m = FakeMachine {
            dir: tempfile::tempdir().unwrap(),
        };
        std::fs::create_dir_all(m.sysfs()).unwrap();
        for (name, value) in [
            ("run", "0"),
            ("pages_to_scan", "100"),
            ("sleep_millisecs", "20"),
            ("pages_shared", "1200"),
            ("pages_sharing", "30000"),
            ("pages_unshared", "5000"),
            ("full_scans", "7"),
            ("ksm_zero_pages", "100"),
            ("general_profit", "-4096"),
        ] {
            m.set(name, value);
        }
        // Real lines (kernel 6.18), times changed: utime 250, stime 50.
        m.process(
            39,
            "39 (ksmd) S 2 0 0 0 -1 2097216 0 0 0 0 250 50 0 0 25 5 1 0 12 0 0 \
             18446744073709551615 0 0 0 0 0 0 0 2147483647 0 1 0 0 17 1 0 0 0 0 0",
        );
        m.process(
            4000,
            "4000 (ksmd) S 1 4000 4000 0 -1 4194560 0 0 0 0 9999 9999 0 0 20 0 1 0 \
             500 0 0 18446744073709551615 0 0 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0",
        );
        m
    }

    fn sysfs(&self) -> PathBuf {
        self.dir.path().join("sys/kernel/mm/ksm")
    }

    fn proc(&self) -> PathBuf {
        self.dir.path().join("proc")
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn set(&self, name: &str, value: &str) {
        std::fs::write(self.sysfs().join(name), format!("{value}\n")).unwrap();
    }

    fn get(&self, name: &str) -> String {
        std::fs::read_to_string(self.sysfs().join(name))
            .unwrap()
            .trim()
            .to_string()
    }

    fn process(&self, pid: u32, stat: &str) {
        let dir = self.proc().join(pid.to_string());
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("stat"), format!("{stat}\n")).unwrap();
    }

    fn ksm(&self) -> Ksm {
        Ksm::at(&self.sysfs(), &self.proc())
    }

    fn settings(&self) -> [String; 3] {
        ["run", "pages_to_scan", "sleep_millisecs"].map(|n| self.get(n))
    }
}

#[test]
fn the_report_reads_the_counters_and_ksmds_cpu_time() {
    let m = FakeMachine::new();
    let r = m.ksm().report().unwrap();
    assert!(!r.enabled);
    assert_eq!(
        (
            r.pages_shared,
            r.pages_sharing,
            r.pages_unshared,
            r.full_scans
        ),
        (1200, 30000, 5000, 7)
    );
    assert_eq!(r.zero_pages, Some(100));
    assert_eq!(r.saved_bytes, (30000 + 100) * page_size());
    assert_eq!(r.profit_bytes, Some(-4096));
    // The kernel thread's 300 ticks, not the user process's.
    let ticks = clock_ticks_per_second() as f64;
    assert_eq!(r.ksmd_cpu_seconds, Some(300.0 / ticks));
    assert_eq!((r.pages_to_scan, r.sleep_millisecs), (100, 20));
    m.set("run", "1");
    assert!(m.ksm().report().unwrap().enabled);
}

#[test]
fn a_kernel_without_general_profit_or_a_missing_ksmd_still_reports() {
    let m = FakeMachine::new();
    std::fs::remove_file(m.sysfs().join("general_profit")).unwrap();
    std::fs::remove_file(m.sysfs().join("ksm_zero_pages")).unwrap();
    std::fs::remove_dir_all(m.proc().join("39")).unwrap();
    let r = m.ksm().report().unwrap();
    assert_eq!(r.profit_bytes, None);
    assert_eq!(r.zero_pages, None);
    assert_eq!(r.saved_bytes, 30000 * page_size());
    assert_eq!(
        r.ksmd_cpu_seconds, None,
        "a user process named ksmd is not it"
    );
    assert_eq!(r.pages_sharing, 30000);
}

#[test]
fn a_kernel_without_ksm_is_a_clear_error() {
    let m = FakeMachine::new();
    std::fs::remove_dir_all(m.sysfs()).unwrap();
    let e = m.ksm().report().unwrap_err();
    assert!(e.to_string().contains("kernel without KSM"), "{e}");
    let e = KsmOn::start(m.ksm(), ScanRate::default(), &m.state_dir()).unwrap_err();
    assert!(matches!(e, KsmError::Read { .. }), "{e}");
}

#[test]
fn on_sets_the_rate_and_restore_puts_back_what_was_there() {
    let m = FakeMachine::new();
    let rate = ScanRate {
        pages_to_scan: 1234,
        sleep_millisecs: 50,
    };
    let on = KsmOn::start(m.ksm(), rate, &m.state_dir()).unwrap();
    assert_eq!(m.settings(), ["1", "1234", "50"]);
    assert!(on.report().unwrap().enabled);
    assert!(m.state_dir().join(BEFORE_FILE).exists());
    on.restore().unwrap();
    assert_eq!(m.settings(), ["0", "100", "20"]);
    assert!(!m.state_dir().join(BEFORE_FILE).exists());

    // Dropped (an error path of the daemon): put back too.
    let on = KsmOn::start(m.ksm(), rate, &m.state_dir()).unwrap();
    assert_eq!(m.get("run"), "1");
    drop(on);
    assert_eq!(m.settings(), ["0", "100", "20"]);
}

#[test]
fn settings_a_killed_daemon_left_are_the_ones_put_back() {
    let m = FakeMachine::new();
    let rate = ScanRate::default();
    // Killed: its record stays, and so do its settings.
    std::mem::forget(KsmOn::start(m.ksm(), rate, &m.state_dir()).unwrap());
    assert_eq!(m.get("run"), "1");
    // The next daemon with --ksm does not take them for the machine's.
    let on = KsmOn::start(m.ksm(), rate, &m.state_dir()).unwrap();
    on.restore().unwrap();
    assert_eq!(m.settings(), ["0", "100", "20"]);

    // Killed again, and the next daemon runs without --ksm.
    std::mem::forget(KsmOn::start(m.ksm(), rate, &m.state_dir()).unwrap());
    let back = restore_left_over(&m.ksm(), &m.state_dir()).unwrap();
    assert_eq!(
        back,
        Some(Settings {
            run: 0,
            pages_to_scan: 100,
            sleep_millisecs: 20
        })
    );
    assert_eq!(m.settings(), ["0", "100", "20"]);
    // Nothing left: nothing is touched.
    m.set("run", "1");
    assert_eq!(restore_left_over(&m.ksm(), &m.state_dir()).unwrap(), None);
    assert_eq!(m.get("run"), "1");
}
