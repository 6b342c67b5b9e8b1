//! The virus filter: content is streamed to a real ClamAV `clamd` (INSTREAM)
//! while it arrives, and the verdict gates storing, providing and delivering it.
//!
//! A [`Scanner`] is one INSTREAM session fed chunk by chunk; the verdict comes
//! when the stream ends. A finished file goes to a local clamd by descriptor
//! instead ([`VirusFilter::scan_file`], `FILDES`): clamd reads it in place,
//! where INSTREAM would copy every byte over the socket into a temporary file
//! of clamd's before scanning it. The filter fails closed: if clamd cannot be
//! reached or answers anything but a verdict, the content is not accepted.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// Chunk size sent to clamd.
const CHUNK: usize = 256 * 1024;
/// Chunks queued towards clamd before feeding waits.
const QUEUE: usize = 8;

/// Why a scan could not give a verdict.
#[derive(Debug, Clone, thiserror::Error)]
pub enum VirusError {
    /// clamd is not reachable.
    #[error("Virus filter unavailable: clamd at {addr}")]
    Unavailable {
        /// Where clamd was expected.
        addr: String,
        /// Why (shared: a verdict is handed to every waiter).
        #[source]
        source: Arc<std::io::Error>,
    },
    /// clamd answered without a verdict (e.g. a size limit).
    #[error("Virus filter error: clamd answered {0:?}")]
    BadReply(String),
    /// The file to scan could not be read (only when clamd is reached over
    /// TCP and the bytes are streamed to it).
    #[error("Virus filter error: cannot read the file to scan")]
    Unreadable(#[source] Arc<std::io::Error>),
    /// Our task that talks to clamd panicked or was aborted.
    #[error("Virus filter error: the scan task failed")]
    TaskFailed(#[source] Arc<tokio::task::JoinError>),
}

/// A scan's outcome.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// No signature matched.
    Clean,
    /// A signature matched; its name.
    Infected(String),
}

/// Where clamd listens.
#[derive(Debug, Clone)]
pub enum ClamdAddr {
    /// A Unix socket.
    Socket(PathBuf),
    /// host:port.
    Tcp(String),
}

impl std::fmt::Display for ClamdAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Socket(p) => write!(f, "{}", p.display()),
            Self::Tcp(a) => f.write_str(a),
        }
    }
}

/// Parses clamd's reply to a scan: `stream: OK` or `stream: Eicar FOUND`
/// (INSTREAM), `fd[12]: OK` (FILDES).
pub fn parse_reply(reply: &[u8]) -> Result<Verdict, VirusError> {
    let text = String::from_utf8_lossy(reply);
    let text = text.trim_end_matches(['\0', '\n']).trim();
    let body = strip_scanned_name(text).map(str::trim).unwrap_or(text);
    if body == "OK" {
        return Ok(Verdict::Clean);
    }
    if let Some(sig) = body.strip_suffix("FOUND") {
        let sig = sig.trim();
        if !sig.is_empty() {
            return Ok(Verdict::Infected(sig.to_string()));
        }
    }
    Err(VirusError::BadReply(text.to_string()))
}

/// What clamd names the thing it scanned: `stream:` for INSTREAM, `fd[N]:`
/// for FILDES. Anything else is not a verdict line's start.
fn strip_scanned_name(text: &str) -> Option<&str> {
    if let Some(rest) = text.strip_prefix("stream:") {
        return Some(rest);
    }
    let rest = text.strip_prefix("fd[")?;
    let (n, rest) = rest.split_once("]:")?;
    (!n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())).then_some(rest)
}

/// The filter: clamd's address, or off.
#[derive(Debug, Clone)]
pub struct VirusFilter {
    addr: Option<ClamdAddr>,
    counts: Arc<Counts>,
}

/// How many detections [`VirusFilter::detections`] remembers.
pub const RECENT_DETECTIONS: usize = 64;

