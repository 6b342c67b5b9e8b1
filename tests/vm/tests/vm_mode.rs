//! VM mode end to end: `p2pvmm up --isolation vm` boots the P2P service VM
//! and the client VM side by side (Debian's kernel, our VMM, in the nested
//! test host or directly on hardware KVM), and apps in the client VM use the
//! service VM's node through the channel device. Scenario scripts are in
//! `tests/vm/scenarios/vmmode-*.sh`.

use p2pvm_testhost::vmm_bin::{guest_programs_release, p2pvmm_release};
use p2pvm_testhost::{Outcome, Scenario, TestHost};

fn run(scenario: Scenario) -> Outcome {
    p2pvm_testhost::init_tracing();
    let host =
        TestHost::prepare().expect("the test host (see tests/vm/README.md for what it needs)");
    let outcome = host.run(&scenario).expect("the scenario ran to its end");
    outcome.ensure_success().expect("the L1 script succeeded");
    outcome
}

fn get<'a>(o: &'a Outcome, key: &str) -> &'a str {
    o.result(key)
        .unwrap_or_else(|| panic!("no result {key}; console tail:\n{}", o.tail()))
}

/// The platform's programs in the guests' initramfs.
fn with_guest_programs(s: Scenario) -> Scenario {
    let bins = guest_programs_release().expect("release builds of p2pd, p2p-frontend, p2pctl");
    s.l2_binary("/bin/p2pd", &bins[0])
        .l2_binary("/bin/p2p-frontend", &bins[1])
        .l2_binary("/bin/p2pctl", &bins[2])
        .l2_module("uio_pci_generic")
}

#[test]
fn an_app_in_the_client_vm_reaches_the_service_vms_node_through_the_channel() {
    let o = run(with_guest_programs(
        Scenario::new("vm-mode", include_str!("../scenarios/vmmode-l1.sh"))
            .l2_init(include_str!("../scenarios/vmmode-l2.sh"))
            .p2pvmm(p2pvmm_release().unwrap())
            .timeout(std::time::Duration::from_secs(420)),
    ));
    let peer = get(&o, "service_peer");
    assert!(peer.starts_with("12D3Koo"), "service peer id {peer:?}");
    // `p2pctl info` in the client VM answered with the service VM's node.
    assert_eq!(get(&o, "client_saw_peer"), peer);
    assert_eq!(get(&o, "service_logged_attach"), "yes");
    // The two VMM processes share the region's memfd and nothing else.
    assert_eq!(get(&o, "region_shared"), "yes");
    assert_eq!(get(&o, "ram_private"), "yes");
    assert_eq!(get(&o, "up_exit"), "0");
    println!(
        "VM mode: service ready {} s, first API answer in the client VM {} s after `up`",
        get(&o, "service_ready_s"),
        get(&o, "api_over_channel_s")
    );
}
