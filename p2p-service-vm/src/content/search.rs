//! Search: by content id (providers + manifest) or by keywords.
//!
//! Keyword search is DHT-backed: a publisher announces itself as a provider of
//! `keyword_key(word)` for each keyword of each item, so any node can find,
//! through the DHT alone, the peers that have items with a word — whether or
//! not it was ever connected to them. It then asks those peers for their
//! matching manifests and verifies every signature before reporting a hit.

use std::collections::HashMap;
use std::time::Duration;

use futures::AsyncWriteExt;
use libp2p::PeerId;
use p2pvm_content::transfer::{self, Op, SearchRequest, Status, TransferRequest};
use p2pvm_content::{ContentId, keywords};
use prost::Message;
use tracing::debug;

use super::wire::{read_msg, read_payload, write_msg};
use super::{
    ContentInfo, ContentService, ContentServiceError, ProviderError, VerifiedManifest, keyword_key,
};
use crate::node::Command;

/// Providers of a keyword asked at most (at once). 20 found 35–42 % of 100
/// items that 60 nodes published under a shared word: every provider holds
/// its own items, so recall grows with the providers asked.
const MAX_PEERS: usize = 64;
/// Time allowed per peer.
const PEER_TIMEOUT: Duration = Duration::from_secs(10);

pub(crate) async fn search(
    svc: &ContentService,
    query: &str,
    limit: usize,
) -> Result<Vec<ContentInfo>, ContentServiceError> {
    let limit = limit.clamp(1, 200);
    if let Ok(id) = query.trim().parse::<ContentId>() {
        return Ok(vec![svc.stat(&id).await?]);
    }
    let words = keywords::query_keywords(query);
    if words.is_empty() {
        return Err(ContentServiceError::BadRequest(
            "a query needs a word of two or more letters, or a content id".into(),
        ));
    }
    let me = svc.inner.ctx.node.peer_id();
    // Local items first (the store's word index: on a blocking thread).
    let local_words = words.clone();
    let mut hits: HashMap<ContentId, ContentInfo> = svc
        .blocking(move |svc| {
            let mut hits = HashMap::new();
            for (id, signed) in svc
                .inner
                .ctx
                .store
                .search(&local_words, limit, |_, _| true)?
            {
                if let Ok(m) = VerifiedManifest::parse(&signed) {
                    let local = svc.inner.ctx.store.get(&id)?;
                    hits.insert(
                        id,
                        ContentInfo {
                            manifest: m,
                            local,
                            providers: vec![me],
                        },
                    );
                }
            }
            Ok::<_, ContentServiceError>(hits)
        })
        .await??;
    // The rarest word would be best; the longest is a cheap stand-in.
    let word = words.iter().max_by_key(|w| w.len()).expect("not empty");
    let key = keyword_key(word);
    let peers = svc
        .inner
        .ctx
        .node
        .call_timeout(Duration::from_secs(15), |reply| Command::FindProviders {
            key,
            limit: MAX_PEERS,
            reply,
        })
        .await
        .unwrap_or_default();
    let asks = peers
        .into_iter()
        .filter(|p| *p != me)
        .take(MAX_PEERS)
        .map(|peer| {
            let svc = svc.clone();
            let words = words.clone();
            async move {
                let r = tokio::time::timeout(PEER_TIMEOUT, ask(&svc, peer, words, limit)).await;
                (peer, r.unwrap_or(Err(ProviderError::NoAnswer)))
            }
        });
    for (peer, result) in futures::future::join_all(asks).await {
        match result {
            Ok(found) => {
                for m in found {
                    if !keywords::matches(&m.manifest, &words) {
                        continue;
                    }
                    let e = hits.entry(m.id).or_insert_with(|| ContentInfo {
                        manifest: m,
                        local: None,
                        providers: Vec::new(),
                    });
                    if !e.providers.contains(&peer) {
                        e.providers.push(peer);
                    }
                }
            }
            Err(e) => debug!(%peer, error = %crate::report::chain(&e), "search peer failed"),
        }
    }
    let mut out: Vec<ContentInfo> = hits.into_values().collect();
    out.sort_by(|a, b| {
        b.providers
            .len()
            .cmp(&a.providers.len())
            .then_with(|| a.manifest.manifest.name.cmp(&b.manifest.manifest.name))
    });
    out.truncate(limit);
    Ok(out)
}

async fn ask(
    svc: &ContentService,
    peer: PeerId,
    words: Vec<String>,
    limit: usize,
) -> Result<Vec<VerifiedManifest>, ProviderError> {
    let mut stream = super::fetch::open_stream(svc, peer).await?;
    let op = Op::Search(SearchRequest {
        keywords: words,
        limit: limit as u32,
    });
    write_msg(&mut stream, &TransferRequest { op: Some(op) }).await?;
    stream.flush().await?;
    let header: transfer::TransferResponse = read_msg(&mut stream)
        .await?
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::UnexpectedEof, "stream closed"))?;
    if header.status != Status::Ok as i32 {
        return Err(ProviderError::Declined(header.message));
    }
    let bytes = read_payload(&mut stream, header.payload_len, transfer::MAX_PAYLOAD_BYTES).await?;
    let mut hits = transfer::SearchHits::decode(bytes.as_slice())
        .map_err(ProviderError::BadAnswer)?
        .manifests;
    // It was asked for `limit` hits: those beyond are dropped unverified, so
    // a peer cannot make this node check signatures by the ten thousand.
    hits.truncate(limit);
    // A forged or tampered manifest is dropped here, never reported. The
    // signature checks run off the async threads.
    tokio::task::spawn_blocking(move || {
        hits.iter()
            .filter_map(|m| VerifiedManifest::parse(m).ok())
            .collect()
    })
    .await
    .map_err(|e| ProviderError::Local(ContentServiceError::task(e)))
}

impl ContentService {
    /// Searches by keywords across the network, or by content id.
    pub async fn search(
        &self,
        query: &str,
        limit: usize,
    ) -> Result<Vec<ContentInfo>, ContentServiceError> {
        search(self, query, limit).await
    }
}