/// Scans clamd answered, by verdict, since the filter was made, and the
/// latest detections (shared by its clones).
#[derive(Debug, Default)]
struct Counts {
    clean: AtomicU64,
    infected: AtomicU64,
    failed: AtomicU64,
    recent: Mutex<VecDeque<Detection>>,
}

/// One scan that matched a signature, for the operator to look back on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detection {
    /// When the verdict came (seconds since the epoch).
    pub at_unix: u64,
    /// clamd's signature name.
    pub signature: String,
}

impl Counts {
    fn count(&self, verdict: &Result<Verdict, VirusError>) {
        let n = match verdict {
            Ok(Verdict::Clean) => &self.clean,
            Ok(Verdict::Infected(signature)) => {
                self.remember(signature);
                &self.infected
            }
            Err(_) => &self.failed,
        };
        n.fetch_add(1, Ordering::Relaxed);
    }

    fn remember(&self, signature: &str) {
        let at_unix = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut recent = self.recent.lock().expect("lock");
        if recent.len() == RECENT_DETECTIONS {
            recent.pop_front();
        }
        recent.push_back(Detection {
            at_unix,
            signature: signature.to_owned(),
        });
    }
}

/// How many scans ended how (for metrics); none with the filter off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// No signature matched.
    pub clean: u64,
    /// A signature matched.
    pub infected: u64,
    /// clamd could not be asked or gave no verdict.
    pub failed: u64,
}

impl VirusFilter {
    /// A filter that scans with clamd at `addr`.
    pub fn clamd(addr: ClamdAddr) -> Self {
        Self {
            addr: Some(addr),
            counts: Arc::default(),
        }
    }

    /// No scanning (development only; p2pd warns loudly).
    pub fn off() -> Self {
        Self {
            addr: None,
            counts: Arc::default(),
        }
    }

    /// Scans so far, by how they ended.
    pub fn stats(&self) -> ScanStats {
        ScanStats {
            clean: self.counts.clean.load(Ordering::Relaxed),
            infected: self.counts.infected.load(Ordering::Relaxed),
            failed: self.counts.failed.load(Ordering::Relaxed),
        }
    }

    /// The latest detections (at most [`RECENT_DETECTIONS`]), newest first.
    pub fn detections(&self) -> Vec<Detection> {
        let recent = self.counts.recent.lock().expect("lock");
        recent.iter().rev().cloned().collect()
    }

    /// Whether content is scanned.
    pub fn enabled(&self) -> bool {
        self.addr.is_some()
    }

    /// Whether clamd takes files by descriptor ([`scan_file`](Self::scan_file)
    /// without streaming): it listens on a Unix socket.
    pub fn takes_descriptors(&self) -> bool {
        matches!(self.addr, Some(ClamdAddr::Socket(_)))
    }

    /// Where clamd is expected, for messages.
    pub fn describe(&self) -> String {
        self.addr
            .as_ref()
            .map(|a| a.to_string())
            .unwrap_or_else(|| "off".into())
    }

    /// Checks that clamd answers.
    pub async fn ping(&self) -> Result<(), VirusError> {
        let Some(addr) = &self.addr else {
            return Ok(());
        };
        let r = match addr {
            ClamdAddr::Socket(p) => {
                clamav_client::tokio::ping(clamav_client::tokio::Socket { socket_path: p }).await
            }
            ClamdAddr::Tcp(a) => {
                clamav_client::tokio::ping(clamav_client::tokio::Tcp {
                    host_address: a.as_str(),
                })
                .await
            }
        };
        match r {
            Ok(reply) if reply == clamav_client::PONG => Ok(()),
            Ok(reply) => Err(VirusError::BadReply(
                String::from_utf8_lossy(&reply).into_owned(),
            )),
            Err(e) => Err(VirusError::Unavailable {
                addr: addr.to_string(),
                source: Arc::new(e),
            }),
        }
    }

