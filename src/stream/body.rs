//! The response body of a stream: an `http_body::Body` that polls its
//! [`Subscription`] directly, so a stream costs no task, queue or timer of its
//! own. Its writer ([`super::http1::Pump`] for HTTP/1.1, hyper for HTTP/2)
//! polls it whenever the connection can take more bytes and writes the
//! frames it has by then in one vectored write; a client that stops reading
//! stops being polled and so holds no more than its socket buffers.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};

use crate::hub::{Chunk, Subscription};
use crate::limits::StreamSlot;

pub struct SseBody {
    sub: Subscription,
    /// The shared event body that follows a multi-topic stream's id line.
    second: Option<Bytes>,
    /// The stream's place in its address's count, given back with the body.
    _slot: Option<StreamSlot>,
}

impl SseBody {
    pub fn new(sub: Subscription) -> Self {
        SseBody {
            sub,
            second: None,
            _slot: None,
        }
    }

    /// The frames ready now, up to `max`, in one go (see
    /// [`Subscription::take_ready`]; with `chunks`, each one an HTTP/1.1
    /// chunk already); `poll_frame` must follow.
    pub fn take_ready(&mut self, max: usize, chunks: bool, out: &mut impl Extend<Bytes>) -> usize {
        if self.second.is_some() {
            return 0;
        }
        self.sub.take_ready(max, chunks, out)
    }

    /// Holds `slot` (`--max-streams-per-ip`) for as long as the stream lasts.
    pub fn holding(mut self, slot: Option<StreamSlot>) -> Self {
        self._slot = slot;
        self
    }
}

impl Body for SseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if let Some(body) = this.second.take() {
            return Poll::Ready(Some(Ok(Frame::data(body))));
        }
        match this.sub.poll_next(cx) {
            Poll::Ready(Some(Chunk::One(bytes))) => Poll::Ready(Some(Ok(Frame::data(bytes)))),
            Poll::Ready(Some(Chunk::Two(id, body))) => {
                this.second = Some(body);
                Poll::Ready(Some(Ok(Frame::data(id))))
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }
}
