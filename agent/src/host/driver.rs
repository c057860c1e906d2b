//! The driver: the one task that owns the host's state. It takes events
//! (from the coordinator link, the dockerd watcher, its own timers and the
//! shutdown token), runs them through the pure [`state::next`], and carries
//! out the resulting actions against the Docker front, the Docker API (wipe),
//! the provider and the outbox to the coordinator. It publishes the host's
//! status into a `watch` for the link's `Register` and heartbeats, and the
//! wipes it reported ([`Wipes`]) into another, for the status board: the
//! board reads both, nothing it does can hold up the driver's messages.
//!
//! The lease deadline is enforced here, on the agent's own clock, whether or
//! not the coordinator is reachable.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::SystemTime;

use berth_proto::v1::{AgentMessage, WipeReport};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::docker::client::DockerOps;
use crate::docker::daemon::WipePath;
use crate::docker::front::FrontControl;
use crate::docker::wipe;
use crate::host::state::{self, Action, Event, Host, HostState};
use crate::host::statefile;
use crate::link::Status;
use crate::provider::{Provider, ProviderError};

/// Wall-clock time, for turning the coordinator's deadlines into timers.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The machine's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// How the host ended, if not cleanly.
#[derive(Debug, thiserror::Error)]
pub enum DriverError {
    #[error("terminating the host ({reason}): {source}")]
    Terminate {
        reason: String,
        #[source]
        source: ProviderError,
    },
    #[error("terminating the host ({reason}) took longer than {timeout:?}")]
    TerminateTimeout {
        reason: String,
        timeout: std::time::Duration,
    },
}

/// The wipes the driver has reported to the coordinator, as it published
/// them: cumulative counts and the last report.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Wipes {
    pub verified: u64,
    pub failed: u64,
    pub last: Option<WipeReport>,
}

impl Wipes {
    fn record(&mut self, w: &WipeReport) {
        if w.verified {
            self.verified += 1;
        } else {
            self.failed += 1;
        }
        self.last = Some(w.clone());
    }

    /// Wipes reported so far.
    pub fn total(&self) -> u64 {
        self.verified + self.failed
    }
}

/// The driver task's state.
pub struct Driver<D, F, P, C> {
    host: Host,
    docker: Arc<D>,
    front: F,
    provider: Arc<P>,
    clock: C,
    outbox: mpsc::UnboundedSender<AgentMessage>,
    status: watch::Sender<Status>,
    wipes: watch::Sender<Wipes>,
    /// Lease deadline timer: (lease id, when).
    deadline: Option<(String, Instant)>,
    /// Per-state timeout: (state, when).
    state_deadline: Option<(HostState, Instant)>,
    wipe_task: Option<tokio::task::JoinHandle<()>>,
    wipe_tx: mpsc::Sender<WipeReport>,
    wipe_rx: mpsc::Receiver<WipeReport>,
    /// Where the host's state is kept for a restarted agent, if anywhere.
    state_file: Option<StateFile>,
    /// How the host is wiped.
    wipe_path: WipePath,
}

struct StateFile {
    host_id: String,
    path: std::path::PathBuf,
    last: Option<statefile::Saved>,
    /// Sticky: the host has held a lease (this agent's or a predecessor's).
    held_lease: bool,
}

impl<D, F, P, C> std::fmt::Debug for Driver<D, F, P, C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

/// The status a host publishes.
pub fn status_of(host: &Host) -> Status {
    Status {
        state: host.state,
        lease_id: host.lease.as_ref().map(|l| l.id.clone()),
        lease_deadline: host.lease.as_ref().map(|l| l.deadline),
        lease_key: host.lease.as_ref().and_then(|l| l.key),
    }
}

