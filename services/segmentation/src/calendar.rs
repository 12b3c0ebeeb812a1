//! Civil dates as day numbers (days since 1970-01-01, UTC) and anniversaries.

use loyalty_platform::calendar::anniversary_in;
pub use loyalty_platform::calendar::{Day, civil, day_from_civil, day_of};

/// Days from `today` to the next (month, day) anniversary, 0 when it is today. February 29
/// falls on March 1 in other years.
pub fn days_until_anniversary(today: Day, month: u32, day: u32) -> i64 {
    let (year, _, _) = civil(today);
    let this_year = anniversary_in(year, month, day);
    if this_year >= today {
        this_year - today
    } else {
        anniversary_in(year + 1, month, day) - today
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
