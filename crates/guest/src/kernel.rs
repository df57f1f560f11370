//! Guest kernel discovery: which `vmlinuz` to boot, its release, and where its
//! modules are.
//!
//! The guest kernel is Debian's `linux-image-cloud-amd64`: the newest
//! `/boot/vmlinuz-*-cloud-amd64`, its modules in `/lib/modules/<release>`.
//! An explicit image (`--kernel PATH`) overrides the search; its release is
//! read from its file name `vmlinuz-<release>`.

use std::cmp::Ordering;
use std::path::{Path, PathBuf};

use crate::GuestError;

/// Prefix of kernel image file names.
const IMAGE_PREFIX: &str = "vmlinuz-";
/// Suffix of the release of the kernel flavour podvisor boots.
const FLAVOUR_SUFFIX: &str = "-cloud-amd64";

/// Where the host keeps kernel images and their modules; injectable so tests
/// can use a fake tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelLocations {
    /// Directory holding `vmlinuz-<release>` images (normally `/boot`).
    pub boot_dir: PathBuf,
    /// Directory holding one `<release>/` directory of modules per kernel
    /// (normally `/lib/modules`).
    pub modules_root: PathBuf,
}

impl Default for KernelLocations {
    /// The host's own `/boot` and `/lib/modules`.
    fn default() -> Self {
        KernelLocations {
            boot_dir: PathBuf::from("/boot"),
            modules_root: PathBuf::from("/lib/modules"),
        }
    }
}

/// A guest kernel: the image to boot and where its modules are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kernel {
    /// The `vmlinuz` image, passed to QEMU's `-kernel`.
    pub image: PathBuf,
    /// The kernel release (`uname -r`), e.g. `6.1.0-56-cloud-amd64`.
    pub release: String,
    /// `<modules root>/<release>`, holding `modules.dep` and the `.ko` files.
    pub modules_dir: PathBuf,
}

impl Kernel {
    /// Finds the newest `vmlinuz-*-cloud-amd64` in `/boot`, modules in `/lib/modules`.
    pub fn discover() -> Result<Kernel, GuestError> {
        Kernel::discover_in(&KernelLocations::default())
    }

    /// Finds the newest `vmlinuz-*-cloud-amd64` in `locations.boot_dir`, by
    /// [`compare_releases`]; its modules must be in `locations.modules_root`.
    pub fn discover_in(locations: &KernelLocations) -> Result<Kernel, GuestError> {
        let boot_dir = &locations.boot_dir;
        let entries = std::fs::read_dir(boot_dir).map_err(|error| match error.kind() {
            std::io::ErrorKind::NotFound => GuestError::NoKernel {
                boot_dir: boot_dir.clone(),
            },
            _ => GuestError::io("list directory", boot_dir, error),
        })?;
        let mut newest: Option<(String, PathBuf)> = None;
        for entry in entries {
            let entry = entry.map_err(|e| GuestError::io("list directory", boot_dir, e))?;
            let Some(release) = entry
                .file_name()
                .to_str()
                .and_then(release_from_file_name)
                .filter(|release| release.ends_with(FLAVOUR_SUFFIX))
                .map(str::to_owned)
            else {
                continue;
            };
            let is_newer = newest
                .as_ref()
                .is_none_or(|(best, _)| compare_releases(&release, best) == Ordering::Greater);
            if is_newer {
                newest = Some((release, entry.path()));
            }
        }
        let (_, image) = newest.ok_or_else(|| GuestError::NoKernel {
            boot_dir: boot_dir.clone(),
        })?;
        Kernel::from_image(&image, &locations.modules_root)
    }

    /// Describes the kernel image at `image` (named `vmlinuz-<release>`, or a
    /// symlink to such a file) whose modules are under `modules_root`.
    pub fn from_image(image: &Path, modules_root: &Path) -> Result<Kernel, GuestError> {
        let metadata =
            std::fs::metadata(image).map_err(|e| GuestError::io("read kernel image", image, e))?;
        if !metadata.is_file() {
            return Err(GuestError::io(
                "read kernel image",
                image,
                std::io::Error::other("not a regular file"),
            ));
        }
        let named_release = |path: &Path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .and_then(release_from_file_name)
                .map(str::to_owned)
        };
        // `/vmlinuz` is often a symlink to `boot/vmlinuz-<release>`.
        let release = named_release(image)
            .or_else(|| image.canonicalize().ok().as_deref().and_then(named_release))
            .ok_or_else(|| GuestError::KernelName {
                path: image.to_owned(),
            })?;
        let modules_dir = modules_root.join(&release);
        if !modules_dir.join("modules.dep").is_file() {
            return Err(GuestError::NoModules {
                release,
                modules_dir,
            });
        }
        Ok(Kernel {
            image: image.to_owned(),
            release,
            modules_dir,
        })
    }
}

