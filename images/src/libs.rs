//! A dynamically linked program in an image needs every shared library `ldd`
//! lists, at the same path, and its dynamic loader.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{ImageError, MissingLibrary, Result};
use crate::util::{require_tool, run_captured};

/// The shared libraries and loader of `binary` (empty for a static one), as `ldd` resolves
/// them on this host.
pub fn shared_libraries(binary: &Path) -> Result<Vec<PathBuf>> {
    let info = crate::elf::inspect(binary)?.ok_or_else(|| ImageError::Elf {
        path: binary.to_path_buf(),
        reason: "not an ELF file".into(),
    })?;
    let Some(interp) = info.interp else {
        return Ok(Vec::new());
    };
    let ldd = require_tool("ldd", "libc-bin")?;
    let out = run_captured(Command::new(ldd).arg(binary))?;
    let mut libs =
        parse_ldd(&String::from_utf8_lossy(&out.stdout)).map_err(|source| ImageError::Library {
            binary: binary.to_path_buf(),
            source,
        })?;
    let interp = PathBuf::from(interp);
    if !libs.contains(&interp) {
        libs.push(interp);
    }
    Ok(libs)
}

/// Parses `ldd` output into absolute library paths (the vDSO has none and is skipped).
pub fn parse_ldd(text: &str) -> Result<Vec<PathBuf>, MissingLibrary> {
    let mut libs = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not found") {
            return Err(MissingLibrary(line.to_owned()));
        }
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line.split_whitespace().next(),
        };
        if let Some(path) = path.filter(|p| p.starts_with('/')) {
            let path = PathBuf::from(path);
            if !libs.contains(&path) {
                libs.push(path);
            }
        }
    }
    Ok(libs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_parsed() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd)\n\
                    \tlibz.so.1 => /lib/x86_64-linux-gnu/libz.so.1 (0x00007f)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f)\n";
        let libs = parse_ldd(text).unwrap();
        assert_eq!(
            libs,
            [
                PathBuf::from("/lib/x86_64-linux-gnu/libz.so.1"),
                PathBuf::from("/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/lib64/ld-linux-x86-64.so.2"),
            ]
        );
        assert!(parse_ldd("\tlibfoo.so => not found\n").is_err());
    }

    #[test]
    fn host_shell_libraries() {
        let sh = std::fs::canonicalize(crate::util::find_tool("sh").unwrap()).unwrap();
        let libs = shared_libraries(&sh).unwrap();
        assert!(
            libs.iter().any(|l| l.to_string_lossy().contains("libc.so")),
            "{libs:?}"
        );
        assert!(
            libs.iter()
                .any(|l| l.to_string_lossy().contains("ld-linux")),
            "{libs:?}"
        );
    }
}
