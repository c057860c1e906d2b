//! The lease timeline: every step of a lease's life (requested, queued,
//! assigned, ready, renewed, requeued, released/expired/host-lost/failed,
//! wiped, host terminated) with its wall-clock time. The pool records the
//! steps as they happen (one structured log line each, target
//! `berth::timeline`), the store keeps them with the lease record, `Get` and
//! `ListLeases` return them, and `berth leases --show ID` prints them with
//! the time between steps (the CLI's own `timeline` module).

use std::time::SystemTime;

use berth_proto::from_system_time;
use berth_proto::v1 as pb;

use crate::lease::LeaseState;

/// Most entries one lease keeps; past it, renewals are no longer recorded
/// (a build renewing every minute for a day must not grow without bound),
/// while the steps that end a lease always are.
pub const MAX_ENTRIES: usize = 64;

/// One step of a lease's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    Requested,
    Queued,
    Assigned,
    Ready,
    Renewed,
    Requeued,
    Released,
    Expired,
    HostLost,
    Failed,
    Wiped,
    HostTerminated,
    InterruptionNotice,
}

impl Step {
    pub const ALL: [Step; 13] = [
        Step::Requested,
        Step::Queued,
        Step::Assigned,
        Step::Ready,
        Step::Renewed,
        Step::Requeued,
        Step::Released,
        Step::Expired,
        Step::HostLost,
        Step::Failed,
        Step::Wiped,
        Step::HostTerminated,
        Step::InterruptionNotice,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Step::Requested => "requested",
            Step::Queued => "queued",
            Step::Assigned => "assigned",
            Step::Ready => "ready",
            Step::Renewed => "renewed",
            Step::Requeued => "requeued",
            Step::Released => "released",
            Step::Expired => "expired",
            Step::HostLost => "host-lost",
            Step::Failed => "failed",
            Step::Wiped => "wiped",
            Step::HostTerminated => "host-terminated",
            Step::InterruptionNotice => "interruption-notice",
        }
    }

    pub fn from_name(name: &str) -> Option<Step> {
        Step::ALL.into_iter().find(|s| s.name() == name)
    }

    pub fn to_proto(self) -> pb::TimelineStep {
        match self {
            Step::Requested => pb::TimelineStep::Requested,
            Step::Queued => pb::TimelineStep::Queued,
            Step::Assigned => pb::TimelineStep::Assigned,
            Step::Ready => pb::TimelineStep::Ready,
            Step::Renewed => pb::TimelineStep::Renewed,
            Step::Requeued => pb::TimelineStep::Requeued,
            Step::Released => pb::TimelineStep::Released,
            Step::Expired => pb::TimelineStep::Expired,
            Step::HostLost => pb::TimelineStep::HostLost,
            Step::Failed => pb::TimelineStep::Failed,
            Step::Wiped => pb::TimelineStep::Wiped,
            Step::HostTerminated => pb::TimelineStep::HostTerminated,
            Step::InterruptionNotice => pb::TimelineStep::InterruptionNotice,
        }
    }

    /// The step a lease's entering `state` stands for, if it is one.
    pub fn entering(state: LeaseState) -> Option<Step> {
        match state {
            LeaseState::Queued => None,
            LeaseState::Assigned => Some(Step::Assigned),
            LeaseState::Active => Some(Step::Ready),
            LeaseState::Released => Some(Step::Released),
            LeaseState::Expired => Some(Step::Expired),
            LeaseState::HostLost => Some(Step::HostLost),
            LeaseState::Failed => Some(Step::Failed),
        }
    }
}

/// One recorded step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub step: Step,
    pub at: SystemTime,
    pub detail: String,
}

/// Appends a step to a lease's timeline and logs it.
pub fn record(
    timeline: &mut Vec<Entry>,
    lease_id: &str,
    step: Step,
    at: SystemTime,
    detail: impl Into<String>,
) {
    let detail = detail.into();
    if step == Step::Renewed && timeline.len() >= MAX_ENTRIES {
        return;
    }
    let since_start = timeline
        .first()
        .and_then(|f| at.duration_since(f.at).ok())
        .unwrap_or_default();
    tracing::info!(
        target: "berth::timeline",
        lease_id,
        step = step.name(),
        detail = %detail,
        since_request_ms = u64::try_from(since_start.as_millis()).unwrap_or(u64::MAX),
        "lease step"
    );
    timeline.push(Entry { step, at, detail });
}

/// When `step` was first recorded, if it was.
pub fn first(timeline: &[Entry], step: Step) -> Option<SystemTime> {
    timeline.iter().find(|e| e.step == step).map(|e| e.at)
}

pub fn to_proto(timeline: &[Entry]) -> Vec<pb::TimelineEntry> {
    timeline
        .iter()
        .map(|e| pb::TimelineEntry {
            step: e.step.to_proto() as i32,
            at: Some(from_system_time(e.at)),
            detail: e.detail.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::time::Duration;

    #[test]
    fn names_round_trip_and_match_the_proto() {
        for s in Step::ALL {
            assert_eq!(Step::from_name(s.name()), Some(s));
            assert_eq!(
                berth_proto::names::timeline_step(s.to_proto() as i32),
                s.name()
            );
        }
        assert_eq!(Step::from_name("bogus"), None);
    }

    #[test]
    fn renewals_stop_at_the_cap_but_endings_do_not() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let mut t = Vec::new();
        for i in 0..(MAX_ENTRIES as u64 + 10) {
            record(&mut t, "l", Step::Renewed, t0 + Duration::from_secs(i), "");
        }
        assert_eq!(t.len(), MAX_ENTRIES);
        record(&mut t, "l", Step::Released, t0, "");
        assert_eq!(t.last().unwrap().step, Step::Released);
    }
}
