//! Local time at a store: campaigns' days and hours, birthdays and tier months are all read
//! on the store's clock, in its IANA time zone.

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
            month,
            day,
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

fn leap(year: i32) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// Days since 1970-01-01 of a civil date (proleptic Gregorian).
pub fn day_number(year: i32, month: u8, day: u8) -> i64 {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The civil date of a day number.
pub fn civil(days: i64) -> (i32, u8, u8) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u8;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u8;
    let y = (yoe + era * 400 + i64::from(m <= 2)) as i32;
    (y, m, d)
}

/// Whether `today` lies from `before` days before a birthday through `after` days after
/// it, in any year. A 29 February birthday falls on 28 February in other years.
pub fn in_birthday_window(today: &LocalTime, month: u8, day: u8, before: u16, after: u16) -> bool {
    [today.year - 1, today.year, today.year + 1]
        .into_iter()
        .any(|year| {
            let d = if month == 2 && day == 29 && !leap(year) {
                28
            } else {
                day
            };
            let birthday = day_number(year, month, d);
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
    fn civil_dates_round_trip() {
        for days in [-800_000, -1, 0, 59, 10_000, 20_000, 2_000_000] {
            let (y, m, d) = civil(days);
            assert_eq!(day_number(y, m, d), days);
        }
        assert_eq!(day_number(2026, 11, 23), 20_780);
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
        assert!(in_birthday_window(&noon(2027, 2, 28), 2, 29, 0, 0));
        assert!(in_birthday_window(&noon(2028, 2, 29), 2, 29, 0, 0));
        assert!(!in_birthday_window(&noon(2028, 2, 28), 2, 29, 0, 0));
    }
}
