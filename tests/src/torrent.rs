//! libtorrent in the network lab: the anchor a swarm of `p2pd`s is measured
//! against, on the very same hosts and lines. One `peer.py` (Debian's
//! `python3-libtorrent`) per lab host and a tiny tracker on the hub; see
//! `tests/torrent/`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use p2pvm_netlab::{Host, Lab, Line};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use crate::playback::{Arrivals, Playback, Source, Streaming};
use crate::swarm::CrowdOutcome;

/// Debian's Python: `python3-libtorrent` is installed for it, not for
/// whatever `python3` comes first on a developer's PATH.
const PYTHON: &str = "/usr/bin/python3";
const TRACKER_PORT: u16 = 6969;

/// Whether libtorrent can be run here; the reason when not.
pub fn available() -> Result<()> {
    let ok = std::process::Command::new(PYTHON)
        .args(["-c", "import libtorrent"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ensure!(
        ok,
        "libtorrent is not installed (apt-get install python3-libtorrent)"
    );
    Ok(())
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("torrent")
        .join(name)
}

/// A running `peer.py` or tracker.
#[derive(Debug)]
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Lines<BufReader<ChildStdout>>,
}

impl Proc {
    fn spawn(mut cmd: std::process::Command) -> Result<Self> {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut cmd = Command::from(cmd);
        let mut child = cmd.kill_on_drop(true).spawn()?;
        let stdin = child.stdin.take();
        let out = BufReader::new(child.stdout.take().context("stdout")?).lines();
        Ok(Self { child, stdin, out })
    }

    /// The next line that starts with `word`, with the rest of it.
    async fn expect(&mut self, word: &str) -> Result<String> {
        while let Some(line) = self.out.next_line().await? {
            if let Some(rest) = line.strip_prefix(word) {
                return Ok(rest.trim().to_owned());
            }
        }
        bail!("the process ended before saying {word:?}")
    }

    /// Writes one command line to the process.
    async fn say(&mut self, line: &str) -> Result<()> {
        let stdin = self.stdin.as_mut().context("stdin closed")?;
        stdin.write_all(format!("{line}\n").as_bytes()).await?;
        stdin.flush().await?;
        Ok(())
    }

    fn pid(&self) -> Result<u32> {
        self.child.id().context("exited")
    }
}

/// How long a libtorrent peer may go without saying anything while it is
/// fetching or playing before the scenario gives up on it.
const SILENCE_LIMIT: Duration = Duration::from_secs(120);

/// How long the holders of the streaming scenario may take to fetch the
/// item (a 64 MiB crowd of 30 on home lines takes one to two minutes).
const HOLDERS_WITHIN: Duration = Duration::from_secs(600);

/// One libtorrent leecher playing a range as a stream (`peer.py view`).
struct TorrentViewer<'a> {
    proc: &'a mut Proc,
    rate: f64,
}

impl Source for TorrentViewer<'_> {
    async fn arrivals(&mut self, offset: u64, length: u64) -> Result<Arrivals> {
        let rate = self.rate;
        self.proc
            .say(&format!("view {offset} {length} {rate:.0}"))
            .await?;
        let mut out = Arrivals::new();
        loop {
            let line = tokio::time::timeout(SILENCE_LIMIT, self.proc.out.next_line())
                .await
                .context("a libtorrent viewer went silent")??
                .context("a libtorrent viewer ended")?;
            if line == "viewed" {
                break;
            }
            let Some(got) = line.strip_prefix("got ") else {
                continue;
            };
            let (secs, bytes) = got
                .split_once(' ')
                .with_context(|| format!("a viewer said {line:?}"))?;
            out.push((Duration::from_secs_f64(secs.parse()?), bytes.parse()?));
        }
        ensure!(
            out.last().is_some_and(|(_, b)| *b == length),
            "a libtorrent viewer stopped short of {length} bytes"
        );
        Ok(out)
    }
}

/// A libtorrent swarm on a lab's hosts: the seed on the first, leechers on
/// the rest, ready to start.
#[derive(Debug)]
pub struct TorrentSwarm {
    _tracker: Proc,
    seed: Proc,
    leechers: Vec<Proc>,
    dir: tempfile::TempDir,
}

/// What libtorrent's flash crowd came to.
#[derive(Debug)]
pub struct TorrentOutcome {
    /// Finish times and failures, as for our swarm.
    pub crowd: CrowdOutcome,
    /// Payload bytes the seed uploaded.
    pub seed_uploaded: u64,
    /// CPU seconds each peer used during the crowd, the seed first.
    pub cpu_secs: Vec<f64>,
    /// Each peer's peak resident memory in KiB, the seed first.
    pub peak_kib: Vec<u64>,
}

