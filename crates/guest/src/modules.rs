//! Kernel module resolution from `modules.dep`.
//!
//! `modules.dep` (written by `depmod`) has one line per module:
//! `kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko …`,
//! paths relative to `/lib/modules/<release>/`, each module followed by all
//! the modules it needs, the ones to load last listed first. [`ModuleIndex`]
//! turns a set of module names into the files to load, dependencies first,
//! each once.
//!
//! Module names are file basenames without `.ko`; `-` and `_` are the same
//! (`dm-crypt` is `dm_crypt`). The agent loads raw `.ko` files with
//! `init_module(2)`, so a compressed module (`.ko.xz`, `.ko.zst`, `.ko.gz`) is
//! an error rather than something to load.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::GuestError;

/// Extensions of compressed modules, which the agent cannot load.
const COMPRESSED_EXTENSIONS: [&str; 3] = [".ko.xz", ".ko.zst", ".ko.gz"];

/// One module to load.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModule {
    /// The module name, with `_` for `-`.
    pub name: String,
    /// Its path relative to the kernel's modules directory, as in `modules.dep`.
    pub relative_path: String,
    /// Its path on the host.
    pub path: PathBuf,
}

/// One line of `modules.dep`.
#[derive(Debug, Clone)]
struct DepEntry {
    relative_path: String,
    /// Dependencies as listed (relative paths, load-last first).
    deps: Vec<String>,
}

/// The parsed `modules.dep` of one kernel.
#[derive(Debug, Clone)]
pub struct ModuleIndex {
    modules_dir: PathBuf,
    dep_file: PathBuf,
    /// Entries keyed by normalized module name.
    by_name: HashMap<String, DepEntry>,
    /// Normalized module name of each relative path.
    name_of_path: HashMap<String, String>,
}

/// Visiting state of a module during resolution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mark {
    InProgress,
    Done,
}

impl ModuleIndex {
    /// Reads `<modules_dir>/modules.dep`.
    pub fn load(modules_dir: &Path) -> Result<ModuleIndex, GuestError> {
        let dep_file = modules_dir.join("modules.dep");
        let text =
            std::fs::read_to_string(&dep_file).map_err(|e| GuestError::io("read", &dep_file, e))?;
        ModuleIndex::parse(modules_dir, &text)
    }

    /// Parses the text of `<modules_dir>/modules.dep`.
    pub fn parse(modules_dir: &Path, text: &str) -> Result<ModuleIndex, GuestError> {
        let dep_file = modules_dir.join("modules.dep");
        let mut index = ModuleIndex {
            modules_dir: modules_dir.to_owned(),
            dep_file,
            by_name: HashMap::new(),
            name_of_path: HashMap::new(),
        };
        for (number, line) in text.lines().enumerate() {
            let line_error = |reason: String| GuestError::ModulesDep {
                path: index.dep_file.clone(),
                line: number + 1,
                reason,
            };
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (module, deps) = line
                .split_once(':')
                .ok_or_else(|| line_error(format!("expected `module.ko: deps…`, got {line:?}")))?;
            let relative_path = index.relative(module.trim()).map_err(&line_error)?;
            let deps = deps
                .split_whitespace()
                .map(|dep| index.relative(dep))
                .collect::<Result<Vec<_>, _>>()
                .map_err(&line_error)?;
            let name = module_name(&relative_path)
                .ok_or_else(|| line_error(format!("{relative_path} is not a kernel module")))?;
            if let Some(previous) = index.by_name.get(&name) {
                return Err(line_error(format!(
                    "module {name} listed twice ({} and {relative_path})",
                    previous.relative_path
                )));
            }
            index
                .name_of_path
                .insert(relative_path.clone(), name.clone());
            index.by_name.insert(
                name,
                DepEntry {
                    relative_path,
                    deps,
                },
            );
        }
        Ok(index)
    }

    /// The `modules.dep` this index was read from.
    pub fn dep_file(&self) -> &Path {
        &self.dep_file
    }

