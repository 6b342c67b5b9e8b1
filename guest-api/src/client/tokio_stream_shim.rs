//! Small stream adapters over tokio channels (kept local to avoid a dependency
//! on tokio-stream for two wrappers).

use std::pin::Pin;
use std::task::{Context, Poll};

use futures::Stream;
use tokio::sync::{broadcast, mpsc};

/// A `Stream` over an mpsc receiver.
#[derive(Debug)]
pub struct ReceiverStream<T>(mpsc::Receiver<T>);

impl<T> ReceiverStream<T> {
    pub fn new(rx: mpsc::Receiver<T>) -> Self {
        Self(rx)
    }
}

impl<T> Stream for ReceiverStream<T> {
    type Item = T;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.0.poll_recv(cx)
    }
}

/// A `Stream` over a broadcast receiver that skips lag notices.
pub struct BroadcastStream<T>(Pin<Box<dyn Stream<Item = T> + Send>>);

impl<T> std::fmt::Debug for BroadcastStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BroadcastStream")
    }
}

impl<T: Clone + Send + 'static> BroadcastStream<T> {
    pub fn new(rx: broadcast::Receiver<T>) -> Self {
        let s = futures::stream::unfold(rx, |mut rx| async move {
            loop {
                match rx.recv().await {
                    Ok(v) => return Some((v, rx)),
                    Err(broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        });
        Self(Box::pin(s))
    }
}

impl<T> Stream for BroadcastStream<T> {
    type Item = T;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        self.0.as_mut().poll_next(cx)
    }
}
