//! Content commands: publish, get, cat, search, ls, stat, pin, unpin, rm.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Args;
use futures::StreamExt;
use guest_api::{Client, proto};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::print;

/// What `publish` takes.
#[derive(Debug, Args)]
pub struct PublishArgs {
    /// File to publish, or `-` for standard input.
    pub file: String,
    /// Name in the manifest (default: the file name).
    #[arg(long)]
    pub name: Option<String>,
    /// MIME type (default: guessed from the name).
    #[arg(long)]
    pub mime: Option<String>,
    /// Search tag; repeat for several.
    #[arg(long = "tag")]
    pub tags: Vec<String>,
    /// Licence, e.g. CC-BY-4.0.
    #[arg(long)]
    pub licence: Option<String>,
    /// Receivers may not serve it onwards (only this node serves it).
    #[arg(long)]
    pub no_redistribute: bool,
    /// Its rights end this many seconds from now: after that nobody serves
    /// or accepts it.
    #[arg(long, value_name = "SECS", conflicts_with = "expires_unix")]
    pub expires_in: Option<u64>,
    /// Its rights end at this time (unix seconds).
    #[arg(long, value_name = "UNIX_SECS")]
    pub expires_unix: Option<u64>,
    /// Only verified members of this trusted group may receive it; repeat
    /// for several.
    #[arg(long = "group", value_name = "GROUP")]
    pub groups: Vec<String>,
    /// Keep it regardless of the store quota.
    #[arg(long)]
    pub pin: bool,
    /// Let the node read the file itself (host mode) instead of sending the bytes.
    #[arg(long)]
    pub by_path: bool,
}

/// A byte transfer's progress bar of `len` bytes, labelled `what`.
pub fn bar(len: u64, what: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .expect("valid template")
        .progress_chars("=> "),
    );
    pb.set_message(what.to_string());
    pb
}

pub fn info_json(i: &proto::ContentInfo) -> serde_json::Value {
    json!({
        "content_id": i.content_id, "name": i.name, "mime_type": i.mime_type, "size": i.size,
        "publisher": i.publisher, "created_unix": i.created_unix, "tags": i.tags,
        "licence": i.rights.as_ref().map(|r| r.licence.clone()).unwrap_or_default(),
        "redistribution_allowed": i.rights.as_ref().is_none_or(|r| r.redistribution_allowed),
        "expires_unix": i.rights.as_ref().map(|r| r.expires_unix).unwrap_or(0),
        "allowed_groups": i.rights.as_ref().map(|r| r.allowed_groups.clone()).unwrap_or_default(),
        "certification": i.certification, "certified_by": i.certified_by,
        "certified_subject": i.certified_subject,
        "local": i.local, "pinned": i.pinned, "providers": i.providers,
    })
}

