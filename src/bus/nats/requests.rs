//! Commands to other nodes and from them: where a command goes (`plan`),
//! the per-node queues and batches of requests (`ask`), the merged reply
//! (`merge`), and the answers to the commands other nodes send this one
//! (`answer`, which the command link in `link.rs` runs).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::Inner;
use crate::bus::{codec, Command, NodeFailure, Outcome, PushOutcome, PushTarget, Reply};
use crate::ids::{DeviceId, NodeId, UserId};
use crate::metrics as m;
use crate::wire::{pb, Code};

/// Requests on their way to one node at once; commands for it that come
/// meanwhile wait and go together in the next (see [`Inner::ask`]).
const MAX_BATCHES: usize = 16;
/// Commands that may wait for one node; past it a command fails at once
/// with `CODE_NODE_TIMEOUT`.
const MAX_WAITING: usize = 4 * codec::MAX_BATCH;

/// An encoded command waiting to go to a node, and who waits for its
/// outcome.
type Waiting = (
    Bytes,
    tokio::sync::oneshot::Sender<Result<Outcome, (Code, String)>>,
);

/// The commands waiting to go to one node, and the requests on their way
/// to it.
///
/// A command that finds a free slot (fewer than [`MAX_BATCHES`] requests on
/// their way) and nobody gathering starts a *gatherer*: a task that lets
/// the tasks ready at that moment run once (one `yield_now`), then sends
/// everything that queued meanwhile as one request. Commands that come
/// while a gatherer waits, or while every slot is taken, join the next
/// request. Under load a node thus gets one message per batch of commands,
/// not one per command, and a lone command waits one turn of the
/// scheduler (microseconds), not a timer: tokio's timers tick in
/// milliseconds.
///
/// Why: each NATS message costs the node that runs it several task
/// wake-ups (the NATS client's connection task, the subscription, the
/// reply's write), more than a unicast push itself, so fewer and fuller
/// batches are what a cross-node push can save. Measured with 60,000
/// cross-node unicasts from 32 upstream connections (docs/LOADTEST.md,
/// "What crossing a node costs the node that delivers"): the receiving
/// node's CPU did not change beyond the noise (-3 %), the push latency's
/// p99 fell from 25-33 ms to 18-22 ms, lower in each of six pairs.
///
/// Generic over what waits, so that its rules are tested alone.
pub(super) struct NodeQueue<T = Waiting> {
    waiting: Vec<T>,
    /// Requests on their way, and the gatherer if any (it holds a slot).
    sending: usize,
    /// A gatherer is waiting for its turn.
    gathering: bool,
}

impl<T> Default for NodeQueue<T> {
    fn default() -> Self {
        Self {
            waiting: Vec::new(),
            sending: 0,
            gathering: false,
        }
    }
}

impl<T> NodeQueue<T> {
    /// Queues `item`: `Ok(true)` when the caller must start a gatherer (a
    /// slot is now taken for it), `Ok(false)` when a gatherer or a request
    /// on its way will take it; `Err(item)` when [`MAX_WAITING`] commands
    /// wait already.
    fn offer(&mut self, item: T) -> Result<bool, T> {
        if self.waiting.len() >= MAX_WAITING {
            return Err(item);
        }
        self.waiting.push(item);
        if self.gathering || self.sending >= MAX_BATCHES {
            return Ok(false);
        }
        self.sending += 1;
        self.gathering = true;
        Ok(true)
    }

    /// The gatherer's turn: the batches to send now, each of at most
    /// [`codec::MAX_BATCH`] commands. The first goes in the gatherer's own
    /// slot; each other took a free slot; what finds no slot waits for a
    /// request to come back. None at all (another sender took them): the
    /// gatherer's slot is given back.
    fn gather(&mut self) -> Vec<Vec<T>> {
        self.gathering = false;
        let mut batches = Vec::new();
        while !self.waiting.is_empty() && (batches.is_empty() || self.sending < MAX_BATCHES) {
            if !batches.is_empty() {
                self.sending += 1;
            }
            let take = self.waiting.len().min(codec::MAX_BATCH);
            batches.push(self.waiting.drain(..take).collect());
        }
        if batches.is_empty() {
            self.sending -= 1;
        }
        batches
    }

