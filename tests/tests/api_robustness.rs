//! Bad input, limits and app isolation against a real p2pd.

use std::time::Duration;

use anyhow::Result;
use bytes::{BufMut, BytesMut};
use futures::{SinkExt, StreamExt};
use guest_api::proto::{self as pb, ErrorCode};
use p2pvm_e2e::{NodeOpts, TestNode};
use p2pvm_proto::FrameCodec;
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio_util::codec::Framed;

const WAIT: Duration = Duration::from_secs(10);

/// Reads frames until the node's Goodbye and then EOF; returns the Goodbye code.
async fn goodbye_code(stream: UnixStream) -> Result<ErrorCode> {
    let mut framed = Framed::new(stream, FrameCodec::default());
    let mut code = None;
    while let Some(f) = tokio::time::timeout(WAIT, framed.next()).await? {
        if let Some(pb::frame::Kind::Goodbye(g)) = f?.kind {
            code = Some(g.error.unwrap_or_default().code());
        }
    }
    code.ok_or_else(|| anyhow::anyhow!("closed without Goodbye"))
}

fn hello(token: &str) -> pb::Frame {
    pb::Frame::of(pb::frame::Kind::Hello(pb::Hello {
        version: p2pvm_proto::PROTOCOL_VERSION,
        token: token.into(),
        client_name: "raw".into(),
    }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_sessions_are_closed_and_others_keep_working() -> Result<()> {
    let node = TestNode::start(NodeOpts::default()).await?;
    let good = node.app("good").await?;
    let token = node.admin().await?.issue_token("bad").await?;

    // A well-behaved session keeps issuing requests the whole time.
    let worker = {
        let good = good.clone();
        tokio::spawn(async move {
            let mut ok = 0u32;
            for _ in 0..300 {
                good.node_info().await.expect("good session unaffected");
                ok += 1;
            }
            ok
        })
    };

    // 1. Undecodable protobuf after a valid Hello.
    let mut s = UnixStream::connect(&node.socket).await?;
    let mut buf = BytesMut::new();
    let h = hello(&token).encode_to_vec();
    buf.put_u32(h.len() as u32);
    buf.put_slice(&h);
    buf.put_u32(6);
    buf.put_slice(&[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]);
    s.write_all(&buf).await?;
    // Skip the Welcome, then expect MALFORMED_FRAME.
    assert_eq!(goodbye_code(s).await?, ErrorCode::MalformedFrame);

    // 2. An oversized length prefix: refused before any payload is buffered.
    let mut s = UnixStream::connect(&node.socket).await?;
    s.write_all(&[0x7f, 0xff, 0xff, 0xff, 1, 2, 3]).await?;
    assert_eq!(goodbye_code(s).await?, ErrorCode::FrameTooLarge);

    // 3. Random bytes with no Hello at all.
    let mut s = UnixStream::connect(&node.socket).await?;
    let noise: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    s.write_all(&noise).await?;
    let code = goodbye_code(s).await?;
    assert!(
        matches!(code, ErrorCode::MalformedFrame | ErrorCode::FrameTooLarge),
        "{code:?}"
    );

    // 4. A frame kind apps may not send (Welcome) after Hello.
    let s = UnixStream::connect(&node.socket).await?;
    let mut framed = Framed::new(s, FrameCodec::default());
    framed.send(hello(&token)).await?;
    framed
        .send(pb::Frame::of(pb::frame::Kind::Welcome(
            pb::Welcome::default(),
        )))
        .await?;
    assert_eq!(
        goodbye_code(framed.into_inner()).await?,
        ErrorCode::ProtocolViolation
    );

    // 5. A forged token.
    let s = UnixStream::connect(&node.socket).await?;
    let mut framed = Framed::new(s, FrameCodec::default());
    framed.send(hello("p2pvm1.forged")).await?;
    assert_eq!(
        goodbye_code(framed.into_inner()).await?,
        ErrorCode::Unauthenticated
    );

    // 6. A client that connects and says nothing is closed after the Hello timeout;
    //    a half-written frame (prefix promising more than is sent) likewise.
    let mut s = UnixStream::connect(&node.socket).await?;
    s.write_all(&[0, 0, 1, 0, 1, 2]).await?;

    assert_eq!(worker.await?, 300);
    good.node_info().await?;
    let mut rest = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut rest)).await;
    assert!(
        r.is_ok(),
        "a stalled half frame is cut off by the Hello timeout"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apps_are_isolated_from_each_other() -> Result<()> {
    let node = TestNode::start(NodeOpts::default()).await?;
    let alice = node.app("alice").await?;
    let bob = node.app("bob").await?;
    let _in = alice.register_protocol("/alice/1").await?;
    let _sub = alice.subscribe("alice-topic").await?;
    alice.advertise_service("alice-svc").await?;

    // Bob sees only his own (empty) state and cannot take Alice's protocol.
    let st = bob.session_state().await?;
    assert!(st.protocols.is_empty() && st.topics.is_empty() && st.services.is_empty());
    let err = bob.register_protocol("/alice/1").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AlreadyExists));
    let err = bob.unregister_protocol("/alice/1").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let err = bob.unsubscribe("alice-topic").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    let err = bob.withdraw_service("alice-svc").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::NotFound));
    // Node-wide operations need the admin capability.
    for err in [
        bob.list_sessions().await.unwrap_err(),
        bob.list_apps().await.unwrap_err(),
        bob.issue_token("eve").await.unwrap_err(),
        bob.revoke_app("alice").await.unwrap_err(),
        bob.disconnect(&node.peer_id).await.unwrap_err(),
    ] {
        assert_eq!(err.code(), Some(ErrorCode::PermissionDenied), "{err}");
    }
    // The node's own protocols are off limits.
    let err = bob.register_protocol("/p2pvm/kad/1.0.0").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::PermissionDenied));

    // The admin sees everyone; revoking Alice ends her session and her token.
    let admin = node.admin().await?;
    let sessions = admin.list_sessions().await?;
    let a = sessions
        .iter()
        .find(|s| s.app == "alice")
        .expect("alice listed");
    assert_eq!(a.protocols, vec!["/alice/1"]);
    assert_eq!(a.topics, vec!["alice-topic"]);
    admin.revoke_app("alice").await?;
    p2pvm_e2e::eventually(WAIT, "alice's session ends", || async {
        alice.node_info().await.err()
    })
    .await?;
    // Her protocol was released with her session.
    let _bob_in = bob.register_protocol("/alice/1").await?;
    bob.node_info().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn session_and_stream_limits_have_clear_errors() -> Result<()> {
    let node = TestNode::start(NodeOpts {
        config_toml: Some("[api]\nmax_sessions = 3\nmax_streams_per_session = 1\n".into()),
        ..Default::default()
    })
    .await?;
    let token = node.admin().await?.issue_token("app").await?;
    let connect = || {
        guest_api::Client::builder()
            .socket(&node.socket)
            .token(token.clone())
            .no_reconnect()
            .connect()
    };
    // Sessions the harness opened while starting the node end asynchronously;
    // wait for their slots to be released.
    let slot = || {
        p2pvm_e2e::eventually(WAIT, "a free session slot", || async {
            connect().await.ok()
        })
    };
    let one = slot().await?;
    let two = slot().await?;
    let _three = slot().await?;
    let err = connect().await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::LimitExceeded), "{err}");
    drop(two);
    // A slot frees up once a session ends.
    let again = p2pvm_e2e::eventually(WAIT, "a free session slot", || async {
        connect().await.ok()
    })
    .await?;

    again.node_info().await?;

    // Stream limit: with one stream open, a second one is refused.
    let other = TestNode::start(NodeOpts {
        bootstrap: vec![node.addr.clone()],
        ..Default::default()
    })
    .await?;
    let server = other.app("loop").await?;
    let mut incoming = server.register_protocol("/loop/1").await?;
    // The node can reach the other once its bootstrap dial has landed.
    let s1 = p2pvm_e2e::eventually(WAIT, "a first stream", || async {
        one.open_stream(&other.peer_id, "/loop/1").await.ok()
    })
    .await?;
    let accepted = tokio::time::timeout(WAIT, incoming.next()).await?;
    assert!(accepted.is_some());
    let err = one
        .open_stream(&other.peer_id, "/loop/1")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::LimitExceeded), "{err}");
    drop(s1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_control_abuse_closes_only_that_session() -> Result<()> {
    let (a, b) = p2pvm_e2e::pair().await?;
    // A slow app on B accepts the stream but never reads.
    let sink = b.app("sink").await?;
    let mut incoming = sink.register_protocol("/sink/1").await?;
    let _held = tokio::spawn(async move {
        let s = incoming.next().await;
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(s);
    });
    let bystander = a.app("bystander").await?;
    let token = a.admin().await?.issue_token("greedy").await?;

    // The greedy app speaks raw frames: it opens a stream and then sends far
    // more than the window without waiting for credit.
    let s = UnixStream::connect(&a.socket).await?;
    let mut framed = Framed::new(s, FrameCodec::default());
    framed.send(hello(&token)).await?;
    let window = match framed.next().await.expect("welcome")?.kind {
        Some(pb::frame::Kind::Welcome(w)) => w.stream_window_bytes as usize,
        other => panic!("expected Welcome, got {other:?}"),
    };
    let open = pb::Request {
        id: 1,
        op: Some(pb::request::Op::OpenStream(pb::OpenStreamRequest {
            peer_id: b.peer_id.clone(),
            protocol: "/sink/1".into(),
            timeout_ms: 0,
        })),
    };
    framed
        .send(pb::Frame::of(pb::frame::Kind::Request(open)))
        .await?;
    let stream_id = loop {
        match framed.next().await.expect("response")?.kind {
            Some(pb::frame::Kind::Response(r)) => match r.result {
                Some(pb::response::Result::StreamOpened(o)) => break o.stream_id,
                other => panic!("open failed: {other:?}"),
            },
            _ => continue,
        }
    };
    // The node returns credit as it writes to the peer, so "too much" is more
    // than the window plus whatever the peer's transport and app buffers absorb
    // before the silent reader stalls them: send until the node hangs up.
    let chunk = bytes::Bytes::from(vec![0u8; 60 << 10]);
    let mut sent = 0;
    while sent <= window + (16 << 20) {
        let data = pb::StreamData {
            stream_id,
            data: chunk.clone(),
        };
        if framed
            .send(pb::Frame::of(pb::frame::Kind::StreamData(data)))
            .await
            .is_err()
        {
            break;
        }
        sent += chunk.len();
    }
    assert_eq!(
        goodbye_code(framed.into_inner()).await?,
        ErrorCode::ProtocolViolation
    );
    // Everyone else is fine.
    bystander.node_info().await?;
    sink.node_info().await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stream_does_not_freeze_its_session() -> Result<()> {
    let (a, b) = p2pvm_e2e::pair().await?;
    let sink = b.app("sink").await?;
    let mut incoming = sink.register_protocol("/stall/1").await?;
    let _held = tokio::spawn(async move {
        let s = incoming.next().await; // accepted, never read
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(s);
    });
    let app = a.app("writer").await?;
    let window = app.welcome().stream_window_bytes as usize;
    let mut stream = app.open_stream(&b.peer_id, "/stall/1").await?;
    // Many small writes: far more frames than any per-stream queue, far more
    // bytes than the window plus what transport buffers absorb.
    let writer = tokio::spawn(async move {
        let small = [1u8; 512];
        for _ in 0..(window + (16 << 20)) / small.len() {
            if stream.write_all(&small).await.is_err() {
                break;
            }
        }
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !writer.is_finished(),
        "the writer must be stalled by flow control"
    );
    // The same session still answers requests promptly.
    for _ in 0..20 {
        tokio::time::timeout(Duration::from_secs(2), app.node_info()).await??;
    }
    writer.abort();
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_subscription_is_refused_and_the_first_keeps_working() -> Result<()> {
    let (a, b) = p2pvm_e2e::pair().await?;
    let app = a.app("reader").await?;
    let mut first = app.subscribe("dup").await?;
    let err = app.subscribe("dup").await.unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::AlreadyExists));
    let publisher = b.app("writer").await?;
    p2pvm_e2e::eventually(WAIT, "mesh", || async {
        publisher
            .topic_peers("dup")
            .await
            .ok()?
            .contains(&a.peer_id)
            .then_some(())
    })
    .await?;
    publisher.publish("dup", "still here").await?;
    let m = tokio::time::timeout(WAIT, first.next())
        .await?
        .expect("first stream open");
    assert_eq!(&m.data[..], b"still here");
    Ok(())
}
