//! Handshake admission under honest overload.
//!
//! A login costs about 60 times a keepalive (Noise IK responder and certificate check
//! against a few microseconds), so during a re-login storm initiations would crowd out the
//! keepalives of users already back, and those the supernode could not serve in time would
//! time out on the client after 1 s without a word. Instead, initiations that pass the
//! cheap checks wait in a bounded queue that the supernode serves after the transport
//! packets of the same batch, a budget at a time; one that would wait longer than
//! `max_wait` (its queue position over the measured handshake rate), or find the queue
//! full, is answered at once with a `Busy` reject that costs no Diffie-Hellman and tells
//! the client when to come back.
//!
//! The retry-after hints hand out appointments: each shed client gets the next free slot
//! at the measured rate after the queue drains, so a storm of N clients is told to come
//! back spread over about N / rate seconds instead of all at once.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// Handshakes per second assumed before any has been measured under backlog (a login's
/// crypto bound is about 4,000 per core-second).
const INITIAL_RATE: f64 = 2_000.0;
/// Lowest rate the estimate may fall to (a stalled sample must not shed everyone).
const MIN_RATE: f64 = 50.0;
/// Length of one rate sample while backlogged: a few thousand handshakes, so that batch
/// boundaries do not make it noisy (a noisy sample, weighed as below, biases the
/// estimate upwards).
const SAMPLE: Duration = Duration::from_millis(500);
/// Weight of a sample below the estimate. A storm's first second buries the supernode in
/// initiations to read and shed, and the handshakes it serves meanwhile understate what
/// it can do once that burst is read; appointments booked at that dip would keep it
/// underfed for the rest of the storm (an idle supernode costs a whole storm, an
/// overbooked client one more `Busy`). So the estimate falls slowly (a time constant of
/// about 3 s) and rises fast.
const FALL_WEIGHT: f64 = 0.15;
/// Shortest wait a Busy asks for: less would bring the client back into the same queue.
pub(super) const MIN_RETRY: Duration = Duration::from_millis(250);
/// A client gives up on a handshake after 1 s (protocol 7.10): an initiation served
/// later than this after it arrived would be answered after that, with the round trip
/// and the serving pass, so it is shed instead.
const PATIENCE: Duration = Duration::from_millis(800);
/// Appointments are booked this much faster than the measured rate. The rate is only
/// measured while initiations queue, and clients booked exactly at it arrive just fast
/// enough to be served at once: the queue empties, no sample is taken and the estimate
/// never rises to what the supernode can do (a storm served at the initial guess).
/// Overbooking keeps a backlog, so the estimate follows the real capacity; an overbooked
/// client is told `Busy` again, which costs a few microseconds.
const OVERBOOK: f64 = 1.5;
/// Longest wait a Busy can say (its hint is 16 bits of milliseconds).
pub(super) const MAX_RETRY: Duration = Duration::from_millis(u16::MAX as u64);

/// An initiation waiting for its Diffie-Hellman work.
#[derive(Debug)]
pub(super) struct Queued {
    /// Source address.
    pub from: SocketAddr,
    /// The initiator's index.
    pub sender: u32,
    /// The whole datagram (the Noise message is re-read from it).
    pub datagram: Vec<u8>,
    /// When it arrived.
    pub arrived: Instant,
}

/// How to shed an initiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Shed {
    /// Answer `Busy` with this wait.
    Busy(Duration),
    /// No answer: over the per-second budget of Busy answers.
    Silent,
}

/// The queue, the rate estimate and the appointment book.
#[derive(Debug)]
pub(super) struct Admission {
    queue: VecDeque<Queued>,
    max_queue: usize,
    max_wait: Duration,
    /// Handshakes per second served while a backlog lasted (moving average).
    rate: f64,
    /// Start of the current sample and handshakes served in it; `None` without backlog.
    sample: Option<(Instant, u32)>,
    /// Next appointment free for a shed client.
    horizon: Option<Instant>,
    /// Busy answers this second: (window start, count).
    busy_window: (Instant, u32),
    busy_per_second: u32,
}

impl Admission {
    pub(super) fn new(
        max_queue: usize,
        max_wait: Duration,
        busy_per_second: u32,
        now: Instant,
    ) -> Self {
        Admission {
            queue: VecDeque::new(),
            max_queue,
            max_wait,
            rate: INITIAL_RATE,
            sample: None,
            horizon: None,
            busy_window: (now, 0),
            busy_per_second,
        }
    }

