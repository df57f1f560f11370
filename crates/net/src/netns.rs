//! Network namespaces pinned by a bind mount, one per pod, and running code
//! inside one. Entering or creating a namespace is done on a dedicated thread
//! that ends afterwards: a tokio worker never changes namespace.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags, mount, umount2};
use nix::sched::{CloneFlags, setns, unshare};

#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    #[error("preparing the namespace directory {dir}")]
    Dir {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("network namespace {path} already exists")]
    Exists { path: PathBuf },
    #[error("creating network namespace {path}: {step}")]
    Create {
        path: PathBuf,
        step: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("removing network namespace {path}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("entering network namespace {path}")]
    Enter {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the thread working in network namespace {path} died")]
    ThreadDied { path: PathBuf },
}

/// Makes `dir` a shared mount point, as `ip netns` does for `/run/netns`, so
/// that unmounting a pin also unmounts its copies in mount namespaces cloned
/// meanwhile (a copy would keep the namespace alive).
pub fn prepare_dir(dir: &Path) -> Result<(), NetnsError> {
    let err = |source: io::Error| NetnsError::Dir {
        dir: dir.to_path_buf(),
        source,
    };
    fs::create_dir_all(dir).map_err(err)?;
    let shared = || {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    match shared() {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EINVAL) => {
            // Not a mount point yet: bind it onto itself first.
            mount(
                Some(dir),
                dir,
                None::<&str>,
                MsFlags::MS_BIND | MsFlags::MS_REC,
                None::<&str>,
            )
            .map_err(|e| err(e.into()))?;
            shared().map_err(|e| err(e.into()))
        }
        Err(e) => Err(err(e.into())),
    }
}

/// Whether `path` is a pinned namespace (a bind mount of an nsfs file).
pub fn is_pinned(path: &Path) -> bool {
    // nsfs: the file system of `/proc/*/ns/*` and of their bind mounts.
    nix::sys::statfs::statfs(path)
        .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
}

/// Creates a new network namespace pinned at `path` (which must not exist).
pub async fn create_pinned(path: &Path) -> Result<(), NetnsError> {
    let target = path.to_path_buf();
    run_on_thread(path, move || create_on_this_thread(&target)).await?
}

fn create_on_this_thread(path: &Path) -> Result<(), NetnsError> {
    let create = |step: &'static str, source: io::Error| NetnsError::Create {
        path: path.to_path_buf(),
        step,
        source,
    };
    match OpenOptions::new().write(true).create_new(true).open(path) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            return Err(NetnsError::Exists {
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(create("creating the mount point", e)),
    }
    let result = (|| {
        unshare(CloneFlags::CLONE_NEWNET).map_err(|e| create("unshare", e.into()))?;
        let tid = nix::unistd::gettid();
        let own = format!("/proc/self/task/{tid}/ns/net");
        mount(
            Some(own.as_str()),
            path,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| create("bind mount", e.into()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(path);
    }
    result
}

/// Unmounts and removes the pin at `path`; a path that is not there, or not
/// mounted, is fine. The namespace itself goes once nothing else holds it.
pub fn remove_pinned(path: &Path) -> Result<(), NetnsError> {
    let err = |source: io::Error| NetnsError::Remove {
        path: path.to_path_buf(),
        source,
    };
    match umount2(path, MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) | Err(nix::errno::Errno::ENOENT) => {}
        Err(e) => return Err(err(e.into())),
    }
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// Runs `f` on a fresh thread that has entered the namespace at `path`.
pub async fn run_in<T, F>(path: &Path, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let ns_path = path.to_path_buf();
    run_on_thread(path, move || {
        let file = File::open(&ns_path).map_err(|source| NetnsError::Enter {
            path: ns_path.clone(),
            source,
        })?;
        if !is_pinned(&ns_path) {
            return Err(NetnsError::Enter {
                path: ns_path.clone(),
                source: io::Error::other("not a network namespace"),
            });
        }
        setns(file.as_fd(), CloneFlags::CLONE_NEWNET).map_err(|e| NetnsError::Enter {
            path: ns_path.clone(),
            source: e.into(),
        })?;
        Ok(f())
    })
    .await?
}

/// Runs the future `f` makes on a fresh thread inside the namespace at
/// `path`, on a single-threaded runtime of that thread, with a netlink
/// connection opened there (so it works on that namespace).
pub async fn run_netlink_in<T, F, Fut>(path: &Path, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce(rtnetlink::Handle) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = T>,
{
    let ns_path = path.to_path_buf();
    run_in(path, move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| NetnsError::Enter {
                path: ns_path.clone(),
                source,
            })?;
        rt.block_on(async move {
            let (connection, handle, _) =
                rtnetlink::new_connection().map_err(|source| NetnsError::Enter {
                    path: ns_path.clone(),
                    source,
                })?;
            tokio::spawn(connection);
            Ok(f(handle).await)
        })
    })
    .await?
}

/// Runs `f` on a new thread (which then ends, taking any namespace change
/// with it) and waits for it without blocking the runtime.
async fn run_on_thread<T, F>(path: &Path, f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("podvisor-netns".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|source| NetnsError::Enter {
            path: path.to_path_buf(),
            source,
        })?;
    rx.await.map_err(|_| NetnsError::ThreadDied {
        path: path.to_path_buf(),
    })
}
