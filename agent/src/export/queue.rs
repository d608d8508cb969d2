//! The export queue: encoded OTLP requests waiting for the sender, bounded in bytes.
//!
//! Pushing never waits. When a new request does not fit, the oldest requests are dropped
//! until it does (the newest telemetry is the most useful once a collector comes back), and
//! the dropped spans are counted.

use std::{
    collections::VecDeque,
    sync::{
        Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use bytes::Bytes;
use tokio::sync::Notify;

/// What a request carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Signal {
    /// `ExportTraceServiceRequest`.
    Traces,
    /// `ExportMetricsServiceRequest`.
    Metrics,
}

impl Signal {
    /// `traces` or `metrics`.
    pub fn as_str(self) -> &'static str {
        match self {
            Signal::Traces => "traces",
            Signal::Metrics => "metrics",
        }
    }
}

/// One encoded request.
#[derive(Debug, Clone)]
pub struct Item {
    /// Traces or metrics.
    pub signal: Signal,
    /// The protobuf-encoded request (uncompressed).
    pub body: Bytes,
    /// Spans in it (0 for metrics).
    pub spans: u64,
}

#[derive(Debug, Default)]
struct Inner {
    items: VecDeque<Item>,
    bytes: usize,
    max_bytes: usize,
}

/// A byte-bounded FIFO that drops its oldest items when full.
#[derive(Debug)]
pub struct Queue {
    inner: Mutex<Inner>,
    notify: Notify,
    /// Items dropped because the queue was full, ever.
    overflows: AtomicU64,
}

/// What a push dropped to make room.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Dropped {
    /// Requests dropped.
    pub items: u64,
    /// Spans in them.
    pub spans: u64,
}

impl Queue {
    /// An empty queue holding at most `max_bytes` of request bodies.
    pub fn new(max_bytes: usize) -> Self {
        Queue {
            inner: Mutex::new(Inner {
                max_bytes,
                ..Inner::default()
            }),
            notify: Notify::new(),
            overflows: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Changes the bound, dropping the oldest items if the queue is now over it.
    pub fn set_max_bytes(&self, max_bytes: usize) -> Dropped {
        let mut inner = self.lock();
        inner.max_bytes = max_bytes;
        let d = Self::shrink(&mut inner, 0);
        drop(inner);
        self.overflows.fetch_add(d.items, Ordering::Relaxed);
        d
    }

    fn shrink(inner: &mut Inner, incoming: usize) -> Dropped {
        let mut d = Dropped::default();
        while !inner.items.is_empty() && inner.bytes + incoming > inner.max_bytes {
            if let Some(old) = inner.items.pop_front() {
                inner.bytes -= old.body.len();
                d.items += 1;
                d.spans += old.spans;
            }
        }
        d
    }

    /// Appends `item`, dropping the oldest items until it fits. An item larger than the whole
    /// bound is dropped itself.
    pub fn push(&self, item: Item) -> Dropped {
        let mut inner = self.lock();
        if item.body.len() > inner.max_bytes {
            return Dropped {
                items: 1,
                spans: item.spans,
            };
        }
        let d = Self::shrink(&mut inner, item.body.len());
        inner.bytes += item.body.len();
        inner.items.push_back(item);
        drop(inner);
        self.overflows.fetch_add(d.items, Ordering::Relaxed);
        self.notify.notify_one();
        d
    }

    /// Takes the oldest item, if any.
    pub fn pop(&self) -> Option<Item> {
        let mut inner = self.lock();
        let item = inner.items.pop_front()?;
        inner.bytes -= item.body.len();
        Some(item)
    }

    /// Resolves when something may have been pushed since the last `pop`.
    pub async fn pushed(&self) {
        self.notify.notified().await
    }

    /// (items, bytes) queued now.
    pub fn depth(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.items.len(), inner.bytes)
    }

    /// How many items were ever dropped because the queue was full.
    pub fn overflows(&self) -> u64 {
        self.overflows.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(n: usize, spans: u64) -> Item {
        Item {
            signal: Signal::Traces,
            body: Bytes::from(vec![0u8; n]),
            spans,
        }
    }

    #[test]
    fn full_queue_drops_the_oldest_and_counts() {
        let q = Queue::new(100);
        assert_eq!(q.push(item(40, 1)), Dropped::default());
        assert_eq!(q.push(item(40, 2)), Dropped::default());
        assert_eq!(q.push(item(40, 3)), Dropped { items: 1, spans: 1 });
        assert_eq!(q.depth(), (2, 80));
        assert_eq!(q.pop().unwrap().spans, 2);
        assert_eq!(q.push(item(101, 9)), Dropped { items: 1, spans: 9 });
        assert_eq!(q.set_max_bytes(10), Dropped { items: 1, spans: 3 });
        assert_eq!(q.depth(), (0, 0));
        assert_eq!(q.overflows(), 2);
    }
}
