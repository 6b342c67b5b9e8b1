//! The split platform end to end in sandbox mode: `p2pvmm up` runs p2pd in its
//! sandbox behind the shared-memory channel, apps use `guest-api` against the
//! front-end's socket, and a host-mode node is their peer.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use futures::StreamExt;
use guest_api::proto;
use p2pvm_e2e::split::Platform;
use p2pvm_e2e::{NodeOpts, TestNode, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(60);

fn meta(name: &str) -> proto::ContentPublishRequest {
    proto::ContentPublishRequest {
        name: name.into(),
        tags: vec!["split".into()],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_behind_the_channel_share_content_pubsub_and_streams() -> Result<()> {
    let host = TestNode::start(NodeOpts::default()).await?;
    // The service side serves its metrics (it shares the host's network).
    let (metrics, metrics_port) = p2pvm_e2e::scrape::config()?;
    let config = format!(
        "{metrics}[virus]\nclamd_socket = \"{}\"\ndatabase_dir = \"{}\"\n",
        p2pvm_e2e::clamd_socket().display(),
        p2pvm_e2e::clamd_database_dir().display()
    );
    let platform = Platform::up_with(std::slice::from_ref(&host.addr), &config).await?;
    let inside = platform.app("film-club").await?;
    let outside = host.app("film-club").await?;

    // Content: published through the channel, fetched by the host-mode node.
    let data = p2pvm_e2e::pseudo_random(24 << 20, 42);
    let info = inside.publish_content(meta("split.bin"), &data[..]).await?;
    ensure!(info.content_id == blake3::hash(&data).to_hex().to_string());
    let (opened, mut s) = outside.fetch_content(&info.content_id, 0, 0, true).await?;
    ensure!(s.is_bulk(), "host mode serves fetches through a ring");
    let mut got = Vec::with_capacity(opened.length as usize);
    tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await??;
    ensure!(got == data, "the host node got different bytes");
    // And the other way: the app behind the channel streams a host item.
    let back = p2pvm_e2e::pseudo_random(5 << 20, 43);
    let binfo = outside.publish_content(meta("host.bin"), &back[..]).await?;
    let (_, mut s) = inside.fetch_content(&binfo.content_id, 0, 0, true).await?;
    ensure!(s.is_bulk(), "the front-end serves fetches through a ring");
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await??;
    ensure!(got == back, "the sandboxed side got different bytes");

    // Pubsub both ways.
    let mut sub_in = inside.subscribe("split-room").await?;
    let mut sub_out = outside.subscribe("split-room").await?;
    for c in [&inside, &outside] {
        eventually(WAIT, "topic peers", || async {
            let p = c.topic_peers("split-room").await.ok()?;
            (!p.is_empty()).then_some(())
        })
        .await?;
    }
    inside.publish("split-room", "from the sandbox").await?;
    outside.publish("split-room", "from the host").await?;
    let m = tokio::time::timeout(WAIT, sub_out.next())
        .await?
        .context("sub open")?;
    ensure!(&m.data[..] == b"from the sandbox");
    let m = tokio::time::timeout(WAIT, sub_in.next())
        .await?
        .context("sub open")?;
    ensure!(&m.data[..] == b"from the host");

    // An app-defined stream served behind the channel, opened from the host.
    let mut incoming = inside.register_protocol("/split-echo/1").await?;
    tokio::spawn(async move {
        while let Some(s) = incoming.next().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(s);
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    let stream = eventually(WAIT, "stream to the sandboxed app", || async {
        outside
            .open_stream(&platform.peer_id, "/split-echo/1")
            .await
            .ok()
    })
    .await?;
    let payload = p2pvm_e2e::pseudo_random(3 << 20, 44);
    let (mut r, mut w) = tokio::io::split(stream);
    let send = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&send).await?;
        w.shutdown().await
    });
    let mut echoed = Vec::new();
    tokio::time::timeout(WAIT, r.read_to_end(&mut echoed)).await??;
    writer.await??;
    ensure!(echoed == payload, "echo through the channel differs");

    // The back-end's figures: messages both ways, doorbells, open sessions.
    let figures = p2pvm_e2e::scrape::Scrape::of(metrics_port).await?;
    for key in [
        "p2pvm_channel_messages_total{direction=in}",
        "p2pvm_channel_messages_total{direction=out}",
        "p2pvm_channel_doorbells_total{}",
        "p2pvm_channel_receive_batches_total{}",
        "p2pvm_channel_sessions{}",
    ] {
        ensure!(figures.get(key) >= 1.0, "{key} is {}", figures.get(key));
    }
    ensure!(
        figures.get("p2pvm_channel_messages_total{direction=in}")
            >= figures.get("p2pvm_channel_receive_batches_total{}"),
        "more looks with messages than messages"
    );
    // The front-end's side, served by `p2pvmm up --metrics` with both
    // sides' states: its messages mirror the back-end's.
    let sup = eventually(WAIT, "the front-end's figures", || async {
        let s = p2pvm_e2e::scrape::Scrape::of(platform.figures_port)
            .await
            .ok()?;
        (s.get("p2pvm_frontend_channel_messages_total{direction=out}") >= 1.0).then_some(s)
    })
    .await?;
    for key in [
        "p2pvm_frontend_channel_messages_total{direction=in}",
        "p2pvm_frontend_channel_doorbells_total{}",
        "p2pvm_frontend_channel_wakeups_total{}",
        "p2pvmm_vm_up{vm=service}",
        "p2pvmm_vm_up{vm=front-end}",
    ] {
        ensure!(sup.get(key) >= 1.0, "{key} is {}", sup.get(key));
    }
    ensure!(sup.get("p2pvmm_vm_restarts_total{vm=service}") == 0.0);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_service_side_is_restarted_and_apps_continue() -> Result<()> {
    let mut platform = Platform::up(&[]).await?;
    let app = platform.app("survivor").await?;
    let data = p2pvm_e2e::pseudo_random(64 << 20, 7);
    let info = app.publish_content(meta("kept.bin"), &data[..]).await?;
    let before = platform.service_pid()?;

    // A fetch in flight when the service side dies fails clearly, not silently short.
    let (opened, mut s) = app.fetch_content(&info.content_id, 0, 0, true).await?;
    ensure!(s.is_bulk());
    let mut first = vec![0u8; 1 << 20];
    s.read_exact(&mut first).await?;
    std::process::Command::new("kill")
        .args(["-KILL", &before.to_string()])
        .status()?;
    let mut rest = Vec::new();
    let outcome = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await?;
    let e = outcome.expect_err("a fetch cut by the crash must fail, not look complete");
    ensure!(
        (first.len() + rest.len()) < opened.length as usize,
        "{e}: yet every byte arrived"
    );
    let code = e
        .get_ref()
        .and_then(|i| i.downcast_ref::<guest_api::Error>())
        .and_then(|a| a.code());
    ensure!(
        code == Some(proto::ErrorCode::Unavailable),
        "the front-end says the service side went away: {e}"
    );

    // The supervisor restarts it; the same client reconnects and goes on.
    let after = eventually(WAIT, "a new service side", || async {
        platform.service_pid().ok().filter(|p| *p != before)
    })
    .await?;
    ensure!(after != before);
    let node = eventually(WAIT, "the app's session is back", || async {
        app.node_info().await.ok()
    })
    .await?;
    ensure!(
        node.peer_id == platform.peer_id,
        "same identity after restart"
    );
    let (_, mut s) = app.fetch_content(&info.content_id, 0, 0, true).await?;
    let mut got = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut got)).await??;
    ensure!(got == data, "the item survived the crash intact");
    // The supervisor's figures count the restart, and the front-end's the
    // channel's reset (its figures file is rewritten every second).
    let sup = eventually(WAIT, "the reset in the front-end's figures", || async {
        let s = p2pvm_e2e::scrape::Scrape::of(platform.figures_port)
            .await
            .ok()?;
        (s.get("p2pvm_frontend_channel_resets_total{}") >= 1.0).then_some(s)
    })
    .await?;
    ensure!(
        sup.get("p2pvmm_vm_restarts_total{vm=service}") == 1.0
            && sup.get("p2pvmm_vm_up{vm=service}") == 1.0,
        "restarts {}, up {}",
        sup.get("p2pvmm_vm_restarts_total{vm=service}"),
        sup.get("p2pvmm_vm_up{vm=service}")
    );
    let status = platform.down().await?;
    ensure!(
        status.success(),
        "p2pvmm exits cleanly on SIGTERM: {status}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sandbox_hides_the_users_files_and_the_console_is_inside_it() -> Result<()> {
    let platform = Platform::up(&[]).await?;
    // A file in the user's home that the service must not see.
    let home = std::env::var("HOME").context("HOME")?;
    let secret_dir = tempfile::Builder::new()
        .prefix(".p2pvm-secret-")
        .tempdir_in(&home)?;
    let secret = secret_dir.path().join("diary.txt");
    std::fs::write(&secret, "dear diary")?;
    let outside = secret_dir.path().join("planted");

    // p2pd itself: publishing the secret by path is refused by the kernel.
    let admin = platform.admin().await?;
    let err = admin
        .publish_path(secret.to_str().unwrap(), meta("diary.txt"))
        .await
        .expect_err("the sandboxed service read a file in the user's home");
    ensure!(
        err.to_string().to_lowercase().contains("permission denied"),
        "unexpected error: {err}"
    );

    // The process is confined by seccomp and no_new_privs, in its own
    // user/mount/pid/ipc/uts namespaces (but the host's network).
    let pid = platform.service_pid()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    ensure!(
        status.contains("Seccomp:\t2"),
        "no seccomp filter:\n{status}"
    );
    ensure!(status.contains("NoNewPrivs:\t1"));
    for ns in ["user", "mnt", "pid", "ipc", "uts"] {
        let theirs = std::fs::read_link(format!("/proc/{pid}/ns/{ns}"))?;
        let ours = std::fs::read_link(format!("/proc/self/ns/{ns}"))?;
        ensure!(theirs != ours, "the service shares our {ns} namespace");
    }
    let net = |p: &str| std::fs::read_link(format!("/proc/{p}/ns/net"));
    ensure!(
        net(&pid.to_string())? == net("self")?,
        "the node keeps the network"
    );

    // The operator's console runs inside the same sandbox: p2pctl works there
    // with the admin capability, the user's files do not exist for it.
    let out = platform.console(&["p2pctl", "info"]).await?;
    ensure!(out.status.success(), "p2pctl in the console: {out:?}");
    ensure!(String::from_utf8_lossy(&out.stdout).contains(&platform.peer_id));
    let out = platform
        .console(&["p2pctl", "credit", "list", "--json"])
        .await?;
    ensure!(
        out.status.success(),
        "admin-only command in the console: {out:?}"
    );
    let out = platform.console(&["cat", secret.to_str().unwrap()]).await?;
    ensure!(
        !out.status.success(),
        "the console read the secret: {out:?}"
    );
    ensure!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"));
    let planted = format!("echo x > {}", outside.display());
    let out = platform.console(&["sh", "-c", &planted]).await?;
    ensure!(
        !out.status.success() && !outside.exists(),
        "the console wrote outside: {out:?}"
    );
    let ok = format!(
        "echo y > {}/console-probe",
        platform.service_dir().display()
    );
    let out = platform.console(&["sh", "-c", &ok]).await?;
    ensure!(out.status.success(), "writing the data directory: {out:?}");
    let out = platform
        .console(&["sh", "-c", "echo $$; ls /proc | grep -c '^[0-9]'"])
        .await?;
    let text = String::from_utf8_lossy(&out.stdout);
    let procs: usize = text.lines().nth(1).context("ls /proc")?.trim().parse()?;
    ensure!(procs < 10, "the console sees the host's processes: {text}");
    Ok(())
}