/// The release in a kernel image file name `vmlinuz-<release>`, if it is one.
pub fn release_from_file_name(name: &str) -> Option<&str> {
    name.strip_prefix(IMAGE_PREFIX)
        .filter(|release| !release.is_empty() && !release.contains('/'))
}

/// Orders kernel releases by version: runs of digits compare as numbers,
/// runs of letters as text, separators only break runs, so `6.1.0-56` >
/// `6.1.0-9`, `6.10.0` > `6.9.0` and `6.1.0-1` > `6.1.0-rc1`. Releases equal
/// by that measure are ordered as plain strings, so the order is total.
pub fn compare_releases(a: &str, b: &str) -> Ordering {
    let mut a_runs = Runs(a);
    let mut b_runs = Runs(b);
    loop {
        match (a_runs.next(), b_runs.next()) {
            (None, None) => return a.cmp(b),
            (None, Some(_)) => return Ordering::Less,
            (Some(_), None) => return Ordering::Greater,
            (Some(x), Some(y)) => {
                let order = match (is_number(x), is_number(y)) {
                    (true, true) => compare_numbers(x, y),
                    // A number sorts after text in the same position
                    // ("6.1.0-56" after "6.1.0-rc1").
                    (true, false) => Ordering::Greater,
                    (false, true) => Ordering::Less,
                    (false, false) => x.cmp(y),
                };
                if order != Ordering::Equal {
                    return order;
                }
            }
        }
    }
}

/// Splits a string into maximal runs of ASCII digits and of letters,
/// dropping separators (`.`, `-`, `+`, `~`, …) between them.
struct Runs<'a>(&'a str);

impl<'a> Iterator for Runs<'a> {
    type Item = &'a str;

    fn next(&mut self) -> Option<&'a str> {
        self.0 = self.0.trim_start_matches(|c: char| !c.is_alphanumeric());
        let first = self.0.chars().next()?;
        let digit = first.is_ascii_digit();
        let end = self
            .0
            .find(|c: char| !c.is_alphanumeric() || c.is_ascii_digit() != digit)
            .unwrap_or(self.0.len());
        let (run, rest) = self.0.split_at(end);
        self.0 = rest;
        Some(run)
    }
}

fn is_number(run: &str) -> bool {
    run.bytes().all(|b| b.is_ascii_digit())
}

