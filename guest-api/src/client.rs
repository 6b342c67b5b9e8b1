//! [`Client`] and its builder: one authenticated session with the node.

use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use p2pvm_proto::pb;
use pb::request::Op;
use pb::response::Result as R;
use tokio::sync::{broadcast, mpsc, watch};
use tokio_stream_shim::{BroadcastStream, ReceiverStream};

use std::collections::HashMap;

use crate::conn::{self, DELIVERY_QUEUE, Inner, Message, Registrations, Target};
use crate::content::ContentReader;
use crate::error::{Error, Result};
use crate::stream::AppStream;

/// Environment variable naming the API socket.
pub const ENV_SOCKET: &str = "P2PVM_API_SOCKET";
/// Environment variable holding the app token.
pub const ENV_TOKEN: &str = "P2PVM_TOKEN";
/// Environment variable naming a file that holds the app token.
pub const ENV_TOKEN_FILE: &str = "P2PVM_TOKEN_FILE";

/// The socket a node uses when nothing else is configured:
/// `~/.local/share/p2pvm/api.sock`.
pub fn default_socket_path() -> PathBuf {
    let base = std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("p2pvm/api.sock")
}

/// Configures and opens a [`Client`].
///
/// ```no_run
/// # async fn f() -> guest_api::Result<()> {
/// let client = guest_api::Client::builder()
///     .socket("/run/p2pvm/api.sock")
///     .token("p2pvm1.…")
///     .name("chat-demo")
///     .connect()
///     .await?;
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Default)]
pub struct ClientBuilder {
    socket: Option<PathBuf>,
    token: Option<String>,
    name: Option<String>,
    no_reconnect: bool,
}

impl ClientBuilder {
    /// The API socket; default `$P2PVM_API_SOCKET`, else [`default_socket_path`].
    pub fn socket(mut self, path: impl Into<PathBuf>) -> Self {
        self.socket = Some(path.into());
        self
    }

    /// The app token; default `$P2PVM_TOKEN`, else the contents of `$P2PVM_TOKEN_FILE`.
    pub fn token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }

    /// A name for the node's logs.
    pub fn name(mut self, name: impl Into<String>) -> Self {
        self.name = Some(name.into());
        self
    }

    /// Turns automatic reconnection off (it is on by default).
    pub fn no_reconnect(mut self) -> Self {
        self.no_reconnect = true;
        self
    }

    fn resolve_token(&self) -> Result<String> {
        if let Some(t) = &self.token {
            return Ok(t.trim().to_owned());
        }
        if let Ok(t) = std::env::var(ENV_TOKEN) {
            return Ok(t.trim().to_owned());
        }
        if let Some(f) = std::env::var_os(ENV_TOKEN_FILE) {
            return std::fs::read_to_string(&f)
                .map(|t| t.trim().to_owned())
                .map_err(|_| Error::NoToken);
        }
        Err(Error::NoToken)
    }

    /// Connects, authenticates and starts the session.
    pub async fn connect(self) -> Result<Client> {
        let target = Target {
            socket: self
                .socket
                .clone()
                .or_else(|| std::env::var_os(ENV_SOCKET).map(PathBuf::from))
                .unwrap_or_else(default_socket_path),
            token: self.resolve_token()?,
            name: self.name.clone().unwrap_or_else(|| "guest-api".into()),
            reconnect: !self.no_reconnect,
        };
        let (conn, welcome) = conn::dial(&target).await?;
        let (events, _) = broadcast::channel(1024);
        let inner = Arc::new(Inner {
            target,
            next_id: AtomicU64::new(1),
            out: Mutex::new(None),
            pending: Mutex::new(Default::default()),
            regs: Mutex::new(Default::default()),
            streams: Mutex::new(Default::default()),
            opened: Mutex::new(Default::default()),
            events,
            welcome: Mutex::new(welcome),
            generation: watch::channel(0).0,
        });
        let mut generation = inner.generation.subscribe();
        let task = tokio::spawn(conn::run(inner.clone(), conn));
        // The task publishes the sender before bumping the generation.
        let _ = generation.wait_for(|g| *g > 0).await;
        Ok(Client {
            inner,
            _task: Arc::new(TaskGuard(task)),
        })
    }
}

