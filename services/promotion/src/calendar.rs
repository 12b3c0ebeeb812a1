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
        let zoned = jiff::Timestamp::from_millisecond(now).ok().map(|ts| {
            let tz = if time_zone.is_empty() {
                jiff::tz::TimeZone::UTC
            } else {
                jiff::tz::TimeZone::get(time_zone).unwrap_or(jiff::tz::TimeZone::UTC)
            };
            ts.to_zoned(tz)
        });
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
