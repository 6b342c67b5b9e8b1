//! Viewers that play an item as a stream: each reads a range of the item
//! through the API as fast as it arrives (`fetch_content`, as a player's
//! buffer fills; keeping the item, as an app's fetch does by default, so the
//! viewer's node fetches the rest rarest-first behind its playback window
//! and serves what it holds to the other viewers), and its playback is worked out from when the
//! bytes arrived: it starts once a second of media is buffered, plays at
//! its bitrate, and stalls whenever it would play bytes not yet there (it
//! plays on once a second is buffered again). One seek: after the first
//! part, the viewer jumps ahead and starts buffering again.

use std::time::{Duration, Instant};

use anyhow::{Result, ensure};
use guest_api::Client;
use tokio::io::AsyncReadExt;

/// How one viewer's playback went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Playback {
    /// From asking to the first byte.
    pub first_byte: Duration,
    /// From asking to the first frame (a second of media buffered).
    pub startup: Duration,
    /// The same after the seek.
    pub startup_after_seek: Duration,
    /// Times playback stopped for want of bytes (start-ups not counted).
    pub stalls: usize,
    /// How long those stops lasted in all.
    pub stalled: Duration,
    /// The bitrate played, bytes a second.
    pub rate: f64,
}

/// When each byte count was reached, from the request.
pub type Arrivals = Vec<(Duration, u64)>;

/// Start-up, stalls and stall time of playing `len` bytes at `rate` bytes a
/// second that arrived as `arrivals` says, buffering `prebuffer` bytes
/// before starting and after each stall.
pub fn play(
    arrivals: &[(Duration, u64)],
    len: u64,
    rate: f64,
    prebuffer: u64,
) -> (Duration, usize, Duration) {
    let secs = |bytes: u64| Duration::from_secs_f64(bytes as f64 / rate);
    // When `bytes` had arrived; `None` if they never did.
    let arrived = |bytes: u64| -> Option<Duration> {
        let i = arrivals.partition_point(|(_, b)| *b < bytes.min(len));
        arrivals.get(i).map(|(t, _)| *t)
    };
    // Bytes there at `t`.
    let there = |t: Duration| -> u64 {
        let i = arrivals.partition_point(|(at, _)| *at <= t);
        if i == 0 { 0 } else { arrivals[i - 1].1 }
    };
    let Some(startup) = arrived(prebuffer) else {
        return (Duration::MAX, 0, Duration::ZERO);
    };
    let (mut clock, mut pos) = (startup, 0u64);
    let (mut stalls, mut stalled) = (0, Duration::ZERO);
    loop {
        let have = there(clock);
        if have >= len {
            break;
        }
        // Playing on, the buffer runs dry here unless more comes first.
        let dry = clock + secs(have - pos);
        let Some(next) = arrived(have + 1) else {
            break; // the rest never came: the caller sees a short stream
        };
        if next <= dry {
            pos += ((next - clock).as_secs_f64() * rate) as u64;
            clock = next;
            continue;
        }
        let resume = arrived(have + prebuffer).unwrap_or(next).max(next);
        stalls += 1;
        stalled += resume - dry;
        clock = resume;
        pos = have;
    }
    (startup, stalls, stalled)
}

/// Where a viewer's bytes come from: something that reads a range of the
/// item as fast as it arrives and says when each byte count was reached.
/// p2pvm's API is one; a libtorrent peer in sequential mode is the other
/// (`crate::torrent`), so both engines' viewers are judged by one [`play`].
pub trait Source {
    /// Reads `[offset, offset + length)`; when each byte count arrived,
    /// from the moment it was asked.
    fn arrivals(
        &mut self,
        offset: u64,
        length: u64,
    ) -> impl std::future::Future<Output = Result<Arrivals>> + Send;
}

/// An item read through p2pvm's API (`fetch_content`, keeping the item).
#[derive(Debug)]
pub struct ApiSource<'a> {
    pub client: &'a Client,
    pub id: &'a str,
}

impl Source for ApiSource<'_> {
    async fn arrivals(&mut self, offset: u64, length: u64) -> Result<Arrivals> {
        arrivals(self.client, self.id, offset, length).await
    }
}

