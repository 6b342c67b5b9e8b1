//! `p2pctl` as an operator and as an app would run it, against a real p2pd.

use anyhow::Result;
use p2pvm_e2e::{TestNode, bin};

async fn p2pctl(
    node: &TestNode,
    token: Option<&str>,
    args: &[&str],
) -> Result<std::process::Output> {
    let mut cmd = tokio::process::Command::new(bin("p2pctl"));
    cmd.arg("--socket").arg(&node.socket);
    if let Some(t) = token {
        cmd.args(["--token", t]);
    }
    cmd.env_remove("P2PVM_TOKEN").env_remove("P2PVM_TOKEN_FILE");
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
