//! The API's operations, one module per domain. Each owns its operations end
//! to end: those that need no session state run beside the session loop
//! (`run` here routes them by domain), and those that open a stream or
//! change what the session holds are `impl Session` blocks in the same
//! module, routed by `session::requests`.
//!
//! ```text
//!  node      NodeInfo, Peers, Connect, Disconnect, FindPeer
//!  dht       PutRecord, GetRecord, Provide, FindProviders, FindService; AdvertiseService, WithdrawService
//!  pubsub    Publish, TopicPeers; Subscribe, Unsubscribe
//!  protocols RegisterProtocol, UnregisterProtocol, OpenStream (app-defined streams)
//!  content   ContentPublish, Fetch, Download, Search, Stat, List, Pin, Delete
//!  credit    CreditList, CreditShow, CreditHistory
//!  groups    GroupCreate, Invite, Join, Revoke, Members, Csr, TopicKey, CrlPublish, List
//!  compute   ComputeOffer, Withdraw, Submit, Status, Cancel, Balance, Receipts
//!  admin     IssueToken, ListApps, ListSessions, RevokeApp
//! ```

pub(crate) mod admin;
pub(crate) mod compute;
pub(crate) mod content;
pub(crate) mod credit;
pub(crate) mod dht;
pub(crate) mod groups;
pub(crate) mod node;
pub(crate) mod protocols;
pub(crate) mod pubsub;

use std::time::Duration;

use libp2p::PeerId;
use p2pvm_proto::pb;
use pb::request::Op;
use pb::response::Result as R;

use super::apps::Principal;
use super::{ApiError, ApiService};

/// Default bound on an operation that waits for the network.
pub(crate) const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Upper bound an app may ask for.
const MAX_TIMEOUT: Duration = Duration::from_secs(120);

pub(crate) fn timeout_of(ms: u32) -> Duration {
    if ms == 0 {
        DEFAULT_TIMEOUT
    } else {
        Duration::from_millis(ms as u64).min(MAX_TIMEOUT)
    }
}

pub(crate) fn parse_peer(s: &str) -> Result<PeerId, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad(format!("invalid peer id {s:?}")))
}

/// The answer to an operation the dispatcher sent to the wrong domain.
fn routed_wrongly() -> ApiError {
    ApiError::new(pb::ErrorCode::Internal, "operation routed wrongly")
}

/// Runs one stateless operation in its domain.
pub(crate) async fn run(svc: &ApiService, who: &Principal, op: Op) -> Result<R, ApiError> {
    match op {
        Op::NodeInfo(_) | Op::Peers(_) | Op::Connect(_) | Op::Disconnect(_) | Op::FindPeer(_) => {
            node::run(svc, who, op).await
        }
        Op::PutRecord(_)
        | Op::GetRecord(_)
        | Op::Provide(_)
        | Op::FindProviders(_)
        | Op::FindService(_) => dht::run(svc, who, op).await,
        Op::Publish(_) | Op::TopicPeers(_) => pubsub::run(svc, who, op).await,
        Op::IssueToken(_) | Op::ListApps(_) | Op::ListSessions(_) | Op::RevokeApp(_) => {
            admin::run(svc, who, op).await
        }
        Op::ContentPublish(_)
        | Op::ContentDownload(_)
        | Op::ContentSearch(_)
        | Op::ContentStat(_)
        | Op::ContentList(_)
        | Op::ContentPin(_)
        | Op::ContentDelete(_) => content::run(svc, who, op).await,
        Op::CreditList(_) | Op::CreditShow(_) | Op::CreditHistory(_) => {
            credit::run(svc, who, op).await
        }
        Op::GroupCreate(_)
        | Op::GroupInvite(_)
        | Op::GroupJoin(_)
        | Op::GroupRevoke(_)
        | Op::GroupMembers(_)
        | Op::GroupCsr(_)
        | Op::GroupTopicKey(_)
        | Op::GroupCrlPublish(_)
        | Op::GroupList(_) => groups::run(svc, who, op).await,
        Op::ComputeOffer(_)
        | Op::ComputeWithdraw(_)
        | Op::ComputeSubmit(_)
        | Op::ComputeStatus(_)
        | Op::ComputeCancel(_)
        | Op::ComputeBalance(_)
        | Op::ComputeReceipts(_) => compute::run(svc, who, op).await,
        // Session-bound operations never reach here; answer clearly if one does.
        _ => Err(routed_wrongly()),
    }
}
