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
