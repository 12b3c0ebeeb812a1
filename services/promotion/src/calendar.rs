//! Local time at a store: campaigns' days and hours, birthdays and tier months are all read
//! on the store's clock, in its IANA time zone.

use loyalty_platform::calendar::{anniversary_in, civil, day_from_civil};
use loyalty_platform::clock::{DAY_MS, Millis};

/// A moment as the store's wall clock shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    pub year: i32,
    pub month: u8,
    pub day: u8,
    /// ISO weekday, 1 = Monday.
    pub weekday: u8,
    pub hour: u8,
    /// Days since 1970-01-01 of the local date.
    pub day_number: i64,
}

impl LocalTime {
    /// `now` in `time_zone` (empty or unknown: UTC).
    pub fn at(now: Millis, time_zone: &str) -> Self {
        let zoned = jiff::Timestamp::from_millisecond(now)
            .ok()
            .map(|ts| ts.to_zoned(zone(time_zone)));
        match zoned {
            Some(z) => {
                let (year, month, day) = (i32::from(z.year()), z.month() as u8, z.day() as u8);
                Self {
                    year,
                    month,
                    day,
                    weekday: z.weekday().to_monday_one_offset() as u8,
                    hour: z.hour() as u8,
                    day_number: day_number(year, month, day),
                }
            }
            None => Self::utc_fallback(now),
        }
    }

    fn utc_fallback(now: Millis) -> Self {
        let day_number = now.div_euclid(DAY_MS);
        let (year, month, day) = civil(day_number);
        Self {
            year,
            month: month as u8,
            day: day as u8,
            weekday: ((day_number + 3).rem_euclid(7) + 1) as u8,
            hour: (now.rem_euclid(DAY_MS) / 3_600_000) as u8,
            day_number,
        }
    }

    /// Months since year 0, for tier windows.
    pub fn month_number(&self) -> i32 {
        self.year * 12 + i32::from(self.month) - 1
    }
}

/// The time zone named `time_zone` (empty or unknown: UTC).
fn zone(time_zone: &str) -> jiff::tz::TimeZone {
    if time_zone.is_empty() {
        jiff::tz::TimeZone::UTC
    } else {
        jiff::tz::TimeZone::get(time_zone).unwrap_or(jiff::tz::TimeZone::UTC)
    }
}

/// The first local midnight in `time_zone` at or after `at`: points whose lifetime ends at
/// `at` expire at the end of that local day. Every accrual of one day then shares its
/// expiry, so the ledger merges them into one lot however often the member buys.
pub fn end_of_local_day(at: Millis, time_zone: &str) -> Millis {
    let local_midnight = || -> Result<Millis, jiff::Error> {
        let zoned = jiff::Timestamp::from_millisecond(at)?.to_zoned(zone(time_zone));
        let start = zoned.start_of_day()?;
        if start.timestamp() == zoned.timestamp() {
            return Ok(at);
        }
        Ok(zoned
            .tomorrow()?
            .start_of_day()?
            .timestamp()
            .as_millisecond())
    };
    local_midnight().unwrap_or_else(|_| {
        // Out of the calendar's range: UTC day arithmetic.
        let day = at.div_euclid(DAY_MS);
        if at.rem_euclid(DAY_MS) == 0 {
            at
        } else {
            (day + 1) * DAY_MS
        }
    })
}

/// Whether `name` is a time zone this build knows.
pub fn known_time_zone(name: &str) -> bool {
    name.is_empty() || jiff::tz::TimeZone::get(name).is_ok()
}

/// Days since 1970-01-01 of a civil date.
pub fn day_number(year: i32, month: u8, day: u8) -> i64 {
    day_from_civil(year, u32::from(month), u32::from(day))
}

