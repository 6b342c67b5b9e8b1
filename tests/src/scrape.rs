//! Reading a node's `GET /metrics` in tests: a plain HTTP/1.1 request and
//! Prometheus' own text format, parsed with `prometheus-parse`.

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(30);

/// A port free a moment ago (the node binds it right after).
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// One HTTP/1.1 request; the status line's code and the body.
pub async fn http(port: u16, method: &str, path: &str) -> Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .context("no answer")??;
    let text = String::from_utf8(raw)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
    let code = head
        .split_whitespace()
        .nth(1)
        .context("no status")?
        .parse()?;
    ensure!(
        code != 200
            || head
                .to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
        "not the text format: {head}"
    );
    Ok((code, body.to_string()))
}

/// Every sample of a scrape, keyed by its name and sorted labels.
#[derive(Debug)]
pub struct Scrape(pub HashMap<String, f64>);

impl Scrape {
    pub async fn of(port: u16) -> Result<Self> {
        let (code, body) = http(port, "GET", "/metrics").await?;
        ensure!(code == 200, "GET /metrics: {code}");
        let parsed = prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string())))
            .context("not Prometheus' text format")?;
        let mut out = HashMap::new();
        for s in parsed.samples {
            let mut labels: Vec<_> = s.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            let value = match s.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(h) => {
                    h.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                prometheus_parse::Value::Summary(_) => continue,
            };
            out.insert(format!("{}{{{}}}", s.metric, labels.join(",")), value);
        }
        Ok(Self(out))
    }

    /// The sample named exactly so, 0 if absent.
    pub fn get(&self, key: &str) -> f64 {
        self.0.get(key).copied().unwrap_or(0.0)
    }

    /// The sum over every sample of `metric`, whatever its labels.
    pub fn sum(&self, metric: &str) -> f64 {
        self.0
            .iter()
            .filter(|(k, _)| k.split('{').next() == Some(metric))
            .map(|(_, v)| v)
            .sum()
    }
}

/// The config that serves a node's metrics on a free loopback port, and
/// the port.
pub fn config() -> Result<(String, u16)> {
    let port = free_port()?;
    Ok((format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"), port))
}
