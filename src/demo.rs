//! `--demo`: publishes the current time on topic `time` every two seconds, so
//! a first `curl -N` shows events at once.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::hub::Hub;
use crate::hub::NewEvent;
use crate::lifecycle::Lifecycle;

pub const TOPIC: &str = "time";
pub const PERIOD: Duration = Duration::from_secs(2);

pub async fn run(hub: Arc<Hub>, life: Lifecycle) {
    let mut tick = tokio::time::interval(PERIOD);
    loop {
        tokio::select! {
            _ = tick.tick() => {},
            _ = life.draining() => return,
        }
        let event = NewEvent {
            topic: TOPIC.into(),
            event: Some("time".into()),
            data: humantime::format_rfc3339_seconds(SystemTime::now()).to_string(),
        };
        if let Err(e) = hub.publish_batch(std::slice::from_ref(&event)).await {
            tracing::warn!(error = %e, "demo publish failed");
        }
    }
}
