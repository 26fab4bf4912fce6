//! Which snapshots `klon forget` keeps: the retention policy, as a pure
//! function from a policy and a list of snapshots (id, sequence, time, UTC offset) to
//! one decision per snapshot. No I/O; docs/RETENTION.md is the user's
//! description of the same rules.
//!
//! The rules, as restic (0.17 and later) applies them:
//! - The snapshots are walked from the newest to the oldest: by the order
//!   they were made (`sequence`), then by time, then by id (the greater id
//!   counts as the newer), so the result does not depend on the order of
//!   the input. (restic orders by time alone; a live stick's clock can be
//!   wrong, and the backup made last must not count as the oldest.)
//! - `last N` keeps the N newest snapshots.
//! - `hourly`/`daily`/`weekly`/`monthly`/`yearly N` keep the newest snapshot
//!   of each of the N most recent hours/days/ISO weeks/months/years that have
//!   a snapshot: periods without one are skipped, not counted.
//! - Every rule looks at every snapshot on its own: a snapshot kept by one
//!   rule also fills a period of the others (the newest snapshot is at once
//!   `last 1`, the newest of its day, of its week…). Proxmox Backup Server
//!   instead lets each rule skip the periods earlier rules already cover.
//! - When a rule asked for more periods than have snapshots, the oldest
//!   snapshot is kept too (restic since 0.17), so a young repository keeps
//!   its whole history reach.
//! - A snapshot's hour, day, week, month and year are those of the clock of
//!   the machine that made it: its time shifted by the UTC offset recorded
//!   with it. So the answer is the same wherever and in whatever time zone
//!   `klon forget` runs (the live system runs in UTC).

use std::collections::HashSet;

use crate::error::Error;

/// The largest UTC offset a snapshot may record: ±18 hours (what RFC 3339
/// and every time zone database allow; real zones span −12 to +14).
pub const MAX_UTC_OFFSET: i32 = 18 * 3600;

/// How many snapshots or periods each rule keeps; 0 turns a rule off.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Policy {
    /// The newest `last` snapshots.
    pub last: u32,
    /// The newest snapshot of each of the `hourly` most recent hours that have one.
    pub hourly: u32,
    /// The newest snapshot of each of the `daily` most recent days that have one.
    pub daily: u32,
    /// The newest snapshot of each of the `weekly` most recent ISO weeks
    /// (Monday to Sunday) that have one.
    pub weekly: u32,
    /// The newest snapshot of each of the `monthly` most recent months that have one.
    pub monthly: u32,
    /// The newest snapshot of each of the `yearly` most recent years that have one.
    pub yearly: u32,
}

impl Policy {
    /// Whether no rule is on: such a policy would keep nothing, and
    /// [`apply`] refuses it.
    pub fn is_empty(&self) -> bool {
        Rule::ALL.iter().all(|r| r.count(self) == 0)
    }

    /// The policy in words, for `klon forget` to print before its
    /// decisions: "keep the 3 newest snapshots and the newest snapshot of
    /// each of the last 7 days and 4 ISO weeks that have snapshots".
    pub fn describe(&self) -> String {
        if self.is_empty() {
            return "keep nothing: no --keep-… option".to_string();
        }
        let mut parts = Vec::new();
        match self.last {
            0 => {}
            1 => parts.push("the newest snapshot".to_string()),
            n => parts.push(format!("the {n} newest snapshots")),
        }
        let periods: Vec<String> = Rule::ALL[1..]
            .iter()
            .filter(|r| r.count(self) > 0)
            .map(|r| {
                let n = r.count(self);
                format!("{n} {}", if n == 1 { r.unit() } else { r.units() })
            })
            .collect();
        if !periods.is_empty() {
            parts.push(format!("the newest snapshot of each of the last {} that have snapshots", join_and(&periods)));
        }
        format!("keep {}", join_and(&parts))
    }
}

/// "a", "a and b", "a, b and c".
fn join_and(parts: &[String]) -> String {
    match parts {
        [] => String::new(),
        [one] => one.clone(),
        [init @ .., last] => format!("{} and {last}", init.join(", ")),
    }
}

/// One snapshot as the policy sees it: an id and its creation time (UTC
/// seconds since the epoch) and the UTC offset (seconds) of the machine that
/// made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Item<'a> {
    /// The snapshot's id, unique in the repository.
    pub id: &'a str,
    /// Its place in the order snapshots were made (the newest has the
    /// greatest); equal (0) for snapshots that do not record it.
    pub sequence: u64,
    /// When it was made: UTC seconds since 1970-01-01.
    pub time: i64,
    /// The UTC offset of the clock of the machine that made it, in seconds
    /// (+3600 for CET); its hour, day, week… are read on that clock.
    pub utc_offset: i32,
}

/// What the policy says about one snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// The snapshot's id.
    pub id: String,
    /// Whether it stays.
    pub keep: bool,
    /// Why it stays, one entry per rule that keeps it ("last 1", "daily
    /// 2026-12-03", "weekly 2026-W49"); empty when it goes.
    pub reasons: Vec<String>,
}

