//! The DRM checker end to end, between real p2pd processes: rights decide who
//! serves an item and until when; a forged manifest is refused and costs its
//! sender credit; publisher certificates made with the `openssl` CLI certify
//! where policy requires it.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail, ensure};
use guest_api::{Client, proto};
use p2pvm_e2e::{TestNode, eventually, node_with, openssl};
use prost::Message;

const WAIT: Duration = Duration::from_secs(60);

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

fn rights(redistribute: bool, expires_unix: u64) -> proto::ContentRights {
    proto::ContentRights {
        licence: "CC-BY-NC-4.0".into(),
        redistribution_allowed: redistribute,
        expires_unix,
        allowed_groups: vec![],
    }
}

async fn publish(
    c: &Client,
    name: &str,
    data: &[u8],
    rights: Option<proto::ContentRights>,
    tags: &[&str],
) -> guest_api::Result<proto::ContentInfo> {
    let meta = proto::ContentPublishRequest {
        name: name.into(),
        tags: tags.iter().map(|t| t.to_string()).collect(),
        rights,
        ..Default::default()
    };
    c.publish_content(meta, data).await
}

/// Fetches the whole item (kept), or the API error.
async fn fetch(c: &Client, id: &str) -> Result<Result<Vec<u8>, guest_api::Error>> {
    p2pvm_e2e::fetch_or_refusal(c, id, true).await
}