#[derive(Debug)]
struct TaskGuard(tokio::task::JoinHandle<()>);

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A session with the node. Cheap to clone; all clones share the session.
///
/// Requests fail with [`Error::Disconnected`] while the node is away; the client
/// reconnects in the background and re-registers its subscriptions, protocols,
/// services and event watch, so streams of messages simply resume.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<Inner>,
    _task: Arc<TaskGuard>,
}

fn unexpected() -> Error {
    Error::Protocol("response of the wrong type".into())
}

impl Client {
    /// A builder with defaults from the environment.
    pub fn builder() -> ClientBuilder {
        ClientBuilder::default()
    }

    /// Connects with all defaults from the environment.
    pub async fn connect_default() -> Result<Self> {
        Self::builder().connect().await
    }

    /// What the node said when this session (or the latest reconnection) began.
    pub fn welcome(&self) -> pb::Welcome {
        self.inner.welcome.lock().expect("lock").clone()
    }

    /// Waits until the client is connected again after a loss (or returns at once).
    pub async fn wait_connected(&self, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.inner.sender().is_err() {
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Disconnected);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// Records a delivery queue under `name` (so it survives reconnection), then
    /// asks the node; undoes the record if the node refuses.
    async fn register<T>(
        &self,
        pick: fn(&mut Registrations) -> &mut HashMap<String, mpsc::Sender<T>>,
        name: &str,
        op: Op,
    ) -> Result<ReceiverStream<T>> {
        let (tx, rx) = mpsc::channel(DELIVERY_QUEUE);
        {
            let mut regs = self.inner.regs.lock().expect("lock");
            let map = pick(&mut regs);
            if map.contains_key(name) {
                // Replacing the entry would silently end the first stream.
                return Err(Error::Api {
                    code: pb::ErrorCode::AlreadyExists,
                    message: format!("{name} is already registered by this client"),
                });
            }
            map.insert(name.into(), tx);
        }
        if let Err(e) = self.ok(op).await {
            pick(&mut self.inner.regs.lock().expect("lock")).remove(name);
            return Err(e);
        }
        Ok(ReceiverStream::new(rx))
    }

    async fn ok(&self, op: Op) -> Result<()> {
        match self.inner.request(op).await? {
            R::Ok(_) => Ok(()),
            _ => Err(unexpected()),
        }
    }

    /// This node's peer id, listen addresses and version.
    ///
    /// ```no_run
    /// # async fn f(c: guest_api::Client) -> guest_api::Result<()> {
    /// println!("{}", c.node_info().await?.peer_id);
    /// # Ok(()) }
    /// ```
    pub async fn node_info(&self) -> Result<pb::NodeInfo> {
        match self
            .inner
            .request(Op::NodeInfo(pb::NodeInfoRequest {}))
            .await?
        {
            R::NodeInfo(i) => Ok(i),
            _ => Err(unexpected()),
        }
    }

    /// Connected peers.
    pub async fn peers(&self) -> Result<Vec<pb::PeerInfo>> {
        match self.inner.request(Op::Peers(pb::PeersRequest {})).await? {
            R::Peers(p) => Ok(p.peers),
            _ => Err(unexpected()),
        }
    }

    /// Connects to a peer by multiaddr(s) (ending in `/p2p/<id>`) or by id.
    ///
    /// ```no_run
    /// # async fn f(c: guest_api::Client) -> guest_api::Result<()> {
    /// c.connect("", ["/ip4/127.0.0.1/tcp/4001/p2p/12D3Koo…"]).await?;
    /// # Ok(()) }
    /// ```
    pub async fn connect<I, S>(&self, peer_id: &str, addrs: I) -> Result<String>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let op = Op::Connect(pb::ConnectRequest {
            peer_id: peer_id.into(),
            addrs: addrs.into_iter().map(Into::into).collect(),
            timeout_ms: 0,
        });
        match self.inner.request(op).await? {
            R::Peer(p) => Ok(p.peer_id),
            _ => Err(unexpected()),
        }
    }

