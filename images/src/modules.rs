//! Kernel module closures from `modules.dep` (as written by `depmod`): given module names
//! (`-` and `_` are interchangeable, as for `modprobe`), the modules to `insmod` in load
//! order, dependencies first and each once. Modules built into the kernel
//! (`modules.builtin`) are skipped.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use crate::error::{ImageError, IoContext, Result};

/// One module of a closure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Module {
    /// Canonical name (`_`, no extension), as `insmod` and `/sys/module` know it.
    pub name: String,
    /// Path relative to the modules directory, e.g. `kernel/arch/x86/kvm/kvm.ko`.
    pub rel_path: String,
}

/// The parsed `modules.dep` (and `modules.builtin`) of one kernel.
#[derive(Debug, Clone, Default)]
pub struct ModuleDb {
    dir: PathBuf,
    /// name -> (relative path, dependencies as listed: the full transitive set).
    modules: HashMap<String, (String, Vec<String>)>,
    builtin: HashSet<String>,
}

/// The canonical form of a module name: `-` becomes `_`.
pub fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

/// The canonical module name of a path like `kernel/net/tun.ko.xz`.
pub fn name_of(rel_path: &str) -> String {
    let file = rel_path.rsplit('/').next().unwrap_or(rel_path);
    let stem = file.split_once(".ko").map_or(file, |(stem, _)| stem);
    canonical(stem)
}

impl ModuleDb {
    /// Reads `modules.dep` (required) and `modules.builtin` (optional) from `dir`
    /// (`.../lib/modules/<version>`).
    pub fn load(dir: &Path) -> Result<Self> {
        let dep_path = dir.join("modules.dep");
        let dep = std::fs::read_to_string(&dep_path)
            .ctx(|| format!("cannot read {} (was depmod run?)", dep_path.display()))?;
        let builtin = std::fs::read_to_string(dir.join("modules.builtin")).unwrap_or_default();
        let mut db = Self::parse(&dep, &builtin)?;
        db.dir = dir.to_path_buf();
        Ok(db)
    }

