//! Mercure topic selectors: `*`, a topic compared exactly, or an RFC 6570
//! URI template that a topic matches when some values of its variables
//! expand to it.
//!
//! The draft's steps, in order: `*` matches everything; a selector equal to
//! the topic matches it (so a template matches itself, as the draft wants
//! for authorization); a selector that parses as a URI template matches
//! what its expansion can produce; anything else matches nothing more.
//!
//! Matching a template is done by turning it into an anchored regular
//! expression, once, when the selector is parsed (levels 1–4: every
//! operator, prefix and explode modifiers). A variable may be undefined
//! (its expression then expands to nothing), a list (values joined by the
//! operator's separator) or a map (`key=value` pairs when exploded), so
//! each expression matches any ordered run of its items. Values are what
//! expansion produces — unreserved characters and percent-escapes, plus
//! reserved characters for `+` and `#` — and, because Mercure topics are
//! IRIs, any non-ASCII character too (a strict RFC 6570 expansion would
//! have percent-encoded it). A string with a `{` that is not a valid
//! template is compared exactly, as the reference hub does.

use std::fmt;

use regex_automata::meta::Regex;

/// Longest selector (or topic) accepted, in bytes.
pub const MAX_SELECTOR_LEN: usize = 2048;

/// Bound on the compiled automaton of one template.
const NFA_SIZE_LIMIT: usize = 1 << 20;

/// One topic selector.
#[derive(Clone)]
pub struct Selector {
    raw: Box<str>,
    kind: Kind,
}

#[derive(Clone)]
enum Kind {
    Any,
    Exact,
    Template(Regex),
}

impl fmt::Debug for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match self.kind {
            Kind::Any => "any",
            Kind::Exact => "exact",
            Kind::Template(_) => "template",
        };
        write!(f, "{kind}:{:?}", self.raw)
    }
}

/// Why a selector (or topic) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("is empty")]
    Empty,
    #[error("is longer than {MAX_SELECTOR_LEN} bytes")]
    TooLong,
    #[error("contains a control character")]
    Control,
}

/// Checks a topic or selector: not empty, bounded, and (as the draft
/// requires of topics) without C0/C1 control characters or DEL.
pub fn check(s: &str) -> Result<(), SelectorError> {
    if s.is_empty() {
        return Err(SelectorError::Empty);
    }
    if s.len() > MAX_SELECTOR_LEN {
        return Err(SelectorError::TooLong);
    }
    if s.chars()
        .any(|c| c <= '\u{1f}' || ('\u{7f}'..='\u{9f}').contains(&c))
    {
        return Err(SelectorError::Control);
    }
    Ok(())
}

impl Selector {
    pub fn parse(raw: &str) -> Result<Selector, SelectorError> {
        check(raw)?;
        let kind = if raw == "*" {
            Kind::Any
        } else if raw.contains('{') {
            template_regex(raw).map_or(Kind::Exact, Kind::Template)
        } else {
            Kind::Exact
        };
        Ok(Selector {
            raw: raw.into(),
            kind,
        })
    }

    pub fn as_str(&self) -> &str {
        &self.raw
    }

    /// Whether `topic` matches this selector.
    pub fn matches(&self, topic: &str) -> bool {
        match &self.kind {
            Kind::Any => true,
            _ if *self.raw == *topic => true,
            Kind::Exact => false,
            Kind::Template(re) => re.is_match(topic),
        }
    }

    /// Whether this is a URI template (for tests and logs).
    pub fn is_template(&self) -> bool {
        matches!(self.kind, Kind::Template(_))
    }
}

/// Whether any of `topics` matches any of `selectors`.
pub fn any_match<'a>(
    selectors: &[Selector],
    topics: impl IntoIterator<Item = &'a str> + Clone,
) -> bool {
    selectors
        .iter()
        .any(|s| topics.clone().into_iter().any(|t| s.matches(t)))
}

/// One expression's operator: what starts it, what separates its items,
/// whether items are `name=value`, and which characters values may hold.
struct Op {
    first: &'static str,
    sep: &'static str,
    named: bool,
    /// `;` writes `;name` for an empty value, `?` and `&` write `name=`.
    bare_name_if_empty: bool,
    reserved: bool,
}

fn operator(c: char) -> Option<Op> {
    let op = |first, sep, named, bare_name_if_empty, reserved| Op {
        first,
        sep,
        named,
        bare_name_if_empty,
        reserved,
    };
    Some(match c {
        '+' => op("", ",", false, false, true),
        '#' => op("#", ",", false, false, true),
        '.' => op(".", ".", false, false, false),
        '/' => op("/", "/", false, false, false),
        ';' => op(";", ";", true, true, false),
        '?' => op("?", "&", true, false, false),
        '&' => op("&", "&", true, false, false),
        _ => return None,
    })
}

