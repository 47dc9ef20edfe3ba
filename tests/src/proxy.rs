//! A fault-injecting TCP proxy for tests. Every connection to it is forwarded to one
//! target; the test decides what the link does: pass everything, cut (every connection
//! dropped, new ones refused: what a dead peer looks like), black-hole (connections
//! held open, nothing passes either way: a partition TCP cannot see, until it heals and
//! what was held flows on), or hold only what the target sends back (requests arrive and
//! are served; their answers are lost on the way).

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// What a [`Proxy`]'s link does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Link {
    /// Everything passes.
    Open,
    /// Connections are dropped and new ones refused.
    Cut,
    /// Connections stay open and nothing passes.
    Blackhole,
    /// What is sent to the target passes; what it sends back is held, as in a black-hole.
    HoldReplies,
}

/// Which way a pump copies.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Way {
    ToTarget,
    FromTarget,
}

/// A proxy to one target, running on the current tokio runtime until dropped.
pub struct Proxy {
    addr: SocketAddr,
    link: watch::Sender<Link>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Starts a proxy to `target` on a free loopback port.
    ///
    /// # Errors
    /// When no port can be bound.
    pub async fn start(target: SocketAddr) -> std::io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let (link, watching) = watch::channel(Link::Open);
        let accept = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let link = watching.clone();
                if *link.borrow() == Link::Cut {
                    continue;
                }
                tokio::spawn(async move {
                    if let Ok(outbound) = TcpStream::connect(target).await {
                        let _ = inbound.set_nodelay(true);
                        let _ = outbound.set_nodelay(true);
                        let (ri, wi) = inbound.into_split();
                        let (ro, wo) = outbound.into_split();
                        tokio::join!(
                            pump(ri, wo, link.clone(), Way::ToTarget),
                            pump(ro, wi, link, Way::FromTarget)
                        );
                    }
                });
            }
        });
        Ok(Proxy { addr, link, accept })
    }

    /// Where to connect to reach the target through the proxy.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Changes what the link does, for the connections open now and the next ones.
    pub fn set(&self, link: Link) {
        let _ = self.link.send(link);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        // Ends every connection's pumps, and the listener.
        let _ = self.link.send(Link::Cut);
        self.accept.abort();
    }
}

/// Copies from `from` to `to` (the `way` it goes) while the link is open; holds while it
/// is black-holed (or holds replies, and this is the way back); stops (closing `to`) when
/// it is cut or either side ends.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut link: watch::Receiver<Link>,
    way: Way,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let holds = match *link.borrow_and_update() {
            Link::Cut => break,
            Link::Open => false,
            Link::Blackhole => true,
            Link::HoldReplies => way == Way::FromTarget,
        };
        if holds {
            if link.changed().await.is_err() {
                break;
            }
            continue;
        }
        tokio::select! {
            // A change of the link is seen before bytes that are ready: what is sent
            // after a black-hole began does not pass.
            biased;
            changed = link.changed() => if changed.is_err() { break },
            read = from.read(&mut buf) => match read {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    // Bytes read before a black-hole began are still delivered; nothing
                    // more is read until it heals.
                    if to.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            },
        }
    }
    let _ = tokio::time::timeout(Duration::from_millis(100), to.shutdown()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = [0u8; 1024];
                    while let Ok(n) = s.read(&mut buf).await {
                        if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                    }
                });
            }
        });
        addr
    }

    async fn echo(s: &mut TcpStream, wait: Duration) -> Option<Vec<u8>> {
        s.write_all(b"ping").await.ok()?;
        let mut buf = [0u8; 4];
        match tokio::time::timeout(wait, s.read_exact(&mut buf)).await {
            Ok(Ok(_)) => Some(buf.to_vec()),
            _ => None,
        }
    }

    #[tokio::test]
    async fn a_link_passes_holds_heals_and_cuts() {
        let proxy = Proxy::start(echo_server().await).await.unwrap();
        let mut s = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(echo(&mut s, Duration::from_secs(5)).await.unwrap(), b"ping");

        proxy.set(Link::Blackhole);
        assert_eq!(echo(&mut s, Duration::from_millis(300)).await, None);
        proxy.set(Link::Open);
        // What was held flows on: the held ping, then this one.
        let mut held = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut held))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&held, b"ping");
        assert_eq!(echo(&mut s, Duration::from_secs(5)).await.unwrap(), b"ping");

        proxy.set(Link::Cut);
        let mut buf = [0u8; 4];
        let ended = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .unwrap();
        assert!(
            matches!(ended, Ok(0) | Err(_)),
            "a cut connection stayed open"
        );
        // New connections are refused (closed at once).
        let mut again = TcpStream::connect(proxy.addr()).await.unwrap();
        assert_eq!(echo(&mut again, Duration::from_millis(500)).await, None);
    }
}
