//! Kernel samepage merging (KSM) on a host whose daemon runs it for its
//! pods (`podvisor host --ksm`): turned on when the daemon starts, at the
//! daemon's scan rate; the machine's previous settings put back when it
//! stops; what KSM saves and what ksmd costs read for the host's status.
//!
//! KSM merges only private anonymous memory that a process marked
//! mergeable: the guest RAM of pod VMs launched with QEMU's
//! `mem-merge=on` ([`crate::host::HostConfig::memory_merge`]), never
//! template RAM files or pmem. Its settings and counters are the
//! machine's (`/sys/kernel/mm/ksm`), so one machine should have one
//! daemon with `--ksm`.
//!
//! The previous settings are written to the daemon's state directory
//! (`ksm-before.json`) before anything is changed, and removed once they
//! are back: a daemon killed in between leaves them there, and the next
//! daemon puts those back (with `--ksm`: when it stops; without: at once)
//! rather than taking its predecessor's settings for the machine's.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use podvisor_api as api;
use serde::{Deserialize, Serialize};

/// KSM's files.
pub const SYSFS_DIR: &str = "/sys/kernel/mm/ksm";
/// The file in a daemon's state directory holding the settings to put
/// back.
pub const BEFORE_FILE: &str = "ksm-before.json";
/// `PF_KTHREAD` in `/proc/<pid>/stat`'s flags: a kernel thread (a user
/// process may call itself `ksmd`, but it is not one).
const PF_KTHREAD: u64 = 0x0020_0000;

