//! Label and field selectors, as the apiserver parses them.
//!
//! etcd-proxy finds its pods with the StatefulSet's `matchLabels` turned into
//! a `labelSelector`, so the simulator must filter exactly like the real
//! thing. Grammar per `staging/src/k8s.io/apimachinery/pkg/labels/selector.go`
//! (`Parse`): comma-separated requirements, all of which must match:
//! `k`, `!k`, `k=v`, `k==v`, `k!=v`, `k in (a,b)`, `k notin (a,b)`.
//! Field selectors (`staging/src/k8s.io/apimachinery/pkg/fields/selector.go`)
//! support `=`, `==`, `!=` over the fields a resource exposes.

use std::collections::BTreeMap;

/// One parsed label requirement.
#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Exists(String),
    NotExists(String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

/// A parsed label selector; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct LabelSelector(Vec<Requirement>);

/// Splits on commas that are not inside parentheses.
fn split_top_level(s: &str) -> Result<Vec<String>, String> {
    let mut parts = Vec::new();
    let mut depth = 0i32;
    let mut cur = String::new();
    for c in s.chars() {
        match c {
            '(' => {
                depth += 1;
                cur.push(c);
            }
            ')' => {
                depth -= 1;
                if depth < 0 {
                    return Err(format!("unbalanced parentheses in selector {s:?}"));
                }
                cur.push(c);
            }
            ',' if depth == 0 => parts.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    if depth != 0 {
        return Err(format!("unbalanced parentheses in selector {s:?}"));
    }
    parts.push(cur);
    Ok(parts)
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '/'))
}

fn parse_set(rest: &str, term: &str) -> Result<Vec<String>, String> {
    let rest = rest.trim();
    let inner = rest
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("unable to parse requirement: expected '(' ... ')' in {term:?}"))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

/// Splits `key <word> rest` for the set operators `in` / `notin`.
fn split_set_op<'a>(term: &'a str, op: &str) -> Option<(&'a str, &'a str)> {
    let mut it = term.splitn(2, char::is_whitespace);
    let key = it.next()?;
    let rest = it.next()?.trim_start();
    let after = rest.strip_prefix(op)?;
    if after.starts_with(|c: char| c.is_whitespace() || c == '(') {
        Some((key, after))
    } else {
        None
    }
}

fn parse_requirement(term: &str) -> Result<Requirement, String> {
    let bad = |why: &str| format!("unable to parse requirement: {why} in {term:?}");
    if let Some(key) = term.strip_prefix('!') {
        let key = key.trim();
        return if valid_key(key) {
            Ok(Requirement::NotExists(key.to_string()))
        } else {
            Err(bad("invalid label key"))
        };
    }
    if let Some((key, rest)) = split_set_op(term, "notin") {
        return Ok(Requirement::NotIn(key.to_string(), parse_set(rest, term)?));
    }
    if let Some((key, rest)) = split_set_op(term, "in") {
        return Ok(Requirement::In(key.to_string(), parse_set(rest, term)?));
    }
    for (op, negate) in [("!=", true), ("==", false), ("=", false)] {
        if let Some((key, value)) = term.split_once(op) {
            let (key, value) = (key.trim(), value.trim());
            if !valid_key(key) {
                return Err(bad("invalid label key"));
            }
            let values = vec![value.to_string()];
            return Ok(if negate {
                Requirement::NotIn(key.to_string(), values)
            } else {
                Requirement::In(key.to_string(), values)
            });
        }
    }
    if valid_key(term) {
        Ok(Requirement::Exists(term.to_string()))
    } else {
        Err(bad("unsupported operator or invalid key"))
    }
}

impl LabelSelector {
    /// Parses a `labelSelector` query value.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut reqs = Vec::new();
        for term in split_top_level(s)? {
            let term = term.trim();
            if term.is_empty() {
                continue;
            }
            reqs.push(parse_requirement(term)?);
        }
        Ok(LabelSelector(reqs))
    }

    /// True if every requirement holds for `labels`.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
        })
    }
}

/// A parsed field selector: `(field, value, equal?)` terms, all of which must hold.
#[derive(Debug, Clone, Default)]
pub(crate) struct FieldSelector(Vec<(String, String, bool)>);

impl FieldSelector {
    /// Parses a `fieldSelector`, accepting only fields in `supported`
    /// (the apiserver answers `field label not supported: X` otherwise).
    pub fn parse(s: &str, supported: &[&str]) -> Result<Self, String> {
        let mut terms = Vec::new();
        for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
            let (field, value, eq) = if let Some((f, v)) = term.split_once("!=") {
                (f, v, false)
            } else if let Some((f, v)) = term.split_once("==") {
                (f, v, true)
            } else if let Some((f, v)) = term.split_once('=') {
                (f, v, true)
            } else {
                return Err(format!(
                    "invalid selector: '{s}'; can't understand '{term}'"
                ));
            };
            let field = field.trim();
            if !supported.contains(&field) {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_string(), value.trim().to_string(), eq));
        }
        Ok(FieldSelector(terms))
    }

    /// True if every term holds; `get` returns an object's value for a field.
    pub fn matches(&self, get: impl Fn(&str) -> String) -> bool {
        self.0.iter().all(|(f, v, eq)| (get(f) == *v) == *eq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn label_selector_grammar() {
        let l = labels(&[("app", "etcd"), ("tier", "db")]);
        for (sel, want) in [
            ("", true),
            ("app=etcd", true),
            ("app==etcd", true),
            ("app!=etcd", false),
            ("app=other", false),
            ("app", true),
            ("!app", false),
            ("!missing", true),
            ("app in (a, etcd)", true),
            ("app in (a,b)", false),
            ("app notin (a,b)", true),
            ("missing notin (a)", true),
            ("app=etcd,tier in (db),!x", true),
            ("app=etcd,tier=web", false),
        ] {
            let parsed = LabelSelector::parse(sel).unwrap();
            assert_eq!(parsed.matches(&l), want, "selector {sel:?}");
        }
        assert!(LabelSelector::parse("app in (a").is_err());
        assert!(LabelSelector::parse("a b").is_err());
    }

    #[test]
    fn field_selector() {
        let f = FieldSelector::parse("metadata.name=etcd-0", &["metadata.name"]).unwrap();
        assert!(f.matches(|_| "etcd-0".into()));
        assert!(!f.matches(|_| "etcd-1".into()));
        assert!(FieldSelector::parse("spec.x=1", &["metadata.name"]).is_err());
    }
}