    /// Closes all connections to a peer (admin only).
    pub async fn disconnect(&self, peer_id: &str) -> Result<()> {
        self.ok(Op::Disconnect(pb::DisconnectRequest {
            peer_id: peer_id.into(),
        }))
        .await
    }

    /// Looks a peer up in the DHT.
    pub async fn find_peer(&self, peer_id: &str) -> Result<pb::PeerInfo> {
        let op = Op::FindPeer(pb::FindPeerRequest {
            peer_id: peer_id.into(),
            timeout_ms: 0,
        });
        match self.inner.request(op).await? {
            R::Peer(p) => Ok(p),
            _ => Err(unexpected()),
        }
    }

    /// Stores a value in the DHT.
    ///
    /// ```no_run
    /// # async fn f(c: guest_api::Client) -> guest_api::Result<()> {
    /// c.put_record(b"greeting", b"hello").await?;
    /// assert_eq!(&c.get_record(b"greeting").await?.value[..], b"hello");
    /// # Ok(()) }
    /// ```
    pub async fn put_record(&self, key: &[u8], value: &[u8]) -> Result<()> {
        self.ok(Op::PutRecord(pb::PutRecordRequest {
            key: Bytes::copy_from_slice(key),
            value: Bytes::copy_from_slice(value),
            timeout_ms: 0,
        }))
        .await
    }

    /// Fetches a value from the DHT.
    pub async fn get_record(&self, key: &[u8]) -> Result<pb::Record> {
        let op = Op::GetRecord(pb::GetRecordRequest {
            key: Bytes::copy_from_slice(key),
            timeout_ms: 0,
        });
        match self.inner.request(op).await? {
            R::Record(r) => Ok(r),
            _ => Err(unexpected()),
        }
    }

    /// Announces this node as a provider of `key`.
    pub async fn provide(&self, key: &[u8]) -> Result<()> {
        self.ok(Op::Provide(pb::ProvideRequest {
            key: Bytes::copy_from_slice(key),
            timeout_ms: 0,
        }))
        .await
    }

    /// Finds up to `limit` providers of `key` (0 = node default).
    pub async fn find_providers(&self, key: &[u8], limit: u32) -> Result<Vec<String>> {
        let op = Op::FindProviders(pb::FindProvidersRequest {
            key: Bytes::copy_from_slice(key),
            limit,
            timeout_ms: 0,
        });
        match self.inner.request(op).await? {
            R::Providers(p) => Ok(p.peers.into_iter().map(|p| p.peer_id).collect()),
            _ => Err(unexpected()),
        }
    }

    /// Subscribes to a pubsub topic; the stream yields its messages.
    ///
    /// ```no_run
    /// # async fn f(c: guest_api::Client) -> guest_api::Result<()> {
    /// use futures::StreamExt;
    /// let mut msgs = c.subscribe("chat").await?;
    /// while let Some(m) = msgs.next().await {
    ///     println!("{}: {}", m.source, String::from_utf8_lossy(&m.data));
    /// }
    /// # Ok(()) }
    /// ```
    pub async fn subscribe(
        &self,
        topic: &str,
    ) -> Result<impl Stream<Item = Message> + Unpin + std::fmt::Debug + use<>> {
        let op = Op::Subscribe(pb::SubscribeRequest {
            topic: topic.into(),
        });
        self.register(|r| &mut r.topics, topic, op).await
    }

    /// Leaves a topic; its message stream ends.
    pub async fn unsubscribe(&self, topic: &str) -> Result<()> {
        self.inner.regs.lock().expect("lock").topics.remove(topic);
        self.ok(Op::Unsubscribe(pb::UnsubscribeRequest {
            topic: topic.into(),
        }))
        .await
    }

    /// Publishes a message on a topic.
    pub async fn publish(&self, topic: &str, data: impl Into<Bytes>) -> Result<()> {
        self.ok(Op::Publish(pb::PublishRequest {
            topic: topic.into(),
            data: data.into(),
        }))
        .await
    }

