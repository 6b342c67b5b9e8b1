//! The virus filter: content is streamed to a real ClamAV `clamd` (INSTREAM)
//! while it arrives, and the verdict gates storing, providing and delivering it.
//!
//! A [`Scanner`] is one INSTREAM session fed chunk by chunk; the verdict comes
//! when the stream ends. The filter fails closed: if clamd cannot be reached or
//! answers anything but a verdict, the content is not accepted.

use std::path::PathBuf;

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
    #[error("Virus filter unavailable: clamd at {addr}: {reason}")]
    Unavailable {
        /// Where clamd was expected.
        addr: String,
        /// Why.
        reason: String,
    },
    /// clamd answered without a verdict (e.g. a size limit).
    #[error("Virus filter error: clamd answered {0:?}")]
    BadReply(String),
    /// Our task that talks to clamd panicked or was aborted.
    #[error("Virus filter error: the scan task failed: {0}")]
    TaskFailed(String),
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

/// Parses clamd's INSTREAM reply, e.g. `stream: OK` or `stream: Eicar FOUND`.
pub fn parse_reply(reply: &[u8]) -> Result<Verdict, VirusError> {
    let text = String::from_utf8_lossy(reply);
    let text = text.trim_end_matches(['\0', '\n']).trim();
    let body = text.strip_prefix("stream:").map(str::trim).unwrap_or(text);
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

/// The filter: clamd's address, or off.
#[derive(Debug, Clone)]
pub struct VirusFilter {
    addr: Option<ClamdAddr>,
}

impl VirusFilter {
    /// A filter that scans with clamd at `addr`.
    pub fn clamd(addr: ClamdAddr) -> Self {
        Self { addr: Some(addr) }
    }

    /// No scanning (development only; p2pd warns loudly).
    pub fn off() -> Self {
        Self { addr: None }
    }

    /// Whether content is scanned.
    pub fn enabled(&self) -> bool {
        self.addr.is_some()
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
                reason: e.to_string(),
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
                reason: e.to_string(),
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
            match r {
                Ok(reply) => parse_reply(&reply),
                Err(e) => Err(VirusError::Unavailable {
                    addr: addr.to_string(),
                    reason: e.to_string(),
                }),
            }
        });
        Scanner {
            tx: Some(tx),
            task: Some(task),
        }
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
                .unwrap_or_else(|e| Err(VirusError::TaskFailed(e.to_string()))),
        }
    }

    /// Like [`finish`](Self::finish), from a blocking thread.
    pub fn blocking_finish(self, rt: &tokio::runtime::Handle) -> Result<Verdict, VirusError> {
        rt.block_on(self.finish())
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
}