/// A character an expansion may produce in a value: unreserved (or also
/// reserved), a percent-escape, or non-ASCII (IRIs).
fn value_char(reserved: bool) -> &'static str {
    if reserved {
        r"(?:[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=]|%[0-9A-Fa-f]{2}|[^\x00-\x7F])"
    } else {
        r"(?:[A-Za-z0-9\-._~]|%[0-9A-Fa-f]{2}|[^\x00-\x7F])"
    }
}

/// A map key when exploded, or a variable name.
const KEY: &str = r"(?:[A-Za-z0-9_.\-~]|%[0-9A-Fa-f]{2}|[^\x00-\x7F])+";

struct VarSpec<'a> {
    name: &'a str,
    prefix: Option<u16>,
    explode: bool,
}

fn varspec(spec: &str) -> Option<VarSpec<'_>> {
    let (name, prefix, explode) = if let Some(name) = spec.strip_suffix('*') {
        (name, None, true)
    } else if let Some((name, len)) = spec.split_once(':') {
        // 1 to 4 digits, no leading zero (RFC 6570 `max-length`).
        let digits = (1..=4).contains(&len.len())
            && !len.starts_with('0')
            && len.bytes().all(|b| b.is_ascii_digit());
        if !digits {
            return None;
        }
        (name, Some(len.parse().ok()?), false)
    } else {
        (spec, None, false)
    };
    let valid = !name.is_empty()
        && name.split('.').all(|part| !part.is_empty())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'%');
    valid.then_some(VarSpec {
        name,
        prefix,
        explode,
    })
}

/// The regular expression of one expression's body (between the braces),
/// or `None` if it is not a valid expression.
fn expression(body: &str) -> Option<String> {
    let mut chars = body.chars();
    let (op, list) = match chars.next().and_then(operator) {
        Some(op) => (op, chars.as_str()),
        None => {
            // Reserved for future extensions: not a valid template.
            if body.starts_with(['=', ',', '!', '@', '|']) {
                return None;
            }
            let simple = Op {
                first: "",
                sep: ",",
                named: false,
                bare_name_if_empty: false,
                reserved: false,
            };
            (simple, body)
        }
    };
    let c = value_char(op.reserved);
    let mut items = Vec::new();
    for spec in list.split(',') {
        let v = varspec(spec)?;
        let name = regex_syntax_escape(v.name);
        let item = if v.explode {
            // A list's values or a map's pairs, each its own item.
            if op.named {
                format!("{KEY}(?:={c}*)?")
            } else {
                format!("(?:{c}|=)*")
            }
        } else {
            let value = match v.prefix {
                Some(n) => format!("{c}{{0,{n}}}"),
                // A list or map joined with commas.
                None => format!("(?:{c}|,)*"),
            };
            match (op.named, op.bare_name_if_empty) {
                (true, true) => format!("{name}(?:={value})?"),
                (true, false) => format!("{name}={value}"),
                (false, _) => value,
            }
        };
        items.push(item);
    }
    let any = format!("(?:{})", items.join("|"));
    let first = regex_syntax_escape(op.first);
    let sep = regex_syntax_escape(op.sep);
    Some(format!("(?:{first}{any}(?:{sep}{any})*)?"))
}

/// `template` as an anchored regular expression, or `None` if it is not a
/// valid URI template.
fn template_regex(template: &str) -> Option<Regex> {
    let mut pattern = String::from("^(?:");
    let mut rest = template;
    while !rest.is_empty() {
        match rest.find(['{', '}']) {
            Some(i) if rest.as_bytes()[i] == b'}' => return None,
            Some(i) => {
                pattern.push_str(&regex_syntax_escape(&rest[..i]));
                let close = rest[i..].find('}')? + i;
                pattern.push_str(&expression(&rest[i + 1..close])?);
                rest = &rest[close + 1..];
            }
            None => {
                pattern.push_str(&regex_syntax_escape(rest));
                rest = "";
            }
        }
    }
    pattern.push_str(")$");
    Regex::builder()
        .configure(Regex::config().nfa_size_limit(Some(NFA_SIZE_LIMIT)))
        .build(&pattern)
        .ok()
}

