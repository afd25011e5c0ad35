//! The watch feed: a stream of [`Event`]s from a revision on, history then live.
//!
//! The state machine keeps the newest events in its sled tree (see
//! `state_machine.rs`) and, after each applied batch is written, sends the batch's
//! events on a `tokio::sync::broadcast` channel. A watcher subscribes to that
//! channel *before* it notes the current revision (both under the state machine's
//! read lock, so no apply runs in between), then pages through the stored history
//! up to that revision, then follows the channel, dropping live events at or below
//! the last revision it has delivered. That gives no gap and no duplicate.
//!
//! Nothing here is durable: a watcher that falls behind the channel, or whose
//! history is compacted or replaced by a snapshot while it reads, ends with a
//! [`WatchError`] saying where to resume.

use std::collections::VecDeque;
use std::sync::Arc;

use futures::Stream;
use tokio::sync::broadcast;

use crate::command::Event;
use crate::store::StoreError;

/// Capacity of the live feed, in applied batches (one apply call = one message).
pub(crate) const FEED_CAPACITY: usize = 4096;

/// Events read from the stored history per page.
const HISTORY_PAGE: usize = 256;

/// Why a watch stream ended.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The events from `requested` on are no longer kept; watch from `oldest` or
    /// later (after re-reading the current values).
    #[error("revision {requested} is compacted; the oldest watchable revision is {oldest}")]
    Compacted { requested: u64, oldest: u64 },
    /// The watcher fell behind the live feed; every event before `resume_from`
    /// was delivered, so a new watch from `resume_from` continues without a gap.
    #[error("watcher fell behind the live feed; resume from revision {resume_from}")]
    Lagged { resume_from: u64 },
    /// Reading the stored history failed.
    #[error("reading the event history failed")]
    Store(#[from] StoreError),
}

/// What the state machine sends on the live feed.
#[derive(Debug, Clone)]
pub(crate) enum FeedItem {
    /// The events of one applied batch, in revision order.
    Events(Arc<[Event]>),
    /// A snapshot replaced the whole key space at `revision`; history before it is gone.
    Reset { revision: u64 },
}

/// A position in the stored history: the next (revision, sequence) to read.
pub(crate) type HistoryPos = (u64, u32);

/// One page of stored history.
#[derive(Debug)]
pub(crate) struct HistoryPage {
    pub events: Vec<Event>,
    /// Where the next page starts; None when the history up to the bound is read.
    pub next: Option<HistoryPos>,
}

/// The stored event history, as the state machine exposes it to watchers.
pub(crate) trait History: Send + Sync + 'static {
    /// Reads up to `max` events from `pos` through revision `until` (inclusive).
    /// Fails with [`WatchError::Compacted`] if events at `pos` were already dropped.
    fn read_history(&self, pos: HistoryPos, until: u64, max: usize) -> Result<HistoryPage, WatchError>;
}

/// How a watch starts; made by the state machine under its read lock.
pub(crate) struct WatchStart {
    pub feed: broadcast::Receiver<FeedItem>,
    /// Current revision when `feed` was subscribed.
    pub revision: u64,
    /// Where to replay history from; None = no replay.
    pub replay_from: Option<u64>,
    pub history: Arc<dyn History>,
}

struct Watcher {
    /// Some while replaying history; dropped after, so a live watcher holds only
    /// the feed and ends when the state machine is dropped.
    history: Option<Arc<dyn History>>,
    pos: HistoryPos,
    replay_until: u64,
    /// Highest revision whose events were all delivered (or were before the start).
    delivered: u64,
    feed: broadcast::Receiver<FeedItem>,
    prefix: String,
    buf: VecDeque<Event>,
    done: bool,
}

impl Watcher {
    async fn next(&mut self) -> Option<Result<Event, WatchError>> {
        loop {
            if let Some(event) = self.buf.pop_front() {
                return Some(Ok(event));
            }
            if self.done {
                return None;
            }
            if let Some(history) = &self.history {
                match history.read_history(self.pos, self.replay_until, HISTORY_PAGE) {
                    Err(e) => return self.fail(e),
                    Ok(page) => {
                        let prefix = &self.prefix;
                        self.buf.extend(page.events.into_iter().filter(|e| e.kv.key.starts_with(prefix)));
                        match page.next {
                            Some(pos) => self.pos = pos,
                            None => self.history = None,
                        }
                    }
                }
                continue;
            }
            match self.feed.recv().await {
                Ok(FeedItem::Events(events)) => {
                    let prefix = &self.prefix;
                    let delivered = self.delivered;
                    self.buf.extend(
                        events
                            .iter()
                            .filter(|e| e.revision > delivered && e.kv.key.starts_with(prefix))
                            .cloned(),
                    );
                    if let Some(last) = events.last() {
                        self.delivered = self.delivered.max(last.revision);
                    }
                }
                Ok(FeedItem::Reset { revision }) => {
                    if revision > self.delivered {
                        let requested = self.delivered + 1;
                        return self.fail(WatchError::Compacted { requested, oldest: revision + 1 });
                    }
                }
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, resume_from = self.delivered + 1, "watcher lagged");
                    let resume_from = self.delivered + 1;
                    return self.fail(WatchError::Lagged { resume_from });
                }
                Err(broadcast::error::RecvError::Closed) => {
                    self.done = true;
                }
            }
        }
    }

    fn fail(&mut self, e: WatchError) -> Option<Result<Event, WatchError>> {
        self.done = true;
        self.history = None;
        Some(Err(e))
    }
}

/// Builds the watch stream: history from `replay_from` (if any) through the start
/// revision, then live events, all filtered by key prefix.
pub(crate) fn stream(
    start: WatchStart,
    prefix: String,
) -> impl Stream<Item = Result<Event, WatchError>> + Send + Unpin + 'static {
    let (history, pos, delivered) = match start.replay_from {
        // Replay covers (replay_from ..= revision); live events above it follow.
        Some(from) if from <= start.revision => (Some(start.history), (from, 0), start.revision),
        // Starting in the future: skip live events before `from`.
        Some(from) => (None, (from, 0), from - 1),
        None => (None, (0, 0), start.revision),
    };
    let watcher = Watcher {
        history,
        pos,
        replay_until: start.revision,
        delivered,
        feed: start.feed,
        prefix,
        buf: VecDeque::new(),
        done: false,
    };
    Box::pin(futures::stream::unfold(watcher, |mut w| async move {
        let item = w.next().await?;
        Some((item, w))
    }))
}