/// The error code a refused fetch got, failing the test if it succeeded.
async fn refused(c: &Client, id: &str) -> Result<(proto::ErrorCode, String)> {
    match fetch(c, id).await? {
        Ok(bytes) => bail!(
            "the fetch succeeded ({} bytes) where it must be refused",
            bytes.len()
        ),
        Err(e) => Ok((e.code().context("not an API error")?, e.to_string())),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_item_only_its_publisher_may_serve_is_not_served_onwards() -> Result<()> {
    let data = p2pvm_e2e::pseudo_random(3 << 20, 41);
    let publisher = node_with(&[], None).await?;
    let p = publisher.app("studio").await?;
    let info = publish(&p, "closed.bin", &data, Some(rights(false, 0)), &["drm"]).await?;
    // A viewer gets it from its publisher, and keeps it.
    let viewer = node_with(&[&publisher], None).await?;
    let v = viewer.app("viewer").await?;
    ensure!(fetch(&v, &info.content_id).await?? == data);
    let held = v.download_content(&info.content_id).await?;
    ensure!(held.local, "the viewer did not keep it");
    let r = held.rights.context("no rights on the viewer's copy")?;
    ensure!(!r.redistribution_allowed && r.licence == "CC-BY-NC-4.0");
    // The publisher withdraws it: the viewer's copy is the only one left, and
    // a third node must not get it from the viewer.
    publisher
        .admin()
        .await?
        .delete_content(&info.content_id)
        .await?;
    let third = node_with(&[&publisher, &viewer], None).await?;
    let t = third.app("third").await?;
    let (code, msg) = refused(&t, &info.content_id).await?;
    ensure!(
        matches!(
            code,
            proto::ErrorCode::NotFound | proto::ErrorCode::DrmNotRedistributable
        ),
        "{code:?}: {msg}"
    );
    // The viewer still holds it (it had something to serve, and did not).
    ensure!(v.content_stat(&info.content_id).await?.local);
    let out = third.admin().await?.credit_show(&viewer.peer_id).await?;
    ensure!(out.drm_failed == 0, "the viewer was blamed for obeying");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_item_is_neither_published_nor_served() -> Result<()> {
    let data = p2pvm_e2e::pseudo_random(1 << 20, 42);
    let (metrics, port) = p2pvm_e2e::scrape::config()?;
    let publisher = node_with(&[], Some(metrics)).await?;
    let p = publisher.app("studio").await?;
    // Already expired: refused before a byte is stored.
    let e = publish(&p, "old.bin", &data, Some(rights(true, now() - 10)), &[])
        .await
        .expect_err("an expired item was published");
    ensure!(
        e.code() == Some(proto::ErrorCode::DrmExpired),
        "publish said {e}"
    );
    ensure!(p.content_list().await?.is_empty(), "something was stored");
    // Valid for a few seconds: fetched while valid, refused once expired.
    let expires = now() + 6;
    let info = publish(&p, "soon.bin", &data, Some(rights(true, expires)), &[]).await?;
    let early = node_with(&[&publisher], None).await?;
    ensure!(fetch(&early.app("early").await?, &info.content_id).await?? == data);
    while now() <= expires {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let late = node_with(&[&publisher], None).await?;
    let (code, msg) = refused(&late.app("late").await?, &info.content_id).await?;
    ensure!(code == proto::ErrorCode::DrmExpired, "{code:?}: {msg}");
    // The publisher refused by its own checker: no fault of its own.
    let c = late.admin().await?.credit_show(&publisher.peer_id).await?;
    ensure!(c.drm_failed == 0, "the publisher was blamed: {c:?}");
    // The publisher's figures name both refusals by stage and reason.
    let figures = p2pvm_e2e::scrape::Scrape::of(port).await?;
    ensure!(
        figures.get("p2pvm_drm_refusals_total{reason=DRM_EXPIRED,stage=publish}") == 1.0,
        "the refused publish is not counted"
    );
    ensure!(
        figures.get("p2pvm_drm_refusals_total{reason=DRM_EXPIRED,stage=serve}") >= 1.0,
        "the refused serve is not counted"
    );
    Ok(())
}

/// Replaces the manifest stored with `id` in a stopped node's store by `f` of
/// it, keeping the publisher's signature: what a liar would serve.
fn tamper_manifest(
    node: &TestNode,
    id: &str,
    data: &[u8],
    f: impl FnOnce(&mut p2pvm_content::Manifest),
) -> Result<()> {
    let store = p2pvm_content::Store::open(&node.data_dir().join("content"))?;
    let id: p2pvm_content::ContentId = id.parse().context("content id")?;
    let stored = store.manifest(&id)?.context("not stored")?;
    let mut signed = p2pvm_content::SignedManifest::decode(stored.as_slice())?;
    let mut m = p2pvm_content::Manifest::decode(signed.manifest.as_slice())?;
    f(&mut m);
    signed.manifest = m.encode_to_vec();
    let forged = signed.encode_to_vec();
    store.delete(&id)?;
    store.import(data, |_, _| Ok(forged))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_manifest_is_refused_and_its_sender_loses_credit() -> Result<()> {
    let data = p2pvm_e2e::pseudo_random(2 << 20, 43);
    let publisher = node_with(&[], None).await?;
    let p = publisher.app("studio").await?;
    let info = publish(&p, "shared.bin", &data, Some(rights(true, 0)), &[]).await?;
    // A liar fetches it legitimately (and, as it may, provides it onwards),
    // then rewrites its licence under the publisher's signature, and serves
    // that.
    let mut liar = node_with(&[&publisher], None).await?;
    liar.app("mirror")
        .await?
        .download_content(&info.content_id)
        .await?;
    liar.stop().await?;
    tamper_manifest(&liar, &info.content_id, &data, |m| {
        m.rights.as_mut().expect("rights").licence = "CC0-1.0".into();
    })?;
    liar.restart().await?;
    // The publisher withdraws it, so the liar is the only provider the DHT
    // still knows (its record from when it fetched).
    publisher
        .admin()
        .await?
        .delete_content(&info.content_id)
        .await?;
    let victim = node_with(&[&publisher, &liar], None).await?;
    let v = victim.app("victim").await?;
    let before = victim.admin().await?.credit_show(&liar.peer_id).await?;
    let (code, msg) = refused(&v, &info.content_id).await?;
    ensure!(
        code == proto::ErrorCode::DrmForgedManifest,
        "{code:?}: {msg}"
    );
    ensure!(msg.contains("signature"), "the reason is not named: {msg}");
    let after = eventually(WAIT, "the liar's DRM failure on record", || async {
        let c = victim
            .admin()
            .await
            .ok()?
            .credit_show(&liar.peer_id)
            .await
            .ok()?;
        (c.drm_failed > 0).then_some(c)
    })
    .await?;
    ensure!(
        after.score < before.score.max(50),
        "the liar kept its credit: {} -> {}",
        before.score,
        after.score
    );
    let history = victim
        .admin()
        .await?
        .credit_history(&liar.peer_id, 100)
        .await?;
    ensure!(
        history.iter().any(|e| e.kind == "drm-failed"),
        "no drm-failed event: {history:?}"
    );
    // Nothing of it was stored.
    ensure!(v.content_list().await?.is_empty());
    Ok(())
}

/// A publisher CA (`ca.pem`, `ca.key`) made with the openssl CLI.
fn openssl_ca(dir: &Path, name: &str) -> Result<()> {
    p2pvm_e2e::openssl_ca(dir, &format!("/CN={name}/O=Test Publishers"))
}

/// A publisher certificate for `peer`, signed by the CA in `dir`, as
/// `<out>.pem` (certificate only: the chain a node is configured with).
fn openssl_publisher(dir: &Path, peer: &str, out: &str) -> Result<()> {
    let ext = format!(
        "subjectAltName=URI:urn:p2pvm:peer:{peer}\nextendedKeyUsage=codeSigning\nkeyUsage=critical,digitalSignature\n"
    );
    std::fs::write(dir.join(format!("{out}.ext")), ext)?;
    let req = format!(
        "req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout {out}.key -out {out}.csr -subj"
    );
    let mut args: Vec<&str> = req.split_whitespace().collect();
    args.push("/CN=Studio One/O=Studio One Films");
    openssl(dir, &args)?;
    let sign = format!(
        "x509 -req -in {out}.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 7 -out {out}.pem -extfile {out}.ext"
    );
    openssl(dir, &sign.split_whitespace().collect::<Vec<_>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certified_publishers_pass_where_policy_requires_certification() -> Result<()> {
    let pki = tempfile::tempdir()?;
    openssl_ca(pki.path(), "Test Publisher CA")?;
    // The publisher's peer id is its identity, made at first start: certify
    // it, then restart it with its chain configured.
    let mut studio = node_with(&[], None).await?;
    studio.stop().await?;
    openssl_publisher(pki.path(), &studio.peer_id, "studio")?;
    let cfg = studio.dir.join("p2pd.toml");
    let mut toml = std::fs::read_to_string(&cfg)?;
    toml.push_str(&format!(
        "\n[drm]\npublisher_chain = \"{}\"\npublisher_cas = [\"{}\"]\n",
        pki.path().join("studio.pem").display(),
        pki.path().join("ca.pem").display()
    ));
    std::fs::write(&cfg, toml)?;
    studio.restart().await?;
    let data = p2pvm_e2e::pseudo_random(1 << 20, 44);
    let certified = publish(
        &studio.app("studio").await?,
        "film.mp4",
        &data,
        None,
        &["film"],
    )
    .await?;
    ensure!(certified.certification == "certified", "{certified:?}");
    // An uncertified publisher of another item.
    let garage = node_with(&[&studio], None).await?;
    let home = publish(
        &garage.app("home").await?,
        "home.mp4",
        &data[..1000],
        None,
        &["film"],
    )
    .await?;
    ensure!(home.certification == "self-signed");

    // A strict node trusts the CA and requires certification for films.
    let strict = node_with(
        &[&studio, &garage],
        Some(format!(
            "[drm]\npublisher_cas = [\"{}\"]\nrequire_certified_tags = [\"film\"]\n",
            pki.path().join("ca.pem").display()
        )),
    )
    .await?;
    let s = strict.app("cinema").await?;
    ensure!(fetch(&s, &certified.content_id).await?? == data);
    let stat = s.content_stat(&certified.content_id).await?;
    ensure!(stat.certification == "certified", "{stat:?}");
    ensure!(
        stat.certified_by.contains("Test Publisher CA")
            && stat.certified_subject.contains("Studio One"),
        "by {:?}, subject {:?}",
        stat.certified_by,
        stat.certified_subject
    );
    let (code, msg) = refused(&s, &home.content_id).await?;
    ensure!(
        code == proto::ErrorCode::DrmUntrustedPublisher,
        "{code:?}: {msg}"
    );
    ensure!(msg.contains("not certified"), "{msg}");
    // The uncertified publisher was not at fault: policy is this node's.
    let c = strict.admin().await?.credit_show(&garage.peer_id).await?;
    ensure!(c.drm_failed == 0, "{c:?}");

    // A node trusting another CA only: the studio's chain does not certify.
    let other = tempfile::tempdir()?;
    openssl_ca(other.path(), "Another CA")?;
    let wary = node_with(
        &[&studio],
        Some(format!(
            "[drm]\npublisher_cas = [\"{}\"]\nrequire_certified = true\n",
            other.path().join("ca.pem").display()
        )),
    )
    .await?;
    let (code, msg) = refused(&wary.app("wary").await?, &certified.content_id).await?;
    ensure!(
        code == proto::ErrorCode::DrmUntrustedPublisher,
        "{code:?}: {msg}"
    );
    ensure!(msg.contains("trusted CA"), "{msg}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_to_start_with_a_chain_that_names_another_peer() -> Result<()> {
    let pki = tempfile::tempdir()?;
    openssl_ca(pki.path(), "Test Publisher CA")?;
    let someone = node_with(&[], None).await?;
    openssl_publisher(pki.path(), &someone.peer_id, "someone")?;
    let cfg = pki.path().join("p2pd.toml");
    std::fs::write(
        &cfg,
        format!(
            "[drm]\npublisher_chain = \"{}\"\n",
            pki.path().join("someone.pem").display()
        ),
    )?;
    let out = tokio::time::timeout(
        WAIT,
        p2pvm_e2e::command(p2pvm_e2e::bin("p2pd"))
            .arg("--data-dir")
            .arg(pki.path().join("data"))
            .arg("--config")
            .arg(&cfg)
            .args(["--no-mdns", "--listen", "/ip4/127.0.0.1/tcp/0"])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .context("p2pd kept running with another peer's publisher certificate")??;
    let err = String::from_utf8_lossy(&out.stderr);
    ensure!(!out.status.success(), "p2pd exited 0: {err}");
    ensure!(
        err.contains("DRM configuration") && err.contains(&someone.peer_id),
        "p2pd did not say why: {err}"
    );
    Ok(())
}