/// Errors of reading and changing KSM's settings.
#[derive(Debug, thiserror::Error)]
pub enum KsmError {
    #[error("cannot read {path} (a kernel without KSM?)")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds {text:?}, not a number")]
    NotANumber { path: PathBuf, text: String },
    #[error("cannot write {value} to {path} (not root?)")]
    Write {
        path: PathBuf,
        value: u64,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot keep the previous KSM settings in {path}")]
    Keep {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a record of KSM settings")]
    BadRecord {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// How fast ksmd scans: `pages_to_scan` pages each time it wakes up,
/// every `sleep_millisecs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanRate {
    pub pages_to_scan: u64,
    pub sleep_millisecs: u64,
}

impl Default for ScanRate {
    /// 1000 pages every 20 ms: 50,000 pages (195 MiB) a second, ten times
    /// the kernel's default, so that a pass over a few GiB of pod RAM
    /// takes seconds rather than minutes.
    fn default() -> Self {
        ScanRate {
            pages_to_scan: 1000,
            sleep_millisecs: 20,
        }
    }
}

/// The settings a daemon changes, as they were before.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Settings {
    /// 0 stopped, 1 running, 2 unmerging.
    pub run: u64,
    pub pages_to_scan: u64,
    pub sleep_millisecs: u64,
}

/// KSM's files and ksmd's process: the machine's, or a fake tree in
/// tests.
#[derive(Debug)]
pub struct Ksm {
    /// `/sys/kernel/mm/ksm`.
    sysfs: PathBuf,
    /// `/proc`.
    proc: PathBuf,
    /// ksmd's pid once found (it lives as long as the machine).
    ksmd: Mutex<Option<u32>>,
}

impl Ksm {
    /// The machine's.
    pub fn machine() -> Ksm {
        Ksm::at(Path::new(SYSFS_DIR), Path::new("/proc"))
    }

    /// KSM's files in `sysfs`, processes in `proc`.
    pub fn at(sysfs: &Path, proc: &Path) -> Ksm {
        Ksm {
            sysfs: sysfs.to_path_buf(),
            proc: proc.to_path_buf(),
            ksmd: Mutex::new(None),
        }
    }

    fn read_number<T: std::str::FromStr>(&self, name: &str) -> Result<T, KsmError> {
        let path = self.sysfs.join(name);
        let text = std::fs::read_to_string(&path).map_err(|source| KsmError::Read {
            path: path.clone(),
            source,
        })?;
        text.trim().parse().map_err(|_| KsmError::NotANumber {
            path,
            text: text.chars().take(64).collect(),
        })
    }

    fn write_number(&self, name: &str, value: u64) -> Result<(), KsmError> {
        let path = self.sysfs.join(name);
        std::fs::write(&path, format!("{value}\n")).map_err(|source| KsmError::Write {
            path,
            value,
            source,
        })
    }

    /// The settings a daemon changes, as they are now.
    pub fn settings(&self) -> Result<Settings, KsmError> {
        Ok(Settings {
            run: self.read_number("run")?,
            pages_to_scan: self.read_number("pages_to_scan")?,
            sleep_millisecs: self.read_number("sleep_millisecs")?,
        })
    }

    /// Writes `s`: the scan rate first, so ksmd never runs at a rate
    /// nobody chose.
    fn set(&self, s: &Settings) -> Result<(), KsmError> {
        self.write_number("pages_to_scan", s.pages_to_scan)?;
        self.write_number("sleep_millisecs", s.sleep_millisecs)?;
        self.write_number("run", s.run)
    }

    /// What KSM saves and costs now.
    pub fn report(&self) -> Result<api::HostKsm, KsmError> {
        let settings = self.settings()?;
        let pages_sharing: u64 = self.read_number("pages_sharing")?;
        // Linux 6.10 and later.
        let zero_pages: Option<u64> = self.read_number("ksm_zero_pages").ok();
        Ok(api::HostKsm {
            enabled: settings.run == 1,
            pages_shared: self.read_number("pages_shared")?,
            pages_sharing,
            pages_unshared: self.read_number("pages_unshared")?,
            full_scans: self.read_number("full_scans")?,
            zero_pages,
            saved_bytes: (pages_sharing + zero_pages.unwrap_or(0)).saturating_mul(page_size()),
            // Linux 6.4 and later.
            profit_bytes: self.read_number("general_profit").ok(),
            ksmd_cpu_seconds: self.ksmd_cpu_seconds(),
            pages_to_scan: settings.pages_to_scan,
            sleep_millisecs: settings.sleep_millisecs,
        })
    }

    /// ksmd's user and system time since boot; `None` if it cannot be
    /// found.
    fn ksmd_cpu_seconds(&self) -> Option<f64> {
        let mut known = self.ksmd.lock().unwrap();
        let ticks = match known.and_then(|pid| ksmd_ticks(&self.proc, pid)) {
            Some(t) => t,
            None => {
                let (pid, ticks) = find_ksmd(&self.proc)?;
                *known = Some(pid);
                ticks
            }
        };
        Some(ticks as f64 / clock_ticks_per_second() as f64)
    }
}

/// The utime + stime of `pid` if it is the kernel thread ksmd.
fn ksmd_ticks(proc: &Path, pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(proc.join(pid.to_string()).join("stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    if stat.get(open + 1..close)? != "ksmd" {
        return None;
    }
    // Fields after the name, from field 3 (state): flags is field 9,
    // utime 14, stime 15.
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    let flags: u64 = fields.get(6)?.parse().ok()?;
    if flags & PF_KTHREAD == 0 {
        return None;
    }
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// ksmd's pid and CPU ticks, by a look at every process.
fn find_ksmd(proc: &Path) -> Option<(u32, u64)> {
    std::fs::read_dir(proc)
        .ok()?
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .find_map(|pid| Some((pid, ksmd_ticks(proc, pid)?)))
}

fn page_size() -> u64 {
    // SAFETY: sysconf reads a constant of the system; no memory is passed.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if size > 0 { size as u64 } else { 4096 }
}

fn clock_ticks_per_second() -> u64 {
    // SAFETY: as in `page_size`.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as u64 } else { 100 }
}

/// KSM turned on by this daemon; puts the settings from before back when
/// [`KsmOn::restore`]d or dropped.
#[derive(Debug)]
pub struct KsmOn {
    ksm: Ksm,
    before: Settings,
    /// Where `before` is kept until it is back.
    record: PathBuf,
    restored: AtomicBool,
}

impl KsmOn {
    /// Keeps the settings to put back in `state_dir` (those a killed
    /// daemon left there, else the current ones), then starts ksmd at
    /// `rate`.
    pub fn start(ksm: Ksm, rate: ScanRate, state_dir: &Path) -> Result<KsmOn, KsmError> {
        let record = state_dir.join(BEFORE_FILE);
        let before = match read_record(&record)? {
            Some(left) => {
                tracing::info!(
                    run = left.run,
                    pages_to_scan = left.pages_to_scan,
                    sleep_millisecs = left.sleep_millisecs,
                    "KSM: the settings a previous daemon changed will be put back when this one stops"
                );
                left
            }
            None => {
                let now = ksm.settings()?;
                write_record(&record, &now)?;
                now
            }
        };
        let on = KsmOn {
            ksm,
            before,
            record,
            restored: AtomicBool::new(false),
        };
        on.ksm.set(&Settings {
            run: 1,
            pages_to_scan: rate.pages_to_scan,
            sleep_millisecs: rate.sleep_millisecs,
        })?;
        tracing::info!(
            pages_to_scan = rate.pages_to_scan,
            sleep_millisecs = rate.sleep_millisecs,
            "KSM on; pods that do not ask for isolation are merged"
        );
        // `on` dropped on an error above puts `before` back.
        Ok(on)
    }

    /// What KSM saves and costs now; `None` (logged) if it cannot be read.
    pub fn report(&self) -> Option<api::HostKsm> {
        match self.ksm.report() {
            Ok(r) => Some(r),
            Err(e) => {
                tracing::warn!(
                    "reading KSM's counters: {e}",
                    e = podvisor_errors::ErrorChain(&e)
                );
                None
            }
        }
    }

    /// Puts the settings from before back (pages merged so far stay
    /// merged when ksmd is stopped) and forgets them; once.
    pub fn restore(&self) -> Result<(), KsmError> {
        if self.restored.swap(true, Ordering::SeqCst) {
            return Ok(());
        }
        self.ksm.set(&self.before)?;
        let _ = std::fs::remove_file(&self.record);
        tracing::info!(
            run = self.before.run,
            pages_to_scan = self.before.pages_to_scan,
            sleep_millisecs = self.before.sleep_millisecs,
            "KSM settings put back"
        );
        Ok(())
    }
}

impl Drop for KsmOn {
    fn drop(&mut self) {
        if let Err(e) = self.restore() {
            tracing::warn!(
                "putting the KSM settings back: {e}",
                e = podvisor_errors::ErrorChain(&e)
            );
        }
    }
}

/// For a daemon without `--ksm`: puts back the settings a killed daemon
/// with `--ksm` left in `state_dir`, if any. Returns them.
pub fn restore_left_over(ksm: &Ksm, state_dir: &Path) -> Result<Option<Settings>, KsmError> {
    let record = state_dir.join(BEFORE_FILE);
    let Some(before) = read_record(&record)? else {
        return Ok(None);
    };
    ksm.set(&before)?;
    let _ = std::fs::remove_file(&record);
    Ok(Some(before))
}

fn read_record(path: &Path) -> Result<Option<Settings>, KsmError> {
    match std::fs::read(path) {
        Ok(bytes) => {
            serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| KsmError::BadRecord {
                    path: path.to_path_buf(),
                    source,
                })
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(KsmError::Keep {
            path: path.to_path_buf(),
            source,
        }),
    }
}

/// Writes `settings` to `path` whole or not at all (a temporary file,
/// synced, renamed).
fn write_record(path: &Path, settings: &Settings) -> Result<(), KsmError> {
    let keep_error = |source| KsmError::Keep {
        path: path.to_path_buf(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(keep_error)?;
    }
    let tmp = path.with_extension("json.tmp");
    let bytes = serde_json::to_vec(settings).expect("settings serialize");
    let file = std::fs::File::create(&tmp).map_err(keep_error)?;
    std::io::Write::write_all(&mut &file, &bytes).map_err(keep_error)?;
    file.sync_all().map_err(keep_error)?;
    std::fs::rename(&tmp, path).map_err(keep_error)
}

#[cfg(test)]
#[path = "ksm_tests.rs"]
mod tests;
