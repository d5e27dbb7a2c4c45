//! Ask mode's held requests: a DNS query for a name no rule permits waits here (nothing of it
//! leaves the machine) until a person decides (`egress-agent approve`/`deny`, or the HTTP
//! endpoint) or the timeout refuses it. Retries of the same name join the waiting request; a
//! denied connection to an unknown address raises a request too (the kernel cannot wait: the
//! connect already failed, a retry after approval passes).
//!
//! This file keeps the requests and the rules a person approved for the session; the decisions
//! themselves (rules, the approvals file, events) are `daemon::approvals`.

use std::{
    collections::VecDeque,
    net::IpAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use hickory_proto::op::Message;
use tokio::sync::watch;

use super::{
    DnsContext, Origin, Pending, Refusal, Step, attribution, cache, forward, owner_of,
    screen::{self, Screened},
    upstream::Transport,
};
use crate::{
    events::{ApprovalRequest, Event, rfc3339},
    policy::{Mode, Policy, Rule},
};

/// Requests held at once; a name asked beyond them is refused at once
/// (`approval-queue-full`): a flood of names must not bury the person deciding.
pub const MAX_PENDING: usize = 32;
/// Queries waiting on one request; a retry beyond them is dropped (the client asks again).
/// With [`MAX_PENDING`], held queries take at most half of the resolver's in-flight slots.
const MAX_WAITERS: usize = 8;
/// Decided requests remembered, to say "already decided" to a second decision.
const REMEMBER_DECIDED: usize = 64;

/// What a request is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Subject {
    /// A host name (lowercase, no trailing dot).
    Name(String),
    /// A destination a connect or send was denied.
    Addr {
        /// The address.
        ip: IpAddr,
        /// The port.
        port: u16,
        /// `tcp` or `udp`.
        proto: &'static str,
    },
}

/// What the waiting queries are told.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Answer the query: with the session's rules (`None`), or with this rule for this
    /// answer only (`once`).
    Allow(Option<Rule>),
    /// Refuse it (`approval-denied`).
    Deny,
    /// Nobody decided in time (`approval-timeout`).
    Timeout,
}

struct Request {
    id: u64,
    subject: Subject,
    /// How the first held query came (`udp`, `tcp`), for the events of a refused name.
    transport: &'static str,
    view: ApprovalRequest,
    started: Instant,
    tx: watch::Sender<Option<Verdict>>,
    waiters: usize,
}

/// A request taken out to be decided; [`Held::settle`] delivers its verdict.
pub struct Taken {
    /// What was asked.
    pub view: ApprovalRequest,
    /// For what.
    pub subject: Subject,
    /// How the first held query came (`udp`, `tcp`; `tcp` for an address).
    pub transport: &'static str,
    tx: watch::Sender<Option<Verdict>>,
}

#[derive(Default)]
struct State {
    /// Ask mode is on (`--ask`, or `mode: ask`).
    on: bool,
    /// `--ask` was given: a reloaded allowlist stays in ask mode whatever its `mode:` says.
    forced: bool,
    timeout: Duration,
    next: u64,
    pending: Vec<Request>,
    /// (id, how it was decided), newest last.
    decided: VecDeque<(u64, String)>,
    /// Rules approved for the session (and `always`, and the approvals file's at start).
    rules: Vec<Rule>,
    /// Subjects denied for the session: refused without asking again.
    denied: Vec<Subject>,
}

/// The held requests of one agent and the rules a person approved.
#[derive(Default)]
pub struct Held {
    state: Mutex<State>,
    /// Held across a whole policy apply (`reload::apply`), so that a decision's apply and a
    /// reload of the allowlist cannot interleave and drop an approved rule.
    applying: Mutex<()>,
}

/// A query waiting for a decision.
pub(super) struct Hold {
    id: u64,
    rx: watch::Receiver<Option<Verdict>>,
    deadline: Instant,
    /// The REFUSED answer, for a deny or a timeout.
    reply: Vec<u8>,
    /// The client's query, screened again once approved.
    query: Vec<u8>,
    from: Origin,
    /// This query raised the request (its owner is looked up and the request announced).
    new: bool,
}

impl Held {
    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Serializes policy applies (see `applying`).
    pub fn applying(&self) -> std::sync::MutexGuard<'_, ()> {
        self.applying.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Turns ask mode on: requests wait `timeout`; `forced` keeps it on across reloads.
    pub fn configure(&self, timeout: Duration, forced: bool) {
        let mut s = self.state();
        s.on = true;
        s.forced = forced;
        s.timeout = timeout;
    }

    /// Whether ask mode is on.
    pub fn on(&self) -> bool {
        self.state().on
    }

