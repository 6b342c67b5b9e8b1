//! Trusted peer groups end to end, between real p2pd processes: a group's
//! content reaches its current members only — not a stranger, not a member
//! whose certificate expired, not a revoked one — with groups made by p2pd
//! and with a CA, member certificates and a CRL made by the `openssl` CLI.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use guest_api::{Client, proto};
use p2pvm_e2e::{TestNode, node_with, openssl};

fn group_rights(group: &str) -> proto::ContentRights {
    proto::ContentRights {
        licence: "crew only".into(),
        redistribution_allowed: true,
        expires_unix: 0,
        allowed_groups: vec![group.into()],
    }
}

async fn publish_for(c: &Client, group: &str, data: &[u8]) -> Result<proto::ContentInfo> {
    let meta = proto::ContentPublishRequest {
        name: "crew.bin".into(),
        rights: Some(group_rights(group)),
        ..Default::default()
    };
    Ok(c.publish_content(meta, data).await?)
}

/// The whole item, or the API error the fetch got.
async fn fetch(c: &Client, id: &str) -> Result<Result<Vec<u8>, guest_api::Error>> {
    p2pvm_e2e::fetch_or_refusal(c, id, false).await
}

async fn refused_as_non_member(node: &TestNode, id: &str, who: &str) -> Result<String> {
    match fetch(&node.app("viewer").await?, id).await? {
        Ok(b) => bail!("{who} got the group's item ({} bytes)", b.len()),
        Err(e) => {
            ensure!(
                e.code() == Some(proto::ErrorCode::DrmNotGroupMember),
                "{who}: {e}"
            );
            Ok(e.to_string())
        }
    }
}

/// The owner `o` invites `node` into "crew" for `secs`; `node` joins.
async fn invite(o: &Client, node: &TestNode, secs: u64) -> Result<()> {
    join(
        node,
        &o.group_invite_secs("crew", &node.peer_id, secs).await?.pem,
    )
    .await?;
    Ok(())
}

