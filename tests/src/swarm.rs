//! A swarm on loopback: one publisher, many downloaders of one item at once
//! (a flash crowd), each a real `p2pd`. The end-to-end swarm test and the
//! swarm benchmark share it.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use guest_api::proto;

use crate::{NodeOpts, TestNode};

/// How a swarm is set up.
#[derive(Debug, Clone)]
pub struct SwarmSpec {
    /// Nodes in all, the publisher included.
    pub nodes: usize,
    /// The item's size.
    pub bytes: usize,
    /// Every node's TOML config.
    pub config: String,
}

/// A publisher that published its item before any peer joined, and the
/// downloaders that joined afterwards, each bootstrapped from the publisher
/// (as everyone would from a well-known node).
#[derive(Debug)]
pub struct Swarm {
    /// The publisher.
    pub publisher: TestNode,
    /// The downloaders, in the order they joined.
    pub downloaders: Vec<TestNode>,
    /// The item's content id.
    pub id: String,
    /// The item's bytes.
    pub data: Vec<u8>,
}

/// What a flash crowd came to.
#[derive(Debug, Default)]
pub struct CrowdOutcome {
    /// Time from the common start to each finished download, sorted.
    pub done: Vec<Duration>,
    /// Failed downloads, counted by their error's text.
    pub failures: BTreeMap<String, usize>,
}

impl CrowdOutcome {
    /// Fails with every distinct error and its count if any download failed.
    pub fn all_done(&self) -> Result<()> {
        let failed: usize = self.failures.values().sum();
        let why: Vec<String> = self
            .failures
            .iter()
            .map(|(e, n)| format!("{n} x {e}"))
            .collect();
        ensure!(
            failed == 0,
            "{failed} of {} downloads failed: {}",
            failed + self.done.len(),
            why.join("; ")
        );
        Ok(())
    }
}

impl Swarm {
    /// Starts the publisher, publishes an item of `spec.bytes` pseudo-random
    /// bytes, then starts the downloaders.
    pub async fn start(spec: &SwarmSpec) -> Result<Self> {
        let opts = NodeOpts {
            config_toml: Some(spec.config.clone()),
            ..Default::default()
        };
        let publisher = TestNode::start(opts.clone()).await?;
        let data = crate::pseudo_random(spec.bytes, spec.nodes as u64);
        let info = publisher
            .admin()
            .await?
            .publish_content(
                proto::ContentPublishRequest {
                    name: "swarm.bin".into(),
                    ..Default::default()
                },
                &data[..],
            )
            .await?;
        let mut downloaders = Vec::with_capacity(spec.nodes.saturating_sub(1));
        for _ in 1..spec.nodes {
            downloaders.push(
                TestNode::start(NodeOpts {
                    bootstrap: vec![publisher.addr.clone()],
                    ..opts.clone()
                })
                .await?,
            );
        }
        Ok(Self {
            publisher,
            downloaders,
            id: info.content_id,
            data,
        })
    }

    /// Every downloader downloads the item at the same moment.
    pub async fn flash_crowd(&self) -> Result<CrowdOutcome> {
        let mut clients = Vec::with_capacity(self.downloaders.len());
        for d in &self.downloaders {
            clients.push(d.admin().await?);
        }
        let start = Instant::now();
        let tasks: Vec<_> = clients
            .into_iter()
            .map(|c| {
                let id = self.id.clone();
                tokio::spawn(async move {
                    c.download_content(&id).await?;
                    Ok::<_, anyhow::Error>(start.elapsed())
                })
            })
            .collect();
        let mut out = CrowdOutcome::default();
        for t in tasks {
            match t.await? {
                Ok(d) => out.done.push(d),
                Err(e) => *out.failures.entry(format!("{e:#}")).or_default() += 1,
            }
        }
        out.done.sort();
        Ok(out)
    }
}
