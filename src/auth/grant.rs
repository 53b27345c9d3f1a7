//! What a token allows: the topics its bearer may read and publish to, as
//! exact names or `prefix*` patterns, and when it expires.

use crate::topic;

/// A set of topics given as exact names (`chat`) or prefixes (`orders.*`;
/// `*` alone is every topic).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TopicPatterns {
    exact: Vec<Box<str>>,
    prefixes: Vec<Box<str>>,
}

/// A claim entry that is neither a topic name nor `prefix*`. Carries the
/// entry's index, never its text (a claim is part of the token).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("entry {0} is not a topic name or a `prefix*` pattern")]
pub struct PatternError(pub usize);

impl TopicPatterns {
    /// Parses claim entries. A pattern's prefix uses the topic alphabet; `*`
    /// may only end it.
    pub fn parse<'a>(entries: impl IntoIterator<Item = &'a str>) -> Result<Self, PatternError> {
        let mut out = TopicPatterns::default();
        for (i, entry) in entries.into_iter().enumerate() {
            match entry.strip_suffix('*') {
                Some(prefix) => {
                    let ok = prefix.len() < topic::MAX_TOPIC_LEN
                        && (prefix.is_empty()
                            || topic::validate(prefix, topic::MAX_TOPIC_LEN).is_ok());
                    if !ok {
                        return Err(PatternError(i));
                    }
                    out.prefixes.push(prefix.into());
                }
                None => {
                    topic::validate(entry, topic::MAX_TOPIC_LEN).map_err(|_| PatternError(i))?;
                    out.exact.push(entry.into());
                }
            }
        }
        Ok(out)
    }

    /// Every topic (`*`).
    pub fn all() -> Self {
        TopicPatterns {
            exact: Vec::new(),
            prefixes: vec!["".into()],
        }
    }

    pub fn allows(&self, topic: &str) -> bool {
        self.exact.iter().any(|t| **t == *topic)
            || self.prefixes.iter().any(|p| topic.starts_with(&**p))
    }

    /// The first of `topics` not allowed, if any.
    pub fn first_denied<'a>(&self, topics: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
        topics.into_iter().find(|t| !self.allows(t))
    }

    pub fn is_empty(&self) -> bool {
        self.exact.is_empty() && self.prefixes.is_empty()
    }
}

/// What a verified token grants.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    /// The `sub` claim, when present (publishers are rate-limited by it).
    pub subject: Option<String>,
    /// Topics the bearer may subscribe to.
    pub topics: TopicPatterns,
    /// Topics the bearer may publish to.
    pub publish: TopicPatterns,
    /// The `exp` claim: Unix time in seconds.
    pub expires_at: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn exact_names_and_prefixes() {
        let p = TopicPatterns::parse(["chat", "orders.*", "user-42.*"]).unwrap();
        assert!(p.allows("chat"));
        assert!(!p.allows("chat2"));
        assert!(!p.allows("cha"));
        assert!(p.allows("orders.eu"));
        assert!(p.allows("orders."));
        assert!(!p.allows("orders"));
        assert!(!p.allows("ordersX"));
        assert!(p.allows("user-42.inbox"));
        assert!(!p.allows("user-420.inbox"));
        assert_eq!(p.first_denied(["chat", "news", "x"]), Some("news"));
        assert_eq!(p.first_denied(["chat", "orders.x"]), None);
        let all = TopicPatterns::parse(["*"]).unwrap();
        assert_eq!(all, TopicPatterns::all());
        assert!(all.allows("anything"));
        let none = TopicPatterns::parse([]).unwrap();
        assert!(none.is_empty() && !none.allows("chat"));
    }

    #[test]
    fn malformed_entries_are_refused_by_index() {
        for (bad, at) in [
            (vec!["a", "*a"], 1),
            (vec!["a*b"], 0),
            (vec![""], 0),
            (vec!["a b"], 0),
            (vec!["ok", "ok", "**"], 2),
            (vec!["a:b*"], 0),
        ] {
            assert_eq!(
                TopicPatterns::parse(bad.clone()),
                Err(PatternError(at)),
                "{bad:?}"
            );
        }
        let long = format!("{}*", "x".repeat(topic::MAX_TOPIC_LEN));
        assert!(TopicPatterns::parse([long.as_str()]).is_err());
    }

    proptest! {
        #[test]
        fn a_prefix_allows_exactly_the_names_it_starts(
            prefix in "[a-z.]{0,6}",
            name in "[a-z.]{1,10}",
        ) {
            let pattern = format!("{prefix}*");
            let p = TopicPatterns::parse([pattern.as_str()]).unwrap();
            prop_assert_eq!(p.allows(&name), name.starts_with(&prefix));
        }
    }
}
