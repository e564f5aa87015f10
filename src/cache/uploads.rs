//! [`Uploads`]: the background tasks that publish to the tier, counted so that a flush or the
//! shutdown can wait for them.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use tokio::sync::Notify;

/// The background tasks that publish to the tier, counted so that a flush or the
/// shutdown can wait for them (any number of waiters, at any time).
#[derive(Default, Clone)]
pub(super) struct Uploads(Arc<UploadCount>);

#[derive(Default)]
struct UploadCount {
    running: std::sync::atomic::AtomicUsize,
    idle: Notify,
}

/// Counts one upload off however its task ends (done, panicked, or dropped with the runtime).
struct Running(Arc<UploadCount>);

impl Drop for Running {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Uploads {
    #[cfg_attr(not(feature = "s3"), allow(dead_code))]
    pub(super) fn spawn(&self, task: impl std::future::Future<Output = ()> + Send + 'static) {
        self.0.running.fetch_add(1, Ordering::AcqRel);
        let running = Running(Arc::clone(&self.0));
        tokio::spawn(async move {
            task.await;
            drop(running);
        });
    }

    /// Until no upload runs.
    pub(super) async fn idle(&self) {
        loop {
            let notified = self.0.idle.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.0.running.load(Ordering::Acquire) == 0 {
                return;
            }
            notified.await;
        }
    }
}
