//! Civil dates as day numbers (days since 1970-01-01), without a date library: what
//! segmentation's windows and promotion's birthdays and tier months are computed with.

use crate::clock::{DAY_MS, Millis};

/// Days since 1970-01-01.
pub type Day = i64;

/// The UTC day of a moment.
pub fn day_of(time: Millis) -> Day {
    time.div_euclid(DAY_MS)
}

pub fn is_leap(year: i32) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// The day number of a proleptic Gregorian date.
pub fn day_from_civil(year: i32, month: u32, day: u32) -> Day {
    let y = i64::from(year) - i64::from(month <= 2);
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let m = i64::from(month);
    let doy = (153 * (if m > 2 { m - 3 } else { m + 9 }) + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day number.
pub fn civil(day: Day) -> (i32, u32, u32) {
    let z = day + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    (
        i32::try_from(y).unwrap_or(i32::MAX),
        u32::try_from(m).unwrap_or(1),
        u32::try_from(d).unwrap_or(1),
    )
}

/// The day a (month, day) anniversary falls on in `year`: 29 February falls on 1 March in
/// other years.
pub fn anniversary_in(year: i32, month: u32, day: u32) -> Day {
    if month == 2 && day == 29 && !is_leap(year) {
        day_from_civil(year, 3, 1)
    } else {
        day_from_civil(year, month, day)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for d in (-800_000..800_000).step_by(97) {
            let (y, m, dd) = civil(d);
            assert_eq!(day_from_civil(y, m, dd), d);
        }
        assert_eq!(day_from_civil(1970, 1, 1), 0);
        assert_eq!(civil(19_723), (2024, 1, 1));
        assert_eq!(day_from_civil(2026, 11, 23), 20_780);
    }

    #[test]
    fn leap_day_anniversaries() {
        assert_eq!(anniversary_in(2027, 2, 29), day_from_civil(2027, 3, 1));
        assert_eq!(anniversary_in(2028, 2, 29), day_from_civil(2028, 2, 29));
    }
}
