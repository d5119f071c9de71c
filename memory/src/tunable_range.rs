//! The range check of run-time tunables and its error, shared by the merger's
//! ([`crate::merge::tunables`]) and the compactor's ([`crate::compact::tunables`])
//! tunables, which re-export [`Error`] under their own paths.
//!
//! A leaf: it imports nothing of the crate.

/// Errors of tunable validation.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// A value is outside its allowed range.
    #[error("{name} = {value} is outside {min}..={max}")]
    OutOfRange {
        /// The tunable.
        name: &'static str,
        /// The value given.
        value: u64,
        /// Smallest allowed value.
        min: u64,
        /// Largest allowed value.
        max: u64,
    },
}

/// Checks that tunable `name`'s `value` is in `min..=max`.
pub fn check(name: &'static str, value: u64, min: u64, max: u64) -> Result<(), Error> {
    if value < min || value > max {
        return Err(Error::OutOfRange { name, value, min, max });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_are_inclusive() {
        assert!(check("x", 0, 0, 10).is_ok());
        assert!(check("x", 10, 0, 10).is_ok());
        let err = check("x", 11, 0, 10).unwrap_err();
        assert_eq!(err, Error::OutOfRange { name: "x", value: 11, min: 0, max: 10 });
        assert_eq!(err.to_string(), "x = 11 is outside 0..=10");
        assert!(check("y", 0, 1, 10).is_err());
    }
}
