//! The supervisor, after ractor's (Erlang/OTP-style) supervision: it spawns every compute actor with
//! `spawn_linked`, hears each child's failure as a `SupervisionEvent` matched on the child's id, and owns
//! the restart policy. Training: a failed actor fails the step, and every actor is restarted from the
//! latest checkpoint, up to `train.max_restarts` times ([`Supervisor::restart_all`]). Serving: the failed
//! worker alone is rebuilt in place from its child spec, OTP's `one_for_one` with a restart intensity
//! ([`Policy::RestartOne`]); past its budget, or with restarts off ([`Policy::MarkFailed`]), it stays
//! failed. The owner hears every failure and every restart ([`Report`]).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SpawnErr, SupervisionEvent};

use super::compute::{
    self, ComputeActor, ComputeHandle, ComputeSpec, ComputeState, ComputeStatus, Work,
};
use super::error::RuntimeError;
use super::metrics::{ActorLabels, Metrics};

/// What the supervisor does when a child fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Training: the step that was running fails, and [`Supervisor::restart_all`] restarts every actor
    /// from the latest checkpoint, at most `max_restarts` times in the supervisor's life.
    RestartAll { max_restarts: u32 },
    /// Serving: the failed child alone is rebuilt in place from its spec (a child spawned with
    /// [`Supervisor::spawn_restartable`]), at most `max_restarts` times within any `window`; past
    /// that, or when the rebuild itself fails, it stays failed as under `MarkFailed`.
    RestartOne { max_restarts: u32, window: Duration },
    /// The child is marked failed and the owner is told (serving: it fails the requests in flight and
    /// makes the service unready); nothing is restarted.
    MarkFailed,
}

/// One child's failure, as the supervisor heard it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Failure {
    pub actor: String,
    pub error: String,
    /// The supervisor is rebuilding it ([`Policy::RestartOne`]); a [`Report::Restarted`] follows, or
    /// a second failure without this flag when the rebuild fails.
    #[serde(default)]
    pub restarting: bool,
}

/// A child rebuilt in place after its failure.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Restarted {
    pub actor: String,
    /// Seconds from the failure heard to the new incarnation running (its weights loaded).
    pub recovery_s: f64,
    /// 1 for the first rebuild, 2 for the second …
    pub incarnation: u32,
}

/// What the owner hears from its supervisor.
#[derive(Debug, Clone, PartialEq)]
pub enum Report {
    Failed(Failure),
    Restarted(Restarted),
}

/// Told of every failure and restart (serving: fails in-flight requests, pauses or refuses admission,
/// marks the service unready until the worker is back).
pub type OnReport = Arc<dyn Fn(&Report) + Send + Sync>;

/// Spawns a child's next incarnation under the supervisor's cell, returning the new actor's id.
type Respawn = Arc<
    dyn Fn(ActorCell, u32) -> Pin<Box<dyn Future<Output = Result<ActorId, RuntimeError>> + Send>>
        + Send
        + Sync,
>;

struct Child {
    name: String,
    /// Set for children spawned restartable.
    respawn: Option<Respawn>,
    incarnation: u32,
}

struct Shared {
    name: String,
    policy: Policy,
    children: Mutex<HashMap<ActorId, Child>>,
    failures: Mutex<Vec<Failure>>,
    /// Children (or remote workers, ranks) failed and not restarted since.
    down: Mutex<Vec<String>>,
    /// When each [`Policy::RestartOne`] restart within the window happened.
    recent: Mutex<VecDeque<Instant>>,
    restarts: AtomicU32,
    on_report: Option<OnReport>,
    metrics: Option<Arc<Metrics>>,
}

/// Only supervision events reach it.
pub enum Never {}

struct SupervisorActor;

impl Actor for SupervisorActor {
    type Msg = Never;
    type State = Arc<Shared>;
    type Arguments = Arc<Shared>;