    /// clamd's `VERSION` answer (engine, and database version where it has
    /// official databases); `None` with the filter off.
    pub async fn version(&self) -> Result<Option<String>, VirusError> {
        let Some(addr) = &self.addr else {
            return Ok(None);
        };
        let r = match addr {
            ClamdAddr::Socket(p) => {
                clamav_client::tokio::get_version(clamav_client::tokio::Socket { socket_path: p })
                    .await
            }
            ClamdAddr::Tcp(a) => {
                clamav_client::tokio::get_version(clamav_client::tokio::Tcp {
                    host_address: a.as_str(),
                })
                .await
            }
        };
        match r {
            Ok(reply) => Ok(Some(
                String::from_utf8_lossy(&reply)
                    .trim_end_matches(['\0', '\n'])
                    .to_owned(),
            )),
            Err(e) => Err(VirusError::Unavailable {
                addr: addr.to_string(),
                source: Arc::new(e),
            }),
        }
    }

    /// Starts a scan; feed it the content in order, then [`Scanner::finish`].
    /// With the filter off, every scan is clean.
    pub fn scanner(&self) -> Scanner {
        let Some(addr) = self.addr.clone() else {
            return Scanner {
                tx: None,
                task: None,
            };
        };
        let (tx, rx) = mpsc::channel::<std::io::Result<Bytes>>(QUEUE);
        let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
        let counts = self.counts.clone();
        let task = tokio::spawn(async move {
            let r = match &addr {
                ClamdAddr::Socket(p) => {
                    clamav_client::tokio::scan_stream(
                        stream,
                        clamav_client::tokio::Socket { socket_path: p },
                        Some(CHUNK),
                    )
                    .await
                }
                ClamdAddr::Tcp(a) => {
                    clamav_client::tokio::scan_stream(
                        stream,
                        clamav_client::tokio::Tcp {
                            host_address: a.as_str(),
                        },
                        Some(CHUNK),
                    )
                    .await
                }
            };
            let verdict = match r {
                Ok(reply) => parse_reply(&reply),
                Err(e) => Err(VirusError::Unavailable {
                    addr: addr.to_string(),
                    source: Arc::new(e),
                }),
            };
            counts.count(&verdict);
            verdict
        });
        Scanner {
            tx: Some(tx),
            task: Some(task),
        }
    }

    /// Scans a finished file. A clamd on a Unix socket gets the descriptor
    /// (`FILDES`) and reads the file in place; one over TCP, which cannot take
    /// descriptors, is streamed the file's bytes. The file is scanned from
    /// its start to its end, whatever its position.
    pub async fn scan_file(&self, file: std::fs::File) -> Result<Verdict, VirusError> {
        let Some(addr) = self.addr.clone() else {
            return Ok(Verdict::Clean);
        };
        match addr {
            ClamdAddr::Socket(path) => {
                let verdict = Self::scan_by_descriptor(path, file).await;
                self.counts.count(&verdict);
                verdict
            }
            ClamdAddr::Tcp(_) => {
                let mut scanner = self.scanner();
                let (tx, mut rx) = mpsc::channel::<std::io::Result<Bytes>>(QUEUE);
                let reader = tokio::task::spawn_blocking(move || fildes::read_chunks(file, tx));
                while let Some(chunk) = rx.recv().await {
                    match chunk {
                        Ok(bytes) => scanner.feed(bytes).await,
                        Err(e) => {
                            return Err(VirusError::Unreadable(Arc::new(e)));
                        }
                    }
                }
                reader
                    .await
                    .map_err(|e| VirusError::TaskFailed(Arc::new(e)))?;
                scanner.finish().await
            }
        }
    }

