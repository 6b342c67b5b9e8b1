//! Routing of the app's requests. Operations on the session's own objects are
//! answered by their domain's `impl Session` block (`api::ops`); those that
//! open a stream are answered later, when the stream exists; everything
//! stateless runs beside the session loop in `ops::run`, under the session's
//! in-flight limit.
//!
//! ```text
//!  Request ─► on_request ─┬─► ops::{pubsub, dht, protocols, admin}, events, report ─► Response
//!                         ├─► ops::{content, protocols} (stream opens) ─► Response later
//!                         └─► spawned ops::run (≤ max_inflight_requests) ─► Response
//! ```

use p2pvm_proto::pb;
use pb::request::Op;

use super::{Session, response};
use crate::api::{ApiError, ops};

/// The answer to give now; `None` when what the operation started (a stream
/// open, a background task) answers later.
type Answer = Option<Result<pb::response::Result, ApiError>>;

/// `ok`, or the error code, for metrics.
fn result_label<T>(r: &Result<T, ApiError>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(e) => e.code.as_str_name(),
    }
}

/// An operation answered when its stream opens: counted as `started` (or
/// its refusal) and timed to that point; how the opening ends is not.
fn opened(
    metrics: &crate::metrics::Metrics,
    name: &'static str,
    since: std::time::Instant,
    r: Result<(), ApiError>,
) -> Answer {
    let label = match &r {
        Ok(()) => "started",
        Err(e) => e.code.as_str_name(),
    };
    metrics.api_request(name, label, since.elapsed());
    started(r)
}

/// An operation that answers later unless it failed to start.
fn started(r: Result<(), ApiError>) -> Answer {
    r.err().map(Err)
}

impl Session {
    pub(in crate::api) async fn on_request(&mut self, req: pb::Request) {
        let id = req.id;
        let Some(op) = req.op else {
            self.reply(id, Err(ApiError::bad("request without an operation")))
                .await;
            return;
        };
        if let Some(result) = self.dispatch(id, op).await {
            self.reply(id, result).await;
        }
    }

    async fn dispatch(&mut self, id: u64, op: Op) -> Answer {
        let name: &'static str = (&op).into();
        self.answer(id, op, name, std::time::Instant::now()).await
    }

    async fn answer(
        &mut self,
        id: u64,
        op: Op,
        name: &'static str,
        since: std::time::Instant,
    ) -> Answer {
        let metrics = self.svc.inner.ctx.metrics.clone();
        let result = match op {
            Op::NodeInfo(_) => Ok(ops::node::node_info(&self.svc)),
            Op::Subscribe(r) => self.subscribe(r.topic).await,
            Op::Unsubscribe(r) => self.unsubscribe(&r.topic).await,
            Op::RegisterProtocol(r) => self.register_protocol(r.protocol),
            Op::UnregisterProtocol(r) => self.unregister_protocol(&r.protocol).await,
            Op::AdvertiseService(r) => self.advertise(r.name).await,
            Op::WithdrawService(r) => self.withdraw(&r.name).await,
            Op::WatchEvents(_) => self.watch_events(),
            Op::SessionState(_) => self.session_state(),
            // Answered inside, before the stream's tasks start.
            Op::ContentPublish(r) if r.path.is_empty() => {
                return opened(&metrics, name, since, self.content_publish(id, r).await);
            }
            Op::ContentPublishFinish(r) => {
                return opened(
                    &metrics,
                    name,
                    since,
                    self.content_publish_finish(id, r.stream_id),
                );
            }
            Op::ContentFetch(r) => return opened(&metrics, name, since, self.content_fetch(id, r)),
            // Answered when the open finishes.
            Op::OpenStream(r) => return opened(&metrics, name, since, self.open_stream(id, r)),
            Op::RevokeApp(r) if self.principal.admin => self.revoke_app(&r.app).await,
            op => return self.run_stateless(id, op, name, since),
        };
        metrics.api_request(name, result_label(&result), since.elapsed());
        Some(result)
    }

    /// Runs a stateless operation beside the session, so a slow DHT query
    /// never holds up this app's other requests.
    fn run_stateless(
        &self,
        id: u64,
        op: Op,
        name: &'static str,
        since: std::time::Instant,
    ) -> Answer {
        let Ok(permit) = self.inflight.clone().try_acquire_owned() else {
            let refused = Err(ApiError::new(
                pb::ErrorCode::LimitExceeded,
                format!(
                    "at most {} requests in flight per session",
                    self.svc.inner.limits.max_inflight_requests
                ),
            ));
            self.svc
                .inner
                .ctx
                .metrics
                .api_request(name, result_label(&refused), since.elapsed());
            return Some(refused);
        };
        let svc = self.svc.clone();
        let principal = self.principal.clone();
        let out = self.out.clone();
        self.svc.spawn(async move {
            let r = ops::run(&svc, &principal, op).await;
            svc.inner
                .ctx
                .metrics
                .api_request(name, result_label(&r), since.elapsed());
            let _ = out.send(response(id, r)).await;
            drop(permit);
        });
        None
    }
}
