//! The ticker: advances the timer wheel, sweeps detached sessions and sets
//! the resident-memory gauge once a second, and flushes the write delay.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Gateway;

impl Gateway {
    /// Spawns the timer wheel's ticker; it stops with `stop`.
    pub fn spawn_ticker(self: &Arc<Self>, stop: CancellationToken) -> tokio::task::JoinHandle<()> {
        if let Some(wd) = self.write_delay.get().cloned() {
            let stop = stop.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(wd.delay());
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => break,
                        _ = tick.tick() => { wd.flush(); }
                    }
                }
                wd.flush();
            });
        }
        let gw = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(gw.wheel.tick());
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
            let per_sweep =
                (Duration::from_secs(1).as_nanos() / gw.wheel.tick().as_nanos()).max(1) as u64;
            let mut n: u64 = 0;
            loop {
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tick.tick() => {
                        let now = gw.now();
                        gw.wheel.advance(now);
                        n += 1;
                        if n.is_multiple_of(per_sweep) {
                            gw.sweep_detached(now);
                            if let Some(b) = crate::metrics::resident_bytes() {
                                metrics::gauge!(crate::metrics::RESIDENT_MEMORY).set(b as f64);
                            }
                        }
                    }
                }
            }
        })
    }
}