/// Applies `policy` to `items` (in any order): one decision per item,
/// newest first. Whenever `items` is not empty the newest one is kept (every
/// rule that is on keeps it), so a policy never removes every snapshot.
///
/// Refuses an empty policy (the caller asks for at least one --keep-…
/// option), a UTC offset beyond ±18 hours and an id given twice (a damaged
/// snapshot list; removing by id would be ambiguous).
pub fn apply(policy: &Policy, items: &[Item]) -> Result<Vec<Decision>, Error> {
    if policy.is_empty() {
        return Err(Error::Usage(
            "give at least one --keep-… option (--keep-last, --keep-hourly, --keep-daily, --keep-weekly, \
             --keep-monthly, --keep-yearly); klon forget never deletes every snapshot"
                .to_string(),
        ));
    }
    let mut ids = HashSet::new();
    for item in items {
        if item.utc_offset.abs() > MAX_UTC_OFFSET {
            return Err(Error::Corrupt(format!(
                "snapshot {} records a UTC offset of {} s, beyond ±18 hours: its metadata is damaged; \
                 nothing was removed",
                item.id, item.utc_offset
            )));
        }
        if !ids.insert(item.id) {
            return Err(Error::Corrupt(format!(
                "two snapshots have the id {}: the repository's snapshot list is damaged; nothing was removed",
                item.id
            )));
        }
    }

    let mut order: Vec<&Item> = items.iter().collect();
    order.sort_by(|a, b| (b.sequence, b.time, b.id).cmp(&(a.sequence, a.time, a.id)));

    let rules: Vec<(Rule, u32)> = Rule::ALL.iter().map(|&r| (r, r.count(policy))).filter(|&(_, n)| n > 0).collect();
    // Per rule, the periods it has met so far (each was filled by the first,
    // i.e. newest, snapshot in it).
    let mut seen: Vec<HashSet<String>> = vec![HashSet::new(); rules.len()];
    let mut decisions = Vec::with_capacity(order.len());
    for (nr, item) in order.iter().enumerate() {
        let local = LocalTime::of(item)?;
        let oldest = nr + 1 == order.len();
        let mut reasons = Vec::new();
        for ((rule, n), seen) in rules.iter().zip(seen.iter_mut()) {
            let met = seen.len();
            if met >= *n as usize {
                continue;
            }
            let period = rule.period(&local, nr);
            let reason = format!("{} {period}", rule.name());
            if seen.insert(period) {
                reasons.push(reason);
            } else if oldest {
                let units = if met == 1 { format!("{} has", rule.unit()) } else { format!("{} have", rule.units()) };
                reasons.push(format!("oldest (--keep-{} {n}, only {met} {units} snapshots)", rule.name()));
            }
        }
        decisions.push(Decision { id: item.id.to_string(), keep: !reasons.is_empty(), reasons });
    }
    Ok(decisions)
}

/// One --keep-… option.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rule {
    Last,
    Hourly,
    Daily,
    Weekly,
    Monthly,
    Yearly,
}

impl Rule {
    /// In the order reasons are listed.
    const ALL: [Rule; 6] = [Rule::Last, Rule::Hourly, Rule::Daily, Rule::Weekly, Rule::Monthly, Rule::Yearly];

    fn count(self, p: &Policy) -> u32 {
        match self {
            Rule::Last => p.last,
            Rule::Hourly => p.hourly,
            Rule::Daily => p.daily,
            Rule::Weekly => p.weekly,
            Rule::Monthly => p.monthly,
            Rule::Yearly => p.yearly,
        }
    }

    /// The word in reasons, and the option's name after --keep-.
    fn name(self) -> &'static str {
        match self {
            Rule::Last => "last",
            Rule::Hourly => "hourly",
            Rule::Daily => "daily",
            Rule::Weekly => "weekly",
            Rule::Monthly => "monthly",
            Rule::Yearly => "yearly",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Rule::Last => "snapshot",
            Rule::Hourly => "hour",
            Rule::Daily => "day",
            Rule::Weekly => "ISO week",
            Rule::Monthly => "month",
            Rule::Yearly => "year",
        }
    }

    fn units(self) -> &'static str {
        match self {
            Rule::Last => "snapshots",
            Rule::Hourly => "hours",
            Rule::Daily => "days",
            Rule::Weekly => "ISO weeks",
            Rule::Monthly => "months",
            Rule::Yearly => "years",
        }
    }

    /// The period the snapshot at position `nr` (0 = newest) falls in, as
    /// printed in reasons: for `last` its position (1 = newest), for the
    /// others "2026-12-03 14:00", "2026-12-03", "2026-W49", "2026-12", "2026".
    fn period(self, t: &LocalTime, nr: usize) -> String {
        match self {
            Rule::Last => (nr + 1).to_string(),
            Rule::Hourly => format!("{:04}-{:02}-{:02} {:02}:00", t.year, t.month, t.day, t.hour),
            Rule::Daily => format!("{:04}-{:02}-{:02}", t.year, t.month, t.day),
            Rule::Weekly => format!("{:04}-W{:02}", t.iso_year, t.iso_week),
            Rule::Monthly => format!("{:04}-{:02}", t.year, t.month),
            Rule::Yearly => format!("{:04}", t.year),
        }
    }
}

/// A snapshot's time on the clock of the machine that made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct LocalTime {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    /// The ISO 8601 week-numbering year: the year of the week's Thursday
    /// (2021-01-03 is in 2020-W53, 2024-12-30 in 2025-W01).
    iso_year: i64,
    iso_week: u32,
}

impl LocalTime {
    fn of(item: &Item) -> Result<LocalTime, Error> {
        let t = item.time.checked_add(i64::from(item.utc_offset)).ok_or_else(|| {
            Error::Corrupt(format!(
                "snapshot {} records the time {} s, too far from 1970 to be real: its metadata is damaged; \
                 nothing was removed",
                item.id, item.time
            ))
        })?;
        let days = t.div_euclid(86_400);
        let hour = (t.rem_euclid(86_400) / 3600) as u32;
        let (year, month, day) = civil_from_days(days);
        let (iso_year, iso_week) = iso_week(days);
        Ok(LocalTime { year, month, day, hour, iso_year, iso_week })
    }
}

