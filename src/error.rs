//! Error plumbing shared by every module: the boxed error that travels through hyper and
//! tower, and the two questions the edges ask of an error chain — "is a typed cause of ours in
//! there?" (to say *why* a tunnel failed) and "what is it, on one line?" (for the user).

/// Errors that travel through bodies, connectors and layers.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The first error of type `T` in `err`'s source chain, looking inside `io::Error`s too
/// (`io::Error::source` skips the error it wraps).
pub fn find_cause<'a, T: std::error::Error + 'static>(
    err: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(t) = e.downcast_ref::<T>() {
            return Some(t);
        }
        if let Some(inner) = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            if let Some(t) = find_cause::<T>(inner) {
                return Some(t);
            }
        }
        cur = e.source();
    }
    None
}

/// `err` and its causes on one line, without repeats (hyper repeats its sources in `Display`).
pub fn one_line(err: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = cur {
        let s = e.to_string();
        if !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = e.source().or_else(|| {
            e.downcast_ref::<std::io::Error>()
                .and_then(|io| io.get_ref())
                .map(|i| i as &(dyn std::error::Error + 'static))
        });
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("inner cause")]
    struct Inner;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_are_found_inside_io_errors() {
        let e = Outer(std::io::Error::other(Inner));
        assert!(find_cause::<Inner>(&e).is_some());
        assert_eq!(one_line(&e), "outer: inner cause");
    }
}