    /// `FILDES`: clamd reads the file in place.
    async fn scan_by_descriptor(path: PathBuf, file: std::fs::File) -> Result<Verdict, VirusError> {
        let unavailable = {
            let addr = path.display().to_string();
            move |e: std::io::Error| VirusError::Unavailable {
                addr: addr.clone(),
                source: Arc::new(e),
            }
        };
        // Connecting and handing over the descriptor are quick but blocking
        // calls; the verdict, which takes as long as the scan, is awaited on
        // the runtime (dropping it hangs up).
        let sock = tokio::task::spawn_blocking(move || fildes::send(&path, &file))
            .await
            .map_err(|e| VirusError::TaskFailed(Arc::new(e)))?
            .map_err(&unavailable)?;
        let reply = fildes::reply(sock).await.map_err(&unavailable)?;
        parse_reply(&reply)
    }

    /// Scans one buffer.
    pub async fn scan(&self, data: Bytes) -> Result<Verdict, VirusError> {
        let mut s = self.scanner();
        s.feed(data).await;
        s.finish().await
    }
}

/// One scan in progress.
#[derive(Debug)]
pub struct Scanner {
    tx: Option<mpsc::Sender<std::io::Result<Bytes>>>,
    task: Option<JoinHandle<Result<Verdict, VirusError>>>,
}

impl Scanner {
    /// Sends the next bytes. A scan that already failed ignores them; its
    /// error comes from [`finish`](Self::finish).
    pub async fn feed(&mut self, data: Bytes) {
        if let Some(tx) = &self.tx
            && tx.send(Ok(data)).await.is_err()
        {
            self.tx = None;
        }
    }

    /// Like [`feed`](Self::feed), from a blocking thread.
    pub fn blocking_feed(&mut self, data: Bytes) {
        if let Some(tx) = &self.tx
            && tx.blocking_send(Ok(data)).is_err()
        {
            self.tx = None;
        }
    }

    /// Ends the stream and waits for the verdict.
    pub async fn finish(mut self) -> Result<Verdict, VirusError> {
        self.tx = None;
        match self.task.take() {
            None => Ok(Verdict::Clean),
            Some(t) => t
                .await
                .unwrap_or_else(|e| Err(VirusError::TaskFailed(Arc::new(e)))),
        }
    }

    /// Like [`finish`](Self::finish), from a blocking thread.
    pub fn blocking_finish(self, rt: &tokio::runtime::Handle) -> Result<Verdict, VirusError> {
        rt.block_on(self.finish())
    }
}

/// clamd's `FILDES` command: the descriptor travels as `SCM_RIGHTS` ancillary
/// data beside one dummy byte, after the command itself.
mod fildes {
    use std::io::{IoSlice, Write};
    use std::mem::MaybeUninit;
    use std::os::fd::AsFd;
    use std::os::unix::fs::FileExt;
    use std::os::unix::net::UnixStream;
    use std::path::Path;

    use bytes::Bytes;
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    use tokio::io::AsyncReadExt;
    use tokio::sync::mpsc;

    /// The longest reply read: a verdict line is short; more is not clamd.
    const MAX_REPLY: u64 = 4096;

