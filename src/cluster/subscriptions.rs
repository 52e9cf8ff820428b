//! The channels this replica listens to, subscribed and unsubscribed in the order asked.
//!
//! Redis does not count subscribers of one connection, so holders are counted here and only
//! the last one's leaving unsubscribes. Every request goes through one task, in the order it
//! was made: a room forgotten right after being created leaves nothing subscribed behind.

use std::collections::HashMap;

use redis::aio::ConnectionManager;
use tokio::sync::{mpsc, oneshot};

use super::Cluster;

pub(super) enum Request {
    /// One more holder; told whether Redis confirmed (`true` at once if already held).
    Subscribe(String, oneshot::Sender<bool>),
    /// One holder fewer.
    Unsubscribe(String),
    /// Subscribe again to everything held (after Redis was away: what was asked meanwhile
    /// never took).
    Renew,
}

/// Serves the requests until the cluster is gone.
pub(super) async fn run(
    cluster: Cluster,
    subscriber: ConnectionManager,
    mut requests: mpsc::UnboundedReceiver<Request>,
) {
    let mut holders: HashMap<String, usize> = HashMap::new();
    while let Some(request) = requests.recv().await {
        let mut sub = subscriber.clone();
        match request {
            Request::Subscribe(channel, confirmed) => {
                let n = holders.entry(channel.clone()).or_insert(0);
                *n += 1;
                let ok = *n > 1
                    || cluster
                        .call(async move { sub.subscribe(&channel).await })
                        .await
                        .is_some();
                let _ = confirmed.send(ok);
            }
            Request::Unsubscribe(channel) => match holders.get_mut(&channel) {
                Some(n) if *n > 1 => *n -= 1,
                Some(_) => {
                    holders.remove(&channel);
                    cluster
                        .call(async move { sub.unsubscribe(&channel).await })
                        .await;
                }
                None => {}
            },
            Request::Renew => {
                let all: Vec<String> = holders.keys().cloned().collect();
                if !all.is_empty() {
                    cluster.call(async move { sub.subscribe(all).await }).await;
                }
            }
        }
    }
}
