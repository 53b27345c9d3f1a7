//! Embedding Streamline: a hub and the stream plane inside your own tokio
//! application, which publishes from its own code.
//!
//! `cargo run --example embed`, then
//! `curl -N 'http://127.0.0.1:8081/stream?topic=ticks'`. Ctrl-C drains the
//! streams (each gets a `streamline.close` notice) and exits.

use std::time::Duration;

use streamline::hub::{Hub, HubConfig};
use streamline::lifecycle::{self, Lifecycle, Timings};
use streamline::stream::{self, StreamOptions};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::main]
async fn main() -> std::io::Result<()> {
    let hub = Hub::new(HubConfig::default());
    let shutdown = CancellationToken::new();
    let life = Lifecycle::new(shutdown.clone());
    let tasks = life.tracker();

    let listener = TcpListener::bind("127.0.0.1:8081").await?;
    let options = StreamOptions::default();
    tasks.spawn(stream::serve(listener, hub.clone(), options, life.clone()));

    // Heartbeats and history expiry (`Gateway` runs this for you).
    tasks.spawn(
        hub.clone()
            .maintain(Duration::from_secs(15), life.stop_token()),
    );

    // The application's own events: one a second until the drain begins.
    let (h, l) = (hub.clone(), life.clone());
    tasks.spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        for n in 1u64.. {
            tokio::select! {
                _ = tick.tick() => {}
                _ = l.draining() => return,
            }
            let data = format!(r#"{{"n":{n}}}"#);
            if let Err(e) = h.publish("ticks", Some("tick"), &data) {
                eprintln!("publish failed: {e}");
            }
        }
    });

    tokio::signal::ctrl_c().await?;
    shutdown.cancel();
    let timings = Timings {
        shutdown_delay: Duration::ZERO, // no load balancer to wait for
        drain_window: Duration::from_secs(1),
        write_timeout: Duration::from_secs(5),
        grace_period: Duration::from_secs(10),
    };
    lifecycle::shut_down(&life, &hub, timings).await;
    Ok(())
}
