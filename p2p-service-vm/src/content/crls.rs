//! Revocations reach members: each group's CRL travels on a gossipsub topic
//! of its own (`p2pvm/group/<id>/crl`). Every member listens; the owner
//! publishes a new CRL as soon as it revokes someone and then again every
//! [`REPUBLISH`], so members that were away or not yet meshed catch up. For
//! a CA kept outside any node, the operator hands a CRL to any member
//! (`p2pctl group crl`), which then does the same. A CRL
//! is taken only if the group CA signed it and its number is higher than the
//! one held ([`p2pvm_security::Groups::accept_crl`]), so anyone may relay one
//! and nobody can roll one back.

use std::time::Duration;

use p2pvm_security::GroupId;
use tokio::sync::broadcast::error::RecvError;
use tracing::{debug, info, warn};

use super::ContentService;
use crate::node::{Command, NodeEvent};
use crate::report::chain;

/// How often an owner publishes its groups' CRLs again.
const REPUBLISH: Duration = Duration::from_secs(10);

/// Topics under this prefix are the node's own; apps may not use them.
pub const RESERVED_TOPIC_PREFIX: &str = "p2pvm/";

/// The topic a group's CRLs travel on.
pub fn crl_topic(id: GroupId) -> String {
    format!("p2pvm/group/{id}/crl")
}

fn group_of(topic: &str) -> Option<GroupId> {
    topic
        .strip_prefix("p2pvm/group/")?
        .strip_suffix("/crl")?
        .parse()
        .ok()
}

impl ContentService {
    /// Listens to the CRL topic of every group this node knows, and
    /// republishes the CRLs of the groups it owns.
    pub(crate) fn watch_crls(&self) {
        let mut events = self.inner.ctx.node.subscribe_events();
        let svc = self.clone();
        self.spawn(async move {
            for g in svc.groups().list() {
                svc.listen_crls(g.id).await;
            }
            let mut republish = tokio::time::interval(REPUBLISH);
            loop {
                tokio::select! {
                    _ = svc.inner.ctx.shutdown.cancelled() => return,
                    _ = republish.tick() => svc.republish_crls().await,
                    ev = events.recv() => match ev {
                        Ok(NodeEvent::Pubsub(m)) => {
                            if let Some(id) = group_of(&m.topic) {
                                svc.take_crl(id, m.data.to_vec()).await;
                            } else if m.topic.starts_with("p2pvm/group/") {
                                // Opening may wait for a key from a member;
                                // a flood of them (from anyone on the mesh)
                                // is dropped, not queued.
                                match svc.inner.group_messages.clone().try_acquire_owned() {
                                    Ok(permit) => {
                                        let each = svc.clone();
                                        svc.spawn(async move {
                                            each.take_group_message(m).await;
                                            drop(permit);
                                        });
                                    }
                                    Err(_) => debug!(topic = %m.topic, "dropping a group message: too many being opened"),
                                }
                            }
                        }
                        Ok(_) | Err(RecvError::Lagged(_)) => {}
                        Err(RecvError::Closed) => return,
                    },
                }
            }
        });
    }

    /// Subscribes to group `id`'s CRL topic.
    pub(crate) async fn listen_crls(&self, id: GroupId) {
        let topic = crl_topic(id);
        if let Err(e) = self
            .inner
            .ctx
            .node
            .call(|reply| Command::Subscribe(topic, reply))
            .await
        {
            warn!(group = %id, error = %chain(&e), "cannot listen for the group's revocations");
        }
    }

    /// Publishes group `id`'s CRL (`crl`, DER) to its members.
    pub(crate) async fn publish_crl(&self, id: GroupId, crl: Vec<u8>) {
        let topic = crl_topic(id);
        match self
            .inner
            .ctx
            .node
            .call(|reply| Command::Publish(topic, crl.into(), reply))
            .await
        {
            Ok(()) => debug!(group = %id, "published the group's CRL"),
            // No member listening yet: the next round tries again.
            Err(e) => debug!(group = %id, error = %chain(&e), "CRL not published this round"),
        }
    }

    async fn republish_crls(&self) {
        for g in self.groups().list() {
            if g.relays_crl
                && let Some(crl) = self.groups().crl(g.id)
            {
                self.publish_crl(g.id, crl).await;
            }
        }
    }

    async fn take_crl(&self, id: GroupId, crl: Vec<u8>) {
        let svc = self.clone();
        let taken = tokio::task::spawn_blocking(move || svc.groups().accept_crl(id, &crl)).await;
        match taken {
            Ok(Ok(true)) => info!(group = %id, "took a newer CRL for the group"),
            Ok(Ok(false)) => {}
            Ok(Err(e)) => warn!(group = %id, error = %chain(&e), "refused a CRL for the group"),
            Err(e) => warn!(group = %id, error = %chain(&e), "CRL check failed"),
        }
    }
}
