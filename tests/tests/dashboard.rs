//! The operator's dashboard on a real `p2pd`, used from a real headless
//! Chromium over the DevTools protocol: log in, watch a second node appear,
//! a transfer reach 100 %, an EICAR publish show up as a virus verdict with
//! its signature, and ban a peer from the page. And the refusals, over
//! plain HTTP: no session, a wrong token, a forged cookie, a cross-site POST.
//!
//! Screenshots of every page go to `<target>/tmp/dashboard/` (the test
//! prints the path), with the load time of each page.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use p2pvm_e2e::browser::Browser;
use p2pvm_e2e::scrape::{Answer, free_port, request};
use p2pvm_e2e::{NodeOpts, TestNode, eventually, fetch_or_refusal, fetch_whole, publish_named};
use serde_json::json;

const WAIT: Duration = Duration::from_secs(30);
const EICAR: &[u8] = br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

fn dashboard_config(port: u16) -> String {
    format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n")
}

fn artifacts() -> Result<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("dashboard");
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Opens `path` and records its load time and a screenshot.
async fn visit(
    b: &mut Browser,
    port: u16,
    path: &str,
    shot: &str,
    loads: &mut Vec<(String, f64)>,
) -> Result<()> {
    b.goto(&format!("http://127.0.0.1:{port}{path}")).await?;
    loads.push((path.to_owned(), b.load_ms().await?));
    b.screenshot(&artifacts()?.join(shot)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_watches_peers_transfers_and_verdicts_and_bans_a_peer_in_a_real_browser()
-> Result<()> {
    let port = free_port()?;
    let a = TestNode::start(NodeOpts {
        config_toml: Some(dashboard_config(port)),
        ..Default::default()
    })
    .await?;
    let mut b = Browser::launch(1280, 900).await?;
    let mut loads = Vec::new();

    // Not logged in: the page is the login form. A wrong token stays there.
    b.goto(&format!("http://127.0.0.1:{port}/")).await?;
    ensure!(
        b.eval("location.pathname").await? == json!("/login"),
        "no login first"
    );
    b.type_into("#token", "p2pvm-not-the-token").await?;
    b.click("button[type=submit]").await?;
    b.wait_for(
        "the refusal",
        "document.querySelector('.error') !== null",
        WAIT,
    )
    .await?;
    b.screenshot(&artifacts()?.join("login-refused.png"))
        .await?;
    b.goto(&format!("http://127.0.0.1:{port}/login")).await?;
    b.type_into("#token", &a.admin_token()).await?;
    b.click("button[type=submit]").await?;
    b.wait_for(
        "the overview after logging in",
        &format!("location.pathname === '/' && document.querySelector('#peer-id')?.textContent.includes('{}')", a.peer_id),
        WAIT,
    )
    .await?;
    ensure!(
        b.eval("document.cookie").await? == json!(""),
        "the session cookie is readable by scripts"
    );
    loads.push(("/".into(), b.load_ms().await?));
    b.screenshot(&artifacts()?.join("overview.png")).await?;

    // A second node connects while the peers page is open: it appears
    // without a reload (the page updates itself).
    visit(&mut b, port, "/peers", "peers-alone.png", &mut loads).await?;
    let other = TestNode::start(NodeOpts {
        bootstrap: vec![a.addr.clone()],
        // Slow enough to watch the transfer move on a page that updates
        // every 2 s, even on a loaded machine: 32 MiB at 2 MiB/s.
        config_toml: Some("[content]\nupload_rate_bytes_per_sec = 2097152\n".into()),
        ..Default::default()
    })
    .await?;
    let row = format!("#peer-{}", other.peer_id);
    b.wait_for(
        "the new peer's row",
        &format!("document.querySelector('{row}')?.dataset.connected === 'true'"),
        WAIT,
    )
    .await?;
    b.screenshot(&artifacts()?.join("peers.png")).await?;

    // A transfer: its progress moves on the content page, then reads 100 %.
    let data = p2pvm_e2e::pseudo_random(32 << 20, 41);
    let id = publish_named(&other.app("pub").await?, "watched.bin", &data).await?;
    visit(&mut b, port, "/content", "content-empty.png", &mut loads).await?;
    let fetcher = a.app("viewer").await?;
    let fetch = {
        let (fetcher, id) = (fetcher.clone(), id.clone());
        tokio::spawn(async move { fetch_whole(&fetcher, &id).await })
    };
    let item = format!("#transfers li[data-id='{id}']");
    let seen = b
        .wait_for(
            "the transfer in progress",
            &format!("(() => {{ const li = document.querySelector(\"{item}\"); return li && li.dataset.state === 'running' ? Number(li.dataset.percent) : null; }})()"),
            WAIT,
        )
        .await?;
    b.screenshot(&artifacts()?.join("content-transfer.png"))
        .await?;
    b.wait_for(
        "the transfer at 100 %",
        &format!("(() => {{ const li = document.querySelector(\"{item}\"); return li && li.dataset.state === 'complete' && li.querySelector('.percent').textContent === '100 %'; }})()"),
        Duration::from_secs(90),
    )
    .await?;
    ensure!(fetch.await?? == data, "the fetched bytes differ");
    ensure!(
        seen.as_u64().is_some_and(|p| p < 100),
        "the transfer was never seen below 100 %: {seen}"
    );
    b.wait_for(
        "the item among those kept",
        &format!("document.querySelector(\"#items tr[data-id='{id}']\") !== null"),
        WAIT,
    )
    .await?;
    b.screenshot(&artifacts()?.join("content.png")).await?;

    // An EICAR publish attempt: refused, and on the security page with its
    // signature.
    let refused = publish_named(&fetcher, "eicar.com", EICAR)
        .await
        .unwrap_err();
    visit(&mut b, port, "/security", "security.png", &mut loads).await?;
    let signature = b
        .wait_for(
            "the verdict",
            "document.querySelector('#detections td.signature')?.textContent",
            WAIT,
        )
        .await?;
    let signature = signature.as_str().context("no signature text")?;
    ensure!(
        signature.contains("Eicar") && refused.to_string().contains(signature),
        "the page shows {signature:?}; the publisher was told {refused}"
    );

    // A ban from the peers page: the peer is refused from then on.
    let kept = publish_named(
        &a.app("pub").await?,
        "kept-from-banned.bin",
        &p2pvm_e2e::pseudo_random(1 << 20, 42),
    )
    .await?;
    visit(&mut b, port, "/peers", "peers-before-ban.png", &mut loads).await?;
    b.click(&format!("{row} button.ban")).await?;
    b.wait_for(
        "the peer shown banned",
        &format!("location.pathname === '/peers' && document.querySelector('{row}')?.dataset.standing === 'banned'"),
        WAIT,
    )
    .await?;
    b.screenshot(&artifacts()?.join("peers-banned.png")).await?;
    let admin = a.admin().await?;
    let credit = admin.credit_show(&other.peer_id).await?;
    ensure!(
        credit.standing == "banned" && credit.ban_reason.contains("operator"),
        "{credit:?}"
    );
    let theirs = other.app("fetcher").await?;
    let _ = other.admin().await?.connect("", [a.addr.as_str()]).await;
    let got = tokio::time::timeout(
        Duration::from_secs(60),
        fetch_or_refusal(&theirs, &kept, false),
    )
    .await
    .context("the banned peer's fetch neither ended nor was refused")??;
    ensure!(
        got.is_err(),
        "the banned peer still got an item from the node"
    );
    eventually(WAIT, "the banned peer kept out", || async {
        let peers = admin.peers().await.ok()?;
        (!peers.iter().any(|p| p.peer_id == other.peer_id)).then_some(())
    })
    .await?;

    // Lifted from the page again.
    b.click(&format!("{row} button.unban")).await?;
    b.wait_for(
        "the peer shown unbanned",
        &format!("location.pathname === '/peers' && ['good', 'throttled', 'refused'].includes(document.querySelector('{row}')?.dataset.standing)"),
        WAIT,
    )
    .await?;
    ensure!(admin.credit_show(&other.peer_id).await?.standing != "banned");

    visit(&mut b, port, "/compute", "compute.png", &mut loads).await?;

    // A phone-sized screen: nothing wider than the screen but the tables,
    // which scroll inside their own box.
    b.viewport(390, 844, true).await?;
    for (path, shot) in [("/", "phone-overview.png"), ("/peers", "phone-peers.png")] {
        visit(&mut b, port, path, shot, &mut loads).await?;
        let fits = b
            .eval("document.documentElement.scrollWidth <= window.innerWidth + 1")
            .await?;
        ensure!(fits == json!(true), "{path} is wider than a phone's screen");
    }
    b.close().await?;

    println!("dashboard screenshots in {}", artifacts()?.display());
    for (path, ms) in &loads {
        println!("page load {path}: {ms:.0} ms");
    }
    Ok(())
}

fn form_field(html: &str, name: &str) -> Result<String> {
    let marker = format!("name=\"{name}\" value=\"");
    let start = html
        .find(&marker)
        .with_context(|| format!("no {name} field"))?
        + marker.len();
    let len = html[start..].find('"').context("unterminated value")?;
    Ok(html[start..start + len].to_owned())
}

fn session_cookie(a: &Answer) -> Result<String> {
    let set = a.header("set-cookie").context("no cookie set")?;
    ensure!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "the cookie is not HttpOnly and SameSite=Strict: {set}"
    );
    Ok(set.split(';').next().unwrap_or_default().to_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_session_a_wrong_token_a_forged_cookie_and_a_cross_site_post_are_refused() -> Result<()>
{
    let port = free_port()?;
    let a = TestNode::start(NodeOpts {
        config_toml: Some(dashboard_config(port)),
        ..Default::default()
    })
    .await?;
    let victim = libp2p_identity::Keypair::generate_ed25519()
        .public()
        .to_peer_id()
        .to_string();
    let admin = a.admin().await?;
    let is_banned =
        || async { Ok::<_, anyhow::Error>(admin.credit_show(&victim).await?.standing == "banned") };

    // No session: pages send to the login, actions are refused.
    for path in ["/", "/peers", "/content?live=1", "/security", "/compute"] {
        let r = request(port, "GET", path, &[], None).await?;
        ensure!(
            r.code == 303 && r.header("location") == Some("/login"),
            "GET {path}: {r:?}"
        );
        ensure!(!r.body.contains("peer"), "GET {path} leaked a page");
    }
    let ban = format!("csrf=x&peer={victim}&hours=1");
    let r = request(port, "POST", "/peers/ban", &[], Some(&ban)).await?;
    ensure!(r.code == 401, "a ban without a session: {r:?}");

    // A wrong token, and an app's token (not the operator's), get no session.
    let app_token = admin.issue_token("someapp").await?;
    for token in ["p2pvm-wrong", app_token.as_str(), ""] {
        let r = request(port, "POST", "/login", &[], Some(&format!("token={token}"))).await?;
        ensure!(
            r.code == 401 && r.header("set-cookie").is_none(),
            "login with {token:?}: {r:?}"
        );
    }
    // A forged cookie is no session.
    let forged = format!("p2pvm_dashboard_{port}={}", "ab".repeat(32));
    let r = request(port, "GET", "/", &[("Cookie", &forged)], None).await?;
    ensure!(r.code == 303, "a forged cookie got in: {r:?}");
    let r = request(
        port,
        "POST",
        "/peers/ban",
        &[("Cookie", &forged)],
        Some(&ban),
    )
    .await?;
    ensure!(r.code == 401, "a forged cookie banned: {r:?}");
    // Logging in from another site's page is refused.
    let login = format!("token={}", a.admin_token());
    let r = request(
        port,
        "POST",
        "/login",
        &[("Origin", "http://evil.example")],
        Some(&login),
    )
    .await?;
    ensure!(
        r.code == 403 && r.header("set-cookie").is_none(),
        "a cross-site login: {r:?}"
    );

    // The real login.
    let r = request(
        port,
        "POST",
        "/login",
        &[("Origin", &format!("http://127.0.0.1:{port}"))],
        Some(&login),
    )
    .await?;
    ensure!(r.code == 303, "login: {r:?}");
    let cookie = session_cookie(&r)?;
    let page = request(port, "GET", "/peers", &[("Cookie", &cookie)], None).await?;
    ensure!(page.code == 200, "the peers page with a session: {page:?}");
    ensure!(
        page.header("content-security-policy")
            .is_some_and(|c| c.contains("frame-ancestors 'none'")),
        "no CSP: {:?}",
        page.headers
    );
    let csrf = form_field(&page.body, "csrf")?;

    // Cross-site POSTs with the session cookie (as a browser would send it
    // were the cookie not SameSite): refused, and nothing banned.
    let good = format!("csrf={csrf}&peer={victim}&hours=1");
    for headers in [
        vec![
            ("Cookie", cookie.as_str()),
            ("Origin", "http://evil.example"),
        ],
        vec![
            ("Cookie", cookie.as_str()),
            ("Sec-Fetch-Site", "cross-site"),
        ],
    ] {
        let r = request(port, "POST", "/peers/ban", &headers, Some(&good)).await?;
        ensure!(r.code == 403, "a cross-site ban: {r:?}");
    }
    // The session's cookie with another CSRF token: refused.
    let wrong = format!("csrf={}&peer={victim}&hours=1", "00".repeat(32));
    let r = request(
        port,
        "POST",
        "/peers/ban",
        &[("Cookie", &cookie)],
        Some(&wrong),
    )
    .await?;
    ensure!(r.code == 403, "a ban with a wrong CSRF token: {r:?}");
    ensure!(!is_banned().await?, "a refused request banned the peer");

    // The same form from the dashboard's own origin works.
    let origin = format!("http://127.0.0.1:{port}");
    let r = request(
        port,
        "POST",
        "/peers/ban",
        &[("Cookie", &cookie), ("Origin", &origin)],
        Some(&good),
    )
    .await?;
    ensure!(r.code == 303, "the operator's ban: {r:?}");
    ensure!(is_banned().await?, "the operator's ban did not hold");

    // Unban and logout hold to the same rules.
    let unban = format!("csrf={csrf}&peer={victim}");
    for headers in [
        vec![("Cookie", cookie.as_str()), ("Origin", "null")],
        vec![("Cookie", cookie.as_str()), ("Sec-Fetch-Site", "same-site")],
    ] {
        let r = request(port, "POST", "/peers/unban", &headers, Some(&unban)).await?;
        ensure!(r.code == 403, "a cross-site unban: {r:?}");
        let r = request(
            port,
            "POST",
            "/logout",
            &headers,
            Some(&format!("csrf={csrf}")),
        )
        .await?;
        ensure!(r.code == 403, "a cross-site logout: {r:?}");
    }
    ensure!(is_banned().await?, "a refused unban lifted the ban");
    let wrong = format!("csrf={}&peer={victim}", "00".repeat(32));
    let r = request(
        port,
        "POST",
        "/peers/unban",
        &[("Cookie", &cookie)],
        Some(&wrong),
    )
    .await?;
    ensure!(
        r.code == 403 && is_banned().await?,
        "an unban with a wrong CSRF token: {r:?}"
    );

    // A page another site's page asks for (a search would start work) is
    // refused; a decoy cookie of the same name set before the real one
    // does not lock the operator out.
    let r = request(
        port,
        "GET",
        "/content?q=x",
        &[("Cookie", &cookie), ("Sec-Fetch-Site", "same-site")],
        None,
    )
    .await?;
    ensure!(r.code == 403, "a cross-site page request: {r:?}");
    let decoyed = format!("p2pvm_dashboard_{port}=decoy; {cookie}");
    let r = request(port, "GET", "/security", &[("Cookie", &decoyed)], None).await?;
    ensure!(r.code == 200, "a decoy cookie shadowed the session: {r:?}");

    // What peers name is shown as text, never as markup.
    let hostile = "<img src=x onerror=alert(1)>.bin";
    publish_named(&a.app("pub").await?, hostile, b"just bytes").await?;
    let r = request(port, "GET", "/content", &[("Cookie", &cookie)], None).await?;
    ensure!(
        r.body.contains("&lt;img src=x onerror=alert(1)&gt;.bin") && !r.body.contains("<img src=x"),
        "an item's name reached the page as markup"
    );

    // After logging out the cookie is worth nothing.
    let r = request(
        port,
        "POST",
        "/logout",
        &[("Cookie", &cookie)],
        Some(&format!("csrf={csrf}")),
    )
    .await?;
    ensure!(r.code == 303, "logout: {r:?}");
    let r = request(port, "GET", "/", &[("Cookie", &cookie)], None).await?;
    ensure!(r.code == 303, "a logged-out cookie still works: {r:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_can_be_turned_off_leaving_the_metrics() -> Result<()> {
    let port = free_port()?;
    let _a = TestNode::start(NodeOpts {
        config_toml: Some(format!("{}dashboard = false\n", dashboard_config(port))),
        ..Default::default()
    })
    .await?;
    // (Unset, it is on only on loopback: config.rs unit-tests that.)
    ensure!(request(port, "GET", "/metrics", &[], None).await?.code == 200);
    for path in ["/", "/login"] {
        let r = request(port, "GET", path, &[], None).await?;
        ensure!(
            r.code == 404,
            "{path} is served with the dashboard off: {r:?}"
        );
    }
    Ok(())
}
