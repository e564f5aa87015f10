//! Progress bars on stderr while downloads run: one per download (bytes, speed, time
//! left) from the cache's events, and an overall one for `prefetch`.

use std::collections::HashMap;

use imgcache::{Event, ImageCache, Received};
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

/// Progress bars on stderr, one per running download, driven by the cache's events.
pub struct Bars {
    pub multi: MultiProgress,
    task: tokio::task::JoinHandle<()>,
}

impl Bars {
    pub fn start(cache: &ImageCache) -> Bars {
        let multi = MultiProgress::new();
        let mut events = cache.subscribe();
        let shown = multi.clone();
        let task = tokio::spawn(async move {
            let style = ProgressStyle::with_template(
                "{msg:30!} {bar:30} {bytes:>10}/{total_bytes:10} {bytes_per_sec:>12} ETA {eta}",
            )
            .expect("a valid template");
            let mut bars: HashMap<String, ProgressBar> = HashMap::new();
            loop {
                match events.recv().await {
                    Received::Event(Event::DownloadStarted { url, total }) => {
                        let bar = shown.add(ProgressBar::new(total.unwrap_or(0)));
                        bar.set_style(style.clone());
                        bar.set_message(url.rsplit('/').next().unwrap_or("").to_owned());
                        bars.insert(url, bar);
                    }
                    Received::Event(Event::Progress { url, received, .. }) => {
                        if let Some(bar) = bars.get(&url) {
                            bar.set_position(received);
                        }
                    }
                    Received::Event(
                        Event::DownloadFinished { url, .. } | Event::DownloadFailed { url, .. },
                    ) => {
                        if let Some(bar) = bars.remove(&url) {
                            bar.finish_and_clear();
                        }
                    }
                    Received::Closed => break,
                    _ => {}
                }
            }
        });
        Bars { multi, task }
    }

    /// An overall bar of `total` files, below the download bars.
    pub fn overall(&self, total: u64) -> ProgressBar {
        let bar = self.multi.add(ProgressBar::new(total));
        bar.set_style(
            ProgressStyle::with_template("{prefix} {bar:30} {pos}/{len} files, {elapsed}")
                .expect("a valid template"),
        );
        bar.set_prefix("prefetch");
        bar
    }

    pub fn stop(self) {
        self.task.abort();
        let _ = self.multi.clear();
    }
}
