//! The guest memory layout report: every KVM memory slot of the VM with the
//! file that backs it, as this process's mappings show (`/proc/self/maps`).
//! `p2pvmm run` keeps it in `<vm dir>/memory.json`, rewritten when a slot
//! changes (a BAR moved), so that an operator or a test can check what the
//! guest can reach: its own RAM memfd, and the channel region's memfd that
//! the other VM's process maps too — nothing else.

use std::path::Path;

use serde::Serialize;

use crate::vstate::vm::MemorySlot;

/// A slot and its backing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SlotReport {
    /// The slot.
    #[serde(flatten)]
    pub slot: MemorySlot,
    /// The mapped file (`/memfd:p2pvmm-guest-ram (deleted)`), empty when anonymous.
    pub backing: String,
    /// Device and inode of that file (`00:01 1234`): equal in two processes
    /// means the same memory.
    pub file_id: String,
    /// Offset of the slot's start within the file.
    pub file_offset: u64,
}

/// One line of `/proc/PID/maps`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mapping {
    start: u64,
    end: u64,
    offset: u64,
    dev: String,
    inode: u64,
    path: String,
}

fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines()
        .filter_map(|line| {
            let mut f = line.split_whitespace();
            let (start, end) = f.next()?.split_once('-')?;
            let _perms = f.next()?;
            let offset = u64::from_str_radix(f.next()?, 16).ok()?;
            let dev = f.next()?.to_string();
            let inode = f.next()?.parse().ok()?;
            let path = f.collect::<Vec<_>>().join(" ");
            Some(Mapping {
                start: u64::from_str_radix(start, 16).ok()?,
                end: u64::from_str_radix(end, 16).ok()?,
                offset,
                dev,
                inode,
                path,
            })
        })
        .collect()
}

/// Joins slots with the mappings that hold their start addresses.
pub fn reports(slots: &[MemorySlot], maps: &str) -> Vec<SlotReport> {
    let maps = parse_maps(maps);
    slots
        .iter()
        .map(|s| {
            let m = maps
                .iter()
                .find(|m| (m.start..m.end).contains(&s.host_addr));
            SlotReport {
                slot: s.clone(),
                backing: m.map(|m| m.path.clone()).unwrap_or_default(),
                file_id: m
                    .filter(|m| m.inode != 0)
                    .map(|m| format!("{} {}", m.dev, m.inode))
                    .unwrap_or_default(),
                file_offset: m.map_or(0, |m| m.offset + (s.host_addr - m.start)),
            }
        })
        .collect()
}

/// Writes the report for `slots` to `path` (through a rename).
pub fn write(slots: &[MemorySlot], path: &Path) -> std::io::Result<()> {
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let json = serde_json::to_vec_pretty(&reports(slots, &maps)).map_err(std::io::Error::other)?;
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, json)?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_find_their_files() {
        let maps = "\
7f0000000000-7f0010000000 rw-s 00000000 00:01 4242                       /memfd:p2pvmm-guest-ram (deleted)
7f0020000000-7f0020200000 rw-s 00000000 00:01 777                        /memfd:p2pvm-channel (deleted)
7f0030000000-7f0030001000 rw-p 00000000 00:00 0 
";
        let slots = [
            MemorySlot {
                slot: 0,
                guest_addr: 0,
                size: 0x1000_0000,
                host_addr: 0x7f00_0000_0000,
            },
            MemorySlot {
                slot: 16,
                guest_addr: 0xe000_0000,
                size: 0x20_0000,
                host_addr: 0x7f00_2000_0000,
            },
            MemorySlot {
                slot: 17,
                guest_addr: 0x1000,
                size: 0x1000,
                host_addr: 0x7f00_3000_0000,
            },
            MemorySlot {
                slot: 18,
                guest_addr: 0x2000,
                size: 0x1000,
                host_addr: 0x1000,
            },
        ];
        let r = reports(&slots, maps);
        assert_eq!(r[0].backing, "/memfd:p2pvmm-guest-ram (deleted)");
        assert_eq!(r[0].file_id, "00:01 4242");
        assert_eq!(r[1].file_id, "00:01 777");
        assert_eq!(r[1].slot.guest_addr, 0xe000_0000);
        // Anonymous memory has no file; an address nothing maps has nothing.
        assert_eq!((r[2].backing.as_str(), r[2].file_id.as_str()), ("", ""));
        assert_eq!((r[3].backing.as_str(), r[3].file_id.as_str()), ("", ""));
    }
}
