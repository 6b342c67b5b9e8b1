//! The VMs page (VM mode): what `p2pvmm up --metrics` says of both VMs,
//! read from its `/vms.json` on the TAP's host side (`[metrics] vms_url`).
//! The supervisor is the only one who knows; the service VM only asks.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use http_body_util::{BodyExt, Empty, Limited};
use hyper::body::Bytes;
use serde::Deserialize;

/// The longest answer read (two VMs' figures are a few KiB).
const MAX_BODY: usize = 256 << 10;
/// How long p2pvmm has to answer.
const TIMEOUT: Duration = Duration::from_secs(3);

/// One VM as p2pvmm reports it (the JSON of `vmm::metrics::VmStatus`;
/// fields this page does not show are ignored).
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct VmStatus {
    pub name: String,
    pub state: String,
    pub restarts: u32,
    pub memory_mib: u64,
    pub console: String,
    pub figures: Option<Figures>,
}

/// A VM process's latest figures.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Figures {
    pub boots: u32,
    pub exits: BTreeMap<String, u64>,
    pub devices: Vec<Device>,
    pub vmm_overhead_bytes: u64,
    pub uptime_secs: u64,
}

/// One device's counts.
#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Device {
    pub device: String,
    pub notifications: u64,
    pub interrupts: u64,
    #[serde(default)]
    pub bytes_to_guest: u64,
    #[serde(default)]
    pub bytes_from_guest: u64,
}

/// `http://IP:PORT/PATH` to a loopback or private address: its address and
/// path; `None` for anything else (no names to resolve, no TLS, nothing
/// public).
pub(crate) fn parse_url(url: &str) -> Option<(SocketAddr, String)> {
    let rest = url.strip_prefix("http://")?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let addr: SocketAddr = authority.parse().ok()?;
    (p2pvm_httpd::is_private(addr.ip()) && !path.contains(char::is_whitespace))
        .then(|| (addr, path.to_owned()))
}

/// Why p2pvmm's figures could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum VmsError {
    /// `[metrics] vms_url` is not `http://` and a private address.
    #[error("not a usable URL: {0}")]
    BadUrl(String),
    /// No answer in time.
    #[error("p2pvmm at {addr} did not answer in {TIMEOUT:?}")]
    Timeout {
        /// Where it was asked.
        addr: SocketAddr,
    },
    /// No connection.
    #[error("p2pvmm at {addr}")]
    Connect {
        /// Where it was asked.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The HTTP exchange failed.
    #[error("asking p2pvmm over HTTP")]
    Http(#[from] hyper::Error),
    /// The request could not be built.
    #[error("the request to p2pvmm")]
    Request(#[from] hyper::http::Error),
    /// p2pvmm refused.
    #[error("p2pvmm answered {0}")]
    Status(hyper::StatusCode),
    /// The answer's body could not be read (or was too large).
    #[error("reading p2pvmm's answer")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// The answer is not the VMs' states.
    #[error("p2pvmm's answer")]
    Json(#[from] serde_json::Error),
}

/// Asks p2pvmm for both VMs' states.
pub(crate) async fn fetch(url: &str) -> Result<Vec<VmStatus>, VmsError> {
    let (addr, path) = parse_url(url).ok_or_else(|| VmsError::BadUrl(url.to_owned()))?;
    tokio::time::timeout(TIMEOUT, ask(addr, &path))
        .await
        .map_err(|_| VmsError::Timeout { addr })?
}

async fn ask(addr: SocketAddr, path: &str) -> Result<Vec<VmStatus>, VmsError> {
    let stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|source| VmsError::Connect { addr, source })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    // Ended with this call, whichever way it ends (the caller's timeout too).
    let conn = AbortOnDrop(tokio::spawn(conn));
    let req = hyper::Request::get(path)
        .header(hyper::header::HOST, addr.to_string())
        .body(Empty::<Bytes>::new())?;
    let resp = sender.send_request(req).await?;
    if !resp.status().is_success() {
        return Err(VmsError::Status(resp.status()));
    }
    let body = Limited::new(resp.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(VmsError::Body)?
        .to_bytes();
    drop(conn);
    Ok(serde_json::from_slice(&body)?)
}

/// A task aborted when its handle goes.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_to_a_private_address_is_asked() {
        assert_eq!(
            parse_url("http://10.99.0.1:9101/vms.json"),
            Some(("10.99.0.1:9101".parse().unwrap(), "/vms.json".into()))
        );
        assert!(parse_url("http://127.0.0.1:9101").is_some());
        for bad in [
            "https://10.99.0.1:9101/vms.json",
            "http://8.8.8.8:80/vms.json",
            "http://p2pvmm.local:9101/vms.json",
            "http://10.99.0.1/vms.json",
            "http://10.99.0.1:9101/a b",
        ] {
            assert!(parse_url(bad).is_none(), "{bad} accepted");
        }
    }

    #[tokio::test]
    async fn the_supervisors_json_is_read_within_its_bounds() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            for body in [
                r#"[{"name":"service","state":"running","restarts":1,"memory_mib":640,"console":"p2pvmm console service","figures":{"boots":1,"exits":{"io":5},"devices":[{"device":"virtio-net p2pvm0","notifications":3,"interrupts":4}],"guest_memory_bytes":1,"vmm_overhead_bytes":2,"uptime_secs":9}}]"#.to_string(),
                "x".repeat(MAX_BODY + 1),
            ] {
                let (mut s, _) = l.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await.unwrap();
                let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len());
                s.write_all(head.as_bytes()).await.unwrap();
                let _ = s.write_all(body.as_bytes()).await;
            }
        });
        let url = format!("http://{addr}/vms.json");
        let vms = fetch(&url).await.unwrap();
        assert_eq!(vms[0].name, "service");
        assert_eq!(vms[0].restarts, 1);
        assert_eq!(vms[0].figures.as_ref().unwrap().devices[0].interrupts, 4);
        let too_big = fetch(&url).await.unwrap_err();
        assert!(matches!(too_big, VmsError::Body(_)), "{too_big}");
    }
}
