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
    let r = request(port, method, path, &[], None).await?;
    ensure!(
        r.code != 200
            || r.header("content-type")
                .is_some_and(|t| t.starts_with("text/plain; version=0.0.4")),
        "not the text format: {:?}",
        r.headers
    );
    Ok((r.code, r.body))
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Answer {
    /// The status code.
    pub code: u16,
    /// Header names (lower case) and values, in order.
    pub headers: Vec<(String, String)>,
    /// The body, as text.
    pub body: String,
}

impl Answer {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request with extra `headers` and a form `body`
/// (`application/x-www-form-urlencoded`), on a fresh connection.
pub async fn request(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Result<Answer> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let mut head =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    head.push_str(body.unwrap_or_default());
    s.write_all(head.as_bytes()).await?;
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut raw))
        .await
        .context("no answer")??;
    let text = String::from_utf8(raw)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
    let mut lines = head.lines();
    let code = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .context("no status")?
        .parse()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    Ok(Answer {
        code,
        headers,
        body: body.to_string(),
    })
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
