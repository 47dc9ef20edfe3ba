//! A deadline on each incoming frame.
//!
//! A connection may sit idle between frames as long as it likes (clients keep connections
//! open), but once a frame has begun it must arrive whole within the frame timeout: a peer
//! that sends part of a frame and stalls, or trickles it a byte at a time, is cut off
//! instead of holding the connection (and its buffer) forever.
//!
//! [`FrameDeadline`] wraps the socket and follows the framing as bytes are read: a 4-byte
//! big-endian length, then that many bytes (the layout of
//! [`wire::framed`](space_core::wire::framed)). The deadline runs from the first read that
//! ends inside a frame.
//!
//! It also tells when the peer closed its side ([`FrameDeadline::closed`]): clients never
//! half-close a connection they still read answers from, so the end of their input is the
//! end of the connection, and requests still waiting on it are dropped
//! (`server::run_or_spawn`).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Sleep;
use tokio_util::sync::CancellationToken;

/// Bytes of a frame's length prefix.
const HEADER: usize = 4;

/// A socket whose every incoming frame must arrive within a timeout of its first byte.
pub(crate) struct FrameDeadline<S> {
    inner: S,
    timeout: Duration,
    /// Bytes of the current header read so far, and their values.
    header: [u8; HEADER],
    header_read: usize,
    /// Bytes of the current frame's body still to come.
    body_left: u64,
    /// The deadline of the frame under way, if one is (the timer is kept and reset, so a
    /// connection allocates it once).
    deadline: Option<Pin<Box<Sleep>>>,
    armed: bool,
    /// Cancelled once a read finds the end of the input.
    closed: CancellationToken,
}

impl<S> FrameDeadline<S> {
    pub(crate) fn new(inner: S, timeout: Duration) -> FrameDeadline<S> {
        FrameDeadline {
            inner,
            timeout,
            header: [0; HEADER],
            header_read: 0,
            body_left: 0,
            deadline: None,
            armed: false,
            closed: CancellationToken::new(),
        }
    }

    /// Cancelled once a read finds the end of the peer's input (the peer closed its side,
    /// or its process exited).
    pub(crate) fn closed(&self) -> CancellationToken {
        self.closed.clone()
    }

    /// Whether a frame is under way (part of it read).
    fn mid_frame(&self) -> bool {
        self.header_read > 0
    }

    /// Follows the framing through `bytes`, just read, and arms the deadline when they
    /// end inside a frame (from this read on: whole frames cost no timer at all).
    fn track(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            if self.header_read < HEADER {
                let n = (HEADER - self.header_read).min(bytes.len());
                self.header[self.header_read..self.header_read + n].copy_from_slice(&bytes[..n]);
                self.header_read += n;
                bytes = &bytes[n..];
                if self.header_read == HEADER {
                    self.body_left = u64::from(u32::from_be_bytes(self.header));
                }
            } else {
                let n = (self.body_left.min(bytes.len() as u64)) as usize;
                self.body_left -= n as u64;
                bytes = &bytes[n..];
            }
            if self.header_read == HEADER && self.body_left == 0 {
                // A whole frame: the next one gets its own deadline.
                self.header_read = 0;
                self.armed = false;
            }
        }
        if self.mid_frame() && !self.armed {
            let at = tokio::time::Instant::now() + self.timeout;
            match self.deadline.as_mut() {
                Some(d) => d.as_mut().reset(at),
                None => self.deadline = Some(Box::pin(tokio::time::sleep_until(at))),
            }
            self.armed = true;
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameDeadline<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let room = buf.remaining() > 0;
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = &buf.filled()[before..];
                if read.is_empty() && room {
                    this.closed.cancel();
                }
                this.track(read);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                let expired = this.armed
                    && this
                        .deadline
                        .as_mut()
                        .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "a frame did not arrive whole within {:?} of its first byte",
                            this.timeout
                        ),
                    )))
                } else {
                    Poll::Pending
                }
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameDeadline<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn whole_frames_pass_and_idle_time_between_them_is_fine() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let mut ours = FrameDeadline::new(ours, Duration::from_millis(100));
        peer.write_all(&[0, 0, 0, 2, 7, 8]).await.unwrap();
        let mut got = [0u8; 6];
        ours.read_exact(&mut got).await.unwrap();
        assert_eq!(got, [0, 0, 0, 2, 7, 8]);
        tokio::time::sleep(Duration::from_millis(250)).await;
        peer.write_all(&[0, 0, 0, 0]).await.unwrap();
        let mut header = [0u8; 4];
        ours.read_exact(&mut header).await.unwrap();
    }

    #[tokio::test]
    async fn a_stalled_frame_is_cut_off() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let mut ours = FrameDeadline::new(ours, Duration::from_millis(100));
        peer.write_all(&[0, 0, 0, 9, 1]).await.unwrap();
        let mut buf = [0u8; 16];
        let n = ours.read(&mut buf).await.unwrap();
        assert_eq!(n, 5);
        let err = tokio::time::timeout(Duration::from_secs(5), ours.read(&mut buf))
            .await
            .expect("the deadline ends the wait")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
    }

    #[tokio::test]
    async fn a_trickled_frame_is_cut_off() {
        let (mut peer, ours) = tokio::io::duplex(64);
        let mut ours = FrameDeadline::new(ours, Duration::from_millis(150));
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 16];
            loop {
                match ours.read(&mut buf).await {
                    Ok(0) => return None,
                    Ok(_) => {}
                    Err(e) => return Some(e.kind()),
                }
            }
        });
        peer.write_all(&[0, 0, 0, 100]).await.unwrap();
        for _ in 0..20 {
            if peer.write_all(&[1]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(40)).await;
        }
        assert_eq!(reader.await.unwrap(), Some(io::ErrorKind::TimedOut));
    }
}