    async fn pre_start(
        &self,
        _me: ActorRef<Never>,
        shared: Arc<Shared>,
    ) -> Result<Arc<Shared>, ActorProcessingErr> {
        Ok(shared)
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<Never>,
        event: SupervisionEvent,
        shared: &mut Arc<Shared>,
    ) -> Result<(), ActorProcessingErr> {
        match event {
            SupervisionEvent::ActorFailed(cell, error) => {
                let id = cell.get_id();
                let child = shared.children.lock().ok().and_then(|mut c| c.remove(&id));
                let (actor, respawn, incarnation) = match child {
                    Some(c) => (c.name, c.respawn, c.incarnation),
                    None => (format!("an unregistered child ({id})"), None, 0),
                };
                let respawn = respawn.filter(|_| shared.may_restart(&actor));
                shared.record(Failure {
                    actor: actor.clone(),
                    error: error.to_string(),
                    restarting: respawn.is_some(),
                });
                if let Some(respawn) = respawn {
                    shared
                        .restart(me.get_cell(), actor, respawn, incarnation + 1)
                        .await;
                }
            }
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                let id = cell.get_id();
                let name = shared
                    .children
                    .lock()
                    .ok()
                    .and_then(|mut c| c.remove(&id))
                    .map(|c| c.name);
                tracing::debug!(supervisor = %shared.name, actor = ?name, ?reason, "actor stopped");
            }
            _ => {}
        }
        // Never stop with a child: the policy decides what happens next.
        Ok(())
    }
}

impl Shared {
    fn record(&self, failure: Failure) {
        tracing::error!(supervisor = %self.name, actor = %failure.actor, policy = ?self.policy,
            "actor failed: {}", failure.error);
        if let Some(m) = &self.metrics {
            m.actor_failures
                .get_or_create(&ActorLabels {
                    actor: failure.actor.clone(),
                })
                .inc();
        }
        // Recorded before the owner hears of it, so whatever the hook makes visible can name it.
        if let Ok(mut all) = self.failures.lock() {
            all.push(failure.clone());
        }
        if let Ok(mut down) = self.down.lock() {
            if !down.contains(&failure.actor) {
                down.push(failure.actor.clone());
            }
        }
        if let Some(f) = &self.on_report {
            f(&Report::Failed(failure));
        }
    }

    /// A child (here, or a worker in another process) is running again.
    fn recovered(&self, r: Restarted) {
        tracing::warn!(supervisor = %self.name, actor = %r.actor, incarnation = r.incarnation,
            recovery_s = r.recovery_s, "actor restarted in place");
        if let Some(m) = &self.metrics {
            m.actor_restarts
                .get_or_create(&ActorLabels {
                    actor: r.actor.clone(),
                })
                .inc();
            m.actor_recovery_seconds.observe(r.recovery_s);
        }
        if let Ok(mut down) = self.down.lock() {
            down.retain(|a| *a != r.actor);
        }
        if let Some(f) = &self.on_report {
            f(&Report::Restarted(r));
        }
    }

    /// Under [`Policy::RestartOne`], whether the budget allows one more restart now (and takes it).
    fn may_restart(&self, actor: &str) -> bool {
        let Policy::RestartOne {
            max_restarts,
            window,
        } = self.policy
        else {
            return false;
        };
        let Ok(mut recent) = self.recent.lock() else {
            return false;
        };
        let now = Instant::now();
        while recent
            .front()
            .is_some_and(|t| now.duration_since(*t) > window)
        {
            recent.pop_front();
        }
        if recent.len() >= max_restarts as usize {
            tracing::error!(supervisor = %self.name, %actor, max_restarts, window_s = window.as_secs_f64(),
                "not restarting: the restart budget (serve.max_restarts within serve.restart_window_s) is spent");
            return false;
        }
        recent.push_back(now);
        true
    }

    /// Spawns `actor`'s incarnation `n` in place of the failed one; a failed rebuild leaves it failed.
    async fn restart(&self, cell: ActorCell, actor: String, respawn: Respawn, n: u32) {
        let t0 = Instant::now();
        tracing::warn!(supervisor = %self.name, %actor, incarnation = n, "rebuilding the failed actor in place");
        match respawn(cell, n).await {
            Ok(id) => {
                if let Ok(mut c) = self.children.lock() {
                    c.insert(
                        id,
                        Child {
                            name: actor.clone(),
                            respawn: Some(respawn),
                            incarnation: n,
                        },
                    );
                }
                self.recovered(Restarted {
                    actor,
                    recovery_s: t0.elapsed().as_secs_f64(),
                    incarnation: n,
                });
            }
            Err(e) => self.record(Failure {
                actor,
                error: format!("its restart failed: {e}"),
                restarting: false,
            }),
        }
    }
}