/// Reads `[offset, offset + length)` of `id` through `client` as fast as it
/// arrives; returns when each byte count arrived, from the request.
pub async fn arrivals(client: &Client, id: &str, offset: u64, length: u64) -> Result<Arrivals> {
    let asked = Instant::now();
    let (opened, mut stream) = client.fetch_content(id, offset, length, true).await?;
    ensure!(
        opened.length == length,
        "asked {length} bytes, given {}",
        opened.length
    );
    let mut buf = vec![0u8; 256 << 10];
    let (mut got, mut out) = (0u64, Vec::new());
    while got < length {
        let n = stream.read(&mut buf).await?;
        ensure!(n > 0, "the stream ended after {got} of {length} bytes");
        got += n as u64;
        out.push((asked.elapsed(), got));
    }
    Ok(out)
}

/// One viewer: plays `[0, seek_from)` of an item of `size` bytes at `rate`
/// bytes a second, then, when playback reaches `seek_from`, seeks to
/// `seek_to` and plays to the end.
pub async fn view_from(
    source: &mut impl Source,
    size: u64,
    rate: f64,
    seek_from: u64,
    seek_to: u64,
) -> Result<Playback> {
    let prebuffer = (rate as u64).max(1);
    let started = Instant::now();
    let first = source.arrivals(0, seek_from).await?;
    let (startup, stalls, stalled) = play(&first, seek_from, rate, prebuffer);
    // Playback reaches the seek point this long after the request.
    let seek_at = startup
        .saturating_add(stalled)
        .saturating_add(Duration::from_secs_f64(seek_from as f64 / rate));
    tokio::time::sleep(seek_at.saturating_sub(started.elapsed())).await;
    let second = source.arrivals(seek_to, size - seek_to).await?;
    let (startup_after_seek, stalls2, stalled2) = play(&second, size - seek_to, rate, prebuffer);
    Ok(Playback {
        first_byte: first.first().map_or(Duration::MAX, |(t, _)| *t),
        startup,
        startup_after_seek,
        stalls: stalls + stalls2,
        stalled: stalled + stalled2,
        rate,
    })
}

/// Scenario 2 of the swarm (streaming): the first `holders` downloaders
/// fetch the whole item, then the other downloaders view it, one starting
/// every `gap`, at `share` of their line's download rate, each seeking once
/// from 40 % to 70 % of the item. Both engines' swarms run the same plan.
#[derive(Debug, Clone, Copy)]
pub struct Streaming {
    pub holders: usize,
    pub gap: Duration,
    pub share: f64,
}

impl Streaming {
    /// Where every viewer seeks from and to in an item of `size` bytes.
    pub fn seek(&self, size: u64) -> (u64, u64) {
        (size * 4 / 10, size * 7 / 10)
    }

    /// A viewer's bitrate in bytes a second on `line`.
    pub fn rate(&self, line: &p2pvm_netlab::Line) -> Result<f64> {
        let down = line
            .down_bps
            .ok_or_else(|| anyhow::anyhow!("a viewer's line needs a download rate"))?;
        Ok(down as f64 / 8.0 * self.share)
    }

    /// Plays every source (viewer `n` starting `n` gaps after the first, at
    /// its own bitrate) and returns their playbacks in order. The viewers
    /// run as futures of this one task: they only wait on their sources.
    pub async fn view_all<S: Source>(
        &self,
        viewers: Vec<(S, f64)>,
        size: u64,
    ) -> Result<Vec<Playback>> {
        let (seek_from, seek_to) = self.seek(size);
        let plays = viewers
            .into_iter()
            .enumerate()
            .map(|(n, (mut source, rate))| async move {
                tokio::time::sleep(self.gap * n as u32).await;
                view_from(&mut source, size, rate, seek_from, seek_to).await
            });
        futures::future::try_join_all(plays).await
    }
}

