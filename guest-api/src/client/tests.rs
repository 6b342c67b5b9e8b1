//! The request helper against a scripted node on a real socket: the
//! expected variant comes back typed; another variant, or an error answer,
//! comes back as the error the methods always returned.

use std::sync::atomic::{AtomicU32, Ordering};

use futures::{SinkExt, StreamExt};
use p2pvm_proto::{FrameCodec, pb};
use pb::frame::Kind;
use pb::response::Result as R;
use tokio::net::UnixListener;
use tokio_util::codec::Framed;

use crate::{Client, Error};

/// A client whose node welcomes it and answers its requests, in order, with
/// `answers`.
async fn scripted(answers: Vec<R>) -> Client {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let path = std::env::temp_dir().join(format!(
        "guest-api-{}-{}.sock",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&path);
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (io, _) = listener.accept().await.unwrap();
        let mut conn = Framed::new(io, FrameCodec::new(1 << 20));
        let _hello = conn.next().await;
        let welcome = Kind::Welcome(pb::Welcome::default());
        conn.send(pb::Frame::of(welcome)).await.unwrap();
        let mut answers = answers.into_iter();
        while let Some(Ok(frame)) = conn.next().await {
            let Some(Kind::Request(req)) = frame.kind else {
                continue;
            };
            let Some(result) = answers.next() else { return };
            let response = Kind::Response(pb::Response {
                id: req.id,
                result: Some(result),
            });
            conn.send(pb::Frame::of(response)).await.unwrap();
        }
    });
    let client = Client::builder()
        .socket(&path)
        .token("test")
        .no_reconnect()
        .connect()
        .await
        .unwrap();
    // Connected: the path has served its purpose.
    std::fs::remove_file(&path).unwrap();
    client
}

fn peer_list(ids: &[&str]) -> pb::PeerList {
    pb::PeerList {
        peers: ids
            .iter()
            .map(|id| pb::PeerInfo {
                peer_id: (*id).into(),
                ..Default::default()
            })
            .collect(),
    }
}

fn is_wrong_type(e: &Error) -> bool {
    matches!(e, Error::Protocol(m) if m == "response of the wrong type")
}

#[tokio::test]
async fn the_expected_variant_comes_back_typed() {
    let c = scripted(vec![
        R::NodeInfo(pb::NodeInfo {
            peer_id: "me".into(),
            ..Default::default()
        }),
        R::Providers(peer_list(&["a", "b"])),
    ])
    .await;
    assert_eq!(c.node_info().await.unwrap().peer_id, "me");
    assert_eq!(c.find_providers(b"k", 0).await.unwrap(), ["a", "b"]);
}

#[tokio::test]
async fn the_variant_decides_not_the_payload_type() {
    // Peers and Providers both carry a PeerList.
    let c = scripted(vec![
        R::Providers(peer_list(&["a"])),
        R::Peers(peer_list(&["a"])),
    ])
    .await;
    assert!(is_wrong_type(&c.peers().await.unwrap_err()));
    assert!(is_wrong_type(&c.find_providers(b"k", 0).await.unwrap_err()));
}

#[tokio::test]
async fn an_error_answer_is_an_api_error() {
    let c = scripted(vec![R::Error(pb::Error::new(
        pb::ErrorCode::NotFound,
        "no such record",
    ))])
    .await;
    match c.get_record(b"k").await.unwrap_err() {
        Error::Api { code, message } => {
            assert_eq!(code, pb::ErrorCode::NotFound);
            assert_eq!(message, "no such record");
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn requests_without_a_payload_accept_only_ok() {
    let c = scripted(vec![
        R::Ok(pb::Empty {}),
        R::NodeInfo(pb::NodeInfo::default()),
    ])
    .await;
    c.publish("t", "one").await.unwrap();
    assert!(is_wrong_type(&c.publish("t", "two").await.unwrap_err()));
}

#[tokio::test]
async fn a_refused_registration_is_forgotten() {
    let c = scripted(vec![
        R::Error(pb::Error::new(pb::ErrorCode::LimitExceeded, "too many")),
        R::Ok(pb::Empty {}),
    ])
    .await;
    let refused = c.subscribe("t").await.unwrap_err();
    assert_eq!(refused.code(), Some(pb::ErrorCode::LimitExceeded));
    let _msgs = c.subscribe("t").await.unwrap();
}

/// The node's answer to a status request: job `j` in `state`.
fn job_in(state: &str) -> R {
    R::ComputeJobs(pb::ComputeJobList {
        jobs: vec![pb::ComputeJob {
            job_id: "j".into(),
            state: state.into(),
            ..Default::default()
        }],
    })
}

#[tokio::test]
async fn one_job_is_one_job_or_not_found() {
    let c = scripted(vec![
        job_in("running"),
        R::ComputeJobs(pb::ComputeJobList::default()),
    ])
    .await;
    // No id would list every job: refused before asking.
    let no_id = c.compute_job("").await.unwrap_err();
    assert_eq!(no_id.code(), Some(pb::ErrorCode::BadRequest));
    assert_eq!(c.compute_job("j").await.unwrap().state, "running");
    let gone = c.compute_job("j").await.unwrap_err();
    assert_eq!(gone.code(), Some(pb::ErrorCode::NotFound));
}

#[tokio::test]
async fn waiting_for_a_job_follows_it_until_it_ends() {
    let c = scripted(vec![job_in("finding"), job_in("running"), job_in("failed")]).await;
    let mut seen = Vec::new();
    let end = c
        .compute_wait("j", |j| seen.push(j.state.clone()))
        .await
        .unwrap();
    // A failed job is an answer, not an error.
    assert_eq!(end.state, "failed");
    assert_eq!(seen, ["finding", "running", "failed"]);
    assert!(crate::compute_job_ended("cancelled") && !crate::compute_job_ended("validating"));
}
