//! This session as the node sees it, and the node's events (a watch that
//! survives reconnection).

use futures::Stream;
use p2pvm_proto::pb;
use pb::request::Op;

use super::Client;
use super::tokio_stream_shim::BroadcastStream;
use crate::error::Result;

impl Client {
    /// Node events (peer connected / disconnected, new listen address, events lost).
    pub async fn events(
        &self,
    ) -> Result<impl Stream<Item = pb::event::Kind> + Unpin + std::fmt::Debug + use<>> {
        let rx = self.inner.events.subscribe();
        self.ok(Op::WatchEvents(pb::WatchEventsRequest {})).await?;
        self.inner.regs.lock().expect("lock").watching = true;
        Ok(BroadcastStream::new(rx))
    }

    /// What this session owns, as the node sees it.
    pub async fn session_state(&self) -> Result<pb::SessionState> {
        let op = Op::SessionState(pb::SessionStateRequest {});
        self.call(op, reply!(SessionState)).await
    }
}