/// Joins `node` to a group with `invitation` (PEM).
async fn join(node: &TestNode, invitation: &str) -> Result<proto::GroupInfo> {
    Ok(node
        .admin()
        .await?
        .group_join(invitation.as_bytes(), "")
        .await?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_content_reaches_current_members_only() -> Result<()> {
    // The owner checks certificates at a time this test moves.
    let clock = p2pvm_e2e::TestClock::new()?;
    let owner = node_with(&[], Some(clock.config())).await?;
    let o = owner.admin().await?;
    let g = o.group_create("crew", 0).await?;
    ensure!(g.owner && g.member && g.name == "crew", "{g:?}");
    let member = node_with(&[&owner], None).await?;
    let short = node_with(&[&owner], None).await?;
    let revoked = node_with(&[&owner], None).await?;
    let stranger = node_with(&[&owner], None).await?;
    invite(&o, &member, 86_400).await?;
    invite(&o, &short, 3600).await?;
    invite(&o, &revoked, 86_400).await?;
    // A node cannot join with an invitation made for another peer.
    let stolen = o.group_invite("crew", &member.peer_id, 1).await?.pem;
    let e = stranger
        .admin()
        .await?
        .group_join(stolen.as_bytes(), "")
        .await
        .expect_err("joined with another peer's invitation");
    ensure!(
        e.code() == Some(proto::ErrorCode::VerificationFailed),
        "{e}"
    );
    ensure!(stranger.admin().await?.group_list().await?.is_empty());

    let data = p2pvm_e2e::pseudo_random(2 << 20, 51);
    let info = publish_for(&owner.app("crew-tv").await?, "crew", &data).await?;
    let rights = info.rights.as_ref().context("rights")?;
    ensure!(
        rights.allowed_groups == [g.id.clone()],
        "named by id: {rights:?}"
    );

    // A member gets it.
    ensure!(fetch(&member.app("viewer").await?, &info.content_id).await?? == data);
    // A stranger does not.
    refused_as_non_member(&stranger, &info.content_id, "a stranger").await?;
    // A revoked member does not (the owner's CRL says so; the member itself
    // has not heard).
    o.group_revoke("crew", &revoked.peer_id).await?;
    let msg = refused_as_non_member(&revoked, &info.content_id, "a revoked member").await?;
    ensure!(msg.contains("revoked"), "{msg}");
    let members = o.group_members("crew").await?;
    ensure!(
        members
            .members
            .iter()
            .any(|m| m.peer_id == revoked.peer_id && m.revoked),
        "{members:?}"
    );
    // Once the owner's CRL has reached it, the revoked node no longer
    // publishes for the group either (it holds group items only while it
    // is a current member).
    let rc = revoked.admin().await?;
    p2pvm_e2e::eventually(
        Duration::from_secs(30),
        "the CRL reached the revoked node",
        || async {
            let list = rc.group_list().await.ok()?;
            list.iter().any(|x| x.id == g.id && !x.member).then_some(())
        },
    )
    .await?;
    let e = publish_for(&revoked.app("crew-tv").await?, "crew", b"still one of us?")
        .await
        .expect_err("a revoked member published for the group");
    ensure!(e.to_string().contains("DRM_NOT_GROUP_MEMBER"), "{e:#}");
    // An expired member does not: two hours later at the owner, whose
    // certificate checks the short member's (valid for one) fails.
    ensure!(
        short.admin().await?.group_list().await?[0].member,
        "a member until now"
    );
    clock.advance(7200)?;
    refused_as_non_member(&short, &info.content_id, "an expired member").await?;
    // ...while the member still does, and the owner's refusals cost nobody
    // credit.
    ensure!(fetch(&member.app("viewer").await?, &info.content_id).await?? == data);
    for n in [&stranger, &revoked, &short] {
        let c = n.admin().await?.credit_show(&owner.peer_id).await?;
        ensure!(c.drm_failed == 0, "{c:?}");
    }
    Ok(())
}

/// A member certificate for `node` from the openssl CA in `dir`, as
/// `<out>.pem`: signed from the node's own certificate request (`p2pctl
/// group csr`), so that it certifies the node's key, as docs/security.md
/// shows.
async fn openssl_member(dir: &Path, node: &TestNode, out: &str) -> Result<()> {
    let peer = &node.peer_id;
    std::fs::write(
        dir.join(format!("{out}.ext")),
        format!(
            "subjectAltName=URI:urn:p2pvm:peer:{peer}\nextendedKeyUsage=clientAuth,serverAuth\n"
        ),
    )?;
    let csr = node.admin().await?.group_csr().await?;
    ensure!(csr.peer_id == *peer, "{csr:?}");
    std::fs::write(dir.join(format!("{out}.csr")), &csr.pem)?;
    let sign = format!(
        "ca -batch -config ca.cnf -in {out}.csr -out {out}.pem -extfile {out}.ext -days 7 -notext"
    );
    openssl(dir, &sign.split_whitespace().collect::<Vec<_>>())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_made_with_openssl_works_the_same() -> Result<()> {
    let pki = tempfile::tempdir()?;
    let dir = pki.path();
    // A group CA, its database for `openssl ca`, as docs/security.md shows.
    std::fs::write(
        dir.join("ca.cnf"),
        "[ca]\ndefault_ca = g\n[g]\ndir = .\ndatabase = index.txt\nserial = serial\n\
         crlnumber = crlnumber\nnew_certs_dir = .\ncertificate = ca.pem\nprivate_key = ca.key\n\
         default_md = sha256\npolicy = any\ndefault_crl_days = 30\n[any]\ncommonName = supplied\n",
    )?;
    std::fs::write(dir.join("index.txt"), "")?;
    std::fs::write(dir.join("serial"), "1000\n")?;
    std::fs::write(dir.join("crlnumber"), "01\n")?;
    // A CA named as an operator would name it: its local name is derived.
    p2pvm_e2e::openssl_ca(dir, "/CN=film club (Berlin)")?;
    let host = node_with(&[], None).await?;
    let member = node_with(&[&host], None).await?;
    let revoked = node_with(&[&host], None).await?;
    for (n, name) in [(&host, "host"), (&member, "member"), (&revoked, "revoked")] {
        openssl_member(dir, n, name).await?;
    }
    // A certificate openssl made for a key of its own (not the node's)
    // names the node but is not its credential: refused at join.
    std::fs::write(
        dir.join("foreign.ext"),
        format!("subjectAltName=URI:urn:p2pvm:peer:{}\n", member.peer_id),
    )?;
    let req = "req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -keyout foreign.key -out foreign.csr -subj /CN=foreign";
    openssl(dir, &req.split_whitespace().collect::<Vec<_>>())?;
    let sign = "ca -batch -config ca.cnf -in foreign.csr -out foreign.pem -extfile foreign.ext -days 7 -notext";
    openssl(dir, &sign.split_whitespace().collect::<Vec<_>>())?;
    openssl(dir, &["ca", "-config", "ca.cnf", "-revoke", "revoked.pem"])?;
    openssl(
        dir,
        &["ca", "-config", "ca.cnf", "-gencrl", "-out", "crl.pem"],
    )?;
    let ca = std::fs::read_to_string(dir.join("ca.pem"))?;
    let crl = std::fs::read_to_string(dir.join("crl.pem"))?;
    let invitation = |who: &str| -> Result<String> {
        Ok(format!(
            "{ca}{}{crl}",
            std::fs::read_to_string(dir.join(format!("{who}.pem")))?
        ))
    };
    let g = join(&host, &invitation("host")?).await?;
    ensure!(
        g.name == "film-club-Berlin" && !g.owner && g.member && g.crl_number == 1,
        "{g:?}"
    );
    let e = member
        .admin()
        .await?
        .group_join(invitation("foreign")?.as_bytes(), "")
        .await
        .expect_err("joined with a certificate for another key");
    ensure!(e.to_string().contains("not the libp2p key"), "{e}");
    join(&member, &invitation("member")?).await?;
    // The revoked member's own invitation carries the CRL that revokes it.
    let e = revoked
        .admin()
        .await?
        .group_join(invitation("revoked")?.as_bytes(), "")
        .await
        .expect_err("joined with a revoked certificate");
    ensure!(e.to_string().contains("revoked"), "{e}");
    // Joined without the CRL, it still cannot fetch: the host holds the CRL.
    join(
        &revoked,
        &format!("{ca}{}", std::fs::read_to_string(dir.join("revoked.pem"))?),
    )
    .await?;

    let data = p2pvm_e2e::pseudo_random(1 << 20, 52);
    let info = publish_for(&host.app("club").await?, "film-club-Berlin", &data).await?;
    ensure!(fetch(&member.app("viewer").await?, &info.content_id).await?? == data);
    let msg = refused_as_non_member(&revoked, &info.content_id, "a revoked member").await?;
    ensure!(msg.contains("revoked"), "{msg}");

    // Topic keys: no node holds the CA key, so nobody has one until the
    // operator signs the epoch, and the error says so.
    let topic = Client::group_topic(&g.id, "radio");
    let speaker = host.app("speaker").await?;
    let e = speaker
        .publish(&topic, b"too early".to_vec())
        .await
        .expect_err("published without a topic key");
    ensure!(
        e.to_string().contains("p2pctl group topic-key"),
        "the error does not say how to get a key: {e}"
    );
    let h = host.admin().await?;
    let status = h.group_topic_key("film-club-Berlin", &[]).await?;
    ensure!(!status.held && status.epoch == 1, "{status:?}");
    // A signature by another key (the foreign certificate's) is refused.
    let forged = dir.join("forged.sig");
    std::fs::write(dir.join("epoch.txt"), &status.message)?;
    openssl(
        dir,
        &[
            "dgst",
            "-sha256",
            "-sign",
            "foreign.key",
            "-out",
            "forged.sig",
            "epoch.txt",
        ],
    )?;
    let e = h
        .group_topic_key("film-club-Berlin", &std::fs::read(&forged)?)
        .await
        .expect_err("took a signature the CA did not make");
    ensure!(
        e.code() == Some(proto::ErrorCode::VerificationFailed),
        "{e}"
    );
    // The operator runs the command the node prints, with the CA's key.
    let signed = std::process::Command::new("sh")
        .args(["-c", &status.openssl_command])
        .current_dir(dir)
        .status()?;
    ensure!(signed.success(), "{}", status.openssl_command);
    let sig = std::fs::read(dir.join(format!("epoch-{}.sig", status.epoch)))?;
    ensure!(h.group_topic_key("film-club-Berlin", &sig).await?.held);
    // The member gets the key from the host, checked against the CA.
    let heard = listen(&member, &topic).await?;
    ensure!(
        publish_until(&speaker, &topic, "hello club", 30, &heard).await,
        "a group topic of an openssl-run group did not carry a message"
    );
    let m = member.admin().await?;
    ensure!(m.group_topic_key("film-club-Berlin", &[]).await?.held);

    // Revocations: the revoked node joined without the CRL and still
    // thinks itself a member, until the operator hands the CA's CRL to any
    // member to publish.
    let r = revoked.admin().await?;
    ensure!(
        r.group_list()
            .await?
            .iter()
            .any(|x| x.id == g.id && x.member)
    );
    let published = m
        .group_crl_publish("film-club-Berlin", crl.as_bytes())
        .await?;
    ensure!(
        published.relays_crl && published.crl_number == 1,
        "{published:?}"
    );
    p2pvm_e2e::eventually(
        Duration::from_secs(60),
        "the revoked node took the published CRL",
        || async {
            let gs = r.group_list().await.ok()?;
            gs.iter()
                .any(|x| x.id == g.id && x.crl_number == 1 && !x.member)
                .then_some(())
        },
    )
    .await?;
    // Bytes that are no CRL are refused, and change nothing.
    let e = m
        .group_crl_publish(
            "film-club-Berlin",
            b"-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        )
        .await
        .expect_err("took junk as a CRL");
    ensure!(
        e.code() == Some(proto::ErrorCode::VerificationFailed),
        "{e}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revocation_reaches_members_that_serve_the_group() -> Result<()> {
    let owner = node_with(&[], None).await?;
    let o = owner.admin().await?;
    let g = o.group_create("crew", 0).await?;
    let mirror = node_with(&[&owner], None).await?;
    let leaver = node_with(&[&owner, &mirror], None).await?;
    invite(&o, &mirror, 86_400).await?;
    invite(&o, &leaver, 86_400).await?;
    // The mirror, a member, keeps the group's item and provides it; the
    // owner withdraws its own copy.
    let data = p2pvm_e2e::pseudo_random(1 << 20, 53);
    let info = publish_for(&owner.app("crew-tv").await?, "crew", &data).await?;
    mirror
        .app("mirror")
        .await?
        .download_content(&info.content_id)
        .await?;
    o.delete_content(&info.content_id).await?;
    // Revoked at the owner: the mirror learns it from the group's CRL topic.
    o.group_revoke("crew", &leaver.peer_id).await?;
    let m = mirror.admin().await?;
    p2pvm_e2e::eventually(
        Duration::from_secs(60),
        "the mirror took the new CRL",
        || async {
            let groups = m.group_list().await.ok()?;
            groups
                .iter()
                .any(|x| x.id == g.id && x.crl_number == 1)
                .then_some(())
        },
    )
    .await?;
    let msg = refused_as_non_member(&leaver, &info.content_id, "the revoked member").await?;
    ensure!(msg.contains("revoked"), "{msg}");
    // The topic is the node's: an app may neither publish nor listen there.
    let app = mirror.app("nosy").await?;
    let e = app
        .subscribe(&format!("p2pvm/group/{}/crl", g.id))
        .await
        .expect_err("an app subscribed to a reserved topic");
    ensure!(e.code() == Some(proto::ErrorCode::PermissionDenied), "{e}");
    Ok(())
}

/// Publishes `text` on `topic` once a second until `until` says done, for up
/// to `secs`; true if it did.
async fn publish_until(
    c: &Client,
    topic: &str,
    text: &str,
    secs: u64,
    until: &tokio::sync::watch::Receiver<Vec<String>>,
) -> bool {
    for _ in 0..secs {
        let _ = c.publish(topic, text.as_bytes().to_vec()).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        if until.borrow().iter().any(|m| m == text) {
            return true;
        }
    }
    false
}

/// Every message `node`'s app receives on `topic`, as text.
async fn listen(node: &TestNode, topic: &str) -> Result<tokio::sync::watch::Receiver<Vec<String>>> {
    use futures::StreamExt;
    let app = node.app("listener").await?;
    let mut msgs = app.subscribe(topic).await?;
    let (tx, rx) = tokio::sync::watch::channel(Vec::new());
    tokio::spawn(async move {
        let _keep = app;
        while let Some(m) = msgs.next().await {
            let text = String::from_utf8_lossy(&m.data).into_owned();
            tx.send_modify(|v| v.push(text));
        }
    });
    Ok(rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_topics_are_read_and_written_by_current_members_only() -> Result<()> {
    let owner = node_with(&[], None).await?;
    let o = owner.admin().await?;
    let g = o.group_create("crew", 0).await?;
    let topic = Client::group_topic(&g.id, "radio");
    let reader = node_with(&[&owner], None).await?;
    let writer = node_with(&[&owner], None).await?;
    let leaver = node_with(&[&owner], None).await?;
    let stranger = node_with(&[&owner], None).await?;
    let lapsing = p2pvm_e2e::TestClock::new()?;
    let lapsed = node_with(&[&owner], Some(lapsing.config())).await?;
    for n in [&reader, &writer, &leaver] {
        invite(&o, n, 86_400).await?;
    }
    invite(&o, &lapsed, 3600).await?;
    // A stranger's node neither listens nor speaks on the group's topic.
    let s = stranger.app("nosy").await?;
    let e = s
        .subscribe(&topic)
        .await
        .expect_err("a stranger subscribed");
    ensure!(e.code() == Some(proto::ErrorCode::DrmNotGroupMember), "{e}");
    let e = s
        .publish(&topic, b"hi".to_vec())
        .await
        .expect_err("a stranger published");
    ensure!(e.code() == Some(proto::ErrorCode::DrmNotGroupMember), "{e}");

    let heard = listen(&reader, &topic).await?;
    let leaver_heard = listen(&leaver, &topic).await?;
    let _owner_heard = listen(&owner, &topic).await?;
    let w = writer.app("speaker").await?;
    ensure!(
        publish_until(&w, &topic, "hello crew", 30, &heard).await,
        "a member's message did not reach another member"
    );

    // Revoked: the owner's new CRL reaches the members, with a new key epoch.
    o.group_revoke("crew", &leaver.peer_id).await?;
    let r = reader.admin().await?;
    p2pvm_e2e::eventually(
        Duration::from_secs(60),
        "the reader took the CRL",
        || async {
            let gs = r.group_list().await.ok()?;
            gs.iter().any(|x| x.crl_number == 1).then_some(())
        },
    )
    .await?;
    // What the revoked member says (with the key it still has) is not taken...
    let l = leaver.app("speaker").await?;
    ensure!(
        !publish_until(&l, &topic, "from the revoked", 6, &heard).await,
        "a revoked member's message was taken"
    );
    // ...while members go on, under the new key, which it cannot read.
    ensure!(
        publish_until(&w, &topic, "after the revocation", 30, &heard).await,
        "members could not talk after a revocation"
    );
    ensure!(
        !leaver_heard
            .borrow()
            .iter()
            .any(|m| m == "after the revocation"),
        "the revoked member read the group's topic"
    );
    ensure!(leaver_heard.borrow().iter().any(|m| m == "hello crew"));
    // A member whose certificate expired (two hours later on its node, for
    // a membership of one) neither listens nor speaks.
    let early = lapsed.app("early").await?;
    let _listening = early
        .subscribe(&topic)
        .await
        .context("a current member may subscribe")?;
    lapsing.advance(7200)?;
    let l = lapsed.app("late").await?;
    let e = l
        .subscribe(&topic)
        .await
        .expect_err("an expired member subscribed");
    ensure!(e.code() == Some(proto::ErrorCode::DrmNotGroupMember), "{e}");
    let e = l
        .publish(&topic, b"late".to_vec())
        .await
        .expect_err("an expired member published");
    ensure!(e.code() == Some(proto::ErrorCode::DrmNotGroupMember), "{e}");
    Ok(())
}

/// A member that lies about topic keys cannot lock another member out of
/// the group's topics: it hands out a key the group CA did not sign (refused
/// before use) and seals its own messages with a key of its own, which
/// would open them; a newcomer that took such a key would never read the
/// owner's messages again. Here it keeps asking until it gets the CA's key,
/// and the liar's messages are never taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_handing_out_wrong_topic_keys_cannot_lock_others_out() -> Result<()> {
    let owner = node_with(&[], None).await?;
    let o = owner.admin().await?;
    let g = o.group_create("crew", 0).await?;
    let topic = Client::group_topic(&g.id, "radio");
    let liar = node_with(
        &[&owner],
        Some("[content]\ntest_wrong_group_keys = true\n".into()),
    )
    .await?;
    let newcomer = node_with(&[&liar], None).await?;
    for n in [&liar, &newcomer] {
        invite(&o, n, 86_400).await?;
    }
    let _owner_heard = listen(&owner, &topic).await?;
    let _liar_heard = listen(&liar, &topic).await?;
    let heard = listen(&newcomer, &topic).await?;
    // The liar speaks first: the newcomer, without the key, asks the liar
    // for it and gets one the CA did not sign, which must not be kept.
    let l = liar.app("speaker").await?;
    ensure!(
        !publish_until(&l, &topic, "from the liar", 6, &heard).await,
        "a message sealed with a liar's own key was taken"
    );
    // The owner's messages still reach the newcomer...
    let w = owner.app("speaker").await?;
    ensure!(
        publish_until(&w, &topic, "from the owner", 30, &heard).await,
        "a wrong key from a member locked the newcomer out"
    );
    // ...and the liar's never do.
    ensure!(
        !publish_until(&l, &topic, "from the liar, again", 6, &heard).await,
        "the newcomer took a message sealed with a key the CA did not sign"
    );
    let n = newcomer.admin().await?;
    ensure!(n.group_topic_key(&g.id, &[]).await?.held);
    Ok(())
}
