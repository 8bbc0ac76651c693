//! Hot reload: the configuration files are polled and re-validated when their content changes.
//!
//! Polling content (not watching inotify events) works the same for editors that write in place,
//! editors that rename over the file, and configuration mounted from a ConfigMap; at the default
//! 500 ms it costs a few small reads per second and keeps the "takes effect within 2 s" promise.

use std::time::Duration;

use super::{current_fingerprint, load, Config, ConfigErrors, Source};

/// Polls `source` every `interval`; calls `apply` with each new valid configuration and `reject`
/// with the errors of each new invalid one (the caller keeps its last good configuration).
pub async fn watch(
    source: Source,
    interval: Duration,
    mut last: u64,
    mut apply: impl FnMut(Config) + Send,
    mut reject: impl FnMut(ConfigErrors) + Send,
) {
    if source == Source::Embedded {
        return;
    }
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let src = source.clone();
        let fingerprint = tokio::task::spawn_blocking(move || current_fingerprint(&src))
            .await
            .ok()
            .flatten();
        match fingerprint {
            Some(f) if f == last => continue,
            _ => {}
        }
        let src = source.clone();
        let Ok(result) = tokio::task::spawn_blocking(move || load(&src)).await else {
            continue;
        };
        match result {
            Ok(config) => {
                last = config.fingerprint;
                apply(config);
            }
            Err(errors) => {
                // Remember the broken content so the same errors are logged once, not every poll.
                if let Some(f) = fingerprint {
                    last = f;
                }
                reject(errors);
            }
        }
    }
}
