//! Civil dates as day numbers (days since 1970-01-01, UTC), without a date library.

use loyalty_platform::clock::{DAY_MS, Millis};

/// Days since 1970-01-01.
pub type Day = i64;

pub fn day_of(time: Millis) -> Day {
    time.div_euclid(DAY_MS)
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

/// Days from `today` to the next (month, day) anniversary, 0 when it is today. February 29
/// falls on March 1 in other years.
pub fn days_until_anniversary(today: Day, month: u32, day: u32) -> i64 {
    let (year, _, _) = civil(today);
    let on = |y: i32| {
        let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        if month == 2 && day == 29 && !leap {
            day_from_civil(y, 3, 1)
        } else {
            day_from_civil(y, month, day)
        }
    };
    let this_year = on(year);
    if this_year >= today {
        this_year - today
    } else {
        on(year + 1) - today
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
    }

    #[test]
    fn anniversaries() {
        let today = day_from_civil(2025, 12, 30);
        assert_eq!(days_until_anniversary(today, 12, 30), 0);
        assert_eq!(days_until_anniversary(today, 1, 2), 3);
        assert_eq!(
            days_until_anniversary(day_from_civil(2025, 2, 27), 2, 29),
            2
        );
    }
}
