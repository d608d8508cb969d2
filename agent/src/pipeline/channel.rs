//! A channel of batches, bounded in items: the pipeline's input, and the probe's hops on the
//! way to it.
//!
//! Events are produced in bursts (one drain of the kernel's ring buffer) and consumed in
//! batches (a plugin call, an export request), so they cross threads as `Vec`s: one channel
//! operation, and one move of a pointer, per batch instead of per event. The bound is in
//! items, as an operator sizes it; a batch that does not fit whole is handed back to the
//! sender, which drops and counts it and never waits.
//!
//! Batches are large (hundreds of kilobytes of events), allocated on one thread and freed on
//! another: the allocator would hand such memory back to the kernel on every free and fault
//! it in again on the next batch. So the receiver gives emptied batches back
//! ([`BatchRx::recycle`]) and the sender fills those ([`BatchTx::buffer`]).

use std::sync::{
    Arc, Mutex,
    atomic::{AtomicUsize, Ordering},
};

use tokio::sync::mpsc;

/// Emptied batches kept for reuse, at most.
const SPARE: usize = 4;

/// What both ends share.
#[derive(Debug)]
struct Shared<T> {
    /// Items sent and not yet received.
    queued: AtomicUsize,
    /// Emptied batches, their capacity kept.
    spare: Mutex<Vec<Vec<T>>>,
}

/// A channel holding at most `capacity` items (at least one) in batches.
pub fn bounded<T>(capacity: usize) -> (BatchTx<T>, BatchRx<T>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let shared = Arc::new(Shared {
        queued: AtomicUsize::new(0),
        spare: Mutex::new(Vec::new()),
    });
    let tx = BatchTx {
        tx,
        shared: shared.clone(),
        capacity: capacity.max(1),
    };
    (tx, BatchRx { rx, shared })
}

/// Why a batch was not sent; it comes back with the error.
#[derive(Debug, PartialEq, Eq)]
pub enum SendError<T> {
    /// The channel has no room for the whole batch now.
    Full(Vec<T>),
    /// The receiver is gone.
    Closed(Vec<T>),
}

/// The sending end. Clones send into the same channel.
#[derive(Debug)]
pub struct BatchTx<T> {
    tx: mpsc::UnboundedSender<Vec<T>>,
    shared: Arc<Shared<T>>,
    capacity: usize,
}

impl<T> Clone for BatchTx<T> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            shared: self.shared.clone(),
            capacity: self.capacity,
        }
    }
}

impl<T> BatchTx<T> {
    /// Sends `batch` whole if the channel has room for all of its items; never waits. An
    /// empty batch is not sent.
    pub fn try_send(&self, batch: Vec<T>) -> Result<(), SendError<T>> {
        let n = batch.len();
        if n == 0 {
            return Ok(());
        }
        let queued = &self.shared.queued;
        if queued.fetch_add(n, Ordering::AcqRel) + n > self.capacity {
            queued.fetch_sub(n, Ordering::AcqRel);
            return Err(SendError::Full(batch));
        }
        self.tx.send(batch).map_err(|e| {
            queued.fetch_sub(n, Ordering::AcqRel);
            SendError::Closed(e.0)
        })
    }

    /// An empty batch to fill: one the receiver gave back when there is one.
    pub fn buffer(&self) -> Vec<T> {
        lock(&self.shared.spare).pop().unwrap_or_default()
    }

    /// The most items the channel holds: a larger batch never fits.
    pub fn max_items(&self) -> usize {
        self.capacity
    }

    /// Room left, in items.
    pub fn capacity(&self) -> usize {
        self.capacity
            .saturating_sub(self.shared.queued.load(Ordering::Acquire))
    }
}

/// The receiving end: taking a batch frees its items' room.
#[derive(Debug)]
pub struct BatchRx<T> {
    rx: mpsc::UnboundedReceiver<Vec<T>>,
    shared: Arc<Shared<T>>,
}

impl<T> BatchRx<T> {
    /// The next batch; `None` once every sender is gone and the channel is empty.
    pub async fn recv(&mut self) -> Option<Vec<T>> {
        let batch = self.rx.recv().await?;
        Some(self.taken(batch))
    }

