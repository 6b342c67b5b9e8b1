//! A pinned kernel version that the archive does not serve is refused with
//! a message naming the version the default series' metapackage
//! (`linux-image-6.12-amd64`) means now. Uses apt (the metapackage is
//! downloaded, about 1.5 KiB); where apt's lists do not know it, the test says
//! it cannot run.

use p2pvm_images::ImageError;
use p2pvm_images::kernel::{Kernel, KernelOptions, METAPACKAGE};
use p2pvm_images::util::{Cache, find_tool};

fn apt_knows_the_kernel() -> bool {
    find_tool("apt-cache").is_some_and(|apt| {
        std::process::Command::new(apt)
            .args(["policy", METAPACKAGE])
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("Candidate: "))
    })
}

#[test]
fn a_pin_the_archive_does_not_serve_names_the_current_kernel() {
    if !apt_knows_the_kernel() {
        eprintln!(
            "SKIPPED: apt's lists do not know {METAPACKAGE} (run apt-get update); \
             the pinned-kernel check did not run"
        );
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::at(dir.path().to_path_buf()).unwrap();
    let err = Kernel::prepare(
        &cache,
        &KernelOptions {
            pin: Some("6.1.0-999-amd64".into()),
            refresh: false,
        },
    )
    .unwrap_err();
    match &err {
        ImageError::PinnedKernelGone {
            pinned, current, ..
        } => {
            assert_eq!(pinned, "6.1.0-999-amd64");
            assert!(current.ends_with("-amd64"), "{current}");
            assert_ne!(current, pinned);
        }
        other => panic!("expected PinnedKernelGone, got {other:?}"),
    }
    let text = err.to_string();
    assert!(
        text.contains(&format!("{METAPACKAGE} currently means linux-image-6.12.")),
        "{text}"
    );
}
