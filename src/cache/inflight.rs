//! Coalescing: one running task per key, however many callers ask for it at once.
//!
//! A caller either joins the task already running for its key or starts one. The task is
//! spawned, so it belongs to the map and not to the caller who started it: a caller that is
//! cancelled never cancels it for the others, and a task nobody waits for any more still runs
//! to its end. Every caller gets a clone of the one result, and a drop guard that travels with
//! the task clears the key's slot on every exit path: completion, panic, or the task being
//! dropped before it was ever polled (a runtime shutting down).
//!
//! Each running task also carries a value its callers share (`S`): the download task keeps
//! there what every joined caller asked for, so that no caller's options decide for the
//! others.
//!
//! Generic over the key, the result and the shared value, so that it is tested here on its
//! own.

use std::future::Future;
use std::hash::Hash;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use dashmap::DashMap;
use dashmap::mapref::entry::Entry as MapEntry;
use futures_util::FutureExt;
use futures_util::future::{BoxFuture, Shared};
use tokio::sync::oneshot;

/// The result of a task, shared by every caller that waits on it.
pub(crate) type SharedTask<T> = Shared<BoxFuture<'static, T>>;

struct Running<T, S> {
    /// Tells this task's slot from a later one for the same key.
    id: u64,
    task: SharedTask<T>,
    shared: S,
    /// Stops the task (set once it is spawned).
    abort: Arc<std::sync::OnceLock<tokio::task::AbortHandle>>,
}

/// The running tasks by key.
pub(crate) struct Inflight<K, T, S = ()> {
    // DashMap: joining touches only the one key's shard, so callers for different keys never
    // wait on each other; no guard is ever held across an .await (clippy.toml).
    map: DashMap<K, Running<T, S>>,
    next_id: AtomicU64,
}

/// What [`Inflight::join_or_start`] did.
pub(crate) enum Join<F, T, S = ()> {
    /// The re-check, made while holding the key's vacant slot, found what the caller wanted.
    Found(F),
    /// A task was already running for the key: its result, and the value its callers share.
    Joined(SharedTask<T>, S),
    /// This call started the task: its result, and the value its callers share.
    Started(SharedTask<T>, S),
}

/// Removes its key's slot when dropped, if the slot is still its own. It is moved into the
/// task's future before the task is spawned, so it drops with the task however the task ends.
struct SlotGuard<K: Hash + Eq, T, S> {
    inflight: Arc<Inflight<K, T, S>>,
    key: K,
    id: u64,
}

impl<K: Hash + Eq, T, S> Drop for SlotGuard<K, T, S> {
    fn drop(&mut self) {
        self.inflight
            .map
            .remove_if(&self.key, |_, running| running.id == self.id);
    }
}