    /// The next batch, blocking the thread (not for async contexts).
    pub fn blocking_recv(&mut self) -> Option<Vec<T>> {
        let batch = self.rx.blocking_recv()?;
        Some(self.taken(batch))
    }

    /// The next batch if one is waiting.
    pub fn try_recv(&mut self) -> Option<Vec<T>> {
        let batch = self.rx.try_recv().ok()?;
        Some(self.taken(batch))
    }

    /// Refuses further batches; those already sent can still be received.
    pub fn close(&mut self) {
        self.rx.close();
    }

    /// Gives a received batch back for the sender to fill again (emptied here; kept only
    /// while fewer than a few are spare).
    pub fn recycle(&self, mut batch: Vec<T>) {
        batch.clear();
        let mut spare = lock(&self.shared.spare);
        if spare.len() < SPARE && batch.capacity() > 0 {
            spare.push(batch);
        }
    }

    fn taken(&self, batch: Vec<T>) -> Vec<T> {
        self.shared.queued.fetch_sub(batch.len(), Ordering::AcqRel);
        batch
    }
}

/// The spare batches; a panic elsewhere while holding the lock leaves nothing inconsistent.
fn lock<T>(spare: &Mutex<Vec<Vec<T>>>) -> std::sync::MutexGuard<'_, Vec<Vec<T>>> {
    spare.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_channel_holds_at_most_its_capacity_in_items() {
        let (tx, mut rx) = bounded(3);
        tx.try_send(vec![1, 2]).unwrap();
        assert_eq!((tx.capacity(), tx.max_items()), (1, 3));
        // Two more do not fit beside the two waiting: the batch comes back whole.
        assert_eq!(tx.try_send(vec![3, 4]), Err(SendError::Full(vec![3, 4])));
        assert_eq!(
            tx.try_send(Vec::new()),
            Ok(()),
            "an empty batch takes no room"
        );
        // Taking a batch frees its room.
        assert_eq!(rx.try_recv(), Some(vec![1, 2]));
        assert_eq!(rx.try_recv(), None, "the refused batch never arrives");
        assert_eq!(tx.capacity(), 3);
        tx.clone().try_send(vec![5, 6, 7]).unwrap();
        assert_eq!(rx.blocking_recv(), Some(vec![5, 6, 7]));
    }

    #[test]
    fn a_batch_sent_after_the_receiver_closed_comes_back() {
        let (tx, mut rx) = bounded(8);
        tx.try_send(vec![1]).unwrap();
        rx.close();
        assert_eq!(tx.try_send(vec![2]), Err(SendError::Closed(vec![2])));
        assert_eq!(tx.capacity(), 7, "a refused batch leaves no trace");
        assert_eq!(rx.try_recv(), Some(vec![1]), "what was sent before stays");
        drop(tx);
        assert_eq!(rx.try_recv(), None);
    }

    #[test]
    fn received_batches_come_back_empty_with_their_room() {
        let (tx, mut rx) = bounded::<u64>(1 << 20);
        assert_eq!(tx.buffer().capacity(), 0, "nothing to reuse yet");
        let mut batch = tx.buffer();
        batch.extend(0..1000);
        tx.try_send(batch).unwrap();
        let got = rx.try_recv().unwrap();
        let room = got.capacity();
        rx.recycle(got);
        let again = tx.buffer();
        assert!(again.is_empty());
        assert_eq!(again.capacity(), room);
        // A few are kept, not every one.
        for _ in 0..10 {
            rx.recycle(Vec::with_capacity(8));
        }
        let kept = std::iter::from_fn(|| Some(tx.buffer()))
            .take_while(|b| b.capacity() > 0)
            .count();
        assert_eq!(kept, SPARE);
    }

    #[tokio::test]
    async fn recv_ends_when_every_sender_is_gone() {
        let (tx, mut rx) = bounded(8);
        let tx2 = tx.clone();
        tx.try_send(vec!["a"]).unwrap();
        drop(tx);
        drop(tx2);
        assert_eq!(rx.recv().await, Some(vec!["a"]));
        assert_eq!(rx.recv().await, None);
    }
}
