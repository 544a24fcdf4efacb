//! Paced reading of the replication socket over TCP.
//!
//! A walsender sends every message as soon as it is decoded. A reader that takes each one as it
//! arrives keeps the TCP window open, so every message travels as its own segment, and the
//! server pays the per-segment cost (on loopback, the receiving side's as well) once per
//! change. A reader that lets the window close for a moment makes the server's kernel queue
//! what the walsender sends meanwhile, and the queue then leaves in full-sized segments.
//!
//! The [`Pacer`] decides how long to wait before the next read: after a read that found the
//! window (nearly) full, half as long as before, since the server is ahead; after a shorter
//! one, as long as the stream needs at its present rate to fill the window, if that fits within
//! the bound, and not at all otherwise. A slow stream (a few transactions a second) is
//! therefore read at once, and only a fast one waits, at most `max_wait` per read.

use std::time::Duration;

use tokio::time::Instant;

/// How the replication socket is read over TCP (`source.replication.read_coalesce` and
/// `receive_buffer`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pacing {
    /// The longest wait before the socket is read again; zero reads as soon as data arrives.
    pub max_wait: Duration,
    /// The socket's receive buffer (`SO_RCVBUF`), which bounds the TCP window; `None` is
    /// [`LOOPBACK_RECEIVE_BUFFER`] to a loopback address when reads are paced, and the
    /// kernel's own sizing otherwise.
    pub receive_buffer: Option<usize>,
}

/// The receive buffer to a server on a loopback address, where the window's size costs
/// nothing in round trips. Elsewhere a fixed buffer caps the stream at buffer / round-trip time,
/// so the kernel sizes it (and reads are not paced) unless `receive_buffer` says otherwise.
pub const LOOPBACK_RECEIVE_BUFFER: usize = 32 * 1024;

impl Pacing {
    /// The receive buffer to ask for to a server at `addr`, if any.
    pub fn receive_buffer_for(&self, addr: &std::net::SocketAddr) -> Option<usize> {
        self.receive_buffer.or_else(|| {
            (!self.max_wait.is_zero() && addr.ip().is_loopback()).then_some(LOOPBACK_RECEIVE_BUFFER)
        })
    }
}

/// A read of at least this share of the receive buffer found the window closed (the kernel
/// doubles `SO_RCVBUF` and advertises about half of what it holds).
const FULL_SHARE: f64 = 0.75;
/// How much more than one window's time a wait lasts, so that the window closes for a while.
const FILL_MARGIN: f64 = 1.25;
/// Waits shorter than this are not worth a timer (tokio's resolution is a millisecond).
const SHORTEST_WAIT: Duration = Duration::from_millis(1);
/// The stream's rate is measured over spans at least this long, so that two messages arriving
/// close together (a burst of commits) do not look like a fast stream.
const RATE_SPAN: Duration = Duration::from_millis(2);

/// Decides when the replication socket is read next.
#[derive(Debug)]
pub(crate) struct Pacer {
    max_wait: Duration,
    full: usize,
    wait: Duration,
    last_read: Option<Instant>,
    /// Bytes read since `span_start`, and the rate of the last whole span (bytes a second).
    span_start: Option<Instant>,
    span_bytes: usize,
    rate: f64,
}

impl Pacer {
    /// Paces reads through a receive buffer of `receive_buffer` bytes, waiting at most `max_wait`.
    pub(crate) fn new(max_wait: Duration, receive_buffer: usize) -> Self {
        Pacer {
            max_wait,
            full: (receive_buffer as f64 * FULL_SHARE) as usize,
            wait: Duration::ZERO,
            last_read: None,
            span_start: None,
            span_bytes: 0,
            rate: 0.0,
        }
    }

    /// When the socket may be read next; `None` means now.
    pub(crate) fn next_read(&self) -> Option<Instant> {
        match self.last_read {
            Some(at) if !self.wait.is_zero() => Some(at + self.wait),
            _ => None,
        }
    }

    /// A read of `n` bytes completed at `now`.
    pub(crate) fn read(&mut self, n: usize, now: Instant) {
        self.measure(n, now);
        if n >= self.full {
            self.wait /= 2;
            if self.wait < SHORTEST_WAIT {
                self.wait = Duration::ZERO;
            }
        } else {
            let fill = self.full as f64 * FILL_MARGIN / self.rate.max(1.0);
            self.wait = if fill <= self.max_wait.as_secs_f64() {
                Duration::from_secs_f64(fill).max(SHORTEST_WAIT)
            } else {
                Duration::ZERO
            };
        }
        self.last_read = Some(now);
    }

