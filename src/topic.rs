//! Topic names: the one rule both planes (and every backend) check.
//!
//! A topic name is 1 to `max_len` characters from `A-Z a-z 0-9 . _ -`, the
//! same alphabet Kafka allows, so a Kafka topic can map to an SSE topic of the
//! same name. Names never contain `:` or `,`, which cursors use as separators.

/// Default (and largest accepted) length of a topic name.
pub const MAX_TOPIC_LEN: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    #[error("topic name is empty")]
    Empty,
    #[error("topic name is longer than {max} characters")]
    TooLong { max: usize },
    #[error("topic name {name:?} has a character outside A-Z a-z 0-9 . _ -")]
    BadChar { name: String },
}

/// Checks a topic name against the allowed pattern `[A-Za-z0-9._-]{1,max_len}`.
pub fn validate(name: &str, max_len: usize) -> Result<(), TopicError> {
    if name.is_empty() {
        return Err(TopicError::Empty);
    }
    if name.len() > max_len {
        return Err(TopicError::TooLong { max: max_len });
    }
    let ok = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-');
    if !name.bytes().all(ok) {
        return Err(TopicError::BadChar {
            name: name.chars().take(max_len).collect(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_the_documented_alphabet() {
        for good in ["a", "chat", "orders.eu-west_1", "A9", &"x".repeat(128)] {
            assert_eq!(validate(good, MAX_TOPIC_LEN), Ok(()), "{good:?}");
        }
    }

    #[test]
    fn rejects_everything_else() {
        assert_eq!(validate("", 128), Err(TopicError::Empty));
        assert_eq!(
            validate(&"x".repeat(129), 128),
            Err(TopicError::TooLong { max: 128 })
        );
        for bad in ["a b", "a:b", "a,b", "a/b", "é", "a\nb", "a\0"] {
            assert!(
                matches!(validate(bad, 128), Err(TopicError::BadChar { .. })),
                "{bad:?}"
            );
        }
    }
}