/// Compares two digit strings by value, whatever their length.
fn compare_numbers(x: &str, y: &str) -> Ordering {
    let x = x.trim_start_matches('0');
    let y = y.trim_start_matches('0');
    x.len().cmp(&y.len()).then_with(|| x.cmp(y))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn releases_order_numerically() {
        use Ordering::*;
        let cases = [
            ("6.1.0-56-cloud-amd64", "6.1.0-9-cloud-amd64", Greater),
            ("6.1.0-9-cloud-amd64", "6.1.0-56-cloud-amd64", Less),
            ("6.10.0-1-cloud-amd64", "6.9.0-1-cloud-amd64", Greater),
            ("6.1.0-56-cloud-amd64", "6.1.0-56-cloud-amd64", Equal),
            ("6.1.0-56-cloud-amd64", "6.1.0-rc1-cloud-amd64", Greater),
            ("6.1.0-10-cloud-amd64", "6.1.0-010-cloud-amd64", Greater),
            ("6.1.1-1-cloud-amd64", "6.1.0-99-cloud-amd64", Greater),
            ("5.10.0-30-cloud-amd64", "6.1.0-1-cloud-amd64", Less),
            ("6.1.0-1", "6.1.0-1-cloud-amd64", Less),
            ("6.1.0-1-cloud-amd64", "6.1.0.1-cloud-amd64", Less),
        ];
        for (a, b, want) in cases {
            assert_eq!(compare_releases(a, b), want, "{a} vs {b}");
        }
        let mut releases = vec!["6.1.0-9", "6.1.0-56", "6.1.0-10", "5.19.0-100", "6.1.0-9"];
        releases.sort_by(|a, b| compare_releases(a, b));
        assert_eq!(
            releases,
            ["5.19.0-100", "6.1.0-9", "6.1.0-9", "6.1.0-10", "6.1.0-56"]
        );
    }

    #[test]
    fn release_comes_from_file_name() {
        assert_eq!(
            release_from_file_name("vmlinuz-6.1.0-56-cloud-amd64"),
            Some("6.1.0-56-cloud-amd64")
        );
        assert_eq!(release_from_file_name("vmlinuz-"), None);
        assert_eq!(
            release_from_file_name("initrd.img-6.1.0-56-cloud-amd64"),
            None
        );
    }

    /// Makes `boot/` with the given images and `modules/<release>/modules.dep`
    /// for each release in `with_modules`.
    fn fake_tree(images: &[&str], with_modules: &[&str]) -> (tempfile::TempDir, KernelLocations) {
        let dir = tempfile::tempdir().unwrap();
        let locations = KernelLocations {
            boot_dir: dir.path().join("boot"),
            modules_root: dir.path().join("modules"),
        };
        std::fs::create_dir_all(&locations.boot_dir).unwrap();
        for image in images {
            std::fs::write(locations.boot_dir.join(image), b"kernel").unwrap();
        }
        for release in with_modules {
            let modules_dir = locations.modules_root.join(release);
            std::fs::create_dir_all(&modules_dir).unwrap();
            std::fs::write(modules_dir.join("modules.dep"), b"").unwrap();
        }
        (dir, locations)
    }

    #[test]
    fn discovers_newest_cloud_kernel() {
        let (_dir, locations) = fake_tree(
            &[
                "vmlinuz-6.1.0-9-cloud-amd64",
                "vmlinuz-6.1.0-56-cloud-amd64",
                "vmlinuz-6.1.0-10-cloud-amd64",
                "vmlinuz-6.1.0-99-amd64",
                "initrd.img-6.1.0-99-cloud-amd64",
                "config-6.1.0-99-cloud-amd64",
            ],
            &["6.1.0-56-cloud-amd64"],
        );
        let kernel = Kernel::discover_in(&locations).unwrap();
        assert_eq!(kernel.release, "6.1.0-56-cloud-amd64");
        assert_eq!(
            kernel.image,
            locations.boot_dir.join("vmlinuz-6.1.0-56-cloud-amd64")
        );
        assert_eq!(
            kernel.modules_dir,
            locations.modules_root.join("6.1.0-56-cloud-amd64")
        );
    }

    #[test]
    fn no_kernel_says_what_to_install() {
        let (_dir, locations) = fake_tree(&["vmlinuz-6.1.0-9-amd64"], &[]);
        let error = Kernel::discover_in(&locations).unwrap_err().to_string();
        assert!(
            error.contains("install linux-image-cloud-amd64 or pass --kernel"),
            "{error}"
        );
        let missing = KernelLocations {
            boot_dir: locations.boot_dir.join("absent"),
            ..locations
        };
        let error = Kernel::discover_in(&missing).unwrap_err();
        assert!(matches!(error, GuestError::NoKernel { .. }), "{error}");
    }

    #[test]
    fn missing_modules_dir_is_named() {
        let (_dir, locations) = fake_tree(&["vmlinuz-6.1.0-9-cloud-amd64"], &[]);
        let error = Kernel::discover_in(&locations).unwrap_err().to_string();
        assert!(error.contains("6.1.0-9-cloud-amd64"), "{error}");
        assert!(error.contains("modules"), "{error}");
    }

    #[test]
    fn explicit_image_and_symlink() {
        let (dir, locations) = fake_tree(&["vmlinuz-5.0.0-1-custom"], &["5.0.0-1-custom"]);
        let image = locations.boot_dir.join("vmlinuz-5.0.0-1-custom");
        let kernel = Kernel::from_image(&image, &locations.modules_root).unwrap();
        assert_eq!(kernel.release, "5.0.0-1-custom");

        let link = dir.path().join("vmlinuz");
        std::os::unix::fs::symlink(&image, &link).unwrap();
        let kernel = Kernel::from_image(&link, &locations.modules_root).unwrap();
        assert_eq!(
            (kernel.image, kernel.release.as_str()),
            (link, "5.0.0-1-custom")
        );

        let odd = dir.path().join("bzImage");
        std::fs::write(&odd, b"kernel").unwrap();
        let error = Kernel::from_image(&odd, &locations.modules_root).unwrap_err();
        assert!(matches!(error, GuestError::KernelName { .. }), "{error}");
        assert!(error.to_string().contains("bzImage"));

        let absent = dir.path().join("vmlinuz-9-absent");
        let error = Kernel::from_image(&absent, &locations.modules_root).unwrap_err();
        assert!(error.to_string().contains("vmlinuz-9-absent"), "{error}");
    }
}