    /// A request came back: the next batch for its slot, or None (the slot
    /// is given back).
    fn next(&mut self) -> Option<Vec<T>> {
        if self.waiting.is_empty() {
            self.sending -= 1;
            return None;
        }
        let take = self.waiting.len().min(codec::MAX_BATCH);
        Some(self.waiting.drain(..take).collect())
    }
}

/// Commands from other nodes that run on tasks of their own at once at
/// most; past it the command link reads no more until one is done.
pub(super) const MAX_INFLIGHT_COMMANDS: usize = 256;

/// The answer to a command from another node ([`Inner::answer`]).
pub(super) enum Answer {
    /// Ran; the encoded outcome.
    Now(Bytes),
    /// To run on a task of its own; yields the encoded outcome.
    Later(std::pin::Pin<Box<dyn std::future::Future<Output = Bytes> + Send>>),
}

/// Which nodes a command goes to, and with what.
pub(super) struct Plan {
    /// Other nodes (this node's share always runs, in process), each with its command (encoded once when shared).
    pub(super) remote: Vec<(NodeId, Bytes, Vec<UserId>)>,
}

impl Inner {
    /// The deadline of a request made now, for the nodes, on the wall clock
    /// (ms since the Unix epoch): a push that reaches a node after it is
    /// not run there (see [`expired`]).
    pub(super) fn not_after(&self) -> u64 {
        crate::unix_ms() + ms(self.opts.request_timeout)
    }

    /// Decides where `cmd` goes; its remote commands carry the request's
    /// deadline `not_after_ms` (ms since the Unix epoch).
    pub(super) fn plan(&self, cmd: &Command, not_after_ms: u64) -> Plan {
        let now = Instant::now().into_std();
        let dir = self.dir.read();
        let each_user = |users: &[UserId], make: &dyn Fn(Vec<UserId>) -> Command| {
            dir.route_users(users, now)
                .nodes
                .into_iter()
                .map(|(n, us)| {
                    let c = codec::encode_command(&make(us.clone()), not_after_ms);
                    (n, c, us)
                })
                .collect()
        };
        let shared = |nodes: Vec<NodeId>| {
            if nodes.is_empty() {
                return Vec::new();
            }
            let bytes = codec::encode_command(cmd, not_after_ms);
            nodes
                .into_iter()
                .map(|n| (n, bytes.clone(), Vec::new()))
                .collect()
        };
        let remote = match cmd {
            Command::Push { target, push } => match target {
                PushTarget::User(u) | PushTarget::Device(u, _) => {
                    let nodes = dir
                        .route_users([u], now)
                        .nodes
                        .into_iter()
                        .map(|(n, _)| n)
                        .collect();
                    let mut v: Vec<(NodeId, Bytes, Vec<UserId>)> = shared(nodes);
                    v.iter_mut().for_each(|e| e.2 = vec![u.clone()]);
                    v
                }
                PushTarget::Users(us) => each_user(us, &|l| Command::Push {
                    target: PushTarget::Users(l),
                    push: push.clone(),
                }),
                PushTarget::Room(r) => shared(dir.room_nodes(r)),
                PushTarget::Everyone => shared(dir.nodes()),
            },
            Command::Kick { user, .. } => {
                let nodes = dir
                    .route_users([user], now)
                    .nodes
                    .into_iter()
                    .map(|(n, _)| n);
                shared(nodes.collect())
            }
            Command::Room {
                room,
                users,
                remove,
            } => each_user(users, &|l| Command::Room {
                room: room.clone(),
                users: l,
                remove: *remove,
            }),
            Command::Presence { users } => each_user(users, &|l| Command::Presence { users: l }),
        };
        Plan { remote }
    }

