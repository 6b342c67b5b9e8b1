//! The session's topic subscriptions and service advertisements. The node
//! joins a topic or announces a service once however many sessions ask:
//! sessions share a reference count ([`crate::api::service::Inner`]), the first
//! reference acts on the node and the last one's release undoes it.
//!
//! ```text
//!  Subscribe / AdvertiseService ─► count 0 → 1 ─► Command::Subscribe / Announce
//!  Unsubscribe / WithdrawService / session end ─► count 1 → 0 ─► Unsubscribe / StopProviding
//! ```
//!
//! Messages of subscribed topics reach the app through `events`.

use std::collections::HashMap;

use p2pvm_proto::pb;

use super::{Session, ok};
use crate::api::{ApiError, ops};
use crate::node::{Command, service_key};

impl Session {
    pub(super) async fn subscribe(
        &mut self,
        topic: String,
    ) -> Result<pb::response::Result, ApiError> {
        if topic.is_empty() || topic.len() > 256 {
            return Err(ApiError::bad("topic must be 1-256 bytes"));
        }
        crate::api::ops::reserved_topic(&topic)?;
        let node_topic = crate::api::ops::group_topic_of(&self.svc, &topic)?
            .map(|(id, name)| crate::content::group_topics::wire_topic(id, &name))
            .unwrap_or_else(|| topic.clone());
        if self.topics.contains(&topic) {
            return Err(ApiError::new(
                pb::ErrorCode::AlreadyExists,
                "already subscribed",
            ));
        }
        let mut counts = self.svc.inner.topics.lock().await;
        let count = counts.entry(topic.clone()).or_insert(0);
        if *count == 0 {
            let t = node_topic;
            if let Err(e) = self.svc.inner.node.call(|r| Command::Subscribe(t, r)).await {
                counts.remove(&topic);
                return Err(e.into());
            }
        }
        *count += 1;
        drop(counts);
        self.topics.insert(topic);
        self.sync_state();
        ok()
    }

    pub(super) async fn unsubscribe(
        &mut self,
        topic: &str,
    ) -> Result<pb::response::Result, ApiError> {
        if !self.topics.remove(topic) {
            return Err(ApiError::new(pb::ErrorCode::NotFound, "not subscribed"));
        }
        self.release_topic(topic).await;
        self.sync_state();
        ok()
    }

    pub(super) async fn advertise(
        &mut self,
        name: String,
    ) -> Result<pb::response::Result, ApiError> {
        ops::validate_service_name(&name)?;
        if self.services.contains(&name) {
            return Err(ApiError::new(
                pb::ErrorCode::AlreadyExists,
                "already advertised",
            ));
        }
        let mut counts = self.svc.inner.services.lock().await;
        let count = counts.entry(name.clone()).or_insert(0);
        if *count == 0 {
            // The provider record is stored locally at once and announced to the
            // DHT in the background; waiting for that (up to the query timeout)
            // would stall this session and every other advertiser.
            let announce = Command::Announce(service_key(&name));
            if let Err(e) = self.svc.inner.node.send(announce).await {
                counts.remove(&name);
                return Err(e.into());
            }
        }
        *count += 1;
        drop(counts);
        self.services.insert(name);
        self.sync_state();
        ok()
    }

    pub(super) async fn withdraw(&mut self, name: &str) -> Result<pb::response::Result, ApiError> {
        if !self.services.remove(name) {
            return Err(ApiError::new(
                pb::ErrorCode::NotFound,
                "not advertised by this app",
            ));
        }
        self.release_service(name).await;
        self.sync_state();
        ok()
    }

    /// At the session's end: every topic, then every service it held.
    pub(super) async fn release_registrations(&mut self) {
        for topic in std::mem::take(&mut self.topics) {
            self.release_topic(&topic).await;
        }
        for name in std::mem::take(&mut self.services) {
            self.release_service(&name).await;
        }
    }

    async fn release_topic(&self, topic: &str) {
        let node_topic = crate::content::group_topics::wire_of_app_topic(topic)
            .unwrap_or_else(|| topic.to_owned());
        let last = Command::Unsubscribe(node_topic);
        self.release(&self.svc.inner.topics, topic, last).await;
    }

    async fn release_service(&self, name: &str) {
        let last = Command::StopProviding(service_key(name));
        self.release(&self.svc.inner.services, name, last).await;
    }

    /// Drops one session's reference to a shared node-level object and sends
    /// `on_last` to the node when it was the last one.
    async fn release(
        &self,
        counts: &tokio::sync::Mutex<HashMap<String, usize>>,
        name: &str,
        on_last: Command,
    ) {
        let mut counts = counts.lock().await;
        if let Some(c) = counts.get_mut(name) {
            *c -= 1;
            if *c == 0 {
                counts.remove(name);
                let _ = self.svc.inner.node.send(on_last).await;
            }
        }
    }
}