fn human_size(n: u64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// The rights in one line: licence, who may serve it, until when, for whom.
fn rights_human(i: &proto::ContentInfo) -> String {
    let Some(r) = &i.rights else {
        return "unrestricted".into();
    };
    let mut parts = Vec::new();
    if !r.licence.is_empty() {
        parts.push(r.licence.clone());
    }
    parts.push(if r.redistribution_allowed {
        "redistributable".into()
    } else {
        "publisher only".into()
    });
    if r.expires_unix != 0 {
        parts.push(format!("expires {} (unix)", r.expires_unix));
    }
    if !r.allowed_groups.is_empty() {
        parts.push(format!("groups: {}", r.allowed_groups.join(", ")));
    }
    parts.join("; ")
}

/// Whether and by whom the publisher is certified.
fn certification_human(i: &proto::ContentInfo) -> String {
    match i.certification.as_str() {
        "certified" => format!("{} (by {})", i.certified_subject, i.certified_by),
        "unverified" => format!(
            "unverified: claims {} (by {}); this node trusts no CA that issued it ([drm] publisher_cas)",
            i.certified_subject, i.certified_by
        ),
        other => other.to_string(),
    }
}

fn info_human(i: &proto::ContentInfo) -> String {
    format!(
        "{}\n  name:      {}\n  type:      {}\n  size:      {} ({} bytes)\n  publisher: {}\n  certified: {}\n  rights:    {}\n  tags:      {}\n  local:     {}{}\n  providers: {}",
        i.content_id,
        i.name,
        i.mime_type,
        human_size(i.size),
        i.size,
        i.publisher,
        certification_human(i),
        rights_human(i),
        i.tags.join(", "),
        i.local,
        if i.pinned { " (pinned)" } else { "" },
        i.providers.len()
    )
}

fn table(items: &[proto::ContentInfo]) -> String {
    let mut s = format!(
        "{:<64}  {:>10}  {:>4}  {:<11}  {:<15}  {}",
        "CONTENT ID", "SIZE", "PROV", "CERTIFIED", "RIGHTS", "NAME"
    );
    for i in items {
        let cert = match i.certification.as_str() {
            "certified" => "yes",
            "self-signed" | "" => "no",
            "unverified" => "unverified",
            _ => "INVALID",
        };
        let rights = match &i.rights {
            None => "open".to_string(),
            Some(r) => {
                let mut w = vec![if r.redistribution_allowed {
                    "open"
                } else {
                    "publisher"
                }];
                if r.expires_unix != 0 {
                    w.push("expiring");
                }
                if !r.allowed_groups.is_empty() {
                    w.push("group");
                }
                w.join(",")
            }
        };
        s.push_str(&format!(
            "\n{:<64}  {:>10}  {:>4}  {:<11}  {:<15}  {}",
            i.content_id,
            human_size(i.size),
            i.providers.len(),
            cert,
            rights,
            i.name
        ));
    }
    s
}

/// When the rights end (unix seconds; 0 = never).
fn expiry(a: &PublishArgs) -> Result<u64> {
    if let Some(t) = a.expires_unix {
        return Ok(t);
    }
    let Some(secs) = a.expires_in else {
        return Ok(0);
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .context("the clock is before 1970")?;
    Ok(now.as_secs().saturating_add(secs.max(1)))
}

pub async fn publish(j: bool, c: &Client, a: &PublishArgs) -> Result<()> {
    let mut meta = proto::ContentPublishRequest {
        name: a.name.clone().unwrap_or_default(),
        mime_type: a.mime.clone().unwrap_or_default(),
        tags: a.tags.clone(),
        rights: Some(proto::ContentRights {
            licence: a.licence.clone().unwrap_or_default(),
            redistribution_allowed: !a.no_redistribute,
            expires_unix: expiry(a)?,
            allowed_groups: a.groups.clone(),
        }),
        pin: a.pin,
        path: String::new(),
    };
    let info = if a.file == "-" {
        if a.by_path {
            bail!("--by-path needs a file, not standard input");
        }
        c.publish_content(meta, tokio::io::stdin()).await?
    } else {
        let path = std::fs::canonicalize(&a.file).with_context(|| a.file.clone())?;
        if meta.name.is_empty() {
            meta.name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
        }
        if a.by_path {
            c.publish_path(&path.to_string_lossy(), meta).await?
        } else {
            let file = tokio::fs::File::open(&path)
                .await
                .with_context(|| path.display().to_string())?;
            let len = file.metadata().await?.len();
            let pb = if j {
                ProgressBar::hidden()
            } else {
                bar(len, "publish")
            };
            let info = c.publish_content(meta, pb.wrap_async_read(file)).await?;
            pb.finish_and_clear();
            info
        }
    };
    print(j, info_json(&info), || info_human(&info));
    Ok(())
}

/// `get`: to a file through a verified stream, or into the node's store.
pub async fn get(j: bool, c: &Client, id: &str, output: Option<&PathBuf>) -> Result<()> {
    let Some(out) = output else {
        // Store only: the node fetches in swarm order; follow its progress events.
        let mut events = c.events().await?;
        let pb = if j {
            ProgressBar::hidden()
        } else {
            bar(0, "get")
        };
        let wanted = id.to_string();
        let follow = {
            let pb = pb.clone();
            tokio::spawn(async move {
                while let Some(e) = events.next().await {
                    if let proto::event::Kind::ContentProgress(p) = e
                        && p.content_id == wanted
                    {
                        pb.set_length(p.size);
                        pb.set_position(p.held_bytes);
                    }
                }
            })
        };
        let info = c.download_content(id).await;
        follow.abort();
        pb.finish_and_clear();
        let info = info?;
        print(j, info_json(&info), || info_human(&info));
        return Ok(());
    };
    let (opened, mut stream) = c.fetch_content(id, 0, 0, true).await?;
    let info = opened.info.unwrap_or_default();
    let tmp = out.with_extension("part");
    let mut file = tokio::fs::File::create(&tmp)
        .await
        .with_context(|| tmp.display().to_string())?;
    let pb = if j {
        ProgressBar::hidden()
    } else {
        bar(opened.length, "get")
    };
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf).await.context("transfer failed")?;
        if n == 0 {
            break;
        }
        file.write_all(&buf[..n]).await?;
        total += n as u64;
        pb.set_position(total);
    }
    pb.finish_and_clear();
    if total != opened.length {
        bail!("transfer ended after {total} of {} bytes", opened.length);
    }
    file.sync_all().await?;
    tokio::fs::rename(&tmp, out).await?;
    print(
        j,
        json!({"content_id": info.content_id, "bytes": total, "path": out}),
        || {
            format!(
                "{} → {} ({})",
                info.content_id,
                out.display(),
                human_size(total)
            )
        },
    );
    Ok(())
}

/// `cat`: verified bytes to standard output, e.g. into a media player's pipe.
pub async fn cat(c: &Client, id: &str, offset: u64, length: u64, no_keep: bool) -> Result<()> {
    let (opened, mut stream) = c.fetch_content(id, offset, length, !no_keep).await?;
    let mut out = tokio::io::stdout();
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0u64;
    loop {
        let n = stream.read(&mut buf).await.context("transfer failed")?;
        if n == 0 {
            break;
        }
        if out.write_all(&buf[..n]).await.is_err() {
            // The reader (a player) went away; that is not an error here.
            return Ok(());
        }
        total += n as u64;
    }
    out.flush().await?;
    if total != opened.length {
        bail!("transfer ended after {total} of {} bytes", opened.length);
    }
    Ok(())
}

pub async fn search(j: bool, c: &Client, query: &str, limit: u32) -> Result<()> {
    let items = c.search_content(query, limit).await?;
    print(
        j,
        json!(items.iter().map(info_json).collect::<Vec<_>>()),
        || table(&items),
    );
    Ok(())
}

pub async fn list(j: bool, c: &Client) -> Result<()> {
    let items = c.content_list().await?;
    print(
        j,
        json!(items.iter().map(info_json).collect::<Vec<_>>()),
        || table(&items),
    );
    Ok(())
}

pub async fn stat(j: bool, c: &Client, id: &str) -> Result<()> {
    let i = c.content_stat(id).await?;
    print(j, info_json(&i), || info_human(&i));
    Ok(())
}
