//! Follows a serial console written to a file and timestamps what appears.
//!
//! The same code watches both sides' consoles (our worker's `console.log`, QEMU's
//! `-chardev file`), polling every [`POLL`]: a timestamp is at most one poll
//! interval late on either side.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use tokio::time::Instant;

use super::GUEST_PREFIX;

/// How often the file is read.
pub const POLL: Duration = Duration::from_millis(1);

#[derive(Debug)]
pub struct ConsoleWatch {
    path: PathBuf,
    file: Option<File>,
    data: Vec<u8>,
    since: Instant,
    first_byte: Option<Duration>,
    first_guest_line: Option<Duration>,
}

impl ConsoleWatch {
    /// Times everything from `since` (the start request).
    pub fn new(path: &Path, since: Instant) -> Self {
        Self {
            path: path.to_owned(),
            file: None,
            data: Vec::new(),
            since,
            first_byte: None,
            first_guest_line: None,
        }
    }

    /// Reads what is new (the file may not exist yet).
    pub fn poll(&mut self) -> anyhow::Result<()> {
        if self.file.is_none() {
            match File::open(&self.path) {
                Ok(f) => self.file = Some(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e).with_context(|| format!("opening {}", self.path.display())),
            }
        }
        let Some(f) = self.file.as_mut() else { return Ok(()) };
        let before = self.data.len();
        f.read_to_end(&mut self.data).with_context(|| format!("reading {}", self.path.display()))?;
        if self.data.len() > before {
            let now = self.since.elapsed();
            self.first_byte.get_or_insert(now);
            if self.first_guest_line.is_none() && contains(&self.data, GUEST_PREFIX.as_bytes()) {
                self.first_guest_line = Some(now);
            }
        }
        Ok(())
    }

    pub fn contains(&self, pat: &str) -> bool {
        contains(&self.data, pat.as_bytes())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }

    pub fn first_byte(&self) -> Option<Duration> {
        self.first_byte
    }

    pub fn first_guest_line(&self) -> Option<Duration> {
        self.first_guest_line
    }

    pub fn elapsed(&self) -> Duration {
        self.since.elapsed()
    }

    pub async fn tick(&self) {
        tokio::time::sleep(POLL).await;
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}
