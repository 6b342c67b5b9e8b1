//! `p2pctl` as an operator and as an app would run it, against a real p2pd.

use anyhow::Result;
use p2pvm_e2e::{TestNode, bin};

async fn p2pctl(
    node: &TestNode,
    token: Option<&str>,
    args: &[&str],
) -> Result<std::process::Output> {
    let mut cmd = p2pvm_e2e::command(bin("p2pctl"));
    cmd.arg("--socket").arg(&node.socket);
    if let Some(t) = token {
        cmd.args(["--token", t]);
    }
    Ok(cmd.args(args).output().await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2pctl_json_and_tables_and_permissions() -> Result<()> {
    let (a, b) = p2pvm_e2e::pair().await?;

    // The operator (admin.token beside the socket) gets JSON node info.
    let out = p2pctl(&a, None, &["--json", "info"]).await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info = String::from_utf8(out.stdout)?;
    assert!(
        info.contains(&format!("\"peer_id\":\"{}\"", a.peer_id)),
        "{info}"
    );

    // Issue an app token; the app can list peers (a table with B in it)...
    let out = p2pctl(&a, None, &["app", "issue", "cli-app"]).await?;
    let token = String::from_utf8(out.stdout)?.trim().to_owned();
    assert!(token.starts_with("p2pvm1."), "{token}");
    let out = p2pctl(&a, Some(&token), &["peers"]).await?;
    let table = String::from_utf8(out.stdout)?;
    assert!(
        table.starts_with("PEER") && table.contains(&b.peer_id),
        "{table}"
    );

    // ...but not operate on the node: a non-zero exit and the reason.
    let out = p2pctl(&a, Some(&token), &["disconnect", &b.peer_id]).await?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("PermissionDenied"));

    // DHT through the CLI, across nodes.
    let out = p2pctl(&b, None, &["dht", "put", "cli-key", "cli-value"]).await?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = p2pctl(&a, Some(&token), &["--json", "dht", "get", "cli-key"]).await?;
    assert!(String::from_utf8(out.stdout)?.contains("\"value\":\"cli-value\""));

    // A wrong token is refused with a clear message.
    let out = p2pctl(&a, Some("p2pvm1.nope"), &["info"]).await?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("Unauthenticated"));
    Ok(())
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2pctl_groups_and_rights_as_an_operator_uses_them() -> Result<()> {
    let (owner, member) = p2pvm_e2e::pair().await?;
    let created = ok(&p2pctl(&owner, None, &["--json", "group", "create", "crew"]).await?);
    let group: serde_json::Value = serde_json::from_str(&created)?;
    let id = group["id"].as_str().unwrap_or_default().to_owned();
    assert!(id.len() == 32 && group["owner"] == true, "{created}");
    // The invitation goes through a file, as between two operators.
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("invite.pem");
    let file = file.to_str().unwrap_or_default();
    ok(&p2pctl(
        &owner,
        None,
        &["group", "invite", "crew", &member.peer_id, "-o", file],
    )
    .await?);
    let joined = ok(&p2pctl(&member, None, &["group", "join", file]).await?);
    assert!(
        joined.contains(&id) && joined.contains("member: true"),
        "{joined}"
    );
    let list = ok(&p2pctl(&member, None, &["group", "list"]).await?);
    assert!(list.starts_with("NAME") && list.contains("crew"), "{list}");
    let members = ok(&p2pctl(&owner, None, &["group", "members", "crew"]).await?);
    assert!(
        members.contains(&member.peer_id) && members.contains("valid"),
        "{members}"
    );
    ok(&p2pctl(&owner, None, &["group", "revoke", "crew", &member.peer_id]).await?);
    let members = ok(&p2pctl(&owner, None, &["--json", "group", "members", "crew"]).await?);
    assert!(members.contains("\"revoked\":true"), "{members}");
    // A member cannot see who else is in the group (owner only).
    let out = p2pctl(&member, None, &["group", "members", "crew"]).await?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not own"));

    // Rights on the command line, and what stat says of them.
    let data = dir.path().join("film.bin");
    std::fs::write(&data, p2pvm_e2e::pseudo_random(4096, 3))?;
    let published = ok(&p2pctl(
        &owner,
        None,
        &[
            "--json",
            "publish",
            data.to_str().unwrap_or_default(),
            "--licence",
            "CC-BY-4.0",
            "--no-redistribute",
            "--expires-in",
            "3600",
            "--group",
            "crew",
        ],
    )
    .await?);
    let info: serde_json::Value = serde_json::from_str(&published)?;
    assert_eq!(info["redistribution_allowed"], false, "{published}");
    assert_eq!(info["allowed_groups"][0], id.as_str(), "{published}");
    assert_eq!(info["certification"], "self-signed", "{published}");
    let cid = info["content_id"].as_str().unwrap_or_default().to_owned();
    let stat = ok(&p2pctl(&owner, None, &["stat", &cid]).await?);
    assert!(
        stat.contains("publisher only") && stat.contains("expires") && stat.contains(&id),
        "{stat}"
    );
    // Already expired: refused with the DRM check's name.
    let out = p2pctl(
        &owner,
        None,
        &[
            "publish",
            data.to_str().unwrap_or_default(),
            "--expires-unix",
            "1",
        ],
    )
    .await?;
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("DRM_EXPIRED"));

    // A node outside the group, naming it by name or by id, is told it is
    // not a member, with the typed code (DRM_NOT_GROUP_MEMBER), not that
    // the group is unknown.
    let stranger = TestNode::start(Default::default()).await?;
    for g in ["crew", id.as_str()] {
        let out = p2pctl(
            &stranger,
            None,
            &["pubsub", "pub", "--group", g, "news", "hello"],
        )
        .await?;
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains("DrmNotGroupMember"),
            "group {g}: {err}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn p2pctl_compute_as_an_operator_and_a_requester_use_it() -> Result<()> {
    use p2pvm_compute::reference::{hashchain, hashchain_input};
    let requester = p2pvm_e2e::node_with(&[], None).await?;
    let p1 = p2pvm_e2e::node_with(&[&requester], None).await?;
    let p2 = p2pvm_e2e::node_with(&[&requester], None).await?;
    for p in [&p1, &p2] {
        let out = p2pctl(p, None, &["--json", "compute", "offer", "--price", "2"]).await?;
        let offer = ok(&out);
        assert!(offer.contains("\"offering\":true"), "{offer}");
    }
    let r = requester.admin().await?;
    p2pvm_e2e::eventually(
        std::time::Duration::from_secs(60),
        "two compute providers",
        || async { (r.find_service("p2pvm-compute").await.ok()?.len() >= 2).then_some(()) },
    )
    .await?;
    let dir = tempfile::tempdir()?;
    let input = hashchain_input(50, 8 << 10);
    let input_path = dir.path().join("input.bin");
    std::fs::write(&input_path, &input)?;
    let module = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../examples/compute/hashchain.wat"
    );
    // Files are published first; the job is followed to the end.
    let out = p2pctl(
        &requester,
        None,
        &[
            "--json",
            "compute",
            "submit",
            module,
            "--input",
            input_path.to_str().unwrap(),
            "--budget",
            "100000",
        ],
    )
    .await?;
    let job: serde_json::Value = serde_json::from_str(&ok(&out))?;
    assert_eq!(job["state"], "done", "{job}");
    let job_id = job["job_id"].as_str().unwrap().to_owned();
    // Each run's time, from asking its provider to the answer.
    for run in job["runs"].as_array().unwrap() {
        assert!(run["wall_ms"].as_u64().unwrap_or(0) > 0, "{run}");
    }
    let status = ok(&p2pctl(&requester, None, &["compute", "status", &job_id[..12]]).await?);
    assert!(
        status.contains("TIME") && status.contains(" s "),
        "{status}"
    );
    let result_path = dir.path().join("out.txt");
    let out = p2pctl(
        &requester,
        None,
        &[
            "compute",
            "result",
            &job_id[..12],
            "-o",
            result_path.to_str().unwrap(),
        ],
    )
    .await?;
    ok(&out);
    assert_eq!(
        std::fs::read_to_string(&result_path)?,
        hashchain(&input).unwrap()
    );
    // The provider's balance and receipts, as tables.
    let balance: serde_json::Value =
        serde_json::from_str(&ok(
            &p2pctl(&p1, None, &["--json", "compute", "balance"]).await?
        ))?;
    assert!(balance["earned"].as_u64().unwrap() > 0, "{balance}");
    let table = ok(&p2pctl(&requester, None, &["compute", "receipts"]).await?);
    assert!(
        table.starts_with("RECEIPT") && table.lines().count() == 3,
        "{table}"
    );
    // A module that imports what it may not: a non-zero exit naming why.
    let bad = dir.path().join("bad.wat");
    std::fs::write(
        &bad,
        r#"(module (import "env" "clock" (func)) (memory (export "memory") 1)
             (func (export "run") (result i32) (i32.const 0)))"#,
    )?;
    let out = p2pctl(
        &requester,
        None,
        &[
            "compute",
            "submit",
            bad.to_str().unwrap(),
            "--budget",
            "1000",
        ],
    )
    .await?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("COMPUTE_FORBIDDEN_IMPORT"), "{err}");
    Ok(())
}