/// A compute actor its supervisor rebuilds in place: the handle of its current incarnation.
pub struct Restartable<W: Work> {
    name: String,
    slot: Arc<Mutex<Slot<W>>>,
}

struct Slot<W: Work> {
    handle: Option<ComputeHandle<W>>,
    /// Stopped by its owner: an incarnation spawned from now on is stopped at once.
    closed: bool,
}

impl<W: Work> Restartable<W> {
    /// The current incarnation (none once stopped).
    pub fn current(&self) -> Option<ComputeHandle<W>> {
        self.slot.lock().ok().and_then(|s| s.handle.clone())
    }

    /// The current incarnation's status.
    pub async fn status(&self) -> ComputeStatus<W::Detail> {
        match self.current() {
            Some(h) => h.status().await,
            None => ComputeStatus {
                name: self.name.clone(),
                state: ComputeState::Stopped,
                ..Default::default()
            },
        }
    }

    /// Stops the current incarnation, and any the supervisor is still building.
    pub async fn stop(self) {
        let h = self.slot.lock().ok().and_then(|mut s| {
            s.closed = true;
            s.handle.take()
        });
        if let Some(h) = h {
            h.stop().await;
        }
    }
}

/// Spawns a compute actor linked to `supervisor`; its work is built (on its own thread) before this
/// returns.
async fn spawn_in<W: Work>(
    supervisor: ActorCell,
    spec: ComputeSpec<W>,
) -> Result<ComputeHandle<W>, RuntimeError> {
    let name = spec.name.clone();
    let status: compute::Shared<W::Detail> = Arc::new(Mutex::new(ComputeStatus {
        name: name.clone(),
        device: spec.device.clone(),
        ..Default::default()
    }));
    let actor = ComputeActor::<W>(PhantomData);
    let args = (spec, status.clone());
    let (r, join) = Actor::spawn_linked(None, actor, args, supervisor)
        .await
        .map_err(|e| spawn_error(&name, e))?;
    Ok(ComputeHandle::new(name, r, join, status))
}

/// A running supervisor; its children are the compute actors it spawned.
pub struct Supervisor {
    actor: ActorRef<Never>,
    join: tokio::task::JoinHandle<()>,
    shared: Arc<Shared>,
}