    /// `policy` with the session's approved rules added (those it does not hold yet), and in
    /// ask mode when `--ask` forced it: what a reload applies.
    pub fn extend(&self, mut policy: Policy) -> Policy {
        let s = self.state();
        for r in &s.rules {
            if !policy.rules.contains(r) {
                policy.rules.push(r.clone());
            }
        }
        if s.forced {
            policy.mode = Mode::Ask;
        }
        policy
    }

    /// Adds a rule for the session (apply it with a reload of the policy); whether it is new.
    pub fn add_rule(&self, rule: Rule) -> bool {
        let mut s = self.state();
        if s.rules.contains(&rule) {
            return false;
        }
        s.rules.push(rule);
        true
    }

    /// Takes back a rule [`Held::add_rule`] added (its apply failed).
    pub fn remove_rule(&self, rule: &Rule) {
        self.state().rules.retain(|r| r != rule);
    }

    /// Refuses `subject` for the rest of the session without asking.
    pub fn deny_for_session(&self, subject: Subject) {
        let mut s = self.state();
        if !s.denied.contains(&subject) {
            s.denied.push(subject);
        }
    }

    /// The requests waiting, oldest first (address requests past their timeout are
    /// dropped here: nothing waits on them).
    pub fn pending(&self) -> Vec<ApprovalRequest> {
        let mut s = self.state();
        prune(&mut s);
        s.pending.iter().map(|r| r.view.clone()).collect()
    }

