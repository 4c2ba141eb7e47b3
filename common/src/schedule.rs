//! The five-field cron schedule of `spec.backup.schedule` (minute hour day-of-month month
//! day-of-week, UTC), as Kubernetes CronJobs read it: `*`, numbers, ranges `a-b`, lists `a,b`,
//! steps `*/n` and `a-b/n`; day-of-week 0–7 (0 and 7 are Sunday); when both day fields are
//! restricted, a day matching either runs (cron's rule). No names (`MON`, `JAN`) or macros.
//! Also the durations of retention windows ([`parse_duration`]).

use std::time::Duration;

use jiff::civil::DateTime;

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    minutes: Vec<bool>,
    hours: Vec<bool>,
    days: Vec<bool>,
    months: Vec<bool>,
    weekdays: Vec<bool>,
    days_any: bool,
    weekdays_any: bool,
}

impl Schedule {
    /// Parses `spec`, or says which field is wrong and why.
    pub fn parse(spec: &str) -> Result<Schedule, String> {
        let fields: Vec<&str> = spec.split_whitespace().collect();
        if fields.len() != 5 {
            return Err(format!(
                "{spec:?}: a cron schedule has five fields (minute hour day month weekday), this has {}",
                fields.len()
            ));
        }
        let f = |i: usize, name: &str, lo: u32, hi: u32| {
            field(fields[i], lo, hi).map_err(|e| format!("{spec:?}: {name} {:?}: {e}", fields[i]))
        };
        let mut weekdays = f(4, "weekday", 0, 7)?;
        if weekdays[7] {
            weekdays[0] = true;
        }
        Ok(Schedule {
            minutes: f(0, "minute", 0, 59)?,
            hours: f(1, "hour", 0, 23)?,
            days: f(2, "day of month", 1, 31)?,
            months: f(3, "month", 1, 12)?,
            weekdays,
            days_any: fields[2] == "*",
            weekdays_any: fields[4] == "*",
        })
    }

    /// Whether the minute starting at `t` (UTC) is one the schedule runs in.
    pub fn matches(&self, t: DateTime) -> bool {
        let day = self.days[t.day() as usize];
        let weekday = self.weekdays[t.weekday().to_sunday_zero_offset() as usize];
        let day_ok = match (self.days_any, self.weekdays_any) {
            (true, true) => true,
            (false, true) => day,
            (true, false) => weekday,
            (false, false) => day || weekday,
        };
        self.minutes[t.minute() as usize]
            && self.hours[t.hour() as usize]
            && self.months[t.month() as usize]
            && day_ok
    }

    /// The latest minute at or before `now` that the schedule runs in, looking back at most
    /// `within` minutes.
    pub fn last_run(&self, now: jiff::Timestamp, within: u32) -> Option<jiff::Timestamp> {
        let minute = now.as_second() - now.as_second().rem_euclid(60);
        (0..=i64::from(within))
            .map(|back| minute - back * 60)
            .filter_map(|s| jiff::Timestamp::from_second(s).ok())
            .find(|t| self.matches(t.to_zoned(jiff::tz::TimeZone::UTC).datetime()))
    }

    /// The first minute after `after` that the schedule runs in, looking ahead at most
    /// `within` minutes.
    pub fn next_run(&self, after: jiff::Timestamp, within: u32) -> Option<jiff::Timestamp> {
        let minute = after.as_second() - after.as_second().rem_euclid(60);
        (1..=i64::from(within))
            .map(|ahead| minute + ahead * 60)
            .filter_map(|s| jiff::Timestamp::from_second(s).ok())
            .find(|t| self.matches(t.to_zoned(jiff::tz::TimeZone::UTC).datetime()))
    }
}

fn field(text: &str, lo: u32, hi: u32) -> Result<Vec<bool>, String> {
    let mut set = vec![false; hi as usize + 1];
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => {
                let step: u32 = s
                    .parse()
                    .map_err(|_| format!("step {s:?} is not a number"))?;
                if step == 0 {
                    return Err("a step of 0".into());
                }
                (r, step)
            }
            None => (part, 1),
        };
        let num = |s: &str| -> Result<u32, String> {
            let n: u32 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
            if n < lo || n > hi {
                return Err(format!("{n} is outside {lo}-{hi}"));
            }
            Ok(n)
        };
        let (a, b) = match range {
            "*" => (lo, hi),
            r => match r.split_once('-') {
                Some((a, b)) => (num(a)?, num(b)?),
                None if step > 1 => (num(r)?, hi),
                None => {
                    let n = num(r)?;
                    (n, n)
                }
            },
        };
        if a > b {
            return Err(format!("range {a}-{b} runs backwards"));
        }
        for v in (a..=b).step_by(step as usize) {
            set[v as usize] = true;
        }
    }
    Ok(set)
}

/// Parses `30m`, `12h`, `7d`, `2w` (or a bare number of seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?}: expected a number and a unit (s, m, h, d, w), e.g. 7d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 7 * 86_400,
        _ => {
            return Err(format!(
                "{s:?}: unknown unit {unit:?} (use s, m, h, d or w)"
            ));
        }
    };
    Ok(Duration::from_secs(n.saturating_mul(mult)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime {
        s.parse().unwrap()
    }

    #[test]
    fn fields_steps_ranges_and_lists() {
        let s = Schedule::parse("0 3 * * *").unwrap();
        assert!(s.matches(at("2026-12-05T03:00")));
        assert!(!s.matches(at("2026-12-05T03:01")));
        let s = Schedule::parse("*/15 9-17 * * 1-5").unwrap();
        assert!(s.matches(at("2026-12-04T09:45"))); // a Friday
        assert!(!s.matches(at("2026-12-05T09:45"))); // a Saturday
        assert!(!s.matches(at("2026-12-04T18:00")));
        let s = Schedule::parse("5,35 0 1 1,7 *").unwrap();
        assert!(s.matches(at("2026-07-01T00:35")));
        assert!(!s.matches(at("2026-08-01T00:35")));
        // Sunday as 7; either day field when both are restricted.
        let s = Schedule::parse("0 0 13 * 7").unwrap();
        assert!(s.matches(at("2026-12-06T00:00"))); // a Sunday
        assert!(s.matches(at("2026-11-13T00:00"))); // the 13th, a Friday
    }

    #[test]
    fn bad_schedules_name_the_field() {
        for (spec, words) in [
            ("daily", "five fields"),
            ("60 * * * *", "minute \"60\": 60 is outside 0-59"),
            ("* * * * MON", "weekday \"MON\""),
            ("*/0 * * * *", "a step of 0"),
            ("* 5-3 * * *", "runs backwards"),
        ] {
            let e = Schedule::parse(spec).unwrap_err();
            assert!(e.contains(words), "{spec}: {e}");
        }
    }

    #[test]
    fn the_last_run_looks_back_to_the_minute() {
        let s = Schedule::parse("30 * * * *").unwrap();
        let now: jiff::Timestamp = "2026-12-05T10:45:12Z".parse().unwrap();
        assert_eq!(
            s.last_run(now, 60).unwrap().to_string(),
            "2026-12-05T10:30:00Z"
        );
        assert_eq!(s.last_run(now, 10), None);
        assert_eq!(
            s.next_run(now, 60).unwrap().to_string(),
            "2026-12-05T11:30:00Z"
        );
        let run = s.last_run(now, 60).unwrap();
        assert_eq!(
            s.next_run(run, 60).unwrap().to_string(),
            "2026-12-05T11:30:00Z",
            "strictly after"
        );
        assert_eq!(s.next_run(now, 30), None);
    }
}