/// Whether `today` lies from `before` days before a birthday through `after` days after
/// it, in any year. A 29 February birthday falls on 1 March in other years (as in
/// segmentation).
pub fn in_birthday_window(today: &LocalTime, month: u8, day: u8, before: u16, after: u16) -> bool {
    [today.year - 1, today.year, today.year + 1]
        .into_iter()
        .any(|year| {
            let birthday = anniversary_in(year, u32::from(month), u32::from(day));
            (birthday - i64::from(before)..=birthday + i64::from(after)).contains(&today.day_number)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn noon(y: i32, m: u8, d: u8) -> LocalTime {
        LocalTime::at(day_number(y, m, d) * DAY_MS + 12 * 3_600_000, "")
    }

    #[test]
    fn local_time_follows_the_store_time_zone() {
        // 2026-11-22 20:30 UTC is Monday 01:30 in Almaty (UTC+5).
        let t = day_number(2026, 11, 22) * DAY_MS + 20 * 3_600_000 + 30 * 60_000;
        let utc = LocalTime::at(t, "");
        assert_eq!((utc.day, utc.weekday, utc.hour), (22, 7, 20));
        let almaty = LocalTime::at(t, "Asia/Almaty");
        assert_eq!((almaty.day, almaty.weekday, almaty.hour), (23, 1, 1));
        assert_eq!(LocalTime::at(t, "Nowhere/Special"), utc);
        assert!(known_time_zone("Europe/Moscow"));
        assert!(!known_time_zone("Mars/Olympus"));
    }

    #[test]
    fn points_expire_at_the_end_of_the_store_local_day() {
        let h = 3_600_000;
        let day = day_number(2027, 3, 10) * DAY_MS;
        // UTC: any moment of the day ends at the next midnight; midnight itself stays.
        assert_eq!(end_of_local_day(day + 14 * h + 123, ""), day + DAY_MS);
        assert_eq!(end_of_local_day(day + 1, ""), day + DAY_MS);
        assert_eq!(end_of_local_day(day, ""), day);
        // Moscow is UTC+3: 22:00 UTC on the 10th is already the 11th there.
        assert_eq!(
            end_of_local_day(day + 20 * h, "Europe/Moscow"),
            day + DAY_MS - 3 * h
        );
        assert_eq!(
            end_of_local_day(day + 22 * h, "Europe/Moscow"),
            day + 2 * DAY_MS - 3 * h
        );
        // Across a change to summer time (Berlin, 2027-03-28: UTC+1 before, UTC+2 after).
        let berlin = day_number(2027, 3, 28) * DAY_MS;
        assert_eq!(
            end_of_local_day(berlin + 12 * h, "Europe/Berlin"),
            berlin + DAY_MS - 2 * h
        );
        assert_eq!(
            end_of_local_day(berlin - 2 * h, "Europe/Berlin"),
            berlin - h
        );
        // Every purchase of one local day shares the expiry.
        let ends: std::collections::BTreeSet<Millis> = (0..24 * 60)
            .map(|m| end_of_local_day(day - 3 * h + 1 + m * 60_000, "Europe/Moscow"))
            .collect();
        assert_eq!(ends.len(), 1);
    }

    #[test]
    fn the_birthday_window_wraps_the_year_and_leap_days() {
        // Two days before through the birthday, not the day after.
        assert!(!in_birthday_window(&noon(2026, 3, 7), 3, 10, 2, 0));
        assert!(in_birthday_window(&noon(2026, 3, 8), 3, 10, 2, 0));
        assert!(in_birthday_window(&noon(2026, 3, 10), 3, 10, 2, 0));
        assert!(!in_birthday_window(&noon(2026, 3, 11), 3, 10, 2, 0));
        assert!(in_birthday_window(&noon(2026, 12, 31), 1, 1, 2, 0));
        assert!(in_birthday_window(&noon(2027, 1, 2), 12, 31, 0, 2));
        assert!(in_birthday_window(&noon(2027, 3, 1), 2, 29, 0, 0));
        assert!(!in_birthday_window(&noon(2027, 2, 28), 2, 29, 0, 0));
        assert!(in_birthday_window(&noon(2028, 2, 29), 2, 29, 0, 0));
        assert!(!in_birthday_window(&noon(2028, 2, 28), 2, 29, 0, 0));
    }
}