impl<K, T, S> Inflight<K, T, S>
where
    K: Hash + Eq + Clone + Send + Sync + 'static,
    T: Clone + Send + Sync + 'static,
    S: Clone + Send + Sync + 'static,
{
    pub(crate) fn new() -> Inflight<K, T, S> {
        Inflight {
            map: DashMap::new(),
            next_id: AtomicU64::new(1),
        }
    }

    /// Joins the task running for `key`, or starts one.
    ///
    /// With the key's slot vacant and held, `recheck` runs first: a task that finished between
    /// the caller's own lookup and this call has cleared its slot only after publishing its
    /// result, so looking again here closes that window. If it finds something, no task is
    /// started. Otherwise `shared` makes the value the task's callers share, the slot is
    /// filled, the key's shard is released, and the future that `start` makes from that value
    /// is spawned on the current runtime with the slot's guard. A task that panics, or is
    /// dropped before it ends, reaches every caller as `lost(reason)`.
    ///
    /// # Panics
    /// When a task must be started outside a Tokio runtime (the slot is cleared first).
    pub(crate) fn join_or_start<F, Fut>(
        self: &Arc<Self>,
        key: &K,
        recheck: impl FnOnce() -> Option<F>,
        shared: impl FnOnce() -> S,
        start: impl FnOnce(S) -> Fut,
        lost: fn(String) -> T,
    ) -> Join<F, T, S>
    where
        Fut: Future<Output = T> + Send + 'static,
    {
        let (id, result, shared) = match self.map.entry(key.clone()) {
            MapEntry::Occupied(running) => {
                let running = running.get();
                return Join::Joined(running.task.clone(), running.shared.clone());
            }
            MapEntry::Vacant(slot) => {
                if let Some(found) = recheck() {
                    return Join::Found(found);
                }
                let id = self.next_id.fetch_add(1, Ordering::Relaxed);
                let (result, receive) = oneshot::channel::<T>();
                let task = async move {
                    receive
                        .await
                        .unwrap_or_else(|_| lost("task ended without a result".into()))
                }
                .boxed()
                .shared();
                let shared = shared();
                let abort = Arc::default();
                slot.insert(Running {
                    id,
                    task: task.clone(),
                    shared: shared.clone(),
                    abort: Arc::clone(&abort),
                });
                (id, (result, task, abort), shared)
            }
        };
        // Spawned with the shard released: the guard may drop at once (a runtime shutting
        // down drops what is spawned on it), and dropping it takes the shard.
        let (send, task, abort) = result;
        let guard = SlotGuard {
            inflight: Arc::clone(self),
            key: key.clone(),
            id,
        };
        let work = start(shared.clone());
        let spawned = tokio::spawn(async move {
            let output = match AssertUnwindSafe(work).catch_unwind().await {
                Ok(output) => output,
                Err(panic) => lost(format!("task panicked: {}", panic_message(&*panic))),
            };
            // The slot goes before the result is sent, as a plain `Drop` at the end of the
            // task would: a caller that has the result and asks again (a refresh, a retry
            // after an error) starts a new task instead of joining this finished one. The
            // work, the commit included, is done by now, so a caller that finds no slot
            // finds what it committed. Dropping the slot here drops no result under the
            // map's lock: none has been sent yet.
            drop(guard);
            // With nobody waiting the result comes back, and is dropped here.
            drop(send.send(output));
        });
        let _ = abort.set(spawned.abort_handle());
        Join::Started(task, shared)
    }

    /// Stops every running task: each is dropped where it waits, and its callers get
    /// `lost(..)`. How many were stopped.
    pub(crate) fn abort_all(&self) -> usize {
        let mut stopped = 0;
        for running in self.map.iter() {
            if let Some(abort) = running.value().abort.get() {
                abort.abort();
                stopped += 1;
            }
        }
        stopped
    }

    /// How many tasks are running.
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// The results of every running task, to wait on.
    pub(crate) fn running(&self) -> Vec<SharedTask<T>> {
        self.map.iter().map(|r| r.value().task.clone()).collect()
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "a non-string payload"
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicUsize;
    use std::time::Duration;

    use tokio::sync::oneshot;

    use super::*;

    type Result = std::result::Result<u32, String>;
    type Map = Arc<Inflight<&'static str, Result>>;

    fn map() -> Map {
        Arc::new(Inflight::new())
    }

    fn task<F>(join: Join<F, Result>) -> SharedTask<Result> {
        match join {
            Join::Joined(t, ()) | Join::Started(t, ()) => t,
            Join::Found(_) => panic!("nothing to find"),
        }
    }

    #[tokio::test]
    async fn callers_of_one_key_share_one_task_and_its_result() {
        let inflight = map();
        let starts = Arc::new(AtomicUsize::new(0));
        let (release, gate) = oneshot::channel::<()>();
        let mut gate = Some(gate);
        let mut waits = Vec::new();
        for i in 0..10 {
            let starts = Arc::clone(&starts);
            let gate = gate.take();
            let join = inflight.join_or_start(
                &"a",
                || None::<()>,
                || (),
                move |()| async move {
                    starts.fetch_add(1, Ordering::SeqCst);
                    gate.expect("started once").await.unwrap();
                    Ok(42)
                },
                Err,
            );
            assert_eq!(matches!(join, Join::Started(..)), i == 0);
            waits.push(task(join));
        }
        assert_eq!(inflight.len(), 1);
        release.send(()).unwrap();
        for w in waits {
            assert_eq!(w.await, Ok(42));
        }
        assert_eq!(starts.load(Ordering::SeqCst), 1);
        assert_eq!(inflight.len(), 0, "the slot is cleared after the task ends");
        // The next call starts afresh.
        let again = inflight.join_or_start(&"a", || None::<()>, || (), |()| async { Ok(7) }, Err);
        assert!(matches!(again, Join::Started(..)));
        assert_eq!(task(again).await, Ok(7));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caller_with_the_result_never_finds_the_finished_task_again() {
        let inflight = map();
        for round in 0..200 {
            let first = task(inflight.join_or_start(
                &"a",
                || None::<()>,
                || (),
                move |()| async move { Ok(round) },
                Err,
            ));
            assert_eq!(first.await, Ok(round));
            // Asked again at once, from the same task: a new task, never the old result.
            let again = inflight.join_or_start(
                &"a",
                || None::<()>,
                || (),
                |()| async { Ok(u32::MAX) },
                Err,
            );
            assert!(
                matches!(again, Join::Started(..)),
                "round {round} joined a finished task"
            );
            assert_eq!(task(again).await, Ok(u32::MAX));
        }
    }

    #[tokio::test]
    async fn different_keys_do_not_coalesce() {
        let inflight = map();
        let a = inflight.join_or_start(&"a", || None::<()>, || (), |()| async { Ok(1) }, Err);
        let b = inflight.join_or_start(&"b", || None::<()>, || (), |()| async { Ok(2) }, Err);
        assert!(matches!(a, Join::Started(..)) && matches!(b, Join::Started(..)));
        assert_eq!((task(a).await, task(b).await), (Ok(1), Ok(2)));
    }

    #[tokio::test]
    async fn a_cancelled_starter_does_not_stop_the_task() {
        let inflight = map();
        let (done_tx, done_rx) = oneshot::channel();
        let join = inflight.join_or_start(
            &"a",
            || None::<()>,
            || (),
            move |()| async move {
                tokio::time::sleep(Duration::from_millis(20)).await;
                let _ = done_tx.send(());
                Ok(1)
            },
            Err,
        );
        // The only caller gives up at once.
        drop(task(join));
        done_rx.await.expect("the task ran to its end");
        tokio::task::yield_now().await;
        assert_eq!(inflight.len(), 0);
    }

    #[tokio::test]
    async fn a_panicking_task_fails_every_caller_and_clears_its_slot() {
        let inflight = map();
        let first = task(inflight.join_or_start(
            &"a",
            || None::<()>,
            || (),
            |()| async move {
                tokio::task::yield_now().await;
                panic!("boom");
            },
            Err,
        ));
        let second =
            task(inflight.join_or_start(&"a", || None::<()>, || (), |()| async { Ok(0) }, Err));
        let (a, b) = (first.await, second.await);
        assert!(a.as_ref().is_err_and(|e| e.contains("panic")), "{a:?}");
        assert_eq!(a, b);
        assert_eq!(inflight.len(), 0);
    }

    #[tokio::test]
    async fn the_recheck_can_answer_without_a_task() {
        let inflight = map();
        let join = inflight.join_or_start(
            &"a",
            || Some("found"),
            || (),
            |()| async { panic!("not started") },
            Err,
        );
        assert!(matches!(join, Join::Found("found")));
        assert_eq!(inflight.len(), 0);
        // While a task runs, the recheck is not consulted: callers join.
        let (release, gate) = oneshot::channel::<()>();
        let started = inflight.join_or_start(
            &"a",
            || None::<()>,
            || (),
            |()| async move {
                gate.await.unwrap();
                Ok(3)
            },
            Err,
        );
        let joined = inflight.join_or_start(
            &"a",
            || -> Option<()> { panic!("not consulted while a task runs") },
            || (),
            |()| async { Ok(0) },
            Err,
        );
        assert!(matches!(joined, Join::Joined(..)));
        release.send(()).unwrap();
        assert_eq!(task(started).await, Ok(3));
    }

    #[test]
    fn a_task_dropped_before_its_first_poll_clears_its_slot() {
        let inflight = map();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // Entered, not run: the spawned task is never polled.
        let entered = rt.enter();
        let waiting = task(inflight.join_or_start(
            &"a",
            || None::<()>,
            || (),
            |()| async move { Ok(1) },
            Err,
        ));
        drop(entered);
        assert_eq!(inflight.len(), 1, "spawned, not yet polled");
        // Shutting the runtime down drops the task unpolled.
        drop(rt);
        assert_eq!(inflight.len(), 0);
        let lost = futures_util::FutureExt::now_or_never(waiting).expect("ready");
        assert!(lost.is_err(), "{lost:?}");
    }
}
