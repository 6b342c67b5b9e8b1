//! Content items: publishing (bytes sent over the API, or a file the node
//! reads), fetching them back as a [`ContentReader`], downloading into the
//! node's store, searching, and managing what the store holds.

use std::time::Duration;

use p2pvm_proto::pb;
use pb::request::Op;

use super::Client;
use crate::content::ContentReader;
use crate::error::{Error, Result};

impl Client {
    /// Publishes the bytes read from `data` as a content item described by
    /// `meta` (its `path` must be empty). The bytes travel over the API, so this
    /// works from inside a VM. Returns the signed manifest's fields.
    pub async fn publish_content<D>(
        &self,
        mut meta: pb::ContentPublishRequest,
        mut data: D,
    ) -> Result<pb::ContentInfo>
    where
        D: tokio::io::AsyncRead + Unpin,
    {
        use tokio::io::AsyncWriteExt;
        meta.path.clear();
        let op = Op::ContentPublish(meta);
        let stream_id = self.call(op, reply!(StreamOpened)).await?.stream_id;
        let mut stream = self.take_opened(stream_id)?;
        let copied = async {
            tokio::io::copy(&mut data, &mut stream).await?;
            stream.shutdown().await
        }
        .await;
        let finish = Op::ContentPublishFinish(pb::ContentPublishFinishRequest { stream_id });
        if let Err(e) = copied {
            // The node stops reading when its import fails (a full disk, say):
            // its answer says why, which beats our broken pipe.
            drop(stream);
            // Bounded: if the session itself is gone, a reconnecting client would
            // otherwise wait for the node to come back.
            let why = tokio::time::timeout(Duration::from_secs(5), self.inner.request(finish));
            return match why.await {
                Ok(Err(api @ Error::Api { .. })) => Err(api),
                _ => Err(Error::Protocol(format!("sending the bytes failed: {e}"))),
            };
        }
        self.call(finish, reply!(Content)).await
    }

    /// Publishes a file the node itself can read (host mode only).
    pub async fn publish_path(
        &self,
        path: &str,
        mut meta: pb::ContentPublishRequest,
    ) -> Result<pb::ContentInfo> {
        meta.path = path.into();
        self.call(Op::ContentPublish(meta), reply!(Content)).await
    }

    /// Streams verified bytes of an item: `length` 0 means to the end. Blocks
    /// are fetched in playback order from all providers. A whole-item fetch is
    /// stored and seeded unless `keep` is false.
    ///
    /// Where the node offers bulk streams the bytes come through a
    /// shared-memory ring (see [`ContentReader`]); the answer's `bulk_ticket`
    /// then says so and `stream_id` is 0.
    pub async fn fetch_content(
        &self,
        content_id: &str,
        offset: u64,
        length: u64,
        keep: bool,
    ) -> Result<(pb::ContentStream, ContentReader)> {
        let bulk = self.inner.welcome.lock().expect("lock").bulk_streams;
        let op = Op::ContentFetch(pb::ContentFetchRequest {
            content_id: content_id.into(),
            offset,
            length,
            no_keep: !keep,
            bulk,
        });
        let o = self.call(op, reply!(ContentStream)).await?;
        if o.bulk_ticket.is_empty() {
            let s = self.take_opened(o.stream_id)?;
            return Ok((o, ContentReader::frames(s)));
        }
        let ticket = o.bulk_ticket[..].try_into().map_err(|_| {
            Error::Protocol(format!("a bulk ticket of {} bytes", o.bulk_ticket.len()))
        })?;
        let preamble = p2pvm_bulk::Preamble {
            capacity: 0,
            ticket,
        };
        let socket = &self.inner.target.socket;
        let ring = p2pvm_bulk::attach::attach(socket, &preamble)
            .await
            .map_err(|e| crate::content::attach_error(e, socket))?;
        Ok((o, ContentReader::ring(ring)))
    }

    /// Fetches a whole item into the node's store (swarm order) and waits until
    /// it is stored; watch events for progress.
    pub async fn download_content(&self, content_id: &str) -> Result<pb::ContentInfo> {
        let op = Op::ContentDownload(pb::ContentDownloadRequest {
            content_id: content_id.into(),
        });
        self.call(op, reply!(Content)).await
    }

    /// Searches by keywords (across the network) or by content id.
    pub async fn search_content(&self, query: &str, limit: u32) -> Result<Vec<pb::ContentInfo>> {
        let op = Op::ContentSearch(pb::ContentSearchRequest {
            query: query.into(),
            limit,
        });
        Ok(self.call(op, reply!(ContentList)).await?.items)
    }

    /// What is known about one item (local, or from its providers).
    pub async fn content_stat(&self, content_id: &str) -> Result<pb::ContentInfo> {
        let op = Op::ContentStat(pb::ContentStatRequest {
            content_id: content_id.into(),
        });
        self.call(op, reply!(Content)).await
    }

    /// Items in the node's store.
    pub async fn content_list(&self) -> Result<Vec<pb::ContentInfo>> {
        let op = Op::ContentList(pb::ContentListRequest {});
        Ok(self.call(op, reply!(ContentList)).await?.items)
    }

    /// Pins (keeps regardless of the quota) or unpins a stored item.
    pub async fn pin_content(&self, content_id: &str, pinned: bool) -> Result<()> {
        self.ok(Op::ContentPin(pb::ContentPinRequest {
            content_id: content_id.into(),
            pinned,
        }))
        .await
    }

    /// Deletes a stored item (admin).
    pub async fn delete_content(&self, content_id: &str) -> Result<()> {
        self.ok(Op::ContentDelete(pb::ContentDeleteRequest {
            content_id: content_id.into(),
        }))
        .await
    }
}