impl Supervisor {
    /// Starts a supervisor named `name` (in logs) with `policy`; `on_report` hears every failure and
    /// restart and `metrics`, when given, counts them (`deem_actor_failures_total`,
    /// `deem_actor_restarts_total`, `deem_actor_recovery_seconds`).
    pub async fn start(
        name: &str,
        policy: Policy,
        on_report: Option<OnReport>,
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Self, RuntimeError> {
        let shared = Arc::new(Shared {
            name: name.to_string(),
            policy,
            children: Mutex::new(HashMap::new()),
            failures: Mutex::new(Vec::new()),
            down: Mutex::new(Vec::new()),
            recent: Mutex::new(VecDeque::new()),
            restarts: AtomicU32::new(0),
            on_report,
            metrics,
        });
        let (actor, join) = Actor::spawn(None, SupervisorActor, shared.clone())
            .await
            .map_err(|e| RuntimeError::Supervisor(e.to_string()))?;
        Ok(Supervisor {
            actor,
            join,
            shared,
        })
    }

    /// Spawns a compute actor linked to this supervisor; its work is built (on its own thread) before
    /// this returns.
    pub async fn spawn<W: Work>(
        &self,
        spec: ComputeSpec<W>,
    ) -> Result<ComputeHandle<W>, RuntimeError> {
        let h = spawn_in(self.actor.get_cell(), spec).await?;
        self.register(h.id(), &h.name, None);
        Ok(h)
    }

    /// [`Self::spawn`] for a child the supervisor may rebuild in place: `make(n)` gives the spec of
    /// incarnation `n` (0 first), each call a fresh build of the same work.
    pub async fn spawn_restartable<W: Work>(
        &self,
        make: impl Fn(u32) -> ComputeSpec<W> + Send + Sync + 'static,
    ) -> Result<Restartable<W>, RuntimeError> {
        let make = Arc::new(make);
        let first = spawn_in(self.actor.get_cell(), make(0)).await?;
        let (id, name) = (first.id(), first.name.clone());
        let slot = Arc::new(Mutex::new(Slot {
            handle: Some(first),
            closed: false,
        }));
        let respawn: Respawn = {
            let slot = slot.clone();
            Arc::new(move |cell, n| {
                let (make, slot) = (make.clone(), slot.clone());
                Box::pin(async move {
                    let h = spawn_in(cell, make(n)).await?;
                    let id = h.id();
                    let late = match slot.lock() {
                        Ok(mut s) if !s.closed => {
                            // The failed incarnation's handle goes; its actor has already ended.
                            s.handle = Some(h);
                            None
                        }
                        _ => Some(h),
                    };
                    // Its owner stopped it while it was being rebuilt.
                    if let Some(h) = late {
                        h.stop().await;
                    }
                    Ok(id)
                })
            })
        };
        self.register(id, &name, Some(respawn));
        Ok(Restartable { name, slot })
    }

    fn register(&self, id: ActorId, name: &str, respawn: Option<Respawn>) {
        if let Ok(mut c) = self.shared.children.lock() {
            let name = name.to_string();
            c.insert(
                id,
                Child {
                    name,
                    respawn,
                    incarnation: 0,
                },
            );
        }
    }

    /// Hands on a report about what the supervisor could not see itself (a worker in another process
    /// failed or restarted, a peer lost) exactly as one of its children's: logged, counted, kept, and
    /// told to the owner.
    pub fn reporter(&self) -> OnReport {
        let shared = self.shared.clone();
        Arc::new(move |r: &Report| match r {
            Report::Failed(f) => shared.record(f.clone()),
            Report::Restarted(r) => shared.recovered(r.clone()),
        })
    }

    /// The children (and remote workers, ranks) that failed and are not running again, in the order
    /// they failed.
    pub fn down(&self) -> Vec<String> {
        self.shared
            .down
            .lock()
            .map(|d| d.clone())
            .unwrap_or_default()
    }

    /// Every failure heard so far, oldest first.
    pub fn failures(&self) -> Vec<Failure> {
        self.shared
            .failures
            .lock()
            .map(|f| f.clone())
            .unwrap_or_default()
    }

    /// Restarts done under [`Policy::RestartAll`].
    pub fn restarts(&self) -> u32 {
        self.shared.restarts.load(Ordering::SeqCst)
    }

    /// Training's policy after a failed step (`failed` says how it failed): takes one restart from the
    /// budget and runs `restart` (stop every actor, spawn them afresh under this supervisor, restore the
    /// latest checkpoint), returning what it returns. With the budget spent, or under
    /// [`Policy::MarkFailed`], nothing restarts and the failure is returned.
    pub async fn restart_all<T, E, F, Fut>(&self, failed: String, restart: F) -> Result<T, E>
    where
        E: From<RuntimeError>,
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<T, E>>,
    {
        let max = match self.shared.policy {
            Policy::RestartAll { max_restarts } => max_restarts,
            Policy::RestartOne { .. } | Policy::MarkFailed => 0,
        };
        let done = self.shared.restarts.load(Ordering::SeqCst);
        if done >= max {
            return Err(RuntimeError::RestartsExhausted { max, failed }.into());
        }
        self.shared.restarts.store(done + 1, Ordering::SeqCst);
        if let Some(m) = &self.shared.metrics {
            m.train_restarts.inc();
        }
        tracing::error!(supervisor = %self.shared.name, restart = done + 1, max,
            "restarting every actor from the latest checkpoint after: {failed}");
        restart().await
    }

    /// Stops the supervisor (its children must have been stopped through their handles first).
    pub async fn stop(self) {
        self.actor.stop(None);
        let _ = self.join.await;
    }
}

/// The compute actor's own error when its start failed, else ractor's.
fn spawn_error(name: &str, e: SpawnErr) -> RuntimeError {
    match e {
        SpawnErr::StartupFailed(inner) => match inner.downcast::<RuntimeError>() {
            Ok(own) => *own,
            Err(other) => RuntimeError::Spawn {
                actor: name.to_string(),
                message: other.to_string(),
            },
        },
        other => RuntimeError::Spawn {
            actor: name.to_string(),
            message: other.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use super::{Policy, Report, Supervisor};
    use crate::runtime::compute::tests::Echo;
    use crate::runtime::compute::{ComputeSpec, ComputeState};

    async fn until(what: &str, mut f: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !f() {
            assert!(std::time::Instant::now() < deadline, "timed out: {what}");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// One-for-one restarts: the failed child alone is rebuilt from its spec (the next incarnation,
    /// fresh state), the owner hears the failure marked `restarting` then the restart; the third
    /// failure within the window finds the budget of two spent and the child stays down; a rebuild
    /// that fails leaves it down too.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn restart_one_rebuilds_the_failed_child_in_place_within_its_budget() {
        let heard: Arc<Mutex<Vec<Report>>> = Arc::default();
        let hook = {
            let heard = heard.clone();
            Arc::new(move |r: &Report| heard.lock().unwrap().push(r.clone()))
        };
        let policy = Policy::RestartOne {
            max_restarts: 2,
            window: Duration::from_secs(600),
        };
        let sup = Supervisor::start("test", policy, Some(hook), None)
            .await
            .unwrap();
        let built: Arc<Mutex<Vec<u32>>> = Arc::default();
        let make = |name: &'static str, fail_from: u32| {
            let built = built.clone();
            move |n: u32| {
                let built = built.clone();
                ComputeSpec {
                    name: name.into(),
                    device: "cpu".into(),
                    threads: None,
                    build: Box::new(move || {
                        built.lock().unwrap().push(n);
                        if n >= fail_from {
                            return Err("no weights for llm.layers.0".into());
                        }
                        Ok(Echo)
                    }),
                    fault_at_job: None,
                }
            }
        };
        let a = sup.spawn_restartable(make("llm0", u32::MAX)).await.unwrap();
        let call = |h: &super::Restartable<Echo>, x: i64| {
            let h = h.current().unwrap();
            async move { h.call(|r| (x, r)).await }
        };
        assert_eq!(call(&a, 4).await.unwrap(), 8);
        for round in 1..=2u32 {
            assert!(call(&a, -1).await.is_err());
            until("the restart", || {
                sup.down().is_empty() && heard.lock().unwrap().len() == 2 * round as usize
            })
            .await;
            // A fresh incarnation: its job count starts again.
            assert_eq!(call(&a, 5).await.unwrap(), 10);
            let s = a.status().await;
            assert_eq!((s.state, s.jobs), (ComputeState::Running, 1));
        }
        let reports = heard.lock().unwrap().clone();
        match (&reports[0], &reports[1], &reports[3]) {
            (Report::Failed(f), Report::Restarted(r), Report::Restarted(r2)) => {
                assert!(f.restarting, "{f:?}");
                assert_eq!(f.actor, "llm0");
                assert!(f.error.contains("boom: -1"), "{f:?}");
                assert_eq!((r.actor.as_str(), r.incarnation), ("llm0", 1));
                assert!(r.recovery_s >= 0.0 && r.recovery_s < 20.0, "{r:?}");
                assert_eq!(r2.incarnation, 2);
            }
            other => panic!("unexpected reports {other:?}"),
        }
        // The third failure within the window: the budget (2) is spent.
        assert!(call(&a, -1).await.is_err());
        until("the failure", || heard.lock().unwrap().len() == 5).await;
        match &heard.lock().unwrap()[4] {
            Report::Failed(f) => assert!(!f.restarting, "{f:?}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(sup.down(), ["llm0"]);
        assert_eq!(a.status().await.state, ComputeState::Failed);
        sup.stop().await;

        // A rebuild that fails: the child stays down, the second failure names the rebuild.
        let heard2: Arc<Mutex<Vec<Report>>> = Arc::default();
        let hook = {
            let heard = heard2.clone();
            Arc::new(move |r: &Report| heard.lock().unwrap().push(r.clone()))
        };
        let sup = Supervisor::start("test", policy, Some(hook), None)
            .await
            .unwrap();
        let b = sup.spawn_restartable(make("llm1", 1)).await.unwrap();
        assert!(call(&b, -3).await.is_err());
        until("the failed rebuild", || heard2.lock().unwrap().len() == 2).await;
        let reports = heard2.lock().unwrap().clone();
        match (&reports[0], &reports[1]) {
            (Report::Failed(first), Report::Failed(rebuild)) => {
                assert!(first.restarting);
                assert!(!rebuild.restarting);
                assert_eq!(
                    rebuild.error,
                    "its restart failed: actor llm1: no weights for llm.layers.0"
                );
            }
            other => panic!("unexpected reports {other:?}"),
        }
        assert_eq!(sup.down(), ["llm1"]);
        b.stop().await;
        a.stop().await;
        sup.stop().await;
    }
}
