//! Go duration strings (`24h`, `1m30s`, `250ms`), the format FSM's Go types use for every
//! duration field (`time.ParseDuration` and `metav1.Duration` on the wire).

use std::time::Duration;

/// Parses a Go duration string the way Go's `time.ParseDuration` does.
///
/// Returns `None` for anything Go rejects (empty string, missing or unknown unit, overflow past
/// Go's ~292-year limit) and also for negative durations, which `std::time::Duration` cannot
/// hold and no FSM field gives a meaning to. `"0"` (no unit) is accepted, as in Go.
pub fn parse_go_duration(input: &str) -> Option<Duration> {
    let (negative, mut rest) = match input.as_bytes().first() {
        Some(b'-') => (true, &input[1..]),
        Some(b'+') => (false, &input[1..]),
        _ => (false, input),
    };
    if rest == "0" {
        return Some(Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }

    // Go accumulates in a u64 and rejects totals above i64::MAX nanoseconds.
    const LIMIT: u64 = i64::MAX as u64;
    let mut total: u64 = 0;
    while !rest.is_empty() {
        let first = rest.as_bytes()[0];
        if !(first == b'.' || first.is_ascii_digit()) {
            return None;
        }

        let digits = leading_digits(rest);
        let whole: u64 = if digits == 0 {
            0
        } else {
            rest[..digits].parse().ok().filter(|v| *v <= LIMIT)?
        };
        rest = &rest[digits..];

        // Go keeps the fraction as an integer plus a scale and stops accumulating digits once
        // they would overflow, ignoring the remaining (insignificant) ones.
        let mut fraction: u64 = 0;
        let mut scale: f64 = 1.0;
        let mut fraction_digits = 0;
        if let Some(after_dot) = rest.strip_prefix('.') {
            rest = after_dot;
            fraction_digits = leading_digits(rest);
            let mut overflowed = false;
            for digit in rest[..fraction_digits].bytes() {
                if overflowed {
                    continue;
                }
                match fraction
                    .checked_mul(10)
                    .and_then(|f| f.checked_add(u64::from(digit - b'0')))
                    .filter(|f| *f <= LIMIT)
                {
                    Some(next) => {
                        fraction = next;
                        scale *= 10.0;
                    }
                    None => overflowed = true,
                }
            }
            rest = &rest[fraction_digits..];
        }
        if digits == 0 && fraction_digits == 0 {
            return None;
        }

        let unit_len = rest
            .bytes()
            .position(|c| c == b'.' || c.is_ascii_digit())
            .unwrap_or(rest.len());
        if unit_len == 0 {
            return None;
        }
        let unit = unit_nanos(&rest[..unit_len])?;
        rest = &rest[unit_len..];

        let mut value = whole.checked_mul(unit).filter(|v| *v <= LIMIT)?;
        if fraction > 0 {
            // Same float arithmetic as Go, so fractional inputs round identically.
            let extra = (fraction as f64 * (unit as f64 / scale)) as u64;
            value = value.checked_add(extra).filter(|v| *v <= LIMIT)?;
        }
        total = total.checked_add(value).filter(|v| *v <= LIMIT)?;
    }

    if negative && total != 0 {
        return None;
    }
    Some(Duration::from_nanos(total))
}

fn leading_digits(s: &str) -> usize {
    s.bytes().take_while(u8::is_ascii_digit).count()
}

fn unit_nanos(unit: &str) -> Option<u64> {
    Some(match unit {
        "ns" => 1,
        // Go accepts the ASCII spelling and both the micro sign and the Greek mu.
        "us" | "\u{00b5}s" | "\u{03bc}s" => 1_000,
        "ms" => 1_000_000,
        "s" => 1_000_000_000,
        "m" => 60 * 1_000_000_000,
        "h" => 3_600 * 1_000_000_000,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(v: u64) -> Option<Duration> {
        Some(Duration::from_millis(v))
    }

    #[test]
    fn accepts_what_go_accepts() {
        assert_eq!(parse_go_duration("24h"), Some(Duration::from_secs(86_400)));
        assert_eq!(parse_go_duration("1m30s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_go_duration("2ms"), ms(2));
        assert_eq!(parse_go_duration("25ms"), ms(25));
        assert_eq!(parse_go_duration("1.5h"), Some(Duration::from_secs(5_400)));
        assert_eq!(parse_go_duration(".5s"), ms(500));
        assert_eq!(parse_go_duration("1.s"), ms(1_000));
        assert_eq!(parse_go_duration("0"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("0s"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("-0s"), Some(Duration::ZERO));
        assert_eq!(parse_go_duration("+3s"), ms(3_000));
        assert_eq!(parse_go_duration("10us"), Some(Duration::from_micros(10)));
        assert_eq!(parse_go_duration("10µs"), Some(Duration::from_micros(10)));
        assert_eq!(parse_go_duration("10μs"), Some(Duration::from_micros(10)));
        assert_eq!(parse_go_duration("7ns"), Some(Duration::from_nanos(7)));
        assert_eq!(
            parse_go_duration("1h2m3s4ms5us6ns"),
            Some(Duration::new(3_723, 4_005_006))
        );
        assert_eq!(
            parse_go_duration("2562047h47m16.854775807s"),
            Some(Duration::from_nanos(i64::MAX as u64))
        );
    }

    #[test]
    fn rejects_what_go_rejects() {
        for bad in [
            "",
            "24",
            "1",
            "h",
            "s",
            ".s",
            "1.2.3s",
            "1d",
            "1 h",
            " 1h",
            "1h ",
            "-",
            "+",
            "1hh",
            "--1s",
            "3000000h",
            "9223372037s",
        ] {
            assert_eq!(parse_go_duration(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn rejects_negative_durations() {
        assert_eq!(parse_go_duration("-1s"), None);
    }
}