/// What a set of viewers' playbacks came to, for a report line.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    pub viewers: usize,
    /// Start-ups: first plays and after the seek, together (percentiles by
    /// nearest rank).
    pub startup_p50: Duration,
    pub startup_p95: Duration,
    pub startup_max: Duration,
    pub first_byte_p50: Duration,
    /// Viewers that never stalled.
    pub smooth: usize,
    /// Stall time of all viewers together.
    pub stalled: Duration,
}

impl Summary {
    /// `None` for no viewers.
    pub fn of(plays: &[Playback]) -> Option<Self> {
        if plays.is_empty() {
            return None;
        }
        let mut startups: Vec<Duration> = plays
            .iter()
            .flat_map(|p| [p.startup, p.startup_after_seek])
            .collect();
        startups.sort();
        let mut first: Vec<Duration> = plays.iter().map(|p| p.first_byte).collect();
        first.sort();
        // Nearest rank: the smallest value at least `p` of them do not exceed.
        let at = |v: &[Duration], p: f64| {
            let rank = (p * v.len() as f64).ceil() as usize;
            v[rank.clamp(1, v.len()) - 1]
        };
        Some(Self {
            viewers: plays.len(),
            startup_p50: at(&startups, 0.5),
            startup_p95: at(&startups, 0.95),
            startup_max: startups[startups.len() - 1],
            first_byte_p50: at(&first, 0.5),
            smooth: plays.iter().filter(|p| p.stalls == 0).count(),
            stalled: plays.iter().map(|p| p.stalled).sum(),
        })
    }
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = |d: Duration| d.as_secs_f64();
        write!(
            f,
            "{} viewers: start-up p50 {:.2} s, p95 {:.2} s, max {:.2} s (first plays and after the seek); \
             first byte p50 {:.2} s; {} played without a stall, {:.1} s stalled in all",
            self.viewers,
            s(self.startup_p50),
            s(self.startup_p95),
            s(self.startup_max),
            s(self.first_byte_p50),
            self.smooth,
            s(self.stalled),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Duration {
        Duration::from_millis(v)
    }

    #[test]
    fn bytes_ahead_of_playback_never_stall() {
        // 1,000 bytes a second of media, all 10,000 here within 2 s.
        let a: Arrivals = (1..=10).map(|i| (ms(200 * i), 1_000 * i)).collect();
        let (startup, stalls, stalled) = play(&a, 10_000, 1_000.0, 1_000);
        assert_eq!(startup, ms(200));
        assert_eq!((stalls, stalled), (0, Duration::ZERO));
    }

    #[test]
    fn a_gap_in_arrivals_is_one_stall_of_its_length_past_the_buffer() {
        // 5 s of media at once, then nothing until 20 s, then the rest.
        let a: Arrivals = vec![(ms(100), 5_000), (ms(20_000), 10_000)];
        let (startup, stalls, stalled) = play(&a, 10_000, 1_000.0, 1_000);
        assert_eq!(startup, ms(100));
        assert_eq!(stalls, 1);
        // Ran dry at 5.1 s, resumed at 20 s.
        assert_eq!(stalled, ms(14_900));
    }

    #[test]
    fn a_stream_that_never_delivers_the_prebuffer_never_starts() {
        let a: Arrivals = vec![(ms(100), 10)];
        assert_eq!(play(&a, 10_000, 1_000.0, 1_000).0, Duration::MAX);
    }

    #[test]
    fn a_summary_counts_both_start_ups_of_every_viewer() {
        let p = |startup, after, stalls| Playback {
            first_byte: ms(startup / 2),
            startup: ms(startup),
            startup_after_seek: ms(after),
            stalls,
            stalled: ms(100 * stalls as u64),
            rate: 1e6,
        };
        let s = Summary::of(&[p(1_000, 3_000, 0), p(2_000, 4_000, 2)]).expect("viewers");
        assert_eq!(s.viewers, 2);
        // Start-ups 1, 2, 3, 4 s, by nearest rank: p50 is the second, p95 the last.
        assert_eq!(
            (s.startup_p50, s.startup_p95, s.startup_max),
            (ms(2_000), ms(4_000), ms(4_000))
        );
        assert_eq!((s.smooth, s.stalled), (1, ms(200)));
        assert_eq!(Summary::of(&[]), None);
    }
}
