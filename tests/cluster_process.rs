//! A node of a cluster killed with SIGKILL (the real binary, so nothing of
//! it runs on the way out): the others notice within bus.node_timeout plus
//! a heartbeat, report its users' pushes as undelivered (with
//! CODE_NODE_UNREACHABLE while it is being noticed, CODE_NOT_LOGGED_IN
//! after), and its devices that come back elsewhere get
//! CODE_RESUME_EXPIRED: an explicit new session, never silence.

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::nats::NatsServer;
use common::*;
use tether::wire::pb;

mod common;

const SECRET: &str = "a cluster-wide resume secret of 32+ bytes";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_node_is_noticed_its_users_reported_and_its_devices_told() {
    let nats = NatsServer::start();
    // The node that will die: the real binary.
    let dir = tempfile::tempdir().unwrap();
    let tcp = free_port();
    let cfg = dir.path().join("doomed.toml");
    std::fs::write(
        &cfg,
        format!(
            "node_id = \"doomed\"\n\n[listen]\ntcp = [\"127.0.0.1:{tcp}\"]\ntls = []\nquic = []\n\n\
             [upstream]\ntcp = \"127.0.0.1:0\"\n\n[metrics]\nlisten = \"\"\n\n\
             [bus]\nkind = \"nats\"\nurls = [\"{}\"]\ncluster = \"death\"\nheartbeat = \"200ms\"\n\
             node_timeout = \"1s\"\nrequest_timeout = \"500ms\"\nresume_secret = \"{SECRET}\"\n",
            nats.url()
        ),
    )
    .unwrap();
    let mut child = serve_binary(dir.path(), &cfg, Stdio::null());
    // The node that lives, in process.
    let mut c = nats.node_config("death", "alive");
    c.bus.resume_secret = Some(SECRET.into());
    let alive = start(c).await;

    let mut phone = connect_when_up(tcp).await;
    let ok = phone.login(&token("ann", "phone"), "phone").await.unwrap();
    let (up, mut events) = alive.upstream(true).await;
    use pb::push_request::Target as T;
    let push = |p: &str| pb::PushRequest {
        target: Some(T::UserId("ann".into())),
        payload: p.as_bytes().to_vec().into(),
        report_undelivered: true,
        ..Default::default()
    };
    // The cluster works: a push from the live node reaches ann.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if up.push(push("hello")).await.unwrap().sessions == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the cluster did not form");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(&push_of(&next(&mut phone).await).payload[..], b"hello");
    drain_events(&mut events, Duration::from_millis(200)).await;

    // kill -9.
    child.kill().unwrap();
    child.wait().unwrap();
    let killed = Instant::now();

    // Until it is noticed, pushes say which node failed; then it is gone
    // from the directory and ann is simply not logged in. Each push gets
    // exactly one undelivered report either way.
    let mut codes = Vec::new();
    loop {
        let r = up.push(push("after")).await.unwrap();
        assert_eq!(r.sessions, 0);
        let ev = wait_event(&mut events, Duration::from_secs(2), |e| match e {
            pb::event::Kind::Undelivered(u) => Some(u.code),
            _ => None,
        })
        .await;
        codes.push(ev);
        if r.failed.is_empty() {
            assert_eq!(ev, pb::Code::NotLoggedIn as i32);
            break;
        }
        assert_eq!(r.failed[0].node_id, "doomed");
        assert_eq!(ev, pb::Code::NodeUnreachable as i32, "{r:?}");
        assert!(
            killed.elapsed() < Duration::from_secs(10),
            "not noticed in 10 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let noticed = killed.elapsed();
    eprintln!(
        "a killed node was noticed after {noticed:?} ({} pushes in between)",
        codes.len() - 1
    );
    // node_timeout (1 s) plus a heartbeat and the sweep's own period.
    assert!(noticed <= Duration::from_millis(2_500), "{noticed:?}");
    let peers = alive.gw.cluster().unwrap().peers();
    assert!(peers.is_empty(), "{peers:?}");
    assert!(
        drain_events(&mut events, Duration::from_millis(200))
            .await
            .iter()
            .all(|e| !matches!(e, pb::event::Kind::Undelivered(_))),
        "one report per push"
    );

    // The device finds its node gone and comes back to the live one.
    let mut phone = alive.client().await;
    let ok2 = phone
        .login_with(resume_login("ann", "phone", &ok, 1, 0))
        .await
        .unwrap();
    let res = ok2.resume.expect("a resume result");
    assert_eq!(res.code, pb::Code::ResumeExpired as i32, "{res:?}");
    assert_ne!(ok2.session_id, ok.session_id, "a new session");
    let r = up.push(push("anew")).await.unwrap();
    assert_eq!(r.sessions, 1);
    assert_eq!(&push_of(&next(&mut phone).await).payload[..], b"anew");
}