    fn measure(&mut self, n: usize, now: Instant) {
        let start = *self.span_start.get_or_insert(now);
        self.span_bytes += n;
        let span = now.saturating_duration_since(start);
        if span >= RATE_SPAN {
            self.rate = self.span_bytes as f64 / span.as_secs_f64();
            self.span_start = Some(now);
            self.span_bytes = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pacer() -> Pacer {
        Pacer::new(Duration::from_millis(5), LOOPBACK_RECEIVE_BUFFER)
    }

    #[test]
    fn only_a_loopback_server_gets_the_small_buffer_unless_one_is_set() {
        let auto = Pacing { max_wait: Duration::from_millis(5), receive_buffer: None };
        let local: std::net::SocketAddr = "127.0.0.1:5432".parse().unwrap();
        let remote: std::net::SocketAddr = "10.1.2.3:5432".parse().unwrap();
        assert_eq!(auto.receive_buffer_for(&local), Some(LOOPBACK_RECEIVE_BUFFER));
        assert_eq!(auto.receive_buffer_for(&"[::1]:5432".parse().unwrap()), Some(LOOPBACK_RECEIVE_BUFFER));
        assert_eq!(auto.receive_buffer_for(&remote), None);
        let set = Pacing { receive_buffer: Some(1 << 20), ..auto };
        assert_eq!(set.receive_buffer_for(&remote), Some(1 << 20));
        let unpaced = Pacing { max_wait: Duration::ZERO, ..auto };
        assert_eq!(unpaced.receive_buffer_for(&local), None);
    }

    /// Reads `per_ms` bytes each millisecond for `ms` milliseconds from `from`; returns the end.
    fn stream(p: &mut Pacer, from: Instant, ms: u64, per_ms: usize) -> Instant {
        for i in 1..=ms {
            p.read(per_ms, from + Duration::from_millis(i));
        }
        from + Duration::from_millis(ms)
    }

    #[test]
    fn a_slow_stream_is_read_at_once() {
        let mut p = pacer();
        let t0 = Instant::now();
        // 300 bytes a millisecond would fill the window in about 100 ms: beyond the bound.
        stream(&mut p, t0, 50, 300);
        assert_eq!(p.next_read(), None);
    }

    #[test]
    fn a_burst_of_messages_is_not_a_fast_stream() {
        let mut p = pacer();
        let t0 = Instant::now();
        let at = stream(&mut p, t0, 30, 300);
        // Two commits 10 µs apart: their rate is not the stream's.
        p.read(300, at + Duration::from_micros(10));
        assert_eq!(p.next_read(), None);
    }

    #[test]
    fn a_fast_stream_waits_for_the_window_to_fill_within_the_bound() {
        let mut p = pacer();
        let t0 = Instant::now();
        // About 10 kB a millisecond fills the 24 kB threshold in about 2.4 ms; with the
        // margin, about 3 ms.
        let at = stream(&mut p, t0, 25, 10_000);
        let wait = p.next_read().unwrap() - at;
        assert!(wait > Duration::from_micros(2_500) && wait < Duration::from_micros(3_500), "{wait:?}");
    }

    #[test]
    fn full_reads_halve_the_wait_down_to_none() {
        let mut p = pacer();
        let t0 = Instant::now();
        let mut at = stream(&mut p, t0, 25, 8_000);
        assert!(p.next_read().is_some());
        for _ in 0..4 {
            at += Duration::from_millis(1);
            p.read(32 * 1024, at);
        }
        assert_eq!(p.next_read(), None);
    }

    #[test]
    fn the_wait_never_exceeds_the_bound() {
        let mut p = pacer();
        let t0 = Instant::now();
        let mut at = t0;
        for per_ms in [1usize, 500, 2_000, 3_000, 5_000, 9_000, 20_000, 1, 24_000] {
            at = stream(&mut p, at, 21, per_ms);
            if let Some(next) = p.next_read() {
                assert!(next - at <= Duration::from_millis(5), "{:?} at {per_ms} bytes/ms", next - at);
            }
        }
    }
}