/// Days since 1970-01-01 of a date in the proleptic Gregorian calendar.
/// Counts in 400-year eras (146,097 days each) of years that start on
/// 1 March, so that the leap day is the last day of its year.
fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let year_of_era = y.rem_euclid(400); // 0..=399
    let m = i64::from(month);
    let month_from_march = if m > 2 { m - 3 } else { m + 9 }; // 0 = March
    // Days from 1 March to the first of the month: 31, 30, 31, 30, 31 repeats
    // in steps of five months of 153 days.
    let day_of_year = (153 * month_from_march + 2) / 5 + i64::from(day) - 1;
    let day_of_era = 365 * year_of_era + year_of_era / 4 - year_of_era / 100 + day_of_year;
    // 719,468 days from 0000-03-01 to 1970-01-01.
    era * 146_097 + day_of_era - 719_468
}

/// The date (year, month 1–12, day 1–31) `days` days after 1970-01-01: the
/// inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let day_of_era = z.rem_euclid(146_097); // 0..=146096
    // Each 4th year is a leap year, except the 100th, except the 400th (the
    // era's last day, 146096).
    let year_of_era = (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_from_march = (5 * day_of_year + 2) / 153;
    let day = (day_of_year - (153 * month_from_march + 2) / 5 + 1) as u32;
    let month = if month_from_march < 10 { month_from_march + 3 } else { month_from_march - 9 } as u32;
    let year = year_of_era + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// The ISO 8601 week of the day `days` days after 1970-01-01: (week-numbering
/// year, week 1–53). Weeks run Monday to Sunday; a week belongs to the year
/// its Thursday is in, so week 1 is the week of the year's first Thursday.
fn iso_week(days: i64) -> (i64, u32) {
    // 1970-01-01 was a Thursday: Monday = 0 … Sunday = 6.
    let weekday = (days + 3).rem_euclid(7);
    let thursday = days - weekday + 3;
    let (iso_year, _, _) = civil_from_days(thursday);
    let week = (thursday - days_from_civil(iso_year, 1, 1)) / 7 + 1;
    (iso_year, week as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Rng;

    /// UTC seconds of a date and time (days_from_civil is checked against
    /// GNU date in `calendar_matches_gnu_date`).
    fn utc(y: i64, mo: u32, d: u32, h: i64, mi: i64) -> i64 {
        days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60
    }

    fn it(id: &str, time: i64) -> Item<'_> {
        Item { id, sequence: 0, time, utc_offset: 0 }
    }

    /// (id, reasons) of the kept snapshots, newest first.
    fn kept(decisions: &[Decision]) -> Vec<(&str, Vec<&str>)> {
        decisions
            .iter()
            .filter(|d| d.keep)
            .map(|d| (d.id.as_str(), d.reasons.iter().map(String::as_str).collect()))
            .collect()
    }

    fn ids(decisions: &[Decision]) -> Vec<&str> {
        decisions.iter().map(|d| d.id.as_str()).collect()
    }

    #[test]
    fn calendar_matches_gnu_date() {
        // `date -u -d DATE +%s` and `date -u -d DATE +%G-W%V-%u` (GNU coreutils).
        let table: &[(i64, u32, u32, i64, &str)] = &[
            (1970, 1, 1, 0, "1970-W01-4"),
            (1969, 12, 31, -86_400, "1970-W01-3"),
            (1900, 1, 1, -2_208_988_800, "1900-W01-1"),
            (2000, 2, 29, 951_782_400, "2000-W09-2"),
            (2008, 12, 29, 1_230_508_800, "2009-W01-1"),
            (2010, 1, 3, 1_262_476_800, "2009-W53-7"),
            (2015, 12, 31, 1_451_520_000, "2015-W53-4"),
            (2016, 1, 1, 1_451_606_400, "2015-W53-5"),
            (2020, 12, 31, 1_609_372_800, "2020-W53-4"),
            (2021, 1, 3, 1_609_632_000, "2020-W53-7"),
            (2021, 1, 4, 1_609_718_400, "2021-W01-1"),
            (2024, 12, 29, 1_735_430_400, "2024-W52-7"),
            (2024, 12, 30, 1_735_516_800, "2025-W01-1"),
            (2026, 3, 29, 1_774_742_400, "2026-W13-7"),
            (2026, 12, 3, 1_796_256_000, "2026-W49-4"),
            (2026, 12, 31, 1_798_675_200, "2026-W53-4"),
            (2027, 1, 1, 1_798_761_600, "2026-W53-5"),
            (2027, 1, 3, 1_798_934_400, "2026-W53-7"),
            (2027, 1, 4, 1_799_020_800, "2027-W01-1"),
            (2100, 3, 1, 4_107_542_400, "2100-W09-1"),
        ];
        for &(y, m, d, epoch, iso) in table {
            let days = epoch / 86_400;
            assert_eq!(days_from_civil(y, m, d) * 86_400, epoch, "{y}-{m}-{d}");
            assert_eq!(civil_from_days(days), (y, m, d), "{epoch}");
            let (iy, iw) = iso_week(days);
            let weekday = (days + 3).rem_euclid(7) + 1;
            assert_eq!(format!("{iy}-W{iw:02}-{weekday}"), iso, "{y}-{m}-{d}");
        }
    }

    #[test]
    fn calendar_round_trips_and_steps_one_day_at_a_time() {
        // From 0400-01-01 to 2800-ish: every day is the day after the one
        // before, months and years roll over at the right lengths.
        let start = days_from_civil(400, 1, 1);
        let mut prev = civil_from_days(start - 1);
        assert_eq!(prev, (399, 12, 31));
        for days in start..start + 876_000 {
            let (y, m, d) = civil_from_days(days);
            assert_eq!(days_from_civil(y, m, d), days);
            let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
            let feb = if leap { 29 } else { 28 };
            let len = [31, feb, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][m as usize - 1];
            let (py, pm, pd) = prev;
            let expected = if pd < [31, feb, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31][pm as usize - 1] {
                (py, pm, pd + 1)
            } else if pm < 12 {
                (py, pm + 1, 1)
            } else {
                (py + 1, 1, 1)
            };
            assert!(d <= len);
            assert_eq!((y, m, d), expected, "day {days}");
            prev = (y, m, d);
        }
    }

    #[test]
    fn an_empty_policy_is_refused() {
        for items in [vec![], vec![it("a", 0)]] {
            let e = apply(&Policy::default(), &items).unwrap_err();
            assert!(matches!(e, Error::Usage(_)), "{e:?}");
            assert_eq!(e.exit_code(), crate::error::exit::USAGE);
            let msg = e.to_string();
            assert!(msg.starts_with("give at least one --keep-… option"), "{msg}");
            assert!(msg.ends_with("klon forget never deletes every snapshot"), "{msg}");
        }
        assert!(Policy::default().is_empty());
        assert!(!Policy { yearly: 1, ..Policy::default() }.is_empty());
    }

    #[test]
    fn an_empty_list_gives_no_decisions() {
        assert_eq!(apply(&Policy { last: 3, ..Policy::default() }, &[]).unwrap(), vec![]);
    }

    #[test]
    fn keep_last_keeps_the_newest_and_all_when_the_list_is_shorter() {
        let items = [it("c", 300), it("a", 100), it("d", 400), it("b", 200)];
        let d = apply(&Policy { last: 2, ..Policy::default() }, &items).unwrap();
        assert_eq!(ids(&d), ["d", "c", "b", "a"]);
        assert_eq!(kept(&d), [("d", vec!["last 1"]), ("c", vec!["last 2"])]);
        assert!(d[2..].iter().all(|d| !d.keep && d.reasons.is_empty()));

        let d = apply(&Policy { last: 10, ..Policy::default() }, &items).unwrap();
        assert_eq!(
            kept(&d),
            [("d", vec!["last 1"]), ("c", vec!["last 2"]), ("b", vec!["last 3"]), ("a", vec!["last 4"])]
        );
    }

    #[test]
    fn keep_hourly_keeps_the_newest_of_each_hour_that_has_one() {
        let items = [
            it("h14a", utc(2026, 12, 3, 14, 5)),
            it("h14b", utc(2026, 12, 3, 14, 55)),
            it("h13", utc(2026, 12, 3, 13, 59)),
            // 12:00 has none: skipped, not counted.
            it("h11a", utc(2026, 12, 3, 11, 0)),
            it("h11b", utc(2026, 12, 3, 11, 30)),
            it("h10", utc(2026, 12, 3, 10, 10)),
        ];
        let d = apply(&Policy { hourly: 3, ..Policy::default() }, &items).unwrap();
        assert_eq!(ids(&d), ["h14b", "h14a", "h13", "h11b", "h11a", "h10"]);
        assert_eq!(
            kept(&d),
            [
                ("h14b", vec!["hourly 2026-12-03 14:00"]),
                ("h13", vec!["hourly 2026-12-03 13:00"]),
                ("h11b", vec!["hourly 2026-12-03 11:00"]),
            ]
        );
    }

    #[test]
    fn keep_daily_skips_days_without_snapshots() {
        let items = [
            it("nov20", utc(2026, 11, 20, 9, 0)),
            it("dec1-early", utc(2026, 12, 1, 0, 0)),
            it("dec1-late", utc(2026, 12, 1, 23, 59)),
            it("dec3-early", utc(2026, 12, 3, 8, 0)),
            it("dec3-late", utc(2026, 12, 3, 20, 0)),
            it("dec7", utc(2026, 12, 7, 12, 0)),
        ];
        let d = apply(&Policy { daily: 3, ..Policy::default() }, &items).unwrap();
        // 7 December, 3 December and 1 December: the days between have no
        // snapshot and do not count; 20 November is the fourth day: removed.
        assert_eq!(
            kept(&d),
            [
                ("dec7", vec!["daily 2026-12-07"]),
                ("dec3-late", vec!["daily 2026-12-03"]),
                ("dec1-late", vec!["daily 2026-12-01"]),
            ]
        );
        assert_eq!(d.len(), 6);
    }

    #[test]
    fn keep_weekly_monthly_yearly_alone() {
        let items = [
            it("w49-thu", utc(2026, 12, 3, 12, 0)),
            it("w49-sun", utc(2026, 12, 6, 23, 0)),
            it("w50-mon", utc(2026, 12, 7, 0, 30)),
            // W48 has none.
            it("w47-sat", utc(2026, 11, 21, 10, 0)),
            it("w44-sun", utc(2026, 11, 1, 10, 0)),
            it("oct", utc(2026, 10, 15, 10, 0)),
            it("2025", utc(2025, 6, 1, 0, 0)),
            it("2023", utc(2023, 1, 1, 0, 0)),
        ];
        let d = apply(&Policy { weekly: 3, ..Policy::default() }, &items).unwrap();
        assert_eq!(
            kept(&d),
            [
                ("w50-mon", vec!["weekly 2026-W50"]),
                ("w49-sun", vec!["weekly 2026-W49"]),
                ("w47-sat", vec!["weekly 2026-W47"]),
            ]
        );
        let d = apply(&Policy { monthly: 3, ..Policy::default() }, &items).unwrap();
        assert_eq!(
            kept(&d),
            [
                ("w50-mon", vec!["monthly 2026-12"]),
                ("w47-sat", vec!["monthly 2026-11"]),
                ("oct", vec!["monthly 2026-10"])
            ]
        );
        // 2024 has none: the third year kept is 2023.
        let d = apply(&Policy { yearly: 3, ..Policy::default() }, &items).unwrap();
        assert_eq!(
            kept(&d),
            [("w50-mon", vec!["yearly 2026"]), ("2025", vec!["yearly 2025"]), ("2023", vec!["yearly 2023"])]
        );
    }

    #[test]
    fn the_oldest_is_kept_too_while_a_rule_finds_fewer_periods_than_asked() {
        // Three days of two snapshots each, --keep-daily 7: the newest of
        // each day, and the oldest snapshot (restic 0.17), which keeps the
        // history as long as it is while the repository is young.
        let items = [
            it("d1a", utc(2026, 12, 1, 6, 0)),
            it("d1b", utc(2026, 12, 1, 18, 0)),
            it("d2a", utc(2026, 12, 2, 6, 0)),
            it("d2b", utc(2026, 12, 2, 18, 0)),
            it("d3a", utc(2026, 12, 3, 6, 0)),
            it("d3b", utc(2026, 12, 3, 18, 0)),
        ];
        let d = apply(&Policy { daily: 7, ..Policy::default() }, &items).unwrap();
        assert_eq!(
            kept(&d),
            [
                ("d3b", vec!["daily 2026-12-03"]),
                ("d2b", vec!["daily 2026-12-02"]),
                ("d1b", vec!["daily 2026-12-01"]),
                ("d1a", vec!["oldest (--keep-daily 7, only 3 days have snapshots)"]),
            ]
        );
        // Once the rule is filled the oldest goes.
        let d = apply(&Policy { daily: 3, ..Policy::default() }, &items).unwrap();
        assert_eq!(kept(&d).len(), 3);
        assert!(!d.last().unwrap().keep);
        // With one day only: "1 day".
        let d = apply(&Policy { daily: 2, ..Policy::default() }, &items[..2]).unwrap();
        assert_eq!(
            kept(&d),
            [("d1b", vec!["daily 2026-12-01"]), ("d1a", vec!["oldest (--keep-daily 2, only 1 day has snapshots)"])]
        );
    }

    #[test]
    fn a_snapshot_kept_by_one_rule_fills_the_others_too() {
        // restic's way: the newest is "last 1" and also the newest of its
        // day, so --keep-last 1 --keep-daily 2 covers two days. (Proxmox
        // Backup Server would let daily skip 3 December, covered by
        // keep-last, and keep 2 and 1 December too.)
        let items = [
            it("d1", utc(2026, 12, 1, 12, 0)),
            it("d2", utc(2026, 12, 2, 12, 0)),
            it("d3a", utc(2026, 12, 3, 6, 0)),
            it("d3b", utc(2026, 12, 3, 18, 0)),
        ];
        let d = apply(&Policy { last: 1, daily: 2, ..Policy::default() }, &items).unwrap();
        assert_eq!(kept(&d), [("d3b", vec!["last 1", "daily 2026-12-03"]), ("d2", vec!["daily 2026-12-02"])]);
    }

    /// The worked example of docs/RETENTION.md, checked.
    #[test]
    fn worked_example_of_the_documentation() {
        let items = [
            it("s01", utc(2026, 10, 30, 22, 0)),
            it("s02", utc(2026, 11, 15, 22, 0)),
            it("s03", utc(2026, 11, 22, 22, 0)),
            it("s04", utc(2026, 11, 27, 22, 0)),
            it("s05", utc(2026, 11, 30, 22, 0)),
            it("s06", utc(2026, 12, 1, 22, 0)),
            it("s07", utc(2026, 12, 2, 9, 0)),
            it("s08", utc(2026, 12, 2, 22, 0)),
            it("s09", utc(2026, 12, 3, 9, 0)),
            it("s10", utc(2026, 12, 3, 22, 0)),
            it("s11", utc(2026, 12, 4, 9, 0)),
            it("s12", utc(2026, 12, 4, 13, 0)),
        ];
        let policy = Policy { last: 2, daily: 3, weekly: 3, monthly: 3, ..Policy::default() };
        let d = apply(&policy, &items).unwrap();
        let table: Vec<String> = d
            .iter()
            .map(|d| format!("{} {} {}", d.id, if d.keep { "keep" } else { "remove" }, d.reasons.join(", ")))
            .map(|s| s.trim_end().to_string())
            .collect();
        // Weeks: W49 is Monday 30 November to Sunday 6 December, W48 23–29
        // November, W47 16–22 November.
        assert_eq!(
            table,
            [
                "s12 keep last 1, daily 2026-12-04, weekly 2026-W49, monthly 2026-12",
                "s11 keep last 2",
                "s10 keep daily 2026-12-03",
                "s09 remove",
                "s08 keep daily 2026-12-02",
                "s07 remove",
                "s06 remove",
                "s05 keep monthly 2026-11",
                "s04 keep weekly 2026-W48",
                "s03 keep weekly 2026-W47",
                "s02 remove",
                "s01 keep monthly 2026-10",
            ]
        );
        // With --keep-yearly 2 only 2026 has snapshots: s01 stays as the oldest too.
        let policy = Policy { yearly: 2, ..policy };
        let d = apply(&policy, &items).unwrap();
        assert_eq!(d[0].reasons.last().unwrap(), "yearly 2026");
        assert_eq!(d[11].reasons, ["monthly 2026-10", "oldest (--keep-yearly 2, only 1 year has snapshots)"]);
    }

    #[test]
    fn the_snapshot_made_last_is_the_newest_whatever_its_time() {
        // Made in this order: a, b (clock a day behind), c (same second as b).
        let a = Item { id: "a", sequence: 1, time: utc(2026, 12, 4, 12, 0), utc_offset: 0 };
        let b = Item { id: "b", sequence: 2, time: utc(2026, 12, 3, 12, 0), utc_offset: 0 };
        let c = Item { id: "0c", sequence: 3, time: utc(2026, 12, 3, 12, 0), utc_offset: 0 };
        let last2 = Policy { last: 2, ..Policy::default() };
        let d = apply(&last2, &[a, b, c]).unwrap();
        assert_eq!(ids(&d), ["0c", "b", "a"]);
        assert_eq!(kept(&d), [("0c", vec!["last 1"]), ("b", vec!["last 2"])]);
    }

    #[test]
    fn the_repeated_hour_when_clocks_go_back_is_one_hour() {
        // 25 October 2026 in Berlin: 02:30 CEST (+2, 00:30 UTC), then 02:30
        // CET (+1, 01:30 UTC): one hour on the clock, its later snapshot kept.
        let cest = Item { id: "cest", sequence: 0, time: utc(2026, 10, 25, 0, 30), utc_offset: 7200 };
        let cet = Item { id: "cet", sequence: 0, time: utc(2026, 10, 25, 1, 30), utc_offset: 3600 };
        // The hour before: 01:30 CEST. With --keep-hourly 2 the second hour
        // kept is 01:00, not the first 02:30.
        let before = Item { id: "before", sequence: 0, time: utc(2026, 10, 24, 23, 30), utc_offset: 7200 };
        let d = apply(&Policy { hourly: 2, ..Policy::default() }, &[cest, cet, before]).unwrap();
        assert_eq!(ids(&d), ["cet", "cest", "before"]);
        assert_eq!(kept(&d), [("cet", vec!["hourly 2026-10-25 02:00"]), ("before", vec!["hourly 2026-10-25 01:00"])]);
    }

    #[test]
    fn snapshots_of_the_same_second_are_ordered_by_id() {
        let t = utc(2026, 12, 3, 14, 0);
        let forward = [it("a", t), it("b", t), it("c", t - 1)];
        let backward = [it("c", t - 1), it("b", t), it("a", t)];
        let policy = Policy { last: 1, daily: 1, ..Policy::default() };
        for items in [&forward, &backward] {
            let d = apply(&policy, items).unwrap();
            // The greater id counts as the newer: "b" is the newest.
            assert_eq!(ids(&d), ["b", "a", "c"]);
            assert_eq!(kept(&d), [("b", vec!["last 1", "daily 2026-12-03"])]);
        }
    }

    #[test]
    fn periods_are_read_on_the_clock_that_made_the_snapshot() {
        let instant = utc(2026, 12, 3, 23, 30);
        // The same instant: 23:30 on 3 December in London, 00:30 on
        // 4 December in Berlin, 18:30 on 3 December in New York.
        let london = Item { id: "london", sequence: 0, time: instant, utc_offset: 0 };
        let berlin = Item { id: "berlin", sequence: 0, time: instant, utc_offset: 3600 };
        let new_york = Item { id: "new-york", sequence: 0, time: instant, utc_offset: -5 * 3600 };
        let daily = Policy { daily: 5, ..Policy::default() };
        let d = apply(&daily, &[london, berlin, new_york]).unwrap();
        // At the same second the order is by id: new-york, london, berlin.
        // new-york is the newest of 3 December (so london, on the same day,
        // goes), berlin alone on the 4th.
        assert_eq!(kept(&d), [("new-york", vec!["daily 2026-12-03"]), ("berlin", vec!["daily 2026-12-04"])]);
        assert_eq!(ids(&d), ["new-york", "london", "berlin"]);
        let hourly = Policy { hourly: 3, ..Policy::default() };
        let d = apply(&hourly, &[berlin, new_york]).unwrap();
        assert_eq!(
            kept(&d),
            [("new-york", vec!["hourly 2026-12-03 18:00"]), ("berlin", vec!["hourly 2026-12-04 00:00"])]
        );
        // India (+5:30) at 18:29 UTC is 23:59; at 18:30 it is midnight.
        let before = Item { id: "i1", sequence: 0, time: utc(2026, 12, 3, 18, 29), utc_offset: 19_800 };
        let after = Item { id: "i2", sequence: 0, time: utc(2026, 12, 3, 18, 30), utc_offset: 19_800 };
        let d = apply(&Policy { daily: 2, ..Policy::default() }, &[before, after]).unwrap();
        assert_eq!(kept(&d), [("i2", vec!["daily 2026-12-04"]), ("i1", vec!["daily 2026-12-03"])]);
        // Before 1970 too (negative times).
        let old = Item { id: "old", sequence: 0, time: -1, utc_offset: 3600 };
        let d = apply(&Policy { daily: 1, yearly: 1, ..Policy::default() }, &[old]).unwrap();
        assert_eq!(kept(&d), [("old", vec!["daily 1970-01-01", "yearly 1970"])]);
    }

    #[test]
    fn iso_weeks_across_year_boundaries() {
        let weekly = Policy { weekly: 10, ..Policy::default() };
        let cases = [
            ((2020, 12, 31), "2020-W53"),
            ((2021, 1, 3), "2020-W53"),
            ((2021, 1, 4), "2021-W01"),
            ((2024, 12, 29), "2024-W52"),
            ((2024, 12, 30), "2025-W01"),
            ((2026, 12, 31), "2026-W53"),
            ((2027, 1, 1), "2026-W53"),
            ((2027, 1, 4), "2027-W01"),
        ];
        for ((y, m, d), week) in cases {
            let decisions = apply(&weekly, &[it("x", utc(y, m, d, 12, 0))]).unwrap();
            assert_eq!(decisions[0].reasons, [format!("weekly {week}")], "{y}-{m}-{d}");
        }
        // 31 December 2026 and 1 January 2027 are one week: the newest of the
        // two stands for it, though they are in different years and months.
        let items = [it("dec31", utc(2026, 12, 31, 12, 0)), it("jan1", utc(2027, 1, 1, 12, 0))];
        let policy = Policy { weekly: 1, monthly: 2, yearly: 2, ..Policy::default() };
        let d = apply(&policy, &items).unwrap();
        assert_eq!(
            kept(&d),
            [
                ("jan1", vec!["weekly 2026-W53", "monthly 2027-01", "yearly 2027"]),
                ("dec31", vec!["monthly 2026-12", "yearly 2026"]),
            ]
        );
    }

    #[test]
    fn damaged_snapshot_lists_are_refused() {
        let policy = Policy { last: 1, ..Policy::default() };
        let bad = Item { id: "x1", sequence: 0, time: 0, utc_offset: 18 * 3600 + 1 };
        let e = apply(&policy, &[it("a", 0), bad]).unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)), "{e:?}");
        assert!(e.to_string().contains("snapshot x1 records a UTC offset of 64801 s"), "{e}");
        // ±18 h exactly is accepted.
        for off in [18 * 3600, -18 * 3600] {
            assert!(apply(&policy, &[Item { id: "x", sequence: 0, time: 0, utc_offset: off }]).is_ok());
        }

        let e = apply(&policy, &[it("a", 0), it("b", 1), it("a", 2)]).unwrap_err();
        assert!(matches!(e, Error::Corrupt(_)), "{e:?}");
        assert!(e.to_string().contains("two snapshots have the id a"), "{e}");

        let e = apply(&policy, &[Item { id: "far", sequence: 0, time: i64::MAX, utc_offset: 1 }]).unwrap_err();
        assert!(e.to_string().contains("snapshot far records the time 9223372036854775807 s"), "{e}");
        // The extremes themselves are dates (far from any real one), not panics.
        let all = Policy { last: 2, hourly: 2, daily: 2, weekly: 2, monthly: 2, yearly: 2 };
        let items = [
            Item { id: "max", sequence: 0, time: i64::MAX - MAX_UTC_OFFSET as i64, utc_offset: MAX_UTC_OFFSET },
            Item { id: "min", sequence: 0, time: i64::MIN + MAX_UTC_OFFSET as i64, utc_offset: -MAX_UTC_OFFSET },
        ];
        let d = apply(&all, &items).unwrap();
        assert_eq!(ids(&d), ["max", "min"]);
        assert!(d.iter().all(|d| d.keep && d.reasons.len() == 6), "{d:?}");
    }

    #[test]
    fn describe_says_what_is_kept() {
        assert_eq!(Policy::default().describe(), "keep nothing: no --keep-… option");
        assert_eq!(Policy { last: 1, ..Policy::default() }.describe(), "keep the newest snapshot");
        assert_eq!(
            Policy { last: 3, daily: 7, ..Policy::default() }.describe(),
            "keep the 3 newest snapshots and the newest snapshot of each of the last 7 days that have snapshots"
        );
        assert_eq!(
            Policy { hourly: 24, daily: 1, weekly: 4, monthly: 12, yearly: 2, ..Policy::default() }.describe(),
            "keep the newest snapshot of each of the last 24 hours, 1 day, 4 ISO weeks, 12 months and 2 years \
             that have snapshots"
        );
    }

    /// The policy again, written the other way round: group the snapshots
    /// by period (with a calendar that counts years and months one by one),
    /// order the periods by their newest snapshot, take the first N.
    fn reference(policy: &Policy, items: &[Item]) -> Vec<(String, bool, Vec<String>)> {
        fn leap(y: i64) -> bool {
            (y % 4 == 0 && y % 100 != 0) || y % 400 == 0
        }
        // (year, month, day, hour, day of the year from 1, weekday Monday = 1)
        // for local times from 1970 on.
        fn date(t: i64) -> (i64, u32, u32, u32, i64, i64) {
            let mut days = t / 86_400;
            let weekday = (days + 3) % 7 + 1;
            let mut y = 1970;
            while days >= if leap(y) { 366 } else { 365 } {
                days -= if leap(y) { 366 } else { 365 };
                y += 1;
            }
            let ordinal = days + 1;
            let lens = [31, if leap(y) { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
            let mut m = 0;
            while days >= lens[m] {
                days -= lens[m];
                m += 1;
            }
            (y, m as u32 + 1, days as u32 + 1, ((t % 86_400) / 3600) as u32, ordinal, weekday)
        }
        fn weeks_in(y: i64) -> i64 {
            // 53 when the year starts on a Thursday, or is leap and starts on
            // a Wednesday (Jan 1's weekday: from the weekday of some day of it).
            let jan1 = {
                let mut days = 0;
                for year in 1970..y {
                    days += if leap(year) { 366 } else { 365 };
                }
                (days + 3) % 7 + 1
            };
            if jan1 == 4 || (leap(y) && jan1 == 3) { 53 } else { 52 }
        }
        let mut sorted: Vec<&Item> = items.iter().collect();
        sorted.sort_by_key(|i| std::cmp::Reverse((i.time, i.id)));
        let mut reasons: Vec<Vec<String>> = vec![Vec::new(); sorted.len()];
        let last = policy.last as usize;
        for (k, r) in reasons.iter_mut().enumerate().take(last) {
            r.push(format!("last {}", k + 1));
        }
        // (rule, its count, the period of a local time as printed)
        type Key = (&'static str, u32, fn(i64) -> String);
        let keys: [Key; 5] = [
            ("hourly", policy.hourly, |t| {
                let (y, m, d, h, _, _) = date(t);
                format!("{y}-{m:02}-{d:02} {h:02}:00")
            }),
            ("daily", policy.daily, |t| {
                let (y, m, d, _, _, _) = date(t);
                format!("{y}-{m:02}-{d:02}")
            }),
            ("weekly", policy.weekly, |t| {
                let (y, _, _, _, ordinal, weekday) = date(t);
                let w = (ordinal - weekday + 10) / 7;
                let (y, w) = if w < 1 {
                    (y - 1, weeks_in(y - 1))
                } else if w > weeks_in(y) {
                    (y + 1, 1)
                } else {
                    (y, w)
                };
                format!("{y}-W{w:02}")
            }),
            ("monthly", policy.monthly, |t| {
                let (y, m, _, _, _, _) = date(t);
                format!("{y}-{m:02}")
            }),
            ("yearly", policy.yearly, |t| format!("{}", date(t).0)),
        ];
        for (name, n, key) in keys {
            if n == 0 {
                continue;
            }
            // period -> position of its newest snapshot
            let mut newest = std::collections::BTreeMap::new();
            for (pos, i) in sorted.iter().enumerate().rev() {
                newest.insert(key(i.time + i.utc_offset as i64), pos);
            }
            let mut periods: Vec<(usize, String)> = newest.into_iter().map(|(p, pos)| (pos, p)).collect();
            periods.sort();
            for (pos, period) in periods.iter().take(n as usize) {
                reasons[*pos].push(format!("{name} {period}"));
            }
            let oldest = sorted.len() - 1;
            if periods.len() < n as usize && !periods.iter().any(|(pos, _)| *pos == oldest) {
                reasons[oldest].push(format!("oldest {name}"));
            }
        }
        sorted.iter().zip(reasons).map(|(i, r)| (i.id.to_string(), !r.is_empty(), r)).collect()
    }

    #[test]
    fn agrees_with_a_reference_on_random_lists() {
        let offsets = [0, 3600, 7200, -5 * 3600, 19_800, 14 * 3600, -10 * 3600, -12 * 3600];
        let spans = [3 * 3600, 3 * 86_400, 40 * 86_400, 400 * 86_400, 5 * 366 * 86_400];
        let base = utc(2027, 1, 4, 12, 0);
        let mut oldest_reasons = 0;
        let mut removed = 0;
        for seed in 0..3000 {
            let mut rng = Rng::seeded(seed);
            let count = 1 + rng.below(40) as usize;
            let span = spans[rng.below(spans.len() as u64) as usize];
            // Half the lists from one time zone, half mixed.
            let fixed = offsets[rng.below(offsets.len() as u64) as usize];
            let mixed = rng.below(2) == 0;
            let names: Vec<String> = (0..count).map(|k| format!("s{:x}", rng.below(1 << 20) * 64 + k as u64)).collect();
            let mut items: Vec<Item> = Vec::new();
            for name in &names {
                let time = if !items.is_empty() && rng.below(6) == 0 {
                    items[rng.below(items.len() as u64) as usize].time // a tie
                } else {
                    base - rng.below(span) as i64
                };
                let utc_offset = if mixed { offsets[rng.below(offsets.len() as u64) as usize] } else { fixed };
                items.push(Item { id: name, sequence: 0, time, utc_offset });
            }
            let mut policy = Policy::default();
            while policy.is_empty() {
                let mut n = || if rng.below(3) == 0 { 0 } else { rng.below(6) as u32 };
                policy = Policy { last: n(), hourly: n(), daily: n(), weekly: n(), monthly: n(), yearly: n() };
            }

            let got = apply(&policy, &items).unwrap();
            let want = reference(&policy, &items);
            let got: Vec<(String, bool, Vec<String>)> = got
                .into_iter()
                .map(|d| {
                    let reasons = d
                        .reasons
                        .into_iter()
                        .map(|r| match r.strip_prefix("oldest (--keep-") {
                            Some(rest) => format!("oldest {}", rest.split(' ').next().unwrap()),
                            None => r,
                        })
                        .collect();
                    (d.id, d.keep, reasons)
                })
                .collect();
            assert_eq!(got, want, "seed {seed}, {policy:?}, {items:?}");

            // Newest first, one decision per snapshot, reasons exactly for
            // the kept ones, and never everything removed.
            assert_eq!(got.len(), items.len());
            assert!(got[0].1, "seed {seed}: the newest is always kept");
            assert!(got.iter().all(|(_, keep, reasons)| *keep != reasons.is_empty()));
            let time = |id: &str| items.iter().find(|i| i.id == id).unwrap().time;
            assert!(got.windows(2).all(|w| (time(&w[0].0), &w[0].0) > (time(&w[1].0), &w[1].0)));
            oldest_reasons += got.iter().filter(|g| g.2.iter().any(|r| r.starts_with("oldest"))).count();
            removed += got.iter().filter(|g| !g.1).count();
        }
        // The lists did exercise both the removals and the oldest rule.
        assert!(oldest_reasons > 100 && removed > 1000, "{oldest_reasons} {removed}");
    }
}
