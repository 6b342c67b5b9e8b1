//! Just enough ELF64 reading for the harness: whether a file is ELF at all, whether it asks
//! for a dynamic loader (`PT_INTERP`, i.e. needs shared libraries in the image), and whether
//! a kernel carries the PVH entry note (`XEN_ELFNOTE_PHYS32_ENTRY`) that lets a VMM, or
//! QEMU's `-kernel`, boot the uncompressed `vmlinux` directly.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use crate::error::{ImageError, IoContext, Result};

const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
/// `XEN_ELFNOTE_PHYS32_ENTRY`: the 32-bit PVH entry point.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

/// What the harness needs to know about an ELF file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ElfInfo {
    /// The program interpreter (dynamic loader), if the file has one.
    pub interp: Option<String>,
    /// Whether a `Xen` note of type `XEN_ELFNOTE_PHYS32_ENTRY` is present.
    pub pvh_entry: bool,
}

/// Inspects `path`; `Ok(None)` when it is not a 64-bit little-endian ELF file.
pub fn inspect(path: &Path) -> Result<Option<ElfInfo>> {
    let file = File::open(path).ctx(|| format!("cannot open {}", path.display()))?;
    let bad = |reason: String| ImageError::Elf {
        path: path.to_path_buf(),
        reason,
    };
    let mut header = [0u8; 64];
    if file.read_exact_at(&mut header, 0).is_err() {
        return Ok(None);
    }
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Ok(None);
    }
    let phoff = u64_at(&header, 0x20);
    let phentsize = u64::from(u16_at(&header, 0x36));
    let phnum = u64::from(u16_at(&header, 0x38));
    if phentsize < 56 || phnum > 4096 {
        return Err(bad("implausible ELF program header table".into()));
    }
    let mut info = ElfInfo {
        interp: None,
        pvh_entry: false,
    };
    for i in 0..phnum {
        let mut ph = [0u8; 56];
        file.read_exact_at(&mut ph, phoff + i * phentsize)
            .map_err(|_| bad("truncated program headers".into()))?;
        let kind = u32_at(&ph, 0);
        let offset = u64_at(&ph, 8);
        let size = u64_at(&ph, 0x20);
        if (kind == PT_INTERP || kind == PT_NOTE) && size > 1 << 20 {
            return Err(bad(format!("implausible segment size {size}")));
        }
        let read_segment = || -> Result<Vec<u8>> {
            // At most 1 MiB (checked above).
            let mut buf = vec![0u8; size as usize];
            file.read_exact_at(&mut buf, offset)
                .map_err(|_| bad("truncated segment".into()))?;
            Ok(buf)
        };
        match kind {
            PT_INTERP => {
                let raw = read_segment()?;
                let text = raw.split(|&b| b == 0).next().unwrap_or_default();
                info.interp = Some(String::from_utf8_lossy(text).into_owned());
            }
            PT_NOTE => info.pvh_entry |= notes_have_pvh(&read_segment()?),
            _ => {}
        }
    }
    Ok(Some(info))
}

fn notes_have_pvh(mut notes: &[u8]) -> bool {
    let align4 = |n: usize| n.div_ceil(4) * 4;
    while notes.len() >= 12 {
        let namesz = u32_at(notes, 0) as usize;
        let descsz = u32_at(notes, 4) as usize;
        let kind = u32_at(notes, 8);
        let name_end = 12 + namesz;
        let next = 12 + align4(namesz) + align4(descsz);
        if name_end > notes.len() {
            return false;
        }
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && &notes[12..name_end] == b"Xen\0" {
            return true;
        }
        if next > notes.len() {
            return false;
        }
        notes = &notes[next..];
    }
    false
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_shell_is_dynamic_elf() {
        let sh = crate::util::find_tool("sh").unwrap();
        let sh = std::fs::canonicalize(sh).unwrap();
        let info = inspect(&sh).unwrap().expect("sh is ELF");
        assert!(info.interp.unwrap().contains("ld-linux"));
        assert!(!info.pvh_entry);
    }

    #[test]
    fn not_elf() {
        let tmp = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(tmp.path(), "#!/bin/sh\n").unwrap();
        assert_eq!(inspect(tmp.path()).unwrap(), None);
    }

    #[test]
    fn pvh_note_found() {
        let mut notes = Vec::new();
        // A GNU note first, then the Xen PVH entry note.
        for (name, kind, desc) in [
            (&b"GNU\0"[..], 3u32, &[1u8, 2, 3][..]),
            (b"Xen\0", 18, &[0, 0, 0, 1][..]),
        ] {
            notes.extend((name.len() as u32).to_le_bytes());
            notes.extend((desc.len() as u32).to_le_bytes());
            notes.extend(kind.to_le_bytes());
            notes.extend(name);
            notes.extend(desc);
            notes.resize(notes.len().div_ceil(4) * 4, 0);
        }
        assert!(notes_have_pvh(&notes));
        assert!(!notes_have_pvh(&notes[..20]));
    }
}