    /// Peers known to be subscribed to a topic.
    pub async fn topic_peers(&self, topic: &str) -> Result<Vec<String>> {
        let op = Op::TopicPeers(pb::TopicPeersRequest {
            topic: topic.into(),
        });
        match self.inner.request(op).await? {
            R::TopicPeers(p) => Ok(p.peer_ids),
            _ => Err(unexpected()),
        }
    }

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
        match self.inner.request(op).await? {
            R::StreamOpened(o) => {
                let mut s = self
                    .inner
                    .opened
                    .lock()
                    .expect("lock")
                    .remove(&o.stream_id)
                    .ok_or(Error::Disconnected)?;
                s.set_meta(peer_id.into(), protocol.into());
                Ok(s)
            }
            _ => Err(unexpected()),
        }
    }

    fn take_opened(&self, stream_id: u64) -> Result<AppStream> {
        self.inner
            .opened
            .lock()
            .expect("lock")
            .remove(&stream_id)
            .ok_or(Error::Disconnected)
    }

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
        let stream_id = match self.inner.request(Op::ContentPublish(meta)).await? {
            R::StreamOpened(o) => o.stream_id,
            _ => return Err(unexpected()),
        };
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
        match self.inner.request(finish).await? {
            R::Content(info) => Ok(info),
            _ => Err(unexpected()),
        }
    }

    /// Publishes a file the node itself can read (host mode only).
    pub async fn publish_path(
        &self,
        path: &str,
        mut meta: pb::ContentPublishRequest,
    ) -> Result<pb::ContentInfo> {
        meta.path = path.into();
        match self.inner.request(Op::ContentPublish(meta)).await? {
            R::Content(info) => Ok(info),
            _ => Err(unexpected()),
        }
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
        let o = match self.inner.request(op).await? {
            R::ContentStream(o) => o,
            _ => return Err(unexpected()),
        };
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
        match self.inner.request(op).await? {
            R::Content(info) => Ok(info),
            _ => Err(unexpected()),
        }
    }

    /// Searches by keywords (across the network) or by content id.
    pub async fn search_content(&self, query: &str, limit: u32) -> Result<Vec<pb::ContentInfo>> {
        let op = Op::ContentSearch(pb::ContentSearchRequest {
            query: query.into(),
            limit,
        });
        match self.inner.request(op).await? {
            R::ContentList(l) => Ok(l.items),
            _ => Err(unexpected()),
        }
    }

    /// What is known about one item (local, or from its providers).
    pub async fn content_stat(&self, content_id: &str) -> Result<pb::ContentInfo> {
        let op = Op::ContentStat(pb::ContentStatRequest {
            content_id: content_id.into(),
        });
        match self.inner.request(op).await? {
            R::Content(info) => Ok(info),
            _ => Err(unexpected()),
        }
    }

    /// Items in the node's store.
    pub async fn content_list(&self) -> Result<Vec<pb::ContentInfo>> {
        match self
            .inner
            .request(Op::ContentList(pb::ContentListRequest {}))
            .await?
        {
            R::ContentList(l) => Ok(l.items),
            _ => Err(unexpected()),
        }
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

    /// Every peer this node has credit records for, best score first (admin).
    pub async fn credit_list(&self) -> Result<Vec<pb::PeerCredit>> {
        match self
            .inner
            .request(Op::CreditList(pb::CreditListRequest {}))
            .await?
        {
            R::CreditList(l) => Ok(l.peers),
            _ => Err(unexpected()),
        }
    }

    /// One peer's credit (a stranger's when never observed; admin).
    pub async fn credit_show(&self, peer_id: &str) -> Result<pb::PeerCredit> {
        let op = Op::CreditShow(pb::CreditShowRequest {
            peer_id: peer_id.into(),
        });
        match self.inner.request(op).await? {
            R::Credit(c) => Ok(c),
            _ => Err(unexpected()),
        }
    }

    /// One peer's notable events, newest first (admin).
    pub async fn credit_history(&self, peer_id: &str, limit: u32) -> Result<Vec<pb::CreditEvent>> {
        let op = Op::CreditHistory(pb::CreditHistoryRequest {
            peer_id: peer_id.into(),
            limit,
        });
        match self.inner.request(op).await? {
            R::CreditHistory(h) => Ok(h.events),
            _ => Err(unexpected()),
        }
    }

    /// Advertises a named service (e.g. "chat") that others can find.
    pub async fn advertise_service(&self, name: &str) -> Result<()> {
        self.ok(Op::AdvertiseService(pb::AdvertiseServiceRequest {
            name: name.into(),
        }))
        .await?;
        self.inner
            .regs
            .lock()
            .expect("lock")
            .services
            .push(name.into());
        Ok(())
    }

    /// Withdraws an advertisement.
    pub async fn withdraw_service(&self, name: &str) -> Result<()> {
        self.inner
            .regs
            .lock()
            .expect("lock")
            .services
            .retain(|s| s != name);
        self.ok(Op::WithdrawService(pb::WithdrawServiceRequest {
            name: name.into(),
        }))
        .await
    }

    /// Peers offering a named service.
    pub async fn find_service(&self, name: &str) -> Result<Vec<String>> {
        let op = Op::FindService(pb::FindServiceRequest {
            name: name.into(),
            limit: 0,
            timeout_ms: 0,
        });
        match self.inner.request(op).await? {
            R::Services(s) => Ok(s.peer_ids),
            _ => Err(unexpected()),
        }
    }

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
        match self
            .inner
            .request(Op::SessionState(pb::SessionStateRequest {}))
            .await?
        {
            R::SessionState(s) => Ok(s),
            _ => Err(unexpected()),
        }
    }

    /// Issues (or rotates) an app's token (admin only).
    pub async fn issue_token(&self, app: &str) -> Result<String> {
        match self
            .inner
            .request(Op::IssueToken(pb::IssueTokenRequest { app: app.into() }))
            .await?
        {
            R::AppToken(t) => Ok(t.token),
            _ => Err(unexpected()),
        }
    }

    /// Revokes an app's token and ends its sessions (admin only).
    pub async fn revoke_app(&self, app: &str) -> Result<()> {
        self.ok(Op::RevokeApp(pb::RevokeAppRequest { app: app.into() }))
            .await
    }

    /// Apps holding tokens (admin only).
    pub async fn list_apps(&self) -> Result<Vec<String>> {
        match self
            .inner
            .request(Op::ListApps(pb::ListAppsRequest {}))
            .await?
        {
            R::Apps(a) => Ok(a.apps),
            _ => Err(unexpected()),
        }
    }

    /// Every live session and what it owns (admin only).
    pub async fn list_sessions(&self) -> Result<Vec<pb::SessionState>> {
        match self
            .inner
            .request(Op::ListSessions(pb::ListSessionsRequest {}))
            .await?
        {
            R::Sessions(s) => Ok(s.sessions),
            _ => Err(unexpected()),
        }
    }
}

