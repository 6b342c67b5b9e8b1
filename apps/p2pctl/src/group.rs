//! `p2pctl group create|invite|join|revoke|members|list|csr|topic-key|crl`:
//! trusted peer groups. Groups are named locally; content names them by id.
//! `topic-key` and `crl` are how the operator of a group CA kept outside any
//! node (openssl) gives the group its topic keys and revocations.

use anyhow::{Context, Result};
use clap::Subcommand;
use guest_api::{Client, proto};
use serde_json::json;

use crate::print;

/// Group commands.
#[derive(Debug, Subcommand)]
pub enum GroupCmd {
    /// Create a group this node owns (its CA key stays in the node's data
    /// directory) (admin).
    Create {
        /// Local name: letters, digits, '-', '_', '.'.
        name: String,
        /// The group CA's validity, in days.
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
    /// Invite a peer: a member certificate bound to its peer id, as an
    /// invitation file that peer's operator joins with (admin, owner).
    Invite {
        /// Group name or id.
        group: String,
        /// The invited peer.
        peer: String,
        /// The membership's validity, in days.
        #[arg(long, default_value_t = 30)]
        days: u64,
        /// Write the invitation here (default: standard output).
        #[arg(long, short)]
        output: Option<std::path::PathBuf>,
    },
    /// Join a group with an invitation file (ours, or PEM made with openssl:
    /// the group CA, then the member certificate, then optionally a CRL)
    /// (admin).
    Join {
        /// The invitation file.
        file: std::path::PathBuf,
        /// Local name (default: the group CA's common name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Revoke a member: a new CRL (admin, owner).
    Revoke {
        /// Group name or id.
        group: String,
        /// The member.
        peer: String,
    },
    /// The members the owner issued certificates to (admin, owner).
    Members {
        /// Group name or id.
        group: String,
    },
    /// Groups this node knows.
    List,
    /// The group's topic key of the current epoch: whether this node holds
    /// it, and how the group CA signs it. With `--signature`, hand this node
    /// the CA's signature (a CA kept outside any node: it signs the epoch's
    /// text with openssl, as this command prints; members then pass the key
    /// on to each other) (admin).
    TopicKey {
        /// Group name or id.
        group: String,
        /// The CA's signature over the epoch's text (DER, as `openssl dgst
        /// -sign` writes it).
        #[arg(long)]
        signature: Option<std::path::PathBuf>,
    },
    /// Publish a CRL signed by the group's CA (made with openssl, say) to the
    /// group's members; this node sends it on from then on, as an owner
    /// does (admin).
    Crl {
        /// Group name or id.
        group: String,
        /// The CRL (PEM or DER).
        file: std::path::PathBuf,
    },
    /// A certificate signing request for this node's own key, for a group
    /// CA kept elsewhere (e.g. `openssl ca -in node.csr`) to sign into its
    /// member certificate (admin).
    Csr {
        /// Write the request here (default: standard output).
        #[arg(long, short)]
        output: Option<std::path::PathBuf>,
    },
}

fn group_json(g: &proto::GroupInfo) -> serde_json::Value {
    json!({
        "id": g.id, "name": g.name, "owner": g.owner, "member": g.member,
        "ca_subject": g.ca_subject, "member_until_unix": g.member_until_unix,
        "crl_number": g.crl_number, "relays_crl": g.relays_crl,
        "topic_key_held": g.topic_key_held,
    })
}

fn group_human(g: &proto::GroupInfo) -> String {
    format!(
        "{} ({})\n  CA:     {}\n  owner:  {}\n  member: {}{}\n  CRL:    {}{}\n  topic key of the current epoch: {}",
        g.name,
        g.id,
        g.ca_subject,
        g.owner,
        g.member,
        if g.member_until_unix > 0 {
            format!(" (certificate until {} unix)", g.member_until_unix)
        } else {
            String::new()
        },
        if g.crl_number > 0 {
            format!("number {}", g.crl_number)
        } else {
            "none".into()
        },
        if g.relays_crl && !g.owner {
            " (sent on to members from here)"
        } else {
            ""
        },
        if g.topic_key_held {
            "held"
        } else {
            "not held (`p2pctl group topic-key` says how to get it)"
        }
    )
}

pub async fn run(j: bool, c: &Client, cmd: &GroupCmd) -> Result<()> {
    match cmd {
        GroupCmd::Create { name, days } => {
            let g = c.group_create(name, *days).await?;
            print(j, group_json(&g), || group_human(&g));
        }
        GroupCmd::Invite {
            group,
            peer,
            days,
            output,
        } => {
            let inv = c.group_invite(group, peer, *days).await?;
            match output {
                Some(path) => {
                    std::fs::write(path, &inv.pem)
                        .with_context(|| format!("writing {}", path.display()))?;
                    print(
                        j,
                        json!({"group_id": inv.group_id, "peer_id": peer, "file": path}),
                        || format!("invited {peer} into {group}: {}", path.display()),
                    );
                }
                None => print(
                    j,
                    json!({"group_id": inv.group_id, "peer_id": peer, "pem": inv.pem}),
                    || inv.pem.trim_end().to_string(),
                ),
            }
        }
        GroupCmd::Join { file, name } => {
            let bytes =
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            let g = c
                .group_join(&bytes, name.as_deref().unwrap_or_default())
                .await?;
            print(j, group_json(&g), || group_human(&g));
        }
        GroupCmd::Csr { output } => {
            let csr = c.group_csr().await?;
            match output {
                Some(path) => {
                    std::fs::write(path, &csr.pem)
                        .with_context(|| format!("writing {}", path.display()))?;
                    print(j, json!({"peer_id": csr.peer_id, "file": path}), || {
                        format!(
                            "certificate request for {}: {}",
                            csr.peer_id,
                            path.display()
                        )
                    });
                }
                None => print(j, json!({"peer_id": csr.peer_id, "pem": csr.pem}), || {
                    csr.pem.trim_end().to_string()
                }),
            }
        }
        GroupCmd::TopicKey { group, signature } => {
            let sig = match signature {
                Some(p) => std::fs::read(p).with_context(|| format!("reading {}", p.display()))?,
                None => Vec::new(),
            };
            let k = c.group_topic_key(group, &sig).await?;
            print(
                j,
                json!({"group_id": k.group_id, "epoch": k.epoch, "held": k.held,
                    "message": k.message, "openssl_command": k.openssl_command}),
                || {
                    if k.held {
                        format!(
                            "group {}: the topic key of epoch {} is held here",
                            k.group_id, k.epoch
                        )
                    } else {
                        format!(
                            "group {}: no topic key of epoch {} here, and no member has handed one over.\n\
                             The group's CA signs this text for it:\n  {}\n\
                             With the CA key in ca.key (once per epoch: every signature is another key):\n  {}\n\
                             then, on any one member: p2pctl group topic-key {group} --signature epoch-{}.sig\n\
                             (members pass it on; the file is as secret as the key: delete it afterwards)",
                            k.group_id, k.epoch, k.message, k.openssl_command, k.epoch
                        )
                    }
                },
            );
        }
        GroupCmd::Crl { group, file } => {
            let bytes =
                std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
            let g = c.group_crl_publish(group, &bytes).await?;
            print(j, group_json(&g), || {
                format!(
                    "published CRL number {} to the members of {}",
                    g.crl_number, g.name
                )
            });
        }
        GroupCmd::Revoke { group, peer } => {
            c.group_revoke(group, peer).await?;
            print(j, json!({"group": group, "revoked": peer}), || {
                format!("revoked {peer} in {group}")
            });
        }
        GroupCmd::Members { group } => {
            let list = c.group_members(group).await?;
            let rows: Vec<_> = list
                .members
                .iter()
                .map(|m| {
                    json!({"peer_id": m.peer_id, "serial": m.serial,
                        "not_before_unix": m.not_before_unix, "not_after_unix": m.not_after_unix,
                        "revoked": m.revoked})
                })
                .collect();
            print(
                j,
                json!({"group_id": list.group_id, "members": rows}),
                || {
                    let mut s = format!("{:<54} {:<8} {:>12}", "PEER", "STATUS", "UNTIL (unix)");
                    for m in &list.members {
                        s.push_str(&format!(
                            "\n{:<54} {:<8} {:>12}",
                            m.peer_id,
                            if m.revoked { "revoked" } else { "valid" },
                            m.not_after_unix
                        ));
                    }
                    s
                },
            );
        }
        GroupCmd::List => {
            let groups = c.group_list().await?;
            print(
                j,
                json!(groups.iter().map(group_json).collect::<Vec<_>>()),
                || {
                    let mut s = format!(
                        "{:<20} {:<32} {:<5} {:<6} {}",
                        "NAME", "ID", "OWNER", "MEMBER", "CA"
                    );
                    for g in &groups {
                        s.push_str(&format!(
                            "\n{:<20} {:<32} {:<5} {:<6} {}",
                            g.name, g.id, g.owner, g.member, g.ca_subject
                        ));
                    }
                    s
                },
            );
        }
    }
    Ok(())
}