    /// The id of the pending request `target` names: its id, its name or its address (as
    /// `pending` shows it, or the bare address).
    pub fn find(&self, target: &str) -> Result<u64, String> {
        let mut s = self.state();
        prune(&mut s);
        let target = target.trim().trim_end_matches('.').to_ascii_lowercase();
        if let Ok(id) = target.parse::<u64>() {
            if s.pending.iter().any(|r| r.id == id) {
                return Ok(id);
            }
            if let Some((_, how)) = s.decided.iter().find(|(d, _)| *d == id) {
                return Err(format!("request {id} was already decided ({how})"));
            }
            return Err(format!("no pending request with id {id}"));
        }
        let found: Vec<u64> = s
            .pending
            .iter()
            .filter(|r| match &r.subject {
                Subject::Name(n) => *n == target,
                Subject::Addr { ip, .. } => r.view.subject() == target || ip.to_string() == target,
            })
            .map(|r| r.id)
            .collect();
        match found.as_slice() {
            [id] => Ok(*id),
            [] => Err(format!("no pending request for {target:?}")),
            more => Err(format!(
                "{} pending requests match {target:?}: give an id ({})",
                more.len(),
                more.iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }

    /// What request `id` asks for.
    pub fn peek(&self, id: u64) -> Result<(Subject, ApprovalRequest), String> {
        let s = self.state();
        s.pending
            .iter()
            .find(|r| r.id == id)
            .map(|r| (r.subject.clone(), r.view.clone()))
            .ok_or_else(|| format!("no pending request with id {id}"))
    }

    /// Takes request `id` out to decide it (a second decision finds it gone).
    pub fn take(&self, id: u64) -> Result<Taken, String> {
        let mut s = self.state();
        let Some(i) = s.pending.iter().position(|r| r.id == id) else {
            return Err(format!("no pending request with id {id}"));
        };
        let r = s.pending.remove(i);
        Ok(Taken {
            view: r.view,
            subject: r.subject,
            transport: r.transport,
            tx: r.tx,
        })
    }

    /// Delivers the verdict of a taken request to the queries waiting on it; `how` is what
    /// a second decision is told.
    pub fn settle(&self, taken: Taken, verdict: Verdict, how: String) {
        let id = taken.view.id.parse().unwrap_or(0);
        let _ = taken.tx.send(Some(verdict));
        let mut s = self.state();
        s.decided.push_back((id, how));
        while s.decided.len() > REMEMBER_DECIDED {
            s.decided.pop_front();
        }
    }

    /// A connect or send to `ip`:`port` was denied with no rule for it: raise a request
    /// (joining one for the same destination). The new request, if one was made.
    pub fn raise_addr(
        &self,
        ip: IpAddr,
        port: u16,
        proto: &'static str,
        who: Option<attribution::Owner>,
    ) -> Option<ApprovalRequest> {
        let subject = Subject::Addr { ip, port, proto };
        let mut s = self.state();
        if !s.on {
            return None;
        }
        prune(&mut s);
        if s.denied.contains(&subject)
            || s.pending.len() >= MAX_PENDING
            || s.pending.iter().any(|r| r.subject == subject)
        {
            return None;
        }
        let (id, _) = new_request(&mut s, subject, None, who, "tcp");
        s.pending
            .iter()
            .find(|r| r.id == id)
            .map(|r| r.view.clone())
    }

    /// Removes request `id` if it is still pending after its timeout; returns what it was.
    fn expire(&self, id: u64) -> Option<ApprovalRequest> {
        let mut s = self.state();
        let i = s.pending.iter().position(|r| r.id == id)?;
        if s.pending[i].started.elapsed() < s.timeout {
            return None;
        }
        let r = s.pending.remove(i);
        let _ = r.tx.send(Some(Verdict::Timeout));
        s.decided
            .push_back((id, "refused: nobody decided in time".into()));
        while s.decided.len() > REMEMBER_DECIDED {
            s.decided.pop_front();
        }
        Some(r.view)
    }
}

/// Drops address requests past their timeout (a held query expires itself).
fn prune(s: &mut State) {
    let timeout = s.timeout;
    s.pending
        .retain(|r| !(matches!(r.subject, Subject::Addr { .. }) && r.started.elapsed() >= timeout));
}

fn new_request(
    s: &mut State,
    subject: Subject,
    qtype: Option<&str>,
    who: Option<attribution::Owner>,
    transport: &'static str,
) -> (u64, watch::Receiver<Option<Verdict>>) {
    s.next += 1;
    let id = s.next;
    let (tx, rx) = watch::channel(None);
    let (name, dst, port, proto) = match &subject {
        Subject::Name(n) => (Some(n.clone()), None, None, None),
        Subject::Addr { ip, port, proto } => {
            (None, Some(*ip), Some(*port), Some((*proto).to_owned()))
        }
    };
    let view = ApprovalRequest {
        id: id.to_string(),
        name,
        qtype: qtype.map(str::to_owned),
        dst,
        port,
        proto,
        pid: who.as_ref().map(|o| o.pid),
        comm: who.as_ref().map(|o| o.comm.clone()),
        uid: who.as_ref().map(|o| o.uid),
        asked: rfc3339(SystemTime::now()),
    };
    s.pending.push(Request {
        id,
        subject,
        transport,
        view,
        started: Instant::now(),
        tx,
        waiters: 1,
    });
    (id, rx)
}

/// Ask mode, a query with a name no rule permits: hold it (a new request, or joining the
/// request for the same name), or refuse it at once (denied for the session, too many
/// requests, a name no rule could be written for). Runs on the resolver's thread: no owner
/// lookup here ([`wait`] does it for a new request).
pub(super) fn hold(
    ctx: &DnsContext,
    query: &[u8],
    names: Vec<(String, String)>,
    reply: Vec<u8>,
    from: Origin,
) -> Step {
    // The first refused name is asked about; once decided, the query is screened again (a
    // second refused name in the same query is refused then).
    let Some((name, qtype)) = names.first().cloned() else {
        return Step::Answer(Some(reply));
    };
    let refuse = |reason: &'static str| {
        Step::Refused(Refusal {
            reply: Some(reply.clone()),
            names: vec![(name.clone(), qtype.clone())],
            from,
            reason: Some(reason),
        })
    };
    let subject = Subject::Name(name.clone());
    let mut s = ctx.held.state();
    if !s.on {
        // `mode: ask` arrived by a reload: nobody can be asked (no control socket).
        drop(s);
        return refuse("approval-unavailable");
    }
    if s.denied.contains(&subject) {
        drop(s);
        return refuse("approval-denied");
    }
    if name.parse::<crate::policy::HostPattern>().is_err() || name.starts_with("*.") {
        drop(s);
        return refuse("not-a-host-name");
    }
    let timeout = s.timeout;
    if let Some(r) = s.pending.iter_mut().find(|r| r.subject == subject) {
        if r.waiters >= MAX_WAITERS {
            return Step::Answer(None);
        }
        r.waiters += 1;
        return Step::Hold(Hold {
            id: r.id,
            rx: r.tx.subscribe(),
            deadline: r.started + timeout,
            reply,
            query: query.to_vec(),
            from,
            new: false,
        });
    }
    if s.pending.len() >= MAX_PENDING {
        drop(s);
        return refuse("approval-queue-full");
    }
    let (id, rx) = new_request(
        &mut s,
        subject,
        Some(&qtype),
        None,
        proto_name(from.transport),
    );
    Step::Hold(Hold {
        id,
        rx,
        deadline: Instant::now() + timeout,
        reply,
        query: query.to_vec(),
        from,
        new: true,
    })
}

/// A new request: who asks (looked up while the client waits, its socket open), then the
/// `approval-requested` event and log line.
async fn announce(ctx: &DnsContext, id: u64, from: Origin) {
    let who = owner_of(ctx, from).await;
    let view = {
        let mut s = ctx.held.state();
        let Some(r) = s.pending.iter_mut().find(|r| r.id == id) else {
            return;
        };
        if let Some(o) = &who {
            r.view.pid = Some(o.pid);
            r.view.comm = Some(o.comm.clone());
            r.view.uid = Some(o.uid);
        }
        r.view.clone()
    };
    tracing::info!(
        "ask: request {id}: {} asks for {:?} ({}); egress-agent approve|deny",
        view.comm.as_deref().unwrap_or("?"),
        view.name.as_deref().unwrap_or(""),
        view.qtype.as_deref().unwrap_or("?"),
    );
    ctx.sink.emit(&Event::ApprovalRequested {
        ts: SystemTime::now(),
        request: &view,
    });
}

/// Waits for the decision on a held query, then answers it: forwarded (nothing left before
/// this point) and granted, or refused.
pub(super) async fn wait(ctx: &DnsContext, hold: Hold) -> Option<Vec<u8>> {
    let Hold {
        id,
        mut rx,
        deadline,
        reply,
        query,
        from,
        new,
    } = hold;
    if new {
        announce(ctx, id, from).await;
    }
    let verdict = loop {
        if let Some(v) = rx.borrow_and_update().clone() {
            break v;
        }
        let until = tokio::time::Instant::from_std(deadline);
        match tokio::time::timeout_at(until, rx.changed()).await {
            Ok(Ok(())) => continue,
            // Nobody can decide any more (the request is gone): refuse.
            Ok(Err(_)) => break Verdict::Deny,
            Err(_) => {
                if let Some(view) = ctx.held.expire(id) {
                    timeout_event(ctx, &view, from.transport);
                }
                break Verdict::Timeout;
            }
        }
    };
    let once = match verdict {
        Verdict::Allow(once) => once,
        Verdict::Deny | Verdict::Timeout => return Some(reply),
    };
    // Screened again: under the session's rules (a `session` or `always` decision is in the
    // running policy now), plus the one rule of a `once` decision for this answer only. The
    // answer is judged once more under the policy in force when it comes (`grant_all`).
    let mut policy = ctx.policy();
    if let Some(rule) = &once {
        let mut p = (*policy).clone();
        p.rules.push(rule.clone());
        policy = Arc::new(p);
    }
    let msg: Box<Message> = match screen::screen(&query, &policy, &ctx.search) {
        Screened::Forward(msg) => msg,
        _ => return Some(reply),
    };
    let pending = Pending {
        key: cache::Key::of(&msg),
        msg,
        cacheable: once.is_none(),
        from,
        audited: Vec::new(),
        once,
    };
    forward(ctx, pending, None).await
}

fn timeout_event(ctx: &DnsContext, view: &ApprovalRequest, transport: Transport) {
    ctx.sink.emit(&Event::DnsRefused {
        ts: SystemTime::now(),
        query: view.name.as_deref().unwrap_or(""),
        qtype: view.qtype.as_deref().unwrap_or(""),
        verdict: "refused",
        proto: proto_name(transport),
        pid: view.pid,
        comm: view.comm.as_deref(),
        uid: view.uid,
        reason: Some("approval-timeout"),
    });
}

fn proto_name(t: Transport) -> &'static str {
    match t {
        Transport::Udp => "udp",
        Transport::Tcp => "tcp",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn held() -> Held {
        let h = Held::default();
        h.configure(Duration::from_secs(30), false);
        h
    }

    #[test]
    fn an_address_request_is_raised_once_and_found_by_id_or_address() {
        let h = held();
        let ip: IpAddr = "198.51.100.7".parse().unwrap();
        let first = h.raise_addr(ip, 443, "tcp", None).expect("a new request");
        assert!(h.raise_addr(ip, 443, "tcp", None).is_none(), "joined");
        assert_eq!(h.pending().len(), 1);
        assert_eq!(h.find(&first.id), Ok(1));
        assert_eq!(h.find("198.51.100.7"), Ok(1));
        assert_eq!(h.find("198.51.100.7:443/tcp"), Ok(1));
        assert!(h.find("9").unwrap_err().contains("no pending request"));
        let t = h.take(1).unwrap();
        h.settle(t, Verdict::Deny, "denied by uid:0".into());
        assert!(h.find("1").unwrap_err().contains("already decided"));
        assert!(h.take(1).is_err());
    }

    #[test]
    fn requests_are_bounded_and_session_denies_stick() {
        let h = held();
        for i in 0..MAX_PENDING + 5 {
            let ip = IpAddr::from([198, 51, 100, i as u8]);
            h.raise_addr(ip, 80, "tcp", None);
        }
        assert_eq!(h.pending().len(), MAX_PENDING);
        let ip: IpAddr = "203.0.113.1".parse().unwrap();
        h.deny_for_session(Subject::Addr {
            ip,
            port: 80,
            proto: "tcp",
        });
        assert!(h.raise_addr(ip, 80, "tcp", None).is_none());
    }

    #[test]
    fn nothing_is_raised_outside_ask_mode() {
        let h = Held::default();
        assert!(
            h.raise_addr("198.51.100.7".parse().unwrap(), 1, "tcp", None)
                .is_none()
        );
    }
}
