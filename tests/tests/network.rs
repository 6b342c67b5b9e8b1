//! Multi-node behaviour over real p2pd processes on loopback.

use std::time::Duration;

use anyhow::Result;
use futures::StreamExt;
use p2pvm_e2e::{NodeOpts, TestNode, chain, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(30);

async fn connected(a: &TestNode, peer: &str) -> Result<bool> {
    let peers = a.admin().await?.peers().await?;
    Ok(peers.iter().any(|p| p.peer_id == peer))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dht_provide_and_find_across_unconnected_nodes() -> Result<()> {
    let nodes = chain(5).await?;
    let (first, last) = (&nodes[0], &nodes[4]);
    // The far ends were never told about each other; cut any link the DHT
    // bootstrap created so the lookup must be routed through the others.
    // Closing a connection is asynchronous and a bootstrap query may dial
    // again, so keep cutting until the ends are seen apart.
    eventually(WAIT, "ends start unconnected", || async {
        if connected(last, &first.peer_id).await.ok()? {
            last.admin()
                .await
                .ok()?
                .disconnect(&first.peer_id)
                .await
                .ok()?;
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        (!connected(last, &first.peer_id).await.ok()?).then_some(())
    })
    .await?;

    let provider = first.app("indexer").await?;
    provider.provide(b"film:big-buck-bunny").await?;
    let seeker = last.app("player").await?;
    let found = eventually(WAIT, "provider record reaches the far end", || async {
        let p = seeker
            .find_providers(b"film:big-buck-bunny", 5)
            .await
            .ok()?;
        p.contains(&first.peer_id).then_some(p)
    })
    .await?;
    assert!(found.contains(&first.peer_id));

    // Value records travel the same way.
    provider
        .put_record(b"greeting", b"hello from node 0")
        .await?;
    let rec = eventually(WAIT, "record reaches the far end", || async {
        seeker.get_record(b"greeting").await.ok()
    })
    .await?;
    assert_eq!(&rec.value[..], b"hello from node 0");
    assert_eq!(rec.publisher, first.peer_id);

    // And so does a peer lookup.
    let p = eventually(WAIT, "find_peer", || async {
        seeker.find_peer(&first.peer_id).await.ok()
    })
    .await?;
    assert_eq!(p.peer_id, first.peer_id);
    assert!(!p.addrs.is_empty(), "find_peer returns addresses");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_registry_finds_offering_peers() -> Result<()> {
    let nodes = chain(5).await?;
    let chat_a = nodes[1].app("chat").await?;
    let chat_b = nodes[2].app("chat").await?;
    chat_a.advertise_service("chat").await?;
    chat_b.advertise_service("chat").await?;
    let video = nodes[3].app("video").await?;
    video.advertise_service("video").await?;

    let browser = nodes[4].app("browser").await?;
    let found = eventually(WAIT, "both chat providers", || async {
        let p = browser.find_service("chat").await.ok()?;
        (p.contains(&nodes[1].peer_id) && p.contains(&nodes[2].peer_id)).then_some(p)
    })
    .await?;
    assert!(
        !found.contains(&nodes[3].peer_id),
        "video node does not offer chat: {found:?}"
    );

    // The advertising session owns the advertisement: it shows in its state only.
    assert_eq!(
        chat_a.session_state().await?.services,
        vec!["chat".to_string()]
    );
    assert!(browser.session_state().await?.services.is_empty());
    // A withdrawn offer is no longer listed by the node that made it.
    chat_a.withdraw_service("chat").await?;
    assert!(chat_a.session_state().await?.services.is_empty());
    let own = nodes[1].app("probe").await?.find_service("chat").await?;
    assert!(!own.contains(&nodes[1].peer_id), "{own:?}");
    assert!(own.contains(&nodes[2].peer_id), "{own:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_among_three_nodes() -> Result<()> {
    let nodes = chain(5).await?;
    let (a, b, c) = (&nodes[0], &nodes[2], &nodes[4]);
    let apps = [
        a.app("chat").await?,
        b.app("chat").await?,
        c.app("chat").await?,
    ];
    // Gossipsub runs over direct connections: join the three into one mesh.
    apps[0].connect("", [b.addr.as_str()]).await?;
    apps[0].connect("", [c.addr.as_str()]).await?;
    apps[1].connect("", [c.addr.as_str()]).await?;
    let mut subs = Vec::new();
    for app in &apps {
        subs.push(app.subscribe("lobby").await?);
    }
    for app in &apps {
        eventually(WAIT, "topic peers", || async {
            let p = app.topic_peers("lobby").await.ok()?;
            (p.len() >= 2).then_some(())
        })
        .await?;
    }

    apps[0].publish("lobby", "hello from a").await?;
    apps[2].publish("lobby", "hello from c").await?;
    let mut got = [vec![], vec![], vec![]];
    for (i, sub) in subs.iter_mut().enumerate() {
        while got[i].len() < 1 + usize::from(i == 1) {
            let m = tokio::time::timeout(WAIT, sub.next())
                .await?
                .expect("stream open");
            got[i].push(String::from_utf8(m.data.to_vec())?);
        }
    }
    assert_eq!(got[0], vec!["hello from c"]);
    assert!(
        got[1].contains(&"hello from a".to_string())
            && got[1].contains(&"hello from c".to_string())
    );
    assert_eq!(got[2], vec!["hello from a"]);

    // A session that unsubscribed stops receiving; the others still do.
    apps[1].unsubscribe("lobby").await?;
    apps[0].publish("lobby", "second").await?;
    let m = tokio::time::timeout(WAIT, subs[2].next())
        .await?
        .expect("open");
    assert_eq!(&m.data[..], b"second");
    assert!(
        tokio::time::timeout(Duration::from_millis(500), subs[1].next())
            .await
            .map(|m| m.is_none())
            .unwrap_or(true)
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn app_stream_between_apps_on_two_nodes() -> Result<()> {
    let nodes = chain(5).await?;
    let server = nodes[3].app("echo").await?;
    let mut incoming = server.register_protocol("/echo/1.0.0").await?;
    tokio::spawn(async move {
        while let Some(s) = incoming.next().await {
            tokio::spawn(async move {
                let (mut r, mut w) = tokio::io::split(s);
                tokio::io::copy(&mut r, &mut w).await.ok();
                w.shutdown().await.ok();
            });
        }
    });

    let client = nodes[1].app("echo-client").await?;
    let stream = eventually(WAIT, "stream to the echo app", || async {
        client
            .open_stream(&nodes[3].peer_id, "/echo/1.0.0")
            .await
            .ok()
    })
    .await?;
    // 3 MiB: far more than the flow-control window, so credit must circulate.
    let payload: Vec<u8> = (0..3 << 20)
        .map(|i: u32| (i.wrapping_mul(2654435761) >> 24) as u8)
        .collect();
    let (mut r, mut w) = tokio::io::split(stream);
    let send = payload.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&send).await?;
        w.shutdown().await
    });
    let mut back = Vec::new();
    tokio::time::timeout(WAIT, r.read_to_end(&mut back)).await??;
    writer.await??;
    assert_eq!(back.len(), payload.len());
    assert!(back == payload, "echoed bytes differ");

    // A protocol nobody registered fails with a clear error.
    let err = client
        .open_stream(&nodes[3].peer_id, "/nobody/1")
        .await
        .unwrap_err();
    assert_eq!(
        err.code(),
        Some(guest_api::proto::ErrorCode::NotFound),
        "{err}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_keeps_peer_id_and_second_daemon_cannot_clash() -> Result<()> {
    let mut node = TestNode::start(NodeOpts::default()).await?;
    let before = node.peer_id.clone();

    // A second daemon on the same data directory refuses to start and leaves
    // the live socket alone.
    let status = node.spawn_raw()?.wait().await?;
    assert!(!status.success());
    assert!(p2pvm_e2e::is_socket(&node.socket));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&node.socket)?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o660, "API socket mode");
    let mode = std::fs::metadata(node.data_dir())?.permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "data directory mode");
    node.admin().await?.node_info().await?;

    let status = node.stop().await?;
    assert!(status.success(), "SIGTERM is a clean shutdown: {status}");
    assert!(!node.socket.exists(), "socket removed on shutdown");
    node.restart().await?;
    assert_eq!(node.peer_id, before);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_reconnects_and_resumes_subscription() -> Result<()> {
    let mut a = TestNode::start(NodeOpts::default()).await?;
    let b = TestNode::start(NodeOpts {
        bootstrap: vec![a.addr.clone()],
        ..Default::default()
    })
    .await?;
    let token = a.admin().await?.issue_token("chat").await?;
    let app = guest_api::Client::builder()
        .socket(&a.socket)
        .token(token)
        .connect()
        .await?;
    let mut sub = app.subscribe("news").await?;

    a.kill().await?;
    let err = eventually(WAIT, "requests fail while the node is down", || async {
        app.node_info().await.err()
    })
    .await?;
    assert!(matches!(err, guest_api::Error::Disconnected), "{err}");
    a.restart().await?;
    app.wait_connected(WAIT).await?;
    assert_eq!(app.node_info().await?.peer_id, a.peer_id);

    let publisher = b.app("news").await?;
    publisher.connect("", [a.addr.as_str()]).await?;
    eventually(WAIT, "resubscribed topic is visible", || async {
        let p = publisher.topic_peers("news").await.ok()?;
        p.contains(&a.peer_id).then_some(())
    })
    .await?;
    publisher.publish("news", "after restart").await?;
    let m = tokio::time::timeout(WAIT, sub.next())
        .await?
        .expect("stream open");
    assert_eq!(&m.data[..], b"after restart");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quic_transport_and_peer_events() -> Result<()> {
    let a = TestNode::start(NodeOpts::default()).await?;
    let b = TestNode::start(NodeOpts::default()).await?;
    let watcher = a.app("watcher").await?;
    let mut events = watcher.events().await?;

    let info = a.admin().await?.node_info().await?;
    let quic = info
        .listen_addrs
        .iter()
        .find(|x| x.contains("/quic-v1"))
        .expect("a QUIC listen address");
    let quic = format!("{quic}/p2p/{}", a.peer_id);
    let dialer = b.app("dialer").await?;
    assert_eq!(dialer.connect("", [quic.as_str()]).await?, a.peer_id);

    // A's app sees B arrive over QUIC.
    let ev = tokio::time::timeout(WAIT, async {
        while let Some(ev) = events.next().await {
            if let guest_api::proto::event::Kind::PeerConnected(p) = ev {
                return Some(p);
            }
        }
        None
    })
    .await?
    .expect("event stream open");
    assert_eq!(ev.peer_id, b.peer_id);
    assert!(ev.addr.contains("/quic-v1"), "connected over {}", ev.addr);

    // An app stream rides the QUIC connection.
    let server = a.app("echo").await?;
    let mut incoming = server.register_protocol("/echo/quic").await?;
    tokio::spawn(async move {
        if let Some(s) = incoming.next().await {
            let (mut r, mut w) = tokio::io::split(s);
            tokio::io::copy(&mut r, &mut w).await.ok();
            w.shutdown().await.ok();
        }
    });
    let mut s = dialer.open_stream(&a.peer_id, "/echo/quic").await?;
    s.write_all(b"over quic").await?;
    s.shutdown().await?;
    let mut back = Vec::new();
    s.read_to_end(&mut back).await?;
    assert_eq!(back, b"over quic");

    // And B leaving is an event too.
    b.admin().await?.disconnect(&a.peer_id).await?;
    let gone = tokio::time::timeout(WAIT, async {
        while let Some(ev) = events.next().await {
            if let guest_api::proto::event::Kind::PeerDisconnected(p) = ev {
                return Some(p.peer_id);
            }
        }
        None
    })
    .await?;
    assert_eq!(gone.as_deref(), Some(b.peer_id.as_str()));
    Ok(())
}

/// Keeps `n` TCP connections from `from` to `target` open and silent until
/// `stop`. A connection the node held until its handshake deadline is opened
/// again at once (so the place it held goes straight back to the attacker);
/// one refused at once, after 50 ms. Returns how many connections it opened.
async fn hold_silent_connections(
    target: std::net::SocketAddr,
    from: std::net::IpAddr,
    n: usize,
    stop: tokio_util::sync::CancellationToken,
) -> usize {
    let opened = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..n {
        let (stop, opened) = (stop.clone(), opened.clone());
        tasks.spawn(async move {
            while !stop.is_cancelled() {
                let began = std::time::Instant::now();
                let attempt = async {
                    let socket = tokio::net::TcpSocket::new_v4()?;
                    socket.bind((from, 0).into())?;
                    let mut s = socket.connect(target).await?;
                    opened.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let mut buf = [0u8; 512];
                    while s.read(&mut buf).await? > 0 {}
                    std::io::Result::Ok(())
                };
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = attempt => {}
                }
                if began.elapsed() < Duration::from_secs(1) {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
    }
    tasks.join_all().await;
    opened.load(std::sync::atomic::Ordering::Relaxed)
}

/// One host that opens silent connections faster than the handshake
/// deadline closes them used to hold every pending place of the node
/// (`limits.max_pending`, 128), and no honest peer could connect while it
/// went on. Now one address holds at most `limits.max_pending_per_ip`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_flooding_silent_connections_cannot_keep_an_honest_peer_out() -> Result<()> {
    let target = TestNode::start(NodeOpts {
        config_toml: Some("listen = [\"/ip4/127.0.0.1/tcp/0\"]\nmdns = false\n".into()),
        ..Default::default()
    })
    .await?;
    let port: u16 = target
        .addr
        .split('/')
        .skip_while(|p| *p != "tcp")
        .nth(1)
        .and_then(|p| p.parse().ok())
        .expect("the target's TCP port");
    // Anywhere in 127/8 is this machine; the honest node dials from 127.0.0.1.
    let attacker: std::net::IpAddr = "127.0.0.3".parse()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let attack = tokio::spawn(hold_silent_connections(
        ([127, 0, 0, 1], port).into(),
        attacker,
        160,
        stop.clone(),
    ));
    // Give the attacker time to take every place it can.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let honest = TestNode::start(NodeOpts {
        config_toml: Some("mdns = false\n".into()),
        ..Default::default()
    })
    .await?;
    let app = honest.app("honest").await?;
    let joined = tokio::time::timeout(Duration::from_secs(20), async {
        loop {
            if app.connect("", [target.addr.as_str()]).await.is_ok()
                && connected(&target, &honest.peer_id).await.unwrap_or(false)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    })
    .await;
    stop.cancel();
    let opened = attack.await?;
    assert!(
        joined.is_ok(),
        "the honest peer could not connect while one address held silent connections \
         (the attacker opened {opened})"
    );
    // The attack really ran: far more connections than the node lets wait.
    assert!(
        opened > 160,
        "the attacker opened only {opened} connections"
    );
    Ok(())
}