impl TorrentSwarm {
    /// Starts a tracker on the hub, a seed of `data` on `lab`'s first host
    /// and an idle leecher on each other host.
    pub async fn start(lab: &Lab, data: &[u8]) -> Result<Self> {
        available()?;
        let dir = tempfile::Builder::new()
            .prefix("p2pvm-torrent-")
            .tempdir()?;
        let seed_dir = dir.path().join("seed");
        std::fs::create_dir_all(&seed_dir)?;
        let file = seed_dir.join("swarm.bin");
        std::fs::write(&file, data)?;
        let torrent = dir.path().join("swarm.torrent");
        let tracker_url = format!("http://{}:{TRACKER_PORT}/announce", lab.hub_ip());
        let made = std::process::Command::new(PYTHON)
            .arg(script("peer.py"))
            .arg("make")
            .arg("--data")
            .arg(&file)
            .args(["--tracker", &tracker_url])
            .arg("--out")
            .arg(&torrent)
            .status()?;
        ensure!(made.success(), "making the torrent failed: {made}");

        let mut tracker = lab.hub_command(PYTHON);
        tracker.arg(script("tracker.py")).args([
            "--ip",
            &lab.hub_ip().to_string(),
            "--port",
            &TRACKER_PORT.to_string(),
        ]);
        let mut tracker = Proc::spawn(tracker)?;
        tracker.expect("ready").await?;

        let (first, rest) = lab.hosts().split_first().context("an empty lab")?;
        let mut seed = Proc::spawn(peer(lab, first, "seed", &torrent, &seed_dir, None))?;
        seed.expect("ready").await?;
        let mut leechers = Vec::with_capacity(rest.len());
        for (i, h) in rest.iter().enumerate() {
            let save = dir.path().join(format!("leech{i}"));
            std::fs::create_dir_all(&save)?;
            leechers.push(Proc::spawn(peer(
                lab,
                h,
                "leech",
                &torrent,
                &save,
                Some(first),
            ))?);
        }
        for l in &mut leechers {
            l.expect("ready").await?;
        }
        Ok(Self {
            _tracker: tracker,
            seed,
            leechers,
            dir,
        })
    }

    /// Every leecher adds the torrent at the same moment; waits until each
    /// holds it (or `deadline` passes), then stops the swarm.
    pub async fn flash_crowd(&mut self, deadline: Duration) -> Result<TorrentOutcome> {
        let pids: Vec<u32> = std::iter::once(&self.seed)
            .chain(&self.leechers)
            .map(Proc::pid)
            .collect::<Result<_>>()?;
        let cpu_before: Vec<f64> = pids
            .iter()
            .map(|p| crate::cpu_secs(*p))
            .collect::<Result<_>>()?;
        let start = Instant::now();
        for l in &mut self.leechers {
            l.say("go").await?;
        }
        let waits = self.leechers.iter_mut().map(|l| async move {
            let done = tokio::time::timeout_at((start + deadline).into(), l.expect("done")).await;
            match done {
                Ok(Ok(_)) => Ok(start.elapsed()),
                Ok(Err(e)) => Err(format!("{e:#}")),
                Err(_) => Err(format!("not done after {deadline:?}")),
            }
        });
        let mut crowd = CrowdOutcome::default();
        for r in futures::future::join_all(waits).await {
            match r {
                Ok(d) => crowd.done.push(d),
                Err(e) => *crowd.failures.entry(e).or_default() += 1,
            }
        }
        crowd.done.sort();
        let cpu_secs: Vec<f64> = pids
            .iter()
            .zip(&cpu_before)
            .map(|(p, before)| Ok(crate::cpu_secs(*p)? - before))
            .collect::<Result<_>>()?;
        let peak_kib: Vec<u64> = pids
            .iter()
            .map(|p| crate::proc_status_kib(*p, "VmHWM"))
            .collect::<Result<_>>()?;
        // Closing stdin stops a peer; the seed then reports what it sent.
        self.seed.stdin.take();
        let stats: serde_json::Value = serde_json::from_str(&self.seed.expect("stats").await?)?;
        let seed_uploaded = stats["uploaded"].as_u64().context("seed's upload")?;
        for l in &mut self.leechers {
            l.stdin.take();
        }
        Ok(TorrentOutcome {
            crowd,
            seed_uploaded,
            cpu_secs,
            peak_kib,
        })
    }

    /// Scenario 2 (streaming) on libtorrent, as [`crate::swarm::Swarm::stream`]
    /// runs it on p2pvm: the first `plan.holders` leechers fetch the whole
    /// item, then the others play it in sequential mode (`peer.py view`).
    /// Leecher `i`'s bitrate follows `lines[i + 1]` (the seed's first).
    pub async fn stream(
        &mut self,
        lines: &[Line],
        plan: &Streaming,
        size: u64,
    ) -> Result<Vec<Playback>> {
        ensure!(
            plan.holders < self.leechers.len() && lines.len() > self.leechers.len(),
            "a line per peer and at least one viewer"
        );
        let (holders, viewers) = self.leechers.split_at_mut(plan.holders);
        for h in holders.iter_mut() {
            h.say("go").await?;
        }
        let holding = holders.iter_mut().map(|h| async move {
            tokio::time::timeout(HOLDERS_WITHIN, h.expect("done"))
                .await
                .context("a holder took too long to fetch the item")?
        });
        futures::future::try_join_all(holding).await?;
        let viewers = viewers
            .iter_mut()
            .enumerate()
            .map(|(i, proc)| {
                let rate = plan.rate(&lines[plan.holders + i + 1])?;
                Ok((TorrentViewer { proc, rate }, rate))
            })
            .collect::<Result<Vec<_>>>()?;
        plan.view_all(viewers, size).await
    }

    /// Where leecher `i` saved the item.
    pub fn leecher_file(&self, i: usize) -> PathBuf {
        self.dir.path().join(format!("leech{i}")).join("swarm.bin")
    }
}

fn peer(
    lab: &Lab,
    host: &Host,
    role: &str,
    torrent: &Path,
    save: &Path,
    seed: Option<&Host>,
) -> std::process::Command {
    let mut c = lab.command(host, PYTHON);
    c.arg(script("peer.py"))
        .arg(role)
        .arg("--torrent")
        .arg(torrent)
        .arg("--save")
        .arg(save)
        .args(["--ip", &host.ip.to_string()]);
    if let Some(s) = seed {
        c.args(["--seed", &s.ip.to_string()]);
    }
    c
}
