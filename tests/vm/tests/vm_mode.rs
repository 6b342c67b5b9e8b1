//! VM mode end to end: `p2pvmm up --isolation vm` boots the P2P service VM
//! and the client VM from the real images (`p2pvm-images`: Debian's kernel,
//! p2pvm-init, p2pd with clamd, the front-end), in the nested test host or
//! directly on hardware KVM. Apps in the client VM use the service VM's node
//! through the channel device; a host-mode node in the test host is the
//! service VM's peer over its TAP. The scenario is
//! `tests/vm/scenarios/vmmode-l1.sh`; it reports, this test judges.

use p2pvm_testhost::{Outcome, TestHost};

fn get<'a>(o: &'a Outcome, key: &str) -> &'a str {
    o.result(key)
        .unwrap_or_else(|| panic!("no result {key}; console tail:\n{}", o.tail()))
}

/// The test host itself failed: it ended without reporting, or went silent.
fn is_bench_failure(e: &anyhow::Error) -> bool {
    e.downcast_ref::<p2pvm_testhost::HostDied>().is_some()
        || e.downcast_ref::<p2pvm_testhost::WatchdogError>()
            .is_some_and(|w| {
                matches!(
                    w.limit,
                    p2pvm_testhost::Limit::Silence | p2pvm_testhost::Limit::HostStall
                )
            })
}

#[test]
fn the_platform_runs_as_two_vms_from_its_images() {
    p2pvm_testhost::init_tracing();
    let host =
        TestHost::prepare().expect("the test host (see tests/vm/README.md for what it needs)");
    let (scenario, _) = p2pvm_testhost::platform::scenario(
        &host,
        "vm-mode",
        include_str!("../scenarios/vmmode-l1.sh"),
    )
    .expect("the platform's images and programs");
    let scenario = scenario
        .mem_mib(3072)
        .smp(2)
        .timeout(std::time::Duration::from_secs(1200))
        // The scenario's steps may be quiet for minutes (a fetch has its own
        // 150 s limit), but the test host's heartbeat is not: a test host
        // that froze is caught in a minute, not four.
        .heartbeat(std::time::Duration::from_secs(10))
        .silence_timeout(std::time::Duration::from_secs(60));
    let o = match host.run(&scenario) {
        // QEMU's emulator has been seen (three times in a dozen runs, with
        // the platform's two VMs loading it) to reset the whole test host
        // without a word, or to stall it (silence, or its own kernel
        // reporting a CPU stall): that is the test bench failing,
        // not the platform, so it gets one more run, loudly. A second
        // failure of any kind, or any failed check, fails the test.
        Err(e) if is_bench_failure(&e) => {
            eprintln!(
                "RETRY: the nested test host died or stalled (the emulator, not the platform); running the \
                 scenario once more. First run: {e:#}"
            );
            host.run(&scenario)
        }
        other => other,
    }
    .expect("the scenario ran to its end");
    o.ensure_success().expect("the L1 script succeeded");

    // An app in the client VM got its answer from the service VM's node.
    let peer = get(&o, "service_peer");
    assert!(peer.starts_with("12D3Koo"), "service peer id {peer:?}");
    assert_eq!(get(&o, "client_saw_peer"), peer);
    if o.result("client_guest_reset_early") == Some("yes") {
        eprintln!(
            "WARNING: the client guest reset itself before its first API answer (the known, \
             unexplained reset under QEMU's emulator: docs/vm-mode.md); the answer checked is \
             the one after its reboot"
        );
    }
    if o.result("service_guest_reset_early") == Some("yes") {
        eprintln!(
            "WARNING: the service guest reset itself before the client's first API answer (the \
             same unexplained reset under QEMU's emulator); its VMM booted it again, and the \
             answer checked is the one after that"
        );
    }
    // Both VMs took the channel's interrupts as MSI-X messages (our guest
    // module), not as INTx.
    for vm in ["service", "client"] {
        let n: u64 = get(&o, &format!("channel_msix_{vm}")).parse().unwrap_or(0);
        assert!(n > 0, "the {vm} VM took no channel interrupt by MSI-X");
    }
    // Only the region is shared: one file in both VMs' slots, the region's;
    // every slot has a file; the client's RAM holds its marker, the region not.
    assert_eq!(get(&o, "shared_files"), "1");
    assert_eq!(get(&o, "shared_is_region"), "1");
    assert_eq!(get(&o, "anonymous_slots"), "0");
    assert_ne!(get(&o, "marker_in_client_ram"), "0");
    assert_eq!(get(&o, "marker_in_region"), "0");
    // Content both ways between an app in the client VM and a host-mode
    // node, verified; pubsub both ways.
    assert_eq!(get(&o, "host_connected"), "yes");
    assert_eq!(get(&o, "client_to_host"), "verified");
    assert_eq!(get(&o, "host_to_client"), "verified");
    assert_eq!(get(&o, "pubsub_to_client"), "1");
    assert_eq!(get(&o, "pubsub_to_host"), "1");
    // clamd in the service VM refused EICAR by its signature name.
    assert_eq!(get(&o, "eicar_refused_by_name"), "yes");
    // The operator's credit table on the service VM's console.
    assert_eq!(get(&o, "credit_header"), "yes");
    assert_eq!(get(&o, "credit_row_for_host_node"), "yes");
    // A hostile client VM: the service VM and its node kept running, and a
    // good session worked afterwards.
    let rounds: u32 = get(&o, "hostile_rounds").parse().unwrap_or(0);
    assert!(rounds > 0, "the hostile program did not run");
    assert_eq!(get(&o, "service_survived_hostile"), "yes");
    assert_eq!(get(&o, "client_vmm_survived_hostile"), "yes");
    assert_eq!(get(&o, "good_session_after_hostile"), peer);
    // The service VM killed: restarted, same identity, content and ledger.
    assert_eq!(get(&o, "peer_after_restart"), peer);
    assert_eq!(get(&o, "content_after_restart"), "1");
    assert_eq!(get(&o, "credit_row_after_restart"), "yes");
    assert_eq!(get(&o, "up_exit"), "0");
    println!(
        "VM mode: service VM's p2pd up {} s, client front-end up {} s, first API answer in the client VM {} s after `up` (hostile rounds: {rounds})",
        get(&o, "service_ready_s"),
        get(&o, "client_ready_s"),
        get(&o, "api_ready_s"),
    );
}