    /// Initiations waiting.
    pub(super) fn len(&self) -> usize {
        self.queue.len()
    }

    /// Handshakes per second the supernode is estimated to serve.
    pub(super) fn rate(&self) -> f64 {
        self.rate
    }

    /// Arrival of the oldest waiting initiation: work for now.
    pub(super) fn next_due(&self) -> Option<Instant> {
        self.queue.front().map(|q| q.arrived)
    }

    /// How long the `n`-th initiation in the queue waits at the measured rate.
    fn wait_for(&self, n: usize) -> Duration {
        Duration::from_secs_f64(n as f64 / self.rate.max(MIN_RATE))
    }

    /// Whether a newcomer may queue: it would be served within `max_wait`.
    pub(super) fn admits(&self) -> bool {
        let n = self.queue.len() + 1;
        n <= self.max_queue && self.wait_for(n) <= self.max_wait
    }

    /// The answer for an initiation that will not be served, within the budget.
    pub(super) fn shed(&mut self, now: Instant) -> Shed {
        if now.saturating_duration_since(self.busy_window.0) >= Duration::from_secs(1) {
            self.busy_window = (now, 0);
        }
        if self.busy_window.1 >= self.busy_per_second {
            return Shed::Silent;
        }
        self.busy_window.1 += 1;
        Shed::Busy(self.appointment(now))
    }

    /// The wait to tell a shed client: the next free slot once the queue has drained,
    /// one slot per handshake at the measured rate.
    fn appointment(&mut self, now: Instant) -> Duration {
        let drained = now + self.wait_for(self.queue.len());
        let slot = self.horizon.map_or(drained, |h| h.max(drained));
        let wait = slot
            .saturating_duration_since(now)
            .clamp(MIN_RETRY, MAX_RETRY);
        // Past the longest hint, later clients get the same one and are booked again
        // when they come back.
        let spacing = self.wait_for(1).div_f64(OVERBOOK);
        self.horizon = Some((now + wait + spacing).min(now + MAX_RETRY));
        wait
    }

    /// Queues an admitted initiation.
    pub(super) fn push(&mut self, q: Queued) {
        self.queue.push_back(q);
    }

    /// The next initiation to serve, or to shed when it waited so long that its client
    /// will have given up on it (twice `max_wait`, at most [`PATIENCE`]):
    /// `(initiation, stale)`.
    pub(super) fn pop(&mut self, now: Instant) -> Option<(Queued, bool)> {
        let q = self.queue.pop_front()?;
        let stale = now.saturating_duration_since(q.arrived) > (self.max_wait * 2).min(PATIENCE);
        Some((q, stale))
    }

