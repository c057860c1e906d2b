//! How `berth leases --show ID` prints a lease's timeline: one step a line
//! with its time, the time since the previous step and since the request.

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use berth_proto::to_system_time;
use berth_proto::v1 as pb;

fn step_name(step: i32) -> String {
    berth_proto::names::timeline_step(step)
}

fn short(d: Duration) -> String {
    if d < Duration::from_secs(1) {
        format!("{}ms", d.as_millis())
    } else if d < Duration::from_secs(60) {
        format!("{:.1}s", d.as_secs_f64())
    } else {
        humantime::format_duration(Duration::from_secs(d.as_secs())).to_string()
    }
}

/// The timeline as `berth leases --show` prints it: one step a line with
/// its time, the time since the previous step and since the request.
pub fn format(timeline: &[pb::TimelineEntry]) -> String {
    let mut s = format!(
        "  {:<16} {:<24} {:>9} {:>9}  {}\n",
        "STEP", "AT", "+PREV", "TOTAL", "DETAIL"
    );
    let times: Vec<Option<SystemTime>> = timeline
        .iter()
        .map(|e| e.at.as_ref().and_then(to_system_time))
        .collect();
    let start = times.first().copied().flatten();
    for (i, e) in timeline.iter().enumerate() {
        let at = times[i];
        let prev = if i == 0 { None } else { times[i - 1] };
        let delta = |from: Option<SystemTime>| match (from, at) {
            (Some(f), Some(t)) => short(t.duration_since(f).unwrap_or_default()),
            _ => "-".into(),
        };
        let _ = writeln!(
            s,
            "  {:<16} {:<24} {:>9} {:>9}  {}",
            step_name(e.step),
            at.map(|t| humantime::format_rfc3339_millis(t).to_string())
                .unwrap_or_else(|| "-".into()),
            if i == 0 { "-".into() } else { delta(prev) },
            delta(start),
            e.detail
        );
    }
    s
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use berth_proto::from_system_time;

    fn entry(step: pb::TimelineStep, at: SystemTime, detail: &str) -> pb::TimelineEntry {
        pb::TimelineEntry {
            step: step as i32,
            at: Some(from_system_time(at)),
            detail: detail.into(),
        }
    }

    #[test]
    fn format_shows_durations_between_steps() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let t = [
            entry(pb::TimelineStep::Requested, t0, ""),
            entry(
                pb::TimelineStep::Assigned,
                t0 + Duration::from_millis(250),
                "h1",
            ),
            entry(pb::TimelineStep::Released, t0 + Duration::from_secs(90), ""),
        ];
        let out = format(&t);
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines.len(), 4, "{out}");
        assert!(
            lines[2].contains("assigned") && lines[2].contains("250ms") && lines[2].ends_with("h1"),
            "{out}"
        );
        assert!(
            lines[3].contains("released")
                && lines[3].contains("1m 29s")
                && lines[3].contains("1m 30s"),
            "{out}"
        );
    }

    #[test]
    fn step_names_are_the_proto_names_in_kebab_case() {
        assert_eq!(step_name(pb::TimelineStep::HostLost as i32), "host-lost");
        assert_eq!(step_name(9999), "unknown(9999)");
    }
}
