//! What the driver's and the link's virtual-time tests share: a waker that
//! counts, a gateway with a fast wheel, the paused clock moved with the
//! wheel, and a login.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::Wake;
use std::time::Duration;

use crate::config::Config;
use crate::gateway::Gateway;
use crate::wire::pb;

/// A waker that counts its wake-ups.
#[derive(Default)]
pub struct Wakes(pub AtomicUsize);

impl Wake for Wakes {
    fn wake(self: Arc<Self>) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A gateway with a 100 ms wheel tick, its config changed by `f`.
pub fn gateway(f: impl FnOnce(&mut Config)) -> Arc<Gateway> {
    let mut cfg = Config::default();
    cfg.session.timer_tick = Duration::from_millis(100);
    f(&mut cfg);
    Gateway::new(cfg).expect("gateway")
}

/// Moves the paused clock and fires the wheel's due slots.
pub async fn advance(gw: &Gateway, d: Duration) {
    tokio::time::advance(d).await;
    gw.wheel().advance(gw.now());
}

/// The Login of user "ann" on device "phone" (a resume when `resume` is set).
pub fn login_body(resume: Option<pb::Resume>) -> pb::client_frame::Body {
    let token = crate::auth::mint_hs256(
        crate::config::DEV_SECRET,
        "ann",
        Some("phone"),
        Duration::from_secs(3600),
        vec![],
    )
    .expect("mint");
    pb::client_frame::Body::Login(pb::Login {
        token,
        device_id: "phone".into(),
        platform: pb::Platform::Ios as i32,
        protocol_version: 1,
        resume,
    })
}
