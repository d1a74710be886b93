//! The write delay (`session.write_delay`): sessions woken by pushes are
//! woken in batches instead of one by one. It lives with the session because
//! a session handle defers its waker to it; the router hands it each push's
//! recipients, and the gateway's ticker flushes it.

use std::sync::Arc;

/// A write delay: sessions woken by pushes are woken in batches, every
/// `delay`, so that pushes arriving in between go out in one write. Trades a
/// little latency for far fewer writes when a moderate rate of broadcasts
/// reaches many sessions (each push alone would cost one write per session).
pub struct WriteDelay {
    delay: std::time::Duration,
    wakers: parking_lot::Mutex<Vec<std::task::Waker>>,
}

impl WriteDelay {
    pub fn new(delay: std::time::Duration) -> Arc<Self> {
        Arc::new(Self {
            delay,
            wakers: parking_lot::Mutex::new(Vec::new()),
        })
    }

    /// Wakes `w` at the next flush.
    pub fn defer(&self, w: std::task::Waker) {
        self.wakers.lock().push(w);
    }

    /// Wakes every deferred session; returns how many.
    pub fn flush(&self) -> usize {
        let batch = std::mem::take(&mut *self.wakers.lock());
        let n = batch.len();
        batch.into_iter().for_each(std::task::Waker::wake);
        n
    }

    pub fn delay(&self) -> std::time::Duration {
        self.delay
    }
}
