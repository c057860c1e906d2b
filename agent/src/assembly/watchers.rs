//! Small tasks of the assembly that turn what they watch into driver
//! events: where Auto Scaling takes the instance ([`poll_lifecycle`], EC2
//! only), whether EC2 announced it will take the instance back
//! ([`watch_interruption`], EC2 only), and how long the coordinator has
//! been out of reach ([`watch_isolation`]). Each sends to the driver's
//! inbox directly and ends when its stop token fires or the driver is gone.

use std::sync::Arc;
use std::time::Duration;

use berth_aws::TargetLifecycle;
use berth_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::host::state::Event;
use crate::link::LinkStatus;
use crate::provider::Provider;

/// The driver event a lifecycle means, if any.
pub fn lifecycle_event(l: &TargetLifecycle) -> Option<Event> {
    match l {
        TargetLifecycle::Warmed(target) => Some(Event::Warmed {
            target: target.clone(),
        }),
        TargetLifecycle::InService | TargetLifecycle::NoGroup => Some(Event::InService),
        // Standby, Detached, ...: nothing berth acts on.
        TargetLifecycle::Other(_) => None,
    }
}

/// Reads the lifecycle every `every` and hands changes to the driver,
/// until `stop` fires or the driver is gone.
pub async fn poll_lifecycle<P: Provider>(
    provider: Arc<P>,
    mut last: TargetLifecycle,
    every: Duration,
    inbox: mpsc::Sender<Event>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match provider.lifecycle().await {
            Ok(Some(now)) if now != last => {
                tracing::info!(from = %last, to = %now, "Auto Scaling target lifecycle changed");
                if let Some(event) = lifecycle_event(&now)
                    && inbox.send(event).await.is_err()
                {
                    return;
                }
                last = now;
            }
            Ok(_) => {}
            // Transient: the next poll tries again; the state stays as it is.
            Err(e) => tracing::warn!(error = %e, "reading the Auto Scaling lifecycle failed"),
        }
    }
}

/// Reads the interruption notices every `every`. On the first one it tells
/// the coordinator (an `InterruptionNotice` on the link: the host is never
/// offered again, and its lease gets the step) and drains the host: an idle
/// host ends at once, a leased one serves its lease to the end. Then it
/// ends: there is nothing more to do about a machine that is going.
pub async fn watch_interruption<P: Provider>(
    provider: Arc<P>,
    every: Duration,
    inbox: mpsc::Sender<Event>,
    outbox: mpsc::UnboundedSender<pb::AgentMessage>,
    stop: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        let notice = match provider.interruption().await {
            Ok(Some(n)) => n,
            Ok(None) => continue,
            // Transient: the next poll tries again.
            Err(e) => {
                tracing::warn!(error = %e, "reading the interruption notices failed");
                continue;
            }
        };
        let kind = notice.kind.name();
        let when = notice
            .time
            .map(|t| humantime::format_rfc3339_seconds(t).to_string())
            .unwrap_or_default();
        tracing::warn!(kind, action = %notice.action, time = %when, "interruption notice: draining the host");
        let _ = outbox.send(pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::InterruptionNotice(
                pb::InterruptionNotice {
                    kind: kind.to_owned(),
                    action: notice.action.clone(),
                    time: notice.time.map(berth_proto::from_system_time),
                },
            )),
        });
        let reason = format!("{kind} notice ({} at {when})", notice.action);
        let _ = inbox.send(Event::Drain { reason }).await;
        return;
    }
}

/// Tells the driver, every `limit`, while the link stays down. Ends when
/// `stop` fires, or the link or the driver is gone.
pub async fn watch_isolation(
    mut link: watch::Receiver<LinkStatus>,
    limit: Duration,
    to_driver: mpsc::Sender<Event>,
    stop: CancellationToken,
) {
    // The link republishes its status on every failed attempt; the clock
    // runs from the first moment it was down, not from the latest attempt.
    let mut down_since: Option<tokio::time::Instant> = None;
    let mut last_told: Option<tokio::time::Instant> = None;
    loop {
        if link.borrow_and_update().connected {
            down_since = None;
            last_told = None;
            tokio::select! {
                _ = stop.cancelled() => return,
                r = link.changed() => if r.is_err() { return },
            }
            continue;
        }
        let since = *down_since.get_or_insert_with(tokio::time::Instant::now);
        let due = last_told.unwrap_or(since) + limit;
        tokio::select! {
            _ = stop.cancelled() => return,
            r = link.changed() => if r.is_err() { return },
            _ = tokio::time::sleep_until(due) => {
                let for_ = since.elapsed();
                tracing::warn!(?for_, "coordinator unreachable past the isolation limit");
                last_told = Some(tokio::time::Instant::now());
                if to_driver.send(Event::Isolated { for_ }).await.is_err() {
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn isolation_is_told_from_the_first_failure_and_again_every_limit() {
        let (link_tx, link_rx) = watch::channel(LinkStatus {
            connected: true,
            ..LinkStatus::default()
        });
        let (tx, mut rx) = mpsc::channel(4);
        let stop = CancellationToken::new();
        let limit = Duration::from_secs(60);
        let task = tokio::spawn(watch_isolation(link_rx, limit, tx, stop.clone()));
        tokio::time::sleep(limit * 2).await;
        assert!(rx.try_recv().is_err(), "told while connected");

        let down = tokio::time::Instant::now();
        link_tx.send_modify(|s| s.connected = false);
        // Failed attempts republish the status: the clock keeps running.
        tokio::time::sleep(limit / 2).await;
        link_tx.send_modify(|s| s.connected = false);
        let Some(Event::Isolated { for_ }) = rx.recv().await else {
            panic!("no isolation event")
        };
        assert_eq!(down.elapsed(), limit);
        assert_eq!(for_, limit);
        let Some(Event::Isolated { for_ }) = rx.recv().await else {
            panic!("no second isolation event")
        };
        assert_eq!(for_, limit * 2);

        // Back: the clock stops; a stop ends the task.
        link_tx.send_modify(|s| s.connected = true);
        tokio::time::sleep(limit * 3).await;
        assert!(rx.try_recv().is_err(), "told after the link came back");
        stop.cancel();
        task.await.unwrap();
    }
}
