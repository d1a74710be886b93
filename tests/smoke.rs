mod common;
use common::*;

#[tokio::test]
async fn login_and_push_to_user() {
    let g = start(test_config()).await;
    let (mut a, ok) = g.login("alice", "phone").await;
    assert_eq!(ok.user_id, "alice");
    let (up, _) = g.upstream(false).await;
    let r = up.push_user("alice", "hello").await.unwrap();
    assert_eq!(r.sessions, 1);
    let f = next(&mut a).await;
    let p = push_of(&f);
    assert_eq!(&p.payload[..], b"hello");
    assert_eq!(p.seq, 1);
}