/// Small stream adapters over tokio channels (kept local to avoid a dependency
/// on tokio-stream for two wrappers).
mod tokio_stream_shim {
    use std::pin::Pin;
    use std::task::{Context, Poll};

    use futures::Stream;
    use tokio::sync::{broadcast, mpsc};

    /// A `Stream` over an mpsc receiver.
    #[derive(Debug)]
    pub struct ReceiverStream<T>(mpsc::Receiver<T>);

    impl<T> ReceiverStream<T> {
        pub fn new(rx: mpsc::Receiver<T>) -> Self {
            Self(rx)
        }
    }

    impl<T> Stream for ReceiverStream<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.poll_recv(cx)
        }
    }

    /// A `Stream` over a broadcast receiver that skips lag notices.
    pub struct BroadcastStream<T>(Pin<Box<dyn Stream<Item = T> + Send>>);

    impl<T> std::fmt::Debug for BroadcastStream<T> {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("BroadcastStream")
        }
    }

    impl<T: Clone + Send + 'static> BroadcastStream<T> {
        pub fn new(rx: broadcast::Receiver<T>) -> Self {
            let s = futures::stream::unfold(rx, |mut rx| async move {
                loop {
                    match rx.recv().await {
                        Ok(v) => return Some((v, rx)),
                        Err(broadcast::error::RecvError::Lagged(_)) => continue,
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            });
            Self(Box::pin(s))
        }
    }

    impl<T> Stream for BroadcastStream<T> {
        type Item = T;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
            self.0.as_mut().poll_next(cx)
        }
    }
}
