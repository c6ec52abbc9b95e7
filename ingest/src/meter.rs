//! The bytes of agent frames held at once, across every socket of this node. The reader
//! follows the websocket frame headers: a message beyond its first [`FREE_FRAME_BYTES`]
//! reserves the length each frame declares before its payload is read, waiting (with TCP
//! holding the agent back) while the node's budget is taken. Frames are reserved whole,
//! so two large frames never each hold half of the budget waiting for the rest.

use parking_lot::Mutex;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::budget::{FREE_FRAME_BYTES, MAX_IN_FLIGHT_BYTES, MAX_IN_FLIGHT_WAIT};

/// This node's budget of frame bytes being read or handled, in bytes.
#[derive(Debug)]
pub struct InFlight {
    bytes: Arc<Semaphore>,
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
            bytes: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// Bytes reserved now.
    pub fn used(&self) -> usize {
        self.max - self.bytes.available_permits()
    }
}

/// The error a read returns when a frame found no room within [`MAX_IN_FLIGHT_WAIT`].
#[derive(Debug, thiserror::Error)]
#[error("km holds {MAX_IN_FLIGHT_BYTES} bytes of agent frames already")]
pub struct BudgetSpent;

/// One socket's reservations, held until the message they are for was handled.
#[derive(Debug)]
pub struct Meter {
    budget: Arc<InFlight>,
    held: Mutex<Vec<OwnedSemaphorePermit>>,
}

impl Meter {
    pub fn new(budget: Arc<InFlight>) -> Arc<Meter> {
        Arc::new(Meter {
            budget,
            held: Mutex::new(Vec::new()),
        })
    }

    /// The message read so far was handled: its bytes go back to the budget.
    pub fn settle(&self) {
        self.held.lock().clear();
    }
}

/// Where the reader is in the stream of websocket frames.
#[derive(Debug, Default)]
struct Frames {
    /// The header read so far (2 to 14 bytes).
    header: Vec<u8>,
    /// Payload bytes of the current frame still to come.
    payload_left: u64,
    /// Payload bytes of the current message so far (its data frames).
    message: u64,
}

impl Frames {
    /// Follows `bytes`; returns the bytes to reserve for frames whose header completed.
    fn follow(&mut self, mut bytes: &[u8]) -> u64 {
        let mut reserve = 0;
        while !bytes.is_empty() {
            if self.payload_left > 0 {
                let n = self.payload_left.min(bytes.len() as u64);
                self.payload_left -= n;
                bytes = &bytes[n as usize..];
                continue;
            }
            self.header.push(bytes[0]);
            bytes = &bytes[1..];
            let Some((fin, control, length)) = parse_header(&self.header) else {
                continue;
            };
            self.header.clear();
            self.payload_left = length;
            if control {
                continue;
            }
            // Only what goes beyond the message's free part is reserved.
            let before = self.message.max(FREE_FRAME_BYTES as u64);
            self.message = self.message.saturating_add(length);
            reserve += self.message.saturating_sub(before);
            if fin {
                self.message = 0;
            }
        }
        reserve
    }
}

/// A complete header's (final, control, payload length); `None` while bytes are missing.
fn parse_header(header: &[u8]) -> Option<(bool, bool, u64)> {
    let [first, second, rest @ ..] = header else {
        return None;
    };
    let masked = second & 0x80 != 0;
    let (length, extended) = match second & 0x7f {
        126 => (
            u64::from(u16::from_be_bytes(rest.get(..2)?.try_into().ok()?)),
            2,
        ),
        127 => (u64::from_be_bytes(rest.get(..8)?.try_into().ok()?), 8),
        n => (u64::from(n), 0),
    };
    let needed = 2 + extended + if masked { 4 } else { 0 };
    (header.len() >= needed).then_some((first & 0x80 != 0, first & 0x08 != 0, length))
}

type Reservation = Pin<Box<dyn Future<Output = Option<OwnedSemaphorePermit>> + Send>>;

/// A connection whose reads are metered: see the module's documentation.
pub struct Metered<T> {
    inner: T,
    meter: Arc<Meter>,
    frames: Frames,
    /// Bytes to reserve before reading on.
    owed: u64,
    waiting: Option<Reservation>,
}

