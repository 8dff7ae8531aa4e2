//! A progress bar on stderr while a job runs, fed from the engine's atomic counters.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use blockvault_engine::Progress;
use indicatif::{ProgressBar, ProgressStyle};

pub struct Bar {
    bar: Option<ProgressBar>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Bar {
    /// Starts a bar unless output is quiet, JSON, or not a terminal.
    pub fn start(progress: Arc<Progress>, what: &str, enabled: bool) -> Self {
        if !enabled || !std::io::stderr().is_terminal() {
            return Self {
                bar: None,
                task: None,
            };
        }
        let bar = ProgressBar::new(0);
        bar.set_style(
            ProgressStyle::with_template(
                "{msg} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
            )
            .expect("valid template"),
        );
        bar.set_message(what.to_string());
        let b = bar.clone();
        let task = tokio::spawn(async move {
            loop {
                b.set_length(progress.total());
                b.set_position(progress.done());
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
        Self {
            bar: Some(bar),
            task: Some(task),
        }
    }

    /// Stops and clears the bar (as dropping it does).
    pub fn finish(self) {}
}

impl Drop for Bar {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}