/// Escapes every regex meta character of a literal.
fn regex_syntax_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for ch in s.chars() {
        if "\\.+*?()|[]{}^$#&-~".contains(ch) {
            out.push('\\');
        }
        out.push(ch);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn m(selector: &str, topic: &str) -> bool {
        Selector::parse(selector).unwrap().matches(topic)
    }

    #[test]
    fn star_matches_everything() {
        assert!(m("*", "https://example.com/books/1"));
        assert!(m("*", "anything at all"));
    }

    #[test]
    fn exact_topics_and_uris() {
        assert!(m("bar", "bar"));
        assert!(!m("bar", "baz"));
        assert!(m("https://example.com/foo", "https://example.com/foo"));
        assert!(!m("https://example.com/foo", "https://example.com/foo/"));
        assert!(!m("https://example.com/foo", "https://example.com/fo"));
        // An IRI, compared exactly.
        assert!(m("https://example.com/café", "https://example.com/café"));
    }

    #[test]
    fn level_1_simple_expansion() {
        let s = "https://example.com/books/{id}";
        assert!(Selector::parse(s).unwrap().is_template());
        assert!(m(s, "https://example.com/books/1"));
        assert!(m(s, "https://example.com/books/foo-bar_baz.~"));
        assert!(m(s, "https://example.com/books/a%20b"));
        assert!(!m(s, "https://example.com/books/1/reviews"));
        assert!(!m(s, "https://example.com/authors/1"));
        assert!(!m(s, "https://example.org/books/1"));
        // A template matches itself (the draft's step 2).
        assert!(m(s, s));
        // Several expressions.
        let s = "https://example.com/{kind}/{id}";
        assert!(m(s, "https://example.com/books/1"));
        assert!(!m(s, "https://example.com/books/1/2"));
    }

    #[test]
    fn level_2_reserved_and_fragment() {
        let s = "https://example.com/{+path}";
        assert!(m(s, "https://example.com/books/1/reviews"));
        assert!(!m("https://example.com/{path}", "https://example.com/a/b"));
        let s = "https://example.com/page{#section}";
        assert!(m(s, "https://example.com/page#intro/part"));
        assert!(m(s, "https://example.com/page"));
        assert!(!m(s, "https://example.com/page/other"));
    }

    #[test]
    fn level_3_operators_and_lists() {
        assert!(m("https://example.com/{x,y}", "https://example.com/1,2"));
        assert!(m("https://example.com{/a,b}", "https://example.com/x/y"));
        assert!(!m("https://example.com{/a}", "https://example.com/x?y"));
        assert!(m(
            "https://example.com/file{.ext}",
            "https://example.com/file.json"
        ));
        assert!(m(
            "https://example.com/m{;x,y}",
            "https://example.com/m;x=1;y"
        ));
        let q = "https://example.com/users/foo/{?topic}";
        assert!(m(
            q,
            "https://example.com/users/foo/?topic=https%3A%2F%2Fexample.com%2Fbooks%2F1"
        ));
        assert!(m(q, "https://example.com/users/foo/"));
        assert!(!m(q, "https://example.com/users/bar/?topic=x"));
        assert!(!m(q, "https://example.com/users/foo/?other=x"));
        assert!(m(
            "https://example.com/s?q=1{&page,size}",
            "https://example.com/s?q=1&page=2&size=10"
        ));
    }

    #[test]
    fn level_4_prefix_and_explode() {
        let s = "https://example.com/{id:3}";
        assert!(m(s, "https://example.com/abc"));
        assert!(!m(s, "https://example.com/abcd"));
        assert!(m("https://example.com{/ids*}", "https://example.com/1/2/3"));
        assert!(m(
            "https://example.com/s{?q*}",
            "https://example.com/s?a=1&b=2"
        ));
        assert!(m("https://example.com/{k*}", "https://example.com/a=1,b=2"));
    }

    #[test]
    fn strings_that_are_not_templates_compare_exactly() {
        for s in ["a{b", "a}b", "{=x}", "{x y}", "{}", "{x:0}", "{x:abc}"] {
            let sel = Selector::parse(s).unwrap();
            assert!(!sel.is_template(), "{s}");
            assert!(sel.matches(s));
            assert!(!sel.matches("a"));
        }
    }

    #[test]
    fn bad_selectors_are_refused() {
        assert_eq!(Selector::parse("").unwrap_err(), SelectorError::Empty);
        assert_eq!(Selector::parse("a\nb").unwrap_err(), SelectorError::Control);
        assert_eq!(
            Selector::parse("a\u{85}b").unwrap_err(),
            SelectorError::Control
        );
        assert_eq!(
            Selector::parse(&"a".repeat(MAX_SELECTOR_LEN + 1)).unwrap_err(),
            SelectorError::TooLong
        );
    }

    #[test]
    fn any_of_several_selectors_against_any_topic() {
        let sels: Vec<Selector> = ["https://example.com/foo", "https://example.com/bar/{id}"]
            .iter()
            .map(|s| Selector::parse(s).unwrap())
            .collect();
        assert!(any_match(&sels, ["x", "https://example.com/bar/9"]));
        assert!(any_match(&sels, ["https://example.com/foo"]));
        assert!(!any_match(&sels, ["https://example.com/baz"]));
        assert!(!any_match(&[], ["https://example.com/foo"]));
    }

    proptest! {
        #[test]
        fn never_panics_and_always_matches_itself(s in "\\PC{1,60}") {
            if let Ok(sel) = Selector::parse(&s) {
                prop_assert!(sel.matches(&s));
                let _ = sel.matches("https://example.com/x");
            }
        }

        #[test]
        fn simple_templates_match_their_expansions(v in "[A-Za-z0-9._~-]{0,20}") {
            let sel = Selector::parse("https://example.com/books/{id}").unwrap();
            let topic = format!("https://example.com/books/{v}");
            prop_assert!(sel.matches(&topic));
            let extra_segment = format!("{topic}/x");
            prop_assert!(!sel.matches(&extra_segment));
        }
    }
}