impl<D, F, P, C> Driver<D, F, P, C>
where
    D: DockerOps,
    F: FrontControl,
    P: Provider,
    C: Clock,
{
    /// A driver for `host`, publishing into `status` and sending to `outbox`.
    pub fn new(
        host: Host,
        docker: Arc<D>,
        front: F,
        provider: Arc<P>,
        clock: C,
        outbox: mpsc::UnboundedSender<AgentMessage>,
        status: watch::Sender<Status>,
    ) -> Self {
        let (wipe_tx, wipe_rx) = mpsc::channel(1);
        status.send_replace(status_of(&host));
        Driver {
            host,
            docker,
            front,
            provider,
            clock,
            outbox,
            status,
            wipes: watch::Sender::new(Wipes::default()),
            deadline: None,
            state_deadline: None,
            wipe_task: None,
            wipe_tx,
            wipe_rx,
            state_file: None,
            wipe_path: WipePath::Api("no dockerd the agent can replace"),
        }
    }

    /// Wipes the host along `path` (by default through the Docker API).
    pub fn with_wipe_path(mut self, path: WipePath) -> Self {
        self.wipe_path = path;
        self
    }

    /// The wipes this driver reports, as it reports them.
    pub fn wipes(&self) -> watch::Receiver<Wipes> {
        self.wipes.subscribe()
    }

    /// Keeps the host's state in `path` (see [`statefile`]), written after
    /// every transition that changes it and before its actions run.
    pub fn with_state_file(mut self, host_id: &str, path: std::path::PathBuf) -> Self {
        // A predecessor's record that the host held a lease stays.
        let held_lease = statefile::read(&path)
            .ok()
            .flatten()
            .is_some_and(|s| s.held_lease);
        self.state_file = Some(StateFile {
            host_id: host_id.to_owned(),
            path,
            last: None,
            held_lease,
        });
        self
    }

    async fn save(&mut self) {
        let Some(sf) = self.state_file.as_mut() else {
            return;
        };
        let saved = statefile::Saved::of(&sf.host_id, &self.host, sf.held_lease);
        sf.held_lease = saved.held_lease;
        if sf.last.as_ref() == Some(&saved) {
            return;
        }
        let path = sf.path.clone();
        let to_write = saved.clone();
        let started = Instant::now();
        let result = tokio::task::spawn_blocking(move || statefile::write(&path, &to_write)).await;
        match result {
            Ok(Ok(())) => {
                tracing::debug!(took = ?started.elapsed(), "host state saved");
                sf.last = Some(saved);
            }
            Ok(Err(e)) => tracing::error!(error = %e, "saving the host state failed"),
            Err(e) => tracing::error!(error = %e, "saving the host state failed"),
        }
    }

    /// Runs until the host is terminated; returns the reason. A closed inbox
    /// (link gone) does not stop the driver: deadlines and shutdown still work.
    pub async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Event>,
        shutdown: CancellationToken,
    ) -> Result<String, DriverError> {
        let mut queue: VecDeque<Event> = VecDeque::new();
        let mut inbox_open = true;
        let mut shutdown_seen = false;
        loop {
            let event = match queue.pop_front() {
                Some(e) => e,
                None => {
                    let deadline = self.deadline.clone();
                    let state_deadline = self.state_deadline;
                    tokio::select! {
                        biased;
                        _ = shutdown.cancelled(), if !shutdown_seen => {
                            shutdown_seen = true;
                            Event::Shutdown
                        }
                        Some(report) = self.wipe_rx.recv() => Event::WipeDone(report),
                        _ = sleep_until(deadline.as_ref().map(|d| d.1)), if deadline.is_some() => {
                            Event::DeadlinePassed { lease_id: deadline.map(|d| d.0).unwrap_or_default() }
                        }
                        _ = sleep_until(state_deadline.map(|d| d.1)), if state_deadline.is_some() => {
                            Event::Timeout(state_deadline.map(|d| d.0).unwrap_or(HostState::Ready))
                        }
                        e = inbox.recv(), if inbox_open => match e {
                            Some(e) => e,
                            None => {
                                inbox_open = false;
                                continue;
                            }
                        },
                    }
                }
            };
            tracing::debug!(?event, "event");
            let before = self.host.state;
            let (host, actions) = state::next(self.host.clone(), event);
            self.host = host;
            if self.host.state != before {
                // The reason the coordinator is told, in the agent's own log
                // too: the link may be down when it is sent.
                let reason = actions
                    .iter()
                    .find_map(|a| match a {
                        Action::Send(berth_proto::v1::agent_message::Msg::StateChanged(sc)) => {
                            Some(sc.reason.as_str())
                        }
                        _ => None,
                    })
                    .unwrap_or("");
                tracing::info!(from = ?before, to = ?self.host.state, lease_id = self.host.lease_id().unwrap_or(""), reason, "host state");
                self.state_deadline = self
                    .host
                    .state
                    .timeout()
                    .map(|t| (self.host.state, Instant::now() + t));
            }
            if self.host.state == HostState::Ready {
                // Listening before anyone can learn that the host is offered
                // (the status feeds the link): a build may have its answer
                // before the agent has its lease, and the front holds the
                // build's connection until then.
                if let Err(e) = self.front.listen().await {
                    tracing::warn!(error = %e, "docker front cannot listen yet; the lease opens it");
                }
            }
            self.status.send_replace(status_of(&self.host));
            self.save().await;
            for action in actions {
                if let Some(outcome) = self.execute(action, &mut queue).await {
                    // Nothing of the host's keeps running once its driver is done.
                    self.stop_wipe().await;
                    return outcome;
                }
            }
        }
    }

    /// Cuts a wipe that is still running and waits until its task is gone.
    async fn stop_wipe(&mut self) {
        if let Some(task) = self.wipe_task.take() {
            task.abort();
            let _ = task.await;
        }
    }

    /// Carries out one action; `Some` ends the driver.
    async fn execute(
        &mut self,
        action: Action,
        queue: &mut VecDeque<Event>,
    ) -> Option<Result<String, DriverError>> {
        match action {
            Action::SetFrontKey { key } => {
                // Refused once the front's first connection fixed the key;
                // its `FrontInUse` (with that key) is then on its way.
                self.front.set_key(key);
            }
            Action::OpenFront {
                lease_id,
                key,
                in_use,
            } => {
                let event = match self.front.open(&lease_id, key, in_use).await {
                    Ok(()) => Event::FrontOpened { lease_id },
                    Err(e) => {
                        tracing::error!(%lease_id, error = %e, "docker front failed to open");
                        Event::FrontFailed {
                            lease_id,
                            error: e.to_string(),
                        }
                    }
                };
                queue.push_back(event);
            }
            Action::CloseFront => self.front.close().await,
            Action::ArmDeadline { lease_id, deadline } => {
                // Wall clock -> monotonic timer once, here: later clock jumps
                // do not move the deadline.
                let remaining = deadline
                    .duration_since(self.clock.now())
                    .unwrap_or_default();
                tracing::info!(%lease_id, ?remaining, "lease deadline armed");
                self.deadline = Some((lease_id, Instant::now() + remaining));
            }
            Action::DisarmDeadline => self.deadline = None,
            Action::StartWipe { lease_id } => {
                let docker = self.docker.clone();
                let tx = self.wipe_tx.clone();
                let path = self.wipe_path.clone();
                let span = tracing::info_span!("wipe", lease_id = %lease_id);
                self.wipe_task = Some(tokio::spawn(
                    async move {
                        let report = match path {
                            WipePath::Fresh(replacer) => replacer.wipe(&lease_id).await,
                            WipePath::Api(why) => WipeReport {
                                method: format!("{}: {why}", crate::docker::reset::METHOD_API),
                                ..wipe::wipe(&*docker, &lease_id).await
                            },
                        };
                        tracing::info!(
                            method = %report.method,
                            verified = report.verified,
                            duration_ms = report.duration_ms,
                            containers = report.containers_removed,
                            images = report.images_removed,
                            volumes = report.volumes_removed,
                            networks = report.networks_removed,
                            error = %report.error,
                            "wipe finished"
                        );
                        let _ = tx.send(report).await;
                    }
                    .instrument(span),
                ));
            }
            Action::Send(msg) => {
                if let berth_proto::v1::agent_message::Msg::WipeReport(w) = &msg {
                    self.wipes.send_modify(|wipes| wipes.record(w));
                }
                // A closed outbox means the link is gone; the state is all
                // the coordinator would have learned, and it is lost anyway.
                let _ = self.outbox.send(AgentMessage { msg: Some(msg) });
            }
            Action::Terminate { reason } => {
                self.stop_wipe().await;
                self.front.close().await;
                tracing::info!(%reason, "terminating host");
                let timeout = HostState::Terminating
                    .timeout()
                    .unwrap_or(state::TERMINATE_TIMEOUT);
                let result = match tokio::time::timeout(timeout, self.provider.terminate()).await {
                    Err(_) => Err(DriverError::TerminateTimeout { reason, timeout }),
                    Ok(Err(source)) => Err(DriverError::Terminate { reason, source }),
                    Ok(Ok(())) => Ok(reason),
                };
                return Some(result);
            }
            Action::Stop { reason } => {
                self.front.close().await;
                tracing::info!(%reason, "stopping; the machine is left running");
                let timeout = state::TERMINATE_TIMEOUT;
                let result = match tokio::time::timeout(timeout, self.provider.stop()).await {
                    Err(_) => Err(DriverError::TerminateTimeout { reason, timeout }),
                    Ok(Err(source)) => Err(DriverError::Terminate { reason, source }),
                    Ok(Ok(())) => Ok(reason),
                };
                return Some(result);
            }
        }
        None
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::docker::front::FrontError;
    use crate::docker::wipe::fake::FakeDocker;
    use crate::provider::Identity;
    use berth_proto::v1::{EndReason, HostState as P, agent_message::Msg};
    use berth_tls::KeyId;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    const T0: u64 = 1_800_000_000;

    fn wall(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + secs)
    }

    /// A wall clock frozen at T0: deadlines become timers relative to the
    /// paused tokio clock, which the test advances.
    struct FrozenClock;
    impl Clock for FrozenClock {
        fn now(&self) -> SystemTime {
            wall(0)
        }
    }

    #[derive(Default, Clone)]
    struct FakeFront {
        log: Arc<Mutex<Vec<String>>>,
        fail: bool,
        listening: Arc<std::sync::atomic::AtomicBool>,
    }
    impl FrontControl for FakeFront {
        async fn listen(&mut self) -> Result<(), FrontError> {
            if !self.listening.swap(true, Ordering::SeqCst) {
                self.log.lock().unwrap().push("listen".into());
            }
            Ok(())
        }
        async fn open(
            &mut self,
            lease_id: &str,
            _key: KeyId,
            _in_use: bool,
        ) -> Result<(), FrontError> {
            self.listening.store(true, Ordering::SeqCst);
            self.log.lock().unwrap().push(format!("open {lease_id}"));
            if self.fail {
                return Err(FrontError::BindTimeout {
                    addr: "127.0.0.1:1".parse().unwrap(),
                });
            }
            Ok(())
        }
        async fn close(&mut self) {
            self.listening.store(false, Ordering::SeqCst);
            self.log.lock().unwrap().push("close".into());
        }
        fn set_key(&mut self, key: KeyId) -> bool {
            self.log
                .lock()
                .unwrap()
                .push(format!("key {}", &key.to_hex()[..4]));
            true
        }
    }

    #[derive(Default)]
    struct FakeProvider {
        terminated: AtomicUsize,
        stopped: AtomicUsize,
    }
    impl Provider for FakeProvider {
        fn name(&self) -> &'static str {
            "fake"
        }
        async fn identity(&self) -> Result<Identity, ProviderError> {
            Err(ProviderError::NoIdentity)
        }
        async fn terminate(&self) -> Result<(), ProviderError> {
            self.terminated.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
        async fn stop(&self) -> Result<(), ProviderError> {
            self.stopped.fetch_add(1, Ordering::SeqCst);
            Ok(())
        }
    }

    struct Rig {
        inbox: mpsc::Sender<Event>,
        outbox: mpsc::UnboundedReceiver<AgentMessage>,
        status: watch::Receiver<Status>,
        wipes: watch::Receiver<Wipes>,
        front: FakeFront,
        provider: Arc<FakeProvider>,
        docker: Arc<FakeDocker>,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<Result<String, DriverError>>,
    }

    fn rig(recycle: bool, front: FakeFront) -> Rig {
        rig_with(Host::booting(recycle), vec![], front)
    }

    /// A driver for `host` that gets `before` ahead of `Booted`.
    fn rig_with(host: Host, before: Vec<Event>, front: FakeFront) -> Rig {
        let (inbox_tx, inbox_rx) = mpsc::channel(16);
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let (status_tx, status_rx) = watch::channel(status_of(&host));
        let provider = Arc::new(FakeProvider::default());
        let docker = Arc::new(FakeDocker::busy());
        let shutdown = CancellationToken::new();
        for event in before {
            inbox_tx.try_send(event).unwrap();
        }
        let driver = Driver::new(
            host,
            docker.clone(),
            front.clone(),
            provider.clone(),
            FrozenClock,
            out_tx,
            status_tx,
        );
        inbox_tx.try_send(Event::Booted).unwrap();
        let wipes = driver.wipes();
        let task = tokio::spawn(driver.run(inbox_rx, shutdown.clone()));
        Rig {
            inbox: inbox_tx,
            outbox: out_rx,
            status: status_rx,
            wipes,
            front,
            provider,
            docker,
            shutdown,
            task,
        }
    }

    /// A compact name for each outgoing message, for order assertions.
    fn name(m: &AgentMessage) -> String {
        match &m.msg {
            Some(Msg::StateChanged(s)) => format!("state {:?}", P::try_from(s.state).unwrap()),
            Some(Msg::LeaseAccepted(a)) => format!("accepted {}", a.lease_id),
            Some(Msg::LeaseRejected(r)) => format!("rejected {}", r.lease_id),
            Some(Msg::LeaseEnded(e)) => format!(
                "ended {} {:?}",
                e.lease_id,
                EndReason::try_from(e.reason).unwrap()
            ),
            Some(Msg::WipeReport(w)) => format!("wipe {} verified={}", w.lease_id, w.verified),
            other => format!("{other:?}"),
        }
    }

    async fn next_names(rx: &mut mpsc::UnboundedReceiver<AgentMessage>, n: usize) -> Vec<String> {
        let mut out = vec![];
        for _ in 0..n {
            let m = tokio::time::timeout(Duration::from_secs(3600), rx.recv())
                .await
                .unwrap()
                .unwrap();
            out.push(name(&m));
        }
        out
    }

    fn assign(lease: &str, deadline_secs: u64) -> Event {
        Event::Assign {
            lease_id: lease.into(),
            build_id: "b".into(),
            deadline: Some(wall(deadline_secs)),
            key: Some(KeyId([7; 32])),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn deadline_expires_lease_without_coordinator_then_wipes_and_terminates() {
        let mut r = rig(false, FakeFront::default());
        let mut status = r.status.clone();
        status
            .wait_for(|s| s.state == HostState::Ready)
            .await
            .unwrap();
        r.inbox.send(assign("l1", 30)).await.unwrap();
        assert_eq!(
            next_names(&mut r.outbox, 2).await,
            ["state Leased", "accepted l1"]
        );
        assert_eq!(r.status.borrow().lease_id.as_deref(), Some("l1"));

        // The coordinator vanishes: the deadline is the agent's business.
        drop(r.inbox);
        let start = Instant::now();
        let names = next_names(&mut r.outbox, 4).await;
        assert_eq!(
            names,
            [
                "ended l1 Expired",
                "state Wiping",
                "wipe l1 verified=true",
                "state Terminating"
            ]
        );
        let waited = start.elapsed();
        assert!(
            waited >= Duration::from_secs(30) && waited < Duration::from_secs(31),
            "expired after {waited:?}"
        );
        let reason = r.task.await.unwrap().unwrap();
        assert_eq!(reason, "lease over; single-use host");
        assert_eq!(r.provider.terminated.load(Ordering::SeqCst), 1);
        // Offered: listening; leased: open; the lease over: closed for good.
        assert_eq!(
            *r.front.log.lock().unwrap(),
            ["listen", "open l1", "close", "close"]
        );
        assert!(
            r.docker.state.lock().unwrap().containers.is_empty(),
            "wipe ran against docker"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn renew_moves_the_deadline() {
        let mut r = rig(false, FakeFront::default());
        r.inbox.send(assign("l1", 10)).await.unwrap();
        assert_eq!(
            next_names(&mut r.outbox, 2).await,
            ["state Leased", "accepted l1"]
        );
        let start = Instant::now();
        tokio::time::sleep(Duration::from_secs(5)).await;
        r.inbox
            .send(Event::Renew {
                lease_id: "l1".into(),
                deadline: Some(wall(60)),
            })
            .await
            .unwrap();
        // A renewal for another lease must not touch ours.
        r.inbox
            .send(Event::Renew {
                lease_id: "zz".into(),
                deadline: Some(wall(1)),
            })
            .await
            .unwrap();
        assert_eq!(next_names(&mut r.outbox, 1).await, ["ended l1 Expired"]);
        let waited = start.elapsed();
        // Renewed at t=5s to wall(60) = 60 s after the frozen wall clock's now.
        assert!(
            waited >= Duration::from_secs(65) && waited < Duration::from_secs(66),
            "expired after {waited:?}"
        );
        r.task.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn end_lease_in_recycle_mode_goes_back_to_ready_and_takes_another() {
        let mut r = rig(true, FakeFront::default());
        r.inbox.send(assign("l1", 600)).await.unwrap();
        assert_eq!(
            next_names(&mut r.outbox, 2).await,
            ["state Leased", "accepted l1"]
        );
        // Idempotent re-assign; a second lease is rejected.
        r.inbox.send(assign("l1", 600)).await.unwrap();
        r.inbox.send(assign("l2", 600)).await.unwrap();
        assert_eq!(
            next_names(&mut r.outbox, 2).await,
            ["accepted l1", "rejected l2"]
        );
        r.inbox
            .send(Event::End {
                lease_id: "l1".into(),
                reason: EndReason::Released,
            })
            .await
            .unwrap();
        assert_eq!(
            next_names(&mut r.outbox, 3).await,
            ["state Wiping", "wipe l1 verified=true", "state Ready"]
        );
        assert_eq!(r.status.borrow().lease_id, None);
        // The wipe is published for the status board as it was reported.
        {
            let wipes = r.wipes.borrow();
            assert_eq!((wipes.verified, wipes.failed, wipes.total()), (1, 0, 1));
            assert_eq!(wipes.last.as_ref().unwrap().lease_id, "l1");
            // Without a dockerd it can replace, the driver wipes through the
            // API and says why.
            assert_eq!(
                wipes.last.as_ref().unwrap().method,
                "api: no dockerd the agent can replace"
            );
        }
        r.inbox.send(assign("l2", 600)).await.unwrap();
        assert_eq!(
            next_names(&mut r.outbox, 2).await,
            ["state Leased", "accepted l2"]
        );
        // Closed while wiping, listening again once offered again.
        assert_eq!(
            *r.front.log.lock().unwrap(),
            ["listen", "open l1", "close", "listen", "open l2"]
        );
        assert_eq!(r.provider.terminated.load(Ordering::SeqCst), 0);

        // Drain while leased: the lease runs out, then the host goes even in recycle mode.
        r.inbox
            .send(Event::Drain {
                reason: "scale in".into(),
            })
            .await
            .unwrap();
        r.inbox
            .send(Event::End {
                lease_id: "l2".into(),
                reason: EndReason::Drained,
            })
            .await
            .unwrap();
        assert_eq!(
            next_names(&mut r.outbox, 3).await,
            ["state Wiping", "wipe l2 verified=true", "state Terminating"]
        );
        assert_eq!(r.task.await.unwrap().unwrap(), "drained");
        assert_eq!(r.provider.terminated.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn shutdown_while_leased_cuts_the_front_and_terminates() {
        let mut r = rig(false, FakeFront::default());
        r.inbox.send(assign("l1", 600)).await.unwrap();
        assert_eq!(
            next_names(&mut r.outbox, 2).await,
            ["state Leased", "accepted l1"]
        );
        r.shutdown.cancel();
        assert_eq!(next_names(&mut r.outbox, 1).await, ["state Terminating"]);
        assert_eq!(r.task.await.unwrap().unwrap(), "agent shutting down");
        assert_eq!(r.provider.terminated.load(Ordering::SeqCst), 1);
        assert_eq!(
            r.front.log.lock().unwrap()[..3],
            [
                "listen".to_owned(),
                "open l1".to_owned(),
                "close".to_owned()
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn front_failure_rejects_the_lease_and_ends_the_host() {
        let mut r = rig(
            false,
            FakeFront {
                fail: true,
                ..FakeFront::default()
            },
        );
        r.inbox.send(assign("l1", 600)).await.unwrap();
        assert_eq!(
            next_names(&mut r.outbox, 3).await,
            ["rejected l1", "state Unhealthy", "state Terminating"]
        );
        assert!(r.task.await.unwrap().is_ok());
        assert_eq!(r.provider.terminated.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_wipe_verification_terminates_even_in_recycle_mode() {
        let mut r = rig(true, FakeFront::default());
        r.docker
            .state
            .lock()
            .unwrap()
            .sticky_images
            .insert("other".into());
        r.inbox.send(assign("l1", 600)).await.unwrap();
        r.inbox
            .send(Event::End {
                lease_id: "l1".into(),
                reason: EndReason::Released,
            })
            .await
            .unwrap();
        assert_eq!(
            next_names(&mut r.outbox, 6).await,
            [
                "state Leased",
                "accepted l1",
                "state Wiping",
                "wipe l1 verified=false",
                "state Unhealthy",
                "state Terminating"
            ]
        );
        assert!(r.task.await.unwrap().is_ok());
        let wipes = r.wipes.borrow();
        assert_eq!((wipes.verified, wipes.failed), (0, 1));
        assert!(!wipes.last.as_ref().unwrap().verified);
        assert_eq!(r.provider.terminated.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn warm_instance_waits_unoffered_and_a_stop_keeps_the_machine() {
        let host = Host::booting(false).keeping_on_shutdown(true);
        let warmed = Event::Warmed {
            target: "Pending".into(),
        };
        let mut r = rig_with(host, vec![warmed], FakeFront::default());
        let mut status = r.status.clone();
        status
            .wait_for(|s| s.state == HostState::Warming)
            .await
            .unwrap();
        // Not offered: an assignment (which a warm host never gets) is refused.
        r.inbox.send(assign("l1", 30)).await.unwrap();
        assert_eq!(next_names(&mut r.outbox, 1).await, ["rejected l1"]);
        // Stopped into the warm pool: the host stops, the machine stays.
        r.shutdown.cancel();
        assert_eq!(next_names(&mut r.outbox, 1).await, ["state Terminating"]);
        let reason = r.task.await.unwrap().unwrap();
        assert_eq!(reason, "agent shutting down; the machine stays");
        assert_eq!(r.provider.stopped.load(Ordering::SeqCst), 1);
        assert_eq!(r.provider.terminated.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn warm_instance_put_in_service_becomes_ready_and_serves() {
        let host = Host::booting(false).keeping_on_shutdown(true);
        let warmed = Event::Warmed {
            target: "Stopped".into(),
        };
        let mut r = rig_with(host, vec![warmed], FakeFront::default());
        let mut status = r.status.clone();
        status
            .wait_for(|s| s.state == HostState::Warming)
            .await
            .unwrap();
        r.inbox.send(Event::InService).await.unwrap();
        assert_eq!(next_names(&mut r.outbox, 1).await, ["state Ready"]);
        r.inbox.send(assign("l1", 30)).await.unwrap();
        assert_eq!(
            next_names(&mut r.outbox, 2).await,
            ["state Leased", "accepted l1"]
        );
        // Once leased, a shutdown ends the machine after all.
        r.shutdown.cancel();
        assert_eq!(next_names(&mut r.outbox, 1).await, ["state Terminating"]);
        assert_eq!(r.task.await.unwrap().unwrap(), "agent shutting down");
        assert_eq!(r.provider.terminated.load(Ordering::SeqCst), 1);
        assert_eq!(r.provider.stopped.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn dockerd_death_makes_the_host_unhealthy() {
        let mut r = rig(false, FakeFront::default());
        r.inbox
            .send(Event::DaemonExited {
                detail: "signal: 9".into(),
            })
            .await
            .unwrap();
        assert_eq!(
            next_names(&mut r.outbox, 2).await,
            ["state Unhealthy", "state Terminating"]
        );
        assert!(r.task.await.unwrap().is_ok());
    }
}