    /// Runs the encoded command `payload` on `node`, within
    /// `bus.request_timeout`. Commands for one node that come while
    /// [`MAX_BATCHES`] requests to it are on their way wait, and go
    /// together in the next request (a batch, one message each way): under
    /// load, a node gets a message per batch of pushes, not per push; with
    /// nothing on the way, a command goes at once.
    pub(super) async fn ask(
        self: &Arc<Self>,
        node: &NodeId,
        payload: Bytes,
    ) -> Result<Outcome, (Code, String)> {
        if !self.is_up() {
            metrics::counter!(m::BUS_REQUESTS, "result" => "unreachable").increment(1);
            return Err((
                Code::NodeUnreachable,
                format!("node {node}: the cluster bus is down"),
            ));
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        let offered = self
            .queues
            .lock()
            .entry(node.clone())
            .or_default()
            .offer((payload, tx));
        match offered {
            Ok(true) => {
                tokio::spawn(self.clone().gather(node.clone()));
            }
            Ok(false) => {}
            Err(_) => {
                // The node is not keeping up: say so now rather than queue
                // without bound.
                metrics::counter!(m::BUS_REQUESTS, "result" => "timeout").increment(1);
                return Err((
                    Code::NodeTimeout,
                    format!("node {node}: {MAX_WAITING} requests already wait for it"),
                ));
            }
        }
        let timeout = self.opts.request_timeout;
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(out)) => out,
            Ok(Err(_)) => Err((
                Code::Internal,
                format!("node {node}: the request was dropped"),
            )),
            Err(_) => Err((
                Code::NodeTimeout,
                format!("node {node} did not answer within {timeout:?}"),
            )),
        }
    }

    /// A gatherer (see [`NodeQueue`]): after one turn of the scheduler,
    /// sends what queued for `node` meanwhile.
    async fn gather(self: Arc<Self>, node: NodeId) {
        tokio::task::yield_now().await;
        let mut batches = match self.queues.lock().get_mut(&node) {
            Some(q) => q.gather(),
            None => return,
        };
        if batches.is_empty() {
            return;
        }
        let first = batches.remove(0);
        for b in batches {
            tokio::spawn(self.clone().send_batches(node.clone(), b));
        }
        self.send_batches(node, first).await;
    }

    /// Sends `batch` to `node`, then whatever queued for it meanwhile,
    /// until nothing waits; hands each caller its outcome.
    async fn send_batches(self: Arc<Self>, node: NodeId, mut batch: Vec<Waiting>) {
        loop {
            let outs: Vec<Result<Outcome, (Code, String)>> = if batch.len() == 1 {
                vec![self
                    .request_raw(&node, batch[0].0.clone())
                    .await
                    .and_then(|b| codec::decode_outcome(b).map_err(|e| (Code::Internal, e)))]
            } else {
                let n = batch.len();
                let cmds = batch.iter().map(|(b, _)| b.clone()).collect();
                match self.request_raw(&node, codec::encode_batch(cmds)).await {
                    Ok(b) => match codec::decode_outcomes(b) {
                        Ok(list) if list.len() == n => list
                            .into_iter()
                            .map(|b| codec::decode_outcome(b).map_err(|e| (Code::Internal, e)))
                            .collect(),
                        Ok(_) | Err(_) => {
                            vec![
                                Err((
                                    Code::Internal,
                                    format!("node {node}: a batch answered wrong")
                                ));
                                n
                            ]
                        }
                    },
                    Err(e) => vec![Err(e); n],
                }
            };
            for ((_, tx), out) in batch.drain(..).zip(outs) {
                let _ = tx.send(out);
            }
            let next = match self.queues.lock().get_mut(&node) {
                Some(q) => q.next(),
                None => return,
            };
            match next {
                Some(b) => batch = b,
                None => return,
            }
        }
    }

    /// One request to `node` with `payload`, within `bus.request_timeout`;
    /// the raw answer.
    async fn request_raw(&self, node: &NodeId, payload: Bytes) -> Result<Bytes, (Code, String)> {
        let timeout = self.opts.request_timeout;
        let req = async_nats::Request::new()
            .payload(payload)
            .timeout(Some(timeout));
        let sent = self.client.send_request(self.subject(node, "cmd"), req);
        // The client's own timeout starts once the request is queued; this
        // one bounds the queueing too.
        let res = match tokio::time::timeout(timeout, sent).await {
            Ok(r) => r,
            Err(_) => {
                metrics::counter!(m::BUS_REQUESTS, "result" => "timeout").increment(1);
                return Err((
                    Code::NodeTimeout,
                    format!("node {node} did not answer within {timeout:?}"),
                ));
            }
        };
        use async_nats::RequestErrorKind as K;
        let out = match res {
            Ok(msg) => Ok(msg.payload),
            Err(e) => Err(match e.kind() {
                K::TimedOut => (
                    Code::NodeTimeout,
                    format!("node {node} did not answer within {timeout:?}"),
                ),
                K::NoResponders => (Code::NodeUnreachable, format!("node {node} is gone")),
                _ => (Code::NodeUnreachable, format!("node {node}: {e}")),
            }),
        };
        let label = match &out {
            Ok(_) => "ok",
            Err((Code::NodeTimeout, _)) => "timeout",
            Err((Code::NodeUnreachable, _)) => "unreachable",
            Err(_) => "error",
        };
        metrics::counter!(m::BUS_REQUESTS, "result" => label).increment(1);
        out
    }

    pub(super) async fn request(self: Arc<Self>, cmd: Command) -> Reply {
        let deadline = Instant::now() + self.opts.request_timeout;
        let not_after = self.not_after();
        let plan = self.plan(&cmd, not_after);
        let local = async {
            match &cmd {
                Command::Push { .. } => {
                    self.settle_takes(&cmd, not_after).await;
                    self.executor.run(&cmd).await
                }
                other => self.executor.execute(other),
            }
        };
        let remote = futures_util::future::join_all(
            plan.remote
                .iter()
                .map(|(n, bytes, _)| self.ask(n, bytes.clone())),
        );
        let (mut local, mut answers) = tokio::join!(local, remote);
        if let Outcome::Push(o) = &mut local {
            self.hints(&cmd, o).await;
        }
        let mut asked = plan.remote;
        if let Command::Push { push, .. } = &cmd {
            // Sessions that moved while the push was on its way: sent on to
            // their new node, always. The new node may have run its own
            // share (or been asked, and had the user's other devices) before
            // the session was in place there; it queues the copy only if the
            // session lacks it (`Router::note_brought`), so that sending on
            // is never a duplicate.
            let mut hints: Vec<(UserId, DeviceId, NodeId)> = Vec::new();
            if let Outcome::Push(o) = &local {
                hints.extend(o.moved.iter().cloned());
            }
            for a in answers.iter().flatten() {
                if let Outcome::Push(o) = a {
                    hints.extend(o.moved.iter().cloned());
                }
            }
            let mut seen = HashSet::new();
            hints.retain(|h| seen.insert(h.clone()));
            // Sent on all at once: after a mass move (a drain), a broadcast
            // may miss thousands of sessions, and requests to one node that
            // are on their way together go as batches.
            let mut sent_on = Vec::new();
            for (u, d, n) in hints {
                let c = Command::Push {
                    target: PushTarget::Device(u.clone(), d),
                    push: push.clone(),
                };
                if n == self.node {
                    // It moved here while the push was on its way (this
                    // node ran its share before the session was in place).
                    self.settle_takes(&c, not_after).await;
                    answers.push(Ok(self.executor.run(&c).await));
                    asked.push((n, Bytes::new(), vec![u]));
                    continue;
                }
                sent_on.push((n, codec::encode_command(&c, not_after), vec![u]));
            }
            // Within the request's own deadline: an upstream never waits
            // longer than bus.request_timeout for other nodes.
            let left = deadline.saturating_duration_since(Instant::now());
            let me = &self;
            let replies =
                futures_util::future::join_all(sent_on.iter().map(|(n, bytes, _)| async move {
                    match tokio::time::timeout(left, me.ask(n, bytes.clone())).await {
                        Ok(a) => a,
                        Err(_) => Err((
                            Code::NodeTimeout,
                            format!("node {n} did not answer within the request's deadline"),
                        )),
                    }
                }))
                .await;
            answers.extend(replies);
            asked.extend(sent_on);
        }
        merge(&cmd, local, asked, answers)
    }

    // ---- commands from other nodes ----

    /// What to answer a command from another node (the link's message
    /// `payload`, see `link.rs`): small commands run here, at once and in
    /// order, and their answer is ready (a task per command cost more than
    /// the command: a unicast push is a few enqueues); fan-outs, and
    /// pushes that may wait on a moving session, are work for a task of
    /// their own (a batch with one of them: one task, its commands in
    /// order).
    pub(super) fn answer(self: &Arc<Self>, payload: Bytes) -> Answer {
        match codec::decode_incoming(payload) {
            Ok(codec::Incoming::One(cmd, until)) => {
                if self.runs_inline(&cmd) {
                    return Answer::Now(codec::encode_outcome(self.execute_until(&cmd, until)));
                }
                let me = self.clone();
                Answer::Later(Box::pin(async move {
                    codec::encode_outcome(me.run_command(&cmd, until).await)
                }))
            }
            Ok(codec::Incoming::Batch(cmds)) => {
                let decoded: Vec<Result<(Command, u64), String>> =
                    cmds.into_iter().map(codec::decode_command).collect();
                if decoded
                    .iter()
                    .all(|c| c.as_ref().map_or(true, |(c, _)| self.runs_inline(c)))
                {
                    let outs = decoded
                        .iter()
                        .map(|c| match c {
                            Ok((c, until)) => codec::encode_outcome(self.execute_until(c, *until)),
                            Err(e) => codec::encode_outcome(Err(e.clone())),
                        })
                        .collect();
                    return Answer::Now(codec::encode_outcomes(outs));
                }
                let me = self.clone();
                Answer::Later(Box::pin(async move {
                    let mut outs = Vec::with_capacity(decoded.len());
                    for c in decoded {
                        let out = match c {
                            Ok((cmd, until)) => me.run_command(&cmd, until).await,
                            Err(e) => Err(e),
                        };
                        outs.push(codec::encode_outcome(out));
                    }
                    codec::encode_outcomes(outs)
                }))
            }
            Err(e) => {
                tracing::warn!("cluster bus: refused a command: {e}");
                Answer::Now(codec::encode_outcome(Err(e)))
            }
        }
    }

    /// Runs a small command from another node here and now, unless it is
    /// a push past its deadline ([`expired`]).
    fn execute_until(&self, cmd: &Command, until: u64) -> Result<Outcome, String> {
        expired(cmd, until)?;
        Ok(self.executor.execute(cmd))
    }

    /// Runs a command from another node on this node's sessions, unless
    /// it is a push past its deadline `until` ([`expired`]).
    async fn run_command(&self, cmd: &Command, until: u64) -> Result<Outcome, String> {
        expired(cmd, until)?;
        Ok(match cmd {
            Command::Push { .. } => {
                if self.runs_inline(cmd) {
                    return Ok(self.executor.execute(cmd));
                }
                self.settle_takes(cmd, until).await;
                let mut o = self.executor.run(cmd).await;
                if let Outcome::Push(p) = &mut o {
                    self.hints(cmd, p).await;
                }
                o
            }
            other => self.executor.execute(other),
        })
    }

    /// Whether a command from another node is small enough to run on the
    /// subscription's own task: a kick, a room change, presence, or a push
    /// to a few users while no session is moving in or out of this node.
    fn runs_inline(&self, cmd: &Command) -> bool {
        const FEW: usize = 64;
        match cmd {
            Command::Push { target, .. } => {
                let small = match target {
                    PushTarget::User(_) | PushTarget::Device(..) => true,
                    PushTarget::Users(us) => us.len() <= FEW,
                    PushTarget::Room(_) | PushTarget::Everyone => false,
                };
                small
                    && self.moved_count.load(Ordering::Relaxed) == 0
                    && self.takes.lock().is_empty()
            }
            Command::Presence { users } | Command::Room { users, .. } => users.len() <= FEW,
            Command::Kick { .. } => true,
        }
    }
}