    /// Connects to clamd at `path` and hands it `file`; returns the socket on
    /// which the verdict will come.
    pub(super) fn send(path: &Path, file: &std::fs::File) -> std::io::Result<UnixStream> {
        let mut sock = UnixStream::connect(path)?;
        // `z`: replies end with NUL, as for INSTREAM.
        sock.write_all(b"zFILDES\0")?;
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        let fds = [file.as_fd()];
        if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(std::io::Error::other("no room for the descriptor"));
        }
        rustix::net::sendmsg(
            &sock,
            &[IoSlice::new(b"\0")],
            &mut control,
            SendFlags::empty(),
        )?;
        Ok(sock)
    }

    /// Reads clamd's reply up to its NUL (or until clamd hangs up).
    pub(super) async fn reply(sock: UnixStream) -> std::io::Result<Vec<u8>> {
        sock.set_nonblocking(true)?;
        let sock = tokio::net::UnixStream::from_std(sock)?;
        let mut reply = Vec::new();
        let mut limited = sock.take(MAX_REPLY);
        let mut buf = [0u8; 256];
        loop {
            let n = limited.read(&mut buf).await?;
            reply.extend_from_slice(&buf[..n]);
            if n == 0 || reply.contains(&0) {
                return Ok(reply);
            }
        }
    }

    /// Reads `file` from its start in chunks for an INSTREAM scan (blocking).
    pub(super) fn read_chunks(file: std::fs::File, tx: mpsc::Sender<std::io::Result<Bytes>>) {
        let mut at = 0u64;
        loop {
            let mut buf = vec![0u8; super::CHUNK];
            let r = file.read_at(&mut buf, at);
            let done = match r {
                Ok(0) => return,
                Ok(n) => {
                    buf.truncate(n);
                    at += n as u64;
                    tx.blocking_send(Ok(buf.into())).is_err()
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => false,
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    true
                }
            };
            if done {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_parse_into_verdicts_or_errors() {
        assert_eq!(parse_reply(b"stream: OK\0").unwrap(), Verdict::Clean);
        assert_eq!(
            parse_reply(b"stream: P2pvm.Test.Eicar.UNOFFICIAL FOUND\0").unwrap(),
            Verdict::Infected("P2pvm.Test.Eicar.UNOFFICIAL".into())
        );
        assert!(parse_reply(b"INSTREAM size limit exceeded. ERROR\0").is_err());
        assert!(parse_reply(b"stream:  FOUND").is_err());
        assert!(parse_reply(b"").is_err());
        assert_eq!(parse_reply(b"fd[12]: OK\0").unwrap(), Verdict::Clean);
        assert_eq!(
            parse_reply(b"fd[7]: Win.Test.EICAR_HDB-1 FOUND\0").unwrap(),
            Verdict::Infected("Win.Test.EICAR_HDB-1".into())
        );
        assert!(parse_reply(b"fd[12]: lstat() failed: Permission denied. ERROR\0").is_err());
        assert!(parse_reply(b"fd[]: OK").is_err());
        assert!(parse_reply(b"fd[1x]: OK").is_err());
    }

    #[test]
    fn detections_keep_the_newest_signatures_newest_first() {
        let c = Counts::default();
        for i in 0..RECENT_DETECTIONS + 3 {
            c.count(&Ok(Verdict::Infected(format!("Sig.{i}"))));
        }
        c.count(&Ok(Verdict::Clean));
        let f = VirusFilter {
            addr: None,
            counts: Arc::new(c),
        };
        let d = f.detections();
        assert_eq!(d.len(), RECENT_DETECTIONS);
        assert_eq!(d[0].signature, format!("Sig.{}", RECENT_DETECTIONS + 2));
        assert_eq!(d[RECENT_DETECTIONS - 1].signature, "Sig.3");
        assert_eq!(f.stats().infected, RECENT_DETECTIONS as u64 + 3);
    }

    #[tokio::test]
    async fn an_unreachable_clamd_fails_closed() {
        let f = VirusFilter::clamd(ClamdAddr::Socket("/nonexistent/clamd.sock".into()));
        assert!(matches!(
            f.ping().await,
            Err(VirusError::Unavailable { .. })
        ));
        assert!(matches!(
            f.scan(Bytes::from_static(b"data")).await,
            Err(VirusError::Unavailable { .. })
        ));
        assert_eq!(
            VirusFilter::off().scan(Bytes::new()).await.unwrap(),
            Verdict::Clean
        );
    }

    /// Against the real clamd that scripts/clamd.sh starts (CI always does).
    #[tokio::test]
    async fn real_clamd_finds_the_project_signatures() {
        let sock = std::env::var("P2PVM_CLAMD_SOCKET")
            .unwrap_or_else(|_| "/tmp/p2pvm-clamd/clamd.sock".into());
        let f = VirusFilter::clamd(ClamdAddr::Socket(sock.clone().into()));
        f.ping().await.unwrap_or_else(|e| {
            panic!("clamd is required for this test (run scripts/clamd.sh): {e}")
        });
        let eicar = Bytes::from_static(
            br"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*",
        );
        assert!(
            matches!(f.scan(eicar).await.unwrap(), Verdict::Infected(s) if s.contains("Eicar"))
        );
        // A marker deep inside a large stream, fed in pieces.
        let mut s = f.scanner();
        s.feed(Bytes::from(vec![7u8; 3 << 20])).await;
        s.feed(Bytes::from_static(b"P2PVM-SYNTHETIC-MALWARE-MARKER-7f3a"))
            .await;
        s.feed(Bytes::from(vec![9u8; 1 << 20])).await;
        assert!(
            matches!(s.finish().await.unwrap(), Verdict::Infected(s) if s.contains("Synthetic"))
        );
        let hashsig = Bytes::from_static(b"p2pvm synthetic hash-signature test file\n");
        assert!(
            matches!(f.scan(hashsig).await.unwrap(), Verdict::Infected(s) if s.contains("HashSig"))
        );
        assert_eq!(
            f.scan(Bytes::from(vec![1u8; 100_000])).await.unwrap(),
            Verdict::Clean
        );
    }

    /// A file handed over by descriptor (FILDES) and the same file streamed
    /// (as for a clamd over TCP) get the same verdicts, whatever the file's
    /// position.
    #[tokio::test]
    async fn real_clamd_scans_files_by_descriptor() {
        use std::io::{Seek, Write};
        let sock = std::env::var("P2PVM_CLAMD_SOCKET")
            .unwrap_or_else(|_| "/tmp/p2pvm-clamd/clamd.sock".into());
        let f = VirusFilter::clamd(ClamdAddr::Socket(sock.clone().into()));
        f.ping().await.unwrap_or_else(|e| {
            panic!("clamd is required for this test (run scripts/clamd.sh): {e}")
        });
        let dir = tempfile::tempdir().unwrap();
        let file_with = |name: &str, parts: &[&[u8]]| {
            let path = dir.path().join(name);
            let mut w = std::fs::File::create(&path).unwrap();
            for p in parts {
                w.write_all(p).unwrap();
            }
            path
        };
        let marked = file_with(
            "marked",
            &[
                &vec![7u8; 3 << 20],
                b"P2PVM-SYNTHETIC-MALWARE-MARKER-7f3a",
                &vec![9u8; 1 << 20],
            ],
        );
        let clean = file_with("clean", &[&vec![1u8; 5 << 20]]);
        let open_at_end = |p: &std::path::Path| {
            let mut file = std::fs::File::open(p).unwrap();
            file.seek(std::io::SeekFrom::End(0)).unwrap();
            file
        };
        let infected = f.scan_file(open_at_end(&marked)).await.unwrap();
        assert!(
            matches!(&infected, Verdict::Infected(s) if s.contains("Synthetic")),
            "{infected:?}"
        );
        assert_eq!(
            f.scan_file(open_at_end(&clean)).await.unwrap(),
            Verdict::Clean
        );
        // The streamed fallback (what a TCP clamd gets), through the same
        // reader, against the same clamd.
        let (tx, mut rx) = mpsc::channel(QUEUE);
        let file = open_at_end(&marked);
        let reader = tokio::task::spawn_blocking(move || fildes::read_chunks(file, tx));
        let mut s = f.scanner();
        let mut streamed = 0;
        while let Some(chunk) = rx.recv().await {
            let chunk = chunk.unwrap();
            streamed += chunk.len();
            s.feed(chunk).await;
        }
        reader.await.unwrap();
        assert_eq!(streamed as u64, std::fs::metadata(&marked).unwrap().len());
        assert!(
            matches!(s.finish().await.unwrap(), Verdict::Infected(s) if s.contains("Synthetic"))
        );
        // A clamd that is not there fails closed for files too.
        let gone = VirusFilter::clamd(ClamdAddr::Socket(dir.path().join("no.sock")));
        assert!(matches!(
            gone.scan_file(std::fs::File::open(&clean).unwrap()).await,
            Err(VirusError::Unavailable { .. })
        ));
    }
}
