//! App-defined protocols: registering one (a stream of inbound
//! [`AppStream`]s that survives reconnection), dropping it, and opening a
//! stream to a peer's app.

use futures::Stream;
use p2pvm_proto::pb;
use pb::request::Op;

use super::Client;
use crate::error::Result;
use crate::stream::AppStream;

impl Client {
    /// Registers an app-defined protocol; the stream yields inbound streams.
    ///
    /// ```no_run
    /// # async fn f(c: guest_api::Client) -> guest_api::Result<()> {
    /// use futures::StreamExt;
    /// let mut incoming = c.register_protocol("/echo/1.0.0").await?;
    /// while let Some(mut s) = incoming.next().await {
    ///     tokio::spawn(async move {
    ///         let (mut r, mut w) = tokio::io::split(s);
    ///         let _ = tokio::io::copy(&mut r, &mut w).await;
    ///     });
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn register_protocol(
        &self,
        protocol: &str,
    ) -> Result<impl Stream<Item = AppStream> + Unpin + std::fmt::Debug + use<>> {
        let op = Op::RegisterProtocol(pb::RegisterProtocolRequest {
            protocol: protocol.into(),
        });
        self.register(|r| &mut r.protocols, protocol, op).await
    }

    /// Stops accepting streams for a protocol.
    pub async fn unregister_protocol(&self, protocol: &str) -> Result<()> {
        self.inner
            .regs
            .lock()
            .expect("lock")
            .protocols
            .remove(protocol);
        self.ok(Op::UnregisterProtocol(pb::UnregisterProtocolRequest {
            protocol: protocol.into(),
        }))
        .await
    }

    /// Opens a stream to `peer_id`'s app that registered `protocol`.
    pub async fn open_stream(&self, peer_id: &str, protocol: &str) -> Result<AppStream> {
        let op = Op::OpenStream(pb::OpenStreamRequest {
            peer_id: peer_id.into(),
            protocol: protocol.into(),
            timeout_ms: 0,
        });
        let opened = self.call(op, reply!(StreamOpened)).await?;
        let mut s = self.take_opened(opened.stream_id)?;
        // The connection task created the stream before it knew whose it is.
        s.set_meta(peer_id.into(), protocol.into());
        Ok(s)
    }
}