/// What a user may have exported for their own node ("Using it" in the README
/// says to export the first two), each set to something that would break a
/// process that read it: a socket and files that do not exist, a token the
/// test's node never issued, log filters that do not parse, a VMM profile
/// written to nowhere.
const USERS_ENVIRONMENT: &[(&str, &str)] = &[
    ("P2PVM_API_SOCKET", "/nonexistent/p2pvm-junk/api.sock"),
    ("P2PVM_TOKEN", "p2pvm1.junk-token-the-node-never-issued"),
    ("P2PVM_TOKEN_FILE", "/nonexistent/p2pvm-junk/token"),
    ("P2PVM_DATA_DIR", "/nonexistent/p2pvm-junk/data"),
    ("P2PVMM_HOME", "/nonexistent/p2pvm-junk/home"),
    ("P2PD_LOG", "junk=["),
    ("P2PVMM_LOG", "junk=["),
    ("P2P_FRONTEND_LOG", "junk=["),
    ("RUST_LOG", "junk=["),
    ("P2PVMM_EXIT_STATS", "1"),
    ("P2PVMM_GUEST_PROFILE", "/nonexistent/p2pvm-junk/profile"),
];

/// The harness's promise that tests are hermetic, checked by running
/// [`hermetic_with_the_users_environment_set`] in a child test process whose
/// environment holds [`USERS_ENVIRONMENT`]. (Setting variables in this
/// process would race the other tests' threads.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_users_p2pvm_environment_changes_no_test() -> Result<()> {
    const INNER: &str = "hermetic_with_the_users_environment_set";
    let out = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--exact", INNER, "--ignored", "--test-threads", "1"])
        .envs(USERS_ENVIRONMENT.iter().copied())
        .stdin(std::process::Stdio::null())
        .output()
        .await?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success() && stdout.contains(&format!("test {INNER} ... ok")),
        "with the user's variables set, the test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // It ran, rather than being filtered out.
    anyhow::ensure!(stdout.contains("1 passed"), "{stdout}");
    Ok(())
}

/// A node, `p2pctl` against it with no token given (so it must find the
/// node's admin.token beside the socket, not `$P2PVM_TOKEN`), and the sandboxed
/// platform with its console: with junk in every variable they would read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by the_users_p2pvm_environment_changes_no_test, with junk in the environment"]
async fn hermetic_with_the_users_environment_set() -> Result<()> {
    for (k, v) in USERS_ENVIRONMENT {
        anyhow::ensure!(
            std::env::var(k).as_deref() == Ok(*v),
            "{k} is not set to junk: run this through the_users_p2pvm_environment_changes_no_test"
        );
    }
    let node = TestNode::start(Default::default()).await?;
    let out = p2pctl(&node, None, &["--json", "info"]).await?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(String::from_utf8(out.stdout)?.contains(&node.peer_id));
    let out = p2pctl(&node, None, &["--json", "credit", "list"]).await?;
    anyhow::ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut platform = p2pvm_e2e::split::Platform::up(&[]).await?;
    let info = platform.admin().await?.node_info().await?;
    let out = platform.console(&["p2pctl", "--json", "info"]).await?;
    anyhow::ensure!(
        out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&info.peer_id),
        "console: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    anyhow::ensure!(platform.down().await?.success());
    Ok(())
}
