//! Bounded frame queues between the relay's stages (paper appendix B.1, input/output queue).
//!
//! In real-time mode a queue never blocks its producer: when it is full the OLDEST item is
//! dropped (and counted) so the consumer always finds the newest frame. In every-frame mode
//! (offline conversion) the producer blocks instead and nothing is dropped.

use std::sync::{Arc, Weak};
use std::time::Duration;

use crossbeam_channel::{
    bounded, Receiver, RecvTimeoutError, SendTimeoutError, Sender, TrySendError,
};

/// The producing end.
#[derive(Debug, Clone)]
pub struct Producer<T> {
    tx: Sender<T>,
    /// A receiver clone, used only to evict the oldest item when the queue is full.
    evict: Receiver<T>,
    /// Alive while any [`Consumer`] exists (the evictor keeps the channel itself connected).
    consumer: Weak<()>,
    lossless: bool,
}

/// The consuming end.
#[derive(Debug, Clone)]
pub struct Consumer<T> {
    rx: Receiver<T>,
    _alive: Arc<()>,
}

/// Outcome of a [`Producer::push`].
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Queued; `dropped` older items were evicted to make room.
    Ok { dropped: u64 },
    /// The consumer is gone.
    Closed,
}

/// A queue of `capacity` items. `lossless` makes producers block instead of dropping.
pub fn queue<T>(capacity: usize, lossless: bool) -> (Producer<T>, Consumer<T>) {
    let (tx, rx) = bounded(capacity.max(1));
    let alive = Arc::new(());
    (
        Producer {
            tx,
            evict: rx.clone(),
            consumer: Arc::downgrade(&alive),
            lossless,
        },
        Consumer { rx, _alive: alive },
    )
}

impl<T> Producer<T> {
    /// Queues `item`; in lossy mode evicts the oldest items when full, never blocking.
    pub fn push(&self, mut item: T) -> Pushed {
        if self.lossless {
            // Block while the queue is full, but notice a consumer that went away (our own
            // evictor keeps the channel connected, so `send` alone would wait forever).
            loop {
                match self.tx.send_timeout(item, Duration::from_millis(50)) {
                    Ok(()) => return Pushed::Ok { dropped: 0 },
                    Err(SendTimeoutError::Timeout(back)) if self.consumer.strong_count() > 0 => {
                        item = back
                    }
                    Err(_) => return Pushed::Closed,
                }
            }
        }
        let mut dropped = 0;
        loop {
            if self.consumer.strong_count() == 0 {
                return Pushed::Closed;
            }
            match self.tx.try_send(item) {
                Ok(()) => return Pushed::Ok { dropped },
                Err(TrySendError::Disconnected(_)) => return Pushed::Closed,
                Err(TrySendError::Full(back)) => {
                    item = back;
                    // Only the consumer (and this evictor) receive: if the consumer took it in the
                    // meantime, the retry simply succeeds.
                    if self.evict.try_recv().is_ok() {
                        dropped += 1;
                    }
                }
            }
        }
    }
}

/// What [`Consumer::take_newest`] found.
#[derive(Debug, PartialEq, Eq)]
pub enum Taken<T> {
    /// The newest item, and how many older queued items were skipped for it.
    Item { item: T, skipped: u64 },
    /// Nothing arrived within the timeout.
    Empty,
    /// The producer is gone and the queue is drained.
    Closed,
}

impl<T> Consumer<T> {
    /// Waits up to `timeout` for an item, then returns the NEWEST queued one, skipping older ones.
    pub fn take_newest(&self, timeout: Duration) -> Taken<T> {
        let first = match self.rx.recv_timeout(timeout) {
            Ok(item) => item,
            Err(RecvTimeoutError::Timeout) => return Taken::Empty,
            Err(RecvTimeoutError::Disconnected) => return Taken::Closed,
        };
        let mut item = first;
        let mut skipped = 0;
        while let Ok(newer) = self.rx.try_recv() {
            item = newer;
            skipped += 1;
        }
        Taken::Item { item, skipped }
    }

    /// Non-blocking [`Consumer::take_newest`].
    pub fn try_take_newest(&self) -> Taken<T> {
        self.take_newest(Duration::ZERO)
    }

    /// Waits for the next item in order (every-frame mode). `None` when closed and drained.
    pub fn take_next(&self, timeout: Duration) -> Taken<T> {
        match self.rx.recv_timeout(timeout) {
            Ok(item) => Taken::Item { item, skipped: 0 },
            Err(RecvTimeoutError::Timeout) => Taken::Empty,
            Err(RecvTimeoutError::Disconnected) => Taken::Closed,
        }
    }

    /// The underlying receiver, for `select!`.
    pub fn receiver(&self) -> &Receiver<T> {
        &self.rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_millis(50);

    #[test]
    fn newest_frame_wins_and_drops_are_counted() {
        let (p, c) = queue::<u32>(2, false);
        assert_eq!(p.push(1), Pushed::Ok { dropped: 0 });
        assert_eq!(p.push(2), Pushed::Ok { dropped: 0 });
        // Full: 1 is evicted to make room for 3; never blocks.
        assert_eq!(p.push(3), Pushed::Ok { dropped: 1 });
        assert_eq!(p.push(4), Pushed::Ok { dropped: 1 });
        // The consumer skips 3 and takes 4.
        assert_eq!(
            c.take_newest(T),
            Taken::Item {
                item: 4,
                skipped: 1
            }
        );
        assert_eq!(c.take_newest(T), Taken::Empty);
    }

    #[test]
    fn closed_ends_are_reported() {
        let (p, c) = queue::<u32>(1, false);
        p.push(7);
        drop(p);
        // Queued items are drained before Closed.
        assert_eq!(
            c.take_newest(T),
            Taken::Item {
                item: 7,
                skipped: 0
            }
        );
        assert_eq!(c.take_newest(T), Taken::Closed);
        let (p, c) = queue::<u32>(1, false);
        drop(c);
        p.push(1);
        assert_eq!(p.push(2), Pushed::Closed);
    }

    #[test]
    fn lossless_queue_blocks_instead_of_dropping() {
        let (p, c) = queue::<u32>(1, true);
        let h = std::thread::spawn(move || {
            for i in 0..100 {
                assert_eq!(p.push(i), Pushed::Ok { dropped: 0 });
            }
        });
        let mut got = Vec::new();
        while let Taken::Item { item, skipped } = c.take_next(Duration::from_secs(2)) {
            assert_eq!(skipped, 0);
            got.push(item);
        }
        h.join().unwrap();
        assert_eq!(got, (0..100).collect::<Vec<_>>());
    }

    #[test]
    fn blocked_lossless_producer_sees_a_vanished_consumer() {
        let (p, c) = queue::<u32>(1, true);
        assert_eq!(p.push(1), Pushed::Ok { dropped: 0 });
        let h = std::thread::spawn(move || p.push(2));
        std::thread::sleep(Duration::from_millis(100));
        drop(c);
        assert_eq!(h.join().unwrap(), Pushed::Closed);
    }
}
