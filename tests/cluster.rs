//! Gateways joined by a real (private) nats-server: routing of every push
//! target across nodes, presence, undelivered reports exactly once,
//! multi-login across nodes, events from any node to any subscriber, and
//! a NATS outage that ends by itself.

mod common;

use std::time::{Duration, Instant};

use common::nats::NatsServer;
use common::*;
use tether::wire::pb;

/// A gateway of the cluster `cluster` on `nats`, named `node`.
/// Waits (5 s at most) until `g` holds a detached session: the one whose
/// connection a test just dropped.
async fn kept_detached(g: &TestGateway) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while g.gw.detached_count() == 0 {
        assert!(Instant::now() < deadline, "the session was not kept");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

async fn node(nats: &NatsServer, cluster: &str, node: &str) -> TestGateway {
    node_with(nats, cluster, node, |_| {}).await
}

async fn node_with(
    nats: &NatsServer,
    cluster: &str,
    node: &str,
    f: impl FnOnce(&mut tether::config::Config),
) -> TestGateway {
    let mut cfg = nats.node_config(cluster, node);
    cfg.bus.resume_secret = Some("a cluster-wide resume secret of 32+ bytes".into());
    f(&mut cfg);
    start(cfg).await
}

/// Waits until every node knows every other, synced, and the nodes hold
/// `users` users counted per node (a user on two nodes counts twice), as
/// the directory sees it (routing follows it).
async fn converge(nodes: &[&TestGateway], users: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let ok = nodes.iter().all(|g| {
            let peers = g.gw.cluster().expect("a cluster node").peers();
            let held: usize =
                peers.iter().map(|p| p.users).sum::<usize>() + g.gw.registry().user_count();
            peers.len() == nodes.len() - 1 && peers.iter().all(|p| p.synced) && held == users
        });
        if ok {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the directory did not converge: {:?}",
            nodes
                .iter()
                .map(|g| g.gw.cluster().unwrap().peers())
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until `g` knows of a room with members on another node (room
/// changes reach the others within a second).
async fn wait_room_elsewhere(g: &TestGateway) {
    let deadline = Instant::now() + Duration::from_secs(1);
    while !g.gw.cluster().unwrap().peers().iter().any(|p| p.rooms == 1) {
        assert!(
            Instant::now() < deadline,
            "a room change took over a second to be seen"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn push(target: pb::push_request::Target, payload: &str) -> pb::PushRequest {
    pb::PushRequest {
        target: Some(target),
        payload: payload.as_bytes().to_vec().into(),
        report_undelivered: true,
        ..Default::default()
    }
}

async fn got(c: &mut tether::client::Client, payload: &str) {
    let p = push_within(c, Duration::from_secs(5), payload).await;
    assert_eq!(&p.payload[..], payload.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_reach_sessions_on_every_node_once_per_node() {
    let nats = NatsServer::start();
    let a = node(&nats, "route", "a").await;
    let b = node(&nats, "route", "b").await;
    let c = node(&nats, "route", "c").await;
    let (mut ann_a, _) = a.login_rooms("ann", "phone", &["lobby"]).await;
    let (mut bob_b, _) = b.login_rooms("bob", "phone", &["lobby"]).await;
    let (mut cat_c, _) = c.login("cat", "phone").await;
    let (mut cat_c2, _) = c.login("cat", "tablet").await;
    converge(&[&a, &b, &c], 3).await;
    let (up, mut events) = a.upstream(true).await;
    // Room members added through a, on a and b.
    assert_eq!(up.room("lobby", &["ann", "bob"], false).await.unwrap(), 2);
    wait_room_elsewhere(&a).await;

    // A user on another node.
    use pb::push_request::Target as T;
    let r = up
        .push(push(T::UserId("bob".into()), "to bob"))
        .await
        .unwrap();
    assert_eq!(r.sessions, 1);
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    got(&mut bob_b, "to bob").await;

    // One device of a user elsewhere.
    let dev = T::Device(pb::DeviceTarget {
        user_id: "cat".into(),
        device_id: "tablet".into(),
    });
    let r = up.push(push(dev, "to tablet")).await.unwrap();
    assert_eq!(r.sessions, 1);
    got(&mut cat_c2, "to tablet").await;

    // A list across three nodes, with one user nowhere.
    let list = T::Users(pb::UserList {
        user_ids: vec!["ann".into(), "bob".into(), "cat".into(), "nobody".into()],
    });
    let r = up.push(push(list, "to list")).await.unwrap();
    assert_eq!(r.sessions, 4, "ann, bob and cat's two devices");
    got(&mut ann_a, "to list").await;
    got(&mut bob_b, "to list").await;
    got(&mut cat_c, "to list").await;
    got(&mut cat_c2, "to list").await;
    // Exactly one undelivered report, for the user no node has.
    let undelivered: Vec<_> = drain_events(&mut events, Duration::from_millis(500))
        .await
        .into_iter()
        .filter_map(|e| match e {
            pb::event::Kind::Undelivered(u) => Some(u.user_id),
            _ => None,
        })
        .collect();
    assert_eq!(undelivered, ["nobody"]);

    // A room with members on a and b only.
    let r = up.push_room("lobby", "to lobby").await.unwrap();
    assert_eq!(r.sessions, 2);
    got(&mut ann_a, "to lobby").await;
    got(&mut bob_b, "to lobby").await;

    // Everyone.
    let r = up.push(push(T::Everyone(true), "to all")).await.unwrap();
    assert_eq!(r.sessions, 4);
    for cl in [&mut ann_a, &mut bob_b, &mut cat_c, &mut cat_c2] {
        got(cl, "to all").await;
    }
    let scrape = |g: &TestGateway| g.gw.cluster().unwrap().peers().len();
    assert_eq!(scrape(&a), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presence_kicks_and_rooms_act_cluster_wide() {
    let nats = NatsServer::start();
    let a = node(&nats, "ops", "a").await;
    let b = node(&nats, "ops", "b").await;
    let (_ann_a, _) = a.login("ann", "phone").await;
    let (mut ann_b, _) = b.login("ann", "laptop").await;
    converge(&[&a, &b], 2).await;
    let (up, _) = a.upstream(false).await;

    let p = up.presence(&["ann", "zed"]).await.unwrap();
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].user_id, "ann");
    let mut nodes: Vec<_> = p[0]
        .devices
        .iter()
        .map(|d| (d.device_id.clone(), d.node_id.clone()))
        .collect();
    nodes.sort();
    assert_eq!(
        nodes,
        [("laptop".into(), "b".into()), ("phone".into(), "a".into())]
    );
    assert!(p[1].devices.is_empty());

    // A room change on b's session, asked of a.
    assert_eq!(up.room("news", &["ann"], false).await.unwrap(), 2);
    wait_room_elsewhere(&a).await;
    let r = up.push_room("news", "news").await.unwrap();
    assert_eq!(r.sessions, 2);
    got(&mut ann_b, "news").await;

    // A kick of the laptop, asked of a, ends it on b.
    assert_eq!(up.kick("ann", "laptop", "bye").await.unwrap(), 1);
    assert_eq!(expect_closed(&mut ann_b).await, pb::Code::Kicked);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_on_another_node_replaces_the_device_there() {
    let nats = NatsServer::start();
    let a = node(&nats, "multi", "a").await;
    let b = node(&nats, "multi", "b").await;
    let (mut old, _) = a.login("ann", "phone").await;
    let (_other, _) = a.login("ann", "tablet").await;
    converge(&[&a, &b], 1).await;
    let (_new, _) = b.login("ann", "phone").await;
    assert_eq!(expect_closed(&mut old).await, pb::Code::Replaced);
    drop(old);
    // The other device of the user stays (per_device).
    a.wait_sessions(1).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(a.attached(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_reach_subscribers_on_any_node_and_groups_share_them() {
    let nats = NatsServer::start();
    let a = node(&nats, "events", "a").await;
    let b = node(&nats, "events", "b").await;
    // One ungrouped subscriber on a; a group with one member on each node.
    let (_solo, mut solo) = a.upstream(true).await;
    async fn group(
        g: &TestGateway,
    ) -> (
        tether::upstream::UpstreamClient,
        tether::upstream::EventStream,
    ) {
        let ep = tether::upstream::Endpoint::Tcp(g.upstream.to_string());
        let opts = tether::upstream::UpstreamOptions {
            subscribe: true,
            group: "logic".into(),
            ..Default::default()
        };
        tether::upstream::UpstreamClient::connect(&ep, opts)
            .await
            .unwrap()
    }
    let (_g1, mut g1) = group(&a).await;
    let (_g2, mut g2) = group(&b).await;
    let (mut dev, _) = b.login("ann", "phone").await;
    converge(&[&a, &b], 1).await;
    // Subscriptions are announced with the heartbeat: let it pass.
    tokio::time::sleep(Duration::from_millis(500)).await;
    drain_events(&mut solo, Duration::from_millis(100)).await;
    drain_events(&mut g1, Duration::from_millis(100)).await;
    drain_events(&mut g2, Duration::from_millis(100)).await;

    const N: usize = 20;
    for i in 0..N {
        let rid = dev
            .send_up(&format!("m{i}"), "chat", format!("hello {i}").into_bytes())
            .await
            .expect("send");
        let f = next(&mut dev).await;
        assert_eq!(f.request_id, rid);
        match f.body {
            Some(pb::server_frame::Body::SendAck(a)) => {
                assert_eq!(a.code, pb::Code::Ok as i32, "an upstream took the uplink")
            }
            other => panic!("expected a SendAck, got {other:?}"),
        }
    }
    let uplinks = |evs: Vec<pb::event::Kind>| {
        evs.into_iter()
            .filter(|e| matches!(e, pb::event::Kind::Uplink(_)))
            .count()
    };
    let s = uplinks(drain_events(&mut solo, Duration::from_secs(1)).await);
    let n1 = uplinks(drain_events(&mut g1, Duration::from_millis(300)).await);
    let n2 = uplinks(drain_events(&mut g2, Duration::from_millis(300)).await);
    assert_eq!(
        s, N,
        "the ungrouped subscriber on the other node gets every uplink"
    );
    assert_eq!(n1 + n2, N, "the group gets each uplink once, cluster-wide");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_nats_outage_fails_remote_requests_at_once_and_heals_by_itself() {
    let mut nats = NatsServer::start();
    let a = node(&nats, "outage", "a").await;
    let b = node(&nats, "outage", "b").await;
    let (mut ann_a, _) = a.login("ann", "phone").await;
    let (mut bob_b, _) = b.login("bob", "phone").await;
    converge(&[&a, &b], 2).await;
    let (up, _) = a.upstream(false).await;
    use pb::push_request::Target as T;
    // One remote request first: the NATS client makes its reply
    // subscription at its first request.
    let r = up
        .push(push(T::UserId("bob".into()), "before"))
        .await
        .unwrap();
    assert_eq!(r.sessions, 1);
    got(&mut bob_b, "before").await;
    let subs_before = nats.subscriptions();
    assert!(subs_before > 0);

    nats.kill();
    // The node notices the lost connection within a moment.
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.gw.cluster().unwrap().is_connected() {
        assert!(
            Instant::now() < deadline,
            "the lost connection went unnoticed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A local push still works; a remote one fails at once, with a code.
    let r = up
        .push(push(T::UserId("ann".into()), "local"))
        .await
        .unwrap();
    assert_eq!(r.sessions, 1);
    got(&mut ann_a, "local").await;
    let t = Instant::now();
    let r = up
        .push(push(T::UserId("bob".into()), "lost"))
        .await
        .unwrap();
    assert!(
        t.elapsed() < Duration::from_millis(400),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(r.sessions, 0);
    assert_eq!(r.failed.len(), 1, "{r:?}");
    assert_eq!(r.failed[0].node_id, "b");
    assert_eq!(r.failed[0].code, pb::Code::NodeUnreachable as i32);

    nats.restart();
    // Both reconnect and resync by themselves.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = up
            .push(push(T::UserId("bob".into()), "back"))
            .await
            .unwrap();
        if r.sessions == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "no recovery: {r:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    got(&mut bob_b, "back").await;
    assert!(a.gw.cluster().unwrap().is_connected());
    // Every subscription came back once: none leaked, none doubled.
    let deadline = Instant::now() + Duration::from_secs(5);
    while nats.subscriptions() != subs_before {
        assert!(
            Instant::now() < deadline,
            "{} subscriptions after the outage, {subs_before} before",
            nats.subscriptions()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A `PushBatch` of unicasts to users on another node crosses a wave at
/// a time (consecutive pushes to distinct users together), not as a round
/// trip per push; and each device still gets its pushes in the batch's
/// order. 20 users on b, 5 pushes each, interleaved: 100 pushes in 5
/// waves. One round trip per push would be at least 200 NATS messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_batch_crosses_in_waves_and_keeps_each_devices_order() {
    let nats = NatsServer::start();
    let a = node(&nats, "waves", "a").await;
    let b = node(&nats, "waves", "b").await;
    let mut devices = Vec::new();
    for i in 0..20 {
        devices.push(b.login(&format!("u{i}"), "phone").await.0);
    }
    converge(&[&a, &b], 20).await;
    let (up, _) = a.upstream(false).await;
    use pb::push_request::Target as T;
    let pushes: Vec<pb::PushRequest> = (0..5)
        .flat_map(|k| (0..20).map(move |i| push(T::UserId(format!("u{i}")), &format!("{i}-{k}"))))
        .collect();
    let before = nats.messages_in();
    let replies = up.push_batch(pushes).await.unwrap();
    let used = nats.messages_in() - before;
    assert_eq!(replies.len(), 100);
    for (n, r) in replies.iter().enumerate() {
        let r = r.as_ref().unwrap_or_else(|e| panic!("push {n}: {e}"));
        assert_eq!(r.sessions, 1, "push {n}: {r:?}");
        assert!(r.failed.is_empty(), "push {n}: {r:?}");
    }
    // 5 requests and 5 replies, and the nodes' heartbeats meanwhile.
    assert!(used < 60, "{used} NATS messages for 100 pushes in 5 waves");
    for (i, d) in devices.iter_mut().enumerate() {
        for k in 0..5 {
            got(d, &format!("{i}-{k}")).await;
        }
    }
}

/// Pushes `n` numbered payloads to `user` through `up`, from `from`.
async fn push_n(up: &tether::upstream::UpstreamClient, user: &str, from: usize, n: usize) {
    use pb::push_request::Target as T;
    for i in from..from + n {
        let r = up
            .push(push(T::UserId(user.into()), &format!("p{i}")))
            .await
            .unwrap();
        assert_eq!(r.sessions, 1, "p{i}: {r:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_resumes_on_another_node_with_exactly_what_it_missed() {
    let nats = NatsServer::start();
    let a = node(&nats, "resume", "a").await;
    let b = node(&nats, "resume", "b").await;
    let (mut phone, ok) = a.login("ann", "phone").await;
    converge(&[&a, &b], 1).await;
    let (up, _) = b.upstream(false).await;
    push_n(&up, "ann", 1, 3).await;
    for i in 1..=3 {
        got(&mut phone, &format!("p{i}")).await;
    }
    // The phone drops off (no Close): a keeps the session for a resume,
    // and queues what comes meanwhile.
    drop(phone);
    kept_detached(&a).await;
    push_n(&up, "ann", 4, 3).await;

    // It comes back on b, having seen up to seq 3.
    let mut phone = b.client().await;
    let ok2 = phone
        .login_with(resume_login("ann", "phone", &ok, 3, 0))
        .await
        .expect("login");
    let res = ok2.resume.expect("a resume result");
    assert_eq!(res.code, pb::Code::Ok as i32, "{res:?}");
    assert_eq!(ok2.session_id, ok.session_id, "the same session");
    assert_eq!(res.replayed, 3);
    for i in 4..=6 {
        let p = push_within(&mut phone, Duration::from_secs(5), "replay").await;
        assert_eq!(&p.payload[..], format!("p{i}").as_bytes());
        assert_eq!(p.seq, i as u64, "seqs continue across nodes");
    }
    // The session left a; new pushes find it on b.
    assert_eq!(a.gw.registry().len(), 0);
    converge(&[&a, &b], 1).await;
    push_n(&up, "ann", 7, 1).await;
    let p = push_within(&mut phone, Duration::from_secs(5), "p7").await;
    assert_eq!((&p.payload[..], p.seq), (&b"p7"[..], 7));
    expect_silence(&mut phone, Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_on_another_node_reports_the_gap_or_the_end_never_silence() {
    let nats = NatsServer::start();
    // a keeps little for a detached session: most of what comes is evicted.
    let a = node_with(&nats, "gap", "a", |c| {
        c.delivery.detached_bytes = 4096;
        c.shutdown.drain_timeout = Duration::from_millis(500);
    })
    .await;
    let b = node(&nats, "gap", "b").await;
    let (phone, ok) = a.login("ann", "phone").await;
    let (_laptop, ok_laptop) = a.login("bob", "laptop").await;
    converge(&[&a, &b], 2).await;
    let (up, _) = b.upstream(false).await;
    drop(phone);
    kept_detached(&a).await;
    use pb::push_request::Target as T;
    for i in 0..20 {
        let mut p = push(T::UserId("ann".into()), "");
        p.payload = vec![b'x'; 1000].into();
        p.message_id = format!("big{i}");
        up.push(p).await.unwrap();
    }
    let mut phone = b.client().await;
    let ok2 = phone
        .login_with(resume_login("ann", "phone", &ok, 0, 0))
        .await
        .expect("login");
    let res = ok2.resume.expect("a resume result");
    assert_eq!(res.code, pb::Code::ResumeGap as i32, "{res:?}");
    assert!(res.first_seq > 1, "the oldest were evicted: {res:?}");

    // A session whose node is gone: an explicit new session.
    a.stop.cancel();
    let _ = a.done.await;
    let mut laptop = b.client().await;
    let ok3 = laptop
        .login_with(resume_login("bob", "laptop", &ok_laptop, 0, 0))
        .await
        .expect("login");
    let res = ok3.resume.expect("a resume result");
    assert_eq!(res.code, pb::Code::ResumeExpired as i32, "{res:?}");
    assert_ne!(ok3.session_id, ok_laptop.session_id);
}

/// Asks node `node` of `cluster` to run `cmd`, as another node would, and
/// returns its push outcome.
async fn ask_node(
    nats: &NatsServer,
    cluster: &str,
    node: &str,
    cmd: pb::node_command::Cmd,
) -> pb::NodePushOutcome {
    match ask_node_until(nats, cluster, node, cmd, 0).await.outcome {
        Some(pb::node_outcome::Outcome::Push(o)) => o,
        o => panic!("not a push outcome: {o:?}"),
    }
}

/// As [`ask_node`], with the request's deadline `not_after_ms` (ms since
/// the Unix epoch; 0: none); the whole answer.
async fn ask_node_until(
    nats: &NatsServer,
    cluster: &str,
    node: &str,
    cmd: pb::node_command::Cmd,
    not_after_ms: u64,
) -> pb::NodeOutcome {
    use prost::Message as _;
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let req = pb::NodeCommand {
        cmd: Some(cmd),
        not_after_ms,
    };
    let msg = client
        .request(
            format!("{cluster}.node.{node}.cmd"),
            req.encode_to_vec().into(),
        )
        .await
        .expect("an answer");
    pb::NodeOutcome::decode(msg.payload).expect("an outcome")
}

/// A push that reaches a node after its request's deadline (plus 1 s for
/// the clocks) is not run there: the node that asked has given up on it
/// and told the upstream. One before its deadline runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_past_its_requests_deadline_is_not_run() {
    let nats = NatsServer::start();
    let a = node(&nats, "deadline", "a").await;
    let (mut bob, _) = a.login("bob", "phone").await;
    let now = tether::unix_ms();
    let push_to_bob = |payload: &str| {
        let shared = tether::wire::SharedPush::new(payload, payload.as_bytes(), "", "");
        pb::node_command::Cmd::Push(pb::NodePush {
            user_ids: vec!["bob".into()],
            body: shared.body.clone(),
            ..Default::default()
        })
    };
    let late = ask_node_until(&nats, "deadline", "a", push_to_bob("late"), now - 1_500).await;
    assert_eq!(late.code, pb::Code::BadRequest as i32, "{late:?}");
    assert!(late.message.contains("deadline"), "{late:?}");
    assert!(late.outcome.is_none(), "not run: {late:?}");
    let on_time = ask_node_until(&nats, "deadline", "a", push_to_bob("on time"), now + 5_000).await;
    let Some(pb::node_outcome::Outcome::Push(o)) = on_time.outcome else {
        panic!("{on_time:?}")
    };
    assert_eq!(o.sessions, 1);
    // Only the one on time arrives.
    let p = push_within(&mut bob, Duration::from_secs(5), "on time").await;
    assert_eq!(&p.payload[..], b"on time", "the late one came");
    assert_eq!(p.seq, 1, "the late one took no seq");
}

/// A push sent on to a device whose session this node is still fetching
/// (the device resumed here; its old node sent the push after it) waits
/// for that fetch, until a quarter of `bus.request_timeout` before the
/// push's deadline, and then finds the session: under a drain's load a
/// fetch can take seconds, and the push would otherwise be reported
/// undelivered while the device is on its way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_to_a_device_being_fetched_waits_for_the_fetch() {
    let nats = NatsServer::start();
    let b = node(&nats, "fetching", "b").await;
    let quarter = b.gw.config().bus.request_timeout / 4;
    let bus = b.gw.cluster().expect("a cluster node").clone();
    // b answers commands (its command link has subscribed): a push to
    // nobody.
    let nobody = pb::node_command::Cmd::Push(pb::NodePush {
        user_ids: vec!["nobody".into()],
        ..Default::default()
    });
    let probe = {
        use prost::Message as _;
        pb::NodeCommand {
            cmd: Some(nobody),
            not_after_ms: 0,
        }
        .encode_to_vec()
    };
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let t0 = Instant::now();
    while client
        .request("fetching.node.b.cmd", probe.clone().into())
        .await
        .is_err()
    {
        assert!(t0.elapsed() < Duration::from_secs(10), "b never answers");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // b starts fetching ann's phone, as a resume does.
    let fetch = bus.begin_take(
        &tether::ids::UserId::new("ann"),
        &tether::ids::DeviceId::new("phone"),
    );
    let body = tether::wire::SharedPush::new("sent-on", b"sent on", "", "")
        .body
        .clone();
    let to_phone = pb::node_command::Cmd::Push(pb::NodePush {
        user_ids: vec!["ann".into()],
        device_id: "phone".into(),
        body,
        ..Default::default()
    });
    let deadline = tether::unix_ms() + 8 * quarter.as_millis() as u64;
    let mut asked = std::pin::pin!(ask_node_until(&nats, "fetching", "b", to_phone, deadline));
    // The fetch takes twice as long as a push used to wait for one.
    tokio::select! {
        o = &mut asked => panic!("the push did not wait for the fetch: {o:?}"),
        () = tokio::time::sleep(quarter * 2) => {}
    }
    // The session is in place (a login stands in for the fetched state),
    // and the fetch ends.
    let (mut phone, _) = b.login("ann", "phone").await;
    drop(fetch);
    let outcome = asked.await;
    let Some(pb::node_outcome::Outcome::Push(o)) = outcome.outcome else {
        panic!("{outcome:?}")
    };
    assert_eq!(o.sessions, 1, "{o:?}");
    assert!(o.missing_users.is_empty(), "{o:?}");
    let p = push_within(&mut phone, Duration::from_secs(5), "the push").await;
    assert_eq!(&p.payload[..], b"sent on");
}

/// The race a rolling restart showed (one broadcast in about a thousand
/// missed one session): a broadcast reaches the node a session moves to
/// before the session does, and the node it left after it left. The old
/// node must name the session as moved, so that the push is sent on; the
/// new node queues the copy only if the session lacks it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broadcast_that_reaches_the_old_node_after_a_move_is_sent_on_once() {
    let nats = NatsServer::start();
    let a = node(&nats, "late", "a").await;
    let b = node(&nats, "late", "b").await;
    let (phone, ok) = a.login("ann", "phone").await;
    converge(&[&a, &b], 1).await;
    let (up_a, _) = a.upstream(false).await;
    assert_eq!(up_a.room("news", &["ann"], false).await.unwrap(), 1);
    drop(phone);
    kept_detached(&a).await;
    let mut phone = b.client().await;
    let ok2 = phone
        .login_with(resume_login("ann", "phone", &ok, 0, 0))
        .await
        .expect("login");
    assert_eq!(ok2.resume.expect("resumed").code, pb::Code::Ok as i32);

    // A broadcast, and a push to ann's room, reaching a only now: a names
    // the session and where it went. A push to another room does not.
    let body = tether::wire::SharedPush::new("late-1", b"late", "", "")
        .body
        .clone();
    let push = |everyone: bool, room: &str| {
        pb::node_command::Cmd::Push(pb::NodePush {
            body: body.clone(),
            everyone,
            room: room.into(),
            ..Default::default()
        })
    };
    let moved = |o: &pb::NodePushOutcome| {
        o.moved
            .iter()
            .map(|m| (m.user_id.clone(), m.device_id.clone(), m.node_id.clone()))
            .collect::<Vec<_>>()
    };
    let went = vec![("ann".to_string(), "phone".to_string(), "b".to_string())];
    let o = ask_node(&nats, "late", "a", push(true, "")).await;
    assert_eq!((o.sessions, moved(&o)), (0, went.clone()), "{o:?}");
    let o = ask_node(&nats, "late", "a", push(false, "news")).await;
    assert_eq!((o.sessions, moved(&o)), (0, went), "{o:?}");
    let o = ask_node(&nats, "late", "a", push(false, "sports")).await;
    assert_eq!(moved(&o), Vec::new(), "{o:?}");

    // Through a's upstream, a broadcast reaches ann on b directly and is
    // sent on by a as well: she gets it once.
    converge(&[&a, &b], 1).await;
    let r = up_a.push(push_to_everyone("all-1")).await.expect("push");
    assert_eq!(r.sessions, 1, "{r:?}");
    got(&mut phone, "all-1").await;
    expect_silence(&mut phone, Duration::from_millis(500)).await;
}

/// A take whose answer came too late: node b asked node a for a
/// session, a took it and answered, and b had given up by then (a drain's
/// thousands of takes at once made answers late, and 4 in 10 resumes of a
/// 100,000-device rolling restart came back `CODE_RESUME_EXPIRED`). When
/// b asks again, a answers with the same state; the device resumes with
/// every push it missed, where it used to find its session gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_take_answered_too_late_is_answered_again_and_loses_nothing() {
    use prost::Message as _;
    let nats = NatsServer::start();
    let a = node(&nats, "late-take", "a").await;
    let b = node(&nats, "late-take", "b").await;
    let (phone, ok) = a.login("ann", "phone").await;
    converge(&[&a, &b], 1).await;
    drop(phone);
    kept_detached(&a).await;
    let (up_a, _) = a.upstream(false).await;
    for i in 0..3 {
        let r = up_a
            .push(push(
                pb::push_request::Target::UserId("ann".into()),
                &format!("missed-{i}"),
            ))
            .await
            .expect("push");
        assert_eq!(r.sessions, 1, "{r:?}");
    }
    // b's first take, whose answer b never reads.
    let client = async_nats::connect(nats.url()).await.expect("nats");
    let take = pb::TakeRequest {
        session_id: ok.session_id,
        user_id: "ann".into(),
        device_id: "phone".into(),
        from_node: "b".into(),
    };
    let first = client
        .request("late-take.node.a.take", take.encode_to_vec().into())
        .await
        .expect("a answers the take");
    let chunk = pb::SessionChunk::decode(first.payload).expect("a chunk");
    assert_eq!(chunk.code, pb::Code::Ok as i32, "a took the session");
    assert_eq!(a.gw.detached_count(), 0, "a no longer holds it");

    // The device resumes on b: b's take gets the same state again.
    let mut phone = b.client().await;
    let ok2 = phone
        .login_with(resume_login("ann", "phone", &ok, 0, 0))
        .await
        .expect("login");
    let resumed = ok2.resume.expect("a resume answer");
    assert_eq!(resumed.code, pb::Code::Ok as i32, "{resumed:?}");
    for i in 0..3 {
        got(&mut phone, &format!("missed-{i}")).await;
    }
    expect_silence(&mut phone, Duration::from_millis(300)).await;
}

fn push_to_everyone(payload: &str) -> pb::PushRequest {
    push(pb::push_request::Target::Everyone(true), payload)
}

/// One device through a rolling restart: reads pushes and acknowledges
/// them; on `SERVER_DRAINING` (or a lost connection) it resumes on another
/// live node. Returns the payloads it got, in order.
async fn roaming_device(
    user: String,
    live: std::sync::Arc<parking_lot::Mutex<Vec<std::net::SocketAddr>>>,
    stop: tokio_util::sync::CancellationToken,
) -> (Vec<String>, usize) {
    let pick = |n: usize| {
        let l = live.lock();
        l[n % l.len()]
    };
    let mut c = tether::client::Client::connect_tcp(pick(user.len()))
        .await
        .unwrap();
    let mut ok = c
        .login(&token(&user, "phone"), "phone")
        .await
        .expect("login");
    let (mut got, mut last, mut resumes) = (Vec::new(), 0u64, 0usize);
    let mut attempt = 0;
    loop {
        let f = tokio::select! {
            () = stop.cancelled() => return (got, resumes),
            f = c.recv() => f,
        };
        let moved = match f {
            Ok(Some(f)) => match f.body {
                Some(pb::server_frame::Body::Push(p)) => {
                    if p.seq > last {
                        last = p.seq;
                        got.push(String::from_utf8_lossy(&p.payload).into_owned());
                    }
                    let _ = c.ack(p.seq).await;
                    false
                }
                Some(pb::server_frame::Body::Close(_)) => true,
                _ => false,
            },
            _ => true,
        };
        if !moved {
            continue;
        }
        // Resume elsewhere; a node that is itself draining refuses: next.
        loop {
            attempt += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
            let Ok(mut n) = tether::client::Client::connect_tcp(pick(attempt)).await else {
                continue;
            };
            if let Ok(o) = n
                .login_with(resume_login(&user, "phone", &ok, last, 0))
                .await
            {
                let r = o.resume.expect("a resume result");
                assert_eq!(r.code, pb::Code::Ok as i32, "{user}: {r:?}");
                ok = o;
                c = n;
                resumes += 1;
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_under_load_loses_and_duplicates_nothing() {
    let nats = NatsServer::start();
    let drain = |c: &mut tether::config::Config| {
        c.shutdown.drain_timeout = Duration::from_secs(5);
        c.shutdown.reconnect_after = Duration::from_millis(10);
    };
    let mut a = node_with(&nats, "roll", "a", drain).await;
    let mut b = node_with(&nats, "roll", "b", drain).await;
    let c = node_with(&nats, "roll", "c", drain).await;
    let live = std::sync::Arc::new(parking_lot::Mutex::new(vec![a.tcp, b.tcp, c.tcp]));
    let stop = tokio_util::sync::CancellationToken::new();
    const USERS: usize = 24;
    let devices: Vec<_> = (0..USERS)
        .map(|i| {
            tokio::spawn(roaming_device(
                format!("user{i}"),
                live.clone(),
                stop.clone(),
            ))
        })
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while [&a, &b, &c]
        .iter()
        .map(|g| g.gw.registry().len())
        .sum::<usize>()
        < USERS
    {
        assert!(Instant::now() < deadline, "devices did not log in");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    converge(&[&a, &b, &c], USERS).await;

    // Steady pushes through c's upstream while a, then b, restart.
    let (up, _) = c.upstream(false).await;
    let pushing = stop.child_token();
    let pusher = {
        let pushing = pushing.clone();
        tokio::spawn(async move {
            use pb::push_request::Target as T;
            let mut sent: Vec<Vec<String>> = vec![Vec::new(); USERS];
            let mut undelivered = 0;
            let mut n = 0usize;
            while !pushing.is_cancelled() {
                if n % 10 == 9 {
                    // Every tenth push goes to everyone.
                    let body = format!("all-{n}");
                    let r = up.push(push(T::Everyone(true), &body)).await.expect("push");
                    if r.sessions as usize != USERS {
                        eprintln!("broadcast {body} reached {} of {USERS}: {r:?}", r.sessions);
                    }
                    sent.iter_mut().for_each(|s| s.push(body.clone()));
                    n += 1;
                    continue;
                }
                let u = n % USERS;
                let body = format!("user{u}-{n}");
                let r = up
                    .push(push(T::UserId(format!("user{u}")), &body))
                    .await
                    .expect("push");
                if r.sessions == 1 {
                    sent[u].push(body);
                } else {
                    eprintln!("undelivered {body}: {r:?}");
                    undelivered += 1;
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            (sent, undelivered)
        })
    };
    for g in [&mut a, &mut b] {
        tokio::time::sleep(Duration::from_millis(300)).await;
        live.lock().retain(|x| *x != g.tcp);
        g.stop.cancel();
        (&mut g.done).await.unwrap().unwrap();
        // The same node comes back (new ports) and rejoins.
        let name = g.gw.node_id().to_string();
        *g = node_with(&nats, "roll", &name, drain).await;
        live.lock().push(g.tcp);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    pushing.cancel();
    let (sent, undelivered) = pusher.await.unwrap();
    // Let the last pushes arrive.
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.cancel();
    let (mut lost, mut dup, mut total, mut resumes) = (0, 0, 0, 0);
    for (u, d) in devices.into_iter().enumerate() {
        let (got, r) = d.await.unwrap();
        resumes += r;
        total += sent[u].len();
        let mut seen = std::collections::HashSet::new();
        for p in &got {
            if !seen.insert(p) {
                dup += 1;
            }
        }
        lost += sent[u].iter().filter(|p| !seen.contains(p)).count();
    }
    eprintln!(
        "rolling restart: {total} pushes, {resumes} resumes, {lost} lost, {dup} duplicated, {undelivered} undelivered"
    );
    assert!(resumes > 0, "devices moved");
    assert_eq!(undelivered, 0, "every push found its session somewhere");
    assert_eq!(lost, 0);
    assert_eq!(dup, 0);
}
