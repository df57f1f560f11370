//! How a pull looks: one progress bar per layer (bytes, rate, state) on a
//! terminal; plain lines on state changes otherwise. Written to stderr so
//! the container's or command's own output stays clean on stdout.

use std::io::Write;
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use podvisor_image::LayerBlob;
use podvisor_image::progress::{LayerEvent, PullProgress};

/// Shows pull progress on stderr.
pub struct PullView {
    bars: Option<MultiProgress>,
    layers: Mutex<Vec<LayerLine>>,
}

struct LayerLine {
    blob: LayerBlob,
    bar: Option<ProgressBar>,
    bytes: u64,
    started: Option<Instant>,
}

impl PullView {
    /// Bars when stderr is a terminal, plain lines otherwise.
    pub fn new() -> PullView {
        let terminal = crate::terminal::is_terminal(std::os::fd::AsFd::as_fd(&std::io::stderr()));
        PullView {
            bars: terminal.then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr())),
            layers: Mutex::new(Vec::new()),
        }
    }

    fn line(&self, text: String) {
        let mut err = std::io::stderr().lock();
        let _ = writeln!(err, "{text}");
    }
}

/// `sha256:0123456789ab`: the short form docker shows.
pub fn short(digest: &str) -> &str {
    &digest[..digest.len().min("sha256:".len() + 12)]
}

/// Bytes in human units (powers of 1000, like docker).
pub fn human_bytes(n: u64) -> String {
    let units = ["B", "kB", "MB", "GB", "TB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1000.0 && u < units.len() - 1 {
        v /= 1000.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", units[u])
    }
}

impl PullProgress for PullView {
    fn layers(&self, layers: &[LayerBlob]) {
        let mut lines = self.layers.lock().unwrap();
        *lines = layers
            .iter()
            .map(|blob| {
                let bar = self.bars.as_ref().map(|m| {
                    let bar = m.add(ProgressBar::new(blob.size));
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{prefix} {msg:<24} [{bar:30}] {binary_bytes:>10}/{binary_total_bytes:<10} {binary_bytes_per_sec}",
                        )
                        .expect("valid template")
                        .progress_chars("=> "),
                    );
                    bar.set_prefix(short(blob.digest.as_str()).to_string());
                    bar.set_message("queued");
                    bar
                });
                LayerLine {
                    blob: blob.clone(),
                    bar,
                    bytes: 0,
                    started: None,
                }
            })
            .collect();
    }

    fn layer(&self, index: usize, event: LayerEvent) {
        let mut lines = self.layers.lock().unwrap();
        let Some(l) = lines.get_mut(index) else {
            return;
        };
        let name = short(l.blob.digest.as_str()).to_string();
        let size = human_bytes(l.blob.size);
        match (&l.bar, event) {
            (_, LayerEvent::Bytes(n)) => {
                l.bytes = n;
                if let Some(bar) = &l.bar {
                    bar.set_position(n);
                }
            }
            (Some(bar), event) => match event {
                LayerEvent::Cached => {
                    bar.set_position(l.blob.size);
                    bar.finish_with_message("already cached");
                }
                LayerEvent::Waiting(holder) => {
                    bar.set_message(format!("waiting for pid {}", holder.pid))
                }
                LayerEvent::Fetching => {
                    l.started = Some(Instant::now());
                    bar.reset_elapsed();
                    bar.set_message("fetching");
                }
                LayerEvent::Building => bar.set_message("building disk"),
                LayerEvent::Done { .. } => bar.finish_with_message("done"),
                LayerEvent::DoneElsewhere => {
                    bar.set_position(l.blob.size);
                    bar.finish_with_message("done by another process");
                }
                LayerEvent::Bytes(_) => {}
            },
            (None, event) => match event {
                LayerEvent::Cached => self.line(format!("{name}: already cached")),
                LayerEvent::Waiting(holder) => self.line(format!(
                    "{name}: waiting for {holder}, which is fetching it"
                )),
                LayerEvent::Fetching => {
                    l.started = Some(Instant::now());
                    self.line(format!("{name}: fetching {size}"));
                }
                LayerEvent::Building => self.line(format!("{name}: verified, building disk")),
                LayerEvent::Done { size: disk } => {
                    let secs = l.started.map(|s| s.elapsed().as_secs_f64()).unwrap_or(0.0);
                    let rate = if secs > 0.0 {
                        format!(" ({}/s)", human_bytes((l.bytes as f64 / secs) as u64))
                    } else {
                        String::new()
                    };
                    self.line(format!(
                        "{name}: done: {} fetched in {secs:.1} s{rate}, disk {}",
                        human_bytes(l.bytes),
                        human_bytes(disk)
                    ));
                }
                LayerEvent::DoneElsewhere => self.line(format!("{name}: done by another process")),
                LayerEvent::Bytes(_) => {}
            },
        }
    }
}
