//! Which protocol a new stream-plane connection speaks (HTTP/1.1, or h2c
//! with prior knowledge), told by peeking at its first bytes.
//!
//! hyper-util's auto builder reads those bytes and hands them back through
//! a rewind buffer, which makes hyper's first read return only them: its
//! HTTP/1 read buffer then grows from 8 to 16 KiB for the rest of the
//! request, and keeps that size for the life of the stream. Peeking leaves
//! the bytes in the socket, so hyper reads the whole request into the
//! buffer it starts with. Idle streams are most of what a gateway holds, so
//! those 8 KiB per connection are most of its memory (see PERFORMANCE.md).

use std::io;
use std::time::Duration;

use tokio::net::TcpStream;

/// What a client sends first on an HTTP/2 connection with prior knowledge.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How long to wait before peeking again at a connection that has sent
/// part of the HTTP/2 preface (a peek returns at once while anything is
/// unread, so waiting for readiness would spin).
const PARTIAL_PREFACE_RETRY: Duration = Duration::from_millis(5);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Http1,
    Http2,
}

/// Waits until `stream`'s first bytes tell the protocol, without consuming
/// them. A connection closed before it sent anything is `Http1`: hyper then
/// sees the end of the stream itself. The caller bounds the wait (the
/// header read timeout): a client may send a partial preface and stop.
pub async fn sniff(stream: &TcpStream) -> io::Result<Protocol> {
    let mut buf = [0u8; H2_PREFACE.len()];
    loop {
        let n = stream.peek(&mut buf).await?;
        if let Some(protocol) = classify(&buf[..n]) {
            return Ok(protocol);
        }
        tokio::time::sleep(PARTIAL_PREFACE_RETRY).await;
    }
}

/// The protocol that `first` (a connection's first bytes, as many as have
/// arrived) starts, or `None` while it could still be either.
fn classify(first: &[u8]) -> Option<Protocol> {
    if first.is_empty() || !H2_PREFACE.starts_with(first) {
        Some(Protocol::Http1)
    } else if first.len() == H2_PREFACE.len() {
        Some(Protocol::Http2)
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_by_the_preface() {
        assert_eq!(
            classify(b"GET /stream?topic=a HTTP/1.1\r\n"),
            Some(Protocol::Http1)
        );
        assert_eq!(classify(b"P"), None);
        assert_eq!(classify(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(classify(b"PRI * HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(classify(H2_PREFACE), Some(Protocol::Http2));
        // A connection closed before sending anything: hyper reports it.
        assert_eq!(classify(b""), Some(Protocol::Http1));
    }

    #[tokio::test]
    async fn peeking_consumes_nothing() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (mut server, _) = listener.accept().await.unwrap();
        // The preface in two parts: the first is not enough to tell.
        client.write_all(&H2_PREFACE[..10]).await.unwrap();
        let sniffing = tokio::spawn(async move {
            let protocol = sniff(&server).await.unwrap();
            let mut all = [0u8; H2_PREFACE.len()];
            server.read_exact(&mut all).await.unwrap();
            (protocol, all)
        });
        tokio::task::yield_now().await;
        client.write_all(&H2_PREFACE[10..]).await.unwrap();
        let (protocol, all) = sniffing.await.unwrap();
        assert_eq!(protocol, Protocol::Http2);
        assert_eq!(&all[..], H2_PREFACE);
    }
}
