//! p2pvm-images: builds what the two VMs boot, and the tools the nested test
//! host shares.
//!
//! Where it sits: before anything runs. `p2pvm-images build` turns Debian's
//! kernel package and our release binaries into `vmlinux`, `service.cpio`
//! and `client.cpio` (plus `images.lock`, what went in), which `p2pvmm up
//! --isolation vm` boots; [`store`] makes the service VM's ext4 store disk
//! that `p2pvmm up` creates when missing. The guest init in both images is
//! `p2pvm-init` (crate `images/init`).
//!
//! Parts: [`kernel`] (apt-get download, unpack, `vmlinux`, `kernel.lock`),
//! [`modules`] (closures from `modules.dep`), [`cpio`] (deterministic newc
//! archives), [`image`] (a [`image::Layout`] of an initramfs, content-cached),
//! [`libs`] (shared libraries of a program), [`guests`] (what each VM's image
//! holds), [`guest_module`] (our kernel module for the channel device), [`lock`] (`images.lock`), [`store`] (the ext4 store disk),
//! [`build`] (the whole build), [`release`] (cargo builds of our programs), [`util`] (tools, cache, atomic writes).

#![forbid(unsafe_code)]

pub mod build;
pub mod cpio;
pub mod elf;
mod error;
pub mod guest_module;
pub mod guests;
pub mod image;
pub mod kernel;
pub mod libs;
pub mod lock;
pub mod modules;
pub mod release;
pub mod store;
pub mod util;

pub use error::{ImageError, Result};