    /// Whether a module of this name (`-` and `_` alike) is listed.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(&normalize(name))
    }

    /// The modules to load so that every module in `names` is loaded:
    /// dependencies first, each module once, in a stable order (requests in
    /// the order given, each preceded by what it needs).
    pub fn resolve<S: AsRef<str>>(&self, names: &[S]) -> Result<Vec<ResolvedModule>, GuestError> {
        let mut marks: HashMap<String, Mark> = HashMap::new();
        let mut order = Vec::new();
        let mut stack = Vec::new();
        for name in names {
            let name = normalize(name.as_ref());
            if !self.by_name.contains_key(&name) {
                return Err(GuestError::UnknownModule {
                    module: name,
                    dep_file: self.dep_file.clone(),
                    required_by: None,
                });
            }
            self.visit(&name, &mut marks, &mut stack, &mut order)?;
        }
        order
            .into_iter()
            .map(|name| {
                let entry = &self.by_name[&name];
                let path = self.modules_dir.join(&entry.relative_path);
                if COMPRESSED_EXTENSIONS
                    .iter()
                    .any(|ext| entry.relative_path.ends_with(ext))
                {
                    return Err(GuestError::CompressedModule { module: name, path });
                }
                Ok(ResolvedModule {
                    relative_path: entry.relative_path.clone(),
                    path,
                    name,
                })
            })
            .collect()
    }

    /// Depth-first post-order visit of `name`: appends its dependencies, then
    /// itself, to `order`. `stack` holds the modules being visited, for the
    /// cycle message.
    fn visit(
        &self,
        name: &str,
        marks: &mut HashMap<String, Mark>,
        stack: &mut Vec<String>,
        order: &mut Vec<String>,
    ) -> Result<(), GuestError> {
        match marks.get(name) {
            Some(Mark::Done) => return Ok(()),
            Some(Mark::InProgress) => {
                let start = stack.iter().position(|m| m == name).unwrap_or(0);
                let mut cycle = stack[start..].to_vec();
                cycle.push(name.to_owned());
                return Err(GuestError::ModuleCycle {
                    dep_file: self.dep_file.clone(),
                    cycle,
                });
            }
            None => {}
        }
        marks.insert(name.to_owned(), Mark::InProgress);
        stack.push(name.to_owned());
        let entry = &self.by_name[name];
        // modules.dep lists what to load last first; walk it backwards so the
        // load order matches modprobe's.
        for dep in entry.deps.iter().rev() {
            let dep_name = self
                .name_of_path
                .get(dep)
                .ok_or_else(|| GuestError::UnknownModule {
                    module: dep.clone(),
                    dep_file: self.dep_file.clone(),
                    required_by: Some(name.to_owned()),
                })?;
            self.visit(dep_name, marks, stack, order)?;
        }
        stack.pop();
        marks.insert(name.to_owned(), Mark::Done);
        order.push(name.to_owned());
        Ok(())
    }

    /// Turns a path from `modules.dep` into one relative to the modules
    /// directory (old `depmod`s wrote absolute paths), refusing anything that
    /// would leave it.
    fn relative(&self, path: &str) -> Result<String, String> {
        let relative = match Path::new(path).strip_prefix(&self.modules_dir) {
            Ok(inside) => inside.to_str().unwrap_or(path).to_owned(),
            Err(_) => path.to_owned(),
        };
        let escapes = Path::new(&relative)
            .components()
            .any(|c| !matches!(c, std::path::Component::Normal(_)));
        if relative.is_empty() || escapes {
            return Err(format!(
                "module path {path} is not inside {}",
                self.modules_dir.display()
            ));
        }
        Ok(relative)
    }
}

/// Canonical form of a module name: `-` replaced by `_`.
pub fn normalize(name: &str) -> String {
    name.replace('-', "_")
}

/// The module name of a module file path (`…/dm-crypt.ko.xz` → `dm_crypt`),
/// or `None` if the path does not name a module file.
pub fn module_name(path: &str) -> Option<String> {
    let file = path.rsplit('/').next()?;
    std::iter::once(".ko")
        .chain(COMPRESSED_EXTENSIONS)
        .find_map(|ext| file.strip_suffix(ext))
        .filter(|stem| !stem.is_empty())
        .map(normalize)
}

#[cfg(test)]
#[path = "modules_tests.rs"]
mod tests;
