//! The bytes of agent frames held at once, across every socket of this node: each
//! socket's reads count against one budget from their first byte, so a few huge frames
//! (or many sockets sending large ones at once) are refused before they are in memory.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::ingest::budget::{FREE_FRAME_BYTES, MAX_IN_FLIGHT_BYTES};

/// This node's budget of frame bytes being read or handled.
#[derive(Debug)]
pub struct InFlight {
    used: AtomicUsize,
    max: usize,
}

impl Default for InFlight {
    fn default() -> Self {
        InFlight::new(MAX_IN_FLIGHT_BYTES)
    }
}

impl InFlight {
    pub fn new(max: usize) -> Self {
        InFlight {
            used: AtomicUsize::new(0),
            max,
        }
    }

    /// Takes `n` bytes of the budget; false (nothing taken) when they do not fit.
    fn take(&self, n: usize) -> bool {
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|total| *total <= self.max)
            })
            .is_ok()
    }

    fn give_back(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }

    /// Bytes counted now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }
}

/// One socket's share: the bytes read since its last whole frame was handled.
#[derive(Debug)]
pub struct Meter {
    budget: Arc<InFlight>,
    read: AtomicUsize,
    taken: AtomicUsize,
}

/// The error a read returns when the node's budget is spent.
#[derive(Debug, thiserror::Error)]
#[error("km holds {MAX_IN_FLIGHT_BYTES} bytes of agent frames already")]
pub struct BudgetSpent;

impl Meter {
    pub fn new(budget: Arc<InFlight>) -> Arc<Meter> {
        Arc::new(Meter {
            budget,
            read: AtomicUsize::new(0),
            taken: AtomicUsize::new(0),
        })
    }

    /// Counts `n` more bytes of the frame being received.
    fn count(&self, n: usize) -> Result<(), BudgetSpent> {
        let read = self.read.fetch_add(n, Ordering::Relaxed) + n;
        let owed = read.saturating_sub(FREE_FRAME_BYTES);
        let taken = self.taken.load(Ordering::Relaxed);
        if owed > taken {
            if !self.budget.take(owed - taken) {
                return Err(BudgetSpent);
            }
            self.taken.store(owed, Ordering::Relaxed);
        }
        Ok(())
    }

    /// The frame read so far was handled: its bytes go back to the budget.
    pub fn settle(&self) {
        self.read.store(0, Ordering::Relaxed);
        self.budget.give_back(self.taken.swap(0, Ordering::Relaxed));
    }
}

impl Drop for Meter {
    fn drop(&mut self) {
        self.settle();
    }
}

/// A connection whose reads are counted by a [`Meter`].
pub struct Metered<T> {
    inner: T,
    meter: Arc<Meter>,
}

impl<T> Metered<T> {
    pub fn new(inner: T, meter: Arc<Meter>) -> Self {
        Metered { inner, meter }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            let n = buf.filled().len() - before;
            if let Err(spent) = this.meter.count(n) {
                return Poll::Ready(Err(io::Error::other(spent)));
            }
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_share_one_budget_beyond_their_free_part() {
        let budget = Arc::new(InFlight::new(100_000));
        let a = Meter::new(budget.clone());
        let b = Meter::new(budget.clone());
        a.count(FREE_FRAME_BYTES).unwrap();
        assert_eq!(budget.used(), 0, "small frames cost nothing");
        a.count(60_000).unwrap();
        assert_eq!(budget.used(), 60_000);
        b.count(FREE_FRAME_BYTES + 30_000).unwrap();
        assert!(b.count(20_000).is_err(), "the budget is spent");
        a.settle();
        assert_eq!(budget.used(), 30_000);
        b.count(20_000).unwrap();
        drop(b);
        assert_eq!(budget.used(), 0, "a closed socket gives its share back");
    }
}
