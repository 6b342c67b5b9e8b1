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
pub async fn view(
    client: &Client,
    id: &str,
    size: u64,
    rate: f64,
    seek_from: u64,
    seek_to: u64,
) -> Result<Playback> {
    let prebuffer = (rate as u64).max(1);
    let started = Instant::now();
    let first = arrivals(client, id, 0, seek_from).await?;
    let (startup, stalls, stalled) = play(&first, seek_from, rate, prebuffer);
    // Playback reaches the seek point this long after the request.
    let seek_at = startup + stalled + Duration::from_secs_f64(seek_from as f64 / rate);
    tokio::time::sleep(seek_at.saturating_sub(started.elapsed())).await;
    let second = arrivals(client, id, seek_to, size - seek_to).await?;
    let (startup_after_seek, stalls2, stalled2) = play(&second, size - seek_to, rate, prebuffer);
    Ok(Playback {
        first_byte: first.first().map_or(Duration::MAX, |(t, _)| *t),
        startup,
        startup_after_seek,
        stalls: stalls + stalls2,
        stalled: stalled + stalled2,
    })
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
}