    /// Notes that one serving pass did `served` handshakes. Only passes that leave a
    /// backlog measure the rate: an idle supernode's pace says nothing of its capacity.
    pub(super) fn served(&mut self, now: Instant, served: u32) {
        if self.queue.is_empty() {
            self.sample = None;
            return;
        }
        match self.sample {
            // The backlog starts: count from here (this pass's work came before).
            None => self.sample = Some((now, 0)),
            Some((t0, n)) => {
                let n = n + served;
                let dt = now.saturating_duration_since(t0);
                if dt >= SAMPLE {
                    let r = (n as f64 / dt.as_secs_f64()).max(MIN_RATE);
                    let w = if r < self.rate { FALL_WEIGHT } else { 0.5 };
                    self.rate += w * (r - self.rate);
                    self.sample = Some((now, 0));
                } else {
                    self.sample = Some((t0, n));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr() -> SocketAddr {
        SocketAddr::from(([192, 0, 2, 1], 4000))
    }

    fn queued(at: Instant) -> Queued {
        Queued {
            from: addr(),
            sender: 1,
            datagram: vec![0; 8],
            arrived: at,
        }
    }

    #[test]
    fn the_queue_is_bounded_by_its_length_and_by_the_wait() {
        let t = Instant::now();
        let mut a = Admission::new(3, Duration::from_secs(1), 100, t);
        for _ in 0..3 {
            assert!(a.admits());
            a.push(queued(t));
        }
        assert!(!a.admits());
        // At 2,000 a second, the 11th would wait 5.5 ms: over a 5 ms bound.
        let mut a = Admission::new(100, Duration::from_millis(5), 100, t);
        for _ in 0..10 {
            assert!(a.admits());
            a.push(queued(t));
        }
        assert!(!a.admits());
    }

    #[test]
    fn shed_clients_get_successive_appointments_a_little_faster_than_the_measured_rate() {
        let t = Instant::now();
        let mut a = Admission::new(0, Duration::from_secs(1), 10_000, t);
        let waits: Vec<Duration> = (0..2_000)
            .map(|_| match a.shed(t) {
                Shed::Busy(w) => w,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(waits[0], MIN_RETRY);
        // 2,000 a second, overbooked by half: one slot every 1/3 ms after the shortest
        // wait, so the last of 2,000 comes back two thirds of a second after the first.
        let spread = (waits[1999] - waits[0]).as_secs_f64();
        assert!((spread - 1.0 / OVERBOOK).abs() < 0.01, "{spread}");
        assert!(waits.windows(2).all(|w| w[0] <= w[1]));
    }

    #[test]
    fn appointments_stop_at_the_longest_hint() {
        let t = Instant::now();
        let mut a = Admission::new(0, Duration::from_secs(1), u32::MAX, t);
        let mut last = Duration::ZERO;
        for _ in 0..200_000 {
            if let Shed::Busy(w) = a.shed(t) {
                last = w;
            }
        }
        assert_eq!(last, MAX_RETRY);
    }

    #[test]
    fn busy_answers_have_a_budget_per_second() {
        let t = Instant::now();
        let mut a = Admission::new(0, Duration::from_secs(1), 2, t);
        assert!(matches!(a.shed(t), Shed::Busy(_)));
        assert!(matches!(a.shed(t), Shed::Busy(_)));
        assert_eq!(a.shed(t), Shed::Silent);
        assert!(matches!(a.shed(t + Duration::from_secs(1)), Shed::Busy(_)));
    }

    #[test]
    fn the_rate_is_measured_only_while_a_backlog_lasts() {
        let t = Instant::now();
        let mut a = Admission::new(1000, Duration::from_secs(10), 100, t);
        // Idle: one handshake now and then says nothing about capacity.
        a.served(t, 1);
        a.served(t + Duration::from_secs(1), 1);
        assert_eq!(a.rate(), INITIAL_RATE);
        for _ in 0..100 {
            a.push(queued(t));
        }
        // Backlogged: 30 handshakes every 10 ms is 3,000 a second.
        let mut now = t;
        for _ in 0..1000 {
            now += Duration::from_millis(10);
            a.served(now, 30);
        }
        assert!((a.rate() - 3000.0).abs() < 1.0, "{}", a.rate());
    }

    #[test]
    fn the_rate_rises_fast_and_a_short_dip_barely_lowers_it() {
        let t = Instant::now();
        let mut a = Admission::new(1000, Duration::from_secs(10), 100, t);
        for _ in 0..100 {
            a.push(queued(t));
        }
        let mut now = t;
        let mut pass = |a: &mut Admission, per_10ms: u32, ms: u64| {
            for _ in 0..ms / 10 {
                now += Duration::from_millis(10);
                a.served(now, per_10ms);
            }
        };
        // 4,000 a second is nearly reached within two and a half seconds.
        pass(&mut a, 40, 2_500);
        assert!(a.rate() > 3_800.0, "{}", a.rate());
        // A second at 1,500 a second (a burst to read): still above 3,000.
        pass(&mut a, 15, 1_000);
        assert!(a.rate() > 3_000.0, "{}", a.rate());
        // A lasting drop is followed, within ten seconds.
        pass(&mut a, 15, 10_000);
        assert!(a.rate() < 1_700.0, "{}", a.rate());
    }

    #[test]
    fn an_initiation_its_client_gave_up_on_is_stale() {
        let t = Instant::now();
        let mut a = Admission::new(10, Duration::from_millis(100), 100, t);
        a.push(queued(t));
        a.push(queued(t));
        assert!(!a.pop(t + Duration::from_millis(200)).unwrap().1);
        assert!(a.pop(t + Duration::from_millis(201)).unwrap().1);
        assert!(a.pop(t).is_none());
        // A long bound is capped by the client's patience.
        let mut a = Admission::new(10, Duration::from_millis(500), 100, t);
        a.push(queued(t));
        a.push(queued(t));
        assert!(!a.pop(t + PATIENCE).unwrap().1);
        assert!(a.pop(t + PATIENCE + Duration::from_millis(1)).unwrap().1);
    }
}