    /// Parses the texts of `modules.dep` and `modules.builtin`.
    pub fn parse(dep: &str, builtin: &str) -> Result<Self> {
        let mut modules = HashMap::new();
        for (n, line) in dep.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let Some((path, deps)) = line.split_once(':') else {
                return Err(ImageError::Module(format!(
                    "modules.dep line {}: no ':' in {line:?}",
                    n + 1
                )));
            };
            let deps = deps.split_whitespace().map(name_of).collect();
            modules.insert(name_of(path.trim()), (path.trim().to_string(), deps));
        }
        let builtin = builtin
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| name_of(l.trim()))
            .collect();
        Ok(Self {
            dir: PathBuf::new(),
            modules,
            builtin,
        })
    }

    /// The modules directory this database was loaded from.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The absolute path of a module of this database.
    pub fn path(&self, module: &Module) -> PathBuf {
        self.dir.join(&module.rel_path)
    }

    /// Whether `name` is a loadable module or built into the kernel.
    pub fn knows(&self, name: &str) -> bool {
        let name = canonical(name);
        self.modules.contains_key(&name) || self.builtin.contains(&name)
    }

    /// The closure of `names` in load order: every module after its dependencies, each once.
    /// Unknown names are an error; built-in ones are skipped.
    pub fn closure<S: AsRef<str>>(&self, names: &[S]) -> Result<Vec<Module>> {
        let mut order = Vec::new();
        let mut done = HashSet::new();
        for name in names {
            let name = canonical(name.as_ref());
            if !self.modules.contains_key(&name) {
                if self.builtin.contains(&name) {
                    tracing::debug!("module {name} is built into the kernel");
                    continue;
                }
                return Err(ImageError::Module(format!(
                    "module {name} is neither in modules.dep nor built in"
                )));
            }
            self.visit(&name, &mut done, &mut Vec::new(), &mut order)?;
        }
        Ok(order)
    }

    fn visit(
        &self,
        name: &str,
        done: &mut HashSet<String>,
        path: &mut Vec<String>,
        order: &mut Vec<Module>,
    ) -> Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if path.iter().any(|p| p == name) {
            return Err(ImageError::Module(format!(
                "module dependency cycle: {} -> {name}",
                path.join(" -> ")
            )));
        }
        let Some((rel_path, deps)) = self.modules.get(name) else {
            // A dependency named in modules.dep without its own line: built in or broken.
            if self.builtin.contains(name) {
                return Ok(());
            }
            return Err(ImageError::Module(format!(
                "module {name} (a dependency of {}) has no modules.dep line",
                path.join(" -> ")
            )));
        };
        path.push(name.to_string());
        // depmod lists dependencies so that loading them last-to-first works: keep that
        // order among independent modules.
        for dep in deps.iter().rev() {
            self.visit(dep, done, path, order)?;
        }
        path.pop();
        done.insert(name.to_string());
        order.push(Module {
            name: name.to_string(),
            rel_path: rel_path.clone(),
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = "\
kernel/virt/lib/irqbypass.ko:
kernel/arch/x86/kvm/kvm.ko: kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm-intel.ko: kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko
kernel/arch/x86/kvm/kvm-amd.ko: kernel/drivers/crypto/ccp/ccp.ko kernel/arch/x86/kvm/kvm.ko kernel/virt/lib/irqbypass.ko
kernel/drivers/crypto/ccp/ccp.ko:
kernel/drivers/net/tun.ko.xz:
kernel/drivers/virtio/virtio_ring.ko:
kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko
kernel/drivers/misc/pvpanic/pvpanic.ko:
kernel/drivers/misc/pvpanic/pvpanic-mmio.ko: kernel/drivers/misc/pvpanic/pvpanic.ko
";
    const BUILTIN: &str = "kernel/drivers/block/loop.ko\n";

    fn names(mods: &[Module]) -> Vec<&str> {
        mods.iter().map(|m| m.name.as_str()).collect()
    }

    #[test]
    fn dependencies_first_no_duplicates() {
        let db = ModuleDb::parse(DEP, BUILTIN).unwrap();
        let mods = db.closure(&["kvm-amd", "kvm_intel", "tun"]).unwrap();
        assert_eq!(
            names(&mods),
            ["irqbypass", "kvm", "ccp", "kvm_amd", "kvm_intel", "tun"]
        );
        assert_eq!(mods[3].rel_path, "kernel/arch/x86/kvm/kvm-amd.ko");
        assert_eq!(mods[5].rel_path, "kernel/drivers/net/tun.ko.xz");
    }

    #[test]
    fn dash_and_underscore_are_the_same() {
        let db = ModuleDb::parse(DEP, BUILTIN).unwrap();
        let a = db.closure(&["virtio_rng", "pvpanic_mmio"]).unwrap();
        let b = db
            .closure(&["virtio-rng", "pvpanic-mmio", "virtio_rng"])
            .unwrap();
        assert_eq!(a, b);
        assert_eq!(
            names(&a),
            [
                "virtio_ring",
                "virtio",
                "virtio_rng",
                "pvpanic",
                "pvpanic_mmio"
            ]
        );
        assert!(db.knows("kvm-amd") && db.knows("loop") && !db.knows("nope"));
    }

    #[test]
    fn builtin_skipped_unknown_rejected() {
        let db = ModuleDb::parse(DEP, BUILTIN).unwrap();
        assert_eq!(
            names(&db.closure(&["loop", "kvm"]).unwrap()),
            ["irqbypass", "kvm"]
        );
        let err = db.closure(&["no-such-module"]).unwrap_err();
        assert!(err.to_string().contains("no_such_module"), "{err}");
    }

    #[test]
    fn cycle_is_an_error() {
        let db = ModuleDb::parse("a.ko: b.ko\nb.ko: a.ko\n", "").unwrap();
        assert!(
            db.closure(&["a"])
                .unwrap_err()
                .to_string()
                .contains("cycle")
        );
    }

    #[test]
    fn malformed_line() {
        assert!(ModuleDb::parse("kernel/x.ko\n", "").is_err());
    }
}