/// How far apart the nodes' clocks may be for [`expired`] (NTP keeps
/// them within milliseconds).
pub const CLOCK_MARGIN: Duration = Duration::from_secs(1);

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// Refuses a push from another node that comes after its request's
/// deadline `until` (ms since the Unix epoch; 0: none) plus
/// [`CLOCK_MARGIN`]: the node that asked has reported this node as not
/// answering (`CODE_NODE_TIMEOUT`) already, and a push run that late
/// would be one the upstream was told may not arrive, and could outlive
/// what the nodes remember of a moved session (`moved_memory`). Kicks,
/// room changes and presence run however late: they are safe to repeat.
fn expired(cmd: &Command, until: u64) -> Result<(), String> {
    if until == 0 || !matches!(cmd, Command::Push { .. }) {
        return Ok(());
    }
    let now = crate::unix_ms();
    if now <= until.saturating_add(ms(CLOCK_MARGIN)) {
        return Ok(());
    }
    metrics::counter!(m::BUS_EXPIRED_PUSHES).increment(1);
    Err(format!(
        "the push came {} ms after its request's deadline: not run",
        now - until
    ))
}

/// Gathers the local outcome and the remote ones into one reply.
fn merge(
    cmd: &Command,
    local: Outcome,
    asked: Vec<(NodeId, Bytes, Vec<UserId>)>,
    answers: Vec<Result<Outcome, (Code, String)>>,
) -> Reply {
    let mut failed = Vec::new();
    let mut ok = Vec::new();
    for ((node, _, users), a) in asked.into_iter().zip(answers) {
        match a {
            Ok(o) => ok.push((users, o)),
            Err((code, message)) => failed.push(NodeFailure {
                node,
                code,
                message,
                users,
            }),
        }
    }
    let outcome = match cmd {
        Command::Push { target, .. } => {
            let mut sum = PushOutcome::default();
            // Users some node had: not missing, not unreached.
            let mut reached: HashSet<UserId> = HashSet::new();
            let targeted: Vec<UserId> = match target {
                PushTarget::User(u) | PushTarget::Device(u, _) => vec![u.clone()],
                PushTarget::Users(us) => us.clone(),
                PushTarget::Room(_) | PushTarget::Everyone => Vec::new(),
            };
            let mut add = |o: &PushOutcome, asked: &[UserId]| {
                sum.sessions += o.sessions;
                sum.dropped += o.dropped;
                let missing: HashSet<&UserId> = o.missing_users.iter().collect();
                reached.extend(asked.iter().filter(|u| !missing.contains(u)).cloned());
            };
            if let Outcome::Push(o) = &local {
                add(o, &targeted);
            }
            for (users, o) in &ok {
                if let Outcome::Push(o) = o {
                    add(o, users);
                }
            }
            let unreached: HashSet<&UserId> = failed.iter().flat_map(|f| &f.users).collect();
            sum.missing_users = targeted
                .iter()
                .filter(|u| !reached.contains(*u) && !unreached.contains(u))
                .cloned()
                .collect();
            for f in &mut failed {
                f.users.retain(|u| !reached.contains(u));
            }
            Outcome::Push(sum)
        }
        Command::Presence { users } => {
            let mut by_user: HashMap<String, Vec<pb::DevicePresence>> = HashMap::new();
            let all = std::iter::once(local).chain(ok.into_iter().map(|(_, o)| o));
            for o in all {
                if let Outcome::Presence(list) = o {
                    for up in list {
                        by_user.entry(up.user_id).or_default().extend(up.devices);
                    }
                }
            }
            Outcome::Presence(
                users
                    .iter()
                    .map(|u| pb::UserPresence {
                        user_id: u.to_string(),
                        devices: by_user.remove(u.as_str()).unwrap_or_default(),
                    })
                    .collect(),
            )
        }
        Command::Kick { .. } | Command::Room { .. } => {
            let all = std::iter::once(local).chain(ok.into_iter().map(|(_, o)| o));
            Outcome::Count(
                all.map(|o| match o {
                    Outcome::Count(n) => n,
                    _ => 0,
                })
                .sum(),
            )
        }
    };
    Reply { outcome, failed }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::RoomId;
    use crate::wire::SharedPush;

    fn u(s: &str) -> UserId {
        UserId::new(s)
    }

    fn push_to(users: &[&str]) -> Command {
        Command::Push {
            target: PushTarget::Users(users.iter().map(|s| u(s)).collect()),
            push: SharedPush::new("m", b"x", "", ""),
        }
    }

    fn outcome(sessions: u64, missing: &[&str]) -> Outcome {
        Outcome::Push(PushOutcome {
            sessions,
            dropped: 0,
            missing_users: missing.iter().map(|s| u(s)).collect(),
            ..Default::default()
        })
    }

    #[test]
    fn a_lone_command_starts_a_gatherer_and_those_behind_it_join_its_batch() {
        let mut q = NodeQueue::<u32>::default();
        assert_eq!(q.offer(1), Ok(true), "the first starts a gatherer");
        assert_eq!(q.offer(2), Ok(false), "the gatherer will take it");
        assert_eq!(q.offer(3), Ok(false));
        assert_eq!(q.gather(), vec![vec![1, 2, 3]], "one request for all");
        assert_eq!(q.sending, 1);
        // While it is on its way, a new command starts a new gatherer (a
        // slot is free).
        assert_eq!(q.offer(4), Ok(true));
        assert_eq!(q.sending, 2);
        assert_eq!(q.gather(), vec![vec![4]]);
        assert_eq!(q.next(), None, "nothing waits: the slot is given back");
        assert_eq!(q.next(), None);
        assert_eq!(q.sending, 0);
    }

    #[test]
    fn with_every_slot_taken_commands_wait_for_a_request_to_come_back() {
        let mut q = NodeQueue::<usize>::default();
        for i in 0..MAX_BATCHES {
            assert_eq!(q.offer(i), Ok(true));
            assert_eq!(q.gather(), vec![vec![i]]);
        }
        assert_eq!(q.sending, MAX_BATCHES);
        assert_eq!(q.offer(100), Ok(false), "no slot: no gatherer");
        assert_eq!(q.offer(101), Ok(false));
        assert!(!q.gathering);
        assert_eq!(
            q.next(),
            Some(vec![100, 101]),
            "the next request takes both"
        );
        assert_eq!(q.sending, MAX_BATCHES);
        for _ in 0..MAX_BATCHES {
            assert_eq!(q.next(), None);
        }
        assert_eq!(q.sending, 0);
    }

    #[test]
    fn a_gatherer_with_more_than_a_batch_uses_the_free_slots_and_leaves_the_rest() {
        let mut q = NodeQueue::<usize>::default();
        // All but two slots are on their way.
        for i in 0..MAX_BATCHES - 2 {
            assert_eq!(q.offer(i), Ok(true));
            assert_eq!(q.gather().len(), 1);
        }
        let n = 4 * codec::MAX_BATCH;
        assert_eq!(q.offer(0), Ok(true));
        for i in 1..n {
            assert_eq!(q.offer(i), Ok(false));
        }
        assert_eq!(q.offer(n), Err(n), "past MAX_WAITING a command is refused");
        let batches = q.gather();
        // Its own slot and the one left free: two full batches go.
        assert_eq!(batches.len(), 2);
        assert!(batches.iter().all(|b| b.len() == codec::MAX_BATCH));
        assert_eq!(batches[0][0], 0, "in order");
        assert_eq!(q.sending, MAX_BATCHES);
        assert_eq!(q.waiting.len(), n - 2 * codec::MAX_BATCH);
    }

    #[test]
    fn a_gatherer_that_finds_nothing_gives_its_slot_back() {
        let mut q = NodeQueue::<u32>::default();
        assert_eq!(q.offer(1), Ok(true));
        assert_eq!(q.gather(), vec![vec![1]]);
        assert_eq!(q.offer(2), Ok(true), "a second gatherer");
        // The first request comes back first and takes the waiting command.
        assert_eq!(q.next(), Some(vec![2]));
        assert!(q.gather().is_empty());
        assert_eq!(q.sending, 1, "only the first request's slot remains");
        assert_eq!(q.next(), None);
        assert_eq!(q.sending, 0);
    }

    #[test]
    fn a_user_is_missing_only_when_no_node_had_them() {
        let cmd = push_to(&["a", "b", "c"]);
        // Local has a; node n2 was asked about b and c, and had c.
        let r = merge(
            &cmd,
            outcome(1, &["b", "c"]),
            vec![(NodeId::new("n2"), Bytes::new(), vec![u("b"), u("c")])],
            vec![Ok(outcome(1, &["b"]))],
        );
        let Outcome::Push(p) = r.outcome else {
            panic!()
        };
        assert_eq!(p.sessions, 2);
        assert_eq!(p.missing_users, [u("b")]);
        assert!(r.failed.is_empty());
    }

    #[test]
    fn users_of_a_node_that_did_not_answer_are_reported_with_it_not_as_missing() {
        let cmd = push_to(&["a", "b", "c"]);
        let r = merge(
            &cmd,
            outcome(0, &["a", "b", "c"]),
            vec![
                (NodeId::new("n2"), Bytes::new(), vec![u("b")]),
                (NodeId::new("n3"), Bytes::new(), vec![u("c")]),
            ],
            vec![Err((Code::NodeTimeout, "slow".into())), Ok(outcome(1, &[]))],
        );
        let Outcome::Push(p) = r.outcome else {
            panic!()
        };
        assert_eq!(p.missing_users, [u("a")], "only a is known absent");
        assert_eq!(r.failed.len(), 1);
        assert_eq!(r.failed[0].node.as_str(), "n2");
        assert_eq!(r.failed[0].code, Code::NodeTimeout);
        assert_eq!(r.failed[0].users, [u("b")]);
    }

    #[test]
    fn counts_add_up_and_presence_merges_in_request_order() {
        let kick = Command::Room {
            room: RoomId::new("r"),
            users: vec![u("a")],
            remove: false,
        };
        let r = merge(
            &kick,
            Outcome::Count(2),
            vec![(NodeId::new("n2"), Bytes::new(), vec![])],
            vec![Ok(Outcome::Count(3))],
        );
        assert_eq!(r.outcome, Outcome::Count(5));
        let dev = |d: &str| pb::DevicePresence {
            device_id: d.into(),
            ..Default::default()
        };
        let pres = Command::Presence {
            users: vec![u("a"), u("b")],
        };
        let r = merge(
            &pres,
            Outcome::Presence(vec![pb::UserPresence {
                user_id: "b".into(),
                devices: vec![dev("1")],
            }]),
            vec![(NodeId::new("n2"), Bytes::new(), vec![u("b")])],
            vec![Ok(Outcome::Presence(vec![pb::UserPresence {
                user_id: "b".into(),
                devices: vec![dev("2")],
            }]))],
        );
        let Outcome::Presence(list) = r.outcome else {
            panic!()
        };
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].user_id, "a");
        assert!(list[0].devices.is_empty());
        assert_eq!(list[1].devices.len(), 2);
    }
}