impl<T> Metered<T> {
    pub fn new(inner: T, meter: Arc<Meter>) -> Self {
        Metered {
            inner,
            meter,
            frames: Frames::default(),
            owed: 0,
            waiting: None,
        }
    }

    /// Reserves what is owed; `Pending` while waiting for room.
    fn poll_reserve(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if self.owed == 0 {
            return Poll::Ready(Ok(()));
        }
        let waiting = self.waiting.get_or_insert_with(|| {
            let bytes = self.meter.budget.bytes.clone();
            let owed = u32::try_from(self.owed).unwrap_or(u32::MAX);
            Box::pin(async move {
                let acquire = bytes.acquire_many_owned(owed);
                tokio::time::timeout(MAX_IN_FLIGHT_WAIT, acquire)
                    .await
                    .ok()?
                    .ok()
            })
        });
        let permit = std::task::ready!(waiting.as_mut().poll(cx));
        self.waiting = None;
        let permit = permit.ok_or_else(|| io::Error::other(BudgetSpent))?;
        self.meter.held.lock().push(permit);
        self.owed = 0;
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        std::task::ready!(this.poll_reserve(cx))?;
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = polled {
            this.owed = this
                .owed
                .saturating_add(this.frames.follow(&buf.filled()[before..]));
            // More than the whole budget never fits.
            if this.owed > MAX_IN_FLIGHT_BYTES as u64 {
                return Poll::Ready(Err(io::Error::other(BudgetSpent)));
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

    /// A masked client frame header for a payload of `len` bytes.
    fn header(fin: bool, opcode: u8, len: u64) -> Vec<u8> {
        let mut h = vec![u8::from(fin) << 7 | opcode];
        match len {
            0..=125 => h.push(0x80 | len as u8),
            126..=65_535 => {
                h.push(0x80 | 126);
                h.extend((len as u16).to_be_bytes());
            }
            _ => {
                h.push(0x80 | 127);
                h.extend(len.to_be_bytes());
            }
        }
        h.extend([1, 2, 3, 4]);
        h
    }

    #[test]
    fn small_frames_reserve_nothing_large_ones_their_length() {
        let mut frames = Frames::default();
        let mut stream = header(true, 1, 10);
        stream.extend([b'x'; 10]);
        assert_eq!(frames.follow(&stream), 0);
        let big = 1 << 20;
        let head = header(true, 1, big);
        // Split anywhere: the header is followed across reads.
        assert_eq!(frames.follow(&head[..3]), 0);
        assert_eq!(frames.follow(&head[3..]), big - FREE_FRAME_BYTES as u64);
        assert_eq!(frames.follow(&vec![0; big as usize]), 0);
        // A ping between fragments counts for nothing; fragments add up.
        let mut stream = header(false, 1, 40_000);
        stream.extend(vec![0; 40_000]);
        stream.extend(header(true, 9, 0));
        stream.extend(header(true, 0, 40_000));
        assert_eq!(frames.follow(&stream), 80_000 - FREE_FRAME_BYTES as u64);
    }

    use std::time::Duration;

    #[tokio::test]
    async fn frames_wait_for_room_then_read_on() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let budget = Arc::new(InFlight::new(2 << 20));
        let (mut client, server) = tokio::io::duplex(4 << 20);
        let meter = Meter::new(budget.clone());
        let mut reader = Metered::new(server, meter.clone());
        let other = Meter::new(budget.clone());
        // Another socket holds all but 1 MB.
        let permit = budget
            .bytes
            .clone()
            .acquire_many_owned(1 << 20)
            .await
            .unwrap();
        other.held.lock().push(permit);
        let len = (1 << 20) + FREE_FRAME_BYTES as u64 + 1;
        client.write_all(&header(true, 2, len)).await.unwrap();
        client.write_all(&vec![0; len as usize]).await.unwrap();
        let mut buf = vec![0; 1 << 16];
        let n = reader.read(&mut buf).await.unwrap();
        assert!(n > 0);
        let next = tokio::time::timeout(Duration::from_millis(200), reader.read(&mut buf)).await;
        assert!(next.is_err(), "the frame waits for room");
        other.settle();
        let n = reader.read(&mut buf).await.unwrap();
        assert!(n > 0, "read on once there is room");
        assert_eq!(budget.used(), (len - FREE_FRAME_BYTES as u64) as usize);
        meter.settle();
        assert_eq!(budget.used(), 0);
    }
}
